//! Handshake workload: many peers (re)connect at once. The gateway knows 512
//! peers; each is a protocol core of its own (`Device`) on the generator. In
//! every round (55 ms, under every implementation's per-peer limit) each
//! peer with an initiation ready sends it, at its own offset in the round
//! (the peers are spread over it); the replies go back to the peer they
//! answer (by receiver index):
//!
//! - a response is consumed by the peer's `Device`; one it accepts is a
//!   completed handshake;
//! - a cookie reply (the gateway is under load) is consumed too: the peer
//!   stores the cookie, and its next initiation, in the next round, carries
//!   MAC2, which a loaded gateway answers.
//!
//! Writing an initiation and consuming a response cost Diffie-Hellman on the
//! generator, so that happens off the sending path: a protocol thread reads
//! the replies and writes each peer's next initiation as soon as the last
//! one is answered (or has gone unanswered for most of a round); the sender
//! only sends what is ready when the round starts. A peer with nothing ready
//! misses the round (counted: then the generator, not the gateway, set the
//! offered rate). Meanwhile an established tunnel sends 1 000 data packets
//! per second; the sink on the LAN host counts how many arrive.

use crate::capacity::{self, Kind, GENERATOR, GENERATOR_CPU, SINK_PORT, TUNNEL_SRC};
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::device::{Device, PeerId};
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey, PublicKey};
use wgxdp_integration::blast::{inner_packet, mac_of, pin_current_thread, ClientSession, Framing, PacketSocket, Sink};
use wgxdp_integration::site::{SiteTopology, GATEWAY_WAN, LAN_HOST, LISTEN_PORT};

const PEERS: usize = 512;
const ROUND: Duration = Duration::from_millis(55);
const DATA_PER_SECOND: usize = 1000;
/// The sender's pacing period.
const TICK: Duration = Duration::from_millis(1);
/// An initiation unanswered this long is given up (its peer writes the next
/// one, in time for its next round).
const ANSWER_TIMEOUT: Duration = Duration::from_millis(40);
const INITIATION_LEN: usize = 148;
const RESPONSE_LEN: usize = 92;
const COOKIE_REPLY_LEN: usize = 64;
/// MAC2: the last 16 bytes of an initiation (all zero without a cookie).
const MAC2: std::ops::Range<usize> = 132..148;

#[derive(Debug, Default, Clone, Copy)]
pub struct Handshakes {
    /// Initiations sent.
    pub offered: u64,
    pub offered_per_s: f64,
    /// Initiations sent with MAC2 (the peer held a cookie), per second.
    pub with_mac2_per_s: f64,
    /// Responses the peer's `Device` accepted, per second.
    pub completed_per_s: f64,
    /// Responses received (accepted or not), per second.
    pub responses_per_s: f64,
    pub cookie_replies_per_s: f64,
    /// Cookie replies the peer's `Device` accepted (cookie stored).
    pub cookies_accepted: u64,
    /// Replies the peer's `Device` refused (e.g. for an initiation it had
    /// already given up on).
    pub refused: u64,
    /// Initiations that got no answer within ANSWER_TIMEOUT.
    pub unanswered: u64,
    /// Peer rounds with no initiation ready (the generator fell behind), of
    /// all the peer rounds scheduled.
    pub generator_missed: u64,
    pub peer_rounds: u64,
    /// Data packets of the established tunnel: sent during the flood, delivered.
    pub tunnel_sent: u64,
    pub tunnel_delivered: u64,
}

impl Handshakes {
    /// The generator missed more than 5 % of the peer rounds while the
    /// gateway answered at least 95 % of what it was sent: the generator, not
    /// the gateway, set the rate, and the completed figure is a lower bound.
    pub fn generator_limited(&self) -> bool {
        self.generator_missed * 20 > self.peer_rounds && self.unanswered * 20 < self.offered
    }
}

/// One simulated peer: its protocol core and what it is waiting for.
struct Peer {
    device: Device,
    id: PeerId,
    /// Initiations written so far: the protocol clock of the peer.
    step: u32,
    /// Our index of the outstanding initiation.
    index: Option<u32>,
}

