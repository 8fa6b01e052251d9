//! Equal-load CPU cost: every gateway gets the same, modest packet rate (paced
//! `sendmmsg` batches from the generator core, one batch a millisecond on
//! average), low enough that each delivers all of it, and the whole machine's
//! CPU time is read from /proc/stat over a fixed window. A baseline run with
//! the same generator and rate, whose packets are dropped by XDP on the
//! gateway-side veth with no gateway at all, is subtracted; what remains,
//! divided by the packets delivered, is what forwarding one packet through
//! that gateway costs in CPU nanoseconds, wherever it ran (on veth, the
//! receiver's XDP and copy-mode AF_XDP run on the sender's core, so a
//! throughput figure alone cannot tell where the time went).
//!
//! Two corrections make that hold on a shared VM:
//! - busy time is all CPUs × the window less idle and iowait, which the
//!   kernel clocks exactly; the user/system/softirq fields are tick samples
//!   that a 1 ms-paced load aliases with (kept in the JSON as a diagnostic);
//! - other processes' CPU time in the window (their own and their reaped
//!   children's, so a compiler that starts and ends inside it counts) is taken
//!   out: this benchmark's process, the gateway and kernel threads stay in.
//!
//! The gateway process's threads are read over the same window: exact run
//! time from /proc/<pid>/task/*/schedstat, split into user and system time by
//! the tick-sampled /proc/<pid>/task/*/stat (hence the random gaps between
//! the generator's batches). For wgxdp, the worker threads' (`wgxdp-q*`) user
//! time is the worker, their system time the syscalls (and the kernel work
//! done inside them); its other threads are counted apart; the rest above the
//! baseline is kernel work (softirq: XDP, copy-mode AF_XDP, veth), mostly on
//! the sender's core.

use crate::capacity::{self, Kind, Running, GENERATOR, GENERATOR_CPU, SINK_PORT, SIZES, TUNNEL_SRC};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::session::sealed_len;
use wgxdp_dataplane::noise::PrivateKey;
use wgxdp_integration::blast::{
    inner_packet, mac_of, pin_current_thread, ClientSession, FrameRing, Framing, PacketSocket, Sink,
};
use wgxdp_integration::site::{SiteTopology, GATEWAY_WAN, LAN_HOST, LISTEN_PORT};

/// A run losing more than this share of what was sent does not count.
pub const MAX_LOSS: f64 = 0.001;
/// Generator time before the window opens (the gateway resolves neighbours,
/// caches warm up).
const WARMUP: Duration = Duration::from_millis(500);
/// Generator time after the window closes.
const TAIL: Duration = Duration::from_millis(100);
/// The generator's mean pacing period: one `sendmmsg` batch per tick.
const TICK: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Packets per second, by size (SIZES order).
    pub rates: [u32; 2],
    pub seconds: f64,
    pub runs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// client → WAN → gateway → LAN sink.
    Decrypt,
    /// LAN host → gateway → WAN sink.
    Encrypt,
}

pub const DIRECTIONS: [Direction; 2] = [Direction::Decrypt, Direction::Encrypt];

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Decrypt => "decrypt + forward",
            Direction::Encrypt => "encrypt + forward",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Direction::Decrypt => "decrypt",
            Direction::Encrypt => "encrypt",
        }
    }
}

/// Whole-machine CPU counters from /proc/stat (clock ticks).
///
/// Busy time is what idle and iowait leave of the window: those two come
/// from the kernel's idle clock (exact, the idle period under way included),
/// while user/system/softirq are sampled by the scheduler tick, which a
/// workload paced by a 1 ms timer aliases with (a 5 s window then reads 1 %
/// or 90 % of a core for the same work). The sampled sum is kept to show it.
#[derive(Debug, Clone, Copy, Default)]
struct MachineCpu {
    idle: u64,
    /// user + nice + system + irq + softirq, as sampled by the tick.
    sampled_busy: u64,
    /// Time the hypervisor ran something else (not ours; not in busy).
    steal: u64,
    cpus: usize,
}

