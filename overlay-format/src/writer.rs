//! Writing an overlay stream.

use std::io::Write;

use crate::blob::SealedBlob;
use crate::compress;
use crate::error::EncodeError;
use crate::frame::{self, FrameHeader, FrameKind, MAX_DEVICE_STATE_LEN};
use crate::meta::{Compression, OverlayMeta, Trailer};
use crate::segment::SegmentIndex;

/// Writes an overlay: header and metadata on creation, then the device state, blobs, and the
/// trailer on [`OverlayWriter::finish`]. Needs only `Write` (a file, a socket, a pipe).
pub struct OverlayWriter<W: Write> {
    out: W,
    compression: Compression,
    images: usize,
    /// blake3 over the file header and every frame header written, for the trailer.
    stream: blake3::Hasher,
    device_state_digest: Option<[u8; 32]>,
    /// Per lane: a chained blob was written and the lane's chained frame has not ended.
    chain_open: [bool; frame::MAX_LANES as usize],
    blobs: u64,
    records: u64,
    bytes: u64,
    /// A segmented (1.3) stream: its metadata, for checking the index, and the index once
    /// written.
    segmented: Option<(Box<OverlayMeta>, Option<SegmentIndex>)>,
}

impl<W: Write> OverlayWriter<W> {
    /// Writes the file header and the metadata frame.
    pub fn new(out: W, meta: &OverlayMeta) -> Result<Self, EncodeError> {
        // Only compressed overlays can hold chained blobs (1.1) and lanes of them (1.2).
        let minor = if meta.compression == Compression::None { 0 } else { frame::CHAINED_MINOR };
        Self::start(out, meta, minor)
    }

    /// Writes the header and metadata of a segmented overlay (format 1.3): the device state
    /// must be followed by [`OverlayWriter::write_index`], and then exactly the blobs the index
    /// names, in its order (see [`crate::segment`]).
    pub fn new_segmented(out: W, meta: &OverlayMeta) -> Result<Self, EncodeError> {
        let mut w = Self::start(out, meta, frame::SEGMENTED_MINOR)?;
        w.segmented = Some((Box::new(meta.clone()), None));
        Ok(w)
    }

    fn start(mut out: W, meta: &OverlayMeta, minor: u16) -> Result<Self, EncodeError> {
        crate::meta::check_meta(meta).map_err(|reason| EncodeError::Invalid { what: "meta", reason })?;
        let payload =
            postcard::to_stdvec(meta).map_err(|e| EncodeError::Invalid { what: "meta", reason: e.to_string() })?;
        if payload.len() as u64 > frame::MAX_META_LEN {
            return Err(EncodeError::TooLarge {
                what: "metadata",
                len: payload.len() as u64,
                max: frame::MAX_META_LEN,
            });
        }
        let header = frame::file_header(minor);
        out.write_all(&header).map_err(EncodeError::Io)?;
        let mut w = OverlayWriter {
            out,
            compression: meta.compression,
            images: meta.images.len(),
            stream: blake3::Hasher::new(),
            device_state_digest: None,
            chain_open: [false; frame::MAX_LANES as usize],
            blobs: 0,
            records: 0,
            bytes: header.len() as u64,
            segmented: None,
        };
        w.stream.update(&header);
        w.frame(FrameKind::Meta, Compression::None, 0, payload.len() as u64, &payload)?;
        Ok(w)
    }

    fn frame(
        &mut self,
        kind: FrameKind,
        codec: Compression,
        record_count: u32,
        raw_len: u64,
        stored: &[u8],
    ) -> Result<(), EncodeError> {
        let mut h = FrameHeader {
            kind: kind as u8,
            codec: frame::codec_byte(codec),
            lane: 0,
            record_count,
            stored_len: stored.len() as u64,
            raw_len,
            checksum: [0; 16],
        };
        h.checksum = frame::frame_checksum(&h.prefix(), stored);
        self.write_frame(&h, stored)
    }

    fn write_frame(&mut self, h: &FrameHeader, stored: &[u8]) -> Result<(), EncodeError> {
        let hb = h.encode();
        if h.kind != FrameKind::Trailer as u8 {
            self.stream.update(&hb);
        }
        self.out.write_all(&hb).map_err(EncodeError::Io)?;
        self.out.write_all(stored).map_err(EncodeError::Io)?;
        self.bytes += (hb.len() + stored.len()) as u64;
        Ok(())
    }

    /// Writes the device-state frame, compressed with the overlay's compressor at `level`.
    /// Exactly once, before the first blob.
    pub fn write_device_state(&mut self, state: &[u8], level: i32) -> Result<(), EncodeError> {
        if self.device_state_digest.is_some() {
            return Err(EncodeError::Order { reason: "device state written twice" });
        }
        if self.blobs > 0 {
            return Err(EncodeError::Order { reason: "device state must precede the blobs" });
        }
        if state.len() as u64 > MAX_DEVICE_STATE_LEN {
            return Err(EncodeError::TooLarge {
                what: "device state",
                len: state.len() as u64,
                max: MAX_DEVICE_STATE_LEN,
            });
        }
        let stored = compress::compress(self.compression, &compress::Effort::level(level), state)
            .map_err(|source| EncodeError::Compress { what: "device state", source })?;
        self.frame(FrameKind::DeviceState, self.compression, 0, state.len() as u64, &stored)?;
        self.device_state_digest = Some(*blake3::hash(state).as_bytes());
        Ok(())
    }

