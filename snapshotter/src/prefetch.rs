//! The background fetch of one layer: after mount, walk the layer's chunks in priority order
//! (its prefetch list first, if it has one, then every chunk in blob order), skip what a cache
//! already holds, and hand runs of adjacent missing chunks, merged up to `merge_bytes`, to the
//! layer's background worker through a queue of one. That worker fetches one range at a time,
//! and only while no on-demand read of any layer is in flight or just finished (see
//! `fetcher`), so start-up reads never wait behind background data. This thread ends when
//! every chunk has been queued or the layer is unmounted (the queue closes).

use std::sync::Arc;

use crossbeam_channel::Sender;
use fsformat::reader::SealedLayer;

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
    let mut run: Option<(u32, u32, u64)> = None; // first, end, bytes
    for chunk in order {
        if queued[chunk as usize] {
            continue;
        }
        queued[chunk as usize] = true;
        if view.present.is_present(chunk) {
            continue;
        }
        let len = u64::from(chunks[chunk as usize].sealed_len);
        run = match run {
            Some((first, end, bytes)) if end == chunk && bytes + len <= view.merge_bytes => {
                Some((first, end + 1, bytes + len))
            }
            Some((first, end, _)) => {
                if queue
                    .send(crate::fetcher::Job::background(first..end))
                    .is_err()
                {
                    return;
                }
                Some((chunk, chunk + 1, len))
            }
            None => Some((chunk, chunk + 1, len)),
        };
    }
    if let Some((first, end, _)) = run {
        let _ = queue.send(crate::fetcher::Job::background(first..end));
    }
}
