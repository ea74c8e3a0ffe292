//! Content digests shared by the overlay, the delta engine and the base registry.
//!
//! A VM image is hashed in 4 KiB chunks: [`ChunkHash`] is the first 16 bytes of the blake3 of
//! one chunk (the last chunk of an image may be shorter). An image's [`ImageDigest`] is the
//! blake3 of the concatenation of its chunk hashes, in order. This two-level definition lets a
//! writer or reader that knows the base's chunk hashes compute the digest of a derived image by
//! hashing only the chunks that changed.

use std::fmt;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::spec::VmSpec;

/// Size of the chunk every image is cut into: one guest page, one disk block.
pub const CHUNK_SIZE: usize = 4096;

/// First 16 bytes of the blake3 hash of one chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 16]);

impl ChunkHash {
    /// Hashes one chunk (at most [`CHUNK_SIZE`] bytes; only an image's last chunk is shorter).
    pub fn of(chunk: &[u8]) -> Self {
        debug_assert!(chunk.len() <= CHUNK_SIZE);
        if chunk.len() == CHUNK_SIZE && is_zero(chunk) {
            return ZERO_CHUNK_HASH;
        }
        Self::compute(chunk)
    }

    fn compute(chunk: &[u8]) -> Self {
        let h = blake3::hash(chunk);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        ChunkHash(out)
    }

    /// The hash of a full chunk of zeros.
    pub fn zero() -> Self {
        ZERO_CHUNK_HASH
    }
}

/// `out[i] = ChunkHash::of(chunks[i])` for full chunks.
///
/// `blake3::hash` of one 4 KiB input compresses its four 1 KiB blake3 chunks side by side, so
/// it uses 4 of the 16 lanes of AVX-512 (8 of AVX2). With the crate feature `simd-batch`, the
/// blake3 chunks of up to 16 of our chunks go through blake3's SIMD `hash_many` together
/// (`overlay_format_simd::hash_4k`): about 3x the throughput on this project's machines, for a
/// dependency on one exact blake3 version. Without it, each chunk is one `blake3::hash`, with
/// any blake3 1.x. The hashes are the same either way (tested).
pub fn hash_full_chunks(chunks: &[&[u8; CHUNK_SIZE]], out: &mut [ChunkHash]) {
    assert_eq!(chunks.len(), out.len(), "a hash per chunk");
    #[cfg(feature = "simd-batch")]
    hash_full_chunks_batched(chunks, out);
    #[cfg(not(feature = "simd-batch"))]
    hash_full_chunks_portable(chunks, out);
}

/// [`hash_full_chunks`] one `blake3::hash` at a time.
#[cfg_attr(all(feature = "simd-batch", not(test)), allow(dead_code))]
fn hash_full_chunks_portable(chunks: &[&[u8; CHUNK_SIZE]], out: &mut [ChunkHash]) {
    for (c, h) in chunks.iter().zip(out) {
        *h = ChunkHash::compute(&c[..]);
    }
}

/// [`hash_full_chunks`] 16 at a time through blake3's SIMD `hash_many`.
#[cfg(feature = "simd-batch")]
fn hash_full_chunks_batched(chunks: &[&[u8; CHUNK_SIZE]], out: &mut [ChunkHash]) {
    use overlay_format_simd::{hash_4k, BATCH};
    const _: () = assert!(overlay_format_simd::INPUT_LEN == CHUNK_SIZE);
    let mut full = [[0u8; 32]; BATCH];
    for (cs, os) in chunks.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
        hash_4k(cs, &mut full[..cs.len()]);
        for (h, f) in os.iter_mut().zip(&full) {
            h.0.copy_from_slice(&f[..16]);
        }
    }
}

/// [`hash_full_chunks`] of chunks tagged with where their hashes go: `(tag, hash)`, in order.
pub fn hash_tagged<T>(chunks: Vec<(T, &[u8; CHUNK_SIZE])>) -> impl Iterator<Item = (T, ChunkHash)> {
    let data: Vec<&[u8; CHUNK_SIZE]> = chunks.iter().map(|(_, c)| *c).collect();
    let mut hashes = vec![ChunkHash::zero(); data.len()];
    hash_full_chunks(&data, &mut hashes);
    let tags: Vec<T> = chunks.into_iter().map(|(t, _)| t).collect();
    tags.into_iter().zip(hashes)
}

