//! Webhooks and their durable outbox. A webhook is a URL, the events it
//! wants and the secret its deliveries are signed with (kept here: the
//! signer needs it; shown to the client once). Every event appended queues
//! one delivery per matching webhook (`queue_deliveries`, inside the
//! event's transaction). Deliveries of one webhook go out in event order:
//! only its oldest pending one is due (`due_deliveries`), retried with
//! backoff until it succeeds or `GIVE_UP_AFTER_MILLIS` passes.

use super::events::{event_at, EventKind};
use super::sql::{self, args, Row, Sql};
use super::{now_millis, random_id, Event, Store, StoreError};
use crate::secret::SecretString;
use base64::Engine;

/// A delivery that has not succeeded this long after its event is given up.
pub const GIVE_UP_AFTER_MILLIS: i64 = 24 * 60 * 60 * 1000;
/// Finished deliveries (and their log) are kept 30 days.
pub const LOG_RETENTION_MILLIS: i64 = 30 * 24 * 60 * 60 * 1000;

/// Which events a webhook wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSelection {
    All,
    Only(Vec<EventKind>),
}

impl EventSelection {
    /// As stored: `*`, or `,kind,kind,` (so `instr` finds `,kind,` exactly).
    fn encode(&self) -> String {
        match self {
            EventSelection::All => "*".into(),
            EventSelection::Only(kinds) => {
                let mut s = String::from(",");
                for k in kinds {
                    s.push_str(k.as_str());
                    s.push(',');
                }
                s
            }
        }
    }

    fn decode(s: &str) -> Self {
        if s == "*" {
            return EventSelection::All;
        }
        EventSelection::Only(s.split(',').filter_map(EventKind::parse).collect())
    }

    pub fn kinds(&self) -> Vec<EventKind> {
        match self {
            EventSelection::All => EventKind::ALL.to_vec(),
            EventSelection::Only(k) => k.clone(),
        }
    }
}

/// A registered webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub events: EventSelection,
    pub description: String,
    /// Signs each delivery (`whsec_` + 43 base64url characters).
    pub secret: SecretString,
    pub created_at: i64,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Not delivered yet; retried at `next_attempt_at`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up: no 2xx within 24 hours of the event.
    Failed,
}

impl DeliveryState {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "delivered" => DeliveryState::Delivered,
            "pending" => DeliveryState::Pending,
            _ => DeliveryState::Failed,
        }
    }
}

/// One delivery as its log shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub seq: i64,
    pub webhook_id: String,
    pub event_seq: i64,
    pub event_kind: Option<EventKind>,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_at: Option<i64>,
    pub last_attempt_at: Option<i64>,
    /// The receiver's HTTP status at the last attempt.
    pub last_status: Option<u16>,
    /// Why the last attempt failed (connection error, non-2xx).
    pub last_error: Option<String>,
    pub created_at: i64,
}

/// A delivery to make now: where, with what secret, which event.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub seq: i64,
    pub webhook_id: String,
    pub url: String,
    pub secret: SecretString,
    pub attempts: u32,
    pub created_at: i64,
    /// `None` if the event is no longer in the log.
    pub event: Option<Event>,
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        status: u16,
    },
    /// Failed; try again at `retry_at`, or give up when `None`.
    Failed {
        status: Option<u16>,
        error: String,
        retry_at: Option<i64>,
    },
}

/// A signing secret as `new_secret` makes them: `whsec_` and 43 base64url
/// characters (32 bytes).
pub fn is_webhook_secret(s: &str) -> bool {
    s.strip_prefix("whsec_").is_some_and(|t| {
        t.len() == 43 && base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t).is_ok_and(|b| b.len() == 32)
    })
}

