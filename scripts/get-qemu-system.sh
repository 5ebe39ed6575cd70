#!/usr/bin/env bash
# Unpacks Debian's qemu-system-x86 into target/qemu-system/ without
# installing it: installing it would remove the machine's newer qemu-utils
# (see ../shared/notes/qemu-system.md). Installs only the shared libraries it
# needs. Prints the directory. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$PWD/target/qemu-system"
bin="$dir/root/usr/bin/qemu-system-x86_64"
if [ ! -x "$bin" ]; then
    mkdir -p "$dir"
    (cd "$dir" && rm -f ./*.deb && apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data seabios >/dev/null \
        && for f in *.deb; do dpkg -x "$f" root; done)
fi
libs=(libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2)
if ! dpkg -s "${libs[@]}" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${libs[@]}" >/dev/null
fi
echo "$dir"
