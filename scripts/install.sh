#!/usr/bin/env bash
# Builds the release binaries and installs them: sealctl into /usr/local/bin, the mount helper
# as /sbin/mount.sealfs (so `mount -t sealfs ...` finds it).
#
# Usage: sudo bash scripts/install.sh [PREFIX]   (default PREFIX: /usr/local)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-/usr/local}
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p sealfs-tools
install -D -m 0755 "$here/target/release/sealctl" "$prefix/bin/sealctl"
install -D -m 0755 "$here/target/release/mount-sealfs" /sbin/mount.sealfs
echo "installed $prefix/bin/sealctl and /sbin/mount.sealfs"
