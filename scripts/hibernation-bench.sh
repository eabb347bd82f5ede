#!/usr/bin/env bash
# What hibernation buys and costs, measured side by side in one run: the same gateway
# build with hibernation off (--hibernate-after 0: rustls holds every connection) and on.
#
# 1. Memory: idle TLS 1.3 connections opened by the load generator, the gateway's Pss
#    sampled at 5 000, 15 000 and CONNS connections once they have settled (long enough to
#    hibernate); reported as the slopes 5 000 -> 15 000 and 15 000 -> CONNS per connection,
#    and the peak of holdfast_connections_hibernated seen while they were held.
# 2. The wake-up cost: ECHO_CONNS connections, each sending a 64-byte frame every
#    ECHO_CONNS / ECHO_RATE seconds (far longer than the hibernation delay, so with
#    hibernation on every frame finds its connection asleep): server CPU per echoed frame
#    off and on; the difference is what waking (deriving two keys) and sleeping cost.
#
# Environment (all optional):
#   CONNS            connections at the last memory step (default 40000)
#   HIBERNATE_AFTER  seconds, for the "on" runs (default 2)
#   ECHO_CONNS       connections of the wake-up run (default 2000)
#   ECHO_RATE        frames per second of the wake-up run (default 400)
#   ECHO_SECS        seconds of the wake-up run (default 15)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
conns=${CONNS:-40000}
hib=${HIBERNATE_AFTER:-2}
echo_conns=${ECHO_CONNS:-2000}
echo_rate=${ECHO_RATE:-400}
echo_secs=${ECHO_SECS:-15}
((conns > 15000)) || { echo "hibernation-bench: CONNS must be above 15000" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-hibernation.XXXXXX")
script=hibernation-bench
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bin=$(target_dir)/release
install_cleanup 15
ulimit -n "$(ulimit -Hn)"

say "building the workspace (release)"
cargo build --release --workspace --bins
"$bin/holdfast-bench" gen-cert --out "$work" >/dev/null
spawn worker "the echo worker" "holdfast-worker: listening on" 10 \
    "$bin/holdfast-worker" echo --socket "$work/worker.sock"

# start_gateway MODE SECS: a gateway with --hibernate-after SECS; sets gateway, target, admin.
start_gateway() {
    spawn "gateway-$1" "the gateway ($1)" "holdfast ready" 60 \
        "$bin/holdfast" run --listen 127.0.0.1:0 --admin 127.0.0.1:0 --cert "$work/cert.pem" \
        --key "$work/key.pem" --worker "$work/worker.sock" --hibernate-after "$2" \
        --max-conns-per-ip 0
    gateway=$spawned_pid
    target=$(field "$spawned_line" listen)
    admin=$(field "$spawned_line" admin)
}

# hibernated: the gateway's holdfast_connections_hibernated, summed over cores.
hibernated() {
    curl -s "http://$admin/metrics" |
        awk '/^holdfast_connections_hibernated\{/ { s += $2 } END { print s + 0 }'
}

declare -A slope_lo slope_hi peak echo_us
for mode in off on; do
    secs=0
    [[ $mode == on ]] && secs=$hib
    start_gateway "$mode" "$secs"

    say "memory, hibernation $mode: $conns idle connections (5000, 15000, $conns)"
    : >"$work/peak-$mode"
    (while kill -0 "$gateway" 2>/dev/null; do hibernated >>"$work/peak-$mode"; sleep 1; done) &
    sampler=$!
    timeout 1800 "$bin/holdfast-bench" idle --target "$target" --ca "$work/ca.pem" \
        --conns "$conns" --steps "5000,15000,$conns" --settle $((hib + 3)) \
        --gateway-pid "$gateway" --json "$work/idle-$mode.json"
    kill "$sampler" 2>/dev/null || true
    mapfile -t open < <(json_values "$work/idle-$mode.json" conns_open)
    mapfile -t pss < <(json_values "$work/idle-$mode.json" gateway_pss_bytes)
    for i in "${!open[@]}"; do
        awk -v c="${open[i]}" -v p="${pss[i]}" \
            'BEGIN { printf "  gateway Pss at %6d connections: %8.1f MiB\n", c, p / 1048576 }'
    done
    slope_lo[$mode]=$(awk -v a="${pss[0]}" -v b="${pss[1]}" -v n="${open[0]}" -v m="${open[1]}" \
        'BEGIN { printf "%.0f", (b - a) / (m - n) }')
    slope_hi[$mode]=$(awk -v a="${pss[1]}" -v b="${pss[2]}" -v n="${open[1]}" -v m="${open[2]}" \
        'BEGIN { printf "%.0f", (b - a) / (m - n) }')
    peak[$mode]=$(sort -n "$work/peak-$mode" | tail -n 1)
    printf '  all %s echoed at the end: %s\n' "$conns" "$(json_value "$work/idle-$mode.json" ok)"

    say "wake-up cost, hibernation $mode: $echo_conns connections, $echo_rate frames/s"
    "$bin/holdfast-bench" echo --target "$target" --ca "$work/ca.pem" --conns "$echo_conns" \
        --size 64 --rate "$echo_rate" --duration "$echo_secs" --server-pids "$gateway" \
        --json "$work/echo-$mode.json" >/dev/null
    echo_us[$mode]=$(json_value "$work/echo-$mode.json" server_cpu_us_per_frame)
    stop "$gateway"
done

say "summary (userspace Pss slope per idle TLS 1.3 connection; server CPU per 64-byte echo)"
printf '  %-16s %14s %18s %14s %18s\n' hibernation "5k->15k" "15k->$conns" "peak asleep" "us/frame"
for mode in off on; do
    printf '  %-16s %12s B %16s B %14s %18s\n' "$mode" "${slope_lo[$mode]}" "${slope_hi[$mode]}" \
        "${peak[$mode]}" "${echo_us[$mode]}"
done
awk -v off="${echo_us[off]}" -v on="${echo_us[on]}" \
    'BEGIN { printf "  server CPU per frame, on minus off (whole process, kernel included): %.1f us\n", on - off }'
echo "  (cargo bench -p holdfast --bench wakeup isolates the userspace cost of a wake-up)"
