//! One client connection's protocol, free of I/O: TLS, then the application protocol
//! (sniffing, native frames, the HTTP upgrade request, WebSocket), keepalive and idle
//! timeouts, and closing. quinn-proto's `Connection` is the model.
//!
//! Inputs are received bytes, the end of the client's stream, a timer that fired,
//! messages and closes from the worker, drain and reload; every input takes the current
//! tick (seconds) and the core's [`SessionConfig`]. Outputs are read by the driver after
//! every input, in this order:
//! 1. the events in the [`Turn`] (established, handshake failed, frames for the worker,
//!    closed), which the driver hands to the worker link;
//! 2. the TLS bytes to transmit ([`Session::transmit`]);
//! 3. the next deadline ([`Session::poll_timer`]), changed only when the session wants a
//!    different one (traffic only stamps the last activity: an idle timer is checked
//!    lazily when it fires);
//! 4. whether it is closing, and how ([`Session::closing`]).
//!
//! A session never sees a ring, the slot table, a worker link or the clock. Closing is one
//! [`CloseCause`], built from the codec and TLS errors, kept in the closing phase.
#![forbid(unsafe_code)]

use std::sync::Arc;

use holdfast_wire::envelope;
use holdfast_wire::frame::{self, close_code, Frame, FrameError, FrameType};
use holdfast_wire::ws;
use tracing::debug;

use crate::config::Config;
use crate::conn_tls::ConnTls;
use crate::handover::{FormatError, Put, Reader};
use crate::metrics::CloseReason;
use crate::tls::{TlsEnd, TlsSession};

// Records and handshake messages from a client are far below this; more is an attack.
const MAX_STAGING: usize = 128 * 1024;
/// Seconds a closing connection may take to flush its last bytes and, when it lingers,
/// for the client to read them and close its side, before it is cut.
pub const CLOSE_FLUSH_SECS: u64 = 3;
/// RFC 6455's "no status code" (1005): never sent on the wire; here it marks an empty close.
const NO_STATUS: u16 = 1005;

/// What a session reads of the configuration; rebuilt by the core on reload.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub max_frame: usize,
    pub handshake_timeout_secs: u64,
    /// 0: never.
    pub idle_timeout_secs: u64,
    /// Serve WebSocket to clients without ALPN that start with an HTTP request.
    pub websocket: bool,
    /// 0: no gateway keepalive.
    pub ping_interval_secs: u64,
    /// An idle TLS 1.3 connection hibernates after this long; 0: never (rustls keeps it).
    pub hibernate_after_secs: u64,
    pub ws: ws::HandshakeConfig,
}

impl SessionConfig {
    pub fn new(cfg: &Config) -> SessionConfig {
        SessionConfig {
            max_frame: cfg.limits.max_frame,
            handshake_timeout_secs: cfg.limits.handshake_timeout_secs,
            idle_timeout_secs: cfg.limits.idle_timeout_secs,
            websocket: cfg.websocket.enabled,
            ping_interval_secs: cfg.websocket.ping_interval_secs,
            hibernate_after_secs: cfg.tls.hibernate_after_secs,
            ws: ws::HandshakeConfig {
                path: cfg.websocket.path.clone(),
                allowed_origins: cfg.websocket.allowed_origins.clone(),
                subprotocols: cfg.websocket.subprotocols.clone(),
            },
        }
    }
}

/// What the driver must act on after an input, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The TLS handshake completed: tell a worker about the connection.
    Established,
    /// The handshake failed (TLS error or timeout).
    HandshakeFailed,
    /// A client message for the worker; its payload is [`Events::payload`].
    Frame { flags: u8, start: u32, end: u32 },
    /// The session began closing for `reason`; an established connection's worker is told
    /// with `code`.
    Closed { reason: CloseReason, code: u16 },
}

/// The per-core scratch space a session works in during one input, and where it leaves
/// its events. Reused for every connection: no allocation per frame in steady state.
#[derive(Debug, Default)]
pub struct Turn {
    /// Decrypted plaintext of the current receive.
    plain: Vec<u8>,
    /// Control frames answered during this input (PONG), encrypted together.
    reply: Vec<u8>,
    /// Encoding space for one outgoing frame.
    frame: Vec<u8>,
    /// Events of this input, read (and cleared) by the driver.
    pub events: Events,
    /// Pings answered during this input (for the metrics).
    pub pings: u64,
    /// Connections that hibernated, and that woke, during these inputs (for the metrics).
    pub hibernations: u64,
    pub wakeups: u64,
    /// The server names (SNI) of this core's connections, each kept once.
    pub names: Names,
    /// When set, every decrypted byte is appended here: for tests that check the record
    /// layer through the real session, and for debugging tools. None in the gateway.
    pub tap: Option<Vec<u8>>,
}

impl Turn {
    pub fn new() -> Turn {
        Turn::default()
    }

    fn frame_event(&mut self, flags: u8, payload: &[u8]) {
        self.events.frame(flags, payload);
    }
}

/// Server names shared by the connections of a core: most clients of a gateway send one
/// of a few names, so each connection holds a reference instead of its own copy. Bounded:
/// past `MAX_NAMES` distinct names a connection keeps its own copy.
#[derive(Debug, Default)]
pub struct Names {
    names: std::collections::HashMap<Box<str>, Arc<str>>,
}

