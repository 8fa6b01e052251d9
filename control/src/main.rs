//! The `wgxdp` command.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "wgxdp", version, about = "WireGuard-compatible VPN gateway on AF_XDP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Genkey => wgxdp_control::keys::genkey(&mut stdout),
        Command::Pubkey => wgxdp_control::keys::pubkey(&mut std::io::stdin().lock(), &mut stdout),
    }
}
