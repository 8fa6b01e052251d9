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
  demo         setup + build, then a working site-to-site tunnel in network
               namespaces, configured through the API, with live status
  bench-e2e    setup (+ boringtun) + release build, then the same workloads
               through wgxdp, wireguard-go and boringtun in one run: a table,
               target/bench-e2e.json and target/bench-e2e.svg
               [--seconds N] [--packets N] [--gateways N] [--json FILE]
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::install_all(),
        Some("build-ebpf") => build_ebpf().map(|p| println!("{}", p.display())),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(),
        Some("bench-e2e") => bench_e2e(&args[1..]),
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

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("{what} creates network namespaces and attaches XDP programs: run it as root");
    }
    Ok(())
}

/// Builds the `wgxdp` binary and the namespace drivers; returns the target dir.
fn build_binaries(release: bool) -> Result<PathBuf> {
    println!("== building wgxdp and the scenario drivers ({})", if release { "release" } else { "dev" });
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["build", "-p", "wgxdp-control", "-p", "wgxdp-integration", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root().join("target").join(if release { "release" } else { "debug" }))
}

fn demo() -> Result<()> {
    require_root("the demo")?;
    setup::install_all()?;
    build_ebpf()?;
    let bin = build_binaries(false)?;
    run(Command::new(bin.join("wgxdp-demo")).arg(bin.join("wgxdp")))
}

fn bench_e2e(extra: &[String]) -> Result<()> {
    require_root("bench-e2e")?;
    setup::install_all()?;
    setup::install_bench_tools()?;
    build_ebpf()?;
    let bin = build_binaries(true)?;
    run(Command::new(bin.join("wgxdp-bench-e2e"))
        .current_dir(root())
        .env("PATH", setup::path_with_llvm())
        .arg(bin.join("wgxdp"))
        .args(extra))
}

fn test(extra: &[String]) -> Result<()> {
    require_root("the test suite")?;
    setup::install_all()?;
    build_ebpf()?;
    println!("== cargo test (workspace: unit, known-answer, property, interop)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["test", "--workspace", "--all-targets"]).args(extra);
    run(&mut cmd)
}

extern "C" {
    fn geteuid() -> u32;
}