const MAX_NAMES: usize = 4096;

impl Names {
    pub fn intern(&mut self, name: Box<str>) -> Arc<str> {
        if let Some(shared) = self.names.get(&name) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(&*name);
        if self.names.len() < MAX_NAMES {
            self.names.insert(name, shared.clone());
        }
        shared
    }
}

/// The ALPN protocol negotiated, as one byte (the gateway offers two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alpn {
    None,
    Native,
    Http,
}

impl Alpn {
    fn of(alpn: Option<&[u8]>) -> Alpn {
        match alpn {
            Some(a) if a == frame::ALPN => Alpn::Native,
            Some(b"http/1.1") => Alpn::Http,
            _ => Alpn::None,
        }
    }

    fn as_bytes(self) -> Option<&'static [u8]> {
        match self {
            Alpn::None => None,
            Alpn::Native => Some(frame::ALPN),
            Alpn::Http => Some(b"http/1.1"),
        }
    }
}

/// The events of one input, with the payloads of its frames in one arena.
#[derive(Debug, Default)]
pub struct Events {
    pub list: Vec<Event>,
    arena: Vec<u8>,
}

impl Events {
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The payload of an `Event::Frame`, valid until the events are cleared.
    pub fn payload(&self, start: u32, end: u32) -> &[u8] {
        &self.arena[start as usize..end as usize]
    }

    /// Forgets the events and payloads (keeping the capacity).
    pub fn clear(&mut self) {
        self.list.clear();
        self.arena.clear();
    }

    fn push(&mut self, ev: Event) {
        self.list.push(ev);
    }

    fn frame(&mut self, flags: u8, payload: &[u8]) {
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(payload);
        let end = self.arena.len() as u32;
        self.list.push(Event::Frame { flags, start, end });
    }
}

/// Why a connection closes: the reason counted, and what the client is told (a close
/// code and text, in its protocol's close message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCause<'a> {
    pub reason: CloseReason,
    pub tell: Option<(u16, &'a str)>,
}

impl CloseCause<'static> {
    /// Closed without a message to the client (reset, vanished, internal error).
    pub const fn silent(reason: CloseReason) -> CloseCause<'static> {
        CloseCause { reason, tell: None }
    }

    pub const fn no_worker() -> CloseCause<'static> {
        CloseCause {
            reason: CloseReason::NoWorker,
            tell: Some((close_code::TRY_AGAIN_LATER, "no worker available")),
        }
    }
}

impl From<FrameError> for CloseCause<'static> {
    fn from(e: FrameError) -> CloseCause<'static> {
        let (reason, why) = match e {
            FrameError::TooLarge { .. } => (CloseReason::FrameTooLarge, "frame too large"),
            FrameError::UnknownType(_) => (CloseReason::UnknownFrameType, "unknown frame type"),
            FrameError::BadClose => (CloseReason::ProtocolError, "malformed CLOSE"),
        };
        CloseCause {
            reason,
            tell: Some((e.close_code(), why)),
        }
    }
}

/// The reason a WebSocket error is counted under (its text is the error's message).
fn ws_reason(e: &ws::WsError) -> CloseReason {
    match e.close_code() {
        close_code::TOO_LARGE => CloseReason::FrameTooLarge,
        close_code::INVALID_PAYLOAD => CloseReason::InvalidPayload,
        _ => CloseReason::ProtocolError,
    }
}

/// A deadline the driver should (re)arm, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    At(u64),
    Never,
}

/// How a closing session wants the socket closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    pub reason: CloseReason,
    /// The client has a last message to read: half-close and wait for its FIN.
    pub linger: bool,
    /// The flush deadline passed: cut the connection now.
    pub cut: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Open,
    Closing(Closing),
}

/// The application protocol, owning its own state; it only moves forward.
#[derive(Debug)]
enum App {
    /// During the handshake, and after it for a client without ALPN that has sent
    /// nothing yet: the first byte decides ('G' starts an HTTP request).
    Sniff,
    /// Native frames; `partial` holds a frame split across receives.
    Native {
        partial: Vec<u8>,
    },
    /// Waiting for (the rest of) the HTTP upgrade request.
    Http {
        request: Vec<u8>,
    },
    WebSocket(Box<Ws>),
}

/// The protocol a close message is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    Native,
    Http,
    WebSocket,
}

impl App {
    fn speaks(&self) -> Speaks {
        match self {
            App::Sniff | App::Native { .. } => Speaks::Native,
            App::Http { .. } => Speaks::Http,
            App::WebSocket(_) => Speaks::WebSocket,
        }
    }

    /// Nothing half-received: no partial frame, request or fragmented message.
    fn is_idle(&self) -> bool {
        match self {
            App::WebSocket(ws) => ws.partial.is_empty() && !ws.asm.in_message(),
            other => !other.mid_message(),
        }
    }

    /// Plaintext of an unfinished frame or request is waiting for more.
    fn mid_message(&self) -> bool {
        match self {
            App::Sniff => false,
            App::Native { partial } => !partial.is_empty(),
            App::Http { request } => !request.is_empty(),
            App::WebSocket(ws) => !ws.partial.is_empty(),
        }
    }
}

