//! The `wgxdp` command.

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use wgxdp_control::logging::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(name = "wgxdp", version, about = "WireGuard-compatible VPN gateway on AF_XDP")]
struct Cli {
    /// How log events are written to stderr: `text`, or `json` (one object
    /// per line, for log shippers; the final error too).
    #[arg(long, global = true, value_enum, env = logging::FORMAT_ENV, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (XDP on both NICs, one worker per queue) until SIGINT/SIGTERM.
    Serve {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print counters every N seconds (they are always printed on exit).
        #[arg(long, value_name = "SECONDS")]
        stats_every: Option<u64>,
    },
    /// Remove wgxdp's XDP programs left on the configuration's WAN and LAN
    /// interfaces (after a crash; a running `serve` removes its own when it
    /// stops). Other tools' programs are left alone unless `--force`.
    Detach {
        /// The TOML configuration file (only its interfaces are read).
        #[arg(long, short)]
        config: PathBuf,
        /// Also remove XDP programs that are not wgxdp's (another tool's).
        #[arg(long)]
        force: bool,
    },
    /// Check a configuration and the NICs it names without attaching
    /// anything: one line per check (ok, warning, error); fails on any error.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage VPN gateways through the API (`wgxdp vpn --help`).
    Vpn {
        #[command(flatten)]
        client: Box<wgxdp_control::cli::ApiClientArgs>,
        #[command(subcommand)]
        command: wgxdp_control::cli::VpnCommand,
    },
    /// Manage API keys in the gateway's database (run on the gateway host).
    Apikey {
        /// The gateway's configuration file (its [api] section names the database).
        #[arg(long, short, global = true, default_value = "/etc/wgxdp/wgxdp.toml")]
        config: PathBuf,
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
    /// Write the manual pages or a shell completion script (for packagers).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Subcommand, Debug)]
enum Generate {
    /// The manual page wgxdp(8) on stdout, or with `--dir` one page per
    /// subcommand too (wgxdp-serve.8, ...), written into that directory.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// The completion script for a shell on stdout.
    Completions { shell: clap_complete::Shell },
}

fn generate(what: Generate, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    use anyhow::Context;
    match what {
        Generate::Man { dir: None } => wgxdp_control::generate::man_page(Cli::command(), out)?,
        Generate::Man { dir: Some(dir) } => {
            for page in wgxdp_control::generate::man_pages(Cli::command(), &dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?
            {
                writeln!(out, "{}", page.display())?;
            }
        }
        Generate::Completions { shell } => wgxdp_control::generate::completions(shell, Cli::command(), out),
    }
    Ok(())
}

use wgxdp_control::store::Scope;

#[derive(Subcommand, Debug)]
enum ApiKeyCommand {
    /// Create a key and print it (once; only its hash is stored).
    Create {
        #[arg(long, default_value = "default")]
        name: String,
        /// `read`: every GET, no writes; `admin`: everything (writes, the audit log).
        #[arg(long, default_value = "admin", value_parser = parse_scope)]
        scope: Scope,
    },
    /// List keys (ids, names and scopes, never the secrets).
    List,
    /// Revoke a key by id.
    Revoke { id: String },
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    Scope::parse(s).ok_or_else(|| format!("`{s}` is not a scope: read or admin"))
}

fn apikey(config: &std::path::Path, command: ApiKeyCommand, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let cfg = wgxdp_control::config::Config::load(config)?;
    let api = cfg.api.ok_or_else(|| anyhow::anyhow!("{} has no [api] section", config.display()))?;
    let store = wgxdp_control::store::Store::open_at(&api.store)?;
    match command {
        ApiKeyCommand::Create { name, scope } => {
            let (info, secret) = store.create_api_key(&name, scope)?;
            writeln!(out, "{}", secret.expose())?;
            eprintln!("created API key {} ({name}, scope {}); it is shown only now", info.id, scope.as_str());
        }
        ApiKeyCommand::List => {
            for k in store.list_api_keys()? {
                let created = wgxdp_control::api::model::rfc3339_millis(k.created_at);
                writeln!(out, "{}  {}  {}  {created}", k.id, k.scope.as_str(), k.name)?;
            }
        }
        ApiKeyCommand::Revoke { id } => {
            if !store.revoke_api_key(&id)? {
                anyhow::bail!("no API key with id {id}");
            }
            writeln!(out, "revoked {id}")?;
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let mut stdout = std::io::stdout().lock();
    let result = match cli.command {
        Command::Serve { config, stats_every } => {
            drop(stdout);
            wgxdp_control::serve::serve(&config, stats_every.map(Duration::from_secs))
        }
        Command::Detach { config, force } => wgxdp_control::serve::detach(&config, force, &mut stdout),
        Command::Check { config } => wgxdp_control::check::check(&config, &mut stdout),
        Command::Vpn { client, command } => wgxdp_control::cli::run(command, &client, &mut stdout),
        Command::Apikey { config, command } => apikey(&config, command, &mut stdout),
        Command::Genkey => wgxdp_control::keys::genkey(&mut stdout),
        Command::Pubkey => wgxdp_control::keys::pubkey(&mut std::io::stdin().lock(), &mut stdout),
        Command::Generate { what } => generate(what, &mut stdout),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            logging::report_error(cli.log_format, &format!("{e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
