//! The base index: per-position chunk hashes of every base image, and the hash -> location map
//! over the base's distinct non-zero chunks, used to find dedup sources.
//!
//! On disk (all integers little-endian):
//!
//! ```text
//! magic "CLDINDX1" (8) | image_count u32
//! per image: name_len u16 | name | kind u8 (0 memory, 1 disk) | size u64 | digest [32]
//!            | chunk_count u64 (= ceil(size / 4096)) | chunk hashes [16 * chunk_count]
//! checksum: blake3 of everything above [32]
//! ```
//!
//! That is 4 MiB per GiB of base image (16 bytes per 4 KiB chunk) plus a few bytes per image.
//! The lookup map is rebuilt from the hashes the first time it is needed (creating an overlay
//! needs it, applying one does not); in memory it costs about 32 bytes per distinct non-zero
//! chunk (at most 8 MiB per GiB of base) on top of the hashes.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use overlay_format::{ChunkHash, ChunkRef, ImageDigest, ImageKind, CHUNK_SIZE, MAX_IMAGES, MAX_IMAGE_SIZE};
use rayon::prelude::*;

use crate::file::data_extents;

const MAGIC: &[u8; 8] = b"CLDINDX1";

/// Error building, loading or saving an index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// A file could not be read or written.
    #[error("{path}: I/O error")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The index file is damaged or not an index.
    #[error("{path}: corrupt index at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset of the problem.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The images given do not fit the format's limits.
    #[error("invalid base images: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
}

/// One base image to index.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// `memory` or the disk's name.
    pub name: String,
    /// Memory or disk.
    pub kind: ImageKind,
    /// The image file (raw).
    pub path: PathBuf,
}

/// The hashes of one indexed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedImage {
    /// Image name.
    pub name: String,
    /// Memory or disk.
    pub kind: ImageKind,
    /// Size in bytes.
    pub size: u64,
    /// [`ImageDigest`] of the image.
    pub digest: ImageDigest,
    /// Hash of every chunk, in order.
    pub hashes: Vec<ChunkHash>,
}

#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Lookup = HashMap<u64, ChunkRef, BuildHasherDefault<IdHasher>>;

fn key(h: &ChunkHash) -> u64 {
    u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"))
}

/// Hashes of every chunk of a base VM's images, plus a map from chunk content to a location.
pub struct BaseIndex {
    images: Vec<IndexedImage>,
    /// Built at the first [`BaseIndex::find`].
    lookup: std::sync::OnceLock<Lookup>,
}

impl std::fmt::Debug for BaseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseIndex")
            .field("images", &self.images.iter().map(|i| (&i.name, i.size)).collect::<Vec<_>>())
            .field("lookup_built", &self.lookup.get().is_some())
            .finish()
    }
}

/// Chunk hashes of one file, read with `pread` (see [`Base`](crate::Base) for why not
/// through a map) and hashed in parallel; holes hash as zero without being read.
pub(crate) fn hash_file(path: &Path, progress: &(dyn Fn(u64) + Sync)) -> io::Result<(u64, Vec<ChunkHash>)> {
    const PIECE: usize = 256;
    thread_local! {
        /// A piece's bytes, kept by each thread of the pool from piece to piece.
        static PIECE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let n = len.div_ceil(CHUNK_SIZE as u64) as usize;
    let mut hashes = vec![ChunkHash::zero(); n];
    for (start, end) in data_extents(&file, len) {
        let (c0, c1) = ((start / CHUNK_SIZE as u64) as usize, (end.div_ceil(CHUNK_SIZE as u64)) as usize);
        hashes[c0..c1].par_chunks_mut(PIECE).enumerate().try_for_each(|(i, hs)| {
            let s = ((c0 + i * PIECE) * CHUNK_SIZE) as u64;
            let e = (s + (hs.len() * CHUNK_SIZE) as u64).min(len);
            PIECE_BUFFER.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.resize((e - s) as usize, 0);
                crate::base::read_padded_at(&file, s, &mut buf)?;
                overlay_format::digest::hash_chunks(&buf, hs);
                io::Result::Ok(())
            })?;
            progress((hs.len() * CHUNK_SIZE) as u64);
            io::Result::Ok(())
        })?;
    }
    // The last chunk of an image whose size is not a multiple of 4 KiB is short: hashed even in
    // a hole.
    if len % CHUNK_SIZE as u64 != 0 {
        let start = ((n - 1) * CHUNK_SIZE) as u64;
        let mut last = vec![0u8; (len - start) as usize];
        crate::base::read_padded_at(&file, start, &mut last)?;
        hashes[n - 1] = ChunkHash::of(&last);
    }
    Ok((len, hashes))
}

