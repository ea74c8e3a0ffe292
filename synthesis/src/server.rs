//! The synthesis server: overlays arrive over HTTP and are applied while they stream in.
//!
//! The flows stay synchronous; the server bridges them with `spawn_blocking` and a bounded
//! channel that turns the request body into a [`Read`]: the delta engine decompresses and
//! applies blob *n* while blob *n + 1* is still on the wire.
//!
//! Endpoints (see `synthesis/openapi.yaml`):
//!
//! | method and path | what |
//! |---|---|
//! | `GET /healthz` | liveness, no token needed |
//! | `GET /v1/bases` | the registered bases |
//! | `POST /v1/synthesis?probe=PORT` | body: an overlay; rebuilds and resumes the VM |
//! | `POST /v1/synthesis?patch_from=ID&probe=PORT` | body: a patch against a staged overlay ([`crate::patch`]) |
//! | `POST /v1/stages` | body: an overlay, held for one `patch_from` (a handoff's pre-copy) |
//! | `POST /v1/synthesis?url=URL&probe=PORT` | no body: the segmented overlay at `URL`, read by range; the VM resumes before it has arrived ([`crate::early`]) |
//! | `GET /v1/vms`, `GET /v1/vms/{id}` | running VMs |
//! | `DELETE /v1/vms/{id}` | stop a VM and remove its files |
//! | `GET /v1/vms/{id}/residue` | what the VM changed against its base, as an overlay ([`crate::residue`]) |
//! | `POST /v1/vms/{id}/handoff` | body: [`HandoffRequest`]; moves the VM to another server, or leaves it running here |

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base_registry::Registry;
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use vm_driver::{Hypervisor, Qemu, Vm};

use crate::{synthesize_with, Event, FlowError, SynthesisOptions};

/// After a synthesis stops early (say, for an unknown base), at most this much of the rest of
/// the upload is read and dropped so the client gets the answer instead of a reset.
const DRAIN_LIMIT: u64 = 64 << 20;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (default 127.0.0.1:7878). Forwarded VM ports bind to the same IP.
    pub listen: SocketAddr,
    /// The base registry.
    pub registry: PathBuf,
    /// Where rebuilt VMs live while they run (created; emptied on shutdown).
    pub work_dir: PathBuf,
    /// Largest overlay accepted, in bytes (413 above).
    pub max_overlay_bytes: u64,
    /// Syntheses at once (429 above).
    pub max_syntheses: usize,
    /// Running VMs at once (503 above).
    pub max_vms: usize,
    /// When set, `/v1/*` needs `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// How long a `probe` waits for the app's first HTTP answer.
    pub probe_timeout: Duration,
    /// Advertise `_cloudlet._tcp` over mDNS under this instance name.
    pub advertise: Option<String>,
    /// Listen on a non-loopback address without a token. Off by default: [`Server::bind`]
    /// refuses such an address unless a token is set or this is.
    pub insecure: bool,
}

