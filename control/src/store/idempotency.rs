//! Stored answers for `Idempotency-Key`: the first successful answer to a
//! request, per API key and idempotency key, kept for a day and replayed to
//! retries of the same request.

use super::sql::{self, args};
use super::{now_millis, Store, StoreError};

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
        let row = self.run(|sql| {
            sql.query_opt(
                "SELECT fingerprint, status, headers, body, created_at FROM idempotency
                 WHERE key_id = ? AND idem_key = ? AND created_at >= ?",
                args![key_id, idem_key, oldest],
            )
        })?;
        let Some(r) = row else { return Ok(None) };
        let unreadable = |e| sql::unreadable("idempotency", e);
        Ok(Some(StoredResponse {
            fingerprint: r.text(0).map_err(unreadable)?,
            status: u16::try_from(r.int(1).map_err(unreadable)?).unwrap_or(500),
            headers: serde_json::from_str(&r.text(2).map_err(unreadable)?)?,
            body: r.blob(3).map_err(unreadable)?,
            created_at: r.int(4).map_err(unreadable)?,
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
        self.transaction(|sql| {
            sql.execute(
                &format!("DELETE FROM idempotency WHERE created_at < {} - ?", sql.dialect().now_millis()),
                args![RETENTION_MILLIS],
            )?;
            sql.execute(
                "INSERT INTO idempotency (key_id, idem_key, fingerprint, status, headers, body, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (key_id, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint,
                     status = excluded.status, headers = excluded.headers, body = excluded.body,
                     created_at = excluded.created_at",
                args![
                    key_id,
                    idem_key,
                    &response.fingerprint,
                    i64::from(response.status),
                    headers,
                    response.body.clone(),
                    response.created_at
                ],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::each_backend;
    use super::*;

    #[test]
    fn answers_are_kept_per_api_key_for_a_day_and_survive_a_reopen() {
        each_backend(|db| {
            let store = db.open();
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
            let store = db.open();
            assert_eq!(store.idempotent_response("key_a", "k1").unwrap(), Some(answer.clone()));
            assert_eq!(store.idempotent_response("key_b", "k1").unwrap(), None, "per API key");
            // Past the window: not replayed, and the next write drops it.
            // (A second past it: the delete compares with the database's clock.)
            let old = StoredResponse { created_at: now_millis() - RETENTION_MILLIS - 1_000, ..answer.clone() };
            store.save_idempotent_response("key_a", "k2", &old).unwrap();
            assert_eq!(store.idempotent_response("key_a", "k2").unwrap(), None);
            store.save_idempotent_response("key_a", "k3", &answer).unwrap();
            let rows = store.query_raw("SELECT COUNT(*) FROM idempotency", &[]);
            assert_eq!(rows[0].int(0), Ok(2));
        });
    }
}
