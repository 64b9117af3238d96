//! What a layer's fetcher counts: hits per cache tier, chunks fetched per purpose, range reads
//! and their latency, failures. Lock-free counters read by the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::latency::{LatencyHistogram, LATENCY_BUCKETS};

/// Counters of one layer's fetcher.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Chunks served from the memory cache.
    pub memory_hits: AtomicU64,
    /// Chunks served from the disk cache.
    pub disk_hits: AtomicU64,
    /// Chunks fetched from the source for a read.
    pub urgent_chunks: AtomicU64,
    /// Chunks fetched from the source with a read's chunk, read ahead.
    pub readahead_chunks: AtomicU64,
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
    /// Reads waiting now for a chunk being fetched (a gauge, not a count).
    pub reads_waiting: AtomicU64,
    /// How long successful range reads from the source took.
    pub read_latency: LatencyHistogram,
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

/// Fetch counters summed over layers.
#[derive(Clone, Debug, Default)]
pub struct FetchTotals {
    /// Chunks served from the memory cache.
    pub memory_hits: u64,
    /// Chunks served from the disk cache.
    pub disk_hits: u64,
    /// Chunks fetched for a read.
    pub urgent_chunks: u64,
    /// Chunks read ahead with a read's chunk.
    pub readahead_chunks: u64,
    /// Chunks fetched in the background.
    pub background_chunks: u64,
    /// Chunks fetched for a startup profile.
    pub profile_chunks: u64,
    /// Range reads sent to the source.
    pub source_reads: u64,
    /// Sealed bytes read from the source.
    pub source_bytes: u64,
    /// Chunks that failed authentication.
    pub verification_failures: u64,
    /// Reads that timed out.
    pub timeouts: u64,
    /// Reads waiting now for a chunk being fetched.
    pub reads_waiting: u64,
    /// Range reads per latency bucket ([`LATENCY_BUCKETS`], then the rest).
    pub latency_counts: [u64; LATENCY_BUCKETS.len() + 1],
    /// Seconds spent in range reads.
    pub latency_sum: f64,
}

impl FetchTotals {
    /// Adds one layer's counters.
    pub fn add(&mut self, stats: &FetchStats) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.memory_hits += load(&stats.memory_hits);
        self.disk_hits += load(&stats.disk_hits);
        self.urgent_chunks += load(&stats.urgent_chunks);
        self.readahead_chunks += load(&stats.readahead_chunks);
        self.background_chunks += load(&stats.background_chunks);
        self.profile_chunks += load(&stats.profile_chunks);
        self.source_reads += load(&stats.source_reads);
        self.source_bytes += load(&stats.source_bytes);
        self.verification_failures += load(&stats.verification_failures);
        self.timeouts += load(&stats.timeouts);
        self.reads_waiting += load(&stats.reads_waiting);
        let (counts, sum) = stats.read_latency.snapshot();
        for (total, count) in self.latency_counts.iter_mut().zip(counts) {
            *total += count;
        }
        self.latency_sum += sum;
    }
}
