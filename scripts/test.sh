#!/usr/bin/env bash
# Runs every test of snapmount. Installs the Debian packages the tests use
# when they are missing (as root), or says which ones to install.
#   qemu-utils  qemu-img / qemu-io: build the test images and are the oracle
#   fuse3       fusermount3, for mounts by non-root users
#   e2fsprogs   mkfs.ext4 (-d) to put real filesystems into test images
#   util-linux  mount / losetup / partx for loop mounts of the served disks
#   fdisk       sfdisk, to write partition tables into test disks
#   dosfstools  mkfs.vfat, a FAT filesystem in a test partition
#   mtools      mcopy/mtype, to write and read it (kernels without vfat)
# and builds the HEXZ oracle, hexz-cli 0.8.2, into target/tools (once, a few
# minutes): the tests pack fresh archives with it (tests/common: hexz_bin),
# beside the committed fixtures it made (tests/fixtures/make-hexz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null && command -v mount >/dev/null && command -v partx >/dev/null || need+=(util-linux mount)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
command -v mtype >/dev/null || need+=(mtools)
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing Debian packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi
if [ ! -c /dev/fuse ]; then
    echo "/dev/fuse is missing: load the fuse module (modprobe fuse); the mount tests need it" >&2
    exit 1
fi
# rustup puts cargo in ~/.cargo/bin, which a root shell's PATH may lack.
export PATH="$PATH:$HOME/.cargo/bin"
command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }

export SNAPMOUNT_HEXZ="$PWD/target/tools/bin/hexz"
if ! "$SNAPMOUNT_HEXZ" --version 2>/dev/null | grep -qx 'hexz 0\.8\.2'; then
    echo "building hexz-cli 0.8.2 into target/tools (the HEXZ oracle; once)"
    cargo install hexz-cli --version 0.8.2 --locked --quiet --root target/tools \
        --no-default-features --features compression-zstd,encryption,signing
fi

cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo build --release --all-targets
cargo test --release -- --test-threads=2
