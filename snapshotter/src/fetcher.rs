//! The chunk fetcher of one mounted layer: caches first, then the source, each chunk fetched
//! once however many readers want it, on-demand reads ahead of background work.
//!
//! A read asks [`LayerFetcher::chunk`] for a chunk's plaintext:
//! 1. the memory cache (plaintext) answers, or
//! 2. the disk cache (ciphertext) answers after the chunk authenticates; a corrupt entry is
//!    dropped and fetched again, or
//! 3. the chunk is fetched: the first reader registers it in the in-flight table and queues an
//!    *urgent* job; later readers of the same chunk wait on that entry. Every wait is bounded by
//!    the fetch timeout, so a stalled source gives an error, never a hang (the fetch carries on
//!    and fills the caches when it completes).
//!
//! A layer whose index carries a prefetch order (a startup profile) has it fetched first, right
//! after mount: runs of listed chunks, merged up to `merge_bytes`, `profile_streams` range reads
//! in flight, each run claimed only when its turn comes, so a read that needs a later chunk
//! fetches it at once instead of waiting behind the profile. Profile fetches count as
//! on-demand work for the background gate below. [`LayerFetcher::wait_for_profile`] lets a
//! caller (the snapshotter's Prepare) wait a bounded time for the profile to land.
//!
//! Worker threads take urgent jobs before background ones. The background fetcher (see
//! `prefetch`) feeds runs of adjacent missing chunks, merged into one range read each, through
//! a bounded queue, so it can never crowd out on-demand reads; a token bucket caps its
//! bandwidth. Cancellation (unmount) stops background work; shutdown joins every thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use fsformat::reader::{ChunkDecoder, SealedLayer};
use fsformat::FormatError;

use crate::cache::{ChunkKey, DiskCache, MemoryCache};
use crate::source::{ChunkSource, SourceError};

/// Why a chunk could not be served.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    /// The source failed.
    #[error("layer {layer}: fetching chunk {chunk} failed: {message}")]
    Source {
        /// The layer's name.
        layer: String,
        /// The chunk.
        chunk: u32,
        /// What the source said.
        message: String,
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
    /// The layer is being unmounted.
    #[error("layer {layer} is shutting down")]
    Cancelled {
        /// The layer's name.
        layer: String,
    },
}

/// Tunables of one layer's fetcher (defaults documented in docs/configuration.md).
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Worker threads fetching chunks.
    pub threads: usize,
    /// How long a read waits for its chunk before failing with EIO.
    pub timeout: Duration,
    /// Fetch the whole layer in the background after mounting.
    pub background: bool,
    /// Largest merged range read by the background fetcher.
    pub merge_bytes: u64,
    /// Bandwidth cap of the background fetcher, bytes per second (`None`: unlimited).
    pub background_bytes_per_sec: Option<u64>,
    /// Fetch the layer's startup profile (its prefetch order) right after mounting.
    pub profile: bool,
    /// Range reads in flight while fetching the profile.
    pub profile_streams: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            threads: 4,
            timeout: Duration::from_secs(30),
            background: true,
            merge_bytes: 4 << 20,
            background_bytes_per_sec: None,
            profile: true,
            profile_streams: 4,
        }
    }
}

/// Counters of one layer's fetcher.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Chunks served from the memory cache.
    pub memory_hits: AtomicU64,
    /// Chunks served from the disk cache.
    pub disk_hits: AtomicU64,
    /// Chunks fetched from the source for a read.
    pub urgent_chunks: AtomicU64,
    /// Chunks fetched from the source in the background.
    pub background_chunks: AtomicU64,
    /// Chunks fetched from the source as part of the startup profile.
    pub profile_chunks: AtomicU64,
    /// Range reads sent to the source.
    pub source_reads: AtomicU64,
    /// Sealed bytes read from the source.
    pub source_bytes: AtomicU64,
    /// Chunks (from the source or the disk cache) that failed authentication.
    pub verification_failures: AtomicU64,
    /// Reads that timed out.
    pub timeouts: AtomicU64,
    /// How long successful range reads from the source took.
    pub read_latency: LatencyHistogram,
}

/// Upper bounds (seconds) of the latency histogram's buckets: a cache-warm mirror answers in
/// about a millisecond, a WAN round trip in tens, a stalled registry in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram of durations with the [`LATENCY_BUCKETS`] bounds, updated without locks.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one counts those above every bound.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of all observations, microseconds.
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative, the overflow bucket last) and the sum in seconds.
    pub fn snapshot(&self) -> ([u64; LATENCY_BUCKETS.len() + 1], f64) {
        let counts = std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed));
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (counts, sum)
    }
}

