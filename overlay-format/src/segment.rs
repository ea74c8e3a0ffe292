//! Segmented overlays (format 1.3): an index after the device state says which chunks each blob
//! (a **segment**) writes, so that an overlay can be used before all of it has arrived, and
//! its segments fetched out of order by their byte ranges.
//!
//! In a segmented stream every chunk is written by at most one record, every blob is
//! compressed on its own (codec `0`, `1` or `2`), and a `CopySelf` record copies only from a
//! chunk that an earlier record of the same blob wrote: each segment decodes and applies
//! alone. The index holds each segment's frame header, so the trailer's stream digest, which
//! covers every frame header, binds the index and every segment before any segment is read.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::blob::{DecodedBlob, RecordRef, SealedBlob};
use crate::error::DecodeError;
use crate::frame::{self, FrameHeader, FrameKind, FRAME_HEADER_LEN, MAX_BLOB_LEN, MAX_TRAILER_LEN};
use crate::meta::{OverlayMeta, Trailer};

/// A run of chunks of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkRun {
    /// Index into [`OverlayMeta::images`].
    pub image: u8,
    /// First chunk.
    pub chunk: u64,
    /// Number of chunks, at least 1.
    pub count: u64,
}

impl ChunkRun {
    /// The chunks, as a range.
    pub fn chunks(&self) -> Range<u64> {
        self.chunk..self.chunk + self.count
    }
}

/// One segment in the index: its blob frame's header, and the chunks its records write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The blob's codec: `0`, `1` or `2`, the overlay's compression.
    pub codec: u8,
    /// Records in the blob.
    pub record_count: u32,
    /// Stored payload bytes (the frame is 40 bytes more).
    pub stored_len: u64,
    /// Payload bytes after decompression.
    pub raw_len: u64,
    /// The frame's checksum.
    pub checksum: [u8; 16],
    /// The chunks the segment's records write, sorted by image then chunk, neither
    /// overlapping nor touching (adjacent runs are one run).
    pub runs: Vec<ChunkRun>,
}

impl Segment {
    /// The segment's frame length: header and stored payload.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + self.stored_len
    }

    pub(crate) fn header(&self) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Blob as u8,
            codec: self.codec,
            lane: 0,
            record_count: self.record_count,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            checksum: self.checksum,
        }
    }

    /// The entry of a sealed blob that writes `runs` (in any order; they are normalized).
    pub fn of(blob: &SealedBlob, runs: Vec<ChunkRun>) -> Self {
        let h = &blob.header;
        Segment {
            codec: h.codec,
            record_count: h.record_count,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
            checksum: h.checksum,
            runs: normalize(runs),
        }
    }
}

/// The index of a segmented overlay: its segments in stream order, which is the order a VM is
/// expected to need them in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentIndex {
    /// How many leading segments hold what the VM was seen to touch before its app answered:
    /// worth fetching before the VM resumes.
    pub prefetch: u64,
    /// The segments, in stream order.
    pub segments: Vec<Segment>,
}

/// Sorts and merges runs (overlapping or touching runs of one image become one).
pub fn normalize(mut runs: Vec<ChunkRun>) -> Vec<ChunkRun> {
    runs.retain(|r| r.count > 0);
    runs.sort_unstable();
    let mut out: Vec<ChunkRun> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(l) if l.image == r.image && l.chunk + l.count >= r.chunk => {
                l.count = l.count.max(r.chunk + r.count - l.chunk);
            }
            _ => out.push(r),
        }
    }
    out
}

/// The chunks a decoded blob's records write, normalized.
pub fn written_runs(blob: &DecodedBlob) -> Vec<ChunkRun> {
    normalize(blob.records().map(|r| ChunkRun { image: r.image(), chunk: r.chunk(), count: r.chunk_count() }).collect())
}

impl SegmentIndex {
    /// Checks the index against the overlay's images: the prefetch count and every segment's
    /// length within limits, runs inside their images, normalized, and no chunk in two
    /// segments. `Err(reason)` otherwise.
    pub fn check(&self, meta: &OverlayMeta) -> Result<(), String> {
        if self.prefetch > self.segments.len() as u64 {
            return Err(format!("prefetch {} of {} segments", self.prefetch, self.segments.len()));
        }
        let mut all: Vec<(ChunkRun, usize)> = Vec::new();
        for (k, s) in self.segments.iter().enumerate() {
            if frame::codec_from_byte(s.codec) != Some(meta.compression) {
                return Err(format!("segment {k}: codec {} in an overlay of {:?}", s.codec, meta.compression));
            }
            if s.raw_len > MAX_BLOB_LEN {
                return Err(format!("segment {k}: {} bytes, more than {MAX_BLOB_LEN}", s.raw_len));
            }
            let stored_max = if s.codec == 0 { s.raw_len } else { frame::max_stored(s.raw_len) };
            if s.stored_len > stored_max {
                return Err(format!("segment {k}: {} stored bytes for {} bytes", s.stored_len, s.raw_len));
            }
            if s.runs.is_empty() {
                return Err(format!("segment {k} writes no chunk"));
            }
            for (j, r) in s.runs.iter().enumerate() {
                let Some(img) = meta.images.get(r.image as usize) else {
                    return Err(format!("segment {k}: image {} does not exist", r.image));
                };
                let total = img.size.div_ceil(crate::CHUNK_SIZE as u64);
                if r.count == 0 || r.chunk.checked_add(r.count).is_none_or(|e| e > total) {
                    return Err(format!(
                        "segment {k}: chunks {}+{} outside image '{}' of {total} chunks",
                        r.chunk, r.count, img.name
                    ));
                }
                if j > 0 {
                    let p = s.runs[j - 1];
                    if (p.image, p.chunk + p.count) >= (r.image, r.chunk) {
                        return Err(format!("segment {k}: runs are not sorted, or overlap or touch"));
                    }
                }
                all.push((*r, k));
            }
        }
        all.sort_unstable();
        for w in all.windows(2) {
            let (a, b) = (w[0].0, w[1].0);
            if a.image == b.image && a.chunk + a.count > b.chunk {
                return Err(format!("chunk {} of image {} is in segments {} and {}", b.chunk, b.image, w[0].1, w[1].1));
            }
        }
        Ok(())
    }

