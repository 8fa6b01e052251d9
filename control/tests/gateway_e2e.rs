//! End to end through `wgxdp serve`: three network namespaces, a wireguard-go
//! client, the gateway with XDP on both veths, and a host on the site LAN.
//!
//! One scenario, in order: IPv4 and IPv6 pings through the tunnel; 50 MB over
//! TCP each way, checked byte for byte; the gateway's counters prove the
//! packets went through AF_XDP; a TCP connection to the gateway's own WAN
//! address (not tunnel traffic) still works; the client roams to a new source
//! port; wireguard-go restarts (new handshake); a flood of 50 000 initiations
//! with valid MAC1 gets cookie replies while the tunnel keeps working; SIGTERM
//! stops the gateway, no XDP program remains, and the kernel forwards again.

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;
use wgxdp_dataplane::noise::PrivateKey;
use wgxdp_integration::hostile::InitiationForger;
use wgxdp_integration::site::{
    tcp_transfer, write_private_key, ServeProcess, SiteTopology, TempDir, CLIENT_TUNNEL, LISTEN_PORT,
};
use wgxdp_integration::{require_tools, Netns, WireguardGo};

const TRANSFER: usize = 50 * 1024 * 1024;
const PORT: u16 = LISTEN_PORT;

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

/// 50 MB between a listener in `listener_ns` and a connection from
/// `connector_ns` (towards the listener when `upload`), checked byte for byte.
fn transfer(listener_ns: &Netns, listen: &str, connector_ns: &Netns, upload: bool, seed: u64) {
    tcp_transfer(listener_ns, listen, connector_ns, upload, seed, TRANSFER);
}

