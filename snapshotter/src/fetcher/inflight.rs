//! The chunks of one layer being fetched, so each is fetched once however many readers want
//! it. Whoever registers a chunk holds a [`Claim`]: completing it hands the result to every
//! waiter; dropping it unfinished (an early return, a job dropped at shutdown, a panic) hands
//! them [`FetchError::Cancelled`], so no waiter is ever stranded.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{ChunkResult, FetchError};

/// One chunk being fetched; readers wait on it.
pub(crate) struct Pending {
    result: Mutex<Option<ChunkResult>>,
    done: Condvar,
}

impl Pending {
    /// The result, waiting at most `timeout`; `None` if it has not arrived by then.
    pub(crate) fn wait(&self, timeout: Duration) -> Option<ChunkResult> {
        let guard = self.result.lock().expect("pending lock");
        let (guard, _) = self
            .done
            .wait_timeout_while(guard, timeout, |result| result.is_none())
            .expect("pending lock");
        guard.clone()
    }
}

/// The in-flight table of one layer.
pub(crate) struct InFlight {
    layer: String,
    table: Mutex<HashMap<u32, Arc<Pending>>>,
}

/// What [`InFlight::join`] found.
pub(crate) enum Joined {
    /// The check under the lock answered (the chunk landed meanwhile).
    Ready(ChunkResult),
    /// Someone fetches it already: wait on this.
    Waiting(Arc<Pending>),
    /// Nobody did: the caller fetches it (and may wait on the pending entry too).
    Claimed(Claim, Arc<Pending>),
}

impl InFlight {
    /// The table of layer `layer` (named in the cancellation error).
    pub(crate) fn new(layer: String) -> Arc<Self> {
        Arc::new(InFlight {
            layer,
            table: Mutex::new(HashMap::new()),
        })
    }

    /// Joins the fetch of `chunk`, or claims it. `check` runs under the table's lock first:
    /// completion fills the caches before it leaves the table, so a cache hit there is exact.
    pub(crate) fn join(
        self: &Arc<Self>,
        chunk: u32,
        check: impl FnOnce() -> Option<ChunkResult>,
    ) -> Joined {
        let mut table = self.table.lock().expect("inflight lock");
        if let Some(ready) = check() {
            return Joined::Ready(ready);
        }
        if let Some(pending) = table.get(&chunk) {
            return Joined::Waiting(pending.clone());
        }
        let pending = self.insert(&mut table, chunk);
        Joined::Claimed(self.claim_of(chunk, pending.clone()), pending)
    }

    /// Claims the chunks of `chunks` that are neither present (`present`, run under the lock)
    /// nor in flight; returns them as runs of adjacent chunks, each with its claims in order.
    pub(crate) fn claim_missing(
        self: &Arc<Self>,
        chunks: Range<u32>,
        present: impl Fn(u32) -> bool,
    ) -> Vec<(Range<u32>, Vec<Claim>)> {
        let mut table = self.table.lock().expect("inflight lock");
        let mut runs: Vec<(Range<u32>, Vec<Claim>)> = Vec::new();
        for chunk in chunks {
            if present(chunk) || table.contains_key(&chunk) {
                continue;
            }
            let claim = self.claim_of(chunk, self.insert(&mut table, chunk));
            match runs.last_mut() {
                Some((run, claims)) if run.end == chunk => {
                    run.end += 1;
                    claims.push(claim);
                }
                _ => runs.push((chunk..chunk + 1, vec![claim])),
            }
        }
        runs
    }

    /// Chunks in flight.
    pub(crate) fn len(&self) -> usize {
        self.table.lock().expect("inflight lock").len()
    }

    fn insert(&self, table: &mut HashMap<u32, Arc<Pending>>, chunk: u32) -> Arc<Pending> {
        let pending = Arc::new(Pending {
            result: Mutex::new(None),
            done: Condvar::new(),
        });
        table.insert(chunk, pending.clone());
        pending
    }

