//! Embeds the XDP object in the `wgxdp` binary. The object is built with the
//! nightly toolchain for bpfel-unknown-none (`cargo xtask build-ebpf` does the
//! same); this script reuses a fresh build and otherwise builds it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn newest(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let m = if p.is_dir() { newest(&p) } else { e.metadata().and_then(|m| m.modified()).unwrap_or(t) };
            t = t.max(m);
        }
    }
    t
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf = manifest.parent().expect("control/ is inside the workspace").join("ebpf");
    for p in ["src", "common/src", "Cargo.toml", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    let object = ebpf.join("target/bpfel-unknown-none/release/wgxdp");
    let sources = newest(&ebpf.join("src")).max(newest(&ebpf.join("common/src")));
    let fresh = object.metadata().and_then(|m| m.modified()).map(|t| t >= sources).unwrap_or(false);
    if !fresh {
        let home = std::env::var("HOME").unwrap_or_default();
        let rustup = Path::new(&home).join(".cargo/bin/rustup");
        let rustup = if rustup.exists() { rustup } else { PathBuf::from("rustup") };
        let path = format!("/usr/lib/llvm-22/bin:{home}/.cargo/bin:{}", std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new(rustup);
        cmd.current_dir(&ebpf).env("PATH", path).args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ]);
        // Pinned: the object is read from ebpf/target below, whatever the
        // outer build's CARGO_TARGET_DIR (removed with the rest just after).
        cmd.arg(ebpf.join("target"));
        // The outer build's toolchain and flags must not leak into the BPF build.
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO") || k.starts_with("RUST") {
                cmd.env_remove(k);
            }
        }
        let status = cmd.status();
        if !matches!(status, Ok(s) if s.success()) {
            panic!(
                "building the XDP program failed ({status:?}); run `cargo xtask setup` to install the nightly \
                 rust-src component and bpf-linker"
            );
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("wgxdp.bpf.o");
    std::fs::copy(&object, &out).expect("copy the XDP object");
}
