//! Writes the seed corpora (`fuzz/corpus/<target>/`) from real messages: a
//! handshake recorded between two `Device`s (initiation, response, a cookie
//! reply from the gateway under load), transport packets (data both ways, a
//! keepalive), those messages in real Ethernet/IP/UDP frames, LAN frames, a
//! sample configuration file and sample API bodies.
//!
//! `cargo xtask fuzz-seeds` (or `cargo run -p wgxdp-fuzz-harness --bin fuzz-seeds -- DIR`).
//! Keys are fresh on every run, so the bytes differ; the harnesses patch in
//! what they must (live receiver index, MAC1), so any run's seeds serve.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::device::Action;
use wgxdp_dataplane::frame::{udp_headers_len, write_udp_headers};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::peer_view::L2Path;
use wgxdp_dataplane::testing::{
    handshaken_pair, ipv4_l4_packet, ipv4_packet, with_tcp_flags, MemoryWorker, CLIENT_ADDR, CLIENT_MAC, CLIENT_TUNNEL,
    GATEWAY_ADDR, GATEWAY_WAN_MAC, LAN_HOST,
};
use wgxdp_dataplane::wire::{ip_protocol, Ipv6Packet, IPV6_HEADER_LEN};
use wgxdp_fuzz_harness::{control::key_dir, cookie, device, encode, ipv4_with_payload, step_bytes, worker};

/// Real messages from one recorded exchange.
struct Recorded {
    initiation: Vec<u8>,
    response: Vec<u8>,
    cookie_reply: Vec<u8>,
    data: Vec<u8>,
    data_to_client: Vec<u8>,
    keepalive: Vec<u8>,
}

fn record() -> Recorded {
    let (mut pair, mut keepalive) = handshaken_pair(AeadBackend::Ring);
    let (g, c): (SocketAddr, SocketAddr) = (GATEWAY_ADDR.parse().unwrap(), CLIENT_ADDR.parse().unwrap());
    let (now, wall) = (Instant::now(), SystemTime::now());
    let mut out = vec![0u8; 2048];
    let sent = |r: Result<Action<'_>, _>| match r {
        Ok(Action::Send { bytes, .. }) => bytes.to_vec(),
        other => panic!("expected a datagram, got {other:?}"),
    };
    let confirm = keepalive.clone();
    pair.gateway.receive(c, &mut keepalive, false, now, wall, &mut out).expect("keepalive");
    let data = sent(pair.client.send(&ipv4_with_payload(CLIENT_TUNNEL, LAN_HOST, b"ping"), now, wall, &mut out));
    let data_to_client =
        sent(pair.gateway.send(&ipv4_with_payload(LAN_HOST, CLIENT_TUNNEL, b"pong"), now, wall, &mut out));
    // A new handshake once the rate limit allows one.
    let (later, wall) = (now + Duration::from_secs(6), wall + Duration::from_secs(6));
    pair.client.initiate(pair.client_peer);
    let t = pair.client.poll_transmit(later, wall, &mut out).expect("an initiation");
    let initiation = out[..t.len].to_vec();
    let cookie_reply = sent(pair.gateway.receive(c, &mut initiation.clone(), true, later, wall, &mut out));
    let response = sent(pair.gateway.receive(c, &mut initiation.clone(), false, later, wall, &mut out));
    pair.client.receive(g, &mut response.clone(), false, later, wall, &mut out).expect("response");
    assert_eq!((initiation.len(), response.len(), cookie_reply.len()), (148, 92, 64));
    Recorded { initiation, response, cookie_reply, data, data_to_client, keepalive: confirm }
}

/// `payload` as a UDP datagram in an Ethernet frame, client to gateway.
fn wan_frame(payload: &[u8], v6: bool) -> Vec<u8> {
    let (local, dst): (SocketAddr, SocketAddr) = if v6 {
        ("[fd00::2]:51820".parse().unwrap(), "[fd00::1]:51820".parse().unwrap())
    } else {
        (CLIENT_ADDR.parse().unwrap(), GATEWAY_ADDR.parse().unwrap())
    };
    let hdr = udp_headers_len(v6);
    let mut frame = vec![0u8; hdr + payload.len()];
    frame[hdr..].copy_from_slice(payload);
    let path = L2Path { local_mac: CLIENT_MAC, remote_mac: GATEWAY_WAN_MAC, local };
    write_udp_headers(&mut frame, &path, dst, true).expect("fits");
    frame
}

