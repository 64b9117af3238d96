//! `sealctl` end to end on real images built with umoci from a busybox-static rootfs.
//!
//! Needs root (device nodes, ownership), umoci, busybox and setfattr. In CI (`CI` set) a missing
//! tool is a failure; on a developer machine the test says what is missing and returns.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use sealfs_e2e::regular_header;

#[test]
fn seal_inspect_unseal_round_trip_of_a_real_image() {
    let Some((_temp, work)) = setup() else { return };
    let alice = keygen(&work, "alice");
    let bob = keygen(&work, "bob");
    sealctl_ok(
        &work,
        &[
            "seal",
            "-r",
            "alice.pub",
            "-r",
            "bob.pub",
            "--chunk-size",
            "256K",
            "--pack-size",
            "64K",
            "oci:img:v1",
            "oci:sealed:v1",
        ],
    );

    let plain = manifest_of(&work, "img", "v1");
    let sealed = manifest_of(&work, "sealed", "v1");
    // The config's diff ids become the sealed layers' own (derived from the pinned tails), so
    // no sealed image can claim a plain image's snapshots; everything else is kept.
    let config_of = |manifest: &serde_json::Value, image: &str| -> serde_json::Value {
        let digest = manifest["config"]["digest"].as_str().unwrap();
        let path = work
            .join(image)
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    };
    let (plain_config, sealed_config) = (config_of(&plain, "img"), config_of(&sealed, "sealed"));
    assert_eq!(plain_config["config"], sealed_config["config"]);
    assert_eq!(sealed["annotations"]["org.sealfs.sealed"], "v2");
    let layers = sealed["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let sealed_ids = sealed_config["rootfs"]["diff_ids"].as_array().unwrap();
    for (layer, (sealed_id, plain_id)) in layers.iter().zip(
        sealed_ids
            .iter()
            .zip(plain_config["rootfs"]["diff_ids"].as_array().unwrap()),
    ) {
        let index_digest = layer["annotations"]["containerd.io/snapshot/sealfs.index.digest"]
            .as_str()
            .unwrap();
        assert_eq!(
            sealed_id.as_str().unwrap(),
            fsformat::oci::sealed_diff_id(index_digest)
        );
        assert_ne!(sealed_id, plain_id);
        assert!(
            !serde_json::to_string(&sealed)
                .unwrap()
                .contains(plain_id.as_str().unwrap()),
            "the plain diff id is not published"
        );
    }
    for layer in layers {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+sealfs"
        );
        let annotations = layer["annotations"].as_object().unwrap();
        assert!(annotations.contains_key(&format!("containerd.io/snapshot/sealfs.key.{alice}")));
        assert!(annotations.contains_key(&format!("containerd.io/snapshot/sealfs.key.{bob}")));
        assert!(annotations["containerd.io/snapshot/sealfs.index.digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"));
    }
    // File names are secret: no plaintext name appears in any sealed blob.
    for layer in layers {
        let digest = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let blob = fs::read(work.join("sealed/blobs/sha256").join(digest)).unwrap();
        assert!(
            !blob.windows(8).any(|w| w == b"busybox-"),
            "a file name leaked into the blob"
        );
        assert!(
            !blob.windows(18).any(|w| w == b"sealed with sealfs"),
            "file content leaked into the blob"
        );
    }

    let summary = sealctl_ok(&work, &["inspect", "oci:sealed:v1"]);
    assert!(
        summary.contains(&alice) && summary.contains(&bob),
        "{summary}"
    );
    assert!(
        summary.contains("chunks") && summary.contains("256.0 KiB"),
        "{summary}"
    );
    assert!(
        !summary.contains("bin/busybox"),
        "no file names without a key"
    );
    let listing = sealctl_ok(&work, &["inspect", "-k", "bob.priv", "oci:sealed:v1"]);
    assert!(
        listing.contains("bin/busybox") && listing.contains("etc/removed (whiteout)"),
        "{listing}"
    );
    assert!(
        listing.contains("var/cache/app (opaque)")
            || listing.contains("var/cache/app/old (whiteout)"),
        "{listing}"
    );

    sealctl_ok(
        &work,
        &[
            "unseal",
            "-k",
            "bob.priv",
            "oci:sealed:v1",
            "oci:unsealed:v1",
        ],
    );
    let original = unpack(&work, "img:v1", "b-original");
    let round = unpack(&work, "unsealed:v1", "b-round");
    assert!(original.contains_key("bin/busybox") && !original.contains_key("etc/removed"));
    assert!(
        original["bin/busybox"].contains("xattr:security.capability="),
        "{}",
        original["bin/busybox"]
    );
    assert!(
        original["etc/motd"].contains("xattr:user.comment="),
        "{}",
        original["etc/motd"]
    );
    sealfs_e2e::assert_same_tree(&original, &round);
}

