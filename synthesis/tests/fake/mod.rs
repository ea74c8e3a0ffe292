//! An in-memory hypervisor for the flows' error and clean-up paths: no QEMU, milliseconds per
//! flow. It is written against `vm_driver`'s public traits only, as any other crate would.
//!
//! A VM's RAM is a byte vector; its snapshots write that vector (`memory`), a small device
//! state, copies of its disks and kernel, and a manifest made with `Snapshot::new`. Console
//! commands are scripted: each one is logged and leaves its text in the RAM (so overlays have
//! changes to carry), and answers with the output and status set for it; the guest agent runs
//! them the same way when the VM has its channel. Each forward is a real
//! loopback listener that answers HTTP 200, or, as QEMU's user networking would, hangs up at
//! once where nothing listens in the guest (guest port 1, and ports told so) and holds
//! connections silently while the guest's network is down. Failures
//! are injected through [`Faults`]; once the flows' `interrupt_cleanup` has run, every
//! operation fails as a killed VM would.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_driver::{
    state_hash, DeviceLayout, Disk, DriverError, Forward, Hypervisor, KernelBoot, LaunchSpec, RestoreOptions,
    SerialConsole, Snapshot, Vm,
};

/// What the next operations do wrong.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// `launch` fails.
    pub launch: bool,
    /// `restore` fails.
    pub restore: bool,
    /// `restore` with a fixed host port fails with `PortInUse` (as when the port is taken).
    pub port_in_use: bool,
    /// `snapshot` fails after writing part of its files.
    pub snapshot: bool,
    /// Forwards accept connections but never answer HTTP.
    pub http_silent: bool,
    /// Guest ports where nothing listens: their forwards accept a connection and close it at
    /// once, as QEMU's user networking does when the guest refuses. Guest port 1 is always so.
    pub refused_ports: std::collections::BTreeSet<u16>,
    /// The guest's network is not up: every forward accepts a connection and holds it, silent,
    /// as QEMU's user networking does while the guest does not answer.
    pub network_down: bool,
    /// The VM has the guest agent's channel, but no agent answers on it.
    pub agent_silent: bool,
    /// Commands that exit with this status and output instead of 0.
    pub failing_commands: BTreeMap<String, (i32, String)>,
}

/// What the hypervisor saw.
#[derive(Debug, Default)]
pub struct Record {
    /// `launch`, `restore`, `snapshot DIR`, `run CMD`, `shutdown`, `drop`, in order.
    pub calls: Vec<String>,
}

/// The fake hypervisor.
#[derive(Clone, Default)]
pub struct FakeHypervisor {
    pub faults: Arc<Mutex<Faults>>,
    pub record: Arc<Mutex<Record>>,
    /// VMs alive (not shut down or dropped).
    pub live: Arc<AtomicUsize>,
}

impl FakeHypervisor {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().unwrap());
    }

    pub fn calls(&self) -> Vec<String> {
        self.record.lock().unwrap().calls.clone()
    }

    fn log(&self, call: String) {
        self.record.lock().unwrap().calls.push(call);
    }

    fn faults(&self) -> Faults {
        self.faults.lock().unwrap().clone()
    }

    fn start(
        &self,
        ram: Vec<u8>,
        machine: (&str, &str, u32),
        kernel: Option<KernelBoot>,
        disks: Vec<Disk>,
        forwards: &[Forward],
        layout: DeviceLayout,
    ) -> Result<FakeVm, DriverError> {
        let faults = self.faults();
        let mut chosen = Vec::new();
        for f in forwards {
            let how = if faults.network_down {
                Listen::Hold
            } else if f.guest_port == 1 || faults.refused_ports.contains(&f.guest_port) || faults.http_silent {
                Listen::Close
            } else {
                Listen::Http
            };
            chosen.push(Forward { host_port: serve(f.host_port, how)?, guest_port: f.guest_port });
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(FakeVm {
            hv: self.clone(),
            ram: ram.clone(),
            machine_type: machine.0.into(),
            cpu_model: machine.1.into(),
            vcpus: machine.2,
            kernel,
            disks,
            forwards: chosen,
            layout,
            console: FakeConsole { hv: self.clone(), ram, log: "fake guest: ready\n".into() },
            stopped: false,
        })
    }
}

