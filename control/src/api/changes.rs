//! The gateway changes every front end runs: the HTTP handlers and the `wg`
//! socket (`crate::uapi`). A change is acknowledged only once the store holds
//! it and the data plane runs it; a failure leaves both as they were. Callers
//! run them through `AppState::mutate`: one at a time (check-then-write stays
//! atomic), off the async runtime (they block on the store and the data plane).
//! Each acknowledged change records its event (`gateway.created|updated|deleted`).

use super::conditional::check_if_match;
use super::error::ApiError;
use super::model::{overlaps, tunnel_of, NewGateway, UpdateGateway};
use super::networks::{validate_remote_vs_site, GatewayNetworks, Network, ADDITIONAL_REMOTE, REMOTE};
use super::{serving, AppState};
use crate::store::{now_millis, EventKind, GatewayRecord, Status, Store, StoreError};
use std::time::Duration;
use wgxdp_dataplane::noise::PublicKey;
use wgxdp_dataplane::table::IpPrefix;

pub(crate) fn existing(store: &Store, id: &str) -> Result<GatewayRecord, ApiError> {
    store.get(id)?.ok_or_else(|| ApiError::not_found(id))
}

/// A store write that follows a data-plane change is retried a few times
/// before the caller rolls the data plane back.
fn write_retrying(id: &str, mut write: impl FnMut() -> Result<(), StoreError>) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        match write() {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= 3 => return Err(e),
            Err(e) => {
                tracing::warn!(%id, error = %e, attempt, "store write failed; retrying");
                std::thread::sleep(delay);
                delay *= 4;
                attempt += 1;
            }
        }
    }
}

fn store_unavailable(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "the store failed after the data plane changed; rolled back");
    ApiError::unavailable("the database could not record the change; it was not applied, retry later")
}

/// 409 if a remote network in `remote` overlaps, or `key` equals, a peer the
/// data plane already holds: a live API gateway (other than `except`) or a
/// configuration-file peer.
pub(crate) fn check_conflicts(
    s: &AppState,
    remote: &[Network],
    key: Option<&PublicKey>,
    except: Option<&str>,
) -> Result<(), ApiError> {
    check_static_peers(s, remote, key)?;
    for n in remote {
        if let Some((other, p)) = s.store.remote_overlap(&n.prefix, except) {
            return Err(ApiError::conflict(format!(
                "{} {} overlaps the remote network {p} of VPN gateway {other}",
                n.field, n.prefix
            )));
        }
    }
    if let Some(other) = key.and_then(|k| s.store.remote_key_owner(k, except)) {
        return Err(ApiError::conflict(format!("VPN gateway {other} already uses this remote_public_key")));
    }
    Ok(())
}

/// 409 if a remote network in `remote` overlaps, or `key` equals, a peer of
/// this node's configuration file.
fn check_static_peers(s: &AppState, remote: &[Network], key: Option<&PublicKey>) -> Result<(), ApiError> {
    for (index, peer) in s.settings.static_peers.iter().enumerate() {
        for n in remote {
            if let Some(p) = peer.allowed_ips.iter().find(|p| overlaps(p, &n.prefix)) {
                return Err(ApiError::conflict(format!(
                    "{} {} overlaps {p} of peer {index} in the configuration file",
                    n.field, n.prefix
                )));
            }
        }
        if key == Some(&peer.public_key) {
            return Err(ApiError::conflict(format!(
                "peer {index} in the configuration file already uses this remote_public_key"
            )));
        }
    }
    Ok(())
}

/// 409 if `remote` (every remote network of new gateways, or of gateway
/// `except` as a change makes it) would take the data plane past the remote
/// networks of one address family it can steer, every peer together.
pub(crate) fn check_capacity(s: &AppState, remote: &[IpPrefix], except: Option<&str>) -> Result<(), ApiError> {
    let max = s.settings.max_remote_networks;
    for (v6, family) in [(false, "IPv4"), (true, "IPv6")] {
        let adding = remote.iter().filter(|p| p.addr().is_ipv6() == v6).count();
        if adding == 0 {
            continue;
        }
        let files = s.settings.static_peers.iter().flat_map(|p| &p.allowed_ips);
        let held = s.store.remote_network_count(v6, except) + files.filter(|p| p.addr().is_ipv6() == v6).count();
        if held + adding > max {
            return Err(ApiError::conflict(format!(
                "this gateway routes at most {max} {family} remote networks, all VPN gateways and configuration-file \
                 peers together; {held} are in use"
            )));
        }
    }
    Ok(())
}

