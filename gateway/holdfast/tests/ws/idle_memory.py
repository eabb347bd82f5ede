#!/usr/bin/python3
"""Idle memory per connection of a running gateway: WebSocket against native.

Opens idle connections to a gateway in steps (2 000, then 4 000 by default), reads the
gateway's proportional set size (Pss in /proc/PID/smaps_rollup) at each step once the
count has settled, and prints the slope between the steps as bytes per connection, so
fixed costs (tables, rings, buffers sized at start) drop out. Two kinds, one after the
other, each closed before the next starts:

  websocket  TLS with ALPN http/1.1, the HTTP/1.1 upgrade, then nothing (--ws-echo: one
             text message and its echo first, as the native kind does)
  native     TLS with ALPN holdfast/1, one DATA frame and its echo, then nothing

Measure each kind against a fresh gateway (--kinds websocket, then --kinds native on a
new process): memory freed when one kind's connections close stays in the gateway's
allocator and is reused by the next kind, which then reads low. A kind that starts with
clearly more memory than the run did is flagged ("reused_heap") with a warning.

Only the gateway's own memory is measured: socket buffers are the kernel's and are not
in any process's Pss. The client holds every socket open, so the open-file limit of this
process bounds the largest step (keep it under ~9 000 with a 20 000 limit); sockets are
spread over source addresses 127.0.0.2-127.0.0.251 when the gateway is on loopback, so
ephemeral ports do not run out between runs.

Needs Python 3 only (standard library). Example, against a release gateway with the
reference echo worker:

  target/release/holdfast-bench gen-cert --out /tmp/hf-cert
  target/release/holdfast-worker echo --socket /tmp/hf.sock &
  target/release/holdfast run --listen 127.0.0.1:7443 --admin 127.0.0.1:9090 \\
      --cert /tmp/hf-cert/cert.pem --key /tmp/hf-cert/key.pem --worker /tmp/hf.sock &
  gateway=$!
  gateway/holdfast/tests/ws/idle_memory.py --pid $gateway --port 7443 \\
      --cafile /tmp/hf-cert/ca.pem --admin 127.0.0.1:9090 --kinds websocket
  (then the same with a fresh gateway and --kinds native)

Prints a table and, last, one JSON line with every measurement.
"""

import argparse
import base64
import ipaddress
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.request

DATA = 1  # native frame type


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the run went over --timeout")
        return left


