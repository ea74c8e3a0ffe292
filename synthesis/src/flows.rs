//! The three flows: base, overlay, synthesis.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base_registry::Registry;
use delta_engine::{
    apply_overlay_reader, create_overlay, ApplyOptions, CreateOptions, CreateStats, CustomImage, CustomSource,
    OverlayInfo,
};
use overlay_format::{OverlayReader, PortForward};
use vm_driver::{
    DiskFormat, Firmware, Forward, Hypervisor, KernelBoot, LaunchSpec, RamMode, RestoreOptions, SerialConsole,
    Snapshot, Vm,
};

use crate::base::{register_snapshot, RegisteredBase};
use crate::http::{http_wait, HttpCheck};
use crate::ready::{ReadyCheck, CANARY_PORT};
use crate::{Event, FlowError, InputFormat};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Paths that flows in progress would remove on error: what [`interrupt_cleanup`] removes.
static PENDING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// For a Ctrl-C / SIGTERM handler that is about to exit the process: kills every QEMU the
/// flows started and removes every half-written file and directory of flows in progress
/// (work directories, `.partial` overlays, VM directories not yet complete).
///
/// From the moment it is called, [`interrupted`] answers true: the flow running on another
/// thread fails as its VM disappears, and its caller should let the handler finish the exit
/// instead of reporting that failure.
pub fn interrupt_cleanup() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    vm_driver::kill_all();
    for p in std::mem::take(&mut *pending()) {
        remove(&p);
    }
}

/// Adds `path` to what [`interrupt_cleanup`] removes: for a caller that removes it itself when
/// done (e.g. a VM directory removed once its VM stops).
pub fn remove_on_interrupt(path: &Path) {
    pending().push(path.to_owned());
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`interrupt_cleanup`] has been called in this process.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

fn remove(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes a path on drop unless disarmed: nothing half-written is left behind.
pub(crate) struct Guard(Option<PathBuf>);

impl Guard {
    pub(crate) fn new(p: &Path) -> Self {
        pending().push(p.to_owned());
        Guard(Some(p.to_owned()))
    }
    pub(crate) fn disarm(&mut self) {
        if let Some(p) = self.0.take() {
            forget(&p);
        }
    }
}

fn forget(p: &Path) {
    let mut all = pending();
    if let Some(i) = all.iter().position(|x| x == p) {
        all.swap_remove(i);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            remove(&p);
            forget(&p);
        }
    }
}

/// Refuses what the flows cannot honour before any work: a udp forward (only tcp is
/// forwarded), and a probe of a guest port the overlay does not forward.
pub(crate) fn check_forwards(forwards: &[PortForward], probe_port: Option<u16>) -> Result<(), FlowError> {
    if let Some(f) = forwards.iter().find(|f| f.protocol != overlay_format::Protocol::Tcp) {
        return Err(FlowError::Unsupported {
            what: format!("the {:?} forward of guest port {}: only tcp forwards", f.protocol, f.guest_port)
                .to_lowercase(),
        });
    }
    if let Some(p) = probe_port.filter(|p| !forwards.iter().any(|f| f.guest_port == *p)) {
        return Err(FlowError::NotForwarded { port: p, forwarded: forwards.iter().map(|f| f.guest_port).collect() });
    }
    Ok(())
}

/// Creates a path of our own next to `out` (`.NAME.KIND-PID-N`, hidden, in the same
/// directory) with `create`, which must fail with `AlreadyExists` when the path exists; tries
/// the next `N` then. Returns the path and a guard that removes it.
pub(crate) fn fresh_sibling(
    out: &Path,
    kind: &str,
    mut create: impl FnMut(&Path) -> std::io::Result<()>,
) -> Result<(PathBuf, Guard), FlowError> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    for n in 0..1000u32 {
        let p = dir.join(format!(".{name}.{kind}-{}-{n}", std::process::id()));
        match create(&p) {
            Ok(()) => {
                let guard = Guard::new(&p);
                return Ok((p, guard));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(FlowError::Io { path: p, source }),
        }
    }
    Err(FlowError::Exists { path: dir.join(format!(".{name}.{kind}-{}-999", std::process::id())) })
}

/// Creates the directory `dir` (and its missing parents), failing with [`FlowError::Exists`]
/// when `dir` exists: what a flow then removes on error is its own.
pub(crate) fn create_dir_new(dir: &Path) -> Result<(), FlowError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| FlowError::Io { path: parent.to_owned(), source })?;
    }
    std::fs::create_dir(dir).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => FlowError::Exists { path: dir.to_owned() },
        _ => FlowError::Io { path: dir.to_owned(), source },
    })
}

