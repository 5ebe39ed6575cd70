#!/usr/bin/env bash
# A quick look at export (issue 14 wants rows in compare.sh; until then):
# snapmount export against qemu-img convert on the remote benchmark's 1 GiB
# image (benches/remote.sh makes it), zstd, zlib and uncompressed, with and
# without the final flush, source in the page cache, output on the same disk.
# Needs bc. Prints one line per repetition: seconds for each tool.
set -euo pipefail
SM=${SNAPMOUNT:-$(cd "$(dirname "$0")/.." && pwd)/target/release/snapmount}
D=${BENCH_DIR:-/tmp/expbench}; mkdir -p "$D"; cd "$D"
[ -f src.raw ] || qemu-img convert -O raw ${IMG:-/tmp/smremote/data/img.qcow2} src.raw
[ -f zstd.qcow2 ] || cp ${IMG:-/tmp/smremote/data/img.qcow2} zstd.qcow2
[ -f zlib.qcow2 ] || qemu-img convert -c -O qcow2 -o cluster_size=64k src.raw zlib.qcow2
[ -f plain.qcow2 ] || qemu-img convert -O qcow2 -o cluster_size=64k src.raw plain.qcow2
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $s" | bc; }
for img in zstd zlib plain; do
  cat $img.qcow2 > /dev/null
  for rep in 1 2 3; do
    rm -f out.raw; sync
    a=$(t qemu-img convert -t writeback -O raw $img.qcow2 out.raw); rm -f out.raw; sync
    b=$(t $SM export $img.qcow2 out.raw); cmp out.raw src.raw; rm -f out.raw; sync
    c=$(t qemu-img convert -O raw $img.qcow2 out.raw); rm -f out.raw; sync
    d=$(t $SM export --no-sync $img.qcow2 out.raw); rm -f out.raw; sync
    echo "$img rep$rep qemu-img-wb=$a snapmount=$b qemu-img=$c snapmount-nosync=$d"
  done
done
