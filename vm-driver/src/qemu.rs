//! The QEMU implementation of [`Hypervisor`] and [`Vm`].

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::accel::{self, Accel, Choice};
use crate::console::Console;
use crate::qga::GuestAgent;
use crate::qmp::Qmp;
use crate::{
    state_hash, Disk, DiskFormat, DriverError, Firmware, FirmwareFiles, Forward, Hypervisor, KernelBoot, LaunchSpec,
    RamMode, RestoreOptions, Snapshot, Vm,
};

const QMP_TIMEOUT: Duration = Duration::from_secs(30);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// A QEMU installation (`qemu-system-x86_64`).
pub struct Qemu {
    binary: PathBuf,
    version: String,
    machines: String,
    cpus: String,
    accel: Mutex<Option<Choice>>,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu").field("binary", &self.binary).field("version", &self.version).finish()
    }
}

fn run_capture(binary: &Path, args: &[&str]) -> Result<String, DriverError> {
    let out = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DriverError::MissingQemu { path: binary.to_owned(), source })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn version_tuple(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

static VM_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Qemu {
    /// The binary from `CLOUDLET_QEMU`, else `qemu-system-x86_64` on the PATH.
    pub fn new() -> Result<Self, DriverError> {
        let bin = std::env::var_os("CLOUDLET_QEMU").map(PathBuf::from).unwrap_or_else(|| "qemu-system-x86_64".into());
        Self::with_binary(&bin)
    }

    /// A specific binary.
    pub fn with_binary(binary: &Path) -> Result<Self, DriverError> {
        let v = run_capture(binary, &["--version"])?;
        let version = v
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .map(|s| s.trim_end_matches(',').to_string())
            .ok_or_else(|| DriverError::MissingQemu {
                path: binary.to_owned(),
                source: std::io::Error::other(format!("unexpected --version output: {v}")),
            })?;
        let machines = run_capture(binary, &["-machine", "help"])?;
        let cpus = run_capture(binary, &["-cpu", "help"])?;
        Ok(Qemu { binary: binary.to_owned(), version, machines, cpus, accel: Mutex::new(None) })
    }

    /// QEMU's version, e.g. `10.0.2`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The accelerator VMs get, and why (probes KVM with `probe_kernel` the first time).
    pub fn accelerator(&self, probe_kernel: Option<&KernelBoot>) -> (Accel, String) {
        let mut g = self.accel.lock().unwrap_or_else(|e| e.into_inner());
        let c = g.get_or_insert_with(|| accel::choose(&self.binary, &self.version, probe_kernel));
        (c.accel, c.reason.clone())
    }

    fn check_machine(&self, machine: &str, cpu: &str) -> Result<(), DriverError> {
        if !self.machines.lines().any(|l| l.split_whitespace().next() == Some(machine)) {
            return Err(DriverError::Incompatible {
                what: "machine type",
                wanted: machine.into(),
                reason: format!("QEMU {} does not offer it (`-machine help`)", self.version),
            });
        }
        let known = self.cpus.lines().any(|l| l.split_whitespace().any(|w| w == cpu));
        if !known {
            return Err(DriverError::Incompatible {
                what: "CPU model",
                wanted: cpu.into(),
                reason: format!("QEMU {} does not know it (`-cpu help`)", self.version),
            });
        }
        Ok(())
    }

    fn start(&self, p: Start<'_>) -> Result<QemuVm, DriverError> {
        self.check_machine(p.machine, p.cpu)?;
        if let Some(k) = p.kernel {
            check_file("kernel", &k.kernel)?;
            if let Some(i) = &k.initrd {
                check_file("initrd", i)?;
            }
        }
        for d in p.disks {
            check_file("disk image", &d.path)?;
        }
        if let Some((code, vars)) = p.firmware {
            check_file("firmware code", code)?;
            check_file("firmware variables", vars)?;
        }
        let forwards = resolve_forwards(p.forwards, p.forward_address)?;
        let runtime = p.runtime;
        let qmp_sock = runtime.join("qmp.sock");
        let ser_sock = runtime.join("serial.sock");
        let ser_log = runtime.join("serial.log");
        let stderr_log = runtime.join("qemu.stderr");
        let args = qemu_args(&p, &forwards, &qmp_sock, &ser_sock, &ser_log);
        let stderr = fs::File::create(&stderr_log)
            .map_err(|source| DriverError::Io { what: format!("create {}", stderr_log.display()), source })?;
        let child = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| DriverError::MissingQemu { path: self.binary.clone(), source })?;
        let private_ram = (p.ram_owned && !p.ram_path.starts_with(runtime)).then(|| p.ram_path.to_owned());
        let mut child = child;
        if !track_live(Live { pid: child.id(), runtime: runtime.to_owned(), private_ram }) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DriverError::Io {
                what: format!("start QEMU in {}", runtime.display()),
                source: std::io::Error::other("interrupted: this process is stopping its VMs (kill_all)"),
            });
        }
        let mut vm = QemuVm {
            child: Some(child),
            qmp: None,
            runtime: runtime.to_owned(),
            // A read-only RAM file is a snapshot's, mapped copy-on-write: never the VM's to
            // delete, even when QEMU fails to start (a dropped half-started VM cleans up).
            ram_path: if p.ram_readonly { PathBuf::new() } else { p.ram_path.to_owned() },
            ram_owned: p.ram_owned,
            serial_socket: ser_sock,
            serial_log: ser_log,
            console: None,
            forwards,
            machine: p.machine.into(),
            cpu: p.cpu.into(),
            vcpus: p.vcpus,
            ram_bytes: p.ram_bytes,
            kernel: p.kernel.cloned(),
            disks: p.disks.to_vec(),
            accel: p.accel,
            qemu_version: self.version.clone(),
            free_page_reporting: p.free_page_reporting,
            display: p.display,
            agent_socket: p.guest_agent.then(|| runtime.join("qga.sock")),
            agent: None,
            firmware: p.firmware.map(|(c, v)| (c.to_owned(), v.to_owned())),
        };
        let child = vm.child.as_mut().expect("just started");
        match Qmp::connect_while(&qmp_sock, Duration::from_secs(15), || matches!(child.try_wait(), Ok(None))) {
            Ok(q) => vm.qmp = Some(q),
            Err(e) => return Err(vm.died_or(e.into())),
        }
        // From the start, so that the guest never waits for someone to read its console.
        match Console::connect(&vm.serial_socket, &vm.serial_log) {
            Ok(c) => vm.console = Some(c),
            Err(e) => return Err(vm.died_or(e)),
        }
        Ok(vm)
    }
}

