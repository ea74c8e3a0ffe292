//! Early start: the custom VM resumes before its overlay has arrived.
//!
//! The overlay must be segmented (format 1.3, [`overlay_format::segment`]). Its head
//! (metadata, device state, index) and its trailer are read first; then the VM's RAM and
//! disks are served as files of a FUSE mount ([`lazy_image`]) built from the base, with every
//! chunk the overlay writes pending. A fetcher reads segments by byte range, in stream order
//! (the order the VM first touched them when the overlay was made), checks each against the
//! index, and fills the chunks it rebuilds; a read of a chunk that has not arrived waits, and
//! moves the segment that has it to the front. The VM resumes once the segments holding the
//! recorded working set are here ([`overlay_format::SegmentIndex::prefetch`]). When every
//! segment is in, the rebuilt images' digests are checked against the trailer.
//!
//! A source that goes away, stalls or sends bad bytes ends the fetcher with an error: the
//! waiting reads are answered with an I/O error, [`EarlyVm::wait_complete`] (and the probe)
//! report it, and dropping the [`EarlyVm`] stops QEMU and removes the mount.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lazy_image::{Image, ImageSpec, LazyFs, LazyOptions};
use overlay_format::segment::{read_segment, ChunkMap, Head};
use overlay_format::{apply_patch, ChunkHash, ImageDigester, OverlayReader, RecordRef, Trailer, CHUNK_SIZE};
use vm_driver::{Disk, DiskFormat, Forward, Hypervisor, RamMode, RestoreOptions, Snapshot, Vm};

use crate::base::RegisteredBase;
use crate::flows::{check_spec, custom_snapshot, restore_forwarding};
use crate::http::{http_wait, HttpCheck};
use base_registry::Registry;

use crate::{Event, FlowError};

const CS: u64 = CHUNK_SIZE as u64;

/// Where a segmented overlay's bytes come from: any byte range, in any order.
pub trait OverlaySource: Send + Sync {
    /// The overlay's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// `len` bytes from `offset` on (all of them, or an error).
    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// What to call the source in messages (a path, a URL).
    fn describe(&self) -> String;
}

/// A segmented overlay in a local file.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
}

impl FileSource {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self, FlowError> {
        let file = File::open(path).map_err(|source| FlowError::Io { path: path.to_owned(), source })?;
        Ok(FileSource { file, path: path.to_owned() })
    }
}

impl OverlaySource for FileSource {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Reads `len` bytes at `offset` of `source`, giving up after `stall`: the read goes on in a
/// thread of its own, which is left to end when it may.
fn read_bounded(source: &Arc<dyn OverlaySource>, offset: u64, len: u64, stall: Duration) -> io::Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let s = Arc::clone(source);
    std::thread::Builder::new().name("overlay-head".into()).spawn(move || {
        let _ = tx.send(s.read_at(offset, len));
    })?;
    match rx.recv_timeout(stall) {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "stalled: no answer to a read of bytes {offset}..{} for {:.0} s",
                offset + len,
                stall.as_secs_f64()
            ),
        )),
    }
}

/// Reads a source from its start, in pieces, for the head.
struct HeadReader<'a> {
    source: &'a Arc<dyn OverlaySource>,
    stall: Duration,
    len: u64,
    at: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for HeadReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            let n = (self.len - self.at).min(256 << 10);
            if n == 0 {
                return Ok(0);
            }
            self.buf = read_bounded(self.source, self.at, n, self.stall)?;
            self.at += n;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// How [`synthesize_early`] runs.
#[derive(Debug, Clone)]
pub struct EarlyOptions {
    /// Directory of the VM's files: the mount, the stores of what arrives and what the guest
    /// writes, the device state (must not exist; removed with the [`EarlyVm`]).
    pub out_dir: PathBuf,
    /// Wait for the app's answer before returning.
    pub probe: Option<HttpCheck>,
    /// Address the forwarded host ports listen on.
    pub forward_address: String,
    /// How long one read of the source may take before the source counts as stalled.
    pub stall_timeout: Duration,
    /// Resume only once the index's prefetched segments are here (the working set recorded
    /// when the overlay was made). Without it the VM resumes as soon as the head is here.
    pub prefetch: bool,
    /// With `prefetch`: resume once the rest of the working set should arrive within this
    /// long, at the rate seen so far, rather than after its last byte. The VM resumes and
    /// starts computing while the end of its working set streams in, in the order it touched
    /// it; what it reaches first is fetched first. Zero waits for every byte.
    pub resume_lead: Duration,
}

impl EarlyOptions {
    /// Defaults: no probe, forwards on 127.0.0.1, a 30 s stall timeout, prefetch on, resuming
    /// a second before the working set is expected to be complete.
    pub fn new(out_dir: &Path) -> Self {
        EarlyOptions {
            out_dir: out_dir.to_owned(),
            probe: None,
            forward_address: "127.0.0.1".into(),
            stall_timeout: Duration::from_secs(30),
            prefetch: true,
            resume_lead: Duration::from_secs(1),
        }
    }
}

/// How an early start went.
#[derive(Debug, Clone, Default)]
pub struct EarlyTimeline {
    /// Until the head and the trailer were read and checked.
    pub head: Duration,
    /// Until the prefetched segments were here.
    pub prefetch: Duration,
    /// Starting QEMU and loading the device state.
    pub resume: Duration,
    /// From the start until the first answer on the probed port.
    pub first_answer: Option<Duration>,
    /// Overlay bytes fetched before the first answer.
    pub bytes_before_answer: u64,
}

/// What the fetcher did so far.
#[derive(Debug, Clone, Default)]
pub struct FetchStats {
    /// Segments here.
    pub segments_done: u64,
    /// Segments in all.
    pub segments: u64,
    /// Overlay bytes fetched (head and trailer included).
    pub bytes: u64,
    /// The overlay's length.
    pub total_bytes: u64,
    /// Segments fetched ahead of their turn because the VM waited for them.
    pub demanded: u64,
    /// Every segment is here and the images' digests matched.
    pub complete: bool,
    /// Why fetching stopped, if it failed.
    pub error: Option<String>,
}

