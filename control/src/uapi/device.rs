//! What the `wg` socket reads and changes: the running gateway seen as one
//! WireGuard device. Its peers are the configuration file's `[[peer]]`s
//! (read-only here) and the API's VPN gateways; every change goes through
//! `api::changes`, the same path as the HTTP API, so the store holds it before
//! it is acknowledged and the API and the socket never disagree.
//!
//! A peer added with `wg set` becomes a VPN gateway named `wg-` and the first
//! 8 characters of its base64 key, in region `wg`, routing its allowed IPs
//! (the first is `remote_network_cidr`, the others
//! `additional_remote_network_cidrs`), reaching the site CIDR, with no
//! firewall rules. It needs an endpoint (`remote_peer_ip`/`_port`) and at
//! least one allowed IP, as every gateway does.
//!
//! A `set` is checked whole before anything changes: a refused request
//! (a private key, port or fwmark the running gateway cannot take, a
//! configuration-file peer it cannot change, an invalid or overlapping
//! network) changes nothing. Then removals, changes and additions run in that
//! order, each one durable before the next.

use super::protocol::{errno, DeviceState, PeerChange, PeerState, RedactedKey, SetRequest, UapiError};
use crate::api::changes;
use crate::api::error::ApiError;
use crate::api::model::{overlaps, CreateGateway, UpdateGateway};
use crate::api::AppState;
use crate::plane::{DataPlane, TunnelStatus};
use crate::secret::SecretString;
use crate::store::{now_millis, AuditEntry, GatewayRecord, Status};
use axum::http::StatusCode;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use wgxdp_dataplane::gateway::PeerSpec;
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey, PublicKey};
use wgxdp_dataplane::table::IpPrefix;
use zeroize::Zeroizing;

/// The region of gateways created through the socket (on a node that
/// serves every region).
pub const UAPI_REGION: &str = "wg";

/// The gateway as one WireGuard device.
pub struct UapiDevice {
    private_key: PrivateKey,
    listen_port: u16,
    /// The configuration file's peers, in file order.
    config_peers: Vec<PeerSpec>,
    plane: Arc<dyn DataPlane>,
    /// The API's state (store, settings, mutation lock); `None` without an
    /// `[api]` section: then only the configuration file's peers exist and
    /// nothing can be changed.
    api: Option<Arc<AppState>>,
}

impl std::fmt::Debug for UapiDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UapiDevice").field("listen_port", &self.listen_port).finish_non_exhaustive()
    }
}

/// The errno a refused API change answers with; the message goes to the log.
fn from_api(e: ApiError) -> UapiError {
    let code = match e.status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => errno::EINVAL,
        StatusCode::CONFLICT => errno::EEXIST,
        StatusCode::NOT_FOUND => errno::ENOENT,
        _ => errno::EIO,
    };
    UapiError::new(code, e.message)
}

/// Where a peer of the request stands.
#[derive(Clone)]
enum Origin {
    /// The configuration file's peer at this index (cannot change).
    Config(usize),
    /// An API gateway.
    Gateway(Box<GatewayRecord>),
    /// Not there yet.
    New,
}

/// A peer as the request would leave it.
#[derive(Clone)]
struct Wanted {
    key: PublicKey,
    origin: Origin,
    removed: bool,
    preshared_key: PresharedKey,
    /// `None`: none given (a gateway keeps its stored one).
    endpoint: Option<SocketAddr>,
    /// Where the peer is now (its roamed endpoint): giving it back is no change.
    live_endpoint: Option<SocketAddr>,
    keepalive: u16,
    allowed_ips: Vec<IpPrefix>,
}

impl Wanted {
    /// `wg` starts a peer re-listed after `replace_peers` from nothing.
    fn blank(&self) -> Self {
        Self {
            removed: false,
            preshared_key: PresharedKey::default(),
            endpoint: None,
            keepalive: 0,
            allowed_ips: Vec::new(),
            ..self.clone()
        }
    }

    fn apply(&mut self, c: &PeerChange) {
        if let Some(k) = &c.preshared_key {
            self.preshared_key = k.clone();
        }
        if c.endpoint.is_some() {
            self.endpoint = c.endpoint;
        }
        if let Some(k) = c.persistent_keepalive {
            self.keepalive = k;
        }
        if c.replace_allowed_ips {
            self.allowed_ips.clear();
        }
        for p in &c.allowed_ips {
            if !self.allowed_ips.contains(p) {
                self.allowed_ips.push(*p);
            }
        }
    }
}

fn same_set(a: &[IpPrefix], b: &[IpPrefix]) -> bool {
    a.len() == b.len() && a.iter().all(|p| b.contains(p))
}

fn keepalive_secs(spec: &PeerSpec) -> u16 {
    spec.config.persistent_keepalive.map_or(0, |d| u16::try_from(d.as_secs()).unwrap_or(u16::MAX))
}

/// The API gateways the device shows: those running or about to.
fn shown(g: &GatewayRecord) -> bool {
    matches!(g.status, Status::Active | Status::Creating)
}

fn secret_base64(psk: &PresharedKey) -> SecretString {
    psk.to_base64_secret().into()
}

/// Where each peer of a `set` is in its list, by public key.
type KeyIndex = HashMap<[u8; 32], usize>;

