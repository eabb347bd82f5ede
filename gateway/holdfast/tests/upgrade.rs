//! Live upgrade: a running gateway hands its listener and every established TLS
//! connection to a new process (`holdfast upgrade`, SIGUSR2). Clients keep their TCP
//! connections and TLS sessions (no new handshake), frames arrive once and in order, the
//! worker sees no CLOSE and no OPEN for a moved connection, counters continue; a new
//! binary that exits or hangs leaves the old process serving.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use holdfast_wire::frame::{FrameType, OwnedFrame};

/// The pid in `path`, once it holds one.
fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Running, not exited (an exited child of this test stays a zombie until reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z') || s.starts_with('X'))
        }
        Err(_) => false,
    }
}

/// Kills the processes a test's upgrades started, and whatever its pid file names last,
/// so a failing test leaves no gateway running.
struct Successors(Vec<i32>, Option<PathBuf>);

impl Drop for Successors {
    fn drop(&mut self) {
        let last = self.1.as_deref().and_then(read_pid);
        for &pid in self.0.iter().chain(last.iter()) {
            // SAFETY: plain kill(2) of a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Signals the gateway in `pid_file` to upgrade and waits until the file names a new
/// process and the old one has exited; returns the new pid.
fn upgrade(pid_file: &Path, gateway_stderr: &Path) -> i32 {
    let old = read_pid(pid_file).expect("a pid file");
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(old, libc::SIGUSR2) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = read_pid(pid_file).expect("a pid file");
        if now != old && !alive(old) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "upgrade of {old} did not finish (pid file says {now})\n{}",
            file_tail(gateway_stderr, 16384)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gateway_with_pid_file(
    dir: &TestDir,
    pki: &Pki,
    worker: &Path,
    extra: &[&str],
) -> (Gateway, PathBuf) {
    let pid_file = dir.join("holdfast.pid");
    let pid_arg = pid_file.to_str().expect("utf-8").to_owned();
    let mut args: Vec<&str> = vec!["--pid-file", &pid_arg, "--max-conns-per-ip", "0"];
    args.extend_from_slice(extra);
    let g = Gateway::start(dir, gateway_args(pki, &[worker], &args));
    (g, pid_file)
}

#[test]
fn established_connections_survive_an_upgrade() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let (mut gateway, pid_file) =
        gateway_with_pid_file(&dir, &pki, &worker.socket, &["--hibernate-after", "1"]);
    let mut started = Successors(Vec::new(), Some(pid_file.clone()));
    let opts = ClientOptions::new(&pki);
    let mut clients: Vec<Client> = (0..50)
        .map(|_| Client::connect(gateway.listen, &opts).expect("connect"))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&payload("before", i, 30));
    }
    // A client that keeps session tickets; no ticket key file is configured, so the
    // process's own key must move with the upgrade for its ticket to resume afterwards.
    let tickets = {
        let mut config = (*opts.config()).clone();
        config.resumption = rustls::client::Resumption::in_memory_sessions(8);
        std::sync::Arc::new(config)
    };
    let visit = |g: &Gateway| {
        let mut c = Client::connect_with(g.listen, tickets.clone(), "localhost").expect("visit");
        c.echo(b"visit");
        c.conn().handshake_kind()
    };
    assert_eq!(visit(&gateway), Some(rustls::HandshakeKind::Full));
    // The operator's command: signals, waits, reports.
    let old = read_pid(&pid_file).expect("pid");
    let out = std::process::Command::new(gateway_bin())
        .args(["upgrade", "--pid-file"])
        .arg(&pid_file)
        .output()
        .expect("holdfast upgrade");
    let new = read_pid(&pid_file).expect("pid");
    started.0.push(new);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        file_tail(&gateway.stderr, 8192)
    );
    assert_eq!(stdout.trim(), format!("upgraded: pid {old} -> {new}"));
    let status = gateway
        .wait_timeout(Duration::from_secs(5))
        .expect("the old process exited");
    assert!(status.success(), "the old process exits 0: {status}");
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(FrameType::Data, &payload("after", i + round, 30));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(
                c.recv(),
                OwnedFrame::Data(payload("after", i + round, 30)),
                "client {i}"
            );
        }
    }
    assert_eq!(
        visit(&gateway),
        Some(rustls::HandshakeKind::Resumed),
        "a ticket the old process issued resumes on the new one"
    );
    // The visitor above has gone; its close is counted once the gateway has seen it.
    let m = gateway.wait_for_metrics("the 50 clients open, the visitor closed", |m| {
        m.sum("holdfast_connections_open", &[]) == 50.0
    });
    assert_eq!(m.sum("holdfast_upgrades_total", &[("result", "ok")]), 1.0);
    assert!(m.sum("holdfast_handshakes_total", &[("result", "ok")]) >= 50.0);
}

