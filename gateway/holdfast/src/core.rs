//! The per-core event loop: one thread, one io_uring ring, one SO_REUSEPORT listener, a
//! slice of the connection table, a timing wheel, a link to every worker, its own counters.
//! Nothing here is shared with another core.
//!
//! Lifetimes of memory named by submissions (the `unsafe` in this module is all about this):
//! - receive buffers belong to the [`BufRing`] (see `ring.rs`);
//! - a connection's outbound bytes in flight are owned by its [`SocketOps`], which hands
//!   out their address for one send and keeps them frozen until that send completes; the
//!   `Conn` is freed only after the Close completion, which `SocketOps` allows only when no
//!   receive or send is in flight;
//! - a link's `rbuf` and `out` are likewise frozen while its receive or send is in flight,
//!   and the link's socket is closed only when neither is.
//!
//! The protocol of a connection (TLS, frames, WebSocket, timeouts, closing) is its
//! [`Session`], which does no I/O: this module feeds it completions and ticks, and after
//! each input reads what it asks for (`Core::drive`): events for the worker link, bytes to
//! send, its next deadline, and whether to close.
//!
//! The connection slot is the direct-descriptor slot the kernel picked at accept (or the
//! fd number in the regular-fd fallback), so a connection needs no separate index.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use holdfast_wire::envelope::{self, Message, Role};
use holdfast_wire::frame;
use holdfast_wire::proxy;
use holdfast_wire::ConnId;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, info, warn};

use crate::admission::{Admission, IpKey, Next, ProcessCap};
use crate::config::{Config, Network};
use crate::handover::{self, Put, Reader};
use crate::inflight::{CloseStep, SocketOps};
use crate::link::{Link, LinkState};
use crate::metrics::{CloseReason, CoreMetrics};
use crate::peer::Peer;
use crate::ring::{build_ring, AcceptAddrs, BufRing, RingFeatures};
use crate::route;
use crate::session::{CloseCause, Deadline, Event, Session, SessionConfig, Turn};
use crate::tls::TlsSession;
use crate::upgrade;
use crate::wheel::TimerWheel;
use std::net::SocketAddr;

/// What a core thread is started with.
pub struct CoreSpec {
    pub index: u8,
    pub cores: u8,
    pub config: Arc<Config>,
    pub tls: Arc<rustls::ServerConfig>,
    /// The SO_REUSEPORT listener; None when `adopt` brings the old process's.
    pub listener: Option<socket2::Socket>,
    /// Live upgrade: this core's socket to the old process's core of the same index,
    /// whose listener and connections it takes over before it runs (`Core::adopt`).
    pub adopt: Option<OwnedFd>,
    pub metrics: Arc<CoreMetrics>,
    pub shutdown: Arc<AtomicBool>,
    /// The soft open-file limit, which bounds the fixed-file table.
    pub nofile: u64,
    /// Cross-core mail: a sender to every core's inbox (indexed by core) and this core's
    /// inbox, plus every core's ring fd (published at start) for MSG_RING wake-ups.
    pub mail: Vec<mpsc::Sender<Mail>>,
    pub inbox: mpsc::Receiver<Mail>,
    pub ring_fds: Arc<Vec<std::sync::atomic::AtomicI32>>,
    /// Connections held by the whole process (`limits.max_conns`), shared by the cores.
    pub process_conns: ProcessCap,
}

/// What arrives in a core's inbox, each followed by a MSG_RING wake-up of its ring.
pub enum Mail {
    /// From another core: a worker message for a connection this core owns.
    Cross(CrossMsg),
    /// From the control thread (SIGHUP): the configuration from now on.
    Reload(Reload),
    /// From the control thread (live upgrade, the new process said READY): hand the
    /// listener and every connection over on this socket.
    Handover(OwnedFd),
    /// From the control thread: the new process has taken over; close the worker links
    /// (passing on what still arrives on them) and exit once the last closing connection
    /// is gone.
    Release,
}

/// A reloaded configuration for one core. The core swaps it in between two completions:
/// the TLS configuration serves handshakes that start afterwards (a session keeps the
/// `Arc` it was created with); the limits apply to every connection from their next check.
pub struct Reload {
    /// The running configuration with the reloadable settings replaced; what was sized
    /// at start (`Config::reload`) is unchanged.
    pub config: Arc<Config>,
    pub tls: Arc<rustls::ServerConfig>,
    /// Receives the core's index once it runs with the new configuration.
    pub applied: mpsc::Sender<u8>,
}

/// A worker message for a connection that another core owns. Rare (a worker replies on the
/// link the frame came from), so it may allocate.
pub struct CrossMsg {
    /// The worker it came from, so an unknown connection is answered on our link to it.
    pub worker: u8,
    pub conn: ConnId,
    pub kind: CrossKind,
    pub flags: u8,
    /// SEND/PUBLISH payload, CLOSE reason, SUBSCRIBE/UNSUBSCRIBE topic.
    pub data: Vec<u8>,
    /// PUBLISH topic.
    pub topic: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossKind {
    Send,
    Close(u16),
    Subscribe,
    Unsubscribe,
    /// Deliver to this core's subscribers of `topic` (the sender delivered to its own).
    Publish,
}

/// Reported by each core once it accepts.
pub struct CoreReady {
    /// The address its listener is bound to.
    pub listen: Option<SocketAddr>,
    pub features: RingFeatures,
    pub direct: bool,
    pub table: u32,
}

// user_data layout: op (8 bits) | generation or link epoch (24 bits) | slot or link (32 bits)
/// Completions one wait asks for when batching (`runtime.batch_wait_us`): the kernel
/// wakes the core when this many are there, or `batch_wait_us` after the first.
const BATCH_COMPLETIONS: usize = 64;

/// Accepts each core keeps armed on its listener, each with its own address buffer
/// (`AcceptAddrs`): the peer address comes with the accepted socket. io_uring wakes one
/// waiting accept per arriving connection (its poll is exclusive), so keeping several
/// armed costs no thundering herd, and a burst is taken several per pass.
const ACCEPTS: usize = 16;
// `Core::accepts_armed` has a bit per accept.
const _: () = assert!(ACCEPTS <= 32);

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_SHUTDOWN: u64 = 4;
const OP_CLOSE: u64 = 5;
// 6 was the peer-address FixedFdInstall, before accepts carried the address.
const OP_LINK_RECV: u64 = 7;
const OP_LINK_SEND: u64 = 8;
const OP_CANCEL: u64 = 9;
const OP_WAKE: u64 = 10;
/// A live upgrade's FixedFdInstall of a connection being handed over.
const OP_EXPORT: u64 = 11;
/// A receive on the upgrade socket from the old process (its late worker messages).
const OP_UPGRADE_RECV: u64 = 12;

fn ud(op: u64, gen: u32, slot: u32) -> u64 {
    (op << 56) | ((gen as u64 & 0xff_ffff) << 32) | slot as u64
}

fn ud_parts(ud: u64) -> (u64, u32, u32) {
    (ud >> 56, ((ud >> 32) & 0xff_ffff) as u32, ud as u32)
}

/// Build an entry on a client socket, as a direct descriptor or a regular fd.
macro_rules! on_socket {
    ($direct:expr, $slot:expr, |$fd:ident| $build:expr) => {
        if $direct {
            let $fd = types::Fixed($slot);
            $build
        } else {
            let $fd = types::Fd($slot as i32);
            $build
        }
    };
}

/// One client connection: its protocol ([`Session`]), what the kernel holds of it
/// ([`SocketOps`]), and what the core's worker links need to know about it.
struct Conn {
    gen: u32,
    session: Session,
    sock: SocketOps,
    /// Queued in `Core::dirty` for a send at the next flush.
    dirty: bool,
    /// The worker that was sent OPEN for this connection, if any.
    worker: Option<u8>,
    /// Per-connection sequence of frames sent to the worker (OPEN is 0).
    seq: u64,
    /// Milliseconds since core start at accept, for the handshake-duration histogram.
    born_ms: u32,
    /// Counted in the hibernated gauge.
    asleep: bool,
    peer: Peer,
    /// What admission counted for this connection (`ADMIT_*`), released when it is freed.
    admit: u8,
    /// The PROXY protocol phase, before any byte reaches the session.
    pre: Pre,
    /// Outbound bytes (session queue + send in flight) as of its last `drive`, counted in
    /// `Core::outbound` for the per-core budget.
    outq: u32,
    /// Being handed over (live upgrade): no receive is re-armed and no send started.
    leaving: bool,
}

/// Where a connection is with the PROXY protocol (`proxy_protocol.trusted_networks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pre {
    /// Its bytes go to the session.
    Done,
    /// An untrusted peer while PROXY is on: its first byte must not start a PROXY header.
    Sniff,
    /// A trusted proxy: its bytes start with a PROXY header; a header split across
    /// receives is staged in `Core::proxy_staged` (rare, so no connection carries a
    /// buffer for it).
    Header,
}

/// What the PROXY phase made of one receive.
enum PreStep {
    /// The header is not complete yet; everything was staged.
    More,
    /// Skip this many bytes (the header's rest); the proxied client, if it names one.
    Pass {
        skip: usize,
        client: Option<SocketAddr>,
    },
    Refuse(CloseReason),
}

/// Larger PROXY headers (v2 with big TLVs) are refused rather than staged.
const MAX_PROXY_HEADER: usize = 4096;

/// Strips the PROXY header at the start of a connection's bytes (see [`Pre`]).
fn strip_proxy(pre: &mut Pre, staging: &mut Option<Vec<u8>>, bytes: &[u8]) -> PreStep {
    match std::mem::replace(pre, Pre::Done) {
        Pre::Done => PreStep::Pass {
            skip: 0,
            client: None,
        },
        // A TLS record starts with 0x16, a PROXY header with 'P' (v1) or '\r' (v2).
        Pre::Sniff if matches!(bytes.first(), Some(b'P' | b'\r')) => {
            PreStep::Refuse(CloseReason::ProxyUntrusted)
        }
        Pre::Sniff => PreStep::Pass {
            skip: 0,
            client: None,
        },
        Pre::Header => {
            let mut staged = staging.take().unwrap_or_default();
            let before = staged.len();
            let decoded = if before == 0 {
                proxy::decode(bytes)
            } else {
                staged.extend_from_slice(bytes);
                proxy::decode(&staged)
            };
            match decoded {
                Ok(Some(h)) => PreStep::Pass {
                    skip: h.len.saturating_sub(before),
                    client: h.addrs.map(|(src, _)| src),
                },
                Ok(None) if before + bytes.len() < MAX_PROXY_HEADER => {
                    if before == 0 {
                        staged.extend_from_slice(bytes);
                    }
                    *pre = Pre::Header;
                    *staging = Some(staged);
                    PreStep::More
                }
                Ok(None) | Err(_) => PreStep::Refuse(CloseReason::ProxyError),
            }
        }
    }
}

// `Conn::admit` bits: a place under `limits.max_conns`, one under its source's cap, a
// handshake slot (until the handshake ends).
const ADMIT_PROCESS: u8 = 1;
const ADMIT_IP: u8 = 2;
const ADMIT_HANDSHAKE: u8 = 4;

// How often closed connections are pruned from topics nobody publishes to.
const TOPIC_SWEEP_SECS: u64 = 60;
// How long a starting core waits for connected workers' HELLOs before it accepts clients.
const STARTUP_HELLO_WAIT: Duration = Duration::from_secs(2);

pub struct Core {
    // Field order matters: the ring is dropped before the buffer ring it reads from.
    ring: IoUring,
    bufs: BufRing,
    idx: u8,
    cores: u8,
    cfg: Arc<Config>,
    tls: Arc<rustls::ServerConfig>,
    metrics: Arc<CoreMetrics>,
    shutdown: Arc<AtomicBool>,
    listener: Option<socket2::Socket>,
    direct: bool,
    /// The kernel can batch wake-ups (IORING_FEAT_MIN_TIMEOUT, `runtime.batch_wait_us`).
    min_timeout: bool,
    /// Which of the `ACCEPTS` accepts are in flight (bit i: buffer i of `accept_addrs`).
    accepts_armed: u32,
    accept_addrs: AcceptAddrs,
    table_full: bool,
    conns: Vec<Option<Box<Conn>>>,
    gens: Vec<u32>,
    open: u64,
    /// Connections hibernated now (the gauge).
    hibernated: u64,
    wheel: TimerWheel,
    start: Instant,
    /// The clock as of the last wake-up, and milliseconds since `start` then: read once per
    /// loop pass, not per completion.
    now: Instant,
    now_ms: u64,
    links: Vec<Link>,
    live_mask: u64,
    rearm: Vec<u32>,
    dirty: Vec<u32>,
    expired: Vec<u32>,
    cqes: Vec<(u64, i32, u32)>,
    /// The sessions' scratch space and event queue, shared by every connection.
    turn: Turn,
    scfg: SessionConfig,
    drain_deadline: Option<Instant>,
    /// Drain progress: connections open when it began, how many were told, where the
    /// walk over the table is, and when it began.
    drain_total: u64,
    drain_told: u64,
    drain_cursor: usize,
    drain_started: Instant,
    /// Submissions pushed since the last metrics publish (kept local: one add per pass).
    submissions: u64,
    /// Back-pressure: a worker link is full, so receives are not re-armed and receive
    /// buffers are withheld from the kernel until the links drain below half a window.
    paused: bool,
    withheld: Vec<u16>,
    /// Unacknowledged envelopes of a dead link that no live worker could take yet.
    orphans: Vec<u8>,
    mail: Vec<mpsc::Sender<Mail>>,
    inbox: mpsc::Receiver<Mail>,
    ring_fds: Arc<Vec<std::sync::atomic::AtomicI32>>,
    /// This core's topic subscriptions: topic -> its subscribers among this core's
    /// connections (raw connection ids; closed ones are pruned lazily).
    topics: HashMap<Box<[u8]>, HashSet<u64>>,
    last_sweep: u64,
    /// Which new connections start a handshake, wait for one, or are refused.
    admission: Admission,
    process_conns: ProcessCap,
    /// `proxy_protocol.trusted_networks`, parsed.
    proxies: Vec<Network>,
    /// PROXY headers split across receives, by slot, until complete.
    proxy_staged: HashMap<u32, Vec<u8>>,
    /// Outbound bytes queued by every connection of the core (`limits.outbound_budget_per_core`).
    outbound: u64,
    /// Scratch for the budget's candidates: (bytes, slot).
    heaviest: Vec<(u32, u32)>,
    /// When this core started (for the start-up wait for worker HELLOs; `start` is the
    /// clock's origin, which an adopting core sets to the old core's).
    started: Instant,
    /// Live upgrade, old side: the hand-over in progress.
    up: Option<Box<Outgoing>>,
    /// Live upgrade, new side: the socket the old core passes late worker messages on.
    incoming: Option<Box<Incoming>>,
    /// Adopted connections not reading yet (they start once the worker links greet).
    adopted: Vec<u32>,
}

