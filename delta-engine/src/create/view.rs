//! Source views: the custom VM's images as the scan reads them. A raw file is read only in
//! its data extents (holes read as zeros); a qcow2 layer over the base image only in the
//! clusters it allocated (the rest equals the base by construction).

use std::borrow::Cow;
use std::fs::File;
use std::path::PathBuf;

use overlay_format::CHUNK_SIZE;

use super::{CreateError, CustomImage, CustomSource};
use crate::base::{read_padded_at, Base};
use crate::file::data_extents;
use crate::qcow2::{Located, Qcow2Layer};

/// A custom image as the scan sees it.
pub(super) enum View {
    /// A raw file, read with `pread` (see [`Base`] for why not through a map); only its data
    /// extents are read.
    Raw {
        file: File,
        path: PathBuf,
        size: u64,
        extents: Vec<(u64, u64)>,
    },
    Qcow2(Qcow2Layer),
}

/// What a custom chunk is, before classification.
pub(super) enum Src<'a> {
    /// Reads as zeros (a hole, a zero cluster).
    Zeros,
    /// Equals the base's chunk at the same offset (an unallocated qcow2 cluster).
    Backing,
    /// Bytes to classify.
    Data(Cow<'a, [u8]>),
}

impl View {
    /// Views of `custom`, in the order of the base's images; each base image must have exactly
    /// one custom image of its name.
    pub(super) fn open_all(base: &Base, custom: &[CustomImage]) -> Result<Vec<View>, CreateError> {
        let idx = base.index();
        if custom.len() != idx.images().len() {
            return Err(CreateError::Mismatch {
                reason: format!("{} custom images for {} base images", custom.len(), idx.images().len()),
            });
        }
        let mut views = Vec::with_capacity(custom.len());
        for (ii, bi) in idx.images().iter().enumerate() {
            let Some(ci) = custom.iter().find(|c| c.name == bi.name) else {
                return Err(CreateError::Mismatch { reason: format!("no custom image for base image '{}'", bi.name) });
            };
            views.push(match &ci.source {
                CustomSource::Raw(path) => View::open(path, false, base, ii)?,
                CustomSource::Qcow2(path) => View::open(path, true, base, ii)?,
            });
        }
        Ok(views)
    }

    fn open(path: &std::path::Path, qcow2: bool, base: &Base, ii: usize) -> Result<Self, CreateError> {
        if !qcow2 {
            let io = |source| CreateError::Io { path: path.into(), source };
            let file = File::open(path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            let extents = data_extents(&file, size);
            return Ok(View::Raw { file, path: path.into(), size, extents });
        }
        let l = Qcow2Layer::open(path).map_err(|e| CreateError::Mismatch { reason: e.to_string() })?;
        let base_path = base.path(ii);
        let same = match l.backing_path() {
            Some(b) => match (std::fs::metadata(&b), std::fs::metadata(base_path)) {
                (Ok(x), Ok(y)) => {
                    use std::os::unix::fs::MetadataExt;
                    x.dev() == y.dev() && x.ino() == y.ino()
                }
                _ => false,
            },
            None => false,
        };
        if !same || l.backing_format().is_some_and(|f| f != "raw") {
            return Err(CreateError::Mismatch {
                reason: format!(
                    "{}: its backing file {:?} (format {:?}) is not the base image {} (raw)",
                    path.display(),
                    l.backing_file(),
                    l.backing_format(),
                    base_path.display()
                ),
            });
        }
        Ok(View::Qcow2(l))
    }

    pub(super) fn size(&self) -> u64 {
        match self {
            View::Raw { size, .. } => *size,
            View::Qcow2(l) => l.virtual_size(),
        }
    }

    /// Reads what [`View::chunk_in`] needs of chunks `c0..c1` into `buf`: a raw image's data
    /// extents there (holes are not read), a qcow2 layer's allocated chunks (in runs that lie
    /// one after the other in its file).
    pub(super) fn load(&self, c0: u64, c1: u64, buf: &mut Vec<u8>) -> Result<(), CreateError> {
        let (s, e) = (c0 * CHUNK_SIZE as u64, (c1 * CHUNK_SIZE as u64).min(self.size()));
        buf.resize((e - s) as usize, 0);
        match self {
            View::Raw { file, path, extents, .. } => {
                let first = extents.partition_point(|&(_, end)| end <= s);
                for &(a, b) in extents[first..].iter().take_while(|&&(a, _)| a < e) {
                    let (a, b) = (a.max(s), b.min(e));
                    read_padded_at(file, a, &mut buf[(a - s) as usize..(b - s) as usize])
                        .map_err(|source| CreateError::Io { path: path.clone(), source })?;
                }
            }
            View::Qcow2(l) => {
                let mut c = c0;
                while c < c1 {
                    let Located::At(host) = l.locate(c) else {
                        c += 1;
                        continue;
                    };
                    let first = c;
                    c += 1;
                    while c < c1 && l.locate(c) == Located::At(host + (c - first) * CHUNK_SIZE as u64) {
                        c += 1;
                    }
                    let (a, b) = ((first - c0) as usize * CHUNK_SIZE, ((c - c0) as usize * CHUNK_SIZE).min(buf.len()));
                    read_padded_at(l.file(), host, &mut buf[a..b])
                        .map_err(|source| CreateError::Io { path: l.path().to_path_buf(), source })?;
                }
            }
        }
        Ok(())
    }

    /// Chunk `c` (`len` bytes), from `buf` as [`View::load`] filled it for chunks from `c0` on.
    pub(super) fn chunk_in<'a>(&'a self, c: u64, len: usize, c0: u64, buf: &'a [u8]) -> Src<'a> {
        match self {
            View::Raw { extents, .. } => {
                let off = c * CHUNK_SIZE as u64;
                let p = extents.partition_point(|&(a, _)| a <= off);
                if p > 0 && off < extents[p - 1].1 {
                    let s = ((c - c0) * CHUNK_SIZE as u64) as usize;
                    Src::Data(Cow::Borrowed(&buf[s..s + len]))
                } else {
                    Src::Zeros
                }
            }
            View::Qcow2(l) => match l.locate(c) {
                Located::Backing => Src::Backing,
                Located::Zero => Src::Zeros,
                Located::At(_) => {
                    let s = ((c - c0) * CHUNK_SIZE as u64) as usize;
                    Src::Data(Cow::Borrowed(&buf[s..s + len]))
                }
            },
        }
    }

    /// Appends the bytes of `count` chunks from chunk `c` on to `out` (the image's tail may
    /// make them fewer).
    pub(super) fn read(&self, c: u64, count: u64, out: &mut Vec<u8>) -> Result<(), CreateError> {
        let size = self.size();
        let s = c * CHUNK_SIZE as u64;
        let e = ((c + count) * CHUNK_SIZE as u64).min(size);
        let at = out.len();
        out.resize(at + (e - s) as usize, 0);
        match self {
            View::Raw { file, path, .. } => {
                read_padded_at(file, s, &mut out[at..]).map_err(|source| CreateError::Io { path: path.clone(), source })
            }
            View::Qcow2(l) => {
                for (k, o) in (c..c + count).zip(out[at..].chunks_mut(CHUNK_SIZE)) {
                    match l.locate(k) {
                        Located::At(host) => read_padded_at(l.file(), host, o)
                            .map_err(|source| CreateError::Io { path: l.path().to_path_buf(), source })?,
                        Located::Zero | Located::Backing => o.fill(0),
                    }
                }
                Ok(())
            }
        }
    }
}
