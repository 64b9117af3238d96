//! Lazy reads from a real `docker-registry` on 127.0.0.1 (started by the test; the image is
//! pushed with skopeo). Needs root, /dev/fuse, docker-registry and skopeo: a failure in CI, a
//! skip elsewhere.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fsformat::oci::{SealedLayerAnnotations, MEDIA_TYPE_SEALED_LAYER};
use fsformat::writer::{seal_layer, SealOptions};
use fsformat::{LayerKey, PrivateKey, Recipient};
use oci_spec::image::MediaType;
use sealfs_e2e::noise;
use sealfs_e2e::registry::DockerRegistry;
use snapshotter::cache::MemoryCache;
use snapshotter::fetcher::{FetchConfig, FetchPool, PoolConfig};
use snapshotter::mount::{self, MountOptions, MountedLayer};
use snapshotter::mount_table;
use snapshotter::oci_layout::{descriptor, OciLayout};
use snapshotter::registry::{Registry, RegistryOptions};

const CHUNK: usize = 64 * 1024;

fn prerequisites() -> bool {
    let have = |tool: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ok = Path::new("/dev/fuse").exists() && have("docker-registry") && have("skopeo");
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "docker-registry, skopeo or /dev/fuse missing in CI"
        );
        eprintln!("skipping: docker-registry, skopeo or /dev/fuse missing");
    }
    ok
}

/// A one-layer sealed image in an OCI layout: a 4 MiB file and a small one.
fn sealed_layout(dir: &Path, key: &PrivateKey) {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("big.bin", noise(21, 64 * CHUNK)),
        ("small.txt", b"lazy from a registry\n".to_vec()),
    ] {
        let mut header = sealfs_e2e::regular_header(data.len() as u64);
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let layout = OciLayout::open_or_create(dir).unwrap();
    let layer_key = LayerKey::generate().unwrap();
    let mut writer = layout.blob_writer().unwrap();
    let summary = seal_layer(
        &tar[..],
        &mut writer,
        &layer_key,
        &SealOptions::with_chunk_size(CHUNK as u64).unwrap(),
    )
    .unwrap();
    let (digest, size) = writer.commit().unwrap();
    let facts = SealedLayerAnnotations {
        index_digest: summary.tail_digest,
        index_size: summary.tail_size,
        stanzas: key.public().wrap(&layer_key).unwrap(),
    };
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [summary.input_diff_id]}});
    let (config_digest, config_size) = layout
        .put_blob(&serde_json::to_vec(&config).unwrap())
        .unwrap();
    let annotations: serde_json::Map<String, serde_json::Value> = facts
        .pairs()
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MEDIA_TYPE_SEALED_LAYER, "digest": digest, "size": size, "annotations": annotations}],
    });
    let (manifest_digest, manifest_size) = layout
        .put_blob(&serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    layout
        .set_tag(
            &descriptor(MediaType::ImageManifest, &manifest_digest, manifest_size).unwrap(),
            Some("v1"),
        )
        .unwrap();
}

/// A registry client without credentials.
fn anonymous_client(
    runtime: &tokio::runtime::Runtime,
    host: &str,
    options: RegistryOptions,
) -> Registry {
    let anonymous =
        |_: &str| Ok::<_, std::convert::Infallible>(oci_client::secrets::RegistryAuth::Anonymous);
    Registry::connect(runtime.handle().clone(), host, options, &anonymous).unwrap()
}

/// A hosts directory under `dir` (containerd's `hosts.toml` layout) that sends pulls from
/// `origin` (`HOST:PORT`) to the mirror at `mirror` (`HOST:PORT[/v2/NAMESPACE]`) first.
fn mirror_hosts(dir: &Path, origin: &str, mirror: &str) -> std::path::PathBuf {
    let hosts = dir.join("certs.d");
    fs::create_dir_all(hosts.join(origin)).unwrap();
    let override_path = if mirror.contains('/') {
        "  override_path = true\n"
    } else {
        ""
    };
    fs::write(
        hosts.join(origin).join("hosts.toml"),
        format!(
            "server = \"http://{origin}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{override_path}"
        ),
    )
    .unwrap();
    hosts
}

