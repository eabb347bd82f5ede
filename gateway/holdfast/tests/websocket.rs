//! WebSocket (RFC 6455) on the gateway's TLS listeners, end to end, with the reference
//! echo worker behind it (`docs/websocket.md` is the contract):
//!
//! - third-party clients: Python's `websockets` library and raw-socket cases from
//!   `tests/ws/ws_client.py` (echo of text, binary and large messages, pings, the close
//!   handshake, fragmentation, every refused frame and handshake), and a real browser
//!   (headless Chromium running `tests/ws/page.html`);
//! - a small WebSocket client written here on the harness's rustls client, for what needs
//!   control of timing or of each byte: keepalive, drain, more broken frames, and the
//!   connections that must keep working next to a refused one;
//! - the same listener serving native `holdfast/1` and WebSocket clients at once.
//!
//! Every bad input is checked three ways: the close code the client sees, the close
//! reason the gateway counts in /metrics, and an already-open native client and
//! WebSocket that still echo afterwards.
//!
//! The Python cases need `/usr/bin/python3` (with the `websockets` module for the library
//! cases: Debian's python3-websockets) and the browser cases `/usr/bin/chromium`; a test
//! whose tool is missing fails naming the package, or is counted as skipped under
//! `HOLDFAST_ALLOW_SKIP=1` (`common::peer`). scripts/test.sh installs both.

mod common;

use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    gateway_args, peer, run_with_timeout, Client, ClientOptions, Closed, Gateway, Pki, Recv, Stack,
    TestDir, Worker, IO_TIMEOUT,
};
use holdfast_wire::frame::OwnedFrame;
use holdfast_wire::ws::{self, close_code, Opcode};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const CHROMIUM: &str = "/usr/bin/chromium";
/// One run of ws_client.py (its own steps are bounded at 10 s each).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Chromium's start and the page's three echoes, on a loaded two-core box.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);
/// The key of RFC 6455's example handshake.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

// ---------------------------------------------------------------------------------------
// Tools that may be missing

fn have_python(with_websockets: bool) -> bool {
    static PLAIN: OnceLock<bool> = OnceLock::new();
    static LIBRARY: OnceLock<bool> = OnceLock::new();
    let (cell, code) = if with_websockets {
        (&LIBRARY, "import websockets")
    } else {
        (&PLAIN, "import ssl")
    };
    let ok = *cell.get_or_init(|| {
        Command::new(PYTHON)
            .args(["-c", code])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        if with_websockets {
            peer::missing(
                "Python's websockets module",
                "apt-get install python3-websockets",
            );
        } else {
            peer::missing(
                &format!("{PYTHON} with its ssl module"),
                "apt-get install python3",
            );
        }
    }
    ok
}

fn have_chromium() -> bool {
    let ok = Path::new(CHROMIUM).is_file();
    if !ok {
        peer::missing(CHROMIUM, "apt-get install chromium");
    }
    ok
}

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ws")
}

// ---------------------------------------------------------------------------------------
// Gateways

/// An echo worker and a gateway whose config file holds `toml`, plus the `extra` flags.
fn start_with_config(toml: &str, extra: &[&str]) -> Stack {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let config = dir.write("holdfast.toml", toml);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let mut args = vec!["--config", config.to_str().expect("UTF-8 temp path")];
    args.extend_from_slice(extra);
    let gateway = Gateway::start(&dir, gateway_args(&pki, &[&worker.socket], &args));
    Stack {
        gateway,
        worker,
        pki,
        dir,
    }
}

fn wss_url(stack: &Stack) -> String {
    format!("wss://localhost:{}/ws", stack.gateway.listen.port())
}

/// Waits until `holdfast_closes_total{reason}` is at least `before + n`.
fn wait_for_closes(gateway: &Gateway, reason: &str, before: f64, n: usize) {
    gateway.wait_for_sum_at_least(
        "holdfast_closes_total",
        &[("reason", reason)],
        before + n as f64,
    );
}

// ---------------------------------------------------------------------------------------
// ws_client.py

/// Runs `ws_client.py CASE --url ... --cafile ... EXTRA...` and returns its JSON line.
fn ws_client(stack: &Stack, case: &str, extra: &[&str]) -> Value {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(assets().join("ws_client.py"))
        .arg(case)
        .arg("--url")
        .arg(wss_url(stack))
        .arg("--cafile")
        .arg(&stack.pki.ca_pem)
        .args(extra);
    let (status, stdout, stderr) = run_with_timeout(&mut cmd, CLIENT_TIMEOUT);
    let status = status.unwrap_or_else(|| {
        panic!("ws_client.py {case} {extra:?} ran over {CLIENT_TIMEOUT:?}; stderr:\n{stderr}")
    });
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!("ws_client.py {case} {extra:?} printed nothing ({status}); stderr:\n{stderr}")
    });
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("ws_client.py {case}: {e} in its output {stdout:?}; stderr:\n{stderr}")
    });
    assert_eq!(
        status.success(),
        v["ok"] == Value::Bool(true),
        "ws_client.py {case}: exit status {status} disagrees with {v}"
    );
    v
}

