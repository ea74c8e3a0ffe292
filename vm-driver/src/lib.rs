//! A small consumer-side hypervisor interface — what VM synthesis needs: launch, pause,
//! resume, snapshot, restore, shut down, console, forwarded ports — and its QEMU
//! implementation over QMP.
//!
//! The traits ([`Hypervisor`], [`Vm`], [`SerialConsole`]) are what the synthesis flows call;
//! [`Qemu`] is one implementation, and any crate can write another: everything a flow needs of
//! a VM, the person-at-the-console access included, is a trait method.
//!
//! Snapshots follow one recipe: guest RAM lives in a `memory-backend-file` with `share=on`, so
//! after `stop` the RAM file *is* the guest's memory, byte for byte; only the device state is
//! migrated (capability `x-ignore-shared`) into a `file:` blob, which takes milliseconds. A
//! restore starts a new QEMU with `-incoming defer` over the RAM file, either mapped
//! copy-on-write (`share=off`, the file is never written) or as a private writable copy.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use vm_driver::*;
//!
//! let qemu = Qemu::new()?; // finds qemu-system-x86_64, probes KVM, falls back to TCG
//! let spec = LaunchSpec::new(256 << 20)
//!     .kernel("vmlinuz", "initrd.img", "console=ttyS0 quiet")
//!     .disk("disk0", "disk.raw", DiskFormat::Raw)
//!     .forward(0, 80);
//! let mut vm = qemu.launch(&spec)?;
//! vm.console()?.wait_for_text("ready", Duration::from_secs(60))?;
//! let (out, status) = vm.console()?.run("uname -r", Duration::from_secs(10))?;
//! let snap = vm.snapshot("snapshot-dir".as_ref())?; // VM is left paused
//! drop(vm); // kills QEMU, removes its runtime dir
//! let restored = qemu.restore(&snap, &RestoreOptions::default())?;
//! println!("{out} {status} {:?}", restored.host_port(80));
//! # Ok::<(), DriverError>(())
//! ```
#![deny(missing_docs)]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod accel;
mod console;
mod qemu;
pub mod qga;
pub mod qmp;

use std::path::PathBuf;
use std::time::Duration;

pub use accel::{probe_cache_path, Accel, PROBE_TIMEOUT};
pub use console::{Console, CONSOLE_KEEP};
pub use qemu::{kill_all, qcow2_layer, Qemu, QemuVm};
pub use qga::{ExecOutput, GuestAgent};
use serde::{Deserialize, Serialize};

/// The hypervisor operations the synthesis flows use.
///
/// This is the consumer-side interface: the flows are written against it, and [`Qemu`] is one
/// implementation. Another crate can implement it (the synthesis tests drive the flows over an
/// in-memory one).
pub trait Hypervisor {
    /// A running VM.
    type Vm: Vm;
    /// Boots a new VM.
    fn launch(&self, spec: &LaunchSpec) -> Result<Self::Vm, DriverError>;
    /// Starts a VM from a snapshot, running.
    fn restore(&self, snapshot: &Snapshot, opts: &RestoreOptions) -> Result<Self::Vm, DriverError>;
    /// A note for the user on how `spec` will run (e.g. "accelerator tcg: no /dev/kvm"), if
    /// there is anything to say.
    fn launch_note(&self, _spec: &LaunchSpec) -> Option<String> {
        None
    }
}

