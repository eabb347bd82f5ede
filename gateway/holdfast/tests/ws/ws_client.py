#!/usr/bin/python3
"""WebSocket client cases for the gateway's integration tests.

Each subcommand runs one case against a gateway that echoes messages (the reference
echo worker) and prints exactly one JSON line: {"case": ..., "ok": true|false, ...}.
The exit status is 0 when ok is true, 1 otherwise, 2 for bad arguments.

Well-behaved cases use the `websockets` library (Debian: python3-websockets):
  text, binary, large, ping, close
Bad-input cases speak raw WebSocket over a TLS socket (standard library only), do a
correct handshake, send one broken frame and report the close code the gateway sends:
  unmasked, rsv, bad-utf8, big-control, fragmented-ping, too-big, bad-close,
  orphan-continuation
and bad-handshake sends broken upgrade requests and reports the HTTP statuses.
A raw good case checks what the library cases cannot control, fragmentation:
  fragmented   a text message in two fragments with a ping between them (expects the
               pong, then the reassembled echo), a binary message in three fragments,
               and a text message with a code point split across two fragments

Usage:
  ws_client.py text --url wss://localhost:7443/ws --cafile cert.pem
  ws_client.py too-big --host 127.0.0.1 --port 7443 --server-name localhost --limit 65536
  ws_client.py bad-handshake --url wss://localhost:7443/ws --cafile cert.pem
  ws_client.py fragmented --url wss://localhost:7443/ws --cafile cert.pem
  ws_client.py text --no-alpn --url wss://localhost:7443/ws --cafile cert.pem

Browsers (and these clients) offer ALPN "http/1.1", which makes the gateway answer the
Upgrade instead of speaking its native protocol; with --no-alpn the gateway goes by the
request's first byte ('G') instead.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.parse

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# --- connection parameters -------------------------------------------------------------


class Target:
    """Where to connect and how, from --url or --host/--port/--path."""

    def __init__(self, args):
        if args.url:
            u = urllib.parse.urlsplit(args.url)
            if u.scheme not in ("ws", "wss"):
                raise SystemExit(f"--url must be ws:// or wss://, got {args.url!r}")
            self.tls = u.scheme == "wss"
            self.host = u.hostname or "localhost"
            self.port = u.port or (443 if self.tls else 80)
            self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        else:
            self.tls = not args.no_tls
            self.host = args.host
            self.port = args.port
            self.path = args.path
        self.server_name = args.server_name or self.host
        self.cafile = args.cafile
        self.origin = args.origin
        self.timeout = args.timeout
        self.subprotocols = args.subprotocol or []
        self.alpn = not args.no_alpn

    @property
    def host_header(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self):
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self.host_header}{self.path}"

    def ssl_context(self):
        if not self.tls:
            return None
        if self.cafile:
            ctx = ssl.create_default_context(cafile=self.cafile)
        else:
            # No CA given: encrypt without verifying (reported as "verified": false).
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.alpn:
            ctx.set_alpn_protocols(["http/1.1"])
        return ctx


# --- raw WebSocket over a socket -------------------------------------------------------


class RawConn:
    """A TLS (or plain) socket speaking hand-made WebSocket frames."""

    def __init__(self, target):
        self.t = target
        deadline = time.monotonic() + target.timeout
        sock = socket.create_connection((target.host, target.port), timeout=target.timeout)
        ctx = target.ssl_context()
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=target.server_name)
        self.sock = sock
        self.buf = b""
        self.deadline = deadline
        self.alpn = sock.selected_alpn_protocol() if ctx is not None else None

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        """Reads more bytes; False on EOF or timeout."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_http_head(self):
        """The response head up to the blank line: (status, {lowercase name: value}, body)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                if not self.buf:
                    raise ConnectionError("connection closed before any HTTP response")
                break
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_body(self, length):
        while len(self.buf) < length and self._fill():
            pass
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def handshake(self, extra_headers=None):
        """A correct upgrade request; returns (status, headers, accept_ok)."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.t.path} HTTP/1.1",
            f"Host: {self.t.host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if self.t.origin:
            lines.append(f"Origin: {self.t.origin}")
        if self.t.subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(self.t.subprotocols))
        lines += extra_headers or []
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, headers = self.read_http_head()
        want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        return status, headers, headers.get("sec-websocket-accept") == want

    def read_frame(self):
        """The next server frame as (fin, opcode, payload, masked), or None at EOF."""
        while True:
            if len(self.buf) >= 2:
                b0, b1 = self.buf[0], self.buf[1]
                n, off = b1 & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, off = struct.unpack(">H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, off = struct.unpack(">Q", self.buf[2:10])[0], 10
                elif n >= 126:
                    off = None
                if off is not None:
                    masked = bool(b1 & 0x80)
                    start = off + (4 if masked else 0)
                    if len(self.buf) >= start + n:
                        payload = self.buf[start : start + n]
                        if masked:
                            payload = mask(payload, self.buf[off : off + 4])
                        self.buf = self.buf[start + n :]
                        return bool(b0 & 0x80), b0 & 0x0F, payload, masked
            if not self._fill():
                return None

    def wait_close(self):
        """Reads until the server's close frame; returns a result dict."""
        seen = []
        while True:
            try:
                frame = self.read_frame()
            except TimeoutError:
                return {"close_code": None, "close_reason": None, "timeout": True, "frames": seen}
            if frame is None:
                return {"close_code": None, "close_reason": None, "eof": True, "frames": seen}
            fin, op, payload, masked = frame
            if op == OP_CLOSE:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                # The gateway closes the connection after its close frame.
                eof = self._eof_soon()
                return {
                    "close_code": code,
                    "close_reason": reason,
                    "server_masked": masked,
                    "eof_after_close": eof,
                    "frames": seen,
                }
            seen.append({"opcode": op, "len": len(payload)})

    def _eof_soon(self):
        try:
            self.deadline = time.monotonic() + min(self.t.timeout, 6.0)
            while self._fill():
                pass
            return True
        except TimeoutError:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def mask(data, key):
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def frame(opcode, payload, fin=True, masked=True, rsv=0, length=None, key=None):
    """A client frame; `length` overrides the announced length (payload sent as given)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n < 65536:
        head = bytes([b0, mbit | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, mbit | 127]) + struct.pack(">Q", n)
    if masked:
        key = key or os.urandom(4)
        return head + key + mask(payload, key)
    return head + payload


# --- cases through the websockets library ----------------------------------------------


def library_case(t, args):
    try:
        import websockets
    except ImportError:
        return {"ok": False, "error": "python3-websockets is not installed"}
    return asyncio.run(_library_case(websockets, t, args))


def _received_close(ws):
    """The close frame the server sent, across websockets versions."""
    for obj in (ws, getattr(ws, "protocol", None)):
        rcvd = getattr(obj, "close_rcvd", None)
        if rcvd is not None:
            return rcvd.code, rcvd.reason
    code = getattr(ws, "close_code", None)
    return code, getattr(ws, "close_reason", None)


async def _library_case(websockets, t, args):
    kwargs = dict(
        ssl=t.ssl_context(),
        max_size=None,
        ping_interval=None,
        open_timeout=t.timeout,
        close_timeout=t.timeout,
    )
    if t.tls:
        kwargs["server_hostname"] = t.server_name
    if t.origin:
        kwargs["origin"] = t.origin
    if t.subprotocols:
        kwargs["subprotocols"] = t.subprotocols
    out = {}
    async with websockets.connect(t.url, **kwargs) as ws:
        out["subprotocol"] = ws.subprotocol
        case = args.case
        if case in ("text", "binary", "large"):
            if case == "text":
                msg = args.message
            elif case == "binary":
                msg = bytes(range(256)) * 4
            else:
                pattern = "holdfast-websocket-"
                msg = (pattern * (args.size // len(pattern) + 1))[: args.size]
            t0 = time.monotonic()
            await ws.send(msg)
            echo = await asyncio.wait_for(ws.recv(), t.timeout)
            out["rtt_ms"] = round((time.monotonic() - t0) * 1000, 3)
            out["sent_len"] = len(msg)
            out["recv_len"] = len(echo)
            out["sent_type"] = "text" if isinstance(msg, str) else "binary"
            out["recv_type"] = "text" if isinstance(echo, str) else "binary"
            out["echo_ok"] = echo == msg
            out["ok"] = out["echo_ok"]
        elif case == "ping":
            payload = b"holdfast-ping"
            t0 = time.monotonic()
            waiter = await ws.ping(payload)
            await asyncio.wait_for(waiter, t.timeout)
            out["rtt_ms"] = round((time.monotonic() - t0) * 1000, 3)
            out["ok"] = True
        elif case == "close":
            await ws.close(code=args.code, reason=args.reason)
            code, reason = _received_close(ws)
            out["sent_code"] = args.code
            out["close_code"] = code
            out["close_reason"] = reason
            out["ok"] = code == args.code
    return out


# --- raw bad-input cases ---------------------------------------------------------------

# case: (what is sent after the handshake, the close code expected)
def bad_frames(args):
    limit = args.limit
    return {
        "unmasked": ([frame(OP_TEXT, b"hello", masked=False)], 1002),
        "rsv": ([frame(OP_TEXT, b"hello", rsv=0b100)], 1002),
        "bad-utf8": ([frame(OP_TEXT, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80")], 1007),
        "big-control": ([frame(OP_PING, b"x" * 126)], 1002),
        "fragmented-ping": ([frame(OP_PING, b"hi", fin=False)], 1002),
        "bad-close": ([frame(OP_CLOSE, b"\x03")], 1002),
        "orphan-continuation": ([frame(OP_CONT, b"tail")], 1002),
        # Only the header and mask: the gateway must refuse it before any payload.
        "too-big": ([frame(OP_BINARY, b"", length=limit + 1)], 1009),
    }


def raw_case(t, args):
    sends, expected = bad_frames(args)[args.case]
    conn = RawConn(t)
    try:
        status, headers, accept_ok = conn.handshake()
        out = {"alpn": conn.alpn, "handshake_status": status, "accept_ok": accept_ok}
        if status != 101 or not accept_ok:
            out["ok"] = False
            out["error"] = "upgrade refused"
            return out
        for data in sends:
            conn.send(data)
        res = conn.wait_close()
        if args.case == "too-big":
            res["refused_from_header"] = res.get("close_code") == expected
            if res.get("timeout"):
                # Not refused from the header: send the payload and look again.
                conn.deadline = time.monotonic() + t.timeout
                try:
                    conn.send(os.urandom(args.limit + 1))
                except OSError:
                    pass
                res.update(conn.wait_close())
        out.update(res)
        out["expected_code"] = expected
        out["ok"] = res.get("close_code") == expected
        return out
    finally:
        conn.close()


def fragmented_case(t, args):
    """Fragmented messages, with a ping between fragments; each echo must come back whole."""
    conn = RawConn(t)
    try:
        status, headers, accept_ok = conn.handshake()
        out = {"alpn": conn.alpn, "handshake_status": status, "accept_ok": accept_ok}
        if status != 101 or not accept_ok:
            out["ok"] = False
            out["error"] = "upgrade refused"
            return out

        def collect(want):
            """Server frames until every (opcode, payload) in `want` has come (any order)."""
            want = list(want)
            seen = []
            while want:
                try:
                    f = conn.read_frame()
                except TimeoutError:
                    return seen, "timed out"
                if f is None:
                    return seen, "connection ended"
                fin, op, payload, masked = f
                seen.append({"opcode": op, "fin": fin, "len": len(payload), "masked": masked})
                if op == OP_CLOSE:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                    return seen, f"closed with {code} {payload[2:].decode('utf-8', 'replace')}"
                if not fin or masked:
                    return seen, "server frame fragmented or masked"
                if (op, payload) in want:
                    want.remove((op, payload))
                else:
                    return seen, f"unexpected frame: opcode {op}, payload {payload[:40]!r}"
            return seen, None

        checks = {}
        # Text in two fragments, a ping in between; each frame in its own TLS write so
        # the gateway reassembles across receives.
        conn.deadline = time.monotonic() + t.timeout
        for data in (frame(OP_TEXT, b"Hel", fin=False), frame(OP_PING, b"p"),
                     frame(OP_CONT, b"lo", fin=True)):
            conn.send(data)
            time.sleep(0.02)
        seen, err = collect([(OP_PONG, b"p"), (OP_TEXT, b"Hello")])
        checks["text_with_ping"] = {"ok": err is None, "frames": seen, "error": err}

        # Binary in three fragments, all in one write.
        conn.deadline = time.monotonic() + t.timeout
        parts = [bytes(range(0, 100)), bytes(range(100, 200)), bytes(range(200, 256))]
        conn.send(frame(OP_BINARY, parts[0], fin=False) + frame(OP_CONT, parts[1], fin=False)
                  + frame(OP_CONT, parts[2], fin=True))
        seen, err = collect([(OP_BINARY, b"".join(parts))])
        checks["binary_3_fragments"] = {"ok": err is None, "frames": seen, "error": err}

        # "café" with the two bytes of "é" in different fragments: valid UTF-8 overall.
        conn.deadline = time.monotonic() + t.timeout
        conn.send(frame(OP_TEXT, b"caf\xc3", fin=False) + frame(OP_CONT, b"\xa9", fin=True))
        seen, err = collect([(OP_TEXT, "café".encode())])
        checks["split_code_point"] = {"ok": err is None, "frames": seen, "error": err}

        # Leave cleanly.
        conn.deadline = time.monotonic() + t.timeout
        conn.send(frame(OP_CLOSE, struct.pack(">H", 1000)))
        res = conn.wait_close()
        checks["close"] = {"ok": res.get("close_code") == 1000, "close_code": res.get("close_code")}
        out["checks"] = checks
        out["ok"] = all(c["ok"] for c in checks.values())
        return out
    finally:
        conn.close()


def bad_handshake(t, args):
    """Each variant on a fresh connection; reports the HTTP status of each."""
    key = base64.b64encode(os.urandom(16)).decode()
    origin = [f"Origin: {t.origin}"] if t.origin else []

    def req(method="GET", path=None, version="HTTP/1.1", headers=None):
        path = path or t.path
        base = {
            "Host": t.host_header,
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
        }
        for name, value in (headers or {}).items():
            if value is None:
                base.pop(name, None)
            else:
                base[name] = value
        lines = [f"{method} {path} {version}"] + [f"{n}: {v}" for n, v in base.items()] + origin
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    variants = {
        "method": (req(method="POST"), 405),
        "path": (req(path="/not-the-websocket-path"), 404),
        "http10": (req(version="HTTP/1.0"), 505),
        "plain": (req(headers={"Upgrade": None, "Connection": None, "Sec-WebSocket-Key": None,
                               "Sec-WebSocket-Version": None}), 426),
        "version": (req(headers={"Sec-WebSocket-Version": "8"}), 426),
        "key": (req(headers={"Sec-WebSocket-Key": "c2hvcnQ="}), 400),
        "no-host": (req(headers={"Host": None}), 400),
        "garbage": (b"\x16\x03\x01\x00\xff garbage\r\n\r\n", 400),
        "too-large": (b"GET " + t.path.encode() + b" HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", 431),
        # Need an allow-list on the gateway; ask for them with --variants origin,no-origin.
        "origin": (req().replace(b"\r\n\r\n", b"\r\nOrigin: https://not-allowed.invalid\r\n\r\n")
                   if not t.origin else
                   req().replace(f"Origin: {t.origin}".encode(), b"Origin: https://not-allowed.invalid"),
                   403),
        "no-origin": (req() if not t.origin else req().replace(f"Origin: {t.origin}\r\n".encode(), b""),
                      403),
    }
    needs_allow_list = ("origin", "no-origin")
    names = (args.variants.split(",") if args.variants
             else [v for v in variants if v not in needs_allow_list])
    results = {}
    ok = True
    for name in names:
        if name not in variants:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(variants)}")
        data, expected = variants[name]
        conn = RawConn(t)
        try:
            conn.send(data)
            status, headers = conn.read_http_head()
            length = int(headers.get("content-length", "0") or 0)
            body = conn.read_body(length).decode("utf-8", "replace").strip()
            # The gateway closes after refusing.
            closed = conn._eof_soon()
            r = {
                "status": status,
                "expected": expected,
                "connection_close": headers.get("connection", "").lower() == "close",
                "closed": closed,
                "body": body[:200],
            }
            if expected == 426:
                r["version_header"] = headers.get("sec-websocket-version")
        except (OSError, TimeoutError, ConnectionError) as e:
            r = {"status": None, "expected": expected, "error": f"{type(e).__name__}: {e}"}
        finally:
            conn.close()
        r["ok"] = r.get("status") == expected
        ok = ok and r["ok"]
        results[name] = r
    return {"ok": ok, "results": results}


# --- main ------------------------------------------------------------------------------

LIBRARY_CASES = ["text", "binary", "large", "ping", "close"]
RAW_CASES = ["unmasked", "rsv", "bad-utf8", "big-control", "fragmented-ping", "too-big",
             "bad-close", "orphan-continuation"]
RAW_GOOD_CASES = ["fragmented"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=LIBRARY_CASES + RAW_GOOD_CASES + RAW_CASES + ["bad-handshake"])
    p.add_argument("--url", help="wss://host:port/path (overrides --host/--port/--path)")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=7443)
    p.add_argument("--path", default="/ws")
    p.add_argument("--no-tls", action="store_true", help="plain TCP (ws://)")
    p.add_argument("--no-alpn", action="store_true",
                   help="offer no ALPN (the gateway then tells HTTP from its native protocol by the first byte)")
    p.add_argument("--cafile", help="CA certificate to verify the gateway with (else: not verified)")
    p.add_argument("--server-name", help="TLS server name (SNI, verification); default: the host")
    p.add_argument("--origin", help="Origin header to send")
    p.add_argument("--subprotocol", action="append", help="offer a subprotocol (repeatable)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    p.add_argument("--message", default="hello", help="text for the text case")
    p.add_argument("--size", type=int, default=100_000, help="bytes for the large case")
    p.add_argument("--limit", type=int, default=65536, help="the gateway's message limit (too-big sends limit+1)")
    p.add_argument("--code", type=int, default=1000, help="close code for the close case")
    p.add_argument("--reason", default="bye", help="close reason for the close case")
    p.add_argument("--variants",
                   help="bad-handshake variants, comma-separated (default: all but origin and no-origin)")
    args = p.parse_args()

    t = Target(args)
    result = {"case": args.case, "url": t.url, "verified": bool(t.cafile) or not t.tls}
    t0 = time.monotonic()
    try:
        if args.case in LIBRARY_CASES:
            result.update(library_case(t, args))
        elif args.case in RAW_GOOD_CASES:
            result.update(fragmented_case(t, args))
        elif args.case in RAW_CASES:
            result.update(raw_case(t, args))
        else:
            result.update(bad_handshake(t, args))
    except Exception as e:  # one JSON line whatever happens
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        rcvd = getattr(e, "rcvd", None)
        if rcvd is not None:
            result["close_code"] = rcvd.code
            result["close_reason"] = rcvd.reason
    result.setdefault("ok", False)
    result["elapsed_ms"] = round((time.monotonic() - t0) * 1000, 1)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