/// A WebSocket connection's state. Boxed: only browsers pay for it.
#[derive(Debug, Default)]
struct Ws {
    /// Message assembly state (2 bytes).
    asm: ws::MessageAssembler,
    /// A frame split across receives.
    partial: Vec<u8>,
    /// A fragmented message being assembled; empty (unallocated) otherwise.
    msg: Vec<u8>,
    /// The tick our unanswered ping went out, if one is outstanding.
    ping_sent: Option<u32>,
}

/// TLS and the byte streams: everything but the application protocol, so the protocol's
/// code can write to the client and close while it holds its own state.
struct Transport {
    tls: ConnTls,
    phase: Phase,
    /// What the handshake negotiated, kept here because rustls may be gone.
    /// Shared with every connection of the core that sent the same name.
    sni: Option<Arc<str>>,
    alpn: Alpn,
    /// The handshake resumed a session (a ticket).
    resumed: bool,
    version: Option<rustls::ProtocolVersion>,
    /// Seconds idle before hibernating (0: never), from the configuration.
    /// (At most 18 hours: longer is kept as that.)
    hibernate_after: u16,
    /// TLS input not consumed yet (a record split across receives).
    staging: Vec<u8>,
    /// TLS bytes to transmit.
    queued: Vec<u8>,
    /// Tick of the last client traffic; u32 covers 136 years of uptime.
    last_active: u32,
    timer: Option<Deadline>,
}

/// One client connection's protocol state.
pub struct Session {
    t: Transport,
    app: App,
}

impl Session {
    /// A connection just accepted at tick `now`: its handshake must finish in time.
    pub fn new(tls: TlsSession, now: u64, cfg: &SessionConfig) -> Session {
        Session {
            t: Transport {
                tls: ConnTls::new(tls, cfg.hibernate_after_secs > 0),
                phase: Phase::Handshake,
                sni: None,
                alpn: Alpn::None,
                resumed: false,
                version: None,
                hibernate_after: cfg.hibernate_after_secs.min(u64::from(u16::MAX)) as u16,
                staging: Vec::new(),
                queued: Vec::new(),
                last_active: now as u32,
                timer: Some(Deadline::At(now + cfg.handshake_timeout_secs + 1)),
            },
            app: App::Sniff,
        }
    }

    // ---- outputs ------------------------------------------------------------------------

    /// TLS bytes to send to the client; the driver swaps them out.
    pub fn transmit(&mut self) -> &mut Vec<u8> {
        &mut self.t.queued
    }

    pub fn wants_transmit(&self) -> bool {
        !self.t.queued.is_empty()
    }

    /// The deadline to arm, if it changed since the last call.
    pub fn poll_timer(&mut self) -> Option<Deadline> {
        self.t.timer.take()
    }

    /// Set once the session began closing.
    pub fn closing(&self) -> Option<Closing> {
        match self.t.phase {
            Phase::Closing(c) => Some(c),
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.t.phase == Phase::Open
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.t.phase, Phase::Closing(_))
    }

    pub fn server_name(&self) -> Option<&str> {
        self.t.sni.as_deref()
    }

