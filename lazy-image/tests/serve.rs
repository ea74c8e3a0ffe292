//! The filesystem mounted for real (`/dev/fuse`, as root), read and written through the kernel
//! as a hypervisor would: with `pread`/`pwrite` and through a shared mapping.

// One range of pending chunks is what these tests mean.
#![allow(clippy::single_range_in_vec_init)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazy_image::{ImageSpec, LazyError, LazyFs, LazyOptions, CHUNK_SIZE};

const C: usize = CHUNK_SIZE as usize;

struct Mounted {
    fs: Option<LazyFs>,
    dir: tempfile::TempDir,
}

impl Mounted {
    fn fs(&self) -> &LazyFs {
        self.fs.as_ref().unwrap()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.fs().path(name).unwrap()
    }
}

fn mount_in(dir: tempfile::TempDir, specs: Vec<ImageSpec>, opts: LazyOptions) -> Mounted {
    let (mnt, store) = (dir.path().join("mnt"), dir.path().join("store"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    let fs = LazyFs::mount(&mnt, &store, specs, opts).expect("mount the image filesystem (needs /dev/fuse and root)");
    Mounted { fs: Some(fs), dir }
}

fn mount(specs: Vec<ImageSpec>, opts: LazyOptions) -> Mounted {
    mount_in(tempfile::tempdir().unwrap(), specs, opts)
}

/// Bytes that differ in every chunk.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 7) as u8 ^ (i / C) as u8 ^ seed).collect()
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = dir.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(dir))
}

/// Waits until `image` has parked `n` requests in all.
fn wait_for_misses(image: &lazy_image::Image, n: u64) {
    let t = Instant::now();
    while image.stats().misses < n {
        assert!(t.elapsed() < Duration::from_secs(10), "no request waited for a pending chunk in 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A read of `len` bytes at `at` on a thread of its own; its result arrives on the channel.
fn read_later(path: PathBuf, at: u64, len: usize) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = File::open(&path).and_then(|f| {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, at).map(|()| buf)
        });
        let _ = tx.send(r);
    });
    rx
}

#[test]
fn reads_come_from_the_base_then_zeros_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base");
    let base = pattern(3 * C + 100, 1);
    write_file(&base_path, &base);
    let size = 6 * CHUNK_SIZE;
    let m = mount_in(
        dir,
        vec![
            ImageSpec { name: "memory".into(), size, base: Some(base_path), pending: vec![] },
            ImageSpec { name: "empty".into(), size: 5000, base: None, pending: vec![] },
        ],
        LazyOptions::default(),
    );
    let got = std::fs::read(m.path("memory")).unwrap();
    let mut want = base.clone();
    want.resize(size as usize, 0);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the image does not read as its base followed by zeros");
    assert_eq!(std::fs::read(m.path("empty")).unwrap(), vec![0u8; 5000]);
    let mut names: Vec<_> = std::fs::read_dir(m.fs().dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["empty", "memory"]);
    let stats = m.fs().image("memory").unwrap().stats();
    assert!(stats.reads >= 1 && stats.read_bytes == size, "{stats:?}");
    assert_eq!(stats.misses, 0);
}

#[test]
fn a_read_of_a_pending_chunk_waits_for_its_fill_and_others_do_not() {
    let size = 128 * CHUNK_SIZE;
    let m = mount(
        vec![ImageSpec { name: "memory".into(), size, base: None, pending: vec![64..66] }],
        LazyOptions::default(),
    );
    let path = m.path("memory");
    let waiting = read_later(path.clone(), 65 * CHUNK_SIZE, C);
    // Far from the pending chunks (beyond read-ahead), a read is answered at once.
    let mut buf = vec![1u8; C];
    File::open(&path).unwrap().read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0u8; C]);
    let image = m.fs().image("memory").unwrap();
    wait_for_misses(image, 1);
    assert!(waiting.recv_timeout(Duration::from_millis(300)).is_err(), "a read of a pending chunk did not wait");
    assert_eq!(image.pending(), 2);
    let data = pattern(2 * C, 9);
    image.fill(64, &data).unwrap();
    let got = waiting.recv_timeout(Duration::from_secs(10)).expect("the read still waits after the fill").unwrap();
    assert!(got == data[C..], "the read did not return the filled bytes");
    let stats = image.stats();
    assert_eq!(image.pending(), 0);
    assert_eq!(stats.filled, 2);
    assert!(stats.misses >= 1, "{stats:?}");
    assert!(stats.longest_wait >= Duration::from_millis(300), "{stats:?}");
    assert!(image.touched().contains(&65));
    // A second fill of the same chunks changes nothing.
    image.fill(64, &pattern(2 * C, 3)).unwrap();
    let mut again = vec![0u8; C];
    File::open(&path).unwrap().read_exact_at(&mut again, 65 * CHUNK_SIZE).unwrap();
    assert!(again == data[C..]);
}

