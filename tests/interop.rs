//! Interoperability with a real WireGuard implementation: wireguard-go in one
//! network namespace, the wgxdp protocol core (`Device`) behind a plain UDP
//! socket in another. Both handshake directions, data both ways (ICMP echo over
//! IPv4 and IPv6 inside the tunnel), keepalives, and rejection of replayed and
//! tampered transport packets.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::device::{Action, Device, PeerId};
use wgxdp_dataplane::drops::DropReason;
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey};
use wgxdp_integration::icmp::{echo_v4, echo_v6, parse_echo, reply_to, Echo};
use wgxdp_integration::{require_tools, v4, veth_pair, Netns, WireguardGo};

const WG_PORT: u16 = 51821;
const OUR_PORT: u16 = 51820;

/// Our side: the protocol core driven over a UDP socket.
struct Gateway {
    dev: Device,
    sock: UdpSocket,
    out: Vec<u8>,
}

#[derive(Debug)]
enum Event {
    Delivered { packet: Vec<u8>, raw: Vec<u8> },
    Accepted { raw: Vec<u8> },
    Dropped { reason: DropReason },
}

impl Gateway {
    fn new(sock: UdpSocket, key: PrivateKey) -> Self {
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Self { dev: Device::new(key, AeadBackend::Ring, 10, Instant::now()), sock, out: vec![0u8; 65536] }
    }

    fn flush(&mut self) {
        while let Some(t) = self.dev.poll_transmit(Instant::now(), SystemTime::now(), &mut self.out) {
            self.sock.send_to(&self.out[..t.len], t.to).unwrap();
        }
    }

