//! `cargo xtask bench-e2e`: the same workloads through wgxdp, wireguard-go and
//! boringtun, in one run, each figure beside the others.
//!
//! - Equal load (`equal_load.rs`): the same modest packet rate through every
//!   gateway, both directions, 64 and 1420 B; the whole machine's CPU time
//!   over a window, less a baseline with no gateway (XDP drops the packets),
//!   per delivered packet, and where it went (gateway threads vs kernel).
//!   On veth the receiver's XDP and copy-mode AF_XDP run on the sender's
//!   core, so capacity figures are lower bounds; this is the fair comparison.
//! - Capacity (`capacity.rs`): the gateway pinned to one core, a generator
//!   on the other that tries to out-run it; decrypt + forward and encrypt +
//!   forward at 64 and 1420 B inner packets, counted by an XDP sink after the
//!   gateway. A figure where the gateway kept up with the generator is marked
//!   as a lower bound.
//! - Handshakes (`handshakes.rs`): 512 peers reconnecting, following cookie
//!   replies (MAC2) as real peers do.
//! - User view: TCP both ways (iperf3) and the 64-byte UDP rate from a
//!   wireguard-go client through the gateway to the LAN host (wgxdp against a
//!   wireguard-go gateway).
//! - Fleet (`fleet.rs`): three nodes on one PostgreSQL; how long a change
//!   made through one region's node takes to run on another region's
//!   serving node (beside the same change made on the serving node), and
//!   how long a fail-over takes.
//! - The API (wgxdp, part of the user view section): create and status
//!   latency (p50/p99) up to 10 000 gateways under concurrent load, whether
//!   forwarding pauses while peers are programmed (ping loss and worst RTT
//!   through the tunnel during the creates), the event fan-out latency to
//!   100 Server-Sent Events clients, and a restart on the full database
//!   (until the API answers, until the client's tunnel passes again).
//!
//! Prints the tables (equal load first) and the targets; writes a JSON report
//! and an SVG chart.
//!
//! Usage: wgxdp-bench-e2e <wgxdp binary> [--seconds N] [--packets N] [--gateways N] [--json FILE]
//!        [--only equal-load,capacity,handshakes,user-view,fleet] [--equal-rate-64 PPS] [--equal-rate-1420 PPS]
//!        [--store sqlite,postgres]
//!        [--equal-seconds S] [--equal-runs N] [--busy-poll]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::{PrivateKey, PublicKey};
use wgxdp_integration::events::SseClient;
use wgxdp_integration::site::{
    create_api_key, ping_from, write_private_key, ApiClient, ServeProcess, SiteTopology, StoreAt, TempDir,
    CLIENT_TUNNEL, CLIENT_WAN, LAN_HOST,
};
use wgxdp_integration::{require_tools, run, Netns, Userspace, WireguardGo};

mod capacity;
mod equal_load;
mod fleet;
mod handshakes;

const API: &str = "127.0.0.1:8080";

struct Options {
    wgxdp: PathBuf,
    seconds: u32,
    /// Pre-encrypted packets per 64-byte decrypt run (a quarter for 1420 B).
    packets: usize,
    gateways: u32,
    json: PathBuf,
    /// Sections to run (all when None).
    only: Option<Vec<String>>,
    equal: equal_load::Options,
    /// Also run wgxdp with `busy_poll = true` as a gateway of its own.
    busy_poll: bool,
    /// The stores the API part of user-view runs on, each in turn.
    stores: Vec<String>,
}

const SECTIONS: [&str; 5] = ["equal-load", "capacity", "handshakes", "user-view", "fleet"];

const USAGE: &str = "usage: wgxdp-bench-e2e <wgxdp> [--seconds N] [--packets N] [--gateways N] [--json FILE] \
    [--only SECTION,...] [--equal-rate-64 PPS] [--equal-rate-1420 PPS] [--equal-seconds S] [--equal-runs N] [--busy-poll]\n\
    [--store sqlite,postgres] (the stores user-view's API runs on, in turn; PostgreSQL: a server this run starts)\n\
    sections: equal-load, capacity, handshakes, user-view (TCP/UDP through a wireguard-go client, and the API),\n\
    fleet (three nodes on one PostgreSQL: change propagation and fail-over; at most 1000 of --gateways)";

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let wgxdp = PathBuf::from(args.next().ok_or(USAGE)?);
    let mut o = Options {
        wgxdp,
        seconds: 10,
        packets: 2_000_000,
        gateways: 10_000,
        json: PathBuf::from("target/bench-e2e.json"),
        only: None,
        equal: equal_load::Options { rates: [20_000, 20_000], seconds: 5.0, runs: 3 },
        busy_poll: false,
        stores: vec!["sqlite".into()],
    };
    fn number<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
        v.parse().map_err(|_| format!("{name}: not a number"))
    }
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--seconds" => o.seconds = number(&a, value(&a)?)?,
            "--packets" => o.packets = number(&a, value(&a)?)?,
            "--gateways" => o.gateways = number(&a, value(&a)?)?,
            "--json" => o.json = PathBuf::from(value(&a)?),
            "--equal-rate-64" => o.equal.rates[0] = number(&a, value(&a)?)?,
            "--equal-rate-1420" => o.equal.rates[1] = number(&a, value(&a)?)?,
            "--equal-seconds" => o.equal.seconds = number(&a, value(&a)?)?,
            "--equal-runs" => o.equal.runs = number(&a, value(&a)?)?,
            "--busy-poll" => o.busy_poll = true,
            "--store" => {
                let list: Vec<String> = value(&a)?.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(bad) = list.iter().find(|s| !["sqlite", "postgres"].contains(&s.as_str())) {
                    return Err(format!("--store: unknown store `{bad}` (sqlite, postgres)"));
                }
                o.stores = list;
            }
            "--only" => {
                let list: Vec<String> = value(&a)?.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(bad) = list.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    return Err(format!("--only: unknown section `{bad}` (sections: {})", SECTIONS.join(", ")));
                }
                o.only = Some(list);
            }
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    // Their networks are 10.120.0.0/24 upwards, below the client's 10.200.0.0/24.
    // (Plus the 200 creates at full size, after a rounding up to 4 clients.)
    if o.gateways > 19_700 {
        return Err("--gateways: at most 19700".into());
    }
    if o.seconds == 0 || o.gateways == 0 || o.packets < 1000 {
        return Err("--seconds and --gateways must be at least 1, --packets at least 1000".into());
    }
    if o.equal.rates.contains(&0) || o.equal.seconds.is_nan() || o.equal.seconds < 0.5 || o.equal.runs == 0 {
        return Err("--equal-rate-* must be at least 1, --equal-seconds at least 0.5, --equal-runs at least 1".into());
    }
    Ok(o)
}