/// `out[i] = ChunkHash::of(chunk i of bytes)` for every chunk of `bytes` (the last may be
/// short): zero chunks get the constant, the others are hashed together
/// ([`hash_full_chunks`]).
pub fn hash_chunks(bytes: &[u8], out: &mut [ChunkHash]) {
    assert_eq!(out.len(), bytes.len().div_ceil(CHUNK_SIZE), "a hash per chunk");
    let mut full = Vec::with_capacity(out.len());
    for (i, c) in bytes.chunks(CHUNK_SIZE).enumerate() {
        match <&[u8; CHUNK_SIZE]>::try_from(c) {
            Ok(f) if !is_zero(f) => full.push((i, f)),
            _ => out[i] = ChunkHash::of(c),
        }
    }
    for (i, h) in hash_tagged(full) {
        out[i] = h;
    }
}

/// `ChunkHash::compute(&[0; 4096])`, checked by a unit test.
const ZERO_CHUNK_HASH: ChunkHash =
    ChunkHash([0xb6, 0xfb, 0x73, 0xfc, 0x46, 0x93, 0x8c, 0x98, 0x1e, 0x2b, 0x0b, 0x4b, 0x1e, 0xf2, 0x82, 0xad]);

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", hex(&self.0))
    }
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // Compare in u64 words; the compiler vectorises this loop.
    let (prefix, words, suffix) = {
        // SAFETY: every bit pattern is a valid u64, and align_to only reinterprets the aligned
        // middle part of the slice.
        unsafe { buf.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0) && suffix.iter().all(|&b| b == 0) && words.iter().fold(0u64, |acc, &w| acc | w) == 0
}

/// Digest of a whole image: blake3 over its chunk hashes in order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageDigest(pub [u8; 32]);

impl ImageDigest {
    /// Digest of an image held in memory, hashing its chunks in parallel.
    pub fn of_bytes(image: &[u8]) -> Self {
        const PIECE: usize = 64;
        let mut hashes = vec![ChunkHash::zero(); image.len().div_ceil(CHUNK_SIZE)];
        image.par_chunks(PIECE * CHUNK_SIZE).zip(hashes.par_chunks_mut(PIECE)).for_each(|(b, h)| hash_chunks(b, h));
        Self::from_chunk_hashes(hashes.iter().copied())
    }

    /// Digest from the chunk hashes of an image, in order.
    pub fn from_chunk_hashes(hashes: impl IntoIterator<Item = ChunkHash>) -> Self {
        let mut d = ImageDigester::new();
        for h in hashes {
            d.push(h);
        }
        d.finish()
    }
}

impl fmt::Debug for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageDigest({})", hex(&self.0))
    }
}

impl fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// Incremental [`ImageDigest`]: push the chunk hashes of an image in order.
///
/// The hashes are gathered and handed to blake3 64 KiB at a time: blake3 hashes the 1 KiB
/// chunks of one input in parallel (SIMD), but 16 bytes at a time it compresses one block after
/// another, about ten times slower (some 15 ms per GiB of image, on the thread that waits).
#[derive(Clone)]
pub struct ImageDigester {
    hasher: blake3::Hasher,
    pending: Vec<u8>,
    chunks: u64,
}

impl ImageDigester {
    /// Bytes of chunk hashes gathered before they are hashed.
    const GATHER: usize = 64 << 10;

    /// A digester for an image with no chunks yet.
    pub fn new() -> Self {
        ImageDigester { hasher: blake3::Hasher::new(), pending: Vec::new(), chunks: 0 }
    }

    /// Appends the hash of the next chunk.
    pub fn push(&mut self, hash: ChunkHash) {
        if self.pending.capacity() == 0 {
            self.pending.reserve_exact(Self::GATHER);
        }
        self.pending.extend_from_slice(&hash.0);
        if self.pending.len() == Self::GATHER {
            self.hasher.update(&self.pending);
            self.pending.clear();
        }
        self.chunks += 1;
    }

