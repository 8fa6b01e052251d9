//! The OpenAPI document, generated from the handlers' annotations and
//! completed here with what every operation of a kind shares, so that each
//! status code and header the server can answer with is listed once:
//! - authenticated operations: 401 (`WWW-Authenticate`), 429
//!   (`Retry-After`), 500, and the `X-RateLimit-*` headers; writes 403 (a
//!   read-only key);
//! - operations with a JSON body: 400, 413, 415, 422; with query parameters: 400;
//! - POST and DELETE: the `Idempotency-Key` header (`idempotency`), 400, 422;
//! - the links from a create to the new gateway's other operations (the
//!   stateful phase of the API fuzzer follows them);
//! - `/metrics` as this listener serves it (absent when it has its own
//!   listener, authenticated when `[api] metrics_auth` is set).

use super::audit;
use super::backup;
use super::events;
use super::formats;
use super::gateways;
use super::import;
use super::keypairs;
use super::model;
use super::nodes;
use super::ops;
use super::webhooks;
use super::AppState;
use crate::firewall;
use crate::store::Status;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "wgxdp", description = "Site-to-site VPN gateways on a WireGuard data plane (AF_XDP). \
        String formats: `cidr`, `local-network`, `remote-network`, `peer-address` and `port-range` are \
        described on the schemas that use them (`Network`, `LocalNetwork`, `RemoteNetwork`, `PeerAddress`, \
        `PortRange`). `null` for an optional request field is the same as leaving it out."),
    paths(
        gateways::list, gateways::create, gateways::import, keypairs::create, gateways::get_one, gateways::update, gateways::delete,
        gateways::status, gateways::config, audit::list, events::stream, events::history, webhooks::create,
        webhooks::list, webhooks::get_one, webhooks::delete, webhooks::deliveries, nodes::list, ops::health, ops::ready,
        ops::metrics, backup::backup, backup::restore, document
    ),
    components(schemas(
        model::CreateGateway, model::UpdateGateway, model::GatewayView, model::StatusView, model::ObjectMeta,
        model::ListMeta, model::GatewayEnvelope, model::GatewayListEnvelope, model::StatusEnvelope,
        model::ErrorBody, model::ErrorEnvelope, model::FirewallRuleHits, model::TunnelType,
        firewall::FirewallRuleText, firewall::FirewallAction, ops::Health, Status,
        formats::GatewayName, formats::RuleName, formats::Region, formats::WireguardKey, formats::Network,
        formats::LocalNetwork, formats::RemoteNetwork, formats::PeerAddress, formats::PortRange,
        audit::AuditEntryView, audit::AuditLogEnvelope, super::paging::PageMeta, events::EventView,
        events::EventHistoryEnvelope, crate::store::EventKind, webhooks::CreateWebhook,
        webhooks::EventTypeOrAll, webhooks::WebhookView, webhooks::WebhookEnvelope, webhooks::WebhookListEnvelope,
        webhooks::DeliveryView, webhooks::DeliveryLogEnvelope,
        crate::store::DeliveryState, formats::WebhookUrl, formats::WgQuickPeer, import::ImportGateway,
        keypairs::KeypairView, keypairs::KeypairEnvelope, nodes::NodeView, nodes::NodeState, nodes::NodeListEnvelope, backup::Backup, backup::BackupGateway,
        backup::BackupWebhook, backup::RestoreOutcome, backup::RestoreReport, backup::RestoreEnvelope
    )),
    modifiers(&BearerAuth),
    tags((name = "vpn-gateways"), (name = "events", description = "The event log (Server-Sent Events and \
        history) and webhooks"), (name = "operations"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// How this listener serves `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct MetricsRoute {
    pub served: bool,
    pub authenticated: bool,
}

fn error(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}})
}

fn header(description: &str, schema: Value) -> Value {
    json!({"description": description, "schema": schema})
}

fn rate_limit_headers() -> Map<String, Value> {
    let int = json!({"type": "integer", "minimum": 0});
    [
        ("X-RateLimit-Limit", "Requests of this class (reads or mutations) allowed per minute for this API key."),
        ("X-RateLimit-Remaining", "Requests of this class left in the current minute."),
        ("X-RateLimit-Reset", "Seconds until the current minute's window starts over."),
    ]
    .into_iter()
    .map(|(name, d)| (name.to_owned(), header(d, int.clone())))
    .collect()
}