#[test]
fn guest_writes_go_to_the_store_and_never_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base");
    let base = pattern(4 * C, 2);
    write_file(&base_path, &base);
    let m = mount_in(
        dir,
        vec![ImageSpec { name: "disk".into(), size: 4 * CHUNK_SIZE, base: Some(base_path.clone()), pending: vec![] }],
        LazyOptions::default(),
    );
    let f = OpenOptions::new().read(true).write(true).open(m.path("disk")).unwrap();
    f.write_all_at(b"written by the guest", 5000).unwrap();
    f.sync_all().unwrap();
    let mut want = base.clone();
    want[5000..5020].copy_from_slice(b"written by the guest");
    assert!(std::fs::read(m.path("disk")).unwrap() == want);
    assert!(std::fs::read(&base_path).unwrap() == base, "the base file was written");
    let stats = m.fs().image("disk").unwrap().stats();
    assert_eq!((stats.writes, stats.write_bytes), (1, 20), "{stats:?}");
    // A write past the end is refused: the images do not grow.
    let err = f.write_all_at(b"x", 4 * CHUNK_SIZE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
}

#[test]
fn a_partial_write_to_a_pending_chunk_waits_and_a_whole_one_does_not() {
    let m = mount(
        vec![ImageSpec { name: "disk".into(), size: 64 * CHUNK_SIZE, base: None, pending: vec![40..42] }],
        LazyOptions::default(),
    );
    let path = m.path("disk");
    let image = m.fs().image("disk").unwrap().clone();
    // Whole chunk 41: nothing to wait for, and a later fill leaves it alone.
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let whole = pattern(C, 5);
    f.write_all_at(&whole, 41 * CHUNK_SIZE).unwrap();
    assert_eq!(image.pending(), 1);
    // Ten bytes into chunk 40: waits for the chunk, then lands on top of it.
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        let _ = tx.send(f.write_all_at(b"0123456789", 40 * CHUNK_SIZE + 10));
    });
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "a partial write of a pending chunk did not wait");
    let filled = pattern(2 * C, 6);
    image.fill(40, &filled).unwrap();
    rx.recv_timeout(Duration::from_secs(10)).expect("the write still waits after the fill").unwrap();
    let mut want = filled[..C].to_vec();
    want[10..20].copy_from_slice(b"0123456789");
    want.extend_from_slice(&whole);
    let mut got = vec![0u8; 2 * C];
    // The page cache holds the write; read the file anew to see the store through FUSE too.
    File::open(&path).unwrap().read_exact_at(&mut got, 40 * CHUNK_SIZE).unwrap();
    assert!(got == want, "chunk 40 is not the fill with the write on top, or chunk 41 lost the guest's write");
}

#[test]
fn a_chunk_that_never_arrives_fails_the_read_after_the_timeout() {
    let m = mount(
        vec![ImageSpec { name: "memory".into(), size: 64 * CHUNK_SIZE, base: None, pending: vec![10..11] }],
        LazyOptions { miss_timeout: Duration::from_millis(300), ..LazyOptions::default() },
    );
    let t = Instant::now();
    let r = read_later(m.path("memory"), 10 * CHUNK_SIZE, C).recv_timeout(Duration::from_secs(10));
    let err = r.expect("a read of a chunk that never arrives was not answered in 10 s").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(t.elapsed() >= Duration::from_millis(300), "failed before the timeout: {:?}", t.elapsed());
    assert!(m.fs().image("memory").unwrap().stats().failed >= 1);
}

