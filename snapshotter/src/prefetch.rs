//! The background fetch of one layer: after mount, walk the layer's chunks in priority order
//! (its prefetch list first, if it has one, then every chunk in blob order), skip what a cache
//! already holds, and hand runs of adjacent missing chunks, merged up to `merge_bytes`, to the
//! layer's background worker through a queue of one. That worker fetches one range at a time,
//! and only while no on-demand read of any layer is in flight or just finished (see
//! `fetcher`), so start-up reads never wait behind background data. This thread ends when
//! every chunk has been queued or the layer is unmounted (the queue closes).

use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::Sender;
use fsformat::layout::ChunkInfo;
use fsformat::reader::SealedLayer;

/// Cuts a sequence of chunks into runs of adjacent chunks of at most `limit` sealed bytes
/// (one range read each), keeping the sequence's order: the background fetch and the profile
/// fetch both merge this way.
pub(crate) struct RunMerger<'a> {
    chunks: &'a [ChunkInfo],
    limit: u64,
    /// The run being grown and its sealed bytes.
    current: Option<(Range<u32>, u64)>,
}

impl<'a> RunMerger<'a> {
    pub(crate) fn new(chunks: &'a [ChunkInfo], limit: u64) -> Self {
        RunMerger {
            chunks,
            limit,
            current: None,
        }
    }

    /// Adds `chunk`; returns the run it closes when it cannot extend the current one.
    pub(crate) fn push(&mut self, chunk: u32) -> Option<Range<u32>> {
        let len = u64::from(self.chunks[chunk as usize].sealed_len);
        match &mut self.current {
            Some((run, bytes)) if run.end == chunk && *bytes + len <= self.limit => {
                run.end += 1;
                *bytes += len;
                None
            }
            current => current.replace((chunk..chunk + 1, len)).map(|(run, _)| run),
        }
    }

    /// The last run, if any.
    pub(crate) fn finish(self) -> Option<Range<u32>> {
        self.current.map(|(run, _)| run)
    }
}

/// What the background fetch needs to see of a layer.
pub(crate) struct PrefetchView {
    pub layer: Arc<SealedLayer>,
    pub present: Arc<crate::fetcher::Shared>,
    pub merge_bytes: u64,
}

/// Runs until every chunk is queued or the queue closes.
pub(crate) fn run(view: &PrefetchView, queue: &Sender<crate::fetcher::Job>) {
    let chunks = &view.layer.index().chunks;
    let count = chunks.len() as u32;
    let mut queued = vec![false; chunks.len()];
    let order = view.layer.index().prefetch.iter().copied().chain(0..count);
    let mut runs = RunMerger::new(chunks, view.merge_bytes);
    for chunk in order {
        if queued[chunk as usize] {
            continue;
        }
        queued[chunk as usize] = true;
        if view.present.is_present(chunk) {
            continue;
        }
        if let Some(run) = runs.push(chunk) {
            if queue.send(crate::fetcher::Job::background(run)).is_err() {
                return;
            }
        }
    }
    if let Some(run) = runs.finish() {
        let _ = queue.send(crate::fetcher::Job::background(run));
    }
}
