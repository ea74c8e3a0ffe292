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

/// [`decompress`] for a payload whose declared length may be far larger than a blob's (the
/// device state, up to 512 MiB): the output grows as bytes are decompressed, so a small payload
/// that declares a large length costs only what it holds.
pub(crate) fn decompress_growing(c: Compression, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw_len.min(stored.len().saturating_mul(4)).min(16 << 20));
    let limit = raw_len as u64 + 1;
    match c {
        Compression::None => out.extend_from_slice(stored),
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(stored).map_err(|e| e.to_string())?.single_frame();
            (&mut dec).take(limit).read_to_end(&mut out).map_err(|e| e.to_string())?;
        }
        Compression::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0).map_err(|e| e.to_string())?;
            let mut dec = liblzma::read::XzDecoder::new_stream(stored, stream);
            (&mut dec).take(limit).read_to_end(&mut out).map_err(|e| e.to_string())?;
        }
    }
    if out.len() != raw_len {
        return Err(format!("decompressed to {} bytes, header says {raw_len}", out.len()));
    }
    Ok(out)
}

/// log2 of the window of a chained frame (codecs 3 and 4): 128 MiB, the largest window zstd's
/// decoders accept by default; for xz, the dictionary size.
pub const CHAIN_WINDOW_LOG: u32 = 27;

fn zstd_err(code: usize) -> io::Error {
    io::Error::other(zstd::zstd_safe::get_error_name(code))
}

enum Encoder {
    Zstd(zstd::zstd_safe::CCtx<'static>),
    /// The .xz stream in progress (a new one starts after one ends), and the level.
    Xz(Option<liblzma::stream::Stream>, u32),
}

/// Compresses blobs as the consecutive segments of one zstd frame or .xz stream (blob codecs 3
/// and 4, FORMAT.md section 6): every blob is matched against the blobs before it within a
/// 128 MiB window (zstd: with long-distance matching; xz: a 128 MiB dictionary), instead of
/// against itself only.
///
/// Repeats between blobs are common in what a customization adds (the same code in several
/// binaries and libraries of one package), and a window that spans blobs finds them: on the
/// raw chunks of the peer harness's quick pair (120 MB), zstd level 6 with a 2 MiB window
/// gives 49.9 MB where the chain gives 42.0 MB, and xz level 6 in 48 MiB pieces 39.2 MB where
/// one stream gives 35.2 MB. The price is order: blobs of a chain are compressed one after the other (by the
/// thread that calls [`BlobBuilder::seal_chained`](crate::BlobBuilder::seal_chained)), and
/// decompressed in stream order by the reader.
pub struct ChainEncoder {
    enc: Encoder,
    open: bool,
    lane: u8,
}

impl std::fmt::Debug for ChainEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainEncoder")
            .field("compression", &self.compression())
            .field("open", &self.open)
            .field("lane", &self.lane)
            .finish_non_exhaustive()
    }
}

impl ChainEncoder {
    /// A chain compressing with `compression` (zstd or xz) at `level`, in lane 0.
    pub fn new(compression: Compression, level: i32) -> io::Result<Self> {
        Self::for_lane(compression, level, 0)
    }

