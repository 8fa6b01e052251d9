//! The `wgxdp` command.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "wgxdp", version, about = "WireGuard-compatible VPN gateway on AF_XDP")]
struct Cli {
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
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WGXDP_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let result = match cli.command {
        Command::Serve { config, stats_every } => {
            drop(stdout);
            wgxdp_control::serve::serve(&config, stats_every.map(Duration::from_secs))
        }
        Command::Genkey => wgxdp_control::keys::genkey(&mut stdout),
        Command::Pubkey => wgxdp_control::keys::pubkey(&mut std::io::stdin().lock(), &mut stdout),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wgxdp: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
