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
//!
//! The clients run on the io_uring client runtime ([`crate::uring`]), spread over
//! `--threads` rings. Each thread's [`Storm`] connects its clients on the shared timetable,
//! holds them, and drops and reconnects them all at the instant the calling thread names.
//! The calling thread paces the phases: it waits for every first connection, lets the
//! clients settle, samples the accept-queue counters and opens the CPU window, names the
//! storm's instant a little ahead (so every thread drops at that instant, not whenever it
//! next looks), and closes the window when the last client is back or out of time.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use hdrhistogram::Histogram;
use holdfast_wire::frame::FrameType;
use rustls::ClientConfig;

use crate::client::{self, Failure, Stage, StageCounters};
use crate::cpu::{self, Measured};
use crate::plan;
use crate::procfs::{self, ListenCounters};
use crate::progress::{Live, Progress};
use crate::report::{
    self, StageFailures, StormParameters, StormReport, StormResults, CPU_METHOD, LISTEN_SCOPE,
};
use crate::scenario::{self, Sources};
use crate::uring::{self, ConnId, Engine, EngineConfig, Event, Scenario, Tick};

/// Handshakes in flight at most while the clients first connect (not during the storm,
/// where every client goes at once), shared out among the threads.
const CONNECT_CONCURRENCY: usize = 512;
/// Pause before a client retries a failed reconnection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Descriptors the process needs besides its connections and rings.
const FD_HEADROOM: u64 = 64;
/// How often a thread looks at what the calling thread decided (the storm's instant, the
/// end of the run) when nothing else wakes it sooner.
const POLL: Duration = Duration::from_millis(1);
/// How far ahead of the storm the calling thread names its instant: several polls, so
/// every thread has seen it and is waiting for it when it comes.
const STORM_LEAD: Duration = Duration::from_millis(5);
/// How long a finished thread waits for its close_notify records to go out and for the
/// kernel to let go of its connections.
const LINGER: Duration = Duration::from_secs(2);

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
    /// Client threads, each with a ring of its own; the clients are spread over them.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Seconds every client has to be back after the drop (also the bound on each first
    /// connection).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,
    /// Name of the system measured, stored in the report.
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
}

/// What the client threads and the calling thread share.
struct Shared {
    /// When the connect timetable starts.
    start: Instant,
    connect_rate: f64,
    /// The payload every connection echoes.
    payload: Vec<u8>,
    /// The bound on each first connection, and on every client's return after the drop.
    timeout: Duration,
    /// Clients in all.
    clients: u64,
    /// The calling thread, unparked when the last client concludes a phase.
    pacer: Thread,
    /// First connections concluded (connected or failed), and those connected.
    concluded: AtomicU64,
    connected: AtomicU64,
    /// Clients done with the storm (back or out of time), back, and back resumed.
    settled: AtomicU64,
    back: AtomicU64,
    resumed: AtomicU64,
    initial: StageCounters,
    storm: StageCounters,
    /// Connections held, clients arrived (first connections and reconnections), failed
    /// attempts: the progress line.
    live: Arc<Live>,
    /// The instant every client drops; named once every first connection has concluded.
    storm_at: OnceLock<Instant>,
    /// Set when the storm is over (or the run failed): close everything and finish.
    close: AtomicBool,
    /// Client threads that stopped before their scenario was done (see `Drop for Storm`).
    stopped: AtomicU64,
}

impl Shared {
    /// A first connection concluded; the last one wakes the calling thread.
    fn concluded_first(&self) {
        if self.concluded.fetch_add(1, Ordering::AcqRel) + 1 == self.clients {
            self.pacer.unpark();
        }
    }

    /// A client is done with the storm; the last one wakes the calling thread. The count
    /// of connected clients is final by then: the storm starts only once every first
    /// connection has concluded.
    fn settled(&self) {
        let settled = self.settled.fetch_add(1, Ordering::AcqRel) + 1;
        if settled == self.connected.load(Ordering::Acquire) {
            self.pacer.unpark();
        }
    }
}