/// Arguments of `migrate` / `migrate-incoming` to or from the file `p`, as a structured channel
/// rather than a `file:` URI, whose parser would cut the path at `,offset=`.
fn file_channel(p: &Path) -> serde_json::Value {
    json!({"channels": [{"channel-type": "main",
        "addr": {"transport": "file", "filename": p.to_string_lossy(), "offset": 0}}]})
}

/// `p` for a QEMU option value (`file=`, `mem-path=`, `path=`, ...): QEMU splits option lists
/// at commas and reads `,,` as a literal comma, so every comma is doubled. Nothing else needs
/// escaping: a value ends only at a single comma.
pub(crate) fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The command line of a QEMU process for `p`, with `forwards` resolved to host ports.
fn qemu_args(p: &Start<'_>, forwards: &[Forward], qmp_sock: &Path, ser_sock: &Path, ser_log: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-machine".into(),
        format!("{},accel={},memory-backend=ram0", p.machine, p.accel.as_str()),
        "-cpu".into(),
        p.cpu.into(),
        "-smp".into(),
        p.vcpus.to_string(),
        "-m".into(),
        format!("{}M", p.ram_bytes >> 20),
        "-object".into(),
        format!(
            "memory-backend-file,id=ram0,size={},mem-path={},share={},readonly={},rom=off",
            p.ram_bytes,
            opt_path(p.ram_path),
            if p.ram_share { "on" } else { "off" },
            if p.ram_readonly { "on" } else { "off" },
        ),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", opt_path(qmp_sock)),
        "-chardev".into(),
        format!(
            "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
            opt_path(ser_sock),
            opt_path(ser_log)
        ),
        "-serial".into(),
        "chardev:ser0".into(),
        "-device".into(),
        format!("virtio-balloon-pci,free-page-reporting={}", if p.free_page_reporting { "on" } else { "off" }),
    ];
    if p.display {
        // Part of the device layout: a snapshot taken with it restores only with it.
        args.extend(["-vga".into(), "std".into()]);
    }
    match p.vnc {
        // `to=`: when display n is taken, the next free one up to 99 (see `vnc_address`).
        Some(n) => args.extend(["-vnc".into(), format!("127.0.0.1:{n},to=99")]),
        None => args.extend(["-display".into(), "none".into()]),
    }
    if let Some(k) = p.kernel {
        // -kernel and -initrd take a plain file name: no option parsing, no escaping.
        args.extend(["-kernel".into(), k.kernel.display().to_string(), "-append".into(), k.cmdline.clone()]);
        if let Some(i) = &k.initrd {
            args.extend(["-initrd".into(), i.display().to_string()]);
        }
    }
    for (i, d) in p.disks.iter().enumerate() {
        let fmt = match d.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        args.extend([
            "-drive".into(),
            format!("file={},format={fmt},if=none,id=d{i},discard=unmap,cache=writeback", opt_path(&d.path)),
            "-device".into(),
            format!("virtio-blk-pci,drive=d{i}"),
        ]);
    }
    let mut netdev = "user,id=n0".to_string();
    for f in forwards {
        netdev.push_str(&format!(",hostfwd=tcp:{}:{}-:{}", p.forward_address, f.host_port, f.guest_port));
    }
    args.extend(["-netdev".into(), netdev, "-device".into(), "virtio-net-pci,netdev=n0".into()]);
    if let Some((code, vars)) = p.firmware {
        args.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={}", opt_path(code)),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={}", opt_path(vars)),
        ]);
    }
    if p.guest_agent {
        // Part of the device layout: a snapshot taken with it restores only with it.
        args.extend([
            "-chardev".into(),
            format!("socket,id=qga0,path={},server=on,wait=off", opt_path(&p.runtime.join("qga.sock"))),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-device".into(),
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        ]);
    }
    if p.incoming {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    args
}

fn check_file(what: &'static str, path: &Path) -> Result<(), DriverError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(DriverError::BadImage { what, path: path.to_owned(), reason: "not a regular file".into() }),
        Err(e) => Err(DriverError::BadImage { what, path: path.to_owned(), reason: e.to_string() }),
    }
}

