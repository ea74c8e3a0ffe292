//! The sparse patch codec: a chunk as the same-offset base chunk with some byte runs replaced.
//!
//! Encoding: a sequence of runs, each `offset: u16 LE | len: u16 LE | len bytes`. Runs are in
//! increasing offset order, do not overlap or touch (`offset >= previous offset + previous len`),
//! have `len >= 1`, and lie inside the chunk. An empty patch means "equal to the base".

use crate::error::PatchError;

/// Differences closer than this many bytes are merged into one run (a run header costs 4).
const MERGE_GAP: usize = 8;

/// Encodes `new` as a patch against `base` (same length, at most 64 KiB). Returns `None` when
/// the encoding would be longer than `max_len`.
pub fn encode_patch(base: &[u8], new: &[u8], max_len: usize) -> Option<Vec<u8>> {
    assert_eq!(base.len(), new.len(), "patch operands must have the same length");
    assert!(base.len() <= u16::MAX as usize + 1, "patch operands must be at most 64 KiB");
    let mut out = Vec::new();
    let n = base.len();
    let mut i = 0;
    while i < n {
        // Skip equal bytes, 8 at a time where possible.
        while i + 8 <= n && base[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < n && base[i] == new[i] {
            i += 1;
        }
        if i == n {
            break;
        }
        let start = i;
        let mut end = i + 1; // exclusive end of the last differing byte
        let mut j = end;
        while j < n && j - end < MERGE_GAP {
            if base[j] != new[j] {
                end = j + 1;
            }
            j += 1;
        }
        let len = end - start;
        if out.len() + 4 + len > max_len {
            return None;
        }
        out.extend_from_slice(&(start as u16).to_le_bytes());
        // A run may span the whole 64 KiB chunk only if len fits u16; chunks are 4 KiB.
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&new[start..end]);
        i = end;
    }
    Some(out)
}

/// Validates a patch for a chunk of `chunk_len` bytes without applying it.
pub fn check_patch(chunk_len: usize, patch: &[u8]) -> Result<(), PatchError> {
    for_each_run(chunk_len, patch, |_, _| {})
}

/// Writes `base` with the patch's runs replaced into `out` (`out.len() == base.len()`).
pub fn apply_patch(base: &[u8], patch: &[u8], out: &mut [u8]) -> Result<(), PatchError> {
    if out.len() != base.len() {
        return Err(PatchError::LengthMismatch { base: base.len(), out: out.len() });
    }
    check_patch(base.len(), patch)?;
    out.copy_from_slice(base);
    for_each_run(base.len(), patch, |offset, bytes| out[offset..offset + bytes.len()].copy_from_slice(bytes))
}

fn for_each_run(chunk_len: usize, patch: &[u8], mut f: impl FnMut(usize, &[u8])) -> Result<(), PatchError> {
    let mut p = 0usize;
    let mut min_offset = 0usize;
    while p < patch.len() {
        let Some(head) = patch.get(p..p + 4) else {
            return Err(PatchError::Malformed { offset: p, reason: "run header cut short" });
        };
        let offset = u16::from_le_bytes([head[0], head[1]]) as usize;
        let len = u16::from_le_bytes([head[2], head[3]]) as usize;
        if len == 0 {
            return Err(PatchError::Malformed { offset: p, reason: "empty run" });
        }
        if offset < min_offset {
            return Err(PatchError::Malformed { offset: p, reason: "runs out of order or overlapping" });
        }
        if offset + len > chunk_len {
            return Err(PatchError::Malformed { offset: p, reason: "run past the end of the chunk" });
        }
        let Some(bytes) = patch.get(p + 4..p + 4 + len) else {
            return Err(PatchError::Malformed { offset: p, reason: "run bytes cut short" });
        };
        f(offset, bytes);
        min_offset = offset + len;
        p += 4 + len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_sparse_edits() {
        let base: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut new = base.clone();
        new[0] = 1;
        new[10] ^= 0xff;
        new[13] ^= 0xff;
        new[4095] ^= 1;
        let p = encode_patch(&base, &new, 4096).unwrap();
        // [0], [10..14) merged, [4095]
        assert_eq!(p.len(), (4 + 1) + (4 + 4) + (4 + 1));
        let mut out = vec![0u8; 4096];
        apply_patch(&base, &p, &mut out).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn equal_chunks_give_empty_patch_and_limit_is_honoured() {
        let base = vec![5u8; 4096];
        assert_eq!(encode_patch(&base, &base, 0), Some(vec![]));
        let new = vec![6u8; 4096];
        assert_eq!(encode_patch(&base, &new, 2048), None);
    }

    #[test]
    fn malformed_patches_are_rejected() {
        let base = vec![0u8; 16];
        let mut out = vec![0u8; 16];
        for (p, _why) in [
            (vec![0u8, 0, 0], "short header"),
            (vec![0, 0, 0, 0], "empty run"),
            (vec![15, 0, 2, 0, 1, 2], "past end"),
            (vec![0, 0, 2, 0, 1], "short bytes"),
            (vec![4, 0, 1, 0, 9, 2, 0, 1, 0, 9], "out of order"),
            (vec![4, 0, 2, 0, 9, 9, 5, 0, 1, 0, 9], "overlap"),
        ] {
            assert!(apply_patch(&base, &p, &mut out).is_err(), "{_why}");
        }
        assert!(apply_patch(&base, &[], &mut [0u8; 3]).is_err());
    }
}
