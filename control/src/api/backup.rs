//! `GET /api/v1/backup` and `POST /api/v1/restore` (admin keys only): the
//! whole configuration the store holds (every active gateway, every
//! webhook) as one JSON document, and that document back.
//!
//! - Secrets (pre-shared keys, webhook signing secrets) are in a backup only
//!   when asked for (`include_secrets=true`); such a backup is audited
//!   (`config.backup`, target `with-secrets`) and never cached.
//! - A restore needs every secret: a tunnel restored with a new pre-shared
//!   key would be black-holed until the remote site changed its key.
//! - A restore keeps ids. A gateway or webhook that exists here as the
//!   backup has it is left alone (`unchanged`: a retried restore changes
//!   nothing); one that exists otherwise is a conflict (409); a deleted
//!   gateway comes back. Everything is validated and checked (the create's
//!   rules, overlaps with this host's gateways and within the backup) before
//!   anything changes; a failure while applying takes back what the restore
//!   made. API keys are not part of a backup.

use super::changes::{check_capacity, check_conflicts, check_new, commit_create, delete};
use super::error::ApiError;
use super::extract::{ApiQuery, JsonBody};
use super::model::{bounded, decode_json, exact_key, rfc3339_millis, CreateGateway, NewGateway};
use super::networks::MAX_ADDITIONAL;
use super::webhooks::{CreateWebhook, NewWebhook, WebhookView, MAX_WEBHOOKS};
use super::{blocking, AppState};
use crate::firewall::{rule_texts, FirewallRuleText};
use crate::secret::SecretString;
use crate::store::{
    is_webhook_secret, now_millis, AuditEntry, Caller, GatewayRecord, LiveIndex, Scope, Status, Webhook,
};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use utoipa::ToSchema;
use wgxdp_dataplane::noise::PublicKey;
use wgxdp_dataplane::policy::MAX_RULES;
use wgxdp_dataplane::table::IpPrefix;

pub const FORMAT: &str = "wgxdp-backup";
pub const VERSION: u32 = 1;
/// Largest restore body: 10 000 gateways with firewalls fit.
pub const RESTORE_LIMIT: usize = 64 * 1024 * 1024;
/// Most gateways one restore takes (and one backup holds).
pub const MAX_GATEWAYS: usize = 100_000;

/// The whole configuration. Restore takes it as `GET /api/v1/backup` gave it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    #[schema(pattern = "^wgxdp-backup$", example = "wgxdp-backup")]
    pub format: String,
    #[schema(minimum = 1, maximum = 1)]
    pub version: u32,
    /// When the backup was made (not used by a restore).
    #[serde(default)]
    pub created_at: Option<String>,
    /// The public key of the gateway that made it: the key the remote sites
    /// know. A restore onto a gateway with another key warns.
    #[serde(default)]
    #[schema(value_type = Option<WireguardKey>)]
    pub gateway_public_key: Option<String>,
    /// Whether pre-shared keys and webhook secrets are in it.
    #[serde(default)]
    pub secrets_included: bool,
    #[schema(max_items = 100000)]
    pub gateways: Vec<BackupGateway>,
    #[schema(max_items = 100)]
    pub webhooks: Vec<BackupWebhook>,
}

