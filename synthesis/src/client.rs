//! A blocking client of the synthesis server's HTTP API (feature `client`): the types of
//! [`crate::api`] in and out, no async runtime.
//!
//! ```no_run
//! use synthesis::client::{Client, UploadOptions};
//!
//! let client = Client::new("127.0.0.1:7878")?.token("s3cret");
//! println!("{} bases", client.bases()?.len());
//! let opts = UploadOptions { probe: Some(8080), retries: 3, ..UploadOptions::default() };
//! let vm = client.synthesize("app.overlay".as_ref(), &opts)?;
//! println!("{} runs; stop it with DELETE /v1/vms/{}", vm.name, vm.id);
//! client.stop(&vm.id)?;
//! # Ok::<(), synthesis::client::ClientError>(())
//! ```
//!
//! Uploads stream the overlay from its file (it is never held in memory whole) and ask before
//! they send it (`Expect: 100-continue`), so a server that refuses the upload (401, 404, 413,
//! 429...) is heard rather than a broken pipe; should the server close the connection while
//! the body is on its way, its answer is still read and returned.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::{ApiError, BaseInfo, Health, VmInfo};

/// How long connecting to the server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request other than an upload may take, answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server may take to say "send it" (100 Continue) before the body goes anyway.
const CONTINUE_WAIT: Duration = Duration::from_secs(10);
/// How long one write of the overlay may wait for the server to take bytes.
const WRITE_WAIT: Duration = Duration::from_secs(60);
/// How long the server may take to answer once it stopped reading (it answered early).
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How long the server may take to answer once the whole overlay is sent (rebuild, resume,
/// probe).
pub const ANSWER_WAIT: Duration = Duration::from_secs(900);
/// Largest answer (head or body) read.
const ANSWER_LIMIT: u64 = 16 << 20;

/// How long a residue or a handoff may take: the capture on the server and the transfer.
pub const RESIDUE_TIMEOUT: Duration = Duration::from_secs(900);
/// Bytes per write of the overlay.
const CHUNK: usize = 1 << 20;

/// An answer of the server that is not the one asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body as sent (invalid UTF-8 replaced).
    pub body: String,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
}

impl Answer {
    /// The body as the API's error object, when it is one.
    pub fn api_error(&self) -> Option<ApiError> {
        serde_json::from_str(&self.body).ok()
    }
}

impl std::fmt::Display for Answer {
    /// "the server answered 429 (busy): 2 syntheses are running already; retry later".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.api_error() {
            Some(e) => write!(f, "the server answered {} ({}): {}", self.status, e.code, e.error),
            None => write!(f, "the server answered {}: {}", self.status, self.body),
        }
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server URL is not one this client can use.
    #[error("{url}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server refused the request (4xx other than 429: token, unknown base, bad overlay,
    /// too large, no such VM).
    #[error("{0}")]
    Refused(Answer),
    /// The server is busy (429): as many syntheses as it allows are running.
    #[error("{0}")]
    Busy(Answer),
    /// The server failed (5xx) or gave another answer than the API describes.
    #[error("{0}")]
    Failed(Answer),
    /// The server's answer is not what the API describes (not HTTP, not its JSON, too large).
    #[error("{what}")]
    Protocol {
        /// What was wrong.
        what: String,
    },
    /// The server could not be reached, or the connection failed.
    #[error("{what}")]
    Transport {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server did not answer in time.
    #[error("{what}: no answer within {} s", .waited.as_secs_f64())]
    Timeout {
        /// What was being done.
        what: String,
        /// How long the client waited.
        waited: Duration,
    },
    /// The overlay cannot be read.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an overlay (or its header is damaged).
    #[error("{} is not a readable overlay", .path.display())]
    NotAnOverlay {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: overlay_format::DecodeError,
    },
}

impl ClientError {
    /// The server's answer, when the server refused, was busy or failed.
    pub fn answer(&self) -> Option<&Answer> {
        match self {
            ClientError::Refused(a) | ClientError::Busy(a) | ClientError::Failed(a) => Some(a),
            _ => None,
        }
    }

    /// The error for an answer that is not a success: refused (4xx), busy (429) or failed.
    fn from_answer(a: Answer) -> Self {
        match a.status {
            429 => ClientError::Busy(a),
            400..=499 => ClientError::Refused(a),
            _ => ClientError::Failed(a),
        }
    }

    fn from_ureq(what: String, e: ureq::Error) -> Self {
        match e {
            ureq::Error::Timeout(t) => {
                let waited = match t {
                    ureq::Timeout::Resolve | ureq::Timeout::Connect => CONNECT_TIMEOUT,
                    _ => REQUEST_TIMEOUT,
                };
                ClientError::Timeout { what, waited }
            }
            e => ClientError::Transport { what, source: Box::new(e) },
        }
    }