fn machine_cpu() -> MachineCpu {
    let text = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let line = text.lines().find(|l| l.starts_with("cpu ")).expect("the cpu line of /proc/stat");
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal guest guest_nice; guest
    // time is already inside user (and guest_nice inside nice).
    MachineCpu {
        idle: at(3) + at(4),
        sampled_busy: at(0) + at(1) + at(2) + at(5) + at(6),
        steal: at(7),
        cpus: text.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count().max(1),
    }
}

/// CPU time (clock ticks) of every process on the machine but `ours` and
/// kernel threads (which may be doing our work: ksoftirqd): its own user and
/// system time plus its reaped children's, so that processes started and
/// ended inside a window (a compiler run) are counted too, in their parent.
fn other_processes(ours: &[u32]) -> u64 {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    let mut sum = 0;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if ours.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        // Fields from state (3): flags is 9, utime 14, stime 15, cutime 16, cstime 17.
        let f: Vec<u64> = rest.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
        let at = |field: usize| f.get(field - 4).copied().unwrap_or(0);
        if at(9) & PF_KTHREAD != 0 {
            continue;
        }
        sum += at(14) + at(15) + at(16) + at(17);
    }
    sum
}

/// (utime, stime) in clock ticks from a /proc/…/stat line.
fn stat_times(stat: &str) -> Option<(u64, u64)> {
    // Fields after the command name (in parentheses, which may hold spaces):
    // state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// One thread's CPU: its exact run time (ns, /proc/…/schedstat) and its
/// tick-sampled user and system time (clock ticks), which only split it.
#[derive(Debug, Clone, Default)]
struct ThreadCpu {
    name: String,
    runtime_ns: u64,
    utime: u64,
    stime: u64,
}

/// Each live thread of `pid` by tid.
fn thread_times(pid: u32) -> HashMap<u32, ThreadCpu> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_owned();
        let runtime_ns = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        if let Some((utime, stime)) = std::fs::read_to_string(e.path().join("stat")).ok().and_then(|s| stat_times(&s)) {
            out.insert(tid, ThreadCpu { name, runtime_ns, utime, stime });
        }
    }
    out
}

fn ticks_to_ns(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1e9 / hz
}

/// Everything read at one edge of the window.
#[derive(Debug, Clone)]
struct Snapshot {
    at: Instant,
    machine: MachineCpu,
    others: u64,
    threads: HashMap<u32, ThreadCpu>,
    sent: u64,
    delivered: u64,
}

fn snapshot(gateway: Option<u32>, sent: &AtomicU64, sink: &Sink) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        machine: machine_cpu(),
        others: other_processes(&[std::process::id(), gateway.unwrap_or(0)]),
        threads: gateway.map(thread_times).unwrap_or_default(),
        sent: sent.load(Relaxed),
        delivered: sink.packets(),
    }
}

/// One measured run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub window_s: f64,
    /// From the window's start to the end of the run (after the sink drained).
    pub sent: u64,
    pub delivered: u64,
    /// Frames the kernel refused to take from the generator.
    pub refused: u64,
    /// Delivered inside the window (the CPU cost's denominator).
    pub delivered_in_window: u64,
    /// Whole machine (all CPUs, less idle and iowait), ns of CPU per second of window.
    pub busy_ns_per_s: f64,
    /// The same from the tick-sampled counters (diagnostic only).
    pub sampled_busy_ns_per_s: f64,
    /// CPU time of processes other than this one and the gateway (kernel
    /// threads aside), ns/s: unrelated load on a shared machine, taken out
    /// of `busy_ns_per_s` (see `ours_ns_per_s`).
    pub unrelated_ns_per_s: f64,
    /// Steal time (the hypervisor ran something else), ns/s.
    pub steal_ns_per_s: f64,
    /// The gateway's threads, ns/s: workers (`wgxdp-q*`; every thread of a
    /// userspace gateway) and the rest.
    pub worker_user_ns_per_s: f64,
    pub worker_sys_ns_per_s: f64,
    pub other_threads_ns_per_s: f64,
}

