//! What the flows produced, as plain data a program can print, log or serialize: the JSON
//! shapes of `cloudlet base --json`, `overlay --json`, `synthesis --json` and
//! `list-base --json`, built from the flows' results, and the sizes they show.
//!
//! Field names (and, with `serde_json`, their order: alphabetical within each object) are those
//! the `cloudlet` tool has always printed. Durations are milliseconds (`f64`).
//!
//! ```no_run
//! use synthesis::report::BaseListing;
//!
//! let registry = base_registry::Registry::open_existing(&base_registry::Registry::default_dir())?;
//! for b in BaseListing::all(&registry)? {
//!     println!("{} {} {} bytes on disk", &b.id[..16], b.name, b.bytes_on_disk);
//! }
//! # Ok::<(), base_registry::RegistryError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use base_registry::{BaseEntry, Registry, RegistryError};
use serde::{Deserialize, Serialize};

use crate::{api, BaseTimings, OverlayOutcome, RegisteredBase, Synthesized};

/// Allocated (on disk) and apparent bytes of the files directly in `dir` (sparse images take
/// less on disk than their length). An unreadable directory or file counts as empty.
pub fn dir_sizes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut alloc, mut apparent) = (0, 0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for m in rd.flatten().filter_map(|e| e.metadata().ok()) {
            alloc += m.blocks() * 512;
            apparent += m.len();
        }
    }
    (alloc, apparent)
}

/// A duration in milliseconds, as every report shows it.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Records, chunks and payload bytes of one record kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStats {
    /// Payload bytes (patch and raw records).
    pub bytes: u64,
    /// Chunks covered.
    pub chunks: u64,
    /// Records.
    pub records: u64,
}

impl From<&delta_engine::KindCount> for KindStats {
    fn from(c: &delta_engine::KindCount) -> Self {
        KindStats { bytes: c.bytes, chunks: c.chunks, records: c.records }
    }
}

/// [`KindStats`] for each record kind of an overlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kinds {
    /// Copies of base chunks.
    pub copy_base: KindStats,
    /// Copies of earlier chunks of the overlay.
    pub copy_self: KindStats,
    /// Patches against a base chunk.
    pub patch: KindStats,
    /// Raw chunks.
    pub raw: KindStats,
    /// Zero runs.
    pub zero: KindStats,
}

impl From<&delta_engine::KindCounts> for Kinds {
    fn from(k: &delta_engine::KindCounts) -> Self {
        Kinds {
            copy_base: (&k.copy_base).into(),
            copy_self: (&k.copy_self).into(),
            patch: (&k.patch).into(),
            raw: (&k.raw).into(),
            zero: (&k.zero).into(),
        }
    }
}

/// Timings of the base flow, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseMs {
    /// Boot until the guest said it was ready.
    pub boot: f64,
    /// Index build and id.
    pub index: f64,
    /// Snapshot (device state and copies).
    pub snapshot: f64,
}

/// A base just made by [`create_base`](crate::create_base).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseReport {
    /// Bytes of its files as the file system reports them.
    pub bytes_apparent: u64,
    /// Bytes its files take on disk.
    pub bytes_on_disk: u64,
    /// Base id, 64 hex digits.
    pub id: String,
    /// How long each step took.
    pub ms: BaseMs,
    /// Its name.
    pub name: String,
    /// The registry it is in.
    pub registry: PathBuf,
}

impl BaseReport {
    /// The report of a base registered in `registry`, with the flow's timings.
    pub fn new(base: &RegisteredBase, timings: &BaseTimings, registry: &Registry) -> Self {
        let (bytes_on_disk, bytes_apparent) = base.sizes();
        BaseReport {
            bytes_apparent,
            bytes_on_disk,
            id: base.entry.manifest.id.to_hex(),
            ms: BaseMs { boot: ms(timings.boot), index: ms(timings.index), snapshot: ms(timings.snapshot) },
            name: base.entry.manifest.name.clone(),
            registry: registry.root().to_owned(),
        }
    }
}

/// Timings of the overlay flow, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlayMs {
    /// Compression, summed over threads.
    pub compress: f64,
    /// Customization commands (and the wait for the app).
    pub customize: f64,
    /// The whole diff (scan, compress and write, overlapped).
    pub diff: f64,
    /// Resume of the base VM.
    pub resume: f64,
    /// Scan of the custom images.
    pub scan: f64,
    /// Snapshot of the custom VM.
    pub snapshot: f64,
    /// Writing the overlay.
    pub write: f64,
}

/// An overlay just written by [`create_overlay_file`](crate::create_overlay_file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlayReport {
    /// Bytes the base's files take on disk (what the overlay saves sending).
    pub base_bytes_on_disk: u64,
    /// The base's id, 64 hex digits.
    pub base_id: String,
    /// The base's name.
    pub base_name: String,
    /// Chunks that differ from the base (4 KiB each).
    pub changed_chunks: u64,
    /// `zstd` or `xz`.
    pub compression: String,
    /// Records by kind.
    pub kinds: Kinds,
    /// How long each step took.
    pub ms: OverlayMs,
    /// Size of the overlay file.
    pub overlay_bytes: u64,
    /// The overlay file.
    pub path: PathBuf,
}

