//! Why the data plane dropped something: one enum for every path (the I/O-free
//! `Device`, the per-queue `Worker`, the control thread), and one counter array
//! indexed by it. `/metrics` and the stats line export `named()`.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! drop_reasons {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// Why an input (a datagram, a frame, a staged packet) was dropped.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
        #[repr(u8)]
        pub enum DropReason {
            $($(#[doc = $doc])* #[error($name)] $variant,)*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            /// The reason's short name.
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
            /// `drop_<name>`: the name in metrics and the stats line.
            pub const fn metric_name(self) -> &'static str {
                match self { $(DropReason::$variant => concat!("drop_", $name),)* }
            }
        }
    };
}

drop_reasons! {
    /// Not a well-formed Ethernet/IP/UDP frame or WireGuard message.
    Malformed => "malformed",
    /// A handshake message whose MAC1 is wrong.
    InvalidMac1 => "invalid_mac1",
    /// No session or handshake under the receiver index.
    UnknownIndex => "unknown_index",
    /// A handshake message that failed the protocol (unknown peer, replayed
    /// timestamp, flood, bad decryption).
    Handshake => "handshake",
    /// A cookie reply that does not decrypt for our last handshake message.
    BadCookieReply => "bad_cookie_reply",
    /// A transport counter already seen or too old for the window.
    Replay => "replay",
    /// A transport message that fails authentication.
    Authentication => "authentication",
    /// A session past REJECT_AFTER_TIME / REJECT_AFTER_MESSAGES.
    Expired => "expired",
    /// The decrypted payload is not an IPv4/IPv6 packet.
    BadInnerPacket => "bad_inner_packet",
    /// The inner source is not an allowed IP of the sending peer.
    SourceNotAllowed => "source_not_allowed",
    /// No peer's allowed IPs contain the destination.
    NoRoute => "no_route",
    /// The peer has no known endpoint yet.
    NoEndpoint => "no_endpoint",
    /// A packet waiting for a handshake was pushed out (per-peer or total bound).
    StagingFull => "staging_full",
    /// Packets still waiting when their peer's handshake attempts gave up.
    StagingExpired => "staging_expired",
    /// The receiver-index table has no free slot.
    IndexTableFull => "index_table_full",
    /// An output buffer or frame too small for the message.
    BufferTooSmall => "buffer_too_small",
    /// An inner packet larger than the tunnel MTU.
    Oversize => "oversize",
    /// No free frame in the transmit ring's UMEM.
    NoFrame => "no_frame",
    /// A port's transmit backlog was at its bound (the link drains slower than
    /// packets arrive for it): dropped so the shared frames keep both receive
    /// rings filled, and the other port and other tunnels keep flowing.
    TxFull => "tx_full",
    /// The handshake queue to the control thread was full.
    HandshakeQueueFull => "handshake_queue_full",
    /// Under load, a source sent more handshake messages than it may.
    RateLimited => "rate_limited",
    /// The kernel refused to queue a datagram (send buffer full, no route).
    KernelSend => "kernel_send",
    /// A packet waiting for a next-hop address was pushed out or timed out.
    NoNextHop => "no_next_hop",
    /// A packet for a site neighbour being resolved found no room to wait
    /// (the worker's set, or its tunnel's share of it, was full).
    NeighborWaitFull => "neighbor_wait_full",
    /// From a remote site, to an address outside the tunnel's local networks.
    NotLocalDestination => "not_local_destination",
    /// From a remote site, refused by a firewall rule or the default action.
    FirewallDenied => "firewall_denied",
    /// From a remote site, to the gateway host itself, and no rule allows it.
    ToGatewayHost => "to_gateway_host",
    /// TTL / hop limit exhausted (answered with ICMP time exceeded).
    TtlExceeded => "ttl_exceeded",
    /// A packet for the gateway host the host interface would not take.
    HostInterface => "host_interface",
    /// From the host interface with a source that is not the host's own: the
    /// kernel forwarded it towards a tunnel route (only the host's own packets
    /// enter tunnels that way; the site's come through AF_XDP).
    ForeignSource => "foreign_source",
    /// A fragment a filter cannot judge: a first fragment without the whole
    /// transport ports, or an IPv4 TCP fragment at offset 8 (RFC 1858).
    BadFragment => "bad_fragment",
}

/// One relaxed atomic counter per `DropReason`. Owned by one writer thread
/// (a worker, or the control thread); read by anyone for metrics.
#[derive(Debug)]
pub struct DropCounters([AtomicU64; DropReason::ALL.len()]);

impl Default for DropCounters {
    fn default() -> Self {
        Self(core::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl DropCounters {
    #[inline]
    pub fn count(&self, reason: DropReason) {
        self.0[reason as usize].fetch_add(1, Relaxed);
    }

    /// `n` drops of one reason at once (per batch).
    #[inline]
    pub fn count_n(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.0[reason as usize].fetch_add(n, Relaxed);
        }
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Relaxed)
    }

    /// Every drop, whatever the reason.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// (`drop_<reason>`, value) for every reason, in `DropReason::ALL` order.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL.iter().map(|&r| (r.metric_name(), self.get(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_a_prefixed_name() {
        let c = DropCounters::default();
        for (i, &r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r as usize, i, "ALL is in discriminant order");
            for _ in 0..=i {
                c.count(r);
            }
            assert_eq!(r.metric_name(), format!("drop_{}", r.name()));
        }
        for (i, &r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(c.get(r), i as u64 + 1);
        }
        let n = DropReason::ALL.len() as u64;
        assert_eq!(c.total(), n * (n + 1) / 2);
        assert_eq!(c.named().count(), DropReason::ALL.len());
    }
}