#[test]
fn a_mirror_with_a_repository_namespace_serves_the_origins_images() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    let layout = work.path().join("layout");
    sealed_layout(&layout, &key);
    let origin = DockerRegistry::start();
    let reference = origin.push(&layout, "v1", "team/app");
    // The stand-in for a Harbor proxy cache project: a registry holding the origin's
    // repositories under a namespace (the project), reached with override_path.
    let project = DockerRegistry::start();
    project.push(&layout, "v1", "hub-proxy/team/app");
    let hosts = mirror_hosts(
        work.path(),
        &origin.host,
        &format!("{}/v2/hub-proxy", project.host),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = anonymous_client(
        &runtime,
        &origin.host,
        RegistryOptions {
            hosts_dir: Some(hosts),
            ..RegistryOptions::default()
        },
    );
    let image = client
        .resolve(&Registry::parse(&reference).unwrap())
        .unwrap();
    let layer = &image.image.manifest.layers()[0];
    let blob = client.layer(&image, layer);
    for offset in [0u64, 1000, 50_000] {
        assert_eq!(blob.read(offset, 100).unwrap().len(), 100);
    }
    let in_project = |uri: &str| uri.starts_with("/v2/hub-proxy/team/app/");
    assert!(project.gets(|uri| in_project(uri) && uri.contains("/manifests/")) >= 1);
    // Logged as each answer completes: wait for the third.
    wait_until("the project did not serve the three ranges", || {
        project.blob_gets_answered(layer.digest().as_ref(), Some(206)) == 3
    });
    assert_eq!(
        origin.gets(|uri| uri.contains("/manifests/") || uri.contains("/blobs/")),
        0,
        "the origin was asked although the project has the image"
    );
}

#[test]
fn layers_mount_lazily_from_a_registry_and_survive_it_going_away() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    sealed_layout(&work.path().join("layout"), &key);
    let mut registry = DockerRegistry::start();
    let reference = registry.push(&work.path().join("layout"), "v1", "lazy");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let options = RegistryOptions {
        request_timeout: Duration::from_secs(2),
        retries: 1,
        backoff: Duration::from_millis(50),
        ..RegistryOptions::default()
    };
    let client = anonymous_client(&runtime, &registry.host, options);
    let image = client
        .resolve(&Registry::parse(&reference).unwrap())
        .unwrap();
    let layer = &image.image.manifest.layers()[0];
    let opened = mount::open_sealed_layer(
        layer,
        Arc::new(client.layer(&image, layer)),
        &snapshotter::keys::Identities::from(vec![key.clone()]),
        mount::DEFAULT_MAX_INDEX_BYTES,
    )
    .unwrap();
    let fetch = FetchConfig {
        background: false,
        timeout: Duration::from_secs(8),
        ..FetchConfig::default()
    };
    let fs = mount::layer_fs(
        &opened,
        1,
        &FetchPool::start(PoolConfig::default()),
        Arc::new(MemoryCache::new(64 << 20)),
        &MountOptions {
            fetch,
            ..MountOptions::default()
        },
    )
    .unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mounted =
        MountedLayer::mount(fs, mnt.path(), &MountOptions::default(), "registry-test").unwrap();

    // One small file costs one chunk from the registry, a small fraction of the layer.
    assert_eq!(
        fs::read_to_string(mnt.path().join("small.txt")).unwrap(),
        "lazy from a registry\n"
    );
    let fetched = mounted
        .fs
        .fetcher()
        .stats()
        .source_bytes
        .load(Ordering::SeqCst);
    assert!(
        fetched > 0 && fetched * 20 < layer.size(),
        "fetched {fetched} of {} bytes",
        layer.size()
    );

    // Registry gone: a read fails with EIO (bounded retries), it does not hang.
    registry.stop();
    let file = fs::File::open(mnt.path().join("big.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = std::os::unix::fs::FileExt::read_at(&file, &mut buf, 10 * CHUNK as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Back again: the same read succeeds, nothing was poisoned.
    registry.resume();
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 10 * CHUNK as u64).unwrap();
    assert_eq!(buf, noise(21, 64 * CHUNK)[10 * CHUNK..10 * CHUNK + 4096]);
    assert_eq!(
        fs::read(mnt.path().join("big.bin")).unwrap(),
        noise(21, 64 * CHUNK)
    );
    // Dropping the mount while a file on it is still open must not leave it behind.
    drop(mounted);
    assert!(
        !mount_table::is_mounted(mnt.path()),
        "the mount outlived its MountedLayer"
    );
    drop(file);
}