/// A gateway as `CreateGateway` takes it, with its id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupGateway {
    #[schema(pattern = "^vpn_[a-z0-9]{1,32}$", example = "vpn_abc123")]
    pub id: String,
    #[schema(value_type = GatewayName)]
    pub name: String,
    #[schema(value_type = Region)]
    pub region: String,
    #[schema(value_type = LocalNetwork)]
    pub local_network_cidr: String,
    #[schema(value_type = Vec<LocalNetwork>, max_items = 63)]
    #[serde(deserialize_with = "bounded::<_, _, MAX_ADDITIONAL>")]
    pub additional_local_network_cidrs: Vec<String>,
    #[schema(value_type = RemoteNetwork)]
    pub remote_network_cidr: String,
    #[schema(value_type = Vec<RemoteNetwork>, max_items = 63)]
    #[serde(deserialize_with = "bounded::<_, _, MAX_ADDITIONAL>")]
    pub additional_remote_network_cidrs: Vec<String>,
    #[schema(value_type = PeerAddress)]
    pub remote_peer_ip: String,
    #[schema(minimum = 1, maximum = 65535)]
    pub remote_peer_port: u16,
    #[schema(value_type = WireguardKey)]
    pub remote_public_key: String,
    /// Only in a backup made with `include_secrets=true`; a restore needs it.
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "exposed")]
    #[schema(value_type = Option<WireguardKey>)]
    pub pre_shared_key: Option<SecretString>,
    #[schema(minimum = 0, maximum = 65535)]
    pub persistent_keepalive: Option<u16>,
    #[schema(max_items = 256)]
    #[serde(deserialize_with = "bounded::<_, _, MAX_RULES>")]
    pub firewall: Vec<FirewallRuleText>,
    #[schema(value_type = FirewallAction)]
    pub firewall_default: String,
}

/// A webhook as `CreateWebhook` takes it, with its id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupWebhook {
    #[schema(pattern = "^wh_[a-z0-9]{1,32}$", example = "wh_abc123")]
    pub id: String,
    #[schema(value_type = WebhookUrl)]
    pub url: String,
    #[schema(value_type = Vec<EventTypeOrAll>, min_items = 1, max_items = 16)]
    #[serde(deserialize_with = "bounded::<_, _, 16>")]
    pub events: Vec<String>,
    #[schema(max_length = 256, pattern = "^[^\\u0000]*$")]
    pub description: String,
    /// Only in a backup made with `include_secrets=true`; a restore needs it.
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "exposed")]
    #[schema(value_type = Option<String>, pattern = "^whsec_[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$")]
    pub secret: Option<SecretString>,
}

fn exposed<S: serde::Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(v) => s.serialize_some(v.expose()),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BackupParams {
    /// Put the pre-shared keys and webhook secrets in (default `false`);
    /// needed for a backup a restore can take.
    pub include_secrets: Option<bool>,
}

