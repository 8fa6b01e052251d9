//! The XDP programs on real interfaces: the kernel's verifier accepts them, they
//! attach in native mode to veth, steer exactly the traffic they should, hand
//! everything else (and steered traffic with no socket to take it) to the
//! kernel, count each decision, and leave nothing attached when dropped.

use std::net::UdpSocket;
use std::time::{Duration, Instant};
use wgxdp_common::stat;
use wgxdp_dataplane::loader::{AttachMode, Side, XdpPrograms};
use wgxdp_integration::{require_tools, veth_pair, xdp_object, Netns};

const PORT: u16 = 51820;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn programs_steer_count_and_detach() {
    require_tools(&["ip", "ping"]);
    let gw = Netns::new("xgw");
    let client = Netns::new("xcl");
    let lan = Netns::new("xln");
    let (gw_wan, _) = veth_pair(&gw, "10.210.0.1/24", &client, "10.210.0.2/24");
    let (gw_lan, _) = veth_pair(&gw, "10.211.0.1/24", &lan, "10.211.0.2/24");
    lan.ip(&["route", "add", "10.99.0.0/16", "via", "10.211.0.1"]);
    gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);

    // Load and attach from inside the gateway's namespace (interface names are
    // per namespace); the programs object can then be used from anywhere.
    let object = xdp_object();
    let (wan_if, lan_if) = (gw_wan.clone(), gw_lan.clone());
    let mut progs = gw.enter(move || {
        let mut p = XdpPrograms::load(&object, PORT).expect("verifier accepts both programs");
        assert_eq!(p.attach(Side::Wan, &wan_if).unwrap(), AttachMode::Native);
        assert_eq!(p.attach(Side::Lan, &lan_if).unwrap(), AttachMode::Native);
        assert!(p.attach(Side::Wan, "no-such-if0").is_err());
        p
    });
    assert_eq!(progs.listen_port().unwrap(), PORT);
    assert!(gw.ip(&["link", "show", "dev", &gw_wan]).contains("xdp"), "no XDP program on the WAN veth");
    assert!(gw.ip(&["link", "show", "dev", &gw_lan]).contains("xdp"), "no XDP program on the LAN veth");
    progs.set_tunnel_prefixes(&["10.99.0.0/16".parse().unwrap()]).unwrap();

    // Before the gateway's own WAN addresses are known, UDP to the port is
    // not ours (it could be for any host behind us): the kernel gets it.
    let probe: UdpSocket = client.udp_socket("10.210.0.2:0");
    probe.send_to(b"before addresses", format!("10.210.0.1:{PORT}")).unwrap();
    wait_for("not-our-address counter", || progs.stats().unwrap().get(stat::WAN_NOT_OUR_ADDRESS) >= 1);
    progs.set_wan_addresses(&["10.210.0.1".parse().unwrap(), "fd10::1".parse().unwrap()]).unwrap();

    // WireGuard port with no AF_XDP socket registered: steered, but handed to
    // the kernel, where an ordinary socket receives it.
    let kernel_sock = gw.udp_socket(&format!("10.210.0.1:{PORT}"));
    kernel_sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let sender: UdpSocket = client.udp_socket("10.210.0.2:0");
    sender.send_to(b"to the listen port", format!("10.210.0.1:{PORT}")).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = kernel_sock.recv_from(&mut buf).expect("the kernel still gets traffic when no socket is bound");
    assert_eq!(&buf[..n], b"to the listen port");
    // Another port: not ours at all.
    sender.send_to(b"other", "10.210.0.1:9").unwrap();
    wait_for("WAN counters", || {
        let s = progs.stats().unwrap();
        s.get(stat::WAN_NO_SOCKET) >= 1 && s.get(stat::WAN_PASSED) >= 1
    });
    assert_eq!(progs.stats().unwrap().get(stat::WAN_REDIRECTED), 0);

    // LAN: a packet for a tunnel prefix is steered (no socket yet: to the
    // kernel); a ping to the gateway itself is not ours.
    lan.exec("ping", &["-c", "1", "-W", "2", "10.211.0.1"]);
    let lan_sender = lan.udp_socket("10.211.0.2:0");
    lan_sender.send_to(b"into the tunnel", "10.99.1.1:7").unwrap();
    wait_for("LAN counters", || {
        let s = progs.stats().unwrap();
        s.get(stat::LAN_NO_SOCKET) >= 1 && s.get(stat::LAN_PASSED) >= 1
    });
    // Removing the prefix stops the steering.
    let before = progs.stats().unwrap().get(stat::LAN_NO_SOCKET);
    progs.set_tunnel_prefixes(&[]).unwrap();
    lan_sender.send_to(b"no longer a tunnel", "10.99.1.1:7").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(progs.stats().unwrap().get(stat::LAN_NO_SOCKET), before);
    // One prefix at a time, as a peer's change does: on (beside a prefix
    // that is not held going off, a no-op), then off again.
    let (tunnel, other) = ("10.99.0.0/16".parse().unwrap(), "10.98.0.0/16".parse().unwrap());
    progs.update_tunnel_prefixes(&[(tunnel, true), (other, false)]).unwrap();
    lan_sender.send_to(b"a tunnel again", "10.99.1.1:7").unwrap();
    wait_for("steered again", || progs.stats().unwrap().get(stat::LAN_NO_SOCKET) > before);
    let before = progs.stats().unwrap().get(stat::LAN_NO_SOCKET);
    progs.update_tunnel_prefixes(&[(tunnel, false)]).unwrap();
    lan_sender.send_to(b"not any more", "10.99.1.1:7").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(progs.stats().unwrap().get(stat::LAN_NO_SOCKET), before);

    // Dropping detaches both programs.
    drop(progs);
    assert!(!gw.ip(&["link", "show", "dev", &gw_wan]).contains("xdp"), "XDP left on the WAN veth");
    assert!(!gw.ip(&["link", "show", "dev", &gw_lan]).contains("xdp"), "XDP left on the LAN veth");
}

