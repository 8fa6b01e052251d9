//! Sends the outbox's due webhook deliveries (`store::webhooks`): a JSON
//! `EventView` body, POSTed with a signature, retried with exponential
//! backoff (`retry_at`) until a 2xx or a day has passed. It wakes when an
//! event queues deliveries, when the next retry falls due, and at least
//! every `IDLE_WAKE`; after a restart it finds its work in the store and
//! tries it at once.
//!
//! The signature (documented in the README and the OpenAPI document):
//! `Wgxdp-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`,
//! where the key is the secret's text as given at creation (`whsec_…`).

use super::events::EventView;
use super::AppState;
use crate::store::{Attempt, DueDelivery, GIVE_UP_AFTER_MILLIS};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Due deliveries looked up at once (one per webhook: every webhook).
const BATCH: usize = super::webhooks::MAX_WEBHOOKS;
/// The deliverer looks at the outbox at most this often.
const MIN_WAIT: Duration = Duration::from_millis(50);
/// A webhook waits this long after the store failed to record its attempt.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(5);
/// A receiver gets this long to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's delay; each further one doubles, up to `MAX_DELAY`.
pub const FIRST_DELAY_MILLIS: i64 = 1000;
pub const MAX_DELAY_MILLIS: i64 = 15 * 60 * 1000;
/// Looked at the outbox at least this often.
const IDLE_WAKE: Duration = Duration::from_secs(30);
/// How long a claimed delivery is this node's: past an attempt's `TIMEOUT`
/// with room to record it. A node that dies meanwhile leaves it due again.
const CLAIM: Duration = Duration::from_secs(60);
/// The error text kept per attempt, at most.
const MAX_ERROR: usize = 200;

pub const SIGNATURE_HEADER: &str = "Wgxdp-Signature";
pub const EVENT_HEADER: &str = "Wgxdp-Event";
pub const DELIVERY_HEADER: &str = "Wgxdp-Delivery";

/// `Wgxdp-Signature`'s value for `body` sent at `timestamp` (unix seconds).
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", crate::store::hex(&mac.finalize().into_bytes()))
}

/// When to try again after attempt number `attempts` (1 for the first)
/// failed at `now`, or `None` to give up (the event is a day old).
pub fn retry_at(attempts: u32, created_at: i64, now: i64) -> Option<i64> {
    let delay = FIRST_DELAY_MILLIS.saturating_mul(1i64 << attempts.saturating_sub(1).min(30)).min(MAX_DELAY_MILLIS);
    let at = now + delay;
    (at <= created_at + GIVE_UP_AFTER_MILLIS).then_some(at)
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// One attempt at `d` (blocking).
fn attempt(d: &DueDelivery, now: i64) -> Attempt {
    let failed = |status, error: String| Attempt::Failed {
        status,
        error: bounded(error),
        retry_at: retry_at(d.attempts + 1, d.created_at, now),
    };
    let Some(event) = &d.event else {
        return Attempt::Failed { status: None, error: "the event left the log".into(), retry_at: None };
    };
    let body = serde_json::to_vec(&EventView::from(event)).unwrap_or_default();
    let timestamp = u64::try_from(now / 1000).unwrap_or(0);
    let agent = ureq::AgentBuilder::new().timeout(TIMEOUT).redirects(0).build();
    let sent = agent
        .post(&d.url)
        .set("Content-Type", "application/json")
        .set("User-Agent", concat!("wgxdp/", env!("CARGO_PKG_VERSION")))
        .set(SIGNATURE_HEADER, &signature(d.secret.expose(), timestamp, &body))
        .set(EVENT_HEADER, event.kind.as_str())
        .set(DELIVERY_HEADER, &d.seq.to_string())
        .send_bytes(&body);
    match sent {
        Ok(r) if (200..300).contains(&r.status()) => Attempt::Delivered { status: r.status() },
        Ok(r) => failed(Some(r.status()), format!("the receiver answered {}", r.status())),
        Err(ureq::Error::Status(code, _)) => failed(Some(code), format!("the receiver answered {code}")),
        // Not `t.to_string()`: it starts with the URL, which may hold a token.
        Err(ureq::Error::Transport(t)) => {
            let cause = std::error::Error::source(&t).map(|c| format!(": {c}")).unwrap_or_default();
            failed(None, format!("{}{}{cause}", t.kind(), t.message().map(|m| format!(" ({m})")).unwrap_or_default()))
        }
    }
}

/// Webhooks with an attempt running: one at a time each (their deliveries
/// keep the events' order), while other webhooks go on.
type InFlight = Arc<std::sync::Mutex<HashSet<String>>>;

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashSet<String>> {
    in_flight.lock().unwrap_or_else(|p| p.into_inner())
}

/// One attempt at `d`, recorded (blocking). A store that cannot record it
/// holds the webhook back a while: the delivery is still due, and trying
/// again at once would flood the receiver.
fn deliver_one(state: &AppState, d: &DueDelivery) {
    // Claimed first: nodes that share a store each see the delivery due,
    // and only the one that claims it sends it.
    let now = crate::store::now_millis();
    match state.store.claim_delivery(d.seq, now, CLAIM.as_millis() as i64) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, delivery = d.seq, "cannot claim a webhook delivery");
            std::thread::sleep(STORE_ERROR_PAUSE);
            return;
        }
    }
    let outcome = attempt(d, crate::store::now_millis());
    match &outcome {
        Attempt::Delivered { .. } => tracing::debug!(webhook = %d.webhook_id, delivery = d.seq, "webhook delivered"),
        Attempt::Failed { error, retry_at, .. } => tracing::warn!(webhook = %d.webhook_id, delivery = d.seq,
            attempts = d.attempts + 1, %error, gives_up = retry_at.is_none(), "webhook delivery failed"),
    }
    if let Err(e) = state.store.record_attempt(d.seq, &outcome, crate::store::now_millis()) {
        tracing::error!(error = %e, delivery = d.seq, "cannot record a webhook delivery attempt");
        std::thread::sleep(STORE_ERROR_PAUSE);
    }
}