/// Moves the finished file `from` to `to` without ever replacing a file at `to`: a hard link
/// (which fails when `to` exists), then the unlink of `from`. On a file system without hard
/// links, a rename after a last check.
pub(crate) fn publish(from: &Path, to: &Path) -> Result<(), FlowError> {
    match std::fs::hard_link(from, to) {
        Ok(()) => {
            let _ = std::fs::remove_file(from);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(FlowError::Exists { path: to.to_owned() }),
        Err(_) if to.symlink_metadata().is_ok() => Err(FlowError::Exists { path: to.to_owned() }),
        Err(_) => std::fs::rename(from, to).map_err(|source| FlowError::Io { path: to.to_owned(), source }),
    }
}

/// The preparation steps of the base and overlay flows: commands (over the serial console or
/// the guest agent), a person at the console, then waiting for the app's HTTP answer.
fn prepare<V: Vm>(
    vm: &mut V,
    commands: &[String],
    via: CommandChannel,
    interactive: bool,
    wait_http: Option<&HttpCheck>,
    events: &(dyn Fn(Event) + Sync),
) -> Result<(), FlowError> {
    run_all(vm, commands, via, events)?;
    if interactive {
        let serial_socket = vm
            .serial_socket()
            .ok_or_else(|| FlowError::Unsupported { what: "a person at the console of this hypervisor's VMs".into() })?
            .to_owned();
        vm.release_console();
        let vnc = vm.vnc_address()?;
        let viewer_closed = Arc::new(AtomicBool::new(false));
        let event = Event::Interactive { serial_socket, vnc, viewer_closed: viewer_closed.clone() };
        if vnc.is_none() {
            events(event);
        } else {
            // While the person works, watch the display: once a viewer has come and every
            // viewer has gone, say so, and the callback returns.
            let done = AtomicBool::new(false);
            let (vm, d, closed) = (&mut *vm, &done, &*viewer_closed);
            std::thread::scope(|s| {
                let watcher = s.spawn(move || watch_viewers(vm, d, closed));
                events(event);
                done.store(true, Ordering::SeqCst);
                watcher.join().unwrap_or(Ok(()))
            })?;
        }
    }
    if let Some(check) = wait_http {
        let host = vm.host_port(check.port).ok_or_else(|| FlowError::NotForwarded {
            port: check.port,
            forwarded: vm.forwards().iter().map(|f| f.guest_port).collect(),
        })?;
        events(Event::Step(check.describe()));
        let answer = http_wait("127.0.0.1", host, check)?;
        events(Event::Step(format!(
            "guest port {} answers {} {} on {}",
            check.port, answer.status, answer.reason, check.path
        )));
    }
    Ok(())
}

/// Polls the VNC display until `done`; sets `closed` once a viewer has connected and every
/// viewer has disconnected (or when the VM cannot be asked any more).
fn watch_viewers<V: Vm>(vm: &mut V, done: &AtomicBool, closed: &AtomicBool) -> Result<(), FlowError> {
    let mut seen = false;
    while !done.load(Ordering::SeqCst) {
        let clients = match vm.vnc_clients() {
            Ok(n) => n,
            Err(e) => {
                closed.store(true, Ordering::SeqCst);
                return Err(e.into());
            }
        };
        seen |= clients > 0;
        if seen && clients == 0 {
            closed.store(true, Ordering::SeqCst);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// How the flows run shell commands in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommandChannel {
    /// A shell on the serial console (ttyS0) that does not echo: the test guests, or a root
    /// autologin set up so.
    #[default]
    Console,
    /// The QEMU guest agent: `guest-exec` of `/bin/sh -c COMMAND`, its output captured. Needs
    /// `qemu-guest-agent` running in the guest and a VM with the agent channel
    /// (`BaseRequest::guest_agent`).
    Agent,
}

fn run_all<V: Vm>(
    vm: &mut V,
    commands: &[String],
    via: CommandChannel,
    events: &(dyn Fn(Event) + Sync),
) -> Result<(), FlowError> {
    for c in commands {
        let (out, status) = match via {
            CommandChannel::Console => {
                events(Event::Step(format!("guest$ {c}")));
                vm.console()?.run(c, COMMAND_TIMEOUT)?
            }
            CommandChannel::Agent => {
                events(Event::Step(format!("guest (agent)$ {c}")));
                vm.guest_exec(c, COMMAND_TIMEOUT)?
            }
        };
        if status != 0 {
            return Err(FlowError::GuestCommand { command: c.clone(), status, output: out });
        }
    }
    Ok(())
}

/// What the base flow boots.
///
/// Made with [`BaseRequest::new`] (the defaults: the first disk booted by its firmware, 256 MiB
/// of RAM, one vCPU, ready when the guest prints `cloudlet-guest: ready` on its serial console,
/// within 300 s); set the fields that differ.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BaseRequest {
    /// Name of the base.
    pub name: String,
    /// Direct kernel boot: a kernel, an optional initrd, a command line. `None`: the firmware
    /// boots the first disk (its own bootloader).
    pub kernel: Option<KernelBoot>,
    /// Disk images, raw or qcow2 (see [`probe_disk`](crate::probe_disk)): `disk0`, `disk1`, ...
    /// in this order; the first is the boot disk. Each is copied into the base as a raw sparse
    /// file; the inputs are never modified.
    pub disks: Vec<PathBuf>,
    /// Guest RAM (a multiple of 1 MiB).
    pub ram_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// What says the booted guest is ready.
    pub ready: ReadyCheck,
    /// How long to wait for it.
    pub ready_timeout: Duration,
    /// The firmware (default BIOS; UEFI from a pair of flash images, see [`OVMF_CODE`]).
    pub firmware: Firmware,
    /// Give the VM the QEMU guest agent's channel (part of the base's device layout, so its
    /// overlays can run commands through the agent too). Implied by [`ReadyCheck::Agent`] and
    /// by `via` [`CommandChannel::Agent`].
    pub guest_agent: bool,
    /// Shell commands run in the guest before the snapshot.
    pub prepare: Vec<String>,
    /// How `prepare` (and `trim`) reach the guest.
    pub via: CommandChannel,
    /// After the commands, hand the serial console to a person ([`Event::Interactive`]).
    pub interactive: bool,
    /// Also serve the guest's screen over VNC on 127.0.0.1 (display 0, or the next free one),
    /// for the person of `interactive`.
    pub vnc: bool,
    /// Then wait until the guest answers HTTP on this port (forwarded for the wait only).
    pub wait_http: Option<HttpCheck>,
    /// Last, before the snapshot, discard the guest's freed disk blocks and drop its page cache
    /// ([`TRIM_COMMANDS`]): a smaller base. Needs `fstrim` (util-linux) in the guest.
    pub trim: bool,
    /// Scratch directory for the snapshot before it moves into the registry (must not
    /// exist; removed afterwards).
    pub work_dir: PathBuf,
}

impl BaseRequest {
    /// A request to make base `name` of the disk image `disk`, working in `work_dir`, with
    /// the defaults above.
    pub fn new(name: &str, disk: impl Into<PathBuf>, work_dir: impl Into<PathBuf>) -> Self {
        BaseRequest {
            name: name.into(),
            kernel: None,
            disks: vec![disk.into()],
            ram_bytes: 256 << 20,
            vcpus: 1,
            ready: ReadyCheck::SerialText("cloudlet-guest: ready".into()),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            firmware: Firmware::Bios,
            guest_agent: false,
            prepare: Vec::new(),
            via: CommandChannel::Console,
            interactive: false,
            vnc: false,
            wait_http: None,
            trim: false,
            work_dir: work_dir.into(),
        }
    }

    /// Boots by UEFI with Debian's OVMF ([`OVMF_CODE`], [`OVMF_VARS`]).
    pub fn uefi(mut self) -> Self {
        self.firmware = Firmware::Uefi { code: OVMF_CODE.into(), vars: OVMF_VARS.into() };
        self
    }

    /// Whether the VM gets the guest agent's channel: asked for, or needed.
    fn wants_agent(&self) -> bool {
        self.guest_agent || self.ready == ReadyCheck::Agent || self.via == CommandChannel::Agent
    }

    /// Boots `kernel` with `initrd` (if any) and `cmdline` instead of the first disk.
    pub fn kernel(mut self, kernel: impl Into<PathBuf>, initrd: Option<PathBuf>, cmdline: &str) -> Self {
        self.kernel = Some(KernelBoot { kernel: kernel.into(), initrd, cmdline: cmdline.into() });
        self
    }
}

/// How long the base flow waits for a booted guest by default (a distribution booting under
/// TCG takes a minute or more).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Debian's UEFI firmware code (package `ovmf`), for [`Firmware::Uefi`].
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// Debian's UEFI variable store template (package `ovmf`); the VM writes to a copy of it.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// What `trim` runs in the guest before a snapshot: write everything out, discard the disk
/// blocks the file systems no longer use (the disks have `discard=unmap`, so they become holes
/// in the image), drop the page cache, then compact memory and wait a little: the balloon's
/// free page reporting hands the host only free blocks of 2 MiB or more (pageblock order),
/// 2 s after they appear, and a dropped page cache leaves its free pages scattered until
/// compaction gathers them. Reported pages become holes in the RAM image.
pub const TRIM_COMMANDS: [&str; 3] = [
    "sync && fstrim -av",
    "echo 3 > /proc/sys/vm/drop_caches",
    "if [ -w /proc/sys/vm/compact_memory ]; then echo 1 > /proc/sys/vm/compact_memory; fi; sleep 3",
];

/// Runs [`TRIM_COMMANDS`] through `via`.
fn trim<V: Vm>(vm: &mut V, via: CommandChannel, events: &(dyn Fn(Event) + Sync)) -> Result<(), FlowError> {
    let commands: Vec<String> = TRIM_COMMANDS.iter().map(|c| c.to_string()).collect();
    run_all(vm, &commands, via, events).map_err(|e| match e {
        FlowError::GuestCommand { command, status, output } if command.contains("fstrim") => FlowError::GuestCommand {
            command,
            status,
            output: format!(
                "{}
(trimming needs fstrim from util-linux in the guest)",
                output.trim_end()
            ),
        },
        e => e,
    })
}

/// Timings of the base flow.
#[derive(Debug, Clone, Default)]
pub struct BaseTimings {
    /// Boot until ready.
    pub boot: Duration,
    /// Snapshot (device state + copies).
    pub snapshot: Duration,
    /// Index build and id.
    pub index: Duration,
}

/// Asks the guest agent until it answers or `timeout` has passed (the agent starts late in a
/// boot, and may not take the first connection).
fn agent_wait<V: Vm>(vm: &mut V, timeout: Duration) -> Result<(), FlowError> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let e = match vm.guest_ping(left.min(Duration::from_secs(10))) {
            Ok(()) => return Ok(()),
            Err(e @ vm_driver::DriverError::Unsupported { .. }) => return Err(e.into()),
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            return Err(FlowError::NotReady {
                waiting_for: "the guest agent to answer guest-ping".into(),
                timeout,
                last: crate::error_chain(&e),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks a base request before any work: the kernel files and every disk image.
fn check_base_request(req: &BaseRequest) -> Result<(), FlowError> {
    if req.disks.is_empty() {
        return Err(FlowError::Unsupported { what: "a base without a disk".into() });
    }
    if let Some(k) = &req.kernel {
        for f in std::iter::once(&k.kernel).chain(&k.initrd) {
            let m = std::fs::metadata(f).map_err(|source| FlowError::Io { path: f.clone(), source })?;
            if !m.is_file() {
                return Err(FlowError::Io { path: f.clone(), source: std::io::Error::other("not a regular file") });
            }
        }
    }
    for d in &req.disks {
        crate::disk::probe_disk(d)?;
    }
    if let Firmware::Uefi { code, vars } = &req.firmware {
        for (what, f) in [("code", code), ("variable store", vars)] {
            if let Err(source) = std::fs::File::open(f) {
                return Err(FlowError::MissingFirmware { what, path: f.clone(), source });
            }
        }
    }
    Ok(())
}

/// Boots disk images (raw or qcow2, by their firmware or a kernel), waits until the guest is
/// ready, prepares it, snapshots it, indexes it and registers it.
pub fn create_base<H: Hypervisor>(
    hypervisor: &H,
    registry: &Registry,
    req: &BaseRequest,
    events: &(dyn Fn(Event) + Sync),
) -> Result<(RegisteredBase, BaseTimings), FlowError> {
    if req.work_dir.exists() {
        return Err(FlowError::Exists { path: req.work_dir.clone() });
    }
    if let Ok(b) = registry.find(&req.name) {
        return Err(FlowError::BadBase { dir: b.dir, reason: format!("a base named '{}' exists already", req.name) });
    }
    check_base_request(req)?;
    let mut t = BaseTimings::default();
    let work = req.work_dir.clone();
    create_dir_new(&work)?;
    let _work_guard = Guard::new(&work);
    let mut spec = LaunchSpec::new(req.ram_bytes);
    spec.vcpus = req.vcpus;
    spec.kernel = req.kernel.clone();
    spec.firmware = req.firmware.clone();
    spec.guest_agent = req.wants_agent();
    for (i, input) in req.disks.iter().enumerate() {
        let name = format!("disk{i}");
        let disk = work.join(format!("{name}.raw"));
        if let InputFormat::Qcow2 = crate::disk::probe_disk(input)? {
            events(Event::Step(format!("converting {} (qcow2) to a raw {name}", input.display())));
        }
        crate::disk::import_disk(input, &disk)?;
        spec = spec.disk(&name, &disk, DiskFormat::Raw);
    }
    if let Some(c) = &req.wait_http {
        spec = spec.forward(0, c.port);
    }
    if let ReadyCheck::TcpPort(p) = req.ready {
        for port in [p, CANARY_PORT] {
            if !spec.forwards.iter().any(|f| f.guest_port == port) {
                spec = spec.forward(0, port);
            }
        }
    }
    spec.vnc_display = req.vnc.then_some(0);
    events(Event::Step(match hypervisor.launch_note(&spec) {
        Some(note) => format!("booting the base VM ({note})"),
        None => "booting the base VM".into(),
    }));
    let t0 = Instant::now();
    let mut vm = hypervisor.launch(&spec)?;
    events(Event::Step(req.ready.describe(req.ready_timeout)));
    match &req.ready {
        ReadyCheck::SerialText(text) => vm.console()?.wait_for_text(text, req.ready_timeout)?,
        ReadyCheck::TcpPort(p) => {
            let host_of = |port: u16| {
                vm.host_port(port).ok_or_else(|| FlowError::NotForwarded {
                    port,
                    forwarded: vm.forwards().iter().map(|f| f.guest_port).collect(),
                })
            };
            let (target, canary) = ((*p, host_of(*p)?), (CANARY_PORT, host_of(CANARY_PORT)?));
            crate::ready::tcp_wait("127.0.0.1", target, canary, req.ready_timeout)?;
        }
        ReadyCheck::Agent => agent_wait(&mut vm, req.ready_timeout)?,
    }
    t.boot = t0.elapsed();
    events(Event::Step(format!("the guest is ready after {:.1} s", t.boot.as_secs_f64())));
    prepare(&mut vm, &req.prepare, req.via, req.interactive, req.wait_http.as_ref(), events)?;
    if req.trim {
        trim(&mut vm, req.via, events)?;
    }
    events(Event::Step("snapshotting the base VM".into()));
    let t1 = Instant::now();
    let snap = vm.snapshot(&work.join("snapshot"))?;
    drop(vm);
    t.snapshot = t1.elapsed();
    events(Event::Step("indexing and registering the base".into()));
    let t2 = Instant::now();
    let source: Vec<String> = req.disks.iter().map(|d| d.display().to_string()).collect();
    let base = register_snapshot(registry, &snap, &req.name, Some(source.join(", ")))?;
    t.index = t2.elapsed();
    Ok((base, t))
}

/// What the overlay flow does to the base.
#[derive(Debug, Clone)]
pub struct OverlayRequest {
    /// Name of the overlay / app.
    pub name: String,
    /// Shell commands that customize the guest.
    pub customize: Vec<String>,
    /// How `customize` (and `trim`, and the final `sync`) reach the guest; the agent needs a
    /// base with its channel ([`BaseRequest::guest_agent`]).
    pub via: CommandChannel,
    /// After the commands, hand the serial console to a person ([`Event::Interactive`]).
    pub interactive: bool,
    /// Also serve the guest's screen over VNC on 127.0.0.1 (display 0, or the next free one),
    /// for the person of `interactive`.
    pub vnc: bool,
    /// Then wait until the guest answers HTTP on this port (one of `forwards`, or forwarded
    /// for the wait only).
    pub wait_http: Option<HttpCheck>,
    /// The app's port forwards (recorded in the overlay).
    pub forwards: Vec<PortForward>,
    /// Last, before the snapshot, discard the guest's freed disk blocks and drop its page
    /// cache ([`TRIM_COMMANDS`]): a smaller overlay. Needs `fstrim` (util-linux) in the guest.
    pub trim: bool,
    /// The overlay file to write (must not exist).
    pub out: PathBuf,
    /// Engine options (compression, level).
    pub options: CreateOptions,
    /// Write a segmented overlay (format 1.3), which synthesis can start from before it has
    /// arrived: the custom VM is resumed once more with its memory served, and the chunks it
    /// touches until its app answers (`wait_http`) and a little after go first.
    pub segmented: bool,
}

/// Result of the overlay flow.
#[derive(Debug, Clone)]
pub struct OverlayOutcome {
    /// The overlay file.
    pub path: PathBuf,
    /// Engine statistics.
    pub stats: CreateStats,
    /// Resume of the base VM.
    pub resume: Duration,
    /// Customization commands.
    pub customize: Duration,
    /// Snapshot of the custom VM.
    pub snapshot: Duration,
    /// How the overlay was segmented, when it was.
    pub segments: Option<delta_engine::SegmentStats>,
}

/// How long a segmented overlay's recording run goes on after the app's first answer: what
/// the app touches right after it answers goes into the working set too.
pub(crate) const FIRST_TOUCH_TAIL: Duration = Duration::from_secs(2);

/// Resumes the base, customizes it, snapshots it and writes the overlay.
pub fn create_overlay_file<H: Hypervisor>(
    hypervisor: &H,
    base: &RegisteredBase,
    req: &OverlayRequest,
    events: &(dyn Fn(Event) + Sync),
) -> Result<OverlayOutcome, FlowError> {
    if req.out.exists() {
        return Err(FlowError::Exists { path: req.out.clone() });
    }
    check_forwards(&req.forwards, None)?;
    if req.via == CommandChannel::Agent && !base.snapshot.layout().guest_agent {
        return Err(FlowError::BadBase {
            dir: base.entry.dir.clone(),
            reason: format!(
                "base '{}' has no guest agent channel: create the base with one (cloudlet base --guest-agent)",
                base.entry.manifest.name
            ),
        });
    }
    if req.vnc && !base.snapshot.display {
        return Err(FlowError::BadBase {
            dir: base.entry.dir.clone(),
            reason: format!(
                "base '{}' has no display device for VNC: create the base with a VNC display (cloudlet base --vnc)",
                base.entry.manifest.name
            ),
        });
    }
    // Work files are created fresh under names of their own, next to the output (the same
    // file system, so the overlay is renamed into place): a user's `X.work` or `X.partial`
    // is never touched.
    let (work, _work_guard) = fresh_sibling(&req.out, "work", |p| std::fs::create_dir(p))?;
    events(Event::Step(format!(
        "resuming base {} ({})",
        &base.entry.manifest.id.to_hex()[..12],
        base.entry.manifest.name
    )));
    let t0 = Instant::now();
    let mut forwards: Vec<Forward> =
        req.forwards.iter().map(|f| Forward { host_port: 0, guest_port: f.guest_port }).collect();
    if let Some(p) = req.wait_http.as_ref().map(|c| c.port).filter(|p| !forwards.iter().any(|f| f.guest_port == *p)) {
        forwards.push(Forward { host_port: 0, guest_port: p });
    }
    let mut vm = hypervisor.restore(
        &base.snapshot,
        &RestoreOptions {
            ram: RamMode::PrivateCopy,
            forwards: Some(forwards),
            vnc_display: req.vnc.then_some(0),
            ..Default::default()
        },
    )?;
    let resume = t0.elapsed();
    let t1 = Instant::now();
    prepare(&mut vm, &req.customize, req.via, req.interactive, req.wait_http.as_ref(), events)?;
    if req.trim {
        trim(&mut vm, req.via, events)?;
    } else {
        run_all(&mut vm, &["sync".to_string()], req.via, events)?;
    }
    let customize = t1.elapsed();
    events(Event::Step("snapshotting the custom VM".into()));
    let t2 = Instant::now();
    let snap_dir = work.join("custom");
    let snap = vm.snapshot(&snap_dir)?;
    drop(vm);
    let snapshot = t2.elapsed();
    let info = OverlayInfo {
        base_id: base.id(),
        spec: base.entry.manifest.spec.clone(),
        forwards: req.forwards.clone(),
        name: req.name.clone(),
        creator: format!("cloudlet {}", env!("CARGO_PKG_VERSION")),
        created_unix: now_unix(),
    };
    let (partial, mut partial_guard, stats) = write_overlay(base, &snap, &info, &req.options, &req.out, events)?;
    let mut segments = None;
    if req.segmented {
        events(Event::Step("recording what the custom VM touches until its app answers".into()));
        let ports: Vec<u16> = req.forwards.iter().map(|f| f.guest_port).collect();
        let touched = crate::early::record_touch_order(
            hypervisor,
            &snap,
            &ports,
            req.wait_http.as_ref(),
            crate::early::FIRST_TOUCH_RUNS,
            &work.join("first-touch"),
        )?;
        events(Event::Step(format!(
            "writing the segmented overlay ({} chunks touched before the answer, {} after)",
            touched.working_set,
            touched.chunks.len() - touched.working_set
        )));
        let mut out = None;
        let (seg_path, mut seg_guard) = fresh_sibling(&req.out, "segmented", |p| {
            out = Some(std::fs::OpenOptions::new().write(true).create_new(true).open(p)?);
            Ok(())
        })?;
        let input = std::fs::File::open(&partial).map_err(|source| FlowError::Io { path: partial.clone(), source })?;
        let opts = delta_engine::SegmentOptions { level: req.options.level, ..Default::default() };
        let (w, s) = delta_engine::segment_overlay(
            std::io::BufReader::with_capacity(1 << 20, input),
            &touched,
            &opts,
            std::io::BufWriter::with_capacity(1 << 20, out.expect("set when fresh_sibling succeeds")),
        )
        .map_err(|e| FlowError::EarlyStart { reason: crate::error_chain(&e) })?;
        let file = w.into_inner().map_err(|e| FlowError::Io { path: seg_path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(|source| FlowError::Io { path: seg_path.clone(), source })?;
        publish(&seg_path, &req.out)?;
        seg_guard.disarm();
        segments = Some(s);
    } else {
        publish(&partial, &req.out)?;
        partial_guard.disarm();
    }
    Ok(OverlayOutcome { path: req.out.clone(), stats, resume, customize, snapshot, segments })
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Writes the overlay of the VM snapshotted in `snap` against `base` into a fresh hidden file
/// next to `out`, synced: its path, the guard that removes it, and the engine's statistics.
/// Disks that are qcow2 layers over the base's disks are read by their allocated clusters only.
pub(crate) fn write_overlay(
    base: &RegisteredBase,
    snap: &Snapshot,
    info: &OverlayInfo,
    options: &CreateOptions,
    out: &Path,
    events: &(dyn Fn(Event) + Sync),
) -> Result<(PathBuf, Guard, CreateStats), FlowError> {
    let mut custom = vec![CustomImage { name: "memory".into(), source: CustomSource::Raw(snap.memory_path()) }];
    for d in &snap.disks {
        let path = snap.dir.join(&d.path);
        let source = match d.format {
            DiskFormat::Qcow2 => CustomSource::Qcow2(path),
            DiskFormat::Raw => CustomSource::Raw(path),
        };
        custom.push(CustomImage { name: d.name.clone(), source });
    }
    events(Event::Step("computing the overlay".into()));
    let engine_base = base.engine_base()?;
    let device_state = std::fs::read(snap.device_state_path())
        .map_err(|source| FlowError::Io { path: snap.device_state_path(), source })?;
    let mut file = None;
    let (partial, guard) = fresh_sibling(out, "partial", |p| {
        file = Some(std::fs::OpenOptions::new().write(true).create_new(true).open(p)?);
        Ok(())
    })?;
    let file = file.expect("set when fresh_sibling succeeds");
    let progress = |p: delta_engine::Progress| events(Event::Progress { phase: p.phase, done: p.done, total: p.total });
    let (w, stats) = create_overlay(
        &engine_base,
        &custom,
        info,
        &device_state,
        options,
        &progress,
        std::io::BufWriter::with_capacity(1 << 20, file),
    )?;
    let file = w.into_inner().map_err(|e| FlowError::Io { path: partial.clone(), source: e.into_error() })?;
    file.sync_all().map_err(|source| FlowError::Io { path: partial.clone(), source })?;
    Ok((partial, guard, stats))
}

/// The synthesis timeline.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Until the last overlay byte was read (chained blobs are decompressed as they are read).
    pub receive: Duration,
    /// Decoding on the pool (blobs compressed alone decompressed, every blob checked, raw
    /// chunks hashed), summed over threads.
    pub decompress: Duration,
    /// Writing records.
    pub apply: Duration,
    /// Digest check of the rebuilt images.
    pub verify: Duration,
    /// Rebuild total (read + decompress + apply + verify, overlapped).
    pub rebuild: Duration,
    /// Starting QEMU and loading the device state.
    pub resume: Duration,
    /// From resume until the first answer on the probed port.
    pub first_answer: Option<Duration>,
    /// Everything.
    pub total: Duration,
}

/// Result of synthesis: the running VM and how it went.
pub struct Synthesized<V> {
    /// The running custom VM.
    pub vm: V,
    /// The base it was rebuilt from.
    pub base: RegisteredBase,
    /// The overlay's metadata.
    pub meta: overlay_format::OverlayMeta,
    /// Timeline.
    pub timeline: Timeline,
    /// Forwarded ports: (guest, host).
    pub ports: Vec<(u16, u16)>,
    /// The first answer on the probed port, if probed.
    pub answer: Option<String>,
    /// The directory of the rebuilt images.
    pub dir: PathBuf,
}

/// Rebuilds the custom VM from the overlay streamed from `overlay` and the registered base it
/// names, into `out_dir` (must not exist), then resumes it with the overlay's port forwards
/// (the recorded host ports, or free ones when those are taken). With `probe_port`, waits for
/// the guest to answer an HTTP GET on that guest port.
pub fn synthesize<H: Hypervisor, R: Read + Send>(
    hypervisor: &H,
    registry: &Registry,
    overlay: R,
    out_dir: &Path,
    probe_port: Option<u16>,
    events: &(dyn Fn(Event) + Sync),
) -> Result<Synthesized<H::Vm>, FlowError> {
    let opts = SynthesisOptions { probe_port, ..SynthesisOptions::new(out_dir) };
    synthesize_with(hypervisor, registry, overlay, &opts, events)
}

/// How [`synthesize_with`] rebuilds and resumes.
#[derive(Debug, Clone)]
pub struct SynthesisOptions {
    /// Directory of the rebuilt VM (must not exist; removed again on any error).
    pub out_dir: PathBuf,
    /// Wait for an HTTP answer on this guest port before returning.
    pub probe_port: Option<u16>,
    /// How long to wait for that answer.
    pub probe_timeout: Duration,
    /// The path the probe GETs (default `/`).
    pub probe_path: String,
    /// The status the probe waits for; `None` (the default) accepts any HTTP answer.
    pub probe_status: Option<u16>,
    /// Address the forwarded host ports listen on.
    pub forward_address: String,
    /// Run the VM on the rebuilt files themselves (the default): its memory and disk writes go
    /// to `out_dir`, so its residue can be captured ([`crate::residue`]), and `out_dir` no longer
    /// holds the state synthesis rebuilt once the VM has run. Off: the VM maps its memory
    /// copy-on-write and writes its disks to layers of its own, dropped when it stops, so
    /// `out_dir` can be resumed again ([`crate::resume_kept`]).
    pub in_place: bool,
}

impl SynthesisOptions {
    /// Defaults: no probe (60 s, `/`, any HTTP answer when set), forwards on 127.0.0.1.
    pub fn new(out_dir: &Path) -> Self {
        SynthesisOptions {
            out_dir: out_dir.to_owned(),
            probe_port: None,
            probe_timeout: Duration::from_secs(60),
            probe_path: "/".into(),
            probe_status: None,
            forward_address: "127.0.0.1".into(),
            in_place: true,
        }
    }
}

impl SynthesisOptions {
    /// Waits for the app's answer as `check` says (its guest port, path, status and timeout)
    /// before synthesis returns.
    pub fn probe(mut self, check: HttpCheck) -> Self {
        self.probe_port = Some(check.port);
        self.probe_path = check.path;
        self.probe_status = check.expect_status;
        self.probe_timeout = check.timeout;
        self
    }
}

/// [`synthesize`] with every option.
pub fn synthesize_with<H: Hypervisor, R: Read + Send>(
    hypervisor: &H,
    registry: &Registry,
    overlay: R,
    opts: &SynthesisOptions,
    events: &(dyn Fn(Event) + Sync),
) -> Result<Synthesized<H::Vm>, FlowError> {
    let out_dir = opts.out_dir.as_path();
    let probe_port = opts.probe_port;
    let t0 = Instant::now();
    if out_dir.exists() {
        return Err(FlowError::Exists { path: out_dir.to_owned() });
    }
    let reader = OverlayReader::new(overlay).map_err(|e| FlowError::Apply(e.into()))?;
    let base_id = reader.meta().base_id;
    check_forwards(&reader.meta().forwards, probe_port)?;
    let base = match registry.get(&base_id) {
        Ok(e) => RegisteredBase::from_entry(e)?,
        Err(base_registry::RegistryError::NotFound { .. }) => return Err(FlowError::UnknownBase { id: base_id }),
        Err(e) => return Err(e.into()),
    };
    check_spec(&reader.meta().spec, &base.entry.manifest.spec)?;
    create_dir_new(out_dir)?;
    let mut out_guard = Guard::new(out_dir);
    let out_dir =
        &std::fs::canonicalize(out_dir).map_err(|source| FlowError::Io { path: out_dir.to_owned(), source })?;
    let engine_base = base.engine_base()?;
    let snap = &base.snapshot;
    // Disks become qcow2 layers over the base's raw disks: no copy of the base disk at all.
    if let Some(d) = snap.disks.iter().find(|d| d.format != DiskFormat::Raw) {
        return Err(FlowError::BadBase {
            dir: base.entry.dir.clone(),
            reason: format!("disk '{}' is not raw; bases keep raw disks", d.name),
        });
    }
    let mut outputs = vec![("memory".to_string(), out_dir.join("memory"))];
    for d in &snap.disks {
        outputs.push((d.name.clone(), out_dir.join(format!("{}.qcow2", d.name))));
    }
    events(Event::Step("rebuilding the custom VM".into()));
    let progress = |p: delta_engine::Progress| events(Event::Progress { phase: p.phase, done: p.done, total: p.total });
    let report = apply_overlay_reader(
        &engine_base,
        reader,
        &ApplyOptions {
            base_id: base.id(),
            outputs: outputs.clone(),
            fsync: false,
            qcow2_disks: true,
            max_disk_growth: delta_engine::DEFAULT_MAX_DISK_GROWTH,
        },
        &progress,
    )?;
    let rebuild = t0.elapsed();
    let ds = out_dir.join("device-state");
    std::fs::write(&ds, &report.device_state).map_err(|source| FlowError::Io { path: ds.clone(), source })?;
    // A driver snapshot over the rebuilt images; kernel and initrd stay in the base.
    let mut custom = custom_snapshot(&base, out_dir, &report.meta.forwards);
    custom.disks = snap
        .disks
        .iter()
        .map(|d| vm_driver::Disk {
            name: d.name.clone(),
            path: format!("{}.qcow2", d.name).into(),
            format: DiskFormat::Qcow2,
        })
        .collect();
    custom.memory_file = "memory".into();
    custom.device_state_file = "device-state".into();
    custom.state_hash = vm_driver::state_hash(&custom.memory_path(), &custom.device_state_path())?;
    custom.save()?;
    events(Event::Step("resuming the custom VM".into()));
    let t1 = Instant::now();
    let mut restore = RestoreOptions { forward_address: Some(opts.forward_address.clone()), ..Default::default() };
    if opts.in_place {
        restore.ram = RamMode::InPlace;
        restore.disks =
            Some(custom.disks.iter().map(|d| vm_driver::Disk { path: out_dir.join(&d.path), ..d.clone() }).collect());
    }
    let vm = restore_forwarding(hypervisor, &custom, &report.meta.forwards, restore)?;
    let resume = t1.elapsed();
    let ports: Vec<(u16, u16)> = vm.forwards().iter().map(|f| (f.guest_port, f.host_port)).collect();
    let mut answer = None;
    let mut first_answer = None;
    if let Some(gp) = probe_port {
        let hp = vm.host_port(gp).ok_or_else(|| FlowError::NotForwarded {
            port: gp,
            forwarded: vm.forwards().iter().map(|f| f.guest_port).collect(),
        })?;
        let check = HttpCheck {
            port: gp,
            path: opts.probe_path.clone(),
            expect_status: opts.probe_status,
            timeout: opts.probe_timeout,
        };
        events(Event::Step(check.describe()));
        let t2 = Instant::now();
        answer = Some(http_wait(&opts.forward_address, hp, &check)?.raw);
        first_answer = Some(t2.elapsed());
    }
    out_guard.disarm();
    let timeline = Timeline {
        receive: report.receive,
        decompress: report.decode,
        apply: report.apply,
        verify: report.verify,
        rebuild,
        resume,
        first_answer,
        total: t0.elapsed(),
    };
    Ok(Synthesized { vm, base, meta: report.meta, timeline, ports, answer, dir: out_dir.to_owned() })
}

/// Checks that an overlay's VM spec is its base's, before anything is created.
///
/// Must be equal: the machine type, CPU model, vCPU count, RAM size, kernel command line and
/// the disks (names, order and sizes): the device state and the memory image depend on each.
/// May differ (compatible): the QEMU version and the accelerator the snapshot was taken under;
/// the VM resumes under this host's QEMU and accelerator, and the versioned machine type pins
/// the device layout.
/// The driver snapshot of a custom VM rebuilt in `dir` from `base`: the base's machine, layout,
/// kernel and firmware (variables the guest changed after the base are not carried), the
/// overlay's guest ports. Its RAM, device state and disks are for the caller to set.
pub(crate) fn custom_snapshot(base: &RegisteredBase, dir: &Path, forwards: &[PortForward]) -> Snapshot {
    let snap = &base.snapshot;
    let mut custom = Snapshot::new(dir, &snap.machine_type, &snap.cpu_model, snap.vcpus, snap.ram_bytes);
    custom.qemu_version = snap.qemu_version.clone();
    custom.accelerator = snap.accelerator.clone();
    custom.set_layout(snap.layout());
    custom.kernel = snap.kernel.as_ref().map(|k| vm_driver::KernelBoot {
        kernel: base.entry.dir.join(&k.kernel),
        initrd: k.initrd.as_ref().map(|i| base.entry.dir.join(i)),
        cmdline: k.cmdline.clone(),
    });
    custom.firmware = snap
        .firmware
        .as_ref()
        .map(|f| vm_driver::FirmwareFiles { code: base.entry.dir.join(&f.code), vars: base.entry.dir.join(&f.vars) });
    custom.guest_ports = forwards.iter().map(|f| f.guest_port).collect();
    custom
}

/// Restores `custom` with the overlay's forwards on their recorded host ports, or, where one of
/// those is taken here, on ports the host chooses.
pub(crate) fn restore_forwarding<H: Hypervisor>(
    hypervisor: &H,
    custom: &Snapshot,
    forwards: &[PortForward],
    opts: RestoreOptions,
) -> Result<H::Vm, FlowError> {
    let forwards: Vec<Forward> =
        forwards.iter().map(|f| Forward { host_port: f.host_port, guest_port: f.guest_port }).collect();
    let restore = |forwards: Vec<Forward>| {
        hypervisor.restore(custom, &RestoreOptions { forwards: Some(forwards), ..opts.clone() })
    };
    match restore(forwards.clone()) {
        Ok(vm) => Ok(vm),
        Err(vm_driver::DriverError::PortInUse { .. }) => {
            Ok(restore(forwards.iter().map(|f| Forward { host_port: 0, ..*f }).collect())?)
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn check_spec(overlay: &overlay_format::VmSpec, base: &overlay_format::VmSpec) -> Result<(), FlowError> {
    fn differ(field: &'static str, overlay: String, base: String) -> Result<(), FlowError> {
        if overlay == base {
            Ok(())
        } else {
            Err(FlowError::BadOverlay { field, overlay, base })
        }
    }
    let disks = |s: &overlay_format::VmSpec| {
        let v: Vec<String> = s.disks.iter().map(|d| format!("{} ({} bytes)", d.name, d.size_bytes)).collect();
        format!("[{}]", v.join(", "))
    };
    differ("ram_bytes", overlay.ram_bytes.to_string(), base.ram_bytes.to_string())?;
    differ("machine_type", overlay.machine_type.clone(), base.machine_type.clone())?;
    differ("cpu_model", overlay.cpu_model.clone(), base.cpu_model.clone())?;
    differ("vcpus", overlay.vcpus.to_string(), base.vcpus.to_string())?;
    differ("disks", disks(overlay), disks(base))?;
    differ("kernel_cmdline", format!("{:?}", overlay.kernel_cmdline), format!("{:?}", base.kernel_cmdline))
}
