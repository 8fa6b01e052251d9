//! The forwarding policy on the worker's real per-packet path (AF_XDP loop
//! over in-memory frames): local networks only, firewall rules, replies of
//! flows the site side opened, the gateway host's own addresses, TTL.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime};
use wgxdp_dataplane::device::Action;
use wgxdp_dataplane::drops::DropReason;
use wgxdp_dataplane::frame_io::{MemoryFrames, Port};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::policy::{FirewallRule, ForwardingPolicy, PortRange, RuleAction, RuleProtocol};
use wgxdp_dataplane::testing::{ipv4_l4_packet, with_tcp_flags, MemoryWorker, CLIENT_TUNNEL, LAN_HOST};
use wgxdp_dataplane::wire::{ip_protocol, Ipv4Packet};

const TCP: u8 = ip_protocol::TCP;
const UDP: u8 = ip_protocol::UDP;
const ICMP: u8 = ip_protocol::ICMP;
/// The gateway's own LAN address (inside the local network).
const GATEWAY_LAN: [u8; 4] = [10, 0, 1, 1];

fn rule(
    name: &str,
    protocol: RuleProtocol,
    ports: Option<&str>,
    dst: Option<&str>,
    action: RuleAction,
) -> FirewallRule {
    FirewallRule {
        name: name.into(),
        protocol,
        ports: ports.map(|p| p.parse::<PortRange>().unwrap()),
        source: None,
        destination: dst.map(|d| d.parse().unwrap()),
        action,
    }
}

fn policy(rules: Vec<FirewallRule>, default_action: RuleAction) -> ForwardingPolicy {
    ForwardingPolicy { local_networks: vec!["10.0.1.0/24".parse().unwrap()], rules, default_action }
}

fn io(m: &mut MemoryWorker) -> &mut MemoryFrames {
    m.worker.frames_mut()
}

/// Sends `inner` from the client's site; returns the frames the LAN got.
fn from_site(m: &mut MemoryWorker, inner: &[u8], now: Instant) -> Vec<Vec<u8>> {
    let frame = m.wan_frame(inner, now);
    assert!(io(m).inject(Port::Wan, &frame));
    m.run_until_idle(&mut Vec::new(), now);
    let mut out = Vec::new();
    io(m).take_sent(Port::Lan, |f| out.push(f.to_vec()));
    out
}

/// Sends `inner` from the LAN host; returns what the client decrypted.
fn from_lan(m: &mut MemoryWorker, inner: &[u8], now: Instant) -> Vec<Vec<u8>> {
    assert!(io(m).inject(Port::Lan, &MemoryWorker::lan_frame(inner)));
    m.run_until_idle(&mut Vec::new(), now);
    let mut sent = Vec::new();
    io(m).take_sent(Port::Wan, |f| sent.push(f.to_vec()));
    sent.iter()
        .map(|f| {
            let udp = wgxdp_dataplane::frame::parse_udp_frame(f).unwrap();
            let mut payload = f[udp.payload.clone()].to_vec();
            let mut buf = vec![0u8; 2048];
            match m.client.receive(udp.src, &mut payload, false, now, SystemTime::now(), &mut buf) {
                Ok(Action::Deliver { packet, .. }) => packet.to_vec(),
                other => panic!("the client did not accept the gateway's packet: {other:?}"),
            }
        })
        .collect()
}

fn drops(m: &MemoryWorker, reason: DropReason) -> u64 {
    m.counters.drops.get(reason)
}

#[test]
fn only_the_local_networks_are_reached() {
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    // Another network the host could route to (not a local prefix of this tunnel).
    let elsewhere = ipv4_l4_packet(80, CLIENT_TUNNEL, [10, 0, 3, 7], UDP, (4000, 53), 64);
    assert!(from_site(&mut m, &elsewhere, now).is_empty());
    assert_eq!(drops(&m, DropReason::NotLocalDestination), 1);
    let local = ipv4_l4_packet(80, CLIENT_TUNNEL, LAN_HOST, UDP, (4000, 53), 64);
    assert_eq!(from_site(&mut m, &local, now).len(), 1);
    // No local networks at all (a tunnel without a policy yet): nothing passes.
    m.set_policy(ForwardingPolicy::default());
    assert!(from_site(&mut m, &local, now).is_empty());
    assert_eq!(drops(&m, DropReason::NotLocalDestination), 2);
}

