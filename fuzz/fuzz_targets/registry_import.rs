//! Arbitrary bytes as a base export imported into a registry: an error or a verified base,
//! never a panic, and never a listed partial entry.
#![no_main]

use base_registry::Registry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cloudlet-fuzz-registry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let reg = Registry::open(&dir).unwrap();
    let imported = reg.import(data);
    let listed = reg.list().unwrap();
    assert_eq!(listed.len(), usize::from(imported.is_ok()));
});
