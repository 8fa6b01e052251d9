//! `worker_loop`: the per-queue worker (`Worker::process_batch`) over in-memory
//! frame queues (`testing::MemoryWorker`): arbitrary frames on the WAN and the
//! LAN, arbitrary under-load state, arbitrary clock steps. The control side
//! runs as the control thread runs it: the gateway `Device` serves the
//! handshake jobs the worker queued, ticks and transmits; the client `Device`
//! answers what the worker and the gateway send it (cookie replies,
//! responses, keepalives), so sessions are re-established after rekeys and
//! expiry. The client's site gets arbitrary forwarding policies (firewall
//! rules, default deny, the gateway host's addresses) between packets.

use crate::{clock_step, ipv4_with_payload, records};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::device::Action;
use wgxdp_dataplane::frame::parse_udp_frame;
use wgxdp_dataplane::frame_io::{MemoryFrame, Port};
use wgxdp_dataplane::noise::cookie::{CookieJar, MacKeys};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::peer_view::monotonic_nanos;
use wgxdp_dataplane::policy::{FirewallRule, ForwardingPolicy, PortRange, RuleAction, RuleProtocol};
use wgxdp_dataplane::table::IpPrefix;
use wgxdp_dataplane::testing::{MemoryWorker, CLIENT_ADDR, CLIENT_TUNNEL, GATEWAY_ADDR, LAN_HOST, MEMORY_FRAMES};
use wgxdp_dataplane::wire::{HANDSHAKE_INITIATION_LEN, HANDSHAKE_RESPONSE_LEN};
use wgxdp_dataplane::worker::ControlEvent;

pub mod op {
    /// `bytes` is a whole frame arriving on the WAN.
    pub const WAN_FRAME: u8 = 0;
    /// `bytes` is a UDP payload from the client, framed as on the WAN
    /// (`flag::STAMP_MAC1` stamps a valid MAC1 on a 148- or 92-byte one).
    pub const WAN_DATAGRAM: u8 = 1;
    /// The client sends a packet carrying `bytes` (`flag::RAW`: `bytes` is the
    /// inner packet) through the tunnel; `flag::MUTATE` flips a bit of the frame.
    pub const CLIENT_DATA: u8 = 2;
    /// `bytes` is a whole frame arriving on the LAN (`flag::RAW`), else an IPv4
    /// packet from the LAN host to the client carrying `bytes`.
    pub const LAN: u8 = 3;
    /// The clock moves on by `clock_step(bytes)`; `flag::UNDER_LOAD` sets the
    /// worker's under-load deadline a second ahead (else clears it); the control
    /// side and the client run.
    pub const CLOCK: u8 = 4;
    /// The client's site gets the forwarding policy `policy_from(bytes)`.
    pub const POLICY: u8 = 5;
    pub const OPS: u8 = 6;
}

pub mod flag {
    pub const STAMP_MAC1: u8 = 1;
    pub const RAW: u8 = 2;
    pub const MUTATE: u8 = 4;
    pub const UNDER_LOAD: u8 = 8;
}

struct Sim {
    m: MemoryWorker,
    batch: Vec<MemoryFrame>,
    gateway_macs: MacKeys,
    now: Instant,
    wall: SystemTime,
    out: Vec<u8>,
}

fn gateway_addr() -> SocketAddr {
    GATEWAY_ADDR.parse().expect("addr")
}

impl Sim {
    /// Queues a frame as received on `port`.
    fn inject(&mut self, port: Port, frame: &[u8]) {
        let _ = self.m.worker.frames_mut().inject(port, frame);
    }

    /// The worker runs until idle; what it sent on the WAN reaches the client.
    fn run(&mut self) {
        self.m.run_until_idle(&mut self.batch, self.now);
        let mut to_client = Vec::new();
        let frames = self.m.worker.frames_mut();
        frames.take_sent(Port::Wan, |f| {
            if let Ok(u) = parse_udp_frame(f) {
                to_client.push(f[u.payload].to_vec());
            }
        });
        frames.take_sent(Port::Lan, |_| {});
        for mut d in to_client {
            self.deliver_to_client(&mut d);
        }
    }

    fn deliver_to_client(&mut self, d: &mut [u8]) {
        let _ = self.m.client.receive(gateway_addr(), d, false, self.now, self.wall, &mut self.out);
    }

    /// A datagram from the client, framed and queued on the WAN.
    fn send_from_client(&mut self, payload: &[u8]) {
        let frame = self.m.frame_payload(payload);
        self.inject(Port::Wan, &frame);
    }

    /// What the control thread does per iteration, then the client's turn.
    fn control(&mut self) {
        let mut to_client = Vec::new();
        let (jobs, events, gateway) = self.m.control_side();
        let (now, wall) = (self.now, self.wall);
        while let Ok(mut job) = jobs.try_recv() {
            let len = job.len.min(job.bytes.len());
            if let Ok(Action::Send { to, bytes }) =
                gateway.receive_from(job.from, &mut job.bytes[..len], false, now, wall, &mut self.out)
            {
                to_client.extend((to.to_string() == CLIENT_ADDR).then(|| bytes.to_vec()));
            }
        }
        while let Ok(event) = events.try_recv() {
            match event {
                ControlEvent::Stage { peer, packet } => gateway.stage(peer, packet, now, wall),
                ControlEvent::Exec(f) => f(gateway),
            }
        }
        gateway.tick_at(now, wall);
        while let Some(t) = gateway.poll_transmit(now, wall, &mut self.out) {
            to_client.extend((t.to.to_string() == CLIENT_ADDR).then(|| self.out[..t.len].to_vec()));
        }
        for mut d in to_client {
            self.deliver_to_client(&mut d);
        }
        self.m.client.tick_at(now, wall);
        let mut from_client = Vec::new();
        while let Some(t) = self.m.client.poll_transmit(now, wall, &mut self.out) {
            from_client.push(self.out[..t.len].to_vec());
        }
        for d in from_client {
            self.send_from_client(&d);
        }
    }
}

