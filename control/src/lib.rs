//! The wgxdp control plane. So far: key utilities shared by the CLI.

pub mod keys;
