//! The wgxdp control plane: configuration, `serve`, key utilities.

pub mod config;
pub mod keys;
pub mod serve;
