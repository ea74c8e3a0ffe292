//! Blobs: independently compressed batches of records.
//!
//! Uncompressed blob payload: `table_len: u32 LE | record table | data area`. The table is a
//! sequence of records (tag byte, image byte, LEB128 varints); `Patch` and `Raw` records take
//! their bytes from the data area in table order. See `FORMAT.md`.

use crate::compress::{self, ChainEncoder, Effort};
use crate::error::{DecodeError, EncodeError};
use crate::frame::{self, FrameHeader, FrameKind, MAX_BLOB_LEN, MAX_TABLE_LEN};
use crate::meta::{Compression, OverlayMeta};
use crate::patch;
use crate::record::{ChunkRef, Record};
use crate::CHUNK_SIZE;

const TAG_ZERO: u8 = 1;
const TAG_COPY_BASE: u8 = 2;
const TAG_COPY_SELF: u8 = 3;
const TAG_PATCH: u8 = 4;
const TAG_RAW: u8 = 5;

/// Accumulates records into one blob.
#[derive(Debug, Default, Clone)]
pub struct BlobBuilder {
    table: Vec<u8>,
    data: Vec<u8>,
    records: u64,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl BlobBuilder {
    /// An empty blob.
    pub fn new() -> Self {
        Self::default()
    }

    fn head(&mut self, tag: u8, image: u8, chunk: u64) {
        self.table.push(tag);
        self.table.push(image);
        put_varint(&mut self.table, chunk);
        self.records += 1;
    }

    /// `count` zero chunks from `chunk` on.
    pub fn push_zero(&mut self, image: u8, chunk: u64, count: u64) {
        self.head(TAG_ZERO, image, chunk);
        put_varint(&mut self.table, count);
    }

    /// `count` chunks copied from the base starting at `src`.
    pub fn push_copy_base(&mut self, image: u8, chunk: u64, count: u64, src: ChunkRef) {
        self.head(TAG_COPY_BASE, image, chunk);
        put_varint(&mut self.table, count);
        self.table.push(src.image);
        put_varint(&mut self.table, src.chunk);
    }

    /// One chunk copied from an earlier-written chunk of the rebuilt VM.
    pub fn push_copy_self(&mut self, image: u8, chunk: u64, src: ChunkRef) {
        self.head(TAG_COPY_SELF, image, chunk);
        self.table.push(src.image);
        put_varint(&mut self.table, src.chunk);
    }

    /// One chunk as a patch against the same-offset base chunk.
    pub fn push_patch(&mut self, image: u8, chunk: u64, patch: &[u8]) {
        self.head(TAG_PATCH, image, chunk);
        put_varint(&mut self.table, patch.len() as u64);
        self.data.extend_from_slice(patch);
    }

    /// Raw chunks from `chunk` on: `n * 4096` bytes, or less for a run that ends at the end of
    /// the image.
    pub fn push_raw(&mut self, image: u8, chunk: u64, data: &[u8]) {
        self.head(TAG_RAW, image, chunk);
        put_varint(&mut self.table, data.len() as u64);
        self.data.extend_from_slice(data);
    }

    /// Appends any record.
    pub fn push(&mut self, record: &Record) {
        match record {
            Record::Zero { image, chunk, count } => self.push_zero(*image, *chunk, *count),
            Record::CopyBase { image, chunk, count, src } => self.push_copy_base(*image, *chunk, *count, *src),
            Record::CopySelf { image, chunk, src } => self.push_copy_self(*image, *chunk, *src),
            Record::Patch { image, chunk, patch } => self.push_patch(*image, *chunk, patch),
            Record::Raw { image, chunk, data } => self.push_raw(*image, *chunk, data),
        }
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> u64 {
        self.records
    }

    /// Size of the blob payload before compression.
    pub fn uncompressed_len(&self) -> usize {
        4 + self.table.len() + self.data.len()
    }

    /// True when no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Compresses the blob and computes its checksum. Can run on any thread.
    pub fn seal(self, compression: Compression, level: i32) -> Result<SealedBlob, EncodeError> {
        self.seal_with(compression, &Effort::level(level))
    }

    /// Like [`seal`](Self::seal), with the compressor's window and long-distance matching
    /// chosen too.
    pub fn seal_with(self, compression: Compression, effort: &Effort) -> Result<SealedBlob, EncodeError> {
        let (raw, record_count) = self.payload()?;
        let stored = compress::compress(compression, effort, &raw)
            .map_err(|source| EncodeError::Compress { what: "blob", source })?;
        Ok(SealedBlob::new(frame::codec_byte(compression), 0, record_count, stored, raw.len() as u64, false))
    }

    /// Seals the blob as the next segment of `chain`, a zstd frame or .xz stream that runs
    /// through the overlay's chained blobs (codecs 3 and 4, FORMAT.md section 6); `end` ends
    /// the frame, and the last chained blob of an overlay must end it. The blobs of a chain
    /// must be written in the order they were sealed, into an overlay of the chain's
    /// compressor.
    pub fn seal_chained(self, chain: &mut ChainEncoder, end: bool) -> Result<SealedBlob, EncodeError> {
        let record_count = self.checked_record_count()?;
        let table_len = (self.table.len() as u32).to_le_bytes();
        // The payload goes to the compressor in its three parts, not copied into one buffer.
        let stored = chain
            .segment(&[&table_len, &self.table, &self.data], end)
            .map_err(|source| EncodeError::Compress { what: "blob", source })?;
        let codec = frame::chained_codec_byte(chain.compression()).expect("chains are compressed");
        Ok(SealedBlob::new(codec, chain.lane(), record_count, stored, self.uncompressed_len() as u64, end))
    }

    /// The uncompressed payload and the record count, checked against the format's limits.
    fn payload(self) -> Result<(Vec<u8>, u32), EncodeError> {
        let record_count = self.checked_record_count()?;
        let mut raw = Vec::with_capacity(self.uncompressed_len());
        raw.extend_from_slice(&(self.table.len() as u32).to_le_bytes());
        raw.extend_from_slice(&self.table);
        raw.extend_from_slice(&self.data);
        Ok((raw, record_count))
    }

    /// The record count, once the payload is checked against the format's limits.
    fn checked_record_count(&self) -> Result<u32, EncodeError> {
        let raw_len = self.uncompressed_len() as u64;
        if raw_len > MAX_BLOB_LEN {
            return Err(EncodeError::TooLarge { what: "blob", len: raw_len, max: MAX_BLOB_LEN });
        }
        let record_count = u32::try_from(self.records).map_err(|_| EncodeError::TooLarge {
            what: "blob record count",
            len: self.records,
            max: u32::MAX as u64,
        })?;
        Ok(record_count)
    }
}

/// A compressed, checksummed blob: what travels in a blob frame.
///
/// A chained blob (codecs 3 and 4) read from a stream was decompressed by the reader, in
/// stream order, since it continues the blobs before it; it then holds its decompressed
/// payload.
#[derive(Debug, Clone)]
pub struct SealedBlob {
    pub(crate) header: FrameHeader,
    /// The stored payload (empty for a chained blob the reader decompressed).
    pub(crate) stored: Vec<u8>,
    /// The payload, decompressed by the reader (chained blobs only).
    pub(crate) raw: Option<Vec<u8>>,
    /// A chained blob that ends its frame.
    pub(crate) chain_end: bool,
    /// Frame number and stream offset when read from a stream (for error context).
    pub(crate) frame: u64,
    pub(crate) offset: u64,
    /// In a segmented stream: the blob's number and its index entry, which its records must
    /// match ([`crate::segment::check_segment`]).
    pub(crate) segment: Option<Box<(usize, crate::segment::Segment)>>,
}

impl SealedBlob {
    fn new(codec: u8, lane: u8, record_count: u32, stored: Vec<u8>, raw_len: u64, chain_end: bool) -> Self {
        let mut header = FrameHeader {
            kind: FrameKind::Blob as u8,
            codec,
            lane,
            record_count,
            stored_len: stored.len() as u64,
            raw_len,
            checksum: [0; 16],
        };
        header.checksum = frame::frame_checksum(&header.prefix(), &stored);
        SealedBlob { header, stored, raw: None, chain_end, frame: 0, offset: 0, segment: None }
    }

    /// Size of the stored (compressed) payload.
    pub fn compressed_len(&self) -> usize {
        self.header.stored_len as usize
    }

    /// True for a segment of a chained frame (codecs 3 and 4).
    pub fn is_chained(&self) -> bool {
        frame::chained_codec_from_byte(self.header.codec).is_some()
    }

    /// The lane of a chained blob: the chain it continues (0 for other blobs).
    pub fn lane(&self) -> u8 {
        self.header.lane
    }

    /// Size of the payload after decompression.
    pub fn uncompressed_len(&self) -> usize {
        self.header.raw_len as usize
    }

    /// Number of records in the blob.
    pub fn record_count(&self) -> u64 {
        self.header.record_count as u64
    }

    /// Frame number in the stream it was read from (0 for a blob sealed locally).
    pub fn frame_index(&self) -> u64 {
        self.frame
    }

    /// Byte offset of the frame in the stream it was read from.
    pub fn stream_offset(&self) -> u64 {
        self.offset
    }

    /// Decompresses and parses the blob, checking its structure (not image bounds: see
    /// [`SealedBlob::decode_for`]).
    pub fn decode(&self, compression: Compression) -> Result<DecodedBlob, DecodeError> {
        self.check(compression)?;
        let raw = match &self.raw {
            Some(raw) => raw.clone(),
            None => self.decompress(compression)?,
        };
        DecodedBlob::parse(raw, self.header.record_count as u64, self.frame, self.offset)
    }

    /// [`SealedBlob::decode`] plus a check of every record against the overlay's images:
    /// image indexes in range and chunks inside the image (and, for base references, inside the
    /// base image); raw data lengths match the chunks they cover; patches well formed.
    pub fn decode_for(&self, meta: &OverlayMeta) -> Result<DecodedBlob, DecodeError> {
        let blob = self.decode(meta.compression)?;
        blob.validate(meta)?;
        self.check_segment(&blob)?;
        Ok(blob)
    }

    /// [`SealedBlob::decode_for`] that consumes the blob, so that a payload the reader already
    /// decompressed is not copied.
    pub fn into_decoded_for(mut self, meta: &OverlayMeta) -> Result<DecodedBlob, DecodeError> {
        self.check(meta.compression)?;
        let raw = match self.raw.take() {
            Some(raw) => raw,
            None => self.decompress(meta.compression)?,
        };
        let blob = DecodedBlob::parse(raw, self.header.record_count as u64, self.frame, self.offset)?;
        blob.validate(meta)?;
        self.check_segment(&blob)?;
        Ok(blob)
    }

    /// A blob of a segmented stream writes what its index entry says, and copies only from
    /// itself.
    fn check_segment(&self, blob: &DecodedBlob) -> Result<(), DecodeError> {
        match &self.segment {
            Some(s) => crate::segment::check_segment(blob, &s.1, s.0).map_err(|reason| DecodeError::Malformed {
                frame: self.frame,
                offset: self.offset,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Checks the codec against the overlay's, the length limit and (for a stored payload) the
    /// checksum.
    fn check(&self, compression: Compression) -> Result<(), DecodeError> {
        let (frame, offset) = (self.frame, self.offset);
        if self.raw.is_none() && frame::frame_checksum(&self.header.prefix(), &self.stored) != self.header.checksum {
            return Err(DecodeError::ChecksumMismatch { frame, offset });
        }
        let codec_ok = frame::codec_from_byte(self.header.codec) == Some(compression)
            || frame::chained_codec_from_byte(self.header.codec) == Some(compression);
        if !codec_ok {
            return Err(DecodeError::Malformed {
                frame,
                offset,
                reason: format!("blob codec {} differs from the overlay's {compression:?}", self.header.codec),
            });
        }
        if self.header.raw_len > MAX_BLOB_LEN {
            return Err(DecodeError::LengthTooLarge {
                frame,
                offset,
                what: "blob",
                len: self.header.raw_len,
                max: MAX_BLOB_LEN,
            });
        }
        Ok(())
    }

    fn decompress(&self, compression: Compression) -> Result<Vec<u8>, DecodeError> {
        let (frame, offset) = (self.frame, self.offset);
        if self.is_chained() {
            return Err(DecodeError::Malformed {
                frame,
                offset,
                reason: "a chained blob is decompressed by the reader that reads it, in stream order".into(),
            });
        }
        compress::decompress(compression, &self.stored, self.header.raw_len as usize)
            .map_err(|reason| DecodeError::Decompress { frame, offset, reason })
    }
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Zero { image: u8, chunk: u64, count: u64 },
    CopyBase { image: u8, chunk: u64, count: u64, src: ChunkRef },
    CopySelf { image: u8, chunk: u64, src: ChunkRef },
    Patch { image: u8, chunk: u64, start: usize, len: usize },
    Raw { image: u8, chunk: u64, start: usize, len: usize },
}

/// A record borrowing its bytes from a decoded blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordRef<'a> {
    /// See [`Record::Zero`].
    Zero {
        /// Target image index.
        image: u8,
        /// First chunk.
        chunk: u64,
        /// Number of chunks.
        count: u64,
    },
    /// See [`Record::CopyBase`].
    CopyBase {
        /// Target image index.
        image: u8,
        /// First chunk.
        chunk: u64,
        /// Number of chunks.
        count: u64,
        /// First source chunk in the base.
        src: ChunkRef,
    },
    /// See [`Record::CopySelf`].
    CopySelf {
        /// Target image index.
        image: u8,
        /// Target chunk.
        chunk: u64,
        /// Earlier-written source chunk.
        src: ChunkRef,
    },
    /// See [`Record::Patch`].
    Patch {
        /// Target image index.
        image: u8,
        /// Target chunk.
        chunk: u64,
        /// The encoded patch.
        patch: &'a [u8],
    },
    /// See [`Record::Raw`].
    Raw {
        /// Target image index.
        image: u8,
        /// First chunk.
        chunk: u64,
        /// The bytes.
        data: &'a [u8],
    },
}

impl RecordRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Record {
        match *self {
            RecordRef::Zero { image, chunk, count } => Record::Zero { image, chunk, count },
            RecordRef::CopyBase { image, chunk, count, src } => Record::CopyBase { image, chunk, count, src },
            RecordRef::CopySelf { image, chunk, src } => Record::CopySelf { image, chunk, src },
            RecordRef::Patch { image, chunk, patch } => Record::Patch { image, chunk, patch: patch.to_vec() },
            RecordRef::Raw { image, chunk, data } => Record::Raw { image, chunk, data: data.to_vec() },
        }
    }

    /// Target image index.
    pub fn image(&self) -> u8 {
        match *self {
            RecordRef::Zero { image, .. }
            | RecordRef::CopyBase { image, .. }
            | RecordRef::CopySelf { image, .. }
            | RecordRef::Patch { image, .. }
            | RecordRef::Raw { image, .. } => image,
        }
    }

    /// First target chunk.
    pub fn chunk(&self) -> u64 {
        match *self {
            RecordRef::Zero { chunk, .. }
            | RecordRef::CopyBase { chunk, .. }
            | RecordRef::CopySelf { chunk, .. }
            | RecordRef::Patch { chunk, .. }
            | RecordRef::Raw { chunk, .. } => chunk,
        }
    }

    /// Number of target chunks the record covers.
    pub fn chunk_count(&self) -> u64 {
        match *self {
            RecordRef::Zero { count, .. } | RecordRef::CopyBase { count, .. } => count,
            RecordRef::CopySelf { .. } | RecordRef::Patch { .. } => 1,
            RecordRef::Raw { data, .. } => (data.len() as u64).div_ceil(CHUNK_SIZE as u64),
        }
    }
}

/// A decompressed blob whose record table has been parsed and checked.
#[derive(Debug, Clone)]
pub struct DecodedBlob {
    raw: Vec<u8>,
    entries: Vec<Entry>,
    frame: u64,
    offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = (b & 0x7f) as u64;
            if shift == 63 && bits > 1 {
                return None; // overflows u64
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

impl DecodedBlob {
    fn parse(raw: Vec<u8>, record_count: u64, frame: u64, offset: u64) -> Result<Self, DecodeError> {
        let bad = |reason: String| DecodeError::Malformed { frame, offset, reason };
        if raw.len() < 4 {
            return Err(bad("blob shorter than its table length".into()));
        }
        let table_len = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes")) as u64;
        if table_len > MAX_TABLE_LEN || table_len > raw.len() as u64 - 4 {
            return Err(bad(format!("record table length {table_len} exceeds the blob")));
        }
        let table = &raw[4..4 + table_len as usize];
        let data_len = raw.len() - 4 - table_len as usize;
        let data_base = 4 + table_len as usize;
        // Each record takes at least 4 table bytes, so this bounds the allocation.
        let mut entries = Vec::with_capacity((record_count.min(table_len / 4)) as usize);
        let mut cur = Cursor { buf: table, pos: 0 };
        let mut data_pos = 0usize;
        while cur.pos < table.len() {
            let at = cur.pos;
            let short = || format!("record at table byte {at} is cut short");
            let tag = cur.byte().ok_or_else(|| bad(short()))?;
            let image = cur.byte().ok_or_else(|| bad(short()))?;
            let chunk = cur.varint().ok_or_else(|| bad(short()))?;
            let take_data = |cur: &mut Cursor, data_pos: &mut usize| -> Result<(usize, usize), DecodeError> {
                let len = cur.varint().ok_or_else(|| bad(short()))?;
                if len > (data_len - *data_pos) as u64 {
                    return Err(bad(format!("record at table byte {at} overruns the data area")));
                }
                let start = data_base + *data_pos;
                *data_pos += len as usize;
                Ok((start, len as usize))
            };
            let entry = match tag {
                TAG_ZERO | TAG_COPY_BASE => {
                    let count = cur.varint().ok_or_else(|| bad(short()))?;
                    if count == 0 {
                        return Err(bad(format!("record at table byte {at} covers no chunk")));
                    }
                    if tag == TAG_ZERO {
                        Entry::Zero { image, chunk, count }
                    } else {
                        let src_image = cur.byte().ok_or_else(|| bad(short()))?;
                        let src_chunk = cur.varint().ok_or_else(|| bad(short()))?;
                        Entry::CopyBase { image, chunk, count, src: ChunkRef { image: src_image, chunk: src_chunk } }
                    }
                }
                TAG_COPY_SELF => {
                    let src_image = cur.byte().ok_or_else(|| bad(short()))?;
                    let src_chunk = cur.varint().ok_or_else(|| bad(short()))?;
                    Entry::CopySelf { image, chunk, src: ChunkRef { image: src_image, chunk: src_chunk } }
                }
                TAG_PATCH => {
                    let (start, len) = take_data(&mut cur, &mut data_pos)?;
                    patch::check_patch(CHUNK_SIZE, &raw[start..start + len])
                        .map_err(|e| bad(format!("record at table byte {at}: {e}")))?;
                    Entry::Patch { image, chunk, start, len }
                }
                TAG_RAW => {
                    let (start, len) = take_data(&mut cur, &mut data_pos)?;
                    if len == 0 {
                        return Err(bad(format!("raw record at table byte {at} has no bytes")));
                    }
                    Entry::Raw { image, chunk, start, len }
                }
                other => return Err(bad(format!("unknown record tag {other} at table byte {at}"))),
            };
            entries.push(entry);
        }
        if data_pos != data_len {
            return Err(bad(format!("{} bytes of the data area are not used by any record", data_len - data_pos)));
        }
        if entries.len() as u64 != record_count {
            return Err(bad(format!("frame header says {record_count} records, table holds {}", entries.len())));
        }
        Ok(DecodedBlob { raw, entries, frame, offset })
    }

    /// Checks every record against the overlay's images (see [`SealedBlob::decode_for`]).
    pub fn validate(&self, meta: &OverlayMeta) -> Result<(), DecodeError> {
        let cs = CHUNK_SIZE as u64;
        let chunks_of = |size: u64| size.div_ceil(cs);
        for (i, r) in self.records().enumerate() {
            let bad = |reason: String| DecodeError::Malformed {
                frame: self.frame,
                offset: self.offset,
                reason: format!("record {i}: {reason}"),
            };
            let Some(img) = meta.images.get(r.image() as usize) else {
                return Err(bad(format!("image {} does not exist", r.image())));
            };
            let total = chunks_of(img.size);
            let end = r.chunk().checked_add(r.chunk_count()).filter(|&e| e <= total);
            if end.is_none() {
                return Err(bad(format!(
                    "chunks {}+{} outside image '{}' of {total} chunks",
                    r.chunk(),
                    r.chunk_count(),
                    img.name
                )));
            }
            match r {
                RecordRef::CopyBase { count, src, .. } => {
                    let Some(base) = meta.images.get(src.image as usize) else {
                        return Err(bad(format!("base image {} does not exist", src.image)));
                    };
                    let base_total = chunks_of(base.base_size);
                    if src.chunk.checked_add(count).is_none_or(|e| e > base_total) {
                        return Err(bad(format!(
                            "base chunks {}+{count} outside base image '{}'",
                            src.chunk, base.name
                        )));
                    }
                }
                RecordRef::CopySelf { src, .. } => {
                    let Some(s) = meta.images.get(src.image as usize) else {
                        return Err(bad(format!("source image {} does not exist", src.image)));
                    };
                    if src.chunk >= chunks_of(s.size) {
                        return Err(bad(format!("source chunk {} outside image '{}'", src.chunk, s.name)));
                    }
                }
                RecordRef::Raw { chunk, data, .. } => {
                    let start = chunk * cs;
                    let expect = (img.size - start).min(r.chunk_count() * cs);
                    if data.len() as u64 != expect {
                        return Err(bad(format!(
                            "raw run of {} bytes at chunk {chunk} should be {expect} bytes",
                            data.len()
                        )));
                    }
                }
                RecordRef::Patch { chunk, patch, .. } => {
                    let chunk_len = (img.size - chunk * cs).min(cs) as usize;
                    patch::check_patch(chunk_len, patch).map_err(|e| bad(format!("patch of chunk {chunk}: {e}")))?;
                }
                RecordRef::Zero { .. } => {}
            }
        }
        Ok(())
    }

    /// The blob's buffer, for reuse ([`OverlayReader::recycle`](crate::OverlayReader::recycle)).
    pub fn into_buffer(self) -> Vec<u8> {
        self.raw
    }

    /// The records, in order.
    pub fn records(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> + '_ {
        self.entries.iter().map(move |e| match *e {
            Entry::Zero { image, chunk, count } => RecordRef::Zero { image, chunk, count },
            Entry::CopyBase { image, chunk, count, src } => RecordRef::CopyBase { image, chunk, count, src },
            Entry::CopySelf { image, chunk, src } => RecordRef::CopySelf { image, chunk, src },
            Entry::Patch { image, chunk, start, len } => {
                RecordRef::Patch { image, chunk, patch: &self.raw[start..start + len] }
            }
            Entry::Raw { image, chunk, start, len } => {
                RecordRef::Raw { image, chunk, data: &self.raw[start..start + len] }
            }
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the blob holds no record.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
