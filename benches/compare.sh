#!/usr/bin/env bash
# benches/compare.sh — snapmount against its peers, on the same images, on
# this machine, in one run.
#
#   sudo benches/compare.sh                        # full run: 1 GiB images, 3 repetitions
#   BENCH_SIZE=256M BENCH_REPEAT=1 benches/compare.sh   # quick look
#
# Peers: qemu-storage-daemon's FUSE export (qcow2), `hexz mount` (HEXZ), a
# zero-serving FUSE filesystem (examples/zerofs.rs: the FUSE transport alone,
# the ceiling for any daemon) and the raw source file read without FUSE
# (disk and page-cache speed).
#
# Environment (all optional):
#   BENCH_DIR      scratch dir (default: a new /tmp/snapmount-bench.XXXXXX). Data
#                  generated there is reused by the next run with the same BENCH_SIZE.
#   BENCH_SIZE     size of the test disk (default 1G; K/M/G suffixes)
#   BENCH_REPEAT   repetitions of every throughput measurement (default 3; medians)
#   BENCH_MOUNT_REPEAT  repetitions of every mount-time measurement (default 5)
#   BENCH_RUNTIME  seconds per random-read fio run (default 10)
#   BENCH_WARM_PASSES   warm buffered re-reads, each a new open (default 5)
#   BENCH_CACHE    snapmount --cache-size for every measurement (default 256M)
#   BENCH_KEEP     1: keep the scratch dir (the default when BENCH_DIR is given)
#   BENCH_IMAGES   images whose reads are measured (default: qcow2-raw qcow2-zlib
#                  qcow2-zstd qcow2-luks hexz-lz4 hexz-zstd); BENCH_MOUNT_REPEAT=0
#                  skips the mount times
#   BENCH_EXPORT   1 (the default): also `snapmount export` against `qemu-img
#                  convert` of every qcow2 image; 0 skips it
#   BENCH_REMOTE   1 (the default): also the remote rows, over a link made on
#                  this machine (benches/remote.sh, same snapmount binary,
#                  scratch dir $BENCH_DIR/remote, its report appended); 0 skips them
#
# Output: one markdown table on stdout, also written to $BENCH_DIR/results.md
# with the targets and every sample; raw samples in $BENCH_DIR/results.tsv.
# Needs root (drop_caches, mounts) and /dev/fuse.
set -Eeuo pipefail
export LC_ALL=C   # '.' as the decimal point in $EPOCHREALTIME and printf

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS=$REPO/benches/compare
# The binaries are copied here after the build: src/ may be rebuilt while
# this runs, and every sample must come from the same snapmount.
SNAPMOUNT=
ZEROFS=

BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_REPEAT=${BENCH_REPEAT:-3}
BENCH_MOUNT_REPEAT=${BENCH_MOUNT_REPEAT:-5}
BENCH_RUNTIME=${BENCH_RUNTIME:-10}
BENCH_WARM_PASSES=${BENCH_WARM_PASSES:-5}
BENCH_CACHE=${BENCH_CACHE:-256M}
BENCH_IMAGES=${BENCH_IMAGES:-qcow2-raw qcow2-zlib qcow2-zstd qcow2-luks hexz-lz4 hexz-zstd}
if [[ -n ${BENCH_DIR:-} ]]; then
    BENCH_KEEP=${BENCH_KEEP:-1}
    mkdir -p "$BENCH_DIR"
    BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
else
    BENCH_KEEP=${BENCH_KEEP:-0}
    BENCH_DIR=$(mktemp -d /tmp/snapmount-bench.XXXXXX)
fi
DATA=$BENCH_DIR/data
MNT=$BENCH_DIR/mnt
LOGS=$BENCH_DIR/logs
RESULTS=$BENCH_DIR/results.tsv
REPORT=$BENCH_DIR/results.md
BYTES=$(numfmt --from=iec "$BENCH_SIZE")
CACHE_BYTES=$(numfmt --from=iec "$BENCH_CACHE")

