//! Reading an overlay stream.

use std::io::{self, Read};

use crate::blob::SealedBlob;
use crate::compress::{self, ChainDecoder};
use crate::error::DecodeError;
use crate::frame::{
    self, FrameHeader, FrameKind, FORMAT_MAJOR, FORMAT_MINOR, FRAME_HEADER_LEN, HEADER_LEN, MAGIC, MAX_BLOB_LEN,
    MAX_DEVICE_STATE_LEN, MAX_INDEX_LEN, MAX_LANES, MAX_META_LEN, MAX_TRAILER_LEN, SEGMENTED_MINOR,
};
use crate::meta::{Compression, OverlayMeta, Trailer};
use crate::segment::{Head, SegmentIndex};

/// Reads an overlay from any `Read` (a file, a socket), without seeking.
///
/// Order of calls: [`OverlayReader::new`] (header and metadata), then
/// [`OverlayReader::device_state`] (optional: [`OverlayReader::next_blob`] reads it first if
/// needed and keeps it), then `next_blob` until it returns `None`, which happens once the
/// trailer has been read and checked and the stream has ended.
pub struct OverlayReader<R: Read> {
    input: R,
    offset: u64,
    frame: u64,
    meta: OverlayMeta,
    stream: blake3::Hasher,
    device_state: Option<Vec<u8>>,
    /// blake3 of the device state, once its frame was read.
    device_state_digest: Option<[u8; 32]>,
    blobs: u64,
    records: u64,
    trailer: Option<Trailer>,
    /// Minor version of the stream.
    minor: u16,
    /// The segment index of a segmented (1.3) stream, once read (with the device state).
    index: Option<SegmentIndex>,
    /// Decoders of chained blobs, one per lane, made at the lane's first blob.
    chains: [Option<ChainDecoder>; MAX_LANES as usize],
    /// Buffers handed back with [`OverlayReader::recycle`], for chained blobs' bytes.
    spare: Vec<Vec<u8>>,
    /// The stored payload buffer of the last chained blob, for the next frame's payload.
    scratch: Vec<u8>,
}

/// Buffers [`OverlayReader::recycle`] keeps at most: a reader uses one per chained blob, and
/// gets one back per blob its caller is done with.
const MAX_SPARE: usize = 4;

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], offset: u64) -> Result<bool, DecodeError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return if got == 0 {
                    Ok(false)
                } else {
                    Err(DecodeError::Truncated { offset: offset + got as u64, what: "more bytes" })
                };
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(DecodeError::Io { offset: offset + got as u64, source }),
        }
    }
    Ok(true)
}

impl<R: Read> OverlayReader<R> {
    /// Reads and checks the file header and the metadata frame.
    pub fn new(mut input: R) -> Result<Self, DecodeError> {
        let mut header = [0u8; HEADER_LEN];
        if !read_full(&mut input, &mut header, 0)? {
            return Err(DecodeError::Truncated { offset: 0, what: "the file header" });
        }
        let magic: [u8; 8] = header[..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let major = u16::from_le_bytes([header[8], header[9]]);
        let minor = u16::from_le_bytes([header[10], header[11]]);
        if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
            return Err(DecodeError::UnsupportedVersion { major, minor });
        }
        if header[12..16] != [0; 4] {
            return Err(DecodeError::Malformed {
                frame: 0,
                offset: 12,
                reason: "reserved header flags are not zero".into(),
            });
        }
        let mut stream = blake3::Hasher::new();
        stream.update(&header);
        let mut r = OverlayReader {
            input,
            offset: HEADER_LEN as u64,
            frame: 0,
            meta: placeholder_meta(),
            stream,
            device_state: None,
            device_state_digest: None,
            blobs: 0,
            records: 0,
            trailer: None,
            minor,
            index: None,
            chains: Default::default(),
            spare: Vec::new(),
            scratch: Vec::new(),
        };
        let (h, at, payload) = r.read_frame("metadata")?;
        r.expect_kind(&h, at, FrameKind::Meta, "metadata")?;
        r.expect_uncompressed(&h, at, &payload)?;
        let meta: OverlayMeta = postcard::from_bytes(&payload).map_err(|e| DecodeError::Malformed {
            frame: 0,
            offset: at,
            reason: format!("metadata does not decode: {e}"),
        })?;
        crate::meta::check_meta(&meta).map_err(|reason| DecodeError::Malformed {
            frame: 0,
            offset: at,
            reason: format!("metadata: {reason}"),
        })?;
        r.meta = meta;
        Ok(r)
    }

