//! `apply(base, diff(base, x)) == x`, classification, and failure behaviour.

use std::path::{Path, PathBuf};

use delta_engine::*;
use overlay_format::{BaseId, Compression, ImageKind, OverlayReader, VmSpec};
use proptest::prelude::*;

const PAGE: usize = 4096;

struct Pair {
    dir: tempfile::TempDir,
    base: Vec<(String, ImageKind, Vec<u8>)>,
    custom: Vec<Vec<u8>>,
}

fn spec() -> VmSpec {
    VmSpec {
        machine_type: "pc-q35-10.0".into(),
        cpu_model: "qemu64".into(),
        vcpus: 1,
        ram_bytes: 0,
        qemu_version: "10.0.2".into(),
        accelerator: "tcg".into(),
        disks: vec![],
        kernel_cmdline: None,
    }
}

/// The overlay's info, its spec's RAM the size of the custom memory image.
fn info(ram_bytes: u64) -> OverlayInfo {
    OverlayInfo {
        base_id: BaseId([9; 32]),
        spec: VmSpec { ram_bytes, ..spec() },
        forwards: vec![],
        name: "t".into(),
        creator: "tests".into(),
        created_unix: 0,
    }
}

impl Pair {
    fn new(base: Vec<(&str, ImageKind, Vec<u8>)>, custom: Vec<Vec<u8>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<_> = base.into_iter().map(|(n, k, b)| (n.to_string(), k, b)).collect();
        for (i, (n, _, b)) in base.iter().enumerate() {
            std::fs::write(dir.path().join(format!("base-{n}")), b).unwrap();
            std::fs::write(dir.path().join(format!("custom-{n}")), &custom[i]).unwrap();
        }
        Pair { dir, base, custom }
    }

    /// [`info`] for this pair's custom memory image.
    fn info(&self) -> OverlayInfo {
        let mem = self.base.iter().position(|(_, k, _)| *k == ImageKind::Memory);
        info(mem.map_or(0, |i| self.custom[i].len() as u64))
    }

    fn base_images(&self) -> Vec<BaseImage> {
        self.base
            .iter()
            .map(|(n, k, _)| BaseImage { name: n.clone(), kind: *k, path: self.dir.path().join(format!("base-{n}")) })
            .collect()
    }

    fn customs(&self) -> Vec<CustomImage> {
        self.base
            .iter()
            .map(|(n, ..)| CustomImage {
                name: n.clone(),
                source: CustomSource::Raw(self.dir.path().join(format!("custom-{n}"))),
            })
            .collect()
    }

    fn create(&self, opts: &CreateOptions) -> (Base, Vec<u8>, CreateStats) {
        let base = Base::build(&self.base_images(), &|_| {}).unwrap();
        let (ovl, stats) =
            create_overlay(&base, &self.customs(), &self.info(), b"device", opts, &|_| {}, Vec::new()).unwrap();
        (base, ovl, stats)
    }

    fn outputs(&self, tag: &str) -> Vec<(String, PathBuf)> {
        self.base.iter().map(|(n, ..)| (n.clone(), self.dir.path().join(format!("out-{tag}-{n}")))).collect()
    }

    fn round_trip(&self, opts: &CreateOptions, tag: &str) -> CreateStats {
        self.round_trip_to(opts, tag, false)
    }

    /// [`Pair::round_trip`], with disks written as qcow2 layers over the base's when `qcow2`
    /// (read back through the engine's own layer reader).
    fn round_trip_to(&self, opts: &CreateOptions, tag: &str, qcow2: bool) -> CreateStats {
        let (base, ovl, stats) = self.create(opts);
        let outputs = self.outputs(tag);
        let a = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: outputs.clone(),
            fsync: false,
            qcow2_disks: qcow2,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        let report = apply_overlay(&base, &ovl[..], &a, &|_| {}).unwrap();
        assert_eq!(report.device_state, b"device");
        for (i, (_, p)) in outputs.iter().enumerate() {
            let got = if qcow2 && self.base[i].1 == ImageKind::Disk {
                self.read_layer(i, p)
            } else {
                std::fs::read(p).unwrap()
            };
            assert!(
                got == self.custom[i],
                "image {i} differs after apply ({} vs {} bytes)",
                got.len(),
                self.custom[i].len()
            );
        }
        assert_eq!(report.kinds, stats.kinds);
        stats
    }

    /// The guest bytes of the qcow2 layer `p` over base image `i`.
    fn read_layer(&self, i: usize, p: &Path) -> Vec<u8> {
        let l = qcow2::Qcow2Layer::open(p).unwrap();
        let size = l.virtual_size() as usize;
        let base = &self.base[i].2;
        let mut out = Vec::with_capacity(size);
        for c in 0..size.div_ceil(PAGE) {
            let len = (size - c * PAGE).min(PAGE);
            match l.chunk(c as u64, len) {
                qcow2::LayerChunk::Backing => {
                    let s = (c * PAGE).min(base.len());
                    let e = (c * PAGE + len).min(base.len());
                    out.extend_from_slice(&base[s..e]);
                    out.resize(c * PAGE + len, 0);
                }
                qcow2::LayerChunk::Zero => out.resize(c * PAGE + len, 0),
                qcow2::LayerChunk::Data(d) => out.extend_from_slice(&d),
            }
        }
        out
    }
}

