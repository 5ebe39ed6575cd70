#!/usr/bin/env bash
# Builds the Debian package with dpkg-deb (no extra tools): the binary, the
# mount(8) helper link for `-t fuse.snapmount`, the man page, a systemd unit
# template and an example mount unit. Usage: packaging/build-deb.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/debian}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
arch="$(dpkg --print-architecture)"
cargo build --release --quiet

stage="$(mktemp -d)"
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 target/release/snapmount "$stage/usr/bin/snapmount"
strip --strip-debug "$stage/usr/bin/snapmount" 2>/dev/null || true
# mount(8) runs /sbin/mount.<type> for `-t fuse.snapmount`.
mkdir -p "$stage/sbin"
ln -s /usr/bin/snapmount "$stage/sbin/mount.fuse.snapmount"
install -D -m 0644 man/snapmount.1 "$stage/usr/share/man/man1/snapmount.1"
gzip -9n "$stage/usr/share/man/man1/snapmount.1"
install -D -m 0644 packaging/systemd/snapmount@.service "$stage/lib/systemd/system/snapmount@.service"
install -D -m 0644 packaging/systemd/mnt-vm.mount.example "$stage/usr/share/doc/snapmount/examples/mnt-vm.mount"
install -D -m 0644 README.md "$stage/usr/share/doc/snapmount/README.md"
mkdir -p "$stage/etc/snapmount"
cat > "$stage/usr/share/doc/snapmount/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: snapmount
License: MIT or Apache-2.0
COPY
installed_kb="$(du -sk "$stage" | cut -f1)"
mkdir -p "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CTRL
Package: snapmount
Version: $version
Architecture: $arch
Maintainer: snapmount developers <snapmount@localhost>
Installed-Size: $installed_kb
Depends: libc6
Recommends: fuse3
Section: utils
Priority: optional
Description: mount VM disk images and their snapshots read-only as raw files
 snapmount is a FUSE daemon that shows qcow2 images (with backing chains,
 compression and internal snapshots) and HEXZ archives as a read-only
 directory of raw disk images, one per snapshot and per backing image, for
 QEMU, loop mounts, cat and dd.
CTRL
mkdir -p "$out"
deb="$out/snapmount_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$deb"
