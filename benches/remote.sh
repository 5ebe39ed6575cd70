#!/usr/bin/env bash
# benches/remote.sh — snapmount reading images over HTTP, against its peers,
# over a shaped link on this machine (1 Gbit/s, 10 ms RTT), in one run.
#
#   sudo benches/remote.sh                               # 1 GiB images, 3 repetitions
#   sudo BENCH_REPEAT=1 BENCH_RUNTIME=10 benches/remote.sh   # quick look
#
# The link (benches/remote/link.sh): nginx in a network namespace behind a
# veth pair, tbf at BENCH_RATE on the namespace's egress (server -> client),
# and a delay proxy on the client side adding BENCH_DELAY_MS each way. Every
# URL below goes through the proxy.
#
# Peers:
#   qemu-storage-daemon (QSD) 10.0.2: driver=http (QEMU's curl module, from
#     qemu-block-extra in bookworm-backports, unpacked into target/ once:
#     benches/remote/get-qemu-curl.sh), readahead=1048576, timeout=60,
#     under driver=qcow2, FUSE-exported onto a file; random reads also with
#     readahead=0 (QSD's better setting for them);
#   hexz 0.8.2: hexz cannot mount a URL, so: curl the archive, then
#     `hexz mount FILE MNT -d` (hexz-cli with its FUSE part, built into
#     target/bench-tools once; HEXZ=... to use another build).
#
# Measurements (each sample on fresh mounts after drop_caches; the served
# file is then read once on the server side, so the "remote" server has it
# in its page cache, as a real one would):
#   link      curl: 256 MiB download rate, small-request RTT
#   seq       fio 1 MiB O_DIRECT sequential reads of the whole qcow2 (zstd) disk
#   rand4     fio 4 KiB O_DIRECT random reads, 4 threads, BENCH_RUNTIME s, seed BENCH_SEED
#   ttfb      HEXZ archive: from nothing to the first 4 KiB (O_DIRECT, offset 0):
#             snapmount mount URL vs curl download + hexz mount
#   cachedir  snapmount --cache-dir: a second mount's cold sequential pass,
#             and the requests it sends (nginx's access log)
# Every mount's GETs and bytes are counted from nginx's access log.
#
# Environment (all optional):
#   BENCH_DIR      scratch dir (default: a new /tmp/snapmount-remote.XXXXXX); data
#                  generated there is reused by the next run with the same BENCH_SIZE
#   BENCH_SIZE     size of the test disk (default 1G)
#   BENCH_REPEAT   repetitions (default 3; medians)
#   BENCH_RUNTIME  seconds per random-read run (default 20)
#   BENCH_SEED     fio --randseed (default 4242)
#   BENCH_CACHE    snapmount --cache-size (default 256M)
#   BENCH_TIMEOUT  seconds before one fio run is given up (default 900)
#   BENCH_KEEP     1: keep the scratch dir (the default when BENCH_DIR is given)
#   SNAPMOUNT      snapmount binary to measure (default: cargo build --release here)
#   HEXZ           hexz-cli 0.8.2 with `mount` (default: target/bench-tools/hexz-fuse)
#   BENCH_RATE, BENCH_DELAY_MS, BENCH_NS, BENCH_PORT, BENCH_SUBNET: see benches/remote/link.sh
#
# Output: a markdown table on stdout, also in $BENCH_DIR/results.md, raw
# samples in $BENCH_DIR/results.tsv, logs in $BENCH_DIR/logs. A tool that
# cannot do a measurement (snapmount before it reads URLs) gets "n/a" and
# the run goes on. Needs root, /dev/fuse, and no netem (tbf and a proxy).
set -Eeuo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/remote/link.sh
source "$REPO/benches/remote/link.sh"

BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_REPEAT=${BENCH_REPEAT:-3}
BENCH_RUNTIME=${BENCH_RUNTIME:-20}
BENCH_SEED=${BENCH_SEED:-4242}
BENCH_CACHE=${BENCH_CACHE:-256M}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-900}
if [[ -n ${BENCH_DIR:-} ]]; then
    BENCH_KEEP=${BENCH_KEEP:-1}
    mkdir -p "$BENCH_DIR"
    BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