    /// An error of the hand-written upload: timeouts and malformed answers by their kind.
    fn from_io(what: String, e: std::io::Error, waited: Duration) -> Self {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout { what, waited },
            std::io::ErrorKind::InvalidData => ClientError::Protocol { what: format!("{what}: {e}") },
            _ => ClientError::Transport { what, source: Box::new(e) },
        }
    }
}

/// A residue fetched by [`Client::residue`].
#[derive(Debug, Clone)]
pub struct ResidueDownload {
    /// The overlay file written.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long the server paused the VM for its snapshot, as it said.
    pub paused: Option<Duration>,
}

/// How an upload goes.
#[derive(Default, Clone, Copy)]
pub struct UploadOptions<'a> {
    /// Guest port on which the server waits for the app's first HTTP answer before answering.
    pub probe: Option<u16>,
    /// When the server is busy (429), try again up to this many times, waiting as it asks
    /// (`Retry-After`, else 1, 2, 4... s; at most 60 s). Only [`Client::synthesize`], which
    /// can read the file again, retries.
    pub retries: u32,
    /// Called before each retry with the attempt (1, 2...) and the wait.
    pub on_busy: Option<&'a dyn Fn(u32, Duration)>,
    /// Called as the overlay is sent, with the bytes sent so far and the total.
    pub on_progress: Option<&'a dyn Fn(u64, u64)>,
}

/// A blocking client of one synthesis server.
#[derive(Debug, Clone)]
pub struct Client {
    /// `http://AUTHORITY` plus any path prefix, without a trailing `/`.
    url: String,
    /// `HOST:PORT`.
    authority: String,
    /// The path prefix (empty, or starts with `/`).
    prefix: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the server at `url`: `http://HOST:PORT` or just `HOST:PORT` (the client
    /// speaks plain HTTP only).
    pub fn new(url: &str) -> Result<Client, ClientError> {
        let s = url.trim_end_matches('/');
        let bad = |reason: &str| ClientError::BadUrl { url: s.to_string(), reason: reason.into() };
        let rest = match s.split_once("://") {
            Some(("http", rest)) if !rest.is_empty() => rest,
            Some(("https", _)) => {
                return Err(bad("this client speaks plain HTTP only; give the server as http://HOST:PORT"))
            }
            Some(_) => return Err(bad("the server URL must start with http://, e.g. http://127.0.0.1:7878")),
            None if s.is_empty() => return Err(bad("the server URL is empty; give it as http://HOST:PORT")),
            None => s,
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("the server URL names no host; give it as http://HOST:PORT"));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .new_agent();
        Ok(Client {
            url: format!("http://{authority}{prefix}"),
            authority: authority.to_string(),
            prefix: prefix.to_string(),
            token: None,
            agent,
        })
    }

    /// Sends `Authorization: Bearer TOKEN` with every `/v1` request.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The server's URL, `http://HOST:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's host (without brackets for IPv6): where a forward the server binds to
    /// `0.0.0.0` is reached.
    pub fn host(&self) -> &str {
        let a = self.authority.as_str();
        if let Some(v6) = a.strip_prefix('[') {
            return v6.split(']').next().unwrap_or(v6);
        }
        a.rsplit_once(':').map(|(h, _)| h).unwrap_or(a)
    }

    /// `GET /healthz`.
    pub fn health(&self) -> Result<Health, ClientError> {
        self.json("GET", "/healthz")
    }

    /// `GET /v1/bases`: the bases the server holds.
    pub fn bases(&self) -> Result<Vec<BaseInfo>, ClientError> {
        self.json("GET", "/v1/bases")
    }

    /// `GET /v1/vms`: the VMs the server runs.
    pub fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.json("GET", "/v1/vms")
    }

    /// `GET /v1/vms/{id}`.
    pub fn vm(&self, id: &str) -> Result<VmInfo, ClientError> {
        self.json("GET", &format!("/v1/vms/{id}"))
    }

    /// `DELETE /v1/vms/{id}`: stops the VM and removes its files; the VM as it was.
    pub fn stop(&self, id: &str) -> Result<VmInfo, ClientError> {
        self.json("DELETE", &format!("/v1/vms/{id}"))
    }