/// Where a hand-over stands on the old core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Stopping reads and sends, finishing handshakes, waiting for worker ACKs.
    Quiescing,
    /// Sending connections in batches.
    Exporting,
    /// Everything is sent; worker messages still arriving are passed on.
    Forwarding,
    /// The new process took over: closing the worker links.
    Releasing,
    Done,
}

/// The old core's side of a live upgrade.
struct Outgoing {
    sock: OwnedFd,
    stage: Stage,
    begun: Instant,
    /// Handshakes still running then are closed (`upgrade`); unacknowledged frames of
    /// live links are handed over then rather than waited for.
    handshake_deadline: Instant,
    ack_deadline: Instant,
    release_deadline: Instant,
    /// Next slot to look at for the next batch.
    cursor: usize,
    /// The batch being installed as regular fds: (slot, generation, fd once installed).
    batch: Vec<(u32, u32, Option<OwnedFd>)>,
    pending: usize,
    moved: u64,
    logged_send_error: bool,
}

/// The new core's side of a live upgrade, once its connections are in.
struct Incoming {
    reader: crate::upgrade::FrameReader,
    buf: Vec<u8>,
    armed: bool,
    /// The old process's worker indices, as this process's (None: not configured here).
    workers: Vec<Option<u8>>,
    /// Late worker messages that arrived with the connections, handled once the links
    /// greet.
    late: Vec<Vec<u8>>,
}

// How long a hand-over lets handshakes finish and waits for worker ACKs, and how long
// closing the worker links may take once the new process has taken over.
const HANDOVER_HANDSHAKE_WAIT: Duration = Duration::from_secs(2);
const HANDOVER_ACK_WAIT: Duration = Duration::from_secs(2);
const HANDOVER_RELEASE_WAIT: Duration = Duration::from_secs(5);
// How long an adopting core waits for the next frame of the old core's stream.
const ADOPT_FRAME_WAIT: Duration = Duration::from_secs(30);
/// `LATE` flag: a PUBLISH another old core already delivered to its own subscribers.
const LATE_PUBLISH_HERE: u8 = 1;

impl Core {
    /// Sets up the ring (on the calling thread), the tables and the buffer ring.
    pub fn new(spec: CoreSpec) -> anyhow::Result<(Core, CoreReady)> {
        let cfg = spec.config.clone();
        let (ring, features) = build_ring(cfg.runtime.ring_entries)?;
        // The fixed-file table of a ring is bounded by the soft RLIMIT_NOFILE, per ring and
        // apart from the regular fd table (where listeners, links and the admin port live),
        // so it can take the whole limit.
        let limit = spec.nofile.clamp(16, u32::MAX as u64) as u32;
        let mut table = cfg.limits.max_conns_per_core.min(limit);
        let mut direct = false;
        if cfg.runtime.direct_descriptors {
            match ring.submitter().register_files_sparse(table) {
                Ok(()) => direct = true,
                Err(e) => {
                    // One line for the whole process, not one per core.
                    static LOGGED: std::sync::Once = std::sync::Once::new();
                    LOGGED.call_once(|| {
                        warn!(
                            "direct descriptors unavailable ({e}); client sockets use regular fds"
                        )
                    });
                }
            }
        }
        if !direct {
            // Regular fds are indexed by number, which can reach the limit itself.
            table = spec.nofile.min(u32::MAX as u64) as u32;
        }
        let bufs = BufRing::new(
            &ring.submitter(),
            0,
            cfg.runtime.recv_buffers as u16,
            cfg.runtime.recv_buffer_size,
        )?;
        let links = cfg.workers.iter().map(|p| Link::new(p.clone())).collect();
        spec.ring_fds[spec.index as usize].store(ring.as_raw_fd(), Ordering::Release);
        let mut conns = Vec::new();
        conns.resize_with(table as usize, || None);
        let core = Core {
            ring,
            bufs,
            idx: spec.index,
            cores: spec.cores,
            tls: spec.tls,
            metrics: spec.metrics,
            shutdown: spec.shutdown,
            listener: spec.listener,
            direct,
            min_timeout: features.min_timeout,
            accepts_armed: 0,
            accept_addrs: AcceptAddrs::new(ACCEPTS),
            table_full: false,
            conns,
            gens: vec![0; table as usize],
            open: 0,
            hibernated: 0,
            wheel: TimerWheel::new(table, 1024),
            start: Instant::now(),
            now: Instant::now(),
            now_ms: 0,
            links,
            live_mask: 0,
            rearm: Vec::new(),
            dirty: Vec::new(),
            expired: Vec::new(),
            cqes: Vec::with_capacity(1024),
            turn: Turn::new(),
            scfg: SessionConfig::new(&cfg),
            drain_deadline: None,
            drain_total: 0,
            drain_told: 0,
            drain_cursor: 0,
            drain_started: Instant::now(),
            submissions: 0,
            paused: false,
            withheld: Vec::new(),
            orphans: Vec::new(),
            mail: spec.mail,
            inbox: spec.inbox,
            ring_fds: spec.ring_fds,
            topics: HashMap::new(),
            last_sweep: 0,
            admission: Admission::new(),
            process_conns: spec.process_conns,
            proxies: cfg.trusted_proxies().unwrap_or_default(),
            proxy_staged: HashMap::new(),
            outbound: 0,
            heaviest: Vec::new(),
            started: Instant::now(),
            up: None,
            incoming: None,
            adopted: Vec::new(),
            cfg,
        };
        let mut core = core;
        if let Some(sock) = spec.adopt {
            if !direct {
                anyhow::bail!("a live upgrade needs direct descriptors (runtime.direct_descriptors and a kernel with them)");
            }
            core.adopt(sock)?;
        }
        let listen = core
            .listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .and_then(|a| a.as_socket());
        Ok((
            core,
            CoreReady {
                listen,
                features,
                direct,
                table,
            },
        ))
    }

    /// Seconds since the core started, as of the last wake-up (one clock read per pass).
    fn tick(&self) -> u64 {
        self.now_ms / 1000
    }

