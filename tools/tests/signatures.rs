//! The signature policy end to end: a node that requires cosign signatures opens sealed
//! images signed by a trusted key (by `sealctl` or by the real `cosign`) and refuses the rest
//! at Prepare, before any key is unwrapped or anything mounted. Real containerd, registry,
//! cosign (Debian's, fetched by scripts/install-deps.sh) and FUSE.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::node::Node;
use common::*;
use snapshotter::registry::{Registry, RegistryOptions};

/// The password of the test's cosign keys.
const PASSWORD: &str = "sealfs-test";

/// Runs `program` in `work` with the cosign keys' password in its environment, and fails the
/// test with its output if it fails.
fn run_with_password(program: &str, work: &Path, args: &[&str]) -> Output {
    run(Command::new(program)
        .current_dir(work)
        .env("COSIGN_PASSWORD", PASSWORD)
        .args(args))
}

fn cosign_ok(work: &Path, args: &[&str]) {
    run_with_password("cosign", work, args);
}

fn sealctl_signing_ok(work: &Path, args: &[&str]) {
    run_with_password(SEALCTL, work, args);
}

/// The manifest digest of `reference` in the registry.
fn digest_of(reference: &str) -> String {
    let out = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{reference}")));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value["Digest"].as_str().unwrap().to_string()
}

/// Seals `img:v1` for the node's key into `NAME:sealed` and returns `(reference, digest)`.
fn sealed(work: &Path, node: &Node, name: &str) -> (String, String) {
    let Sealed { reference, .. } = push_sealed(work, &node.registry, "alice", name);
    let digest = digest_of(&reference);
    (reference, digest)
}

/// Pulls `reference` and expects the sealfs snapshotter to refuse it with `reason`; nothing
/// of it is mounted.
fn refused(node: &Node, reference: &str, reason: &str) {
    let mounted = node.daemon.fuse_mounts().len();
    let out = node.pull(reference);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{reference} was pulled");
    assert!(
        stderr.contains("refused by the signature policy") && stderr.contains(reason),
        "{reference}: expected a refusal saying {reason:?}, got: {stderr}"
    );
    assert_eq!(node.daemon.fuse_mounts().len(), mounted, "nothing mounted");
}

/// A registry client for the test's own writes (a tampered signature image).
fn registry_client(host: &str) -> (tokio::runtime::Runtime, Registry) {
    let runtime = snapshotter::registry::client_runtime().unwrap();
    let registry = Registry::connect_with_docker_config(
        runtime.handle().clone(),
        host,
        RegistryOptions::default(),
        None,
    )
    .unwrap();
    (runtime, registry)
}