    /// `GET /v1/vms/{id}/residue`: what the VM changed against its base, as an overlay written
    /// to `out` (which must not exist; nothing is left there on error). The VM is paused on the
    /// server for its snapshot, then runs on.
    pub fn residue(&self, id: &str, out: &Path) -> Result<ResidueDownload, ClientError> {
        let url = format!("{}/v1/vms/{id}/residue", self.url);
        let what = format!("GET {url}");
        let io = |what: String| move |source| ClientError::Io { what, source };
        if out.symlink_metadata().is_ok() {
            return Err(ClientError::Io {
                what: format!("writing the residue to {}", out.display()),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        let req = self.agent.get(&url).config().timeout_global(Some(RESIDUE_TIMEOUT)).build();
        let req = match &self.token {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        };
        let mut r = req.call().map_err(|e| ClientError::from_ureq(what.clone(), e))?;
        if !r.status().is_success() {
            return Err(ClientError::from_answer(read_whole_answer(&mut r, &what)?));
        }
        let paused = r
            .headers()
            .get("x-cloudlet-paused-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_millis);
        let mut file = None;
        let (partial, mut guard) = crate::flows::fresh_sibling(out, "partial", |p| {
            file = Some(std::fs::OpenOptions::new().write(true).create_new(true).open(p)?);
            Ok(())
        })
        .map_err(|e| ClientError::Io {
            what: format!("writing the residue to {}", out.display()),
            source: std::io::Error::other(crate::error_chain(&e)),
        })?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file.expect("set when fresh_sibling succeeds"));
        let mut body = r.body_mut().with_config().limit(u64::MAX).reader();
        let bytes =
            std::io::copy(&mut body, &mut file).map_err(|e| ClientError::from_io(what.clone(), e, RESIDUE_TIMEOUT))?;
        let file = file.into_inner().map_err(|e| io(format!("writing {}", partial.display()))(e.into_error()))?;
        file.sync_all().map_err(io(format!("writing {}", partial.display())))?;
        let f = std::fs::File::open(&partial).map_err(io(format!("reading {}", partial.display())))?;
        overlay_format::OverlayReader::new(BufReader::new(f))
            .map_err(|source| ClientError::NotAnOverlay { path: partial.clone(), source })?;
        crate::flows::publish(&partial, out).map_err(|e| ClientError::Io {
            what: format!("writing the residue to {}", out.display()),
            source: std::io::Error::other(crate::error_chain(&e)),
        })?;
        guard.disarm();
        Ok(ResidueDownload { path: out.to_owned(), bytes, paused })
    }

    /// `POST /v1/stages`: uploads the overlay at `path` for the server to hold until a
    /// [`Client::synthesize_patch`] names it (once), or for ten minutes.
    pub fn stage(&self, path: &Path) -> Result<crate::api::StageInfo, ClientError> {
        let (f, len) = open_sized(path)?;
        let a = self.post_overlay(&format!("{}/v1/stages", self.prefix), f, len, None)?;
        if !(200..300).contains(&a.status) {
            return Err(ClientError::from_answer(a));
        }
        serde_json::from_str(&a.body).map_err(|e| ClientError::Protocol {
            what: format!("the server's answer to the stage upload is not what the API describes: {e}"),
        })
    }

    /// `POST /v1/synthesis?patch_from=STAGE`: synthesizes the overlay that the patch at `path`
    /// ([`crate::patch::encode_patch`]) makes of the overlay staged as `stage`.
    pub fn synthesize_patch(&self, path: &Path, stage: &str, opts: &UploadOptions<'_>) -> Result<VmInfo, ClientError> {
        let (f, len) = open_sized(path)?;
        let mut q = format!("{}/v1/synthesis?patch_from={}", self.prefix, encode_query(stage));
        if let Some(p) = opts.probe {
            q.push_str(&format!("&probe={p}"));
        }
        let a = self.post_overlay(&q, f, len, opts.on_progress)?;
        if !(200..300).contains(&a.status) {
            return Err(ClientError::from_answer(a));
        }
        serde_json::from_str(&a.body).map_err(|e| ClientError::Protocol {
            what: format!("the server's answer to the upload is not a VM as the API describes it: {e}"),
        })
    }

    /// `POST /v1/vms/{id}/handoff`: moves the VM to the server `req.to`, which must hold its
    /// base. [`ClientError::Failed`] with a 502 `handoff_failed` answer when the destination
    /// did not take it: the VM then runs on here.
    pub fn handoff(
        &self,
        id: &str,
        req: &crate::api::HandoffRequest,
    ) -> Result<crate::api::HandoffResult, ClientError> {
        let url = format!("{}/v1/vms/{id}/handoff", self.url);
        let what = format!("POST {url}");
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol { what: format!("{what}: {e}") })?;
        let r = self.agent.post(&url).config().timeout_global(Some(RESIDUE_TIMEOUT)).build();
        let r = r.header("Content-Type", "application/json");
        let r = match &self.token {
            Some(t) => r.header("Authorization", &format!("Bearer {t}")),
            None => r,
        };
        let mut r = r.send(&body[..]).map_err(|e| ClientError::from_ureq(what.clone(), e))?;
        let a = read_whole_answer(&mut r, &what)?;
        if !(200..300).contains(&a.status) {
            return Err(ClientError::from_answer(a));
        }
        serde_json::from_str(&a.body).map_err(|e| ClientError::Protocol {
            what: format!("the answer to {what} is not the JSON the API describes: {e}"),
        })
    }

    /// Checks the token and that the server holds base `base_id` (hex), before an upload:
    /// [`ClientError::Refused`] with a 404 `unknown_base` answer when it does not.
    pub fn check_base(&self, base_id: &str) -> Result<(), ClientError> {
        if self.bases()?.iter().any(|b| b.id == base_id) {
            return Ok(());
        }
        let e = ApiError {
            code: "unknown_base".into(),
            error: format!(
                "the server does not hold base {base_id}, which the overlay needs \
                 (move it there with `cloudlet export-base` and `cloudlet import-base`)"
            ),
            base_id: Some(base_id.to_string()),
        };
        let body = serde_json::to_string(&e).unwrap_or_default();
        Err(ClientError::Refused(Answer { status: 404, body, retry_after: None }))
    }

    /// Synthesizes the overlay file `path` on the server: checks first that the server holds
    /// its base (see [`Client::check_base`]), then streams the file, trying a busy server
    /// again as `opts` says. The VM that runs.
    pub fn synthesize(&self, path: &Path, opts: &UploadOptions<'_>) -> Result<VmInfo, ClientError> {
        let open = || {
            std::fs::File::open(path)
                .map_err(|source| ClientError::Io { what: format!("opening {}", path.display()), source })
        };
        let f = open()?;
        let base_id = overlay_format::OverlayReader::new(BufReader::new(&f))
            .map_err(|source| ClientError::NotAnOverlay { path: path.to_owned(), source })?
            .meta()
            .base_id
            .to_hex();
        self.check_base(&base_id)?;
        let mut attempt = 0;
        loop {
            let f = open()?;
            let len = f
                .metadata()
                .map_err(|source| ClientError::Io { what: format!("reading {}", path.display()), source })?
                .len();
            match self.synthesize_reader(f, len, opts) {
                Err(ClientError::Busy(a)) if attempt < opts.retries => {
                    attempt += 1;
                    let wait = Duration::from_secs(a.retry_after.unwrap_or(1 << (attempt - 1).min(5)).clamp(1, 60));
                    if let Some(f) = opts.on_busy {
                        f(attempt, wait);
                    }
                    std::thread::sleep(wait);
                }
                r => return r,
            }
        }
    }

    /// Has the server start the VM of the segmented overlay at `url` (`http://`, a server
    /// that answers range requests, e.g. `cloudlet share`) before it has arrived: the server
    /// reads it by range as the VM needs it (early start). Retries a busy server as `opts`
    /// says. The VM that runs.
    pub fn synthesize_url(&self, url: &str, opts: &UploadOptions<'_>) -> Result<VmInfo, ClientError> {
        let mut path = format!("{}/v1/synthesis?url={}", self.prefix, encode_query(url));
        if let Some(p) = opts.probe {
            path.push_str(&format!("&probe={p}"));
        }
        let mut attempt = 0;
        loop {
            let a = self.post_overlay(&path, std::io::empty(), 0, None)?;
            if (200..300).contains(&a.status) {
                return serde_json::from_str(&a.body).map_err(|e| ClientError::Protocol {
                    what: format!("the server's answer is not a VM as the API describes it: {e}"),
                });
            }
            match ClientError::from_answer(a) {
                ClientError::Busy(a) if attempt < opts.retries => {
                    attempt += 1;
                    let wait = Duration::from_secs(a.retry_after.unwrap_or(1 << (attempt - 1).min(5)).clamp(1, 60));
                    if let Some(f) = opts.on_busy {
                        f(attempt, wait);
                    }
                    std::thread::sleep(wait);
                }
                e => return Err(e),
            }
        }
    }

    /// Synthesizes the `len` bytes of overlay that `body` yields, streamed as they are read;
    /// one attempt (a busy server is [`ClientError::Busy`]). The VM that runs.
    pub fn synthesize_reader(
        &self,
        body: impl Read,
        len: u64,
        opts: &UploadOptions<'_>,
    ) -> Result<VmInfo, ClientError> {
        let mut path = format!("{}/v1/synthesis", self.prefix);
        if let Some(p) = opts.probe {
            path.push_str(&format!("?probe={p}"));
        }
        let a = self.post_overlay(&path, body, len, opts.on_progress)?;
        if !(200..300).contains(&a.status) {
            return Err(ClientError::from_answer(a));
        }
        serde_json::from_str(&a.body).map_err(|e| ClientError::Protocol {
            what: format!("the server's answer to the upload is not a VM as the API describes it: {e}"),
        })
    }

    /// A request through ureq; the answer, whatever its status.
    fn call(&self, method: &str, path: &str) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.url);
        let what = format!("{method} {url}");
        let req = match method {
            "DELETE" => self.agent.delete(&url),
            _ => self.agent.get(&url),
        };
        let req = match &self.token {
            Some(t) if path.starts_with("/v1/") => req.header("Authorization", &format!("Bearer {t}")),
            _ => req,
        };
        let mut r = req.call().map_err(|e| ClientError::from_ureq(what.clone(), e))?;
        read_whole_answer(&mut r, &what)
    }

