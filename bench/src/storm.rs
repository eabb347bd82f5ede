//! `holdfast-bench storm`: a reconnect storm. N clients connect (handshake, one echoed
//! frame) and sit idle; then all drop their connections at the same instant (the socket is
//! closed without a TLS close_notify, as when a network path flaps) and reconnect at once.
//! It reports how long it took until every client was back (handshake done and a frame
//! echoed), how many attempts failed on the way, how many reconnections resumed a TLS
//! session, the server's CPU over the storm, and the change of the machine's accept-queue
//! overflow counters.
//!
//! A client whose attempt fails tries again after a short pause until the storm's deadline,
//! as a real client would; every attempt and every wait is bounded by that deadline.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::Args;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};

use crate::client::{self, Client, StageCounters};
use crate::cpu;
use crate::plan;
use crate::procfs;
use crate::report::{self, StormParameters, StormReport, StormResults, CPU_METHOD, LISTEN_SCOPE};
use crate::scenario::{self, Sources};

/// Handshakes in flight at most while the clients first connect (not during the storm,
/// where every client goes at once).
const CONNECT_CONCURRENCY: usize = 512;
/// Pause before a client retries a failed reconnection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Descriptors the process needs besides its connections.
const FD_HEADROOM: u64 = 64;

/// Arguments of `holdfast-bench storm`.
#[derive(Debug, Args)]
pub struct StormArgs {
    /// Server address to connect to.
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, value_name = "PEM")]
    pub ca: PathBuf,
    /// Clients that connect, then all drop and reconnect at once.
    #[arg(long, value_name = "N")]
    pub conns: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "FILE")]
    pub json: PathBuf,
    /// Reconnect with the session ticket each client got on its first connection.
    #[arg(long)]
    pub resume: bool,
    /// Server process ids whose CPU time is measured over the storm, comma-separated
    /// (each with its descendants).
    #[arg(long, value_name = "PID[,PID...]", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// CPU cores the server runs on.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub server_cores: u32,
    /// Connections opened per second before the storm.
    #[arg(long, value_name = "CONN_PER_SEC", default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Seconds to wait between the last client connecting and the storm.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub settle: f64,
    /// Payload bytes of the DATA frame each connection echoes.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub size: usize,
    /// Source addresses to bind, round-robin (see `idle --sources`).
    #[arg(long, value_name = "RANGE")]
    pub sources: Option<String>,
    /// TLS server name to send and verify.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub server_name: String,
    /// Seconds every client has to be back after the drop (also the bound on each first
    /// connection).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,
    /// Name of the system measured, stored in the report.
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
}

/// The phases every client follows, broadcast by the main task.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Hold the connection.
    Hold,
    /// Drop it and reconnect; the storm started at this instant.
    Storm(Instant),
    /// Close and finish.
    Close,
}

/// What a client says to the main task.
enum Event {
    /// First connection done (true) or failed (false).
    Connected(bool),
    /// Back after the drop, after this long, resumed or not.
    Back(Duration, bool),
    /// Not back by the deadline.
    GaveUp,
}

/// What every client task shares.
struct Shared {
    payload: Vec<u8>,
    timeout: Duration,
    phase: watch::Receiver<Phase>,
    events: mpsc::UnboundedSender<Event>,
    initial: StageCounters,
    storm: StageCounters,
    slots: Semaphore,
}

