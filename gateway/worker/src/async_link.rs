//! The async (tokio) worker side of the links: the same events, the same queued
//! messages and the same HELLO and heartbeat handling as the blocking [`crate::Link`],
//! over [`tokio::net::UnixListener`] and [`tokio::net::UnixStream`].
//!
//! [`AsyncLink::recv`] is cancel-safe: it may lose a `tokio::select!` race without losing
//! a byte, so one task can wait on its link and on anything else at once. Messages a
//! worker queues ([`AsyncLink::send`], [`AsyncLink::ack`], ...) leave when the link is
//! flushed ([`AsyncLink::flush`]) or before `recv` waits for input.
//!
//! ```no_run
//! use holdfast_worker::async_link::AsyncWorkerListener;
//! use holdfast_worker::Event;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = AsyncWorkerListener::bind("/run/holdfast/echo.sock")?;
//! loop {
//!     let mut link = listener.accept().await?; // one link per gateway core
//!     tokio::spawn(async move {
//!         while let Ok(Some(event)) = link.recv().await {
//!             if let Event::Frame { conn, text, payload, .. } = &event {
//!                 link.send(*conn, *text, payload);
//!             }
//!             link.ack(event.link_seq());
//!         }
//!     });
//! }
//! # }
//! ```

use std::io;
use std::path::{Path, PathBuf};

use holdfast_wire::ConnId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::link_state::LinkState;
use crate::{Event, LinkError, PeerHello, DEFAULT_NAME};

/// A listening worker socket, async flavour of [`crate::WorkerListener`].
#[derive(Debug)]
pub struct AsyncWorkerListener {
    listener: UnixListener,
    path: PathBuf,
    name: String,
    access: crate::SocketAccess,
}

impl AsyncWorkerListener {
    /// Binds a Unix socket at `path` (inside a tokio runtime). A socket file left there by
    /// an earlier run is removed first; any other kind of file is left alone and binding
    /// fails.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::bind_with(path, crate::SocketAccess::default())
    }

    /// As [`AsyncWorkerListener::bind`], with the socket file's mode and the peer credentials a
    /// gateway must have (a connection from anyone else is closed at accept, and logged).
    pub fn bind_with(path: impl AsRef<Path>, access: crate::SocketAccess) -> io::Result<Self> {
        let path = path.as_ref();
        crate::link_state::remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        access.apply(path)?;
        Ok(AsyncWorkerListener {
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
    pub async fn accept(&self) -> io::Result<AsyncLink> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            match self.access.check(&stream) {
                Ok(()) => return AsyncLink::from_stream(stream, &self.name).await,
                Err(e) => tracing::warn!(socket = %self.path.display(), "refused a link: {e}"),
            }
        }
    }
}

/// One gateway core's link, async flavour of [`crate::Link`].
#[derive(Debug)]
pub struct AsyncLink {
    stream: UnixStream,
    state: LinkState,
}

impl AsyncLink {
    /// Wraps a connected stream and sends our HELLO (role worker) on it.
    pub async fn from_stream(stream: UnixStream, name: &str) -> io::Result<AsyncLink> {
        let mut link = AsyncLink {
            stream,
            state: LinkState::new(name),
        };
        link.flush().await?;
        Ok(link)
    }

    /// Sets the largest envelope payload accepted from the gateway.
    pub fn set_max_payload(&mut self, max: usize) {
        self.state.set_max_payload(max);
    }

    /// The gateway's HELLO, once it has arrived.
    pub fn peer(&self) -> Option<&PeerHello> {
        self.state.peer()
    }

    /// Waits for the gateway's HELLO (it comes first on every link) without taking any
    /// event off the link.
    pub async fn hello(&mut self) -> Result<&PeerHello, LinkError> {
        while self.state.peer().is_none() {
            // Anything but HELLO before HELLO is refused by the decoder, so this takes
            // no event off the link.
            if self.state.decode_one()?.is_none() {
                self.flush().await?;
                if !self.fill().await? {
                    return Err(LinkError::Truncated {
                        buffered: self.state.buffered(),
                    });
                }
            }
        }
        Ok(self.state.peer().expect("set above"))
    }

    /// Waits for the next event; pending writes are flushed first. `Ok(None)` when the
    /// gateway closed the link cleanly between envelopes. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<Event>, LinkError> {
        loop {
            if let Some(event) = self.try_recv()? {
                return Ok(Some(event));
            }
            self.flush().await?;
            if !self.fill().await? {
                return self.state.end_of_stream();
            }
        }
    }

    /// The next event already buffered, without waiting; `Ok(None)` when the buffer holds
    /// no whole event.
    pub fn try_recv(&mut self) -> Result<Option<Event>, LinkError> {
        self.state.try_recv()
    }

    /// Queues a message for one connection.
    pub fn send(&mut self, conn: ConnId, text: bool, payload: &[u8]) {
        self.state.send(conn, text, payload);
    }

    /// Queues a request that the gateway close a connection.
    pub fn close(&mut self, conn: ConnId, code: u16, reason: &str) {
        self.state.close(conn, code, reason);
    }

    /// Queues a cumulative acknowledgement up to and including `link_seq`.
    pub fn ack(&mut self, link_seq: u64) {
        self.state.ack(link_seq);
    }

    /// Queues a subscription of `conn` to `topic` (at most 65 535 bytes).
    pub fn subscribe(&mut self, conn: ConnId, topic: &[u8]) {
        self.state.subscribe(conn, topic);
    }

    /// Queues the removal of `conn` from `topic`.
    pub fn unsubscribe(&mut self, conn: ConnId, topic: &[u8]) {
        self.state.unsubscribe(conn, topic);
    }

    /// Queues a message for every subscriber of `topic` on every core of the gateway.
    pub fn publish(&mut self, topic: &[u8], text: bool, payload: &[u8]) {
        self.state.publish(topic, text, payload);
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.state.queued()
    }

    /// Writes out everything queued. Cancel-safe: what was written is dropped from the
    /// queue after each write, the rest stays queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.state.queued() != 0 {
            let n = self.stream.write(self.state.pending()).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.state.consume(n);
        }
        Ok(())
    }

    async fn fill(&mut self) -> io::Result<bool> {
        let n = self.stream.read(self.state.read_space()).await?;
        self.state.filled(n);
        Ok(n > 0)
    }
}
