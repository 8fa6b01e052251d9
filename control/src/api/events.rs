//! Events: `EventHub::emit` appends to the durable log (with the webhook
//! outbox, `store::webhooks`) and fans the stored event out live;
//! `GET /api/v1/events` streams them as Server-Sent Events (resuming after
//! `Last-Event-ID` from the log, then live), and `GET /api/v1/events/history`
//! pages through the log, newest first.

use super::error::ApiError;
use super::extract::ApiQuery;
use super::model::rfc3339_millis;
use super::paging::{page, page_size, PageMeta};
use super::AppState;
use crate::store::{Caller, Event, EventFilter, EventKind, Store};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Events a live subscriber may fall behind by before it re-reads the log.
const LIVE_BUFFER: usize = 1024;
/// Events read from the log per query while a stream catches up.
const CATCH_UP_PAGE: usize = 256;
/// Open event streams at most; more get 503.
pub const MAX_STREAMS: usize = 1024;
/// Open event streams per API key at most; more get 503.
pub const MAX_STREAMS_PER_KEY: usize = 16;
/// A comment line this often keeps idle streams (and proxies) alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The live side of the event log.
#[derive(Debug)]
pub struct EventHub {
    live: broadcast::Sender<Arc<Event>>,
    /// Wakes the webhook deliverer when an event queued deliveries.
    pub outbox: tokio::sync::Notify,
    streams: AtomicUsize,
    /// Open streams per API key id.
    streams_by_key: std::sync::Mutex<HashMap<String, usize>>,
    /// Set when the server stops: every stream ends (a graceful shutdown
    /// waits for its connections, and a stream would never close).
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            live: broadcast::channel(LIVE_BUFFER).0,
            outbox: tokio::sync::Notify::new(),
            streams: AtomicUsize::new(0),
            streams_by_key: std::sync::Mutex::default(),
            closing: tokio::sync::watch::channel(false).0,
        }
    }
}

impl EventHub {
    /// Records an event (blocking: call off the async runtime). A store
    /// that cannot record it is logged: what happened stands.
    pub fn emit(&self, store: &Store, kind: EventKind, gateway_id: &str, data: serde_json::Value) -> Option<Event> {
        match store.append_event(kind, gateway_id, data, |e| self.publish(e)) {
            Ok(e) => Some(e),
            Err(err) => {
                tracing::error!(error = %err, kind = kind.as_str(), gateway_id, "cannot record an event");
                None
            }
        }
    }

    /// Hands a stored event to the live streams and wakes the webhook
    /// deliverer (called by the store in the log's order).
    pub fn publish(&self, e: &Event) {
        // No subscriber is no error.
        let _ = self.live.send(Arc::new(e.clone()));
        self.outbox.notify_one();
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// Event streams open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Ends every open stream (and any opened later): the server stops.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    fn by_key(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.streams_by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more stream of `key_id`, if the limits allow.
    fn open_stream(self: &Arc<Self>, key_id: &str) -> Result<StreamSlot, ApiError> {
        let mut by_key = self.by_key();
        let mine = by_key.entry(key_id.to_owned()).or_insert(0);
        if *mine >= MAX_STREAMS_PER_KEY {
            return Err(ApiError::unavailable(format!(
                "this API key has {MAX_STREAMS_PER_KEY} event streams open; close one or retry later"
            )));
        }
        if self.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::unavailable(format!("{MAX_STREAMS} event streams are open; retry later")));
        }
        *mine += 1;
        Ok(StreamSlot { hub: self.clone(), key_id: key_id.to_owned() })
    }
}

/// An event as the API shows it (SSE `data`, history, webhook bodies).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventView {
    /// Position in the log (increasing): the SSE `id`, `Last-Event-ID` and `after`.
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When it happened (RFC 3339).
    pub at: String,
    pub gateway_id: String,
    /// `gateway.*`: the gateway as `GET` shows it. `tunnel.up`: `endpoint`,
    /// `last_handshake`. `tunnel.down`: `reason` (`expired`, `deleted`,
    /// `restart`). `handshake.failed`: `failures` (since the last report),
    /// `total`, `endpoint`.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> Self {
        Self {
            id: e.seq,
            kind: e.kind,
            at: rfc3339_millis(e.at),
            gateway_id: e.gateway_id.clone(),
            data: e.data.clone(),
        }
    }
}

