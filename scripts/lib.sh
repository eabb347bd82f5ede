# shellcheck shell=bash
# shellcheck disable=SC2154 # script and work are set by the sourcing script
# Shared helpers for the scripts that start a gateway and a worker: sourced, not run.
# The sourcing script sets `script` (its name, for messages) and `work` (a temp dir), and
# appends the PIDs it starts to `pids`; `install_cleanup SECS` then stops them (SIGTERM,
# then SIGKILL after SECS seconds: the gateway drains on SIGTERM) and removes `work` on
# any exit.

pids=()

# shellcheck disable=SC2317 # only ever invoked by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid i
    for pid in ${pids[@]+"${pids[@]}"}; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in ${pids[@]+"${pids[@]}"}; do
        for ((i = 0; i < cleanup_grace * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
    exit "$status"
}

install_cleanup() {
    cleanup_grace=$1
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

say() { printf '\n==> %s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$script" "$*" >&2; }
die() {
    printf '%s: %s\n' "$script" "$*" >&2
    exit 1
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