/// Where one client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for its slot in the connect timetable.
    Waiting,
    /// A connection on its way: TCP connect, handshake, then the echo. `resumed` says
    /// what the handshake did once it is done.
    Attempt { id: ConnId, resumed: bool },
    /// Connected, echoed and idle: before the storm, connected; after it, back. `None`
    /// once the server has closed the connection (before the storm the client reconnects
    /// with the others; after it, it was already counted as back).
    Held(Option<ConnId>),
    /// A reconnection failed; the client is in the retry queue.
    Pausing,
    /// The first connection failed: the client sits the storm out.
    Lost,
    /// Not back by the storm's deadline.
    GaveUp,
}

/// One simulated device.
struct Client {
    /// Its number among all clients: its slot in the connect timetable.
    index: u64,
    /// Its own session store when resuming, the shared configuration otherwise.
    config: Arc<ClientConfig>,
    source: Option<IpAddr>,
    state: State,
}

/// The storm as a thread sees it.
#[derive(Debug, Clone, Copy)]
struct Dropped {
    /// The instant every connection dropped.
    at: Instant,
    /// The end of the time every client has to be back.
    deadline: Instant,
}

/// The clients of one thread.
struct Storm {
    /// In timetable order.
    clients: Vec<Client>,
    /// The client of each connection open or on its way.
    by_conn: HashMap<ConnId, usize>,
    shared: Arc<Shared>,
    /// The next client to make its first connection, first connections in flight, and
    /// how many may be.
    next: usize,
    connecting: usize,
    concurrency: usize,
    /// Set when this thread has dropped its connections.
    dropped: Option<Dropped>,
    /// Clients waiting to retry, with when; the times only grow, since every pause is the
    /// same.
    retries: VecDeque<(Instant, usize)>,
    /// Time from the drop until each client of this thread was back, and the longest.
    latency: Histogram<u64>,
    last: Duration,
    /// Set when the scenario told the engine it is done.
    done: bool,
}

impl Storm {
    fn new(clients: Vec<Client>, shared: Arc<Shared>, concurrency: usize) -> Storm {
        Storm {
            clients,
            by_conn: HashMap::new(),
            shared,
            next: 0,
            connecting: 0,
            concurrency,
            dropped: None,
            retries: VecDeque::new(),
            latency: report::latency_histogram(),
            last: Duration::ZERO,
            done: false,
        }
    }

    /// Starts an attempt of client `c` that must be echoed by `deadline`.
    fn attempt(&mut self, engine: &mut Engine, c: usize, deadline: Instant) {
        let client = &mut self.clients[c];
        let id = engine.connect(&client.config, client.source, deadline);
        client.state = State::Attempt { id, resumed: false };
        self.by_conn.insert(id, c);
    }

    /// Starts the first connections that are due, as far as the concurrency allows.
    /// Returns when the next one is due, unless it waits for a slot rather than its time.
    fn start_due(&mut self, engine: &mut Engine, now: Instant) -> Option<Instant> {
        while self.next < self.clients.len() && self.connecting < self.concurrency {
            let due = self.shared.start
                + plan::due(self.clients[self.next].index, self.shared.connect_rate);
            if due > now {
                return Some(due);
            }
            let c = self.next;
            self.next += 1;
            self.connecting += 1;
            self.attempt(engine, c, now + self.shared.timeout);
        }
        None
    }

    /// The storm: every held connection drops at once, without close_notify, and every
    /// client that was connected reconnects at once.
    fn drop_all(&mut self, engine: &mut Engine, at: Instant) {
        let deadline = at + self.shared.timeout;
        self.dropped = Some(Dropped { at, deadline });
        for client in &mut self.clients {
            if let State::Held(Some(id)) = client.state {
                engine.abort(id);
                self.shared.live.closed();
                self.by_conn.remove(&id);
                client.state = State::Held(None);
            }
        }
        for c in 0..self.clients.len() {
            if self.clients[c].state == State::Held(None) {
                self.attempt(engine, c, deadline);
            }
        }
    }

    /// Retries the reconnections whose pause is over, or gives them up at the deadline.
    /// Returns when the next retry is due.
    fn retry_due(&mut self, engine: &mut Engine, now: Instant) -> Option<Instant> {
        let deadline = self.dropped?.deadline;
        while let Some(&(at, c)) = self.retries.front() {
            if at > now {
                return Some(at);
            }
            self.retries.pop_front();
            if now >= deadline {
                self.clients[c].state = State::GaveUp;
                self.shared.settled();
            } else {
                self.attempt(engine, c, deadline);
            }
        }
        None
    }