    /// A chain in lane `lane` (below [`MAX_LANES`](crate::MAX_LANES)): an overlay may hold up
    /// to that many chains, each continuing only its own blobs (format 1.2), so that they can
    /// be compressed on as many threads.
    pub fn for_lane(compression: Compression, level: i32, lane: u8) -> io::Result<Self> {
        if lane >= crate::frame::MAX_LANES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("lane {lane} is not below MAX_LANES")));
        }
        let enc = match compression {
            Compression::Zstd => {
                use zstd::zstd_safe::CParameter;
                let mut cctx = zstd::zstd_safe::CCtx::try_create().ok_or_else(|| io::Error::other("zstd context"))?;
                for p in [
                    CParameter::CompressionLevel(level),
                    CParameter::WindowLog(CHAIN_WINDOW_LOG),
                    CParameter::EnableLongDistanceMatching(true),
                    // Long-distance matches from 32 bytes on, not zstd's default 64: 1.6-1.7%
                    // smaller on the peer harness's pairs at level 3, at no cost in time.
                    CParameter::LdmMinMatch(32),
                    // A long-distance position every 64 bytes, not every 128 (so a table of
                    // 2^21 positions, 16 MiB): about 1% smaller at level 4, for about 10% more
                    // time. (Setting the table size itself instead costs some 100 ms up front.)
                    CParameter::LdmHashRateLog(6),
                    // Buckets of 4 positions per long-distance hash, not 16 (zstd's default at
                    // levels 1 to 4): on the full pair at level 4, 12% less CPU for 0.2% more
                    // bytes; at levels 6 and 9, 7% less for 0.2% more.
                    CParameter::LdmBucketSizeLog(2),
                    CParameter::ChecksumFlag(false),
                ] {
                    cctx.set_parameter(p).map_err(zstd_err)?;
                }
                Encoder::Zstd(cctx)
            }
            Compression::Xz => Encoder::Xz(None, level.clamp(0, 9) as u32),
            Compression::None => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "chains are zstd or xz"));
            }
        };
        Ok(ChainEncoder { enc, open: false, lane })
    }

    /// The chain's lane.
    pub fn lane(&self) -> u8 {
        self.lane
    }

    /// The compressor of the chain.
    pub fn compression(&self) -> Compression {
        match self.enc {
            Encoder::Zstd(_) => Compression::Zstd,
            Encoder::Xz(..) => Compression::Xz,
        }
    }

    /// True when a segment was written and the frame was not ended: the overlay needs one more
    /// chained blob, sealed with `end`.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Compresses the next segment, the concatenation of `parts` (taken as they are, so that
    /// a blob's table and data need not be copied together first); `end` ends the frame (the
    /// .xz stream).
    pub(crate) fn segment(&mut self, parts: &[&[u8]], end: bool) -> io::Result<Vec<u8>> {
        let raw_len: usize = parts.iter().map(|p| p.len()).sum();
        let mut out: Vec<u8> = Vec::with_capacity(raw_len / 2 + 4096);
        let grow = |out: &mut Vec<u8>| {
            if out.capacity() - out.len() < 64 << 10 {
                out.reserve(out.len().max(1 << 20));
            }
        };
        match &mut self.enc {
            Encoder::Zstd(cctx) => {
                use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective;
                use zstd::zstd_safe::{InBuffer, OutBuffer};
                for (k, part) in parts.iter().enumerate() {
                    let directive = match (k + 1 == parts.len(), end) {
                        (false, _) => ZSTD_EndDirective::ZSTD_e_continue,
                        (true, false) => ZSTD_EndDirective::ZSTD_e_flush,
                        (true, true) => ZSTD_EndDirective::ZSTD_e_end,
                    };
                    let mut input = InBuffer::around(part);
                    loop {
                        grow(&mut out);
                        let pos = out.len();
                        let mut output = OutBuffer::around_pos(&mut out, pos);
                        let left = cctx.compress_stream2(&mut output, &mut input, directive).map_err(zstd_err)?;
                        let flushed = directive == ZSTD_EndDirective::ZSTD_e_continue || left == 0;
                        if flushed && input.pos == part.len() {
                            break;
                        }
                    }
                }
            }
            Encoder::Xz(stream, level) => {
                use liblzma::stream::{Action, Check, Filters, LzmaOptions, Status, Stream};
                let stream = match stream {
                    Some(s) => s,
                    None => {
                        let mut opts = LzmaOptions::new_preset(*level)?;
                        opts.dict_size(1 << CHAIN_WINDOW_LOG);
                        // No x86 filter: it cannot flush mid-stream, and over a window this
                        // large it gains nothing (35.24 MB with it, 35.24 MB without, on the
                        // quick pair's raw chunks).
                        let mut f = Filters::new();
                        f.lzma2(&opts);
                        stream.insert(Stream::new_stream_encoder(&f, Check::Crc64)?)
                    }
                };
                for (k, part) in parts.iter().enumerate() {
                    let last = k + 1 == parts.len();
                    let action = match (last, end) {
                        (false, _) => Action::Run,
                        (true, false) => Action::SyncFlush,
                        (true, true) => Action::Finish,
                    };
                    let start = stream.total_in();
                    loop {
                        grow(&mut out);
                        let taken = (stream.total_in() - start) as usize;
                        let status = stream.process_vec(&part[taken..], &mut out, action)?;
                        let taken = (stream.total_in() - start) as usize;
                        // Run is done once the part is taken; SyncFlush and Finish once liblzma
                        // says so.
                        if (!last && taken == part.len()) || status == Status::StreamEnd {
                            break;
                        }
                    }
                }
                if end {
                    self.enc = Encoder::Xz(None, *level);
                }
            }
        }
        self.open = !end;
        Ok(out)
    }
}

