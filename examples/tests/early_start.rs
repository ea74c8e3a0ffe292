//! Early start with the test guest under QEMU: a segmented overlay made by `cloudlet overlay
//! --segmented`, read by range over HTTP from `cloudlet share`, and a source that goes away,
//! stalls or sends bad bytes after the VM resumed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use synthesis::early::{synthesize_early, EarlyOptions, FileSource, OverlaySource};
use synthesis::HttpCheck;

const APP: &[&str] = &[
    "--customize",
    "mkdir -p /mnt/disk/app && echo early-ok > /mnt/disk/app/index.html",
    "--customize",
    "httpd -p 8080 -h /mnt/disk/app",
    "-r",
    "tcp:0::8080",
    "--wait-http",
    "8080",
];

/// Mount points under `dir` (from /proc/self/mounts).
fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let d = dir.to_string_lossy();
    mounts.lines().filter(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&*d))).map(String::from).collect()
}

/// Nothing of an early start is left: no QEMU, no mount, no directory.
fn assert_gone(vm: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (procs, mounts) = (processes_mentioning(&vm.to_string_lossy()), mounts_under(vm));
        if procs.is_empty() && mounts.is_empty() && !vm.exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "15 s after the early start ended, it left behind processes {procs:?}, mounts {mounts:?}, dir {}",
            vm.exists()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `cloudlet share FILE --listen 127.0.0.1:0 ARGS`, and its URL once it listens.
struct Share(Child);

impl Share {
    fn start(file: &Path, args: &[&str]) -> (Share, String) {
        let mut child = cloudlet()
            .arg("share")
            .arg(file)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.split_whitespace().last().unwrap_or_default().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "cloudlet share said: {line}");
        (Share(child), url)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_segmented_overlay_read_over_http_answers_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("reg");
    make_base(&reg);
    let ovl = dir.path().join("app.overlay");
    let out = cloudlet_in(&reg)
        .args(["overlay", "--base", "deb", "--segmented", "--name", "early"])
        .args(APP)
        .arg("--out")
        .arg(&ovl)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "overlay: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("segmented:"), "{text}");
    let info = cloudlet().arg("overlay-info").arg(&ovl).arg("--verify").output().unwrap();
    let info_text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success() && info_text.contains("1.3"), "{info_text}");

    // Over HTTP, at 512 KiB/s: the head alone takes a while.
    let (_share, url) = Share::start(&ovl, &["--rate-kib", "512"]);
    let vm = dir.path().join("vm");
    let out = cloudlet_in(&reg)
        .args(["synthesis", "--early-start", "--json", "--probe", "8080", "--overlay", &url, "--out"])
        .arg(&vm)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "early start: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["app_answer"], "early-ok", "{j}");
    assert_eq!(j["complete"], true, "{j}");
    assert_eq!(j["bytes"], std::fs::metadata(&ovl).unwrap().len(), "{j}");
    assert_gone(&vm);

    // The synthesis server does the same for `cloudlet client --overlay URL`.
    let work = dir.path().join("vms");
    let serve = || {
        let mut server = cloudlet_in(&reg)
            .args(["serve", "--listen", "127.0.0.1:0", "--work"])
            .arg(&work)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut server_out = BufReader::new(server.stdout.take().unwrap());
        server_out.read_line(&mut line).unwrap();
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = std::io::Read::read_to_string(&mut server_out, &mut sink);
        });
        let api = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        assert!(api.starts_with("http://"), "cloudlet serve said: {line}");
        (server, api)
    };
    let (mut server, api) = serve();
    let out = cloudlet()
        .args(["client", "--server", &api, "--overlay", &url, "--probe", "8080", "--check", "8080", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The server is killed with the VM running from its mount: the mount goes dead, and QEMU
    // must not hang on it. The next server on the same directory removes what is left.
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success() && stdout.contains("early-ok"),
        "client: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let vm_dir = work.join(j["id"].as_str().unwrap());
    let (mut next, _) = serve();
    let _ = next.kill();
    let _ = next.wait();
    assert_gone(&vm_dir);
    assert!(mounts_under(&work).is_empty(), "{:?}", mounts_under(&work));

    // A plain overlay is refused with a clear error, and nothing is left.
    let plain = dir.path().join("plain.overlay");
    let out = cloudlet_in(&reg)
        .args(["overlay", "--base", "deb", "--name", "plain"])
        .args(APP)
        .arg("--out")
        .arg(&plain)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cloudlet_in(&reg)
        .args(["synthesis", "--early-start", "--overlay"])
        .arg(&plain)
        .arg("--out")
        .arg(&vm)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no segment index"), "{err}");
    assert_gone(&vm);
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Gone,
    Stall,
    BadBytes,
}

/// A file whose segments from byte `from` to the trailer at `to` go wrong in one of three
/// ways.
struct Faulty {
    inner: FileSource,
    from: u64,
    to: u64,
    fault: Fault,
    release: Arc<AtomicBool>,
}

impl OverlaySource for Faulty {
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        if offset < self.from || offset >= self.to {
            return self.inner.read_at(offset, len);
        }
        match self.fault {
            Fault::Gone => Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            Fault::Stall => {
                // Until the test is over.
                while !self.release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(std::io::Error::other("released"))
            }
            Fault::BadBytes => {
                let mut b = self.inner.read_at(offset, len)?;
                let at = self.from.saturating_sub(offset) as usize + 45;
                if at < b.len() {
                    b[at] ^= 0x40;
                }
                Ok(b)
            }
        }
    }

    fn describe(&self) -> String {
        format!("{} ({:?} from byte {})", self.inner.describe(), self.fault, self.from)
    }
}

