#!/usr/bin/env bash
# The test command: installs what the tests need, runs every test of the workspace (real
# umoci images, real tars, containerd, a registry), builds and briefly runs the fuzz targets,
# runs the start-up benchmark's smoke test and the demo.
# In CI (CI set) a missing prerequisite fails the tests instead of skipping them.
#
# Usage: bash scripts/test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/install-deps.sh

echo "==> cargo test --workspace"
cargo test --workspace

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
  for target in tail index seal_tar; do
    mkdir -p "fuzz/corpus/$target"
    # The sealer starts from a good tar and from every negative vector (tests/vectors).
    [ "$target" = seal_tar ] && cp "$seeds/seed.tar" tests/vectors/*.tar fuzz/corpus/seal_tar/
    cargo fuzz run -O "$target" -- -max_total_time="$SEALFS_FUZZ_SECONDS" 2>&1 | grep -E '^(Done|INFO: seed)|ERROR|panicked' || true
    [ -z "$(ls -A fuzz/artifacts/$target 2>/dev/null)" ] || { echo "fuzz target $target found a crash" >&2; exit 1; }
  done
)
unset RUSTC_BOOTSTRAP

echo "==> start-up benchmark smoke test (perf startup --quick: the harness works; no timing asserted)"
cargo build --quiet -p perf -p sealfs-tools
target/debug/perf startup --quick --work "$(mktemp -d /var/tmp/sealfs-perf-quick.XXXXXX)"

echo "==> demo (the README's main job)"
SEALFS_SKIP_DEPS=1 bash scripts/demo.sh "$(mktemp -d /tmp/sealfs-demo.XXXXXX)"
echo "all tests passed"
