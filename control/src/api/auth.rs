//! Bearer API keys and per-key rate limits for everything under `/api/v1`.
//! Mutations (POST/PATCH/DELETE) and reads have separate per-minute budgets;
//! every response carries `X-RateLimit-Limit/Remaining/Reset` (Reset: seconds
//! until the window starts over), a 429 also `Retry-After`.

use super::audit;
use super::error::ApiError;
use super::AppState;
use crate::store::Scope;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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

/// Default `[api] auth_failures_per_minute`.
pub const DEFAULT_AUTH_FAILURES_PER_MINUTE: u32 = 30;
/// Source addresses tracked at once; beyond it, the least recently failed
/// one is forgotten.
pub const SOURCE_TABLE_CAPACITY: usize = 4096;

/// Failed authentications per source address in fixed one-minute windows,
/// consulted before the store. A source without recorded failures is never
/// refused (so neither a flood from many addresses nor a busy proxy in front
/// of other clients locks anyone out). The table is bounded: when it is full,
/// the source whose last failure is oldest makes room; a source that keeps
/// failing stays in it unless more than `capacity` others fail in between.
#[derive(Debug)]
pub struct SourceLimiter {
    per_minute: u32,
    capacity: usize,
    table: Mutex<SourceTable>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
    /// Position in `SourceTable::by_age` (the order of last failures).
    seq: u64,
}

#[derive(Debug, Default)]
struct SourceTable {
    windows: HashMap<IpAddr, Window>,
    /// Sources by their last failure, oldest first.
    by_age: BTreeMap<u64, IpAddr>,
    next_seq: u64,
}

/// The unit a client is limited by: its IPv4 address, or its IPv6 /64.
fn source_key(src: Option<IpAddr>) -> IpAddr {
    match src {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1))),
        },
        Some(v4) => v4,
    }
}

fn expired(w: &Window, now: Instant) -> bool {
    now.saturating_duration_since(w.start) >= WINDOW
}

impl SourceTable {
    fn forget(&mut self, key: &IpAddr) {
        if let Some(w) = self.windows.remove(key) {
            self.by_age.remove(&w.seq);
        }
    }
}

impl SourceLimiter {
    pub fn new(per_minute: u32, capacity: usize) -> Self {
        Self { per_minute, capacity: capacity.max(1), table: Mutex::new(SourceTable::default()) }
    }

    /// `Err(seconds until the window resets)` if `src` has used its failures.
    pub fn check(&self, src: Option<IpAddr>, now: Instant) -> Result<(), u64> {
        let key = source_key(src);
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match t.windows.get(&key) {
            Some(w) if !expired(w, now) && w.failures >= self.per_minute => {
                Err(WINDOW.saturating_sub(now.saturating_duration_since(w.start)).as_secs_f64().ceil().max(1.0) as u64)
            }
            _ => Ok(()),
        }
    }

    /// Counts one failed authentication from `src`.
    pub fn record_failure(&self, src: Option<IpAddr>, now: Instant) {
        let key = source_key(src);
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        let seq = t.next_seq;
        t.next_seq += 1;
        let mut w = match t.windows.get(&key) {
            Some(w) => {
                t.by_age.remove(&w.seq);
                *w
            }
            None => {
                // Make room: first sources whose last failure is a window
                // old (their windows are over), then the least recent.
                while t.windows.len() >= self.capacity {
                    let Some((_, oldest)) = t.by_age.pop_first() else { break };
                    t.windows.remove(&oldest);
                }
                Window { start: now, failures: 0, seq }
            }
        };
        if expired(&w, now) {
            w = Window { start: now, failures: 0, seq };
        }
        w.failures = w.failures.saturating_add(1);
        w.seq = seq;
        t.windows.insert(key, w);
        t.by_age.insert(seq, key);
        // Sources whose last failure is older than a window hold nothing.
        while let Some((_, &oldest)) = t.by_age.first_key_value() {
            match t.windows.get(&oldest) {
                Some(w) if expired(w, now) => t.forget(&oldest),
                _ => break,
            }
        }
    }

