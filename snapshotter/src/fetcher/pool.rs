//! The node's fetch workers: one fixed pool serves every mounted layer, so threads do not grow
//! with layers. It knows nothing of layers or chunks, only of work in three classes, taken in
//! this order:
//!
//! 1. **urgent** jobs: a read waits for them. A FIFO bounded by [`URGENT_CAPACITY`]; a reader
//!    that finds it full waits for room (readers are FUSE threads, a fixed number).
//! 2. **profile** feeds: a layer's startup profile, produced a run at a time as workers get to
//!    it, so a profile never sits in a queue; counted as foreground work for the gate.
//! 3. **background** feeds: the whole layer, a run at a time, round robin over the layers,
//!    at most `background_streams` at once, only while the [`Gate`] says no foreground fetch
//!    is in flight or just ended, and within the bandwidth cap.
//!
//! Workers sleep on one condition variable; every change that could let one proceed (a job
//! queued, a feed added, a job finished, the gate's quiet time reached) wakes them. No polling.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Urgent jobs queued at most; more than the FUSE threads of any node.
pub const URGENT_CAPACITY: usize = 1024;

/// One unit of fetch work.
pub trait Job: Send {
    /// Which layer (owner) the job belongs to, so [`FetchPool::cancel`] can drop its work.
    fn owner(&self) -> u64;
    /// Sealed bytes it reads (what the bandwidth cap charges).
    fn bytes(&self) -> u64;
    /// Does the work. Dropping a job instead is always safe: it releases its claims.
    fn run(self: Box<Self>);
}

/// What a feed has next.
pub enum Next {
    /// This job.
    Job(Box<dyn Job>),
    /// Nothing now (its streams are busy); ask again later.
    Later,
    /// Nothing ever again: the feed leaves the pool.
    Done,
}

/// Produces jobs on demand (a layer's profile or background fetch).
pub trait Feed: Send + Sync {
    /// Which layer (owner) it belongs to.
    fn owner(&self) -> u64;
    /// The next job, if any; called with the pool's lock held, so it must not block.
    fn next(&self) -> Next;
}

/// Tunables of the node's pool (defaults in docs/configuration.md).
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Worker threads for the whole node.
    pub threads: usize,
    /// Background range reads in flight at once, node-wide.
    pub background_streams: usize,
    /// Bandwidth cap of the background fetch, bytes per second, node-wide (`None`: none).
    pub background_bytes_per_sec: Option<u64>,
    /// How long after the last foreground fetch the background waits: a start-up's reads come
    /// in bursts a few milliseconds apart.
    pub quiet: Duration,
    /// How long after a layer is mounted (its background feed added) the background waits:
    /// the container that mounted it is about to start, and between the mount and its first
    /// read (containerd creating it, runc starting it) the link would otherwise fill with
    /// background requests that its reads then queue behind.
    pub after_mount: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            threads: 8,
            background_streams: 2,
            background_bytes_per_sec: None,
            quiet: Duration::from_millis(150),
            after_mount: Duration::from_secs(2),
        }
    }
}

/// Why a job could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub struct PoolStopped;

/// Foreground fetches in flight and when the last one ended: the background waits for quiet.
#[derive(Debug)]
pub struct Gate {
    in_flight: usize,
    last_end: Option<Instant>,
    quiet: Duration,
    /// Closed until then, whatever the foreground does.
    held_until: Option<Instant>,
}

impl Gate {
    /// A gate that wants `quiet` after the last foreground fetch.
    pub fn new(quiet: Duration) -> Self {
        Gate {
            in_flight: 0,
            last_end: None,
            quiet,
            held_until: None,
        }
    }

    /// Keeps the gate closed until `until` at least.
    pub fn hold_until(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    /// A foreground fetch starts.
    pub fn enter(&mut self) {
        self.in_flight += 1;
    }

    /// A foreground fetch ended at `now`.
    pub fn leave(&mut self, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.last_end = Some(now);
    }

    /// When the background may fetch, asked at `now`: `None` while a foreground fetch is in
    /// flight (wait for it to end), else the instant quiet is reached (maybe `now`).
    pub fn open_at(&self, now: Instant) -> Option<Instant> {
        if self.in_flight > 0 {
            return None;
        }
        let quiet_at = self.last_end.map_or(now, |end| end + self.quiet);
        Some(self.held_until.map_or(quiet_at, |held| held.max(quiet_at)))
    }
}

/// A token bucket: [`TokenBucket::take`] says how long to wait before spending `n` bytes.
#[derive(Debug)]
pub struct TokenBucket {
    rate: Option<u64>,
    available: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilling at `rate` bytes per second, at most one second of burst.
    pub fn new(rate: Option<u64>, now: Instant) -> Self {
        TokenBucket {
            rate,
            available: rate.unwrap_or(0) as f64,
            last: now,
        }
    }

