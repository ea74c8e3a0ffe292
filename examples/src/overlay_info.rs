//! `cloudlet overlay-info FILE [--verify] [--json]`: what an overlay holds.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use overlay_format::{Compression, DecodeError, OverlayReader, RecordRef, SealedBlob};
use rayon::prelude::*;
use serde::Serialize;

/// Count and bytes of one record kind.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct KindStats {
    /// Records of this kind.
    pub records: u64,
    /// Chunks they cover.
    pub chunks: u64,
    /// Payload bytes they carry in the blobs (before compression).
    pub payload_bytes: u64,
}

/// Everything `overlay-info` reports.
#[derive(Debug, Default, Serialize)]
pub struct Info {
    /// File path.
    pub file: String,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Format version, from the file's header.
    pub format_version: String,
    /// Overlay name.
    pub name: String,
    /// Writer.
    pub creator: String,
    /// Creation time (Unix seconds).
    pub created_unix: u64,
    /// Base id, hex.
    pub base_id: String,
    /// VM spec.
    pub spec: Option<overlay_format::VmSpec>,
    /// Images: (name, kind, size, base size).
    pub images: Vec<(String, String, u64, u64)>,
    /// Port forwards (printed as `tcp:2222:22`).
    pub forwards: Vec<synthesis::api::Forward>,
    /// Compression of blobs and device state.
    pub compression: String,
    /// Device state size, uncompressed.
    pub device_state_bytes: u64,
    /// Blob frames.
    pub blobs: u64,
    /// Blobs that are segments of a chained frame (format 1.1), decompressed in order.
    pub chained_blobs: u64,
    /// Lanes the chained blobs run in: chains of their own (format 1.2).
    pub chain_lanes: u32,
    /// Blob bytes as stored.
    pub blob_bytes_compressed: u64,
    /// Blob bytes after decompression.
    pub blob_bytes_uncompressed: u64,
    /// Records.
    pub records: u64,
    /// Per record kind.
    pub zero: KindStats,
    /// Per record kind.
    pub copy_base: KindStats,
    /// Per record kind.
    pub copy_self: KindStats,
    /// Per record kind.
    pub patch: KindStats,
    /// Per record kind.
    pub raw: KindStats,
    /// Image digests from the trailer, hex.
    pub image_digests: Vec<String>,
    /// Device-state digest from the trailer, hex.
    pub device_state_digest: String,
    /// The damage found, if any.
    pub error: Option<String>,
    /// The registry looked in for the base.
    pub registry: Option<String>,
    /// Whether the base is in that registry.
    pub base_in_registry: Option<bool>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads the whole overlay, decoding every blob (in parallel, a batch at a time). With
/// `verify`, records are also checked against the images. Returns the info gathered so far and
/// the first error.
pub fn inspect(path: &Path, verify: bool) -> std::io::Result<(Info, Option<DecodeError>)> {
    let file = File::open(path)?;
    let mut info = Info { file: path.display().to_string(), file_bytes: file.metadata()?.len(), ..Info::default() };
    let result = read_into(BufReader::with_capacity(1 << 20, file), verify, &mut info);
    let err = result.err();
    info.error = err.as_ref().map(|e| synthesis::error_chain(e));
    Ok((info, err))
}

fn read_into(input: impl std::io::Read, verify: bool, info: &mut Info) -> Result<(), DecodeError> {
    let mut r = OverlayReader::new(input)?;
    let m = r.meta().clone();
    let (major, minor) = r.version();
    info.format_version = format!("{major}.{minor}");
    info.name = m.name.clone();
    info.creator = m.creator.clone();
    info.created_unix = m.created_unix;
    info.base_id = m.base_id.to_hex();
    info.spec = Some(m.spec.clone());
    info.images = m
        .images
        .iter()
        .map(|i| (i.name.clone(), format!("{:?}", i.kind).to_lowercase(), i.size, i.base_size))
        .collect();
    info.forwards = m.forwards.iter().map(synthesis::api::Forward::recorded).collect();
    info.compression = match m.compression {
        Compression::None => "none",
        Compression::Zstd => "zstd",
        Compression::Xz => "xz",
    }
    .to_string();
    info.device_state_bytes = r.device_state()?.len() as u64;
    let mut batch: Vec<SealedBlob> = Vec::new();
    // Bit k: a chained blob of lane k was seen (lanes stay below MAX_LANES, far below 64).
    let mut lanes = 0u64;
    loop {
        let next = r.next_blob()?;
        let done = next.is_none();
        if let Some(b) = next {
            info.blobs += 1;
            if b.is_chained() {
                info.chained_blobs += 1;
                lanes |= 1u64 << b.lane();
                info.chain_lanes = lanes.count_ones();
            }
            info.blob_bytes_compressed += b.compressed_len() as u64;
            info.blob_bytes_uncompressed += b.uncompressed_len() as u64;
            info.records += b.record_count();
            batch.push(b);
        }
        if batch.len() >= 16 || (done && !batch.is_empty()) {
            let stats: Vec<[KindStats; 5]> = batch
                .par_iter()
                .map(|b| {
                    let d = if verify { b.decode_for(&m)? } else { b.decode(m.compression)? };
                    Ok(count(d.records()))
                })
                .collect::<Result<_, DecodeError>>()?;
            for s in stats {
                for (acc, x) in
                    [&mut info.zero, &mut info.copy_base, &mut info.copy_self, &mut info.patch, &mut info.raw]
                        .into_iter()
                        .zip(s)
                {
                    acc.records += x.records;
                    acc.chunks += x.chunks;
                    acc.payload_bytes += x.payload_bytes;
                }
            }
            batch.clear();
        }
        if done {
            break;
        }
    }
    let t = r.trailer().expect("next_blob returned None, so the trailer was read");
    info.image_digests = t.image_digests.iter().map(|d| d.to_string()).collect();
    info.device_state_digest = hex(&t.device_state_digest);
    Ok(())
}

fn count<'a>(records: impl Iterator<Item = RecordRef<'a>>) -> [KindStats; 5] {
    let mut s = [KindStats::default(); 5];
    for r in records {
        let (i, bytes) = match r {
            RecordRef::Zero { .. } => (0, 0),
            RecordRef::CopyBase { .. } => (1, 0),
            RecordRef::CopySelf { .. } => (2, 0),
            RecordRef::Patch { patch, .. } => (3, patch.len()),
            RecordRef::Raw { data, .. } => (4, data.len()),
        };
        s[i].records += 1;
        s[i].chunks += r.chunk_count();
        s[i].payload_bytes += bytes as u64;
    }
    s
}

