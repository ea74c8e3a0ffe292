//! Segmented overlays: the same images rebuilt, segments in touch order, each read alone.

use delta_engine::*;
use overlay_format::segment::read_segment;
use overlay_format::{apply_patch, BaseId, Compression, ImageKind, OverlayReader, RecordRef, VmSpec, CHUNK_SIZE};

const PAGE: usize = CHUNK_SIZE;

fn page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..PAGE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Compressible, but not trivially.
            (x % 7) as u8
        })
        .collect()
}

struct Pair {
    dir: tempfile::TempDir,
    base: Vec<Vec<u8>>,
    custom: Vec<Vec<u8>>,
    names: [&'static str; 2],
}

/// Memory of 256 pages and a disk of 96, with every kind of change.
fn pair() -> Pair {
    let base_mem: Vec<u8> = (0..256).flat_map(page).collect();
    let base_disk: Vec<u8> = (1000..1096).flat_map(page).collect();
    let mut mem = base_mem.clone();
    let mut disk = base_disk.clone();
    let put = |img: &mut Vec<u8>, c: usize, bytes: &[u8]| img[c * PAGE..(c + 1) * PAGE].copy_from_slice(bytes);
    for c in 10..40 {
        put(&mut mem, c, &page(5000 + c as u64)); // raw
    }
    for c in 40..50 {
        put(&mut mem, c, &[0; PAGE]); // zero
    }
    put(&mut mem, 60, &page(1010)); // a disk page: copy from the base
    for c in 70..80 {
        mem[c * PAGE + 17] ^= 0xff; // patches
    }
    for c in 100..140 {
        put(&mut mem, c, &page(5000 + (c as u64 - 90))); // copies of the raw pages above
    }
    put(&mut mem, 200, &page(5072)); // another copy of a patched page? no: a fresh raw page
    for c in 3..20 {
        put(&mut disk, c, &page(7000 + c as u64));
    }
    put(&mut disk, 50, &page(5011)); // a copy of a changed memory page
    let p = Pair {
        dir: tempfile::tempdir().unwrap(),
        base: vec![base_mem, base_disk],
        custom: vec![mem, disk],
        names: ["memory", "disk"],
    };
    for (i, n) in p.names.iter().enumerate() {
        std::fs::write(p.dir.path().join(format!("base-{n}")), &p.base[i]).unwrap();
        std::fs::write(p.dir.path().join(format!("custom-{n}")), &p.custom[i]).unwrap();
    }
    p
}

impl Pair {
    fn base(&self) -> Base {
        let images: Vec<BaseImage> = self
            .names
            .iter()
            .zip([ImageKind::Memory, ImageKind::Disk])
            .map(|(n, kind)| BaseImage { name: n.to_string(), kind, path: self.dir.path().join(format!("base-{n}")) })
            .collect();
        Base::build(&images, &|_| {}).unwrap()
    }

    fn overlay(&self, base: &Base, opts: &CreateOptions) -> Vec<u8> {
        let custom: Vec<CustomImage> = self
            .names
            .iter()
            .map(|n| CustomImage {
                name: n.to_string(),
                source: CustomSource::Raw(self.dir.path().join(format!("custom-{n}"))),
            })
            .collect();
        let info = OverlayInfo {
            base_id: BaseId([9; 32]),
            spec: VmSpec {
                machine_type: "pc-q35-10.0".into(),
                cpu_model: "qemu64".into(),
                vcpus: 1,
                ram_bytes: self.custom[0].len() as u64,
                qemu_version: "10.0.2".into(),
                accelerator: "tcg".into(),
                disks: vec![],
                kernel_cmdline: None,
            },
            forwards: vec![],
            name: "t".into(),
            creator: "tests".into(),
            created_unix: 0,
        };
        create_overlay(base, &custom, &info, b"device", opts, &|_| {}, Vec::new()).unwrap().0
    }

