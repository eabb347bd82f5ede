//! Probe connections: a few TLS connections that echo one frame after another, back to
//! back, while something happens to the gateway (a live upgrade, a reload). The longest
//! round trip any of them saw is the longest pause a client saw; a probe whose connection
//! drops or whose echo comes back wrong is counted as failed, with its reason.
//!
//! They run on the idle parent's tokio runtime: a handful of connections, not the load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::client;

/// What the probes saw.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProbeStats {
    /// Probe connections asked for.
    pub conns: u64,
    /// Round trips completed, all probes together.
    pub round_trips: u64,
    /// The longest round trip of any probe, in milliseconds: the longest pause.
    pub longest_round_trip_ms: f64,
    /// Probes that failed (connection lost, wrong echo, a round trip over the bound).
    pub failed: u64,
    /// The first failure reasons, one per failed probe (at most 10).
    pub failures: Vec<String>,
}

/// One probe's connection.
struct Probe {
    tls: TlsStream<TcpStream>,
    inbound: FrameBuf,
    id: u64,
}

impl Probe {
    async fn connect(
        target: SocketAddr,
        config: Arc<ClientConfig>,
        server_name: &str,
        id: u64,
    ) -> anyhow::Result<Probe> {
        let tcp = TcpStream::connect(target)
            .await
            .with_context(|| format!("probe {id}: connecting to {target}"))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("probe {id}: server name {server_name:?}"))?;
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .with_context(|| format!("probe {id}: TLS handshake"))?;
        Ok(Probe {
            tls,
            inbound: FrameBuf::new(),
            id,
        })
    }

    /// Sends one DATA frame and waits for its echo, answering PINGs meanwhile.
    async fn round_trip(&mut self, round: u64, size: usize) -> anyhow::Result<()> {
        let payload = client::payload(size, self.id, round);
        let mut out = Vec::with_capacity(size + frame::HEADER_LEN);
        frame::encode(FrameType::Data, &payload, &mut out);
        self.tls.write_all(&out).await?;
        self.tls.flush().await?;
        let mut buf = [0u8; 4096];
        loop {
            match self.inbound.next(frame::DEFAULT_MAX_PAYLOAD)? {
                Some(OwnedFrame::Data(got)) => {
                    ensure!(
                        got == payload,
                        "round {round}: the echo differs from the frame"
                    );
                    return Ok(());
                }
                Some(OwnedFrame::Ping(p)) => {
                    let mut pong = Vec::new();
                    frame::encode(FrameType::Pong, &p, &mut pong);
                    self.tls.write_all(&pong).await?;
                }
                Some(OwnedFrame::Pong(_)) => {}
                Some(OwnedFrame::GoAway(_)) => bail!("round {round}: the gateway sent GOAWAY"),
                Some(OwnedFrame::Close { code, reason }) => {
                    bail!("round {round}: the gateway closed ({code} {reason})")
                }
                None => {
                    let n = self.tls.read(&mut buf).await?;
                    ensure!(n > 0, "round {round}: the connection closed");
                    self.inbound.push(&buf[..n]);
                }
            }
        }
    }
}

/// Where the probes go and what they send.
pub struct ProbeSpec {
    /// The gateway's address.
    pub target: SocketAddr,
    /// The TLS client configuration.
    pub config: Arc<ClientConfig>,
    /// TLS server name to send and verify.
    pub server_name: String,
    /// Probe connections.
    pub conns: u64,
    /// Payload bytes of each DATA frame.
    pub frame_size: usize,
    /// The longest a connect or a round trip may take before its probe fails.
    pub bound: Duration,
}

/// Opens the probes, says on `ready` when they are all up, echoes on each until `stop`
/// turns true, and reports.
pub async fn run(
    spec: ProbeSpec,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
    stop: watch::Receiver<bool>,
) -> ProbeStats {
    let ProbeSpec {
        target,
        config,
        server_name,
        conns,
        frame_size,
        bound,
    } = spec;
    let mut stats = ProbeStats {
        conns,
        ..ProbeStats::default()
    };
    let mut probes = Vec::new();
    for id in 0..conns {
        match timeout(
            bound,
            Probe::connect(target, config.clone(), &server_name, id),
        )
        .await
        {
            Ok(Ok(p)) => probes.push(p),
            Ok(Err(e)) => {
                let _ = ready.send(Err(e));
                return stats;
            }
            Err(_) => {
                let _ = ready.send(Err(anyhow::anyhow!("probe {id}: connecting timed out")));
                return stats;
            }
        }
    }
    let _ = ready.send(Ok(()));
    let tasks: Vec<_> = probes
        .into_iter()
        .map(|mut p| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut longest = Duration::ZERO;
                let mut rounds = 0u64;
                while !*stop.borrow() {
                    let t = Instant::now();
                    match timeout(bound, p.round_trip(rounds, frame_size)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            return (rounds, longest, Some(format!("probe {}: {e:#}", p.id)))
                        }
                        Err(_) => {
                            return (
                                rounds,
                                longest,
                                Some(format!("probe {}: no echo within {bound:?}", p.id)),
                            )
                        }
                    }
                    longest = longest.max(t.elapsed());
                    rounds += 1;
                }
                (rounds, longest, None)
            })
        })
        .collect();
    for t in tasks {
        let (rounds, longest, failure) = t.await.unwrap_or_else(|e| {
            (
                0,
                Duration::ZERO,
                Some(format!("a probe task panicked: {e}")),
            )
        });
        stats.round_trips += rounds;
        stats.longest_round_trip_ms = stats.longest_round_trip_ms.max(longest.as_secs_f64() * 1e3);
        if let Some(f) = failure {
            stats.failed += 1;
            if stats.failures.len() < 10 {
                stats.failures.push(f);
            }
        }
    }
    stats
}
