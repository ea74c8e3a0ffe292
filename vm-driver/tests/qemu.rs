//! Real QEMU guests: boot, run, snapshot, restore (both RAM modes), forwards, bad inputs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{boot, guest, spec, BOOT};
use vm_driver::*;

const CMD: Duration = Duration::from_secs(30);

fn http_get(port: u16) -> String {
    let start = Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) if body.contains("200") => return body,
            _ if start.elapsed() > Duration::from_secs(60) => {
                panic!("no HTTP answer on port {port}: {attempt:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn uptime(vm: &mut QemuVm) -> f64 {
    let (out, st) = vm.console().unwrap().run("cat /proc/uptime", CMD).unwrap();
    assert_eq!(st, 0);
    out.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn boot_snapshot_restore_both_modes_and_snapshot_again() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::new().unwrap();
    let mut vm = boot(&qemu, tmp.path());
    let (out, st) = vm.console().unwrap().run("echo hello; false", CMD).unwrap();
    assert_eq!((out.trim(), st), ("hello", 1));
    let (_, st) = vm
        .console()
        .unwrap()
        .run("echo on-disk > /mnt/disk/f && echo in-tmpfs > /tmp/t && echo app > /mnt/disk/www/app.html && sync", CMD)
        .unwrap();
    assert_eq!(st, 0);
    let port = vm.host_port(80).unwrap();
    assert!(http_get(port).contains("hello from the cloudlet base guest"));
    let up0 = uptime(&mut vm);
    let snap = vm.snapshot(&tmp.path().join("snap1")).unwrap();
    assert!(matches!(vm.status().unwrap().as_str(), "paused" | "postmigrate"));
    drop(vm);

    for mode in [RamMode::CopyOnWrite, RamMode::PrivateCopy] {
        let mut r = qemu.restore(&snap, &RestoreOptions { ram: mode.clone(), ..Default::default() }).unwrap();
        assert_eq!(r.status().unwrap(), "running");
        let (out, st) = r.console().unwrap().run("cat /mnt/disk/f /tmp/t", CMD).unwrap();
        assert_eq!(st, 0, "{out}");
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["on-disk", "in-tmpfs"]);
        let up1 = uptime(&mut r);
        assert!(up1 >= up0 && up1 < up0 + 60.0, "uptime {up0} -> {up1}: not continuous");
        let p = r.host_port(80).unwrap();
        assert!(http_get(p).contains("200"));
        if mode == RamMode::PrivateCopy {
            r.console().unwrap().run("echo second > /tmp/t2", CMD).unwrap();
            let snap2 = r.snapshot(&tmp.path().join("snap2")).unwrap();
            drop(r);
            let mut r2 = qemu.restore(&snap2, &RestoreOptions::default()).unwrap();
            let (out, _) = r2.console().unwrap().run("cat /tmp/t /tmp/t2", CMD).unwrap();
            assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["in-tmpfs", "second"]);
        } else {
            let err = r.snapshot(&tmp.path().join("no")).unwrap_err();
            assert!(matches!(err, DriverError::Incompatible { .. }), "{err}");
        }
    }
    // The snapshot's own files were not modified by the restores.
    let again = Snapshot::load(&tmp.path().join("snap1")).unwrap();
    assert_eq!(again, snap);
}

