//! VM images served through FUSE before they are complete.
//!
//! A [`LazyFs`] mounts a directory holding one regular file per image (a VM's RAM image, its
//! disks). Each image is read in 4 KiB chunks, and each chunk is in one of three states:
//!
//! - **base**: the bytes of the image's base file at the same offset (zeros past its end, or
//!   everywhere when the image has no base);
//! - **pending**: the bytes are on their way. A read that needs such a chunk is parked, not
//!   answered, until [`Image::fill`] brings it (or [`Image::fail`] gives up on it, or
//!   [`LazyOptions::miss_timeout`] passes, which answers `EIO`). The FUSE threads never block:
//!   other reads go on meanwhile;
//! - **local**: the bytes are in the image's private store, a sparse file, because they were
//!   filled or because the guest wrote them. Base files are never written.
//!
//! A hypervisor maps or opens these files like any other: QEMU's `memory-backend-file` with
//! `share=on` resumes from a RAM image on this mount and reads it page by page as the guest
//! touches it; the page cache keeps what was read, so each chunk crosses FUSE once. Every
//! image records which chunks were touched first ([`Image::touched`]) and how long reads
//! waited ([`ImageStats`]), which is what an overlay writer needs to order its chunks by first
//! touch.
//!
//! Mounting needs `/dev/fuse` and the right to mount (root, or `CAP_SYS_ADMIN`): no libfuse and
//! no `fusermount` are used.
//!
//! ```no_run
//! use lazy_image::{ImageSpec, LazyFs, LazyOptions};
//! # fn main() -> Result<(), lazy_image::LazyError> {
//! let fs = LazyFs::mount(
//!     "/run/vm/images".as_ref(),
//!     "/var/lib/vm/store".as_ref(),
//!     vec![ImageSpec {
//!         name: "memory".into(),
//!         size: 256 << 20,
//!         base: Some("/var/lib/bases/b/memory".into()),
//!         pending: vec![0..16],
//!     }],
//!     LazyOptions::default(),
//! )?;
//! // QEMU opens /run/vm/images/memory; chunks 0..16 arrive later:
//! fs.image("memory").unwrap().fill(0, &vec![0u8; 16 * 4096])?;
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

/// The unit the images are served, filled and tracked in.
pub const CHUNK_SIZE: u64 = 4096;

/// The largest image served (the overlay format's bound as well).
pub const MAX_IMAGE_SIZE: u64 = 1 << 52;

/// The most images one mount serves.
pub const MAX_IMAGES: usize = 64;

/// How long the kernel may cache names and attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);

/// Errors of [`LazyFs`] and [`Image`].
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The filesystem could not be mounted.
    #[error("cannot mount the image filesystem at {dir}: {source}")]
    Mount {
        /// The mount point.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be read, created or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An image was described wrongly, or filled outside its size.
    #[error("image '{name}': {reason}")]
    BadImage {
        /// The image.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// One image to serve.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The file's name in the mount: 1 to 255 bytes, no `/`, not `.` or `..`.
    pub name: String,
    /// The image's size in bytes (at most [`MAX_IMAGE_SIZE`]).
    pub size: u64,
    /// The file whose bytes the image has where nothing else was filled or written, at the
    /// same offsets; zeros past its end. `None`: zeros.
    pub base: Option<PathBuf>,
    /// Ranges of chunks whose bytes will come through [`Image::fill`]; reads of them wait.
    pub pending: Vec<Range<u64>>,
}

/// Called with an image's index (its place in the specs given to [`LazyFs::mount`]) and the
/// chunks a parked request waits for: from its first pending chunk to its last one, inclusive
/// (chunks in between may have arrived). It runs on a FUSE thread after the request was
/// parked: it may call [`Image::fill`], and should return soon.
pub type MissHook = Arc<dyn Fn(usize, Range<u64>) + Send + Sync>;

/// How a [`LazyFs`] behaves.
#[derive(Clone)]
pub struct LazyOptions {
    /// How long a request may wait for pending chunks before it is answered `EIO`. A guest
    /// whose memory read fails this way crashes, so this is the last resort that keeps a
    /// hypervisor from waiting forever on a source that went away; callers that watch the
    /// source should give up (pause the VM, [`Image::fail`]) well before it.
    pub miss_timeout: Duration,
    /// Told about every request that has to wait.
    pub on_miss: Option<MissHook>,
    /// The kernel's read-ahead on these files, in bytes (it rounds to pages). A read waits for
    /// every pending chunk it covers, so a smaller read-ahead waits for less.
    pub max_readahead: u32,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions { miss_timeout: Duration::from_secs(60), on_miss: None, max_readahead: 128 << 10 }
    }
}

