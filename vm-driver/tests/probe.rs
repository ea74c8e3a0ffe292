//! The KVM probe: its result is cached, and its QEMU never outlives an interrupted or killed
//! process. A stand-in QEMU (a script) plays the probe so no real KVM is needed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vm_driver::*;

/// A fake `qemu-system-x86_64`: answers the version and help queries; as the probe, either
/// writes the boot message into the serial file (`boots`) or hangs, its command line keeping
/// the script's path so the test can find it.
fn fake_qemu(dir: &Path, boots: bool) -> PathBuf {
    let p = dir.join("fake-qemu");
    let probe = if boots {
        r#"for a in "$@"; do case "$a" in file:*) echo "Freeing unused kernel memory" > "${a#file:}";; esac; done; exec -a "$0 probe" sleep 1000"#
    } else {
        r#"exec -a "$0 probe" sleep 1000"#
    };
    let script = format!(
        "#!/bin/bash\ncase \"$1\" in\n--version) echo 'QEMU emulator version 10.0.2';;\n-machine) echo 'q35 Standard PC';;\n-cpu) echo 'x86 qemu64';;\n*) {probe};;\nesac\n"
    );
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn kernel(dir: &Path) -> KernelBoot {
    KernelBoot { kernel: dir.join("vmlinuz"), initrd: None, cmdline: String::new() }
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn env(tmp: &Path) {
    std::env::remove_var("CLOUDLET_ACCEL");
    std::env::set_var("CLOUDLET_KVM_DEVICE", "/dev/null");
    std::env::set_var("CLOUDLET_KVM_PROBE_CACHE", tmp.join("cache/kvm-probe"));
    std::env::set_var("TMPDIR", tmp);
}

#[test]
fn the_probe_result_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    env(tmp.path());
    let q = Qemu::with_binary(&fake_qemu(tmp.path(), true)).unwrap();
    let (a, why) = q.accelerator(Some(&kernel(tmp.path())));
    assert_eq!((a, why.as_str()), (Accel::Kvm, "KVM probe booted a kernel"));
    assert_eq!(std::fs::read_to_string(tmp.path().join("cache/kvm-probe")).unwrap(), "kvm");
    // A new handle (a new process, as far as the probe knows) reads the cache.
    let q = Qemu::with_binary(&fake_qemu(tmp.path(), false)).unwrap();
    let (a, why) = q.accelerator(Some(&kernel(tmp.path())));
    assert_eq!(a, Accel::Kvm);
    assert!(why.contains("cached in"), "{why}");
    std::fs::write(tmp.path().join("cache/kvm-probe"), "tcg").unwrap();
    let q = Qemu::with_binary(&fake_qemu(tmp.path(), false)).unwrap();
    assert_eq!(q.accelerator(Some(&kernel(tmp.path()))).0, Accel::Tcg);
    assert_eq!(processes_mentioning(&tmp.path().display().to_string()), Vec::<u32>::new());
    // Without the override, the cache lives under XDG_CACHE_HOME, keyed by the binary.
    std::env::remove_var("CLOUDLET_KVM_PROBE_CACHE");
    std::env::set_var("XDG_CACHE_HOME", tmp.path().join("xdg"));
    let p = probe_cache_path(&tmp.path().join("fake-qemu"), "10.0.2");
    assert!(p.starts_with(tmp.path().join("xdg/cloudlet")), "{}", p.display());
    assert_ne!(p, probe_cache_path(&tmp.path().join("fake-qemu"), "10.1.0"));
}

/// `kill_all` (what the Ctrl-C handler calls) while the probe runs stops its QEMU, removes its
/// directory, and caches nothing.
#[test]
fn kill_all_stops_the_probe() {
    let tmp = tempfile::tempdir().unwrap();
    env(tmp.path());
    let fake = fake_qemu(tmp.path(), false);
    let marker = fake.display().to_string();
    let k = kernel(tmp.path());
    let t = std::thread::spawn(move || Qemu::with_binary(&fake).unwrap().accelerator(Some(&k)));
    wait_for("the probe's QEMU to start", Duration::from_secs(30), || !processes_mentioning(&marker).is_empty());
    kill_all();
    let (a, why) = t.join().unwrap();
    assert_eq!((a, why.as_str()), (Accel::Tcg, "KVM probe interrupted"));
    assert_eq!(processes_mentioning(&marker), Vec::<u32>::new(), "the probe's QEMU survived");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cloudlet-kvm-probe"))
        .collect();
    assert!(left.is_empty(), "probe directory left: {left:?}");
    assert!(!tmp.path().join("cache/kvm-probe").exists(), "an interrupted probe was cached");
    // After kill_all the process is exiting: a probe racing with it starts no QEMU.
    let q = Qemu::with_binary(&tmp.path().join("fake-qemu")).unwrap();
    assert_eq!(q.accelerator(Some(&kernel(tmp.path()))).1, "KVM probe interrupted");
    assert_eq!(processes_mentioning(&marker), Vec::<u32>::new(), "a probe started after kill_all survived");
}

/// Child role: runs the probe (with a hanging QEMU) until killed.
#[test]
fn probing_child_role() {
    let Ok(dir) = std::env::var("CLOUDLET_TEST_PROBE_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    env(&dir);
    let q = Qemu::with_binary(&dir.join("fake-qemu")).unwrap();
    q.accelerator(Some(&kernel(&dir)));
}

/// A process killed with SIGKILL while probing leaves no QEMU behind (it dies with its parent).
#[test]
fn a_killed_prober_leaves_no_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = fake_qemu(tmp.path(), false).display().to_string();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "probing_child_role", "--nocapture", "--test-threads=1"])
        .env("CLOUDLET_TEST_PROBE_CHILD", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the probe's QEMU to start", Duration::from_secs(30), || !processes_mentioning(&marker).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the probe's QEMU to die with its parent", Duration::from_secs(10), || {
        processes_mentioning(&marker).is_empty()
    });
}
