//! `/api/v1/vpn-gateways` handlers. Mutations hold `AppState::mutations`,
//! write the store durably, then program the data plane; a create is
//! acknowledged only once the record is on disk and the peer is in the table.

use super::error::ApiError;
use super::extract::{ApiQuery, JsonBody};
use super::model::{
    overlaps, parse_create, remote_config, tunnel_of, GatewayEnvelope, GatewayListEnvelope, GatewayView, ListMeta,
    ObjectMeta, StatusEnvelope, StatusView, UpdateGateway,
};
use super::networks::{find_overlap, validate_remote_vs_site, GatewayNetworks, Network, ADDITIONAL_REMOTE, REMOTE};
use super::AppState;
use crate::plane::TunnelStatus;
use crate::store::{now_millis, GatewayRecord, ListQuery, SortField, SortKey, Status, Store, StoreError};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Runs blocking store/data-plane work off the async runtime.
async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state)).await.map_err(ApiError::internal)?
}

fn existing(store: &Store, id: &str) -> Result<GatewayRecord, ApiError> {
    store.get(id)?.ok_or_else(|| ApiError::not_found(id))
}

/// Live state from the data plane for each record (none for deleted ones), in one trip.
fn live_statuses(state: &AppState, records: &[GatewayRecord]) -> Vec<Option<TunnelStatus>> {
    let ids: Vec<&str> = records.iter().map(|g| g.id.as_str()).collect();
    let live = state.plane.statuses(&ids);
    records.iter().zip(live).map(|(g, s)| s.filter(|_| g.status != Status::Deleted)).collect()
}

fn envelope(state: &AppState, g: &GatewayRecord, reveal_psk: bool) -> GatewayEnvelope {
    let live = live_statuses(state, std::slice::from_ref(g)).pop().flatten();
    GatewayEnvelope {
        data: GatewayView::new(g, live.as_ref(), &state.local_side(), reveal_psk),
        meta: ObjectMeta { persistence: "synced".into() },
    }
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
fn check_conflicts(s: &AppState, remote: &[Network], key: Option<&str>, except: Option<&str>) -> Result<(), ApiError> {
    for (index, peer) in s.settings.static_peers.iter().enumerate() {
        for n in remote {
            if let Some(p) = peer.allowed_ips.iter().find(|p| overlaps(p, &n.prefix)) {
                return Err(ApiError::conflict(format!(
                    "{} {} overlaps {p} of peer {index} in the configuration file",
                    n.field, n.prefix
                )));
            }
        }
        if key.is_some_and(|k| k == peer.public_key.to_base64()) {
            return Err(ApiError::conflict(format!(
                "peer {index} in the configuration file already uses this remote_public_key"
            )));
        }
    }
    if remote.is_empty() && key.is_none() {
        return Ok(());
    }
    let live = s.store.live()?;
    for n in remote {
        if let Some((other, p)) = find_overlap(&n.prefix, &live, except) {
            return Err(ApiError::conflict(format!(
                "{} {} overlaps the remote network {p} of VPN gateway {}",
                n.field, n.prefix, other.id
            )));
        }
    }
    if let Some(other) =
        key.and_then(|k| live.iter().find(|g| g.remote_public_key == k && Some(g.id.as_str()) != except))
    {
        return Err(ApiError::conflict(format!("VPN gateway {} already uses this remote_public_key", other.id)));
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Opaque cursor from the previous page's `meta.next_cursor`.
    pub cursor: Option<String>,
    /// Results per page, 1-100 (default 50).
    pub limit: Option<String>,
    /// creating | active | deleting | deleted (default: all but deleted)
    pub status: Option<String>,
    /// name | created_at (default created_at)
    pub sort: Option<String>,
    /// asc | desc (default asc)
    pub order: Option<String>,
}

/// What a cursor remembers: the query it belongs to and where the page ended.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Cursor {
    sort: String,
    order: String,
    status: Option<String>,
    key: SortKey,
    seq: i64,
}

impl Cursor {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(s: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// List VPN gateways.
#[utoipa::path(get, path = "/api/v1/vpn-gateways", tag = "vpn-gateways", params(ListParams),
    security(("bearer" = [])),
    responses((status = 200, body = GatewayListEnvelope), (status = 400, body = ErrorEnvelope),
        (status = 401, body = ErrorEnvelope), (status = 429, body = ErrorEnvelope)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<GatewayListEnvelope>, ApiError> {
    let limit = match p.limit.as_deref() {
        None => 50,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => return Err(ApiError::bad_request(format!("limit must be an integer from 1 to 100 (got `{s}`)"))),
        },
    };
    let status = match p.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!("status must be creating, active, deleting or deleted (got `{s}`)"))
        })?),
    };
    let sort_name = p.sort.unwrap_or_else(|| "created_at".into());
    let sort = match sort_name.as_str() {
        "name" => SortField::Name,
        "created_at" => SortField::CreatedAt,
        other => return Err(ApiError::bad_request(format!("sort must be name or created_at (got `{other}`)"))),
    };
    let order = p.order.unwrap_or_else(|| "asc".into());
    if order != "asc" && order != "desc" {
        return Err(ApiError::bad_request(format!("order must be asc or desc (got `{order}`)")));
    }
    let after = match p.cursor.as_deref() {
        None => None,
        Some(c) => {
            let c = Cursor::decode(c).ok_or_else(|| ApiError::bad_request("cursor is not valid"))?;
            let key_matches = matches!(
                (&c.key, sort),
                (SortKey::Name(_), SortField::Name) | (SortKey::CreatedAt(_), SortField::CreatedAt)
            );
            if c.sort != sort_name || c.order != order || c.status != p.status || !key_matches {
                return Err(ApiError::bad_request("cursor belongs to a different query (sort, order or status)"));
            }
            Some((c.key, c.seq))
        }
    };
    let query = ListQuery { status, sort, descending: order == "desc", after, limit: limit + 1 };
    let status_param = p.status.clone();
    blocking(&state, move |s| {
        let mut rows = s.store.list(&query)?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = more.then(|| rows.last()).flatten().map(|g| {
            let key = match sort {
                SortField::Name => SortKey::Name(g.name.clone()),
                SortField::CreatedAt => SortKey::CreatedAt(g.created_at),
            };
            Cursor { sort: sort_name.clone(), order: order.clone(), status: status_param.clone(), key, seq: g.seq }
                .encode()
        });
        let local = s.local_side();
        let live = live_statuses(s, &rows);
        let data: Vec<GatewayView> =
            rows.iter().zip(&live).map(|(g, l)| GatewayView::new(g, l.as_ref(), &local, false)).collect();
        Ok(Json(GatewayListEnvelope { meta: ListMeta { limit, count: data.len(), next_cursor }, data }))
    })
    .await
}