fn resolve_forwards(fw: &[Forward], address: &str) -> Result<Vec<Forward>, DriverError> {
    let mut out = Vec::new();
    for f in fw {
        let port = if f.host_port == 0 {
            let l = TcpListener::bind((address, 0))
                .map_err(|source| DriverError::Io { what: "find a free port".into(), source })?;
            l.local_addr().map_err(|source| DriverError::Io { what: "find a free port".into(), source })?.port()
        } else {
            if TcpListener::bind((address, f.host_port)).is_err() {
                return Err(DriverError::PortInUse { port: f.host_port });
            }
            f.host_port
        };
        out.push(Forward { host_port: port, guest_port: f.guest_port });
    }
    Ok(out)
}

fn runtime_dir() -> Result<PathBuf, DriverError> {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("cloudlet-vm-{}-{}", std::process::id(), VM_COUNTER.fetch_add(1, Ordering::Relaxed)));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|source| DriverError::Io { what: format!("create {}", dir.display()), source })?;
    Ok(dir)
}

/// Copies a file keeping holes (and reflinking where the filesystem can).
fn sparse_copy(src: &Path, dst: &Path) -> Result<(), DriverError> {
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(src)
        .arg(dst)
        .status()
        .map_err(|source| DriverError::Io { what: "run cp".into(), source })?;
    if !st.success() {
        return Err(DriverError::Io {
            what: format!("copy {} to {}", src.display(), dst.display()),
            source: std::io::Error::other(format!("cp exited with {st}")),
        });
    }
    Ok(())
}

