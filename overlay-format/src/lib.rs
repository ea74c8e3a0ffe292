//! The VM overlay format, version 1.
//!
//! An overlay says how to rebuild one custom VM from one base VM: per image (guest memory,
//! each disk) records for the 4 KiB chunks that differ from the base, the QEMU device state,
//! the VM spec, the base's id and the digest of every rebuilt image. It is one stream — header,
//! metadata, device state, blobs, trailer — that needs no seeking, so it can be applied while it
//! arrives over a socket. The byte layout is specified in `FORMAT.md`.
//!
//! # Example
//!
//! ```
//! use overlay_format::*;
//!
//! let meta = OverlayMeta {
//!     base_id: BaseId([7; 32]),
//!     spec: VmSpec {
//!         machine_type: "pc-q35-10.0".into(),
//!         cpu_model: "qemu64".into(),
//!         vcpus: 1,
//!         ram_bytes: 8192,
//!         qemu_version: "10.0.2".into(),
//!         accelerator: "tcg".into(),
//!         disks: vec![],
//!         kernel_cmdline: None,
//!     },
//!     images: vec![ImageMeta { name: "memory".into(), kind: ImageKind::Memory, size: 8192, base_size: 8192 }],
//!     compression: Compression::Zstd,
//!     forwards: vec![],
//!     name: "hello".into(),
//!     created_unix: 0,
//!     creator: "example".into(),
//! };
//!
//! // Write: metadata, device state, blobs (sealed on any thread), trailer.
//! let mut w = OverlayWriter::new(Vec::new(), &meta)?;
//! w.write_device_state(b"device state", 3)?;
//! let mut blob = BlobBuilder::new();
//! blob.push_zero(0, 0, 1);
//! blob.push_raw(0, 1, &[0xab; 4096]);
//! w.write_blob(&blob.seal(Compression::Zstd, 3)?)?;
//! let rebuilt = [vec![0u8; 4096], vec![0xab; 4096]].concat();
//! let trailer = w.trailer(vec![ImageDigest::of_bytes(&rebuilt)]);
//! let bytes = w.finish(&trailer)?;
//!
//! // Read it back as a stream.
//! let mut r = OverlayReader::new(&bytes[..])?;
//! assert_eq!(r.meta().name, "hello");
//! assert_eq!(r.device_state()?, b"device state");
//! let mut records = Vec::new();
//! while let Some(sealed) = r.next_blob()? {
//!     let blob = sealed.decode_for(r.meta())?;
//!     records.extend(blob.records().map(|r| r.to_owned()));
//! }
//! assert_eq!(records.len(), 2);
//! assert_eq!(r.trailer().unwrap().image_digests[0], ImageDigest::of_bytes(&rebuilt));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! - `simd-batch` (off by default): [`digest::hash_full_chunks`] hashes 16 chunks at once
//!   through blake3's SIMD `hash_many`, about 3x the throughput, at the price of pinning
//!   blake3 to one exact version for the whole program. Without it any blake3 1.x does. The
//!   hashes are the same either way.
#![deny(missing_docs)]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod blob;
mod compress;
pub mod digest;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod meta;
pub mod patch;
pub mod reader;
pub mod record;
pub mod segment;
pub mod spec;
pub mod writer;

pub use blob::{BlobBuilder, DecodedBlob, RecordRef, SealedBlob};
pub use compress::{ChainEncoder, Effort, CHAIN_WINDOW_LOG};
pub use digest::{BaseId, ChunkHash, ImageDigest, ImageDigester, CHUNK_SIZE};
pub use error::{DecodeError, EncodeError, PatchError};
pub use frame::{
    FORMAT_MAJOR, FORMAT_MINOR, MAGIC, MAX_BLOB_LEN, MAX_DEVICE_STATE_LEN, MAX_IMAGES, MAX_IMAGE_SIZE, MAX_INDEX_LEN,
    MAX_LANES, MAX_META_LEN, MAX_TABLE_LEN, MAX_TRAILER_LEN, SEGMENTED_MINOR,
};
pub use meta::{Compression, ImageKind, ImageMeta, OverlayMeta, Trailer};
pub use patch::{apply_patch, encode_patch};
pub use reader::OverlayReader;
pub use record::{ChunkRef, Record};
pub use segment::{ChunkMap, ChunkRun, Head, Segment, SegmentIndex};
pub use spec::{DiskSpec, PortForward, Protocol, VmSpec};
pub use writer::OverlayWriter;