else
    BENCH_KEEP=${BENCH_KEEP:-0}
    BENCH_DIR=$(mktemp -d /tmp/snapmount-remote.XXXXXX)
fi
DATA=$BENCH_DIR/data          # also the web root
MNT=$BENCH_DIR/mnt
LOGS=$BENCH_DIR/logs
RESULTS=$BENCH_DIR/results.tsv
REPORT=$BENCH_DIR/results.md
BYTES=$(numfmt --from=iec "$BENCH_SIZE")
TOOLS=$REPO/target/bench-tools
MNT_SNAP=$MNT/snapmount
MNT_QSD=$MNT/qsd.raw
MNT_HEXZ=$MNT/hexz
DL=$BENCH_DIR/download        # hexz's local copy
QSD_OPTS=readahead=1048576,timeout=60
# For random reads QSD is also run without read-ahead: with 1 MiB, every
# 4 KiB miss fetches 1 MiB more and the link, not the round trips, limits it.
QSD_OPTS_RAND=readahead=0,timeout=60
SNAPMOUNT_NA=                 # why snapmount could not be built, if it could not

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup --

is_mounted() { grep -qF " $1 fuse" /proc/mounts; }

declare -a DAEMONS=()

cleanup() {
    local rc=$? m pid
    set +e
    for pid in "${DAEMONS[@]}"; do kill "$pid" 2>/dev/null; done
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ"; do
        is_mounted "$m" || continue
        umount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    sleep 0.2
    for pid in "${DAEMONS[@]}"; do
        alive "$pid" && kill -9 "$pid" 2>/dev/null
    done
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ"; do
        is_mounted "$m" && umount -l "$m" 2>/dev/null
    done
    link_down
    rm -rf "$DL" "$BENCH_DIR"/cachedir-*
    if [[ $BENCH_KEEP != 1 && $rc == 0 ]]; then
        rm -rf "$DATA" "$MNT" "$BENCH_DIR/bin"
    fi
    if [[ $rc != 0 ]]; then log "failed (exit $rc); logs in $LOGS, scratch dir $BENCH_DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------- preflight --

preflight() {
    [[ $(id -u) == 0 ]] || die "run as root (drop_caches, mounts, network namespaces)"
    [[ -c /dev/fuse ]] || die "/dev/fuse is missing"
    local t
    for t in qemu-img qemu-storage-daemon python3 numfmt pgrep curl ip tc rustc cargo timeout; do
        command -v "$t" >/dev/null || die "$t is not installed"
    done
    if ! command -v fio >/dev/null; then
        log "installing fio"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; } >"$LOGS/apt.log" 2>&1 \
            || die "cannot install fio (see $LOGS/apt.log)"
    fi
    link_need_nginx >"$LOGS/nginx-install.log" 2>&1 || die "cannot install nginx-light (see $LOGS/nginx-install.log)"
    QEMU_MODULE_DIR=$("$REPO/benches/remote/get-qemu-curl.sh") || die "cannot get QEMU's curl module"
    export QEMU_MODULE_DIR
    QSD_VERSION=$(qemu-storage-daemon --version | head -1)
    get_hexz
    get_snapmount
}

# hexz-cli 0.8.2 with its FUSE part. The test suite's copy (target/tools,
# built --no-default-features without "fuse") has no `mount`.
get_hexz() {
    local root=$TOOLS/hexz-fuse
    HEXZ=${HEXZ:-$root/bin/hexz}
    if "$HEXZ" --version 2>/dev/null | grep -qx 'hexz 0\.8\.2' && "$HEXZ" mount --help >/dev/null 2>&1; then
        return
    fi
    [[ $HEXZ == "$root/bin/hexz" ]] || die "$HEXZ is not hexz 0.8.2 with \`mount\`"
    # fuser 0.14's build script links libfuse3 through pkg-config.
    if ! pkg-config --exists fuse3 2>/dev/null; then
        log "installing libfuse3-dev and pkg-config (hexz's FUSE part builds against them)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfuse3-dev pkg-config; } \
            >"$LOGS/apt-fuse.log" 2>&1 || die "cannot install libfuse3-dev (see $LOGS/apt-fuse.log)"
    fi
    log "building hexz-cli 0.8.2 with FUSE into $root (once, a few minutes)"
    cargo install hexz-cli --version 0.8.2 --locked --root "$root" \
        --no-default-features --features fuse,compression-zstd,encryption,signing >"$LOGS/hexz-build.log" 2>&1 \
        || die "cannot build hexz-cli (see $LOGS/hexz-build.log)"
}

