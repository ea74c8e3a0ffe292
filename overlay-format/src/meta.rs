//! The overlay's metadata block (first frame) and trailer (last frame).

use serde::{Deserialize, Serialize};

use crate::digest::{BaseId, ImageDigest};
use crate::spec::{PortForward, VmSpec};

/// What an image of the VM holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageKind {
    /// Guest RAM (the memory-backend file).
    Memory,
    /// A disk, raw bytes of its virtual size.
    Disk,
}

/// One image of the custom VM and the base image it is rebuilt over.
///
/// `OverlayMeta::images[i]` is rebuilt over base image `i` (same name): chunks no record
/// touches keep the base image's bytes (zero past the end of the base image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// `memory` for guest RAM, the disk's name (e.g. `disk0`) for a disk.
    pub name: String,
    /// What the image holds.
    pub kind: ImageKind,
    /// Size of the rebuilt image in bytes.
    pub size: u64,
    /// Size of the base image it is rebuilt over, in bytes.
    pub base_size: u64,
}

/// Which compressor the overlay's blobs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Compression {
    /// Blobs are stored as they are.
    None,
    /// zstd frames.
    Zstd,
    /// xz streams (liblzma).
    Xz,
}

/// The metadata block: everything a reader needs before the first blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayMeta {
    /// The base VM this overlay applies to.
    pub base_id: BaseId,
    /// The custom VM's spec (what to resume it with).
    pub spec: VmSpec,
    /// The images the overlay rebuilds; records name them by index into this list.
    pub images: Vec<ImageMeta>,
    /// Compression of every blob and of the device state.
    pub compression: Compression,
    /// Port forwards the app expects by default.
    pub forwards: Vec<PortForward>,
    /// Free-form name of the app / overlay.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Tool and version that wrote the overlay, e.g. `cloudlet 0.1.0`.
    pub creator: String,
}

/// The trailer: digests a reader checks after rebuilding, and totals to cross-check the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// [`ImageDigest`] of each rebuilt image, in the order of [`OverlayMeta::images`].
    pub image_digests: Vec<ImageDigest>,
    /// blake3 of the (uncompressed) device-state blob.
    pub device_state_digest: [u8; 32],
    /// Number of blob frames in the overlay.
    pub blob_count: u64,
    /// Number of records over all blobs.
    pub record_count: u64,
}

/// Checks the rules the format puts on metadata (also applied by the reader). Every declared
/// size is checked against what the metadata itself states (the spec), so that a reader never
/// sizes anything by a number nothing else vouches for; the error names the field and both values.
pub(crate) fn check_meta(meta: &OverlayMeta) -> Result<(), String> {
    use crate::frame::{MAX_IMAGES, MAX_IMAGE_SIZE};
    if meta.images.is_empty() {
        return Err("no images".into());
    }
    if meta.images.len() > MAX_IMAGES {
        return Err(format!("{} images, at most {MAX_IMAGES} allowed", meta.images.len()));
    }
    if meta.spec.disks.len() > MAX_IMAGES {
        return Err(format!("spec.disks lists {} disks, at most {MAX_IMAGES} allowed", meta.spec.disks.len()));
    }
    for (i, img) in meta.images.iter().enumerate() {
        if img.name.is_empty() || img.name.len() > 255 {
            return Err(format!("image {i}: name must be 1 to 255 bytes"));
        }
        if meta.images[..i].iter().any(|o| o.name == img.name) {
            return Err(format!("image name '{}' appears twice", img.name));
        }
        if img.size > MAX_IMAGE_SIZE || img.base_size > MAX_IMAGE_SIZE {
            return Err(format!(
                "image '{}': size {} / base_size {} over the limit of {MAX_IMAGE_SIZE} bytes",
                img.name, img.size, img.base_size
            ));
        }
        match img.kind {
            ImageKind::Memory => {
                if meta.images[..i].iter().any(|o| o.kind == ImageKind::Memory) {
                    return Err(format!("image '{}' is a second memory image", img.name));
                }
                if img.size != meta.spec.ram_bytes {
                    return Err(format!(
                        "images[{i}].size of memory image '{}' is {} bytes, spec.ram_bytes is {}",
                        img.name, img.size, meta.spec.ram_bytes
                    ));
                }
            }
            // A spec that lists disks lists exactly the overlay's disk images, with their sizes.
            ImageKind::Disk if !meta.spec.disks.is_empty() => {
                let Some(d) = meta.spec.disks.iter().find(|d| d.name == img.name) else {
                    return Err(format!("disk image '{}' is not among spec.disks", img.name));
                };
                if img.size != d.size_bytes {
                    return Err(format!(
                        "images[{i}].size of disk image '{}' is {} bytes, spec.disks size_bytes is {}",
                        img.name, img.size, d.size_bytes
                    ));
                }
            }
            ImageKind::Disk => {}
        }
    }
    if !meta.spec.disks.is_empty() {
        for (k, d) in meta.spec.disks.iter().enumerate() {
            if meta.spec.disks[..k].iter().any(|o| o.name == d.name) {
                return Err(format!("spec.disks names disk '{}' twice", d.name));
            }
            if !meta.images.iter().any(|img| img.kind == ImageKind::Disk && img.name == d.name) {
                return Err(format!("spec.disks names disk '{}', the overlay has no disk image of that name", d.name));
            }
        }
    }
    Ok(())
}
