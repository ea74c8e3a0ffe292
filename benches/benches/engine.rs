//! Micro-benchmarks of the delta engine: index build, overlay creation (scan + compress),
//! blob sealing, and apply, on a 64 MiB synthetic memory pair.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use delta_engine::*;
use overlay_format::{BaseId, BlobBuilder, Compression, ImageKind, VmSpec};

const PAGES: usize = 16384; // 64 MiB

fn info() -> OverlayInfo {
    OverlayInfo {
        base_id: BaseId([1; 32]),
        spec: VmSpec {
            machine_type: "pc-q35-10.0".into(),
            cpu_model: "qemu64".into(),
            vcpus: 1,
            ram_bytes: (PAGES * 4096) as u64,
            qemu_version: "10.0.2".into(),
            accelerator: "tcg".into(),
            disks: vec![],
            kernel_cmdline: None,
        },
        forwards: vec![],
        name: "bench".into(),
        creator: "bench".into(),
        created_unix: 0,
    }
}

fn engine(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (bm, cm) = cloudlet_benches::memory_pair_in(dir.path(), PAGES, 0.2, 1).unwrap();
    let images = [BaseImage { name: "memory".into(), kind: ImageKind::Memory, path: bm }];
    let custom = [CustomImage { name: "memory".into(), source: CustomSource::Raw(cm) }];
    let bytes = (PAGES * 4096) as u64;

    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("index_build_64MiB", |b| b.iter(|| BaseIndex::build(&images, &|_| {}).unwrap()));
    let base = Base::build(&images, &|_| {}).unwrap();
    for (name, opts) in [
        ("create_zstd3_64MiB", CreateOptions::default()),
        ("create_uncompressed_64MiB", CreateOptions { compression: Compression::None, ..CreateOptions::default() }),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| create_overlay(&base, &custom, &info(), b"", &opts, &|_| {}, std::io::sink()).unwrap())
        });
    }
    let (overlay, _) =
        create_overlay(&base, &custom, &info(), b"", &CreateOptions::default(), &|_| {}, Vec::new()).unwrap();
    let mut n = 0;
    g.bench_function("apply_zstd3_64MiB", |b| {
        b.iter(|| {
            n += 1;
            let out = dir.path().join(format!("out-{n}"));
            let opts = ApplyOptions {
                base_id: BaseId([1; 32]),
                outputs: vec![("memory".into(), out.clone())],
                fsync: false,
                qcow2_disks: false,
                max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
            };
            apply_overlay(&base, &overlay[..], &opts, &|_| {}).unwrap();
            std::fs::remove_file(out).unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("compress");
    let raw = std::fs::read(custom_path(&custom)).unwrap();
    let blob_bytes = 4 << 20;
    g.throughput(Throughput::Bytes(blob_bytes as u64));
    g.sample_size(10);
    for (name, comp, level) in [("seal_4MiB_zstd3", Compression::Zstd, 3), ("seal_4MiB_xz6", Compression::Xz, 6)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut bb = BlobBuilder::new();
                bb.push_raw(0, 0, &raw[..blob_bytes]);
                bb.seal(comp, level).unwrap()
            })
        });
    }
    g.finish();
}

fn custom_path(c: &[CustomImage]) -> std::path::PathBuf {
    match &c[0].source {
        CustomSource::Raw(p) | CustomSource::Qcow2(p) => p.clone(),
    }
}

criterion_group!(benches, engine);
criterion_main!(benches);
