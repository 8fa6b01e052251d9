//! `/api/v1/vpn-gateways` handlers. Mutations run the changes in `changes`
//! (shared with the `wg` socket) through `AppState::mutate`: a change is
//! acknowledged only once the store holds it and the data plane runs it.

use super::changes;
use super::conditional::etag;
use super::error::ApiError;
use super::extract::{ApiQuery, JsonBody};
use super::import::{parse_import, peer_field};
use super::model::{
    parse_create, remote_config, GatewayEnvelope, GatewayListEnvelope, GatewayView, ListMeta, NewGateway, ObjectMeta,
    StatusEnvelope, StatusView, UpdateGateway,
};
use super::{blocking, serving, AppState};
use crate::plane::TunnelStatus;
use crate::store::{GatewayRecord, ListQuery, SortField, SortKey, Status};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Live state for each record (none for deleted ones): from this node's
/// data plane, in one trip; for a gateway another node serves, what that
/// node published (while it is live), in one query.
fn live_statuses(state: &AppState, records: &[GatewayRecord]) -> Vec<Option<TunnelStatus>> {
    let ids: Vec<&str> = records.iter().map(|g| g.id.as_str()).collect();
    let mut live = state.plane.statuses(&ids);
    for (s, g) in live.iter_mut().zip(records) {
        if g.status == Status::Deleted {
            *s = None;
        }
    }
    let elsewhere: Vec<usize> =
        (0..records.len()).filter(|&i| live[i].is_none() && records[i].status != Status::Deleted).collect();
    if elsewhere.is_empty() {
        return live;
    }
    let asked: Vec<&str> = elsewhere.iter().map(|&i| ids[i]).collect();
    match state.store.published_statuses(&asked) {
        Ok(published) => {
            for (i, p) in elsewhere.into_iter().zip(published) {
                live[i] = p.filter(|p| p.publisher_live).map(|p| p.status);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the tunnel states other nodes published"),
    }
    live
}

/// Runs `change` (`AppState::change`); its gateway once the data plane that
/// serves it runs it: at once when that is this node's, else after waiting
/// (outside every lock) for the serving node, at most `serving::APPLIED_WAIT`.
async fn changed(
    state: &Arc<AppState>,
    change: impl FnOnce(&AppState) -> Result<GatewayRecord, ApiError> + Send + 'static,
) -> Result<GatewayRecord, ApiError> {
    let (g, here) = state
        .change(move |s| {
            let g = change(s)?;
            let here = changes::is_served_here(s, &g);
            Ok((g, here))
        })
        .await?;
    if here {
        return Ok(g);
    }
    blocking(state, move |s| Ok(serving::wait_until_served(s, &g.id, g.updated_at, serving::APPLIED_WAIT)?)).await
}

/// A gateway's answer: its view and, in an `ETag` header, its entity tag.
type Tagged = ([(header::HeaderName, String); 1], Json<GatewayEnvelope>);

fn tagged(state: &AppState, g: &GatewayRecord, reveal_psk: bool) -> Tagged {
    ([(header::ETAG, etag(g))], Json(envelope(state, g, reveal_psk)))
}

/// The `If-Match` header's value (one that is not text matches nothing).
fn if_match(headers: &HeaderMap) -> Option<String> {
    headers.get(header::IF_MATCH).map(|v| v.to_str().unwrap_or("\u{0}").to_owned())
}

fn envelope(state: &AppState, g: &GatewayRecord, reveal_psk: bool) -> GatewayEnvelope {
    let live = live_statuses(state, std::slice::from_ref(g)).pop().flatten();
    GatewayEnvelope {
        data: GatewayView::new(g, live.as_ref(), &state.local_side_of(&g.region), reveal_psk),
        meta: ObjectMeta { persistence: "synced".into() },
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Opaque cursor from the previous page's `meta.next_cursor`, passed
    /// with the same `status`, `sort` and `order` (400 otherwise).
    pub cursor: Option<String>,
    /// Results per page (default 50).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// Only gateways in this state (default: all but deleted).
    #[param(inline)]
    pub status: Option<Status>,
    /// Default `created_at`.
    #[param(inline)]
    pub sort: Option<ListSort>,
    /// Default `asc`.
    #[param(inline)]
    pub order: Option<ListOrder>,
}

/// What a listing is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListSort {
    Name,
    #[default]
    CreatedAt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListOrder {
    #[default]
    Asc,
    Desc,
}

/// What a cursor remembers: the query it belongs to and where the page ended.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Cursor {
    sort: ListSort,
    order: ListOrder,
    status: Option<Status>,
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
    responses((status = 200, body = GatewayListEnvelope)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<GatewayListEnvelope>, ApiError> {
    let limit = match p.limit {
        None => 50,
        Some(n @ 1..=100) => n as usize,
        Some(n) => return Err(ApiError::bad_request(format!("limit must be an integer from 1 to 100 (got {n})"))),
    };
    let (sort, order, status) = (p.sort.unwrap_or_default(), p.order.unwrap_or_default(), p.status);
    let field = match sort {
        ListSort::Name => SortField::Name,
        ListSort::CreatedAt => SortField::CreatedAt,
    };
    let after = match p.cursor.as_deref() {
        None => None,
        Some(c) => {
            // A name no gateway can have (control characters) is no position.
            let c = Cursor::decode(c)
                .filter(|c| !matches!(&c.key, SortKey::Name(n) if n.chars().any(char::is_control)))
                .ok_or_else(|| ApiError::bad_request("cursor is not valid"))?;
            let key_matches = matches!(
                (&c.key, sort),
                (SortKey::Name(_), ListSort::Name) | (SortKey::CreatedAt(_), ListSort::CreatedAt)
            );
            if c.sort != sort || c.order != order || c.status != status || !key_matches {
                return Err(ApiError::bad_request("cursor belongs to a different query (sort, order or status)"));
            }
            Some((c.key, c.seq))
        }
    };
    let query = ListQuery { status, sort: field, descending: order == ListOrder::Desc, after, limit: limit + 1 };
    blocking(&state, move |s| {
        let mut rows = s.store.list(&query)?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = more.then(|| rows.last()).flatten().map(|g| {
            let key = match sort {
                ListSort::Name => SortKey::Name(g.name.clone()),
                ListSort::CreatedAt => SortKey::CreatedAt(g.created_at),
            };
            Cursor { sort, order, status, key, seq: g.seq }.encode()
        });
        let mut sides = std::collections::HashMap::new();
        let live = live_statuses(s, &rows);
        let data: Vec<GatewayView> = rows
            .iter()
            .zip(&live)
            .map(|(g, l)| {
                let local = sides.entry(g.region.as_str()).or_insert_with(|| s.local_side_of(&g.region));
                GatewayView::new(g, l.as_ref(), local, false)
            })
            .collect();
        Ok(Json(GatewayListEnvelope { meta: ListMeta { limit, count: data.len(), next_cursor }, data }))
    })
    .await
}

/// Create a VPN gateway (one remote site = one WireGuard peer). The
/// pre-shared key is in this response and never again.
#[utoipa::path(post, path = "/api/v1/vpn-gateways", tag = "vpn-gateways", request_body = CreateGateway,
    security(("bearer" = [])),
    responses((status = 201, body = GatewayEnvelope, headers(("Location" = String, description = "The new gateway's URL"),
            ("ETag" = String, description = "The gateway configuration's entity tag, for `If-Match`"))),
        (status = 409, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
pub async fn create(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    // Blocking: another region's site network is read from the store.
    let new = blocking(&state, move |s| parse_create(&body, |r| s.site_cidr_of(r), &s.plane.public_key())).await?;
    created(&state, new).await
}

/// Runs a validated create; its 201 (the pre-shared key shown).
async fn created(state: &Arc<AppState>, new: NewGateway) -> Result<Response, ApiError> {
    let g = changed(state, move |s| changes::create(s, new)).await?;
    let (tag, env) = blocking(state, move |s| Ok(tagged(s, &g, true))).await?;
    let location = format!("/api/v1/vpn-gateways/{}", env.data.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], tag, env).into_response())
}

/// Create a VPN gateway from a wg-quick `[Peer]` section (an existing
/// WireGuard configuration of the remote site): `PublicKey`, `Endpoint`,
/// `AllowedIPs`, `PresharedKey` and `PersistentKeepalive` stand for the
/// create's remote fields, with the create's rules; errors name the
/// section's keys (`peer.AllowedIPs[1]`). The pre-shared key is in this
/// response and never again.
#[utoipa::path(post, path = "/api/v1/vpn-gateways/import", operation_id = "import_gateway", tag = "vpn-gateways",
    request_body = ImportGateway, security(("bearer" = [])),
    responses((status = 201, body = GatewayEnvelope, headers(("Location" = String, description = "The new gateway's URL"),
            ("ETag" = String, description = "The gateway configuration's entity tag, for `If-Match`"))),
        (status = 409, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
pub async fn import(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let new = blocking(&state, move |s| parse_import(&body, |r| s.site_cidr_of(r), &s.plane.public_key())).await?;
    created(&state, new).await.map_err(peer_field)
}

/// Get a VPN gateway.
#[utoipa::path(get, path = "/api/v1/vpn-gateways/{id}", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    security(("bearer" = [])),
    responses((status = 200, body = GatewayEnvelope, headers(("ETag" = String, description = "The gateway configuration's entity tag, for `If-Match`"))), (status = 404, body = ErrorEnvelope)))]
pub async fn get_one(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Tagged, ApiError> {
    blocking(&state, move |s| Ok(tagged(s, &changes::existing(&s.store, &id)?, false))).await
}

/// Update a VPN gateway; the running tunnel follows without a restart.
#[utoipa::path(patch, path = "/api/v1/vpn-gateways/{id}", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123"),
        ("If-Match" = Option<String>, Header, description = "Only if the gateway's entity tag (`ETag`) is one of these, or `*`; 412 otherwise")),
    request_body = UpdateGateway, security(("bearer" = [])),
    responses((status = 200, body = GatewayEnvelope, headers(("ETag" = String, description = "The gateway configuration's entity tag, for `If-Match`"))),
        (status = 404, body = ErrorEnvelope), (status = 412, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
pub async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Tagged, ApiError> {
    let body = UpdateGateway::from_json(&body)?;
    let if_match = if_match(&headers);
    let g = changed(&state, move |s| changes::update(s, &id, body, if_match.as_deref())).await?;
    blocking(&state, move |s| Ok(tagged(s, &g, false))).await
}

/// Delete a VPN gateway: its tunnel stops; the record stays listable as `deleted`.
#[utoipa::path(delete, path = "/api/v1/vpn-gateways/{id}", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123"),
        ("If-Match" = Option<String>, Header, description = "Only if the gateway's entity tag (`ETag`) is one of these, or `*`; 412 otherwise")),
    security(("bearer" = [])),
    responses((status = 200, body = GatewayEnvelope, headers(("ETag" = String, description = "The gateway configuration's entity tag, for `If-Match`"))),
        (status = 404, body = ErrorEnvelope), (status = 412, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Tagged, ApiError> {
    let if_match = if_match(&headers);
    let g = changed(&state, move |s| changes::delete(s, &id, if_match.as_deref())).await?;
    blocking(&state, move |s| Ok(tagged(s, &g, false))).await
}

/// Live tunnel status from the data plane.
#[utoipa::path(get, path = "/api/v1/vpn-gateways/{id}/status", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    security(("bearer" = [])),
    responses((status = 200, body = StatusEnvelope), (status = 404, body = ErrorEnvelope)))]
pub async fn status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<StatusEnvelope>, ApiError> {
    blocking(&state, move |s| {
        let g = changes::existing(&s.store, &id)?;
        let live = live_statuses(s, std::slice::from_ref(&g)).pop().flatten();
        let serving_node = match s.store.lease_of(&g.id)? {
            Some(lease) if lease.holder_live || lease.node_id == s.settings.node.id => Some(lease.node_id),
            _ => None,
        };
        Ok(Json(StatusEnvelope { data: StatusView::new(&g, live.as_ref(), serving_node) }))
    })
    .await
}

/// A wg-quick configuration for the remote site (text/plain).
#[utoipa::path(get, path = "/api/v1/vpn-gateways/{id}/config", tag = "vpn-gateways", params(("id" = String, Path, description = "Gateway id, e.g. vpn_abc123")),
    security(("bearer" = [])),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope)))]
pub async fn config(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    blocking(&state, move |s| {
        let g = changes::existing(&s.store, &id)?;
        if g.status == Status::Deleted {
            return Err(ApiError::conflict(format!("VPN gateway {id} is deleted")));
        }
        // Never another node's side by mistake: a store that cannot say is a 503.
        let text = remote_config(&g, &s.try_local_side_of(&g.region)?);
        Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
    })
    .await
}
