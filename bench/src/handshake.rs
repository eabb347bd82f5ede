//! `holdfast-bench handshake`: short connections as fast as a fixed number of closed
//! loops can make them (connect, full or resumed TLS 1.3 handshake, one DATA frame echoed,
//! close), with the server's CPU time per connection measured from /proc over the window.
//!
//! Each loop is one simulated device: with `--resume` it keeps a session store of its own
//! and each connection resumes with a ticket from the loop's previous one, as a device that
//! reconnects would. Before the window opens every loop makes one connection that is not
//! counted, so the window holds no start-up cost and, with `--resume`, every loop holds a
//! ticket. The window closes when the last connection started in it has finished; the CPU
//! time of the server over exactly that window, divided by the connections completed in
//! it, is the cost of one short connection.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Client, Failure, StageCounters, TlsInfo};
use crate::cpu;
use crate::plan;
use crate::procfs;
use crate::report::{self, HandshakeParameters, HandshakeReport, HandshakeResults, CPU_METHOD};
use crate::scenario::{self, Sources};

/// Arguments of `holdfast-bench handshake`.
#[derive(Debug, Args)]
pub struct HandshakeArgs {
    /// Server address to connect to.
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, value_name = "PEM")]
    pub ca: PathBuf,
    /// Connections in flight at once: this many closed loops.
    #[arg(long, value_name = "C", default_value_t = 32)]
    pub conns_parallel: u64,
    /// Seconds of the measured window.
    #[arg(long, value_name = "S", default_value_t = 5.0)]
    pub duration: f64,
    /// Resume: each loop reconnects with a ticket from its previous connection.
    #[arg(long)]
    pub resume: bool,
    /// Where to write the JSON report.
    #[arg(long, value_name = "FILE")]
    pub json: PathBuf,
    /// Server process ids whose CPU time is measured, comma-separated (each with its
    /// descendants: an nginx master's pid covers its workers).
    #[arg(long, value_name = "PID[,PID...]", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// CPU cores the server runs on: the divisor of the per-core figures.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub server_cores: u32,
    /// Payload bytes of the DATA frame each connection echoes.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub size: usize,
    /// Source addresses to bind, round-robin (see `idle --sources`): short connections
    /// leave TIME_WAIT sockets behind, and spreading them over many addresses keeps any one
    /// address's ephemeral ports from running out.
    #[arg(long, value_name = "RANGE")]
    pub sources: Option<String>,
    /// TLS server name to send and verify.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub server_name: String,
    /// Seconds one connection may take from connect to its echo.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    /// Name of the system measured, stored in the report.
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
}

/// Counters shared by the loops.
#[derive(Default)]
struct Stats {
    done: AtomicU64,
    resumed: AtomicU64,
    failures: StageCounters,
}

impl Stats {
    fn failed(&self, f: &Failure) {
        if self.failures.record(f) {
            eprintln!("holdfast-bench: {f}");
        }
    }
}

/// One short connection: [`client::connect_and_echo`], then close (TLS close_notify and FIN).
async fn short_connection(
    client: &Client,
    source: Option<IpAddr>,
    payload: &[u8],
    timeout: Duration,
) -> Result<TlsInfo, Failure> {
    let conn = client::connect_and_echo(client, source, payload, timeout).await?;
    let info = conn.tls_info();
    conn.close(Instant::now() + timeout).await;
    Ok(info)
}

/// Runs a handshake benchmark; the exit code is non-zero when a connection failed or none
/// completed.
pub fn run(args: HandshakeArgs) -> anyhow::Result<ExitCode> {
    ensure!(
        args.conns_parallel >= 1,
        "--conns-parallel must be at least 1"
    );
    scenario::ensure_positive("--duration", args.duration)?;
    scenario::ensure_positive("--timeout", args.timeout)?;
    ensure!(args.server_cores >= 1, "--server-cores must be at least 1");
    ensure!(
        args.size <= holdfast_wire::frame::MAX_LEN_FIELD,
        "--size is over the protocol's limit"
    );
    crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    let target = client::resolve(&args.target)?;
    let sources = Sources::resolve(args.sources.as_deref(), target)?;
    let base = client::client_config(&args.ca)?;
    scenario::check_server_pids(&args.server_pids)?;
    let mut clients = Vec::new();
    for _ in 0..args.conns_parallel {
        let config = if args.resume {
            client::resuming(&base)
        } else {
            base.clone()
        };
        clients.push(Client::new(config, target, &args.server_name)?);
    }
    let rt = scenario::runtime()?;
    let started = std::time::Instant::now();
    let mut results = rt.block_on(bench(&args, clients, sources.addrs.clone()))?;
    results.elapsed_secs = started.elapsed().as_secs_f64();

    let report = HandshakeReport::new(
        "handshake",
        args.label.clone(),
        HandshakeParameters {
            target: args.target.clone(),
            server_name: args.server_name.clone(),
            conns_parallel: args.conns_parallel,
            duration_secs: args.duration,
            resume: args.resume,
            size: args.size,
            sources: sources.spec,
            source_count: sources.addrs.len(),
            timeout_secs: args.timeout,
            server_pids: args.server_pids.clone(),
            server_cores: args.server_cores,
        },
        procfs::machine(),
        Some(CPU_METHOD),
        results,
    );
    scenario::write_json(&args.json, &report)?;
    summarize(&report);
    Ok(scenario::exit_code(report.results.ok))
}