    /// Offset of every segment's frame in the stream, given where the first one starts (the
    /// end of the head: [`crate::OverlayReader::bytes_read`] after
    /// [`crate::OverlayReader::index`]), and the offset of the trailer frame last.
    pub fn offsets(&self, head_len: u64) -> Vec<u64> {
        let mut at = head_len;
        let mut out = Vec::with_capacity(self.segments.len() + 1);
        for s in &self.segments {
            out.push(at);
            at += s.frame_len();
        }
        out.push(at);
        out
    }

    /// Stored bytes of all segments' frames.
    pub fn total_len(&self) -> u64 {
        self.segments.iter().map(Segment::frame_len).sum()
    }

    /// A lookup from chunks to the segment that writes them.
    pub fn chunk_map(&self) -> ChunkMap {
        let mut map = BTreeMap::new();
        for (k, s) in self.segments.iter().enumerate() {
            for r in &s.runs {
                map.insert((r.image, r.chunk), (r.chunk + r.count, k));
            }
        }
        ChunkMap { map }
    }
}

/// Which segment writes a chunk ([`SegmentIndex::chunk_map`]).
#[derive(Debug, Clone)]
pub struct ChunkMap {
    /// (image, first chunk) -> (end chunk, segment).
    map: BTreeMap<(u8, u64), (u64, usize)>,
}

