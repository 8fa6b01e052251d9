//! The gateways this node serves, kept in its data plane. Each gateway is
//! served by the one live node that holds its lease (`store::leases`); a
//! node claims the leases of its region that no live node holds (new
//! gateways, or a stopped node's: fail-over), and brings into its data plane
//! every change of what it holds, whichever node's API took it. A pass runs
//! when the store says something changed (PostgreSQL `LISTEN/NOTIFY`) and
//! once a second regardless (the safety net), under the mutation lock.
//!
//! With `[node] floating_address`, a node serves only while that address is
//! on one of its interfaces: keepalived (VRRP) moves the address, and the
//! leases follow it, so the remote sites' one endpoint always reaches the
//! node that runs their tunnels. A node that loses the address gives its
//! leases up; the node that gains it takes them once their holder stops
//! or gives them up.

use super::model::tunnel_of;
use super::AppState;
use crate::store::{EventKind, GatewayRecord, Status, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a pass runs when nothing says the store changed.
pub const PASS_EVERY: Duration = Duration::from_secs(1);
/// How long a change made through a node that does not serve the gateway
/// waits for the serving node to run it before it answers (as stored).
pub const APPLIED_WAIT: Duration = Duration::from_secs(5);

/// What this node's data plane runs of the gateways it holds.
#[derive(Debug)]
pub struct Served {
    /// Per gateway: the `updated_at` of the version running.
    applied: HashMap<String, i64>,
    /// The gateways' revision read up to.
    revision: i64,
    /// The leases' revision (takeovers) last compared with.
    lease_revision: i64,
    /// This node may hold leases (true until a pass found it holds none:
    /// after a restart, the store may still hold some in its name).
    holding: bool,
    /// Gateways whose change did not take effect, retried at each pass
    /// (how many times, so that only the first failure is an error).
    retry: HashMap<String, u32>,
    /// Versions changes made here ran (nobody elsewhere waits for them: the
    /// pass does not acknowledge them).
    ran_here: HashMap<String, i64>,
    /// When every unheld gateway and every stopped node's lease was last
    /// looked at, and the live nodes and leases' revision then.
    full_claim: Option<(Instant, Vec<String>, i64)>,
}

/// Every unheld gateway is looked for at least this often (besides when a
/// node comes or goes, or leases move): new ones are looked for at each pass.
const FULL_CLAIM_EVERY: Duration = Duration::from_secs(30);

impl Default for Served {
    fn default() -> Self {
        Self {
            applied: HashMap::new(),
            revision: -1,
            lease_revision: -1,
            holding: true,
            retry: HashMap::new(),
            ran_here: HashMap::new(),
            full_claim: None,
        }
    }
}

impl Served {
    /// The data plane runs `g` as it is (this version).
    pub fn runs(&self, g: &GatewayRecord) -> bool {
        self.applied.get(&g.id) == Some(&g.updated_at)
    }

    /// A change made here (the data plane runs `g` as it is now).
    pub fn record(&mut self, g: &GatewayRecord) {
        self.runs_now(g);
        if g.status != Status::Deleted {
            self.ran_here.insert(g.id.clone(), g.updated_at);
        }
    }

    /// The data plane runs `g` as it is now.
    fn runs_now(&mut self, g: &GatewayRecord) {
        if g.status == Status::Deleted {
            self.applied.remove(&g.id);
            self.ran_here.remove(&g.id);
        } else {
            self.applied.insert(g.id.clone(), g.updated_at);
        }
    }
}

/// This node may serve now: it has no floating address, or holds it.
pub fn holds_floating_address(s: &AppState) -> bool {
    s.settings.floating_address.is_none_or(|a| wgxdp_dataplane::gateway::host_addresses().contains(&a))
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Tunnels the data plane runs for this node's leases afterwards.
    pub running: usize,
    /// Gateways brought in or changed, and removed.
    pub applied: usize,
    pub removed: usize,
    /// Changes the data plane refused (retried at the next pass).
    pub failed: usize,
}

/// Brings the data plane in line with the leases this node holds: claims
/// what it may serve, applies what changed, settles `creating` and
/// `deleting` gateways (recording their events), removes what it no longer
/// holds, and acknowledges the versions it runs. Call under the mutation
/// lock (`AppState::mutate`).
pub fn pass(s: &AppState) -> Result<Pass, StoreError> {
    let me = &s.settings.node;
    let mut served = s.served.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Pass::default();
    if !holds_floating_address(s) {
        if served.holding || !served.applied.is_empty() {
            // The tunnels stop first: even a store that fails now must not
            // leave them running beside the node that has the address.
            for id in s.plane.tunnel_ids() {
                match s.plane.remove(&id) {
                    Ok(()) => out.removed += 1,
                    Err(e) => tracing::error!(%id, error = %e, "cannot remove a tunnel this node no longer serves"),
                }
            }
            served.applied.clear();
            let released = s.store.release_leases(me)?;
            if released > 0 || out.removed > 0 {
                tracing::warn!(
                    released,
                    "the floating address is not on this node: its gateways are left to the node that has it"
                );
            }
            *served = Served { holding: false, ..Served::default() };
        }
        return Ok(out);
    }
    served.holding = true;
    // New gateways at each pass; stopped nodes' leases and every unheld
    // gateway when a node came or went, leases moved, or a while passed.
    let (live, lease_revision) = (s.store.live_node_ids()?, s.store.lease_revision()?);
    let full = served.full_claim.as_ref().is_none_or(|(at, was_live, was_revision)| {
        at.elapsed() >= FULL_CLAIM_EVERY || *was_live != live || *was_revision != lease_revision
    });
    if full {
        s.store.claim_leases(me)?;
        served.full_claim = Some((Instant::now(), live, s.store.lease_revision()?));
    } else {
        s.store.claim_new_leases(me, served.revision)?;
    }
    let changes = s.store.served_changes(me, served.revision)?;
    let mut records: Vec<(i64, GatewayRecord)> = changes.records.into_iter().map(|(_, a, g)| (a, g)).collect();
    // What failed before, read again (while still held here).
    let retry = std::mem::take(&mut served.retry);
    for id in retry.keys() {
        if records.iter().any(|(_, g)| &g.id == id) {
            continue;
        }
        if let (Some(g), Some(lease)) = (s.store.get(id)?, s.store.lease_of(id)?) {
            if lease.node_id == me.id {
                records.push((lease.applied_at, g));
            }
        }
    }
    let mut acknowledged = Vec::new();
    for (lease_applied, g) in records {
        let id = g.id.clone();
        match bring_in(s, &mut served, g) {
            Ok(Some((id, at))) => {
                out.applied += 1;
                // Only a version not yet acknowledged, nor run by a change
                // made here: an acknowledgement wakes every node.
                let ran_here = served.ran_here.remove(&id) == Some(at);
                if lease_applied != at && !ran_here {
                    acknowledged.push((id, at));
                }
            }
            Ok(None) => {}
            Err(e) => {
                let tries = retry.get(&id).copied().unwrap_or(0);
                if tries == 0 {
                    tracing::error!(error = %e, "a served gateway's change did not take effect; retrying at each pass");
                } else {
                    tracing::debug!(error = %e, tries, "a served gateway's change still does not take effect");
                }
                out.failed += 1;
                served.retry.insert(id, tries + 1);
            }
        }
    }
    s.store.acknowledge(me, &acknowledged)?;
    served.revision = changes.revision;
    // Leases another node took (this one was silent past the TTL): their
    // tunnels run there now, not here. Every takeover moves the leases'
    // revision; only then are the sets compared.
    let lease_revision = s.store.lease_revision()?;
    if lease_revision != served.lease_revision {
        let held: std::collections::HashSet<String> = s.store.held_ids(me)?.into_iter().collect();
        let lost: Vec<String> = served.applied.keys().filter(|id| !held.contains(*id)).cloned().collect();
        for id in lost {
            tracing::warn!(%id, "another node serves this gateway now; its tunnel stops here");
            match s.plane.remove(&id) {
                Ok(()) => {
                    served.applied.remove(&id);
                    out.removed += 1;
                }
                Err(e) => tracing::error!(%id, error = %e, "cannot remove a tunnel another node serves now"),
            }
        }
        if served.applied.keys().all(|id| held.contains(id)) {
            served.lease_revision = lease_revision;
        }
    }
    out.running = served.applied.len();
    Ok(out)
}

/// Brings one held gateway into the data plane as the store has it: the
/// version now running (to acknowledge), or `None` if it runs no more.
fn bring_in(s: &AppState, served: &mut Served, mut g: GatewayRecord) -> Result<Option<(String, i64)>, String> {
    let me = &s.settings.node;
    if !me.serves(&g.region) {
        // Held from before this node's region changed: another node's now.
        s.plane.remove(&g.id).map_err(|e| e.to_string())?;
        served.applied.remove(&g.id);
        s.store.drop_lease(me, &g.id).map_err(|e| e.to_string())?;
        return Ok(None);
    }
    match g.status {
        Status::Deleted | Status::Deleting => {
            s.plane.remove(&g.id).map_err(|e| format!("gateway {}: {e}", g.id))?;
            served.applied.remove(&g.id);
            if g.status == Status::Deleting {
                if !settle_to(s, &mut g, Status::Deleted, EventKind::GatewayDeleted)? {
                    return Ok(None);
                }
                tracing::info!(id = %g.id, "VPN gateway deleted");
            }
            s.store.drop_lease(me, &g.id).map_err(|e| e.to_string())?;
            Ok(None)
        }
        Status::Creating | Status::Active => {
            if served.applied.get(&g.id) != Some(&g.updated_at) {
                // A create or change another node's API took could not be
                // checked against what only this node knows. (What ran
                // before a restart or a takeover runs again as it was.)
                if g.status == Status::Creating || served.applied.contains_key(&g.id) {
                    super::changes::check_served_here(s, &g)
                        .map_err(|e| format!("gateway {} is not run here: {}", g.id, e.message))?;
                }
                s.plane.apply(&g.id, &tunnel_of(&g)).map_err(|e| format!("gateway {}: {e}", g.id))?;
            }
            served.runs_now(&g);
            if g.status == Status::Creating {
                // Deleted through another node meanwhile: what runs is left
                // to the next pass.
                if !settle_to(s, &mut g, Status::Active, EventKind::GatewayCreated)? {
                    return Ok(None);
                }
                served.runs_now(&g);
                tracing::info!(id = %g.id, name = %g.name, "VPN gateway created");
            }
            Ok(Some((g.id, g.updated_at)))
        }
    }
}

/// Runs passes until `stop`: at each change the store reports, and every
/// `PASS_EVERY` regardless. On a dedicated thread (a pass blocks on the
/// store and the data plane).
/// Writes `g` on as a new version in status `to`, with its event, unless
/// the stored gateway changed since it was read: false then, nothing
/// written (the next pass reads it again).
fn settle_to(s: &AppState, g: &mut GatewayRecord, to: Status, kind: EventKind) -> Result<bool, String> {
    let from = (g.status, g.updated_at);
    g.updated_at = crate::store::now_millis().max(g.updated_at + 1);
    g.status = to;
    s.settle_from(g, from, kind).map_err(|e| e.to_string())
}

pub fn run(state: Arc<AppState>, stop: Arc<AtomicBool>) {
    state.store.watch_changes();
    let mut mark = state.store.change_mark();
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let done = {
            let _guard = state.mutations.blocking_lock();
            pass(&state)
        };
        match done {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("the served gateways are in step with the store again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot bring the served gateways in step with the store; retrying");
            }
            Err(_) => {}
        }
        // Changes made during the pass (its own included) wake the next one;
        // a store that keeps changing is read at most every 10 ms.
        let rest = PASS_EVERY.saturating_sub(started.elapsed());
        let seen = state.store.wait_for_change(mark, rest);
        if seen != mark {
            std::thread::sleep(Duration::from_millis(10).saturating_sub(started.elapsed()));
        }
        mark = state.store.change_mark();
    }
}