# One mountpoint per tool, all inside the scratch dir: the cleanup and the
# daemon pid lookups (pgrep on the mountpoint path) can never touch anything
# that this script did not start.
MNT_SNAP=$MNT/snapmount
MNT_QSD=$MNT/qsd.raw        # QSD exports onto a regular file
MNT_HEXZ=$MNT/hexz
MNT_ZERO=$MNT/zerofs

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup --

is_mounted() { grep -qF " $1 fuse" /proc/mounts; }

# Every daemon this script started, by pid (so cleanup kills exactly those).
declare -a DAEMONS=()
SAMPLER_PID=

cleanup() {
    local rc=$? m pid
    set +e
    for pid in "${DAEMONS[@]}" "$SAMPLER_PID"; do
        [[ -n $pid ]] && kill "$pid" 2>/dev/null
    done
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ" "$MNT_ZERO"; do
        is_mounted "$m" || continue
        umount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    sleep 0.2
    for pid in "${DAEMONS[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    done
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ" "$MNT_ZERO"; do
        is_mounted "$m" && umount -l "$m" 2>/dev/null
    done
    if [[ $BENCH_KEEP != 1 && $rc == 0 ]]; then
        # Keep the report; the data is large and cheap to regenerate.
        rm -rf "$DATA" "$MNT" "$BENCH_DIR/bin"
    fi
    if [[ $rc != 0 ]]; then
        log "failed (exit $rc); logs in $LOGS, scratch dir $BENCH_DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------- preflight --

preflight() {
    [[ $(id -u) == 0 ]] || die "run as root (drop_caches and mounts need it)"
    [[ -c /dev/fuse ]] || die "/dev/fuse is missing"
    local t
    for t in qemu-img qemu-io qemu-storage-daemon python3 numfmt pgrep cargo; do
        command -v "$t" >/dev/null || die "$t is not installed"
    done
    if ! command -v fio >/dev/null; then
        log "installing fio"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; } >"$LOGS/apt.log" 2>&1 \
            || die "cannot install fio (see $LOGS/apt.log)"
    fi
    # hexz-cli 0.8.2 with its FUSE part (for `hexz mount`): HEXZ=..., else
    # one on PATH, else the one benches/remote.sh builds, else ~/.cargo/bin;
    # the test command's copy in target/tools has no FUSE part, enough only
    # when no HEXZ image is read.
    local built=$REPO/target/bench-tools/hexz-fuse/bin/hexz
    [[ -x $built ]] || built=/root/.cargo/bin/hexz
    HEXZ=${HEXZ:-$(command -v hexz || echo "$built")}
    if [[ ! -x $HEXZ && $BENCH_IMAGES != *hexz* ]]; then HEXZ=$REPO/target/tools/bin/hexz; fi
    [[ -x $HEXZ ]] || die "hexz (hexz-cli 0.8.2) is not installed: cargo install hexz-cli --version 0.8.2"
    build
}

# src/ may be mid-edit by someone else: retry a failed build a few times.
build() {
    local try
    for try in 1 2 3 4 5; do
        if (cd "$REPO" && cargo build --release && cargo build --release --example zerofs) >"$LOGS/build.log" 2>&1; then
            mkdir -p "$BENCH_DIR/bin"
            cp "$REPO/target/release/snapmount" "$REPO/target/release/examples/zerofs" "$BENCH_DIR/bin/"
            # What was built (src/ may change while this runs).
            BUILT_FROM="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
            if ! git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null; then
                BUILT_FROM+=" + uncommitted changes in src/"
            fi
            SNAPMOUNT=$BENCH_DIR/bin/snapmount
            ZEROFS=$BENCH_DIR/bin/zerofs
            return
        fi
        log "build failed (try $try/5, see $LOGS/build.log); retrying in 60 s"
        sleep 60
    done
    die "cargo build --release failed"
}

