#!/usr/bin/env bash
# Fetches Debian packages from another suite of the machine's own Debian archive (e.g. sid's
# containerd 2.x on a Debian 12 node) and unpacks them into a private directory, without
# touching the system's apt setup or installing anything system-wide.
#
# Usage: bash scripts/fetch-debian-packages.sh [--closure REGEX] SUITE DEST PACKAGE...
#   SUITE    a suite of the archive the system's sources name (sid, trixie, ...)
#   DEST     directory to unpack into (DEST/usr/bin/..., as dpkg-deb -x lays it out)
#   --closure REGEX   also the packages PACKAGE... depend on, as far as their names match
#                     REGEX (e.g. '^golang-' for Go sources without the C libraries)
#
# The archive is the one in /etc/apt/sources.list(.d) (or $SEALFS_DEBIAN_MIRROR); apt checks
# the suite's signed Release file with the system's Debian keyring, and each .deb is checked
# against the SHA-256 the signed package index gives before it is unpacked. Downloads go to
# target/debian/SUITE (the project's scratch dir) and are deleted once unpacked; a stamp in
# DEST remembers each NAME=VERSION unpacked, which is not fetched again.
set -euo pipefail

closure=""
if [ "${1:-}" = "--closure" ]; then
  closure=$2
  shift 2
fi
if [ $# -lt 3 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
suite=$1 dest=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
state="$here/target/debian/$suite"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/debs" "$dest/.sealfs-stamps"

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

# NAME=VERSION of every package to fetch: the ones named, or their closure (what apt would
# install on a system with nothing installed) filtered by name.
if [ -n "$closure" ]; then
  mapfile -t wanted < <(apt-get "${apt_options[@]}" install -s --no-install-recommends "$@" \
    | awk '/^Inst /{gsub(/[()]/, "", $3); print $2 "=" $3}' | grep -E "${closure//^/^}" || true)
else
  wanted=()
  for package in "$@"; do
    version=$(apt-cache "${apt_options[@]}" show --no-all-versions "$package" 2>/dev/null \
      | sed -n 's/^Version: //p' | head -n 1)
    [ -n "$version" ] || { echo "fetch-debian-packages: $package not found in $suite" >&2; exit 1; }
    wanted+=("$package=$version")
  done
fi
if [ ${#wanted[@]} -eq 0 ]; then
  echo "fetch-debian-packages: nothing of $* found in $suite" >&2
  exit 1
fi

# Skip what DEST has at these versions; look the rest up in the index in one call.
missing=()
for entry in "${wanted[@]}"; do
  [ -e "$dest/.sealfs-stamps/${entry//\//_}" ] || missing+=("$entry")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
# One "FILENAME SHA256" line per package, from the signed index.
records=$(apt-cache "${apt_options[@]}" show "${missing[@]}" \
  | awk '/^Package: /{p=$2} /^Filename: /{f=$2} /^SHA256: /{print f, $2}')
to_download=()
while read -r filename sha256; do
  deb="$state/debs/$(basename "$filename")"
  [ -f "$deb" ] && echo "$sha256  $deb" | sha256sum --check --status || to_download+=("$deb")
done <<<"$records"
if [ ${#to_download[@]} -gt 0 ]; then
  (cd "$state/debs" && apt-get -q "${apt_options[@]}" download "${missing[@]}" >&2)
  # apt names a download NAME_EPOCH%3aVERSION_ARCH.deb; the pool (and the check below) has no
  # epoch in the name.
  for deb in "$state"/debs/*%3a*.deb; do
    [ -e "$deb" ] || continue
    mv -f "$deb" "$state/debs/$(basename "$deb" | sed 's/_[0-9]*%3a/_/')"
  done
fi
while read -r filename sha256; do
  deb="$state/debs/$(basename "$filename")"
  if ! echo "$sha256  $deb" | sha256sum --check --status; then
    echo "fetch-debian-packages: $deb does not match the SHA-256 of $suite's package index" >&2
    rm -f "$deb"
    exit 1
  fi
  dpkg-deb -x "$deb" "$dest"
  rm -f "$deb"
done <<<"$records"
for entry in "${missing[@]}"; do
  touch "$dest/.sealfs-stamps/${entry//\//_}"
done
echo "fetch-debian-packages: ${#missing[@]} package(s) from $suite unpacked in $dest" >&2