/// One step of an accepted `set`.
enum Step {
    Delete(String),
    Update(String, UpdateGateway),
    Create(CreateGateway),
}

/// The networks one peer routes, as a planned `set` leaves them so far.
struct Holding {
    /// A gateway id, or what names a configuration-file or new peer.
    holder: String,
    key: Option<PublicKey>,
    networks: Vec<IpPrefix>,
}

/// An update or create waiting for its turn in a planned `set`.
struct Pending {
    /// The `Holding::holder` it becomes.
    holder: String,
    key: PublicKey,
    /// The networks it routes afterwards; `None`: unchanged.
    networks: Option<Vec<IpPrefix>>,
    step: Step,
}

impl Pending {
    /// The first of its networks another holder routes: (its, theirs, holder).
    fn conflict(&self, holdings: &[Holding]) -> Option<(IpPrefix, IpPrefix, String)> {
        let networks = self.networks.as_ref()?;
        holdings.iter().filter(|h| h.holder != self.holder).find_map(|h| {
            networks.iter().find_map(|p| h.networks.iter().find(|q| overlaps(p, q)).map(|q| (*p, *q, h.holder.clone())))
        })
    }
}

impl UapiDevice {
    pub fn new(
        private_key: PrivateKey,
        listen_port: u16,
        config_peers: Vec<PeerSpec>,
        plane: Arc<dyn DataPlane>,
        api: Option<Arc<AppState>>,
    ) -> Self {
        Self { private_key, listen_port, config_peers, plane, api }
    }

    fn gateways(&self) -> Result<Vec<GatewayRecord>, UapiError> {
        match &self.api {
            None => Ok(Vec::new()),
            Some(s) => Ok(s.store.live_readable().map_err(|e| from_api(e.into()))?.into_iter().filter(shown).collect()),
        }
    }

    fn gateway_statuses(&self, gateways: &[GatewayRecord]) -> Vec<Option<TunnelStatus>> {
        let ids: Vec<&str> = gateways.iter().map(|g| g.id.as_str()).collect();
        self.plane.statuses(&ids)
    }

    /// The device as `get=1` reports it (blocks on the store and the data plane).
    pub fn get(&self) -> Result<DeviceState, UapiError> {
        let mut private_key = Zeroizing::new([0u8; 32]);
        private_key.copy_from_slice(self.private_key.as_bytes());
        let mut peers = Vec::new();
        let config_live = self.plane.config_peer_statuses();
        for (i, spec) in self.config_peers.iter().enumerate() {
            let live = config_live.get(i).cloned().flatten().unwrap_or_default();
            peers.push(PeerState {
                public_key: spec.config.public_key,
                preshared_key: spec.config.preshared_key.clone(),
                endpoint: live.endpoint.or(spec.endpoint),
                last_handshake: live.last_handshake,
                rx_bytes: live.bytes_received,
                tx_bytes: live.bytes_sent,
                persistent_keepalive: keepalive_secs(spec),
                allowed_ips: spec.allowed_ips.clone(),
            });
        }
        let gateways = self.gateways()?;
        for (g, live) in gateways.iter().zip(self.gateway_statuses(&gateways)) {
            let live = live.unwrap_or_default();
            peers.push(PeerState {
                public_key: g.remote_public_key,
                preshared_key: (*g.pre_shared_key).clone(),
                endpoint: live.endpoint.or(Some(g.remote_endpoint)),
                last_handshake: live.last_handshake,
                rx_bytes: live.bytes_received,
                tx_bytes: live.bytes_sent,
                persistent_keepalive: g.persistent_keepalive.unwrap_or(0),
                allowed_ips: g.remote_prefixes().collect(),
            });
        }
        Ok(DeviceState { private_key: RedactedKey(private_key), listen_port: self.listen_port, fwmark: 0, peers })
    }

    /// Runs a `set=1` request: checked whole, then applied through the API's
    /// changes. Takes the API's mutation lock, so that it and API requests
    /// run one at a time.
    pub async fn set(self: &Arc<Self>, req: SetRequest) -> Result<(), UapiError> {
        let device = self.clone();
        let done = match &self.api {
            Some(s) => {
                let refused = |e| Err(UapiError::new(errno::EIO, format!("the store's write lock cannot be had: {e}")));
                s.mutate_exclusive(move |_| device.set_blocking(req), refused).await
            }
            None => tokio::task::spawn_blocking(move || device.set_blocking(req)).await,
        };
        done.map_err(|e| UapiError::new(errno::EIO, format!("the change did not finish: {e}")))?
    }

    /// The state every peer of the request starts from: the configuration
    /// file's peers and the shown gateways, by key.
    fn current(&self) -> Result<(Vec<Wanted>, KeyIndex), UapiError> {
        let mut wanted = Vec::new();
        let config_live = self.plane.config_peer_statuses();
        for (i, spec) in self.config_peers.iter().enumerate() {
            wanted.push(Wanted {
                key: spec.config.public_key,
                origin: Origin::Config(i),
                removed: false,
                preshared_key: spec.config.preshared_key.clone(),
                endpoint: spec.endpoint,
                live_endpoint: config_live.get(i).cloned().flatten().and_then(|s| s.endpoint),
                keepalive: keepalive_secs(spec),
                allowed_ips: spec.allowed_ips.clone(),
            });
        }
        let gateways = self.gateways()?;
        let live = self.gateway_statuses(&gateways);
        for (g, live) in gateways.into_iter().zip(live) {
            wanted.push(Wanted {
                key: g.remote_public_key,
                preshared_key: (*g.pre_shared_key).clone(),
                endpoint: Some(g.remote_endpoint),
                live_endpoint: live.and_then(|s| s.endpoint),
                keepalive: g.persistent_keepalive.unwrap_or(0),
                allowed_ips: g.remote_prefixes().collect(),
                removed: false,
                origin: Origin::Gateway(Box::new(g)),
            });
        }
        let index = wanted.iter().enumerate().map(|(i, w)| (w.key.0, i)).collect();
        Ok((wanted, index))
    }

