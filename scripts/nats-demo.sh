#!/usr/bin/env bash
# Two-gateway NATS demo: one nats-server, two holdfast gateways with two NATS bridge
# workers each, and a small backend (gateway/worker/examples/nats_demo.rs) that relays a
# message from alice (gateway A) to bob (gateway B) by user id and broadcasts a topic to
# both. Loopback only; everything started here is stopped on exit; every wait is bounded.
# Needs nats-server (Debian: apt-get install nats-server).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

nats_bin=$(command -v nats-server || true)
[ -n "$nats_bin" ] || { for p in /usr/sbin/nats-server /usr/bin/nats-server; do [ -x "$p" ] && nats_bin=$p; done; }
[ -n "$nats_bin" ] || { echo "nats-server not found (apt-get install nats-server)" >&2; exit 1; }

cargo build -q -p holdfast -p holdfast-worker --bins
cargo build -q -p holdfast-worker --example nats_demo
bin=$PWD/target/debug
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-nats-demo.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
    for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Waits (at most 20 s) for a line starting with $2 in file $1 and prints it.
wait_line() {
    for _ in $(seq 200); do
        if grep -m1 "^$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1" >&2; cat "$work"/*.err >&2 || true; return 1
}

port=${NATS_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
"$nats_bin" -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
url=nats://127.0.0.1:$port
"$bin/examples/nats_demo" certs "$work"

addrs=()
for gw in gwa gwb; do
    for n in 1 2; do
        "$bin/holdfast-worker" nats --socket "$work/$gw-$n.sock" --nats "$url" --gateway "$gw" \
            --name "$gw-bridge-$n" >"$work/$gw-$n.out" 2>"$work/$gw-$n.err" & pids+=($!)
        wait_line "$work/$gw-$n.out" "holdfast-worker: listening" >/dev/null
    done
    "$bin/holdfast" run --listen 127.0.0.1:0 --admin 127.0.0.1:0 --cores 2 \
        --cert "$work/cert.pem" --key "$work/key.pem" \
        --worker "$work/$gw-1.sock" --worker "$work/$gw-2.sock" \
        >"$work/$gw.out" 2>"$work/$gw.err" & pids+=($!)
    line=$(wait_line "$work/$gw.out" "holdfast ready")
    addr=$(tr ' ' '\n' <<<"$line" | sed -n 's/^listen=//p')
    echo "gateway $gw on $addr (bridges $gw-1, $gw-2)"
    addrs+=("$gw=$addr")
done
timeout 60 "$bin/examples/nats_demo" run "$url" "$work" "${addrs[@]}"
