# shellcheck shell=bash
# shellcheck disable=SC2154 # script and work are set by the sourcing script
# Shared helpers of the scripts that start a gateway, its workers and load: sourced, not
# run. The sourcing script
#   - sets `script` (its name, for messages) before sourcing, and `work` (a temp dir)
#     before install_cleanup;
#   - may set `say_fd=2` to send say's headings to stderr (compare-peers.sh keeps its
#     stdout for the table);
#   - calls `install_cleanup SECS` and appends every PID it starts to `pids`: on any exit
#     each one still running is stopped (see stop, with SECS as its grace) and `work` is
#     removed. Processes are only ever signalled by PID, never by name.

pids=()
stop_grace=5
cgroups=()
cpu_controller_enabled=0

# target_dir: where cargo writes its build, as an absolute path: $CARGO_TARGET_DIR (a
# relative one is taken from the repository root, where the scripts run cargo) or target/.
target_dir() {
    local dir=${CARGO_TARGET_DIR:-target}
    [[ $dir == /* ]] || dir=$PWD/$dir
    printf '%s\n' "$dir"
}

# stop PID...: SIGTERM to each PID, then, one after the other, up to stop_grace seconds
# (install_cleanup's SECS: the gateway drains on SIGTERM) for it to exit before SIGKILL;
# each is reaped and dropped from `pids`, so that the exit cleanup never signals a PID
# that the system may since have given to another process.
stop() {
    local pid p i kept=()
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        for ((i = 0; i < stop_grace * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for p in ${pids[@]+"${pids[@]}"}; do
        for pid in "$@"; do
            [[ $p != "$pid" ]] || continue 2
        done
        kept+=("$p")
    done
    pids=(${kept[@]+"${kept[@]}"})
}

# shellcheck disable=SC2317 # only ever invoked by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop ${pids[@]+"${pids[@]}"}
    local g
    for g in ${cgroups[@]+"${cgroups[@]}"}; do
        rmdir "$g" 2>/dev/null || true
    done
    if ((cpu_controller_enabled)); then
        echo -cpu 2>/dev/null >/sys/fs/cgroup/cgroup.subtree_control || true
    fi
    rm -rf "$work"
    exit "$status"
}

# install_cleanup SECS: on any exit, stop every PID in `pids` (SECS seconds' grace each
# before SIGKILL) and remove `work`, keeping the exit status; SIGINT and SIGTERM exit 130.
install_cleanup() {
    stop_grace=$1
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# count_cpus LIST: how many CPUs a taskset list like 0-3,8 names.
count_cpus() {
    local n=0 part a b
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then
            a=${part%-*} b=${part#*-}
            n=$((n + b - a + 1))
        else
            n=$((n + 1))
        fi
    done
    echo "$n"
}

# other_cpus N: the taskset list of every CPU but CPU 0 on an N-CPU machine (0 when N is
# 1): where load generators and backends run beside a server on CPU 0.
other_cpus() {
    if (($1 > 1)); then echo "1-$(($1 - 1))"; else echo 0; fi
}

# descendants PID: PID and every process below it, one per line (from each thread's
# /proc/PID/task/TID/children), so that a master process's workers come along.
descendants() {
    local p c t
    echo "$1"
    for t in /proc/"$1"/task/*/children; do
        [[ -r $t ]] || continue
        for c in $(<"$t"); do
            descendants "$c"
        done
    done
}

# cpu_quota PID PERCENT NAME: holds process PID and every process below it (nginx's
# workers under their master), all their threads together, to PERCENT (10 to 100) of one
# CPU with the kernel's cpu controller (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us) in
# 10 ms periods, in cgroup NAME (made on first use; the exit cleanup removes it and, on
# v2, turns the root's cpu controller off again if this turned it on). Returns non-zero,
# with a warning, where that cannot be done (not root, no cpu controller, a write refused).
cpu_quota() {
    local pid=$1 pct=$2 name=$3 period=10000 quota dir p set_quota=0
    if ((pct < 10 || pct > 100)); then
        warn "a CPU quota of $pct % is outside 10-100 % (the kernel's least is 1 ms per 10 ms period)"
        return 1
    fi
    quota=$((period * pct / 100))
    if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
        dir=/sys/fs/cgroup/$name
        if ! grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control; then
            if ! echo +cpu 2>/dev/null >/sys/fs/cgroup/cgroup.subtree_control; then
                warn "cannot enable the cpu controller in /sys/fs/cgroup/cgroup.subtree_control"
                return 1
            fi
            cpu_controller_enabled=1
        fi
    elif [[ -w /sys/fs/cgroup/cpu ]]; then
        dir=/sys/fs/cgroup/cpu/$name
    else
        warn "no writable cpu cgroup controller (root and /sys/fs/cgroup are needed)"
        return 1
    fi
    if [[ ! -d $dir ]]; then
        if ! mkdir "$dir" 2>/dev/null; then
            warn "cannot make cgroup $dir"
            return 1
        fi
        cgroups+=("$dir")
    fi
    if [[ -f $dir/cpu.max ]]; then
        echo "$quota $period" 2>/dev/null >"$dir/cpu.max" && set_quota=1
    else
        { echo "$period" >"$dir/cpu.cfs_period_us" && echo "$quota" >"$dir/cpu.cfs_quota_us"; } \
            2>/dev/null && set_quota=1
    fi
    if ((!set_quota)); then
        warn "cannot set the CPU quota of $dir to $quota us per $period us"
        return 1
    fi
    for p in $(descendants "$pid"); do
        if ! echo "$p" 2>/dev/null >"$dir/cgroup.procs"; then
            warn "cannot move process $p into $dir"
            return 1
        fi
    done
}

# one_core_gateway NAME DIR [FLAGS]: starts DIR's echo worker (`holdfast-worker echo`, on
# $loadgen_cpus) and a one-core gateway in front of it (on $server_cpus, with the
# certificate `holdfast-bench gen-cert` wrote to $work, and neither the per-address cap
# nor the handshake rate limit, so that only the gateway's CPU limits the load), plus the
# extra gateway FLAGS (one word-split string). Sets `worker_pid`, `gateway_pid` and
# `target` (its listen address). Used by profile.sh and ab-bench.sh, which measure one
# gateway core against a load generator on the other CPUs.
one_core_gateway() {
    local name=$1 dir=$2 flags=${3:-}
    spawn "worker-$name" "holdfast-worker ($name)" "holdfast-worker: listening on" 10 \
        taskset -c "$loadgen_cpus" "$dir/holdfast-worker" --log warn echo \
        --socket "$work/echo-$name.sock"
    # shellcheck disable=SC2034 # read by the sourcing script
    worker_pid=$spawned_pid
    # shellcheck disable=SC2086 # flags is a list of flags
    spawn "gateway-$name" "holdfast ($name)" "holdfast ready" 30 env RUST_LOG=warn \
        taskset -c "$server_cpus" "$dir/holdfast" run --listen 127.0.0.1:0 \
        --cert "$work/cert.pem" --key "$work/key.pem" --worker "$work/echo-$name.sock" \
        --cores 1 --admin 127.0.0.1:0 --drain-grace 1 --max-conns-per-ip 0 \
        --handshakes-per-sec-per-core 0 $flags
    # shellcheck disable=SC2034 # read by the sourcing script
    gateway_pid=$spawned_pid
    # shellcheck disable=SC2034 # read by the sourcing script
    target=$(field "$spawned_line" listen)
}

# scenario_load SCENARIO: sets `load` to the holdfast-bench command and flags of one
# one-gateway scenario, from $hs_parallel, $secs, $echo_conns and $echo_rate:
#   handshake         short connections: connect, full TLS 1.3 handshake, one echo, close
#   handshake-sha384  the same with the suites in rustls' client order (AES-256-GCM first)
#   resumed           the same as handshake, resuming with a session ticket
#   echo              64-byte frames through the worker and back, open loop at $echo_rate
# shellcheck disable=SC2034 # load is read by the sourcing script
scenario_load() {
    local hs=(handshake --conns-parallel "$hs_parallel" --duration "$secs")
    case $1 in
        handshake) load=("${hs[@]}") ;;
        handshake-sha384) load=("${hs[@]}" --suites rustls) ;;
        resumed) load=("${hs[@]}" --resume) ;;
        echo) load=(echo --conns "$echo_conns" --size 64 --rate "$echo_rate" --duration "$secs") ;;
        *) die "unknown scenario $1 (handshake, handshake-sha384, resumed, echo)" ;;
    esac
}

