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

/// log2 of the window of the chained zstd stream (codec 3): 128 MiB, the largest window zstd's
/// decoders accept by default.
pub const CHAIN_WINDOW_LOG: u32 = 27;

fn zstd_err(code: usize) -> io::Error {
    io::Error::other(zstd::zstd_safe::get_error_name(code))
}

/// Compresses blobs as the consecutive segments of one zstd frame (blob codec 3, FORMAT.md
/// section 6): every blob is matched against all earlier blobs of the chain within a 128 MiB
/// window, with long-distance matching, instead of against itself only.
///
/// Repeats between blobs are common in what a customization adds (the same code in several
/// binaries and libraries of one package), and a window that spans blobs finds them: on the
/// peer harness's quick pair, level 6 in 4 MiB independent blobs gives 49.9 MB where the chain
/// gives 42.0 MB. The price is order: blobs of a chain are compressed one after the other
/// (by the thread that calls [`BlobBuilder::seal_chained`](crate::BlobBuilder::seal_chained)),
/// and decompressed in stream order by the reader.
pub struct ChainEncoder {
    cctx: zstd::zstd_safe::CCtx<'static>,
    open: bool,
}

impl std::fmt::Debug for ChainEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainEncoder").field("open", &self.open).finish_non_exhaustive()
    }
}

impl ChainEncoder {
    /// A chain compressing at zstd `level`.
    pub fn new(level: i32) -> io::Result<Self> {
        use zstd::zstd_safe::CParameter;
        let mut cctx = zstd::zstd_safe::CCtx::try_create().ok_or_else(|| io::Error::other("zstd context"))?;
        for p in [
            CParameter::CompressionLevel(level),
            CParameter::WindowLog(CHAIN_WINDOW_LOG),
            CParameter::EnableLongDistanceMatching(true),
            // Long-distance matches from 32 bytes on, not zstd's default 64: 1.6-1.7% smaller
            // on the peer harness's pairs at level 3, at no cost in time.
            CParameter::LdmMinMatch(32),
            // A table of 2^21 long-distance positions (16 MiB), not the default 2^20: 0.8-1.0%
            // smaller at level 4, for about 10% more time.
            CParameter::LdmHashLog(CHAIN_WINDOW_LOG - 6),
            CParameter::ChecksumFlag(false),
        ] {
            cctx.set_parameter(p).map_err(zstd_err)?;
        }
        Ok(ChainEncoder { cctx, open: false })
    }

    /// True when a segment was written and the frame was not ended: the overlay needs one more
    /// chained blob, sealed with `end`.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Compresses the next segment; `end` ends the frame.
    pub(crate) fn segment(&mut self, raw: &[u8], end: bool) -> io::Result<Vec<u8>> {
        use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective;
        use zstd::zstd_safe::{InBuffer, OutBuffer};
        let directive = if end { ZSTD_EndDirective::ZSTD_e_end } else { ZSTD_EndDirective::ZSTD_e_flush };
        let mut out: Vec<u8> = Vec::with_capacity(raw.len() / 2 + 4096);
        let mut input = InBuffer::around(raw);
        loop {
            if out.capacity() - out.len() < 64 << 10 {
                out.reserve(out.len().max(1 << 20));
            }
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            let left = self.cctx.compress_stream2(&mut output, &mut input, directive).map_err(zstd_err)?;
            if left == 0 && input.pos == raw.len() {
                break;
            }
        }
        self.open = !end;
        Ok(out)
    }
}

/// Decompresses the segments of chained zstd frames in stream order (see [`ChainEncoder`]).
pub(crate) struct ChainDecoder {
    dctx: zstd::zstd_safe::DCtx<'static>,
    open: bool,
}

impl ChainDecoder {
    pub fn new() -> Result<Self, String> {
        let mut dctx = zstd::zstd_safe::DCtx::try_create().ok_or("cannot create a zstd context")?;
        dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(CHAIN_WINDOW_LOG))
            .map_err(|c| zstd::zstd_safe::get_error_name(c).to_string())?;
        Ok(ChainDecoder { dctx, open: false })
    }

    /// True inside a frame that has not ended.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Decompresses the next segment, which must yield exactly `raw_len` bytes (bounded by the
    /// caller) and nothing more.
    pub fn segment(&mut self, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
        use zstd::zstd_safe::{InBuffer, OutBuffer};
        let name = |c| zstd::zstd_safe::get_error_name(c).to_string();
        // raw_len is at most MAX_BLOB_LEN; the zeroed buffer is only touched as it is written.
        let mut out = vec![0u8; raw_len];
        let mut output = OutBuffer::around(&mut out[..]);
        let mut input = InBuffer::around(stored);
        self.open = true;
        loop {
            let before = (input.pos, output.pos());
            let hint = self.dctx.decompress_stream(&mut output, &mut input).map_err(name)?;
            if hint == 0 {
                self.open = false;
                if input.pos != stored.len() {
                    return Err(format!("{} bytes follow the end of the chained zstd frame", stored.len() - input.pos));
                }
                break;
            }
            if (input.pos, output.pos()) == before {
                break;
            }
        }
        let produced = output.pos();
        if input.pos != stored.len() {
            return Err(format!("the segment decompresses to more than {raw_len} bytes"));
        }
        if produced != raw_len {
            return Err(format!("decompressed to {produced} bytes, header says {raw_len}"));
        }
        if self.open {
            // Everything flushed belongs to this blob: nothing may be left to output.
            let mut probe = [0u8; 1];
            let mut output = OutBuffer::around(&mut probe[..]);
            self.dctx.decompress_stream(&mut output, &mut InBuffer::around(&[])).map_err(name)?;
            if output.pos() != 0 {
                return Err(format!("the segment decompresses to more than {raw_len} bytes"));
            }
        }
        Ok(out)
    }
}