impl ChunkMap {
    /// The segments that write any of `chunks` of `image`, in stream order, each once.
    pub fn segments(&self, image: u8, chunks: Range<u64>) -> Vec<usize> {
        let mut out = Vec::new();
        // The run that starts at or before chunks.start, then every run starting inside.
        let before = self.map.range(..=(image, chunks.start)).next_back();
        let inside = self.map.range((image, chunks.start)..(image, chunks.end.max(chunks.start)));
        for (&(img, start), &(end, k)) in before.into_iter().chain(inside) {
            if img == image && start < chunks.end && end > chunks.start {
                out.push(k);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The segment that writes chunk `c` of `image`, if any.
    pub fn segment_of(&self, image: u8, c: u64) -> Option<usize> {
        self.segments(image, c..c + 1).first().copied()
    }
}

/// Checks a decoded segment against its index entry: its records write exactly the entry's
/// runs, and every `CopySelf` copies from a chunk an earlier record of the segment wrote.
pub fn check_segment(blob: &DecodedBlob, entry: &Segment, k: usize) -> Result<(), String> {
    if written_runs(blob) != entry.runs {
        return Err(format!("segment {k}: its records write other chunks than the index says"));
    }
    // Runs written so far in this blob, (image, first chunk) -> end.
    let mut written: BTreeMap<(u8, u64), u64> = BTreeMap::new();
    for (i, r) in blob.records().enumerate() {
        if let RecordRef::CopySelf { src, .. } = r {
            let hit = written
                .range(..=(src.image, src.chunk))
                .next_back()
                .is_some_and(|(&(img, start), &end)| img == src.image && start <= src.chunk && src.chunk < end);
            if !hit {
                return Err(format!(
                    "segment {k}, record {i}: copies chunk {} of image {}, which no earlier record of the segment wrote",
                    src.chunk, src.image
                ));
            }
        }
        let end = r.chunk() + r.chunk_count();
        // Each chunk once: no earlier run of the blob reaches into this one.
        let overlaps = written
            .range(..(r.image(), end))
            .next_back()
            .is_some_and(|(&(img, _), &e)| img == r.image() && e > r.chunk());
        if overlaps {
            return Err(format!("segment {k}, record {i}: writes a chunk an earlier record of the segment wrote"));
        }
        written.insert((r.image(), r.chunk()), end);
    }
    Ok(())
}

/// Parses segment `k` from the bytes of its frame (fetched on their own, e.g. by a range
/// request): the header must be the one the index holds, the checksum must match, and the
/// records must pass [`SealedBlob::decode_for`] and [`check_segment`].
pub fn read_segment(
    bytes: &[u8],
    index: &SegmentIndex,
    k: usize,
    meta: &OverlayMeta,
) -> Result<DecodedBlob, DecodeError> {
    let bad = |reason: String| DecodeError::Malformed { frame: k as u64, offset: 0, reason };
    let entry = index.segments.get(k).ok_or_else(|| bad(format!("no segment {k}")))?;
    if bytes.len() as u64 != entry.frame_len() {
        return Err(bad(format!("segment {k} is {} bytes, the index says {}", bytes.len(), entry.frame_len())));
    }
    let hb: &[u8; FRAME_HEADER_LEN] = bytes[..FRAME_HEADER_LEN].try_into().expect("length checked");
    if *hb != entry.header().encode() {
        return Err(bad(format!("segment {k}: its frame header is not the one the index holds")));
    }
    let sealed = SealedBlob {
        header: entry.header(),
        stored: bytes[FRAME_HEADER_LEN..].to_vec(),
        raw: None,
        chain_end: false,
        frame: k as u64,
        offset: 0,
        segment: Some(Box::new((k, entry.clone()))),
    };
    sealed.into_decoded_for(meta)
}

/// What a segmented overlay's head holds: everything before the first segment. With it a
/// reader can check the trailer ([`Head::check_trailer`]) and then read segments in any order
/// ([`read_segment`]).
#[derive(Debug, Clone)]
pub struct Head {
    /// The metadata.
    pub meta: OverlayMeta,
    /// The device state.
    pub device_state: Vec<u8>,
    /// The index.
    pub index: SegmentIndex,
    /// Bytes of the head: the first segment starts here.
    pub len: u64,
    /// The stream digest over the head's headers, for the trailer check.
    pub(crate) stream: blake3::Hasher,
    pub(crate) device_state_digest: [u8; 32],
}

impl Head {
    /// Offset and length of the trailer frame.
    pub fn trailer_range(&self) -> (u64, u64) {
        let at = self.len + self.index.total_len();
        (at, FRAME_HEADER_LEN as u64 + MAX_TRAILER_LEN)
    }

    /// Checks the trailer frame's bytes (the stream's end, from [`Head::trailer_range`]'s
    /// offset on): the stream digest over the head and every segment's header from the index,
    /// the counts, and the device-state digest.
    pub fn check_trailer(&self, bytes: &[u8]) -> Result<Trailer, DecodeError> {
        let (at, _) = self.trailer_range();
        let mismatch = |reason: String| DecodeError::TrailerMismatch { offset: at, reason };
        if bytes.len() < FRAME_HEADER_LEN {
            return Err(DecodeError::Truncated { offset: at, what: "the trailer" });
        }
        let hb: &[u8; FRAME_HEADER_LEN] = bytes[..FRAME_HEADER_LEN].try_into().expect("length checked");
        let h = FrameHeader::decode(hb).map_err(|r| mismatch(r.into()))?;
        let payload = &bytes[FRAME_HEADER_LEN..];
        if h.kind != FrameKind::Trailer as u8 || h.codec != 0 || h.lane != 0 || h.record_count != 0 {
            return Err(mismatch("the frame after the last segment is not a trailer".into()));
        }
        if h.raw_len > MAX_TRAILER_LEN || h.stored_len != h.raw_len || h.stored_len != payload.len() as u64 {
            return Err(mismatch(format!(
                "trailer of {} bytes where {} follow its header",
                h.stored_len,
                payload.len()
            )));
        }
        if frame::frame_checksum(&h.prefix(), payload) != h.checksum {
            return Err(DecodeError::ChecksumMismatch { frame: 3 + self.index.segments.len() as u64, offset: at });
        }
        if payload.len() < 32 {
            return Err(mismatch("trailer shorter than its stream digest".into()));
        }
        let mut stream = self.stream.clone();
        for s in &self.index.segments {
            stream.update(&s.header().encode());
        }
        if payload[..32] != *stream.finalize().as_bytes() {
            return Err(mismatch("stream digest differs: the index does not match the stream".into()));
        }
        let trailer: Trailer =
            postcard::from_bytes(&payload[32..]).map_err(|e| mismatch(format!("trailer does not decode: {e}")))?;
        let records: u64 = self.index.segments.iter().map(|s| s.record_count as u64).sum();
        if trailer.blob_count != self.index.segments.len() as u64 || trailer.record_count != records {
            return Err(mismatch(format!(
                "{} blobs and {records} records in the index, trailer says {} and {}",
                self.index.segments.len(),
                trailer.blob_count,
                trailer.record_count
            )));
        }
        if trailer.image_digests.len() != self.meta.images.len() {
            return Err(mismatch(format!(
                "{} image digests for {} images",
                trailer.image_digests.len(),
                self.meta.images.len()
            )));
        }
        if trailer.device_state_digest != self.device_state_digest {
            return Err(mismatch("device state digest differs".into()));
        }
        Ok(trailer)
    }
}
