//! What the store asks of a database: statements with positional `?`
//! parameters over plain values, alone or in a transaction. The SQLite and
//! PostgreSQL backends implement it; every query the store runs is written
//! once, against it, and decoded once (`Row`).

use super::StoreError;

/// A parameter or a column value.
#[derive(Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

// Values can be secrets (a pre-shared key, a webhook secret): never printed.
impl std::fmt::Debug for SqlValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SqlValue::Null => "Null",
            SqlValue::Int(_) => "Int(..)",
            SqlValue::Real(_) => "Real(..)",
            SqlValue::Text(_) => "Text(..)",
            SqlValue::Blob(_) => "Blob(..)",
        })
    }
}

impl SqlValue {
    fn kind(&self) -> &'static str {
        match self {
            SqlValue::Null => "NULL",
            SqlValue::Int(_) => "an integer",
            SqlValue::Real(_) => "a real number",
            SqlValue::Text(_) => "text",
            SqlValue::Blob(_) => "a blob",
        }
    }
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        SqlValue::Int(v)
    }
}

impl From<bool> for SqlValue {
    fn from(v: bool) -> Self {
        SqlValue::Int(i64::from(v))
    }
}

impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        SqlValue::Text(v.to_owned())
    }
}

impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        SqlValue::Text(v)
    }
}

impl From<&String> for SqlValue {
    fn from(v: &String) -> Self {
        SqlValue::Text(v.clone())
    }
}

impl From<Vec<u8>> for SqlValue {
    fn from(v: Vec<u8>) -> Self {
        SqlValue::Blob(v)
    }
}

impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(SqlValue::Null, Into::into)
    }
}

/// Parameters in order: `args![a, b, c]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => { &[$($crate::store::sql::SqlValue::from($v)),*][..] };
}
pub(crate) use args;

/// One row of a result, its columns in the statement's order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<SqlValue>);

impl Row {
    fn at(&self, index: usize) -> Result<&SqlValue, String> {
        self.0.get(index).ok_or_else(|| format!("no column {index}"))
    }

    fn mismatch(&self, index: usize, wanted: &str) -> String {
        let found = self.0.get(index).map_or("nothing", SqlValue::kind);
        format!("{found} where {wanted} belongs")
    }

    /// Column `index` as an integer; anything else (NULL included) is the reason it is not.
    pub fn int(&self, index: usize) -> Result<i64, String> {
        match self.at(index)? {
            SqlValue::Int(v) => Ok(*v),
            _ => Err(self.mismatch(index, "an integer")),
        }
    }

    pub fn opt_int(&self, index: usize) -> Result<Option<i64>, String> {
        match self.at(index)? {
            SqlValue::Null => Ok(None),
            _ => self.int(index).map(Some),
        }
    }

    pub fn text(&self, index: usize) -> Result<String, String> {
        match self.at(index)? {
            SqlValue::Text(v) => Ok(v.clone()),
            _ => Err(self.mismatch(index, "text")),
        }
    }

