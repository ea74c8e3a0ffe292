//! The JSON shapes shared by the server's answers, `cloudlet client --json`,
//! `cloudlet synthesis --json` and `cloudlet overlay-info --json`: one type per concept.
//!
//! - [`Forward`]: a port forward, `{"protocol": "tcp", "guest": 80, "host": 8080,
//!   "address": "127.0.0.1"}` (`address` only once a VM listens; `host` 0 in an overlay means
//!   "any free port");
//! - [`Timeline`]: how a synthesis went, in milliseconds;
//! - [`VmInfo`]: a VM the server runs; [`ApiError`]: an error answer;
//! - [`Health`]: `GET /healthz`; [`BaseInfo`]: an entry of `GET /v1/bases`.
//!
//! The server (feature `server`) answers with these types and the client (feature `client`)
//! reads them, so the two cannot drift apart; `synthesis/openapi.yaml` describes them.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A port forward from the host into the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Forward {
    /// `tcp` or `udp`.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// Guest port.
    pub guest: u16,
    /// Host port (0 in an overlay: any free port).
    pub host: u16,
    /// Host address the port listens on, once a VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

fn tcp() -> String {
    "tcp".into()
}

impl Forward {
    /// An overlay's recorded forward (no address: no VM listens yet).
    pub fn recorded(f: &overlay_format::PortForward) -> Self {
        let protocol = match f.protocol {
            overlay_format::Protocol::Tcp => "tcp",
            overlay_format::Protocol::Udp => "udp",
        };
        Forward { protocol: protocol.into(), guest: f.guest_port, host: f.host_port, address: None }
    }

    /// A forward of a running VM.
    pub fn listening(guest: u16, host: u16, address: &str) -> Self {
        Forward { protocol: "tcp".into(), guest, host, address: Some(address.into()) }
    }
}

impl std::fmt::Display for Forward {
    /// `tcp:HOST:GUEST`, the spelling of `--forward`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.protocol, self.host, self.guest)
    }
}

/// The synthesis timeline in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    /// Until the last overlay byte arrived (chained blobs are decompressed as they arrive).
    pub receive: f64,
    /// Decoding on the pool (blobs compressed alone decompressed, every blob checked, raw
    /// chunks hashed), summed over threads.
    pub decompress: f64,
    /// Writing records.
    pub apply: f64,
    /// Digest check.
    pub verify: f64,
    /// Receive + decompress + apply + verify, overlapped.
    pub rebuild: f64,
    /// QEMU start and device state load.
    pub resume: f64,
    /// First HTTP answer of the app, when probed.
    pub first_answer: Option<f64>,
    /// Everything, from the first byte.
    pub total: f64,
}

impl From<&crate::Timeline> for Timeline {
    fn from(t: &crate::Timeline) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Timeline {
            receive: ms(t.receive),
            decompress: ms(t.decompress),
            apply: ms(t.apply),
            verify: ms(t.verify),
            rebuild: ms(t.rebuild),
            resume: ms(t.resume),
            first_answer: t.first_answer.map(ms),
            total: ms(t.total),
        }
    }
}

/// A running VM as the server shows it (and `cloudlet client --json` prints it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    /// VM id (`vm-` + 12 hex digits).
    pub id: String,
    /// App name from the overlay.
    pub name: String,
    /// Base id.
    pub base_id: String,
    /// Base name.
    pub base_name: String,
    /// Forwarded ports.
    pub ports: Vec<Forward>,
    /// Overlay bytes received.
    pub overlay_bytes: u64,
    /// Unix time of the resume.
    pub created_unix: u64,
    /// How synthesis went.
    pub timeline: Timeline,
}

/// `GET /healthz`: liveness and the server's limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// The server's crate version.
    pub version: String,
    /// VMs running now.
    pub running_vms: usize,
    /// Syntheses in progress.
    pub syntheses: usize,
    /// Syntheses at once (429 above).
    pub max_syntheses: usize,
    /// Running VMs at once (503 above).
    pub max_vms: usize,
    /// Largest overlay accepted, in bytes (413 above).
    pub max_overlay_bytes: u64,
}

/// A base VM the server holds (`GET /v1/bases`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseInfo {
    /// Base id, 64 hex digits.
    pub id: String,
    /// Base name.
    pub name: String,
    /// Bytes on disk.
    pub bytes: u64,
    /// Unix time of the registration.
    pub created_unix: u64,
    /// The VM spec an overlay of this base must have.
    pub spec: overlay_format::VmSpec,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    /// Machine-readable kind: `unauthorized`, `too_large`, `busy`, `full`, `unknown_base`,
    /// `bad_overlay`, `no_answer`, `not_found`, `internal`.
    pub code: String,
    /// Human-readable message with its causes.
    pub error: String,
    /// With `unknown_base`: the base the overlay needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_id: Option<String>,
}

impl std::fmt::Display for ApiError {
    /// `CODE: ERROR`, e.g. `busy: 2 syntheses are running already; retry later`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.error)
    }
}

/// The body of `POST /v1/vms/{id}/handoff`: where the VM goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoffRequest {
    /// The destination server, `http://HOST:PORT`; it must hold the VM's base.
    pub to: String,
    /// The destination's bearer token, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_token: Option<String>,
    /// Guest port on which the destination waits for the app's first HTTP answer before the
    /// source VM is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<u16>,
    /// Pre-copy (the default): send a first residue while the VM runs, then, paused, only
    /// its difference from the first. Off: stop and copy, the whole residue while paused.
    #[serde(default = "yes")]
    pub precopy: bool,
}

fn yes() -> bool {
    true
}

/// The answer to `POST /v1/stages`: an overlay the server holds for a later
/// `POST /v1/synthesis?patch_from=ID`, which uses it once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StageInfo {
    /// `st-` + 16 hex digits.
    pub id: String,
    /// Its size.
    pub bytes: u64,
    /// The base it names (which the server holds).
    pub base_id: String,
}

/// The answer to a handoff that succeeded: the VM runs on the destination, and no longer here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HandoffResult {
    /// The VM's id on the source (stopped there).
    pub from_id: String,
    /// The destination server.
    pub to: String,
    /// The VM on the destination: its id there, and its forwards on the destination's address.
    pub vm: VmInfo,
    /// The residue at the pause, in bytes.
    pub residue_bytes: u64,
    /// With pre-copy, the first residue, sent while the VM ran (0 without).
    pub precopy_bytes: u64,
    /// What was sent while the VM was paused: the difference from the first residue, or
    /// the whole residue without pre-copy.
    pub final_bytes: u64,
    /// From the pause on the source until the destination answered that the VM runs there
    /// (and, with a probe, that its app answered).
    pub downtime_ms: u64,
    /// The whole handoff.
    pub total_ms: u64,
}
