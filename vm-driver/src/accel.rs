//! Choosing the accelerator: KVM only if a real probe boots a kernel under it, else TCG.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::KernelBoot;

/// The accelerator QEMU runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `kvm` / `tcg`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// Why an accelerator was chosen, for the user.
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub accel: Accel,
    pub reason: String,
}

/// How long the KVM probe waits for its kernel.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the probe's result is cached: `CLOUDLET_KVM_PROBE_CACHE` (a file) if set, else
/// `kvm-probe-<key>` in `$XDG_CACHE_HOME/cloudlet/`, `~/.cache/cloudlet/` or the temp dir, the key
/// covering the QEMU binary (path, size, modification time), its version and the host kernel.
pub fn probe_cache_path(qemu: &Path, qemu_version: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("CLOUDLET_KVM_PROBE_CACHE") {
        return p.into();
    }
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("cloudlet");
    let bin = std::fs::canonicalize(qemu).unwrap_or_else(|_| qemu.to_owned());
    let (size, mtime) = std::fs::metadata(&bin)
        .map(|m| {
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            (m.len(), t.map_or(0, |d| d.as_nanos()))
        })
        .unwrap_or((0, 0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(format!("{}\0{size}\0{mtime}\0{qemu_version}\0{}", bin.display(), kernel.trim()).as_bytes());
    dir.join(format!("kvm-probe-{}", &h.finalize().to_hex()[..16]))
}

/// Picks the accelerator. `CLOUDLET_ACCEL=kvm|tcg` overrides. Otherwise KVM is used only if
/// the KVM device (`CLOUDLET_KVM_DEVICE`, default /dev/kvm) opens and `probe_kernel` boots far
/// enough under KVM within [`PROBE_TIMEOUT`] (a /dev/kvm that cannot run ordinary guests, such
/// as PVM, hangs there). The result is cached at [`probe_cache_path`], so the probe runs once
/// per host, QEMU and kernel; it says so on stderr while it runs. The probe's QEMU dies with
/// this process (`PR_SET_PDEATHSIG`) and is stopped, its directory removed, by [`crate::kill_all`].
pub(crate) fn choose(qemu: &Path, qemu_version: &str, probe_kernel: Option<&KernelBoot>) -> Choice {
    if let Ok(v) = std::env::var("CLOUDLET_ACCEL") {
        if let Some(a) = Accel::parse(&v) {
            return Choice { accel: a, reason: "CLOUDLET_ACCEL".into() };
        }
    }
    let dev = std::env::var_os("CLOUDLET_KVM_DEVICE").map(PathBuf::from).unwrap_or_else(|| "/dev/kvm".into());
    if std::fs::OpenOptions::new().read(true).write(true).open(&dev).is_err() {
        return Choice { accel: Accel::Tcg, reason: format!("{} cannot be opened", dev.display()) };
    }
    let Some(k) = probe_kernel else {
        return Choice { accel: Accel::Tcg, reason: "no kernel to probe KVM with".into() };
    };
    let cache = probe_cache_path(qemu, qemu_version);
    if let Ok(s) = std::fs::read_to_string(&cache) {
        if let Some(a) = Accel::parse(s.trim()) {
            return Choice { accel: a, reason: format!("KVM probe (cached in {})", cache.display()) };
        }
    }
    tracing::info!(
        "probing KVM (once per host, up to {} s; cached in {})...",
        PROBE_TIMEOUT.as_secs(),
        cache.display()
    );
    let Some(ok) = probe(qemu, k) else {
        // Interrupted: nothing learnt, nothing cached.
        return Choice { accel: Accel::Tcg, reason: "KVM probe interrupted".into() };
    };
    let accel = if ok { Accel::Kvm } else { Accel::Tcg };
    if let Some(d) = cache.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let tmp = cache.with_extension(format!("partial-{}", std::process::id()));
    if std::fs::write(&tmp, accel.as_str()).is_ok() {
        let _ = std::fs::rename(&tmp, &cache);
    }
    let _ = std::fs::remove_file(&tmp);
    Choice {
        accel,
        reason: if ok {
            "KVM probe booted a kernel".into()
        } else {
            "KVM probe: a kernel did not boot under KVM".into()
        },
    }
}

/// Boots `k` under KVM; `Some(booted)`, or `None` if [`crate::kill_all`] stopped the probe.
fn probe(qemu: &Path, k: &KernelBoot) -> Option<bool> {
    let dir = std::env::temp_dir().join(format!("cloudlet-kvm-probe-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let log = dir.join("serial.log");
    let mut cmd = Command::new(qemu);
    // `-serial file:PATH` takes the rest of the argument as the path: no option parsing.
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35,accel=kvm", "-m", "128M"])
        .arg("-kernel")
        .arg(&k.kernel)
        .args(["-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(i) = &k.initrd {
        cmd.arg("-initrd").arg(i);
    }
    // SAFETY: the pid is read before the fork; the closure only makes async-signal-safe calls
    // (prctl, getppid) and touches no memory of the parent.
    let parent = unsafe { libc::getpid() };
    // SAFETY: see above; prctl(PR_SET_PDEATHSIG) and getppid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // The probe dies with the thread that started it, even on SIGKILL of this process.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died between fork and prctl: do not run at all.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    let Ok(mut child) = cmd.spawn() else {
        let _ = std::fs::remove_dir_all(&dir);
        return Some(false);
    };
    if !crate::qemu::track(child.id(), &dir) {
        // kill_all already ran: the process is exiting.
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        return None;
    }
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < PROBE_TIMEOUT {
        let text = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains("Freeing unused kernel") {
            ok = true;
            break;
        }
        // Exited, or reaped by kill_all.
        if !matches!(child.try_wait(), Ok(None)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !crate::qemu::untrack(child.id()) {
        // kill_all stopped (and reaped) it and removed its directory.
        return None;
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Some(ok)
}