    /// Client `c`'s attempt echoed: it holds the connection from now on, with no deadline.
    fn arrived(&mut self, engine: &mut Engine, c: usize, id: ConnId, resumed: bool, now: Instant) {
        engine.set_deadline(id, None);
        self.clients[c].state = State::Held(Some(id));
        let s = &self.shared;
        s.live.opened();
        s.live.did(1);
        match self.dropped {
            // No attempt before the drop is a reconnection: the storm starts only once
            // every first connection has concluded.
            None => {
                self.connecting -= 1;
                s.connected.fetch_add(1, Ordering::Relaxed);
                s.concluded_first();
            }
            Some(dropped) => {
                let took = now.saturating_duration_since(dropped.at);
                self.latency
                    .saturating_record((took.as_micros() as u64).max(1));
                self.last = self.last.max(took);
                s.back.fetch_add(1, Ordering::Relaxed);
                if resumed {
                    s.resumed.fetch_add(1, Ordering::Relaxed);
                }
                s.settled();
            }
        }
    }

    /// Client `c`'s attempt failed (its connection is gone): a first connection is lost,
    /// a reconnection retries after a pause.
    fn failed(&mut self, c: usize, f: &Failure, now: Instant) {
        let s = &self.shared;
        s.live.error();
        match self.dropped {
            None => {
                if s.initial.record(f) {
                    eprintln!("holdfast-bench: first connection: {f}");
                }
                self.clients[c].state = State::Lost;
                self.connecting -= 1;
                s.concluded_first();
            }
            Some(dropped) => {
                if s.storm.record(f) {
                    eprintln!("holdfast-bench: reconnection: {f}");
                }
                self.clients[c].state = State::Pausing;
                let at = (now + RETRY_PAUSE).min(dropped.deadline);
                self.retries.push_back((at, c));
            }
        }
    }

    /// The end: held connections close with close_notify, attempts still on their way
    /// are abandoned, and nothing more is counted.
    fn close_all(&mut self, engine: &mut Engine) {
        for (&id, &c) in &self.by_conn {
            match self.clients[c].state {
                State::Held(_) => engine.close(id),
                _ => engine.abort(id),
            }
        }
        self.by_conn.clear();
        self.retries.clear();
    }
}

impl Scenario for Storm {
    fn tick(&mut self, engine: &mut Engine, now: Instant) -> Tick {
        if self.shared.close.load(Ordering::Acquire) {
            // The engine still sends the close_notify of polite closes once told Done.
            self.close_all(engine);
            self.done = true;
            return Tick::Done;
        }
        // Never idle: the calling thread's decisions are polled, and a connection that
        // could not even start reports its failure only after this tick returns.
        let mut wake = now + POLL;
        if let Some(due) = self.start_due(engine, now) {
            wake = wake.min(due);
        }
        if self.dropped.is_none() {
            match self.shared.storm_at.get() {
                Some(&at) if at <= now => self.drop_all(engine, at),
                Some(&at) => wake = wake.min(at),
                None => {}
            }
        }
        if let Some(at) = self.retry_due(engine, now) {
            wake = wake.min(at);
        }
        Tick::At(wake)
    }

    fn event(&mut self, engine: &mut Engine, id: ConnId, event: Event, now: Instant) {
        let Some(&c) = self.by_conn.get(&id) else {
            return;
        };
        let State::Attempt { resumed, .. } = self.clients[c].state else {
            // A held connection: only its end matters (see `State::Held`).
            if matches!(event, Event::Failed(_) | Event::Ended(_)) {
                self.shared.live.closed();
                self.shared.live.error();
                self.by_conn.remove(&id);
                self.clients[c].state = State::Held(None);
            }
            return;
        };
        let failure = match event {
            Event::Established(info) => {
                self.clients[c].state = State::Attempt {
                    id,
                    resumed: info.resumed,
                };
                // A send that cannot go out ends the connection, which comes back as an
                // event of its own.
                engine.send(id, FrameType::Data, &self.shared.payload);
                return;
            }
            Event::Data(p) if p == self.shared.payload => {
                return self.arrived(engine, c, id, resumed, now);
            }
            Event::Data(p) => {
                engine.abort(id);
                Failure {
                    stage: Stage::Echo,
                    timed_out: false,
                    error: format!(
                        "echo differs: sent {} bytes, got {} bytes",
                        self.shared.payload.len(),
                        p.len()
                    ),
                }
            }
            Event::Failed(f) => f,
            Event::Ended(why) => Failure {
                stage: Stage::Echo,
                timed_out: false,
                error: why,
            },
        };
        self.by_conn.remove(&id);
        self.failed(c, &failure, now);
    }
}