/// A minimal WebSocket client over the harness's TLS client (frames masked).
struct Ws {
    client: Client,
    buf: Vec<u8>,
}

impl Ws {
    fn connect(addr: std::net::SocketAddr, pki: &Pki) -> Ws {
        use std::io::Read;
        let opts = ClientOptions::new(pki).alpn(&[b"http/1.1"]);
        let mut client = Client::connect(addr, &opts).expect("TLS connect");
        client.send_raw(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = client.stream.read(&mut chunk).expect("upgrade response");
            assert!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.drain(..end + 4);
        Ws { client, buf }
    }

    fn send(&mut self, opcode: holdfast_wire::ws::Opcode, fin: bool, payload: &[u8]) {
        let mut out = Vec::new();
        holdfast_wire::ws::encode_client_frame(opcode, fin, payload, [1, 2, 3, 4], &mut out);
        self.client.send_raw(&out);
    }

    /// The next data message's payload (server frames are unmasked and unfragmented).
    fn recv(&mut self) -> Vec<u8> {
        use std::io::Read;
        loop {
            if self.buf.len() >= 2 {
                let (len, off) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    126 => (usize::MAX, 0),
                    127 => panic!("no message here is that large"),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && self.buf.len() >= off + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[off..off + len].to_vec();
                    self.buf.drain(..off + len);
                    if opcode == 9 || opcode == 10 {
                        continue; // the gateway's keepalive ping
                    }
                    return payload;
                }
            }
            let mut chunk = [0u8; 16384];
            let n = self.client.stream.read(&mut chunk).expect("WebSocket read");
            assert!(n > 0, "WebSocket closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A native client with a small receive buffer, so what it does not read queues in the
/// gateway.
fn slow_reader(addr: std::net::SocketAddr, pki: &Pki) -> Client {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect(&addr.into()).expect("connect");
    let tcp: std::net::TcpStream = sock.into();
    Client::connect_over(tcp, &ClientOptions::new(pki)).expect("TLS")
}

const NATIVE: usize = 1_500;
const WEBSOCKET: usize = 200;
const MID_FRAME: usize = 100;
const SLOW: usize = 4;
const SLOW_FRAMES: usize = 500;
const SLOW_PAYLOAD: usize = 16 * 1024;

#[test]
fn thousands_of_streams_keep_their_order_across_two_upgrades() {
    use holdfast_wire::ws::Opcode;
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    // Slow readers hold megabytes unsent, more than the default per-connection bound.
    let config = dir.write(
        "gateway.toml",
        "[limits]\nmax_outbound_per_conn = 67108864\n",
    );
    let config = config.to_str().expect("utf-8").to_owned();
    let (gateway, pid_file) = gateway_with_pid_file(
        &dir,
        &pki,
        &worker.socket,
        &["--hibernate-after", "1", "--config", &config],
    );
    let mut started = Successors(Vec::new(), Some(pid_file.clone()));
    let opts = ClientOptions::new(&pki);
    // HOLDFAST_UPGRADE_CONNS raises the native count for a measurement run (the test
    // process's open files bound it); a prober echoes throughout and reports the longest
    // round trip, the pause a client saw.
    let native_n = std::env::var("HOLDFAST_UPGRADE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(NATIVE);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut prober_client = Client::connect(gateway.listen, &opts).expect("prober");
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                prober_client.echo(&payload("probe", n, 32));
                longest = longest.max(t.elapsed());
                n += 1;
            }
            (longest, n, prober_client)
        })
    };
    let mut native: Vec<Client> = (0..native_n + MID_FRAME)
        .map(|i| {
            Client::connect(gateway.listen, &opts).unwrap_or_else(|e| panic!("client {i}: {e}"))
        })
        .collect();
    let mut websocket: Vec<Ws> = (0..WEBSOCKET)
        .map(|_| Ws::connect(gateway.listen, &pki))
        .collect();
    let mut slow: Vec<Client> = (0..SLOW)
        .map(|_| slow_reader(gateway.listen, &pki))
        .collect();
    let handshakes = |g: &Gateway| {
        Metrics::parse(&http_get(g.admin, "/metrics").expect("metrics").1)
            .sum("holdfast_handshakes_total", &[("result", "ok")])
    };
    let mut seq = 0usize;
    let round = |native: &mut Vec<Client>, websocket: &mut Vec<Ws>, seq: &mut usize| {
        for (i, c) in native.iter_mut().enumerate() {
            c.send(FrameType::Data, &payload(&format!("n{seq}"), i, 24));
        }
        for (i, w) in websocket.iter_mut().enumerate() {
            w.send(Opcode::Text, true, &payload(&format!("w{seq}"), i, 24));
        }
        for (i, c) in native.iter_mut().enumerate() {
            assert_eq!(
                c.recv(),
                OwnedFrame::Data(payload(&format!("n{seq}"), i, 24)),
                "native {i}, frame {seq}"
            );
        }
        for (i, w) in websocket.iter_mut().enumerate() {
            assert_eq!(
                w.recv(),
                payload(&format!("w{seq}"), i, 24),
                "websocket {i}, message {seq}"
            );
        }
        *seq += 1;
    };
    round(&mut native, &mut websocket, &mut seq);
    // Some sleep: after a second idle they hibernate.
    std::thread::sleep(Duration::from_millis(2_500));
    let m = Metrics::parse(&http_get(gateway.admin, "/metrics").expect("metrics").1);
    assert!(m.sum("holdfast_connections_hibernated", &[]) > 0.0);
    let before = handshakes(&gateway);
    for upgrade_no in 0..2 {
        // Half-sent state: a native frame cut in two, a fragmented WebSocket message, and
        // slow readers with echoes queued in the gateway.
        let tag = format!("cut{upgrade_no}");
        for (i, c) in native[native_n..].iter_mut().enumerate() {
            let whole = encode(FrameType::Data, &payload(&tag, i, 40));
            c.send_raw(&whole[..17]);
        }
        for (i, w) in websocket.iter_mut().enumerate() {
            w.send(Opcode::Text, false, format!("{tag}-{i}:first-").as_bytes());
        }
        for (i, c) in slow.iter_mut().enumerate() {
            for n in 0..SLOW_FRAMES {
                c.send(
                    FrameType::Data,
                    &payload(&format!("s{upgrade_no}-{n}"), i, SLOW_PAYLOAD),
                );
            }
        }
        // Let the frames reach the gateway and the echoes pile up.
        std::thread::sleep(Duration::from_millis(500));
        let m = Metrics::parse(&http_get(gateway.admin, "/metrics").expect("metrics").1);
        assert!(
            m.sum("holdfast_outbound_bytes", &[]) > 0.0 || upgrade_no > 0,
            "slow readers queue echoes in the gateway"
        );
        let began = Instant::now();
        let new = upgrade(&pid_file, &gateway.stderr);
        started.0.push(new);
        eprintln!("upgrade {upgrade_no}: {:?}", began.elapsed());
        for (i, c) in native[native_n..].iter_mut().enumerate() {
            let whole = encode(FrameType::Data, &payload(&tag, i, 40));
            c.send_raw(&whole[17..]);
            assert_eq!(
                c.recv(),
                OwnedFrame::Data(payload(&tag, i, 40)),
                "cut frame of {i}"
            );
        }
        for (i, w) in websocket.iter_mut().enumerate() {
            w.send(Opcode::Continuation, true, b"second");
            assert_eq!(
                w.recv(),
                format!("{tag}-{i}:first-second").into_bytes(),
                "fragmented message of {i}"
            );
        }
        for (i, c) in slow.iter_mut().enumerate() {
            for n in 0..SLOW_FRAMES {
                let want = payload(&format!("s{upgrade_no}-{n}"), i, SLOW_PAYLOAD);
                assert_eq!(
                    c.recv(),
                    OwnedFrame::Data(want),
                    "slow reader {i}, frame {n}"
                );
            }
        }
        round(&mut native, &mut websocket, &mut seq);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (longest, probes, _prober_client) = prober.join().expect("prober");
    eprintln!(
        "{} connections: longest echo round trip {longest:?} over {probes} probes",
        native_n + MID_FRAME + WEBSOCKET + SLOW + 1
    );
    let m = Metrics::parse(&http_get(gateway.admin, "/metrics").expect("metrics").1);
    assert_eq!(
        handshakes(&gateway),
        before,
        "no client made a new handshake"
    );
    assert_eq!(m.sum("holdfast_upgrades_total", &[("result", "ok")]), 2.0);
    let total = (native_n + MID_FRAME + WEBSOCKET + SLOW + 1) as f64;
    assert_eq!(m.sum("holdfast_connections_open", &[]), total);
    assert_eq!(
        m.sum("holdfast_closes_total", &[]),
        0.0,
        "nobody was closed"
    );
    // The worker saw one OPEN per connection, from the first process only, and no CLOSE.
    drop(native);
    drop(websocket);
    drop(slow);
    let log = std::fs::read_to_string(&worker.stderr).expect("worker log");
    let opens: u64 = log
        .lines()
        .filter_map(|l| l.split("opens: ").nth(1))
        .filter_map(|r| r.split(',').next()?.trim().parse::<u64>().ok())
        .sum();
    assert_eq!(
        opens, total as u64,
        "one OPEN per connection across both upgrades:\n{log}"
    );
}

/// Writes `contents` as an executable at `path`, replacing what is there the way an
/// operator installs a new binary (a new file renamed over the old name).
fn install(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).expect("write binary");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("install");
}

#[test]
fn a_broken_new_binary_leaves_the_old_process_serving() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let real = std::fs::read(gateway_bin()).expect("the gateway binary");
    let exe = dir.join("holdfast");
    install(&exe, &real);
    let pid_file = dir.join("holdfast.pid");
    let mut args = gateway_args(
        &pki,
        &[&worker.socket],
        &[
            "--pid-file",
            pid_file.to_str().expect("utf-8"),
            "--upgrade-timeout",
            "2",
        ],
    );
    args.insert(0, exe.clone().into_os_string());
    let gateway = Gateway::start_program(&dir, args);
    let mut started = Successors(Vec::new(), Some(pid_file.clone()));
    let mut client = gateway.client(&pki);
    client.echo(b"before");
    let old = read_pid(&pid_file).expect("pid file");
    let failed = |n: f64| {
        gateway.wait_for_metrics_within(Duration::from_secs(20), "a failed upgrade", &mut |m| {
            m.sum("holdfast_upgrades_total", &[("result", "failed")]) >= n
        });
    };
    // The real binary asked for another core count (each `--cores` value becomes 1).
    let real_copy = dir.join("holdfast-real");
    install(&real_copy, &real);
    let other_cores = format!(
        "#!/bin/sh\nn=0\nfor a in \"$@\"; do\n  if [ \"$prev\" = --cores ]; then a=1; fi\n  prev=$a\n  set -- \"$@\" \"$a\"\n  n=$((n+1))\ndone\nshift $n\nexec {} \"$@\"\n",
        real_copy.display()
    );
    for (n, broken) in [
        &b"#!/bin/sh\nexit 3\n"[..],
        b"#!/bin/sh\nexec sleep 600\n",
        other_cores.as_bytes(),
    ]
    .into_iter()
    .enumerate()
    {
        install(&exe, broken);
        gateway.signal(libc::SIGUSR2);
        failed(n as f64 + 1.0);
        assert_eq!(
            read_pid(&pid_file),
            Some(old),
            "the pid file still names the old process"
        );
        client.echo(format!("still served after broken binary {n}").as_bytes());
        let mut fresh = gateway.client(&pki);
        fresh.echo(b"new clients are accepted too");
    }
    let log = std::fs::read_to_string(&gateway.stderr).expect("log");
    assert!(log.contains("the new binary exited"), "{log}");
    assert!(log.contains("did not answer within 2 s"), "{log}");
    assert!(
        log.contains("the running process has 2 cores and this configuration 1"),
        "{log}"
    );
    // The real binary back in place: the upgrade goes through.
    install(&exe, &real);
    let new = upgrade(&pid_file, &gateway.stderr);
    started.0.push(new);
    client.echo(b"after the upgrade");
}

