//! Applying an overlay: rebuild the custom VM's images from the base while the overlay streams
//! in; blobs are decompressed in parallel ahead of the applier; digests checked before success.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_format::digest::hash_tagged;
use overlay_format::{
    apply_patch, BaseId, ChunkHash, DecodeError, DecodedBlob, ImageDigest, ImageKind, OverlayMeta, OverlayReader,
    RecordRef, SealedBlob, Trailer, CHUNK_SIZE,
};
use rayon::prelude::*;

use crate::base::{read_padded_at, Base};
use crate::file::{lazy_copy, zero_range, LazyCopy, WriteBuf};
use crate::qcow2::{Qcow2Writer, Written};
use crate::{Fault, KindCounts, Progress};

/// Error applying an overlay. Nothing that looks like a finished image is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The overlay was made for another base.
    #[error("overlay is for base {overlay}, but the base given is {base}")]
    WrongBase {
        /// The base the overlay names.
        overlay: BaseId,
        /// The base given.
        base: BaseId,
    },
    /// The overlay's images do not match the base's.
    #[error("overlay does not fit the base: {reason}")]
    Mismatch {
        /// What differs.
        reason: String,
    },
    /// A size the overlay declares for one of its images does not fit the base image it is
    /// rebuilt over (see `FORMAT.md`, "Sizes a reader trusts"). Checked before any output file
    /// is created or any buffer sized.
    #[error("overlay image '{image}': {field} is {overlay} bytes, but {allowed}")]
    ImageMismatch {
        /// The image's name.
        image: String,
        /// The field of the overlay's metadata, e.g. `size` or `base_size`.
        field: &'static str,
        /// The value the overlay declares.
        overlay: u64,
        /// The base's value the field is checked against.
        base: u64,
        /// The rule, with the base's value, e.g. `the base memory image is 1048576 bytes`.
        allowed: String,
    },
    /// Decoding a blob panicked (a bug in a decoder, reached by a damaged overlay): the
    /// overlay is refused, the process lives on.
    #[error("frame {frame} at byte {offset}: decoding failed unexpectedly: {reason}")]
    DecoderPanic {
        /// Frame number of the blob.
        frame: u64,
        /// Stream offset of the blob's frame.
        offset: u64,
        /// The panic's message.
        reason: String,
    },
    /// The overlay stream is damaged.
    #[error("cannot read the overlay")]
    Decode(#[from] DecodeError),
    /// An output file could not be written.
    #[error("{path}: cannot write")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An output already exists.
    #[error("{path} already exists")]
    OutputExists {
        /// The file.
        path: PathBuf,
    },
    /// A record breaks a rule the format checks only at apply time.
    #[error("record for image '{image}' chunk {chunk}: {reason}")]
    Record {
        /// Target image.
        image: String,
        /// Target chunk.
        chunk: u64,
        /// The rule broken.
        reason: String,
    },
    /// A failure of the applier itself (a bug: a thread of ours stopped without a word, or
    /// panicked outside a decoder), not of the overlay or of the machine.
    #[error("internal error: {reason}")]
    Internal {
        /// What went wrong.
        reason: String,
    },
    /// A rebuilt image does not have the digest the overlay promises.
    #[error("rebuilt image '{image}' has digest {got}, the overlay expects {expected}")]
    DigestMismatch {
        /// Image name.
        image: String,
        /// Digest from the trailer.
        expected: ImageDigest,
        /// Digest of the rebuilt bytes.
        got: ImageDigest,
    },
}

impl ApplyError {
    /// Whose fault the error is:
    ///
    /// - [`Fault::Input`]: the overlay's, as the caller gave it: damaged, cut off or
    ///   unreadable as a stream, hostile (records that break the rules, a decoder that panics
    ///   on its bytes), or made for another base.
    /// - [`Fault::Io`]: the machine's: an output or base file that cannot be created, read or
    ///   written (disk full, permissions), or an output that exists already.
    /// - [`Fault::Internal`]: the applier's own (a bug).
    pub fn fault(&self) -> Fault {
        match self {
            ApplyError::WrongBase { .. }
            | ApplyError::Mismatch { .. }
            | ApplyError::ImageMismatch { .. }
            | ApplyError::DecoderPanic { .. }
            | ApplyError::Record { .. }
            | ApplyError::DigestMismatch { .. } => Fault::Input,
            ApplyError::Decode(DecodeError::Misuse { .. }) => Fault::Internal,
            // A stream that fails to deliver (an upload cut off, a read error of the input)
            // is the input's failure, like a stream cut short.
            ApplyError::Decode(_) => Fault::Input,
            ApplyError::Io { .. } | ApplyError::OutputExists { .. } => Fault::Io,
            ApplyError::Internal { .. } => Fault::Internal,
        }
    }

    /// True when the overlay itself is at fault: `self.fault() == Fault::Input`. A server
    /// answers these with a client error.
    pub fn is_bad_input(&self) -> bool {
        self.fault() == Fault::Input
    }
}

/// How much larger than its base image a rebuilt disk image may be, by default
/// ([`ApplyOptions::max_disk_growth`]): 64 GiB. A disk grows when the custom VM's disk was
/// resized; the bound keeps a hostile overlay from making the applier create, and account for,
/// absurdly large images. Output files are sparse, so only what the overlay writes takes space.
pub const DEFAULT_MAX_DISK_GROWTH: u64 = 64 << 30;