    fn apply(&self, base: &Base, overlay: &[u8], tag: &str) -> Vec<Vec<u8>> {
        let outputs: Vec<(String, std::path::PathBuf)> =
            self.names.iter().map(|n| (n.to_string(), self.dir.path().join(format!("out-{tag}-{n}")))).collect();
        let opts = ApplyOptions {
            base_id: BaseId([9; 32]),
            outputs: outputs.clone(),
            fsync: false,
            qcow2_disks: false,
            max_disk_growth: DEFAULT_MAX_DISK_GROWTH,
        };
        let report = apply_overlay(base, overlay, &opts, &|_| {}).unwrap();
        assert_eq!(report.device_state, b"device");
        outputs.iter().map(|(_, p)| std::fs::read(p).unwrap()).collect()
    }
}

/// The touch order the tests segment by: a few chunks of both images, out of address order.
fn touched() -> TouchOrder {
    TouchOrder { chunks: vec![(0, 120), (1, 50), (0, 75), (0, 12), (1, 4), (0, 120), (0, 201)], working_set: 7 }
}

fn segmented(p: &Pair, base: &Base, compression: Compression) -> (Vec<u8>, SegmentStats) {
    let plain = p.overlay(base, &CreateOptions { compression, ..CreateOptions::default() });
    let opts = SegmentOptions { segment_bytes: 16 << 10, tail_segment_bytes: 16 << 10, level: 3, granule_chunks: 1 };
    segment_overlay(&plain[..], &touched(), &opts, Vec::new()).unwrap()
}

#[test]
fn a_segmented_overlay_rebuilds_the_same_images() {
    let p = pair();
    let base = p.base();
    for compression in [Compression::Zstd, Compression::Xz, Compression::None] {
        let (bytes, stats) = segmented(&p, &base, compression);
        let r = OverlayReader::new(&bytes[..]).unwrap();
        assert_eq!(r.version(), (1, 3));
        assert!(stats.segments > 5, "{stats:?}");
        assert_eq!(p.apply(&base, &bytes, &format!("{compression:?}")), p.custom, "{compression:?}");
    }
}

/// Rebuilds the images from the head, the trailer and the segments read alone, in reverse.
#[test]
fn segments_read_alone_in_any_order_rebuild_the_images() {
    let p = pair();
    let base = p.base();
    let (bytes, stats) = segmented(&p, &base, Compression::Zstd);
    let head = OverlayReader::new(&bytes[..]).unwrap().into_head().unwrap();
    assert_eq!(head.device_state, b"device");
    let (at, _) = head.trailer_range();
    let trailer = head.check_trailer(&bytes[at as usize..]).unwrap();
    let offsets = head.index.offsets(head.len);
    assert_eq!(head.index.prefetch, stats.prefetch);

    // Every touched chunk that the overlay writes is in the prefetched segments, and the
    // first touched one in the first segment.
    let map = head.index.chunk_map();
    assert_eq!(map.segment_of(0, 120), Some(0));
    for (img, c) in touched().chunks {
        if let Some(k) = map.segment_of(img, c) {
            assert!((k as u64) < head.index.prefetch, "chunk {c} of image {img} in segment {k}");
        }
    }
    assert_eq!(map.segment_of(0, 0), None, "unchanged chunks are in no segment");

    let mut images = p.base.clone();
    for k in (0..head.index.segments.len()).rev() {
        let frame = &bytes[offsets[k] as usize..offsets[k + 1] as usize];
        let blob = read_segment(frame, &head.index, k, &head.meta).unwrap();
        for r in blob.records() {
            let (i, c) = (r.image() as usize, r.chunk() as usize);
            let at = c * PAGE;
            match r {
                RecordRef::Zero { count, .. } => images[i][at..at + count as usize * PAGE].fill(0),
                RecordRef::CopyBase { count, src, .. } => {
                    let s = src.chunk as usize * PAGE;
                    let from = p.base[src.image as usize][s..s + count as usize * PAGE].to_vec();
                    images[i][at..at + from.len()].copy_from_slice(&from);
                }
                RecordRef::CopySelf { src, .. } => {
                    let s = src.chunk as usize * PAGE;
                    let from = images[src.image as usize][s..s + PAGE].to_vec();
                    images[i][at..at + PAGE].copy_from_slice(&from);
                }
                RecordRef::Patch { patch, .. } => {
                    let old = p.base[i][at..at + PAGE].to_vec();
                    apply_patch(&old, patch, &mut images[i][at..at + PAGE]).unwrap();
                }
                RecordRef::Raw { data, .. } => images[i][at..at + data.len()].copy_from_slice(data),
            }
        }
    }
    assert_eq!(images, p.custom);
    for (i, img) in images.iter().enumerate() {
        assert_eq!(overlay_format::ImageDigest::of_bytes(img), trailer.image_digests[i]);
    }
}

/// `bytes` with its index frame (the third) replaced by `index`, resealed.
fn with_index(bytes: &[u8], index: &overlay_format::SegmentIndex) -> Vec<u8> {
    let mut out = bytes[..16].to_vec();
    let mut at = 16usize;
    let mut frame = 0;
    while at < bytes.len() {
        let stored = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()) as usize;
        let (mut h, mut p) = (bytes[at..at + 40].to_vec(), bytes[at + 40..at + 40 + stored].to_vec());
        if frame == 2 {
            assert_eq!(h[0], 5, "the third frame is the index");
            p = postcard::to_stdvec(index).unwrap();
            h[8..16].copy_from_slice(&(p.len() as u64).to_le_bytes());
            h[16..24].copy_from_slice(&(p.len() as u64).to_le_bytes());
            let mut sum = blake3::Hasher::new();
            sum.update(&h[..24]);
            sum.update(&p);
            h[24..40].copy_from_slice(&sum.finalize().as_bytes()[..16]);
        }
        out.extend_from_slice(&h);
        out.extend_from_slice(&p);
        at += 40 + stored;
        frame += 1;
    }
    out
}

