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
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::cookie::{CookieJar, MacKeys};
use wgxdp_dataplane::noise::{PrivateKey, PublicKey};
use wgxdp_integration::{check_stream, require_tools, send_stream, veth_pair, Netns, WireguardGo};

const TRANSFER: usize = 50 * 1024 * 1024;
const PORT: u16 = 51820;

struct Gateway {
    child: Child,
    stdout: PathBuf,
    dir: PathBuf,
}

impl Gateway {
    fn start(ns: &Netns, dir: &PathBuf, wan: &str, lan: &str, client: &PublicKey) -> (Self, PublicKey) {
        let key = PrivateKey::generate();
        let key_path = dir.join("gw.key");
        std::fs::write(&key_path, &*key.to_base64_secret()).unwrap();
        std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let config = dir.join("gw.toml");
        std::fs::write(
            &config,
            format!(
                "[interface]\nwan = \"{wan}\"\nlan = \"{lan}\"\nlisten_port = {PORT}\nprivate_key_file = \"{}\"\n\n\
                 [[peer]]\npublic_key = \"{client}\"\nallowed_ips = [\"10.200.0.2/32\", \"fd20::2/128\"]\n",
                key_path.display()
            ),
        )
        .unwrap();
        let stdout = dir.join("gw.out");
        let child = ns
            .command(env!("CARGO_BIN_EXE_wgxdp"))
            .args(["serve", "--config", config.to_str().unwrap(), "--stats-every", "1"])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(dir.join("gw.err")).unwrap())
            .spawn()
            .expect("start wgxdp serve");
        let gw = Self { child, stdout, dir: dir.clone() };
        gw.wait_for_output("wgxdp: running", Duration::from_secs(20));
        (gw, key.public_key())
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn wait_for_output(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "`{needle}` not printed; stdout:\n{}\nstderr:\n{}",
                self.output(),
                std::fs::read_to_string(self.dir.join("gw.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The newest value of `name=` in the printed stats.
    fn counter(&self, name: &str) -> u64 {
        let out = self.output();
        let key = format!(" {name}=");
        out.lines()
            .rev()
            .find_map(|l| l.split_once(&key).map(|(_, rest)| rest.split_whitespace().next().unwrap_or("0").to_owned()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Waits for a fresh stats line so counters are current.
    fn refresh(&self) {
        let n = self.output().matches("stats queue0").count();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.output().matches("stats queue0").count() == n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; at worst ESRCH.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_client(ns: &Netns, key: &PrivateKey, gw: &PublicKey) -> WireguardGo {
    let wg = WireguardGo::start(ns, &key.to_base64_secret(), 40_001);
    wg.set(&[
        "peer",
        &gw.to_base64(),
        "endpoint",
        &format!("10.100.0.1:{PORT}"),
        "allowed-ips",
        "10.50.0.0/24,fd50::/64",
    ]);
    ns.ip(&["addr", "add", "10.200.0.2/32", "dev", &wg.interface]);
    ns.ip(&["-6", "addr", "add", "fd20::2/128", "dev", &wg.interface, "nodad"]);
    ns.ip(&["link", "set", &wg.interface, "up"]);
    ns.ip(&["route", "add", "10.50.0.0/24", "dev", &wg.interface]);
    ns.ip(&["-6", "route", "add", "fd50::/64", "dev", &wg.interface]);
    wg
}

/// 50 MB between a listener in `listener_ns` and a connection from
/// `connector_ns` (towards the listener when `upload`), checked byte for byte.
fn transfer(listener_ns: &Netns, listen: &str, connector_ns: &Netns, upload: bool, seed: u64) {
    let listener = listener_ns.tcp_listener(listen);
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if upload {
            check_stream(&mut s, seed, TRANSFER)
        } else {
            send_stream(&mut s, seed, TRANSFER).map_err(|e| e.to_string())
        }
    });
    let mut c = connector_ns.tcp_connect(listen, Duration::from_secs(10)).expect("connect through the tunnel");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let client_result = if upload {
        let r = send_stream(&mut c, seed, TRANSFER).map_err(|e| e.to_string());
        drop(c);
        r
    } else {
        check_stream(&mut c, seed, TRANSFER)
    };
    client_result.expect("client side of the transfer");
    server.join().unwrap().expect("server side of the transfer");
}

#[test]
fn site_to_site_through_af_xdp() {
    require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool"]);
    let client = Netns::new("ec");
    let gw_ns = Netns::new("eg");
    let lan = Netns::new("el");
    let (client_if, gw_wan) = veth_pair(&client, "10.100.0.2/24", &gw_ns, "10.100.0.1/24");
    let (gw_lan, lan_if) = veth_pair(&gw_ns, "10.50.0.1/24", &lan, "10.50.0.2/24");
    gw_ns.ip(&["-6", "addr", "add", "fd50::1/64", "dev", &gw_lan, "nodad"]);
    lan.ip(&["-6", "addr", "add", "fd50::2/64", "dev", &lan_if, "nodad"]);
    lan.ip(&["route", "add", "10.200.0.0/24", "via", "10.50.0.1"]);
    lan.ip(&["route", "add", "10.100.0.0/24", "via", "10.50.0.1"]);
    lan.ip(&["-6", "route", "add", "fd20::/64", "via", "fd50::1"]);
    gw_ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    // Veth hands over TCP/UDP with checksums left for the NIC to finish; real
    // NICs deliver complete ones. Make the hosts that send into the gateway's
    // XDP interfaces compute them, as a physical link would carry them.
    client.exec("ethtool", &["-K", &client_if, "tx", "off"]);
    lan.exec("ethtool", &["-K", &lan_if, "tx", "off"]);

    let dir = std::env::temp_dir().join(format!("wgxdp-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let client_key = PrivateKey::generate();
    let (gateway, gw_pub) = Gateway::start(&gw_ns, &dir, &gw_wan, &gw_lan, &client_key.public_key());
    assert!(gw_ns.ip(&["link", "show", "dev", &gw_wan]).contains("xdp"));
    let wg = start_client(&client, &client_key, &gw_pub);

    // Pings over IPv4 and IPv6 inside the tunnel (the first may wait for the handshake).
    assert!(client.ping("10.50.0.2", 4, 3), "IPv4 ping through the tunnel failed; gateway:\n{}", gateway.output());
    assert!(client.ping("fd50::2", 4, 3), "IPv6 ping through the tunnel failed");

    // Oversize packets from the site get ICMP "fragmentation needed" / "packet
    // too big" with the tunnel MTU, not silence.
    let too_big =
        |args: &[&str]| String::from_utf8_lossy(&lan.command("ping").args(args).output().unwrap().stdout).into_owned();
    let v4 = too_big(&["-c", "1", "-M", "do", "-s", "1450", "-W", "2", "10.200.0.2"]);
    assert!(v4.contains("mtu = 1420"), "no fragmentation-needed from the gateway: {v4}");
    let v6 = too_big(&["-6", "-c", "1", "-s", "1450", "-W", "2", "fd20::2"]);
    assert!(v6.contains("mtu=1420"), "no packet-too-big from the gateway: {v6}");

    // 50 MB each way, byte for byte.
    transfer(&lan, "10.50.0.2:7001", &client, true, 11);
    transfer(&lan, "10.50.0.2:7002", &client, false, 22);
    gateway.refresh();
    let (decrypted, encrypted) = (gateway.counter("decrypted"), gateway.counter("encrypted"));
    assert!(decrypted >= 35_000, "only {decrypted} packets decrypted through AF_XDP");
    assert!(encrypted >= 35_000, "only {encrypted} packets encrypted through AF_XDP");
    assert!(gateway.counter("wan_redirected") >= decrypted && gateway.counter("lan_redirected") >= encrypted);
    assert!(gateway.counter("icmp_too_big") >= 2, "ICMP errors not counted:\n{}", gateway.output());

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
    let wg = start_client(&client, &client_key, &gw_pub);
    assert!(client.ping("10.50.0.2", 6, 3), "after wireguard-go restarted, the tunnel did not come back");
    gateway.refresh();
    assert!(gateway.counter("handshakes_queued") > hs_before);

    // A flood of initiations with valid MAC1 from many source ports: cookie
    // replies go out, and the established tunnel keeps passing traffic.
    let keys = MacKeys::new(&gw_pub);
    let flood = {
        let sockets: Vec<UdpSocket> = (0..64).map(|_| client.udp_socket("10.100.0.2:0")).collect();
        std::thread::spawn(move || {
            let mut jar = CookieJar::default();
            let mut msg = [0u8; 148];
            let mut seed = 0x1234_5678u64;
            for i in 0..50_000u32 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                msg[0] = 1;
                msg[4..8].copy_from_slice(&i.to_le_bytes());
                for (j, b) in msg[8..116].iter_mut().enumerate() {
                    *b = (seed >> (j % 56)) as u8;
                }
                jar.stamp(&keys, &mut msg, Instant::now());
                let _ = sockets[i as usize % sockets.len()].send_to(&msg, format!("10.100.0.1:{PORT}"));
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
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(gateway.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = gateway.child.wait().unwrap();
    assert!(status.success(), "wgxdp serve exited with {status}");
    assert!(gateway.output().contains("wgxdp: stopped"));
    for iface in [&gw_wan, &gw_lan] {
        assert!(!gw_ns.ip(&["link", "show", "dev", iface]).contains("xdp"), "XDP left on {iface}");
    }
    client.ip(&["route", "replace", "10.50.0.0/24", "via", "10.100.0.1"]);
    assert!(client.ping("10.50.0.2", 3, 2), "the kernel does not forward after the gateway stopped");
}

/// `wgxdp serve` refuses bad set-ups with a message naming the problem.
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
    let serve = |wan: &str, lan: &str, port: u16| {
        let cfg = dir.join(format!("{wan}-{lan}-{port}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[interface]\nwan = \"{wan}\"\nlan = \"{lan}\"\nlisten_port = {port}\nprivate_key_file = \"{}\"\n",
                key.display()
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
    let (ok, err) = serve("wan0", "nope0", 51820);
    assert!(!ok && err.contains("interface `nope0` does not exist"), "{err}");
    let _busy = ns.udp_socket("0.0.0.0:51999");
    let (ok, err) = serve("wan0", "lan0", 51999);
    assert!(!ok && err.contains("UDP port 51999 is already in use"), "{err}");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (ok, err) = serve("wan0", "lan0", 51820);
    assert!(!ok && err.contains("chmod 600"), "{err}");
    assert!(!ns.ip(&["link", "show"]).contains("xdp"), "a failed start left XDP attached");
    let _ = std::fs::remove_dir_all(&dir);
}