/// A forwarding policy from bytes: byte 0 says default deny (bit 0), the
/// gateway's LAN address 10.0.1.1 is a host address (bit 1), no local
/// networks at all (bit 2); then one rule per 6 bytes: protocol, action,
/// first and last port, destination and source prefix lengths (inside the
/// local network and the client's tunnel network).
pub fn policy_from(bytes: &[u8]) -> (ForwardingPolicy, bool) {
    let flags = bytes.first().copied().unwrap_or(0);
    let protocols = [RuleProtocol::Tcp, RuleProtocol::Udp, RuleProtocol::Icmp, RuleProtocol::Any];
    let rules = bytes
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(6)
        .enumerate()
        .map(|(i, r)| {
            let protocol = protocols[usize::from(r[0] % 4)];
            let (first, last) = (u16::from(r[2]).max(1), u16::from(r[2]).max(1) + u16::from(r[3]));
            let prefix = |base: [u8; 4], len: u8| IpPrefix::new(IpAddr::from(base), 24 + len % 9).ok();
            FirewallRule {
                name: format!("rule {i}"),
                protocol,
                ports: (protocol.has_ports() && r[1] & 2 != 0).then_some(PortRange { first, last }),
                source: (r[5] & 0x80 != 0).then(|| prefix(CLIENT_TUNNEL, r[5])).flatten(),
                destination: (r[4] & 0x80 != 0).then(|| prefix(LAN_HOST, r[4])).flatten(),
                action: if r[1] & 1 != 0 { RuleAction::Deny } else { RuleAction::Allow },
            }
        })
        .collect();
    let local_networks = if flags & 4 != 0 { vec![] } else { vec!["10.0.1.0/24".parse().expect("prefix")] };
    let default_action = if flags & 1 != 0 { RuleAction::Deny } else { RuleAction::Allow };
    (ForwardingPolicy { local_networks, rules, default_action }, flags & 2 != 0)
}

pub fn worker_loop(data: &[u8]) {
    run(data);
}

/// Runs `data` and returns the worker (for tests that check how deep seeds reach).
pub fn run(data: &[u8]) -> MemoryWorker {
    // Inputs of odd length run with the AEAD on two crypto threads (the worker
    // and a helper, `crypto_pool.rs`): both paths production runs.
    let crypto_threads = 1 + data.len() % 2;
    let mut m = MemoryWorker::with_crypto_threads(AeadBackend::Ring, crypto_threads);
    let gateway_macs = MacKeys::new(&m.control_side().2.public_key());
    let mut s =
        Sim { m, batch: Vec::new(), gateway_macs, now: Instant::now(), wall: SystemTime::now(), out: vec![0u8; 2048] };
    for r in records(data) {
        match r.op % op::OPS {
            op::WAN_FRAME => {
                s.inject(Port::Wan, r.bytes);
            }
            op::WAN_DATAGRAM => {
                let mut d = r.bytes.to_vec();
                if r.flags & flag::STAMP_MAC1 != 0
                    && matches!(d.len(), HANDSHAKE_INITIATION_LEN | HANDSHAKE_RESPONSE_LEN)
                {
                    CookieJar::default().stamp(&s.gateway_macs, &mut d, s.now);
                }
                s.send_from_client(&d);
            }
            op::CLIENT_DATA => {
                let inner = if r.flags & flag::RAW != 0 {
                    r.bytes.to_vec()
                } else {
                    ipv4_with_payload(CLIENT_TUNNEL, LAN_HOST, r.bytes)
                };
                let sent = match s.m.client.send(&inner, s.now, s.wall, &mut s.out) {
                    Ok(Action::Send { bytes, .. }) => Some(bytes.to_vec()),
                    _ => None,
                };
                if let Some(d) = sent {
                    let mut frame = s.m.frame_payload(&d);
                    if r.flags & flag::MUTATE != 0 {
                        let at = r.bytes.first().map_or(0, |&b| usize::from(b)) % frame.len();
                        frame[at] ^= 1 << (r.flags >> 5);
                    }
                    s.inject(Port::Wan, &frame);
                }
            }
            op::LAN => {
                let frame = if r.flags & flag::RAW != 0 {
                    r.bytes.to_vec()
                } else {
                    MemoryWorker::lan_frame(&ipv4_with_payload(LAN_HOST, CLIENT_TUNNEL, r.bytes))
                };
                s.inject(Port::Lan, &frame);
            }
            op::POLICY => {
                let (policy, host) = policy_from(r.bytes);
                s.m.set_policy(policy);
                let hosts = if host { vec![IpAddr::from([10, 0, 1, 1])] } else { vec![] };
                s.m.shared.host_addresses.replace(hosts);
            }
            _ => {
                let step = clock_step(r.bytes);
                s.now += step;
                s.wall += step;
                let until =
                    if r.flags & flag::UNDER_LOAD != 0 { monotonic_nanos(s.now + Duration::from_secs(1)) } else { 0 };
                s.m.shared.under_load_until.store(until, Relaxed);
                s.control();
            }
        }
        s.run();
        // Whatever came in and whatever went out (on either port, from the
        // frame it arrived in or a new one), every frame is back in the pool.
        let free = s.m.worker.frames_mut().free_frames();
        assert_eq!(free, MEMORY_FRAMES, "frames leaked");
    }
    s.m
}