#[test]
fn keys_that_do_not_match_are_named_and_nothing_is_written() {
    let Some((_temp, work)) = setup() else { return };
    let alice = keygen(&work, "alice");
    let mallory = keygen(&work, "mallory");
    sealctl_ok(
        &work,
        &["seal", "-r", "alice.pub", "oci:img:v1", "oci:sealed:v1"],
    );
    let err = sealctl_err(
        &work,
        &[
            "unseal",
            "-k",
            "mallory.priv",
            "oci:sealed:v1",
            "oci:out:v1",
        ],
    );
    assert!(
        err.contains("layer 1/2") && err.contains(&alice) && err.contains(&mallory),
        "{err}"
    );
    assert!(
        !work.join("out").exists(),
        "a failed unseal left its destination behind"
    );
    let err = sealctl_err(&work, &["inspect", "-k", "mallory.priv", "oci:sealed:v1"]);
    assert!(err.contains("no key opens this layer"), "{err}");
    let err = sealctl_err(
        &work,
        &["seal", "-r", "alice.priv", "oci:img:v1", "oci:other:v1"],
    );
    assert!(err.contains("private key"), "{err}");
    let err = sealctl_err(
        &work,
        &[
            "seal",
            "-r",
            "alice.pub",
            "--chunk-size",
            "3000",
            "oci:img:v1",
            "oci:other:v1",
        ],
    );
    assert!(err.contains("power of two"), "{err}");
    let err = sealctl_err(
        &work,
        &[
            "seal",
            "-r",
            "alice.pub",
            "--pack-size",
            "2M",
            "oci:img:v1",
            "oci:other:v1",
        ],
    );
    assert!(err.contains("to the chunk size (1048576)"), "{err}");
    let err = sealctl_err(
        &work,
        &["seal", "-r", "alice.pub", "oci:sealed:v1", "oci:twice:v1"],
    );
    assert!(err.contains("already sealed"), "{err}");
}

