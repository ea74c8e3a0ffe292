//! Moving a running synthesized VM to another synthesis server ([`move_vm`]): what a
//! `POST /v1/vms/{id}/handoff` does on the source.
//!
//! With pre-copy (the default), a first residue is captured while the VM runs on (a pause of
//! one snapshot) and staged on the destination (`POST /v1/stages`); then the VM is paused, its
//! residue captured again, and only the difference between the two residues is sent
//! ([`crate::patch`]): the destination rebuilds the second residue from the staged first and
//! synthesizes it (`POST /v1/synthesis?patch_from=ID`). Without pre-copy, the paused VM's whole
//! residue goes. Either way, if the destination does not take the VM, it is resumed here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use overlay_format::PortForward;
use vm_driver::Vm;

use crate::api::VmInfo;
use crate::base::RegisteredBase;
use crate::client::{Client, ClientError, UploadOptions};
use crate::residue::{capture_residue, AfterCapture, ResidueRequest};
use crate::{Event, FlowError};

/// How [`move_vm`] moves a VM.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// Guest port on which the destination waits for the app's first HTTP answer before the
    /// move counts as done.
    pub probe: Option<u16>,
    /// Send a first residue while the VM runs, then only what changed (the default).
    pub precopy: bool,
    /// The directory the residues are written to while they are sent (removed after).
    pub scratch: PathBuf,
}

/// A VM moved by [`move_vm`].
#[derive(Debug, Clone)]
pub struct Moved {
    /// The VM on the destination.
    pub vm: VmInfo,
    /// The residue at the pause.
    pub residue_bytes: u64,
    /// The first residue, sent while the VM ran (0 without pre-copy).
    pub precopy_bytes: u64,
    /// Sent while the VM was paused.
    pub final_bytes: u64,
    /// From the pause until the destination's answer.
    pub downtime: Duration,
    /// The whole move.
    pub total: Duration,
}

/// Why a move failed; the VM runs on here in every case.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// Capturing or diffing the VM's state failed here.
    #[error("capturing the VM")]
    Capture(#[source] FlowError),
    /// The destination did not take the VM: unreachable, refused, failed or gone mid-way.
    #[error("the destination {to} did not take the VM")]
    Destination {
        /// The destination.
        to: String,
        /// Its answer or the transport's error.
        #[source]
        source: ClientError,
    },
}

/// Removes the listed files on drop.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Moves `vm`, synthesized from `base` with the app `name` and its `forwards`, to the server
/// of `to`, which must hold the base. On success the VM here is left paused, for the caller
/// to stop; on error it is resumed here.
pub fn move_vm<V: Vm>(
    vm: &mut V,
    base: &RegisteredBase,
    name: &str,
    forwards: &[PortForward],
    to: &Client,
    opts: &MoveOptions,
    events: &(dyn Fn(Event) + Sync),
) -> Result<Moved, MoveError> {
    let t0 = Instant::now();
    let file = |kind: &str| opts.scratch.join(format!("{kind}-{}-{}", std::process::id(), t0.elapsed().as_nanos()));
    let mut scratch = Scratch(Vec::new());
    let destination = |source| MoveError::Destination { to: to.url().to_string(), source };
    let mut staged = None;
    let options = residue_options(opts.precopy);
    if opts.precopy {
        let first = file("precopy");
        scratch.0.push(first.clone());
        let req = ResidueRequest {
            after: AfterCapture::Resume,
            options: options.clone(),
            ..ResidueRequest::new(&first, name, forwards)
        };
        let r = capture_residue(vm, base, &req, events).map_err(MoveError::Capture)?;
        events(Event::Step(format!("staging {} bytes on {} while the VM runs", r.bytes, to.url())));
        let stage = to.stage(&first).map_err(destination)?;
        staged = Some((first, stage, r.bytes));
    }
    let paused = Instant::now();
    let last = file("residue");
    scratch.0.push(last.clone());
    let req = ResidueRequest { after: AfterCapture::Pause, options, ..ResidueRequest::new(&last, name, forwards) };
    // From here on, the VM is paused: any failure resumes it.
    let result = (|| {
        let residue = capture_residue(vm, base, &req, events).map_err(MoveError::Capture)?;
        let upload = UploadOptions { probe: opts.probe, retries: 0, on_busy: None, on_progress: None };
        let (info, precopy_bytes, final_bytes) = match &staged {
            None => {
                events(Event::Step(format!("sending {} bytes to {}", residue.bytes, to.url())));
                (to.synthesize(&last, &upload).map_err(destination)?, 0, residue.bytes)
            }
            Some((first, stage, first_bytes)) => {
                let patch = file("patch");
                scratch.0.push(patch.clone());
                let n = write_patch(first, &last, &patch).map_err(MoveError::Capture)?;
                events(Event::Step(format!(
                    "sending {n} bytes to {}: the residue as a difference from the staged one",
                    to.url()
                )));
                (to.synthesize_patch(&patch, &stage.id, &upload).map_err(destination)?, *first_bytes, n)
            }
        };
        Ok((info, residue.bytes, precopy_bytes, final_bytes))
    })();
    match result {
        Ok((vm_info, residue_bytes, precopy_bytes, final_bytes)) => Ok(Moved {
            vm: vm_info,
            residue_bytes,
            precopy_bytes,
            final_bytes,
            downtime: paused.elapsed(),
            total: t0.elapsed(),
        }),
        Err(e) => {
            if let Err(r) = vm.resume() {
                tracing::error!("the VM could not be resumed after the failed move: {}", crate::error_chain(&r));
            }
            Err(e)
        }
    }
}

/// How a handoff's residues are written. For a patch between two of them, a chunk that changed
/// must change only the bytes of its own blob: the blobs of compressible chunks are compressed
/// alone (no chain, in which every blob after a change would differ) and small (256 KiB before
/// compression). Incompressible chunks keep their large blobs with a long window, which find data
/// repeated across memory and disk (a file in the page cache and on disk) and rarely change
/// between two rounds. Without pre-copy, the engine's defaults (the smallest residue).
fn residue_options(precopy: bool) -> delta_engine::CreateOptions {
    let defaults = delta_engine::CreateOptions::default();
    if !precopy {
        return defaults;
    }
    delta_engine::CreateOptions { chain: false, blob_bytes: 256 << 10, ..defaults }
}

/// Writes to `out` the patch that makes `last` of `first`: its size.
fn write_patch(first: &Path, last: &Path, out: &Path) -> Result<u64, FlowError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| FlowError::Io { path, source }
    };
    let reference = std::fs::read(first).map_err(io(first))?;
    let target = std::fs::File::open(last).map_err(io(last))?;
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(out).map_err(io(out))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let n = crate::patch::encode_patch(&reference, std::io::BufReader::new(target), &mut w).map_err(io(out))?;
    Ok(n)
}
