//! `cloudlet serve` and `cloudlet client`.

use std::io::{BufRead, IsTerminal, Read};
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

/// The server URL as given, `http://` added when it is only `host:port`.
fn server_url(s: &str) -> Result<String> {
    let s = s.trim_end_matches('/');
    match s.split_once("://") {
        Some(("http", rest)) if !rest.is_empty() => Ok(s.to_string()),
        Some(("https", _)) => bail!("{s}: this client speaks plain HTTP only; give the server as http://HOST:PORT"),
        Some(_) => bail!("{s}: the server URL must start with http://, e.g. http://127.0.0.1:7878"),
        None if s.is_empty() => bail!("the server URL is empty; give it as http://HOST:PORT"),
        None => Ok(format!("http://{s}")),
    }
}

/// `cloudlet client`.
pub fn client(a: ClientArgs) -> Result<ExitCode> {
    let server = match (&a.server, a.discover) {
        (Some(s), _) => server_url(s)?,
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
    drop(f);
    let mut path = "/v1/synthesis".to_string();
    if let Some(p) = a.probe {
        path.push_str(&format!("?probe={p}"));
    }
    let url = format!("{server}{path}");
    let t0 = std::time::Instant::now();
    let mut attempt = 0;
    let answer = loop {
        let f = std::fs::File::open(overlay).with_context(|| format!("opening {}", overlay.display()))?;
        bar.reset();
        let body = Progress { inner: std::io::BufReader::with_capacity(1 << 20, f), bar: bar.clone() };
        let answer = post_overlay(server, &path, auth, body, len).with_context(|| format!("uploading to {url}"))?;
        if answer.status != 429 || attempt >= a.retry {
            break answer;
        }
        attempt += 1;
        let wait = answer.retry_after.unwrap_or(1 << (attempt - 1).min(5)).clamp(1, 60);
        if !a.json {
            eprintln!("the server is busy; trying again in {wait} s ({attempt} of {})", a.retry);
        }
        std::thread::sleep(Duration::from_secs(wait));
    };
    bar.finish_and_clear();
    let (status, text) = (answer.status, answer.body);
    let wall = t0.elapsed();
    if status != 201 {
        return finish_error(status, &text, a.json);
    }
    let info: VmInfo = serde_json::from_str(&text).context("reading the server's answer")?;
    let mut checked = None;
    if let Some(gp) = a.check {
        let check = || -> Result<String> {
            let Some(p) = info.ports.iter().find(|p| p.guest == gp) else {
                let fwd: Vec<String> = info.ports.iter().map(|p| p.guest.to_string()).collect();
                bail!("the VM forwards no guest port {gp} (it forwards: {})", fwd.join(", "));
            };
            let host = match p.address.as_deref() {
                Some("0.0.0.0") | None => host_of(server),
                Some(a) => a.to_string(),
            };
            let body = synthesis::http_get_from(&host, p.host, Duration::from_secs(60))?;
            Ok(body.split("\r\n\r\n").nth(1).unwrap_or(&body).lines().next().unwrap_or("").to_string())
        };
        match check() {
            Ok(first) => checked = Some(first),
            Err(e) => {
                // Never leave the VM running unnoticed: stop it, or say how.
                let mut req = agent.delete(&format!("{server}/v1/vms/{}", info.id));
                if let Some(h) = auth {
                    req = req.header("Authorization", h);
                }
                let stopped = req.call().map(|r| r.status().is_success()).unwrap_or(false);
                if stopped {
                    bail!("{e:#}; the VM {} was stopped on the server", info.id);
                }
                bail!(
                    "{e:#}; the VM {id} still runs on the server: stop it with \
                     `cloudlet client --server {server} --stop {id}`",
                    id = info.id
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

/// The server's answer to an upload.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: String,
}

/// How long the server may take to say "send it" (100 Continue) before the body goes anyway.
const CONTINUE_WAIT: Duration = Duration::from_secs(10);
/// How long the server may take to answer once the whole overlay is sent (rebuild, resume,
/// probe).
const ANSWER_WAIT: Duration = Duration::from_secs(900);
/// Largest answer head and body read.
const ANSWER_LIMIT: u64 = 16 << 20;

/// POSTs the overlay with `Expect: 100-continue`: the server answers a request it refuses
/// (401, 404, 413, 429...) before the body is sent, and that answer is what the client
/// reports. Should the server close the connection while the body is on the way, its answer
/// is still read and reported, never the broken pipe.
fn post_overlay(server: &str, path: &str, auth: Option<&str>, mut body: impl Read, len: u64) -> Result<Answer> {
    use std::io::{BufReader, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    let authority = server.split_once("://").map(|(_, r)| r).unwrap_or(server);
    let authority = authority.split('/').next().unwrap_or(authority);
    let target = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<_> = target.to_socket_addrs().with_context(|| format!("resolving {target}"))?.collect();
    let mut last = None;
    let mut stream = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, Duration::from_secs(10)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(mut stream) = stream else {
        return Err(last
            .map(anyhow::Error::from)
            .unwrap_or_else(|| anyhow::anyhow!("no address"))
            .context(format!("connecting to {target}")));
    };
    let auth = auth.map(|h| format!("Authorization: {h}\r\n")).unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Content-Type: application/vnd.cloudlet.overlay\r\n\
         Content-Length: {len}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    let mut reader = BufReader::new(stream.try_clone().context("cloning the connection")?);
    stream.write_all(head.as_bytes()).context("sending the request")?;
    stream.set_read_timeout(Some(CONTINUE_WAIT))?;
    match read_head(&mut reader) {
        Ok((100, _)) => {}
        Ok((status, headers)) => return read_answer(&mut reader, status, &headers),
        // No word from the server: send the body anyway (RFC 9110, 10.1.1).
        Err(e) if is_timeout(&e) => {}
        Err(e) => return Err(e).context("reading the server's answer"),
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    loop {
        let n = body.read(&mut buf).context("reading the overlay")?;
        if n == 0 {
            break;
        }
        if let Err(e) = stream.write_all(&buf[..n]) {
            // The server stopped reading: it has answered (or died). Its answer, if any,
            // is what the user needs to see.
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            return match read_final(&mut reader) {
                Ok(a) => Ok(a),
                Err(_) => Err(anyhow::Error::from(e).context(format!(
                    "the server closed the connection after {sent} of {len} bytes, without an answer"
                ))),
            };
        }
        sent += n as u64;
    }
    stream.flush()?;
    stream.set_read_timeout(Some(ANSWER_WAIT))?;
    read_final(&mut reader).with_context(|| format!("waiting up to {ANSWER_WAIT:?} for the server's answer"))
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// The final answer, after any 1xx.
fn read_final(r: &mut impl BufRead) -> Result<Answer> {
    loop {
        let (status, headers) = read_head(r)?;
        if !(100..200).contains(&status) {
            return read_answer(r, status, &headers);
        }
    }
}

/// A status line and headers (names lowercased).
fn read_head(r: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>)> {
    let mut lines = Vec::new();
    let mut total = 0u64;
    loop {
        let mut line = Vec::new();
        let n = r.by_ref().take(ANSWER_LIMIT - total).read_until(b'\n', &mut line)?;
        total += n as u64;
        if n == 0 {
            bail!("the connection closed before a complete answer");
        }
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            break;
        }
        lines.push(line);
        if total >= ANSWER_LIMIT || lines.len() > 1000 {
            bail!("the answer's head is too large");
        }
    }
    let status_line = &lines[0];
    let (status, _) =
        synthesis::parse_status_line(status_line).with_context(|| format!("not an HTTP answer: {status_line:?}"))?;
    let headers = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    Ok((status, headers))
}

/// The body after a head (Content-Length, chunked, or until the connection closes).
fn read_answer(r: &mut impl BufRead, status: u16, headers: &[(String, String)]) -> Result<Answer> {
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut line = String::new();
            r.by_ref().take(1024).read_line(&mut line)?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                break;
            }
            if body.len() as u64 + size > ANSWER_LIMIT {
                bail!("the answer is larger than {ANSWER_LIMIT} bytes");
            }
            r.by_ref().take(size).read_to_end(&mut body)?;
            let mut crlf = String::new();
            r.by_ref().take(2).read_line(&mut crlf)?;
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<u64>().ok()) {
        if n > ANSWER_LIMIT {
            bail!("the answer is {n} bytes, more than {ANSWER_LIMIT}");
        }
        r.by_ref().take(n).read_to_end(&mut body)?;
    } else {
        r.by_ref().take(ANSWER_LIMIT).read_to_end(&mut body)?;
    }
    let retry_after = get("retry-after").and_then(|v| v.parse().ok());
    Ok(Answer { status, retry_after, body: String::from_utf8_lossy(&body).into_owned() })
}
