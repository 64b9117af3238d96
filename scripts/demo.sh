#!/usr/bin/env bash
# The main job, end to end on one machine: start a registry, the sealfs snapshotter and a
# containerd that uses it (all private to a work directory), build a busybox image with 24 MiB
# of data, make a node key, seal the image for it and push it, pull it lazily with
# `sealctl pull`, run a container from it with `ctr run --snapshotter sealfs`, and show how
# little of the image was fetched to do so.
#
# Usage: bash scripts/demo.sh [WORKDIR]   (default: a fresh temporary directory)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/sealfs-demo.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)

if [ "${SEALFS_SKIP_DEPS:-}" != 1 ]; then
  bash "$here/scripts/install-deps.sh"
fi
echo "==> building sealctl, containerd-sealfs-grpc and mount.sealfs (release)"
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p sealfs-tools
bin="$here/target/release"

free_port() {
  local port
  for port in $(seq "$1" "$(($1 + 99))"); do
    if ! (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
  done
  echo "no free port from $1" >&2; exit 1
}
wait_for() { # wait_for WHAT COMMAND...: up to 30 s
  local what=$1; shift
  for _ in $(seq 300); do if "$@" >/dev/null 2>&1; then return; fi; sleep 0.1; done
  echo "$what did not come up" >&2; exit 1
}

pids=()
cleanup() {
  set +e
  # containerd first (it holds container mounts), then the snapshotter. SIGTERM leaves the
  # sealed layers mounted for a restart; `release` unmounts them and ends the session keeper.
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  [ -f "$work/sealfs.toml" ] && "$bin/containerd-sealfs-grpc" --config "$work/sealfs.toml" release >/dev/null 2>&1
  grep -o " $work/[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
}
trap cleanup EXIT

cd "$work"
rm -rf registry image bundle keys sealfs-root containerd node.priv node.pub ./*.log
mkdir -p keys

port=$(free_port 5100)
registry="127.0.0.1:$port"
echo "==> starting a registry on $registry"
cat > registry.yml <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $registry
log:
  level: warn
EOF
docker-registry serve registry.yml > registry.log 2>&1 &
pids=("$!" "${pids[@]}")
wait_for "the registry" bash -c "echo > /dev/tcp/127.0.0.1/$port"

echo "==> building a busybox image with 24 MiB of data (umoci)"
umoci init --layout image
umoci new --image image:latest
umoci unpack --image image:latest bundle >/dev/null
mkdir -p bundle/rootfs/bin bundle/rootfs/etc bundle/rootfs/data
cp "$(command -v busybox)" bundle/rootfs/bin/busybox
for tool in sh ls cat echo; do ln -sf busybox "bundle/rootfs/bin/$tool"; done
for i in 1 2 3; do head -c $((8 << 20)) /dev/urandom > "bundle/rootfs/data/blob-$i"; done
echo "hello from a sealed image, started before it was downloaded" > bundle/rootfs/etc/motd
umoci repack --image image:latest bundle
umoci config --image image:latest --config.cmd /bin/cat --config.cmd /etc/motd

echo "==> sealctl keygen: the node's key"
"$bin/sealctl" keygen --private keys/node.key --public node.pub
echo "==> sealctl seal, straight into the registry"
"$bin/sealctl" seal --recipient node.pub oci:image:latest "docker://$registry/demo:sealed"
"$bin/sealctl" inspect "docker://$registry/demo:sealed"

metrics="127.0.0.1:$(free_port 9370)"
echo "==> starting containerd-sealfs-grpc (metrics on $metrics)"
cat > sealfs.toml <<EOF
root = "$work/sealfs-root"
socket = "$work/sealfs.sock"
keys_dir = "$work/keys"
metrics_address = "$metrics"
[fetch]
# Fetch only what the container reads, so the demo can show how little that is.
background = false
EOF
"$bin/containerd-sealfs-grpc" --config sealfs.toml 2> sealfs.log &
pids=("$!" "${pids[@]}")
wait_for "containerd-sealfs-grpc" test -S sealfs.sock

echo "==> starting containerd with the sealfs proxy snapshotter"
cat > containerd.toml <<EOF
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
[grpc]
  address = "$work/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
$(sed -e "s#/run/sealfs/sealfs.sock#$work/sealfs.sock#" -e '/^#/d' "$here/snapshotter/packaging/containerd-snippet.toml")
EOF
containerd --config containerd.toml > containerd.log 2>&1 &
pids=("$!" "${pids[@]}")
wait_for containerd ctr --address containerd.sock version
ctr --address containerd.sock plugins ls | grep -E "TYPE|sealfs"

echo "==> sealctl pull: manifest and config only; layers mounted remotely"
"$bin/sealctl" pull --address containerd.sock "$registry/demo:sealed"
echo "==> ctr run --snapshotter sealfs"
ctr --address containerd.sock run --snapshotter sealfs --rm "$registry/demo:sealed" demo

fetched=$(exec 3<>"/dev/tcp/${metrics%:*}/${metrics#*:}"
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  awk '/^sealfs_fetched_bytes_total/ {print $2}' <&3)
total=$(du -sb registry/docker/registry/v2/blobs | cut -f1)
echo "==> the container ran after fetching $fetched bytes of a $total-byte image (metrics: http://$metrics/metrics)"
echo "==> demo OK ($work)"