    /// Queues a submission, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every buffer, iovec or fd the entry names must stay valid until its completion
    /// (see the module docs for how each caller guarantees it).
    unsafe fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.submissions += 1;
                return;
            }
            if let Err(err) = self.ring.submit() {
                if err.raw_os_error() != Some(libc::EBUSY) {
                    warn!(core = self.idx, "io_uring submit failed: {err}");
                }
                self.reap();
            }
        }
    }

    /// Runs until drained. Returns when SIGTERM's grace period ends or every client is gone.
    pub fn run(mut self) -> anyhow::Result<()> {
        let result = self.event_loop();
        // Nobody may wake this ring once it is closed (its fd number could be reused).
        self.ring_fds[self.idx as usize].store(-1, Ordering::Release);
        result
    }

    fn event_loop(&mut self) -> anyhow::Result<()> {
        // Dial the workers before accepting, so accept can wait for their HELLOs.
        for w in 0..self.links.len() {
            self.try_connect(w);
        }
        self.arm_accept();
        let mut ts = types::Timespec::new();
        let mut busy_since = Instant::now();
        self.metrics
            .conn_table_capacity
            .store(self.conns.len() as u64, Ordering::Relaxed);
        loop {
            self.flush();
            let wait_ms = if self.drain_deadline.is_some() || self.up.is_some() {
                20
            } else {
                100
            };
            ts = ts.sec(0).nsec(wait_ms * 1_000_000);
            // Completion batching: ask for many completions, and let the kernel wake us
            // `batch_wait_us` after the first instead of at each (see the config key).
            let batch_us = if self.min_timeout {
                self.cfg.runtime.batch_wait_us
            } else {
                0
            };
            let (want, args) = if batch_us > 0 {
                let args = types::SubmitArgs::new().min_wait_usec(batch_us);
                (BATCH_COMPLETIONS, args.timespec(&ts))
            } else {
                (1, types::SubmitArgs::new().timespec(&ts))
            };
            let waited = Instant::now();
            CoreMetrics::add(
                &self.metrics.submissions,
                std::mem::take(&mut self.submissions),
            );
            let wait_result = self.ring.submitter().submit_with_args(want, &args);
            let resumed = Instant::now();
            self.now = resumed;
            self.now_ms = (resumed - self.start).as_millis() as u64;
            CoreMetrics::add(
                &self.metrics.loop_wait_ns,
                (resumed - waited).as_nanos() as u64,
            );
            CoreMetrics::add(
                &self.metrics.loop_busy_ns,
                (waited - busy_since).as_nanos() as u64,
            );
            busy_since = resumed;
            match wait_result {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            self.reap();
            // Handlers may reap more completions (a full submission queue forces a submit),
            // which land in `self.cqes` and are handled in the next round.
            while !self.cqes.is_empty() {
                let mut batch = std::mem::take(&mut self.cqes);
                CoreMetrics::add(&self.metrics.completions, batch.len() as u64);
                for &(user_data, res, flags) in &batch {
                    self.complete(user_data, res, flags);
                }
                batch.clear();
                if self.cqes.is_empty() {
                    self.cqes = batch;
                }
            }
            self.drain_inbox();
            self.timers();
            self.maintain_links();
            CoreMetrics::inc(&self.metrics.loop_iterations);
            if self.up.is_some() {
                self.upgrade_step();
                if self.up.as_ref().is_some_and(|u| u.stage == Stage::Done) && self.open == 0 {
                    info!(core = self.idx, "handed over; core exits");
                    return Ok(());
                }
            } else if self.shutdown.load(Ordering::Relaxed) && self.drain_deadline.is_none() {
                self.begin_drain();
            }
            if self.drain_deadline.is_some() {
                self.drain_step();
            }
            if let Some(deadline) = self.drain_deadline {
                if self.open == 0 || self.now >= deadline {
                    if self.open > 0 {
                        warn!(
                            core = self.idx,
                            open = self.open,
                            "drain grace period over; exiting with connections open"
                        );
                    }
                    return Ok(());
                }
            }
        }
    }

    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let (op, gen, slot) = ud_parts(user_data);
        match op {
            OP_ACCEPT => self.on_accept(slot as usize, res),
            OP_RECV => self.on_recv(slot, gen, res, flags),
            OP_SEND => self.on_send(slot, gen, res),
            OP_SHUTDOWN => self.on_shutdown(slot, gen),
            OP_CLOSE => self.on_close(slot, gen),
            OP_LINK_RECV => self.on_link_recv(slot as usize, gen, res),
            OP_LINK_SEND => self.on_link_send(slot as usize, gen, res),
            OP_CANCEL => {}
            OP_WAKE => self.drain_inbox(),
            OP_EXPORT => self.on_export_fd(slot, gen, res),
            OP_UPGRADE_RECV => self.on_upgrade_recv(res),
            _ => debug_assert!(false, "unknown completion {user_data:#x}"),
        }
    }

    // ---- accept ------------------------------------------------------------------------

    fn arm_accept(&mut self) {
        let all = (1u32 << ACCEPTS) - 1;
        if self.accepts_armed == all
            || self.table_full
            || self.drain_deadline.is_some()
            || self.up.is_some()
        {
            return;
        }
        // At start, give workers that accepted our dial a moment to say HELLO before taking
        // clients, so the first frames find a live link. Clients meanwhile wait in the
        // listen backlog; a worker that is down is not waited for.
        let greeting = self
            .links
            .iter()
            .any(|l| l.state == LinkState::Up && !l.hello_seen);
        if greeting && self.started.elapsed() < STARTUP_HELLO_WAIT {
            return;
        }
        self.start_adopted();
        let Some(fd) = self.listener.as_ref().map(|l| l.as_raw_fd()) else {
            return;
        };
        for i in 0..ACCEPTS {
            if self.accepts_armed & (1 << i) != 0 {
                continue;
            }
            let (addr, len) = self.accept_addrs.prepare(i);
            let slot = self.direct.then(types::DestinationSlot::auto_target);
            let e = opcode::Accept::new(types::Fd(fd), addr, len)
                .file_index(slot)
                .build()
                .user_data(ud(OP_ACCEPT, 0, i as u32));
            // SAFETY: the accept names the listener fd, which lives in `self.listener`
            // until the core exits (drain shuts it down but keeps it open;
            // `resume_listening` replaces it only while no accept is armed), and address
            // buffer i, which `accept_addrs` keeps in place for the core's life and which
            // no other accept uses until this one completes (bit i of `accepts_armed`).
            unsafe { self.push(e) };
            self.accepts_armed |= 1 << i;
        }
    }

    /// Cancels every accept in flight (drain, live upgrade); each still completes, with
    /// ECANCELED or with a connection it had already taken.
    fn cancel_accepts(&mut self) {
        for i in 0..ACCEPTS {
            if self.accepts_armed & (1 << i) == 0 {
                continue;
            }
            let e = opcode::AsyncCancel::new(ud(OP_ACCEPT, 0, i as u32))
                .build()
                .user_data(ud(OP_CANCEL, 0, 0));
            // SAFETY: a cancel names only a user_data value.
            unsafe { self.push(e) };
        }
    }

    /// The table is full: stop listening, so that SO_REUSEPORT hashes new clients to the
    /// other cores' listeners (or the kernel refuses them when every core is full) instead
    /// of leaving them in this listener's backlog, connected as far as they can tell and
    /// never served. Shutting the listener down also ends the armed accepts.
    fn pause_listening(&mut self) {
        if self.table_full {
            return;
        }
        self.table_full = true;
        CoreMetrics::inc(&self.metrics.listen_paused);
        warn!(
            core = self.idx,
            open = self.open,
            "connection table full; stopped listening until slots free (new clients go to the other cores)"
        );
        if let Some(l) = &self.listener {
            let _ = l.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Slots are free again (a sixty-fourth of the table, so a table at its edge does not
    /// flap): listen again with a fresh socket on the same address, which joins the
    /// SO_REUSEPORT group as the start-up listeners did. (Calling listen() again on the
    /// shut-down socket succeeds but does not reliably put it back in the group: clients
    /// were refused while it "listened".) The old socket is replaced only once every
    /// accept armed on it has completed.
    fn resume_listening(&mut self) {
        if self.accepts_armed != 0 {
            return;
        }
        let Some(old) = &self.listener else { return };
        let fresh = old
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| std::io::Error::other("not an IP address"))
            })
            .and_then(|addr| bind_listener(addr, &self.cfg.runtime));
        match fresh {
            Ok(l) => {
                self.listener = Some(l);
                self.table_full = false;
                info!(
                    core = self.idx,
                    open = self.open,
                    "slots free again; listening"
                );
            }
            // Stay paused; the next loop tries again.
            Err(e) => debug!(core = self.idx, "cannot listen again yet: {e}"),
        }
    }

    fn on_accept(&mut self, i: usize, res: i32) {
        debug_assert!(
            i < ACCEPTS && self.accepts_armed & (1 << i) != 0,
            "a completion for accept {i}, which is not armed"
        );
        // Re-armed by the next pass's `arm_accept` (unless draining, full or leaving).
        self.accepts_armed &= !(1 << i);
        if res < 0 {
            let errno = -res;
            // Our own cancel, or a listener shut down (drain, or a full table).
            if errno == libc::ECANCELED
                || errno == libc::EINVAL && (self.drain_deadline.is_some() || self.table_full)
            {
                return;
            }
            CoreMetrics::inc(&self.metrics.accept_errors);
            if errno == libc::ENFILE || errno == libc::EMFILE {
                // The kernel had accepted a client it could not give a slot: it is gone.
                self.metrics.close(CloseReason::TableFull);
                self.pause_listening();
            } else if errno == libc::ECONNABORTED {
                // The client reset before we took it: nothing of ours to close.
                debug!(core = self.idx, "a client reset before its accept");
            } else {
                warn!(
                    core = self.idx,
                    "accept failed: {}",
                    std::io::Error::from_raw_os_error(errno)
                );
            }
            return;
        }
        let slot = res as u32;
        if slot as usize >= self.conns.len() || self.conns[slot as usize].is_some() {
            // Only possible in the regular-fd fallback with an fd above the table.
            warn!(
                core = self.idx,
                slot, "accepted socket outside the connection table; closing it"
            );
            self.refuse_at_accept(slot, CloseReason::TableFull);
            return;
        }
        if !self.process_conns.take(self.cfg.limits.max_conns) {
            self.refuse_at_accept(slot, CloseReason::ProcessLimit);
            return;
        }
        let tls = match TlsSession::new(self.tls.clone()) {
            Ok(t) => t,
            Err(e) => {
                warn!(core = self.idx, "cannot create TLS session: {e}");
                self.process_conns.release();
                self.refuse_at_accept(slot, CloseReason::Internal);
                return;
            }
        };
        CoreMetrics::inc(&self.metrics.accepts);
        self.open += 1;
        self.metrics
            .connections_open
            .store(self.open, Ordering::Relaxed);
        if self.open as usize >= self.conns.len() {
            self.pause_listening();
        }
        let gen = self.gens[slot as usize];
        let mut conn = Box::new(Conn {
            gen,
            session: Session::new(tls, self.tick(), &self.scfg),
            sock: SocketOps::new(),
            dirty: false,
            worker: None,
            seq: 0,
            born_ms: self.now_ms as u32,
            asleep: false,
            // The kernel wrote the address into this accept's buffer.
            peer: Peer::from(self.accept_addrs.peer(i)),
            admit: ADMIT_PROCESS,
            pre: Pre::Done,
            outq: 0,
            leaving: false,
        });
        self.drive(&mut conn, slot);
        // Nothing is read until admission said yes.
        self.admit(slot, gen, conn);
    }

    /// Closes a just-accepted descriptor that gets no connection, counted as `reason`.
    fn refuse_at_accept(&mut self, slot: u32, reason: CloseReason) {
        self.metrics.close(reason);
        let e = on_socket!(self.direct, slot, |fd| opcode::Close::new(fd).build())
            .user_data(ud(OP_CANCEL, 0, 0));
        // SAFETY: Close names only the descriptor.
        unsafe { self.push(e) };
    }

    /// A just-accepted connection, with the peer address its accept brought: count it
    /// against its source's cap (refuse over it), then start reading (the handshake) if
    /// the core's handshake budget allows, or let it wait unread (`admission.rs`). Puts
    /// the connection into the table.
    fn admit(&mut self, slot: u32, gen: u32, mut conn: Box<Conn>) {
        if !conn.session.is_closing() {
            let limits = self.cfg.admission_limits(self.cores);
            let now = self.tick();
            // A trusted proxy's connections count against the client its header names.
            let proxied = conn
                .peer
                .addr()
                .is_some_and(|p| self.proxies.iter().any(|n| n.contains(p.ip())));
            conn.pre = match (self.proxies.is_empty(), proxied) {
                (true, _) => Pre::Done,
                (false, true) => Pre::Header,
                (false, false) => Pre::Sniff,
            };
            let key = conn
                .peer
                .addr()
                .filter(|_| !proxied)
                .map(|p| IpKey::of(p.ip()));
            if key.is_some_and(|k| !self.admission.hold(k, &limits)) {
                let cause = CloseCause::silent(CloseReason::IpLimit);
                conn.session.close(cause, now, &mut self.turn);
            } else {
                if key.is_some() {
                    conn.admit |= ADMIT_IP;
                }
                if self.admission.arrive(slot, gen, self.now_ms, &limits) {
                    conn.admit |= ADMIT_HANDSHAKE;
                    self.put(slot, conn);
                    self.arm_recv(slot, gen);
                    return;
                }
                CoreMetrics::inc(&self.metrics.handshakes_queued);
            }
            self.drive(&mut conn, slot);
        }
        self.put(slot, conn);
    }

    /// Starts the handshakes of waiting connections the budget now allows, and refuses
    /// the ones that waited too long. Once per loop pass.
    fn admit_waiting(&mut self) {
        let limits = self.cfg.admission_limits(self.cores);
        loop {
            let conns = &self.conns;
            let live = |slot: u32, gen: u32| {
                conns[slot as usize]
                    .as_ref()
                    .is_some_and(|c| c.gen == gen && !c.session.is_closing())
            };
            match self.admission.next(self.now_ms, &limits, live) {
                None => break,
                Some(Next::Start { slot, gen }) => {
                    if let Some(c) = self.conn_mut(slot, gen) {
                        c.admit |= ADMIT_HANDSHAKE;
                    }
                    self.arm_recv(slot, gen);
                }
                Some(Next::Expired { slot, gen }) => {
                    let Some(mut conn) = self.take(slot, gen) else {
                        continue;
                    };
                    let now = self.tick();
                    let cause = CloseCause::silent(CloseReason::HandshakeOverload);
                    conn.session.close(cause, now, &mut self.turn);
                    self.drive(&mut conn, slot);
                    self.put(slot, conn);
                }
            }
        }
        let m = &self.metrics;
        m.handshakes_waiting
            .store(self.admission.waiting() as u64, Ordering::Relaxed);
        m.handshakes_in_progress
            .store(u64::from(self.admission.in_progress()), Ordering::Relaxed);
    }

    /// Gives back what admission counted for a connection: its handshake slot (once the
    /// handshake is over, or the connection gone), its source's place, its process place.
    fn release_admission(&mut self, conn: &mut Conn, what: u8) {
        let what = conn.admit & what;
        conn.admit &= !what;
        if what & ADMIT_HANDSHAKE != 0 {
            let limits = self.cfg.admission_limits(self.cores);
            self.admission.finished(conn.session.resumed(), &limits);
        }
        if what & ADMIT_IP != 0 {
            if let Some(p) = conn.peer.addr() {
                self.admission.release(IpKey::of(p.ip()));
            }
        }
        if what & ADMIT_PROCESS != 0 {
            self.process_conns.release();
        }
    }

    fn arm_recv(&mut self, slot: u32, gen: u32) {
        let bgid = self.bufs.group();
        let e = on_socket!(self.direct, slot, |fd| opcode::RecvMulti::new(fd, bgid)
            .build())
        .user_data(ud(OP_RECV, gen, slot));
        // SAFETY: buffers come from the buffer ring, which outlives the ring (module docs).
        unsafe { self.push(e) };
        if let Some(c) = self.conn_mut(slot, gen) {
            c.sock.recv_submitted();
        }
    }

    fn conn_mut(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot as usize)?
            .as_deref_mut()
            .filter(|c| c.gen == gen)
    }

    fn take(&mut self, slot: u32, gen: u32) -> Option<Box<Conn>> {
        let entry = self.conns.get_mut(slot as usize)?;
        if entry.as_ref().is_some_and(|c| c.gen == gen) {
            entry.take()
        } else {
            None
        }
    }

    fn put(&mut self, slot: u32, conn: Box<Conn>) {
        debug_assert!(self.conns[slot as usize].is_none());
        self.conns[slot as usize] = Some(conn);
    }

    // ---- receive -----------------------------------------------------------------------

    fn on_recv(&mut self, slot: u32, gen: u32, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if let Some(b) = bid {
            self.bufs.taken(b);
        }
        let Some(mut conn) = self.take(slot, gen) else {
            if let Some(b) = bid {
                self.recycle(b);
            }
            return;
        };
        if !more {
            conn.sock.recv_ended();
        }
        let now = self.tick();
        if res > 0 {
            let b = bid.expect("a receive with data names its buffer");
            let bytes = self.bufs.buffer_mut(b, res as usize);
            let mut skip = 0;
            if conn.pre != Pre::Done {
                let mut staged = self.proxy_staged.remove(&slot);
                let step = strip_proxy(&mut conn.pre, &mut staged, bytes);
                if let Some(staged) = staged {
                    self.proxy_staged.insert(slot, staged);
                }
                match step {
                    PreStep::More => skip = bytes.len(),
                    PreStep::Pass { skip: n, client } => {
                        skip = n;
                        if let Some(client) = client {
                            let limits = self.cfg.admission_limits(self.cores);
                            if self.admission.hold(IpKey::of(client.ip()), &limits) {
                                conn.peer = Peer::from(Some(client));
                                conn.admit |= ADMIT_IP;
                            } else {
                                let cause = CloseCause::silent(CloseReason::IpLimit);
                                conn.session.close(cause, now, &mut self.turn);
                            }
                        }
                    }
                    PreStep::Refuse(reason) => {
                        let cause = CloseCause::silent(reason);
                        conn.session.close(cause, now, &mut self.turn);
                    }
                }
            }
            if skip < bytes.len() && !conn.session.is_closing() {
                conn.session
                    .on_receive(&mut bytes[skip..], now, &self.scfg, &mut self.turn);
            }
            self.recycle(b);
            if !more && !conn.session.is_closing() {
                self.rearm.push(slot);
            }
        } else if res == 0 {
            conn.sock.peer_done();
            conn.session.on_eof(now, &self.scfg, &mut self.turn);
        } else {
            match -res {
                libc::ENOBUFS => {
                    CoreMetrics::inc(&self.metrics.recv_buffers_exhausted);
                    if !conn.session.is_closing() {
                        self.rearm.push(slot);
                    }
                }
                libc::ECANCELED => {}
                libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT | libc::EHOSTUNREACH => {
                    conn.sock.peer_done();
                    conn.session.close(
                        CloseCause::silent(CloseReason::PeerReset),
                        now,
                        &mut self.turn,
                    )
                }
                e => {
                    debug!(
                        core = self.idx,
                        slot,
                        "receive failed: {}",
                        std::io::Error::from_raw_os_error(e)
                    );
                    conn.session.close(
                        CloseCause::silent(CloseReason::Internal),
                        now,
                        &mut self.turn,
                    )
                }
            }
        }
        self.drive(&mut conn, slot);
        self.put(slot, conn);
    }

    /// Acts on what the session asked for after an input, in its order: events for the
    /// worker link (and the metrics), the bytes to send, the next deadline, closing.
    fn drive(&mut self, conn: &mut Conn, slot: u32) {
        let id = ConnId::new(self.idx, conn.gen, slot);
        let now = self.tick();
        loop {
            if !conn.session.is_closing()
                && conn.sock.in_flight_bytes() + conn.session.transmit().len()
                    > self.cfg.limits.max_outbound_per_conn
            {
                let cause = CloseCause::silent(CloseReason::SlowConsumer);
                conn.session.close(cause, now, &mut self.turn);
            }
            if self.turn.events.is_empty() {
                break;
            }
            let mut events = std::mem::take(&mut self.turn.events);
            // After a frame no worker could take, the rest of the input is not relayed.
            let mut refused = false;
            for &ev in &events.list {
                match ev {
                    Event::Established => {
                        self.release_admission(conn, ADMIT_HANDSHAKE);
                        CoreMetrics::inc(&self.metrics.handshakes_ok);
                        let now_ms = self.now_ms as u32;
                        self.metrics
                            .observe_handshake(now_ms.wrapping_sub(conn.born_ms));
                        // Tell a worker now, so it sees connections that never send a frame.
                        if let Some(w) = route::pick_mask(id.raw(), self.live_mask) {
                            self.open_on(conn, id, w as u8);
                        }
                    }
                    Event::HandshakeFailed => CoreMetrics::inc(&self.metrics.handshakes_failed),
                    Event::Frame { .. } if refused => {}
                    Event::Frame { flags, start, end } => {
                        let payload = events.payload(start, end);
                        if !self.forward(conn, id, payload, flags) {
                            refused = true;
                            conn.session
                                .close(CloseCause::no_worker(), now, &mut self.turn);
                        }
                    }
                    Event::Closed { reason, code } => {
                        self.metrics.close(reason);
                        debug!(
                            core = self.idx,
                            slot,
                            reason = reason.label(),
                            "closing connection"
                        );
                        if let Some(w) = conn.worker {
                            let link = &mut self.links[w as usize];
                            if link.state == LinkState::Up {
                                link.queue_close(id, conn.seq + 1, code, reason.label());
                            }
                        }
                    }
                }
            }
            events.clear();
            if self.turn.events.is_empty() {
                self.turn.events = events;
            }
        }
        match conn.session.poll_timer() {
            Some(Deadline::At(t)) => self.wheel.schedule(slot, t),
            Some(Deadline::Never) => {
                self.wheel.cancel(slot);
            }
            None => {}
        }
        let asleep = conn.session.is_asleep();
        if asleep != conn.asleep {
            conn.asleep = asleep;
            self.hibernated = if asleep {
                self.hibernated + 1
            } else {
                self.hibernated - 1
            };
            self.metrics
                .connections_hibernated
                .store(self.hibernated, Ordering::Relaxed);
        }
        if let Some(c) = conn.session.closing() {
            conn.sock.begin_close(c.linger);
            if c.cut {
                conn.sock.cut();
            }
        }
        if conn.session.wants_transmit() {
            self.mark_dirty(conn, slot);
        }
        self.progress_close(conn, slot);
        // Every change of a connection's outbound bytes ends in `drive`, so the core's
        // total stays exact without a walk over the table.
        let out = (conn.sock.in_flight_bytes() + conn.session.transmit().len())
            .min(u32::MAX as usize) as u32;
        self.outbound = self.outbound + u64::from(out) - u64::from(conn.outq);
        conn.outq = out;
        // Counted in the turn, published only when something happened (drive runs for
        // every input of every connection), and after the closes drive itself made.
        for (counter, n) in [
            (&self.metrics.pings, &mut self.turn.pings),
            (&self.metrics.hibernations, &mut self.turn.hibernations),
            (&self.metrics.wakeups, &mut self.turn.wakeups),
        ] {
            if *n > 0 {
                CoreMetrics::add(counter, std::mem::take(n));
            }
        }
    }

    /// Over `limits.outbound_budget_per_core`: closes the connections holding the most
    /// unsent bytes, as slow consumers, until the core is back under it. Bytes of
    /// connections already closing count as freed (they go with their slot). Walks the
    /// table only when over budget.
    fn enforce_outbound_budget(&mut self) {
        let budget = self.cfg.limits.outbound_budget_per_core;
        if budget == 0 || self.outbound <= budget {
            return;
        }
        let mut heaviest = std::mem::take(&mut self.heaviest);
        heaviest.clear();
        let mut freeing = 0u64;
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c.as_deref() else { continue };
            if c.session.is_closing() {
                freeing += u64::from(c.outq);
            } else if c.outq > 0 {
                heaviest.push((c.outq, slot as u32));
            }
        }
        heaviest.sort_unstable_by(|a, b| b.cmp(a));
        let now = self.tick();
        for &(bytes, slot) in &heaviest {
            if self.outbound.saturating_sub(freeing) <= budget {
                break;
            }
            let Some(mut conn) = self.conns[slot as usize].take() else {
                continue;
            };
            let cause = CloseCause::silent(CloseReason::SlowConsumer);
            conn.session.close(cause, now, &mut self.turn);
            // Its bytes are dropped, not flushed: that is the point.
            conn.sock.begin_close(false);
            conn.sock.cut();
            CoreMetrics::inc(&self.metrics.outbound_budget_closes);
            freeing += u64::from(bytes);
            self.drive(&mut conn, slot);
            self.put(slot, conn);
        }
        self.heaviest = heaviest;
    }

    /// Relays one client message to the connection's worker. False if no worker is up.
    fn forward(&mut self, conn: &mut Conn, id: ConnId, payload: &[u8], flags: u8) -> bool {
        // A connection stays with its worker while that worker is up, so its frames are
        // never split between two workers; it re-hashes only when its worker is gone.
        let sticky = conn
            .worker
            .filter(|&w| self.live_mask & (1 << w) != 0)
            .map(u16::from);
        let Some(w) = sticky.or_else(|| route::pick_mask(id.raw(), self.live_mask)) else {
            return false;
        };
        let w = w as u8;
        if conn.worker != Some(w) {
            self.open_on(conn, id, w);
        }
        conn.seq += 1;
        self.links[w as usize].queue_frame(id, conn.seq, flags, payload);
        CoreMetrics::inc(&self.metrics.worker_frames[w as usize]);
        self.check_window(w as usize);
        CoreMetrics::inc(&self.metrics.frames_from_client);
        CoreMetrics::add(&self.metrics.bytes_from_client, payload.len() as u64);
        true
    }

    /// Sends OPEN for the connection to worker `w`, which then owns its frames.
    fn open_on(&mut self, conn: &mut Conn, id: ConnId, w: u8) {
        let (sni, alpn) = (conn.session.server_name(), conn.session.alpn());
        self.links[w as usize].queue_open(id, conn.peer.get(), sni, alpn);
        conn.worker = Some(w);
    }

    fn mark_dirty(&mut self, conn: &mut Conn, slot: u32) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    // ---- send --------------------------------------------------------------------------

    /// Starts a send of the connection's queued bytes if none is in flight.
    fn start_send(&mut self, conn: &mut Conn, slot: u32) {
        if conn.leaving {
            return;
        }
        let Some(op) = conn.sock.start_send(conn.session.transmit()) else {
            return;
        };
        // A closing connection's last bytes (close_notify) wait in the kernel for the
        // shutdown or close that follows this send's completion, and leave with its FIN
        // in one segment: one transmit (and on loopback one run of the client's receive
        // path) instead of two, and one wake-up of the client.
        let more = if conn.sock.is_closing() {
            libc::MSG_MORE
        } else {
            0
        };
        let e = on_socket!(self.direct, slot, |fd| opcode::Send::new(
            fd, op.ptr, op.len
        )
        .flags(more)
        .build())
        .user_data(ud(OP_SEND, conn.gen, slot));
        // SAFETY: `SocketOps` keeps the bytes frozen until `send_done`, and the Conn that
        // owns it is freed only after the Close completion, which `SocketOps` allows only
        // once this send has completed.
        unsafe { self.push(e) };
    }

    fn on_send(&mut self, slot: u32, gen: u32, res: i32) {
        let Some(mut conn) = self.take(slot, gen) else {
            debug_assert!(false, "send completion for a freed connection");
            return;
        };
        let conn_ref = &mut *conn;
        match conn_ref.sock.send_done(res, conn_ref.session.transmit()) {
            Err(errno) => {
                let reason = match errno {
                    libc::EPIPE | libc::ECONNRESET | libc::ETIMEDOUT => CloseReason::PeerReset,
                    _ => CloseReason::Internal,
                };
                let now = self.tick();
                conn.session
                    .close(CloseCause::silent(reason), now, &mut self.turn);
            }
            Ok(()) => self.start_send(&mut conn, slot),
        }
        self.drive(&mut conn, slot);
        self.put(slot, conn);
    }

    fn flush(&mut self) {
        self.enforce_outbound_budget();
        self.metrics
            .outbound_bytes
            .store(self.outbound, Ordering::Relaxed);
        while let Some(slot) = self.dirty.pop() {
            let Some(mut conn) = self.conns[slot as usize].take() else {
                continue;
            };
            conn.dirty = false;
            self.start_send(&mut conn, slot);
            self.progress_close(&mut conn, slot);
            self.put(slot, conn);
        }
        if self.paused {
            self.maybe_resume();
        }
        while !self.paused {
            let Some(slot) = self.rearm.pop() else { break };
            if let Some(c) = self.conns[slot as usize].as_ref() {
                if c.sock.wants_recv() && !c.leaving {
                    let gen = c.gen;
                    self.arm_recv(slot, gen);
                }
            }
        }
        for w in 0..self.links.len() {
            self.start_link_send(w);
            self.metrics.worker_link_queued_bytes[w]
                .store(self.links[w].backlog() as u64, Ordering::Relaxed);
            self.metrics.worker_link_unacked_bytes[w]
                .store(self.links[w].unacked_bytes() as u64, Ordering::Relaxed);
        }
        self.bufs.publish();
        self.admit_waiting();
        if self.table_full && self.drain_deadline.is_none() {
            let free = self.conns.len() - (self.open as usize).min(self.conns.len());
            if free >= (self.conns.len() / 64).max(1) {
                self.resume_listening();
            }
        }
        self.arm_accept();
        self.metrics
            .timers_armed
            .store(self.wheel.len() as u64, Ordering::Relaxed);
    }

    // ---- close -------------------------------------------------------------------------

    /// Moves a closing connection on with whatever `SocketOps` says is next: shutdown once
    /// its bytes are out (or at once when cut), cancel a lingering receive when cut, Close
    /// once nothing is in flight.
    fn progress_close(&mut self, conn: &mut Conn, slot: u32) {
        while let Some(step) = conn.sock.next_close_step(!conn.session.wants_transmit()) {
            let e = match step {
                CloseStep::Shutdown(how) => {
                    on_socket!(self.direct, slot, |fd| opcode::Shutdown::new(fd, how)
                        .build())
                    .user_data(ud(OP_SHUTDOWN, conn.gen, slot))
                }
                CloseStep::CancelRecv => opcode::AsyncCancel::new(ud(OP_RECV, conn.gen, slot))
                    .build()
                    .user_data(ud(OP_CANCEL, 0, 0)),
                CloseStep::Close => on_socket!(self.direct, slot, |fd| opcode::Close::new(fd)
                    .build())
                .user_data(ud(OP_CLOSE, conn.gen, slot)),
            };
            // SAFETY: shutdown and close name only the descriptor (close is returned only
            // once nothing else is in flight on it); a cancel names only a user_data value.
            unsafe { self.push(e) };
        }
    }

    fn on_shutdown(&mut self, slot: u32, gen: u32) {
        let Some(mut conn) = self.take(slot, gen) else {
            return;
        };
        conn.sock.shutdown_done();
        self.progress_close(&mut conn, slot);
        self.put(slot, conn);
    }

    fn on_close(&mut self, slot: u32, gen: u32) {
        let Some(mut conn) = self.take(slot, gen) else {
            return;
        };
        assert!(
            conn.sock.is_quiet(),
            "a connection is freed only when nothing is in flight on it"
        );
        if conn.asleep {
            self.hibernated -= 1;
            self.metrics
                .connections_hibernated
                .store(self.hibernated, Ordering::Relaxed);
        }
        self.release_admission(&mut conn, ADMIT_PROCESS | ADMIT_IP | ADMIT_HANDSHAKE);
        self.outbound -= u64::from(conn.outq);
        drop(conn);
        self.proxy_staged.remove(&slot);
        self.gens[slot as usize] = (gen + 1) & ConnId::MAX_GENERATION;
        self.wheel.cancel(slot);
        self.open -= 1;
        self.metrics
            .connections_open
            .store(self.open, Ordering::Relaxed);
    }

    // ---- timers ------------------------------------------------------------------------

    fn timers(&mut self) {
        let now = self.tick();
        if now >= self.last_sweep + TOPIC_SWEEP_SECS {
            self.last_sweep = now;
            self.sweep_topics();
        }
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(now, &mut expired);
        for &slot in &expired {
            let Some(mut conn) = self.conns[slot as usize].take() else {
                continue;
            };
            let quiet = conn.sock.send_idle();
            conn.session
                .on_timeout(now, &self.scfg, quiet, &mut self.turn);
            self.drive(&mut conn, slot);
            self.put(slot, conn);
        }
        expired.clear();
        self.expired = expired;
    }

    // ---- drain -------------------------------------------------------------------------

    fn begin_drain(&mut self) {
        let grace = Duration::from_secs(self.cfg.limits.drain_grace_secs);
        self.drain_deadline = Some(Instant::now() + grace);
        info!(
            core = self.idx,
            open = self.open,
            "draining: no new connections, GOAWAY to every client"
        );
        if let Some(l) = &self.listener {
            // Shutting a listening socket down stops it listening (new clients are hashed to
            // the remaining listeners or refused) and ends the armed accepts.
            let _ = l.shutdown(std::net::Shutdown::Read);
        }
        self.cancel_accepts();
        self.drain_total = self.open;
        self.drain_started = self.now;
        self.drain_step();
    }

    /// Tells clients to go away spread over the first half of the grace period, so they do
    /// not all reconnect (elsewhere) at the same instant; each pass closes the share that
    /// is due by now.
    fn drain_step(&mut self) {
        if self.drain_cursor >= self.conns.len() {
            return;
        }
        let spread = Duration::from_secs(self.cfg.limits.drain_grace_secs) / 2;
        let elapsed = self.now.saturating_duration_since(self.drain_started);
        let due = drain_due(self.drain_total, elapsed, spread);
        let now = self.tick();
        while self.drain_told < due && self.drain_cursor < self.conns.len() {
            let slot = self.drain_cursor as u32;
            self.drain_cursor += 1;
            let Some(mut conn) = self.conns[slot as usize].take() else {
                continue;
            };
            if !conn.session.is_closing() {
                self.drain_told += 1;
                conn.session.drain(now, &mut self.turn);
                self.drive(&mut conn, slot);
            }
            self.put(slot, conn);
        }
    }

    // ---- worker links ------------------------------------------------------------------

    fn maintain_links(&mut self) {
        let now = self.now;
        let interval = Duration::from_millis(self.cfg.runtime.heartbeat_interval_ms);
        let timeout = Duration::from_millis(self.cfg.runtime.heartbeat_timeout_ms);
        for w in 0..self.links.len() {
            let link = &mut self.links[w];
            match link.state {
                LinkState::Down
                    if now >= link.retry_at
                        && self.up.as_ref().is_none_or(|u| u.stage < Stage::Releasing) =>
                {
                    self.try_connect(w)
                }
                LinkState::Up if now.duration_since(link.last_rx) > timeout => {
                    let ms = timeout.as_millis();
                    self.link_down(
                        w,
                        &format!("heartbeat timeout: nothing received for {ms} ms"),
                    );
                }
                LinkState::Up if now.duration_since(link.last_heartbeat) >= interval => {
                    link.last_heartbeat = now;
                    link.queue_heartbeat();
                }
                _ => {}
            }
        }
    }

    fn try_connect(&mut self, w: usize) {
        let path = self.links[w].path.clone();
        let attempt = (|| -> std::io::Result<OwnedFd> {
            let sock = socket2::Socket::new(
                socket2::Domain::UNIX,
                socket2::Type::STREAM.cloexec().nonblocking(),
                None,
            )?;
            // Non-blocking: a worker with a full backlog answers EAGAIN instead of stalling
            // the core; the link is retried like any other failure.
            sock.connect(&socket2::SockAddr::unix(&path)?)?;
            Ok(sock.into())
        })();
        match attempt {
            Ok(fd) => {
                let (idx, cores, name) = (self.idx, self.cores, self.cfg.name.clone());
                self.links[w].connected(fd, idx, cores, &name);
                debug!(core = self.idx, worker = %path.display(), "worker link connected; waiting for its HELLO");
                self.arm_link_recv(w);
            }
            Err(e) => {
                let rt = &self.cfg.runtime;
                let link = &mut self.links[w];
                link.backoff_ms =
                    (link.backoff_ms * 2).clamp(rt.worker_retry_ms, rt.worker_retry_max_ms);
                link.retry_at = Instant::now() + Duration::from_millis(link.backoff_ms);
                if !link.down_logged {
                    link.down_logged = true;
                    warn!(core = self.idx, worker = %path.display(), "worker down ({e}); retrying with backoff up to {} ms", rt.worker_retry_max_ms);
                }
            }
        }
    }

    fn arm_link_recv(&mut self, w: usize) {
        let link = &mut self.links[w];
        let Some(fd) = link.raw_fd() else { return };
        if link.recv_inflight || link.state != LinkState::Up {
            return;
        }
        if link.rlen == link.rbuf.len() {
            let grow = link.rbuf.len() * 2;
            link.rbuf.resize(grow, 0);
        }
        let spare = &mut link.rbuf[link.rlen..];
        let (ptr, len) = (spare.as_mut_ptr(), spare.len() as u32);
        link.recv_inflight = true;
        let e = opcode::Recv::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(ud(OP_LINK_RECV, link.epoch, w as u32));
        // SAFETY: `rbuf` is neither resized nor read while recv_inflight is set, and the
        // socket stays open until no operation on it is in flight (close_link).
        unsafe { self.push(e) };
    }

    fn start_link_send(&mut self, w: usize) {
        let link = &mut self.links[w];
        let Some(fd) = link.raw_fd() else { return };
        if link.send_inflight || link.state != LinkState::Up {
            return;
        }
        if link.out_off >= link.out.len() {
            if link.queued.is_empty() {
                return;
            }
            std::mem::swap(&mut link.out, &mut link.queued);
            link.queued.clear();
            link.out_off = 0;
        }
        let rest = &link.out[link.out_off..];
        let (ptr, len) = (rest.as_ptr(), rest.len() as u32);
        link.send_inflight = true;
        let e = opcode::Send::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(ud(OP_LINK_SEND, link.epoch, w as u32));
        // SAFETY: `out` is frozen while send_inflight is set; the socket outlives the send.
        unsafe { self.push(e) };
    }

    fn on_link_send(&mut self, w: usize, epoch: u32, res: i32) {
        let link = &mut self.links[w];
        debug_assert_eq!(link.epoch, epoch);
        link.send_inflight = false;
        if link.state != LinkState::Up {
            self.finish_link_close(w);
            return;
        }
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            self.link_down(w, &format!("send failed: {e}"));
            return;
        }
        link.out_off += res as usize;
        if link.out_off >= link.out.len() {
            link.out.clear();
            link.out_off = 0;
        }
        self.start_link_send(w);
    }

    fn on_link_recv(&mut self, w: usize, epoch: u32, res: i32) {
        let link = &mut self.links[w];
        debug_assert_eq!(link.epoch, epoch);
        link.recv_inflight = false;
        if link.state != LinkState::Up {
            self.finish_link_close(w);
            return;
        }
        if res <= 0 {
            let why = if res == 0 {
                "worker closed the link".to_string()
            } else {
                format!(
                    "receive failed: {}",
                    std::io::Error::from_raw_os_error(-res)
                )
            };
            self.link_down(w, &why);
            return;
        }
        link.rlen += res as usize;
        link.last_rx = self.now;
        let mut rbuf = std::mem::take(&mut self.links[w].rbuf);
        let rlen = self.links[w].rlen;
        let mut off = 0;
        let mut failure = None;
        while off < rlen {
            match envelope::decode(&rbuf[off..rlen], envelope::DEFAULT_MAX_PAYLOAD) {
                Ok(Some((msg, used))) => {
                    let raw = off..off + used;
                    off += used;
                    let relayed = !matches!(
                        msg,
                        Message::Hello(_) | Message::Ack { .. } | Message::Heartbeat { .. }
                    );
                    if relayed && self.passes_on() {
                        self.forward_late(0, w as u8, &rbuf[raw]);
                        continue;
                    }
                    if let Err(why) = self.on_envelope(w, msg) {
                        failure = Some(why);
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(format!("malformed envelope: {e}"));
                    break;
                }
            }
        }
        let need = envelope::peek_len(&rbuf[off..rlen]).unwrap_or(0);
        let link = &mut self.links[w];
        link.rbuf = std::mem::take(&mut rbuf);
        if let Some(why) = failure {
            CoreMetrics::inc(&self.metrics.worker_protocol_errors);
            self.link_down(w, &why);
            return;
        }
        link.reserve_rbuf(off, need);
        self.arm_link_recv(w);
    }

    fn on_envelope(&mut self, w: usize, msg: Message<'_>) -> Result<(), String> {
        match msg {
            Message::Hello(h) => {
                if h.version != envelope::VERSION || h.role != Role::Worker {
                    return Err(format!("worker HELLO with version {} role {:?}; this gateway speaks version {} and expects a worker", h.version, h.role, envelope::VERSION));
                }
                if self.links[w].hello_seen {
                    return Err("a second HELLO".to_string());
                }
                self.link_live(w, h.name);
            }
            Message::Ack { link_seq } => {
                let link = &mut self.links[w];
                if link_seq > link.link_seq {
                    return Err(format!(
                        "ACK of link sequence {link_seq} beyond the last sent ({})",
                        link.link_seq
                    ));
                }
                link.ack(link_seq);
            }
            Message::Heartbeat { nonce, reply } => {
                if !reply {
                    self.links[w].queue_heartbeat_reply(nonce);
                }
            }
            Message::Send {
                conn,
                flags,
                payload,
            } => {
                if !self.mail_other_core(w, conn, CrossKind::Send, flags, payload) {
                    self.deliver(w, conn, flags, payload);
                }
            }
            Message::Close {
                conn, code, reason, ..
            } => {
                if !self.mail_other_core(w, conn, CrossKind::Close(code), 0, reason.as_bytes()) {
                    self.worker_close(w, conn, code, reason);
                }
            }
            Message::Subscribe { conn, topic } => {
                if !self.mail_other_core(w, conn, CrossKind::Subscribe, 0, topic) {
                    self.subscribe(w, conn, topic);
                }
            }
            Message::Unsubscribe { conn, topic } => {
                if !self.mail_other_core(w, conn, CrossKind::Unsubscribe, 0, topic) {
                    self.unsubscribe(w, conn, topic);
                }
            }
            Message::Publish {
                flags,
                topic,
                payload,
            } => self.publish(w, topic, flags, payload),
            Message::Open(_) | Message::Frame { .. } => {
                return Err(format!("{:?} is a gateway-to-worker kind", msg.kind()));
            }
        }
        Ok(())
    }

    /// Takes the connection a worker named, if it is this core's, alive and established;
    /// otherwise counts it and tells the worker the connection is gone.
    fn owned_conn(&mut self, w: usize, id: ConnId) -> Option<Box<Conn>> {
        let found = if id.core() == self.idx {
            self.take(id.slot(), id.generation())
        } else {
            None
        };
        match found {
            Some(c) if c.session.is_open() => Some(c),
            other => {
                if let Some(c) = other {
                    self.put(id.slot(), c);
                }
                CoreMetrics::inc(&self.metrics.worker_unknown_conn);
                self.links[w].queue_gone(id);
                None
            }
        }
    }

    fn deliver(&mut self, w: usize, id: ConnId, flags: u8, payload: &[u8]) {
        let Some(mut conn) = self.owned_conn(w, id) else {
            return;
        };
        let slot = id.slot();
        if payload.len() > frame::MAX_LEN_FIELD {
            self.links[w].queue_gone(id);
        } else {
            self.send_message(&mut conn, slot, flags, payload);
        }
        self.put(slot, conn);
    }

    /// Hands a worker's message to the connection's session (framed and encrypted there).
    fn send_message(&mut self, conn: &mut Conn, slot: u32, flags: u8, payload: &[u8]) {
        let now = self.tick();
        conn.session
            .send_message(flags, payload, now, &mut self.turn);
        self.drive(conn, slot);
        CoreMetrics::inc(&self.metrics.frames_to_client);
        CoreMetrics::add(&self.metrics.bytes_to_client, payload.len() as u64);
    }

    /// The worker answered HELLO: only now does the link take connections (a hung worker's
    /// listen queue accepts a connect without anyone reading it).
    fn link_live(&mut self, w: usize, name: &str) {
        let link = &mut self.links[w];
        link.hello_seen = true;
        link.backoff_ms = self.cfg.runtime.worker_retry_ms;
        self.live_mask |= 1 << w;
        self.metrics.worker_link_up[w].store(1, Ordering::Relaxed);
        info!(core = self.idx, worker = %link.path.display(), name, "worker link up");
        if !self.orphans.is_empty() {
            let orphans = std::mem::take(&mut self.orphans);
            self.replay(&orphans);
        }
    }

    /// Takes a link down: stop routing to it, shut the socket so in-flight operations end,
    /// and close it once they have.
    fn link_down(&mut self, w: usize, why: &str) {
        let link = &mut self.links[w];
        warn!(core = self.idx, worker = %link.path.display(), "worker link down: {why}");
        link.state = LinkState::Closing;
        self.live_mask &= !(1 << w);
        self.metrics.worker_link_up[w].store(0, Ordering::Relaxed);
        CoreMetrics::inc(&self.metrics.worker_link_down[w]);
        if let Some(fd) = &link.fd {
            let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
        }
        let unacked = link.take_unacked();
        self.finish_link_close(w);
        self.metrics.worker_link_unacked_bytes[w].store(0, Ordering::Relaxed);
        self.replay(&unacked);
    }

    fn finish_link_close(&mut self, w: usize) {
        let link = &mut self.links[w];
        if link.state == LinkState::Closing && !link.recv_inflight && !link.send_inflight {
            link.fd = None;
            link.reset_buffers();
            link.state = LinkState::Down;
            link.down_logged = false;
            let rt = &self.cfg.runtime;
            // A link that failed before its HELLO counts as a failed attempt, so a hung
            // worker is redialled with growing delays rather than every base interval.
            link.backoff_ms = if link.hello_seen {
                rt.worker_retry_ms
            } else {
                (link.backoff_ms * 2).clamp(rt.worker_retry_ms, rt.worker_retry_max_ms)
            };
            link.retry_at = Instant::now() + Duration::from_millis(link.backoff_ms);
        }
    }

    // ---- delivery guarantees -------------------------------------------------------------

    /// Re-sends unacknowledged envelopes of a dead link: each goes to the worker its
    /// connection hashes to now (a live connection gets a fresh OPEN there first), or waits
    /// in `orphans` until a worker is up. Envelopes keep their per-connection `seq`, so a
    /// backend can drop what the dead worker had already passed on.
    fn replay(&mut self, bytes: &[u8]) {
        let mut off = 0;
        while off < bytes.len() {
            let Ok(Some((msg, used))) = envelope::decode(&bytes[off..], usize::MAX) else {
                debug_assert!(false, "retained envelopes are well-formed");
                break;
            };
            let env = &bytes[off..off + used];
            off += used;
            let conn = match msg {
                Message::Open(o) => o.conn,
                Message::Frame { conn, .. } | Message::Close { conn, .. } => conn,
                _ => continue,
            };
            let Some(w) = route::pick_mask(conn.raw(), self.live_mask) else {
                self.orphans.extend_from_slice(env);
                continue;
            };
            let w = w as u8;
            CoreMetrics::inc(&self.metrics.worker_resent);
            let live = if conn.core() == self.idx {
                self.take(conn.slot(), conn.generation())
            } else {
                None
            };
            let mut live = live;
            match msg {
                Message::Open(o) => {
                    self.links[w as usize].queue_open(o.conn, o.peer, o.sni, o.alpn);
                    if let Some(c) = live.as_mut() {
                        c.worker = Some(w);
                    }
                }
                Message::Frame {
                    seq,
                    flags,
                    payload,
                    ..
                } => {
                    if let Some(c) = live.as_mut() {
                        if c.worker != Some(w) {
                            self.open_on(c, conn, w);
                        }
                    }
                    self.links[w as usize].queue_frame(conn, seq, flags, payload);
                    CoreMetrics::inc(&self.metrics.worker_frames[w as usize]);
                }
                Message::Close {
                    seq, code, reason, ..
                } => {
                    self.links[w as usize].queue_close(conn, seq, code, reason);
                }
                _ => {}
            }
            if let Some(c) = live {
                self.put(conn.slot(), c);
            }
            self.check_window(w as usize);
        }
    }

    /// Starts back-pressure when a link's unacknowledged bytes reach the window.
    fn check_window(&mut self, w: usize) {
        if !self.paused && self.links[w].unacked_bytes() >= self.cfg.limits.link_window_bytes {
            self.paused = true;
            self.metrics.backpressure.store(1, Ordering::Relaxed);
            CoreMetrics::inc(&self.metrics.backpressure_pauses);
            debug!(core = self.idx, worker = %self.links[w].path.display(), "worker link window full; pausing client reads");
        }
    }

    /// Ends back-pressure once every live link is below half its window.
    fn maybe_resume(&mut self) {
        let low = self.cfg.limits.link_window_bytes / 2;
        if self
            .links
            .iter()
            .any(|l| l.state == LinkState::Up && l.unacked_bytes() >= low)
        {
            return;
        }
        self.paused = false;
        self.metrics.backpressure.store(0, Ordering::Relaxed);
        for b in std::mem::take(&mut self.withheld) {
            self.bufs.recycle(b);
        }
        debug!(
            core = self.idx,
            "worker links drained; resuming client reads"
        );
    }

    /// Returns a receive buffer to the kernel, or holds it back while paused so that the
    /// kernel runs dry and the clients' bytes wait in their sockets (TCP flow control).
    fn recycle(&mut self, bid: u16) {
        if self.paused {
            self.withheld.push(bid);
        } else {
            self.bufs.recycle(bid);
        }
    }

    // ---- cross-core ----------------------------------------------------------------------

    /// Hands a worker's SEND/CLOSE for another core's connection to that core. False if the
    /// connection is this core's (or names no core), so the caller handles it here.
    /// Hands a worker's message for another core's connection to that core. False if the
    /// connection is this core's (or names no core), so the caller handles it here.
    fn mail_other_core(
        &mut self,
        w: usize,
        conn: ConnId,
        kind: CrossKind,
        flags: u8,
        data: &[u8],
    ) -> bool {
        let core = conn.core() as usize;
        if core == self.idx as usize || core >= self.mail.len() {
            return false;
        }
        let msg = CrossMsg {
            worker: w as u8,
            conn,
            kind,
            flags,
            data: data.to_vec(),
            topic: Vec::new(),
        };
        self.mail_to(core, msg)
    }

    fn mail_to(&mut self, core: usize, msg: CrossMsg) -> bool {
        if self.mail[core].send(Mail::Cross(msg)).is_err() {
            return false;
        }
        let fd = self.ring_fds[core].load(Ordering::Acquire);
        if fd >= 0 {
            let e = opcode::MsgRingData::new(types::Fd(fd), 0, ud(OP_WAKE, 0, 0), None)
                .build()
                .user_data(ud(OP_CANCEL, 0, 0));
            // SAFETY: names only the target ring's fd, which lives until the process exits
            // (core threads exit only at shutdown, after which nobody sends mail).
            unsafe { self.push(e) };
        }
        true
    }

    fn drain_inbox(&mut self) {
        while let Ok(mail) = self.inbox.try_recv() {
            let m = match mail {
                Mail::Cross(m) => m,
                Mail::Reload(r) => {
                    self.apply_reload(r);
                    continue;
                }
                Mail::Handover(sock) => {
                    self.begin_handover(sock);
                    continue;
                }
                Mail::Release => {
                    self.release();
                    continue;
                }
            };
            if self.passes_on() {
                self.forward_cross(&m);
                continue;
            }
            let w = m.worker as usize;
            CoreMetrics::inc(&self.metrics.cross_core);
            match m.kind {
                CrossKind::Send => self.deliver(w, m.conn, m.flags, &m.data),
                CrossKind::Close(code) => {
                    let reason = String::from_utf8_lossy(&m.data).into_owned();
                    self.worker_close(w, m.conn, code, &reason);
                }
                CrossKind::Subscribe => self.subscribe(w, m.conn, &m.data),
                CrossKind::Unsubscribe => self.unsubscribe(w, m.conn, &m.data),
                CrossKind::Publish => self.publish_local(&m.topic, m.flags, &m.data),
            }
        }
    }

    /// Runs with a reloaded configuration from now on (SIGHUP; see [`Reload`]).
    fn apply_reload(&mut self, r: Reload) {
        let old = std::mem::replace(&mut self.cfg, r.config);
        // What sized this core at start never changes (`Config::reload` keeps it).
        debug_assert_eq!(old.runtime.recv_buffers, self.cfg.runtime.recv_buffers);
        debug_assert_eq!(
            old.limits.max_conns_per_core,
            self.cfg.limits.max_conns_per_core
        );
        debug_assert_eq!(old.workers, self.cfg.workers);
        self.tls = r.tls;
        self.scfg = SessionConfig::new(&self.cfg);
        self.proxies = self.cfg.trusted_proxies().unwrap_or_default();
        if old.limits.idle_timeout_secs != self.cfg.limits.idle_timeout_secs
            || old.websocket.ping_interval_secs != self.cfg.websocket.ping_interval_secs
        {
            self.rearm_idle_timers();
        }
        // A smaller window may already be exceeded; a larger one is seen by `flush`.
        for w in 0..self.links.len() {
            self.check_window(w);
        }
        debug!(core = self.idx, "configuration reloaded");
        let _ = r.applied.send(self.idx);
    }

    /// Re-arms every established connection's timer for changed idle or keepalive
    /// timeouts (see [`Session::on_reload`]). Once per reload, not per event.
    fn rearm_idle_timers(&mut self) {
        let now = self.tick();
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_deref_mut() else {
                continue;
            };
            c.session.on_reload(now, &self.scfg);
            match c.session.poll_timer() {
                Some(Deadline::At(t)) => self.wheel.schedule(slot as u32, t),
                Some(Deadline::Never) => {
                    self.wheel.cancel(slot as u32);
                }
                None => {}
            }
        }
    }

    // ---- topics ---------------------------------------------------------------------------

    /// Adds one of this core's connections to a topic's subscribers.
    fn subscribe(&mut self, w: usize, conn: ConnId, topic: &[u8]) {
        let Some(c) = self.owned_conn(w, conn) else {
            return;
        };
        self.put(conn.slot(), c);
        if let Some(subs) = self.topics.get_mut(topic) {
            subs.insert(conn.raw());
        } else {
            self.topics
                .insert(topic.into(), HashSet::from([conn.raw()]));
        }
    }

    fn unsubscribe(&mut self, w: usize, conn: ConnId, topic: &[u8]) {
        let Some(c) = self.owned_conn(w, conn) else {
            return;
        };
        self.put(conn.slot(), c);
        if let Some(subs) = self.topics.get_mut(topic) {
            subs.remove(&conn.raw());
            if subs.is_empty() {
                self.topics.remove(topic);
            }
        }
    }

    /// Delivers a PUBLISH to this core's subscribers and hands it to every other core for
    /// theirs: one worker message reaches every subscriber of the gateway.
    fn publish(&mut self, w: usize, topic: &[u8], flags: u8, payload: &[u8]) {
        for core in 0..self.mail.len() {
            if core != self.idx as usize {
                let msg = CrossMsg {
                    worker: w as u8,
                    conn: ConnId::default(),
                    kind: CrossKind::Publish,
                    flags,
                    data: payload.to_vec(),
                    topic: topic.to_vec(),
                };
                self.mail_to(core, msg);
            }
        }
        self.publish_local(topic, flags, payload);
    }

    /// Sends a published message to every live subscriber on this core. Subscribers that
    /// closed are dropped from the topic here (closing does not touch topic tables).
    fn publish_local(&mut self, topic: &[u8], flags: u8, payload: &[u8]) {
        let Some(subs) = self.topics.remove(topic) else {
            return;
        };
        let mut live = HashSet::with_capacity(subs.len());
        for raw in subs {
            let id = ConnId::from_raw(raw);
            let Some(mut conn) = self.take(id.slot(), id.generation()) else {
                continue;
            };
            if conn.session.is_open() {
                self.send_message(&mut conn, id.slot(), flags, payload);
                live.insert(raw);
            }
            self.put(id.slot(), conn);
        }
        CoreMetrics::add(&self.metrics.published, live.len() as u64);
        if !live.is_empty() {
            self.topics.insert(topic.into(), live);
        }
    }

    /// Drops closed connections from every topic, now and then, so topics that are never
    /// published to do not keep dead subscribers.
    fn sweep_topics(&mut self) {
        let conns = &self.conns;
        self.topics.retain(|_, subs| {
            subs.retain(|&raw| {
                let id = ConnId::from_raw(raw);
                conns
                    .get(id.slot() as usize)
                    .and_then(|c| c.as_ref())
                    .is_some_and(|c| c.gen == id.generation())
            });
            !subs.is_empty()
        });
    }

    fn worker_close(&mut self, w: usize, conn: ConnId, code: u16, reason: &str) {
        let Some(mut c) = self.owned_conn(w, conn) else {
            return;
        };
        let slot = conn.slot();
        let cause = CloseCause {
            reason: CloseReason::WorkerClose,
            tell: Some((code, reason)),
        };
        let now = self.tick();
        c.session.close(cause, now, &mut self.turn);
        self.drive(&mut c, slot);
        self.put(slot, c);
    }
}

