//! Hostile WAN traffic against `wgxdp serve` built with release code generation
//! and `panic = "abort"` (the `e2e` profile: a panic anywhere kills every
//! tunnel), while one wireguard-go tunnel is in use the whole time.
//!
//! From another address on the WAN side, with nothing but the gateway's public
//! key: 30 000 handshake initiations with a valid MAC1 from 64 source ports
//! (the gateway goes "under load"), interleaved with and then followed by
//! datagrams of every length 0..=200 whose first byte is 1, 2, 3 or 4; then
//! forged transport packets under the tunnel's real receiver index (sniffed
//! from the client's packets) with garbage bodies, replays of captured genuine
//! transport packets, and random garbage of every length.
//!
//! The process never exits, pings and a TCP transfer through the tunnel keep
//! working during and after, and the drops are counted by reason.

use std::collections::HashMap;
use std::net::{SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::PrivateKey;
use wgxdp_integration::hostile::{e2e_binary, forged_transport, typed_datagrams, InitiationForger, Rng, Sniffer};
use wgxdp_integration::site::{
    ping_from, tcp_transfer, write_private_key, ServeProcess, SiteTopology, TempDir, CLIENT_TUNNEL, CLIENT_WAN,
    GATEWAY_WAN, LAN_HOST, LISTEN_PORT,
};
use wgxdp_integration::{require_tools, v4, Netns};

/// The attacker's address, on the WAN subnet (beside the client, in its namespace).
const ATTACKER: &str = "10.100.0.66";
const FLOOD: usize = 30_000;
const SOURCE_PORTS: usize = 64;

/// Serve's log for a failure message: stderr and the last stats lines.
fn log(gateway: &ServeProcess) -> String {
    let out = gateway.output();
    let lines: Vec<&str> = out.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    format!("serve stderr:\n{}\nserve stdout (last lines):\n{tail}", gateway.errors())
}

/// The counters of the newest `stats queue0` line.
fn last_stats(gateway: &ServeProcess) -> HashMap<String, u64> {
    let out = gateway.output();
    let line = out.lines().rev().find_map(|l| l.strip_prefix("wgxdp: stats queue0 ")).unwrap_or_default();
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn assert_running(gateway: &mut ServeProcess, when: &str) {
    let state = gateway.child.try_wait().expect("query wgxdp serve");
    assert!(state.is_none(), "wgxdp serve exited ({}) {when}\n{}", state.unwrap(), log(gateway));
}

/// Sends every datagram once, round-robin over the sockets. A full device
/// queue loses some; only what the gateway counts matters.
fn send_all(sockets: &[UdpSocket], datagrams: &[Vec<u8>], to: SocketAddrV4) {
    for (i, d) in datagrams.iter().enumerate() {
        let _ = sockets[i % sockets.len()].send_to(d, to);
    }
}

#[test]
fn hostile_wan_traffic_cannot_stop_the_release_gateway() {
    require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool"]);
    let wgxdp = e2e_binary(Path::new(env!("CARGO_BIN_EXE_wgxdp")));
    let started = Instant::now();
    let topo = SiteTopology::new("h");
    let dir = TempDir::new("wgxdp-hostile");
    let gw_pub = write_private_key(&dir.join("gw.key")).public_key();
    let client_key = PrivateKey::generate();
    let config = dir.join("gw.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"10.200.0.2/32\", \"fd20::2/128\"]\n",
            topo.interface_section(&dir.join("gw.key")),
            client_key.public_key()
        ),
    )
    .unwrap();
    let mut gateway = ServeProcess::start(&topo.gateway, &wgxdp, &config, &dir.0);
    let _wg = topo.start_client(&client_key, &gw_pub, CLIENT_TUNNEL);
    let (client, lan) = (&topo.client, &topo.lan);
    assert!(client.ping(LAN_HOST, 4, 3), "no tunnel before the attack\n{}", log(&gateway));
    topo.client.ip(&["addr", "add", &format!("{ATTACKER}/24"), "dev", &topo.client_if]);
    let target = SocketAddrV4::new(v4(GATEWAY_WAN), LISTEN_PORT);
    let sockets: Vec<UdpSocket> = (0..SOURCE_PORTS).map(|_| client.udp_socket(&format!("{ATTACKER}:0"))).collect();
    let sniffer = Sniffer::open(client, &topo.client_if);

    // The tunnel in use the whole time: rounds of pings from the client's tunnel address.
    let stop = Arc::new(AtomicBool::new(false));
    let (rounds, answered) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let pinger = {
        let (ns, stop, rounds, answered) =
            (Netns::attach(&client.name), stop.clone(), rounds.clone(), answered.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                rounds.fetch_add(1, Ordering::Relaxed);
                if ping_from(&ns, CLIENT_TUNNEL, LAN_HOST, 5, 1) {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // 1. The valid-MAC1 flood from 64 ports, in chunks; after each chunk (while
    //    the gateway is under load) one round of typed datagrams 0..=200 bytes.
    let phase = Instant::now();
    let zero_typed = typed_datagrams(0..=200, None);
    let mut forger = InitiationForger::new(&gw_pub, 0x5eed);
    let mut flood = |n: usize| {
        for i in 0..n {
            let _ = sockets[i % SOURCE_PORTS].send_to(&forger.next_message(), target);
        }
    };
    for _ in 0..FLOOD / 1_000 {
        flood(1_000);
        send_all(&sockets, &zero_typed, target);
        std::thread::sleep(Duration::from_millis(20));
    }
    // 2. Right after the flood (still under load): typed datagrams of every
    //    length, zero-filled and random-filled, several times each.
    let mut rng = Rng::new(0xbad5eed);
    for _ in 0..3 {
        send_all(&sockets, &zero_typed, target);
        send_all(&sockets, &typed_datagrams(0..=200, Some(&mut rng)), target);
    }
    eprintln!("flood and typed datagrams sent in {:?}", phase.elapsed());
    assert_running(&mut gateway, "during the initiation flood and the short datagrams");

    // 3. A TCP transfer through the tunnel while forged transport packets under
    //    the tunnel's receiver index, replays of genuine ones, garbage of every
    //    length and more initiations (keeping the gateway under load) arrive,
    //    round after round until the transfer is done and the pinger has had
    //    a few rounds.
    let transfer = {
        let (lan, client) = (Netns::attach(&lan.name), Netns::attach(&client.name));
        std::thread::spawn(move || tcp_transfer(&lan, "10.50.0.2:7101", &client, true, 7, 20 * 1024 * 1024))
    };
    let captured = sniffer.transport_packets(v4(CLIENT_WAN), target, 64, Duration::from_secs(15));
    assert!(!captured.is_empty(), "captured no transport packet from the client\n{}", log(&gateway));
    let receiver = captured.last().unwrap().receiver;
    let counter = captured.iter().map(|c| c.counter).max().unwrap();
    eprintln!("captured {} transport packets; receiver index {receiver:#010x}", captured.len());
    let replays: Vec<Vec<u8>> = captured.iter().map(|c| c.payload.clone()).collect();
    let phase = Instant::now();
    let mut attack_rounds = 0;
    while attack_rounds < 100 && (!transfer.is_finished() || rounds.load(Ordering::Relaxed) < 8) {
        attack_rounds += 1;
        send_all(&sockets, &forged_transport(receiver, counter, 16..=1400, &mut rng), target);
        send_all(&sockets, &replays, target);
        let garbage: Vec<Vec<u8>> = (0..=1472).map(|len| rng.bytes(len)).collect();
        send_all(&sockets, &garbage, target);
        flood(1_000);
        send_all(&sockets, &typed_datagrams(0..=200, Some(&mut rng)), target);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{attack_rounds} rounds of forged, replayed and garbage packets in {:?}", phase.elapsed());
    assert_running(&mut gateway, "during forged, replayed and garbage packets");
    let transferred = transfer.join();
    stop.store(true, Ordering::Relaxed);
    pinger.join().unwrap();
    assert!(transferred.is_ok(), "the TCP transfer through the tunnel failed during the attack\n{}", log(&gateway));
    let (rounds, answered) = (rounds.load(Ordering::Relaxed), answered.load(Ordering::Relaxed));
    eprintln!("ping rounds during the attack: {answered} of {rounds} answered");
    assert!(
        rounds > 0 && answered * 10 >= rounds * 8,
        "only {answered} of {rounds} ping rounds through the tunnel were answered during the attack\n{}",
        log(&gateway)
    );

    // After: still running, the tunnel still delivers, every kind of drop counted.
    assert!(client.ping(LAN_HOST, 5, 4), "the tunnel does not deliver after the attack\n{}", log(&gateway));
    tcp_transfer(lan, "10.50.0.2:7102", client, false, 8, 5 * 1024 * 1024);
    assert_running(&mut gateway, "after the attack");
    gateway.refresh();
    gateway.refresh();
    let mut missing = Vec::new();
    for name in [
        "cookie_replies",
        "drop_malformed",
        "drop_invalid_mac1",
        "drop_authentication",
        "drop_replay",
        "drop_unknown_index",
    ] {
        let v = gateway.counter(name);
        eprintln!("{name} = {v}");
        if v == 0 {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "not counted: {missing:?}\n{}", log(&gateway));
    // Every WAN frame the worker took is accounted for: forwarded, handed on
    // (handshake queue, cookie reply) or dropped with a reason.
    let c = last_stats(&gateway);
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    let accounted = get("decrypted")
        + get("keepalives_received")
        + get("handshakes_queued")
        + get("cookie_replies")
        + c.iter().filter(|(k, _)| k.starts_with("drop_")).map(|(_, v)| v).sum::<u64>();
    assert!(
        get("wan_rx") <= accounted,
        "{} WAN frames received, only {accounted} forwarded, handed on or counted as dropped\n{}",
        get("wan_rx"),
        log(&gateway)
    );
    let status = gateway.terminate();
    assert!(status.success(), "wgxdp serve exited with {status} on SIGTERM\n{}", log(&gateway));
    eprintln!("hostile e2e took {:?}", started.elapsed());
}
