//! holdfast's wire formats, without I/O: connection ids, the native client frame codec
//! spoken after TLS, the PROXY protocol header a load balancer sends before it, and the envelope codec of the gateway ↔ worker links.
//!
//! Everything here takes bytes in and hands bytes or borrowed views out; nothing touches
//! a file descriptor, a clock or an allocator on the decode path. The gateway, the worker
//! SDK and the load generator all use this one codec, so a format change is made here and
//! nowhere else. Decoders are strict: a field that is not exactly what the protocol allows
//! is an error, never a guess.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod connid;
pub mod envelope;
pub mod frame;
pub mod proxy;
pub mod ws;

pub use connid::ConnId;
