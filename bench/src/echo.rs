//! `holdfast-bench echo`: relays small DATA frames through a gateway and an echo worker at
//! a fixed open-loop rate and reports throughput and latency percentiles.
//!
//! Sends follow a timetable fixed before the run starts: frame `i` of connection `c` is
//! due at `(i * conns + c) / rate` seconds, whatever happened to earlier frames. Latency
//! is measured from that due time, not from when the write happened, so a stall shows up
//! in the percentiles of every frame it delayed instead of being hidden by a client that
//! politely waited (coordinated omission). The service time from the actual write is
//! reported beside it; the gap between the two is the client falling behind.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::Args;
use hdrhistogram::Histogram;
use holdfast_wire::frame::{self, FrameType, OwnedFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};

use crate::client::{self, Client, Conn};
use crate::cpu;
use crate::plan;
use crate::procfs;
use crate::report::{self, EchoParameters, EchoReport, EchoResults};
use crate::scenario;

/// Handshakes in flight at most while connecting.
const CONNECT_CONCURRENCY: usize = 256;
/// Time between the last handshake and the first scheduled send.
const LEAD_IN: Duration = Duration::from_millis(100);

/// Arguments of `holdfast-bench echo`.
#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Gateway address to connect to.
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: String,
    /// CA certificate (PEM) that signed the gateway's certificate.
    #[arg(long, value_name = "PEM")]
    pub ca: PathBuf,
    /// Connections the frames are spread over.
    #[arg(long, value_name = "C")]
    pub conns: u64,
    /// Payload bytes per DATA frame.
    #[arg(long, value_name = "S")]
    pub size: usize,
    /// Frames per second, all connections together, on a fixed timetable.
    #[arg(long, value_name = "R")]
    pub rate: f64,
    /// Seconds of scheduled sending.
    #[arg(long, value_name = "SECS")]
    pub duration: f64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// TLS server name to send and verify.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub server_name: String,
    /// Seconds each connection may take to connect and handshake; also how long echoes
    /// may still arrive after the last scheduled send.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    /// Server process ids whose CPU time is measured over the sending window, comma-
    /// separated (each with its descendants), for CPU per frame.
    #[arg(long, value_name = "PID[,PID...]", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// CPU cores the server runs on: the divisor of the per-core figures.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub server_cores: u32,
    /// Name of the system measured, stored in the report.
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
}

/// Both latency histograms of a run, shared by the connections' readers.
struct Histograms {
    scheduled: Histogram<u64>,
    service: Histogram<u64>,
}

impl Histograms {
    fn record(&mut self, due: Instant, sent: Instant, now: Instant) {
        // Saturating: a sample beyond the histogram's hour is still a sample, at its top.
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        self.scheduled.saturating_record(us(now - due));
        self.service.saturating_record(us(now - sent));
    }
}

/// What one connection did during the run.
#[derive(Default)]
struct ConnOutcome {
    sent: u64,
    received: u64,
    corrupt: u64,
    error: Option<String>,
}

/// Runs an echo benchmark; the exit code is non-zero when a connection failed or a frame
/// did not come back intact.
pub fn run(args: EchoArgs) -> anyhow::Result<ExitCode> {
    ensure!(args.conns >= 1, "--conns must be at least 1");
    scenario::ensure_positive("--rate", args.rate)?;
    scenario::ensure_positive("--duration", args.duration)?;
    scenario::ensure_positive("--timeout", args.timeout)?;
    ensure!(args.server_cores >= 1, "--server-cores must be at least 1");
    ensure!(
        args.size <= frame::MAX_LEN_FIELD,
        "--size is over the protocol's limit of {} bytes",
        frame::MAX_LEN_FIELD
    );
    crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    let config = client::client_config(&args.ca)?;
    let client = Client::new(config, client::resolve(&args.target)?, &args.server_name)?;
    let rt = scenario::runtime()?;
    let started = std::time::Instant::now();
    let mut results = rt.block_on(bench(&args, client))?;
    results.elapsed_secs = started.elapsed().as_secs_f64();

    let report = EchoReport::new(
        "echo",
        args.label.clone(),
        EchoParameters {
            target: args.target.clone(),
            server_name: args.server_name.clone(),
            conns: args.conns,
            size: args.size,
            rate: args.rate,
            duration_secs: args.duration,
            timeout_secs: args.timeout,
            server_pids: args.server_pids.clone(),
            server_cores: args.server_cores,
        },
        procfs::machine(),
        None,
        results,
    );
    if let Some(path) = &args.json {
        scenario::write_json(path, &report)?;
    }
    summarize(&report);
    Ok(scenario::exit_code(report.results.ok))
}

