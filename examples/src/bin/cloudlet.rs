//! `cloudlet`: build base VMs, capture overlays, synthesize custom VMs.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
                  `cloudlet demo` runs base, overlay and synthesis on the test guest."
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
        /// Work directory (emptied first; holds its own registry).
        #[arg(long, default_value = ".cache/demo")]
        work: PathBuf,
        /// The test guest (from scripts/build-guest.sh).
        #[arg(long, env = "CLOUDLET_GUEST_DIR", default_value = ".cache/guest")]
        guest: PathBuf,
    },
    /// Create a base VM: boot a raw disk image, prepare it, snapshot memory + disk + device
    /// state, index it, register it.
    Base(cloudlet_examples::flows::BaseArgs),
    /// List the registered bases.
    ListBase {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Recompute a base's digests; names every damaged file (exit 2 when damaged).
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
    /// Rebuild a custom VM from an overlay and its registered base, and resume it.
    Synthesis {
        /// The overlay file (it names its base by id).
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
        /// Print the result as JSON on stdout (steps still go to stderr).
        #[arg(long)]
        json: bool,
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
        #[arg(long, default_value_t = 8192)]
        max_overlay_mib: u64,
        /// Syntheses at once (more get 429).
        #[arg(long, default_value_t = 2)]
        max_syntheses: usize,
        /// Running VMs at once (more get 503).
        #[arg(long, default_value_t = 16)]
        max_vms: usize,
        /// Require `Authorization: Bearer TOKEN` on /v1.
        #[arg(long, env = "CLOUDLET_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Advertise the server over mDNS as `_cloudlet._tcp` under this name.
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Talk to a synthesis server: upload an overlay (it is applied as it arrives), list what
    /// the server has, or stop a VM.
    ///
    /// Exit codes: 0 done, 2 the server refused the request (bad overlay, unknown base, ...),
    /// 3 the server failed or is busy, 1 anything else.
    Client {
        /// Server URL, e.g. http://127.0.0.1:7878.
        #[arg(long, conflicts_with = "discover")]
        server: Option<String>,
        /// Find the server over mDNS (without --overlay: list every server found).
        #[arg(long)]
        discover: bool,
        /// Seconds to look for servers.
        #[arg(long, default_value_t = 3.0)]
        discover_timeout: f64,
        /// Overlay to synthesize.
        #[arg(long)]
        overlay: Option<PathBuf>,
        /// Guest port the server waits on for the app's first HTTP answer.
        #[arg(long)]
        probe: Option<u16>,
        /// Guest port to GET from here through its forward once the VM runs.
        #[arg(long)]
        check: Option<u16>,
        /// Bearer token.
        #[arg(long, env = "CLOUDLET_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Stop this VM (id from the upload) and remove its files.
        #[arg(long, conflicts_with = "overlay")]
        stop: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
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
    if !matches!(cli.command, Command::Serve { .. }) {
        // Ctrl-C or SIGTERM in the middle of a flow: stop its VMs and remove what it had half
        // written. (The server handles its signals itself.)
        let _ = ctrlc::set_handler(|| {
            synthesis::interrupt_cleanup();
            eprintln!("cloudlet: interrupted; stopped its VMs and removed partial files");
            std::process::exit(130);
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
            eprintln!("cloudlet: {e:#}");
            ExitCode::from(1)
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
    match cli.command {
        Command::Demo { work, guest } => {
            flows::demo(&work, &guest)?;
        }
        Command::Base(a) => {
            let qemu = vm_driver::Qemu::new()?;
            flows::base(&qemu, &registry()?, &a, false)?;
        }
        Command::ListBase { json } => flows::list_base(&registry()?, json)?,
        Command::VerifyBase { base } => {
            let reg = registry()?;
            let b = reg.find(&base)?;
            let rep = reg.verify(&b.id())?;
            if rep.is_ok() {
                println!("base {} ({}): every file matches", b.manifest.id, b.manifest.name);
            } else {
                for (file, problem) in &rep.problems {
                    println!("base {} ({}): {file}: {problem}", &b.manifest.id[..16], b.manifest.name);
                }
                return Ok(ExitCode::from(2));
            }
        }
        Command::RmBase { base } => {
            let reg = registry()?;
            let b = reg.find(&base)?;
            reg.remove(&b.id())?;
            println!("removed base {} ({})", b.manifest.id, b.manifest.name);
        }
        Command::ExportBase { base, out } => {
            let reg = registry()?;
            let b = reg.find(&base)?;
            let tmp = out.with_extension("partial");
            let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let res = reg.export(&b.id(), std::io::BufWriter::new(f));
            if let Err(e) = res {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
            std::fs::rename(&tmp, &out)?;
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
        Command::Synthesis { overlay, out, probe, keep_running, json } => {
            let qemu = vm_driver::Qemu::new()?;
            let s = flows::synth(&qemu, &registry()?, &overlay, &out, probe, false, json)?;
            if keep_running {
                eprintln!("VM running; press Enter to stop it.");
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
            }
            drop(s);
        }
        Command::Serve { listen, work, max_overlay_mib, max_syntheses, max_vms, token, advertise } => {
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
            })?;
        }
        Command::Client { server, discover, discover_timeout, overlay, probe, check, token, stop, json } => {
            return net::client(net::ClientArgs {
                server,
                discover,
                discover_timeout: std::time::Duration::from_secs_f64(discover_timeout.max(0.1)),
                overlay,
                probe,
                check,
                token,
                stop,
                json,
            });
        }
        Command::OverlayInfo { file, verify, json } => {
            let (info, err) =
                overlay_info::inspect(&file, verify).with_context(|| format!("cannot open {}", file.display()))?;
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
                println!("verify         OK: every frame checksum, record and trailer count checked");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
