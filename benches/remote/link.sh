#!/usr/bin/env bash
# benches/remote/link.sh — a shaped "remote" HTTP server on this machine:
#
#   client (host netns) --> delay proxy LINK_HOST_IP:LINK_PORT  (+DELAY_MS each way)
#       --> veth --> netns $LINK_NS: nginx LINK_NS_IP:LINK_PORT serving LINK_WWW
#   responses leave the namespace through tbf at LINK_RATE (server -> client)
#
# Sourced by benches/remote.sh (link_up / link_verify / link_down), or run alone:
#
#   sudo benches/remote/link.sh up DIR      # serve DIR until Ctrl-C (then tears down)
#   sudo benches/remote/link.sh verify      # up on a scratch dir, measure, tear down
#   sudo benches/remote/link.sh down        # remove a link left by a killed run
#
# Environment: BENCH_NS (smbench), BENCH_RATE (1gbit, tc units),
# BENCH_DELAY_MS (5, one way), BENCH_PORT (8080), BENCH_SUBNET (10.213.7,
# a /30: .1 host side, .2 namespace side), BENCH_TBF_BURST (256k).
# Needs root, ip, tc, nginx (nginx-light), rustc (for the delay proxy).

LINK_NS=${BENCH_NS:-smbench}
LINK_RATE=${BENCH_RATE:-1gbit}
LINK_DELAY_MS=${BENCH_DELAY_MS:-5}
LINK_PORT=${BENCH_PORT:-8080}
LINK_SUBNET=${BENCH_SUBNET:-10.213.7}
LINK_BURST=${BENCH_TBF_BURST:-256k}
LINK_HOST_IP=$LINK_SUBNET.1
LINK_NS_IP=$LINK_SUBNET.2
LINK_VETH_H=${LINK_NS:0:10}-h   # host end (interface names: 15 chars at most)
LINK_VETH_N=${LINK_NS:0:10}-n   # namespace end
LINK_URL=http://$LINK_HOST_IP:$LINK_PORT          # through the delay proxy
LINK_DIRECT_URL=http://$LINK_NS_IP:$LINK_PORT     # shaped, no delay
LINK_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LINK_TOOLS=${BENCH_TOOLS:-$LINK_REPO/target/bench-tools}
LINK_STATE=          # nginx prefix, logs and pid files (set by link_up)
LINK_PROXY_PID=
LINK_NGINX_PID=
LINK_UP=0

_link_log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# A process that exited but was not reaped yet (a daemon's parent here is
# the machine's init, which reaps late) still answers kill -0.
alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $st != Z* ]]; }

# The delay proxy, built with plain rustc (std only) once per source change.
link_build_proxy() {
    local src=$LINK_REPO/benches/remote/delayproxy.rs sum
    sum=$(sha256sum "$src" | cut -c1-16)
    LINK_PROXY_BIN=$LINK_TOOLS/delayproxy-$sum
    if [[ ! -x $LINK_PROXY_BIN ]]; then
        mkdir -p "$LINK_TOOLS"
        rustc --edition 2021 -O "$src" -o "$LINK_PROXY_BIN.tmp" && mv "$LINK_PROXY_BIN.tmp" "$LINK_PROXY_BIN" || return 1
    fi
}

# nginx-light when nginx is missing; the package's own service must not stay
# running (it would hold port 80 on the host, outside the namespace).
link_need_nginx() {
    command -v nginx >/dev/null && return 0
    _link_log "installing nginx-light"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; } >&2 || return 1
    if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
    # Without systemd (policy-rc.d usually forbids the start): stop what runs
    # from the system's pid file, if anything.
    if [[ -s /run/nginx.pid ]]; then
        kill "$(cat /run/nginx.pid)" 2>/dev/null || true
    fi
}

