//! Reading the top layer of a qcow2 image over a base disk: which guest clusters the layer
//! allocated, and their bytes. Clusters the layer did not allocate read from the backing file,
//! i.e. they equal the base, so overlay creation costs what changed, not the disk's size.
//!
//! The file is untrusted: every offset and size in the header and the tables is checked
//! against the file's length before use. Supported: qcow2 versions 2 and 3, cluster sizes of
//! 4 KiB to 2 MiB, standard (not extended) L2 entries, no encryption, no external data file, no
//! compressed clusters (QEMU never writes those for guest writes).

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use overlay_format::CHUNK_SIZE;

use crate::file::Mapped;

const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// L1 tables larger than this are refused (a 64 KiB-cluster image of 256 TiB needs 4 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// A qcow2 file that cannot be read as a top layer.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct Qcow2Error {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with the offset where it applies.
    pub reason: String,
}

/// What a guest chunk of the layer reads as.
#[derive(Debug)]
pub enum LayerChunk<'a> {
    /// Not allocated in this layer: read from the backing file (the base).
    Backing,
    /// Allocated as zeros.
    Zero,
    /// Data in this layer.
    Data(Cow<'a, [u8]>),
}

/// Where a guest chunk of the layer is ([`Qcow2Layer::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Located {
    /// Not allocated in this layer.
    Backing,
    /// Allocated as zeros.
    Zero,
    /// At this offset of the layer's file (bytes past its end read as zeros).
    At(u64),
}

/// The top layer of a qcow2 image, mapped.
pub struct Qcow2Layer {
    path: PathBuf,
    file: File,
    map: Mapped,
    virtual_size: u64,
    cluster_bits: u32,
    /// Guest clusters this layer allocated, ascending: (guest cluster, 1 = zeros, else the host
    /// offset of its data). Sparse, so its size is bounded by the file's L2 tables.
    clusters: Vec<(u64, u64)>,
    backing_file: Option<String>,
    backing_format: Option<String>,
}

impl std::fmt::Debug for Qcow2Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Layer")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("cluster_bits", &self.cluster_bits)
            .field("backing_file", &self.backing_file)
            .finish()
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `path` starts with the qcow2 magic.
pub fn is_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut m = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut m)).is_ok() && u32::from_be_bytes(m) == MAGIC
}