    /// A request whose success answer is the JSON of `T`.
    fn json<T: serde::de::DeserializeOwned>(&self, method: &str, path: &str) -> Result<T, ClientError> {
        let a = self.call(method, path)?;
        if !(200..300).contains(&a.status) {
            return Err(ClientError::from_answer(a));
        }
        serde_json::from_str(&a.body).map_err(|e| ClientError::Protocol {
            what: format!("the answer to {method} {}{path} is not the JSON the API describes: {e}", self.url),
        })
    }

    /// POSTs the overlay by hand, because what it needs is what a general HTTP client does
    /// not give: `Expect: 100-continue`, so that the server answers a request it refuses
    /// (401, 404, 413, 429...) before the body is sent and that answer is what the caller
    /// gets; and, should the server close the connection while the body is on its way, its
    /// answer read and returned, never the broken pipe.
    fn post_overlay(
        &self,
        path: &str,
        mut body: impl Read,
        len: u64,
        progress: Option<&dyn Fn(u64, u64)>,
    ) -> Result<Answer, ClientError> {
        let authority = &self.authority;
        let target = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addrs: Vec<_> = target
            .to_socket_addrs()
            .map_err(|e| ClientError::Transport { what: format!("resolving {target}"), source: Box::new(e) })?
            .collect();
        let mut last = None;
        let mut stream = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(mut stream) = stream else {
            let e = last.unwrap_or_else(|| std::io::Error::other("the name resolves to no address"));
            return Err(ClientError::from_io(format!("connecting to {target}"), e, CONNECT_TIMEOUT));
        };
        let url = format!("http://{authority}{path}");
        let sock = |what: &str| {
            let what = format!("{what} ({url})");
            move |e: std::io::Error| ClientError::Transport { what, source: Box::new(e) }
        };
        let auth = self.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Content-Type: application/vnd.cloudlet.overlay\r\n\
             Content-Length: {len}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        );
        let mut reader = BufReader::new(stream.try_clone().map_err(sock("cloning the connection"))?);
        stream.set_write_timeout(Some(WRITE_WAIT)).map_err(sock("setting a timeout"))?;
        stream.write_all(head.as_bytes()).map_err(sock("sending the request"))?;
        stream.set_read_timeout(Some(CONTINUE_WAIT)).map_err(sock("setting a timeout"))?;
        match read_head(&mut reader) {
            Ok((100, _)) => {}
            Ok((status, headers)) => {
                return read_answer(&mut reader, status, &headers)
                    .map_err(|e| ClientError::from_io(format!("reading the answer of {url}"), e, CONTINUE_WAIT))
            }
            // No word from the server: send the body anyway (RFC 9110, 10.1.1).
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(ClientError::from_io(format!("reading the answer of {url}"), e, CONTINUE_WAIT)),
        }
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        loop {
            let n =
                body.read(&mut buf).map_err(|source| ClientError::Io { what: "reading the overlay".into(), source })?;
            if n == 0 {
                break;
            }
            if let Err(e) = stream.write_all(&buf[..n]) {
                // The server stopped reading: it has answered (or died). Its answer, if any,
                // is what the caller needs.
                let _ = stream.set_read_timeout(Some(EARLY_ANSWER_WAIT));
                return read_final(&mut reader).map_err(|_| ClientError::Transport {
                    what: format!("the server closed the connection after {sent} of {len} bytes, without an answer"),
                    source: Box::new(e),
                });
            }
            sent += n as u64;
            if let Some(p) = progress {
                p(sent, len);
            }
        }
        stream.flush().map_err(sock("sending the overlay"))?;
        stream.set_read_timeout(Some(ANSWER_WAIT)).map_err(sock("setting a timeout"))?;
        read_final(&mut reader)
            .map_err(|e| ClientError::from_io(format!("waiting for the server's answer ({url})"), e, ANSWER_WAIT))
    }
}