/// Creates a qcow2 layer at `layer` whose backing file is `backing`.
pub fn qcow2_layer(backing: &Path, backing_format: DiskFormat, layer: &Path) -> Result<(), DriverError> {
    let backing = fs::canonicalize(backing).map_err(|e| DriverError::BadImage {
        what: "disk image",
        path: backing.to_owned(),
        reason: e.to_string(),
    })?;
    let fmt = match backing_format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(&backing)
        .arg(layer)
        .output()
        .map_err(|source| DriverError::Io { what: "run qemu-img".into(), source })?;
    if !out.status.success() {
        return Err(DriverError::BadImage {
            what: "disk image",
            path: backing,
            reason: format!("qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(())
}

struct Start<'a> {
    machine: &'a str,
    cpu: &'a str,
    vcpus: u32,
    ram_bytes: u64,
    kernel: Option<&'a KernelBoot>,
    disks: &'a [Disk],
    forwards: &'a [Forward],
    forward_address: &'a str,
    vnc: Option<u16>,
    runtime: &'a Path,
    ram_path: &'a Path,
    ram_share: bool,
    ram_readonly: bool,
    /// Whether the RAM file is the VM's, deleted with it (a launch's, or a private copy).
    ram_owned: bool,
    incoming: bool,
    accel: Accel,
    free_page_reporting: bool,
    display: bool,
    guest_agent: bool,
    /// UEFI: the code (read-only) and the VM's private variable store.
    firmware: Option<(&'a Path, &'a Path)>,
}

/// The VM's private copy of a firmware variable store, in its runtime directory.
fn private_vars(runtime: &Path, vars: &Path) -> Result<PathBuf, DriverError> {
    check_file("firmware variables", vars)?;
    let copy = runtime.join("firmware-vars");
    fs::copy(vars, &copy).map_err(|source| DriverError::Io {
        what: format!("copy the firmware variables {} to {}", vars.display(), copy.display()),
        source,
    })?;
    Ok(copy)
}

impl Hypervisor for Qemu {
    type Vm = QemuVm;

    fn launch_note(&self, spec: &LaunchSpec) -> Option<String> {
        let (accel, why) = self.accelerator(spec.kernel.as_ref());
        Some(format!("accelerator {}: {why}", accel.as_str()))
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<QemuVm, DriverError> {
        if spec.ram_bytes == 0 || !spec.ram_bytes.is_multiple_of(1 << 20) {
            return Err(DriverError::BadImage {
                what: "RAM size",
                path: PathBuf::new(),
                reason: format!("{} bytes is not a positive multiple of 1 MiB", spec.ram_bytes),
            });
        }
        let (accel, _) = self.accelerator(spec.kernel.as_ref());
        let runtime = runtime_dir()?;
        let ram_path = match &spec.ram_dir {
            Some(d) => d.join(format!("{}.ram", runtime.file_name().unwrap_or_default().to_string_lossy())),
            None => runtime.join("ram"),
        };
        let firmware = match &spec.firmware {
            Firmware::Bios => None,
            Firmware::Uefi { code, vars } => match private_vars(&runtime, vars) {
                Ok(copy) => Some((code.clone(), copy)),
                Err(e) => {
                    let _ = fs::remove_dir_all(&runtime);
                    return Err(e);
                }
            },
        };
        let r = self.start(Start {
            machine: &spec.machine_type,
            cpu: &spec.cpu_model,
            vcpus: spec.vcpus,
            ram_bytes: spec.ram_bytes,
            kernel: spec.kernel.as_ref(),
            disks: &spec.disks,
            forwards: &spec.forwards,
            forward_address: &spec.forward_address,
            vnc: spec.vnc_display,
            runtime: &runtime,
            ram_path: &ram_path,
            ram_share: true,
            ram_readonly: false,
            ram_owned: true,
            incoming: false,
            accel,
            free_page_reporting: spec.free_page_reporting,
            display: spec.vnc_display.is_some(),
            guest_agent: spec.guest_agent,
            firmware: firmware.as_ref().map(|(c, v)| (c.as_path(), v.as_path())),
        });
        if r.is_err() {
            let _ = fs::remove_dir_all(&runtime);
            let _ = fs::remove_file(&ram_path);
        }
        r
    }

    fn restore(&self, snap: &Snapshot, opts: &RestoreOptions) -> Result<QemuVm, DriverError> {
        if version_tuple(&snap.qemu_version) > version_tuple(&self.version) {
            return Err(DriverError::Incompatible {
                what: "QEMU version",
                wanted: snap.qemu_version.clone(),
                reason: format!("this host has the older QEMU {}", self.version),
            });
        }
        let kernel = snap.kernel.as_ref().map(|k| KernelBoot {
            kernel: snap.dir.join(&k.kernel),
            initrd: k.initrd.as_ref().map(|i| snap.dir.join(i)),
            cmdline: k.cmdline.clone(),
        });
        let want = Accel::parse(&snap.accelerator).ok_or_else(|| DriverError::BadSnapshot {
            dir: snap.dir.clone(),
            reason: format!("unknown accelerator {}", snap.accelerator),
        })?;
        let (have, why) = self.accelerator(kernel.as_ref());
        if want == Accel::Kvm && have != Accel::Kvm {
            return Err(DriverError::Incompatible { what: "accelerator", wanted: "kvm".into(), reason: why });
        }
        if opts.vnc_display.is_some() && !snap.display {
            return Err(DriverError::BadSnapshot {
                dir: snap.dir.clone(),
                reason:
                    "no display device (its VM was launched without a VNC display), so it cannot be restored with one"
                        .into(),
            });
        }
        let memory = match &opts.ram {
            RamMode::Served(path) => path.clone(),
            _ => snap.memory_path(),
        };
        let device_state = snap.device_state_path();
        let msize = fs::metadata(&memory)
            .map_err(|e| DriverError::BadImage { what: "RAM image", path: memory.clone(), reason: e.to_string() })?
            .len();
        if msize != snap.ram_bytes {
            return Err(DriverError::BadImage {
                what: "RAM image",
                path: memory,
                reason: format!("{msize} bytes, the snapshot's RAM is {} bytes", snap.ram_bytes),
            });
        }
        check_file("device state", &device_state)?;
        let served = matches!(opts.ram, RamMode::Served(_));
        if !served && !opts.await_migration && state_hash(&memory, &device_state)? != snap.state_hash {
            return Err(DriverError::BadSnapshot {
                dir: snap.dir.clone(),
                reason: "RAM image and device state do not match the recorded hash (files from another snapshot, or damaged)".into(),
            });
        }
        let forwards = opts
            .forwards
            .clone()
            .unwrap_or_else(|| snap.guest_ports.iter().map(|&g| Forward { host_port: 0, guest_port: g }).collect());
        let runtime = runtime_dir()?;
        let disks: Vec<Disk> = match &opts.disks {
            Some(d) => d.clone(),
            None => {
                // The snapshot's disks stay untouched: the VM writes to qcow2 layers over them.
                let mut v = Vec::new();
                for d in &snap.disks {
                    let layer = runtime.join(format!("{}.qcow2", d.name));
                    if let Err(e) = qcow2_layer(&snap.dir.join(&d.path), d.format, &layer) {
                        let _ = fs::remove_dir_all(&runtime);
                        return Err(e);
                    }
                    v.push(Disk { name: d.name.clone(), path: layer, format: DiskFormat::Qcow2 });
                }
                v
            }
        };
        // The snapshot's code read-only, and a private copy of its variables.
        let firmware = match &snap.firmware {
            None => None,
            Some(f) => match private_vars(&runtime, &snap.dir.join(&f.vars)) {
                Ok(copy) => Some((snap.dir.join(&f.code), copy)),
                Err(e) => {
                    let _ = fs::remove_dir_all(&runtime);
                    return Err(e);
                }
            },
        };
        let (ram_path, share, readonly) = match &opts.ram {
            RamMode::CopyOnWrite => (memory.clone(), false, true),
            RamMode::Served(path) => (path.clone(), true, false),
            RamMode::InPlace => (memory.clone(), true, false),
            RamMode::PrivateCopy => {
                let p = runtime.join("ram");
                if let Err(e) = sparse_copy(&memory, &p) {
                    let _ = fs::remove_dir_all(&runtime);
                    return Err(e);
                }
                (p, true, false)
            }
        };
        let started = self.start(Start {
            machine: &snap.machine_type,
            cpu: &snap.cpu_model,
            vcpus: snap.vcpus,
            ram_bytes: snap.ram_bytes,
            kernel: kernel.as_ref(),
            disks: &disks,
            forwards: &forwards,
            forward_address: opts.forward_address.as_deref().unwrap_or("127.0.0.1"),
            vnc: opts.vnc_display,
            runtime: &runtime,
            ram_path: &ram_path,
            ram_share: share,
            ram_readonly: readonly,
            ram_owned: opts.ram == RamMode::PrivateCopy,
            incoming: true,
            accel: want,
            free_page_reporting: snap.free_page_reporting,
            display: snap.display,
            guest_agent: snap.guest_agent,
            firmware: firmware.as_ref().map(|(c, v)| (c.as_path(), v.as_path())),
        });
        let mut vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                let _ = fs::remove_dir_all(&runtime);
                return Err(e);
            }
        };
        if !opts.await_migration {
            vm.incoming(&device_state)?;
        }
        Ok(vm)
    }
}

/// A running QEMU process. Dropping it kills QEMU and removes its runtime directory.
pub struct QemuVm {
    child: Option<Child>,
    qmp: Option<Qmp>,
    runtime: PathBuf,
    /// The RAM file the VM writes; empty when the VM maps a snapshot's RAM file
    /// copy-on-write.
    ram_path: PathBuf,
    /// Whether `ram_path` is deleted with the VM (unless it is in `runtime`, which goes whole);
    /// a served RAM file is not.
    ram_owned: bool,
    serial_socket: PathBuf,
    serial_log: PathBuf,
    console: Option<Console>,
    forwards: Vec<Forward>,
    machine: String,
    cpu: String,
    vcpus: u32,
    ram_bytes: u64,
    kernel: Option<KernelBoot>,
    disks: Vec<Disk>,
    accel: Accel,
    qemu_version: String,
    free_page_reporting: bool,
    display: bool,
    /// The guest agent channel, if the VM has one.
    agent_socket: Option<PathBuf>,
    agent: Option<GuestAgent>,
    /// UEFI: the code file and the VM's own variable store.
    firmware: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm").field("runtime", &self.runtime).field("forwards", &self.forwards).finish()
    }
}

impl QemuVm {
    /// The accelerator this VM runs under.
    pub fn accelerator(&self) -> Accel {
        self.accel
    }

    /// The guest's serial output so far.
    pub fn serial_log(&self) -> String {
        fs::read(&self.serial_log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Runs a QMP command.
    pub fn qmp(&mut self, command: &str, args: Option<serde_json::Value>) -> Result<serde_json::Value, DriverError> {
        let q = self.qmp.as_mut().expect("connected at start");
        match q.execute(command, args, QMP_TIMEOUT) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.died_or(e.into())),
        }
    }

    /// The run state (`running`, `paused`, ...).
    pub fn status(&mut self) -> Result<String, DriverError> {
        let v = self.qmp("query-status", None)?;
        Ok(v.get("status").and_then(|s| s.as_str()).unwrap_or("unknown").to_string())
    }

    fn stderr_tail(&self) -> String {
        let text = fs::read(self.runtime.join("qemu.stderr")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// If QEMU has exited, the error says so with its stderr; else `e`.
    fn died_or(&mut self, e: DriverError) -> DriverError {
        let Some(child) = self.child.as_mut() else {
            return e;
        };
        // Give a dying QEMU a moment to finish exiting.
        for _ in 0..20 {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = self.stderr_tail();
                if let Some(port) = tail
                    .lines()
                    .find(|l| l.contains("Could not set up host forwarding rule"))
                    .and_then(|l| l.split(':').filter_map(|w| w.trim_end_matches('-').parse::<u16>().ok()).next())
                {
                    return DriverError::PortInUse { port };
                }
                return DriverError::QemuDied { status: status.to_string(), stderr_tail: tail };
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        e
    }

    fn set_migration_caps(&mut self) -> Result<(), DriverError> {
        self.qmp(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [
                {"capability": "x-ignore-shared", "state": true},
                {"capability": "events", "state": true}
            ]})),
        )?;
        Ok(())
    }

    fn wait_migration(&mut self) -> Result<(), DriverError> {
        let start = Instant::now();
        loop {
            let q = self.qmp.as_mut().expect("connected");
            let remaining = MIGRATION_TIMEOUT.saturating_sub(start.elapsed());
            let ev = q.wait_event("MIGRATION", remaining.min(Duration::from_millis(500)), |d| {
                matches!(d.get("status").and_then(|s| s.as_str()), Some("completed" | "failed" | "cancelled"))
            });
            match ev {
                Ok(e) => {
                    let status = e.data.get("status").and_then(|s| s.as_str()).unwrap_or("?").to_string();
                    if status == "completed" {
                        return Ok(());
                    }
                    let info = self.qmp("query-migrate", None).unwrap_or_default();
                    let detail = info.get("error-desc").and_then(|s| s.as_str()).unwrap_or("").to_string();
                    let tail = self.stderr_tail();
                    return Err(DriverError::Migration { reason: format!("{status} {detail}\n{tail}") });
                }
                Err(crate::qmp::QmpError::Timeout { .. }) => {
                    if let Some(c) = self.child.as_mut() {
                        if let Ok(Some(_)) = c.try_wait() {
                            let tail = self.stderr_tail();
                            return Err(DriverError::Migration { reason: format!("QEMU exited:\n{tail}") });
                        }
                    }
                    if start.elapsed() >= MIGRATION_TIMEOUT {
                        return Err(DriverError::Timeout {
                            waiting_for: "migration".into(),
                            timeout: MIGRATION_TIMEOUT,
                        });
                    }
                }
                Err(e) => return Err(self.died_or(e.into())),
            }
        }
    }

    /// Checks that the VM can be snapshotted and `dir` is new or empty, pauses the VM and
    /// migrates its device state (without the shared RAM) to `dir/device-state`.
    fn save_device_state(&mut self, dir: &Path) -> Result<PathBuf, DriverError> {
        if self.ram_path.as_os_str().is_empty() {
            return Err(DriverError::Incompatible {
                what: "RAM mapping",
                wanted: "a snapshot".into(),
                reason: "this VM maps its RAM copy-on-write (restore it with RamMode::PrivateCopy or InPlace to \
                         snapshot it again)"
                    .into(),
            });
        }
        let io = |what: String| move |source| DriverError::Io { what, source };
        fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        if fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))?.next().is_some() {
            return Err(DriverError::Io {
                what: format!("snapshot into {}", dir.display()),
                source: std::io::Error::other("directory is not empty"),
            });
        }
        self.qmp("stop", None)?;
        self.set_migration_caps()?;
        self.qmp("migrate-set-parameters", Some(json!({"max-bandwidth": 100u64 << 30})))?;
        let ds = dir.join("device-state");
        self.qmp("migrate", Some(file_channel(&ds)))?;
        self.wait_migration()?;
        Ok(ds)
    }

    fn incoming(&mut self, device_state: &Path) -> Result<(), DriverError> {
        self.set_migration_caps()?;
        self.qmp("migrate-incoming", Some(file_channel(device_state)))?;
        self.wait_migration()?;
        self.qmp("cont", None)?;
        Ok(())
    }
}