# SNAPMOUNT=binary, else this checkout, built. A failed build is not fatal:
# its rows read "n/a" (the peers are still measured).
get_snapmount() {
    mkdir -p "$BENCH_DIR/bin"
    if [[ -n ${SNAPMOUNT:-} ]]; then
        [[ -x $SNAPMOUNT ]] || die "SNAPMOUNT=$SNAPMOUNT is not an executable"
        cp "$SNAPMOUNT" "$BENCH_DIR/bin/snapmount"
        BUILT_FROM="$SNAPMOUNT ($($SNAPMOUNT --version 2>/dev/null || echo '?'))"
    elif (cd "$REPO" && cargo build --release) >"$LOGS/build.log" 2>&1; then
        cp "$REPO/target/release/snapmount" "$BENCH_DIR/bin/snapmount"
        BUILT_FROM="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
        if ! git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null; then
            BUILT_FROM+=" + uncommitted changes in src/"
        fi
    else
        SNAPMOUNT_NA="cargo build --release failed (see $LOGS/build.log)"
        BUILT_FROM="(build failed)"
        log "snapmount: $SNAPMOUNT_NA; its rows will read n/a"
    fi
    SNAPMOUNT=$BENCH_DIR/bin/snapmount
}

# -------------------------------------------------------------------- data --

# The test disk (benches/compare/gen_data.py: every 64 KiB half random, a
# quarter text, a quarter zeros), a zstd-compressed qcow2 of it and a HEXZ
# archive (LZ4, the default). Reused when the stamp matches.
make_data() {
    local stamp="size=$BYTES gen=remote-2" mib=$((BYTES >> 20)) off
    if [[ -f $DATA/.stamp && $(cat "$DATA/.stamp") == "$stamp" ]]; then
        log "reusing the images in $DATA"
        return
    fi
    rm -rf "$DATA"
    mkdir -p "$DATA"
    log "generating $BENCH_SIZE of half-compressible data, a zstd qcow2 and a HEXZ archive"
    python3 "$REPO/benches/compare/gen_data.py" "$DATA/src.raw" "$BYTES"
    qemu-img convert -c -f raw -O qcow2 -o cluster_size=64k,compression_type=zstd "$DATA/src.raw" "$DATA/img.qcow2"
    "$HEXZ" pack -s "$DATA/src.raw" "$DATA/img.hxz" >"$LOGS/hexz-pack.log" 2>&1
    # What three 1 MiB regions of the disk must read as (check_bytes).
    for off in 0 $((mib / 2)) $((mib - 1)); do
        echo "$off $(dd if="$DATA/src.raw" bs=1M skip="$off" count=1 status=none | sha256sum | cut -d' ' -f1)"
    done >"$DATA/regions.sha256"
    rm "$DATA/src.raw"   # the images are what is served
    echo "$stamp" >"$DATA/.stamp"
}

# ------------------------------------------------------------------ mounts --

# Cold start: the client's page cache (and snapmount's --cache-dir files)
# dropped; the served file then read once on the server side.
cold() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    cat "$DATA/$1" >/dev/null
}

find_pid() {   # the one process whose command line matches $1 (or nothing)
    local i pids
    for ((i = 0; i < 200; i++)); do
        pids=$(pgrep -f -- "$1" || true)
        if [[ -n $pids && $pids != *$'\n'* ]]; then
            echo "$pids"
            return
        fi
        sleep 0.01
    done
}