impl ServerConfig {
    /// Defaults for a registry and a work directory.
    pub fn new(registry: PathBuf, work_dir: PathBuf) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            registry,
            work_dir,
            max_overlay_bytes: 8 << 30,
            max_syntheses: 2,
            max_vms: 16,
            token: None,
            probe_timeout: Duration::from_secs(60),
            advertise: None,
            insecure: false,
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Listening, the work directory or the runtime failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry cannot be opened.
    #[error("base registry")]
    Registry(#[from] base_registry::RegistryError),
    /// QEMU cannot be used.
    #[error("hypervisor")]
    Driver(#[from] vm_driver::DriverError),
    /// A non-loopback address without a token, and `insecure` not set.
    #[error(
        "refusing to listen on {listen} without a token: anyone who reaches it could run VMs here; \
         set a token (--token or CLOUDLET_TOKEN), listen on a loopback address, or say --insecure"
    )]
    Insecure {
        /// The address asked for.
        listen: SocketAddr,
    },
    /// Another server, still running, uses the work directory.
    #[error("{dir} is the work directory of a running server (pid {pid}); give another --work")]
    WorkDirInUse {
        /// The work directory.
        dir: PathBuf,
        /// That server's pid.
        pid: u32,
    },
    /// mDNS advertisement failed.
    #[error("mDNS advertisement")]
    Discovery(#[from] crate::discovery::DiscoveryError),
}

pub use crate::api::{ApiError, Forward as PortInfo, Timeline as TimelineMs, VmInfo};
use crate::api::{BaseInfo, HandoffRequest, HandoffResult, Health};
use crate::error_chain;

fn api_error(status: StatusCode, code: &str, error: String) -> Response {
    (status, Json(ApiError { code: code.into(), error, base_id: None })).into_response()
}

/// What the server needs of a hypervisor: it is shared between tasks, and its VMs live in the
/// server's table. Every [`Hypervisor`] that is `Send + Sync + 'static` with `'static` VMs is one.
pub trait ServedHypervisor: Hypervisor<Vm: 'static> + Send + Sync + 'static {}

impl<H> ServedHypervisor for H
where
    H: Hypervisor + Send + Sync + 'static,
    H::Vm: 'static,
{
}

struct Running<V> {
    info: VmInfo,
    /// Locked while a residue is captured; `None` once stopped.
    vm: Arc<Mutex<Option<V>>>,
    dir: PathBuf,
    /// The base it was synthesized from, and the forwards of its overlay: what a residue needs.
    base: Arc<crate::RegisteredBase>,
    forwards: Vec<overlay_format::PortForward>,
    /// What serves the memory and disks of a VM resumed before its overlay had arrived.
    serving: Option<crate::early::Serving>,
}

impl<V: Vm> Running<V> {
    /// Stops the VM (after a residue being captured), then what serves it, and removes its
    /// directory.
    fn stop(self) {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(vm) = vm {
            let _ = vm.shutdown();
        }
        drop(self.serving);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct AppState<H: Hypervisor> {
    hypervisor: H,
    registry: Registry,
    cfg: ServerConfig,
    vms: Mutex<BTreeMap<String, Running<H::Vm>>>,
    syntheses: Arc<Semaphore>,
    next: AtomicU64,
}

impl<H: Hypervisor> AppState<H> {
    fn new_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut h = blake3::Hasher::new();
        h.update(&n.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
        format!("vm-{}", &h.finalize().to_hex()[..12])
    }

    fn stop_all(&self) {
        let all = std::mem::take(&mut *self.vms.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, r) in all {
            r.stop();
        }
        let _ = std::fs::remove_dir_all(self.cfg.work_dir.join("stages"));
    }
}

/// The server, bound and ready; [`Server::run`] serves until the shutdown future resolves.
/// Its VMs run on `H`, QEMU unless built with [`Server::bind_with`].
pub struct Server<H: ServedHypervisor = Qemu> {
    listener: tokio::net::TcpListener,
    state: Arc<AppState<H>>,
    _advert: Option<crate::discovery::Advertisement>,
}

impl Server<Qemu> {
    /// Checks QEMU, then [`Server::bind_with`] it. Must be called inside a tokio runtime.
    pub async fn bind(cfg: ServerConfig) -> Result<Server<Qemu>, ServerError> {
        if !cfg.listen.ip().is_loopback() && cfg.token.is_none() && !cfg.insecure {
            return Err(ServerError::Insecure { listen: cfg.listen });
        }
        let qemu = Qemu::new()?;
        Server::bind_with(cfg, qemu).await
    }
}

impl<H: ServedHypervisor> Server<H> {
    /// Opens the registry, binds the address and (optionally) advertises it; VMs run on
    /// `hypervisor`. Must be called inside a tokio runtime.
    pub async fn bind_with(cfg: ServerConfig, hypervisor: H) -> Result<Server<H>, ServerError> {
        if !cfg.listen.ip().is_loopback() && cfg.token.is_none() && !cfg.insecure {
            return Err(ServerError::Insecure { listen: cfg.listen });
        }
        let registry = Registry::open(&cfg.registry)?;
        std::fs::create_dir_all(&cfg.work_dir)
            .map_err(|source| ServerError::Io { what: format!("creating {}", cfg.work_dir.display()), source })?;
        let work_dir = std::fs::canonicalize(&cfg.work_dir)
            .map_err(|source| ServerError::Io { what: format!("resolving {}", cfg.work_dir.display()), source })?;
        if let Some(r) = recover(&work_dir)? {
            tracing::info!("{r}");
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Io { what: format!("listening on {}", cfg.listen), source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServerError::Io { what: "reading the bound address".into(), source })?;
        let advert = match &cfg.advertise {
            Some(name) => Some(crate::discovery::advertise(name, local)?),
            None => None,
        };
        let cfg = ServerConfig {
            listen: local,
            work_dir,
            max_syntheses: cfg.max_syntheses.max(1),
            max_vms: cfg.max_vms.max(1),
            ..cfg
        };
        let syntheses = Arc::new(Semaphore::new(cfg.max_syntheses));
        let state = Arc::new(AppState {
            hypervisor,
            registry,
            cfg,
            vms: Mutex::new(BTreeMap::new()),
            syntheses,
            next: AtomicU64::new(0),
        });
        Ok(Server { listener, state, _advert: advert })
    }

    /// The address the server listens on (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.state.cfg.listen
    }

    /// Serves until `shutdown` resolves, then stops every VM and removes its files.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let state = self.state.clone();
        let app = router(state.clone());
        let r = axum::serve(self.listener, app).with_graceful_shutdown(shutdown).await;
        let s = state.clone();
        let _ = tokio::task::spawn_blocking(move || s.stop_all()).await;
        let _ = std::fs::remove_file(state.cfg.work_dir.join(PID_FILE));
        r.map_err(|source| ServerError::Io { what: "serving".into(), source })
    }
}

fn router<H: ServedHypervisor>(state: Arc<AppState<H>>) -> Router {
    let v1 = Router::new()
        .route("/v1/bases", get(bases::<H>))
        .route("/v1/synthesis", post(synthesis::<H>))
        .route("/v1/stages", post(stage::<H>))
        .route("/v1/vms", get(list_vms::<H>))
        .route("/v1/vms/{id}", get(get_vm::<H>).delete(delete_vm::<H>))
        .route("/v1/vms/{id}/residue", get(residue::<H>))
        .route("/v1/vms/{id}/handoff", post(handoff::<H>))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::<H>));
    Router::new().route("/healthz", get(healthz::<H>)).merge(v1).with_state(state)
}

async fn auth<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.cfg.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if !ok {
            let mut r = api_error(StatusCode::UNAUTHORIZED, "unauthorized", "a bearer token is required".into());
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>) -> Response {
    let running = st.vms.lock().map(|v| v.len()).unwrap_or(0);
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        running_vms: running,
        syntheses: st.cfg.max_syntheses - st.syntheses.available_permits(),
        max_syntheses: st.cfg.max_syntheses,
        max_vms: st.cfg.max_vms,
        max_overlay_bytes: st.cfg.max_overlay_bytes,
    })
    .into_response()
}

async fn bases<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>) -> Response {
    let s = st.clone();
    match tokio::task::spawn_blocking(move || s.registry.list()).await {
        Ok(Ok(all)) => {
            let v: Vec<BaseInfo> = all
                .iter()
                .map(|b| BaseInfo {
                    id: b.manifest.id.to_hex(),
                    name: b.manifest.name.clone(),
                    bytes: b.size(),
                    created_unix: b.manifest.created_unix,
                    spec: b.manifest.spec.clone(),
                })
                .collect();
            Json(v).into_response()
        }
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", error_chain(&e)),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

async fn list_vms<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>) -> Response {
    let v: Vec<VmInfo> = st.vms.lock().unwrap_or_else(|e| e.into_inner()).values().map(|r| r.info.clone()).collect();
    Json(v).into_response()
}

async fn get_vm<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>, Path(id): Path<String>) -> Response {
    match st.vms.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        Some(r) => Json(r.info.clone()).into_response(),
        None => api_error(StatusCode::NOT_FOUND, "not_found", format!("no VM {id}")),
    }
}