    /// The overlay's metadata.
    pub fn meta(&self) -> &OverlayMeta {
        &self.meta
    }

    /// The format version of the stream (major, minor), from its header.
    pub fn version(&self) -> (u16, u16) {
        (FORMAT_MAJOR, self.minor)
    }

    /// Bytes consumed from the input so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// The trailer, once [`OverlayReader::next_blob`] has returned `None`.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// Blobs read so far.
    pub fn blob_count(&self) -> u64 {
        self.blobs
    }

    /// The device state (reads its frame if not read yet). Empty after
    /// [`OverlayReader::take_device_state`].
    pub fn device_state(&mut self) -> Result<&[u8], DecodeError> {
        if self.device_state_digest.is_none() {
            let (h, at, stored) = self.read_frame("the device state")?;
            self.expect_kind(&h, at, FrameKind::DeviceState, "device-state")?;
            let frame = self.frame - 1;
            if frame::codec_from_byte(h.codec) != Some(self.meta.compression) {
                return Err(DecodeError::Malformed {
                    frame,
                    offset: at,
                    reason: "device state codec differs from the overlay's".into(),
                });
            }
            let raw = compress::decompress_growing(self.meta.compression, &stored, h.raw_len as usize)
                .map_err(|reason| DecodeError::Decompress { frame, offset: at, reason })?;
            self.device_state_digest = Some(*blake3::hash(&raw).as_bytes());
            self.device_state = Some(raw);
            if self.minor >= SEGMENTED_MINOR {
                self.read_index()?;
            }
        }
        Ok(self.device_state.as_deref().unwrap_or_default())
    }

    /// Reads the index frame, which follows the device state in a segmented stream.
    fn read_index(&mut self) -> Result<(), DecodeError> {
        let (h, at, payload) = self.read_frame("the segment index")?;
        self.expect_kind(&h, at, FrameKind::Index, "index")?;
        self.expect_uncompressed(&h, at, &payload)?;
        let frame = self.frame - 1;
        let bad = |reason: String| DecodeError::Malformed { frame, offset: at, reason };
        let index: SegmentIndex =
            postcard::from_bytes(&payload).map_err(|e| bad(format!("index does not decode: {e}")))?;
        index.check(&self.meta).map_err(|r| bad(format!("index: {r}")))?;
        self.index = Some(index);
        Ok(())
    }

    /// The segment index of a segmented (1.3) stream, read with the device state (so after
    /// [`OverlayReader::device_state`]); `None` for other streams.
    pub fn index(&self) -> Option<&SegmentIndex> {
        self.index.as_ref()
    }

    /// Ends reading a segmented stream after its head (header, metadata, device state and
    /// index, which this reads if not read yet): what is needed to check its trailer and read
    /// its segments in any order. Fails for a stream that is not segmented, or whose blobs
    /// were already read from.
    pub fn into_head(mut self) -> Result<Head, DecodeError> {
        self.device_state()?;
        let (Some(index), Some(device_state), Some(digest)) =
            (self.index.take(), self.device_state.take(), self.device_state_digest)
        else {
            return Err(DecodeError::Malformed {
                frame: self.frame,
                offset: self.offset,
                reason: format!(
                    "format 1.{} overlay has no segment index: it cannot be read before it has all arrived",
                    self.minor
                ),
            });
        };
        if self.blobs > 0 {
            return Err(DecodeError::Malformed {
                frame: self.frame,
                offset: self.offset,
                reason: "blobs were read already".into(),
            });
        }
        Ok(Head {
            meta: self.meta,
            device_state,
            index,
            len: self.offset,
            stream: self.stream,
            device_state_digest: digest,
        })
    }

