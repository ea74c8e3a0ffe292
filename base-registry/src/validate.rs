//! The one set of rules a base must follow, checked on registration, on import and every time
//! an entry is opened: names that cannot leave the entry directory, a spec with sane values,
//! exactly the files the spec calls for, with the sizes it states.

use std::fs;
use std::path::Path;

use overlay_format::{VmSpec, MAX_IMAGE_SIZE};

use crate::{FileEntry, Manifest};

/// Files every base has.
pub(crate) const REQUIRED: [&str; 2] = ["memory", "device-state"];
/// Files a base may have besides its disks (the firmware files both or neither).
pub(crate) const OPTIONAL: [&str; 4] = ["kernel", "initrd", "firmware-code", "firmware-vars"];
/// Longest base, file or disk name.
pub(crate) const MAX_NAME_LEN: usize = 64;
/// Most disks a spec may list.
pub(crate) const MAX_DISKS: usize = 64;
/// Most virtual CPUs a spec may ask for.
pub(crate) const MAX_VCPUS: u32 = 1024;
/// Longest machine type, CPU model, QEMU version or accelerator.
const MAX_WORD_LEN: usize = 128;
/// Longest kernel command line.
const MAX_CMDLINE_LEN: usize = 4096;

/// A base, file or disk name: 1-64 characters of `[A-Za-z0-9._-]`, not starting with `.`.
/// Such a name has no `/`, no NUL, is never absolute and is never `.` or `..`, so joining it
/// to a directory stays inside that directory.
pub(crate) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME_LEN
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !n.starts_with('.')
}

/// Why `n` is not a valid name, or `None` if it is.
fn name_problem(what: &str, n: &str) -> Option<String> {
    (!valid_name(n)).then(|| {
        format!(
            "{what} {n:?} is not a valid name (1-{MAX_NAME_LEN} characters of [A-Za-z0-9._-], not starting with '.')"
        )
    })
}

/// Machine types, CPU models, versions and accelerators end up in QEMU's command line: printable
/// ASCII with no comma, space or `=`, bounded.
fn word_problem(field: &str, v: &str) -> Option<String> {
    let ok =
        !v.is_empty() && v.len() <= MAX_WORD_LEN && v.bytes().all(|b| b.is_ascii_graphic() && b != b',' && b != b'=');
    (!ok).then(|| format!("spec.{field} {v:?} is not 1-{MAX_WORD_LEN} printable characters without ',' or '='"))
}

/// Checks a spec's values.
pub(crate) fn check_spec(spec: &VmSpec) -> Result<(), String> {
    for (field, v) in [
        ("machine_type", &spec.machine_type),
        ("cpu_model", &spec.cpu_model),
        ("qemu_version", &spec.qemu_version),
        ("accelerator", &spec.accelerator),
    ] {
        if let Some(p) = word_problem(field, v) {
            return Err(p);
        }
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(format!("spec.vcpus is {}, not 1-{MAX_VCPUS}", spec.vcpus));
    }
    if spec.ram_bytes == 0 || spec.ram_bytes > MAX_IMAGE_SIZE {
        return Err(format!("spec.ram_bytes is {}, not 1-{MAX_IMAGE_SIZE}", spec.ram_bytes));
    }
    if let Some(c) = &spec.kernel_cmdline {
        if c.len() > MAX_CMDLINE_LEN || c.contains('\0') {
            return Err(format!("spec.kernel_cmdline is over {MAX_CMDLINE_LEN} bytes or holds a NUL"));
        }
    }
    if spec.disks.len() > MAX_DISKS {
        return Err(format!("spec lists {} disks, at most {MAX_DISKS} are allowed", spec.disks.len()));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        if let Some(p) = name_problem("disk", &d.name) {
            return Err(format!("spec.disks[{i}]: {p}"));
        }
        if REQUIRED.contains(&d.name.as_str())
            || OPTIONAL.contains(&d.name.as_str())
            || d.name == "index"
            || d.name == "manifest.json"
        {
            return Err(format!("spec.disks[{i}]: disk {:?} has the name of another file of a base", d.name));
        }
        if spec.disks[..i].iter().any(|e| e.name == d.name) {
            return Err(format!("spec.disks[{i}]: disk {:?} is listed twice", d.name));
        }
        if d.size_bytes > MAX_IMAGE_SIZE {
            return Err(format!("spec.disks[{i}]: disk {:?} is {} bytes, over {MAX_IMAGE_SIZE}", d.name, d.size_bytes));
        }
    }
    Ok(())
}

