//! What an operator's tooling sees of the `wgxdp` binary: JSON logs on stderr
//! (`--log-format json`, `WGXDP_LOG_FORMAT=json`, the flag winning), a clear
//! refusal of an unknown format, and the manual pages and shell completions
//! generated from the command-line definition.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wgxdp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgxdp"));
    cmd.env_remove("WGXDP_LOG_FORMAT").env_remove("WGXDP_LOG");
    cmd
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wgxdp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A configuration whose interfaces do not exist, with one `[[peer]]` without
/// `local_networks`: `serve` logs a warning (the LAN has no networks) and the
/// peer (info), then fails (the interfaces are missing), before attaching.
fn config_with_missing_interfaces(dir: &Path) -> PathBuf {
    let key = dir.join("gw.key");
    std::fs::write(&key, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = dir.join("gw.toml");
    std::fs::write(
        &config,
        format!(
            "[interface]\nwan = \"nowan0\"\nlan = \"nolan0\"\nprivate_key_file = \"{}\"\n\n\
             [[peer]]\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nallowed_ips = [\"10.20.0.0/16\"]\n",
            key.display()
        ),
    )
    .unwrap();
    config
}

/// Every stderr line, parsed as JSON; panics (showing stderr) on one that is not.
fn json_lines(out: &Output) -> Vec<Value> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.trim().is_empty(), "nothing on stderr");
    stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\nstderr:\n{stderr}")))
        .collect()
}

fn level(v: &Value) -> &str {
    v["level"].as_str().unwrap_or_else(|| panic!("no level: {v}"))
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or_else(|| panic!("no fields.message: {v}"))
}

