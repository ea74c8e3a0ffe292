//! Arbitrary bytes into the overlay reader: every frame read, every blob decoded and validated.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_format::OverlayReader;

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = OverlayReader::new(data) else {
        return;
    };
    if r.device_state().is_err() {
        return;
    }
    while let Ok(Some(blob)) = r.next_blob() {
        if let Ok(decoded) = blob.decode_for(r.meta()) {
            for record in decoded.records() {
                let _ = record.to_owned();
            }
        }
    }
});
