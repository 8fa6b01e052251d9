//! `POST /api/v1/keypairs`: a WireGuard keypair for a remote site, made on
//! request and forgotten at once. The private key is in that one answer and
//! nowhere else: not stored, not logged, not kept for an `Idempotency-Key`
//! retry (the route sits outside the idempotency layer; a retry makes a new
//! pair), and the answer says `Cache-Control: no-store`.

use super::error::ApiError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use wgxdp_dataplane::noise::PrivateKey;
use zeroize::Zeroizing;

/// A new keypair. Give the private key to the remote site (its wg-quick
/// `[Interface] PrivateKey`) and the public key to a create or an import.
#[derive(Serialize, ToSchema)]
pub struct KeypairView {
    /// Shown once: wgxdp keeps no copy.
    #[schema(value_type = WireguardKey)]
    #[serde(serialize_with = "as_str")]
    private_key: Zeroizing<String>,
    #[schema(value_type = WireguardKey)]
    public_key: String,
}

fn as_str<S: serde::Serializer>(key: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(key)
}

impl std::fmt::Debug for KeypairView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeypairView").field("private_key", &"<redacted>").field("public_key", &self.public_key).finish()
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeypairEnvelope {
    data: KeypairView,
}

impl KeypairView {
    pub fn generate() -> Self {
        let key = PrivateKey::generate();
        Self { public_key: key.public_key().to_base64(), private_key: key.to_base64_secret() }
    }
}

/// Generate a WireGuard keypair for a remote site. The private key is in
/// this answer only (never stored or logged); a retry makes a new pair.
#[utoipa::path(post, path = "/api/v1/keypairs", operation_id = "create_keypair", tag = "vpn-gateways",
    security(("bearer" = [])),
    responses((status = 201, body = KeypairEnvelope,
        headers(("Cache-Control" = String, description = "`no-store`: the private key must not be cached")))))]
pub async fn create() -> Result<Response, ApiError> {
    let pair = KeypairEnvelope { data: KeypairView::generate() };
    Ok((StatusCode::CREATED, [(header::CACHE_CONTROL, "no-store")], Json(pair)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pair_matches_and_debug_hides_the_private_key() {
        let pair = KeypairView::generate();
        let private: PrivateKey = pair.private_key.parse().unwrap();
        assert_eq!(private.public_key().to_base64(), pair.public_key);
        let shown = format!("{:?}", KeypairEnvelope { data: pair });
        assert!(shown.contains("<redacted>") && !shown.contains(&*private.to_base64_secret()), "{shown}");
        assert_ne!(KeypairView::generate().public_key, KeypairView::generate().public_key);
    }
}