/// How far the background fetch of a layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchProgress {
    /// Chunks present in a cache (fetched once).
    pub chunks_present: u32,
    /// Chunks in the layer.
    pub chunks_total: u32,
    /// Sealed bytes fetched from the source.
    pub bytes_fetched: u64,
    /// Sealed bytes of all chunks.
    pub bytes_total: u64,
}

type ChunkResult = Result<Arc<Vec<u8>>, FetchError>;

/// One chunk being fetched; readers wait on it.
struct Pending {
    result: Mutex<Option<ChunkResult>>,
    done: Condvar,
}

impl Pending {
    fn new() -> Arc<Self> {
        Arc::new(Pending {
            result: Mutex::new(None),
            done: Condvar::new(),
        })
    }
}

/// Why a run of chunks is fetched (which counter it goes to).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A read waits for it.
    Urgent,
    /// The startup profile.
    Profile,
    /// The background fetch of the whole layer.
    Background,
}

/// A run of chunks for the workers.
pub(crate) struct Job {
    chunks: Range<u32>,
    purpose: Purpose,
}

impl Job {
    /// Background work: fetch `chunks` with one range read.
    pub(crate) fn background(chunks: Range<u32>) -> Self {
        Job {
            chunks,
            purpose: Purpose::Background,
        }
    }
}

/// Whether a layer's startup profile has landed (fetched, failed or cancelled).
#[derive(Default)]
struct ProfileState {
    done: Mutex<bool>,
    landed: Condvar,
}

/// State shared by a layer's fetcher, its workers and its background fetch.
pub(crate) struct Shared {
    name: String,
    key: u64,
    layer: Arc<SealedLayer>,
    source: Arc<dyn ChunkSource>,
    memory: Arc<MemoryCache>,
    disk: Option<DiskCache>,
    config: FetchConfig,
    inflight: Mutex<HashMap<u32, Arc<Pending>>>,
    present: Vec<AtomicBool>,
    /// How many of `present` are set.
    present_count: AtomicU64,
    stats: Arc<FetchStats>,
    cancelled: AtomicBool,
    bucket: Mutex<TokenBucket>,
    profile: ProfileState,
}

