//! Stored answers for `Idempotency-Key`: the first successful answer to a
//! request, per API key and idempotency key, kept for a day and replayed to
//! retries of the same request.

use super::{now_millis, Store, StoreError};
use rusqlite::{params, OptionalExtension};

/// How long an answer is kept for retries.
pub const RETENTION_MILLIS: i64 = 24 * 60 * 60 * 1000;

/// An answer as stored: what identifies the request it answered, and the
/// answer itself (status, the headers worth replaying, body).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// A hash of the request (method, path, body).
    pub fingerprint: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub created_at: i64,
}

impl std::fmt::Debug for StoredResponse {
    /// The body may hold a secret (a create's pre-shared key): never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredResponse")
            .field("fingerprint", &self.fingerprint)
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

impl Store {
    /// The answer stored for (`key_id`, `idem_key`) within the retention window.
    pub fn idempotent_response(&self, key_id: &str, idem_key: &str) -> Result<Option<StoredResponse>, StoreError> {
        let oldest = now_millis() - RETENTION_MILLIS;
        let row = self
            .conn()
            .query_row(
                "SELECT fingerprint, status, headers, body, created_at FROM idempotency
                 WHERE key_id = ?1 AND idem_key = ?2 AND created_at >= ?3",
                params![key_id, idem_key, oldest],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((fingerprint, status, headers, body, created_at)) = row else { return Ok(None) };
        Ok(Some(StoredResponse {
            fingerprint,
            status: u16::try_from(status).unwrap_or(500),
            headers: serde_json::from_str(&headers)?,
            body,
            created_at,
        }))
    }

    /// Stores the answer to (`key_id`, `idem_key`), replacing an expired one,
    /// and drops every answer past the retention window.
    pub fn save_idempotent_response(
        &self,
        key_id: &str,
        idem_key: &str,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let headers = serde_json::to_string(&response.headers)?;
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        tx.execute("DELETE FROM idempotency WHERE created_at < ?1", [now_millis() - RETENTION_MILLIS])?;
        tx.execute(
            "INSERT OR REPLACE INTO idempotency (key_id, idem_key, fingerprint, status, headers, body, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                key_id,
                idem_key,
                response.fingerprint,
                i64::from(response.status),
                headers,
                response.body,
                response.created_at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_per_api_key_for_a_day_and_survive_a_reopen() {
        let dir = std::env::temp_dir().join(super::super::random_id("wgxdp-idem-"));
        let path = dir.join("db");
        let store = Store::open(&path).unwrap();
        let answer = StoredResponse {
            fingerprint: "f1".into(),
            status: 201,
            headers: vec![("location".into(), "/x".into())],
            body: b"{\"psk\":\"secret\"}".to_vec(),
            created_at: now_millis(),
        };
        store.save_idempotent_response("key_a", "k1", &answer).unwrap();
        assert!(!format!("{answer:?}").contains("secret"));
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.idempotent_response("key_a", "k1").unwrap(), Some(answer.clone()));
        assert_eq!(store.idempotent_response("key_b", "k1").unwrap(), None, "per API key");
        // Past the window: not replayed, and the next write drops it.
        let old = StoredResponse { created_at: now_millis() - RETENTION_MILLIS - 1, ..answer.clone() };
        store.save_idempotent_response("key_a", "k2", &old).unwrap();
        assert_eq!(store.idempotent_response("key_a", "k2").unwrap(), None);
        store.save_idempotent_response("key_a", "k3", &answer).unwrap();
        let rows: i64 = store.conn().query_row("SELECT COUNT(*) FROM idempotency", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
