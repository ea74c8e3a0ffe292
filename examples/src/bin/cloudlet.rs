//! `cloudlet`: build base VMs, capture overlays, synthesize custom VMs.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cloudlet",
    version,
    about = "VM synthesis: base VM + overlay -> running custom VM",
    long_about = "VM synthesis: a cloudlet keeps base VMs (disk + memory snapshot); an overlay \
                  carries only what a custom VM changed (disk blocks, memory pages, device \
                  state), deduplicated and compressed; synthesis rebuilds the custom VM from \
                  base + overlay and resumes it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what an overlay holds: base id, VM spec, images, sizes by record kind, digests.
    ///
    /// Exit codes: 0 readable, 2 damaged (the damage is printed), 1 other errors.
    OverlayInfo {
        /// The overlay file.
        file: PathBuf,
        /// Strict check: also validate every record against the images; print a verdict.
        #[arg(long)]
        verify: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cloudlet: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    use cloudlet_examples::overlay_info;
    match cli.command {
        Command::OverlayInfo { file, verify, json } => {
            let (info, err) = overlay_info::inspect(&file, verify)
                .with_context(|| format!("cannot open {}", file.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", overlay_info::render(&info));
            }
            if err.is_some() {
                if !json {
                    eprintln!("cloudlet: {} is damaged", file.display());
                }
                return Ok(ExitCode::from(2));
            }
            if verify && !json {
                println!(
                    "verify         OK: every frame checksum, record and trailer count checked"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