/// Runs a storm; the exit code is non-zero when a client failed to connect or to come back.
pub fn run(args: StormArgs) -> anyhow::Result<ExitCode> {
    ensure!(args.conns >= 1, "--conns must be at least 1");
    scenario::ensure_positive("--timeout", args.timeout)?;
    scenario::ensure_positive("--connect-rate", args.connect_rate)?;
    ensure!(
        args.settle >= 0.0 && args.settle.is_finite(),
        "--settle must be 0 or more"
    );
    ensure!(args.server_cores >= 1, "--server-cores must be at least 1");
    let (_, hard) = crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    // During the storm a client's old socket may still be closing while its new one opens.
    ensure!(
        args.conns * 2 + FD_HEADROOM <= hard,
        "{} clients need up to {} descriptors, over the open-file limit of {hard}",
        args.conns,
        args.conns * 2 + FD_HEADROOM
    );
    let target = client::resolve(&args.target)?;
    let sources = Sources::resolve(args.sources.as_deref(), target)?;
    let base = client::client_config(&args.ca)?;
    scenario::check_server_pids(&args.server_pids)?;
    let shared_client = Client::new(base.clone(), target, &args.server_name)?;
    let mut clients = Vec::with_capacity(args.conns as usize);
    for _ in 0..args.conns {
        clients.push(if args.resume {
            Client::new(client::resuming(&base), target, &args.server_name)?
        } else {
            shared_client.clone()
        });
    }
    let rt = scenario::runtime()?;
    let started = std::time::Instant::now();
    let mut results = rt.block_on(bench(&args, clients, sources.addrs.clone()))?;
    results.elapsed_secs = started.elapsed().as_secs_f64();

    let report = StormReport::new(
        "storm",
        args.label.clone(),
        StormParameters {
            target: args.target.clone(),
            server_name: args.server_name.clone(),
            conns: args.conns,
            resume: args.resume,
            size: args.size,
            connect_rate: args.connect_rate,
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
    args: &StormArgs,
    clients: Vec<Client>,
    sources: Vec<IpAddr>,
) -> anyhow::Result<StormResults> {
    let n = clients.len() as u64;
    let timeout = Duration::from_secs_f64(args.timeout);
    let (phase_tx, phase) = watch::channel(Phase::Hold);
    let (events, mut rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        payload: client::payload(args.size, 0, 0),
        timeout,
        phase,
        events,
        initial: StageCounters::default(),
        storm: StageCounters::default(),
        slots: Semaphore::new(CONNECT_CONCURRENCY),
    });
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        let source = (!sources.is_empty())
            .then(|| sources[plan::source_index(sources.len(), 0, 1, i as u64)]);
        let due = start + plan::due(i as u64, args.connect_rate);
        tasks.spawn(client_task(c, source, due, shared.clone()));
    }

    // Every client connects (or fails) within its slot of the timetable plus its timeout.
    let open_deadline =
        start + plan::due(n, args.connect_rate) * 2 + timeout + Duration::from_secs(10);
    let mut results = StormResults {
        listen_scope: LISTEN_SCOPE,
        ..StormResults::default()
    };
    let mut concluded = 0;
    while concluded < n {
        match timeout_at(open_deadline, rx.recv()).await {
            Ok(Some(Event::Connected(ok))) => {
                concluded += 1;
                results.connected += u64::from(ok);
            }
            Ok(Some(_)) | Ok(None) => anyhow::bail!("a client task ended before the storm"),
            Err(_) => anyhow::bail!("{} clients still connecting at the deadline", n - concluded),
        }
    }
    results.initial_failures = shared.initial.get();
    println!(
        "storm: {} of {} clients connected in {:.1} s; dropping them all",
        results.connected,
        n,
        start.elapsed().as_secs_f64()
    );
    sleep(Duration::from_secs_f64(args.settle)).await;

    let listen_before = procfs::listen_counters()?;
    let window = cpu::Window::start(&args.server_pids, args.server_cores)?;
    let t0 = Instant::now();
    phase_tx.send_replace(Phase::Storm(t0));
    let mut hist = report::latency_histogram();
    let mut last = Duration::ZERO;
    let mut gave_up = 0;
    let storm_deadline = t0 + timeout + Duration::from_secs(5);
    while results.back + gave_up < results.connected {
        match timeout_at(storm_deadline, rx.recv()).await {
            Ok(Some(Event::Back(d, resumed))) => {
                results.back += 1;
                if resumed {
                    results.resumed += 1;
                }
                last = last.max(d);
                hist.saturating_record((d.as_micros() as u64).max(1));
            }
            Ok(Some(Event::GaveUp)) => gave_up += 1,
            Ok(Some(Event::Connected(_))) | Ok(None) => {
                anyhow::bail!("a client task ended during the storm")
            }
            Err(_) => break,
        }
    }
    let measured = window.finish(results.back);
    let listen_after = procfs::listen_counters()?;
    results.full = results.back - results.resumed;
    results.all_back = results.back == results.connected;
    results.recovery_secs = results.all_back.then_some(last.as_secs_f64());
    results.reconnect_failures = shared.storm.get();
    results.reconnect_latency = report::latency(&hist);
    results.listen_overflows = listen_after
        .overflows
        .saturating_sub(listen_before.overflows);
    results.listen_drops = listen_after.drops.saturating_sub(listen_before.drops);
    results.server_cpu_us_per_reconnect = measured.server.as_ref().and_then(|c| c.us_per_op);
    results.server_cpu = measured.server;
    results.ok = results.connected == n
        && results.all_back
        && results.reconnect_failures.total() == 0
        && results.initial_failures.total() == 0;

    phase_tx.send_replace(Phase::Close);
    let close_deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(_)) = timeout_at(close_deadline, tasks.join_next()).await {}
    tasks.abort_all();
    Ok(results)
}

