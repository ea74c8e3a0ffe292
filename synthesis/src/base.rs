//! Bases as the flows use them: a registry entry, seen by the driver as a snapshot and by the
//! delta engine as indexed images.

use std::collections::BTreeMap;

use base_registry::{BaseEntry, Mode, NewBase, Registry, SnapshotRecord};
use delta_engine::{Base, BaseImage, BaseIndex};
use overlay_format::{BaseId, DiskSpec, ImageKind, VmSpec};
use vm_driver::{DeviceLayout, Disk, DiskFormat, FirmwareFiles, KernelBoot, Snapshot};

use crate::FlowError;

/// A registered base VM.
#[derive(Debug, Clone)]
pub struct RegisteredBase {
    /// The registry entry.
    pub entry: BaseEntry,
    /// The entry as a driver snapshot (paths inside the entry's directory).
    pub snapshot: Snapshot,
}

/// The delta engine's view of a base: `memory`, then the disks.
fn images(entry: &BaseEntry) -> Vec<BaseImage> {
    let mut v = vec![BaseImage { name: "memory".into(), kind: ImageKind::Memory, path: entry.memory_path() }];
    for d in &entry.manifest.spec.disks {
        v.push(BaseImage { name: d.name.clone(), kind: ImageKind::Disk, path: entry.dir.join(&d.name) });
    }
    v
}

impl RegisteredBase {
    /// Wraps a registry entry.
    pub fn from_entry(entry: BaseEntry) -> Result<Self, FlowError> {
        let spec = &entry.manifest.spec;
        let facts = SnapshotFacts::read(&entry)?;
        let mut snapshot = Snapshot::new(&entry.dir, &spec.machine_type, &spec.cpu_model, spec.vcpus, spec.ram_bytes);
        snapshot.qemu_version = spec.qemu_version.clone();
        snapshot.accelerator = spec.accelerator.clone();
        snapshot.kernel = entry.path("kernel").map(|_| KernelBoot {
            kernel: "kernel".into(),
            initrd: entry.path("initrd").map(|_| "initrd".into()),
            cmdline: spec.kernel_cmdline.clone().unwrap_or_default(),
        });
        snapshot.disks = spec
            .disks
            .iter()
            .map(|d| Disk { name: d.name.clone(), path: d.name.clone().into(), format: DiskFormat::Raw })
            .collect();
        snapshot.firmware = entry
            .path("firmware-code")
            .map(|_| FirmwareFiles { code: "firmware-code".into(), vars: "firmware-vars".into() });
        snapshot.memory_file = "memory".into();
        snapshot.device_state_file = "device-state".into();
        snapshot.state_hash = facts.state_hash;
        snapshot.set_layout(facts.layout);
        Ok(RegisteredBase { entry, snapshot })
    }

    /// Finds a base by name, id or unique id prefix.
    pub fn find(registry: &Registry, query: &str) -> Result<Self, FlowError> {
        Self::from_entry(registry.find(query)?)
    }

    /// The base id.
    pub fn id(&self) -> BaseId {
        self.entry.id()
    }

    /// Loads the index (building it if the base has none) and maps the images.
    pub fn engine_base(&self) -> Result<Base, FlowError> {
        let imgs = images(&self.entry);
        let index = match self.entry.path("index") {
            Some(p) => BaseIndex::load(&p)?,
            None => BaseIndex::build(&imgs, &|_| {})?,
        };
        Ok(Base::open(index, &imgs)?)
    }

    /// Allocated and apparent bytes of the base's files.
    pub fn sizes(&self) -> (u64, u64) {
        crate::report::dir_sizes(&self.entry.dir)
    }
}

/// Writes base `id` of `registry` to `out` as one portable file ([`Registry::export`]). `out`
/// must not exist. The bytes go to a fresh hidden file of this process next to it
/// (`.NAME.partial-PID`; a `NAME.partial` of someone else's is never touched), removed on
/// failure and by [`interrupt_cleanup`](crate::interrupt_cleanup), and linked into place only
/// if nothing appeared at `out` meanwhile.
pub fn export_base_file(registry: &Registry, id: &BaseId, out: &std::path::Path) -> Result<(), FlowError> {
    if out.symlink_metadata().is_ok() {
        return Err(FlowError::Exists { path: out.to_owned() });
    }
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|source| FlowError::Io { path: partial.clone(), source })?;
    let mut guard = crate::flows::Guard::new(&partial);
    registry.export(id, std::io::BufWriter::new(file))?;
    crate::flows::publish(&partial, out)?;
    guard.disarm();
    Ok(())
}

