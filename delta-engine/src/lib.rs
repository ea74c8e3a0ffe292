//! Deduplicated deltas between a base VM's images and a custom VM's images, and their
//! application: the core of VM synthesis.
//!
//! Creating an overlay classifies every 4 KiB chunk of the custom VM's images: equal to the
//! base chunk at the same offset (free), all zero, equal to any base chunk (memory or disk,
//! found through the [`BaseIndex`]), equal to an earlier chunk of the overlay, a small patch
//! of the same-offset base chunk, or raw. Applying streams the overlay, decompresses blobs in
//! parallel and writes the records into sparse copies of the base images, then checks every
//! image digest.
//!
//! # Example
//!
//! ```
//! use delta_engine::*;
//! use overlay_format::{BaseId, ImageKind, VmSpec};
//!
//! let dir = tempfile::tempdir()?;
//! let base_mem = dir.path().join("base.ram");
//! let custom_mem = dir.path().join("custom.ram");
//! let mut bytes = vec![0u8; 64 * 4096];
//! bytes[4096..8192].fill(7);
//! std::fs::write(&base_mem, &bytes)?;
//! bytes[40 * 4096..41 * 4096].fill(7); // a copy of a base page
//! bytes[100] = 1; // a small edit
//! std::fs::write(&custom_mem, &bytes)?;
//!
//! let images = [BaseImage { name: "memory".into(), kind: ImageKind::Memory, path: base_mem }];
//! let base = Base::build(&images, &|_| {})?;
//! let info = OverlayInfo {
//!     base_id: BaseId([1; 32]),
//!     spec: VmSpec {
//!         machine_type: "pc-q35-10.0".into(), cpu_model: "qemu64".into(), vcpus: 1,
//!         ram_bytes: bytes.len() as u64, qemu_version: "10.0.2".into(), accelerator: "tcg".into(),
//!         disks: vec![], kernel_cmdline: None,
//!     },
//!     forwards: vec![], name: "demo".into(), creator: "doc".into(), created_unix: 0,
//! };
//! let custom = [CustomImage { name: "memory".into(), source: CustomSource::Raw(custom_mem) }];
//! let (overlay, stats) =
//!     create_overlay(&base, &custom, &info, b"state", &CreateOptions::default(), &|_| {}, Vec::new())?;
//! assert_eq!(stats.kinds.copy_base.chunks, 1);
//!
//! let out = dir.path().join("rebuilt.ram");
//! let opts = ApplyOptions {
//!     base_id: BaseId([1; 32]),
//!     outputs: vec![("memory".into(), out.clone())],
//!     fsync: false,
//!     qcow2_disks: false,
//!     max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
//! };
//! let report = apply_overlay(&base, &overlay[..], &opts, &|_| {})?;
//! assert_eq!(report.device_state, b"state");
//! assert_eq!(std::fs::read(out)?, bytes);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod apply;
mod base;
mod create;
mod file;
pub mod fuzzing;
pub mod index;
pub mod qcow2;
mod segment;

pub use apply::{apply_overlay, apply_overlay_reader, ApplyError, ApplyOptions, ApplyReport, DEFAULT_MAX_DISK_GROWTH};
pub use base::Base;
pub use create::{
    content_lane, create_overlay, looks_incompressible, CreateError, CreateOptions, CreateStats, CustomImage,
    CustomSource, OverlayInfo,
};
pub use index::{BaseImage, BaseIndex, IndexError, IndexedImage};
pub use segment::{segment_overlay, SegmentError, SegmentOptions, SegmentStats, TouchOrder};

/// Whose fault an error is (see [`ApplyError::fault`] and [`CreateError::fault`]): what a
/// caller needs to tell its own caller, e.g. a server's client error from its server error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The input's: a damaged, hostile or mismatching overlay (or custom image). A server
    /// answers with a client error.
    Input,
    /// The machine's: a file that cannot be read or written (disk full, permissions, an
    /// output in the way).
    Io,
    /// The engine's own: a bug.
    Internal,
}

/// Progress of a long operation.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// `scan` (creating) or `apply`.
    pub phase: &'static str,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all; 0 when unknown (applying a stream: `done` counts bytes rebuilt).
    pub total: u64,
}

/// Chunks, records and payload bytes of one record kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCount {
    /// Records.
    pub records: u64,
    /// Chunks covered.
    pub chunks: u64,
    /// Payload bytes (patch and raw).
    pub bytes: u64,
}

impl KindCount {
    fn add(&mut self, chunks: u64) {
        self.records += 1;
        self.chunks += chunks;
    }
}

/// Counts by record kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Zero runs.
    pub zero: KindCount,
    /// Copies from the base.
    pub copy_base: KindCount,
    /// Copies from earlier chunks of the overlay.
    pub copy_self: KindCount,
    /// Patches.
    pub patch: KindCount,
    /// Raw chunks.
    pub raw: KindCount,
}