    pub fn alpn(&self) -> Option<&[u8]> {
        self.t.alpn.as_bytes()
    }

    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.t.version
    }

    /// Hibernated: only traffic secrets and sequence numbers are held.
    pub fn is_asleep(&self) -> bool {
        self.t.tls.is_asleep()
    }

    /// On holdfast's own record layer (awake or asleep) rather than rustls.
    pub fn is_on_own_record_layer(&self) -> bool {
        self.t.tls.is_own()
    }

    /// Whether the handshake resumed a session.
    pub fn resumed(&self) -> bool {
        self.t.resumed
    }

    /// Whether the application protocol is WebSocket (for tests and tools).
    pub fn is_websocket(&self) -> bool {
        matches!(self.app, App::WebSocket(_))
    }

    // ---- inputs -------------------------------------------------------------------------

    /// The bytes of one receive (decrypted in place when nothing is staged).
    pub fn on_receive(&mut self, bytes: &mut [u8], now: u64, cfg: &SessionConfig, turn: &mut Turn) {
        if self.is_closing() {
            return;
        }
        let mut plain = std::mem::take(&mut turn.plain);
        plain.clear();
        let t = &mut self.t;
        let got = t
            .tls
            .receive(&mut t.staging, bytes, &mut t.queued, &mut plain);
        let fed = got.fed;
        if got.woke {
            turn.wakeups += 1;
            t.timer = Some(t.wake_deadline(now));
        }
        if let Some(n) = got.negotiated {
            t.sni = n.sni.map(|name| turn.names.intern(name));
            t.alpn = Alpn::of(n.alpn);
            t.resumed = n.resumed;
            t.version = n.version;
        }
        if fed.handshake_done {
            t.phase = Phase::Open;
            self.app = match t.alpn.as_bytes() {
                Some(b"http/1.1") => App::Http {
                    request: Vec::new(),
                },
                Some(_) => App::Native {
                    partial: Vec::new(),
                },
                None if cfg.websocket => App::Sniff,
                None => App::Native {
                    partial: Vec::new(),
                },
            };
            turn.events.push(Event::Established);
            t.timer = Some(earliest(idle_deadline(now, cfg), t.hibernate_deadline(now)));
        }
        t.last_active = now as u32;
        if let Some(tap) = turn.tap.as_mut() {
            tap.extend_from_slice(&plain);
        }
        if !plain.is_empty() && t.phase == Phase::Open {
            self.on_plaintext(&mut plain, now, cfg, turn);
        }
        plain.clear();
        turn.plain = plain;
        if got.lost {
            self.close(CloseCause::silent(CloseReason::Internal), now, turn);
            return;
        }
        match fed.end {
            Some(TlsEnd::PeerClosed) => self.on_eof(now, cfg, turn),
            Some(TlsEnd::Error) => {
                if self.t.phase == Phase::Handshake {
                    turn.events.push(Event::HandshakeFailed);
                }
                self.close(CloseCause::silent(CloseReason::TlsError), now, turn);
            }
            None if self.t.staging.len() > MAX_STAGING => {
                self.close(CloseCause::silent(CloseReason::TlsError), now, turn)
            }
            None => {}
        }
    }

    /// The client ended its stream (TCP FIN or TLS close_notify).
    pub fn on_eof(&mut self, now: u64, _cfg: &SessionConfig, turn: &mut Turn) {
        let reason = if self.app.mid_message() || !self.t.staging.is_empty() {
            CloseReason::EofMidFrame
        } else {
            CloseReason::PeerClosed
        };
        self.close(CloseCause::silent(reason), now, turn);
    }

    /// The deadline the driver armed was reached (it may be early: idle timers are
    /// checked lazily against the last activity). `quiet`: the driver has no send in
    /// flight for the connection, so it may hibernate.
    pub fn on_timeout(&mut self, now: u64, cfg: &SessionConfig, quiet: bool, turn: &mut Turn) {
        match self.t.phase {
            Phase::Handshake => {
                turn.events.push(Event::HandshakeFailed);
                self.close(CloseCause::silent(CloseReason::HandshakeTimeout), now, turn);
            }
            Phase::Open => {
                self.maybe_hibernate(now, quiet, turn);
                self.open_timeout(now, cfg, turn);
                if !self.is_closing() {
                    let current = self.t.timer.unwrap_or(Deadline::Never);
                    self.t.timer = Some(earliest(current, self.t.hibernate_deadline(now)));
                }
            }
            Phase::Closing(ref mut c) => c.cut = true,
        }
    }

    /// Sheds the expanded keys of an idle connection on our record layer, when nothing
    /// is staged, queued or in flight and no message is half-received.
    fn maybe_hibernate(&mut self, now: u64, quiet: bool, turn: &mut Turn) {
        let t = &mut self.t;
        let after = u64::from(t.hibernate_after);
        if after == 0 || !t.tls.is_own() || t.tls.is_asleep() {
            return;
        }
        if now < u64::from(t.last_active) + after
            || !quiet
            || !t.staging.is_empty()
            || !t.queued.is_empty()
            || !self.app.is_idle()
        {
            return;
        }
        if t.tls.hibernate() {
            turn.hibernations += 1;
        }
    }

    fn open_timeout(&mut self, now: u64, cfg: &SessionConfig, turn: &mut Turn) {
        match self.app {
            App::WebSocket(_) => self.ws_keepalive(now, cfg, turn),
            _ => {
                let idle = cfg.idle_timeout_secs;
                let last = u64::from(self.t.last_active);
                if idle > 0 && last + idle > now {
                    self.t.timer = Some(Deadline::At(last + idle + 1));
                } else if idle > 0 {
                    let cause = CloseCause {
                        reason: CloseReason::IdleTimeout,
                        tell: Some((close_code::IDLE_TIMEOUT, "idle timeout")),
                    };
                    self.close(cause, now, turn);
                }
            }
        }
    }

    /// A worker's message for the client, framed in its protocol and encrypted. Payloads
    /// a native frame cannot carry are dropped (the driver refuses them before).
    pub fn send_message(&mut self, flags: u8, payload: &[u8], now: u64, turn: &mut Turn) {
        if !self.is_open() {
            return;
        }
        let websocket = matches!(self.app, App::WebSocket(_));
        if payload.len() > frame::MAX_LEN_FIELD && !websocket {
            return;
        }
        let mut f = std::mem::take(&mut turn.frame);
        f.clear();
        if websocket {
            // A browser fails the whole connection on text that is not UTF-8, so such a
            // message goes as binary.
            match std::str::from_utf8(payload) {
                Ok(text) if flags & envelope::flags::TEXT != 0 => ws::encode_text(text, &mut f),
                _ => ws::encode_binary(payload, &mut f),
            }
        } else {
            frame::encode(FrameType::Data, payload, &mut f);
        }
        self.t.send_plain(&f, self.app.speaks(), now, turn);
        turn.frame = f;
    }

    /// Starts closing (a no-op once closing): counts the reason, tells the client (its
    /// protocol's close message, then close_notify) and, through an `Event::Closed`, the
    /// worker. The driver then shuts the socket once the bytes are out.
    pub fn close(&mut self, cause: CloseCause<'_>, now: u64, turn: &mut Turn) {
        self.t.close(cause, self.app.speaks(), now, turn);
        if self.is_closing() {
            // Partial input is dropped; nothing more is read.
            self.app = match std::mem::replace(&mut self.app, App::Sniff) {
                App::WebSocket(_) => App::WebSocket(Box::default()),
                App::Native { .. } => App::Native {
                    partial: Vec::new(),
                },
                App::Http { .. } => App::Http {
                    request: Vec::new(),
                },
                App::Sniff => App::Sniff,
            };
        }
    }

    /// SIGTERM: tell the client to go away (GOAWAY, or WebSocket close 1001) and close.
    pub fn drain(&mut self, now: u64, turn: &mut Turn) {
        if self.is_closing() {
            return;
        }
        let mut tell = None;
        if self.is_open() {
            match self.app.speaks() {
                Speaks::WebSocket => tell = Some((close_code::GOING_AWAY, "draining")),
                Speaks::Native => {
                    let mut f = std::mem::take(&mut turn.frame);
                    f.clear();
                    frame::encode(FrameType::GoAway, b"draining", &mut f);
                    self.t.send_plain(&f, Speaks::Native, now, turn);
                    turn.frame = f;
                }
                Speaks::Http => {}
            }
        }
        let cause = CloseCause {
            reason: CloseReason::Drain,
            tell,
        };
        self.close(cause, now, turn);
    }

    /// The idle or keepalive timeouts changed (SIGHUP): re-arm once. A native
    /// connection's timer runs from its last activity (one idle past a shorter timeout
    /// closes at the next tick); a WebSocket's fires at the next tick, where the
    /// keepalive works out its next ping or close.
    pub fn on_reload(&mut self, now: u64, cfg: &SessionConfig) {
        self.t.hibernate_after = cfg.hibernate_after_secs.min(u64::from(u16::MAX)) as u16;
        if !self.is_open() {
            return;
        }
        let timer = if matches!(self.app, App::WebSocket(_)) {
            Deadline::At(now + 1)
        } else if cfg.idle_timeout_secs == 0 {
            Deadline::Never
        } else {
            Deadline::At(u64::from(self.t.last_active) + cfg.idle_timeout_secs + 1)
        };
        self.t.timer = Some(earliest(timer, self.t.hibernate_deadline(now)));
    }

    // ---- live upgrade ------------------------------------------------------------------------

    /// Appends the session in the hand-over format (`handover.rs`), for a new process to
    /// carry on with [`Session::import`]: the record layer (hibernated first), what the
    /// handshake negotiated, staged input, `unsent` (bytes a send had taken but not
    /// written) followed by the queued output, the last activity and the application
    /// protocol's state (a partial frame or request, a WebSocket's fragmented message and
    /// unanswered ping). Only an established connection on our record layer moves; the
    /// error says why another cannot.
    pub fn export(&mut self, unsent: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        if !self.is_open() {
            return Err("not established");
        }
        let start = out.len();
        if !self.t.tls.export(out) {
            out.truncate(start);
            return Err("on the TLS library (TLS 1.2, or hibernation off)");
        }
        let t = &self.t;
        match &t.sni {
            None => out.put_u8(0),
            Some(name) => {
                out.put_u8(1);
                out.put_bytes(name.as_bytes());
            }
        }
        out.put_u8(match t.alpn {
            Alpn::None => 0,
            Alpn::Native => 1,
            Alpn::Http => 2,
        });
        out.put_u8(u8::from(t.resumed));
        out.put_u16(t.version.map_or(0, u16::from));
        out.put_bytes(&t.staging);
        out.put_u32((unsent.len() + t.queued.len()) as u32);
        out.extend_from_slice(unsent);
        out.extend_from_slice(&t.queued);
        out.put_u32(t.last_active);
        match &self.app {
            App::Sniff => out.put_u8(0),
            App::Native { partial } => {
                out.put_u8(1);
                out.put_bytes(partial);
            }
            App::Http { request } => {
                out.put_u8(2);
                out.put_bytes(request);
            }
            App::WebSocket(ws) => {
                out.put_u8(3);
                out.put_u8(ws.asm.to_byte());
                out.put_bytes(&ws.partial);
                out.put_bytes(&ws.msg);
                match ws.ping_sent {
                    None => out.put_u8(0),
                    Some(at) => {
                        out.put_u8(1);
                        out.put_u32(at);
                    }
                }
            }
        }
        Ok(())
    }

    /// A session that another process exported, established and asleep until its next
    /// record. Ticks continue the old core's clock (the new core starts its clock where
    /// the old one was). Its timer fires at the next tick, where idle, keepalive and
    /// hibernation deadlines are worked out again from its last activity.
    pub fn import(
        r: &mut Reader<'_>,
        now: u64,
        cfg: &SessionConfig,
        suites: &[&'static rustls::Tls13CipherSuite],
        turn: &mut Turn,
    ) -> Result<Session, FormatError> {
        let (state, used) = crate::record::Hibernated::decode(r.rest(), suites)
            .map_err(|e| FormatError::Invalid(format!("record layer: {e}")))?;
        r.advance(used, "record layer")?;
        let sni = match r.u8("server name flag")? {
            0 => None,
            1 => {
                let name = std::str::from_utf8(r.bytes("server name")?)
                    .map_err(|_| FormatError::Invalid("server name: not UTF-8".into()))?;
                Some(turn.names.intern(name.into()))
            }
            b => return Err(FormatError::Invalid(format!("server name flag {b}"))),
        };
        let alpn = match r.u8("ALPN")? {
            0 => Alpn::None,
            1 => Alpn::Native,
            2 => Alpn::Http,
            b => return Err(FormatError::Invalid(format!("ALPN {b}"))),
        };
        let resumed = r.bool("resumed")?;
        let version = match r.u16("TLS version")? {
            0 => None,
            v => Some(rustls::ProtocolVersion::from(v)),
        };
        let staging = r.bytes("staged input")?;
        if staging.len() > MAX_STAGING {
            return Err(FormatError::Invalid("staged input over its bound".into()));
        }
        let staging = staging.to_vec();
        let queued = r.bytes("queued output")?.to_vec();
        let last_active = r.u32("last activity")?;
        let bound = |b: &[u8], what: &str| {
            if b.len() > cfg.max_frame + MAX_STAGING {
                Err(FormatError::Invalid(format!("{what} over its bound")))
            } else {
                Ok(b.to_vec())
            }
        };
        let app = match r.u8("application protocol")? {
            0 => App::Sniff,
            1 => App::Native {
                partial: bound(r.bytes("partial frame")?, "partial frame")?,
            },
            2 => App::Http {
                request: bound(r.bytes("partial request")?, "partial request")?,
            },
            3 => {
                let asm = ws::MessageAssembler::from_byte(r.u8("message state")?)
                    .ok_or_else(|| FormatError::Invalid("WebSocket message state".into()))?;
                let partial = bound(r.bytes("partial frame")?, "partial frame")?;
                let msg = bound(r.bytes("fragmented message")?, "fragmented message")?;
                let ping_sent = match r.u8("ping flag")? {
                    0 => None,
                    1 => Some(r.u32("ping sent")?),
                    b => return Err(FormatError::Invalid(format!("ping flag {b}"))),
                };
                App::WebSocket(Box::new(Ws {
                    asm,
                    partial,
                    msg,
                    ping_sent,
                }))
            }
            b => return Err(FormatError::Invalid(format!("application protocol {b}"))),
        };
        Ok(Session {
            t: Transport {
                tls: ConnTls::from_hibernated(state),
                phase: Phase::Open,
                sni,
                alpn,
                resumed,
                version,
                hibernate_after: cfg.hibernate_after_secs.min(u64::from(u16::MAX)) as u16,
                staging,
                queued,
                last_active,
                timer: Some(Deadline::At(now + 1)),
            },
            app,
        })
    }

    // ---- the application protocols --------------------------------------------------------

    fn on_plaintext(
        &mut self,
        plain: &mut Vec<u8>,
        now: u64,
        cfg: &SessionConfig,
        turn: &mut Turn,
    ) {
        if let App::Sniff = self.app {
            self.app = if plain[0] == b'G' {
                App::Http {
                    request: Vec::new(),
                }
            } else {
                App::Native {
                    partial: Vec::new(),
                }
            };
        }
        match &mut self.app {
            App::Sniff => unreachable!("decided above"),
            App::Native { partial } => native_input(&mut self.t, partial, plain, now, cfg, turn),
            App::Http { request } => {
                request.extend_from_slice(plain);
                let mut response = Vec::new();
                match ws::parse_upgrade(request, &cfg.ws) {
                    Ok(None) => {}
                    Ok(Some((upgrade, used))) => {
                        ws::write_accept_response(&upgrade, &mut response);
                        let mut rest = request[used..].to_vec();
                        self.t.send_plain(&response, Speaks::Http, now, turn);
                        let mut state = Box::<Ws>::default();
                        self.t.timer = Some(keepalive_deadline(now, cfg));
                        if !rest.is_empty() {
                            ws_input(&mut self.t, &mut state, &mut rest, now, cfg, turn);
                        }
                        self.app = App::WebSocket(state);
                    }
                    Err(e) => {
                        e.http_response(&mut response);
                        self.t.send_plain(&response, Speaks::Http, now, turn);
                        debug!("refused HTTP request: {e}");
                        self.close(CloseCause::silent(CloseReason::BadUpgrade), now, turn);
                    }
                }
            }
            App::WebSocket(state) => ws_input(&mut self.t, state, plain, now, cfg, turn),
        }
    }

    /// A WebSocket connection's timer fired: ping it if it has been silent, close it if
    /// the last ping went unanswered.
    fn ws_keepalive(&mut self, now: u64, cfg: &SessionConfig, turn: &mut Turn) {
        let App::WebSocket(state) = &mut self.app else {
            return;
        };
        let every = cfg.ping_interval_secs;
        let idle = cfg.idle_timeout_secs;
        let last = u64::from(self.t.last_active);
        if idle > 0 && last + idle <= now {
            let cause = CloseCause {
                reason: CloseReason::IdleTimeout,
                tell: Some((close_code::GOING_AWAY, "idle timeout")),
            };
            self.close(cause, now, turn);
            return;
        }
        // Any traffic from the client answers a ping as well as a pong does.
        if state.ping_sent.is_some_and(|sent| last >= u64::from(sent)) {
            state.ping_sent = None;
        }
        let mut next = if idle > 0 { last + idle } else { u64::MAX };
        if every > 0 {
            if let Some(sent) = state.ping_sent {
                let sent = u64::from(sent);
                if now >= sent + every {
                    let cause = CloseCause {
                        reason: CloseReason::IdleTimeout,
                        tell: Some((close_code::GOING_AWAY, "no pong")),
                    };
                    self.close(cause, now, turn);
                    return;
                }
                next = next.min(sent + every);
            } else if last + every <= now {
                state.ping_sent = Some(now as u32);
                let mut f = std::mem::take(&mut turn.frame);
                f.clear();
                ws::encode_ping(b"holdfast", &mut f);
                self.t.send_plain(&f, Speaks::WebSocket, now, turn);
                turn.frame = f;
                next = next.min(now + every);
            } else {
                next = next.min(last + every);
            }
        }
        if next != u64::MAX && !self.is_closing() {
            self.t.timer = Some(Deadline::At(next + 1));
        }
    }
}

