//! The real `wg` tool (wireguard-tools) driving a running gateway through its
//! socket, end to end: a peer added with `wg set` carries traffic and is a
//! VPN gateway in the API; `wg show` reports its handshake and growing
//! transfer counters; `wg showconf` reads back unchanged through `wg setconf`;
//! the pre-shared key rotates once a second on both sides for 30 s while a TCP
//! transfer runs (the Rosenpass pattern) and the transfer is byte-exact; all
//! of it survives a restart; `wg set … remove` stops the tunnel and the API
//! shows the gateway gone. Requests the gateway cannot apply fail and change
//! nothing.

use serde_json::Value;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey, PublicKey};
use wgxdp_integration::site::{
    create_api_key, ping_from, write_private_key, ApiClient, ApiSite, ServeProcess, API_LISTEN, CLIENT_TUNNEL,
    CLIENT_WAN, LAN_HOST,
};
use wgxdp_integration::{check_stream, TestStream, WireguardGo};

const API: &str = API_LISTEN;
const CLIENT_PORT: u16 = 40_001;

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

fn wg(args: &[&str]) -> Output {
    Command::new("wg").args(args).output().expect("run wg")
}

/// `wg ARGS`, which must succeed; its standard output.
fn wg_ok(args: &[&str]) -> String {
    let out = wg(args);
    assert!(out.status.success(), "wg {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The shared API site, with this file's helpers.
struct Site(ApiSite);

impl std::ops::Deref for Site {
    type Target = ApiSite;
    fn deref(&self) -> &ApiSite {
        &self.0
    }
}

impl Site {
    fn new(prefix: &str) -> Self {
        Self(ApiSite::new(prefix, ""))
    }

    fn serve(&self) -> ServeProcess {
        self.0.serve(wgxdp())
    }

    fn name(&self) -> &str {
        &self.topo.wg_name
    }

    /// The live gateways the API lists.
    fn api_gateways(&self, key: &str) -> Vec<Value> {
        let (code, body) =
            ApiClient::new(&self.topo.gateway, API, key).call("GET", "/api/v1/vpn-gateways", None).unwrap();
        assert_eq!(code, 200, "{body}");
        body["data"].as_array().cloned().unwrap_or_default()
    }

    fn write_psk(&self, psk: &PresharedKey, n: usize) -> PathBuf {
        let path = self.dir.join(&format!("psk{n}"));
        std::fs::write(&path, &*psk.to_base64_secret()).unwrap();
        path
    }
}

/// `wg show NAME dump`'s peer line for `key`: (latest handshake, rx, tx).
fn dump_peer(name: &str, key: &PublicKey) -> Option<(u64, u64, u64)> {
    let dump = wg_ok(&["show", name, "dump"]);
    let line = dump.lines().skip(1).find(|l| l.starts_with(&key.to_base64()))?;
    let f: Vec<&str> = line.split('\t').collect();
    Some((f[4].parse().ok()?, f[5].parse().ok()?, f[6].parse().ok()?))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Sends `TestStream(seed)` from the client's tunnel address to the LAN host
/// for `seconds`, paced (64 KiB every 20 ms), while `during` runs; returns the
/// bytes sent once the receiver has checked them all.
fn paced_transfer(site: &Site, seed: u64, seconds: u64, during: impl FnOnce(&Arc<AtomicBool>)) -> usize {
    let listen = format!("{LAN_HOST}:5201");
    let listener = site.topo.lan.tcp_listener(&listen);
    let mut conn = site.topo.client.tcp_connect(&listen, Duration::from_secs(10)).expect("connect through the tunnel");
    let (mut accepted, _) = listener.accept().expect("accept");
    accepted.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut stream = TestStream::new(seed);
            let mut buf = vec![0u8; 64 * 1024];
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut sent = 0usize;
            while Instant::now() < deadline && !done.load(Ordering::Relaxed) {
                stream.fill(&mut buf);
                conn.write_all(&buf).expect("send through the tunnel");
                sent += buf.len();
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(conn);
            sent
        })
    };
    let receiver = std::thread::spawn(move || {
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut accepted, &mut all).map(|_| all)
    });
    during(&done);
    let sent = sender.join().expect("sender");
    let got = receiver.join().expect("receiver").expect("receive through the tunnel");
    check_stream(&mut got.as_slice(), seed, sent).expect("the transfer is byte-exact");
    sent
}

