//! Arbitrary bytes as a segmented overlay read before it has all arrived: its head, its
//! trailer checked against the index, and every segment read alone from its byte range; the
//! same bytes resealed (checksums recomputed). The corpus replays as
//! `overlay-format/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_format::fuzzing::{read_segmented, reseal};

fuzz_target!(|data: &[u8]| {
    read_segmented(data);
    read_segmented(&reseal(data)[..]);
});