impl Options {
    fn runs(&self, section: &str) -> bool {
        self.only.as_ref().is_none_or(|l| l.iter().any(|s| s == section))
    }
}

/// Traffic figures through one gateway.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    tcp_up_mbps: f64,
    tcp_down_mbps: f64,
    udp64_pps: f64,
    udp64_offered_pps: f64,
}

fn iperf3(client: &Netns, lan: &Netns, extra: &[&str], seconds: u32) -> Value {
    let mut server: Child = lan
        .command("iperf3")
        .args(["-s", "-1", "-B", LAN_HOST])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    std::thread::sleep(Duration::from_millis(400));
    let t = seconds.to_string();
    let out = client
        .command("iperf3")
        .args(["-c", LAN_HOST, "-B", CLIENT_TUNNEL, "-t", &t, "-J"])
        .args(extra)
        .output()
        .expect("run iperf3");
    let _ = server.kill();
    let _ = server.wait();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&out.stderr)}))
}

fn measure_traffic(topo: &SiteTopology, seconds: u32) -> Traffic {
    let tcp = |extra: &[&str]| {
        let v = iperf3(&topo.client, &topo.lan, extra, seconds);
        v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6
    };
    let tcp_up_mbps = tcp(&[]);
    let tcp_down_mbps = tcp(&["-R"]);
    // 64-byte inner IPv4 packets: 20 (IP) + 8 (UDP) + 36 bytes of payload.
    let v = iperf3(&topo.client, &topo.lan, &["-u", "-l", "36", "-b", "0"], seconds);
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(packets);
    let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).unwrap_or(f64::from(seconds));
    Traffic {
        tcp_up_mbps,
        tcp_down_mbps,
        udp64_pps: (packets - lost).max(0.0) / secs,
        udp64_offered_pps: packets / secs,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

type MakeRequest = Arc<dyn Fn(u32) -> (&'static str, String, Option<Value>) + Send + Sync>;

/// Concurrent API calls; returns sorted latencies and the failures.
fn api_load(api: &ApiClient, threads: u32, per_thread: u32, make: MakeRequest) -> (Vec<Duration>, u32) {
    let mut handles = Vec::new();
    for t in 0..threads {
        let (api, make) = (api.clone(), make.clone());
        handles.push(std::thread::spawn(move || {
            api.with_caller(move |call| {
                let mut lat = Vec::new();
                let mut failures = 0;
                for i in 0..per_thread {
                    let (method, path, body) = make(t * per_thread + i);
                    let start = Instant::now();
                    match call(method, &path, body) {
                        Ok((200 | 201, _)) => lat.push(start.elapsed()),
                        _ => failures += 1,
                    }
                }
                (lat, failures)
            })
        }));
    }
    let mut all = Vec::new();
    let mut failures = 0;
    for h in handles {
        let (l, f) = h.join().expect("load thread");
        all.extend(l);
        failures += f;
    }
    all.sort();
    (all, failures)
}

fn create_request(i: u32) -> (&'static str, String, Option<Value>) {
    let key = PrivateKey::generate().public_key().to_base64();
    let body = json!({
        "name": format!("bench-{i}"), "region": "bench", "tunnel_type": "wireguard",
        "remote_network_cidr": format!("10.{}.{}.0/24", 120 + i / 250, i % 250),
        "remote_peer_ip": "192.0.2.9", "remote_public_key": key,
    });
    ("POST", "/api/v1/vpn-gateways".into(), Some(body))
}

/// Ping through the tunnel at 100/s until `stop`; (sent, received, worst RTT ms).
fn ping_during(client: &Netns, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, u32, f64)> {
    let ns = client.name.clone();
    std::thread::spawn(move || {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "ping", "-i", "0.01", "-W", "1", "-I", CLIENT_TUNNEL, LAN_HOST])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ping");
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill(2) on our own child; SIGINT makes ping print its summary.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let out = child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        // "N packets transmitted, M received, …"
        let summary = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or("");
        let mut counts = summary.split(',').map(|p| p.trim().split(' ').next().and_then(|n| n.parse::<u32>().ok()));
        let sent = counts.next().flatten().unwrap_or(0);
        let received = counts.next().flatten().unwrap_or(0);
        let worst = text
            .lines()
            .find(|l| l.starts_with("rtt"))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.trim().split('/').nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        (sent, received, worst)
    })
}

