//! `cloudlet`: build base VMs, capture overlays, synthesize custom VMs.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cloudlet",
    version,
    about = "VM synthesis: base VM + overlay -> running custom VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