    pub fn opt_text(&self, index: usize) -> Result<Option<String>, String> {
        match self.at(index)? {
            SqlValue::Null => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    pub fn blob(&self, index: usize) -> Result<Vec<u8>, String> {
        match self.at(index)? {
            SqlValue::Blob(v) => Ok(v.clone()),
            _ => Err(self.mismatch(index, "a blob")),
        }
    }

    /// The value itself (a test that puts it back).
    #[cfg(test)]
    pub fn value(&self, index: usize) -> SqlValue {
        self.0.get(index).cloned().unwrap_or(SqlValue::Null)
    }
}

/// No stored text holds a NUL character (PostgreSQL refuses them in text,
/// and every row comes through the same checks on either backend): a key
/// that holds one matches nothing, on both alike, without a query.
pub fn holds_nul(key: &str) -> bool {
    key.contains('\0')
}

/// A column of a table that is not a gateway row did not decode: the
/// database holds something this build did not write.
pub fn unreadable(table: &str, reason: String) -> StoreError {
    StoreError::Database(format!("a {table} row cannot be read: {reason}"))
}

/// One connection, or one transaction on it.
pub trait Sql {
    /// Runs a statement; returns how many rows it changed.
    fn execute(&self, sql: &str, args: &[SqlValue]) -> Result<u64, StoreError>;
    /// Runs a query; returns its rows.
    fn query(&self, sql: &str, args: &[SqlValue]) -> Result<Vec<Row>, StoreError>;
    /// Which database this is (for the few statements that differ).
    fn dialect(&self) -> Dialect;

    /// The first row, if any.
    fn query_opt(&self, sql: &str, args: &[SqlValue]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row, which must be there (an aggregate).
    fn query_one(&self, sql: &str, args: &[SqlValue]) -> Result<Row, StoreError> {
        self.query_opt(sql, args)?.ok_or_else(|| StoreError::Database("a query returned no row".into()))
    }
}

/// The two databases the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The database's clock, Unix milliseconds (one clock for every node:
    /// liveness and retention are measured on it, so a node whose clock is
    /// off neither looks dead nor drops the others' rows).
    pub fn now_millis(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            // The statement's start: stable within it, so a comparison with a
            // column can use its index (clock_timestamp() is volatile, and
            // made every retention delete a scan of its table).
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// The statement that tells the other nodes the gateways changed, sent
    /// when its transaction commits (`Store::watch_changes` hears it); none
    /// where one process is the only writer.
    pub fn notify_change(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some("NOTIFY wgxdp_gateways"),
        }
    }

    /// The position of `needle` in `haystack` (1-based; 0 when absent).
    pub fn position(self) -> &'static str {
        match self {
            Dialect::Sqlite => "instr",
            Dialect::Postgres => "strpos",
        }
    }
}

/// A database the store runs on: connections taken one at a time.
pub trait Database: Send + Sync + std::fmt::Debug {
    /// Runs `work` on a connection, each statement committed on its own.
    fn with(&self, work: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>) -> Result<(), StoreError>;
    /// Runs `work` in one transaction, write-locked from its start: committed
    /// when it returns `Ok`, rolled back otherwise.
    fn transaction(&self, work: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>) -> Result<(), StoreError>;
    /// Where it is, for messages (a path, or a URL without its password).
    fn describe(&self) -> String;
    /// Takes the store-wide write lock (shared by every node of a shared
    /// store) until the returned guard drops; `None` where one process is
    /// the only writer (SQLite, whose callers serialise their writes).
    fn exclusive(&self) -> Result<Option<Box<dyn Send>>, StoreError> {
        Ok(None)
    }
    /// Several processes share it (a fleet's nodes).
    fn is_shared(&self) -> bool {
        false
    }
    /// Calls `changed` each time another process commits a change of the
    /// gateways (`Dialect::notify_change`), until the database is dropped;
    /// nothing where this process is the only writer.
    fn listen(&self, changed: std::sync::Arc<dyn Fn() + Send + Sync>) -> Result<(), StoreError> {
        let _ = changed;
        Ok(())
    }
}

/// `Database::with` and `::transaction` returning what `work` returns.
pub fn run<T>(
    db: &dyn Database,
    in_transaction: bool,
    work: impl FnOnce(&dyn Sql) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut work = Some(work);
    let mut out = None;
    let mut step = |sql: &dyn Sql| {
        let work = work.take().ok_or_else(|| StoreError::Database("a unit of work ran twice".into()))?;
        out = Some(work(sql)?);
        Ok(())
    };
    if in_transaction {
        db.transaction(&mut step)?;
    } else {
        db.with(&mut step)?;
    }
    out.ok_or_else(|| StoreError::Database("a unit of work did not run".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_names_what_it_found_where_something_else_belongs() {
        let row = Row(vec![SqlValue::Int(7), SqlValue::Text("x".into()), SqlValue::Null, SqlValue::Blob(vec![1])]);
        assert_eq!(row.int(0), Ok(7));
        assert_eq!(row.text(1).as_deref(), Ok("x"));
        assert_eq!(row.opt_int(2), Ok(None));
        assert_eq!(row.opt_text(2), Ok(None));
        assert_eq!(row.blob(3), Ok(vec![1]));
        assert_eq!(row.int(1).unwrap_err(), "text where an integer belongs");
        assert_eq!(row.text(2).unwrap_err(), "NULL where text belongs");
        assert_eq!(row.opt_int(3).unwrap_err(), "a blob where an integer belongs");
        assert_eq!(row.int(9).unwrap_err(), "no column 9");
        assert_eq!(format!("{:?}", SqlValue::Text("secret".into())), "Text(..)");
    }
}
