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
    /// This node held leases at the last pass.
    holding: bool,
}

impl Default for Served {
    fn default() -> Self {
        Self { applied: HashMap::new(), revision: -1, holding: false }
    }
}

impl Served {
    /// The data plane runs `g` as it is (this version).
    pub fn runs(&self, g: &GatewayRecord) -> bool {
        self.applied.get(&g.id) == Some(&g.updated_at)
    }

    /// A change made here (the data plane runs `g` as it is now).
    pub fn record(&mut self, g: &GatewayRecord) {
        if g.status == Status::Deleted {
            self.applied.remove(&g.id);
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
            let released = s.store.release_leases(me)?;
            for id in served.applied.keys() {
                if let Err(e) = s.plane.remove(id) {
                    tracing::error!(%id, error = %e, "cannot remove a tunnel this node no longer serves");
                }
            }
            out.removed = served.applied.len();
            tracing::warn!(
                released,
                "the floating address is not on this node: its gateways are left to the node that has it"
            );
            *served = Served::default();
        }
        return Ok(out);
    }
    s.store.claim_leases(me)?;
    let changes = s.store.served_changes(me, served.revision)?;
    let mut acknowledged = Vec::new();
    let mut read_up_to = changes.revision;
    for (revision, g) in changes.records {
        match bring_in(s, &mut served, g) {
            Ok(Some((id, at))) => {
                out.applied += 1;
                acknowledged.push((id, at));
            }
            Ok(None) => out.removed += 1,
            Err(e) => {
                tracing::error!(error = %e, "a served gateway's change did not take effect; retrying at the next pass");
                out.failed += 1;
                read_up_to = read_up_to.min(revision - 1);
            }
        }
    }
    s.store.acknowledge(me, &acknowledged)?;
    served.revision = read_up_to;
    // Leases another node took (this one was silent past the TTL): their
    // tunnels run there now, not here.
    let held = usize::try_from(s.store.held_lease_count(me)?).unwrap_or(usize::MAX);
    if held != served.applied.len() {
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
    }
    served.holding = held > 0;
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
                g.updated_at = crate::store::now_millis().max(g.updated_at + 1);
                g.status = Status::Deleted;
                s.settle(&g, EventKind::GatewayDeleted).map_err(|e| e.to_string())?;
                tracing::info!(id = %g.id, "VPN gateway deleted");
            }
            s.store.drop_lease(me, &g.id).map_err(|e| e.to_string())?;
            Ok(None)
        }
        Status::Creating | Status::Active => {
            if served.applied.get(&g.id) != Some(&g.updated_at) {
                s.plane.apply(&g.id, &tunnel_of(&g)).map_err(|e| format!("gateway {}: {e}", g.id))?;
            }
            if g.status == Status::Creating {
                g.updated_at = crate::store::now_millis().max(g.updated_at + 1);
                g.status = Status::Active;
                s.settle(&g, EventKind::GatewayCreated).map_err(|e| e.to_string())?;
                tracing::info!(id = %g.id, name = %g.name, "VPN gateway created");
            }
            served.record(&g);
            Ok(Some((g.id, g.updated_at)))
        }
    }
}

/// Runs passes until `stop`: at each change the store reports, and every
/// `PASS_EVERY` regardless. On a dedicated thread (a pass blocks on the
/// store and the data plane).
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
