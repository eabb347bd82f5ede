//! `holdfast-bench ceiling`: what rustls alone costs, in memory and on one thread, so the
//! gateway's figures have a floor to be compared with: TLS 1.3 handshakes (the provider
//! and key exchange named by `--provider` and `--kx`, the ECDSA P-256 certificate
//! `gen-cert` makes), full and resumed, and small records decrypted and encrypted again.
//! Runs with each provider side by side are how the gateway's provider was chosen.
//!
//! A client and a server connection pass their bytes through Vecs; nothing touches a
//! socket. Only the server's calls are timed for the server figures, with the thread's
//! CPU clock (CLOCK_THREAD_CPUTIME_ID), which does not run while the thread is preempted,
//! so the figures hold on a busy machine; the cost of reading that clock is measured first
//! and taken off every timed call.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Args, ValueEnum};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

use crate::certs;
use crate::client::SuiteOrder;
use crate::procfs;
use crate::report::{
    self, CeilingHandshakes, CeilingParameters, CeilingRecords, CeilingReport, CeilingResults,
    CEILING_METHOD,
};
use crate::scenario;
use crate::sys::thread_cpu_time;

/// Arguments of `holdfast-bench ceiling`.
#[derive(Debug, Args)]
pub struct CeilingArgs {
    /// Seconds spent on each part: full handshakes, resumed handshakes, records.
    #[arg(long, value_name = "S", default_value_t = 3.0)]
    pub seconds: f64,
    /// Plaintext bytes per record.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub record_size: usize,
    /// Records per batch (the client encrypts a batch, the server handles it at once).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub batch: usize,
    /// Where to write the JSON report.
    #[arg(long, value_name = "FILE")]
    pub json: PathBuf,
    /// Name shown for it in `report` tables.
    #[arg(long, value_name = "NAME", default_value = "rustls alone (in memory)")]
    pub label: String,
    /// Crypto provider of both sides (the gateway's build default when not given).
    #[arg(long, value_enum)]
    pub provider: Option<Provider>,
    /// The key exchange the client offers (and so the server uses).
    #[arg(long, value_enum, default_value_t = Kx::X25519)]
    pub kx: Kx,
    /// The order in which the client offers its TLS 1.3 suites (the server follows it):
    /// `devices` puts AES-128-GCM first as browsers and phones do (the load generator's
    /// order); `rustls` puts AES-256-GCM (with SHA-384) first as rustls' own client does.
    #[arg(long, value_enum, default_value_t = SuiteOrder::Devices)]
    pub suites: SuiteOrder,
}

/// A rustls crypto provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Provider {
    #[value(name = "aws-lc-rs")]
    AwsLcRs,
    Ring,
}

impl Provider {
    /// The provider the gateway is built with.
    pub fn shipped() -> Provider {
        if holdfast::provider::NAME == "ring" {
            Provider::Ring
        } else {
            Provider::AwsLcRs
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Provider::AwsLcRs => "aws-lc-rs",
            Provider::Ring => "ring",
        }
    }

    fn rustls(self) -> rustls::crypto::CryptoProvider {
        match self {
            Provider::AwsLcRs => rustls::crypto::aws_lc_rs::default_provider(),
            Provider::Ring => rustls::crypto::ring::default_provider(),
        }
    }
}

/// A key exchange group a client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kx {
    #[value(name = "x25519")]
    X25519,
    /// The hybrid post-quantum group current browsers offer first (aws-lc-rs only).
    #[value(name = "x25519mlkem768")]
    X25519Mlkem768,
}

impl Kx {
    fn group(
        self,
        provider: Provider,
    ) -> anyhow::Result<&'static dyn rustls::crypto::SupportedKxGroup> {
        Ok(match (self, provider) {
            (Kx::X25519, Provider::AwsLcRs) => rustls::crypto::aws_lc_rs::kx_group::X25519,
            (Kx::X25519, Provider::Ring) => rustls::crypto::ring::kx_group::X25519,
            (Kx::X25519Mlkem768, Provider::AwsLcRs) => {
                rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768
            }
            (Kx::X25519Mlkem768, Provider::Ring) => {
                bail!("the ring provider has no X25519MLKEM768; use --provider aws-lc-rs")
            }
        })
    }
}