/// As [`ws_client`], expecting `"ok": true`.
fn ws_client_ok(stack: &Stack, case: &str, extra: &[&str]) -> Value {
    let v = ws_client(stack, case, extra);
    assert_eq!(
        v["ok"],
        Value::Bool(true),
        "ws_client.py {case} {extra:?}: {v}"
    );
    v
}

// ---------------------------------------------------------------------------------------
// A WebSocket client on the harness's rustls client

/// ALPN `http/1.1`, as browsers offer for wss://.
fn ws_options(pki: &Pki) -> ClientOptions {
    ClientOptions::new(pki).alpn(&[b"http/1.1"])
}

/// A response head.
#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A frame from the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerFrame {
    fin: bool,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
}

impl ServerFrame {
    fn close_code(&self) -> Option<u16> {
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
    fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

#[derive(Debug)]
enum WsRecv {
    Frame(ServerFrame),
    Closed(Closed),
    TimedOut,
}

enum Fill {
    More,
    Closed(Closed),
    TimedOut,
}

/// A blocking WebSocket client: TLS from the harness, frames masked as a browser's are.
struct WsConn {
    client: Client,
    buf: Vec<u8>,
    masks: u32,
}

impl WsConn {
    /// Connects with `opts`, sends an upgrade of `/ws` with the `extra` header lines and
    /// reads the response head (whatever its status).
    fn upgrade(addr: SocketAddr, opts: &ClientOptions, extra: &[&str]) -> (WsConn, Head) {
        let client = Client::connect(addr, opts)
            .unwrap_or_else(|e| panic!("TLS connect to the gateway at {addr}: {e}"));
        let mut c = WsConn {
            client,
            buf: Vec::new(),
            masks: 0,
        };
        let mut req = format!(
            "GET /ws HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n",
            addr.port()
        );
        for h in extra {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        c.client.send_raw(req.as_bytes());
        let head = c.read_head();
        (c, head)
    }

    /// An upgraded connection (ALPN http/1.1, no extra headers).
    fn connect(stack: &Stack) -> WsConn {
        Self::connect_with(stack, &ws_options(&stack.pki), &[])
    }

    fn connect_with(stack: &Stack, opts: &ClientOptions, extra: &[&str]) -> WsConn {
        let (c, head) = WsConn::upgrade(stack.gateway.listen, opts, extra);
        assert_eq!(head.status, 101, "upgrade refused: {head:?}");
        let want = ws::accept_key(KEY.as_bytes());
        assert_eq!(
            head.get("sec-websocket-accept").map(str::as_bytes),
            Some(&want[..]),
            "Sec-WebSocket-Accept in {head:?}"
        );
        c
    }

    fn alpn(&self) -> Option<Vec<u8>> {
        self.client.conn().alpn_protocol().map(<[u8]>::to_vec)
    }

    fn fill(&mut self, deadline: Instant) -> Fill {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Fill::TimedOut;
        }
        self.client
            .stream
            .sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("set read timeout");
        let mut chunk = [0u8; 16 * 1024];
        match self.client.stream.read(&mut chunk) {
            Ok(0) => Fill::Closed(Closed::CloseNotify),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Fill::More
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Fill::More,
                io::ErrorKind::UnexpectedEof => Fill::Closed(Closed::Eof),
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => Fill::Closed(Closed::Reset),
                _ => Fill::Closed(Closed::Error(e.to_string())),
            },
        }
    }

    fn read_head(&mut self) -> Head {
        let deadline = Instant::now() + IO_TIMEOUT;
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            match self.fill(deadline) {
                Fill::More => {}
                Fill::Closed(how) => panic!(
                    "connection ended ({how:?}) before a whole HTTP response head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Fill::TimedOut => panic!(
                    "no whole HTTP response head within {IO_TIMEOUT:?}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {status_line:?}"));
        let headers = lines
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_owned(), v.trim().to_owned()))
            })
            .collect();
        Head { status, headers }
    }

    /// A whole server frame at the front of the buffer, taken out of it.
    fn take_frame(&mut self) -> Option<ServerFrame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let masked = b[1] & 0x80 != 0;
        let (len, mut off) = match b[1] & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let key: Option<[u8; 4]> = if masked {
            let k = b.get(off..off + 4)?.try_into().ok()?;
            off += 4;
            Some(k)
        } else {
            None
        };
        let len = usize::try_from(len).expect("frame length fits usize");
        let mut payload = b.get(off..off + len)?.to_vec();
        if let Some(k) = key {
            ws::apply_mask(&mut payload, k);
        }
        let f = ServerFrame {
            fin: b[0] & 0x80 != 0,
            opcode: b[0] & 0x0f,
            masked,
            payload,
        };
        self.buf.drain(..off + len);
        Some(f)
    }

    /// The next frame, or how the connection ended, or `TimedOut` after `timeout`.
    fn try_recv(&mut self, timeout: Duration) -> WsRecv {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.take_frame() {
                assert!(!f.masked, "the gateway masked a frame: {f:?}");
                return WsRecv::Frame(f);
            }
            match self.fill(deadline) {
                Fill::More => {}
                Fill::Closed(how) => return WsRecv::Closed(how),
                Fill::TimedOut => return WsRecv::TimedOut,
            }
        }
    }

    fn recv(&mut self) -> ServerFrame {
        match self.try_recv(IO_TIMEOUT) {
            WsRecv::Frame(f) => f,
            other => panic!("expected a WebSocket frame within {IO_TIMEOUT:?}, got {other:?}"),
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        self.masks = self.masks.wrapping_add(1);
        (self.masks.wrapping_mul(0x9E37_79B9) ^ 0xA5A5_A5A5).to_be_bytes()
    }

    fn send_frame(&mut self, opcode: Opcode, fin: bool, payload: &[u8]) {
        let mut out = Vec::new();
        let mask = self.next_mask();
        ws::encode_client_frame(opcode, fin, payload, mask, &mut out);
        self.client.send_raw(&out);
    }

    fn echo(&mut self, opcode: Opcode, payload: &[u8]) {
        self.send_frame(opcode, true, payload);
        let f = self.recv();
        assert_eq!(
            (f.fin, f.opcode, f.payload.len()),
            (true, opcode as u8, payload.len()),
            "echo of a {opcode:?} message of {} bytes: {f:?}",
            payload.len()
        );
        assert!(f.payload == payload, "echo of {opcode:?} differs");
    }

    fn echo_text(&mut self, text: &str) {
        self.echo(Opcode::Text, text.as_bytes());
    }

    fn echo_binary(&mut self, data: &[u8]) {
        self.echo(Opcode::Binary, data);
    }

    /// Expects a close frame with `code` within `timeout`, with no other frame before it
    /// except pings (answered with nothing); returns the reason and the pings seen.
    fn expect_close(&mut self, code: u16, timeout: Duration) -> (String, usize) {
        let deadline = Instant::now() + timeout;
        let mut pings = 0;
        loop {
            match self.try_recv(deadline.saturating_duration_since(Instant::now())) {
                WsRecv::Frame(f) if f.opcode == Opcode::Ping as u8 => pings += 1,
                WsRecv::Frame(f) if f.opcode == Opcode::Close as u8 => {
                    assert_eq!(
                        f.close_code(),
                        Some(code),
                        "close code (reason {:?})",
                        f.close_reason()
                    );
                    return (f.close_reason(), pings);
                }
                other => panic!("expected close {code} within {timeout:?}, got {other:?}"),
            }
        }
    }

    /// Answers the gateway's close with our own and expects close_notify and the end.
    fn finish_close(&mut self, code: u16) {
        self.send_frame(Opcode::Close, true, &code.to_be_bytes());
        match self.try_recv(IO_TIMEOUT) {
            WsRecv::Closed(Closed::CloseNotify) => {}
            other => {
                panic!("expected close_notify and EOF after the close handshake, got {other:?}")
            }
        }
    }

    /// Leaves as a browser does: close 1000, the echoed close, then the end.
    fn close(mut self) {
        self.send_frame(Opcode::Close, true, &close_code::NORMAL.to_be_bytes());
        self.expect_close(close_code::NORMAL, IO_TIMEOUT);
        match self.try_recv(IO_TIMEOUT) {
            WsRecv::Closed(Closed::CloseNotify) => {}
            other => {
                panic!("expected close_notify and EOF after the close handshake, got {other:?}")
            }
        }
    }
}