#[test]
fn rewrap_changes_recipients_without_touching_blobs() {
    let Some((_temp, work)) = setup() else { return };
    let alice = keygen(&work, "alice");
    let carol = keygen(&work, "carol");
    sealctl_ok(
        &work,
        &["seal", "-r", "alice.pub", "oci:img:v1", "oci:sealed:v1"],
    );
    sealctl_ok(
        &work,
        &[
            "rewrap",
            "-k",
            "alice.priv",
            "--add-recipient",
            "carol.pub",
            "--remove-recipient",
            &alice,
            "oci:sealed:v1",
            "oci:sealed:v2",
        ],
    );
    let (v1, v2) = (
        manifest_of(&work, "sealed", "v1"),
        manifest_of(&work, "sealed", "v2"),
    );
    for (a, b) in v1["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v2["layers"].as_array().unwrap())
    {
        assert_eq!(a["digest"], b["digest"], "blob changed");
        let keys: Vec<&String> = b["annotations"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.contains("sealfs.key."))
            .collect();
        assert_eq!(
            keys,
            vec![&format!("containerd.io/snapshot/sealfs.key.{carol}")]
        );
    }
    sealctl_ok(&work, &["inspect", "-k", "carol.priv", "oci:sealed:v2"]);
    sealctl_err(&work, &["inspect", "-k", "alice.priv", "oci:sealed:v2"]);
    let err = sealctl_err(
        &work,
        &[
            "rewrap",
            "-k",
            "carol.priv",
            "--remove-recipient",
            &carol,
            "oci:sealed:v2",
            "oci:sealed:v3",
        ],
    );
    assert!(err.contains("no recipient"), "{err}");
}

#[test]
fn key_shares_split_and_combine() {
    if !nix_is_root() && std::env::var_os("CI").is_none() {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let work = temp.path();
    let id = keygen(work, "team");
    sealctl_ok(
        work,
        &[
            "key",
            "split",
            "--threshold",
            "3",
            "--shares",
            "5",
            "team.priv",
            "shares",
        ],
    );
    let share = |i: u32| format!("shares/share-{i}-of-5.txt");
    assert_eq!(
        fs::metadata(work.join(share(1))).unwrap().mode() & 0o777,
        0o600
    );
    sealctl_ok(
        work,
        &[
            "key",
            "combine",
            "-o",
            "back.priv",
            &share(5),
            &share(2),
            &share(4),
        ],
    );
    let back = fs::read_to_string(work.join("back.priv")).unwrap();
    assert_eq!(back, fs::read_to_string(work.join("team.priv")).unwrap());
    let err = sealctl_err(
        work,
        &["key", "combine", "-o", "x.priv", &share(1), &share(2)],
    );
    assert!(err.contains("needs 3") && err.contains(&id), "{err}");
    // Corrupt share 2: it is named, not silently combined into a wrong key.
    let text = fs::read_to_string(work.join(share(2))).unwrap();
    let line = text.lines().last().unwrap();
    let mut chars: Vec<char> = line.chars().collect();
    let at = "sealfs-share1:".len() + 20;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    fs::write(work.join(share(2)), chars.into_iter().collect::<String>()).unwrap();
    let err = sealctl_err(
        work,
        &[
            "key",
            "combine",
            "-o",
            "y.priv",
            &share(1),
            &share(2),
            &share(3),
        ],
    );
    assert!(err.contains("#2") && err.contains("corrupted"), "{err}");
    assert!(!work.join("y.priv").exists());
}

/// Writes a one-layer image whose layer is `tar` into an OCI layout at `dir`.
fn image_with_layer(dir: &Path, tar: &[u8]) {
    let layout = snapshotter::oci_layout::OciLayout::open_or_create(dir).unwrap();
    let (layer, size) = layout.put_blob(tar).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": size}],
    });
    tag_image(dir, manifest, &config, "v1");
}

#[test]
fn hostile_layers_are_refused_and_corrupt_blobs_detected() {
    let temp = tempfile::tempdir().unwrap();
    let work = temp.path();
    keygen(work, "k");
    // A tar whose second entry climbs out of the root.
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..14].copy_from_slice(b"../../evil.txt");
    header.set_size(4);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let mut evil = tar::Builder::new(Vec::new());
    let mut ok = regular_header(2);
    evil.append_data(&mut ok, "fine.txt", &b"ok"[..]).unwrap();
    let mut bytes = evil.into_inner().unwrap();
    bytes.truncate(bytes.len() - 1024);
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[b'x'; 512]);
    bytes.extend_from_slice(&[0u8; 1024]);
    image_with_layer(&work.join("evil"), &bytes);
    let err = sealctl_err(work, &["seal", "-r", "k.pub", "oci:evil:v1", "oci:out:v1"]);
    assert!(
        err.contains("../../evil.txt") && err.contains("escapes"),
        "{err}"
    );
    assert!(
        !work.join("out").exists()
            && !work.join("evil.txt").exists()
            && !temp.path().parent().unwrap().join("evil.txt").exists()
    );

    // A layer blob damaged on disk: its digest no longer matches and sealing stops.
    let mut good = tar::Builder::new(Vec::new());
    let mut h = regular_header(5);
    good.append_data(&mut h, "hello", &b"hello"[..]).unwrap();
    image_with_layer(&work.join("good"), &good.into_inner().unwrap());
    let manifest = manifest_of(work, "good", "v1");
    let digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let path = work.join("good/blobs/sha256").join(digest);
    let mut blob = fs::read(&path).unwrap();
    blob[600] ^= 1;
    fs::write(&path, blob).unwrap();
    let err = sealctl_err(work, &["seal", "-r", "k.pub", "oci:good:v1", "oci:out2:v1"]);
    assert!(err.contains("corrupt"), "{err}");

    // A name component longer than NAME_MAX (here 65,539 bytes, which a u16 length would
    // have truncated into further, attacker-chosen index fields) is refused by name.
    let mut long = tar::Builder::new(Vec::new());
    let name = format!("dir/{}", "a".repeat(65_539));
    let mut h = regular_header(2);
    long.append_data(&mut h, &name, &b"ok"[..]).unwrap();
    image_with_layer(&work.join("long"), &long.into_inner().unwrap());
    let err = sealctl_err(work, &["seal", "-r", "k.pub", "oci:long:v1", "oci:out3:v1"]);
    assert!(
        err.contains("65539 bytes exceeds the 255-byte limit"),
        "{err}"
    );
    assert!(!work.join("out3").exists() || manifest_missing(work, "out3"));
}

