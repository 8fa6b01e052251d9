//! `wgxdp vpn …`: the API's command-line client. Tables for people by
//! default, the API's JSON with `--json` for scripts. The URL and key come
//! from flags or `WGXDP_API_URL` / `WGXDP_API_KEY`; secrets (the API key, a
//! pre-shared key) can also come from a file or stdin (`--api-key-file -`,
//! `--psk-file PATH`), so they need not appear in argv or the shell history.

use crate::secret::SecretString;
use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ApiClientArgs {
    /// Base URL of the gateway's API.
    #[arg(long, env = "WGXDP_API_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub api_url: String,
    /// API key (create one with `wgxdp apikey create`). Prefer the env or --api-key-file: argv is visible to other users.
    #[arg(long, env = "WGXDP_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<SecretString>,
    /// Read the API key from this file, or from stdin with `-`.
    #[arg(long, value_name = "PATH|-", global = true, conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum VpnCommand {
    /// List VPN gateways (every page).
    List {
        /// creating | active | deleting | deleted
        #[arg(long)]
        status: Option<String>,
        /// name | created_at
        #[arg(long)]
        sort: Option<String>,
        /// asc | desc
        #[arg(long)]
        order: Option<String>,
    },
    /// Create a VPN gateway for a remote WireGuard site.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        region: String,
        #[arg(long, default_value = "wireguard")]
        tunnel_type: String,
        /// The remote site's network, e.g. 10.1.0.0/16.
        #[arg(long = "remote-cidr")]
        remote_cidr: String,
        /// The remote peer's public IP.
        #[arg(long = "remote-ip")]
        remote_ip: String,
        /// The remote peer's WireGuard public key.
        #[arg(long = "remote-public-key")]
        remote_public_key: String,
        #[arg(long = "remote-port")]
        remote_port: Option<u16>,
        /// Pre-shared key (base64); generated when omitted.
        #[arg(long)]
        psk: Option<SecretString>,
        /// Read the pre-shared key from this file, or from stdin with `-`.
        #[arg(long, alias = "pre-shared-key-file", value_name = "PATH|-", conflicts_with = "psk")]
        psk_file: Option<PathBuf>,
        /// This site's network (default: the gateway's configured site CIDR).
        #[arg(long = "local-cidr")]
        local_cidr: Option<String>,
        /// Persistent keepalive, seconds.
        #[arg(long)]
        keepalive: Option<u16>,
    },
    /// Show one VPN gateway.
    Get { id: String },
    /// Change a VPN gateway; the running tunnel follows.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "remote-cidr")]
        remote_cidr: Option<String>,
        #[arg(long = "remote-ip")]
        remote_ip: Option<String>,
        #[arg(long = "remote-port")]
        remote_port: Option<u16>,
        /// Rotate the pre-shared key.
        #[arg(long)]
        psk: Option<SecretString>,
        /// Read the new pre-shared key from this file, or from stdin with `-`.
        #[arg(long, alias = "pre-shared-key-file", value_name = "PATH|-", conflicts_with = "psk")]
        psk_file: Option<PathBuf>,
        #[arg(long)]
        keepalive: Option<u16>,
    },
    /// Delete a VPN gateway (its tunnel stops).
    Delete { id: String },
    /// Live tunnel status.
    Status { id: String },
    /// The wg-quick configuration for the remote site.
    Config { id: String },
}

/// Where secrets come from: files, or (once) stdin.
pub struct SecretInput<'a> {
    stdin: &'a mut dyn Read,
    stdin_used: bool,
}

impl std::fmt::Debug for SecretInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretInput").field("stdin_used", &self.stdin_used).finish_non_exhaustive()
    }
}

impl<'a> SecretInput<'a> {
    pub fn new(stdin: &'a mut dyn Read) -> Self {
        Self { stdin, stdin_used: false }
    }

    /// The secret in `path` (`-`: stdin), surrounding whitespace removed.
    pub fn read(&mut self, path: &Path, what: &str) -> anyhow::Result<SecretString> {
        let mut text = zeroize::Zeroizing::new(String::new());
        if path == Path::new("-") {
            if self.stdin_used {
                bail!("only one secret can be read from stdin (`-`); put the {what} in a file");
            }
            self.stdin_used = true;
            self.stdin
                .take(4096)
                .read_to_string(&mut text)
                .with_context(|| format!("cannot read the {what} from stdin"))?;
        } else {
            std::fs::File::open(path)
                .and_then(|f| f.take(4096).read_to_string(&mut text))
                .with_context(|| format!("cannot read the {what} from {}", path.display()))?;
        }
        let secret = text.trim();
        if secret.is_empty() {
            bail!(
                "the {what} in {} is empty",
                if path == Path::new("-") { "stdin".into() } else { path.display().to_string() }
            );
        }
        Ok(SecretString::new(secret.to_owned()))
    }