async fn delete_vm<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>, Path(id): Path<String>) -> Response {
    let r = st.vms.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    match r {
        Some(r) => {
            let info = r.info.clone();
            let _ = tokio::task::spawn_blocking(move || r.stop()).await;
            tracing::info!(vm = %id, "stopped");
            Json(info).into_response()
        }
        None => api_error(StatusCode::NOT_FOUND, "not_found", format!("no VM {id}")),
    }
}

/// What a capture of a running VM needs of it.
struct Captured<V> {
    vm: Arc<Mutex<Option<V>>>,
    base: Arc<crate::RegisteredBase>,
    forwards: Vec<overlay_format::PortForward>,
    name: String,
}

/// The VM `id` and a synthesis slot for capturing it (a capture computes an overlay: it counts
/// against the syntheses at once); else the answer: 404, or 429.
#[allow(clippy::type_complexity)]
fn capture_slot<H: ServedHypervisor>(
    st: &AppState<H>,
    id: &str,
) -> Result<(Captured<H::Vm>, tokio::sync::OwnedSemaphorePermit), Box<Response>> {
    let found = st.vms.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|r| Captured {
        vm: r.vm.clone(),
        base: r.base.clone(),
        forwards: r.forwards.clone(),
        name: r.info.name.clone(),
    });
    let Some(found) = found else {
        return Err(Box::new(api_error(StatusCode::NOT_FOUND, "not_found", format!("no VM {id}"))));
    };
    let Ok(permit) = st.syntheses.clone().try_acquire_owned() else {
        let mut r = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!("{} syntheses or captures are running already; retry later", st.cfg.max_syntheses),
        );
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
        return Err(Box::new(r));
    };
    Ok((found, permit))
}

/// `GET /v1/vms/{id}/residue`: captures what the VM changed against its base (it is paused for
/// its snapshot, then runs again), writes it as an overlay in the work directory, and sends it.
/// The file is unlinked once open, so nothing of it outlives the answer.
async fn residue<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>, Path(id): Path<String>) -> Response {
    let (Captured { vm, base, forwards, name }, permit) = match capture_slot(&st, &id) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let out = st.cfg.work_dir.join(format!("{id}.residue-{}", st.next.fetch_add(1, Ordering::Relaxed)));
    let id2 = id.clone();
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut guard = vm.lock().unwrap_or_else(|e| e.into_inner());
        let Some(vm) = guard.as_mut() else {
            return Ok::<_, FlowError>(None);
        };
        let events = |e: Event| {
            if let Event::Step(s) = e {
                tracing::info!(vm = %id2, "residue: {s}");
            }
        };
        let req = crate::residue::ResidueRequest::new(&out, &name, &forwards);
        let outcome = crate::residue::capture_residue(vm, &base, &req, &events);
        drop(guard);
        let outcome = outcome?;
        let file = std::fs::File::open(&outcome.path);
        let _ = std::fs::remove_file(&outcome.path);
        let file = file.map_err(|source| FlowError::Io { path: outcome.path.clone(), source })?;
        Ok(Some((file, outcome)))
    });
    let (file, outcome) = match task.await {
        Ok(Ok(Some(v))) => v,
        Ok(Ok(None)) => return api_error(StatusCode::NOT_FOUND, "not_found", format!("VM {id} was stopped")),
        Ok(Err(e)) => {
            tracing::warn!(vm = %id, "residue failed: {}", error_chain(&e));
            return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", error_chain(&e));
        }
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("residue task: {e}")),
    };
    tracing::info!(
        vm = %id,
        "residue: {} bytes, paused {:.0} ms, {:.0} ms in all",
        outcome.bytes,
        outcome.paused.as_secs_f64() * 1e3,
        outcome.total.as_secs_f64() * 1e3
    );
    // The file is read on a blocking thread into a bounded channel: the client's pace.
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/vnd.cloudlet.overlay".to_string()),
            (header::CONTENT_LENGTH, outcome.bytes.to_string()),
            (header::HeaderName::from_static("x-cloudlet-paused-ms"), outcome.paused.as_millis().to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `POST /v1/vms/{id}/handoff`: pauses the VM, captures its residue, synthesizes it on the
/// destination (`POST /v1/synthesis` there), and once the destination answers that the VM runs
/// (and its app, with a probe), stops it here. If anything fails, the VM runs on here.
async fn handoff<H: ServedHypervisor>(
    State(st): State<Arc<AppState<H>>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let req: HandoffRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body is not a handoff request ({{\"to\": \"http://HOST:PORT\"}}): {e}"),
            )
        }
    };
    let client = match crate::client::Client::new(&req.to) {
        Ok(c) => match &req.to_token {
            Some(t) => c.token(t.clone()),
            None => c,
        },
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_request", format!("destination: {e}")),
    };
    let (Captured { vm, base, forwards, name }, permit) = match capture_slot(&st, &id) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (id2, st2) = (id.clone(), st.clone());
    // Everything happens in the task: a caller that goes away does not stop a handoff half-way.
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut guard = vm.lock().unwrap_or_else(|e| e.into_inner());
        let Some(v) = guard.as_mut() else {
            return Ok(None);
        };
        let events = |e: Event| {
            if let Event::Step(s) = e {
                tracing::info!(vm = %id2, "handoff: {s}");
            }
        };
        let opts =
            crate::handoff::MoveOptions { probe: req.probe, precopy: req.precopy, scratch: st2.cfg.work_dir.clone() };
        let moved = match crate::handoff::move_vm(v, &base, &name, &forwards, &client, &opts, &events) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(vm = %id2, "handoff failed, the VM runs on here: {}", error_chain(&e));
                return Err(e);
            }
        };
        if let Some(v) = guard.take() {
            let _ = v.shutdown();
        }
        drop(guard);
        let r = st2.vms.lock().unwrap_or_else(|e| e.into_inner()).remove(&id2);
        if let Some(r) = r {
            r.stop();
        }
        Ok(Some(HandoffResult {
            from_id: id2.clone(),
            to: client.url().to_string(),
            vm: moved.vm,
            residue_bytes: moved.residue_bytes,
            precopy_bytes: moved.precopy_bytes,
            final_bytes: moved.final_bytes,
            downtime_ms: moved.downtime.as_millis() as u64,
            total_ms: moved.total.as_millis() as u64,
        }))
    });
    match task.await {
        Ok(Ok(Some(result))) => {
            tracing::info!(
                vm = %id,
                "handed off to {} as {} ({} bytes before the pause, {} during it, down {} ms)",
                result.to,
                result.vm.id,
                result.precopy_bytes,
                result.final_bytes,
                result.downtime_ms
            );
            Json(result).into_response()
        }
        Ok(Ok(None)) => api_error(StatusCode::NOT_FOUND, "not_found", format!("VM {id} was stopped")),
        Ok(Err(e @ crate::handoff::MoveError::Capture(_))) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{}; the VM runs on here", error_chain(&e)),
        ),
        Ok(Err(e @ crate::handoff::MoveError::Destination { .. })) => {
            api_error(StatusCode::BAD_GATEWAY, "handoff_failed", format!("{}; it runs on here", error_chain(&e)))
        }
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("handoff task: {e}")),
    }
}