/// The two connections every bad-input test keeps open while another misbehaves.
struct Bystanders {
    native: Client,
    ws: WsConn,
}

impl Bystanders {
    fn open(stack: &Stack) -> Bystanders {
        let mut native = stack.client();
        native.echo(b"bystander before");
        let mut ws = WsConn::connect(stack);
        ws.echo_text("bystander before");
        Bystanders { native, ws }
    }

    /// Both still echo, then leave cleanly.
    fn check(mut self, after: &str) {
        self.native.echo(format!("native after {after}").as_bytes());
        self.ws.echo_text(&format!("ws after {after}"));
        self.ws.echo_binary(&[0, 1, 2, 255]);
        self.ws.close();
        self.native.close();
    }
}

// ---------------------------------------------------------------------------------------
// 1. Well-behaved clients: Python's websockets library, and raw fragmentation

#[test]
fn python_text_and_binary_messages_echo_with_their_type() {
    if !have_python(true) {
        return;
    }
    let stack = Stack::start(&[]);
    let v = ws_client_ok(&stack, "text", &["--message", "hello"]);
    assert_eq!(
        (v["sent_type"].as_str(), v["recv_type"].as_str()),
        (Some("text"), Some("text"))
    );
    assert_eq!(v["subprotocol"], Value::Null, "{v}");
    let v = ws_client_ok(&stack, "text", &["--message", "héllo wörld ✓ 𝄞"]);
    assert_eq!(v["recv_type"], "text", "{v}");
    let v = ws_client_ok(&stack, "binary", &[]);
    assert_eq!(
        (v["recv_type"].as_str(), v["recv_len"].as_u64()),
        (Some("binary"), Some(1024))
    );
    // One FRAME envelope per message each way.
    stack
        .gateway
        .wait_for_metrics("3 messages relayed each way", |m| {
            m.sum("holdfast_frames_total", &[("direction", "from_client")]) >= 3.0
                && m.sum("holdfast_frames_total", &[("direction", "to_client")]) >= 3.0
        });
}