impl Vm for QemuVm {
    type Console = Console;

    fn pause(&mut self) -> Result<(), DriverError> {
        self.qmp("stop", None).map(|_| ())
    }

    fn resume(&mut self) -> Result<(), DriverError> {
        self.qmp("cont", None).map(|_| ())
    }

    fn snapshot(&mut self, dir: &Path) -> Result<Snapshot, DriverError> {
        let ds = self.save_device_state(dir)?;
        let memory = dir.join("memory");
        sparse_copy(&self.ram_path, &memory)?;
        let mut disks = Vec::new();
        for d in &self.disks {
            let ext = match d.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            let name = format!("{}.{ext}", d.name);
            sparse_copy(&d.path, &dir.join(&name))?;
            disks.push(Disk { name: d.name.clone(), path: name.into(), format: d.format });
        }
        let kernel = match &self.kernel {
            Some(k) => {
                sparse_copy(&k.kernel, &dir.join("vmlinuz"))?;
                let initrd = match &k.initrd {
                    Some(i) => {
                        sparse_copy(i, &dir.join("initrd.img"))?;
                        Some(PathBuf::from("initrd.img"))
                    }
                    None => None,
                };
                Some(KernelBoot { kernel: "vmlinuz".into(), initrd, cmdline: k.cmdline.clone() })
            }
            None => None,
        };
        let mut snap = Snapshot::new(dir, &self.machine, &self.cpu, self.vcpus, self.ram_bytes);
        snap.qemu_version = self.qemu_version.clone();
        snap.accelerator = self.accel.as_str().into();
        snap.kernel = kernel;
        snap.disks = disks;
        snap.guest_ports = self.forwards.iter().map(|f| f.guest_port).collect();
        snap.state_hash = state_hash(&memory, &ds)?;
        snap.free_page_reporting = self.free_page_reporting;
        snap.display = self.display;
        snap.guest_agent = self.agent_socket.is_some();
        if let Some((code, vars)) = &self.firmware {
            // The variables as the stopped VM left them.
            sparse_copy(code, &dir.join("firmware-code"))?;
            sparse_copy(vars, &dir.join("firmware-vars"))?;
            snap.firmware = Some(FirmwareFiles { code: "firmware-code".into(), vars: "firmware-vars".into() });
        }
        snap.save()?;
        Ok(snap)
    }