/// Query of `POST /v1/synthesis`.
#[derive(Debug, Deserialize)]
struct SynthesisQuery {
    /// Wait for an HTTP answer on this guest port.
    probe: Option<u16>,
    /// Early start: the segmented overlay at this http:// URL, read by range as the VM needs
    /// it; the request has no body.
    url: Option<String>,
    /// The body is a patch ([`crate::patch`]) against the overlay staged under this id
    /// (`POST /v1/stages`), which it uses up.
    patch_from: Option<String>,
}

/// The request body as a blocking [`Read`], fed by the async side.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

async fn synthesis<H: ServedHypervisor>(
    State(st): State<Arc<AppState<H>>>,
    headers: HeaderMap,
    Query(q): Query<SynthesisQuery>,
    body: Body,
) -> Response {
    let max = st.cfg.max_overlay_bytes;
    if let Some(r) = declared_too_large(&headers, max) {
        return r;
    }
    let Ok(permit) = st.syntheses.clone().try_acquire_owned() else {
        let mut r = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!("{} syntheses are running already; retry later", st.cfg.max_syntheses),
        );
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
        return r;
    };
    let running = st.vms.lock().map(|v| v.len()).unwrap_or(usize::MAX);
    if running.saturating_add(st.cfg.max_syntheses - st.syntheses.available_permits()) > st.cfg.max_vms {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "full",
            format!("{running} VMs are running, the limit is {}; delete one first", st.cfg.max_vms),
        );
    }
    let id = st.new_id();
    let dir = st.cfg.work_dir.join(&id);
    let dir2 = dir.clone();
    if let Some(url) = q.url {
        let (st2, id2, probe) = (st.clone(), id.clone(), q.probe);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            early_start(&st2, &id2, &url, dir, probe)
        });
        return answer(st, id, dir2, task, Arc::new(AtomicU64::new(0)), None, Arc::new(AtomicBool::new(false)), max)
            .await;
    }

    let stage = match q.patch_from.as_deref().map(|sid| stage_path(&st.cfg.work_dir, sid)) {
        None => None,
        Some(Some(p)) if p.is_file() => Some(p),
        Some(_) => {
            return api_error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no staged overlay {}", q.patch_from.as_deref().unwrap_or_default()),
            )
        }
    };
    let (rx, received, too_large, pump) = pump_body(body, max);
    let st2 = st.clone();
    let id2 = id.clone();
    let probe = q.probe;
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let body = ChannelReader { rx, cur: Bytes::new() };
        let opts = SynthesisOptions {
            out_dir: dir,
            probe_port: probe,
            probe_timeout: st2.cfg.probe_timeout,
            probe_path: "/".into(),
            probe_status: None,
            forward_address: st2.cfg.listen.ip().to_string(),
            in_place: true,
        };
        let events = |e: Event| {
            if let Event::Step(s) = e {
                tracing::info!(vm = %id2, "{s}");
            }
        };
        let Some(stage) = stage else {
            let reader = std::io::BufReader::with_capacity(1 << 20, body);
            return synthesize_with(&st2.hypervisor, &st2.registry, reader, &opts, &events).map(|s| (s, None));
        };
        // The staged overlay is used up, whatever happens.
        let reference = std::fs::read(&stage).map_err(|source| FlowError::Io { path: stage.clone(), source });
        let _ = std::fs::remove_file(&stage);
        let reference = reference?;
        let patched = crate::patch::patch_reader(&reference, body)
            .map_err(|source| FlowError::Io { path: stage.clone(), source })?;
        let reader = std::io::BufReader::with_capacity(1 << 20, Limited { inner: patched, left: max, max });
        synthesize_with(&st2.hypervisor, &st2.registry, reader, &opts, &events).map(|s| (s, None))
    });
    answer(st, id, dir2, task, received, Some(pump), too_large, max).await
}