/// A thread hands its scenario back once it is done; one that stops early (its ring could
/// not be set up, the ring failed, the thread panicked) drops it instead. The calling thread
/// learns of it here rather than waiting out its deadlines for clients that will never
/// conclude; `run_threads` then reports the thread's error.
impl Drop for Storm {
    fn drop(&mut self) {
        if !self.done {
            self.shared.stopped.fetch_add(1, Ordering::AcqRel);
            self.shared.pacer.unpark();
        }
    }
}

/// Runs a storm; the exit code is non-zero when a client failed to connect or to come back.
pub fn run(args: StormArgs) -> anyhow::Result<ExitCode> {
    ensure!(args.conns >= 1, "--conns must be at least 1");
    ensure!(args.threads >= 1, "--threads must be at least 1");
    scenario::ensure_positive("--timeout", args.timeout)?;
    scenario::ensure_positive("--connect-rate", args.connect_rate)?;
    ensure!(
        args.settle >= 0.0 && args.settle.is_finite(),
        "--settle must be 0 or more"
    );
    ensure!(args.server_cores >= 1, "--server-cores must be at least 1");
    ensure!(
        args.size <= holdfast_wire::frame::MAX_LEN_FIELD,
        "--size is over the protocol's limit"
    );
    let threads = args.threads.min(args.conns as usize);
    let (_, hard) = crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    // A client holds one descriptor at a time: a dropped connection's descriptor is closed
    // before its reconnection opens one. Each thread's ring holds one more.
    let needed = args.conns + threads as u64 + FD_HEADROOM;
    ensure!(
        needed <= hard,
        "{} clients need up to {needed} descriptors, over the open-file limit of {hard}",
        args.conns
    );
    let target = client::resolve(&args.target)?;
    let sources = Sources::resolve(args.sources.as_deref(), target)?;
    let base = client::client_config(&args.ca)?;
    scenario::check_server_pids(&args.server_pids)?;
    let clients = (0..args.conns)
        .map(|index| Client {
            index,
            config: if args.resume {
                client::resuming(&base)
            } else {
                base.clone()
            },
            source: (!sources.addrs.is_empty())
                .then(|| sources.addrs[plan::source_index(sources.addrs.len(), 0, 1, index)]),
            state: State::Waiting,
        })
        .collect();
    let started = Instant::now();
    let mut results = bench(&args, clients, threads, target)?;
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

/// Shares `items` out among `threads` round-robin: item `i` goes to thread
/// `i % threads`, so each thread's share keeps the order it had.
fn spread<T>(items: Vec<T>, threads: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        out[i % threads].push(item);
    }
    out
}

