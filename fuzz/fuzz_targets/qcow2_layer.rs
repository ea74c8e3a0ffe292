//! Arbitrary bytes as a qcow2 top layer: open it, then read every guest chunk it maps.
#![no_main]

use delta_engine::qcow2::Qcow2Layer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cloudlet-fuzz-qcow2-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("layer.qcow2");
    std::fs::write(&path, data).unwrap();
    if let Ok(l) = Qcow2Layer::open(&path) {
        let n = l.virtual_size().div_ceil(4096).min(1 << 16);
        for c in 0..n {
            let len = (l.virtual_size() - c * 4096).min(4096) as usize;
            let _ = l.chunk(c, len);
        }
        let _ = l.allocated_bytes();
        let _ = l.backing_path();
    }
});