/// What applying did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The overlay's metadata.
    pub meta: OverlayMeta,
    /// The QEMU device state to resume with.
    pub device_state: Vec<u8>,
    /// The overlay's trailer.
    pub trailer: Trailer,
    /// The rebuilt images: (name, path).
    pub outputs: Vec<(String, PathBuf)>,
    /// Chunks and records by kind.
    pub kinds: KindCounts,
    /// Overlay bytes read.
    pub overlay_bytes: u64,
    /// Time from start until the last byte of the overlay was read (chained blobs are
    /// decompressed as they are read, so this includes their decompression).
    pub receive: Duration,
    /// Time spent on the pool decompressing blobs compressed alone, checking every blob,
    /// hashing its raw chunks and patching its patched ones, summed over threads.
    pub decode: Duration,
    /// Time the applier spent writing records.
    pub apply: Duration,
    /// Time verifying digests after the last record.
    pub verify: Duration,
    /// Wall clock.
    pub total: Duration,
}

/// Options of [`apply_overlay`].
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// The base's id; the overlay must name it.
    pub base_id: BaseId,
    /// Where to write each rebuilt image, by name. Every image of the overlay needs one; none
    /// may exist yet.
    pub outputs: Vec<(String, PathBuf)>,
    /// fsync the images before renaming them into place.
    pub fsync: bool,
    /// Write disk images as qcow2 layers (4 KiB clusters) over the base's raw disk holding
    /// only the changed chunks, instead of raw copies. Memory images are always raw.
    pub qcow2_disks: bool,
    /// How many bytes larger than its base image a disk image of the overlay may be (usually
    /// [`DEFAULT_MAX_DISK_GROWTH`]). A memory image always has its base's size; a disk may
    /// shrink freely.
    pub max_disk_growth: u64,
}

/// Where an output image's bytes go.
enum Store {
    /// A copy of the base image, filled in offset order as records arrive (see [`LazyCopy`]).
    Raw(File, Option<LazyCopy>, WriteBuf),
    /// A qcow2 layer over the base image.
    Qcow2(Qcow2Writer),
}

struct Out {
    name: String,
    tmp: PathBuf,
    path: PathBuf,
    store: Store,
    /// Index of the base image this output derives from.
    base_image: usize,
    size: u64,
    /// Chunk hashes of the image as rebuilt so far, of the chunks the base image has.
    hashes: Vec<ChunkHash>,
    /// Hashes of the chunks past those that records wrote (a grown disk); the others read as
    /// zeros (see [`Out::hash`]). Kept apart so that what is kept grows with what is written.
    grown: std::collections::BTreeMap<u64, ChunkHash>,
    /// Chunks whose hash must be read back at the end (untouched chunks straddling a size edge).
    recheck: Vec<u64>,
    /// Bitmap of the chunks records wrote; grows as they are written.
    written: Vec<u64>,
}

impl Out {
    fn mark(&mut self, c: u64) {
        let w = (c / 64) as usize;
        if w >= self.written.len() {
            self.written.resize(w + 1, 0);
        }
        self.written[w] |= 1 << (c % 64);
    }
    /// The hash of chunk `c` of the image as rebuilt so far.
    fn hash(&self, c: u64) -> ChunkHash {
        match self.hashes.get(c as usize) {
            Some(h) => *h,
            None => self.grown.get(&c).copied().unwrap_or_else(|| zero_hash(self.chunk_len(c))),
        }
    }
    /// Sets the hash of chunk `c` (inside the image).
    fn set_hash(&mut self, c: u64, h: ChunkHash) {
        if let Some(slot) = self.hashes.get_mut(c as usize) {
            *slot = h;
        } else if h == zero_hash(self.chunk_len(c)) {
            // A zero chunk past the base reads as zeros without an entry.
            self.grown.remove(&c);
        } else {
            self.grown.insert(c, h);
        }
    }
    fn was_written(&self, c: u64) -> bool {
        self.written.get((c / 64) as usize).is_some_and(|w| w & (1 << (c % 64)) != 0)
    }
    fn chunk_len(&self, c: u64) -> usize {
        (self.size - c * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64) as usize
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> ApplyError {
        let path = self.tmp.clone();
        move |source| ApplyError::Io { path, source }
    }

    /// Writes whole chunks from chunk `c` on.
    fn write(&mut self, c: u64, data: &[u8]) -> Result<(), ApplyError> {
        let start = c * CHUNK_SIZE as u64;
        let r = match &mut self.store {
            Store::Raw(f, lazy, wb) => (|| {
                if let Some(l) = lazy {
                    l.advance_to(f, wb, start)?;
                    l.skip_to(start + data.len() as u64);
                }
                wb.write(f, start, data)
            })(),
            Store::Qcow2(w) => w.write(c, data),
        };
        r.map_err(self.io())
    }

    /// Writes `count` whole chunks from chunk `c` on with the bytes of `input` from offset
    /// `src` on, read with `pread` (a raw output reads them straight into its write buffer).
    fn copy_in(&mut self, c: u64, count: u64, input: &File, src: u64, scratch: &mut Vec<u8>) -> Result<(), ApplyError> {
        let start = c * CHUNK_SIZE as u64;
        let len = count * CHUNK_SIZE as u64;
        let r = match &mut self.store {
            Store::Raw(f, lazy, wb) => (|| {
                if let Some(l) = lazy {
                    l.advance_to(f, wb, start)?;
                    l.skip_to(start + len);
                }
                wb.copy_from(f, start, input, src, len)
            })(),
            Store::Qcow2(w) => (|| {
                // In pieces of at most 1 MiB: a run can be as long as the image.
                const PIECE: u64 = 256;
                let mut k = 0;
                while k < count {
                    let n = (count - k).min(PIECE);
                    scratch.resize((n * CHUNK_SIZE as u64) as usize, 0);
                    read_padded_at(input, src + k * CHUNK_SIZE as u64, scratch)?;
                    w.write(c + k, scratch)?;
                    k += n;
                }
                Ok(())
            })(),
        };
        r.map_err(self.io())
    }

    /// Copies the rest of the base (lazy copies); after this the image is complete.
    fn finish_copy(&mut self) -> Result<(), ApplyError> {
        let size = self.size;
        if let Store::Raw(f, lazy, wb) = &mut self.store {
            let r = match lazy {
                Some(l) => l.advance_to(f, wb, size).and_then(|()| wb.flush(f)),
                None => wb.flush(f),
            };
            r.map_err(|source| ApplyError::Io { path: self.tmp.clone(), source })?;
        }
        Ok(())
    }

    /// Makes chunks `c..c + count` zeros.
    fn zero(&mut self, c: u64, count: u64) -> Result<(), ApplyError> {
        let start = c * CHUNK_SIZE as u64;
        let end = ((c + count) * CHUNK_SIZE as u64).min(self.size);
        match &mut self.store {
            Store::Raw(f, lazy, wb) => {
                if let Some(l) = lazy {
                    let r = l.advance_to(f, wb, start);
                    r.map_err(|source| ApplyError::Io { path: self.tmp.clone(), source })?;
                    if l.cursor() <= start {
                        // Never copied: the fresh file already reads zeros here.
                        l.skip_to(end);
                        return Ok(());
                    }
                    l.skip_to(end);
                }
                wb.flush(f).and_then(|()| zero_range(f, start, end - start)).map_err(self.io())
            }
            Store::Qcow2(w) => {
                w.zero(c, count);
                Ok(())
            }
        }
    }

    /// Reads chunk `c` (`buf.len()` bytes) as the rebuilt image has it now.
    fn read(&mut self, base: &Base, c: u64, buf: &mut [u8]) -> Result<(), ApplyError> {
        let io = self.io();
        match &mut self.store {
            Store::Raw(f, _, wb) => wb.read_at(f, buf, c * CHUNK_SIZE as u64).map_err(io),
            Store::Qcow2(w) => {
                match w.state(c) {
                    Written::Backing => read_padded_at(base.file(self.base_image), c * CHUNK_SIZE as u64, buf)
                        .map_err(|source| ApplyError::Io { path: base.path(self.base_image).to_path_buf(), source })?,
                    Written::Zero => buf.fill(0),
                    Written::At(host) => w.read_at(buf, host).map_err(io)?,
                }
                Ok(())
            }
        }
    }
}

/// Removes the temporary outputs unless committed.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn zero_hash(len: usize) -> ChunkHash {
    if len == CHUNK_SIZE {
        ChunkHash::zero()
    } else {
        ChunkHash::of(&vec![0u8; len])
    }
}

