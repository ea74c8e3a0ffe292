//! File helpers: digests, placing files read-only, directory fsync.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use overlay_format::ImageDigest;

/// [`ImageDigest`] of a file, hashing chunks in parallel over a read-only map.
pub(crate) fn digest_file(path: &Path) -> io::Result<ImageDigest> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(ImageDigest::from_chunk_hashes(std::iter::empty()));
    }
    // SAFETY: registry files are read-only and never truncated while a base exists; a racing
    // writer could only change the digest, which is what verify is for.
    let map = unsafe { memmap2::Mmap::map(&f)? };
    Ok(ImageDigest::of_bytes(&map))
}

/// blake3 of a whole file, hex.
pub(crate) fn blake3_file(path: &Path) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Puts `src` at `dst` (which must not exist): a hard link when `link` is set and both are on
/// one filesystem, else a copy that keeps holes. The result is made read-only and synced.
pub(crate) fn place_file(src: &Path, dst: &Path, link: bool) -> io::Result<()> {
    let linked = link && fs::hard_link(src, dst).is_ok();
    if !linked {
        let st = Command::new("cp").args(["--sparse=always", "--reflink=auto"]).arg(src).arg(dst).status()?;
        if !st.success() {
            let _ = fs::remove_file(dst);
            return Err(io::Error::other(format!("cp {} {} failed: {st}", src.display(), dst.display())));
        }
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(0o444))?;
    File::open(dst)?.sync_all()
}

/// fsync a directory so a rename in it is durable (best effort).
pub(crate) fn fsync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}
