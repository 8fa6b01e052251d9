//! The HTTP API (axum): `/api/v1/vpn-gateways` CRUD, live status, remote
//! configs, plus `/health`, `/ready`, `/metrics` and the OpenAPI document.
//! `app(state)` builds the whole router so tests can drive it with `oneshot`.

pub mod audit;
pub mod auth;
pub mod backup;
pub mod changes;
pub mod conditional;
pub mod error;
pub mod events;
pub mod extract;
pub mod formats;
pub mod gateways;
pub mod idempotency;
pub mod import;
pub mod keypairs;
pub mod model;
pub mod networks;
pub mod nodes;
pub mod openapi;
pub mod ops;
pub mod paging;
pub mod serving;
pub mod tunnel_watch;
pub mod webhook_delivery;
pub mod webhooks;

use crate::plane::DataPlane;
use crate::store::{GatewayRecord, Store};
use auth::{RateLimiter, SourceLimiter};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use model::LocalSide;
use std::sync::Arc;
use wgxdp_dataplane::noise::PublicKey;
use wgxdp_dataplane::table::IpPrefix;

/// Settings the API takes from the configuration file.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Default `local_network_cidr` (this site's network).
    pub site_cidr: Option<IpPrefix>,
    /// The gateway host's own addresses (every interface, read at start): no
    /// tunnel may route them.
    pub host_addresses: Vec<std::net::IpAddr>,
    /// The address remote peers reach this gateway at (for `local_ip` and configs).
    pub public_address: std::net::IpAddr,
    pub mutations_per_minute: u32,
    pub reads_per_minute: u32,
    /// Failed authentications allowed per source address (IPv6: per /64) and
    /// minute; beyond it requests get 429 before the store is consulted.
    pub auth_failures_per_minute: u32,
    /// Peers from the configuration file: API gateways may not take their
    /// prefixes or keys.
    pub static_peers: Vec<StaticPeer>,
    /// `/metrics` requires an API key.
    pub metrics_auth: bool,
    /// `/metrics` is served by `metrics_app` on its own listener, not by `app`.
    pub metrics_separate: bool,
    /// Most remote networks per address family, all peers together: what
    /// the LAN program's map of tunnel prefixes holds.
    pub max_remote_networks: usize,
    /// This `serve` as a node of the store's fleet.
    pub node: crate::store::ThisNode,
    /// `[node] floating_address`: serve only while it is on this host.
    pub floating_address: Option<std::net::IpAddr>,
}

/// A configuration-file peer as the API's conflict checks see it.
#[derive(Debug, Clone)]
pub struct StaticPeer {
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpPrefix>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            site_cidr: None,
            host_addresses: Vec::new(),
            public_address: std::net::Ipv4Addr::UNSPECIFIED.into(),
            mutations_per_minute: 100,
            reads_per_minute: 1200,
            auth_failures_per_minute: auth::DEFAULT_AUTH_FAILURES_PER_MINUTE,
            static_peers: Vec::new(),
            metrics_auth: false,
            metrics_separate: false,
            max_remote_networks: wgxdp_dataplane::loader::MAX_TUNNEL_PREFIXES as usize,
            node: crate::store::ThisNode::default(),
            floating_address: None,
        }
    }
}

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<Store>,
    pub plane: Arc<dyn DataPlane>,
    pub settings: ApiSettings,
    pub limiter: RateLimiter,
    /// Failed authentications per source address.
    pub auth_failures: SourceLimiter,
    /// The event log's live side (SSE streams, the webhook deliverer).
    pub events: Arc<events::EventHub>,
    /// Requests with one `Idempotency-Key` run one at a time (`idempotency`).
    idempotent_requests: idempotency::KeyedLocks,
    /// Held by every mutation's task (`auth::require_api_key`): `drain`
    /// waits until none is left.
    mutations_in_flight: Arc<()>,
    /// Serializes mutations (the API's and the `wg` socket's, and the
    /// serving passes): check-then-write and the data plane stay in step.
    /// Taken through `mutate`.
    mutations: Arc<tokio::sync::Mutex<()>>,
    /// What the data plane runs of the gateways this node serves.
    pub served: std::sync::Mutex<serving::Served>,
}

impl std::fmt::Debug for dyn DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataPlane")
    }
}