impl Transport {
    /// Encrypts plaintext towards the client; a session that cannot is closed.
    fn send_plain(&mut self, data: &[u8], speaks: Speaks, now: u64, turn: &mut Turn) {
        if self.seal(data, now, turn).is_err() {
            // A record that failed earlier in the same receive (a PING answered before the
            // bad record was reached) is the TLS error it is, not an internal one.
            let reason = if self.tls.has_failed() {
                CloseReason::TlsError
            } else {
                CloseReason::Internal
            };
            self.close(CloseCause::silent(reason), speaks, now, turn);
        }
    }

    /// Encrypts `data` into the transmit queue, waking a hibernated connection.
    fn seal(&mut self, data: &[u8], now: u64, turn: &mut Turn) -> Result<(), TlsEnd> {
        let woke = self
            .tls
            .encrypt(&mut self.staging, data, &mut self.queued, &mut turn.plain)?;
        if woke {
            turn.wakeups += 1;
            let current = self.timer.unwrap_or(Deadline::At(u64::MAX));
            self.timer = Some(earliest(current, self.wake_deadline(now)));
        }
        Ok(())
    }

    /// When an awake connection on our record layer should next try to hibernate.
    fn hibernate_deadline(&self, now: u64) -> Deadline {
        let after = u64::from(self.hibernate_after);
        if after == 0 || !self.tls.is_own() || self.tls.is_asleep() {
            return Deadline::Never;
        }
        let at = u64::from(self.last_active) + after + 1;
        Deadline::At(if at > now { at } else { now + after })
    }

