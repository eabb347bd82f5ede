#!/usr/bin/env bash
# The peer comparison: holdfast against nginx (stream), HAProxy and a plain tokio +
# tokio-rustls terminator, each terminating TLS in front of an echo backend on a Unix
# socket, on the same CPUs, in the same run, with the same load generator and scenarios:
#
#   idle       memory per idle TLS connection (Pss slope between connection counts)
#   handshake  short connections (connect, full TLS 1.3 handshake, one echo, close):
#              server CPU per handshake, handshakes/s per server core
#   resumed    the same with session resumption
#   echo       64-byte frames at two fixed open-loop rates: at the higher one, server CPU
#              per frame and frames/s per core at full load; at the lower one (where the
#              load generator keeps its timetable easily), p50/p99/p999 latency
#   storm      N clients drop and reconnect at once: time until all are back
#   saturated  the server held to SAT_QUOTA % of its core (the kernel's cpu controller),
#              so that one load-generator core offers it more 64-byte frames (SAT_RATE)
#              than it can take: server CPU per frame with the server's CPU the limit. A
#              second table, compared with holdfast saturated the same way.
#
# plus rustls alone in memory (the ceiling). Every scenario runs RUNS times, the systems
# taking turns within each round so that noise from other work on the machine spreads
# over all of them; the table shows the median of the runs with the spread (min–max).
# The server runs pinned to SERVER_CPUS with taskset, the load generator and the echo
# backend to LOADGEN_CPUS; on a 2-core machine that is CPU 0 for the server and CPU 1 for
# everything else. Each system is started fresh for every round, so every idle
# measurement starts from a clean heap.
#
# nginx and HAProxy come from the distribution (Debian: nginx-light or nginx with
# libnginx-mod-stream, haproxy) and are installed with apt-get when missing and the
# script runs as root (NO_INSTALL=1 skips that; a peer that cannot be run is left out).
# Backends: nginx, HAProxy and the baseline open one backend connection per client, to
# `holdfast-bench unix-echo` (a byte echo: native frames come back unchanged);
# holdfast multiplexes every client over one link per core to `holdfast-worker echo`.
#
# It prints ONE markdown table at the end and keeps every JSON report, the table and an
# SVG chart in OUT_DIR. Everything it starts is stopped by pid when it exits, and every
# step has a time limit.
#
# Environment (all optional):
#   QUICK=1          about 2-3 minutes: 2 rounds, fewer connections, shorter windows
#   RUNS             rounds (default 3; QUICK 2)
#   PEERS            systems to run (default "holdfast baseline nginx haproxy"); add
#                    holdfast-ring for the gateway built with the ring provider instead of
#                    aws-lc-rs (built into RING_TARGET_DIR, default target/ring), so a
#                    provider change is measured before and after in the same run; and
#                    holdfast-batched for the gateway with --batch-wait-us BATCH_US
#                    (default 200), completion batching against none in the same run
#   SERVER_CPUS      CPUs of the server, taskset list (default 0)
#   LOADGEN_CPUS     CPUs of the load generator and backend (default: every other CPU)
#   LOADGEN_THREADS  load-generator threads (rings) for handshake, echo and storm
#                    (default: one per load-generator CPU), so that on a big box the
#                    client side is not one core
#   IDLE_STEPS       idle connection counts (default 2000,4000,6000; QUICK 2000,3000)
#   IDLE_RATE        idle connections opened per second (default 1500)
#   HS_SECS          seconds per handshake window (default 4; QUICK 1)
#   HS_PARALLEL      short-connection loops in flight (default 32)
#   ECHO_CONNS       echo connections (default 100)
#   ECHO_RATE        echo frames per second of the latency run, open loop (default 5000)
#   ECHO_LOAD_RATE   echo frames per second of the CPU run (default 25000)
#   ECHO_SECS        seconds of each echo run (default 4; QUICK 1)
#   STORM_CONNS      clients in the storm (default 2000; QUICK 500)
#   CEILING_SECS     seconds per part of the rustls ceiling (default 2; QUICK 0.5)
#   SAT_QUOTA        percent of one CPU the whole server (every process and thread of
#                    it, whatever SERVER_CPUS says) gets in the saturated run: 10 to 100
#                    (default 15); 0 leaves the saturated run out. Needs root and a cpu
#                    cgroup controller. A server that keeps up with SAT_RATE there is not
#                    saturated (its latency stays low) and its figure is only an upper
#                    bound: lower the quota until every server falls behind
#   SAT_RATE         frames per second offered in the saturated run (default 80000: more
#                    than any system here relays on 15 % of a core)
#   OUT_DIR          where reports go (default target/compare-peers/DATE-TIME)
#   NO_BUILD=1       use the binaries in BIN_DIR as they are
#   BIN_DIR          the binaries (default $CARGO_TARGET_DIR/release, or target/release)
#   NO_INSTALL=1     never run apt-get
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
quick=${QUICK:-0}
if [[ $quick == 1 ]]; then
    runs=${RUNS:-2}
    idle_steps=${IDLE_STEPS:-2000,3000}
    hs_secs=${HS_SECS:-1}
    echo_secs=${ECHO_SECS:-1}
    storm_conns=${STORM_CONNS:-500}
    ceiling_secs=${CEILING_SECS:-0.5}