#[test]
fn a_source_that_goes_away_stalls_or_sends_bad_bytes_fails_the_synthesis_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("reg");
    make_base(&reg);
    let plain = dir.path().join("plain.overlay");
    let out = cloudlet_in(&reg)
        .args(["overlay", "--base", "deb", "--name", "faulty"])
        .args(APP)
        .arg("--out")
        .arg(&plain)
        .output()
        .unwrap();
    assert!(out.status.success(), "overlay: {}", String::from_utf8_lossy(&out.stderr));
    // Small segments, the working set chunk by chunk: segments are left after it.
    let ovl = dir.path().join("app.overlay");
    let out = cloudlet_in(&reg)
        .args(["segment", "--probe", "8080", "--segment-kib", "8", "--tail-segment-kib", "8", "--overlay"])
        .arg(&plain)
        .arg("--out")
        .arg(&ovl)
        .output()
        .unwrap();
    assert!(out.status.success(), "segment: {}", String::from_utf8_lossy(&out.stderr));
    let head = overlay_format::OverlayReader::new(std::fs::File::open(&ovl).unwrap()).unwrap().into_head().unwrap();
    let n = head.index.segments.len();
    let prefetch = head.index.prefetch as usize;
    assert!(prefetch > 0 && prefetch < n, "working set {prefetch} of {n} segments");
    // Faults start with the first segment after the working set: the VM has resumed by then.
    let from = head.index.offsets(head.len)[prefetch];
    let to = head.trailer_range().0;

    let registry = base_registry::Registry::open_existing(&reg).unwrap();
    let qemu = vm_driver::Qemu::new().unwrap();
    for (fault, expect) in [(Fault::Gone, "refused"), (Fault::Stall, "stalled"), (Fault::BadBytes, "checksum")] {
        let vm = dir.path().join(format!("vm-{fault:?}"));
        let release = Arc::new(AtomicBool::new(false));
        let source: Arc<dyn OverlaySource> =
            Arc::new(Faulty { inner: FileSource::open(&ovl).unwrap(), from, to, fault, release: Arc::clone(&release) });
        let mut opts = EarlyOptions::new(&vm);
        opts.probe = Some(HttpCheck::new(8080, Duration::from_secs(60)));
        opts.stall_timeout = Duration::from_secs(3);
        let t = Instant::now();
        // The fault may come before the app answers, or after: either way synthesis fails.
        let err = match synthesize_early(&qemu, &registry, source, &opts, &|_| {}) {
            Err(e) => synthesis::error_chain(&e),
            Ok(mut early) => {
                assert!(mounts_under(&vm).len() == 1, "the VM runs from its mount");
                let e = early.wait_complete(Duration::from_secs(60)).expect_err("the overlay cannot complete");
                drop(early);
                synthesis::error_chain(&e)
            }
        };
        let took = t.elapsed();
        release.store(true, Ordering::SeqCst);
        assert!(err.contains(expect), "{fault:?}: {err}");
        assert!(took < Duration::from_secs(45), "{fault:?}: failed only after {took:?}: {err}");
        assert_gone(&vm);
        eprintln!("{fault:?}: failed after {took:.1?}: {err}");
    }
}