impl BaseIndex {
    /// Hashes every image (in parallel) and builds the lookup map. `progress` receives bytes
    /// hashed (holes are skipped and not reported).
    pub fn build(images: &[BaseImage], progress: &(dyn Fn(u64) + Sync)) -> Result<Self, IndexError> {
        if images.is_empty() || images.len() > MAX_IMAGES {
            return Err(IndexError::Invalid { reason: format!("{} images, 1 to {MAX_IMAGES} allowed", images.len()) });
        }
        let mut out = Vec::with_capacity(images.len());
        for img in images {
            if img.name.is_empty() || img.name.len() > 255 || out.iter().any(|o: &IndexedImage| o.name == img.name) {
                return Err(IndexError::Invalid { reason: format!("bad or duplicate image name '{}'", img.name) });
            }
            let (size, hashes) =
                hash_file(&img.path, progress).map_err(|source| IndexError::Io { path: img.path.clone(), source })?;
            if size > MAX_IMAGE_SIZE {
                return Err(IndexError::Invalid {
                    reason: format!("{} is larger than {MAX_IMAGE_SIZE} bytes", img.name),
                });
            }
            let digest = ImageDigest::from_chunk_hashes(hashes.iter().copied());
            out.push(IndexedImage { name: img.name.clone(), kind: img.kind, size, digest, hashes });
        }
        Ok(Self::from_images(out))
    }

    fn from_images(images: Vec<IndexedImage>) -> Self {
        BaseIndex { images, lookup: std::sync::OnceLock::new() }
    }

    fn lookup(&self) -> &Lookup {
        self.lookup.get_or_init(|| {
            let zero = ChunkHash::zero();
            let total: usize = self.images.iter().map(|i| i.hashes.len()).sum();
            let mut lookup = Lookup::with_capacity_and_hasher(total / 2, Default::default());
            for (ii, img) in self.images.iter().enumerate() {
                let full = img.size / CHUNK_SIZE as u64;
                for (c, h) in img.hashes.iter().enumerate().take(full as usize) {
                    if *h != zero {
                        lookup.entry(key(h)).or_insert(ChunkRef { image: ii as u8, chunk: c as u64 });
                    }
                }
            }
            lookup
        })
    }

    /// The indexed images, in order.
    pub fn images(&self) -> &[IndexedImage] {
        &self.images
    }