else
    runs=${RUNS:-3}
    idle_steps=${IDLE_STEPS:-2000,4000,6000}
    hs_secs=${HS_SECS:-4}
    echo_secs=${ECHO_SECS:-4}
    storm_conns=${STORM_CONNS:-2000}
    ceiling_secs=${CEILING_SECS:-2}
fi
peers=${PEERS:-holdfast baseline nginx haproxy}
idle_rate=${IDLE_RATE:-1500}
hs_parallel=${HS_PARALLEL:-32}
echo_conns=${ECHO_CONNS:-100}
echo_rate=${ECHO_RATE:-5000}
echo_load_rate=${ECHO_LOAD_RATE:-25000}
sat_quota=${SAT_QUOTA:-15}
sat_rate=${SAT_RATE:-80000}
[[ $sat_quota == 0 ]] || ((sat_quota >= 10 && sat_quota <= 100)) ||
    { echo "compare-peers: SAT_QUOTA must be 0 or 10 to 100, not $sat_quota" >&2; exit 1; }
ncpu=$(nproc)
server_cpus=${SERVER_CPUS:-0}
out=${OUT_DIR:-$root/target/compare-peers/$(date +%Y%m%d-%H%M%S)}
idle_conns=${idle_steps##*,}

work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-peers.XXXXXX")
chmod 755 "$work"
script=compare-peers
say_fd=2 # progress on stderr: stdout carries only the table
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
loadgen_cpus=${LOADGEN_CPUS:-$(other_cpus "$ncpu")}
bin=${BIN_DIR:-$(target_dir)/release}
ring_target=${RING_TARGET_DIR:-$(target_dir)/ring}
ring_bin=$ring_target/release
install_cleanup 5

# free_port FROM: the first port from FROM up that nothing listens on.
free_port() {
    local p=$1
    while listening "$p"; do
        p=$((p + 1))
        ((p < $1 + 200)) || die "no free port near $1"
    done
    echo "$p"
}

nginx_stream_module() {
    # Prints the load_module line nginx needs for the stream module ("" when built in);
    # fails when nginx has no stream module at all.
    local v
    v=$(nginx -V 2>&1)
    if grep -q -- '--with-stream=dynamic' <<<"$v"; then
        local m
        for m in /usr/lib/nginx/modules/ngx_stream_module.so /usr/share/nginx/modules/ngx_stream_module.so; do
            if [[ -f $m ]]; then
                echo "load_module $m;"
                return 0
            fi
        done
        return 1
    fi
    grep -q -- '--with-stream\b' <<<"$v"
}

install_peers() {
    local want=() p
    for p in $peers; do
        case $p in
            nginx) { command -v nginx >/dev/null && nginx_stream_module >/dev/null; } || want+=(nginx) ;;
            haproxy) command -v haproxy >/dev/null || want+=(haproxy) ;;
        esac
    done
    ((${#want[@]} > 0)) || return 0
    if [[ ${NO_INSTALL:-0} == 1 ]] || ((EUID != 0)) || ! command -v apt-get >/dev/null; then
        warn "not installing ${want[*]} (needs root and apt-get; NO_INSTALL=${NO_INSTALL:-0}); those peers are left out"
        return 0
    fi
    local pkgs=()
    for p in "${want[@]}"; do
        case $p in
            nginx) pkgs+=(nginx-light libnginx-mod-stream) ;;
            haproxy) pkgs+=(haproxy) ;;
        esac
    done
    say "installing ${pkgs[*]} from the distribution"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y "${pkgs[@]}" >"$work/apt.log" 2>&1; then
        # nginx-light is a transitional package on newer releases; the plain one will do.
        timeout 300 apt-get update >>"$work/apt.log" 2>&1 || true
        pkgs=("${pkgs[@]/nginx-light/nginx}")
        timeout 600 apt-get install -y "${pkgs[@]}" >>"$work/apt.log" 2>&1 ||
            warn "apt-get install ${pkgs[*]} failed (see below); missing peers are left out
$(tail -n 5 "$work/apt.log")"
    fi
}

