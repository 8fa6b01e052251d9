//! `/api/v1/webhooks` (admin keys only): register a URL for events (its
//! signing secret is in the create's answer and never again), list, get,
//! delete, and read each webhook's delivery log. Deliveries themselves are
//! `webhook_delivery`'s.

use super::blocking;
use super::error::ApiError;
use super::extract::{ApiQuery, JsonBody};
use super::model::{decode_json, invalid, rfc3339_millis};
use super::paging::{page, page_size, PageMeta};
use super::AppState;
use crate::store::{Caller, Delivery, DeliveryState, EventKind, EventSelection, Scope, Webhook};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Webhooks at most.
pub const MAX_WEBHOOKS: usize = 100;
pub const MAX_URL: usize = 2048;
pub const MAX_DESCRIPTION: usize = 256;

/// Register a webhook.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// Where deliveries are POSTed.
    #[schema(value_type = WebhookUrl)]
    pub url: String,
    /// The event types to deliver, or `["*"]` for all (the default).
    #[schema(value_type = Option<Vec<EventTypeOrAll>>, nullable, min_items = 1)]
    pub events: Option<Vec<String>>,
    /// Free text, without NUL characters.
    #[schema(nullable, max_length = 256, pattern = "^[^\\u0000]*$")]
    pub description: Option<String>,
}

/// An event type (`EventKind`), or `*` for every type: documented from
/// `EventKind` itself, so the list of types is written once.
#[derive(Debug)]
pub struct EventTypeOrAll;

impl<'s> utoipa::ToSchema<'s> for EventTypeOrAll {
    fn schema() -> (&'s str, utoipa::openapi::RefOr<utoipa::openapi::Schema>) {
        let schema = serde_json::json!({
            "description": "An event type, or `*` for every type.",
            "anyOf": [{"$ref": "#/components/schemas/EventKind"}, {"type": "string", "enum": ["*"]}],
        });
        ("EventTypeOrAll", serde_json::from_value(schema).unwrap_or_default())
    }
}

/// A registered webhook.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookView {
    #[schema(example = "wh_abc123")]
    pub id: String,
    pub url: String,
    /// The event types delivered (`["*"]`: all).
    pub events: Vec<String>,
    pub description: String,
    pub created_at: String,
    /// The signing secret: in the create's answer only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl std::fmt::Debug for WebhookView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookView")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookEnvelope {
    pub data: WebhookView,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookListEnvelope {
    pub data: Vec<WebhookView>,
}

/// One delivery of an event to a webhook.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: i64,
    pub event_id: i64,
    /// Null if the event has left the log.
    pub event_type: Option<EventKind>,
    pub state: DeliveryState,
    pub attempts: u32,
    /// When the next attempt is due (pending deliveries).
    pub next_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    /// The receiver's HTTP status at the last attempt.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryLogEnvelope {
    pub data: Vec<DeliveryView>,
    pub meta: PageMeta,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// Only deliveries older than this id (the previous page's `meta.next_before`).
    #[param(minimum = 1)]
    pub before: Option<i64>,
    /// Deliveries per page (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

impl WebhookView {
    pub(crate) fn new(w: &Webhook, reveal_secret: bool) -> Self {
        let events = match &w.events {
            EventSelection::All => vec!["*".to_owned()],
            EventSelection::Only(k) => k.iter().map(|k| k.as_str().to_owned()).collect(),
        };
        Self {
            id: w.id.clone(),
            url: w.url.clone(),
            events,
            description: w.description.clone(),
            created_at: rfc3339_millis(w.created_at),
            secret: reveal_secret.then(|| w.secret.expose().to_owned()),
        }
    }
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.seq,
            event_id: d.event_seq,
            event_type: d.event_kind,
            state: d.state,
            attempts: d.attempts,
            next_attempt_at: d.next_attempt_at.map(rfc3339_millis),
            last_attempt_at: d.last_attempt_at.map(rfc3339_millis),
            last_status: d.last_status,
            last_error: d.last_error,
            created_at: rfc3339_millis(d.created_at),
        }
    }
}

/// A validated registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWebhook {
    pub url: String,
    pub events: EventSelection,
    pub description: String,
}

