//! Creating an overlay: classify every changed chunk of the custom VM's images and write the
//! records in blobs, sealed beside the scan.
//!
//! By concern: [`view`] reads the custom images (raw files, qcow2 layers over the base),
//! [`classify`] tells what each chunk is and which stream its bytes go to (the content
//! heuristics), [`emit`] turns the classes, in chunk order, into records and blobs, and
//! [`pipeline`] runs these stages and the compression on threads, batch after batch.

mod classify;
mod emit;
mod pipeline;
mod view;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use overlay_format::{
    BaseId, Compression, EncodeError, ImageMeta, OverlayMeta, OverlayWriter, PortForward, VmSpec, CHUNK_SIZE,
};

pub use classify::{content_lane, looks_incompressible};

use crate::base::Base;
use crate::{Fault, KindCounts, Progress};
use view::View;

/// One image of the custom VM.
#[derive(Debug, Clone)]
pub struct CustomImage {
    /// Name of the base image it derives from (`memory`, `disk0`, ...).
    pub name: String,
    /// Where its bytes are.
    pub source: CustomSource,
}

/// Where a custom image's bytes are.
#[derive(Debug, Clone)]
pub enum CustomSource {
    /// A raw image file (a RAM file, a raw disk). Holes are read as zeros without reading.
    Raw(PathBuf),
    /// A qcow2 layer whose backing file is the base image: only the clusters the layer
    /// allocated are read; the rest equals the base by construction.
    Qcow2(PathBuf),
}

/// The overlay's descriptive fields (everything in [`OverlayMeta`] the engine does not derive).
#[derive(Debug, Clone)]
pub struct OverlayInfo {
    /// Id of the base VM.
    pub base_id: BaseId,
    /// Spec of the custom VM.
    pub spec: VmSpec,
    /// Default port forwards of the app.
    pub forwards: Vec<PortForward>,
    /// Name of the overlay / app.
    pub name: String,
    /// Writer, e.g. `cloudlet 0.1.0`.
    pub creator: String,
    /// Creation time, Unix seconds.
    pub created_unix: u64,
}

/// Tuning of overlay creation.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Compressor of blobs and device state.
    pub compression: Compression,
    /// Compression level of blobs that are not incompressible and of the device state (zstd:
    /// 1..=19, default 4; xz: 0..=9, default 6). See the README for size and time per level.
    /// The lanes without machine code may use another level: see `zstd_other_lanes_level`.
    pub level: i32,
    /// Target size of a blob before compression.
    pub blob_bytes: usize,
    /// Target size of a blob of incompressible chunks (see `separate_dense`), at most 32 MiB.
    /// These blobs are compressed with a window as large as the blob and zstd's long-distance
    /// matching, so that data repeated at unaligned offsets (the same compressed file inside
    /// two archives, say) is stored once.
    pub dense_blob_bytes: usize,
    /// Address space classified per batch (bounds memory).
    pub batch_bytes: u64,
    /// A patch is used when it is at most this long (else the chunk is stored raw).
    pub patch_limit: usize,
    /// Put raw chunks whose bytes look incompressible (random, already compressed) into blobs
    /// of their own, compressed at the fastest level, so that `level` is spent only where it
    /// pays. See [`looks_incompressible`].
    pub separate_dense: bool,
    /// Compress the blobs of compressible chunks as the segments of one chained zstd frame or
    /// .xz stream ([`ChainEncoder`]), so that each is matched against everything before it
    /// within 128 MiB, not against itself only. What a customization adds repeats a lot across
    /// files (the same code in several binaries of a package): on the peer harness's pairs the
    /// overlay is about 15% smaller at the same zstd level, 10% with xz. A chain is
    /// compressed on one thread, beside the scan, and the applier decompresses it on one
    /// thread, beside the writes. Ignored without compression.
    pub chain: bool,
    /// Streams the compressible raw chunks are sorted into by content (1 to 3; see
    /// [`content_lane`]): with 2, machine code goes apart from the rest; with 3, text goes
    /// apart as well. With `chain`, every stream is a chain of its own (a *lane*, format 1.2)
    /// with a thread of its own. A chain can only run on one core, and on the peer harness's
    /// full pair it was what creation waited for; chunks of one kind compress as well among
    /// themselves as among all the others. Each lane's decoder keeps its own 128 MiB window
    /// when the overlay is applied (and, with xz, its encoder its own memory).
    pub lanes: u8,
    /// Level of the blobs of incompressible chunks (see `separate_dense`); `None`, the
    /// default: the codec's fastest (zstd 1, xz 0). The compressor still runs on them (every
    /// blob of an overlay uses its codec), with a window as large as the blob and zstd's
    /// long-distance matching: cheap, and it finds incompressible data stored twice.
    pub dense_level: Option<i32>,
    /// With zstd and `chain`: `Some((at, other))` compresses the chains of the lanes without
    /// machine code at level `other` when `level` is `at`; the code lane (with one lane, the
    /// only one, which holds code too) and every lane at any other level use `level`. `None`:
    /// every lane at `level`.
    ///
    /// Default `Some((4, 3))`: zstd's levels 3 and 4 differ only in the size of their match
    /// tables (2^17 and 2^16 entries at level 3, 2^18 and 2^18 at 4), and the larger tables
    /// pay off on code, not on the rest: on the full peer pair, creation's median fell by 5%
    /// (2.47 s to 2.34 s, five alternating runs each) for an overlay 0.25% larger; on the
    /// quick pair, 0.0003% larger.
    pub zstd_other_lanes_level: Option<(i32, i32)>,
    /// Run xz's x86 filter before compressing the blobs of compressible chunks that are sealed
    /// alone (not chained). Machine code (binaries on disk, their pages in memory) is a large
    /// part of what a customization adds: the filter makes it about 2.5% smaller. Default
    /// true; zstd has no such filter and ignores it.
    pub executable_filter: bool,
    /// Blobs a chain's thread may have waiting to be sealed (default 8: with `blob_bytes` of
    /// 4 MiB, 32 MiB per lane). A slow chain holds the scan back rather than filling memory;
    /// but a lane's bytes come in bursts, and a short queue held the scan up whenever one
    /// lane's burst filled it, while the other lane's thread idled.
    pub chain_queue: usize,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            compression: Compression::Zstd,
            level: 4,
            blob_bytes: 4 << 20,
            dense_blob_bytes: MAX_DENSE_BLOB,
            batch_bytes: 128 << 20,
            patch_limit: CHUNK_SIZE / 2,
            separate_dense: true,
            chain: true,
            lanes: 2,
            dense_level: None,
            zstd_other_lanes_level: Some((4, 3)),
            executable_filter: true,
            chain_queue: 8,
        }
    }
}