fn wgxdp_phase(o: &Options, store: &str) -> (Traffic, Value) {
    println!("== wgxdp: topology, `wgxdp serve` with its API on {store}, the client's gateway created through the API");
    let topo = SiteTopology::new("bx");
    let dir = TempDir::new("wgxdp-bench");
    let key_file = dir.join("gw.key");
    let gw_pub = write_private_key(&key_file).public_key();
    let config = dir.join("gw.toml");
    let limits = "mutations_per_minute = 1000000\nreads_per_minute = 1000000\n";
    let at = match store {
        "postgres" => StoreAt::Postgres(wgxdp_integration::postgres::Cluster::shared().database()),
        _ => StoreAt::Sqlite(dir.join("bench.db")),
    };
    std::fs::write(&config, topo.api_config_on(&key_file, API, &at, limits)).expect("config");
    let mut gateway = ServeProcess::start(&topo.gateway, &o.wgxdp, &config, &dir.0);
    gateway.wait_for_output("wgxdp: api listening", Duration::from_secs(10));
    let key = create_api_key(&o.wgxdp, &config);
    let api = ApiClient::new(&topo.gateway, API, &key);
    let client_key = PrivateKey::generate();
    let (code, created) = api
        .call(
            "POST",
            "/api/v1/vpn-gateways",
            Some(json!({
                "name": "bench-client", "region": "bench", "tunnel_type": "wireguard",
                "remote_network_cidr": "10.200.0.0/24", "remote_peer_ip": CLIENT_WAN, "remote_peer_port": 40001,
                "remote_public_key": client_key.public_key().to_base64(),
            })),
        )
        .expect("API");
    assert_eq!(code, 201, "{created}");
    let psk = created["data"]["pre_shared_key"].as_str().expect("psk").to_owned();
    let wg = client(&topo, &client_key, &gw_pub, Some((&dir, &psk)));
    assert!(ping_from(&topo.client, CLIENT_TUNNEL, LAN_HOST, 5, 3), "the wgxdp tunnel does not pass traffic");
    println!("   traffic ({} s per workload)…", o.seconds);
    let traffic = measure_traffic(&topo, o.seconds);
    gateway.refresh();
    let decrypted = gateway.counter("decrypted");

    println!(
        "   API: {} creates, then {} status reads, 4 concurrent clients, pinging through the tunnel…",
        o.gateways,
        o.gateways * 2
    );
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = ping_during(&topo.client, stop.clone());
    let per = o.gateways.div_ceil(4);
    let (create_lat, create_fail) = api_load(&api, 4, per, Arc::new(create_request));
    stop.store(true, Ordering::Relaxed);
    let (sent, received, worst_rtt) = pinger.join().expect("pinger");
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/vpn-gateways?limit=100&cursor={c}"),
            None => "/api/v1/vpn-gateways?limit=100".into(),
        };
        let (_, page) = api.call("GET", &path, None).expect("list");
        ids.extend(page["data"].as_array().into_iter().flatten().filter_map(|g| g["id"].as_str().map(str::to_owned)));
        match page["meta"]["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let status_ids = Arc::new(ids.clone());
    let status_request: MakeRequest = Arc::new(move |i| {
        ("GET", format!("/api/v1/vpn-gateways/{}/status", status_ids[i as usize % status_ids.len()]), None)
    });
    let (status_lat, status_fail) = api_load(&api, 4, per * 2, status_request);
    // Creates once all of them exist: the figure at full size, not averaged
    // over a table that grew from empty.
    let base = 4 * per;
    let (full_lat, full_fail) = api_load(&api, 4, 50, Arc::new(move |i| create_request(base + i)));
    println!("   events: {SSE_CLIENTS} Server-Sent Events clients, {FANOUT_CHANGES} changes…");
    let fanout = sse_fanout(&topo, &o.wgxdp, &config, &api, &ids[0]);
    let after = ping_from(&topo.client, CLIENT_TUNNEL, LAN_HOST, 3, 2);
    let exit = gateway.terminate();
    // A restart on the full database: until the API answers (every tunnel
    // replayed into the data plane first), and until the client's tunnel
    // passes again (the gateway starts a handshake with each peer).
    println!("   restart: `wgxdp serve` again on the database of {} gateways…", ids.len());
    let began = Instant::now();
    let mut restarted = ServeProcess::start(&topo.gateway, &o.wgxdp, &config, &dir.0);
    restarted.wait_for_output("wgxdp: api listening", Duration::from_secs(600));
    let ready = began.elapsed();
    let passes = loop {
        if ping_from(&topo.client, CLIENT_TUNNEL, LAN_HOST, 1, 1) {
            break Some(began.elapsed());
        }
        if began.elapsed() > ready + Duration::from_secs(60) {
            break None;
        }
    };
    let restart_exit = restarted.terminate();
    drop(wg);
    let api_figures = json!({
        "store": store,
        "gateways": ids.len(),
        "create_ms": {"p50": percentile(&create_lat, 0.5), "p99": percentile(&create_lat, 0.99), "failures": create_fail},
        "status_ms": {"p50": percentile(&status_lat, 0.5), "p99": percentile(&status_lat, 0.99), "failures": status_fail},
        "create_at_full_size_ms": {"p50": percentile(&full_lat, 0.5), "p99": percentile(&full_lat, 0.99), "failures": full_fail},
        "forwarding_during_creates": {"pings_sent": sent, "pings_received": received, "worst_rtt_ms": worst_rtt},
        "sse_fanout": fanout,
        "tunnel_ok_after": after,
        "restart": {
            "api_ready_s": ready.as_secs_f64(),
            "tunnel_passes_s": passes.map(|d| d.as_secs_f64()),
            "exit": restart_exit.to_string(),
        },
        "decrypted_in_af_xdp": decrypted,
        "gateway_exit": exit.to_string(),
    });
    (traffic, api_figures)
}