/// Reads at most `max` bytes of `inner`, then fails: what a patch decodes to is bounded as an
/// upload is.
struct Limited<R> {
    inner: R,
    left: u64,
    max: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut one = [0u8; 1];
            return match self.inner.read(&mut one)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(format!("the patched overlay exceeds {} bytes", self.max))),
            };
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Pumps a request body into a bounded channel (backpressure reaches the client's TCP
/// window), at most `max` bytes: the receiver, the bytes received, whether the body was too
/// large, and the pump's task.
#[allow(clippy::type_complexity)]
fn pump_body(
    body: Body,
    max: u64,
) -> (mpsc::Receiver<Result<Bytes, std::io::Error>>, Arc<AtomicU64>, Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let received = Arc::new(AtomicU64::new(0));
    let too_large = Arc::new(AtomicBool::new(false));
    let pump = {
        let received = received.clone();
        let too_large = too_large.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut stream = body.into_data_stream();
            let mut draining = 0u64;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(b) => {
                        let n = received.fetch_add(b.len() as u64, Ordering::Relaxed) + b.len() as u64;
                        if tx.is_closed() {
                            draining += b.len() as u64;
                            if draining > DRAIN_LIMIT {
                                break;
                            }
                            continue;
                        }
                        if n > max {
                            too_large.store(true, Ordering::Relaxed);
                            let _ = tx.send(Err(std::io::Error::other(format!("overlay exceeds {max} bytes")))).await;
                            break;
                        }
                        let _ = tx.send(Ok(b)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(format!("upload failed: {e}")))).await;
                        break;
                    }
                }
            }
        })
    };

    (rx, received, too_large, pump)
}

/// 413 for a body whose declared length exceeds `max`, before any byte is read.
fn declared_too_large(headers: &HeaderMap, max: u64) -> Option<Response> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())?;
    (declared > max).then(|| {
        api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the overlay is {declared} bytes, this server takes at most {max}"),
        )
    })
}

/// How long a staged overlay is kept when nobody uses it.
const STAGE_TTL: Duration = Duration::from_secs(600);

/// The file of stage `id` (`st-` + 16 hex digits) in the work directory; `None` for any other
/// id.
fn stage_path(work_dir: &std::path::Path, id: &str) -> Option<PathBuf> {
    let hex = id.strip_prefix("st-")?;
    (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| work_dir.join("stages").join(id))
}

/// `POST /v1/stages`: holds the overlay in the body (whose base this server holds) for one
/// later `POST /v1/synthesis?patch_from=ID`, or for [`STAGE_TTL`].
async fn stage<H: ServedHypervisor>(State(st): State<Arc<AppState<H>>>, headers: HeaderMap, body: Body) -> Response {
    let max = st.cfg.max_overlay_bytes;
    if let Some(r) = declared_too_large(&headers, max) {
        return r;
    }
    let dir = st.cfg.work_dir.join("stages");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{}: {e}", dir.display()));
    }
    // Old stages go; at most max_vms are held.
    let mut held = 0;
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let old = e.metadata().and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default() > STAGE_TTL);
        if old.unwrap_or(true) {
            let _ = std::fs::remove_file(e.path());
        } else {
            held += 1;
        }
    }
    if held >= st.cfg.max_vms {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "full",
            format!("{held} staged overlays are held, the limit is {}; retry later", st.cfg.max_vms),
        );
    }
    let id = format!("st-{}", &blake3::hash(st.new_id().as_bytes()).to_hex()[..16]);
    let Some(path) = stage_path(&st.cfg.work_dir, &id) else {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("bad stage id {id}"));
    };
    let (rx, received, too_large, pump) = pump_body(body, max);
    let st2 = st.clone();
    let task = tokio::task::spawn_blocking(move || -> Result<crate::api::StageInfo, Box<Response>> {
        let partial = path.with_extension("partial");
        let internal =
            |e: std::io::Error| Box::new(api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&partial)?;
            let n = std::io::copy(&mut ChannelReader { rx, cur: Bytes::new() }, &mut f)?;
            f.sync_all()?;
            Ok::<u64, std::io::Error>(n)
        })();
        let checked = written.map_err(|e| {
            Box::new(api_error(StatusCode::BAD_REQUEST, "bad_overlay", format!("the upload did not arrive whole: {e}")))
        });
        let checked = checked.and_then(|n| {
            let f = std::fs::File::open(&partial).map_err(internal)?;
            let r = overlay_format::OverlayReader::new(std::io::BufReader::new(f)).map_err(|e| {
                Box::new(api_error(
                    StatusCode::BAD_REQUEST,
                    "bad_overlay",
                    format!("not an overlay: {}", error_chain(&e)),
                ))
            })?;
            let base_id = r.meta().base_id;
            match st2.registry.get(&base_id) {
                Ok(_) => Ok((n, base_id)),
                Err(base_registry::RegistryError::NotFound { .. }) => Err(Box::new(
                    (
                        StatusCode::NOT_FOUND,
                        Json(ApiError {
                            code: "unknown_base".into(),
                            error: format!("this server does not hold base {base_id}"),
                            base_id: Some(base_id.to_string()),
                        }),
                    )
                        .into_response(),
                )),
                Err(e) => Err(Box::new(api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", error_chain(&e)))),
            }
        });
        let (bytes, base_id) = match checked {
            Ok(v) => v,
            Err(r) => {
                let _ = std::fs::remove_file(&partial);
                return Err(r);
            }
        };
        if let Err(e) = std::fs::rename(&partial, &path) {
            let _ = std::fs::remove_file(&partial);
            return Err(internal(e));
        }
        Ok(crate::api::StageInfo { id, bytes, base_id: base_id.to_hex() })
    });
    let result = task.await;
    let _ = pump.await;
    if too_large.load(Ordering::Relaxed) {
        return api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the overlay exceeds {max} bytes, this server's limit"),
        );
    }
    match result {
        Ok(Ok(info)) => {
            tracing::info!("staged {} ({} bytes, {} received)", info.id, info.bytes, received.load(Ordering::Relaxed));
            (StatusCode::CREATED, Json(info)).into_response()
        }
        Ok(Err(r)) => *r,
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("stage task: {e}")),
    }
}

/// What a synthesis task ends with: the VM, and what serves it when it started early.
type Outcome<V> = Result<(crate::Synthesized<V>, Option<crate::early::Serving>), FlowError>;

