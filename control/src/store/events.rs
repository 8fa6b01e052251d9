//! The event log: what happened to the gateways (`gateway.*`) and their
//! tunnels (`tunnel.*`, `handshake.failed`), in one order (`seq`), kept for
//! `RETENTION_MILLIS`. Appending an event also queues its webhook deliveries
//! (`webhooks`) in the same transaction: the outbox cannot miss an event
//! the log holds.

use super::sql::{self, args, Dialect, Row, Sql};
use super::{now_millis, Store, StoreError};

/// How long events are kept: 30 days.
pub const RETENTION_MILLIS: i64 = 30 * 24 * 60 * 60 * 1000;

/// What an event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub enum EventKind {
    #[serde(rename = "gateway.created")]
    GatewayCreated,
    #[serde(rename = "gateway.updated")]
    GatewayUpdated,
    #[serde(rename = "gateway.deleted")]
    GatewayDeleted,
    /// The tunnel completed a handshake: it carries traffic.
    #[serde(rename = "tunnel.up")]
    TunnelUp,
    /// No handshake for REJECT_AFTER_TIME (180 s), its gateway was
    /// deleted, or the gateway restarted.
    #[serde(rename = "tunnel.down")]
    TunnelDown,
    /// The remote peer (authenticated by its key) keeps failing to complete
    /// handshakes: typically a pre-shared key that differs on its side.
    #[serde(rename = "handshake.failed")]
    HandshakeFailed,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::GatewayCreated,
        EventKind::GatewayUpdated,
        EventKind::GatewayDeleted,
        EventKind::TunnelUp,
        EventKind::TunnelDown,
        EventKind::HandshakeFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::GatewayCreated => "gateway.created",
            EventKind::GatewayUpdated => "gateway.updated",
            EventKind::GatewayDeleted => "gateway.deleted",
            EventKind::TunnelUp => "tunnel.up",
            EventKind::TunnelDown => "tunnel.down",
            EventKind::HandshakeFailed => "handshake.failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Every type's name, for an error that lists them.
    pub fn names() -> String {
        Self::ALL.map(EventKind::as_str).join(", ")
    }
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its place in the log (increasing, gap-free as appended).
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    pub kind: EventKind,
    /// The gateway it concerns.
    pub gateway_id: String,
    /// Details (a JSON object): the gateway record for `gateway.*`, the
    /// endpoint for `tunnel.up`, the reason for `tunnel.down`...
    pub data: serde_json::Value,
}

/// Which events a query returns.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub gateway_id: Option<String>,
    pub kind: Option<EventKind>,
}

/// The event whose columns (`EVENT_COLUMNS`, in order) start at `first` in `row`.
pub(super) fn event_at(row: &Row, first: usize) -> Result<Event, String> {
    Ok(Event {
        seq: row.int(first)?,
        at: row.int(first + 1)?,
        // A kind this binary does not know (a newer one wrote it) reads as a
        // plain update rather than failing the whole page.
        kind: EventKind::parse(&row.text(first + 2)?).unwrap_or(EventKind::GatewayUpdated),
        gateway_id: row.text(first + 3)?,
        data: serde_json::from_str(&row.text(first + 4)?).unwrap_or(serde_json::Value::Null),
    })
}

fn events(rows: &[Row]) -> Result<Vec<Event>, StoreError> {
    rows.iter().map(|r| event_at(r, 0)).collect::<Result<_, _>>().map_err(|e| sql::unreadable("events", e))
}

const EVENT_COLUMNS: &str = "seq, at, kind, gateway_id, data";

/// The advisory lock event appends take on PostgreSQL ("wgxdpev").
const EVENT_APPEND_LOCK: i64 = 0x0077_6778_6470_6576;

/// Appends an event (and its webhook deliveries) inside the caller's
/// transaction, dropping events past retention.
pub(super) fn insert(
    sql: &dyn Sql,
    kind: EventKind,
    gateway_id: &str,
    data: serde_json::Value,
) -> Result<Event, StoreError> {
    let now = now_millis();
    if sql.dialect() == Dialect::Postgres {
        // One append at a time, held to the commit: sequence numbers then
        // commit in their order, so a stream that has read up to `seq` never
        // sees a lower one commit later (SQLite writes one at a time anyway).
        sql.execute("SELECT pg_advisory_xact_lock(?)", args![EVENT_APPEND_LOCK])?;
    }
    sql.execute(&format!("DELETE FROM events WHERE at < {} - ?", sql.dialect().now_millis()), args![RETENTION_MILLIS])?;
    let row = sql.query_one(
        "INSERT INTO events (at, kind, gateway_id, data) VALUES (?, ?, ?, ?) RETURNING seq",
        args![now, kind.as_str(), gateway_id, data.to_string()],
    )?;
    let seq = row.int(0).map_err(|e| sql::unreadable("events", e))?;
    super::webhooks::queue_deliveries(sql, seq, kind, now)?;
    Ok(Event { seq, at: now, kind, gateway_id: gateway_id.to_owned(), data })
}

