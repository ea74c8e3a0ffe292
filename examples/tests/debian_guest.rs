//! The Debian 12 guest (`scripts/build-debian-guest.sh`, in `.cache/debian` or
//! `$CLOUDLET_DEBIAN_DIR`) through the whole flow, as a user with a real image would run it: a
//! base booted from its own disk by its own bootloader, customized, synthesized. Fails when the
//! guest is not built (`scripts/test.sh` builds it), unless `CLOUDLET_DEBIAN_GUEST=0` skips it.

mod common;

use std::path::{Path, PathBuf};

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

/// `cloudlet base` of the guest's qcow2 disk (1 GiB, with `base_args`), then an overlay that
/// writes `page` as its web service's page through `via`, then synthesis, whose service must
/// serve that page. Returns what the base step printed and whether the base holds UEFI firmware
/// files.
fn through_the_flow(guest: &Path, base_args: &[&str], via: &str, page: &str) -> (String, bool) {
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    let disk = guest.join("disk.qcow2");
    let before = hash_file(&disk);
    let out = cloudlet_in(&reg)
        .args(["base", "--name", "deb12", "--ram-mib", "1024", "--ready-timeout", "600"])
        .args(base_args)
        .arg(&disk)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "base: {stderr}");
    assert_eq!(hash_file(&disk), before, "the input disk was modified");
    let uefi = holds_file(&reg, "firmware-vars");

    let ovl = work.path().join("page.overlay");
    let out = cloudlet_in(&reg)
        .args(["overlay", "--base", "deb12", "--forward", "tcp:0:80", "--out"])
        .arg(&ovl)
        .args(["--via", via, "--customize", &format!("echo {page} > /srv/www/index.html")])
        .output()
        .unwrap();
    assert!(out.status.success(), "overlay: {}", text(&out.stderr));

    let args = ["--probe", "80", "--expect-status", "200", "--probe-timeout", "120"];
    let v = synthesize_json(cloudlet_in(&reg), &ovl, &work.path().join("vm"), &args);
    assert_eq!(v["app_answer"], page, "{v}");
    (stderr, uefi)
}

/// The file's blake3 hash, read in pieces (the disk is hundreds of MiB).
fn hash_file(path: &Path) -> blake3::Hash {
    blake3::Hasher::new().update_reader(std::fs::File::open(path).unwrap()).unwrap().finalize()
}

/// Whether a file called `name` is anywhere under `dir`.
fn holds_file(dir: &Path, name: &str) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            holds_file(&p, name)
        } else {
            e.file_name() == name
        }
    })
}

/// SeaBIOS boots the disk by its bootloader (SYSLINUX); the base is ready once its guest agent
/// answers and is trimmed through the agent; the overlay's page is written through the agent.
#[test]
fn debian_guest_by_seabios_through_base_overlay_and_synthesis_over_its_agent() {
    let Some(guest) = debian_dir() else { return };
    let (stderr, uefi) = through_the_flow(&guest, &["--ready-agent", "--via", "agent", "--trim"], "agent", "bios-page");
    assert!(stderr.contains("guest (agent)$ sync && fstrim -av"), "{stderr}");
    assert!(!uefi, "a BIOS base holds firmware files");
}

/// OVMF boots the same disk by its other bootloader (systemd-boot on the ESP); the base is
/// ready when the guest prints its marker on the serial console, and the overlay's page is
/// written through that console; the custom VM resumes with the base's firmware.
#[test]
fn debian_guest_by_uefi_through_base_overlay_and_synthesis_over_its_console() {
    let Some(guest) = debian_dir() else { return };
    let (stderr, uefi) = through_the_flow(&guest, &["--firmware", "uefi"], "console", "uefi-page");
    assert!(uefi, "the UEFI base does not hold its firmware's variables");
    assert!(stderr.contains("\"cloudlet-guest: ready\" on the serial console"), "{stderr}");
}