# available PEER: whether PEER can be run here.
available() {
    case $1 in
        holdfast) [[ -x $bin/holdfast && -x $bin/holdfast-worker ]] ;;
        holdfast-ring) [[ -x $ring_bin/holdfast && -x $bin/holdfast-worker ]] ;;
        holdfast-batched) [[ -x $bin/holdfast && -x $bin/holdfast-worker ]] ;;
        baseline) [[ -x $bin/holdfast-baseline ]] ;;
        nginx) command -v nginx >/dev/null && nginx_stream_module >/dev/null ;;
        haproxy) command -v haproxy >/dev/null ;;
        *) return 1 ;;
    esac
}

label_of() {
    case $1 in
        holdfast) echo "holdfast" ;;
        holdfast-ring) echo "holdfast (ring provider)" ;;
        holdfast-batched) echo "holdfast (batch-wait ${BATCH_US:-200} us)" ;;
        baseline) echo "tokio-rustls baseline" ;;
        nginx) echo "nginx $(nginx -v 2>&1 | sed -n 's|.*nginx/\([^ ]*\).*|\1|p')" ;;
        haproxy) echo "HAProxy $(haproxy -v 2>/dev/null | sed -n '1s/.*version \([^ ]*\).*/\1/p')" ;;
    esac
}