fn refuse_transient(g: &GatewayRecord) -> Result<(), ApiError> {
    match g.status {
        s if s.is_transient() => {
            Err(ApiError::conflict(format!("VPN gateway {} is {}; retry when it settles", g.id, s.as_str())))
        }
        Status::Deleted => Err(ApiError::conflict(format!("VPN gateway {} is deleted", g.id))),
        _ => Ok(()),
    }
}

/// A gateway of `region` can be served: by this node, or by a live node
/// of that region (any node's API takes any region's changes; the serving
/// node runs them). 422 when none does.
pub(crate) fn check_region(s: &AppState, region: &str) -> Result<(), ApiError> {
    if s.settings.node.serves(region) || !s.store.live_nodes_of(region)?.is_empty() {
        return Ok(());
    }
    Err(ApiError::validation(
        "region",
        format!("no live node serves region `{region}` (GET /api/v1/nodes lists the nodes and their regions)"),
    ))
}

/// A change of a gateway of `region` (`id`: an existing one) runs in this
/// node's data plane: this node serves the region, may serve now (its
/// floating address, if any, is here) and holds the gateway's lease, or
/// takes it because no live node holds it. Otherwise the serving node runs
/// it (`serving`): this node only writes the store.
fn served_here(s: &AppState, region: &str, id: Option<&str>) -> Result<bool, ApiError> {
    let me = &s.settings.node;
    // Without its floating address a node runs nothing (its next pass
    // gives up what it holds).
    if !serving::holds_floating_address(s) {
        return Ok(false);
    }
    let lease = id.map(|id| s.store.lease_of(id)).transpose()?.flatten();
    if lease.as_ref().is_some_and(|l| l.node_id == me.id) {
        return Ok(true);
    }
    // Its own region, or (a node of every region) one with no live node of
    // its own: `others_of`, the rule the side and site shown follow too.
    if s.others_of(region)?.is_some() {
        return Ok(false);
    }
    Ok(match (id, lease) {
        (None, _) => true,
        (Some(_), Some(lease)) if lease.holder_live => false,
        (Some(id), _) => s.store.claim_lease(me, id)?,
    })
}

/// The change that made `g` runs in this node's data plane already (or
/// nothing runs any more): the answer need not wait for another node.
pub(crate) fn is_served_here(s: &AppState, g: &GatewayRecord) -> bool {
    g.status == Status::Deleted || s.served.lock().unwrap_or_else(|p| p.into_inner()).runs(g)
}

/// The site network of `region` and the host addresses its tunnels may not
/// route: this host's where this node serves the region (another region's
/// hosts are their nodes' own concern).
fn site_of<'a>(s: &'a AppState, region: &str) -> (Option<IpPrefix>, &'a [std::net::IpAddr]) {
    let ours = matches!(s.others_of(region), Ok(None));
    let hosts: &[std::net::IpAddr] = if ours { &s.settings.host_addresses } else { &[] };
    (s.site_cidr_of(region), hosts)
}

/// What only the serving node knows, checked where it runs a gateway that
/// another node's API took: its remote networks against this host's
/// addresses and this node's configuration-file peers, its key against
/// theirs.
pub(crate) fn check_served_here(s: &AppState, g: &GatewayRecord) -> Result<(), ApiError> {
    let remote = GatewayNetworks::of_record(g).remote;
    for n in &remote {
        validate_remote_vs_site(n, None, &s.settings.host_addresses)?;
    }
    check_static_peers(s, &remote, Some(&g.remote_public_key))
}

/// The remote networks of a new gateway, checked against this site (its
/// networks and the host's addresses) and its region; not yet against other
/// gateways.
pub fn check_new(s: &AppState, new: &NewGateway) -> Result<Vec<Network>, ApiError> {
    check_region(s, &new.region)?;
    let remote = new.networks().remote;
    let (site, hosts) = site_of(s, &new.region);
    for n in &remote {
        validate_remote_vs_site(n, site, hosts)?;
    }
    Ok(remote)
}

/// What gateway `old` becomes under `body`, validated and checked against
/// this site, with the remote networks the change names (routed anew); not
/// yet checked against other gateways.
pub fn check_update(
    s: &AppState,
    old: &GatewayRecord,
    body: UpdateGateway,
) -> Result<(GatewayRecord, Vec<Network>), ApiError> {
    refuse_transient(old)?;
    let changes = body.validate(old)?;
    let mut new = old.clone();
    new.apply(&changes);
    let named = |list: &str| match list {
        REMOTE => changes.remote_network_cidr.is_some(),
        ADDITIONAL_REMOTE => changes.additional_remote_network_cidrs.is_some(),
        _ => false,
    };
    let remote: Vec<Network> = GatewayNetworks::of_record(&new).remote.into_iter().filter(|n| named(n.list)).collect();
    let (site, hosts) = site_of(s, &old.region);
    for n in &remote {
        validate_remote_vs_site(n, site, hosts)?;
    }
    Ok((new, remote))
}

