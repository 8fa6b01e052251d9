//! What the API needs from the data plane, behind a trait: the running AF_XDP
//! gateway (`GatewayPlane`) in production, an in-memory table (`MemoryPlane`)
//! for HTTP tests and dry runs. Calls block briefly (the gateway's control
//! thread applies them); the API makes them off the async runtime.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use wgxdp_dataplane::device::{PeerId, PeerUpdate};
use wgxdp_dataplane::gateway::{Gateway, GatewayError, PeerSpec, PeerStatus};
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{PresharedKey, PublicKey};
use wgxdp_dataplane::policy::ForwardingPolicy;
use wgxdp_dataplane::table::IpPrefix;

/// A tunnel as the data plane holds it (one WireGuard peer).
#[derive(Debug, Clone, PartialEq)]
pub struct Tunnel {
    pub public_key: PublicKey,
    pub preshared_key: PresharedKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpPrefix>,
    pub persistent_keepalive: Option<u16>,
    /// What the remote site may reach: local networks, firewall rules, default.
    pub policy: ForwardingPolicy,
}

/// Live state of one tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStatus {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub handshakes: u64,
    /// Handshakes with the (authenticated) peer that did not complete.
    pub handshake_failures: u64,
    pub last_handshake: Option<SystemTime>,
    pub endpoint: Option<SocketAddr>,
    /// Packets each firewall rule matched (in rule order) since the rules last changed.
    pub rule_hits: Vec<u64>,
}

/// One tunnel's firewall counters, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRuleHits {
    pub id: String,
    /// Each rule's name and hits, in rule order.
    pub rules: Vec<(String, u64)>,
}

/// Pairs rule names with their counters (a rule without one counts 0: the
/// counters of rules that changed a moment ago).
fn named_hits(policy: &ForwardingPolicy, hits: &[u64]) -> Vec<(String, u64)> {
    policy.rules.iter().enumerate().map(|(i, r)| (r.name.clone(), hits.get(i).copied().unwrap_or(0))).collect()
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlaneError(pub String);

pub trait DataPlane: Send + Sync + 'static {
    /// The gateway's own public key (for the remote side's configuration).
    fn public_key(&self) -> PublicKey;
    /// The UDP port the gateway listens on.
    fn listen_port(&self) -> u16;
    /// Adds the tunnel `id`, or changes it in place if present.
    fn apply(&self, id: &str, tunnel: &Tunnel) -> Result<(), PlaneError>;
    /// Removes the tunnel `id` (no error if absent).
    fn remove(&self, id: &str) -> Result<(), PlaneError>;
    /// The ids of the tunnels it runs (API ones, not the configuration file's).
    fn tunnel_ids(&self) -> Vec<String>;
    /// Live state of each tunnel in `ids` (in order; `None`: not in the data plane).
    fn statuses(&self, ids: &[&str]) -> Vec<Option<TunnelStatus>>;
    fn status(&self, id: &str) -> Option<TunnelStatus> {
        self.statuses(&[id]).pop().flatten()
    }
    /// Live state of every tunnel the data plane runs, by id; `None` if it
    /// did not answer for one it holds (its control thread is busy).
    fn all_statuses(&self) -> Option<Vec<(String, TunnelStatus)>>;
    /// Live state of the configuration file's peers, in file order.
    fn config_peer_statuses(&self) -> Vec<Option<TunnelStatus>> {
        Vec::new()
    }
    /// Per-rule firewall counters of every tunnel that has rules, by id.
    fn firewall_hits(&self) -> Vec<TunnelRuleHits>;
    /// `None` when ready; otherwise why not.
    fn not_ready(&self) -> Option<String>;
    /// Appends Prometheus text for the data plane's own counters.
    fn write_metrics(&self, out: &mut String);
}