    /// Encrypts an inner packet (or starts a handshake for it) and sends it.
    fn send_inner(&mut self, packet: &[u8]) {
        match self.dev.send(packet, Instant::now(), SystemTime::now(), &mut self.out) {
            Ok(Action::Send { to, bytes }) => {
                self.sock.send_to(bytes, to).unwrap();
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("send failed: {e}"),
        }
        self.flush();
    }

    /// Feeds one datagram to the device and sends whatever it answers.
    fn process(&mut self, src: SocketAddr, raw: Vec<u8>) -> Event {
        let mut buf = raw.clone();
        let result = self.dev.receive(src, &mut buf, false, Instant::now(), SystemTime::now(), &mut self.out);
        let event = match result {
            Ok(Action::Send { to, bytes }) => {
                self.sock.send_to(bytes, to).unwrap();
                Event::Accepted { raw }
            }
            Ok(Action::Deliver { packet, .. }) => Event::Delivered { packet: packet.to_vec(), raw },
            Ok(Action::Nothing) => Event::Accepted { raw },
            Err(reason) => Event::Dropped { reason },
        };
        self.flush();
        event
    }

    /// Receives and processes datagrams until `want` accepts an event or the
    /// deadline passes; timers run in between.
    fn until<T>(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&mut Self, Event) -> Option<T>,
    ) -> Option<(T, SocketAddr)> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            self.dev.tick(Instant::now());
            self.flush();
            match self.sock.recv_from(&mut buf) {
                Ok((n, src)) => {
                    let event = self.process(src, buf[..n].to_vec());
                    if let Some(t) = want(self, event) {
                        return Some((t, src));
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        None
    }
}

struct Topology {
    wg_ns: Netns,
    _our_ns: Netns,
    wg: WireguardGo,
    gw: Gateway,
    peer: PeerId,
}

/// wireguard-go at 10.200.0.1 (tunnel 10.201.0.1, fd01::1), us at 10.200.0.2
/// (tunnel 10.201.0.2, fd01::2). `wg_knows_our_endpoint` decides who can initiate.
fn topology(wg_knows_our_endpoint: bool, persistent_keepalive: Option<u16>) -> Topology {
    require_tools(&["ip", "wireguard-go", "wg", "ping"]);
    let wg_ns = Netns::new("wgg");
    let our_ns = Netns::new("wgo");
    veth_pair(&wg_ns, "10.200.0.1/24", &our_ns, "10.200.0.2/24");

    let wg_key = PrivateKey::generate();
    let our_key = PrivateKey::generate();
    let psk = PresharedKey::generate();
    let psk_file = std::env::temp_dir().join(format!("{}.psk", wg_ns.name));
    std::fs::write(&psk_file, &*psk.to_base64_secret()).unwrap();

    // Our socket exists before wireguard-go learns our endpoint, so its first
    // initiation is not lost.
    let sock = our_ns.udp_socket(&format!("10.200.0.2:{OUR_PORT}"));
    let wg = WireguardGo::start(&wg_ns, &wg_key.to_base64_secret(), WG_PORT);
    let our_pub = our_key.public_key().to_base64();
    let mut args =
        vec!["peer", &our_pub, "preshared-key", psk_file.to_str().unwrap(), "allowed-ips", "10.201.0.2/32,fd01::2/128"];
    let endpoint = format!("10.200.0.2:{OUR_PORT}");
    if wg_knows_our_endpoint {
        args.extend_from_slice(&["endpoint", &endpoint]);
    }
    let ka = persistent_keepalive.map(|k| k.to_string());
    if let Some(k) = &ka {
        args.extend_from_slice(&["persistent-keepalive", k]);
    }
    wg.set(&args);
    std::fs::remove_file(&psk_file).unwrap();
    wg_ns.ip(&["addr", "add", "10.201.0.1/24", "dev", &wg.interface]);
    wg_ns.ip(&["-6", "addr", "add", "fd01::1/64", "dev", &wg.interface, "nodad"]);
    wg_ns.ip(&["link", "set", &wg.interface, "up"]);

    let mut gw = Gateway::new(sock, our_key);
    let peer = gw
        .dev
        .add_peer(
            PeerConfig { public_key: wg_key.public_key(), preshared_key: psk, persistent_keepalive: None },
            Some(format!("10.200.0.1:{WG_PORT}").parse().unwrap()).filter(|_| !wg_knows_our_endpoint),
            &["10.201.0.1/32".parse().unwrap(), "fd01::1/128".parse().unwrap()],
        )
        .unwrap();
    Topology { wg_ns, _our_ns: our_ns, wg, gw, peer }
}

fn delivered_echo(event: Event) -> Option<(Echo, Vec<u8>)> {
    match event {
        Event::Delivered { packet, raw } => parse_echo(&packet).map(|e| (e, raw)),
        Event::Dropped { reason } => panic!("unexpected drop: {reason}"),
        Event::Accepted { .. } => None,
    }
}

#[test]
fn we_initiate_and_wireguard_go_responds() {
    let mut t = topology(false, None);
    let (ours, theirs) = (v4("10.201.0.2"), v4("10.201.0.1"));

    // The first packet triggers our initiation; it is staged and sent once
    // wireguard-go's response arrives. wireguard-go answers the ping.
    t.gw.send_inner(&echo_v4(ours, theirs, 0x4242, 1, b"hello over ipv4", false));
    let (reply, _) =
        t.gw.until(Duration::from_secs(10), |_, e| delivered_echo(e).map(|(e, _)| e))
            .unwrap_or_else(|| panic!("no echo reply from wireguard-go; its log:\n{}", t.wg.log()));
    assert!(!reply.request);
    assert_eq!((reply.id, reply.seq, reply.data.as_slice()), (0x4242, 1, &b"hello over ipv4"[..]));
    assert_eq!(reply.src, std::net::IpAddr::V4(theirs));
    assert_eq!(t.gw.dev.peer_stats(t.peer).unwrap().handshakes, 1);
    let hs = t.wg.show("latest-handshakes");
    assert!(hs.split_whitespace().nth(1).is_some_and(|v| v != "0"), "wireguard-go saw no handshake: {hs}");

    // IPv6 inside the tunnel.
    let (o6, t6) = ("fd01::2".parse().unwrap(), "fd01::1".parse().unwrap());
    t.gw.send_inner(&echo_v6(o6, t6, 0x77, 2, b"hello over ipv6", false));
    let (reply6, _) =
        t.gw.until(Duration::from_secs(5), |_, e| delivered_echo(e).map(|(e, _)| e)).expect("ICMPv6 echo reply");
    assert_eq!((reply6.id, reply6.seq, reply6.request), (0x77, 2, false));

    // Our keepalive is accepted: wireguard-go's receive counter grows by one
    // 32-byte message and nothing else happens.
    let (rx_before, _) = t.wg.transfer();
    let mut buf = [0u8; 64];
    let tx = t.gw.dev.send_keepalive(t.peer, Instant::now(), &mut buf).unwrap();
    assert_eq!(tx.len, 32);
    t.gw.sock.send_to(&buf[..tx.len], tx.to).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while t.wg.transfer().0 == rx_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(t.wg.transfer().0 > rx_before, "wireguard-go did not count our keepalive");
    assert_eq!(t.gw.dev.drops.total(), 0, "no drops on a clean exchange");
}

#[test]
fn wireguard_go_initiates_and_we_respond() {
    let mut t = topology(true, Some(1));
    // wireguard-go pings us; we answer every echo request through the tunnel.
    let mut ping = t
        .wg_ns
        .command("ping")
        .args(["-c", "3", "-i", "0.3", "-w", "10", "10.201.0.2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first_request_raw = None;
    let mut replies = 0;
    let done = t.gw.until(Duration::from_secs(15), |gw, e| {
        if let Some((echo, raw)) = delivered_echo(e) {
            assert!(echo.request, "wireguard-go sent {echo:?}");
            first_request_raw.get_or_insert(raw);
            gw.send_inner(&reply_to(&echo));
            replies += 1;
        }
        (replies == 3).then_some(())
    });
    assert!(done.is_some(), "did not see 3 echo requests; wireguard-go log:\n{}", t.wg.log());
    let status = ping.wait().unwrap();
    assert!(
        status.success(),
        "ping inside wireguard-go's namespace got no replies through our tunnel; transfer {:?}; log:\n{}",
        t.wg.transfer(),
        t.wg.log()
    );
    assert_eq!(t.gw.dev.peer_stats(t.peer).unwrap().handshakes, 1);
    assert_eq!(t.gw.dev.peer_endpoint(t.peer), Some(format!("10.200.0.1:{WG_PORT}").parse().unwrap()));

    // A replayed transport packet is rejected and counted, not delivered.
    let src: SocketAddr = format!("10.200.0.1:{WG_PORT}").parse().unwrap();
    match t.gw.process(src, first_request_raw.unwrap()) {
        Event::Dropped { reason } => assert_eq!(reason, DropReason::Replay),
        other => panic!("replay was not rejected: {other:?}"),
    }
    assert_eq!(t.gw.dev.drops.get(DropReason::Replay), 1);

    // wireguard-go's persistent keepalive (every second) is accepted: an empty
    // transport message that authenticates and delivers nothing.
    let drops_before = t.gw.dev.drops.total();
    let keepalive = t.gw.until(Duration::from_secs(5), |_, e| match e {
        Event::Accepted { raw } if raw.len() == 32 && raw[0] == 4 => Some(()),
        _ => None,
    });
    assert!(keepalive.is_some(), "wireguard-go's keepalive was not accepted");
    assert_eq!(t.gw.dev.drops.total(), drops_before);

    // A packet with one flipped bit is rejected and counted; the genuine one
    // still gets through. Ask wireguard-go for one more echo and intercept it.
    let mut ping = t.wg_ns.command("ping").args(["-c", "1", "-w", "5", "10.201.0.2"]).spawn().unwrap();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    let (genuine, from) = loop {
        assert!(Instant::now() < deadline, "no further transport packet from wireguard-go");
        if let Ok((n, from)) = t.gw.sock.recv_from(&mut buf) {
            if n > 32 && buf[0] == 4 {
                break (buf[..n].to_vec(), from);
            }
            t.gw.process(from, buf[..n].to_vec());
        }
    };
    let mut tampered = genuine.clone();
    tampered[genuine.len() - 20] ^= 0x01;
    match t.gw.process(from, tampered) {
        Event::Dropped { reason } => {
            assert_eq!(reason, DropReason::Authentication)
        }
        other => panic!("tampered packet was not rejected: {other:?}"),
    }
    assert_eq!(t.gw.dev.drops.get(DropReason::Authentication), 1);
    match t.gw.process(from, genuine) {
        Event::Delivered { packet, .. } => {
            let echo = parse_echo(&packet).expect("an echo request");
            t.gw.send_inner(&reply_to(&echo));
        }
        other => panic!("genuine packet after a forgery was not delivered: {other:?}"),
    }
    assert!(ping.wait().unwrap().success());
}