impl Run {
    /// The machine's CPU time less unrelated processes': this benchmark's
    /// generator, the gateway, and the kernel's work, ns/s.
    pub fn ours_ns_per_s(&self) -> f64 {
        self.busy_ns_per_s - self.unrelated_ns_per_s
    }

    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        (1.0 - self.delivered as f64 / self.sent as f64).max(0.0)
    }

    /// Lost no more than MAX_LOSS.
    pub fn valid(&self) -> bool {
        self.sent > 0 && self.loss() <= MAX_LOSS
    }

    pub fn delivered_pps(&self) -> f64 {
        self.delivered_in_window as f64 / self.window_s.max(1e-9)
    }
}

/// The generator: `ring`'s frames at `rate` per second for `total`, from
/// the generator core, in batches a TICK apart on average. The gaps are
/// drawn at random (uniform, 0–2 TICKs): batches in lockstep with the
/// scheduler tick would alias with its sampling of user and system time.
/// The rate is kept exactly (each batch is what is due by then). Cycles
/// through the ring when `cycle` (plain packets), else stops at its end
/// (each transport packet carries its own counter). `sent` counts frames
/// offered, `refused` the ones the kernel did not take.
fn pace(
    socket: &PacketSocket,
    ring: &FrameRing,
    rate: u32,
    total: Duration,
    cycle: bool,
    sent: &AtomicU64,
    refused: &AtomicU64,
) {
    pin_current_thread(GENERATOR_CPU);
    let start = Instant::now();
    let mut offered = 0u64;
    let mut next = 0usize;
    let mut next_batch = start;
    // xorshift64*, seeded from the clock.
    let mut seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    let mut random = move || {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    while start.elapsed() < total {
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while offered < due {
            if next == ring.len() {
                if !cycle {
                    return;
                }
                next = 0;
            }
            let n = ((due - offered) as usize).min(ring.len() - next);
            let took = socket.send(ring, next..next + n);
            refused.fetch_add((n - took) as u64, Relaxed);
            offered += n as u64;
            next += n;
            sent.store(offered, Relaxed);
        }
        next_batch += TICK.mul_f64(2.0 * random());
        if let Some(wait) = next_batch.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// One run: the generator for WARMUP + window + TAIL, the counters read at
/// the window's edges, then the sink drained.
fn run_once(
    socket: &PacketSocket,
    ring: &FrameRing,
    cycle: bool,
    o: &Options,
    rate: u32,
    sink: &Sink,
    gateway: Option<(Kind, u32)>,
) -> Run {
    let (kind, gateway) = (gateway.map(|g| g.0), gateway.map(|g| g.1));
    let sent = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let window = Duration::from_secs_f64(o.seconds);
    let done = AtomicBool::new(false);
    let (a, b) = std::thread::scope(|s| {
        s.spawn(|| {
            pace(socket, ring, rate, WARMUP + window + TAIL, cycle, &sent, &refused);
            done.store(true, Relaxed);
        });
        std::thread::sleep(WARMUP);
        let a = snapshot(gateway, &sent, sink);
        std::thread::sleep(window);
        let b = snapshot(gateway, &sent, sink);
        (a, b)
    });
    assert!(done.load(Relaxed), "the generator thread did not finish");
    let (delivered_total, _) = capacity::drain(sink, a.at, a.delivered);
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let per_s = |ticks: u64| ticks_to_ns(ticks) / secs;
    let (mut wu, mut ws, mut other) = (0.0, 0.0, 0.0);
    for (tid, t) in &b.threads {
        let t0 = a.threads.get(tid).cloned().unwrap_or_default();
        let run = t.runtime_ns.saturating_sub(t0.runtime_ns) as f64;
        let (du, ds) = (t.utime.saturating_sub(t0.utime), t.stime.saturating_sub(t0.stime));
        // The sampled split of the exact run time (the thread's whole life
        // when no tick landed in the window).
        let user_share = match (du + ds, t.utime + t.stime) {
            (0, 0) => 0.0,
            (0, all) => t.utime as f64 / all as f64,
            (window, _) => du as f64 / window as f64,
        };
        // wgxdp's packet workers; a userspace gateway's threads all are.
        let worker = match kind {
            Some(Kind::Wgxdp | Kind::WgxdpBusyPoll) => t.name.starts_with("wgxdp-q"),
            _ => true,
        };
        if worker {
            wu += run * user_share;
            ws += run * (1.0 - user_share);
        } else {
            other += run;
        }
    }
    let cpus = b.machine.cpus as f64;
    let idle_ns = ticks_to_ns(b.machine.idle.saturating_sub(a.machine.idle));
    Run {
        window_s: secs,
        sent: sent.load(Relaxed) - a.sent,
        delivered: delivered_total,
        refused: refused.load(Relaxed),
        delivered_in_window: b.delivered - a.delivered,
        busy_ns_per_s: (cpus * secs * 1e9 - idle_ns).max(0.0) / secs,
        sampled_busy_ns_per_s: per_s(b.machine.sampled_busy.saturating_sub(a.machine.sampled_busy)),
        unrelated_ns_per_s: per_s(b.others.saturating_sub(a.others)),
        steal_ns_per_s: per_s(b.machine.steal.saturating_sub(a.machine.steal)),
        worker_user_ns_per_s: wu / secs,
        worker_sys_ns_per_s: ws / secs,
        other_threads_ns_per_s: other / secs,
    }
}

/// Every run of one (gateway or baseline, direction, size).
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub offered_pps: u32,
    pub runs: Vec<Run>,
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A baseline series' CPU, ns/s, medians over its runs.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    /// Whole machine less unrelated processes (what gateway runs are compared with).
    pub ours: f64,
    /// Whole machine, as /proc/stat says.
    pub whole: f64,
    pub delivered_pps: f64,
}

/// A series' figures after the baseline is subtracted.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// CPU ns per delivered packet: median, min, max over the valid runs
    /// (over all runs when none is valid).
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The same from the raw whole-machine counters (unrelated load left in).
    pub whole_machine_median: f64,
    /// Every run lost no more than MAX_LOSS.
    pub valid: bool,
    pub worst_loss: f64,
    /// Medians, ns per delivered packet.
    pub worker_user: f64,
    pub worker_sys: f64,
    pub other_threads: f64,
    /// Ours − baseline − the gateway process: kernel work.
    pub kernel: f64,
    /// Unrelated processes' CPU during the window (taken out), ns per packet.
    pub unrelated: f64,
}

impl Series {
    fn usable(&self) -> Vec<&Run> {
        let valid: Vec<&Run> = self.runs.iter().filter(|r| r.valid()).collect();
        if valid.is_empty() {
            self.runs.iter().collect()
        } else {
            valid
        }
    }

    /// This series as a baseline (its valid runs; all when none is).
    pub fn baseline(&self) -> Baseline {
        let runs = self.usable();
        let m = |f: fn(&Run) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
        Baseline { ours: m(Run::ours_ns_per_s), whole: m(|r| r.busy_ns_per_s), delivered_pps: m(Run::delivered_pps) }
    }

    pub fn cost(&self, base: &Baseline) -> Cost {
        let runs = self.usable();
        let per_packet =
            |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { runs.iter().map(|r| f(r) / r.delivered_pps().max(1e-9)).collect() };
        let total = per_packet(&|r| r.ours_ns_per_s() - base.ours);
        let process = |r: &Run| r.worker_user_ns_per_s + r.worker_sys_ns_per_s + r.other_threads_ns_per_s;
        Cost {
            median: median(&total),
            min: total.iter().copied().fold(f64::INFINITY, f64::min),
            max: total.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            whole_machine_median: median(&per_packet(&|r| r.busy_ns_per_s - base.whole)),
            valid: !self.runs.is_empty() && self.runs.iter().all(Run::valid),
            worst_loss: self.runs.iter().map(Run::loss).fold(0.0, f64::max),
            worker_user: median(&per_packet(&|r| r.worker_user_ns_per_s)),
            worker_sys: median(&per_packet(&|r| r.worker_sys_ns_per_s)),
            other_threads: median(&per_packet(&|r| r.other_threads_ns_per_s)),
            kernel: median(&per_packet(&|r| r.ours_ns_per_s() - base.ours - process(r))),
            unrelated: median(&per_packet(&|r| r.unrelated_ns_per_s)),
        }
    }

    pub fn json(&self, base: Option<&Baseline>) -> Value {
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|r| {
                let pps = r.delivered_pps().max(1e-9);
                json!({
                    "window_s": r.window_s, "sent": r.sent, "delivered": r.delivered, "refused_by_kernel": r.refused,
                    "loss": r.loss(), "valid": r.valid(), "delivered_in_window": r.delivered_in_window,
                    "whole_machine_ns_per_s": r.busy_ns_per_s, "unrelated_processes_ns_per_s": r.unrelated_ns_per_s,
                    "tick_sampled_busy_ns_per_s": r.sampled_busy_ns_per_s, "steal_ns_per_s": r.steal_ns_per_s,
                    "worker_user_ns_per_s": r.worker_user_ns_per_s, "worker_sys_ns_per_s": r.worker_sys_ns_per_s,
                    "other_threads_ns_per_s": r.other_threads_ns_per_s,
                    "cpu_ns_per_packet": base.map(|b| (r.ours_ns_per_s() - b.ours) / pps),
                    "cpu_ns_per_packet_whole_machine": base.map(|b| (r.busy_ns_per_s - b.whole) / pps),
                })
            })
            .collect();
        let mut v = json!({"offered_pps": self.offered_pps, "runs": runs});
        if let Some(b) = base {
            let c = self.cost(b);
            v["cpu_ns_per_packet"] = json!({"median": c.median, "min": c.min, "max": c.max});
            v["cpu_ns_per_packet_whole_machine_median"] = json!(c.whole_machine_median);
            v["valid"] = json!(c.valid);
            v["worst_loss"] = json!(c.worst_loss);
            v["breakdown_ns_per_packet"] = json!({
                "worker_user": c.worker_user, "worker_sys": c.worker_sys, "other_gateway_threads": c.other_threads,
                "kernel": c.kernel, "unrelated_processes": c.unrelated,
            });
        } else {
            let b = self.baseline();
            v["ours_ns_per_s"] = json!(b.ours);
            v["whole_machine_ns_per_s"] = json!(b.whole);
        }
        v
    }
}