impl Qcow2Layer {
    /// Maps `path` and reads its header, L1 and L2 tables.
    pub fn open(path: &Path) -> Result<Self, Qcow2Error> {
        let err = |reason: String| Qcow2Error { path: path.to_owned(), reason };
        let (file, map) = Mapped::open(path).map_err(|e| err(e.to_string()))?;
        let b = map.bytes();
        let file_len = b.len() as u64;
        let short = || err(format!("{file_len} bytes: too short for a qcow2 header"));
        if be32(b, 0).ok_or_else(short)? != MAGIC {
            return Err(err("not a qcow2 image (bad magic)".into()));
        }
        let version = be32(b, 4).ok_or_else(short)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!("qcow2 version {version} is not supported (2 or 3)")));
        }
        let backing_offset = be64(b, 8).ok_or_else(short)?;
        let backing_size = be32(b, 16).ok_or_else(short)?;
        let cluster_bits = be32(b, 20).ok_or_else(short)?;
        let virtual_size = be64(b, 24).ok_or_else(short)?;
        let crypt = be32(b, 32).ok_or_else(short)?;
        let l1_size = be32(b, 36).ok_or_else(short)? as u64;
        let l1_offset = be64(b, 40).ok_or_else(short)?;
        if !(12..=21).contains(&cluster_bits) {
            return Err(err(format!(
                "cluster size 2^{cluster_bits} is not supported (4 KiB to 2 MiB, to map 4 KiB chunks)"
            )));
        }
        if crypt != 0 {
            return Err(err("encrypted images are not supported".into()));
        }
        let mut header_len = 72usize;
        if version == 3 {
            let incompatible = be64(b, 72).ok_or_else(short)?;
            let names = [
                (0, "dirty (run `qemu-img check -r all`)"),
                (1, "corrupt"),
                (2, "external data file"),
                (4, "extended L2 entries"),
            ];
            for (bit, what) in names {
                if incompatible & (1 << bit) != 0 {
                    return Err(err(format!("incompatible feature: {what}")));
                }
            }
            if incompatible & !0b1_1111 != 0 {
                return Err(err(format!("unknown incompatible features {incompatible:#x}")));
            }
            header_len = be32(b, 100).ok_or_else(short)? as usize;
            if !(104..=4096).contains(&header_len) {
                return Err(err(format!("header length {header_len} out of range")));
            }
        }
        let cluster = 1u64 << cluster_bits;
        let l2_entries = cluster / 8;
        let n_clusters = virtual_size.div_ceil(cluster);
        let needed_l1 = n_clusters.div_ceil(l2_entries);
        if l1_size < needed_l1 {
            return Err(err(format!("L1 table of {l1_size} entries cannot map {virtual_size} bytes")));
        }
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(err(format!("L1 table of {l1_size} entries is larger than supported")));
        }
        let in_file = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len);
        if !l1_offset.is_multiple_of(cluster) || !in_file(l1_offset, needed_l1 * 8) {
            return Err(err(format!("L1 table at {l1_offset} lies outside the file or is misaligned")));
        }
        // Header extensions (backing format).
        let mut backing_format = None;
        let mut at = header_len;
        while let (Some(ty), Some(len)) = (be32(b, at), be32(b, at + 4)) {
            if ty == 0 {
                break;
            }
            let len = len as usize;
            let data = b.get(at + 8..at + 8 + len).ok_or_else(|| err(format!("header extension at {at} overruns")))?;
            if ty == EXT_BACKING_FORMAT {
                backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            at = at + 8 + len.div_ceil(8) * 8;
            if at > cluster as usize {
                return Err(err("header extensions overrun the first cluster".into()));
            }
        }
        let backing_file = if backing_offset != 0 {
            if backing_size > 1023 || !in_file(backing_offset, backing_size as u64) {
                return Err(err(format!("backing file name at {backing_offset} is out of bounds")));
            }
            let s = backing_offset as usize;
            Some(String::from_utf8_lossy(&b[s..s + backing_size as usize]).into_owned())
        } else {
            None
        };
        let mut clusters = Vec::new();
        for l1i in 0..needed_l1 {
            let e = be64(b, (l1_offset + l1i * 8) as usize).ok_or_else(short)?;
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cluster) || !in_file(l2, cluster) {
                return Err(err(format!("L1 entry {l1i}: L2 table at {l2} lies outside the file or is misaligned")));
            }
            for k in 0..l2_entries {
                let gc = l1i * l2_entries + k;
                if gc >= n_clusters {
                    break;
                }
                let e = be64(b, (l2 + k * 8) as usize).ok_or_else(short)?;
                if e & L2_COMPRESSED != 0 {
                    return Err(err(format!("guest cluster {gc} is compressed (not supported)")));
                }
                let off = e & OFFSET_MASK;
                if version == 3 && e & L2_ZERO != 0 {
                    clusters.push((gc, 1));
                } else if off != 0 {
                    if !off.is_multiple_of(cluster) || off >= file_len {
                        return Err(err(format!(
                            "guest cluster {gc}: data at {off} lies outside the file or is misaligned"
                        )));
                    }
                    clusters.push((gc, off));
                }
            }
        }
        Ok(Qcow2Layer {
            path: path.to_owned(),
            file,
            map,
            virtual_size,
            cluster_bits,
            clusters,
            backing_file,
            backing_format,
        })
    }

    /// The guest-visible size.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The backing file name as stored (relative names are relative to the image's directory).
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }

    /// The backing file's format, when the image records it.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    /// The backing file resolved against the image's directory.
    pub fn backing_path(&self) -> Option<PathBuf> {
        let b = Path::new(self.backing_file.as_deref()?);
        Some(if b.is_absolute() { b.to_owned() } else { self.path.parent().unwrap_or(Path::new(".")).join(b) })
    }

    /// Bytes of guest data this layer holds (allocated data and zero clusters).
    pub fn allocated_bytes(&self) -> u64 {
        self.clusters.len() as u64 * (1 << self.cluster_bits)
    }

    /// The layer's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The layer's open file, to read the data [`Qcow2Layer::locate`] finds with `pread`.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Where guest chunk `c` is.
    pub(crate) fn locate(&self, c: u64) -> Located {
        let off = c * CHUNK_SIZE as u64;
        let gc = off >> self.cluster_bits;
        match self.clusters.binary_search_by_key(&gc, |&(g, _)| g) {
            Err(_) => Located::Backing,
            Ok(i) => match self.clusters[i].1 {
                1 => Located::Zero,
                host => Located::At(host + (off & ((1 << self.cluster_bits) - 1))),
            },
        }
    }

    /// Guest chunk `c` (4 KiB; `len` bytes, shorter at the image's end).
    pub fn chunk(&self, c: u64, len: usize) -> LayerChunk<'_> {
        let off = c * CHUNK_SIZE as u64;
        let gc = off >> self.cluster_bits;
        let Ok(i) = self.clusters.binary_search_by_key(&gc, |&(g, _)| g) else {
            return LayerChunk::Backing;
        };
        match self.clusters[i].1 {
            1 => LayerChunk::Zero,
            host => {
                let at = (host + (off & ((1 << self.cluster_bits) - 1))) as usize;
                let b = self.map.bytes();
                match b.get(at..at + len) {
                    Some(s) => LayerChunk::Data(Cow::Borrowed(s)),
                    None => {
                        // The cluster's tail lies past the end of the file: it reads as zeros.
                        let mut v = vec![0u8; len];
                        if at < b.len() {
                            let n = b.len() - at;
                            v[..n].copy_from_slice(&b[at..]);
                        }
                        LayerChunk::Data(Cow::Owned(v))
                    }
                }
            }
        }
    }
}

