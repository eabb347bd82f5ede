//! `holdfast-bench echo`: relays small DATA frames through a gateway and an echo worker at
//! a fixed open-loop rate and reports throughput and latency percentiles.
//!
//! Sends follow a timetable fixed before the run starts: frame `i` of connection `c` is
//! due at `(i * conns + c) / rate` seconds, whatever happened to earlier frames. Latency
//! is measured from that due time, not from when the write happened, so a stall shows up
//! in the percentiles of every frame it delayed instead of being hidden by a client that
//! politely waited (coordinated omission). The service time from the actual write is
//! reported beside it; the gap between the two is the client falling behind.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;
use hdrhistogram::Histogram;
use holdfast_wire::frame::{self, FrameType};
use rustls::ClientConfig;

use crate::client;
use crate::cpu;
use crate::plan;
use crate::procfs;
use crate::progress::{Live, Progress};
use crate::report::{self, EchoParameters, EchoReport, EchoResults};
use crate::scenario;
use crate::uring::{self, ConnId, Engine, EngineConfig, Event, Scenario, Tick};

/// Handshakes in flight at most per thread while connecting.
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
    /// Client threads, each with a ring of its own; the connections are spread over them.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Name of the system measured, stored in the report.
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
}

/// Both latency histograms of a run.
struct Histograms {
    scheduled: Histogram<u64>,
    service: Histogram<u64>,
}

impl Histograms {
    fn new() -> Histograms {
        Histograms {
            scheduled: report::latency_histogram(),
            service: report::latency_histogram(),
        }
    }

    fn record(&mut self, due: Instant, sent: Instant, now: Instant) {
        // Saturating: a sample beyond the histogram's hour is still a sample, at its top.
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        self.scheduled
            .saturating_record(us(now.saturating_duration_since(due)));
        self.service
            .saturating_record(us(now.saturating_duration_since(sent)));
    }
}

/// What the threads share: how many connections are settled (established or failed), and
/// the timetable's start, set once all are.
#[derive(Default)]
struct Shared {
    settled: AtomicU64,
    start: OnceLock<Instant>,
    /// Connections open, frames echoed, errors: the progress line.
    live: Arc<Live>,
}

/// One connection of the run.
struct Relay {
    /// Its place in the timetable.
    index: u64,
    id: Option<ConnId>,
    open: bool,
    body: Vec<u8>,
    /// (due, written) of each frame sent and not yet echoed, oldest first: echoes come
    /// back in order on a connection.
    in_flight: VecDeque<(Instant, Instant)>,
    sent: u64,
    received: u64,
    corrupt: u64,
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    /// Every connection of this thread settled; waiting for the others.
    Ready,
    Sending,
    /// The timetable is over; waiting for the last echoes.
    Draining,
}

/// The connections of one thread and its share of the timetable.
struct Echo {
    relays: Vec<Relay>,
    by_conn: HashMap<ConnId, usize>,
    /// Total connections of the run (all threads): the timetable's modulus.
    conns: u64,
    /// This thread's number and the number of threads: relay `i` here is connection
    /// `i * threads + thread` of the run.
    thread: u64,
    threads: u64,
    rate: f64,
    duration: Duration,
    timeout: Duration,
    config: Arc<ClientConfig>,
    shared: Arc<Shared>,
    phase: Phase,
    next_connect: usize,
    connecting: usize,
    conns_ok: u64,
    conns_failed: u64,
    /// Next timetable event to look at.
    n: u64,
    scheduled: u64,
    hist: Histograms,
}

impl Echo {
    fn connect_more(&mut self, engine: &mut Engine, now: Instant) {
        while self.connecting < CONNECT_CONCURRENCY && self.next_connect < self.relays.len() {
            let id = engine.connect(&self.config, None, now + self.timeout);
            self.by_conn.insert(id, self.next_connect);
            self.relays[self.next_connect].id = Some(id);
            self.next_connect += 1;
            self.connecting += 1;
        }
    }