/// By direction (DIRECTIONS order), then size (SIZES order).
pub type Grid = [[Series; 2]; 2];

fn rate(o: &Options, size_index: usize) -> u32 {
    o.rates[size_index]
}

/// Frames for the ring of plain packets the LAN host sends (encrypt direction).
fn plain_ring(topo: &SiteTopology, size: usize) -> FrameRing {
    let lan = Framing {
        src_mac: mac_of(&topo.lan, &topo.lan_if),
        dst_mac: mac_of(&topo.gateway, &topo.gateway_lan),
        src: SocketAddrV4::new(LAN_HOST.parse().expect("ip"), 9998),
        dst: SocketAddrV4::new(TUNNEL_SRC.parse().expect("ip"), SINK_PORT),
    };
    let inner = inner_packet(size, LAN_HOST.parse().expect("ip"), TUNNEL_SRC.parse().expect("ip"), SINK_PORT);
    let mut ring = FrameRing::with_capacity(Framing::frame_len(size - 28), 1024);
    for _ in 0..1024 {
        lan.push(&mut ring, &inner[28..]);
    }
    ring
}

fn wan_framing(topo: &SiteTopology) -> Framing {
    Framing {
        src_mac: mac_of(&topo.client, &topo.client_if),
        dst_mac: mac_of(&topo.gateway, &topo.gateway_wan),
        src: GENERATOR.parse().expect("addr"),
        dst: SocketAddrV4::new(GATEWAY_WAN.parse().expect("ip"), LISTEN_PORT),
    }
}