    fn set_blocking(&self, req: SetRequest) -> Result<(), UapiError> {
        let ours = self.private_key.public_key();
        if req.private_key.as_deref().is_some_and(|k| k != self.private_key.as_bytes()) {
            return Err(UapiError::new(
                errno::EPERM,
                "the private key comes from the configuration's private_key_file; it cannot change while running",
            ));
        }
        if req.listen_port.is_some_and(|p| p != self.listen_port) {
            // As wireguard-go answers when it cannot bind the new port.
            return Err(UapiError::new(
                errno::EADDRINUSE,
                format!("the listen port is {}; change it in the configuration and restart", self.listen_port),
            ));
        }
        if req.fwmark.is_some_and(|m| m != 0) {
            return Err(UapiError::new(
                errno::EADDRINUSE,
                "fwmark is not supported: AF_XDP traffic has no socket mark",
            ));
        }
        let (original, index) = self.current()?;
        let mut wanted = original.clone();
        if req.replace_peers {
            wanted.iter_mut().for_each(|w| w.removed = true);
        }
        let mut index = index;
        for change in &req.peers {
            if change.public_key == ours {
                continue; // the device's own key: ignored, as wireguard-go does
            }
            let i = match index.get(&change.public_key.0) {
                Some(&i) if !wanted[i].removed => i,
                Some(_) | None if change.update_only => continue,
                Some(&i) => {
                    wanted[i] = wanted[i].blank();
                    i
                }
                None => {
                    wanted.push(Wanted {
                        key: change.public_key,
                        origin: Origin::New,
                        removed: false,
                        preshared_key: PresharedKey::default(),
                        endpoint: None,
                        live_endpoint: None,
                        keepalive: 0,
                        allowed_ips: Vec::new(),
                    });
                    index.insert(change.public_key.0, wanted.len() - 1);
                    wanted.len() - 1
                }
            };
            if change.remove {
                wanted[i].removed = true;
            } else {
                wanted[i].apply(change);
            }
        }
        let steps = self.plan(&original, &wanted)?;
        self.run(steps)
    }

    /// The API changes that take `original` to `wanted`, each validated, in
    /// an order in which each one passes the API's conflict checks against
    /// the gateways as the steps before it leave them (so a network can move
    /// from one peer to another in one request); a request no order can run
    /// (two peers swapping networks) is refused before anything changes.
    fn plan(&self, original: &[Wanted], wanted: &[Wanted]) -> Result<Vec<Step>, UapiError> {
        let mut deletes = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        for (i, w) in wanted.iter().enumerate() {
            match &w.origin {
                Origin::Config(index) => {
                    let o = &original[i];
                    let endpoint_changed =
                        w.endpoint.is_some_and(|e| Some(e) != o.endpoint && Some(e) != o.live_endpoint);
                    if w.removed
                        || endpoint_changed
                        || w.preshared_key != o.preshared_key
                        || w.keepalive != o.keepalive
                        || !same_set(&w.allowed_ips, &o.allowed_ips)
                    {
                        return Err(UapiError::new(
                            errno::EPERM,
                            format!("peer {} is [[peer]] {index} of the configuration file; change it there", w.key),
                        ));
                    }
                }
                Origin::Gateway(g) => {
                    let body = if w.removed { None } else { self.update_body(&original[i], w)? };
                    // Only a gateway the request changes must have settled.
                    if (w.removed || body.is_some()) && g.status != Status::Active {
                        return Err(UapiError::new(
                            errno::EEXIST,
                            format!("VPN gateway {} is {}; retry when it settles", g.id, g.status.as_str()),
                        ));
                    }
                    if w.removed {
                        deletes.push(Step::Delete(g.id.clone()));
                        continue;
                    }
                    if let Some(body) = body {
                        let state = self.api_state()?;
                        changes::check_update(state, g, body.clone()).map_err(from_api)?;
                        let moved = body.remote_network_cidr.is_some();
                        pending.push(Pending {
                            holder: g.id.clone(),
                            key: w.key,
                            networks: moved.then(|| w.allowed_ips.clone()),
                            step: Step::Update(g.id.clone(), body),
                        });
                    }
                }
                Origin::New if w.removed => {}
                Origin::New => {
                    let state = self.api_state()?;
                    let body = new_gateway(w, &state.settings.node.region)?;
                    let new =
                        body.clone().validate(state.settings.site_cidr, &self.plane.public_key()).map_err(from_api)?;
                    changes::check_new(state, &new).map_err(from_api)?;
                    pending.push(Pending {
                        holder: format!("new peer {}", w.key),
                        key: w.key,
                        networks: Some(w.allowed_ips.clone()),
                        step: Step::Create(body),
                    });
                }
            }
        }
        if deletes.is_empty() && pending.is_empty() {
            return Ok(Vec::new());
        }
        let mut holdings = self.holdings()?;
        for step in &deletes {
            if let Step::Delete(id) = step {
                holdings.retain(|h| &h.holder != id);
            }
        }
        if let Some(taken) = pending.iter().find_map(|p| {
            let new = matches!(p.step, Step::Create(_));
            holdings.iter().find(|h| new && h.key == Some(p.key)).map(|h| h.holder.clone())
        }) {
            return Err(UapiError::new(errno::EEXIST, format!("{taken} already uses this public key")));
        }
        let mut steps = deletes;
        while !pending.is_empty() {
            let ready = pending.iter().position(|p| p.conflict(&holdings).is_none());
            let Some(i) = ready else {
                let p = &pending[0];
                let why = match p.conflict(&holdings) {
                    Some((mine, theirs, holder)) => {
                        format!("allowed IP {mine} of peer {} overlaps {theirs} of {holder}", p.key)
                    }
                    None => format!("peer {}: its networks cannot be moved in any order", p.key),
                };
                return Err(UapiError::new(errno::EEXIST, why));
            };
            let p = pending.remove(i);
            if let Some(networks) = p.networks {
                holdings.retain(|h| h.holder != p.holder);
                holdings.push(Holding { holder: p.holder, key: Some(p.key), networks });
            }
            steps.push(p.step);
        }
        Ok(steps)
    }

