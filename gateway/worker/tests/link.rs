//! Tests of the worker SDK and the echo worker binary, with this test playing the
//! gateway side of real Unix sockets. Every read has a timeout, so a hang fails the
//! test instead of stalling it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use holdfast_wire::envelope::{self, flags, Hello, Message, Open, Role};
use holdfast_wire::ConnId;
use holdfast_worker::{Event, Link, LinkError};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway end of a link.
struct Gateway {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Gateway {
    fn new(stream: UnixStream) -> Gateway {
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Gateway {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, msgs: &[Message<'_>]) {
        let mut out = Vec::new();
        for m in msgs {
            envelope::encode(m, &mut out);
        }
        self.stream.write_all(&out).unwrap();
    }

    fn hello(&mut self, version: u16) {
        self.send(&[Message::Hello(Hello {
            version,
            role: Role::Gateway,
            core: 1,
            cores: 2,
            name: "test-gateway",
        })]);
    }

    /// The next whole envelope's bytes, or `None` on end of stream.
    fn next_raw(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(len) = envelope::peek_len(&self.buf) {
                if self.buf.len() >= len {
                    return Some(self.buf.drain(..len).collect());
                }
            }
            let mut chunk = [0; 65536];
            let n = self.stream.read(&mut chunk).expect("read from worker");
            if n == 0 {
                assert!(self.buf.is_empty(), "worker left a partial envelope");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Decodes the next envelope and hands it to `f`.
    fn next<T>(&mut self, f: impl FnOnce(Message<'_>) -> T) -> T {
        let raw = self.next_raw().expect("worker closed the link");
        let (msg, used) = envelope::decode(&raw, envelope::DEFAULT_MAX_PAYLOAD)
            .expect("worker sent a valid envelope")
            .expect("whole envelope");
        assert_eq!(used, raw.len());
        f(msg)
    }

    fn expect_worker_hello(&mut self, name: &str) {
        self.next(|m| match m {
            Message::Hello(h) => {
                assert_eq!(h.version, envelope::VERSION);
                assert_eq!(h.role, Role::Worker);
                assert_eq!(h.name, name);
            }
            other => panic!("expected HELLO, got {other:?}"),
        });
    }
}

fn conn(slot: u32) -> ConnId {
    ConnId::new(1, 3, slot)
}

fn open(c: ConnId, link_seq: u64) -> Message<'static> {
    Message::Open(Open {
        conn: c,
        link_seq,
        peer: "192.0.2.1:5000".parse().unwrap(),
        sni: Some("example.test"),
        alpn: Some(b"holdfast/1"),
        client_identity: None,
    })
}

fn frame(c: ConnId, seq: u64, link_seq: u64, text: bool, payload: &[u8]) -> Message<'_> {
    Message::Frame {
        conn: c,
        seq,
        link_seq,
        flags: if text { flags::TEXT } else { 0 },
        payload,
    }
}

/// A connected SDK link and the gateway end of it.
fn pair() -> (Link, Gateway) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(TIMEOUT)).unwrap();
    let link = Link::from_stream(a, "sdk-test").unwrap();
    let mut gw = Gateway::new(b);
    gw.expect_worker_hello("sdk-test");
    (link, gw)
}

#[test]
fn sdk_events_and_hello() {
    let (mut link, mut gw) = pair();
    assert!(link.peer().is_none());
    let c = conn(7);
    gw.hello(envelope::VERSION);
    gw.send(&[
        open(c, 1),
        Message::Heartbeat {
            nonce: 99,
            reply: false,
        },
        frame(c, 1, 2, true, b"hi"),
        Message::Close {
            conn: c,
            seq: 2,
            link_seq: 3,
            code: 1000,
            reason: "bye",
        },
    ]);
    let first = link.recv().unwrap().unwrap();
    let peer = link.peer().unwrap();
    assert_eq!((peer.version, peer.core, peer.cores), (1, 1, 2));
    assert_eq!(peer.name, "test-gateway");
    assert_eq!(
        first,
        Event::Open {
            conn: c,
            link_seq: 1,
            peer: "192.0.2.1:5000".parse().unwrap(),
            sni: Some("example.test".into()),
            alpn: Some(b"holdfast/1".to_vec()),
            client_identity: None,
        }
    );
    // Everything arrived in one write, so the rest is already buffered.
    let second = link.try_recv().unwrap().unwrap();
    assert_eq!(
        second,
        Event::Frame {
            conn: c,
            seq: 1,
            link_seq: 2,
            text: true,
            payload: b"hi".to_vec()
        }
    );
    let third = link.try_recv().unwrap().unwrap();
    assert_eq!(third.link_seq(), 3);
    assert_eq!(third.conn(), c);
    assert!(matches!(third, Event::Close { code: 1000, ref reason, .. } if reason == "bye"));
    assert_eq!(link.try_recv().unwrap(), None);

    // The heartbeat reply was queued; the worker's own messages follow it in order.
    link.send(c, false, b"out");
    link.close(c, 4001, "done");
    link.subscribe(c, b"room");
    link.unsubscribe(c, b"room");
    link.publish(b"room", true, b"all");
    link.ack(3);
    link.flush().unwrap();
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Heartbeat {
                nonce: 99,
                reply: true
            }
        )
    });
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Send {
                conn: c,
                flags: 0,
                payload: b"out"
            }
        )
    });
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Close {
                conn: c,
                seq: 0,
                link_seq: 0,
                code: 4001,
                reason: "done"
            }
        )
    });
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Subscribe {
                conn: c,
                topic: b"room"
            }
        )
    });
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Unsubscribe {
                conn: c,
                topic: b"room"
            }
        )
    });
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Publish {
                flags: flags::TEXT,
                topic: b"room",
                payload: b"all"
            }
        )
    });
    gw.next(|m| assert_eq!(m, Message::Ack { link_seq: 3 }));

    // A clean close between envelopes is the end of the link, not an error.
    drop(gw);
    assert!(link.recv().unwrap().is_none());
}

