//! Arbitrary bytes into the overlay reader: every frame read, every blob decoded and validated;
//! the same bytes resealed (checksums recomputed) so that mutations reach the parsers behind
//! the checksums. The corpus replays as `overlay-format/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_format::fuzzing::{read_all, reseal};

fuzz_target!(|data: &[u8]| {
    read_all(data);
    read_all(&reseal(data)[..]);
});
