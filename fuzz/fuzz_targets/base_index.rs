//! Arbitrary bytes as a saved base index (the registry's `index` file).
#![no_main]

use delta_engine::BaseIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cloudlet-fuzz-index-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("index");
    std::fs::write(&path, data).unwrap();
    if let Ok(idx) = BaseIndex::load(&path) {
        for img in idx.images() {
            if let Some(h) = img.hashes.first() {
                let _ = idx.find(h);
            }
        }
    }
});
