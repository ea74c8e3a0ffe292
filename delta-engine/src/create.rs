//! Creating an overlay: classify every changed chunk of the custom VM's images and write the
//! records in blobs, sealed beside the scan.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use overlay_format::{
    encode_patch, BaseId, BlobBuilder, ChainEncoder, ChunkHash, ChunkRef, Compression, Effort, EncodeError,
    ImageDigester, ImageMeta, OverlayMeta, OverlayWriter, PortForward, SealedBlob, VmSpec, CHUNK_SIZE,
};
use rayon::prelude::*;

use crate::base::{read_padded_at, Base};
use crate::file::data_extents;
use crate::qcow2::{Located, Qcow2Layer};
use crate::{Fault, KindCounts, Progress};

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

/// A custom image as the scan sees it.
enum View {
    /// A raw file, read with `pread` (see [`Base`] for why not through a map); only its data
    /// extents are read.
    Raw {
        file: File,
        path: PathBuf,
        size: u64,
        extents: Vec<(u64, u64)>,
    },
    Qcow2(Qcow2Layer),
}

/// What a custom chunk is, before classification.
enum Src<'a> {
    /// Reads as zeros (a hole, a zero cluster).
    Zeros,
    /// Equals the base's chunk at the same offset (an unallocated qcow2 cluster).
    Backing,
    /// Bytes to classify.
    Data(Cow<'a, [u8]>),
}