/// Rebuilds the custom VM's images from `base` and the overlay read from `input`.
///
/// The overlay is read on its own thread, which also decompresses chained blobs (they continue
/// one another, so in stream order); the other blobs are decompressed on the rayon pool, where
/// every blob's records are checked, its raw chunks hashed and its patches applied to base
/// chunks, while the calling thread applies records in order, so applying starts with the
/// first blob. Base chunks are read with `pread` (see [`Base`]). Digests
/// are checked before the outputs are renamed into place; on any error the partial outputs are
/// removed.
pub fn apply_overlay<R: Read + Send>(
    base: &Base,
    input: R,
    opts: &ApplyOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<ApplyReport, ApplyError> {
    apply_overlay_reader(base, OverlayReader::new(input)?, opts, progress)
}

/// [`apply_overlay`] on a reader whose metadata the caller has already looked at (e.g. to find
/// the base named by `reader.meta().base_id`).
///
/// The stages: [`check_overlay`] (before anything is created), the device state,
/// [`prepare_outputs`], [`stream_blobs`] (read, decode and apply, at the same time),
/// [`finish_copies`], [`verify`], [`seal_outputs`] and [`publish`].
pub fn apply_overlay_reader<R: Read + Send>(
    base: &Base,
    mut reader: OverlayReader<R>,
    opts: &ApplyOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<ApplyReport, ApplyError> {
    let t0 = Instant::now();
    let meta = reader.meta().clone();
    check_overlay(&meta, base, opts)?;
    // The device state comes before the blobs: a stream cut off before it creates nothing.
    let device_state = reader.take_device_state()?;
    let (mut outs, cleanup) = prepare_outputs(&meta, base, opts)?;
    let streamed = stream_blobs(base, reader, &meta, &mut outs, progress, t0)?;
    let tf = Instant::now();
    finish_copies(&mut outs)?;
    let apply = streamed.apply + tf.elapsed();
    let tv = Instant::now();
    verify(base, &mut outs, &streamed.trailer)?;
    seal_outputs(&mut outs, opts.fsync)?;
    let verify = tv.elapsed();
    let outputs = publish(&outs, cleanup)?;
    Ok(ApplyReport {
        meta,
        device_state,
        trailer: streamed.trailer,
        outputs,
        kinds: streamed.kinds,
        overlay_bytes: streamed.overlay_bytes,
        receive: streamed.receive,
        decode: streamed.decode,
        apply,
        verify,
        total: t0.elapsed(),
    })
}

/// Checks the overlay's metadata against the base and the options, before anything is created:
/// the base it names, its images (see [`check_sizes`]).
fn check_overlay(meta: &OverlayMeta, base: &Base, opts: &ApplyOptions) -> Result<(), ApplyError> {
    if meta.base_id != opts.base_id {
        return Err(ApplyError::WrongBase { overlay: meta.base_id, base: opts.base_id });
    }
    let idx = base.index();
    if meta.images.len() != idx.images().len() {
        return Err(ApplyError::Mismatch {
            reason: format!("{} images in the overlay, {} in the base", meta.images.len(), idx.images().len()),
        });
    }
    check_sizes(meta, base, opts)
}

/// Creates the outputs under temporary names: sparse copies of the base images (or qcow2
/// layers over them), each with the chunk hashes of the image as it starts. The [`Cleanup`]
/// removes them unless they are published.
fn prepare_outputs(meta: &OverlayMeta, base: &Base, opts: &ApplyOptions) -> Result<(Vec<Out>, Cleanup), ApplyError> {
    let idx = base.index();
    let mut cleanup = Cleanup(Vec::new());
    let mut outs = Vec::with_capacity(meta.images.len());
    for (i, m) in meta.images.iter().enumerate() {
        let Some((_, path)) = opts.outputs.iter().find(|(n, _)| *n == m.name) else {
            return Err(ApplyError::Mismatch { reason: format!("no output path for image '{}'", m.name) });
        };
        if path.exists() {
            return Err(ApplyError::OutputExists { path: path.clone() });
        }
        let tmp = temp_name(path);
        let _ = std::fs::remove_file(&tmp);
        // Registered first: creating the output can fail after the file exists.
        cleanup.0.push(tmp.clone());
        let store = if opts.qcow2_disks && m.kind == ImageKind::Disk {
            let w = Qcow2Writer::create(&tmp, m.size, base.path(i));
            Store::Qcow2(w.map_err(|source| ApplyError::Io { path: tmp.clone(), source })?)
        } else {
            // Copy only the base's non-zero chunks (the index knows them): zeros stay holes.
            let bi = &idx.images()[i];
            let cs = CHUNK_SIZE as u64;
            let mut data: Vec<(u64, u64)> = Vec::new();
            for (c, h) in bi.hashes.iter().enumerate() {
                let (s, e) = (c as u64 * cs, ((c as u64 + 1) * cs).min(bi.size));
                if *h == ChunkHash::zero() && e - s == cs {
                    continue;
                }
                match data.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => data.push((s, e)),
                }
            }
            let (f, lazy) = lazy_copy(base.path(i), &tmp, m.size, data)
                .map_err(|source| ApplyError::Io { path: tmp.clone(), source })?;
            Store::Raw(f, lazy, WriteBuf::default())
        };
        // Hashes of the chunks the base has (checked above: within the base's size and its
        // index); the chunks past them grow as they are written.
        let n = m.size.div_ceil(CHUNK_SIZE as u64).min(m.base_size.div_ceil(CHUNK_SIZE as u64));
        let mut hashes = Vec::with_capacity(n as usize);
        let mut recheck = Vec::new();
        for c in 0..n {
            let len = (m.size - c * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64) as usize;
            let start = c * CHUNK_SIZE as u64;
            if len == CHUNK_SIZE && start + CHUNK_SIZE as u64 <= m.base_size {
                hashes.push(idx.images()[i].hashes[c as usize]);
            } else if start >= m.base_size {
                hashes.push(zero_hash(len));
            } else {
                hashes.push(ChunkHash::zero());
                recheck.push(c);
            }
        }
        outs.push(Out {
            name: m.name.clone(),
            tmp,
            path: path.clone(),
            store,
            base_image: i,
            size: m.size,
            hashes,
            grown: Default::default(),
            recheck,
            written: Vec::new(),
        });
    }
    Ok((outs, cleanup))
}

/// What [`stream_blobs`] did.
struct Streamed {
    trailer: Trailer,
    /// Overlay bytes read.
    overlay_bytes: u64,
    /// From the start until the last byte of the overlay was read.
    receive: Duration,
    /// Decoding on the pool, summed over threads.
    decode: Duration,
    /// Applying records.
    apply: Duration,
    kinds: KindCounts,
}

/// A blob being decoded: its decoded size, and where its decoding will arrive.
type Pending = (u64, Receiver<Result<(DecodedBlob, Prepared), ApplyError>>);

/// Reads, decodes and applies the overlay's blobs, all at once: [`read_blobs`] on a thread of
/// its own hands each blob to [`decode_blob`] on the pool, and this thread runs
/// [`apply_blobs`] over the results in stream order.
fn stream_blobs<R: Read + Send>(
    base: &Base,
    reader: OverlayReader<R>,
    meta: &OverlayMeta,
    outs: &mut [Out],
    progress: &(dyn Fn(Progress) + Sync),
    t0: Instant,
) -> Result<Streamed, ApplyError> {
    let meta_arc = Arc::new(meta.clone());
    let decode_nanos = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut kinds = KindCounts::default();
    let mut apply_time = Duration::ZERO;
    let ahead = &Ahead::default();
    let (trailer, overlay_bytes, receive) = std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Result<Pending, ApplyError>>(AHEAD_BLOBS);
        let decoding =
            Decoding { meta: meta_arc.clone(), decode_nanos: decode_nanos.clone(), files: base.files().clone() };
        // Applied blobs' buffers go back to the reader, for the chained blobs it decompresses.
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let reader_thread = s.spawn(move || read_blobs(reader, decoding, tx, back_rx, ahead, t0));
        apply_blobs(base, outs, rx, back_tx, ahead, progress, &mut kinds, &mut apply_time)?;
        match reader_thread.join() {
            Ok(Some(t)) => Ok(t),
            // The reader stops early only on an error it sent, or when the applier stopped:
            // neither ends the applier's loop without an error.
            Ok(None) => Err(ApplyError::Internal {
                reason: "the overlay's reader stopped without a trailer or an error".into(),
            }),
            Err(panic) => Err(ApplyError::Internal {
                reason: format!("the overlay's reader panicked: {}", panic_message(&*panic)),
            }),
        }
    })?;
    Ok(Streamed {
        trailer,
        overlay_bytes,
        receive,
        decode: Duration::from_nanos(decode_nanos.load(std::sync::atomic::Ordering::Relaxed)),
        apply: apply_time,
        kinds,
    })
}