/// Transport packets (one per frame, increasing counters) for one run.
fn packets_per_run(o: &Options, rate: u32) -> usize {
    (((WARMUP + TAIL).as_secs_f64() + o.seconds) * f64::from(rate) * 1.05) as usize + 1024
}

/// The baseline: no gateway; XDP on the gateway-side veth (WAN when
/// decrypting, LAN when encrypting) counts and drops the generator's frames.
pub fn baseline(o: &Options, object: &[u8]) -> Grid {
    let topo = SiteTopology::new("eb");
    let mut grid = Grid::default();
    for (d, direction) in DIRECTIONS.into_iter().enumerate() {
        for (i, size) in SIZES.into_iter().enumerate() {
            let r = rate(o, i);
            let series = &mut grid[d][i];
            series.offered_pps = r;
            let (sink, socket, ring, cycle) = match direction {
                Direction::Decrypt => {
                    let sink = Sink::attach(&topo.gateway, &topo.gateway_wan, object.to_vec(), LISTEN_PORT, 0);
                    let socket = PacketSocket::open(&topo.client, &topo.client_if);
                    // Transport-sized datagrams: type 4 and the sealed length
                    // the gateway runs get; their content does not matter here.
                    let mut payload = vec![0u8; sealed_len(size)];
                    payload[0] = 4;
                    let framing = wan_framing(&topo);
                    let mut ring = FrameRing::with_capacity(Framing::frame_len(payload.len()), 1024);
                    for _ in 0..1024 {
                        framing.push(&mut ring, &payload);
                    }
                    (sink, socket, ring, true)
                }
                Direction::Encrypt => {
                    let sink = Sink::attach(&topo.gateway, &topo.gateway_lan, object.to_vec(), SINK_PORT, 0);
                    (sink, PacketSocket::open(&topo.lan, &topo.lan_if), plain_ring(&topo, size), true)
                }
            };
            for _ in 0..o.runs {
                let run = run_once(&socket, &ring, cycle, o, r, &sink, None);
                print_run("baseline", direction, size, &run, None);
                series.runs.push(run);
            }
        }
    }
    grid
}

