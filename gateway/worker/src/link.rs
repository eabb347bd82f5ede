//! One link to one gateway core: buffered, blocking, and in charge of the HELLO exchange
//! and heartbeats. It keeps no per-connection state; what a worker does with OPEN, FRAME
//! and CLOSE is the worker's business.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[cfg(doc)]
use holdfast_wire::envelope;
use holdfast_wire::envelope::{EnvelopeError, Kind};
use holdfast_wire::ConnId;
use thiserror::Error;

use crate::link_state::LinkState;

/// The name a worker sends in its HELLO unless told otherwise.
pub const DEFAULT_NAME: &str = "holdfast-worker";

/// Queued output over this is written out at once instead of waiting for a flush, so a
/// worker that sends much between flushes does not grow its buffer without bound.
const FLUSH_AT: usize = 1 << 20;

/// Why a link ended. Every variant ends the link; the gateway reconnects and re-sends
/// whatever was not acknowledged.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Reading or writing the socket failed.
    #[error("link I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The gateway sent an envelope the codec refuses.
    #[error("gateway sent a bad envelope: {0}")]
    Protocol(#[from] EnvelopeError),
    /// The gateway speaks another protocol version; upgrade the older side.
    #[error("gateway speaks worker protocol version {theirs}, this worker speaks {ours}")]
    Version {
        /// [`envelope::VERSION`].
        ours: u16,
        /// What the gateway's HELLO said.
        theirs: u16,
    },
    /// A well-formed envelope that the gateway must not send at this point (a kind only
    /// workers send, anything before HELLO, a second HELLO, a HELLO with the worker role).
    #[error("gateway sent {kind:?} {what}")]
    Unexpected {
        /// The envelope's kind.
        kind: Kind,
        /// Why it is out of place.
        what: &'static str,
    },
    /// The gateway closed the socket in the middle of an envelope.
    #[error("gateway closed the link in the middle of an envelope ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete envelope.
        buffered: usize,
    },
}

/// The gateway core's HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    /// Protocol version (equal to [`envelope::VERSION`], or the link would have failed).
    pub version: u16,
    /// The gateway core at the other end of this link.
    pub core: u8,
    /// How many cores (and so links) the gateway runs.
    pub cores: u8,
    /// The gateway's name, for logs.
    pub name: String,
}

/// What the gateway tells a worker. Each carries the `link_seq` to acknowledge with
/// [`Link::ack`] once the worker has taken responsibility for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client connected.
    Open {
        /// The connection; stays valid until its CLOSE.
        conn: ConnId,
        /// Link sequence of this envelope.
        link_seq: u64,
        /// The client's address.
        peer: SocketAddr,
        /// TLS server name the client asked for.
        sni: Option<String>,
        /// ALPN protocol chosen, if the client offered any.
        alpn: Option<Vec<u8>>,
        /// Client certificate identity, if one was presented.
        client_identity: Option<Vec<u8>>,
    },
    /// A client frame. Delivery is at-least-once: after a link failure the same
    /// `(conn, seq)` may arrive again, on this link or another.
    Frame {
        /// The connection.
        conn: ConnId,
        /// Per-connection sequence (1, 2, 3, ...), for dropping duplicates.
        seq: u64,
        /// Link sequence of this envelope.
        link_seq: u64,
        /// A WebSocket text message.
        text: bool,
        /// The client's message.
        payload: Vec<u8>,
    },
    /// The connection ended; its id is dead from now on.
    Close {
        /// The connection.
        conn: ConnId,
        /// One past the last frame's sequence.
        seq: u64,
        /// Link sequence of this envelope.
        link_seq: u64,
        /// Close code (see `holdfast_wire::frame::close_code`).
        code: u16,
        /// Human-readable reason.
        reason: String,
    },
}

impl Event {
    /// The link sequence number to acknowledge for this event.
    pub fn link_seq(&self) -> u64 {
        match self {
            Event::Open { link_seq, .. }
            | Event::Frame { link_seq, .. }
            | Event::Close { link_seq, .. } => *link_seq,
        }
    }

    /// The connection this event is about.
    pub fn conn(&self) -> ConnId {
        match self {
            Event::Open { conn, .. } | Event::Frame { conn, .. } | Event::Close { conn, .. } => {
                *conn
            }
        }
    }
}

