//! Payload compression with bounded decompression.

use std::io::{self, Read};

use crate::meta::Compression;

/// Memory limit for the xz decoder (dictionary and buffers), so a hostile stream header cannot
/// make it allocate more.
const XZ_MEMLIMIT: u64 = 256 << 20;

/// How hard, and over what distance, a payload is compressed. Readers need none of it: every
/// setting decodes with the same decoder (within the limits of FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effort {
    /// Compression level (zstd: 1..=19, negative levels are faster; xz: 0..=9).
    pub level: i32,
    /// log2 of the match window (zstd's window, xz's dictionary), 12..=26; `None` keeps the
    /// level's default. A window as large as the payload finds repeats anywhere in it.
    pub window_log: Option<u32>,
    /// zstd long-distance matching: finds long repeats far back in a large window at little
    /// cost. xz ignores it.
    pub long_distance: bool,
    /// xz: run the x86 branch filter (BCJ) before LZMA2, which makes machine code compress
    /// better and other data about the same; the filter is recorded in the .xz stream, so any
    /// xz decoder undoes it. zstd ignores it.
    pub executable_filter: bool,
}

impl Effort {
    /// The level's defaults.
    pub fn level(level: i32) -> Self {
        Effort { level, window_log: None, long_distance: false, executable_filter: false }
    }
}

pub(crate) fn compress(c: Compression, effort: &Effort, raw: &[u8]) -> io::Result<Vec<u8>> {
    let window_log = effort.window_log.map(|w| w.clamp(12, 26));
    match c {
        Compression::None => Ok(raw.to_vec()),
        Compression::Zstd => {
            if window_log.is_none() && !effort.long_distance {
                return zstd::bulk::compress(raw, effort.level);
            }
            use zstd::zstd_safe::CParameter;
            let mut z = zstd::bulk::Compressor::new(effort.level)?;
            if let Some(w) = window_log {
                z.set_parameter(CParameter::WindowLog(w))?;
            }
            if effort.long_distance {
                z.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
            }
            z.compress(raw)
        }
        Compression::Xz => {
            let level = effort.level.clamp(0, 9) as u32;
            let mut out = Vec::with_capacity(raw.len() / 2);
            {
                use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
                let mut opts = LzmaOptions::new_preset(level)?;
                if let Some(w) = window_log {
                    opts.dict_size(1 << w);
                }
                let mut f = Filters::new();
                if effort.executable_filter {
                    f.x86();
                }
                f.lzma2(&opts);
                let stream = Stream::new_stream_encoder(&f, Check::Crc64)?;
                liblzma::read::XzEncoder::new_stream(raw, stream).read_to_end(&mut out)?;
            }
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
