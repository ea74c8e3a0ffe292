//! Hostile overlays: structurally valid (checksums right) with hostile fields, and the fuzz
//! corpus of the `apply` target replayed. Applying returns an error or succeeds, never panics,
//! never leaves a file behind, and never makes an allocation sized by a declared number.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use delta_engine::fuzzing::{apply_all, FuzzBase, FUZZ_DISK, FUZZ_DISK_GROWTH, FUZZ_MEMORY};
use overlay_format::fuzzing::reseal;
use overlay_format::{ImageKind, OverlayMeta};
use proptest::prelude::*;

/// The largest single allocation made in this test binary.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only recording sizes.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// No allocation of the fuzz base's overlays needs more than this: their blobs are small, but
/// the decoders' windows and a blob's declared length (at most 64 MiB) may be reserved.
const ALLOCATION_LIMIT: usize = 96 << 20;

/// Frames of an overlay: (header, payload), the trailer last.
fn frames(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 16usize;
    while at + 40 <= bytes.len() {
        let stored = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()) as usize;
        out.push((bytes[at..at + 40].to_vec(), bytes[at + 40..at + 40 + stored].to_vec()));
        at += 40 + stored;
    }
    out
}

fn join(head: &[u8], frames: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = head.to_vec();
    for (h, p) in frames {
        out.extend_from_slice(h);
        out.extend_from_slice(p);
    }
    out
}

/// `bytes` with its metadata changed by `f`, resealed.
fn with_meta(bytes: &[u8], f: impl FnOnce(&mut OverlayMeta)) -> Vec<u8> {
    let mut fr = frames(bytes);
    let mut m: OverlayMeta = postcard::from_bytes(&fr[0].1).unwrap();
    f(&mut m);
    let p = postcard::to_stdvec(&m).unwrap();
    fr[0].0[8..16].copy_from_slice(&(p.len() as u64).to_le_bytes());
    fr[0].0[16..24].copy_from_slice(&(p.len() as u64).to_le_bytes());
    fr[0].1 = p;
    reseal(&join(&bytes[..16], &fr))
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| FuzzBase::shared().seed_overlays())
}

#[test]
fn the_seed_overlays_apply() {
    let seeds = seeds();
    assert_eq!(seeds.len(), 9);
    for (k, s) in seeds.iter().enumerate() {
        assert!(FuzzBase::shared().apply(s, false), "seed {k} does not apply");
        assert!(FuzzBase::shared().apply(s, true), "seed {k} does not apply with qcow2 disks");
        assert!(apply_all(s), "seed {k}");
    }
}

