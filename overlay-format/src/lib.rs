//! The VM overlay format, version 1.
//!
//! An overlay says how to rebuild one custom VM from one base VM. The byte layout is
//! specified in `FORMAT.md` next to this crate's manifest.
#![deny(missing_docs)]

pub mod digest;
pub mod meta;
pub mod record;
pub mod spec;

pub use digest::{BaseId, ChunkHash, ImageDigest, ImageDigester, CHUNK_SIZE};
pub use meta::{Compression, ImageKind, ImageMeta, OverlayMeta, Trailer};
pub use record::{ChunkRef, Record};
pub use spec::{DiskSpec, PortForward, Protocol, VmSpec};