# First 4 KiB at offset 0, O_DIRECT (no read-ahead around it).
read_first() { dd if="$1" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; }

wait_live() {   # wait_live FILE SECONDS: until its first 4 KiB read; LIVE_AT then
    local i n=$(($2 * 500))
    for ((i = 0; i < n; i++)); do
        if read_first "$1"; then
            LIVE_AT=$EPOCHREALTIME
            return 0
        fi
        sleep 0.002
    done
    return 1
}

# mount_tool TOOL IMAGE [SNAPMOUNT_ARGS...]: sets FILE and PID, or returns 1
# with NA (the reason). TOOL: snapmount | qsd | hexz (downloads first).
mount_tool() {
    local tool=$1 image=$2 url=$LINK_URL/$2
    shift 2
    PID= NA=
    case $tool in
        snapmount)
            if [[ -n $SNAPMOUNT_NA ]]; then NA=$SNAPMOUNT_NA; return 1; fi
            if ! timeout -k 5 120 "$SNAPMOUNT" mount --cache-size "$BENCH_CACHE" --log-file "$LOGS/snapmount.log" \
                "$@" "$url" "$MNT_SNAP" 2>"$LOGS/snapmount-mount.err"; then
                NA="mount failed: $(head -c 300 "$LOGS/snapmount-mount.err" | head -1)"
                cat "$LOGS/snapmount-mount.err" >>"$LOGS/snapmount.log"
                force_unmount "$MNT_SNAP"
                return 1
            fi
            FILE=$MNT_SNAP/$image/disk.raw
            PID=$(find_pid "snapmount mount .* ${MNT_SNAP}\$")
            ;;
        qsd | qsd-ra0)
            local opts=$QSD_OPTS
            if [[ $tool == qsd-ra0 ]]; then opts=$QSD_OPTS_RAND; fi
            if ! timeout -k 5 120 qemu-storage-daemon \
                --blockdev driver=http,node-name=f0,url="$url",$opts,read-only=on \
                --blockdev driver=qcow2,node-name=fmt0,file=f0,read-only=on \
                --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$MNT_QSD",writable=off \
                --pidfile "$BENCH_DIR/qsd.pid" --daemonize 2>>"$LOGS/qsd.log"; then
                NA="qemu-storage-daemon failed: $(tail -1 "$LOGS/qsd.log")"
                return 1
            fi
            FILE=$MNT_QSD
            PID=$(cat "$BENCH_DIR/qsd.pid")
            ;;
        hexz)
            mkdir -p "$DL"
            if ! curl -sf -o "$DL/$image" "$url"; then NA="download failed"; return 1; fi
            # `hexz mount -d` forks before the mount is live: wait for the file.
            "$HEXZ" mount "$DL/$image" "$MNT_HEXZ" -d >>"$LOGS/hexz.log" 2>&1
            FILE=$MNT_HEXZ/main
            ;;
    esac
    if [[ -n $PID ]]; then DAEMONS+=("$PID"); fi
    if ! wait_live "$FILE" 60; then
        NA="$FILE did not become readable within 60 s"
        umount_tool "$tool"
        return 1
    fi
    if [[ $tool == hexz ]]; then
        PID=$(find_pid "hexz mount .* ${MNT_HEXZ} -d\$")
        if [[ -n $PID ]]; then DAEMONS+=("$PID"); fi
    fi
}

force_unmount() {
    is_mounted "$1" || return 0
    umount "$1" 2>/dev/null || fusermount3 -u "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || true
}