#[test]
fn damaged_or_swapped_segments_and_a_forged_index_are_refused() {
    let p = pair();
    let base = p.base();
    let (bytes, _) = segmented(&p, &base, Compression::Zstd);
    let head = OverlayReader::new(&bytes[..]).unwrap().into_head().unwrap();
    let offsets = head.index.offsets(head.len);
    let frame = |k: usize| bytes[offsets[k] as usize..offsets[k + 1] as usize].to_vec();

    let mut flipped = frame(1);
    let n = flipped.len();
    flipped[n - 3] ^= 1;
    assert!(read_segment(&flipped, &head.index, 1, &head.meta).is_err(), "a flipped payload byte");
    assert!(read_segment(&frame(2), &head.index, 1, &head.meta).is_err(), "another segment's bytes");
    assert!(read_segment(&frame(1)[..n - 1], &head.index, 1, &head.meta).is_err(), "a short segment");

    // An index that names other chunks, resealed: its frame reads, the trailer catches it.
    let mut forged_index = head.index.clone();
    let runs = forged_index.segments[0].runs.clone();
    forged_index.segments[0].runs = std::mem::replace(&mut forged_index.segments[1].runs, runs);
    let forged = with_index(&bytes, &forged_index);
    let forged_head = OverlayReader::new(&forged[..]).unwrap().into_head().unwrap();
    let (at, _) = forged_head.trailer_range();
    let err = forged_head.check_trailer(&forged[at as usize..]).unwrap_err();
    assert!(err.to_string().contains("stream digest"), "{err}");
    // A segment whose records write other chunks than its (forged) entry.
    assert!(read_segment(&frame(0), &forged_index, 0, &head.meta).is_err());
    // An index frame with a flipped byte and no new checksum does not even read.
    let mut flipped_index = bytes.clone();
    flipped_index[head.len as usize - 5] ^= 1;
    assert!(OverlayReader::new(&flipped_index[..]).unwrap().into_head().is_err());

    // The stream reader refuses the same damage.
    let mut damaged = bytes.clone();
    damaged[offsets[1] as usize + 45] ^= 1;
    let mut r = OverlayReader::new(&damaged[..]).unwrap();
    let mut err = None;
    loop {
        match r.next_blob() {
            Ok(Some(b)) => {
                if let Err(e) = b.decode_for(r.meta()) {
                    err = Some(e);
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert!(err.is_some(), "a damaged segment in a stream");
}

#[test]
fn without_a_touch_order_segments_follow_the_address_order() {
    let p = pair();
    let base = p.base();
    let plain = p.overlay(&base, &CreateOptions::default());
    let opts = SegmentOptions { segment_bytes: 16 << 10, tail_segment_bytes: 16 << 10, level: 3, granule_chunks: 1 };
    let (bytes, stats) = segment_overlay(&plain[..], &TouchOrder::default(), &opts, Vec::new()).unwrap();
    assert_eq!(stats.prefetch, 0);
    let head = OverlayReader::new(&bytes[..]).unwrap().into_head().unwrap();
    let firsts: Vec<_> = head.index.segments.iter().map(|s| (s.runs[0].image, s.runs[0].chunk)).collect();
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(firsts, sorted);
    assert_eq!(p.apply(&base, &bytes, "address"), p.custom);
}

/// The working set's segments are cut at `segment_bytes` and end where it ends; the rest at
/// `tail_segment_bytes`.
#[test]
fn the_working_set_ends_a_segment_and_the_rest_is_cut_smaller() {
    let p = pair();
    let base = p.base();
    let plain = p.overlay(&base, &CreateOptions::default());
    let order = touched();
    let opts = SegmentOptions { segment_bytes: 64 << 10, tail_segment_bytes: 8 << 10, level: 3, granule_chunks: 1 };
    let (bytes, stats) = segment_overlay(&plain[..], &order, &opts, Vec::new()).unwrap();
    let head = OverlayReader::new(&bytes[..]).unwrap().into_head().unwrap();
    let map = head.index.chunk_map();
    let prefetch = head.index.prefetch as usize;
    assert!(prefetch > 0);
    // Every prefetched segment holds a touched chunk: nothing untouched rides along.
    for k in 0..prefetch {
        let s = &head.index.segments[k];
        let touched_here = order.chunks.iter().any(|&(img, c)| map.segment_of(img, c) == Some(k));
        assert!(touched_here, "segment {k} of the working set holds no touched chunk: {:?}", s.runs);
    }
    let tail = &head.index.segments[prefetch..];
    assert!(tail.len() > 3, "{stats:?}");
    // A segment closes at the first unit past its target: a tail segment stays within one
    // record of 8 KiB (a chunk and its 12-byte header, or a run).
    for s in tail {
        assert!(s.raw_len as usize <= (8 << 10) + PAGE + 64 || s.runs.len() == 1, "{s:?}");
    }
    let small = SegmentOptions { segment_bytes: 8 << 10, ..opts.clone() };
    let (_, fine) = segment_overlay(&plain[..], &order, &small, Vec::new()).unwrap();
    assert_eq!(fine.segments - fine.prefetch, stats.segments - stats.prefetch, "the tail is cut the same");
    assert_eq!(p.apply(&base, &bytes, "tail"), p.custom);
}

#[test]
fn merged_touch_orders_keep_the_first_order_and_add_the_others_working_sets() {
    let mut a = TouchOrder { chunks: vec![(0, 5), (0, 1), (0, 9), (1, 2)], working_set: 2 };
    let b = TouchOrder { chunks: vec![(0, 1), (0, 9), (0, 7), (0, 5), (0, 8)], working_set: 3 };
    a.merge(&b);
    // 9 was touched after the answer in the first run, before it in the second: working set.
    assert_eq!(a.chunks, vec![(0, 5), (0, 1), (0, 9), (0, 7), (1, 2), (0, 8)]);
    assert_eq!(a.working_set, 4);
    let before = a.clone();
    a.merge(&TouchOrder::default());
    assert_eq!((a.chunks, a.working_set), (before.chunks, before.working_set));
}
