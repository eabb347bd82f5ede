//! The load generator's client runtime: one io_uring ring per thread, built the way the
//! gateway builds its cores, so the client side is as cheap per connection and per frame as
//! the side it measures.
//!
//! - The ring is set up with SINGLE_ISSUER|DEFER_TASKRUN where the kernel has them
//!   (`holdfast::ring::build_ring`, with the same fallbacks).
//! - Receives are multishot from one provided-buffer ring per thread: an idle connection
//!   owns no receive buffer. ENOBUFS means the ring ran dry; the receive is re-armed
//!   after the batch, and nothing is lost.
//! - A connection has at most one send in flight; what is encrypted meanwhile queues
//!   behind it and goes in the next send. Buffers exist only while bytes wait.
//! - Sockets are ordinary descriptors (created, optionally bound to a source address, then
//!   connected through the ring); the process's open-file limit bounds the connections of
//!   one process, which is why `idle` spreads over several.
//! - Deadlines are a heap; a connection past its deadline fails with a timeout at the
//!   stage it was in.
//!
//! A [`Scenario`] is driven by callbacks: [`Scenario::tick`] when its own timer is due
//! (and after every batch of completions), and [`Scenario::event`] for what a connection
//! did. Both get the [`Engine`] to open, send on, close or abort connections.
//!
//! # Memory the kernel reads or writes
//! - Receive buffers belong to the [`BufRing`]; a buffer is read only between the
//!   completion naming it and its recycle. The engine declares its ring before the buffer
//!   ring, so the registration is gone before the memory.
//! - A send names `Conn::inflight`, a `Vec` whose heap block is neither touched nor freed
//!   while the send is in flight: the connection's slot is released only after every
//!   operation naming it has completed (`Conn::ops`), and `inflight` is replaced only in
//!   the send's completion.
//! - A connect names the engine's target address, boxed, and alive as long as the ring.
#![allow(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::ring::{build_ring, BufRing};
use holdfast_wire::frame::FrameType;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::client::{Failure, Stage, TlsInfo};
use crate::session::Session;
use crate::why;

/// Sizes of one engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Submission queue entries.
    pub ring_entries: u32,
    /// Receive buffers in the provided-buffer ring (a power of two).
    pub recv_buffers: u16,
    /// Bytes per receive buffer.
    pub recv_buffer_size: u32,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            ring_entries: 4096,
            recv_buffers: 2048,
            recv_buffer_size: 4096,
        }
    }
}

/// Names one connection of an engine; stale once the connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    slot: u32,
    gen: u32,
}

/// What a connection did.
#[derive(Debug)]
pub enum Event {
    /// The handshake completed and ALPN `holdfast/1` was agreed.
    Established(TlsInfo),
    /// A DATA frame arrived.
    Data(Vec<u8>),
    /// The connection failed before it was established (connect or handshake), or its
    /// deadline passed. The engine has closed it.
    Failed(Failure),
    /// An established connection ended: the server closed it (the text says how) or an
    /// error broke it. The engine has closed it.
    Ended(String),
}

/// What a scenario wants after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Call `tick` again no later than this.
    At(Instant),
    /// Nothing timed to do: call `tick` after the next completions (or within a second).
    Idle,
    /// The scenario is over: the engine aborts what is still open and returns.
    Done,
}

/// A load pattern driven by the engine.
pub trait Scenario {
    /// Called first, after every batch of completions, and when the time it asked for
    /// comes.
    fn tick(&mut self, engine: &mut Engine, now: Instant) -> Tick;
    /// Called for each thing a connection did.
    fn event(&mut self, engine: &mut Engine, id: ConnId, event: Event, now: Instant);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Handshaking,
    Open,
    /// Closed by us; the slot waits for its last operation to complete.
    Closing,
}

struct Conn {
    gen: u32,
    state: State,
    /// None once closed (the kernel may still hold the socket for in-flight operations).
    socket: Option<Socket>,
    session: Session,
    /// The bytes of the send in flight, and how many of them the kernel has taken.
    inflight: Vec<u8>,
    sent: usize,
    /// Operations in flight that name this slot.
    ops: u8,
    recv_armed: bool,
    sending: bool,
    /// Close once the queued bytes are sent (graceful close).
    close_after_send: bool,
    deadline: Option<Instant>,
}