async fn bench(args: &EchoArgs, client: Client) -> anyhow::Result<EchoResults> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let conns = connect_all(&client, args.conns, timeout).await;
    let mut results = EchoResults {
        conns_ok: conns.iter().filter(|c| c.is_ok()).count() as u64,
        ..EchoResults::default()
    };
    results.conns_failed = args.conns - results.conns_ok;
    for e in conns.iter().filter_map(|c| c.as_ref().err()).take(5) {
        eprintln!("holdfast-bench: {e}");
    }

    let hist = Arc::new(Mutex::new(Histograms {
        scheduled: report::latency_histogram(),
        service: report::latency_histogram(),
    }));
    let start = std::time::Instant::now() + LEAD_IN;
    let end = start + Duration::from_secs_f64(args.duration);
    let drain = Instant::from_std(end) + timeout;
    // Every connection keeps the slot it was given, failed ones included, so the
    // timetable is the same whether or not all connected: frames of a missing connection
    // are simply never scheduled.
    let mut dues = Vec::with_capacity(conns.len());
    let mut tasks = JoinSet::new();
    for (c, conn) in conns.into_iter().enumerate() {
        let Ok(conn) = conn else {
            dues.push(None);
            continue;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        dues.push(Some(tx));
        let slot = Slot {
            index: c as u64,
            size: args.size,
            drain,
        };
        tasks.spawn(relay(conn, slot, rx, hist.clone()));
    }
    let rate = args.rate;
    // The CPU window spans the timetable and the drain, nothing of the connecting.
    let window = cpu::Window::start(&args.server_pids, args.server_cores)?;
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || pace(dues, start, end, rate))
        .expect("starting the pacing thread");
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let o = joined.unwrap_or_else(|e| ConnOutcome {
            error: Some(format!("connection task failed: {e}")),
            ..ConnOutcome::default()
        });
        results.frames_sent += o.sent;
        results.frames_received += o.received;
        results.frames_corrupt += o.corrupt;
        if let Some(e) = o.error {
            results.conn_errors += 1;
            errors += 1;
            if errors <= 5 {
                eprintln!("holdfast-bench: {e}");
            }
        }
    }
    results.frames_scheduled = pacer.join().expect("the pacing thread panicked");
    let measured = window.finish(results.frames_received);
    results.server_cpu_us_per_frame = measured.server.as_ref().and_then(|c| c.us_per_op);
    results.server_cpu = measured.server;
    results.client_cpu_utilization = measured.client_utilization;
    results.frames_lost = results.frames_sent - results.frames_received.min(results.frames_sent);
    results.frames_per_sec = results.frames_received as f64 / args.duration;
    results.frames_per_sec_per_core = results.frames_per_sec / args.server_cores as f64;
    let h = hist.lock().expect("a recorder panicked");
    results.latency = report::latency(&h.scheduled);
    results.service_latency = report::latency(&h.service);
    results.ok = results.conns_failed == 0
        && results.conn_errors == 0
        && results.frames_lost == 0
        && results.frames_corrupt == 0
        && results.frames_sent == results.frames_scheduled;
    Ok(results)
}