def pss_bytes(pid):
    """The process's Pss and Rss in bytes, from smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Pss", "Rss"):
                out[name.lower()] = int(rest.split()[0]) * 1024
    return out


def open_connections(admin):
    """holdfast_connections_open summed over cores, or None without --admin."""
    if not admin:
        return None
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("holdfast_connections_open"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


class Opener:
    def __init__(self, args):
        self.args = args
        self.seq = 0
        loopback = ipaddress.ip_address(socket.gethostbyname(args.host)).is_loopback
        self.spread = loopback and not args.no_spread

    def context(self, alpn):
        if self.args.cafile:
            ctx = ssl.create_default_context(cafile=self.args.cafile)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols([alpn])
        return ctx

    def tcp(self, deadline):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.spread:
            self.seq += 1
            sock.bind((f"127.0.0.{2 + self.seq % 250}", 0))
        sock.settimeout(min(10.0, deadline.left()))
        sock.connect((self.args.host, self.args.port))
        return sock

    def websocket(self, ctx, deadline):
        s = ctx.wrap_socket(self.tcp(deadline), server_hostname=self.args.server_name)
        if s.selected_alpn_protocol() != "http/1.1":
            raise RuntimeError(f"ALPN {s.selected_alpn_protocol()!r}, wanted http/1.1")
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            (
                f"GET {self.args.path} HTTP/1.1\r\nHost: {self.args.server_name}:{self.args.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed before the 101")
            buf += chunk
        status = buf.split(b" ", 2)[1]
        if status != b"101":
            raise RuntimeError(f"upgrade answered {buf[:200]!r}")
        if self.args.ws_echo:
            payload = b"idle"
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
            want = bytes([0x81, len(payload)]) + payload
            got = buf.partition(b"\r\n\r\n")[2]
            while len(got) < len(want):
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed before the echo")
                got += chunk
            if got != want:
                raise RuntimeError(f"echo {got!r}, wanted {want!r}")
        return s

    def native(self, ctx, deadline):
        s = ctx.wrap_socket(self.tcp(deadline), server_hostname=self.args.server_name)
        if s.selected_alpn_protocol() != "holdfast/1":
            raise RuntimeError(f"ALPN {s.selected_alpn_protocol()!r}, wanted holdfast/1")
        payload = b"idle"
        frame = struct.pack(">I", (DATA << 24) | len(payload)) + payload
        s.sendall(frame)
        got = b""
        while len(got) < len(frame):
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed before the echo")
            got += chunk
        if got != frame:
            raise RuntimeError(f"echo {got!r}, wanted {frame!r}")
        return s


def settle(args, baseline, want, deadline):
    """Waits until the gateway counts `want` more connections than at the start (with
    --admin), then --settle seconds more for freed memory to be returned."""
    seen = None
    if args.admin:
        while True:
            seen = open_connections(args.admin)
            if seen - baseline == want:
                break
            if deadline.left() < 1:
                raise TimeoutError(f"the gateway counts {seen - baseline} connections, not {want}")
            time.sleep(0.2)
    time.sleep(args.settle)
    return seen


def measure(kind, args, opener, deadline):
    ctx = opener.context("http/1.1" if kind == "websocket" else "holdfast/1")
    connect = opener.websocket if kind == "websocket" else opener.native
    baseline = open_connections(args.admin) or 0
    socks = []
    points = []
    try:
        before = pss_bytes(args.pid)
        points.append({"conns": 0, **before})
        t0 = time.monotonic()
        for step in args.counts:
            while len(socks) < step:
                socks.append(connect(ctx, deadline))
            settle(args, baseline, step, deadline)
            points.append({"conns": step, **pss_bytes(args.pid), "elapsed_s": round(time.monotonic() - t0, 1)})
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
    # Wait for the gateway to let them all go before the next kind is measured.
    if args.admin:
        while open_connections(args.admin) > baseline and deadline.left() > 1:
            time.sleep(0.2)
    steps = [
        {"from": a["conns"], "to": b["conns"], "bytes_per_conn": round((b["pss"] - a["pss"]) / (b["conns"] - a["conns"]))}
        for a, b in zip(points[1:], points[2:])
    ]
    return {"kind": kind, "points": points, "steps": steps, "bytes_per_conn": steps[-1]["bytes_per_conn"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/ws", help="the WebSocket path")
    p.add_argument("--server-name", default="localhost", help="TLS server name (SNI)")
    p.add_argument("--cafile", help="CA to verify the gateway with (else: not verified)")
    p.add_argument("--admin", help="the gateway's admin HOST:PORT, to check the counts")
    p.add_argument("--counts", default="2000,4000", help="connection counts to measure at (ascending)")
    p.add_argument("--kinds", default="websocket,native")
    p.add_argument("--ws-echo", action="store_true", help="send one message on each WebSocket too")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each reading")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--no-spread", action="store_true", help="connect from one source address")
    args = p.parse_args()
    args.counts = [int(c) for c in args.counts.split(",")]
    if len(args.counts) < 2 or args.counts != sorted(args.counts) or args.counts[0] <= 0:
        p.error("--counts needs at least two ascending positive counts")
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in ("websocket", "native"):
            p.error(f"unknown kind {kind!r}")
    deadline = Deadline(args.timeout)
    opener = Opener(args)
    results = []
    for kind in kinds:
        r = measure(kind, args, opener, deadline)
        results.append(r)
        start = results[0]["points"][0]["pss"]
        r["reused_heap"] = r["points"][0]["pss"] > start * 1.2
        if r["reused_heap"]:
            print(f"warning: {kind} started at {r['points'][0]['pss'] / 2**20:.1f} MiB, the run at "
                  f"{start / 2**20:.1f} MiB: it reuses memory an earlier kind freed and reads low; "
                  f"measure it on a fresh gateway", file=sys.stderr, flush=True)
        for pt in r["points"]:
            print(f"{kind:9} {pt['conns']:6} conns  Pss {pt['pss'] / 2**20:8.2f} MiB  Rss {pt['rss'] / 2**20:8.2f} MiB",
                  flush=True)
        for st in r["steps"]:
            print(f"{kind:9} {st['bytes_per_conn']} bytes per idle connection "
                  f"(Pss slope {st['from']} -> {st['to']})", flush=True)
    print(json.dumps({"pid": args.pid, "counts": args.counts, "ws_echo": args.ws_echo, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
