//! The audit log: one row per mutation an API key asked for (and the `wg`
//! socket's changes), whatever its outcome, in the order they happened.
//! Entries older than `RETENTION_MILLIS` are dropped as new ones come.

use super::{now_millis, Store, StoreError};
use rusqlite::params;

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

impl Store {
    /// Appends `e` (its `seq` is assigned); returns the entry as stored.
    pub fn record_audit(&self, mut e: AuditEntry) -> Result<AuditEntry, StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        tx.execute("DELETE FROM audit_log WHERE at < ?1", [now_millis() - RETENTION_MILLIS])?;
        tx.execute(
            "INSERT INTO audit_log (at, key_id, action, target, status, error_code, replayed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![e.at, e.key_id, e.action, e.target, i64::from(e.status), e.error_code, e.replayed],
        )?;
        e.seq = tx.last_insert_rowid();
        tx.commit()?;
        Ok(e)
    }

    /// Up to `limit` entries, newest first, older than `before` (a `seq`) if given.
    pub fn audit_log(&self, before: Option<i64>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at, key_id, action, target, status, error_code, replayed FROM audit_log
             WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![before.unwrap_or(i64::MAX), limit as i64], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    key_id: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    status: u16::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    error_code: r.get(6)?,
                    replayed: r.get(7)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_newest_first_in_pages_and_survive_a_reopen() {
        let dir = std::env::temp_dir().join(super::super::random_id("wgxdp-audit-"));
        let path = dir.join("db");
        let store = Store::open(&path).unwrap();
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
        let store = Store::open(&path).unwrap();
        let first = store.audit_log(None, 3).unwrap();
        assert_eq!(first.iter().map(|e| e.status).collect::<Vec<_>>(), [204, 203, 202]);
        let rest = store.audit_log(Some(first[2].seq), 3).unwrap();
        assert_eq!(rest.iter().map(|e| e.status).collect::<Vec<_>>(), [201, 200]);
        assert_eq!(rest[1].target.as_deref(), Some("vpn_0"));
        assert!(first[0].replayed && !first[1].replayed);
        // An entry past the retention window goes when the next one comes.
        let old = AuditEntry { at: now_millis() - RETENTION_MILLIS - 1, ..first[0].clone() };
        store.record_audit(old).unwrap();
        store.record_audit(first[0].clone()).unwrap();
        assert_eq!(store.audit_log(None, 100).unwrap().len(), 6);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