/// A listening worker socket.
///
/// ```no_run
/// use holdfast_worker::WorkerListener;
///
/// let listener = WorkerListener::bind("/tmp/worker.sock")?.with_name("billing-bridge");
/// for _ in 0.. {
///     let mut link = listener.accept()?;
///     std::thread::spawn(move || while let Ok(Some(_event)) = link.recv() {});
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct WorkerListener {
    listener: UnixListener,
    path: PathBuf,
    name: String,
    access: crate::SocketAccess,
}

impl WorkerListener {
    /// Binds a Unix socket at `path`. A socket file left there by an earlier run is
    /// removed first; any other kind of file is left alone and binding fails.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::bind_with(path, crate::SocketAccess::default())
    }

    /// As [`WorkerListener::bind`], with the socket file's mode and the peer credentials a
    /// gateway must have (a connection from anyone else is closed at accept, and logged).
    pub fn bind_with(path: impl AsRef<Path>, access: crate::SocketAccess) -> io::Result<Self> {
        let path = path.as_ref();
        crate::link_state::remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        access.apply(path)?;
        Ok(WorkerListener {
            listener,
            path: path.to_owned(),
            name: DEFAULT_NAME.to_owned(),
            access,
        })
    }

    /// Sets the name sent in each link's HELLO (default [`DEFAULT_NAME`]).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next gateway core to connect (with the allowed credentials) and sends
    /// it our HELLO.
    pub fn accept(&self) -> io::Result<Link> {
        loop {
            let (stream, _) = self.listener.accept()?;
            match self.access.check(&stream) {
                Ok(()) => return Link::from_stream(stream, &self.name),
                Err(e) => tracing::warn!(socket = %self.path.display(), "refused a link: {e}"),
            }
        }
    }
}

/// One gateway core's link. Reads and writes are buffered; see the crate docs.
#[derive(Debug)]
pub struct Link {
    stream: UnixStream,
    state: LinkState,
    /// A write error met while queueing, reported by the next `flush` or `recv`.
    write_error: Option<io::Error>,
}

impl Link {
    /// Wraps a connected stream and sends our HELLO (role worker) on it.
    pub fn from_stream(stream: UnixStream, name: &str) -> io::Result<Link> {
        let mut link = Link {
            stream,
            state: LinkState::new(name),
            write_error: None,
        };
        link.flush()?;
        Ok(link)
    }

    /// Sets the largest envelope payload accepted from the gateway (default
    /// [`envelope::DEFAULT_MAX_PAYLOAD`]); it must be at least the gateway's client
    /// frame limit.
    pub fn set_max_payload(&mut self, max: usize) {
        self.state.set_max_payload(max);
    }

    /// The gateway's HELLO, once it has arrived.
    pub fn peer(&self) -> Option<&PeerHello> {
        self.state.peer()
    }

    /// The underlying stream (for timeouts, shutdown, polling).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Blocks for the next event. Pending writes are flushed before blocking. `Ok(None)`
    /// when the gateway closed the link cleanly between envelopes.
    pub fn recv(&mut self) -> Result<Option<Event>, LinkError> {
        loop {
            if let Some(event) = self.try_recv()? {
                return Ok(Some(event));
            }
            self.flush()?;
            if !self.fill()? {
                return self.state.end_of_stream();
            }
        }
    }

    /// The next event already buffered, without blocking; `Ok(None)` when the buffer
    /// holds no whole event. HELLO and heartbeats met on the way are handled.
    pub fn try_recv(&mut self) -> Result<Option<Event>, LinkError> {
        self.state.try_recv()
    }

    /// Queues a message for one connection.
    pub fn send(&mut self, conn: ConnId, text: bool, payload: &[u8]) {
        self.state.send(conn, text, payload);
        self.flush_if_full();
    }

    /// Queues a request that the gateway close a connection with `code` and `reason`
    /// (see `holdfast_wire::frame::close_code`).
    pub fn close(&mut self, conn: ConnId, code: u16, reason: &str) {
        self.state.close(conn, code, reason);
        self.flush_if_full();
    }

    /// Queues a cumulative acknowledgement: the worker has taken responsibility for
    /// every envelope up to and including `link_seq`.
    pub fn ack(&mut self, link_seq: u64) {
        self.state.ack(link_seq);
        self.flush_if_full();
    }

