//! The OpenAPI document, generated from the handlers' annotations.

use super::gateways;
use super::model;
use super::ops;
use crate::firewall;
use crate::store::Status;
use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "wgxdp", description = "Site-to-site VPN gateways on a WireGuard data plane (AF_XDP)."),
    paths(
        gateways::list, gateways::create, gateways::get_one, gateways::update, gateways::delete,
        gateways::status, gateways::config, ops::health, ops::ready, ops::metrics, document
    ),
    components(schemas(
        model::CreateGateway, model::UpdateGateway, model::GatewayView, model::StatusView, model::ObjectMeta,
        model::ListMeta, model::GatewayEnvelope, model::GatewayListEnvelope, model::StatusEnvelope,
        model::ErrorBody, model::ErrorEnvelope, model::FirewallRuleHits, firewall::FirewallRuleText,
        firewall::FirewallAction, firewall::FirewallProtocol, ops::Health, Status
    )),
    modifiers(&BearerAuth),
    tags((name = "vpn-gateways"), (name = "operations"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