#[test]
fn a_deny_rule_blocks_ssh_while_icmp_passes_and_hits_are_counted() {
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    m.set_policy(policy(
        vec![rule("no ssh", RuleProtocol::Tcp, Some("22"), None, RuleAction::Deny)],
        RuleAction::Allow,
    ));
    let ssh = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, TCP, (50000, 22), 64);
    assert!(from_site(&mut m, &ssh, now).is_empty());
    assert_eq!(drops(&m, DropReason::FirewallDenied), 1);
    let web = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, TCP, (50000, 80), 64);
    assert_eq!(from_site(&mut m, &web, now).len(), 1);
    let ping = ipv4_l4_packet(64, CLIENT_TUNNEL, LAN_HOST, ICMP, (8 << 8, 7), 64);
    assert_eq!(from_site(&mut m, &ping, now).len(), 1);
    let peer = m.gateway_peer;
    let (_, _, gateway) = m.control_side();
    let (_, hits) = gateway.policy(peer).unwrap();
    assert_eq!(hits, vec![1], "the rule matched once");
    // A new rule set takes effect on the next packet, counters restart.
    m.set_policy(policy(vec![], RuleAction::Allow));
    assert_eq!(from_site(&mut m, &ssh, now).len(), 1);
}

#[test]
fn deny_all_inbound_still_lets_replies_of_lan_flows_in() {
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    m.set_policy(policy(vec![], RuleAction::Deny));
    let site = CLIENT_TUNNEL;
    // The site cannot open anything.
    let syn = ipv4_l4_packet(60, site, LAN_HOST, TCP, (5000, 80), 64);
    assert!(from_site(&mut m, &syn, now).is_empty());
    assert_eq!(drops(&m, DropReason::FirewallDenied), 1);
    // The LAN host opens a TCP connection to the site: the replies come back.
    let syn = wgxdp_dataplane::flow::tcp_flags::SYN;
    let open = with_tcp_flags(ipv4_l4_packet(60, LAN_HOST, site, TCP, (40000, 443), 64), syn);
    assert_eq!(from_lan(&mut m, &open, now).len(), 1);
    let reply = ipv4_l4_packet(60, site, LAN_HOST, TCP, (443, 40000), 64);
    assert_eq!(from_site(&mut m, &reply, now).len(), 1, "a reply of a LAN-opened flow");
    // The site's own connection attempts answered by the LAN open nothing.
    let syn_ack = wgxdp_dataplane::flow::tcp_flags::SYN | wgxdp_dataplane::flow::tcp_flags::ACK;
    let answer = with_tcp_flags(ipv4_l4_packet(60, LAN_HOST, site, TCP, (22, 5001), 64), syn_ack);
    assert_eq!(from_lan(&mut m, &answer, now).len(), 1);
    let follow_up = ipv4_l4_packet(60, site, LAN_HOST, TCP, (5001, 22), 64);
    assert!(from_site(&mut m, &follow_up, now).is_empty(), "a SYN-ACK from the LAN opened a flow");
    let other_port = ipv4_l4_packet(60, site, LAN_HOST, TCP, (443, 40001), 64);
    assert!(from_site(&mut m, &other_port, now).is_empty());
    // Ping from the LAN: the echo reply comes back; an unsolicited one does not.
    let echo = ipv4_l4_packet(64, LAN_HOST, site, ICMP, (8 << 8, 99), 64);
    assert_eq!(from_lan(&mut m, &echo, now).len(), 1);
    let echo_reply = ipv4_l4_packet(64, site, LAN_HOST, ICMP, (0, 99), 64);
    assert_eq!(from_site(&mut m, &echo_reply, now).len(), 1);
    let stray_reply = ipv4_l4_packet(64, site, LAN_HOST, ICMP, (0, 100), 64);
    assert!(from_site(&mut m, &stray_reply, now).is_empty());
    // An ICMP error about the LAN's UDP flow (a router on the site says the
    // port is unreachable, or the path MTU is smaller) is related: it passes.
    let dns = ipv4_l4_packet(60, LAN_HOST, site, UDP, (33000, 53), 64);
    assert_eq!(from_lan(&mut m, &dns, now).len(), 1);
    let quote = wgxdp_dataplane::testing::forwarded(&dns);
    let mut unreachable = ipv4_l4_packet(20 + 8 + 28, [10, 0, 2, 1], LAN_HOST, ICMP, (3 << 8 | 3, 0), 64);
    unreachable[28..].copy_from_slice(&quote[..28]);
    assert_eq!(from_site(&mut m, &unreachable, now).len(), 1, "an error about our own flow");
    assert!(m.shared.conntrack.counters.replies.load() >= 3);
}