# say MESSAGE: a progress heading, on stdout (stderr where say_fd=2).
say() { printf '\n==> %s\n' "$*" >&"${say_fd:-1}"; }
warn() { printf '%s: warning: %s\n' "$script" "$*" >&2; }
die() {
    printf '%s: %s\n' "$script" "$*" >&2
    exit 1
}

# spawn NAME WHAT READY SECS CMD...: starts CMD in the background, stdout to
# $work/NAME.out and stderr to $work/NAME.err, adds it to `pids`, and waits at most SECS
# (failing early if it exits) for a stdout line starting with READY; dies naming WHAT, with
# the end of its stderr, when none comes. Sets `spawned_pid`, and `spawned_line` to the
# ready line. Call it directly, not in $(...), so the variables reach the caller.
spawn() {
    local name=$1 what=$2 ready=$3 secs=$4
    shift 4
    "$@" >"$work/$name.out" 2>"$work/$name.err" &
    spawned_pid=$!
    pids+=("$spawned_pid")
    # shellcheck disable=SC2034 # read by the sourcing script
    spawned_line=$(wait_line "$work/$name.out" "$ready" "$secs" "$spawned_pid") ||
        die "$what did not start; its log: $(tail -n 20 "$work/$name.err")"
}

# wait_line FILE PREFIX SECS PID: prints the first line of FILE starting with PREFIX,
# waiting at most SECS seconds, and fails early if process PID exits first.
wait_line() {
    local file=$1 prefix=$2 secs=$3 pid=$4 line
    local deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        line=$(grep -m1 "^$prefix" "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then
            printf '%s\n' "$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# field LINE KEY: the value of KEY=VALUE in a ready line.
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"; }

# json_values FILE KEY: every value of "KEY" in a pretty-printed JSON report (one key a
# line, as holdfast-bench writes them), in order, without quotes.
json_values() { grep "\"$2\":" "$1" | sed 's/.*": *//; s/,$//; s/"//g'; }
# json_value FILE KEY: the first of them.
json_value() { json_values "$1" "$2" | head -n 1; }

# listening PORT: true when something accepts on 127.0.0.1:PORT.
listening() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT SECS PID: waits at most SECS seconds until 127.0.0.1:PORT accepts,
# failing early if process PID exits first.
wait_port() {
    local port=$1 secs=$2 pid=$3
    local deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        listening "$port" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# ephemeral_port: a port on 127.0.0.1 that the kernel hands out as free (nothing holds it
# afterwards, so use it at once).
ephemeral_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# nats_server_bin: the path of nats-server, on PATH or where Debian puts it (/usr/sbin,
# often not on a user's PATH); dies when there is none.
nats_server_bin() {
    local bin p
    bin=$(command -v nats-server || true)
    if [[ -z $bin ]]; then
        for p in /usr/sbin/nats-server /usr/bin/nats-server; do
            if [[ -x $p ]]; then bin=$p; fi
        done
    fi
    [[ -n $bin ]] || die "nats-server not found (apt-get install nats-server)"
    printf '%s\n' "$bin"
}