/// The fetcher of one mounted layer. Dropping it cancels background work and joins its threads.
pub struct LayerFetcher {
    shared: Arc<Shared>,
    urgent: Option<Sender<Job>>,
    background: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

thread_local! {
    static DECODER: RefCell<Option<ChunkDecoder>> = const { RefCell::new(None) };
}

impl LayerFetcher {
    /// Starts the workers (and, if configured, the background fetch) for `layer`.
    /// `key` tells this layer's chunks apart in the shared memory cache; `name` (a digest)
    /// appears in errors and logs.
    pub fn start(
        name: String,
        key: u64,
        layer: Arc<SealedLayer>,
        source: Arc<dyn ChunkSource>,
        memory: Arc<MemoryCache>,
        disk: Option<DiskCache>,
        config: FetchConfig,
    ) -> Self {
        let chunk_count = layer.index().chunks.len();
        let present: Vec<AtomicBool> = (0..chunk_count).map(|_| AtomicBool::new(false)).collect();
        if let Some(disk) = &disk {
            for (chunk, flag) in present.iter().enumerate() {
                let sealed_len = layer.index().chunks[chunk].sealed_len as u64;
                flag.store(disk.contains(chunk as u32, sealed_len), Ordering::Relaxed);
            }
        }
        let already = present.iter().filter(|p| p.load(Ordering::Relaxed)).count() as u64;
        let rate = config.background_bytes_per_sec;
        let shared = Arc::new(Shared {
            name,
            key,
            layer,
            source,
            memory,
            disk,
            inflight: Mutex::new(HashMap::new()),
            present,
            present_count: AtomicU64::new(already),
            stats: Arc::new(FetchStats::default()),
            cancelled: AtomicBool::new(false),
            bucket: Mutex::new(TokenBucket::new(rate)),
            profile: ProfileState::default(),
            config,
        });
        let (urgent_tx, urgent_rx) = unbounded::<Job>();
        // Bounded: the background scan blocks instead of queueing the whole layer.
        let (background_tx, background_rx) = bounded::<Job>(1);
        let mut threads = Vec::new();
        for n in 0..shared.config.threads.max(1) {
            let (shared, urgent) = (shared.clone(), urgent_rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sealfs-fetch-{n}"))
                    .spawn(move || worker(&shared, &urgent))
                    .expect("spawning a fetch worker"),
            );
        }
        // One background range in flight per layer: the link stays free for reads.
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sealfs-background".into())
                    .spawn(move || {
                        for job in background_rx {
                            if shared.cancelled.load(Ordering::Relaxed) {
                                break;
                            }
                            shared.fetch_background(&job);
                        }
                    })
                    .expect("spawning the background worker"),
            );
        }
        if shared.config.profile && !shared.layer.index().prefetch.is_empty() {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sealfs-profile".into())
                    .spawn(move || shared.fetch_profile())
                    .expect("spawning the profile fetcher"),
            );
        } else {
            shared.profile.finish();
        }
        if shared.config.background {
            let (shared, sender) = (shared.clone(), background_tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("sealfs-prefetch".into())
                    .spawn(move || crate::prefetch::run(&shared.prefetch_view(), &sender))
                    .expect("spawning the background fetcher"),
            );
        }
        LayerFetcher {
            shared,
            urgent: Some(urgent_tx),
            background: Some(background_tx),
            threads,
        }
    }

    /// The plaintext of `chunk`, from a cache or fetched (waiting at most the timeout).
    pub fn chunk(&self, chunk: u32) -> ChunkResult {
        let shared = &self.shared;
        let key = ChunkKey {
            layer: shared.key,
            chunk,
        };
        if let Some(plain) = shared.memory.get(key) {
            shared.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(plain);
        }
        if let Some(plain) = shared.read_disk_cache(chunk) {
            shared.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(plain);
        }
        let pending = {
            let mut inflight = shared.inflight.lock().expect("inflight lock");
            // A fetch may have completed since the cache was checked; completion fills the
            // cache before it leaves the in-flight table, so under the lock this is exact.
            if let Some(plain) = shared.memory.get(key) {
                shared.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(plain);
            }
            match inflight.get(&chunk) {
                Some(pending) => pending.clone(),
                None => {
                    let pending = Pending::new();
                    inflight.insert(chunk, pending.clone());
                    let job = Job {
                        chunks: chunk..chunk + 1,
                        purpose: Purpose::Urgent,
                    };
                    let queued = self.urgent.as_ref().is_some_and(|tx| tx.send(job).is_ok());
                    if !queued {
                        inflight.remove(&chunk);
                        return Err(FetchError::Cancelled {
                            layer: shared.name.clone(),
                        });
                    }
                    pending
                }
            }
        };
        let timeout = shared.config.timeout;
        let guard = pending.result.lock().expect("pending lock");
        let (guard, waited) = pending
            .done
            .wait_timeout_while(guard, timeout, |result| result.is_none())
            .expect("pending lock");
        match guard.as_ref() {
            Some(result) => result.clone(),
            None => {
                debug_assert!(waited.timed_out());
                shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(layer = %shared.name, chunk, ?timeout, "chunk fetch timed out");
                Err(FetchError::Timeout {
                    layer: shared.name.clone(),
                    chunk,
                    after: timeout,
                })
            }
        }
    }

    /// Waits until the layer's startup profile has been fetched (at once if it has none),
    /// at most `timeout`; returns whether it landed.
    pub fn wait_for_profile(&self, timeout: Duration) -> bool {
        let state = &self.shared.profile;
        let done = state.done.lock().expect("profile lock");
        let (done, _) = state
            .landed
            .wait_timeout_while(done, timeout, |done| !*done)
            .expect("profile lock");
        *done
    }

    /// The layer's name (its digest), as logs show it.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.shared.stats
    }

    /// How far the layer has been fetched.
    pub fn progress(&self) -> FetchProgress {
        let shared = &self.shared;
        let chunks = &shared.layer.index().chunks;
        FetchProgress {
            chunks_present: shared
                .present
                .iter()
                .filter(|p| p.load(Ordering::Relaxed))
                .count() as u32,
            chunks_total: chunks.len() as u32,
            bytes_fetched: shared.stats.source_bytes.load(Ordering::Relaxed),
            bytes_total: chunks.iter().map(|c| u64::from(c.sealed_len)).sum(),
        }
    }

    /// The layer being served.
    pub fn layer(&self) -> &Arc<SealedLayer> {
        &self.shared.layer
    }

    /// Stops background work, wakes the workers and joins every thread.
    pub fn shutdown(&mut self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
        self.shared.profile.finish();
        self.urgent.take();
        self.background.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.shared.memory.forget_layer(self.shared.key);
    }
}

