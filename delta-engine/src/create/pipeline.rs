//! The pipeline: the stages of creation on threads, one step per batch. In a step, the pool
//! classifies batch k ([`Classifier`]) and seals the blobs batch k-2 filled ([`seal`]), while
//! the calling thread writes the blobs sealed so far ([`Ordered`]) and runs the sequential
//! pass ([`Sequential`]) over batch k-1. Each lane's chain, if any, has a thread of its own
//! ([`Chain`]): its blobs go to it as they are cut and come back sealed, in order, so its one
//! thread is never held up by the steps. Every blob is numbered when cut; each stream's blobs
//! are written in that order.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use overlay_format::{
    BlobBuilder, ChainEncoder, Compression, Effort, EncodeError, ImageDigest, OverlayWriter, SealedBlob, CHUNK_SIZE,
};
use rayon::prelude::*;

use super::classify::{lane_stream, Classes, Classifier};
use super::emit::Sequential;
use super::view::View;
use super::{Counting, CreateError, CreateOptions, CreateStats, DENSE, MAX_STREAM_LANES, STREAMS};
use crate::base::Base;
use crate::Progress;

/// A batch: image, first chunk, end chunk.
type Batch = (usize, u64, u64);

/// Runs the pipeline over the custom images `views`, writing the blobs to `writer`; returns the
/// images' digests (and fills `stats`).
pub(super) fn run<W: Write>(
    base: &Base,
    views: &[View],
    opts: &CreateOptions,
    writer: &mut OverlayWriter<Counting<W>>,
    stats: &mut CreateStats,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<ImageDigest>, CreateError> {
    let total: u64 = views.iter().map(|m| m.size()).sum();
    let mut seq = Sequential::new(views, opts);
    let batches = batches(views, opts.batch_bytes);
    let encoders = chain_encoders(opts)?;
    let mut scanned = 0u64;
    std::thread::scope(|ts| -> Result<(), CreateError> {
        let mut chains: Vec<Chain> = encoders
            .into_iter()
            .enumerate()
            .map(|(stream, enc)| Chain::start(ts, enc, stream, opts.chain_queue))
            .collect();
        let mut out = Ordered::default();
        let mut classified: Option<(Batch, Classes)> = None;
        let mut filled: Vec<Cut> = Vec::new();
        let mut next = batches.into_iter();
        let mut cut = false;
        loop {
            let batch = next.next();
            // The step that cuts the last blobs ends the chain.
            let last = batch.is_none() && classified.is_none() && !cut;
            cut |= last;
            filled.extend(cut_blobs(&mut seq, &mut chains, &mut out, last));
            if batch.is_none() && classified.is_none() && filled.is_empty() {
                break;
            }
            let to_seal = std::mem::take(&mut filled);
            let prev = classified.take();
            let mut new_classes: Option<(Batch, Result<Classes, CreateError>, Duration)> = None;
            let mut new_sealed: Option<Result<Sealed, EncodeError>> = None;
            let mut main: Result<(), CreateError> = Ok(());
            rayon::in_place_scope(|s| {
                if let Some(b) = batch {
                    let new_classes = &mut new_classes;
                    s.spawn(move |_| *new_classes = Some(classify(base, views, opts, b)));
                }
                if !to_seal.is_empty() {
                    let new_sealed = &mut new_sealed;
                    s.spawn(move |_| *new_sealed = Some(seal(to_seal, opts)));
                }
                main = (|| {
                    collect_chains(&mut chains, &mut out, stats, false)?;
                    out.write(writer, stats)?;
                    if let Some(((ii, c0, c1), classes)) = prev {
                        seq.pass(views, ii, c0, classes, stats)?;
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
        collect_chains(&mut chains, &mut out, stats, true)?;
        out.write(writer, stats)?;
        if !out.done() {
            return Err(EncodeError::Order { reason: "internal: sealed blobs left unwritten" }.into());
        }
        Ok(())
    })?;
    let (digests, kinds) = seq.finish();
    stats.kinds = kinds;
    stats.scanned_bytes = total;
    Ok(digests)
}

/// The batches of the images `views`, `batch_bytes` of address space each, in the order they
/// are classified.
fn batches(views: &[View], batch_bytes: u64) -> Vec<Batch> {
    let batch_chunks = (batch_bytes / CHUNK_SIZE as u64).max(1);
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
    batches
}

/// One encoder per lane when the lanes are chained (zstd or xz with `opts.chain`), else none.
fn chain_encoders(opts: &CreateOptions) -> Result<Vec<ChainEncoder>, CreateError> {
    let lanes = opts.lanes.clamp(1, MAX_STREAM_LANES as u8);
    Ok(match opts.compression {
        Compression::Zstd | Compression::Xz if opts.chain => (0..lanes)
            .map(|lane| ChainEncoder::for_lane(opts.compression, chain_level(opts, lanes, lane), lane))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| EncodeError::Compress { what: "blob", source })?,
        _ => Vec::new(),
    })
}

/// Classifies a batch on the pool, timed.
fn classify(
    base: &Base,
    views: &[View],
    opts: &CreateOptions,
    b: Batch,
) -> (Batch, Result<Classes, CreateError>, Duration) {
    let (ii, c0, c1) = b;
    let ts = Instant::now();
    let classes = Classifier { base, view: &views[ii], ii, opts }.classify(c0, c1);
    (b, classes, ts.elapsed())
}

/// Takes the blobs the sequential pass cut (with `last`, every blob, and an empty one to end
/// each chain whose last blob went out earlier), numbers them, sends those of chained lanes to
/// their chain and returns the others, to be sealed alone.
fn cut_blobs(seq: &mut Sequential<'_>, chains: &mut [Chain], out: &mut Ordered, last: bool) -> Vec<Cut> {
    if last {
        seq.em.cut_all();
    }
    let mut ready = std::mem::take(&mut seq.em.ready);
    if last {
        for c in chains.iter().filter(|c| c.open) {
            if !ready.iter().any(|(_, s)| *s == c.stream) {
                // The lane's last blob went out earlier: an empty one ends its frame.
                ready.push((BlobBuilder::new(), c.stream));
            }
        }
    }
    let fresh = out.number(ready);
    Chain::route(chains, fresh, last)
}

/// Takes the blobs the chains have sealed into `out`: those ready, or (`all`, which closes the
/// chains) every one.
fn collect_chains(
    chains: &mut [Chain],
    out: &mut Ordered,
    stats: &mut CreateStats,
    all: bool,
) -> Result<(), CreateError> {
    for chain in chains {
        let (sealed, t) = chain.sealed(all)?;
        stats.compress += t;
        out.extend(sealed);
    }
    Ok(())
}

/// The level of lane `lane`'s chain: `opts.level`, or for a lane without machine code the
/// level [`CreateOptions::zstd_other_lanes_level`] gives.
fn chain_level(opts: &CreateOptions, lanes: u8, lane: u8) -> i32 {
    // With one lane, code shares it with everything else.
    let code = usize::from(lane) == lane_stream(1, lanes);
    match opts.zstd_other_lanes_level {
        Some((at, other)) if opts.compression == Compression::Zstd && opts.level == at && !code => other,
        _ => opts.level,
    }
}

/// The default level for blobs of incompressible chunks ([`CreateOptions::dense_level`]): the
/// compressor still runs (every blob of an overlay uses its codec) but spends no effort.
fn fastest_level(c: Compression) -> i32 {
    match c {
        Compression::Xz => 0,
        _ => 1,
    }
}

/// Seals blobs alone, in parallel: the dense stream at `opts.dense_level` (the fastest) over a
/// window covering the blob, the light streams (when there is no chain) at `opts.level`.
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
                    level: opts.dense_level.unwrap_or_else(|| fastest_level(opts.compression)),
                    window_log,
                    long_distance: true,
                    executable_filter: false,
                }
            } else {
                // Machine code (binaries on disk, their pages in memory) is a large part of
                // what a customization adds: xz's x86 filter makes it about 2.5% smaller.
                Effort { executable_filter: opts.executable_filter, window_log, ..Effort::level(opts.level) }
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

/// A chain's thread: its lane's blobs go in, numbered, in cut order; sealed blobs come back in
/// the same order. At most [`CreateOptions::chain_queue`] wait to be sealed, so a slow chain
/// holds the scan back rather than filling memory.
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
    fn start<'s>(ts: &'s std::thread::Scope<'s, '_>, mut enc: ChainEncoder, stream: usize, queue: usize) -> Self {
        let (to, rx) = std::sync::mpsc::sync_channel::<(u64, BlobBuilder, bool)>(queue);
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

#[cfg(test)]
mod tests {
    use super::chain_level;
    use crate::CreateOptions;
    use overlay_format::Compression;

    /// The lanes without code use `zstd_other_lanes_level` at its level with zstd, and only
    /// then; the code lane (with one lane, the only one) uses `level`.
    #[test]
    fn lanes_without_code_take_the_other_level_only_where_asked() {
        let d = CreateOptions::default();
        assert_eq!(d.zstd_other_lanes_level, Some((4, 3)));
        // Two lanes: 0 the rest, 1 code. Three: 0 text, 1 code, 2 the rest.
        assert_eq!([chain_level(&d, 2, 0), chain_level(&d, 2, 1)], [3, 4]);
        assert_eq!([chain_level(&d, 3, 0), chain_level(&d, 3, 1), chain_level(&d, 3, 2)], [3, 4, 3]);
        assert_eq!(chain_level(&d, 1, 0), 4);
        let l5 = CreateOptions { level: 5, ..d.clone() };
        assert_eq!([chain_level(&l5, 2, 0), chain_level(&l5, 2, 1)], [5, 5]);
        let xz = CreateOptions { compression: Compression::Xz, level: 4, ..d.clone() };
        assert_eq!([chain_level(&xz, 2, 0), chain_level(&xz, 2, 1)], [4, 4]);
        let off = CreateOptions { zstd_other_lanes_level: None, ..d.clone() };
        assert_eq!([chain_level(&off, 2, 0), chain_level(&off, 2, 1)], [4, 4]);
        let at6 = CreateOptions { level: 6, zstd_other_lanes_level: Some((6, 2)), ..d };
        assert_eq!([chain_level(&at6, 3, 0), chain_level(&at6, 3, 1), chain_level(&at6, 3, 2)], [2, 6, 2]);
    }
}