#[test]
fn python_large_messages_up_to_the_limit_echo() {
    if !have_python(true) {
        return;
    }
    let stack = Stack::start(&[]);
    for size in ["60000", "65536"] {
        let v = ws_client_ok(&stack, "large", &["--size", size]);
        assert_eq!(v["recv_len"].to_string(), size, "{v}");
    }
}

#[test]
fn python_large_message_with_a_raised_limit_echoes() {
    if !have_python(true) {
        return;
    }
    let stack = Stack::start(&["--max-frame", "1048576"]);
    let v = ws_client_ok(&stack, "large", &["--size", "500000"]);
    assert_eq!(v["recv_len"], 500_000, "{v}");
}

#[test]
fn python_ping_is_answered_by_the_gateway() {
    if !have_python(true) {
        return;
    }
    let stack = Stack::start(&[]);
    let before = stack.gateway.metrics().sum("holdfast_pings_total", &[]);
    ws_client_ok(&stack, "ping", &[]);
    stack
        .gateway
        .wait_for_sum_at_least("holdfast_pings_total", &[], before + 1.0);
    // Pings never reach the worker.
    let m = stack.gateway.metrics();
    assert_eq!(
        m.sum("holdfast_frames_total", &[("direction", "from_client")]),
        0.0,
        "a ping was relayed to the worker:\n{}",
        m.text
    );
}

#[test]
fn python_close_gets_its_code_echoed() {
    if !have_python(true) {
        return;
    }
    let stack = Stack::start(&[]);
    let before = stack.gateway.close_count("peer_closed");
    let codes = ["1000", "1001", "1014", "3000", "4001", "4999"];
    for code in codes {
        let v = ws_client_ok(&stack, "close", &["--code", code, "--reason", "bye"]);
        assert_eq!(v["close_code"].to_string(), code, "{v}");
    }
    wait_for_closes(&stack.gateway, "peer_closed", before, codes.len());
}

#[test]
fn python_client_without_alpn_is_served_websocket_after_sniffing_the_g() {
    if !have_python(true) {
        return;
    }
    let stack = Stack::start(&[]);
    let v = ws_client_ok(&stack, "text", &["--no-alpn", "--message", "sniffed"]);
    assert_eq!(v["recv_type"], "text", "{v}");
}

#[test]
fn fragmented_messages_with_a_ping_between_fragments_echo_whole() {
    if !have_python(false) {
        return;
    }
    let stack = Stack::start(&[]);
    let by = Bystanders::open(&stack);
    let v = ws_client_ok(&stack, "fragmented", &[]);
    for check in [
        "text_with_ping",
        "binary_3_fragments",
        "split_code_point",
        "close",
    ] {
        assert_eq!(v["checks"][check]["ok"], true, "{check}: {v}");
    }
    by.check("fragmented messages");
}

// ---------------------------------------------------------------------------------------
// 2. Bad input: close code, counted reason, bystanders unharmed

/// Runs a raw bad-input case of ws_client.py against a fresh gateway.
fn bad_frame_case(case: &str, code: u16, reason: &str, client_extra: &[&str]) -> Value {
    let stack = Stack::start(&[]);
    let by = Bystanders::open(&stack);
    let before = stack.gateway.close_count(reason);
    let v = ws_client_ok(&stack, case, client_extra);
    assert_eq!(v["alpn"], "http/1.1", "{v}");
    assert_eq!(v["close_code"], code, "{v}");
    assert_eq!(v["server_masked"], false, "{v}");
    assert_eq!(
        v["eof_after_close"], true,
        "the gateway must end the connection: {v}"
    );
    wait_for_closes(&stack.gateway, reason, before, 1);
    by.check(case);
    v
}

#[test]
fn unmasked_client_frame_is_closed_1002() {
    if have_python(false) {
        bad_frame_case("unmasked", 1002, "protocol_error", &[]);
    }
}

