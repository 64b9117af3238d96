//! Layer keys through keyproviders (ocicrypt's protocol) and key access per workload.
//!
//! The provider is `kms-provider` (tests/keyprovider): the tests' stand-in for a KMS, written
//! against ocicrypt's own protocol types and gRPC service, holding its own wrapping key. The
//! reference client is ocicrypt itself (`ocicrypt-keyprovider`, Go, Debian's ocicrypt
//! sources). Real containerd, registry and FUSE for the node paths.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::node::Node;
use common::*;
use sealfs_e2e::keyprovider::{programs, GrpcProvider, Programs};
use snapshotter::keyprovider::{CallLimits, KeyProviders};

/// The stand-in KMS's wrapping key, made once before any provider runs: `DIR/kek`.
fn kms_key(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("kek");
    fs::write(&path, sealfs_e2e::noise(0x6b656b, 32)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A keyprovider config file (ocicrypt's JSON) with `entries` (`"NAME": {...}` pairs).
fn provider_config(path: &Path, entries: &[String]) -> PathBuf {
    fs::write(
        path,
        format!("{{\"key-providers\": {{{}}}}}", entries.join(", ")),
    )
    .unwrap();
    path.to_path_buf()
}

/// A `cmd` entry running the stand-in KMS with `args`.
fn cmd_entry(name: &str, programs: &Programs, args: &[&str]) -> String {
    format!(
        "\"{name}\": {{\"cmd\": {{\"path\": \"{}\", \"args\": {}}}}}",
        programs.kms_provider.display(),
        serde_json::to_string(args).unwrap()
    )
}

fn grpc_entry(name: &str, address: &str) -> String {
    format!("\"{name}\": {{\"grpc\": \"{address}\"}}")
}

/// Runs ocicrypt's client: `wrap|unwrap SPEC` with `input` on stdin; its stdout.
fn ocicrypt(
    programs: &Programs,
    config: &Path,
    operation: &str,
    spec: &str,
    input: &[u8],
) -> Vec<u8> {
    let mut child = Command::new(&programs.ocicrypt)
        .args([operation, spec])
        .env("OCICRYPT_KEYPROVIDER_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ocicrypt-keyprovider {operation} {spec}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `sealctl` with `config` as its keyprovider configuration.
fn sealctl_with(work: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(SEALCTL)
        .current_dir(work)
        .env("OCICRYPT_KEYPROVIDER_CONFIG", config)
        .args(args)
        .output()
        .unwrap()
}

fn sealctl_with_ok(work: &Path, config: &Path, args: &[&str]) -> String {
    let out = sealctl_with(work, config, args);
    assert!(
        out.status.success(),
        "sealctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ocicrypt_and_sealfs_wrap_and_unwrap_through_the_same_provider() {
    let Some(programs) = programs() else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let kek = kms_key(dir);
    let log = dir.join("requests.log");
    let kek_args = ["-key", kek.to_str().unwrap(), "-log", log.to_str().unwrap()];
    let grpc = GrpcProvider::start(programs, &dir.join("kms.sock"), &kek_args);
    let config = provider_config(
        &dir.join("ocicrypt_keyprovider.conf"),
        &[
            cmd_entry("kms", programs, &kek_args),
            grpc_entry("kms-grpc", &grpc.address),
        ],
    );
    let providers = KeyProviders::load(&config, CallLimits::default()).unwrap();
    for name in ["kms", "kms-grpc"] {
        let provider = providers.get(name).unwrap();
        let key: Vec<u8> = sealfs_e2e::noise(name.len() as u64, 32);

        // sealfs wraps, ocicrypt unwraps.
        let wrapped = provider.wrap_bytes(Some("team-a"), &key).unwrap();
        assert_ne!(wrapped, key);
        assert_eq!(
            ocicrypt(programs, &config, "unwrap", name, &wrapped),
            key,
            "{name}"
        );

        // ocicrypt wraps, sealfs unwraps.
        let wrapped = ocicrypt(programs, &config, "wrap", &format!("{name}:team-a"), &key);
        assert_eq!(
            &provider.unwrap_bytes(&wrapped).unwrap()[..],
            &key[..],
            "{name}"
        );

        // A refusal comes back as the provider's own words, naming the provider.
        let error = provider
            .unwrap_bytes(b"not wrapped by it")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&format!("keyprovider {name}"))
                && error.contains("not wrapped by this KMS"),
            "{error}"
        );
    }
    // Both clients sent the same requests, over both transports: wrap with the recipient's
    // parameters, unwrap naming the provider as ocicrypt's provider: decryption keys do.
    let requests = fs::read_to_string(&log).unwrap();
    for line in [
        "cmd keywrap kms=team-a",
        "cmd keyunwrap kms=Enabled",
        "grpc keywrap kms-grpc=team-a",
        "grpc keyunwrap kms-grpc=Enabled",
    ] {
        assert_eq!(
            requests.lines().filter(|l| *l == line).count(),
            // Each direction once from each client; the refused unwrap once more.
            if line.contains("keyunwrap") { 3 } else { 2 },
            "{line:?} in:\n{requests}"
        );
    }
}

#[test]
fn sealctl_seals_unseals_and_rewraps_through_a_keyprovider() {
    let Some(programs) = programs() else {
        return;
    };
    let Some((_temp, work)) = setup() else {
        return;
    };
    keygen(&work, "bob");
    let kek = kms_key(&work);
    let config = provider_config(
        &work.join("providers.json"),
        &[cmd_entry("kms", programs, &["-key", kek.to_str().unwrap()])],
    );
    sealctl_with_ok(
        &work,
        &config,
        &[
            "seal",
            "--recipient",
            "provider:kms",
            "oci:img:v1",
            "oci:sealed:v1",
        ],
    );
    let shown = sealctl_with_ok(
        &work,
        &config,
        &["inspect", "--key", "provider:kms", "oci:sealed:v1"],
    );
    assert!(shown.contains("recipients   provider:kms"), "{shown}");

    // The provider is the only way in: bob cannot, until the provider's holder adds him.
    let refused = sealctl_err(
        &work,
        &[
            "unseal",
            "--key",
            "bob.priv",
            "oci:sealed:v1",
            "oci:plain:bob",
        ],
    );
    assert!(refused.contains("provider:kms"), "{refused}");
    sealctl_with_ok(
        &work,
        &config,
        &[
            "rewrap",
            "--key",
            "provider:kms",
            "--add-recipient",
            "bob.pub",
            "oci:sealed:v1",
            "oci:sealed:bob",
        ],
    );
    sealctl_ok(
        &work,
        &[
            "unseal",
            "--key",
            "bob.priv",
            "oci:sealed:bob",
            "oci:plain:bob",
        ],
    );
    sealctl_with_ok(
        &work,
        &config,
        &[
            "unseal",
            "--key",
            "provider:kms",
            "oci:sealed:v1",
            "oci:plain:kms",
        ],
    );
    assert_eq!(
        unpack(&work, "plain:bob", "bundle-bob"),
        unpack(&work, "plain:kms", "bundle-kms")
    );

    // Removing the provider leaves bob; the provider no longer opens the new manifest.
    sealctl_with_ok(
        &work,
        &config,
        &[
            "rewrap",
            "--key",
            "bob.priv",
            "--remove-recipient",
            "provider:kms",
            "oci:sealed:bob",
            "oci:sealed:bob-only",
        ],
    );
    let out = sealctl_with(
        &work,
        &config,
        &[
            "unseal",
            "--key",
            "provider:kms",
            "oci:sealed:bob-only",
            "oci:plain:x",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no key opens this layer"),
        "{stderr}"
    );

    // Without a configuration, provider: says where one comes from.
    let out = Command::new(SEALCTL)
        .current_dir(&work)
        .env_remove("OCICRYPT_KEYPROVIDER_CONFIG")
        .args([
            "seal",
            "--recipient",
            "provider:kms",
            "oci:img:v1",
            "oci:x:v1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OCICRYPT_KEYPROVIDER_CONFIG"), "{stderr}");
}

/// Seals `img:v1` for `recipient` (a `provider:` spec) and pushes it as `NAME:sealed`.
fn seal_for(work: &Path, config: &Path, node: &Node, recipient: &str, name: &str) -> String {
    let reference = format!("{}/{name}:sealed", node.registry.host);
    sealctl_with_ok(
        work,
        config,
        &[
            "seal",
            "--recipient",
            recipient,
            "oci:img:v1",
            &format!("docker://{reference}"),
        ],
    );
    reference
}

/// Pulls `reference` into `namespace` and expects the snapshotter to refuse it saying all of
/// `reasons`.
fn pull_refused(node: &Node, namespace: &str, reference: &str, reasons: &[&str]) {
    let out = node.pull_in(namespace, reference);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{reference} was pulled into {namespace}"
    );
    for reason in reasons {
        assert!(
            stderr.contains(reason),
            "{reference}: expected {reason:?} in: {stderr}"
        );
    }
}

fn pull_in_ok(node: &Node, namespace: &str, reference: &str) {
    let out = node.pull_in(namespace, reference);
    assert!(
        out.status.success(),
        "sealctl pull -n {namespace} {reference}: {}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.daemon.log()
    );
}

#[test]
fn a_node_without_key_files_runs_images_through_keyproviders_and_survives_their_faults() {
    let Some(programs) = programs() else {
        return;
    };
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let kek = kms_key(&work);
    let log = work.join("requests.log");
    let refuse = work.join("refuse");
    let kek_args = ["-key", kek.to_str().unwrap(), "-log", log.to_str().unwrap()];
    let socket = work.join("kms.sock");
    let grpc = GrpcProvider::start(programs, &socket, &kek_args);
    // The tools' view: every provider answers at once.
    let sealing = provider_config(
        &work.join("sealing.json"),
        &[
            cmd_entry("kms", programs, &kek_args),
            grpc_entry("kms-grpc", &grpc.address),
            cmd_entry("kms-slow", programs, &kek_args),
        ],
    );
    // The node's view of the same KMS: it may refuse (while `refuse` exists), and one name
    // answers late.
    let refusing_args = [&kek_args[..], &["-refuse-while", refuse.to_str().unwrap()]].concat();
    let slow_args = [&kek_args[..], &["-delay", "60s"]].concat();
    let node_config = provider_config(
        &work.join("node.json"),
        &[
            cmd_entry("kms", programs, &refusing_args),
            grpc_entry("kms-grpc", &grpc.address),
            cmd_entry("kms-slow", programs, &slow_args),
        ],
    );
    let node = Node::start(
        &work,
        &format!(
            "[keyproviders]\nconfig = \"{}\"\ntimeout_secs = 3\nretries = 1\n",
            node_config.display()
        ),
    );
    // No key file on the node: only the providers open layers.
    fs::remove_file(work.join("node-keys/alice.key")).unwrap();

    let over_grpc = seal_for(&work, &sealing, &node, "provider:kms-grpc", "grpc-app");
    let later = seal_for(&work, &sealing, &node, "provider:kms-grpc", "grpc-later");
    let over_cmd = seal_for(&work, &sealing, &node, "provider:kms", "cmd-app");
    let slow = seal_for(&work, &sealing, &node, "provider:kms-slow", "slow-app");

    node.pull_ok(&over_grpc);
    assert!(node.run(&over_grpc, "grpc-run", &[]).contains(GREETING));
    let requests = fs::read_to_string(&log).unwrap();
    assert!(
        requests.contains("grpc keyunwrap kms-grpc=Enabled"),
        "{requests}"
    );

    // Provider down: the Prepare fails with the provider named and why; back up, the same
    // pull works.
    drop(grpc);
    pull_refused(
        &node,
        "sealfs-test",
        &later,
        &["keyprovider kms-grpc", "cannot reach"],
    );
    let grpc = GrpcProvider::start(programs, &socket, &kek_args);
    node.pull_ok(&later);
    assert!(node.run(&later, "later-run", &[]).contains(GREETING));
    drop(grpc);

    // Provider refusing: its words reach the operator; when it relents, the pull works.
    fs::write(&refuse, "").unwrap();
    pull_refused(
        &node,
        "sealfs-test",
        &over_cmd,
        &["keyprovider kms", "access denied by policy"],
    );
    fs::remove_file(&refuse).unwrap();
    node.pull_ok(&over_cmd);
    assert!(node.run(&over_cmd, "cmd-run", &[]).contains(GREETING));

    // Provider slow: the Prepare gives up at the daemon's deadline and says so.
    pull_refused(
        &node,
        "sealfs-test",
        &slow,
        &["keyprovider kms-slow", "no answer within 3s"],
    );

    // Operators see each provider's calls: the layers it opened and the calls that failed.
    let metric = |name: &str, provider: &str| {
        node.daemon
            .metric(&format!("{name}_total{{provider=\"{provider}\"}}"))
    };
    assert!(metric("sealfs_keyprovider_unwraps", "kms-grpc") >= 2);
    assert!(metric("sealfs_keyprovider_failures", "kms-grpc") >= 1);
    assert!(metric("sealfs_keyprovider_failures", "kms") >= 1);
    assert!(metric("sealfs_keyprovider_failures", "kms-slow") >= 1);
    assert_eq!(metric("sealfs_keyprovider_unwraps", "kms-slow"), 0);
    // Every unwrap call is timed, failed ones included: the slow provider's call shows the
    // whole wait the daemon gave it.
    let histogram = |series: &str, provider: &str| {
        format!("sealfs_keyprovider_unwrap_seconds_{series}{{provider=\"{provider}\"}}")
    };
    assert_eq!(
        node.daemon.metric(&histogram("count", "kms-grpc")),
        metric("sealfs_keyprovider_unwraps", "kms-grpc")
            + metric("sealfs_keyprovider_failures", "kms-grpc")
    );
    assert!(node.daemon.metric_f64(&histogram("sum", "kms-slow")) >= 3.0);

    // A restarted daemon reopens the layers keyproviders opened with the keys it kept with
    // the FUSE session (see `kept_keys`): the gRPC provider is down (since the refusal above)
    // while it starts, yet every layer is mounted again at once, no provider is asked, and
    // containers run on the layers either provider opened.
    let unwraps = |log: &Path| {
        fs::read_to_string(log)
            .unwrap()
            .lines()
            .filter(|l| l.contains(" keyunwrap "))
            .count()
    };
    let before = unwraps(&log);
    let layers_mounted = node.daemon.metric("sealfs_layers_mounted");
    // Every layer here was opened by a provider: each one's key is with the keeper.
    assert_eq!(node.daemon.metric("sealfs_kept_layer_keys"), layers_mounted);
    let mut node = node;
    node.daemon.signal("TERM");
    node.daemon.restart(&node.containerd);
    assert_eq!(
        node.daemon.metric("sealfs_layers_mounted"),
        layers_mounted,
        "{}",
        node.daemon.log()
    );
    assert!(node
        .run(&over_grpc, "grpc-after-restart", &[])
        .contains(GREETING));
    assert!(node
        .run(&over_cmd, "cmd-after-restart", &[])
        .contains(GREETING));
    assert_eq!(unwraps(&log), before, "the restart asked a provider");
    assert_eq!(node.daemon.metric("sealfs_kept_layer_keys"), layers_mounted);
    assert!(node
        .daemon
        .log()
        .contains("layer keys from keyproviders kept across the restart"));

    // A deliberate shutdown lets the kept keys go with the session. The next start needs the
    // providers: the layers the gRPC one opened cannot be opened while it is down, and once
    // it is back the daemon mounts them again by itself (containers running on them would
    // read again without anything else happening on the node).
    node.daemon.signal("TERM");
    let released = node.daemon.release();
    assert!(
        String::from_utf8_lossy(&released.stdout).contains("dropped the layer keys"),
        "{released:?}"
    );
    node.daemon.restart(&node.containerd);
    assert!(node
        .run(&over_cmd, "cmd-after-release", &[])
        .contains(GREETING));
    assert!(
        unwraps(&log) > before,
        "the start after a release did not ask the provider"
    );
    assert!(node.daemon.metric("sealfs_layers_mounted") < layers_mounted);
    let _grpc = GrpcProvider::start(programs, &socket, &kek_args);
    assert!(
        node.daemon.wait_for_log(
            "every remote layer is mounted again",
            std::time::Duration::from_secs(90)
        ),
        "{}",
        node.daemon.log()
    );
    assert_eq!(node.daemon.metric("sealfs_layers_mounted"), layers_mounted);

    // Nothing of a key reached the daemon's log.
    let daemon_log = node.daemon.log();
    assert!(!daemon_log.contains("optsdata"), "{daemon_log}");
}

#[test]
fn key_access_rules_open_an_image_in_its_namespace_only() {
    let Some(programs) = programs() else {
        return;
    };
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let kek = kms_key(&work);
    let config = provider_config(
        &work.join("providers.json"),
        &[cmd_entry("kms", programs, &["-key", kek.to_str().unwrap()])],
    );
    let alice = key_id(&work, "alice");
    let node = Node::start_naming_registry(&work, |host| {
        format!(
            "[keyproviders]\nconfig = \"{}\"\n\n\
             [[key_access]]\nkey = \"provider:kms\"\nnamespaces = [\"k8s.io\"]\nimages = [\"{host}/team-a\"]\n\n\
             [[key_access]]\nkey = \"{alice}\"\nnamespaces = [\"sealfs-test\"]\n",
            config.display()
        )
    });
    let team_a = seal_for(&work, &config, &node, "provider:kms", "team-a/app");
    let team_a_tool = seal_for(&work, &config, &node, "provider:kms", "team-a/tool");
    let team_b = seal_for(&work, &config, &node, "provider:kms", "team-b/app");
    let by_alice = push_sealed(&work, &node.registry, "alice", "alice-app").reference;

    // The provider's key opens team-a's images in CRI's namespace, and the container runs.
    pull_in_ok(&node, "k8s.io", &team_a);
    let out = node
        .containerd
        .ctr_command()
        .args([
            "--namespace",
            "k8s.io",
            "run",
            "--snapshotter",
            "sealfs",
            "--rm",
            &team_a,
            "team-a-run",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(GREETING),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another namespace cannot have it: neither a fresh image nor the layers already mounted
    // for k8s.io (containerd would share those on AlreadyExists).
    let not_here = "which the node's [[key_access]] rules do not allow for namespace sealfs-test";
    pull_refused(
        &node,
        "sealfs-test",
        &team_a_tool,
        &["provider:kms", not_here],
    );
    pull_refused(&node, "sealfs-test", &team_a, &["provider:kms", not_here]);
    // Nor another team's image in the allowed namespace.
    pull_refused(&node, "k8s.io", &team_b, &["provider:kms", "team-b/app"]);

    // A node key named in a rule is held to it as well.
    node.pull_ok(&by_alice);
    pull_refused(&node, "k8s.io", &by_alice, &[&alice, "namespace k8s.io"]);
}
