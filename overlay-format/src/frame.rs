//! The file header and frame headers (see `FORMAT.md`).

use crate::meta::Compression;

/// The 8 magic bytes that open an overlay: `\x89 O V L \r \n \x1a \n`, PNG style.
pub const MAGIC: [u8; 8] = [0x89, b'O', b'V', b'L', b'\r', b'\n', 0x1a, b'\n'];
/// Major format version written and read.
pub const FORMAT_MAJOR: u16 = 1;
/// Highest minor format version this reader understands. Writers mark segmented overlays 1.3
/// (an index after the device state; see [`crate::segment`]), other compressed overlays 1.2
/// (they may hold chained blobs, codecs 3 and 4, in several lanes) and uncompressed ones 1.0.
pub const FORMAT_MINOR: u16 = 3;
/// The minor version of segmented overlays, the first to have an index frame.
pub const SEGMENTED_MINOR: u16 = 3;
/// The minor version compressed overlays without an index are marked with.
pub(crate) const CHAINED_MINOR: u16 = 2;
/// Most chains (lanes) of chained blobs an overlay may hold (format 1.2): a reader keeps one
/// decoder per lane, each with a window of up to 128 MiB.
pub const MAX_LANES: u8 = 4;

/// Codec byte of a blob that is a segment of a chained frame of `c` (format 1.1).
pub(crate) fn chained_codec_byte(c: Compression) -> Option<u8> {
    match c {
        Compression::Zstd => Some(3),
        Compression::Xz => Some(4),
        Compression::None => None,
    }
}

/// The compressor of a chained codec byte.
pub(crate) fn chained_codec_from_byte(b: u8) -> Option<Compression> {
    match b {
        3 => Some(Compression::Zstd),
        4 => Some(Compression::Xz),
        _ => None,
    }
}
/// Length of the file header.
pub const HEADER_LEN: usize = 16;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 40;

/// Largest metadata payload.
pub const MAX_META_LEN: u64 = 1 << 20;
/// Largest trailer payload.
pub const MAX_TRAILER_LEN: u64 = 1 << 20;
/// Largest index payload (format 1.3).
pub const MAX_INDEX_LEN: u64 = 16 << 20;
/// Largest device-state blob (uncompressed).
pub const MAX_DEVICE_STATE_LEN: u64 = 512 << 20;
/// Largest uncompressed blob payload.
pub const MAX_BLOB_LEN: u64 = 64 << 20;
/// Largest record table in a blob.
pub const MAX_TABLE_LEN: u64 = 16 << 20;
/// Most images an overlay may rebuild.
pub const MAX_IMAGES: usize = 64;
/// Largest image size (2^52 bytes = 4 PiB): chunk numbers stay far from overflow.
pub const MAX_IMAGE_SIZE: u64 = 1 << 52;

/// Stored (possibly compressed) payloads may exceed their raw length by this much.
pub(crate) fn max_stored(raw_max: u64) -> u64 {
    raw_max + raw_max / 64 + (64 << 10)
}

/// Frame kinds. 0 is reserved so that a zeroed frame header is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Metadata (postcard [`crate::OverlayMeta`]).
    Meta = 1,
    /// The QEMU device state.
    DeviceState = 2,
    /// A blob of records.
    Blob = 3,
    /// The trailer.
    Trailer = 4,
    /// The segment index (format 1.3; postcard [`crate::SegmentIndex`]).
    Index = 5,
}

impl FrameKind {
    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Meta,
            2 => FrameKind::DeviceState,
            3 => FrameKind::Blob,
            4 => FrameKind::Trailer,
            5 => FrameKind::Index,
            _ => return None,
        })
    }
}

pub(crate) fn codec_byte(c: Compression) -> u8 {
    match c {
        Compression::None => 0,
        Compression::Zstd => 1,
        Compression::Xz => 2,
    }
}

pub(crate) fn codec_from_byte(b: u8) -> Option<Compression> {
    Some(match b {
        0 => Compression::None,
        1 => Compression::Zstd,
        2 => Compression::Xz,
        _ => return None,
    })
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub kind: u8,
    pub codec: u8,
    /// The chain a chained blob continues (format 1.2); 0 otherwise.
    pub lane: u8,
    pub record_count: u32,
    pub stored_len: u64,
    pub raw_len: u64,
    pub checksum: [u8; 16],
}

impl FrameHeader {
    /// Bytes 0..24, the part the checksum covers.
    pub fn prefix(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = self.kind;
        b[1] = self.codec;
        b[2] = self.lane;
        // b[3] reserved, zero
        b[4..8].copy_from_slice(&self.record_count.to_le_bytes());
        b[8..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.raw_len.to_le_bytes());
        b
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[..24].copy_from_slice(&self.prefix());
        b[24..].copy_from_slice(&self.checksum);
        b
    }

    /// Parses the fixed fields; `Err(reason)` when the reserved byte is not zero. The lane is
    /// checked by the reader, which knows the stream's version and the frame's codec.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<Self, &'static str> {
        if b[3] != 0 {
            return Err("reserved frame header byte is not zero");
        }
        let mut checksum = [0u8; 16];
        checksum.copy_from_slice(&b[24..40]);
        Ok(FrameHeader {
            kind: b[0],
            codec: b[1],
            lane: b[2],
            record_count: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            stored_len: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            raw_len: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            checksum,
        })
    }
}

/// Checksum of a frame: blake3 over header bytes 0..24 then the stored payload, first 16 bytes.
pub(crate) fn frame_checksum(prefix: &[u8; 24], payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(prefix);
    h.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The file header of a stream of minor version `minor`.
pub(crate) fn file_header(minor: u16) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    b[10..12].copy_from_slice(&minor.to_le_bytes());
    b
}
