//! The audit log's two ends: the authentication middleware records every
//! mutation an API key asks for (`record`), whatever the answer; admins read
//! it, newest first, at `GET /api/v1/audit-log`.

use super::error::{ApiError, ErrorCode};
use super::extract::ApiQuery;
use super::model::rfc3339_millis;
use super::paging::{page, page_size, PageMeta};
use super::AppState;
use crate::store::{now_millis, AuditEntry, Caller, Scope};
use axum::extract::{MatchedPath, State};
use axum::http::{header, Method};
use axum::response::Response;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What the middleware keeps of a mutation before it runs.
#[derive(Debug)]
pub struct Request {
    key_id: String,
    action: String,
    target: Option<String>,
}

/// Longest target kept: ids are far shorter; a path segment is the client's.
const MAX_TARGET: usize = 64;

fn bounded(id: &str) -> String {
    let mut end = id.len().min(MAX_TARGET);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id[..end].to_owned()
}

/// `gateway.create`, `gateway.update`... for the routes there are; others
/// by method and route.
fn action(method: &Method, route: &str) -> String {
    let name = match (method.as_str(), route) {
        ("POST", "/api/v1/vpn-gateways") => "gateway.create",
        ("POST", "/api/v1/vpn-gateways/import") => "gateway.import",
        ("POST", "/api/v1/keypairs") => "keypair.create",
        ("POST", "/api/v1/restore") => "config.restore",
        ("PATCH", "/api/v1/vpn-gateways/:id") => "gateway.update",
        ("DELETE", "/api/v1/vpn-gateways/:id") => "gateway.delete",
        ("POST", "/api/v1/webhooks") => "webhook.create",
        ("DELETE", "/api/v1/webhooks/:id") => "webhook.delete",
        // A method is the client's text: bounded like a target.
        _ => return bounded(&format!("{method} {route}")),
    };
    name.to_owned()
}

impl Request {
    pub fn of(req: &axum::extract::Request, caller: &Caller) -> Self {
        let route = req.extensions().get::<MatchedPath>().map_or_else(|| req.uri().path(), MatchedPath::as_str);
        // The object a route names is its `:id` segment. Matched from the
        // end: inside a nested router the URI has lost the nest's prefix.
        let target = route
            .rsplit('/')
            .zip(req.uri().path().rsplit('/'))
            .find(|(pattern, _)| *pattern == ":id")
            .map(|(_, value)| bounded(value));
        Self { key_id: caller.key_id.clone(), action: action(req.method(), route), target }
    }
}

impl Request {
    /// The entry for `request` answered by `resp` (a create's target is its
    /// new id, from `Location`).
    pub fn answered(self, resp: &Response) -> AuditEntry {
        let created = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.rsplit('/').next())
            .map(str::to_owned);
        AuditEntry {
            seq: 0,
            at: now_millis(),
            key_id: self.key_id,
            action: self.action,
            target: self.target.or(created.map(|c| bounded(&c))),
            status: resp.status().as_u16(),
            error_code: resp.extensions().get::<ErrorCode>().map(|c| c.0.to_owned()),
            replayed: resp.headers().contains_key(super::idempotency::REPLAYED),
        }
    }
}

/// Appends `entry`. A store that cannot record it is logged: the change
/// itself stands.
pub async fn record(state: &Arc<AppState>, entry: AuditEntry) {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.record_audit(entry)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot record a request in the audit log"),
        Err(e) => tracing::error!(error = %e, "cannot record a request in the audit log"),
    }
}

/// One audited request.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntryView {
    /// Position in the log (increasing).
    pub id: i64,
    /// When it was answered (RFC 3339).
    pub at: String,
    /// The API key that asked (`wg-socket`: the WireGuard socket).
    pub key_id: String,
    /// `gateway.create`, `gateway.update`, `gateway.delete`, `gateway.import`,
    /// `webhook.create`, `webhook.delete`, `keypair.create`, `config.restore`,
    /// `config.backup` (a backup with secrets), or `METHOD route`.
    pub action: String,
    /// The gateway or webhook acted on, when there is one (`with-secrets`
    /// for `config.backup`).
    pub target: Option<String>,
    /// The answer's HTTP status.
    pub status: u16,
    /// `succeeded` (2xx) or `failed`.
    pub outcome: String,
    /// The error's `code` when it failed.
    pub error_code: Option<String>,
    /// The stored answer to an earlier request with the same
    /// `Idempotency-Key` was given again: nothing changed this time.
    pub replayed: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditLogEnvelope {
    pub data: Vec<AuditEntryView>,
    pub meta: PageMeta,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only entries older than this `id` (the previous page's `meta.next_before`).
    #[param(minimum = 1)]
    pub before: Option<i64>,
    /// Entries per page (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

impl From<AuditEntry> for AuditEntryView {
    fn from(e: AuditEntry) -> Self {
        Self {
            id: e.seq,
            at: rfc3339_millis(e.at),
            key_id: e.key_id,
            action: e.action,
            target: e.target,
            status: e.status,
            outcome: if (200..300).contains(&e.status) { "succeeded" } else { "failed" }.into(),
            error_code: e.error_code,
            replayed: e.replayed,
        }
    }
}

/// The audit log, newest first (admin keys only).
#[utoipa::path(get, path = "/api/v1/audit-log", tag = "operations", params(AuditParams),
    security(("bearer" = [])),
    responses((status = 200, body = AuditLogEnvelope), (status = 403, body = ErrorEnvelope)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> Result<Json<AuditLogEnvelope>, ApiError> {
    if caller.scope != Scope::Admin {
        return Err(ApiError::forbidden("the audit log needs an `admin` API key"));
    }
    let limit = page_size(p.limit, p.before)?;
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.audit_log(p.before, limit as usize + 1))
        .await
        .map_err(ApiError::internal)??;
    let (data, meta) = page(rows, limit, AuditEntryView::from, |e| e.id);
    Ok(Json(AuditLogEnvelope { data, meta }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_named_by_route() {
        assert_eq!(action(&Method::POST, "/api/v1/vpn-gateways"), "gateway.create");
        assert_eq!(action(&Method::PATCH, "/api/v1/vpn-gateways/:id"), "gateway.update");
        assert_eq!(action(&Method::DELETE, "/api/v1/vpn-gateways/:id"), "gateway.delete");
        assert_eq!(action(&Method::PUT, "/api/v1/x"), "PUT /api/v1/x");
    }
}
