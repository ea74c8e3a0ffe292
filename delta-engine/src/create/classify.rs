//! Content classification: what each chunk of a custom image is against the base (the same
//! as the base's chunk at its offset, zeros, a copy of any base chunk, a patch of its base
//! chunk, or fresh bytes), and for fresh bytes which stream they go to, by the heuristics on
//! their byte histogram ([`looks_incompressible`], [`content_lane`]).

use std::borrow::Cow;
use std::cell::RefCell;

use overlay_format::{encode_patch, ChunkHash, ChunkRef, CHUNK_SIZE};
use rayon::prelude::*;

use super::view::{Src, View};
use super::{chunk_len, CreateError, CreateOptions, DENSE, LIGHT};
use crate::base::Base;

/// What a chunk is against the base.
#[derive(Clone, Copy)]
pub(super) enum Class {
    Same,
    Zero,
    Base(ChunkRef),
    /// Stored raw (in `stream`), or as a patch (`stream` is then the first lane's).
    Fresh {
        stream: usize,
    },
}

/// What [`Classifier::classify`] says of each chunk of a batch.
pub(super) type Classes = Vec<(Class, ChunkHash, Option<Vec<u8>>)>;

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
pub(super) fn lane_stream(kind: u8, lanes: u8) -> usize {
    match lanes {
        0 | 1 => LIGHT,
        2 => usize::from(kind == 1),
        _ => usize::from(kind),
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

/// Classifies the chunks of custom image `ii` (read through `view`) against the base.
pub(super) struct Classifier<'a> {
    pub(super) base: &'a Base,
    pub(super) view: &'a View,
    pub(super) ii: usize,
    pub(super) opts: &'a CreateOptions,
}

thread_local! {
    /// A group's custom bytes and base bytes, kept by each thread of the pool from group to
    /// group: fresh buffers would cost a page fault per 4 KiB each time.
    static GROUP_BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Classifier<'_> {
    /// What each chunk `c0..c1` is, with its hash and, for a patch, the patch.
    pub(super) fn classify(&self, c0: u64, c1: u64) -> Result<Classes, CreateError> {
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