#[test]
fn the_gateway_host_itself_needs_an_explicit_allow_rule() {
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    m.shared.host_addresses.replace(vec![IpAddr::from(GATEWAY_LAN)]);
    let ping_gateway = ipv4_l4_packet(64, CLIENT_TUNNEL, GATEWAY_LAN, ICMP, (8 << 8, 1), 64);
    // Default allow does not cover the host.
    assert!(from_site(&mut m, &ping_gateway, now).is_empty());
    assert_eq!(drops(&m, DropReason::ToGatewayHost), 1);
    assert_eq!(drops(&m, DropReason::FirewallDenied), 0);
    // Nor a rule for the site's network.
    let network = rule("lan", RuleProtocol::Icmp, None, Some("10.0.1.0/24"), RuleAction::Allow);
    m.set_policy(policy(vec![network], RuleAction::Allow));
    assert!(from_site(&mut m, &ping_gateway, now).is_empty());
    assert_eq!(drops(&m, DropReason::ToGatewayHost), 2);
    // One rule away: allow ICMP to the gateway's LAN address. (This fixture has
    // no host interface, so the admitted packet stops there, counted apart.)
    let allow = rule("ping gateway", RuleProtocol::Icmp, None, Some("10.0.1.1/32"), RuleAction::Allow);
    m.set_policy(policy(vec![allow], RuleAction::Allow));
    assert!(from_site(&mut m, &ping_gateway, now).is_empty(), "never framed onto the LAN");
    assert_eq!(drops(&m, DropReason::ToGatewayHost), 2, "admitted");
    assert_eq!(drops(&m, DropReason::HostInterface), 1, "handed to the (absent) host interface");
    let peer = m.gateway_peer;
    let (_, _, gateway) = m.control_side();
    assert_eq!(gateway.policy(peer).unwrap().1, vec![1], "the allow rule admitted it");
}

