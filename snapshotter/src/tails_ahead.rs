//! Tails of an image's next layers, fetched while containerd is still preparing the ones
//! before them.
//!
//! containerd prepares an image's layers one after another, and each remote Prepare needs
//! its layer's tail (the sealed index) from the registry: a round trip plus the tail's bytes
//! per layer, in series. The first Prepare of an image already has the manifest, which names
//! every following layer, so their tails are fetched then, a few at a time, and each later
//! Prepare finds its tail here. Only the tail is fetched ahead, checked against the digest the
//! manifest pins: no key is unwrapped and nothing decrypted before that layer's own Prepare
//! has checked its identity.
//!
//! Bounded: [`AHEAD_THREADS`] threads node-wide, only while there is work; at most
//! [`MAX_SLOTS`] tails held and [`MAX_BYTES`] of them; a tail no Prepare takes within
//! [`UNTAKEN_TTL`] (its layer was already on the node, or the pull stopped) is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fsformat::oci::SealedLayerAnnotations;
use fsformat::reader::UnverifiedTail;
use oci_spec::image::Descriptor;

use crate::mount;
use crate::source::ChunkSource;

/// Threads fetching tails, node-wide.
pub const AHEAD_THREADS: usize = 4;
/// Tails queued, being fetched or waiting for their Prepare, node-wide.
pub const MAX_SLOTS: usize = 64;
/// Bytes of fetched tails held, node-wide.
pub const MAX_BYTES: u64 = 256 << 20;
/// How long a fetched tail waits for its Prepare.
pub const UNTAKEN_TTL: Duration = Duration::from_secs(60);

/// Which tail: the pinned image reference, the layer's digest and the index digest its
/// descriptor pins.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TailKey {
    image: String,
    layer: String,
    index_digest: String,
}

impl TailKey {
    /// The key of `descriptor` in the image pinned as `image`; `None` when it is not a
    /// sealed layer's descriptor.
    pub fn of(image: &str, descriptor: &Descriptor) -> Option<Self> {
        let annotations = descriptor.annotations().as_ref()?;
        Some(TailKey {
            image: image.to_string(),
            layer: descriptor.digest().to_string(),
            index_digest: annotations
                .get(fsformat::oci::ANNOTATION_INDEX_DIGEST)?
                .clone(),
        })
    }
}

/// One tail to fetch.
pub struct TailJob {
    /// Its key.
    pub key: TailKey,
    /// The layer's descriptor.
    pub descriptor: Descriptor,
    /// Where the layer's blob is read.
    pub source: Arc<dyn ChunkSource>,
    /// The largest tail accepted.
    pub max_index_bytes: u64,
}

enum Slot {
    Queued,
    Fetching,
    Fetched(Instant, Box<UnverifiedTail>),
    /// Could not be fetched: the Prepare fetches it itself and reports why.
    Failed,
}

#[derive(Default)]
struct State {
    queue: VecDeque<TailJob>,
    slots: HashMap<TailKey, Slot>,
    /// Bytes in `Fetched` slots.
    bytes: u64,
    threads: usize,
}

impl State {
    fn drop_stale(&mut self, now: Instant) {
        let mut freed = 0;
        self.slots.retain(|_, slot| match slot {
            Slot::Fetched(at, tail) if now.duration_since(*at) > UNTAKEN_TTL => {
                freed += tail.byte_len() as u64;
                false
            }
            Slot::Failed => false,
            _ => true,
        });
        self.bytes -= freed;
    }
}

/// Tails fetched ahead of their Prepare; see the module documentation.
#[derive(Default)]
pub struct TailsAhead {
    state: Mutex<State>,
    changed: Condvar,
}

impl TailsAhead {
    /// Queues `jobs` (those already known or over the bounds are skipped) and starts threads
    /// for them, up to [`AHEAD_THREADS`].
    pub fn schedule(self: &Arc<Self>, jobs: Vec<TailJob>) {
        let mut state = self.state.lock().expect("tails lock");
        state.drop_stale(Instant::now());
        for job in jobs {
            if state.slots.len() >= MAX_SLOTS {
                break;
            }
            if state.slots.contains_key(&job.key) {
                continue;
            }
            state.slots.insert(job.key.clone(), Slot::Queued);
            state.queue.push_back(job);
        }
        while state.threads < AHEAD_THREADS && state.threads < state.queue.len() {
            let ahead = self.clone();
            let spawned = std::thread::Builder::new()
                .name("sealfs-tails".into())
                .spawn(move || ahead.work());
            match spawned {
                Ok(_) => state.threads += 1,
                Err(error) => {
                    // The queued tails are then fetched by their Prepares, as without this.
                    tracing::warn!(%error, "could not start a thread to fetch layer tails ahead");
                    break;
                }
            }
        }
    }