#[test]
fn rsv_bits_are_closed_1002() {
    if have_python(false) {
        bad_frame_case("rsv", 1002, "protocol_error", &[]);
    }
}

#[test]
fn text_that_is_not_utf8_is_closed_1007() {
    if have_python(false) {
        bad_frame_case("bad-utf8", 1007, "invalid_payload", &[]);
    }
}

#[test]
fn control_frame_over_125_bytes_is_closed_1002() {
    if have_python(false) {
        bad_frame_case("big-control", 1002, "protocol_error", &[]);
    }
}

#[test]
fn fragmented_ping_is_closed_1002() {
    if have_python(false) {
        bad_frame_case("fragmented-ping", 1002, "protocol_error", &[]);
    }
}

#[test]
fn oversized_frame_is_refused_1009_from_its_header() {
    if have_python(false) {
        let v = bad_frame_case("too-big", 1009, "frame_too_large", &["--limit", "65536"]);
        assert_eq!(v["refused_from_header"], true, "{v}");
    }
}

#[test]
fn one_byte_close_payload_is_closed_1002() {
    if have_python(false) {
        bad_frame_case("bad-close", 1002, "protocol_error", &[]);
    }
}

#[test]
fn continuation_without_a_message_is_closed_1002() {
    if have_python(false) {
        bad_frame_case("orphan-continuation", 1002, "protocol_error", &[]);
    }
}

/// Broken frames the Python cases do not send, from the client written here, each on
/// its own connection to one gateway.
#[test]
fn more_broken_frames_get_their_close_codes() {
    let stack = Stack::start(&[]);
    let by = Bystanders::open(&stack);
    let mask = [1, 2, 3, 4];
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "new message inside a fragmented one",
            [
                client_frame(Opcode::Text, false, b"first"),
                client_frame(Opcode::Text, true, b"second"),
            ]
            .concat(),
            1002,
            "protocol_error",
        ),
        (
            "unknown opcode 0x3",
            vec![0x83, 0x80, mask[0], mask[1], mask[2], mask[3]],
            1002,
            "protocol_error",
        ),
        (
            "close code 1005 on the wire",
            client_frame(Opcode::Close, true, &1005u16.to_be_bytes()),
            1002,
            "protocol_error",
        ),
        (
            "close code 999",
            client_frame(Opcode::Close, true, &999u16.to_be_bytes()),
            1002,
            "protocol_error",
        ),
        (
            "close reason that is not UTF-8",
            client_frame(Opcode::Close, true, &[0x03, 0xe8, 0xff, 0xfe]),
            1007,
            "invalid_payload",
        ),
        (
            "64-bit length with the top bit set",
            vec![
                0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, mask[0], mask[1], mask[2], mask[3],
            ],
            1002,
            "protocol_error",
        ),
        (
            // 40 000 + 30 000 bytes: each frame fits the 64 KiB limit, the message does not.
            "message over the limit across fragments",
            [
                client_frame(Opcode::Binary, false, &[7u8; 40_000]),
                client_frame(Opcode::Continuation, true, &[7u8; 30_000]),
            ]
            .concat(),
            1009,
            "frame_too_large",
        ),
    ];
    for (what, bytes, code, reason) in cases {
        let before = stack.gateway.close_count(reason);
        let mut c = WsConn::connect(&stack);
        c.client.send_raw(&bytes);
        let (why, _) = c.expect_close(code, IO_TIMEOUT);
        assert!(!why.is_empty(), "{what}: the close names no reason");
        c.finish_close(code);
        wait_for_closes(&stack.gateway, reason, before, 1);
    }
    by.check("broken frames");
}

fn client_frame(opcode: Opcode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ws::encode_client_frame(opcode, fin, payload, [0x5a, 0x17, 0xc3, 0x81], &mut out);
    out
}

#[test]
fn bad_handshakes_get_their_http_status_and_are_closed() {
    if !have_python(false) {
        return;
    }
    let stack = Stack::start(&[]);
    let by = Bystanders::open(&stack);
    let before = stack.gateway.close_count("bad_upgrade");
    let v = ws_client_ok(&stack, "bad-handshake", &[]);
    let results = v["results"].as_object().expect("results object");
    let expected = [
        ("method", 405),
        ("path", 404),
        ("http10", 505),
        ("plain", 426),
        ("version", 426),
        ("key", 400),
        ("no-host", 400),
        ("garbage", 400),
        ("too-large", 431),
    ];
    for (name, status) in expected {
        let r = &results[name];
        assert_eq!(r["status"], status, "{name}: {r}");
        assert_eq!(
            r["connection_close"], true,
            "{name}: Connection: close: {r}"
        );
        assert_eq!(r["closed"], true, "{name}: the gateway must close: {r}");
        if status == 426 {
            assert_eq!(r["version_header"], "13", "{name}: {r}");
        }
    }
    assert_eq!(results.len(), expected.len(), "variants run: {v}");
    wait_for_closes(&stack.gateway, "bad_upgrade", before, expected.len());
    by.check("bad handshakes");
}