    /// `value`, else the contents of `file`.
    fn either(
        &mut self,
        value: Option<SecretString>,
        file: Option<&Path>,
        what: &str,
    ) -> anyhow::Result<Option<SecretString>> {
        match (value, file) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(p)) => self.read(p, what).map(Some),
            (None, None) => Ok(None),
        }
    }
}

struct Client {
    base: String,
    key: SecretString,
}

impl Client {
    fn new(args: &ApiClientArgs, input: &mut SecretInput<'_>) -> anyhow::Result<Self> {
        let key = input.either(args.api_key.clone(), args.api_key_file.as_deref(), "API key")?.ok_or_else(|| {
            anyhow!(
                "no API key: pass --api-key-file, set WGXDP_API_KEY or pass --api-key \
                 (create one with `wgxdp apikey create`)"
            )
        })?;
        Ok(Self { base: args.api_url.trim_end_matches('/').to_owned(), key })
    }

    /// Sends a request; API errors become their message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<ureq::Response> {
        let url = format!("{}{path}", self.base);
        let req = ureq::request(method, &url).set("Authorization", &format!("Bearer {}", self.key.expose()));
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match result {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                bail!("{msg} (HTTP {code})")
            }
            Err(e) => Err(anyhow!(
                "cannot reach the API at {}: {e} (is `wgxdp serve` running with an [api] section?)",
                self.base
            )),
        }
    }

    fn json(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call(method, path, body)?.into_json().context("the API answered with invalid JSON")
    }
}

fn insert_some(m: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(key.into(), v);
    }
}

pub fn run(cmd: VpnCommand, args: &ApiClientArgs, out: &mut impl Write) -> anyhow::Result<()> {
    run_with_input(cmd, args, &mut SecretInput::new(&mut std::io::stdin().lock()), out)
}

/// As `run`, with secrets given as `-` read from `input`.
pub fn run_with_input(
    cmd: VpnCommand,
    args: &ApiClientArgs,
    input: &mut SecretInput<'_>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let client = Client::new(args, input)?;
    let base = "/api/v1/vpn-gateways";
    match cmd {
        VpnCommand::List { status, sort, order } => {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut q: Vec<(&str, String)> = vec![("limit", "100".into())];
                q.extend(status.clone().map(|s| ("status", s)));
                q.extend(sort.clone().map(|s| ("sort", s)));
                q.extend(order.clone().map(|s| ("order", s)));
                q.extend(cursor.clone().map(|c| ("cursor", c)));
                let qs = serde_urlencoded::to_string(&q).unwrap_or_default();
                let page = client.json("GET", &format!("{base}?{qs}"), None)?;
                all.extend(page["data"].as_array().cloned().unwrap_or_default());
                cursor = page["meta"]["next_cursor"].as_str().map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&Value::Array(all))?)?;
            } else {
                print_table(out, &all)?;
            }
        }
        VpnCommand::Create {
            name,
            region,
            tunnel_type,
            remote_cidr,
            remote_ip,
            remote_public_key,
            remote_port,
            psk,
            psk_file,
            local_cidr,
            keepalive,
        } => {
            let psk = input.either(psk, psk_file.as_deref(), "pre-shared key")?;
            let mut body = json!({
                "name": name, "region": region, "tunnel_type": tunnel_type,
                "remote_network_cidr": remote_cidr, "remote_peer_ip": remote_ip,
                "remote_public_key": remote_public_key,
            });
            let m = body.as_object_mut().expect("object");
            insert_some(m, "remote_peer_port", remote_port.map(Value::from));
            insert_some(m, "pre_shared_key", psk.map(|k| Value::from(k.expose())));
            insert_some(m, "local_network_cidr", local_cidr.map(Value::from));
            insert_some(m, "persistent_keepalive", keepalive.map(Value::from));
            let v = client.json("POST", base, Some(body))?;
            print_object(out, &v, args.json)?;
            if !args.json {
                writeln!(out, "\nThe pre-shared key is shown only now; store it for the remote side.")?;
            }
        }
        VpnCommand::Get { id } => print_object(out, &client.json("GET", &format!("{base}/{id}"), None)?, args.json)?,
        VpnCommand::Update { id, name, remote_cidr, remote_ip, remote_port, psk, psk_file, keepalive } => {
            let psk = input.either(psk, psk_file.as_deref(), "pre-shared key")?;
            let mut m = Map::new();
            insert_some(&mut m, "name", name.map(Value::from));
            insert_some(&mut m, "remote_network_cidr", remote_cidr.map(Value::from));
            insert_some(&mut m, "remote_peer_ip", remote_ip.map(Value::from));
            insert_some(&mut m, "remote_peer_port", remote_port.map(Value::from));
            insert_some(&mut m, "pre_shared_key", psk.map(|k| Value::from(k.expose())));
            insert_some(&mut m, "persistent_keepalive", keepalive.map(Value::from));
            if m.is_empty() {
                bail!("nothing to update: pass at least one of --name, --remote-cidr, --remote-ip, --remote-port, --psk, --keepalive");
            }
            let v = client.json("PATCH", &format!("{base}/{id}"), Some(Value::Object(m)))?;
            print_object(out, &v, args.json)?;
        }
        VpnCommand::Delete { id } => {
            print_object(out, &client.json("DELETE", &format!("{base}/{id}"), None)?, args.json)?
        }
        VpnCommand::Status { id } => {
            print_object(out, &client.json("GET", &format!("{base}/{id}/status"), None)?, args.json)?
        }
        VpnCommand::Config { id } => {
            let text = client.call("GET", &format!("{base}/{id}/config"), None)?.into_string()?;
            write!(out, "{text}")?;
        }
    }
    Ok(())
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_object(out: &mut impl Write, v: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
        return Ok(());
    }
    let data = v["data"].as_object().cloned().unwrap_or_default();
    let width = data.keys().map(String::len).max().unwrap_or(0);
    for (k, val) in &data {
        writeln!(out, "{k:<width$}  {}", cell(val))?;
    }
    Ok(())
}