/// The peer operations `GatewayPlane` needs: the running `Gateway`, or a
/// fake in tests (to drive the error paths of `apply` and `remove`).
pub trait PeerControl: Send + Sync + 'static {
    fn add_peer(&self, spec: PeerSpec) -> Result<PeerId, GatewayError>;
    /// Removes `id`; `Ok(false)` if it was already gone.
    fn remove_peer(&self, id: PeerId) -> Result<bool, GatewayError>;
    fn set_allowed_ips(&self, id: PeerId, prefixes: Vec<IpPrefix>) -> Result<(), GatewayError>;
    /// Replaces what the peer's remote site may reach; `Ok(false)` if there is no such peer.
    fn set_policy(&self, id: PeerId, policy: ForwardingPolicy) -> Result<bool, GatewayError>;
    fn update_peer(&self, id: PeerId, update: PeerUpdate) -> Result<bool, GatewayError>;
}

impl PeerControl for Gateway {
    fn add_peer(&self, spec: PeerSpec) -> Result<PeerId, GatewayError> {
        Gateway::add_peer(self, spec)
    }
    fn remove_peer(&self, id: PeerId) -> Result<bool, GatewayError> {
        Gateway::remove_peer(self, id)
    }
    fn set_allowed_ips(&self, id: PeerId, prefixes: Vec<IpPrefix>) -> Result<(), GatewayError> {
        Gateway::set_allowed_ips(self, id, prefixes)
    }
    fn set_policy(&self, id: PeerId, policy: ForwardingPolicy) -> Result<bool, GatewayError> {
        Gateway::set_policy(self, id, policy)
    }
    fn update_peer(&self, id: PeerId, update: PeerUpdate) -> Result<bool, GatewayError> {
        Gateway::update_peer(self, id, update)
    }
}

/// Tunnel ids to the data plane's peers, kept in step with what the data
/// plane confirmed: an entry is forgotten only after its peer is gone, so a
/// failed removal can be retried (a retry that found nothing would report
/// success while the peer kept carrying traffic).
#[derive(Debug, Default)]
struct Tunnels(Mutex<HashMap<String, (PeerId, Tunnel)>>);

fn plane_err(e: GatewayError) -> PlaneError {
    PlaneError(e.to_string())
}

