#!/usr/bin/env bash
# NATS relay bench: how many client frames per second one gateway core relays through the
# NATS bridge and back, and at what latency.
#
# Starts (loopback only) one nats-server, one gateway (--cores 1), one `holdfast-worker
# nats` bridge and an echo backend on NATS (`holdfast-bench nats-echo`, hidden: it answers
# every `frame` event with a `send` command to the same connection). Then runs
#   holdfast-bench echo --conns 20 --size 64 --rate R --duration D --server-pids GATEWAY_PID
# so each frame goes client -> gateway -> bridge -> NATS -> backend -> NATS -> bridge ->
# gateway -> client. Prints frames/s achieved, latency percentiles and the gateway's CPU
# per frame (the bridge, nats-server and the backend are not counted in that figure; their
# CPU over the run is printed beside it). Everything started here is stopped on exit by
# PID; every wait is bounded.
#
# Environment: RATE (frames/s, default 2000), DURATION (s, default 10), CONNS (default 20),
# SIZE (default 64), NATS_PORT (default: a free port), OUT (JSON report path, default
# target/nats-relay-bench.json).
# Needs nats-server (Debian: apt-get install nats-server) at /usr/sbin/nats-server or on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rate=${RATE:-2000}
duration=${DURATION:-10}
conns=${CONNS:-20}
size=${SIZE:-64}
out=${OUT:-$PWD/target/nats-relay-bench.json}

script=nats-relay-bench
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
nats_bin=$(nats_server_bin)

cargo build -q --release -p holdfast -p holdfast-worker -p holdfast-bench --bins
bin=$(target_dir)/release
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-nats-relay.XXXXXX")
# 15 s: more than the gateway's default drain grace (10 s).
install_cleanup 15

# CPU seconds (utime + stime) of one process so far.
cpu_secs() {
    local hz
    hz=$(getconf CLK_TCK)
    awk -v hz="$hz" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}

port=${NATS_PORT:-$(ephemeral_port)}
"$nats_bin" -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>"$work/nats.err" &
nats_pid=$!
pids+=("$nats_pid")
wait_port "$port" 10 "$nats_pid" ||
    die "nats-server did not start on port $port; its log: $(tail -n 20 "$work/nats.err")"
url=nats://127.0.0.1:$port

"$bin/holdfast-bench" gen-cert --out "$work/certs" >/dev/null

spawn echo "the NATS echo backend" "nats-echo: ready" 20 \
    "$bin/holdfast-bench" nats-echo --nats "$url" --max-secs $((duration + 120))
echo_pid=$spawned_pid
spawn bridge "the bridge" "holdfast-worker: listening" 20 \
    "$bin/holdfast-worker" nats --socket "$work/bridge.sock" --nats "$url" --gateway gw1 \
    --name gw1-bridge
bridge_pid=$spawned_pid
spawn gw "the gateway" "holdfast ready" 20 \
    "$bin/holdfast" run --listen 127.0.0.1:0 --admin 127.0.0.1:0 --cores 1 \
    --cert "$work/certs/cert.pem" --key "$work/certs/key.pem" --worker "$work/bridge.sock"
gw_pid=$spawned_pid
addr=$(field "$spawned_line" listen)
echo "nats-server $url (pid $nats_pid), bridge pid $bridge_pid, backend pid $echo_pid"
echo "gateway $addr (pid $gw_pid, 1 core)"
sleep 0.5

before_other=$(for p in "$nats_pid" "$bridge_pid" "$echo_pid"; do cpu_secs "$p"; done)
echo "holdfast-bench echo --conns $conns --size $size --rate $rate --duration $duration --server-pids $gw_pid"
status=0
timeout $((duration + 120)) "$bin/holdfast-bench" echo --target "$addr" --ca "$work/certs/ca.pem" \
    --conns "$conns" --size "$size" --rate "$rate" --duration "$duration" \
    --server-pids "$gw_pid" --server-cores 1 --label nats-relay --json "$out" || status=$?
after_other=$(for p in "$nats_pid" "$bridge_pid" "$echo_pid"; do cpu_secs "$p"; done)

others=$(paste <(echo "$before_other") <(echo "$after_other") | awk '{ printf "%.3f ", $2 - $1 }')
# shellcheck disable=SC2086 # three numbers, one argument each
python3 - "$out" $others <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
frames = r["frames_received"]
for name, secs in zip(("nats-server", "bridge", "backend"), map(float, sys.argv[2:5])):
    per = f", {secs * 1e6 / frames:.1f} us per frame" if frames else ""
    print(f"  {name} CPU during the run: {secs:.2f} s{per}")
lat, svc = r["latency"], r["service_latency"]
print("relay through NATS, 1 gateway core:")
print(f"  frames: {r['frames_received']} of {r['frames_scheduled']} back, {r['frames_lost']} lost, "
      f"{r['frames_corrupt']} corrupt; {r['frames_per_sec']:.0f} frames/s achieved")
print(f"  latency from schedule: p50 {lat['p50_us']} us, p99 {lat['p99_us']} us, "
      f"p99.9 {lat['p999_us']} us, max {lat['max_us']} us (service p50 {svc['p50_us']} us)")
us = r.get("server_cpu_us_per_frame")
if us:
    print(f"  gateway CPU per frame: {us:.1f} us -> about {1e6 / us:.0f} frames/s per fully "
          "busy gateway core (gateway only; bridge, NATS and backend CPU above)")
EOF
echo "report: $out"
exit "$status"