/// Which events a stream or page shows.
#[derive(Debug, Clone, Default)]
struct Selection {
    gateway_id: Option<String>,
    kinds: Option<Vec<EventKind>>,
}

impl Selection {
    fn new(gateway_id: Option<String>, types: Option<EventKinds>) -> Self {
        Self { gateway_id, kinds: types.map(|t| t.0) }
    }

    fn wants(&self, e: &Event) -> bool {
        self.gateway_id.as_ref().is_none_or(|g| *g == e.gateway_id)
            && self.kinds.as_ref().is_none_or(|k| k.contains(&e.kind))
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Start after this event id (as `Last-Event-ID` does; the header wins).
    /// Default: only events from now on.
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Only this gateway's events.
    pub gateway_id: Option<String>,
    /// Only these event types, comma-separated (e.g. `tunnel.up,tunnel.down`).
    #[param(value_type = Option<String>)]
    pub types: Option<EventKinds>,
}

/// A comma-separated list of event types, as a query parameter carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventKinds(pub Vec<EventKind>);

impl<'de> Deserialize<'de> for EventKinds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.split(',')
            .map(|k| {
                EventKind::parse(k).ok_or_else(|| {
                    serde::de::Error::custom(format!("types: `{k}` is not an event type ({})", EventKind::names()))
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// `Last-Event-ID` if present (a value that is no event id is a 400).
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else { return Ok(None) };
    let text = v.to_str().unwrap_or("").trim();
    match text.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(Some(n)),
        _ => Err(ApiError::bad_request("Last-Event-ID must be an event id (a non-negative integer)")),
    }
}

/// Releases a stream's place when the stream ends (the client went away).
#[derive(Debug)]
struct StreamSlot {
    hub: Arc<EventHub>,
    key_id: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.hub.streams.fetch_sub(1, Ordering::Relaxed);
        let mut by_key = self.hub.by_key();
        if let Some(n) = by_key.get_mut(&self.key_id) {
            *n -= 1;
            if *n == 0 {
                by_key.remove(&self.key_id);
            }
        }
    }
}

/// Where a stream stands.
struct Cursor {
    state: Arc<AppState>,
    rx: broadcast::Receiver<Arc<Event>>,
    /// The last event id handled (shown or filtered out).
    last: i64,
    backlog: VecDeque<Event>,
    /// Reading the log until it has nothing after `last`; then live.
    catching_up: bool,
    selection: Selection,
    closing: tokio::sync::watch::Receiver<bool>,
    _slot: StreamSlot,
}

impl Cursor {
    /// The next event to show; `None` ends the stream (the server stops).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if *self.closing.borrow() {
                return None;
            }
            if let Some(e) = self.backlog.pop_front() {
                self.last = e.seq;
                if self.selection.wants(&e) {
                    return Some(e);
                }
                continue;
            }
            if self.catching_up {
                let (store, after) = (self.state.store.clone(), self.last);
                match tokio::task::spawn_blocking(move || store.events_after(after, CATCH_UP_PAGE)).await {
                    Ok(Ok(page)) if page.is_empty() => self.catching_up = false,
                    Ok(Ok(page)) => self.backlog.extend(page),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read the event log for a stream");
                        return None;
                    }
                    Err(_) => return None,
                }
                continue;
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                _ = self.closing.changed() => return None,
            };
            match received {
                // Already read from the log.
                Ok(e) if e.seq <= self.last => {}
                Ok(e) if e.seq == self.last + 1 => self.backlog.push_back((*e).clone()),
                // A gap (an append whose broadcast this stream missed): the log has it.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

fn sse_event(e: &Event) -> sse::Event {
    let json = serde_json::to_string(&EventView::from(e)).unwrap_or_default();
    sse::Event::default().id(e.seq.to_string()).event(e.kind.as_str()).data(json)
}

/// Stream events as Server-Sent Events (`text/event-stream`): each has
/// `id` (resume with `Last-Event-ID`), `event` (its type) and `data` (an
/// `EventView`). Without `Last-Event-ID` or `after`, only new events.
#[utoipa::path(get, path = "/api/v1/events", operation_id = "stream_events", tag = "events", params(StreamParams,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (from the log, without gaps)")),
    security(("bearer" = [])),
    responses((status = 200, content_type = "text/event-stream", body = String,
            description = "An endless stream; a `:` comment line every 15 s keeps it alive"),
        (status = 503, body = ErrorEnvelope, description = "Too many streams are open (1024 in all, 16 per API key)")))]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiQuery(p): ApiQuery<StreamParams>,
) -> Result<Response, ApiError> {
    let selection = Selection::new(p.gateway_id, p.types);
    if p.after.is_some_and(|a| a < 0) {
        return Err(ApiError::bad_request("after must be a non-negative event id"));
    }
    let resume = last_event_id(&headers)?.or(p.after);
    let slot = state.events.open_stream(&caller.key_id)?;
    // Subscribed before the log is read: nothing appended in between is missed.
    let rx = state.events.subscribe();
    let store = state.store.clone();
    let newest = tokio::task::spawn_blocking(move || store.last_event_seq()).await.map_err(ApiError::internal)??;
    // An id beyond the log (another database's) resumes from its end.
    let last = resume.map_or(newest, |r| r.min(newest));
    let closing = state.events.closing.subscribe();
    let cursor =
        Cursor { state, rx, last, backlog: VecDeque::new(), catching_up: true, selection, closing, _slot: slot };
    let events = futures_util::stream::unfold(cursor, |mut c| async move {
        let e = c.next().await?;
        Some((Ok::<_, std::convert::Infallible>(sse_event(&e)), c))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// Only events older than this id (the previous page's `meta.next_before`).
    #[param(minimum = 1)]
    pub before: Option<i64>,
    /// Events per page (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Only this gateway's events: its connection history.
    pub gateway_id: Option<String>,
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(rename = "type", inline)]
    pub kind: Option<EventKind>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventHistoryEnvelope {
    pub data: Vec<EventView>,
    pub meta: PageMeta,
}

/// The event log, newest first: a gateway's connection history with `gateway_id`.
#[utoipa::path(get, path = "/api/v1/events/history", operation_id = "event_history", tag = "events", params(HistoryParams),
    security(("bearer" = [])),
    responses((status = 200, body = EventHistoryEnvelope)))]