    /// The networks every peer the data plane holds routes: each live
    /// gateway (whatever its status) and each configuration-file peer.
    fn holdings(&self) -> Result<Vec<Holding>, UapiError> {
        let mut out: Vec<Holding> = self
            .config_peers
            .iter()
            .enumerate()
            .map(|(i, p)| Holding {
                holder: format!("[[peer]] {i} of the configuration file"),
                key: Some(p.config.public_key),
                networks: p.allowed_ips.clone(),
            })
            .collect();
        for g in self.api_state()?.store.live_readable().map_err(|e| from_api(e.into()))? {
            let networks = g.remote_prefixes().collect();
            out.push(Holding { holder: g.id, key: Some(g.remote_public_key), networks });
        }
        Ok(out)
    }

    fn api_state(&self) -> Result<&Arc<AppState>, UapiError> {
        self.api.as_ref().ok_or_else(|| {
            UapiError::new(
                errno::EPERM,
                "this gateway has no [api] section: its peers come from the configuration file only",
            )
        })
    }

    /// The PATCH that takes gateway `o` to `w`; `None` when nothing changes.
    fn update_body(&self, o: &Wanted, w: &Wanted) -> Result<Option<UpdateGateway>, UapiError> {
        let mut body = UpdateGateway::default();
        let mut changed = false;
        if w.preshared_key != o.preshared_key {
            body.pre_shared_key = Some(secret_base64(&w.preshared_key));
            changed = true;
        }
        if let Some(e) = w.endpoint.filter(|e| Some(*e) != o.endpoint && Some(*e) != o.live_endpoint) {
            body.remote_peer_ip = Some(e.ip().to_string());
            body.remote_peer_port = Some(e.port());
            changed = true;
        }
        if w.keepalive != o.keepalive {
            body.persistent_keepalive = Some(w.keepalive);
            changed = true;
        }
        if !same_set(&w.allowed_ips, &o.allowed_ips) {
            let (first, rest) = w.allowed_ips.split_first().ok_or_else(|| {
                UapiError::invalid(format!("peer {}: a VPN gateway needs at least one allowed IP", w.key))
            })?;
            body.remote_network_cidr = Some(first.to_string());
            body.additional_remote_network_cidrs = Some(rest.iter().map(ToString::to_string).collect());
            changed = true;
        }
        Ok(changed.then_some(body))
    }

    /// Runs the planned steps in order. Each is complete (durable and in the
    /// data plane) before the next; only a failing store or data plane can
    /// stop the run midway, with the steps before it applied (logged).
    fn run(&self, steps: Vec<Step>) -> Result<(), UapiError> {
        if steps.is_empty() {
            return Ok(());
        }
        let state = self.api_state()?;
        let total = steps.len();
        for (done, step) in steps.into_iter().enumerate() {
            let (action, target) = match &step {
                Step::Delete(id) => ("gateway.delete", Some(id.clone())),
                Step::Update(id, _) => ("gateway.update", Some(id.clone())),
                Step::Create(_) => ("gateway.create", None),
            };
            let result = match step {
                Step::Delete(id) => changes::delete(state, &id, None).map(|_| None),
                Step::Update(id, body) => changes::update(state, &id, body, None).map(|_| None),
                Step::Create(body) => body
                    .validate(state.settings.site_cidr, &self.plane.public_key())
                    .and_then(|new| changes::create(state, new))
                    .map(|g| {
                        tracing::info!(id = %g.id, name = %g.name, "VPN gateway added through the wg socket");
                        Some(g.id)
                    }),
            };
            let (status, error_code) = match &result {
                Ok(_) => (200, None),
                Err(e) => (e.status.as_u16(), Some(e.code.to_owned())),
            };
            let entry = AuditEntry {
                seq: 0,
                at: now_millis(),
                key_id: AUDIT_KEY_ID.to_owned(),
                action: action.to_owned(),
                target: target.or_else(|| result.as_ref().ok().cloned().flatten()),
                status,
                error_code,
                replayed: false,
            };
            if let Err(e) = state.store.record_audit(entry) {
                tracing::error!(error = %e, "cannot record a wg socket change in the audit log");
            }
            if let Err(e) = result {
                if done > 0 {
                    tracing::error!(done, total, error = %e.message, "a wg socket change stopped midway");
                }
                return Err(from_api(e));
            }
        }
        Ok(())
    }
}

