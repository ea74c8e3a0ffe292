//! VM synthesis flows composed from the overlay format, the delta engine and a hypervisor
//! (any [`vm_driver::Hypervisor`]; QEMU in the tool):
//!
//! - **base**: boot raw or qcow2 disk images (by their own bootloader, or a kernel), wait until
//!   the guest is ready, prepare it, snapshot disks + memory + device state, index it
//!   ([`create_base`]);
//! - **overlay**: resume the base, customize it, snapshot it, write the overlay
//!   ([`create_overlay_file`]);
//! - **synthesis**: rebuild the custom VM from base + overlay while the overlay streams in, and
//!   resume it with its port forwards ([`synthesize`]).
//!
//! # Features
//!
//! None is on by default: the flows alone pull in no async runtime and no HTTP stack.
//!
//! - `server`: `server` (the HTTP synthesis service, tokio + axum) and
//!   `discovery` (mDNS);
//! - `client`: `client`, a blocking client of that service (ureq).
//!
//! [`api`] holds the request and answer types of the HTTP API whatever the features.
//!
//! # Diagnostics
//!
//! The flows and the server never print: what they have to say are [`tracing`] events (the
//! server logs each VM's steps with a `vm` field). Install a subscriber to see them.
//!
//! # Example
//!
//! ```no_run
//! use synthesis::*;
//! use vm_driver::Qemu;
//!
//! let qemu = Qemu::new()?;
//! let registry = base_registry::Registry::open(&base_registry::Registry::default_dir())?;
//! let overlay = std::fs::File::open("app.overlay").map_err(|source| FlowError::Io { path: "app.overlay".into(), source })?;
//! // The overlay names its base by id; synthesis finds it in the registry.
//! let s = synthesize(&qemu, &registry, overlay, "vms/app".as_ref(), Some(8080), &|e| eprintln!("{e:?}"))?;
//! println!("app answers on 127.0.0.1:{:?} after {:?}", s.ports, s.timeline.total);
//! # Ok::<(), FlowError>(())
//! ```
#![deny(missing_docs)]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod api;
mod base;
#[cfg(feature = "client")]
pub mod client;
pub mod demo;
#[cfg(feature = "server")]
pub mod discovery;
mod disk;
pub mod early;
mod flows;
mod forward;
#[cfg(feature = "client")]
pub mod handoff;
mod http;
mod kept;
pub mod patch;
mod ready;
pub mod report;
pub mod residue;
#[cfg(feature = "server")]
pub mod server;
pub mod share;

use std::path::PathBuf;
use std::time::Duration;

pub use base::{export_base_file, RegisteredBase};
pub use disk::{probe_disk, InputFormat};
pub use flows::{
    create_base, create_overlay_file, interrupt_cleanup, interrupted, remove_on_interrupt, synthesize, synthesize_with,
    BaseRequest, BaseTimings, CommandChannel, OverlayOutcome, OverlayRequest, SynthesisOptions, Synthesized, Timeline,
    DEFAULT_READY_TIMEOUT, OVMF_CODE, OVMF_VARS, TRIM_COMMANDS,
};
pub use forward::{parse_forward, ForwardParseError, HttpTarget, HttpTargetError};
pub use http::{
    first_body_line, http_get_from, http_get_until, http_wait, parse_status_line, HttpAnswer, HttpCheck, POLL_INTERVAL,
};
pub use kept::{resume_kept, Resumed};
pub use ready::{ReadyCheck, CANARY_PORT};

/// The message of an error followed by those of all its sources, joined by `: `: what the
/// server puts in an error answer, what its log says and what `overlay-info` reports as the
/// damage (anyhow's `{:#}` prints the same for an `anyhow::Error`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Progress reported by the flows.
#[derive(Debug, Clone)]
pub enum Event {
    /// A step starts.
    Step(String),
    /// A person may now use the guest: its serial console is the unix socket `serial_socket`
    /// (one client at a time, e.g. `socat -,raw,echo=0 UNIX-CONNECT:PATH`), and its screen is
    /// on `vnc` when the flow was asked for a display. The flow goes on when the event callback
    /// returns, so a callback that handles this event returns when the person is done: after
    /// Enter on the terminal, say, or (with a display) once `viewer_closed` is set.
    Interactive {
        /// The guest's serial console.
        serial_socket: PathBuf,
        /// The VNC display (loopback), if any.
        vnc: Option<std::net::SocketAddr>,
        /// Set by the flow once a VNC viewer has connected and every viewer has disconnected
        /// again (the original workflow's "close the viewer when done").
        viewer_closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    },
    /// Bytes done in a long phase.
    Progress {
        /// `scan` or `apply`.
        phase: &'static str,
        /// Done.
        done: u64,
        /// Total.
        total: u64,
    },
}

