//! Replays, through the same harness functions the libFuzzer targets run:
//! - `fuzz/corpus/<target>/*`: the committed seeds (they must never crash), and
//! - `fuzz/regressions/<target>/*`: every crashing input fuzzing has found.
//!
//! A new crash becomes a test by copying its input (the path `cargo xtask fuzz`
//! prints, under `fuzz/artifacts/<target>/`) into `fuzz/regressions/<target>/`
//! with a name that says what it hit.

use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("fuzz/");
    let dir = fuzz.join(kind).join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.filter_map(|e| Some(e.ok()?.path())).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs every input; on a panic, names the input before failing.
fn replay(kind: &str, target: &str, harness: fn(&[u8])) {
    for path in inputs(kind, target) {
        let data = std::fs::read(&path).expect("readable input");
        if std::panic::catch_unwind(|| harness(&data)).is_err() {
            panic!(
                "{target}: {} crashes (reproduce: cd fuzz && cargo +nightly fuzz run {target} {})",
                path.display(),
                path.display()
            );
        }
    }
}

macro_rules! targets {
    ($($(#[$attr:meta])* $target:ident;)*) => {
        mod corpus {
            $(#[test] fn $target() { super::replay("corpus", stringify!($target), wgxdp_fuzz_harness::$target) })*
        }
        mod regressions {
            $($(#[$attr])* #[test] fn $target() { super::replay("regressions", stringify!($target), wgxdp_fuzz_harness::$target) })*
        }
    };
}

targets! {
    wire_views;
    device_receive;
    // `split_macs` underflow on a handshake message shorter than its two MACs
    // (issue 9); the fix lands with the transport-path refactor on main.
    cookie;
    worker_loop;
    config_file;
    api_bodies;
    uapi_socket;
}

#[test]
fn every_target_has_seeds() {
    for t in ["wire_views", "device_receive", "cookie", "worker_loop", "config_file", "api_bodies", "uapi_socket"] {
        assert!(!inputs("corpus", t).is_empty(), "fuzz/corpus/{t} has no seeds (cargo xtask fuzz-seeds)");
    }
}