/// After a change made here to gateway `id`, which another node serves:
/// waits (at most `limit`) until that node runs the version stamped
/// `updated_at` (a create: until it is `active`; a delete: `deleted`), and
/// returns the gateway as the store has it then.
pub fn wait_until_served(
    s: &AppState,
    id: &str,
    updated_at: i64,
    limit: Duration,
) -> Result<GatewayRecord, StoreError> {
    let deadline = Instant::now() + limit;
    loop {
        let mark = s.store.change_mark();
        let g = s.store.get(id)?.ok_or_else(|| StoreError::Database(format!("gateway {id} is gone")))?;
        let applied = s.store.lease_of(id)?.is_some_and(|l| l.holder_live && l.applied_at >= updated_at);
        let settled = match g.status {
            Status::Creating | Status::Deleting => false,
            Status::Deleted => true,
            Status::Active => applied,
        };
        let now = Instant::now();
        if settled || now >= deadline {
            if !settled {
                tracing::warn!(%id, "the serving node has not applied the change yet; it will at its next pass");
            }
            return Ok(g);
        }
        // Told by the serving node's acknowledgement (NOTIFY); polled as well.
        s.store.wait_for_change(mark, (deadline - now).min(Duration::from_millis(200)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiSettings;
    use crate::plane::MemoryPlane;
    use crate::store::testing::TestDb;
    use crate::store::{sample, sample_in, ThisNode};

    fn node_state(db: &TestDb, floating: Option<&str>) -> (Arc<AppState>, Arc<MemoryPlane>) {
        let store = Arc::new(db.open());
        let plane = Arc::new(MemoryPlane::new(wgxdp_dataplane::noise::PrivateKey::generate().public_key()));
        let node = ThisNode { id: "a1".into(), region: "eu".into(), ..ThisNode::default() };
        store.heartbeat(&node).unwrap();
        let settings =
            ApiSettings { node, floating_address: floating.map(|a| a.parse().unwrap()), ..ApiSettings::default() };
        (AppState::new(store, plane.clone(), settings), plane)
    }

    fn eu_gateway(name: &str, status: Status) -> GatewayRecord {
        GatewayRecord { status, ..sample_in(name, name, "eu") }
    }

    /// A node that starts without its floating address (keepalived moved it
    /// while the node was down) gives up the leases the store still holds
    /// in its name, so that the node with the address can take them.
    #[test]
    fn a_node_without_its_floating_address_gives_up_what_the_store_says_it_holds() {
        let db = TestDb::sqlite();
        let (s, plane) = node_state(&db, Some("192.0.2.254"));
        let g = s.store.insert_served(eu_gateway("held", Status::Active), &s.settings.node).unwrap();
        assert!(!holds_floating_address(&s));
        pass(&s).unwrap();
        assert_eq!(s.store.lease_of(&g.id).unwrap(), None, "released");
        assert!(plane.tunnels.lock().unwrap().is_empty());
        // And it claims nothing while the address is elsewhere.
        s.store.insert(eu_gateway("new", Status::Creating)).unwrap();
        pass(&s).unwrap();
        assert_eq!(s.store.held_ids(&s.settings.node).unwrap().len(), 0);
    }

    /// A create read by the serving node and deleted through another node
    /// before its settle: the settle is refused (no `gateway.created`), and
    /// the next pass removes the tunnel and completes the delete.
    #[test]
    fn a_create_deleted_while_it_was_brought_in_is_removed_not_revived() {
        let db = TestDb::sqlite();
        let (s, plane) = node_state(&db, None);
        let g = s.store.insert(eu_gateway("racing", Status::Creating)).unwrap();
        assert_eq!(s.store.claim_leases(&s.settings.node).unwrap(), 1);
        let read = s.store.get(&g.id).unwrap().unwrap();
        s.store.set_status_at(&g.id, Status::Deleting, g.updated_at + 1).unwrap();
        let mut served = Served::default();
        assert_eq!(bring_in(&s, &mut served, read).unwrap(), None, "the settle found it changed");
        assert_eq!(s.store.get(&g.id).unwrap().unwrap().status, Status::Deleting);
        assert!(plane.tunnels.lock().unwrap().contains_key(&g.id), "applied before the settle");
        let passed = pass(&s).unwrap();
        assert_eq!(passed.running, 0, "{passed:?}");
        assert!(plane.tunnels.lock().unwrap().is_empty());
        assert_eq!(s.store.get(&g.id).unwrap().unwrap().status, Status::Deleted);
        let kinds: Vec<String> =
            s.store.events_after(0, 10).unwrap().iter().map(|e| e.kind.as_str().to_owned()).collect();
        assert_eq!(kinds, ["gateway.deleted"], "never created");
    }

    /// A create another node's API took that routes this host's own address
    /// is not run here (that node could not know the address); it stays
    /// `creating` until deleted.
    #[test]
    fn a_create_that_routes_this_hosts_address_is_not_run() {
        let db = TestDb::sqlite();
        let (s, plane) = node_state(&db, None);
        let host = sample("x", "x").remote_network_cidr.addr();
        let s = AppState::new(
            s.store.clone(),
            plane.clone(),
            ApiSettings { host_addresses: vec![host], ..s.settings.clone() },
        );
        let g = s.store.insert(eu_gateway("routes-host", Status::Creating)).unwrap();
        let passed = pass(&s).unwrap();
        assert_eq!((passed.running, passed.failed), (0, 1), "{passed:?}");
        assert!(plane.tunnels.lock().unwrap().is_empty());
        assert_eq!(s.store.get(&g.id).unwrap().unwrap().status, Status::Creating);
        // Nothing wakes the next pass: no acknowledgement was written.
        let mark = s.store.change_mark();
        pass(&s).unwrap();
        assert_eq!(s.store.change_mark(), mark, "a retry that fails again writes nothing");
        // Its serving node can delete it.
        let deleted = crate::api::changes::delete(&s, &g.id, None).unwrap();
        assert_eq!(deleted.status, Status::Deleted);
        assert_eq!(pass(&s).unwrap().failed, 0, "no longer retried");
    }

    /// Leases another node took while this one was silent: their tunnels
    /// stop here at the next pass.
    #[test]
    fn tunnels_whose_lease_another_node_took_stop_here() {
        let db = TestDb::sqlite();
        let (s, plane) = node_state(&db, None);
        let g = s.store.insert(eu_gateway("moved", Status::Creating)).unwrap();
        assert_eq!(pass(&s).unwrap().running, 1);
        assert!(plane.tunnels.lock().unwrap().contains_key(&g.id));
        // a1 silent past the TTL; a2 claims.
        s.store.leave(&s.settings.node).unwrap();
        let a2 = ThisNode { id: "a2".into(), region: "eu".into(), ..ThisNode::default() };
        s.store.heartbeat(&a2).unwrap();
        assert_eq!(s.store.claim_leases(&a2).unwrap(), 1);
        s.store.heartbeat(&s.settings.node).unwrap();
        assert_eq!(pass(&s).unwrap().running, 0);
        assert!(plane.tunnels.lock().unwrap().is_empty(), "runs on a2 only");
    }
}