/// What decoding a blob on the pool needs.
#[derive(Clone)]
struct Decoding {
    meta: Arc<OverlayMeta>,
    /// Time spent decoding, summed over threads.
    decode_nanos: Arc<std::sync::atomic::AtomicU64>,
    /// The base images, to patch their chunks.
    files: Arc<[File]>,
}

/// The reader's thread: reads the blobs (decompressing chained ones, which continue one another),
/// sends each to [`decode_blob`] on the pool and its future result to the applier, at most
/// [`AHEAD_BLOBS`] and [`AHEAD_BYTES`] ahead. Returns the trailer, the bytes read and the time
/// it took, or `None` once it sent an error or the applier stopped.
fn read_blobs<R: Read + Send>(
    mut reader: OverlayReader<R>,
    decoding: Decoding,
    tx: SyncSender<Result<Pending, ApplyError>>,
    back_rx: Receiver<Vec<u8>>,
    ahead: &Ahead,
    t0: Instant,
) -> Option<(Trailer, u64, Duration)> {
    loop {
        while let Ok(buf) = back_rx.try_recv() {
            reader.recycle(buf);
        }
        // Chained blobs are decompressed here: a panic in a decoder becomes an error
        // (it would otherwise end the scope, and the caller, in a panic).
        let (frame, offset) = (2 + reader.blob_count(), reader.bytes_read());
        let next = guard(frame, offset, || reader.next_blob().map_err(ApplyError::Decode));
        match next {
            Ok(Some(blob)) => {
                let size = blob.uncompressed_len() as u64;
                if !ahead.take(size, AHEAD_BYTES) {
                    return None; // the applier stopped
                }
                let (btx, brx) = sync_channel(1);
                let decoding = decoding.clone();
                rayon::spawn(move || {
                    let _ = btx.send(decode_blob(blob, &decoding));
                });
                if tx.send(Ok((size, brx))).is_err() {
                    return None;
                }
            }
            Ok(None) => {
                let t = reader.trailer().cloned().expect("trailer read");
                return Some((t, reader.bytes_read(), t0.elapsed()));
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return None;
            }
        }
    }
}

