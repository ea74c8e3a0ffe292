//! What a guest page fault costs when its RAM image is served through FUSE (`lazy-image`),
//! against the same fault on a plain file: a shared mapping of a 64 MiB image, every page
//! touched once in a random order, as a resumed guest touches its memory.
//!
//! - `local_cached`: a plain file whose pages are in the page cache (a fault maps them);
//! - `local_cold`: a plain file dropped from the page cache first (a fault reads the disk);
//! - `fuse_base_128k`, `fuse_base_4k`: the image served with the plain file as its base
//!   (cached, as a base on a cloudlet is), the mount fresh, so every fault goes through FUSE;
//!   with requests of up to 128 KiB (the default) or 4 KiB;
//! - `fuse_pending_4k`: every chunk pending and filled from memory by the miss hook at the
//!   fault, the path of a chunk that waits for the network (with the network taken out).
//!
//! Needs root and `/dev/fuse`. `cargo bench -p cloudlet-benches --bench fault`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lazy_image::{Image, ImageSpec, LazyFs, LazyOptions, MissHook, CHUNK_SIZE};
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};

const SIZE: u64 = 64 << 20;
const PAGES: u64 = SIZE / CHUNK_SIZE;

/// Maps `path` shared and touches every page once in `order`; returns the time the touching
/// took and a byte sum (so the reads are not optimised away).
fn touch(path: &Path, order: &[u64]) -> (Duration, u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    // SAFETY: a fresh shared mapping of SIZE bytes of an open file of that size, unmapped
    // below; nothing else in this process maps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap {}: {}", path.display(), std::io::Error::last_os_error());
    let base = p as *const u8;
    let t = Instant::now();
    let mut sum = 0u64;
    for &page in order {
        // SAFETY: `page * CHUNK_SIZE` is inside the SIZE-byte mapping.
        sum += u64::from(unsafe { std::ptr::read_volatile(base.add((page * CHUNK_SIZE) as usize)) });
    }
    let took = t.elapsed();
    // SAFETY: the mapping made above, not used after.
    unsafe { libc::munmap(p, SIZE as usize) };
    (took, sum)
}

fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

/// Mounts the image fresh (an empty page cache), over `base` or pending and filled on a miss
/// from `source`.
fn mount(dir: &Path, base: &Path, readahead: u32, source: Option<Arc<Vec<u8>>>) -> LazyFs {
    let (mnt, store) = (dir.join("mnt"), dir.join("store"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    let slot: Arc<OnceLock<Arc<Image>>> = Arc::default();
    let on_miss: Option<MissHook> = source.as_ref().map(|src| {
        let (src, slot) = (src.clone(), slot.clone());
        Arc::new(move |_: usize, chunks: std::ops::Range<u64>| {
            let (s, e) = ((chunks.start * CHUNK_SIZE) as usize, (chunks.end * CHUNK_SIZE) as usize);
            slot.get().unwrap().fill(chunks.start, &src[s..e]).unwrap();
        }) as MissHook
    });
    let spec = ImageSpec {
        name: "memory".into(),
        size: SIZE,
        base: source.is_none().then(|| base.to_path_buf()),
        pending: if source.is_some() { std::iter::once(0..PAGES).collect() } else { Vec::new() },
    };
    let opts = LazyOptions { on_miss, max_readahead: readahead, ..LazyOptions::default() };
    let fs = LazyFs::mount(&mnt, &store, vec![spec], opts).expect("mount (needs root and /dev/fuse)");
    slot.set(fs.image("memory").unwrap().clone()).unwrap();
    fs
}

fn faults(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::var_os("CARGO_TARGET_TMPDIR").unwrap_or_else(|| ".".into())).unwrap();
    let base = dir.path().join("base");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut data = vec![0u8; SIZE as usize];
    rng.fill_bytes(&mut data);
    File::create(&base).unwrap().write_all_at(&data, 0).unwrap();
    let data = Arc::new(data);
    let mut order: Vec<u64> = (0..PAGES).collect();
    order.shuffle(&mut rng);

    let mut g = c.benchmark_group("page_fault");
    g.throughput(Throughput::Elements(PAGES));
    g.sample_size(10);
    g.bench_function("local_cached", |b| b.iter_custom(|iters| (0..iters).map(|_| touch(&base, &order).0).sum()));
    g.bench_function("local_cold", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    drop_cache(&base);
                    touch(&base, &order).0
                })
                .sum()
        })
    });
    for (name, readahead, pending) in
        [("fuse_base_128k", 128 << 10, false), ("fuse_base_4k", 4096, false), ("fuse_pending_4k", 4096, true)]
    {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let fs = mount(dir.path(), &base, readahead, pending.then(|| data.clone()));
                        let (took, _) = touch(&fs.path("memory").unwrap(), &order);
                        drop(fs);
                        took
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, faults);
criterion_main!(benches);