/// Starts an attempt at each due delivery whose webhook has none running;
/// returns how long to wait for the next look (an attempt that ends wakes
/// it sooner).
async fn start_due(state: &Arc<AppState>, in_flight: &InFlight) -> Duration {
    // Webhooks with an attempt running when the outbox is read: what it
    // says of them may be stale by the time it is read (the attempt may
    // record and end meanwhile), so they wait for the next look.
    let busy = lock(in_flight).clone();
    let s = state.clone();
    let now = crate::store::now_millis();
    let looked = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((s.store.due_deliveries(now, BATCH)?, s.store.next_delivery_at()?))
    });
    let (due, next) = match looked.await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read the webhook outbox");
            return IDLE_WAKE;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the webhook outbox");
            return IDLE_WAKE;
        }
    };
    for d in due {
        if busy.contains(&d.webhook_id) || !lock(in_flight).insert(d.webhook_id.clone()) {
            continue;
        }
        let (state, in_flight) = (state.clone(), in_flight.clone());
        tokio::task::spawn_blocking(move || {
            let _release = Release { state: state.clone(), in_flight, webhook: d.webhook_id.clone() };
            deliver_one(&state, &d);
        });
    }
    match next {
        // Due now: started above, or waiting for its webhook's running
        // attempt (which wakes the loop when it ends).
        Some(at) if at <= crate::store::now_millis() => IDLE_WAKE,
        Some(at) => Duration::from_millis(u64::try_from(at - crate::store::now_millis()).unwrap_or(0)).min(IDLE_WAKE),
        None => IDLE_WAKE,
    }
}

/// Lets the next attempt of a webhook start (and wakes the deliverer) when
/// the running one ends, even if it panicked.
struct Release {
    state: Arc<AppState>,
    in_flight: InFlight,
    webhook: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Nothing was recorded: trying again at once would spin.
            tracing::error!(webhook = %self.webhook, "a webhook delivery attempt failed unexpectedly; pausing it");
            std::thread::sleep(STORE_ERROR_PAUSE);
        }
        lock(&self.in_flight).remove(&self.webhook);
        self.state.events.outbox.notify_one();
    }
}

/// Runs the deliverer until the runtime stops. What is pending from before
/// a start is tried at once (the outage may have been this server's).
pub async fn run(state: Arc<AppState>) {
    let s = state.clone();
    match tokio::task::spawn_blocking(move || s.store.retry_pending_now(crate::store::now_millis())).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(pending = n, "webhook deliveries pending from before the start"),
        Ok(Err(e)) => tracing::error!(error = %e, "cannot read the webhook outbox"),
        Err(e) => tracing::error!(error = %e, "cannot read the webhook outbox"),
    }
    let in_flight = InFlight::default();
    loop {
        let wait = start_due(&state, &in_flight).await.max(MIN_WAIT);
        tokio::select! {
            () = state.events.outbox.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_known_answer() {
        // HMAC-SHA256(key "whsec_test", "1700000000.{}"), computed independently
        // (Python: hmac.new(b"whsec_test", b"1700000000.{}", hashlib.sha256)).
        assert_eq!(
            signature("whsec_test", 1_700_000_000, b"{}"),
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }

    #[test]
    fn retries_back_off_exponentially_and_give_up_after_a_day() {
        let created = 1_000_000;
        assert_eq!(retry_at(1, created, created), Some(created + 1000));
        assert_eq!(retry_at(2, created, created), Some(created + 2000));
        assert_eq!(retry_at(5, created, created), Some(created + 16_000));
        assert_eq!(retry_at(40, created, created), Some(created + MAX_DELAY_MILLIS), "capped");
        assert_eq!(retry_at(3, created, created + GIVE_UP_AFTER_MILLIS - 1000), None);
    }
}