/// Decodes a blob on the pool: decompresses it (unless chained), checks its records and
/// prepares them ([`Prepared`]).
fn decode_blob(blob: SealedBlob, decoding: &Decoding) -> Result<(DecodedBlob, Prepared), ApplyError> {
    let t = Instant::now();
    let (frame, offset) = (blob.frame_index(), blob.stream_offset());
    // A panic here would abort the process (rayon::spawn): a decoder that panics on hostile
    // bytes becomes an error instead.
    let r = guard(frame, offset, || {
        let d = blob.into_decoded_for(&decoding.meta)?;
        let p = Prepared::of(&d, &decoding.meta, &decoding.files);
        Ok((d, p))
    });
    decoding.decode_nanos.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    r
}

/// The applier: applies the decoded blobs' records in stream order, bounding the work by the
/// images' chunks; gives each blob's buffer back to the reader and its bytes back to `ahead`.
#[allow(clippy::too_many_arguments)]
fn apply_blobs(
    base: &Base,
    outs: &mut [Out],
    rx: Receiver<Result<Pending, ApplyError>>,
    back_tx: std::sync::mpsc::Sender<Vec<u8>>,
    ahead: &Ahead,
    progress: &(dyn Fn(Progress) + Sync),
    kinds: &mut KindCounts,
    apply_time: &mut Duration,
) -> Result<(), ApplyError> {
    let mut applied_bytes = 0u64;
    let chunk_budget: u64 = outs.iter().map(|o| o.size.div_ceil(CHUNK_SIZE as u64)).sum();
    let mut covered = 0u64;
    let mut scratch = Vec::new();
    // However the applier stops, the reader must not wait for room any more.
    let _close = ahead.closer();
    for pending in rx {
        let (decoded, pending) = pending?;
        let (blob, prepared) = pending
            .recv()
            .map_err(|_| ApplyError::Internal { reason: "a blob's decoder stopped without a result".into() })??;
        let mut prepared = prepared.hand_out();
        let ta = Instant::now();
        for r in blob.records() {
            // A record may cover a large run in a few bytes: the work is bounded by the
            // images' chunks, each rebuilt once.
            covered = covered.saturating_add(r.chunk_count());
            if covered > chunk_budget {
                return Err(ApplyError::Record {
                    image: outs[r.image() as usize].name.clone(),
                    chunk: r.chunk(),
                    reason: format!(
                        "the records cover more than the images' {chunk_budget} chunks (each chunk is rebuilt once)"
                    ),
                });
            }
            applied_bytes += apply_record(base, outs, &r, &mut prepared, &mut scratch, kinds)?;
        }
        *apply_time += ta.elapsed();
        let _ = back_tx.send(blob.into_buffer());
        ahead.give(decoded);
        // The stream's length is unknown while it arrives: report bytes rebuilt, total 0.
        progress(Progress { phase: "apply", done: applied_bytes, total: 0 });
    }
    Ok(())
}

