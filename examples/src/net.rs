//! `cloudlet serve` and `cloudlet client`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use synthesis::client::{Client, ClientError, UploadOptions};
use synthesis::discovery;
use synthesis::server::ServerConfig;

/// Options of `cloudlet serve`.
pub struct ServeArgs {
    /// Registry directory.
    pub registry: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Work directory (None: a fresh one under the temp dir, removed at exit).
    pub work: Option<PathBuf>,
    /// Overlay size limit in MiB.
    pub max_overlay_mib: u64,
    /// Concurrent syntheses.
    pub max_syntheses: usize,
    /// Running VMs.
    pub max_vms: usize,
    /// Bearer token.
    pub token: Option<String>,
    /// mDNS instance name.
    pub advertise: Option<String>,
    /// Allow a non-loopback address without a token.
    pub insecure: bool,
}

/// `cloudlet serve`: runs until Ctrl-C / SIGTERM, then stops its VMs and removes their files.
pub fn serve(a: ServeArgs) -> Result<()> {
    let (work, own) = match a.work {
        Some(w) => (w, false),
        None => {
            // A server killed with SIGKILL left its fresh work directory: clean those of
            // servers that are gone (a live server removes its own when it stops).
            for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix("cloudlet-serve-").and_then(|p| p.parse::<u32>().ok()) else {
                    continue;
                };
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    match synthesis::server::recover_abandoned(&e.path()) {
                        Ok(Some(line)) => eprintln!("{line}"),
                        Ok(None) => {}
                        Err(err) => eprintln!("cloudlet: cleaning {}: {err}", e.path().display()),
                    }
                }
            }
            (std::env::temp_dir().join(format!("cloudlet-serve-{}", std::process::id())), true)
        }
    };
    let mut cfg = ServerConfig::new(a.registry.clone(), work.clone());
    cfg.listen = a.listen;
    cfg.max_overlay_bytes = a.max_overlay_mib << 20;
    cfg.max_syntheses = a.max_syntheses.max(1);
    cfg.max_vms = a.max_vms.max(1);
    cfg.token = a.token;
    cfg.advertise = a.advertise.clone();
    cfg.insecure = a.insecure;
    let registry = a.registry.display().to_string();
    let res = synthesis::server::run_until_signal(cfg, |addr| {
        println!("listening on http://{addr} (registry {registry})");
        if let Some(name) = &a.advertise {
            println!("advertising '{name}' as {}", discovery::SERVICE_TYPE);
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    });
    if own {
        let _ = std::fs::remove_dir_all(&work);
    }
    res.context("synthesis server")
}

/// Options of `cloudlet client`.
pub struct ClientArgs {
    /// Server URL.
    pub server: Option<String>,
    /// Find the server over mDNS.
    pub discover: bool,
    /// How long to look.
    pub discover_timeout: Duration,
    /// Overlay to upload.
    pub overlay: Option<PathBuf>,
    /// Guest port the server probes.
    pub probe: Option<u16>,
    /// Check the app from here on its forwarded port.
    pub check: Option<u16>,
    /// Bearer token.
    pub token: Option<String>,
    /// Retries when the server is busy (429).
    pub retry: u32,
    /// Stop a VM.
    pub stop: Option<String>,
    /// JSON output.
    pub json: bool,
}

/// Exit code when the server refused the request (4xx).
pub const EXIT_REFUSED: u8 = crate::exit::REFUSED;
/// Exit code when the server failed or is busy (5xx, 429).
pub const EXIT_SERVER: u8 = crate::exit::SERVER;

/// `cloudlet client`.
pub fn client(a: ClientArgs) -> Result<ExitCode> {
    let server = match (&a.server, a.discover) {
        (Some(s), _) => s.clone(),
        (None, true) => {
            let first = a.overlay.is_some() || a.stop.is_some();
            if !a.json {
                eprintln!("looking for {} for {:?}", discovery::SERVICE_TYPE, a.discover_timeout);
            }
            let found = discovery::discover(a.discover_timeout, first)?;
            if !first {
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&found)?);
                } else if found.is_empty() {
                    println!("no cloudlet answered");
                } else {
                    for f in &found {
                        println!("{}  {}  version {}", f.url, f.instance, f.version.as_deref().unwrap_or("?"));
                    }
                }
                return Ok(if found.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS });
            }
            let Some(f) = found.into_iter().next() else {
                bail!("no cloudlet answered within {:?}", a.discover_timeout);
            };
            if !a.json {
                eprintln!("found '{}' at {}", f.instance, f.url);
            }
            f.url
        }
        (None, false) => bail!("say --server URL or --discover"),
    };
    let mut client = Client::new(&server)?;
    if let Some(t) = &a.token {
        client = client.token(t.clone());
    }
    let result = if let Some(id) = &a.stop {
        stop(&client, id, a.json)
    } else if let Some(overlay) = &a.overlay {
        upload(&client, overlay, &a)
    } else {
        show(&client, a.json)
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => server_error(e, a.json),
    }
}

