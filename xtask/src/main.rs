//! `cargo xtask <command>`: everything the README's commands need, installed
//! and run from here so that a fresh machine needs nothing else.

mod package;
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
  package      the Debian package target/debian/wgxdp_<version>_<arch>.deb:
               release build, systemd unit, example configuration, manual
               pages, shell completions [--profile release|e2e]
  test         setup + build-ebpf + `wgxdp` with the e2e profile (release,
               panic = abort) and its package (target/debian/e2e/) + the
               whole test suite (needs root: it creates network namespaces
               and runs wireguard-go), then `fuzz`
  fuzz         installs cargo-fuzz if missing, builds the libFuzzer targets in
               fuzz/ (nightly) and runs each for a bounded time (about a
               minute in all); fails on any crash and says where its input is
               [--seconds N (per target)] [--sanitizer none|address] [TARGET...]
  fuzz-seeds   regenerate the seed corpora fuzz/corpus/<target>/ from a
               recorded handshake, transport packets, frames, a config, API bodies
  demo         setup + build, then a working site-to-site tunnel in network
               namespaces, configured through the API, with live status
  bench-e2e    setup (+ boringtun) + release build, then the same workloads
               through wgxdp, wireguard-go and boringtun in one run: tables
               (equal-load CPU cost per packet first), target/bench-e2e.json
               and target/bench-e2e.svg
               [--seconds N] [--packets N] [--gateways N] [--json FILE]
               [--only equal-load,capacity,handshakes,user-view]
               [--equal-rate-64 PPS] [--equal-rate-1420 PPS]
               [--equal-seconds S] [--equal-runs N] [--busy-poll]
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::install_all(),
        Some("build-ebpf") => build_ebpf().map(|p| println!("{}", p.display())),
        Some("package") => package::package(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(),
        Some("fuzz") => fuzz(&args[1..]),
        Some("fuzz-seeds") => fuzz_seeds(),
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
        // The host workspace's settings must not leak into the BPF build, and
        // its output stays where `control/build.rs` and the tests look for it,
        // whatever CARGO_TARGET_DIR says.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .args(["+nightly", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(dir.join("target")))?;
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
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Where cargo puts the workspace's build output: `CARGO_TARGET_DIR` (a
/// relative one is relative to the workspace root, where xtask runs cargo),
/// else `target/`.
pub fn target_dir() -> PathBuf {
    root().join(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()))
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
    // The end-to-end tests that must see a panic abort the gateway run this
    // binary (release code generation, `panic = "abort"`, no LTO):
    // target/e2e/wgxdp. `cargo test` cannot build it (it holds the build lock).
    // The package of that binary, which the `package` test unpacks and checks.
    let started = std::time::Instant::now();
    let deb = package::build("e2e")?;
    println!("== built wgxdp (e2e profile) and {} in {:.0} s", deb.display(), started.elapsed().as_secs_f64());
    println!("== cargo test (workspace: unit, known-answer, property, interop)");
    let cargo_test = || {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root())
            .env("WGXDP_PACKAGE", &deb)
            .env("WGXDP_REQUIRE_PACKAGE", "1")
            .env("WGXDP_SCHEMATHESIS", setup::schemathesis_path())
            .arg("test");
        cmd
    };
    if !extra.is_empty() {
        println!("   (the idle-tunnel test, {IDLE_TEST}, is ignored here: add `-- --ignored` to run it)");
        run(cargo_test().args(["--workspace", "--all-targets"]).args(extra))?;
        return fuzz(&[]);
    }
    // The idle-tunnel test spends 200 s waiting (past REJECT_AFTER_TIME):
    // it is `#[ignore]`d and runs beside the rest of the suite, not after it
    // (a `--skip` for the rest would reach the criterion benches, which
    // refuse it).
    run(cargo_test().args(["--workspace", "--all-targets", "--no-run"]))?;
    let log_path = std::env::temp_dir().join(format!("wgxdp-idle-e2e-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    println!("   (the idle-tunnel test runs beside the rest: {IDLE_TEST}, log {})", log_path.display());
    let mut idle = cargo_test()
        .args(["-p", "wgxdp-control", "--test", "idle_e2e", "--", "--ignored", "--exact", IDLE_TEST])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the idle-tunnel test")?;
    let rest = run(cargo_test().args(["--workspace", "--all-targets"]));
    let idle_status = idle.wait().context("waiting for the idle-tunnel test")?;
    let idle_output = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("== the idle-tunnel test ({idle_status}):");
    for line in idle_output.lines().filter(|l| !l.trim().is_empty()) {
        println!("   {line}");
    }
    let _ = std::fs::remove_file(&log_path);
    rest?;
    if !idle_status.success() {
        bail!("the idle-tunnel test failed ({idle_status}); its output is above");
    }
    if !idle_output.contains("test result: ok. 1 passed") {
        bail!("the idle-tunnel test did not run (its output is above)");
    }
    fuzz(&[])
}

/// `control/tests/idle_e2e.rs`'s one test.
const IDLE_TEST: &str = "idle_tunnel_without_keepalive_reopens_from_either_side";

/// Total fuzzing time of `cargo xtask fuzz` when `--seconds` is not given.
const FUZZ_TOTAL_SECONDS: u64 = 60;

fn fuzz_seeds() -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root())
        .args(["run", "-q", "-p", "wgxdp-fuzz-harness", "--bin", "fuzz-seeds", "--"])
        .arg(root().join("fuzz/corpus")))
}

