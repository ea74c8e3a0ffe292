//! Round trips, corruption, limits and golden files of overlay format v1.

use std::io::{self, Read};

use overlay_format::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn spec() -> VmSpec {
    VmSpec {
        machine_type: "pc-q35-10.0".into(),
        cpu_model: "qemu64".into(),
        vcpus: 1,
        ram_bytes: 64 * 4096,
        qemu_version: "10.0.2".into(),
        accelerator: "tcg".into(),
        disks: vec![DiskSpec { name: "disk0".into(), size_bytes: 10 * 4096 + 100 }],
        kernel_cmdline: Some("console=ttyS0".into()),
    }
}

fn meta(compression: Compression) -> OverlayMeta {
    OverlayMeta {
        base_id: BaseId([0x42; 32]),
        spec: spec(),
        images: vec![
            ImageMeta { name: "memory".into(), kind: ImageKind::Memory, size: 64 * 4096, base_size: 64 * 4096 },
            ImageMeta { name: "disk0".into(), kind: ImageKind::Disk, size: 10 * 4096 + 100, base_size: 8 * 4096 },
        ],
        compression,
        forwards: vec![PortForward { protocol: Protocol::Tcp, host_port: 2222, guest_port: 22 }],
        name: "golden".into(),
        created_unix: 1_700_000_000,
        creator: "overlay-format tests".into(),
    }
}

/// Every record kind, over two blobs, deterministic.
fn sample_blobs() -> Vec<Vec<Record>> {
    let mut patch_base = vec![0u8; 4096];
    let mut patch_new = vec![0u8; 4096];
    for (i, b) in patch_base.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    patch_new.copy_from_slice(&patch_base);
    patch_new[100] = 0xff;
    patch_new[3000..3010].fill(7);
    let patch = encode_patch(&patch_base, &patch_new, 2048).unwrap();
    vec![
        vec![
            Record::Zero { image: 0, chunk: 0, count: 3 },
            Record::CopyBase { image: 0, chunk: 3, count: 2, src: ChunkRef { image: 1, chunk: 4 } },
            Record::Raw { image: 0, chunk: 5, data: (0..8192u32).map(|i| (i * 31 % 256) as u8).collect() },
            Record::CopySelf { image: 0, chunk: 9, src: ChunkRef { image: 0, chunk: 5 } },
        ],
        vec![
            Record::Patch { image: 1, chunk: 2, patch },
            // The disk's last chunk is 100 bytes long.
            Record::Raw { image: 1, chunk: 9, data: [vec![1u8; 4096], vec![2u8; 100]].concat() },
            Record::Zero { image: 1, chunk: 0, count: 1 },
        ],
    ]
}

fn write_overlay(meta: &OverlayMeta, blobs: &[Vec<Record>], level: i32) -> Vec<u8> {
    let mut w = OverlayWriter::new(Vec::new(), meta).unwrap();
    w.write_device_state(b"QEVM device state bytes", level).unwrap();
    for records in blobs {
        let mut b = BlobBuilder::new();
        for r in records {
            b.push(r);
        }
        w.write_blob(&b.seal(meta.compression, level).unwrap()).unwrap();
    }
    let t = w.trailer(vec![ImageDigest([1; 32]), ImageDigest([2; 32])]);
    w.finish(&t).unwrap()
}

/// An overlay whose blobs are segments of one chained zstd frame (codec 3) or .xz stream
/// (codec 4).
fn write_chained(c: Compression, blobs: &[Vec<Record>], level: i32) -> Vec<u8> {
    let mut w = OverlayWriter::new(Vec::new(), &meta(c)).unwrap();
    w.write_device_state(b"QEVM device state bytes", level).unwrap();
    let mut chain = ChainEncoder::new(c, level).unwrap();
    for (i, records) in blobs.iter().enumerate() {
        let mut b = BlobBuilder::new();
        for r in records {
            b.push(r);
        }
        let sealed = b.seal_chained(&mut chain, i + 1 == blobs.len()).unwrap();
        assert!(sealed.is_chained());
        w.write_blob(&sealed).unwrap();
    }
    let t = w.trailer(vec![ImageDigest([1; 32]), ImageDigest([2; 32])]);
    w.finish(&t).unwrap()
}

/// An overlay whose blobs are chained in two lanes (format 1.2): `lanes[i]` is blob `i`'s
/// lane, and each lane's last blob ends its frame.
fn write_lanes(c: Compression, blobs: &[Vec<Record>], lanes: &[u8], level: i32) -> Vec<u8> {
    let mut w = OverlayWriter::new(Vec::new(), &meta(c)).unwrap();
    w.write_device_state(b"QEVM device state bytes", level).unwrap();
    let mut chains: Vec<_> = (0..MAX_LANES).map(|l| ChainEncoder::for_lane(c, level, l).unwrap()).collect();
    for (i, records) in blobs.iter().enumerate() {
        let mut b = BlobBuilder::new();
        for r in records {
            b.push(r);
        }
        let lane = lanes[i];
        let end = !lanes[i + 1..].contains(&lane);
        let sealed = b.seal_chained(&mut chains[usize::from(lane)], end).unwrap();
        assert_eq!(sealed.lane(), lane);
        w.write_blob(&sealed).unwrap();
    }
    let t = w.trailer(vec![ImageDigest([1; 32]), ImageDigest([2; 32])]);
    w.finish(&t).unwrap()
}

