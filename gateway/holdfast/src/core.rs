//! The per-core event loop: one thread, one io_uring ring, one SO_REUSEPORT listener, a
//! slice of the connection table, a timing wheel, a link to every worker, its own counters.
//! Nothing here is shared with another core.
//!
//! Lifetimes of memory named by submissions (the `unsafe` in this module is all about this):
//! - receive buffers belong to the [`BufRing`] (see `ring.rs`);
//! - a connection's outbound bytes live in `Conn::out`, which is never touched while
//!   `send_inflight` is set, and the `Conn` (boxed, so it never moves) is freed only after
//!   the Close completion, which is submitted only when no receive or send is in flight;
//! - a link's `rbuf` and `out` are likewise frozen while its receive or send is in flight,
//!   and the link's socket is closed only when neither is.
//!
//! The connection slot is the direct-descriptor slot the kernel picked at accept (or the
//! fd number in the regular-fd fallback), so a connection needs no separate index.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use holdfast_wire::envelope::{self, Message, Role};
use holdfast_wire::frame::{self, close_code, Frame, FrameError, FrameType};
use holdfast_wire::{ws, ConnId};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::link::{Link, LinkState};
use crate::metrics::{CloseReason, CoreMetrics};
use crate::ring::{build_ring, peer_of_installed_fd, BufRing, RingFeatures};
use crate::route;
use crate::tls::{TlsEnd, TlsSession, VecSink as Sink};
use crate::wheel::TimerWheel;

/// What a core thread is started with.
pub struct CoreSpec {
    pub index: u8,
    pub cores: u8,
    pub config: Arc<Config>,
    pub tls: Arc<rustls::ServerConfig>,
    pub listener: socket2::Socket,
    pub metrics: Arc<CoreMetrics>,
    pub shutdown: Arc<AtomicBool>,
    /// The soft open-file limit, which bounds the fixed-file table.
    pub nofile: u64,
    /// Cross-core mail: a sender to every core's inbox (indexed by core) and this core's
    /// inbox, plus every core's ring fd (published at start) for MSG_RING wake-ups.
    pub mail: Vec<mpsc::Sender<Mail>>,
    pub inbox: mpsc::Receiver<Mail>,
    pub ring_fds: Arc<Vec<std::sync::atomic::AtomicI32>>,
}

/// What arrives in a core's inbox, each followed by a MSG_RING wake-up of its ring.
pub enum Mail {
    /// From another core: a worker message for a connection this core owns.
    Cross(CrossMsg),
    /// From the control thread (SIGHUP): the configuration from now on.
    Reload(Reload),
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
    pub features: RingFeatures,
    pub direct: bool,
    pub table: u32,
}

// user_data layout: op (8 bits) | generation or link epoch (24 bits) | slot or link (32 bits)
const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_SHUTDOWN: u64 = 4;
const OP_CLOSE: u64 = 5;
const OP_PEER: u64 = 6;
const OP_LINK_RECV: u64 = 7;
const OP_LINK_SEND: u64 = 8;
const OP_CANCEL: u64 = 9;
const OP_WAKE: u64 = 10;

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

/// What an established connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    /// No ALPN and no byte yet: the first byte decides ('G' starts an HTTP request).
    Sniff,
    Native,
    /// Waiting for (the rest of) the HTTP upgrade request.
    Http,
    WebSocket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Open,
    Closing,
}

/// One client connection. Boxed in the table so its buffers never move while the kernel
/// reads them. An idle established connection holds the rustls session and empty Vecs.
struct Conn {
    gen: u32,
    phase: Phase,
    recv_armed: bool,
    send_inflight: bool,
    shutdown_submitted: bool,
    /// The Shutdown completed. Close waits for it: a Shutdown still queued on an io-wq
    /// thread after the slot was closed and reused would shut the next client down.
    shutdown_done: bool,
    /// The close-flush deadline passed: stop lingering, cut the connection.
    force_close: bool,
    cancel_submitted: bool,
    /// Close gracefully: FIN after our last bytes, then wait for the client's FIN.
    linger: bool,
    proto: Proto,
    /// WebSocket: message assembly state (2 bytes) and whether our ping awaits its pong.
    ws: ws::MessageAssembler,
    ping_outstanding: bool,
    /// Tick at which the outstanding ping went out.
    ping_sent: u32,
    close_submitted: bool,
    dirty: bool,
    /// The worker that was sent OPEN for this connection, if any.
    worker: Option<u8>,
    /// Per-connection sequence of frames sent to the worker (OPEN is 0).
    seq: u64,
    /// Tick (second) of the last client traffic; u32 covers 136 years of uptime.
    last_active: u32,
    /// Milliseconds since core start at accept, for the handshake-duration histogram.
    born_ms: u32,
    peer: Option<SocketAddr>,
    tls: TlsSession,
    /// TLS input rustls has not consumed yet (a record split across receives).
    staging: Vec<u8>,
    /// Plaintext of a frame (or HTTP request) not yet complete.
    partial: Vec<u8>,
    /// A fragmented WebSocket message being assembled; empty (unallocated) otherwise.
    ws_msg: Vec<u8>,
    /// Bytes being sent; frozen while `send_inflight`.
    out: Vec<u8>,
    out_off: usize,
    /// Bytes produced while a send was in flight.
    queued: Vec<u8>,
}

