#!/usr/bin/env bash
# Fetches Debian packages from another suite of the machine's own Debian archive (e.g. sid's
# containerd 2.x on a Debian 12 node) and unpacks them into a private directory, without
# touching the system's apt setup or installing anything system-wide.
#
# Usage: bash scripts/fetch-debian-packages.sh SUITE DEST PACKAGE...
#   SUITE    a suite of the archive the system's sources name (sid, trixie, ...)
#   DEST     directory to unpack into (DEST/usr/bin/..., as dpkg-deb -x lays it out)
#
# The archive is the one in /etc/apt/sources.list(.d) (or $SEALFS_DEBIAN_MIRROR); apt checks
# the suite's signed Release file with the system's Debian keyring, and each .deb is checked
# against the SHA-256 the signed package index gives before it is unpacked. Downloads are
# cached under target/debian/SUITE (the project's scratch dir); a package whose version is
# already unpacked in DEST is not fetched again.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
suite=$1 dest=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
state="$here/target/debian/$suite"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/debs" "$dest"

mirror=${SEALFS_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # The first Debian archive (not debian-security) the system's sources name.
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | grep -v security | head -n 1 | tr -d ' ' || true)
fi
if [ -z "$mirror" ]; then
  echo "fetch-debian-packages: no Debian archive found in /etc/apt/sources.list*; set SEALFS_DEBIAN_MIRROR" >&2
  exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] $mirror $suite main" > "$state/sources.list"
: > "$state/status" # an empty dpkg status: nothing counts as installed
apt_options=(
  -o "Dir::Etc::sourcelist=$state/sources.list"
  -o "Dir::Etc::sourceparts=/nonexistent"
  -o "Dir::State::Lists=$state/lists"
  -o "Dir::Cache=$state/cache"
  -o "Dir::State::status=$state/status"
  -o "APT::Sandbox::User=root"
)

# Refresh the index at most once a day: it is only needed to find new versions.
if [ -z "$(find "$state/lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -n 1)" ]; then
  apt-get -q "${apt_options[@]}" update >&2
fi

for package in "$@"; do
  fields=$(apt-cache "${apt_options[@]}" show --no-all-versions "$package")
  version=$(sed -n 's/^Version: //p' <<<"$fields" | head -n 1)
  sha256=$(sed -n 's/^SHA256: //p' <<<"$fields" | head -n 1)
  filename=$(sed -n 's/^Filename: //p' <<<"$fields" | head -n 1)
  if [ -z "$version" ] || [ -z "$sha256" ] || [ -z "$filename" ]; then
    echo "fetch-debian-packages: $package not found in $suite" >&2
    exit 1
  fi
  stamp="$dest/.sealfs-$package.version"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    continue
  fi
  deb="$state/debs/$(basename "$filename")"
  if [ ! -f "$deb" ] || ! echo "$sha256  $deb" | sha256sum --check --status; then
    (cd "$state/debs" && apt-get -q "${apt_options[@]}" download "$package=$version" >&2)
  fi
  if ! echo "$sha256  $deb" | sha256sum --check --status; then
    echo "fetch-debian-packages: $deb does not match the SHA-256 of $suite's package index" >&2
    rm -f "$deb"
    exit 1
  fi
  dpkg-deb -x "$deb" "$dest"
  echo "$version" > "$stamp"
  echo "fetch-debian-packages: $package $version ($suite) in $dest" >&2
done