/// Create a VPN gateway (one remote site = one WireGuard peer). The
/// pre-shared key is in this response and never again.
#[utoipa::path(post, path = "/api/v1/vpn-gateways", tag = "vpn-gateways", request_body = CreateGateway,
    security(("bearer" = [])),
    responses((status = 201, body = GatewayEnvelope), (status = 400, body = ErrorEnvelope),
        (status = 401, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope),
        (status = 413, body = ErrorEnvelope), (status = 422, body = ErrorEnvelope),
        (status = 429, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
pub async fn create(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let ours = state.plane.public_key();
    let new = parse_create(&body, state.settings.site_cidr.as_deref(), &ours)?;
    let remote = new.networks().remote;
    for n in &remote {
        validate_remote_vs_site(n, state.settings.site_cidr.as_deref(), &state.settings.host_addresses)?;
    }
    let _guard = state.mutations.lock().await;
    let env = blocking(&state, move |s| {
        let key = new.remote_public_key.to_base64();
        check_conflicts(s, &remote, Some(&key), None)?;
        let record = new.into_record(now_millis());
        let mut record = s.store.insert(record).map_err(|e| match e {
            crate::store::StoreError::DuplicateKey => {
                ApiError::conflict("a VPN gateway already uses this remote_public_key")
            }
            e => e.into(),
        })?;
        let tunnel = tunnel_of(&record).map_err(ApiError::internal)?;
        if let Err(e) = s.plane.apply(&record.id, &tunnel) {
            // Never acknowledged: take the record back out.
            if let Err(pe) = write_retrying(&record.id, || s.store.purge(&record.id)) {
                // Left `creating` without a tunnel: the next start finishes the create.
                tracing::error!(id = %record.id, error = %pe, "cannot remove a refused create from the store");
            }
            return Err(ApiError::unavailable(format!("the data plane refused the tunnel: {e}")));
        }
        if let Err(e) = write_retrying(&record.id, || s.store.set_status(&record.id, Status::Active)) {
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
        record.status = Status::Active;
        tracing::info!(id = %record.id, name = %record.name, "VPN gateway created");
        Ok(envelope(s, &record, true))
    })
    .await?;
    let location = format!("/api/v1/vpn-gateways/{}", env.data.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(env)).into_response())
}

/// Get a VPN gateway.
#[utoipa::path(get, path = "/api/v1/vpn-gateways/{id}", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    security(("bearer" = [])),
    responses((status = 200, body = GatewayEnvelope), (status = 401, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope)))]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<GatewayEnvelope>, ApiError> {
    blocking(&state, move |s| Ok(Json(envelope(s, &existing(&s.store, &id)?, false)))).await
}

