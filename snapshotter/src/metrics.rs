//! Prometheus metrics of the daemon, read from the layers' own counters at scrape time (the
//! read path never touches a metrics library), served as text at `http://ADDRESS/metrics`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::keyprovider::ProviderStats;
use crate::latency::LATENCY_BUCKETS;
use crate::node::Node;

/// A [`LatencyHistogram`](crate::latency::LatencyHistogram)'s per-bucket counts as the encoder
/// wants them (upper bound and count of each bucket; it writes them cumulatively), and the
/// number of observations.
fn histogram_buckets(counts: [u64; LATENCY_BUCKETS.len() + 1]) -> (Vec<(f64, u64)>, u64) {
    let buckets = LATENCY_BUCKETS
        .iter()
        .copied()
        .chain([f64::INFINITY])
        .zip(counts)
        .collect();
    (buckets, counts.iter().sum())
}

/// Reads a [`Node`]'s counters on each scrape.
#[derive(Debug)]
struct NodeCollector(Arc<Node>);

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Node")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// One layer's background-fetch progress.
struct LayerProgress {
    labels: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    chunks_present: u32,
    chunks_total: u32,
    bytes_fetched: u64,
    bytes_total: u64,
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = &self.0;
        let mut totals = node.retired_totals();
        let mut layers = Vec::new();
        node.for_each_mounted(|id, layer| {
            let fetcher = layer.fs.fetcher();
            totals.add(fetcher.stats());
            let progress = fetcher.progress();
            layers.push(LayerProgress {
                labels: vec![
                    ("snapshot".into(), id.to_string().into()),
                    ("layer".into(), fetcher.name().to_string().into()),
                ],
                chunks_present: progress.chunks_present,
                chunks_total: progress.chunks_total,
                bytes_fetched: progress.bytes_fetched,
                bytes_total: progress.bytes_total,
            });
        });
        gauge(
            &mut encoder,
            "sealfs_layers_mounted",
            "Remote sealed layers mounted with FUSE.",
            layers.len() as i64,
        )?;
        counter(
            &mut encoder,
            "sealfs_fetched_bytes",
            "Sealed bytes fetched from registries.",
            totals.source_bytes,
        )?;
        counter(
            &mut encoder,
            "sealfs_range_requests",
            "Range requests sent to registries.",
            totals.source_reads,
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "sealfs_chunks",
                "Chunks served, by where they came from: memory cache, disk cache, or the \
                 registry for a read (urgent), the startup profile or the background fetch.",
                None,
                MetricType::Counter,
            )?;
            for (source, value) in [
                ("memory", totals.memory_hits),
                ("disk", totals.disk_hits),
                ("registry_urgent", totals.urgent_chunks),
                ("registry_readahead", totals.readahead_chunks),
                ("registry_profile", totals.profile_chunks),
                ("registry_background", totals.background_chunks),
            ] {
                let labels = [("source", source)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let (buckets, count) = histogram_buckets(totals.latency_counts);
        encoder
            .encode_descriptor(
                "sealfs_fetch_latency_seconds",
                "Duration of range requests to registries.",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(totals.latency_sum, count, &buckets, None)?;
        counter(
            &mut encoder,
            "sealfs_verification_failures",
            "Chunks that failed authentication (tampered or damaged), from a registry or the disk cache.",
            totals.verification_failures,
        )?;
        counter(
            &mut encoder,
            "sealfs_read_timeouts",
            "Reads that gave up waiting for their chunk (EIO).",
            totals.timeouts,
        )?;
        gauge(
            &mut encoder,
            "sealfs_fuse_session_kept",
            "1 while the session keeper holds the node's FUSE session, so a restart of the daemon keeps running containers reading; 0 before the first sealed layer is mounted, or if the keeper is gone.",
            i64::from(node.remote().session().kept_now()),
        )?;
        gauge(
            &mut encoder,
            "sealfs_kept_layer_keys",
            "Layer keys that keyproviders gave for mounted layers and the session keeper holds, so a restart reopens those layers without the providers.",
            node.remote().session().keys_kept() as i64,
        )?;
        gauge(
            &mut encoder,
            "sealfs_reads_waiting",
            "Reads waiting now for a chunk being fetched (from a registry, or a fetch in flight).",
            totals.reads_waiting as i64,
        )?;
        let signatures = &node.remote().signature_stats;
        counter(
            &mut encoder,
            "sealfs_signatures_verified",
            "Images whose signature verified against the signature policy (each check).",
            signatures.verified.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "sealfs_signature_refusals",
            "Sealed layers refused by the signature policy (unsigned, unknown key, wrong digest, unreachable signature).",
            signatures.refused.load(Ordering::Relaxed),
        )?;
        let mirrors = node.remote().mirror_stats();
        counter(
            &mut encoder,
            "sealfs_mirror_whole_blob_answers",
            "Range reads a pull-through mirror answered with the whole blob: it did not hold the blob yet (docs/configuration.md, pull-through mirrors).",
            mirrors.whole_blob_answers.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "sealfs_mirror_reads_passed_on",
            "Range reads that went past a mirror still fetching their blob to the next host (the registry itself): after waiting [registry] mirror_fill_wait_secs, or at once.",
            mirrors.reads_passed_on.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "sealfs_remote_mount_failures",
            "Remote layers that could not be mounted (missing key, registry error, bad index).",
            node.stats.remote_failures.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "sealfs_memory_cache_bytes",
            "Decrypted chunks held in the memory cache.",
            node.remote().memory().bytes() as i64,
        )?;
        for (name, help, count) in [
            (
                "sealfs_keyprovider_unwraps",
                "Layer keys a keyprovider unwrapped, by provider.",
                (|p| &p.unwrapped) as fn(&ProviderStats) -> &AtomicU64,
            ),
            (
                "sealfs_keyprovider_failures",
                "Keyprovider calls that failed (unreachable, too slow, refused, no key), by provider.",
                |p| &p.failed,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for provider in node.remote().providers().all() {
                let labels = [("provider", provider.name())];
                ConstCounter::new(count(&provider.stats).load(Ordering::Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "sealfs_keyprovider_unwrap_seconds",
                "Duration of keyprovider unwrap calls, failed ones included, by provider.",
                None,
                MetricType::Histogram,
            )?;
            for provider in node.remote().providers().all() {
                let labels = [("provider", provider.name())];
                let (counts, sum) = provider.stats.unwrap_latency.snapshot();
                let (buckets, count) = histogram_buckets(counts);
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        type Field = fn(&LayerProgress) -> u64;
        let per_layer: [(&str, &str, Field); 4] = [
            (
                "sealfs_layer_chunks_present",
                "Chunks of a mounted layer already fetched (background-fetch progress).",
                |p| u64::from(p.chunks_present),
            ),
            ("sealfs_layer_chunks", "Chunks of a mounted layer.", |p| {
                u64::from(p.chunks_total)
            }),
            (
                "sealfs_layer_fetched_bytes",
                "Sealed bytes of a mounted layer fetched so far.",
                |p| p.bytes_fetched,
            ),
            (
                "sealfs_layer_bytes",
                "Sealed bytes of a mounted layer's chunks.",
                |p| p.bytes_total,
            ),
        ];
        for (name, help, field) in per_layer {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for layer in &layers {
                ConstGauge::new(field(layer) as i64)
                    .encode(family.encode_family(&layer.labels)?)?;
            }
        }
        Ok(())
    }
}

/// The metrics of `node` as Prometheus text.
pub fn render(node: &Arc<Node>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector(node.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// Serves `GET /metrics` on `address` until the runtime ends.
pub async fn serve(address: SocketAddr, node: Arc<Node>) -> Result<(), hyper::Error> {
    use hyper::service::{make_service_fn, service_fn};
    use hyper::{Body, Response, StatusCode};
    let make = make_service_fn(move |_| {
        let node = node.clone();
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |request| {
                let node = node.clone();
                async move {
                    let response = if request.uri().path() == "/metrics" {
                        let text = tokio::task::spawn_blocking(move || render(&node))
                            .await
                            .unwrap_or_default();
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Body::from(text))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from("sealfs serves /metrics\n"))
                    };
                    Ok::<_, std::convert::Infallible>(response.expect("valid response"))
                }
            }))
        }
    });
    hyper::Server::try_bind(&address)?.serve(make).await
}