/// Copies the rest of the base into the raw outputs (lazy copies): after this every image is
/// complete.
fn finish_copies(outs: &mut [Out]) -> Result<(), ApplyError> {
    for o in outs.iter_mut() {
        o.finish_copy()?;
    }
    Ok(())
}

/// Checks every rebuilt image's digest against the trailer's, hashing the chunks whose hash is
/// not known yet (untouched chunks straddling a size edge).
fn verify(base: &Base, outs: &mut [Out], trailer: &Trailer) -> Result<(), ApplyError> {
    for (i, o) in outs.iter_mut().enumerate() {
        let mut buf = vec![0u8; CHUNK_SIZE];
        for k in 0..o.recheck.len() {
            let c = o.recheck[k];
            if !o.was_written(c) {
                let len = o.chunk_len(c);
                o.read(base, c, &mut buf[..len])?;
                o.set_hash(c, ChunkHash::of(&buf[..len]));
            }
        }
        let n = o.size.div_ceil(CHUNK_SIZE as u64);
        let tail = (o.hashes.len() as u64..n).map(|c| o.hash(c));
        let got = ImageDigest::from_chunk_hashes(o.hashes.iter().copied().chain(tail));
        if got != trailer.image_digests[i] {
            return Err(ApplyError::DigestMismatch { image: o.name.clone(), expected: trailer.image_digests[i], got });
        }
    }
    Ok(())
}

/// Completes the qcow2 layers' metadata and, with `fsync`, syncs every output.
fn seal_outputs(outs: &mut [Out], fsync: bool) -> Result<(), ApplyError> {
    for o in outs.iter_mut() {
        if let Store::Qcow2(w) = &mut o.store {
            w.finish().map_err(|source| ApplyError::Io { path: o.tmp.clone(), source })?;
        }
    }
    if fsync {
        outs.par_iter().try_for_each(|o| {
            let f = match &o.store {
                Store::Raw(f, _, _) => f,
                Store::Qcow2(w) => w.file(),
            };
            f.sync_all().map_err(|source| ApplyError::Io { path: o.tmp.clone(), source })
        })?;
    }
    Ok(())
}

/// Renames the outputs into place; only then are they kept. Returns (name, path) of each.
fn publish(outs: &[Out], mut cleanup: Cleanup) -> Result<Vec<(String, PathBuf)>, ApplyError> {
    let mut outputs = Vec::new();
    for o in outs {
        std::fs::rename(&o.tmp, &o.path).map_err(|source| ApplyError::Io { path: o.path.clone(), source })?;
        outputs.push((o.name.clone(), o.path.clone()));
    }
    cleanup.0.clear();
    Ok(outputs)
}

