//! `holdfast-bench fanout`: the cost and speed of a topic PUBLISH fanned out to many
//! clients.
//!
//! The bench process is the gateway's routing worker itself: it binds the worker socket
//! (`--worker-socket`) with the async worker SDK and accepts one link per gateway core.
//! It then opens `--subscribers` TLS clients (spread over loopback source addresses, as
//! `idle` does); each sends one DATA frame, so the worker learns the connection's id from
//! the FRAME event and SUBSCRIBEs it to the topic on the link of the connection's own
//! core. Probe publishes are repeated until one reaches every client (so every
//! subscription is applied), then `--publishes` PUBLISH envelopes are sent on one link,
//! one at a time (each after the previous one reached every client) or, with `--burst`,
//! all at once. For each publish it reports the time until the first and until the last
//! client received it, and overall deliveries per second (subscribers x publishes / time
//! from the first publish to the last delivery), with the gateway's CPU per delivery when
//! `--server-pids` is given.
//!
//! Delivery times are taken by the client tasks when they decode the frame, so on a
//! shared machine they include the load generator's own scheduling delay: the figures are
//! an upper bound for the gateway.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::Args;
use holdfast_wire::frame::FrameType;
use holdfast_wire::ConnId;
use holdfast_worker::async_link::{AsyncLink, AsyncWorkerListener};
use holdfast_worker::Event;
use rustls::ClientConfig;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep, timeout, Instant};

use crate::client;
use crate::cpu;
use crate::procfs;
use crate::report::{self, Machine, ServerCpu, Versions};
use crate::scenario::{self, Sources};
use crate::uring::{self, Engine, EngineConfig, Scenario, Tick};

/// Handshakes in flight at most while connecting.
const CONNECT_CONCURRENCY: usize = 256;
/// Descriptors kept free beside the clients (runtime, links, files).
const FD_HEADROOM: u64 = 200;
/// Probe publishes sent at most before giving up on the subscriptions.
const MAX_PROBES: u32 = 30;
/// How long one probe may take to reach everyone before the next is sent.
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// Payload kind bytes.
const KIND_PROBE: u8 = 1;
const KIND_MEASURE: u8 = 2;
/// Kind byte and a little-endian u32 publish index.
const TAG_LEN: usize = 5;

/// Arguments of `holdfast-bench fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Gateway address the clients connect to.
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: String,
    /// CA certificate (PEM) that signed the gateway's certificate.
    #[arg(long, value_name = "PEM")]
    pub ca: PathBuf,
    /// Worker socket to bind; the gateway's `--worker PATH`.
    #[arg(long, value_name = "PATH")]
    pub worker_socket: PathBuf,
    /// Subscribed clients.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub subscribers: u64,
    /// Measured publishes.
    #[arg(long, value_name = "M", default_value_t = 20)]
    pub publishes: u32,
    /// Payload bytes per publish (at least 5).
    #[arg(long, value_name = "S", default_value_t = 64)]
    pub size: usize,
    /// Topic the clients are subscribed to.
    #[arg(long, default_value = "fan")]
    pub topic: String,
    /// Send all publishes back to back instead of each after the previous reached all.
    #[arg(long)]
    pub burst: bool,
    /// Where to write the JSON report.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// TLS server name to send and verify.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub server_name: String,
    /// Source addresses (see `idle --sources`); default 127.0.0.2-127.0.0.254 on loopback.
    #[arg(long, value_name = "SPEC")]
    pub sources: Option<String>,
    /// Seconds to wait for the gateway's links (every core) after binding the socket.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub wait_gateway: f64,
    /// Seconds each client may take to connect and handshake.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub timeout: f64,
    /// Seconds one publish may take to reach every client.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub publish_timeout: f64,
    /// Server process ids whose CPU time is measured over the publishes, comma-separated
    /// (each with its descendants), for CPU per delivery.
    #[arg(long, value_name = "PID[,PID...]", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// CPU cores the server runs on: the divisor of the per-core figures.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub server_cores: u32,
    /// Name of the system measured, stored in the report.
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
}