    /// Number of chunks pushed so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The digest of the chunks pushed.
    pub fn finish(&self) -> ImageDigest {
        let mut h = self.hasher.clone();
        h.update(&self.pending);
        ImageDigest(*h.finalize().as_bytes())
    }
}

impl Default for ImageDigester {
    fn default() -> Self {
        Self::new()
    }
}

/// Identity of a base VM: blake3 over its spec and the digests of its named files (memory,
/// disks, device state, kernel, initrd). Overlays name the base they apply to by this id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BaseId(pub [u8; 32]);

impl BaseId {
    /// Computes the id. `files` are `(name, digest)` pairs; their order does not matter (they
    /// are sorted by name first). Names must be unique.
    ///
    /// Encoding hashed: `b"cloudlet-base-id-v1\0"`, the postcard encoding of `spec` prefixed by
    /// its length (u64 LE), then per file sorted by name: name length (u64 LE), name bytes,
    /// the 32-byte digest.
    pub fn compute(spec: &VmSpec, files: &[(&str, ImageDigest)]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"cloudlet-base-id-v1\0");
        let spec_bytes = postcard::to_stdvec(spec).expect("postcard encoding into a Vec cannot fail");
        h.update(&(spec_bytes.len() as u64).to_le_bytes());
        h.update(&spec_bytes);
        let mut files: Vec<&(&str, ImageDigest)> = files.iter().collect();
        files.sort_by(|a, b| a.0.cmp(b.0));
        for (name, digest) in files {
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(&digest.0);
        }
        BaseId(*h.finalize().as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(BaseId(out))
    }
}

impl fmt::Debug for BaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BaseId({})", self.to_hex())
    }
}