#[test]
fn fail_answers_waiting_requests_at_once_and_later_ones_too() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base");
    write_file(&base_path, &pattern(64 * C, 4));
    let m = mount_in(
        dir,
        vec![ImageSpec { name: "memory".into(), size: 64 * CHUNK_SIZE, base: Some(base_path), pending: vec![60..64] }],
        LazyOptions::default(),
    );
    let waiting = read_later(m.path("memory"), 62 * CHUNK_SIZE, C);
    assert!(waiting.recv_timeout(Duration::from_millis(200)).is_err());
    let image = m.fs().image("memory").unwrap();
    image.fail("the source went away");
    let err = waiting.recv_timeout(Duration::from_secs(5)).expect("fail did not answer the waiting read").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err =
        read_later(m.path("memory"), 61 * CHUNK_SIZE, C).recv_timeout(Duration::from_secs(5)).unwrap().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // What is here is still served.
    let mut buf = vec![0u8; C];
    File::open(m.path("memory")).unwrap().read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == pattern(64 * C, 4)[..C]);
}

/// What QEMU does with a `memory-backend-file,share=on`: a shared writable mapping, read and
/// written by touching it. Misses are filled by the hook, as a demand fetch would.
#[test]
fn a_shared_mapping_faults_pending_pages_in_through_the_hook_and_writes_back() {
    let size = 256 * CHUNK_SIZE;
    let source = Arc::new(pattern(size as usize, 7));
    let slot: Arc<std::sync::OnceLock<Arc<lazy_image::Image>>> = Arc::default();
    let hooks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let on_miss: lazy_image::MissHook = {
        let (source, slot, hooks) = (source.clone(), slot.clone(), hooks.clone());
        Arc::new(move |image, chunks: std::ops::Range<u64>| {
            hooks.lock().unwrap().push((image, chunks.clone()));
            // Fill the segments of 32 chunks it waits for (as a fetch of segments would).
            let image = slot.get().unwrap();
            for seg in chunks.start / 32..chunks.end.div_ceil(32) {
                let (first, end) = (seg * 32, (seg * 32 + 32).min(256));
                let (s, e) = ((first * CHUNK_SIZE) as usize, (end * CHUNK_SIZE) as usize);
                image.fill(first, &source[s..e]).unwrap();
            }
        })
    };
    let m = mount(
        vec![ImageSpec { name: "memory".into(), size, base: None, pending: vec![0..256] }],
        LazyOptions { on_miss: Some(on_miss), ..LazyOptions::default() },
    );
    let image = m.fs().image("memory").unwrap().clone();
    slot.set(image.clone()).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(m.path("memory")).unwrap();
    // SAFETY: a fresh shared mapping of `size` bytes of an open file, unmapped below; nothing
    // else maps it in this process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    // SAFETY: `p` maps `size` readable and writable bytes until the munmap below.
    let mem = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, size as usize) };
    for c in [200usize, 3, 100] {
        assert!(mem[c * C..(c + 1) * C] == source[c * C..(c + 1) * C], "chunk {c} read wrong through the mapping");
    }
    mem[3 * C + 17] ^= 0xff;
    // SAFETY: `p` is the mapping made above.
    assert_eq!(unsafe { libc::msync(p, size as usize, libc::MS_SYNC) }, 0);
    // SAFETY: unmapped once, `mem` is not used after.
    assert_eq!(unsafe { libc::munmap(p, size as usize) }, 0);
    let stats = image.stats();
    assert!(stats.misses >= 3 && !hooks.lock().unwrap().is_empty(), "{stats:?}");
    assert!(stats.writes >= 1, "the mapping's write did not reach the filesystem: {stats:?}");
    assert!(image.pending() < 256);
    // The write is in the image: write it out once everything arrived.
    image.fill(0, &source).unwrap();
    let out = m.dir.path().join("written-out");
    image.write_out(&out).unwrap();
    let mut want = source.to_vec();
    want[3 * C + 17] ^= 0xff;
    assert!(std::fs::read(&out).unwrap() == want);
}

#[test]
fn dropping_the_mount_answers_waiting_reads_and_removes_it() {
    let m = mount(
        vec![ImageSpec { name: "memory".into(), size: 64 * CHUNK_SIZE, base: None, pending: vec![0..64] }],
        LazyOptions::default(),
    );
    let mnt = m.fs().dir().to_path_buf();
    let store = m.dir.path().join("store/memory.store");
    assert!(is_mounted(&mnt) && store.exists());
    let waiting = read_later(m.path("memory"), 0, C);
    assert!(waiting.recv_timeout(Duration::from_millis(200)).is_err());
    let Mounted { fs, dir: _dir } = m;
    drop(fs);
    let r = waiting.recv_timeout(Duration::from_secs(5)).expect("a waiting read hung after the unmount");
    assert!(r.is_err(), "a read of a chunk that never arrived succeeded");
    assert!(!is_mounted(&mnt), "still mounted");
    assert!(!store.exists(), "the store is left behind");
}