/// The longest the engine waits without ticking when the scenario has nothing timed.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Operation kinds, in the top byte of user_data.
const OP_CONNECT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_CANCEL: u64 = 4;

/// Connects one thread hands the kernel per system call. On loopback a connect runs the
/// whole TCP handshake, the server's side included, inside the call, and a kernel without
/// preemption (`preempt=none`, the server default) runs the call to its end: a storm's
/// 7 500 connects in one submit held both CPUs of a 2-core machine for a quarter of a
/// second, while the server's cores, starved, could not accept and its listen backlog
/// overflowed. Between calls the scheduler runs whoever waits, as it would for clients on
/// their own machines. At ~30 µs a connect, 64 are about 2 ms.
const CONNECTS_PER_SUBMIT: u32 = 64;

fn user_data(op: u64, slot: u32) -> u64 {
    (op << 56) | slot as u64
}

/// One thread's ring, buffers and connections.
pub struct Engine {
    // Field order matters: the ring (and its buffer registration) is dropped before the
    // buffer memory.
    ring: IoUring,
    bufs: BufRing,
    target: Box<SockAddr>,
    target_addr: SocketAddr,
    server_name: ServerName<'static>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    next_gen: u32,
    live: usize,
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Events of connections that failed outside a completion (a connect that could not
    /// even start), delivered with the next batch.
    pending: Vec<(ConnId, Event)>,
    /// Receives to re-arm after the batch (the buffer ring ran dry, or a multishot ended).
    rearm: Vec<u32>,
    /// Connections with bytes to send and no send in flight.
    to_send: Vec<u32>,
    cqes: Vec<(u64, i32, u32)>,
    ring_full_waits: u64,
    /// Connects queued since the last submit (`CONNECTS_PER_SUBMIT`).
    unsubmitted_connects: u32,
    /// A client configuration this engine connected with, for `why`'s probe handshake.
    probe_config: Option<Arc<ClientConfig>>,
}

impl Engine {
    /// An engine on the calling thread (the ring is single-issuer: create it where it runs)
    /// for connections to `target`, verified for `server_name`.
    pub fn new(
        target: SocketAddr,
        server_name: &str,
        config: EngineConfig,
    ) -> anyhow::Result<Engine> {
        use anyhow::Context;
        let server_name = ServerName::try_from(server_name.to_string())
            .with_context(|| format!("{server_name:?} is not a valid TLS server name"))?;
        let (ring, _features) = build_ring(config.ring_entries).context("creating a ring")?;
        let bufs = BufRing::new(
            &ring.submitter(),
            0,
            config.recv_buffers,
            config.recv_buffer_size,
        )
        .context("registering the receive buffer ring")?;
        Ok(Engine {
            ring,
            bufs,
            target: Box::new(SockAddr::from(target)),
            target_addr: target,
            server_name,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 0,
            live: 0,
            deadlines: BinaryHeap::new(),
            pending: Vec::new(),
            rearm: Vec::new(),
            to_send: Vec::new(),
            cqes: Vec::new(),
            ring_full_waits: 0,
            unsubmitted_connects: 0,
            probe_config: None,
        })
    }

    /// Starts a connection (from `source`, port chosen by the kernel, when given) with a
    /// `deadline`. The deadline stays after the handshake until [`Engine::set_deadline`]
    /// moves or clears it, so it can bound a whole short connection; a scenario that holds
    /// connections clears it once they are established. Failures arrive as
    /// [`Event::Failed`].
    pub fn connect(
        &mut self,
        config: &Arc<ClientConfig>,
        source: Option<IpAddr>,
        deadline: Instant,
    ) -> ConnId {
        let session = Session::new(config.clone(), self.server_name.clone());
        if self.probe_config.is_none() {
            self.probe_config = Some(config.clone());
        }
        let (slot, gen) = self.alloc();
        let id = ConnId { slot, gen };
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                self.pending
                    .push((id, Event::Failed(fail(Stage::Handshake, e))));
                self.conns[slot as usize] = None;
                self.free.push(slot);
                return id;
            }
        };
        let socket = self.socket(source);
        let (socket, err) = match socket {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        self.conns[slot as usize] = Some(Conn {
            gen,
            state: State::Connecting,
            socket,
            session,
            inflight: Vec::new(),
            sent: 0,
            ops: 0,
            recv_armed: false,
            sending: false,
            close_after_send: false,
            deadline: None,
        });
        self.live += 1;
        if let Some(e) = err {
            self.fail(slot, fail(Stage::Connect, e));
            return id;
        }
        self.set_deadline(id, Some(deadline));
        let fd = self.fd(slot);
        let entry = opcode::Connect::new(types::Fd(fd), self.target.as_ptr(), self.target.len())
            .build()
            .user_data(user_data(OP_CONNECT, slot));
        self.push(entry);
        self.conn(slot).ops += 1;
        self.unsubmitted_connects += 1;
        if self.unsubmitted_connects >= CONNECTS_PER_SUBMIT {
            self.unsubmitted_connects = 0;
            match self.ring.submit() {
                Ok(_) => {}
                // A signal, no memory for the moment, or completions to reap first: what
                // was not submitted stays queued, and the next wait submits it.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                // A broken ring: the next wait reports it.
                Err(e) => eprintln!("holdfast-bench: submitting to the ring: {e}"),
            }
        }
        id
    }