fn page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..PAGE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn each_rule_produces_its_record_kind() {
    // base memory: pages 0..8 random, 8..16 zero; base disk: 8 random pages.
    let mut mem: Vec<u8> = (0..8).flat_map(page).collect();
    mem.resize(16 * PAGE, 0);
    let disk: Vec<u8> = (100..108).flat_map(page).collect();
    let mut cm = mem.clone();
    cm[0..PAGE].fill(0); // zero
    cm[8 * PAGE..9 * PAGE].copy_from_slice(&disk[3 * PAGE..4 * PAGE]); // copy from base disk
    cm[9 * PAGE..10 * PAGE].copy_from_slice(&page(999)); // raw
    cm[10 * PAGE..11 * PAGE].copy_from_slice(&page(999)); // self copy of the raw page
    cm[2 * PAGE + 17] ^= 0xff; // patch
    let pair =
        Pair::new(vec![("memory", ImageKind::Memory, mem), ("disk0", ImageKind::Disk, disk.clone())], vec![cm, disk]);
    let s = pair.round_trip(&CreateOptions::default(), "kinds");
    assert_eq!(s.kinds.zero.chunks, 1);
    assert_eq!(s.kinds.copy_base.chunks, 1);
    assert_eq!(s.kinds.raw.chunks, 1);
    assert_eq!(s.kinds.copy_self.chunks, 1);
    assert_eq!(s.kinds.patch.chunks, 1);
    assert_eq!(s.changed_chunks, 5);
}

#[test]
fn holes_and_odd_sizes_and_growth() {
    // Sparse custom memory (a file with a hole), a disk that grows to an odd size.
    let mem: Vec<u8> = (0..32).flat_map(page).collect();
    let disk: Vec<u8> = (0..5).flat_map(|i| page(i + 50)).collect::<Vec<u8>>()[..5 * PAGE - 100].to_vec();
    let mut cm = mem.clone();
    cm[10 * PAGE..20 * PAGE].fill(0);
    let mut cd = disk.clone();
    cd.resize(7 * PAGE + 33, 0);
    cd[6 * PAGE..6 * PAGE + 33].copy_from_slice(&page(7)[..33]);
    cd[5 * PAGE - 200] ^= 1;
    let pair =
        Pair::new(vec![("memory", ImageKind::Memory, mem), ("disk0", ImageKind::Disk, disk)], vec![cm.clone(), cd]);
    // Re-write custom memory sparsely: punch the zero range.
    let p = pair.dir.path().join("custom-memory");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(0).unwrap();
    f.set_len(cm.len() as u64).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&cm[..10 * PAGE], 0).unwrap();
    f.write_all_at(&cm[20 * PAGE..], (20 * PAGE) as u64).unwrap();
    drop(f);
    for c in [Compression::None, Compression::Zstd, Compression::Xz] {
        let opts = CreateOptions { compression: c, level: 1, ..CreateOptions::default() };
        let s = pair.round_trip(&opts, &format!("{c:?}"));
        assert_eq!(s.kinds.zero.chunks, 10);
    }
}

#[test]
fn overlay_for_another_base_is_refused_naming_both_ids() {
    let mem: Vec<u8> = (0..4).flat_map(page).collect();
    let mut cm = mem.clone();
    cm[5] = 1;
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem)], vec![cm]);
    let (base, ovl, _) = pair.create(&CreateOptions::default());
    let outputs = pair.outputs("wrong");
    let a = ApplyOptions {
        base_id: BaseId([8; 32]),
        outputs: outputs.clone(),
        fsync: false,
        qcow2_disks: false,
        max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
    };
    let err = apply_overlay(&base, &ovl[..], &a, &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&BaseId([9; 32]).to_hex()) && msg.contains(&BaseId([8; 32]).to_hex()), "{msg}");
    assert!(!outputs[0].1.exists());
}

/// A custom image that cannot be read (here a directory in its place: it opens, and every
/// read fails) fails creation with an error naming it, not a panic.
#[test]
fn an_unreadable_custom_image_is_an_error_naming_it() {
    let mem: Vec<u8> = (0..4).flat_map(page).collect();
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem.clone())], vec![mem]);
    let base = Base::build(&pair.base_images(), &|_| {}).unwrap();
    let dir = pair.dir.path().join("not-an-image");
    std::fs::create_dir(&dir).unwrap();
    let custom = [CustomImage { name: "memory".into(), source: CustomSource::Raw(dir.clone()) }];
    // The spec agrees with the size the directory reports, so that reading it is what fails.
    let info = info(std::fs::metadata(&dir).unwrap().len());
    match create_overlay(&base, &custom, &info, b"", &CreateOptions::default(), &|_| {}, Vec::new()) {
        Err(e @ CreateError::Io { .. }) => assert!(e.to_string().contains("not-an-image"), "{e}"),
        Err(e) => panic!("not an I/O error: {e}"),
        Ok(_) => panic!("created an overlay from a directory"),
    }
}