fn print_run(name: &str, direction: Direction, size: usize, run: &Run, base: Option<&Baseline>) {
    let cost = base
        .map(|b| format!(", {:.0} ns/packet", (run.ours_ns_per_s() - b.ours) / run.delivered_pps().max(1e-9)))
        .unwrap_or_default();
    println!(
        "     {name} {} {size:>5} B: sent {}, delivered {} (loss {:.3} %{}), CPU {:.1} % of a core \
         (unrelated processes {:.1} % more){cost}",
        direction.key(),
        run.sent,
        run.delivered,
        run.loss() * 100.0,
        if run.valid() { "" } else { ", INVALID" },
        run.ours_ns_per_s() / 1e7,
        run.unrelated_ns_per_s / 1e7,
    );
}

/// Every run of `kind` at the equal load, both directions and sizes.
pub fn measure(kind: Kind, wgxdp: &Path, object: &[u8], o: &Options, baseline: &Grid) -> Grid {
    let topo = SiteTopology::new("eq");
    let generator_key = PrivateKey::generate();
    let peers = [(generator_key.public_key(), "10.200.0.0/24".to_owned())];
    let (gateway, gateway_key): (Running, _) = capacity::start_gateway(kind, wgxdp, &topo, &peers);
    let pid = gateway.pid();
    let gateway_addr: SocketAddr = format!("{GATEWAY_WAN}:{LISTEN_PORT}").parse().expect("addr");
    let generator: SocketAddrV4 = GENERATOR.parse().expect("addr");
    let mut grid = Grid::default();
    for (d, direction) in DIRECTIONS.into_iter().enumerate() {
        let (sink, socket) = match direction {
            Direction::Decrypt => (
                Sink::attach(&topo.lan, &topo.lan_if, object.to_vec(), SINK_PORT, 0),
                PacketSocket::open(&topo.client, &topo.client_if),
            ),
            Direction::Encrypt => (
                Sink::attach(&topo.client, &topo.client_if, object.to_vec(), 0, LISTEN_PORT),
                PacketSocket::open(&topo.lan, &topo.lan_if),
            ),
        };
        for (i, size) in SIZES.into_iter().enumerate() {
            let r = rate(o, i);
            let b = baseline[d][i].baseline();
            // A fresh session per workload: none lives long enough to need a
            // rekey, whatever --equal-runs and --equal-seconds say.
            let mut session =
                ClientSession::connect(&topo.client, generator_key.clone(), generator, gateway_addr, gateway_key);
            let series = &mut grid[d][i];
            series.offered_pps = r;
            for _ in 0..o.runs {
                let run = match direction {
                    Direction::Decrypt => {
                        let inner = inner_packet(
                            size,
                            TUNNEL_SRC.parse().expect("ip"),
                            LAN_HOST.parse().expect("ip"),
                            SINK_PORT,
                        );
                        let ring = session.encrypt_ring(&inner, packets_per_run(o, r), &wan_framing(&topo));
                        run_once(&socket, &ring, false, o, r, &sink, Some((kind, pid)))
                    }
                    Direction::Encrypt => {
                        run_once(&socket, &plain_ring(&topo, size), true, o, r, &sink, Some((kind, pid)))
                    }
                };
                print_run(kind.name(), direction, size, &run, Some(&b));
                series.runs.push(run);
            }
            drop(session);
        }
        drop(sink);
    }
    drop(gateway);
    grid
}

