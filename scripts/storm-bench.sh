#!/usr/bin/env bash
# A reconnect storm against the admission limits, full against resumed, in one run: one
# release-build gateway whose cores each allow RATE full handshakes per second, and
# CLIENTS clients that connect, sit idle, drop their sockets at the same instant and all
# reconnect at once (`holdfast-bench storm`). First with full handshakes, then with each
# client offering the session ticket of its first connection. Reports, for each: the time
# until everyone is back, the full-handshake rate the gateway held against its cap, what
# waited for a slot and what was refused, accept-queue overflows, and the gateway's CPU per
# reconnect.
#
# It changes no sysctl. Environment (all optional):
#   CLIENTS        clients in the storm (default 15000: within one process's open files)
#   RATE           limits.handshakes_per_sec_per_core (default 600)
#   STORM_REPORTS  directory to copy the two JSON reports to (default: not kept)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
clients=${CLIENTS:-15000}
rate=${RATE:-600}

work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-storm.XXXXXX")
script=storm-bench
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bin=$(target_dir)/release
install_cleanup 15
ulimit -n "$(ulimit -Hn)"

say "building the workspace (release)"
cargo build --release --workspace --bins

"$bin/holdfast-bench" gen-cert --out "$work" >/dev/null
cat >"$work/gateway.toml" <<EOF
[limits]
handshakes_per_sec_per_core = $rate
handshake_wait_ms = 20000
max_conns_per_ip = 0
EOF

say "starting the echo worker and the gateway (release, every core, $rate handshakes/s per core)"
spawn worker "the echo worker" "holdfast-worker: listening on" 10 \
    "$bin/holdfast-worker" echo --socket "$work/worker.sock"
spawn gateway "the gateway" "holdfast ready" 60 \
    "$bin/holdfast" run --listen "127.0.0.1:0" --cert "$work/cert.pem" --key "$work/key.pem" \
    --worker "$work/worker.sock" --admin "127.0.0.1:0" --config "$work/gateway.toml" \
    --handshake-timeout 30
gateway=$spawned_pid
ready=$spawned_line
echo "$ready"
target=$(field "$ready" listen)
admin=$(field "$ready" admin)
cores=$(field "$ready" cores)
cap=$((rate * cores))

metric() {
    curl -fsS -m 5 "http://$admin/metrics" |
        awk -v m="$1" -v l="$2" '($1 == m || index($1, m "{") == 1) && index($1, l) { s += $NF }
            END { printf "%d\n", s }'
}

status=0
rows=()
for mode in full resumed; do
    flags=()
    [[ $mode == full ]] || flags=(--resume)
    queued0=$(metric holdfast_handshakes_queued_total "")
    refused0=$(metric holdfast_closes_total 'reason="handshake_overload"')
    say "storm of $clients clients, $mode handshakes"
    timeout 600 "$bin/holdfast-bench" storm --target "$target" --ca "$work/ca.pem" \
        --conns "$clients" --threads 2 --connect-rate "$cap" --timeout 60 --settle 0.5 \
        --sources 127.0.2.1-127.0.2.60 --server-cores "$cores" --server-pids "$gateway" \
        ${flags[@]+"${flags[@]}"} --json "$work/storm-$mode.json" || status=$?
    r=$work/storm-$mode.json
    [[ -s $r ]] || die "no report from the $mode storm"
    queued=$(($(metric holdfast_handshakes_queued_total "") - queued0))
    refused=$(($(metric holdfast_closes_total 'reason="handshake_overload"') - refused0))
    secs=$(json_value "$r" recovery_secs)
    full=$(json_value "$r" full)
    rows+=("$(printf '| %s | %s of %s | %.2f s | %s full, %s resumed | %.0f/s (cap %s/s) | %s | %s | %s | %.0f µs |' \
        "$mode" "$(json_value "$r" back)" "$clients" "$secs" "$full" \
        "$(json_value "$r" resumed)" "$(awk -v f="$full" -v s="$secs" 'BEGIN { print f / s }')" \
        "$cap" "$queued" "$refused" "$(json_value "$r" listen_overflows)" \
        "$(json_value "$r" server_cpu_us_per_reconnect)")")
    [[ -z ${STORM_REPORTS:-} ]] || cp "$r" "$STORM_REPORTS/"
done

say "summary ($clients clients, $cores cores, release build)"
echo "| storm | back | all back in | handshakes | full-handshake rate | waited for a slot (both phases) | refused | accept-queue overflows | server CPU per reconnect |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit "$status"
