//! The subcommands of the `cloudlet` tool, kept out of `src/bin/cloudlet.rs` so that the binary
//! stays a thin argument parser.

pub mod exit;
pub mod flows;
pub mod log;
pub mod net;
pub mod overlay_info;