#[test]
fn origin_allow_list_upgrades_allowed_origins_and_refuses_others_403() {
    let stack = start_with_config(
        "[websocket]\nallowed_origins = [\"https://good.example\"]\n",
        &[],
    );
    let by = Bystanders::open_with_origin(&stack, "https://good.example");
    let before = stack.gateway.close_count("bad_upgrade");
    // Compared case-insensitively.
    let mut c = WsConn::connect_with(
        &stack,
        &ws_options(&stack.pki),
        &["Origin: HTTPS://Good.Example"],
    );
    c.echo_text("case-insensitive origin");
    c.close();
    // The port is part of the origin; `null` (file:// pages) is not listed.
    let mut refused = 0;
    for origin in [
        "Origin: https://good.example:8443",
        "Origin: https://evil.example",
        "Origin: null",
    ] {
        let (_, head) = WsConn::upgrade(stack.gateway.listen, &ws_options(&stack.pki), &[origin]);
        assert_eq!(head.status, 403, "{origin}: {head:?}");
        refused += 1;
    }
    if have_python(true) {
        let v = ws_client_ok(&stack, "text", &["--origin", "https://good.example"]);
        assert_eq!(v["recv_type"], "text", "{v}");
        let v = ws_client_ok(
            &stack,
            "bad-handshake",
            &[
                "--origin",
                "https://good.example",
                "--variants",
                "origin,no-origin",
            ],
        );
        for name in ["origin", "no-origin"] {
            assert_eq!(v["results"][name]["status"], 403, "{name}: {v}");
            assert_eq!(v["results"][name]["closed"], true, "{name}: {v}");
        }
        refused += 2;
    }
    wait_for_closes(&stack.gateway, "bad_upgrade", before, refused);
    by.check("refused origins");
}

impl Bystanders {
    fn open_with_origin(stack: &Stack, origin: &str) -> Bystanders {
        let mut native = stack.client();
        native.echo(b"bystander before");
        let origin = format!("Origin: {origin}");
        let mut ws = WsConn::connect_with(stack, &ws_options(&stack.pki), &[&origin]);
        ws.echo_text("bystander before");
        Bystanders { native, ws }
    }
}