/// Stores a validated gateway and starts its tunnel; returns the `active` record.
pub fn create(s: &AppState, new: NewGateway) -> Result<GatewayRecord, ApiError> {
    let remote = check_new(s, &new)?;
    check_conflicts(s, &remote, Some(&new.remote_public_key), None)?;
    check_capacity(s, &remote.iter().map(|n| n.prefix).collect::<Vec<_>>(), None)?;
    commit_create(s, new.into_record(now_millis()))
}

/// Stores a new gateway (`creating`) and starts its tunnel; returns the
/// `active` record. Its checks are done: `create` runs them for one gateway,
/// `restore` for a whole backup. One that another node serves is stored
/// `creating`, and returned so: that node starts it (`serving`).
pub(crate) fn commit_create(s: &AppState, record: GatewayRecord) -> Result<GatewayRecord, ApiError> {
    let duplicate = |e| match e {
        StoreError::DuplicateKey => ApiError::conflict("a VPN gateway already uses this remote_public_key"),
        e => e.into(),
    };
    if !served_here(s, &record.region, None)? {
        let record = s.store.insert(record).map_err(duplicate)?;
        tracing::info!(id = %record.id, region = %record.region, "VPN gateway stored; its region's node starts it");
        return Ok(record);
    }
    // Held by this node from the start: no other node may claim it between
    // the insert and the tunnel.
    let record = s.store.insert_served(record, &s.settings.node).map_err(duplicate)?;
    if let Err(e) = s.plane.apply(&record.id, &tunnel_of(&record)) {
        // Never acknowledged: take the record back out.
        if let Err(pe) = write_retrying(&record.id, || s.store.purge(&record.id)) {
            // Left `creating` without a tunnel: the next start finishes the create.
            tracing::error!(id = %record.id, error = %pe, "cannot remove a refused create from the store");
        }
        return Err(ApiError::unavailable(format!("the data plane refused the tunnel: {e}")));
    }
    let active = GatewayRecord { status: Status::Active, updated_at: now_millis(), ..record.clone() };
    if let Err(e) = write_retrying(&record.id, || s.settle(&active, EventKind::GatewayCreated)) {
        // The tunnel runs but the store cannot say so: take it back out, so
        // that the record (`creating`, or gone) and the data plane agree.
        match s.plane.remove(&record.id) {
            Ok(()) => {
                let _ = s.store.purge(&record.id);
            }
            // The tunnel still runs: keep the record (`creating`, which the
            // next start finishes) so that it, its key and its prefix stay
            // accounted for instead of running unrecorded.
            Err(pe) => {
                tracing::error!(id = %record.id, error = %pe, "cannot roll back a tunnel the store did not record")
            }
        }
        return Err(store_unavailable(e));
    }
    s.served.lock().unwrap_or_else(|p| p.into_inner()).record(&active);
    tracing::info!(id = %active.id, name = %active.name, "VPN gateway created");
    Ok(active)
}

/// Validates `body` against gateway `id`, stores the result and changes the
/// running tunnel in place; returns the new record. `if_match`: the client's
/// `If-Match`, checked against the stored gateway first.
pub fn update(s: &AppState, id: &str, body: UpdateGateway, if_match: Option<&str>) -> Result<GatewayRecord, ApiError> {
    let old = existing(&s.store, id)?;
    // The precondition first (RFC 9110 13.2.2): a stale tag is a 412 whatever
    // else the change would meet.
    check_if_match(if_match, &old)?;
    let (mut new, remote) = check_update(s, &old, body)?;
    check_conflicts(s, &remote, None, Some(id))?;
    check_capacity(s, &new.remote_prefixes().collect::<Vec<_>>(), Some(id))?;
    // Every change a new stamp (the ETag's), even two in one millisecond or
    // after the clock stepped back.
    new.updated_at = now_millis().max(old.updated_at + 1);
    if !served_here(s, &old.region, Some(id))? {
        // Its serving node applies it (and, until one serves it, the next
        // node that does).
        s.settle(&new, EventKind::GatewayUpdated).map_err(store_unavailable)?;
        tracing::info!(%id, "VPN gateway updated; its serving node applies it");
        return Ok(new);
    }
    // The data plane first, then the record with its event in one
    // transaction; if that write fails, the data plane goes back.
    let restore_plane = || {
        if let Err(pe) = s.plane.apply(id, &tunnel_of(&old)) {
            tracing::error!(id = %id, error = %pe, "cannot restore the tunnel of a gateway whose change failed");
        }
    };
    if let Err(e) = s.plane.apply(id, &tunnel_of(&new)) {
        // Undo whatever part of the change the data plane took.
        restore_plane();
        return Err(ApiError::unavailable(format!("the data plane refused the change: {e}")));
    }
    if let Err(e) = write_retrying(id, || s.settle(&new, EventKind::GatewayUpdated)) {
        restore_plane();
        return Err(store_unavailable(e));
    }
    s.served.lock().unwrap_or_else(|p| p.into_inner()).record(&new);
    tracing::info!(id = %id, "VPN gateway updated");
    Ok(new)
}