impl Store {
    /// Appends an event and queues its webhook deliveries, in one
    /// transaction; then, still in order with every other append, hands the
    /// stored event to `published` (the live fan-out).
    pub fn append_event(
        &self,
        kind: EventKind,
        gateway_id: &str,
        data: serde_json::Value,
        published: impl FnOnce(&Event),
    ) -> Result<Event, StoreError> {
        self.check_write()?;
        let e = self.transaction(|sql| insert(sql, kind, gateway_id, data))?;
        published(&e);
        Ok(e)
    }

    /// Up to `limit` events after `after` (a `seq`), oldest first: what a
    /// stream resumes with.
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let rows = self.run(|sql| {
            sql.query(
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"),
                args![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            )
        })?;
        events(&rows)
    }

    /// Up to `limit` events matching `filter`, newest first, older than
    /// `before` (a `seq`) if given: the history's pages.
    pub fn events_before(
        &self,
        before: Option<i64>,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        if filter.gateway_id.as_deref().is_some_and(sql::holds_nul) {
            return Ok(Vec::new());
        }
        let kind = filter.kind.map(EventKind::as_str);
        let rows = self.run(|sql| {
            sql.query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE seq < ?
                       AND (CAST(? AS TEXT) IS NULL OR gateway_id = ?) AND (CAST(? AS TEXT) IS NULL OR kind = ?)
                     ORDER BY seq DESC LIMIT ?"
                ),
                args![
                    before.unwrap_or(i64::MAX),
                    filter.gateway_id.as_ref(),
                    filter.gateway_id.as_ref(),
                    kind,
                    kind,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
            )
        })?;
        events(&rows)
    }

    /// The newest event's `seq` (0 when there is none).
    pub fn last_event_seq(&self) -> Result<i64, StoreError> {
        let row = self.run(|sql| sql.query_one("SELECT COALESCE(MAX(seq), 0) FROM events", &[]))?;
        row.int(0).map_err(|e| sql::unreadable("events", e))
    }

    /// The gateways whose latest tunnel event is `tunnel.up`: after a
    /// restart their sessions are gone, and they are announced down.
    pub fn tunnels_last_up(&self) -> Result<Vec<String>, StoreError> {
        let rows = self.run(|sql| {
            sql.query(
                "SELECT gateway_id FROM events WHERE kind = ? AND seq IN (
                     SELECT MAX(seq) FROM events WHERE kind IN (?, ?) GROUP BY gateway_id)",
                args![EventKind::TunnelUp.as_str(), EventKind::TunnelUp.as_str(), EventKind::TunnelDown.as_str()],
            )
        })?;
        rows.iter().map(|r| r.text(0)).collect::<Result<_, _>>().map_err(|e| sql::unreadable("events", e))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::each_backend;
    use super::*;
    use serde_json::json;

    #[test]
    fn events_keep_their_order_and_pages_survive_a_reopen() {
        each_backend(|db| {
            let store = db.open();
            let mut published = Vec::new();
            for (i, kind) in EventKind::ALL.into_iter().enumerate() {
                let id = if i % 2 == 0 { "vpn_a" } else { "vpn_b" };
                let e = store.append_event(kind, id, json!({"i": i}), |e| published.push(e.seq)).unwrap();
                assert_eq!(e.seq, i as i64 + 1);
            }
            assert_eq!(published, [1, 2, 3, 4, 5, 6], "published in the log's order");
            drop(store);
            let store = db.open();
            assert_eq!(store.last_event_seq().unwrap(), 6);
            let after = store.events_after(2, 3).unwrap();
            assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
            assert_eq!(after[0].kind, EventKind::GatewayDeleted);
            assert_eq!(after[0].data, json!({"i": 2}));
            let a = EventFilter { gateway_id: Some("vpn_a".into()), kind: None };
            let page = store.events_before(None, &a, 2).unwrap();
            assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 3]);
            let next = store.events_before(Some(3), &a, 2).unwrap();
            assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
            let ups = EventFilter { gateway_id: None, kind: Some(EventKind::TunnelUp) };
            assert_eq!(store.events_before(None, &ups, 10).unwrap().len(), 1);
            // vpn_b's last tunnel event is up (seq 4); vpn_a's is down (seq 5).
            assert_eq!(store.tunnels_last_up().unwrap(), ["vpn_b"]);
        });
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        }
        assert_eq!(EventKind::parse("gateway.*"), None);
    }
}