/// Errors say whose fault they are: outputs that cannot be created (a directory that is a
/// file, a directory that does not exist) or that exist already are the machine's (`Io`), a
/// damaged overlay is the input's, applied to the same base and outputs.
#[test]
fn unwritable_outputs_are_io_faults_and_damaged_overlays_input_faults() {
    let mem: Vec<u8> = (0..8).flat_map(page).collect();
    let mut cm = mem.clone();
    cm[3 * PAGE..4 * PAGE].copy_from_slice(&page(77));
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem)], vec![cm]);
    let (base, ovl, _) = pair.create(&CreateOptions::default());
    let not_a_dir = pair.dir.path().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let existing = pair.dir.path().join("existing");
    std::fs::write(&existing, b"keep").unwrap();
    let apply = |out: PathBuf, overlay: &[u8]| {
        let a = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: vec![("memory".into(), out)],
            fsync: false,
            qcow2_disks: false,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        apply_overlay(&base, overlay, &a, &|_| {}).unwrap_err()
    };
    for out in [not_a_dir.join("memory"), pair.dir.path().join("missing").join("memory")] {
        let e = apply(out.clone(), &ovl);
        assert!(matches!(e, ApplyError::Io { .. }), "{out:?}: {e:?}");
        assert_eq!(e.fault(), Fault::Io, "{e}");
        assert!(!e.is_bad_input(), "{e}");
    }
    let e = apply(existing.clone(), &ovl);
    assert!(matches!(e, ApplyError::OutputExists { .. }) && e.fault() == Fault::Io, "{e:?}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
    let e = apply(pair.dir.path().join("out-cut"), &ovl[..ovl.len() - 10]);
    assert_eq!(e.fault(), Fault::Input, "{e}");
    assert!(e.is_bad_input(), "{e}");
    assert_eq!(leftovers(pair.dir.path()), Vec::<String>::new());
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("out-") || n.ends_with(".partial"))
        .collect()
}

#[test]
fn damaged_overlays_fail_and_leave_nothing_behind() {
    let mem: Vec<u8> = (0..64).flat_map(page).collect();
    let mut cm = mem.clone();
    for i in (0..64).step_by(3) {
        cm[i * PAGE..(i + 1) * PAGE].copy_from_slice(&page(1000 + i as u64));
    }
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem)], vec![cm]);
    let opts = CreateOptions { blob_bytes: 16 << 10, dense_blob_bytes: 16 << 10, ..CreateOptions::default() };
    let (base, ovl, stats) = pair.create(&opts);
    assert!(stats.blobs > 2);
    let cuts = [ovl.len() / 3, ovl.len() / 2, ovl.len() - 1];
    for (k, cut) in cuts.into_iter().enumerate() {
        let a = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: pair.outputs(&format!("cut{k}")),
            fsync: false,
            qcow2_disks: false,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        assert!(apply_overlay(&base, &ovl[..cut], &a, &|_| {}).is_err());
    }
    for (k, at) in [200usize, ovl.len() / 2, ovl.len() - 50].into_iter().enumerate() {
        let mut bad = ovl.clone();
        bad[at] ^= 0x20;
        let a = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: pair.outputs(&format!("flip{k}")),
            fsync: false,
            qcow2_disks: false,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        assert!(apply_overlay(&base, &bad[..], &a, &|_| {}).is_err());
    }
    assert_eq!(leftovers(pair.dir.path()), Vec::<String>::new());
}

#[test]
fn index_round_trips_and_rejects_corruption() {
    let mem: Vec<u8> = (0..10).flat_map(page).collect();
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem.clone())], vec![mem]);
    let idx = BaseIndex::build(&pair.base_images(), &|_| {}).unwrap();
    let p = pair.dir.path().join("index");
    idx.save(&p).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), idx.file_size());
    let back = BaseIndex::load(&p).unwrap();
    assert_eq!(back.images(), idx.images());
    let bytes = std::fs::read(&p).unwrap();
    for at in [0usize, 9, 14, 40, bytes.len() / 2, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(BaseIndex::load(&p), Err(IndexError::Corrupt { .. })), "flip at {at}");
    }
    for cut in [0usize, 5, 20, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(matches!(BaseIndex::load(&p), Err(IndexError::Corrupt { .. })), "cut at {cut}");
    }
}

/// A compressible page: words from a small vocabulary, like text and code.
fn text_page(seed: u64) -> Vec<u8> {
    const WORDS: [&str; 8] = ["the ", "page ", "cache ", "struct ", "return ", "NULL", "if (", ") {\n"];
    let r = page(seed);
    let mut out = Vec::with_capacity(PAGE + 8);
    let mut i = 0;
    while out.len() < PAGE {
        out.extend_from_slice(WORDS[(r[i % PAGE] % 8) as usize].as_bytes());
        i += 1;
    }
    out.truncate(PAGE);
    out
}