/// A VM the flows drive.
///
/// Besides the life cycle, a VM offers its serial console ([`Vm::console`]) and, for a person
/// at the guest, interactive access: the console's socket and a display. Those have defaults
/// for a VM that offers no such access. VMs move between threads (a display watcher, a
/// service's table of running VMs), hence `Send`.
pub trait Vm: Send {
    /// Its serial console.
    type Console: SerialConsole;
    /// Pauses the vCPUs.
    fn pause(&mut self) -> Result<(), DriverError>;
    /// Resumes the vCPUs.
    fn resume(&mut self) -> Result<(), DriverError>;
    /// Pauses the VM and writes a snapshot (RAM image, device state, disks, manifest) into
    /// `dir`, which must not exist or be empty. The VM stays paused.
    fn snapshot(&mut self, dir: &std::path::Path) -> Result<Snapshot, DriverError>;
    /// Pauses the VM and writes its device state into `dir` (created, must be empty), like
    /// [`Vm::snapshot`], but the snapshot's RAM image, disks, kernel and firmware are the VM's
    /// own files, not copies: it describes the VM only while the VM stays paused, to be read
    /// (say, by an overlay's creation) before the VM runs again or stops. It is not saved and
    /// has no state hash: it is never restored. By default, a [`Vm::snapshot`].
    fn snapshot_in_place(&mut self, dir: &std::path::Path) -> Result<Snapshot, DriverError> {
        self.snapshot(dir)
    }
    /// All port forwards, with the host ports chosen.
    fn forwards(&self) -> &[Forward];
    /// The host port forwarded to `guest_port`, if any.
    fn host_port(&self, guest_port: u16) -> Option<u16> {
        self.forwards().iter().find(|f| f.guest_port == guest_port).map(|f| f.host_port)
    }
    /// The serial console (reconnected after [`Vm::release_console`]).
    fn console(&mut self) -> Result<&mut Self::Console, DriverError>;
    /// Closes this handle's console connection and stops reading it (the next [`Vm::console`]
    /// reconnects), so that someone else can use [`Vm::serial_socket`].
    fn release_console(&mut self) {}
    /// The guest's serial console as a unix socket a person can connect to (one client at a
    /// time, after [`Vm::release_console`]), if the VM offers one.
    fn serial_socket(&self) -> Option<&std::path::Path> {
        None
    }
    /// Where the VM's VNC display listens, or `None` without a display.
    fn vnc_address(&mut self) -> Result<Option<std::net::SocketAddr>, DriverError> {
        Ok(None)
    }
    /// How many viewers are connected to the display (0 without a display).
    fn vnc_clients(&mut self) -> Result<usize, DriverError> {
        Ok(0)
    }
    /// The id of the host process that runs the VM, if there is one (recorded so that a
    /// restarted service can stop what a killed one left running).
    fn pid(&self) -> Option<u32> {
        None
    }
    /// Asks the guest agent inside the VM whether it is there, waiting up to `timeout` for
    /// the answer. [`DriverError::Unsupported`] for a VM without a guest agent channel (the
    /// default), [`DriverError::Timeout`] when no agent answers in the guest.
    fn guest_ping(&mut self, _timeout: Duration) -> Result<(), DriverError> {
        Err(DriverError::Unsupported { what: "a guest agent channel in this VM".into() })
    }
    /// Runs `/bin/sh -c command` in the guest through its guest agent, waiting up to
    /// `timeout` for it to exit; returns its output (stdout then stderr) and exit status, as
    /// [`SerialConsole::run`] does. [`DriverError::Unsupported`] for a VM without a guest
    /// agent channel (the default).
    fn guest_exec(&mut self, _command: &str, _timeout: Duration) -> Result<(String, i32), DriverError> {
        Err(DriverError::Unsupported { what: "a guest agent channel in this VM".into() })
    }
    /// Stops the VM and releases everything it held.
    fn shutdown(self) -> Result<(), DriverError>;
}

/// A guest's serial console: a shell the flows run commands in.
pub trait SerialConsole {
    /// Runs `command` in the guest shell; returns its output (stdout and stderr) and exit
    /// status.
    fn run(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), DriverError>;
    /// Waits until the guest has printed `text` on the console.
    fn wait_for_text(&self, text: &str, timeout: Duration) -> Result<(), DriverError>;
}

/// Hashes a snapshot's RAM image then its device state (blake3, hex): the
/// [`Snapshot::state_hash`] a restore checks the files against.
pub fn state_hash(memory: &std::path::Path, device_state: &std::path::Path) -> Result<String, DriverError> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(memory)
        .map_err(|source| DriverError::Io { what: format!("hash {}", memory.display()), source })?;
    h.update_mmap(device_state)
        .map_err(|source| DriverError::Io { what: format!("hash {}", device_state.display()), source })?;
    Ok(h.finalize().to_hex().to_string())
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    /// Raw bytes.
    Raw,
    /// qcow2 (e.g. a layer over a raw base disk).
    Qcow2,
}