/// What a restore did, by id.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct RestoreOutcome {
    /// Made by this restore.
    pub restored: Vec<String>,
    /// Already here as the backup has them: left alone.
    pub unchanged: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct RestoreReport {
    pub gateways: RestoreOutcome,
    pub webhooks: RestoreOutcome,
    /// What the operator must still do (e.g. this gateway's key differs from
    /// the one the remote sites know).
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RestoreEnvelope {
    pub data: RestoreReport,
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.scope == Scope::Admin {
        Ok(())
    } else {
        Err(ApiError::forbidden("backup and restore need an `admin` API key"))
    }
}

impl BackupGateway {
    fn of(g: &GatewayRecord, secrets: bool) -> Self {
        Self {
            id: g.id.clone(),
            name: g.name.clone(),
            region: g.region.clone(),
            local_network_cidr: g.local_network_cidr.to_string(),
            additional_local_network_cidrs: g.additional_local_network_cidrs.iter().map(ToString::to_string).collect(),
            remote_network_cidr: g.remote_network_cidr.to_string(),
            additional_remote_network_cidrs: g
                .additional_remote_network_cidrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            remote_peer_ip: g.remote_endpoint.ip().to_string(),
            remote_peer_port: g.remote_endpoint.port(),
            remote_public_key: g.remote_public_key.to_base64(),
            pre_shared_key: secrets.then(|| g.pre_shared_key.to_base64_secret().into()),
            persistent_keepalive: g.persistent_keepalive,
            firewall: rule_texts(&g.firewall),
            firewall_default: g.firewall_default.as_str().to_owned(),
        }
    }

    /// The create request it stands for.
    fn into_create(self) -> CreateGateway {
        CreateGateway {
            name: Some(self.name),
            region: Some(self.region),
            tunnel_type: Some("wireguard".into()),
            remote_network_cidr: Some(self.remote_network_cidr),
            remote_peer_ip: Some(self.remote_peer_ip),
            remote_public_key: Some(self.remote_public_key),
            remote_peer_port: Some(self.remote_peer_port),
            pre_shared_key: self.pre_shared_key,
            local_network_cidr: Some(self.local_network_cidr),
            persistent_keepalive: self.persistent_keepalive,
            additional_remote_network_cidrs: Some(self.additional_remote_network_cidrs),
            additional_local_network_cidrs: Some(self.additional_local_network_cidrs),
            firewall: Some(self.firewall),
            firewall_default: Some(self.firewall_default),
        }
    }
}

/// The backup of what `store` holds.
pub fn backup_of(s: &AppState, secrets: bool) -> Result<Backup, ApiError> {
    // Active ones only: a create not yet acknowledged or a gateway being
    // deleted is no configuration to bring back.
    let gateways =
        s.store.live()?.iter().filter(|g| g.status == Status::Active).map(|g| BackupGateway::of(g, secrets)).collect();
    let webhooks = s
        .store
        .webhooks()?
        .iter()
        .map(|w| {
            let view = WebhookView::new(w, false);
            BackupWebhook {
                id: view.id,
                url: view.url,
                events: view.events,
                description: view.description,
                secret: secrets.then(|| w.secret.clone()),
            }
        })
        .collect();
    Ok(Backup {
        format: FORMAT.into(),
        version: VERSION,
        created_at: Some(rfc3339_millis(now_millis())),
        gateway_public_key: Some(s.plane.public_key().to_base64()),
        secrets_included: secrets,
        gateways,
        webhooks,
    })
}

/// Export the whole configuration (admin). Without `include_secrets=true`
/// the pre-shared keys and webhook secrets are left out, and a restore
/// cannot take the result.
#[utoipa::path(get, path = "/api/v1/backup", operation_id = "backup_config", tag = "operations", params(BackupParams),
    security(("bearer" = [])),
    responses((status = 200, body = Backup,
        headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 403, body = ErrorEnvelope),
        (status = 409, body = ErrorEnvelope, description = "Too large for a restore to take.")))]
pub async fn backup(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<BackupParams>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let secrets = p.include_secrets.unwrap_or(false);
    let doc = blocking(&state, move |s| backup_of(s, secrets)).await?;
    // Never a backup that no restore would take.
    let body = serde_json::to_vec(&doc).map_err(ApiError::internal)?;
    if doc.gateways.len() > MAX_GATEWAYS || body.len() > RESTORE_LIMIT {
        return Err(ApiError::conflict(format!(
            "{} gateways make a backup of {} bytes: a restore takes at most {MAX_GATEWAYS} gateways and {RESTORE_LIMIT} \
             bytes",
            doc.gateways.len(),
            body.len()
        )));
    }
    if secrets {
        // Secrets left the gateway: on record, like a change.
        let entry = AuditEntry {
            seq: 0,
            at: now_millis(),
            key_id: caller.key_id,
            action: "config.backup".into(),
            target: Some("with-secrets".into()),
            status: 200,
            error_code: None,
            replayed: false,
        };
        super::audit::record(&state, entry).await;
    }
    let headers = [(header::CACHE_CONTROL, "no-store"), (header::CONTENT_TYPE, "application/json")];
    Ok((StatusCode::OK, headers, body).into_response())
}

/// Restore a backup (admin): ids kept, what is here already as the backup
/// has it left alone, anything else that clashes a conflict (409) with
/// nothing changed. Every pre-shared key and webhook secret must be in it
/// (a backup made with `include_secrets=true`). A retry is safe without an
/// `Idempotency-Key`: it finds everything `unchanged`.
#[utoipa::path(post, path = "/api/v1/restore", operation_id = "restore_config", tag = "operations",
    request_body = Restore, security(("bearer" = [])),
    responses((status = 200, body = RestoreEnvelope), (status = 409, body = ErrorEnvelope),
        (status = 413, body = ErrorEnvelope, description = "The body exceeds 64 MiB."),
        (status = 503, body = ErrorEnvelope)))]
