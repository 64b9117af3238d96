//! The work a layer gives the node's fetch pool: a [`FetchJob`] fetches runs of chunks that
//! were claimed before it was queued (one range read per run, each chunk verified, cached and
//! its claim completed); a [`LayerFeed`] hands the pool the layer's profile runs, then its
//! background runs, one at a time, as the pool asks.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::cache::{self, Fetched};

use super::inflight::Claim;
use super::pool::{Feed, Job, Next};
use super::{FetchError, LayerState, Purpose};

impl LayerState {
    /// Claims the missing chunks of `chunks` as a job, if any are missing.
    fn claim_job(self: &Arc<Self>, chunks: Range<u32>, purpose: Purpose) -> Option<FetchJob> {
        let runs = self
            .inflight
            .claim_missing(chunks, |chunk| self.is_present(chunk));
        (!runs.is_empty()).then(|| FetchJob {
            state: self.clone(),
            runs,
            purpose,
        })
    }

    /// Fetches a run of chunks with one range read, verifies and stores each, and completes
    /// its claims (in chunk order). A failure is logged here, once per range read.
    fn fetch(&self, chunks: Range<u32>, claims: Vec<Claim>, purpose: Purpose) {
        let table = &self.layer.index().chunks;
        let Some((start, _)) = self.layer.chunk_range(chunks.start) else {
            return; // claims drop: Cancelled (an index the fetcher was built on has it)
        };
        let len = self.sealed_len(chunks.clone());
        self.stats.source_reads.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let bytes = match self.source.read_range(start, len as usize) {
            Ok(bytes) => {
                self.stats.read_latency.observe(started.elapsed());
                bytes
            }
            Err(error) => {
                let error = Arc::new(error);
                tracing::warn!(layer = %self.name, ?chunks, error = %crate::error_chain(&*error),
                    "source read failed");
                for claim in claims {
                    let chunk = claim.chunk();
                    claim.complete(Err(FetchError::Source {
                        layer: self.name.clone(),
                        chunk,
                        source: error.clone(),
                    }));
                }
                return;
            }
        };
        self.stats.source_bytes.fetch_add(len, Ordering::Relaxed);
        let mut at = 0usize;
        for (number, (chunk, claim)) in chunks.zip(claims).enumerate() {
            let sealed_len = table[chunk as usize].sealed_len as usize;
            let sealed = &bytes[at..at + sealed_len];
            at += sealed_len;
            let counter = match purpose {
                // An urgent run is the chunk a read waits for, then what is read ahead with it.
                Purpose::Urgent if number == 0 => &self.stats.urgent_chunks,
                Purpose::Urgent => &self.stats.readahead_chunks,
                Purpose::Profile => &self.stats.profile_chunks,
                Purpose::Background => &self.stats.background_chunks,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut buf = sealed.to_vec();
            let result = match cache::open_chunk(&self.layer, chunk, &mut buf) {
                Ok(plain) => {
                    if self.cancelled.load(Ordering::Relaxed) {
                        // Unmounted meanwhile: its caches are going away.
                        claim.complete(Err(self.cancelled_error()));
                        continue;
                    }
                    let plain = Arc::new(plain);
                    // The cache first, then the claim: a reader that finds no claim finds
                    // the chunk cached.
                    self.cache.put(
                        chunk,
                        Fetched {
                            sealed: Some(sealed),
                            plain: &plain,
                        },
                    );
                    self.mark_present(chunk);
                    Ok(plain)
                }
                Err(error) => {
                    self.stats
                        .verification_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(layer = %self.name, chunk, %error, "chunk failed verification; refusing to serve it");
                    Err(FetchError::Verification {
                        layer: self.name.clone(),
                        chunk,
                        reason: error.to_string(),
                    })
                }
            };
            claim.complete(result);
        }
    }

    /// A profile job ended: the profile has landed once every run has been handed out and
    /// none is in flight.
    fn profile_job_done(&self) {
        let mut cursor = self.profile.lock().expect("profile lock");
        cursor.in_flight -= 1;
        if cursor.next == cursor.runs.len() && cursor.in_flight == 0 {
            tracing::info!(layer = %self.name, chunks = self.layer.index().prefetch.len(),
                ranges = cursor.runs.len(), elapsed = ?cursor.started.elapsed(), "startup profile fetched");
            self.profile_landed.reach();
        }
    }
}

/// Runs of one layer for a pool worker, each claimed before it was queued.
pub(super) struct FetchJob {
    pub(super) state: Arc<LayerState>,
    pub(super) runs: Vec<(Range<u32>, Vec<Claim>)>,
    pub(super) purpose: Purpose,
}

impl Job for FetchJob {
    fn owner(&self) -> u64 {
        self.state.key
    }

    fn bytes(&self) -> u64 {
        self.runs
            .iter()
            .map(|(run, _)| self.state.sealed_len(run.clone()))
            .sum()
    }

    fn run(self: Box<Self>) {
        let mut job = *self;
        let state = job.state.clone();
        let runs = std::mem::take(&mut job.runs);
        *state.running.count.lock().expect("running lock") += 1;
        for (chunks, claims) in runs {
            state.fetch(chunks, claims, job.purpose);
        }
        if job.purpose == Purpose::Profile {
            state.profile_job_done();
        }
        let mut running = state.running.count.lock().expect("running lock");
        *running -= 1;
        if *running == 0 {
            state.running.idle.notify_all();
        }
    }
}

impl Drop for FetchJob {
    fn drop(&mut self) {
        // A profile job dropped unrun (cancelled) still ends its turn.
        if self.purpose == Purpose::Profile && !self.runs.is_empty() {
            self.state.profile_job_done();
        }
    }
}

/// A layer's work ahead of reads, as the pool asks for it: its startup profile (runs in list
/// order, at most `profile_streams` in flight) or its background fetch (see
/// [`prefetch::BackgroundOrder`]). Each run is claimed when a worker takes it, so chunks that
/// reads fetched meanwhile are skipped.
pub(super) struct LayerFeed {
    pub(super) state: Arc<LayerState>,
    pub(super) purpose: Purpose,
}

impl Feed for LayerFeed {
    fn owner(&self) -> u64 {
        self.state.key
    }

    fn next(&self) -> Next {
        if self.state.cancelled.load(Ordering::Relaxed) {
            return Next::Done;
        }
        match self.purpose {
            Purpose::Profile => self.state.next_profile_job(),
            _ => self.state.next_background_job(),
        }
    }
}

impl LayerState {
    fn next_profile_job(self: &Arc<Self>) -> Next {
        let mut cursor = self.profile.lock().expect("profile lock");
        while cursor.next < cursor.runs.len() {
            if cursor.in_flight >= self.config.profile_streams.max(1) {
                return Next::Later;
            }
            let run = cursor.runs[cursor.next].clone();
            cursor.next += 1;
            if let Some(job) = self.claim_job(run, Purpose::Profile) {
                cursor.in_flight += 1;
                return Next::Job(Box::new(job));
            }
            if cursor.next == cursor.runs.len() && cursor.in_flight == 0 {
                self.profile_landed.reach();
            }
        }
        Next::Done
    }

    fn next_background_job(self: &Arc<Self>) -> Next {
        let mut order = self.background.lock().expect("background lock");
        while let Some(run) =
            order.next_run(&self.layer, self.config.merge_bytes, |c| self.is_present(c))
        {
            if let Some(job) = self.claim_job(run, Purpose::Background) {
                return Next::Job(Box::new(job));
            }
        }
        Next::Done
    }
}