impl std::fmt::Debug for LazyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyOptions")
            .field("miss_timeout", &self.miss_timeout)
            .field("on_miss", &self.on_miss.is_some())
            .field("max_readahead", &self.max_readahead)
            .finish()
    }
}

/// What an image served, so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Read requests answered with data.
    pub reads: u64,
    /// Bytes they returned.
    pub read_bytes: u64,
    /// Requests that had to wait for pending chunks.
    pub misses: u64,
    /// Their waits, summed.
    pub miss_wait: Duration,
    /// The longest of them.
    pub longest_wait: Duration,
    /// Requests answered `EIO` (failed, timed out or unmounted while waiting).
    pub failed: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes they wrote.
    pub write_bytes: u64,
    /// Chunks brought by [`Image::fill`] while still pending.
    pub filled: u64,
}

const BASE: u8 = 0;
const PENDING: u8 = 1;
const LOCAL: u8 = 2;

/// A request that waits for pending chunks.
enum Op {
    Read { offset: u64, size: u32, reply: ReplyData },
    Write { offset: u64, data: Vec<u8>, reply: ReplyWrite },
}

impl Op {
    /// Answers `EIO`.
    fn refuse(self) {
        match self {
            Op::Read { reply, .. } => reply.error(Errno::EIO),
            Op::Write { reply, .. } => reply.error(Errno::EIO),
        }
    }
}

struct Parked {
    op: Op,
    since: Instant,
}

impl ImageStats {
    /// Counts the wait of a parked request that is being answered.
    fn waited(&mut self, since: Instant) {
        let waited = since.elapsed();
        self.miss_wait += waited;
        self.longest_wait = self.longest_wait.max(waited);
    }
}

struct Inner {
    /// One of [`BASE`], [`PENDING`], [`LOCAL`] per chunk.
    states: Vec<u8>,
    /// How many chunks are [`PENDING`].
    pending: u64,
    /// Why pending chunks will never come, once they will not.
    failed: Option<String>,
    parked: Vec<Parked>,
    /// Bitmap of the chunks read or written so far.
    touched_bits: Vec<u64>,
    /// Those chunks, in the order of their first touch.
    touched: Vec<u64>,
    stats: ImageStats,
}

/// One served image: what fills it and what it tells. Shared with the FUSE threads.
pub struct Image {
    name: String,
    index: usize,
    size: u64,
    base: Option<(File, PathBuf, u64)>,
    store: File,
    store_path: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("name", &self.name).field("size", &self.size).finish_non_exhaustive()
    }
}

fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

