#!/usr/bin/env bash
# Runs every fuzz target, one after another (one core each, niced), for the
# given seconds each, and appends one line per target to fuzz/runs.log:
# date, target, seconds, executions, coverage, and the result.
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600, all)
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# Limits: 1 s per input (-timeout), 2 GiB RSS, and no single allocation above
# 256 MiB (-malloc_limit_mb): the parsers' own bounds are far below that.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
secs="${1:-600}"; shift || true
targets=("$@")
((${#targets[@]})) || targets=(image_qcow2 image_hexz image_vmsn image_migration headers remote)
[ -d corpus/image_qcow2 ] || ./make-seeds.sh
mkdir -p logs
for t in "${targets[@]}"; do
    log="logs/$t-$(date +%Y%m%dT%H%M%S).log"
    status=0
    nice cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=1 -rss_limit_mb=2048 -malloc_limit_mb=256 \
        -max_len=1048576 -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(grep -o '^Done [0-9]* runs in [0-9]* second' "$log" | tail -1 || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    if [ "$status" = 0 ]; then result="no finding"; else result="FINDING (exit $status): see $log and artifacts/$t"; fi
    echo "$(date -u +%FT%TZ) $t ${secs}s: ${runs:-no stats}, ${cov:-}, $result" | tee -a runs.log
done