    /// Sends one frame on an established connection; false when `id` is gone or not
    /// established (nothing is sent).
    pub fn send(&mut self, id: ConnId, kind: FrameType, payload: &[u8]) -> bool {
        let Some(c) = self.get(id) else { return false };
        if c.state != State::Open {
            return false;
        }
        if let Err(e) = c.session.send(kind, payload) {
            self.end(id.slot, e);
            return false;
        }
        self.want_send(id.slot);
        true
    }

    /// Sets (or clears) the time by which `id` must have done what the scenario waits
    /// for; past it, the connection fails with a timeout at its current stage.
    pub fn set_deadline(&mut self, id: ConnId, deadline: Option<Instant>) {
        let Some(c) = self.get(id) else { return };
        c.deadline = deadline;
        if let Some(d) = deadline {
            self.deadlines.push(Reverse((d, id.slot, id.gen)));
        }
    }

    /// Ends `id` politely: TLS close_notify, then FIN once it is sent.
    pub fn close(&mut self, id: ConnId) {
        let Some(c) = self.get(id) else { return };
        if c.state != State::Open {
            self.shut(id.slot);
            return;
        }
        c.session.close_notify();
        c.close_after_send = true;
        if c.sending || c.session.wants_send() {
            self.want_send(id.slot);
        } else {
            self.shut(id.slot);
        }
    }

    /// Ends `id` at once, without close_notify (a network path that flaps).
    pub fn abort(&mut self, id: ConnId) {
        if self.get(id).is_some() {
            self.shut(id.slot);
        }
    }