    fn settled(&mut self) {
        self.connecting -= 1;
        self.shared.settled.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends every frame of this thread that is due by `now`; returns when the next is.
    fn send_due(&mut self, engine: &mut Engine, start: Instant, now: Instant) -> Option<Instant> {
        let end = start + self.duration;
        loop {
            let due = start + plan::due(self.n, self.rate);
            if due >= end {
                return None;
            }
            if due > now {
                return Some(due);
            }
            let c = plan::echo_conn(self.n, self.conns);
            self.n += 1;
            if c % self.threads != self.thread {
                continue;
            }
            let r = &mut self.relays[(c / self.threads) as usize];
            let Some(id) = r.id.filter(|_| r.open) else {
                // A connection that never opened, or failed: its frames are scheduled and
                // never sent, which the report shows.
                if r.id.is_some() {
                    self.scheduled += 1;
                }
                continue;
            };
            self.scheduled += 1;
            if engine.send(id, FrameType::Data, &r.body) {
                r.sent += 1;
                r.in_flight.push_back((due, now));
            }
        }
    }

    fn all_echoed(&self) -> bool {
        self.relays
            .iter()
            .all(|r| !r.open || r.in_flight.is_empty())
    }

    fn fail(&mut self, i: usize, why: String) {
        let r = &mut self.relays[i];
        if r.open {
            self.shared.live.closed();
        }
        self.shared.live.error();
        r.open = false;
        if r.error.is_none() {
            r.error = Some(format!("connection {}: {why}", r.index));
        }
    }
}

impl Scenario for Echo {
    fn tick(&mut self, engine: &mut Engine, now: Instant) -> Tick {
        match self.phase {
            Phase::Connecting => {
                self.connect_more(engine, now);
                if self.connecting == 0 && self.next_connect == self.relays.len() {
                    self.phase = Phase::Ready;
                } else {
                    return Tick::Idle;
                }
                self.tick(engine, now)
            }
            Phase::Ready => match self.shared.start.get() {
                Some(&start) => {
                    self.phase = Phase::Sending;
                    crate::sys::set_timer_slack_ns(1);
                    Tick::At(start)
                }
                None => Tick::At(now + Duration::from_millis(1)),
            },
            Phase::Sending => {
                let start = *self.shared.start.get().expect("sending after the start");
                if now < start {
                    return Tick::At(start);
                }
                match self.send_due(engine, start, now) {
                    Some(next) => Tick::At(next),
                    None => {
                        self.phase = Phase::Draining;
                        self.tick(engine, now)
                    }
                }
            }
            Phase::Draining => {
                let start = *self.shared.start.get().expect("draining after the start");
                let drain = start + self.duration + self.timeout;
                if self.all_echoed() || now >= drain {
                    for i in 0..self.relays.len() {
                        let r = &mut self.relays[i];
                        if r.open && !r.in_flight.is_empty() {
                            self.fail(i, "read: echoes still missing at the drain deadline".into());
                        }
                        if let Some(id) = self.relays[i].id {
                            engine.close(id);
                        }
                    }
                    Tick::Done
                } else {
                    Tick::At(drain)
                }
            }
        }
    }

    fn event(&mut self, engine: &mut Engine, id: ConnId, event: Event, now: Instant) {
        let Some(&i) = self.by_conn.get(&id) else {
            return;
        };
        match event {
            Event::Established(_) => {
                // The deadline bounded the connect and handshake only; the drain deadline
                // bounds the rest.
                engine.set_deadline(id, None);
                self.shared.live.opened();
                self.relays[i].open = true;
                self.conns_ok += 1;
                self.settled();
                self.connect_more(engine, now);
            }
            Event::Failed(f) if !self.relays[i].open => {
                self.conns_failed += 1;
                self.shared.live.error();
                self.relays[i].id = None;
                if crate::why::first_of_its_kind(&f.to_string()) {
                    eprintln!(
                        "holdfast-bench: connection {} (and any later one failing the same way): {f}",
                        self.relays[i].index
                    );
                }
                self.settled();
                self.connect_more(engine, now);
            }
            Event::Failed(f) => self.fail(i, f.to_string()),
            Event::Ended(why) => self.fail(i, format!("read: {why}")),
            Event::Data(p) => {
                let r = &mut self.relays[i];
                let Some((due, sent)) = r.in_flight.pop_front() else {
                    engine.abort(id);
                    return self.fail(i, "read: a DATA frame arrived that was never sent".into());
                };
                if p == r.body {
                    r.received += 1;
                    self.shared.live.did(1);
                    self.hist.record(due, sent, now);
                } else {
                    r.corrupt += 1;
                    self.shared.live.error();
                }
            }
        }
    }
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
    let target = client::resolve(&args.target)?;
    let started = Instant::now();
    let mut results = bench(&args, config, target)?;
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

fn bench(
    args: &EchoArgs,
    config: Arc<ClientConfig>,
    target: SocketAddr,
) -> anyhow::Result<EchoResults> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let threads = (args.threads.max(1) as u64).min(args.conns);
    let shared = Arc::new(Shared::default());
    let scenarios: Vec<Echo> = (0..threads)
        .map(|t| Echo {
            relays: (t..args.conns)
                .step_by(threads as usize)
                .map(|c| Relay {
                    index: c,
                    id: None,
                    open: false,
                    body: client::payload(args.size, c, 0),
                    in_flight: VecDeque::new(),
                    sent: 0,
                    received: 0,
                    corrupt: 0,
                    error: None,
                })
                .collect(),
            by_conn: HashMap::new(),
            conns: args.conns,
            thread: t,
            threads,
            rate: args.rate,
            duration: Duration::from_secs_f64(args.duration),
            timeout,
            config: config.clone(),
            shared: shared.clone(),
            phase: Phase::Connecting,
            next_connect: 0,
            connecting: 0,
            conns_ok: 0,
            conns_failed: 0,
            n: 0,
            scheduled: 0,
            hist: Histograms::new(),
        })
        .collect();

