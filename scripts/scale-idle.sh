#!/usr/bin/env bash
# The scale proof: one gateway process, with its defaults on every core, holds CONNS
# idle TLS connections (40 000 by default: twice one process's 20 000 open-file limit,
# which bounds each core's fixed-file table separately; a core that fills stops listening
# and the rest go to the other), every one of which still echoes at the end. Memory is
# sampled at 10 000 and at CONNS connections and reported per connection as the slope
# between the two.
#
# It changes no sysctl: where the host's settings look too small it only warns. The load
# generator spreads its side over processes of at most 9 000 connections each.
#
# Environment (all optional):
#   CONNS                connections at the last step (default 40000)
#   SCALE_RATE           connections opened per second (default 2000)
#   HOLDFAST_PORT        client port on 127.0.0.1 (default 0: any free port)
#   HOLDFAST_ADMIN_PORT  admin port on 127.0.0.1 (default 0: any free port)
#   SCALE_REPORT         file to copy the JSON report to (default: not kept)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
conns=${CONNS:-40000}
first=10000
rate=${SCALE_RATE:-2000}
port=${HOLDFAST_PORT:-0}
admin_port=${HOLDFAST_ADMIN_PORT:-0}
((conns > first)) || { echo "scale-idle: CONNS must be above $first" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-scale.XXXXXX")
script=scale-idle
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
bin=$(target_dir)/release
install_cleanup 15

say "checking the host (nothing is changed)"
ulimit -n "$(ulimit -Hn)"
echo "open-file limit: $(ulimit -n)"
somaxconn=$(cat /proc/sys/net/core/somaxconn)
if ((somaxconn < 4096)); then
    warn "net.core.somaxconn is $somaxconn; bursts of new connections may overflow the accept backlog (kernel-tuning/ raises it)"
fi
read -r lo hi </proc/sys/net/ipv4/ip_local_port_range
# Each of the 253 source addresses has the whole ephemeral range to itself.
if (((hi - lo + 1) * 253 < conns * 2)); then
    warn "net.ipv4.ip_local_port_range is $lo-$hi: tight for $conns connections over 253 source addresses"
fi
if (($(ulimit -n) < 10000)); then
    warn "the open-file limit $(ulimit -n) is below what a child process of the load generator needs (9 000 connections)"
fi

say "building the workspace (release)"
cargo build --release --workspace --bins

"$bin/holdfast-bench" gen-cert --out "$work" >/dev/null

say "starting the echo worker and the gateway (defaults, every core)"
spawn worker "the echo worker" "holdfast-worker: listening on" 10 \
    "$bin/holdfast-worker" echo --socket "$work/worker.sock"
spawn gateway "the gateway" "holdfast ready" 60 \
    "$bin/holdfast" run --listen "127.0.0.1:$port" --cert "$work/cert.pem" --key "$work/key.pem" \
    --worker "$work/worker.sock" --admin "127.0.0.1:$admin_port" --max-conns-per-ip 0
gateway=$spawned_pid
ready=$spawned_line
echo "$ready"
target=$(field "$ready" listen)

say "opening $conns idle TLS connections at $rate/s (measured at $first and $conns)"
status=0
timeout 1800 "$bin/holdfast-bench" idle --target "$target" --ca "$work/ca.pem" \
    --conns "$conns" --steps "$first,$conns" --rate "$rate" \
    --gateway-pid "$gateway" --json "$work/idle.json" || status=$?

say "summary"
report=$work/idle.json
[[ -s $report ]] || die "no report was written"
mapfile -t open < <(json_values "$report" conns_open)
mapfile -t pss < <(json_values "$report" gateway_pss_bytes)
for i in "${!open[@]}"; do
    awk -v c="${open[i]}" -v p="${pss[i]}" \
        'BEGIN { printf "  gateway Pss at %6d connections: %8.1f MiB\n", c, p / 1048576 }'
done
awk -v u="$(json_value "$report" userspace_bytes_per_conn)" \
    -v k="$(json_value "$report" kernel_bytes_per_conn)" \
    -v s="$(json_value "$report" tcp_sockets_per_conn)" 'BEGIN {
        printf "  per connection: %.0f B userspace (Pss slope), %.0f B kernel (gateway end, %s TCP sockets per connection)\n", u, k, s
    }'
printf '  connected %s of %s; connect failed %s, handshake failed %s, first echo failed %s, dropped while idle %s\n' \
    "$(json_value "$report" conns_opened)" "$conns" "$(json_value "$report" connect_failed)" \
    "$(json_value "$report" handshake_failed)" "$(json_value "$report" first_echo_failed)" \
    "$(json_value "$report" dropped_while_idle)"
printf '  every connection echoed at the end: %s (%s ok, %s failed)\n' \
    "$(json_value "$report" ok)" "$(json_value "$report" echo_ok)" "$(json_value "$report" echo_failed)"
if [[ -n ${SCALE_REPORT:-} ]]; then
    cp "$report" "$SCALE_REPORT"
    echo "  report copied to $SCALE_REPORT"
fi
exit "$status"