const SSE_CLIENTS: usize = 100;
const FANOUT_CHANGES: usize = 20;

/// Event fan-out: `SSE_CLIENTS` clients stream `gateway.updated` while
/// gateway `id` is renamed `FANOUT_CHANGES` times; per event and client, the
/// time from the change's request to the event's arrival, and per event the
/// spread between its first and last arrival. (At most 16 streams per API
/// key: the clients share keys of their own.)
fn sse_fanout(topo: &SiteTopology, wgxdp: &Path, config: &Path, api: &ApiClient, id: &str) -> Value {
    let keys: Vec<String> = (0..SSE_CLIENTS.div_ceil(16)).map(|_| create_api_key(wgxdp, config)).collect();
    let streams: Vec<std::net::TcpStream> =
        topo.gateway.enter(|| (0..SSE_CLIENTS).map(|_| std::net::TcpStream::connect(API).expect("connect")).collect());
    // Each resumes after the newest event so far: a stream that starts after
    // the first change still gets it (from the log), and then all are live.
    let (_, newest) = api.call("GET", "/api/v1/events/history?limit=1", None).expect("API");
    let after = newest["data"][0]["id"].as_i64();
    let path = "/api/v1/events?types=gateway.updated";
    let clients: Vec<SseClient> =
        streams.into_iter().enumerate().map(|(i, s)| SseClient::open(s, path, &keys[i / 16], after)).collect();
    let rename = |n: usize| {
        let (code, body) = api
            .call("PATCH", &format!("/api/v1/vpn-gateways/{id}"), Some(json!({"name": format!("fanout-{n}")})))
            .expect("API");
        assert_eq!(code, 200, "{body}");
    };
    // A first change every client sees: all are subscribed from here on.
    rename(0);
    // Each reader: the arrival of every change, told apart by the name it set.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut at = vec![None; FANOUT_CHANGES + 1];
                while let Some((_, _, event)) = c.next(Duration::from_secs(10)) {
                    let name = event["data"]["name"].as_str().unwrap_or_default();
                    if let Some(n) = name.strip_prefix("fanout-").and_then(|n| n.parse::<usize>().ok()) {
                        if n <= FANOUT_CHANGES && at[n].is_none() {
                            at[n] = Some(Instant::now());
                        }
                        if n == FANOUT_CHANGES {
                            break;
                        }
                    }
                }
                at
            })
        })
        .collect();
    let (mut sent, mut acked) = (vec![Instant::now()], Vec::new());
    for n in 1..=FANOUT_CHANGES {
        std::thread::sleep(Duration::from_millis(50));
        sent.push(Instant::now());
        rename(n);
        acked.push(sent[n].elapsed());
    }
    let arrivals: Vec<Vec<Option<Instant>>> = readers.into_iter().map(|r| r.join().expect("reader")).collect();
    let (mut latency, mut spread, mut missed) = (Vec::new(), Vec::new(), 0);
    for (n, at) in sent.iter().enumerate().skip(1) {
        let got: Vec<Instant> = arrivals.iter().filter_map(|a| a[n]).collect();
        missed += arrivals.len() - got.len();
        latency.extend(got.iter().map(|t| t.saturating_duration_since(*at)));
        if let (Some(first), Some(last)) = (got.iter().min(), got.iter().max()) {
            spread.push(*last - *first);
        }
    }
    latency.sort();
    spread.sort();
    acked.sort();
    json!({
        "clients": SSE_CLIENTS, "events": FANOUT_CHANGES, "missed": missed,
        "change_acknowledged_ms": {"p50": percentile(&acked, 0.5), "max": percentile(&acked, 1.0)},
        "latency_ms": {"p50": percentile(&latency, 0.5), "p99": percentile(&latency, 0.99),
                       "max": percentile(&latency, 1.0)},
        "spread_ms": {"p50": percentile(&spread, 0.5), "max": percentile(&spread, 1.0)},
    })
}

fn client(topo: &SiteTopology, key: &PrivateKey, gw: &PublicKey, psk: Option<(&TempDir, &str)>) -> WireguardGo {
    let wg = topo.start_client(key, gw, CLIENT_TUNNEL);
    if let Some((dir, psk)) = psk {
        let f = dir.join("client.psk");
        std::fs::write(&f, psk).expect("psk file");
        wg.set(&["peer", &gw.to_base64(), "preshared-key", f.to_str().expect("utf-8")]);
    }
    wg
}

