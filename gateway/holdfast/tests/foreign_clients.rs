//! TLS stacks other than rustls talk to the gateway: Python's `ssl` module (OpenSSL
//! underneath, with its own defaults) and the `openssl s_client` command line.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{find_program, peer, run_with_timeout, ChildGuard, Stack};
use holdfast_wire::frame::{FrameBuf, FrameType, OwnedFrame, MAX_LEN_FIELD};

const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys

host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["holdfast/1"])

def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise SystemExit("connection closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return out

def send(s, kind, payload):
    s.sendall(bytes([kind]) + len(payload).to_bytes(3, "big") + payload)

def recv(s):
    header = recv_exact(s, 4)
    return header[0], recv_exact(s, int.from_bytes(header[1:], "big"))

with socket.create_connection((host, port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.selected_alpn_protocol() == "holdfast/1", s.selected_alpn_protocol()
        payload = b"hello from python " + bytes(range(256))
        send(s, 0x01, payload)
        got = recv(s)
        assert got == (0x01, payload), got
        send(s, 0x02, b"python ping")
        got = recv(s)
        assert got == (0x03, b"python ping"), got
        print("version", s.version())
        print("OK")
"#;

#[test]
fn python_ssl_client_handshakes_echoes_and_pings() {
    let Some(python) = find_program(&["/usr/bin/python3", "python3"]) else {
        peer::missing("python3", "apt-get install python3");
        return;
    };
    let stack = Stack::start(&[]);
    let (status, stdout, stderr) = run_with_timeout(
        Command::new(&python)
            .arg("-c")
            .arg(PYTHON_CLIENT)
            .arg(stack.gateway.listen.ip().to_string())
            .arg(stack.gateway.listen.port().to_string())
            .arg(&stack.pki.ca_pem),
        Duration::from_secs(30),
    );
    assert!(
        status.is_some_and(|s| s.success()) && stdout.lines().any(|l| l == "OK"),
        "{} client failed (status {status:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        python.display()
    );
    eprint!("{stdout}");
    stack.client().echo(b"rustls still fine");
}

#[test]
fn openssl_s_client_echoes_a_data_frame() {
    let Some(openssl) = find_program(&["openssl"]) else {
        peer::missing("the openssl command", "apt-get install openssl");
        return;
    };
    let stack = Stack::start(&[]);
    let mut child = Command::new(&openssl)
        .arg("s_client")
        .arg("-connect")
        .arg(stack.gateway.listen.to_string())
        .arg("-CAfile")
        .arg(&stack.pki.ca_pem)
        .args([
            "-servername",
            "localhost",
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
        ])
        .args(["-alpn", "holdfast/1", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let guard = ChildGuard::new(child);

    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let payload = b"hello from openssl s_client".to_vec();
    let mut input = common::encode(FrameType::Data, &payload);
    input.extend(common::encode(FrameType::Ping, b"s_client ping"));
    // s_client reads stdin only once connected; what is written before waits in the pipe.
    stdin.write_all(&input).expect("write to s_client's stdin");
    stdin.flush().expect("flush s_client's stdin");

    let mut frames = FrameBuf::new();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while got.len() < 2 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(bytes) => frames.push(&bytes),
            Err(e) => {
                drop(guard);
                panic!(
                    "s_client gave {got:?} and {} more bytes before {e}\n--- s_client stderr ---\n{}",
                    frames.buffered(),
                    err_reader.join().unwrap_or_default()
                );
            }
        }
        while let Some(f) = frames.next(MAX_LEN_FIELD).expect("frames from the gateway") {
            got.push(f);
        }
    }
    drop(stdin);
    drop(guard);
    assert!(
        got.contains(&OwnedFrame::Data(payload)),
        "no echo through s_client: {got:?}"
    );
    assert!(
        got.contains(&OwnedFrame::Pong(b"s_client ping".to_vec())),
        "no PONG through s_client: {got:?}"
    );
    assert_eq!(got.len(), 2, "unexpected frames: {got:?}");
}

/// Python's ssl (OpenSSL) over many connections that hibernate between two echoes.
const PYTHON_HIBERNATING: &str = r#"
import socket, ssl, sys, time

host, port, ca, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["holdfast/1"])

def recv_exact(s, k):
    out = b""
    while len(out) < k:
        chunk = s.recv(k - len(out))
        if not chunk:
            raise SystemExit("connection closed after %d of %d bytes" % (len(out), k))
        out += chunk
    return out

def echo(s, payload):
    s.sendall(bytes([1]) + len(payload).to_bytes(3, "big") + payload)
    header = recv_exact(s, 4)
    got = recv_exact(s, int.from_bytes(header[1:], "big"))
    assert (header[0], got) == (1, payload), (header[0], got)

conns = []
for i in range(n):
    raw = socket.create_connection((host, port), timeout=10)
    conns.append(ctx.wrap_socket(raw, server_hostname="localhost"))
for i, s in enumerate(conns):
    echo(s, b"before %d" % i)
print("ECHOED", flush=True)
sys.stdin.readline()  # the test says when the gateway reports them hibernated
for i, s in enumerate(conns):
    echo(s, b"after %d " % i + bytes(range(256)) * 8)
print("OK", flush=True)
"#;

#[test]
fn python_ssl_clients_echo_after_their_connections_hibernated() {
    let Some(python) = find_program(&["/usr/bin/python3", "python3"]) else {
        peer::missing("python3", "apt-get install python3");
        return;
    };
    const N: usize = 1_000;
    let stack = Stack::start(&["--hibernate-after", "1", "--max-conns-per-ip", "0"]);
    let mut child = Command::new(&python)
        .arg("-c")
        .arg(PYTHON_HIBERNATING)
        .arg(stack.gateway.listen.ip().to_string())
        .arg(stack.gateway.listen.port().to_string())
        .arg(&stack.pki.ca_pem)
        .arg(N.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let guard = ChildGuard::new(child);
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut expect_line = |want: &str| {
        let got = rx.recv_timeout(Duration::from_secs(60));
        if got.as_deref() != Ok(want) {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            panic!("python said {got:?}, not {want}\n--- stderr ---\n{err}");
        }
    };
    expect_line("ECHOED");
    stack.gateway.wait_for_metrics_within(
        Duration::from_secs(15),
        "python's connections hibernated",
        &mut |m| m.sum("holdfast_connections_hibernated", &[]) >= N as f64,
    );
    stdin.write_all(b"go\n").expect("tell python");
    stdin.flush().expect("flush");
    expect_line("OK");
    drop(guard);
}

/// `openssl s_client`'s interactive `k` and `K` send a KeyUpdate without and with
/// update_requested (RFC 8446 4.6.3). Each is sent while the connection is hibernated,
/// repeatedly, and each echo after it must come back: the gateway followed the client's
/// new key and, for `K`, moved to a new key of its own that s_client follows.
#[test]
fn openssl_key_updates_while_hibernated_are_followed_both_ways() {
    let Some(openssl) = find_program(&["openssl"]) else {
        peer::missing("the openssl command", "apt-get install openssl");
        return;
    };
    let stack = Stack::start(&["--hibernate-after", "1", "--max-conns-per-ip", "0"]);
    // Not -quiet: that implies -ign_eof, which turns the k/K commands off. Its session
    // report goes to stdout too; the echoed frames are found in it by their bytes.
    let mut child = Command::new(&openssl)
        .arg("s_client")
        .arg("-connect")
        .arg(stack.gateway.listen.to_string())
        .arg("-CAfile")
        .arg(&stack.pki.ca_pem)
        .args(["-servername", "localhost", "-verify_return_error"])
        .args(["-alpn", "holdfast/1", "-tls1_3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let guard = ChildGuard::new(child);
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |want: &[u8], what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !seen.windows(want.len()).any(|w| w == want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(bytes) if !left.is_zero() => seen.extend_from_slice(&bytes),
                other => {
                    // stderr is not read here: s_client is still running, so it would
                    // never end.
                    panic!(
                        "no {what} from s_client ({:?})\n--- stdout ---\n{}",
                        other.err(),
                        String::from_utf8_lossy(&seen)
                    );
                }
            }
        }
    };
    let hibernated = |n: f64| {
        stack.gateway.wait_for_metrics_within(
            Duration::from_secs(10),
            "the connection hibernated",
            &mut |m| m.sum("holdfast_hibernations_total", &[]) >= n,
        );
    };
    // Each step: a frame echoed, the connection left to hibernate, then a command.
    let steps: [&[u8]; 5] = [b"", b"k\n", b"K\n", b"K\n", b"k\n"];
    for (i, command) in steps.iter().enumerate() {
        if !command.is_empty() {
            stdin.write_all(command).expect("s_client command");
            stdin.flush().expect("flush");
            // s_client reads its stdin in chunks; keep the command a chunk of its own.
            thread::sleep(Duration::from_millis(300));
        }
        let payload = format!(
            "frame {i} after {:?}",
            String::from_utf8_lossy(command).trim()
        );
        let frame = common::encode(FrameType::Data, payload.as_bytes());
        stdin.write_all(&frame).expect("write a frame");
        stdin.flush().expect("flush");
        wait_for(&frame, &payload);
        hibernated((i + 1) as f64);
    }
    // Had s_client sent a command line as data, the gateway would have closed on an
    // unknown frame type ('k' is 0x6b) and the next echo would never have come.
    let m = stack.gateway.metrics();
    assert!(m.sum("holdfast_wakeups_total", &[]) >= 4.0);
    drop(stdin);
    drop(guard);
}
