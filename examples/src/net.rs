//! `cloudlet serve` and `cloudlet client`.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use synthesis::discovery;
use synthesis::server::{ApiError, ServerConfig, VmInfo};

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
}

/// `cloudlet serve`: runs until Ctrl-C / SIGTERM, then stops its VMs and removes their files.
pub fn serve(a: ServeArgs) -> Result<()> {
    let (work, own) = match a.work {
        Some(w) => (w, false),
        None => (std::env::temp_dir().join(format!("cloudlet-serve-{}", std::process::id())), true),
    };
    let mut cfg = ServerConfig::new(a.registry.clone(), work.clone());
    cfg.listen = a.listen;
    cfg.max_overlay_bytes = a.max_overlay_mib << 20;
    cfg.max_syntheses = a.max_syntheses.max(1);
    cfg.max_vms = a.max_vms.max(1);
    cfg.token = a.token;
    cfg.advertise = a.advertise.clone();
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
    /// Stop a VM.
    pub stop: Option<String>,
    /// JSON output.
    pub json: bool,
}

/// Exit code when the server refused the request (4xx).
pub const EXIT_REFUSED: u8 = crate::exit::REFUSED;
/// Exit code when the server failed or is busy (5xx, 429).
pub const EXIT_SERVER: u8 = crate::exit::SERVER;

struct Progress<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        if n == 0 {
            self.bar.finish_and_clear();
        }
        Ok(n)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

fn host_of(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority).to_string()
}

/// `cloudlet client`.
pub fn client(a: ClientArgs) -> Result<ExitCode> {
    let server = match (&a.server, a.discover) {
        (Some(s), _) => s.trim_end_matches('/').to_string(),
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
    let agent = agent();
    let auth = a.token.as_ref().map(|t| format!("Bearer {t}"));
    let with_auth = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match &auth {
        Some(h) => r.header("Authorization", h),
        None => r,
    };
    if let Some(id) = &a.stop {
        let mut r = with_auth(agent.delete(&format!("{server}/v1/vms/{id}"))).call()?;
        let body = r.body_mut().read_to_string()?;
        let status = r.status().as_u16();
        if !(200..300).contains(&status) {
            return finish_error(status, &body, a.json);
        }
        if a.json {
            println!("{body}");
        } else {
            println!("stopped {id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(overlay) = &a.overlay else {
        // Without an overlay: show what the server offers.
        let mut h = agent.get(&format!("{server}/healthz")).call().with_context(|| format!("reaching {server}"))?;
        let health = h.body_mut().read_to_string()?;
        let mut b = with_auth(agent.get(&format!("{server}/v1/bases"))).call()?;
        let bases = b.body_mut().read_to_string()?;
        if b.status().as_u16() != 200 {
            return finish_error(b.status().as_u16(), &bases, a.json);
        }
        let mut v = with_auth(agent.get(&format!("{server}/v1/vms"))).call()?;
        let vms = v.body_mut().read_to_string()?;
        if a.json {
            println!("{{\"server\": {server:?}, \"health\": {health}, \"bases\": {bases}, \"vms\": {vms}}}");
        } else {
            println!("{server}: {health}");
            let bases: serde_json::Value = serde_json::from_str(&bases)?;
            for x in bases.as_array().into_iter().flatten() {
                println!("  base {}  {}", x["id"].as_str().unwrap_or("?"), x["name"].as_str().unwrap_or("?"));
            }
            let vms: Vec<VmInfo> = serde_json::from_str(&vms)?;
            for x in vms {
                println!("  vm   {}  {} on base {}", x.id, x.name, x.base_name);
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    upload(&agent, &server, auth.as_deref(), overlay, &a)
}

fn upload(agent: &ureq::Agent, server: &str, auth: Option<&str>, overlay: &Path, a: &ClientArgs) -> Result<ExitCode> {
    // Preflight: is the token good and does the server hold the overlay's base? Saves
    // uploading a large overlay only to be refused.
    let f = std::fs::File::open(overlay).with_context(|| format!("opening {}", overlay.display()))?;
    let base_id = overlay_format::OverlayReader::new(std::io::BufReader::new(&f))
        .with_context(|| format!("{} is not a readable overlay", overlay.display()))?
        .meta()
        .base_id
        .to_string();
    let mut req = agent.get(&format!("{server}/v1/bases"));
    if let Some(h) = auth {
        req = req.header("Authorization", h);
    }
    let mut r = req.call().with_context(|| format!("reaching {server}"))?;
    let text = r.body_mut().read_to_string()?;
    if r.status().as_u16() != 200 {
        return finish_error(r.status().as_u16(), &text, a.json);
    }
    let bases: serde_json::Value = serde_json::from_str(&text).context("reading the server's base list")?;
    if !bases.as_array().into_iter().flatten().any(|b| b["id"].as_str() == Some(base_id.as_str())) {
        let e = ApiError {
            code: "unknown_base".into(),
            error: format!(
                "the server does not hold base {base_id}, which the overlay needs \
                 (move it there with `cloudlet export-base` and `cloudlet import-base`)"
            ),
            base_id: Some(base_id),
        };
        return finish_error(404, &serde_json::to_string(&e)?, a.json);
    }
    let f = std::fs::File::open(overlay).with_context(|| format!("opening {}", overlay.display()))?;
    let len = f.metadata()?.len();
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
    let body = Progress { inner: std::io::BufReader::with_capacity(1 << 20, f), bar };
    let mut url = format!("{server}/v1/synthesis");
    if let Some(p) = a.probe {
        url.push_str(&format!("?probe={p}"));
    }
    let t0 = std::time::Instant::now();
    let mut req = agent.post(&url);
    if let Some(h) = auth {
        req = req.header("Authorization", h);
    }
    let req = req.header("Content-Type", "application/vnd.cloudlet.overlay").header("Content-Length", &len.to_string());
    let mut r = req.send(ureq::SendBody::from_owned_reader(body)).with_context(|| format!("uploading to {url}"))?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    let wall = t0.elapsed();
    if status != 201 {
        return finish_error(status, &text, a.json);
    }
    let info: VmInfo = serde_json::from_str(&text).context("reading the server's answer")?;
    let mut checked = None;
    if let Some(gp) = a.check {
        let Some(p) = info.ports.iter().find(|p| p.guest == gp) else {
            bail!("the VM forwards no guest port {gp}");
        };
        let host = if p.address == "0.0.0.0" { host_of(server) } else { p.address.clone() };
        let body = synthesis::http_get_from(&host, p.host, Duration::from_secs(60))?;
        let first = body.split("\r\n\r\n").nth(1).unwrap_or(&body).lines().next().unwrap_or("").to_string();
        checked = Some(first);
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
            println!("  forward: {}:{} -> guest :{}", p.address, p.host, p.guest);
        }
        if let Some(c) = checked {
            println!("  the app answered: {c}");
        }
        println!("  stop it with: cloudlet client --server {server} --stop {}", info.id);
    }
    Ok(ExitCode::SUCCESS)
}

fn finish_error(status: u16, body: &str, json: bool) -> Result<ExitCode> {
    if (200..300).contains(&status) {
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        println!("{{\"status\": {status}, \"answer\": {}}}", serde_json::to_string(body)?);
    } else {
        match serde_json::from_str::<ApiError>(body) {
            Ok(e) => eprintln!("cloudlet: the server answered {status} ({}): {}", e.code, e.error),
            Err(_) => eprintln!("cloudlet: the server answered {status}: {body}"),
        }
    }
    Ok(ExitCode::from(if (400..500).contains(&status) && status != 429 { EXIT_REFUSED } else { EXIT_SERVER }))
}