/// The JSON report of `holdfast-bench fanout`.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Always "fanout".
    pub scenario: &'static str,
    /// `--label`.
    pub label: Option<String>,
    /// Parameters as given.
    pub parameters: FanoutParameters,
    /// The machine.
    pub machine: Machine,
    /// Software versions.
    pub versions: Versions,
    /// What was measured.
    pub results: FanoutResults,
    /// How the server CPU is measured.
    pub cpu_method: &'static str,
}

/// `fanout`'s parameters.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutParameters {
    pub target: String,
    pub subscribers: u64,
    pub publishes: u32,
    pub size: usize,
    pub topic: String,
    pub burst: bool,
    pub sources: Option<String>,
    pub source_count: usize,
    pub server_pids: Vec<u32>,
    pub server_cores: u32,
}

/// One measured publish.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PublishResult {
    /// Clients that received it.
    pub received: u64,
    /// From the worker queuing the PUBLISH (right before writing it to the link) to the
    /// first client's delivery.
    pub first_us: Option<u64>,
    /// From the same instant to the last (N-th) client's delivery; null when
    /// it did not reach every client in time.
    pub all_us: Option<u64>,
}

/// `fanout`'s results.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FanoutResults {
    /// Gateway cores linked (from their HELLO).
    pub gateway_cores: u32,
    /// Clients connected and subscribed.
    pub subscribers: u64,
    /// Clients that failed to connect.
    pub connect_failed: u64,
    /// Seconds to connect every client.
    pub connect_secs: f64,
    /// SUBSCRIBEs sent by the worker.
    pub subscribes_sent: u64,
    /// SUBSCRIBEs sent on a link other than the connection's own core's.
    pub subscribes_cross_core: u64,
    /// Probe publishes sent until one reached every client.
    pub probes: u32,
    /// Seconds from the last connection to a probe reaching every client.
    pub subscribe_secs: f64,
    /// Each measured publish, in order.
    pub per_publish: Vec<PublishResult>,
    /// Median over publishes of the time to reach every client.
    pub all_p50_us: Option<u64>,
    /// Largest time to reach every client.
    pub all_max_us: Option<u64>,
    /// Median over publishes of the time to the first delivery.
    pub first_p50_us: Option<u64>,
    /// Deliveries counted (measured publishes only).
    pub deliveries: u64,
    /// Seconds from the first measured publish to the last delivery.
    pub elapsed_secs: f64,
    /// `deliveries / elapsed_secs`.
    pub deliveries_per_sec: f64,
    /// The gateway's CPU over the measured publishes; ops are deliveries.
    pub server_cpu: Option<ServerCpu>,
    /// `server_cpu.us_per_op`: gateway CPU microseconds per delivery.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The load generator's CPU as a share of one core over the same window.
    pub client_utilization: Option<f64>,
    /// Clients whose connection ended or failed while subscribed.
    pub clients_lost: u64,
    /// Every publish reached every client and no client was lost.
    pub ok: bool,
}

/// The payload of publish `index` of `kind`, `size` bytes (at least [`TAG_LEN`]).
pub fn encode_payload(kind: u8, index: u32, size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size.max(TAG_LEN)];
    p[0] = kind;
    p[1..TAG_LEN].copy_from_slice(&index.to_le_bytes());
    for (i, b) in p[TAG_LEN..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    p
}

/// The kind and index of a publish's payload.
pub fn decode_payload(p: &[u8]) -> Option<(u8, u32)> {
    let tag = p.get(..TAG_LEN)?;
    Some((tag[0], u32::from_le_bytes(tag[1..].try_into().ok()?)))
}