pub async fn history(
    State(state): State<Arc<AppState>>,
    ApiQuery(p): ApiQuery<HistoryParams>,
) -> Result<Json<EventHistoryEnvelope>, ApiError> {
    let limit = page_size(p.limit, p.before)?;
    let filter = EventFilter { gateway_id: p.gateway_id, kind: p.kind };
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.events_before(p.before, &filter, limit as usize + 1))
        .await
        .map_err(ApiError::internal)??;
    let (data, meta) = page(rows, limit, |e| EventView::from(&e), |e| e.id);
    Ok(Json(EventHistoryEnvelope { data, meta }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse_types_and_filter() {
        let parse = |q: &str| serde_urlencoded::from_str::<StreamParams>(q);
        let p = parse("gateway_id=vpn_a&types=tunnel.up%2Ctunnel.down").unwrap();
        assert_eq!(p.types, Some(EventKinds(vec![EventKind::TunnelUp, EventKind::TunnelDown])));
        let s = Selection::new(p.gateway_id, p.types);
        let e = |kind, id: &str| Event { seq: 1, at: 0, kind, gateway_id: id.into(), data: serde_json::Value::Null };
        assert!(s.wants(&e(EventKind::TunnelUp, "vpn_a")));
        assert!(!s.wants(&e(EventKind::GatewayCreated, "vpn_a")));
        assert!(!s.wants(&e(EventKind::TunnelUp, "vpn_b")));
        assert!(Selection::new(None, None).wants(&e(EventKind::HandshakeFailed, "x")));
        for bad in ["types=tunnel.up,", "types=", "types=TUNNEL.UP", "types=*"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("is not an event type (gateway.created,"), "{bad}: {err}");
        }
    }

    #[test]
    fn last_event_id_is_a_non_negative_integer() {
        let mut h = HeaderMap::new();
        assert_eq!(last_event_id(&h).unwrap(), None);
        h.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(last_event_id(&h).unwrap(), Some(42));
        for bad in ["-1", "x", ""] {
            h.insert("last-event-id", bad.parse().unwrap());
            assert!(last_event_id(&h).is_err(), "{bad}");
        }
    }
}