#[test]
fn json_logs_are_one_object_per_line_including_the_final_error() {
    let scratch = Scratch::new("jsonlog");
    let config = config_with_missing_interfaces(&scratch.0);
    let out = wgxdp().args(["--log-format", "json", "serve", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success(), "serve on missing interfaces must fail");
    let events = json_lines(&out);
    for e in &events {
        assert!(e["timestamp"].is_string() && e["target"].is_string(), "{e}");
    }
    // The serve's own events, with their structured fields.
    let warn = events.iter().find(|e| level(e) == "WARN").unwrap_or_else(|| panic!("no WARN event: {events:?}"));
    assert_eq!(warn["fields"]["lan"], "nolan0", "{warn}");
    let peer = events
        .iter()
        .find(|e| level(e) == "INFO" && message(e) == "configuration peer")
        .unwrap_or_else(|| panic!("no peer event: {events:?}"));
    assert_eq!(peer["fields"]["peer"], "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "{peer}");
    // The error that ends the command is an event too, and the last line.
    let last = events.last().unwrap();
    assert_eq!(level(last), "ERROR", "{last}");
    let error = last["fields"]["error"].as_str().unwrap_or_else(|| panic!("no fields.error: {last}"));
    assert!(error.contains("nowan0") || error.contains("nolan0"), "{error}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("wgxdp: error:"), "no text line in JSON mode");
}

#[test]
fn the_environment_chooses_json_and_the_flag_wins() {
    let scratch = Scratch::new("logenv");
    let config = config_with_missing_interfaces(&scratch.0);
    let out = wgxdp().env("WGXDP_LOG_FORMAT", "json").args(["serve", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(level(json_lines(&out).last().unwrap()), "ERROR");

    // The flag (given after the subcommand: it is global) wins over the variable.
    let out = wgxdp()
        .env("WGXDP_LOG_FORMAT", "json")
        .args(["serve", "--log-format", "text", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().all(|l| serde_json::from_str::<Value>(l).is_err()), "text expected:\n{stderr}");
    assert!(stderr.lines().last().unwrap().starts_with("wgxdp: error: "), "{stderr}");
}

#[test]
fn an_unknown_format_is_refused_clearly() {
    for (flag, env) in [(Some("xml"), None), (None, Some("yaml"))] {
        let mut cmd = wgxdp();
        if let Some(f) = flag {
            cmd.args(["--log-format", f]);
        }
        if let Some(e) = env {
            cmd.env("WGXDP_LOG_FORMAT", e);
        }
        let out = cmd.arg("genkey").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "usage error expected: {stderr}");
        assert!(out.stdout.is_empty(), "nothing may run");
        let bad = flag.or(env).unwrap();
        assert!(stderr.contains(&format!("invalid value '{bad}' for '--log-format")), "{stderr}");
        assert!(stderr.contains("text") && stderr.contains("json"), "the valid values are named: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The visible subcommands of `wgxdp`.
const SUBCOMMANDS: &[&str] = &["serve", "check", "detach", "vpn", "apikey", "genkey", "pubkey"];

#[test]
fn the_manual_page_describes_every_subcommand() {
    let out = wgxdp().args(["generate", "man"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH wgxdp 8"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(page.contains(&format!("wgxdp\\-{sub}(8)")), "{sub} missing:\n{page}");
    }
    assert!(page.contains("Run the gateway"), "descriptions come from the CLI: {page}");
    assert!(page.contains("\\-\\-log\\-format"), "{page}");
    assert!(!page.contains("generate"), "the packagers' subcommand stays hidden: {page}");

    let scratch = Scratch::new("man");
    let out = wgxdp().args(["generate", "man", "--dir"]).arg(&scratch.0).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for sub in SUBCOMMANDS.iter().map(|s| format!("wgxdp-{s}.8")).chain(["wgxdp.8".into(), "wgxdp-vpn-create.8".into()])
    {
        assert!(scratch.0.join(&sub).is_file(), "{sub} not written: {}", String::from_utf8_lossy(&out.stdout));
    }
    let serve = std::fs::read_to_string(scratch.0.join("wgxdp-serve.8")).unwrap();
    assert!(serve.contains("\\-\\-config") && serve.contains("\\-\\-stats\\-every"), "{serve}");
}

#[test]
fn bash_completion_is_valid_and_completes_subcommands() {
    let scratch = Scratch::new("completion");
    let file = scratch.0.join("wgxdp.bash");
    let out = wgxdp().args(["generate", "completions", "bash"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&file, &out.stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().expect("bash is needed");
    assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));
    // Ask the function what `wgxdp se<TAB>` completes to.
    let script = format!(
        "source {}; COMP_WORDS=(wgxdp se); COMP_CWORD=1; COMP_LINE='wgxdp se'; COMP_POINT=8; _wgxdp wgxdp se wgxdp; \
         echo \"${{COMPREPLY[@]}}\"",
        file.display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "serve", "{}", String::from_utf8_lossy(&out.stderr));

    for shell in ["zsh", "fish"] {
        let out = wgxdp().args(["generate", "completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(SUBCOMMANDS.iter().all(|s| text.contains(s)), "{shell}: {text}");
    }
    let out = wgxdp().args(["generate", "completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

/// The example configuration the package installs loads as it is (with its
/// key file present) and with every commented-out setting turned on.
#[test]
fn the_example_configuration_is_valid() {
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/wgxdp.toml.example")).unwrap();
    let scratch = Scratch::new("example");
    let secret = |name: &str, text: &str| {
        let path = scratch.0.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        path.display().to_string()
    };
    let key = secret("private.key", "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n");
    let psk = secret("site-b.psk", "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=\n");
    let local = |text: &str| {
        text.replace("/etc/wgxdp/private.key", &key)
            .replace("/etc/wgxdp/site-b.psk", &psk)
            .replace("/var/lib/wgxdp/wgxdp.db", &scratch.0.join("wgxdp.db").display().to_string())
            .replace("base64 public key of the remote site", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=")
    };
    let load = |name: &str, text: &str| {
        let path = scratch.0.join(name);
        std::fs::write(&path, text).unwrap();
        wgxdp_control::config::Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"))
    };
    let as_shipped = load("as-shipped.toml", &local(&example));
    assert_eq!((as_shipped.wan.as_str(), as_shipped.lan.as_str(), as_shipped.listen_port), ("eth0", "eth1", 51820));
    assert!(as_shipped.peers.is_empty() && as_shipped.api.is_some());

    // `# key = value` and `# [[table]]` lines uncommented: every setting on.
    let everything: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with("[[")
                    || rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
            {
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .map(|l| l + "\n")
        .collect();
    let all = load("everything.toml", &local(&everything));
    assert_eq!(all.peers.len(), 1, "{everything}");
    assert_eq!((all.queues, all.cores.as_slice(), all.busy_poll), (Some(2), &[2, 3][..], false));
    assert!(all.api.unwrap().metrics_listen.is_some());
}