# start PEER DIR: starts PEER's backend and server with their files in DIR; sets
# server_pid, backend_pid and target, or returns non-zero.
start() {
    local peer=$1 dir=$2 ready port
    mkdir -p "$dir"
    chmod 755 "$dir"
    server_pid='' backend_pid='' target=''
    if [[ $peer == holdfast* ]]; then
        taskset -c "$loadgen_cpus" "$bin/holdfast-worker" --log warn echo --socket "$dir/backend.sock" \
            >"$dir/backend.out" 2>"$dir/backend.log" &
        backend_pid=$!
        pids+=("$backend_pid")
        wait_line "$dir/backend.out" "holdfast-worker: listening on" 10 "$backend_pid" >/dev/null ||
            { warn "holdfast-worker did not start: $(tail -n 3 "$dir/backend.log")"; return 1; }
    else
        taskset -c "$loadgen_cpus" "$bin/holdfast-bench" unix-echo --socket "$dir/backend.sock" \
            >"$dir/backend.out" 2>"$dir/backend.log" &
        backend_pid=$!
        pids+=("$backend_pid")
        wait_line "$dir/backend.out" "holdfast-bench unix-echo: listening on" 10 "$backend_pid" >/dev/null ||
            { warn "unix-echo did not start: $(tail -n 3 "$dir/backend.log")"; return 1; }
        chmod 666 "$dir/backend.sock"
    fi
    case $peer in
        holdfast | holdfast-ring | holdfast-batched)
            local gateway=$bin/holdfast extra=()
            [[ $peer != holdfast-ring ]] || gateway=$ring_bin/holdfast
            [[ $peer != holdfast-batched ]] || extra=(--batch-wait-us "${BATCH_US:-200}")
            RUST_LOG=warn taskset -c "$server_cpus" "$gateway" run --listen 127.0.0.1:0 \
                --cert "$work/cert.pem" --key "$work/key.pem" --worker "$dir/backend.sock" \
                --cores "$server_cores" --admin 127.0.0.1:0 --drain-grace 1 \
                --max-conns-per-ip 0 --handshakes-per-sec-per-core 0 ${extra[@]+"${extra[@]}"} \
                >"$dir/server.out" 2>"$dir/server.log" &
            server_pid=$!
            pids+=("$server_pid")
            ready=$(wait_line "$dir/server.out" "holdfast ready" 30 "$server_pid") ||
                { warn "holdfast did not start: $(tail -n 5 "$dir/server.log")"; return 1; }
            target=$(field "$ready" listen)
            ;;
        baseline)
            taskset -c "$server_cpus" "$bin/holdfast-baseline" --listen 127.0.0.1:0 \
                --cert "$work/cert.pem" --key "$work/key.pem" --backend "$dir/backend.sock" \
                --threads "$server_cores" >"$dir/server.out" 2>"$dir/server.log" &
            server_pid=$!
            pids+=("$server_pid")
            ready=$(wait_line "$dir/server.out" "holdfast-baseline ready" 30 "$server_pid") ||
                { warn "the baseline did not start: $(tail -n 5 "$dir/server.log")"; return 1; }
            target=$(field "$ready" listen)
            ;;
        nginx)
            port=$(free_port 18443)
            sed -e "s|@LOAD_MODULES@|$(nginx_stream_module)|" -e "s|@WORKERS@|$server_cores|" \
                -e "s|@NOFILE@|$(ulimit -Hn)|g" \
                -e "s|@WORK@|$dir|g" -e "s|@USER@|$(id -un)|" -e "s|@PORT@|$port|" \
                -e "s|@CERT@|$work/cert.pem|" -e "s|@KEY@|$work/key.pem|" \
                -e "s|@BACKEND@|$dir/backend.sock|" "$root/bench/peers/nginx.conf" >"$dir/nginx.conf"
            taskset -c "$server_cpus" nginx -p "$dir" -e "$dir/nginx-error.log" -c "$dir/nginx.conf" \
                >"$dir/server.out" 2>"$dir/server.log" &
            server_pid=$!
            pids+=("$server_pid")
            wait_port "$port" 15 "$server_pid" ||
                { warn "nginx did not start: $(tail -n 5 "$dir/server.log" "$dir/nginx-error.log" 2>/dev/null)"; return 1; }
            target=127.0.0.1:$port
            ;;
        haproxy)
            port=$(free_port 19443)
            cat "$work/cert.pem" "$work/key.pem" >"$dir/haproxy.pem"
            sed -e "s|@THREADS@|$server_cores|" -e "s|@MAXCONN@|$((($(ulimit -Hn) - 100) / 2))|" \
                -e "s|@WORK@|$dir|g" -e "s|@PORT@|$port|" \
                -e "s|@PEM@|$dir/haproxy.pem|" -e "s|@BACKEND@|$dir/backend.sock|" \
                "$root/bench/peers/haproxy.cfg" >"$dir/haproxy.cfg"
            taskset -c "$server_cpus" haproxy -db -f "$dir/haproxy.cfg" >"$dir/server.out" 2>"$dir/server.log" &
            server_pid=$!
            pids+=("$server_pid")
            wait_port "$port" 15 "$server_pid" ||
                { warn "HAProxy did not start: $(tail -n 5 "$dir/server.log")"; return 1; }
            target=127.0.0.1:$port
            ;;
    esac
}