enum Decoder {
    Zstd(zstd::zstd_safe::DCtx<'static>),
    Xz(Option<liblzma::stream::Stream>),
}

/// Decompresses the segments of chained frames in stream order (see [`ChainEncoder`]).
pub(crate) struct ChainDecoder {
    dec: Decoder,
    open: bool,
}

impl ChainDecoder {
    pub fn new(compression: Compression) -> Result<Self, String> {
        let dec = match compression {
            Compression::Zstd => {
                let mut dctx = zstd::zstd_safe::DCtx::try_create().ok_or("cannot create a zstd context")?;
                dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(CHAIN_WINDOW_LOG))
                    .map_err(|c| zstd::zstd_safe::get_error_name(c).to_string())?;
                Decoder::Zstd(dctx)
            }
            Compression::Xz => Decoder::Xz(None),
            Compression::None => return Err("chains are zstd or xz".into()),
        };
        Ok(ChainDecoder { dec, open: false })
    }

    /// True inside a frame that has not ended.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Decompresses the next segment, which must yield exactly `raw_len` bytes (bounded by the
    /// caller) and nothing more, into `out` (a buffer to reuse; its bytes do not matter).
    pub fn segment(&mut self, stored: &[u8], raw_len: usize, mut out: Vec<u8>) -> Result<Vec<u8>, String> {
        // raw_len is at most MAX_BLOB_LEN. A fresh zeroed buffer is only touched as it is
        // written; a reused one is already mapped.
        if out.capacity() < raw_len {
            // Room for somewhat larger segments too, so that the buffer can be reused.
            out = Vec::with_capacity(raw_len + raw_len / 4);
        }
        out.resize(raw_len, 0);
        self.open = true;
        // (input taken, output produced, frame ended)
        let (taken, produced, ended) = match &mut self.dec {
            Decoder::Zstd(dctx) => {
                use zstd::zstd_safe::{InBuffer, OutBuffer};
                let name = |c| zstd::zstd_safe::get_error_name(c).to_string();
                let mut output = OutBuffer::around(&mut out[..]);
                let mut input = InBuffer::around(stored);
                let mut ended = false;
                loop {
                    let before = (input.pos, output.pos());
                    if dctx.decompress_stream(&mut output, &mut input).map_err(name)? == 0 {
                        ended = true;
                        break;
                    }
                    if (input.pos, output.pos()) == before {
                        break;
                    }
                }
                let produced = output.pos();
                if !ended && input.pos == stored.len() && produced == raw_len {
                    // Everything flushed belongs to this blob: nothing may be left to output.
                    let mut probe = [0u8; 1];
                    let mut output = OutBuffer::around(&mut probe[..]);
                    dctx.decompress_stream(&mut output, &mut InBuffer::around(&[])).map_err(name)?;
                    if output.pos() != 0 {
                        return Err(format!("the segment decompresses to more than {raw_len} bytes"));
                    }
                }
                (input.pos, produced, ended)
            }
            Decoder::Xz(slot) => {
                use liblzma::stream::{Action, Status, Stream};
                let stream = match slot {
                    Some(s) => s,
                    None => slot.insert(Stream::new_stream_decoder(XZ_MEMLIMIT, 0).map_err(|e| e.to_string())?),
                };
                let (in0, out0) = (stream.total_in(), stream.total_out());
                let pos = |s: &Stream| ((s.total_in() - in0) as usize, (s.total_out() - out0) as usize);
                let mut ended = false;
                loop {
                    let (i, o) = pos(stream);
                    let status = stream.process(&stored[i..], &mut out[o..], Action::Run).map_err(|e| e.to_string())?;
                    if status == Status::StreamEnd {
                        ended = true;
                        break;
                    }
                    if pos(stream) == (i, o) {
                        break;
                    }
                }
                let (taken, produced) = pos(stream);
                if !ended && taken == stored.len() && produced == raw_len {
                    let mut probe = [0u8; 1];
                    stream.process(&[], &mut probe, Action::Run).map_err(|e| e.to_string())?;
                    if pos(stream).1 != produced {
                        return Err(format!("the segment decompresses to more than {raw_len} bytes"));
                    }
                }
                if ended {
                    *slot = None;
                }
                (taken, produced, ended)
            }
        };
        if ended {
            self.open = false;
            if taken != stored.len() {
                return Err(format!("{} bytes follow the end of the chained frame", stored.len() - taken));
            }
        }
        if taken != stored.len() {
            return Err(format!("the segment decompresses to more than {raw_len} bytes"));
        }
        if produced != raw_len {
            return Err(format!("decompressed to {produced} bytes, header says {raw_len}"));
        }
        Ok(out)
    }
}