pub async fn restore(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: JsonBody<RESTORE_LIMIT>,
) -> Result<Json<RestoreEnvelope>, ApiError> {
    require_admin(&caller)?;
    let (site, ours) = (state.settings.site_cidr, state.plane.public_key());
    let parsed = blocking(&state, move |_| parse_restore(&body.0, site, &ours)).await?;
    let report = state.change(move |s| restore_backup(s, parsed)).await?;
    Ok(Json(RestoreEnvelope { data: report }))
}

fn at(i: usize, id: &str, e: ApiError) -> ApiError {
    let field = e.field.as_deref().map_or_else(|| format!("gateways[{i}]"), |f| format!("gateways[{i}].{f}"));
    ApiError { field: Some(field), message: format!("gateways[{i}] ({id}): {}", e.message), ..e }
}

fn hook_at(i: usize, e: ApiError) -> ApiError {
    let field = e.field.as_deref().map_or_else(|| format!("webhooks[{i}]"), |f| format!("webhooks[{i}].{f}"));
    ApiError { field: Some(field), message: format!("webhooks[{i}]: {}", e.message), ..e }
}

/// Longest id after its prefix (the server's own are 16 long).
const MAX_ID: usize = 32;

fn valid_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|t| {
        (1..=MAX_ID).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// Whether stored gateway `g` is what `new` describes (its id aside).
fn same_gateway(g: &GatewayRecord, new: &NewGateway) -> bool {
    g.name == new.name
        && g.region == new.region
        && g.local_network_cidr == new.local_network_cidr
        && g.remote_network_cidr == new.remote_network_cidr
        && g.remote_endpoint == new.remote_endpoint
        && g.remote_public_key == new.remote_public_key
        && g.pre_shared_key == new.pre_shared_key
        && g.persistent_keepalive == new.persistent_keepalive
        && g.additional_remote_network_cidrs == new.additional_remote_network_cidrs
        && g.additional_local_network_cidrs == new.additional_local_network_cidrs
        && g.firewall == new.firewall
        && g.firewall_default == new.firewall_default
}

/// Validates and checks all of `backup`, then applies it (see the module's notes).
/// A restore body as it is decoded: each gateway kept as its JSON text until
/// its turn, every list bounded while it is read (a huge list of tiny items
/// is refused, never built).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    format: String,
    version: u32,
    #[serde(default)]
    #[allow(dead_code)]
    created_at: Option<String>,
    #[serde(default)]
    gateway_public_key: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    secrets_included: bool,
    #[serde(deserialize_with = "bounded::<_, _, MAX_GATEWAYS>")]
    gateways: Vec<Box<serde_json::value::RawValue>>,
    #[serde(deserialize_with = "bounded::<_, _, MAX_WEBHOOKS>")]
    webhooks: Vec<BackupWebhook>,
}

/// A restore body, decoded and validated on its own (what the handler runs
/// before it takes the mutation lock, and the fuzzer runs).
#[derive(Debug)]
pub struct ParsedRestore {
    gateway_public_key: Option<PublicKey>,
    /// (position in the backup, id, the gateway as a create takes it).
    gateways: Vec<(usize, String, NewGateway)>,
    webhooks: Vec<BackupWebhook>,
}