impl AppState {
    pub fn new(store: Arc<Store>, plane: Arc<dyn DataPlane>, settings: ApiSettings) -> Arc<Self> {
        let limiter = RateLimiter::new(settings.mutations_per_minute, settings.reads_per_minute);
        let auth_failures = SourceLimiter::new(settings.auth_failures_per_minute, auth::SOURCE_TABLE_CAPACITY);
        Arc::new(Self {
            store,
            plane,
            settings,
            limiter,
            auth_failures,
            events: Arc::default(),
            idempotent_requests: Default::default(),
            mutations_in_flight: Arc::new(()),
            mutations: Arc::default(),
            served: Default::default(),
        })
    }

    /// Runs `f` off the async runtime under this process's mutation lock,
    /// which it holds until `f` returns even if the caller stops waiting (a
    /// client that disconnects cannot let another change start beside a
    /// running one). For what touches only this node (the tunnel watch);
    /// changes to the store's gateways and webhooks go through `change`.
    pub async fn mutate<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&AppState) -> R + Send + 'static,
    ) -> Result<R, tokio::task::JoinError> {
        let guard = self.mutations.clone().lock_owned().await;
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(&state)
        })
        .await
    }

    /// `mutate`, also holding the store-wide write lock (on a shared store,
    /// fleet-wide: the checks see every node's writes and nobody writes
    /// between them and this change's write). A lock that cannot be had
    /// gives `refused`'s answer instead: a change never runs without it.
    pub async fn mutate_exclusive<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&AppState) -> R + Send + 'static,
        refused: impl FnOnce(crate::store::StoreError) -> R + Send + 'static,
    ) -> Result<R, tokio::task::JoinError> {
        self.mutate(move |s| match s.store.exclusive() {
            Ok(_held) => f(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot take the store's write lock; the change is refused");
                refused(e)
            }
        })
        .await
    }

    /// A change of the store's gateways or webhooks (`mutate_exclusive`): a
    /// lock that cannot be had is a 503.
    pub async fn change<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&AppState) -> Result<T, error::ApiError> + Send + 'static,
    ) -> Result<T, error::ApiError> {
        let refused = |_| {
            Err(error::ApiError::unavailable("the store is busy or does not answer; the change was not made, retry"))
        };
        self.mutate_exclusive(f, refused).await.map_err(error::ApiError::internal)?
    }

    /// A token a mutation's task holds while it runs.
    pub fn mutation_started(&self) -> Arc<()> {
        self.mutations_in_flight.clone()
    }

    /// After the server stopped: waits (at most `limit`) for mutations whose
    /// clients went away, so that each finishes with its idempotency answer
    /// and audit entry written. Returns how many were still running.
    pub async fn drain(&self, limit: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let running = Arc::strong_count(&self.mutations_in_flight) - 1;
            if running == 0 || tokio::time::Instant::now() >= deadline {
                return running;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Records an event about gateway `id` (blocking); false if the store
    /// could not.
    pub fn emit(&self, kind: crate::store::EventKind, id: &str, data: serde_json::Value) -> bool {
        self.events.emit(&self.store, kind, id, data).is_some()
    }

    /// A `gateway.*` event's data: the gateway as `GET` shows it (its key masked).
    pub fn gateway_event_data(&self, g: &GatewayRecord) -> serde_json::Value {
        let view = model::GatewayView::new(g, None, &self.local_side_of(&g.region), false);
        serde_json::to_value(view).unwrap_or_default()
    }

    /// The final write of a change (`g` as it becomes) with its event, in
    /// one transaction.
    pub fn settle(&self, g: &GatewayRecord, kind: crate::store::EventKind) -> Result<(), crate::store::StoreError> {
        let data = self.gateway_event_data(g);
        self.store.save_with_event(g, Some((kind, data)), |e| self.events.publish(e))
    }

    /// `settle`, only if the stored gateway is still `from` (status,
    /// `updated_at`); false (nothing written) if another change came first.
    pub fn settle_from(
        &self,
        g: &GatewayRecord,
        from: (crate::store::Status, i64),
        kind: crate::store::EventKind,
    ) -> Result<bool, crate::store::StoreError> {
        let data = self.gateway_event_data(g);
        self.store.settle_from(g, from, (kind, data), |e| self.events.publish(e))
    }

    pub fn local_side(&self) -> LocalSide {
        LocalSide {
            ip: self.settings.public_address,
            port: self.plane.listen_port(),
            public_key: self.plane.public_key(),
        }
    }

    /// The nodes of exactly `region` (not this one, not those of every
    /// region), live ones first; `None` when this node's own side is the
    /// region's: it is a node of that region, or of every region while the
    /// region has no live node of its own.
    fn others_of(&self, region: &str) -> Result<Option<Vec<crate::store::NodeRecord>>, crate::store::StoreError> {
        let me = &self.settings.node;
        if me.region == region {
            return Ok(None);
        }
        let mut nodes = self.store.nodes()?;
        nodes.retain(|n| n.region == region && n.id != me.id);
        if me.serves(region) && !nodes.iter().any(|n| n.is_live()) {
            return Ok(None);
        }
        nodes.sort_by_key(|n| !n.is_live());
        Ok(Some(nodes))
    }

    /// The site network of `region` (a create's default `local_network_cidr`,
    /// what its remote networks may not overlap): this node's if its side is
    /// the region's, else the one a node of that region published.
    pub fn site_cidr_of(&self, region: &str) -> Option<IpPrefix> {
        match self.others_of(region) {
            Ok(Some(nodes)) => nodes.iter().find_map(|n| n.site_cidr.parse().ok()).or(self.settings.site_cidr),
            Ok(None) => self.settings.site_cidr,
            Err(e) => {
                tracing::warn!(%region, error = %e, "cannot read the region's nodes; this node's site_cidr is used");
                self.settings.site_cidr
            }
        }
    }

    /// What the remote site of a gateway of `region` configures: this
    /// node's side if it is the region's (`others_of`), else the side a node
    /// of that region published (a live one first), else this node's.
    pub fn try_local_side_of(&self, region: &str) -> Result<LocalSide, crate::store::StoreError> {
        let own = self.local_side();
        let Some(nodes) = self.others_of(region)? else { return Ok(own) };
        Ok(nodes
            .iter()
            .find_map(|n| {
                Some(LocalSide {
                    ip: n.public_address.parse().ok()?,
                    port: Some(n.listen_port).filter(|p| *p > 0)?,
                    public_key: n.public_key.parse().ok()?,
                })
            })
            .unwrap_or(own))
    }

    /// `try_local_side_of`; a store that cannot say is logged, and this
    /// node's side shown (the configuration, `/config`, refuses instead).
    pub fn local_side_of(&self, region: &str) -> LocalSide {
        self.try_local_side_of(region).unwrap_or_else(|e| {
            tracing::warn!(%region, error = %e, "cannot read the region's nodes; this node's side is shown");
            self.local_side()
        })
    }
}

/// Runs blocking store/data-plane work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> Result<T, error::ApiError> + Send + 'static,
) -> Result<T, error::ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state)).await.map_err(error::ApiError::internal)?
}

pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/vpn-gateways", get(gateways::list).post(gateways::create))
        .route("/vpn-gateways/import", post(gateways::import))
        .route("/vpn-gateways/:id", get(gateways::get_one).patch(gateways::update).delete(gateways::delete))
        .route("/vpn-gateways/:id/status", get(gateways::status))
        .route("/vpn-gateways/:id/config", get(gateways::config))
        .route("/audit-log", get(audit::list))
        .route("/events", get(events::stream))
        .route("/events/history", get(events::history))
        .route("/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/webhooks/:id", get(webhooks::get_one).delete(webhooks::delete))
        .route("/webhooks/:id/deliveries", get(webhooks::deliveries))
        .route("/nodes", get(nodes::list))
        // Inside authentication (the idempotency layer needs the caller).
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::idempotent))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    // Authenticated, but outside the idempotency layer: a private key is
    // never stored, not even as an answer to replay; a restore's retry is
    // safe by itself (it finds its work done), and its body is far larger.
    let unstored = Router::new()
        .route("/keypairs", post(keypairs::create))
        .route("/backup", get(backup::backup))
        .route("/restore", post(backup::restore).layer(DefaultBodyLimit::max(backup::RESTORE_LIMIT)))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    let mut router = Router::new()
        .nest("/api/v1", v1.merge(unstored))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready));
    if !state.settings.metrics_separate {
        router = router.merge(metrics_routes(state.clone()));
    }
    router
        .fallback(|| async { error::ApiError::route_not_found() })
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .with_state(state)
}

/// `/metrics` alone, for its own listener (`[api] metrics_listen`).
pub fn metrics_app(state: Arc<AppState>) -> Router {
    metrics_routes(state.clone())
        .fallback(|| async { error::ApiError::route_not_found() })
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .with_state(state)
}

fn metrics_routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let r = Router::new().route("/metrics", get(ops::metrics));
    if state.settings.metrics_auth {
        r.route_layer(axum::middleware::from_fn_with_state(state, auth::require_api_key))
    } else {
        r
    }
}