// ---- live upgrade ------------------------------------------------------------------------
//
// The old core (`Outgoing`): sends its listener, stops accepting, stops reading and
// writing its established connections (cancelling armed receives and sends in flight),
// lets handshakes finish for a moment, waits for the workers to acknowledge what it sent
// them, then moves the connections in batches (each socket installed as a regular fd
// with FixedFdInstall and passed with SCM_RIGHTS beside its serialised session) and ends
// with the generations, topics, unacknowledged envelopes and counters. From the first
// batch on, every worker message that reaches it is passed on instead of handled, so the
// new core applies it in order after the connection arrived. The new core (`Core::adopt`)
// reads the stream before its loop starts, installs each socket at its old slot, so every
// connection id stays the same, and starts reading once its worker links greet.

impl Core {
    /// Whether worker messages are passed on to the new process rather than handled.
    fn passes_on(&self) -> bool {
        self.up
            .as_ref()
            .is_some_and(|u| u.stage >= Stage::Exporting)
    }

    fn begin_handover(&mut self, sock: OwnedFd) {
        if self.up.is_some() || self.drain_deadline.is_some() {
            warn!(
                core = self.idx,
                "hand-over asked while draining or handing over; ignored"
            );
            return;
        }
        let Some(listener) = &self.listener else {
            warn!(core = self.idx, "no listener to hand over");
            return;
        };
        let mut body = Vec::new();
        body.put_u32(handover::FORMAT);
        body.put_u8(self.idx);
        body.put_u8(self.cores);
        body.put_u64(self.now_ms);
        body.put_u32(self.links.len() as u32);
        for l in &self.links {
            body.put_bytes(l.path.as_os_str().as_encoded_bytes());
        }
        let frame = handover::frame(handover::HEADER, &body);
        if let Err(e) = upgrade::send_frame(sock.as_fd(), &frame, &[listener.as_fd()]) {
            warn!(
                core = self.idx,
                "hand-over failed before it began ({e}); still serving"
            );
            return;
        }
        // The listener is shared with the new process now: stop accepting on it without
        // shutting it down (that would stop it listening for both).
        self.cancel_accepts();
        let now = self.now;
        self.up = Some(Box::new(Outgoing {
            sock,
            stage: Stage::Quiescing,
            begun: now,
            handshake_deadline: now + HANDOVER_HANDSHAKE_WAIT,
            ack_deadline: now + HANDOVER_ACK_WAIT,
            release_deadline: now,
            cursor: 0,
            batch: Vec::new(),
            pending: 0,
            moved: 0,
            logged_send_error: false,
        }));
        info!(
            core = self.idx,
            open = self.open,
            "live upgrade: listener handed over; stopping reads to hand connections over"
        );
        self.upgrade_step();
    }

