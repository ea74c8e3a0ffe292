//! The checked-in corpus of the `overlay_reader` and `overlay_segments` fuzz targets (golden
//! files, seeds, hostile variants and what fuzzing found), replayed through the entry points
//! the targets call; and random mutations of valid overlays, resealed so that they get past the
//! checksums.

use overlay_format::fuzzing::{read_all, read_segmented, reseal};
use overlay_format::DecodeError;
use proptest::prelude::*;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/overlay_reader");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_reader_fuzz_corpus_replays() {
    let files = corpus();
    assert!(files.len() >= 20, "{} files", files.len());
    for (name, bytes) in &files {
        let whole = read_all(&bytes[..]);
        let resealed = read_all(&reseal(bytes)[..]);
        assert!(resealed || !whole, "{name}: reads, but not once resealed");
        // The golden files and the seeds are valid overlays.
        if name.ends_with(".ovl") || name.starts_with("seed-") {
            assert!(whole, "{name} does not read");
            assert_eq!(reseal(bytes), *bytes, "{name}: resealing a valid overlay changes it");
        }
        // Segmented overlays read from their head, trailer and segments alone; others do not.
        let segmented = read_segmented(bytes);
        assert!(read_segmented(&reseal(bytes)[..]) || !segmented, "{name}: segments read, but not once resealed");
        if name.ends_with(".ovl") {
            assert_eq!(segmented, name.contains("segmented"), "{name}");
        }
    }
}

/// Resealing lets a damaged field reach its parser: a flipped byte of the metadata is reported
/// as what it breaks, not as a checksum mismatch.
#[test]
fn resealed_damage_gets_past_the_checksum() {
    let (_, bytes) = corpus().into_iter().find(|(n, _)| n == "v1-none.ovl").unwrap();
    let mut bad = bytes.clone();
    bad[16 + 40 + 32] = 0xff; // the length of spec.machine_type, after the 32-byte base id
    assert!(matches!(overlay_format::OverlayReader::new(&bad[..]), Err(DecodeError::ChecksumMismatch { .. })));
    match overlay_format::OverlayReader::new(&reseal(&bad)[..]) {
        Err(DecodeError::ChecksumMismatch { .. }) => panic!("still a checksum mismatch"),
        Err(_) => {}
        Ok(_) => panic!("damaged metadata read"),
    }
}

proptest! {
    /// Byte edits of valid overlays, resealed, never panic the reader.
    #[test]
    fn resealed_mutations_never_panic(
        pick in 0usize..64,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::weighted(0.2, any::<usize>()),
    ) {
        let files = corpus();
        let (_, bytes) = &files[pick % files.len()];
        let mut b = bytes.clone();
        if b.is_empty() {
            return Ok(());
        }
        for (at, v) in edits {
            let n = b.len();
            b[at % n] = v;
        }
        if let Some(c) = cut {
            let n = b.len();
            b.truncate(c % n);
        }
        let _ = read_all(&reseal(&b)[..]);
        let _ = read_all(&b[..]);
        let _ = read_segmented(&reseal(&b)[..]);
        let _ = read_segmented(&b[..]);
    }
}