/// Adds `code` to `responses` unless the operation lists it already.
fn add(responses: &mut Map<String, Value>, code: &str, response: Value) {
    responses.entry(code).or_insert(response);
}

/// The common responses, by what the operation takes.
fn complete_operation(method: &str, op: &mut Value) {
    let secured = op.get("security").is_some_and(|s| s.as_array().is_some_and(|a| !a.is_empty()));
    let has_body = op.get("requestBody").is_some();
    let has_query = op
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|ps| ps.iter().any(|p| p.get("in").and_then(Value::as_str) == Some("query")));
    // Answers never stored (a keypair's), or a retry safe by itself (a
    // restore's): no key to replay them by.
    let never_stored =
        matches!(op.get("operationId").and_then(Value::as_str), Some("create_keypair" | "restore_config"));
    let idempotent = secured && matches!(method, "post" | "delete") && !never_stored;
    if idempotent {
        let parameter = json!({
            "name": "Idempotency-Key", "in": "header", "required": false,
            "description": "Makes a retry safe: the first successful answer is stored for 24 hours (per API key) \
                and replayed to a retry with the same key and the same request, which then changes nothing; the \
                same key with a different request is refused (422, `idempotency_key_reused`). A failed request is \
                not stored: its retry runs again.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
        });
        if let Some(params) = op.as_object_mut().map(|o| o.entry("parameters").or_insert_with(|| json!([]))) {
            if let Some(list) = params.as_array_mut() {
                list.push(parameter);
            }
        }
    }
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else { return };
    if idempotent {
        add(responses, "400", error("A malformed request or `Idempotency-Key`."));
        add(
            responses,
            "422",
            error("A field breaks a rule of its schema, or the `Idempotency-Key` was used for another request."),
        );
        for (code, response) in responses.iter_mut() {
            if code.starts_with('2') {
                if let Some(r) = response.as_object_mut() {
                    let headers = r.entry("headers").or_insert_with(|| json!({}));
                    headers["Idempotent-Replayed"] = header(
                        "`true` when this is the stored answer to an earlier request with the same Idempotency-Key.",
                        json!({"type": "string", "enum": ["true"]}),
                    );
                }
            }
        }
    }
    if has_body || has_query {
        add(responses, "400", error("Malformed JSON, a body or query of the wrong shape, or an unknown field."));
    }
    if has_body {
        add(responses, "413", error("The body exceeds 64 KiB."));
        add(responses, "415", error("The body is not sent as `Content-Type: application/json`."));
        add(responses, "422", error("A field breaks a rule of its schema; `error.field` names it."));
    }
    if secured && method != "get" {
        add(responses, "403", error("This API key may only read (scope `read`); writes need an `admin` key."));
    }
    if secured {
        let mut unauthorized = error("No API key, or not a valid one.");
        unauthorized["headers"] = json!({"WWW-Authenticate": header("`Bearer`.", json!({"type": "string"}))});
        add(responses, "401", unauthorized);
        let mut limited = error(
            "Too many requests: this API key's budget for the minute is spent, or this source address failed to \
             authenticate too often.",
        );
        limited["headers"] =
            json!({"Retry-After": header("Seconds to wait.", json!({"type": "integer", "minimum": 1}))});
        add(responses, "429", limited);
        add(responses, "500", error("An internal error (details in the server's log, never in the answer)."));
        for (code, response) in responses.iter_mut() {
            // Refused before an API key was looked at: no budget to report.
            if code == "401" || code == "429" {
                continue;
            }
            if let Some(r) = response.as_object_mut() {
                let headers = r.entry("headers").or_insert_with(|| json!({}));
                if let Some(h) = headers.as_object_mut() {
                    for (name, value) in rate_limit_headers() {
                        h.entry(name).or_insert(value);
                    }
                }
            }
        }
    }
}

