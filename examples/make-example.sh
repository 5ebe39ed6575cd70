#!/usr/bin/env bash
# Builds two small example images next to this script (no root needed):
#
#   vm-base.qcow2  zstd-compressed qcow2 holding an ext4 filesystem with a few text files
#                  (made with `mkfs.ext4 -d`, i.e. populated without mounting anything)
#   vm.qcow2       an overlay: backing file "vm-base.qcow2" (relative name, -F qcow2) holding
#                  only the blocks changed afterwards (a new file, an edited file, a removed file)
#
# Needs only qemu-utils (qemu-img, qemu-io) and e2fsprogs (mkfs.ext4, debugfs).
# Idempotent: re-running rebuilds both images from scratch. Total size well under 5 MiB.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

for tool in qemu-img qemu-io mkfs.ext4 debugfs cmp; do
    if ! command -v "$tool" >/dev/null 2>&1 && ! [ -x "/sbin/$tool" ] && ! [ -x "/usr/sbin/$tool" ]; then
        echo "make-example.sh: '$tool' not found; install qemu-utils and e2fsprogs (apt-get install qemu-utils e2fsprogs)" >&2
        exit 1
    fi
done
export PATH="$PATH:/sbin:/usr/sbin"

work="$(mktemp -d "${TMPDIR:-/tmp}/snapmount-example.XXXXXX")"
trap 'rm -rf "$work"' EXIT

size=64M
uuid=3b9c1f0e-5a7d-4c2e-8f61-0d2a4b6c8e10
cluster=65536
# Fixed timestamps/UUID so that both passes lay out the filesystem the same way.
export E2FSPROGS_FAKE_TIME=1700000000

# --- 1. the files of the "VM" -------------------------------------------------------------
root="$work/root"
mkdir -p "$root/etc" "$root/home/alice/notes" "$root/var/log"
echo "example-vm" > "$root/etc/hostname"
printf 'Welcome to the snapmount example VM.\nThis file lives in vm-base.qcow2.\n' > "$root/etc/motd"
for i in 1 2 3 4 5; do
    {
        echo "Note $i"
        for j in $(seq 1 40); do echo "line $j of note $i: the quick brown fox jumps over the lazy dog"; done
    } > "$root/home/alice/notes/note$i.txt"
done
seq 1 2000 | sed 's/^/boot: service started, id=/' > "$root/var/log/boot.log"

# --- 2. base: ext4 in a raw file, then a zstd-compressed qcow2 ------------------------------
base_raw="$work/base.raw"
rm -f "$base_raw"
truncate -s "$size" "$base_raw"
mkfs.ext4 -q -F -U "$uuid" -E "hash_seed=$uuid" -L example-vm -d "$root" "$base_raw"

rm -f vm-base.qcow2 vm.qcow2
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=$cluster "$base_raw" vm-base.qcow2

# --- 3. changes: edit the filesystem image with debugfs (no mount needed) -----------------
top_raw="$work/top.raw"
cp "$base_raw" "$top_raw"
printf 'This file was added later: it lives only in the overlay vm.qcow2.\n' > "$work/added.txt"
printf 'Welcome to the snapmount example VM.\nThis line was changed in the overlay.\n' > "$work/motd.new"
debugfs -w -f - "$top_raw" >/dev/null 2>&1 <<EOF
write $work/added.txt /home/alice/added-later.txt
rm /etc/motd
write $work/motd.new /etc/motd
rm /home/alice/notes/note3.txt
EOF

# --- 4. overlay: write only the clusters that differ into vm.qcow2 ------------------------
qemu-img create -q -f qcow2 -o cluster_size=$cluster -b vm-base.qcow2 -F qcow2 vm.qcow2
blocks="$(cmp -l "$base_raw" "$top_raw" | awk -v cs=$cluster '{ print int(($1 - 1) / cs) }' | uniq | sort -un || true)"
if [ -z "$blocks" ]; then
    echo "make-example.sh: debugfs changed nothing?" >&2
    exit 1
fi
args=()
for b in $blocks; do
    dd if="$top_raw" of="$work/blk$b" bs=$cluster skip="$b" count=1 status=none
    args+=(-c "write -s $work/blk$b $((b * cluster)) $cluster")
done
# An internal snapshot of the disk as it was before the edits, so the mount
# also shows snapshots/before-edits/.
qemu-img snapshot -c before-edits vm.qcow2
qemu-io "${args[@]}" vm.qcow2 >/dev/null

# --- boot.qcow2: a tiny bootable disk kept in an internal snapshot -------------------------
# Its boot sector prints SNAPMOUNT-BOOT-OK on the serial port and halts. The
# snapshot "bootable" holds it; the current state has it wiped, so only the
# snapshot view boots.
rm -f boot.qcow2
{
    printf '\x31\xc0\x8e\xd8\xba\xf8\x03\xbe\x16\x7c\xac\x84\xc0\x74\x03\xee\xeb\xf8\xfa\xf4\xeb\xfc'
    printf 'SNAPMOUNT-BOOT-OK\r\n\0'
    head -c 468 /dev/zero
    printf '\x55\xaa'
    head -c $((1024 * 1024 - 512)) /dev/zero
} > "$work/boot.raw"
qemu-img convert -q -f raw -O qcow2 "$work/boot.raw" boot.qcow2
qemu-img snapshot -c bootable boot.qcow2
qemu-io -c 'write -z 0 64k' boot.qcow2 >/dev/null

# --- 5. check with qemu itself -------------------------------------------------------------
qemu-img compare -q -f raw -F qcow2 "$top_raw" vm.qcow2
qemu-img compare -q -f raw -F qcow2 "$base_raw" vm-base.qcow2

echo "Built in $here:"
ls -l vm-base.qcow2 vm.qcow2 | sed 's/^/  /'
echo "  on disk: $(du -ch vm-base.qcow2 vm.qcow2 | tail -n 1 | cut -f1)  ($(echo "$blocks" | wc -w) changed ${cluster}-byte clusters in vm.qcow2)"
cat <<EOF

Mount it (the daemon returns once the mount is live):
  mkdir -p /tmp/snapmount-example
  snapmount mount $here/vm.qcow2 /tmp/snapmount-example      # or: cargo run --release -- mount ...
  ls /tmp/snapmount-example/vm.qcow2/                         # backing  disk.raw  info.json  snapshots
  # as root, look inside the filesystem:
  mkdir -p /tmp/vm-root && mount -o loop,ro /tmp/snapmount-example/vm.qcow2/disk.raw /tmp/vm-root
  cat /tmp/vm-root/etc/motd /tmp/vm-root/home/alice/added-later.txt
  umount /tmp/vm-root
  # the disk before the edits, from the internal snapshot:
  mount -o loop,ro /tmp/snapmount-example/vm.qcow2/snapshots/before-edits/disk.raw /tmp/vm-root
  cat /tmp/vm-root/etc/motd; umount /tmp/vm-root
  snapmount umount /tmp/snapmount-example
EOF
