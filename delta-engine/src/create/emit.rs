//! Emission: the classes of a batch's chunks, in chunk order, become records (runs of zeros
//! and of base copies merged, copies of earlier chunks of the overlay found by hash, patches,
//! raw runs) in the blob of their stream; full blobs are cut, to be sealed by the pipeline.

use std::collections::HashMap;

use overlay_format::{BlobBuilder, ChunkHash, ChunkRef, ImageDigester, CHUNK_SIZE};

use super::classify::{Class, Classes};
use super::view::View;
use super::{chunk_len, CreateError, CreateOptions, CreateStats, DENSE, LIGHT, MAX_DENSE_BLOB, STREAMS};
use crate::KindCounts;

/// The sequential part of creation, batch after batch in chunk order: the images' digests, the
/// chunks stored so far (for copies of earlier chunks) and the [`Emitter`].
pub(super) struct Sequential<'a> {
    pub(super) em: Emitter<'a>,
    /// Chunks stored so far (raw or patched), with the stream their record went to.
    self_map: HashMap<ChunkHash, (ChunkRef, usize)>,
    digesters: Vec<ImageDigester>,
}

impl<'a> Sequential<'a> {
    pub(super) fn new(views: &'a [View], opts: &CreateOptions) -> Self {
        Sequential {
            em: Emitter {
                run: Run::None,
                builders: Default::default(),
                ready: Vec::new(),
                blob_bytes: opts.blob_bytes,
                dense_blob_bytes: opts.dense_blob_bytes.clamp(CHUNK_SIZE, MAX_DENSE_BLOB),
                customs: views,
                kinds: KindCounts::default(),
                scratch: Vec::new(),
                failed: None,
            },
            self_map: HashMap::new(),
            digesters: views.iter().map(|_| ImageDigester::new()).collect(),
        }
    }

    /// Emits the classes of chunks `c0..` of image `ii`, ending the run in progress.
    pub(super) fn pass(
        &mut self,
        views: &[View],
        ii: usize,
        c0: u64,
        classes: Classes,
        stats: &mut CreateStats,
    ) -> Result<(), CreateError> {
        // The image digest, self-dedup, runs and records into blobs, in chunk order.
        let Sequential { em, self_map, digesters } = self;
        let digester = &mut digesters[ii];
        let view = &views[ii];
        let (mut chunk, mut earlier) = (Vec::with_capacity(CHUNK_SIZE), Vec::with_capacity(CHUNK_SIZE));
        let size = view.size();
        for (k, (class, h, patch)) in classes.into_iter().enumerate() {
            let c = c0 + k as u64;
            digester.push(h);
            let image = ii as u8;
            match class {
                Class::Same => {
                    em.flush();
                }
                Class::Zero => {
                    stats.changed_chunks += 1;
                    em.zero(image, c);
                }
                Class::Base(src) => {
                    stats.changed_chunks += 1;
                    em.base(image, c, src);
                }
                Class::Fresh { stream } => {
                    stats.changed_chunks += 1;
                    let len = chunk_len(size, c);
                    if len == CHUNK_SIZE {
                        if let Some(&(src, src_stream)) = self_map.get(&h) {
                            chunk.clear();
                            earlier.clear();
                            view.read(c, 1, &mut chunk)?;
                            views[src.image as usize].read(src.chunk, 1, &mut earlier)?;
                            if earlier.len() == CHUNK_SIZE && earlier == chunk {
                                em.copy_self(image, c, src, src_stream);
                                continue;
                            }
                        }
                        self_map.insert(h, (ChunkRef { image, chunk: c }, stream));
                    }
                    if stream == DENSE {
                        stats.dense_chunks += 1;
                    }
                    match patch {
                        Some(p) => em.patch(image, c, &p),
                        None => em.raw(image, c, stream),
                    }
                }
            }
        }
        em.flush();
        match em.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The images' digests, and the counts by record kind.
    pub(super) fn finish(self) -> (Vec<overlay_format::ImageDigest>, KindCounts) {
        (self.digesters.iter().map(ImageDigester::finish).collect(), self.em.kinds)
    }
}

/// A run being accumulated before it becomes a record.
enum Run {
    None,
    Zero { image: u8, chunk: u64, count: u64 },
    Base { image: u8, chunk: u64, count: u64, src: ChunkRef },
    Raw { image: u8, chunk: u64, count: u64, stream: usize },
}

pub(super) struct Emitter<'a> {
    run: Run,
    /// The blob being filled for each stream (lanes from [`LIGHT`] on, [`DENSE`]).
    builders: [BlobBuilder; STREAMS],
    /// Blobs cut, in the order they were cut (each stream's are written in it), with their stream.
    pub(super) ready: Vec<(BlobBuilder, usize)>,
    blob_bytes: usize,
    dense_blob_bytes: usize,
    customs: &'a [View],
    kinds: KindCounts,
    /// Raw chunks read for the blob being filled.
    scratch: Vec<u8>,
    /// The first read that failed: the step that cut the run returns it.
    failed: Option<CreateError>,
}