impl CreateOptions {
    /// Options for xz at `level`. xz is the size-first choice: its light blobs (8 MiB) are the
    /// segments of one chained .xz stream with a 128 MiB dictionary (on the quick peer pair
    /// 35.6 MB, where 48 MiB blobs compressed alone, each with a dictionary covering it and the
    /// x86 filter, gave 40.1 MB), compressed on one thread per lane with about 1.4 GiB of
    /// encoder memory each. With `chain` off, make
    /// `blob_bytes` larger (up to 48 MiB): a blob alone only finds repeats inside itself.
    pub fn xz(level: i32) -> Self {
        CreateOptions { compression: Compression::Xz, level, blob_bytes: 8 << 20, ..Self::default() }
    }
}

/// Error creating an overlay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// A custom image could not be read.
    #[error("{path}: cannot read the custom image")]
    Io {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A base image could not be read.
    #[error("{path}: cannot read the base image")]
    BaseIo {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The custom images do not match the base.
    #[error("custom images do not match the base: {reason}")]
    Mismatch {
        /// What differs.
        reason: String,
    },
    /// Writing the overlay failed.
    #[error("cannot write the overlay")]
    Encode(#[from] EncodeError),
}

impl CreateError {
    /// Whose fault the error is: [`Fault::Input`] for custom images that do not fit the base
    /// and for what the format refuses (a field of the overlay's info, a device state or blob
    /// over its limits), [`Fault::Io`] for files that cannot be read or written,
    /// [`Fault::Internal`] for a failure of the engine itself (blobs out of order, a
    /// compressor that fails or stops).
    pub fn fault(&self) -> Fault {
        match self {
            CreateError::Mismatch { .. }
            | CreateError::Encode(EncodeError::Invalid { .. } | EncodeError::TooLarge { .. }) => Fault::Input,
            CreateError::Io { .. } | CreateError::BaseIo { .. } | CreateError::Encode(EncodeError::Io(_)) => Fault::Io,
            CreateError::Encode(_) => Fault::Internal,
        }
    }
}

/// What creation did and how long it took.
#[derive(Debug, Clone, Default)]
pub struct CreateStats {
    /// Bytes of custom images scanned (address space, holes included).
    pub scanned_bytes: u64,
    /// Chunks that differ from the base at the same offset.
    pub changed_chunks: u64,
    /// Chunks and records by kind.
    pub kinds: KindCounts,
    /// Blob bytes before compression.
    pub blob_bytes_raw: u64,
    /// Blob bytes after compression.
    pub blob_bytes_compressed: u64,
    /// Blobs written.
    pub blobs: u64,
    /// Raw chunks that looked incompressible, and their blobs (see
    /// [`CreateOptions::separate_dense`]).
    pub dense_chunks: u64,
    /// Blobs holding only such chunks.
    pub dense_blobs: u64,
    /// Total overlay size.
    pub overlay_bytes: u64,
    /// Time classifying chunks (hash, dedup, patch).
    pub scan: Duration,
    /// Time compressing blobs: the wall clock of the pool's sealing, plus the chain threads'
    /// time. It overlaps `scan`: blobs are sealed while later batches are classified.
    pub compress: Duration,
    /// Time writing the overlay.
    pub write: Duration,
    /// Wall clock of the whole creation.
    pub total: Duration,
}

/// Largest target size of a dense blob: with the last raw run (at most `blob_bytes`) and the
/// record table it stays under the format's 64 MiB blob limit.
const MAX_DENSE_BLOB: usize = 32 << 20;

/// Streams of compressible chunks at most ([`CreateOptions::lanes`]).
const MAX_STREAM_LANES: usize = 3;

/// Which blobs a record goes to: the streams of compressible chunks are `0..lanes` (records
/// without bytes, and patches, go to the first, `LIGHT`), the incompressible one is `DENSE`.
const LIGHT: usize = 0;
const DENSE: usize = MAX_STREAM_LANES;
const STREAMS: usize = MAX_STREAM_LANES + 1;

fn chunk_len(size: u64, c: u64) -> usize {
    (size - c * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64) as usize
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Creates an overlay that rebuilds `custom` from `base`, writing it to `out`.
///
/// `custom` names every base image exactly once. Chunks are classified in batches of
/// `opts.batch_bytes` (the images' batches interleaved, each image's in order) in parallel, as
/// a pipeline: while the pool classifies one batch and seals (compresses) the blobs an earlier
/// batch filled, the calling thread runs the sequential pass over the batch before and writes
/// the sealed blobs, each stream's in order. At most three batches are in flight, so memory
/// stays bounded whatever the images' size (each zstd chain adds its 128 MiB window and up to
/// `opts.chain_queue` waiting blobs).
///
/// With zstd and `opts.chain`, the light blobs of each lane are sealed one after the other
/// through the lane's [`ChainEncoder`](overlay_format::ChainEncoder), on a thread per lane,
/// while the dense blobs are sealed in parallel beside them.
pub fn create_overlay<W: Write>(
    base: &Base,
    custom: &[CustomImage],
    info: &OverlayInfo,
    device_state: &[u8],
    opts: &CreateOptions,
    progress: &(dyn Fn(Progress) + Sync),
    out: W,
) -> Result<(W, CreateStats), CreateError> {
    let t0 = Instant::now();
    let views = View::open_all(base, custom)?;
    let meta = overlay_meta(base, &views, info, opts);
    let mut writer = OverlayWriter::new(Counting { inner: out, bytes: 0 }, &meta)?;
    writer.write_device_state(device_state, opts.level)?;
    let mut stats = CreateStats::default();
    let digests = pipeline::run(base, &views, opts, &mut writer, &mut stats, progress)?;
    let trailer = writer.trailer(digests);
    let tw = Instant::now();
    let out = writer.finish(&trailer)?;
    stats.write += tw.elapsed();
    stats.overlay_bytes = out.bytes;
    stats.total = t0.elapsed();
    Ok((out.inner, stats))
}

/// The overlay's metadata: `info`, and the images as the custom VM has them.
fn overlay_meta(base: &Base, views: &[View], info: &OverlayInfo, opts: &CreateOptions) -> OverlayMeta {
    let images: Vec<ImageMeta> = base
        .index()
        .images()
        .iter()
        .zip(views)
        .map(|(bi, m)| ImageMeta { name: bi.name.clone(), kind: bi.kind, size: m.size(), base_size: bi.size })
        .collect();
    OverlayMeta {
        base_id: info.base_id,
        spec: info.spec.clone(),
        images,
        compression: opts.compression,
        forwards: info.forwards.clone(),
        name: info.name.clone(),
        created_unix: info.created_unix,
        creator: info.creator.clone(),
    }
}