/// A segmented overlay (format 1.3): each blob a segment compressed alone, after an index that
/// holds its frame header and the chunks it writes; the first `prefetch` segments marked for
/// fetching first.
fn write_segmented(c: Compression, blobs: &[Vec<Record>], level: i32, prefetch: u64) -> Vec<u8> {
    let m = meta(c);
    let mut w = OverlayWriter::new_segmented(Vec::new(), &m).unwrap();
    w.write_device_state(b"QEVM device state bytes", level).unwrap();
    let sealed: Vec<_> = blobs
        .iter()
        .map(|records| {
            let mut b = BlobBuilder::new();
            for r in records {
                b.push(r);
            }
            b.seal(c, level).unwrap()
        })
        .collect();
    let segments =
        sealed.iter().map(|blob| Segment::of(blob, segment::written_runs(&blob.decode(c).unwrap()))).collect();
    w.write_index(&SegmentIndex { prefetch, segments }).unwrap();
    for blob in &sealed {
        w.write_blob(blob).unwrap();
    }
    let t = w.trailer(vec![ImageDigest([1; 32]), ImageDigest([2; 32])]);
    w.finish(&t).unwrap()
}

/// The sample overlay in every encoding a writer produces.
fn every_encoding() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<_> = [("none", Compression::None), ("zstd", Compression::Zstd), ("xz", Compression::Xz)]
        .into_iter()
        .map(|(n, c)| (n, write_overlay(&meta(c), &sample_blobs(), 3)))
        .collect();
    v.push(("zstd chained", write_chained(Compression::Zstd, &sample_blobs(), 3)));
    v.push(("xz chained", write_chained(Compression::Xz, &sample_blobs(), 3)));
    v.push(("zstd lanes", write_lanes(Compression::Zstd, &sample_blobs(), &[1, 0], 3)));
    v.push(("xz lanes", write_lanes(Compression::Xz, &sample_blobs(), &[1, 0], 3)));
    v
}

#[derive(Debug, PartialEq)]
struct Read_ {
    meta: OverlayMeta,
    device_state: Vec<u8>,
    blobs: Vec<Vec<Record>>,
    trailer: Trailer,
}

fn read_overlay(input: impl Read) -> Result<Read_, DecodeError> {
    let mut r = OverlayReader::new(input)?;
    let device_state = r.device_state()?.to_vec();
    let mut blobs = Vec::new();
    while let Some(b) = r.next_blob()? {
        let d = b.decode_for(r.meta())?;
        blobs.push(d.records().map(|x| x.to_owned()).collect());
    }
    Ok(Read_ { meta: r.meta().clone(), device_state, blobs, trailer: r.trailer().unwrap().clone() })
}

const ALL: [Compression; 3] = [Compression::None, Compression::Zstd, Compression::Xz];

#[test]
fn round_trip_every_record_kind_and_compression() {
    for (name, bytes) in every_encoding() {
        let got = read_overlay(&bytes[..]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let c = got.meta.compression;
        assert_eq!(got.meta, meta(c));
        // Only compressed overlays are marked 1.2: they may hold chained blobs, in lanes.
        assert_eq!(bytes[10], if c == Compression::None { 0 } else { 2 }, "{name}");
        assert_eq!(got.device_state, b"QEVM device state bytes");
        assert_eq!(got.blobs, sample_blobs());
        assert_eq!(got.trailer.blob_count, 2);
        assert_eq!(got.trailer.record_count, 7);
    }
}

/// Returns 1..=max bytes per read at random, like a socket.
struct ShortReads<R> {
    inner: R,
    rng: rand::rngs::StdRng,
    max: usize,
}

impl<R: Read> Read for ShortReads<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.rng.gen_range(1..=self.max.min(buf.len()));
        self.inner.read(&mut buf[..n])
    }
}

#[test]
fn short_reads_give_identical_results() {
    for (_, bytes) in every_encoding() {
        let whole = read_overlay(&bytes[..]).unwrap();
        for (seed, max) in [(1u64, 1usize), (2, 7), (3, 100), (4, 5000)] {
            let sr = ShortReads { inner: &bytes[..], rng: rand::rngs::StdRng::seed_from_u64(seed), max };
            assert_eq!(read_overlay(sr).unwrap(), whole);
        }
    }
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    for (_, bytes) in every_encoding().into_iter().filter(|(n, _)| !n.starts_with("xz")) {
        for len in 0..bytes.len() {
            let err = read_overlay(&bytes[..len]).expect_err("a truncated overlay must not read");
            assert!(matches!(err, DecodeError::Truncated { .. }), "cut at {len}: expected Truncated, got {err}");
        }
    }
}