fn ipv6_packet(payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; IPV6_HEADER_LEN + payload.len()];
    b[IPV6_HEADER_LEN..].copy_from_slice(payload);
    let (s, d) = ("fd00:1::5".parse().unwrap(), "fd00:2::9".parse().unwrap());
    Ipv6Packet::emit(&mut b[..], s, d, ip_protocol::UDP, 64, payload.len()).expect("fits");
    b
}

struct Out {
    root: PathBuf,
    written: usize,
}

impl Out {
    fn write(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("seed");
        self.written += 1;
    }
}

fn records(steps: &[(u8, u8, &[u8])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (op, flags, bytes) in steps {
        encode(&mut v, *op, *flags, bytes);
    }
    v
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("fuzz/").join("corpus"));
    let r = record();
    let mut out = Out { root: root.clone(), written: 0 };

    // wire_views: whole frames as the workers receive them, and bare messages.
    let w = "wire_views";
    out.write(w, "wan_initiation", &wan_frame(&r.initiation, false));
    out.write(w, "wan_response", &wan_frame(&r.response, false));
    out.write(w, "wan_cookie_reply", &wan_frame(&r.cookie_reply, false));
    out.write(w, "wan_data", &wan_frame(&r.data, false));
    out.write(w, "wan_keepalive", &wan_frame(&r.keepalive, false));
    out.write(w, "wan_data_v6", &wan_frame(&r.data_to_client, true));
    out.write(w, "lan_ipv4", &MemoryWorker::lan_frame(&ipv4_with_payload(LAN_HOST, CLIENT_TUNNEL, b"pong")));
    let mut lan6 = MemoryWorker::lan_frame(&ipv6_packet(b"pong"));
    lan6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    out.write(w, "lan_ipv6", &lan6);
    out.write(w, "initiation", &r.initiation);
    out.write(w, "transport", &r.data);

    // device_receive: recorded messages, then sequences a real client drives.
    use device::{flag as df, op as dop};
    let d = "device_receive";
    let ping = ipv4_with_payload(LAN_HOST, CLIENT_TUNNEL, b"pong");
    let stamp_client = df::FROM_CLIENT | df::STAMP_MAC1;
    out.write(d, "initiation", &records(&[(dop::DATAGRAM, stamp_client, &r.initiation)]));
    out.write(d, "initiation_under_load", &records(&[(dop::DATAGRAM, stamp_client | df::UNDER_LOAD, &r.initiation)]));
    out.write(
        d,
        "initiation_stranger_v6",
        &records(&[(dop::DATAGRAM, df::STAMP_MAC1 | df::V6 | df::UNDER_LOAD, &r.initiation)]),
    );
    out.write(d, "response", &records(&[(dop::DATAGRAM, stamp_client | df::LIVE_INDEX, &r.response)]));
    out.write(d, "cookie_reply", &records(&[(dop::DATAGRAM, df::FROM_CLIENT | df::LIVE_INDEX, &r.cookie_reply)]));
    out.write(d, "transport", &records(&[(dop::DATAGRAM, df::FROM_CLIENT | df::LIVE_INDEX, &r.data)]));
    out.write(d, "keepalive_replayed", &records(&[(dop::KEEPALIVE, 0, &[]), (dop::KEEPALIVE, 0, &[])]));
    out.write(
        d,
        "client_data_and_reply",
        &records(&[(dop::CLIENT_DATA, 0, b"ping"), (dop::SEND, 0, &ping), (dop::CLIENT_DATA, df::MUTATE, b"ping")]),
    );
    let rekey = step_bytes(Duration::from_secs(125));
    let idle = step_bytes(Duration::from_secs(200));
    let second = step_bytes(Duration::from_secs(1));
    let mut cycles: Vec<(u8, u8, &[u8])> = Vec::new();
    for _ in 0..5 {
        cycles.extend([(dop::CLIENT_DATA, 0, &b"ping"[..]), (dop::SEND, 0, &ping[..]), (dop::CLOCK, 0, &rekey[..])]);
        cycles.push((dop::EXCHANGE, 0, &[]));
    }
    out.write(d, "rekey_cycles", &records(&cycles));
    out.write(
        d,
        "idle_then_lan_traffic",
        &records(&[
            (dop::CLIENT_DATA, 0, b"ping"),
            (dop::CLOCK, 0, &idle),
            (dop::SEND, 0, &ping),
            (dop::CLOCK, 0, &second),
            (dop::SEND, 0, &ping),
            (dop::CLIENT_DATA, 0, b"ping"),
        ]),
    );
    out.write(
        d,
        "rekey_under_load",
        &records(&[
            (dop::CLOCK, df::UNDER_LOAD, &rekey),
            (dop::CLOCK, df::UNDER_LOAD, &step_bytes(Duration::from_secs(6))),
        ]),
    );

    // cookie: a flags byte, then the message.
    use cookie::flag as cf;
    let c = "cookie";
    let with = |flags: u8, msg: &[u8]| [&[flags][..], msg].concat();
    out.write(c, "initiation_stamped", &with(cf::STAMP, &r.initiation));
    out.write(c, "response_stamped_v6", &with(cf::STAMP | cf::V6, &r.response));
    out.write(c, "initiation_secret_rotated", &with(cf::STAMP | cf::LATER, &r.initiation));
    out.write(c, "reply_mutated", &with(cf::STAMP | cf::MUTATE_REPLY | 0x30, &r.initiation));
    out.write(c, "recorded_initiation", &with(0, &r.initiation));
    out.write(c, "recorded_cookie_reply", &with(0, &r.cookie_reply));

    // worker_loop: frames both ways, handshakes filling the queue, clock steps.
    use worker::{flag as wf, op as wop};
    let k = "worker_loop";
    out.write(k, "wan_initiation_frame", &records(&[(wop::WAN_FRAME, 0, &wan_frame(&r.initiation, false))]));
    out.write(
        k,
        "data_both_ways",
        &records(&[(wop::CLIENT_DATA, 0, b"ping"), (wop::LAN, 0, b"pong"), (wop::CLIENT_DATA, wf::MUTATE, b"x")]),
    );
    out.write(k, "lan_raw_ipv6", &records(&[(wop::LAN, wf::RAW, &lan6)]));
    let big = MemoryWorker::lan_frame(&ipv4_packet(1500, LAN_HOST, CLIENT_TUNNEL));
    out.write(k, "lan_too_big", &records(&[(wop::LAN, wf::RAW, &big)]));
    let mut flood: Vec<(u8, u8, &[u8])> = vec![(wop::WAN_DATAGRAM, wf::STAMP_MAC1, &r.initiation[..]); 10];
    flood.push((wop::CLOCK, wf::UNDER_LOAD, &[]));
    flood.push((wop::WAN_DATAGRAM, wf::STAMP_MAC1, &r.initiation));
    out.write(k, "handshake_flood_under_load", &records(&flood));
    let mut wcycles: Vec<(u8, u8, &[u8])> = Vec::new();
    for _ in 0..5 {
        // A clock step of 0 lets the control side serve what the worker queued.
        wcycles.extend([(wop::CLIENT_DATA, 0, &b"ping"[..]), (wop::CLOCK, 0, &[][..]), (wop::LAN, 0, &b"pong"[..])]);
        wcycles.push((wop::CLOCK, 0, &rekey[..]));
    }
    wcycles.extend([
        (wop::CLOCK, 0, &idle[..]),
        (wop::LAN, 0, b"pong"),
        (wop::CLOCK, 0, &second),
        (wop::LAN, 0, b"pong"),
    ]);
    out.write(k, "rekey_cycles_then_idle", &records(&wcycles));
    // Default deny, a TCP rule for ports 20-30 (deny) and an allow-all ICMP
    // rule; the gateway's LAN address is a host address; then traffic both ways.
    let policy = [1u8 | 2, 0, 3, 20, 10, 0, 0, 2, 0, 0, 0, 0x80, 0];
    let ssh = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, 6, (40000, 22), 64);
    let ping = ipv4_l4_packet(64, CLIENT_TUNNEL, LAN_HOST, 1, (8 << 8, 1), 64);
    let expiring = ipv4_l4_packet(64, CLIENT_TUNNEL, LAN_HOST, 1, (8 << 8, 2), 1);
    let syn = wgxdp_dataplane::flow::tcp_flags::SYN;
    let lan_open =
        MemoryWorker::lan_frame(&with_tcp_flags(ipv4_l4_packet(60, LAN_HOST, CLIENT_TUNNEL, 6, (41000, 443), 64), syn));
    let reply = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, 6, (443, 41000), 64);
    out.write(
        k,
        "policy_rules_and_replies",
        &records(&[
            (wop::POLICY, 0, &policy[..]),
            (wop::CLIENT_DATA, wf::RAW, &ssh),
            (wop::CLIENT_DATA, wf::RAW, &ping),
            (wop::CLIENT_DATA, wf::RAW, &expiring),
            (wop::LAN, wf::RAW, &lan_open),
            (wop::CLIENT_DATA, wf::RAW, &reply),
        ]),
    );
    out.write(
        k,
        "transport_datagram",
        &records(&[(wop::WAN_DATAGRAM, 0, &r.data), (wop::WAN_DATAGRAM, 0, &r.keepalive)]),
    );

    // config_file: what `wgxdp serve --config` reads.
    let keys = key_dir();
    let (private, psk) = (keys.join("private.key"), keys.join("psk.key"));
    let peer = wgxdp_dataplane::noise::PrivateKey::generate().public_key().to_base64();
    let f = "config_file";
    out.write(
        f,
        "full.toml",
        format!(
            r#"[interface]
wan = "eth0"
lan = "eth1"
listen_port = 51820
private_key_file = "{private}"
queues = 2
cores = [0, 1]
tunnel_mtu = 1420
lan_next_hop = "10.0.1.254"
frames_per_socket = 4096
zero_copy = false
tracked_flows = 131072
host_interface = "wgxdp-host"

[[peer]]
public_key = "{peer}"
allowed_ips = ["10.0.2.0/24", "fd00:2::/64"]
endpoint = "192.0.2.2:51820"
preshared_key_file = "{psk}"
persistent_keepalive = 25
local_networks = ["10.0.1.0/24", "fd00:1::/64"]
firewall_default = "deny"

[[peer.firewall]]
name = "no ssh"
protocol = "tcp"
port = "22"
source = "10.0.2.0/24"
action = "deny"

[[peer.firewall]]
name = "web"
protocol = "tcp"
port = "80-443"
destination = "10.0.1.0/24"

[api]
listen = "127.0.0.1:8080"
database = "/var/lib/wgxdp/wgxdp.db"
site_cidr = "10.0.1.0/24"
public_address = "198.51.100.1"
mutations_per_minute = 100
reads_per_minute = 1200
"#,
            private = private.display(),
            psk = psk.display()
        )
        .as_bytes(),
    );
    out.write(
        f,
        "minimal.toml",
        format!("[interface]\nwan = \"eth0\"\nlan = \"eth1\"\nprivate_key_file = \"{}\"\n", private.display())
            .as_bytes(),
    );
    out.write(
        f,
        "loose_key.toml",
        format!(
            "[interface]\nwan = \"a\"\nlan = \"b\"\nprivate_key_file = \"{}\"\n[[peer]]\npublic_key = \"{peer}\"\nendpoint = \"[2001:db8::1]:51820\"\n",
            keys.join("loose.key").display()
        )
        .as_bytes(),
    );

    out.write(
        f,
        "fleet.toml",
        format!(
            "[interface]\nwan = \"eth0\"\nlan = \"eth1\"\nprivate_key_file = \"{}\"\n[api]\nlisten = \"10.0.0.11:8080\"\n\
             [node]\nid = \"gw-eu-1\"\nregion = \"eu-west\"\nfloating_address = \"203.0.113.10\"\n[store]\n\
             url = \"postgresql:///wgxdp?host=/run/postgresql&user=wgxdp\"\npassword_file = \"{}\"\n",
            private.display(),
            psk.display()
        )
        .as_bytes(),
    );

    // api_bodies: a selector byte, then the body (see `control::api_bodies`).
    let a = "api_bodies";
    let remote = wgxdp_dataplane::noise::PrivateKey::generate().public_key().to_base64();
    let psk_b64 = wgxdp_dataplane::noise::PresharedKey::generate().to_base64_secret().to_string();
    let create = format!(
        r#"{{"name":"site-b-vpn","region":"eu-west","tunnel_type":"wireguard","remote_network_cidr":"10.20.0.0/16","remote_peer_ip":"203.0.113.20","remote_public_key":"{remote}","remote_peer_port":51821,"pre_shared_key":"{psk_b64}","local_network_cidr":"10.50.0.0/24","persistent_keepalive":25}}"#
    );
    let update = format!(
        r#"{{"name":"renamed","remote_network_cidr":"10.21.0.0/16","remote_peer_ip":"2001:db8::20","remote_peer_port":51822,"pre_shared_key":"{psk_b64}","persistent_keepalive":0}}"#
    );
    // Additional networks and firewall rules: the seed-004 example as it is, a
    // rule of every protocol, ranges and both actions.
    let policy = r#""additional_remote_network_cidrs":["10.22.0.0/16","fd22::/64"],"additional_local_network_cidrs":["10.51.0.0/24","fd50::/64"],"firewall":[{"name":"Allow ICMP","protocol":"icmp","port":"1-65535","source":"0.0.0.0/0","destination":"0.0.0.0/0"},{"name":"ping gateway","protocol":"icmp","destination":"10.50.0.1/32","action":"allow"},{"name":"ssh","protocol":"tcp","port":"22","source":"10.20.0.0/16","destination":"10.50.0.0/24","action":"deny"},{"name":"web","protocol":"udp","port":"8000-8080","source":"fd22::/64","destination":"fd50::/64"},{"name":"rest","protocol":"any","action":"deny"}],"firewall_default":"deny""#;
    let create_policy = format!("{},{policy}}}", create.trim_end_matches('}'));
    let update_policy = r#"{"additional_remote_network_cidrs":["10.23.0.0/16"],"additional_local_network_cidrs":[],"firewall":[{"name":"only","protocol":"tcp","port":"443"}],"firewall_default":"allow"}"#;
    let sel = |kind: u8, method: u8, path: u8, query: bool| kind | method << 2 | path << 4 | u8::from(query) << 6;
    out.write(a, "create_body", &[&[sel(0, 0, 0, false)][..], create.as_bytes()].concat());
    out.write(a, "create_body_no_site", &[&[sel(0, 1, 0, false)][..], create.as_bytes()].concat());
    out.write(a, "update_body", &[&[sel(1, 0, 0, false)][..], update.as_bytes()].concat());
    out.write(a, "post_create", &[&[sel(2, 1, 0, false)][..], create.as_bytes()].concat());
    out.write(a, "patch_update", &[&[sel(2, 2, 1, false)][..], update.as_bytes()].concat());
    out.write(a, "list_query", &[&[sel(2, 0, 0, true)][..], b"limit=2&sort=name&order=desc&status=active\n"].concat());
    let hook = br#"{"url":"https://hooks.example/wgxdp?team=ops","events":["gateway.created","tunnel.down"],"description":"ops"}"#;
    let section = format!(
        "[Peer]\n# site B\nPublicKey = {remote}\nPresharedKey = {psk_b64}\nEndpoint = [2001:db8::20]:51821\nAllowedIPs = 10.20.0.0/16, fd20::/64\nAllowedIPs = 10.24.0.9\nPersistentKeepalive = 25\n"
    );
    let import = serde_json::json!({"name": "site-b-vpn", "region": "eu-west", "peer": section}).to_string();
    out.write(a, "import_body", &[&[sel(0, 0, 1, false)][..], import.as_bytes()].concat());
    let restore = serde_json::json!({
        "format": "wgxdp-backup", "version": 1, "secrets_included": true,
        "gateways": [{
            "id": "vpn_restored1", "name": "site-r", "region": "eu-west", "local_network_cidr": "10.50.0.0/24",
            "additional_local_network_cidrs": [], "remote_network_cidr": "10.30.0.0/16",
            "additional_remote_network_cidrs": ["fd30::/64"], "remote_peer_ip": "203.0.113.30", "remote_peer_port": 51820,
            "remote_public_key": wgxdp_dataplane::noise::PrivateKey::generate().public_key().to_base64(),
            "pre_shared_key": psk_b64, "persistent_keepalive": 25,
            "firewall": [{"name": "ssh", "protocol": "tcp", "port": "22", "action": "deny"}], "firewall_default": "allow"
        }],
        "webhooks": [{"id": "wh_restored1", "url": "http://192.0.2.1:9/r", "events": ["*"], "description": "",
            "secret": "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]
    })
    .to_string();
    out.write(a, "restore_body", &[&[32u8][..], restore.as_bytes()].concat());
    out.write(a, "webhook_body", &[&[sel(0, 2, 0, false)][..], &hook[..]].concat());
    out.write(a, "post_webhook", &[&[sel(3, 1, 0, false)][..], &hook[..]].concat());
    out.write(a, "webhook_deliveries", &[&[sel(3, 0, 2, true)][..], b"limit=5&before=9\n"].concat());
    out.write(a, "event_history", &[&[sel(3, 0, 3, true)][..], b"type=tunnel.up&gateway_id=vpn_x&limit=3\n"].concat());
    // Also decoded as the event stream's parameters.
    out.write(
        a,
        "event_stream_query",
        &[&[sel(3, 0, 3, true)][..], b"types=tunnel.up,handshake.failed&after=3\n"].concat(),
    );
    out.write(a, "get_status", &[sel(2, 0, 2, false)]);
    out.write(a, "get_config", &[sel(2, 0, 3, false)]);
    out.write(a, "bad_key", &[sel(2, 0, 1, false) | 128]);
    out.write(a, "create_body_policy", &[&[sel(0, 0, 0, false)][..], create_policy.as_bytes()].concat());
    out.write(a, "update_body_policy", &[&[sel(1, 0, 0, false)][..], update_policy.as_bytes()].concat());
    out.write(a, "post_create_policy", &[&[sel(2, 1, 0, false)][..], create_policy.as_bytes()].concat());
    out.write(a, "patch_update_policy", &[&[sel(2, 2, 1, false)][..], update_policy.as_bytes()].concat());

    // uapi_socket: byte streams as `wg` sends them (see `uapi::uapi_socket`).
    let u = "uapi_socket";
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let new_peer = hex(wgxdp_dataplane::noise::PrivateKey::generate().public_key().as_bytes());
    let config_peer = hex(&wgxdp_fuzz_harness::uapi::CONFIG_PEER);
    let private = hex(&wgxdp_fuzz_harness::uapi::PRIVATE_KEY);
    let psk = hex(&[7u8; 32]);
    let add = format!(
        "set=1\npublic_key={new_peer}\nendpoint=203.0.113.5:51820\nreplace_allowed_ips=true\n\
         allowed_ip=10.60.0.0/16\nallowed_ip=fd60::/64\npersistent_keepalive_interval=25\n\n"
    );
    out.write(u, "get", b"get=1\n\n");
    out.write(u, "add_peer_then_get", format!("{add}get=1\n\n").as_bytes());
    out.write(
        u,
        "add_rotate_remove",
        format!(
            "{add}set=1\npublic_key={new_peer}\npreshared_key={psk}\n\n\
             set=1\npublic_key={new_peer}\nupdate_only=true\nallowed_ip=10.61.0.0/16\n\n\
             set=1\npublic_key={new_peer}\nremove=true\n\nget=1\n\n"
        )
        .as_bytes(),
    );
    out.write(
        u,
        "setconf",
        format!(
            "set=1\nprivate_key={private}\nlisten_port=51820\nreplace_peers=true\n\
             public_key={config_peer}\nendpoint=192.0.2.11:51820\nreplace_allowed_ips=true\nallowed_ip=10.11.0.0/16\n\
             public_key={new_peer}\nendpoint=[2001:db8::5]:51820\nreplace_allowed_ips=true\nallowed_ip=10.62.0.0/16\n\n"
        )
        .as_bytes(),
    );
    out.write(u, "change_config_peer", format!("set=1\npublic_key={config_peer}\nremove=true\n\n").as_bytes());
    out.write(
        u,
        "overlap",
        format!("set=1\npublic_key={new_peer}\nendpoint=203.0.113.5:1\nallowed_ip=10.11.1.0/24\n\n").as_bytes(),
    );
    out.write(u, "listen_port", b"set=1\nlisten_port=1\n\n");
    out.write(u, "malformed", b"set=1\nno equals sign\n\nget=1\n\n");
    out.write(u, "unknown_op", b"frob=1\n\n");

    println!("wrote {} seed files under {}", out.written, root.display());
}