    /// Position of the image called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.images.iter().position(|i| i.name == name)
    }

    /// A base location whose chunk hash starts like `hash` (the caller checks the bytes).
    pub fn find(&self, hash: &ChunkHash) -> Option<ChunkRef> {
        let r = self.lookup().get(&key(hash)).copied()?;
        (self.images[r.image as usize].hashes[r.chunk as usize] == *hash).then_some(r)
    }

    /// Number of distinct non-zero full chunks in the base.
    pub fn distinct_chunks(&self) -> usize {
        self.lookup().len()
    }

    /// Size of the saved index file in bytes.
    pub fn file_size(&self) -> u64 {
        8 + 4
            + self
                .images
                .iter()
                .map(|i| 2 + i.name.len() as u64 + 1 + 8 + 32 + 8 + 16 * i.hashes.len() as u64)
                .sum::<u64>()
            + 32
    }

    /// Writes the index to `path` (via a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), IndexError> {
        let io_err = |source| IndexError::Io { path: path.to_owned(), source };
        let tmp = path.with_extension("partial");
        let f = File::create(&tmp).map_err(io_err)?;
        let mut w = HashingWriter { inner: BufWriter::with_capacity(1 << 20, f), hasher: blake3::Hasher::new() };
        let res = (|| -> io::Result<()> {
            w.write_all(MAGIC)?;
            w.write_all(&(self.images.len() as u32).to_le_bytes())?;
            for img in &self.images {
                w.write_all(&(img.name.len() as u16).to_le_bytes())?;
                w.write_all(img.name.as_bytes())?;
                w.write_all(&[match img.kind {
                    ImageKind::Memory => 0,
                    ImageKind::Disk => 1,
                }])?;
                w.write_all(&img.size.to_le_bytes())?;
                w.write_all(&img.digest.0)?;
                w.write_all(&(img.hashes.len() as u64).to_le_bytes())?;
                for h in &img.hashes {
                    w.write_all(&h.0)?;
                }
            }
            let sum = w.hasher.finalize();
            w.inner.write_all(sum.as_bytes())?;
            let f = w.inner.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        std::fs::rename(&tmp, path).map_err(io_err)
    }

    /// Reads an index written by [`BaseIndex::save`], checking its structure and checksum.
    pub fn load(path: &Path) -> Result<Self, IndexError> {
        let io_err = |source| IndexError::Io { path: path.to_owned(), source };
        let f = File::open(path).map_err(io_err)?;
        let file_len = f.metadata().map_err(io_err)?.len();
        let mut r =
            CountingReader { inner: BufReader::with_capacity(1 << 20, f), hasher: blake3::Hasher::new(), pos: 0 };
        let corrupt = |offset: u64, reason: String| IndexError::Corrupt { path: path.to_owned(), offset, reason };
        let read = |r: &mut CountingReader<_>, buf: &mut [u8]| -> Result<(), IndexError> {
            let at = r.pos;
            r.read_exact(buf).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    corrupt(at, "file ends early".into())
                } else {
                    io_err(e)
                }
            })
        };
        let mut magic = [0u8; 8];
        read(&mut r, &mut magic)?;
        if &magic != MAGIC {
            return Err(corrupt(0, "not a base index (bad magic)".into()));
        }
        let mut b4 = [0u8; 4];
        read(&mut r, &mut b4)?;
        let count = u32::from_le_bytes(b4) as usize;
        if count == 0 || count > MAX_IMAGES {
            return Err(corrupt(8, format!("{count} images")));
        }
        let mut images: Vec<IndexedImage> = Vec::with_capacity(count);
        for _ in 0..count {
            let mut b2 = [0u8; 2];
            let at = r.pos;
            read(&mut r, &mut b2)?;
            let nlen = u16::from_le_bytes(b2) as usize;
            if nlen == 0 || nlen > 255 {
                return Err(corrupt(at, format!("image name of {nlen} bytes")));
            }
            let mut name = vec![0u8; nlen];
            read(&mut r, &mut name)?;
            let name = String::from_utf8(name).map_err(|_| corrupt(at, "image name is not UTF-8".into()))?;
            let mut kind = [0u8; 1];
            let at = r.pos;
            read(&mut r, &mut kind)?;
            let kind = match kind[0] {
                0 => ImageKind::Memory,
                1 => ImageKind::Disk,
                k => return Err(corrupt(at, format!("unknown image kind {k}"))),
            };
            let mut b8 = [0u8; 8];
            let at = r.pos;
            read(&mut r, &mut b8)?;
            let size = u64::from_le_bytes(b8);
            if size > MAX_IMAGE_SIZE {
                return Err(corrupt(at, format!("image size {size}")));
            }
            let mut digest = [0u8; 32];
            read(&mut r, &mut digest)?;
            let at = r.pos;
            read(&mut r, &mut b8)?;
            let n = u64::from_le_bytes(b8);
            if n != size.div_ceil(CHUNK_SIZE as u64) {
                return Err(corrupt(at, format!("{n} chunk hashes for {size} bytes")));
            }
            if n * 16 > file_len.saturating_sub(r.pos) {
                return Err(corrupt(at, format!("{n} chunk hashes do not fit in the file")));
            }
            let mut raw = vec![0u8; (n * 16) as usize];
            read(&mut r, &mut raw)?;
            let hashes: Vec<ChunkHash> =
                raw.chunks_exact(16).map(|c| ChunkHash(c.try_into().expect("16 bytes"))).collect();
            if ImageDigest::from_chunk_hashes(hashes.iter().copied()).0 != digest {
                return Err(corrupt(at, format!("digest of image '{name}' does not match its chunk hashes")));
            }
            if images.iter().any(|i| i.name == name) {
                return Err(corrupt(at, format!("image '{name}' appears twice")));
            }
            images.push(IndexedImage { name, kind, size, digest: ImageDigest(digest), hashes });
        }
        let expect = r.hasher.finalize();
        let mut sum = [0u8; 32];
        let at = r.pos;
        r.inner.read_exact(&mut sum).map_err(|_| corrupt(at, "checksum missing".into()))?;
        if sum != *expect.as_bytes() {
            return Err(corrupt(at, "checksum mismatch".into()));
        }
        let mut extra = [0u8; 1];
        if r.inner.read(&mut extra).map_err(io_err)? != 0 {
            return Err(corrupt(at + 32, "data after the checksum".into()));
        }
        Ok(Self::from_images(images))
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct CountingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    pos: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}