#[test]
fn wg_tools_add_show_rotate_and_remove_peers() {
    let site = Site::new("u");
    let mut gateway = site.serve();
    let api_key = create_api_key(wgxdp(), &site.config);
    let name = site.name().to_owned();

    // The gateway is a WireGuard interface for `wg`: its key and port, no peers.
    let show = wg_ok(&["show", &name]);
    assert!(show.contains(&format!("public key: {}", site.gateway_key)), "{show}");
    assert!(show.contains("listening port: 51820"), "{show}");
    assert!(wg_ok(&["show", "interfaces"]).split_whitespace().any(|n| n == name));

    // A peer added with `wg set` carries traffic and is a gateway in the API.
    let client_key = PrivateKey::generate();
    let client: WireguardGo = site.topo.start_client(&client_key, &site.gateway_key, CLIENT_TUNNEL);
    let client_pub = client_key.public_key();
    let endpoint = format!("{CLIENT_WAN}:{CLIENT_PORT}");
    wg_ok(&["set", &name, "peer", &client_pub.to_base64(), "endpoint", &endpoint, "allowed-ips", "10.200.0.0/24"]);
    assert!(
        ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 5, 3),
        "no traffic through a peer added with wg set; gateway:\n{}\n{}",
        gateway.output(),
        gateway.errors()
    );
    let listed = site.api_gateways(&api_key);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let g = &listed[0];
    assert_eq!(g["remote_public_key"], client_pub.to_base64());
    assert_eq!(g["remote_network_cidr"], "10.200.0.0/24");
    assert_eq!(g["remote_peer_ip"], CLIENT_WAN);
    assert_eq!(g["remote_peer_port"], CLIENT_PORT);
    assert_eq!(g["region"], "wg");
    assert_eq!(g["name"], format!("wg-{}", &client_pub.to_base64()[..8]));

    // `wg show`: a recent handshake and transfer counters that grow.
    let show = wg_ok(&["show", &name]);
    assert!(show.contains(&format!("peer: {client_pub}")), "{show}");
    assert!(show.contains("latest handshake:") && show.contains("transfer:"), "{show}");
    let (handshake, rx1, tx1) = dump_peer(&name, &client_pub).expect("the peer in wg show dump");
    assert!(handshake + 30 >= unix_now(), "latest handshake {handshake} is not recent");
    assert!(ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 3, 2));
    let (_, rx2, tx2) = dump_peer(&name, &client_pub).unwrap();
    assert!(rx2 > rx1 && tx2 > tx1, "transfer did not grow: rx {rx1}->{rx2}, tx {tx1}->{tx2}");

    // `wg showconf` reads back unchanged through `wg setconf`.
    let conf = wg_ok(&["showconf", &name]);
    assert!(conf.contains(&format!("PublicKey = {client_pub}")) && conf.contains("ListenPort = 51820"), "{conf}");
    let conf_file = site.dir.join("showconf.conf");
    std::fs::write(&conf_file, &conf).unwrap();
    wg_ok(&["setconf", &name, conf_file.to_str().unwrap()]);
    assert_eq!(wg_ok(&["showconf", &name]), conf, "setconf of showconf changed the configuration");
    let after = site.api_gateways(&api_key);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["id"], g["id"], "setconf of an unchanged configuration replaced the gateway");

    // Rosenpass: both sides rotate the pre-shared key once a second for 30 s
    // while a TCP transfer runs.
    let mut last_psk = PresharedKey::default();
    let mut last_rotation = 0;
    let sent = paced_transfer(&site, 7, 30, |_| {
        for n in 0..30 {
            let psk = PresharedKey::generate();
            let file = site.write_psk(&psk, n);
            let file = file.to_str().unwrap();
            wg_ok(&["set", &name, "peer", &client_pub.to_base64(), "preshared-key", file]);
            client.set(&["peer", &site.gateway_key.to_base64(), "preshared-key", file]);
            last_psk = psk;
            last_rotation = unix_now();
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    assert!(sent > 10 << 20, "only {sent} bytes went through in 30 s");
    let psks = wg_ok(&["show", &name, "preshared-keys"]);
    assert!(psks.contains(&*last_psk.to_base64_secret()), "the last pre-shared key is not in use: {psks}");
    // A handshake under the last key (the gateway starts one when its key changes).
    let deadline = Instant::now() + Duration::from_secs(15);
    while dump_peer(&name, &client_pub).unwrap().0 < last_rotation {
        assert!(Instant::now() < deadline, "no handshake under the last pre-shared key");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Everything survives a restart: the peer, its last key, its traffic.
    gateway.terminate();
    assert!(!Path::new(&format!("/var/run/wireguard/{name}.sock")).exists(), "the socket outlived the gateway");
    let mut gateway = site.serve();
    assert!(wg_ok(&["show", &name, "preshared-keys"]).contains(&*last_psk.to_base64_secret()));
    assert!(
        ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 10, 3),
        "no traffic after a restart; gateway:\n{}\n{}",
        gateway.output(),
        gateway.errors()
    );

    // `wg set … remove` stops the tunnel; the API shows the gateway gone.
    wg_ok(&["set", &name, "peer", &client_pub.to_base64(), "remove"]);
    assert!(!wg_ok(&["show", &name, "peers"]).contains(&client_pub.to_base64()));
    assert!(site.api_gateways(&api_key).is_empty(), "the API still lists a gateway wg removed");
    assert!(!ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 3, 1), "traffic after wg removed the peer");
    gateway.terminate();
    let mut gateway = site.serve();
    assert!(site.api_gateways(&api_key).is_empty(), "a removed peer came back after a restart");
    assert!(wg_ok(&["show", &name, "peers"]).trim().is_empty());
    // A clean stop leaves no socket file behind (a kill on drop would).
    gateway.terminate();
    assert!(!Path::new(&format!("/var/run/wireguard/{name}.sock")).exists());
}

#[test]
fn wg_requests_the_gateway_cannot_apply_fail_and_change_nothing() {
    let site = Site::new("v");
    let mut gateway = site.serve();
    let api_key = create_api_key(wgxdp(), &site.config);
    let name = site.name().to_owned();
    let peer = PrivateKey::generate().public_key().to_base64();
    let other = PrivateKey::generate().public_key().to_base64();
    let third = PrivateKey::generate().public_key().to_base64();
    wg_ok(&["set", &name, "peer", &peer, "endpoint", "10.100.0.9:51820", "allowed-ips", "10.201.0.0/24"]);
    let before = wg_ok(&["showconf", &name]);

    let key_file = site.dir.join("other.key");
    write_private_key(&key_file);
    let refused: Vec<Vec<&str>> = vec![
        vec!["set", &name, "listen-port", "51999"],
        vec!["set", &name, "private-key", key_file.to_str().unwrap()],
        vec!["set", &name, "fwmark", "7"],
        // An overlapping network: refused whole, even with a valid peer first.
        vec!["set", &name, "peer", &other, "endpoint", "10.100.0.8:1", "allowed-ips", "10.201.0.128/25"],
        // A new peer needs an endpoint (a gateway's remote_peer_ip).
        vec!["set", &name, "peer", &other, "allowed-ips", "10.202.0.0/24"],
        // One refused peer refuses the whole request: the valid one is not added.
        vec![
            "set",
            &name,
            "peer",
            &other,
            "endpoint",
            "10.100.0.8:1",
            "allowed-ips",
            "10.203.0.0/24",
            "peer",
            &third,
            "allowed-ips",
            "10.204.0.0/24",
        ],
        // The site's own network cannot be a remote network.
        vec!["set", &name, "peer", &other, "endpoint", "10.100.0.8:1", "allowed-ips", "10.50.0.0/24"],
    ];
    for args in &refused {
        let out = wg(args);
        assert!(!out.status.success(), "wg {args:?} succeeded");
        assert_eq!(wg_ok(&["showconf", &name]), before, "wg {args:?} changed the configuration");
    }
    assert_eq!(site.api_gateways(&api_key).len(), 1);
    // The same port and key the gateway runs with are no change: accepted.
    wg_ok(&["set", &name, "listen-port", "51820"]);
    assert_eq!(wg_ok(&["showconf", &name]), before);
    gateway.terminate();
}
