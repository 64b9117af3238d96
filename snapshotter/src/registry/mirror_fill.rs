//! Pull-through mirrors that do not hold a blob yet: how a node notices ([`RangeIgnored`]),
//! asks one read at a time, and waits for the mirror or goes elsewhere ([`MirrorBlobs`]).

use std::time::Duration;

use oci_client::errors::OciDistributionError;

/// What pull-through mirrors did to a node's range reads, for its metrics.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Range reads a mirror answered with the whole blob (it did not hold the blob yet).
    pub whole_blob_answers: std::sync::atomic::AtomicU64,
    /// Range reads that went past a mirror still fetching their blob to the next host: after
    /// waiting `mirror_fill_wait`, at once when 4 reads already waited for that mirror, or
    /// after it had not served the blob for minutes.
    pub reads_passed_on: std::sync::atomic::AtomicU64,
}

/// What a mirror is known to do with range reads of one blob.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BlobState {
    /// One read is asking it (since then). Other reads of the blob wait for the answer (see
    /// [`MirrorBlobs::wait_to_read`]): a mirror still fetching the blob streams a whole copy
    /// from upstream for every request, so it gets one per node at a time, not one per read in
    /// flight.
    Asking {
        since: std::time::Instant,
        history: History,
    },
    /// It answered with the whole blob: left alone for this blob until then.
    Filling {
        ask_again_at: std::time::Instant,
        history: History,
    },
    /// It has answered with the whole blob for longer than any fetch should take (a mirror
    /// that never serves ranges), and a read waited its whole `mirror_fill_wait` again: reads
    /// of the blob go elsewhere at once until then, without waiting; then one asks again.
    GivenUp {
        until: std::time::Instant,
        history: History,
    },
    /// It served a range: every read of the blob goes to it.
    Serving,
}

/// The whole-blob answers a mirror gave for one blob.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct History {
    /// The wait before asking again after the next whole-blob answer (zero: none yet).
    backoff: Duration,
    /// When it first answered with the whole blob.
    whole_since: Option<std::time::Instant>,
}

impl BlobState {
    fn history(self) -> History {
        match self {
            BlobState::Asking { history, .. }
            | BlobState::Filling { history, .. }
            | BlobState::GivenUp { history, .. } => history,
            BlobState::Serving => History::default(),
        }
    }
}

/// How many blobs a mirror's [`BlobState`]s are kept for: more than a node reads at once.
const MIRROR_BLOBS: usize = 1024;
/// How long a mirror that answered a range read of a blob with the whole blob is first left
/// alone for that blob, doubling while it goes on doing so, up to [`MIRROR_FILL_BACKOFF_MAX`].
/// Each ask costs the origin a little (the mirror opens a second stream of the blob from
/// upstream for it, cut when the node hangs up); waiting reads wait this long between asks.
const MIRROR_FILL_BACKOFF: Duration = Duration::from_secs(1);
const MIRROR_FILL_BACKOFF_MAX: Duration = Duration::from_secs(4);
/// A read asking a mirror for longer than this is taken as lost: the next read asks.
const MIRROR_ASKING_STALE: Duration = Duration::from_secs(30);
/// How long a mirror may answer a blob with the whole blob before reads stop waiting for it:
/// longer than a pull-through cache takes to fetch a big layer.
const MIRROR_GIVE_UP_AFTER: Duration = Duration::from_secs(120);
/// How long reads of such a blob then go elsewhere without waiting.
const MIRROR_GIVE_UP: Duration = Duration::from_secs(60);

/// A mirror answered a range read with the whole blob. A pull-through cache does that while
/// it does not hold the blob yet: distribution's proxy mode (`docker-registry` with `proxy:`)
/// then fetches the whole blob from upstream once into its storage, and streams a second copy
/// from upstream to the client. Reading through that stream to the range would carry the
/// blob up to the range over the node's link (a layer's tail is at its end: all of it), and
/// the origin would send it once more for every such read. So the read goes to the next
/// endpoint instead, and the mirror is asked for the blob again after a backoff, by when it
/// has it and answers with the range.
#[derive(Debug)]
pub(super) struct RangeIgnored;