/// A disk to attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Name (`disk0`, ...).
    pub name: String,
    /// Image file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// A TCP port forward from the host's loopback into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Host port; 0 picks a free one.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

/// The firmware a VM boots with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Firmware {
    /// QEMU's own BIOS (SeaBIOS).
    #[default]
    Bios,
    /// UEFI from a pair of flash images, e.g. Debian's `ovmf`:
    /// `/usr/share/OVMF/OVMF_CODE_4M.fd` and `/usr/share/OVMF/OVMF_VARS_4M.fd`. The code is
    /// mapped read-only; the VM writes its variables to a private copy of `vars` (the file given
    /// is never modified), which its snapshots keep.
    Uefi {
        /// The firmware code (read-only flash).
        code: PathBuf,
        /// The variable store (NVRAM) the VM starts from.
        vars: PathBuf,
    },
}

/// A snapshot's UEFI firmware files (names relative to the snapshot directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareFiles {
    /// The firmware code.
    pub code: PathBuf,
    /// The variable store as the VM left it.
    pub vars: PathBuf,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Versioned machine type.
    pub machine_type: String,
    /// Named CPU model.
    pub cpu_model: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes (a multiple of 1 MiB).
    pub ram_bytes: u64,
    /// Kernel boot, or firmware boot from the first disk when `None`.
    pub kernel: Option<KernelBoot>,
    /// Disks, attached as virtio-blk in order.
    pub disks: Vec<Disk>,
    /// Port forwards (user networking).
    pub forwards: Vec<Forward>,
    /// Address the forwards listen on.
    pub forward_address: String,
    /// Serve a VNC display on this loopback display number (port 5900 + n, or the next free
    /// one). This also gives the VM a display device, which its snapshots keep.
    pub vnc_display: Option<u16>,
    /// Directory for the RAM file (default: /dev/shm when present).
    pub ram_dir: Option<PathBuf>,
    /// Attach virtio-balloon with free page reporting, so pages the guest frees become holes
    /// in the RAM file (default on).
    pub free_page_reporting: bool,
    /// Attach a virtio-serial channel for the QEMU guest agent (`org.qemu.guest_agent.0`), for
    /// [`Vm::guest_ping`] and [`Vm::guest_exec`] (default off). Part of the device layout.
    pub guest_agent: bool,
    /// The firmware (default: BIOS).
    pub firmware: Firmware,
}

impl LaunchSpec {
    /// A spec with the portable defaults: `pc-q35-10.0`, `qemu64`, 1 vCPU.
    pub fn new(ram_bytes: u64) -> Self {
        LaunchSpec {
            machine_type: "pc-q35-10.0".into(),
            cpu_model: "qemu64".into(),
            vcpus: 1,
            ram_bytes,
            kernel: None,
            disks: Vec::new(),
            forwards: Vec::new(),
            forward_address: "127.0.0.1".into(),
            vnc_display: None,
            ram_dir: None,
            free_page_reporting: true,
            guest_agent: false,
            firmware: Firmware::Bios,
        }
    }

    /// Sets the number of vCPUs.
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Sets the firmware.
    pub fn firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }

    /// Attaches (or not) the guest agent channel.
    pub fn guest_agent(mut self, on: bool) -> Self {
        self.guest_agent = on;
        self
    }

    /// Boots `kernel` with `initrd` and `cmdline`.
    pub fn kernel(mut self, kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>, cmdline: &str) -> Self {
        self.kernel = Some(KernelBoot { kernel: kernel.into(), initrd: Some(initrd.into()), cmdline: cmdline.into() });
        self
    }

    /// Adds a disk.
    pub fn disk(mut self, name: &str, path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        self.disks.push(Disk { name: name.into(), path: path.into(), format });
        self
    }

    /// Adds a port forward.
    pub fn forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.forwards.push(Forward { host_port, guest_port });
        self
    }
}