umount_tool() {
    local tool=$1 i m keep=()
    case $tool in
        snapmount) timeout 30 "$SNAPMOUNT" umount "$MNT_SNAP" >/dev/null 2>&1 || force_unmount "$MNT_SNAP" ;;
        qsd | qsd-ra0) [[ -n $PID ]] && kill "$PID" 2>/dev/null ;;   # QSD unmounts on SIGTERM
        hexz) timeout 30 "$HEXZ" unmount "$MNT_HEXZ" >/dev/null 2>&1 || force_unmount "$MNT_HEXZ" ;;
    esac
    if [[ -n $PID ]]; then
        for ((i = 0; i < 500; i++)); do
            alive "$PID" || break
            sleep 0.01
        done
        if alive "$PID"; then
            log "$tool: daemon $PID still alive 5 s after unmount; killing it"
            kill -9 "$PID" 2>/dev/null
        fi
    fi
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ"; do
        if is_mounted "$m"; then
            log "$tool: $m still mounted after the daemon exited; lazy unmount"
            umount -l "$m" 2>/dev/null || true
        fi
    done
    for m in "${DAEMONS[@]}"; do
        if [[ $m != "$PID" ]]; then keep+=("$m"); fi
    done
    DAEMONS=("${keep[@]}")
    PID=
    rm -rf "$DL"
}

# ------------------------------------------------------------ measurements --

# check_bytes FILE: the first, middle and last MiB of the disk read back as
# the source data (after a measurement, on the same mount: a fast daemon
# that serves wrong bytes gets n/a, not a number).
check_bytes() {
    local off want got
    while read -r off want; do
        got=$(timeout 120 dd if="$1" bs=1M skip="$off" count=1 iflag=direct status=none 2>/dev/null | sha256sum | cut -d' ' -f1)
        if [[ $got != "$want" ]]; then
            NA="wrong bytes in MiB $off of the disk"
            return 1
        fi
    done <"$DATA/regions.sha256"
}

# fio_json OUT FIO_ARGS...: one fio job on $FILE (time-limited).
fio_json() {
    local out=$1
    shift
    timeout -k 10 "$BENCH_TIMEOUT" fio --name=bench --filename="$FILE" --readonly --invalidate=0 --ioengine=psync \
        --output-format=json --output="$out" "$@" >/dev/null 2>>"$LOGS/fio.err"
}

# fio_value JSON bw|iops|lat|p50|p99: MiB/s, IOPS, or the completion latency
# (ms: mean, median, 99th percentile);
# fails when fio saw an error.
fio_value() {
    python3 - "$@" <<'EOF'
import json, sys
path, what = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
if job.get("error"):
    sys.exit(1)
r = job["read"]
if what == "bw":
    print(f"{r['io_bytes'] / r['runtime'] * 1000 / 2**20:.1f}")
elif what == "iops":
    print(f"{r['iops']:.0f}")
elif what == "lat":
    print(f"{r['clat_ns']['mean'] / 1e6:.2f}")
else:
    pct = {"p50": "50.000000", "p99": "99.000000"}[what]
    print(f"{r['clat_ns']['percentile'][pct] / 1e6:.2f}")
EOF
}

record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }

na() {   # na METRIC TOOL REP REASON
    record "$1" "$2" "$3" n/a
    log "  $1 $2 #$3: n/a ($4)"
    echo "$1 $2 #$3: $4" >>"$LOGS/na.txt"
}

# The requests one mount sent: GETs, HEADs, MiB of bodies. REQ_SINCE is
# taken right after the measured reads (the check_bytes reads come later).
record_requests() {   # record_requests METRIC TOOL REP
    local gets heads bytes
    read -r gets heads bytes <<<"$REQ_SINCE"
    record "$1_gets" "$2" "$3" "$gets"
    record "$1_heads" "$2" "$3" "$heads"
    record "$1_mib" "$2" "$3" "$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
    REQS="$gets GET, $heads HEAD, $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB"
}

seq_pass() {   # seq_pass JSON: one cold 1 MiB O_DIRECT pass; sets V
    fio_json "$1" --rw=read --bs=1M --direct=1 --size="$BYTES" && V=$(fio_value "$1" bw)
}

measure_seq() {   # measure_seq TOOL REP
    local tool=$1 rep=$2 json=$LOGS/seq-$1-$2.json mark
    cold img.qcow2
    mark=$(link_mark)
    if ! mount_tool "$tool" img.qcow2; then na seq "$tool" "$rep" "$NA"; return; fi
    if ! seq_pass "$json"; then
        NA="fio failed or timed out (see $json, $LOGS/fio.err)"
    elif REQ_SINCE=$(link_requests "$mark") && ! check_bytes "$FILE"; then
        :
    else
        umount_tool "$tool"
        record seq "$tool" "$rep" "$V"
        record_requests seq "$tool" "$rep"
        log "  seq $tool #$rep: $V MiB/s ($REQS)"
        return
    fi
    umount_tool "$tool"
    na seq "$tool" "$rep" "$NA"
}

