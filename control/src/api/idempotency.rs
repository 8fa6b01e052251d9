//! `Idempotency-Key` on POST and DELETE (the Stripe pattern). The first
//! successful answer to a request is stored durably, per API key, for 24 h;
//! a retry with the same key and the same request (method, path, body) gets
//! that answer again (`Idempotent-Replayed: true`), even after a restart, and
//! changes nothing: a client that lost the 201 of a create learns the new
//! gateway and its one-time pre-shared key by retrying. The same key with a
//! different request is refused (422). A failed request is not stored: it
//! changed nothing, so its retry runs again. Requests with one key (of one
//! API key) run one at a time, so a retry sent while its original still runs
//! (on this node) waits for it; other keys do not wait for them. The
//! authentication middleware runs a mutation to its end even if its client
//! goes away, so the answer is stored for the retry.

use super::error::ApiError;
use super::extract::BODY_LIMIT;
use super::AppState;
use crate::store::{hex, now_millis, Caller, StoredResponse};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use blake2::{Blake2s256, Digest};
use std::sync::Arc;

/// One lock per (API key id, `Idempotency-Key`), kept while held or awaited.
#[derive(Debug, Default)]
pub struct KeyedLocks(std::sync::Mutex<KeyedMap>);

type KeyedMap = std::collections::HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

impl KeyedLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, KeyedMap> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `key`'s lock; held until the guard drops.
    pub async fn lock(&self, key: (String, String)) -> KeyedGuard<'_> {
        let lock = self.map().entry(key.clone()).or_default().clone();
        let held = lock.clone().lock_owned().await;
        KeyedGuard { locks: self, key, held: Some(held), lock }
    }

    /// How many keys have a lock now (held or awaited).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A held `KeyedLocks` lock; its entry goes when nobody else holds or awaits it.
#[derive(Debug)]
pub struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: (String, String),
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut map = self.locks.map();
        // The map's reference and this one: nobody else can reach it without the map.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
/// Longest key accepted.
pub const MAX_KEY: usize = 255;
/// The answer's headers a replay repeats.
const REPLAYED_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// A key as the document states it: 1-255 visible ASCII characters.
fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut h = Blake2s256::new();
    for part in [method.as_str().as_bytes(), b"\0", path.as_bytes(), b"\0", body] {
        h.update(part);
    }
    hex(&h.finalize())
}

fn replay(stored: StoredResponse) -> Response {
    let mut resp = Response::new(Body::from(stored.body));
    *resp.status_mut() = axum::http::StatusCode::from_u16(stored.status).unwrap_or_default();
    for (name, value) in stored.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            resp.headers_mut().insert(n, v);
        }
    }
    resp.headers_mut().insert(HeaderName::from_static(REPLAYED), HeaderValue::from_static("true"));
    resp
}

/// Middleware (inside authentication: it needs the `Caller`).
pub async fn idempotent(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !matches!(*req.method(), Method::POST | Method::DELETE) {
        return next.run(req).await;
    }
    let Some(value) = req.headers().get(HEADER) else { return next.run(req).await };
    let key = match value.to_str() {
        Ok(k) if valid_key(k) => k.to_owned(),
        _ => return ApiError::bad_request("Idempotency-Key must be 1-255 visible ASCII characters").into_response(),
    };
    let Some(caller) = req.extensions().get::<Caller>().cloned() else { return next.run(req).await };
    let (parts, body) = req.into_parts();
    // A DELETE's body means nothing (the handler never reads it): not part of the request.
    let bytes = if parts.method == Method::DELETE {
        axum::body::Bytes::new()
    } else {
        match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(b) => b,
            Err(_) => return ApiError::too_large(BODY_LIMIT).into_response(),
        }
    };
    let print = fingerprint(&parts.method, parts.uri.path(), &bytes);
    let _one_at_a_time = state.idempotent_requests.lock((caller.key_id.clone(), key.clone())).await;
    let store = state.store.clone();
    let (key_id, idem) = (caller.key_id.clone(), key.clone());
    match tokio::task::spawn_blocking(move || store.idempotent_response(&key_id, &idem)).await {
        Ok(Ok(Some(stored))) if stored.fingerprint == print => return replay(stored),
        Ok(Ok(Some(_))) => return ApiError::idempotency_key_reused().into_response(),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => return ApiError::internal(e).into_response(),
        Err(e) => return ApiError::internal(e).into_response(),
    }
    let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if !resp.status().is_success() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::internal("cannot read back an answer to store it").into_response();
    };
    let stored = StoredResponse {
        fingerprint: print,
        status: parts.status.as_u16(),
        headers: REPLAYED_HEADERS
            .iter()
            .filter_map(|n| Some((n.as_str().to_owned(), parts.headers.get(n)?.to_str().ok()?.to_owned())))
            .collect(),
        body: body.to_vec(),
        created_at: now_millis(),
    };
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.save_idempotent_response(&caller.key_id, &key, &stored)).await {
        Ok(Ok(())) => {}
        // The change is done: answer it; only a retry would run it again.
        Ok(Err(e)) => tracing::error!(error = %e, "cannot store an answer for its Idempotency-Key"),
        Err(e) => tracing::error!(error = %e, "cannot store an answer for its Idempotency-Key"),
    }
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests with one key wait for each other, other keys do not, and a
    /// key's lock is forgotten once nobody holds or awaits it.
    #[tokio::test]
    async fn one_key_at_a_time_other_keys_at_once() {
        let locks = Arc::new(KeyedLocks::default());
        let key = |k: &str| ("key_1".to_owned(), k.to_owned());
        let first = locks.lock(key("a")).await;
        // Another key: at once.
        let other = tokio::time::timeout(std::time::Duration::from_secs(5), locks.lock(key("b"))).await;
        assert!(other.is_ok(), "another key did not wait");
        drop(other);
        // The same key: waits until the first is done.
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(("key_1".to_owned(), "a".to_owned())).await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the same key waited");
        drop(first);
        waiter.await.unwrap();
        assert!(locks.is_empty(), "forgotten: {}", locks.len());
    }

    #[test]
    fn keys_and_fingerprints() {
        assert!(valid_key("a") && valid_key(&"k".repeat(255)) && valid_key("7f3c-retry_1"));
        for bad in ["", " a", "a b", "é", &"k".repeat(256)] {
            assert!(!valid_key(bad), "{bad:?}");
        }
        let f = fingerprint(&Method::POST, "/api/v1/vpn-gateways", b"{}");
        assert_eq!(f, fingerprint(&Method::POST, "/api/v1/vpn-gateways", b"{}"));
        assert_ne!(f, fingerprint(&Method::POST, "/api/v1/vpn-gateways", b"{ }"));
        assert_ne!(f, fingerprint(&Method::DELETE, "/api/v1/vpn-gateways", b"{}"));
        // Parts are separated: moving a byte from the path to the body changes it.
        assert_ne!(fingerprint(&Method::POST, "/a", b"b"), fingerprint(&Method::POST, "/ab", b""));
    }
}
