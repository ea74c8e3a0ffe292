//! An overlay sent as a difference from an overlay the receiver already holds: a zstd frame
//! compressed with the held overlay as its reference prefix (zstd's "patch-from"), with long
//! distance matching. Two residues of one VM taken a little apart share nearly all their
//! blobs byte for byte, so the difference is a few percent of either; a handoff sends the first
//! residue while the VM runs and only this difference while it is paused.
//!
//! The receiver bounds what a patch may ask of it: its window is at most twice the reference
//! (and never over 2 GiB), and what it decodes to is read through the same bounded overlay
//! reader as any upload.

use std::io::{self, Read, Write};

/// The smallest window a patch gets (1 MiB).
const MIN_WINDOW_LOG: u32 = 20;
/// The largest (2 GiB, zstd's limit on 64-bit hosts).
const MAX_WINDOW_LOG: u32 = 31;

/// The window a patch against `reference_len` bytes of reference may use: room for the whole
/// reference plus as much again, at most 2 GiB. The decoder refuses larger windows.
pub fn window_log(reference_len: u64) -> u32 {
    let need = reference_len.saturating_mul(2).max(1);
    (64 - (need - 1).leading_zeros()).clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG)
}

/// Writes to `out` the patch that turns `reference` into what `target` reads; returns the
/// patch's size. Level 1: the patch is made while a VM is paused, and what it finds is long
/// matches, which the level barely changes.
pub fn encode_patch(reference: &[u8], mut target: impl Read, out: impl Write) -> io::Result<u64> {
    let mut counted = Counting { inner: out, n: 0 };
    {
        let mut enc = zstd::stream::write::Encoder::with_ref_prefix(&mut counted, 1, reference)?;
        enc.long_distance_matching(true)?;
        enc.window_log(window_log(reference.len() as u64))?;
        io::copy(&mut target, &mut enc)?;
        enc.finish()?;
    }
    counted.inner.flush()?;
    Ok(counted.n)
}

/// Reads what the patch `body` turns `reference` into. A patch whose window exceeds
/// [`window_log`] of the reference, or that is not a zstd frame, fails as it is read.
pub fn patch_reader<'a, R: Read + 'a>(reference: &'a [u8], body: R) -> io::Result<impl Read + 'a> {
    let mut dec = zstd::stream::read::Decoder::with_ref_prefix(io::BufReader::new(body), reference)?;
    dec.window_log_max(window_log(reference.len() as u64))?;
    Ok(dec.single_frame())
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn decode(reference: &[u8], patch: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        patch_reader(reference, patch)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_target_close_to_its_reference_is_a_small_patch_and_round_trips() {
        let reference = noise(4 << 20, 7);
        let mut target = reference.clone();
        target[1 << 20..(1 << 20) + 4096].copy_from_slice(&noise(4096, 9));
        target.extend_from_slice(&noise(10_000, 11));
        let mut patch = Vec::new();
        let n = encode_patch(&reference, &target[..], &mut patch).unwrap();
        assert_eq!(n, patch.len() as u64);
        assert!(patch.len() < 40_000, "patch of {} bytes for 14 KB of change", patch.len());
        assert_eq!(decode(&reference, &patch).unwrap(), target);
    }

    #[test]
    fn a_patch_read_against_another_reference_or_damaged_is_not_the_target() {
        let reference = noise(1 << 20, 3);
        let mut target = reference.clone();
        target[500..600].fill(0);
        let mut patch = Vec::new();
        encode_patch(&reference, &target[..], &mut patch).unwrap();
        let other = noise(1 << 20, 4);
        assert_ne!(decode(&other, &patch).ok(), Some(target.clone()));
        let mut damaged = patch.clone();
        let mid = damaged.len() / 2;
        damaged[mid] ^= 0xff;
        assert_ne!(decode(&reference, &damaged).ok(), Some(target.clone()));
        assert!(decode(&reference, &patch[..patch.len() / 2]).is_err(), "a cut patch must fail");
        assert!(decode(&reference, b"not a zstd frame at all").is_err());
    }

    #[test]
    fn a_patch_asking_for_a_larger_window_than_its_reference_allows_is_refused() {
        // Made against an 8 MiB reference, read against a 1 MiB one: a 16 MiB window is
        // refused, whatever the frame says.
        let big = noise(8 << 20, 5);
        let mut patch = Vec::new();
        encode_patch(&big, &noise(8 << 20, 6)[..], &mut patch).unwrap();
        assert!(decode(&big[..1 << 20], &patch).is_err());
        assert_eq!(window_log(0), MIN_WINDOW_LOG);
        assert_eq!(window_log(1 << 20), 21);
        assert_eq!(window_log(u64::MAX), MAX_WINDOW_LOG);
    }
}
