//! The audit log: one row per mutation an API key asked for (and the `wg`
//! socket's changes), whatever its outcome, in the order they happened.
//! Entries older than `RETENTION_MILLIS` are dropped as new ones come.

use super::sql::{self, args, Row};
use super::{Store, StoreError};

/// How long entries are kept: 90 days.
pub const RETENTION_MILLIS: i64 = 90 * 24 * 60 * 60 * 1000;

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Order of recording; 0 before it is recorded.
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// The API key's id (`wg-socket` for the WireGuard socket).
    pub key_id: String,
    /// What was asked, e.g. `gateway.create`.
    pub action: String,
    /// The object acted on, when there is one (a gateway id).
    pub target: Option<String>,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The error's code when it failed (`validation_failed`, `forbidden`...).
    pub error_code: Option<String>,
    /// An `Idempotency-Key` replay: the earlier answer again, no change.
    pub replayed: bool,
}

fn entry(r: &Row) -> Result<AuditEntry, String> {
    Ok(AuditEntry {
        seq: r.int(0)?,
        at: r.int(1)?,
        key_id: r.text(2)?,
        action: r.text(3)?,
        target: r.opt_text(4)?,
        status: u16::try_from(r.int(5)?).unwrap_or(0),
        error_code: r.opt_text(6)?,
        replayed: r.int(7)? != 0,
    })
}

impl Store {
    /// Appends `e` (its `seq` is assigned); returns the entry as stored.
    pub fn record_audit(&self, mut e: AuditEntry) -> Result<AuditEntry, StoreError> {
        // What a request named (a path's id) is kept as text either backend
        // stores: a NUL character becomes U+FFFD.
        if let Some(t) = e.target.as_mut().filter(|t| sql::holds_nul(t)) {
            *t = t.replace('\0', "\u{fffd}");
        }
        e.seq = self.transaction(|sql| {
            sql.execute(
                &format!("DELETE FROM audit_log WHERE at < {} - ?", sql.dialect().now_millis()),
                args![RETENTION_MILLIS],
            )?;
            let row = sql.query_one(
                "INSERT INTO audit_log (at, key_id, action, target, status, error_code, replayed)
                 VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                args![
                    e.at,
                    &e.key_id,
                    &e.action,
                    e.target.as_ref(),
                    i64::from(e.status),
                    e.error_code.as_ref(),
                    e.replayed
                ],
            )?;
            row.int(0).map_err(|r| sql::unreadable("audit_log", r))
        })?;
        Ok(e)
    }

    /// Up to `limit` entries, newest first, older than `before` (a `seq`) if given.
    pub fn audit_log(&self, before: Option<i64>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = self.run(|sql| {
            sql.query(
                "SELECT seq, at, key_id, action, target, status, error_code, replayed FROM audit_log
                 WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                args![before.unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX)],
            )
        })?;
        rows.iter().map(entry).collect::<Result<_, _>>().map_err(|r| sql::unreadable("audit_log", r))
    }
}

#[cfg(test)]
mod tests {
    use super::super::now_millis;
    use super::super::testing::each_backend;
    use super::*;

    #[test]
    fn entries_come_back_newest_first_in_pages_and_survive_a_reopen() {
        each_backend(|db| {
            let store = db.open();
            for i in 0..5u16 {
                let e = AuditEntry {
                    seq: 0,
                    at: now_millis() + i64::from(i),
                    key_id: "key_a".into(),
                    action: "gateway.create".into(),
                    target: (i % 2 == 0).then(|| format!("vpn_{i}")),
                    status: 200 + i,
                    error_code: None,
                    replayed: i == 4,
                };
                assert_eq!(store.record_audit(e).unwrap().seq, i64::from(i) + 1);
            }
            drop(store);
            let store = db.open();
            let first = store.audit_log(None, 3).unwrap();
            assert_eq!(first.iter().map(|e| e.status).collect::<Vec<_>>(), [204, 203, 202]);
            let rest = store.audit_log(Some(first[2].seq), 3).unwrap();
            assert_eq!(rest.iter().map(|e| e.status).collect::<Vec<_>>(), [201, 200]);
            assert_eq!(rest[1].target.as_deref(), Some("vpn_0"));
            assert!(first[0].replayed && !first[1].replayed);
            // An entry past the retention window goes when the next one comes.
            // A second past it: the database's clock (which retention uses) may lag this one by a little.
            let old = AuditEntry { at: now_millis() - RETENTION_MILLIS - 1_000, ..first[0].clone() };
            store.record_audit(old).unwrap();
            store.record_audit(first[0].clone()).unwrap();
            assert_eq!(store.audit_log(None, 100).unwrap().len(), 6);
        });
    }
}