/// An echo worker that holds its ACKs back for `ack_delay_ms`, so frames are still
/// unacknowledged when the upgrade begins.
fn slow_ack_worker(dir: &TestDir, name: &str, ack_delay_ms: u64) -> (ChildGuard, PathBuf) {
    let socket = dir.join(name);
    let child = std::process::Command::new(worker_bin())
        .args(["echo", "--socket"])
        .arg(&socket)
        .args(["--ack-delay-ms", &ack_delay_ms.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(&format!("{name}.stderr"))).expect("stderr"))
        .spawn()
        .expect("spawn worker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "worker {name} did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    (ChildGuard::new(child), socket)
}

#[test]
fn a_worker_killed_during_the_upgrade_loses_no_frame() {
    const CLIENTS: usize = 200;
    const FRAMES: usize = 5;
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let (a, a_sock) = slow_ack_worker(&dir, "a.sock", 1_500);
    let (_b, b_sock) = slow_ack_worker(&dir, "b.sock", 0);
    let pid_file = dir.join("holdfast.pid");
    let gateway = Gateway::start(
        &dir,
        gateway_args(
            &pki,
            &[&a_sock, &b_sock],
            &[
                "--pid-file",
                pid_file.to_str().expect("utf-8"),
                "--max-conns-per-ip",
                "0",
            ],
        ),
    );
    let mut started = Successors(Vec::new(), Some(pid_file.clone()));
    let opts = ClientOptions::new(&pki);
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|_| Client::connect(gateway.listen, &opts).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..FRAMES {
            c.send(FrameType::Data, &payload(&format!("k{n}"), i, 20));
        }
    }
    // The upgrade starts with worker A's ACKs outstanding; A dies while it runs.
    std::thread::sleep(Duration::from_millis(100));
    let old = read_pid(&pid_file).expect("pid");
    // SAFETY: plain kill(2).
    unsafe { libc::kill(old, libc::SIGUSR2) };
    std::thread::sleep(Duration::from_millis(30));
    a.signal(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_pid(&pid_file) == Some(old) || alive(old) {
        assert!(
            Instant::now() < deadline,
            "upgrade did not finish\n{}",
            file_tail(&gateway.stderr, 16384)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.0.push(read_pid(&pid_file).expect("pid"));
    // Every frame comes back: those A echoed before it died, and A's unacknowledged ones
    // re-sent to B (at least once: a frame A echoed but had not acknowledged comes twice).
    for (i, c) in clients.iter_mut().enumerate() {
        let mut next = 0;
        while next < FRAMES {
            match c.recv() {
                OwnedFrame::Data(p) if p == payload(&format!("k{next}"), i, 20) => next += 1,
                OwnedFrame::Data(p) => {
                    let earlier = (0..next).any(|n| p == payload(&format!("k{n}"), i, 20));
                    assert!(
                        earlier,
                        "client {i}: unexpected {:?} waiting for frame {next}",
                        String::from_utf8_lossy(&p)
                    );
                }
                other => panic!("client {i}: {other:?}"),
            }
        }
    }
    // And the connections go on, on the surviving worker (late duplicates of re-sent
    // frames may still come first).
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(FrameType::Data, &payload("after", i, 20));
        loop {
            match c.recv() {
                OwnedFrame::Data(p) if p == payload("after", i, 20) => break,
                OwnedFrame::Data(p) => assert!(
                    (0..FRAMES).any(|n| p == payload(&format!("k{n}"), i, 20)),
                    "client {i}: unexpected {:?}",
                    String::from_utf8_lossy(&p)
                ),
                other => panic!("client {i}: {other:?}"),
            }
        }
    }
}