/// One client: connect at `due`, hold, and when the storm comes, drop and reconnect until
/// back or out of time; then hold until told to close.
async fn client_task(client: Client, source: Option<IpAddr>, due: Instant, s: Arc<Shared>) {
    let mut phase = s.phase.clone();
    sleep_until(due).await;
    let first = {
        let _slot = s.slots.acquire().await;
        client::connect_and_echo(&client, source, &s.payload, s.timeout).await
    };
    let conn = match first {
        Ok(c) => c,
        Err(f) => {
            if s.initial.record(&f) {
                eprintln!("holdfast-bench: first connection: {f}");
            }
            let _ = s.events.send(Event::Connected(false));
            return;
        }
    };
    let _ = s.events.send(Event::Connected(true));
    let t0 = loop {
        if let Phase::Storm(t0) = *phase.borrow_and_update() {
            break t0;
        }
        if phase.changed().await.is_err() {
            return;
        }
    };
    // The drop: the socket closes with a FIN and no close_notify, as when a path flaps.
    drop(conn);
    let deadline = t0 + s.timeout;
    let back = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        match client::connect_and_echo(&client, source, &s.payload, left).await {
            Ok(c) => break Some(c),
            Err(f) => {
                if s.storm.record(&f) {
                    eprintln!("holdfast-bench: reconnection: {f}");
                }
                sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
    };
    let Some(conn) = back else {
        let _ = s.events.send(Event::GaveUp);
        return;
    };
    let _ = s
        .events
        .send(Event::Back(t0.elapsed(), conn.tls_info().resumed));
    while *phase.borrow_and_update() != Phase::Close {
        if phase.changed().await.is_err() {
            break;
        }
    }
    conn.close(Instant::now() + Duration::from_secs(2)).await;
}

fn summarize(report: &StormReport) {
    let r = &report.results;
    let p = &report.parameters;
    println!(
        "storm{}: {} clients to {}",
        if p.resume { " (resuming)" } else { "" },
        p.conns,
        p.target
    );
    match r.recovery_secs {
        Some(s) => println!("  all {} back in {:.3} s", r.back, s),
        None => println!("  only {} of {} back by the deadline", r.back, r.connected),
    }
    let l = &r.reconnect_latency;
    println!(
        "  time to be back (ms): p50 {:.1} p99 {:.1} max {:.1}; {} resumed, {} full",
        l.p50_us as f64 / 1e3,
        l.p99_us as f64 / 1e3,
        l.max_us as f64 / 1e3,
        r.resumed,
        r.full
    );
    let f = &r.reconnect_failures;
    println!(
        "  failed attempts: connect {}, handshake {}, echo {} (timeouts {}); accept queue \
         overflows {}, listen drops {} (machine-wide)",
        f.connect_failed,
        f.handshake_failed,
        f.echo_failed,
        f.timed_out,
        r.listen_overflows,
        r.listen_drops
    );
    if let Some(c) = &r.server_cpu {
        println!(
            "  server CPU: {:.1} us per client back, {:.0}% busy",
            c.us_per_op.unwrap_or(f64::NAN),
            c.utilization * 100.0
        );
    }
    println!(
        "  {} in {:.1} s",
        if r.ok { "OK" } else { "FAILED" },
        r.elapsed_secs
    );
}