impl Tunnels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PeerId, Tunnel)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(peers: &impl PeerControl, t: &Tunnel) -> Result<PeerId, PlaneError> {
        peers
            .add_peer(PeerSpec {
                config: PeerConfig {
                    public_key: t.public_key,
                    preshared_key: t.preshared_key.clone(),
                    persistent_keepalive: keepalive(t.persistent_keepalive),
                },
                endpoint: t.endpoint,
                allowed_ips: t.allowed_ips.clone(),
                policy: t.policy.clone(),
            })
            .map_err(plane_err)
    }

    fn apply(&self, peers: &impl PeerControl, id: &str, new: &Tunnel) -> Result<(), PlaneError> {
        let mut tunnels = self.lock();
        match tunnels.get_mut(id) {
            // Nothing changes: no trip to the control thread.
            Some((_, old)) if old == new => {}
            None => {
                let peer = Self::add(peers, new)?;
                tunnels.insert(id.to_owned(), (peer, new.clone()));
            }
            Some((peer, old)) if old.public_key != new.public_key => {
                // The old peer stays known until the data plane let it go.
                peers.remove_peer(*peer).map_err(plane_err)?;
                tunnels.remove(id);
                let peer = Self::add(peers, new)?;
                tunnels.insert(id.to_owned(), (peer, new.clone()));
            }
            Some((peer, old)) => {
                let peer = *peer;
                if old.allowed_ips != new.allowed_ips {
                    peers.set_allowed_ips(peer, new.allowed_ips.clone()).map_err(plane_err)?;
                    // Record each confirmed step: a rollback to `old` must undo it.
                    old.allowed_ips = new.allowed_ips.clone();
                }
                if old.policy != new.policy {
                    // In place: the session and the connection table's flows survive.
                    if !peers.set_policy(peer, new.policy.clone()).map_err(plane_err)? {
                        return Err(PlaneError("the data plane no longer holds this tunnel's peer".into()));
                    }
                    old.policy = new.policy.clone();
                }
                let update = PeerUpdate {
                    preshared_key: (old.preshared_key != new.preshared_key).then(|| new.preshared_key.clone()),
                    persistent_keepalive: (old.persistent_keepalive != new.persistent_keepalive)
                        .then(|| keepalive(new.persistent_keepalive)),
                    endpoint: if old.endpoint != new.endpoint { new.endpoint } else { None },
                };
                peers.update_peer(peer, update).map_err(plane_err)?;
                *old = new.clone();
            }
        }
        Ok(())
    }

    fn remove(&self, peers: &impl PeerControl, id: &str) -> Result<(), PlaneError> {
        let mut tunnels = self.lock();
        if let Some((peer, _)) = tunnels.get(id) {
            peers.remove_peer(*peer).map_err(plane_err)?;
            tunnels.remove(id);
        }
        Ok(())
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn peers(&self, ids: &[&str]) -> Vec<Option<PeerId>> {
        let tunnels = self.lock();
        ids.iter().map(|id| tunnels.get(*id).map(|(peer, _)| *peer)).collect()
    }

    /// Every tunnel with firewall rules: id, peer and policy, by id.
    fn with_rules(&self) -> Vec<(String, PeerId, ForwardingPolicy)> {
        let tunnels = self.lock();
        let mut out: Vec<_> = tunnels
            .iter()
            .filter(|(_, (_, t))| !t.policy.rules.is_empty())
            .map(|(id, (peer, t))| (id.clone(), *peer, t.policy.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn tunnel_status(s: PeerStatus) -> TunnelStatus {
    TunnelStatus {
        bytes_sent: s.stats.tx_bytes,
        bytes_received: s.stats.rx_bytes,
        packets_sent: s.stats.tx_packets,
        packets_received: s.stats.rx_packets,
        handshakes: s.stats.handshakes,
        handshake_failures: s.stats.handshake_failures,
        last_handshake: s.last_handshake,
        endpoint: s.endpoint,
        rule_hits: s.rule_hits,
    }
}

/// The running AF_XDP gateway.
#[derive(Debug)]
pub struct GatewayPlane {
    gateway: Gateway,
    listen_port: u16,
    tunnels: Tunnels,
}

fn keepalive(k: Option<u16>) -> Option<Duration> {
    k.filter(|&s| s > 0).map(|s| Duration::from_secs(u64::from(s)))
}

impl GatewayPlane {
    pub fn new(gateway: Gateway, listen_port: u16) -> Self {
        Self { gateway, listen_port, tunnels: Tunnels::default() }
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn into_gateway(self) -> Gateway {
        self.gateway
    }
}

impl DataPlane for GatewayPlane {
    fn public_key(&self) -> PublicKey {
        self.gateway.public_key()
    }

    fn listen_port(&self) -> u16 {
        self.listen_port
    }

    fn apply(&self, id: &str, new: &Tunnel) -> Result<(), PlaneError> {
        self.tunnels.apply(&self.gateway, id, new)
    }

    fn remove(&self, id: &str) -> Result<(), PlaneError> {
        self.tunnels.remove(&self.gateway, id)
    }

    fn tunnel_ids(&self) -> Vec<String> {
        self.tunnels.ids()
    }

    fn statuses(&self, ids: &[&str]) -> Vec<Option<TunnelStatus>> {
        let peers = self.tunnels.peers(ids);
        // One trip to the control thread for every known one.
        let mut live = self.gateway.peer_statuses(peers.iter().flatten().copied().collect()).into_iter();
        peers.iter().map(|peer| peer.and_then(|_| live.next().flatten()).map(tunnel_status)).collect()
    }

    fn all_statuses(&self) -> Option<Vec<(String, TunnelStatus)>> {
        let ids = self.tunnels.ids();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let live = self.statuses(&refs);
        ids.into_iter().zip(live).map(|(id, s)| Some((id, s?))).collect()
    }

    fn config_peer_statuses(&self) -> Vec<Option<TunnelStatus>> {
        let ids = self.gateway.config_peers().to_vec();
        self.gateway.peer_statuses(ids).into_iter().map(|s| s.map(tunnel_status)).collect()
    }

    fn firewall_hits(&self) -> Vec<TunnelRuleHits> {
        let tunnels = self.tunnels.with_rules();
        if tunnels.is_empty() {
            return Vec::new();
        }
        // One trip to the control thread, for the tunnels that have rules only.
        let live = self.gateway.peer_statuses(tunnels.iter().map(|(_, peer, _)| *peer).collect());
        tunnels
            .into_iter()
            .zip(live)
            .filter_map(|((id, _, policy), s)| Some(TunnelRuleHits { id, rules: named_hits(&policy, &s?.rule_hits) }))
            .collect()
    }

    fn not_ready(&self) -> Option<String> {
        (!self.gateway.is_healthy()).then(|| "the data plane is not running (XDP detached or a thread stopped)".into())
    }

    fn write_metrics(&self, out: &mut String) {
        let stats = self.gateway.stats();
        let _ = writeln!(out, "# HELP wgxdp_xdp_packets_total Packets seen by the XDP programs, by verdict.");
        let _ = writeln!(out, "# TYPE wgxdp_xdp_packets_total counter");
        for (name, v) in stats.xdp.named() {
            let _ = writeln!(out, "wgxdp_xdp_packets_total{{verdict=\"{name}\"}} {v}");
        }
        let _ =
            writeln!(out, "# HELP wgxdp_queue_packets_total Per-queue worker counters (drop_* are drops by reason).");
        let _ = writeln!(out, "# TYPE wgxdp_queue_packets_total counter");
        for (q, counters) in stats.workers.iter().enumerate() {
            for (name, v) in counters {
                let _ = writeln!(out, "wgxdp_queue_packets_total{{queue=\"{q}\",counter=\"{name}\"}} {v}");
            }
        }
        let _ = writeln!(out, "# HELP wgxdp_control_drops_total Drops on the control thread, by reason.");
        let _ = writeln!(out, "# TYPE wgxdp_control_drops_total counter");
        for (name, v) in &stats.control {
            let _ = writeln!(out, "wgxdp_control_drops_total{{counter=\"{name}\"}} {v}");
        }
        // What the kernel handed over (fragments, queues without a socket).
        for (name, v) in &stats.slow_path {
            let _ = writeln!(out, "wgxdp_queue_packets_total{{queue=\"kernel\",counter=\"{name}\"}} {v}");
        }
        write_conntrack_metrics(out, &stats.conntrack);
    }
}

/// The connection table's numbers (`GatewayStats::conntrack`): its capacity
/// and live flows are gauges, everything else counts events.
pub fn write_conntrack_metrics(out: &mut String, conntrack: &[(&'static str, u64)]) {
    for (name, v) in conntrack {
        let (metric, kind, help) = match *name {
            "conntrack_capacity" => (format!("wgxdp_{name}"), "gauge", "Flows the connection table holds at most."),
            "conntrack_flows" => (
                format!("wgxdp_{name}"),
                "gauge",
                "Flows opened from the site side that the connection table tracks now.",
            ),
            _ => (format!("wgxdp_{name}_total"), "counter", "Connection table events (see the metric's name)."),
        };
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        let _ = writeln!(out, "{metric} {v}");
    }
}

/// An in-memory data plane: it records tunnels and reports the status a test
/// sets. For HTTP tests and running the API without NICs.
#[derive(Debug)]
pub struct MemoryPlane {
    public_key: PublicKey,
    pub tunnels: Mutex<HashMap<String, Tunnel>>,
    pub statuses: Mutex<HashMap<String, TunnelStatus>>,
    /// When set, `apply` fails with this message (to test error paths).
    pub fail_with: Mutex<Option<String>>,
    /// When set, `remove` fails with this message.
    pub fail_remove_with: Mutex<Option<String>>,
}

impl MemoryPlane {
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            tunnels: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            fail_with: Mutex::new(None),
            fail_remove_with: Mutex::new(None),
        }
    }

    pub fn public_key_base64(&self) -> String {
        self.public_key.to_base64()
    }

    pub fn tunnel(&self, id: &str) -> Option<Tunnel> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }
}

impl DataPlane for MemoryPlane {
    fn public_key(&self) -> PublicKey {
        self.public_key
    }

    fn listen_port(&self) -> u16 {
        51820
    }

    fn apply(&self, id: &str, tunnel: &Tunnel) -> Result<(), PlaneError> {
        if let Some(msg) = self.fail_with.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(PlaneError(msg));
        }
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), tunnel.clone());
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), PlaneError> {
        if let Some(msg) = self.fail_remove_with.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(PlaneError(msg));
        }
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        Ok(())
    }

    fn tunnel_ids(&self) -> Vec<String> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    fn statuses(&self, ids: &[&str]) -> Vec<Option<TunnelStatus>> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().map(|id| tunnels.contains_key(*id).then(|| statuses.get(*id).cloned().unwrap_or_default())).collect()
    }

    fn all_statuses(&self) -> Option<Vec<(String, TunnelStatus)>> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        Some(tunnels.keys().map(|id| (id.clone(), statuses.get(id).cloned().unwrap_or_default())).collect())
    }

    fn firewall_hits(&self) -> Vec<TunnelRuleHits> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<TunnelRuleHits> = tunnels
            .iter()
            .filter(|(_, t)| !t.policy.rules.is_empty())
            .map(|(id, t)| {
                let hits = statuses.get(id).map(|s| s.rule_hits.as_slice()).unwrap_or_default();
                TunnelRuleHits { id: id.clone(), rules: named_hits(&t.policy, hits) }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn not_ready(&self) -> Option<String> {
        None
    }

    fn write_metrics(&self, _out: &mut String) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use wgxdp_dataplane::noise::PrivateKey;

    /// Peers as a data plane holds them; calls fail (as a control timeout
    /// does: nothing changed) while the matching flag is set.
    #[derive(Default)]
    struct FakePeers {
        live: Mutex<HashMap<PeerId, (PublicKey, Vec<IpPrefix>)>>,
        policies: Mutex<HashMap<PeerId, ForwardingPolicy>>,
        next: AtomicU32,
        fail_remove: AtomicBool,
        fail_update: AtomicBool,
        fail_policy: AtomicBool,
        removes: AtomicU32,
        policy_changes: AtomicU32,
    }

    fn timeout() -> GatewayError {
        GatewayError::ControlTimeout(Duration::from_secs(1))
    }

    impl FakePeers {
        fn live(&self) -> Vec<(PublicKey, Vec<IpPrefix>)> {
            self.live.lock().unwrap().values().cloned().collect()
        }
    }

    impl PeerControl for FakePeers {
        fn add_peer(&self, spec: PeerSpec) -> Result<PeerId, GatewayError> {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            self.live.lock().unwrap().insert(id, (spec.config.public_key, spec.allowed_ips));
            self.policies.lock().unwrap().insert(id, spec.policy);
            Ok(id)
        }
        fn remove_peer(&self, id: PeerId) -> Result<bool, GatewayError> {
            if self.fail_remove.load(Ordering::Relaxed) {
                return Err(timeout());
            }
            self.removes.fetch_add(1, Ordering::Relaxed);
            self.policies.lock().unwrap().remove(&id);
            Ok(self.live.lock().unwrap().remove(&id).is_some())
        }
        fn set_policy(&self, id: PeerId, policy: ForwardingPolicy) -> Result<bool, GatewayError> {
            if self.fail_policy.load(Ordering::Relaxed) {
                return Err(timeout());
            }
            self.policy_changes.fetch_add(1, Ordering::Relaxed);
            Ok(self.policies.lock().unwrap().get_mut(&id).map(|p| *p = policy).is_some())
        }
        fn set_allowed_ips(&self, id: PeerId, prefixes: Vec<IpPrefix>) -> Result<(), GatewayError> {
            if let Some(p) = self.live.lock().unwrap().get_mut(&id) {
                p.1 = prefixes;
            }
            Ok(())
        }
        fn update_peer(&self, id: PeerId, _update: PeerUpdate) -> Result<bool, GatewayError> {
            if self.fail_update.load(Ordering::Relaxed) {
                return Err(timeout());
            }
            Ok(self.live.lock().unwrap().contains_key(&id))
        }
    }

    fn tunnel(cidr: &str) -> Tunnel {
        Tunnel {
            public_key: PrivateKey::generate().public_key(),
            preshared_key: PresharedKey::generate(),
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            allowed_ips: vec![cidr.parse().unwrap()],
            persistent_keepalive: None,
            policy: ForwardingPolicy::allow_local(vec!["10.50.0.0/24".parse().unwrap()]),
        }
    }

    fn deny_ssh(mut policy: ForwardingPolicy) -> ForwardingPolicy {
        policy.rules.push(wgxdp_dataplane::policy::FirewallRule {
            name: "no ssh".into(),
            protocol: wgxdp_dataplane::policy::RuleProtocol::Tcp,
            ports: Some(wgxdp_dataplane::policy::PortRange { first: 22, last: 22 }),
            source: None,
            destination: None,
            action: wgxdp_dataplane::policy::RuleAction::Deny,
        });
        policy.default_action = wgxdp_dataplane::policy::RuleAction::Deny;
        policy
    }

    #[test]
    fn a_policy_change_is_applied_in_place() {
        let (peers, tunnels) = (FakePeers::default(), Tunnels::default());
        let old = tunnel("10.1.0.0/16");
        tunnels.apply(&peers, "vpn_a", &old).unwrap();
        assert_eq!(peers.policies.lock().unwrap()[&0], old.policy, "a new peer starts with its policy");
        let new = Tunnel { policy: deny_ssh(old.policy.clone()), ..old.clone() };
        tunnels.apply(&peers, "vpn_a", &new).unwrap();
        assert_eq!(peers.policy_changes.load(Ordering::Relaxed), 1);
        assert_eq!(peers.removes.load(Ordering::Relaxed), 0, "no remove and add: the session survives");
        assert_eq!(tunnels.peers(&["vpn_a"]), vec![Some(0)], "the same peer");
        assert_eq!(peers.policies.lock().unwrap()[&0], new.policy);
        // Applying the same tunnel again changes nothing.
        tunnels.apply(&peers, "vpn_a", &new).unwrap();
        assert_eq!(peers.policy_changes.load(Ordering::Relaxed), 1);
        // A key change replaces the peer, which starts with the new policy.
        let rekeyed = Tunnel { public_key: PrivateKey::generate().public_key(), ..new.clone() };
        tunnels.apply(&peers, "vpn_a", &rekeyed).unwrap();
        assert_eq!(peers.policies.lock().unwrap().values().cloned().collect::<Vec<_>>(), vec![new.policy]);
    }

    #[test]
    fn a_refused_policy_change_is_undone_with_the_rest_of_the_change() {
        let (peers, tunnels) = (FakePeers::default(), Tunnels::default());
        let old = tunnel("10.1.0.0/16");
        tunnels.apply(&peers, "vpn_a", &old).unwrap();
        let new = Tunnel {
            allowed_ips: vec!["10.2.0.0/16".parse().unwrap()],
            policy: deny_ssh(old.policy.clone()),
            ..old.clone()
        };
        peers.fail_policy.store(true, Ordering::Relaxed);
        assert!(tunnels.apply(&peers, "vpn_a", &new).is_err());
        assert_eq!(peers.live()[0].1, new.allowed_ips, "the prefixes changed before the policy failed");
        assert_eq!(peers.policies.lock().unwrap()[&0], old.policy);
        peers.fail_policy.store(false, Ordering::Relaxed);
        tunnels.apply(&peers, "vpn_a", &old).unwrap();
        assert_eq!(peers.live(), vec![(old.public_key, old.allowed_ips.clone())]);
        assert_eq!(peers.policies.lock().unwrap()[&0], old.policy);
        // A policy applied, then the update failing: the rollback restores the policy too.
        peers.fail_update.store(true, Ordering::Relaxed);
        let psk_and_policy = Tunnel { preshared_key: PresharedKey::generate(), ..new.clone() };
        assert!(tunnels.apply(&peers, "vpn_a", &psk_and_policy).is_err());
        assert_eq!(peers.policies.lock().unwrap()[&0], new.policy);
        peers.fail_update.store(false, Ordering::Relaxed);
        tunnels.apply(&peers, "vpn_a", &old).unwrap();
        assert_eq!(peers.policies.lock().unwrap()[&0], old.policy);
    }

    #[test]
    fn conntrack_numbers_are_gauges_and_counters() {
        let mut out = String::new();
        write_conntrack_metrics(
            &mut out,
            &[("conntrack_capacity", 65536), ("conntrack_flows", 3), ("conntrack_evictions", 7)],
        );
        for line in [
            "# TYPE wgxdp_conntrack_capacity gauge",
            "wgxdp_conntrack_capacity 65536",
            "# TYPE wgxdp_conntrack_flows gauge",
            "wgxdp_conntrack_flows 3",
            "# TYPE wgxdp_conntrack_evictions_total counter",
            "wgxdp_conntrack_evictions_total 7",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
    }

    #[test]
    fn a_failed_remove_keeps_the_tunnel_known_so_a_retry_removes_it() {
        let (peers, tunnels) = (FakePeers::default(), Tunnels::default());
        tunnels.apply(&peers, "vpn_a", &tunnel("10.1.0.0/16")).unwrap();
        peers.fail_remove.store(true, Ordering::Relaxed);
        assert!(tunnels.remove(&peers, "vpn_a").is_err());
        assert_eq!(peers.live().len(), 1, "the peer still runs");
        assert_eq!(tunnels.peers(&["vpn_a"]), vec![Some(0)], "and is still known");
        peers.fail_remove.store(false, Ordering::Relaxed);
        tunnels.remove(&peers, "vpn_a").unwrap();
        assert!(peers.live().is_empty(), "the retried delete removed the live peer");
        assert_eq!(tunnels.peers(&["vpn_a"]), vec![None]);
        tunnels.remove(&peers, "vpn_a").unwrap();
    }

    #[test]
    fn a_key_change_whose_removal_fails_can_be_retried_without_a_second_peer() {
        let (peers, tunnels) = (FakePeers::default(), Tunnels::default());
        let old = tunnel("10.1.0.0/16");
        tunnels.apply(&peers, "vpn_a", &old).unwrap();
        let new = Tunnel { public_key: PrivateKey::generate().public_key(), ..old.clone() };
        peers.fail_remove.store(true, Ordering::Relaxed);
        assert!(tunnels.apply(&peers, "vpn_a", &new).is_err());
        assert_eq!(peers.live(), vec![(old.public_key, old.allowed_ips.clone())]);
        peers.fail_remove.store(false, Ordering::Relaxed);
        tunnels.apply(&peers, "vpn_a", &new).unwrap();
        assert_eq!(peers.live(), vec![(new.public_key, new.allowed_ips.clone())], "exactly one peer: the new key");
    }

    #[test]
    fn a_partly_applied_change_is_undone_by_applying_the_old_tunnel() {
        let (peers, tunnels) = (FakePeers::default(), Tunnels::default());
        let old = tunnel("10.1.0.0/16");
        tunnels.apply(&peers, "vpn_a", &old).unwrap();
        let new = Tunnel {
            allowed_ips: vec!["10.2.0.0/16".parse().unwrap()],
            preshared_key: PresharedKey::generate(),
            ..old.clone()
        };
        peers.fail_update.store(true, Ordering::Relaxed);
        assert!(tunnels.apply(&peers, "vpn_a", &new).is_err());
        assert_eq!(peers.live()[0].1, new.allowed_ips, "the prefixes changed before the update failed");
        peers.fail_update.store(false, Ordering::Relaxed);
        // The handler's rollback.
        tunnels.apply(&peers, "vpn_a", &old).unwrap();
        assert_eq!(peers.live(), vec![(old.public_key, old.allowed_ips.clone())]);
    }
}