impl OverlayReport {
    /// The report of an overlay made from `base` with `options`.
    pub fn new(outcome: &OverlayOutcome, base: &RegisteredBase, options: &delta_engine::CreateOptions) -> Self {
        let s = &outcome.stats;
        OverlayReport {
            base_bytes_on_disk: base.sizes().0,
            base_id: base.entry.manifest.id.to_hex(),
            base_name: base.entry.manifest.name.clone(),
            changed_chunks: s.changed_chunks,
            compression: format!("{:?}", options.compression).to_lowercase(),
            kinds: (&s.kinds).into(),
            ms: OverlayMs {
                compress: ms(s.compress),
                customize: ms(outcome.customize),
                diff: ms(s.total),
                resume: ms(outcome.resume),
                scan: ms(s.scan),
                snapshot: ms(outcome.snapshot),
                write: ms(s.write),
            },
            overlay_bytes: s.overlay_bytes,
            path: outcome.path.clone(),
        }
    }

    /// The overlay's size as a fraction of the base's size on disk.
    pub fn ratio(&self) -> f64 {
        self.overlay_bytes as f64 / self.base_bytes_on_disk.max(1) as f64
    }
}

/// A VM just rebuilt and resumed by [`synthesize_with`](crate::synthesize_with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthesisReport {
    /// The first line of the app's answer to the probe, if probed.
    pub app_answer: Option<String>,
    /// The base's id, 64 hex digits.
    pub base_id: String,
    /// The base's name.
    pub base_name: String,
    /// The VM's directory.
    pub dir: PathBuf,
    /// Whether the directory is kept after the VM stops.
    pub dir_kept: bool,
    /// The app's name, from the overlay.
    pub name: String,
    /// The forwarded ports, listening on 127.0.0.1.
    pub ports: Vec<api::Forward>,
    /// How synthesis went.
    pub timeline: api::Timeline,
    /// Whether the VM keeps running after the report.
    pub vm_kept_running: bool,
}

impl SynthesisReport {
    /// The report of a synthesis into `dir`; `keep_running` and `keep` say what happens next
    /// to the VM and its directory.
    pub fn new<V>(s: &Synthesized<V>, dir: &Path, keep_running: bool, keep: bool) -> Self {
        SynthesisReport {
            app_answer: s.answer.as_deref().map(|a| crate::http::first_body_line(a).to_string()),
            base_id: s.base.entry.manifest.id.to_hex(),
            base_name: s.base.entry.manifest.name.clone(),
            dir: dir.to_owned(),
            dir_kept: keep,
            name: s.meta.name.clone(),
            ports: s.ports.iter().map(|&(g, h)| api::Forward::listening(g, h, "127.0.0.1")).collect(),
            timeline: api::Timeline::from(&s.timeline),
            vm_kept_running: keep_running,
        }
    }
}

/// A registered base as `list-base` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseListing {
    /// Bytes of its files, from its manifest.
    pub bytes: u64,
    /// Bytes of its files as the file system reports them.
    pub bytes_apparent: u64,
    /// Bytes its files take on disk.
    pub bytes_on_disk: u64,
    /// Registration time, Unix seconds.
    pub created_unix: u64,
    /// Base id, 64 hex digits.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where it came from (e.g. the raw disk image).
    pub source_image: Option<String>,
    /// Its VM spec.
    pub spec: overlay_format::VmSpec,
}

impl BaseListing {
    /// The listing of one registry entry (its sizes are read from its directory).
    pub fn of(b: &BaseEntry) -> Self {
        let (bytes_on_disk, bytes_apparent) = dir_sizes(&b.dir);
        BaseListing {
            bytes: b.size(),
            bytes_apparent,
            bytes_on_disk,
            created_unix: b.manifest.created_unix,
            id: b.manifest.id.to_hex(),
            name: b.manifest.name.clone(),
            source_image: b.manifest.source_image.clone(),
            spec: b.manifest.spec.clone(),
        }
    }

    /// Every base of `registry`, in the registry's order.
    pub fn all(registry: &Registry) -> Result<Vec<BaseListing>, RegistryError> {
        Ok(registry.list()?.iter().map(BaseListing::of).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialize_as_the_tool_always_printed_them() {
        let raw = delta_engine::KindCount { records: 2, chunks: 3, bytes: 4 };
        let k = delta_engine::KindCounts { raw, ..Default::default() };
        let v = serde_json::to_value(Kinds::from(&k)).unwrap();
        assert_eq!(v["raw"], serde_json::json!({"records": 2, "chunks": 3, "bytes": 4}));
        assert_eq!(v["zero"], serde_json::json!({"records": 0, "chunks": 0, "bytes": 0}));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["copy_base", "copy_self", "patch", "raw", "zero"]);
    }

    #[test]
    fn dir_sizes_counts_the_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![1u8; 5000]).unwrap();
        let f = std::fs::File::create(d.path().join("sparse")).unwrap();
        f.set_len(1 << 20).unwrap();
        let (alloc, apparent) = dir_sizes(d.path());
        assert_eq!(apparent, 5000 + (1 << 20));
        assert!(alloc >= 5000 && alloc < apparent, "{alloc}");
        assert_eq!(dir_sizes(&d.path().join("missing")), (0, 0));
    }
}
