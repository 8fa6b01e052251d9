//! The wgxdp control plane: configuration, `serve`, the HTTP API and its
//! store, the CLI client, key utilities.

pub mod api;
pub mod check;
pub mod cli;
pub mod config;
pub mod firewall;
pub mod generate;
pub mod keys;
pub mod logging;
pub mod plane;
pub mod privilege;
pub mod secret;
pub mod serve;
pub mod store;
pub mod uapi;
