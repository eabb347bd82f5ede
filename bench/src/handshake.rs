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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;
use hdrhistogram::Histogram;
use holdfast_wire::frame::FrameType;
use rustls::ClientConfig;

use crate::client::{self, Failure, Stage, StageCounters, TlsInfo};
use crate::cpu;
use crate::plan;
use crate::procfs;
use crate::progress::{Live, Progress};
use crate::report::{self, HandshakeParameters, HandshakeReport, HandshakeResults, CPU_METHOD};
use crate::scenario::{self, Sources};
use crate::uring::{self, ConnId, Engine, EngineConfig, Event, Scenario, Tick};

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
    /// The order in which the clients offer their TLS 1.3 suites (the gateway follows it):
    /// `devices` (AES-128-GCM first, as browsers and phones) or `rustls` (AES-256-GCM with
    /// SHA-384 first, as rustls' own client).
    #[arg(long, value_enum, default_value_t = client::SuiteOrder::Devices)]
    pub suites: client::SuiteOrder,
    /// How often the clients verify the server's handshake signature once its certificate
    /// chain has been verified and pinned: `sampled` (one handshake in 64; the ECDSA
    /// verification is a quarter of a client's CPU per handshake, which is what limits
    /// the short-connection rate of one load-generator core) or `every`. The server signs
    /// every handshake either way.
    #[arg(long, value_enum, default_value_t = client::SignatureChecks::Sampled)]
    pub signatures: client::SignatureChecks,
    /// Client threads, each with a ring of its own; the loops are spread over them.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Seconds one connection may take from connect to its echo.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    /// Name of the system measured, stored in the report.
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
}

/// Counters shared by the loops of every thread.
#[derive(Default)]
struct Stats {
    done: AtomicU64,
    resumed: AtomicU64,
    failures: StageCounters,
}

impl Stats {
    fn failed(&self, f: &Failure, live: &Live) {
        live.error();
        if self.failures.record(f) {
            eprintln!("holdfast-bench: {f}");
        }
    }
}

/// What the threads share: the counters, and the end of the measured window, set once
/// every loop has made its warm-up connection.
#[derive(Default)]
struct Shared {
    warm: Stats,
    measured: Stats,
    warmed: AtomicU64,
    window_end: OnceLock<Instant>,
    /// Loops with a connection in flight, handshakes done, failures: the progress line.
    live: Arc<Live>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Making the uncounted warm-up connection.
    Warm,
    /// Waiting for the window to open.
    Ready,
    /// Making measured connections until the window's end.
    Running,
    Finished,
}

/// One closed loop: one simulated device.
struct Loop {
    /// Global loop number (for the source address rotation).
    index: u64,
    config: Arc<ClientConfig>,
    phase: Phase,
    /// Connections this loop has started.
    n: u64,
    /// The connection in flight: its id, start and what its handshake agreed.
    conn: Option<(ConnId, Instant, Option<TlsInfo>)>,
}

/// The loops of one thread.
struct Handshakes {
    loops: Vec<Loop>,
    by_conn: HashMap<ConnId, usize>,
    total_loops: u64,
    payload: Arc<Vec<u8>>,
    sources: Arc<Vec<IpAddr>>,
    timeout: Duration,
    shared: Arc<Shared>,
    hist: Histogram<u64>,
    info: Option<TlsInfo>,
    started: bool,
}

impl Handshakes {
    fn start(&mut self, engine: &mut Engine, l: usize, now: Instant) {
        let lp = &mut self.loops[l];
        let source = (!self.sources.is_empty()).then(|| {
            self.sources[plan::source_index(self.sources.len(), lp.index, self.total_loops, lp.n)]
        });
        lp.n += 1;
        let id = engine.connect(&lp.config, source, now + self.timeout);
        lp.conn = Some((id, now, None));
        self.shared.live.opened();
        self.by_conn.insert(id, l);
    }

    /// The loop's connection is over (done or failed): count it and go on.
    fn next(&mut self, engine: &mut Engine, l: usize, now: Instant) {
        let lp = &mut self.loops[l];
        lp.conn = None;
        self.shared.live.closed();
        match lp.phase {
            Phase::Warm => {
                lp.phase = Phase::Ready;
                self.shared.warmed.fetch_add(1, Ordering::Relaxed);
            }
            Phase::Running => match self.shared.window_end.get() {
                Some(&end) if now < end => self.start(engine, l, now),
                _ => lp.phase = Phase::Finished,
            },
            Phase::Ready | Phase::Finished => {}
        }
    }

    /// Counts a failed connection of loop `l`, as warm-up or measured.
    fn fail(&self, l: usize, f: Failure) {
        let stats = if self.loops[l].phase == Phase::Warm {
            &self.shared.warm
        } else {
            &self.shared.measured
        };
        stats.failed(&f, &self.shared.live);
    }
}

impl Scenario for Handshakes {
    fn tick(&mut self, engine: &mut Engine, now: Instant) -> Tick {
        if !self.started {
            self.started = true;
            for l in 0..self.loops.len() {
                self.start(engine, l, now);
            }
        }
        if self.shared.window_end.get().is_some() {
            for l in 0..self.loops.len() {
                if self.loops[l].phase == Phase::Ready {
                    self.loops[l].phase = Phase::Running;
                    self.start(engine, l, now);
                }
            }
        }
        if self.loops.iter().all(|l| l.phase == Phase::Finished) {
            Tick::Done
        } else if self.loops.iter().any(|l| l.phase == Phase::Ready) {
            // Waiting for the other threads' warm-up: look again soon.
            Tick::At(now + Duration::from_millis(2))
        } else {
            Tick::Idle
        }
    }

