//! Test doubles for the worker side of holdfast's links, beside the shared harness in
//! `common` (which this module only uses, never changes):
//!
//! - [`FakeWorker`]: a scripted worker on a real Unix socket, speaking the protocol
//!   through `holdfast_wire::envelope`. Each link it accepts gets a [`Mode`] (echo,
//!   passive, or garbage after HELLO); everything the gateway sends is recorded, and the
//!   test can write any envelope (or any bytes) on any link.
//! - [`EchoProc`]: the reference worker binary with extra flags (`--name`,
//!   `--prefix-worker-name`, `--ack-delay-ms`), which a test may SIGKILL, SIGSTOP and
//!   SIGCONT and start again on the same socket.
//! - [`Duplex`]: a TLS client whose reads run on their own thread while the test writes,
//!   so a client can send for a long time (even block on a full socket) and still take
//!   every echo.
//!
//! Every wait has a deadline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use holdfast_wire::envelope::{self, Hello, Message, Role};
use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use holdfast_wire::ConnId;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use crate::common::{
    file_tail, worker_bin, ChildGuard, Client, ClientOptions, Closed, TestDir, IO_TIMEOUT,
    READY_TIMEOUT,
};

// ---------------------------------------------------------------------------------------
// The scripted fake worker

/// How the fake worker treats one link (chosen per accepted connection, in accept order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Echo every FRAME back as SEND, ACK every batch, answer heartbeats.
    Echo,
    /// ACK every batch and answer heartbeats, send nothing else by itself: the test
    /// decides what to send.
    Passive,
    /// Send HELLO, wait for the gateway's HELLO, then write these bytes and go on
    /// reading (and recording) until the gateway drops the link.
    GarbageAfterHello(Vec<u8>),
}

/// What the gateway sent on a link, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Hello {
        version: u16,
        core: u8,
        cores: u8,
        name: String,
    },
    Open {
        conn: ConnId,
        link_seq: u64,
    },
    Frame {
        conn: ConnId,
        seq: u64,
        link_seq: u64,
        payload: Vec<u8>,
    },
    Close {
        conn: ConnId,
        seq: u64,
        link_seq: u64,
        code: u16,
        reason: String,
    },
    Heartbeat {
        nonce: u64,
        reply: bool,
    },
    /// A kind a gateway must not send (recorded, not answered).
    Other(String),
}

/// One accepted link.
#[derive(Debug, Clone, Default)]
pub struct LinkInfo {
    /// The gateway core of this link, from its HELLO.
    pub core: Option<u8>,
    /// Set when the link ended: why.
    pub ended: Option<String>,
    pub mode: Option<Mode>,
}

/// Everything the fake worker has seen.
#[derive(Debug, Default)]
pub struct Seen {
    /// In accept order.
    pub links: Vec<LinkInfo>,
    /// (link index, message), in arrival order per link.
    pub msgs: Vec<(usize, Got)>,
}

impl Seen {
    /// Links whose HELLO arrived and that have not ended.
    pub fn live(&self) -> impl Iterator<Item = (usize, u8)> + '_ {
        self.links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.ended.is_none())
            .filter_map(|(i, l)| l.core.map(|c| (i, c)))
    }

    /// The newest live link of gateway core `core`.
    pub fn link_of_core(&self, core: u8) -> Option<usize> {
        self.live()
            .filter(|&(_, c)| c == core)
            .map(|(i, _)| i)
            .last()
    }
}

type Shared = Arc<(Mutex<Seen>, Condvar)>;