#[test]
fn sdk_large_frames_and_trickled_bytes() {
    let (mut link, mut gw) = pair();
    gw.hello(envelope::VERSION);
    let big = vec![0xab; 300 * 1024];
    let mut wire = Vec::new();
    envelope::encode(&frame(conn(1), 1, 1, false, &big), &mut wire);
    envelope::encode(&frame(conn(1), 2, 2, false, b"x"), &mut wire);
    let writer = std::thread::spawn(move || {
        for chunk in wire.chunks(4093) {
            gw.stream.write_all(chunk).unwrap();
        }
        gw
    });
    match link.recv().unwrap().unwrap() {
        Event::Frame { payload, .. } => assert_eq!(payload, big),
        other => panic!("{other:?}"),
    }
    assert_eq!(link.recv().unwrap().unwrap().link_seq(), 2);
    let gw = writer.join().unwrap();
    // Half an envelope then EOF is a truncated link.
    let mut gw = gw;
    let mut half = Vec::new();
    envelope::encode(&frame(conn(1), 3, 3, false, b"abc"), &mut half);
    gw.stream.write_all(&half[..20]).unwrap();
    drop(gw);
    assert!(matches!(
        link.recv(),
        Err(LinkError::Truncated { buffered: 20 })
    ));
}

#[test]
fn sdk_refuses_what_the_gateway_must_not_send() {
    // A version mismatch.
    let (mut link, mut gw) = pair();
    gw.hello(envelope::VERSION + 1);
    assert!(matches!(
        link.recv(),
        Err(LinkError::Version { ours: 1, theirs: 2 })
    ));

    // Anything before HELLO.
    let (mut link, mut gw) = pair();
    gw.send(&[open(conn(1), 1)]);
    assert!(matches!(link.recv(), Err(LinkError::Unexpected { .. })));

    // A worker-only kind.
    let (mut link, mut gw) = pair();
    gw.hello(envelope::VERSION);
    gw.send(&[Message::Ack { link_seq: 1 }]);
    assert!(matches!(link.recv(), Err(LinkError::Unexpected { .. })));

    // A malformed envelope: reserved bits set.
    let (mut link, mut gw) = pair();
    gw.hello(envelope::VERSION);
    let mut bad = Vec::new();
    envelope::encode(&Message::Ack { link_seq: 1 }, &mut bad);
    bad[6] = 1;
    gw.stream.write_all(&bad).unwrap();
    assert!(matches!(
        link.recv(),
        Err(LinkError::Protocol(envelope::EnvelopeError::ReservedBits))
    ));
}