impl std::fmt::Display for RangeIgnored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the mirror answered a range read with the whole blob (it is still fetching it)",
        )
    }
}

impl std::error::Error for RangeIgnored {}

impl RangeIgnored {
    /// The error a request returns for it.
    pub(super) fn error() -> OciDistributionError {
        OciDistributionError::IoError(std::io::Error::other(RangeIgnored))
    }

    pub(super) fn is(error: &OciDistributionError) -> bool {
        matches!(error, OciDistributionError::IoError(io)
            if io.get_ref().is_some_and(|inner| inner.is::<RangeIgnored>()))
    }
}

/// What a mirror does with range reads of the blobs read lately (see [`RangeIgnored`]);
/// bounded, the least recently read forgotten first. Reads waiting for the mirror to hold a
/// blob wait on `changed`.
pub(super) struct MirrorBlobs {
    states: std::sync::Mutex<lru::LruCache<String, BlobState>>,
    changed: std::sync::Condvar,
    /// Reads waiting for this mirror now (changed under `states`' lock).
    waiting: std::sync::atomic::AtomicUsize,
}

/// At most this many reads wait for one mirror at a time; more go to the next endpoint at
/// once. A waiting read holds one of the node's fetch threads (8 by default): the others stay
/// free for layers the mirror does not hold up.
const MIRROR_WAITERS: usize = 4;

/// Counts a read among a mirror's waiting reads while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether a read goes to the mirror now, or when to look again, or elsewhere at once.
enum Turn {
    Now,
    NotBefore(std::time::Instant),
    Elsewhere,
}

