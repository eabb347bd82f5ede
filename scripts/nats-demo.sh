#!/usr/bin/env bash
# Two-gateway NATS demo: one nats-server, two holdfast gateways with two NATS bridge
# workers each, and a small backend (gateway/worker/examples/nats_demo.rs) that relays a
# message from alice (gateway A) to bob (gateway B) by user id and broadcasts a topic to
# both. Loopback only; everything started here is stopped on exit; every wait is bounded.
# Needs nats-server (Debian: apt-get install nats-server).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

script=nats-demo
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
nats_bin=$(nats_server_bin)

cargo build -q -p holdfast -p holdfast-worker --bins
cargo build -q -p holdfast-worker --example nats_demo
bin=$(target_dir)/debug
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-nats-demo.XXXXXX")
# 15 s: more than the gateway's default drain grace (10 s).
install_cleanup 15

port=${NATS_PORT:-$(ephemeral_port)}
"$nats_bin" -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>&1 &
nats_pid=$!
pids+=("$nats_pid")
wait_port "$port" 10 "$nats_pid" ||
    die "nats-server did not start on port $port; its log: $(tail -n 20 "$work/nats.log")"
url=nats://127.0.0.1:$port
"$bin/examples/nats_demo" certs "$work"

addrs=()
for gw in gwa gwb; do
    for n in 1 2; do
        spawn "$gw-$n" "bridge $gw-bridge-$n" "holdfast-worker: listening" 20 \
            "$bin/holdfast-worker" nats --socket "$work/$gw-$n.sock" --nats "$url" --gateway "$gw" \
            --name "$gw-bridge-$n"
    done
    spawn "$gw" "gateway $gw" "holdfast ready" 20 \
        "$bin/holdfast" run --listen 127.0.0.1:0 --admin 127.0.0.1:0 --cores 2 \
        --cert "$work/cert.pem" --key "$work/key.pem" \
        --worker "$work/$gw-1.sock" --worker "$work/$gw-2.sock"
    addr=$(field "$spawned_line" listen)
    echo "gateway $gw on $addr (bridges $gw-1, $gw-2)"
    addrs+=("$gw=$addr")
done
timeout 60 "$bin/examples/nats_demo" run "$url" "$work" "${addrs[@]}"
