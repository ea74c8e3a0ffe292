//! Benchmark support: a deterministic generator of realistic VM image pairs (base and custom
//! memory and disk images), shared by the criterion benchmarks (`benches/engine.rs`) and the
//! peer comparison harness (`src/bin/peer-compare.rs`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;

/// `p` as one shell word: single-quoted, each `'` written `'\''`, so spaces, `;`, `$`, `*`,
/// quotes and newlines in a path stay part of it. Text may follow the word directly
/// (`'dir'/p0.zst`, `'out'.tmp`, `'out'*` still globs on the suffix only).
pub fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

/// Sizes of a generated pair.
#[derive(Debug, Clone, Copy)]
pub struct PairSpec {
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Fraction of memory pages that change (moved, edited, zeroed, fresh, copied from disk).
    pub mem_change: f64,
    /// RNG seed.
    pub seed: u64,
}

/// The files of a generated pair.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Base memory image.
    pub base_mem: PathBuf,
    /// Custom memory image.
    pub custom_mem: PathBuf,
    /// Base disk image (raw).
    pub base_disk: PathBuf,
    /// Custom disk image (raw).
    pub custom_disk: PathBuf,
    /// Bytes in 4 KiB chunks that differ between base and custom, memory and disk together.
    pub changed_bytes: u64,
}