/// Decodes and validates a restore body: every gateway valid on its own,
/// as a create would take it, with its secret.
pub fn parse_restore(bytes: &[u8], site: Option<IpPrefix>, ours: &PublicKey) -> Result<ParsedRestore, ApiError> {
    let body: RestoreBody = decode_json(bytes)?;
    if body.format != FORMAT {
        return Err(ApiError::validation("format", format!("format: must be `{FORMAT}`")));
    }
    if body.version != VERSION {
        return Err(ApiError::validation("version", format!("version: this gateway restores version {VERSION}")));
    }
    let gateway_public_key = match body.gateway_public_key.as_deref() {
        Some(theirs) => Some(exact_key::<PublicKey>("gateway_public_key", "public key", theirs)?),
        None => None,
    };
    let mut seen = HashSet::new();
    let mut gateways = Vec::with_capacity(body.gateways.len());
    for (i, raw) in body.gateways.into_iter().enumerate() {
        let g: BackupGateway = decode_json(raw.get().as_bytes()).map_err(|e| at(i, "?", e))?;
        drop(raw);
        let id = g.id.clone();
        if !valid_id(&id, "vpn_") {
            return Err(at(
                i,
                "?",
                ApiError::validation("id", format!("id: must be `vpn_` and 1-{MAX_ID} of a-z and 0-9")),
            ));
        }
        if !seen.insert(id.clone()) {
            return Err(at(i, &id, ApiError::conflict_at("id", "id: is listed twice")));
        }
        if g.pre_shared_key.is_none() {
            return Err(at(
                i,
                &id,
                ApiError::validation(
                    "pre_shared_key",
                    "pre_shared_key: missing: restore a backup made with include_secrets=true (a new key would \
                     cut the tunnel off until the remote site changed it)",
                ),
            ));
        }
        let new = g.into_create().validate(site, ours).map_err(|e| at(i, &id, e))?;
        gateways.push((i, id, new));
    }
    Ok(ParsedRestore { gateway_public_key, gateways, webhooks: body.webhooks })
}