/// Bytes that look like x86-64 machine code to [`content_lane`]: few distinct bytes, one in ten
/// a REX.W prefix (0x48), mostly not printable.
fn code_page(seed: u64) -> Vec<u8> {
    const OPS: [u8; 10] = [0x48, 0x8b, 0x89, 0x0f, 0x85, 0xe8, 0x00, 0xff, 0x45, 0x24];
    page(seed).iter().map(|&r| OPS[usize::from(r) % OPS.len()]).collect()
}

/// Data that is neither text nor code: small values, no 0x48.
fn data_page(seed: u64) -> Vec<u8> {
    page(seed).iter().map(|&r| [0x00, 0x01, 0x02, 0x80, 0xc0, 0xff][usize::from(r) % 6]).collect()
}

#[test]
fn content_lanes_tell_text_code_and_data_apart() {
    assert_eq!(content_lane(&text_page(1)), 0);
    assert_eq!(content_lane(&code_page(1)), 1);
    assert_eq!(content_lane(&data_page(1)), 2);
    assert_eq!(content_lane(&[0u8; PAGE]), 2);
    // 'H' is 0x48: text full of it is still text.
    assert_eq!(content_lane(&[b'H'; PAGE]), 0);
}

/// With three lanes, text, code and data go to chains of their own, each ending its frame, and
/// copies of earlier chunks follow their sources' lanes.
#[test]
fn raw_chunks_go_to_the_lane_of_their_content() {
    let mem = vec![0u8; 40 * PAGE];
    let mut cm = mem.clone();
    for p in 0..10 {
        let k = p as u64;
        cm[p * PAGE..(p + 1) * PAGE].copy_from_slice(&text_page(k));
        cm[(10 + p) * PAGE..(11 + p) * PAGE].copy_from_slice(&code_page(k));
        cm[(20 + p) * PAGE..(21 + p) * PAGE].copy_from_slice(&data_page(k));
    }
    for p in 0..3 {
        cm.copy_within(p * 10 * PAGE..(p * 10 + 1) * PAGE, (30 + p) * PAGE);
    }
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem)], vec![cm]);
    // Level 4 also compresses the lanes other than code's at level 3.
    let cases =
        [(Compression::Zstd, 1, 1), (Compression::Zstd, 2, 1), (Compression::Zstd, 2, 4), (Compression::Zstd, 3, 4)];
    for (c, lanes, level) in cases.into_iter().chain([(Compression::Xz, 3, 1)]) {
        let opts = CreateOptions { compression: c, level, blob_bytes: 2 * PAGE, lanes, ..CreateOptions::default() };
        let s = pair.round_trip(&opts, &format!("lanes-{c:?}-{lanes}-{level}"));
        assert_eq!(s.kinds.copy_self.chunks, 3);
        let (_, ovl, _) = pair.create(&opts);
        let mut r = OverlayReader::new(&ovl[..]).unwrap();
        let mut per_lane = [0usize; 4];
        while let Some(b) = r.next_blob().unwrap() {
            assert!(b.is_chained());
            per_lane[usize::from(b.lane())] += 1;
        }
        let used = per_lane.iter().filter(|&&n| n > 0).count();
        assert_eq!(used, usize::from(lanes), "{per_lane:?}");
    }
}

#[test]
fn incompressible_chunks_are_told_from_compressible_ones() {
    assert!(looks_incompressible(&page(1)));
    assert!(looks_incompressible(&page(2)));
    assert!(!looks_incompressible(&text_page(1)));
    assert!(!looks_incompressible(&[0u8; PAGE]));
    assert!(!looks_incompressible(&page(1)[..PAGE - 1]), "short chunks are never dense");
    // Already-compressed bytes look random.
    let text: Vec<u8> = (0..64).flat_map(text_page).collect();
    let packed = zstd::bulk::compress(&text, 19).unwrap();
    assert!(packed.len() >= PAGE, "{}", packed.len());
    assert!(looks_incompressible(&packed[..PAGE]));
    // Half random, half text: compressible enough to keep in the light stream.
    let mut mixed = page(3);
    mixed[PAGE / 2..].copy_from_slice(&text_page(3)[PAGE / 2..]);
    assert!(!looks_incompressible(&mixed));
}

#[test]
fn dense_and_light_chunks_go_to_their_own_blobs() {
    let mem: Vec<u8> = (0..32).flat_map(text_page).collect();
    let disk: Vec<u8> = (100..108).flat_map(page).collect();
    let mut cm = mem.clone();
    for p in 0..8 {
        cm[p * PAGE..(p + 1) * PAGE].copy_from_slice(&page(1000 + p as u64)); // dense
        cm[(8 + p) * PAGE..(9 + p) * PAGE].copy_from_slice(&text_page(1000 + p as u64));
        // light
    }
    // Copies of earlier raw chunks of both kinds, interleaved.
    cm.copy_within(0..PAGE, 16 * PAGE);
    cm.copy_within(8 * PAGE..9 * PAGE, 17 * PAGE);
    cm.copy_within(PAGE..2 * PAGE, 18 * PAGE);
    let pair =
        Pair::new(vec![("memory", ImageKind::Memory, mem), ("disk0", ImageKind::Disk, disk.clone())], vec![cm, disk]);
    let cases = [(Compression::Zstd, true), (Compression::Xz, true), (Compression::Zstd, false)];
    for (k, (c, sep)) in cases.into_iter().enumerate() {
        let opts = CreateOptions {
            compression: c,
            blob_bytes: 3 * PAGE,
            dense_blob_bytes: 3 * PAGE,
            separate_dense: sep,
            ..CreateOptions::default()
        };
        let s = pair.round_trip(&opts, &format!("dense{k}"));
        assert_eq!(s.kinds.copy_self.chunks, 3);
        if sep {
            assert_eq!(s.dense_chunks, 8);
            assert!(s.dense_blobs >= 2 && s.dense_blobs < s.blobs, "{s:?}");
        } else {
            assert_eq!((s.dense_chunks, s.dense_blobs), (0, 0));
        }
    }
}