/// Human-readable report.
pub fn render(info: &Info) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "overlay        {} ({} bytes)", info.file, info.file_bytes);
    let _ = writeln!(o, "format         v{}", info.format_version);
    let _ = writeln!(o, "name           {}", info.name);
    let _ = writeln!(o, "creator        {} at {} (unix)", info.creator, info.created_unix);
    let _ = writeln!(o, "base id        {}", info.base_id);
    if let (Some(reg), Some(present)) = (&info.registry, info.base_in_registry) {
        let verdict = if present { "present in" } else { "NOT in" };
        let _ = writeln!(o, "base           {verdict} the registry {reg}");
    }
    if let Some(s) = &info.spec {
        let _ = writeln!(
            o,
            "vm             {} / cpu {} / {} vcpu / {} MiB RAM / qemu {} / {}",
            s.machine_type,
            s.cpu_model,
            s.vcpus,
            s.ram_bytes >> 20,
            s.qemu_version,
            s.accelerator
        );
    }
    for (name, kind, size, base) in &info.images {
        let _ = writeln!(o, "image          {name:<10} {kind:<7} {size} bytes (base {base})");
    }
    if !info.forwards.is_empty() {
        let _ = writeln!(
            o,
            "forwards       {}",
            info.forwards.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    let _ = writeln!(o, "compression    {}", info.compression);
    let _ = writeln!(o, "device state   {} bytes", info.device_state_bytes);
    let ratio = if info.blob_bytes_uncompressed > 0 {
        info.blob_bytes_compressed as f64 / info.blob_bytes_uncompressed as f64
    } else {
        0.0
    };
    let _ = writeln!(
        o,
        "blobs          {} ({} chained, in {} lanes; {} bytes stored, {} uncompressed, ratio {:.3})",
        info.blobs,
        info.chained_blobs,
        info.chain_lanes,
        info.blob_bytes_compressed,
        info.blob_bytes_uncompressed,
        ratio
    );
    let _ = writeln!(o, "records        {}", info.records);
    for (name, k) in [
        ("zero", info.zero),
        ("copy-base", info.copy_base),
        ("copy-self", info.copy_self),
        ("patch", info.patch),
        ("raw", info.raw),
    ] {
        let _ = writeln!(
            o,
            "  {name:<12} {:>10} records {:>12} chunks {:>14} payload bytes",
            k.records, k.chunks, k.payload_bytes
        );
    }
    for ((name, ..), d) in info.images.iter().zip(&info.image_digests) {
        let _ = writeln!(o, "digest         {name:<10} {d}");
    }
    if !info.device_state_digest.is_empty() {
        let _ = writeln!(o, "digest         {:<10} {}", "device", info.device_state_digest);
    }
    if let Some(e) = &info.error {
        let _ = writeln!(o, "DAMAGED        {e}");
    }
    o
}
