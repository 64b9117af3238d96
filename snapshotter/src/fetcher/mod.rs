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

mod inflight;
pub mod pool;
mod prefetch;
mod stats;

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fsformat::reader::{ChunkDecoder, SealedLayer};
use fsformat::FormatError;

use crate::cache::{ChunkKey, DiskCache, MemoryCache};
use crate::source::{ChunkSource, SourceError};
use inflight::{Claim, InFlight, Joined};
use pool::{Feed, Job, Next};
pub use pool::{FetchPool, PoolConfig};
pub use stats::{FetchProgress, FetchStats, FetchTotals, LatencyHistogram, LATENCY_BUCKETS};

/// Why a chunk could not be served.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    /// The source failed.
    #[error("layer {layer}: fetching chunk {chunk} failed")]
    Source {
        /// The layer's name.
        layer: String,
        /// The chunk.
        chunk: u32,
        /// What the source said (shared by every chunk of the failed range read).
        #[source]
        source: Arc<SourceError>,
    },
    /// The chunk failed authentication (tampered, truncated or swapped); never served.
    #[error("layer {layer}: chunk {chunk} failed verification: {reason}")]
    Verification {
        /// The layer's name.
        layer: String,
        /// The chunk.
        chunk: u32,
        /// What failed.
        reason: String,
    },
    /// The fetch did not complete within the timeout.
    #[error("layer {layer}: chunk {chunk} did not arrive within {after:?}")]
    Timeout {
        /// The layer's name.
        layer: String,
        /// The chunk.
        chunk: u32,
        /// The timeout.
        after: Duration,
    },
    /// The layer is being unmounted, or the node is shutting down.
    #[error("layer {layer} is shutting down")]
    Cancelled {
        /// The layer's name.
        layer: String,
    },
}

/// A chunk's plaintext, or why there is none.
pub type ChunkResult = Result<Arc<Vec<u8>>, FetchError>;

/// Tunables of one layer's fetcher (defaults documented in docs/configuration.md). Threads,
/// background streams and the bandwidth cap are the node's: see [`PoolConfig`].
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// How long a read waits for its chunk before failing with EIO.
    pub timeout: Duration,
    /// Fetch the whole layer in the background after mounting.
    pub background: bool,
    /// Largest merged range read of the background and profile fetches.
    pub merge_bytes: u64,
    /// Fetch the layer's startup profile (its prefetch order) right after mounting.
    pub profile: bool,
    /// Range reads of this layer's profile in flight at once.
    pub profile_streams: usize,
    /// When a read misses, the chunks right after it are fetched in the same range read, up
    /// to this many plaintext bytes: a start-up reads files in directory order, and the next
    /// pack of small files is likely next. 0: off. A chunk bigger than this is never read ahead.
    pub readahead_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            timeout: Duration::from_secs(30),
            background: true,
            merge_bytes: 4 << 20,
            profile: true,
            profile_streams: 4,
            readahead_bytes: 256 << 10,
        }
    }
}

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
    memory: Arc<MemoryCache>,
    disk: Option<DiskCache>,
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

thread_local! {
    static DECODER: RefCell<Option<ChunkDecoder>> = const { RefCell::new(None) };
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
        let present: Vec<AtomicBool> = chunks
            .iter()
            .enumerate()
            .map(|(chunk, info)| {
                let cached = disk
                    .as_ref()
                    .is_some_and(|d| d.contains(chunk as u32, u64::from(info.sealed_len)));
                AtomicBool::new(cached)
            })
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
            memory,
            disk,
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
        if let Some(plain) = state.memory.get(state.cache_key(chunk)) {
            state.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(plain);
        }
        if let Some(plain) = state.read_disk_cache(chunk) {
            state.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(plain);
        }
        let joined = state.inflight.join(chunk, || {
            let plain = state.memory.get(state.cache_key(chunk))?;
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
        state.memory.forget_layer(state.key);
    }
}

impl Drop for LayerFetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl LayerState {
    fn cache_key(&self, chunk: u32) -> ChunkKey {
        ChunkKey {
            layer: self.key,
            chunk,
        }
    }

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

    fn open(&self, chunk: u32, sealed: &mut [u8]) -> Result<Vec<u8>, FormatError> {
        DECODER.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(ChunkDecoder::new()?);
            }
            let decoder = slot.as_mut().expect("just set");
            self.layer.open_chunk(chunk, sealed, decoder)
        })
    }

    fn read_disk_cache(&self, chunk: u32) -> Option<Arc<Vec<u8>>> {
        let disk = self.disk.as_ref()?;
        let sealed_len = self.layer.index().chunks.get(chunk as usize)?.sealed_len as usize;
        let mut mapped = disk.get(chunk, sealed_len)?;
        match self.open(chunk, &mut mapped) {
            Ok(plain) => {
                let plain = Arc::new(plain);
                self.memory.put(self.cache_key(chunk), plain.clone());
                Some(plain)
            }
            Err(error) => {
                self.stats
                    .verification_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(layer = %self.name, chunk, %error, dir = %disk.dir().display(),
                    "cached chunk failed verification; dropping it and fetching again");
                disk.remove(chunk);
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
            || self.memory.contains(self.cache_key(chunk))
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
    /// flight, within [`FetchConfig::readahead_bytes`] of plaintext together.
    fn claim_readahead(self: &Arc<Self>, chunk: u32) -> Vec<Claim> {
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
            let result = match self.open(chunk, &mut buf) {
                Ok(plain) => {
                    if self.cancelled.load(Ordering::Relaxed) {
                        // Unmounted meanwhile: its caches are going away.
                        claim.complete(Err(self.cancelled_error()));
                        continue;
                    }
                    if let Some(disk) = &self.disk {
                        if let Err(error) = disk.put(chunk, sealed) {
                            tracing::warn!(layer = %self.name, chunk, %error, "could not write the disk cache");
                        }
                    }
                    let plain = Arc::new(plain);
                    // The cache first, then the claim: a reader that finds no claim finds
                    // the chunk cached.
                    self.memory.put(self.cache_key(chunk), plain.clone());
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
struct FetchJob {
    state: Arc<LayerState>,
    runs: Vec<(Range<u32>, Vec<Claim>)>,
    purpose: Purpose,
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
struct LayerFeed {
    state: Arc<LayerState>,
    purpose: Purpose,
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