/// The chain of light blobs ends even when the last batches hold only dense chunks: the light
/// blobs went out in earlier steps, and an empty chained blob ends the frame.
#[test]
fn the_chain_ends_after_its_last_light_blob() {
    let mem: Vec<u8> = (0..64).flat_map(|_| vec![0u8; PAGE]).collect();
    let mut cm = mem.clone();
    for p in 0..64 {
        let data = if p < 16 { text_page(p as u64) } else { page(p as u64) };
        cm[p * PAGE..(p + 1) * PAGE].copy_from_slice(&data);
    }
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem)], vec![cm]);
    for chain in [true, false] {
        let opts = CreateOptions { blob_bytes: PAGE, batch_bytes: 8 * PAGE as u64, chain, ..CreateOptions::default() };
        pair.round_trip(&opts, &format!("chain-{chain}"));
        let (_, ovl, stats) = pair.create(&opts);
        let mut r = OverlayReader::new(&ovl[..]).unwrap();
        let mut chained = Vec::new();
        while let Some(b) = r.next_blob().unwrap() {
            if b.is_chained() {
                chained.push(b.record_count());
            }
        }
        if chain {
            // One light blob per text page, then the empty one that ends the frame.
            assert_eq!(chained.len(), 17, "{stats:?}");
            assert_eq!(chained.last(), Some(&0));
        } else {
            assert!(chained.is_empty());
        }
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Text(usize, u64),
    Code(usize, u64),
    Random(usize, u64),
    Zero(usize),
    Move(usize, usize),
    Poke(usize, usize, u8),
    FromDisk(usize, usize),
    /// Disk page `.0` becomes base disk page `.1`.
    DiskMove(usize, usize),
    /// Disk page `.0` becomes memory page `.1` (as the customization left it so far).
    DiskFromMemory(usize, usize),
    DiskPoke(usize, usize, u8),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(
        prop_oneof![
            (0usize..48, any::<u64>()).prop_map(|(p, s)| Edit::Random(p, s)),
            (0usize..48, any::<u64>()).prop_map(|(p, s)| Edit::Text(p, s)),
            (0usize..48, any::<u64>()).prop_map(|(p, s)| Edit::Code(p, s)),
            (0usize..48).prop_map(Edit::Zero),
            (0usize..48, 0usize..48).prop_map(|(a, b)| Edit::Move(a, b)),
            (0usize..48, 0usize..PAGE, any::<u8>()).prop_map(|(p, o, v)| Edit::Poke(p, o, v)),
            (0usize..48, 0usize..16).prop_map(|(p, d)| Edit::FromDisk(p, d)),
            (0usize..16, 0usize..16).prop_map(|(a, b)| Edit::DiskMove(a, b)),
            (0usize..16, 0usize..48).prop_map(|(d, p)| Edit::DiskFromMemory(d, p)),
            (0usize..16, 0usize..PAGE, any::<u8>()).prop_map(|(p, o, v)| Edit::DiskPoke(p, o, v)),
        ],
        0..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn apply_of_diff_rebuilds_the_custom_images(
        e in edits(),
        grow in 0usize..3000,
        c in 0usize..3,
        sep in any::<bool>(),
        chain in any::<bool>(),
        qcow2 in any::<bool>(),
        lanes in 1u8..=3,
    ) {
        let mut mem: Vec<u8> = (0..48).flat_map(|i| if i % 5 == 0 { vec![0; PAGE] } else { page(i as u64) }).collect();
        let disk: Vec<u8> = (0..16).flat_map(|i| page(500 + i as u64)).collect();
        let base_mem = mem.clone();
        let mut cd = disk.clone();
        for edit in e {
            match edit {
                Edit::Random(p, s) => mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&page(s)),
                Edit::Text(p, s) => mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&text_page(s)),
                Edit::Code(p, s) => mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&code_page(s)),
                Edit::Zero(p) => mem[p * PAGE..(p + 1) * PAGE].fill(0),
                Edit::Move(a, b) => {
                    let src = mem[a * PAGE..(a + 1) * PAGE].to_vec();
                    mem[b * PAGE..(b + 1) * PAGE].copy_from_slice(&src);
                }
                Edit::Poke(p, o, v) => mem[p * PAGE + o] = v,
                Edit::FromDisk(p, d) => mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&disk[d * PAGE..(d + 1) * PAGE]),
                Edit::DiskMove(a, b) => cd[a * PAGE..(a + 1) * PAGE].copy_from_slice(&disk[b * PAGE..(b + 1) * PAGE]),
                Edit::DiskFromMemory(d, p) => cd[d * PAGE..(d + 1) * PAGE].copy_from_slice(&mem[p * PAGE..(p + 1) * PAGE]),
                Edit::DiskPoke(p, o, v) => cd[p * PAGE + o] ^= v | 1,
            }
        }
        cd.resize(disk.len() + grow, 0x5a);
        let compression = [Compression::None, Compression::Zstd, Compression::Xz][c];
        let pair = Pair::new(
            vec![("memory", ImageKind::Memory, base_mem), ("disk0", ImageKind::Disk, disk)],
            vec![mem, cd],
        );
        let opts = CreateOptions {
            compression,
            level: 1,
            blob_bytes: 20 << 10,
            dense_blob_bytes: 12 << 10,
            batch_bytes: 64 << 10,
            separate_dense: sep,
            chain,
            lanes,
            ..CreateOptions::default()
        };
        pair.round_trip_to(&opts, "prop", qcow2);
    }
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/setup-host.sh installs qemu-utils)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The custom disk as a qcow2 layer over the base disk, written by QEMU's own tools: only the
/// layer's clusters are read, and the overlay rebuilds exactly what QEMU reads from the layer.
#[test]
fn qcow2_layer_over_the_base_disk() {
    for cluster in ["4k", "64k"] {
        let disk: Vec<u8> = (0..256).flat_map(|i| if i % 5 == 0 { vec![0; PAGE] } else { page(i) }).collect();
        let mem: Vec<u8> = (0..64).flat_map(|i| page(1000 + i)).collect();
        let pair = Pair::new(
            vec![("memory", ImageKind::Memory, mem.clone()), ("disk0", ImageKind::Disk, disk)],
            vec![mem.clone(), vec![]],
        );
        let d = pair.dir.path();
        let layer = d.join("layer.qcow2");
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-o"])
            .arg(format!("cluster_size={cluster}"))
            .arg("-b")
            .arg(d.join("base-disk0"))
            .arg(&layer));
        run(std::process::Command::new("qemu-io").arg("-f").arg("qcow2").arg(&layer).args([
            "-c",
            "write -P 0x5a 8k 4k", // fresh bytes
            "-c",
            "write -z 128k 64k", // zeros over content
            "-c",
            "write -P 0x11 300k 12k", // a run
            "-c",
            "write -P 0 400k 4k", // zero data
            "-c",
            "write -P 0x5a 512k 4k", // the same page again (self-dedup)
        ]));
        // A base page copied to another offset, through a raw read of the base.
        let expected = d.join("expected.raw");
        run(std::process::Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&layer).arg(&expected));
        let base = Base::build(&pair.base_images(), &|_| {}).unwrap();
        let customs = vec![
            CustomImage { name: "memory".into(), source: CustomSource::Raw(d.join("custom-memory")) },
            CustomImage { name: "disk0".into(), source: CustomSource::Qcow2(layer.clone()) },
        ];
        let (ovl, stats) =
            create_overlay(&base, &customs, &pair.info(), b"device", &CreateOptions::default(), &|_| {}, Vec::new())
                .unwrap();
        assert!(stats.changed_chunks <= 2 + 16 + 3 + 1 + 1, "{cluster}: {} changed chunks", stats.changed_chunks);
        // Two pages of the 0x11 run and the repeated 0x5a page.
        assert_eq!(stats.kinds.copy_self.chunks, 3, "{cluster}: {:?}", stats.kinds);
        let outputs = pair.outputs(cluster);
        let a = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: outputs.clone(),
            fsync: false,
            qcow2_disks: false,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        apply_overlay(&base, &ovl[..], &a, &|_| {}).unwrap();
        assert!(std::fs::read(&outputs[1].1).unwrap() == std::fs::read(&expected).unwrap(), "{cluster}: disk differs");
        assert!(std::fs::read(&outputs[0].1).unwrap() == mem);

        // The same overlay applied with the disk as a qcow2 layer over the base disk: clean
        // for `qemu-img check`, only the changed chunks stored, and the same guest bytes.
        let outputs = pair.outputs(&format!("{cluster}-q"));
        let a = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: outputs.clone(),
            fsync: false,
            qcow2_disks: true,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        apply_overlay(&base, &ovl[..], &a, &|_| {}).unwrap();
        let q = &outputs[1].1;
        run(std::process::Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(q));
        let layer_len = std::fs::metadata(q).unwrap().len();
        assert!(layer_len <= (stats.changed_chunks + 8) * PAGE as u64, "{cluster}: layer is {layer_len} bytes");
        let back = d.join(format!("back-{cluster}.raw"));
        run(std::process::Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(q).arg(&back));
        assert!(std::fs::read(&back).unwrap() == std::fs::read(&expected).unwrap(), "{cluster}: qcow2 output differs");
        // Its backing file is the base disk, and the engine reads it back as a layer.
        let l = qcow2::Qcow2Layer::open(q).unwrap();
        assert_eq!(l.backing_path().unwrap(), std::fs::canonicalize(d.join("base-disk0")).unwrap());

        // A layer over some other file is refused, naming both.
        let other = d.join("other.qcow2");
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(d.join("custom-memory"))
            .arg(&other));
        let customs =
            vec![customs[0].clone(), CustomImage { name: "disk0".into(), source: CustomSource::Qcow2(other) }];
        let e = create_overlay(&base, &customs, &pair.info(), b"d", &CreateOptions::default(), &|_| {}, Vec::new())
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("custom-memory") && msg.contains("base-disk0"), "{msg}");
    }
}