/// Checks `parsed` against what is here and applies it (see the module's notes).
pub fn restore_backup(s: &AppState, parsed: ParsedRestore) -> Result<RestoreReport, ApiError> {
    let ours = s.plane.public_key();
    let mut report = RestoreReport::default();
    if let Some(theirs) = parsed.gateway_public_key.filter(|k| *k != ours) {
        report.warnings.push(format!(
            "this backup was made on a gateway whose public key is {theirs}; this gateway's is {ours}: give the \
             remote sites the new key (GET /api/v1/vpn-gateways/{{id}}/config)"
        ));
    }
    let gateways = parsed.gateways;
    // 2. Against what is here: the same is left alone, anything else clashes.
    let mut to_make = Vec::new();
    for (i, id, new) in gateways {
        match s.store.get(&id)? {
            Some(g) if g.status == Status::Deleted => to_make.push((i, id, new, true)),
            Some(g) if g.status == Status::Active && same_gateway(&g, &new) => report.gateways.unchanged.push(id),
            Some(g) => {
                let why = format!(
                    "id: VPN gateway {id} exists here ({}) with another configuration: delete it, or change it with \
                     PATCH, first",
                    g.status.as_str()
                );
                return Err(at(i, &id, ApiError::conflict_at("id", why)));
            }
            None => to_make.push((i, id, new, false)),
        }
    }
    // 3. What will be made, against this site, this host's gateways and itself.
    let mut batch = LiveIndex::default();
    for (i, id, new, _) in &to_make {
        let remote = check_new(s, new).map_err(|e| at(*i, id, e))?;
        let key = new.remote_public_key;
        check_conflicts(s, &remote, Some(&key), None).map_err(|e| at(*i, id, e))?;
        for n in &remote {
            if let Some((other, p)) = batch.overlap(&n.prefix, None) {
                let why = format!("{} {} overlaps {p} of {other} in this backup", n.field, n.prefix);
                return Err(at(*i, id, ApiError::conflict_at(&n.field, why)));
            }
        }
        if let Some(other) = batch.key_owner(&key, None) {
            let why = format!("remote_public_key: {other} of this backup uses it too");
            return Err(at(*i, id, ApiError::conflict_at("remote_public_key", why)));
        }
        batch.put(id, Some(key), remote.iter().map(|n| n.prefix).collect());
    }
    // All of them together within what the data plane steers.
    let batch_networks: Vec<IpPrefix> =
        to_make.iter().flat_map(|(_, _, new, _)| new.networks().remote).map(|n| n.prefix).collect();
    check_capacity(s, &batch_networks, None)?;
    // Webhooks, the same way.
    let mut hooks = Vec::new();
    let existing = s.store.webhooks()?;
    let mut hook_ids = HashSet::new();
    for (i, w) in parsed.webhooks.into_iter().enumerate() {
        if !valid_id(&w.id, "wh_") {
            let why = format!("id: must be `wh_` and 1-{MAX_ID} of a-z and 0-9");
            return Err(hook_at(i, ApiError::validation("id", why)));
        }
        if !hook_ids.insert(w.id.clone()) {
            return Err(hook_at(i, ApiError::conflict_at("id", "id: is listed twice")));
        }
        let secret = match w.secret {
            Some(secret) if is_webhook_secret(secret.expose()) => secret,
            Some(_) => {
                return Err(hook_at(
                    i,
                    ApiError::validation("secret", "secret: must be `whsec_` and 43 base64url characters"),
                ))
            }
            None => {
                return Err(hook_at(
                    i,
                    ApiError::validation("secret", "secret: missing: restore a backup made with include_secrets=true"),
                ))
            }
        };
        let create = CreateWebhook { url: w.url, events: Some(w.events), description: Some(w.description) };
        let new: NewWebhook = create.validate().map_err(|e| hook_at(i, e))?;
        match existing.iter().find(|h| h.id == w.id) {
            Some(h)
                if h.url == new.url
                    && h.events == new.events
                    && h.description == new.description
                    && h.secret == secret =>
            {
                report.webhooks.unchanged.push(w.id)
            }
            Some(_) => {
                let why = "id: this webhook exists here with another configuration: delete it first";
                return Err(hook_at(i, ApiError::conflict_at("id", why)));
            }
            None => hooks.push(Webhook {
                id: w.id,
                url: new.url,
                events: new.events,
                description: new.description,
                secret,
                created_at: now_millis(),
            }),
        }
    }
    if existing.len() + hooks.len() > MAX_WEBHOOKS {
        return Err(ApiError::conflict(format!(
            "webhooks: {} here and {} new would exceed {MAX_WEBHOOKS}",
            existing.len(),
            hooks.len()
        )));
    }
    // 4. Apply; a failure takes back what this restore made (a take-back
    // that fails too is named in the answer: those gateways stay).
    let undo = |s: &AppState, made: &[String], e: ApiError| {
        let left: Vec<&str> = made
            .iter()
            .rev()
            .filter(|id| match delete(s, id, None) {
                Ok(_) => false,
                Err(de) => {
                    tracing::error!(%id, error = %de.message, "cannot take back a gateway of a failed restore");
                    true
                }
            })
            .map(String::as_str)
            .collect();
        if left.is_empty() {
            e
        } else {
            let message = format!(
                "{}; these restored gateways could not be taken back and remain: {}",
                e.message,
                left.join(", ")
            );
            ApiError { message, ..e }
        }
    };
    for (i, id, new, was_deleted) in to_make {
        let mut record = new.into_record(now_millis());
        record.id = id.clone();
        let made = if was_deleted { s.store.purge(&id).map_err(ApiError::from) } else { Ok(()) }
            .and_then(|()| commit_create(s, record));
        if let Err(e) = made {
            return Err(undo(s, &report.gateways.restored, at(i, &id, e)));
        }
        report.gateways.restored.push(id);
    }
    for hook in hooks {
        if let Err(e) = s.store.insert_webhook(&hook) {
            for id in &report.webhooks.restored {
                let _ = s.store.delete_webhook(id);
            }
            return Err(undo(s, &report.gateways.restored, e.into()));
        }
        report.webhooks.restored.push(hook.id);
    }
    tracing::info!(
        gateways = report.gateways.restored.len(),
        webhooks = report.webhooks.restored.len(),
        unchanged = report.gateways.unchanged.len() + report.webhooks.unchanged.len(),
        "configuration restored"
    );
    Ok(report)
}