/// Connects `n` connections, a bounded number at a time; each gets `timeout`.
async fn connect_all(client: &Client, n: u64, timeout: Duration) -> Vec<Result<Conn, String>> {
    let slots = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        let slots = slots.clone();
        tasks.spawn(async move {
            let _permit = slots.acquire_owned().await;
            let conn = client.connect(None, Instant::now() + timeout).await;
            (i, conn.map_err(|f| format!("connection {i}: {f}")))
        });
    }
    let mut out: Vec<Result<Conn, String>> = (0..n).map(|_| Err(String::new())).collect();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((i, conn)) => out[i as usize] = conn,
            Err(e) => eprintln!("holdfast-bench: connect task failed: {e}"),
        }
    }
    for (i, c) in out.iter_mut().enumerate() {
        if matches!(c, Err(e) if e.is_empty()) {
            *c = Err(format!("connection {i}: connect task failed"));
        }
    }
    out
}

/// Hands out the timetable: the `n`-th frame is due at `start + n / rate` and goes to
/// connection `n % conns`, until `end`. Runs on a thread of its own with tight timer
/// slack, because tokio's timer wheel rounds sleeps up to the next millisecond, and a
/// latency measured from the due time would carry that millisecond. When this thread
/// falls behind it does not sleep and hands out every overdue frame at once, so the
/// writers send late and the latency shows it.
fn pace(
    dues: Vec<Option<mpsc::UnboundedSender<Instant>>>,
    start: std::time::Instant,
    end: std::time::Instant,
    rate: f64,
) -> u64 {
    crate::sys::set_timer_slack_ns(1);
    let conns = dues.len() as u64;
    let mut scheduled = 0;
    for n in 0.. {
        let due = start + plan::due(n, rate);
        if due >= end {
            break;
        }
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if let Some(tx) = &dues[plan::echo_conn(n, conns) as usize] {
            scheduled += 1;
            // A closed channel is a connection that already failed; its error is counted
            // by its own task, and the frame stays scheduled but unsent.
            let _ = tx.send(Instant::from_std(due));
        }
    }
    scheduled
}

/// What a connection's relay needs besides its connection.
#[derive(Clone, Copy)]
struct Slot {
    index: u64,
    size: usize,
    drain: Instant,
}