/// A qcow2 output with thousands of clusters (several refcount blocks, several L2 tables), an
/// odd size and a disk that grew: `qemu-img check` clean and byte-exact.
#[test]
fn qcow2_output_large_and_odd_sized() {
    let n = 10_000usize;
    let base_disk = vec![0u8; 9_000 * PAGE + 700];
    let mut custom: Vec<u8> = (0..n as u64).flat_map(|i| if i % 7 == 0 { vec![0; PAGE] } else { page(i) }).collect();
    custom.truncate(n * PAGE - 1234);
    let mem = page(1);
    let pair = Pair::new(
        vec![("memory", ImageKind::Memory, mem.clone()), ("disk0", ImageKind::Disk, base_disk)],
        vec![mem, custom.clone()],
    );
    let (base, ovl, _) = pair.create(&CreateOptions::default());
    let outputs = pair.outputs("big");
    let a = ApplyOptions {
        base_id: BaseId([9; 32]),
        outputs: outputs.clone(),
        fsync: true,
        qcow2_disks: true,
        max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
    };
    apply_overlay(&base, &ovl[..], &a, &|_| {}).unwrap();
    let q = &outputs[1].1;
    run(std::process::Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(q));
    let back = pair.dir.path().join("back.raw");
    run(std::process::Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(q).arg(&back));
    let got = std::fs::read(&back).unwrap();
    // The header keeps the exact size; QEMU sees whole 512-byte sectors of it.
    assert_eq!(got.len(), custom.len() / 512 * 512);
    assert!(got[..] == custom[..got.len()]);
    assert_eq!(qcow2::Qcow2Layer::open(q).unwrap().virtual_size(), custom.len() as u64);
}