/// From a created gateway to its other operations, by its id.
fn add_links(doc: &mut Value) {
    let id = json!({"id": "$response.body#/data/id"});
    let links: Map<String, Value> = [
        ("GetGateway", "get_one"),
        ("UpdateGateway", "update"),
        ("DeleteGateway", "delete"),
        ("GatewayStatus", "status"),
        ("GatewayConfig", "config"),
    ]
    .into_iter()
    .map(|(name, op)| (name.to_owned(), json!({"operationId": op, "parameters": id})))
    .collect();
    for create in [
        "/paths/~1api~1v1~1vpn-gateways/post/responses/201",
        "/paths/~1api~1v1~1vpn-gateways~1import/post/responses/201",
    ] {
        if let Some(created) = doc.pointer_mut(create) {
            created["links"] = Value::Object(links.clone());
        }
    }
    if let Some(created) = doc.pointer_mut("/paths/~1api~1v1~1webhooks/post/responses/201") {
        created["links"] = json!({
            "GetWebhook": {"operationId": "get_webhook", "parameters": id},
            "DeleteWebhook": {"operationId": "delete_webhook", "parameters": id},
            "WebhookDeliveries": {"operationId": "webhook_deliveries", "parameters": id},
        });
    }
    // A read's entity tag makes the next write conditional.
    let conditional = json!({"id": "$response.body#/data/id", "header.If-Match": "$response.header.ETag"});
    if let Some(read) = doc.pointer_mut("/paths/~1api~1v1~1vpn-gateways~1{id}/get/responses/200") {
        read["links"] = json!({
            "UpdateIfUnchanged": {"operationId": "update", "parameters": conditional},
            "DeleteIfUnchanged": {"operationId": "delete", "parameters": conditional},
        });
    }
}

/// What a restore takes: a `Backup` with every secret in it (`Restore`,
/// `RestoreGateway`, `RestoreWebhook`: the backup's schemas, the secrets
/// required and not null).
fn restore_schemas(doc: &mut Value) {
    let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(Value::as_object_mut) else { return };
    for (from, to, secret) in
        [("BackupGateway", "RestoreGateway", "pre_shared_key"), ("BackupWebhook", "RestoreWebhook", "secret")]
    {
        let Some(mut schema) = schemas.get(from).cloned() else { continue };
        if let Some(required) = schema.get_mut("required").and_then(Value::as_array_mut) {
            required.push(json!(secret));
        }
        if let Some(property) = schema.pointer_mut(&format!("/properties/{secret}")) {
            if let Some(p) = property.as_object_mut() {
                p.remove("nullable");
            }
        }
        schemas.insert(to.to_owned(), schema);
    }
    if let Some(mut restore) = schemas.get("Backup").cloned() {
        restore["properties"]["gateways"]["items"] = json!({"$ref": "#/components/schemas/RestoreGateway"});
        restore["properties"]["webhooks"]["items"] = json!({"$ref": "#/components/schemas/RestoreWebhook"});
        restore["description"] = json!("A backup made with `include_secrets=true`.");
        schemas.insert("Restore".to_owned(), restore);
    }
}

/// The whole document as this listener serves it. `site_cidr`: whether
/// `[api] site_cidr` is configured (without it, a create must name
/// `local_network_cidr`).
pub fn document_for(metrics: MetricsRoute, site_cidr: bool) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    if !site_cidr {
        for schema in ["CreateGateway", "ImportGateway"] {
            let Some(create) = doc.pointer_mut(&format!("/components/schemas/{schema}")) else { continue };
            if let Some(required) = create.get_mut("required").and_then(Value::as_array_mut) {
                required.push(json!("local_network_cidr"));
            }
            // Required, so not nullable either.
            create["properties"]["local_network_cidr"] = json!({"$ref": "#/components/schemas/LocalNetwork"});
        }
    }
    restore_schemas(&mut doc);
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        if !metrics.served {
            paths.remove("/metrics");
        } else if metrics.authenticated {
            if let Some(get) = paths.get_mut("/metrics").and_then(|p| p.get_mut("get")) {
                get["security"] = json!([{"bearer": []}]);
            }
        }
        for path in paths.values_mut() {
            if let Some(methods) = path.as_object_mut() {
                for (method, op) in methods.iter_mut() {
                    complete_operation(method, op);
                }
            }
        }
    }
    add_links(&mut doc);
    doc
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn document(State(state): State<Arc<AppState>>) -> Json<Value> {
    let settings = &state.settings;
    let metrics = MetricsRoute { served: !settings.metrics_separate, authenticated: settings.metrics_auth };
    Json(document_for(metrics, settings.site_cidr.is_some()))
}
