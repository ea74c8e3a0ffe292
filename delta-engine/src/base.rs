//! An opened base VM: its index and its images' open files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use overlay_format::{ChunkHash, CHUNK_SIZE};

use crate::index::{BaseImage, BaseIndex, IndexError};

/// A base VM opened for diffing or applying: the index plus every image's open file.
///
/// Images are read with `pread`, never through maps: on the peer harness's pairs, faulting
/// the pages of a map in and dropping them again cost twice what copying the same bytes out of
/// the page cache does (a GiB compared in 0.36-0.45 s through two maps, 0.20 s with `pread`).
pub struct Base {
    index: BaseIndex,
    files: Arc<[File]>,
    paths: Vec<PathBuf>,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base").field("index", &self.index).field("paths", &self.paths).finish()
    }
}

impl Base {
    /// Opens the base images named in `index`. `images` must name the same images (any order);
    /// sizes are checked against the index (contents are not re-hashed: the registry verifies).
    pub fn open(index: BaseIndex, images: &[BaseImage]) -> Result<Self, IndexError> {
        let mut files = Vec::new();
        let mut paths = Vec::new();
        if images.len() != index.images().len() {
            return Err(IndexError::Invalid {
                reason: format!("{} image files for an index of {} images", images.len(), index.images().len()),
            });
        }
        for ii in index.images() {
            let Some(img) = images.iter().find(|i| i.name == ii.name) else {
                return Err(IndexError::Invalid { reason: format!("no file given for base image '{}'", ii.name) });
            };
            let io = |source| IndexError::Io { path: img.path.clone(), source };
            let file = File::open(&img.path).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            if len != ii.size {
                return Err(IndexError::Invalid {
                    reason: format!("{} is {} bytes, the index says {}", img.path.display(), len, ii.size),
                });
            }
            files.push(file);
            paths.push(img.path.clone());
        }
        Ok(Base { index, files: files.into(), paths })
    }

    /// Builds the index of `images` and opens them.
    pub fn build(images: &[BaseImage], progress: &(dyn Fn(u64) + Sync)) -> Result<Self, IndexError> {
        let index = BaseIndex::build(images, progress)?;
        Self::open(index, images)
    }

    /// The index.
    pub fn index(&self) -> &BaseIndex {
        &self.index
    }

    /// Path of base image `i`.
    pub fn path(&self, i: usize) -> &Path {
        &self.paths[i]
    }

    /// Size of base image `i`.
    pub fn size(&self, i: usize) -> u64 {
        self.index.images()[i].size
    }

    /// Reads `out.len()` bytes of image `i` from chunk `c` on into `out`, zeros past the end.
    pub(crate) fn read_padded(&self, i: usize, c: u64, out: &mut [u8]) -> std::io::Result<()> {
        read_padded_at(&self.files[i], c.saturating_mul(CHUNK_SIZE as u64), out)
    }

    /// The open files of the images, for reading with `pread` ([`read_padded_at`]). Shared, for
    /// threads that outlive a borrow of the base.
    pub(crate) fn files(&self) -> &Arc<[File]> {
        &self.files
    }

    /// The open file of image `i` (see [`Base::files`]).
    pub(crate) fn file(&self, i: usize) -> &File {
        &self.files[i]
    }

    /// Whether chunk `c` of image `i`, cut to `len` bytes, is all zeros in the base (from the
    /// index for a full chunk; else read, and taken as not zero if it cannot be).
    pub(crate) fn chunk_is_zero(&self, i: usize, c: u64, len: usize) -> bool {
        let img = &self.index.images()[i];
        if len == CHUNK_SIZE {
            if let Some(h) = img.hashes.get(c as usize) {
                if (c + 1) * CHUNK_SIZE as u64 <= img.size {
                    return *h == ChunkHash::zero();
                }
            }
        }
        let mut buf = vec![0u8; len];
        self.read_padded(i, c, &mut buf).is_ok() && overlay_format::digest::is_zero(&buf)
    }

    /// Hash of the base's chunk `c` of image `i` when it is a full chunk.
    pub(crate) fn full_hash(&self, i: usize, c: u64) -> Option<ChunkHash> {
        let img = &self.index.images()[i];
        if (c + 1) * CHUNK_SIZE as u64 <= img.size {
            img.hashes.get(c as usize).copied()
        } else {
            None
        }
    }
}

/// Reads `out.len()` bytes of `file` from offset `at` on with `pread`, zeros past the end of
/// the file (what [`Base::read_padded`] does on a base image).
pub(crate) fn read_padded_at(file: &File, mut at: u64, out: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < out.len() {
        match file.read_at(&mut out[done..], at) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out[done..].fill(0);
    Ok(())
}