impl View {
    fn open(path: &std::path::Path, qcow2: bool, base: &Base, ii: usize) -> Result<Self, CreateError> {
        if !qcow2 {
            let io = |source| CreateError::Io { path: path.into(), source };
            let file = File::open(path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            let extents = data_extents(&file, size);
            return Ok(View::Raw { file, path: path.into(), size, extents });
        }
        let l = Qcow2Layer::open(path).map_err(|e| CreateError::Mismatch { reason: e.to_string() })?;
        let base_path = base.path(ii);
        let same = match l.backing_path() {
            Some(b) => match (std::fs::metadata(&b), std::fs::metadata(base_path)) {
                (Ok(x), Ok(y)) => {
                    use std::os::unix::fs::MetadataExt;
                    x.dev() == y.dev() && x.ino() == y.ino()
                }
                _ => false,
            },
            None => false,
        };
        if !same || l.backing_format().is_some_and(|f| f != "raw") {
            return Err(CreateError::Mismatch {
                reason: format!(
                    "{}: its backing file {:?} (format {:?}) is not the base image {} (raw)",
                    path.display(),
                    l.backing_file(),
                    l.backing_format(),
                    base_path.display()
                ),
            });
        }
        Ok(View::Qcow2(l))
    }

    fn size(&self) -> u64 {
        match self {
            View::Raw { size, .. } => *size,
            View::Qcow2(l) => l.virtual_size(),
        }
    }

    /// Reads what [`View::chunk_in`] needs of chunks `c0..c1` into `buf`: a raw image's data
    /// extents there (holes are not read), a qcow2 layer's allocated chunks (in runs that lie
    /// one after the other in its file).
    fn load(&self, c0: u64, c1: u64, buf: &mut Vec<u8>) -> Result<(), CreateError> {
        let (s, e) = (c0 * CHUNK_SIZE as u64, (c1 * CHUNK_SIZE as u64).min(self.size()));
        buf.resize((e - s) as usize, 0);
        match self {
            View::Raw { file, path, extents, .. } => {
                let first = extents.partition_point(|&(_, end)| end <= s);
                for &(a, b) in extents[first..].iter().take_while(|&&(a, _)| a < e) {
                    let (a, b) = (a.max(s), b.min(e));
                    read_padded_at(file, a, &mut buf[(a - s) as usize..(b - s) as usize])
                        .map_err(|source| CreateError::Io { path: path.clone(), source })?;
                }
            }
            View::Qcow2(l) => {
                let mut c = c0;
                while c < c1 {
                    let Located::At(host) = l.locate(c) else {
                        c += 1;
                        continue;
                    };
                    let first = c;
                    c += 1;
                    while c < c1 && l.locate(c) == Located::At(host + (c - first) * CHUNK_SIZE as u64) {
                        c += 1;
                    }
                    let (a, b) = ((first - c0) as usize * CHUNK_SIZE, ((c - c0) as usize * CHUNK_SIZE).min(buf.len()));
                    read_padded_at(l.file(), host, &mut buf[a..b])
                        .map_err(|source| CreateError::Io { path: l.path().to_path_buf(), source })?;
                }
            }
        }
        Ok(())
    }

    /// Chunk `c` (`len` bytes), from `buf` as [`View::load`] filled it for chunks from `c0` on.
    fn chunk_in<'a>(&'a self, c: u64, len: usize, c0: u64, buf: &'a [u8]) -> Src<'a> {
        match self {
            View::Raw { extents, .. } => {
                let off = c * CHUNK_SIZE as u64;
                let p = extents.partition_point(|&(a, _)| a <= off);
                if p > 0 && off < extents[p - 1].1 {
                    let s = ((c - c0) * CHUNK_SIZE as u64) as usize;
                    Src::Data(Cow::Borrowed(&buf[s..s + len]))
                } else {
                    Src::Zeros
                }
            }
            View::Qcow2(l) => match l.locate(c) {
                Located::Backing => Src::Backing,
                Located::Zero => Src::Zeros,
                Located::At(_) => {
                    let s = ((c - c0) * CHUNK_SIZE as u64) as usize;
                    Src::Data(Cow::Borrowed(&buf[s..s + len]))
                }
            },
        }
    }

    /// Appends the bytes of `count` chunks from chunk `c` on to `out` (the image's tail may
    /// make them fewer).
    fn read(&self, c: u64, count: u64, out: &mut Vec<u8>) -> Result<(), CreateError> {
        let size = self.size();
        let s = c * CHUNK_SIZE as u64;
        let e = ((c + count) * CHUNK_SIZE as u64).min(size);
        let at = out.len();
        out.resize(at + (e - s) as usize, 0);
        match self {
            View::Raw { file, path, .. } => {
                read_padded_at(file, s, &mut out[at..]).map_err(|source| CreateError::Io { path: path.clone(), source })
            }
            View::Qcow2(l) => {
                for (k, o) in (c..c + count).zip(out[at..].chunks_mut(CHUNK_SIZE)) {
                    match l.locate(k) {
                        Located::At(host) => read_padded_at(l.file(), host, o)
                            .map_err(|source| CreateError::Io { path: l.path().to_path_buf(), source })?,
                        Located::Zero | Located::Backing => o.fill(0),
                    }
                }
                Ok(())
            }
        }
    }
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
    /// At zstd level 4 with lanes, the lanes other than machine code's are compressed at
    /// level 3 (their match tables gain nothing from level 4's larger size).
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

#[derive(Clone, Copy)]
enum Class {
    Same,
    Zero,
    Base(ChunkRef),
    /// Stored raw (in `stream`), or as a patch (`stream` is then the first lane's).
    Fresh {
        stream: usize,
    },
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

/// A chunk's byte histogram.
fn histogram(chunk: &[u8]) -> [u32; 256] {
    let mut h = [[0u32; 256]; 4];
    let mut quads = chunk.chunks_exact(4);
    for q in &mut quads {
        h[0][q[0] as usize] += 1;
        h[1][q[1] as usize] += 1;
        h[2][q[2] as usize] += 1;
        h[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        h[0][b as usize] += 1;
    }
    std::array::from_fn(|i| h[0][i] + h[1][i] + h[2][i] + h[3][i])
}

/// Whether a histogram of `n` bytes is close to uniform (see [`looks_incompressible`]).
fn uniform(h: &[u32; 256], n: u64) -> bool {
    let sum_sq: u64 = h.iter().map(|&c| u64::from(c) * u64::from(c)).sum();
    // chi2 = 256 * sum(c^2) / n - n < n / 4
    n >= CHUNK_SIZE as u64 && 1024 * sum_sq < 5 * n * n
}

/// The kind of content of a compressible chunk, from its byte histogram: `0` text (at least
/// 70% printable ASCII, tabs and line ends), `1` x86-64 machine code (not text, and at least
/// one byte in 64 is `0x48`, the REX.W prefix of 64-bit operations), `2` anything else
/// (data, tables, most memory pages).
///
/// Raw chunks of different kinds go to different lanes when `CreateOptions::lanes` allows:
/// on the peer harness's pairs (zstd level 4), code, text and the rest each in a chain of its
/// own make the overlay 1.7% smaller than one chain over them all on the full pair and 0.6%
/// on the quick one; code apart from the rest, 1.1% and 0.2%.
pub fn content_lane(chunk: &[u8]) -> u8 {
    kind_of(&histogram(chunk), chunk.len() as u64)
}

fn kind_of(h: &[u32; 256], n: u64) -> u8 {
    let printable: u32 = h[0x20..0x7f].iter().sum::<u32>() + h[b'\t' as usize] + h[b'\n' as usize] + h[b'\r' as usize];
    if 10 * u64::from(printable) >= 7 * n {
        0
    } else if 64 * u64::from(h[0x48]) >= n {
        1
    } else {
        2
    }
}

/// The stream of a compressible raw chunk of kind `kind` ([`content_lane`]) with `lanes` lanes.
fn lane_stream(kind: u8, lanes: u8) -> usize {
    match lanes {
        0 | 1 => LIGHT,
        2 => usize::from(kind == 1),
        _ => usize::from(kind),
    }
}

/// The level of lane `lane`'s chain: `opts.level`, except that with zstd at level 4 the lanes
/// other than machine code's are compressed at level 3. zstd's levels 3 and 4 differ only in
/// the size of their match tables (2^17 and 2^16 entries at level 3, 2^18 and 2^18 at 4), and
/// the larger tables pay off on code, not on the rest: on the full peer pair, creation's median
/// fell by 5% (2.47 s to 2.34 s, five alternating runs each) for an overlay 0.25% larger; on
/// the quick pair, 0.0003% larger.
fn chain_level(opts: &CreateOptions, lanes: u8, lane: u8) -> i32 {
    // With one lane, code shares it with everything else.
    let code = usize::from(lane) == lane_stream(1, lanes);
    if opts.compression == Compression::Zstd && opts.level == 4 && !code {
        3
    } else {
        opts.level
    }
}

/// Whether a chunk's bytes look incompressible: its byte histogram is close to uniform.
///
/// The test is a chi-square statistic against the uniform distribution below `n / 4` for an
/// `n`-byte chunk (1024 for 4 KiB), which is about 7.8 bits of order-0 entropy per byte; random
/// bytes give about 255. Random data and already-compressed files look like this; text, code
/// and most memory pages do not. Chunks shorter than 4 KiB are never called incompressible.
pub fn looks_incompressible(chunk: &[u8]) -> bool {
    chunk.len() >= CHUNK_SIZE && uniform(&histogram(chunk), chunk.len() as u64)
}

/// A run being accumulated before it becomes a record.
enum Run {
    None,
    Zero { image: u8, chunk: u64, count: u64 },
    Base { image: u8, chunk: u64, count: u64, src: ChunkRef },
    Raw { image: u8, chunk: u64, count: u64, stream: usize },
}

struct Emitter<'a> {
    run: Run,
    /// The blob being filled for each stream (lanes from [`LIGHT`] on, [`DENSE`]).
    builders: [BlobBuilder; STREAMS],
    /// Blobs cut, in the order they were cut (each stream's are written in it), with their stream.
    ready: Vec<(BlobBuilder, usize)>,
    blob_bytes: usize,
    dense_blob_bytes: usize,
    customs: &'a [View],
    kinds: KindCounts,
    /// Raw chunks read for the blob being filled.
    scratch: Vec<u8>,
    /// The first read that failed: the step that cut the run returns it.
    failed: Option<CreateError>,
}

impl Emitter<'_> {
    fn flush(&mut self) {
        match std::mem::replace(&mut self.run, Run::None) {
            Run::None => {}
            Run::Zero { image, chunk, count } => {
                self.builders[LIGHT].push_zero(image, chunk, count);
                self.kinds.zero.add(count);
                self.maybe_cut(LIGHT);
            }
            Run::Base { image, chunk, count, src } => {
                self.builders[LIGHT].push_copy_base(image, chunk, count, src);
                self.kinds.copy_base.add(count);
                self.maybe_cut(LIGHT);
            }
            Run::Raw { image, chunk, count, stream } => {
                let customs = self.customs;
                self.scratch.clear();
                if let Err(e) = customs[image as usize].read(chunk, count, &mut self.scratch) {
                    self.failed.get_or_insert(e);
                    return;
                }
                self.builders[stream].push_raw(image, chunk, &self.scratch);
                self.kinds.raw.add(count);
                self.kinds.raw.bytes += self.scratch.len() as u64;
                self.maybe_cut(stream);
            }
        }
    }

    fn maybe_cut(&mut self, stream: usize) {
        let limit = if stream == DENSE { self.dense_blob_bytes } else { self.blob_bytes };
        if self.builders[stream].uncompressed_len() >= limit {
            self.ready.push((std::mem::take(&mut self.builders[stream]), stream));
        }
    }

    /// Cuts the blobs not yet full (at the end).
    fn cut_all(&mut self) {
        self.flush();
        for stream in 0..STREAMS {
            if !self.builders[stream].is_empty() {
                self.ready.push((std::mem::take(&mut self.builders[stream]), stream));
            }
        }
    }

    fn zero(&mut self, image: u8, chunk: u64) {
        if let Run::Zero { image: i, chunk: c, count } = &mut self.run {
            if *i == image && *c + *count == chunk {
                *count += 1;
                return;
            }
        }
        self.flush();
        self.run = Run::Zero { image, chunk, count: 1 };
    }

    fn base(&mut self, image: u8, chunk: u64, src: ChunkRef) {
        if let Run::Base { image: i, chunk: c, count, src: s } = &mut self.run {
            if *i == image && *c + *count == chunk && s.image == src.image && s.chunk + *count == src.chunk {
                *count += 1;
                return;
            }
        }
        self.flush();
        self.run = Run::Base { image, chunk, count: 1, src };
    }

    fn raw(&mut self, image: u8, chunk: u64, stream: usize) {
        if let Run::Raw { image: i, chunk: c, count, stream: s } = &mut self.run {
            if *i == image
                && *c + *count == chunk
                && *s == stream
                && ((*count as usize + 1) * CHUNK_SIZE) <= self.blob_bytes
            {
                *count += 1;
                return;
            }
        }
        self.flush();
        self.run = Run::Raw { image, chunk, count: 1, stream };
    }

    /// A copy of an earlier chunk of the overlay; it goes to the stream its source went to, so
    /// that it follows the source's record in the stream (blobs of one stream are written in
    /// order).
    fn copy_self(&mut self, image: u8, chunk: u64, src: ChunkRef, stream: usize) {
        self.flush();
        self.builders[stream].push_copy_self(image, chunk, src);
        self.kinds.copy_self.add(1);
        self.maybe_cut(stream);
    }

    fn patch(&mut self, image: u8, chunk: u64, patch: &[u8]) {
        self.flush();
        self.builders[LIGHT].push_patch(image, chunk, patch);
        self.kinds.patch.add(1);
        self.kinds.patch.bytes += patch.len() as u64;
        self.maybe_cut(LIGHT);
    }
}

/// Classifies the chunks of custom image `ii` (read through `view`) against the base.
struct Classifier<'a> {
    base: &'a Base,
    view: &'a View,
    ii: usize,
    opts: &'a CreateOptions,
}

thread_local! {
    /// A group's custom bytes and base bytes, kept by each thread of the pool from group to
    /// group: fresh buffers would cost a page fault per 4 KiB each time.
    static GROUP_BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Classifier<'_> {
    /// What each chunk `c0..c1` is, with its hash and, for a patch, the patch.
    fn classify(&self, c0: u64, c1: u64) -> Result<Classes, CreateError> {
        // In groups of chunks: each group's bytes are read in a few `pread`s into buffers the
        // thread keeps, and the chunks a group must hash are hashed together (blake3 hashes up to
        // 16 chunks at once with SIMD, one 4 KiB chunk alone only 4 ways).
        const GROUP: u64 = 256;
        let groups: Vec<u64> = (c0..c1).step_by(GROUP as usize).collect();
        let parts: Vec<Classes> =
            groups.into_par_iter().map(|g| self.group(g, (g + GROUP).min(c1))).collect::<Result<_, _>>()?;
        Ok(parts.concat())
    }

    /// [`Classifier::classify`] of one group of chunks: first what needs no hash of the chunk's
    /// bytes (equal to the base's chunk, zeros), then the others' hashes all at once, then their
    /// classes.
    fn group(&self, c0: u64, c1: u64) -> Result<Classes, CreateError> {
        GROUP_BUFFERS.with(|bufs| match bufs.try_borrow_mut() {
            Ok(mut bufs) => {
                let (custom, base_bytes) = &mut *bufs;
                self.group_in(c0, c1, custom, base_bytes)
            }
            // Only if a group ever ran inside another on one thread (it waits on nothing that
            // could): buffers of its own.
            Err(_) => self.group_in(c0, c1, &mut Vec::new(), &mut Vec::new()),
        })
    }

    /// [`Classifier::group`] with the buffers to read into.
    fn group_in(
        &self,
        c0: u64,
        c1: u64,
        custom: &mut Vec<u8>,
        base_bytes: &mut Vec<u8>,
    ) -> Result<Classes, CreateError> {
        let Classifier { base, view, ii, .. } = *self;
        let size = view.size();
        let base_io = base_io(base, ii);
        view.load(c0, c1, custom)?;
        let srcs: Vec<Src<'_>> = (c0..c1).map(|c| view.chunk_in(c, chunk_len(size, c), c0, custom)).collect();
        // The base's bytes at the same offsets, where they are needed: under the custom image's
        // data, where the base's chunk is whole and not zero (the index knows), read in runs.
        let needs_base = |k: usize| {
            let c = c0 + k as u64;
            matches!(srcs[k], Src::Data(_))
                && chunk_len(size, c) == CHUNK_SIZE
                && base.full_hash(ii, c).is_some_and(|h| h != ChunkHash::zero())
        };
        base_bytes.resize(srcs.len() * CHUNK_SIZE, 0);
        let mut k = 0;
        while k < srcs.len() {
            if !needs_base(k) {
                k += 1;
                continue;
            }
            let first = k;
            while k < srcs.len() && needs_base(k) {
                k += 1;
            }
            base.read_padded(ii, c0 + first as u64, &mut base_bytes[first * CHUNK_SIZE..k * CHUNK_SIZE])
                .map_err(&base_io)?;
        }
        let mut out: Classes = Vec::with_capacity(srcs.len());
        let mut fresh: Vec<Unhashed<'_>> = Vec::new();
        for (k, src) in srcs.into_iter().enumerate() {
            let c = c0 + k as u64;
            let len = chunk_len(size, c);
            let data = match src {
                Src::Zeros => {
                    let h = if len == CHUNK_SIZE { ChunkHash::zero() } else { ChunkHash::of(&vec![0u8; len]) };
                    let class = if base.chunk_is_zero(ii, c, len) { Class::Same } else { Class::Zero };
                    out.push((class, h, None));
                    continue;
                }
                Src::Backing => {
                    let h = match base.full_hash(ii, c) {
                        Some(h) if len == CHUNK_SIZE => h,
                        _ => {
                            let mut padded = vec![0u8; len];
                            base.read_padded(ii, c, &mut padded).map_err(&base_io)?;
                            ChunkHash::of(&padded)
                        }
                    };
                    out.push((Class::Same, h, None));
                    continue;
                }
                Src::Data(d) => d,
            };
            let chunk: &[u8] = &data;
            let base_hash = base.full_hash(ii, c).filter(|_| len == CHUNK_SIZE);
            let mut base_chunk = None;
            let same = match base_hash {
                // A zero base chunk (a hole, often, where the custom disk got new files) is
                // compared with zeros: it is not read.
                Some(h) if h == ChunkHash::zero() => overlay_format::digest::is_zero(chunk).then_some(h),
                Some(h) => {
                    let b = &base_bytes[k * CHUNK_SIZE..(k + 1) * CHUNK_SIZE];
                    base_chunk = Some(b);
                    (b == chunk).then_some(h)
                }
                None => {
                    // Straddles or lies past the base image's end: compare with the
                    // zero-padded base bytes.
                    let mut padded = vec![0u8; len];
                    base.read_padded(ii, c, &mut padded).map_err(&base_io)?;
                    (padded == chunk).then(|| ChunkHash::of(chunk))
                }
            };
            if let Some(h) = same {
                out.push((Class::Same, h, None));
            } else if overlay_format::digest::is_zero(chunk) {
                out.push((Class::Zero, ChunkHash::of(chunk), None));
            } else {
                fresh.push(Unhashed { at: out.len(), c, data, base_chunk });
                out.push((Class::Same, ChunkHash::zero(), None)); // set below
            }
        }
        let full = fresh.iter().enumerate().filter_map(|(k, f)| Some((k, (*f.data).try_into().ok()?))).collect();
        let mut hashes = vec![ChunkHash::zero(); fresh.len()];
        for (k, h) in overlay_format::digest::hash_tagged(full) {
            hashes[k] = h;
        }
        for (f, h) in fresh.into_iter().zip(hashes) {
            let chunk: &[u8] = &f.data;
            let h = if chunk.len() == CHUNK_SIZE { h } else { ChunkHash::of(chunk) };
            out[f.at] = self.fresh(f.c, chunk, h, f.base_chunk)?;
        }
        Ok(out)
    }

    /// The class of a chunk that differs from the base's chunk at its offset and is not zeros;
    /// `base_chunk` is that base chunk if it was read (whole and not zero).
    fn fresh(
        &self,
        c: u64,
        chunk: &[u8],
        h: ChunkHash,
        base_chunk: Option<&[u8]>,
    ) -> Result<(Class, ChunkHash, Option<Vec<u8>>), CreateError> {
        let Classifier { base, ii, opts, .. } = *self;
        let len = chunk.len();
        if len == CHUNK_SIZE {
            if let Some(r) = base.index().find(&h) {
                // Confirmed byte for byte.
                let mut b = [0u8; CHUNK_SIZE];
                base.read_padded(r.image as usize, r.chunk, &mut b).map_err(base_io(base, r.image as usize))?;
                if b == chunk {
                    return Ok((Class::Base(r), h, None));
                }
            }
        }
        // A patch against the same-offset base chunk, if that chunk has content.
        let patch = match base_chunk {
            Some(b) => encode_patch(b, chunk, opts.patch_limit),
            None if !base.chunk_is_zero(ii, c, len) => {
                let mut b = vec![0u8; len];
                base.read_padded(ii, c, &mut b).map_err(base_io(base, ii))?;
                encode_patch(&b, chunk, opts.patch_limit)
            }
            None => None,
        };
        let stream = match patch {
            Some(_) => LIGHT,
            // Nothing to sort by: no histogram.
            None if !opts.separate_dense && opts.lanes <= 1 => LIGHT,
            None => {
                let hist = histogram(chunk);
                if opts.separate_dense && uniform(&hist, len as u64) {
                    DENSE
                } else {
                    lane_stream(kind_of(&hist, len as u64), opts.lanes)
                }
            }
        };
        Ok((Class::Fresh { stream }, h, patch))
    }
}

/// A chunk of a group still to hash and classify.
struct Unhashed<'a> {
    /// Its place in the group's classes.
    at: usize,
    /// The chunk.
    c: u64,
    data: Cow<'a, [u8]>,
    /// The base's chunk at the same offset, if it was read (whole and not zero).
    base_chunk: Option<&'a [u8]>,
}