/// An `http` or `https` URL with a host and no credentials (a receiver
/// authenticates deliveries by their signature).
pub fn validate_url(s: &str) -> Result<String, ApiError> {
    if s.len() > MAX_URL {
        return Err(invalid("url", format!("at most {MAX_URL} characters")));
    }
    let url = url::Url::parse(s).map_err(|e| invalid("url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("url", "must be an http or https URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("url", "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("url", "must not hold credentials (deliveries are signed instead)"));
    }
    if url.fragment().is_some() {
        return Err(invalid("url", "must not have a fragment"));
    }
    // The parsed form, which is what the deliverer requests: the parser is
    // lenient (`HTTPS:host`, surrounding spaces), the stored URL is not.
    Ok(url.into())
}

impl CreateWebhook {
    pub fn validate(self) -> Result<NewWebhook, ApiError> {
        let url = validate_url(&self.url)?;
        let events = match self.events {
            None => EventSelection::All,
            Some(list) if list.is_empty() => return Err(invalid("events", "name at least one event type, or `*`")),
            Some(list) if list.iter().any(|e| e == "*") => EventSelection::All,
            Some(list) => {
                let mut kinds = Vec::new();
                for e in &list {
                    let k = EventKind::parse(e).ok_or_else(|| {
                        invalid("events", format!("`{e}` is not an event type ({}, or *)", EventKind::names()))
                    })?;
                    if !kinds.contains(&k) {
                        kinds.push(k);
                    }
                }
                EventSelection::Only(kinds)
            }
        };
        let description = self.description.unwrap_or_default();
        if description.chars().count() > MAX_DESCRIPTION {
            return Err(invalid("description", format!("at most {MAX_DESCRIPTION} characters")));
        }
        if description.contains('\0') {
            return Err(invalid("description", "must not contain a NUL character"));
        }
        Ok(NewWebhook { url, events, description })
    }
}

/// The request body of a webhook create, decoded and validated (what the
/// handler and the fuzzer run).
pub fn parse_create_webhook(bytes: &[u8]) -> Result<NewWebhook, ApiError> {
    decode_json::<CreateWebhook>(bytes)?.validate()
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.scope == Scope::Admin {
        Ok(())
    } else {
        Err(ApiError::forbidden("webhooks need an `admin` API key"))
    }
}

fn hook_not_found(id: &str) -> ApiError {
    ApiError::not_found_what(&format!("webhook {id}"))
}

/// Register a webhook. Deliveries are POSTed as JSON (`EventView`) with
/// `Wgxdp-Event` (the type), `Wgxdp-Delivery` (the delivery id) and
/// `Wgxdp-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`;
/// a 2xx answer within 10 s delivers, anything else is retried with
/// exponential backoff (1 s doubling to 15 min) for 24 hours. Each webhook
/// gets its deliveries in event order. The secret is in this answer only.
#[utoipa::path(post, path = "/api/v1/webhooks", operation_id = "create_webhook", tag = "events", request_body = CreateWebhook,
    security(("bearer" = [])),
    responses((status = 201, body = WebhookEnvelope, headers(("Location" = String, description = "The new webhook's URL"))),
        (status = 409, body = ErrorEnvelope, description = "100 webhooks exist already")))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let new = parse_create_webhook(&body)?;
    let hook = state
        .change(move |s| {
            if s.store.webhooks()?.len() >= MAX_WEBHOOKS {
                return Err(ApiError::conflict(format!("{MAX_WEBHOOKS} webhooks exist; delete one first")));
            }
            Ok(s.store.create_webhook(&new.url, &new.events, &new.description)?)
        })
        .await?;
    tracing::info!(id = %hook.id, "webhook created");
    let location = format!("/api/v1/webhooks/{}", hook.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(WebhookEnvelope { data: WebhookView::new(&hook, true) }),
    )
        .into_response())
}

