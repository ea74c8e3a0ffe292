//! A VM resumed from a RAM image served on demand through FUSE (`RamMode::Served`), before
//! that image has arrived: what a synthesis that starts early does.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lazy_image::{Image, ImageSpec, LazyFs, LazyOptions, MissHook, CHUNK_SIZE};
use vm_driver::*;

const CMD: Duration = Duration::from_secs(30);

/// A snapshot of the test guest with state in its RAM (a tmpfs file) and an app page on disk.
fn snapshot(qemu: &Qemu, tmp: &Path) -> Snapshot {
    let mut vm = common::boot(qemu, tmp);
    let (_, st) = vm
        .console()
        .unwrap()
        .run("echo in-ram > /tmp/t && echo served-app > /mnt/disk/www/app.html && sync", CMD)
        .unwrap();
    assert_eq!(st, 0);
    assert!(http_get(vm.host_port(80).unwrap(), "/app.html", Duration::from_secs(60)).contains("served-app"));
    vm.snapshot(&tmp.join("snap")).unwrap()
}

/// GET `path` until it answers 200, for at most `limit`.
fn http_get(port: u16, path: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) if body.contains(" 200 ") => return body,
            _ if start.elapsed() > limit => {
                panic!("no HTTP answer for {path} on port {port} in {limit:?}: {attempt:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Mounts the snapshot's RAM image with every chunk pending; a miss fills the segments of 32
/// chunks it waits for from `source` (as a fetch of segments would), until `silent` is set,
/// after which the source says nothing more.
fn serve(tmp: &Path, source: PathBuf, size: u64, silent: Arc<AtomicBool>) -> LazyFs {
    let (mnt, store) = (tmp.join("mnt"), tmp.join("store"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    let slot: Arc<OnceLock<Arc<Image>>> = Arc::default();
    let file = Arc::new(File::open(source).unwrap());
    let on_miss: MissHook = {
        let slot = slot.clone();
        Arc::new(move |_, chunks: std::ops::Range<u64>| {
            if silent.load(Ordering::SeqCst) {
                return;
            }
            let image = slot.get().expect("a miss before the image was set");
            for seg in chunks.start / 32..chunks.end.div_ceil(32) {
                let (first, end) = (seg * 32, (seg * 32 + 32).min(size / CHUNK_SIZE));
                let mut buf = vec![0u8; ((end - first) * CHUNK_SIZE) as usize];
                file.read_exact_at(&mut buf, first * CHUNK_SIZE).unwrap();
                image.fill(first, &buf).unwrap();
            }
        })
    };
    let fs = LazyFs::mount(
        &mnt,
        &store,
        vec![ImageSpec {
            name: "memory".into(),
            size,
            base: None,
            pending: std::iter::once(0..size / CHUNK_SIZE).collect(),
        }],
        LazyOptions { on_miss: Some(on_miss), ..LazyOptions::default() },
    )
    .expect("mount the RAM image (needs /dev/fuse and root)");
    slot.set(fs.image("memory").unwrap().clone()).unwrap();
    fs
}

#[test]
fn a_vm_resumes_from_ram_served_on_demand_with_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::new().unwrap();
    let snap = snapshot(&qemu, tmp.path());
    let fs = serve(tmp.path(), snap.memory_path(), snap.ram_bytes, Arc::default());
    let ram = fs.path("memory").unwrap();
    // The snapshot's own RAM image is not needed: only the served one is read.
    std::fs::rename(snap.memory_path(), tmp.path().join("moved-away")).unwrap();
    let t = Instant::now();
    let mut vm =
        qemu.restore(&snap, &RestoreOptions { ram: RamMode::Served(ram.clone()), ..Default::default() }).unwrap();
    eprintln!("restored after {} chunks arrived", fs.image("memory").unwrap().stats().filled);
    let page = http_get(vm.host_port(80).unwrap(), "/app.html", Duration::from_secs(60));
    let answered = t.elapsed();
    assert!(page.contains("served-app"), "{page}");
    let image = fs.image("memory").unwrap();
    let (stats, total) = (image.stats(), snap.ram_bytes / CHUNK_SIZE);
    eprintln!(
        "first answer {answered:?} after {} of {total} chunks ({} MiB) arrived, {} touched; {} requests waited {:?} in all, {:?} at most",
        stats.filled,
        (stats.filled * CHUNK_SIZE) >> 20,
        image.touched().len(),
        stats.misses,
        stats.miss_wait,
        stats.longest_wait
    );
    assert!(stats.misses > 0, "nothing was asked for: {stats:?}");
    assert!(stats.filled < total / 2, "most of RAM arrived before the first answer: {stats:?}");
    // The state in RAM is the snapshot's.
    let (out, st) = vm.console().unwrap().run("cat /tmp/t", CMD).unwrap();
    assert_eq!((out.trim(), st), ("in-ram", 0));
    // The served file is not the VM's: it stays when the VM goes.
    drop(vm);
    assert!(ram.exists(), "the VM deleted a RAM image it does not own");
}

#[test]
fn a_vm_whose_ram_source_goes_silent_is_not_left_hung() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::new().unwrap();
    let snap = snapshot(&qemu, tmp.path());
    let silent = Arc::new(AtomicBool::new(false));
    let fs = serve(tmp.path(), snap.memory_path(), snap.ram_bytes, silent.clone());
    let ram = fs.path("memory").unwrap();
    let vm = qemu.restore(&snap, &RestoreOptions { ram: RamMode::Served(ram), ..Default::default() }).unwrap();
    let port = vm.host_port(80).unwrap();
    http_get(port, "/app.html", Duration::from_secs(60));
    // The source goes silent; the guest soon needs a page that never comes (new requests
    // make it touch memory it has not touched since the resume).
    silent.store(true, Ordering::SeqCst);
    let image = fs.image("memory").unwrap().clone();
    let t = Instant::now();
    let mut k = 0;
    while image.waiting() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest never waited for the silent source: {:?}",
            image.stats()
        );
        std::thread::spawn(move || {
            let _ = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                write!(s, "GET /missing-{k} HTTP/1.0\r\n\r\n")?;
                s.read_to_end(&mut Vec::new())
            });
        });
        k += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = vm.pid().unwrap();
    // The source is declared dead: the waiting faults are answered with errors at once, the
    // mount goes, and QEMU can be stopped.
    let t = Instant::now();
    drop(fs);
    drop(vm);
    let stopped = t.elapsed();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} is still there after it was stopped");
    assert!(stopped < Duration::from_secs(15), "stopping took {stopped:?}");
    assert!(image.stats().failed > 0, "no request was refused: {:?}", image.stats());
    assert_eq!(image.waiting(), 0);
}