/// The file at `path`, and its size.
fn open_sized(path: &Path) -> Result<(BufReader<std::fs::File>, u64), ClientError> {
    let f = std::fs::File::open(path)
        .map_err(|source| ClientError::Io { what: format!("opening {}", path.display()), source })?;
    let len =
        f.metadata().map_err(|source| ClientError::Io { what: format!("reading {}", path.display()), source })?.len();
    Ok((BufReader::new(f), len))
}

/// The answer of a ureq request, its body read whole (bounded), whatever its status.
fn read_whole_answer(r: &mut ureq::http::Response<ureq::Body>, what: &str) -> Result<Answer, ClientError> {
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let body = r
        .body_mut()
        .with_config()
        .limit(ANSWER_LIMIT)
        .read_to_string()
        .map_err(|e| ClientError::from_ureq(format!("reading the answer to {what}"), e))?;
    Ok(Answer { status, body, retry_after })
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// The final answer, after any 1xx.
fn read_final(r: &mut impl BufRead) -> std::io::Result<Answer> {
    loop {
        let (status, headers) = read_head(r)?;
        if !(100..200).contains(&status) {
            return read_answer(r, status, &headers);
        }
    }
}

/// A status line and headers (names lowercased), at most [`ANSWER_LIMIT`] bytes and 1000
/// lines.
fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut lines = Vec::new();
    let mut total = 0u64;
    loop {
        let mut line = Vec::new();
        let n = r.by_ref().take(ANSWER_LIMIT - total).read_until(b'\n', &mut line)?;
        total += n as u64;
        if n == 0 {
            return Err(invalid("the connection closed before a complete answer".into()));
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
            return Err(invalid("the answer's head is too large".into()));
        }
    }
    let status_line = &lines[0];
    let (status, _) =
        crate::parse_status_line(status_line).ok_or_else(|| invalid(format!("not an HTTP answer: {status_line:?}")))?;
    let headers = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    Ok((status, headers))
}

