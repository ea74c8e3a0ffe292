//! Deduplicated deltas between a base VM's images and a custom VM's images.
#![deny(missing_docs)]

pub mod qcow2;