    /// Runs `scenario` until it says it is done, then aborts what is left open (letting
    /// polite closes send their close_notify) and waits at most `linger` for the kernel to
    /// finish with it.
    pub fn run(&mut self, scenario: &mut impl Scenario, linger: Duration) -> io::Result<()> {
        loop {
            let now = Instant::now();
            self.expire(scenario, now);
            self.deliver_pending(scenario, now);
            // Events raised during a tick (a connect that failed on the spot) are delivered
            // and the scenario ticks again, so it never waits on something already over.
            let tick = loop {
                let tick = scenario.tick(self, now);
                if self.pending.is_empty() || tick == Tick::Done {
                    break tick;
                }
                self.deliver_pending(scenario, now);
            };
            let wake = match tick {
                Tick::Done => break,
                Tick::At(t) => Some(t),
                // Nothing timed: the next completion wakes us, and a second at most passes
                // without a tick should nothing be in flight at all.
                Tick::Idle => Some(now + IDLE_TICK),
            };
            self.flush_sends();
            let wake = match (wake, self.next_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.wait(wake)?;
            self.complete(scenario)?;
        }
        // Connections closing politely keep their close_notify; the rest end now.
        for slot in 0..self.conns.len() as u32 {
            if self.conns[slot as usize]
                .as_ref()
                .is_some_and(|c| c.state != State::Closing && !c.close_after_send)
            {
                self.shut(slot);
            }
        }
        let until = Instant::now() + linger;
        while self.live > 0 && Instant::now() < until {
            self.flush_sends();
            self.wait(Some(until))?;
            let mut sink = Sink;
            self.complete(&mut sink)?;
        }
        Ok(())
    }

    fn socket(&self, source: Option<IpAddr>) -> io::Result<Socket> {
        let domain = Domain::for_address(self.target_addr);
        let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?;
        socket.set_nodelay(true)?;
        if let Some(ip) = source {
            // Port 0 with IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect time, per
            // (source, destination), so each source address brings its own port range.
            if ip.is_ipv4() {
                set_bind_no_port(&socket)?;
            }
            socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
        }
        Ok(socket)
    }

    fn alloc(&mut self) -> (u32, u32) {
        self.next_gen = self.next_gen.wrapping_add(1);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.conns.len() as u32 - 1
            }
        };
        (slot, self.next_gen)
    }

    fn get(&mut self, id: ConnId) -> Option<&mut Conn> {
        match self.conns.get_mut(id.slot as usize) {
            Some(Some(c)) if c.gen == id.gen && c.state != State::Closing => Some(c),
            _ => None,
        }
    }

    fn conn(&mut self, slot: u32) -> &mut Conn {
        self.conns[slot as usize]
            .as_mut()
            .expect("a slot named by a live operation holds a connection")
    }

    fn id(&self, slot: u32) -> ConnId {
        let gen = self.conns[slot as usize].as_ref().map_or(0, |c| c.gen);
        ConnId { slot, gen }
    }

    fn fd(&self, slot: u32) -> i32 {
        self.conns[slot as usize]
            .as_ref()
            .and_then(|c| c.socket.as_ref())
            .map_or(-1, |s| s.as_raw_fd())
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry built here names memory that outlives the operation (see
            // the module docs): the boxed target address, a connection's `inflight`
            // buffer kept until the send completes, or no memory at all.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            self.ring_full_waits += 1;
            if let Err(e) = self.ring.submit() {
                // Submitting can only fail here on a broken ring; the next wait reports it.
                eprintln!("holdfast-bench: submitting to the ring: {e}");
                return;
            }
        }
    }

    fn arm_recv(&mut self, slot: u32) {
        let fd = self.fd(slot);
        let bgid = self.bufs.group();
        let entry = opcode::RecvMulti::new(types::Fd(fd), bgid)
            .build()
            .user_data(user_data(OP_RECV, slot));
        self.push(entry);
        let c = self.conn(slot);
        c.ops += 1;
        c.recv_armed = true;
    }

    fn want_send(&mut self, slot: u32) {
        let c = self.conn(slot);
        if !c.sending && c.session.wants_send() {
            c.sending = true;
            self.to_send.push(slot);
        }
    }

    fn flush_sends(&mut self) {
        let slots = std::mem::take(&mut self.to_send);
        for &slot in &slots {
            let Some(c) = self.conns[slot as usize].as_mut() else {
                continue;
            };
            if c.socket.is_none() {
                c.sending = false;
                continue;
            }
            let spare = std::mem::take(&mut c.inflight);
            c.inflight = c.session.take_out(spare);
            c.sent = 0;
            self.submit_send(slot);
        }
        self.to_send = slots;
        self.to_send.clear();
    }

    fn submit_send(&mut self, slot: u32) {
        let fd = self.fd(slot);
        let c = self.conn(slot);
        let rest = &c.inflight[c.sent..];
        let entry = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(OP_SEND, slot));
        c.ops += 1;
        self.push(entry);
    }

    /// Closes the socket (the kernel keeps it while operations name it); the slot is freed
    /// when the last one completes.
    fn shut(&mut self, slot: u32) {
        let c = self.conn(slot);
        let was = c.state;
        c.state = State::Closing;
        c.deadline = None;
        if let Some(s) = c.socket.take() {
            // Wakes the armed receive (it completes with 0) so the slot can be freed; the
            // descriptor itself closes when `s` drops.
            let _ = s.shutdown(Shutdown::Both);
        }
        if was == State::Connecting && c.ops > 0 {
            let entry = opcode::AsyncCancel::new(user_data(OP_CONNECT, slot))
                .build()
                .user_data(user_data(OP_CANCEL, slot));
            self.push(entry);
        }
        self.maybe_free(slot);
    }

    fn maybe_free(&mut self, slot: u32) {
        let c = self.conn(slot);
        if c.state == State::Closing && c.ops == 0 {
            self.conns[slot as usize] = None;
            self.free.push(slot);
            self.live -= 1;
        }
    }

    /// Fails a connection that is not established (or whose deadline passed).
    fn fail(&mut self, slot: u32, failure: Failure) {
        let id = self.id(slot);
        self.pending.push((id, Event::Failed(failure)));
        self.shut(slot);
    }

    /// Ends an established connection, or fails one that is not.
    fn end(&mut self, slot: u32, why: String) {
        let c = self.conn(slot);
        let event = match c.state {
            State::Open => Event::Ended(why),
            State::Connecting => Event::Failed(fail(Stage::Connect, why)),
            State::Handshaking => Event::Failed(fail(Stage::Handshake, why)),
            State::Closing => return,
        };
        let id = self.id(slot);
        self.pending.push((id, event));
        self.shut(slot);
    }

    fn deliver_pending(&mut self, scenario: &mut impl Scenario, now: Instant) {
        while !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            for (id, event) in batch {
                scenario.event(self, id, event, now);
            }
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, slot, gen))) = self.deadlines.peek().copied() {
            match self.conns.get(slot as usize) {
                Some(Some(c)) if c.gen == gen && c.deadline == Some(t) => return Some(t),
                _ => {
                    self.deadlines.pop();
                }
            }
        }
        None
    }

    fn expire(&mut self, scenario: &mut impl Scenario, now: Instant) {
        while let Some(t) = self.next_deadline() {
            if t > now {
                break;
            }
            let Reverse((_, slot, _)) = self.deadlines.pop().expect("peeked above");
            let stage = match self.conn(slot).state {
                State::Connecting => Stage::Connect,
                State::Handshaking => Stage::Handshake,
                _ => Stage::Echo,
            };
            self.fail(
                slot,
                Failure {
                    stage,
                    timed_out: true,
                    error: "timed out".into(),
                },
            );
        }
        self.deliver_pending(scenario, now);
    }

    /// Submits what is queued and waits for a completion, or until `until`. A wait with
    /// GETEVENTS also runs the ring's deferred task work, so completions are reaped even
    /// when the time has already come.
    fn wait(&mut self, until: Option<Instant>) -> io::Result<()> {
        self.unsubmitted_connects = 0;
        let want = usize::from(self.ring.completion().is_empty());
        let result = match until {
            None => self.ring.submit_and_wait(want),
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                let ts = types::Timespec::new()
                    .sec(left.as_secs())
                    .nsec(left.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want.max(1), &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            // The time came (ETIME), a signal arrived, or the completion queue is full
            // (EBUSY: reap first).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn complete(&mut self, scenario: &mut impl Scenario) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|e| (e.user_data(), e.result(), e.flags())),
        );
        let now = Instant::now();
        for &(ud, res, flags) in &cqes {
            let op = ud >> 56;
            let slot = (ud & 0xffff_ffff) as u32;
            match op {
                OP_CONNECT => self.on_connect(slot, res),
                OP_RECV => self.on_recv(slot, res, flags),
                OP_SEND => self.on_send(slot, res),
                OP_CANCEL => {}
                _ => unreachable!("unknown operation in user_data {ud:#x}"),
            }
            self.deliver_pending(scenario, now);
        }
        cqes.clear();
        self.cqes = cqes;
        self.bufs.publish();
        for slot in std::mem::take(&mut self.rearm) {
            let live = self.conns[slot as usize]
                .as_ref()
                .is_some_and(|c| c.state != State::Closing && !c.recv_armed);
            if live {
                self.arm_recv(slot);
            }
        }
        Ok(())
    }

    fn on_connect(&mut self, slot: u32, res: i32) {
        let c = self.conn(slot);
        c.ops -= 1;
        if c.state == State::Closing {
            return self.maybe_free(slot);
        }
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            return self.fail(slot, fail(Stage::Connect, e));
        }
        c.state = State::Handshaking;
        if let Err(e) = c.session.start() {
            return self.fail(slot, fail(Stage::Handshake, e));
        }
        self.arm_recv(slot);
        self.want_send(slot);
    }

    fn on_recv(&mut self, slot: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let c = self.conn(slot);
        if !more {
            c.ops -= 1;
            c.recv_armed = false;
        }
        if let Some(b) = bid {
            self.bufs.taken(b);
        }
        if self.conn(slot).state == State::Closing {
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            return self.maybe_free(slot);
        }
        if res < 0 {
            return match -res {
                // The buffer ring ran dry: the bytes wait in the socket; re-arm after
                // this batch has returned its buffers.
                libc::ENOBUFS => self.rearm.push(slot),
                e => self.end(slot, io::Error::from_raw_os_error(e).to_string()),
            };
        }
        if res == 0 {
            return self.end(slot, "end of stream".into());
        }
        let b = bid.expect("a receive of data names its buffer");
        let bytes = self.bufs.buffer_mut(b, res as usize);
        let c = self.conns[slot as usize]
            .as_mut()
            .expect("checked above: the slot is live");
        // A failed handshake comes back as "TLS error": keep the front of what the server
        // sent (an alert record says why) and ask `why` for the reason.
        let handshaking = c.state == State::Handshaking;
        let mut front = [0u8; 7];
        let front_len = bytes.len().min(front.len());
        if handshaking {
            front[..front_len].copy_from_slice(&bytes[..front_len]);
            why::clear();
        }
        let mut received = c.session.receive(bytes);
        self.bufs.recycle(b);
        if handshaking && received.ended.as_deref() == Some("TLS error") {
            let probe = why::Probe {
                target: self.target_addr,
                config: self.probe_config.as_ref(),
                server_name: &self.server_name,
            };
            received.ended = Some(why::explain(&front[..front_len], &probe));
        }
        let id = self.id(slot);
        if let Some(info) = received.established {
            self.conn(slot).state = State::Open;
            self.pending.push((id, Event::Established(info)));
        }
        for d in received.data {
            self.pending.push((id, Event::Data(d)));
        }
        if let Some(why) = received.ended {
            return self.end(slot, why);
        }
        if !more {
            self.rearm.push(slot);
        }
        self.want_send(slot);
    }

    fn on_send(&mut self, slot: u32, res: i32) {
        let c = self.conn(slot);
        c.ops -= 1;
        if c.state == State::Closing {
            c.sending = false;
            return self.maybe_free(slot);
        }
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            return self.end(slot, e.to_string());
        }
        c.sent += res as usize;
        if c.sent < c.inflight.len() {
            return self.submit_send(slot);
        }
        c.inflight.clear();
        // An idle connection keeps no send buffer.
        if c.inflight.capacity() > 1024 {
            c.inflight = Vec::new();
        }
        c.sending = false;
        if c.session.wants_send() {
            self.want_send(slot);
        } else if c.close_after_send {
            self.shut(slot);
        }
    }
}

