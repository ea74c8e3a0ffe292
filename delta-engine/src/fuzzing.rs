//! Entry points shared by the `apply` fuzz target (`fuzz/`) and the tests that replay its
//! corpus, so that both run the same code: a small base VM of a memory image and a disk in the
//! temporary directory, and overlays applied to it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use overlay_format::{BaseId, Compression, DiskSpec, ImageKind, VmSpec};

use crate::{
    apply_overlay, create_overlay, ApplyOptions, Base, BaseImage, CreateOptions, CustomImage, CustomSource, OverlayInfo,
};

/// The id of the [`FuzzBase`] (an overlay must name it to get past the first check).
pub const FUZZ_BASE_ID: BaseId = BaseId([0x5a; 32]);
/// Size of the fuzz base's memory image: 16 chunks.
pub const FUZZ_MEMORY: u64 = 16 * 4096;
/// Size of the fuzz base's disk `disk0`: 12 chunks, the last one 100 bytes.
pub const FUZZ_DISK: u64 = 11 * 4096 + 100;
/// How much a disk may grow over the fuzz base's (small, so that inputs stay fast).
pub const FUZZ_DISK_GROWTH: u64 = 1 << 20;

/// A small base VM in the temporary directory (`cloudlet-fuzz-base`, shared by every process
/// that uses it: its bytes are always the same, so it is written once and left for the next).
pub struct FuzzBase {
    dir: PathBuf,
    base: Base,
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            // Some zero chunks, some repeated ones, the rest noise.
            match (i / 4096) % 5 {
                0 => 0,
                1 => (i / 4096) as u8,
                _ => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            }
        })
        .collect()
}

fn spec(ram_bytes: u64, disk: u64) -> VmSpec {
    VmSpec {
        machine_type: "pc-q35-10.0".into(),
        cpu_model: "qemu64".into(),
        vcpus: 1,
        ram_bytes,
        qemu_version: "10.0.2".into(),
        accelerator: "tcg".into(),
        disks: vec![DiskSpec { name: "disk0".into(), size_bytes: disk }],
        kernel_cmdline: None,
    }
}

impl FuzzBase {
    /// Builds (or finds) the base under the system's temporary directory.
    fn new() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join("cloudlet-fuzz-base");
        std::fs::create_dir_all(&dir)?;
        let images = [
            BaseImage { name: "memory".into(), kind: ImageKind::Memory, path: dir.join("base-memory") },
            BaseImage { name: "disk0".into(), kind: ImageKind::Disk, path: dir.join("base-disk0") },
        ];
        for (img, bytes) in images.iter().zip([pattern(1, FUZZ_MEMORY), pattern(2, FUZZ_DISK)]) {
            if std::fs::read(&img.path).ok().as_deref() != Some(&bytes[..]) {
                // Whole or not at all, for other processes building it at the same time.
                let tmp = dir.join(format!(".{}.{}", img.name, std::process::id()));
                std::fs::write(&tmp, &bytes)?;
                std::fs::rename(&tmp, &img.path)?;
            }
        }
        let base = Base::build(&images, &|_| {}).map_err(std::io::Error::other)?;
        Ok(FuzzBase { dir, base })
    }

    /// The base built once for this process.
    pub fn shared() -> &'static FuzzBase {
        static BASE: OnceLock<FuzzBase> = OnceLock::new();
        BASE.get_or_init(|| FuzzBase::new().expect("cannot build the fuzz base in the temporary directory"))
    }

    /// The base.
    pub fn base(&self) -> &Base {
        &self.base
    }

    /// Valid overlays for this base (seeds for the corpus): each compression, with and
    /// without chains, with a disk that grows and one that shrinks.
    pub fn seed_overlays(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut n = 0;
        for (k, disk_len) in (0u64..).zip([FUZZ_DISK, FUZZ_DISK + 3 * 4096 + 7, 5 * 4096]) {
            let mut mem = pattern(1, FUZZ_MEMORY);
            mem[5 * 4096..6 * 4096].copy_from_slice(&pattern(2, 6 * 4096)[3 * 4096..4 * 4096]);
            mem[7 * 4096 + 10] ^= 0xff;
            mem[9 * 4096..10 * 4096].fill(0);
            mem[12 * 4096..13 * 4096].copy_from_slice(&pattern(7 + k, 4096));
            mem[14 * 4096..15 * 4096].copy_from_slice(&pattern(7 + k, 4096));
            let mut disk = pattern(2, FUZZ_DISK);
            disk.resize(disk_len as usize, 0x33);
            disk[4096] ^= 1;
            for (compression, chain) in
                [(Compression::None, false), (Compression::Zstd, true), (Compression::Xz, false)]
            {
                n += 1;
                let pid = std::process::id();
                let mem_path = self.dir.join(format!("seed-{pid}-{n}-memory"));
                let disk_path = self.dir.join(format!("seed-{pid}-{n}-disk0"));
                if std::fs::write(&mem_path, &mem).and_then(|()| std::fs::write(&disk_path, &disk)).is_err() {
                    continue;
                }
                let custom = [
                    CustomImage { name: "memory".into(), source: CustomSource::Raw(mem_path.clone()) },
                    CustomImage { name: "disk0".into(), source: CustomSource::Raw(disk_path.clone()) },
                ];
                let info = OverlayInfo {
                    base_id: FUZZ_BASE_ID,
                    spec: spec(FUZZ_MEMORY, disk_len),
                    forwards: vec![],
                    name: "seed".into(),
                    creator: "fuzzing".into(),
                    created_unix: 0,
                };
                let opts = CreateOptions { compression, chain, level: 1, ..CreateOptions::default() };
                if let Ok((bytes, _)) =
                    create_overlay(&self.base, &custom, &info, b"device", &opts, &|_| {}, Vec::new())
                {
                    out.push(bytes);
                }
                let _ = std::fs::remove_file(mem_path);
                let _ = std::fs::remove_file(disk_path);
            }
        }
        out
    }

    /// Applies `overlay` to this base into a fresh directory (raw disks, or qcow2 layers when
    /// `qcow2`) and removes what it wrote. Returns whether it applied. Panics only when a
    /// failed apply leaves a file behind, the one outcome the fuzz target looks for besides a
    /// crash.
    pub fn apply(&self, overlay: &[u8], qcow2: bool) -> bool {
        static N: AtomicU64 = AtomicU64::new(0);
        let out = self.dir.join(format!("out-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        if std::fs::create_dir(&out).is_err() {
            return false;
        }
        let opts = ApplyOptions {
            base_id: FUZZ_BASE_ID,
            outputs: vec![("memory".into(), out.join("memory")), ("disk0".into(), out.join("disk0"))],
            fsync: false,
            qcow2_disks: qcow2,
            max_disk_growth: FUZZ_DISK_GROWTH,
        };
        let ok = apply_overlay(&self.base, overlay, &opts, &|_| {}).is_ok();
        if !ok {
            let left = leftovers(&out);
            assert!(left.is_empty(), "a failed apply left {left:?} behind");
        }
        let _ = std::fs::remove_dir_all(&out);
        ok
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// What the `apply` fuzz target runs on every input: the bytes as they are and
/// [resealed](overlay_format::fuzzing::reseal), applied to the [shared](FuzzBase::shared) base
/// (as raw or qcow2 disks, by the input's first byte). Returns whether either applied.
pub fn apply_all(input: &[u8]) -> bool {
    let base = FuzzBase::shared();
    let qcow2 = input.first().is_some_and(|b| b & 1 == 1);
    let a = base.apply(input, qcow2);
    let b = base.apply(&overlay_format::fuzzing::reseal(input), qcow2);
    a || b
}
