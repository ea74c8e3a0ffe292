//! Rewriting an overlay as a segmented one (format 1.3): the same records, regrouped into
//! segments that each decode alone, in the order a resumed VM first touched their chunks, with
//! an index in front, so that synthesis can resume the VM before the overlay has arrived.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};

use overlay_format::segment::{normalize, ChunkRun, Segment, SegmentIndex};
use overlay_format::{
    BlobBuilder, ChunkRef, DecodeError, EncodeError, OverlayReader, OverlayWriter, Record, RecordRef, CHUNK_SIZE,
};
use rayon::prelude::*;

/// How [`segment_overlay`] cuts segments.
#[derive(Debug, Clone)]
pub struct SegmentOptions {
    /// Target size of a working-set segment before compression: those are fetched together
    /// before the VM resumes, so they can be large and compress better. Default 512 KiB.
    pub segment_bytes: usize,
    /// Target size of the segments after the working set: the VM that waits for one of their
    /// chunks waits for the whole segment, so they are smaller. Default 128 KiB.
    pub tail_segment_bytes: usize,
    /// Compression level of the segments (the overlay's compressor).
    pub level: i32,
    /// A touch counts for the aligned run of this many chunks around the touched one. Default
    /// 1: a touch order recorded through the same serving path as synthesis's (reads of up to
    /// 128 KiB, the kernel's read-around of a fault) already holds every chunk a read of the
    /// VM waits for; a larger run approximates that for an order recorded in 4 KiB reads.
    pub granule_chunks: u64,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions { segment_bytes: 512 << 10, tail_segment_bytes: 128 << 10, level: 4, granule_chunks: 1 }
    }
}

/// The chunks a resumed VM touched, in the order it first did: what [`segment_overlay`]
/// orders segments by.
#[derive(Debug, Clone, Default)]
pub struct TouchOrder {
    /// (image, chunk), first touch first; repeats are ignored.
    pub chunks: Vec<(u8, u64)>,
    /// How many of `chunks` the VM touched before its app answered: the segments that hold
    /// them are its working set, fetched before it resumes
    /// ([`overlay_format::SegmentIndex::prefetch`]).
    pub working_set: usize,
}

impl TouchOrder {
    /// Adds what another run of the same VM touched: its working set joins this one's (after
    /// it), the rest follows this one's. A resumed guest does not touch the same pages on every
    /// run (its allocator hands out other free pages), so the union of a few runs leaves the
    /// VM fewer chunks to wait for.
    pub fn merge(&mut self, other: &TouchOrder) {
        use std::collections::HashSet;
        let ours = self.working_set.min(self.chunks.len());
        let mut ws: Vec<(u8, u64)> = self.chunks[..ours].to_vec();
        let mut in_ws: HashSet<(u8, u64)> = ws.iter().copied().collect();
        for &c in &other.chunks[..other.working_set.min(other.chunks.len())] {
            if in_ws.insert(c) {
                ws.push(c);
            }
        }
        let mut seen = in_ws;
        let rest: Vec<(u8, u64)> = self.chunks[ours..]
            .iter()
            .chain(&other.chunks[other.working_set.min(other.chunks.len())..])
            .copied()
            .filter(|&c| seen.insert(c))
            .collect();
        self.working_set = ws.len();
        self.chunks = ws;
        self.chunks.extend(rest);
    }
}

/// What [`segment_overlay`] wrote.
#[derive(Debug, Clone, Default)]
pub struct SegmentStats {
    /// Segments written.
    pub segments: u64,
    /// Leading segments that hold every chunk of the touch order.
    pub prefetch: u64,
    /// Stored bytes of those leading segments' frames.
    pub prefetch_bytes: u64,
    /// Bytes of the segmented overlay.
    pub bytes: u64,
    /// Bytes of the overlay read.
    pub input_bytes: u64,
}