/// Whether layout `name` has no image tagged v1 (a refused seal leaves none).
fn manifest_missing(work: &Path, name: &str) -> bool {
    let index = fs::read_to_string(work.join(name).join("index.json")).unwrap_or_default();
    !index.contains("\"v1\"")
}

#[test]
fn keygen_writes_both_keys_or_neither() {
    let temp = tempfile::tempdir().unwrap();
    let work = temp.path();
    fs::write(work.join("taken.pub"), "someone else's\n").unwrap();
    let err = sealctl_err(
        work,
        &["keygen", "--private", "new.key", "--public", "taken.pub"],
    );
    assert!(err.contains("taken.pub already exists"), "{err}");
    assert!(!work.join("new.key").exists(), "no private key left behind");
    assert_eq!(
        fs::read_to_string(work.join("taken.pub")).unwrap(),
        "someone else's\n"
    );
    fs::write(work.join("taken.key"), "old\n").unwrap();
    let err = sealctl_err(
        work,
        &["keygen", "--private", "taken.key", "--public", "new.pub"],
    );
    assert!(err.contains("taken.key already exists"), "{err}");
    assert!(!work.join("new.pub").exists());
    sealctl_ok(
        work,
        &["keygen", "--private", "new.key", "--public", "new.pub"],
    );
    assert_eq!(
        fs::metadata(work.join("new.key")).unwrap().mode() & 0o777,
        0o600
    );
    assert!(work.join("new.pub").exists());
}

#[test]
fn seal_inspect_unseal_and_rewrap_through_a_registry() {
    let Some((_temp, work)) = setup() else { return };
    let alice = keygen(&work, "alice");
    let bob = keygen(&work, "bob");
    let registry = sealfs_e2e::registry::DockerRegistry::start();
    let v1 = format!("docker://{}/sealed/busybox:v1", registry.host);
    let v2 = format!("docker://{}/sealed/busybox:v2", registry.host);

    let out = sealctl(&work, &["seal", "-r", "alice.pub", "oci:img:v1", &v1]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 blob(s) already there"));

    let summary = sealctl_ok(&work, &["inspect", &v1]);
    assert!(
        summary.contains("sealed, sealfs image format v2") && summary.contains(&alice),
        "{summary}"
    );
    assert_eq!(
        summary.matches("verified against the manifest").count(),
        2,
        "{summary}"
    );

    sealctl_ok(
        &work,
        &["unseal", "-k", "alice.priv", &v1, "oci:unsealed:v1"],
    );
    let original = unpack(&work, "img:v1", "b-original");
    let round = unpack(&work, "unsealed:v1", "b-round");
    sealfs_e2e::assert_same_tree(&original, &round);

    // Rewrapping rewrites the manifest only: every blob is already in the registry.
    let out = sealctl(
        &work,
        &[
            "rewrap",
            "-k",
            "alice.priv",
            "--add-recipient",
            "bob.pub",
            &v1,
            &v2,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 blob(s) already there"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = sealctl_ok(&work, &["inspect", "-k", "bob.priv", &v2]);
    assert!(
        listing.contains(&bob) && listing.contains("bin/busybox"),
        "{listing}"
    );

    let err = sealctl_err(
        &work,
        &["inspect", &format!("docker://{}/no/such:v1", registry.host)],
    );
    assert!(
        err.contains(&registry.host) && err.contains("manifest unknown"),
        "{err}"
    );
}
