//! Newest-first pages of an append-only log (the audit log, the event
//! history, a webhook's deliveries): `limit` (1-500, default 50) entries
//! older than `before`, and the `before` of the next page.

use super::error::ApiError;
use serde::{Deserialize, Serialize};

/// Where a page of a log ended.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PageMeta {
    pub limit: u32,
    pub count: usize,
    /// Pass as `before` for the next (older) page; null on the last page.
    pub next_before: Option<i64>,
}

/// The page size asked for, checked with the `before` cursor.
pub fn page_size(limit: Option<u32>, before: Option<i64>) -> Result<u32, ApiError> {
    if before.is_some_and(|b| b < 1) {
        return Err(ApiError::bad_request("before must be a positive id"));
    }
    match limit {
        None => Ok(50),
        Some(n @ 1..=500) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit must be an integer from 1 to 500 (got {n})"))),
    }
}

/// A page from `rows` (fetched with `limit + 1`, newest first): its views
/// and where it ended.
pub fn page<R, V>(rows: Vec<R>, limit: u32, view: impl Fn(R) -> V, id: impl Fn(&V) -> i64) -> (Vec<V>, PageMeta) {
    let more = rows.len() > limit as usize;
    let data: Vec<V> = rows.into_iter().take(limit as usize).map(view).collect();
    let next_before = if more { data.last().map(&id) } else { None };
    let meta = PageMeta { limit, count: data.len(), next_before };
    (data, meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_end_where_the_next_begins() {
        assert_eq!(page_size(None, None).unwrap(), 50);
        assert!(page_size(Some(0), None).is_err() && page_size(Some(501), None).is_err());
        assert!(page_size(Some(5), Some(0)).is_err());
        let (data, meta) = page(vec![9, 8, 7], 2, |r| r * 10, |v| *v / 10);
        assert_eq!((data, meta.next_before, meta.count), (vec![90, 80], Some(8), 2));
        let (_, last) = page(vec![9, 8], 2, |r| r, |v| *v);
        assert_eq!(last.next_before, None);
    }
}