/// A restore whose QEMU fails to start (here: a disk that is not the qcow2 it claims; in the server, a host
/// port another VM took between the check and QEMU's bind) leaves the snapshot's files as they
/// were, in both RAM modes: a copy-on-write restore maps the snapshot's own RAM file, which a
/// failed start once deleted with the half-started VM. The snapshot restores afterwards.
#[test]
fn a_failed_restore_leaves_the_snapshot_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::new().unwrap();
    let mut vm = boot(&qemu, tmp.path());
    let snap = vm.snapshot(&tmp.path().join("snap")).unwrap();
    drop(vm);
    let bad = tmp.path().join("not-a.qcow2");
    std::fs::write(&bad, vec![0x5a; 1 << 20]).unwrap();
    let bad = Disk { name: "disk0".into(), path: bad, format: DiskFormat::Qcow2 };
    for mode in [RamMode::CopyOnWrite, RamMode::PrivateCopy] {
        let opts = RestoreOptions { ram: mode.clone(), disks: Some(vec![bad.clone()]), ..Default::default() };
        let err = qemu.restore(&snap, &opts).unwrap_err();
        assert!(matches!(err, DriverError::QemuDied { .. }), "{mode:?}: {err}");
        assert!(snap.memory_path().exists(), "{mode:?}: the failed restore deleted the snapshot's RAM file");
        assert_eq!(Snapshot::load(&snap.dir).unwrap(), snap);
    }
    let mut r = qemu.restore(&snap, &RestoreOptions::default()).unwrap();
    assert_eq!(r.status().unwrap(), "running");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::new().unwrap();

    let missing = Qemu::with_binary(Path::new("/nonexistent/qemu-system-x86_64")).unwrap_err();
    assert!(matches!(missing, DriverError::MissingQemu { .. }), "{missing}");

    let mut s = spec(tmp.path());
    s.machine_type = "pc-q35-99.0".into();
    let e = qemu.launch(&s).unwrap_err();
    assert!(matches!(e, DriverError::Incompatible { what: "machine type", .. }), "{e}");

    let mut s = spec(tmp.path());
    s.cpu_model = "NoSuchCPU".into();
    assert!(matches!(qemu.launch(&s).unwrap_err(), DriverError::Incompatible { what: "CPU model", .. }));

    let mut s = spec(tmp.path());
    s.disks[0].path = tmp.path().join("missing.raw");
    assert!(matches!(qemu.launch(&s).unwrap_err(), DriverError::BadImage { .. }));

    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut s = spec(tmp.path());
    s.forwards[0].host_port = port;
    assert!(matches!(qemu.launch(&s).unwrap_err(), DriverError::PortInUse { port: p } if p == port));

    // A real snapshot to damage.
    let mut vm = boot(&qemu, tmp.path());
    let snap = vm.snapshot(&tmp.path().join("snap")).unwrap();
    drop(vm);
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&snap.dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    // RAM file of the wrong size.
    let d = copy("short");
    std::fs::OpenOptions::new().write(true).open(d.join("memory")).unwrap().set_len(128 << 20).unwrap();
    let e = qemu.restore(&Snapshot::load(&d).unwrap(), &RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, DriverError::BadImage { what: "RAM image", .. }), "{e}");
    // A device state that does not belong to the RAM file.
    let d = copy("tampered");
    let mut ds = std::fs::read(d.join("device-state")).unwrap();
    let n = ds.len();
    ds[n / 2] ^= 1;
    std::fs::write(d.join("device-state"), ds).unwrap();
    let e = qemu.restore(&Snapshot::load(&d).unwrap(), &RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, DriverError::BadSnapshot { .. }), "{e}");
    // Device state from another machine type.
    let d = copy("machine");
    let j = std::fs::read_to_string(d.join("snapshot.json")).unwrap().replace("pc-q35-10.0", "pc-i440fx-10.0");
    std::fs::write(d.join("snapshot.json"), j).unwrap();
    let e = qemu.restore(&Snapshot::load(&d).unwrap(), &RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, DriverError::Migration { .. } | DriverError::QemuDied { .. }), "{e}");
    // A snapshot from a newer QEMU.
    let d = copy("newer");
    let j = std::fs::read_to_string(d.join("snapshot.json")).unwrap().replace(qemu.version(), "99.0.0");
    std::fs::write(d.join("snapshot.json"), j).unwrap();
    let e = qemu.restore(&Snapshot::load(&d).unwrap(), &RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, DriverError::Incompatible { what: "QEMU version", .. }), "{e}");
}

