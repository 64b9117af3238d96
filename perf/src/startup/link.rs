//! An emulated network link in user space: a TCP proxy that forwards each direction through a
//! queue with a rate and a one-way delay, as netem would (this kernel has no `sch_netem`).
//!
//! Every chunk read from one side is released to the other at
//! `max(now, link_free) + len * 8 / rate + delay`, where `link_free` is shared by all
//! connections in that direction: they share the link's bandwidth as packets on one wire do.
//! A new connection first waits one round trip, which is what its TCP handshake would cost.
//! The queue per connection is bounded, so a fast sender is slowed by TCP backpressure
//! instead of buffering a whole blob in the proxy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A link's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkProfile {
    /// Name, as given on the command line.
    pub name: &'static str,
    /// Bits per second in each direction (`None`: unshaped).
    pub rate_bits: Option<u64>,
    /// Round-trip time added to the path.
    pub rtt: Duration,
}

/// The profiles the harness knows.
pub const PROFILES: [LinkProfile; 3] = [
    LinkProfile {
        name: "lan",
        rate_bits: None,
        rtt: Duration::ZERO,
    },
    LinkProfile {
        name: "dc",
        rate_bits: Some(1_000_000_000),
        rtt: Duration::from_millis(1),
    },
    LinkProfile {
        name: "wan",
        rate_bits: Some(100_000_000),
        rtt: Duration::from_millis(20),
    },
];

/// One direction of the link.
struct Direction {
    rate_bits: Option<u64>,
    delay: Duration,
    /// When the wire is free for the next chunk.
    link_free: Mutex<Instant>,
    /// Bytes delivered to the other end: what crossed the link. Bytes read from a sender
    /// whose receiver hung up before they were delivered are not.
    delivered: std::sync::atomic::AtomicU64,
}

impl Direction {
    /// When a chunk of `len` bytes read now arrives at the other end.
    fn release_time(&self, len: usize) -> Instant {
        let now = Instant::now();
        let transmit = match self.rate_bits {
            Some(rate) => Duration::from_secs_f64(len as f64 * 8.0 / rate as f64),
            None => Duration::ZERO,
        };
        let mut free = self.link_free.lock().expect("link lock");
        let start = (*free).max(now);
        *free = start + transmit;
        start + transmit + self.delay
    }
}

/// Chunks in flight per connection and direction (with 16 KiB reads: up to 512 KiB, above the
/// bandwidth-delay product of every profile: `wan` is 100 Mbit/s x 25 ms = 312 KB). Not much
/// more: a chunk takes its time on the wire when it is read, so what a connection has queued
/// when its receiver hangs up delays the others without being delivered, as a real link
/// would not.
const QUEUE_CHUNKS: usize = 32;
const CHUNK: usize = 16 << 10;

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Arc<Direction>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let counted = direction.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
            counted
                .delivered
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    });
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = direction.release_time(n);
                if tx.send((at, buffer[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A running link: connections to `address` reach the upstream through it.
pub struct Link {
    /// Where clients connect (`127.0.0.1:PORT`).
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    down: Arc<Direction>,
}

impl Link {
    /// Bytes the upstream has delivered over the link so far, to every client together.
    pub fn delivered_down(&self) -> u64 {
        self.down
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a link on a free loopback port to `upstream`, on the current tokio runtime.
pub async fn start(profile: LinkProfile, upstream: SocketAddr) -> Result<Link> {
    start_on(profile, "127.0.0.1:0".parse()?, upstream).await
}

/// Starts a link listening on `listen` to `upstream`, on the current tokio runtime.
pub async fn start_on(
    profile: LinkProfile,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Link> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the link's address {listen}"))?;
    let address = listener.local_addr()?;
    let direction = || {
        Arc::new(Direction {
            rate_bits: profile.rate_bits,
            delay: profile.rtt / 2,
            link_free: Mutex::new(Instant::now()),
            delivered: std::sync::atomic::AtomicU64::new(0),
        })
    };
    let (up, down) = (direction(), direction());
    let counted_down = down.clone();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (up, down) = (up.clone(), down.clone());
            tokio::spawn(async move {
                // The handshake's round trip.
                tokio::time::sleep(profile.rtt).await;
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::join!(
                    pump(client_read, server_write, up),
                    pump(server_read, client_write, down)
                );
            });
        }
    });
    Ok(Link {
        address,
        task,
        down: counted_down,
    })
}