/// A synthesis that starts the VM before its segmented overlay has arrived, reading it from
/// `url` by range.
fn early_start<H: ServedHypervisor>(
    st: &AppState<H>,
    id: &str,
    url: &str,
    dir: PathBuf,
    probe: Option<u16>,
) -> Outcome<H::Vm> {
    use crate::early::{synthesize_early, EarlyOptions, HttpSource};
    let mut opts = EarlyOptions::new(&dir);
    opts.forward_address = st.cfg.listen.ip().to_string();
    opts.probe = probe.map(|p| crate::HttpCheck::new(p, st.cfg.probe_timeout));
    let source = Arc::new(HttpSource::new(url, opts.stall_timeout)?);
    let events = |e: Event| {
        if let Event::Step(s) = e {
            tracing::info!(vm = %id, "{s}");
        }
    };
    let early = synthesize_early(&st.hypervisor, &st.registry, source, &opts, &events)?;
    let t = early.timeline.clone();
    let (base, meta, ports, answer) =
        (early.base.clone(), early.meta.clone(), early.ports.clone(), early.answer.clone());
    let (vm, serving) = early.into_parts();
    let timeline = crate::Timeline {
        receive: t.head,
        resume: t.resume,
        rebuild: t.prefetch,
        first_answer: t.first_answer.map(|a| a.saturating_sub(t.prefetch + t.resume)),
        total: t.first_answer.unwrap_or(t.prefetch + t.resume),
        ..Default::default()
    };
    let dir = serving.dir().to_owned();
    Ok((crate::Synthesized { vm, base, meta, timeline, ports, answer, dir }, Some(serving)))
}

/// The task of a synthesis, and the answer to its request.
#[allow(clippy::too_many_arguments)]
async fn answer<H: ServedHypervisor>(
    st: Arc<AppState<H>>,
    id: String,
    dir2: PathBuf,
    task: tokio::task::JoinHandle<Outcome<H::Vm>>,
    received: Arc<AtomicU64>,
    pump: Option<tokio::task::JoinHandle<()>>,
    too_large: Arc<AtomicBool>,
    max: u64,
) -> Response {
    // The outcome is handled in a task of its own: if the client goes away while its VM is
    // resuming, the handler future is dropped, and the VM must not be left running unlisted.
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Response>();
    tokio::spawn(async move {
        let t0 = Instant::now();
        let result = task.await;
        if let Some(pump) = pump {
            let _ = pump.await;
        }
        let bytes = received.load(Ordering::Relaxed);
        let response = outcome(&st, &id, &dir2, result, bytes, too_large.load(Ordering::Relaxed), max, t0);
        if let Err(response) = answer_tx.send(response) {
            // Nobody is waiting: undo a VM that was just started for them.
            if response.status() == StatusCode::CREATED {
                tracing::info!(vm = %id, "the client left before the answer: stopping the VM");
                let r = st.vms.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                if let Some(r) = r {
                    let _ = tokio::task::spawn_blocking(move || r.stop()).await;
                }
            }
        }
    });
    answer_rx.await.unwrap_or_else(|_| {
        api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the synthesis task ended without an answer".into())
    })
}

#[allow(clippy::too_many_arguments)]
fn outcome<H: Hypervisor>(
    st: &AppState<H>,
    id: &str,
    dir: &std::path::Path,
    result: Result<Outcome<H::Vm>, tokio::task::JoinError>,
    bytes: u64,
    too_large: bool,
    max: u64,
    t0: Instant,
) -> Response {
    let id = id.to_string();
    match result {
        Ok(Ok((s, serving))) => {
            let address = match st.cfg.listen.ip() {
                IpAddr::V4(a) if a.is_unspecified() => "0.0.0.0".to_string(),
                ip => ip.to_string(),
            };
            let info = VmInfo {
                id: id.clone(),
                name: s.meta.name.clone(),
                base_id: s.base.entry.manifest.id.to_hex(),
                base_name: s.base.entry.manifest.name.clone(),
                ports: s.ports.iter().map(|&(g, h)| PortInfo::listening(g, h, &address)).collect(),
                overlay_bytes: bytes,
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                timeline: TimelineMs::from(&s.timeline),
            };
            tracing::info!(
                vm = %id,
                "running '{}' ({bytes} overlay bytes, {:.0} ms)",
                info.name,
                t0.elapsed().as_secs_f64() * 1e3
            );
            if let Some(pid) = s.vm.pid() {
                // For the next server, should this one be killed (see `recover`).
                let _ = std::fs::write(s.dir.join(QEMU_PID_FILE), pid.to_string());
            }
            st.vms.lock().unwrap_or_else(|e| e.into_inner()).insert(
                id.clone(),
                Running {
                    info: info.clone(),
                    vm: Arc::new(Mutex::new(Some(s.vm))),
                    dir: s.dir,
                    base: Arc::new(s.base),
                    forwards: s.meta.forwards.clone(),
                    serving,
                },
            );
            (StatusCode::CREATED, [(header::LOCATION, format!("/v1/vms/{id}"))], Json(info)).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(vm = %id, "failed: {}", error_chain(&e));
            if too_large {
                return api_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the overlay exceeds {max} bytes, this server's limit"),
                );
            }
            flow_error(e)
        }
        Err(e) => {
            // A panic in the flow: a bug of ours, never the client's. Unwinding dropped the VM
            // and the flow's guards; the VM directory goes too, should anything be left.
            let what = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into()),
                Err(e) => e.to_string(),
            };
            let _ = std::fs::remove_dir_all(dir);
            tracing::error!(vm = %id, "failed: the synthesis task panicked: {what}");
            api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the synthesis failed on an internal error (a bug of this server): {what}"),
            )
        }
    }
}