#[test]
fn wrong_specs_and_fills_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mnt, store) = (dir.path().join("mnt"), dir.path().join("store"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    let spec = |name: &str, size, pending| ImageSpec { name: name.into(), size, base: None, pending };
    let cases = [
        (vec![spec("a/b", 4096, vec![])], "names are"),
        (vec![spec("..", 4096, vec![])], "names are"),
        (vec![spec("a", 4096, vec![]), spec("a", 4096, vec![])], "two images"),
        (vec![spec("a", 1 << 53, vec![])], "at most"),
        (vec![spec("a", 4096, vec![0..2])], "outside its 1 chunks"),
    ];
    for (specs, want) in cases {
        let err = LazyFs::mount(&mnt, &store, specs, LazyOptions::default()).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(!is_mounted(&mnt));
        assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0, "a refused mount left a store behind");
    }
    let missing = ImageSpec { name: "a".into(), size: 4096, base: Some(dir.path().join("nope")), pending: vec![] };
    assert!(matches!(LazyFs::mount(&mnt, &store, vec![missing], LazyOptions::default()), Err(LazyError::Io { .. })));

    let m = mount(vec![spec("m", 3 * CHUNK_SIZE + 10, vec![0..4])], LazyOptions::default());
    let image = m.fs().image("m").unwrap();
    for (chunk, len, want) in [
        (4, C, "past the image's end"),
        (0, C + 1, "not whole chunks"),
        (3, C, "not whole chunks"),
        (0, 0, "not whole chunks"),
    ] {
        let err = image.fill(chunk, &vec![0u8; len]).unwrap_err();
        assert!(err.to_string().contains(want), "fill({chunk}, {len}): {err}");
    }
    let err = image.write_out(&m.dir.path().join("out")).unwrap_err();
    assert!(err.to_string().contains("4 chunks have not arrived"), "{err}");
    // The last chunk is short.
    image.fill(3, &[7u8; 10]).unwrap();
    assert_eq!(image.pending(), 3);
}

/// Run by `a_killed_server_leaves_no_reader_hung` in a process of its own: mounts an image whose
/// chunks never arrive and waits to be killed.
#[test]
#[ignore = "a helper: run by a_killed_server_leaves_no_reader_hung in a process of its own"]
fn helper_serve_until_killed() {
    let Some(dir) = std::env::var_os("LAZY_IMAGE_KILL_DIR") else { return };
    let dir = PathBuf::from(dir);
    let fs = LazyFs::mount(
        &dir.join("mnt"),
        &dir.join("store"),
        vec![ImageSpec { name: "memory".into(), size: 64 * CHUNK_SIZE, base: None, pending: vec![0..64] }],
        LazyOptions::default(),
    )
    .unwrap();
    std::fs::write(dir.join("ready"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(60));
    drop(fs);
}

#[test]
fn a_killed_server_leaves_no_reader_hung() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_serve_until_killed", "--ignored", "--nocapture"])
        .env("LAZY_IMAGE_KILL_DIR", dir.path())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !dir.path().join("ready").exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "the serving process did not mount in 20 s");
        assert!(child.try_wait().unwrap().is_none(), "the serving process exited before it mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiting = read_later(mnt.join("memory"), 0, C);
    assert!(waiting.recv_timeout(Duration::from_millis(300)).is_err(), "a read of a pending chunk did not wait");
    child.kill().unwrap();
    child.wait().unwrap();
    let r = waiting.recv_timeout(Duration::from_secs(5)).expect("a reader hung after its server was killed");
    let err = r.unwrap_err();
    // The kernel ends the requests in flight when the server died with
    // ECONNABORTED and those sent after with ENOTCONN; which one a reader sees
    // depends on whether its page read was tried again.
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "a reader of a dead mount got {err}, not ENOTCONN or ECONNABORTED"
    );
    // The dead mount stays until someone detaches it.
    assert!(is_mounted(&mnt));
    let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }, 0);
    assert!(!is_mounted(&mnt));
}
