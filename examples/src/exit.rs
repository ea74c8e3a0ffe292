//! The exit codes of every `cloudlet` command: one table, shown by `cloudlet --help` and the
//! README.

/// Done.
pub const OK: u8 = 0;
/// Failed (a file missing, a VM that would not start, a guest that did not answer, ...).
pub const FAILURE: u8 = 1;
/// The command line is wrong (clap's own code: an unknown option, a value out of range).
pub const USAGE: u8 = 2;
/// An input is damaged or not what it should be: not an overlay, a damaged overlay, base or
/// export file, a disk image that cannot be used.
pub const INVALID: u8 = 3;
/// The server refused the request (4xx other than 429: bad overlay, unknown base, token).
pub const REFUSED: u8 = 4;
/// The server failed or is busy (5xx, 429).
pub const SERVER: u8 = 5;
/// Interrupted by Ctrl-C or SIGTERM (its VMs were stopped and its half-written files removed).
pub const INTERRUPTED: u8 = 130;

/// The table, for `--help` and the README.
pub const TABLE: &str = "Exit codes (every command):\n  \
    0    done\n  \
    1    failed\n  \
    2    usage error (the command line is wrong)\n  \
    3    damaged or invalid input (not an overlay, a damaged overlay, base or export, an unusable disk image)\n  \
    4    refused by the server (client)\n  \
    5    the server failed or is busy (client)\n  \
    130  interrupted (its VMs were stopped and its half-written files removed)";

/// The exit code for an error: [`INVALID`] when its cause is damaged or invalid input,
/// [`FAILURE`] otherwise.
pub fn code_of(e: &anyhow::Error) -> u8 {
    use delta_engine::ApplyError as A;
    for cause in e.chain() {
        if cause.is::<overlay_format::DecodeError>() {
            return INVALID;
        }
        if let Some(a) = cause.downcast_ref::<A>() {
            // Whose fault: the overlay's is damaged input; our I/O or our own failure is not.
            return match a.fault() {
                delta_engine::Fault::Input => INVALID,
                _ => FAILURE,
            };
        }
        if let Some(base_registry::RegistryError::BadExport { .. }) = cause.downcast_ref() {
            return INVALID;
        }
        if let Some(synthesis::FlowError::BadDisk { .. }) = cause.downcast_ref() {
            return INVALID;
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta_engine::ApplyError;

    #[test]
    fn apply_errors_exit_by_whose_fault_they_are() {
        let ours = anyhow::Error::new(ApplyError::Internal { reason: "a decoder stopped".into() });
        assert_eq!(code_of(&ours), FAILURE);
        let exists = anyhow::Error::new(ApplyError::OutputExists { path: "vm/memory".into() });
        assert_eq!(code_of(&exists.context("synthesis")), FAILURE);
        let damaged = anyhow::Error::new(ApplyError::Mismatch { reason: "base id differs".into() });
        assert_eq!(code_of(&damaged.context("synthesis")), INVALID);
    }
}