impl Conn {
    fn backlog(&self) -> usize {
        self.out.len() - self.out_off + self.queued.len()
    }
}

// Records and handshake messages from a client are far below this; more is an attack.
const MAX_STAGING: usize = 128 * 1024;
// Seconds a closing connection may take to flush its last bytes and, when it lingers, for
// the client to read them and close its side, before it is cut.
const CLOSE_FLUSH_SECS: u64 = 3;
// How often closed connections are pruned from topics nobody publishes to.
const TOPIC_SWEEP_SECS: u64 = 60;
// How long a starting core waits for connected workers' HELLOs before it accepts clients.
const STARTUP_HELLO_WAIT: Duration = Duration::from_secs(2);
const UNKNOWN_PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

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
    accept_armed: bool,
    table_full: bool,
    conns: Vec<Option<Box<Conn>>>,
    gens: Vec<u32>,
    open: u64,
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
    plain: Vec<u8>,
    reply: Vec<u8>,
    scratch: Vec<u8>,
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
    ws_cfg: ws::HandshakeConfig,
    /// This core's topic subscriptions: topic -> its subscribers among this core's
    /// connections (raw connection ids; closed ones are pruned lazily).
    topics: HashMap<Box<[u8]>, HashSet<u64>>,
    last_sweep: u64,
}

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
            listener: Some(spec.listener),
            direct,
            accept_armed: false,
            table_full: false,
            conns,
            gens: vec![0; table as usize],
            open: 0,
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
            plain: Vec::new(),
            reply: Vec::new(),
            scratch: Vec::new(),
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
            ws_cfg: ws::HandshakeConfig {
                path: cfg.websocket.path.clone(),
                allowed_origins: cfg.websocket.allowed_origins.clone(),
                subprotocols: cfg.websocket.subprotocols.clone(),
            },
            topics: HashMap::new(),
            last_sweep: 0,
            cfg,
        };
        Ok((
            core,
            CoreReady {
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
            let wait_ms = if self.drain_deadline.is_some() {
                20
            } else {
                100
            };
            ts = ts.sec(0).nsec(wait_ms * 1_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let waited = Instant::now();
            CoreMetrics::add(
                &self.metrics.submissions,
                std::mem::take(&mut self.submissions),
            );
            let wait_result = self.ring.submitter().submit_with_args(1, &args);
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
            if self.shutdown.load(Ordering::Relaxed) && self.drain_deadline.is_none() {
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
            OP_ACCEPT => self.on_accept(res, flags),
            OP_RECV => self.on_recv(slot, gen, res, flags),
            OP_SEND => self.on_send(slot, gen, res),
            OP_SHUTDOWN => self.on_shutdown(slot, gen),
            OP_CLOSE => self.on_close(slot, gen),
            OP_PEER => self.on_peer(slot, gen, res),
            OP_LINK_RECV => self.on_link_recv(slot as usize, gen, res),
            OP_LINK_SEND => self.on_link_send(slot as usize, gen, res),
            OP_CANCEL => {}
            OP_WAKE => self.drain_inbox(),
            _ => debug_assert!(false, "unknown completion {user_data:#x}"),
        }
    }

    // ---- accept ------------------------------------------------------------------------

    fn arm_accept(&mut self) {
        if self.accept_armed || self.table_full || self.drain_deadline.is_some() {
            return;
        }
        // At start, give workers that accepted our dial a moment to say HELLO before taking
        // clients, so the first frames find a live link. Clients meanwhile wait in the
        // listen backlog; a worker that is down is not waited for.
        let greeting = self
            .links
            .iter()
            .any(|l| l.state == LinkState::Up && !l.hello_seen);
        if greeting && self.start.elapsed() < STARTUP_HELLO_WAIT {
            return;
        }
        let Some(l) = &self.listener else { return };
        let e = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
            .allocate_file_index(self.direct)
            .build()
            .user_data(ud(OP_ACCEPT, 0, 0));
        // SAFETY: multishot accept names only the listener fd, which lives in `self.listener`
        // until the core exits (drain shuts it down but keeps it open); `resume_listening`
        // replaces it only while no accept is armed.
        unsafe { self.push(e) };
        self.accept_armed = true;
    }

    /// The table is full: stop listening, so that SO_REUSEPORT hashes new clients to the
    /// other cores' listeners (or the kernel refuses them when every core is full) instead
    /// of leaving them in this listener's backlog, connected as far as they can tell and
    /// never served. Shutting the listener down also ends the multishot accept.
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
    /// were refused while it "listened".) The old socket is closed once its multishot
    /// accept has ended.
    fn resume_listening(&mut self) {
        if self.accept_armed {
            return;
        }
        let Some(old) = &self.listener else { return };
        let fresh = old
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| std::io::Error::other("not an IP address"))
            })
            .and_then(|addr| bind_listener(addr, self.cfg.runtime.backlog));
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

    fn on_accept(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res < 0 {
            let errno = -res;
            // A listener shut down (drain, or a full table) ends the multishot accept.
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
            self.metrics.close(CloseReason::TableFull);
            let e = on_socket!(self.direct, slot, |fd| opcode::Close::new(fd).build())
                .user_data(ud(OP_CANCEL, 0, 0));
            // SAFETY: Close names only the descriptor.
            unsafe { self.push(e) };
            return;
        }
        let tls = match TlsSession::new(self.tls.clone()) {
            Ok(t) => t,
            Err(e) => {
                warn!(core = self.idx, "cannot create TLS session: {e}");
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
        let now = self.tick();
        self.conns[slot as usize] = Some(Box::new(Conn {
            gen,
            phase: Phase::Handshake,
            recv_armed: false,
            send_inflight: false,
            shutdown_submitted: false,
            shutdown_done: false,
            force_close: false,
            cancel_submitted: false,
            linger: false,
            proto: Proto::Sniff,
            ws: ws::MessageAssembler::new(),
            ping_outstanding: false,
            ping_sent: 0,
            close_submitted: false,
            dirty: false,
            worker: None,
            seq: 0,
            last_active: now as u32,
            born_ms: self.now_ms as u32,
            peer: None,
            tls,
            staging: Vec::new(),
            partial: Vec::new(),
            ws_msg: Vec::new(),
            out: Vec::new(),
            out_off: 0,
            queued: Vec::new(),
        }));
        self.wheel
            .schedule(slot, now + self.cfg.limits.handshake_timeout_secs + 1);
        self.arm_recv(slot, gen);
        if self.direct {
            let e = opcode::FixedFdInstall::new(types::Fixed(slot), 0)
                .build()
                .user_data(ud(OP_PEER, gen, slot));
            // SAFETY: names only the fixed slot.
            unsafe { self.push(e) };
        } else {
            let raw = BorrowedRaw(slot as i32);
            let peer = socket2::SockRef::from(&raw)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket());
            if let Some(c) = self.conns[slot as usize].as_mut() {
                c.peer = peer;
            }
        }
    }

    fn on_peer(&mut self, slot: u32, gen: u32, res: i32) {
        if res < 0 {
            return;
        }
        let peer = peer_of_installed_fd(res);
        if let Some(c) = self.conn_mut(slot, gen) {
            c.peer = peer;
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
            c.recv_armed = true;
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
            conn.recv_armed = false;
        }
        if res > 0 {
            let b = bid.expect("a receive with data names its buffer");
            if conn.phase != Phase::Closing {
                self.ingest(&mut conn, slot, b, res as usize);
            }
            self.recycle(b);
            if !more && conn.phase != Phase::Closing {
                self.rearm.push(slot);
            }
        } else if res == 0 {
            let reason = if conn.partial.is_empty() && conn.staging.is_empty() {
                CloseReason::PeerClosed
            } else {
                CloseReason::EofMidFrame
            };
            self.begin_close(&mut conn, slot, reason, None);
        } else {
            match -res {
                libc::ENOBUFS => {
                    CoreMetrics::inc(&self.metrics.recv_buffers_exhausted);
                    if conn.phase != Phase::Closing {
                        self.rearm.push(slot);
                    }
                }
                libc::ECANCELED => {}
                libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT | libc::EHOSTUNREACH => {
                    self.begin_close(&mut conn, slot, CloseReason::PeerReset, None)
                }
                e => {
                    debug!(
                        core = self.idx,
                        slot,
                        "receive failed: {}",
                        std::io::Error::from_raw_os_error(e)
                    );
                    self.begin_close(&mut conn, slot, CloseReason::Internal, None)
                }
            }
        }
        self.progress_close(&mut conn, slot, false);
        self.put(slot, conn);
    }

    /// Feeds received TLS bytes to the session, then the plaintext to the frame decoder.
    fn ingest(&mut self, conn: &mut Conn, slot: u32, bid: u16, n: usize) {
        self.plain.clear();
        let fed = if conn.staging.is_empty() {
            let buf = self.bufs.buffer_mut(bid, n);
            let fed = conn
                .tls
                .feed(buf, &mut Sink::new(&mut conn.queued, &mut self.plain));
            if fed.consumed < n && fed.end.is_none() {
                conn.staging.extend_from_slice(&buf[fed.consumed..]);
            }
            fed
        } else {
            conn.staging.extend_from_slice(self.bufs.buffer_mut(bid, n));
            let fed = conn.tls.feed(
                &mut conn.staging,
                &mut Sink::new(&mut conn.queued, &mut self.plain),
            );
            conn.staging.drain(..fed.consumed);
            if conn.staging.is_empty() {
                conn.staging = Vec::new();
            }
            fed
        };
        if !conn.queued.is_empty() {
            self.mark_dirty(conn, slot);
        }
        if fed.handshake_done {
            conn.phase = Phase::Open;
            conn.proto = match conn.tls.alpn() {
                Some(b"http/1.1") => Proto::Http,
                Some(_) => Proto::Native,
                None if self.cfg.websocket.enabled => Proto::Sniff,
                None => Proto::Native,
            };
            CoreMetrics::inc(&self.metrics.handshakes_ok);
            let now_ms = self.now_ms as u32;
            self.metrics
                .observe_handshake(now_ms.wrapping_sub(conn.born_ms));
            self.schedule_idle(slot);
            // Tell a worker now, so it sees connections that never send a frame.
            let id = ConnId::new(self.idx, conn.gen, slot);
            if let Some(w) = route::pick_mask(id.raw(), self.live_mask) {
                self.open_on(conn, id, w as u8);
            }
        }
        conn.last_active = self.tick() as u32;
        if !self.plain.is_empty() && conn.phase == Phase::Open {
            self.on_plaintext(conn, slot);
        }
        match fed.end {
            Some(TlsEnd::PeerClosed) => {
                let reason = if conn.partial.is_empty() {
                    CloseReason::PeerClosed
                } else {
                    CloseReason::EofMidFrame
                };
                self.begin_close(conn, slot, reason, None);
            }
            Some(TlsEnd::Error) => {
                if conn.phase == Phase::Handshake {
                    CoreMetrics::inc(&self.metrics.handshakes_failed);
                }
                self.begin_close(conn, slot, CloseReason::TlsError, None);
            }
            None if conn.staging.len() > MAX_STAGING => {
                self.begin_close(conn, slot, CloseReason::TlsError, None)
            }
            None => {}
        }
    }

    fn schedule_idle(&mut self, slot: u32) {
        let idle = self.cfg.limits.idle_timeout_secs;
        if idle == 0 {
            self.wheel.cancel(slot);
        } else {
            self.wheel.schedule(slot, self.tick() + idle + 1);
        }
    }

    /// WebSocket connections are kept alive by the gateway's pings instead of the idle timeout.
    fn schedule_keepalive(&mut self, slot: u32) {
        let every = self.cfg.websocket.ping_interval_secs;
        let idle = self.cfg.limits.idle_timeout_secs;
        match [every, idle].into_iter().filter(|&t| t > 0).min() {
            None => {
                self.wheel.cancel(slot);
            }
            Some(t) => self.wheel.schedule(slot, self.tick() + t + 1),
        }
    }

    /// A WebSocket connection's timer fired: ping it if it has been silent, close it if
    /// the last ping went unanswered.
    fn ws_keepalive(&mut self, conn: &mut Conn, slot: u32, now: u64) {
        let every = self.cfg.websocket.ping_interval_secs;
        let idle = self.cfg.limits.idle_timeout_secs;
        let last = u64::from(conn.last_active);
        if idle > 0 && last + idle <= now {
            let why = "idle timeout";
            let close = Some((close_code::GOING_AWAY, why));
            self.begin_close(conn, slot, CloseReason::IdleTimeout, close);
            return;
        }
        // Any traffic from the client answers a ping as well as a pong does.
        if conn.ping_outstanding && last >= u64::from(conn.ping_sent) {
            conn.ping_outstanding = false;
        }
        let mut next = if idle > 0 { last + idle } else { u64::MAX };
        if every > 0 {
            if conn.ping_outstanding {
                if now >= u64::from(conn.ping_sent) + every {
                    let close = Some((close_code::GOING_AWAY, "no pong"));
                    self.begin_close(conn, slot, CloseReason::IdleTimeout, close);
                    return;
                }
                next = next.min(u64::from(conn.ping_sent) + every);
            } else if last + every <= now {
                let mut f = std::mem::take(&mut self.scratch);
                f.clear();
                ws::encode_ping(b"holdfast", &mut f);
                self.send_plain(conn, slot, &f);
                self.scratch = f;
                conn.ping_outstanding = true;
                conn.ping_sent = now as u32;
                next = next.min(now + every);
            } else {
                next = next.min(last + every);
            }
        }
        if next != u64::MAX {
            self.wheel.schedule(slot, next + 1);
        }
    }

    /// Decodes frames from the plaintext just received (after any partial frame).
    fn on_plaintext(&mut self, conn: &mut Conn, slot: u32) {
        if conn.proto == Proto::Sniff {
            conn.proto = if self.plain[0] == b'G' {
                Proto::Http
            } else {
                Proto::Native
            };
        }
        match conn.proto {
            Proto::Native | Proto::Sniff => self.native_input(conn, slot),
            Proto::Http => self.http_input(conn, slot),
            Proto::WebSocket => self.ws_input(conn, slot),
        }
    }

    /// The HTTP upgrade request (accumulated in `partial`): 101 and WebSocket from here on,
    /// or an HTTP error and a close.
    fn http_input(&mut self, conn: &mut Conn, slot: u32) {
        conn.partial.extend_from_slice(&self.plain);
        let mut response = Vec::new();
        match ws::parse_upgrade(&conn.partial, &self.ws_cfg) {
            Ok(None) => {}
            Ok(Some((upgrade, used))) => {
                ws::write_accept_response(&upgrade, &mut response);
                let rest = conn.partial[used..].to_vec();
                conn.partial = Vec::new();
                self.send_plain(conn, slot, &response);
                conn.proto = Proto::WebSocket;
                self.schedule_keepalive(slot);
                if !rest.is_empty() {
                    self.plain.clear();
                    self.plain.extend_from_slice(&rest);
                    self.ws_input(conn, slot);
                }
            }
            Err(e) => {
                e.http_response(&mut response);
                conn.partial = Vec::new();
                self.send_plain(conn, slot, &response);
                debug!(core = self.idx, slot, "refused HTTP request: {e}");
                self.begin_close(conn, slot, CloseReason::BadUpgrade, None);
            }
        }
    }

    /// WebSocket frames: messages to the worker, pings answered here, close handshake.
    fn ws_input(&mut self, conn: &mut Conn, slot: u32) {
        let mut plain = std::mem::take(&mut self.plain);
        let mut data = std::mem::take(&mut conn.partial);
        let input: &mut Vec<u8> = if data.is_empty() {
            &mut plain
        } else {
            data.extend_from_slice(&plain);
            &mut data
        };
        let mut msg = std::mem::take(&mut conn.ws_msg);
        let max = self.cfg.limits.max_frame;
        let mut off = 0;
        let mut stop = false;
        while !stop {
            let limit = conn.ws.frame_limit(&msg, max);
            let frame = match ws::decode_frame(&mut input[off..], limit) {
                Ok(Some((frame, used))) => {
                    off += used;
                    frame
                }
                Ok(None) => break,
                Err(e) => {
                    self.ws_fail(conn, slot, e);
                    break;
                }
            };
            match conn.ws.push(frame, &mut msg, max) {
                Ok(None) => {}
                Ok(Some(ws::Event::Message { text, data })) => {
                    let flags = if text { envelope::flags::TEXT } else { 0 };
                    stop = !self.forward(conn, slot, data, flags);
                }
                Ok(Some(ws::Event::Ping(p))) => {
                    CoreMetrics::inc(&self.metrics.pings);
                    ws::encode_pong(p, &mut self.reply);
                }
                Ok(Some(ws::Event::Pong(_))) => conn.ping_outstanding = false,
                Ok(Some(ws::Event::Close { code, .. })) => {
                    self.reply_frame(conn, slot);
                    let code = code.unwrap_or(NO_STATUS);
                    self.begin_close(conn, slot, CloseReason::PeerClosed, Some((code, "")));
                    stop = true;
                }
                Err(e) => {
                    self.ws_fail(conn, slot, e);
                    stop = true;
                }
            }
        }
        if conn.phase != Phase::Closing && off < input.len() {
            conn.partial = input[off..].to_vec();
        }
        // An idle connection keeps no message buffer.
        conn.ws_msg = if conn.ws.in_message() {
            msg
        } else {
            Vec::new()
        };
        self.reply_frame(conn, slot);
        plain.clear();
        self.plain = plain;
    }

    fn ws_fail(&mut self, conn: &mut Conn, slot: u32, e: ws::WsError) {
        self.reply_frame(conn, slot);
        let reason = match e.close_code() {
            close_code::TOO_LARGE => CloseReason::FrameTooLarge,
            close_code::INVALID_PAYLOAD => CloseReason::InvalidPayload,
            _ => CloseReason::ProtocolError,
        };
        let why = e.to_string();
        self.begin_close(conn, slot, reason, Some((e.close_code(), &why)));
    }

    /// Native frames: DATA to the worker, PING answered here, CLOSE, errors.
    fn native_input(&mut self, conn: &mut Conn, slot: u32) {
        let plain = std::mem::take(&mut self.plain);
        let mut data = std::mem::take(&mut conn.partial);
        let input: &[u8] = if data.is_empty() {
            &plain
        } else {
            data.extend_from_slice(&plain);
            &data
        };
        let max = self.cfg.limits.max_frame;
        let mut off = 0;
        let mut stop = false;
        while !stop {
            match frame::decode(&input[off..], max) {
                Ok(Some((f, used))) => {
                    off += used;
                    match f {
                        Frame::Data(p) => stop = !self.forward(conn, slot, p, 0),
                        Frame::Ping(p) => {
                            CoreMetrics::inc(&self.metrics.pings);
                            frame::encode(FrameType::Pong, p, &mut self.reply);
                        }
                        Frame::Pong(_) => {}
                        Frame::Close { .. } => {
                            self.reply_frame(conn, slot);
                            self.begin_close(
                                conn,
                                slot,
                                CloseReason::PeerClosed,
                                Some((close_code::NORMAL, "")),
                            );
                            stop = true;
                        }
                        Frame::GoAway(_) => {
                            self.reply_frame(conn, slot);
                            let why = "GOAWAY is sent by the gateway only";
                            self.begin_close(
                                conn,
                                slot,
                                CloseReason::ProtocolError,
                                Some((close_code::PROTOCOL_ERROR, why)),
                            );
                            stop = true;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.reply_frame(conn, slot);
                    let (reason, why) = match e {
                        FrameError::TooLarge { .. } => {
                            (CloseReason::FrameTooLarge, "frame too large")
                        }
                        FrameError::UnknownType(_) => {
                            (CloseReason::UnknownFrameType, "unknown frame type")
                        }
                        FrameError::BadClose => (CloseReason::ProtocolError, "malformed CLOSE"),
                    };
                    self.begin_close(conn, slot, reason, Some((e.close_code(), why)));
                    stop = true;
                }
            }
        }
        if !stop && off < input.len() {
            let rest = input[off..].to_vec();
            conn.partial = rest;
        }
        self.reply_frame(conn, slot);
        self.plain = plain;
    }

    /// Encrypts the frames gathered in `self.reply` (PONGs) towards the client.
    fn reply_frame(&mut self, conn: &mut Conn, slot: u32) {
        if self.reply.is_empty() {
            return;
        }
        let reply = std::mem::take(&mut self.reply);
        self.send_plain(conn, slot, &reply);
        self.reply = reply;
        self.reply.clear();
    }

    /// Queues plaintext towards the client, encrypted; closes a slow consumer.
    fn send_plain(&mut self, conn: &mut Conn, slot: u32, data: &[u8]) {
        if conn.phase == Phase::Closing && conn.shutdown_submitted {
            return;
        }
        let r = conn.tls.encrypt(
            &mut conn.staging,
            data,
            &mut Sink::new(&mut conn.queued, &mut self.plain),
        );
        if r.is_err() {
            // A record that failed earlier in the same receive (a PING answered before the
            // bad record was reached) is the TLS error it is, not an internal one.
            let reason = if conn.tls.has_failed() {
                CloseReason::TlsError
            } else {
                CloseReason::Internal
            };
            self.begin_close(conn, slot, reason, None);
            return;
        }
        self.mark_dirty(conn, slot);
        if conn.backlog() > self.cfg.limits.max_outbound_per_conn && conn.phase != Phase::Closing {
            self.begin_close(conn, slot, CloseReason::SlowConsumer, None);
        }
    }

    /// Relays one DATA payload to the connection's worker. False if the connection closed.
    fn forward(&mut self, conn: &mut Conn, slot: u32, payload: &[u8], flags: u8) -> bool {
        let id = ConnId::new(self.idx, conn.gen, slot);
        // A connection stays with its worker while that worker is up, so its frames are
        // never split between two workers; it re-hashes only when its worker is gone.
        let sticky = conn
            .worker
            .filter(|&w| self.live_mask & (1 << w) != 0)
            .map(u16::from);
        let Some(w) = sticky.or_else(|| route::pick_mask(id.raw(), self.live_mask)) else {
            self.reply_frame(conn, slot);
            self.begin_close(
                conn,
                slot,
                CloseReason::NoWorker,
                Some((close_code::TRY_AGAIN_LATER, "no worker available")),
            );
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
        let (sni, alpn) = (conn.tls.server_name(), conn.tls.alpn());
        self.links[w as usize].queue_open(id, conn.peer.unwrap_or(UNKNOWN_PEER), sni, alpn);
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
        if conn.send_inflight || conn.shutdown_submitted {
            return;
        }
        if conn.out_off >= conn.out.len() {
            if conn.queued.is_empty() {
                return;
            }
            std::mem::swap(&mut conn.out, &mut conn.queued);
            conn.queued.clear();
            conn.out_off = 0;
        }
        let rest = &conn.out[conn.out_off..];
        let (ptr, len) = (rest.as_ptr(), rest.len() as u32);
        let e = on_socket!(self.direct, slot, |fd| opcode::Send::new(fd, ptr, len)
            .build())
        .user_data(ud(OP_SEND, conn.gen, slot));
        conn.send_inflight = true;
        // SAFETY: `conn.out` is frozen while send_inflight is set and the boxed Conn lives
        // until the Close completion, which waits for this send's completion.
        unsafe { self.push(e) };
    }

    fn on_send(&mut self, slot: u32, gen: u32, res: i32) {
        let Some(mut conn) = self.take(slot, gen) else {
            debug_assert!(false, "send completion for a freed connection");
            return;
        };
        conn.send_inflight = false;
        if res < 0 {
            conn.out = Vec::new();
            conn.out_off = 0;
            conn.queued = Vec::new();
            let reason = match -res {
                libc::EPIPE | libc::ECONNRESET | libc::ETIMEDOUT => CloseReason::PeerReset,
                _ => CloseReason::Internal,
            };
            self.begin_close(&mut conn, slot, reason, None);
        } else {
            conn.out_off += res as usize;
            if conn.out_off >= conn.out.len() && conn.queued.is_empty() {
                // Nothing in flight: an idle connection owns no send buffer.
                conn.out = Vec::new();
                conn.queued = Vec::new();
                conn.out_off = 0;
            } else {
                self.start_send(&mut conn, slot);
            }
        }
        self.progress_close(&mut conn, slot, false);
        self.put(slot, conn);
    }

    fn flush(&mut self) {
        while let Some(slot) = self.dirty.pop() {
            let Some(mut conn) = self.conns[slot as usize].take() else {
                continue;
            };
            conn.dirty = false;
            self.start_send(&mut conn, slot);
            self.progress_close(&mut conn, slot, false);
            self.put(slot, conn);
        }
        if self.paused {
            self.maybe_resume();
        }
        while !self.paused {
            let Some(slot) = self.rearm.pop() else { break };
            if let Some(c) = self.conns[slot as usize].as_ref() {
                if !c.recv_armed && c.phase != Phase::Closing {
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

    /// Starts closing: counts the reason, tells the client (CLOSE frame, close_notify) and
    /// the worker, then lets `progress_close` shut the socket once the bytes are out.
    fn begin_close(
        &mut self,
        conn: &mut Conn,
        slot: u32,
        reason: CloseReason,
        frame_out: Option<(u16, &str)>,
    ) {
        if conn.phase == Phase::Closing {
            return;
        }
        let established = conn.phase == Phase::Open;
        conn.phase = Phase::Closing;
        // Linger (half-close, keep reading until the client's FIN) only when the client has
        // a last message to read: a CLOSE frame, a GOAWAY or an HTTP error.
        conn.linger =
            established && (frame_out.is_some() || !conn.queued.is_empty() || conn.send_inflight);
        self.metrics.close(reason);
        debug!(
            core = self.idx,
            slot,
            reason = reason.label(),
            "closing connection"
        );
        if established {
            if let Some((code, why)) = frame_out {
                let mut f = std::mem::take(&mut self.scratch);
                f.clear();
                encode_close_for(conn.proto, code, why, &mut f);
                if !f.is_empty()
                    && conn
                        .tls
                        .encrypt(
                            &mut conn.staging,
                            &f,
                            &mut Sink::new(&mut conn.queued, &mut self.plain),
                        )
                        .is_err()
                {
                    debug!(core = self.idx, slot, "could not encrypt CLOSE");
                }
                self.scratch = f;
            }
            conn.tls.close_notify(
                &mut conn.staging,
                &mut Sink::new(&mut conn.queued, &mut self.plain),
            );
        }
        if !conn.queued.is_empty() {
            self.mark_dirty(conn, slot);
        }
        conn.staging = Vec::new();
        conn.partial = Vec::new();
        if let Some(w) = conn.worker {
            let link = &mut self.links[w as usize];
            if link.state == LinkState::Up {
                let code = frame_out.map(|f| f.0).unwrap_or(close_code::NORMAL);
                link.queue_close(
                    ConnId::new(self.idx, conn.gen, slot),
                    conn.seq + 1,
                    code,
                    reason.label(),
                );
            }
        }
        self.wheel.schedule(slot, self.tick() + CLOSE_FLUSH_SECS);
    }

    /// Moves a closing connection on: shutdown once its bytes are out (or `force`), then
    /// Close once nothing is in flight.
    fn progress_close(&mut self, conn: &mut Conn, slot: u32, force: bool) {
        if conn.phase != Phase::Closing {
            return;
        }
        let force = force || conn.force_close;
        if !conn.shutdown_submitted && (force || (!conn.send_inflight && conn.backlog() == 0)) {
            conn.shutdown_submitted = true;
            // A graceful close only shuts our sending side (FIN after the last bytes) and
            // keeps reading until the client's FIN: closing with unread input would make
            // the kernel answer with a reset, which can destroy our CLOSE frame in flight.
            let how = if force || !conn.recv_armed || !conn.linger {
                libc::SHUT_RDWR
            } else {
                libc::SHUT_WR
            };
            let e = on_socket!(self.direct, slot, |fd| opcode::Shutdown::new(fd, how)
                .build())
            .user_data(ud(OP_SHUTDOWN, conn.gen, slot));
            // SAFETY: names only the descriptor.
            unsafe { self.push(e) };
            return;
        }
        if !conn.shutdown_done || conn.close_submitted || conn.send_inflight {
            return;
        }
        if conn.recv_armed {
            // Lingering for the client's FIN; past the deadline, end the receive.
            if force && !conn.cancel_submitted {
                conn.cancel_submitted = true;
                let e = opcode::AsyncCancel::new(ud(OP_RECV, conn.gen, slot))
                    .build()
                    .user_data(ud(OP_CANCEL, 0, 0));
                // SAFETY: a cancel names only a user_data value.
                unsafe { self.push(e) };
            }
            return;
        }
        conn.close_submitted = true;
        let e = on_socket!(self.direct, slot, |fd| opcode::Close::new(fd).build())
            .user_data(ud(OP_CLOSE, conn.gen, slot));
        // SAFETY: names only the descriptor; nothing else is in flight on it.
        unsafe { self.push(e) };
    }

    fn on_shutdown(&mut self, slot: u32, gen: u32) {
        let Some(mut conn) = self.take(slot, gen) else {
            return;
        };
        conn.shutdown_done = true;
        self.progress_close(&mut conn, slot, false);
        self.put(slot, conn);
    }

    fn on_close(&mut self, slot: u32, gen: u32) {
        let Some(conn) = self.take(slot, gen) else {
            return;
        };
        debug_assert!(!conn.send_inflight && !conn.recv_armed);
        drop(conn);
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
            match conn.phase {
                Phase::Handshake => {
                    CoreMetrics::inc(&self.metrics.handshakes_failed);
                    self.begin_close(&mut conn, slot, CloseReason::HandshakeTimeout, None);
                }
                Phase::Open if conn.proto == Proto::WebSocket => {
                    self.ws_keepalive(&mut conn, slot, now)
                }
                Phase::Open => {
                    let idle = self.cfg.limits.idle_timeout_secs;
                    let last = u64::from(conn.last_active);
                    if idle > 0 && last + idle > now {
                        self.wheel.schedule(slot, last + idle + 1);
                    } else if idle > 0 {
                        self.begin_close(
                            &mut conn,
                            slot,
                            CloseReason::IdleTimeout,
                            Some((close_code::IDLE_TIMEOUT, "idle timeout")),
                        );
                    }
                }
                Phase::Closing => {
                    conn.force_close = true;
                    self.progress_close(&mut conn, slot, true);
                }
            }
            self.progress_close(&mut conn, slot, false);
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
            // the remaining listeners or refused) and ends the multishot accept.
            let _ = l.shutdown(std::net::Shutdown::Read);
        }
        let e = opcode::AsyncCancel::new(ud(OP_ACCEPT, 0, 0))
            .build()
            .user_data(ud(OP_CANCEL, 0, 0));
        // SAFETY: a cancel names only a user_data value.
        unsafe { self.push(e) };
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
        let due = if spread.is_zero() || elapsed >= spread {
            u64::MAX
        } else {
            (self.drain_total as f64 * elapsed.as_secs_f64() / spread.as_secs_f64()).ceil() as u64
        };
        let mut goaway = Vec::new();
        frame::encode(FrameType::GoAway, b"draining", &mut goaway);
        while self.drain_told < due && self.drain_cursor < self.conns.len() {
            let slot = self.drain_cursor as u32;
            self.drain_cursor += 1;
            let Some(mut conn) = self.conns[slot as usize].take() else {
                continue;
            };
            if conn.phase != Phase::Closing {
                self.drain_told += 1;
                let mut frame_out = None;
                match (conn.phase, conn.proto) {
                    (Phase::Open, Proto::WebSocket) => {
                        frame_out = Some((close_code::GOING_AWAY, "draining"))
                    }
                    (Phase::Open, Proto::Native | Proto::Sniff) => {
                        self.send_plain(&mut conn, slot, &goaway)
                    }
                    _ => {}
                }
                self.begin_close(&mut conn, slot, CloseReason::Drain, frame_out);
                self.progress_close(&mut conn, slot, false);
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
                LinkState::Down if now >= link.retry_at => self.try_connect(w),
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
                    off += used;
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
            Some(c) if c.phase == Phase::Open => Some(c),
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

    /// Frames a worker's message in the connection's protocol and queues it encrypted.
    fn send_message(&mut self, conn: &mut Conn, slot: u32, flags: u8, payload: &[u8]) {
        if payload.len() > frame::MAX_LEN_FIELD && conn.proto != Proto::WebSocket {
            return;
        }
        let mut f = std::mem::take(&mut self.scratch);
        f.clear();
        match conn.proto {
            Proto::WebSocket => {
                // A browser fails the whole connection on text that is not UTF-8, so such
                // a message goes as binary.
                match std::str::from_utf8(payload) {
                    Ok(text) if flags & envelope::flags::TEXT != 0 => ws::encode_text(text, &mut f),
                    _ => ws::encode_binary(payload, &mut f),
                }
            }
            _ => frame::encode(FrameType::Data, payload, &mut f),
        }
        self.send_plain(conn, slot, &f);
        self.scratch = f;
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
            };
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
        let ws = &self.cfg.websocket;
        self.ws_cfg = ws::HandshakeConfig {
            path: ws.path.clone(),
            allowed_origins: ws.allowed_origins.clone(),
            subprotocols: ws.subprotocols.clone(),
        };
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
    /// timeouts: a native connection's from its last activity (a connection idle past a
    /// shorter timeout closes at the next tick), a WebSocket's at the next tick, where
    /// `ws_keepalive` works out its next ping or close. Once per reload, not per event.
    fn rearm_idle_timers(&mut self) {
        let idle = self.cfg.limits.idle_timeout_secs;
        let next_tick = self.tick() + 1;
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_deref() else {
                continue;
            };
            if c.phase != Phase::Open {
                continue;
            }
            let slot = slot as u32;
            if c.proto == Proto::WebSocket {
                self.wheel.schedule(slot, next_tick);
            } else if idle == 0 {
                self.wheel.cancel(slot);
            } else {
                self.wheel
                    .schedule(slot, u64::from(c.last_active) + idle + 1);
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
            if conn.phase == Phase::Open {
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
        self.begin_close(&mut c, slot, CloseReason::WorkerClose, Some((code, reason)));
        self.progress_close(&mut c, slot, false);
        self.put(slot, c);
    }
}

/// The close message of a connection's protocol: a native CLOSE frame, a WebSocket close
/// frame (codes WebSocket does not allow become 1001 for our idle close, else 1011), or
/// nothing before a protocol is spoken.
/// RFC 6455's "no status code" (1005): never sent on the wire; here it marks an empty close.
const NO_STATUS: u16 = 1005;

fn encode_close_for(proto: Proto, code: u16, why: &str, out: &mut Vec<u8>) {
    match proto {
        Proto::Native | Proto::Sniff => frame::encode_close(code, why, out),
        Proto::WebSocket => {
            match code {
                // The client closed without a code: answer likewise (RFC 6455 5.5.1).
                NO_STATUS => ws::encode_frame(ws::Opcode::Close, true, &[], out),
                c if ws::is_valid_close_code(c) => ws::encode_close(c, why, out),
                _ => ws::encode_close(close_code::INTERNAL, why, out),
            }
        }
        Proto::Http => {}
    }
}

/// A raw fd borrowed for one socket call (the regular-fd fallback's client sockets).
struct BorrowedRaw(i32);

impl AsRawFd for BorrowedRaw {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

impl std::os::fd::AsFd for BorrowedRaw {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the fd is a client socket owned by this core's table for the duration of
        // the borrow (it is closed only through the ring after its Close submission).
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) }
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
pub fn bind_listener(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<socket2::Socket> {
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
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
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
        let conn = std::mem::size_of::<super::Conn>();
        let rustls = std::mem::size_of::<rustls::server::UnbufferedServerConnection>();
        assert!(
            conn <= rustls + 256,
            "Conn is {conn} B, rustls' session {rustls} B"
        );
    }

    #[test]
    fn user_data_round_trips() {
        for (op, gen, slot) in [(1, 0, 0), (9, 0xff_ffff, u32::MAX), (3, 77, 12345)] {
            assert_eq!(super::ud_parts(super::ud(op, gen, slot)), (op, gen, slot));
        }
    }
}