/// Writes a qcow2 (v3, 4 KiB clusters) layer over a raw backing file holding only the chunks
/// written to it: chunks are whole clusters, so a changed chunk costs one cluster and nothing
/// is copied from the base. Data clusters are appended as they arrive; the tables and refcounts
/// go after them in [`Qcow2Writer::finish`].
pub(crate) struct Qcow2Writer {
    file: File,
    size: u64,
    backing: String,
    /// Per guest cluster: 0 unallocated (reads the backing file), 1 zero without a host
    /// cluster, `host | 1` zero with a host cluster, `host` data. It grows as clusters are
    /// written, never up front: clusters past its end are unallocated.
    map: Vec<u64>,
    /// Clusters of the backing file (past them, an unallocated cluster reads zeros). `map`
    /// covers at most these; the entries of the clusters past them (a grown disk) are in `far`,
    /// only for the clusters written.
    backing_clusters: u64,
    far: std::collections::BTreeMap<u64, u64>,
    next: u64,
    finished: bool,
    /// Data clusters are appended in order, so their writes mostly continue one another.
    wb: crate::file::WriteBuf,
}

const CLUSTER: u64 = CHUNK_SIZE as u64;
const COPIED: u64 = 1 << 63;

/// What a chunk of a [`Qcow2Writer`] reads as.
pub(crate) enum Written {
    /// Not written: the backing file's bytes.
    Backing,
    /// Zeros.
    Zero,
    /// Data at this host offset.
    At(u64),
}