impl Drop for LayerFetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    /// Sealed bytes of a run of chunks: the length of its range read.
    fn sealed_len(&self, chunks: Range<u32>) -> u64 {
        let table = &self.layer.index().chunks;
        chunks
            .map(|c| u64::from(table[c as usize].sealed_len))
            .sum()
    }

    fn prefetch_view(self: &Arc<Self>) -> crate::prefetch::PrefetchView {
        crate::prefetch::PrefetchView {
            layer: self.layer.clone(),
            present: self.clone(),
            merge_bytes: self.config.merge_bytes,
        }
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
                self.memory.put(
                    ChunkKey {
                        layer: self.key,
                        chunk,
                    },
                    plain.clone(),
                );
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

    /// Whether a chunk is already in a cache (the background fetch skips it).
    pub(crate) fn is_present(&self, chunk: u32) -> bool {
        self.present
            .get(chunk as usize)
            .is_some_and(|p| p.load(Ordering::Relaxed))
            // Peek: a background scan must not make every chunk "recently used".
            || self.memory.contains(ChunkKey {
                layer: self.key,
                chunk,
            })
    }

    /// Records that a chunk is cached; logs the background fetch's progress every 10%.
    fn mark_present(&self, chunk: u32) {
        if self.present[chunk as usize].swap(true, Ordering::Relaxed) {
            return;
        }
        let total = self.present.len() as u64;
        let now = self.present_count.fetch_add(1, Ordering::Relaxed) + 1;
        if now * 10 / total != (now - 1) * 10 / total {
            let fetched = self.stats.source_bytes.load(Ordering::Relaxed);
            tracing::info!(layer = %self.name, chunks = now, of = total, bytes_fetched = fetched,
                "layer fetched to {}%", now * 100 / total);
        }
    }

    fn complete(&self, chunk: u32, result: ChunkResult) {
        let pending = self.inflight.lock().expect("inflight lock").remove(&chunk);
        if let Some(pending) = pending {
            *pending.result.lock().expect("pending lock") = Some(result);
            pending.done.notify_all();
        }
    }

    /// Fetches a run of chunks with one range read, stores and verifies each, and completes
    /// whoever waits for them.
    fn fetch(&self, job: &Job) {
        let chunks = &self.layer.index().chunks;
        let Some((start, _)) = self.layer.chunk_range(job.chunks.start) else {
            return;
        };
        let len = self.sealed_len(job.chunks.clone());
        self.stats.source_reads.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let bytes = match self.source.read_range(start, len as usize) {
            Ok(bytes) => {
                self.stats.read_latency.observe(started.elapsed());
                bytes
            }
            Err(SourceError::Io { source, .. }) => {
                let message = source.to_string();
                tracing::warn!(layer = %self.name, chunks = ?job.chunks, %message, "source read failed");
                for chunk in job.chunks.clone() {
                    self.complete(
                        chunk,
                        Err(FetchError::Source {
                            layer: self.name.clone(),
                            chunk,
                            message: message.clone(),
                        }),
                    );
                }
                return;
            }
        };
        self.stats.source_bytes.fetch_add(len, Ordering::Relaxed);
        let counter = match job.purpose {
            Purpose::Urgent => &self.stats.urgent_chunks,
            Purpose::Profile => &self.stats.profile_chunks,
            Purpose::Background => &self.stats.background_chunks,
        };
        let mut at = 0usize;
        for chunk in job.chunks.clone() {
            let sealed_len = chunks[chunk as usize].sealed_len as usize;
            let sealed = &bytes[at..at + sealed_len];
            at += sealed_len;
            counter.fetch_add(1, Ordering::Relaxed);
            let mut buf = sealed.to_vec();
            let result = match self.open(chunk, &mut buf) {
                Ok(plain) => {
                    if let Some(disk) = &self.disk {
                        if let Err(error) = disk.put(chunk, sealed) {
                            tracing::warn!(layer = %self.name, chunk, %error, "could not write the disk cache");
                        }
                    }
                    self.mark_present(chunk);
                    let plain = Arc::new(plain);
                    self.memory.put(
                        ChunkKey {
                            layer: self.key,
                            chunk,
                        },
                        plain.clone(),
                    );
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
            self.complete(chunk, result);
        }
    }
}

impl ProfileState {
    fn finish(&self) {
        *self.done.lock().expect("profile lock") = true;
        self.landed.notify_all();
    }
}

impl Shared {
    /// Fetches the startup profile: the prefetch order cut into runs of adjacent chunks (up to
    /// `merge_bytes` each, in list order), `profile_streams` runs in flight. Each run is
    /// claimed when a stream takes it, so chunks that reads fetched meanwhile are skipped.
    fn fetch_profile(&self) {
        let index = self.layer.index();
        let mut merger = crate::prefetch::RunMerger::new(&index.chunks, self.config.merge_bytes);
        let mut runs: Vec<Range<u32>> = index
            .prefetch
            .iter()
            .filter_map(|&chunk| merger.push(chunk))
            .collect();
        runs.extend(merger.finish());
        let started = Instant::now();
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..self.config.profile_streams.clamp(1, runs.len().max(1)) {
                scope.spawn(|| loop {
                    let at = next.fetch_add(1, Ordering::Relaxed);
                    let Some(run) = runs.get(at) else { break };
                    if self.cancelled.load(Ordering::Relaxed) {
                        break;
                    }
                    let _foreground = FOREGROUND.enter();
                    for claimed in self.claim(run.clone()) {
                        self.fetch(&Job {
                            chunks: claimed,
                            purpose: Purpose::Profile,
                        });
                    }
                });
            }
        });
        tracing::info!(layer = %self.name, chunks = self.layer.index().prefetch.len(),
            ranges = runs.len(), elapsed = ?started.elapsed(), "startup profile fetched");
        self.profile.finish();
    }

    /// A background job, when a worker gets to it: after the bandwidth cap's wait, fetches
    /// only the chunks that are neither cached nor being fetched by now (reads may have
    /// fetched some since the job was queued), and registers them as in flight first, so a
    /// read that wants one of them waits for this fetch instead of fetching it again.
    fn fetch_background(&self, job: &Job) {
        let len = self.sealed_len(job.chunks.clone());
        let wait = self.bucket.lock().expect("bucket lock").take(len);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        loop {
            if self.cancelled.load(Ordering::Relaxed) {
                return;
            }
            if FOREGROUND.is_quiet() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for run in self.claim(job.chunks.clone()) {
            self.fetch(&Job::background(run));
        }
    }

    /// Registers the chunks of `chunks` that nobody has or fetches as in flight; returns them
    /// as runs of adjacent chunks.
    fn claim(&self, chunks: Range<u32>) -> Vec<Range<u32>> {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let mut runs: Vec<Range<u32>> = Vec::new();
        for chunk in chunks {
            if self.is_present(chunk) || inflight.contains_key(&chunk) {
                continue;
            }
            inflight.insert(chunk, Pending::new());
            match runs.last_mut() {
                Some(run) if run.end == chunk => run.end += 1,
                _ => runs.push(chunk..chunk + 1),
            }
        }
        runs
    }
}

/// A fetch worker: on-demand reads only (the background has its own thread).
fn worker(shared: &Shared, urgent: &Receiver<Job>) {
    for job in urgent {
        let _foreground = FOREGROUND.enter();
        shared.fetch(&job);
    }
}

/// On-demand fetches of every layer in the process: the background fetch of all layers waits
/// while any is in flight and for a short quiet period after, so a container's start-up reads
/// do not queue behind background data on the shared network link.
struct Foreground {
    in_flight: AtomicU64,
    /// Milliseconds since `EPOCH` when the last on-demand fetch ended.
    last_end_ms: AtomicU64,
}

static FOREGROUND: Foreground = Foreground {
    in_flight: AtomicU64::new(0),
    last_end_ms: AtomicU64::new(0),
};
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// How long after the last on-demand fetch the background waits: reads of a start-up come in
/// bursts a few milliseconds apart.
const QUIET: Duration = Duration::from_millis(150);

impl Foreground {
    fn now_ms() -> u64 {
        EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    /// Counts an on-demand fetch as in flight until the guard drops.
    fn enter(&'static self) -> ForegroundFetch {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        ForegroundFetch(self)
    }

    /// Whether the background may fetch now.
    fn is_quiet(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && Self::now_ms().saturating_sub(self.last_end_ms.load(Ordering::SeqCst))
                >= QUIET.as_millis() as u64
    }
}

/// An on-demand fetch in flight (see [`Foreground::enter`]).
struct ForegroundFetch(&'static Foreground);

impl Drop for ForegroundFetch {
    fn drop(&mut self) {
        self.0
            .last_end_ms
            .store(Foreground::now_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A token bucket: `take(n)` says how long to wait before spending `n` bytes.
struct TokenBucket {
    rate: Option<u64>,
    available: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: Option<u64>) -> Self {
        TokenBucket {
            rate,
            available: rate.unwrap_or(0) as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self, bytes: u64) -> Duration {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        // At most one second of burst.
        self.available = (self.available
            + now.duration_since(self.last).as_secs_f64() * rate as f64)
            .min(rate as f64);
        self.last = now;
        self.available -= bytes as f64;
        if self.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.available / rate as f64)
        }
    }
}