    /// Queues a subscription of `conn` to `topic` (at most 65 535 bytes).
    pub fn subscribe(&mut self, conn: ConnId, topic: &[u8]) {
        self.state.subscribe(conn, topic);
        self.flush_if_full();
    }

    /// Queues the removal of `conn` from `topic`.
    pub fn unsubscribe(&mut self, conn: ConnId, topic: &[u8]) {
        self.state.unsubscribe(conn, topic);
        self.flush_if_full();
    }

    /// Queues a message for every connection subscribed to `topic` on this link's core.
    pub fn publish(&mut self, topic: &[u8], text: bool, payload: &[u8]) {
        self.state.publish(topic, text, payload);
        self.flush_if_full();
    }

    /// Writes out everything queued.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(e) = self.write_error.take() {
            return Err(e);
        }
        let queued = self.state.queued();
        if queued != 0 {
            let result = self.stream.write_all(self.state.pending());
            self.state.consume(queued);
            result?;
        }
        Ok(())
    }

    /// Called after each message is queued: writes the queue out once it reaches
    /// [`FLUSH_AT`], keeping a write error for the next `flush`.
    fn flush_if_full(&mut self) {
        if self.state.queued() >= FLUSH_AT && self.write_error.is_none() {
            if let Err(e) = self.flush() {
                self.write_error = Some(e);
            }
        }
    }

    /// Reads once into the buffer; `false` on end of stream.
    ///
    /// It sleeps in poll(2) for readable data, never in read(2). A reader asleep in a
    /// blocking read waits on the socket's one wait queue, unkeyed, and Unix sockets wake
    /// that queue with a write-space event each time the gateway takes data this worker
    /// wrote: every reply would wake this thread for nothing, and the gateway's core would
    /// pay for that cross-CPU wake-up in the read (a tenth of its CPU per relayed frame in
    /// a profile on a 2-vCPU VM; docs/benchmarks.md has the A/B). poll's wait is keyed by
    /// event and sleeps through those. The stream's read timeout and non-blocking mode are honoured as a
    /// read would: `WouldBlock` when the timeout passes or nothing is there.
    fn fill(&mut self) -> io::Result<bool> {
        loop {
            let buf = self.state.read_space();
            match rustix::net::recv(&self.stream, buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) => {
                    self.state.filled(n);
                    return Ok(n > 0);
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => {
                    if !wait_readable(&self.stream)? {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Waits until `stream` is readable (or at its end); `false` when it is in non-blocking
/// mode or its read timeout (SO_RCVTIMEO) passed first.
fn wait_readable(stream: &UnixStream) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    if rustix::fs::fcntl_getfl(stream)?.contains(rustix::fs::OFlags::NONBLOCK) {
        return Ok(false);
    }
    let timeout =
        rustix::net::sockopt::socket_timeout(stream, rustix::net::sockopt::Timeout::Recv)?.map(
            |d| {
                Timespec::try_from(d).unwrap_or(Timespec {
                    tv_sec: i64::MAX,
                    tv_nsec: 0,
                })
            },
        );
    loop {
        let mut fds = [PollFd::new(stream, PollFlags::IN)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) => return Ok(false),
            // Readable, at its end, or failed: the next recv says which.
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod access_tests {
    use super::*;
    use crate::SocketAccess;
    use std::os::unix::fs::PermissionsExt;

    fn temp_socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "holdfast-access-{}-{name}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn the_socket_gets_its_mode_and_peers_are_checked() {
        let me_uid = rustix::process::getuid().as_raw();
        let me_gid = rustix::process::getgid().as_raw();
        let path = temp_socket("mode");
        let l = WorkerListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "default mode");
        drop(l);

        // Allowed: our own uid and gid.
        let access = SocketAccess::default()
            .mode(0o600)
            .allow_uid(me_uid)
            .allow_gid(me_gid);
        let l = WorkerListener::bind_with(&path, access).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _c = UnixStream::connect(&path).unwrap();
        let link = l.accept().unwrap();
        assert!(link.peer().is_none());

        // Another uid only: our connection is refused, checked on the accepted stream.
        let other = SocketAccess::default().allow_uid(me_uid.wrapping_add(1));
        let (a, _b) = UnixStream::pair().unwrap();
        let err = other.check(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains(&format!("uid {me_uid}")), "{err}");
        assert!(SocketAccess::default().check(&a).is_ok());
        let _ = std::fs::remove_file(&path);
    }
}