    fn upgrade_step(&mut self) {
        match self.up.as_ref().map(|u| u.stage) {
            Some(Stage::Quiescing) => self.quiesce(),
            Some(Stage::Exporting) => self.export_step(),
            Some(Stage::Releasing) => self.release_step(),
            _ => {}
        }
    }

    /// Stops every established connection's reads and sends; drains the ones rustls
    /// holds (TLS 1.2, hibernation off), which cannot move; closes handshakes that did not
    /// finish in time. Exports once everything is still and acknowledged.
    fn quiesce(&mut self) {
        let Some(up) = self.up.as_ref() else { return };
        let (hs_over, acks_over) = (
            self.now >= up.handshake_deadline,
            self.now >= up.ack_deadline,
        );
        let now = self.tick();
        let mut still = true;
        for slot in 0..self.conns.len() {
            let Some(mut conn) = self.conns[slot].take() else {
                continue;
            };
            let slot = slot as u32;
            if conn.session.is_closing() {
            } else if conn.session.is_open() && conn.session.is_on_own_record_layer() {
                if !conn.leaving {
                    conn.leaving = true;
                    let gen = conn.gen;
                    for (armed, op) in [
                        (conn.sock.recv_armed(), OP_RECV),
                        (conn.sock.send_in_flight(), OP_SEND),
                    ] {
                        if armed {
                            let e = opcode::AsyncCancel::new(ud(op, gen, slot))
                                .build()
                                .user_data(ud(OP_CANCEL, 0, 0));
                            // SAFETY: a cancel names only a user_data value.
                            unsafe { self.push(e) };
                        }
                    }
                }
                still &= !conn.sock.recv_armed() && !conn.sock.send_in_flight();
            } else if conn.session.is_open() {
                conn.session.drain(now, &mut self.turn);
                self.drive(&mut conn, slot);
            } else if hs_over {
                let cause = CloseCause::silent(CloseReason::Upgrade);
                conn.session.close(cause, now, &mut self.turn);
                self.drive(&mut conn, slot);
            } else {
                still = false;
            }
            self.put(slot, conn);
        }
        let acked = self
            .links
            .iter()
            .all(|l| l.state != LinkState::Up || l.unacked_bytes() == 0);
        if still && (acked || acks_over) {
            if let Some(up) = self.up.as_mut() {
                up.stage = Stage::Exporting;
                debug!(
                    core = self.idx,
                    ms = up.begun.elapsed().as_millis() as u64,
                    acked,
                    "connections still; exporting"
                );
            }
            self.export_step();
        }
    }

