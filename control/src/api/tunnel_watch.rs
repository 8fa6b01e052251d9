//! Turns the data plane's handshake state into events, once a second:
//! `tunnel.up` when a tunnel completes a handshake, `tunnel.down` when it has
//! had none for REJECT_AFTER_TIME (180 s) or its gateway went away, and
//! `handshake.failed` when an authenticated peer keeps failing to complete
//! handshakes (at least `FAILURES_REPORTED` since the last report, at most
//! one report per `REPORT_EVERY`). `observe` is the I/O-free core.

use super::model::{is_up, rfc3339};
use super::AppState;
use crate::plane::TunnelStatus;
use crate::store::EventKind;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often the data plane is looked at.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Failed handshakes since the last report that make a report.
pub const FAILURES_REPORTED: u64 = 3;
/// `handshake.failed` per tunnel at most this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// What the watch knows of one tunnel.
#[derive(Debug, Clone)]
struct Watched {
    up: bool,
    /// The data plane's failure counter when last reported (or first seen).
    failures_reported: u64,
    reported_at: Option<Instant>,
}

/// An event the watch wants recorded.
pub type Observed = (EventKind, String, Value);

#[derive(Debug, Default, Clone)]
pub struct TunnelWatch {
    tunnels: HashMap<String, Watched>,
}

impl TunnelWatch {
    /// What changed since the last look, given every running tunnel's state.
    pub fn observe(&mut self, live: Vec<(String, TunnelStatus)>, now: SystemTime, mono: Instant) -> Vec<Observed> {
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(live.len());
        for (id, s) in live {
            let up = is_up(&s, now);
            let w = self.tunnels.remove(&id).unwrap_or(Watched {
                up: false,
                failures_reported: s.handshake_failures,
                reported_at: None,
            });
            let mut w = Watched {
                // A replaced peer (a new key) starts its counter again.
                failures_reported: w.failures_reported.min(s.handshake_failures),
                ..w
            };
            if up != w.up {
                out.push(if up {
                    let endpoint = s.endpoint.map(|e| e.to_string());
                    (
                        EventKind::TunnelUp,
                        id.clone(),
                        json!({"endpoint": endpoint, "last_handshake": s.last_handshake.map(rfc3339)}),
                    )
                } else {
                    (EventKind::TunnelDown, id.clone(), json!({"reason": "expired"}))
                });
                w.up = up;
            }
            let failures = s.handshake_failures - w.failures_reported;
            let quiet = w.reported_at.is_none_or(|t| mono.saturating_duration_since(t) >= REPORT_EVERY);
            if failures >= FAILURES_REPORTED && quiet {
                out.push((
                    EventKind::HandshakeFailed,
                    id.clone(),
                    json!({"failures": failures, "total": s.handshake_failures, "endpoint": s.endpoint.map(|e| e.to_string())}),
                ));
                w.failures_reported = s.handshake_failures;
                w.reported_at = Some(mono);
            }
            seen.insert(id, w);
        }
        // Gone from the data plane: deleted (or replaced while down).
        let mut gone: Vec<_> = self.tunnels.drain().filter(|(_, w)| w.up).map(|(id, _)| id).collect();
        gone.sort();
        out.extend(gone.into_iter().map(|id| (EventKind::TunnelDown, id, json!({"reason": "deleted"}))));
        self.tunnels = seen;
        out
    }
}

/// A tunnel's state is published again at most this often (a change of
/// whether it is up is never held back longer).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// What this node last published of each tunnel, and when.
#[derive(Debug, Default)]
struct Published(HashMap<String, (TunnelStatus, Instant)>);

impl Published {
    /// The states to publish now: changed, and not published within
    /// `PUBLISH_EVERY` (or never). Tunnels gone from `live` are forgotten.
    fn due(&mut self, live: Vec<(String, TunnelStatus)>, now: Instant) -> Vec<(String, TunnelStatus)> {
        let running: std::collections::HashSet<&str> = live.iter().map(|(id, _)| id.as_str()).collect();
        self.0.retain(|id, _| running.contains(id.as_str()));
        live.into_iter()
            .filter(|(id, s)| match self.0.get(id) {
                None => true,
                Some((last, at)) => last != s && now.saturating_duration_since(*at) >= PUBLISH_EVERY,
            })
            .collect()
    }

    fn done(&mut self, published: Vec<(String, TunnelStatus)>, now: Instant) {
        for (id, s) in published {
            self.0.insert(id, (s, now));
        }
    }
}

