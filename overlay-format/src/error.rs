//! Errors of encoding, decoding and patching.

use std::io;

/// Error while writing an overlay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The underlying writer failed.
    #[error("cannot write the overlay")]
    Io(#[source] io::Error),
    /// Compressing a payload failed.
    #[error("cannot compress the {what}")]
    Compress {
        /// What was being compressed.
        what: &'static str,
        /// The compressor's error.
        #[source]
        source: io::Error,
    },
    /// A value is over a format limit.
    #[error("{what} is {len} bytes, over the format limit of {max}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Frames were written out of the order the format requires.
    #[error("frames out of order: {reason}")]
    Order {
        /// What went wrong.
        reason: &'static str,
    },
    /// The metadata or trailer is not consistent with what was written.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// `meta`, `trailer` or `record`.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Error while reading an overlay. Offsets are byte offsets in the overlay stream; frame
/// numbers count from 0 (the metadata frame).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The underlying reader failed.
    #[error("cannot read the overlay at byte {offset}")]
    Io {
        /// Stream offset of the read.
        offset: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// The stream ended early.
    #[error("overlay truncated at byte {offset}: expected {what}")]
    Truncated {
        /// Stream offset where more bytes were expected.
        offset: u64,
        /// What was expected.
        what: &'static str,
    },
    /// The first 8 bytes are not the overlay magic.
    #[error("not an overlay: bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A format version this reader does not support.
    #[error(
        "unsupported overlay format version {major}.{minor} (this reader supports {}.0 to {}.{})",
        crate::FORMAT_MAJOR,
        crate::FORMAT_MAJOR,
        crate::FORMAT_MINOR
    )]
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
    /// A length field is over the format limit.
    #[error("frame {frame} at byte {offset}: {what} of {len} bytes is over the limit of {max}")]
    LengthTooLarge {
        /// Frame number.
        frame: u64,
        /// Stream offset of the frame header.
        offset: u64,
        /// Which length.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A frame's checksum does not match its header and payload.
    #[error("frame {frame} at byte {offset}: checksum mismatch")]
    ChecksumMismatch {
        /// Frame number.
        frame: u64,
        /// Stream offset of the frame header.
        offset: u64,
    },
    /// A frame of another kind than the format's order allows.
    #[error("frame {frame} at byte {offset}: expected a {expected} frame, found kind {found}")]
    UnexpectedFrame {
        /// Frame number.
        frame: u64,
        /// Stream offset of the frame header.
        offset: u64,
        /// The frame kind(s) allowed here.
        expected: &'static str,
        /// The kind byte found.
        found: u8,
    },
    /// A payload could not be decompressed to its declared length.
    #[error("frame {frame} at byte {offset}: cannot decompress: {reason}")]
    Decompress {
        /// Frame number.
        frame: u64,
        /// Stream offset of the frame header.
        offset: u64,
        /// What the decompressor said.
        reason: String,
    },
    /// A frame's content breaks a rule of the format.
    #[error("frame {frame} at byte {offset}: {reason}")]
    Malformed {
        /// Frame number.
        frame: u64,
        /// Stream offset of the frame header.
        offset: u64,
        /// The rule broken.
        reason: String,
    },
    /// Bytes follow the trailer.
    #[error("unexpected data after the trailer at byte {offset}")]
    TrailingData {
        /// Stream offset of the first extra byte.
        offset: u64,
    },
    /// The trailer does not match what the stream held.
    #[error("trailer at byte {offset}: {reason}")]
    TrailerMismatch {
        /// Stream offset of the trailer frame.
        offset: u64,
        /// What differs.
        reason: String,
    },
    /// A call out of order (e.g. reading a blob after the trailer).
    #[error("reader misuse: {reason}")]
    Misuse {
        /// What went wrong.
        reason: &'static str,
    },
}

/// Error applying a patch to a chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatchError {
    /// The patch breaks a rule of the patch codec.
    #[error("malformed patch at patch byte {offset}: {reason}")]
    Malformed {
        /// Byte offset within the patch.
        offset: usize,
        /// The rule broken.
        reason: &'static str,
    },
    /// The output buffer does not have the base chunk's length.
    #[error("patch output is {out} bytes, base chunk is {base}")]
    LengthMismatch {
        /// Base chunk length.
        base: usize,
        /// Output length.
        out: usize,
    },
}