/// A scripted worker listening on a Unix socket. Dropping it ends every link.
pub struct FakeWorker {
    pub socket: PathBuf,
    shared: Shared,
    writers: Arc<Mutex<Vec<Arc<Mutex<UnixStream>>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeWorker {
    /// Listens on `socket`; the n-th accepted link (0-based) is served in `mode(n)`.
    pub fn start(socket: &Path, mode: impl Fn(usize) -> Mode + Send + 'static) -> FakeWorker {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)
            .unwrap_or_else(|e| panic!("fake worker cannot listen on {}: {e}", socket.display()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared: Shared = Arc::default();
        let writers: Arc<Mutex<Vec<Arc<Mutex<UnixStream>>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (shared, writers, stop) = (shared.clone(), writers.clone(), stop.clone());
            thread::Builder::new()
                .name("fake-worker".into())
                .spawn(move || {
                    let mut readers = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let stream = match listener.accept() {
                            Ok((s, _)) => s,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                            Err(e) => panic!("fake worker accept: {e}"),
                        };
                        stream.set_nonblocking(false).expect("blocking link");
                        let index = {
                            let mut seen = lock(&shared);
                            seen.links.push(LinkInfo::default());
                            seen.links.len() - 1
                        };
                        let m = mode(index);
                        lock(&shared).links[index].mode = Some(m.clone());
                        let writer =
                            Arc::new(Mutex::new(stream.try_clone().expect("clone link stream")));
                        writers.lock().unwrap().push(writer.clone());
                        let (link_shared, link_stop) = (shared.clone(), stop.clone());
                        readers.push(thread::spawn(move || {
                            let why =
                                serve_link(index, stream, writer, m, &link_shared, &link_stop);
                            let (lk, cv) = &*link_shared;
                            lk.lock().unwrap().links[index].ended = Some(why);
                            cv.notify_all();
                        }));
                        shared.1.notify_all();
                    }
                    for r in readers {
                        let _ = r.join();
                    }
                })
                .expect("spawn fake worker")
        };
        FakeWorker {
            socket: socket.to_owned(),
            shared,
            writers,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// A look at what was seen so far.
    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        lock(&self.shared)
    }

    /// Waits until `f` returns `Some`, for up to `timeout`; panics naming `what`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Seen) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let (lk, cv) = &*self.shared;
        let mut seen = lk.lock().unwrap();
        loop {
            if let Some(t) = f(&seen) {
                return t;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "fake worker never saw {what} within {timeout:?}; links {:?}; last messages {:?}",
                    seen.links,
                    seen.msgs.iter().rev().take(10).collect::<Vec<_>>()
                );
            }
            seen = cv
                .wait_timeout(seen, left.min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
    }

    /// Waits until a live link from each of the gateway's `cores` cores is up, and
    /// returns their indices by core.
    pub fn wait_links(&self, cores: usize, timeout: Duration) -> Vec<usize> {
        self.wait_for(
            &format!("a live link from each of {cores} cores"),
            timeout,
            |s| (0..cores).map(|c| s.link_of_core(c as u8)).collect(),
        )
    }

    /// Writes one envelope on link `link`.
    pub fn send(&self, link: usize, msg: &Message<'_>) {
        let mut out = Vec::new();
        envelope::encode(msg, &mut out);
        self.send_raw(link, &out);
    }

    /// Writes bytes as they are on link `link`.
    pub fn send_raw(&self, link: usize, bytes: &[u8]) {
        let w = self.writers.lock().unwrap()[link].clone();
        let mut w = w.lock().unwrap();
        w.write_all(bytes)
            .unwrap_or_else(|e| panic!("fake worker write on link {link}: {e}"));
    }

    /// How many links were accepted.
    pub fn accepted(&self) -> usize {
        self.seen().links.len()
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.writers.lock().unwrap().iter() {
            if let Ok(w) = w.lock() {
                let _ = w.shutdown(Shutdown::Both);
            }
        }
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Seen> {
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves one link until it ends; returns why it ended.
fn serve_link(
    index: usize,
    mut stream: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    mode: Mode,
    shared: &Shared,
    stop: &AtomicBool,
) -> String {
    let write = |bytes: &[u8]| -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        writer.lock().unwrap().write_all(bytes)
    };
    let mut out = Vec::new();
    envelope::encode(
        &Message::Hello(Hello {
            version: envelope::VERSION,
            role: Role::Worker,
            core: 0,
            cores: 0,
            name: "fake-worker",
        }),
        &mut out,
    );
    if let Err(e) = write(&out) {
        return format!("writing HELLO: {e}");
    }
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut garbage_sent = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            return "test over".into();
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return if buf.is_empty() {
                    "gateway closed the link".into()
                } else {
                    format!("gateway closed the link with {} bytes pending", buf.len())
                }
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return format!("read: {e}"),
        }
        out.clear();
        let mut highest = 0;
        let mut used_total = 0;
        let mut got_all = Vec::new();
        loop {
            let rest = &buf[used_total..];
            let (msg, used) = match envelope::decode(rest, envelope::DEFAULT_MAX_PAYLOAD) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => return format!("gateway sent a bad envelope: {e}"),
            };
            let got = owned(&msg);
            // A link that has sent garbage only listens: the gateway is about to drop it.
            let answering = !garbage_sent;
            match (&mode, &msg) {
                (
                    _,
                    Message::Heartbeat {
                        nonce,
                        reply: false,
                    },
                ) if answering => {
                    envelope::encode(
                        &Message::Heartbeat {
                            nonce: *nonce,
                            reply: true,
                        },
                        &mut out,
                    );
                }
                (
                    Mode::Echo,
                    Message::Frame {
                        conn,
                        payload,
                        flags,
                        ..
                    },
                ) => {
                    envelope::encode(
                        &Message::Send {
                            conn: *conn,
                            flags: *flags,
                            payload,
                        },
                        &mut out,
                    );
                }
                _ => {}
            }
            match &msg {
                Message::Open(o) => highest = highest.max(o.link_seq),
                Message::Frame { link_seq, .. } | Message::Close { link_seq, .. } => {
                    highest = highest.max(*link_seq)
                }
                _ => {}
            }
            if let Message::Hello(h) = &msg {
                let (lk, _) = &**shared;
                lk.lock().unwrap().links[index].core = Some(h.core);
            }
            if let (Mode::GarbageAfterHello(g), Message::Hello(_)) = (&mode, &msg) {
                out.extend_from_slice(g);
                garbage_sent = true;
            }
            got_all.push(got);
            used_total += used;
        }
        buf.drain(..used_total);
        if highest > 0 && !garbage_sent {
            envelope::encode(&Message::Ack { link_seq: highest }, &mut out);
        }
        if !got_all.is_empty() {
            let (lk, cv) = &**shared;
            let mut seen = lk.lock().unwrap();
            seen.msgs.extend(got_all.into_iter().map(|g| (index, g)));
            cv.notify_all();
        }
        if let Err(e) = write(&out) {
            return format!("write: {e}");
        }
    }
}

fn owned(msg: &Message<'_>) -> Got {
    match *msg {
        Message::Hello(h) => Got::Hello {
            version: h.version,
            core: h.core,
            cores: h.cores,
            name: h.name.to_owned(),
        },
        Message::Open(o) => Got::Open {
            conn: o.conn,
            link_seq: o.link_seq,
        },
        Message::Frame {
            conn,
            seq,
            link_seq,
            payload,
            ..
        } => Got::Frame {
            conn,
            seq,
            link_seq,
            payload: payload.to_vec(),
        },
        Message::Close {
            conn,
            seq,
            link_seq,
            code,
            reason,
        } => Got::Close {
            conn,
            seq,
            link_seq,
            code,
            reason: reason.to_owned(),
        },
        Message::Heartbeat { nonce, reply } => Got::Heartbeat { nonce, reply },
        other => Got::Other(format!("{:?}", other.kind())),
    }
}

/// A 32-byte envelope header with an unknown kind (0xEE): malformed from its header on.
pub fn garbage_envelope() -> Vec<u8> {
    let mut g = vec![0u8; envelope::HEADER_LEN];
    g[4] = 0xEE;
    g.extend_from_slice(b"\xde\xad\xbe\xef not an envelope");
    g
}

// ---------------------------------------------------------------------------------------
// The reference worker, with flags, under the test's control

/// `holdfast-worker echo --socket PATH --name NAME ARGS...`, killed when dropped.
pub struct EchoProc {
    // Declared first: dropped (killed) before the rest.
    child: ChildGuard,
    pub socket: PathBuf,
    pub name: String,
    pub stderr: PathBuf,
}

impl EchoProc {
    /// Starts the worker and waits for its ready line. `extra` might be
    /// `["--prefix-worker-name", "--ack-delay-ms", "1000"]`.
    pub fn start(dir: &TestDir, socket: &Path, name: &str, extra: &[&str]) -> EchoProc {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let stderr = dir.join(&format!(
            "worker-{name}-{}.stderr",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(worker_bin())
            .arg("echo")
            .arg("--socket")
            .arg(socket)
            .arg("--name")
            .arg(name)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("create worker stderr file"))
            .spawn()
            .expect("spawn holdfast-worker");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut child = ChildGuard::new(child);
        let want = format!("holdfast-worker: listening on {}", socket.display());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.trim_end() == want => break,
                Ok(_) => {}
                Err(e) => panic!(
                    "holdfast-worker {name} did not print {want:?} ({e}; exit status {:?})\n\
                     --- worker stderr ---\n{}",
                    child.try_wait(),
                    file_tail(&stderr, 8192)
                ),
            }
        }
        EchoProc {
            child,
            socket: socket.to_owned(),
            name: name.to_owned(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The metrics label of this worker: its socket path.
    pub fn label(&self) -> String {
        self.socket.to_str().expect("UTF-8 socket path").to_owned()
    }

    pub fn signal(&self, signal: libc::c_int) {
        self.child.signal(signal)
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        self.child.signal(libc::SIGKILL);
        assert!(
            self.child.wait_timeout(Duration::from_secs(5)).is_some(),
            "worker {} did not die of SIGKILL",
            self.name
        );
    }
}

impl Drop for EchoProc {
    fn drop(&mut self) {
        // A stopped worker would not die of the guard's SIGKILL any later, but let it run
        // on anyway so nothing is left frozen.
        if self.child.try_wait().is_none() {
            self.child.signal(libc::SIGCONT);
        }
        if thread::panicking() {
            eprintln!(
                "--- worker {} ({}) stderr ---\n{}",
                self.name,
                self.socket.display(),
                file_tail(&self.stderr, 8192)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// A full-duplex TLS client

/// What a [`Duplex`] client has read.
#[derive(Debug, Default)]
pub struct Inbox {
    pub frames: Vec<OwnedFrame>,
    /// How the connection ended, once it has.
    pub closed: Option<Closed>,
}

/// A shared view of a [`Duplex`] client's inbox, for another thread to watch.
#[derive(Clone, Default)]
pub struct Watch(Arc<(Mutex<Inbox>, Condvar)>);

impl Watch {
    pub fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `f` holds over the inbox (true) or `timeout` passes (false).
    pub fn wait_until(&self, timeout: Duration, mut f: impl FnMut(&Inbox) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (_, cv) = &*self.0;
        let mut inbox = self.lock();
        loop {
            if f(&inbox) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inbox = cv
                .wait_timeout(inbox, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn push(&self, frames: Vec<OwnedFrame>) {
        self.lock().frames.extend(frames);
        self.0 .1.notify_all();
    }

    fn end(&self, closed: Closed) {
        self.lock().closed = Some(closed);
        self.0 .1.notify_all();
    }
}

/// A TLS client whose reading runs on its own thread: the test writes (blocking, if the
/// gateway stops reading) while every frame the gateway sends is taken and kept.
pub struct Duplex {
    conn: Arc<Mutex<ClientConnection>>,
    tcp: TcpStream,
    watch: Watch,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Duplex {
    /// Takes over a connected client (handshake done, nothing read yet).
    pub fn from_client(client: Client) -> Duplex {
        let StreamOwned { mut conn, sock } = client.stream;
        conn.set_buffer_limit(None);
        sock.set_write_timeout(Some(Duration::from_secs(60)))
            .expect("write timeout");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let conn = Arc::new(Mutex::new(conn));
        let watch = Watch::default();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (conn, watch, stop) = (conn.clone(), watch.clone(), stop.clone());
            let mut sock = sock.try_clone().expect("clone TCP stream");
            thread::spawn(move || {
                let closed = read_loop(&mut sock, &conn, &watch, &stop);
                watch.end(closed);
            })
        };
        Duplex {
            conn,
            tcp: sock,
            watch,
            stop,
            reader: Some(reader),
        }
    }

    /// Sends one frame; blocks while the socket is full (up to the 60 s write timeout).
    pub fn send(&mut self, kind: FrameType, payload: &[u8]) -> io::Result<()> {
        let mut plain = Vec::with_capacity(frame::HEADER_LEN + payload.len());
        frame::encode(kind, payload, &mut plain);
        let mut tls = Vec::new();
        {
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            conn.writer().write_all(&plain)?;
            while conn.wants_write() {
                conn.write_tls(&mut tls)?;
            }
        }
        self.tcp.write_all(&tls)
    }

    /// The inbox, shareable with other threads.
    pub fn watch(&self) -> Watch {
        self.watch.clone()
    }
}

impl Drop for Duplex {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.tcp.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn read_loop(
    sock: &mut TcpStream,
    conn: &Mutex<ClientConnection>,
    watch: &Watch,
    stop: &AtomicBool,
) -> Closed {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut plain = vec![0u8; 64 * 1024];
    let mut frames = FrameBuf::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Closed::Error("test over".into());
        }
        let n = match sock.read(&mut chunk) {
            Ok(0) => return Closed::Eof,
            Ok(n) => n,
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => continue,
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                    return Closed::Reset
                }
                _ => return Closed::Error(e.to_string()),
            },
        };
        let mut close_notify = false;
        {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let mut rest = &chunk[..n];
            while !rest.is_empty() {
                if let Err(e) = conn.read_tls(&mut rest) {
                    return Closed::Error(format!("read_tls: {e}"));
                }
                if let Err(e) = conn.process_new_packets() {
                    return Closed::Error(format!("TLS: {e}"));
                }
                loop {
                    match conn.reader().read(&mut plain) {
                        Ok(0) => {
                            close_notify = true;
                            break;
                        }
                        Ok(m) => frames.push(&plain[..m]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Closed::Error(format!("plaintext: {e}")),
                    }
                }
            }
        }
        let mut got = Vec::new();
        loop {
            match frames.next(frame::MAX_LEN_FIELD) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(e) => return Closed::Error(format!("the gateway sent a bad frame: {e}")),
            }
        }
        if !got.is_empty() {
            watch.push(got);
        }
        if close_notify {
            return Closed::CloseNotify;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers

/// The gateway's resident set size in bytes, from /proc/PID/status (VmRSS).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad VmRSS line {line:?}"));
    kib * 1024
}

/// Counts of each distinct item, for reporting duplicates.
pub fn counts<T: Ord + Clone>(items: impl IntoIterator<Item = T>) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// A TLS client whose socket has a receive buffer of about `rcvbuf` bytes (set before
/// connecting, so the TCP window stays small): a client that does not read fills it
/// quickly. Handshake done, within [`IO_TIMEOUT`].
pub fn connect_small_rcvbuf(
    addr: SocketAddr,
    opts: &ClientOptions,
    rcvbuf: usize,
) -> StreamOwned<ClientConnection, TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    socket
        .connect_timeout(&addr.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
    let mut tcp: TcpStream = socket.into();
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    tcp.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    let name = ServerName::try_from(opts.server_name.clone()).expect("server name");
    let mut conn = ClientConnection::new(opts.config(), name).expect("client connection");
    let deadline = Instant::now() + IO_TIMEOUT;
    while conn.is_handshaking() {
        assert!(Instant::now() < deadline, "TLS handshake did not finish");
        conn.complete_io(&mut tcp)
            .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    }
    StreamOwned::new(conn, tcp)
}
