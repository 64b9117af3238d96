//! The Kubernetes path: containerd's CRI plugin driven over its gRPC API (runtime.v1) as the
//! kubelet drives it (RunPodSandbox with host networking, PullImage, CreateContainer,
//! StartContainer, ContainerStatus, the container's log), with sealfs as the CRI snapshotter,
//! on whichever containerd is first on PATH (`scripts/test.sh` runs it on 1.6 and 2.x).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::node::DAEMON;
use common::*;
use k8s_cri::v1 as cri;
use sealfs_e2e::containerd::{Containerd, CriPull};
use sealfs_e2e::registry::DockerRegistry;
use sealfs_e2e::sealfs::SealfsDaemon;

/// The local sandbox ("pause") image: the app image's busybox, sleeping.
const SANDBOX_IMAGE: &str = "sealfs.test/img:pause";

/// A CRI client on containerd's socket, blocking on a runtime of its own.
struct CriClient {
    runtime: tokio::runtime::Runtime,
    pods: cri::runtime_service_client::RuntimeServiceClient<tonic_cri::transport::Channel>,
    images: cri::image_service_client::ImageServiceClient<tonic_cri::transport::Channel>,
}

impl CriClient {
    fn connect(socket: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = socket.to_path_buf();
        // The kubelet dials the unix socket; the URI is only a placeholder for tonic.
        let channel = runtime
            .block_on(
                tonic_cri::transport::Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let socket = socket.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    })),
            )
            .expect("connecting to containerd's CRI socket");
        CriClient {
            runtime,
            pods: cri::runtime_service_client::RuntimeServiceClient::new(channel.clone()),
            images: cri::image_service_client::ImageServiceClient::new(channel),
        }
    }

    fn pull(
        &mut self,
        image: &str,
        pod: &cri::PodSandboxConfig,
    ) -> Result<String, tonic_cri::Status> {
        self.pull_with(image, pod, None)
    }

    /// PullImage with `auth`, as the kubelet sends an imagePullSecret.
    fn pull_with(
        &mut self,
        image: &str,
        pod: &cri::PodSandboxConfig,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, tonic_cri::Status> {
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            auth,
            sandbox_config: Some(pod.clone()),
        };
        let reply = self.runtime.block_on(self.images.pull_image(request))?;
        Ok(reply.into_inner().image_ref)
    }

    /// RunPodSandbox; the sandbox id.
    fn run_pod(&mut self, pod: &cri::PodSandboxConfig) -> String {
        self.runtime
            .block_on(self.pods.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod.clone()),
                ..Default::default()
            }))
            .unwrap_or_else(|status| panic!("RunPodSandbox: {status}"))
            .into_inner()
            .pod_sandbox_id
    }

    /// Creates and starts container `name` of `image_ref` in the pod (`args` replacing the
    /// image's command if given), waits for it to exit as the kubelet does (polling its
    /// status), checks it exited 0; its log (CRI's format: TIMESTAMP STREAM TAG MESSAGE).
    fn run_to_exit(
        &mut self,
        sandbox: &str,
        pod: &cri::PodSandboxConfig,
        image_ref: &str,
        name: &str,
        args: &[&str],
    ) -> String {
        let container = self
            .runtime
            .block_on(self.pods.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.to_string(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: image_ref.to_string(),
                        ..Default::default()
                    }),
                    command: args.iter().map(|a| a.to_string()).collect(),
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(pod.clone()),
            }))
            .unwrap_or_else(|status| panic!("CreateContainer: {status}"))
            .into_inner()
            .container_id;
        self.runtime
            .block_on(self.pods.start_container(cri::StartContainerRequest {
                container_id: container.clone(),
            }))
            .unwrap_or_else(|status| panic!("StartContainer: {status}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            let status = self
                .runtime
                .block_on(self.pods.container_status(cri::ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                }))
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if status.state == cri::ContainerState::ContainerExited as i32 {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the container did not exit: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.exit_code, 0, "{status:?}");
        let directory = pod.log_directory.clone();
        fs::read_to_string(Path::new(&directory).join(format!("{name}.log"))).unwrap()
    }

    /// StopPodSandbox and RemovePodSandbox.
    fn remove_pod(&mut self, sandbox: &str) {
        let id = sandbox.to_string();
        self.runtime
            .block_on(self.pods.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }))
            .unwrap();
        self.runtime
            .block_on(
                self.pods
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }),
            )
            .unwrap();
    }
}