# link_up STATE_DIR WWW_DIR: namespace, veth, tbf, nginx, delay proxy.
link_up() {
    LINK_STATE=$1
    local www=$2 i
    if ip netns list | grep -qw "$LINK_NS"; then
        _link_log "network namespace $LINK_NS exists (a killed run?): sudo $LINK_REPO/benches/remote/link.sh down"
        return 1
    fi
    link_need_nginx || return 1
    link_build_proxy || return 1
    mkdir -p "$LINK_STATE/tmp"
    LINK_UP=1
    ip netns add "$LINK_NS"
    ip link add "$LINK_VETH_H" type veth peer name "$LINK_VETH_N"
    ip link set "$LINK_VETH_N" netns "$LINK_NS"
    ip addr add "$LINK_HOST_IP/30" dev "$LINK_VETH_H"
    ip link set "$LINK_VETH_H" up
    ip -n "$LINK_NS" addr add "$LINK_NS_IP/30" dev "$LINK_VETH_N"
    ip -n "$LINK_NS" link set "$LINK_VETH_N" up
    ip -n "$LINK_NS" link set lo up
    # Server -> client: the namespace's egress. tbf's bucket must hold a
    # whole GSO packet (64 KiB) or tbf splits it; latency bounds the queue.
    ip netns exec "$LINK_NS" tc qdisc add dev "$LINK_VETH_N" root tbf rate "$LINK_RATE" burst "$LINK_BURST" latency 10ms

    # nginx inside the namespace, as root (the scratch dirs are 0700), one
    # worker (sendfile: the kernel does the copying), keepalive without a
    # request limit (QEMU and snapmount reuse connections), every request
    # logged unbuffered with its Range, status and body bytes.
    cat >"$LINK_STATE/nginx.conf" <<EOF
user root;
worker_processes 1;
pid $LINK_STATE/nginx.pid;
daemon off;
error_log $LINK_STATE/nginx-error.log warn;
events { worker_connections 1024; }
http {
    log_format bench '\$msec \$request_method \$uri \$status "\$http_range" \$body_bytes_sent \$connection "\$http_if_match" \$connection_requests "\$http_connection" "\$http_user_agent"';
    access_log $LINK_STATE/access.log bench;
    client_body_temp_path $LINK_STATE/tmp/body;
    proxy_temp_path $LINK_STATE/tmp/proxy;
    fastcgi_temp_path $LINK_STATE/tmp/fastcgi;
    uwsgi_temp_path $LINK_STATE/tmp/uwsgi;
    scgi_temp_path $LINK_STATE/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    types { }
    default_type application/octet-stream;
    server {
        listen $LINK_NS_IP:$LINK_PORT;
        root $www;
        location / { }
    }
}
EOF
    : >"$LINK_STATE/access.log"
    # Not daemonized: our child (ip netns exec execs it), reaped on the way down.
    ip netns exec "$LINK_NS" nginx -p "$LINK_STATE" -c "$LINK_STATE/nginx.conf" 2>>"$LINK_STATE/nginx-error.log" &
    LINK_NGINX_PID=$!

    # Ahead of the daemons under test (2 cores): the emulated link must not
    # wait for CPU. It needs about 16 % of a core at 1 Gbit/s.
    nice -n -10 "$LINK_PROXY_BIN" "$LINK_HOST_IP:$LINK_PORT" "$LINK_NS_IP:$LINK_PORT" "$LINK_DELAY_MS" 2>>"$LINK_STATE/proxy.log" &
    LINK_PROXY_PID=$!
    for ((i = 0; i < 500; i++)); do
        if curl -s -o /dev/null "$LINK_URL/" 2>/dev/null; then
            _link_log "link up: $LINK_URL -> nginx in netns $LINK_NS ($LINK_DIRECT_URL), tbf $LINK_RATE on the server's egress, +${LINK_DELAY_MS} ms each way"
            return 0
        fi
        sleep 0.02
    done
    _link_log "the link did not come up (see $LINK_STATE/*.log)"
    return 1
}

link_down() {
    [[ $LINK_UP == 1 ]] || return 0
    local pid i
    set +e   # runs from EXIT traps: every step, whatever the one before did
    if [[ -n $LINK_PROXY_PID ]]; then
        kill "$LINK_PROXY_PID" 2>/dev/null
        wait "$LINK_PROXY_PID" 2>/dev/null
        LINK_PROXY_PID=
    fi
    if [[ -n $LINK_NGINX_PID ]]; then
        kill "$LINK_NGINX_PID" 2>/dev/null
        for ((i = 0; i < 250; i++)); do   # its worker exits first
            alive "$LINK_NGINX_PID" || break
            sleep 0.02
        done
        wait "$LINK_NGINX_PID" 2>/dev/null
        LINK_NGINX_PID=
    fi
    # Whatever still runs in the namespace was started here.
    for pid in $(ip netns pids "$LINK_NS" 2>/dev/null); do
        kill -9 "$pid" 2>/dev/null
    done
    ip netns del "$LINK_NS" 2>/dev/null           # takes both veth ends with it
    ip link del "$LINK_VETH_H" 2>/dev/null
    LINK_UP=0
}

