//! Choosing the accelerator: KVM only if a real probe boots a kernel under it, else TCG.

use std::path::Path;
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

/// Picks the accelerator. `CLOUDLET_ACCEL=kvm|tcg` overrides. Otherwise KVM is used only if
/// /dev/kvm opens and `probe_kernel` boots far enough under KVM within a few seconds (a
/// /dev/kvm that cannot run ordinary guests, such as PVM, hangs there). Results are cached in
/// the temp dir per QEMU version so the probe runs once per machine.
pub(crate) fn choose(qemu: &Path, qemu_version: &str, probe_kernel: Option<&KernelBoot>) -> Choice {
    if let Ok(v) = std::env::var("CLOUDLET_ACCEL") {
        if let Some(a) = Accel::parse(&v) {
            return Choice { accel: a, reason: "CLOUDLET_ACCEL".into() };
        }
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Choice { accel: Accel::Tcg, reason: "/dev/kvm cannot be opened".into() };
    }
    let Some(k) = probe_kernel else {
        return Choice { accel: Accel::Tcg, reason: "no kernel to probe KVM with".into() };
    };
    let cache = std::env::temp_dir().join(format!("cloudlet-kvm-probe-{qemu_version}"));
    if let Ok(s) = std::fs::read_to_string(&cache) {
        if let Some(a) = Accel::parse(s.trim()) {
            return Choice { accel: a, reason: format!("KVM probe (cached in {})", cache.display()) };
        }
    }
    let ok = probe(qemu, k);
    let accel = if ok { Accel::Kvm } else { Accel::Tcg };
    let _ = std::fs::write(&cache, accel.as_str());
    Choice {
        accel,
        reason: if ok {
            "KVM probe booted a kernel".into()
        } else {
            "KVM probe: a kernel did not boot under KVM".into()
        },
    }
}

fn probe(qemu: &Path, k: &KernelBoot) -> bool {
    let dir = std::env::temp_dir().join(format!("cloudlet-kvm-probe-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let log = dir.join("serial.log");
    let mut cmd = Command::new(qemu);
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
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < Duration::from_secs(10) {
        let text = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains("Freeing unused kernel") {
            ok = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    ok
}
