//! A store of base VMs shared by the `cloudlet` tool, the flows and the synthesis server.
//!
//! A base is a set of named files — `memory`, one raw image per disk of its spec,
//! `device-state`, optionally `kernel`, `initrd` and the delta engine's `index` — plus its
//! [`VmSpec`] and metadata. Its id is [`BaseId::compute`] over the spec and the
//! [`ImageDigest`] of every file but the index, computed once at registration.
//!
//! Registration is atomic (staging directory, fsync, one `rename`), writers serialise on an
//! exclusive [`std::fs::File::lock`], readers never see partial entries, and registered files
//! are read-only. See the crate README for the layout and the crash-safety argument.
//!
//! # Example
//!
//! ```
//! use base_registry::*;
//! use overlay_format::{DiskSpec, VmSpec};
//!
//! let tmp = tempfile::tempdir()?;
//! let src = tmp.path().join("src");
//! std::fs::create_dir(&src)?;
//! std::fs::write(src.join("memory"), vec![0u8; 1 << 20])?;
//! std::fs::write(src.join("disk0"), vec![7u8; 64 << 10])?;
//! std::fs::write(src.join("device-state"), b"QEVM")?;
//! let spec = VmSpec {
//!     machine_type: "pc-q35-10.0".into(), cpu_model: "qemu64".into(), vcpus: 1, ram_bytes: 1 << 20,
//!     qemu_version: "10.0.2".into(), accelerator: "tcg".into(),
//!     disks: vec![DiskSpec { name: "disk0".into(), size_bytes: 64 << 10 }], kernel_cmdline: None,
//! };
//! let reg = Registry::open(&tmp.path().join("registry"))?;
//! let base = reg.register(NewBase {
//!     name: "tiny".into(),
//!     source_image: None,
//!     spec,
//!     files: ["memory", "disk0", "device-state"].iter().map(|n| (n.to_string(), src.join(n))).collect(),
//!     mode: Mode::Copy,
//!     labels: Default::default(),
//!     snapshot: None,
//! })?;
//! assert_eq!(reg.find("tiny")?.id(), base.id());
//! assert_eq!(reg.find(&base.id().to_hex()[..8])?.id(), base.id());
//! assert!(reg.verify(&base.id())?.is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod export;
mod files;
mod validate;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use overlay_format::{BaseId, ImageDigest, VmSpec};
use serde::{Deserialize, Serialize};

use crate::files::{digest_file, fsync_dir, place_file};
pub(crate) use crate::validate::valid_name;

/// Registry layout version written to `registry.json`.
pub const REGISTRY_FORMAT: u32 = 1;
/// Largest manifest accepted.
pub const MAX_MANIFEST_LEN: u64 = 1 << 20;

