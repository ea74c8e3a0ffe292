//! Records: how each changed 4 KiB chunk of an image is rebuilt.
//!
//! Chunk `c` of an image covers bytes `c * 4096 .. min((c + 1) * 4096, size)`. Records are
//! applied in stream order; a chunk no record names keeps the base's bytes.

/// Where a copied chunk comes from in the base VM: any base image, any chunk (dedup across
/// memory and disks, since the page cache holds disk blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// Index into [`crate::OverlayMeta::images`] (base image `i` has the same name).
    pub image: u8,
    /// Chunk number within that image.
    pub chunk: u64,
}

/// How one run of chunks of one image is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `count` chunks starting at `chunk` are all zero.
    Zero {
        /// Target image index.
        image: u8,
        /// First chunk.
        chunk: u64,
        /// Number of consecutive chunks.
        count: u64,
    },
    /// `count` chunks starting at `chunk` equal `count` consecutive base chunks starting at `src`.
    CopyBase {
        /// Target image index.
        image: u8,
        /// First target chunk.
        chunk: u64,
        /// Number of consecutive chunks.
        count: u64,
        /// First source chunk in the base VM.
        src: ChunkRef,
    },
    /// The chunk equals a chunk of the rebuilt VM that an earlier record already wrote.
    CopySelf {
        /// Target image index.
        image: u8,
        /// Target chunk.
        chunk: u64,
        /// Earlier-written chunk of the rebuilt (not the base) VM.
        src: ChunkRef,
    },
    /// The chunk is the same-offset base chunk with a sparse patch applied.
    Patch {
        /// Target image index.
        image: u8,
        /// Target chunk.
        chunk: u64,
        /// Encoded patch (see [`crate::patch`]).
        patch: Vec<u8>,
    },
    /// The chunks' bytes, stored (then compressed with the blob).
    Raw {
        /// Target image index.
        image: u8,
        /// First chunk.
        chunk: u64,
        /// The bytes: `count * 4096` bytes, except that a run reaching the image's end is
        /// shorter by what the last chunk lacks.
        data: Vec<u8>,
    },
}