/// A declared size for an image: near the real one, at the bound, or absurd.
fn size_strategy(real: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(real),
        (0u64..3 * 4096).prop_map(move |d| real.saturating_sub(4096).saturating_add(d)),
        Just(real + FUZZ_DISK_GROWTH),
        Just(real + FUZZ_DISK_GROWTH + 1),
        Just(8u64 << 40),
        Just(1u64 << 50),
        Just(1u64 << 52),
        Just(u64::MAX),
        Just(0u64),
        any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
struct Hostile {
    seed: usize,
    mem_size: u64,
    mem_base: u64,
    disk_size: u64,
    disk_base: u64,
    swap_kinds: bool,
    /// Byte flips in the blobs: (index of a byte after the metadata, xor).
    flips: Vec<(usize, u8)>,
    qcow2: bool,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (
        0usize..9,
        size_strategy(FUZZ_MEMORY),
        size_strategy(FUZZ_MEMORY),
        size_strategy(FUZZ_DISK),
        size_strategy(FUZZ_DISK),
        prop::bool::weighted(0.05),
        prop::collection::vec((any::<usize>(), 1u8..), 0..3),
        any::<bool>(),
    )
        .prop_map(|(seed, mem_size, mem_base, disk_size, disk_base, swap_kinds, flips, qcow2)| Hostile {
            seed,
            mem_size,
            mem_base,
            disk_size,
            disk_base,
            swap_kinds,
            flips,
            qcow2,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Overlays with consistent checksums and a hostile metadata block (sizes kept consistent
    /// with the spec so that they reach the applier) and a few flipped blob bytes: an error
    /// or a rebuilt VM, no panic, no file left behind, no allocation sized by a declared size.
    #[test]
    fn hostile_fields_are_refused_cleanly(h in hostile()) {
        let seed = &seeds()[h.seed];
        let mut bytes = with_meta(seed, |m| {
            m.images[0].size = h.mem_size;
            m.images[0].base_size = h.mem_base;
            m.spec.ram_bytes = h.mem_size;
            m.images[1].size = h.disk_size;
            m.images[1].base_size = h.disk_base;
            m.spec.disks[0].size_bytes = h.disk_size;
            if h.swap_kinds {
                m.images[0].kind = ImageKind::Disk;
                m.images[1].kind = ImageKind::Memory;
            }
        });
        let meta_end = 16 + 40 + frames(&bytes)[0].1.len();
        for &(at, x) in &h.flips {
            let n = bytes.len() - meta_end;
            bytes[meta_end + at % n] ^= x;
        }
        let bytes = reseal(&bytes);
        let sane = h.mem_size == FUZZ_MEMORY
            && h.mem_base == FUZZ_MEMORY
            && h.disk_base == FUZZ_DISK
            && h.disk_size <= FUZZ_DISK + FUZZ_DISK_GROWTH
            && !h.swap_kinds;
        let applied = FuzzBase::shared().apply(&bytes, h.qcow2);
        prop_assert!(!applied || sane, "an overlay with hostile sizes applied: {h:?}");
        let largest = LARGEST.load(Ordering::Relaxed);
        prop_assert!(largest <= ALLOCATION_LIMIT, "an allocation of {largest} bytes");
    }
}

/// The checked-in corpus of the `apply` fuzz target (seeds and what fuzzing found), replayed
/// through the same entry point the target calls.
#[test]
fn the_apply_fuzz_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/apply");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let _ = apply_all(&bytes);
        n += 1;
    }
    assert!(n >= 10, "{n} files in {}", dir.display());
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= ALLOCATION_LIMIT, "an allocation of {largest} bytes");
}

/// A device state that declares 512 MiB (the format's limit) in a few bytes: refused without
/// reserving the declared length.
#[test]
fn a_device_state_declaring_512_mib_reserves_nothing_like_it() {
    for seed in seeds() {
        let mut fr = frames(seed);
        fr[1].0[16..24].copy_from_slice(&(512u64 << 20).to_le_bytes());
        let bytes = reseal(&join(&seed[..16], &fr));
        assert!(!FuzzBase::shared().apply(&bytes, false));
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= ALLOCATION_LIMIT, "an allocation of {largest} bytes");
}

/// Writes the seed corpora: valid overlays for the fuzz base and hostile variants of them
/// (`cargo nextest run -p delta-engine --run-ignored only -E 'test(write_seed_corpora)'`).
#[test]
#[ignore = "writes the checked-in corpora"]
fn write_seed_corpora() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let apply = root.join("delta-engine/tests/corpus/apply");
    let reader = root.join("overlay-format/tests/corpus/overlay_reader");
    std::fs::create_dir_all(&apply).unwrap();
    std::fs::create_dir_all(&reader).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (k, s) in seeds().iter().enumerate() {
        files.push((format!("seed-{k}"), s.clone()));
    }
    let s = &seeds()[1];
    let cut = |b: Vec<u8>| {
        let fr = frames(&b);
        b[..16 + fr[..2].iter().map(|(h, p)| h.len() + p.len()).sum::<usize>()].to_vec()
    };
    for (name, size) in [("memory-8TiB", 8u64 << 40), ("memory-1PiB", 1 << 50)] {
        // Consistent with the spec (reaches the applier), and not (the reader refuses it).
        files.push((format!("{name}-cut"), cut(with_meta(s, |m| (m.images[0].size, m.spec.ram_bytes) = (size, size)))));
        files.push((format!("{name}-spec-differs-cut"), cut(with_meta(s, |m| m.images[0].size = size))));
    }
    files.push((
        "disk-grown-past-bound".into(),
        with_meta(s, |m| {
            (m.images[1].size, m.spec.disks[0].size_bytes) = (FUZZ_DISK + (2 << 20), FUZZ_DISK + (2 << 20))
        }),
    ));
    files.push(("base-size-differs".into(), with_meta(s, |m| m.images[1].base_size += 1)));
    files.push((
        "kinds-swapped".into(),
        with_meta(s, |m| {
            m.images[0].kind = ImageKind::Disk;
            m.images[1].kind = ImageKind::Memory;
        }),
    ));
    let mut fr = frames(s);
    fr[1].0[16..24].copy_from_slice(&(512u64 << 20).to_le_bytes());
    files.push(("device-state-512MiB".into(), reseal(&join(&s[..16], &fr))));
    for (name, bytes) in &files {
        std::fs::write(apply.join(name), bytes).unwrap();
        std::fs::write(reader.join(name), bytes).unwrap();
    }
}