measure_rand() {   # measure_rand TOOL REP
    local tool=$1 rep=$2 json=$LOGS/rand4-$1-$2.json mark v lat p50 p99
    cold img.qcow2
    mark=$(link_mark)
    if ! mount_tool "$tool" img.qcow2; then na rand4 "$tool" "$rep" "$NA"; return; fi
    if fio_json "$json" --rw=randread --bs=4k --direct=1 --numjobs=4 --time_based --runtime="$BENCH_RUNTIME" \
        --group_reporting --randseed="$BENCH_SEED" --size="$BYTES" &&
        v=$(fio_value "$json" iops) && lat=$(fio_value "$json" lat) &&
        p50=$(fio_value "$json" p50) && p99=$(fio_value "$json" p99) &&
        REQ_SINCE=$(link_requests "$mark") && check_bytes "$FILE"; then
        umount_tool "$tool"
        record rand4 "$tool" "$rep" "$v"
        record rand4_lat "$tool" "$rep" "$lat"
        record rand4_p50 "$tool" "$rep" "$p50"
        record rand4_p99 "$tool" "$rep" "$p99"
        record_requests rand4 "$tool" "$rep"
        log "  rand4 $tool #$rep: $v IOPS, latency mean $lat ms, median $p50 ms, p99 $p99 ms ($REQS)"
    else
        umount_tool "$tool"
        na rand4 "$tool" "$rep" "${NA:-fio failed or timed out (see $json, $LOGS/fio.err)}"
    fi
}

# From nothing local to the first 4 KiB of the HEXZ disk: the clock runs
# from the mount command (snapmount) or the download (hexz) to the first
# successful O_DIRECT read at offset 0.
measure_ttfb() {   # measure_ttfb TOOL REP
    local tool=$1 rep=$2 t0 us ms mark
    cold img.hxz
    mark=$(link_mark)
    t0=$EPOCHREALTIME
    if ! mount_tool "$tool" img.hxz; then na ttfb "$tool" "$rep" "$NA"; return; fi
    us=$((${LIVE_AT/./} - ${t0/./}))
    ms=$(printf '%d.%d' $((us / 1000)) $((us % 1000 / 100)))
    REQ_SINCE=$(link_requests "$mark")
    if ! check_bytes "$FILE"; then
        umount_tool "$tool"
        na ttfb "$tool" "$rep" "$NA"
        return
    fi
    umount_tool "$tool"
    record ttfb "$tool" "$rep" "$ms"
    record_requests ttfb "$tool" "$rep"
    log "  ttfb $tool #$rep: $ms ms ($REQS)"
}

# --cache-dir: a first mount reads the whole disk (filling the cache dir),
# a second one, after drop_caches, reads it again: its speed, and what it
# asked the server for.
measure_cachedir() {   # measure_cachedir REP
    local rep=$1 cd=$BENCH_DIR/cachedir-$1 mark
    rm -rf "$cd"
    mkdir -p "$cd"
    cold img.qcow2
    if ! mount_tool snapmount img.qcow2 --cache-dir "$cd"; then
        na cache1 snapmount "$rep" "$NA"
        na cache2 snapmount "$rep" "$NA"
        rm -rf "$cd"
        return
    fi
    if ! seq_pass "$LOGS/cache1-$rep.json" || ! check_bytes "$FILE"; then
        umount_tool snapmount
        na cache1 snapmount "$rep" "${NA:-fio failed or timed out}"
        na cache2 snapmount "$rep" "no first pass"
        rm -rf "$cd"
        return
    fi
    umount_tool snapmount
    record cache1 snapmount "$rep" "$V"
    local first=$V
    record cache_dir_mib snapmount "$rep" "$(du -sm "$cd" | cut -f1)"
    cold img.qcow2
    mark=$(link_mark)
    if ! mount_tool snapmount img.qcow2 --cache-dir "$cd"; then
        na cache2 snapmount "$rep" "$NA"
    elif seq_pass "$LOGS/cache2-$rep.json" && REQ_SINCE=$(link_requests "$mark") && check_bytes "$FILE"; then
        umount_tool snapmount
        record cache2 snapmount "$rep" "$V"
        record_requests cache2 snapmount "$rep"
        log "  cache-dir #$rep: first mount $first MiB/s, second mount $V MiB/s ($REQS)"
    else
        umount_tool snapmount
        na cache2 snapmount "$rep" "${NA:-fio failed or timed out}"
    fi
    rm -rf "$cd"
}