/// Indexes a driver snapshot and registers it (files are moved in).
pub(crate) fn register_snapshot(
    registry: &Registry,
    snap: &Snapshot,
    name: &str,
    source_image: Option<String>,
) -> Result<RegisteredBase, FlowError> {
    let mut disks = Vec::new();
    let mut files = vec![("memory".to_string(), snap.memory_path()), ("device-state".into(), snap.device_state_path())];
    for d in &snap.disks {
        let p = snap.dir.join(&d.path);
        if d.format != DiskFormat::Raw {
            return Err(FlowError::BadBase { dir: snap.dir.clone(), reason: format!("disk {} is not raw", d.name) });
        }
        let size = std::fs::metadata(&p).map_err(|source| FlowError::Io { path: p.clone(), source })?.len();
        disks.push(DiskSpec { name: d.name.clone(), size_bytes: size });
        files.push((d.name.clone(), p));
    }
    if let Some(k) = &snap.kernel {
        files.push(("kernel".into(), snap.dir.join(&k.kernel)));
        if let Some(i) = &k.initrd {
            files.push(("initrd".into(), snap.dir.join(i)));
        }
    }
    // UEFI: the firmware as the base VM left it (not indexed: the delta engine covers memory
    // and disks only).
    if let Some(f) = &snap.firmware {
        files.push(("firmware-code".into(), snap.dir.join(&f.code)));
        files.push(("firmware-vars".into(), snap.dir.join(&f.vars)));
    }
    let spec = VmSpec {
        machine_type: snap.machine_type.clone(),
        cpu_model: snap.cpu_model.clone(),
        vcpus: snap.vcpus,
        ram_bytes: snap.ram_bytes,
        qemu_version: snap.qemu_version.clone(),
        accelerator: snap.accelerator.clone(),
        disks,
        kernel_cmdline: snap.kernel.as_ref().map(|k| k.cmdline.clone()),
    };
    // The delta engine's index over memory and disks.
    let imgs: Vec<BaseImage> = files
        .iter()
        .filter(|(n, _)| n == "memory" || spec.disks.iter().any(|d| &d.name == n))
        .map(|(n, p)| BaseImage {
            name: n.clone(),
            kind: if n == "memory" { ImageKind::Memory } else { ImageKind::Disk },
            path: p.clone(),
        })
        .collect();
    let index = BaseIndex::build(&imgs, &|_| {})?;
    let index_path = snap.dir.join("index");
    index.save(&index_path)?;
    files.push(("index".into(), index_path));
    let record = SnapshotFacts { state_hash: snap.state_hash.clone(), layout: snap.layout() }.record();
    let entry = registry.register(NewBase {
        name: name.into(),
        source_image,
        spec,
        files,
        mode: Mode::Move,
        labels: BTreeMap::new(),
        snapshot: Some(record),
    })?;
    RegisteredBase::from_entry(entry)
}

/// What a base's registry entry records of its driver snapshot beyond the VM spec: the state
/// hash and the device layout. The one place that writes and reads them: typed in the
/// manifest ([`base_registry::SnapshotRecord`]), or, for bases registered before the manifest
/// had that record, in the labels `state_hash`, `free_page_reporting` and `display`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotFacts {
    state_hash: String,
    layout: DeviceLayout,
}

impl SnapshotFacts {
    const STATE_HASH: &'static str = "state_hash";
    const FREE_PAGE_REPORTING: &'static str = "free_page_reporting";
    const DISPLAY: &'static str = "display";

    fn record(&self) -> SnapshotRecord {
        SnapshotRecord {
            state_hash: self.state_hash.clone(),
            free_page_reporting: self.layout.free_page_reporting,
            display: self.layout.display,
            guest_agent: self.layout.guest_agent,
        }
    }

    /// Reads the record of `entry`, else its labels. A missing layout label is what bases
    /// registered before the layout was recorded have: free page reporting, no display.
    fn read(entry: &BaseEntry) -> Result<Self, FlowError> {
        if let Some(r) = &entry.manifest.snapshot {
            let layout = DeviceLayout {
                free_page_reporting: r.free_page_reporting,
                display: r.display,
                guest_agent: r.guest_agent,
            };
            return Ok(SnapshotFacts { state_hash: r.state_hash.clone(), layout });
        }
        let labels = &entry.manifest.labels;
        let bad = |reason: String| FlowError::BadBase { dir: entry.dir.clone(), reason };
        let Some(state_hash) = labels.get(Self::STATE_HASH).cloned() else {
            return Err(bad("no snapshot record or state_hash label: not registered by the base flow".into()));
        };
        let flag = |key: &str, default: bool| match labels.get(key).map(String::as_str) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(bad(format!("label {key} is {v:?}, not true or false"))),
        };
        let defaults = DeviceLayout::default();
        // Labels predate the guest agent: such bases have none.
        let layout = DeviceLayout {
            free_page_reporting: flag(Self::FREE_PAGE_REPORTING, defaults.free_page_reporting)?,
            display: flag(Self::DISPLAY, defaults.display)?,
            guest_agent: false,
        };
        Ok(SnapshotFacts { state_hash, layout })
    }
}
