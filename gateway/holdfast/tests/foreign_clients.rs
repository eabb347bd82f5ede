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
