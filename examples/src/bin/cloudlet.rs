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
    /// Run the whole flow on the test guest: base, overlay (a web app), synthesis.
    Demo {
        /// Work directory (emptied first).
        #[arg(long, default_value = ".cache/demo")]
        work: PathBuf,
        /// The test guest (from scripts/build-guest.sh).
        #[arg(long, env = "CLOUDLET_GUEST_DIR", default_value = ".cache/guest")]
        guest: PathBuf,
    },
    /// Create a base VM: boot a raw disk image, prepare it, snapshot memory + disk + device
    /// state, index it.
    Base {
        /// Raw disk image (copied; never modified).
        disk: PathBuf,
        /// Kernel to boot.
        #[arg(long)]
        kernel: PathBuf,
        /// Initrd.
        #[arg(long)]
        initrd: PathBuf,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0 quiet panic=-1")]
        append: String,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        ram_mib: u64,
        /// Serial-console text that means the guest is ready.
        #[arg(long, default_value = "cloudlet-guest: ready")]
        ready: String,
        /// A shell command to run in the guest before the snapshot (repeatable).
        #[arg(long)]
        prepare: Vec<String>,
        /// Name of the base.
        #[arg(long, default_value = "base")]
        name: String,
        /// Base directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create an overlay: resume a base, customize it, capture what changed.
    Overlay {
        /// The base directory.
        #[arg(long)]
        base: PathBuf,
        /// A shell command that customizes the guest (repeatable).
        #[arg(long)]
        customize: Vec<String>,
        /// Port forward the app needs, tcp:HOST:GUEST (repeatable; HOST 0 = any).
        #[arg(long = "forward")]
        forwards: Vec<String>,
        /// The old spelling, tcp:HOST::GUEST.
        #[arg(long = "redir", short = 'r')]
        redir: Vec<String>,
        /// Compress with xz (smaller, slower) instead of zstd.
        #[arg(long)]
        xz: bool,
        /// Compression level.
        #[arg(long)]
        level: Option<i32>,
        /// Name of the app.
        #[arg(long, default_value = "app")]
        name: String,
        /// Overlay file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a custom VM from a base and an overlay and resume it.
    Synthesis {
        /// The base directory.
        #[arg(long)]
        base: PathBuf,
        /// The overlay file.
        #[arg(long)]
        overlay: PathBuf,
        /// Directory for the rebuilt VM.
        #[arg(long)]
        out: PathBuf,
        /// Guest port to probe with an HTTP GET before reporting.
        #[arg(long)]
        probe: Option<u16>,
        /// Keep the VM running until Enter is pressed.
        #[arg(long)]
        keep_running: bool,
    },
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
    use cloudlet_examples::{flows, overlay_info};
    match cli.command {
        Command::Demo { work, guest } => {
            flows::demo(&work, &guest)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Base {
            disk,
            kernel,
            initrd,
            append,
            ram_mib,
            ready,
            prepare,
            name,
            out,
        } => {
            let qemu = vm_driver::Qemu::new()?;
            let a = flows::BaseArgs {
                name,
                kernel,
                initrd,
                append,
                disk,
                ram_mib,
                ready,
                prepare,
                out,
            };
            flows::base(&qemu, &a, false)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Overlay {
            base,
            customize,
            mut forwards,
            redir,
            xz,
            level,
            name,
            out,
        } => {
            forwards.extend(redir);
            let qemu = vm_driver::Qemu::new()?;
            let a = flows::OverlayArgs {
                base,
                name,
                customize,
                forwards,
                out,
                xz,
                level,
            };
            flows::overlay(&qemu, &a, false)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Synthesis {
            base,
            overlay,
            out,
            probe,
            keep_running,
        } => {
            let qemu = vm_driver::Qemu::new()?;
            let s = flows::synth(&qemu, &base, &overlay, &out, probe, false)?;
            if keep_running {
                println!("VM running; press Enter to stop it.");
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
            }
            drop(s);
            Ok(ExitCode::SUCCESS)
        }
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