    // Once every connection is settled the timetable starts on all threads at once; the
    // CPU window spans the timetable and the drain, nothing of the connecting.
    let open_window = || -> anyhow::Result<cpu::Window> {
        let bound = Instant::now() + timeout + Duration::from_secs(1);
        while shared.settled.load(Ordering::Relaxed) < args.conns && Instant::now() < bound {
            std::thread::sleep(Duration::from_millis(1));
        }
        let window = cpu::Window::start(&args.server_pids, args.server_cores)?;
        shared
            .start
            .set(Instant::now() + LEAD_IN)
            .expect("the timetable starts once");
        Ok(window)
    };
    let progress = Progress::start("echo", "frames", shared.live.clone());
    let (scenarios, window) = uring::run_threads(
        scenarios,
        target,
        &args.server_name,
        EngineConfig::default(),
        Duration::from_secs(2),
        open_window,
    )?;
    drop(progress);
    let window = window?;

    let mut results = EchoResults::default();
    let mut hist = Histograms::new();
    let mut errors = 0;
    for s in &scenarios {
        results.conns_ok += s.conns_ok;
        results.conns_failed += s.conns_failed;
        results.frames_scheduled += s.scheduled;
        hist.scheduled.add(&s.hist.scheduled).ok();
        hist.service.add(&s.hist.service).ok();
        for r in &s.relays {
            results.frames_sent += r.sent;
            results.frames_received += r.received;
            results.frames_corrupt += r.corrupt;
            if let Some(e) = &r.error {
                results.conn_errors += 1;
                errors += 1;
                if errors <= 5 {
                    eprintln!("holdfast-bench: {e}");
                }
            }
        }
    }
    let measured = window.finish(results.frames_received);
    results.server_cpu_us_per_frame = measured.server.as_ref().and_then(|c| c.us_per_op);
    results.server_cpu = measured.server;
    results.client_cpu_utilization = measured.client_utilization;
    results.loadgen_cpus_busy = measured.loadgen_cpus_busy;
    results.frames_lost = results.frames_sent - results.frames_received.min(results.frames_sent);
    results.frames_per_sec = results.frames_received as f64 / args.duration;
    results.frames_per_sec_per_core = results.frames_per_sec / args.server_cores as f64;
    results.latency = report::latency(&hist.scheduled);
    results.service_latency = report::latency(&hist.service);
    results.ok = results.conns_failed == 0
        && results.conn_errors == 0
        && results.frames_lost == 0
        && results.frames_corrupt == 0
        && results.frames_sent == results.frames_scheduled;
    Ok(results)
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
            "  server CPU: {:.2} us per frame ({:.2} us user, {:.2} us kernel; {:.0} frames/s per \
             core at full load), {:.0}% busy over {} core(s); {} frames/s per core measured",
            c.us_per_op.unwrap_or(f64::NAN),
            c.user_us_per_op.unwrap_or(f64::NAN),
            c.kernel_us_per_op.unwrap_or(f64::NAN),
            c.capacity_per_core.unwrap_or(f64::NAN),
            c.utilization * 100.0,
            c.cores,
            r.frames_per_sec_per_core.round()
        );
    }
    if let Some(line) = crate::cpu::loadgen_line(r.loadgen_cpus_busy, false) {
        println!("{line}");
    }
    println!(
        "  {} in {:.1} s",
        if r.ok { "OK" } else { "FAILED" },
        r.elapsed_secs
    );
}
