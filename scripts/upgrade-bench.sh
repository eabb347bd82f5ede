#!/usr/bin/env bash
# The live upgrade at scale: one gateway process, its defaults on every core, holds CONNS
# TLS connections (40 000 by default: as many as two cores' fixed-file tables take under
# a 20 000 open-file limit; the load generator spreads its side over child processes),
# PROBES of them echoing and the rest idle; once they are all up and
# hibernated, the binary is upgraded in place UPGRADES times with `holdfast upgrade`. Each
# upgrade's wall time is reported (from the command's start to the old process's exit),
# with what each core logged for its hand-over, and the longest echo round trip that
# PROBES connections saw while they echoed back to back throughout: the longest pause a
# client saw. At the end every held connection must still echo on its first TCP
# connection and TLS session (the load generator never reconnects), and no new handshake
# may have been made beyond the probes'.
#
# It changes no sysctl. Environment (all optional):
#   CONNS           connections held, probes included (default 40000)
#   UPGRADES        upgrades in a row (default 2)
#   PROBES          probe connections echoing throughout (default 20)
#   SCALE_RATE      connections opened per second (default 2000)
#   HIBERNATE_WAIT  seconds to wait once all are up, so the idle ones hibernate (default 12)
#   UPGRADE_REPORT  file to copy the JSON report to (default: not kept)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
conns=${CONNS:-40000}
upgrades=${UPGRADES:-2}
probes=${PROBES:-20}
rate=${SCALE_RATE:-2000}
hibernate_wait=${HIBERNATE_WAIT:-12}
idle=$((conns - probes))

work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-upgrade.XXXXXX")
script=upgrade-bench
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bin=$(target_dir)/release
pid_file=$work/holdfast.pid
install_cleanup 15
# The process serving at the end is the last upgrade's, which this shell did not start:
# stop whichever one the pid file names, too.
# shellcheck disable=SC2317 # only ever invoked by the EXIT trap
stop_current() {
    local status=$? p
    p=$(cat "$pid_file" 2>/dev/null || true)
    [[ -z $p ]] || pids+=("$p")
    (exit "$status")
    cleanup
}
trap stop_current EXIT

ulimit -n "$(ulimit -Hn)"

say "building the workspace (release)"
cargo build --release --workspace --bins

"$bin/holdfast-bench" gen-cert --out "$work" >/dev/null

say "starting the echo worker and the gateway (defaults, every core)"
spawn worker "the echo worker" "holdfast-worker: listening on" 10 \
    "$bin/holdfast-worker" echo --socket "$work/worker.sock"
spawn gateway "the gateway" "holdfast ready" 60 \
    "$bin/holdfast" run --listen "127.0.0.1:0" --cert "$work/cert.pem" --key "$work/key.pem" \
    --worker "$work/worker.sock" --admin "127.0.0.1:0" --max-conns-per-ip 0 \
    --pid-file "$pid_file"
gateway=$spawned_pid
ready=$spawned_line
echo "$ready"
target=$(field "$ready" listen)
admin=$(field "$ready" admin)

metric() {
    curl -fsS -m 5 "http://$admin/metrics" |
        awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%d\n", s }'
}

# The hook the load generator runs once every connection is up: wait for hibernation,
# then upgrade, timing each one.
cat >"$work/upgrades.sh" <<'EOF'
set -eu
sleep "$HIBERNATE_WAIT"
hibernated=$(curl -fsS -m 5 "http://$ADMIN/metrics" |
    awk '$1 ~ /^holdfast_connections_hibernated([{]|$)/ { s += $NF } END { print s + 0 }')
echo "before the upgrade: $hibernated connections hibernated"
for i in $(seq "$UPGRADES"); do
    start=$(date +%s%N)
    "$BIN/holdfast" upgrade --pid-file "$PID_FILE" --timeout 120
    end=$(date +%s%N)
    echo "upgrade $i: $(((end - start) / 1000000)) ms"
done
EOF
export HIBERNATE_WAIT=$hibernate_wait ADMIN=$admin UPGRADES=$upgrades BIN=$bin PID_FILE=$pid_file

handshakes_before=$(metric holdfast_handshakes_total)
say "holding $idle idle TLS connections and $probes echoing, then $upgrades upgrade(s)"
status=0
timeout 1800 "$bin/holdfast-bench" idle --target "$target" --ca "$work/ca.pem" \
    --conns "$idle" --steps "$((idle / 2)),$idle" --rate "$rate" --gateway-pid "$gateway" \
    --probes "$probes" --then-run "bash $work/upgrades.sh" \
    --json "$work/upgrade.json" || status=$?

say "summary"
report=$work/upgrade.json
[[ -s $report ]] || die "no report was written"
handshakes_after=$(metric holdfast_handshakes_total)
echo "  the gateway logged, per core and upgrade:"
grep -h "connections handed over\|connections taken over" "$work/gateway.err" "$work/gateway.out" |
    sed 's/\x1b\[[0-9;]*m//g; s/^/    /' || true
printf '  held %s idle connections; every one echoed at the end: %s (%s ok, %s failed)\n' \
    "$idle" "$(json_value "$report" ok)" "$(json_value "$report" echo_ok)" \
    "$(json_value "$report" echo_failed)"
printf '  longest probe round trip (the longest pause): %.1f ms over %s round trips, %s probe(s) failed\n' \
    "$(json_value "$report" longest_round_trip_ms)" "$(json_value "$report" round_trips)" \
    "$(json_value "$report" failed)"
new=$((handshakes_after - handshakes_before))
printf '  handshakes during the run: %s (%s idle connections + %s probes)\n' "$new" "$idle" "$probes"
if ((new != conns)); then
    warn "handshakes beyond the connections and probes: a client reconnected"
    status=1
fi
if [[ -n ${UPGRADE_REPORT:-} ]]; then
    cp "$report" "$UPGRADE_REPORT"
    echo "  report copied to $UPGRADE_REPORT"
fi
exit "$status"