    fn claim_of(self: &Arc<Self>, chunk: u32, pending: Arc<Pending>) -> Claim {
        Claim {
            owner: self.clone(),
            chunk,
            pending: Some(pending),
        }
    }
}

/// The duty to fetch one chunk (see the module docs).
pub(crate) struct Claim {
    owner: Arc<InFlight>,
    chunk: u32,
    pending: Option<Arc<Pending>>,
}

impl Claim {
    /// The chunk claimed.
    pub(crate) fn chunk(&self) -> u32 {
        self.chunk
    }

    /// Hands `result` to every waiter and leaves the table.
    pub(crate) fn complete(mut self, result: ChunkResult) {
        self.finish(result);
    }

    fn finish(&mut self, result: ChunkResult) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        self.owner
            .table
            .lock()
            .expect("inflight lock")
            .remove(&self.chunk);
        *pending.result.lock().expect("pending lock") = Some(result);
        pending.done.notify_all();
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let layer = self.owner.layer.clone();
        self.finish(Err(FetchError::Cancelled { layer }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(byte: u8) -> ChunkResult {
        Ok(Arc::new(vec![byte]))
    }

    #[test]
    fn the_first_reader_claims_later_ones_wait_and_all_get_one_result() {
        let inflight = InFlight::new("sha256:l".into());
        let Joined::Claimed(claim, first) = inflight.join(3, || None) else {
            panic!("first reader must claim");
        };
        let waiters: Vec<_> = (0..8)
            .map(|_| match inflight.join(3, || None) {
                Joined::Waiting(pending) => {
                    std::thread::spawn(move || pending.wait(Duration::from_secs(600)))
                }
                _ => panic!("later readers must wait"),
            })
            .collect();
        claim.complete(plain(7));
        for waiter in waiters {
            assert_eq!(waiter.join().unwrap().unwrap().unwrap()[0], 7);
        }
        assert_eq!(first.wait(Duration::ZERO).unwrap().unwrap()[0], 7);
        assert_eq!(inflight.len(), 0);
        // Once done, a new read claims again (failures are not cached).
        assert!(matches!(inflight.join(3, || None), Joined::Claimed(..)));
    }

    #[test]
    fn a_dropped_claim_wakes_its_waiters_with_cancelled() {
        let inflight = InFlight::new("sha256:l".into());
        let Joined::Claimed(claim, pending) = inflight.join(1, || None) else {
            panic!()
        };
        let waiter = std::thread::spawn(move || pending.wait(Duration::from_secs(600)));
        drop(claim);
        let result = waiter.join().unwrap().expect("woken, not timed out");
        assert!(matches!(result, Err(FetchError::Cancelled { .. })));
        assert_eq!(inflight.len(), 0);
    }

    #[test]
    fn a_wait_is_bounded_and_the_check_under_the_lock_wins() {
        let inflight = InFlight::new("sha256:l".into());
        let Joined::Claimed(_claim, pending) = inflight.join(1, || None) else {
            panic!()
        };
        assert!(pending.wait(Duration::from_millis(1)).is_none());
        assert!(matches!(
            inflight.join(2, || Some(plain(2))),
            Joined::Ready(Ok(_))
        ));
    }

    #[test]
    fn claims_skip_present_and_in_flight_chunks_and_come_as_runs() {
        let inflight = InFlight::new("sha256:l".into());
        let Joined::Claimed(_held, _) = inflight.join(4, || None) else {
            panic!()
        };
        let runs = inflight.claim_missing(0..8, |chunk| chunk == 1);
        let shape: Vec<_> = runs
            .iter()
            .map(|(run, claims)| {
                (
                    run.clone(),
                    claims.iter().map(Claim::chunk).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![(0..1, vec![0]), (2..4, vec![2, 3]), (5..8, vec![5, 6, 7])]
        );
        assert_eq!(inflight.len(), 7);
        drop(runs);
        assert_eq!(inflight.len(), 1, "dropped claims leave the table");
    }
}