/// A disk whose pages all moved by one: one long copy from the base (longer than the pieces
/// it is copied in), rebuilt the same as a raw image and as a qcow2 layer.
#[test]
fn long_copies_from_the_base() {
    let disk: Vec<u8> = (0..600).flat_map(|i| page(7000 + i)).collect();
    let mut cd = disk[PAGE..].to_vec();
    cd.extend_from_slice(&page(1));
    let mem = page(2);
    let pair =
        Pair::new(vec![("memory", ImageKind::Memory, mem.clone()), ("disk0", ImageKind::Disk, disk)], vec![mem, cd]);
    for qcow2 in [false, true] {
        let s = pair.round_trip_to(&CreateOptions::default(), &format!("long-{qcow2}"), qcow2);
        assert_eq!(s.kinds.copy_base.chunks, 599);
        assert!(s.kinds.copy_base.records <= 2, "{:?}", s.kinds);
    }
}

/// The header, metadata and device state of an overlay whose images are `images` over a base
/// of one 64 KiB memory image and one 64 KiB disk, cut off after the device state: a few
/// hundred bytes that declare whatever sizes they like.
fn declared(images: &[(u64, u64, u64)], ram_bytes: u64) -> Vec<u8> {
    use overlay_format::{DiskSpec, ImageMeta, OverlayMeta, OverlayWriter};
    let names = ["memory", "disk0"];
    let kinds = [ImageKind::Memory, ImageKind::Disk];
    let meta = OverlayMeta {
        base_id: BaseId([9; 32]),
        spec: VmSpec { ram_bytes, disks: vec![DiskSpec { name: "disk0".into(), size_bytes: images[1].0 }], ..spec() },
        images: images
            .iter()
            .enumerate()
            .map(|(i, &(size, base_size, _))| ImageMeta { name: names[i].into(), kind: kinds[i], size, base_size })
            .collect(),
        compression: Compression::Zstd,
        forwards: vec![],
        name: "hostile".into(),
        created_unix: 0,
        creator: "tests".into(),
    };
    let mut out = Vec::new();
    let mut w = OverlayWriter::new(&mut out, &meta).unwrap();
    w.write_device_state(b"device", 3).unwrap();
    drop(w);
    out
}