#[test]
fn expiring_ttls_are_answered_with_time_exceeded_both_ways() {
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    // From the site with TTL 1: an ICMP time exceeded goes back into the tunnel.
    let last_hop = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, UDP, (33434, 33434), 1);
    assert!(from_site(&mut m, &last_hop, now).is_empty());
    assert_eq!(drops(&m, DropReason::TtlExceeded), 1);
    let mut sent = Vec::new();
    io(&mut m).take_sent(Port::Wan, |f| sent.push(f.to_vec()));
    assert_eq!(sent.len(), 1);
    let udp = wgxdp_dataplane::frame::parse_udp_frame(&sent[0]).unwrap();
    let mut payload = sent[0][udp.payload.clone()].to_vec();
    let mut buf = vec![0u8; 2048];
    let Ok(Action::Deliver { packet, .. }) =
        m.client.receive(udp.src, &mut payload, false, now, SystemTime::now(), &mut buf)
    else {
        panic!("the client did not get the ICMP error")
    };
    let ip = Ipv4Packet::new_checked(packet).unwrap();
    assert_eq!((ip.protocol(), ip.payload()[0]), (ICMP, 11), "time exceeded");
    assert_eq!(ip.source(), std::net::Ipv4Addr::from(GATEWAY_LAN), "from the gateway's LAN address");
    assert_eq!(ip.destination(), std::net::Ipv4Addr::from(CLIENT_TUNNEL));
    // TTL 2 arrives with 1.
    let two = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, UDP, (33434, 33435), 2);
    let got = from_site(&mut m, &two, now);
    assert_eq!(Ipv4Packet::new_checked(&got[0][14..]).unwrap().ttl(), 1);
    assert!(Ipv4Packet::new_checked(&got[0][14..]).unwrap().verify_checksum());
    // From the LAN with TTL 1: the error goes to the LAN host.
    let out = ipv4_l4_packet(60, LAN_HOST, CLIENT_TUNNEL, UDP, (33434, 33434), 1);
    assert!(from_lan(&mut m, &out, now).is_empty());
    let mut frames = Vec::new();
    io(&mut m).take_sent(Port::Lan, |f| frames.push(f.to_vec()));
    let ip = Ipv4Packet::new_checked(&frames[0][14..]).unwrap();
    assert_eq!((ip.protocol(), ip.payload()[0]), (ICMP, 11));
    assert_eq!(ip.destination(), std::net::Ipv4Addr::from(LAN_HOST));
    assert_eq!(m.counters.icmp_time_exceeded.load(Relaxed), 2);
}

#[test]
fn later_fragments_follow_their_admitted_first_fragment() {
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    m.set_policy(policy(vec![rule("dns", RuleProtocol::Udp, Some("53"), None, RuleAction::Allow)], RuleAction::Deny));
    let fragment = |id: u16, flags_offset: u16, dport: u16| {
        let mut p = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, UDP, (5353, dport), 64);
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
        p
    };
    assert_eq!(from_site(&mut m, &fragment(7, 0x2000, 53), now).len(), 1, "first fragment, allowed port");
    assert_eq!(from_site(&mut m, &fragment(7, 5, 0), now).len(), 1, "its later fragment");
    assert!(from_site(&mut m, &fragment(8, 5, 0), now).is_empty(), "a later fragment of nothing admitted");
    assert!(from_site(&mut m, &fragment(9, 0x2000, 22), now).is_empty(), "first fragment, denied port");
    assert!(from_site(&mut m, &fragment(9, 5, 0), now).is_empty(), "its later fragments stay out");
    // A TCP fragment at offset 8 (could rewrite the flags, RFC 1858) is refused.
    let mut tcp = ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, TCP, (1, 2), 64);
    tcp[6..8].copy_from_slice(&1u16.to_be_bytes());
    Ipv4Packet::new_checked(&mut tcp[..]).unwrap().fill_checksum();
    assert!(from_site(&mut m, &tcp, now).is_empty());
    assert_eq!(drops(&m, DropReason::BadFragment), 1);
}