/// The error of a failed read of base image `i`.
fn base_io(base: &Base, i: usize) -> impl Fn(std::io::Error) -> CreateError + '_ {
    move |source| CreateError::BaseIo { path: base.path(i).to_path_buf(), source }
}

/// A batch: image, first chunk, end chunk.
type Batch = (usize, u64, u64);
/// What [`Classifier::classify`] says of each chunk of a batch.
type Classes = Vec<(Class, ChunkHash, Option<Vec<u8>>)>;

/// The sequential part of a batch, in chunk order: the image digest, self-dedup, runs and
/// records into blobs.
#[allow(clippy::too_many_arguments)]
fn sequential_pass(
    em: &mut Emitter<'_>,
    self_map: &mut HashMap<ChunkHash, (ChunkRef, usize)>,
    digester: &mut ImageDigester,
    views: &[View],
    ii: usize,
    c0: u64,
    classes: Classes,
    stats: &mut CreateStats,
) -> Result<(), CreateError> {
    let view = &views[ii];
    let (mut chunk, mut earlier) = (Vec::with_capacity(CHUNK_SIZE), Vec::with_capacity(CHUNK_SIZE));
    let size = view.size();
    for (k, (class, h, patch)) in classes.into_iter().enumerate() {
        let c = c0 + k as u64;
        digester.push(h);
        let image = ii as u8;
        match class {
            Class::Same => {
                em.flush();
            }
            Class::Zero => {
                stats.changed_chunks += 1;
                em.zero(image, c);
            }
            Class::Base(src) => {
                stats.changed_chunks += 1;
                em.base(image, c, src);
            }
            Class::Fresh { stream } => {
                stats.changed_chunks += 1;
                let len = chunk_len(size, c);
                if len == CHUNK_SIZE {
                    if let Some(&(src, src_stream)) = self_map.get(&h) {
                        chunk.clear();
                        earlier.clear();
                        view.read(c, 1, &mut chunk)?;
                        views[src.image as usize].read(src.chunk, 1, &mut earlier)?;
                        if earlier.len() == CHUNK_SIZE && earlier == chunk {
                            em.copy_self(image, c, src, src_stream);
                            continue;
                        }
                    }
                    self_map.insert(h, (ChunkRef { image, chunk: c }, stream));
                }
                if stream == DENSE {
                    stats.dense_chunks += 1;
                }
                match patch {
                    Some(p) => em.patch(image, c, &p),
                    None => em.raw(image, c, stream),
                }
            }
        }
    }
    Ok(())
}