/// Why [`segment_overlay`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The overlay read does not decode.
    #[error("cannot read the overlay to segment")]
    Decode(#[from] DecodeError),
    /// Writing the segmented overlay failed.
    #[error("cannot write the segmented overlay")]
    Encode(#[from] EncodeError),
    /// The overlay cannot be segmented (e.g. it names a chunk twice).
    #[error("the overlay cannot be segmented: {reason}")]
    Invalid {
        /// Why.
        reason: String,
    },
}

struct Entry {
    record: Record,
    /// When its first chunk was touched (u64::MAX: never).
    rank: u64,
}

fn run_of(r: &Record) -> ChunkRun {
    let (image, chunk, count) = match r {
        Record::Zero { image, chunk, count } | Record::CopyBase { image, chunk, count, .. } => (*image, *chunk, *count),
        Record::CopySelf { image, chunk, .. } | Record::Patch { image, chunk, .. } => (*image, *chunk, 1),
        Record::Raw { image, chunk, data } => (*image, *chunk, (data.len() as u64).div_ceil(CHUNK_SIZE as u64)),
    };
    ChunkRun { image, chunk, count }
}

fn raw_size(r: &Record) -> usize {
    12 + match r {
        Record::Patch { patch, .. } => patch.len(),
        Record::Raw { data, .. } => data.len(),
        _ => 8,
    }
}

/// Reads the overlay `input` (any version) and writes it to `out` as a
/// segmented overlay: the same metadata, device state and rebuilt images, its records grouped
/// into segments of about [`SegmentOptions::segment_bytes`] (the working set) and
/// [`SegmentOptions::tail_segment_bytes`] (the rest) that each decode alone, ordered by
/// `touched`, then the rest in address order. A copy of an earlier chunk goes into the segment of its source,
/// which is placed by the first touch of either.
pub fn segment_overlay<R: Read, W: Write>(
    input: R,
    touched: &TouchOrder,
    opts: &SegmentOptions,
    out: W,
) -> Result<(W, SegmentStats), SegmentError> {
    let mut reader = OverlayReader::new(input)?;
    let meta = reader.meta().clone();
    let device_state = reader.take_device_state()?;
    let g = opts.granule_chunks.max(1);
    let mut rank: HashMap<(u8, u64), u64> = HashMap::with_capacity(touched.chunks.len());
    for (k, &(img, c)) in touched.chunks.iter().enumerate() {
        rank.entry((img, c / g)).or_insert(k as u64);
    }
    let mut entries: Vec<Entry> = Vec::new();
    while let Some(sealed) = reader.next_blob()? {
        let blob = sealed.into_decoded_for(&meta)?;
        for r in blob.records() {
            // Raw runs go chunk by chunk, each where its first touch puts it.
            let pieces: Vec<Record> = match r {
                RecordRef::Raw { image, chunk, data } => data
                    .chunks(CHUNK_SIZE)
                    .enumerate()
                    .map(|(k, d)| Record::Raw { image, chunk: chunk + k as u64, data: d.to_vec() })
                    .collect(),
                r => vec![r.to_owned()],
            };
            for record in pieces {
                let run = run_of(&record);
                let first = if rank.is_empty() {
                    u64::MAX
                } else {
                    run.chunks().filter_map(|c| rank.get(&(run.image, c / g)).copied()).min().unwrap_or(u64::MAX)
                };
                entries.push(Entry { record, rank: first });
            }
        }
    }
    let trailer = reader.trailer().cloned().expect("the trailer was read");
    let input_bytes = reader.bytes_read();

    // Which record writes each chunk: (image, first chunk) -> (end, record).
    let mut writer_of: BTreeMap<(u8, u64), (u64, usize)> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let run = run_of(&e.record);
        writer_of.insert((run.image, run.chunk), (run.chunk + run.count, i));
    }
    let mut prev: Option<((u8, u64), u64)> = None;
    for (&(img, start), &(end, _)) in &writer_of {
        if let Some(((pi, _), pe)) = prev {
            if pi == img && pe > start {
                return Err(SegmentError::Invalid {
                    reason: format!("chunk {start} of image {img} is named by two records"),
                });
            }
        }
        prev = Some(((img, start), end));
    }
    let find = |src: ChunkRef| -> Option<usize> {
        writer_of
            .range(..=(src.image, src.chunk))
            .next_back()
            .filter(|(&(img, start), &(end, _))| img == src.image && start <= src.chunk && src.chunk < end)
            .map(|(_, &(_, i))| i)
    };

    // Units: a record and the copies of its chunks (and copies of those), which go into one
    // segment, the record first: each segment decodes alone, and no copy costs more bytes.
    let mut unit = vec![0usize; entries.len()];
    for i in 0..entries.len() {
        unit[i] = match &entries[i].record {
            Record::CopySelf { src, .. } => match find(*src) {
                Some(q) if q < i => unit[q],
                _ => {
                    return Err(SegmentError::Invalid {
                        reason: format!(
                            "a copy of chunk {} of image {} that no earlier record writes",
                            src.chunk, src.image
                        ),
                    })
                }
            },
            _ => i,
        };
    }
    let mut unit_rank: Vec<u64> = entries.iter().map(|e| e.rank).collect();
    for i in 0..entries.len() {
        let u = unit[i];
        unit_rank[u] = unit_rank[u].min(entries[i].rank);
    }

    // Order units by their first touch, then address; cut into segments between units.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| {
        let u = unit[i];
        let run = run_of(&entries[u].record);
        (unit_rank[u], run.image, run.chunk, u, i)
    });
    let mut segment_of = vec![0usize; entries.len()];
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut size = usize::MAX;
    let mut in_working_set = true;
    for &i in &order {
        let u = unit[i];
        // The working set ends a segment: what is prefetched is the working set and no more.
        let ws = unit_rank[u] < touched.working_set as u64;
        let limit = if ws { opts.segment_bytes } else { opts.tail_segment_bytes };
        if u == i && (size >= limit || ws != in_working_set) {
            groups.push(Vec::new());
            size = 0;
        }
        in_working_set = ws;
        size += raw_size(&entries[i].record);
        segment_of[i] = groups.len() - 1;
        groups.last_mut().expect("pushed").push(i);
    }
    let prefetch = order
        .iter()
        .filter(|&&i| entries[i].rank < touched.working_set as u64)
        .map(|&i| segment_of[i] + 1)
        .max()
        .unwrap_or(0) as u64;
    let segments_records: Vec<Vec<Record>> =
        groups.iter().map(|g| g.iter().map(|&i| entries[i].record.clone()).collect()).collect();
    drop(entries);

    let compression = meta.compression;
    let sealed = segments_records
        .into_par_iter()
        .map(|records| {
            let runs = normalize(records.iter().map(run_of).collect());
            let mut b = BlobBuilder::new();
            for r in &records {
                b.push(r);
            }
            let blob = b.seal(compression, opts.level)?;
            Ok((Segment::of(&blob, runs), blob))
        })
        .collect::<Result<Vec<_>, EncodeError>>()?;
    let index = SegmentIndex { prefetch, segments: sealed.iter().map(|(s, _)| s.clone()).collect() };
    let mut w = OverlayWriter::new_segmented(out, &meta)?;
    w.write_device_state(&device_state, opts.level)?;
    w.write_index(&index)?;
    for (_, blob) in &sealed {
        w.write_blob(blob)?;
    }
    let trailer = w.trailer(trailer.image_digests);
    let bytes_before_trailer = w.bytes_written();
    let out = w.finish(&trailer)?;
    let prefetch_bytes = index.segments.iter().take(prefetch as usize).map(Segment::frame_len).sum();
    let stats = SegmentStats {
        segments: index.segments.len() as u64,
        prefetch,
        prefetch_bytes,
        bytes: bytes_before_trailer,
        input_bytes,
    };
    Ok((out, stats))
}
