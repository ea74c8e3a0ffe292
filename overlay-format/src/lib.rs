//! The VM overlay format, version 1.
//!
//! An overlay says how to rebuild one custom VM from one base VM. The byte layout is
//! specified in `FORMAT.md` next to this crate's manifest.
#![deny(missing_docs)]