/// Update a VPN gateway; the running tunnel follows without a restart.
#[utoipa::path(patch, path = "/api/v1/vpn-gateways/{id}", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    request_body = UpdateGateway, security(("bearer" = [])),
    responses((status = 200, body = GatewayEnvelope), (status = 400, body = ErrorEnvelope),
        (status = 401, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope), (status = 422, body = ErrorEnvelope),
        (status = 429, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
pub async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<GatewayEnvelope>, ApiError> {
    let body = UpdateGateway::from_json(&body)?;
    let _guard = state.mutations.lock().await;
    blocking(&state, move |s| {
        let old = existing(&s.store, &id)?;
        refuse_transient(&old)?;
        let changes = body.validate(&old)?;
        let mut new = old.clone();
        new.apply(&changes);
        // The remote networks the request named: routed anew, checked anew.
        let named = |list: &str| match list {
            REMOTE => changes.remote_network_cidr.is_some(),
            ADDITIONAL_REMOTE => changes.additional_remote_network_cidrs.is_some(),
            _ => false,
        };
        let remote: Vec<Network> =
            GatewayNetworks::of_record(&new)?.remote.into_iter().filter(|n| named(n.list)).collect();
        for n in &remote {
            validate_remote_vs_site(n, s.settings.site_cidr.as_deref(), &s.settings.host_addresses)?;
        }
        check_conflicts(s, &remote, None, Some(&id))?;
        new.updated_at = now_millis();
        s.store.save(&new)?;
        let tunnel = tunnel_of(&new).map_err(ApiError::internal)?;
        if let Err(e) = s.plane.apply(&id, &tunnel) {
            // Undo whatever part of the change the data plane took.
            if let Err(pe) =
                tunnel_of(&old).map_err(|e| e.to_string()).and_then(|t| s.plane.apply(&id, &t).map_err(|e| e.0))
            {
                tracing::error!(id = %id, error = %pe, "cannot restore the tunnel of a gateway whose change failed");
            }
            if let Err(se) = write_retrying(&id, || s.store.save(&old)) {
                tracing::error!(id = %id, error = %se, "cannot restore a gateway the data plane refused to change");
            }
            return Err(ApiError::unavailable(format!("the data plane refused the change: {e}")));
        }
        tracing::info!(id = %id, "VPN gateway updated");
        Ok(Json(envelope(s, &new, false)))
    })
    .await
}

/// Delete a VPN gateway: its tunnel stops; the record stays listable as `deleted`.
#[utoipa::path(delete, path = "/api/v1/vpn-gateways/{id}", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    security(("bearer" = [])),
    responses((status = 200, body = GatewayEnvelope), (status = 401, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope),
        (status = 429, body = ErrorEnvelope)))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<GatewayEnvelope>, ApiError> {
    let _guard = state.mutations.lock().await;
    blocking(&state, move |s| {
        let mut g = existing(&s.store, &id)?;
        refuse_transient(&g)?;
        s.store.set_status(&id, Status::Deleting)?;
        if let Err(e) = s.plane.remove(&id) {
            // The tunnel still runs: so is the gateway.
            if let Err(se) = write_retrying(&id, || s.store.set_status(&id, Status::Active)) {
                // Left `deleting` with its tunnel: the next start finishes the removal.
                tracing::error!(id = %id, error = %se, "cannot restore a gateway whose removal failed");
            }
            return Err(ApiError::unavailable(format!("the data plane could not remove the tunnel: {e}")));
        }
        if let Err(e) = write_retrying(&id, || s.store.set_status(&id, Status::Deleted)) {
            // The tunnel is gone and the record says `deleting`, which the
            // next start completes; the client may not assume it is done.
            return Err(store_unavailable(e));
        }
        g.status = Status::Deleted;
        g.updated_at = now_millis();
        tracing::info!(id = %id, "VPN gateway deleted");
        Ok(Json(envelope(s, &g, false)))
    })
    .await
}

/// Live tunnel status from the data plane.
#[utoipa::path(get, path = "/api/v1/vpn-gateways/{id}/status", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    security(("bearer" = [])),
    responses((status = 200, body = StatusEnvelope), (status = 401, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope)))]
pub async fn status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<StatusEnvelope>, ApiError> {
    blocking(&state, move |s| {
        let g = existing(&s.store, &id)?;
        let live = live_statuses(s, std::slice::from_ref(&g)).pop().flatten();
        Ok(Json(StatusEnvelope { data: StatusView::new(&g, live.as_ref()) }))
    })
    .await
}

/// A wg-quick configuration for the remote site (text/plain).
#[utoipa::path(get, path = "/api/v1/vpn-gateways/{id}/config", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    security(("bearer" = [])),
    responses((status = 200, content_type = "text/plain", body = String), (status = 401, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)))]
pub async fn config(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    blocking(&state, move |s| {
        let g = existing(&s.store, &id)?;
        if g.status == Status::Deleted {
            return Err(ApiError::conflict(format!("VPN gateway {id} is deleted")));
        }
        let text = remote_config(&g, &s.local_side());
        Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
    })
    .await
}
