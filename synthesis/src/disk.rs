//! The disks a base is made from: the user's raw or qcow2 images, checked, then copied into the
//! base as raw sparse files. The inputs are only read.
//!
//! - **raw**: any file that is not qcow2, a whole number of 512-byte sectors long. Copied
//!   extent by extent (`SEEK_DATA`/`SEEK_HOLE`), skipping blocks of zeros, so a 4 GiB image
//!   with 300 MiB of data takes 300 MiB in the base, and a fully allocated one loses its
//!   zeros.
//! - **qcow2**: recognised by its magic `QFI\xfb`; converted with `qemu-img convert -O raw`
//!   (which writes holes where the image has none). A qcow2 image with a backing file or an
//!   external data file is refused: its contents would come from other files, named by the
//!   image itself (any file on this host), so it is flattened knowingly first
//!   (`qemu-img convert -O qcow2 IN FLAT`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use crate::FlowError;

/// The format of an input disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// Raw bytes.
    Raw,
    /// qcow2 without a backing file.
    Qcow2,
}

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// A raw image is a whole number of these.
const SECTOR: u64 = 512;

/// The copy block: runs of zeros this long (aligned) become holes.
const BLOCK: usize = 1 << 20;

fn bad(path: &Path, reason: impl Into<String>) -> FlowError {
    FlowError::BadDisk { path: path.to_owned(), reason: reason.into() }
}