    fn work(&self) {
        let mut state = self.state.lock().expect("tails lock");
        while let Some(job) = state.queue.pop_front() {
            state.slots.insert(job.key.clone(), Slot::Fetching);
            drop(state);
            let fetched = SealedLayerAnnotations::read_from(
                &job.descriptor.annotations().clone().unwrap_or_default(),
            )
            .ok()
            .and_then(|facts| {
                mount::read_tail(&job.descriptor, &facts, &*job.source, job.max_index_bytes)
                    .inspect_err(|error| {
                        tracing::debug!(layer = %job.key.layer, error = %crate::error_chain(error), "tail not fetched ahead; its Prepare fetches it");
                    })
                    .ok()
            });
            state = self.state.lock().expect("tails lock");
            // A Prepare that stopped waiting removed the slot: then nobody wants the tail.
            let room = MAX_BYTES - state.bytes;
            if let Some(slot) = state.slots.get_mut(&job.key) {
                match fetched {
                    Some(tail) if tail.byte_len() as u64 <= room => {
                        let len = tail.byte_len() as u64;
                        *slot = Slot::Fetched(Instant::now(), Box::new(tail));
                        state.bytes += len;
                    }
                    _ => *slot = Slot::Failed,
                }
            }
            self.changed.notify_all();
        }
        state.threads -= 1;
        self.changed.notify_all();
    }