/// Errors of registry operations. Every failing operation leaves the registry as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A file operation failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry directory was written by a newer version.
    #[error("registry {dir} has format {found}; this version understands up to {REGISTRY_FORMAT}")]
    NewerFormat {
        /// The registry.
        dir: PathBuf,
        /// Format found.
        found: u32,
    },
    /// The registry's own files are damaged.
    #[error("registry {dir}: {reason}")]
    Corrupt {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The files given do not make a base.
    #[error("cannot register '{name}': {reason}")]
    BadInput {
        /// The base name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The same content is registered already.
    #[error("this base is already registered as '{name}' ({id})")]
    AlreadyRegistered {
        /// Existing id.
        id: BaseId,
        /// Existing name.
        name: String,
    },
    /// Another base has that name.
    #[error("the name '{name}' is taken by base {id}")]
    NameTaken {
        /// The name.
        name: String,
        /// The base holding it.
        id: BaseId,
    },
    /// No base matches.
    #[error("no base matches '{query}'")]
    NotFound {
        /// The query.
        query: String,
    },
    /// An id prefix matches several bases.
    #[error("'{query}' matches several bases: {}", candidates.iter().map(|(i, n)| format!("{} ({n})", &i.to_hex()[..16])).collect::<Vec<_>>().join(", "))]
    Ambiguous {
        /// The query.
        query: String,
        /// (id, name) of each match.
        candidates: Vec<(BaseId, String)>,
    },
    /// [`Registry::open_existing`] found no registry at the path.
    #[error("no base registry at {dir}: {reason}")]
    NoRegistry {
        /// The path given.
        dir: PathBuf,
        /// What is there instead (the directory does not exist, or holds no `registry.json`).
        reason: String,
    },
    /// An export file is truncated, damaged or tampered with.
    #[error("bad export at byte {offset}: {reason}")]
    BadExport {
        /// Offset in the uncompressed export stream.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io { path: path.to_owned(), source }
}

/// One file of a base in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name (`memory`, `disk0`, `device-state`, `kernel`, `initrd`, `index`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// [`ImageDigest`] hex (for `index`: blake3 of the file).
    pub digest: String,
}

/// `manifest.json` of a registered base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format (1).
    pub format: u32,
    /// Base id (64 hex digits in the JSON).
    #[serde(with = "hex_id")]
    pub id: BaseId,
    /// Unique human name.
    pub name: String,
    /// Where the base came from (e.g. the raw disk image path).
    pub source_image: Option<String>,
    /// Registration time, Unix seconds.
    pub created_unix: u64,
    /// The VM spec.
    pub spec: VmSpec,
    /// The files the id covers.
    pub files: Vec<FileEntry>,
    /// The delta engine's index, if attached.
    pub index: Option<FileEntry>,
    /// Free-form labels (not part of the id).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// What the hypervisor recorded of the snapshot the files come from (not part of the id).
    /// Absent from manifests written before it existed (and then not written at all, so their
    /// checksums still hold); those bases kept it in the labels `state_hash`,
    /// `free_page_reporting` and `display`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRecord>,
    /// blake3 of this manifest's JSON with `checksum` empty, hex.
    pub checksum: String,
}

impl Manifest {
    fn compute_checksum(&self) -> String {
        let mut m = self.clone();
        m.checksum = String::new();
        blake3::hash(&serde_json::to_vec(&m).expect("serialisable")).to_hex().to_string()
    }

    fn seal(mut self) -> Self {
        self.checksum = self.compute_checksum();
        self
    }

    /// Parses and checks a manifest: its checksum and every rule a base follows (the same
    /// rules [`Registry::register`] applies). The error says what is wrong.
    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("manifest: {e}"))?;
        if m.checksum != m.compute_checksum() {
            return Err("manifest checksum mismatch".into());
        }
        validate::check_manifest(&m)?;
        Ok(m)
    }

    fn base_id(&self) -> BaseId {
        self.id
    }
}

/// A [`BaseId`] as 64 hex digits in JSON.
mod hex_id {
    use overlay_format::BaseId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(id: &BaseId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_hex())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BaseId, D::Error> {
        let s = String::deserialize(d)?;
        BaseId::from_hex(&s).ok_or_else(|| serde::de::Error::custom(format!("id {s:?} is not 64 hex digits")))
    }
}

/// A registered base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseEntry {
    /// Its directory (read-only files).
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl BaseEntry {
    /// The id.
    pub fn id(&self) -> BaseId {
        self.manifest.base_id()
    }
    /// Path of the file called `name`, if the base has it.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        let known =
            self.manifest.files.iter().any(|f| f.name == name) || (name == "index" && self.manifest.index.is_some());
        known.then(|| self.dir.join(name))
    }
    /// The memory image.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join("memory")
    }
    /// The device state.
    pub fn device_state_path(&self) -> PathBuf {
        self.dir.join("device-state")
    }
    /// A disk image.
    pub fn disk_path(&self, name: &str) -> Option<PathBuf> {
        self.manifest.spec.disks.iter().any(|d| d.name == name).then(|| self.dir.join(name))
    }
    /// Total bytes of the base's files (apparent sizes).
    pub fn size(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum::<u64>() + self.manifest.index.as_ref().map_or(0, |i| i.size)
    }
}

/// How [`Registry::register`] takes the files in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Hard-link them in (same filesystem) and remove the sources once registered; copies
    /// (keeping holes) across filesystems.
    Move,
    /// Copy them (keeping holes); the sources stay untouched.
    Copy,
}

