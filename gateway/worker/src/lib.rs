//! The worker SDK: the blocking worker side of the gateway ↔ worker links, and the
//! reference echo worker built on it.
//!
//! A worker listens on a Unix socket; every gateway core dials it, so a worker holds one
//! [`Link`] per core. A link buffers its reads and writes: [`Link::recv`] hands out one
//! [`Event`] at a time from whatever one `read` brought in, and the messages a worker
//! queues ([`Link::send`], [`Link::ack`], ...) leave in one `write` when the link is
//! flushed or is about to block, so thousands of frames a second cost a few system calls.
//! HELLO and heartbeats are answered here and never reach the worker's code. This crate
//! knows nothing of the gateway's internals; it speaks only the protocol in
//! `docs/worker-protocol.md` through [`holdfast_wire::envelope`].
//!
//! ```no_run
//! use holdfast_worker::{Event, WorkerListener};
//!
//! let listener = WorkerListener::bind("/run/holdfast/echo.sock")?;
//! let mut link = listener.accept()?; // one link per gateway core; use a thread each
//! while let Some(event) = link.recv()? {
//!     if let Event::Frame { conn, text, payload, .. } = &event {
//!         link.send(*conn, *text, payload);
//!     }
//!     // Acknowledge every OPEN, FRAME and CLOSE once it is handled.
//!     link.ack(event.link_seq());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod async_link;
mod link;
mod link_state;
pub mod nats;

pub mod echo;

pub use holdfast_wire;
pub use holdfast_wire::ConnId;
pub use link::{Event, Link, LinkError, PeerHello, WorkerListener, DEFAULT_NAME};
pub use link_state::SocketAccess;
