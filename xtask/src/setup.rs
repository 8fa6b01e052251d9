//! Idempotent set-up of everything outside Cargo's reach. Each step checks
//! first and only installs what is missing, so a second run takes a second.

use crate::run;
use anyhow::{bail, Context, Result};
use std::process::Command;

/// Debian packages the project needs, and why.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    ("libpolly-22-dev", "LLVM 22's static libraries reference Polly"),
    ("clang", "C code in -sys crates (libxdp/libbpf) and their BPF parts"),
    ("libclang-dev", "bindgen for libxdp-sys"),
    ("m4", "libxdp-sys's build"),
    ("libelf-dev", "libbpf"),
    ("zlib1g-dev", "libbpf"),
    ("pkg-config", "finding C libraries"),
    ("iproute2", "network namespaces and veth for tests"),
    ("iputils-ping", "pings across test topologies"),
    ("wireguard-go", "the reference peer in interop tests and benchmarks"),
    ("wireguard-tools", "`wg`, to configure wireguard-go"),
    ("iperf3", "TCP throughput through the tunnel"),
    ("ethtool", "test topologies turn off veth checksum offload"),
    ("dpkg-dev", "dpkg-shlibdeps: the Debian package's library dependencies"),
    ("systemd", "systemd-analyze verify checks the packaged unit"),
    ("man-db", "the package test renders the manual page"),
    ("postgresql", "the store's PostgreSQL backend is tested against a real server"),
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// PATH with LLVM 22's tools first (bpf-linker and its build need them).
pub fn path_with_llvm() -> String {
    let cargo_bin = std::env::var("HOME").map(|h| format!("{h}/.cargo/bin:")).unwrap_or_default();
    format!("{LLVM_PREFIX}/bin:{cargo_bin}{}", std::env::var("PATH").unwrap_or_default())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn stdout(cmd: &mut Command) -> String {
    cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

pub fn install_all() -> Result<()> {
    println!("== setup");
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    api_fuzzer()?;
    println!("== setup complete");
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| stdout(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", p])).trim() != "installed")
        .collect();
    if missing.is_empty() {
        println!("   apt packages: all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    for p in &missing {
        let why = APT_PACKAGES.iter().find(|(n, _)| n == p).map(|(_, w)| *w).unwrap_or_default();
        println!("   apt: installing {p} ({why})");
    }
    run(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update (are you root?)")?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    .context("apt-get install")
}

fn nightly_rust_src() -> Result<()> {
    if !stdout(Command::new("rustup").args(["toolchain", "list"])).lines().any(|l| l.starts_with("nightly")) {
        println!("   rustup: installing the nightly toolchain (minimal profile)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("the XDP program needs a nightly toolchain")?;
    }
    let installed = stdout(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]));
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("   rustup: nightly rust-src present");
        return Ok(());
    }
    println!("   rustup: adding rust-src to nightly (for -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version").env("PATH", path_with_llvm())) {
        println!("   bpf-linker present");
        return Ok(());
    }
    println!("   cargo: building bpf-linker against LLVM 22 (a few minutes, once)");
    if !std::path::Path::new(LLVM_PREFIX).exists() {
        bail!("{LLVM_PREFIX} is missing: llvm-22-dev did not install");
    }
    run(Command::new("cargo").env("LLVM_PREFIX", LLVM_PREFIX).env("PATH", path_with_llvm()).args([
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
}

/// The property-based API fuzzer the test suite runs against a real `serve`
/// (Schemathesis from PyPI), pinned, in its own virtual environment.
pub const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Where `api_fuzzer` installs Schemathesis; the tests get it as `WGXDP_SCHEMATHESIS`.
pub fn schemathesis_path() -> std::path::PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    std::path::Path::new(&home)
        .join(format!(".cache/wgxdp/schemathesis-{SCHEMATHESIS_VERSION}"))
        .join("bin/schemathesis")
}

fn api_fuzzer() -> Result<()> {
    let st = schemathesis_path();
    if stdout(Command::new(&st).arg("--version")).contains(SCHEMATHESIS_VERSION) {
        println!("   schemathesis {SCHEMATHESIS_VERSION} present");
        return Ok(());
    }
    let venv = st.parent().and_then(|p| p.parent()).context("the fuzzer's path has a virtual environment")?;
    println!("   pip: installing schemathesis {SCHEMATHESIS_VERSION} into {} (half a minute, once)", venv.display());
    if !succeeds(Command::new("python3").args(["-m", "venv", "--clear"]).arg(venv)) {
        // Debian's python3 ships venv separately.
        run(Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "python3-venv",
        ]))
        .context("apt-get install python3-venv")?;
        run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(venv)).context("python3 -m venv")?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("schemathesis=={SCHEMATHESIS_VERSION}")))
    .context("pip install schemathesis")
}

/// What only `bench-e2e` needs: boringtun, the third gateway it measures.
pub fn install_bench_tools() -> Result<()> {
    if succeeds(Command::new("boringtun-cli").arg("--version").env("PATH", path_with_llvm())) {
        println!("   boringtun-cli present");
        return Ok(());
    }
    println!("   cargo: building boringtun-cli (a few minutes, once)");
    run(Command::new("cargo").args(["install", "boringtun-cli", "--locked"]))
}

/// What `cargo xtask fuzz` needs: the nightly toolchain and cargo-fuzz.
pub fn install_fuzz_tools() -> Result<()> {
    if !stdout(Command::new("rustup").args(["toolchain", "list"])).lines().any(|l| l.starts_with("nightly")) {
        println!("   rustup: installing the nightly toolchain (minimal profile)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("libFuzzer targets need a nightly toolchain")?;
    }
    if succeeds(Command::new("cargo").args(["+nightly", "fuzz", "--version"])) {
        println!("   cargo-fuzz present");
        return Ok(());
    }
    println!("   cargo: installing cargo-fuzz (about a minute, once)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}