/// Nearest-rank percentile (`q` in 0..=1) of `values`; None when empty.
pub fn percentile(values: &[u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// Deliveries per second: `deliveries` over `secs` (0 when no time passed).
pub fn per_sec(deliveries: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        deliveries as f64 / secs
    } else {
        0.0
    }
}

/// Deliveries of a set of publishes: how many clients got each, and when the first and
/// the `target`-th did.
struct Tally {
    counts: Vec<AtomicU64>,
    times: Mutex<Vec<(Option<Instant>, Option<Instant>)>>,
    target: AtomicU64,
    notify: Notify,
}

impl Tally {
    fn new(len: usize) -> Tally {
        Tally {
            counts: (0..len).map(|_| AtomicU64::new(0)).collect(),
            times: Mutex::new(vec![(None, None); len]),
            target: AtomicU64::new(u64::MAX),
            notify: Notify::new(),
        }
    }

    fn record(&self, index: u32, now: Instant) {
        let Some(count) = self.counts.get(index as usize) else {
            return;
        };
        let n = count.fetch_add(1, Ordering::AcqRel) + 1;
        if n == 1 || n == self.target.load(Ordering::Acquire) {
            let mut times = self.times.lock().expect("tally lock");
            let t = &mut times[index as usize];
            if n == 1 {
                t.0 = Some(now);
            }
            if n == self.target.load(Ordering::Acquire) {
                t.1 = Some(now);
                self.notify.notify_waiters();
            }
        }
    }

    fn count(&self, index: u32) -> u64 {
        self.counts[index as usize].load(Ordering::Acquire)
    }

    fn times(&self, index: u32) -> (Option<Instant>, Option<Instant>) {
        self.times.lock().expect("tally lock")[index as usize]
    }

    /// Waits until publish `index` reached the target, or `deadline`; true when it did.
    async fn wait_all(&self, index: u32, deadline: Instant) -> bool {
        loop {
            if self.times(index).1.is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // The short sleep covers a notification sent before this waiter registered.
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = sleep(Duration::from_millis(5)) => {}
            }
        }
    }
}

/// A message for one link's task.
enum LinkCmd {
    Subscribe(ConnId),
    Publish(Vec<Vec<u8>>),
}

/// What the worker side shares between its link tasks and the driver.
struct Worker {
    topic: Vec<u8>,
    links: Mutex<HashMap<u8, mpsc::UnboundedSender<LinkCmd>>>,
    cores: AtomicU32,
    subscribed: Mutex<HashSet<u64>>,
    subscribes: AtomicU64,
    cross_core: AtomicU64,
    /// Set when a publish's envelopes were written to the link.
    published: Mutex<Option<Instant>>,
    published_notify: Notify,
}

impl Worker {
    fn link(&self, core: u8) -> Option<mpsc::UnboundedSender<LinkCmd>> {
        self.links.lock().expect("links lock").get(&core).cloned()
    }

    fn linked(&self) -> (usize, u32) {
        (
            self.links.lock().expect("links lock").len(),
            self.cores.load(Ordering::Acquire),
        )
    }
}