/// Sends each frame as the pacer hands it out and reads echoes concurrently on one
/// connection. The writer tells the reader each frame's due and write times in order;
/// echoes come back in order on a connection, so the reader pairs them first in, first
/// out.
async fn relay(
    conn: Conn,
    slot: Slot,
    mut dues: mpsc::UnboundedReceiver<Instant>,
    hist: Arc<Mutex<Histograms>>,
) -> ConnOutcome {
    let body = client::payload(slot.size, slot.index, 0);
    let (stream, inbox) = conn.into_parts();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (times_tx, mut times_rx) = mpsc::unbounded_channel::<(Instant, Instant)>();
    let (pong_tx, mut pong_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (total_tx, mut total_rx) = oneshot::channel::<u64>();

    let writer = async {
        let mut out = Vec::new();
        let mut sent = 0u64;
        let mut pongs_open = true;
        let result: std::io::Result<()> = async {
            loop {
                tokio::select! {
                    biased;
                    pong = pong_rx.recv(), if pongs_open => match pong {
                        Some(p) => {
                            out.clear();
                            frame::encode(FrameType::Pong, &p, &mut out);
                            wr.write_all(&out).await?;
                            wr.flush().await?;
                        }
                        None => pongs_open = false,
                    },
                    due = dues.recv() => {
                        let Some(due) = due else { break };
                        out.clear();
                        frame::encode(FrameType::Data, &body, &mut out);
                        if times_tx.send((due, Instant::now())).is_err() {
                            break;
                        }
                        wr.write_all(&out).await?;
                        wr.flush().await?;
                        sent += 1;
                    }
                }
            }
            Ok(())
        }
        .await;
        let _ = total_tx.send(sent);
        (sent, result)
    };

    let reader = async {
        let mut fb = inbox;
        let mut buf = vec![0u8; 16 * 1024];
        let (mut received, mut corrupt) = (0u64, 0u64);
        let mut total: Option<u64> = None;
        let work = async {
            loop {
                while let Some(f) = fb
                    .next(frame::MAX_LEN_FIELD)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
                {
                    match f {
                        OwnedFrame::Data(p) => {
                            let now = Instant::now();
                            let Ok((due, sent)) = times_rx.try_recv() else {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::InvalidData,
                                    "a DATA frame arrived that was never sent",
                                ));
                            };
                            if p == body {
                                received += 1;
                                hist.lock()
                                    .expect("a recorder panicked")
                                    .record(due, sent, now);
                            } else {
                                corrupt += 1;
                            }
                        }
                        OwnedFrame::Ping(p) => {
                            let _ = pong_tx.send(p);
                        }
                        OwnedFrame::Pong(_) => {}
                        OwnedFrame::GoAway(_) => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::ConnectionAborted,
                                "the gateway sent GOAWAY",
                            ))
                        }
                        OwnedFrame::Close { code, reason } => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::ConnectionAborted,
                                format!("the gateway sent CLOSE {code} {reason:?}"),
                            ))
                        }
                    }
                }
                if total.is_some_and(|t| received + corrupt >= t) {
                    return Ok(());
                }
                tokio::select! {
                    n = rd.read(&mut buf) => match n? {
                        0 => return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the gateway closed the connection",
                        )),
                        n => fb.push(&buf[..n]),
                    },
                    t = &mut total_rx, if total.is_none() => total = Some(t.unwrap_or(0)),
                }
            }
        };
        let result = match timeout_at(slot.drain, work).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "echoes still missing at the drain deadline",
            )),
        };
        (received, corrupt, result)
    };

    let ((sent, wres), (received, corrupt, rres)) = tokio::join!(writer, reader);
    let error = match (wres, rres) {
        (Err(e), _) => Some(format!("connection {}: write: {e}", slot.index)),
        (_, Err(e)) => Some(format!("connection {}: read: {e}", slot.index)),
        _ => None,
    };
    if error.is_none() {
        let mut stream = rd.unsplit(wr);
        let _ = timeout_at(Instant::now() + Duration::from_secs(2), stream.shutdown()).await;
    }
    ConnOutcome {
        sent,
        received,
        corrupt,
        error,
    }
}

fn summarize(report: &EchoReport) {
    let r = &report.results;
    let p = &report.parameters;
    println!(
        "echo: {} connections ({} failed), {} B frames at {:.0}/s scheduled for {:.1} s",
        r.conns_ok, r.conns_failed, p.size, p.rate, p.duration_secs
    );
    println!(
        "  frames: {} scheduled, {} sent, {} echoed ({:.0}/s), {} lost, {} corrupt; {} connection \
         errors",
        r.frames_scheduled,
        r.frames_sent,
        r.frames_received,
        r.frames_per_sec,
        r.frames_lost,
        r.frames_corrupt,
        r.conn_errors
    );
    let l = &r.latency;
    println!(
        "  latency from schedule (us): p50 {} p99 {} p999 {} max {}",
        l.p50_us, l.p99_us, l.p999_us, l.max_us
    );
    let s = &r.service_latency;
    println!(
        "  latency from write (us):    p50 {} p99 {} p999 {} max {}",
        s.p50_us, s.p99_us, s.p999_us, s.max_us
    );
    if let Some(c) = &r.server_cpu {
        println!(
            "  server CPU: {:.2} us per frame ({:.0} frames/s per core at full load), {:.0}% busy \
             over {} core(s); {} frames/s per core measured",
            c.us_per_op.unwrap_or(f64::NAN),
            c.capacity_per_core.unwrap_or(f64::NAN),
            c.utilization * 100.0,
            c.cores,
            r.frames_per_sec_per_core.round()
        );
    }
    println!(
        "  {} in {:.1} s",
        if r.ok { "OK" } else { "FAILED" },
        r.elapsed_secs
    );
}
