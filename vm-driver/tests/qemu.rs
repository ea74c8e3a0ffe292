//! Real QEMU guests: boot, run, snapshot, restore (both RAM modes), forwards, bad inputs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_driver::*;

const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(30);

/// The test guest built by scripts/build-guest.sh (built on demand).
fn guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("CLOUDLET_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| root.join(".cache/guest"));
    if !dir.join("stamp").exists() {
        let st = std::process::Command::new(root.join("scripts/build-guest.sh"))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/build-guest.sh");
        assert!(st.success(), "scripts/build-guest.sh failed");
    }
    dir
}

fn spec(tmp: &Path) -> LaunchSpec {
    let g = guest();
    let disk = tmp.join("disk0.raw");
    std::fs::copy(g.join("disk.raw"), &disk).unwrap();
    LaunchSpec::new(256 << 20)
        .kernel(g.join("vmlinuz"), g.join("initrd.img"), "console=ttyS0 quiet panic=-1")
        .disk("disk0", disk, DiskFormat::Raw)
        .forward(0, 80)
}

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

fn boot(qemu: &Qemu, tmp: &Path) -> QemuVm {
    let mut vm = qemu.launch(&spec(tmp)).unwrap();
    if let Err(e) = vm.console().unwrap().wait_for_text("cloudlet-guest: ready", BOOT) {
        panic!("{e}\nserial:\n{}\nstderr:\n{}", vm.serial_log(), vm.stderr(4096));
    }
    vm
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
        let mut r = qemu.restore(&snap, &RestoreOptions { ram: mode, ..Default::default() }).unwrap();
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
        let mut r = match qemu.restore(&snap, &RestoreOptions { ram: mode, ..Default::default() }) {
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
