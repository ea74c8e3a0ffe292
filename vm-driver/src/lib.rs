//! A consumer-side hypervisor trait and its QEMU implementation.
#![deny(missing_docs)]
