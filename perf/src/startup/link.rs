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

/// Chunks in flight per connection and direction (with 16 KiB reads: up to 2 MiB, above the
/// bandwidth-delay product of every profile).
const QUEUE_CHUNKS: usize = 128;
const CHUNK: usize = 16 << 10;

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Arc<Direction>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
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
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a link on a free loopback port to `upstream`, on the current tokio runtime.
pub async fn start(profile: LinkProfile, upstream: SocketAddr) -> Result<Link> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the link's port")?;
    let address = listener.local_addr()?;
    let direction = || {
        Arc::new(Direction {
            rate_bits: profile.rate_bits,
            delay: profile.rtt / 2,
            link_free: Mutex::new(Instant::now()),
        })
    };
    let (up, down) = (direction(), direction());
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
    Ok(Link { address, task })
}