/// Who the audit log names for changes through the WireGuard socket.
pub const AUDIT_KEY_ID: &str = "wg-socket";

/// The create request for a peer first seen in a `set`: in `UAPI_REGION`,
/// or this node's region if it serves only one (`node_region`).
fn new_gateway(w: &Wanted, node_region: &str) -> Result<CreateGateway, UapiError> {
    let region = if node_region == crate::store::EVERY_REGION { UAPI_REGION } else { node_region };
    let endpoint = w.endpoint.ok_or_else(|| {
        UapiError::invalid(format!("new peer {}: a VPN gateway needs an endpoint (the remote site's address)", w.key))
    })?;
    let (first, rest) = w.allowed_ips.split_first().ok_or_else(|| {
        UapiError::invalid(format!("new peer {}: a VPN gateway needs at least one allowed IP", w.key))
    })?;
    let key = w.key.to_base64();
    Ok(CreateGateway {
        name: Some(format!("wg-{}", &key[..8])),
        region: Some(region.into()),
        tunnel_type: Some("wireguard".into()),
        remote_network_cidr: Some(first.to_string()),
        remote_peer_ip: Some(endpoint.ip().to_string()),
        remote_public_key: Some(key),
        remote_peer_port: Some(endpoint.port()),
        pre_shared_key: Some(secret_base64(&w.preshared_key)),
        persistent_keepalive: Some(w.keepalive),
        additional_remote_network_cidrs: Some(rest.iter().map(ToString::to_string).collect()),
        ..CreateGateway::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiSettings, StaticPeer};
    use crate::plane::MemoryPlane;
    use crate::store::Store;
    use crate::uapi::protocol::parse_set;
    use wgxdp_dataplane::noise::peer::PeerConfig;

    struct Fixture {
        device: UapiDevice,
        store: Arc<Store>,
        plane: Arc<MemoryPlane>,
        db: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
            }
        }
    }

    const PRIVATE: [u8; 32] = [0x22; 32];
    const CONFIG_PEER: [u8; 32] = [0x11; 32];

    fn hex(b: &[u8; 32]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn fixture(with_api: bool) -> Fixture {
        let db = std::env::temp_dir().join(format!("{}.db", crate::store::random_id("wgxdp-uapi-")));
        let store = Arc::new(Store::open(&db).unwrap());
        let private_key = PrivateKey::from_bytes(PRIVATE);
        let plane = Arc::new(MemoryPlane::new(private_key.public_key()));
        let config_peer = PeerSpec {
            config: PeerConfig {
                public_key: PublicKey(CONFIG_PEER),
                preshared_key: PresharedKey::default(),
                persistent_keepalive: None,
            },
            endpoint: Some("192.0.2.11:51820".parse().unwrap()),
            allowed_ips: vec!["10.11.0.0/16".parse().unwrap()],
            policy: Default::default(),
        };
        let settings = ApiSettings {
            site_cidr: Some("10.50.0.0/24".parse().unwrap()),
            static_peers: vec![StaticPeer {
                public_key: config_peer.config.public_key,
                allowed_ips: config_peer.allowed_ips.clone(),
            }],
            ..ApiSettings::default()
        };
        let api = with_api.then(|| AppState::new(store.clone(), plane.clone(), settings));
        let device = UapiDevice::new(private_key, 51820, vec![config_peer], plane.clone(), api);
        Fixture { device, store, plane, db }
    }

    impl Fixture {
        fn set(&self, text: &str) -> Result<(), UapiError> {
            self.device.set_blocking(parse_set(text).unwrap())
        }

        fn gateway(&self, key: &PublicKey) -> Option<GatewayRecord> {
            self.store.live().unwrap().into_iter().find(|g| g.remote_public_key == *key)
        }

        /// The store and the data plane hold the same gateways.
        fn assert_in_step(&self) {
            let live = self.store.live().unwrap();
            assert_eq!(self.plane.tunnels.lock().unwrap().len(), live.len());
            for g in &live {
                assert_eq!(self.plane.tunnel(&g.id), Some(crate::api::model::tunnel_of(g)), "{}", g.id);
            }
        }
    }

    fn peer() -> (PublicKey, String) {
        let k = PrivateKey::generate().public_key();
        (k, hex(k.as_bytes()))
    }

    #[test]
    fn a_peer_set_over_the_socket_is_a_gateway_and_reads_back() {
        let f = fixture(true);
        let (key, k) = peer();
        f.set(&format!(
            "public_key={k}\nendpoint=203.0.113.5:51821\nallowed_ip=10.60.0.0/16\nallowed_ip=fd60::/64\n\
             persistent_keepalive_interval=25\n"
        ))
        .unwrap();
        let g = f.gateway(&key).expect("a gateway for the peer");
        assert_eq!(
            (g.name.as_str(), g.region.as_str(), g.status),
            (&*format!("wg-{}", &key.to_base64()[..8]), "wg", Status::Active)
        );
        assert_eq!(
            (g.remote_network_cidr.to_string(), g.remote_endpoint.to_string()),
            ("10.60.0.0/16".into(), "203.0.113.5:51821".into())
        );
        assert_eq!(g.additional_remote_network_cidrs, vec!["fd60::/64".parse().unwrap()]);
        assert_eq!((g.local_network_cidr.to_string().as_str(), g.persistent_keepalive), ("10.50.0.0/24", Some(25)));
        // No pre-shared key given: none (all zeros), as WireGuard means it.
        assert_eq!(*g.pre_shared_key, PresharedKey::default());
        f.assert_in_step();

        let state = f.device.get().unwrap();
        assert_eq!(*state.private_key.0, PRIVATE);
        assert_eq!(state.peers.len(), 2, "the configuration file's peer and the new one");
        assert_eq!(state.peers[0].public_key, PublicKey(CONFIG_PEER));
        let p = &state.peers[1];
        assert_eq!(
            (p.public_key, p.endpoint, p.persistent_keepalive),
            (key, Some("203.0.113.5:51821".parse().unwrap()), 25)
        );
        assert_eq!(p.allowed_ips, vec!["10.60.0.0/16".parse().unwrap(), "fd60::/64".parse().unwrap()]);
    }

    /// A gateway row edited by hand into something that does not decode:
    /// `wg show` lists every other peer, and its networks stay taken.
    #[test]
    fn a_gateway_row_that_does_not_decode_is_left_out_but_still_holds_its_networks() {
        let f = fixture(true);
        let ((a, ka), (b, kb)) = (peer(), peer());
        f.set(&format!("public_key={ka}\nendpoint=203.0.113.5:51821\nallowed_ip=10.60.0.0/16\n")).unwrap();
        f.set(&format!("public_key={kb}\nendpoint=203.0.113.6:51821\nallowed_ip=10.61.0.0/16\n")).unwrap();
        let broken = f.gateway(&b).unwrap().id;
        let db = rusqlite::Connection::open(&f.db).unwrap();
        db.execute("UPDATE gateways SET remote_peer_ip = 'x' WHERE id = ?1", [&broken]).unwrap();
        let shown: Vec<PublicKey> = f.device.get().unwrap().peers.iter().map(|p| p.public_key).collect();
        assert_eq!(shown, [PublicKey(CONFIG_PEER), a]);
        let (_, kc) = peer();
        let claim = f.set(&format!("public_key={kc}\nendpoint=203.0.113.7:1\nallowed_ip=10.61.1.0/24\n")).unwrap_err();
        assert_eq!(claim.errno, errno::EEXIST, "{}", claim.message);
        let (d, kd) = peer();
        f.set(&format!("public_key={kd}\nendpoint=203.0.113.8:1\nallowed_ip=10.62.0.0/16\n")).unwrap();
        assert_eq!(f.device.get().unwrap().peers.len(), 3, "{d} added beside it");
    }

    #[test]
    fn changes_keep_the_gateway_and_follow_wg_semantics() {
        let f = fixture(true);
        let (key, k) = peer();
        f.set(&format!("public_key={k}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n")).unwrap();
        let id = f.gateway(&key).unwrap().id;
        // A new pre-shared key; an allowed IP appended (no replace_allowed_ips).
        let psk = [9u8; 32];
        f.set(&format!("public_key={k}\npreshared_key={}\nallowed_ip=10.61.0.0/16\n", hex(&psk))).unwrap();
        let g = f.gateway(&key).unwrap();
        assert_eq!(g.id, id);
        assert_eq!(*g.pre_shared_key, PresharedKey::from_bytes(psk));
        assert_eq!(g.remote_network_cidr, "10.60.0.0/16".parse().unwrap());
        assert_eq!(g.additional_remote_network_cidrs, vec!["10.61.0.0/16".parse().unwrap()]);
        // replace_allowed_ips: the list becomes exactly what follows.
        f.set(&format!("public_key={k}\nreplace_allowed_ips=true\nallowed_ip=10.62.0.0/16\n")).unwrap();
        let g = f.gateway(&key).unwrap();
        assert_eq!(
            (g.remote_network_cidr.to_string().as_str(), g.additional_remote_network_cidrs.len()),
            ("10.62.0.0/16", 0)
        );
        // An empty list leaves a gateway nothing to route: refused.
        assert_eq!(f.set(&format!("public_key={k}\nreplace_allowed_ips=true\n")).unwrap_err().errno, errno::EINVAL);
        // update_only never creates; removing an unknown peer is no error.
        let (other, o) = peer();
        f.set(&format!("public_key={o}\nupdate_only=true\nendpoint=203.0.113.6:1\nallowed_ip=10.63.0.0/16\n")).unwrap();
        f.set(&format!("public_key={o}\nremove=true\n")).unwrap();
        assert!(f.gateway(&other).is_none());
        // The device's own key is ignored, as wireguard-go does.
        let ours = hex(PrivateKey::from_bytes(PRIVATE).public_key().as_bytes());
        f.set(&format!("public_key={ours}\nendpoint=203.0.113.7:1\nallowed_ip=10.64.0.0/16\n")).unwrap();
        assert_eq!(f.store.live().unwrap().len(), 1);
        f.set(&format!("public_key={k}\nremove=true\n")).unwrap();
        assert!(f.gateway(&key).is_none());
        assert_eq!(f.store.get(&id).unwrap().unwrap().status, Status::Deleted);
        // The audit log has every change the socket ran (a request refused
        // while it is planned runs none).
        let log: Vec<_> = f.store.audit_log(None, 100).unwrap().into_iter().rev().collect();
        assert!(log.iter().all(|e| e.key_id == AUDIT_KEY_ID), "{log:?}");
        let summary: Vec<(&str, Option<&str>, u16)> =
            log.iter().map(|e| (e.action.as_str(), e.target.as_deref(), e.status)).collect();
        let id = Some(id.as_str());
        assert_eq!(
            summary[..3],
            [("gateway.create", id, 200), ("gateway.update", id, 200), ("gateway.update", id, 200)]
        );
        assert_eq!(summary.last(), Some(&("gateway.delete", id, 200)));
        assert_eq!(summary.len(), 4, "{summary:?}");
        f.assert_in_step();
    }

    #[test]
    fn replace_peers_keeps_listed_peers_and_removes_the_rest() {
        let f = fixture(true);
        let (a, ka) = peer();
        let (b, kb) = peer();
        let (c, kc) = peer();
        f.set(&format!(
            "public_key={ka}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n\
             public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.61.0.0/16\n"
        ))
        .unwrap();
        let a_id = f.gateway(&a).unwrap().id;
        let config = hex(&CONFIG_PEER);
        // As `wg setconf` sends it: every peer listed from scratch.
        f.set(&format!(
            "private_key={}\nlisten_port=51820\nreplace_peers=true\n\
             public_key={config}\nendpoint=192.0.2.11:51820\nreplace_allowed_ips=true\nallowed_ip=10.11.0.0/16\n\
             public_key={ka}\nendpoint=203.0.113.5:1\nreplace_allowed_ips=true\nallowed_ip=10.60.0.0/16\n\
             public_key={kc}\nendpoint=203.0.113.8:1\nreplace_allowed_ips=true\nallowed_ip=10.61.0.0/16\n",
            hex(&PRIVATE)
        ))
        .unwrap();
        assert_eq!(f.gateway(&a).unwrap().id, a_id, "an unchanged listed peer keeps its gateway");
        assert!(f.gateway(&b).is_none(), "an unlisted peer is removed");
        assert_eq!(
            f.gateway(&c).unwrap().remote_network_cidr,
            "10.61.0.0/16".parse().unwrap(),
            "b's network went to c"
        );
        f.assert_in_step();
        // A configuration-file peer cannot be dropped: refused whole.
        let before = f.store.live().unwrap();
        let e =
            f.set(&format!("replace_peers=true\npublic_key={ka}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n"));
        assert_eq!(e.unwrap_err().errno, errno::EPERM);
        assert_eq!(f.store.live().unwrap(), before);
    }

    #[test]
    fn a_refused_request_changes_nothing() {
        let f = fixture(true);
        let (a, ka) = peer();
        f.set(&format!("public_key={ka}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n")).unwrap();
        let before = f.store.live().unwrap();
        let (_, kb) = peer();
        let (_, kc) = peer();
        let config = hex(&CONFIG_PEER);
        let cases: Vec<(String, i32)> = vec![
            // The second peer has no endpoint: the first is not added either.
            (format!("public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.61.0.0/16\npublic_key={kc}\nallowed_ip=10.62.0.0/16\n"), errno::EINVAL),
            // A change to a and an overlap elsewhere: a keeps its key.
            (format!("public_key={ka}\npreshared_key={}\npublic_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.60.1.0/24\n", hex(&[5; 32])), errno::EEXIST),
            (format!("public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.11.0.0/24\n"), errno::EEXIST),
            (format!("public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.50.0.0/24\n"), errno::EEXIST),
            (format!("public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=0.0.0.0/0\n"), errno::EINVAL),
            (format!("public_key={config}\npreshared_key={}\n", hex(&[5; 32])), errno::EPERM),
            (format!("public_key={config}\nallowed_ip=10.12.0.0/16\n"), errno::EPERM),
            (format!("public_key={config}\nremove=true\n"), errno::EPERM),
            (format!("private_key={}\n", hex(&[1; 32])), errno::EPERM),
            ("listen_port=51821\n".to_owned(), errno::EADDRINUSE),
            ("fwmark=3\n".to_owned(), errno::EADDRINUSE),
        ];
        for (text, want) in cases {
            assert_eq!(f.set(&text).unwrap_err().errno, want, "{text}");
            assert_eq!(f.store.live().unwrap(), before, "{text}");
            f.assert_in_step();
        }
        assert!(f.gateway(&a).is_some());
        // What the gateway runs with already is no change.
        f.set(&format!("private_key={}\nlisten_port=51820\nfwmark=0\n", hex(&PRIVATE))).unwrap();
        f.set(&format!("public_key={config}\nendpoint=192.0.2.11:51820\nallowed_ip=10.11.0.0/16\n")).unwrap();
    }

    #[test]
    fn networks_move_between_peers_in_one_request_whatever_the_order() {
        let f = fixture(true);
        let (a, ka) = peer();
        let (b, kb) = peer();
        let (c, kc) = peer();
        f.set(&format!(
            "public_key={ka}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n\
             public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.61.0.0/16\n\
             public_key={kc}\nendpoint=203.0.113.7:1\nallowed_ip=10.62.0.0/16\n"
        ))
        .unwrap();
        // b takes c's network while c moves on, listed in either order; a's
        // key changes in the same request.
        f.set(&format!(
            "public_key={ka}\npreshared_key={}\n\
             public_key={kb}\nreplace_allowed_ips=true\nallowed_ip=10.62.0.0/16\n\
             public_key={kc}\nreplace_allowed_ips=true\nallowed_ip=10.63.0.0/16\n",
            hex(&[3; 32])
        ))
        .unwrap();
        assert_eq!(f.gateway(&b).unwrap().remote_network_cidr, "10.62.0.0/16".parse().unwrap());
        assert_eq!(f.gateway(&c).unwrap().remote_network_cidr, "10.63.0.0/16".parse().unwrap());
        f.set(&format!(
            "public_key={kc}\nreplace_allowed_ips=true\nallowed_ip=10.64.0.0/16\n\
             public_key={kb}\nreplace_allowed_ips=true\nallowed_ip=10.63.0.0/16\n"
        ))
        .unwrap();
        assert_eq!(f.gateway(&b).unwrap().remote_network_cidr, "10.63.0.0/16".parse().unwrap());
        // A swap has no order in which every step is valid: refused, nothing changes.
        let before = f.store.live().unwrap();
        let e = f.set(&format!(
            "public_key={ka}\npreshared_key={}\n\
             public_key={kb}\nreplace_allowed_ips=true\nallowed_ip=10.64.0.0/16\n\
             public_key={kc}\nreplace_allowed_ips=true\nallowed_ip=10.63.0.0/16\n",
            hex(&[4; 32])
        ));
        assert_eq!(e.unwrap_err().errno, errno::EEXIST);
        assert_eq!(f.store.live().unwrap(), before);
        // setconf that drops a and gives its network to a new peer.
        let (d, kd) = peer();
        f.set(&format!(
            "replace_peers=true\npublic_key={}\nendpoint=192.0.2.11:51820\nallowed_ip=10.11.0.0/16\n\
             public_key={kd}\nendpoint=203.0.113.8:1\nallowed_ip=10.60.0.0/16\n\
             public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.63.0.0/16\n\
             public_key={kc}\nendpoint=203.0.113.7:1\nallowed_ip=10.64.0.0/16\n",
            hex(&CONFIG_PEER)
        ))
        .unwrap();
        assert!(f.gateway(&a).is_none());
        assert_eq!(f.gateway(&d).unwrap().remote_network_cidr, "10.60.0.0/16".parse().unwrap());
        f.assert_in_step();
    }

    #[test]
    fn an_unsettled_gateway_blocks_only_changes_to_itself() {
        let f = fixture(true);
        let (a, ka) = peer();
        let (b, kb) = peer();
        f.set(&format!(
            "public_key={ka}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n\
             public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.61.0.0/16\n"
        ))
        .unwrap();
        f.store.set_status(&f.gateway(&a).unwrap().id, Status::Creating).unwrap();
        f.set(&format!("public_key={kb}\npersistent_keepalive_interval=5\n")).unwrap();
        f.set(&format!("public_key={ka}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n")).unwrap();
        assert_eq!(f.gateway(&b).unwrap().persistent_keepalive, Some(5));
        let e = f.set(&format!("public_key={ka}\npersistent_keepalive_interval=5\n")).unwrap_err();
        assert_eq!(e.errno, errno::EEXIST);
        assert_eq!(f.set(&format!("public_key={ka}\nremove=true\n")).unwrap_err().errno, errno::EEXIST);
    }

    #[test]
    fn a_gateway_being_deleted_still_holds_its_key_and_networks() {
        let f = fixture(true);
        let (a, ka) = peer();
        f.set(&format!("public_key={ka}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n")).unwrap();
        let id = f.gateway(&a).unwrap().id;
        f.store.set_status(&id, Status::Deleting).unwrap();
        let (_, kb) = peer();
        let e = f.set(&format!("public_key={kb}\nendpoint=203.0.113.6:1\nallowed_ip=10.60.0.0/24\n"));
        assert_eq!(e.unwrap_err().errno, errno::EEXIST);
        let e = f.set(&format!("public_key={ka}\nendpoint=203.0.113.6:1\nallowed_ip=10.70.0.0/24\n"));
        assert_eq!(e.unwrap_err().errno, errno::EEXIST, "a second gateway for a key still held");
    }

    #[test]
    fn without_an_api_the_configuration_peers_show_and_nothing_changes() {
        let f = fixture(false);
        let state = f.device.get().unwrap();
        assert_eq!(state.peers.len(), 1);
        assert_eq!(state.peers[0].endpoint, Some("192.0.2.11:51820".parse().unwrap()));
        let (_, k) = peer();
        let e = f.set(&format!("public_key={k}\nendpoint=203.0.113.5:1\nallowed_ip=10.60.0.0/16\n")).unwrap_err();
        assert_eq!(e.errno, errno::EPERM);
        f.set("listen_port=51820\n").unwrap();
    }
}