/// A base to register.
#[derive(Debug, Clone)]
pub struct NewBase {
    /// Unique name.
    pub name: String,
    /// Where it came from.
    pub source_image: Option<String>,
    /// The VM spec.
    pub spec: VmSpec,
    /// `(name, path)` of its files: `memory`, each disk of the spec, `device-state`, optional
    /// `kernel`, `initrd`, `firmware-code` with `firmware-vars` (UEFI), `index`.
    pub files: Vec<(String, PathBuf)>,
    /// Move or copy.
    pub mode: Mode,
    /// Free-form labels stored in the manifest (not part of the id).
    pub labels: std::collections::BTreeMap<String, String>,
    /// What the hypervisor recorded of the snapshot the files come from.
    pub snapshot: Option<SnapshotRecord>,
}

/// What a hypervisor records of a snapshot beyond the [`VmSpec`] and the files, to resume it:
/// a base's [`Manifest::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// blake3 over the RAM image then the device state, 64 hex digits: what a restore checks
    /// the files against.
    pub state_hash: String,
    /// The VM's balloon device had free page reporting (part of the device layout).
    pub free_page_reporting: bool,
    /// The VM had a display device (part of the device layout).
    pub display: bool,
    /// The VM had the guest agent channel (part of the device layout). Left out of the JSON
    /// when false, so the manifests (and checksums) of bases without it are as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
}

/// What [`Registry::verify`] found, per file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The base.
    pub id: BaseId,
    /// `(file, problem)`; empty when the base is intact.
    pub problems: Vec<(String, String)>,
}