    /// Spends `bytes` at `now`; returns how long to wait before using them.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return Duration::ZERO;
        };
        self.available = (self.available
            + now.saturating_duration_since(self.last).as_secs_f64() * rate as f64)
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

struct Queues {
    urgent: VecDeque<Box<dyn Job>>,
    profile: VecDeque<Arc<dyn Feed>>,
    background: VecDeque<Arc<dyn Feed>>,
    background_in_flight: usize,
    /// The most background jobs ever in flight at once (what the bound is checked against).
    background_peak: usize,
    /// Background work may not start before this (the bandwidth cap's debt).
    background_not_before: Instant,
    gate: Gate,
    bucket: TokenBucket,
    stopping: bool,
}

struct Inner {
    config: PoolConfig,
    queues: Mutex<Queues>,
    wake: Condvar,
}

/// The node's fetch workers (see the module docs). Dropping it stops and joins them; queued
/// jobs are dropped, which releases their claims.
pub struct FetchPool {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl FetchPool {
    /// Starts `config.threads` workers.
    pub fn start(config: PoolConfig) -> Arc<Self> {
        let now = Instant::now();
        let inner = Arc::new(Inner {
            queues: Mutex::new(Queues {
                urgent: VecDeque::new(),
                profile: VecDeque::new(),
                background: VecDeque::new(),
                background_in_flight: 0,
                background_peak: 0,
                background_not_before: now,
                gate: Gate::new(config.quiet),
                bucket: TokenBucket::new(config.background_bytes_per_sec, now),
                stopping: false,
            }),
            wake: Condvar::new(),
            config,
        });
        let threads = (0..inner.config.threads.max(1))
            .map(|n| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("sealfs-fetch-{n}"))
                    .spawn(move || inner.work())
                    .expect("spawning a fetch worker")
            })
            .collect();
        Arc::new(FetchPool { inner, threads })
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Queues an urgent job, waiting for room if the queue is full.
    pub fn urgent(&self, job: Box<dyn Job>) -> Result<(), PoolStopped> {
        let mut queues = self.inner.lock();
        while queues.urgent.len() >= URGENT_CAPACITY && !queues.stopping {
            queues = self.inner.wake.wait(queues).expect("pool lock");
        }
        if queues.stopping {
            return Err(PoolStopped);
        }
        queues.urgent.push_back(job);
        drop(queues);
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Adds a layer's profile feed.
    pub fn add_profile(&self, feed: Arc<dyn Feed>) {
        self.inner.lock().profile.push_back(feed);
        self.inner.wake.notify_all();
    }

    /// Adds a layer's background feed; the background waits [`PoolConfig::after_mount`].
    pub fn add_background(&self, feed: Arc<dyn Feed>) {
        let mut queues = self.inner.lock();
        let until = Instant::now() + self.inner.config.after_mount;
        queues.gate.hold_until(until);
        queues.background.push_back(feed);
        drop(queues);
        self.inner.wake.notify_all();
    }

    /// Drops the queued jobs and the feeds of `owner` (a layer being unmounted). Jobs running
    /// now finish; their owner waits for them.
    pub fn cancel(&self, owner: u64) {
        let dropped: Vec<Box<dyn Job>>;
        {
            let mut queues = self.inner.lock();
            let (keep, drop_now): (VecDeque<_>, VecDeque<_>) = queues
                .urgent
                .drain(..)
                .partition(|job| job.owner() != owner);
            queues.urgent = keep;
            dropped = drop_now.into();
            queues.profile.retain(|feed| feed.owner() != owner);
            queues.background.retain(|feed| feed.owner() != owner);
        }
        // Outside the lock: dropping a job completes its claims.
        drop(dropped);
        self.inner.wake.notify_all();
    }

    /// The most background jobs that were ever in flight at once.
    pub fn background_peak(&self) -> usize {
        self.inner.lock().background_peak
    }

    /// Wakes the workers: a feed that answered [`Next::Later`] may have work now.
    pub fn poke(&self) {
        self.inner.wake.notify_all();
    }
}

impl Drop for FetchPool {
    fn drop(&mut self) {
        let dropped = {
            let mut queues = self.inner.lock();
            queues.stopping = true;
            queues.profile.clear();
            queues.background.clear();
            std::mem::take(&mut queues.urgent)
        };
        drop(dropped);
        self.inner.wake.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What a worker takes next.
enum Work {
    Foreground(Box<dyn Job>),
    Background(Box<dyn Job>),
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().expect("pool lock")
    }

    fn work(&self) {
        let mut queues = self.lock();
        loop {
            if queues.stopping {
                return;
            }
            let (work, wait) = self.next_work(&mut queues);
            let Some(work) = work else {
                queues = match wait {
                    Some(wait) => self.wake.wait_timeout(queues, wait).expect("pool lock").0,
                    None => self.wake.wait(queues).expect("pool lock"),
                };
                continue;
            };
            drop(queues);
            // Room in the urgent queue, or a feed's stream slot: others may proceed.
            self.wake.notify_all();
            match work {
                Work::Foreground(job) => {
                    job.run();
                    queues = self.lock();
                    queues.gate.leave(Instant::now());
                }
                Work::Background(job) => {
                    job.run();
                    queues = self.lock();
                    queues.background_in_flight -= 1;
                }
            }
            self.wake.notify_all();
        }
    }

    /// The next work, or how long to sleep before looking again (`None`: until woken).
    fn next_work(&self, queues: &mut Queues) -> (Option<Work>, Option<Duration>) {
        if let Some(job) = queues.urgent.pop_front() {
            queues.gate.enter();
            return (Some(Work::Foreground(job)), None);
        }
        if let Some(job) = next_of(&mut queues.profile) {
            queues.gate.enter();
            return (Some(Work::Foreground(job)), None);
        }
        if queues.background.is_empty()
            || queues.background_in_flight >= self.config.background_streams.max(1)
        {
            return (None, None);
        }
        let now = Instant::now();
        let Some(open_at) = queues.gate.open_at(now) else {
            return (None, None);
        };
        let open_at = open_at.max(queues.background_not_before);
        if open_at > now {
            return (None, Some(open_at - now));
        }
        let Some(job) = next_of(&mut queues.background) else {
            return (None, None);
        };
        let debt = queues.bucket.take(job.bytes(), now);
        queues.background_not_before = now + debt;
        queues.background_in_flight += 1;
        queues.background_peak = queues.background_peak.max(queues.background_in_flight);
        (Some(Work::Background(job)), None)
    }
}

/// The next job of the first feed in `ring` that has one, rotating the ring so layers take
/// turns; feeds that are done leave it.
fn next_of(ring: &mut VecDeque<Arc<dyn Feed>>) -> Option<Box<dyn Job>> {
    for _ in 0..ring.len() {
        let feed = ring.pop_front()?;
        match feed.next() {
            Next::Job(job) => {
                ring.push_back(feed);
                return Some(job);
            }
            Next::Later => ring.push_back(feed),
            Next::Done => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    /// A job that reports when it runs and then blocks until released, so a test can hold
    /// workers busy and observe the order in which work is taken.
    struct Probe {
        owner: u64,
        name: &'static str,
        started: mpsc::Sender<&'static str>,
        release: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Job for Probe {
        fn owner(&self) -> u64 {
            self.owner
        }
        fn bytes(&self) -> u64 {
            1000
        }
        fn run(self: Box<Self>) {
            let _ = self.started.send(self.name);
            let (lock, released) = &*self.release;
            let _unused = released
                .wait_while(lock.lock().unwrap(), |go| !*go)
                .unwrap();
        }
    }

    struct Harness {
        started: mpsc::Sender<&'static str>,
        seen: mpsc::Receiver<&'static str>,
        release: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Harness {
        fn new() -> Self {
            let (started, seen) = mpsc::channel();
            Harness {
                started,
                seen,
                release: Arc::new((Mutex::new(false), Condvar::new())),
            }
        }
        fn probe(&self, owner: u64, name: &'static str) -> Box<dyn Job> {
            Box::new(Probe {
                owner,
                name,
                started: self.started.clone(),
                release: self.release.clone(),
            })
        }
        fn release_all(&self) {
            *self.release.0.lock().unwrap() = true;
            self.release.1.notify_all();
        }
        fn next(&self) -> &'static str {
            self.seen.recv_timeout(Duration::from_secs(60)).unwrap()
        }
    }

    /// A feed of `count` probes named `name`.
    struct ProbeFeed {
        owner: u64,
        left: AtomicUsize,
        make: Box<dyn Fn() -> Box<dyn Job> + Send + Sync>,
    }

    impl Feed for ProbeFeed {
        fn owner(&self) -> u64 {
            self.owner
        }
        fn next(&self) -> Next {
            match self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            {
                Ok(_) => Next::Job((self.make)()),
                Err(_) => Next::Done,
            }
        }
    }

    fn feed(harness: &Harness, owner: u64, name: &'static str, count: usize) -> Arc<dyn Feed> {
        let (started, release) = (harness.started.clone(), harness.release.clone());
        Arc::new(ProbeFeed {
            owner,
            left: AtomicUsize::new(count),
            make: Box::new(move || {
                Box::new(Probe {
                    owner,
                    name,
                    started: started.clone(),
                    release: release.clone(),
                })
            }),
        })
    }

    #[test]
    fn urgent_work_goes_before_profile_and_profile_before_background() {
        let harness = Harness::new();
        let pool = FetchPool::start(PoolConfig {
            threads: 1,
            quiet: Duration::from_millis(50),
            after_mount: Duration::ZERO,
            ..PoolConfig::default()
        });
        // Occupy the only worker, then queue one of each class behind it.
        pool.urgent(harness.probe(1, "first")).unwrap();
        assert_eq!(harness.next(), "first");
        pool.add_background(feed(&harness, 1, "background", 1));
        pool.add_profile(feed(&harness, 1, "profile", 1));
        pool.urgent(harness.probe(1, "urgent")).unwrap();
        harness.release_all();
        assert_eq!(harness.next(), "urgent");
        assert_eq!(harness.next(), "profile");
        // Then the background, once the gate's quiet time has passed (the worker waits for
        // that instant; `the_gate_opens_...` checks the instant itself).
        assert_eq!(harness.next(), "background");
    }

    #[test]
    fn background_streams_are_bounded_node_wide_and_layers_take_turns() {
        let harness = Harness::new();
        let pool = FetchPool::start(PoolConfig {
            threads: 4,
            background_streams: 2,
            quiet: Duration::ZERO,
            after_mount: Duration::ZERO,
            ..PoolConfig::default()
        });
        pool.add_background(feed(&harness, 1, "a", 10));
        pool.add_background(feed(&harness, 2, "b", 10));
        let mut first = [harness.next(), harness.next()];
        first.sort();
        assert_eq!(first, ["a", "b"], "round robin over layers");
        harness.release_all();
        for _ in 0..18 {
            harness.next();
        }
        // Four workers, but never more than two background streams at once.
        assert_eq!(pool.background_peak(), 2);
    }

    #[test]
    fn cancel_drops_an_owners_queued_jobs_and_feeds() {
        struct Counted(u64, Arc<AtomicUsize>);
        impl Job for Counted {
            fn owner(&self) -> u64 {
                self.0
            }
            fn bytes(&self) -> u64 {
                0
            }
            fn run(self: Box<Self>) {
                panic!("a cancelled job ran");
            }
        }
        impl Drop for Counted {
            fn drop(&mut self) {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
        }
        let harness = Harness::new();
        let pool = FetchPool::start(PoolConfig {
            threads: 1,
            ..PoolConfig::default()
        });
        pool.urgent(harness.probe(9, "blocker")).unwrap();
        assert_eq!(harness.next(), "blocker");
        let dropped = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            pool.urgent(Box::new(Counted(5, dropped.clone()))).unwrap();
        }
        pool.add_background(feed(&harness, 5, "never", 3));
        pool.cancel(5);
        assert_eq!(dropped.load(Ordering::SeqCst), 3);
        pool.urgent(harness.probe(9, "after")).unwrap();
        harness.release_all();
        assert_eq!(harness.next(), "after");
        drop(pool);
        assert!(
            harness.seen.try_recv().is_err(),
            "the cancelled feed never ran"
        );
    }

    #[test]
    fn the_bandwidth_cap_spaces_background_reads() {
        let mut bucket = TokenBucket::new(Some(1000), Instant::now());
        let now = Instant::now();
        assert_eq!(
            bucket.take(1000, now),
            Duration::ZERO,
            "one second of burst"
        );
        let wait = bucket.take(500, now);
        assert!(wait >= Duration::from_millis(499) && wait <= Duration::from_millis(501));
        let mut unlimited = TokenBucket::new(None, now);
        assert_eq!(unlimited.take(u64::MAX, now), Duration::ZERO);
    }

    #[test]
    fn the_gate_opens_a_quiet_time_after_the_last_foreground_fetch() {
        let mut gate = Gate::new(Duration::from_millis(150));
        let start = Instant::now();
        assert_eq!(gate.open_at(start), Some(start));
        gate.enter();
        gate.enter();
        assert_eq!(gate.open_at(start), None);
        let end = Instant::now();
        gate.leave(end);
        assert_eq!(gate.open_at(end), None, "one still in flight");
        gate.leave(end);
        assert_eq!(gate.open_at(end), Some(end + Duration::from_millis(150)));
        // A hold keeps it closed past the quiet time, and only a later hold extends it.
        gate.hold_until(end + Duration::from_secs(2));
        gate.hold_until(end + Duration::from_secs(1));
        assert_eq!(gate.open_at(end), Some(end + Duration::from_secs(2)));
        gate.enter();
        gate.leave(end + Duration::from_secs(3));
        assert_eq!(
            gate.open_at(end),
            Some(end + Duration::from_secs(3) + Duration::from_millis(150))
        );
    }
}