/// Says whether `path` is a raw or a qcow2 image we can use, from its size and its first 104
/// bytes (the qcow2 header up to the incompatible features); refuses what we cannot use.
pub fn probe_disk(path: &Path) -> Result<InputFormat, FlowError> {
    let io = |source| FlowError::Io { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let mut head = Vec::with_capacity(104);
    File::open(path).map_err(io)?.take(104).read_to_end(&mut head).map_err(io)?;
    if head.len() >= 4 && head[..4] == QCOW2_MAGIC {
        return qcow2_header(path, &head).map(|()| InputFormat::Qcow2);
    }
    let len = meta.len();
    if len == 0 {
        return Err(bad(path, "empty: not a disk image"));
    }
    if len % SECTOR != 0 {
        return Err(bad(
            path,
            format!(
                "{len} bytes is not a whole number of 512-byte sectors: not a raw disk image (and not qcow2, \
                 which starts with QFI\\xfb)"
            ),
        ));
    }
    Ok(InputFormat::Raw)
}

/// Checks a qcow2 header: version 2 or 3, no backing file, no external data file.
fn qcow2_header(path: &Path, head: &[u8]) -> Result<(), FlowError> {
    let be32 = |at: usize| head.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let be64 = |at: usize| head.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    let short = || bad(path, "a qcow2 image whose header is cut short");
    let version = be32(4).ok_or_else(short)?;
    if version != 2 && version != 3 {
        return Err(bad(path, format!("qcow2 version {version}: only versions 2 and 3 are known")));
    }
    let backing_offset = be64(8).ok_or_else(short)?;
    if backing_offset != 0 {
        return Err(bad(
            path,
            "a qcow2 image with a backing file: its contents come from another file it names, so it is not \
             taken as it is; flatten it first (qemu-img convert -O qcow2 IN FLAT.qcow2) and give the flat image",
        ));
    }
    if version == 3 {
        // Incompatible feature bit 2: the guest data lives in an external data file.
        let incompatible = be64(72).ok_or_else(short)?;
        if incompatible & (1 << 2) != 0 {
            return Err(bad(
                path,
                "a qcow2 image with an external data file: flatten it first (qemu-img convert -O qcow2 IN FLAT.qcow2)",
            ));
        }
    }
    Ok(())
}

/// Copies the input image `src` into the base as the raw sparse file `dst` (which must not
/// exist); `src` is only read. Returns the input's format.
pub(crate) fn import_disk(src: &Path, dst: &Path) -> Result<InputFormat, FlowError> {
    let format = probe_disk(src)?;
    match format {
        InputFormat::Raw => sparse_copy(src, dst)?,
        InputFormat::Qcow2 => qcow2_to_raw(src, dst)?,
    }
    Ok(format)
}

/// `qemu-img convert -f qcow2 -O raw`: the format is given, never probed.
fn qcow2_to_raw(src: &Path, dst: &Path) -> Result<(), FlowError> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|source| FlowError::Io { path: "qemu-img".into(), source })?;
    if !out.status.success() {
        return Err(FlowError::Tool {
            tool: format!("qemu-img convert of {}", src.display()),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The next data extent of `f` at or after `at`: `(start, end)`, or `None` past the last one.
fn next_extent(f: &File, at: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    if at >= len {
        return Ok(None);
    }
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek(2) on a file descriptor `f` owns and keeps open for the call; it only
        // moves the file offset, which nothing else reads concurrently (the copy seeks before
        // every read).
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or after `offset`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let start = match seek(at, libc::SEEK_DATA) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        // A file system without SEEK_DATA: all of it is data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((at, len))),
        Err(e) => return Err(e),
    };
    let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
    Ok(Some((start, end)))
}

/// Copies `src` to the new file `dst` keeping it sparse: only data extents are read, and
/// blocks of zeros in them are not written.
fn sparse_copy(src: &Path, dst: &Path) -> Result<(), FlowError> {
    let rd = |source| FlowError::Io { path: src.to_owned(), source };
    let wr = |source| FlowError::Io { path: dst.to_owned(), source };
    let mut input = File::open(src).map_err(rd)?;
    let len = input.metadata().map_err(rd)?.len();
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(dst).map_err(wr)?;
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0;
    while let Some((start, end)) = next_extent(&input, at, len).map_err(rd)? {
        input.seek(SeekFrom::Start(start)).map_err(rd)?;
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(BLOCK as u64) as usize;
            input.read_exact(&mut buf[..n]).map_err(rd)?;
            if buf[..n].iter().any(|&b| b != 0) {
                out.seek(SeekFrom::Start(pos)).map_err(wr)?;
                out.write_all(&buf[..n]).map_err(wr)?;
            }
            pos += n as u64;
        }
        at = end;
    }
    out.set_len(len).map_err(wr)?;
    out.sync_all().map_err(wr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn qcow2_head(version: u32, backing: u64, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    #[test]
    fn formats_are_told_apart_and_unusable_images_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let probe = |name: &str, bytes: &[u8]| {
            std::fs::write(p(name), bytes).unwrap();
            probe_disk(&p(name)).map_err(|e| e.to_string())
        };
        assert_eq!(probe("raw", &[1u8; 1024]), Ok(InputFormat::Raw));
        assert_eq!(probe("v3", &qcow2_head(3, 0, 0)), Ok(InputFormat::Qcow2));
        assert_eq!(probe("v2", &qcow2_head(2, 0, 0)), Ok(InputFormat::Qcow2));
        let e = probe("backed", &qcow2_head(3, 0x200, 0)).unwrap_err();
        assert!(e.contains("backed: a qcow2 image with a backing file") && e.contains("flatten it first"), "{e}");
        let e = probe("data-file", &qcow2_head(3, 0, 1 << 2)).unwrap_err();
        assert!(e.contains("external data file"), "{e}");
        assert!(probe("v4", &qcow2_head(4, 0, 0)).unwrap_err().contains("qcow2 version 4"));
        assert!(probe("cut", &qcow2_head(3, 0, 0)[..12]).unwrap_err().contains("cut short"));
        assert!(probe("odd", &[1u8; 1000]).unwrap_err().contains("1000 bytes is not a whole number of 512-byte"));
        assert!(probe("empty", &[]).unwrap_err().contains("empty"));
        let e = probe_disk(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = probe_disk(&p("missing")).unwrap_err();
        assert!(matches!(&e, FlowError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{e}");
    }

    #[test]
    fn a_sparse_raw_image_stays_sparse_and_zeros_become_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.raw");
        let len: u64 = 4 << 30;
        {
            let mut f = File::create(&src).unwrap();
            f.set_len(len).unwrap();
            for at in [0u64, 1 << 30, len - 4096] {
                f.seek(SeekFrom::Start(at)).unwrap();
                f.write_all(&[0xa5; 4096]).unwrap();
            }
            // Written zeros: data to the file system, holes in the copy.
            f.seek(SeekFrom::Start(2 << 30)).unwrap();
            f.write_all(&vec![0u8; 4 << 20]).unwrap();
        }
        let before = std::fs::metadata(&src).unwrap();
        let dst = dir.path().join("out.raw");
        assert_eq!(import_disk(&src, &dst).unwrap(), InputFormat::Raw);
        let after = std::fs::metadata(&dst).unwrap();
        assert_eq!(after.len(), len);
        assert!(after.blocks() * 512 <= 4 << 20, "the copy allocates {} bytes", after.blocks() * 512);
        assert!(before.blocks() * 512 >= 4 << 20, "the input was not as written");
        let read = |p: &Path, at: u64| {
            let mut f = File::open(p).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            let mut b = vec![0u8; 8192];
            f.read_exact(&mut b).unwrap();
            b
        };
        for at in [0u64, (1 << 30) - 4096, 2 << 30, len - 8192] {
            assert_eq!(read(&src, at), read(&dst, at), "at {at}");
        }
        // The input is never written, and an existing output is not replaced.
        assert_eq!(std::fs::metadata(&src).unwrap().mtime(), before.mtime());
        assert!(matches!(import_disk(&src, &dst), Err(FlowError::Io { .. })));
    }
}