fn chunk_len(size: u64, c: u64) -> usize {
    (size - c * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64) as usize
}

/// Creates an overlay that rebuilds `custom` from `base`, writing it to `out`.
///
/// `custom` names every base image exactly once. Chunks are classified in batches of
/// `opts.batch_bytes` (the images' batches interleaved, each image's in order) in parallel, as
/// a pipeline: while the pool classifies one batch and seals (compresses) the blobs an earlier
/// batch filled, the calling thread runs the sequential pass over the batch before and writes
/// the sealed blobs, each stream's in order. At most three batches are in flight, so memory
/// stays bounded whatever the images' size (each zstd chain adds its 128 MiB window and up to
/// eight waiting blobs).
///
/// With zstd and `opts.chain`, the light blobs of each lane are sealed one after the other
/// through the lane's [`ChainEncoder`], on a thread per lane, while the dense blobs are sealed
/// in parallel beside them.
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
    let idx = base.index();
    if custom.len() != idx.images().len() {
        return Err(CreateError::Mismatch {
            reason: format!("{} custom images for {} base images", custom.len(), idx.images().len()),
        });
    }
    // Custom images in base order.
    let mut views = Vec::with_capacity(custom.len());
    for (ii, bi) in idx.images().iter().enumerate() {
        let Some(ci) = custom.iter().find(|c| c.name == bi.name) else {
            return Err(CreateError::Mismatch { reason: format!("no custom image for base image '{}'", bi.name) });
        };
        views.push(match &ci.source {
            CustomSource::Raw(path) => View::open(path, false, base, ii)?,
            CustomSource::Qcow2(path) => View::open(path, true, base, ii)?,
        });
    }
    let images: Vec<ImageMeta> = idx
        .images()
        .iter()
        .zip(&views)
        .map(|(bi, m)| ImageMeta { name: bi.name.clone(), kind: bi.kind, size: m.size(), base_size: bi.size })
        .collect();
    let meta = OverlayMeta {
        base_id: info.base_id,
        spec: info.spec.clone(),
        images,
        compression: opts.compression,
        forwards: info.forwards.clone(),
        name: info.name.clone(),
        created_unix: info.created_unix,
        creator: info.creator.clone(),
    };
    let mut writer = OverlayWriter::new(Counting { inner: out, bytes: 0 }, &meta)?;
    writer.write_device_state(device_state, opts.level)?;

    let total: u64 = views.iter().map(|m| m.size()).sum();
    let mut stats = CreateStats::default();
    let mut em = Emitter {
        run: Run::None,
        builders: Default::default(),
        ready: Vec::new(),
        blob_bytes: opts.blob_bytes,
        dense_blob_bytes: opts.dense_blob_bytes.clamp(CHUNK_SIZE, MAX_DENSE_BLOB),
        customs: &views,
        kinds: KindCounts::default(),
        scratch: Vec::new(),
        failed: None,
    };
    // Chunks stored so far (raw or patched), with the stream their record went to.
    let mut self_map: HashMap<ChunkHash, (ChunkRef, usize)> = HashMap::new();
    let mut digesters: Vec<ImageDigester> = views.iter().map(|_| ImageDigester::new()).collect();
    let batch_chunks = (opts.batch_bytes / CHUNK_SIZE as u64).max(1);
    let mut batches = Vec::new();
    for (ii, view) in views.iter().enumerate() {
        let n_chunks = view.size().div_ceil(CHUNK_SIZE as u64);
        batches
            .extend((0..n_chunks).step_by(batch_chunks as usize).map(|c0| (ii, c0, (c0 + batch_chunks).min(n_chunks))));
    }
    // The images' batches interleaved, each image's in order, as far into each image: every
    // lane then gets bytes from the start (the code lane's are mostly on the disk, which would
    // otherwise come after the memory), and memory pages sit near the disk blocks they cache.
    // On the peer pairs: 5-8% less time and 0.4% smaller than image after image.
    let chunks: Vec<u128> = views.iter().map(|m| u128::from(m.size().div_ceil(CHUNK_SIZE as u64).max(1))).collect();
    batches.sort_by(|&(i, c, _), &(j, d, _)| {
        (u128::from(c) * chunks[j]).cmp(&(u128::from(d) * chunks[i])).then(i.cmp(&j))
    });
    let mut scanned = 0u64;
    let lanes = opts.lanes.clamp(1, MAX_STREAM_LANES as u8);
    let encoders = match opts.compression {
        Compression::Zstd | Compression::Xz if opts.chain => (0..lanes)
            .map(|lane| ChainEncoder::for_lane(opts.compression, chain_level(opts, lanes, lane), lane))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| EncodeError::Compress { what: "blob", source })?,
        _ => Vec::new(),
    };

    // A pipeline of four stages, one step per batch: the pool classifies batch k and seals the
    // blobs batch k-2 filled, while this thread writes the blobs sealed so far and runs the
    // sequential pass (self-dedup, runs, blobs) over batch k-1. Each chain, if any, has a
    // thread of its own: its lane's blobs go to it as they are cut and come back sealed, in
    // order, so its one thread is never held up by the steps. Every blob is numbered when cut;
    // each stream's blobs are written in that order (see `Ordered`).
    std::thread::scope(|ts| -> Result<(), CreateError> {
        let mut chains: Vec<Chain> =
            encoders.into_iter().enumerate().map(|(stream, enc)| Chain::start(ts, enc, stream)).collect();
        let mut out = Ordered::default();
        let mut classified: Option<(Batch, Classes)> = None;
        let mut filled: Vec<Cut> = Vec::new();
        let mut next = batches.into_iter();
        let mut cut = false;
        loop {
            let batch = next.next();
            // The step that cuts the last blobs ends the chain.
            let last = batch.is_none() && classified.is_none() && !cut;
            if last {
                em.cut_all();
                cut = true;
            }
            let mut ready = std::mem::take(&mut em.ready);
            if last {
                for c in chains.iter().filter(|c| c.open) {
                    if !ready.iter().any(|(_, s)| *s == c.stream) {
                        // The lane's last blob went out earlier: an empty one ends its frame.
                        ready.push((BlobBuilder::new(), c.stream));
                    }
                }
            }
            let fresh = out.number(ready);
            filled.extend(Chain::route(&mut chains, fresh, last));
            if batch.is_none() && classified.is_none() && filled.is_empty() {
                break;
            }
            let to_seal = std::mem::take(&mut filled);
            let prev = classified.take();
            let mut new_classes: Option<(Batch, Result<Classes, CreateError>, Duration)> = None;
            let mut new_sealed: Option<Result<Sealed, EncodeError>> = None;
            let mut main: Result<(), CreateError> = Ok(());
            rayon::in_place_scope(|s| {
                if let Some(b @ (ii, c0, c1)) = batch {
                    let (view, new_classes) = (&views[ii], &mut new_classes);
                    s.spawn(move |_| {
                        let ts = Instant::now();
                        let classes = Classifier { base, view, ii, opts }.classify(c0, c1);
                        *new_classes = Some((b, classes, ts.elapsed()));
                    });
                }
                if !to_seal.is_empty() {
                    let new_sealed = &mut new_sealed;
                    s.spawn(move |_| *new_sealed = Some(seal(to_seal, opts)));
                }
                main = (|| {
                    for chain in &mut chains {
                        let (sealed, t) = chain.sealed(false)?;
                        stats.compress += t;
                        out.extend(sealed);
                    }
                    out.write(&mut writer, &mut stats)?;
                    if let Some(((ii, c0, c1), classes)) = prev {
                        sequential_pass(
                            &mut em,
                            &mut self_map,
                            &mut digesters[ii],
                            &views,
                            ii,
                            c0,
                            classes,
                            &mut stats,
                        )?;
                        em.flush();
                        if let Some(e) = em.failed.take() {
                            return Err(e);
                        }
                        scanned += (c1 - c0) * CHUNK_SIZE as u64;
                        progress(Progress { phase: "scan", done: scanned.min(total), total });
                    }
                    Ok(())
                })();
            });
            main?;
            if let Some((b, classes, t)) = new_classes {
                stats.scan += t;
                classified = Some((b, classes?));
            }
            if let Some(sealed) = new_sealed.transpose()? {
                stats.compress += sealed.time;
                out.extend(sealed.blobs);
            }
        }
        for chain in &mut chains {
            let (sealed, t) = chain.sealed(true)?;
            stats.compress += t;
            out.extend(sealed);
        }
        out.write(&mut writer, &mut stats)?;
        if !out.done() {
            return Err(EncodeError::Order { reason: "internal: sealed blobs left unwritten" }.into());
        }
        Ok(())
    })?;
    let digests: Vec<_> = digesters.iter().map(ImageDigester::finish).collect();
    stats.kinds = em.kinds;
    stats.scanned_bytes = total;
    let trailer = writer.trailer(digests);
    let tw = Instant::now();
    let out = writer.finish(&trailer)?;
    stats.write += tw.elapsed();
    stats.overlay_bytes = out.bytes;
    stats.total = t0.elapsed();
    Ok((out.inner, stats))
}