fn killed() -> DriverError {
    DriverError::QemuDied { status: "killed".into(), stderr_tail: "the process is exiting".into() }
}

/// What a forward's listener does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listen {
    /// Answer a request with HTTP 200.
    Http,
    /// Close it at once.
    Close,
    /// Hold it open, silent.
    Hold,
}

/// A loopback listener on `port` (0: any) that treats connections as `how` says.
fn serve(port: u16, how: Listen) -> Result<u16, DriverError> {
    let l = TcpListener::bind(("127.0.0.1", port)).map_err(|_| DriverError::PortInUse { port })?;
    let port = l.local_addr().expect("bound").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            match how {
                Listen::Close => continue,
                Listen::Hold => held.push(s),
                Listen::Http => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let _ =
                        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nfake app\r\n");
                }
            }
        }
    });
    Ok(port)
}

impl Hypervisor for FakeHypervisor {
    type Vm = FakeVm;

    fn launch(&self, spec: &LaunchSpec) -> Result<FakeVm, DriverError> {
        self.log("launch".into());
        if synthesis::interrupted() {
            return Err(killed());
        }
        if self.faults().launch {
            return Err(DriverError::QemuDied { status: "exit status: 1".into(), stderr_tail: "fake launch".into() });
        }
        for d in &spec.disks {
            if !d.path.is_file() {
                return Err(DriverError::BadImage {
                    what: "disk image",
                    path: d.path.clone(),
                    reason: "missing".into(),
                });
            }
        }
        let layout = DeviceLayout {
            free_page_reporting: spec.free_page_reporting,
            display: spec.vnc_display.is_some(),
            guest_agent: spec.guest_agent,
        };
        self.start(
            vec![0; spec.ram_bytes as usize],
            (&spec.machine_type, &spec.cpu_model, spec.vcpus),
            spec.kernel.clone(),
            spec.disks.clone(),
            &spec.forwards,
            layout,
        )
    }

    fn restore(&self, snap: &Snapshot, opts: &RestoreOptions) -> Result<FakeVm, DriverError> {
        self.log("restore".into());
        if synthesis::interrupted() {
            return Err(killed());
        }
        let faults = self.faults();
        if faults.restore {
            return Err(DriverError::Migration { reason: "fake restore".into() });
        }
        let forwards = opts
            .forwards
            .clone()
            .unwrap_or_else(|| snap.guest_ports.iter().map(|&g| Forward { host_port: 0, guest_port: g }).collect());
        if faults.port_in_use {
            if let Some(f) = forwards.iter().find(|f| f.host_port != 0) {
                return Err(DriverError::PortInUse { port: f.host_port });
            }
        }
        // What a real restore checks: the RAM size and the state hash over the files.
        let ram = std::fs::read(snap.memory_path())
            .map_err(|source| DriverError::Io { what: format!("read {}", snap.memory_path().display()), source })?;
        if ram.len() as u64 != snap.ram_bytes {
            return Err(DriverError::BadImage {
                what: "RAM image",
                path: snap.memory_path(),
                reason: format!("{} bytes, not {}", ram.len(), snap.ram_bytes),
            });
        }
        if state_hash(&snap.memory_path(), &snap.device_state_path())? != snap.state_hash {
            return Err(DriverError::BadSnapshot { dir: snap.dir.clone(), reason: "state hash mismatch".into() });
        }
        let disks = opts
            .disks
            .clone()
            .unwrap_or_else(|| snap.disks.iter().map(|d| Disk { path: snap.dir.join(&d.path), ..d.clone() }).collect());
        let kernel = snap.kernel.as_ref().map(|k| KernelBoot {
            kernel: snap.dir.join(&k.kernel),
            initrd: k.initrd.as_ref().map(|i| snap.dir.join(i)),
            cmdline: k.cmdline.clone(),
        });
        self.start(ram, (&snap.machine_type, &snap.cpu_model, snap.vcpus), kernel, disks, &forwards, snap.layout())
    }
}