fn new_secret() -> SecretString {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    SecretString::new(format!("whsec_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
}

fn webhook(row: &Row) -> Result<Webhook, String> {
    Ok(Webhook {
        id: row.text(0)?,
        url: row.text(1)?,
        events: EventSelection::decode(&row.text(2)?),
        description: row.text(3)?,
        secret: SecretString::new(row.text(4)?),
        created_at: row.int(5)?,
    })
}

const WEBHOOK_COLUMNS: &str = "id, url, events, description, secret, created_at";

fn delivery(row: &Row) -> Result<Delivery, String> {
    Ok(Delivery {
        seq: row.int(0)?,
        webhook_id: row.text(1)?,
        event_seq: row.int(2)?,
        event_kind: row.opt_text(3)?.as_deref().and_then(EventKind::parse),
        state: DeliveryState::parse(&row.text(4)?),
        attempts: u32::try_from(row.int(5)?).unwrap_or(u32::MAX),
        next_attempt_at: row.opt_int(6)?,
        last_attempt_at: row.opt_int(7)?,
        last_status: row.opt_int(8)?.and_then(|s| u16::try_from(s).ok()),
        last_error: row.opt_text(9)?,
        created_at: row.int(10)?,
    })
}

fn unreadable(reason: String) -> StoreError {
    sql::unreadable("webhook", reason)
}

/// Queues event `seq` (of `kind`) for every webhook that wants it; part of
/// the event's own transaction.
pub(super) fn queue_deliveries(sql: &dyn Sql, seq: i64, kind: EventKind, now: i64) -> Result<(), StoreError> {
    sql.execute(
        &format!(
            "DELETE FROM webhook_deliveries WHERE state != 'pending' AND created_at < {} - ?",
            sql.dialect().now_millis()
        ),
        args![LOG_RETENTION_MILLIS],
    )?;
    sql.execute(
        &format!(
            "INSERT INTO webhook_deliveries (webhook_id, event_seq, state, attempts, next_attempt_at, created_at)
             SELECT id, CAST(? AS BIGINT), 'pending', 0, CAST(? AS BIGINT), CAST(? AS BIGINT) FROM webhooks
             WHERE events = '*' OR {}(events, CAST(? AS TEXT)) > 0",
            sql.dialect().position()
        ),
        args![seq, now, now, format!(",{},", kind.as_str())],
    )?;
    Ok(())
}

/// The oldest pending delivery of each webhook: the only one of its
/// webhook that may go out (deliveries keep the events' order).
const HEADS: &str = "SELECT MIN(seq) FROM webhook_deliveries WHERE state = 'pending' GROUP BY webhook_id";

impl Store {
    /// Registers a webhook; the returned record holds its secret.
    pub fn create_webhook(&self, url: &str, events: &EventSelection, description: &str) -> Result<Webhook, StoreError> {
        let hook = Webhook {
            id: random_id("wh_"),
            url: url.to_owned(),
            events: events.clone(),
            description: description.to_owned(),
            secret: new_secret(),
            created_at: now_millis(),
        };
        self.insert_webhook(&hook)?;
        Ok(hook)
    }

    /// Stores `hook` as it is (id and secret included: a restore's).
    pub fn insert_webhook(&self, hook: &Webhook) -> Result<(), StoreError> {
        self.check_write()?;
        self.run(|sql| {
            sql.execute(
                "INSERT INTO webhooks (id, url, events, description, secret, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                args![
                    &hook.id,
                    &hook.url,
                    hook.events.encode(),
                    &hook.description,
                    hook.secret.expose(),
                    hook.created_at
                ],
            )
        })?;
        Ok(())
    }

    pub fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        let rows =
            self.run(|sql| sql.query(&format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"), &[]))?;
        rows.iter().map(webhook).collect::<Result<_, _>>().map_err(unreadable)
    }

    pub fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        if sql::holds_nul(id) {
            return Ok(None);
        }
        let row =
            self.run(|sql| sql.query_opt(&format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?"), args![id]))?;
        row.as_ref().map(webhook).transpose().map_err(unreadable)
    }

    /// Removes a webhook with its pending deliveries and log; `None` if there is none.
    pub fn delete_webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        self.check_write()?;
        if sql::holds_nul(id) {
            return Ok(None);
        }
        self.transaction(|sql| {
            let Some(row) =
                sql.query_opt(&format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?"), args![id])?
            else {
                return Ok(None);
            };
            let hook = webhook(&row).map_err(unreadable)?;
            sql.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", args![id])?;
            sql.execute("DELETE FROM webhooks WHERE id = ?", args![id])?;
            Ok(Some(hook))
        })
    }

    /// Up to `limit` deliveries that are due at `now`, one per webhook at most.
    pub fn due_deliveries(&self, now: i64, limit: usize) -> Result<Vec<DueDelivery>, StoreError> {
        let rows = self.run(|sql| {
            sql.query(
                &format!(
                    "SELECT d.seq, d.webhook_id, w.url, w.secret, d.attempts, d.created_at, e.seq IS NOT NULL,
                            e.seq, e.at, e.kind, e.gateway_id, e.data
                     FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
                          LEFT JOIN events e ON e.seq = d.event_seq
                     WHERE d.seq IN ({HEADS}) AND d.next_attempt_at <= ?
                     ORDER BY d.next_attempt_at LIMIT ?"
                ),
                args![now, i64::try_from(limit).unwrap_or(i64::MAX)],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(DueDelivery {
                    seq: r.int(0)?,
                    webhook_id: r.text(1)?,
                    url: r.text(2)?,
                    secret: SecretString::new(r.text(3)?),
                    attempts: u32::try_from(r.int(4)?).unwrap_or(u32::MAX),
                    created_at: r.int(5)?,
                    event: if r.int(6)? != 0 { Some(event_at(r, 7)?) } else { None },
                })
            })
            .collect::<Result<_, String>>()
            .map_err(unreadable)
    }

    /// When the next delivery falls due (`None`: nothing is pending).
    pub fn next_delivery_at(&self) -> Result<Option<i64>, StoreError> {
        let row = self.run(|sql| {
            sql.query_one(&format!("SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE seq IN ({HEADS})"), &[])
        })?;
        row.opt_int(0).map_err(unreadable)
    }

    /// Makes every pending delivery due at `now` (a restart: the outage may
    /// have been ours); returns how many there are.
    pub fn retry_pending_now(&self, now: i64) -> Result<usize, StoreError> {
        self.check_write()?;
        let row = self.run(|sql| {
            sql.execute(
                &format!(
                    "UPDATE webhook_deliveries SET next_attempt_at = ?
                     WHERE state = 'pending' AND next_attempt_at > ?
                       AND (claimed_until IS NULL OR claimed_until < {})",
                    sql.dialect().now_millis()
                ),
                args![now, now],
            )?;
            sql.query_one("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'", &[])
        })?;
        Ok(usize::try_from(row.int(0).map_err(unreadable)?).unwrap_or(0))
    }

    /// Claims delivery `seq`, due at `now`, for `for_millis`: true if this
    /// caller may attempt it, false if another (a node sharing the store)
    /// claimed or settled it first. The claim moves its due time past it.
    pub fn claim_delivery(&self, seq: i64, now: i64, for_millis: i64) -> Result<bool, StoreError> {
        self.check_write()?;
        // The claim's end on the database's clock: a node whose clock is
        // ahead cannot take a delivery another is still sending.
        let n = self.run(|sql| {
            let db_now = sql.dialect().now_millis();
            sql.execute(
                &format!(
                    "UPDATE webhook_deliveries SET next_attempt_at = ?, claimed_until = {db_now} + ?
                     WHERE seq = ? AND state = 'pending' AND next_attempt_at <= ?
                       AND (claimed_until IS NULL OR claimed_until < {db_now})"
                ),
                args![now + for_millis, for_millis, seq, now],
            )
        })?;
        Ok(n == 1)
    }

    /// Records an attempt at delivery `seq`.
    pub fn record_attempt(&self, seq: i64, attempt: &Attempt, now: i64) -> Result<(), StoreError> {
        self.check_write()?;
        let (state, status, error, next) = match attempt {
            Attempt::Delivered { status } => (DeliveryState::Delivered, Some(*status), None, None),
            Attempt::Failed { status, error, retry_at: Some(at) } => {
                (DeliveryState::Pending, *status, Some(error.as_str()), Some(*at))
            }
            Attempt::Failed { status, error, retry_at: None } => {
                (DeliveryState::Failed, *status, Some(error.as_str()), None)
            }
        };
        self.run(|sql| {
            sql.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?,
                     last_attempt_at = ?, last_status = ?, last_error = ?, claimed_until = NULL
                 WHERE seq = ? AND state = 'pending'",
                args![state.as_str(), next, now, status.map(i64::from), error, seq],
            )
        })?;
        Ok(())
    }

    /// Webhook `id`'s deliveries, newest first, older than `before` if given.
    pub fn deliveries(&self, id: &str, before: Option<i64>, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        if sql::holds_nul(id) {
            return Ok(Vec::new());
        }
        let rows = self.run(|sql| {
            sql.query(
                "SELECT d.seq, d.webhook_id, d.event_seq, e.kind, d.state, d.attempts, d.next_attempt_at,
                        d.last_attempt_at, d.last_status, d.last_error, d.created_at
                 FROM webhook_deliveries d LEFT JOIN events e ON e.seq = d.event_seq
                 WHERE d.webhook_id = ? AND d.seq < ? ORDER BY d.seq DESC LIMIT ?",
                args![id, before.unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX)],
            )
        })?;
        rows.iter().map(delivery).collect::<Result<_, _>>().map_err(unreadable)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::each_backend;
    use super::*;
    use serde_json::json;

    #[test]
    fn deliveries_are_queued_per_matching_webhook_in_order_and_survive_a_reopen() {
        each_backend(|db| {
            let store = db.open();
            let all = store.create_webhook("http://a/", &EventSelection::All, "").unwrap();
            let ups = store.create_webhook("http://b/", &EventSelection::Only(vec![EventKind::TunnelUp]), "b").unwrap();
            assert!(all.secret.expose().starts_with("whsec_") && all.secret.expose() != ups.secret.expose());
            store.append_event(EventKind::GatewayCreated, "vpn_a", json!({}), |_| {}).unwrap();
            store.append_event(EventKind::TunnelUp, "vpn_a", json!({}), |_| {}).unwrap();
            let now = now_millis();
            // One due delivery per webhook: `all`'s first, `ups`'s only.
            let due = store.due_deliveries(now, 10).unwrap();
            let mut heads: Vec<(String, i64)> =
                due.iter().map(|d| (d.webhook_id.clone(), d.event.as_ref().unwrap().seq)).collect();
            heads.sort();
            let mut expected = vec![(all.id.clone(), 1), (ups.id.clone(), 2)];
            expected.sort();
            assert_eq!(heads, expected);
            let first = due.iter().find(|d| d.webhook_id == all.id).unwrap();
            assert_eq!(first.secret.expose(), all.secret.expose());
            // A failure holds `all`'s queue until the retry is due.
            let failed = Attempt::Failed { status: Some(503), error: "busy".into(), retry_at: Some(now + 5000) };
            store.record_attempt(first.seq, &failed, now).unwrap();
            assert!(store.due_deliveries(now, 10).unwrap().iter().all(|d| d.webhook_id != all.id));
            assert!(store.next_delivery_at().unwrap().is_some_and(|at| at <= now), "`ups` is still due");
            drop(store);
            let store = db.open();
            let later = store.due_deliveries(now + 5000, 10).unwrap();
            let retry = later.iter().find(|d| d.webhook_id == all.id).unwrap();
            assert_eq!((retry.seq, retry.attempts), (first.seq, 1));
            store.record_attempt(retry.seq, &Attempt::Delivered { status: 204 }, now + 5000).unwrap();
            let next = store.due_deliveries(now + 5000, 10).unwrap();
            assert_eq!(next.iter().find(|d| d.webhook_id == all.id).unwrap().event.as_ref().unwrap().seq, 2);
            let log = store.deliveries(&all.id, None, 10).unwrap();
            assert_eq!(
                log.iter().map(|d| d.state).collect::<Vec<_>>(),
                [DeliveryState::Pending, DeliveryState::Delivered]
            );
            assert_eq!(
                (log[1].attempts, log[1].last_status, log[1].event_kind),
                (2, Some(204), Some(EventKind::GatewayCreated))
            );
            // Giving up ends the delivery as failed.
            let gone = Attempt::Failed { status: None, error: "refused".into(), retry_at: None };
            store.record_attempt(log[0].seq, &gone, now).unwrap();
            assert_eq!(store.deliveries(&all.id, None, 1).unwrap()[0].state, DeliveryState::Failed);
            // Deleting a webhook takes its queue and log along.
            assert_eq!(store.delete_webhook(&ups.id).unwrap().map(|w| w.description), Some("b".into()));
            assert!(store.delete_webhook(&ups.id).unwrap().is_none());
            assert!(store.deliveries(&ups.id, None, 10).unwrap().is_empty());
            assert_eq!(store.webhooks().unwrap().len(), 1);
        });
    }
}
