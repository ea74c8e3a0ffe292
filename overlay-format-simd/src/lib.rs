//! BLAKE3 of many 4 KiB inputs at once, for `overlay-format`'s optional `simd-batch` feature.
//!
//! `blake3::hash` of one 4 KiB input compresses its four 1 KiB blake3 chunks side by side, so
//! it uses 4 of the 16 lanes of AVX-512 (8 of AVX2). [`hash_4k`] puts the blake3 chunks of up
//! to 16 inputs through blake3's SIMD `hash_many` together, then the two levels of parents:
//! about 3x the throughput of one `blake3::hash` per input. The tree is fixed (four blake3
//! chunks, two parents, a root) and the results are tested against `blake3::hash`.
//!
//! `hash_many` is blake3's internal API (`blake3::platform`, hidden from its docs and outside
//! its semver promise), so this crate depends on one exact blake3 version. A program that
//! depends on it gets that version; `overlay-format` without `simd-batch` takes any blake3 1.x
//! and gives the same hashes.
//!
//! # Example
//!
//! ```
//! // Byte j is j % 251: the input of BLAKE3's own test vectors, here 4096 bytes of it.
//! let vector: [u8; 4096] = std::array::from_fn(|j| (j % 251) as u8);
//! let zeros = [0u8; 4096];
//! let mut out = [[0u8; 32]; 2]; // out[i] is blake3::hash(inputs[i])
//! overlay_format_simd::hash_4k(&[&vector, &zeros], &mut out);
//! assert_eq!(out[0][..8], [0x01, 0x50, 0x94, 0x01, 0x3f, 0x57, 0xa5, 0x27]);
//! ```
#![deny(missing_docs)]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

use blake3_exact::platform::Platform;
use blake3_exact::IncrementCounter;

/// The size of the inputs [`hash_4k`] hashes.
pub const INPUT_LEN: usize = 4096;

/// Inputs hashed together: AVX-512's 16 lanes.
pub const BATCH: usize = 16;

/// `out[i] = blake3::hash(inputs[i])`, up to [`BATCH`] inputs at once.
///
/// # Panics
///
/// If `inputs` and `out` differ in length.
pub fn hash_4k(inputs: &[&[u8; INPUT_LEN]], out: &mut [[u8; 32]]) {
    // Domain flags and IV, from the BLAKE3 specification.
    const CHUNK_START: u8 = 1;
    const CHUNK_END: u8 = 2;
    const PARENT: u8 = 4;
    const ROOT: u8 = 8;
    const IV: [u32; 8] =
        [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19];
    const B: usize = BATCH;
    const LEAF: usize = blake3_exact::CHUNK_LEN;
    const LEAVES: usize = INPUT_LEN / LEAF;
    const _: () = assert!(LEAVES == 4, "the tree below is that of four blake3 chunks");
    assert_eq!(inputs.len(), out.len(), "a hash per input");
    let platform = Platform::detect();
    for (cs, os) in inputs.chunks(B).zip(out.chunks_mut(B)) {
        let n = cs.len();
        // The chaining values of the leaves, per input in order: two parents' inputs.
        let mut leaves = [0u8; B * LEAVES * 32];
        let mut cv = [0u8; B * 32];
        for k in 0..LEAVES {
            let mut leaf_inputs: [&[u8; LEAF]; B] = [&[0; LEAF]; B];
            for (input, c) in leaf_inputs.iter_mut().zip(cs) {
                *input = c[k * LEAF..(k + 1) * LEAF].try_into().expect("one blake3 chunk");
            }
            // Leaf k of every input has chunk counter k.
            let flags = (0, CHUNK_START, CHUNK_END);
            platform.hash_many(
                &leaf_inputs[..n],
                &IV,
                k as u64,
                IncrementCounter::No,
                flags.0,
                flags.1,
                flags.2,
                &mut cv,
            );
            for i in 0..n {
                leaves[(i * LEAVES + k) * 32..][..32].copy_from_slice(&cv[i * 32..][..32]);
            }
        }
        let mut pairs: [&[u8; 64]; 2 * B] = [&[0; 64]; 2 * B];
        for (input, pair) in pairs.iter_mut().zip(leaves[..n * LEAVES * 32].chunks_exact(64)) {
            *input = pair.try_into().expect("two chaining values");
        }
        let mut parents = [0u8; 2 * B * 32];
        platform.hash_many(&pairs[..2 * n], &IV, 0, IncrementCounter::No, PARENT, 0, 0, &mut parents[..2 * n * 32]);
        let mut pairs: [&[u8; 64]; B] = [&[0; 64]; B];
        for (input, pair) in pairs.iter_mut().zip(parents[..n * 64].chunks_exact(64)) {
            *input = pair.try_into().expect("two chaining values");
        }
        platform.hash_many(&pairs[..n], &IV, 0, IncrementCounter::No, PARENT | ROOT, 0, 0, &mut cv[..n * 32]);
        for (i, h) in os.iter_mut().enumerate() {
            h.copy_from_slice(&cv[i * 32..][..32]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched hashes are blake3's, for any number of inputs (whole batches of 16 and
    /// partial ones), for random, zero and structured bytes.
    #[test]
    fn batched_hashes_are_blake3() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for n in [0usize, 1, 3, 15, 16, 17, 32, 45] {
            let mut bytes = vec![0u8; n * INPUT_LEN];
            rng.fill(&mut bytes[..]);
            for (i, c) in bytes.chunks_mut(INPUT_LEN).enumerate() {
                match i % 5 {
                    1 => c.fill(0),
                    2 => c.iter_mut().enumerate().for_each(|(j, b)| *b = (j / 1024) as u8),
                    _ => {}
                }
            }
            let inputs: Vec<&[u8; INPUT_LEN]> = bytes.chunks_exact(INPUT_LEN).map(|c| c.try_into().unwrap()).collect();
            let expect: Vec<[u8; 32]> = inputs.iter().map(|c| *blake3_exact::hash(&c[..]).as_bytes()).collect();
            let mut got = vec![[9u8; 32]; n];
            hash_4k(&inputs, &mut got);
            assert_eq!(got, expect, "{n} inputs");
        }
    }

    /// BLAKE3's own test vector for 4096 bytes (`test_vectors.json` in the BLAKE3
    /// repository), in every lane of a full batch and of a partial one.
    #[test]
    fn known_answer_in_every_lane() {
        const HASH: &str = "015094013f57a5277b59d8475c0501042c0b642e531b0a1c8f58d2163229e969";
        let vector: [u8; INPUT_LEN] = std::array::from_fn(|j| (j % 251) as u8);
        let mut out = [[0u8; 32]; BATCH + 3];
        hash_4k(&[&vector; BATCH + 3], &mut out);
        for h in out {
            let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, HASH);
        }
    }

    #[test]
    #[should_panic(expected = "a hash per input")]
    fn refuses_unequal_lengths() {
        hash_4k(&[&[0; INPUT_LEN]], &mut []);
    }
}
