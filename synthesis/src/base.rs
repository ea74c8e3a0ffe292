//! A base VM on disk: the driver's snapshot directory plus the delta engine's index and a
//! `base.json` with the base id and spec.

use std::path::{Path, PathBuf};

use delta_engine::{Base, BaseImage, BaseIndex};
use overlay_format::{BaseId, DiskSpec, ImageDigest, ImageKind, VmSpec};
use serde::{Deserialize, Serialize};
use vm_driver::Snapshot;

use crate::FlowError;

/// `base.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseManifest {
    /// Manifest format.
    pub format: u32,
    /// Base id, hex.
    pub id: String,
    /// Human name.
    pub name: String,
    /// The VM spec the id covers.
    pub spec: VmSpec,
}

/// A base VM directory.
#[derive(Debug, Clone)]
pub struct BaseDir {
    /// The directory.
    pub dir: PathBuf,
    /// The driver snapshot it holds.
    pub snapshot: Snapshot,
    /// Its manifest.
    pub manifest: BaseManifest,
}

/// The images of a base, as the delta engine sees them: `memory`, then the disks.
pub(crate) fn images_of(snap: &Snapshot) -> Vec<BaseImage> {
    let mut v = vec![BaseImage {
        name: "memory".into(),
        kind: ImageKind::Memory,
        path: snap.memory_path(),
    }];
    for d in &snap.disks {
        v.push(BaseImage {
            name: d.name.clone(),
            kind: ImageKind::Disk,
            path: snap.dir.join(&d.path),
        });
    }
    v
}

/// The overlay-format spec of a driver snapshot.
pub(crate) fn spec_of(snap: &Snapshot) -> Result<VmSpec, FlowError> {
    let mut disks = Vec::new();
    for d in &snap.disks {
        let p = snap.dir.join(&d.path);
        let size = std::fs::metadata(&p)
            .map_err(|source| FlowError::Io {
                path: p.clone(),
                source,
            })?
            .len();
        disks.push(DiskSpec {
            name: d.name.clone(),
            size_bytes: size,
        });
    }
    Ok(VmSpec {
        machine_type: snap.machine_type.clone(),
        cpu_model: snap.cpu_model.clone(),
        vcpus: snap.vcpus,
        ram_bytes: snap.ram_bytes,
        qemu_version: snap.qemu_version.clone(),
        accelerator: snap.accelerator.clone(),
        disks,
        kernel_cmdline: snap.kernel.as_ref().map(|k| k.cmdline.clone()),
    })
}

fn file_digest(path: &Path) -> Result<ImageDigest, FlowError> {
    let bytes = std::fs::read(path).map_err(|source| FlowError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(ImageDigest::of_bytes(&bytes))
}

impl BaseDir {
    /// Turns a driver snapshot directory into a base: builds the index (saved as `index`),
    /// computes the base id, writes `base.json`.
    pub fn create(
        snapshot: Snapshot,
        name: &str,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, FlowError> {
        let images = images_of(&snapshot);
        let index = BaseIndex::build(&images, progress)?;
        index.save(&snapshot.dir.join("index"))?;
        let spec = spec_of(&snapshot)?;
        let mut files: Vec<(String, ImageDigest)> = index
            .images()
            .iter()
            .map(|i| (i.name.clone(), i.digest))
            .collect();
        files.push((
            "device-state".into(),
            file_digest(&snapshot.device_state_path())?,
        ));
        if let Some(k) = &snapshot.kernel {
            files.push(("kernel".into(), file_digest(&snapshot.dir.join(&k.kernel))?));
            if let Some(i) = &k.initrd {
                files.push(("initrd".into(), file_digest(&snapshot.dir.join(i))?));
            }
        }
        let refs: Vec<(&str, ImageDigest)> = files.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let id = BaseId::compute(&spec, &refs);
        let manifest = BaseManifest {
            format: 1,
            id: id.to_hex(),
            name: name.into(),
            spec,
        };
        let p = snapshot.dir.join("base.json");
        std::fs::write(
            &p,
            serde_json::to_vec_pretty(&manifest).expect("serialisable"),
        )
        .map_err(|source| FlowError::Io { path: p, source })?;
        Ok(BaseDir {
            dir: snapshot.dir.clone(),
            snapshot,
            manifest,
        })
    }

    /// Opens a base directory made by [`BaseDir::create`].
    pub fn open(dir: &Path) -> Result<Self, FlowError> {
        let snapshot = Snapshot::load(dir)?;
        let p = dir.join("base.json");
        let bytes = std::fs::read(&p).map_err(|source| FlowError::Io {
            path: p.clone(),
            source,
        })?;
        let manifest: BaseManifest =
            serde_json::from_slice(&bytes).map_err(|e| FlowError::BadBase {
                dir: dir.to_owned(),
                reason: e.to_string(),
            })?;
        if manifest.format != 1 || BaseId::from_hex(&manifest.id).is_none() {
            return Err(FlowError::BadBase {
                dir: dir.to_owned(),
                reason: "unsupported base.json".into(),
            });
        }
        Ok(BaseDir {
            dir: dir.to_owned(),
            snapshot,
            manifest,
        })
    }

    /// The base id.
    pub fn id(&self) -> BaseId {
        BaseId::from_hex(&self.manifest.id).expect("checked on open")
    }

    /// Loads the index and maps the images for the delta engine.
    pub fn engine_base(&self) -> Result<Base, FlowError> {
        let index = BaseIndex::load(&self.dir.join("index"))?;
        Ok(Base::open(index, &images_of(&self.snapshot))?)
    }

    /// Bytes the base occupies on disk (allocated blocks) and its apparent size.
    pub fn sizes(&self) -> (u64, u64) {
        let mut alloc = 0;
        let mut apparent = 0;
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    use std::os::unix::fs::MetadataExt;
                    alloc += m.blocks() * 512;
                    apparent += m.len();
                }
            }
        }
        (alloc, apparent)
    }
}
