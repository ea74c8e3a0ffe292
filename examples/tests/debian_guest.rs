//! The Debian 12 guest (`scripts/build-debian-guest.sh`, in `.cache/debian` or
//! `$CLOUDLET_DEBIAN_DIR`) through the whole flow, as a user with a real image would run it: a
//! base booted from its own disk by its own bootloader, customized, synthesized. Fails when the
//! guest is not built (`scripts/test.sh` builds it), unless `CLOUDLET_DEBIAN_GUEST=0` skips it.

mod common;

use std::path::PathBuf;

use common::{cloudlet_in, root, synthesize_json};

fn debian_dir() -> Option<PathBuf> {
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Base: the qcow2 disk booted by SeaBIOS and its bootloader, 1 GiB, ready once its guest agent
/// answers, trimmed through the agent. Overlay: a new page for its web service, written through
/// the agent. Synthesis: the service serves the new page.
#[test]
fn debian_guest_from_its_own_disk_through_base_overlay_and_synthesis() {
    let Some(guest) = debian_dir() else { return };
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    let disk = guest.join("disk.qcow2");
    let before = blake3::hash(&std::fs::read(&disk).unwrap());
    let out = cloudlet_in(&reg)
        .args(["base", "--name", "deb12", "--ram-mib", "1024", "--ready-agent", "--ready-timeout", "600"])
        .args(["--via", "agent", "--trim"])
        .arg(&disk)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "base: {stderr}");
    assert!(stderr.contains("guest (agent)$ sync && fstrim -av"), "{stderr}");
    assert_eq!(blake3::hash(&std::fs::read(&disk).unwrap()), before, "the input disk was modified");

    let ovl = work.path().join("page.overlay");
    let out = cloudlet_in(&reg)
        .args(["overlay", "--base", "deb12", "--forward", "tcp:0:80", "--out"])
        .arg(&ovl)
        .args(["--via", "agent", "--customize", "echo synthesized-debian-page > /srv/www/index.html"])
        .output()
        .unwrap();
    assert!(out.status.success(), "overlay: {}", text(&out.stderr));

    let args = ["--probe", "80", "--expect-status", "200", "--probe-timeout", "120"];
    let v = synthesize_json(cloudlet_in(&reg), &ovl, &work.path().join("vm"), &args);
    assert_eq!(v["app_answer"], "synthesized-debian-page", "{v}");
}