    /// Sends the batch whose descriptors are installed, then starts the next one; after
    /// the last, the core's tail.
    fn export_step(&mut self) {
        let Some(up) = self.up.as_mut() else { return };
        if up.pending > 0 {
            return;
        }
        if !up.batch.is_empty() {
            self.send_batch();
        }
        let Some(up) = self.up.as_mut() else { return };
        if up.stage != Stage::Exporting {
            return;
        }
        let mut batch = std::mem::take(&mut up.batch);
        let mut cursor = up.cursor;
        while cursor < self.conns.len() && batch.len() < handover::MAX_FDS {
            if let Some(c) = self.conns[cursor].as_deref() {
                if c.leaving && !c.session.is_closing() {
                    batch.push((cursor as u32, c.gen, None));
                }
            }
            cursor += 1;
        }
        if batch.is_empty() {
            if let Some(up) = self.up.as_mut() {
                up.cursor = cursor;
            }
            self.send_tail();
            return;
        }
        for &(slot, gen, _) in &batch {
            let e = opcode::FixedFdInstall::new(types::Fixed(slot), 0)
                .build()
                .user_data(ud(OP_EXPORT, gen, slot));
            // SAFETY: names only the fixed slot.
            unsafe { self.push(e) };
        }
        let up = self.up.as_mut().expect("checked above");
        up.pending = batch.len();
        up.batch = batch;
        up.cursor = cursor;
    }