/// The equal-load table, then the breakdown. `results` is by gateway, in
/// the order given.
pub fn print(o: &Options, baseline: &Grid, results: &[(Kind, Grid)]) {
    let cost_of = |kind: Kind, d: usize, i: usize| {
        results.iter().find(|(k, _)| *k == kind).map(|(_, g)| g[d][i].cost(&baseline[d][i].baseline()))
    };
    println!(
        "\nequal load: CPU ns per delivered packet, {} s window, {} run(s): median (min–max) of\n\
         whole machine (/proc/stat) − other processes on the machine − the XDP-drop baseline",
        o.seconds, o.runs
    );
    println!(
        "{:<20}{:<19}{:>7}{:>13}{:>10}{:>26}{:>12}{:>14}",
        "gateway", "direction", "size", "offered", "loss %", "CPU ns/packet", "vs w-go", "vs boringtun"
    );
    for (d, direction) in DIRECTIONS.into_iter().enumerate() {
        for (i, size) in SIZES.into_iter().enumerate() {
            for (kind, grid) in results {
                let s = &grid[d][i];
                let c = s.cost(&baseline[d][i].baseline());
                let vs = |other: Kind| match cost_of(other, d, i) {
                    Some(oc) if c.valid && oc.valid && oc.median > 0.0 => format!("{:.2}x", c.median / oc.median),
                    Some(_) => "invalid".into(),
                    None => "-".into(),
                };
                let cost = format!("{:.0} ({:.0}–{:.0}){}", c.median, c.min, c.max, if c.valid { "" } else { " *" });
                println!(
                    "{:<20}{:<19}{:>5} B{:>9} pps{:>10.3}{cost:>26}{:>12}{:>14}",
                    kind.name(),
                    direction.label(),
                    size,
                    s.offered_pps,
                    c.worst_loss * 100.0,
                    vs(Kind::Userspace(wgxdp_integration::Userspace::WireguardGo)),
                    vs(Kind::Userspace(wgxdp_integration::Userspace::Boringtun)),
                );
            }
        }
    }
    println!(
        "   * a run lost more than {:.1} % of what was sent: not valid for the comparison (no ratio); the\n     \
         figures are then over all runs.",
        MAX_LOSS * 100.0
    );
    println!("   baseline (no gateway; XDP drops the packets on the gateway-side veth):");
    for (d, direction) in DIRECTIONS.into_iter().enumerate() {
        for (i, size) in SIZES.into_iter().enumerate() {
            let s = &baseline[d][i];
            let b = s.baseline();
            println!(
                "     {:<19}{size:>5} B: {:.1} % of a core, {:.0} ns per packet, loss {:.3} %",
                direction.label(),
                b.ours / 1e7,
                b.ours / b.delivered_pps.max(1e-9),
                s.runs.iter().map(Run::loss).fold(0.0, f64::max) * 100.0
            );
        }
    }

    println!("\nequal load, where the time goes (CPU ns per delivered packet, medians; share of the total)");
    println!(
        "{:<20}{:<19}{:>7}{:>15}{:>15}{:>15}{:>15}{:>12}{:>13}",
        "gateway",
        "direction",
        "size",
        "worker user",
        "worker sys",
        "other threads",
        "kernel",
        "unrelated",
        "raw machine"
    );
    for (d, direction) in DIRECTIONS.into_iter().enumerate() {
        for (i, size) in SIZES.into_iter().enumerate() {
            for (kind, grid) in results {
                let c = grid[d][i].cost(&baseline[d][i].baseline());
                let total = c.worker_user + c.worker_sys + c.other_threads + c.kernel;
                let cell = |v: f64| format!("{v:.0} ({:.0} %)", if total > 0.0 { v / total * 100.0 } else { 0.0 });
                println!(
                    "{:<20}{:<19}{:>5} B{:>15}{:>15}{:>15}{:>15}{:>12.0}{:>13.0}",
                    kind.name(),
                    direction.label(),
                    size,
                    cell(c.worker_user),
                    cell(c.worker_sys),
                    cell(c.other_threads),
                    cell(c.kernel),
                    c.unrelated,
                    c.whole_machine_median,
                );
            }
        }
    }
    println!(
        "   worker: wgxdp's `wgxdp-q*` threads (every thread of a userspace gateway), user and system time;\n   \
         other threads: the rest of wgxdp's process; kernel: the rest above the baseline (softirq: XDP,\n   \
         copy-mode AF_XDP, veth; TUN and UDP for userspace gateways), mostly on the sender's core.\n   \
         unrelated: other processes' CPU during the window (a shared machine), taken out of every figure;\n   \
         raw machine: the cost from the whole-machine counters alone (unrelated load left in).\n   \
         Busy time is the window less the kernel's exact idle and iowait clocks; the gateway's threads are\n   \
         their exact run time (schedstat), split into user and system time by the tick-sampled counters."
    );
}