impl Image {
    /// The image's name (its file name in the mount).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves states that are still each valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> LazyError {
        let path = path.to_path_buf();
        move |source| LazyError::Io { path, source }
    }

    /// Chunks pending now.
    pub fn pending(&self) -> u64 {
        self.lock().pending
    }

    /// Requests parked now, waiting for pending chunks.
    pub fn waiting(&self) -> usize {
        self.lock().parked.len()
    }

    /// Whether chunk `c` is still pending.
    pub fn is_pending(&self, c: u64) -> bool {
        self.lock().states.get(c as usize) == Some(&PENDING)
    }

    /// What the image served so far.
    pub fn stats(&self) -> ImageStats {
        self.lock().stats.clone()
    }

    /// The chunks read or written so far, in the order of their first touch.
    pub fn touched(&self) -> Vec<u64> {
        self.lock().touched.clone()
    }

    /// Brings the bytes of chunks `chunk..` (whole chunks; the image's last chunk may be
    /// short), and answers the requests that waited only for them. Chunks that are no longer
    /// pending (filled before, or written whole by the guest) keep what they have.
    pub fn fill(&self, chunk: u64, data: &[u8]) -> Result<(), LazyError> {
        let start = chunk.checked_mul(CHUNK_SIZE).filter(|s| *s < self.size);
        let Some(start) = start else {
            return Err(self.bad(format!("fill at chunk {chunk}, past the image's end")));
        };
        let n = (data.len() as u64).div_ceil(CHUNK_SIZE);
        if data.is_empty() || data.len() as u64 != (self.size - start).min(n * CHUNK_SIZE) {
            return Err(self.bad(format!("fill of {} bytes at chunk {chunk}: not whole chunks", data.len())));
        }
        let ready = {
            let mut inner = self.lock();
            let mut k = 0;
            while k < n {
                // A run of pending chunks, written at once.
                if inner.states[(chunk + k) as usize] != PENDING {
                    k += 1;
                    continue;
                }
                let mut e = k;
                while e < n && inner.states[(chunk + e) as usize] == PENDING {
                    e += 1;
                }
                let (from, to) = ((k * CHUNK_SIZE) as usize, ((e * CHUNK_SIZE) as usize).min(data.len()));
                self.store.write_all_at(&data[from..to], start + k * CHUNK_SIZE).map_err(self.io(&self.store_path))?;
                for c in chunk + k..chunk + e {
                    inner.states[c as usize] = LOCAL;
                }
                inner.pending -= e - k;
                inner.stats.filled += e - k;
                k = e;
            }
            self.take_ready(&mut inner)
        };
        self.answer(ready);
        Ok(())
    }

    /// Gives up on the pending chunks: every request waiting for one, and every later one, is
    /// answered `EIO` (a guest that reads such memory crashes). Chunks already here are served
    /// on.
    pub fn fail(&self, reason: &str) {
        let parked = {
            let mut inner = self.lock();
            inner.failed.get_or_insert_with(|| reason.to_string());
            std::mem::take(&mut inner.parked)
        };
        self.refuse(parked);
    }

    /// Answers `EIO` to the requests that have waited longer than `timeout`.
    fn expire(&self, timeout: Duration) {
        let expired = {
            let mut inner = self.lock();
            let (old, young) =
                std::mem::take(&mut inner.parked).into_iter().partition(|p| p.since.elapsed() >= timeout);
            inner.parked = young;
            old
        };
        if !expired.is_empty() {
            tracing::warn!(image = %self.name, requests = expired.len(), ?timeout, "pending chunks did not arrive in time");
        }
        self.refuse(expired);
    }

    fn refuse(&self, parked: Vec<Parked>) {
        if parked.is_empty() {
            return;
        }
        {
            let mut inner = self.lock();
            for p in &parked {
                inner.stats.failed += 1;
                inner.stats.waited(p.since);
            }
        }
        for p in parked {
            p.op.refuse();
        }
    }

    fn bad(&self, reason: String) -> LazyError {
        LazyError::BadImage { name: self.name.clone(), reason }
    }

    /// The chunks a request covers (none for an empty one or one past the end).
    fn chunks(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return 0..0;
        }
        offset / CHUNK_SIZE..(end - 1) / CHUNK_SIZE + 1
    }

    /// Whether `op` must wait for pending chunks: a read for any it covers, a write for those
    /// it covers only in part (a chunk written whole needs nothing that is on its way).
    fn must_wait(&self, inner: &Inner, op: &Op) -> bool {
        match op {
            Op::Read { offset, size, .. } => {
                self.chunks(*offset, u64::from(*size)).any(|c| inner.states[c as usize] == PENDING)
            }
            Op::Write { offset, data, .. } => {
                let (offset, end) = (*offset, offset + data.len() as u64);
                self.chunks(offset, data.len() as u64).any(|c| {
                    let (s, e) = (c * CHUNK_SIZE, ((c + 1) * CHUNK_SIZE).min(self.size));
                    inner.states[c as usize] == PENDING && (offset > s || end < e)
                })
            }
        }
    }

    fn touch(inner: &mut Inner, chunks: Range<u64>) {
        for c in chunks {
            let (w, b) = ((c / 64) as usize, 1u64 << (c % 64));
            if inner.touched_bits[w] & b == 0 {
                inner.touched_bits[w] |= b;
                inner.touched.push(c);
            }
        }
    }

    /// Reads `offset..offset + size` (clamped to the image); none of it is pending.
    fn read_now(&self, inner: &mut Inner, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
        let end = offset.saturating_add(u64::from(size)).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        let chunks = self.chunks(offset, end - offset);
        Self::touch(inner, chunks.clone());
        // Runs of chunks in one state, each read at once.
        let mut c = chunks.start;
        while c < chunks.end {
            let state = inner.states[c as usize];
            let mut e = c + 1;
            while e < chunks.end && inner.states[e as usize] == state {
                e += 1;
            }
            let (s, t) = ((c * CHUNK_SIZE).max(offset), (e * CHUNK_SIZE).min(end));
            let out = &mut buf[(s - offset) as usize..(t - offset) as usize];
            if state == LOCAL {
                self.store.read_exact_at(out, s)?;
            } else {
                self.read_base(out, s)?;
            }
            c = e;
        }
        Ok(buf)
    }

    /// Reads the base's bytes at `at` into `out` (zeros past its end).
    fn read_base(&self, out: &mut [u8], at: u64) -> std::io::Result<()> {
        let Some((file, _, len)) = &self.base else {
            out.fill(0);
            return Ok(());
        };
        let have = len.saturating_sub(at).min(out.len() as u64) as usize;
        file.read_exact_at(&mut out[..have], at)?;
        out[have..].fill(0);
        Ok(())
    }

    /// Writes `data` at `offset` (clamped to the image) into the store; no chunk it covers in
    /// part is pending.
    fn write_now(&self, inner: &mut Inner, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        let end = offset.saturating_add(data.len() as u64).min(self.size);
        if offset >= end {
            return Ok(0);
        }
        let chunks = self.chunks(offset, end - offset);
        Self::touch(inner, chunks.clone());
        // A chunk written in part that still reads from the base gets its base bytes first.
        for c in [chunks.start, chunks.end - 1] {
            let (s, e) = (c * CHUNK_SIZE, ((c + 1) * CHUNK_SIZE).min(self.size));
            if inner.states[c as usize] == BASE && (offset > s || end < e) {
                let mut chunk = vec![0u8; (e - s) as usize];
                self.read_base(&mut chunk, s)?;
                self.store.write_all_at(&chunk, s)?;
                inner.states[c as usize] = LOCAL;
            }
        }
        self.store.write_all_at(&data[..(end - offset) as usize], offset)?;
        for c in chunks {
            if inner.states[c as usize] == PENDING {
                inner.pending -= 1;
            }
            inner.states[c as usize] = LOCAL;
        }
        Ok((end - offset) as usize)
    }

    /// Takes the parked requests that no longer wait.
    fn take_ready(&self, inner: &mut Inner) -> Vec<Parked> {
        let parked = std::mem::take(&mut inner.parked);
        let (ready, waiting): (Vec<_>, Vec<_>) = parked.into_iter().partition(|p| !self.must_wait(inner, &p.op));
        inner.parked = waiting;
        ready
    }

    /// Serves requests that no longer wait, and those that follow from them (a write can
    /// release nothing, but is served in order with the reads).
    fn answer(&self, ready: Vec<Parked>) {
        for p in ready {
            self.lock().stats.waited(p.since);
            self.run(p.op);
        }
    }

    /// Serves a request now, or parks it; returns the chunks it waits for when it was parked.
    fn serve(&self, op: Op) -> Option<Range<u64>> {
        let mut inner = self.lock();
        if self.must_wait(&inner, &op) {
            if inner.failed.is_some() {
                inner.stats.failed += 1;
                drop(inner);
                op.refuse();
                return None;
            }
            let range = match &op {
                Op::Read { offset, size, .. } => self.chunks(*offset, u64::from(*size)),
                Op::Write { offset, data, .. } => self.chunks(*offset, data.len() as u64),
            };
            let first = range.clone().find(|c| inner.states[*c as usize] == PENDING);
            let last = range.rev().find(|c| inner.states[*c as usize] == PENDING);
            inner.stats.misses += 1;
            inner.parked.push(Parked { op, since: Instant::now() });
            return first.zip(last).map(|(f, l)| f..l + 1);
        }
        drop(inner);
        self.run(op);
        None
    }

    /// Serves a request that does not wait.
    fn run(&self, op: Op) {
        let mut inner = self.lock();
        match op {
            Op::Read { offset, size, reply } => match self.read_now(&mut inner, offset, size) {
                Ok(buf) => {
                    inner.stats.reads += 1;
                    inner.stats.read_bytes += buf.len() as u64;
                    drop(inner);
                    reply.data(&buf);
                }
                Err(e) => {
                    drop(inner);
                    tracing::error!(image = %self.name, offset, error = %e, "reading an image failed");
                    reply.error(Errno::EIO);
                }
            },
            Op::Write { offset, data, reply } => match self.write_now(&mut inner, offset, &data) {
                Ok(n) => {
                    inner.stats.writes += 1;
                    inner.stats.write_bytes += n as u64;
                    drop(inner);
                    reply.written(n as u32);
                }
                Err(e) => {
                    drop(inner);
                    tracing::error!(image = %self.name, offset, error = %e, "writing an image failed");
                    reply.error(Errno::EIO);
                }
            },
        }
    }

    /// Writes the image as it reads now into a new plain (sparse) file at `path`. Every chunk
    /// must have arrived.
    pub fn write_out(&self, path: &Path) -> Result<(), LazyError> {
        let inner = self.lock();
        if inner.pending > 0 {
            return Err(self.bad(format!("{} chunks have not arrived: cannot write it out", inner.pending)));
        }
        let out = OpenOptions::new().write(true).create_new(true).open(path).map_err(self.io(path))?;
        out.set_len(self.size).map_err(self.io(path))?;
        const RUN: u64 = 256;
        let mut buf = vec![0u8; (RUN * CHUNK_SIZE) as usize];
        let mut c = 0;
        let n = chunk_count(self.size);
        while c < n {
            let e = (c + RUN).min(n);
            let (s, t) = (c * CHUNK_SIZE, (e * CHUNK_SIZE).min(self.size));
            let piece = &mut buf[..(t - s) as usize];
            for k in c..e {
                let at = ((k - c) * CHUNK_SIZE) as usize;
                let len = (((k + 1) * CHUNK_SIZE).min(self.size) - k * CHUNK_SIZE) as usize;
                let slot = &mut piece[at..at + len];
                if inner.states[k as usize] == LOCAL {
                    self.store.read_exact_at(slot, k * CHUNK_SIZE).map_err(self.io(&self.store_path))?;
                } else {
                    let base = self.base.as_ref().map_or(&self.store_path, |b| &b.1);
                    self.read_base(slot, k * CHUNK_SIZE).map_err(self.io(base))?;
                }
            }
            // Zeros stay holes.
            let mut k = 0;
            while k < piece.len() {
                let len = (piece.len() - k).min(CHUNK_SIZE as usize);
                if piece[k..k + len].iter().any(|b| *b != 0) {
                    out.write_all_at(&piece[k..k + len], s + k as u64).map_err(self.io(path))?;
                }
                k += len;
            }
            c = e;
        }
        out.sync_all().map_err(self.io(path))
    }
}