    fn on_export_fd(&mut self, slot: u32, gen: u32, res: i32) {
        let Some(up) = self.up.as_mut() else { return };
        if let Some(entry) = up
            .batch
            .iter_mut()
            .find(|(s, g, fd)| *s == slot && *g == gen && fd.is_none())
        {
            if res >= 0 {
                // SAFETY: the kernel just installed this descriptor in our fd table for
                // this completion; nothing else knows its number.
                entry.2 = Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(res) });
            } else {
                warn!(
                    core = self.idx,
                    slot,
                    "cannot install a connection for hand-over: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
            up.pending -= 1;
        }
        if up.pending == 0 {
            self.export_step();
        }
    }

    /// Serialises the installed batch and sends it with its sockets; the connections
    /// then leave this core without being closed (the new process holds the sockets).
    fn send_batch(&mut self) {
        let Some(up) = self.up.as_mut() else { return };
        let batch = std::mem::take(&mut up.batch);
        let now = self.tick();
        let mut body = Vec::new();
        body.put_u32(0);
        let mut fds = Vec::with_capacity(batch.len());
        let mut moved = Vec::with_capacity(batch.len());
        let mut rec = Vec::new();
        for (slot, gen, fd) in batch {
            let Some(mut conn) = self.take(slot, gen) else {
                continue;
            };
            let exported = fd.filter(|_| !conn.session.is_closing()).map(|fd| {
                rec.clear();
                rec.put_u32(slot);
                rec.put_u32(gen);
                rec.put_u8(conn.worker.unwrap_or(u8::MAX));
                rec.put_u64(conn.seq);
                handover::put_addr(&mut rec, conn.peer.addr());
                let unsent = conn.sock.unsent().to_vec();
                (fd, conn.session.export(&unsent, &mut rec))
            });
            match exported {
                Some((fd, Ok(()))) => {
                    body.put_bytes(&rec);
                    fds.push(fd);
                    moved.push((slot, conn));
                }
                Some((_, Err(why))) => {
                    debug!(core = self.idx, slot, "not handed over: {why}");
                    let cause = CloseCause::silent(CloseReason::Upgrade);
                    conn.session.close(cause, now, &mut self.turn);
                    self.drive(&mut conn, slot);
                    self.put(slot, conn);
                }
                None => {
                    if !conn.session.is_closing() {
                        let cause = CloseCause::silent(CloseReason::Upgrade);
                        conn.session.close(cause, now, &mut self.turn);
                        self.drive(&mut conn, slot);
                    }
                    self.put(slot, conn);
                }
            }
        }
        let n = (moved.len() as u32).to_le_bytes();
        body[..4].copy_from_slice(&n);
        let frame = handover::frame(handover::CONNS, &body);
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let up = self.up.as_mut().expect("checked above");
        match upgrade::send_frame(up.sock.as_fd(), &frame, &borrowed) {
            Ok(()) => {
                up.moved += moved.len() as u64;
                for (slot, conn) in moved {
                    self.forget(slot, conn);
                }
            }
            Err(e) => {
                tracing::error!(
                    core = self.idx,
                    moved = up.moved,
                    "live upgrade: the new process stopped taking connections ({e}); \
                     serving the {} not handed over yet",
                    self.open
                );
                for (slot, conn) in moved {
                    self.put(slot, conn);
                }
                self.abort_handover();
            }
        }
    }

    /// A connection handed over: it leaves the table, the counts and the timers, but its
    /// socket is not closed (the new process has it) and its generation stays.
    fn forget(&mut self, slot: u32, mut conn: Box<Conn>) {
        if conn.asleep {
            self.hibernated -= 1;
        }
        self.release_admission(&mut conn, ADMIT_PROCESS | ADMIT_IP | ADMIT_HANDSHAKE);
        self.outbound -= u64::from(conn.outq);
        self.wheel.cancel(slot);
        self.open -= 1;
        drop(conn);
        let m = &self.metrics;
        m.connections_open.store(self.open, Ordering::Relaxed);
        m.connections_hibernated
            .store(self.hibernated, Ordering::Relaxed);
    }

    /// The new process is gone mid-way: serve what is still here as before.
    fn abort_handover(&mut self) {
        self.up = None;
        for slot in 0..self.conns.len() {
            let Some(mut conn) = self.conns[slot].take() else {
                continue;
            };
            if conn.leaving {
                conn.leaving = false;
                if conn.sock.wants_recv() {
                    self.rearm.push(slot as u32);
                }
                if conn.session.wants_transmit() || conn.sock.in_flight_bytes() > 0 {
                    self.mark_dirty(&mut conn, slot as u32);
                }
            }
            self.conns[slot] = Some(conn);
        }
    }

    /// After the last batch: generations, topics, what the workers have not acknowledged
    /// and the counters.
    fn send_tail(&mut self) {
        let mut body = Vec::new();
        body.put_u32(self.gens.len() as u32);
        for &g in &self.gens {
            body.put_u32(g);
        }
        let topics = std::mem::take(&mut self.topics);
        body.put_u32(topics.len() as u32);
        for (topic, subs) in &topics {
            body.put_bytes(topic);
            body.put_u32(subs.len() as u32);
            for &id in subs {
                body.put_u64(id);
            }
        }
        let mut unacked = std::mem::take(&mut self.orphans);
        for link in &mut self.links {
            unacked.extend(link.take_unacked());
        }
        body.put_bytes(&unacked);
        let counters = self.metrics.counters();
        body.put_u32(counters.len() as u32);
        for (name, c) in counters {
            body.put_bytes(name.as_bytes());
            body.put_u64(c.load(Ordering::Relaxed));
        }
        let Some(up) = self.up.as_mut() else { return };
        let frame = handover::frame(handover::END, &body);
        if let Err(e) = upgrade::send_frame(up.sock.as_fd(), &frame, &[]) {
            tracing::error!(
                core = self.idx,
                "live upgrade: the tail did not reach the new process: {e}"
            );
        }
        up.stage = Stage::Forwarding;
        info!(
            core = self.idx,
            moved = up.moved,
            ms = up.begun.elapsed().as_millis() as u64,
            unacked = unacked.len(),
            "live upgrade: connections handed over"
        );
    }

    /// Passes a worker's envelope on to the new process.
    fn forward_late(&mut self, flags: u8, w: u8, env: &[u8]) {
        let Some(up) = self.up.as_mut() else { return };
        let mut body = Vec::with_capacity(2 + env.len());
        body.push(flags);
        body.push(w);
        body.extend_from_slice(env);
        if let Err(e) = upgrade::send_frame(
            up.sock.as_fd(),
            &handover::frame(handover::LATE, &body),
            &[],
        ) {
            if !up.logged_send_error {
                up.logged_send_error = true;
                warn!(
                    core = self.idx,
                    "a late worker message did not reach the new process: {e}"
                );
            }
        }
    }

    /// Another core's mail for this core's (handed-over) connections, passed on.
    fn forward_cross(&mut self, m: &CrossMsg) {
        let reason = String::from_utf8_lossy(&m.data);
        let msg = match m.kind {
            CrossKind::Send => Message::Send {
                conn: m.conn,
                flags: m.flags,
                payload: &m.data,
            },
            CrossKind::Close(code) => Message::Close {
                conn: m.conn,
                seq: 0,
                link_seq: 0,
                code,
                reason: &reason,
            },
            CrossKind::Subscribe => Message::Subscribe {
                conn: m.conn,
                topic: &m.data,
            },
            CrossKind::Unsubscribe => Message::Unsubscribe {
                conn: m.conn,
                topic: &m.data,
            },
            CrossKind::Publish => Message::Publish {
                flags: m.flags,
                topic: &m.topic,
                payload: &m.data,
            },
        };
        let mut env = Vec::new();
        envelope::encode(&msg, &mut env);
        let flags = if m.kind == CrossKind::Publish {
            LATE_PUBLISH_HERE
        } else {
            0
        };
        self.forward_late(flags, m.worker, &env);
    }