#[test]
fn site_to_site_through_af_xdp() {
    require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool"]);
    let topo = SiteTopology::new("e");
    let (client, gw_ns, lan) = (&topo.client, &topo.gateway, &topo.lan);
    let (gw_wan, gw_lan) = (&topo.gateway_wan, &topo.gateway_lan);
    let dir = TempDir::new("wgxdp-e2e");
    let gw_key = write_private_key(&dir.join("gw.key"));
    let gw_pub = gw_key.public_key();
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
    let gateway = ServeProcess::start(gw_ns, wgxdp(), &config, &dir.0);
    assert!(gw_ns.ip(&["link", "show", "dev", gw_wan]).contains("xdp"));
    let wg = topo.start_client(&client_key, &gw_pub, CLIENT_TUNNEL);

    // Pings over IPv4 and IPv6 inside the tunnel (the first may wait for the handshake).
    assert!(client.ping("10.50.0.2", 4, 3), "IPv4 ping through the tunnel failed; gateway:\n{}", gateway.output());
    assert!(client.ping("fd50::2", 4, 3), "IPv6 ping through the tunnel failed; gateway:\n{}", gateway.output());

    // Oversize packets from the site get ICMP "fragmentation needed" / "packet
    // too big" with the tunnel MTU, not silence.
    let too_big =
        |args: &[&str]| String::from_utf8_lossy(&lan.command("ping").args(args).output().unwrap().stdout).into_owned();
    let v4 = too_big(&["-c", "1", "-M", "do", "-s", "1450", "-W", "2", "10.200.0.2"]);
    assert!(v4.contains("mtu = 1420"), "no fragmentation-needed from the gateway: {v4}");
    let v6 = too_big(&["-6", "-c", "1", "-s", "1450", "-W", "2", "fd20::2"]);
    assert!(v6.contains("mtu=1420"), "no packet-too-big from the gateway: {v6}");

    // 50 MB each way, byte for byte.
    transfer(lan, "10.50.0.2:7001", client, true, 11);
    transfer(lan, "10.50.0.2:7002", client, false, 22);
    gateway.refresh();
    let (decrypted, encrypted) = (gateway.counter("decrypted"), gateway.counter("encrypted"));
    assert!(decrypted >= 35_000, "only {decrypted} packets decrypted through AF_XDP");
    assert!(encrypted >= 35_000, "only {encrypted} packets encrypted through AF_XDP");
    assert!(gateway.counter("wan_redirected") >= decrypted && gateway.counter("lan_redirected") >= encrypted);
    assert!(gateway.counter("icmp_too_big") >= 2, "ICMP errors not counted:\n{}", gateway.output());
    // Next hops come from the kernel's neighbour table (rtnetlink): after the
    // first packets, nothing needs the kernel's slow path.
    let slow = gateway.counter("via_kernel");
    assert!(slow < 50, "{slow} packets went through the kernel: the neighbour table is not being read");

    // Outer packets the client's kernel fragments (its WAN MTU below the
    // tunnel's) pass XDP as fragments; the kernel reassembles them and the
    // slow path decrypts and forwards them to the site.
    client.ip(&["link", "set", "dev", &topo.client_if, "mtu", "1280"]);
    let _ = client.command("ping").args(["-c", "3", "-s", "1300", "-W", "1", "10.50.0.2"]).output();
    client.ip(&["link", "set", "dev", &topo.client_if, "mtu", "1500"]);
    gateway.refresh();
    let kernel_line =
        gateway.output().lines().rev().find(|l| l.contains("stats kernel-slow-path")).unwrap_or_default().to_owned();
    let kernel_decrypted: u64 = kernel_line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("decrypted="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(kernel_decrypted >= 3, "fragmented tunnel packets were not served by the slow path: {kernel_line}");

    // Traffic for the gateway host itself still reaches the kernel.
    let listener = gw_ns.tcp_listener("10.100.0.1:8080");
    let accept = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        line
    });
    let mut c = client.tcp_connect("10.100.0.1:8080", Duration::from_secs(5)).expect("TCP to the gateway host");
    c.write_all(b"not tunnel traffic\n").unwrap();
    assert_eq!(accept.join().unwrap(), "not tunnel traffic\n");

    // Roaming: the client's source port changes; replies follow it.
    wg.set(&["listen-port", "40777"]);
    assert!(client.ping("10.50.0.2", 4, 3), "after the client changed its port, the tunnel stopped");

    // wireguard-go restarts with the same key: a new handshake, traffic resumes.
    drop(wg);
    let hs_before = gateway.counter("handshakes_queued");
    let wg = topo.start_client(&client_key, &gw_pub, CLIENT_TUNNEL);
    assert!(client.ping("10.50.0.2", 6, 3), "after wireguard-go restarted, the tunnel did not come back");
    gateway.refresh();
    assert!(gateway.counter("handshakes_queued") > hs_before);

    // A flood of initiations with valid MAC1 from many source ports: cookie
    // replies go out, and the established tunnel keeps passing traffic.
    let flood = {
        let sockets: Vec<UdpSocket> = (0..64).map(|_| client.udp_socket("10.100.0.2:0")).collect();
        let mut forger = InitiationForger::new(&gw_pub, 0x1234_5678);
        std::thread::spawn(move || {
            for i in 0..50_000usize {
                let msg = forger.next_message();
                let _ = sockets[i % sockets.len()].send_to(&msg, format!("10.100.0.1:{PORT}"));
            }
        })
    };
    let survived = client.ping("10.50.0.2", 10, 5);
    flood.join().unwrap();
    gateway.refresh();
    assert!(gateway.counter("cookie_replies") > 0, "no cookie replies under a flood; gateway:\n{}", gateway.output());
    assert!(survived, "the tunnel stopped passing traffic during the handshake flood");
    assert!(client.ping("10.50.0.2", 3, 2), "the tunnel did not recover after the flood");

    // SIGTERM: clean exit, no XDP left, and the kernel forwards plain traffic.
    drop(wg);
    let mut gateway = gateway;
    let status = gateway.terminate();
    assert!(status.success(), "wgxdp serve exited with {status}");
    assert!(gateway.output().contains("wgxdp: stopped"));
    for iface in [gw_wan, gw_lan] {
        assert!(!gw_ns.ip(&["link", "show", "dev", iface]).contains("xdp"), "XDP left on {iface}");
    }
    client.ip(&["route", "replace", "10.50.0.0/24", "via", "10.100.0.1"]);
    assert!(client.ping("10.50.0.2", 3, 2), "the kernel does not forward after the gateway stopped");
}

/// `wgxdp serve` refuses bad set-ups with a message naming the problem.
/// A site topology with `wgxdp serve` (its `[interface]` plus the lines
/// `extra`, one peer: the client's tunnel address) and the wireguard-go client
/// connected to it. Dropped in reverse: client, gateway, files, namespaces.
fn serve_with_client(prefix: &str, extra: &str) -> (SiteTopology, TempDir, ServeProcess, WireguardGo) {
    require_tools(&["ip", "wireguard-go", "wg", "ping"]);
    let topo = SiteTopology::new(prefix);
    let dir = TempDir::new(&format!("wgxdp-{prefix}"));
    let gw_pub = write_private_key(&dir.join("gw.key")).public_key();
    let client_key = PrivateKey::generate();
    let config = dir.join("gw.toml");
    let interface = topo.interface_section(&dir.join("gw.key"));
    let peer = format!("[[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"10.200.0.2/32\"]\n", client_key.public_key());
    std::fs::write(&config, format!("{interface}{extra}\n{peer}")).unwrap();
    let gateway = ServeProcess::start(&topo.gateway, wgxdp(), &config, &dir.0);
    let wg = topo.start_client(&client_key, &gw_pub, CLIENT_TUNNEL);
    (topo, dir, gateway, wg)
}

