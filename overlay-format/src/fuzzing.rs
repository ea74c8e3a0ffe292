//! Entry points shared by the fuzz targets (`fuzz/`) and the tests that replay their corpus, so
//! that both run the same code.
//!
//! Random bytes rarely get past a frame's checksum, so the fuzz targets also feed the reader
//! [`reseal`]ed bytes: every frame's checksum and the trailer's stream digest recomputed, so a
//! mutation of any field reaches the parser behind it.

use std::io::Read;

use crate::frame::{self, FRAME_HEADER_LEN, HEADER_LEN};
use crate::reader::OverlayReader;
use crate::segment::read_segment;

/// `bytes` with the checksum of every complete frame and the stream digest in the trailer
/// recomputed; everything else (lengths, kinds, payloads, a cut-off last frame, bytes after the
/// trailer) left as it is. Never panics.
pub fn reseal(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.len() < HEADER_LEN {
        return out;
    }
    let mut stream = blake3::Hasher::new();
    stream.update(&out[..HEADER_LEN]);
    let mut at = HEADER_LEN;
    while out.len() - at >= FRAME_HEADER_LEN {
        let hb: [u8; FRAME_HEADER_LEN] = out[at..at + FRAME_HEADER_LEN].try_into().expect("40 bytes");
        let Ok(h) = frame::FrameHeader::decode(&hb) else {
            break;
        };
        let start = at + FRAME_HEADER_LEN;
        let Some(end) = usize::try_from(h.stored_len).ok().and_then(|n| start.checked_add(n)) else {
            break;
        };
        if end > out.len() {
            break;
        }
        let trailer = h.kind == frame::FrameKind::Trailer as u8;
        if trailer && end - start >= 32 {
            let digest = stream.clone().finalize();
            out[start..start + 32].copy_from_slice(digest.as_bytes());
        }
        let sum = frame::frame_checksum(&h.prefix(), &out[start..end]);
        out[at + 24..at + FRAME_HEADER_LEN].copy_from_slice(&sum);
        if trailer {
            break;
        }
        stream.update(&out[at..start]);
        at = end;
    }
    out
}

/// Reads `input` as an overlay to its end: device state, every blob decoded and checked against
/// the metadata, the trailer. What the `overlay_reader` fuzz target runs on every input (as it
/// is and [`reseal`]ed). Returns whether the whole overlay read; never panics on any input.
pub fn read_all(input: impl Read) -> bool {
    let Ok(mut r) = OverlayReader::new(input) else {
        return false;
    };
    if r.device_state().is_err() {
        return false;
    }
    loop {
        match r.next_blob() {
            Ok(Some(blob)) => match blob.into_decoded_for(r.meta()) {
                Ok(decoded) => {
                    for record in decoded.records() {
                        let _ = record.to_owned();
                    }
                    r.recycle(decoded.into_buffer());
                }
                Err(_) => return false,
            },
            Ok(None) => return r.trailer().is_some(),
            Err(_) => return false,
        }
    }
}

/// Reads `input` as a segmented overlay the way a reader does before all of it has arrived:
/// its head ([`OverlayReader::into_head`]), its trailer from the offset the head computes
/// ([`crate::Head::check_trailer`]), and every segment whose bytes are inside `input`, each on
/// its own ([`read_segment`]). What the `overlay_segments` fuzz target runs on every input (as
/// it is and [`reseal`]ed). Returns whether all of it read; never panics on any input.
pub fn read_segmented(input: &[u8]) -> bool {
    let Ok(head) = OverlayReader::new(input).and_then(OverlayReader::into_head) else {
        return false;
    };
    let in_input = |at: u64| usize::try_from(at).ok().filter(|&at| at <= input.len());
    let (trailer_at, _) = head.trailer_range();
    let mut ok = match in_input(trailer_at) {
        Some(at) => head.check_trailer(&input[at..]).is_ok(),
        None => false,
    };
    let offsets = head.index.offsets(head.len);
    for (k, w) in offsets.windows(2).enumerate() {
        let (Some(start), Some(end)) = (in_input(w[0]), in_input(w[1])) else {
            ok = false;
            continue;
        };
        match read_segment(&input[start..end], &head.index, k, &head.meta) {
            Ok(decoded) => {
                for record in decoded.records() {
                    let _ = record.to_owned();
                }
            }
            Err(_) => ok = false,
        }
    }
    ok
}