fn fill_text_like(rng: &mut impl RngCore, buf: &mut [u8]) {
    // Compressible but not trivial: words from a small vocabulary, like code and text pages.
    const WORDS: [&[u8]; 16] = [
        b"the ", b"kernel ", b"page ", b"cache ", b"struct ", b"return ", b"0x7fff", b"mov ", b"call ", b"int ",
        b"void ", b"if (", b") {\n", b"}\n", b"NULL", b"size_t ",
    ];
    let mut i = 0;
    while i < buf.len() {
        let w = WORDS[(rng.next_u32() % 16) as usize];
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

/// Builds a synthetic memory pair over an existing base disk image: base memory holds zeros,
/// text-like "kernel" pages, random pages and page-cache copies of base disk blocks; the custom
/// memory moves pages, edits a few bytes in pages, zeroes pages, adds fresh data and page-cache
/// copies of *custom* disk blocks. Returns the number of changed memory chunks.
pub fn make_memory_pair(
    spec: &PairSpec,
    base_disk: &Path,
    custom_disk: &Path,
    base_mem: &Path,
    custom_mem: &Path,
) -> io::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let pages = (spec.mem_bytes / PAGE as u64) as usize;
    let bdisk = File::open(base_disk)?;
    let cdisk = File::open(custom_disk)?;
    let bdisk_pages = bdisk.metadata()?.len() / PAGE as u64;
    let cdisk_pages = cdisk.metadata()?.len() / PAGE as u64;
    // Base memory, written in 1 MiB pieces; ~30% zero (left as holes).
    let bm = File::create(base_mem)?;
    bm.set_len(spec.mem_bytes)?;
    let mut buf = vec![0u8; PAGE];
    let mut kinds = vec![0u8; pages];
    for (p, kind) in kinds.iter_mut().enumerate() {
        let r: f64 = rng.gen();
        *kind = if r < 0.30 {
            0
        } else if r < 0.55 {
            1
        } else if r < 0.65 {
            2
        } else {
            3
        };
        match *kind {
            0 => continue,
            1 => fill_text_like(&mut rng, &mut buf),
            2 => rng.fill_bytes(&mut buf),
            _ => {
                let b = rng.gen_range(0..bdisk_pages);
                bdisk.read_exact_at(&mut buf, b * PAGE as u64)?;
            }
        }
        bm.write_all_at(&buf, (p * PAGE) as u64)?;
    }
    drop(bm);
    std::fs::copy(base_mem, custom_mem)?;
    let cm = std::fs::OpenOptions::new().read(true).write(true).open(custom_mem)?;
    let changes = (pages as f64 * spec.mem_change) as usize;
    let mut changed = std::collections::HashSet::new();
    for _ in 0..changes {
        let p = rng.gen_range(0..pages);
        let r: f64 = rng.gen();
        if r < 0.20 {
            // moved page
            let src = rng.gen_range(0..pages);
            cm.read_exact_at(&mut buf, (src * PAGE) as u64)?;
        } else if r < 0.45 {
            // a few bytes changed
            cm.read_exact_at(&mut buf, (p * PAGE) as u64)?;
            for _ in 0..rng.gen_range(1..16) {
                let o = rng.gen_range(0..PAGE);
                buf[o] = buf[o].wrapping_add(1 + rng.gen_range(0..200) as u8);
            }
        } else if r < 0.55 {
            buf.fill(0);
        } else if r < 0.70 {
            rng.fill_bytes(&mut buf);
        } else if r < 0.80 {
            fill_text_like(&mut rng, &mut buf);
        } else {
            // page cache of the custom disk (new and old blocks)
            let b = rng.gen_range(0..cdisk_pages);
            cdisk.read_exact_at(&mut buf, b * PAGE as u64)?;
        }
        cm.write_all_at(&buf, (p * PAGE) as u64)?;
        changed.insert(p);
    }

    // Count real changes.
    let bm = File::open(base_mem)?;
    let mut a = vec![0u8; PAGE];
    let mut n = 0;
    for &p in &changed {
        bm.read_exact_at(&mut a, (p * PAGE) as u64)?;
        cm.read_exact_at(&mut buf, (p * PAGE) as u64)?;
        if a != buf {
            n += 1;
        }
    }
    Ok(n)
}

/// Number of 4 KiB chunks that differ between two files (sizes may differ: missing bytes
/// count as zeros).
pub fn changed_chunks(a: &Path, b: &Path) -> io::Result<u64> {
    let fa = File::open(a)?;
    let fb = File::open(b)?;
    let la = fa.metadata()?.len();
    let lb = fb.metadata()?.len();
    let n = la.max(lb).div_ceil(PAGE as u64);
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    let mut changed = 0;
    let mut off = 0u64;
    while off < n * PAGE as u64 {
        let len = (1u64 << 20).min(n * PAGE as u64 - off) as usize;
        read_padded(&fa, la, off, &mut x[..len])?;
        read_padded(&fb, lb, off, &mut y[..len])?;
        changed += x[..len].chunks(PAGE).zip(y[..len].chunks(PAGE)).filter(|(p, q)| p != q).count() as u64;
        off += len as u64;
    }
    Ok(changed)
}

fn read_padded(f: &File, len: u64, off: u64, buf: &mut [u8]) -> io::Result<()> {
    buf.fill(0);
    if off < len {
        let n = ((len - off) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off)?;
    }
    Ok(())
}

/// An in-memory pair of memory images for micro-benchmarks: `pages` pages, a fraction changed.
pub fn memory_pair_in(dir: &Path, pages: usize, change: f64, seed: u64) -> io::Result<(PathBuf, PathBuf)> {
    let disk_b = dir.join("bench-disk-base");
    let disk_c = dir.join("bench-disk-custom");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xd15c);
    let mut d = vec![0u8; 16 << 20];
    fill_text_like(&mut rng, &mut d);
    std::fs::write(&disk_b, &d)?;
    rng.fill_bytes(&mut d[..4 << 20]);
    std::fs::write(&disk_c, &d)?;
    let bm = dir.join("bench-mem-base");
    let cm = dir.join("bench-mem-custom");
    let spec = PairSpec { mem_bytes: (pages * PAGE) as u64, mem_change: change, seed };
    make_memory_pair(&spec, &disk_b, &disk_c, &bm, &cm)?;
    Ok((bm, cm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic() {
        let t = tempfile_dir();
        let a = t.join("a");
        let b = t.join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let (a1, a2) = memory_pair_in(&a, 256, 0.2, 7).unwrap();
        let (b1, b2) = memory_pair_in(&b, 256, 0.2, 7).unwrap();
        assert_eq!(std::fs::read(&a1).unwrap(), std::fs::read(&b1).unwrap());
        assert_eq!(std::fs::read(&a2).unwrap(), std::fs::read(&b2).unwrap());
        let changed = changed_chunks(&a1, &a2).unwrap();
        assert!(changed > 10 && changed < 256, "{changed}");
        std::fs::remove_dir_all(&t).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let p = std::env::temp_dir().join(format!("cloudlet-benches-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}