/// The server's share of the work: CPU time of timed calls, minus the clock's own cost.
struct ServerClock {
    spent: Duration,
    calls: u64,
}

impl ServerClock {
    fn new() -> ServerClock {
        ServerClock {
            spent: Duration::ZERO,
            calls: 0,
        }
    }

    /// Runs `f` as server work.
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = thread_cpu_time();
        let out = f();
        self.spent += thread_cpu_time().saturating_sub(t);
        self.calls += 1;
        out
    }

    /// Seconds of server work, with `overhead_ns` taken off per timed call.
    fn secs(&self, overhead_ns: f64) -> f64 {
        (self.spent.as_secs_f64() - self.calls as f64 * overhead_ns * 1e-9).max(0.0)
    }
}

/// What one reading of the thread CPU clock costs, in nanoseconds: the part of a timed
/// interval that is the clock and not the work.
fn clock_overhead_ns() -> f64 {
    const N: u32 = 20_000;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = thread_cpu_time();
        for _ in 0..N {
            std::hint::black_box(thread_cpu_time());
        }
        let per = thread_cpu_time().saturating_sub(t).as_secs_f64() * 1e9 / f64::from(N + 1);
        best = best.min(per);
    }
    best
}

/// Feeds `bytes` to a connection and processes them.
fn feed<D>(conn: &mut ConnectionCommon<D>, mut bytes: &[u8]) -> anyhow::Result<()> {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).context("read_tls")?;
        conn.process_new_packets().context("process_new_packets")?;
    }
    Ok(())
}

/// Everything a connection wants to send.
fn drain<D>(conn: &mut ConnectionCommon<D>, out: &mut Vec<u8>) -> anyhow::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out).context("write_tls")?;
    }
    Ok(())
}

/// Runs a handshake between `client` and `server` to its end, session tickets included,
/// timing the server's calls on `clock`.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
    clock: &mut ServerClock,
) -> anyhow::Result<()> {
    let (mut c2s, mut s2c) = (Vec::with_capacity(2048), Vec::with_capacity(4096));
    for _ in 0..16 {
        c2s.clear();
        s2c.clear();
        drain(client, &mut c2s)?;
        clock.time(|| -> anyhow::Result<()> {
            feed(server, &c2s)?;
            drain(server, &mut s2c)
        })?;
        feed(client, &s2c)?;
        if c2s.is_empty() && s2c.is_empty() && !client.is_handshaking() && !server.is_handshaking()
        {
            return Ok(());
        }
    }
    bail!("the handshake did not finish in 16 flights")
}

/// A server and a client configured as holdfast and its load generator configure them, on
/// a throw-away certificate. Also the in-memory peer of the client session's tests.
pub(crate) struct Setup {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
    pub(crate) name: ServerName<'static>,
}

#[cfg(test)]
pub(crate) fn setup() -> anyhow::Result<Setup> {
    setup_with(Provider::shipped(), Kx::X25519, SuiteOrder::Devices)
}

