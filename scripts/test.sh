#!/usr/bin/env bash
# The test command: installs what the tests need, runs every test of the workspace (real
# umoci images, real tars, containerd 1.6, a registry), the containerd end-to-end tests again
# against containerd 2.x, builds and briefly runs the fuzz targets, runs the start-up
# benchmark's smoke test and the demo.
# In CI (CI set) a missing prerequisite fails the tests instead of skipping them.
#
# Usage: bash scripts/test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/install-deps.sh
# cosign (unpacked privately by install-deps.sh) for the signature tests.
export PATH="$here/target/debian/cosign/usr/bin:$PATH"

# A test that hangs (a FUSE read no daemon will answer, say) must fail the run with its name,
# not hold CI until its own limit: each test run has a time limit far above its usual time.
bounded() {
  local minutes=$1 status=0
  shift
  timeout --kill-after=60 "${minutes}m" "$@" || status=$?
  if [ "$status" -eq 124 ]; then
    echo "error: '$*' ran past $minutes minutes: a test hangs (the last 'has been running for over 60 seconds' line above names it)" >&2
  fi
  return "$status"
}

echo "==> cargo test --workspace (containerd $(containerd --version | awk '{print $3}'))"
bounded 45 cargo test --workspace

# The end-to-end tests through containerd again, against containerd 2.x (unpacked by
# install-deps.sh): its containerd, ctr and shim come first on PATH, and the harness writes a
# version-3 config with the snippet operators install.
containerd2="$here/target/debian/containerd2/usr/bin"
echo "==> end-to-end tests against containerd $("$containerd2/containerd" --version | awk '{print $3}')"
PATH="$containerd2:$PATH" bounded 20 cargo test -p sealfs-tools --test snapshotter --test restart --test signatures --test cri --test keyproviders

# containerd's own snapshotter conformance suites against containerd-sealfs-grpc, through
# containerd's proxy snapshotter client (Go in GOPATH mode on Debian's packaged sources, no
# module downloads): 1.6's with Debian 12's Go, 2.x's with sid's Go 1.27.
echo "==> containerd snapshotter conformance suites (1.6 and 2.x)"
export SEALFS_DAEMON="$here/target/debug/containerd-sealfs-grpc"
(
  cd tests/conformance
  GO111MODULE=off GOPATH="$PWD:/usr/share/gocode" go test -count=1 -v sealfs.test/conformance \
    | grep -E '^(\s*--- |ok|FAIL|PASS)'
  go2="$here/target/debian/go2"
  GO111MODULE=off GOPATH="$PWD:$go2/usr/share/gocode" GOROOT="$go2/usr/lib/go-1.27" \
    "$go2/usr/lib/go-1.27/bin/go" test -count=1 -v sealfs.test/conformance2 \
    | grep -E '^(\s*--- |ok|FAIL|PASS)'
)
unset SEALFS_DAEMON

echo "==> fuzz targets (build, then ${SEALFS_FUZZ_SECONDS:=15}s each)"
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked --quiet
fi
# cargo-fuzz passes nightly-only flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
(
  cd fsformat
  cargo fuzz build -O
  seeds=$(mktemp -d)
  printf 'hello\n' > "$seeds/hello"
  tar -C "$seeds" -cf "$seeds/seed.tar" hello
  for target in tail index seal_tar stanza; do
    mkdir -p "fuzz/corpus/$target"
    # The sealer starts from a good tar and from every negative vector (tests/vectors).
    [ "$target" = seal_tar ] && cp "$seeds/seed.tar" tests/vectors/*.tar fuzz/corpus/seal_tar/
    cargo fuzz run -O "$target" -- -max_total_time="$SEALFS_FUZZ_SECONDS" 2>&1 | grep -E '^(Done|INFO: seed)|ERROR|panicked' || true
    [ -z "$(ls -A fuzz/artifacts/$target 2>/dev/null)" ] || { echo "fuzz target $target found a crash" >&2; exit 1; }
  done
)
unset RUSTC_BOOTSTRAP

# Each smoke test's work directory (images, registries, node state: up to ~1 GB) is deleted once
# it passed, so repeated runs do not fill the disk; --one-file-system leaves anything still
# mounted alone (and says so).
remove_work() {
  rm -rf --one-file-system "$1" 2>/dev/null || echo "note: $1 not fully removed: something is still mounted in it" >&2
}
smoke() {
  local work
  work=$(mktemp -d "/var/tmp/sealfs-$1.XXXXXX")
  shift
  "$@" --work "$work"
  remove_work "$work"
}
echo "==> start-up benchmark smoke test (perf startup --quick: the harness works; no timing asserted)"
cargo build --quiet -p perf -p sealfs-tools
smoke perf-quick target/debug/perf startup --quick
echo "==> layer-scale benchmark smoke test (perf layers --quick)"
smoke perf-layers target/debug/perf layers --quick
echo "==> fleet mirror benchmark smoke test (perf mirror --quick: 3 nodes, origin and pull-through mirror)"
smoke perf-mirror target/debug/perf mirror --quick

echo "==> demo (the README's main job)"
demo=$(mktemp -d /tmp/sealfs-demo.XXXXXX)
SEALFS_SKIP_DEPS=1 bash scripts/demo.sh "$demo"
remove_work "$demo"
echo "all tests passed"