    /// The tail of `key` if it was fetched ahead, waiting up to `wait` for one being fetched.
    /// `None`: not fetched ahead (or not in time); the caller fetches it itself. A tail that
    /// is still queued is taken off the queue.
    pub fn take(&self, key: &TailKey, wait: Duration) -> Option<UnverifiedTail> {
        let deadline = Instant::now() + wait;
        let mut state = self.state.lock().expect("tails lock");
        loop {
            match state.slots.get(key) {
                None => return None,
                Some(Slot::Fetching) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    state = self
                        .changed
                        .wait_timeout(state, left)
                        .expect("tails lock")
                        .0;
                }
                Some(Slot::Queued) => {
                    state.queue.retain(|job| &job.key != key);
                    state.slots.remove(key);
                    return None;
                }
                Some(Slot::Failed) => {
                    state.slots.remove(key);
                    return None;
                }
                Some(Slot::Fetched(..)) => {
                    let Some(Slot::Fetched(_, tail)) = state.slots.remove(key) else {
                        unreachable!("matched above");
                    };
                    state.bytes -= tail.byte_len() as u64;
                    return Some(*tail);
                }
            }
        }
    }

    /// Tails held or on their way, and threads fetching them (for tests and metrics).
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock().expect("tails lock");
        (state.slots.len(), state.threads)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;

    use fsformat::oci::MEDIA_TYPE_SEALED_LAYER;
    use fsformat::writer::{seal_layer, SealOptions};
    use fsformat::LayerKey;

    use super::*;
    use crate::source::SourceError;

    /// A sealed layer in memory and its descriptor.
    fn sealed(index_digest_override: Option<&str>) -> (Vec<u8>, Descriptor, String) {
        let mut builder = tar::Builder::new(Vec::new());
        let data = sealfs_e2e::noise(3, 100_000);
        let mut header = sealfs_e2e::regular_header(data.len() as u64);
        builder.append_data(&mut header, "file", &data[..]).unwrap();
        let tar = builder.into_inner().unwrap();
        let mut blob = Vec::new();
        let summary = seal_layer(
            &tar[..],
            &mut blob,
            &LayerKey::generate().unwrap(),
            &SealOptions::default(),
        )
        .unwrap();
        let facts = SealedLayerAnnotations {
            index_digest: index_digest_override
                .unwrap_or(&summary.tail_digest)
                .to_string(),
            index_size: summary.tail_size,
            stanzas: Vec::new(),
        };
        let mut descriptor = crate::oci_layout::descriptor(
            oci_spec::image::MediaType::Other(MEDIA_TYPE_SEALED_LAYER.into()),
            &fsformat::digest::digest_of(&blob),
            blob.len() as u64,
        )
        .unwrap();
        descriptor.set_annotations(Some(facts.pairs().into_iter().collect()));
        (blob, descriptor, summary.tail_digest)
    }

    /// A registry that answers only when the test says so: stands in for a slow registry,
    /// which the real one cannot be made on demand. The bytes are the real sealed blob's.
    struct GatedSource {
        blob: Vec<u8>,
        entered: Mutex<mpsc::Sender<()>>,
        release: Mutex<mpsc::Receiver<()>>,
        reads: AtomicU64,
    }

    impl ChunkSource for GatedSource {
        fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let _ = self.entered.lock().unwrap().send(());
            self.release.lock().unwrap().recv().unwrap();
            Ok(self.blob[offset as usize..offset as usize + len].to_vec())
        }
    }

    struct Gate {
        entered: mpsc::Receiver<()>,
        release: mpsc::Sender<()>,
        source: Arc<GatedSource>,
    }

    fn gated(blob: Vec<u8>) -> Gate {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        Gate {
            entered,
            release,
            source: Arc::new(GatedSource {
                blob,
                entered: Mutex::new(entered_tx),
                release: Mutex::new(release_rx),
                reads: AtomicU64::new(0),
            }),
        }
    }

    fn job(descriptor: &Descriptor, source: Arc<GatedSource>) -> TailJob {
        TailJob {
            key: TailKey::of("registry.test/app@sha256:m", descriptor).unwrap(),
            descriptor: descriptor.clone(),
            source,
            max_index_bytes: crate::mount::DEFAULT_MAX_INDEX_BYTES,
        }
    }

    const WAIT: Duration = Duration::from_secs(30);

    /// Waits (on the condvar the threads signal as they end) until no thread is left.
    fn until_threads_end(ahead: &TailsAhead) -> std::sync::MutexGuard<'_, State> {
        let deadline = Instant::now() + WAIT;
        let mut state = ahead.state.lock().unwrap();
        while state.threads > 0 {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("the threads end");
            state = ahead.changed.wait_timeout(state, left).unwrap().0;
        }
        state
    }

    /// Schedules the tail of `descriptor` and, once its fetch is in flight, asks for it as a
    /// Prepare would, then lets the fetch finish: what the Prepare got, and the fetcher.
    fn take_while_in_flight(
        blob: Vec<u8>,
        descriptor: &Descriptor,
    ) -> (Option<UnverifiedTail>, Arc<TailsAhead>, Gate, TailKey) {
        let gate = gated(blob);
        let ahead = Arc::new(TailsAhead::default());
        let job = job(descriptor, gate.source.clone());
        let key = job.key.clone();
        ahead.schedule(vec![job]);
        gate.entered.recv().unwrap();
        let taking = {
            let ahead = ahead.clone();
            let key = key.clone();
            std::thread::spawn(move || ahead.take(&key, WAIT))
        };
        gate.release.send(()).unwrap();
        (taking.join().unwrap(), ahead, gate, key)
    }

    #[test]
    fn a_prepare_takes_the_verified_tail_fetched_ahead_and_waits_for_one_in_flight() {
        let (blob, descriptor, tail_digest) = sealed(None);
        // The fetch is in flight when the Prepare asks: it waits instead of fetching again.
        let (taken, ahead, gate, key) = take_while_in_flight(blob, &descriptor);
        let tail = taken.expect("the tail fetched ahead");
        assert_eq!(tail.digest(), tail_digest);
        assert_eq!(gate.source.reads.load(Ordering::SeqCst), 1);
        // Taken once; held tails cost nothing afterwards.
        assert!(ahead.take(&key, Duration::ZERO).is_none());
        assert_eq!(ahead.state.lock().unwrap().bytes, 0);
    }

    #[test]
    fn a_tail_that_does_not_match_its_pinned_digest_is_left_to_its_prepare() {
        let (blob, descriptor, _) = sealed(Some(&format!("sha256:{}", "1".repeat(64))));
        let (taken, ahead, _gate, _) = take_while_in_flight(blob, &descriptor);
        assert!(taken.is_none());
        assert!(ahead.state.lock().unwrap().slots.is_empty());
    }

    #[test]
    fn a_queued_tail_its_prepare_asks_for_is_taken_off_the_queue_and_never_fetched() {
        let (blob, descriptor, _) = sealed(None);
        let ahead = Arc::new(TailsAhead::default());
        // Every thread busy on a tail of its own, so the next one waits in the queue.
        let busy: Vec<Gate> = (0..AHEAD_THREADS).map(|_| gated(blob.clone())).collect();
        let mut jobs: Vec<TailJob> = busy
            .iter()
            .enumerate()
            .map(|(n, gate)| {
                let mut job = job(&descriptor, gate.source.clone());
                job.key.image = format!("registry.test/busy-{n}@sha256:m");
                job
            })
            .collect();
        let waiting = gated(blob.clone());
        let queued = job(&descriptor, waiting.source.clone());
        let key = queued.key.clone();
        jobs.push(queued);
        ahead.schedule(jobs);
        for gate in &busy {
            gate.entered.recv().unwrap();
        }
        assert_eq!(ahead.counts(), (AHEAD_THREADS + 1, AHEAD_THREADS));
        assert!(
            ahead.take(&key, WAIT).is_none(),
            "not fetched: nothing to wait for"
        );
        for gate in &busy {
            gate.release.send(()).unwrap();
        }
        // The threads drain the queue and end; the queued tail was never read.
        drop(until_threads_end(&ahead));
        assert_eq!(waiting.source.reads.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn scheduling_is_bounded_and_skips_what_it_already_has() {
        let (blob, descriptor, _) = sealed(None);
        let ahead = Arc::new(TailsAhead::default());
        let gate = gated(blob);
        let jobs: Vec<TailJob> = (0..MAX_SLOTS + 10)
            .map(|n| {
                let mut job = job(&descriptor, gate.source.clone());
                job.key.image = format!("registry.test/app-{}@sha256:m", n % (MAX_SLOTS + 5));
                job
            })
            .collect();
        ahead.schedule(jobs);
        let (slots, threads) = ahead.counts();
        assert_eq!(slots, MAX_SLOTS);
        assert!(threads <= AHEAD_THREADS);
        // Let every fetch through; the threads end with the queue.
        for _ in 0..MAX_SLOTS {
            let _ = gate.release.send(());
        }
        assert!(until_threads_end(&ahead).bytes <= MAX_BYTES);
    }
}
