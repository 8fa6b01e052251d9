//! The HTTP API suite (`suite/api.rs`) on a SQLite store, the default.

const POSTGRES: bool = false;

#[path = "suite/api.rs"]
mod suite;