/// The level for blobs of incompressible chunks: the compressor still runs (every blob of an
/// overlay uses its codec) but spends no effort.
fn fastest_level(c: Compression) -> i32 {
    match c {
        Compression::Xz => 0,
        _ => 1,
    }
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

/// Seals blobs alone, in parallel: the dense stream at the fastest level over a window covering
/// the blob, the light stream (when there is no chain) at the chosen level.
fn seal(ready: Vec<Cut>, opts: &CreateOptions) -> Result<Sealed, EncodeError> {
    let tc = Instant::now();
    let blobs = ready
        .into_par_iter()
        .map(|(n, b, stream)| {
            // Every blob's window covers the blob, whatever the level (xz's presets below 9
            // have smaller dictionaries than its 48 MiB blobs).
            let len = b.uncompressed_len().max(CHUNK_SIZE);
            let window_log = Some(usize::BITS - (len - 1).leading_zeros());
            let effort = if stream == DENSE {
                // The fastest level, with long-distance matching: cheap, and it finds
                // incompressible data stored twice.
                Effort {
                    level: fastest_level(opts.compression),
                    window_log,
                    long_distance: true,
                    executable_filter: false,
                }
            } else {
                // Machine code (binaries on disk, their pages in memory) is a large part of
                // what a customization adds: xz's x86 filter makes it about 2.5% smaller.
                Effort { executable_filter: true, window_log, ..Effort::level(opts.level) }
            };
            Ok((n, b.seal_with(opts.compression, &effort)?, stream))
        })
        .collect::<Result<_, EncodeError>>()?;
    Ok(Sealed { blobs, time: tc.elapsed() })
}

/// A blob as cut: its number (the order it is written in), its records, its stream.
type Cut = (u64, BlobBuilder, usize);
/// A sealed blob with its number and stream.
type SealedCut = (u64, SealedBlob, usize);

/// Blobs sealed by [`seal`], numbered, and the wall time it took.
struct Sealed {
    blobs: Vec<SealedCut>,
    time: Duration,
}

/// Blobs a chain's thread may have waiting (with `blob_bytes` of 4 MiB, 32 MiB per lane). A
/// lane's bytes come in bursts; a short queue held the scan up whenever one lane's burst
/// filled it, while the other lane's thread idled.
const CHAIN_QUEUE: usize = 8;

/// A chain's thread: its lane's blobs go in, numbered, in cut order; sealed blobs come back in
/// the same order. At most [`CHAIN_QUEUE`] wait to be sealed, so a slow chain holds the scan
/// back rather than filling memory.
struct Chain {
    /// The stream whose blobs it seals.
    stream: usize,
    to: Option<std::sync::mpsc::SyncSender<(u64, BlobBuilder, bool)>>,
    from: std::sync::mpsc::Receiver<ChainResult>,
    /// Blobs sent and not received back.
    pending: usize,
    /// A blob went in without ending the frame.
    open: bool,
}

type ChainResult = (u64, Result<SealedBlob, EncodeError>, Duration);

impl Chain {
    fn start<'s>(ts: &'s std::thread::Scope<'s, '_>, mut enc: ChainEncoder, stream: usize) -> Self {
        let (to, rx) = std::sync::mpsc::sync_channel::<(u64, BlobBuilder, bool)>(CHAIN_QUEUE);
        let (tx, from) = std::sync::mpsc::channel::<ChainResult>();
        ts.spawn(move || {
            for (n, b, end) in rx {
                let t = Instant::now();
                let r = b.seal_chained(&mut enc, end);
                let failed = r.is_err();
                if tx.send((n, r, t.elapsed())).is_err() || failed {
                    break;
                }
            }
        });
        Chain { stream, to: Some(to), from, pending: 0, open: false }
    }

    /// Sends the blobs of `fresh` whose stream has a chain to it (with `last`, the last of
    /// each stream ends its frame) and returns the others, to be sealed alone.
    fn route(chains: &mut [Chain], fresh: Vec<Cut>, last: bool) -> Vec<Cut> {
        let ends: Vec<Option<usize>> =
            chains.iter().map(|c| fresh.iter().rposition(|(_, _, s)| *s == c.stream)).collect();
        let mut alone = Vec::new();
        for (k, (n, b, stream)) in fresh.into_iter().enumerate() {
            match chains.iter().position(|c| c.stream == stream) {
                Some(i) => chains[i].put(n, b, last && ends[i] == Some(k)),
                None => alone.push((n, b, stream)),
            }
        }
        alone
    }

    fn put(&mut self, n: u64, b: BlobBuilder, end: bool) {
        let to = self.to.as_ref().expect("the chain takes blobs until `sealed(true)`");
        // A send fails only when the thread stopped after a failure, whose result says why.
        if to.send((n, b, end)).is_ok() {
            self.pending += 1;
            self.open = !end;
        }
    }

    /// Sealed blobs back from the chain, with the time the chain spent on them: those ready,
    /// or (`all`, which closes the chain) every one still pending.
    fn sealed(&mut self, all: bool) -> Result<(Vec<SealedCut>, Duration), EncodeError> {
        if all {
            self.to = None;
        }
        let (mut out, mut time) = (Vec::new(), Duration::ZERO);
        while self.pending > 0 {
            let got = if all { self.from.recv().ok() } else { self.from.try_recv().ok() };
            let Some((n, r, t)) = got else {
                if all {
                    return Err(EncodeError::Compress {
                        what: "blob",
                        source: std::io::Error::other("the chain's thread stopped"),
                    });
                }
                break;
            };
            self.pending -= 1;
            time += t;
            out.push((n, r?, self.stream));
        }
        Ok((out, time))
    }
}