/// Checks every size the overlay declares against the base it is applied to, before anything
/// is created or sized by them: each image has its base image (same name, same order), its
/// `base_size` is that image's real size, a memory image has its base's size, and a disk is
/// at most `opts.max_disk_growth` bytes larger than its base.
fn check_sizes(meta: &OverlayMeta, base: &Base, opts: &ApplyOptions) -> Result<(), ApplyError> {
    for (m, b) in meta.images.iter().zip(base.index().images()) {
        if m.name != b.name || m.kind != b.kind {
            return Err(ApplyError::Mismatch {
                reason: format!(
                    "overlay image '{}' ({:?}) is rebuilt over base image '{}' ({:?})",
                    m.name, m.kind, b.name, b.kind
                ),
            });
        }
        let mismatch = |field, overlay, allowed| ApplyError::ImageMismatch {
            image: m.name.clone(),
            field,
            overlay,
            base: b.size,
            allowed,
        };
        if m.base_size != b.size {
            return Err(mismatch("base_size", m.base_size, format!("the base image is {} bytes", b.size)));
        }
        match m.kind {
            ImageKind::Memory if m.size != b.size => {
                return Err(mismatch("size", m.size, format!("the base memory image is {} bytes", b.size)));
            }
            ImageKind::Disk if m.size > b.size.saturating_add(opts.max_disk_growth) => {
                return Err(mismatch(
                    "size",
                    m.size,
                    format!(
                        "the base disk is {} bytes and a disk may grow by at most {} bytes",
                        b.size, opts.max_disk_growth
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs `f`, which decodes the blob of frame `frame` at stream offset `offset`, turning a panic
/// into [`ApplyError::DecoderPanic`].
fn guard<T>(frame: u64, offset: u64, f: impl FnOnce() -> Result<T, ApplyError>) -> Result<T, ApplyError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(ApplyError::DecoderPanic { frame, offset, reason: panic_message(&*panic) }),
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Blobs the reader may run ahead of the applier, at most.
const AHEAD_BLOBS: usize = 64;
/// Decoded bytes the reader may run ahead of the applier, at most (one blob always may). The
/// two are busy at different times: the applier while it writes a memory image's many short
/// runs, the reader while it decompresses a lane's chain; the further ahead the reader may get,
/// the more of one overlaps the other.
const AHEAD_BYTES: u64 = 128 << 20;

/// The decoded bytes in flight between the reader and the applier.
#[derive(Default)]
struct Ahead {
    /// Bytes in flight, and whether the applier has stopped.
    state: std::sync::Mutex<(u64, bool)>,
    freed: std::sync::Condvar,
}

impl Ahead {
    /// Waits until `n` more bytes fit under `limit` (or nothing is in flight), and counts them;
    /// false if the applier has stopped.
    fn take(&self, n: u64, limit: u64) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !st.1 && st.0 > 0 && st.0 + n > limit {
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.0 += n;
        !st.1
    }

    /// `n` bytes were applied.
    fn give(&self, n: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = st.0.saturating_sub(n);
        self.freed.notify_all();
    }

    /// Marks the applier stopped when dropped.
    fn closer(&self) -> impl Drop + '_ {
        struct Close<'a>(&'a Ahead);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
                self.0.freed.notify_all();
            }
        }
        Close(self)
    }
}

fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Applies one record; returns the bytes it covers. `prepared` is what the pool made of the
/// record's blob, read from in record order.
fn apply_record(
    base: &Base,
    outs: &mut [Out],
    r: &RecordRef<'_>,
    prepared: &mut PreparedIter,
    scratch: &mut Vec<u8>,
    kinds: &mut KindCounts,
) -> Result<u64, ApplyError> {
    let cs = CHUNK_SIZE as u64;
    let image = r.image() as usize;
    match *r {
        RecordRef::Zero { chunk, count, .. } => {
            let o = &mut outs[image];
            let start = chunk * cs;
            let end = ((chunk + count) * cs).min(o.size);
            o.zero(chunk, count)?;
            for c in chunk..chunk + count {
                o.set_hash(c, zero_hash(o.chunk_len(c)));
                o.mark(c);
            }
            kinds.zero.add(count);
            Ok(end - start)
        }
        RecordRef::CopyBase { chunk, count, src, .. } => {
            let o = &mut outs[image];
            let si = src.image as usize;
            // The common case, whole chunks on both sides: one read of the base's file. Its
            // chunks' hashes are the index's.
            let fits =
                |c: u64, size: u64| c.checked_add(count).and_then(|e| e.checked_mul(cs)).is_some_and(|e| e <= size);
            let whole = fits(chunk, o.size) && fits(src.chunk, base.size(si));
            if whole {
                o.copy_in(chunk, count, base.file(si), src.chunk * cs, scratch)?;
                for k in 0..count {
                    o.set_hash(chunk + k, base.full_hash(si, src.chunk + k).expect("full chunk"));
                    o.mark(chunk + k);
                }
                kinds.copy_base.add(count);
                return Ok(count * cs);
            }
            let mut buf = vec![0u8; CHUNK_SIZE];
            for k in 0..count {
                let c = chunk + k;
                let len = o.chunk_len(c);
                let at = (src.chunk + k).saturating_mul(cs);
                read_padded_at(base.file(si), at, &mut buf[..len])
                    .map_err(|source| ApplyError::Io { path: base.path(si).to_path_buf(), source })?;
                o.write(c, &buf[..len])?;
                let full = if len == CHUNK_SIZE { base.full_hash(si, src.chunk + k) } else { None };
                o.set_hash(c, full.unwrap_or_else(|| ChunkHash::of(&buf[..len])));
                o.mark(c);
            }
            kinds.copy_base.add(count);
            Ok(count * cs)
        }
        RecordRef::CopySelf { chunk, src, .. } => {
            let len = outs[image].chunk_len(chunk);
            let s = &outs[src.image as usize];
            let refusal = if !s.was_written(src.chunk) {
                Some("copies a chunk no earlier record wrote")
            } else if s.chunk_len(src.chunk) != len {
                Some("copies a chunk of another length")
            } else {
                None
            };
            if let Some(reason) = refusal {
                return Err(ApplyError::Record { image: outs[image].name.clone(), chunk, reason: reason.into() });
            }
            let s = &mut outs[src.image as usize];
            let mut buf = vec![0u8; len];
            s.read(base, src.chunk, &mut buf)?;
            let h = s.hash(src.chunk);
            let o = &mut outs[image];
            o.write(chunk, &buf)?;
            o.set_hash(chunk, h);
            o.mark(chunk);
            kinds.copy_self.add(1);
            Ok(len as u64)
        }
        RecordRef::Patch { chunk, patch, .. } => {
            let o = &mut outs[image];
            let (out, h) = match prepared.next_patch() {
                Ok(p) => p,
                Err(PatchFailure::Invalid(reason)) => {
                    return Err(ApplyError::Record { image: o.name.clone(), chunk, reason });
                }
                Err(PatchFailure::Io(source)) => {
                    return Err(ApplyError::Io { path: base.path(image).to_path_buf(), source });
                }
            };
            let len = out.len();
            o.write(chunk, out)?;
            o.set_hash(chunk, h);
            o.mark(chunk);
            kinds.patch.add(1);
            kinds.patch.bytes += patch.len() as u64;
            Ok(len as u64)
        }
        RecordRef::Raw { chunk, data, .. } => {
            let o = &mut outs[image];
            o.write(chunk, data)?;
            let n = data.len().div_ceil(CHUNK_SIZE);
            for k in 0..n {
                let h = prepared.next_raw_hash();
                o.set_hash(chunk + k as u64, h);
                o.mark(chunk + k as u64);
            }
            kinds.raw.add(n as u64);
            kinds.raw.bytes += data.len() as u64;
            Ok(data.len() as u64)
        }
    }
}

/// Why the pool could not patch a chunk.
enum PatchFailure {
    /// The patch does not fit the chunk.
    Invalid(String),
    /// The base chunk could not be read.
    Io(io::Error),
}

/// What the pool makes of a blob for the applier, so that the thread that writes only writes:
/// the hashes of its raw records' chunks, and its patched chunks (the base chunk read with
/// `pread`, the patch applied, the result hashed), in record order.
#[derive(Default)]
struct Prepared {
    raw_hashes: Vec<ChunkHash>,
    /// The patched chunks' bytes, one after the other.
    patched: Vec<u8>,
    /// Per patch record: the length of its chunk and its hash, or why it failed.
    patches: Vec<Result<(usize, ChunkHash), PatchFailure>>,
}

impl Prepared {
    fn of(blob: &DecodedBlob, meta: &OverlayMeta, files: &[File]) -> Self {
        let mut p = Prepared::default();
        let mut base_chunk = [0u8; CHUNK_SIZE];
        // Full chunks to hash, all together at the end (blake3 hashes up to 16 at once).
        let mut raw_full: Vec<(usize, &[u8; CHUNK_SIZE])> = Vec::new();
        for r in blob.records() {
            match r {
                RecordRef::Raw { data, .. } => {
                    for c in data.chunks(CHUNK_SIZE) {
                        match <&[u8; CHUNK_SIZE]>::try_from(c) {
                            Ok(full) => {
                                raw_full.push((p.raw_hashes.len(), full));
                                p.raw_hashes.push(ChunkHash::zero());
                            }
                            Err(_) => p.raw_hashes.push(ChunkHash::of(c)),
                        }
                    }
                }
                RecordRef::Patch { image, chunk, patch } => {
                    // Validated: the chunk lies inside the image.
                    let size = meta.images[image as usize].size;
                    let len = (size - chunk * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64) as usize;
                    let b = &mut base_chunk[..len];
                    if let Err(e) = read_padded_at(&files[image as usize], chunk * CHUNK_SIZE as u64, b) {
                        p.patches.push(Err(PatchFailure::Io(e)));
                        continue;
                    }
                    let at = p.patched.len();
                    p.patched.resize(at + len, 0);
                    let out = &mut p.patched[at..];
                    match apply_patch(b, patch, out) {
                        // Hashed below, with the others.
                        Ok(()) => p.patches.push(Ok((len, ChunkHash::zero()))),
                        Err(e) => {
                            p.patched.truncate(at);
                            p.patches.push(Err(PatchFailure::Invalid(e.to_string())));
                        }
                    }
                }
                _ => {}
            }
        }
        for (at, h) in hash_tagged(raw_full) {
            p.raw_hashes[at] = h;
        }
        let mut patched_full: Vec<(usize, &[u8; CHUNK_SIZE])> = Vec::new();
        let mut off = 0;
        for (k, r) in p.patches.iter_mut().enumerate() {
            if let Ok((len, h)) = r {
                let out = &p.patched[off..off + *len];
                off += *len;
                match <&[u8; CHUNK_SIZE]>::try_from(out) {
                    Ok(full) => patched_full.push((k, full)),
                    Err(_) => *h = ChunkHash::of(out),
                }
            }
        }
        for (k, h) in hash_tagged(patched_full) {
            if let Ok((_, slot)) = &mut p.patches[k] {
                *slot = h;
            }
        }
        p
    }

    fn hand_out(self) -> PreparedIter {
        PreparedIter {
            raw_hashes: self.raw_hashes.into_iter(),
            patched: self.patched,
            patches: self.patches.into_iter(),
            at: 0,
        }
    }
}

/// Hands out a [`Prepared`] in record order.
struct PreparedIter {
    raw_hashes: std::vec::IntoIter<ChunkHash>,
    patched: Vec<u8>,
    patches: std::vec::IntoIter<Result<(usize, ChunkHash), PatchFailure>>,
    at: usize,
}

impl PreparedIter {
    /// The hash of the next raw chunk.
    fn next_raw_hash(&mut self) -> ChunkHash {
        self.raw_hashes.next().expect("a hash per raw chunk")
    }

    /// The next patched chunk and its hash.
    fn next_patch(&mut self) -> Result<(&[u8], ChunkHash), PatchFailure> {
        let (len, h) = self.patches.next().expect("a result per patch")?;
        self.at += len;
        Ok((&self.patched[self.at - len..self.at], h))
    }
}

#[cfg(test)]
mod tests {
    use super::{guard, Ahead, ApplyError};

    /// A decoder that panics gives an error naming the frame and the panic, on any thread.
    #[test]
    fn a_panicking_decoder_becomes_an_error() {
        let e = std::thread::spawn(|| guard::<()>(7, 1234, || panic!("index out of bounds: boom")))
            .join()
            .expect("the panic was caught");
        match e {
            Err(e @ ApplyError::DecoderPanic { frame: 7, offset: 1234, .. }) => {
                assert!(e.to_string().contains("boom") && e.is_bad_input(), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let e = guard::<()>(1, 2, || panic!("{}", String::from("owned message"))).unwrap_err();
        assert!(e.to_string().contains("owned message"), "{e}");
        assert_eq!(guard(0, 0, || Ok(5)).unwrap(), 5);
    }

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// The reader waits for room while the applier works, goes on when bytes are given back,
    /// and stops waiting (told to stop) once the applier has stopped.
    #[test]
    fn the_reader_waits_for_room_until_the_applier_stops() {
        let ahead = Ahead::default();
        assert!(ahead.take(100, 150)); // one blob always may, whatever its size
        let got_room = AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let r = ahead.take(100, 150);
                got_room.store(true, Ordering::SeqCst);
                r
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!got_room.load(Ordering::SeqCst), "200 bytes do not fit under 150");
            ahead.give(100);
            assert!(t.join().unwrap());
        });
        std::thread::scope(|s| {
            let t = s.spawn(|| ahead.take(100, 150));
            std::thread::sleep(Duration::from_millis(50));
            drop(ahead.closer());
            assert!(!t.join().unwrap(), "the applier stopped");
        });
        assert!(!ahead.take(1, 150));
    }
}
