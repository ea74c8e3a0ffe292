//! The VM description an overlay (and a base) carries: what QEMU needs to resume the VM.

use serde::{Deserialize, Serialize};

/// Everything needed to start a QEMU process that can take the VM's device state.
///
/// Two VMs with different specs cannot share a device-state blob: QEMU checks the machine
/// type and device layout only partly, so synthesis compares the spec before resuming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Versioned machine type, e.g. `pc-q35-10.0`.
    pub machine_type: String,
    /// Named, portable CPU model, e.g. `qemu64` or `Haswell-v4`.
    pub cpu_model: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM size in bytes (the size of the memory image).
    pub ram_bytes: u64,
    /// Version of the QEMU that took the snapshot, e.g. `10.0.2`.
    pub qemu_version: String,
    /// Accelerator the snapshot was taken under: `tcg` or `kvm`.
    pub accelerator: String,
    /// The guest's disks, in the order they are attached.
    pub disks: Vec<DiskSpec>,
    /// Kernel command line when the VM was booted with `-kernel` (the kernel and initrd are
    /// part of the base VM), `None` for firmware boot.
    pub kernel_cmdline: Option<String>,
}

/// One disk of a [`VmSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Name of the disk (and of its image in an overlay), e.g. `disk0`.
    pub name: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
}

/// A port forward from the host into the guest, recorded in an overlay as the app's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Host port; 0 lets the host choose a free port.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

/// Transport protocol of a [`PortForward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}