    /// Source addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).windows.len()
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Middleware: limit failed authentications per source (before the store is
/// consulted), authenticate, rate-limit per key, refuse a write by a
/// read-only key (403), then run the handler with the `Caller` in the
/// request's extensions. Every mutation the limit let through goes to the
/// audit log with its outcome.
pub async fn require_api_key(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let src = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if let Err(retry) = state.auth_failures.check(src, Instant::now()) {
        return ApiError::rate_limited(retry).into_response();
    }
    let Some(token) = bearer(req.headers()).map(str::to_owned) else {
        state.auth_failures.record_failure(src, Instant::now());
        return ApiError::unauthorized("missing `Authorization: Bearer <api key>` header").into_response();
    };
    let store = state.store.clone();
    let caller = match tokio::task::spawn_blocking(move || store.verify_api_key(&token)).await {
        Ok(Ok(Some(caller))) => caller,
        Ok(Ok(None)) => {
            state.auth_failures.record_failure(src, Instant::now());
            return ApiError::unauthorized("invalid API key").into_response();
        }
        Ok(Err(e)) => return ApiError::internal(e).into_response(),
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let class = match *req.method() {
        Method::GET | Method::HEAD | Method::OPTIONS => RequestClass::Read,
        _ => RequestClass::Mutation,
    };
    let d = state.limiter.check(&caller.key_id, class, Instant::now());
    let mut resp = if !d.allowed {
        // Refused before anything ran, and bounded by nothing the key
        // controls: not audited (the limit bounds what is).
        ApiError::rate_limited(d.reset_secs).into_response()
    } else if class == RequestClass::Read {
        req.extensions_mut().insert(caller);
        next.run(req).await
    } else {
        // A mutation runs to its end in a task of its own, and is audited
        // there: a client that disconnects cannot leave a change half
        // answered (its idempotency record unwritten) or unaudited.
        let audited = audit::Request::of(&req, &caller);
        let state = state.clone();
        let running = state.mutation_started();
        let task = tokio::spawn(async move {
            let _running = running;
            let resp = if caller.scope == Scope::Admin {
                req.extensions_mut().insert(caller);
                next.run(req).await
            } else {
                ApiError::forbidden("this API key may only read (scope `read`); writes need an `admin` key")
                    .into_response()
            };
            audit::record(&state, audited.answered(&resp)).await;
            resp
        });
        task.await.unwrap_or_else(|e| ApiError::internal(e).into_response())
    };
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
    fn failures_per_source_and_a_bounded_table() {
        let l = SourceLimiter::new(3, 100);
        let t = Instant::now();
        let a = Some(IpAddr::from([192, 0, 2, 1]));
        for _ in 0..3 {
            assert!(l.check(a, t).is_ok());
            l.record_failure(a, t);
        }
        assert_eq!(l.check(a, t + Duration::from_secs(20)), Err(40));
        assert!(l.check(Some(IpAddr::from([192, 0, 2, 2])), t).is_ok(), "another source has its own budget");
        assert!(l.check(a, t + WINDOW).is_ok(), "a new window");
        // One IPv6 /64 is one source.
        let v6 = |last: u16| Some(IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]));
        for i in 0..3 {
            l.record_failure(v6(i), t);
        }
        assert!(l.check(v6(999), t).is_err());
        assert!(l.tracked() <= 100);
    }

    #[test]
    fn a_flood_from_many_sources_never_locks_out_a_fresh_client() {
        let l = SourceLimiter::new(3, 100);
        let t = Instant::now();
        let attacker = Some(IpAddr::from([198, 51, 100, 1]));
        for _ in 0..3 {
            l.record_failure(attacker, t);
        }
        // A few other failing sources do not make room by evicting the attacker.
        for i in 0..50u32 {
            l.record_failure(Some(IpAddr::from((0x0a00_0000 + i).to_be_bytes())), t);
        }
        assert!(l.check(attacker, t).is_err(), "a source over its budget stays refused");
        // 100 000 addresses, several failures each: the table stays bounded.
        for i in 0..100_000u32 {
            let src = Some(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
            for _ in 0..3 {
                l.record_failure(src, t);
            }
        }
        assert!(l.tracked() <= 100, "{} sources tracked", l.tracked());
        let fresh = Some(IpAddr::from([203, 0, 113, 9]));
        assert!(l.check(fresh, t).is_ok(), "a source without failures is never refused");
        // The newest flooders are still limited; after a window, all is forgotten.
        assert!(l.check(Some(IpAddr::from((0x0b00_0000u32 + 99_999).to_be_bytes())), t).is_err());
        let later = t + WINDOW + Duration::from_secs(1);
        l.record_failure(fresh, later);
        assert!(l.check(fresh, later).is_ok());
        assert_eq!(l.tracked(), 1, "expired sources are dropped");
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