#[test]
fn a_mirror_that_does_not_answer_is_skipped_after_failing_once() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    sealed_layout(&work.path().join("layout"), &key);
    let origin = DockerRegistry::start();
    let reference = origin.push(&work.path().join("layout"), "v1", "breaker");

    // Fault injection the real registry cannot produce: a mirror that accepts connections and
    // never answers. It counts the connections it gets.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stalled = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    let hosts = mirror_hosts(work.path(), &origin.host, &stalled);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let options = RegistryOptions {
        request_timeout: Duration::from_millis(300),
        retries: 2,
        backoff: Duration::from_millis(10),
        hosts_dir: Some(hosts),
        ..RegistryOptions::default()
    };
    let client = anonymous_client(&runtime, &origin.host, options);
    // The first request (the manifest) tries the mirror and gives up on it; the config and
    // every range read after it go straight to the origin.
    let image = client
        .resolve(&Registry::parse(&reference).unwrap())
        .unwrap();
    let after_first = accepted.load(Ordering::SeqCst);
    assert!(after_first >= 1, "the mirror was never tried");
    let layer = &image.image.manifest.layers()[0];
    let blob = client.layer(&image, layer);
    for offset in [0u64, 1000, 50_000, 100_000] {
        assert_eq!(blob.read(offset, 100).unwrap().len(), 100);
    }
    let total = accepted.load(Ordering::SeqCst);
    assert_eq!(
        total, after_first,
        "the dead mirror was tried again within its backoff"
    );
}