# bench SECS ARGS...: the load generator on the load generator's CPUs, bounded by SECS.
# A failed scenario is noted, not fatal: its report says what failed.
bench() {
    local secs=$1
    shift
    if ! timeout "$secs" taskset -c "$loadgen_cpus" "$bin/holdfast-bench" "$@" >>"$log" 2>&1; then
        warn "holdfast-bench $1 ($peer, round $round) reported failures or did not finish; see $log"
        failures=$((failures + 1))
    fi
}

say "checking the host"
ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= 2 * idle_conns + 1000)) ||
    warn "open-file limit $(ulimit -n) is tight for peers holding $idle_conns clients (each also holds a backend connection)"
server_cores=$(count_cpus "$server_cpus")
loadgen_threads=${LOADGEN_THREADS:-$(count_cpus "$loadgen_cpus")}
if ((ncpu < 2)); then
    warn "one CPU: the server and the load generator share it"
fi
echo "CPUs: $ncpu; server on $server_cpus ($server_cores core(s)); load generator ($loadgen_threads thread(s)) and backends on $loadgen_cpus" >&2

if [[ ${NO_BUILD:-0} != 1 ]]; then
    say "building (release)"
    cargo build --release -p holdfast -p holdfast-worker -p holdfast-bench --bins >&2
    if [[ " $peers " == *" holdfast-ring "* ]]; then
        cargo build --release -p holdfast --no-default-features --features ring --bins \
            --target-dir "$ring_target" >&2
    fi
fi
[[ -x $bin/holdfast-bench ]] || die "no $bin/holdfast-bench; build it or set BIN_DIR"
install_peers

running=()
for p in $peers; do
    if available "$p"; then
        running+=("$p")
    else
        warn "$p is not available here; left out"
    fi
