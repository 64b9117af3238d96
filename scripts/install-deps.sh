#!/usr/bin/env bash
# Installs the system packages sealfs builds and tests against (Debian 12, as root).
# Idempotent: apt-get skips what is already installed.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: run as root (it installs packages with apt-get)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "install-deps.sh: cargo is missing; install a Rust toolchain >= 1.87 (rustup) first" >&2
  exit 1
fi

# One list, shared with .ci/run.
mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$(dirname "$0")/packages.txt")
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"

# containerd 2.x for the end-to-end tests' second run (Debian 12 ships 1.6), and Go 1.27 with
# containerd 2.x's source for its snapshotter conformance suite and ocicrypt's (the reference
# keyprovider client of tools/tests/keyproviders.rs): sid's packages, unpacked
# privately under target/debian (never installed system-wide).
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/fetch-debian-packages.sh" sid "$here/target/debian/containerd2" containerd
bash "$here/scripts/fetch-debian-packages.sh" --closure '^golang-' sid "$here/target/debian/go2" \
  golang-1.27-go golang-github-containerd-containerd-dev golang-github-containers-ocicrypt-dev
# cosign, the peer of sealfs's image signatures (trixie's 2.5: key-based signatures in the
# classic sha256-HEX.sig layout by default; Depends only on libc6).
bash "$here/scripts/fetch-debian-packages.sh" trixie "$here/target/debian/cosign" cosign
