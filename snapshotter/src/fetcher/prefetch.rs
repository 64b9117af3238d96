//! The order in which a layer is fetched ahead of reads: runs of adjacent chunks merged into
//! one range read each. The startup profile is its prefetch list cut into runs
//! ([`profile_runs`]); the background fetch walks the prefetch list, then every chunk in blob
//! order, skipping what is present ([`BackgroundOrder`]), one run each time a worker asks.
//! Nothing here fetches or waits: the pool asks for the next run when it has a worker free.

use std::ops::Range;

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

/// The startup profile of `layer` as runs of at most `merge_bytes`, in list order.
pub(crate) fn profile_runs(layer: &SealedLayer, merge_bytes: u64) -> Vec<Range<u32>> {
    let index = layer.index();
    let mut merger = RunMerger::new(&index.chunks, merge_bytes);
    let mut runs: Vec<Range<u32>> = index
        .prefetch
        .iter()
        .filter_map(|&chunk| merger.push(chunk))
        .collect();
    runs.extend(merger.finish());
    runs
}

/// Where a layer's background fetch is: a position in (prefetch list, then blob order), and
/// which chunks it has passed (one byte per chunk: the per-layer cost of a background fetch).
pub(crate) struct BackgroundOrder {
    position: usize,
    passed: Vec<bool>,
    /// A run found but not yet handed out (the one that closed the previous run).
    pending: Option<(Range<u32>, u64)>,
}

impl BackgroundOrder {
    pub(crate) fn new(chunk_count: usize) -> Self {
        BackgroundOrder {
            position: 0,
            passed: vec![false; chunk_count],
            pending: None,
        }
    }

    /// The next run of missing chunks (at most `merge_bytes`), skipping chunks `present`
    /// says are cached; `None` when every chunk has been passed.
    pub(crate) fn next_run(
        &mut self,
        layer: &SealedLayer,
        merge_bytes: u64,
        present: impl Fn(u32) -> bool,
    ) -> Option<Range<u32>> {
        let index = layer.index();
        let count = index.chunks.len();
        let mut current = self.pending.take();
        while self.position < index.prefetch.len() + count {
            let chunk = match index.prefetch.get(self.position) {
                Some(&chunk) => chunk,
                None => (self.position - index.prefetch.len()) as u32,
            };
            self.position += 1;
            let Some(passed) = self.passed.get_mut(chunk as usize) else {
                continue;
            };
            if std::mem::replace(passed, true) || present(chunk) {
                continue;
            }
            let len = u64::from(index.chunks[chunk as usize].sealed_len);
            match &mut current {
                Some((run, bytes)) if run.end == chunk && *bytes + len <= merge_bytes => {
                    run.end += 1;
                    *bytes += len;
                }
                Some(_) => {
                    self.pending = Some((chunk..chunk + 1, len));
                    return current.map(|(run, _)| run);
                }
                None => current = Some((chunk..chunk + 1, len)),
            }
        }
        current.map(|(run, _)| run)
    }
}