measure_link() {
    local mibs reused fresh direct
    log "link check: 256 MiB download, small-request RTT"
    read -r mibs reused fresh direct < <(link_verify "$DATA")
    record link_rate curl 1 "$mibs"
    record link_rtt curl 1 "$reused"
    record link_rtt_new curl 1 "$fresh"
    record link_rtt_direct curl 1 "$direct"
    LINK_MIBS=$mibs
    log "  link: $mibs MiB/s; small request $reused ms (kept-alive connection), $fresh ms (new connection), $direct ms without the delay proxy"
    rm -f "$DATA/link-256M.bin"
}

# Interleaved, as in compare.sh: every repetition walks every metric and
# tool in turn.
run_all() {
    local rep
    for ((rep = 1; rep <= BENCH_REPEAT; rep++)); do
        log "repetition $rep/$BENCH_REPEAT"
        measure_seq snapmount "$rep"
        measure_seq qsd "$rep"
        measure_rand snapmount "$rep"
        measure_rand qsd "$rep"
        measure_rand qsd-ra0 "$rep"
        measure_ttfb snapmount "$rep"
        measure_ttfb hexz "$rep"
        measure_cachedir "$rep"
    done
}

# -------------------------------------------------------------------- main --

main() {
    mkdir -p "$MNT_SNAP" "$MNT_HEXZ" "$LOGS"
    touch "$MNT_QSD"
    : >"$LOGS/na.txt"
    local m
    for m in "$MNT_SNAP" "$MNT_QSD" "$MNT_HEXZ"; do
        if is_mounted "$m"; then die "$m is already mounted (a previous run in this BENCH_DIR?)"; fi
    done
    log "scratch dir $BENCH_DIR; size $BENCH_SIZE, $BENCH_REPEAT repetitions"
    preflight
    make_data
    link_up "$BENCH_DIR/link" "$DATA" || die "the link did not come up"
    {
        echo "# snapmount benches/remote.sh $(date -u +%FT%TZ) size=$BENCH_SIZE repeat=$BENCH_REPEAT runtime=$BENCH_RUNTIME seed=$BENCH_SEED"
        echo "# $(uname -sr), $(nproc) CPUs, snapmount: $BUILT_FROM, --cache-size $BENCH_CACHE"
        echo "# link: tbf $LINK_RATE (burst $LINK_BURST) on the server's egress, delay proxy +$LINK_DELAY_MS ms each way, nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')"
        echo "# peers: $QSD_VERSION, driver=http ($QSD_OPTS; for random reads also $QSD_OPTS_RAND) -> qcow2 -> FUSE export (one I/O thread); hexz $("$HEXZ" --version | cut -d' ' -f2): curl download, then hexz mount -d"
        echo "# images: img.qcow2 $(stat -c %s "$DATA/img.qcow2") bytes (zstd, 64 KiB clusters), img.hxz $(stat -c %s "$DATA/img.hxz") bytes (LZ4), disk $BYTES bytes"
        echo "# load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
    } >"$RESULTS"
    record disk_bytes - 1 "$BYTES"
    measure_link
    run_all
    echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS"
    python3 "$REPO/benches/remote/report.py" "$RESULTS" "$LOGS/na.txt" >"$REPORT"
    cat "$REPORT"
    echo "Report: $REPORT"
}

main "$@"