/// The same with a chosen provider (both sides) and the group the client offers; the
/// server keeps every group of its provider, as the gateway does.
pub(crate) fn setup_with(provider: Provider, kx: Kx, order: SuiteOrder) -> anyhow::Result<Setup> {
    let g = certs::generate(&["localhost".to_string()])?;
    let mut client_provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![kx.group(provider)?],
        ..provider.rustls()
    };
    order.apply(&mut client_provider);
    let client_provider = Arc::new(client_provider);
    let provider = Arc::new(provider.rustls());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(g.cert.as_bytes())
        .collect::<Result<_, _>>()
        .context("the generated certificate")?;
    let key = PrivateKeyDer::from_pem_slice(g.key.as_bytes()).context("the generated key")?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // As holdfast configures its server with its default config: ALPN holdfast/1 and its
    // session settings (`tls::session_settings`: one stateless ticket per handshake from
    // holdfast's own ticketer, on the gateway's provider whatever `provider` is; the
    // traffic secrets kept for hibernation, taken after each handshake as the gateway
    // takes them).
    let tls = holdfast::config::TlsConfig::default();
    server.alpn_protocols = vec![holdfast_wire::frame::ALPN.to_vec()];
    let ticketer = holdfast::ticket::FleetTicketer::random(tls.ticket_rotation_secs)?;
    holdfast::tls::session_settings(&mut server, &tls, tls.session_tickets.then_some(ticketer));
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(g.ca.as_bytes()) {
        roots.add(ca.context("the generated CA")?)?;
    }
    let mut client = ClientConfig::builder_with_provider(client_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![holdfast_wire::frame::ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    Ok(Setup {
        server: Arc::new(server),
        client: Arc::new(client),
        name: ServerName::try_from("localhost")?,
    })
}

/// Handshakes for `seconds` with `client` (resumption on or off).
fn handshakes(
    s: &Setup,
    client_config: &Arc<ClientConfig>,
    seconds: f64,
    overhead_ns: f64,
) -> anyhow::Result<CeilingHandshakes> {
    let mut clock = ServerClock::new();
    let (mut n, mut resumed) = (0u64, 0u64);
    let start = Instant::now();
    let until = Duration::from_secs_f64(seconds);
    while start.elapsed() < until {
        let mut client = ClientConnection::new(client_config.clone(), s.name.clone())?;
        let mut server = clock.time(|| ServerConnection::new(s.server.clone()))?;
        handshake(&mut client, &mut server, &mut clock)?;
        // The gateway takes the secrets the key log kept, right after the handshake.
        clock.time(|| drop(holdfast::record::take_traffic_secrets()));
        ensure!(
            server.alpn_protocol() == Some(holdfast_wire::frame::ALPN),
            "ALPN was not negotiated"
        );
        if server.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            resumed += 1;
        }
        clock.time(|| drop(server));
        n += 1;
    }
    let wall = start.elapsed().as_secs_f64();
    let secs = clock.secs(overhead_ns);
    let us = (n > 0).then(|| secs * 1e6 / n as f64);
    Ok(CeilingHandshakes {
        handshakes: n,
        resumed,
        server_cpu_secs: secs,
        server_us_per_handshake: us,
        server_handshakes_per_sec: us.filter(|&u| u > 0.0).map(|u| 1e6 / u),
        both_sides_handshakes_per_sec: report::rate(n, wall),
        wall_secs: wall,
    })
}

/// Small records through an established pair for `seconds`.
fn records(
    s: &Setup,
    size: usize,
    batch: usize,
    seconds: f64,
    overhead_ns: f64,
) -> anyhow::Result<(CeilingRecords, Option<String>, Option<String>)> {
    let mut client = ClientConnection::new(s.client.clone(), s.name.clone())?;
    let mut server = ServerConnection::new(s.server.clone())?;
    handshake(&mut client, &mut server, &mut ServerClock::new())?;
    let suite = server
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()));
    let kx = server
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()));
    let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut plain = vec![0u8; size.max(1)];
    let mut back = vec![0u8; size * batch + 1];
    let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
    let mut clock = ServerClock::new();
    let mut n = 0u64;
    let start = Instant::now();
    let until = Duration::from_secs_f64(seconds);
    while start.elapsed() < until {
        c2s.clear();
        s2c.clear();
        for _ in 0..batch {
            client.writer().write_all(&payload)?;
        }
        drain(&mut client, &mut c2s)?;
        clock.time(|| -> anyhow::Result<()> {
            feed(&mut server, &c2s)?;
            for _ in 0..batch {
                server.reader().read_exact(&mut plain[..size])?;
                server.writer().write_all(&plain[..size])?;
            }
            drain(&mut server, &mut s2c)
        })?;
        feed(&mut client, &s2c)?;
        let mut got = 0;
        while got < size * batch {
            match client.reader().read(&mut back[got..])? {
                0 => break,
                k => got += k,
            }
        }
        ensure!(
            got == size * batch && back[..size] == payload[..],
            "the records did not come back intact"
        );
        n += batch as u64;
    }
    let wall = start.elapsed().as_secs_f64();
    let secs = clock.secs(overhead_ns);
    let us = (n > 0).then(|| secs * 1e6 / n as f64);
    Ok((
        CeilingRecords {
            record_size: size,
            records: n,
            server_cpu_secs: secs,
            server_us_per_record_pair: us,
            server_record_pairs_per_sec: us.filter(|&u| u > 0.0).map(|u| 1e6 / u),
            both_sides_records_per_sec: report::rate(n, wall),
            wall_secs: wall,
        },
        suite,
        kx,
    ))
}