#[test]
fn a_signature_policy_opens_images_signed_by_trusted_keys_and_refuses_the_rest() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    if !have_tools(&["cosign", "skopeo"]) {
        return;
    }
    cosign_ok(&work, &["generate-key-pair"]);
    cosign_ok(
        &work,
        &["generate-key-pair", "--output-key-prefix", "other"],
    );
    let policy = format!(
        "[signatures]\ndefault = \"require\"\nunsealed = true\nkeys = [\"{}\"]\n",
        work.join("cosign.pub").display()
    );
    let node = Node::start(&work, &policy);
    let host = node.registry.host.clone();

    // Sealed and signed in one step by sealctl: it pulls lazily and runs, and the real
    // cosign accepts the signature.
    let signed = format!("{host}/sealctl-signed:v1");
    sealctl_signing_ok(
        &work,
        &[
            "seal",
            "--recipient",
            "alice.pub",
            "--sign",
            "cosign.key",
            "oci:img:v1",
            &format!("docker://{signed}"),
        ],
    );
    let digest = digest_of(&signed);
    cosign_ok(
        &work,
        &[
            "verify",
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog",
            "--allow-insecure-registry",
            &format!("{host}/sealctl-signed@{digest}"),
        ],
    );
    let signature_reads = || node.registry.gets(|uri| uri.contains(".sig"));
    let before = signature_reads();
    node.pull_ok(&signed);
    assert_eq!(
        node.run(&signed, "sealctl-signed", &[]),
        format!("{GREETING}\n")
    );
    assert!(node.daemon.log().contains("image signature verified"));
    // One check per image, not per layer: the signature manifest is read once.
    assert_eq!(signature_reads() - before, 1, "signature manifest reads");

    // Signed by the real cosign (no transparency log, as in an air-gapped registry).
    let (by_cosign, digest) = sealed(&work, &node, "cosign-signed");
    cosign_ok(
        &work,
        &[
            "sign",
            "--key",
            "cosign.key",
            "--tlog-upload=false",
            "--allow-insecure-registry",
            "-y",
            &format!("{host}/cosign-signed@{digest}"),
        ],
    );
    node.pull_ok(&by_cosign);
    assert_eq!(
        node.run(&by_cosign, "cosign-signed", &[]),
        format!("{GREETING}\n")
    );

    // Unsigned.
    let (unsigned, _) = sealed(&work, &node, "unsigned");
    refused(&node, &unsigned, "no signature");

    // Signed, by a key the node does not trust.
    let (stranger, _) = sealed(&work, &node, "stranger");
    sealctl_signing_ok(
        &work,
        &[
            "sign",
            "--key",
            "other.key",
            &format!("docker://{stranger}"),
        ],
    );
    refused(&node, &stranger, "verifies with a trusted key");

    // A trusted signature, but of another image's digest, put at this image's signature tag.
    let (moved, moved_digest) = sealed(&work, &node, "moved");
    let signed_digest = digest_of(&signed);
    let tag = |digest: &str| format!("{}.sig", digest.replace(':', "-"));
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{host}/sealctl-signed:{}", tag(&signed_digest)),
        &format!("docker://{host}/moved:{}", tag(&moved_digest)),
    ]));
    refused(&node, &moved, "is for manifest");

    // A trusted signature whose payload was changed afterwards (pointed at this image).
    let (tampered, tampered_digest) = sealed(&work, &node, "tampered");
    let (_runtime, registry) = registry_client(&host);
    let source =
        Registry::parse(&format!("{host}/sealctl-signed:{}", tag(&signed_digest))).unwrap();
    let signature_image = registry.resolve_manifest(&source).unwrap();
    let layer = &signature_image.manifest.layers()[0];
    let payload = registry
        .read_small(
            &signature_image.reference,
            layer.digest().as_ref(),
            layer.size(),
            1 << 16,
        )
        .unwrap();
    let payload = String::from_utf8(payload)
        .unwrap()
        .replace(&signed_digest, &tampered_digest)
        .into_bytes();
    let payload_digest = fsformat::digest::digest_of(&payload);
    let target = Registry::parse(&format!("{host}/tampered:{}", tag(&tampered_digest))).unwrap();
    registry
        .push_small_blob(&target, &payload, &payload_digest)
        .unwrap();
    let config = signature_image.manifest.config();
    let config_bytes = registry
        .read_small(
            &signature_image.reference,
            config.digest().as_ref(),
            config.size(),
            1 << 16,
        )
        .unwrap();
    registry
        .push_small_blob(&target, &config_bytes, config.digest().as_ref())
        .unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&signature_image.raw_manifest).unwrap();
    manifest["layers"][0]["digest"] = payload_digest.clone().into();
    manifest["layers"][0]["size"] = payload.len().into();
    registry
        .push_manifest(
            &target,
            &serde_json::to_vec(&manifest).unwrap(),
            "application/vnd.oci.image.manifest.v1+json",
        )
        .unwrap();
    refused(&node, &tampered, "verifies with a trusted key");

    // With `unsealed = true` an image that is not sealed is held to the policy too: refused
    // unsigned, unpacked (downloaded, as by any snapshotter) and run once signed.
    let plain = node.registry.push(&work.join("img"), "v1", "plain-app");
    refused(&node, &plain, "no signature");
    sealctl_signing_ok(
        &work,
        &["sign", "--key", "cosign.key", &format!("docker://{plain}")],
    );
    node.pull_ok(&plain);
    assert!(node
        .run(
            &plain,
            "plain-signed",
            &["/bin/busybox", "cat", "/etc/motd"]
        )
        .contains("sealed with sealfs"),);

    // sealctl verify says what the node says.
    let out = sealctl(
        &work,
        &[
            "verify",
            "--key",
            "cosign.pub",
            &format!("docker://{signed}"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sealctl(
        &work,
        &[
            "verify",
            "--key",
            "cosign.pub",
            &format!("docker://{unsigned}"),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no signature"));

    assert!(node.daemon.metric("sealfs_signatures_verified_total") >= 2);
    assert!(node.daemon.metric("sealfs_signature_refusals_total") >= 4);
}
