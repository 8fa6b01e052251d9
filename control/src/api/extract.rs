//! Extractors whose rejections are API errors: malformed JSON and unknown
//! fields are 400, an oversized body 413, a wrong content type 415.

use super::error::ApiError;
use axum::async_trait;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

/// Maximum request body.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A JSON request body, not yet decoded: the handler passes it to the same
/// public `model::parse_*` / `from_json` functions the fuzzers call. `LIMIT`
/// is the route's `DefaultBodyLimit` (what a 413 names).
#[derive(Debug)]
pub struct JsonBody<const LIMIT: usize = BODY_LIMIT>(pub Bytes);

fn is_json(ctype: &str) -> bool {
    let essence = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[async_trait]
impl<const LIMIT: usize, S: Send + Sync> FromRequest<S> for JsonBody<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(is_json);
        if !json {
            return Err(ApiError::unsupported_media_type());
        }
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Self(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::too_large(LIMIT)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// Query parameters parsed strictly (unknown parameters are 400).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

#[async_trait]
impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(Self)
    }
}

/// A query string as `ApiQuery` decodes it (public so that fuzzers drive
/// the same decoder; the event stream, which never ends, has no other way).
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query).map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}
