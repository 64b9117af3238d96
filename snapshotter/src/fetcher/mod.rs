//! The chunk fetcher of one mounted layer: caches first, then the source, each chunk fetched
//! once however many readers want it, on-demand reads ahead of background work.
//!
//! A read asks [`LayerFetcher::chunk`] for a chunk's plaintext:
//! 1. the memory cache (plaintext) answers, or
//! 2. the disk cache (ciphertext) answers after the chunk authenticates; a corrupt entry is
//!    dropped and fetched again, or
//! 3. the chunk is fetched: the first reader claims it in the layer's in-flight table
//!    (`inflight`) and queues an *urgent* job on the node's [`FetchPool`]; later readers of
//!    the same chunk wait on that claim. Every wait is bounded by the fetch timeout, so a
//!    stalled source gives an error, never a hang (the fetch carries on and fills the caches
//!    when it completes).
//!
//! The layer's startup profile (its prefetch order) and, if configured, the whole layer are
//! fetched ahead of reads by feeds the pool asks for one run at a time (`prefetch` says
//! which): the profile as foreground work right after mount, the rest in the background,
//! only while no foreground fetch of any layer runs. [`LayerFetcher::wait_for_profile`] and
//! [`LayerFetcher::wait_until_fetched`] let a caller wait, bounded, for either to land.
//!
//! Threads belong to the pool, not to layers: a mounted layer costs memory only (its index,
//! one bit and one byte per chunk, its counters).
//!
//! Files: `config` (tunables, errors), `inflight` (claims), `job` (what the pool runs: claimed
//! runs fetched with one range read each, the layer's profile and background feed), `pool`,
//! `prefetch` (which runs come next), `stats`.

mod config;
mod inflight;
mod job;
pub mod pool;
mod prefetch;
mod stats;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fsformat::reader::SealedLayer;

use crate::cache::{ChunkCache, DiskCache, Hit, LayerMemory, MemoryCache, SealedDisk, Tiered};
use crate::source::ChunkSource;
pub use config::{ChunkResult, FetchConfig, FetchError};
use inflight::{Claim, InFlight, Joined};
use job::{FetchJob, LayerFeed};
pub use pool::{FetchPool, PoolConfig};
pub use stats::{FetchProgress, FetchStats, FetchTotals};

/// Why a run of chunks is fetched (which counter it goes to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// A read waits for it.
    Urgent,
    /// The startup profile.
    Profile,
    /// The background fetch of the whole layer.
    Background,
}

/// A condition that becomes true once: the profile landed, the layer is fully fetched.
#[derive(Default)]
struct Landmark {
    reached: Mutex<bool>,
    changed: Condvar,
}

impl Landmark {
    fn reach(&self) {
        *self.reached.lock().expect("landmark lock") = true;
        self.changed.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let reached = self.reached.lock().expect("landmark lock");
        let (reached, _) = self
            .changed
            .wait_timeout_while(reached, timeout, |reached| !*reached)
            .expect("landmark lock");
        *reached
    }
}

/// The runs of a layer's startup profile still to hand out.
struct ProfileCursor {
    runs: Vec<Range<u32>>,
    next: usize,
    in_flight: usize,
    started: Instant,
}

/// Jobs of a layer running on pool workers, so its shutdown can wait for them.
#[derive(Default)]
struct Running {
    count: Mutex<usize>,
    idle: Condvar,
}

/// State shared by a layer's fetcher and the jobs and feeds it gives the pool.
struct LayerState {
    name: String,
    key: u64,
    layer: Arc<SealedLayer>,
    source: Arc<dyn ChunkSource>,
    /// Memory, then disk.
    cache: Tiered<LayerMemory, Option<SealedDisk>>,
    config: FetchConfig,
    inflight: Arc<InFlight>,
    present: Vec<AtomicBool>,
    /// How many of `present` are set.
    present_count: AtomicU64,
    stats: Arc<FetchStats>,
    cancelled: AtomicBool,
    profile_landed: Landmark,
    fully_fetched: Landmark,
    profile: Mutex<ProfileCursor>,
    background: Mutex<prefetch::BackgroundOrder>,
    running: Running,
}

/// The fetcher of one mounted layer. Dropping it cancels its queued work and waits for its
/// running jobs.
pub struct LayerFetcher {
    state: Arc<LayerState>,
    pool: Arc<FetchPool>,
    shut_down: bool,
}

