//! The API against its own document: Schemathesis (a property-based API
//! fuzzer from PyPI, installed by `cargo xtask setup`) reads
//! `/api/v1/openapi.json` from a real `wgxdp serve` and runs every phase
//! (the document's examples, boundary coverage, random fuzzing, and the
//! stateful phase that follows the document's links from a create to the
//! gateway's other operations). Any finding fails the test: a schema-valid
//! request refused, a status code or header the document does not list, a
//! response that violates its schema, a 5xx. Its report is in the test output,
//! passing or not.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use wgxdp_integration::site::{create_api_key, ApiSite, API_LISTEN};

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

/// The fuzzer `cargo xtask test` installed (`WGXDP_SCHEMATHESIS`), else the
/// one on PATH.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("WGXDP_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| "schemathesis".into());
    let found = std::process::Command::new(&path).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "{} does not run: install it with `cargo xtask setup`", path.display());
    path
}

/// Test cases per operation and phase: `WGXDP_API_FUZZ_EXAMPLES`, default 100.
fn examples() -> String {
    std::env::var("WGXDP_API_FUZZ_EXAMPLES").unwrap_or_else(|_| "100".into())
}

/// A new seed each run (the report prints it); `WGXDP_API_FUZZ_SEED` replays one.
fn seed() -> Vec<String> {
    std::env::var("WGXDP_API_FUZZ_SEED").map(|s| vec!["--seed".to_owned(), s]).unwrap_or_default()
}

#[test]
fn the_api_keeps_its_openapi_contract_under_schemathesis() {
    let st = schemathesis();
    // Budgets high enough that the fuzzer's own volume is never refused.
    let site = ApiSite::new(
        "sf",
        "mutations_per_minute = 1000000\nreads_per_minute = 1000000\nauth_failures_per_minute = 1000000\n",
    );
    let serve = site.serve(wgxdp());
    let key = create_api_key(wgxdp(), &site.config);
    let report = site.dir.join("schemathesis");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let out = site
        .topo
        .gateway
        .command(st.to_str().expect("utf-8 path"))
        .arg("--config-file")
        .arg(tests.join("schemathesis.toml"))
        .args(["run", &format!("http://{API_LISTEN}/api/v1/openapi.json")])
        // Every check but `use_after_free`: a deleted gateway stays readable,
        // `status: deleted` (seed 000 lists `deleted` among the statuses a
        // listing filters by), where that check expects a 404.
        .args(["--checks", "all", "--exclude-checks", "use_after_free"])
        // An endless stream (Server-Sent Events): `events_e2e` tests it.
        .args(["--exclude-operation-id", "stream_events"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", &examples(), "--workers", "1", "--no-color"])
        .args(seed())
        .args(["--report", "junit", "--report-dir", report.to_str().expect("utf-8 path")])
        .env("PYTHONPATH", &tests)
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env("WGXDP_API_KEY", &key)
        .current_dir(&site.dir.0)
        .stdin(Stdio::null())
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Written past the test harness's capture: the report is in the log
    // (CI's too) whether the run passes or fails.
    let shown = format!("== Schemathesis report\n{stdout}\n{}\n", String::from_utf8_lossy(&out.stderr));
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), shown.as_bytes());
    assert!(out.status.success(), "schemathesis found problems (report above); serve said:\n{}", serve.errors());
    assert!(stdout.contains("Stateful") && stdout.contains("API Links"), "the stateful phase did not run");
    // The generated requests reached every kind of change, not only refusals.
    let log = serve.errors();
    for change in ["VPN gateway created", "VPN gateway updated", "VPN gateway deleted"] {
        assert!(log.contains(change), "no request of the run got as far as `{change}`");
    }
}