    fn event(&mut self, engine: &mut Engine, id: ConnId, event: Event, now: Instant) {
        let Some(&l) = self.by_conn.get(&id) else {
            return;
        };
        match event {
            Event::Established(info) => {
                if let Some((_, _, slot)) = &mut self.loops[l].conn {
                    *slot = Some(info);
                }
                engine.send(id, FrameType::Data, &self.payload);
                return;
            }
            Event::Data(p) if p == *self.payload => {
                engine.close(id);
                let (_, t, info) = self.loops[l].conn.take().expect("a loop's connection");
                if self.loops[l].phase == Phase::Running {
                    let us = now.duration_since(t).as_micros() as u64;
                    self.hist.saturating_record(us.max(1));
                    self.shared.measured.done.fetch_add(1, Ordering::Relaxed);
                    self.shared.live.did(1);
                    if info.as_ref().is_some_and(|i| i.resumed) {
                        self.shared.measured.resumed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.info = info;
                }
            }
            Event::Data(p) => {
                engine.abort(id);
                self.fail(
                    l,
                    Failure {
                        stage: Stage::Echo,
                        timed_out: false,
                        error: format!(
                            "echo differs: sent {} bytes, got {} bytes",
                            self.payload.len(),
                            p.len()
                        ),
                    },
                );
            }
            Event::Failed(f) => self.fail(l, f),
            Event::Ended(why) => self.fail(
                l,
                Failure {
                    stage: Stage::Echo,
                    timed_out: false,
                    error: why,
                },
            ),
        }
        self.by_conn.remove(&id);
        self.next(engine, l, now);
    }
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
    let base = client::client_config_with(&args.ca, args.suites, args.signatures)?;
    scenario::check_server_pids(&args.server_pids)?;
    let configs: Vec<Arc<ClientConfig>> = (0..args.conns_parallel)
        .map(|_| {
            if args.resume {
                client::resuming(&base)
            } else {
                base.clone()
            }
        })
        .collect();
    let started = std::time::Instant::now();
    let mut results = bench(&args, configs, target, sources.addrs.clone())?;
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
            suites: args.suites,
            signatures: args.signatures,
        },
        procfs::machine(),
        Some(CPU_METHOD),
        results,
    );
    scenario::write_json(&args.json, &report)?;
    summarize(&report);
    Ok(scenario::exit_code(report.results.ok))
}

fn bench(
    args: &HandshakeArgs,
    configs: Vec<Arc<ClientConfig>>,
    target: SocketAddr,
    sources: Vec<IpAddr>,
) -> anyhow::Result<HandshakeResults> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let payload = Arc::new(client::payload(args.size, 0, 0));
    let shared = Arc::new(Shared::default());
    let sources = Arc::new(sources);
    let total_loops = configs.len() as u64;
    let threads = args.threads.clamp(1, configs.len());
    let mut per_thread: Vec<Vec<Loop>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, config) in configs.into_iter().enumerate() {
        per_thread[i % threads].push(Loop {
            index: i as u64,
            config,
            phase: Phase::Warm,
            n: 0,
            conn: None,
        });
    }
    let scenarios: Vec<Handshakes> = per_thread
        .into_iter()
        .map(|loops| Handshakes {
            loops,
            by_conn: HashMap::new(),
            total_loops,
            payload: payload.clone(),
            sources: sources.clone(),
            timeout,
            shared: shared.clone(),
            hist: report::latency_histogram(),
            info: None,
            started: false,
        })
        .collect();

    // Warm-up: one uncounted connection per loop (and, resuming, its ticket); then the
    // window opens for every thread at once.
    let open_window = || -> anyhow::Result<cpu::Window> {
        let bound = Instant::now() + timeout + Duration::from_secs(1);
        while shared.warmed.load(Ordering::Relaxed) < total_loops && Instant::now() < bound {
            std::thread::sleep(Duration::from_millis(1));
        }
        let window = cpu::Window::start(&args.server_pids, args.server_cores)?;
        let end = Instant::now() + Duration::from_secs_f64(args.duration);
        shared.window_end.set(end).expect("the window opens once");
        Ok(window)
    };
    let progress = Progress::start("handshake", "connections", shared.live.clone());
    let (scenarios, window) = uring::run_threads(
        scenarios,
        target,
        &args.server_name,
        EngineConfig::default(),
        Duration::from_secs(1),
        open_window,
    )?;
    drop(progress);
    let window = window?;
    let done = shared.measured.done.load(Ordering::Relaxed);
    let measured = window.finish(done);
    let resumed = shared.measured.resumed.load(Ordering::Relaxed);
    let failures = shared.measured.failures.get();
    let warm_failed = shared.warm.failures.get().total();
    let hps = report::rate(done, measured.wall_secs);
    let mut hist = report::latency_histogram();
    let mut info = None;
    for s in &scenarios {
        hist.add(&s.hist).ok();
        info = info.or(s.info.clone());
    }
    let latency = report::latency(&hist);
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
        loadgen_cpus_busy: measured.loadgen_cpus_busy,
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
            "  server CPU: {:.1} us per connection ({:.1} us user, {:.1} us kernel; {:.0}/s per \
             core at full load), {:.0}% busy; load generator {:.0}% of a core",
            c.us_per_op.unwrap_or(f64::NAN),
            c.user_us_per_op.unwrap_or(f64::NAN),
            c.kernel_us_per_op.unwrap_or(f64::NAN),
            c.capacity_per_core.unwrap_or(f64::NAN),
            c.utilization * 100.0,
            r.client_cpu_utilization.unwrap_or(f64::NAN) * 100.0
        );
    }
    if let Some(line) = crate::cpu::loadgen_line(r.loadgen_cpus_busy, true) {
        println!("{line}");
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