/// Sealed blobs waiting to be written: each stream's in the order they were cut.
///
/// Only a stream's own order matters: a chained blob continues its lane's blobs before it, and
/// a copy-self record goes to the stream of its source (see [`Emitter::copy_self`]), so every
/// record a blob depends on is in an earlier blob of its stream. So a lane that lags behind
/// does not hold up the other streams' blobs until it catches up: they are written as they are
/// sealed, beside the scan, rather than all at the end.
#[derive(Default)]
struct Ordered {
    /// Blobs cut so far.
    cut: u64,
    /// Per stream, the numbers of its blobs not written yet, in the order they were cut.
    queued: [std::collections::VecDeque<u64>; STREAMS],
    waiting: HashMap<u64, SealedBlob>,
}

impl Ordered {
    /// Numbers blobs as they are cut.
    fn number(&mut self, ready: Vec<(BlobBuilder, usize)>) -> Vec<Cut> {
        ready
            .into_iter()
            .map(|(b, s)| {
                self.queued[s].push_back(self.cut);
                self.cut += 1;
                (self.cut - 1, b, s)
            })
            .collect()
    }

    fn extend(&mut self, sealed: Vec<SealedCut>) {
        for (n, b, _) in sealed {
            self.waiting.insert(n, b);
        }
    }

    /// True when every blob cut is written.
    fn done(&self) -> bool {
        self.queued.iter().all(|q| q.is_empty()) && self.waiting.is_empty()
    }

    /// Writes the blobs whose predecessors in their stream are all written, the earliest cut
    /// first.
    fn write<W: Write>(&mut self, writer: &mut OverlayWriter<W>, stats: &mut CreateStats) -> Result<(), CreateError> {
        let tw = Instant::now();
        loop {
            let next = (0..STREAMS)
                .filter_map(|s| self.queued[s].front().map(|&n| (n, s)))
                .filter(|(n, _)| self.waiting.contains_key(n))
                .min();
            let Some((n, stream)) = next else { break };
            let s = self.waiting.remove(&n).expect("sealed");
            self.queued[stream].pop_front();
            stats.dense_blobs += u64::from(stream == DENSE);
            stats.blob_bytes_raw += s.uncompressed_len() as u64;
            stats.blob_bytes_compressed += s.compressed_len() as u64;
            stats.blobs += 1;
            writer.write_blob(&s)?;
        }
        stats.write += tw.elapsed();
        Ok(())
    }
}