/// With busy polling on (the sockets' `SO_PREFER_BUSY_POLL`; the workers
/// kick the kernel from their own syscalls), the tunnel still carries TCP both
/// ways byte for byte, every packet through the workers' shared-UMEM path.
#[test]
fn busy_polling_carries_the_tunnel() {
    let (topo, _dir, gateway, _wg) = serve_with_client("bp", "busy_poll = true\n");
    assert!(topo.client.ping("10.50.0.2", 4, 3), "no ping with busy polling; gateway:\n{}", gateway.output());
    transfer(&topo.lan, "10.50.0.2:7011", &topo.client, true, 31);
    transfer(&topo.lan, "10.50.0.2:7012", &topo.client, false, 32);
    gateway.refresh();
    assert!(gateway.counter("decrypted") >= 35_000 && gateway.counter("encrypted") >= 35_000, "{}", gateway.output());
    assert_eq!(gateway.counter("drop_no_frame"), 0, "the shared frame pool ran dry:\n{}", gateway.output());
}

/// A counter of the kernel's TCP statistics in `ns` (`/proc/net/netstat`
/// or `/proc/net/snmp`: a line of names under `group`, then one of values).
fn tcp_stat(ns: &Netns, file: &str, group: &str, name: &str) -> u64 {
    let text = ns.exec("cat", &[file]);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(group)).collect();
    let (names, values) = (lines[0].split_whitespace(), lines[1].split_whitespace());
    names.zip(values).find(|(n, _)| *n == name).and_then(|(_, v)| v.parse().ok()).unwrap_or_else(|| panic!("{name}"))
}

/// A single TCP flow of 20 MB from `sender` to a listener in `receiver` on
/// `listen`, paced at 200 Mbit/s (so veth queues overflow nowhere and a lost
/// segment cannot pass for a reordered one), checked byte for byte; the
/// receiver's TCP queued nothing out of order, or the sender retransmitted.
fn transfer_in_order(receiver: &Netns, listen: &str, sender: &Netns, seed: u64) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    const LEN: usize = 20 * 1024 * 1024;
    let ofo = || tcp_stat(receiver, "/proc/net/netstat", "TcpExt:", "TCPOFOQueue");
    let retrans = || tcp_stat(sender, "/proc/net/snmp", "Tcp:", "RetransSegs");
    let (ofo_before, retrans_before) = (ofo(), retrans());
    let listener = receiver.tcp_listener(listen);
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        wgxdp_integration::check_stream(&mut s, seed, LEN)
    });
    let mut c = sender.tcp_connect(listen, Duration::from_secs(10)).expect("connect through the tunnel");
    let rate: u64 = 25_000_000; // bytes per second
                                // SAFETY: `rate` outlives the call, whose length argument is its size.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&rate as *const u64).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_MAX_PACING_RATE: {}", std::io::Error::last_os_error());
    wgxdp_integration::send_stream(&mut c, seed, LEN).expect("send");
    drop(c);
    server.join().expect("receiver thread").expect("byte for byte");
    let (ofo, retrans) = (ofo() - ofo_before, retrans() - retrans_before);
    eprintln!("TCP to {listen}: {ofo} segments queued out of order, {retrans} retransmitted");
    assert!(ofo == 0 || retrans > 0, "the receiver queued {ofo} segments out of order with no loss");
    (ofo, retrans)
}