impl LayerFetcher {
    /// Serves `layer` with the workers of `pool`, starting its profile and background fetch
    /// if configured. `key` tells this layer's chunks apart in the shared memory cache and in
    /// the pool; `name` (a digest) appears in errors and logs.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        pool: &Arc<FetchPool>,
        name: String,
        key: u64,
        layer: Arc<SealedLayer>,
        source: Arc<dyn ChunkSource>,
        memory: Arc<MemoryCache>,
        disk: Option<DiskCache>,
        config: FetchConfig,
    ) -> Self {
        let chunks = &layer.index().chunks;
        let cache = Tiered {
            upper: LayerMemory::new(memory, key),
            lower: disk.map(|disk| SealedDisk::new(disk, layer.clone())),
        };
        let present: Vec<AtomicBool> = (0..chunks.len() as u32)
            .map(|chunk| AtomicBool::new(cache.lower.contains(chunk)))
            .collect();
        let already = present.iter().filter(|p| p.load(Ordering::Relaxed)).count();
        let profile_runs = if config.profile {
            prefetch::profile_runs(&layer, config.merge_bytes)
        } else {
            Vec::new()
        };
        let state = Arc::new(LayerState {
            inflight: InFlight::new(name.clone()),
            name,
            key,
            present_count: AtomicU64::new(already as u64),
            background: Mutex::new(prefetch::BackgroundOrder::new(chunks.len())),
            present,
            profile: Mutex::new(ProfileCursor {
                runs: profile_runs,
                next: 0,
                in_flight: 0,
                started: Instant::now(),
            }),
            layer,
            source,
            cache,
            stats: Arc::new(FetchStats::default()),
            cancelled: AtomicBool::new(false),
            profile_landed: Landmark::default(),
            fully_fetched: Landmark::default(),
            running: Running::default(),
            config,
        });
        if already == state.present.len() {
            state.fully_fetched.reach();
        }
        if state.profile.lock().expect("profile lock").runs.is_empty() {
            state.profile_landed.reach();
        } else {
            pool.add_profile(Arc::new(LayerFeed {
                state: state.clone(),
                purpose: Purpose::Profile,
            }));
        }
        if state.config.background {
            pool.add_background(Arc::new(LayerFeed {
                state: state.clone(),
                purpose: Purpose::Background,
            }));
        }
        LayerFetcher {
            state,
            pool: pool.clone(),
            shut_down: false,
        }
    }

    /// The plaintext of `chunk`, from a cache or fetched (waiting at most the timeout).
    pub fn chunk(&self, chunk: u32) -> ChunkResult {
        let state = &self.state;
        if let Some(plain) = state.cached(chunk) {
            return Ok(plain);
        }
        let joined = state.inflight.join(chunk, || {
            let plain = state.cache.upper.get(chunk).ok()??;
            state.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            Some(Ok(plain))
        });
        let pending = match joined {
            Joined::Ready(result) => return result,
            Joined::Waiting(pending) => pending,
            Joined::Claimed(claim, pending) => {
                let mut claims = vec![claim];
                claims.extend(state.claim_readahead(chunk));
                let end = chunk + claims.len() as u32;
                let job = FetchJob {
                    state: state.clone(),
                    runs: vec![(chunk..end, claims)],
                    purpose: Purpose::Urgent,
                };
                // Refused (the node is stopping): the job is dropped, its claim completes
                // Cancelled, and the wait below returns that at once.
                let _ = self.pool.urgent(Box::new(job));
                pending
            }
        };
        let timeout = state.config.timeout;
        state.stats.reads_waiting.fetch_add(1, Ordering::Relaxed);
        let waited = pending.wait(timeout);
        state.stats.reads_waiting.fetch_sub(1, Ordering::Relaxed);
        waited.unwrap_or_else(|| {
            state.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(layer = %state.name, chunk, ?timeout, "chunk fetch timed out");
            Err(FetchError::Timeout {
                layer: state.name.clone(),
                chunk,
                after: timeout,
            })
        })
    }

    /// Waits until the layer's startup profile has been fetched (at once if it has none),
    /// at most `timeout`; returns whether it landed.
    pub fn wait_for_profile(&self, timeout: Duration) -> bool {
        self.state.profile_landed.wait(timeout)
    }

    /// Waits until every chunk of the layer is in a cache, at most `timeout`; returns whether
    /// it is.
    pub fn wait_until_fetched(&self, timeout: Duration) -> bool {
        self.state.fully_fetched.wait(timeout)
    }

    /// Waits until no fetch of this layer runs on the pool (a stalled read has returned), at
    /// most `timeout`; returns whether none does.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let running = self.state.running.count.lock().expect("running lock");
        let (running, _) = self
            .state
            .running
            .idle
            .wait_timeout_while(running, timeout, |count| *count > 0)
            .expect("running lock");
        *running == 0
    }

    /// The layer's name (its digest), as logs show it.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.state.stats
    }

    /// Chunks being fetched now.
    pub fn chunks_in_flight(&self) -> usize {
        self.state.inflight.len()
    }

    /// How far the layer has been fetched.
    pub fn progress(&self) -> FetchProgress {
        let state = &self.state;
        let chunks = &state.layer.index().chunks;
        FetchProgress {
            chunks_present: state.present_count.load(Ordering::Relaxed) as u32,
            chunks_total: chunks.len() as u32,
            bytes_fetched: state.stats.source_bytes.load(Ordering::Relaxed),
            bytes_total: chunks.iter().map(|c| u64::from(c.sealed_len)).sum(),
        }
    }

    /// The layer being served.
    pub fn layer(&self) -> &Arc<SealedLayer> {
        &self.state.layer
    }

    /// Cancels the layer's queued work, waits for its running jobs (each bounded by the
    /// source's own timeouts) and drops its chunks from the memory cache.
    pub fn shutdown(&mut self) {
        if std::mem::replace(&mut self.shut_down, true) {
            return;
        }
        let state = &self.state;
        state.cancelled.store(true, Ordering::SeqCst);
        self.pool.cancel(state.key);
        state.profile_landed.reach();
        let running = state.running.count.lock().expect("running lock");
        let _idle = state
            .running
            .idle
            .wait_while(running, |count| *count > 0)
            .expect("running lock");
        state.cache.upper.forget();
    }
}