impl MirrorBlobs {
    pub(super) fn new() -> Self {
        MirrorBlobs {
            states: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MIRROR_BLOBS).expect("not zero"),
            )),
            changed: std::sync::Condvar::new(),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Whether a read of `digest` goes to this mirror at `now`. When what the mirror does with
    /// the blob is not known, the read that gets [`Turn::Now`] is the one asking.
    fn turn(
        states: &mut lru::LruCache<String, BlobState>,
        digest: &str,
        now: std::time::Instant,
    ) -> Turn {
        let history = match states.get(digest).copied() {
            Some(BlobState::Serving) => return Turn::Now,
            Some(BlobState::Asking { since, .. }) if now < since + MIRROR_ASKING_STALE => {
                return Turn::NotBefore(since + MIRROR_ASKING_STALE)
            }
            Some(BlobState::Filling { ask_again_at, .. }) if now < ask_again_at => {
                return Turn::NotBefore(ask_again_at)
            }
            Some(BlobState::GivenUp { until, .. }) if now < until => return Turn::Elsewhere,
            Some(state) => state.history(),
            None => History::default(),
        };
        states.put(
            digest.to_string(),
            BlobState::Asking {
                since: now,
                history,
            },
        );
        Turn::Now
    }

    #[cfg(test)]
    fn may_read(&self, digest: &str, now: std::time::Instant) -> bool {
        let mut states = self.states.lock().expect("mirror blobs lock");
        matches!(Self::turn(&mut states, digest, now), Turn::Now)
    }

    #[cfg(test)]
    fn given_up(&self, digest: &str) -> bool {
        let states = self.states.lock().expect("mirror blobs lock");
        matches!(states.peek(digest), Some(BlobState::GivenUp { .. }))
    }

    /// Whether a read of `digest` goes to this mirror: at once if the mirror serves it or is
    /// to be asked (this read asks); while the mirror is fetching it, or another read is
    /// asking, waits until that changes, or until `deadline`: then the read goes elsewhere.
    /// So does a read that would wait while [`MIRROR_WAITERS`] others already do.
    pub(super) fn wait_to_read(&self, digest: &str, deadline: std::time::Instant) -> bool {
        use std::sync::atomic::Ordering;
        let mut states = self.states.lock().expect("mirror blobs lock");
        let mut counted = None;
        loop {
            let now = std::time::Instant::now();
            match Self::turn(&mut states, digest, now) {
                Turn::Now => return true,
                Turn::Elsewhere => return false,
                Turn::NotBefore(_) if now >= deadline => {
                    let history = states.peek(digest).map(|state| state.history());
                    let for_too_long = history.is_some_and(|history| {
                        history
                            .whole_since
                            .is_some_and(|since| now.duration_since(since) >= MIRROR_GIVE_UP_AFTER)
                    });
                    if let (Some(_), true, Some(history)) = (&counted, for_too_long, history) {
                        // Waited the whole time, on a mirror that has not served this blob
                        // for minutes: the reads after this one do not wait.
                        states.put(
                            digest.to_string(),
                            BlobState::GivenUp {
                                until: now + MIRROR_GIVE_UP,
                                history,
                            },
                        );
                        self.changed.notify_all();
                    }
                    return false;
                }
                Turn::NotBefore(at) => {
                    if counted.is_none() {
                        // Checked and counted under the lock: no two reads take the last place.
                        if self.waiting.load(Ordering::Relaxed) >= MIRROR_WAITERS {
                            return false;
                        }
                        self.waiting.fetch_add(1, Ordering::Relaxed);
                        counted = Some(Waiting(&self.waiting));
                    }
                    let until = at.min(deadline);
                    states = self
                        .changed
                        .wait_timeout(states, until.saturating_duration_since(now))
                        .expect("mirror blobs lock")
                        .0;
                }
            }
        }
    }

    fn set(&self, digest: &str, state: Option<BlobState>) {
        let mut states = self.states.lock().expect("mirror blobs lock");
        match state {
            Some(state) => {
                states.put(digest.to_string(), state);
            }
            None => {
                states.pop(digest);
            }
        }
        self.changed.notify_all();
    }

    /// The mirror answered a range read of `digest` with the whole blob: leave it alone for
    /// that blob for a while, twice as long as last time. Whether it was the first such answer
    /// for the blob.
    pub(super) fn note_filling(&self, digest: &str, now: std::time::Instant) -> bool {
        let last = self
            .states
            .lock()
            .expect("mirror blobs lock")
            .peek(digest)
            .copied();
        let history = last.map(BlobState::history).unwrap_or_default();
        let backoff = match history.backoff {
            backoff if !backoff.is_zero() => (backoff * 2).min(MIRROR_FILL_BACKOFF_MAX),
            _ => MIRROR_FILL_BACKOFF,
        };
        self.set(
            digest,
            Some(BlobState::Filling {
                ask_again_at: now + backoff,
                history: History {
                    backoff,
                    whole_since: history.whole_since.or(Some(now)),
                },
            }),
        );
        history.whole_since.is_none()
    }

    /// The mirror served a range of `digest`.
    pub(super) fn note_served(&self, digest: &str) {
        self.set(digest, Some(BlobState::Serving));
    }

    /// A read of `digest` failed otherwise: what the mirror does with the blob is not known.
    pub(super) fn forget(&self, digest: &str) {
        self.set(digest, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_fetching_a_blob_is_asked_by_one_read_at_a_time_and_backed_off() {
        let blobs = MirrorBlobs::new();
        let start = std::time::Instant::now();
        let at = |seconds: f64| start + Duration::from_secs_f64(seconds);
        // Not known: the first read asks, the others go elsewhere until it has an answer.
        assert!(blobs.may_read("a", at(0.0)));
        assert!(!blobs.may_read("a", at(0.1)));
        assert!(
            blobs.may_read("b", at(0.1)),
            "another blob is asked on its own"
        );
        // A whole-blob answer: left alone for 1 s, then one read asks again.
        blobs.note_filling("a", at(0.2));
        assert!(!blobs.may_read("a", at(1.1)));
        assert!(blobs.may_read("a", at(1.3)));
        assert!(!blobs.may_read("a", at(1.4)));
        // Again a whole blob: twice as long.
        blobs.note_filling("a", at(1.5));
        assert!(!blobs.may_read("a", at(3.4)));
        assert!(blobs.may_read("a", at(3.6)));
        // A range: every read goes to the mirror from then on.
        blobs.note_served("a");
        assert!(blobs.may_read("a", at(3.7)));
        assert!(blobs.may_read("a", at(3.7)));
        // An asking read that never came back is replaced after 30 s.
        assert!(!blobs.may_read("b", at(20.0)));
        assert!(blobs.may_read("b", at(30.2)));
        // Another failure: not known again, so the next read asks.
        blobs.forget("b");
        assert!(blobs.may_read("b", at(30.3)));
    }

    #[test]
    fn at_most_four_reads_wait_for_one_mirror() {
        let blobs = std::sync::Arc::new(MirrorBlobs::new());
        let now = std::time::Instant::now();
        assert!(blobs.wait_to_read("a", now), "the first read asks");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiters: Vec<_> = (0..MIRROR_WAITERS)
            .map(|_| {
                let (blobs, tx) = (blobs.clone(), tx.clone());
                std::thread::spawn(move || {
                    let read = blobs.wait_to_read("a", now + Duration::from_secs(60));
                    tx.send(()).unwrap();
                    read
                })
            })
            .collect();
        // Once four wait (the event: the count, taken under the lock they wait on), a fifth
        // read goes elsewhere at once.
        while blobs.waiting.load(std::sync::atomic::Ordering::Relaxed) < MIRROR_WAITERS {
            std::thread::yield_now();
        }
        assert!(!blobs.wait_to_read("a", now + Duration::from_secs(60)));
        assert!(rx.try_recv().is_err(), "a waiting read returned early");
        blobs.note_served("a");
        for waiter in waiters {
            assert!(waiter.join().unwrap());
        }
        assert_eq!(blobs.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn a_read_waits_for_the_asking_read_and_not_longer_than_told() {
        let blobs = std::sync::Arc::new(MirrorBlobs::new());
        let after = |wait: Duration| std::time::Instant::now() + wait;
        assert!(
            blobs.wait_to_read("a", after(Duration::ZERO)),
            "the first read asks"
        );
        assert!(
            !blobs.wait_to_read("a", after(Duration::ZERO)),
            "no wait: another endpoint"
        );
        let waiting = {
            let blobs = blobs.clone();
            std::thread::spawn(move || blobs.wait_to_read("a", after(Duration::from_secs(60))))
        };
        // The asking read's answer wakes the waiting one (the event; not its 60 s).
        blobs.note_served("a");
        assert!(waiting.join().unwrap());
        // A mirror fetching a blob: a read gives up after its wait, the next one waits again.
        assert!(blobs.wait_to_read("b", after(Duration::ZERO)));
        blobs.note_filling("b", after(Duration::from_secs(600)));
        assert!(!blobs.wait_to_read("b", after(Duration::from_millis(20))));
        assert!(!blobs.given_up("b"));
        // One that has answered with the whole blob for minutes: after a read waited its whole
        // time, the reads after it go elsewhere without waiting, for a minute.
        let long_ago = std::time::Instant::now()
            .checked_sub(MIRROR_GIVE_UP_AFTER + Duration::from_secs(1))
            .expect("the clock has run for minutes");
        blobs.forget("b");
        blobs.note_filling("b", long_ago);
        assert!(blobs.may_read("b", after(Duration::ZERO)), "asked again");
        blobs.note_filling("b", after(Duration::from_secs(600)));
        assert!(!blobs.wait_to_read("b", after(Duration::from_millis(20))));
        assert!(blobs.given_up("b"));
        assert!(!blobs.wait_to_read("b", after(Duration::from_secs(3600))));
        assert!(blobs.may_read("b", after(MIRROR_GIVE_UP + Duration::from_secs(1))));
        // Not waiting at all (mirror_fill_wait_secs = 0) gives nothing up: the mirror is asked
        // again after the backoff.
        blobs.note_filling("c", after(Duration::ZERO));
        assert!(!blobs.wait_to_read("c", after(Duration::ZERO)));
        assert!(!blobs.given_up("c"));
    }
}
