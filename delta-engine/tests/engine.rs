//! `apply(base, diff(base, x)) == x`, classification, and failure behaviour.

use std::path::{Path, PathBuf};

use delta_engine::*;
use overlay_format::{BaseId, Compression, ImageKind, VmSpec};
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

fn info() -> OverlayInfo {
    OverlayInfo {
        base_id: BaseId([9; 32]),
        spec: spec(),
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
            create_overlay(&base, &self.customs(), &info(), b"device", opts, &|_| {}, Vec::new()).unwrap();
        (base, ovl, stats)
    }

    fn outputs(&self, tag: &str) -> Vec<(String, PathBuf)> {
        self.base.iter().map(|(n, ..)| (n.clone(), self.dir.path().join(format!("out-{tag}-{n}")))).collect()
    }

    fn round_trip(&self, opts: &CreateOptions, tag: &str) -> CreateStats {
        let (base, ovl, stats) = self.create(opts);
        let outputs = self.outputs(tag);
        let a = ApplyOptions { base_id: BaseId([9; 32]), outputs: outputs.clone(), fsync: false };
        let report = apply_overlay(&base, &ovl[..], &a, &|_| {}).unwrap();
        assert_eq!(report.device_state, b"device");
        for (i, (_, p)) in outputs.iter().enumerate() {
            let got = std::fs::read(p).unwrap();
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
    let a = ApplyOptions { base_id: BaseId([8; 32]), outputs: outputs.clone(), fsync: false };
    let err = apply_overlay(&base, &ovl[..], &a, &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&BaseId([9; 32]).to_hex()) && msg.contains(&BaseId([8; 32]).to_hex()), "{msg}");
    assert!(!outputs[0].1.exists());
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
    let opts = CreateOptions { blob_bytes: 16 << 10, ..CreateOptions::default() };
    let (base, ovl, stats) = pair.create(&opts);
    assert!(stats.blobs > 2);
    let cuts = [ovl.len() / 3, ovl.len() / 2, ovl.len() - 1];
    for (k, cut) in cuts.into_iter().enumerate() {
        let a = ApplyOptions { base_id: BaseId([9; 32]), outputs: pair.outputs(&format!("cut{k}")), fsync: false };
        assert!(apply_overlay(&base, &ovl[..cut], &a, &|_| {}).is_err());
    }
    for (k, at) in [200usize, ovl.len() / 2, ovl.len() - 50].into_iter().enumerate() {
        let mut bad = ovl.clone();
        bad[at] ^= 0x20;
        let a = ApplyOptions { base_id: BaseId([9; 32]), outputs: pair.outputs(&format!("flip{k}")), fsync: false };
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

#[derive(Debug, Clone)]
enum Edit {
    Random(usize, u64),
    Zero(usize),
    Move(usize, usize),
    Poke(usize, usize, u8),
    FromDisk(usize, usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(
        prop_oneof![
            (0usize..48, any::<u64>()).prop_map(|(p, s)| Edit::Random(p, s)),
            (0usize..48).prop_map(Edit::Zero),
            (0usize..48, 0usize..48).prop_map(|(a, b)| Edit::Move(a, b)),
            (0usize..48, 0usize..PAGE, any::<u8>()).prop_map(|(p, o, v)| Edit::Poke(p, o, v)),
            (0usize..48, 0usize..16).prop_map(|(p, d)| Edit::FromDisk(p, d)),
        ],
        0..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn apply_of_diff_rebuilds_the_custom_images(e in edits(), grow in 0usize..3000, c in 0usize..3) {
        let mut mem: Vec<u8> = (0..48).flat_map(|i| if i % 5 == 0 { vec![0; PAGE] } else { page(i as u64) }).collect();
        let disk: Vec<u8> = (0..16).flat_map(|i| page(500 + i as u64)).collect();
        let base_mem = mem.clone();
        let mut cd = disk.clone();
        for edit in e {
            match edit {
                Edit::Random(p, s) => mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&page(s)),
                Edit::Zero(p) => mem[p * PAGE..(p + 1) * PAGE].fill(0),
                Edit::Move(a, b) => {
                    let src = mem[a * PAGE..(a + 1) * PAGE].to_vec();
                    mem[b * PAGE..(b + 1) * PAGE].copy_from_slice(&src);
                }
                Edit::Poke(p, o, v) => mem[p * PAGE + o] = v,
                Edit::FromDisk(p, d) => mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&disk[d * PAGE..(d + 1) * PAGE]),
            }
        }
        cd.resize(disk.len() + grow, 0x5a);
        let compression = [Compression::None, Compression::Zstd, Compression::Xz][c];
        let pair = Pair::new(
            vec![("memory", ImageKind::Memory, base_mem), ("disk0", ImageKind::Disk, disk)],
            vec![mem, cd],
        );
        let opts = CreateOptions { compression, level: 1, blob_bytes: 20 << 10, batch_bytes: 64 << 10, ..CreateOptions::default() };
        pair.round_trip(&opts, "prop");
    }
}
