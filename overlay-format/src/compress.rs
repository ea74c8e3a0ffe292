//! Payload compression with bounded decompression.

use std::io::{self, Read};

use crate::meta::Compression;

/// Memory limit for the xz decoder (dictionary and buffers), so a hostile stream header cannot
/// make it allocate more.
const XZ_MEMLIMIT: u64 = 256 << 20;

pub(crate) fn compress(c: Compression, level: i32, raw: &[u8]) -> io::Result<Vec<u8>> {
    match c {
        Compression::None => Ok(raw.to_vec()),
        Compression::Zstd => zstd::bulk::compress(raw, level),
        Compression::Xz => {
            let level = level.clamp(0, 9) as u32;
            let mut out = Vec::with_capacity(raw.len() / 2);
            liblzma::read::XzEncoder::new(raw, level).read_to_end(&mut out)?;
            Ok(out)
        }
    }
}

/// Decompresses `stored`, which must yield exactly `raw_len` bytes (`raw_len` is already bounded
/// by the caller).
pub(crate) fn decompress(c: Compression, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let out = match c {
        Compression::None => stored.to_vec(),
        Compression::Zstd => zstd::bulk::decompress(stored, raw_len).map_err(|e| e.to_string())?,
        Compression::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0).map_err(|e| e.to_string())?;
            let mut dec = liblzma::read::XzDecoder::new_stream(stored, stream);
            let mut out = Vec::with_capacity(raw_len);
            (&mut dec).take(raw_len as u64 + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
            out
        }
    };
    if out.len() != raw_len {
        return Err(format!("decompressed to {} bytes, header says {raw_len}", out.len()));
    }
    Ok(out)
}