/// The benchmarks' measuring instrument: the sink counts (and drops) exactly
/// the UDP packets to its port and WireGuard transport data from its source
/// port, nothing else, and lets everything else through.
#[test]
fn benchmark_sink_counts_only_what_it_measures() {
    use wgxdp_integration::blast::Sink;
    require_tools(&["ip"]);
    let a = Netns::new("xsa");
    let b = Netns::new("xsb");
    let (_, b_if) = veth_pair(&a, "10.212.0.1/24", &b, "10.212.0.2/24");
    let sink = Sink::attach(&b, &b_if, xdp_object(), 9999, PORT);
    let receiver = b.udp_socket("10.212.0.2:7000");
    receiver.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let plain = a.udp_socket("10.212.0.1:0");
    let wg = a.udp_socket(&format!("10.212.0.1:{PORT}"));
    let mut transport = vec![0u8; 32 + 64];
    transport[0] = 4;
    for _ in 0..10 {
        plain.send_to(b"measured", "10.212.0.2:9999").unwrap();
        wg.send_to(&transport, "10.212.0.2:7000").unwrap();
        wg.send_to(&transport[..32], "10.212.0.2:7000").unwrap(); // a keepalive: not data
        plain.send_to(b"passes", "10.212.0.2:7000").unwrap();
    }
    wait_for("the sink to count 20 packets", || sink.packets() >= 20);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(sink.packets(), 20, "exactly the 10 measured datagrams and 10 transport messages");
    // What it does not measure reaches the socket: 10 keepalives and 10 others.
    let mut buf = [0u8; 256];
    let mut passed = 0;
    while receiver.recv(&mut buf).is_ok() {
        passed += 1;
    }
    assert_eq!(passed, 20);
}