impl Emitter<'_> {
    pub(super) fn flush(&mut self) {
        match std::mem::replace(&mut self.run, Run::None) {
            Run::None => {}
            Run::Zero { image, chunk, count } => {
                self.builders[LIGHT].push_zero(image, chunk, count);
                self.kinds.zero.add(count);
                self.maybe_cut(LIGHT);
            }
            Run::Base { image, chunk, count, src } => {
                self.builders[LIGHT].push_copy_base(image, chunk, count, src);
                self.kinds.copy_base.add(count);
                self.maybe_cut(LIGHT);
            }
            Run::Raw { image, chunk, count, stream } => {
                let customs = self.customs;
                self.scratch.clear();
                if let Err(e) = customs[image as usize].read(chunk, count, &mut self.scratch) {
                    self.failed.get_or_insert(e);
                    return;
                }
                self.builders[stream].push_raw(image, chunk, &self.scratch);
                self.kinds.raw.add(count);
                self.kinds.raw.bytes += self.scratch.len() as u64;
                self.maybe_cut(stream);
            }
        }
    }

    fn maybe_cut(&mut self, stream: usize) {
        let limit = if stream == DENSE { self.dense_blob_bytes } else { self.blob_bytes };
        if self.builders[stream].uncompressed_len() >= limit {
            self.ready.push((std::mem::take(&mut self.builders[stream]), stream));
        }
    }

    /// Cuts the blobs not yet full (at the end).
    pub(super) fn cut_all(&mut self) {
        self.flush();
        for stream in 0..STREAMS {
            if !self.builders[stream].is_empty() {
                self.ready.push((std::mem::take(&mut self.builders[stream]), stream));
            }
        }
    }

    fn zero(&mut self, image: u8, chunk: u64) {
        if let Run::Zero { image: i, chunk: c, count } = &mut self.run {
            if *i == image && *c + *count == chunk {
                *count += 1;
                return;
            }
        }
        self.flush();
        self.run = Run::Zero { image, chunk, count: 1 };
    }

    fn base(&mut self, image: u8, chunk: u64, src: ChunkRef) {
        if let Run::Base { image: i, chunk: c, count, src: s } = &mut self.run {
            if *i == image && *c + *count == chunk && s.image == src.image && s.chunk + *count == src.chunk {
                *count += 1;
                return;
            }
        }
        self.flush();
        self.run = Run::Base { image, chunk, count: 1, src };
    }

    fn raw(&mut self, image: u8, chunk: u64, stream: usize) {
        if let Run::Raw { image: i, chunk: c, count, stream: s } = &mut self.run {
            if *i == image
                && *c + *count == chunk
                && *s == stream
                && ((*count as usize + 1) * CHUNK_SIZE) <= self.blob_bytes
            {
                *count += 1;
                return;
            }
        }
        self.flush();
        self.run = Run::Raw { image, chunk, count: 1, stream };
    }

    /// A copy of an earlier chunk of the overlay; it goes to the stream its source went to, so
    /// that it follows the source's record in the stream (blobs of one stream are written in
    /// order).
    fn copy_self(&mut self, image: u8, chunk: u64, src: ChunkRef, stream: usize) {
        self.flush();
        self.builders[stream].push_copy_self(image, chunk, src);
        self.kinds.copy_self.add(1);
        self.maybe_cut(stream);
    }

    fn patch(&mut self, image: u8, chunk: u64, patch: &[u8]) {
        self.flush();
        self.builders[LIGHT].push_patch(image, chunk, patch);
        self.kinds.patch.add(1);
        self.kinds.patch.bytes += patch.len() as u64;
        self.maybe_cut(LIGHT);
    }
}