/// Options of `cloudlet residue`.
#[derive(Debug, Clone, clap::Args)]
pub struct ResidueArgs {
    /// Server URL, e.g. http://127.0.0.1:7878 (or just 127.0.0.1:7878).
    #[arg(long)]
    pub server: String,
    /// The VM (its id, as `cloudlet client` printed it).
    #[arg(long)]
    pub vm: String,
    /// The overlay file to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Bearer token.
    #[arg(long, env = "CLOUDLET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `cloudlet residue`.
pub fn residue(a: &ResidueArgs) -> Result<ExitCode> {
    let mut client = Client::new(&a.server)?;
    if let Some(t) = &a.token {
        client = client.token(t.clone());
    }
    if a.out.symlink_metadata().is_ok() {
        bail!("{} exists; give a new file to --out", a.out.display());
    }
    if !a.json {
        eprintln!("capturing the residue of {} on {}", a.vm, client.url());
    }
    let t0 = std::time::Instant::now();
    let r = match client.residue(&a.vm, &a.out) {
        Ok(r) => r,
        Err(e) => return server_error(anyhow::Error::new(e).context(format!("residue of {}", a.vm)), a.json),
    };
    let paused_ms = r.paused.map(|d| d.as_millis() as u64);
    if a.json {
        let v = serde_json::json!({
            "vm": a.vm, "path": r.path, "bytes": r.bytes, "paused_ms": paused_ms,
            "total_ms": t0.elapsed().as_millis() as u64,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote the residue of {} to {} ({} bytes; the VM was paused {} ms, {} ms in all)",
            a.vm,
            r.path.display(),
            r.bytes,
            paused_ms.map(|m| m.to_string()).unwrap_or_else(|| "?".into()),
            t0.elapsed().as_millis()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Options of `cloudlet handoff`.
#[derive(Debug, Clone, clap::Args)]
pub struct HandoffArgs {
    /// The server the VM runs on, e.g. http://127.0.0.1:7878.
    #[arg(long)]
    pub from: String,
    /// The VM (its id on --from).
    #[arg(long)]
    pub vm: String,
    /// The server to move it to (it must hold the VM's base).
    #[arg(long)]
    pub to: String,
    /// Guest port on which the destination waits for the app's first HTTP answer before the
    /// VM is stopped at the source.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub probe: Option<u16>,
    /// Stop and copy: send the whole residue while the VM is paused, instead of a first
    /// residue while it runs and then only what changed since.
    #[arg(long)]
    pub no_precopy: bool,
    /// Bearer token of --from.
    #[arg(long, env = "CLOUDLET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bearer token of --to (the source sends it there).
    #[arg(long, env = "CLOUDLET_TO_TOKEN", hide_env_values = true)]
    pub to_token: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `cloudlet handoff`.
pub fn handoff(a: &HandoffArgs) -> Result<ExitCode> {
    let mut client = Client::new(&a.from)?;
    if let Some(t) = &a.token {
        client = client.token(t.clone());
    }
    // The source checks it too; said here, before anything moves.
    Client::new(&a.to).context("--to")?;
    if !a.json {
        eprintln!("moving {} from {} to {}", a.vm, client.url(), a.to);
    }
    let req = synthesis::api::HandoffRequest {
        to: a.to.clone(),
        to_token: a.to_token.clone(),
        probe: a.probe,
        precopy: !a.no_precopy,
    };
    let r = match client.handoff(&a.vm, &req) {
        Ok(r) => r,
        Err(e) => return server_error(anyhow::Error::new(e).context(format!("handoff of {}", a.vm)), a.json),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let precopy = match r.precopy_bytes {
            0 => String::new(),
            n => format!("{n} bytes while it ran, then "),
        };
        println!(
            "moved {} to {} as {} ({precopy}{} bytes while paused; the VM was down {} ms, {} ms in all)",
            r.from_id, r.to, r.vm.id, r.final_bytes, r.downtime_ms, r.total_ms
        );
        for f in &r.vm.ports {
            println!("  forward: {}:{} -> guest :{}", f.address.as_deref().unwrap_or("?"), f.host, f.guest);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--stop ID`.
fn stop(client: &Client, id: &str, json: bool) -> Result<()> {
    let info = client.stop(id)?;
    if json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("stopped {id}");
    }
    Ok(())
}

/// Without an overlay: what the server offers.
fn show(client: &Client, json: bool) -> Result<()> {
    let server = client.url();
    let health = client.health().with_context(|| format!("reaching {server}"))?;
    let bases = client.bases()?;
    let vms = client.vms()?;
    if json {
        let v = serde_json::json!({"server": server, "health": health, "bases": bases, "vms": vms});
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("{server}: {}", serde_json::to_string(&health)?);
        for b in bases {
            println!("  base {}  {}", b.id, b.name);
        }
        for x in vms {
            println!("  vm   {}  {} on base {}", x.id, x.name, x.base_name);
        }
    }
    Ok(())
}

/// The exit code of a failed client command: the server's refusal (4) or failure (5), said
/// on stderr (or as `{"status": ..., "answer": ...}` with `--json`); any other error is
/// returned.
fn server_error(e: anyhow::Error, json: bool) -> Result<ExitCode> {
    let refusal = e.chain().find_map(|c| c.downcast_ref::<ClientError>()).and_then(|ce| match ce {
        ClientError::Refused(a) => Some((a, EXIT_REFUSED)),
        ClientError::Busy(a) | ClientError::Failed(a) => Some((a, EXIT_SERVER)),
        _ => None,
    });
    let Some((answer, code)) = refusal else {
        return Err(e);
    };
    if json {
        println!("{{\"status\": {}, \"answer\": {}}}", answer.status, serde_json::to_string(&answer.body)?);
    } else {
        eprintln!("cloudlet: {answer}");
    }
    Ok(ExitCode::from(code))
}

fn upload(client: &Client, overlay: &Path, a: &ClientArgs) -> Result<()> {
    let url = overlay.to_str().filter(|s| s.contains("://"));
    let len = match url {
        Some(_) => 0,
        None => std::fs::metadata(overlay).with_context(|| format!("opening {}", overlay.display()))?.len(),
    };
    let bar = if a.json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} (apply runs as it arrives)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    };
    let on_progress = |sent: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(sent);
    };
    let retries = a.retry;
    let json = a.json;
    let on_busy = |attempt: u32, wait: Duration| {
        bar.reset();
        if !json {
            eprintln!("the server is busy; trying again in {} s ({attempt} of {retries})", wait.as_secs());
        }
    };
    let opts = UploadOptions { probe: a.probe, retries, on_busy: Some(&on_busy), on_progress: Some(&on_progress) };
    let t0 = std::time::Instant::now();
    let info = match url {
        Some(url) => client.synthesize_url(url, &opts),
        None => client.synthesize(overlay, &opts),
    };
    bar.finish_and_clear();
    let info = info.with_context(|| format!("uploading to {}/v1/synthesis", client.url()))?;
    let wall = t0.elapsed();
    let mut checked = None;
    if let Some(gp) = a.check {
        let check = || -> Result<String> {
            let Some(p) = info.ports.iter().find(|p| p.guest == gp) else {
                let fwd: Vec<String> = info.ports.iter().map(|p| p.guest.to_string()).collect();
                bail!("the VM forwards no guest port {gp} (it forwards: {})", fwd.join(", "));
            };
            let host = match p.address.as_deref() {
                Some("0.0.0.0") | None => client.host(),
                Some(a) => a,
            };
            let raw = synthesis::http_get_from(host, p.host, Duration::from_secs(60))?;
            Ok(synthesis::first_body_line(&raw).to_string())
        };
        match check() {
            Ok(first) => checked = Some(first),
            Err(e) => {
                // Never leave the VM running unnoticed: stop it, or say how.
                if client.stop(&info.id).is_ok() {
                    bail!("{e:#}; the VM {} was stopped on the server", info.id);
                }
                bail!(
                    "{e:#}; the VM {id} still runs on the server: stop it with \
                     `cloudlet client --server {server} --stop {id}`",
                    id = info.id,
                    server = client.url()
                );
            }
        }
    }
    if a.json {
        let mut v = serde_json::to_value(&info)?;
        v["client_ms"] = serde_json::json!(wall.as_secs_f64() * 1000.0);
        if let Some(c) = &checked {
            v["app_answer"] = serde_json::json!(c);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let t = &info.timeline;
        println!("{} running '{}' on base {} ({})", info.id, info.name, &info.base_id[..16], info.base_name);
        println!(
            "  timeline: receive {:.0} ms, rebuild {:.0} ms (decompress {:.0}, apply {:.0}, verify {:.0}), resume {:.0} ms, first answer {}, total {:.0} ms; client saw {:.0} ms",
            t.receive,
            t.rebuild,
            t.decompress,
            t.apply,
            t.verify,
            t.resume,
            t.first_answer.map(|x| format!("{x:.0} ms")).unwrap_or_else(|| "-".into()),
            t.total,
            wall.as_secs_f64() * 1000.0
        );
        for p in &info.ports {
            println!("  forward: {}:{} -> guest :{}", p.address.as_deref().unwrap_or("?"), p.host, p.guest);
        }
        if let Some(c) = checked {
            println!("  the app answered: {c}");
        }
        println!("  stop it with: cloudlet client --server {} --stop {}", client.url(), info.id);
    }
    Ok(())
}
