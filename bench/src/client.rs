//! The load generator's client side of one connection: TCP connect (optionally from a
//! chosen source address), TLS 1.3 with ALPN `holdfast/1` through tokio-rustls and the
//! ring provider, and the native frame protocol on top.
//!
//! Every step that waits on the network is bounded by a deadline the caller gives, and a
//! failure names the stage it happened in, so a report can say "the handshake failed"
//! rather than "something failed". This client runs on tokio, outside the gateway's data
//! plane; it answers PING with PONG so heartbeats never count against a connection.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::report::StageFailures;

/// The largest payload this client accepts: whatever the length field can say. The
/// gateway enforces its own limit; the client's job is to report, not to police.
const MAX_PAYLOAD: usize = frame::MAX_LEN_FIELD;

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

impl Failure {
    fn new(stage: Stage, error: impl fmt::Display) -> Failure {
        Failure {
            stage,
            timed_out: false,
            error: error.to_string(),
        }
    }

    fn timeout(stage: Stage) -> Failure {
        Failure {
            stage,
            timed_out: true,
            error: "timed out".into(),
        }
    }
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

/// Connects (from `source`), completes the handshake and echoes `payload`, all within
/// `timeout`.
pub async fn connect_and_echo(
    client: &Client,
    source: Option<IpAddr>,
    payload: &[u8],
    timeout: std::time::Duration,
) -> Result<Conn, Failure> {
    let deadline = Instant::now() + timeout;
    let mut conn = client.connect(source, deadline).await?;
    conn.echo(payload, deadline).await?;
    Ok(conn)
}

/// Bounds `fut` by `deadline`; a timeout or an error both become a [`Failure`] at `stage`.
async fn staged<T, E: fmt::Display>(
    stage: Stage,
    deadline: Instant,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Failure> {
    match timeout_at(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::new(stage, e)),
        Err(_) => Err(Failure::timeout(stage)),
    }
}

/// Opens connections to one gateway.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    target: SocketAddr,
}

impl Client {
    /// A client for `target`, verifying the gateway's certificate for `server_name`.
    pub fn new(
        config: Arc<ClientConfig>,
        target: SocketAddr,
        server_name: &str,
    ) -> anyhow::Result<Client> {
        let server_name = ServerName::try_from(server_name.to_string())
            .with_context(|| format!("{server_name:?} is not a valid TLS server name"))?;
        Ok(Client {
            connector: TlsConnector::from(config),
            server_name,
            target,
        })
    }

    /// Connects (from `source`, port chosen by the kernel, when given) and completes the
    /// TLS handshake with ALPN `holdfast/1`, all before `deadline`.
    pub async fn connect(
        &self,
        source: Option<IpAddr>,
        deadline: Instant,
    ) -> Result<Conn, Failure> {
        let tcp = staged(Stage::Connect, deadline, self.tcp(source)).await?;
        let stream = staged(
            Stage::Handshake,
            deadline,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await?;
        let alpn = stream.get_ref().1.alpn_protocol();
        if alpn != Some(frame::ALPN) {
            return Err(Failure::new(
                Stage::Handshake,
                format!(
                    "gateway chose ALPN {:?}, not holdfast/1",
                    alpn.map(String::from_utf8_lossy)
                ),
            ));
        }
        Ok(Conn {
            stream,
            inbox: FrameBuf::new(),
        })
    }

    async fn tcp(&self, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let socket = match self.target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            // Port 0: the kernel picks a free port for this source address, so each
            // address brings its own ephemeral range.
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = socket.connect(self.target).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

/// Something a connection received that the caller must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A DATA frame.
    Data(Vec<u8>),
    /// The gateway ended the connection: CLOSE, GOAWAY, or end of stream.
    Ended(String),
}

/// One established connection speaking the native frame protocol.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    inbox: FrameBuf,
}

impl Conn {
    /// Sends one frame (a TLS record of its own) and flushes it.
    pub async fn send(&mut self, kind: FrameType, payload: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(frame::HEADER_LEN + payload.len());
        frame::encode(kind, payload, &mut out);
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// Reads once from the socket into the frame buffer. Cancel-safe: bytes are only
    /// taken from the stream when the read completes, and then kept at once. Returns the
    /// number of bytes read, 0 at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        let mut buf = [0u8; 1024];
        let n = self.stream.read(&mut buf).await?;
        self.inbox.push(&buf[..n]);
        Ok(n)
    }

    /// Takes the next frame the caller must see out of what was already read, answering
    /// PING with PONG and skipping PONG on the way. Does not read the socket.
    pub async fn take(&mut self) -> io::Result<Option<Inbound>> {
        loop {
            let frame = self
                .inbox
                .next(MAX_PAYLOAD)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            return Ok(Some(match frame {
                None => return Ok(None),
                Some(OwnedFrame::Data(p)) => Inbound::Data(p),
                Some(OwnedFrame::Ping(p)) => {
                    self.send(FrameType::Pong, &p).await?;
                    continue;
                }
                Some(OwnedFrame::Pong(_)) => continue,
                Some(OwnedFrame::GoAway(note)) => {
                    Inbound::Ended(format!("GOAWAY {:?}", String::from_utf8_lossy(&note)))
                }
                Some(OwnedFrame::Close { code, reason }) => {
                    Inbound::Ended(format!("CLOSE {code} {reason:?}"))
                }
            }));
        }
    }

    /// The next frame the caller must see, reading as needed; end of stream is
    /// [`Inbound::Ended`].
    pub async fn next(&mut self) -> io::Result<Inbound> {
        loop {
            if let Some(inbound) = self.take().await? {
                return Ok(inbound);
            }
            if self.fill().await? == 0 {
                return Ok(Inbound::Ended("end of stream".into()));
            }
        }
    }

    /// Sends `payload` as DATA and waits for the same payload to come back, before
    /// `deadline`.
    pub async fn echo(&mut self, payload: &[u8], deadline: Instant) -> Result<(), Failure> {
        staged(Stage::Echo, deadline, async {
            self.send(FrameType::Data, payload).await?;
            match self.next().await? {
                Inbound::Data(p) if p == payload => Ok(()),
                Inbound::Data(p) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "echo differs: sent {} bytes, got {} bytes",
                        payload.len(),
                        p.len()
                    ),
                )),
                Inbound::Ended(why) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)),
            }
        })
        .await
    }

    /// Sends TLS close_notify and shuts the write side, before `deadline`; errors are of
    /// no interest at that point.
    pub async fn close(mut self, deadline: Instant) {
        let _ = timeout_at(deadline, self.stream.shutdown()).await;
    }

    /// What the handshake negotiated.
    pub fn tls_info(&self) -> TlsInfo {
        let tls = self.stream.get_ref().1;
        TlsInfo {
            resumed: tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            cipher_suite: tls
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite())),
            kx_group: tls
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name())),
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
