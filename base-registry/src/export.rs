//! The export file: one zstd stream holding
//! `"CLDBASE1" | manifest_len u32 LE | manifest JSON | per file (manifest order, then the
//! index): name_len u16 LE | name | size u64 LE | bytes | blake3 of everything before (32)`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use overlay_format::{BaseId, ImageDigest, CHUNK_SIZE, MAX_IMAGE_SIZE};

use crate::files::{blake3_file, digest_file};
use crate::{BaseEntry, FileEntry, Manifest, RegistryError, MAX_MANIFEST_LEN};

const MAGIC: &[u8; 8] = b"CLDBASE1";

struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub(crate) fn write(b: &BaseEntry, out: impl Write) -> Result<(), RegistryError> {
    let io_err = |source| RegistryError::Io { path: b.dir.clone(), source };
    let enc = zstd::Encoder::new(out, 3).map_err(io_err)?;
    let mut w = Hashing { inner: enc, hasher: blake3::Hasher::new() };
    let manifest = serde_json::to_vec(&b.manifest).expect("serialisable");
    w.write_all(MAGIC).map_err(io_err)?;
    w.write_all(&(manifest.len() as u32).to_le_bytes()).map_err(io_err)?;
    w.write_all(&manifest).map_err(io_err)?;
    let files: Vec<&FileEntry> = b.manifest.files.iter().chain(b.manifest.index.iter()).collect();
    for f in files {
        w.write_all(&(f.name.len() as u16).to_le_bytes()).map_err(io_err)?;
        w.write_all(f.name.as_bytes()).map_err(io_err)?;
        w.write_all(&f.size.to_le_bytes()).map_err(io_err)?;
        let p = b.dir.join(&f.name);
        let mut src = File::open(&p).map_err(|source| RegistryError::Io { path: p.clone(), source })?;
        let copied = io::copy(&mut (&mut src).take(f.size), &mut w).map_err(io_err)?;
        if copied != f.size {
            return Err(RegistryError::Corrupt {
                dir: b.dir.clone(),
                reason: format!("{} is shorter than its manifest says", f.name),
            });
        }
    }
    let sum = w.hasher.finalize();
    let mut enc = w.inner;
    enc.write_all(sum.as_bytes()).map_err(io_err)?;
    enc.finish().map_err(io_err)?.flush().map_err(io_err)?;
    Ok(())
}

struct Counting<R> {
    inner: R,
    hasher: blake3::Hasher,
    pos: u64,
}

impl<R: Read> Counting<R> {
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), RegistryError> {
        let at = self.pos;
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(RegistryError::BadExport {
                        offset: at + got as u64,
                        reason: format!("truncated in {what}"),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(RegistryError::BadExport { offset: at + got as u64, reason: format!("{what}: {e}") })
                }
            }
        }
        self.hasher.update(buf);
        self.pos += buf.len() as u64;
        Ok(())
    }
}

/// Reads an export into `dir` (files written sparse, read-only); returns its manifest after
/// checking the checksum, every digest and the id.
pub(crate) fn read(input: impl Read, dir: &Path) -> Result<Manifest, RegistryError> {
    let dec = zstd::Decoder::new(input).map_err(|e| RegistryError::BadExport { offset: 0, reason: e.to_string() })?;
    let mut r = Counting { inner: dec, hasher: blake3::Hasher::new(), pos: 0 };
    let bad = |offset: u64, reason: String| RegistryError::BadExport { offset, reason };
    let mut magic = [0u8; 8];
    r.exact(&mut magic, "the magic")?;
    if &magic != MAGIC {
        return Err(bad(0, "not a base export (bad magic)".into()));
    }
    let mut b4 = [0u8; 4];
    r.exact(&mut b4, "the manifest length")?;
    let mlen = u32::from_le_bytes(b4) as u64;
    if mlen > MAX_MANIFEST_LEN {
        return Err(bad(8, format!("manifest of {mlen} bytes")));
    }
    let mut mbytes = vec![0u8; mlen as usize];
    r.exact(&mut mbytes, "the manifest")?;
    let manifest = Manifest::parse(&mbytes).map_err(|e| bad(12, format!("refused manifest: {e}")))?;
    let files: Vec<FileEntry> = manifest.files.iter().chain(manifest.index.iter()).cloned().collect();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let at = r.pos;
        let mut b2 = [0u8; 2];
        r.exact(&mut b2, "a file name length")?;
        let nlen = u16::from_le_bytes(b2) as usize;
        if nlen != f.name.len() {
            return Err(bad(at, format!("expected file '{}'", f.name)));
        }
        let mut name = vec![0u8; nlen];
        r.exact(&mut name, "a file name")?;
        if name != f.name.as_bytes() || !crate::valid_name(&f.name) {
            return Err(bad(at, format!("expected file '{}'", f.name)));
        }
        let mut b8 = [0u8; 8];
        r.exact(&mut b8, "a file size")?;
        let size = u64::from_le_bytes(b8);
        if size != f.size || size > MAX_IMAGE_SIZE {
            return Err(bad(at, format!("file '{}' is {size} bytes, the manifest says {}", f.name, f.size)));
        }
        let p = dir.join(&f.name);
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|source| RegistryError::Io { path: p.clone(), source })?;
        let mut pos = 0u64;
        while pos < size {
            let n = ((size - pos) as usize).min(buf.len());
            r.exact(&mut buf[..n], "file data")?;
            for (i, c) in buf[..n].chunks(CHUNK_SIZE).enumerate() {
                if !overlay_format::digest::is_zero(c) {
                    out.write_all_at(c, pos + (i * CHUNK_SIZE) as u64)
                        .map_err(|source| RegistryError::Io { path: p.clone(), source })?;
                }
            }
            pos += n as u64;
        }
        out.set_len(size).map_err(|source| RegistryError::Io { path: p.clone(), source })?;
        out.sync_all().map_err(|source| RegistryError::Io { path: p.clone(), source })?;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444));
    }
    let expect = r.hasher.finalize();
    let mut sum = [0u8; 32];
    let at = r.pos;
    r.inner.read_exact(&mut sum).map_err(|_| bad(at, "truncated in the checksum".into()))?;
    if sum != *expect.as_bytes() {
        return Err(bad(at, "checksum mismatch".into()));
    }
    let mut extra = [0u8; 1];
    if matches!(r.inner.read(&mut extra), Ok(n) if n > 0) {
        return Err(bad(at + 32, "data after the checksum".into()));
    }
    // Every digest and the id.
    let mut refs: Vec<(String, ImageDigest)> = Vec::new();
    for f in &manifest.files {
        let p = dir.join(&f.name);
        let d = digest_file(&p).map_err(|source| RegistryError::Io { path: p.clone(), source })?;
        if d.to_string() != f.digest {
            return Err(bad(at, format!("file '{}' does not match its digest", f.name)));
        }
        refs.push((f.name.clone(), d));
    }
    if let Some(i) = &manifest.index {
        let p = dir.join("index");
        if blake3_file(&p).map_err(|source| RegistryError::Io { path: p.clone(), source })? != i.digest {
            return Err(bad(at, "index does not match its digest".into()));
        }
    }
    let r2: Vec<(&str, ImageDigest)> = refs.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    if BaseId::compute(&manifest.spec, &r2) != manifest.base_id() {
        return Err(bad(at, "the id does not match the spec and files".into()));
    }
    crate::write_manifest(dir, &manifest)?;
    Ok(manifest)
}