/// Drops every event: used while draining after the scenario is done.
struct Sink;

impl Scenario for Sink {
    fn tick(&mut self, _: &mut Engine, _: Instant) -> Tick {
        Tick::Idle
    }
    fn event(&mut self, _: &mut Engine, _: ConnId, _: Event, _: Instant) {}
}

fn fail(stage: Stage, e: impl std::fmt::Display) -> Failure {
    Failure {
        stage,
        timed_out: false,
        error: e.to_string(),
    }
}

fn set_bind_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (a live c_int) for the length given; the descriptor
    // is owned by `socket` for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs each scenario on a thread and an engine of its own (the ring is created on the
/// thread that drives it), runs `during` on the calling thread meanwhile, and hands the
/// scenarios back with `during`'s result when all are done. The threads inherit the
/// process's CPU affinity.
pub fn run_threads<S: Scenario + Send + 'static, R>(
    scenarios: Vec<S>,
    target: SocketAddr,
    server_name: &str,
    config: EngineConfig,
    linger: Duration,
    during: impl FnOnce() -> R,
) -> anyhow::Result<(Vec<S>, R)> {
    use anyhow::Context;
    let handles: Vec<_> = scenarios
        .into_iter()
        .enumerate()
        .map(|(i, mut scenario)| {
            let name = server_name.to_string();
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || -> anyhow::Result<S> {
                    let mut engine = Engine::new(target, &name, config)?;
                    engine
                        .run(&mut scenario, linger)
                        .context("driving the client ring")?;
                    Ok(scenario)
                })
                .context("starting a client thread")
        })
        .collect::<anyhow::Result<_>>()?;
    let r = during();
    let scenarios = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((scenarios, r))
}
