#!/usr/bin/env bash
# Builds the release binaries and installs sealfs on this node:
#   PREFIX/bin/sealctl, PREFIX/bin/containerd-sealfs-grpc, /sbin/mount.sealfs
#   /etc/sealfs/config.toml (kept if present), /etc/sealfs/keys/ (mode 0700)
#   /etc/systemd/system/containerd-sealfs-grpc.service (enabled and started when systemd runs;
#   restarted if it ran: an upgrade in place, which running containers survive)
#   PREFIX/share/sealfs/containerd-snippet.toml, PREFIX/share/doc/sealfs/
# With --configure-containerd it also adds sealfs to /etc/containerd/config.toml (unless
# present; in the config version of the installed containerd: 2 for 1.6/1.7, 3 with the
# transfer service's unpack config for 2.x, see scripts/configure-containerd.sh) and restarts
# containerd.
#
# Usage: bash scripts/install.sh [--configure-containerd] [PREFIX]   (PREFIX: /usr/local)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
configure_containerd=0
if [ "${1:-}" = "--configure-containerd" ]; then configure_containerd=1; shift; fi
prefix=${1:-/usr/local}
packaging="$here/snapshotter/packaging"

cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p sealfs-tools
install -D -m 0755 "$here/target/release/sealctl" "$prefix/bin/sealctl"
install -D -m 0755 "$here/target/release/containerd-sealfs-grpc" "$prefix/bin/containerd-sealfs-grpc"
install -D -m 0755 "$here/target/release/mount-sealfs" /sbin/mount.sealfs
install -d -m 0700 /etc/sealfs/keys
if [ ! -e /etc/sealfs/config.toml ]; then
  install -D -m 0644 "$packaging/config.toml" /etc/sealfs/config.toml
fi
install -D -m 0644 "$packaging/containerd-snippet.toml" "$prefix/share/sealfs/containerd-snippet.toml"
install -D -m 0644 "$packaging/containerd2-snippet.toml" "$prefix/share/sealfs/containerd2-snippet.toml"
install -d "$prefix/share/doc/sealfs"
install -m 0644 "$here"/docs/*.md "$prefix/share/doc/sealfs/"
sed "s#/usr/local/bin/#$prefix/bin/#" "$packaging/containerd-sealfs-grpc.service" \
  > /etc/systemd/system/containerd-sealfs-grpc.service 2>/dev/null \
  || echo "no /etc/systemd/system: the unit was not installed"
echo "installed $prefix/bin/sealctl, $prefix/bin/containerd-sealfs-grpc, /sbin/mount.sealfs"
echo "config: /etc/sealfs/config.toml; put the node's private keys in /etc/sealfs/keys (mode 0600)"

if [ "$configure_containerd" = 1 ]; then
  bash "$here/scripts/configure-containerd.sh" /etc/containerd/config.toml
fi

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if systemctl is-active --quiet containerd-sealfs-grpc.service; then
    # An upgrade in place: the new binary takes over the running one's FUSE session, so
    # containers running on sealed layers keep reading (docs/semantics.md, "Restarts").
    systemctl restart containerd-sealfs-grpc.service
  fi
  systemctl enable --now containerd-sealfs-grpc.service
  if [ "$configure_containerd" = 1 ]; then systemctl restart containerd; fi
  echo "containerd-sealfs-grpc is running (systemctl status containerd-sealfs-grpc)"
else
  echo "systemd is not running: start the snapshotter with (after stopping a running one with"
  echo "SIGTERM, if this is an upgrade: running containers keep their sealed layers)"
  echo "  $prefix/bin/containerd-sealfs-grpc --config /etc/sealfs/config.toml"
  echo "and add $prefix/share/sealfs/containerd-snippet.toml (containerd 1.x) or"
  echo "containerd2-snippet.toml (containerd 2.x) to containerd's config"
fi
