//! `GET /api/v1/nodes`: the `serve` processes on this store, each with its
//! region and whether it is live (heartbeated within `NODE_TTL_MILLIS`, on
//! the database's clock).

use super::error::ApiError;
use super::model::rfc3339_millis;
use super::{blocking, AppState};
use crate::store::{NodeRecord, EVERY_REGION};
use axum::extract::State;
use axum::Json;
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;

/// Whether a node heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// It heartbeated within the last 5 seconds.
    Live,
    /// Silent longer, or stopped.
    Lost,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    /// `[node] id`.
    pub id: String,
    /// The region it serves; `null`: every region.
    pub region: Option<String>,
    /// Where its API listens.
    pub api: String,
    pub state: NodeState,
    /// This answer comes from this node.
    pub this_node: bool,
    pub started_at: String,
    pub last_heartbeat_at: String,
    /// Milliseconds since its last heartbeat, on the store's clock.
    pub silent_for_ms: i64,
    /// How many gateways it holds the lease of (serves, while live).
    pub gateways_served: u64,
}

impl NodeView {
    fn new(n: &NodeRecord, gateways_served: u64, me: &str) -> Self {
        Self {
            region: (n.region != EVERY_REGION).then(|| n.region.clone()),
            api: n.api.clone(),
            state: if n.is_live() { NodeState::Live } else { NodeState::Lost },
            this_node: n.id == me,
            started_at: rfc3339_millis(n.started_at),
            last_heartbeat_at: rfc3339_millis(n.heartbeat_at),
            silent_for_ms: n.silent_for_millis.max(0),
            gateways_served,
            id: n.id.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeListEnvelope {
    pub data: Vec<NodeView>,
}

/// List the nodes that serve this store's gateways, live and lost.
#[utoipa::path(get, path = "/api/v1/nodes", operation_id = "list_nodes", tag = "operations",
    security(("bearer" = [])), responses((status = 200, body = NodeListEnvelope), (status = 401, body = ErrorEnvelope)))]
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<NodeListEnvelope>, ApiError> {
    let nodes = blocking(&state, |s| Ok(s.store.nodes_serving()?)).await?;
    let me = &state.settings.node.id;
    Ok(Json(NodeListEnvelope { data: nodes.iter().map(|(n, served)| NodeView::new(n, *served, me)).collect() }))
}