/// The node's key directory: alice's private key.
fn node_keys(work: &Path) -> std::path::PathBuf {
    let keys = work.join("node-keys");
    fs::create_dir_all(&keys).unwrap();
    fs::copy(work.join("alice.priv"), keys.join("alice.key")).unwrap();
    fs::set_permissions(
        keys.join("alice.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    keys
}

/// A pod on the node's network (no CNI needed) that logs to `logs`; no hostname (runc cannot
/// set one without a UTS namespace of the pod's own).
fn pod_config(name: &str, logs: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Pod as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// containerd's `hosts.toml` for a plain-HTTP registry (the same directory sealfs's
/// `[registry] hosts_dir` can name).
fn hosts_dir(work: &Path, registry: &DockerRegistry) -> std::path::PathBuf {
    let dir = work.join("certs.d");
    let host = &registry.host;
    fs::create_dir_all(dir.join(host)).unwrap();
    fs::write(
        dir.join(host).join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    dir
}

/// Imports the app image, its command a long sleep, as the node's local sandbox image,
/// unpacked for sealfs (as a node's pause image is).
fn import_sandbox_image(work: &Path, containerd: &Containerd) {
    umoci(
        work,
        &[
            "config",
            "--image",
            "img:v1",
            "--tag",
            "pause",
            "--config.cmd",
            "/bin/busybox",
            "--config.cmd",
            "sleep",
            "--config.cmd",
            "3600",
        ],
    );
    let archive = work.join("pause.tar");
    run(std::process::Command::new("tar")
        .arg("-C")
        .arg(work.join("img"))
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    containerd.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "sealfs",
        "--base-name",
        "sealfs.test/img",
        archive.to_str().unwrap(),
    ]);
}

/// The kubelet's path end to end: a sealed image pulls lazily through CRI (the registry
/// serves a small part of it, containerd's content store holds no layer blob), its container
/// runs in a pod and logs the image's greeting; an image sealed for another key fails
/// PullImage with the layer and the key ids in the message.
#[test]
fn cri_pulls_sealed_images_lazily_and_runs_them_in_a_pod() {
    cri_case(CriPull::Local);
}

/// The same on containerd 2.x with CRI's pulls going through the transfer service (its
/// default when CRI's own snapshot annotations are off), which gets the layer annotations to
/// sealfs through the proxy plugin's enable_remote_snapshot_annotations export.
#[test]
fn cri_pulls_through_containerd_2s_transfer_service_are_lazy_too() {
    if sealfs_e2e::containerd::major_version() < 2 {
        eprintln!("containerd 1.x: CRI has no transfer service pull");
        return;
    }
    cri_case(CriPull::TransferService);
}

fn cri_case(pull: CriPull) {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let keys = node_keys(&work);
    let registry = DockerRegistry::start();
    // One repository must be signed (by a key nobody here signs with): the rest of the
    // images are not held to it.
    run(Command::new("sh").current_dir(&work).args([
        "-c",
        "openssl ecparam -name prime256v1 -genkey -noout | openssl ec -pubout -out trusted.pub",
    ]));
    let policy = format!(
        "[fetch]\nbackground = false\n[signatures]\n[[signatures.rule]]\n\
         scope = \"{}/cri-must-sign\"\npolicy = \"require\"\nkeys = [\"{}\"]\n",
        registry.host,
        work.join("trusted.pub").display()
    );
    let daemon = SealfsDaemon::start(DAEMON, &work, &keys, &policy);
    let hosts = hosts_dir(&work, &registry);
    let containerd = Containerd::start_with_sealfs_cri(&daemon.socket, SANDBOX_IMAGE, &hosts, pull);
    daemon.link_containerd(&containerd);
    if sealfs_e2e::containerd::major_version() >= 2 {
        // containerd says when CRI's settings keep it from the transfer service.
        let local = containerd
            .log()
            .contains("Falling back to local image pull");
        assert_eq!(local, pull == CriPull::Local, "{}", containerd.log());
    }
    import_sandbox_image(&work, &containerd);
    let sealed = push_sealed(&work, &registry, "alice", "cri-app");
    let for_bob = push_sealed(&work, &registry, "bob", "cri-bob").reference;
    let mut client = CriClient::connect(&containerd.socket);

    let logs = work.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let pod = pod_config("sealed-pod", &logs);
    let served_before = registry.blob_bytes_served();
    let manifest_gets = || registry.gets(|uri| uri.starts_with("/v2/cri-app/manifests/"));
    let manifests_before = manifest_gets();
    let image_ref = client
        .pull(&sealed.reference, &pod)
        .unwrap_or_else(|status| {
            panic!(
                "PullImage: {status}\n--- daemon ---\n{}\n--- containerd ---\n{}",
                daemon.log(),
                containerd.log()
            )
        });
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert_eq!(
        daemon.fuse_mounts().len(),
        sealed.layers,
        "every layer mounted remotely: {}",
        daemon.log()
    );
    // containerd fetched the manifest; sealfs read containerd's copy from its content store.
    assert_eq!(
        manifest_gets() - manifests_before,
        1,
        "manifest GETs of the CRI pull"
    );

    let sandbox = client.run_pod(&pod);
    let log = client.run_to_exit(&sandbox, &pod, &image_ref, "app", &[]);
    assert!(
        log.lines()
            .any(|line| line.ends_with(&format!(" stdout F {GREETING}"))),
        "{log}"
    );

    let served = registry.blob_bytes_served() - served_before;
    assert!(
        served * 5 < sealed.size,
        "the registry served {served} of {} sealed bytes",
        sealed.size
    );
    let content = containerd.ctr_ok(&["content", "ls"]);
    let stored: Vec<&str> = content
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for digest in &sealed.digests {
        assert!(
            !stored.contains(&digest.as_str()),
            "layer {digest} was downloaded: {content}"
        );
    }

    // Sealed for bob only: PullImage fails and says which layer and which keys.
    let refused = client.pull(&for_bob, &pod).unwrap_err();
    let message = refused.message();
    assert!(
        message.contains("no key opens this layer")
            && message.contains("layer sha256:")
            && message.contains(&key_id(&work, "alice"))
            && message.contains(&key_id(&work, "bob")),
        "{message}"
    );

    // An unsigned image where the policy requires a signature: PullImage fails and says why.
    let unsigned = push_sealed(&work, &registry, "alice", "cri-must-sign").reference;
    let refused = client.pull(&unsigned, &pod).unwrap_err();
    let message = refused.message();
    assert!(
        message.contains("refused by the signature policy") && message.contains("no signature"),
        "{message}"
    );

    client.remove_pod(&sandbox);
}

/// imagePullSecrets: a registry with token authentication, and no credentials on the node. The
/// kubelet's PullImage carries the secret to containerd, which never passes it to a
/// snapshotter; sealfs's CRI image proxy (the kubelet's image service endpoint) takes it for
/// sealfs's own reads of that registry.
#[test]
fn image_pull_secrets_reach_sealfs_through_its_cri_image_proxy() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let keys = node_keys(&work);
    // Token authentication, as hosted registries use: the pull's credentials get bearer
    // tokens from the issuer, for containerd and for sealfs alike.
    let issuer = sealfs_e2e::token_issuer::TokenIssuer::start(&work, "puller", "s3cret");
    let registry = DockerRegistry::start_with_tokens(&issuer);
    for layout in ["sealed", "sealed-other"] {
        sealctl_ok(
            &work,
            &[
                "seal",
                "--recipient",
                "alice.pub",
                "oci:img:v1",
                &format!("oci:{layout}:v1"),
            ],
        );
    }
    let image = registry.push_as(
        &work.join("sealed"),
        "v1",
        "private/app",
        Some("puller:s3cret"),
    );
    let other = registry.push_as(
        &work.join("sealed-other"),
        "v1",
        "private/other",
        Some("puller:s3cret"),
    );
    // containerd's socket exists only once it runs, and it needs sealfs's: the proxy is
    // configured with a link that is made then (it connects on first use).
    let containerd_link = work.join("containerd-link.sock");
    let proxy_socket = work.join("cri/images.sock");
    let daemon = SealfsDaemon::start(
        DAEMON,
        &work,
        &keys,
        &format!(
            "[fetch]\nbackground = false\n[registry]\ndocker_config = \"{}\"\n\
             [cri]\nimage_proxy_socket = \"{}\"\ncontainerd_socket = \"{}\"\n",
            work.join("no-node-credentials.json").display(),
            proxy_socket.display(),
            containerd_link.display()
        ),
    );
    let hosts = hosts_dir(&work, &registry);
    let containerd =
        Containerd::start_with_sealfs_cri(&daemon.socket, SANDBOX_IMAGE, &hosts, CriPull::Local);
    std::os::unix::fs::symlink(&containerd.socket, &containerd_link).unwrap();
    import_sandbox_image(&work, &containerd);
    let mut kubelet = CriClient::connect(&containerd.socket);
    let mut through_proxy = CriClient::connect(&proxy_socket);
    let secret = |password: &str| cri::AuthConfig {
        username: "puller".into(),
        password: password.into(),
        ..Default::default()
    };
    let logs = work.join("pod-logs");
    fs::create_dir_all(&logs).unwrap();
    let pod = pod_config("private-pod", &logs);

    // Straight to containerd: it has the secret, sealfs does not, and says which credentials
    // it tried.
    let refused = kubelet
        .pull_with(&other, &pod, Some(secret("s3cret")))
        .unwrap_err();
    assert!(
        refused.message().contains(&registry.host)
            && refused
                .message()
                .contains("no credentials: the node has none"),
        "{}",
        refused.message()
    );

    // Through the proxy: lazy, and the pod runs.
    let image_ref = through_proxy
        .pull_with(&image, &pod, Some(secret("s3cret")))
        .unwrap_or_else(|status| panic!("PullImage: {status}\n{}", daemon.log()));
    let layers = manifest_of(&work, "sealed", "v1")["layers"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(daemon.fuse_mounts().len(), layers, "{}", daemon.log());
    let sandbox = kubelet.run_pod(&pod);
    let log = kubelet.run_to_exit(&sandbox, &pod, &image_ref, "app", &[]);
    assert!(log.contains(&format!(" stdout F {GREETING}")), "{log}");

    // A pull with a wrong secret fails, and leaves the working credentials in place: a file
    // nobody has read yet (background fetch is off) is fetched with them afterwards.
    assert!(through_proxy
        .pull_with(&other, &pod, Some(secret("guess")))
        .is_err());
    let expected = sealfs_e2e::noise(103, 4 << 20);
    let digest = fsformat::digest::digest_of(&expected);
    let digest = digest.trim_start_matches("sha256:");
    let log = kubelet.run_to_exit(
        &sandbox,
        &pod,
        &image_ref,
        "reader",
        &["/bin/busybox", "sha256sum", "/data/blobs/blob-3"],
    );
    assert!(log.contains(digest), "{log}\n{}", daemon.log());
    kubelet.remove_pod(&sandbox);
}