/// A site neighbour whose MAC is not known yet: the packet waits (never goes
/// through the kernel) and leaves once the neighbour resolves; one whose
/// neighbour never resolves is dropped after a while, counted.
#[test]
fn packets_wait_for_an_unresolved_site_neighbour() {
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    let new_host = [10, 0, 1, 6];
    let packet = ipv4_l4_packet(80, CLIENT_TUNNEL, new_host, UDP, (4000, 53), 64);
    assert!(from_site(&mut m, &packet, now).is_empty(), "waits");
    assert_eq!(m.counters.neighbor_misses.load(Relaxed), 1);
    let mac = wgxdp_dataplane::wire::MacAddr([2, 0, 0, 0, 1, 6]);
    let known = [(IpAddr::from(LAN_HOST), wgxdp_dataplane::testing::LAN_HOST_MAC), (IpAddr::from(new_host), mac)];
    m.shared.neighbors.replace(known.into_iter().collect());
    m.run_until_idle(&mut Vec::new(), now);
    let mut out = Vec::new();
    io(&mut m).take_sent(Port::Lan, |f| out.push(f.to_vec()));
    assert_eq!(out.len(), 1, "sent once resolved");
    assert_eq!(&out[0][..6], &mac.0);
    assert_eq!(&out[0][14..], &wgxdp_dataplane::testing::forwarded(&packet)[..]);
    // Never resolved: dropped after the wait, counted.
    let lost = ipv4_l4_packet(80, CLIENT_TUNNEL, [10, 0, 1, 7], UDP, (4000, 53), 64);
    assert!(from_site(&mut m, &lost, now).is_empty());
    m.run_until_idle(&mut Vec::new(), now + wgxdp_dataplane::neighbors::NEIGHBOR_WAIT);
    assert_eq!(drops(&m, DropReason::NoNextHop), 1);
}

/// The connection table only holds what the rules would refuse otherwise: a
/// site using a LAN service it may reach creates no entries (so it cannot
/// fill the table through one), and a LAN frame forged with the gateway's own
/// address as source plants no way into the host.
#[test]
fn only_flows_whose_replies_the_rules_refuse_are_tracked() {
    use wgxdp_dataplane::flow::tcp_flags::{ACK, SYN};
    let mut m = MemoryWorker::new(AeadBackend::Ring);
    let now = Instant::now();
    m.shared.host_addresses.replace(vec![IpAddr::from(GATEWAY_LAN)]);
    m.set_policy(policy(vec![rule("web", RuleProtocol::Tcp, Some("80"), None, RuleAction::Allow)], RuleAction::Deny));
    let shared = m.shared.clone();
    let inserts = || shared.conntrack.counters.inserts.load(Relaxed);
    for port in 30000..30050u16 {
        let syn = with_tcp_flags(ipv4_l4_packet(60, CLIENT_TUNNEL, LAN_HOST, TCP, (port, 80), 64), SYN);
        assert_eq!(from_site(&mut m, &syn, now).len(), 1, "the rule admits it");
        let syn_ack = with_tcp_flags(ipv4_l4_packet(60, LAN_HOST, CLIENT_TUNNEL, TCP, (80, port), 64), SYN | ACK);
        let data = with_tcp_flags(ipv4_l4_packet(60, LAN_HOST, CLIENT_TUNNEL, TCP, (80, port), 64), ACK);
        assert_eq!(from_lan(&mut m, &syn_ack, now).len(), 1);
        assert_eq!(from_lan(&mut m, &data, now).len(), 1);
    }
    assert_eq!(inserts(), 0, "the site's own connections to an allowed service are not tracked");
    // A LAN-opened connection the rules would refuse the replies of is.
    let open = with_tcp_flags(ipv4_l4_packet(60, LAN_HOST, CLIENT_TUNNEL, TCP, (40000, 443), 64), SYN);
    assert_eq!(from_lan(&mut m, &open, now).len(), 1);
    assert_eq!(inserts(), 1);
    // Forged: the gateway's address as the source on the LAN. Forwarded, not tracked.
    let forged = with_tcp_flags(ipv4_l4_packet(60, GATEWAY_LAN, CLIENT_TUNNEL, TCP, (22, 5555), 64), ACK);
    assert_eq!(from_lan(&mut m, &forged, now).len(), 1);
    assert_eq!(inserts(), 1);
    let into_host = ipv4_l4_packet(60, CLIENT_TUNNEL, GATEWAY_LAN, TCP, (5555, 22), 64);
    assert!(from_site(&mut m, &into_host, now).is_empty());
    assert_eq!(drops(&m, DropReason::ToGatewayHost), 1);
}