/// Every path QEMU gets (kernel, initrd, disk, RAM file, snapshot files, qcow2 layer backing)
/// lives under directories whose names hold a comma and a space: the guest boots, snapshots and
/// restores in both RAM modes with its own disk.
#[test]
fn paths_with_commas_and_spaces() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("reg, share=on,x y");
    let vmdir = tmp.path().join("vm, readonly=off,z w");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&vmdir).unwrap();
    let g = guest();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(g.join(f), store.join(format!("{f},1 x"))).unwrap();
    }
    let disk = store.join("disk0,file=x y.raw");
    std::fs::copy(g.join("disk.raw"), &disk).unwrap();
    let mut spec = LaunchSpec::new(256 << 20)
        .kernel(store.join("vmlinuz,1 x"), store.join("initrd.img,1 x"), "console=ttyS0 quiet panic=-1")
        .disk("disk0", disk, DiskFormat::Raw)
        .forward(0, 80);
    spec.ram_dir = Some(vmdir.clone());
    let qemu = Qemu::new().unwrap();
    let mut vm = match qemu.launch(&spec) {
        Ok(vm) => vm,
        Err(e) => panic!("launch with commas in the paths: {e}"),
    };
    if let Err(e) = vm.console().unwrap().wait_for_text("cloudlet-guest: ready", BOOT) {
        panic!("{e}\nserial:\n{}\nstderr:\n{}", vm.serial_log(), vm.stderr(4096));
    }
    assert_eq!(std::fs::read_dir(&vmdir).unwrap().count(), 1, "the RAM file is in the VM directory");
    let (_, st) = vm.console().unwrap().run("echo comma-disk > /mnt/disk/f && sync", CMD).unwrap();
    assert_eq!(st, 0);
    let snap = vm.snapshot(&store.join("snap, offset=1,x y")).unwrap();
    drop(vm);
    for mode in [RamMode::CopyOnWrite, RamMode::PrivateCopy] {
        let mut r = match qemu.restore(&snap, &RestoreOptions { ram: mode.clone(), ..Default::default() }) {
            Ok(r) => r,
            Err(e) => panic!("restore ({mode:?}) from {}: {e}", snap.dir.display()),
        };
        let (out, st) = r.console().unwrap().run("cat /mnt/disk/f", CMD).unwrap();
        assert_eq!((st, out.trim()), (0, "comma-disk"), "{mode:?}");
        assert!(http_get(r.host_port(80).unwrap()).contains("200"), "{mode:?}");
    }
}

/// The HTTP status line of `GET /path` on the host port, or the error.
fn http_status(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.lines().next().unwrap_or_default().to_string())
}