# The access log's current length: count requests after it with link_requests.
link_mark() { stat -c %s "$LINK_STATE/access.log"; }

# link_requests MARK: "GETs HEADs body_bytes" logged since MARK.
link_requests() {
    tail -c +$(($1 + 1)) "$LINK_STATE/access.log" |
        awk '$2 == "GET" { g++ } $2 == "HEAD" { h++ } { b += $6 } END { printf "%d %d %.0f\n", g, h, b }'
}

# link_verify: prints "MIBS RTT_REUSED_MS RTT_NEW_MS DIRECT_RTT_MS" and logs them:
# the median of 3 downloads of a 256 MiB file, and the median time to first
# byte of a 1-byte file, on a kept-alive connection and on a new one.
link_verify() {
    local www=$1 i r rates=() reused=() fresh=() direct=()
    [[ -f $www/link-256M.bin ]] || dd if=/dev/urandom of="$www/link-256M.bin" bs=1M count=256 status=none
    echo x >"$www/link-1B.txt"
    cat "$www/link-256M.bin" >/dev/null   # the server's own page cache
    for i in 1 2 3; do
        rates+=("$(curl -sf -o /dev/null -w '%{speed_download}' "$LINK_URL/link-256M.bin")")
    done
    for i in 1 2 3 4 5 6 7; do
        # Two requests on one connection: the first pays the (emulated)
        # handshake, the second is a plain request/response.
        r=$(curl -sf -o /dev/null -o /dev/null -w '%{time_starttransfer}\n' "$LINK_URL/link-1B.txt" "$LINK_URL/link-1B.txt")
        fresh+=("$(sed -n 1p <<<"$r")")
        reused+=("$(sed -n 2p <<<"$r")")
        r=$(curl -sf -o /dev/null -o /dev/null -w '%{time_starttransfer}\n' "$LINK_DIRECT_URL/link-1B.txt" "$LINK_DIRECT_URL/link-1B.txt")
        direct+=("$(sed -n 2p <<<"$r")")
    done
    python3 - "${rates[*]}" "${reused[*]}" "${fresh[*]}" "${direct[*]}" <<'EOF'
import statistics, sys
rates, reused, fresh, direct = ([float(x) for x in a.split()] for a in sys.argv[1:])
print(f"{statistics.median(rates) / 2**20:.1f} {statistics.median(reused) * 1e3:.1f} "
      f"{statistics.median(fresh) * 1e3:.1f} {statistics.median(direct) * 1e3:.2f}")
EOF
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -Eeuo pipefail
    export LC_ALL=C
    [[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }
    case ${1:-} in
        up)
            [[ -d ${2:-} ]] || { echo "usage: $0 up DIR" >&2; exit 2; }
            state=$(mktemp -d /tmp/smbench-link.XXXXXX)
            trap 'link_down; rm -rf "$state"' EXIT
            trap 'exit 130' INT TERM
            link_up "$state" "$(cd "$2" && pwd)"
            echo "serving $2 at $LINK_URL/ (access log $state/access.log); Ctrl-C ends"
            wait "$LINK_PROXY_PID" || true
            ;;
        verify)
            state=$(mktemp -d /tmp/smbench-link.XXXXXX)
            trap 'link_down; rm -rf "$state"' EXIT
            trap 'exit 130' INT TERM
            mkdir "$state/www"
            link_up "$state" "$state/www"
            read -r mibs reused fresh direct < <(link_verify "$state/www")
            echo "256 MiB download: $mibs MiB/s; small request: ${reused} ms on a kept-alive connection, ${fresh} ms on a new one; without the delay proxy ${direct} ms"
            ;;
        down)
            LINK_UP=1
            for pid in $(ip netns pids "$LINK_NS" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
            pid=$(pgrep -f "delayproxy-[0-9a-f]+ $LINK_HOST_IP:$LINK_PORT " || true)
            [[ -n $pid ]] && kill $pid
            link_down || true
            ;;
        *) echo "usage: $0 up DIR | verify | down" >&2; exit 2 ;;
    esac
fi
