//! The residue of a synthesized VM: everything it changed against its base, captured while it
//! runs, as an ordinary overlay. Synthesis applies a residue as it applies any overlay, and the
//! VM resumes as it was at the capture: its memory, its disks and its device state.
//!
//! The VM must run on files it may change: synthesis with [`crate::SynthesisOptions::in_place`]
//! (the default), or early start ([`crate::early`]), whose memory and disks are served and read
//! back through their mount. The capture pauses the VM for its snapshot: the device state, and,
//! for a VM that runs again, a copy of its memory and of its disk layers, from which the overlay
//! is computed while it runs; a VM that stays paused is read in place.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use delta_engine::{CreateOptions, CreateStats, OverlayInfo};
use overlay_format::PortForward;
use vm_driver::Vm;

use crate::base::RegisteredBase;
use crate::flows::{fresh_sibling, now_unix, publish, write_overlay};
use crate::{Event, FlowError};

/// What the VM does once its state is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterCapture {
    /// It runs again (the default): the residue is a copy of its state at the capture.
    #[default]
    Resume,
    /// It stays paused, for its caller to resume or stop; for a VM that moves elsewhere.
    Pause,
}

/// What [`capture_residue`] captures and where it writes it.
#[derive(Debug, Clone)]
pub struct ResidueRequest {
    /// The overlay file to write (must not exist).
    pub out: PathBuf,
    /// Name of the app, recorded in the residue.
    pub name: String,
    /// The VM's port forwards, recorded in the residue (those of the overlay it was
    /// synthesized from).
    pub forwards: Vec<PortForward>,
    /// Engine options (compression, level).
    pub options: CreateOptions,
    /// What the VM does once its state is captured.
    pub after: AfterCapture,
}

impl ResidueRequest {
    /// Defaults: the engine's default options, and the VM runs again after the capture.
    pub fn new(out: impl Into<PathBuf>, name: &str, forwards: &[PortForward]) -> Self {
        ResidueRequest {
            out: out.into(),
            name: name.into(),
            forwards: forwards.to_vec(),
            options: CreateOptions::default(),
            after: AfterCapture::Resume,
        }
    }
}

/// Result of [`capture_residue`].
#[derive(Debug, Clone)]
pub struct ResidueOutcome {
    /// The residue file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Engine statistics.
    pub stats: CreateStats,
    /// With [`AfterCapture::Resume`], how long the VM was paused (for the snapshot); with
    /// [`AfterCapture::Pause`], how long the device state took to save.
    pub paused: Duration,
    /// Snapshot and overlay, in all.
    pub total: Duration,
}

/// Captures what `vm`, synthesized from `base`, changed against it, as an overlay at `req.out`.
/// Nothing is left at `req.out` or next to it on error. The VM is resumed after its snapshot
/// with [`AfterCapture::Resume`], also when computing the overlay fails afterwards.
pub fn capture_residue<V: Vm>(
    vm: &mut V,
    base: &RegisteredBase,
    req: &ResidueRequest,
    events: &(dyn Fn(Event) + Sync),
) -> Result<ResidueOutcome, FlowError> {
    if req.out.symlink_metadata().is_ok() {
        return Err(FlowError::Exists { path: req.out.clone() });
    }
    crate::flows::check_forwards(&req.forwards, None)?;
    let (work, _work_guard) = fresh_sibling(&req.out, "work", |p| std::fs::create_dir(p))?;
    events(Event::Step("pausing the VM to snapshot it".into()));
    let t0 = Instant::now();
    // A VM that stays paused is read where it is; one that runs again, from copies.
    let snapshot = match req.after {
        AfterCapture::Pause => vm.snapshot_in_place(&work.join("vm")),
        AfterCapture::Resume => vm.snapshot(&work.join("vm")),
    };
    // Resumed whatever the snapshot did: a VM whose capture failed goes on serving.
    let resumed = match req.after {
        AfterCapture::Resume => vm.resume(),
        AfterCapture::Pause => Ok(()),
    };
    let paused = t0.elapsed();
    let snap = snapshot?;
    resumed?;
    let info = OverlayInfo {
        base_id: base.id(),
        spec: base.entry.manifest.spec.clone(),
        forwards: req.forwards.clone(),
        name: req.name.clone(),
        creator: format!("cloudlet {} (residue)", env!("CARGO_PKG_VERSION")),
        created_unix: now_unix(),
    };
    let (partial, mut guard, stats) = write_overlay(base, &snap, &info, &req.options, &req.out, events)?;
    let bytes = std::fs::metadata(&partial).map_err(|source| FlowError::Io { path: partial.clone(), source })?.len();
    publish(&partial, &req.out)?;
    guard.disarm();
    Ok(ResidueOutcome { path: req.out.clone(), bytes, stats, paused, total: t0.elapsed() })
}