fn bench(
    args: &StormArgs,
    clients: Vec<Client>,
    threads: usize,
    target: SocketAddr,
) -> anyhow::Result<StormResults> {
    let shared = Arc::new(Shared {
        start: Instant::now(),
        connect_rate: args.connect_rate,
        payload: client::payload(args.size, 0, 0),
        timeout: Duration::from_secs_f64(args.timeout),
        clients: clients.len() as u64,
        pacer: std::thread::current(),
        concluded: AtomicU64::new(0),
        connected: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        back: AtomicU64::new(0),
        resumed: AtomicU64::new(0),
        initial: StageCounters::default(),
        storm: StageCounters::default(),
        live: Arc::default(),
        storm_at: OnceLock::new(),
        close: AtomicBool::new(false),
        stopped: AtomicU64::new(0),
    });
    let concurrency = CONNECT_CONCURRENCY.div_ceil(threads);
    let storms: Vec<Storm> = spread(clients, threads)
        .into_iter()
        .map(|clients| Storm::new(clients, shared.clone(), concurrency))
        .collect();
    // `run_threads` runs this on the calling thread, the one `Shared::pacer` names. The
    // threads finish once told to close, whether the storm ran or the pacing failed.
    let pace_and_close = || {
        let paced = pace(&shared, args);
        shared.close.store(true, Ordering::Release);
        paced
    };
    let progress = Progress::start("storm", "arrivals", shared.live.clone());
    let (storms, paced) = uring::run_threads(
        storms,
        target,
        &args.server_name,
        EngineConfig::default(),
        LINGER,
        pace_and_close,
    )?;
    drop(progress);
    let paced = paced?;
    let mut latency = report::latency_histogram();
    let mut last = Duration::ZERO;
    for s in &storms {
        latency
            .add(&s.latency)
            .expect("histograms with the same bounds add up");
        last = last.max(s.last);
    }
    let tally = Tally {
        clients: shared.clients,
        connected: paced.connected,
        initial_failures: shared.initial.get(),
        back: shared.back.load(Ordering::Relaxed),
        resumed: shared.resumed.load(Ordering::Relaxed),
        reconnect_failures: shared.storm.get(),
        latency,
        last,
    };
    Ok(tally.results(paced.listen_before, paced.listen_after, paced.measured))
}

/// What the calling thread measured around the storm.
struct Paced {
    /// Clients connected before the storm.
    connected: u64,
    listen_before: ListenCounters,
    listen_after: ListenCounters,
    /// The CPU window from just before the drop until the last client was back.
    measured: Measured,
}

/// The calling thread's part: waits for every first connection, lets the clients settle,
/// names the storm's instant with the CPU window open, and waits for every connected
/// client to be back or out of time.
fn pace(shared: &Shared, args: &StormArgs) -> anyhow::Result<Paced> {
    let n = shared.clients;
    // Every client connects (or fails) within its slot of the timetable plus its timeout.
    let open_deadline = shared.start
        + plan::due(n, args.connect_rate) * 2
        + shared.timeout
        + Duration::from_secs(10);
    let all_concluded = || shared.concluded.load(Ordering::Acquire) >= n;
    let in_time = wait_until(shared, all_concluded, open_deadline)?;
    if !in_time {
        let concluded = shared.concluded.load(Ordering::Acquire);
        bail!("{} clients still connecting at the deadline", n - concluded);
    }
    let connected = shared.connected.load(Ordering::Acquire);
    println!(
        "storm: {} of {} clients connected in {:.1} s; dropping them all",
        connected,
        n,
        shared.start.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs_f64(args.settle));

    let listen_before = procfs::listen_counters()?;
    let window = cpu::Window::start(&args.server_pids, args.server_cores)?;
    let at = Instant::now() + STORM_LEAD;
    shared
        .storm_at
        .set(at)
        .expect("the storm is named once, here");
    let storm_deadline = at + shared.timeout + Duration::from_secs(5);
    let all_settled = || shared.settled.load(Ordering::Acquire) >= connected;
    // Every reconnection attempt ends by the storm's deadline; past it with clients
    // unsettled, the report says how many came back.
    wait_until(shared, all_settled, storm_deadline)?;
    let measured = window.finish(shared.back.load(Ordering::Acquire));
    let listen_after = procfs::listen_counters()?;
    Ok(Paced {
        connected,
        listen_before,
        listen_after,
        measured,
    })
}

