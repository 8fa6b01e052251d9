//! `wgxdp vpn …`: the API's command-line client. Tables for people by
//! default, the API's JSON with `--json` for scripts. The URL and key come
//! from flags or `WGXDP_API_URL` / `WGXDP_API_KEY`; secrets (the API key, a
//! pre-shared key) can also come from a file or stdin (`--api-key-file -`,
//! `--psk-file PATH`), so they need not appear in argv or the shell history.

use crate::firewall::FirewallRuleText;
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
        #[command(flatten)]
        policy: Box<PolicyArgs>,
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
        #[command(flatten)]
        policy: Box<PolicyArgs>,
        /// Remove every additional remote network.
        #[arg(long, conflicts_with = "additional_remote_cidr")]
        clear_additional_remote_cidrs: bool,
        /// Remove every additional local network.
        #[arg(long, conflicts_with = "additional_local_cidr")]
        clear_additional_local_cidrs: bool,
        /// Remove every firewall rule.
        #[arg(long, conflicts_with = "firewall_rule")]
        clear_firewall: bool,
    },
    /// Delete a VPN gateway (its tunnel stops).
    Delete { id: String },
    /// Live tunnel status.
    Status { id: String },
    /// The wg-quick configuration for the remote site.
    Config { id: String },
}

/// Networks and firewall of a gateway, for `create` and `update`.
#[derive(Args, Debug, Default)]
pub struct PolicyArgs {
    /// Another remote network routed into the tunnel (repeatable; on update,
    /// the ones given replace the list).
    #[arg(long = "additional-remote-cidr", value_name = "CIDR")]
    pub additional_remote_cidr: Vec<String>,
    /// Another local network the remote site may reach (repeatable; on
    /// update, the ones given replace the list).
    #[arg(long = "additional-local-cidr", value_name = "CIDR")]
    pub additional_local_cidr: Vec<String>,
    /// A firewall rule on traffic from the remote site, as KEY=VALUE pairs
    /// separated by commas: name and protocol (tcp|udp|icmp|any) required;
    /// port (N or N-M, tcp/udp), source, destination (CIDR) and action
    /// (allow|deny, default allow) optional, e.g.
    /// 'name=ssh,protocol=tcp,port=22,source=10.1.0.0/16,action=deny'.
    /// Repeatable: evaluated in the order given, first match wins; on update,
    /// the rules given replace every rule.
    #[arg(long = "firewall-rule", value_name = "RULE", value_parser = parse_firewall_rule)]
    pub firewall_rule: Vec<FirewallRuleText>,
    /// What happens to traffic from the remote site no rule matches.
    #[arg(long = "firewall-default", value_parser = ["allow", "deny"])]
    pub firewall_default: Option<String>,
}

/// The keys of a `--firewall-rule`.
const RULE_KEYS: [&str; 6] = ["name", "protocol", "port", "source", "destination", "action"];

/// A `--firewall-rule` value (`name=ssh,protocol=tcp,port=22`), checked as
/// the API checks rules. A name cannot contain `,`.
pub fn parse_firewall_rule(text: &str) -> Result<FirewallRuleText, String> {
    let mut rule = FirewallRuleText::default();
    for item in text.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not KEY=VALUE (keys: {})", RULE_KEYS.join(", ")))?;
        let slot = match key.trim() {
            "name" => &mut rule.name,
            "protocol" => &mut rule.protocol,
            "port" => &mut rule.port,
            "source" => &mut rule.source,
            "destination" => &mut rule.destination,
            "action" => &mut rule.action,
            other => return Err(format!("unknown key `{other}` (keys: {})", RULE_KEYS.join(", "))),
        };
        if slot.is_some() {
            return Err(format!("`{}` is given twice", key.trim()));
        }
        *slot = Some(value.trim().to_owned());
    }
    rule.to_rule().map_err(|e| e.to_string())?;
    Ok(rule)
}

