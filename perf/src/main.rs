//! sealfs benchmarks. Every benchmark prints its baseline measured in the same run, side by
//! side, with the ratio; nothing here asserts a timing.

mod command;
mod data;
mod format;
mod fuse;
mod layers;
mod mirror;
mod startup;

use clap::{Parser, Subcommand};

/// Benchmarks for sealfs.
#[derive(Parser)]
#[command(name = "perf", max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Seal and decode throughput of the layer format against plain zstd on the same chunks.
    Format(format::FormatArgs),
    /// Reads through a sealfs mount against local disk, cold and warm; mount cost of 100k files.
    Fuse(fuse::FuseArgs),
    /// Container start-up (pull + run until ready) from sealed images lazily against full pulls,
    /// over an emulated link to a registry in its own network namespace.
    Startup(startup::StartupArgs),
    /// What mounted layers cost the daemon: threads, fds and memory with 1 to 300 sealed layers
    /// mounted, and how long their pull takes.
    Layers(layers::LayersArgs),
    /// A fleet of nodes starting one sealed image at once, from the origin registry and through
    /// a pull-through mirror (distribution's proxy mode): origin bytes and start times.
    Mirror(mirror::MirrorArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Format(args) => format::run(&args),
        Bench::Fuse(args) => fuse::run(&args),
        Bench::Startup(args) => startup::run_startup(&args),
        Bench::Layers(args) => layers::run_layers(&args),
        Bench::Mirror(args) => mirror::run_mirror(&args),
    }
}