impl Qcow2Writer {
    /// Creates `path` (truncating it) for a layer of `size` guest bytes over `backing`.
    pub(crate) fn create(path: &Path, size: u64, backing: &Path) -> std::io::Result<Self> {
        let backing = std::fs::canonicalize(backing)?.to_string_lossy().into_owned();
        if backing.len() > 1023 {
            return Err(std::io::Error::other("backing file path longer than 1023 bytes"));
        }
        let backing_clusters = std::fs::metadata(&backing)?.len().div_ceil(CLUSTER);
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        Ok(Qcow2Writer {
            file,
            size,
            backing,
            map: Vec::new(),
            backing_clusters,
            far: Default::default(),
            next: CLUSTER,
            finished: false,
            wb: crate::file::WriteBuf::default(),
        })
    }

    pub(crate) fn state(&self, c: u64) -> Written {
        match self.get(c) {
            0 => Written::Backing,
            e if e & 1 == 1 => Written::Zero,
            host => Written::At(host),
        }
    }

    /// Writes whole chunks from chunk `c` on (`data` may end short at the image's end).
    pub(crate) fn write(&mut self, c: u64, data: &[u8]) -> std::io::Result<()> {
        let n = data.len().div_ceil(CHUNK_SIZE) as u64;
        let mut k = 0u64;
        while k < n {
            // Coalesce a run of chunks that land on consecutive host clusters.
            let host0 = self.host_for(c + k);
            let mut run = 1u64;
            while k + run < n {
                let expect = host0 + run * CLUSTER;
                let e = self.get(c + k + run);
                let fits = if e & !1 == 0 { self.next == expect } else { e & !1 == expect };
                if !fits {
                    break;
                }
                self.host_for(c + k + run);
                run += 1;
            }
            let s = (k as usize) * CHUNK_SIZE;
            let e = ((k + run) as usize * CHUNK_SIZE).min(data.len());
            self.wb.write(&self.file, host0, &data[s..e])?;
            k += run;
        }
        Ok(())
    }

    /// The host cluster of chunk `c`, allocating one at the end if it has none; marks it data.
    fn host_for(&mut self, c: u64) -> u64 {
        let next = self.next;
        let e = self.entry(c);
        let host = *e & !1;
        if host != 0 {
            *e = host;
            return host;
        }
        *e = next;
        self.next += CLUSTER;
        next
    }

    /// Makes chunks `c..c + count` read as zeros.
    pub(crate) fn zero(&mut self, c: u64, count: u64) {
        // Past both the map and the backing file, a cluster already reads zeros: the map does
        // not grow for them (a zero record over a large grown disk costs nothing).
        let end = c.saturating_add(count);
        for k in c..end.min(self.backing_clusters) {
            let e = self.entry(k);
            *e = if *e == 0 { 1 } else { *e | 1 };
        }
        // Past the backing file only the clusters written have entries (never 0).
        for (_, e) in self.far.range_mut(c.max(self.backing_clusters)..end.max(self.backing_clusters)) {
            *e |= 1;
        }
    }

    /// The map entry of guest cluster `c`.
    fn get(&self, c: u64) -> u64 {
        if c < self.backing_clusters {
            self.map.get(c as usize).copied().unwrap_or(0)
        } else {
            self.far.get(&c).copied().unwrap_or(0)
        }
    }

    /// The map entry of guest cluster `c`, growing the map to it. The caller bounds `c` by the
    /// image's size.
    fn entry(&mut self, c: u64) -> &mut u64 {
        if c >= self.backing_clusters {
            return self.far.entry(c).or_insert(0);
        }
        let c = c as usize;
        if c >= self.map.len() {
            self.map.resize(c + 1, 0);
        }
        &mut self.map[c]
    }

    /// The file (complete once [`Qcow2Writer::finish`] returned).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf.len()` bytes of data at host offset `at`.
    pub(crate) fn read_at(&mut self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        self.wb.read_at(&self.file, buf, at)
    }

    /// The map entries of L2 table `g`.
    fn group(&self, g: usize) -> Vec<u64> {
        let per_l2 = CLUSTER / 8;
        let first = g as u64 * per_l2;
        (first..(first + per_l2).min(self.size.div_ceil(CLUSTER))).map(|c| self.get(c)).collect()
    }

