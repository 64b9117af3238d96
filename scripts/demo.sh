#!/usr/bin/env bash
# The main job, for now: build a small image with umoci from busybox-static, make a key, seal
# the image, show `sealctl inspect` without and with the key, mount the sealed image lazily with
# mount.sealfs and read from it, and unseal it again, checking that the file tree survived.
# Later issues turn this into "run a container lazily".
#
# Usage: sudo bash scripts/demo.sh [WORKDIR]   (default: a fresh temporary directory)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/sealfs-demo.XXXXXX)}
mkdir -p "$work"

if [ "${SEALFS_SKIP_DEPS:-}" != 1 ]; then
  bash "$here/scripts/install-deps.sh"
fi
echo "==> building sealctl and mount.sealfs (release)"
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p sealfs-tools
sealctl="$here/target/release/sealctl"
mount_sealfs="$here/target/release/mount-sealfs"

cd "$work"
if mountpoint -q mnt 2>/dev/null; then umount mnt; fi
rm -rf demo-image demo-sealed demo-unsealed bundle unpacked-* demo.priv demo.pub mnt
echo "==> building a busybox image with umoci in $work/demo-image"
umoci init --layout demo-image
umoci new --image demo-image:latest
umoci unpack --image demo-image:latest bundle >/dev/null
mkdir -p bundle/rootfs/bin bundle/rootfs/etc
cp "$(command -v busybox)" bundle/rootfs/bin/busybox
for tool in sh ls cat echo; do ln -sf busybox "bundle/rootfs/bin/$tool"; done
echo "hello from a sealed image" > bundle/rootfs/etc/motd
umoci repack --image demo-image:latest bundle
umoci config --image demo-image:latest --config.cmd /bin/cat --config.cmd /etc/motd

echo "==> sealctl keygen"
"$sealctl" keygen --private demo.priv --public demo.pub
echo "==> sealctl seal"
"$sealctl" seal --recipient demo.pub oci:demo-image:latest oci:demo-sealed:latest
echo "==> sealctl inspect (no key: sizes, chunks, recipients; names stay secret)"
"$sealctl" inspect oci:demo-sealed:latest
echo "==> sealctl inspect --key (the file list)"
"$sealctl" inspect --key demo.priv oci:demo-sealed:latest | head -20
echo "==> mount.sealfs: mount the sealed image read-only; chunks are fetched when read"
mkdir -p mnt
"$mount_sealfs" oci:demo-sealed:latest mnt -o key=demo.priv,log="$work/mount.log"
grep " $work/mnt " /proc/mounts || true
echo "--- cat mnt/etc/motd"
cat mnt/etc/motd
umount mnt
echo "==> sealctl unseal, and compare with the original"
"$sealctl" unseal --key demo.priv oci:demo-sealed:latest oci:demo-unsealed:latest
umoci unpack --image demo-image:latest unpacked-original >/dev/null
umoci unpack --image demo-unsealed:latest unpacked-roundtrip >/dev/null
diff -r unpacked-original/rootfs unpacked-roundtrip/rootfs
echo "==> round trip OK: the unsealed image has the same files ($work)"
