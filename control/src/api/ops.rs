//! Operations endpoints: liveness, readiness, Prometheus metrics.

use super::model::is_up;
use super::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, or `not_ready`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok".into(), reason: None })
}

/// Readiness: XDP attached, sockets bound, workers running, store open.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let s = state.clone();
    let reason = tokio::task::spawn_blocking(move || {
        s.plane.not_ready().or_else(|| (!s.store.ping()).then(|| "the store does not answer".to_owned()))
    })
    .await
    .unwrap_or_else(|e| Some(e.to_string()));
    match reason {
        None => (StatusCode::OK, Json(Health { status: "ok".into(), reason: None })).into_response(),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "not_ready".into(), reason: Some(r) }))
            .into_response(),
    }
}

/// Prometheus label value escaping.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text: per-gateway traffic and handshakes, per-queue counters.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let s = state.clone();
    let text = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        let gateways = s.store.live().unwrap_or_default();
        let now = SystemTime::now();
        let families: [(&str, &str, &str); 6] = [
            ("wgxdp_gateway_up", "gauge", "1 if the tunnel shook hands within 180 s."),
            ("wgxdp_gateway_bytes_sent_total", "counter", "Inner bytes sent into the tunnel."),
            ("wgxdp_gateway_bytes_received_total", "counter", "Inner bytes received from the tunnel."),
            ("wgxdp_gateway_packets_sent_total", "counter", "Packets sent into the tunnel."),
            ("wgxdp_gateway_packets_received_total", "counter", "Packets received from the tunnel."),
            ("wgxdp_gateway_handshakes_total", "counter", "Completed handshakes."),
        ];
        let ids: Vec<&str> = gateways.iter().map(|g| g.id.as_str()).collect();
        let statuses: Vec<_> = s.plane.statuses(&ids).into_iter().map(Option::unwrap_or_default).collect();
        for (i, (name, kind, help)) in families.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (g, st) in gateways.iter().zip(&statuses) {
                let v = match i {
                    0 => u64::from(is_up(st, now)),
                    1 => st.bytes_sent,
                    2 => st.bytes_received,
                    3 => st.packets_sent,
                    4 => st.packets_received,
                    _ => st.handshakes,
                };
                let _ = writeln!(out, "{name}{{gateway=\"{}\",name=\"{}\"}} {v}", label(&g.id), label(&g.name));
            }
        }
        s.plane.write_metrics(&mut out);
        out
    })
    .await
    .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
