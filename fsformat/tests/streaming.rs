//! Sealing streams: memory does not grow with the layer's size. A 2 GiB tar is generated on
//! the fly, piped into the sealer, and the sealed blob goes to a sink; the process's peak RSS
//! must stay far below the layer size. (Its own test binary, so no other test shares the peak.)

use std::io::{self, Read, Write};

use fsformat::writer::{seal_layer, SealOptions};
use fsformat::LayerKey;

const FILE_SIZE: u64 = 256 << 20;
const FILES: u64 = 8;

/// File data that compresses well but never repeats a chunk (so deduplication cannot help):
/// every 4 KiB block carries the file and block number.
struct Pattern {
    file: u64,
    at: u64,
    size: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        const BLOCK: u64 = 4096;
        let template: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
        let mut n = 0usize;
        while n < buf.len() && self.at < self.size {
            let within = self.at % BLOCK;
            let mut block = template.clone();
            block[..8].copy_from_slice(&((self.file << 40) | (self.at / BLOCK)).to_le_bytes());
            let take = ((BLOCK - within) as usize)
                .min(buf.len() - n)
                .min((self.size - self.at) as usize);
            buf[n..n + take].copy_from_slice(&block[within as usize..within as usize + take]);
            n += take;
            self.at += take as u64;
        }
        Ok(n)
    }
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_2_gib_layer_seals_in_bounded_memory() {
    let before = peak_rss_bytes();
    let (reader, writer) = io::pipe().unwrap();
    let producer = std::thread::spawn(move || {
        let mut builder = tar::Builder::new(writer);
        for file in 0..FILES {
            let mut header = sealfs_e2e::regular_header(FILE_SIZE);
            builder
                .append_data(
                    &mut header,
                    format!("data/file{file}"),
                    Pattern {
                        file,
                        at: 0,
                        size: FILE_SIZE,
                    },
                )
                .unwrap();
        }
        builder.finish().unwrap();
    });
    let mut sink = CountingSink(0);
    let summary = seal_layer(
        reader,
        &mut sink,
        &LayerKey::generate().unwrap(),
        &SealOptions::default(),
    )
    .unwrap();
    producer.join().unwrap();
    assert_eq!(summary.file_bytes, FILES * FILE_SIZE);
    assert_eq!(
        summary.chunk_count as u64,
        FILES * FILE_SIZE / (1 << 20),
        "no chunk deduplicated"
    );
    assert_eq!(summary.blob_size, sink.0);
    let growth = peak_rss_bytes().saturating_sub(before);
    eprintln!("peak RSS grew by {} MiB while sealing 2 GiB", growth >> 20);
    assert!(
        growth < 128 << 20,
        "sealing 2 GiB raised peak RSS by {} MiB",
        growth >> 20
    );
}