    /// The new process took over: close the worker links (the workers see the end of
    /// the stream and close; what they sent before still arrives and is passed on).
    fn release(&mut self) {
        let Some(up) = self.up.as_mut() else { return };
        if up.stage != Stage::Forwarding {
            warn!(core = self.idx, stage = ?up.stage, "release before the hand-over ended");
        }
        up.stage = Stage::Releasing;
        up.release_deadline = self.now + HANDOVER_RELEASE_WAIT;
        for link in &self.links {
            if let (LinkState::Up, Some(fd)) = (link.state, &link.fd) {
                let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Write);
            }
        }
        self.release_step();
    }

    fn release_step(&mut self) {
        let Some(up) = self.up.as_mut() else { return };
        let closed = self.links.iter().all(|l| l.state == LinkState::Down);
        if !closed && self.now < up.release_deadline {
            return;
        }
        let _ = upgrade::send_frame(up.sock.as_fd(), &handover::frame(handover::DONE, &[]), &[]);
        up.stage = Stage::Done;
        for w in 0..self.links.len() {
            if self.links[w].state == LinkState::Up {
                self.link_down(w, "handed over to the new process");
            }
        }
    }

    // ---- the new process's side ----

    /// Takes over the old core's listener and connections before the loop starts.
    fn adopt(&mut self, sock: OwnedFd) -> anyhow::Result<()> {
        let begun = Instant::now();
        let mut reader = upgrade::FrameReader::new(sock);
        let (kind, body) = reader.next(Instant::now() + ADOPT_FRAME_WAIT)?;
        if kind != handover::HEADER {
            anyhow::bail!("the old process's stream does not start with its header");
        }
        let mut r = Reader::new(&body);
        let format = r.u32("format")?;
        if format != handover::FORMAT {
            anyhow::bail!(
                "state format {format}, this binary reads {}",
                handover::FORMAT
            );
        }
        let (idx, cores) = (r.u8("core")?, r.u8("cores")?);
        if (idx, cores) != (self.idx, self.cores) {
            anyhow::bail!(
                "core {idx} of {cores} handed to core {} of {}",
                self.idx,
                self.cores
            );
        }
        let old_ms = r.u64("clock")?;
        let mut workers = Vec::new();
        for _ in 0..r.u32("workers")? {
            let path = r.bytes("worker path")?;
            workers.push(
                self.links
                    .iter()
                    .position(|l| l.path.as_os_str().as_encoded_bytes() == path)
                    .map(|w| w as u8),
            );
        }
        let listener = reader
            .take_fd()
            .ok_or_else(|| anyhow::anyhow!("the header came without the listener"))?;
        self.listener = Some(socket2::Socket::from(listener));
        // Continue the old core's clock, so last activities and deadlines keep their meaning.
        if let Some(start) = Instant::now().checked_sub(Duration::from_millis(old_ms)) {
            self.start = start;
            self.now = Instant::now();
            self.now_ms = (self.now - self.start).as_millis() as u64;
            let mut expired = Vec::new();
            self.wheel.advance(self.tick(), &mut expired);
        }
        let suites: Vec<&'static rustls::Tls13CipherSuite> = self
            .tls
            .crypto_provider()
            .cipher_suites
            .iter()
            .filter_map(|s| match s {
                rustls::SupportedCipherSuite::Tls13(t) => Some(*t),
                _ => None,
            })
            .collect();
        let mut late = Vec::new();
        let (mut adopted, mut failed) = (0u64, 0u64);
        loop {
            let (kind, body) = reader.next(Instant::now() + ADOPT_FRAME_WAIT)?;
            match kind {
                handover::CONNS => {
                    let mut r = Reader::new(&body);
                    for _ in 0..r.u32("batch")? {
                        let rec = r.bytes("connection")?;
                        let fd = reader.take_fd().ok_or_else(|| {
                            anyhow::anyhow!("a connection came without its socket")
                        })?;
                        match self.adopt_conn(rec, fd, &workers, &suites) {
                            Ok(()) => adopted += 1,
                            Err(e) => {
                                failed += 1;
                                self.metrics.close(CloseReason::Upgrade);
                                warn!(core = self.idx, "a handed-over connection is lost: {e}");
                            }
                        }
                    }
                }
                handover::LATE => late.push(body),
                handover::END => {
                    self.adopt_tail(&body)?;
                    break;
                }
                k => anyhow::bail!("unexpected frame {k} in the old process's stream"),
            }
        }
        self.metrics
            .connections_open
            .store(self.open, Ordering::Relaxed);
        info!(
            core = self.idx,
            adopted,
            failed,
            ms = begun.elapsed().as_millis() as u64,
            "live upgrade: connections taken over"
        );
        self.incoming = Some(Box::new(Incoming {
            reader,
            buf: vec![0; handover::CHUNK],
            armed: false,
            workers,
            late,
        }));
        Ok(())
    }

    fn adopt_conn(
        &mut self,
        rec: &[u8],
        fd: OwnedFd,
        workers: &[Option<u8>],
        suites: &[&'static rustls::Tls13CipherSuite],
    ) -> anyhow::Result<()> {
        let mut r = Reader::new(rec);
        let slot = r.u32("slot")?;
        let gen = r.u32("generation")?;
        let worker = r.u8("worker")?;
        let seq = r.u64("sequence")?;
        let peer = handover::get_addr(&mut r)?;
        let now = self.tick();
        let session = Session::import(&mut r, now, &self.scfg, suites, &mut self.turn)?;
        if slot as usize >= self.conns.len() || self.conns[slot as usize].is_some() {
            anyhow::bail!("slot {slot} is outside this core's table or taken");
        }
        self.ring
            .submitter()
            .register_files_update(slot, &[fd.as_raw_fd()])?;
        // The fixed-file table holds the socket now.
        drop(fd);
        self.gens[slot as usize] = gen;
        let mut admit = ADMIT_PROCESS;
        self.process_conns.take(0);
        if let Some(p) = peer {
            let mut limits = self.cfg.admission_limits(self.cores);
            limits.per_ip = 0;
            self.admission.hold(IpKey::of(p.ip()), &limits);
            admit |= ADMIT_IP;
        }
        let conn = Box::new(Conn {
            gen,
            session,
            sock: SocketOps::new(),
            dirty: false,
            worker: workers.get(usize::from(worker)).copied().flatten(),
            seq,
            born_ms: self.now_ms as u32,
            asleep: false,
            peer: Peer::from(peer),
            admit,
            pre: Pre::Done,
            outq: 0,
            leaving: false,
        });
        self.open += 1;
        self.put(slot, conn);
        self.adopted.push(slot);
        Ok(())
    }

    fn adopt_tail(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let mut r = Reader::new(body);
        let n = r.u32("generations")? as usize;
        for slot in 0..n {
            let g = r.u32("generation")?;
            if slot < self.gens.len() && self.conns[slot].is_none() {
                self.gens[slot] = g;
            }
        }
        for _ in 0..r.u32("topics")? {
            let topic = r.bytes("topic")?;
            let mut subs = HashSet::new();
            for _ in 0..r.u32("subscribers")? {
                let id = ConnId::from_raw(r.u64("subscriber")?);
                let live = self
                    .conns
                    .get(id.slot() as usize)
                    .and_then(|c| c.as_ref())
                    .is_some_and(|c| c.gen == id.generation());
                if live {
                    subs.insert(id.raw());
                }
            }
            if !subs.is_empty() {
                self.topics.insert(topic.into(), subs);
            }
        }
        let unacked = r.bytes("unacknowledged")?;
        // Checked here, so a replay never meets a malformed envelope.
        let mut off = 0;
        while off < unacked.len() {
            match envelope::decode(&unacked[off..], usize::MAX) {
                Ok(Some((_, used))) => off += used,
                _ => anyhow::bail!("malformed unacknowledged envelopes"),
            }
        }
        self.orphans.extend_from_slice(unacked);
        let mine = self.metrics.counters();
        for _ in 0..r.u32("counters")? {
            let name = r.str("counter")?;
            let v = r.u64("counter value")?;
            if let Some((_, c)) = mine.iter().find(|(n, _)| n == name) {
                CoreMetrics::add(c, v);
            }
        }
        Ok(())
    }

    /// Starts the adopted connections once the worker links greeted (from `arm_accept`'s
    /// wait): their timers, their queued bytes, their reads, then the late worker
    /// messages that came with them, then the receive for later ones.
    fn start_adopted(&mut self) {
        for slot in std::mem::take(&mut self.adopted) {
            let Some(mut conn) = self.conns[slot as usize].take() else {
                continue;
            };
            self.drive(&mut conn, slot);
            let gen = conn.gen;
            self.put(slot, conn);
            self.arm_recv(slot, gen);
        }
        let late = self
            .incoming
            .as_mut()
            .map(|i| std::mem::take(&mut i.late))
            .unwrap_or_default();
        for body in late {
            self.on_late(&body);
        }
        self.arm_upgrade_recv();
    }

    fn arm_upgrade_recv(&mut self) {
        let Some(inc) = self.incoming.as_mut() else {
            return;
        };
        if inc.armed {
            return;
        }
        inc.armed = true;
        let fd = inc.reader.sock().as_raw_fd();
        let (ptr, len) = (inc.buf.as_mut_ptr(), inc.buf.len() as u32);
        let e = opcode::Recv::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(ud(OP_UPGRADE_RECV, 0, 0));
        // SAFETY: `buf` lives in the boxed `Incoming`, which is dropped only after this
        // receive completed (`on_upgrade_recv` clears `armed` first), or with the core.
        unsafe { self.push(e) };
    }

    fn on_upgrade_recv(&mut self, res: i32) {
        let Some(mut inc) = self.incoming.take() else {
            return;
        };
        inc.armed = false;
        if res <= 0 {
            if res < 0 {
                debug!(
                    core = self.idx,
                    "upgrade socket: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
            return;
        }
        let n = res as usize;
        let chunk = inc.buf[..n].to_vec();
        inc.reader.push(&chunk);
        let mut done = false;
        loop {
            match inc.reader.buffered() {
                Ok(Some((handover::LATE, body))) => {
                    self.incoming = Some(inc);
                    self.on_late(&body);
                    inc = self.incoming.take().expect("put back above");
                }
                Ok(Some((handover::DONE, _))) => {
                    done = true;
                    break;
                }
                Ok(Some((k, _))) => {
                    warn!(core = self.idx, "unexpected frame {k} after the hand-over");
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(core = self.idx, "upgrade socket: {e}");
                    done = true;
                    break;
                }
            }
        }
        if !done {
            self.incoming = Some(inc);
            self.arm_upgrade_recv();
        } else {
            debug!(core = self.idx, "the old process closed its worker links");
        }
    }

    /// A worker message the old core passed on, handled as if it came on our own link.
    fn on_late(&mut self, body: &[u8]) {
        let (Some(&flags), Some(&w_old)) = (body.first(), body.get(1)) else {
            return;
        };
        let mapped = self
            .incoming
            .as_ref()
            .and_then(|i| i.workers.get(usize::from(w_old)).copied().flatten());
        let Some(w) = mapped.or((!self.links.is_empty()).then_some(0)) else {
            return;
        };
        let Ok(Some((msg, _))) = envelope::decode(&body[2..], usize::MAX) else {
            warn!(core = self.idx, "a malformed late worker message");
            return;
        };
        match msg {
            Message::Publish {
                flags: f,
                topic,
                payload,
            } if flags & LATE_PUBLISH_HERE != 0 => self.publish_local(topic, f, payload),
            msg => {
                if let Err(why) = self.on_envelope(usize::from(w), msg) {
                    warn!(core = self.idx, "a late worker message: {why}");
                }
            }
        }
    }
}

/// How many of `total` connections should have been told to go away `elapsed` into a
/// drain whose GOAWAYs are spread evenly over `spread`: all of them once it has passed.
pub fn drain_due(total: u64, elapsed: Duration, spread: Duration) -> u64 {
    if spread.is_zero() || elapsed >= spread {
        u64::MAX
    } else {
        (total as f64 * elapsed.as_secs_f64() / spread.as_secs_f64()).ceil() as u64
    }
}

/// Wakes core rings from the control thread, which has no ring of its own: a small plain
/// ring used only to send MSG_RING (the same `OP_WAKE` the cores send each other), so a
/// core reads its inbox at once instead of at its next 100 ms timeout.
pub struct ControlWaker {
    ring: IoUring,
    ring_fds: Arc<Vec<std::sync::atomic::AtomicI32>>,
}

impl ControlWaker {
    pub fn new(ring_fds: Arc<Vec<std::sync::atomic::AtomicI32>>) -> std::io::Result<ControlWaker> {
        Ok(ControlWaker {
            // One entry per core (at most 255), so the queue never fills.
            ring: IoUring::new(256)?,
            ring_fds,
        })
    }

    /// Wakes every core whose ring is published; waits for the MSG_RINGs to be posted.
    pub fn wake_all(&mut self) -> std::io::Result<()> {
        let mut sent = 0;
        for fd in self.ring_fds.iter() {
            let fd = fd.load(Ordering::Acquire);
            if fd < 0 {
                continue;
            }
            let e = opcode::MsgRingData::new(types::Fd(fd), 0, ud(OP_WAKE, 0, 0), None)
                .build()
                .user_data(ud(OP_CANCEL, 0, 0));
            // SAFETY: names only the target ring's fd, which stays open until its core has
            // drained and unpublished it; the control thread wakes nobody while draining.
            unsafe { self.ring.submission().push(&e) }
                .map_err(|_| std::io::Error::other("control ring full"))?;
            sent += 1;
        }
        self.ring.submit_and_wait(sent)?;
        for cqe in self.ring.completion() {
            if cqe.result() < 0 {
                warn!(
                    "waking a core failed: {}",
                    std::io::Error::from_raw_os_error(-cqe.result())
                );
            }
        }
        Ok(())
    }
}

/// One SO_REUSEPORT listener on `addr`: what `main` binds per core at start, and what a
/// core binds again when it listens after a full table.
pub fn bind_listener(
    addr: std::net::SocketAddr,
    runtime: &crate::config::Runtime,
) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY (small frames must not wait for Nagle) and
    // SO_KEEPALIVE (so the kernel reaps clients that vanished, per the tuning profile's
    // tcp_keepalive_* settings, at no cost to the event loop).
    s.set_nodelay(true)?;
    s.set_keepalive(true)?;
    // And SO_SNDBUF, with the lock that turns autotuning off (see the config key).
    if runtime.socket_send_buffer > 0 {
        s.set_send_buffer_size(runtime.socket_send_buffer as usize)?;
    }
    s.bind(&addr.into())?;
    s.listen(runtime.backlog.min(i32::MAX as u32) as i32)?;
    Ok(s)
}

/// Runs one core to completion on the current thread.
pub fn run_core(spec: CoreSpec, ready: mpsc::Sender<Result<CoreReady, String>>) {
    let idx = spec.index;
    match Core::new(spec) {
        Ok((core, info)) => {
            let _ = ready.send(Ok(info));
            if let Err(e) = core.run() {
                tracing::error!(core = idx, "core stopped: {e:#}");
            }
        }
        Err(e) => {
            let _ = ready.send(Err(format!("core {idx}: {e:#}")));
        }
    }
}

#[cfg(test)]
mod tests {
    /// An idle connection's box is most of the gateway's own memory per connection;
    /// growing it is a decision, not an accident.
    #[test]
    fn connection_state_stays_small() {
        // A hibernated connection is its Conn box and nothing else on the heap but its
        // SNI: this box is most of the 512 B budget per idle connection.
        let conn = std::mem::size_of::<super::Conn>();
        let session = std::mem::size_of::<crate::session::Session>();
        let sock = std::mem::size_of::<crate::inflight::SocketOps>();
        eprintln!("Conn {conn} B (Session {session} B, SocketOps {sock} B)");
        assert!(conn <= 344, "Conn is {conn} B");
    }

    #[test]
    fn drain_spreads_goaways_evenly_then_tells_everyone() {
        use super::drain_due;
        use std::time::Duration;
        let spread = Duration::from_secs(5);
        let ms = Duration::from_millis;
        assert_eq!(drain_due(1000, ms(0), spread), 0);
        assert_eq!(drain_due(1000, ms(1), spread), 1, "the first goes at once");
        assert_eq!(drain_due(1000, ms(1000), spread), 200);
        assert_eq!(drain_due(1000, ms(2500), spread), 500);
        assert_eq!(drain_due(1000, ms(4999), spread), 1000);
        assert_eq!(drain_due(1000, spread, spread), u64::MAX);
        assert_eq!(
            drain_due(3, ms(1), Duration::ZERO),
            u64::MAX,
            "no spread: all now"
        );
        // Monotonic: a later pass never owes fewer.
        let mut last = 0;
        for t in 0..5000 {
            let due = drain_due(777, ms(t), spread);
            assert!(due >= last);
            last = due;
        }
    }

    #[test]
    fn user_data_round_trips() {
        for (op, gen, slot) in [(1, 0, 0), (9, 0xff_ffff, u32::MAX), (3, 77, 12345)] {
            assert_eq!(super::ud_parts(super::ud(op, gen, slot)), (op, gen, slot));
        }
    }
}