/// Shared between the protocol thread and the sender.
struct Outbox {
    /// Per peer: the next initiation, written and waiting for its round.
    ready: Vec<Option<[u8; INITIATION_LEN]>>,
    /// Per peer: when the outstanding initiation went out (None: answered,
    /// given up, or nothing sent yet).
    sent_at: Vec<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Counters {
    completed: u64,
    responses: u64,
    cookie_replies: u64,
    cookies_accepted: u64,
    refused: u64,
    unanswered: u64,
}

/// The protocol clock: each initiation of a peer is "6 s later" than its
/// last (past REKEY_TIMEOUT, so the core allows it) and 100 ms later on the
/// wall clock (the gateway wants each peer's timestamps to grow). A stored
/// cookie is fresh for 120 s of that clock, so it serves 20 initiations; then
/// the peer sends one without MAC2 and, if the gateway is still under load,
/// gets a new cookie.
struct Clock {
    t0: Instant,
    w0: SystemTime,
}

impl Clock {
    fn at(&self, step: u32) -> (Instant, SystemTime) {
        (self.t0 + Duration::from_secs(6) * step, self.w0 + Duration::from_millis(100) * step)
    }
}

/// Writes `peer`'s next initiation; None if its core would not.
fn next_initiation(peer: &mut Peer, clock: &Clock, out: &mut [u8]) -> Option<[u8; INITIATION_LEN]> {
    peer.step += 1;
    let (now, wall) = clock.at(peer.step);
    peer.device.initiate(peer.id);
    let mut init = None;
    // Drain everything the core wants to send (e.g. the keepalive that would
    // confirm the last session: not sent, as a reconnecting peer would not).
    while let Some(t) = peer.device.poll_transmit(now, wall, out) {
        if init.is_none() && t.len == INITIATION_LEN && out[0] == 1 {
            init = out[..INITIATION_LEN].try_into().ok();
        }
    }
    init
}

/// Reads replies and writes initiations until `stop`; see the module text.
fn follow(
    mut peers: Vec<Peer>,
    socket: &UdpSocket,
    gateway: SocketAddr,
    clock: &Clock,
    outbox: &Mutex<Outbox>,
    stop: &AtomicBool,
) -> Counters {
    pin_current_thread(GENERATOR_CPU);
    socket.set_nonblocking(true).expect("non-blocking");
    let mut c = Counters::default();
    let mut by_index: HashMap<u32, usize> = HashMap::new();
    let mut pending: VecDeque<usize> = (0..peers.len()).collect();
    let mut queued = vec![true; peers.len()];
    let mut buf = [0u8; 256];
    let mut out = vec![0u8; 2048];
    let mut last_scan = Instant::now();
    while !stop.load(Relaxed) {
        // Replies first: the sooner a peer has its answer, the sooner its
        // next initiation is ready.
        let mut got = 0;
        while got < 32 {
            let Ok(n) = socket.recv(&mut buf) else { break };
            got += 1;
            let receiver = match (n, buf[0]) {
                (RESPONSE_LEN, 2) => {
                    c.responses += 1;
                    u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"))
                }
                (COOKIE_REPLY_LEN, 3) => {
                    c.cookie_replies += 1;
                    u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"))
                }
                _ => continue,
            };
            let Some(&p) = by_index.get(&receiver) else {
                c.refused += 1;
                continue;
            };
            let peer = &mut peers[p];
            let (now, wall) = clock.at(peer.step);
            match peer.device.receive(gateway, &mut buf[..n], false, now, wall, &mut out) {
                Ok(_) => {
                    if n == RESPONSE_LEN {
                        c.completed += 1;
                    } else {
                        c.cookies_accepted += 1;
                    }
                    by_index.remove(&receiver);
                    peer.index = None;
                    outbox.lock().expect("outbox").sent_at[p] = None;
                    if !queued[p] {
                        queued[p] = true;
                        pending.push_back(p);
                    }
                }
                Err(_) => c.refused += 1,
            }
        }
        // Initiations nobody answered: give up on them (a real peer would
        // retry after REKEY_TIMEOUT; these reconnect every round).
        if last_scan.elapsed() >= Duration::from_millis(5) {
            last_scan = Instant::now();
            let mut o = outbox.lock().expect("outbox");
            for (p, sent) in o.sent_at.iter_mut().enumerate() {
                if sent.is_some_and(|t| t.elapsed() >= ANSWER_TIMEOUT) {
                    *sent = None;
                    c.unanswered += 1;
                    if !queued[p] {
                        queued[p] = true;
                        pending.push_back(p);
                    }
                }
            }
        }
        // Then a few initiations (Diffie-Hellman each).
        for _ in 0..4 {
            let Some(p) = pending.pop_front() else { break };
            queued[p] = false;
            let peer = &mut peers[p];
            if let Some(old) = peer.index.take() {
                by_index.remove(&old);
            }
            if let Some(init) = next_initiation(peer, clock, &mut out) {
                let index = u32::from_le_bytes(init[4..8].try_into().expect("4 bytes"));
                peer.index = Some(index);
                by_index.insert(index, p);
                outbox.lock().expect("outbox").ready[p] = Some(init);
            }
        }
        if got == 0 && pending.is_empty() {
            let mut fd = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut fd, 1, 1) };
        }
    }
    c
}