struct State {
    done: Vec<bool>,
    /// Being read by one of the fetchers.
    inflight: Vec<bool>,
    demand: VecDeque<usize>,
    stats: FetchStats,
    cancel: bool,
    /// Demanded reads under way.
    demanding: usize,
    /// Per fetcher (the stream's first), the read under way: since when, and its bytes.
    reading: Vec<Option<(Instant, u64, u64)>>,
    /// The working set is here (the VM resumes, or runs): stream-order reads get shorter, so
    /// that the link is soon free for what the VM waits for.
    resumed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What serves a VM resumed before its overlay had arrived: the mount of its memory and disks
/// and the fetchers that fill them. Dropping it stops the fetchers, answers what waits with an
/// I/O error, removes the mount and the VM's directory: drop it after the VM is stopped.
pub struct Serving {
    shared: Arc<Shared>,
    fs: Option<LazyFs>,
    /// Detached on drop: they notice the cancel after their current read.
    #[allow(dead_code)]
    fetchers: Vec<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Serving {
    /// What was fetched so far.
    pub fn stats(&self) -> FetchStats {
        self.shared.lock().stats.clone()
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Answers every wait, now and later, with an I/O error.
    fn fail(&self, why: &str) {
        if let Some(fs) = &self.fs {
            for img in fs.images() {
                img.fail(why);
            }
        }
    }

    fn cancel(&self) {
        let mut st = self.shared.lock();
        st.cancel = true;
        self.shared.changed.notify_all();
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.cancel();
        self.fail("the VM is being stopped");
        // The fetchers notice the cancel after their current read (bounded by the stall
        // timeout); they are not waited for.
        self.fetchers.clear();
        drop(self.fs.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A VM resumed before its overlay had arrived. Dropping it stops the VM, then the fetchers,
/// then removes the mount and the VM's directory.
pub struct EarlyVm<V: Vm> {
    /// The running VM (`None` once taken apart).
    vm: Option<V>,
    serving: Option<Serving>,
    /// The base it was rebuilt from.
    pub base: RegisteredBase,
    /// The overlay's metadata.
    pub meta: overlay_format::OverlayMeta,
    /// Forwarded ports: (guest, host).
    pub ports: Vec<(u16, u16)>,
    /// The app's first answer, if probed.
    pub answer: Option<String>,
    /// How it went.
    pub timeline: EarlyTimeline,
}

impl<V: Vm> EarlyVm<V> {
    /// The VM.
    pub fn vm(&mut self) -> &mut V {
        self.vm.as_mut().expect("the VM lives as long as the EarlyVm")
    }

    fn serving(&self) -> &Serving {
        self.serving.as_ref().expect("the mount lives as long as the EarlyVm")
    }

    /// What was fetched so far.
    pub fn stats(&self) -> FetchStats {
        self.serving().stats()
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        self.serving().dir()
    }

    /// The VM and what serves it, apart: a caller that keeps the VM in a table of its own
    /// stops the VM, then drops the [`Serving`].
    pub fn into_parts(mut self) -> (V, Serving) {
        let vm = self.vm.take().expect("the VM lives as long as the EarlyVm");
        let serving = self.serving.take().expect("the mount lives as long as the EarlyVm");
        (vm, serving)
    }

    /// Waits until every segment is here and the images are checked, or fetching failed (then
    /// the VM is paused and the error returned), at most `timeout`.
    pub fn wait_complete(&mut self, timeout: Duration) -> Result<FetchStats, FlowError> {
        let deadline = Instant::now() + timeout;
        let shared = Arc::clone(&self.serving().shared);
        let stats = {
            let mut st = shared.lock();
            while !st.stats.complete && st.stats.error.is_none() {
                let now = Instant::now();
                if now >= deadline {
                    return Err(FlowError::EarlyStart {
                        reason: format!(
                            "the overlay had not all arrived within {:.0} s: {} of {} segments",
                            timeout.as_secs_f64(),
                            st.stats.segments_done,
                            st.stats.segments
                        ),
                    });
                }
                st = shared.changed.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            }
            st.stats.clone()
        };
        if let Some(reason) = stats.error.clone() {
            self.stop_on_error();
            return Err(FlowError::EarlyStart { reason });
        }
        Ok(stats)
    }

    /// Writes the images as rebuilt and run so far (the VM's own writes included) as plain
    /// files into `dir`, one per image, named as in the overlay. Every segment must be here.
    pub fn write_out(&self, dir: &Path) -> Result<(), FlowError> {
        let fs = self.serving().fs.as_ref().expect("the mount lives as long as the EarlyVm");
        for img in fs.images() {
            img.write_out(&dir.join(img.name()))?;
        }
        Ok(())
    }

    /// After a failed fetch: the waits are answered with an I/O error and the VM is paused
    /// (best effort: a vCPU that was waiting for a page may have met the error first).
    fn stop_on_error(&mut self) {
        if let Some(s) = &self.serving {
            s.fail("the overlay stopped arriving");
        }
        if let Some(vm) = self.vm.as_mut() {
            let _ = vm.pause();
        }
    }
}

impl<V: Vm> Drop for EarlyVm<V> {
    fn drop(&mut self) {
        if let Some(s) = &self.serving {
            s.cancel();
            s.fail("the VM is being stopped");
        }
        drop(self.vm.take());
        drop(self.serving.take());
    }
}

/// Everything the fetchers need.
struct Fetcher {
    source: Arc<dyn OverlaySource>,
    head: Arc<Head>,
    trailer: Trailer,
    offsets: Vec<u64>,
    images: Vec<Arc<Image>>,
    base_files: Vec<File>,
    /// Per image, the hash of every chunk as rebuilt: the base's, replaced as chunks arrive.
    hashes: Mutex<Vec<Vec<ChunkHash>>>,
    shared: Arc<Shared>,
    /// Segments fetched before the VM resumes: no read before then goes past them.
    prefetch: usize,
    /// When fetching began (for the log).
    started: Instant,
}

/// Largest read in stream order before the VM runs.
const BATCH: u64 = 1 << 20;
/// Largest read in stream order once the VM runs: a demand shares the link with at most one
/// of these.
const RUNNING_BATCH: u64 = 256 << 10;
/// Largest read for a demanded segment and those after it.
const DEMAND_BATCH: u64 = 128 << 10;

/// The fetchers: [`STREAM_FETCHERS`] read the segments in stream order, [`DEMAND_FETCHERS`]
/// others those the VM waits for, each on a connection of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Stream,
    Demand,
}

/// Fetchers of demanded segments: a read of the VM often waits for several segments at once,
/// and over a link with delay each fetch waits a round trip before its bytes come.
const DEMAND_FETCHERS: usize = 3;

/// Fetchers in stream order: with two, the next read is asked for while the last one's bytes
/// still arrive, so a link with delay does not idle a round trip between reads. The first of
/// them checks the digests at the end.
const STREAM_FETCHERS: usize = 2;

/// Why a fetcher stopped without an error of its own.
const STOPPED: &str = "stopped";

impl Fetcher {
    fn run(self: Arc<Self>, lane: Lane, slot: usize) {
        let result = self.fetch(lane, slot);
        let mut st = self.shared.lock();
        match result {
            Ok(()) => {
                if lane == Lane::Stream && slot == 0 {
                    st.stats.complete = true;
                }
            }
            Err(reason) if reason == STOPPED => {}
            Err(reason) => {
                tracing::error!(%reason, "early start: fetching the overlay failed");
                st.stats.error.get_or_insert(reason);
                drop(st);
                for img in &self.images {
                    img.fail("the overlay stopped arriving");
                }
                st = self.shared.lock();
            }
        }
        self.shared.changed.notify_all();
        drop(st);
    }

    /// The next segments for `lane` to read: a demanded one and those after it, or the first
    /// ones in stream order that are neither here nor being read. `None` when there are none
    /// left (for the demand lane: when all are here).
    fn next_batch(&self, lane: Lane) -> Result<Option<Vec<usize>>, String> {
        let mut st = self.shared.lock();
        let n = st.done.len();
        let (start, limit) = loop {
            if st.cancel || st.stats.error.is_some() {
                return Err(STOPPED.into());
            }
            match lane {
                Lane::Demand => {
                    let mut found = None;
                    while let Some(k) = st.demand.pop_front() {
                        if !st.done[k] && !st.inflight[k] {
                            found = Some(k);
                            break;
                        }
                    }
                    if let Some(k) = found {
                        st.stats.demanded += 1;
                        st.demanding += 1;
                        break (k, DEMAND_BATCH);
                    }
                    if st.done.iter().all(|d| *d) {
                        return Ok(None);
                    }
                    st = self
                        .shared
                        .changed
                        .wait_timeout(st, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Lane::Stream => {
                    // What the VM waits for has the link to itself, once its working set is in:
                    // until then the stream brings what it touches next, in the order it did.
                    let working_set_left = (0..self.prefetch).any(|k| !st.done[k] && !st.inflight[k]);
                    if !working_set_left
                        && (st.demanding > 0 || st.demand.iter().any(|&k| !st.done[k] && !st.inflight[k]))
                    {
                        st = self
                            .shared
                            .changed
                            .wait_timeout(st, Duration::from_millis(100))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        continue;
                    }
                    match (0..n).find(|&k| !st.done[k] && !st.inflight[k]) {
                        Some(k) => break (k, if st.resumed || k >= self.prefetch { RUNNING_BATCH } else { BATCH }),
                        None => return Ok(None),
                    }
                }
            }
        };
        let mut batch = vec![start];
        let mut bytes = self.head.index.segments[start].frame_len();
        let mut k = start + 1;
        let end = if !st.resumed && start < self.prefetch { self.prefetch } else { n };
        while k < end && !st.done[k] && !st.inflight[k] && bytes + self.head.index.segments[k].frame_len() <= limit {
            bytes += self.head.index.segments[k].frame_len();
            batch.push(k);
            k += 1;
        }
        for &k in &batch {
            st.inflight[k] = true;
        }
        Ok(Some(batch))
    }

    fn fetch(&self, lane: Lane, slot: usize) -> Result<(), String> {
        while let Some(batch) = self.next_batch(lane)? {
            let (first, last) = (batch[0], *batch.last().expect("not empty"));
            let (from, to) = (self.offsets[first], self.offsets[last + 1]);
            let bytes = self.read_watched(slot, from, to - from);
            if lane == Lane::Demand {
                self.shared.lock().demanding -= 1;
                self.shared.changed.notify_all();
            }
            let bytes = bytes?;
            tracing::debug!(
                ?lane,
                segments = ?(first..last + 1),
                bytes = to - from,
                at_ms = self.started.elapsed().as_millis() as u64,
                "early start: segments arrived"
            );
            for k in batch {
                let frame = &bytes[(self.offsets[k] - from) as usize..(self.offsets[k + 1] - from) as usize];
                let blob = read_segment(frame, &self.head.index, k, &self.head.meta)
                    .map_err(|e| format!("segment {k} of {}: {e}", self.source.describe()))?;
                self.apply(&blob).map_err(|e| format!("applying segment {k}: {e}"))?;
                let mut st = self.shared.lock();
                st.done[k] = true;
                st.inflight[k] = false;
                st.stats.segments_done += 1;
                st.stats.bytes += self.offsets[k + 1] - self.offsets[k];
                self.shared.changed.notify_all();
            }
        }
        if lane == Lane::Demand || slot != 0 {
            return Ok(());
        }
        // The last segments may still be on their way through the other fetchers.
        let mut st = self.shared.lock();
        while !st.done.iter().all(|d| *d) {
            if st.cancel || st.stats.error.is_some() {
                return Err(STOPPED.into());
            }
            st = self.shared.changed.wait_timeout(st, Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(st);
        self.verify()
    }

    /// Reads with the read recorded for the watchdog.
    fn read_watched(&self, slot: usize, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        self.shared.lock().reading[slot] = Some((Instant::now(), offset, len));
        let r = self.read(offset, len);
        self.shared.lock().reading[slot] = None;
        r
    }

    /// Fails the fetch when a read has taken longer than `stall`: a source that stopped
    /// answering (whose reads may never return) must not keep the VM waiting.
    fn watchdog(&self, stall: Duration) {
        let mut st = self.shared.lock();
        loop {
            if st.cancel || st.stats.complete || st.stats.error.is_some() {
                return;
            }
            let stalled = st.reading.iter().flatten().find(|(since, ..)| since.elapsed() > stall).copied();
            if let Some((since, offset, len)) = stalled {
                let reason = format!(
                    "{} stalled: no answer to a read of bytes {offset}..{} for {:.0} s",
                    self.source.describe(),
                    offset + len,
                    since.elapsed().as_secs_f64()
                );
                tracing::error!(%reason, "early start: fetching the overlay failed");
                st.stats.error = Some(reason);
                self.shared.changed.notify_all();
                drop(st);
                for img in &self.images {
                    img.fail("the overlay stopped arriving");
                }
                return;
            }
            st = self.shared.changed.wait_timeout(st, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        // One more try after a failure: a dropped connection is not yet a lost source.
        match self.source.read_at(offset, len) {
            Ok(b) => Ok(b),
            Err(first) => {
                if self.shared.lock().cancel {
                    return Err("stopped".into());
                }
                tracing::warn!(error = %first, offset, len, "reading the overlay failed; trying once more");
                self.source
                    .read_at(offset, len)
                    .map_err(|e| format!("reading bytes {offset}..{} of {}: {e}", offset + len, self.source.describe()))
            }
        }
    }

    /// Bytes of base image `i` from chunk `c` on, `len` of them, zeros past its end.
    fn base_bytes(&self, i: usize, c: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let f = &self.base_files[i];
        let mut done = 0;
        while done < len {
            let n = f.read_at(&mut buf[done..], c * CS + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(buf)
    }

    fn chunk_len(&self, i: usize, c: u64) -> usize {
        (self.head.meta.images[i].size - c * CS).min(CS) as usize
    }

    /// The rebuilt bytes of chunk `c` of `image`, which record `r` of `blob` writes.
    fn chunk_of(
        &self,
        blob: &overlay_format::DecodedBlob,
        r: RecordRef<'_>,
        image: usize,
        c: u64,
    ) -> io::Result<Vec<u8>> {
        let len = self.chunk_len(image, c);
        let k = c - r.chunk();
        Ok(match r {
            RecordRef::Zero { .. } => vec![0; len],
            RecordRef::CopyBase { src, .. } => self.base_bytes(src.image as usize, src.chunk + k, len)?,
            RecordRef::Raw { data, .. } => data[(k * CS) as usize..(k * CS) as usize + len].to_vec(),
            RecordRef::Patch { patch, .. } => {
                let old = self.base_bytes(image, c, len)?;
                let mut out = vec![0u8; len];
                apply_patch(&old, patch, &mut out).map_err(|e| io::Error::other(e.to_string()))?;
                out
            }
            RecordRef::CopySelf { src, .. } => {
                // From an earlier record of the same segment (the reader checked it is there).
                let q = blob
                    .records()
                    .find(|q| {
                        q.image() == src.image && q.chunk() <= src.chunk && src.chunk < q.chunk() + q.chunk_count()
                    })
                    .ok_or_else(|| io::Error::other("a copy from outside its segment"))?;
                self.chunk_of(blob, q, src.image as usize, src.chunk)?
            }
        })
    }

    fn apply(&self, blob: &overlay_format::DecodedBlob) -> io::Result<()> {
        for r in blob.records() {
            let i = r.image() as usize;
            let (start, count) = (r.chunk(), r.chunk_count());
            // Long runs in pieces of 256 chunks.
            let mut c = start;
            while c < start + count {
                let e = (c + 256).min(start + count);
                let piece = match r {
                    RecordRef::Raw { data, .. } => {
                        let from = ((c - start) * CS) as usize;
                        let to = (((e - start) * CS) as usize).min(data.len());
                        data[from..to].to_vec()
                    }
                    RecordRef::CopyBase { src, .. } => {
                        let len = ((e - c) * CS).min(self.head.meta.images[i].size - c * CS) as usize;
                        self.base_bytes(src.image as usize, src.chunk + (c - start), len)?
                    }
                    RecordRef::Zero { .. } => {
                        vec![0u8; ((e - c) * CS).min(self.head.meta.images[i].size - c * CS) as usize]
                    }
                    _ => self.chunk_of(blob, r, i, c)?,
                };
                let hashes: Vec<ChunkHash> = piece.chunks(CHUNK_SIZE).map(ChunkHash::of).collect();
                {
                    let mut all = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
                    all[i][c as usize..c as usize + hashes.len()].copy_from_slice(&hashes);
                }
                self.images[i].fill(c, &piece).map_err(|e| io::Error::other(e.to_string()))?;
                c = e;
            }
        }
        Ok(())
    }

    fn verify(&self) -> Result<(), String> {
        let all = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        for (i, hashes) in all.iter().enumerate() {
            let mut d = ImageDigester::new();
            for h in hashes {
                d.push(*h);
            }
            if d.finish() != self.trailer.image_digests[i] {
                return Err(format!(
                    "image '{}' as rebuilt does not match the overlay's digest",
                    self.head.meta.images[i].name
                ));
            }
        }
        Ok(())
    }
}

/// The hash of every chunk of an image of `size` bytes over base image `i`, as the base has
/// them: from the base's index where the chunk is whole in the base, else read.
fn base_hashes(base: &delta_engine::Base, file: &File, i: usize, size: u64) -> io::Result<Vec<ChunkHash>> {
    let img = &base.index().images()[i];
    let n = size.div_ceil(CS);
    let mut out = Vec::with_capacity(n as usize);
    for c in 0..n {
        let len = (size - c * CS).min(CS);
        if len == CS && (c + 1) * CS <= img.size {
            out.push(img.hashes[c as usize]);
        } else {
            let mut buf = vec![0u8; len as usize];
            let got = file.read_at(&mut buf, c * CS).or_else(|e| if c * CS >= img.size { Ok(0) } else { Err(e) })?;
            let got = got.min(buf.len());
            buf[got..].fill(0);
            out.push(ChunkHash::of(&buf));
        }
    }
    Ok(out)
}

fn source_err(source: &dyn OverlaySource, what: &str, e: impl std::fmt::Display) -> FlowError {
    FlowError::EarlyStart { reason: format!("{}: {what}: {e}", source.describe()) }
}

/// Resumes the custom VM of the segmented overlay that `source` serves, over the registered
/// base it names, before the overlay has arrived: see the module's documentation.
pub fn synthesize_early<H: Hypervisor>(
    hypervisor: &H,
    registry: &Registry,
    source: Arc<dyn OverlaySource>,
    opts: &EarlyOptions,
    events: &(dyn Fn(Event) + Sync),
) -> Result<EarlyVm<H::Vm>, FlowError> {
    let t0 = Instant::now();
    let out_dir = opts.out_dir.as_path();
    if out_dir.exists() {
        return Err(FlowError::Exists { path: out_dir.to_owned() });
    }
    events(Event::Step(format!("reading the overlay's head from {}", source.describe())));
    let len = source.size().map_err(|e| source_err(&*source, "its length", e))?;
    let stall = opts.stall_timeout;
    let reader = OverlayReader::new(HeadReader { source: &source, stall, len, at: 0, buf: Vec::new(), pos: 0 })?;
    crate::flows::check_forwards(&reader.meta().forwards, opts.probe.as_ref().map(|c| c.port))?;
    let head = reader.into_head()?;
    let (at, max) = head.trailer_range();
    if at >= len || len - at > max {
        return Err(FlowError::EarlyStart {
            reason: format!(
                "{} is {len} bytes, but its index puts the trailer at byte {at} (at most {max} bytes long)",
                source.describe()
            ),
        });
    }
    let tail =
        read_bounded(&source, at, len - at, stall).map_err(|e| source_err(&*source, "reading its trailer", e))?;
    let trailer = head.check_trailer(&tail)?;
    let base_id = head.meta.base_id;
    let base = match registry.get(&base_id) {
        Ok(e) => RegisteredBase::from_entry(e)?,
        Err(base_registry::RegistryError::NotFound { .. }) => return Err(FlowError::UnknownBase { id: base_id }),
        Err(e) => return Err(e.into()),
    };
    check_spec(&head.meta.spec, &base.entry.manifest.spec)?;
    let engine_base = base.engine_base()?;
    let snap = &base.snapshot;
    let names: Vec<&str> = engine_base.index().images().iter().map(|i| i.name.as_str()).collect();
    let ours: Vec<&str> = head.meta.images.iter().map(|i| i.name.as_str()).collect();
    if names != ours {
        return Err(FlowError::BadOverlay { field: "images", overlay: ours.join(", "), base: names.join(", ") });
    }
    for (i, img) in head.meta.images.iter().enumerate() {
        let have = engine_base.size(i);
        if img.base_size != have
            || (img.kind == overlay_format::ImageKind::Memory && img.size != have)
            || img.size > have.saturating_add(delta_engine::DEFAULT_MAX_DISK_GROWTH)
        {
            return Err(FlowError::BadOverlay {
                field: "image size",
                overlay: format!("'{}' of {} bytes over {} bytes", img.name, img.size, img.base_size),
                base: format!("{have} bytes"),
            });
        }
    }
    let head_time = t0.elapsed();

    crate::flows::create_dir_new(out_dir)?;
    let mut guard = crate::flows::Guard::new(out_dir);
    let out_dir =
        &std::fs::canonicalize(out_dir).map_err(|source| FlowError::Io { path: out_dir.to_owned(), source })?;
    let (mnt, store) = (out_dir.join("images"), out_dir.join("store"));
    for d in [&mnt, &store] {
        std::fs::create_dir(d).map_err(|source| FlowError::Io { path: d.clone(), source })?;
    }

    // Every chunk a segment writes is pending.
    let mut pending: Vec<Vec<std::ops::Range<u64>>> = vec![Vec::new(); head.meta.images.len()];
    for s in &head.index.segments {
        for r in &s.runs {
            pending[r.image as usize].push(r.chunks());
        }
    }
    let specs: Vec<ImageSpec> = head
        .meta
        .images
        .iter()
        .enumerate()
        .map(|(i, img)| ImageSpec {
            name: img.name.clone(),
            size: img.size,
            base: Some(engine_base.path(i).to_owned()),
            pending: std::mem::take(&mut pending[i]),
        })
        .collect();
    let n = head.index.segments.len();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            done: vec![false; n],
            inflight: vec![false; n],
            demanding: 0,
            reading: vec![None; STREAM_FETCHERS + DEMAND_FETCHERS],
            resumed: false,
            demand: VecDeque::new(),
            stats: FetchStats {
                segments: n as u64,
                bytes: head.len + (len - at),
                total_bytes: len,
                ..Default::default()
            },
            cancel: false,
        }),
        changed: Condvar::new(),
    });
    let map: Arc<ChunkMap> = Arc::new(head.index.chunk_map());
    let on_miss = {
        let (shared, map) = (Arc::clone(&shared), Arc::clone(&map));
        Arc::new(move |image: usize, chunks: std::ops::Range<u64>| {
            let segments = map.segments(image as u8, chunks.clone());
            tracing::debug!(
                image,
                ?chunks,
                ?segments,
                at_ms = t0.elapsed().as_millis() as u64,
                "early start: the VM waits"
            );
            let mut st = shared.lock();
            for k in segments.into_iter().rev() {
                if !st.done[k] && st.demand.front() != Some(&k) {
                    st.demand.push_front(k);
                }
            }
            shared.changed.notify_all();
        })
    };
    let lazy = LazyOptions {
        // The fetcher gives up on a stalled source well before this.
        miss_timeout: opts.stall_timeout * 3,
        on_miss: Some(on_miss),
        ..LazyOptions::default()
    };
    let fs = LazyFs::mount(&mnt, &store, specs, lazy)?;
    let mut hashes = Vec::with_capacity(head.meta.images.len());
    let mut base_files = Vec::with_capacity(head.meta.images.len());
    for (i, img) in head.meta.images.iter().enumerate() {
        let path = engine_base.path(i);
        let file = File::open(path).map_err(|source| FlowError::Io { path: path.to_owned(), source })?;
        hashes.push(
            base_hashes(&engine_base, &file, i, img.size)
                .map_err(|source| FlowError::Io { path: path.to_owned(), source })?,
        );
        base_files.push(file);
    }
    let head = Arc::new(head);
    let fetcher = Arc::new(Fetcher {
        source: Arc::clone(&source),
        head: Arc::clone(&head),
        trailer,
        offsets: head.index.offsets(head.len),
        images: fs.images().to_vec(),
        base_files,
        hashes: Mutex::new(hashes),
        shared: Arc::clone(&shared),
        prefetch: if opts.prefetch { head.index.prefetch as usize } else { 0 },
        started: t0,
    });
    let mut fetchers = Vec::new();
    let stream = (0..STREAM_FETCHERS).map(|slot| (Some((Lane::Stream, slot)), format!("overlay-stream-{slot}")));
    let demand = (STREAM_FETCHERS..STREAM_FETCHERS + DEMAND_FETCHERS)
        .map(|slot| (Some((Lane::Demand, slot)), format!("overlay-demand-{slot}")));
    for (lane, name) in stream.chain(demand).chain([(None, "overlay-watch".to_string())]) {
        let f = Arc::clone(&fetcher);
        let stall = opts.stall_timeout;
        let spawned = std::thread::Builder::new().name(name).spawn(move || match lane {
            Some((lane, slot)) => f.run(lane, slot),
            None => f.watchdog(stall),
        });
        match spawned {
            Ok(h) => fetchers.push(h),
            Err(source) => {
                shared.lock().cancel = true;
                shared.changed.notify_all();
                return Err(FlowError::Io { path: out_dir.clone(), source });
            }
        }
    }

    let mut early = EarlyVm {
        vm: None,
        serving: Some(Serving { shared: Arc::clone(&shared), fs: Some(fs), fetchers, dir: out_dir.clone() }),
        base: base.clone(),
        meta: head.meta.clone(),
        ports: Vec::new(),
        answer: None,
        timeline: EarlyTimeline { head: head_time, ..Default::default() },
    };
    guard.disarm(); // the EarlyVm removes the directory from here on

    // The working set first.
    let prefetch = if opts.prefetch { head.index.prefetch as usize } else { 0 };
    if prefetch > 0 {
        events(Event::Step(format!("fetching the working set: {prefetch} of {n} segments")));
        let deadline = Instant::now() + opts.stall_timeout * 4;
        let (started, bytes_then) = (Instant::now(), shared.lock().stats.bytes);
        let offsets = head.index.offsets(head.len);
        let mut st = shared.lock();
        while !st.done[..prefetch].iter().all(|d| *d) && st.stats.error.is_none() {
            let now = Instant::now();
            // Near enough the end, at the rate seen so far (once there is one to go by)?
            let (took, got) = (now - started, st.stats.bytes - bytes_then);
            if !opts.resume_lead.is_zero() && took >= Duration::from_millis(250) && got > 0 {
                let left: u64 = (0..prefetch).filter(|&k| !st.done[k]).map(|k| offsets[k + 1] - offsets[k]).sum();
                if Duration::from_secs_f64(left as f64 * took.as_secs_f64() / got as f64) <= opts.resume_lead {
                    break;
                }
            }
            if now >= deadline {
                let done = st.done[..prefetch].iter().filter(|d| **d).count();
                return Err(FlowError::EarlyStart {
                    reason: format!("the working set did not arrive in time: {done} of {prefetch} segments"),
                });
            }
            st = shared.changed.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        if let Some(reason) = st.stats.error.clone() {
            return Err(FlowError::EarlyStart { reason });
        }
    }
    early.timeline.prefetch = t0.elapsed();
    // From here on what the VM waits for comes first: the stream reads in short batches.
    shared.lock().resumed = true;

    // A driver snapshot whose RAM and disks are the served files.
    let ds = out_dir.join("device-state");
    std::fs::write(&ds, &head.device_state).map_err(|source| FlowError::Io { path: ds.clone(), source })?;
    let mut custom = custom_snapshot(&base, out_dir, &head.meta.forwards);
    custom.device_state_file = "device-state".into();
    let fs = early.serving().fs.as_ref().expect("set above");
    let memory = fs.path("memory").ok_or_else(|| FlowError::BadOverlay {
        field: "images",
        overlay: "no image named memory".into(),
        base: "memory".into(),
    })?;
    let disks: Vec<Disk> = snap
        .disks
        .iter()
        .filter_map(|d| fs.path(&d.name).map(|path| Disk { name: d.name.clone(), path, format: DiskFormat::Raw }))
        .collect();
    events(Event::Step("resuming the custom VM with its memory and disks served as they arrive".into()));
    let t1 = Instant::now();
    let vm = restore_forwarding(
        hypervisor,
        &custom,
        &head.meta.forwards,
        RestoreOptions {
            ram: RamMode::Served(memory.clone()),
            disks: Some(disks),
            forward_address: Some(opts.forward_address.clone()),
            ..Default::default()
        },
    )?;
    early.timeline.resume = t1.elapsed();
    early.ports = vm.forwards().iter().map(|f| (f.guest_port, f.host_port)).collect();
    early.vm = Some(vm);
    if let Some(check) = &opts.probe {
        let vm = early.vm.as_ref().expect("set above");
        let hp = vm.host_port(check.port).ok_or_else(|| FlowError::NotForwarded {
            port: check.port,
            forwarded: vm.forwards().iter().map(|f| f.guest_port).collect(),
        })?;
        events(Event::Step(check.describe()));
        // In slices of a second: a failed fetch ends the wait at once.
        let deadline = Instant::now() + check.timeout;
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = HttpCheck { timeout: left.min(Duration::from_secs(1)), ..check.clone() };
            match http_wait(&opts.forward_address, hp, &slice) {
                Err(_) if !left.is_zero() && left > slice.timeout && shared.lock().stats.error.is_none() => {}
                Err(FlowError::NoAnswer { guest_port, address, path, expect_status, last, .. }) => {
                    break Err(FlowError::NoAnswer {
                        guest_port,
                        address,
                        path,
                        expect_status,
                        timeout: check.timeout,
                        last,
                    })
                }
                r => break r,
            }
        };
        match answer {
            Ok(a) => {
                early.answer = Some(a.raw);
                early.timeline.first_answer = Some(t0.elapsed());
                early.timeline.bytes_before_answer = shared.lock().stats.bytes;
            }
            Err(e) => {
                // A failed fetch explains a missing answer better than the probe does.
                if let Some(reason) = shared.lock().stats.error.clone() {
                    early.stop_on_error();
                    return Err(FlowError::EarlyStart { reason });
                }
                return Err(e);
            }
        }
    }
    Ok(early)
}

/// A segmented overlay served over HTTP by any server that answers range requests (`Range:
/// bytes=A-B` with `206 Partial Content`).
#[cfg(any(feature = "client", feature = "server"))]
pub struct HttpSource {
    agent: ureq::Agent,
    url: String,
    len: u64,
}

#[cfg(any(feature = "client", feature = "server"))]
impl HttpSource {
    /// Asks `url` (`http://...`) for the overlay's length. A request that takes longer than
    /// `timeout` fails.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, FlowError> {
        if !url.starts_with("http://") {
            return Err(FlowError::EarlyStart {
                reason: format!("{url}: only plain http:// URLs can be read by range"),
            });
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(timeout))
            .build()
            .new_agent();
        let mut s = HttpSource { agent, url: url.to_string(), len: 0 };
        // The length from the answer to a range request for the first byte.
        let resp = s.get(0, 1).map_err(|e| FlowError::EarlyStart { reason: format!("{url}: {e}") })?;
        let total = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, n)| n.trim().parse::<u64>().ok());
        s.len = total.ok_or_else(|| FlowError::EarlyStart {
            reason: format!("{url}: the server does not answer range requests with a length (Content-Range)"),
        })?;
        Ok(s)
    }

    fn get(&self, offset: u64, len: u64) -> io::Result<ureq::http::Response<ureq::Body>> {
        let resp = self
            .agent
            .get(&self.url)
            .header("Range", format!("bytes={offset}-{}", offset + len - 1))
            .call()
            .map_err(io::Error::other)?;
        if resp.status().as_u16() != 206 {
            return Err(io::Error::other(format!(
                "asked for bytes {offset}..{}, the server answered {} (it must answer range requests with 206)",
                offset + len,
                resp.status()
            )));
        }
        Ok(resp)
    }
}

#[cfg(any(feature = "client", feature = "server"))]
impl OverlaySource for HttpSource {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::other(format!("bytes {offset}+{len} are past the overlay's {} bytes", self.len)));
        }
        let mut resp = self.get(offset, len)?;
        let body = resp.body_mut().with_config().limit(len + 1).read_to_vec().map_err(io::Error::other)?;
        if body.len() as u64 != len {
            return Err(io::Error::other(format!("asked for {len} bytes at {offset}, the server sent {}", body.len())));
        }
        Ok(body)
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

/// Resumes the VM of `snap` once more, its RAM served from its own image through the same
/// serving path early start uses (so the chunks recorded are those the kernel's reads ask for:
/// a fault reads the 128 KiB around it, and waits for all of it), waits for `probe`'s answer
/// (if any) and `tail` more, and returns the memory chunks read, in the order of their first
/// read, as (image 0, chunk), those read before the answer first. The snapshot's files are not
/// changed: the guest's writes go to a private store, its disks to layers of their own. `work`
/// (must not exist) holds the mount while it runs and is removed.
pub fn record_first_touch<H: Hypervisor>(
    hypervisor: &H,
    snap: &Snapshot,
    forwards: &[u16],
    probe: Option<&HttpCheck>,
    tail: Duration,
    work: &Path,
) -> Result<delta_engine::TouchOrder, FlowError> {
    crate::flows::create_dir_new(work)?;
    let _guard = crate::flows::Guard::new(work);
    let (mnt, store) = (work.join("images"), work.join("store"));
    for d in [&mnt, &store] {
        std::fs::create_dir(d).map_err(|source| FlowError::Io { path: d.clone(), source })?;
    }
    let memory = snap.memory_path();
    let size = std::fs::metadata(&memory).map_err(|source| FlowError::Io { path: memory.clone(), source })?.len();
    let spec = ImageSpec { name: "memory".into(), size, base: Some(memory), pending: Vec::new() };
    let fs = LazyFs::mount(&mnt, &store, vec![spec], LazyOptions::default())?;
    let mut ports: Vec<u16> = forwards.to_vec();
    if let Some(p) = probe.map(|c| c.port).filter(|p| !ports.contains(p)) {
        ports.push(p);
    }
    let vm = hypervisor.restore(
        snap,
        &RestoreOptions {
            ram: RamMode::Served(fs.path("memory").expect("the one image")),
            forwards: Some(ports.iter().map(|&g| Forward { host_port: 0, guest_port: g }).collect()),
            ..Default::default()
        },
    )?;
    if let Some(check) = probe {
        let hp = vm.host_port(check.port).ok_or_else(|| FlowError::NotForwarded {
            port: check.port,
            forwarded: vm.forwards().iter().map(|f| f.guest_port).collect(),
        })?;
        http_wait("127.0.0.1", hp, check)?;
    }
    let working_set = if probe.is_some() { fs.images()[0].touched().len() } else { 0 };
    std::thread::sleep(tail);
    let touched = fs.images()[0].touched();
    drop(vm);
    drop(fs);
    // Without an answer to wait for, what the first seconds touched is the working set.
    let working_set = if probe.is_some() { working_set } else { touched.len() };
    Ok(delta_engine::TouchOrder { chunks: touched.into_iter().map(|c| (0u8, c)).collect(), working_set })
}

/// How [`segment_overlay_file`] records what the VM touches.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The app's answer that ends the working set; without it, the first seconds are.
    pub probe: Option<HttpCheck>,
    /// How many times the VM is resumed to record ([`record_touch_order`]).
    pub runs: u32,
}

/// How many times a segmented overlay's custom VM is resumed to record what it touches, by
/// default.
pub const FIRST_TOUCH_RUNS: u32 = 3;

/// [`record_first_touch`] `runs` times (at least once), each run's touches merged into the
/// first's ([`delta_engine::TouchOrder::merge`]): a guest does not touch the same free pages on
/// every run, and what any run touched before the answer is the working set. `work` (must not
/// exist) is removed.
pub fn record_touch_order<H: Hypervisor>(
    hypervisor: &H,
    snap: &Snapshot,
    forwards: &[u16],
    probe: Option<&HttpCheck>,
    runs: u32,
    work: &Path,
) -> Result<delta_engine::TouchOrder, FlowError> {
    crate::flows::create_dir_new(work)?;
    let _guard = crate::flows::Guard::new(work);
    let mut order = delta_engine::TouchOrder::default();
    for run in 1..=runs.max(1) {
        let tail = crate::flows::FIRST_TOUCH_TAIL;
        let more = record_first_touch(hypervisor, snap, forwards, probe, tail, &work.join(format!("run-{run}")))?;
        tracing::debug!(run, working_set = more.working_set, "recorded the touch order");
        order.merge(&more);
    }
    Ok(order)
}

/// Rewrites the overlay at `input` as a segmented one at `out` (must not exist), for early
/// start: synthesizes it the ordinary way into a scratch directory next to `out`, resumes the
/// result once more to record what it touches until `probe` answers (and
/// [`FIRST_TOUCH_TAIL`](crate::flows) more), and puts that first
/// ([`delta_engine::segment_overlay`]). Nothing but `out` is left behind.
pub fn segment_overlay_file<H: Hypervisor>(
    hypervisor: &H,
    registry: &Registry,
    input: &Path,
    out: &Path,
    recording: &Recording,
    opts: &delta_engine::SegmentOptions,
    events: &(dyn Fn(Event) + Sync),
) -> Result<delta_engine::SegmentStats, FlowError> {
    if out.exists() {
        return Err(FlowError::Exists { path: out.to_owned() });
    }
    let open = |p: &Path| File::open(p).map_err(|source| FlowError::Io { path: p.to_owned(), source });
    let (scratch, _scratch_guard) = crate::flows::fresh_sibling(out, "work", |p| std::fs::create_dir(p))?;
    let vm_dir = scratch.join("vm");
    let syn = crate::flows::synthesize_with(
        hypervisor,
        registry,
        std::io::BufReader::with_capacity(1 << 20, open(input)?),
        // The rebuilt state is resumed again below: the VM must not change it.
        &crate::flows::SynthesisOptions { in_place: false, ..crate::flows::SynthesisOptions::new(&vm_dir) },
        events,
    )?;
    let ports: Vec<u16> = syn.meta.forwards.iter().map(|f| f.guest_port).collect();
    drop(syn.vm);
    let snap = Snapshot::load(&vm_dir)?;
    events(Event::Step("recording what the VM touches until its app answers".into()));
    let touched = record_touch_order(
        hypervisor,
        &snap,
        &ports,
        recording.probe.as_ref(),
        recording.runs,
        &scratch.join("first-touch"),
    )?;
    events(Event::Step(format!(
        "writing the segmented overlay ({} chunks touched before the answer, {} after)",
        touched.working_set,
        touched.chunks.len() - touched.working_set
    )));
    let mut file = None;
    let (partial, mut partial_guard) = crate::flows::fresh_sibling(out, "partial", |p| {
        file = Some(std::fs::OpenOptions::new().write(true).create_new(true).open(p)?);
        Ok(())
    })?;
    let (w, stats) = delta_engine::segment_overlay(
        std::io::BufReader::with_capacity(1 << 20, open(input)?),
        &touched,
        opts,
        std::io::BufWriter::with_capacity(1 << 20, file.expect("set when fresh_sibling succeeds")),
    )
    .map_err(|e| FlowError::EarlyStart { reason: crate::error_chain(&e) })?;
    let f = w.into_inner().map_err(|e| FlowError::Io { path: partial.clone(), source: e.into_error() })?;
    f.sync_all().map_err(|source| FlowError::Io { path: partial.clone(), source })?;
    crate::flows::publish(&partial, out)?;
    partial_guard.disarm();
    Ok(stats)
}