/// The body after a head (Content-Length, chunked, or until the connection closes), at most
/// [`ANSWER_LIMIT`] bytes.
fn read_answer(r: &mut impl BufRead, status: u16, headers: &[(String, String)]) -> std::io::Result<Answer> {
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut line = String::new();
            r.by_ref().take(1024).read_line(&mut line)?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            if body.len() as u64 + size > ANSWER_LIMIT {
                return Err(invalid(format!("the answer is larger than {ANSWER_LIMIT} bytes")));
            }
            r.by_ref().take(size).read_to_end(&mut body)?;
            let mut crlf = String::new();
            r.by_ref().take(2).read_line(&mut crlf)?;
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<u64>().ok()) {
        if n > ANSWER_LIMIT {
            return Err(invalid(format!("the answer is {n} bytes, more than {ANSWER_LIMIT}")));
        }
        r.by_ref().take(n).read_to_end(&mut body)?;
    } else {
        r.by_ref().take(ANSWER_LIMIT).read_to_end(&mut body)?;
    }
    let retry_after = get("retry-after").and_then(|v| v.parse().ok());
    Ok(Answer { status, retry_after, body: String::from_utf8_lossy(&body).into_owned() })
}

/// `s` for a query string: every byte but the unreserved ones percent-encoded.
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(super::encode_query("http://h:8/a b?c=d&e"), "http%3A%2F%2Fh%3A8%2Fa%20b%3Fc%3Dd%26e");
    }

    use super::*;
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// What one connection to the test server saw.
    #[derive(Debug)]
    struct Seen {
        head: String,
        body_bytes: u64,
    }

    /// A server for one connection at a time: `script` gets the connection (its request head
    /// already read) and answers it. Sends what each connection saw.
    fn server(
        script: impl Fn(usize, &str, &mut BufReader<TcpStream>, &mut TcpStream) -> u64 + Send + 'static,
    ) -> (String, mpsc::Receiver<Seen>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (i, s) in l.incoming().enumerate() {
                let Ok(mut s) = s else { return };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let body_bytes = script(i, &head, &mut r, &mut s);
                let _ = tx.send(Seen { head, body_bytes });
            }
        });
        (addr, rx)
    }

    fn content_length(head: &str) -> u64 {
        head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().trim().parse().unwrap()
    }

    fn vm_json() -> String {
        let info = VmInfo {
            id: "vm-0123456789ab".into(),
            name: "app".into(),
            base_id: "42".repeat(32),
            base_name: "deb".into(),
            ports: vec![crate::api::Forward::listening(8080, 40000, "127.0.0.1")],
            overlay_bytes: 3 << 20,
            created_unix: 1,
            timeline: crate::api::Timeline {
                receive: 1.0,
                decompress: 2.0,
                apply: 3.0,
                verify: 4.0,
                rebuild: 5.0,
                resume: 6.0,
                first_answer: None,
                total: 7.0,
            },
        };
        serde_json::to_string(&info).unwrap()
    }

    /// Answers and, as the stream is dropped after, says so: a client must not keep this
    /// connection for its next request.
    fn respond(s: &mut TcpStream, status: &str, extra: &str, body: &str) {
        let _ =
            write!(s, "HTTP/1.1 {status}\r\n{extra}Connection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    }

    #[test]
    fn urls() {
        let c = Client::new("127.0.0.1:7878/").unwrap();
        assert_eq!((c.url(), c.host()), ("http://127.0.0.1:7878", "127.0.0.1"));
        let c = Client::new("http://[::1]:7878").unwrap();
        assert_eq!((c.url(), c.host()), ("http://[::1]:7878", "::1"));
        for (bad, says) in [
            ("https://x:1", "plain HTTP only"),
            ("ftp://x:1", "must start with http://"),
            ("", "empty"),
            ("http:///v1", "names no host"),
        ] {
            let e = Client::new(bad).unwrap_err().to_string();
            assert!(matches!(Client::new(bad), Err(ClientError::BadUrl { .. })) && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_upload_waits_for_100_continue_then_streams_the_body() {
        let (addr, seen) = server(|_, head, r, s| {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            let mut n = 0u64;
            let mut buf = [0u8; 4096];
            let want = content_length(head);
            while n < want {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k as u64,
                }
            }
            respond(s, "201 Created", "", &vm_json());
            n
        });
        let client = Client::new(&addr).unwrap().token("t0ken");
        let sent = std::sync::Mutex::new(Vec::new());
        let progress = |done: u64, total: u64| sent.lock().unwrap().push((done, total));
        let opts = UploadOptions { probe: Some(8080), on_progress: Some(&progress), ..UploadOptions::default() };
        let body = std::io::repeat(7).take(3 << 20);
        let vm = client.synthesize_reader(body, 3 << 20, &opts).unwrap();
        assert_eq!(vm, serde_json::from_str::<VmInfo>(&vm_json()).unwrap());
        let seen = seen.recv().unwrap();
        assert!(seen.head.starts_with("POST /v1/synthesis?probe=8080 HTTP/1.1\r\n"), "{}", seen.head);
        for h in ["Expect: 100-continue", "Authorization: Bearer t0ken", "Content-Length: 3145728"] {
            assert!(seen.head.contains(h), "{h} not in {}", seen.head);
        }
        assert_eq!(seen.body_bytes, 3 << 20);
        let sent = sent.lock().unwrap();
        assert_eq!(sent.last(), Some(&(3 << 20, 3 << 20)));
        assert_eq!(sent.len(), 3, "one report per 1 MiB written: {sent:?}");
    }

    #[test]
    fn a_refusal_before_the_body_is_the_answer() {
        let (addr, seen) = server(|_, _, _, s| {
            let e = ApiError { code: "too_large".into(), error: "at most 8 MiB".into(), base_id: None };
            respond(s, "413 Payload Too Large", "", &serde_json::to_string(&e).unwrap());
            0
        });
        let client = Client::new(&addr).unwrap();
        let e = client.synthesize_reader(std::io::repeat(0).take(64 << 20), 64 << 20, &UploadOptions::default());
        let Err(ClientError::Refused(a)) = e else { panic!("expected Refused, got {e:?}") };
        assert_eq!(a.status, 413);
        assert_eq!(a.api_error().unwrap().code, "too_large");
        assert_eq!(a.to_string(), "the server answered 413 (too_large): at most 8 MiB");
        assert_eq!(seen.recv().unwrap().body_bytes, 0);
    }

    #[test]
    fn an_answer_sent_while_the_body_is_on_its_way_is_heard() {
        // The server says "send it", takes some of the body, answers 400 and closes the
        // connection with the rest unread: the client's writes fail, and the answer is what
        // the caller gets, not the broken pipe.
        let (addr, _seen) = server(|_, _, r, s| {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let _ = r.read_exact(&mut buf);
            respond(s, "400 Bad Request", "", r#"{"code":"bad_overlay","error":"not an overlay"}"#);
            let _ = s.shutdown(std::net::Shutdown::Both);
            0
        });
        let client = Client::new(&addr).unwrap();
        let e = client.synthesize_reader(std::io::repeat(0).take(256 << 20), 256 << 20, &UploadOptions::default());
        let Err(ClientError::Refused(a)) = e else { panic!("expected Refused, got {e:?}") };
        assert_eq!((a.status, a.api_error().unwrap().code.as_str()), (400, "bad_overlay"));
    }

    #[test]
    fn a_busy_server_is_tried_again_as_it_asks() {
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("app.overlay");
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/../overlay-format/tests/golden/v1-zstd.ovl");
        std::fs::copy(golden, &path).unwrap();
        let base = "42".repeat(32);
        let bases = serde_json::to_string(&vec![BaseInfo {
            id: base.clone(),
            name: "deb".into(),
            bytes: 1,
            created_unix: 1,
            spec: overlay_format::OverlayReader::new(std::fs::File::open(&path).unwrap()).unwrap().meta().spec.clone(),
        }])
        .unwrap();
        let (addr, seen) = server(move |i, head, r, s| match i {
            0 => {
                respond(s, "200 OK", "", &bases);
                0
            }
            1 | 2 => {
                respond(s, "429 Too Many Requests", "Retry-After: 1\r\n", r#"{"code":"busy","error":"2 running"}"#);
                0
            }
            _ => {
                s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                let mut body = Vec::new();
                let _ = r.take(content_length(head)).read_to_end(&mut body);
                respond(s, "201 Created", "", &vm_json());
                body.len() as u64
            }
        });
        let client = Client::new(&addr).unwrap();
        let waits = std::sync::Mutex::new(Vec::new());
        let on_busy = |attempt: u32, wait: Duration| waits.lock().unwrap().push((attempt, wait));
        // One retry is not enough for two busy answers.
        let opts = UploadOptions { retries: 1, on_busy: Some(&on_busy), ..UploadOptions::default() };
        let e = client.synthesize(&path, &opts).unwrap_err();
        assert!(matches!(&e, ClientError::Busy(a) if a.retry_after == Some(1)), "{e:?}");
        assert_eq!(*waits.lock().unwrap(), vec![(1, Duration::from_secs(1))]);
        for _ in 0..3 {
            assert_eq!(seen.recv().unwrap().body_bytes, 0);
        }
        // The server now has room.
        let len = std::fs::metadata(&path).unwrap().len();
        let vm = client.synthesize_reader(std::fs::File::open(&path).unwrap(), len, &UploadOptions::default());
        assert_eq!(vm.unwrap().id, "vm-0123456789ab");
        assert_eq!(seen.recv().unwrap().body_bytes, len);
    }

    #[test]
    fn an_overlay_for_a_base_the_server_lacks_is_not_uploaded() {
        let (addr, seen) = server(|_, _, _, s| {
            respond(s, "200 OK", "", "[]");
            0
        });
        let client = Client::new(&addr).unwrap();
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/../overlay-format/tests/golden/v1-zstd.ovl");
        let e = client.synthesize(golden.as_ref(), &UploadOptions::default()).unwrap_err();
        let a = e.answer().unwrap();
        assert!(matches!(e, ClientError::Refused(_)));
        assert_eq!(a.api_error().unwrap().base_id.unwrap(), "42".repeat(32));
        assert!(a.to_string().contains("does not hold base 4242"), "{a}");
        assert!(seen.recv().unwrap().head.starts_with("GET /v1/bases "));
        assert!(seen.try_recv().is_err(), "uploaded anyway");
        let e = client.synthesize("Cargo.toml".as_ref(), &UploadOptions::default()).unwrap_err();
        assert!(matches!(e, ClientError::NotAnOverlay { .. }), "{e:?}");
    }

    #[test]
    fn typed_answers_and_errors_of_the_other_requests() {
        let (addr, seen) = server(|i, _, _, s| {
            match i {
                0 => respond(s, "200 OK", "", &format!("[{}]", vm_json())),
                1 => respond(s, "404 Not Found", "", r#"{"code":"not_found","error":"no VM vm-none"}"#),
                2 => respond(s, "500 Internal Server Error", "", "<html>proxy</html>"),
                _ => respond(s, "200 OK", "", "{\"not\": \"health\"}"),
            }
            0
        });
        let client = Client::new(&addr).unwrap().token("t");
        assert_eq!(client.vms().unwrap()[0].id, "vm-0123456789ab");
        assert!(seen.recv().unwrap().head.to_ascii_lowercase().contains("authorization: bearer t"));
        let e = client.stop("vm-none").unwrap_err();
        assert_eq!(e.to_string(), "the server answered 404 (not_found): no VM vm-none");
        assert!(seen.recv().unwrap().head.starts_with("DELETE /v1/vms/vm-none "));
        let e = client.bases().unwrap_err();
        assert!(matches!(&e, ClientError::Failed(a) if a.status == 500), "{e:?}");
        assert_eq!(e.to_string(), "the server answered 500: <html>proxy</html>");
        let e = client.health().unwrap_err();
        assert!(matches!(e, ClientError::Protocol { .. }), "{e:?}");
        // The token goes only to /v1.
        assert!(seen.recv().unwrap().head.starts_with("GET /v1/bases "));
        assert!(!seen.recv().unwrap().head.to_ascii_lowercase().contains("authorization"));
    }

    #[test]
    fn no_server_is_a_transport_error() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let client = Client::new(&addr.to_string()).unwrap();
        assert!(matches!(client.health(), Err(ClientError::Transport { .. })));
        let e = client.synthesize_reader(&b"x"[..], 1, &UploadOptions::default()).unwrap_err();
        assert!(matches!(e, ClientError::Transport { .. }) && e.to_string().contains("connecting to"), "{e:?}");
    }

    #[test]
    fn answers_are_read_bounded() {
        let head = |s: &str| read_final(&mut BufReader::new(s.as_bytes()));
        let a = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "abcde"));
        let a = head("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\n\r\nbusy").unwrap();
        assert_eq!((a.status, a.retry_after, a.body.as_str()), (429, Some(2), "busy"));
        for bad in [
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\n",
        ] {
            let e = head(bad).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{bad:?}: {e}");
        }
    }
}
