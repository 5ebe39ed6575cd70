#!/usr/bin/env bash
# benches/remote/get-qemu-curl.sh — QEMU's curl block module (driver=http/https)
# for the installed qemu-utils, unpacked privately: prints the directory to
# use as QEMU_MODULE_DIR.
#
# qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1 (bookworm-backports) ships no
# block-curl.so, and bookworm's qemu-block-extra is 7.2 (it Depends on
# qemu-utils = 7.2: installing it would downgrade QEMU). The matching
# qemu-block-extra is in bookworm-backports on the same mirror. A private apt
# state (lists, cache and sources under the cache dir) downloads it without
# touching the system's apt configuration; dpkg -x unpacks it. Fetched once,
# cached in $REPO/target/bench-tools/qemu-curl (see /work/shared/research/remote.md §6).
set -Eeuo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
D=${QEMU_CURL_DIR:-$REPO/target/bench-tools/qemu-curl}
VERSION=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
[[ -n $VERSION ]] || { echo "qemu-utils is not installed" >&2; exit 1; }
MODDIR=$D/x/usr/lib/x86_64-linux-gnu/qemu
if [[ -f $MODDIR/block-curl.so && $(cat "$D/version" 2>/dev/null) == "$VERSION" ]]; then
    echo "$MODDIR"
    exit 0
fi
rm -rf "$D"
mkdir -p "$D/src" "$D/lists/partial" "$D/cache/archives/partial" "$D/x"
# The system's mirror and key, the backports suite.
src=$(grep -l -E '^Suites:.*\bbookworm\b' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 || true)
uris=http://deb.debian.org/debian
key=/usr/share/keyrings/debian-archive-keyring.gpg
if [[ -n $src ]]; then
    uris=$(awk '/^URIs:/ { print $2; exit }' "$src")
    key=$(awk '/^Signed-By:/ { print $2; exit }' "$src")
fi
cat >"$D/src/backports.sources" <<SRC
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main
Signed-By: $key
SRC
APT=(apt-get -q -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$D/src"
     -o Dir::State::Lists="$D/lists" -o Dir::Cache="$D/cache" -o Debug::NoLocking=1)
"${APT[@]}" update >"$D/apt.log" 2>&1 || { cat "$D/apt.log" >&2; exit 1; }
(cd "$D" && "${APT[@]}" download "qemu-block-extra=$VERSION") >>"$D/apt.log" 2>&1 \
    || { echo "cannot download qemu-block-extra=$VERSION (see $D/apt.log)" >&2; exit 1; }
dpkg -x "$D"/qemu-block-extra_*.deb "$D/x"
[[ -f $MODDIR/block-curl.so ]] || { echo "no block-curl.so in $D/x" >&2; exit 1; }
echo "$VERSION" >"$D/version"
echo "$MODDIR"
