#!/usr/bin/env bash
# Adds sealfs to containerd's config: [proxy_plugins.sealfs], and for containerd 2.x the
# proxy plugin's remote-snapshot-annotations export and the transfer service's unpack
# configuration (snapshotter/packaging/containerd2-snippet.toml). Leaves a config that
# already names sealfs alone. The snippet follows the config file's version (2: containerd
# 1.6/1.7, 3: containerd 2.x); a new file gets the version of the containerd on PATH.
#
# Usage: bash scripts/configure-containerd.sh [CONFIG]   (CONFIG: /etc/containerd/config.toml)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
config=${1:-/etc/containerd/config.toml}
packaging="$here/snapshotter/packaging"

if ! command -v containerd >/dev/null; then
  echo "configure-containerd: containerd is not installed (apt-get install containerd)" >&2
  exit 1
fi
# `containerd github.com/containerd/containerd[/v2] X.Y.Z ...`
major=$(containerd --version | awk '{print $3}' | sed 's/^v//; s/\..*//')
case "$major" in
  1) wanted=2 ;;
  2) wanted=3 ;;
  *) echo "configure-containerd: unknown containerd version: $(containerd --version)" >&2; exit 1 ;;
esac

if [ -e "$config" ] && grep -q '^\[proxy_plugins\.sealfs\]' "$config"; then
  echo "$config already has [proxy_plugins.sealfs]"
  exit 0
fi
mkdir -p "$(dirname "$config")"
if [ ! -s "$config" ]; then
  echo "version = $wanted" > "$config"
fi
version=$(sed -n 's/^version *= *\([0-9]*\).*/\1/p' "$config" | head -n 1)
case "$version" in
  3) snippet="$packaging/containerd2-snippet.toml" ;;
  2) snippet="$packaging/containerd-snippet.toml" ;;
  *)
    echo "configure-containerd: $config has no 'version = 2' or 'version = 3' line; add sealfs by hand (docs/configuration.md)" >&2
    exit 1
    ;;
esac
if [ "$version" = 3 ] && grep -q 'io.containerd.transfer.v1.local' "$config"; then
  echo "configure-containerd: $config configures the transfer service already; add the" >&2
  echo "  sealfs unpack_config of $snippet to it by hand" >&2
  exit 1
fi
{ echo; cat "$snippet"; } >> "$config"
echo "added [proxy_plugins.sealfs] (config version $version, containerd $major.x) to $config"
if [ "$major" = 2 ] && [ "$version" = 2 ]; then
  echo "note: containerd 2.x reads this version-2 config, but lazy pulls through its transfer" >&2
  echo "  service (plain ctr image pull, CRI) need the version-3 settings in $packaging/containerd2-snippet.toml" >&2
fi