    /// Takes the device state out of the reader (reading it first if needed).
    pub fn take_device_state(&mut self) -> Result<Vec<u8>, DecodeError> {
        self.device_state()?;
        Ok(self.device_state.take().unwrap_or_default())
    }

    /// The next blob, checksum verified but not decompressed (decompress with
    /// [`SealedBlob::decode_for`], possibly on another thread); `None` after the trailer.
    pub fn next_blob(&mut self) -> Result<Option<SealedBlob>, DecodeError> {
        if self.trailer.is_some() {
            return Ok(None);
        }
        if self.device_state_digest.is_none() {
            self.device_state()?;
        }
        let (h, at, stored) = self.read_frame("a blob or the trailer")?;
        let frame = self.frame - 1;
        match FrameKind::from_u8(h.kind) {
            Some(FrameKind::Blob) => {
                let segment = match &self.index {
                    Some(index) => {
                        let Some(s) = index.segments.get(self.blobs as usize) else {
                            return Err(DecodeError::Malformed {
                                frame,
                                offset: at,
                                reason: format!(
                                    "blob {} of a stream whose index has {}",
                                    self.blobs,
                                    index.segments.len()
                                ),
                            });
                        };
                        if s.header() != h {
                            return Err(DecodeError::Malformed {
                                frame,
                                offset: at,
                                reason: format!("blob {}: its frame header is not the one the index holds", self.blobs),
                            });
                        }
                        Some(Box::new((self.blobs as usize, s.clone())))
                    }
                    None => None,
                };
                self.blobs += 1;
                self.records += h.record_count as u64;
                let mut blob =
                    SealedBlob { header: h, stored, raw: None, chain_end: false, frame, offset: at, segment };
                if blob.is_chained() {
                    self.decode_chained(&mut blob)?;
                }
                Ok(Some(blob))
            }
            Some(FrameKind::Trailer) => {
                self.finish_trailer(&h, at, &stored)?;
                Ok(None)
            }
            _ => Err(DecodeError::UnexpectedFrame { frame, offset: at, expected: "blob or trailer", found: h.kind }),
        }
    }

