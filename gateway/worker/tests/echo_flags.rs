//! The echo binary's test flags, end to end: `--prefix-worker-name` puts `NAME:` before
//! every echo, `--ack-delay-ms` holds ACKs back (but not echoes). This test plays the
//! gateway on a real Unix socket; every read has a timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast_wire::envelope::{self, Hello, Message, Role};
use holdfast_wire::ConnId;

struct Worker {
    child: Child,
    socket: std::path::PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn start(tag: &str, args: &[&str]) -> Worker {
    let socket = std::env::temp_dir().join(format!(
        "holdfast-worker-flags-{}-{tag}.sock",
        std::process::id()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast-worker"))
        .arg("echo")
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start holdfast-worker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim_end(),
        format!("holdfast-worker: listening on {}", socket.display())
    );
    Worker { child, socket }
}

/// What the worker sent, after its HELLO: echoes and ACKs, with when they arrived.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Send(Vec<u8>),
    Ack(u64),
}

fn link(worker: &Worker) -> (UnixStream, Vec<u8>) {
    let mut s = UnixStream::connect(&worker.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    envelope::encode(
        &Message::Hello(Hello {
            version: envelope::VERSION,
            role: Role::Gateway,
            core: 0,
            cores: 1,
            name: "flags-test",
        }),
        &mut out,
    );
    s.write_all(&out).unwrap();
    (s, Vec::new())
}

fn next(s: &mut UnixStream, buf: &mut Vec<u8>) -> Got {
    loop {
        if let Some((msg, used)) = envelope::decode(buf, envelope::DEFAULT_MAX_PAYLOAD).unwrap() {
            let got = match msg {
                Message::Send { payload, .. } => Some(Got::Send(payload.to_vec())),
                Message::Ack { link_seq } => Some(Got::Ack(link_seq)),
                Message::Hello(_) => None,
                other => panic!("unexpected {other:?}"),
            };
            buf.drain(..used);
            if let Some(g) = got {
                return g;
            }
            continue;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read from worker");
        assert!(n > 0, "worker closed the link");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn frame(s: &mut UnixStream, seq: u64, payload: &[u8]) {
    let mut out = Vec::new();
    envelope::encode(
        &Message::Frame {
            conn: ConnId::new(0, 1, 2),
            seq,
            link_seq: seq,
            flags: 0,
            payload,
        },
        &mut out,
    );
    s.write_all(&out).unwrap();
}

#[test]
fn prefix_worker_name_and_ack_delay() {
    let worker = start(
        "both",
        &[
            "--name",
            "w7",
            "--prefix-worker-name",
            "--ack-delay-ms",
            "300",
        ],
    );
    let (mut s, mut buf) = link(&worker);
    let sent = Instant::now();
    frame(&mut s, 1, b"hello");
    assert_eq!(next(&mut s, &mut buf), Got::Send(b"w7:hello".to_vec()));
    assert!(
        sent.elapsed() < Duration::from_millis(300),
        "the echo waited for the ACK delay"
    );
    assert_eq!(next(&mut s, &mut buf), Got::Ack(1));
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "the ACK came after {:?}, before the 300 ms delay",
        sent.elapsed()
    );
}

#[test]
fn without_flags_the_echo_is_pure() {
    let worker = start("pure", &["--name", "w8"]);
    let (mut s, mut buf) = link(&worker);
    frame(&mut s, 1, b"hello");
    assert_eq!(next(&mut s, &mut buf), Got::Send(b"hello".to_vec()));
    assert_eq!(next(&mut s, &mut buf), Got::Ack(1));
}
