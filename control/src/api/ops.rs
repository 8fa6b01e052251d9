//! Operations endpoints: liveness, readiness, Prometheus metrics.

use super::AppState;
use crate::plane::TunnelRuleHits;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::fmt::Write as _;
use std::sync::Arc;

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

/// Prometheus text from counters kept in memory: gateways by status (kept by
/// the store on every write), the data plane's own counters (atomics and XDP
/// maps, the connection table), and each firewall rule's hits. It never reads
/// the database, and asks the data plane for per-tunnel state only for the
/// tunnels that have firewall rules (one trip), so gateways without rules
/// cost a scrape nothing. Other per-gateway live state is at
/// `/api/v1/vpn-gateways/{id}/status`.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let s = state.clone();
    let text = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP wgxdp_gateways VPN gateways created through the API, by lifecycle status.");
        let _ = writeln!(out, "# TYPE wgxdp_gateways gauge");
        for (status, n) in s.store.status_counts() {
            let _ = writeln!(out, "wgxdp_gateways{{status=\"{}\"}} {n}", status.as_str());
        }
        let _ = writeln!(out, "# HELP wgxdp_static_peers Peers from the configuration file.");
        let _ = writeln!(out, "# TYPE wgxdp_static_peers gauge");
        let _ = writeln!(out, "wgxdp_static_peers {}", s.settings.static_peers.len());
        s.plane.write_metrics(&mut out);
        write_firewall_metrics(&mut out, &s.plane.firewall_hits());
        out
    })
    .await
    .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// A Prometheus label value: backslash, double quote and newline escaped
/// (text exposition format 0.0.4).
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `wgxdp_firewall_rule_hits_total{gateway, rule (index), name}` per rule.
fn write_firewall_metrics(out: &mut String, tunnels: &[TunnelRuleHits]) {
    let _ = writeln!(
        out,
        "# HELP wgxdp_firewall_rule_hits_total Packets from a remote site each firewall rule matched since the \
         gateway's rules last changed."
    );
    let _ = writeln!(out, "# TYPE wgxdp_firewall_rule_hits_total counter");
    for t in tunnels {
        let gateway = escape_label(&t.id);
        for (index, (name, hits)) in t.rules.iter().enumerate() {
            let _ = writeln!(
                out,
                "wgxdp_firewall_rule_hits_total{{gateway=\"{gateway}\",rule=\"{index}\",name=\"{}\"}} {hits}",
                escape_label(name)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("plain name"), "plain name");
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let mut out = String::new();
        write_firewall_metrics(
            &mut out,
            &[TunnelRuleHits { id: "vpn_a".into(), rules: vec![("ok".into(), 3), ("say \"hi\"\n".into(), 0)] }],
        );
        assert!(out.contains("wgxdp_firewall_rule_hits_total{gateway=\"vpn_a\",rule=\"0\",name=\"ok\"} 3\n"), "{out}");
        assert!(
            out.contains("wgxdp_firewall_rule_hits_total{gateway=\"vpn_a\",rule=\"1\",name=\"say \\\"hi\\\"\\n\"} 0\n"),
            "{out}"
        );
    }
}
