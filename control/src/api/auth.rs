//! Bearer API keys and per-key rate limits for everything under `/api/v1`.
//! Mutations (POST/PATCH/DELETE) and reads have separate per-minute budgets;
//! every response carries `X-RateLimit-Limit/Remaining/Reset` (Reset: seconds
//! until the window starts over), a 429 also `Retry-After`.

use super::error::ApiError;
use super::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestClass {
    Mutation,
    Read,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    pub reset_secs: u64,
}

/// Fixed one-minute windows per (API key, class).
#[derive(Debug)]
pub struct RateLimiter {
    mutations_per_minute: u32,
    reads_per_minute: u32,
    windows: Mutex<HashMap<(String, RequestClass), (Instant, u32)>>,
}

impl RateLimiter {
    pub fn new(mutations_per_minute: u32, reads_per_minute: u32) -> Self {
        Self { mutations_per_minute, reads_per_minute, windows: Mutex::new(HashMap::new()) }
    }

    pub fn check(&self, key: &str, class: RequestClass, now: Instant) -> Decision {
        let limit = match class {
            RequestClass::Mutation => self.mutations_per_minute,
            RequestClass::Read => self.reads_per_minute,
        };
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() > 10_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let (start, used) = windows.entry((key.to_owned(), class)).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *used = 0;
        }
        let reset_secs = WINDOW.saturating_sub(now.duration_since(*start)).as_secs_f64().ceil() as u64;
        let allowed = *used < limit;
        if allowed {
            *used += 1;
        }
        Decision { allowed, limit, remaining: limit - *used, reset_secs: reset_secs.max(1) }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Middleware: authenticate, then rate-limit, then run the handler.
pub async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(token) = bearer(req.headers()).map(str::to_owned) else {
        return ApiError::unauthorized("missing `Authorization: Bearer <api key>` header").into_response();
    };
    let store = state.store.clone();
    let key_id = match tokio::task::spawn_blocking(move || store.verify_api_key(&token)).await {
        Ok(Ok(Some(id))) => id,
        Ok(Ok(None)) => return ApiError::unauthorized("invalid API key").into_response(),
        Ok(Err(e)) => return ApiError::internal(e).into_response(),
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let class = match *req.method() {
        Method::GET | Method::HEAD | Method::OPTIONS => RequestClass::Read,
        _ => RequestClass::Mutation,
    };
    let d = state.limiter.check(&key_id, class, Instant::now());
    let mut resp = if d.allowed { next.run(req).await } else { ApiError::rate_limited(d.reset_secs).into_response() };
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert("x-ratelimit-reset", HeaderValue::from(d.reset_secs));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_per_key_and_class() {
        let l = RateLimiter::new(2, 5);
        let t = Instant::now();
        assert!(l.check("a", RequestClass::Mutation, t).allowed);
        let d = l.check("a", RequestClass::Mutation, t);
        assert_eq!((d.allowed, d.remaining), (true, 0));
        let d = l.check("a", RequestClass::Mutation, t + Duration::from_secs(10));
        assert_eq!((d.allowed, d.reset_secs), (false, 50));
        assert!(l.check("b", RequestClass::Mutation, t).allowed, "another key has its own budget");
        assert!(l.check("a", RequestClass::Read, t).allowed, "reads have their own budget");
        assert!(l.check("a", RequestClass::Mutation, t + WINDOW).allowed, "a new window");
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  "));
        assert_eq!(bearer(&h), None);
    }
}