    fn snapshot_in_place(&mut self, dir: &Path) -> Result<Snapshot, DriverError> {
        // The manifest names the RAM image by a string: a path that is not one gets a copy.
        let Some(memory) = self.ram_path.to_str().map(str::to_owned) else {
            return self.snapshot(dir);
        };
        self.save_device_state(dir)?;
        let mut snap = Snapshot::new(dir, &self.machine, &self.cpu, self.vcpus, self.ram_bytes);
        snap.qemu_version = self.qemu_version.clone();
        snap.accelerator = self.accel.as_str().into();
        // Absolute paths: `dir.join` of an absolute path is that path.
        snap.memory_file = memory;
        snap.kernel = self.kernel.clone();
        snap.disks = self.disks.clone();
        snap.guest_ports = self.forwards.iter().map(|f| f.guest_port).collect();
        snap.free_page_reporting = self.free_page_reporting;
        snap.display = self.display;
        snap.guest_agent = self.agent_socket.is_some();
        snap.firmware =
            self.firmware.as_ref().map(|(code, vars)| FirmwareFiles { code: code.clone(), vars: vars.clone() });
        Ok(snap)
    }

    fn forwards(&self) -> &[Forward] {
        &self.forwards
    }

    fn console(&mut self) -> Result<&mut Console, DriverError> {
        if self.console.is_none() {
            self.console = Some(Console::connect(&self.serial_socket, &self.serial_log)?);
        }
        Ok(self.console.as_mut().expect("just set"))
    }

    fn release_console(&mut self) {
        self.console = None;
    }

    /// The serial socket accepts one client at a time: call [`Vm::release_console`] before a
    /// person connects to it.
    fn serial_socket(&self) -> Option<&Path> {
        Some(&self.serial_socket)
    }