/// How a restore maps the snapshot's RAM image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RamMode {
    /// Map the RAM image privately, copy-on-write (`share=off`): fast, the file is untouched,
    /// but the restored VM cannot be snapshotted again.
    #[default]
    CopyOnWrite,
    /// Copy the RAM image (sparse) and share it (`share=on`): the VM can be snapshotted again.
    PrivateCopy,
    /// Map the snapshot's own RAM image, shared and writable (`share=on`), without a copy: the
    /// VM can be snapshotted again, but it writes its memory into the snapshot, whose state hash
    /// no longer matches once the VM has run: for a snapshot restored once, such as a VM that
    /// synthesis has just rebuilt. The file is never deleted.
    InPlace,
    /// Map this file, shared and writable (`share=on`), instead of the snapshot's RAM image: a
    /// RAM image that someone else serves and owns, such as one served on demand before it has
    /// all arrived (the `lazy-image` crate). It must have the snapshot's RAM size. The
    /// snapshot's own RAM image is neither read nor needed, and the [`state_hash`] is not
    /// checked: the caller vouches that the file holds, or will hold by the time the guest
    /// reads it, the RAM that belongs to the snapshot's device state. The file is never
    /// deleted; the VM can be snapshotted again (which reads the whole file).
    Served(PathBuf),
}

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// RAM mapping.
    pub ram: RamMode,
    /// Disks to attach instead of the snapshot's (same names and order), e.g. a qcow2 layer
    /// over the snapshot's disk.
    pub disks: Option<Vec<Disk>>,
    /// Port forwards; `None` keeps the snapshot's guest ports with fresh host ports.
    pub forwards: Option<Vec<Forward>>,
    /// VNC display, as in [`LaunchSpec::vnc_display`]; only for a snapshot with a display
    /// device ([`Snapshot::display`]).
    pub vnc_display: Option<u16>,
    /// Address the forwards listen on; `None` is 127.0.0.1.
    pub forward_address: Option<String>,
    /// Start QEMU waiting for a live migration from another QEMU instead of loading the
    /// snapshot's device state: the snapshot gives the machine and its disks, the caller sets
    /// the migration's capabilities and starts `migrate-incoming` through the VM's QMP
    /// (`QemuVm::qmp`), and the VM runs once the migration completes. The snapshot's RAM image
    /// is not checked against its state hash (the RAM comes from the source).
    pub await_migration: bool,
}

/// The version of the `snapshot.json` manifest this crate writes and reads.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// A snapshot on disk: `snapshot.json` in `dir` plus the files it names.
///
/// Made by [`Vm::snapshot`], read by [`Snapshot::load`], or described with [`Snapshot::new`]
/// (for files put together by other means, e.g. rebuilt from a base and an overlay) and
/// written with [`Snapshot::save`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The directory (not serialised).
    #[serde(skip)]
    pub dir: PathBuf,
    /// Manifest format version.
    pub format: u32,
    /// Machine type.
    pub machine_type: String,
    /// CPU model.
    pub cpu_model: String,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM size.
    pub ram_bytes: u64,
    /// QEMU version that took it.
    pub qemu_version: String,
    /// Accelerator it ran under (`tcg` or `kvm`).
    pub accelerator: String,
    /// Kernel boot (paths relative to `dir`).
    pub kernel: Option<KernelBoot>,
    /// Disks (paths relative to `dir`).
    pub disks: Vec<Disk>,
    /// Guest ports that were forwarded.
    pub guest_ports: Vec<u16>,
    /// RAM image file name.
    pub memory_file: String,
    /// Device-state file name.
    pub device_state_file: String,
    /// blake3 over the RAM image then the device state, hex.
    pub state_hash: String,
    /// Whether the balloon device had free page reporting (part of the device layout).
    #[serde(default = "yes")]
    pub free_page_reporting: bool,
    /// Whether the VM had a display device (it was launched with a VNC display); part of the
    /// device layout, so only such a snapshot restores with a VNC display.
    #[serde(default)]
    pub display: bool,
    /// Whether the VM had the guest agent channel (part of the device layout). Left out of
    /// the manifest when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// The UEFI firmware files, for a VM that booted UEFI (`None`: BIOS). Left out of the
    /// manifest when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareFiles>,
}