/// Stops gateway `id`'s tunnel; the record stays, `deleted`. Returns it.
/// `if_match` as for `update`.
pub fn delete(s: &AppState, id: &str, if_match: Option<&str>) -> Result<GatewayRecord, ApiError> {
    let g = existing(&s.store, id)?;
    check_if_match(if_match, &g)?;
    if !served_here(s, &g.region, Some(id))? {
        return delete_elsewhere(s, g);
    }
    // A gateway this node serves is `creating` here only when its tunnel
    // could not be started (a create another node took that this node
    // refused): it can go. A local create never shows: it ends under the
    // same lock as this.
    if g.status != Status::Creating {
        refuse_transient(&g)?;
    }
    s.store.set_status(id, Status::Deleting)?;
    if let Err(e) = s.plane.remove(id) {
        // The tunnel still runs: so is the gateway.
        // Back as it was, stamp included: its ETag holds again.
        if let Err(se) = write_retrying(id, || s.store.set_status_at(id, Status::Active, g.updated_at)) {
            // Left `deleting` with its tunnel: the next start finishes the removal.
            tracing::error!(id = %id, error = %se, "cannot restore a gateway whose removal failed");
        }
        return Err(ApiError::unavailable(format!("the data plane could not remove the tunnel: {e}")));
    }
    // The stamp the answer (and its ETag) carries is the one stored.
    let deleted = GatewayRecord { status: Status::Deleted, updated_at: now_millis().max(g.updated_at + 1), ..g };
    if let Err(e) = write_retrying(id, || s.settle(&deleted, EventKind::GatewayDeleted)) {
        // The tunnel is gone and the record says `deleting`, which the
        // next start completes; the client may not assume it is done.
        return Err(store_unavailable(e));
    }
    s.served.lock().unwrap_or_else(|p| p.into_inner()).record(&deleted);
    if let Err(e) = s.store.drop_lease(&s.settings.node, id) {
        tracing::warn!(%id, error = %e, "cannot drop the lease of a deleted gateway; dropped at the next pass");
    }
    tracing::info!(id = %id, "VPN gateway deleted");
    Ok(deleted)
}

/// Deletes gateway `g`, which another node serves: marked `deleting`, which
/// its serving node completes (one still `creating` there may go too: it
/// waits for that node). When no live node holds it, nothing runs it: it
/// is `deleted` at once.
fn delete_elsewhere(s: &AppState, mut g: GatewayRecord) -> Result<GatewayRecord, ApiError> {
    match g.status {
        Status::Deleting => return Err(ApiError::conflict(format!("VPN gateway {} is deleting", g.id))),
        Status::Deleted => return Err(ApiError::conflict(format!("VPN gateway {} is deleted", g.id))),
        Status::Creating | Status::Active => {}
    }
    g.updated_at = now_millis().max(g.updated_at + 1);
    let held = s.store.lease_of(&g.id)?.is_some_and(|l| l.holder_live);
    if held {
        s.store.set_status_at(&g.id, Status::Deleting, g.updated_at)?;
        g.status = Status::Deleting;
        tracing::info!(id = %g.id, "VPN gateway deleting; its serving node removes it");
    } else {
        g.status = Status::Deleted;
        s.settle(&g, EventKind::GatewayDeleted).map_err(store_unavailable)?;
        if let Err(e) = s.store.forget_lease(&g.id) {
            tracing::warn!(id = %g.id, error = %e, "cannot forget the lease of a deleted gateway");
        }
        tracing::info!(id = %g.id, "VPN gateway deleted (no node served it)");
    }
    Ok(g)
}

/// Brings the data plane in line with the store after a start: claims the
/// gateways this node serves, programs them, finishes the changes the
/// previous run did not (`creating` ones become `active`, `deleting` ones
/// `deleted`, each recording its event, which was never recorded since the
/// change was never acknowledged). A row that does not decode (edited by
/// hand) is logged, naming it and its column, and left as it is: the other
/// tunnels still start. Returns how many tunnels run.
pub fn replay(state: &AppState) -> Result<usize, StoreError> {
    Ok(serving::pass(state)?.running)
}