#[test]
fn subprotocol_is_the_gateways_first_choice_among_the_offered() {
    let stack = start_with_config(
        "[websocket]\nsubprotocols = [\"chat.v2\", \"chat.v1\"]\n",
        &[],
    );
    let opts = ws_options(&stack.pki);
    let cases = [
        ("chat.v1", Some("chat.v1")),
        // The gateway's order wins over the client's.
        ("chat.v1, chat.v2", Some("chat.v2")),
        ("chat.v3", None),
    ];
    for (offer, want) in cases {
        let header = format!("Sec-WebSocket-Protocol: {offer}");
        let (mut c, head) = WsConn::upgrade(stack.gateway.listen, &opts, &[&header]);
        assert_eq!(head.status, 101, "offer {offer}: {head:?}");
        assert_eq!(
            head.get("sec-websocket-protocol"),
            want,
            "offer {offer}: {head:?}"
        );
        c.echo_text(offer);
        c.close();
    }
    if have_python(true) {
        let v = ws_client_ok(&stack, "text", &["--subprotocol", "chat.v1"]);
        assert_eq!(v["subprotocol"], "chat.v1", "{v}");
        let v = ws_client_ok(
            &stack,
            "text",
            &["--subprotocol", "chat.v1", "--subprotocol", "chat.v2"],
        );
        assert_eq!(v["subprotocol"], "chat.v2", "{v}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Native and WebSocket clients on one listener

#[test]
fn one_listener_serves_native_and_websocket_clients_at_once() {
    let stack = Stack::start(&[]);
    let mut native = stack.client();
    assert_eq!(
        native.conn().alpn_protocol(),
        Some(&b"holdfast/1"[..]),
        "native ALPN"
    );
    let mut ws = WsConn::connect(&stack);
    assert_eq!(
        ws.alpn().as_deref(),
        Some(&b"http/1.1"[..]),
        "WebSocket ALPN"
    );
    // No ALPN at all: the gateway tells the protocols apart by the first byte.
    let no_alpn = ClientOptions::new(&stack.pki).alpn(&[]);
    let mut ws_sniffed = WsConn::connect_with(&stack, &no_alpn, &[]);
    let mut native_sniffed = Client::connect(stack.gateway.listen, &no_alpn).expect("connect");
    assert_eq!(ws_sniffed.alpn(), None);
    for i in 0..10 {
        native.echo(format!("native {i}").as_bytes());
        ws.echo_text(&format!("ws {i}"));
        ws.echo_binary(format!("ws binary {i}").as_bytes());
        ws_sniffed.echo_text(&format!("sniffed ws {i}"));
        native_sniffed.echo(format!("sniffed native {i}").as_bytes());
    }
    if have_python(true) {
        ws_client_ok(&stack, "text", &["--message", "while others are open"]);
        native.echo(b"native after python");
        ws.echo_text("ws after python");
    }
    // A WebSocket message reaches the worker as a FRAME like a native DATA frame does.
    stack
        .gateway
        .wait_for_metrics("50 messages relayed each way", |m| {
            m.sum("holdfast_frames_total", &[("direction", "from_client")]) >= 50.0
                && m.sum("holdfast_frames_total", &[("direction", "to_client")]) >= 50.0
        });
    ws.close();
    ws_sniffed.close();
    native.close();
    native_sniffed.close();
}

/// The request head in pieces (TLS records apart), the last piece followed in the same
/// write by a frame: the gateway assembles the head and serves the frame after the 101.
#[test]
fn upgrade_request_in_pieces_with_a_frame_right_behind_it() {
    let stack = Stack::start(&[]);
    let client = Client::connect(stack.gateway.listen, &ws_options(&stack.pki))
        .expect("TLS connect to the gateway");
    let mut c = WsConn {
        client,
        buf: Vec::new(),
        masks: 0,
    };
    let port = stack.gateway.listen.port();
    let head = format!(
        "GET /ws?token=abc HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let (a, rest) = head.as_bytes().split_at(10);
    let (b, tail) = rest.split_at(rest.len() - 3);
    for piece in [a, b] {
        c.client.send_raw(piece);
        thread::sleep(Duration::from_millis(30));
    }
    let mut last = tail.to_vec();
    last.extend(client_frame(Opcode::Text, true, b"right behind"));
    c.client.send_raw(&last);
    let head = c.read_head();
    assert_eq!(head.status, 101, "{head:?}");
    let f = c.recv();
    assert_eq!(
        (f.opcode, f.payload.as_slice()),
        (Opcode::Text as u8, &b"right behind"[..]),
        "{f:?}"
    );
    c.echo_text("and after");
    c.close();
}

// ---------------------------------------------------------------------------------------
// 4. Keepalive

#[test]
fn keepalive_pings_keep_a_ponging_client_and_close_a_silent_one_1001() {
    let stack = start_with_config("[websocket]\nping_interval_secs = 1\n", &[]);
    let before = stack.gateway.close_count("idle_timeout");
    let hold = Duration::from_millis(4500);

    // Answers every ping, sends nothing else.
    let mut ponger = WsConn::connect(&stack);
    let ponger = thread::spawn(move || {
        let start = Instant::now();
        let mut pings = 0;
        while start.elapsed() < hold {
            match ponger.try_recv(hold.saturating_sub(start.elapsed())) {
                WsRecv::Frame(f) if f.opcode == Opcode::Ping as u8 => {
                    pings += 1;
                    ponger.send_frame(Opcode::Pong, true, &f.payload);
                }
                WsRecv::TimedOut => break,
                other => panic!(
                    "ponging client: got {other:?} after {:?} and {pings} pings",
                    start.elapsed()
                ),
            }
        }
        (ponger, pings)
    });

    // Reads (so its receive window stays open) but never answers.
    let mut silent = WsConn::connect(&stack);
    let start = Instant::now();
    let (reason, pings) = silent.expect_close(close_code::GOING_AWAY, Duration::from_secs(8));
    let closed_after = start.elapsed();
    assert!(pings >= 1, "closed without being pinged first ({reason:?})");
    assert!(
        closed_after <= Duration::from_secs(5),
        "a client that never answers pings was closed only after {closed_after:?} \
         with a ping interval of 1 s"
    );
    silent.finish_close(close_code::GOING_AWAY);
    wait_for_closes(&stack.gateway, "idle_timeout", before, 1);

    let (mut ponger, pings) = ponger.join().expect("ponging client");
    assert!(
        pings >= 2,
        "only {pings} pings in {hold:?} with a 1 s interval"
    );
    ponger.echo_text("still here");
    ponger.close();
    eprintln!(
        "keepalive: silent client closed 1001 ({reason:?}) after {closed_after:?}; \
         ponging client answered {pings} pings in {hold:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Drain

#[test]
fn sigterm_closes_websocket_clients_1001_and_exits_zero() {
    let mut stack = Stack::start(&["--drain-grace", "2"]);
    let mut clients: Vec<WsConn> = (0..4).map(|_| WsConn::connect(&stack)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo_text(&format!("before drain {i}"));
    }
    let mut native = stack.client();
    native.echo(b"native before drain");
    stack
        .gateway
        .wait_for_sum_at_least("holdfast_connections_open", &[], 5.0);

    stack.gateway.signal(libc::SIGTERM);
    for (i, c) in clients.iter_mut().enumerate() {
        let (reason, _) = c.expect_close(close_code::GOING_AWAY, Duration::from_secs(5));
        assert!(
            !reason.is_empty(),
            "client {i}: close 1001 without a reason"
        );
        c.finish_close(close_code::GOING_AWAY);
    }
    match native.try_recv(Duration::from_secs(5)) {
        Recv::Frame(OwnedFrame::GoAway(_)) => {}
        other => panic!("native client: expected GOAWAY, got {other:?}"),
    }
    let status = stack
        .gateway
        .wait_timeout(Duration::from_secs(6))
        .expect("the gateway exits after SIGTERM within the drain grace");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

// ---------------------------------------------------------------------------------------
// 6. A real browser

/// Headless Chromium running page.html, killed with its whole process group on drop.
struct Browser {
    child: Child,
    /// The browser's HOME, holding its profile and crash database: every process it
    /// starts names this directory on its command line.
    home: PathBuf,
}

impl Browser {
    /// Opens `page.html?QUERY` and returns the page's `RESULT` console line's text, or
    /// panics with the browser's last output after [`BROWSER_TIMEOUT`].
    fn run_page(dir: &TestDir, query: &str) -> String {
        let home = dir.join("chromium-home");
        std::fs::create_dir_all(&home).expect("create the browser's HOME");
        let page = assets().join("page.html");
        let url = format!("file://{}?{query}", page.display());
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-crash-reporter",
                "--disable-breakpad",
                // The test CA is not in the browser's store; this test is about WebSocket.
                "--ignore-certificate-errors",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!(
                "--user-data-dir={}",
                home.join("profile").display()
            ))
            .arg(&url)
            // Nothing goes to the real home (Chromium's crash handler writes under
            // ~/.config even with --user-data-dir).
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so every renderer and helper dies with it.
            .process_group(0)
            .spawn()
            .expect("spawn chromium");
        let stderr = child.stderr.take().expect("piped");
        let browser = Browser { child, home };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        let mut seen = Vec::new();
        let result = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(r) = result_of(&line) {
                        break r;
                    }
                    seen.push(line);
                }
                Err(e) => {
                    let start = seen.len().saturating_sub(40);
                    panic!(
                        "no RESULT line from chromium within {BROWSER_TIMEOUT:?} ({e}) for {url}; \
                         last stderr lines:\n{}",
                        seen[start..].join("\n")
                    )
                }
            }
        };
        drop(browser);
        result
    }
}

/// `[...:INFO:CONSOLE:53] "RESULT PASS 3/3", source: ...` -> `PASS 3/3`.
fn result_of(line: &str) -> Option<String> {
    let at = line.find("\"RESULT ")?;
    let rest = &line[at + "\"RESULT ".len()..];
    Some(rest[..rest.find("\", source:").unwrap_or(rest.len())].to_owned())
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pgid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes plain integers; the group is the one our unreaped child
        // leads (process_group(0)), so it names only the browser and its children.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        // Helpers that left the group (the crash handlers) exit by themselves once the
        // browser is gone; they are recognised by this test's directory on their command
        // line, and killed if they linger. (Killed group members show as zombies until
        // reaped; their command line is empty, so they do not match.)
        let deadline = Instant::now() + Duration::from_secs(5);
        let needle = self.home.to_string_lossy().into_owned();
        loop {
            let left = processes_mentioning(&needle);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for pid in left {
                    // SAFETY: as above; the pid was started by this test's browser.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn processes_mentioning(needle: &str) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

#[test]
fn chromium_echoes_text_binary_and_large_messages() {
    if !have_chromium() {
        return;
    }
    // The page's large message is 100 KB.
    let stack = Stack::start(&["--max-frame", "262144"]);
    let query = format!("url={}", wss_url(&stack));
    let result = Browser::run_page(&stack.dir, &query);
    assert_eq!(result, "PASS 3/3", "page result");
    stack
        .gateway
        .wait_for_metrics("3 messages relayed each way", |m| {
            m.sum("holdfast_frames_total", &[("direction", "from_client")]) >= 3.0
                && m.sum("holdfast_frames_total", &[("direction", "to_client")]) >= 3.0
        });
}

/// The gateway refuses the 100 KB message from its header while the browser is still
/// sending it; the lingering close must let the browser read the 1009 (not a reset and
/// 1006).
#[test]
fn chromium_sees_1009_for_a_message_over_the_limit() {
    if !have_chromium() {
        return;
    }
    let stack = Stack::start(&[]);
    let before = stack.gateway.close_count("frame_too_large");
    let query = format!("url={}", wss_url(&stack));
    let result = Browser::run_page(&stack.dir, &query);
    assert!(
        result.starts_with("FAIL large: closed with 1009"),
        "page result {result:?}: expected the browser to see close 1009 for its 100 KB message"
    );
    wait_for_closes(&stack.gateway, "frame_too_large", before, 1);
}