#[test]
fn every_flipped_bit_is_detected() {
    for bytes in [
        write_overlay(&meta(Compression::Zstd), &sample_blobs(), 3),
        write_chained(Compression::Zstd, &sample_blobs(), 3),
        write_chained(Compression::Xz, &sample_blobs(), 3),
        write_lanes(Compression::Zstd, &sample_blobs(), &[1, 0], 3),
    ] {
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(read_overlay(&b[..]).is_err(), "flip of bit {bit} at byte {i} went unnoticed");
            }
        }
    }
}

/// The frames of an overlay: (header, payload) each, trailer included.
fn split_frames(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 16usize;
    while at < bytes.len() {
        let stored = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()) as usize;
        frames.push((bytes[at..at + 40].to_vec(), bytes[at + 40..at + 40 + stored].to_vec()));
        at += 40 + stored;
    }
    frames
}

/// Re-encodes an overlay from its file header and the frames before the trailer, with correct
/// checksums, stream digest and trailer counts: what a writer that breaks a rule the checksums
/// cannot catch would produce.
fn reframe(file_header: &[u8], frames: &[(Vec<u8>, Vec<u8>)], trailer: &Trailer) -> Vec<u8> {
    let checksum = |h: &[u8], p: &[u8]| {
        let mut x = blake3::Hasher::new();
        x.update(&h[..24]);
        x.update(p);
        x.finalize().as_bytes()[..16].to_vec()
    };
    let mut out = file_header.to_vec();
    let mut stream = blake3::Hasher::new();
    stream.update(file_header);
    let mut t = trailer.clone();
    (t.blob_count, t.record_count) = (0, 0);
    for (h, p) in frames {
        let mut h = h.clone();
        let sum = checksum(&h, p);
        h[24..40].copy_from_slice(&sum);
        stream.update(&h);
        if h[0] == 3 {
            t.blob_count += 1;
            t.record_count += u64::from(u32::from_le_bytes(h[4..8].try_into().unwrap()));
        }
        out.extend_from_slice(&h);
        out.extend_from_slice(p);
    }
    let mut payload = stream.finalize().as_bytes().to_vec();
    payload.extend(postcard::to_stdvec(&t).unwrap());
    let mut h = vec![4u8, 0, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    h.extend(checksum(&h, &payload));
    out.extend(h);
    out.extend(payload);
    out
}

#[test]
fn chained_blobs_keep_their_rules() {
    for c in [Compression::Zstd, Compression::Xz] {
        chained_rules(c);
    }
}

fn chained_rules(c: Compression) {
    let bytes = write_chained(c, &sample_blobs(), 3);
    let trailer = read_overlay(&bytes[..]).unwrap().trailer;
    let frames = split_frames(&bytes);
    let (head, body) = (&bytes[..16], &frames[..frames.len() - 1]);
    // Re-encoding changes nothing.
    assert_eq!(reframe(head, body, &trailer), bytes);
    // Blobs of a chain cannot be reordered.
    let swapped = [body[0].clone(), body[1].clone(), body[3].clone(), body[2].clone()];
    assert!(matches!(read_overlay(&reframe(head, &swapped, &trailer)[..]), Err(DecodeError::Decompress { .. })));
    // Nor dropped: the first alone leaves the frame open, the second alone has no frame header.
    let open = reframe(head, &body[..3], &trailer);
    match read_overlay(&open[..]) {
        Err(DecodeError::TrailerMismatch { reason, .. }) => assert!(reason.contains("does not end"), "{reason}"),
        other => panic!("expected TrailerMismatch, got {other:?}"),
    }
    let headless = [body[0].clone(), body[1].clone(), body[3].clone()];
    assert!(matches!(read_overlay(&reframe(head, &headless, &trailer)[..]), Err(DecodeError::Decompress { .. })));
    // One segment's bytes moved to the other: each must yield exactly its own raw_len.
    let (mut a, mut b) = (body[2].clone(), body[3].clone());
    let moved = a.1.split_off(a.1.len() - 3);
    b.1.splice(0..0, moved);
    for (h, p) in [(&mut a.0, &a.1), (&mut b.0, &b.1)] {
        h[8..16].copy_from_slice(&(p.len() as u64).to_le_bytes());
    }
    let shifted = [body[0].clone(), body[1].clone(), a, b];
    assert!(matches!(read_overlay(&reframe(head, &shifted, &trailer)[..]), Err(DecodeError::Decompress { .. })));
    // Chained codecs are not codecs of format 1.0, nor of another compressor's overlays.
    let mut old = head.to_vec();
    old[10] = 0;
    assert!(matches!(read_overlay(&reframe(&old, body, &trailer)[..]), Err(DecodeError::Malformed { .. })));
    let other = if c == Compression::Zstd { Compression::Xz } else { Compression::Zstd };
    for o in [other, Compression::None] {
        let ob = write_overlay(&meta(o), &sample_blobs(), 3);
        let of = split_frames(&ob);
        let mixed = [of[0].clone(), of[1].clone(), body[2].clone(), body[3].clone()];
        let mut v11 = ob[..16].to_vec();
        v11[10] = 1;
        assert!(matches!(read_overlay(&reframe(&v11, &mixed, &trailer)[..]), Err(DecodeError::Malformed { .. })));
    }
    // The writer refuses an unended chain, and a chained blob in another codec's overlay.
    let mut chain = ChainEncoder::new(c, 1).unwrap();
    let mut b = BlobBuilder::new();
    b.push_zero(0, 0, 1);
    let sealed = b.seal_chained(&mut chain, false).unwrap();
    assert!(chain.is_open());
    let mut w = OverlayWriter::new(Vec::new(), &meta(c)).unwrap();
    w.write_device_state(b"x", 1).unwrap();
    w.write_blob(&sealed).unwrap();
    let t = w.trailer(vec![ImageDigest([0; 32]); 2]);
    assert!(matches!(w.finish(&t), Err(EncodeError::Order { .. })));
    let mut w = OverlayWriter::new(Vec::new(), &meta(other)).unwrap();
    w.write_device_state(b"x", 1).unwrap();
    assert!(matches!(w.write_blob(&sealed), Err(EncodeError::Invalid { .. })));
    // A chained blob sealed here cannot be decoded out of its stream.
    assert!(matches!(sealed.decode(c), Err(DecodeError::Malformed { .. })));
}

#[test]
fn lanes_keep_their_rules() {
    for c in [Compression::Zstd, Compression::Xz] {
        lane_rules(c);
    }
}

fn lane_rules(c: Compression) {
    let blobs = [sample_blobs(), sample_blobs(), sample_blobs()].concat();
    let lanes = [0, 3, 0, 3, 3, 0];
    let bytes = write_lanes(c, &blobs, &lanes, 3);
    let got = read_overlay(&bytes[..]).unwrap();
    assert_eq!(got.blobs, blobs);
    let frames = split_frames(&bytes);
    let (head, body) = (&bytes[..16], &frames[..frames.len() - 1]);
    assert_eq!(reframe(head, body, &got.trailer), bytes);
    let with_lane = |k: usize, lane: u8| {
        let mut b = body.to_vec();
        b[k].0[2] = lane;
        reframe(head, &b, &got.trailer)
    };
    // A blob moved to another lane does not continue that lane's frame.
    assert!(read_overlay(&with_lane(5, 0)[..]).is_err());
    // Lanes stop below MAX_LANES; the device state has none.
    for (k, lane) in [(2, MAX_LANES), (2, 255), (1, 1)] {
        match read_overlay(&with_lane(k, lane)[..]) {
            Err(DecodeError::Malformed { reason, .. }) => assert!(reason.contains("lane"), "{reason}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
    // Nor do lanes exist in a 1.1 stream, or on a blob compressed alone.
    let mut v11 = head.to_vec();
    v11[10] = 1;
    assert!(matches!(read_overlay(&reframe(&v11, body, &got.trailer)[..]), Err(DecodeError::Malformed { .. })));
    let alone = write_overlay(&meta(c), &sample_blobs(), 3);
    let mut af = split_frames(&alone);
    af[2].0[2] = 1;
    let t = read_overlay(&alone[..]).unwrap().trailer;
    assert!(matches!(
        read_overlay(&reframe(&alone[..16], &af[..af.len() - 1], &t)[..]),
        Err(DecodeError::Malformed { .. })
    ));
    // Every lane's frame must end: drop lane 3's last blob.
    let mut open = body.to_vec();
    open.remove(6);
    match read_overlay(&reframe(head, &open, &got.trailer)[..]) {
        Err(DecodeError::TrailerMismatch { reason, .. }) => assert!(reason.contains("lane 3"), "{reason}"),
        other => panic!("expected TrailerMismatch, got {other:?}"),
    }
    // The writer checks the same.
    assert!(ChainEncoder::for_lane(c, 1, MAX_LANES).is_err());
    let mut w = OverlayWriter::new(Vec::new(), &meta(c)).unwrap();
    w.write_device_state(b"x", 1).unwrap();
    for lane in [0, 2] {
        let mut b = BlobBuilder::new();
        b.push_zero(0, 0, 1);
        w.write_blob(&b.seal_chained(&mut ChainEncoder::for_lane(c, 1, lane).unwrap(), lane == 0).unwrap()).unwrap();
    }
    let t = w.trailer(vec![ImageDigest([0; 32]); 2]);
    assert!(matches!(w.finish(&t), Err(EncodeError::Order { .. })));
}

/// Many segments of assorted sizes, some empty of records, across several frames.
#[test]
fn long_chains_round_trip() {
    for c in [Compression::Zstd, Compression::Xz] {
        long_chain(c);
    }
}

fn long_chain(c: Compression) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut w = OverlayWriter::new(Vec::new(), &meta(c)).unwrap();
    w.write_device_state(b"x", 1).unwrap();
    let mut chain = ChainEncoder::new(c, 1).unwrap();
    let mut expect = Vec::new();
    for i in 0..40 {
        let mut records = Vec::new();
        for _ in 0..rng.gen_range(0..4) {
            let n = rng.gen_range(1..4usize);
            let mut data = vec![0u8; n * 4096];
            // Half repeats of a shared pattern (found across segments), half noise.
            for (k, x) in data.iter_mut().enumerate() {
                *x = if rng.gen_bool(0.5) { (k % 199) as u8 } else { rng.gen() };
            }
            records.push(Record::Raw { image: 0, chunk: rng.gen_range(0..60), data });
        }
        let mut b = BlobBuilder::new();
        for r in &records {
            b.push(r);
        }
        // A frame ends every 15 blobs; the next blob starts a new one.
        w.write_blob(&b.seal_chained(&mut chain, i % 15 == 14 || i == 39).unwrap()).unwrap();
        expect.push(records);
        // A blob compressed alone may sit between chained ones.
        if i == 20 {
            let mut b = BlobBuilder::new();
            b.push_zero(1, 0, 1);
            w.write_blob(&b.seal(c, 1).unwrap()).unwrap();
            expect.push(vec![Record::Zero { image: 1, chunk: 0, count: 1 }]);
        }
    }
    let t = w.trailer(vec![ImageDigest([0; 32]); 2]);
    let bytes = w.finish(&t).unwrap();
    let got = read_overlay(&bytes[..]).unwrap();
    assert_eq!(got.blobs, expect);
    // The same, handing each blob's buffer back (scribbled over) for the chained blobs after
    // it, and buffers of other sizes besides.
    let mut r = OverlayReader::new(&bytes[..]).unwrap();
    let mut again = Vec::new();
    let mut k = 0;
    while let Some(b) = r.next_blob().unwrap() {
        let d = b.into_decoded_for(&r.meta().clone()).unwrap();
        again.push(d.records().map(|x| x.to_owned()).collect::<Vec<_>>());
        let mut buf = d.into_buffer();
        buf.fill(0xAA);
        r.recycle(buf);
        k += 1;
        r.recycle(vec![0x55; k * 1000]);
        r.recycle(Vec::with_capacity(k * 3000));
    }
    assert_eq!(again, expect);
}

#[test]
fn trailing_garbage_is_rejected() {
    let mut bytes = write_overlay(&meta(Compression::None), &sample_blobs(), 0);
    let end = bytes.len() as u64;
    bytes.push(0);
    match read_overlay(&bytes[..]) {
        Err(DecodeError::TrailingData { offset }) => assert_eq!(offset, end),
        other => panic!("expected TrailingData, got {other:?}"),
    }
}

#[test]
fn dropped_or_duplicated_blob_frames_are_detected() {
    let m = meta(Compression::None);
    let bytes = write_overlay(&m, &sample_blobs(), 0);
    // Locate frames by walking the headers.
    let mut frames = Vec::new();
    let mut at = 16usize;
    while at < bytes.len() {
        let stored = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()) as usize;
        frames.push((at, 40 + stored));
        at += 40 + stored;
    }
    assert_eq!(frames.len(), 5, "meta, device state, 2 blobs, trailer");
    let (b0, b0len) = frames[2];
    let dropped = [&bytes[..b0], &bytes[b0 + b0len..]].concat();
    assert!(matches!(read_overlay(&dropped[..]), Err(DecodeError::TrailerMismatch { .. })));
    let doubled = [&bytes[..b0 + b0len], &bytes[b0..]].concat();
    assert!(matches!(read_overlay(&doubled[..]), Err(DecodeError::TrailerMismatch { .. })));
}

fn frame_header(kind: u8, codec: u8, records: u32, stored: u64, raw: u64) -> Vec<u8> {
    let mut h = vec![kind, codec, 0, 0];
    h.extend_from_slice(&records.to_le_bytes());
    h.extend_from_slice(&stored.to_le_bytes());
    h.extend_from_slice(&raw.to_le_bytes());
    h.extend_from_slice(&[0; 16]);
    h
}

#[test]
fn oversized_lengths_are_rejected_before_allocating() {
    let bytes = write_overlay(&meta(Compression::None), &sample_blobs(), 0);
    let header = &bytes[..16];
    for (kind, raw) in [(1u8, MAX_META_LEN + 1), (1, 1 << 60), (1, u64::MAX)] {
        let mut b = header.to_vec();
        b.extend(frame_header(kind, 0, 0, raw, raw));
        match OverlayReader::new(&b[..]) {
            Err(DecodeError::LengthTooLarge { len, .. }) => assert_eq!(len, raw),
            other => panic!("expected LengthTooLarge, got {:?}", other.err()),
        }
    }
    // A blob frame claiming 2^60 bytes after a valid start.
    let meta_end = 16 + 40 + u64::from_le_bytes(bytes[16 + 8..16 + 16].try_into().unwrap()) as usize;
    let ds_end = meta_end + 40 + u64::from_le_bytes(bytes[meta_end + 8..meta_end + 16].try_into().unwrap()) as usize;
    let mut b = bytes[..ds_end].to_vec();
    b.extend(frame_header(3, 0, 1, 1 << 60, 1 << 60));
    let mut r = OverlayReader::new(&b[..]).unwrap();
    assert!(matches!(r.next_blob(), Err(DecodeError::LengthTooLarge { what: "blob", .. })));
}

#[test]
fn wrong_magic_and_versions_are_rejected() {
    let bytes = write_overlay(&meta(Compression::None), &sample_blobs(), 0);
    let mut b = bytes.clone();
    b[1] = b'X';
    assert!(matches!(read_overlay(&b[..]), Err(DecodeError::BadMagic { .. })));
    let mut b = bytes.clone();
    b[8] = 2; // major 2
    assert!(matches!(read_overlay(&b[..]), Err(DecodeError::UnsupportedVersion { major: 2, minor: 0 })));
    let mut b = bytes.clone();
    b[10] = 4; // minor 4, newer than this reader
    assert!(matches!(read_overlay(&b[..]), Err(DecodeError::UnsupportedVersion { major: 1, minor: 4 })));
    let mut b = bytes.clone();
    b[10] = 3; // a 1.3 stream must have an index after the device state
    assert!(matches!(read_overlay(&b[..]), Err(DecodeError::UnexpectedFrame { expected: "index", .. })));
    assert!(matches!(read_overlay(&b""[..]), Err(DecodeError::Truncated { offset: 0, .. })));
}

#[test]
fn records_outside_the_images_are_rejected() {
    let m = meta(Compression::None);
    for bad in [
        Record::Zero { image: 2, chunk: 0, count: 1 },
        Record::Zero { image: 0, chunk: 63, count: 2 },
        Record::Zero { image: 0, chunk: u64::MAX, count: 2 },
        Record::CopyBase { image: 0, chunk: 0, count: 1, src: ChunkRef { image: 1, chunk: 8 } },
        Record::CopySelf { image: 0, chunk: 0, src: ChunkRef { image: 1, chunk: 11 } },
        Record::Raw { image: 1, chunk: 10, data: vec![0; 4096] },
        Record::Raw { image: 1, chunk: 9, data: vec![0; 4096 + 50] },
        Record::Raw { image: 0, chunk: 0, data: vec![0; 100] },
        Record::Patch { image: 1, chunk: 11, patch: vec![0, 0, 1, 0, 1] },
        Record::Patch { image: 1, chunk: 10, patch: vec![100, 0, 1, 0, 1] },
    ] {
        let mut b = BlobBuilder::new();
        b.push(&bad);
        let sealed = b.seal(Compression::None, 0).unwrap();
        assert!(
            matches!(sealed.decode_for(&m), Err(DecodeError::Malformed { .. })),
            "{:?} was accepted",
            std::mem::discriminant(&bad)
        );
    }
}

#[test]
fn writer_enforces_order_and_trailer_counts() {
    let m = meta(Compression::None);
    let mut w = OverlayWriter::new(Vec::new(), &m).unwrap();
    let blob = || {
        let mut b = BlobBuilder::new();
        b.push_zero(0, 0, 1);
        b.seal(Compression::None, 0).unwrap()
    };
    assert!(matches!(w.write_blob(&blob()), Err(EncodeError::Order { .. })));
    w.write_device_state(b"x", 0).unwrap();
    assert!(matches!(w.write_device_state(b"x", 0), Err(EncodeError::Order { .. })));
    w.write_blob(&blob()).unwrap();
    let mut t = w.trailer(vec![ImageDigest([0; 32]); 2]);
    t.record_count = 5;
    assert!(matches!(w.finish(&t), Err(EncodeError::Invalid { .. })));
    let zstd_blob = {
        let mut b = BlobBuilder::new();
        b.push_zero(0, 0, 1);
        b.seal(Compression::Zstd, 1).unwrap()
    };
    let mut w = OverlayWriter::new(Vec::new(), &m).unwrap();
    w.write_device_state(b"x", 0).unwrap();
    assert!(matches!(w.write_blob(&zstd_blob), Err(EncodeError::Invalid { .. })));
    let mut dup = meta(Compression::None);
    dup.images[1].name = "memory".into();
    assert!(OverlayWriter::new(Vec::new(), &dup).is_err());
}

fn arb_record() -> impl Strategy<Value = Record> {
    let img = 0u8..2;
    prop_oneof![
        (img, 0u64..60, 1u64..4).prop_map(|(image, chunk, count)| Record::Zero { image, chunk: chunk.min(8), count }),
        (0u64..60, 1u64..4, 0u64..5).prop_map(|(chunk, count, s)| Record::CopyBase {
            image: 0,
            chunk,
            count,
            src: ChunkRef { image: 1, chunk: s }
        }),
        (0u64..64, 0u64..64).prop_map(|(chunk, s)| Record::CopySelf {
            image: 0,
            chunk,
            src: ChunkRef { image: 0, chunk: s }
        }),
        (0u64..64, proptest::collection::vec(any::<u8>(), 4096))
            .prop_map(|(chunk, data)| { Record::Raw { image: 0, chunk, data } }),
        (0u64..64, 0usize..4000, proptest::collection::vec(any::<u8>(), 1..90)).prop_map(|(chunk, off, bytes)| {
            let mut p = (off as u16).to_le_bytes().to_vec();
            p.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            p.extend_from_slice(&bytes);
            Record::Patch { image: 0, chunk, patch: p }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn blobs_round_trip(
        records in proptest::collection::vec(arb_record(), 1..40),
        c in 0usize..3,
        window_log in proptest::option::of(10u32..30),
        long_distance in any::<bool>(),
        executable_filter in any::<bool>(),
    ) {
        let compression = ALL[c];
        let m = meta(compression);
        let mut b = BlobBuilder::new();
        for r in &records {
            b.push(r);
        }
        // Every effort decodes with the same decoder.
        let effort = Effort { level: 1, window_log, long_distance, executable_filter };
        let sealed = b.seal_with(compression, &effort).unwrap();
        let decoded = sealed.decode_for(&m).unwrap();
        let got: Vec<Record> = decoded.records().map(|r| r.to_owned()).collect();
        prop_assert_eq!(got, records);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = read_overlay(&bytes[..]);
        // And with a valid header in front.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&bytes);
        let _ = read_overlay(&b[..]);
        // And resealed, so that the bytes after the header get past the frame checksums.
        let _ = read_overlay(&overlay_format::fuzzing::reseal(&b)[..]);
    }
}

// ---- Golden files ----------------------------------------------------------------------------

/// How a golden file's blobs are compressed.
#[derive(Clone, Copy, PartialEq)]
enum Blobs {
    Alone,
    /// One chain (format 1.1).
    Chained,
    /// Two lanes of chains (format 1.2).
    Lanes,
    /// Segments after an index (format 1.3), the first one to prefetch.
    Segmented,
}

/// Golden files: name, compression, level, blobs.
const GOLDEN: [(&str, Compression, i32, Blobs); 8] = [
    ("v1-none.ovl", Compression::None, 0, Blobs::Alone),
    ("v1-zstd.ovl", Compression::Zstd, 3, Blobs::Alone),
    ("v1-xz.ovl", Compression::Xz, 6, Blobs::Alone),
    ("v1.1-zstd-chained.ovl", Compression::Zstd, 3, Blobs::Chained),
    ("v1.1-xz-chained.ovl", Compression::Xz, 6, Blobs::Chained),
    ("v1.2-zstd-lanes.ovl", Compression::Zstd, 3, Blobs::Lanes),
    ("v1.2-xz-lanes.ovl", Compression::Xz, 6, Blobs::Lanes),
    ("v1.3-zstd-segmented.ovl", Compression::Zstd, 3, Blobs::Segmented),
];

fn golden_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// Writes the golden files that do not exist yet: `CLOUDLET_WRITE_GOLDEN=1 cargo test -p
/// overlay-format --test format golden`. Only for a new format version: files of a released
/// version never change, so existing files are never rewritten.
#[test]
fn golden_files_read_byte_exact() {
    for (name, c, level, blobs) in GOLDEN {
        let path = golden_path(name);
        let fresh = || match blobs {
            Blobs::Alone => write_overlay(&meta(c), &sample_blobs(), level),
            Blobs::Chained => write_chained(c, &sample_blobs(), level),
            Blobs::Lanes => write_lanes(c, &sample_blobs(), &[1, 0], level),
            Blobs::Segmented => write_segmented(c, &sample_blobs(), level, 1),
        };
        if std::env::var_os("CLOUDLET_WRITE_GOLDEN").is_some() && !path.exists() {
            std::fs::write(&path, fresh()).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let got = read_overlay(&bytes[..]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.meta, meta(c), "{name}");
        assert_eq!(got.device_state, b"QEVM device state bytes", "{name}");
        assert_eq!(got.blobs, sample_blobs(), "{name}");
        assert_eq!(got.trailer.image_digests, vec![ImageDigest([1; 32]), ImageDigest([2; 32])]);
        if c == Compression::None {
            // Uncompressed encoding is fully determined by the format.
            assert_eq!(bytes, fresh(), "{name} re-encodes differently");
        }
        if blobs == Blobs::Segmented {
            golden_segments_read_alone(name, &bytes);
        }
    }
}

/// A segmented golden file read as before it has all arrived: its head, then its trailer, then
/// its segments by their byte ranges, last first.
fn golden_segments_read_alone(name: &str, bytes: &[u8]) {
    assert_eq!(bytes[10], 3, "{name}: minor version");
    let head = OverlayReader::new(bytes).unwrap().into_head().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(head.meta, meta(head.meta.compression), "{name}");
    assert_eq!(head.device_state, b"QEVM device state bytes", "{name}");
    assert_eq!((head.index.prefetch, head.index.segments.len()), (1, 2), "{name}");
    let (trailer_at, max) = head.trailer_range();
    let trailer_bytes = &bytes[trailer_at as usize..];
    assert!(trailer_bytes.len() as u64 <= max, "{name}");
    let trailer = head.check_trailer(trailer_bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(trailer.image_digests, vec![ImageDigest([1; 32]), ImageDigest([2; 32])]);
    assert_eq!((trailer.blob_count, trailer.record_count), (2, 7), "{name}");
    let offsets = head.index.offsets(head.len);
    assert_eq!(offsets.last(), Some(&trailer_at), "{name}");
    let want = sample_blobs();
    for k in (0..head.index.segments.len()).rev() {
        let frame = &bytes[offsets[k] as usize..offsets[k + 1] as usize];
        let decoded =
            segment::read_segment(frame, &head.index, k, &head.meta).unwrap_or_else(|e| panic!("{name} {k}: {e}"));
        let got: Vec<Record> = decoded.records().map(|r| r.to_owned()).collect();
        assert_eq!(got, want[k], "{name}: segment {k}");
        // Only its own bytes: the other segment's range does not read as this one.
        let other = &bytes[offsets[1 - k] as usize..offsets[2 - k] as usize];
        assert!(segment::read_segment(other, &head.index, k, &head.meta).is_err(), "{name}: segment {k}");
    }
    // The trailer binds the index: with a segment's checksum changed, it no longer checks.
    let mut other = head.clone();
    other.index.segments[1].checksum[0] ^= 1;
    assert!(matches!(other.check_trailer(trailer_bytes), Err(DecodeError::TrailerMismatch { .. })), "{name}");
}

/// `bytes` with its metadata changed by `f` (checksums, stream digest and trailer recomputed).
fn with_meta(bytes: &[u8], f: impl FnOnce(&mut OverlayMeta)) -> Vec<u8> {
    let trailer = read_overlay(bytes).unwrap().trailer;
    let mut frames = split_frames(bytes);
    frames.pop(); // the trailer
    let mut m: OverlayMeta = postcard::from_bytes(&frames[0].1).unwrap();
    f(&mut m);
    let payload = postcard::to_stdvec(&m).unwrap();
    frames[0].0[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    frames[0].0[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    frames[0].1 = payload;
    reframe(&bytes[..16], &frames, &trailer)
}

/// The header, metadata and device state of `bytes`, cut off there (a few hundred bytes).
fn cut_after_device_state(bytes: &[u8]) -> Vec<u8> {
    let frames = split_frames(bytes);
    let len = 16 + frames[..2].iter().map(|(h, p)| h.len() + p.len()).sum::<usize>();
    bytes[..len].to_vec()
}

fn meta_error(bytes: &[u8]) -> String {
    match OverlayReader::new(bytes) {
        Err(e @ DecodeError::Malformed { frame: 0, .. }) => e.to_string(),
        Err(e) => panic!("not a metadata error: {e}"),
        Ok(_) => panic!("metadata accepted"),
    }
}

/// A real overlay's header and metadata with the memory image's size set to 8 TiB or 1 PiB,
/// cut off after the device state: the reader names the absurd size and what it should be,
/// not the truncation.
#[test]
fn an_absurd_memory_size_is_the_damage_reported() {
    let good = write_overlay(&meta(Compression::None), &sample_blobs(), 3);
    for size in [8u64 << 40, 1 << 50] {
        let bad = cut_after_device_state(&with_meta(&good, |m| m.images[0].size = size));
        assert!(bad.len() < 400, "{} bytes", bad.len());
        let e = meta_error(&bad);
        for want in ["images[0].size", "memory", &size.to_string(), "spec.ram_bytes", &(64 * 4096).to_string()] {
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }
    // Over the format's limit, even if the spec agrees.
    let e = meta_error(&with_meta(&good, |m| {
        m.images[0].size = 1 << 53;
        m.spec.ram_bytes = 1 << 53;
    }));
    assert!(e.contains(&(1u64 << 53).to_string()) && e.contains("limit"), "{e}");
}

#[test]
fn disk_sizes_and_names_must_match_the_spec() {
    let good = write_overlay(&meta(Compression::None), &sample_blobs(), 3);
    let e = meta_error(&with_meta(&good, |m| m.images[1].size = 1 << 45));
    for want in ["images[1].size", "disk0", &(1u64 << 45).to_string(), &(10 * 4096 + 100).to_string()] {
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    let e = meta_error(&with_meta(&good, |m| m.spec.disks[0].name = "disk1".into()));
    assert!(e.contains("disk0") && e.contains("spec.disks"), "{e}");
    let e = meta_error(&with_meta(&good, |m| m.spec.disks.push(m.spec.disks[0].clone())));
    assert!(e.contains("twice"), "{e}");
    let e = meta_error(&with_meta(&good, |m| {
        m.images[1].kind = ImageKind::Memory;
    }));
    assert!(e.contains("second memory image") || e.contains("spec.ram_bytes"), "{e}");
    let e = meta_error(&with_meta(&good, |m| {
        m.spec.disks = (0..65).map(|i| DiskSpec { name: format!("d{i}"), size_bytes: 1 }).collect();
    }));
    assert!(e.contains("65 disks"), "{e}");
    // The writer holds itself to the same rules.
    let mut m = meta(Compression::None);
    m.spec.ram_bytes += 1;
    match OverlayWriter::new(Vec::new(), &m) {
        Err(e @ EncodeError::Invalid { .. }) => assert!(e.to_string().contains("spec.ram_bytes"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the writer took a memory image of another size than the spec's RAM"),
    }
}
