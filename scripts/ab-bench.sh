#!/usr/bin/env bash
# A against B in one run: two builds of the gateway and its echo worker (or one build with
# two sets of gateway flags), measured alternately, round after round, on the same
# machine, so that a change is judged by what it bought in one run and not across a noisy
# afternoon. Each round of each side starts a fresh worker and gateway (gateway on
# SERVER_CPUS, one core; worker and load generator on the others, as in profile.sh), runs
# every scenario against it, and stops both. It prints, per scenario and side, the
# gateway's CPU per operation (the load generator's server CPU: utime + stime of the
# gateway), its userspace part, and the echo worker's own CPU per operation (from
# /proc/PID/stat around the whole load-generator run, warm-up and drain included, so a
# little above the true figure; compare it between A and B), round by round and the
# median, the p99 latency (echo: from each frame's scheduled send time; handshake: of a
# connection) round by round, and B ÷ A.
#
#   handshake, handshake-sha384, resumed, echo: as in profile.sh (scripts/lib.sh,
#   scenario_load); echo at ECHO_RATE
#
# Environment:
#   A_DIR, B_DIR  directories holding `holdfast` and `holdfast-worker` (default: both the
#                 release build, for A_ARGS against B_ARGS); the load generator is always
#                 BIN_DIR's `holdfast-bench` (default target/release)
#   A_ARGS, B_ARGS  extra flags for `holdfast run` on each side (default none)
#   SCENARIOS     which to run (default "echo")
#   ROUNDS        rounds (default 3); SECS seconds per scenario (default 4)
#   ECHO_CONNS    echo connections (default 100); ECHO_RATE frames/s (default 25000)
#   HS_PARALLEL   short-connection loops in flight (default 32)
#   SERVER_CPUS   the gateway's CPU (default 0); LOADGEN_CPUS the rest (default: others)
#   OUT_DIR       where the reports go (default target/ab/DATE-TIME)
#
# Example: the worker SDK before and after a change, at 25 000 frames/s:
#   A_DIR=/tmp/old B_DIR=target/release ROUNDS=3 scripts/ab-bench.sh
set -euo pipefail

caller=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
script="ab-bench"
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-ab.XXXXXX")
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
pids=()
install_cleanup 3

bin=${BIN_DIR:-$(target_dir)/release}
# A_DIR and B_DIR as given, relative to where the script was started.
absolute() { if [[ $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$caller/$1"; fi; }
a_dir=$(absolute "${A_DIR:-$bin}")
b_dir=$(absolute "${B_DIR:-$bin}")
scenarios=${SCENARIOS:-echo}
rounds=${ROUNDS:-3}
secs=${SECS:-4}
echo_conns=${ECHO_CONNS:-100}
echo_rate=${ECHO_RATE:-25000}
hs_parallel=${HS_PARALLEL:-32}
ncpu=$(nproc)
server_cpus=${SERVER_CPUS:-0}
loadgen_cpus=${LOADGEN_CPUS:-$(other_cpus "$ncpu")}
threads=$(count_cpus "$loadgen_cpus")
out=${OUT_DIR:-$(target_dir)/ab/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
for d in "$a_dir" "$b_dir"; do
    [[ -x $d/holdfast && -x $d/holdfast-worker ]] || die "$d lacks holdfast or holdfast-worker"
done
[[ -x $bin/holdfast-bench ]] || die "$bin/holdfast-bench is missing (cargo build --release)"
"$bin/holdfast-bench" gen-cert --out "$work" >/dev/null
hz=$(getconf CLK_TCK)

# cpu_ticks PID: utime + stime of PID (fields 14 and 15 of /proc/PID/stat).
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# side NAME DIR ARGS ROUND: one round of every scenario against a fresh gateway and worker.
side() {
    local name=$1 dir=$2 args=$3 round=$4 scenario load
    one_core_gateway "$name" "$dir" "$args"
    local worker=$worker_pid gateway=$gateway_pid
    for scenario in $scenarios; do
        scenario_load "$scenario"
        local json="$out/$scenario-$name-$round.json" before after ops
        before=$(cpu_ticks "$worker")
        timeout $((secs + 60)) taskset -c "$loadgen_cpus" "$bin/holdfast-bench" "${load[0]}" \
            --target "$target" --ca "$work/ca.pem" --server-pids "$gateway" --server-cores 1 \
            --threads "$threads" "${load[@]:1}" --json "$json" >"$out/$scenario-$name-$round.out" 2>&1 ||
            die "$scenario ($name): the load generator failed; see $out/$scenario-$name-$round.out"
        after=$(cpu_ticks "$worker")
        ops=$(json_value "$json" ops)
        printf '%s %s %s %s %s %s %s\n' "$scenario" "$name" "$round" \
            "$(json_value "$json" us_per_op)" "$(json_value "$json" user_us_per_op)" \
            "$(awk -v t=$((after - before)) -v hz="$hz" -v n="$ops" \
                'BEGIN { if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "nan" }')" \
            "$(json_value "$json" p99_us || true)" >>"$out/results.txt"
    done
    stop "$gateway" "$worker"
}

say "A: ${a_dir} ${A_ARGS:-}; B: ${b_dir} ${B_ARGS:-}; $rounds rounds of: $scenarios"
say "gateway on CPU $server_cpus (1 core), worker and load generator on $loadgen_cpus"
: >"$out/results.txt"
for ((round = 1; round <= rounds; round++)); do
    # Alternate which side goes first, so a slow drift of the machine hits both alike.
    if ((round % 2)); then
        side A "$a_dir" "${A_ARGS:-}" "$round"
        side B "$b_dir" "${B_ARGS:-}" "$round"
    else
        side B "$b_dir" "${B_ARGS:-}" "$round"
        side A "$a_dir" "${A_ARGS:-}" "$round"
    fi
done

python3 - "$out/results.txt" <<'EOF' | tee "$out/summary.md"
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
def f(x):
    try:
        return float(x)
    except ValueError:
        return float("nan")
def ratio(b, a):
    return f"{b / a:.2f}×" if a else "–"
print("| scenario | side | gateway CPU per op, by round | median | userspace | worker CPU per op | median | p99 latency, by round |")
print("|---|---|---|---|---|---|---|---|")
med = {}
for scenario in dict.fromkeys(r[0] for r in rows):
    for side in ("A", "B"):
        got = [r for r in rows if r[0] == scenario and r[1] == side]
        gw = [f(r[3]) for r in got]
        user = [f(r[4]) for r in got]
        wk = [f(r[5]) for r in got]
        p99 = [r[6] if len(r) > 6 and r[6] else "–" for r in got]
        med[(scenario, side)] = (statistics.median(gw), statistics.median(wk))
        print(f"| {scenario} | {side} | {' / '.join(f'{x:.1f}' for x in gw)} µs | "
              f"{statistics.median(gw):.2f} µs | {statistics.median(user):.2f} µs | "
              f"{' / '.join(f'{x:.1f}' for x in wk)} µs | {statistics.median(wk):.2f} µs | "
              f"{' / '.join(p99)} µs |")
print()
for scenario in dict.fromkeys(r[0] for r in rows):
    (ga, wa), (gb, wb) = med[(scenario, "A")], med[(scenario, "B")]
    print(f"{scenario}: gateway B ÷ A = {ratio(gb, ga)}, worker B ÷ A = {ratio(wb, wa)}")
EOF
say "reports in $out"
