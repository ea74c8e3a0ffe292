//! The guests the QEMU tests boot.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

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