/// The answer to a failed synthesis. Applying fails with the overlay's fault (a client error,
/// `bad_overlay`) or ours (`internal`: our disk, our files, a bug): [`delta_engine::Fault`].
fn flow_error(e: FlowError) -> Response {
    use delta_engine::Fault;
    let msg = error_chain(&e);
    match e {
        FlowError::UnknownBase { id } => (
            StatusCode::NOT_FOUND,
            Json(ApiError { code: "unknown_base".into(), error: msg, base_id: Some(id.to_string()) }),
        )
            .into_response(),
        FlowError::Apply(a) if a.fault() != Fault::Input => {
            api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
        }
        FlowError::Apply(_) | FlowError::BadOverlay { .. } => api_error(StatusCode::BAD_REQUEST, "bad_overlay", msg),
        FlowError::NoAnswer { .. } => api_error(StatusCode::GATEWAY_TIMEOUT, "no_answer", msg),
        FlowError::NotForwarded { .. } | FlowError::Unsupported { .. } => {
            api_error(StatusCode::BAD_REQUEST, "bad_request", msg)
        }
        _ => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
    }
}

/// The server's pid, in its work directory while it runs.
const PID_FILE: &str = "server.pid";
/// A running VM's QEMU pid, in its VM directory.
const QEMU_PID_FILE: &str = "qemu.pid";

/// What [`recover`] found and removed.
#[derive(Debug, Default)]
struct Recovered {
    dead_pid: Option<u32>,
    killed: Vec<u32>,
    dirs: Vec<PathBuf>,
    runtime: usize,
}

impl std::fmt::Display for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = match self.dead_pid {
            Some(p) => format!("the server before this one (pid {p})"),
            None => "an earlier server".into(),
        };
        write!(
            f,
            "recovered what {who} left: killed {} QEMU process(es) {:?}, removed {} VM director(ies) {:?} and {} \
             QEMU runtime director(ies)",
            self.killed.len(),
            self.killed,
            self.dirs.len(),
            self.dirs.iter().filter_map(|d| d.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>(),
            self.runtime
        )
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The command line of a process, arguments joined by spaces.
fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Whether `pid` is a QEMU running a VM of `vm_dirs` (its command line names a file there).
fn is_our_qemu(pid: u32, vm_dirs: &str) -> bool {
    cmdline(pid).is_some_and(|c| {
        c.split(' ').next().is_some_and(|exe| exe.rsplit('/').next().unwrap_or(exe).starts_with("qemu-system"))
            && c.contains(vm_dirs)
    })
}

/// A server killed with SIGKILL cannot stop its VMs: the next one on the same work directory
/// does. It claims the directory with its pid file (refusing one of a live server), kills the
/// QEMU processes whose command line names a VM directory of it (recorded in `qemu.pid`, or
/// found in `/proc` for a VM still resuming), and removes the VM directories and the dead
/// server's QEMU runtime directories. Returns what it removed, if anything.
fn recover(work_dir: &std::path::Path) -> Result<Option<Recovered>, ServerError> {
    let io = |what: String| move |source| ServerError::Io { what, source };
    let pid_file = work_dir.join(PID_FILE);
    let mut r = Recovered::default();
    if let Ok(text) = std::fs::read_to_string(&pid_file) {
        if let Ok(pid) = text.trim().parse::<u32>() {
            if pid != std::process::id() {
                if alive(pid) && cmdline(pid).is_some_and(|c| c.contains("serve")) {
                    return Err(ServerError::WorkDirInUse { dir: work_dir.to_owned(), pid });
                }
                r.dead_pid = Some(pid);
            }
        }
    }
    std::fs::write(&pid_file, std::process::id().to_string()).map_err(io(format!("writing {}", pid_file.display())))?;
    // VM directories are `vm-` + 12 hex digits; nothing else in the directory is touched.
    let vm_dirs: Vec<PathBuf> = std::fs::read_dir(work_dir)
        .map_err(io(format!("reading {}", work_dir.display())))?
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.len() == 15 && n.starts_with("vm-") && n[3..].bytes().all(|b| b.is_ascii_hexdigit())
        })
        .map(|e| e.path())
        .collect();
    let needle = format!("{}/vm-", work_dir.display());
    let mut pids: Vec<u32> = vm_dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join(QEMU_PID_FILE)).ok())
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        pids.extend(rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())));
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        if is_our_qemu(pid, &needle) {
            // SAFETY: kill(2) has no memory effects; the pid was just checked to be a QEMU
            // running a VM of this work directory.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let t0 = Instant::now();
            while alive(pid) && is_our_qemu(pid, &needle) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            r.killed.push(pid);
        }
    }
    // The memory and disks of VMs started early were served by the dead server: their mounts
    // are left, unserved, inside the VM directories.
    lazy_image::detach_stale(work_dir);
    for d in vm_dirs {
        std::fs::remove_dir_all(&d).map_err(io(format!("removing {}", d.display())))?;
        r.dirs.push(d);
    }
    // The dead server's QEMU runtime directories (sockets, qcow2 layers): vm-driver names
    // them `cloudlet-vm-PID-N`.
    if let Some(dead) = r.dead_pid.filter(|&p| !alive(p)) {
        let prefix = format!("cloudlet-vm-{dead}-");
        for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
            for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) && std::fs::remove_dir_all(e.path()).is_ok() {
                    r.runtime += 1;
                }
            }
        }
    }
    Ok((!r.killed.is_empty() || !r.dirs.is_empty() || r.runtime > 0).then_some(r))
}

/// Runs the recovery of [`Server::bind`] on the work directory of a server that is gone
/// (one killed with SIGKILL), then removes the directory if that leaves it empty. Returns a
/// line saying what was removed, if anything.
pub fn recover_abandoned(work_dir: &std::path::Path) -> Result<Option<String>, ServerError> {
    let r = recover(work_dir)?;
    let _ = std::fs::remove_file(work_dir.join(PID_FILE));
    let _ = std::fs::remove_dir(work_dir);
    Ok(r.map(|r| format!("{}: {r}", work_dir.display())))
}