/// List webhooks (without their secrets).
#[utoipa::path(get, path = "/api/v1/webhooks", operation_id = "list_webhooks", tag = "events", security(("bearer" = [])),
    responses((status = 200, body = WebhookListEnvelope), (status = 403, body = ErrorEnvelope)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<WebhookListEnvelope>, ApiError> {
    require_admin(&caller)?;
    let hooks = blocking(&state, |s| Ok(s.store.webhooks()?)).await?;
    Ok(Json(WebhookListEnvelope { data: hooks.iter().map(|w| WebhookView::new(w, false)).collect() }))
}

/// Get a webhook (without its secret).
#[utoipa::path(get, path = "/api/v1/webhooks/{id}", operation_id = "get_webhook", tag = "events",
    params(("id" = String, Path, description = "Webhook id, e.g. wh_abc123")), security(("bearer" = [])),
    responses((status = 200, body = WebhookEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<WebhookEnvelope>, ApiError> {
    require_admin(&caller)?;
    let hook = blocking(&state, move |s| s.store.webhook(&id)?.ok_or_else(|| hook_not_found(&id))).await?;
    Ok(Json(WebhookEnvelope { data: WebhookView::new(&hook, false) }))
}

/// Delete a webhook: its pending deliveries are dropped, with its delivery log.
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", operation_id = "delete_webhook", tag = "events",
    params(("id" = String, Path, description = "Webhook id, e.g. wh_abc123")), security(("bearer" = [])),
    responses((status = 200, body = WebhookEnvelope), (status = 404, body = ErrorEnvelope)))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<WebhookEnvelope>, ApiError> {
    require_admin(&caller)?;
    let hook = state.change(move |s| s.store.delete_webhook(&id)?.ok_or_else(|| hook_not_found(&id))).await?;
    tracing::info!(id = %hook.id, "webhook deleted");
    Ok(Json(WebhookEnvelope { data: WebhookView::new(&hook, false) }))
}

/// A webhook's deliveries, newest first: state, attempts, the receiver's last answer.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", operation_id = "webhook_deliveries", tag = "events",
    params(("id" = String, Path, description = "Webhook id, e.g. wh_abc123"), DeliveryParams), security(("bearer" = [])),
    responses((status = 200, body = DeliveryLogEnvelope), (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
pub async fn deliveries(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<DeliveryParams>,
) -> Result<Json<DeliveryLogEnvelope>, ApiError> {
    require_admin(&caller)?;
    let limit = page_size(p.limit, p.before)?;
    let rows = blocking(&state, move |s| {
        s.store.webhook(&id)?.ok_or_else(|| hook_not_found(&id))?;
        Ok(s.store.deliveries(&id, p.before, limit as usize + 1)?)
    })
    .await?;
    let (data, meta) = page(rows, limit, DeliveryView::from, |d| d.id);
    Ok(Json(DeliveryLogEnvelope { data, meta }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_validated() {
        let ok = parse_create_webhook(
            br#"{"url": "https://hooks.example/wgxdp?x=1", "events": ["tunnel.up", "tunnel.up", "tunnel.down"]}"#,
        )
        .unwrap();
        assert_eq!(ok.events, EventSelection::Only(vec![EventKind::TunnelUp, EventKind::TunnelDown]));
        let all = parse_create_webhook(br#"{"url": "http://10.0.0.1:8080/h", "events": null, "description": "ops"}"#)
            .unwrap();
        assert_eq!((all.events, all.description.as_str()), (EventSelection::All, "ops"));
        assert_eq!(
            parse_create_webhook(br#"{"url": "http://h/", "events": ["*", "tunnel.up"]}"#).unwrap().events,
            EventSelection::All
        );
        for (body, field) in [
            (r#"{"url": "ftp://h/"}"#, "url"),
            (r#"{"url": "http://user:pw@h/"}"#, "url"),
            (r#"{"url": "h/path"}"#, "url"),
            (r#"{"url": "http://h/#frag"}"#, "url"),
            (r#"{"url": "http://h/", "events": []}"#, "events"),
            (r#"{"url": "http://h/", "events": ["gateway.*"]}"#, "events"),
        ] {
            let e = parse_create_webhook(body.as_bytes()).unwrap_err();
            assert_eq!((e.status, e.field.as_deref()), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{body}");
        }
        // Stored (and later requested) as the parser reads it.
        for (given, stored) in [
            ("https:ks.example/wgxdp?team=ops", "https://ks.example/wgxdp?team=ops"),
            (" HTTPS://Hooks.Example:443/x ", "https://hooks.example/x"),
            ("http://10.0.0.1:8080", "http://10.0.0.1:8080/"),
        ] {
            let body = serde_json::json!({ "url": given }).to_string();
            assert_eq!(parse_create_webhook(body.as_bytes()).unwrap().url, stored, "{given}");
        }
        let long = format!(r#"{{"url": "http://h/", "description": "{}"}}"#, "d".repeat(257));
        assert_eq!(parse_create_webhook(long.as_bytes()).unwrap_err().field.as_deref(), Some("description"));
        assert_eq!(
            parse_create_webhook(br#"{"url": "http://h/", "x": 1}"#).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