async fn bench(
    args: &HandshakeArgs,
    clients: Vec<Client>,
    sources: Vec<IpAddr>,
) -> anyhow::Result<HandshakeResults> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let payload = Arc::new(client::payload(args.size, 0, 0));
    let stats = Arc::new(Stats::default());
    let hist = Arc::new(Mutex::new(report::latency_histogram()));
    let sources = Arc::new(sources);
    let loops = clients.len();
    // Each loop picks the next source address in turn, starting at its own offset.
    let source = move |sources: &[IpAddr], l: usize, n: u64| -> Option<IpAddr> {
        (!sources.is_empty())
            .then(|| sources[plan::source_index(sources.len(), l as u64, loops as u64, n)])
    };

    // Warm-up: one uncounted connection per loop (and, resuming, its ticket).
    let warm = Arc::new(Stats::default());
    let mut tasks = JoinSet::new();
    for (l, c) in clients.iter().enumerate() {
        let (c, payload, warm, sources) =
            (c.clone(), payload.clone(), warm.clone(), sources.clone());
        tasks.spawn(async move {
            match short_connection(&c, source(&sources, l, 0), &payload, timeout).await {
                Ok(_) => {}
                Err(f) => warm.failed(&f),
            }
        });
    }
    while tasks.join_next().await.is_some() {}

    let window = cpu::Window::start(&args.server_pids, args.server_cores)?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let info: Arc<Mutex<Option<TlsInfo>>> = Arc::default();
    for (l, c) in clients.into_iter().enumerate() {
        let (payload, stats, hist, sources, info) = (
            payload.clone(),
            stats.clone(),
            hist.clone(),
            sources.clone(),
            info.clone(),
        );
        tasks.spawn(async move {
            let mut local: Histogram<u64> = report::latency_histogram();
            let mut n = 1;
            let mut last = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match short_connection(&c, source(&sources, l, n), &payload, timeout).await {
                    Ok(i) => {
                        local.saturating_record((t.elapsed().as_micros() as u64).max(1));
                        stats.done.fetch_add(1, Ordering::Relaxed);
                        if i.resumed {
                            stats.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        last = Some(i);
                    }
                    Err(f) => stats.failed(&f),
                }
                n += 1;
            }
            hist.lock().expect("a loop panicked").add(&local).ok();
            if let Some(i) = last {
                *info.lock().expect("a loop panicked") = Some(i);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a connection loop failed")?;
    }
    let done = stats.done.load(Ordering::Relaxed);
    let measured = window.finish(done);
    let resumed = stats.resumed.load(Ordering::Relaxed);
    let failures = stats.failures.get();
    let warm_failed = warm.failures.get().total();
    let hps = report::rate(done, measured.wall_secs);
    let info = info.lock().expect("a loop panicked").clone();
    let latency = report::latency(&hist.lock().expect("a loop panicked"));
    Ok(HandshakeResults {
        ok: done > 0 && failures.total() == 0 && warm_failed == 0,
        handshakes: done,
        full: done - resumed,
        resumed,
        failures,
        window_secs: measured.wall_secs,
        handshakes_per_sec: hps,
        handshakes_per_sec_per_core: hps / args.server_cores as f64,
        server_cpu_us_per_handshake: measured.server.as_ref().and_then(|c| c.us_per_op),
        server_cpu: measured.server,
        client_cpu_utilization: measured.client_utilization,
        latency,
        cipher_suite: info.as_ref().and_then(|i| i.cipher_suite.clone()),
        kx_group: info.and_then(|i| i.kx_group),
        elapsed_secs: 0.0,
    })
}

fn summarize(report: &HandshakeReport) {
    let r = &report.results;
    let p = &report.parameters;
    println!(
        "handshake{}: {} loops for {:.1} s against {} ({} / {})",
        if p.resume { " (resumed)" } else { "" },
        p.conns_parallel,
        p.duration_secs,
        p.target,
        r.cipher_suite.as_deref().unwrap_or("?"),
        r.kx_group.as_deref().unwrap_or("?"),
    );
    println!(
        "  {} short connections in {:.2} s: {:.0}/s, {:.0}/s per server core; {} full, {} resumed",
        r.handshakes,
        r.window_secs,
        r.handshakes_per_sec,
        r.handshakes_per_sec_per_core,
        r.full,
        r.resumed
    );
    let f = &r.failures;
    println!(
        "  failures: connect {}, handshake {}, echo {} (timeouts {})",
        f.connect_failed, f.handshake_failed, f.echo_failed, f.timed_out
    );
    if let Some(c) = &r.server_cpu {
        println!(
            "  server CPU: {:.1} us per connection ({:.0}/s per core at full load), {:.0}% busy; \
             load generator {:.0}% of a core",
            c.us_per_op.unwrap_or(f64::NAN),
            c.capacity_per_core.unwrap_or(f64::NAN),
            c.utilization * 100.0,
            r.client_cpu_utilization.unwrap_or(f64::NAN) * 100.0
        );
    }
    let l = &r.latency;
    println!(
        "  connection time (us): p50 {} p99 {} max {}",
        l.p50_us, l.p99_us, l.max_us
    );
    println!(
        "  {} in {:.1} s",
        if r.ok { "OK" } else { "FAILED" },
        r.elapsed_secs
    );
}