pub fn json(o: &Options, baseline: &Grid, results: &[(Kind, Grid)]) -> Value {
    let cells = |g: &Grid, with_baseline: bool| -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        for (d, direction) in DIRECTIONS.into_iter().enumerate() {
            for (i, size) in SIZES.into_iter().enumerate() {
                let base = with_baseline.then(|| baseline[d][i].baseline());
                m.insert(format!("{}_{size}", direction.key()), g[d][i].json(base.as_ref()));
            }
        }
        m
    };
    let mut gateways = serde_json::Map::new();
    for (kind, grid) in results {
        let mut m = cells(grid, true);
        for (d, direction) in DIRECTIONS.into_iter().enumerate() {
            for (i, size) in SIZES.into_iter().enumerate() {
                let base = baseline[d][i].baseline();
                let mine = grid[d][i].cost(&base);
                for (other_name, other) in [
                    ("wireguard-go", Kind::Userspace(wgxdp_integration::Userspace::WireguardGo)),
                    ("boringtun", Kind::Userspace(wgxdp_integration::Userspace::Boringtun)),
                ] {
                    let ratio = results.iter().find(|(k, _)| *k == other).and_then(|(_, g)| {
                        let oc = g[d][i].cost(&base);
                        (mine.valid && oc.valid && oc.median > 0.0).then(|| mine.median / oc.median)
                    });
                    m[&format!("{}_{size}", direction.key())][format!("ratio_to_{other_name}")] = json!(ratio);
                }
            }
        }
        gateways.insert(kind.name().to_owned(), Value::Object(m));
    }
    json!({
        "method": "CPU ns per delivered packet = (whole-machine busy CPU (all CPUs × window − idle − iowait, /proc/stat) − other processes' CPU − the same for the XDP-drop baseline) / packets delivered in the window",
        "rates_pps": {"64": o.rates[0], "1420": o.rates[1]},
        "window_s": o.seconds,
        "runs": o.runs,
        "max_loss": MAX_LOSS,
        "baseline": Value::Object(cells(baseline, false)),
        "gateways": Value::Object(gateways),
    })
}