/// Waits (bounded) until `done` holds: for what a registry logs once it has answered.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_pull_through_mirror_is_read_by_range_once_it_holds_the_blob() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    let origin = DockerRegistry::start();
    // Two images (two layer blobs): one read by a node that does not wait for the mirror, one
    // by a node that does (the default).
    let references: Vec<String> = ["at-once", "waiting"]
        .iter()
        .map(|name| {
            let layout = work.path().join(name);
            sealed_layout(&layout, &key);
            origin.push(&layout, "v1", name)
        })
        .collect();
    // distribution's proxy mode answers a range read of a blob it does not hold yet with the
    // whole blob, while it fetches the blob from the origin once for itself.
    let mirror = DockerRegistry::start_pull_through(&origin.host);
    let hosts = mirror_hosts(work.path(), &origin.host, &mirror.host);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let direct = anonymous_client(&runtime, &origin.host, RegistryOptions::default());
    for (reference, wait) in references
        .iter()
        .zip([Duration::ZERO, Duration::from_secs(60)])
    {
        let stats = std::sync::Arc::new(snapshotter::registry::MirrorStats::default());
        let through_mirror = anonymous_client(
            &runtime,
            &origin.host,
            RegistryOptions {
                hosts_dir: Some(hosts.clone()),
                mirror_fill_wait: wait,
                mirror_stats: stats.clone(),
                ..RegistryOptions::default()
            },
        );
        let counted = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        let parsed = Registry::parse(reference).unwrap();
        let image = through_mirror.resolve(&parsed).unwrap();
        let layer = &image.image.manifest.layers()[0];
        let blob = through_mirror.layer(&image, layer);
        let expected = direct.layer(&direct.resolve(&parsed).unwrap(), layer);
        let (size, digest) = (layer.size(), layer.digest().as_ref());
        let blob_path = format!("/blobs/{digest}");

        // The tail, at the blob's end, while the mirror does not hold the blob: never read
        // through the mirror's whole-blob answer up to the end.
        let tail = (size - 4096, 4096);
        let tail_bytes = blob.read(tail.0, tail.1).unwrap();
        if wait.is_zero() {
            // Not waiting: the origin sends the range.
            wait_until("the tail was not read by range from the origin", || {
                origin.blob_gets_answered(digest, Some(206)) == 1
            });
            // The mirror logs its whole-blob answer once it stops sending it (as a 500: the
            // client hung up).
            wait_until("the mirror was never asked", || {
                mirror.blob_gets_answered(digest, None) == 1
            });
            // What the node's metrics say.
            assert_eq!(counted(&stats.whole_blob_answers), 1);
            assert_eq!(counted(&stats.reads_passed_on), 1);
        } else {
            // Waiting: the mirror sends it, once it holds the blob.
            wait_until("the mirror did not send the tail", || {
                mirror.blob_gets_answered(digest, Some(206)) == 1
            });
            assert_eq!(
                origin.blob_gets_answered(digest, Some(206)),
                0,
                "a waiting read reached the origin"
            );
            assert!(counted(&stats.whole_blob_answers) >= 1);
            assert_eq!(counted(&stats.reads_passed_on), 0);
        }
        assert_eq!(tail_bytes, expected.read(tail.0, tail.1).unwrap());

        // Once the mirror holds the blob (the event waited for: its storage has it), the
        // client asks it again (a waiting one at once, one that does not after its backoff,
        // reading from the origin meanwhile) and from then on reads are the mirror's.
        wait_until("the mirror never stored the blob", || {
            mirror.holds_blob(digest)
        });
        let offset = std::cell::Cell::new(0);
        wait_until("the mirror never served a range", || {
            let at = offset.get();
            assert_eq!(
                blob.read(at, 1000).unwrap(),
                expected.read(at, 1000).unwrap()
            );
            offset.set((at + 7919) % (size - 1000));
            mirror.blob_gets_answered(digest, Some(206)) > 0
        });
        let origin_reads = origin.gets(|uri| uri.ends_with(&blob_path));
        let mirror_ranges = mirror.blob_gets_answered(digest, Some(206));
        for i in 0..10u64 {
            let at = i * (size / 10);
            assert_eq!(blob.read(at, 512).unwrap(), expected.read(at, 512).unwrap());
        }
        // `expected` read each range from the origin once more; `blob` did not.
        assert_eq!(
            origin.gets(|uri| uri.ends_with(&blob_path)) - origin_reads,
            10,
            "reads through the mirror still reached the origin"
        );
        assert_eq!(
            mirror.blob_gets_answered(digest, Some(206)) - mirror_ranges,
            10
        );
        // Before its first range, the mirror was asked once after each backoff at most.
        assert!(
            mirror.blob_gets_answered(digest, None) - mirror.blob_gets_answered(digest, Some(206))
                <= 3,
            "the mirror was asked again and again while it did not hold the blob"
        );
    }
}

/// `GET /v2/` requests and blob GETs a registry has answered.
fn probes_and_blob_reads(registry: &DockerRegistry) -> (usize, usize) {
    (
        registry.gets(|uri| uri == "/v2/"),
        registry.gets(|uri| uri.contains("/blobs/")),
    )
}