/// Runs a server on a fresh multi-threaded runtime until Ctrl-C or SIGTERM; then stops every
/// VM it started and removes their files. `ready` is called with the bound address.
pub fn run_until_signal(cfg: ServerConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServerError::Io { what: "starting the runtime".into(), source })?;
    rt.block_on(async move {
        let server = Server::bind(cfg).await?;
        ready(server.local_addr());
        server.run(shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: stopping VMs");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_describes_every_route_and_error_code() {
        let spec = include_str!("../openapi.yaml");
        let src = include_str!("server.rs");
        for line in src.lines().filter(|l| l.trim_start().starts_with(".route(\"")) {
            let path = line.split('"').nth(1).unwrap();
            assert!(spec.contains(&format!("  {path}:")), "openapi.yaml lacks {path}");
        }
        for code in [
            "unauthorized",
            "too_large",
            "busy",
            "full",
            "unknown_base",
            "bad_overlay",
            "bad_request",
            "no_answer",
            "not_found",
            "handoff_failed",
        ] {
            assert!(src.contains(&format!("\"{code}\"")), "server.rs never answers {code}");
            assert!(spec.contains(code), "openapi.yaml lacks {code}");
        }
    }

    #[test]
    fn channel_reader_yields_chunks_then_errors() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"hello "))).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"world"))).unwrap();
        tx.try_send(Err(std::io::Error::other("gone"))).unwrap();
        let mut r = ChannelReader { rx, cur: Bytes::new() };
        let mut buf = [0u8; 4];
        let mut got = Vec::new();
        loop {
            match r.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert_eq!(e.to_string(), "gone");
                    break;
                }
            }
        }
        assert_eq!(got, b"hello world");
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        drop(tx);
        assert_eq!(ChannelReader { rx, cur: Bytes::new() }.read(&mut buf).unwrap(), 0);
    }

    fn state(dir: &std::path::Path) -> AppState<Qemu> {
        let cfg = ServerConfig::new(dir.join("registry"), dir.join("vms"));
        AppState {
            hypervisor: Qemu::new().unwrap(),
            registry: Registry::open(&cfg.registry).unwrap(),
            syntheses: Arc::new(Semaphore::new(cfg.max_syntheses)),
            cfg,
            vms: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        }
    }

    #[test]
    fn a_panicking_synthesis_is_a_500_and_leaves_no_files() {
        let work = tempfile::tempdir().unwrap();
        let st = state(work.path());
        let dir = work.path().join("vms").join("vm-000000000000");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory"), b"half written").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let result = rt.block_on(async {
            tokio::task::spawn_blocking(|| -> Outcome<<Qemu as Hypervisor>::Vm> { panic!("decoder bug") }).await
        });
        let r = outcome(&st, "vm-000000000000", &dir, result, 10, false, 100, Instant::now());
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = rt.block_on(axum::body::to_bytes(r.into_body(), 1 << 20)).unwrap();
        let e: ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.code, "internal");
        assert!(e.error.contains("decoder bug"), "{}", e.error);
        assert!(!dir.exists(), "{} is left behind", dir.display());
        assert!(st.vms.lock().unwrap().is_empty());
    }

    /// The overlay's faults are 400 `bad_overlay`; ours (I/O, a bug) are 500 `internal`.
    #[test]
    fn apply_errors_are_answered_by_whose_fault_they_are() {
        use delta_engine::{ApplyError as A, Fault};
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let cases = [
            (A::Mismatch { reason: "no".into() }, Fault::Input),
            (A::Record { image: "memory".into(), chunk: 1, reason: "no".into() }, Fault::Input),
            (A::DecoderPanic { frame: 2, offset: 3, reason: "boom".into() }, Fault::Input),
            (A::Decode(overlay_format::DecodeError::Truncated { offset: 0, what: "frame" }), Fault::Input),
            (A::Decode(overlay_format::DecodeError::Io { offset: 9, source: io() }), Fault::Input),
            (A::Io { path: "/vms/x/memory".into(), source: io() }, Fault::Io),
            (A::OutputExists { path: "/vms/x/memory".into() }, Fault::Io),
            (A::Internal { reason: "a thread stopped".into() }, Fault::Internal),
        ];
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for (e, fault) in cases {
            assert_eq!(e.fault(), fault, "{e:?}");
            let what = format!("{e:?}");
            let r = flow_error(FlowError::Apply(e));
            let (status, code) = match fault {
                Fault::Input => (StatusCode::BAD_REQUEST, "bad_overlay"),
                Fault::Io | Fault::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            };
            assert_eq!(r.status(), status, "{what}");
            let body = rt.block_on(axum::body::to_bytes(r.into_body(), 1 << 20)).unwrap();
            let answer: ApiError = serde_json::from_slice(&body).unwrap();
            assert_eq!(answer.code, code, "{what}");
            assert!(answer.error.contains("applying the overlay"), "{}", answer.error);
        }
    }

    #[test]
    fn a_non_loopback_address_needs_a_token_or_insecure() {
        let work = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut cfg = ServerConfig::new(work.path().join("registry"), work.path().join("vms"));
        cfg.listen = SocketAddr::from(([0, 0, 0, 0], 0));
        match rt.block_on(Server::bind(cfg.clone())) {
            Err(e @ ServerError::Insecure { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("0.0.0.0:0") && msg.contains("--token") && msg.contains("--insecure"), "{msg}");
            }
            Err(e) => panic!("expected Insecure, got {e:?}"),
            Ok(_) => panic!("bound 0.0.0.0 without a token"),
        }
        // Nothing was created for the refused server.
        assert!(!work.path().join("vms").exists());
        let with_token = ServerConfig { token: Some("t".into()), ..cfg.clone() };
        assert!(rt.block_on(Server::bind(with_token)).is_ok());
        let insecure = ServerConfig { insecure: true, ..cfg.clone() };
        assert!(rt.block_on(Server::bind(insecure)).is_ok());
        // Loopback needs neither.
        let lo = ServerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..cfg };
        assert!(rt.block_on(Server::bind(lo)).is_ok());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