    /// A hibernated connection just woke: look at it again once it may sleep again.
    fn wake_deadline(&self, now: u64) -> Deadline {
        Deadline::At(now + u64::from(self.hibernate_after).max(1) + 1)
    }

    /// Encrypts the control frames gathered in `turn.reply` (PONGs).
    fn flush_replies(&mut self, speaks: Speaks, now: u64, turn: &mut Turn) {
        if turn.reply.is_empty() {
            return;
        }
        let reply = std::mem::take(&mut turn.reply);
        self.send_plain(&reply, speaks, now, turn);
        turn.reply = reply;
        turn.reply.clear();
    }

    fn close(&mut self, cause: CloseCause<'_>, speaks: Speaks, now: u64, turn: &mut Turn) {
        if self.is_closing() {
            return;
        }
        // Replies gathered before the close go first.
        self.flush_replies(speaks, now, turn);
        if self.is_closing() {
            return;
        }
        let established = self.phase == Phase::Open;
        // Linger (half-close, keep reading until the client's FIN) only when the client has
        // a last message to read: a CLOSE frame, a GOAWAY or an HTTP error.
        let linger = established && (cause.tell.is_some() || !self.queued.is_empty());
        self.phase = Phase::Closing(Closing {
            reason: cause.reason,
            linger,
            cut: false,
        });
        if established {
            if let Some((code, why)) = cause.tell {
                let mut f = std::mem::take(&mut turn.frame);
                f.clear();
                encode_close_for(speaks, code, why, &mut f);
                if !f.is_empty() && self.seal(&f, now, turn).is_err() {
                    debug!("could not encrypt the close message");
                }
                turn.frame = f;
            }
            if self
                .tls
                .close_notify(&mut self.staging, &mut self.queued, &mut turn.plain)
            {
                turn.wakeups += 1;
            }
        }
        self.staging = Vec::new();
        let code = cause.tell.map(|t| t.0).unwrap_or(close_code::NORMAL);
        turn.events.push(Event::Closed {
            reason: cause.reason,
            code,
        });
        self.timer = Some(Deadline::At(now + CLOSE_FLUSH_SECS));
    }

    fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing(_))
    }
}

/// Native frames: DATA to the worker, PING answered here, CLOSE, errors.
fn native_input(
    t: &mut Transport,
    partial: &mut Vec<u8>,
    plain: &[u8],
    now: u64,
    cfg: &SessionConfig,
    turn: &mut Turn,
) {
    let mut data = std::mem::take(partial);
    let input: &[u8] = if data.is_empty() {
        plain
    } else {
        data.extend_from_slice(plain);
        &data
    };
    let mut off = 0;
    let mut cause = None;
    while cause.is_none() {
        match frame::decode(&input[off..], cfg.max_frame) {
            Ok(Some((f, used))) => {
                off += used;
                match f {
                    Frame::Data(p) => turn.frame_event(0, p),
                    Frame::Ping(p) => {
                        turn.pings += 1;
                        frame::encode(FrameType::Pong, p, &mut turn.reply);
                    }
                    Frame::Pong(_) => {}
                    Frame::Close { .. } => {
                        cause = Some(CloseCause {
                            reason: CloseReason::PeerClosed,
                            tell: Some((close_code::NORMAL, "")),
                        })
                    }
                    Frame::GoAway(_) => {
                        cause = Some(CloseCause {
                            reason: CloseReason::ProtocolError,
                            tell: Some((
                                close_code::PROTOCOL_ERROR,
                                "GOAWAY is sent by the gateway only",
                            )),
                        })
                    }
                }
            }
            Ok(None) => break,
            Err(e) => cause = Some(CloseCause::from(e)),
        }
    }
    match cause {
        Some(cause) => t.close(cause, Speaks::Native, now, turn),
        None => {
            if off < input.len() {
                *partial = input[off..].to_vec();
            }
            t.flush_replies(Speaks::Native, now, turn);
        }
    }
}