/// Parks the calling thread until `done` holds (the client threads unpark it when the
/// last client concludes a phase) or `deadline` passes; true when `done` held. Fails as
/// soon as a client thread has stopped.
fn wait_until(shared: &Shared, done: impl Fn() -> bool, deadline: Instant) -> anyhow::Result<bool> {
    loop {
        if shared.stopped.load(Ordering::Acquire) > 0 {
            bail!("a client thread stopped");
        }
        if done() {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// What a run counted, put together once the threads are done.
struct Tally {
    clients: u64,
    connected: u64,
    initial_failures: StageFailures,
    back: u64,
    resumed: u64,
    reconnect_failures: StageFailures,
    /// Time from the drop until each client was back, and the longest.
    latency: Histogram<u64>,
    last: Duration,
}

impl Tally {
    /// The report's results, with the accept-queue counters sampled around the storm and
    /// the CPU measured over it (`elapsed_secs` is left for the caller).
    fn results(
        &self,
        before: ListenCounters,
        after: ListenCounters,
        measured: Measured,
    ) -> StormResults {
        let all_back = self.back == self.connected;
        StormResults {
            ok: self.connected == self.clients
                && all_back
                && self.reconnect_failures.total() == 0
                && self.initial_failures.total() == 0,
            connected: self.connected,
            initial_failures: self.initial_failures.clone(),
            back: self.back,
            all_back,
            recovery_secs: all_back.then_some(self.last.as_secs_f64()),
            reconnect_failures: self.reconnect_failures.clone(),
            resumed: self.resumed,
            full: self.back.saturating_sub(self.resumed),
            reconnect_latency: report::latency(&self.latency),
            listen_overflows: after.overflows.saturating_sub(before.overflows),
            listen_drops: after.drops.saturating_sub(before.drops),
            listen_scope: LISTEN_SCOPE,
            server_cpu_us_per_reconnect: measured.server.as_ref().and_then(|c| c.us_per_op),
            server_cpu: measured.server,
            elapsed_secs: 0.0,
        }
    }
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
            "  server CPU: {:.1} us per client back ({:.1} us user, {:.1} us kernel), {:.0}% busy",
            c.us_per_op.unwrap_or(f64::NAN),
            c.user_us_per_op.unwrap_or(f64::NAN),
            c.kernel_us_per_op.unwrap_or(f64::NAN),
            c.utilization * 100.0
        );
    }
    println!(
        "  {} in {:.1} s",
        if r.ok { "OK" } else { "FAILED" },
        r.elapsed_secs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_keeps_each_share_in_order() {
        let shares = spread((0..10).collect::<Vec<u64>>(), 3);
        assert_eq!(shares, vec![vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
        assert_eq!(spread(vec![1, 2], 1), vec![vec![1, 2]]);
    }

    fn tally(connected: u64, back: u64, resumed: u64, last_ms: u64) -> Tally {
        let mut latency = report::latency_histogram();
        for i in 1..=back {
            latency.record(i * 1000).unwrap();
        }
        Tally {
            clients: 10,
            connected,
            initial_failures: StageFailures::default(),
            back,
            resumed,
            reconnect_failures: StageFailures::default(),
            latency,
            last: Duration::from_millis(last_ms),
        }
    }

    fn measured() -> Measured {
        Measured {
            server: None,
            client_utilization: None,
            loadgen_cpus_busy: None,
            wall_secs: 0.5,
        }
    }

    #[test]
    fn all_back_is_ok_and_times_the_last() {
        let before = ListenCounters {
            overflows: 5,
            drops: 7,
        };
        let after = ListenCounters {
            overflows: 8,
            drops: 7,
        };
        let r = tally(10, 10, 4, 250).results(before, after, measured());
        assert!(r.ok && r.all_back);
        assert_eq!(r.recovery_secs, Some(0.25));
        assert_eq!((r.back, r.resumed, r.full), (10, 4, 6));
        assert_eq!(r.reconnect_latency.count, 10);
        assert_eq!((r.listen_overflows, r.listen_drops), (3, 0));
        assert_eq!(r.listen_scope, LISTEN_SCOPE);
    }

    #[test]
    fn missing_clients_or_failures_fail_the_run() {
        let c = ListenCounters::default();
        let r = tally(10, 9, 0, 250).results(c, c, measured());
        assert!(!r.ok && !r.all_back);
        assert_eq!(
            r.recovery_secs, None,
            "no recovery time without every client"
        );

        let r = tally(9, 9, 0, 250).results(c, c, measured());
        assert!(r.all_back && !r.ok, "a client never connected");

        let mut t = tally(10, 10, 0, 250);
        t.reconnect_failures.connect_failed = 1;
        assert!(
            !t.results(c, c, measured()).ok,
            "an attempt failed on the way"
        );

        // Counters that went backwards (a reset) read as no change.
        let before = ListenCounters {
            overflows: 9,
            drops: 9,
        };
        let r = tally(10, 10, 0, 1).results(before, c, measured());
        assert_eq!((r.listen_overflows, r.listen_drops), (0, 0));
    }
}
