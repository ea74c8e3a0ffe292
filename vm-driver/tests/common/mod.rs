//! The guests the QEMU tests boot.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vm_driver::{DiskFormat, Hypervisor, LaunchSpec, Qemu, QemuVm, Vm};

/// How long the test guest may take to boot.
pub const BOOT: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test guest built by scripts/build-guest.sh (built on demand).
pub fn guest() -> PathBuf {
    let dir = std::env::var_os("CLOUDLET_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| root().join(".cache/guest"));
    if !dir.join("stamp").exists() {
        let st = std::process::Command::new(root().join("scripts/build-guest.sh"))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/build-guest.sh");
        assert!(st.success(), "scripts/build-guest.sh failed");
    }
    dir
}

/// The Debian guest (scripts/build-debian-guest.sh), or `None` when `CLOUDLET_DEBIAN_GUEST=0`
/// skips the tests that boot it. Fails when it is not built (`scripts/test.sh` builds it).
pub fn debian_guest() -> Option<PathBuf> {
    if std::env::var("CLOUDLET_DEBIAN_GUEST").as_deref() == Ok("0") {
        eprintln!("skipped: CLOUDLET_DEBIAN_GUEST=0");
        return None;
    }
    let dir =
        std::env::var_os("CLOUDLET_DEBIAN_DIR").map(PathBuf::from).unwrap_or_else(|| root().join(".cache/debian"));
    assert!(
        dir.join("stamp").exists(),
        "no Debian guest in {}: build it with scripts/build-debian-guest.sh (as root; scripts/test.sh does), \
         or set CLOUDLET_DEBIAN_GUEST=0 to skip the tests that boot it",
        dir.display()
    );
    Some(dir)
}

/// The test guest on a copy of its disk in `tmp`, 256 MiB, its web server on a free host port.
pub fn spec(tmp: &Path) -> LaunchSpec {
    let g = guest();
    let disk = tmp.join("disk0.raw");
    std::fs::copy(g.join("disk.raw"), &disk).unwrap();
    LaunchSpec::new(256 << 20)
        .kernel(g.join("vmlinuz"), g.join("initrd.img"), "console=ttyS0 quiet panic=-1")
        .disk("disk0", disk, DiskFormat::Raw)
        .forward(0, 80)
}

/// The test guest of [`spec`], booted until it says it is ready.
pub fn boot(qemu: &Qemu, tmp: &Path) -> QemuVm {
    let mut vm = qemu.launch(&spec(tmp)).unwrap();
    if let Err(e) = vm.console().unwrap().wait_for_text("cloudlet-guest: ready", BOOT) {
        panic!("{e}\nserial:\n{}\nstderr:\n{}", vm.serial_log(), vm.stderr(4096));
    }
    vm
}
