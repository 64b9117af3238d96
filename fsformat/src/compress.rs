//! Chunk compression for the writer, on several cores, results in chunk order.
//!
//! zstd is what bounds sealing (about 150 MB/s per core at level 3), and a big image usually
//! has one big layer, so a layer's chunks are compressed by a few worker threads while the
//! writer thread keeps the parts that must stay in order: chunk numbers, blob offsets, the
//! AES-GCM seal (whose associated data holds the offset) and the output hash. At most
//! `2 * threads + 1` chunks are between submission and being written, so memory stays at a few
//! chunks per thread whatever the layer's size. With one thread nothing is spawned: the chunk
//! is compressed on the caller's thread.

use std::collections::BTreeMap;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::crypto::Compression;
use crate::error::{FormatError, Result};

/// A compressed chunk, ready to be sealed.
pub(crate) struct Compressed {
    /// zstd frame, or the plaintext itself when zstd does not make it smaller.
    pub payload: Vec<u8>,
    pub plain_len: u32,
    pub compression: Compression,
}

fn compress(zstd: &mut zstd::bulk::Compressor<'static>, plain: Vec<u8>) -> Result<Compressed> {
    let plain_len = plain.len() as u32;
    let payload = zstd
        .compress(&plain)
        .map_err(|e| FormatError::io("compressing a chunk", e))?;
    Ok(if payload.len() < plain.len() {
        Compressed {
            payload,
            plain_len,
            compression: Compression::Zstd,
        }
    } else {
        Compressed {
            payload: plain,
            plain_len,
            compression: Compression::Stored,
        }
    })
}

fn new_zstd(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    zstd::bulk::Compressor::new(level).map_err(|e| FormatError::io("starting zstd", e))
}

enum Workers {
    /// One thread: compress on the caller's.
    Inline(zstd::bulk::Compressor<'static>),
    Threads {
        jobs: Option<Sender<(u32, Vec<u8>)>>,
        results: Receiver<(u32, Result<Compressed>)>,
        handles: Vec<JoinHandle<()>>,
    },
}

/// Compresses numbered chunks on worker threads; hands them back in number order.
pub(crate) struct OrderedCompressor {
    workers: Workers,
    /// Done, not yet taken.
    done: BTreeMap<u32, Result<Compressed>>,
    /// Submitted and not yet taken.
    outstanding: usize,
    max_outstanding: usize,
}

impl OrderedCompressor {
    /// `threads` workers (at least one) compressing at zstd `level`.
    pub(crate) fn new(threads: usize, level: i32) -> Result<Self> {
        let threads = threads.max(1);
        let workers = if threads == 1 {
            Workers::Inline(new_zstd(level)?)
        } else {
            // Bounded both ways; `max_outstanding` keeps either from filling.
            let (jobs, queue) = bounded::<(u32, Vec<u8>)>(threads);
            let (finished, results) = bounded(2 * threads + 1);
            let mut handles = Vec::with_capacity(threads);
            for number in 0..threads {
                let mut zstd = new_zstd(level)?;
                let queue = queue.clone();
                let finished = finished.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("seal-zstd-{number}"))
                    .spawn(move || {
                        for (chunk, plain) in queue {
                            if finished.send((chunk, compress(&mut zstd, plain))).is_err() {
                                return;
                            }
                        }
                    })
                    .map_err(|e| FormatError::io("starting a compression thread", e))?;
                handles.push(handle);
            }
            Workers::Threads {
                jobs: Some(jobs),
                results,
                handles,
            }
        };
        Ok(OrderedCompressor {
            workers,
            done: BTreeMap::new(),
            outstanding: 0,
            max_outstanding: 2 * threads + 1,
        })
    }

    /// Whether another chunk may be submitted without taking one first.
    pub(crate) fn has_room(&self) -> bool {
        self.outstanding < self.max_outstanding
    }

    /// Queues chunk `number` (the caller keeps numbers dense and takes them in order). The
    /// caller must [`Self::take`] a chunk first when there is no room.
    pub(crate) fn submit(&mut self, number: u32, plain: Vec<u8>) -> Result<()> {
        debug_assert!(self.has_room());
        self.outstanding += 1;
        match &mut self.workers {
            Workers::Inline(zstd) => {
                let compressed = compress(zstd, plain);
                self.done.insert(number, compressed);
            }
            Workers::Threads { jobs, .. } => {
                let jobs = jobs.as_ref().expect("jobs close only on drop");
                jobs.send((number, plain)).map_err(|_| {
                    FormatError::InvalidArgument("compression threads ended".into())
                })?;
            }
        }
        Ok(())
    }

    /// Chunk `number`, waiting for its worker if need be.
    pub(crate) fn take(&mut self, number: u32) -> Result<Compressed> {
        loop {
            if let Some(done) = self.done.remove(&number) {
                self.outstanding -= 1;
                return done;
            }
            let Workers::Threads { results, .. } = &self.workers else {
                unreachable!("chunk {number} was never submitted");
            };
            let (chunk, compressed) = results
                .recv()
                .map_err(|_| FormatError::InvalidArgument("compression threads ended".into()))?;
            self.done.insert(chunk, compressed);
        }
    }
}

impl Drop for OrderedCompressor {
    fn drop(&mut self) {
        if let Workers::Threads {
            jobs,
            results,
            handles,
        } = &mut self.workers
        {
            // Closing the queue ends the workers once it is empty; draining the results keeps
            // none of them blocked on a full result channel meanwhile.
            drop(jobs.take());
            while results.recv().is_ok() {}
            for handle in handles.drain(..) {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8 / 7).wrapping_add(seed)).collect()
    }

    #[test]
    fn chunks_come_back_in_order_and_as_one_thread_makes_them() {
        let plains: Vec<Vec<u8>> = (0..40u32)
            .map(|number| {
                // Every fourth chunk does not compress: it is stored.
                if number % 4 == 0 {
                    sealfs_e2e::noise(number as u64, 4096)
                } else {
                    chunk(number as u8, 4096 + number as usize)
                }
            })
            .collect();
        let mut zstd = new_zstd(3).unwrap();
        let want: Vec<Compressed> = plains
            .iter()
            .map(|plain| compress(&mut zstd, plain.clone()).unwrap())
            .collect();
        assert!(want.iter().any(|c| c.compression == Compression::Stored));
        for threads in [1, 3] {
            let mut pool = OrderedCompressor::new(threads, 3).unwrap();
            let mut taken = 0;
            let check = |pool: &mut OrderedCompressor, taken: &mut usize| {
                let got = pool.take(*taken as u32).unwrap();
                let want = &want[*taken];
                assert_eq!(got.compression, want.compression, "chunk {taken}");
                assert_eq!(got.plain_len, want.plain_len, "chunk {taken}");
                assert_eq!(got.payload, want.payload, "chunk {taken}");
                *taken += 1;
            };
            for (number, plain) in plains.iter().enumerate() {
                while !pool.has_room() {
                    check(&mut pool, &mut taken);
                }
                pool.submit(number as u32, plain.clone()).unwrap();
            }
            while taken < plains.len() {
                check(&mut pool, &mut taken);
            }
        }
    }

    #[test]
    fn dropping_with_chunks_outstanding_ends_the_workers() {
        let mut pool = OrderedCompressor::new(2, 3).unwrap();
        for number in 0..5 {
            pool.submit(number, chunk(1, 1 << 16)).unwrap();
        }
        drop(pool); // joins; a hang here is the failure
    }
}
