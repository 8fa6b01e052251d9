//! WAN next hops against a real kernel: a reachable on-link peer becomes
//! ready once the kernel resolved it (kicked without queueing a packet); an
//! on-link address nobody answers for never does, and asking for hundreds of
//! them costs the control thread nothing.

use std::net::{IpAddr, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wgxdp_dataplane::drops::{DropCounters, DropReason};
use wgxdp_dataplane::neighbors::{run_wan_resolver, KernelSender, WanNextHops};
use wgxdp_dataplane::netlink;
use wgxdp_integration::{require_tools, veth_pair, Netns};

#[test]
fn reachable_next_hops_resolve_and_unreachable_ones_cost_nothing() {
    require_tools(&["ip"]);
    let gw = Netns::new("nhg");
    let peer = Netns::new("nhp");
    let (gw_if, _) = veth_pair(&gw, "10.230.0.1/24", &peer, "10.230.0.2/24");
    let reachable: IpAddr = "10.230.0.2".parse().unwrap();
    let (stats, sent_to_reachable) = gw.enter(move || {
        // The kick alone resolves it (nothing sent to it yet).
        let nl = netlink::Rtnetlink::open().unwrap();
        let index = netlink::ifindex(&gw_if).unwrap();
        netlink::solicit(&nl, index, reachable).expect("NTF_USE accepted");
        let deadline = Instant::now() + Duration::from_secs(3);
        while !netlink::read_neighbors(&gw_if).unwrap().contains_key(&reachable) {
            assert!(Instant::now() < deadline, "the kick did not resolve the neighbour");
            std::thread::sleep(Duration::from_millis(20));
        }

        let (table, requests) = WanNextHops::new();
        let stop = Arc::new(AtomicBool::new(false));
        let resolver = {
            let (table, stop) = (table.clone(), stop.clone());
            std::thread::spawn(move || run_wan_resolver(table, requests, None, stop))
        };
        let udp = Arc::new(UdpSocket::bind("0.0.0.0:0").unwrap());
        udp.set_nonblocking(true).unwrap();
        let drops = Arc::new(DropCounters::default());
        let mut sender = KernelSender::new(udp, table.clone(), drops.clone());
        let now = Instant::now();
        sender.send(b"hello", (reachable, 9).into(), now);
        // 300 on-link addresses nobody answers for.
        for i in 0..300u32 {
            let dead = IpAddr::from([10, 230, 0, (3 + i % 250) as u8]);
            sender.send(b"initiation", (dead, 51820 + i as u16).into(), now);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !table.is_ready(reachable) {
            assert!(Instant::now() < deadline, "the reachable next hop never became ready");
            sender.flush(Instant::now());
            std::thread::sleep(Duration::from_millis(20));
        }
        sender.flush(Instant::now());
        let sent = sender.waiting() == 300;
        // Past the resolution window every dead destination is dropped, counted.
        std::thread::sleep(Duration::from_secs(6));
        sender.flush(Instant::now());
        assert_eq!(sender.waiting(), 0);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        resolver.join().unwrap();
        (drops.get(DropReason::NoNextHop), sent)
    });
    assert!(sent_to_reachable, "only the dead destinations were still waiting");
    assert_eq!(stats, 300, "every datagram for an unresolvable next hop is a counted drop");
}
