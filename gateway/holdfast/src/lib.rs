//! The holdfast gateway: a thread-per-core io_uring TLS terminator that relays native
//! frames to routing workers over Unix sockets. See ARCHITECTURE.md for the map.
//!
//! `unsafe` is denied in the crate and allowed only in the two modules that talk to the
//! ring: `ring` (ring setup, the provided-buffer ring) and `core` (submissions naming
//! memory the kernel reads or writes), and in one block of `upgrade` (owning the sockets a
//! live upgrade inherits). Every block carries a `// SAFETY:` reason.
#![deny(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod check;
pub mod config;
pub mod conn_tls;
#[allow(unsafe_code)]
pub mod core;
pub mod handover;
pub mod hints;
pub mod inflight;
pub mod link;
pub mod metrics;
pub mod peer;
pub mod provider;
pub mod rates;
pub mod record;
#[allow(unsafe_code)]
pub mod ring;
pub mod route;
pub mod session;
pub mod ticket;
pub mod tls;
pub mod top;
pub mod upgrade;
pub mod wheel;
