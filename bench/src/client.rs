//! What every client of the load generator shares: the TLS client configuration (TLS 1.3,
//! ALPN `holdfast/1`, the ring provider, resumption only where asked for), resolving the
//! target, what a handshake negotiated, the stage a connection failed in and the counters
//! of those failures, and the payloads that tell connections and rounds apart.
//!
//! The connections themselves run on the io_uring client runtime in `uring`.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use holdfast_wire::frame;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::ClientConfig;

use crate::report::StageFailures;

/// A TLS 1.3 client configuration trusting only the CA in `ca_pem`, offering only ALPN
/// `holdfast/1`. Session resumption is off: every connection pays a full handshake, as
/// a fleet of distinct devices would.
pub fn client_config(ca_pem: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("reading CA certificates from {}", ca_pem.display()))?
    {
        let cert = cert.with_context(|| format!("parsing {}", ca_pem.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("adding a CA certificate from {}", ca_pem.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate in it", ca_pem.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![frame::ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// `base` with a session store of its own that keeps the tickets servers send (rustls
/// keeps up to 8 TLS 1.3 tickets per server), so the next connection made with it resumes.
/// One store per simulated device: a ticket is used once, and devices do not share them.
pub fn resuming(base: &ClientConfig) -> Arc<ClientConfig> {
    let mut config = base.clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(16);
    Arc::new(config)
}

/// What a completed handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The server accepted a ticket from an earlier connection.
    pub resumed: bool,
    /// Cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: Option<String>,
    /// Key exchange group, e.g. `X25519`.
    pub kx_group: Option<String>,
}

/// Resolves `ADDR:PORT` (a host name is allowed) to its first socket address.
pub fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    target
        .to_socket_addrs()
        .with_context(|| format!("resolving {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))
}

/// The stage of a connection that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Binding the source address or the TCP connect.
    Connect,
    /// The TLS handshake, or the ALPN check after it.
    Handshake,
    /// A DATA frame's round trip.
    Echo,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Handshake => "handshake",
            Stage::Echo => "echo",
        })
    }
}

/// Why a connection attempt or exchange failed.
#[derive(Debug)]
pub struct Failure {
    /// Where it failed.
    pub stage: Stage,
    /// True when the deadline ran out rather than an error arriving.
    pub timed_out: bool,
    /// What happened.
    pub error: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.error)
    }
}

/// How many failures a [`StageCounters`] asks its owner to print before going quiet.
const FAILURE_NOTES: u64 = 5;

/// Failures of short connections counted by stage, shared by concurrent tasks.
#[derive(Debug, Default)]
pub struct StageCounters {
    connect_failed: AtomicU64,
    handshake_failed: AtomicU64,
    echo_failed: AtomicU64,
    timed_out: AtomicU64,
    notes: AtomicU64,
}

impl StageCounters {
    /// Counts `f` at its stage (and as a timeout where it was one). True for the first few
    /// failures only: those are worth printing, the rest would flood the terminal.
    pub fn record(&self, f: &Failure) -> bool {
        match f.stage {
            Stage::Connect => &self.connect_failed,
            Stage::Handshake => &self.handshake_failed,
            Stage::Echo => &self.echo_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        if f.timed_out {
            self.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        self.notes.fetch_add(1, Ordering::Relaxed) < FAILURE_NOTES
    }

    /// The counts so far.
    pub fn get(&self) -> StageFailures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StageFailures {
            connect_failed: get(&self.connect_failed),
            handshake_failed: get(&self.handshake_failed),
            echo_failed: get(&self.echo_failed),
            timed_out: get(&self.timed_out),
        }
    }
}

/// A payload of `size` bytes that differs per connection and per round, so a frame
/// delivered to the wrong connection, or an old frame, is caught by the comparison.
pub fn payload(size: usize, conn: u64, round: u64) -> Vec<u8> {
    let seed = conn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.rotate_left(32);
    let bytes = seed.to_le_bytes();
    (0..size)
        .map(|i| bytes[i % 8].wrapping_add((i / 8) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_per_connection_and_round() {
        assert_eq!(payload(64, 1, 0).len(), 64);
        assert_eq!(payload(0, 1, 0), Vec::<u8>::new());
        assert_ne!(payload(64, 1, 0), payload(64, 2, 0));
        assert_ne!(payload(64, 1, 0), payload(64, 1, 1));
        assert_eq!(payload(64, 7, 3), payload(64, 7, 3));
    }
}
