#!/usr/bin/env bash
# The one-command demo: builds holdfast, starts the gateway with the reference echo
# worker on loopback, holds thousands of idle TLS connections, relays frames at a fixed
# rate, and prints what it measured. Everything it starts is stopped when it exits, and
# every wait is bounded, so it always ends by itself.
#
# Environment (all optional):
#   HOLDFAST_CORES       gateway core threads (default 2)
#   HOLDFAST_PORT        client port on 127.0.0.1 (default 0: any free port)
#   HOLDFAST_ADMIN_PORT  admin port on 127.0.0.1 (default 0: any free port)
#   DEMO_CONNS           idle connections (default 6000; memory measured at half and at all,
#                        so the per-core receive-buffer rings are warm at both points)
#   DEMO_ECHO_CONNS      connections of the echo run (default 50)
#   DEMO_ECHO_RATE       frames per second of the echo run (default 2000)
#   DEMO_ECHO_SECS       seconds of the echo run (default 10)
#   DEMO_REPORTS         directory to copy the JSON reports into (default: not kept)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
cores=${HOLDFAST_CORES:-2}
port=${HOLDFAST_PORT:-0}
admin_port=${HOLDFAST_ADMIN_PORT:-0}
conns=${DEMO_CONNS:-6000}
echo_conns=${DEMO_ECHO_CONNS:-50}
echo_rate=${DEMO_ECHO_RATE:-2000}
echo_secs=${DEMO_ECHO_SECS:-10}

work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-demo.XXXXXX")
script=demo
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bin=$(target_dir)/release
install_cleanup 10

# bytes VALUE: a byte count rounded for people ("n/a" stays as is).
bytes() { awk -v v="$1" 'BEGIN { if (v == "null" || v == "") print "n/a"; else printf "%.0f B", v }'; }

fetch() {
    if command -v curl >/dev/null; then
        curl -fsS --max-time 5 "$1"
    else
        python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
    fi
}

say "building the workspace (release)"
cargo build --release --workspace --bins

# The load generator raises its own limit; raising the shell's lets the gateway
# inherit the hard limit too.
ulimit -n "$(ulimit -Hn)"

say "making a throw-away certificate in $work"
"$bin/holdfast-bench" gen-cert --out "$work"

say "starting the echo worker and the gateway ($cores cores)"
spawn worker "the echo worker" "holdfast-worker: listening on" 10 \
    "$bin/holdfast-worker" echo --socket "$work/worker.sock"
spawn gateway "the gateway" "holdfast ready" 30 \
    "$bin/holdfast" run --listen "127.0.0.1:$port" --cert "$work/cert.pem" --key "$work/key.pem" \
    --worker "$work/worker.sock" --cores "$cores" --admin "127.0.0.1:$admin_port" \
    --max-conns-per-ip 0
gateway=$spawned_pid
ready=$spawned_line
echo "$ready"
target=$(field "$ready" listen)
admin=$(field "$ready" admin)

status=0
say "holding $conns idle TLS connections"
timeout 900 "$bin/holdfast-bench" idle --target "$target" --ca "$work/ca.pem" \
    --conns "$conns" --steps "$((conns / 2)),$conns" --gateway-pid "$gateway" --json "$work/idle.json" || status=$?

say "relaying 64-byte frames: $echo_conns connections, $echo_rate frames/s for $echo_secs s"
timeout 300 "$bin/holdfast-bench" echo --target "$target" --ca "$work/ca.pem" \
    --conns "$echo_conns" --size 64 --rate "$echo_rate" --duration "$echo_secs" \
    --json "$work/echo.json" || status=$?

say "a few lines of http://$admin/metrics"
if metrics=$(fetch "http://$admin/metrics"); then
    grep -v '^#' <<<"$metrics" | grep -v ' 0$' | head -n 15 || true
else
    echo "(could not fetch the metrics)"
fi

say "what the demo measured"
if [[ -s $work/idle.json ]]; then
    printf '  idle connections held:         %s of %s (echo check: %s ok, %s failed)\n' \
        "$(json_value "$work/idle.json" conns_opened)" "$conns" \
        "$(json_value "$work/idle.json" echo_ok)" "$(json_value "$work/idle.json" echo_failed)"
    printf '  gateway memory per connection: %s userspace (Pss slope), %s kernel (gateway end)\n' \
        "$(bytes "$(json_value "$work/idle.json" userspace_bytes_per_conn)")" \
        "$(bytes "$(json_value "$work/idle.json" kernel_bytes_per_conn)")"
    echo "                                 (a few thousand connections still include allocator"
    echo "                                 warm-up; scripts/scale-idle.sh measures 10 000 -> 40 000)"
fi
if [[ -s $work/echo.json ]]; then
    printf '  echo: %s frames/s echoed of %s/s scheduled, %s lost\n' \
        "$(json_value "$work/echo.json" frames_per_sec | awk '{ printf "%.0f", $1 }')" "$echo_rate" \
        "$(json_value "$work/echo.json" frames_lost)"
    printf '  latency from schedule: p50 %s us, p99 %s us, p999 %s us, max %s us\n' \
        "$(json_value "$work/echo.json" p50_us)" "$(json_value "$work/echo.json" p99_us)" \
        "$(json_value "$work/echo.json" p999_us)" "$(json_value "$work/echo.json" max_us)"
fi
if [[ -n ${DEMO_REPORTS:-} ]]; then
    mkdir -p "$DEMO_REPORTS"
    cp "$work"/*.json "$DEMO_REPORTS"/ 2>/dev/null || true
    echo "  reports copied to $DEMO_REPORTS"
fi
if ((status != 0)); then
    echo "  some connections or frames failed (see above); exit status $status"
fi
exit "$status"