/// 20 000 numbered datagrams of one UDP flow from `from` (in `sender`) to
/// `to` (in `receiver`): whatever arrives arrives in sending order.
fn udp_in_order(sender: &Netns, from: &str, receiver: &Netns, to: &str) -> usize {
    const COUNT: u32 = 20_000;
    let rx = receiver.udp_socket(to);
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = sender.udp_socket(from);
    let to: std::net::SocketAddr = to.parse().unwrap();
    let sending = std::thread::spawn(move || {
        let mut datagram = [0x5au8; 1200];
        for seq in 0..COUNT {
            datagram[..4].copy_from_slice(&seq.to_be_bytes());
            let _ = tx.send_to(&datagram, to);
            if seq % 64 == 63 {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
    });
    let (mut received, mut last) = (0usize, None::<u32>);
    let mut buf = [0u8; 2048];
    while let Ok(n) = rx.recv(&mut buf) {
        assert_eq!(n, 1200);
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        assert!(last.is_none_or(|l| seq > l), "datagram {seq} arrived after {last:?}");
        last = Some(seq);
        received += 1;
        if seq == COUNT - 1 {
            break;
        }
    }
    sending.join().unwrap();
    received
}

/// One tunnel on two crypto threads (`crypto_threads = 2`: the worker and a
/// helper that both run AEAD): a single TCP flow each way arrives byte for
/// byte with nothing out of order at the receiver, a numbered UDP stream each
/// way arrives in sending order, and the helper did take AEAD work.
#[test]
fn one_tunnel_on_two_crypto_threads_arrives_in_order() {
    let (topo, _dir, gateway, _wg) = serve_with_client("ct", "crypto_threads = 2\n");
    let plain: String =
        gateway.errors().split('\x1b').map(|part| part.split_once('m').map_or(part, |(_, rest)| rest)).collect();
    assert!(plain.contains("crypto_threads=2"), "{plain}");
    let (client, lan) = (&topo.client, &topo.lan);
    assert!(client.ping("10.50.0.2", 4, 3), "no ping; gateway:\n{}", gateway.output());
    // Client → site (the gateway decrypts in parallel), then site → client
    // (it seals), each paced so that nothing is lost: then nothing may arrive
    // out of order either.
    let up = transfer_in_order(lan, "10.50.0.2:7021", client, 41);
    let down = transfer_in_order(client, "10.200.0.2:7022", lan, 42);
    assert!(up.1 == 0 || down.1 == 0, "paced flows still lost segments ({up:?}, {down:?}): the check saw nothing");
    let up = udp_in_order(client, "10.200.0.2:7031", lan, "10.50.0.2:7032");
    let down = udp_in_order(lan, "10.50.0.2:7033", client, "10.200.0.2:7034");
    eprintln!("UDP in order: {up} up, {down} down of 20 000");
    assert!(up > 10_000 && down > 10_000, "most datagrams arrive ({up}, {down} of 20 000)");
    gateway.refresh();
    let (offloaded, decrypted) = (gateway.counter("crypto_offloaded"), gateway.counter("decrypted"));
    eprintln!("AEAD jobs a helper ran: {offloaded} (decrypted {decrypted})");
    assert!(offloaded > 0, "the helper ran no AEAD:\n{}", gateway.output());
    assert_eq!(gateway.counter("drop_authentication"), 0, "{}", gateway.output());
}

#[test]
fn serve_reports_operator_errors() {
    require_tools(&["ip"]);
    let ns = Netns::new("er");
    ns.ip(&["link", "add", "wan0", "type", "veth", "peer", "name", "lan0"]);
    let dir = std::env::temp_dir().join(format!("wgxdp-err-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("k");
    std::fs::write(&key, &*PrivateKey::generate().to_base64_secret()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let serve_with = |wan: &str, lan: &str, port: u16, extra: &str| {
        let cfg = dir.join(format!("{wan}-{lan}-{port}-{}.toml", extra.len()));
        std::fs::write(
            &cfg,
            format!(
                "[interface]\nwan = \"{wan}\"\nlan = \"{lan}\"\nlisten_port = {port}\nprivate_key_file = \"{}\"\n\
                 name = \"wgterr{}\"\n{extra}",
                key.display(),
                std::process::id() % 100_000
            ),
        )
        .unwrap();
        let out = ns
            .command(env!("CARGO_BIN_EXE_wgxdp"))
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let serve = |wan: &str, lan: &str, port: u16| serve_with(wan, lan, port, "");
    let (ok, err) = serve("wan0", "nope0", 51820);
    assert!(!ok && err.contains("interface `nope0` does not exist"), "{err}");
    let _busy = ns.udp_socket("0.0.0.0:51999");
    let (ok, err) = serve("wan0", "lan0", 51999);
    assert!(!ok && err.contains("UDP port 51999 is already in use"), "{err}");
    let _api_busy = ns.tcp_listener("127.0.0.1:18080");
    let db = dir.join("api.db");
    let api = format!("[api]\nlisten = \"127.0.0.1:18080\"\ndatabase = \"{}\"\n", db.display());
    let (ok, err) = serve_with("wan0", "lan0", 51820, &api);
    assert!(!ok && err.contains("cannot listen on 127.0.0.1:18080"), "{err}");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (ok, err) = serve("wan0", "lan0", 51820);
    assert!(!ok && err.contains("chmod 600"), "{err}");
    assert!(!ns.ip(&["link", "show"]).contains("xdp"), "a failed start left XDP attached");
    let _ = std::fs::remove_dir_all(&dir);
}