/// Runs the ceiling benchmark.
pub fn run(args: CeilingArgs) -> anyhow::Result<ExitCode> {
    scenario::ensure_positive("--seconds", args.seconds)?;
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(
        (1..=16 * 1024).contains(&args.record_size),
        "--record-size must be 1 to 16384"
    );
    ensure!(
        args.record_size * args.batch <= 16 * 1024,
        "--record-size x --batch must stay within 16 KiB (rustls' plaintext buffer)"
    );
    let started = Instant::now();
    let provider = args.provider.unwrap_or_else(Provider::shipped);
    let s = setup_with(provider, args.kx, args.suites)?;
    let overhead = clock_overhead_ns();
    let full = handshakes(&s, &s.client, args.seconds, overhead)?;
    // One store for the resumed loop: each handshake takes a ticket and leaves one.
    let resuming = crate::client::resuming(&s.client);
    let mut seed = ClientConnection::new(resuming.clone(), s.name.clone())?;
    let mut seed_server = ServerConnection::new(s.server.clone())?;
    handshake(&mut seed, &mut seed_server, &mut ServerClock::new())?;
    let resumed = handshakes(&s, &resuming, args.seconds, overhead)?;
    let (records, cipher_suite, kx_group) =
        records(&s, args.record_size, args.batch, args.seconds, overhead)?;
    let report = CeilingReport::new(
        "ceiling",
        Some(args.label.clone()),
        CeilingParameters {
            seconds: args.seconds,
            record_size: args.record_size,
            batch: args.batch,
            provider: provider.name(),
            certificate: "ECDSA P-256 (gen-cert)",
        },
        procfs::machine(),
        Some(CEILING_METHOD),
        CeilingResults {
            full,
            resumed,
            records,
            clock_overhead_ns: overhead,
            cipher_suite,
            kx_group,
            elapsed_secs: started.elapsed().as_secs_f64(),
        },
    );
    scenario::write_json(&args.json, &report)?;
    summarize(&report);
    Ok(ExitCode::SUCCESS)
}

fn summarize(report: &CeilingReport) {
    let r = &report.results;
    let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1}"));
    let f2 = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
    let f0 = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0}"));
    println!(
        "ceiling: rustls alone in memory, one thread ({} / {}, ECDSA P-256, {})",
        r.cipher_suite.as_deref().unwrap_or("?"),
        r.kx_group.as_deref().unwrap_or("?"),
        report.parameters.provider
    );
    for (name, h) in [("full", &r.full), ("resumed", &r.resumed)] {
        println!(
            "  {name} handshakes: server {} us each ({} per second of one core); {:.0}/s \
             with both sides on one core; {} of {} resumed",
            f(h.server_us_per_handshake),
            f0(h.server_handshakes_per_sec),
            h.both_sides_handshakes_per_sec,
            h.resumed,
            h.handshakes
        );
    }
    let rec = &r.records;
    println!(
        "  {} B records: server {} us per decrypt+encrypt ({} per second of one core); {:.0}/s \
         relayed with both sides on one core",
        rec.record_size,
        f2(rec.server_us_per_record_pair),
        f0(rec.server_record_pairs_per_sec),
        rec.both_sides_records_per_sec
    );
    println!(
        "  clock read costs {:.0} ns (taken off each timed call); {:.1} s in all",
        r.clock_overhead_ns, r.elapsed_secs
    );
}