impl fmt::Display for BaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 16 bytes of BLAKE3's own test vector for 4096 input bytes (`test_vectors.json`
    /// in the BLAKE3 repository: input byte j is `j % 251`).
    const KAT: [u8; 16] =
        [0x01, 0x50, 0x94, 0x01, 0x3f, 0x57, 0xa5, 0x27, 0x7b, 0x59, 0xd8, 0x47, 0x5c, 0x05, 0x01, 0x04];

    #[test]
    fn zero_chunk_hash_constant_matches_blake3() {
        assert_eq!(ChunkHash::compute(&[0u8; CHUNK_SIZE]), ZERO_CHUNK_HASH);
        assert_eq!(ChunkHash::of(&[0u8; CHUNK_SIZE]), ZERO_CHUNK_HASH);
    }

    /// The batched hashes are blake3's, for any number of chunks (whole batches of 16 and
    /// partial ones), for random, zero and structured bytes, and with a short last chunk.
    #[test]
    fn batched_chunk_hashes_are_blake3() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for n in [0usize, 1, 3, 15, 16, 17, 32, 45] {
            let mut bytes = vec![0u8; n * CHUNK_SIZE + if n % 2 == 1 { 100 } else { 0 }];
            rng.fill(&mut bytes[..]);
            for (i, c) in bytes.chunks_mut(CHUNK_SIZE).enumerate() {
                match i % 5 {
                    1 => c.fill(0),
                    2 => c.iter_mut().enumerate().for_each(|(j, b)| *b = (j / 1024) as u8),
                    _ => {}
                }
            }
            let expect: Vec<ChunkHash> = bytes.chunks(CHUNK_SIZE).map(ChunkHash::compute).collect();
            let mut got = vec![ChunkHash([9; 16]); expect.len()];
            hash_chunks(&bytes, &mut got);
            assert_eq!(got, expect, "{n} chunks");
            let full: Vec<&[u8; CHUNK_SIZE]> = bytes.chunks_exact(CHUNK_SIZE).map(|c| c.try_into().unwrap()).collect();
            let mut got = vec![ChunkHash([9; 16]); n];
            hash_full_chunks(&full, &mut got);
            assert_eq!(got, expect[..n], "{n} full chunks");
            // Both implementations, whichever one `hash_full_chunks` is in this build.
            let mut got = vec![ChunkHash([9; 16]); n];
            hash_full_chunks_portable(&full, &mut got);
            assert_eq!(got, expect[..n], "{n} full chunks, portable");
            #[cfg(feature = "simd-batch")]
            {
                let mut got = vec![ChunkHash([9; 16]); n];
                hash_full_chunks_batched(&full, &mut got);
                assert_eq!(got, expect[..n], "{n} full chunks, batched");
            }
        }
        let image = vec![7u8; 70 * CHUNK_SIZE + 1];
        let expect = ImageDigest::from_chunk_hashes(image.chunks(CHUNK_SIZE).map(ChunkHash::compute));
        assert_eq!(ImageDigest::of_bytes(&image), expect);
    }

    /// A known answer, so that neither implementation can drift along with the other.
    #[test]
    fn chunk_hash_known_answer() {
        let chunk: [u8; CHUNK_SIZE] = std::array::from_fn(|j| (j % 251) as u8);
        let expect = ChunkHash(KAT);
        assert_eq!(ChunkHash::of(&chunk), expect);
        let mut got = [ChunkHash([9; 16]); 17];
        hash_full_chunks(&[&chunk; 17], &mut got);
        assert_eq!(got, [expect; 17]);
        let mut got = [ChunkHash([9; 16]); 17];
        hash_full_chunks_portable(&[&chunk; 17], &mut got);
        assert_eq!(got, [expect; 17]);
    }

    #[test]
    fn short_zero_chunk_is_not_the_full_zero_hash() {
        assert_ne!(ChunkHash::of(&[0u8; 100]), ZERO_CHUNK_HASH);
    }

    #[test]
    fn is_zero_handles_unaligned_slices() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf[1..]));
        buf[4098] = 1;
        assert!(!is_zero(&buf[1..]));
        buf[4098] = 0;
        buf[1] = 1;
        assert!(!is_zero(&buf[1..]));
    }

    #[test]
    fn image_digest_is_over_chunk_hashes() {
        let mut img = vec![0u8; 3 * CHUNK_SIZE + 10];
        img[5000] = 7;
        let hashes: Vec<ChunkHash> = img.chunks(CHUNK_SIZE).map(ChunkHash::of).collect();
        assert_eq!(hashes.len(), 4);
        assert_eq!(ImageDigest::of_bytes(&img), ImageDigest::from_chunk_hashes(hashes));
    }

    /// The digest is blake3 of the concatenated chunk hashes (FORMAT.md), however many of them
    /// the digester gathers before hashing: checked across several gathers, and when read
    /// half-way.
    #[test]
    fn image_digest_is_blake3_of_the_concatenated_hashes() {
        let hashes: Vec<ChunkHash> = (0u32..10_000).map(|i| ChunkHash::of(&i.to_le_bytes())).collect();
        let mut d = ImageDigester::new();
        for (k, h) in hashes.iter().enumerate() {
            if k % 4097 == 0 {
                let concat: Vec<u8> = hashes[..k].iter().flat_map(|h| h.0).collect();
                assert_eq!(d.finish().0, *blake3::hash(&concat).as_bytes(), "after {k} hashes");
            }
            d.push(*h);
        }
        let concat: Vec<u8> = hashes.iter().flat_map(|h| h.0).collect();
        assert_eq!(d.finish().0, *blake3::hash(&concat).as_bytes());
        assert_eq!(d.chunks(), 10_000);
    }

    #[test]
    fn base_id_ignores_file_order_and_round_trips_hex() {
        let spec = VmSpec {
            machine_type: "pc-q35-10.0".into(),
            cpu_model: "qemu64".into(),
            vcpus: 1,
            ram_bytes: 256 << 20,
            qemu_version: "10.0.2".into(),
            accelerator: "tcg".into(),
            disks: vec![],
            kernel_cmdline: None,
        };
        let a = ImageDigest([1; 32]);
        let b = ImageDigest([2; 32]);
        let id1 = BaseId::compute(&spec, &[("memory", a), ("disk0", b)]);
        let id2 = BaseId::compute(&spec, &[("disk0", b), ("memory", a)]);
        assert_eq!(id1, id2);
        assert_ne!(id1, BaseId::compute(&spec, &[("memory", b), ("disk0", a)]));
        assert_eq!(BaseId::from_hex(&id1.to_hex()), Some(id1));
        assert_eq!(BaseId::from_hex("zz"), None);
    }
}
