//! `cargo xtask <command>`: everything the README's commands need, installed
//! and run from here so that a fresh machine needs nothing else.

mod setup;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup        install system packages, the nightly rust-src component and
               bpf-linker (idempotent; quick when everything is present)
  build-ebpf   build the XDP program for bpfel-unknown-none
  test         setup + build-ebpf + the whole test suite (needs root: it
               creates network namespaces and runs wireguard-go)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::install_all(),
        Some("build-ebpf") => build_ebpf().map(|p| println!("{}", p.display())),
        Some("test") => test(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

/// Runs a command, failing with its name if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Builds the XDP program and returns the object's path.
pub fn build_ebpf() -> Result<PathBuf> {
    println!("== building the XDP program (nightly, bpfel-unknown-none)");
    let dir = root().join("ebpf");
    run(Command::new("cargo")
        .current_dir(&dir)
        .env("PATH", setup::path_with_llvm())
        // The host workspace's settings must not leak into the BPF build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["+nightly", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"]))?;
    let obj = dir.join("target/bpfel-unknown-none/release/wgxdp");
    if !obj.exists() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

fn test(extra: &[String]) -> Result<()> {
    setup::install_all()?;
    build_ebpf()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("the test suite creates network namespaces and must run as root");
    }
    println!("== cargo test (workspace: unit, known-answer, property, interop)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["test", "--workspace", "--all-targets"]).args(extra);
    run(&mut cmd)
}

extern "C" {
    fn geteuid() -> u32;
}