/// Accepts links for as long as the runtime lives.
async fn accept_links(listener: AsyncWorkerListener, worker: Arc<Worker>) {
    loop {
        let mut link = match listener.accept().await {
            Ok(link) => link,
            Err(e) => {
                eprintln!("holdfast-bench: accepting a link: {e}");
                sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (core, cores) = match timeout(Duration::from_secs(5), link.hello()).await {
            Ok(Ok(h)) => (h.core, h.cores),
            Ok(Err(e)) => {
                eprintln!("holdfast-bench: link HELLO: {e}");
                continue;
            }
            Err(_) => {
                eprintln!("holdfast-bench: link HELLO timed out");
                continue;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        worker.cores.store(u32::from(cores), Ordering::Release);
        worker.links.lock().expect("links lock").insert(core, tx);
        tokio::spawn(serve_link(link, core, rx, worker.clone()));
    }
}

async fn serve_link(
    mut link: AsyncLink,
    core: u8,
    mut rx: mpsc::UnboundedReceiver<LinkCmd>,
    worker: Arc<Worker>,
) {
    loop {
        tokio::select! {
            event = link.recv() => {
                let event = match event {
                    Ok(Some(event)) => event,
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("holdfast-bench: link of core {core}: {e}");
                        break;
                    }
                };
                if let Event::Frame { conn, .. } = &event {
                    let fresh = worker.subscribed.lock().expect("subscribed lock").insert(conn.raw());
                    if fresh {
                        worker.subscribes.fetch_add(1, Ordering::Relaxed);
                        if conn.core() == core {
                            link.subscribe(*conn, &worker.topic);
                        } else if let Some(other) = worker.link(conn.core()) {
                            worker.cross_core.fetch_add(1, Ordering::Relaxed);
                            let _ = other.send(LinkCmd::Subscribe(*conn));
                        } else {
                            // No link to its core: any link reaches the owner.
                            worker.cross_core.fetch_add(1, Ordering::Relaxed);
                            link.subscribe(*conn, &worker.topic);
                        }
                    }
                }
                link.ack(event.link_seq());
            }
            cmd = rx.recv() => match cmd {
                Some(LinkCmd::Subscribe(conn)) => link.subscribe(conn, &worker.topic),
                Some(LinkCmd::Publish(payloads)) => {
                    // Send time is taken as the envelopes are handed to the socket.
                    let at = Instant::now();
                    for p in &payloads {
                        link.publish(&worker.topic, false, p);
                    }
                    *worker.published.lock().expect("published lock") = Some(at);
                    worker.published_notify.notify_waiters();
                    if let Err(e) = link.flush().await {
                        eprintln!("holdfast-bench: link of core {core}: {e}");
                        break;
                    }
                }
                None => break,
            }
        }
    }
    // Closing our receiver marks our sender closed; a newer link of the same core keeps
    // its entry.
    rx.close();
    let mut links = worker.links.lock().expect("links lock");
    if links.get(&core).is_some_and(|tx| tx.is_closed()) {
        links.remove(&core);
    }
}

/// Shared by the subscribers' ring thread and the driver.
struct Clients {
    /// Set by the driver when the run is over: the subscribers close and their thread ends.
    stop: AtomicBool,
    probes: Tally,
    measure: Tally,
    connected: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Clients {
    fn note_error(&self, e: String) {
        let mut errors = self.errors.lock().expect("errors lock");
        if errors.len() < 5 {
            errors.push(e);
        }
    }
}

/// The subscribing clients: all of them on one io_uring client ring, on a thread of its
/// own. Each connects (a bounded number at a time), sends its index in one DATA frame so
/// the worker learns its connection id, and from then on records every publish it
/// receives in the shared tallies, until `Clients::stop` is set.
struct Subscribers {
    config: Arc<ClientConfig>,
    sources: Vec<IpAddr>,
    total: u64,
    next: u64,
    connecting: usize,
    timeout: Duration,
    by_conn: HashMap<uring::ConnId, u64>,
    shared: Arc<Clients>,
}

impl Scenario for Subscribers {
    fn tick(&mut self, engine: &mut Engine, now: std::time::Instant) -> Tick {
        if self.shared.stop.load(Ordering::Acquire) {
            return Tick::Done;
        }
        while self.connecting < CONNECT_CONCURRENCY && self.next < self.total {
            let i = self.next;
            let source =
                (!self.sources.is_empty()).then(|| self.sources[i as usize % self.sources.len()]);
            let id = engine.connect(&self.config, source, now + self.timeout);
            self.by_conn.insert(id, i);
            self.next += 1;
            self.connecting += 1;
        }
        // Look at the stop flag now and then.
        Tick::At(now + Duration::from_millis(20))
    }

    fn event(
        &mut self,
        engine: &mut Engine,
        id: uring::ConnId,
        event: uring::Event,
        now: std::time::Instant,
    ) {
        let Some(&index) = self.by_conn.get(&id) else {
            return;
        };
        let shared = &self.shared;
        match event {
            uring::Event::Established(_) => {
                self.connecting -= 1;
                engine.set_deadline(id, None);
                if engine.send(id, FrameType::Data, &index.to_le_bytes()) {
                    shared.connected.fetch_add(1, Ordering::AcqRel);
                } else {
                    shared.failed.fetch_add(1, Ordering::AcqRel);
                    shared.note_error("first frame: the connection refused it".into());
                }
            }
            uring::Event::Failed(f) => {
                self.by_conn.remove(&id);
                self.connecting -= 1;
                shared.failed.fetch_add(1, Ordering::AcqRel);
                shared.note_error(f.to_string());
            }
            uring::Event::Data(p) => {
                let now = Instant::from_std(now);
                match decode_payload(&p) {
                    Some((KIND_PROBE, i)) => shared.probes.record(i, now),
                    Some((KIND_MEASURE, i)) => shared.measure.record(i, now),
                    _ => shared.note_error(format!("unexpected {}-byte frame", p.len())),
                }
            }
            uring::Event::Ended(why) => {
                self.by_conn.remove(&id);
                shared.lost.fetch_add(1, Ordering::AcqRel);
                shared.note_error(format!("connection ended: {why}"));
            }
        }
    }
}

/// Sends `payloads` as PUBLISHes on one link and returns when they were handed to it.
async fn publish(worker: &Worker, payloads: Vec<Vec<u8>>) -> anyhow::Result<Instant> {
    let core = {
        let links = worker.links.lock().expect("links lock");
        let Some(core) = links.keys().min().copied() else {
            bail!("no gateway link to publish on");
        };
        core
    };
    *worker.published.lock().expect("published lock") = None;
    let tx = worker.link(core).context("the publishing link went away")?;
    tx.send(LinkCmd::Publish(payloads))
        .ok()
        .context("the publishing link went away")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(at) = *worker.published.lock().expect("published lock") {
            return Ok(at);
        }
        ensure!(
            Instant::now() < deadline,
            "the link did not take the publish"
        );
        tokio::select! {
            _ = worker.published_notify.notified() => {}
            _ = sleep(Duration::from_millis(1)) => {}
        }
    }
}

/// Runs the fan-out benchmark; non-zero exit when a publish missed a client.
pub fn run(args: FanoutArgs) -> anyhow::Result<ExitCode> {
    ensure!(args.subscribers >= 1, "--subscribers must be at least 1");
    ensure!(args.publishes >= 1, "--publishes must be at least 1");
    ensure!(
        args.size >= TAG_LEN,
        "--size must be at least {TAG_LEN} (kind and index)"
    );
    scenario::ensure_positive("--wait-gateway", args.wait_gateway)?;
    scenario::ensure_positive("--timeout", args.timeout)?;
    scenario::ensure_positive("--publish-timeout", args.publish_timeout)?;
    ensure!(args.server_cores >= 1, "--server-cores must be at least 1");
    let (_, hard) = crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    ensure!(
        args.subscribers + FD_HEADROOM <= hard,
        "{} clients need about {} descriptors, over the open-file limit of {hard}",
        args.subscribers,
        args.subscribers + FD_HEADROOM
    );
    let target = client::resolve(&args.target)?;
    let sources = Sources::resolve(args.sources.as_deref(), target)?;
    let config = client::client_config(&args.ca)?;
    scenario::check_server_pids(&args.server_pids)?;
    let rt = scenario::runtime()?;
    let results = rt.block_on(bench(&args, config, target, sources.addrs.clone()));
    rt.shutdown_timeout(Duration::from_secs(5));
    let results = results?;

    let report = FanoutReport {
        scenario: "fanout",
        label: args.label.clone(),
        parameters: FanoutParameters {
            target: args.target.clone(),
            subscribers: args.subscribers,
            publishes: args.publishes,
            size: args.size,
            topic: args.topic.clone(),
            burst: args.burst,
            sources: sources.spec,
            source_count: sources.addrs.len(),
            server_pids: args.server_pids.clone(),
            server_cores: args.server_cores,
        },
        machine: procfs::machine(),
        versions: Versions::current(),
        results,
        cpu_method: report::CPU_METHOD,
    };
    if let Some(path) = &args.json {
        scenario::write_json(path, &report)?;
    }
    summarize(&report);
    Ok(scenario::exit_code(report.results.ok))
}

async fn bench(
    args: &FanoutArgs,
    config: Arc<ClientConfig>,
    target: SocketAddr,
    addrs: Vec<IpAddr>,
) -> anyhow::Result<FanoutResults> {
    let listener = AsyncWorkerListener::bind(&args.worker_socket)
        .with_context(|| format!("binding {}", args.worker_socket.display()))?
        .with_name("holdfast-bench-fanout");
    let worker = Arc::new(Worker {
        topic: args.topic.as_bytes().to_vec(),
        links: Mutex::default(),
        cores: AtomicU32::new(0),
        subscribed: Mutex::default(),
        subscribes: AtomicU64::new(0),
        cross_core: AtomicU64::new(0),
        published: Mutex::new(None),
        published_notify: Notify::new(),
    });
    eprintln!(
        "fanout: worker socket {} bound; waiting for the gateway's links",
        args.worker_socket.display()
    );
    tokio::spawn(accept_links(listener, worker.clone()));
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait_gateway);
    loop {
        let (have, want) = worker.linked();
        if want > 0 && have >= want as usize {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {have} of {want} gateway links after {} s",
            args.wait_gateway
        );
        sleep(Duration::from_millis(50)).await;
    }
    let mut results = FanoutResults {
        gateway_cores: worker.linked().1,
        ..FanoutResults::default()
    };
    eprintln!(
        "fanout: {} gateway link(s); connecting {} clients",
        results.gateway_cores, args.subscribers
    );

    // Connect and say hello once each.
    let shared = Arc::new(Clients {
        stop: AtomicBool::new(false),
        probes: Tally::new(MAX_PROBES as usize),
        measure: Tally::new(args.publishes as usize),
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        errors: Mutex::default(),
    });
    let connect_timeout = Duration::from_secs_f64(args.timeout);
    let started = Instant::now();
    let subscribers = Subscribers {
        config,
        sources: addrs,
        total: args.subscribers,
        next: 0,
        connecting: 0,
        timeout: connect_timeout,
        by_conn: HashMap::new(),
        shared: shared.clone(),
    };
    let (target, server_name) = (target, args.server_name.clone());
    let ring_thread = std::thread::Builder::new()
        .name("subscribers".into())
        .spawn(move || -> anyhow::Result<()> {
            let mut subscribers = subscribers;
            let mut engine = Engine::new(target, &server_name, EngineConfig::default())?;
            engine
                .run(&mut subscribers, Duration::from_secs(2))
                .context("driving the subscribers' ring")
        })
        .context("starting the subscribers' thread")?;
    let measured = measure(
        args,
        &worker,
        &shared,
        &mut results,
        started,
        connect_timeout,
    )
    .await;
    shared.stop.store(true, Ordering::Release);
    let ring = ring_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the subscribers' thread panicked"))?;
    measured?;
    ring?;
    Ok(results)
}

/// Everything after the links are up: waits for the subscribers, probes until every
/// subscription is applied, then publishes and times the deliveries into `results`.
async fn measure(
    args: &FanoutArgs,
    worker: &Worker,
    shared: &Clients,
    results: &mut FanoutResults,
    started: Instant,
    connect_timeout: Duration,
) -> anyhow::Result<()> {
    // Every attempt ends within its own timeout; the batches run 256 at a time.
    let batches = args.subscribers.div_ceil(CONNECT_CONCURRENCY as u64) as u32;
    let connect_deadline = started + connect_timeout * batches.max(1) + Duration::from_secs(5);
    loop {
        let done = shared.connected.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire);
        if done >= args.subscribers || Instant::now() >= connect_deadline {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    results.connect_secs = started.elapsed().as_secs_f64();
    results.subscribers = shared.connected.load(Ordering::Acquire);
    results.connect_failed = args.subscribers - results.subscribers;
    eprintln!(
        "fanout: {} connected, {} failed in {:.1} s",
        results.subscribers, results.connect_failed, results.connect_secs
    );
    ensure!(
        results.subscribers > 0,
        "no client connected: {:?}",
        shared.errors.lock().expect("errors lock")
    );
    let n = results.subscribers;
    shared.probes.target.store(n, Ordering::Release);
    shared.measure.target.store(n, Ordering::Release);

    // Probe until one publish reaches every client: every subscription is then applied.
    let subscribing = Instant::now();
    let mut applied = false;
    for k in 0..MAX_PROBES {
        publish(worker, vec![encode_payload(KIND_PROBE, k, args.size)]).await?;
        results.probes = k + 1;
        if shared.probes.wait_all(k, Instant::now() + PROBE_WAIT).await {
            applied = true;
            break;
        }
    }
    results.subscribe_secs = subscribing.elapsed().as_secs_f64();
    results.subscribes_sent = worker.subscribes.load(Ordering::Relaxed);
    results.subscribes_cross_core = worker.cross_core.load(Ordering::Relaxed);
    ensure!(
        applied,
        "after {MAX_PROBES} probes the best reached {} of {n} clients ({} SUBSCRIBEs sent)",
        (0..results.probes)
            .map(|k| shared.probes.count(k))
            .max()
            .unwrap_or(0),
        results.subscribes_sent
    );
    eprintln!(
        "fanout: {n} subscribed ({} probe(s), {:.2} s); publishing {}",
        results.probes, results.subscribe_secs, args.publishes
    );

    // The measured publishes.
    let window = cpu::Window::start(&args.server_pids, args.server_cores)?;
    let publish_timeout = Duration::from_secs_f64(args.publish_timeout);
    let mut sent_at = Vec::with_capacity(args.publishes as usize);
    if args.burst {
        let payloads = (0..args.publishes)
            .map(|m| encode_payload(KIND_MEASURE, m, args.size))
            .collect();
        let at = publish(worker, payloads).await?;
        sent_at.resize(args.publishes as usize, at);
        let deadline = Instant::now() + publish_timeout * args.publishes;
        for m in 0..args.publishes {
            shared.measure.wait_all(m, deadline).await;
        }
    } else {
        for m in 0..args.publishes {
            let at = publish(worker, vec![encode_payload(KIND_MEASURE, m, args.size)]).await?;
            sent_at.push(at);
            if !shared
                .measure
                .wait_all(m, Instant::now() + publish_timeout)
                .await
            {
                eprintln!("holdfast-bench: publish {m} did not reach every client");
            }
        }
    }
    let first_sent = sent_at[0];
    let mut last_delivery = first_sent;
    let us = |d: Duration| d.as_micros() as u64;
    for (m, at) in sent_at.iter().enumerate() {
        let (first, all) = shared.measure.times(m as u32);
        let received = shared.measure.count(m as u32);
        results.deliveries += received.min(n);
        if let Some(t) = all.or(first) {
            last_delivery = last_delivery.max(t);
        }
        results.per_publish.push(PublishResult {
            received,
            first_us: first.map(|t| us(t - *at)),
            all_us: all.map(|t| us(t - *at)),
        });
    }
    let measured = window.finish(results.deliveries);
    results.elapsed_secs = (last_delivery - first_sent).as_secs_f64();
    results.deliveries_per_sec = per_sec(results.deliveries, results.elapsed_secs);
    let alls: Vec<u64> = results
        .per_publish
        .iter()
        .filter_map(|p| p.all_us)
        .collect();
    let firsts: Vec<u64> = results
        .per_publish
        .iter()
        .filter_map(|p| p.first_us)
        .collect();
    results.all_p50_us = percentile(&alls, 0.5);
    results.all_max_us = alls.iter().copied().max();
    results.first_p50_us = percentile(&firsts, 0.5);
    results.server_cpu_us_per_delivery = measured.server.as_ref().and_then(|c| c.us_per_op);
    results.server_cpu = measured.server;
    results.client_utilization = measured.client_utilization;
    results.clients_lost = shared.lost.load(Ordering::Acquire);
    results.ok = alls.len() == args.publishes as usize && results.clients_lost == 0;
    for e in shared.errors.lock().expect("errors lock").iter() {
        eprintln!("holdfast-bench: {e}");
    }
    Ok(())
}

fn summarize(report: &FanoutReport) {
    let r = &report.results;
    let p = &report.parameters;
    let ms = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.2} ms", v as f64 / 1000.0));
    println!(
        "fanout: {} subscribers ({} failed) on {} gateway core(s), {} publish(es) of {} bytes{}",
        r.subscribers,
        r.connect_failed,
        r.gateway_cores,
        p.publishes,
        p.size,
        if p.burst {
            ", burst"
        } else {
            ", one at a time"
        }
    );
    println!(
        "  connect {:.1} s, subscriptions applied after {:.2} s ({} probe(s), {} SUBSCRIBEs, {} cross-core)",
        r.connect_secs, r.subscribe_secs, r.probes, r.subscribes_sent, r.subscribes_cross_core
    );
    println!(
        "  to all {}: p50 {}, max {}; first delivery p50 {}",
        r.subscribers,
        ms(r.all_p50_us),
        ms(r.all_max_us),
        ms(r.first_p50_us)
    );
    println!(
        "  {} deliveries in {:.3} s: {:.0} deliveries/s",
        r.deliveries, r.elapsed_secs, r.deliveries_per_sec
    );
    if let Some(c) = &r.server_cpu {
        let per_delivery = match (c.us_per_op, c.user_us_per_op, c.kernel_us_per_op) {
            (Some(t), Some(u), Some(k)) => format!("{t:.2} µs ({u:.2} µs user, {k:.2} µs kernel)"),
            _ => "-".into(),
        };
        println!(
            "  gateway CPU {:.3} s ({:.0}% of {} core(s)): {per_delivery} per delivery",
            c.cpu_secs,
            c.utilization * 100.0,
            c.cores,
        );
    }
    if let Some(u) = r.client_utilization {
        println!("  load generator CPU {:.0}% of one core", u * 100.0);
    }
    if !r.ok {
        println!(
            "  NOT OK: {} client(s) lost, some publish missed a client",
            r.clients_lost
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let p = encode_payload(KIND_MEASURE, 0x0102_0304, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(decode_payload(&p), Some((KIND_MEASURE, 0x0102_0304)));
        assert_eq!(encode_payload(KIND_PROBE, 7, 0).len(), TAG_LEN);
        assert_eq!(decode_payload(&[1, 2, 3]), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[5], 0.5), Some(5));
        assert_eq!(percentile(&[4, 1, 3, 2], 0.5), Some(2));
        assert_eq!(percentile(&[4, 1, 3, 2], 1.0), Some(4));
        assert_eq!(percentile(&[4, 1, 3, 2], 0.0), Some(1));
        assert_eq!(percentile(&[10, 20, 30, 40, 50], 0.5), Some(30));
    }

    #[test]
    fn deliveries_per_second() {
        assert_eq!(per_sec(200_000, 2.0), 100_000.0);
        assert_eq!(per_sec(10, 0.0), 0.0);
    }
}