/// Errors of the flows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The hypervisor failed.
    #[error("hypervisor")]
    Driver(#[from] vm_driver::DriverError),
    /// Creating the overlay failed.
    #[error("creating the overlay")]
    Create(#[from] delta_engine::CreateError),
    /// Applying the overlay failed.
    #[error("applying the overlay")]
    Apply(#[from] delta_engine::ApplyError),
    /// The base index failed.
    #[error("base index")]
    Index(#[from] delta_engine::IndexError),
    /// The base registry failed.
    #[error("base registry")]
    Registry(#[from] base_registry::RegistryError),
    /// The overlay needs a base this cloudlet does not have.
    #[error("the overlay needs base {id}, which is not in the registry")]
    UnknownBase {
        /// The base id the overlay names.
        id: overlay_format::BaseId,
    },
    /// A file operation failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A base directory is not usable.
    #[error("base {dir}: {reason}")]
    BadBase {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// An output exists already.
    #[error("{path} already exists")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// A guest command failed.
    #[error("guest command '{command}' exited with {status}: {output}")]
    GuestCommand {
        /// The command.
        command: String,
        /// Its status.
        status: i32,
        /// Its output.
        output: String,
    },
    /// A host tool failed.
    #[error("{tool} failed: {output}")]
    Tool {
        /// The tool.
        tool: String,
        /// Its stderr.
        output: String,
    },
    /// The overlay's VM spec does not match its base's: the device state would not load, or
    /// would load into a VM that is not the one it was taken from.
    #[error("the overlay's {field} is {overlay}, but its base's is {base}")]
    BadOverlay {
        /// The spec field (`ram_bytes`, `machine_type`, `disks`, ...).
        field: &'static str,
        /// Its value in the overlay.
        overlay: String,
        /// Its value in the base.
        base: String,
    },
    /// The app did not give the awaited HTTP answer on its forwarded port in time.
    #[error("{}", no_answer(*.guest_port, .address, .path, *.expect_status, *.timeout, .last))]
    NoAnswer {
        /// The guest port, when known.
        guest_port: Option<u16>,
        /// The forward's host address and port.
        address: String,
        /// The path asked for.
        path: String,
        /// The status awaited (`None`: any HTTP answer).
        expect_status: Option<u16>,
        /// How long we tried.
        timeout: Duration,
        /// What the last attempt saw: "answers 404 Not Found", "no connection (...)", ...
        last: String,
    },
    /// A guest port to wait on or probe that the VM does not forward.
    #[error("guest port {port} is not forwarded by the overlay; {}", forwarded_list(.forwarded))]
    NotForwarded {
        /// The port asked for.
        port: u16,
        /// The guest ports the overlay forwards.
        forwarded: Vec<u16>,
    },
    /// A disk image given for a base cannot be used as it is.
    #[error("disk image {path}: {reason}")]
    BadDisk {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A booted guest did not become ready in time.
    #[error("the guest was not ready within {}: waiting for {waiting_for}; the last attempt: {last}", http::secs(*.timeout))]
    NotReady {
        /// What was awaited.
        waiting_for: String,
        /// How long.
        timeout: Duration,
        /// What the last attempt saw.
        last: String,
    },
    /// A UEFI firmware file is missing or unreadable.
    #[error("UEFI firmware {what} {path} cannot be read (Debian's ovmf package has it: apt-get install ovmf)")]
    MissingFirmware {
        /// `code` or `variable store`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An overlay could not be read.
    #[error("reading the overlay")]
    Decode(#[from] overlay_format::DecodeError),
    /// Serving the VM's images failed.
    #[error("serving the VM's images")]
    Lazy(#[from] lazy_image::LazyError),
    /// An early start failed: the overlay's source went away, stalled or sent bad bytes, or
    /// the overlay cannot be used before it has arrived.
    #[error("early start: {reason}")]
    EarlyStart {
        /// Why.
        reason: String,
    },
    /// Something the flows do not support.
    #[error("{what} is not supported")]
    Unsupported {
        /// What.
        what: String,
    },
}

fn forwarded_list(ports: &[u16]) -> String {
    if ports.is_empty() {
        return "it forwards no ports".into();
    }
    let list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    format!("it forwards guest port(s) {}", list.join(", "))
}

fn no_answer(
    guest_port: Option<u16>,
    address: &str,
    path: &str,
    expect: Option<u16>,
    timeout: Duration,
    last: &str,
) -> String {
    let port = match guest_port {
        Some(p) => format!("guest port {p} (forwarded to {address})"),
        None => address.to_string(),
    };
    let t = http::secs(timeout);
    match (last.strip_prefix("answers "), expect) {
        (Some(status), Some(want)) => format!("{port} answers {status} on {path}, not {want}, after {t}"),
        _ => {
            let what = expect.map(|s| format!("HTTP {s} answer")).unwrap_or_else(|| "HTTP answer".into());
            format!("no {what} from {port} on {path} within {t}; the last attempt: {last}")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_joins_every_source() {
        let io = std::io::Error::other("disk full");
        let e = super::FlowError::Io { path: "vms/app/memory".into(), source: io };
        assert_eq!(super::error_chain(&e), "vms/app/memory: disk full");
        let outer = super::FlowError::Driver(vm_driver::DriverError::Io {
            what: "x".into(),
            source: std::io::Error::other("y"),
        });
        assert_eq!(super::error_chain(&outer), "hypervisor: cannot x: y");
    }
}