done
((${#running[@]} > 0)) || die "no system to compare"

mkdir -p "$out" "$out/sat"
log=$out/bench.log
: >"$log"
"$bin/holdfast-bench" gen-cert --out "$work" >/dev/null
failures=0
started=$SECONDS
say "${#running[@]} systems (${running[*]}), $runs rounds; reports in $out"

for round in $(seq 1 "$runs"); do
    peer=ceiling
    say "round $round/$runs: rustls alone in memory (the ceiling)"
    timeout 120 taskset -c "${server_cpus%%[,-]*}" "$bin/holdfast-bench" ceiling \
        --seconds "$ceiling_secs" --json "$out/ceiling-$round.json" >>"$log" 2>&1 ||
        { warn "the ceiling run failed; see $log"; failures=$((failures + 1)); }
    for peer in "${running[@]}"; do
        label=$(label_of "$peer")
        say "round $round/$runs: $label"
        if ! start "$peer" "$work/$peer-$round"; then
            failures=$((failures + 1))
            stop ${server_pid:+"$server_pid"} ${backend_pid:+"$backend_pid"}
            continue
        fi
        common=(--target "$target" --ca "$work/ca.pem" --label "$label")
        cpu=(--server-pids "$server_pid" --server-cores "$server_cores" --threads "$loadgen_threads")
        echo "  idle: $idle_steps connections" >&2
        bench 300 idle "${common[@]}" --conns "$idle_conns" --steps "$idle_steps" \
            --rate "$idle_rate" --settle 2 --gateway-pid "$server_pid" --json "$out/$peer-idle-$round.json"
        echo "  handshakes: $hs_parallel loops for $hs_secs s, full then resumed" >&2
        bench 120 handshake "${common[@]}" "${cpu[@]}" --conns-parallel "$hs_parallel" \
            --duration "$hs_secs" --json "$out/$peer-handshake-$round.json"
        bench 120 handshake "${common[@]}" "${cpu[@]}" --conns-parallel "$hs_parallel" \
            --duration "$hs_secs" --resume --json "$out/$peer-resumed-$round.json"
        echo "  echo: $echo_conns connections, 64 B frames at $echo_load_rate/s, then $echo_rate/s, $echo_secs s each" >&2
        bench 120 echo "${common[@]}" "${cpu[@]}" --conns "$echo_conns" --size 64 \
            --rate "$echo_load_rate" --duration "$echo_secs" --json "$out/$peer-echoload-$round.json"
        bench 120 echo "${common[@]}" "${cpu[@]}" --conns "$echo_conns" --size 64 \
            --rate "$echo_rate" --duration "$echo_secs" --json "$out/$peer-echo-$round.json"
        echo "  storm: $storm_conns clients drop and reconnect (with their session tickets)" >&2
        bench 180 storm "${common[@]}" "${cpu[@]}" --conns "$storm_conns" --resume \
            --json "$out/$peer-storm-$round.json"
        if ((sat_quota > 0)) && cpu_quota "$server_pid" "$sat_quota" "holdfast-peers-$$"; then
            echo "  saturated: 64 B frames at $sat_rate/s, the server held to $sat_quota % of a core" >&2
            common=(--target "$target" --ca "$work/ca.pem" --label "$label, $sat_quota % of a core")
            bench 120 echo "${common[@]}" "${cpu[@]}" --conns "$echo_conns" --size 64 \
                --rate "$sat_rate" --duration "$echo_secs" --json "$out/sat/$peer-echo-$round.json"
        fi
        stop "$server_pid" "$backend_pid"
        for f in "$work/$peer-$round"/*.log; do
            if [[ -s $f ]]; then cp "$f" "$out/$peer-$round-$(basename "$f")"; fi
        done
    done
done

say "done in $((SECONDS - started)) s; $failures scenario run(s) reported failures"
"$bin/holdfast-bench" report --reference holdfast --md "$out/summary.md" --svg "$out/summary.svg" \
    "$out"/*.json >"$out/summary.txt"
{
    echo
    echo "Server on CPU(s) $server_cpus ($server_cores core(s)), load generator and backends on $loadgen_cpus;" \
        "$runs rounds. Backends: holdfast multiplexes all clients over one link per core to" \
        "holdfast-worker echo; nginx, HAProxy and the baseline open one Unix-socket connection per" \
        "client to holdfast-bench unix-echo. Storm overflows are machine-wide." \
        "Reports, chart and logs: $out"
} >>"$out/summary.md"
shopt -s nullglob
sat_reports=("$out"/sat/*.json "$out"/ceiling-*.json)
shopt -u nullglob
if compgen -G "$out/sat/*.json" >/dev/null; then
    if "$bin/holdfast-bench" report --reference "holdfast, $sat_quota % of a core" \
        --md "$out/saturated.md" "${sat_reports[@]}" >/dev/null; then
        {
            echo
            echo "Saturated: each server (all its processes) held to $sat_quota % of one CPU by the" \
                "kernel's cpu controller (10 ms periods) and offered $sat_rate frames/s, more than it can" \
                "relay there: its CPU is the limit. CPU per frame is what counts here; latency is" \
                "queueing, and a server whose latency stayed low kept up, was not saturated, and" \
                "its CPU per frame is only an upper bound. Reports: $out/sat"
        } >>"$out/saturated.md"
    else
        warn "the saturated runs' report failed; their JSON is in $out/sat"
    fi
fi
echo
cat "$out/summary.md"
if [[ -f $out/saturated.md ]]; then
    echo
    cat "$out/saturated.md"
fi