/// A socket receive buffer for a whole round of replies, whatever the
/// system default (root may exceed rmem_max).
fn large_receive_buffer(socket: &UdpSocket) {
    let size: libc::c_int = 8 << 20;
    // SAFETY: `size` is a valid c_int for the length given; the fd is open.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
}

fn peer_devices(keys: &[PrivateKey], gateway: PublicKey, to: SocketAddr, t0: Instant) -> Vec<Peer> {
    keys.iter()
        .map(|k| {
            let mut device = Device::new(k.clone(), AeadBackend::Ring, 8, t0);
            let cfg =
                PeerConfig { public_key: gateway, preshared_key: PresharedKey::default(), persistent_keepalive: None };
            let id = device.add_peer(cfg, Some(to), &[]).expect("peer");
            Peer { device, id, step: 0, index: None }
        })
        .collect()
}

pub fn measure(kind: Kind, wgxdp: &Path, object: &[u8], seconds: u32) -> Handshakes {
    let topo = SiteTopology::new("hs");
    let tunnel_key = PrivateKey::generate();
    let keys: Vec<PrivateKey> = (0..PEERS).map(|_| PrivateKey::generate()).collect();
    let mut peers = vec![(tunnel_key.public_key(), "10.200.0.0/24".to_owned())];
    peers.extend(
        keys.iter().enumerate().map(|(i, k)| (k.public_key(), format!("10.201.{}.{}/32", i / 250, i % 250 + 1))),
    );
    let (gateway, gateway_key) = capacity::start_gateway(kind, wgxdp, &topo, &peers);
    let gateway_addr: SocketAddr = format!("{GATEWAY_WAN}:{LISTEN_PORT}").parse().expect("addr");
    let generator: SocketAddrV4 = GENERATOR.parse().expect("addr");

    // The established tunnel and its paced data, framed ahead of time.
    let mut session = ClientSession::connect(&topo.client, tunnel_key, generator, gateway_addr, gateway_key);
    let wan = Framing {
        src_mac: mac_of(&topo.client, &topo.client_if),
        dst_mac: mac_of(&topo.gateway, &topo.gateway_wan),
        src: generator,
        dst: SocketAddrV4::new(GATEWAY_WAN.parse().expect("ip"), LISTEN_PORT),
    };
    let inner = inner_packet(64, TUNNEL_SRC.parse().expect("ip"), LAN_HOST.parse().expect("ip"), SINK_PORT);
    let data = session.encrypt_ring(&inner, DATA_PER_SECOND * seconds as usize, &wan);
    let sink = Sink::attach(&topo.lan, &topo.lan_if, object.to_vec(), SINK_PORT, 0);
    let data_socket = PacketSocket::open(&topo.client, &topo.client_if);

    let rounds = (Duration::from_secs(u64::from(seconds)).as_millis() / ROUND.as_millis()) as usize;
    println!(
        "   {}: {PEERS} peers, one initiation each per {} ms round, over {seconds} s…",
        kind.name(),
        ROUND.as_millis()
    );
    let clock = Clock { t0: Instant::now(), w0: SystemTime::now() };
    let devices = peer_devices(&keys, gateway_key, gateway_addr, clock.t0);
    let socket: UdpSocket = topo.client.udp_socket("10.100.0.2:0");
    large_receive_buffer(&socket);
    let outbox = Mutex::new(Outbox { ready: vec![None; PEERS], sent_at: vec![None; PEERS] });
    let stop = AtomicBool::new(false);
    let before = sink.packets();
    let (counters, offered, with_mac2, missed, sent_data, elapsed, start) = std::thread::scope(|s| {
        let protocol = {
            let (socket, clock, outbox, stop) = (socket.try_clone().expect("clone"), &clock, &outbox, &stop);
            s.spawn(move || follow(devices, &socket, gateway_addr, clock, outbox, stop))
        };
        let sender = s.spawn(|| {
            pin_current_thread(GENERATOR_CPU);
            // The first round's initiations are written before the clock starts.
            let deadline = Instant::now() + Duration::from_secs(10);
            while outbox.lock().expect("outbox").ready.iter().any(Option::is_none) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let start = Instant::now();
            let (mut offered, mut with_mac2, mut missed, mut sent_data) = (0u64, 0u64, 0u64, 0usize);
            // Peer p's turn in round r is at (r * PEERS + p) slots from the
            // start: the peers spread over the round, so their answers, time-outs
            // and next initiations are spread too. Sent a millisecond's worth at a time.
            let slot = ROUND.as_nanos() / PEERS as u128;
            let slots = rounds * PEERS;
            let mut batch = Vec::with_capacity(PEERS);
            let (mut next_slot, mut tick) = (0usize, 0u32);
            while next_slot < slots {
                let due = ((start.elapsed().as_nanos() / slot) as usize + 1).min(slots);
                batch.clear();
                {
                    let mut o = outbox.lock().expect("outbox");
                    let now = Instant::now();
                    for p in (next_slot..due).map(|k| k % PEERS) {
                        match o.ready[p].take() {
                            Some(m) => {
                                o.sent_at[p] = Some(now);
                                batch.push(m);
                            }
                            None => missed += 1,
                        }
                    }
                }
                next_slot = due;
                for m in &batch {
                    let _ = socket.send_to(m, gateway_addr);
                    offered += 1;
                    with_mac2 += u64::from(m[MAC2].iter().any(|&b| b != 0));
                }
                // The tunnel's data, paced the same way.
                let due = ((start.elapsed().as_secs_f64() * DATA_PER_SECOND as f64) as usize).min(data.len());
                if due > sent_data {
                    sent_data += data_socket.send(&data, sent_data..due);
                }
                tick += 1;
                if let Some(wait) = (start + TICK * tick).checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (offered, with_mac2, missed, sent_data, start.elapsed().as_secs_f64(), start)
        });
        let (offered, with_mac2, missed, sent_data, elapsed, start) = sender.join().expect("sender");
        // Late answers still count.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Relaxed);
        let counters = protocol.join().expect("protocol thread");
        (counters, offered, with_mac2, missed, sent_data, elapsed, start)
    });
    let (delivered, _) = capacity::drain(&sink, start, before);
    drop(gateway);
    Handshakes {
        offered,
        offered_per_s: offered as f64 / elapsed,
        with_mac2_per_s: with_mac2 as f64 / elapsed,
        completed_per_s: counters.completed as f64 / elapsed,
        responses_per_s: counters.responses as f64 / elapsed,
        cookie_replies_per_s: counters.cookie_replies as f64 / elapsed,
        cookies_accepted: counters.cookies_accepted,
        refused: counters.refused,
        unanswered: counters.unanswered,
        generator_missed: missed,
        peer_rounds: (rounds * PEERS) as u64,
        tunnel_sent: sent_data as u64,
        tunnel_delivered: delivered,
    }
}