/// The 277-byte overlays seen in the wild: memory declared 8 TiB (or 1 PiB), cut off after the
/// device state. Applying refuses them naming the field and both sizes, before any output file
/// exists; so are a disk grown past the bound and a base_size that is not the base's.
#[test]
fn absurd_declared_sizes_are_refused_before_any_file_exists() {
    const K64: u64 = 64 << 10;
    let mem: Vec<u8> = (0..16).flat_map(page).collect();
    let disk: Vec<u8> = (100..116).flat_map(page).collect();
    let pair = Pair::new(
        vec![("memory", ImageKind::Memory, mem.clone()), ("disk0", ImageKind::Disk, disk.clone())],
        vec![mem, disk],
    );
    let base = Base::build(&pair.base_images(), &|_| {}).unwrap();
    let growth = 1 << 30;
    let cases: Vec<(Vec<u8>, &str, &str, u64)> = vec![
        (declared(&[(8 << 40, K64, 0), (K64, K64, 0)], 8 << 40), "memory", "size", 8 << 40),
        (declared(&[(1 << 50, K64, 0), (K64, K64, 0)], 1 << 50), "memory", "size", 1 << 50),
        (declared(&[(K64, K64, 0), (K64 + growth + 1, K64, 0)], K64), "disk0", "size", K64 + growth + 1),
        (declared(&[(K64, K64, 0), (1 << 52, K64, 0)], K64), "disk0", "size", 1 << 52),
        (declared(&[(K64, 1 << 40, 0), (K64, K64, 0)], K64), "memory", "base_size", 1 << 40),
        (declared(&[(K64, K64, 0), (K64, K64 - 1, 0)], K64), "disk0", "base_size", K64 - 1),
    ];
    for (k, (bytes, image, field, value)) in cases.into_iter().enumerate() {
        assert!(bytes.len() < 400, "case {k}: {} bytes", bytes.len());
        let opts = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: pair.outputs(&format!("hostile{k}")),
            fsync: false,
            qcow2_disks: k % 2 == 1,
            max_disk_growth: growth,
        };
        let e = apply_overlay(&base, &bytes[..], &opts, &|_| {}).unwrap_err();
        match &e {
            ApplyError::ImageMismatch { image: i, field: f, overlay, base: b, .. } => {
                assert_eq!((i.as_str(), *f, *overlay, *b), (image, field, value, K64), "case {k}: {e}");
            }
            other => panic!("case {k}: not an image mismatch: {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&value.to_string()) && msg.contains(&K64.to_string()), "case {k}: {msg}");
        assert!(e.is_bad_input(), "case {k}");
        assert_eq!(leftovers(pair.dir.path()), Vec::<String>::new(), "case {k}: files were created");
    }
    // Within the bound, the same cut-off overlay gets as far as the missing blobs.
    let bytes = declared(&[(K64, K64, 0), (K64 + growth, K64, 0)], K64);
    let opts = ApplyOptions {
        base_id: BaseId([9; 32]),
        outputs: pair.outputs("grown"),
        fsync: false,
        qcow2_disks: false,
        max_disk_growth: growth,
    };
    let e = apply_overlay(&base, &bytes[..], &opts, &|_| {}).unwrap_err();
    assert!(matches!(e, ApplyError::Decode(overlay_format::DecodeError::Truncated { .. })), "{e}");
    assert!(e.is_bad_input());
    assert_eq!(leftovers(pair.dir.path()), Vec::<String>::new());
}

/// Records that cover the images' chunks more than once in all (a few bytes each, any amount
/// of work) are refused: each chunk is rebuilt once.
#[test]
fn records_covering_the_images_over_and_over_are_refused() {
    use overlay_format::{BlobBuilder, ImageDigest, ImageMeta, OverlayMeta, OverlayWriter};
    let mem: Vec<u8> = (0..16).flat_map(page).collect();
    let pair = Pair::new(vec![("memory", ImageKind::Memory, mem.clone())], vec![mem]);
    let base = Base::build(&pair.base_images(), &|_| {}).unwrap();
    let size = 16 * PAGE as u64;
    let meta = OverlayMeta {
        base_id: BaseId([9; 32]),
        spec: VmSpec { ram_bytes: size, ..spec() },
        images: vec![ImageMeta { name: "memory".into(), kind: ImageKind::Memory, size, base_size: size }],
        compression: Compression::Zstd,
        forwards: vec![],
        name: "t".into(),
        created_unix: 0,
        creator: "tests".into(),
    };
    for (times, ok) in [(1, true), (2, false)] {
        let mut w = OverlayWriter::new(Vec::new(), &meta).unwrap();
        w.write_device_state(b"d", 3).unwrap();
        let mut b = BlobBuilder::new();
        for _ in 0..times {
            b.push_zero(0, 0, 16);
        }
        w.write_blob(&b.seal(Compression::Zstd, 3).unwrap()).unwrap();
        let t = w.trailer(vec![ImageDigest::of_bytes(&vec![0u8; size as usize])]);
        let ovl = w.finish(&t).unwrap();
        let opts = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: pair.outputs(&format!("zero{times}")),
            fsync: false,
            qcow2_disks: false,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        match apply_overlay(&base, &ovl[..], &opts, &|_| {}) {
            Ok(_) => assert!(ok, "{times} zero runs over the whole image applied"),
            Err(e @ ApplyError::Record { .. }) if !ok => {
                assert!(e.to_string().contains("16 chunks") && e.is_bad_input(), "{e}");
                assert_eq!(leftovers(pair.dir.path()), vec!["out-zero1-memory".to_string()]);
            }
            Err(e) => panic!("{times}: {e}"),
        }
    }
}