/// WebSocket frames: messages to the worker, pings answered here, the close handshake.
fn ws_input(
    t: &mut Transport,
    state: &mut Ws,
    plain: &mut Vec<u8>,
    now: u64,
    cfg: &SessionConfig,
    turn: &mut Turn,
) {
    let mut data = std::mem::take(&mut state.partial);
    let input: &mut Vec<u8> = if data.is_empty() {
        plain
    } else {
        data.extend_from_slice(plain);
        &mut data
    };
    let mut msg = std::mem::take(&mut state.msg);
    let max = cfg.max_frame;
    let mut off = 0;
    let mut failure: Option<ws::WsError> = None;
    let mut peer_close = None;
    loop {
        let limit = state.asm.frame_limit(&msg, max);
        let frame = match ws::decode_frame(&mut input[off..], limit) {
            Ok(Some((frame, used))) => {
                off += used;
                frame
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        match state.asm.push(frame, &mut msg, max) {
            Ok(None) => {}
            Ok(Some(ws::Event::Message { text, data })) => {
                let flags = if text { envelope::flags::TEXT } else { 0 };
                turn.frame_event(flags, data);
            }
            Ok(Some(ws::Event::Ping(p))) => {
                turn.pings += 1;
                ws::encode_pong(p, &mut turn.reply);
            }
            Ok(Some(ws::Event::Pong(_))) => state.ping_sent = None,
            Ok(Some(ws::Event::Close { code, .. })) => {
                peer_close = Some(code.unwrap_or(NO_STATUS));
                break;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failure {
        let why = e.to_string();
        let cause = CloseCause {
            reason: ws_reason(&e),
            tell: Some((e.close_code(), &why)),
        };
        t.close(cause, Speaks::WebSocket, now, turn);
    } else if let Some(code) = peer_close {
        let cause = CloseCause {
            reason: CloseReason::PeerClosed,
            tell: Some((code, "")),
        };
        t.close(cause, Speaks::WebSocket, now, turn);
    } else {
        if off < input.len() {
            state.partial = input[off..].to_vec();
        }
        t.flush_replies(Speaks::WebSocket, now, turn);
    }
    // An idle connection keeps no message buffer.
    state.msg = if state.asm.in_message() && !t.is_closing() {
        msg
    } else {
        Vec::new()
    };
}

/// The sooner of two deadlines.
fn earliest(a: Deadline, b: Deadline) -> Deadline {
    match (a, b) {
        (Deadline::At(x), Deadline::At(y)) => Deadline::At(x.min(y)),
        (Deadline::Never, d) | (d, Deadline::Never) => d,
    }
}

fn idle_deadline(now: u64, cfg: &SessionConfig) -> Deadline {
    match cfg.idle_timeout_secs {
        0 => Deadline::Never,
        idle => Deadline::At(now + idle + 1),
    }
}

/// WebSocket connections are kept alive by the gateway's pings instead of the idle timeout.
fn keepalive_deadline(now: u64, cfg: &SessionConfig) -> Deadline {
    match [cfg.ping_interval_secs, cfg.idle_timeout_secs]
        .into_iter()
        .filter(|&t| t > 0)
        .min()
    {
        None => Deadline::Never,
        Some(t) => Deadline::At(now + t + 1),
    }
}

/// The close message of a connection's protocol: a native CLOSE frame, a WebSocket close
/// frame (codes WebSocket does not allow become 1011), or nothing in HTTP.
fn encode_close_for(speaks: Speaks, code: u16, why: &str, out: &mut Vec<u8>) {
    match speaks {
        Speaks::Native => frame::encode_close(code, why, out),
        Speaks::WebSocket => match code {
            // The client closed without a code: answer likewise (RFC 6455 5.5.1).
            NO_STATUS => ws::encode_frame(ws::Opcode::Close, true, &[], out),
            c if ws::is_valid_close_code(c) => ws::encode_close(c, why, out),
            _ => ws::encode_close(close_code::INTERNAL, why, out),
        },
        Speaks::Http => {}
    }
}
