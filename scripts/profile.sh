#!/usr/bin/env bash
# Where the gateway's CPU goes, per operation: runs the gateway on one core (SERVER_CPUS)
# with its echo worker and the load generator on the other CPUs, records every thread of
# the gateway with `perf record` (the cpu-clock software event, user and kernel, which
# works on virtual machines without hardware counters) while the load generator drives
# one scenario, and prints the breakdown: userspace against kernel, by group (crypto,
# rustls, holdfast, allocator; the kernel's TCP, io_uring, scheduler, ...) and by
# function, each in microseconds per operation (the scenario's measured server CPU per
# operation times the group's share of the samples), and the gateway's system calls per
# operation (perf stat on the syscall tracepoints, counted in the same window).
#
#   handshake  short connections: connect, full TLS 1.3 handshake, one echo, close
#              (the client offers AES-128-GCM first, as browsers and phones do)
#   handshake-sha384  the same with the suites in rustls' client order (AES-256-GCM with
#              SHA-384 first), to see what the suite costs in the same run
#   resumed    the same as handshake, resuming with a session ticket
#   echo       64-byte frames through the worker and back, open loop at ECHO_RATE
#
# Environment (all optional):
#   SCENARIOS     which to run (default "handshake resumed echo")
#   SECS          seconds of load per scenario (default 5)
#   HS_PARALLEL   short-connection loops in flight (default 32)
#   ECHO_CONNS    echo connections (default 100)
#   ECHO_RATE     echo frames per second (default 100000: past what one load-generator
#                 core sends, so the gateway runs as busy as the client lets it)
#   THREADS       load-generator threads (default: one per load-generator CPU)
#   SERVER_CPUS   the gateway's CPUs (default 0); LOADGEN_CPUS the rest (default: others)
#   TOP           functions listed per scenario (default 25)
#   OUT_DIR       where perf data and reports go (default target/profile/DATE-TIME)
#   NO_BUILD=1    use the binaries in BIN_DIR as they are (default target/release)
#   GATEWAY_ARGS  extra flags for `holdfast run`
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
script="profile"
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-profile.XXXXXX")
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
pids=()
install_cleanup 3

command -v perf >/dev/null || die "perf is not installed (Debian: apt-get install linux-perf)"
scenarios=${SCENARIOS:-handshake resumed echo}
secs=${SECS:-5}
hs_parallel=${HS_PARALLEL:-32}
echo_conns=${ECHO_CONNS:-100}
echo_rate=${ECHO_RATE:-100000}
top=${TOP:-25}
ncpu=$(nproc)
server_cpus=${SERVER_CPUS:-0}
loadgen_cpus=${LOADGEN_CPUS:-$(other_cpus "$ncpu")}
threads=${THREADS:-$(count_cpus "$loadgen_cpus")}
bin=${BIN_DIR:-$(target_dir)/release}
out=${OUT_DIR:-$(target_dir)/profile/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

if [[ ${NO_BUILD:-} != 1 ]]; then
    say "building (release)"
    cargo build --release --workspace --bins
fi
"$bin/holdfast-bench" gen-cert --out "$work" >/dev/null

say "gateway on CPU $server_cpus (1 core), worker and load generator ($threads threads) on $loadgen_cpus"
one_core_gateway profile "$bin" "${GATEWAY_ARGS:-}"
gateway=$gateway_pid
common=(--target "$target" --ca "$work/ca.pem" --server-pids "$gateway" --server-cores 1
    --threads "$threads")

for scenario in $scenarios; do
    scenario_load "$scenario"
    say "$scenario: ${load[*]}"
    taskset -c "$loadgen_cpus" perf record -q -e cpu-clock -F 2999 -g -p "$gateway" \
        -o "$out/$scenario.perf" 2>"$out/$scenario.perf.log" &
    perf_pid=$!
    pids+=("$perf_pid")
    # System calls of the gateway in the same window (tracepoints; counted, not sampled).
    taskset -c "$loadgen_cpus" perf stat -x, -o "$out/$scenario.syscalls" -p "$gateway" \
        -e raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter \
        -e syscalls:sys_enter_getpeername,syscalls:sys_enter_close 2>/dev/null &
    stat_pid=$!
    pids+=("$stat_pid")
    sleep 0.5
    timeout $((secs + 60)) taskset -c "$loadgen_cpus" "$bin/holdfast-bench" "${load[0]}" \
        "${common[@]}" "${load[@]:1}" --json "$out/$scenario.json" >"$out/$scenario.out" 2>&1 ||
        warn "$scenario: the load generator failed; see $out/$scenario.out"
    kill -INT "$perf_pid" "$stat_pid" 2>/dev/null || true
    wait "$perf_pid" "$stat_pid" 2>/dev/null || true
    pids=("${pids[@]/$perf_pid/}")
    pids=("${pids[@]/$stat_pid/}")
    perf report -i "$out/$scenario.perf" --stdio --no-children -g none --percent-limit 0 \
        --sort dso,sym 2>/dev/null >"$out/$scenario.report" || true
    us=$(json_value "$out/$scenario.json" us_per_op)
    user_us=$(json_value "$out/$scenario.json" user_us_per_op)
    busy=$(json_value "$out/$scenario.json" utilization || true)
    python3 scripts/profile-groups.py "$out/$scenario.report" "$scenario" "${us:-null}" \
        "${user_us:-null}" "$top" "${busy:-}" | tee "$out/$scenario.md"
    ops=$(json_value "$out/$scenario.json" ops)
    if [[ -s $out/$scenario.syscalls && ${ops:-0} -gt 0 ]]; then
        awk -F, -v n="$ops" 'NF > 2 && $1 ~ /^[0-9]/ { sub(/^[a-z_]+:sys_enter_?/, "", $3);
            printf "%s%s %.2f", (k++ ? ", " : "\nsystem calls per operation: "), ($3 == "" ? "all" : $3), $1 / n }
            END { if (k) print "" }' "$out/$scenario.syscalls" | tee -a "$out/$scenario.md"
    fi
done

stop "$gateway"
say "perf data, reports and breakdowns in $out"