# -------------------------------------------------------------------- data --

# The test disk and every image made from it. Reused when the stamp matches.
make_data() {
    local stamp="size=$BYTES gen=2"
    if [[ -f $DATA/.stamp && $(cat "$DATA/.stamp") == "$stamp" ]]; then
        log "reusing the images in $DATA"
        return
    fi
    rm -rf "$DATA"
    mkdir -p "$DATA"
    log "generating $BENCH_SIZE of half-compressible data"
    python3 "$HELPERS/gen_data.py" "$DATA/src.raw" "$BYTES"

    log "qcow2 images (64 KiB clusters): uncompressed, zlib, zstd"
    qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$DATA/src.raw" "$DATA/qcow2-raw.qcow2"
    qemu-img convert -c -f raw -O qcow2 -o cluster_size=64k,compression_type=zlib "$DATA/src.raw" "$DATA/qcow2-zlib.qcow2"
    qemu-img convert -c -f raw -O qcow2 -o cluster_size=64k,compression_type=zstd "$DATA/src.raw" "$DATA/qcow2-zstd.qcow2"

    log "qcow2 LUKS (aes-256-xts-plain64, QEMU's default cipher; password in $DATA/luks.pw)"
    printf 'bench-password' >"$DATA/luks.pw"   # QEMU's secret file=: verbatim, no newline
    qemu-img convert -f raw -O qcow2 --object secret,id=sec0,file="$DATA/luks.pw" \
        -o cluster_size=64k,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100 \
        "$DATA/src.raw" "$DATA/qcow2-luks.qcow2"

    log "HEXZ archives: LZ4, zstd"
    "$HEXZ" pack -s "$DATA/src.raw" "$DATA/hexz-lz4.hxz" >"$LOGS/hexz-pack.log" 2>&1
    "$HEXZ" pack -s "$DATA/src.raw" "$DATA/hexz-zstd.hxz" --compression zstd >>"$LOGS/hexz-pack.log" 2>&1

    make_mount_fixtures
    ls -l "$DATA" "$DATA"/m/* >"$LOGS/data.txt"
    echo "$stamp" >"$DATA/.stamp"
}

# Images for the mount-time measurements, each in its own directory so that
# nothing else sits next to it.
make_mount_fixtures() {
    local d=$DATA/m i mib=$((BYTES >> 20))
    mkdir -p "$d/sparse" "$d/snapshots" "$d/chain" "$d/thin"

    log "mount fixtures: 1 TiB sparse qcow2"
    qemu-img create -q -f qcow2 "$d/sparse/sparse-1T.qcow2" 1T
    qemu-io -f qcow2 -c "write -P 0xa1 0 1M" -c "write -P 0xa2 300G 1M" -c "write -P 0xa3 700G 4M" \
        -c "write -P 0xa4 1023G 1M" "$d/sparse/sparse-1T.qcow2" >/dev/null

    log "mount fixtures: 500 internal snapshots (about a minute)"
    qemu-img create -q -f qcow2 "$d/snapshots/snapshots-500.qcow2" 16G
    qemu-io -f qcow2 -c "write -P 0xb1 0 8M" -c "write -P 0xb2 8G 8M" "$d/snapshots/snapshots-500.qcow2" >/dev/null
    for i in $(seq 1 500); do
        qemu-img snapshot -c "snap-$i" "$d/snapshots/snapshots-500.qcow2"
    done
    qemu-io -f qcow2 -c "write -P 0xb3 4M 8M" "$d/snapshots/snapshots-500.qcow2" >/dev/null

    log "mount fixtures: 4-deep backing chain on the zstd image"
    ln "$DATA/qcow2-zstd.qcow2" "$d/chain/chain-0.qcow2"
    for i in 1 2 3; do
        # Relative backing names, as qemu-img writes them for images side by side.
        (cd "$d/chain" && qemu-img create -q -f qcow2 -o cluster_size=64k -b "chain-$((i - 1)).qcow2" -F qcow2 "chain-$i.qcow2")
        qemu-io -f qcow2 -c "write -P $((0xc0 + i)) $((i * mib / 5))M 4M" "$d/chain/chain-$i.qcow2" >/dev/null
    done

    log "mount fixtures: thin HEXZ child of the LZ4 archive"
    ln "$DATA/hexz-lz4.hxz" "$d/thin/parent.hxz"
    cp "$DATA/src.raw" "$d/thin/child.raw"
    for i in 1 2 3 4 5 6 7 8; do   # a few MiB moved around: a few changed blocks
        dd if="$DATA/src.raw" of="$d/thin/child.raw" bs=1M count=1 skip=$(((i * 7) % mib)) \
            seek=$(((i * 13 + 5) % mib)) conv=notrunc status=none
    done
    "$HEXZ" pack -s "$d/thin/child.raw" "$d/thin/hexz-thin.hxz" --base "$d/thin/parent.hxz" >>"$LOGS/hexz-pack.log" 2>&1
    rm "$d/thin/child.raw"
}

image_path() {
    case $1 in
        qcow2-*) echo "$DATA/$1.qcow2" ;;
        hexz-thin) echo "$DATA/m/thin/hexz-thin.hxz" ;;
        hexz-*) echo "$DATA/$1.hxz" ;;
        sparse-1T) echo "$DATA/m/sparse/sparse-1T.qcow2" ;;
        snapshots-500) echo "$DATA/m/snapshots/snapshots-500.qcow2" ;;
        chain-4) echo "$DATA/m/chain/chain-3.qcow2" ;;
        *) die "unknown image $1" ;;
    esac
}

# ------------------------------------------------------------------ mounts --

# mount_tool TOOL IMAGE: mounts IMAGE with TOOL and waits until the disk
# file is there. Sets FILE (the raw disk to read) and PID (the daemon; empty
# for the host file).
mount_tool() {
    local tool=$1 img
    img=$(image_path "$2" 2>/dev/null || true)
    PID=
    case $tool in
        snapmount)
            "$SNAPMOUNT" mount --cache-size "$BENCH_CACHE" --log-file "$LOGS/snapmount.log" \
                --password-file "$DATA/luks.pw" "$img" "$MNT_SNAP" 2>>"$LOGS/snapmount.log"
            FILE=$MNT_SNAP/$(basename "$img")/disk.raw
            wait_live "$tool" "$FILE"
            # The background daemon keeps the command line of `snapmount mount`.
            PID=$(find_pid "snapmount mount .* ${MNT_SNAP}\$")
            ;;
        qsd)
            # Command line of /work/shared/research/qcow2.md B.2; --daemonize
            # returns once the export is live.
            # The same password for the LUKS image (other images ignore it).
            local encrypt=
            if [[ $2 == qcow2-luks ]]; then encrypt=,encrypt.format=luks,encrypt.key-secret=sec0; fi
            qemu-storage-daemon --object secret,id=sec0,file="$DATA/luks.pw" \
                --blockdev driver=file,node-name=file0,filename="$img",read-only=on,cache.direct=off \
                --blockdev driver=qcow2,node-name=fmt0,file=file0,read-only=on$encrypt \
                --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$MNT_QSD",writable=off \
                --pidfile "$BENCH_DIR/qsd.pid" --daemonize 2>>"$LOGS/qsd.log"
            FILE=$MNT_QSD
            wait_live "$tool" "$FILE"
            PID=$(cat "$BENCH_DIR/qsd.pid")
            ;;
        hexz)
            # `hexz mount -d` forks before the mount is live: wait for the file.
            "$HEXZ" mount "$img" "$MNT_HEXZ" -d >>"$LOGS/hexz.log" 2>&1
            FILE=$MNT_HEXZ/main
            wait_live "$tool" "$FILE"
            PID=$(find_pid "hexz mount .* ${MNT_HEXZ} -d\$")
            ;;
        zerofs)
            "$ZEROFS" "$MNT_ZERO" "$BYTES" >>"$LOGS/zerofs.log" 2>&1 &
            PID=$!
            FILE=$MNT_ZERO/zero
            wait_live "$tool" "$FILE"
            ;;
        rawfile)
            FILE=$DATA/src.raw
            return
            ;;
    esac
    DAEMONS+=("$PID")
}

# Until the first 4 KiB of FILE read back through the mount; LIVE_AT is then
# the time it did (for the mount-time measurements).
wait_live() {
    local i
    for ((i = 0; i < 10000; i++)); do
        if head -c 4096 "$2" >/dev/null 2>&1; then
            LIVE_AT=$EPOCHREALTIME
            return
        fi
        sleep 0.002
    done
    die "$1: $2 did not appear within 30 s"
}

# The one process whose command line matches PATTERN (a daemonizing tool
# may show its intermediate process for a moment: wait for exactly one).
find_pid() {
    local i pids
    for ((i = 0; i < 500; i++)); do
        pids=$(pgrep -f -- "$1" || true)
        if [[ -n $pids && $pids != *$'\n'* ]]; then
            echo "$pids"
            return
        fi
        sleep 0.01
    done
    die "no single process matches '$1' (found: ${pids:-none})"
}

umount_tool() {
    local tool=$1 i
    case $tool in
        snapmount) "$SNAPMOUNT" umount "$MNT_SNAP" ;;
        qsd) kill "$PID" ;;   # QSD unmounts on SIGTERM
        hexz) "$HEXZ" unmount "$MNT_HEXZ" >/dev/null ;;
        zerofs) kill "$PID" ;;
        rawfile) return ;;
    esac
    # Wait for the daemon to exit, so the next mount starts from nothing.
    for ((i = 0; i < 500; i++)); do
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.01
    done
    if kill -0 "$PID" 2>/dev/null; then
        log "$tool: daemon $PID still alive 5 s after unmount; killing it"
        kill -9 "$PID"
    fi
    if [[ $tool == zerofs ]]; then
        wait "$PID" 2>/dev/null || true   # our own child: reap it
    fi
    local m keep=()
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ" "$MNT_ZERO"; do
        if is_mounted "$m"; then
            log "$tool: $m still mounted after the daemon exited; lazy unmount"
            umount -l "$m"
        fi
    done
    for m in "${DAEMONS[@]}"; do
        if [[ $m != "$PID" ]]; then keep+=("$m"); fi
    done
    DAEMONS=("${keep[@]}")
    PID=
}

# ------------------------------------------------------------ measurements --

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# fio_json OUT FIO_ARGS...: one fio job on $FILE, JSON written to OUT.
fio_json() {
    local out=$1
    shift
    # --invalidate=0: the page cache is managed here (drop_caches, fresh
    # mounts), and the warm pass must keep what the cold pass left.
    fio --name=bench --filename="$FILE" --readonly --invalidate=0 --ioengine=psync \
        --output-format=json --output="$out" "$@" >/dev/null
}

# fio_value JSON... bw|iops: the read side's MB/s (over all the files:
# total bytes / total time) or IOPS.
fio_value() {
    python3 - "$@" <<'EOF'
import json, sys
*files, what = sys.argv[1:]
jobs = [json.load(open(f))["jobs"][0]["read"] for f in files]
if what == "bw":
    print(f"{sum(j['io_bytes'] for j in jobs) / sum(j['runtime'] for j in jobs) * 1000 / 1e6:.1f}")
else:
    print(f"{jobs[0]['iops']:.0f}")
EOF
}

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }

seq_read() {   # seq_read DIRECT(0|1) JSON
    local direct=$1 json=$2
    fio_json "$json" --rw=read --bs=1M --direct="$direct" --size="$BYTES"
    fio_value "$json" bw
}

rand_read() {   # rand_read THREADS JSON
    fio_json "$2" --rw=randread --bs=4k --direct=1 --numjobs="$1" --time_based \
        --runtime="$BENCH_RUNTIME" --group_reporting --size="$BYTES"
    fio_value "$2" iops
}

# Samples the daemon's RssAnon every 100 ms (VmHWM also counts file pages
# the daemon maps; the anonymous part is what the cache bound governs).
sample_rss() {
    local pid=$1 out=$2 max=0 key value _
    while kill -0 "$pid" 2>/dev/null; do
        while read -r key value _; do
            if [[ $key == RssAnon: ]]; then
                if ((value > max)); then
                    max=$value
                    echo "$max" >"$out"
                fi
                break
            fi
        done <"/proc/$pid/status" 2>/dev/null || true
        sleep 0.1
    done
}

status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# measure METRIC TOOL IMAGE REP: one sample, each on a fresh mount with cold
# caches (the warm buffered pass rides on the cold buffered one).
measure() {
    local metric=$1 tool=$2 image=$3 rep=$4 label=$3 json v shown
    if [[ $tool == zerofs || $tool == rawfile ]]; then label=-; fi
    json=$LOGS/$metric-$image-$tool-$rep.json
    drop_caches
    mount_tool "$tool" "$image"
    case $metric in
        seq_direct)
            v=$(seq_read 1 "$json")
            record seq_direct "$label" "$tool" "$rep" "$v"
            shown="cold $v"
            # Again on the same mount: the daemon's reads of the image now hit
            # the host page cache, so this is the daemon's own speed, not the
            # disk's. (The host file has no daemon: its O_DIRECT is the disk.)
            if [[ $tool != rawfile ]]; then
                v=$(seq_read 1 "${json%.json}-hot.json")
                record seq_direct_hot "$label" "$tool" "$rep" "$v"
                shown+=", image cached $v"
            fi
            ;;
        seq_buf)
            v=$(seq_read 0 "$json")
            record seq_buf "$label" "$tool" "$rep" "$v"
            shown="cold $v"
            # Warm: read it again, now that it is in the page cache. Each
            # pass opens the file anew (as a second `dd` or `cp` would: QSD
            # drops the cache on open); several passes, because one takes
            # ~0.1 s, too short to time alone on a busy machine.
            local pass warm=()
            for ((pass = 1; pass <= BENCH_WARM_PASSES; pass++)); do
                warm+=("${json%.json}-warm$pass.json")
                fio_json "${warm[-1]}" --rw=read --bs=1M --direct=0 --size="$BYTES"
            done
            v=$(fio_value "${warm[@]}" bw)
            record seq_warm "$label" "$tool" "$rep" "$v"
            shown+=", warm $v"
            ;;
        rand1)
            v=$(rand_read 1 "$json")
            record rand1 "$label" "$tool" "$rep" "$v"
            shown="$v IOPS"
            ;;
        rand4)
            local rss_file=$BENCH_DIR/rss.tmp
            rm -f "$rss_file"
            if [[ -n $PID ]]; then
                sample_rss "$PID" "$rss_file" &
                SAMPLER_PID=$!
            fi
            v=$(rand_read 4 "$json")
            record rand4 "$label" "$tool" "$rep" "$v"
            shown="$v IOPS"
            if [[ -n $PID ]]; then
                # VmHWM: the daemon's peak resident set since it started,
                # i.e. over this mount and this run.
                record rss_hwm "$label" "$tool" "$rep" "$(($(status_kib "$PID" VmHWM) / 1024))"
                shown+=", VmHWM $(($(status_kib "$PID" VmHWM) / 1024)) MiB"
                kill "$SAMPLER_PID" 2>/dev/null
                wait "$SAMPLER_PID" 2>/dev/null || true
                SAMPLER_PID=
                if [[ -f $rss_file ]]; then record rss_anon "$label" "$tool" "$rep" "$(($(cat "$rss_file") / 1024))"; fi
            fi
            ;;
    esac
    umount_tool "$tool"
    log "  $metric $image $tool #$rep: $shown"
}

# export_sample IMAGE REP: `snapmount export` against `qemu-img convert -O
# raw` of the same image onto the same disk ($BENCH_DIR), the image in the
# host page cache: flushed (snapmount's default; qemu-img -t writeback) and
# not flushed (--no-sync; qemu-img's default cache mode, unsafe). Recorded
# as MB/s of the virtual disk (size / seconds), so that higher is better.
export_sample() {
    local image=$1 rep=$2 img out=$BENCH_DIR/export.raw tool flushed t0 us v shown=
    img=$(image_path "$image")
    local secret=() opts=(-f qcow2)
    if [[ $image == qcow2-luks ]]; then
        secret=(--object secret,id=sec0,file="$DATA/luks.pw")
        opts=(--image-opts)
        img="driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0,file.filename=$img"
    fi
    for flushed in 1 0; do
        for tool in snapmount qemuimg; do
            rm -f "$out"
            cat "$(image_path "$image")" >/dev/null   # in the page cache
            sync
            t0=$EPOCHREALTIME
            case $tool/$flushed in
                snapmount/1) "$SNAPMOUNT" export --cache-size "$BENCH_CACHE" --password-file "$DATA/luks.pw" \
                    "$(image_path "$image")" "$out" 2>>"$LOGS/export.log" ;;
                snapmount/0) "$SNAPMOUNT" export --no-sync --cache-size "$BENCH_CACHE" --password-file "$DATA/luks.pw" \
                    "$(image_path "$image")" "$out" 2>>"$LOGS/export.log" ;;
                qemuimg/1) qemu-img convert "${secret[@]}" -t writeback "${opts[@]}" "$img" -O raw "$out" ;;
                qemuimg/0) qemu-img convert "${secret[@]}" "${opts[@]}" "$img" -O raw "$out" ;;
            esac
            us=$((${EPOCHREALTIME/./} - ${t0/./}))
            v=$(awk -v b="$BYTES" -v us="$us" 'BEGIN { printf "%.1f", b / us }')
            record "$([[ $flushed == 1 ]] && echo export || echo export_nosync)" "$image" "$tool" "$rep" "$v"
            shown+=" $tool/$([[ $flushed == 1 ]] && echo flushed || echo no-sync) $v"
        done
    done
    rm -f "$out"
    sync
    log "  export $image #$rep (MB/s):$shown"
}

exports() {
    local rep image
    for ((rep = 1; rep <= BENCH_REPEAT; rep++)); do
        log "export, repetition $rep/$BENCH_REPEAT"
        for image in $BENCH_IMAGES; do
            if [[ $image == qcow2-* ]]; then export_sample "$image" "$rep"; fi
        done
    done
}

tools_for() {
    case $1 in
        qcow2-raw) echo "snapmount qsd zerofs rawfile" ;;   # baselines measured alongside
        qcow2-*) echo "snapmount qsd" ;;
        hexz-*) echo "snapmount hexz" ;;
    esac
}

# Interleaved: every repetition walks every image, metric and tool in turn,
# so a slow minute on a noisy machine hits every tool a little, not one a lot.
throughput() {
    local rep image metric tool
    for ((rep = 1; rep <= BENCH_REPEAT; rep++)); do
        log "throughput, repetition $rep/$BENCH_REPEAT"
        for image in $BENCH_IMAGES; do
            for metric in seq_direct seq_buf rand1 rand4; do
                for tool in $(tools_for "$image"); do
                    measure "$metric" "$tool" "$image" "$rep"
                done
            done
        done
    done
}

# Milliseconds from the mount command's start until the first 4 KiB of the
# disk read back (snapmount returns once live; hexz -d does not, so for every
# tool the clock stops at the first successful read).
# (Not in a $(...) subshell: the daemon list must stay in this shell.)
time_mount() {   # time_mount TOOL IMAGE; sets MS
    local t0 us
    t0=$EPOCHREALTIME
    mount_tool "$1" "$2"
    us=$((${LIVE_AT/./} - ${t0/./}))
    MS=$(printf '%d.%d' $((us / 1000)) $((us % 1000 / 100)))
    umount_tool "$1"
}

mount_times() {
    local rep image tool v peer
    for ((rep = 1; rep <= BENCH_MOUNT_REPEAT; rep++)); do
        log "mount times, repetition $rep/$BENCH_MOUNT_REPEAT"
        for image in sparse-1T snapshots-500 chain-4 hexz-thin; do
            peer=qsd
            if [[ $image == hexz-thin ]]; then peer=hexz; fi
            for tool in snapmount "$peer"; do
                drop_caches
                time_mount "$tool" "$image"
                record mount_cold "$image" "$tool" "$rep" "$MS"
                v=$MS
                time_mount "$tool" "$image"
                record mount_warm "$image" "$tool" "$rep" "$MS"
                log "  mount $image $tool #$rep: cold $v ms, warm $MS ms"
            done
        done
    done
}

# -------------------------------------------------------------------- main --

main() {
    mkdir -p "$DATA" "$MNT_SNAP" "$MNT_HEXZ" "$MNT_ZERO" "$LOGS"
    touch "$MNT_QSD"
    local m
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ" "$MNT_ZERO"; do
        if is_mounted "$m"; then die "$m is already mounted (a previous run in this BENCH_DIR?)"; fi
    done
    log "scratch dir $BENCH_DIR; size $BENCH_SIZE, $BENCH_REPEAT repetitions, snapmount --cache-size $BENCH_CACHE"
    preflight
    make_data
    {
        echo "# snapmount benches/compare.sh $(date -u +%FT%TZ) size=$BENCH_SIZE repeat=$BENCH_REPEAT"
        echo "# $(uname -sr), $(nproc) CPUs, snapmount built from $BUILT_FROM"
        echo "# load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
    } >"$RESULTS"
    throughput
    if [[ ${BENCH_EXPORT:-1} == 1 ]]; then exports; fi
    mount_times
    # Other work on the machine skews everything: say how busy it was.
    echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS"
    python3 "$HELPERS/report.py" "$RESULTS" "$CACHE_BYTES" >"$REPORT"
    # The comparison table on stdout; targets and samples are in the file.
    sed -n '/^## Comparison/,/^## Targets/p' "$REPORT" | sed '$d'
    sed -n '/^## Targets/,/^## All samples/p' "$REPORT" | sed '$d'
    if [[ ${BENCH_REMOTE:-1} == 1 ]]; then
        # Reading over HTTP (1 Gbit/s, 10 ms round trip) against QSD's curl
        # driver and download-then-hexz-mount: its own script, as it sets up
        # a network namespace; the same binary, its report appended here.
        log "remote rows: benches/remote.sh"
        BENCH_DIR="$BENCH_DIR/remote" SNAPMOUNT="$SNAPMOUNT" BENCH_REPEAT="$BENCH_REPEAT" \
            "$REPO/benches/remote.sh" >"$LOGS/remote.out" 2>&1 || log "remote rows failed: see $LOGS/remote.out"
        if [[ -f $BENCH_DIR/remote/results.md ]]; then
            { echo; sed 's/^#/##/' "$BENCH_DIR/remote/results.md"; } >>"$REPORT"
            sed -n '/^## Comparison/,/^## All samples/p' "$BENCH_DIR/remote/results.md" | sed '$d'
        fi
    fi
    echo "Full report (table, targets, every sample): $REPORT"
}

main "$@"