#[test]
fn each_range_read_is_one_request_with_or_without_credentials() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    sealed_layout(&work.path().join("layout"), &key);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (user, password) = ("reader", "s3cret-range");
    let basic = |_: &str| {
        Ok::<_, std::convert::Infallible>(oci_client::secrets::RegistryAuth::Basic(
            user.to_string(),
            password.to_string(),
        ))
    };
    let open = DockerRegistry::start();
    let guarded = DockerRegistry::start_with_password(user, password);
    for (registry, with_credentials) in [(&open, false), (&guarded, true)] {
        let reference = registry.push_as(
            &work.path().join("layout"),
            "v1",
            "ranges",
            with_credentials
                .then(|| format!("{user}:{password}"))
                .as_deref(),
        );
        let client = if with_credentials {
            Registry::connect(
                runtime.handle().clone(),
                &registry.host,
                RegistryOptions::default(),
                &basic,
            )
            .unwrap()
        } else {
            anonymous_client(&runtime, &registry.host, RegistryOptions::default())
        };
        let (probes_before_resolve, _) = probes_and_blob_reads(registry);
        let image = client
            .resolve(&Registry::parse(&reference).unwrap())
            .unwrap();
        let blob = client.layer(&image, &image.image.manifest.layers()[0]);
        let (probes_before, reads_before) = probes_and_blob_reads(registry);
        for i in 0..10u64 {
            assert_eq!(blob.read(i * CHUNK as u64, 512).unwrap().len(), 512);
        }
        let (probes, reads) = probes_and_blob_reads(registry);
        assert_eq!(reads - reads_before, 10, "credentials: {with_credentials}");
        // No read waits for an auth probe: a probe per read doubles the round trips of a lazy
        // start. With credentials the token is found out once (while resolving); without,
        // reads go out bare and an open registry answers them.
        assert_eq!(
            probes - probes_before,
            0,
            "auth probes for 10 range reads (credentials: {with_credentials})"
        );
        if !with_credentials {
            // Not even `resolve` probed: its manifest and config reads went out bare too.
            assert_eq!(
                probes - probes_before_resolve,
                0,
                "probes of an anonymous resolve and 10 reads"
            );
        }
    }
}

#[test]
fn anonymous_reads_of_a_registry_with_anonymous_tokens_learn_once_that_it_wants_one() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate().unwrap();
    sealed_layout(&work.path().join("layout"), &key);
    let issuer = sealfs_e2e::token_issuer::TokenIssuer::start_anonymous(work.path());
    let registry = DockerRegistry::start_with_tokens(&issuer);
    let reference = registry.push_as(&work.path().join("layout"), "v1", "public", None);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = anonymous_client(&runtime, &registry.host, RegistryOptions::default());
    let image = client
        .resolve(&Registry::parse(&reference).unwrap())
        .unwrap();
    let blob = client.layer(&image, &image.image.manifest.layers()[0]);
    for i in 0..10u64 {
        assert_eq!(blob.read(i * CHUNK as u64, 512).unwrap().len(), 512);
    }
    // The first bare read (the manifest's) is challenged; from then on every read carries a
    // token, so nothing else is refused.
    let refused = registry.gets_refused_for_want_of_credentials(|uri| uri.contains("/public/"));
    assert_eq!(refused, 1, "reads refused for want of a token");

    // A daemon that found the manifest in containerd's content store reads ranges first: the
    // first is challenged, and the rest go out with a token the client fetches without
    // credentials.
    let fresh = anonymous_client(&runtime, &registry.host, RegistryOptions::default());
    let layer = &image.image.manifest.layers()[0];
    let blob = fresh.blob(&image.reference, layer.digest().as_ref(), layer.size());
    for i in 0..3u64 {
        assert_eq!(blob.read(i * CHUNK as u64, 512).unwrap().len(), 512);
    }
    let refused = registry.gets_refused_for_want_of_credentials(|uri| uri.contains("/public/"));
    assert_eq!(refused, 2, "reads refused for want of a token");
}