/// Runs the watch until the runtime stops. First, tunnels the log last saw
/// up are announced down: their sessions did not survive the restart.
pub async fn run(state: Arc<AppState>) {
    // Under the mutation lock, like every look: before any change the API
    // makes to those gateways.
    let restarted = state.mutate(|s| match s.store.tunnels_last_up() {
        Ok(ids) => {
            for id in ids {
                // Only the tunnels this node ran: another node's live on.
                let ours = match s.store.lease_of(&id) {
                    Ok(Some(lease)) => lease.node_id == s.settings.node.id,
                    Ok(None) | Err(_) => s.settings.node.region == crate::store::EVERY_REGION,
                };
                if ours {
                    s.emit(EventKind::TunnelDown, &id, json!({"reason": "restart"}));
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read which tunnels were up before the restart"),
    });
    if restarted.await.is_err() {
        tracing::error!("announcing the tunnels a restart took down failed");
    }
    let watch = Arc::new(std::sync::Mutex::new(TunnelWatch::default()));
    let published = Arc::new(std::sync::Mutex::new(Published::default()));
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let watch = watch.clone();
        // Under the mutation lock: a tunnel's events fall between its
        // gateway's (`gateway.created` before `tunnel.up`).
        let looked = state.mutate(move |s| {
            // A data plane that did not answer says nothing about its tunnels.
            let Some(live) = s.plane.all_statuses() else {
                tracing::debug!("the data plane did not answer; tunnel events wait for the next look");
                return None;
            };
            let shown = s.store.is_shared().then(|| live.clone());
            let mut watch = watch.lock().unwrap_or_else(|p| p.into_inner());
            // What the watch knows changes only once its events are recorded:
            // an event the store refused is found again at the next look.
            let mut next = watch.clone();
            let observed = next.observe(live, SystemTime::now(), Instant::now());
            let mut recorded = true;
            for (kind, id, data) in observed {
                recorded = recorded && s.emit(kind, &id, data);
            }
            if recorded {
                *watch = next;
            }
            shown
        });
        // A look that panicked is logged; the next one starts afresh.
        let live = match looked.await {
            Ok(live) => live,
            Err(e) => {
                tracing::error!(error = %e, "a look at the tunnels failed");
                None
            }
        };
        // On a shared store, for the other nodes' answers.
        if let Some(live) = live {
            let (s, published) = (state.clone(), published.clone());
            let done = tokio::task::spawn_blocking(move || {
                let mut published = published.lock().unwrap_or_else(|p| p.into_inner());
                let due = published.due(live, Instant::now());
                match s.store.publish_statuses(&s.settings.node, &due) {
                    Ok(()) => published.done(due, Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "cannot publish the tunnels' state to the other nodes"),
                }
            });
            if let Err(e) = done.await {
                tracing::error!(error = %e, "publishing the tunnels' state failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(handshake_ago: Option<u64>, failures: u64, now: SystemTime) -> TunnelStatus {
        TunnelStatus {
            last_handshake: handshake_ago.map(|s| now - Duration::from_secs(s)),
            handshake_failures: failures,
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            ..TunnelStatus::default()
        }
    }

    fn kinds(events: &[Observed]) -> Vec<(EventKind, &str)> {
        events.iter().map(|(k, id, _)| (*k, id.as_str())).collect()
    }

    #[test]
    fn tunnels_go_up_and_down_with_their_handshakes() {
        let (now, mono) = (SystemTime::now(), Instant::now());
        let mut w = TunnelWatch::default();
        let t = |a: Option<u64>, b: Option<u64>| {
            vec![("a".to_owned(), status(a, 0, now)), ("b".to_owned(), status(b, 0, now))]
        };
        assert!(w.observe(t(None, None), now, mono).is_empty(), "new and down: nothing to say");
        let up = w.observe(t(Some(1), None), now, mono);
        assert_eq!(kinds(&up), [(EventKind::TunnelUp, "a")]);
        assert_eq!(up[0].2["endpoint"], "192.0.2.1:51820");
        assert!(w.observe(t(Some(100), None), now, mono).is_empty(), "still within 180 s");
        let down = w.observe(t(Some(181), Some(0)), now, mono);
        assert_eq!(kinds(&down), [(EventKind::TunnelDown, "a"), (EventKind::TunnelUp, "b")]);
        assert_eq!(down[0].2["reason"], "expired");
        // b's gateway is deleted while up; a (down) goes quietly.
        let gone = w.observe(Vec::new(), now, mono);
        assert_eq!(kinds(&gone), [(EventKind::TunnelDown, "b")]);
        assert_eq!(gone[0].2["reason"], "deleted");
        assert!(w.observe(Vec::new(), now, mono).is_empty());
    }

    #[test]
    fn repeated_handshake_failures_are_reported_at_most_once_a_minute() {
        let (now, mono) = (SystemTime::now(), Instant::now());
        let mut w = TunnelWatch::default();
        let one = |f| vec![("a".to_owned(), status(None, f, now))];
        // Failures from before the watch first saw the tunnel are not news.
        assert!(w.observe(one(7), now, mono).is_empty());
        assert!(w.observe(one(9), now, mono).is_empty(), "two failures are not yet repeated");
        let report = w.observe(one(10), now, mono);
        assert_eq!(kinds(&report), [(EventKind::HandshakeFailed, "a")]);
        assert_eq!((report[0].2["failures"].as_u64(), report[0].2["total"].as_u64()), (Some(3), Some(10)));
        assert!(w.observe(one(20), now, mono + Duration::from_secs(30)).is_empty(), "within the minute");
        let again = w.observe(one(21), now, mono + REPORT_EVERY);
        assert_eq!(again[0].2["failures"].as_u64(), Some(11));
        // A replaced peer's counter restarts; the watch follows it down.
        assert!(w.observe(one(1), now, mono + REPORT_EVERY * 3).is_empty());
        let after = w.observe(one(4), now, mono + REPORT_EVERY * 3);
        assert_eq!(after[0].2["failures"].as_u64(), Some(3));
    }
}