    /// Writes the L2 tables, the L1 table, the refcounts and the header (once).
    pub(crate) fn finish(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.wb.flush(&self.file)?;
        let per_l2 = (CLUSTER / 8) as usize;
        let l1_entries = (self.size.div_ceil(CLUSTER) as usize).div_ceil(per_l2).max(1);
        let l1_clusters = (l1_entries as u64 * 8).div_ceil(CLUSTER);
        let mut groups: Vec<usize> = (0..self.map.len().div_ceil(per_l2))
            .filter(|&g| self.map[g * per_l2..((g + 1) * per_l2).min(self.map.len())].iter().any(|&e| e != 0))
            .collect();
        groups.extend(self.far.keys().map(|&c| (c / per_l2 as u64) as usize));
        groups.dedup();
        let data_clusters = self.next / CLUSTER; // header + data
        let fixed = data_clusters + groups.len() as u64 + l1_clusters;
        let per_rb = CLUSTER / 2; // 16-bit refcounts
        let (mut rb, mut rt) = (1u64, 1u64);
        loop {
            let total = fixed + rt + rb;
            let need_rb = total.div_ceil(per_rb);
            let need_rt = (need_rb * 8).div_ceil(CLUSTER);
            if need_rb <= rb && need_rt <= rt {
                break;
            }
            rb = rb.max(need_rb);
            rt = rt.max(need_rt);
        }
        let total = fixed + rt + rb;
        // L2 tables.
        let mut at = self.next;
        let mut l1 = vec![0u8; (l1_clusters * CLUSTER) as usize];
        for &g in &groups {
            let mut l2 = vec![0u8; CLUSTER as usize];
            for (k, e) in self.group(g).into_iter().enumerate() {
                let v = match e {
                    0 => 0,
                    1 => 1,
                    e if e & 1 == 1 => e | COPIED,
                    host => host | COPIED,
                };
                l2[k * 8..k * 8 + 8].copy_from_slice(&v.to_be_bytes());
            }
            self.file.write_all_at(&l2, at)?;
            l1[g * 8..g * 8 + 8].copy_from_slice(&(at | COPIED).to_be_bytes());
            at += CLUSTER;
        }
        let l1_offset = at;
        self.file.write_all_at(&l1, l1_offset)?;
        at += l1_clusters * CLUSTER;
        // Refcount table and blocks: every cluster of the file is used exactly once.
        let rt_offset = at;
        let rb_offset = rt_offset + rt * CLUSTER;
        let mut table = vec![0u8; (rt * CLUSTER) as usize];
        for i in 0..rb {
            table[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&(rb_offset + i * CLUSTER).to_be_bytes());
        }
        self.file.write_all_at(&table, rt_offset)?;
        let mut blocks = vec![0u8; (rb * CLUSTER) as usize];
        for c in 0..total {
            blocks[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
        }
        self.file.write_all_at(&blocks, rb_offset)?;
        // Header, backing format extension, backing file name.
        let mut h = vec![0u8; CLUSTER as usize];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        let name_at = 128u64;
        h[8..16].copy_from_slice(&name_at.to_be_bytes());
        h[16..20].copy_from_slice(&(self.backing.len() as u32).to_be_bytes());
        h[20..24].copy_from_slice(&12u32.to_be_bytes());
        h[24..32].copy_from_slice(&self.size.to_be_bytes());
        h[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
        h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
        h[56..60].copy_from_slice(&(rt as u32).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h[108..112].copy_from_slice(&3u32.to_be_bytes());
        h[112..115].copy_from_slice(b"raw");
        // 120..128: end of extensions (zeros).
        h[128..128 + self.backing.len()].copy_from_slice(self.backing.as_bytes());
        self.file.write_all_at(&h, 0)?;
        self.file.set_len(total * CLUSTER)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, cluster_bits: u32, size: u64, l1_size: u32, l1_offset: u64) -> Vec<u8> {
        let mut h = vec![0u8; 1 << cluster_bits];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        if version == 3 {
            h[96..100].copy_from_slice(&4u32.to_be_bytes());
            h[100..104].copy_from_slice(&104u32.to_be_bytes());
        }
        h
    }

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.qcow2");
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    /// A hand-made v3 image with 4 KiB clusters: cluster 0 header, 1 L1, 2 L2, 3 data.
    fn tiny() -> Vec<u8> {
        let mut f = header(3, 12, 5 * 4096 + 100, 1, 4096);
        f.resize(4 * 4096, 0);
        f[4096..4104].copy_from_slice(&(2 * 4096u64).to_be_bytes());
        // guest cluster 1 -> data at 3, guest cluster 2 zero, guest cluster 5 (tail) -> data at 3.
        f[2 * 4096 + 8..2 * 4096 + 16].copy_from_slice(&(3 * 4096u64).to_be_bytes());
        f[2 * 4096 + 16..2 * 4096 + 24].copy_from_slice(&1u64.to_be_bytes());
        f[2 * 4096 + 40..2 * 4096 + 48].copy_from_slice(&(3 * 4096u64).to_be_bytes());
        f[3 * 4096..4 * 4096].fill(0xab);
        f
    }

    #[test]
    fn reads_allocated_zero_and_backing_clusters() {
        let (_d, p) = write(&tiny());
        let l = Qcow2Layer::open(&p).unwrap();
        assert_eq!(l.virtual_size(), 5 * 4096 + 100);
        assert!(matches!(l.chunk(0, 4096), LayerChunk::Backing));
        match l.chunk(1, 4096) {
            LayerChunk::Data(d) => assert!(d.iter().all(|&x| x == 0xab)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(l.chunk(2, 4096), LayerChunk::Zero));
        assert!(matches!(l.chunk(3, 4096), LayerChunk::Backing));
        match l.chunk(5, 100) {
            LayerChunk::Data(d) => assert_eq!(d.len(), 100),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.allocated_bytes(), 3 * 4096);
    }

    #[test]
    fn every_truncation_and_header_flip_is_an_error_or_a_valid_layer() {
        let good = tiny();
        for n in 0..good.len() {
            let (_d, p) = write(&good[..n]);
            let _ = Qcow2Layer::open(&p).map(|l| {
                for c in 0..6 {
                    let _ = l.chunk(c, 4096.min(5 * 4096 + 100 - c as usize * 4096));
                }
            });
        }
        for byte in (0..112).chain(4096..4112).chain(2 * 4096..2 * 4096 + 48) {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                let (_d, p) = write(&bad);
                if let Ok(l) = Qcow2Layer::open(&p) {
                    let n = l.virtual_size().div_ceil(4096).min(1 << 16);
                    for c in 0..n {
                        let len = (l.virtual_size() - c * 4096).min(4096) as usize;
                        let _ = l.chunk(c, len);
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let mut f = tiny();
        f[72 + 7] = 1; // dirty
        let (_d, p) = write(&f);
        assert!(Qcow2Layer::open(&p).unwrap_err().reason.contains("dirty"));
        let mut f = tiny();
        f[2 * 4096 + 8] |= 0x40; // compressed
        let (_d, p) = write(&f);
        assert!(Qcow2Layer::open(&p).unwrap_err().reason.contains("compressed"));
        let (_d, p) = write(&header(3, 9, 1 << 20, 1, 512));
        assert!(Qcow2Layer::open(&p).unwrap_err().reason.contains("cluster size"));
        let (_d, p) = write(b"QFI");
        assert!(Qcow2Layer::open(&p).is_err());
        let (_d, p) = write(&header(3, 12, 1 << 40, 1, 4096));
        assert!(Qcow2Layer::open(&p).unwrap_err().reason.contains("cannot map"));
    }
}