/// The parts of a VM's device layout that the machine type does not pin and its device state
/// depends on: a snapshot restores only into a VM with the same layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLayout {
    /// The balloon device has free page reporting.
    pub free_page_reporting: bool,
    /// The VM has a display device (it was launched with a VNC display).
    pub display: bool,
    /// The VM has the guest agent channel ([`LaunchSpec::guest_agent`]).
    pub guest_agent: bool,
}

impl Default for DeviceLayout {
    /// What [`LaunchSpec::new`] launches: free page reporting, no display, no guest agent.
    fn default() -> Self {
        DeviceLayout { free_page_reporting: true, display: false, guest_agent: false }
    }
}

fn yes() -> bool {
    true
}

impl Snapshot {
    /// A manifest of the current format for a snapshot in `dir` of a VM with this machine
    /// type, CPU model, vCPU count and RAM size. The rest starts out empty (no kernel, disks
    /// or forwarded ports, no QEMU version or accelerator, an empty state hash) or at the
    /// defaults (`memory` and `device-state` files, free page reporting, no display, no guest
    /// agent, BIOS): set the
    /// fields that apply, and the hash with [`state_hash`] once the files are written.
    pub fn new(dir: impl Into<PathBuf>, machine_type: &str, cpu_model: &str, vcpus: u32, ram_bytes: u64) -> Self {
        Snapshot {
            dir: dir.into(),
            format: SNAPSHOT_FORMAT,
            machine_type: machine_type.into(),
            cpu_model: cpu_model.into(),
            vcpus,
            ram_bytes,
            qemu_version: String::new(),
            accelerator: String::new(),
            kernel: None,
            disks: Vec::new(),
            guest_ports: Vec::new(),
            memory_file: "memory".into(),
            device_state_file: "device-state".into(),
            state_hash: String::new(),
            free_page_reporting: true,
            display: false,
            guest_agent: false,
            firmware: None,
        }
    }

    /// The device layout recorded in the snapshot.
    pub fn layout(&self) -> DeviceLayout {
        DeviceLayout {
            free_page_reporting: self.free_page_reporting,
            display: self.display,
            guest_agent: self.guest_agent,
        }
    }

    /// Sets the device layout.
    pub fn set_layout(&mut self, layout: DeviceLayout) {
        self.free_page_reporting = layout.free_page_reporting;
        self.display = layout.display;
        self.guest_agent = layout.guest_agent;
    }

    /// Writes the manifest, `dir/snapshot.json`.
    pub fn save(&self) -> Result<(), DriverError> {
        let p = self.dir.join("snapshot.json");
        let json = serde_json::to_vec_pretty(self).expect("serialising a snapshot cannot fail");
        std::fs::write(&p, json).map_err(|source| DriverError::Io { what: format!("write {}", p.display()), source })
    }

    /// Reads `dir/snapshot.json`.
    pub fn load(dir: &std::path::Path) -> Result<Self, DriverError> {
        let p = dir.join("snapshot.json");
        let bytes =
            std::fs::read(&p).map_err(|source| DriverError::Io { what: format!("read {}", p.display()), source })?;
        if bytes.len() > 1 << 20 {
            return Err(DriverError::BadSnapshot { dir: dir.to_owned(), reason: "snapshot.json over 1 MiB".into() });
        }
        let mut s: Snapshot = serde_json::from_slice(&bytes)
            .map_err(|e| DriverError::BadSnapshot { dir: dir.to_owned(), reason: e.to_string() })?;
        if s.format != SNAPSHOT_FORMAT {
            return Err(DriverError::BadSnapshot {
                dir: dir.to_owned(),
                reason: format!("manifest format {}", s.format),
            });
        }
        s.dir = dir.to_owned();
        Ok(s)
    }

