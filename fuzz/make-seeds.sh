#!/usr/bin/env bash
# Makes the fuzz corpora's seeds with the real tools, small enough to run
# fast: qcow2 images in the shapes qemu-img 10 writes (v2 and v3, small and
# large clusters, zlib and zstd compression, extended L2, internal
# snapshots, backing files by relative name, an external data file) and the
# committed HEXZ fixtures (made by hexz-cli 0.8.2). Also remakes assets/,
# base.qcow2, one of the neighbours every input sits beside (with base.raw
# and base.hxz), which the seeds name as backing file or parent.
#   fuzz/make-seeds.sh          -> fuzz/corpus/{image_qcow2,image_hexz,headers,remote,...}
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

q() { qemu-img "$@" >/dev/null; }
w() { qemu-io -f qcow2 "$@" >/dev/null; }

# Neighbours: a 1 MiB raw base (the same bytes src/lib.rs makes) and a
# qcow2 base with a pattern.
python3 -c "import sys; sys.stdout.buffer.write(bytes((i*7+i//4096)%251 for i in range(1<<20)))" > base.raw
q create -f qcow2 -o cluster_size=4096 base.qcow2 1M
w -c "write -P 0x11 0 256k" -c "write -P 0x22 512k 64k" base.qcow2

n=0
seed() { n=$((n+1)); cp "$1" "$here/corpus/image_qcow2/$(printf '%02d' $n)-$2"; }
mkdir -p "$here/corpus/image_qcow2" "$here/corpus/image_hexz" "$here/corpus/headers" "$here/assets"

for cl in 512 4096 65536; do
    q create -f qcow2 -o cluster_size=$cl a.qcow2 2M
    w -c "write -P 0x5a 0 8k" -c "write -z 64k 16k" -c "write -P 0x33 1M 4k" a.qcow2
    seed a.qcow2 "plain-$cl"
done
q create -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 1M
w -c "write -P 1 0 12k" v2.qcow2
seed v2.qcow2 v2
for c in zlib zstd; do
    q create -f qcow2 -o cluster_size=4096,compression_type=$c c.qcow2 1M
    w -c "write -c -P 0x41 0 4k" -c "write -c -P 0x42 8k 4k" -c "write -P 0x43 16k 4k" c.qcow2
    seed c.qcow2 "compressed-$c"
done
q create -f qcow2 -o cluster_size=16384,extended_l2=on x.qcow2 1M
w -c "write -P 7 0 2k" -c "write -z 4k 1k" -c "write -P 8 20k 3k" x.qcow2
seed x.qcow2 extended-l2
q create -f qcow2 -o cluster_size=4096 s.qcow2 1M
w -c "write -P 1 0 8k" s.qcow2
q snapshot -c first s.qcow2
w -c "write -P 2 4k 8k" s.qcow2
q snapshot -c second s.qcow2
seed s.qcow2 snapshots
q create -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 o.qcow2 1M
w -c "write -P 9 4k 4k" o.qcow2
seed o.qcow2 overlay-qcow2
q create -f qcow2 -o cluster_size=16384,extended_l2=on -b base.raw -F raw o.qcow2 1M
w -c "write -P 9 6k 1k" o.qcow2
seed o.qcow2 overlay-raw-extended
q create -f qcow2 -o cluster_size=4096,data_file=base.raw,data_file_raw=on d.qcow2 1M
seed d.qcow2 data-file

cp base.qcow2 "$here/assets/"
fx="$here/../tests/fixtures/hexz"
for f in boot child grand tree tar encrypted signed; do cp "$fx/$f.hxz" "$here/corpus/image_hexz/$f.hxz"; done
# headers: small disks with partition tables (GPT with its backup; MBR with
# a chain of logical partitions), and the first 4 KiB of every seed.
truncate -s 256K gpt.disk mbr.disk
printf 'label: gpt\n\nsize=64K, name=a\nsize=32K\n\n' | sfdisk -q gpt.disk
printf 'label: dos\n\nsize=32K, type=83\ntype=5\nsize=32K, type=83\nsize=32K, type=82\n\n' | sfdisk -q mbr.disk
cp gpt.disk mbr.disk "$here/corpus/headers/"
# VeridianOS: the research note's golden vectors (a snapshot with registers
# and two pages; the 86-byte migration stream).
mkdir -p "$here/corpus/image_vmsn" "$here/corpus/image_migration"
python3 - "$here/corpus" <<'PY'
import struct, sys
out = sys.argv[1]
h = bytes.fromhex("4e534d5601000000010000000000000002000000000000000004000000000000"
                  "0400000000000000c02100000000000040e2010000000000c8944c5600000000")
d = b"".join(struct.pack("<IIQQ", *t) for t in [(2, 0, 0, 144), (2, 1, 0, 144), (4, 0, 0, 4096), (4, 0, 0, 4096)])
open(out + "/image_vmsn/golden", "wb").write(h + d + bytes(range(144)) * 2 + b"\x5a" * 8192)
m = bytes.fromhex("494d4551" "03000000" "24000000" "1a000000" "02000000" "00000000"
                  "02000000" "0000001000000000" "7856341200000000" "04000000" "01020304" "04000000" "05060708"
                  "04000000" "75617274" "02000000" "aabb" "03000000" "706963" "01000000" "cc")
open(out + "/image_migration/golden", "wb").write(m)
PY
for f in "$here"/corpus/image_qcow2/* "$here"/corpus/image_hexz/*; do
    head -c 4096 "$f" > "$here/corpus/headers/$(basename "$f")"
done
# remote: what servers and remote images say (listing pages, headers, names).
mkdir -p "$here/corpus/remote"
printf '%s' '<?xml version="1.0"?><ListBucketResult><Name>b</Name><IsTruncated>true</IsTruncated><NextContinuationToken>t</NextContinuationToken><Contents><Key>vm/a.qcow2</Key></Contents><CommonPrefixes><Prefix>vm/x/</Prefix></CommonPrefixes></ListBucketResult>' > "$here/corpus/remote/listing"
printf '%s' 'bytes 0-262143/1073741824' > "$here/corpus/remote/content-range"
printf '%s' 'Wed, 21 Oct 2026 07:28:00 GMT' > "$here/corpus/remote/retry-after"
printf '%s' '../base/my disk.qcow2' > "$here/corpus/remote/relative"
printf '%s' 's3://bucket/x/../y' > "$here/corpus/remote/absolute"
printf '%s' 'http://h:8080/a/./b/../c?q#f' > "$here/corpus/remote/url"
echo "seeds: $(ls "$here"/corpus/* | wc -l) files in $here/corpus"