/// A fake VM.
pub struct FakeVm {
    hv: FakeHypervisor,
    ram: Vec<u8>,
    machine_type: String,
    cpu_model: String,
    vcpus: u32,
    kernel: Option<KernelBoot>,
    disks: Vec<Disk>,
    forwards: Vec<Forward>,
    layout: DeviceLayout,
    console: FakeConsole,
    stopped: bool,
}

impl FakeVm {
    fn copy(&self, from: &Path, to: &Path) -> Result<(), DriverError> {
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|source| DriverError::Io { what: format!("copy {} to {}", from.display(), to.display()), source })
    }
}

impl Vm for FakeVm {
    type Console = FakeConsole;

    fn pause(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    fn snapshot(&mut self, dir: &Path) -> Result<Snapshot, DriverError> {
        self.hv.log(format!("snapshot {}", dir.file_name().unwrap_or_default().to_string_lossy()));
        if synthesis::interrupted() {
            return Err(killed());
        }
        let io = |what: String| move |source| DriverError::Io { what, source };
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        self.ram.clone_from(&self.console.ram);
        std::fs::write(dir.join("memory"), &self.ram).map_err(io("write memory".into()))?;
        if self.hv.faults().snapshot {
            return Err(DriverError::Migration { reason: "fake snapshot: device state not written".into() });
        }
        std::fs::write(dir.join("device-state"), format!("fake devices {}", self.console.log.len()))
            .map_err(io("write device-state".into()))?;
        let mut snap = Snapshot::new(dir, &self.machine_type, &self.cpu_model, self.vcpus, self.ram.len() as u64);
        snap.qemu_version = "10.0.0".into();
        snap.accelerator = "tcg".into();
        snap.set_layout(self.layout);
        for d in &self.disks {
            let name = format!("{}.img", d.name);
            self.copy(&d.path, &dir.join(&name))?;
            snap.disks.push(Disk { name: d.name.clone(), path: name.into(), format: d.format });
        }
        if let Some(k) = &self.kernel {
            self.copy(&k.kernel, &dir.join("vmlinuz"))?;
            let initrd = match &k.initrd {
                Some(i) => {
                    self.copy(i, &dir.join("initrd.img"))?;
                    Some(PathBuf::from("initrd.img"))
                }
                None => None,
            };
            snap.kernel = Some(KernelBoot { kernel: "vmlinuz".into(), initrd, cmdline: k.cmdline.clone() });
        }
        snap.guest_ports = self.forwards.iter().map(|f| f.guest_port).collect();
        snap.state_hash = state_hash(&snap.memory_path(), &snap.device_state_path())?;
        snap.save()?;
        Ok(snap)
    }

    fn forwards(&self) -> &[Forward] {
        &self.forwards
    }

    fn console(&mut self) -> Result<&mut FakeConsole, DriverError> {
        if synthesis::interrupted() {
            return Err(killed());
        }
        Ok(&mut self.console)
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn guest_ping(&mut self, timeout: Duration) -> Result<(), DriverError> {
        self.hv.log("ping".into());
        self.agent(timeout)
    }

    fn guest_exec(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), DriverError> {
        self.hv.log(format!("exec {command}"));
        self.agent(timeout)?;
        self.console.execute(command)
    }

    fn shutdown(mut self) -> Result<(), DriverError> {
        self.hv.log("shutdown".into());
        self.stop();
        Ok(())
    }
}

impl FakeVm {
    /// Whether an agent answers: the VM must have its channel, and the agent not be silent.
    fn agent(&self, timeout: Duration) -> Result<(), DriverError> {
        if !self.layout.guest_agent {
            return Err(DriverError::Unsupported { what: "a guest agent channel in this VM".into() });
        }
        if self.hv.faults().agent_silent {
            return Err(DriverError::Timeout { waiting_for: "the guest agent's answer to guest-ping".into(), timeout });
        }
        Ok(())
    }

    fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            self.hv.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        if !self.stopped {
            self.hv.log("drop".into());
        }
        self.stop();
    }
}

/// The fake serial console.
pub struct FakeConsole {
    hv: FakeHypervisor,
    ram: Vec<u8>,
    log: String,
}

impl FakeConsole {
    /// Runs `command` as the guest would, through the console or the agent.
    fn execute(&mut self, command: &str) -> Result<(String, i32), DriverError> {
        // The command's text lands in RAM, at a place of its own.
        let at = (blake3::hash(command.as_bytes()).as_bytes()[0] as usize * 4096) % self.ram.len().max(1);
        let end = (at + command.len()).min(self.ram.len());
        self.ram[at..end].copy_from_slice(&command.as_bytes()[..end - at]);
        self.log.push_str(command);
        self.log.push('\n');
        match self.hv.faults().failing_commands.get(command) {
            Some((status, output)) => Ok((output.clone(), *status)),
            None => Ok((String::new(), 0)),
        }
    }
}

impl SerialConsole for FakeConsole {
    fn run(&mut self, command: &str, _timeout: Duration) -> Result<(String, i32), DriverError> {
        self.hv.log(format!("run {command}"));
        self.execute(command)
    }

