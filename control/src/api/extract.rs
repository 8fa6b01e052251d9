//! Extractors whose rejections are API errors: malformed JSON and unknown
//! fields are 400, an oversized body 413, a wrong content type 415.

use super::error::ApiError;
use axum::async_trait;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Maximum request body.
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug)]
pub struct ApiJson<T>(pub T);

#[async_trait]
impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::unsupported_media_type()),
            Err(JsonRejection::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::too_large(BODY_LIMIT))
            }
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::bad_request(format!("invalid body: {}", e.body_text())))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => {
                Err(ApiError::bad_request(format!("malformed JSON: {}", e.body_text())))
            }
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
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(q).map(Self).map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
    }
}