fn print_table(out: &mut impl Write, rows: &[Value]) -> anyhow::Result<()> {
    const COLUMNS: [&str; 6] = ["id", "name", "status", "remote_network_cidr", "tunnel_status", "last_handshake"];
    let cells: Vec<Vec<String>> = rows.iter().map(|r| COLUMNS.iter().map(|c| cell(&r[*c])).collect()).collect();
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(COLUMNS.iter().map(|c| c.to_uppercase()).collect()))?;
    for r in cells {
        writeln!(out, "{}", line(r))?;
    }
    writeln!(out, "{} gateway(s)", rows.len())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        client: ApiClientArgs,
        #[command(subcommand)]
        command: VpnCommand,
    }

    const PSK: &str = "sjIbzf0fbRgxz3s0hK2wPgl8g2Gh5d7g2xSpKBs1Ots=";
    const KEY: &str = "wgxdp_s3cr3t-api-key";

    fn parse(args: &[&str]) -> TestCli {
        TestCli::try_parse_from([&["wgxdp"], args].concat()).unwrap()
    }

    #[test]
    fn parsed_secrets_are_redacted_in_debug() {
        let cli = parse(&["--api-key", KEY, "update", "vpn_x", "--psk", PSK]);
        let shown = format!("{cli:?}");
        assert!(!shown.contains(KEY) && !shown.contains(PSK), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn secrets_from_a_file_or_stdin() {
        let dir = std::env::temp_dir().join(crate::store::random_id("wgxdp-cli-"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("psk");
        std::fs::write(&file, format!("  {PSK}\n")).unwrap();
        let mut stdin: &[u8] = b"wgxdp_from-stdin\n";
        let mut input = SecretInput::new(&mut stdin);
        let cli = parse(&["--api-key-file", "-", "update", "vpn_x", "--pre-shared-key-file", file.to_str().unwrap()]);
        let client = Client::new(&cli.client, &mut input).unwrap();
        assert_eq!(client.key.expose(), "wgxdp_from-stdin");
        let VpnCommand::Update { psk, psk_file, .. } = cli.command else { panic!("update") };
        let psk = input.either(psk, psk_file.as_deref(), "pre-shared key").unwrap().unwrap();
        assert_eq!(psk.expose(), PSK);
        // stdin once only; empty and missing files are clear errors.
        let err = input.read(Path::new("-"), "pre-shared key").unwrap_err().to_string();
        assert!(err.contains("only one secret"), "{err}");
        std::fs::write(&file, "\n").unwrap();
        let err = input.read(&file, "pre-shared key").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let err = input.read(&dir.join("missing"), "API key").unwrap_err().to_string();
        assert!(err.contains("cannot read the API key") && err.contains("missing"), "{err}");
        // A flag and a file for the same secret conflict.
        assert!(TestCli::try_parse_from(["wgxdp", "--api-key", KEY, "--api-key-file", "-", "list"]).is_err());
        let both = [
            "wgxdp",
            "create",
            "--name",
            "n",
            "--region",
            "r",
            "--remote-cidr",
            "10.0.0.0/8",
            "--remote-ip",
            "192.0.2.1",
            "--remote-public-key",
            "k",
            "--psk",
            PSK,
            "--psk-file",
            "-",
        ];
        assert!(TestCli::try_parse_from(both).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