fn userspace_phase(o: &Options, program: Userspace) -> Traffic {
    println!("== user view: {} as the gateway (kernel forwarding), same topology", program.binary());
    let topo = SiteTopology::new("bw");
    let gw_key = PrivateKey::generate();
    let client_key = PrivateKey::generate();
    let gw = WireguardGo::start_program(&topo.gateway, program, &gw_key.to_base64_secret(), 51820, None);
    gw.set(&["peer", &client_key.public_key().to_base64(), "allowed-ips", "10.200.0.0/24,fd20::/64"]);
    topo.gateway.ip(&["link", "set", &gw.interface, "up"]);
    topo.gateway.ip(&["route", "add", "10.200.0.0/24", "dev", &gw.interface]);
    let wg = client(&topo, &client_key, &gw_key.public_key(), None);
    assert!(
        ping_from(&topo.client, CLIENT_TUNNEL, LAN_HOST, 5, 3),
        "the {} tunnel does not pass traffic",
        program.binary()
    );
    println!("   traffic ({} s per workload)…", o.seconds);
    let t = measure_traffic(&topo, o.seconds);
    drop(wg);
    drop(gw);
    t
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    json!({
        "kernel": run("uname", &["-r"]).trim(),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "wireguard_go": run("sh", &["-c", "dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || true"]).trim(),
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn fmt_rate(r: &capacity::Rate, size: usize) -> String {
    // "≥": the gateway delivered (nearly) all that was offered, so the
    // generator set the rate and the gateway can do at least this much.
    let bound = if r.generator_limited() { ">= " } else { "" };
    if size < 512 {
        format!("{bound}{:.0} kpps", r.delivered_pps / 1e3)
    } else {
        format!("{bound}{:.2} Gbps", r.delivered_gbps)
    }
}

/// Whether wgxdp runs with `busy_poll = true` (another change adds the
/// key; the strict config parser refuses it until then): starts it once.
fn busy_poll_supported(wgxdp: &Path) -> Result<(), String> {
    let topo = SiteTopology::new("bp");
    let (dir, config, _) = capacity::wgxdp_config(capacity::Kind::WgxdpBusyPoll, &topo, &[]);
    let started = ServeProcess::try_start_pinned(
        &topo.gateway,
        wgxdp,
        &config,
        &dir.0,
        Some(capacity::GATEWAY_CPU),
        Duration::from_secs(30),
    );
    started.map(drop).map_err(|e| e.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_owned())
}

fn main() {
    let o = options().unwrap_or_else(|e| {
        eprintln!("wgxdp-bench-e2e: {e}");
        std::process::exit(2)
    });
    require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool", "iperf3", "taskset"]);
    assert!(Path::new(&o.wgxdp).exists(), "{} does not exist", o.wgxdp.display());
    let started = Instant::now();
    let object = wgxdp_integration::xdp_object();

    let mut kinds = vec![capacity::Kind::Wgxdp, capacity::Kind::Userspace(Userspace::WireguardGo)];
    let have_boringtun = !run("sh", &["-c", "command -v boringtun-cli || true"]).trim().is_empty();
    if have_boringtun {
        kinds.push(capacity::Kind::Userspace(Userspace::Boringtun));
    } else {
        println!("(boringtun-cli is not installed: `cargo xtask bench-e2e` installs it; skipping it)");
    }
    if o.busy_poll {
        match busy_poll_supported(&o.wgxdp) {
            Ok(()) => kinds.push(capacity::Kind::WgxdpBusyPoll),
            Err(e) => println!(
                "(--busy-poll: this wgxdp does not run with `busy_poll = true` in [interface] ({e}); skipping that row)"
            ),
        }
    }
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();

    let mut equal = None;
    if o.runs("equal-load") {
        let e = &o.equal;
        println!(
            "== equal load: {} / {} pps (64 / 1420 B), {} s window, {} run(s) each, generator on core {}",
            e.rates[0],
            e.rates[1],
            e.seconds,
            e.runs,
            capacity::GENERATOR_CPU
        );
        let section = Instant::now();
        println!("   baseline: no gateway, XDP drops the packets on the gateway-side veth");
        let baseline = equal_load::baseline(e, &object);
        let mut results = Vec::new();
        for kind in &kinds {
            println!("   {} on core {}", kind.name(), capacity::GATEWAY_CPU);
            results.push((*kind, equal_load::measure(*kind, &o.wgxdp, &object, e, &baseline)));
        }
        println!("   (equal load took {:.0} s)", section.elapsed().as_secs_f64());
        equal = Some((baseline, results, section.elapsed().as_secs_f64()));
    }

    let mut bare_open_pps = 0.0;
    let mut caps = Vec::new();
    if o.runs("capacity") {
        println!("== bare AEAD open (ring, 1420 B) on the generator core");
        bare_open_pps = std::thread::spawn(capacity::bare_open_rate).join().expect("bare open");
        println!("   {:.0} opens/s = {:.2} Gbps of plaintext", bare_open_pps, bare_open_pps * 1420.0 * 8.0 / 1e9);
        for kind in &kinds {
            println!(
                "== capacity: {} on core {}, generator on core {}",
                kind.name(),
                capacity::GATEWAY_CPU,
                capacity::GENERATOR_CPU
            );
            caps.push(capacity::measure(*kind, &o.wgxdp, &object, o.packets, o.seconds.min(5)));
        }
    }
    let mut hs = Vec::new();
    if o.runs("handshakes") {
        for kind in &kinds {
            println!("== handshakes: {} on core {}", kind.name(), capacity::GATEWAY_CPU);
            hs.push(handshakes::measure(*kind, &o.wgxdp, &object, o.seconds.min(5)));
        }
    }

    let user_view = o.runs("user-view").then(|| {
        // The traffic of the first store's run; the API figures of every store's.
        let mut runs: Vec<(Traffic, Value)> = o.stores.iter().map(|s| wgxdp_phase(&o, s)).collect();
        let api: Vec<Value> = runs.iter().map(|r| r.1.clone()).collect();
        let x = runs.remove(0).0;
        let g = userspace_phase(&o, Userspace::WireguardGo);
        let b = have_boringtun.then(|| userspace_phase(&o, Userspace::Boringtun));
        (x, api, g, b)
    });

    let fleet_figures = o.runs("fleet").then(|| {
        println!("== fleet: three nodes on one PostgreSQL");
        fleet::measure(&o.wgxdp, o.gateways.min(1000))
    });

    // The tables: equal load first.
    if let Some((baseline, results, _)) = &equal {
        equal_load::print(&o.equal, baseline, results);
    }
    let mut chart: Vec<ChartGroup> = Vec::new();
    if !caps.is_empty() {
        println!(
            "\n{:<34}{}",
            "capacity (one gateway core)",
            names.iter().map(|n| format!("{n:>20}")).collect::<String>()
        );
        for (w, label) in [(0usize, "decrypt + forward"), (1, "encrypt + forward")] {
            for (i, size) in capacity::SIZES.into_iter().enumerate() {
                let rates: Vec<capacity::Rate> =
                    caps.iter().map(|c| if w == 0 { c.decrypt[i] } else { c.encrypt[i] }).collect();
                let row = format!("{label}, {size} B");
                println!("{row:<34}{}", rates.iter().map(|r| format!("{:>20}", fmt_rate(r, size))).collect::<String>());
                println!(
                    "{:<34}{}",
                    "   offered by the generator",
                    rates.iter().map(|r| format!("{:>16.0} kpps", r.offered_pps / 1e3)).collect::<String>()
                );
                let value = |r: &capacity::Rate| if size < 512 { r.delivered_pps } else { r.delivered_gbps };
                chart.push((
                    row,
                    kinds.iter().zip(&rates).map(|(k, r)| (k.name().to_owned(), value(r), fmt_rate(r, size))).collect(),
                ));
            }
        }
        println!(
            "   >= : a lower bound: the gateway delivered at least 95 % of what the generator offered, so the\n   \
             generator (on veth it also runs the receiver's XDP and copy-mode AF_XDP) set the rate, not the gateway."
        );
    }
    if let Some((x, _, g, b)) = &user_view {
        println!(
            "\n{:<34}{:>16}{:>16}{:>16}{:>10}",
            "user view (wireguard-go client)", "wgxdp", "wireguard-go", "boringtun", "vs w-go"
        );
        let bt = b.unwrap_or_default();
        let rows = [
            ("TCP client -> LAN (Mbit/s)", x.tcp_up_mbps, g.tcp_up_mbps, bt.tcp_up_mbps),
            ("TCP LAN -> client (Mbit/s)", x.tcp_down_mbps, g.tcp_down_mbps, bt.tcp_down_mbps),
            ("UDP 64 B delivered (pkt/s)", x.udp64_pps, g.udp64_pps, bt.udp64_pps),
            ("UDP 64 B offered (pkt/s)", x.udp64_offered_pps, g.udp64_offered_pps, bt.udp64_offered_pps),
        ];
        for (name, a, w, bv) in rows {
            println!("{name:<34}{a:>16.0}{w:>16.0}{bv:>16.0}{:>9.2}x", ratio(a, w));
        }
        chart.push((
            "TCP client -> LAN".into(),
            [("wgxdp", x), ("wireguard-go", g)]
                .into_iter()
                .chain(b.as_ref().map(|b| ("boringtun", b)))
                .map(|(n, t)| (n.to_owned(), t.tcp_up_mbps, format!("{:.0} Mbit/s", t.tcp_up_mbps)))
                .collect(),
        ));
    }

    if !hs.is_empty() {
        println!(
            "\n{:<34}{}",
            "handshakes (512 peers reconnecting)",
            names.iter().map(|n| format!("{n:>20}")).collect::<String>()
        );
        type Cell = fn(&handshakes::Handshakes) -> String;
        let hs_rows: [(&str, Cell); 9] = [
            ("initiations offered (/s)", |h| format!("{:.0}", h.offered_per_s)),
            ("   of which with MAC2 (/s)", |h| format!("{:.0}", h.with_mac2_per_s)),
            ("completed handshakes (/s)", |h| {
                format!("{}{:.0}", if h.generator_limited() { ">= " } else { "" }, h.completed_per_s)
            }),
            ("cookie replies (/s)", |h| format!("{:.0}", h.cookie_replies_per_s)),
            ("   cookies the peers stored", |h| format!("{}", h.cookies_accepted)),
            ("replies the peers refused", |h| format!("{}", h.refused)),
            ("initiations unanswered", |h| format!("{}", h.unanswered)),
            ("generator not ready (peer rounds)", |h| format!("{}/{}", h.generator_missed, h.peer_rounds)),
            ("tunnel data delivered meanwhile", |h| format!("{}/{}", h.tunnel_delivered, h.tunnel_sent)),
        ];
        for (name, f) in hs_rows {
            println!("{name:<34}{}", hs.iter().map(|h| format!("{:>20}", f(h))).collect::<String>());
        }
        println!(
            "   completed: responses the peer's protocol core accepted; a peer that gets a cookie reply stores the\n   \
             cookie and its next initiation (next round) carries MAC2. \"not ready\": the generator had not yet\n   \
             written that peer's initiation when its round came. \">=\": a lower bound; the gateway answered at\n   \
             least 95 % of what it got while the generator (it runs the peers' Diffie-Hellman) missed more than\n   \
             5 % of the peer rounds, so the generator set the rate."
        );
        chart.push((
            "handshakes completed /s".into(),
            kinds
                .iter()
                .zip(&hs)
                .map(|(k, h)| (k.name().to_owned(), h.completed_per_s, format!("{:.0}/s", h.completed_per_s)))
                .collect(),
        ));
    }

    // Targets (issue: wgxdp against wireguard-go, same run).
    let bare_gbps = bare_open_pps * 1420.0 * 8.0 / 1e9;
    let mut targets: Vec<(&str, f64, f64)> = Vec::new();
    if let [w, go, ..] = &caps[..] {
        targets.extend([
            (
                "decrypt 64 B: >= 10x wireguard-go pps",
                ratio(w.decrypt[0].delivered_pps, go.decrypt[0].delivered_pps),
                10.0,
            ),
            (
                "decrypt 1420 B: >= 4x wireguard-go Gbps",
                ratio(w.decrypt[1].delivered_gbps, go.decrypt[1].delivered_gbps),
                4.0,
            ),
            ("decrypt 1420 B: >= 60% of bare AEAD open", ratio(w.decrypt[1].delivered_gbps, bare_gbps), 0.6),
            (
                "encrypt 64 B: >= 10x wireguard-go pps",
                ratio(w.encrypt[0].delivered_pps, go.encrypt[0].delivered_pps),
                10.0,
            ),
            (
                "encrypt 1420 B: >= 4x wireguard-go Gbps",
                ratio(w.encrypt[1].delivered_gbps, go.encrypt[1].delivered_gbps),
                4.0,
            ),
            ("encrypt 1420 B: >= 60% of bare AEAD open", ratio(w.encrypt[1].delivered_gbps, bare_gbps), 0.6),
        ]);
    }
    if let Some((x, _, g, _)) = &user_view {
        targets.push(("user-view TCP: >= 2x all-wireguard-go", ratio(x.tcp_up_mbps, g.tcp_up_mbps), 2.0));
    }
    if !targets.is_empty() {
        println!("\n{:<44}{:>10}{:>10}", "targets", "measured", "");
        for (name, value, goal) in &targets {
            println!("{name:<44}{value:>9.2}x{:>10}", if value >= goal { "met" } else { "NOT met" });
        }
    }
    for api in user_view.iter().flat_map(|u| &u.1) {
        println!("\nAPI on {}:", api["store"].as_str().unwrap_or("?"));
        println!(
            "API with {} gateways: create p50 {:.2} ms p99 {:.2} ms; status p50 {:.2} ms p99 {:.2} ms",
            api["gateways"],
            api["create_ms"]["p50"].as_f64().unwrap_or(0.0),
            api["create_ms"]["p99"].as_f64().unwrap_or(0.0),
            api["status_ms"]["p50"].as_f64().unwrap_or(0.0),
            api["status_ms"]["p99"].as_f64().unwrap_or(0.0)
        );
        println!(
            "creates with all {} in place: p50 {:.2} ms p99 {:.2} ms",
            api["gateways"],
            api["create_at_full_size_ms"]["p50"].as_f64().unwrap_or(0.0),
            api["create_at_full_size_ms"]["p99"].as_f64().unwrap_or(0.0)
        );
        let e = &api["sse_fanout"];
        println!(
            "event fan-out to {} SSE clients: change request to arrival p50 {:.2} ms p99 {:.2} ms max {:.2} ms \
             (the change itself answered in p50 {:.2} ms); first to last client p50 {:.2} ms; {} missed",
            e["clients"],
            e["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            e["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            e["latency_ms"]["max"].as_f64().unwrap_or(0.0),
            e["change_acknowledged_ms"]["p50"].as_f64().unwrap_or(0.0),
            e["spread_ms"]["p50"].as_f64().unwrap_or(0.0),
            e["missed"]
        );
        let r = &api["restart"];
        println!(
            "restart with {} gateways: API ready after {:.1} s, the client's tunnel passes after {}",
            api["gateways"],
            r["api_ready_s"].as_f64().unwrap_or(0.0),
            r["tunnel_passes_s"].as_f64().map_or("- (not within 60 s)".into(), |s| format!("{s:.1} s"))
        );
        let f = &api["forwarding_during_creates"];
        println!(
            "forwarding while peers were programmed: {}/{} pings answered, worst RTT {:.2} ms",
            f["pings_received"],
            f["pings_sent"],
            f["worst_rtt_ms"].as_f64().unwrap_or(0.0)
        );
    }

    if let Some(f) = &fleet_figures {
        fleet::print(f);
    }

    let rate_json = |r: &capacity::Rate| {
        json!({"offered_pps": r.offered_pps, "delivered_pps": r.delivered_pps, "delivered_gbps": r.delivered_gbps,
               "lower_bound": r.generator_limited()})
    };
    let capacity_json: serde_json::Map<String, Value> = kinds
        .iter()
        .zip(&caps)
        .map(|(k, c)| {
            (
                k.name().to_owned(),
                json!({
                    "decrypt_64": rate_json(&c.decrypt[0]), "decrypt_1420": rate_json(&c.decrypt[1]),
                    "encrypt_64": rate_json(&c.encrypt[0]), "encrypt_1420": rate_json(&c.encrypt[1]),
                }),
            )
        })
        .collect();
    let handshakes_json: serde_json::Map<String, Value> = kinds
        .iter()
        .zip(&hs)
        .map(|(k, h)| {
            (
                k.name().to_owned(),
                json!({
                    "offered_per_s": h.offered_per_s, "with_mac2_per_s": h.with_mac2_per_s,
                    "completed_per_s": h.completed_per_s, "responses_per_s": h.responses_per_s,
                    "cookie_replies_per_s": h.cookie_replies_per_s, "cookies_accepted": h.cookies_accepted,
                    "refused": h.refused, "unanswered": h.unanswered, "generator_missed": h.generator_missed,
                    "peer_rounds": h.peer_rounds, "lower_bound": h.generator_limited(),
                    "tunnel_sent": h.tunnel_sent, "tunnel_delivered": h.tunnel_delivered,
                }),
            )
        })
        .collect();
    let report = json!({
        "machine": machine(),
        "sections": SECTIONS.iter().filter(|s| o.runs(s)).collect::<Vec<_>>(),
        "equal_load": equal.as_ref().map(|(baseline, results, secs)| {
            let mut v = equal_load::json(&o.equal, baseline, results);
            v["elapsed_s"] = json!(secs);
            v
        }),
        "handshakes": (!hs.is_empty()).then_some(handshakes_json),
        "gateway_cpu": capacity::GATEWAY_CPU,
        "generator_cpu": capacity::GENERATOR_CPU,
        "seconds_per_workload": o.seconds,
        "bare_aead_open_1420": (!caps.is_empty()).then(|| json!({"pps": bare_open_pps, "gbps": bare_gbps})),
        "capacity": (!caps.is_empty()).then_some(capacity_json),
        "user_view": user_view.as_ref().map(|(x, _, g, b)| json!({
            "wgxdp": {"tcp_up_mbps": x.tcp_up_mbps, "tcp_down_mbps": x.tcp_down_mbps, "udp64_pps": x.udp64_pps, "udp64_offered_pps": x.udp64_offered_pps},
            "wireguard_go": {"tcp_up_mbps": g.tcp_up_mbps, "tcp_down_mbps": g.tcp_down_mbps, "udp64_pps": g.udp64_pps, "udp64_offered_pps": g.udp64_offered_pps},
            "boringtun": b.map(|b| json!({"tcp_up_mbps": b.tcp_up_mbps, "tcp_down_mbps": b.tcp_down_mbps, "udp64_pps": b.udp64_pps, "udp64_offered_pps": b.udp64_offered_pps})),
        })),
        "targets": targets.iter().map(|(n, v, goal)| json!({"target": n, "ratio": v, "goal": goal, "met": v >= goal})).collect::<Vec<_>>(),
        "api": user_view.as_ref().map(|u| u.1[0].clone()),
        "api_by_store": user_view.as_ref().map(|u| u.1.clone()),
        "fleet": fleet_figures,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    if let Some(parent) = o.json.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&o.json, serde_json::to_string_pretty(&report).expect("json")).expect("write the JSON report");
    let svg = o.json.with_extension("svg");
    std::fs::write(&svg, svg_chart(&chart)).expect("write the chart");
    println!("\nfigures: {} and {} ({:.0} s)", o.json.display(), svg.display(), started.elapsed().as_secs_f64());
}

/// One workload in the chart: its name and (gateway, value, label) per bar.
type ChartGroup = (String, Vec<(String, f64, String)>);

/// A grouped bar chart: one group per workload, bars scaled to the group's best.
fn svg_chart(groups: &[ChartGroup]) -> String {
    const COLORS: [&str; 3] = ["#1f77b4", "#ff7f0e", "#2ca02c"];
    let (row_h, bar_h, left, width) = (26.0, 20.0, 230.0, 420.0);
    let bars: usize = groups.iter().map(|(_, b)| b.len()).sum();
    let height = 40.0 + bars as f64 * row_h + groups.len() as f64 * 14.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">wgxdp vs userspace WireGuard, one gateway core (bar length relative to the best in each workload)</text>\n",
        left + width + 130.0
    );
    let mut y = 36.0;
    for (name, entries) in groups {
        let best = entries.iter().map(|e| e.1).fold(0.0f64, f64::max).max(1e-12);
        out.push_str(&format!("<text x=\"10\" y=\"{}\" font-weight=\"bold\">{name}</text>\n", y + bar_h * 0.7));
        for (i, (gw, value, label)) in entries.iter().enumerate() {
            let w = (value / best * width).max(1.0);
            let color = COLORS[i % COLORS.len()];
            out.push_str(&format!(
                "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"{bar_h}\" fill=\"{color}\"/>\n\
                 <text x=\"{}\" y=\"{}\">{gw}: {label}</text>\n",
                left + w + 6.0,
                y + bar_h * 0.7
            ));
            y += row_h;
        }
        y += 14.0;
    }
    out.push_str("</svg>\n");
    out
}