impl PolicyArgs {
    /// Adds the fields given to a request body.
    fn insert_into(self, m: &mut Map<String, Value>) -> anyhow::Result<()> {
        if !self.additional_remote_cidr.is_empty() {
            m.insert("additional_remote_network_cidrs".into(), Value::from(self.additional_remote_cidr));
        }
        if !self.additional_local_cidr.is_empty() {
            m.insert("additional_local_network_cidrs".into(), Value::from(self.additional_local_cidr));
        }
        if !self.firewall_rule.is_empty() {
            m.insert("firewall".into(), serde_json::to_value(self.firewall_rule)?);
        }
        insert_some(m, "firewall_default", self.firewall_default.map(Value::from));
        Ok(())
    }
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
            policy,
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
            policy.insert_into(m)?;
            let v = client.json("POST", base, Some(body))?;
            print_object(out, &v, args.json)?;
            if !args.json {
                writeln!(out, "\nThe pre-shared key is shown only now; store it for the remote side.")?;
            }
        }
        VpnCommand::Get { id } => print_object(out, &client.json("GET", &format!("{base}/{id}"), None)?, args.json)?,
        VpnCommand::Update {
            id,
            name,
            remote_cidr,
            remote_ip,
            remote_port,
            psk,
            psk_file,
            keepalive,
            policy,
            clear_additional_remote_cidrs,
            clear_additional_local_cidrs,
            clear_firewall,
        } => {
            let psk = input.either(psk, psk_file.as_deref(), "pre-shared key")?;
            let mut m = Map::new();
            insert_some(&mut m, "name", name.map(Value::from));
            insert_some(&mut m, "remote_network_cidr", remote_cidr.map(Value::from));
            insert_some(&mut m, "remote_peer_ip", remote_ip.map(Value::from));
            insert_some(&mut m, "remote_peer_port", remote_port.map(Value::from));
            insert_some(&mut m, "pre_shared_key", psk.map(|k| Value::from(k.expose())));
            insert_some(&mut m, "persistent_keepalive", keepalive.map(Value::from));
            policy.insert_into(&mut m)?;
            for (clear, key) in [
                (clear_additional_remote_cidrs, "additional_remote_network_cidrs"),
                (clear_additional_local_cidrs, "additional_local_network_cidrs"),
                (clear_firewall, "firewall"),
            ] {
                if clear {
                    m.insert(key.into(), json!([]));
                }
            }
            if m.is_empty() {
                bail!(
                    "nothing to update: pass at least one of --name, --remote-cidr, --remote-ip, --remote-port, \
                     --psk, --keepalive, --additional-remote-cidr, --additional-local-cidr, --firewall-rule, \
                     --firewall-default, --clear-additional-remote-cidrs, --clear-additional-local-cidrs, \
                     --clear-firewall"
                );
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
    fn firewall_rules_and_networks_become_the_request_fields() {
        let cli = parse(&[
            "create",
            "--name",
            "n",
            "--region",
            "r",
            "--remote-cidr",
            "10.1.0.0/16",
            "--remote-ip",
            "192.0.2.1",
            "--remote-public-key",
            "k",
            "--additional-remote-cidr",
            "10.2.0.0/16",
            "--additional-remote-cidr",
            "fd01::/64",
            "--additional-local-cidr",
            "10.51.0.0/24",
            "--firewall-rule",
            "name=ssh,protocol=tcp,port=22,source=10.1.0.0/16,destination=10.50.0.0/24,action=deny",
            "--firewall-rule",
            "name=Allow ICMP, protocol=icmp, port=1-65535",
            "--firewall-default",
            "deny",
        ]);
        let VpnCommand::Create { policy, .. } = cli.command else { panic!("create") };
        let mut m = Map::new();
        policy.insert_into(&mut m).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({
                "additional_remote_network_cidrs": ["10.2.0.0/16", "fd01::/64"],
                "additional_local_network_cidrs": ["10.51.0.0/24"],
                "firewall": [
                    {"name": "ssh", "protocol": "tcp", "port": "22", "source": "10.1.0.0/16",
                     "destination": "10.50.0.0/24", "action": "deny"},
                    {"name": "Allow ICMP", "protocol": "icmp", "port": "1-65535"}
                ],
                "firewall_default": "deny"
            }),
            "in the order given"
        );
        // On update, --clear-firewall sends an empty list and conflicts with --firewall-rule.
        let cli = parse(&["update", "vpn_x", "--clear-firewall", "--firewall-default", "allow"]);
        let VpnCommand::Update { clear_firewall, policy, .. } = cli.command else { panic!("update") };
        assert!(clear_firewall && policy.firewall_rule.is_empty());
        let both = ["wgxdp", "update", "vpn_x", "--clear-firewall", "--firewall-rule", "name=a,protocol=any"];
        assert!(TestCli::try_parse_from(both).is_err());
    }

    #[test]
    fn a_bad_firewall_rule_names_the_flag_the_item_and_the_fault() {
        for (rule, says) in [
            ("name=ssh,protocol=tcp,port=0", "port: `0` is not a port or range"),
            ("name=ssh,protocol=gre", "protocol: `gre` is not a protocol; use tcp, udp, icmp or any"),
            ("protocol=tcp", "name: is required"),
            ("name=ping,protocol=icmp,port=22", "icmp rules match no ports"),
            ("name=x,protocol=tcp,source=10.1.2.3/16", "did you mean 10.1.0.0/16"),
            ("name=x,protocol=tcp,action=drop", "allow or deny"),
            ("name=x,protocol=tcp,colour=red", "unknown key `colour`"),
            ("name=x,protocol=tcp,port=22,port=23", "`port` is given twice"),
            ("name=x,protocol=tcp,22", "`22` is not KEY=VALUE"),
            ("name=x,protocol=tcp,", "`` is not KEY=VALUE"),
        ] {
            let args = ["wgxdp", "update", "vpn_x", "--firewall-rule", "name=ok,protocol=any", "--firewall-rule", rule];
            let err = TestCli::try_parse_from(args).unwrap_err().to_string();
            assert!(err.contains("--firewall-rule") && err.contains(rule), "{rule}: {err}");
            assert!(err.contains(says), "{rule}: `{err}` lacks `{says}`");
        }
        let err = TestCli::try_parse_from(["wgxdp", "update", "vpn_x", "--firewall-default", "drop"]).unwrap_err();
        assert!(err.to_string().contains("--firewall-default"), "{err}");
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