impl Drop for LayerFetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl LayerState {
    fn cancelled_error(&self) -> FetchError {
        FetchError::Cancelled {
            layer: self.name.clone(),
        }
    }

    /// Sealed bytes of a run of chunks: the length of its range read.
    fn sealed_len(&self, chunks: Range<u32>) -> u64 {
        let table = &self.layer.index().chunks;
        chunks
            .map(|c| u64::from(table[c as usize].sealed_len))
            .sum()
    }

    /// The chunk from a cache tier, counted by tier. A corrupt disk entry (dropped by the
    /// tier) is counted and logged here, and is a miss: the chunk is fetched again.
    fn cached(&self, chunk: u32) -> Option<Arc<Vec<u8>>> {
        match self.cache.get(chunk) {
            Ok(Some((plain, hit))) => {
                let counter = match hit {
                    Hit::Upper => &self.stats.memory_hits,
                    Hit::Lower => &self.stats.disk_hits,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Some(plain)
            }
            Ok(None) => None,
            Err(error) => {
                self.stats
                    .verification_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(layer = %self.name, error = %crate::error_chain(&error),
                    "fetching the chunk again");
                None
            }
        }
    }

    /// Whether a chunk is already in a cache (the profile and background fetches skip it).
    fn is_present(&self, chunk: u32) -> bool {
        self.present
            .get(chunk as usize)
            .is_some_and(|p| p.load(Ordering::Relaxed))
            // Peek: a background scan must not make every chunk "recently used".
            || self.cache.upper.contains(chunk)
    }

    /// Records that a chunk is cached; logs the layer's progress every 10%.
    fn mark_present(&self, chunk: u32) {
        if self.present[chunk as usize].swap(true, Ordering::Relaxed) {
            return;
        }
        let total = self.present.len() as u64;
        let now = self.present_count.fetch_add(1, Ordering::Relaxed) + 1;
        if now == total {
            self.fully_fetched.reach();
        }
        if now * 10 / total != (now - 1) * 10 / total {
            let fetched = self.stats.source_bytes.load(Ordering::Relaxed);
            tracing::debug!(layer = %self.name, chunks = now, of = total, bytes_fetched = fetched,
                "layer fetched to {}%", now * 100 / total);
        }
    }

    /// Claims the chunks right after `chunk` to read ahead with it: adjacent, missing, not in
    /// flight, within [`FetchConfig::readahead_bytes`] of plaintext together; only when the
    /// chunk before `chunk` is present, that is when reads walk the layer in order. A read
    /// that jumps somewhere else fetches its chunk alone: its neighbours are seldom read next
    /// (on `python` at start-up, a third of them were), and every one of them is bytes on the
    /// link before the container is ready (docs/benchmarks.md).
    fn claim_readahead(self: &Arc<Self>, chunk: u32) -> Vec<Claim> {
        if chunk == 0 || !self.is_present(chunk - 1) {
            return Vec::new();
        }
        let table = &self.layer.index().chunks;
        let mut budget = self.config.readahead_bytes;
        let mut claims = Vec::new();
        for next in chunk.saturating_add(1)..table.len() as u32 {
            let plain = u64::from(table[next as usize].plain_len);
            if plain > budget {
                break;
            }
            let Some((_, mut claimed)) = self
                .inflight
                .claim_missing(next..next + 1, |c| self.is_present(c))
                .pop()
            else {
                break;
            };
            budget -= plain;
            claims.append(&mut claimed);
        }
        claims
    }
}