/// A guest that prints megabytes on its serial console while the host reads nothing of it
/// (no `run`, no `wait_for_text`) is not stalled: the driver drains the console. The guest
/// reports the end of its printing over HTTP, the console is left alone until then, and the
/// console answers at once afterwards. (Without the draining, QEMU stops taking bytes from the
/// guest once the socket's buffer is full, and the file never appears.)
#[test]
fn a_chatty_guest_is_never_stalled_by_its_console() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::new().unwrap();
    let mut vm = boot(&qemu, tmp.path());
    let port = vm.host_port(80).unwrap();
    let printing = "(yes 0123456789abcdef0123456789abcdef | head -c 2000000 > /dev/ttyS0; \
                    echo printed > /mnt/disk/www/printed.txt) > /dev/null 2>&1 &";
    let (_, st) = vm.console().unwrap().run(printing, CMD).unwrap();
    assert_eq!(st, 0);
    let start = Instant::now();
    let limit = Duration::from_secs(120);
    loop {
        match http_status(port, "/printed.txt") {
            Ok(line) if line.contains("200") => break,
            last if start.elapsed() > limit => panic!(
                "the guest did not finish printing 2 MB on its console within {limit:?} \
                 (stalled on the console?); last answer for /printed.txt: {last:?}"
            ),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let printed_in = start.elapsed();
    let asked = Instant::now();
    let (out, st) = vm.console().unwrap().run("echo ok", Duration::from_secs(10)).unwrap();
    assert_eq!((out.trim(), st), ("ok", 0));
    eprintln!("2 MB printed in {printed_in:?}; then a command answered in {:?}", asked.elapsed());
    // The output went through the console: the newest of it is in its buffer and the log.
    assert!(vm.console().unwrap().recent().contains("0123456789abcdef0123456789abcdef"));
    vm.console().unwrap().wait_for_text("0123456789abcdef0123456789abcdef", CMD).unwrap();
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// blake3 of a file, hex.
fn file_hash(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap()).to_hex().to_string()
}

/// The `pflash` block devices QEMU reports, as (node name, read-only).
fn pflash(vm: &mut QemuVm) -> Vec<(String, bool)> {
    let blocks = vm.qmp("query-block", None).unwrap();
    let mut out = Vec::new();
    for b in blocks.as_array().unwrap() {
        let dev = b["device"].as_str().unwrap_or_default();
        if dev.starts_with("pflash") {
            out.push((dev.to_string(), b["inserted"]["ro"].as_bool().unwrap_or(false)));
        }
    }
    out.sort();
    out
}

/// A VM on UEFI with no bootable disk reaches OVMF's boot manager; a snapshot keeps its code
/// and its variable store as the VM left them; restoring runs it again from those files,
/// without writing them; the variable store given at launch is never written.
#[test]
fn uefi_firmware_boots_and_travels_with_its_snapshots() {
    if !Path::new(OVMF_CODE).is_file() {
        panic!("{OVMF_CODE} is missing: install the ovmf package (scripts/setup-host.sh does)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let vars = tmp.path().join("vars, x.fd");
    std::fs::copy(OVMF_VARS, &vars).unwrap();
    let vars_hash = file_hash(&vars);
    let spec = LaunchSpec::new(256 << 20)
        .firmware(Firmware::Uefi { code: OVMF_CODE.into(), vars: vars.clone() })
        .guest_agent(true)
        .vcpus(1);
    let qemu = Qemu::new().unwrap();
    let mut vm = qemu.launch(&spec).unwrap();
    assert_eq!(pflash(&mut vm), [("pflash0".to_string(), true), ("pflash1".to_string(), false)]);
    if let Err(e) = vm.console().unwrap().wait_for_text("BdsDxe", BOOT) {
        panic!("{e}\nserial:\n{}\nstderr:\n{}", vm.serial_log(), vm.stderr(4096));
    }
    assert_eq!(vm.status().unwrap(), "running");
    let snap = vm.snapshot(&tmp.path().join("snap")).unwrap();
    drop(vm);
    assert_eq!(snap.firmware, Some(FirmwareFiles { code: "firmware-code".into(), vars: "firmware-vars".into() }));
    assert!(snap.guest_agent);
    assert_eq!(file_hash(&snap.dir.join("firmware-code")), file_hash(Path::new(OVMF_CODE)));
    assert_eq!(Snapshot::load(&snap.dir).unwrap(), snap);
    let snap_vars = file_hash(&snap.dir.join("firmware-vars"));

    for mode in [RamMode::CopyOnWrite, RamMode::PrivateCopy] {
        let mut r = match qemu.restore(&snap, &RestoreOptions { ram: mode.clone(), ..Default::default() }) {
            Ok(r) => r,
            Err(e) => panic!("restore ({mode:?}) of a UEFI VM: {e}"),
        };
        assert_eq!(r.status().unwrap(), "running", "{mode:?}");
        assert_eq!(pflash(&mut r), [("pflash0".to_string(), true), ("pflash1".to_string(), false)]);
        if mode == RamMode::PrivateCopy {
            let again = r.snapshot(&tmp.path().join("snap2")).unwrap();
            assert!(again.firmware.is_some() && again.dir.join("firmware-vars").is_file());
        }
    }
    assert_eq!(file_hash(&snap.dir.join("firmware-vars")), snap_vars, "a restore wrote the snapshot's variables");
    assert_eq!(file_hash(&vars), vars_hash, "the VM wrote the variable store it was given");
}

/// The guest agent channel is part of the device layout: a snapshot records it and restores
/// with it. The test guest runs no agent, so a ping times out saying what it waited for; a VM
/// without the channel says it has none.
#[test]
fn guest_agent_channel_is_recorded_and_a_missing_agent_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::new().unwrap();
    let mut vm = qemu.launch(&spec(tmp.path()).guest_agent(true)).unwrap();
    if let Err(e) = vm.console().unwrap().wait_for_text("cloudlet-guest: ready", BOOT) {
        panic!("{e}\nserial:\n{}\nstderr:\n{}", vm.serial_log(), vm.stderr(4096));
    }
    let start = Instant::now();
    let e = vm.guest_ping(Duration::from_secs(2)).unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("guest-sync-delimited") && e.to_string().contains("qemu-ga"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    let snap = vm.snapshot(&tmp.path().join("snap")).unwrap();
    drop(vm);
    assert!(snap.guest_agent);
    assert_eq!(snap.layout(), DeviceLayout { guest_agent: true, ..DeviceLayout::default() });
    assert!(Snapshot::load(&snap.dir).unwrap().guest_agent);

    let mut r = qemu.restore(&snap, &RestoreOptions::default()).unwrap();
    assert_eq!(r.status().unwrap(), "running");
    let (out, st) = r.console().unwrap().run("echo restored", CMD).unwrap();
    assert_eq!((out.trim(), st), ("restored", 0));
    let e = r.guest_exec("true", Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    drop(r);

    let mut plain = qemu.launch(&spec(tmp.path())).unwrap();
    let e = plain.guest_ping(Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, DriverError::Unsupported { .. }), "{e}");
}

/// The Debian guest (scripts/build-debian-guest.sh), booted by OVMF from its own disk with
/// the guest agent: ping and exec through the agent, snapshot, restore, and the agent answers
/// again after the restore. Fails when that guest is not built (`scripts/test.sh` builds it), unless
/// `CLOUDLET_DEBIAN_GUEST=0` skips it.
#[test]
fn debian_guest_agent_over_uefi_and_after_restore() {
    let Some(dir) = common::debian_guest() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("disk0.qcow2");
    qcow2_layer(&dir.join("disk.qcow2"), DiskFormat::Qcow2, &layer).unwrap();
    let vars = tmp.path().join("vars.fd");
    std::fs::copy(dir.join("OVMF_VARS_4M.fd"), &vars).unwrap();
    let spec = LaunchSpec::new(1 << 30)
        .firmware(Firmware::Uefi { code: OVMF_CODE.into(), vars })
        .disk("disk0", &layer, DiskFormat::Qcow2)
        .guest_agent(true)
        .forward(0, 80);
    let qemu = Qemu::new().unwrap();
    let t0 = Instant::now();
    let mut vm = qemu.launch(&spec).unwrap();
    if let Err(e) = vm.console().unwrap().wait_for_text("cloudlet-guest: ready", Duration::from_secs(600)) {
        panic!("{e}\nserial:\n{}\nstderr:\n{}", vm.serial_log(), vm.stderr(4096));
    }
    eprintln!("Debian over UEFI ready in {:?}", t0.elapsed());
    vm.guest_ping(Duration::from_secs(60)).unwrap();
    let (out, st) = vm.guest_exec("echo out; echo err >&2; exit 4", CMD).unwrap();
    assert_eq!((out.as_str(), st), ("out\nerr\n", 4));
    let (out, st) = vm.console().unwrap().run("echo console", CMD).unwrap();
    assert_eq!((out.trim(), st), ("console", 0));
    let snap = vm.snapshot(&tmp.path().join("snap")).unwrap();
    drop(vm);
    assert!(snap.guest_agent && snap.firmware.is_some());
    let mut r = qemu.restore(&snap, &RestoreOptions::default()).unwrap();
    let t1 = Instant::now();
    r.guest_ping(Duration::from_secs(60)).unwrap();
    eprintln!("the agent answered {:?} after the restore", t1.elapsed());
    let (out, st) = r.guest_exec("cat /etc/debian_version", CMD).unwrap();
    assert_eq!(st, 0);
    assert!(out.starts_with("12."), "{out}");
    assert!(http_get(r.host_port(80).unwrap()).contains("hello from the cloudlet debian guest"));
}