    /// The RAM image.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(&self.memory_file)
    }

    /// The device state.
    pub fn device_state_path(&self) -> PathBuf {
        self.dir.join(&self.device_state_file)
    }
}

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The QEMU binary is missing or unusable.
    #[error("QEMU binary {path} cannot be run")]
    MissingQemu {
        /// The binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file the VM needs is missing or unusable.
    #[error("{what} {path}: {reason}")]
    BadImage {
        /// Which input.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The host cannot honour what a snapshot or spec asks for.
    #[error("this host cannot run it: {what} is {wanted}, but {reason}")]
    Incompatible {
        /// `machine type`, `CPU model`, `QEMU version`, `accelerator`.
        what: &'static str,
        /// The value asked for.
        wanted: String,
        /// Why the host cannot.
        reason: String,
    },
    /// A snapshot's files do not match its recorded hash, or its manifest is bad.
    #[error("snapshot {dir}: {reason}")]
    BadSnapshot {
        /// Snapshot directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A forwarded host port is taken.
    #[error("host port {port} is already in use")]
    PortInUse {
        /// The port.
        port: u16,
    },
    /// QEMU exited.
    #[error("QEMU exited ({status}); its last words:\n{stderr_tail}")]
    QemuDied {
        /// Exit status.
        status: String,
        /// Last lines of its stderr.
        stderr_tail: String,
    },
    /// A QMP exchange failed.
    #[error("QMP")]
    Qmp(#[from] qmp::QmpError),
    /// A wait ran out.
    #[error("timed out after {timeout:?} waiting for {waiting_for}")]
    Timeout {
        /// What was awaited.
        waiting_for: String,
        /// How long.
        timeout: Duration,
    },
    /// Migration (snapshot or restore) failed.
    #[error("migration failed: {reason}")]
    Migration {
        /// QEMU's status or error.
        reason: String,
    },
    /// The VM does not offer what was asked of it (e.g. a guest agent channel).
    #[error("not supported: {what}")]
    Unsupported {
        /// What is missing.
        what: String,
    },
    /// The guest agent answered with an error, or with something that is not its protocol.
    #[error("guest agent: {reason}")]
    GuestAgent {
        /// What it said, or what is wrong with what it sent.
        reason: String,
    },
    /// Host I/O.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_snapshot_saves_and_loads_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory"), vec![7u8; 1 << 20]).unwrap();
        std::fs::write(dir.path().join("device-state"), b"devices").unwrap();
        let mut s = Snapshot::new(dir.path(), "pc-q35-10.0", "qemu64", 2, 1 << 20);
        s.guest_ports = vec![8080];
        s.set_layout(DeviceLayout { free_page_reporting: false, display: true, guest_agent: true });
        s.firmware = Some(FirmwareFiles { code: "firmware-code".into(), vars: "firmware-vars".into() });
        s.state_hash = state_hash(&s.memory_path(), &s.device_state_path()).unwrap();
        s.save().unwrap();
        let loaded = Snapshot::load(dir.path()).unwrap();
        assert_eq!(loaded, s);
        assert_eq!(loaded.format, SNAPSHOT_FORMAT);
        assert_eq!(loaded.layout(), DeviceLayout { free_page_reporting: false, display: true, guest_agent: true });
        let mut both = vec![7u8; 1 << 20];
        both.extend_from_slice(b"devices");
        assert_eq!(loaded.state_hash, blake3::hash(&both).to_hex().to_string());
    }

    /// A manifest written before the guest agent and firmware fields reads with their
    /// defaults, and a manifest without them is written as before (no new keys).
    #[test]
    fn manifests_without_the_newer_fields_read_and_write_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"format": 1, "machine_type": "pc-q35-10.0", "cpu_model": "qemu64", "vcpus": 1,
            "ram_bytes": 1048576, "qemu_version": "10.0.2", "accelerator": "tcg", "kernel": null,
            "disks": [], "guest_ports": [], "memory_file": "memory", "device_state_file": "device-state",
            "state_hash": "", "free_page_reporting": true, "display": false}"#;
        std::fs::write(dir.path().join("snapshot.json"), old).unwrap();
        let s = Snapshot::load(dir.path()).unwrap();
        assert_eq!(s.layout(), DeviceLayout::default());
        assert_eq!(s.firmware, None);
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("guest_agent") && !json.contains("firmware"), "{json}");
    }

    #[test]
    fn a_manifest_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Snapshot::new(dir.path(), "pc-q35-10.0", "qemu64", 1, 1 << 20);
        s.format = SNAPSHOT_FORMAT + 1;
        s.save().unwrap();
        let e = Snapshot::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("manifest format 2"), "{e}");
    }
}
