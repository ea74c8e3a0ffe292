//! An opened base VM: its index and read-only maps of its images.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use overlay_format::{ChunkHash, CHUNK_SIZE};

use crate::file::Mapped;
use crate::index::{BaseImage, BaseIndex, IndexError};

/// A base VM opened for diffing or applying: the index plus a map of every image.
pub struct Base {
    index: BaseIndex,
    maps: Vec<Mapped>,
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
        let mut maps = Vec::new();
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
            let (file, map) =
                Mapped::open(&img.path).map_err(|source| IndexError::Io { path: img.path.clone(), source })?;
            if map.len() != ii.size {
                return Err(IndexError::Invalid {
                    reason: format!("{} is {} bytes, the index says {}", img.path.display(), map.len(), ii.size),
                });
            }
            maps.push(map);
            files.push(file);
            paths.push(img.path.clone());
        }
        Ok(Base { index, maps, files: files.into(), paths })
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
        self.maps[i].len()
    }

    /// Lets go of the page mappings of bytes `[start, end)` of image `i` ([`Mapped::release`]).
    pub(crate) fn release(&self, i: usize, start: u64, end: u64) {
        self.maps[i].release(start, end);
    }

    /// The whole chunk `c` of image `i` if it lies fully inside the image.
    pub(crate) fn full_chunk(&self, i: usize, c: u64) -> Option<&[u8]> {
        let s = c.checked_mul(CHUNK_SIZE as u64)? as usize;
        self.maps[i].bytes().get(s..s + CHUNK_SIZE)
    }

    /// Copies `out.len()` bytes of image `i` from chunk `c` on into `out`, zeros past the end.
    pub(crate) fn read_padded(&self, i: usize, c: u64, out: &mut [u8]) {
        let bytes = self.maps[i].bytes();
        let s = (c as usize).saturating_mul(CHUNK_SIZE).min(bytes.len());
        let n = out.len().min(bytes.len() - s);
        out[..n].copy_from_slice(&bytes[s..s + n]);
        out[n..].fill(0);
    }

    /// The open files of the images, for reading with `pread` ([`read_padded_at`]) where a map
    /// would cost page faults and their unmapping: applying reads base chunks once each,
    /// scattered. Shared, for threads that outlive a borrow of the base.
    pub(crate) fn files(&self) -> &Arc<[File]> {
        &self.files
    }

    /// The open file of image `i` (see [`Base::files`]).
    pub(crate) fn file(&self, i: usize) -> &File {
        &self.files[i]
    }

    /// Whether chunk `c` of image `i`, cut to `len` bytes, is all zeros in the base.
    pub(crate) fn chunk_is_zero(&self, i: usize, c: u64, len: usize) -> bool {
        let img = &self.index.images()[i];
        if len == CHUNK_SIZE {
            if let Some(h) = img.hashes.get(c as usize) {
                if (c + 1) * CHUNK_SIZE as u64 <= img.size {
                    return *h == ChunkHash::zero();
                }
            }
        }
        let bytes = self.maps[i].bytes();
        let s = (c as usize).saturating_mul(CHUNK_SIZE).min(bytes.len());
        let e = (s + len).min(bytes.len());
        overlay_format::digest::is_zero(&bytes[s..e])
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
/// the file (like [`Base::read_padded`], without touching a map).
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