/// Checks that `files` (name, size) are exactly what `spec` calls for: `memory` of the spec's
/// RAM size, `device-state`, each disk at its size, optionally `kernel` and `initrd`, and
/// `index` only if `index_allowed`; valid, unique names and sane sizes.
pub(crate) fn check_files(spec: &VmSpec, files: &[(&str, u64)], index_allowed: bool) -> Result<(), String> {
    check_spec(spec)?;
    for (i, &(n, size)) in files.iter().enumerate() {
        if let Some(p) = name_problem("file", n) {
            return Err(p);
        }
        let known = REQUIRED.contains(&n)
            || OPTIONAL.contains(&n)
            || spec.disks.iter().any(|d| d.name == n)
            || (index_allowed && n == "index");
        if !known {
            return Err(format!(
                "unexpected file '{n}' (not memory, device-state, a disk of the spec, kernel, initrd, \
                 firmware-code, firmware-vars or index)"
            ));
        }
        if files[..i].iter().any(|&(m, _)| m == n) {
            return Err(format!("file '{n}' given twice"));
        }
        if size > MAX_IMAGE_SIZE {
            return Err(format!("file '{n}' is {size} bytes, over {MAX_IMAGE_SIZE}"));
        }
        if n == "memory" && size != spec.ram_bytes {
            return Err(format!("memory image is {size} bytes, the spec says {}", spec.ram_bytes));
        }
        if let Some(d) = spec.disks.iter().find(|d| d.name == n) {
            if size != d.size_bytes {
                return Err(format!("disk '{n}' is {size} bytes, the spec says {}", d.size_bytes));
            }
        }
    }
    for w in REQUIRED.iter().copied().chain(spec.disks.iter().map(|d| d.name.as_str())) {
        if !files.iter().any(|&(n, _)| n == w) {
            return Err(format!("missing file '{w}'"));
        }
    }
    let has = |w: &str| files.iter().any(|&(n, _)| n == w);
    if has("firmware-code") != has("firmware-vars") {
        return Err("the firmware files come in pairs: firmware-code and firmware-vars, or neither".into());
    }
    Ok(())
}

fn check_digest(f: &FileEntry) -> Result<(), String> {
    let ok = f.digest.len() == 64 && f.digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("file '{}': digest {:?} is not 64 lower-case hex digits", f.name, f.digest))
    }
}

/// Checks everything a manifest states about itself (not the files on disk).
pub(crate) fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.format != 1 {
        return Err(format!("manifest format {} (this version reads 1)", m.format));
    }
    if let Some(p) = name_problem("base name", &m.name) {
        return Err(p);
    }
    let files: Vec<(&str, u64)> = m.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
    if let Some(i) = &m.index {
        if i.name != "index" {
            return Err(format!("the index entry is named {:?}, not \"index\"", i.name));
        }
        if i.size > MAX_IMAGE_SIZE {
            return Err(format!("file 'index' is {} bytes, over {MAX_IMAGE_SIZE}", i.size));
        }
        check_digest(i)?;
    }
    check_files(&m.spec, &files, false)?;
    for f in &m.files {
        check_digest(f)?;
    }
    if let Some(r) = &m.snapshot {
        check_state_hash(&r.state_hash)?;
    }
    Ok(())
}

/// A snapshot record's state hash: 64 lowercase hex digits.
pub(crate) fn check_state_hash(h: &str) -> Result<(), String> {
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("snapshot.state_hash {:?} is not 64 lowercase hex digits", h.chars().take(80).collect::<String>()))
    }
}

/// Checks that each file of `m` present in `dir` is a regular file, not a symlink or anything
/// else that could lead outside the entry. Missing or resized files are left for
/// [`crate::Registry::verify`] to report.
pub(crate) fn check_entry_files(m: &Manifest, dir: &Path) -> Result<(), String> {
    for f in m.files.iter().chain(m.index.iter()) {
        let p = dir.join(&f.name);
        match fs::symlink_metadata(&p) {
            Ok(meta) if meta.file_type().is_file() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&p).map(|t| t.display().to_string()).unwrap_or_else(|e| e.to_string());
                return Err(format!("file '{}' is a symlink (to {target}), not a regular file", f.name));
            }
            Ok(_) => return Err(format!("file '{}' is not a regular file", f.name)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("file '{}': {e}", f.name)),
        }
    }
    Ok(())
}