    /// Hands back the buffer of a blob that is done with (see [`DecodedBlob::into_buffer`]),
    /// to hold the bytes of a chained blob read later: a reader that decompresses hundreds of
    /// blobs of megabytes then maps no new memory for each.
    ///
    /// [`DecodedBlob::into_buffer`]: crate::DecodedBlob::into_buffer
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE && buf.capacity() > 0 {
            self.spare.push(buf);
        }
    }

    /// Decompresses a chained blob, which continues the chained blobs before it (so this
    /// happens here, in stream order).
    fn decode_chained(&mut self, blob: &mut SealedBlob) -> Result<(), DecodeError> {
        let (frame, offset) = (blob.frame, blob.offset);
        if frame::chained_codec_from_byte(blob.header.codec) != Some(self.meta.compression) {
            return Err(DecodeError::Malformed {
                frame,
                offset,
                reason: format!(
                    "chained blob of codec {} in an overlay that uses {:?}",
                    blob.header.codec, self.meta.compression
                ),
            });
        }
        // The lane was bounded by read_frame.
        let chain = match &mut self.chains[usize::from(blob.header.lane)] {
            Some(c) => c,
            slot => {
                let c = ChainDecoder::new(self.meta.compression).map_err(|reason| DecodeError::Decompress {
                    frame,
                    offset,
                    reason,
                })?;
                slot.insert(c)
            }
        };
        // raw_len was bounded by read_frame.
        let out = self.spare.pop().unwrap_or_default();
        let raw = chain
            .segment(&blob.stored, blob.header.raw_len as usize, out)
            .map_err(|reason| DecodeError::Decompress { frame, offset, reason })?;
        blob.chain_end = !chain.is_open();
        self.scratch = std::mem::take(&mut blob.stored);
        blob.raw = Some(raw);
        Ok(())
    }

    fn finish_trailer(&mut self, h: &FrameHeader, at: u64, payload: &[u8]) -> Result<(), DecodeError> {
        self.expect_uncompressed(h, at, payload)?;
        let mismatch = |reason: String| DecodeError::TrailerMismatch { offset: at, reason };
        if let Some(lane) = self.chains.iter().position(|c| c.as_ref().is_some_and(ChainDecoder::is_open)) {
            return Err(mismatch(format!("the chained frame of lane {lane} does not end before the trailer")));
        }
        if payload.len() < 32 {
            return Err(mismatch("trailer shorter than its stream digest".into()));
        }
        let stream = self.stream.finalize();
        if payload[..32] != *stream.as_bytes() {
            return Err(mismatch("stream digest differs: frames were dropped, added or reordered".into()));
        }
        let trailer: Trailer =
            postcard::from_bytes(&payload[32..]).map_err(|e| mismatch(format!("trailer does not decode: {e}")))?;
        if let Some(index) = &self.index {
            if index.segments.len() as u64 != self.blobs {
                return Err(mismatch(format!(
                    "{} blobs in the stream, the index has {}",
                    self.blobs,
                    index.segments.len()
                )));
            }
        }
        if trailer.blob_count != self.blobs {
            return Err(mismatch(format!("{} blobs in the stream, trailer says {}", self.blobs, trailer.blob_count)));
        }
        if trailer.record_count != self.records {
            return Err(mismatch(format!(
                "{} records in the stream, trailer says {}",
                self.records, trailer.record_count
            )));
        }
        if trailer.image_digests.len() != self.meta.images.len() {
            return Err(mismatch(format!(
                "{} image digests for {} images",
                trailer.image_digests.len(),
                self.meta.images.len()
            )));
        }
        if self.device_state_digest != Some(trailer.device_state_digest) {
            return Err(mismatch("device state digest differs".into()));
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.input, &mut extra, self.offset)? {
            return Err(DecodeError::TrailingData { offset: self.offset });
        }
        self.trailer = Some(trailer);
        Ok(())
    }

    fn expect_kind(&self, h: &FrameHeader, at: u64, kind: FrameKind, name: &'static str) -> Result<(), DecodeError> {
        if h.kind != kind as u8 {
            return Err(DecodeError::UnexpectedFrame {
                frame: self.frame - 1,
                offset: at,
                expected: name,
                found: h.kind,
            });
        }
        Ok(())
    }

    fn expect_uncompressed(&self, h: &FrameHeader, at: u64, payload: &[u8]) -> Result<(), DecodeError> {
        if h.codec != 0 || h.raw_len != payload.len() as u64 || h.record_count != 0 {
            return Err(DecodeError::Malformed {
                frame: self.frame - 1,
                offset: at,
                reason: "metadata and trailer frames must be stored uncompressed, with no records".into(),
            });
        }
        Ok(())
    }

    /// Reads one frame header and its payload, checking the limits and the checksum.
    fn read_frame(&mut self, what: &'static str) -> Result<(FrameHeader, u64, Vec<u8>), DecodeError> {
        let at = self.offset;
        let frame = self.frame;
        let mut hb = [0u8; FRAME_HEADER_LEN];
        if !read_full(&mut self.input, &mut hb, at)? {
            return Err(DecodeError::Truncated { offset: at, what });
        }
        self.offset += FRAME_HEADER_LEN as u64;
        let h = FrameHeader::decode(&hb).map_err(|reason| DecodeError::Malformed {
            frame,
            offset: at,
            reason: reason.into(),
        })?;
        let Some(kind) = FrameKind::from_u8(h.kind) else {
            return Err(DecodeError::UnexpectedFrame { frame, offset: at, expected: what, found: h.kind });
        };
        // Chained blobs came with 1.1; segmented streams (1.3) hold only blobs that decode alone.
        let chained = frame::chained_codec_from_byte(h.codec).is_some()
            && kind == FrameKind::Blob
            && (1..SEGMENTED_MINOR).contains(&self.minor);
        if kind == FrameKind::Index && self.minor < SEGMENTED_MINOR {
            return Err(DecodeError::UnexpectedFrame { frame, offset: at, expected: what, found: h.kind });
        }
        if frame::codec_from_byte(h.codec).is_none() && !chained {
            return Err(DecodeError::Malformed { frame, offset: at, reason: format!("unknown codec {}", h.codec) });
        }
        if h.lane != 0 && !(chained && self.minor == 2 && h.lane < MAX_LANES) {
            let reason = if chained && self.minor == 2 {
                format!("lane {} is not below {MAX_LANES}", h.lane)
            } else {
                format!("lane {} on a frame that is not a chained blob of a 1.2 stream", h.lane)
            };
            return Err(DecodeError::Malformed { frame, offset: at, reason });
        }
        let (raw_max, name) = match kind {
            FrameKind::Meta => (MAX_META_LEN, "metadata"),
            FrameKind::DeviceState => (MAX_DEVICE_STATE_LEN, "device state"),
            FrameKind::Blob => (MAX_BLOB_LEN, "blob"),
            FrameKind::Trailer => (MAX_TRAILER_LEN, "trailer"),
            FrameKind::Index => (MAX_INDEX_LEN, "index"),
        };
        if h.raw_len > raw_max {
            return Err(DecodeError::LengthTooLarge { frame, offset: at, what: name, len: h.raw_len, max: raw_max });
        }
        let stored_max = if h.codec == 0 { h.raw_len } else { frame::max_stored(h.raw_len) };
        if h.stored_len > stored_max {
            return Err(DecodeError::LengthTooLarge {
                frame,
                offset: at,
                what: "stored payload",
                len: h.stored_len,
                max: stored_max,
            });
        }
        // Grow the buffer as bytes arrive, so a lying length on a short stream costs nothing.
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        if payload.capacity() == 0 {
            payload.reserve(h.stored_len.min(1 << 20) as usize);
        }
        let got = (&mut self.input)
            .take(h.stored_len)
            .read_to_end(&mut payload)
            .map_err(|source| DecodeError::Io { offset: self.offset, source })?;
        if (got as u64) < h.stored_len {
            return Err(DecodeError::Truncated {
                offset: self.offset + got as u64,
                what: "the rest of a frame payload",
            });
        }
        self.offset += h.stored_len;
        if frame::frame_checksum(&h.prefix(), &payload) != h.checksum {
            return Err(DecodeError::ChecksumMismatch { frame, offset: at });
        }
        if kind != FrameKind::Trailer {
            self.stream.update(&hb);
        }
        self.frame += 1;
        Ok((h, at, payload))
    }
}

fn placeholder_meta() -> OverlayMeta {
    OverlayMeta {
        base_id: crate::BaseId([0; 32]),
        spec: crate::VmSpec {
            machine_type: String::new(),
            cpu_model: String::new(),
            vcpus: 0,
            ram_bytes: 0,
            qemu_version: String::new(),
            accelerator: String::new(),
            disks: Vec::new(),
            kernel_cmdline: None,
        },
        images: Vec::new(),
        compression: Compression::None,
        forwards: Vec::new(),
        name: String::new(),
        created_unix: 0,
        creator: String::new(),
    }
}
