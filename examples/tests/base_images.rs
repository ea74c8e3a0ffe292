//! `cloudlet base` with the images people have: qcow2 or raw, several disks, readiness by a guest
//! port; and its refusals of what it cannot use.

mod common;

use std::path::Path;

use common::{cloudlet, cloudlet_in, guest_dir, synthesize_json, test_guest_base};

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn hash(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The test guest's disk as qcow2 plus a blank second disk; ready once its HTTP server accepts
/// connections on port 80. The overlay changes both disks, and the synthesized app reads both
/// back from its disks (page cache dropped first).
#[test]
fn a_qcow2_disk_and_a_second_disk_through_base_overlay_and_synthesis() {
    let work = tempfile::tempdir().unwrap();
    let guest = guest_dir();
    let reg = work.path().join("registry");
    let qcow2 = work.path().join("guest.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        guest.join("disk.raw").to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    let data = work.path().join("data.raw");
    std::fs::File::create(&data).unwrap().set_len(8 << 20).unwrap();
    let before = (hash(&qcow2), hash(&data));

    let out = cloudlet_in(&reg)
        .args(["base", "--name", "two", "--ready-port", "80", "--ready-timeout", "120", "--kernel"])
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initrd.img"))
        .arg(&qcow2)
        .arg(&data)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "base: {stderr}");
    assert!(stderr.contains("(qcow2) to a raw disk0"), "{stderr}");
    assert!(stderr.contains("for guest port 80 to accept connections"), "{stderr}");
    assert_eq!((hash(&qcow2), hash(&data)), before, "an input disk was modified");
    let list = text(&cloudlet_in(&reg).arg("list-base").output().unwrap().stdout);
    assert!(list.contains(" two ") && list.contains("2 disk(s)"), "{list}");

    let ovl = work.path().join("both.overlay");
    let cgi = "#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho 1 > /proc/sys/vm/drop_caches\\n\
               echo $(cat /mnt/disk/www/marker) $(head -n 1 /dev/vdb)\\n";
    let out = cloudlet_in(&reg)
        .args(["overlay", "--base", "two", "--forward", "tcp:0:80", "--out"])
        .arg(&ovl)
        .args(["--customize", "echo first-disk-ok > /mnt/disk/www/marker"])
        .args(["--customize", "echo second-disk-ok | dd of=/dev/vdb conv=fsync 2>/dev/null"])
        .args(["--customize", "mkdir -p /mnt/disk/www/cgi-bin"])
        .args(["--customize", &format!("printf '{cgi}' > /mnt/disk/www/cgi-bin/disks")])
        .args(["--customize", "chmod +x /mnt/disk/www/cgi-bin/disks && sync"])
        .output()
        .unwrap();
    assert!(out.status.success(), "overlay: {}", text(&out.stderr));

    let args = ["--probe", "80/cgi-bin/disks", "--expect-status", "200"];
    let v = synthesize_json(cloudlet_in(&reg), &ovl, &work.path().join("vm"), &args);
    assert_eq!(v["app_answer"], "first-disk-ok second-disk-ok", "{v}");
}

/// A port nothing listens on never makes the guest ready, although QEMU accepts connections to
/// its forward: the flow says what it waited for and leaves nothing.
#[test]
fn a_guest_port_nothing_listens_on_is_not_readiness() {
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    let args = ["--name", "never", "--ready-port", "81", "--ready-timeout", "20"];
    let out = test_guest_base(&reg, &args).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the guest was not ready within 20 s: waiting for guest port 81 to accept connections")
            && stderr.contains("the last attempt: guest port 81 refuses connections"),
        "{stderr}"
    );
    let list = text(&cloudlet_in(&reg).arg("list-base").output().unwrap().stdout);
    assert!(list.starts_with("no bases"), "{list}");
    let left: Vec<_> = std::fs::read_dir(&reg).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().starts_with(".work")), "{left:?}");
}

/// What `cloudlet base` refuses, before any VM starts.
#[test]
fn unusable_base_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry");
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let run = |args: &[&str]| {
        let out = cloudlet_in(&reg).current_dir(dir.path()).arg("base").args(args).output().unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let (code, err) = run(&["--name", "b", "--initrd", "initrd.img", "disk.raw"]);
    assert!(code == Some(2) && err.contains("--kernel"), "--initrd without --kernel: {code:?} {err}");
    let (code, err) = run(&["--name", "b", "--append", "console=ttyS0", "disk.raw"]);
    assert!(code == Some(2) && err.contains("--kernel"), "--append without --kernel: {code:?} {err}");
    let (code, err) = run(&["--name", "b", "--ready", "up", "--ready-port", "80", "disk.raw"]);
    assert!(code == Some(2) && err.contains("cannot be used with"), "{code:?} {err}");
    let (code, err) = run(&["--name", "b"]);
    assert!(code == Some(2) && err.contains("<DISK>"), "{code:?} {err}");
    let (code, err) = run(&["--name", "b", "disk.raw", "missing.raw"]);
    assert!(code == Some(1) && err.contains("missing.raw: No such file"), "{code:?} {err}");
    std::fs::write(dir.path().join("notes.txt"), "not a disk\n").unwrap();
    let (code, err) = run(&["--name", "b", "notes.txt"]);
    assert!(code == Some(3) && err.contains("notes.txt: 11 bytes is not a whole number of 512-byte"), "{code:?} {err}");
    let layer = dir.path().join("layer.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", raw.to_str().unwrap(), layer.to_str().unwrap()]);
    let (code, err) = run(&["--name", "b", "layer.qcow2"]);
    assert!(code == Some(3) && err.contains("a qcow2 image with a backing file"), "{code:?} {err}");
    let list = text(&cloudlet().arg("--registry").arg(&reg).arg("list-base").output().unwrap().stdout);
    assert!(list.starts_with("no bases"), "{list}");
}

/// UEFI without its firmware files says where they come from, before any VM starts.
#[test]
fn uefi_without_its_firmware_files_says_to_install_ovmf() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let out = cloudlet_in(&dir.path().join("registry"))
        .args(["base", "--name", "b", "--firmware", "uefi", "--ovmf-vars"])
        .arg(dir.path().join("missing-vars.fd"))
        .arg(&raw)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("missing-vars.fd cannot be read") && err.contains("apt-get install ovmf"), "{err}");
    let out = cloudlet_in(&dir.path().join("registry"))
        .args(["base", "--name", "b", "--ovmf-code", "code.fd"])
        .arg(&raw)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("need --firmware uefi"), "{err}");
}
