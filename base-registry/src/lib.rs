//! A store of base VMs, addressed by content id.
#![deny(missing_docs)]
