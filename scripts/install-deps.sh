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
go2="$here/target/debian/go2"
fetch_go() {
  bash "$here/scripts/fetch-debian-packages.sh" --closure '^golang-' sid "$go2" \
    golang-1.27-go golang-github-containerd-containerd-dev golang-github-containers-ocicrypt-dev
}
# The directories of every package the Go test programs compile (their files and embedded
# files), outside Go's own tree; fails when one of them is missing. Every program under
# tests/keyprovider is listed; of tests/conformance only the 2.x suite builds against sid's
# sources (the 1.6 suite uses the system's).
go_packages_needed() (
  local go="$go2/usr/lib/go-1.27/bin/go" format
  format='{{if not .Goroot}}{{.Dir}}{{range .EmbedFiles}}{{"\n"}}{{$.Dir}}/{{.}}{{end}}{{end}}'
  export GO111MODULE=off GOROOT="$go2/usr/lib/go-1.27" GOFLAGS=
  (cd "$here/tests/conformance" && GOPATH="$PWD:$go2/usr/share/gocode" \
    "$go" list -deps -test -f "$format" sealfs.test/conformance2) &&
  (cd "$here/tests/keyprovider" && GOPATH="$PWD:$go2/usr/share/gocode" \
    "$go" list -deps -test -f "$format" sealfs.test/...)
)
fetch_go
# sid's containerd sources pull in ~2.5 GB of Go sources (Kubernetes, Google Cloud, ...), of
# which the test programs compile ~3 MB: keep only those packages, so the disk holds cargo's
# builds instead. When the programs (or a newer package) import one pruned earlier, unpack the
# closure again. Every go.mod stays: in GOPATH mode it is what lets code under it import a
# module's /vN path (Go's "minimal module compatibility").
if ! needed=$(go_packages_needed 2>/dev/null); then
  echo "install-deps.sh: the Go test programs import packages not unpacked; unpacking sid's Go sources again" >&2
  rm -rf "$go2"
  fetch_go
  needed=$(go_packages_needed)
fi
gocode="$go2/usr/share/gocode/src"
keep=$(mktemp)
printf '%s\n' "$needed" | grep "^$gocode/" | xargs -r -d '\n' realpath -e > "$keep"
find "$gocode" -type f -printf '%h\t%p\n' \
  | awk -F '\t' 'NR == FNR { keep[$0] = 1; next }
      !($1 in keep) && !($2 in keep) && $2 !~ /\/go\.mod$/ { print $2 }' "$keep" - \
  | xargs -r -d '\n' rm -f
find "$gocode" -mindepth 1 -type d -empty -delete
rm -f "$keep"
# The closure's commands (golang-x-tools and others) and documentation: nothing runs them.
rm -rf "$go2/usr/bin" "$go2/usr/share/doc"
# cosign, the peer of sealfs's image signatures (trixie's 2.5: key-based signatures in the
# classic sha256-HEX.sig layout by default; Depends only on libc6).
bash "$here/scripts/fetch-debian-packages.sh" trixie "$here/target/debian/cosign" cosign
