//! The HTTP API suite (`suite/api.rs`) on a PostgreSQL store (the test
//! process's own server): the API behaves the same on either backend.

const POSTGRES: bool = true;

#[path = "suite/api.rs"]
mod suite;