/// The FUSE side: inode 1 is the directory, inode `2 + i` image `i`.
struct Fs {
    images: Vec<Arc<Image>>,
    uid: u32,
    gid: u32,
    on_miss: Option<MissHook>,
    max_readahead: u32,
}

impl Fs {
    fn image(&self, ino: INodeNo) -> Option<&Arc<Image>> {
        u64::from(ino).checked_sub(2).and_then(|i| self.images.get(i as usize))
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0, 0o700, 2)
        } else {
            (FileType::RegularFile, self.image(ino)?.size, 0o600, 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: CHUNK_SIZE as u32,
        })
    }

    fn missed(&self, image: &Image, waits_for: Option<Range<u64>>) {
        if let (Some(chunks), Some(hook)) = (waits_for, &self.on_miss) {
            hook(image.index, chunks);
        }
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(self.max_readahead) {
            let _ = config.set_max_readahead(nearest);
        }
        // The largest request is also the largest page-cache folio the kernel fills with one
        // read: a fault of a mapping that asks for huge pages (QEMU's RAM) would otherwise
        // read, and wait for, a whole MiB around it.
        if let Err(nearest) = config.set_max_write(self.max_readahead.max(CHUNK_SIZE as u32)) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == INodeNo::ROOT)
            .then(|| self.images.iter().position(|i| i.name.as_bytes() == name.as_bytes()))
            .flatten();
        match found.and_then(|i| self.attr(INodeNo(2 + i as u64))) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Times are ignored; the size, owner and mode are fixed (a truncate to the same size,
        // as a hypervisor may do, is fine).
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if size.is_some_and(|s| s != attr.size) || mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.image(ino) {
            // The page cache outlives an open: what was read once is not asked for again.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::EISDIR),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(image) = self.image(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let first = image.serve(Op::Read { offset, size, reply });
        self.missed(image, first);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(image) = self.image(ino) else {
            return reply.error(Errno::EISDIR);
        };
        if offset.saturating_add(data.len() as u64) > image.size {
            // The images do not grow.
            return reply.error(Errno::EFBIG);
        }
        let first = image.serve(Op::Write { offset, data: data.to_vec(), reply });
        self.missed(image, first);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // The store is a scratch file: it does not outlive the VM, so nothing is forced to
        // disk. What a guest flushes is in the store (the page cache's own) already.
        match self.image(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::EISDIR),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
        ];
        for (i, image) in self.images.iter().enumerate() {
            entries.push((INodeNo(2 + i as u64), FileType::RegularFile, OsStr::new(image.name.as_str())));
        }
        for (k, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted directory of lazily served images. Dropping it gives up on what has not arrived
/// ([`Image::fail`]), detaches the mount (a hypervisor that still maps a file keeps what it has
/// and is answered `EIO` for the rest) and removes the stores.
pub struct LazyFs {
    dir: PathBuf,
    images: Vec<Arc<Image>>,
    session: Option<fuser::BackgroundSession>,
    stop: Arc<AtomicBool>,
    reaper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LazyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFs").field("dir", &self.dir).field("images", &self.images).finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err("names are 1 to 255 bytes, without '/' or NUL, and not '.' or '..'".into());
    }
    Ok(())
}

impl LazyFs {
    /// Mounts `dir` (an existing, empty directory) serving `specs`, with each image's store
    /// (a sparse file of the image's size holding what was filled or written) created in
    /// `store_dir` as `NAME.store`; none may exist yet.
    pub fn mount(dir: &Path, store_dir: &Path, specs: Vec<ImageSpec>, opts: LazyOptions) -> Result<LazyFs, LazyError> {
        if specs.len() > MAX_IMAGES {
            return Err(LazyError::BadImage {
                name: String::new(),
                reason: format!("{} images, at most {MAX_IMAGES}", specs.len()),
            });
        }
        let mut images: Vec<Arc<Image>> = Vec::with_capacity(specs.len());
        // Removes the stores created so far if a later image fails.
        struct Stores(Vec<PathBuf>);
        impl Drop for Stores {
            fn drop(&mut self) {
                for p in &self.0 {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        let mut stores = Stores(Vec::new());
        for (index, spec) in specs.into_iter().enumerate() {
            let bad = |reason: String| LazyError::BadImage { name: spec.name.clone(), reason };
            check_name(&spec.name).map_err(bad)?;
            if images.iter().any(|i| i.name == spec.name) {
                return Err(bad("two images have this name".into()));
            }
            if spec.size > MAX_IMAGE_SIZE {
                return Err(bad(format!("{} bytes, at most {MAX_IMAGE_SIZE}", spec.size)));
            }
            let n = chunk_count(spec.size);
            let mut states = vec![BASE; n as usize];
            let mut pending = 0;
            for r in &spec.pending {
                if r.start > r.end || r.end > n {
                    return Err(bad(format!("pending chunks {r:?} outside its {n} chunks")));
                }
                for c in r.clone() {
                    if states[c as usize] != PENDING {
                        states[c as usize] = PENDING;
                        pending += 1;
                    }
                }
            }
            let base = match spec.base {
                Some(path) => {
                    let file = File::open(&path).map_err(|source| LazyError::Io { path: path.clone(), source })?;
                    let len = file.metadata().map_err(|source| LazyError::Io { path: path.clone(), source })?.len();
                    Some((file, path, len))
                }
                None => None,
            };
            let store_path = store_dir.join(format!("{}.store", spec.name));
            let store = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&store_path)
                .map_err(|source| LazyError::Io { path: store_path.clone(), source })?;
            stores.0.push(store_path.clone());
            store.set_len(spec.size).map_err(|source| LazyError::Io { path: store_path.clone(), source })?;
            images.push(Arc::new(Image {
                name: spec.name,
                index,
                size: spec.size,
                base,
                store,
                store_path,
                inner: Mutex::new(Inner {
                    states,
                    pending,
                    failed: None,
                    parked: Vec::new(),
                    touched_bits: vec![0; n.div_ceil(64) as usize],
                    touched: Vec::new(),
                    stats: ImageStats::default(),
                }),
            }));
        }
        // SAFETY: geteuid and getegid cannot fail and touch no memory of ours.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let fs =
            Fs { images: images.clone(), uid, gid, on_miss: opts.on_miss.clone(), max_readahead: opts.max_readahead };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("cloudlet-lazy".into()),
            fuser::MountOption::Subtype("lazy-image".into()),
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
        ];
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, dir, &config)
            .map_err(|source| LazyError::Mount { dir: dir.to_path_buf(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let reaper = {
            let (images, stop, timeout) = (images.clone(), stop.clone(), opts.miss_timeout);
            std::thread::Builder::new()
                .name("lazy-image-reaper".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for i in &images {
                            i.expire(timeout);
                        }
                        std::thread::park_timeout(Duration::from_millis(50));
                    }
                })
                .map_err(|source| LazyError::Io { path: dir.to_path_buf(), source })?
        };
        std::mem::forget(stores);
        Ok(LazyFs { dir: dir.to_path_buf(), images, session: Some(session), stop, reaper: Some(reaper) })
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image called `name`.
    pub fn image(&self, name: &str) -> Option<&Arc<Image>> {
        self.images.iter().find(|i| i.name == name)
    }

    /// The images, in the order they were given.
    pub fn images(&self) -> &[Arc<Image>] {
        &self.images
    }

    /// The path of image `name` in the mount.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.image(name).map(|i| self.dir.join(&i.name))
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reaper.take() {
            r.thread().unpark();
            let _ = r.join();
        }
        for i in &self.images {
            i.fail("the image filesystem was unmounted");
        }
        // Detached, not unmounted: a hypervisor that still maps an image keeps it mapped, and
        // the session ends when the last user is gone.
        if let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        drop(self.session.take());
        for i in &self.images {
            let _ = std::fs::remove_file(&i.store_path);
        }
    }
}

/// Detaches the mounts of this crate (file system name `cloudlet-lazy`) under `dir` that no
/// process serves any more: those a killed server left behind, whose reads fail with
/// `ENOTCONN` and whose directories cannot be removed while they are mounted. Returns the
/// mount points detached. Mounts still served are left alone.
pub fn detach_stale(dir: &Path) -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return Vec::new() };
    let mut out = Vec::new();
    for line in mounts.lines() {
        let mut f = line.split(' ');
        let (Some(fsname), Some(point)) = (f.next(), f.next()) else { continue };
        // Mount points are octal-escaped in /proc/self/mounts (a space is \040).
        let point = PathBuf::from(point.replace("\\040", " "));
        if fsname != "cloudlet-lazy" || !point.starts_with(dir) {
            continue;
        }
        // A served mount answers; one whose server is gone says ENOTCONN.
        let stale = matches!(std::fs::metadata(&point), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
        if !stale {
            continue;
        }
        let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else { continue };
        // SAFETY: umount2 with a valid NUL-terminated path and a flag has no memory effects.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            out.push(point);
        }
    }
    out
}