    /// Writes the index of a segmented overlay, after the device state.
    pub fn write_index(&mut self, index: &SegmentIndex) -> Result<(), EncodeError> {
        let Some((meta, written)) = &self.segmented else {
            return Err(EncodeError::Order { reason: "only a segmented overlay has an index" });
        };
        if written.is_some() {
            return Err(EncodeError::Order { reason: "index written twice" });
        }
        if self.device_state_digest.is_none() {
            return Err(EncodeError::Order { reason: "the device state must be written before the index" });
        }
        index.check(meta).map_err(|reason| EncodeError::Invalid { what: "index", reason })?;
        let payload =
            postcard::to_stdvec(index).map_err(|e| EncodeError::Invalid { what: "index", reason: e.to_string() })?;
        if payload.len() as u64 > frame::MAX_INDEX_LEN {
            return Err(EncodeError::TooLarge { what: "index", len: payload.len() as u64, max: frame::MAX_INDEX_LEN });
        }
        self.frame(FrameKind::Index, Compression::None, 0, payload.len() as u64, &payload)?;
        if let Some((_, written)) = &mut self.segmented {
            *written = Some(index.clone());
        }
        Ok(())
    }

    /// Writes one sealed blob (sealed with the overlay's compressor, alone or with
    /// [`BlobBuilder::seal_chained`](crate::BlobBuilder::seal_chained)). The chained blobs of
    /// a lane must be written in the order they were sealed; lanes may interleave freely.
    pub fn write_blob(&mut self, blob: &SealedBlob) -> Result<(), EncodeError> {
        if self.device_state_digest.is_none() {
            return Err(EncodeError::Order { reason: "the device state must be written before blobs" });
        }
        if let Some((_, index)) = &self.segmented {
            let Some(index) = index else {
                return Err(EncodeError::Order { reason: "a segmented overlay's index must precede its blobs" });
            };
            let Some(s) = index.segments.get(self.blobs as usize) else {
                return Err(EncodeError::Invalid {
                    what: "blob",
                    reason: format!(
                        "blob {} of a segmented overlay whose index has {}",
                        self.blobs,
                        index.segments.len()
                    ),
                });
            };
            if s.header() != blob.header {
                return Err(EncodeError::Invalid {
                    what: "blob",
                    reason: format!("blob {} is not the one its index entry describes", self.blobs),
                });
            }
        }
        let chained = blob.is_chained();
        if chained && frame::chained_codec_from_byte(blob.header.codec) != Some(self.compression) {
            return Err(EncodeError::Invalid {
                what: "blob",
                reason: format!("chained blob of codec {}, overlay uses {:?}", blob.header.codec, self.compression),
            });
        }
        if !chained && blob.header.codec != frame::codec_byte(self.compression) {
            return Err(EncodeError::Invalid {
                what: "blob",
                reason: format!("sealed with codec {}, overlay uses {:?}", blob.header.codec, self.compression),
            });
        }
        let lane = usize::from(blob.header.lane);
        if lane >= self.chain_open.len() || (lane != 0 && !chained) {
            return Err(EncodeError::Invalid {
                what: "blob",
                reason: format!("lane {lane} on a blob of codec {}", blob.header.codec),
            });
        }
        self.write_frame(&blob.header, &blob.stored)?;
        if chained {
            self.chain_open[lane] = !blob.chain_end;
        }
        self.blobs += 1;
        self.records += blob.header.record_count as u64;
        Ok(())
    }

    /// Blobs written so far.
    pub fn blob_count(&self) -> u64 {
        self.blobs
    }

    /// Records written so far.
    pub fn record_count(&self) -> u64 {
        self.records
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// blake3 of the device state written, if any.
    pub fn device_state_digest(&self) -> Option<[u8; 32]> {
        self.device_state_digest
    }

    /// Writes the trailer, flushes, and returns the writer. The trailer's counts and device
    /// state digest must match what was written.
    pub fn finish(mut self, trailer: &Trailer) -> Result<W, EncodeError> {
        let Some(ds) = self.device_state_digest else {
            return Err(EncodeError::Order { reason: "no device state was written" });
        };
        if self.chain_open.contains(&true) {
            return Err(EncodeError::Order {
                reason: "a chained frame was not ended: seal the last chained blob of every lane with `end`",
            });
        }
        let mismatch = |reason: String| EncodeError::Invalid { what: "trailer", reason };
        if let Some((_, index)) = &self.segmented {
            let segments = index.as_ref().map_or(0, |i| i.segments.len() as u64);
            if index.is_none() || segments != self.blobs {
                return Err(mismatch(format!("{} blobs written for an index of {segments}", self.blobs)));
            }
        }
        if trailer.blob_count != self.blobs {
            return Err(mismatch(format!("blob_count {} but {} written", trailer.blob_count, self.blobs)));
        }
        if trailer.record_count != self.records {
            return Err(mismatch(format!("record_count {} but {} written", trailer.record_count, self.records)));
        }
        if trailer.image_digests.len() != self.images {
            return Err(mismatch(format!("{} image digests for {} images", trailer.image_digests.len(), self.images)));
        }
        if trailer.device_state_digest != ds {
            return Err(mismatch("device_state_digest differs from the device state written".into()));
        }
        let mut payload = self.stream.finalize().as_bytes().to_vec();
        postcard::to_io(trailer, &mut payload).map_err(|e| mismatch(e.to_string()))?;
        self.frame(FrameKind::Trailer, Compression::None, 0, payload.len() as u64, &payload)?;
        self.out.flush().map_err(EncodeError::Io)?;
        Ok(self.out)
    }

    /// Builds the trailer from the counts written so far and the given image digests.
    pub fn trailer(&self, image_digests: Vec<crate::ImageDigest>) -> Trailer {
        Trailer {
            image_digests,
            device_state_digest: self.device_state_digest.unwrap_or([0; 32]),
            blob_count: self.blobs,
            record_count: self.records,
        }
    }
}