/// The libFuzzer targets: `fuzz/fuzz_targets/*.rs`.
fn fuzz_targets() -> Result<Vec<String>> {
    let dir = root().join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

/// `cargo` in the fuzz workspace, its output pinned to fuzz/target whatever
/// CARGO_TARGET_DIR says (sanitizer builds stay apart from the workspace's).
fn fuzz_cargo(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz_dir).env("CARGO_TARGET_DIR", fuzz_dir.join("target"));
    cmd
}

/// Builds every target once, then runs each (or the named ones) for a bounded
/// time over its committed seeds. New corpus entries go to
/// fuzz/target/corpus/<target> and crashes to fuzz/artifacts/<target>/, both
/// ignored by git. Fails if any target crashed, after running all of them.
fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds = None;
    let mut sanitizer = "none".to_owned();
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = Some(it.next().context("--seconds N")?.parse::<u64>().context("--seconds N")?),
            "--sanitizer" => sanitizer = it.next().context("--sanitizer none|address")?.clone(),
            t => only.push(t.to_owned()),
        }
    }
    let all = fuzz_targets()?;
    if let Some(t) = only.iter().find(|t| !all.contains(t)) {
        bail!("unknown fuzz target `{t}` (targets: {})", all.join(", "));
    }
    let targets = if only.is_empty() { all } else { only };
    let seconds = seconds.unwrap_or((FUZZ_TOTAL_SECONDS / targets.len() as u64).max(1));

    println!("== fuzz: cargo-fuzz");
    setup::install_fuzz_tools()?;
    let fuzz_dir = root().join("fuzz");
    println!("== fuzz: building {} targets (nightly, sanitizer {sanitizer})", targets.len());
    run(fuzz_cargo(&fuzz_dir).args(["+nightly", "fuzz", "build", "-s", &sanitizer]))?;

    let logs = fuzz_dir.join("target/fuzz-logs");
    std::fs::create_dir_all(&logs)?;
    let mut crashed = Vec::new();
    for t in &targets {
        let growth = fuzz_dir.join("target/corpus").join(t);
        let artifacts = fuzz_dir.join("artifacts").join(t);
        std::fs::create_dir_all(&growth)?;
        std::fs::create_dir_all(&artifacts)?;
        let log = logs.join(format!("{t}.log"));
        print!("   {t:<16} {seconds:>4} s ... ");
        std::io::Write::flush(&mut std::io::stdout())?;
        // A target's dictionary (tokens of its input format), when it has one.
        let dict = fuzz_dir.join("dict").join(format!("{t}.dict"));
        let status = fuzz_cargo(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", "-s", &sanitizer, t])
            .arg(&growth)
            .arg(Path::new("corpus").join(t))
            .arg("--")
            .args(dict.is_file().then(|| format!("-dict={}", dict.display())))
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(["-timeout=30", "-print_final_stats=1"])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .status()
            .context("cannot start cargo fuzz run")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let stat = |key: &str| {
            text.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned())).unwrap_or_else(|| "?".into())
        };
        let (runs, rate) = (stat("stat::number_of_executed_units:"), stat("stat::average_exec_per_sec:"));
        if status.success() {
            println!("ok: {runs} runs, {rate} exec/s");
            continue;
        }
        let input = text
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_owned()))
            .unwrap_or_else(|| "(no input written; see the log)".into());
        println!("CRASHED after {runs} runs ({rate} exec/s)");
        // The panic (its location and message) or libFuzzer's own verdict (timeout, OOM).
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.contains("panicked at") {
                println!("      {l}");
                lines.get(i + 1).into_iter().for_each(|m| println!("      {m}"));
            } else if l.starts_with("==") && l.contains("ERROR: libFuzzer") {
                println!("      {l}");
            }
        }
        println!("      input: {input}");
        println!("      log:   {}", log.display());
        println!("      replay: cd fuzz && cargo +nightly fuzz run -s {sanitizer} {t} {input}");
        crashed.push(t.clone());
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (copy each input into fuzz/regressions/<target>/ so `cargo test` replays it)",
            crashed.join(", ")
        );
    }
    println!("== fuzz: every target ran {seconds} s without a crash");
    Ok(())
}

extern "C" {
    fn geteuid() -> u32;
}