/// A disk grown by the whole default bound (64 GiB, 16 Mi chunks) with one chunk written at
/// its end: what the applier keeps per chunk grows with the chunks written, not with the
/// declared size (no table of 16 Mi hashes, bits or qcow2 entries made up front).
#[test]
fn a_disk_grown_by_64_gib_costs_what_is_written() {
    use delta_engine::{apply_overlay, ApplyOptions, DEFAULT_MAX_DISK_GROWTH};
    use overlay_format::{BlobBuilder, ChunkHash, Compression, ImageDigest, OverlayWriter};
    let fb = FuzzBase::shared();
    let mut meta: OverlayMeta = postcard::from_bytes(&frames(&seeds()[0])[0].1).unwrap();
    let size = FUZZ_DISK + DEFAULT_MAX_DISK_GROWTH;
    (meta.images[1].size, meta.spec.disks[0].size_bytes) = (size, size);
    meta.compression = Compression::Zstd;
    let last = size.div_ceil(4096) - 1;
    let tail = vec![0xabu8; (size - last * 4096) as usize];
    let mut w = OverlayWriter::new(Vec::new(), &meta).unwrap();
    w.write_device_state(b"d", 3).unwrap();
    let mut b = BlobBuilder::new();
    b.push_raw(1, last, &tail);
    w.write_blob(&b.seal(Compression::Zstd, 3).unwrap()).unwrap();
    let mem = std::fs::read(fb.base().path(0)).unwrap();
    let mut disk = std::fs::read(fb.base().path(1)).unwrap();
    disk.resize(12 * 4096, 0);
    let head = disk.chunks(4096).map(ChunkHash::of);
    let zeros = (12..last).map(|_| ChunkHash::zero());
    let disk_digest = ImageDigest::from_chunk_hashes(head.chain(zeros).chain([ChunkHash::of(&tail)]));
    let t = w.trailer(vec![ImageDigest::of_bytes(&mem), disk_digest]);
    let ovl = w.finish(&t).unwrap();
    for qcow2 in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let opts = ApplyOptions {
            base_id: delta_engine::fuzzing::FUZZ_BASE_ID,
            outputs: vec![("memory".into(), dir.path().join("memory")), ("disk0".into(), dir.path().join("disk0"))],
            fsync: false,
            qcow2_disks: qcow2,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        let before = LARGEST.swap(0, Ordering::Relaxed);
        apply_overlay(fb.base(), &ovl[..], &opts, &|_| {}).unwrap();
        let largest = LARGEST.load(Ordering::Relaxed);
        LARGEST.fetch_max(before, Ordering::Relaxed);
        assert!(largest < 8 << 20, "qcow2 {qcow2}: an allocation of {largest} bytes");
        // One byte further is past the bound.
        let opts = ApplyOptions { max_disk_growth: DEFAULT_MAX_DISK_GROWTH - 1, ..opts };
        std::fs::remove_file(dir.path().join("memory")).unwrap();
        std::fs::remove_file(dir.path().join("disk0")).unwrap();
        let e = apply_overlay(fb.base(), &ovl[..], &opts, &|_| {}).unwrap_err();
        assert!(matches!(e, delta_engine::ApplyError::ImageMismatch { field: "size", .. }), "{e}");
    }
}