    /// Display n is port 5900 + n; a busy display falls through to the next free one.
    fn vnc_address(&mut self) -> Result<Option<std::net::SocketAddr>, DriverError> {
        let v = self.qmp("query-vnc", None)?;
        if !v.get("enabled").and_then(|e| e.as_bool()).unwrap_or(false) {
            return Ok(None);
        }
        let host = v.get("host").and_then(|h| h.as_str()).and_then(|h| h.parse::<std::net::IpAddr>().ok());
        let port = v.get("service").and_then(|p| p.as_str()).and_then(|p| p.parse::<u16>().ok());
        match (host, port) {
            (Some(h), Some(p)) => Ok(Some((h, p).into())),
            _ => Err(DriverError::Qmp(crate::qmp::QmpError::Protocol {
                reason: format!("query-vnc: no address in {v}"),
            })),
        }
    }

    fn vnc_clients(&mut self) -> Result<usize, DriverError> {
        let v = self.qmp("query-vnc", None)?;
        Ok(v.get("clients").and_then(|c| c.as_array()).map_or(0, |c| c.len()))
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Connects to the agent channel on first use; resynchronises after a failure.
    fn guest_ping(&mut self, timeout: Duration) -> Result<(), DriverError> {
        self.agent()?.ping(timeout)
    }

    fn guest_exec(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), DriverError> {
        let out = self.agent()?.exec(&["/bin/sh", "-c", command], timeout)?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((text, out.status))
    }

    fn shutdown(mut self) -> Result<(), DriverError> {
        self.kill();
        Ok(())
    }
}

impl QemuVm {
    /// The guest agent, connected on first use.
    pub fn agent(&mut self) -> Result<&mut GuestAgent, DriverError> {
        let Some(socket) = &self.agent_socket else {
            return Err(DriverError::Unsupported {
                what: "a guest agent channel in this VM (launch it with LaunchSpec::guest_agent)".into(),
            });
        };
        if self.agent.is_none() {
            self.agent = Some(GuestAgent::connect(socket)?);
        }
        Ok(self.agent.as_mut().expect("just set"))
    }

    fn kill(&mut self) {
        if let Some(c) = &self.child {
            let pid = c.id();
            live().retain(|l| l.pid != pid);
        }
        self.console = None;
        self.agent = None;
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.execute("quit", None, Duration::from_secs(2));
        }
        self.qmp = None;
        if let Some(mut c) = self.child.take() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(2) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.ram_owned && !self.ram_path.as_os_str().is_empty() && !self.ram_path.starts_with(&self.runtime) {
            let _ = fs::remove_file(&self.ram_path);
        }
        let _ = fs::remove_dir_all(&self.runtime);
    }

    /// Reads up to `max` bytes of QEMU's stderr (for diagnostics).
    pub fn stderr(&self, max: usize) -> String {
        let mut s = String::new();
        if let Ok(f) = fs::File::open(self.runtime.join("qemu.stderr")) {
            let _ = f.take(max as u64).read_to_string(&mut s);
        }
        s
    }
}

