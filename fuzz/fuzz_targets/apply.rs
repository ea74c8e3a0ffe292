//! Arbitrary bytes (as they are and resealed) applied as an overlay to a small base VM in a
//! temporary directory: no panic, and a failed apply leaves no file behind. The corpus
//! replays as `delta-engine/tests/hostile.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    delta_engine::fuzzing::apply_all(data);
});