/// The echo worker binary, killed when dropped.
struct Worker {
    child: Child,
    socket: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Worker {
    fn start(tag: &str) -> Worker {
        let socket =
            std::env::temp_dir().join(format!("holdfast-worker-{}-{tag}.sock", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast-worker"))
            .args(["echo", "--name", "echo-test", "--socket"])
            .arg(&socket)
            .stdout(Stdio::piped())
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

    fn connect(&self) -> Gateway {
        let mut gw = Gateway::new(UnixStream::connect(&self.socket).unwrap());
        gw.expect_worker_hello("echo-test");
        gw
    }
}

#[test]
fn echo_worker_echoes_and_acks_cumulatively() {
    let worker = Worker::start("echo");
    let mut gw = worker.connect();
    gw.hello(envelope::VERSION);
    let c = conn(42);
    const FRAMES: u64 = 2000;
    let payloads: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| format!("frame {i}").into_bytes())
        .collect();
    let mut msgs = vec![open(c, 1)];
    for (i, p) in payloads.iter().enumerate() {
        let i = i as u64;
        msgs.push(frame(c, i + 1, i + 2, i & 1 == 0, p));
    }
    msgs.push(Message::Close {
        conn: c,
        seq: FRAMES + 1,
        link_seq: FRAMES + 2,
        code: 1000,
        reason: "",
    });
    gw.send(&msgs);

    let mut echoed = 0;
    let mut acks = 0;
    let mut last_ack = 0;
    while last_ack < FRAMES + 2 {
        gw.next(|m| match m {
            Message::Send {
                conn: got,
                flags: f,
                payload,
            } => {
                assert_eq!(got, c);
                assert_eq!(payload, &payloads[echoed][..], "echo out of order");
                assert_eq!(f == flags::TEXT, echoed % 2 == 0);
                echoed += 1;
            }
            Message::Ack { link_seq } => {
                assert!(link_seq > last_ack, "ACK went backwards");
                // Cumulative: never ahead of what was echoed before it.
                assert!(link_seq <= echoed as u64 + 2);
                last_ack = link_seq;
                acks += 1;
            }
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(echoed as u64, FRAMES);
    // One ACK per batch of input, not one per frame.
    assert!(acks < FRAMES / 4, "{acks} ACKs for {FRAMES} frames");

    gw.send(&[Message::Heartbeat {
        nonce: 0xfeed,
        reply: false,
    }]);
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Heartbeat {
                nonce: 0xfeed,
                reply: true
            }
        )
    });
    // A heartbeat reply from the gateway is absorbed without an answer.
    gw.send(&[
        Message::Heartbeat {
            nonce: 1,
            reply: true,
        },
        frame(c, FRAMES + 5, FRAMES + 3, false, b"after"),
    ]);
    gw.next(|m| {
        assert!(matches!(
            m,
            Message::Send {
                payload: b"after",
                ..
            }
        ))
    });
    gw.next(|m| {
        assert_eq!(
            m,
            Message::Ack {
                link_seq: FRAMES + 3
            }
        )
    });
}

#[test]
fn echo_worker_drops_a_link_that_sends_garbage_and_keeps_serving() {
    let worker = Worker::start("garbage");

    let mut bad = worker.connect();
    bad.hello(envelope::VERSION);
    // A header with an unknown kind: the worker must drop this link.
    let mut garbage = vec![0u8; envelope::HEADER_LEN];
    garbage[4] = 0xee;
    bad.stream.write_all(&garbage).unwrap();
    assert!(
        bad.next_raw().is_none(),
        "worker kept a link that sent garbage"
    );

    // A lying length: over the limit, refused from the header alone.
    let mut liar = worker.connect();
    liar.hello(envelope::VERSION);
    let mut header = Vec::new();
    envelope::encode_frame_header(conn(1), 1, 1, 0, 64 << 20, &mut header);
    liar.stream.write_all(&header).unwrap();
    assert!(liar.next_raw().is_none());

    // A version mismatch ends the link too.
    let mut old = worker.connect();
    old.hello(envelope::VERSION + 1);
    assert!(old.next_raw().is_none());

    // Other links are unaffected.
    let mut good = worker.connect();
    good.hello(envelope::VERSION);
    good.send(&[open(conn(9), 1), frame(conn(9), 1, 2, false, b"still here")]);
    let mut got_echo = false;
    let mut last_ack = 0;
    while !(got_echo && last_ack == 2) {
        good.next(|m| match m {
            Message::Send { payload, .. } => {
                assert_eq!(payload, b"still here");
                got_echo = true;
            }
            Message::Ack { link_seq } => last_ack = link_seq,
            other => panic!("unexpected {other:?}"),
        });
    }
}

#[test]
fn sdk_recv_honours_the_read_timeout_and_non_blocking_mode() {
    let (mut link, mut gw) = pair();
    gw.hello(envelope::VERSION);
    link.stream()
        .set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let started = std::time::Instant::now();
    match link.recv() {
        Err(LinkError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
        other => panic!("expected the read timeout, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(140) && waited < TIMEOUT,
        "waited {waited:?} for a 150 ms read timeout"
    );

    link.stream().set_nonblocking(true).unwrap();
    let started = std::time::Instant::now();
    match link.recv() {
        Err(LinkError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
        other => panic!("expected WouldBlock in non-blocking mode, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(100));

    // What arrives is read in either mode.
    gw.send(&[open(conn(1), 1)]);
    link.stream().set_nonblocking(false).unwrap();
    match link.recv().unwrap() {
        Some(Event::Open { conn: c, .. }) => assert_eq!(c, conn(1)),
        other => panic!("expected OPEN, got {other:?}"),
    }
}

/// The thread's voluntary context switches, from /proc (Linux).
fn voluntary_switches(task: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{task}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .expect("voluntary_ctxt_switches in /proc status")
        .trim()
        .parse()
        .unwrap()
}

/// A worker blocked in `recv` sleeps while the gateway reads what it wrote: Unix sockets
/// wake a blocking reader each time its own written bytes are taken (a write-space
/// event on the socket's one wait queue), which cost the gateway's core a cross-CPU
/// wake-up per relayed frame until the link waited in poll(2) for readable data only.
#[test]
fn sdk_recv_sleeps_while_the_gateway_reads_its_replies() {
    let (mut link, mut gw) = pair();
    let (task_tx, task_rx) = std::sync::mpsc::channel();
    let (written_tx, written_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let task = std::fs::read_link("/proc/thread-self").unwrap();
        task_tx.send(task.to_string_lossy().into_owned()).unwrap();
        // 32 replies of 1 KiB, each written on its own (one socket buffer each, far below
        // the default send buffer), then block in recv.
        for i in 0..32 {
            link.send(conn(i), false, &[7; 1024]);
            link.flush().unwrap();
        }
        written_tx.send(()).unwrap();
        match link.recv() {
            Ok(Some(Event::Open { conn: c, .. })) => c,
            other => panic!("expected OPEN, got {other:?}"),
        }
    });
    let task = task_rx.recv_timeout(TIMEOUT).unwrap();
    written_rx
        .recv_timeout(TIMEOUT)
        .expect("the worker wrote its replies (a send buffer too small for 34 KiB?)");
    // Wait until the worker sleeps in recv.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{task}/stat")).unwrap();
        if stat.rsplit(") ").next().unwrap().starts_with('S') {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "worker never blocked");
        std::thread::sleep(Duration::from_millis(10));
    }
    let written = 32 * (envelope::HEADER_LEN + 1024);
    std::thread::sleep(Duration::from_millis(50));
    let before = voluntary_switches(&task);
    // Read the replies in small pieces, slowly: every read frees buffers of the worker's
    // socket, and a worker that wakes for it has time to fall asleep again in between.
    let mut got = 0;
    let mut chunk = [0u8; 1024];
    while got < written {
        let n = gw.stream.read(&mut chunk).unwrap();
        assert!(n > 0);
        got += n;
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(100));
    let after = voluntary_switches(&task);
    assert!(
        after - before <= 2,
        "the worker blocked in recv woke {} times while the gateway read its replies",
        after - before
    );
    gw.hello(envelope::VERSION);
    gw.send(&[open(conn(9), 1)]);
    assert_eq!(worker.join().unwrap(), conn(9));
}