/// A QEMU process this process started and has not stopped yet.
struct Live {
    pid: u32,
    runtime: PathBuf,
    private_ram: Option<PathBuf>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<Live>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set by [`kill_all`]: the process is exiting, no QEMU may start any more.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Puts `l` on the list [`kill_all`] empties; false (and not listed) once `kill_all` ran, when
/// the caller must stop the QEMU it just started.
fn track_live(l: Live) -> bool {
    let mut all = live();
    if STOPPED.load(Ordering::SeqCst) {
        return false;
    }
    all.push(l);
    true
}

/// Puts a QEMU that is not a [`QemuVm`] (the KVM probe) on the list [`kill_all`] empties; false
/// if `kill_all` already ran.
pub(crate) fn track(pid: u32, runtime: &Path) -> bool {
    track_live(Live { pid, runtime: runtime.to_owned(), private_ram: None })
}

/// Takes `pid` off that list before it is reaped; false if [`kill_all`] took it already.
pub(crate) fn untrack(pid: u32) -> bool {
    let mut l = live();
    let before = l.len();
    l.retain(|e| e.pid != pid);
    l.len() != before
}

/// Emergency stop for a Ctrl-C / SIGTERM handler that is about to exit the process: kills
/// (SIGKILL) every QEMU this process started and still owns, and removes their runtime
/// directories and private RAM files. Normal code drops its [`QemuVm`]s instead.
///
/// From then on no QEMU starts in this process: a launch or restore racing with the handler
/// fails instead of leaving a QEMU behind.
pub fn kill_all() {
    let all = {
        let mut l = live();
        STOPPED.store(true, Ordering::SeqCst);
        std::mem::take(&mut *l)
    };
    for l in all {
        // SAFETY: kill(2) on a child pid we spawned and have not reaped (it is removed from the
        // list before it is waited for); no memory is touched.
        unsafe { libc::kill(l.pid as libc::pid_t, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: waitpid(2) on that same child, with a valid pointer to a local int.
        unsafe { libc::waitpid(l.pid as libc::pid_t, &mut status, 0) };
        let _ = fs::remove_dir_all(&l.runtime);
        if let Some(r) = l.private_ram {
            let _ = fs::remove_file(r);
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start<'a>(kernel: Option<&'a KernelBoot>, disks: &'a [Disk], runtime: &'a Path, ram: &'a Path) -> Start<'a> {
        Start {
            machine: "pc-q35-10.0",
            cpu: "qemu64",
            vcpus: 1,
            ram_bytes: 256 << 20,
            kernel,
            disks,
            forwards: &[],
            forward_address: "127.0.0.1",
            vnc: None,
            runtime,
            ram_path: ram,
            ram_share: false,
            ram_readonly: true,
            ram_owned: false,
            incoming: true,
            accel: Accel::Tcg,
            free_page_reporting: false,
            display: false,
            guest_agent: false,
            firmware: None,
        }
    }

    /// The value of the option list following `flag` whose first item starts with `first`.
    fn option<'a>(args: &'a [String], flag: &str, first: &str) -> &'a str {
        args.windows(2)
            .find(|w| w[0] == flag && w[1].starts_with(first))
            .map(|w| w[1].as_str())
            .unwrap_or_else(|| panic!("no {flag} {first}... in {args:?}"))
    }

    /// Splits a QEMU option list as QEMU does: at single commas, `,,` being a literal comma.
    fn split_opts(s: &str) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut it = s.chars().peekable();
        while let Some(c) = it.next() {
            if c == ',' {
                if it.peek() == Some(&',') {
                    it.next();
                    out.last_mut().unwrap().push(',');
                } else {
                    out.push(String::new());
                }
            } else {
                out.last_mut().unwrap().push(c);
            }
        }
        out
    }

    #[test]
    fn opt_path_doubles_commas_only() {
        assert_eq!(opt_path(Path::new("/a b/c,d,,e=f")), "/a b/c,,d,,,,e=f");
        assert_eq!(opt_path(Path::new("/plain")), "/plain");
    }

    /// Paths with commas, spaces and `=` stay one option value each: nothing can be injected.
    #[test]
    fn paths_in_options_cannot_inject() {
        let dir = Path::new("/tmp/reg, share=on,readonly=off x");
        let runtime = dir.join("vm,id=evil");
        let ram = dir.join("base,mem-path=/etc/passwd/memory");
        let disks = [Disk { name: "disk0".into(), path: dir.join("d,file=/etc/shadow"), format: DiskFormat::Qcow2 }];
        let k = KernelBoot {
            kernel: dir.join("vmlinuz"),
            initrd: Some(dir.join("initrd,x")),
            cmdline: "console=ttyS0".into(),
        };
        let (code, vars) = (dir.join("OVMF,unit=0,file=/x"), runtime.join("firmware-vars,readonly=off"));
        let mut p = start(Some(&k), &disks, &runtime, &ram);
        p.guest_agent = true;
        p.firmware = Some((&code, &vars));
        let args =
            qemu_args(&p, &[], &runtime.join("qmp.sock"), &runtime.join("serial.sock"), &runtime.join("serial.log"));

        let mem = split_opts(option(&args, "-object", "memory-backend-file"));
        let mem_paths: Vec<&String> = mem.iter().filter(|o| o.starts_with("mem-path=")).collect();
        assert_eq!(mem_paths, [&format!("mem-path={}", ram.display())]);
        assert_eq!(mem.iter().filter(|o| o.starts_with("share=")).count(), 1, "{mem:?}");
        assert_eq!(mem.iter().filter(|o| o.starts_with("readonly=")).collect::<Vec<_>>(), ["readonly=on"]);

        let drive = split_opts(option(&args, "-drive", "file="));
        assert_eq!(drive[0], format!("file={}", disks[0].path.display()));
        assert_eq!(drive.iter().filter(|o| o.starts_with("file=")).count(), 1, "{drive:?}");

        let qmp = split_opts(option(&args, "-qmp", "unix:"));
        assert_eq!(
            qmp,
            [format!("unix:{}", runtime.join("qmp.sock").display()), "server=on".into(), "wait=off".into()]
        );

        let ser = split_opts(option(&args, "-chardev", "socket,"));
        assert!(ser.contains(&format!("path={}", runtime.join("serial.sock").display())), "{ser:?}");
        assert!(ser.contains(&format!("logfile={}", runtime.join("serial.log").display())), "{ser:?}");
        assert!(!ser.iter().any(|o| o.starts_with("id=evil")), "{ser:?}");

        let flash: Vec<Vec<String>> = args
            .windows(2)
            .filter(|w| w[0] == "-drive" && w[1].starts_with("if=pflash"))
            .map(|w| split_opts(&w[1]))
            .collect();
        assert_eq!(flash.len(), 2, "{args:?}");
        assert_eq!(flash[0], ["if=pflash", "format=raw", "unit=0", "readonly=on", &format!("file={}", code.display())]);
        assert_eq!(flash[1], ["if=pflash", "format=raw", "unit=1", &format!("file={}", vars.display())]);

        let qga = split_opts(option(&args, "-chardev", "socket,id=qga0"));
        assert_eq!(qga[2], format!("path={}", runtime.join("qga.sock").display()));
        assert_eq!(qga.len(), 5, "{qga:?}");
        assert!(args.iter().any(|a| a == "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"));

        // Plain file names, passed as they are.
        assert_eq!(option(&args, "-kernel", "/"), k.kernel.display().to_string());
        assert_eq!(option(&args, "-initrd", "/"), dir.join("initrd,x").display().to_string());
    }

    #[test]
    fn migration_files_are_structured_channels() {
        let v = file_channel(Path::new("/s, x/device-state,offset=9"));
        assert_eq!(v["channels"][0]["addr"]["filename"], "/s, x/device-state,offset=9");
        assert_eq!(v["channels"][0]["addr"]["offset"], 0);
        assert!(v.get("uri").is_none());
    }
}