impl VerifyReport {
    /// True when every file matched.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The registry: a directory of bases.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

fn crash_point(step: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("CLOUDLET_REGISTRY_CRASH_AT").as_deref() == Ok(step) {
        std::process::abort();
    }
    let _ = step;
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unique(prefix: &str) -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Holds the writers' lock; released on drop.
struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl Registry {
    /// `CLOUDLET_REGISTRY`, else `$XDG_DATA_HOME/cloudlet/bases`, else
    /// `~/.local/share/cloudlet/bases`.
    pub fn default_dir() -> PathBuf {
        if let Some(p) = std::env::var_os("CLOUDLET_REGISTRY") {
            return p.into();
        }
        if let Some(p) = std::env::var_os("XDG_DATA_HOME") {
            return PathBuf::from(p).join("cloudlet/bases");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/".into());
        home.join(".local/share/cloudlet/bases")
    }

    /// Opens (creating if needed) the registry at `root`. Refuses a newer layout.
    pub fn open(root: &Path) -> Result<Self> {
        let meta = root.join("registry.json");
        match fs::read(&meta) {
            Ok(b) => check_format(root, &b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                for d in [root.to_owned(), root.join("bases"), root.join("staging")] {
                    fs::create_dir_all(&d).map_err(io(&d))?;
                }
                let tmp = root.join(unique(".registry.json"));
                fs::write(&tmp, format!("{{\"format\": {REGISTRY_FORMAT}}}\n")).map_err(io(&tmp))?;
                // Another process may have created it meanwhile: keep theirs if so.
                if fs::hard_link(&tmp, &meta).is_err() && !meta.exists() {
                    fs::rename(&tmp, &meta).map_err(io(&meta))?;
                }
                let _ = fs::remove_file(&tmp);
                fsync_dir(root);
            }
            Err(e) => return Err(RegistryError::Io { path: meta, source: e }),
        }
        for d in [root.join("bases"), root.join("staging")] {
            fs::create_dir_all(&d).map_err(io(&d))?;
        }
        // Absolute paths, so entries stay valid whatever the caller's working directory.
        let root = fs::canonicalize(root).map_err(io(root))?;
        Ok(Registry { root })
    }

    /// Opens the registry at `root` without creating or changing anything: for commands that
    /// only read or remove. Fails with [`RegistryError::NoRegistry`] naming the path when
    /// `root` does not exist or is not a registry (no `registry.json`), so a mistyped path is
    /// reported instead of silently becoming a new, empty registry.
    pub fn open_existing(root: &Path) -> Result<Self> {
        let none = |reason: &str| RegistryError::NoRegistry { dir: root.to_owned(), reason: reason.into() };
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(none("not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(none("the directory does not exist")),
            Err(e) => return Err(RegistryError::Io { path: root.to_owned(), source: e }),
        }
        let meta = root.join("registry.json");
        match fs::read(&meta) {
            Ok(b) => check_format(root, &b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(none("the directory holds no registry.json"))
            }
            Err(e) => return Err(RegistryError::Io { path: meta, source: e }),
        }
        let root = fs::canonicalize(root).map_err(io(root))?;
        for d in [root.join("bases"), root.join("staging")] {
            if !d.is_dir() {
                return Err(RegistryError::Corrupt { dir: root, reason: format!("{} is missing", d.display()) });
            }
        }
        Ok(Registry { root })
    }

    /// The registry directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> Result<Lock> {
        let p = self.root.join("lock");
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&p).map_err(io(&p))?;
        f.lock().map_err(io(&p))?;
        Ok(Lock(f))
    }

    fn entry(&self, dir: &Path) -> Result<BaseEntry> {
        let p = dir.join("manifest.json");
        let f = File::open(&p).map_err(io(&p))?;
        let mut bytes = Vec::new();
        f.take(MAX_MANIFEST_LEN + 1).read_to_end(&mut bytes).map_err(io(&p))?;
        if bytes.len() as u64 > MAX_MANIFEST_LEN {
            return Err(RegistryError::Corrupt { dir: dir.to_owned(), reason: "manifest over 1 MiB".into() });
        }
        let bad = |reason: String| RegistryError::Corrupt { dir: dir.to_owned(), reason };
        let manifest = Manifest::parse(&bytes).map_err(bad)?;
        if dir.file_name().and_then(|n| n.to_str()) != Some(manifest.id.to_hex().as_str()) {
            return Err(bad(format!("directory name is not the manifest's id {}", manifest.id)));
        }
        validate::check_entry_files(&manifest, dir).map_err(bad)?;
        Ok(BaseEntry { dir: dir.to_owned(), manifest })
    }

    /// Every complete base (entries whose manifest does not check out are skipped).
    pub fn list(&self) -> Result<Vec<BaseEntry>> {
        let bases = self.root.join("bases");
        let mut out = Vec::new();
        for e in fs::read_dir(&bases).map_err(io(&bases))? {
            let e = e.map_err(io(&bases))?;
            if let Ok(b) = self.entry(&e.path()) {
                out.push(b);
            }
        }
        out.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        Ok(out)
    }

    /// The base with this id.
    pub fn get(&self, id: &BaseId) -> Result<BaseEntry> {
        let dir = self.root.join("bases").join(id.to_hex());
        if !dir.exists() {
            return Err(RegistryError::NotFound { query: id.to_hex() });
        }
        self.entry(&dir)
    }

    /// Finds a base by exact name, full id, or unique id prefix of at least 4 hex digits.
    pub fn find(&self, query: &str) -> Result<BaseEntry> {
        let all = self.list()?;
        if let Some(b) = all.iter().find(|b| b.manifest.name == query) {
            return Ok(b.clone());
        }
        let q = query.to_ascii_lowercase();
        if q.len() >= 4 && q.bytes().all(|b| b.is_ascii_hexdigit()) {
            let m: Vec<&BaseEntry> = all.iter().filter(|b| b.manifest.id.to_hex().starts_with(&q)).collect();
            match m.len() {
                0 => {}
                1 => return Ok(m[0].clone()),
                _ => {
                    return Err(RegistryError::Ambiguous {
                        query: query.into(),
                        candidates: m.iter().map(|b| (b.id(), b.manifest.name.clone())).collect(),
                    })
                }
            }
        }
        Err(RegistryError::NotFound { query: query.into() })
    }

    /// Registers a base atomically: either it is complete and listed afterwards, or the
    /// registry is unchanged.
    pub fn register(&self, new: NewBase) -> Result<BaseEntry> {
        let bad = |reason: String| RegistryError::BadInput { name: new.name.clone(), reason };
        if !valid_name(&new.name) {
            return Err(bad("names are 1-64 characters of [A-Za-z0-9._-], not starting with '.'".into()));
        }
        // The same rules as import and opening an entry, on the sources' names and sizes.
        let mut sized = Vec::new();
        for (n, p) in &new.files {
            let meta = fs::metadata(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            if !meta.is_file() {
                return Err(bad(format!("{} is not a regular file", p.display())));
            }
            sized.push((n.as_str(), meta.len()));
        }
        validate::check_files(&new.spec, &sized, true).map_err(bad)?;
        if let Some(r) = &new.snapshot {
            validate::check_state_hash(&r.state_hash).map_err(bad)?;
        }
        if new.labels.len() > 256 || new.labels.iter().any(|(k, v)| k.len() > 256 || v.len() > 4096) {
            return Err(bad("at most 256 labels, keys up to 256 bytes, values up to 4096".into()));
        }
        // Sizes and digests (read-only work, before taking the lock).
        let mut entries = Vec::new();
        let mut index = None;
        for ((n, p), &(_, size)) in new.files.iter().zip(&sized) {
            if n == "index" {
                let h = files::blake3_file(p).map_err(io(p))?;
                index = Some(FileEntry { name: n.clone(), size, digest: h });
            } else {
                let d = digest_file(p).map_err(io(p))?;
                entries.push((FileEntry { name: n.clone(), size, digest: d.to_string() }, d));
            }
        }
        let refs: Vec<(&str, ImageDigest)> = entries.iter().map(|(e, d)| (e.name.as_str(), *d)).collect();
        let id = BaseId::compute(&new.spec, &refs);
        let manifest = Manifest {
            format: 1,
            id,
            name: new.name.clone(),
            source_image: new.source_image.clone(),
            created_unix: now_unix(),
            spec: new.spec.clone(),
            files: entries.into_iter().map(|(e, _)| e).collect(),
            index,
            labels: new.labels.clone(),
            snapshot: new.snapshot.clone(),
            checksum: String::new(),
        }
        .seal();

        let _lock = self.lock()?;
        crash_point("locked");
        for b in self.list()? {
            if b.id() == id {
                return Err(RegistryError::AlreadyRegistered { id, name: b.manifest.name });
            }
            if b.manifest.name == new.name {
                return Err(RegistryError::NameTaken { name: new.name.clone(), id: b.id() });
            }
        }
        let staging = self.root.join("staging").join(unique("register"));
        fs::create_dir(&staging).map_err(io(&staging))?;
        crash_point("staging-created");
        let result = (|| -> Result<()> {
            for (n, p) in &new.files {
                place_file(p, &staging.join(n), new.mode == Mode::Move).map_err(io(p))?;
                crash_point("file-placed");
            }
            crash_point("files-placed");
            write_manifest(&staging, &manifest)?;
            crash_point("manifest-written");
            fsync_dir(&staging);
            let dest = self.root.join("bases").join(id.to_hex());
            fs::rename(&staging, &dest).map_err(io(&dest))?;
            crash_point("renamed");
            fsync_dir(&self.root.join("bases"));
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        if new.mode == Mode::Move {
            for (_, p) in &new.files {
                let _ = fs::remove_file(p);
            }
        }
        self.get(&id)
    }

    /// Recomputes every file's digest and the id; reports exactly which files are missing,
    /// resized or corrupt.
    pub fn verify(&self, id: &BaseId) -> Result<VerifyReport> {
        let b = self.get(id)?;
        let mut problems = Vec::new();
        let mut refs = Vec::new();
        for f in &b.manifest.files {
            let p = b.dir.join(&f.name);
            match fs::metadata(&p) {
                Err(e) => problems.push((f.name.clone(), format!("missing: {e}"))),
                Ok(m) if m.len() != f.size => {
                    problems.push((f.name.clone(), format!("size {} bytes, expected {}", m.len(), f.size)))
                }
                Ok(_) => {
                    let d = digest_file(&p).map_err(io(&p))?;
                    if d.to_string() != f.digest {
                        problems.push((f.name.clone(), "content does not match its digest (corrupt)".into()));
                    }
                    refs.push((f.name.as_str(), d));
                }
            }
        }
        if let Some(i) = &b.manifest.index {
            let p = b.dir.join("index");
            match files::blake3_file(&p) {
                Ok(h) if h == i.digest => {}
                Ok(_) => problems.push(("index".into(), "content does not match its digest (corrupt)".into())),
                Err(e) => problems.push(("index".into(), format!("unreadable: {e}"))),
            }
        }
        if problems.is_empty() && BaseId::compute(&b.manifest.spec, &refs) != *id {
            problems.push(("manifest".into(), "the id does not match the spec and files".into()));
        }
        Ok(VerifyReport { id: *id, problems })
    }

    /// Removes a base.
    pub fn remove(&self, id: &BaseId) -> Result<()> {
        let _lock = self.lock()?;
        let b = self.get(id)?;
        let trash = self.root.join("staging").join(unique("remove"));
        fs::rename(&b.dir, &trash).map_err(io(&b.dir))?;
        fsync_dir(&self.root.join("bases"));
        fs::remove_dir_all(&trash).map_err(io(&trash))
    }

    /// Attaches (or replaces) the delta engine's index file of a base.
    pub fn set_index(&self, id: &BaseId, index: &Path) -> Result<BaseEntry> {
        let _lock = self.lock()?;
        let b = self.get(id)?;
        let tmp = b.dir.join(".index.partial");
        let _ = fs::remove_file(&tmp);
        place_file(index, &tmp, false).map_err(io(index))?;
        let size = fs::metadata(&tmp).map_err(io(&tmp))?.len();
        let digest = files::blake3_file(&tmp).map_err(io(&tmp))?;
        let dest = b.dir.join("index");
        if dest.exists() {
            let _ = fs::remove_file(&dest);
        }
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        let mut m = b.manifest.clone();
        m.index = Some(FileEntry { name: "index".into(), size, digest });
        write_manifest(&b.dir, &m.seal())?;
        self.get(id)
    }

    /// Removes what crashed writers left in `staging/`; returns what it removed.
    pub fn gc(&self) -> Result<Vec<PathBuf>> {
        let _lock = self.lock()?;
        let st = self.root.join("staging");
        let mut removed = Vec::new();
        for e in fs::read_dir(&st).map_err(io(&st))? {
            let p = e.map_err(io(&st))?.path();
            let r = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            r.map_err(io(&p))?;
            removed.push(p);
        }
        Ok(removed)
    }

    /// Writes a base as one portable file (see the README for its layout).
    pub fn export(&self, id: &BaseId, out: impl Write) -> Result<()> {
        let b = self.get(id)?;
        export::write(&b, out)
    }

    /// Imports a base written by [`Registry::export`], checking every digest and the id.
    pub fn import(&self, input: impl Read) -> Result<BaseEntry> {
        let staging = self.root.join("staging").join(unique("import"));
        fs::create_dir(&staging).map_err(io(&staging))?;
        let result = (|| -> Result<BaseEntry> {
            let manifest = export::read(input, &staging)?;
            let id = manifest.base_id();
            let _lock = self.lock()?;
            for b in self.list()? {
                if b.id() == id {
                    return Err(RegistryError::AlreadyRegistered { id, name: b.manifest.name });
                }
                if b.manifest.name == manifest.name {
                    return Err(RegistryError::NameTaken { name: manifest.name.clone(), id: b.id() });
                }
            }
            fsync_dir(&staging);
            let dest = self.root.join("bases").join(id.to_hex());
            fs::rename(&staging, &dest).map_err(io(&dest))?;
            fsync_dir(&self.root.join("bases"));
            self.get(&id)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }
}

/// Checks `registry.json` (its bytes `b`): a format this version understands.
fn check_format(root: &Path, b: &[u8]) -> Result<()> {
    #[derive(Deserialize)]
    struct Meta {
        format: u32,
    }
    if b.len() > 4096 {
        return Err(RegistryError::Corrupt { dir: root.to_owned(), reason: "registry.json too large".into() });
    }
    let m: Meta = serde_json::from_slice(b)
        .map_err(|e| RegistryError::Corrupt { dir: root.to_owned(), reason: format!("registry.json: {e}") })?;
    if m.format > REGISTRY_FORMAT {
        return Err(RegistryError::NewerFormat { dir: root.to_owned(), found: m.format });
    }
    Ok(())
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let tmp = dir.join(".manifest.partial");
    let p = dir.join("manifest.json");
    let bytes = serde_json::to_vec_pretty(m).expect("serialisable");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &p).map_err(io(&p))?;
    fsync_dir(dir);
    Ok(())
}
