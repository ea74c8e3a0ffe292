//! `cloudlet`: build base VMs, capture overlays, synthesize custom VMs.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloudlet_examples::exit;

#[derive(Parser)]
#[command(
    name = "cloudlet",
    version,
    about = "VM synthesis: base VM + overlay -> running custom VM",
    long_about = "VM synthesis. A cloudlet keeps base VMs (disk + memory snapshot + device state) in a \
                  registry. An overlay carries only what a custom VM changed (disk blocks, memory pages, \
                  device state), deduplicated and compressed. Synthesis rebuilds the custom VM from base + \
                  overlay and resumes it.\n\n\
                  The flow:\n  \
                  cloudlet base --name deb --kernel vmlinuz --initrd initrd.img disk.raw\n  \
                  cloudlet overlay --base deb --customize 'httpd -p 8080 -h /www' --forward tcp:8080:8080 --out app.overlay\n  \
                  cloudlet synthesis --overlay app.overlay --out vms/app --probe 8080 --keep-running\n\n\
                  Over the network:\n  \
                  cloudlet serve --listen 127.0.0.1:7878\n  \
                  cloudlet client --server http://127.0.0.1:7878 --overlay app.overlay --probe 8080\n\n\
                  `cloudlet demo` runs base, overlay and synthesis on the test guest.",
    after_help = cloudlet_examples::exit::TABLE
)]
struct Cli {
    /// The base registry directory (default: $CLOUDLET_REGISTRY, else $XDG_DATA_HOME/cloudlet/bases).
    #[arg(long, global = true)]
    registry: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole flow on the test guest: base, overlay (a web app), synthesis.
    Demo {
        /// Work directory (holds its own registry; emptied first if an earlier demo made it,
        /// refused if it holds anything else).
        #[arg(long, default_value = ".cache/demo")]
        work: PathBuf,
        /// The test guest (from scripts/build-guest.sh).
        #[arg(long, env = "CLOUDLET_GUEST_DIR", default_value = ".cache/guest")]
        guest: PathBuf,
        /// Run the demo on the Debian guest instead (from scripts/build-debian-guest.sh):
        /// systemd booted from its own disk by its bootloader, 1 GiB of RAM; minutes under TCG.
        #[arg(long)]
        debian: bool,
        /// The Debian guest's directory, with --debian.
        #[arg(long, env = "CLOUDLET_DEBIAN_DIR", default_value = ".cache/debian")]
        debian_dir: PathBuf,
    },
    /// Create a base VM: boot disk images (raw or qcow2; by their own bootloader, or a
    /// kernel), wait until the guest is ready, prepare it, snapshot memory + disks + device
    /// state, index it, register it.
    Base(cloudlet_examples::flows::BaseArgs),
    /// List the registered bases.
    ListBase {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Recompute a base's digests; names every damaged file (exit 3 when damaged).
    VerifyBase {
        /// Name, id, or unique id prefix.
        base: String,
    },
    /// Remove a base from the registry.
    RmBase {
        /// Name, id, or unique id prefix.
        base: String,
    },
    /// Write a base to one portable file.
    ExportBase {
        /// Name, id, or unique id prefix.
        base: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Import a base written by export-base (every digest and the id are checked).
    ImportBase {
        /// The export file.
        file: PathBuf,
    },
    /// Create an overlay: resume a base, customize it, capture what changed.
    Overlay(cloudlet_examples::flows::OverlayArgs),
    /// Rebuild a custom VM from an overlay and its registered base, and resume it. The VM is
    /// stopped once the result is printed (--keep-running: when you press Enter), and its
    /// directory removed (--keep: kept, for `cloudlet run`).
    Synthesis(cloudlet_examples::flows::SynthesisArgs),
    /// Resume a VM kept by `synthesis --keep` again, from the state synthesis rebuilt, with its
    /// port forwards (on free host ports), until Enter or Ctrl-C; or, with --probe, until it
    /// answers. The directory is not changed.
    Run(cloudlet_examples::flows::RunArgs),
    /// Rewrite an overlay as a segmented one, for `cloudlet synthesis --early-start`: it is
    /// synthesized once here (its base must be registered) and resumed again to record what
    /// its app touches until it answers (--probe), which then goes first.
    Segment(cloudlet_examples::flows::SegmentArgs),
    /// Share a file over HTTP with range requests, e.g. a segmented overlay for `cloudlet
    /// synthesis --early-start --overlay http://HOST:PORT/NAME` on another machine. Serves
    /// until Ctrl-C.
    Share {
        /// The file.
        file: PathBuf,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        /// Send at most this many KiB per second on each connection: a slow link, to try an
        /// early start without one.
        #[arg(long, value_name = "KIB_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
        rate_kib: Option<u64>,
    },
    /// Run the synthesis server: overlays POSTed to /v1/synthesis are applied while they
    /// arrive and the VM is resumed with its port forwards. Ctrl-C stops every VM it started.
    Serve {
        /// Address to listen on; forwarded VM ports bind to the same IP.
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: std::net::SocketAddr,
        /// Directory of the running VMs (default: a fresh one under the temp dir).
        #[arg(long)]
        work: Option<PathBuf>,
        /// Largest overlay accepted, in MiB (larger uploads get 413).
        #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
        max_overlay_mib: u64,
        /// Syntheses at once (more get 429).
        #[arg(long, default_value_t = 2, value_parser = at_least_one)]
        max_syntheses: usize,
        /// Running VMs at once (more get 503).
        #[arg(long, default_value_t = 16, value_parser = at_least_one)]
        max_vms: usize,
        /// Require `Authorization: Bearer TOKEN` on /v1.
        #[arg(long, env = "CLOUDLET_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Advertise the server over mDNS as `_cloudlet._tcp` under this name.
        #[arg(long)]
        advertise: Option<String>,
        /// Allow a non-loopback --listen address without --token (anyone who reaches it can
        /// run VMs).
        #[arg(long)]
        insecure: bool,
    },
    /// Talk to a synthesis server: upload an overlay (it is applied as it arrives), list what
    /// the server has, or stop a VM.
    ///
    /// Exit codes: 0 done, 4 the server refused the request (bad overlay, unknown base, ...),
    /// 5 the server failed or is busy, 1 anything else.
    Client {
        /// Server URL, e.g. http://127.0.0.1:7878 (or just 127.0.0.1:7878).
        #[arg(long, conflicts_with = "discover")]
        server: Option<String>,
        /// Find the server over mDNS (without --overlay: list every server found).
        #[arg(long)]
        discover: bool,
        /// Seconds to look for servers.
        #[arg(long, default_value_t = 3.0, value_parser = seconds)]
        discover_timeout: f64,
        /// Overlay to synthesize: a file, uploaded; or the http:// URL of a segmented overlay
        /// (`cloudlet share`), which the server reads by range and starts before it has all
        /// arrived (early start).
        #[arg(long)]
        overlay: Option<PathBuf>,
        /// Guest port the server waits on for the app's first HTTP answer.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        probe: Option<u16>,
        /// Guest port to GET from here through its forward once the VM runs.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        check: Option<u16>,
        /// Bearer token.
        #[arg(long, env = "CLOUDLET_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// When the server is busy (429), try again up to N times, waiting as it asks (or 1, 2,
        /// 4... s).
        #[arg(long, default_value_t = 0, value_name = "N")]
        retry: u32,
        /// Stop this VM (id from the upload) and remove its files.
        #[arg(long, conflicts_with = "overlay")]
        stop: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Capture what a VM running on a synthesis server changed against its base (its
    /// residue), as an overlay: `cloudlet synthesis` or `cloudlet client` on any cloudlet that
    /// holds the base resumes it as it was. The VM is paused for its snapshot, then runs on.
    /// (A VM of `cloudlet synthesis --keep-running` leaves its residue with --residue.)
    ///
    /// Exit codes: 0 done, 4 the server refused (no such VM, token), 5 the server failed or
    /// is busy, 1 anything else.
    Residue(cloudlet_examples::net::ResidueArgs),
    /// Move a VM from one synthesis server to another that holds its base: the source pauses
    /// it, sends its residue to the destination, which resumes it, and stops it once the
    /// destination answers (with --probe, once the app answers there). If the destination
    /// does not take it, the VM runs on at the source.
    ///
    /// Exit codes: 0 moved, 4 refused (no such VM, token, bad destination URL), 5 the
    /// destination did not take the VM (it runs on at the source) or a server failed, 1
    /// anything else.
    Handoff(cloudlet_examples::net::HandoffArgs),
    /// Show what an overlay holds: base id, VM spec, images, sizes by record kind, digests.
    ///
    /// Exit codes: 0 readable, 3 damaged or not an overlay (only the damage is printed), 1
    /// other errors (e.g. the file cannot be opened).
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

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.1..=600.0).contains(&x) => Ok(x),
        Ok(_) => Err("must be between 0.1 and 600 seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    cloudlet_examples::log::init();
    let cli = Cli::parse();
    let usage = match &cli.command {
        Command::Overlay(a) => a.check_level(),
        Command::Base(a) => a.check(),
        _ => Ok(()),
    };
    if let Err(msg) = usage {
        use clap::CommandFactory;
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, msg).exit();
    }
    if !matches!(cli.command, Command::Serve { .. }) {
        // Ctrl-C or SIGTERM in the middle of a flow: stop its VMs and remove what it had half
        // written. (The server handles its signals itself.)
        let _ = ctrlc::set_handler(|| {
            synthesis::interrupt_cleanup();
            eprintln!("cloudlet: interrupted; stopped its VMs and removed partial files");
            std::process::exit(exit::INTERRUPTED.into());
        });
    }
    let result = run(cli);
    if synthesis::interrupted() {
        // The flow failed because the signal handler stopped its VMs; the handler is still
        // removing files and exits with 130 when done. Exiting here would race it.
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cloudlet: {}", synthesis::error_chain(e.as_ref()));
            ExitCode::from(exit::code_of(&e))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    use base_registry::Registry;
    use cloudlet_examples::{flows, net, overlay_info};
    let registry = || -> anyhow::Result<Registry> {
        let dir = cli.registry.clone().unwrap_or_else(Registry::default_dir);
        Registry::open(&dir).with_context(|| format!("opening the base registry {}", dir.display()))
    };
    // Commands that only read or remove never create a registry: a mistyped path is an error.
    let existing = || -> anyhow::Result<Registry> {
        let dir = cli.registry.clone().unwrap_or_else(Registry::default_dir);
        Ok(Registry::open_existing(&dir)?)
    };
    match cli.command {
        Command::Demo { work, guest, debian, debian_dir } => {
            flows::demo(&work, if debian { &debian_dir } else { &guest }, debian)?;
        }
        Command::Base(a) => {
            let qemu = vm_driver::Qemu::new()?;
            flows::base(&qemu, &registry()?, &a, false)?;
        }
        Command::ListBase { json } => flows::list_base(&existing()?, json)?,
        Command::VerifyBase { base } => {
            let reg = existing()?;
            let b = reg.find(&base)?;
            let rep = reg.verify(&b.id())?;
            if rep.is_ok() {
                println!("base {} ({}): every file matches", b.manifest.id, b.manifest.name);
            } else {
                for (file, problem) in &rep.problems {
                    println!("base {} ({}): {file}: {problem}", &b.manifest.id.to_hex()[..16], b.manifest.name);
                }
                return Ok(ExitCode::from(exit::INVALID));
            }
        }
        Command::RmBase { base } => {
            let reg = existing()?;
            let b = reg.find(&base)?;
            reg.remove(&b.id())?;
            println!("removed base {} ({})", b.manifest.id, b.manifest.name);
        }
        Command::ExportBase { base, out } => {
            let reg = existing()?;
            let b = reg.find(&base)?;
            synthesis::export_base_file(&reg, &b.id(), &out)?;
            println!("exported base {} ({}) to {}", b.manifest.id, b.manifest.name, out.display());
        }
        Command::ImportBase { file } => {
            let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let b = registry()?.import(std::io::BufReader::new(f))?;
            println!("imported base {} ({})", b.manifest.id, b.manifest.name);
        }
        Command::Overlay(a) => {
            let qemu = vm_driver::Qemu::new()?;
            flows::overlay(&qemu, &registry()?, &a, false)?;
        }
        Command::Synthesis(a) => {
            let qemu = vm_driver::Qemu::new()?;
            flows::synthesis_cmd(&qemu, &existing()?, &a)?;
        }
        Command::Run(a) => {
            let qemu = vm_driver::Qemu::new()?;
            flows::run_cmd(&qemu, &a)?;
        }
        Command::Segment(a) => {
            let qemu = vm_driver::Qemu::new()?;
            flows::segment_cmd(&qemu, &existing()?, &a)?;
        }
        Command::Share { file, listen, rate_kib } => {
            if !file.is_file() {
                anyhow::bail!("{} is not a file", file.display());
            }
            let l = std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            println!("sharing {} at http://{}/{name}", file.display(), l.local_addr()?);
            // The line above is what scripts wait for.
            std::io::Write::flush(&mut std::io::stdout())?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let opts = synthesis::share::ShareOptions { rate: rate_kib.map(|k| k << 10) };
            synthesis::share::serve_file(l, &file, opts, stop)?;
        }
        Command::Serve { listen, work, max_overlay_mib, max_syntheses, max_vms, token, advertise, insecure } => {
            let dir = cli.registry.clone().unwrap_or_else(Registry::default_dir);
            net::serve(net::ServeArgs {
                registry: dir,
                listen,
                work,
                max_overlay_mib,
                max_syntheses,
                max_vms,
                token,
                advertise,
                insecure,
            })?;
        }
        Command::Client { server, discover, discover_timeout, overlay, probe, check, token, retry, stop, json } => {
            return net::client(net::ClientArgs {
                server,
                discover,
                discover_timeout: std::time::Duration::from_secs_f64(discover_timeout.max(0.1)),
                overlay,
                probe,
                check,
                token,
                retry,
                stop,
                json,
            });
        }
        Command::Residue(a) => return net::residue(&a),
        Command::Handoff(a) => return net::handoff(&a),
        Command::OverlayInfo { file, verify, json } => {
            let (mut info, err) =
                overlay_info::inspect(&file, verify).with_context(|| format!("cannot open {}", file.display()))?;
            let header_read = !info.format_version.is_empty();
            if let (Some(e), false) = (&info.error, header_read || json) {
                // Not an overlay, or damaged before its metadata: nothing else to show.
                eprintln!("cloudlet: {}: {e}", file.display());
                return Ok(ExitCode::from(exit::INVALID));
            }
            if header_read {
                let dir = cli.registry.clone().unwrap_or_else(Registry::default_dir);
                info.registry = Some(dir.display().to_string());
                // A registry that does not exist is not created by a look.
                info.base_in_registry =
                    Some(Registry::open_existing(&dir).is_ok_and(|r| r.find(&info.base_id).is_ok()));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", overlay_info::render(&info));
            }
            if err.is_some() {
                if !json {
                    eprintln!("cloudlet: {} is damaged", file.display());
                }
                return Ok(ExitCode::from(exit::INVALID));
            }
            if verify && !json {
                println!("verify         OK: every frame checksum, record and trailer count checked");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