    fn wait_for_text(&self, text: &str, timeout: Duration) -> Result<(), DriverError> {
        if self.log.contains(text) {
            Ok(())
        } else {
            Err(DriverError::Timeout { waiting_for: format!("'{text}' on the serial console"), timeout })
        }
    }
}

/// A base request over [`guest_files`] in `dir/guest`, 1 MiB of RAM, one preparation command,
/// working in `dir/work`.
pub fn base_request(dir: &Path) -> synthesis::BaseRequest {
    let (kernel, initrd, disk) = guest_files(&dir.join("guest"));
    let mut req =
        synthesis::BaseRequest::new("fakebase", disk, dir.join("work")).kernel(kernel, Some(initrd), "console=ttyS0");
    req.ram_bytes = 1 << 20;
    req.ready = synthesis::ReadyCheck::SerialText("fake guest: ready".into());
    req.ready_timeout = Duration::from_secs(5);
    req.prepare = vec!["echo prepared".into()];
    req
}

/// An overlay request that runs one command and forwards guest port 8080, written to `out`.
pub fn overlay_request(out: &Path) -> synthesis::OverlayRequest {
    synthesis::OverlayRequest {
        name: "app".into(),
        customize: vec!["install the app".into()],
        interactive: false,
        vnc: false,
        wait_http: None,
        forwards: vec![overlay_format::PortForward {
            protocol: overlay_format::Protocol::Tcp,
            host_port: 0,
            guest_port: 8080,
        }],
        via: synthesis::CommandChannel::Console,
        trim: false,
        out: out.to_owned(),
        options: delta_engine::CreateOptions::default(),
        segmented: false,
    }
}

/// Files to boot under `dir`: a kernel, an initrd and a 1 MiB raw disk.
pub fn guest_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (k, i, d) = (dir.join("vmlinuz"), dir.join("initrd.img"), dir.join("disk.raw"));
    std::fs::write(&k, b"fake kernel").unwrap();
    std::fs::write(&i, b"fake initrd").unwrap();
    let disk: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&d, disk).unwrap();
    (k, i, d)
}

/// Everything under `dir` (relative paths, sorted), to compare before and after a flow.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Collects the flows' events as text.
#[derive(Default, Clone)]
pub struct Events(pub Arc<Mutex<Vec<String>>>);

impl Events {
    pub fn steps(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Events, and a flow callback that records their steps.
pub fn recorder() -> (Events, impl Fn(synthesis::Event) + Sync) {
    let events = Events::default();
    let e = events.clone();
    (events, move |ev: synthesis::Event| {
        if let synthesis::Event::Step(s) = ev {
            e.0.lock().unwrap().push(s);
        }
    })
}

/// A test's temporary directory, a fake hypervisor and a registry in that directory; each test
/// file adds the requests and steps it needs.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub hv: FakeHypervisor,
    pub registry: base_registry::Registry,
}

impl Setup {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let registry = base_registry::Registry::open(&tmp.path().join("registry")).unwrap();
        Setup { tmp, hv: FakeHypervisor::new(), registry }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
}
