//! The real [`holdfast::session::Session`] against a real rustls client, in memory, on a
//! virtual clock: no sockets, no ring, no gateway process. [`Pair`] drives the session the
//! way `core.rs` does (events, then bytes to send, then the deadline, then closing) and
//! delivers what it sends to the client, so each test reads what a client would see:
//! frames, close messages, close_notify, alerts; and what a worker would see: OPEN, frames
//! and CLOSE with their reasons.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, LazyLock};

use holdfast::config::{CertConfig, Config};
use holdfast::metrics::CloseReason;
use holdfast::session::{CloseCause, Closing, Deadline, Event, Session, SessionConfig, Turn};
use holdfast::tls::{server_config, TlsSession};
use holdfast_wire::frame::{self, close_code, FrameBuf, FrameType, OwnedFrame};
use holdfast_wire::ws;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

struct Setup {
    server: Arc<ServerConfig>,
    native: Arc<ClientConfig>,
    /// A browser: ALPN http/1.1.
    browser: Arc<ClientConfig>,
    /// No ALPN at all.
    plain: Arc<ClientConfig>,
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let dir = common::TestDir::new();
    let pki = common::Pki::generate(&dir);
    let mut config = Config::default();
    config.tls.certs.push(CertConfig {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        server_names: vec!["localhost".into()],
    });
    let server = server_config(&config).expect("server config");
    let client = |alpn: &[&[u8]]| {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_der.clone()).expect("trust the test CA");
        let provider = Arc::new(holdfast::provider::default_provider());
        let mut c = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the provider's protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    };
    Setup {
        server,
        native: client(&[frame::ALPN]),
        browser: client(&[b"http/1.1"]),
        plain: client(&[]),
    }
});

fn session_config() -> SessionConfig {
    let mut cfg = Config::default();
    cfg.limits.idle_timeout_secs = 60;
    cfg.limits.handshake_timeout_secs = 5;
    cfg.limits.max_frame = 1024;
    cfg.websocket.ping_interval_secs = 10;
    SessionConfig::new(&cfg)
}

/// What the worker side saw, with payloads copied out of the turn.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Established,
    HandshakeFailed,
    Frame(u8, Vec<u8>),
    Closed(CloseReason, u16),
}

/// What the client read.
#[derive(Debug, Default)]
struct ClientView {
    /// Plaintext received, in order.
    plain: Vec<u8>,
    /// The gateway's close_notify arrived.
    close_notify: bool,
    /// The client's rustls refused what the gateway sent (an alert, say).
    error: Option<String>,
}

struct Pair {
    session: Session,
    client: ClientConnection,
    cfg: SessionConfig,
    turn: Turn,
    now: u64,
    /// The deadline armed for the session, as the core's wheel holds it.
    timer: Option<u64>,
    seen: Vec<Seen>,
    view: ClientView,
    /// A worker is up to take frames (the core closes with NoWorker otherwise).
    worker_up: bool,
    /// Bytes the session asked to send that the client has not read yet.
    unread: Vec<u8>,
    /// The client reads what it is sent (false: a slow consumer).
    client_reads: bool,
}

impl Pair {
    fn new(client_config: &Arc<ClientConfig>) -> Pair {
        let cfg = session_config();
        let tls = TlsSession::new(SETUP.server.clone()).expect("server session");
        let session = Session::new(tls, 100, &cfg);
        let client = ClientConnection::new(
            client_config.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .expect("client");
        let mut pair = Pair {
            session,
            client,
            cfg,
            turn: Turn::new(),
            now: 100,
            timer: None,
            seen: Vec::new(),
            view: ClientView::default(),
            worker_up: true,
            unread: Vec::new(),
            client_reads: true,
        };
        pair.drive();
        pair
    }

    /// Handshaken, with the events of the handshake checked and cleared.
    fn established(client_config: &Arc<ClientConfig>) -> Pair {
        let mut pair = Pair::new(client_config);
        pair.handshake(&[]);
        assert!(pair.session.is_open(), "handshake failed: {:?}", pair.seen);
        assert_eq!(pair.take_seen(), vec![Seen::Established]);
        pair
    }

    /// Reads the session's outputs in the core's order.
    fn drive(&mut self) {
        loop {
            if self.turn.events.is_empty() {
                break;
            }
            let mut events = std::mem::take(&mut self.turn.events);
            let mut refused = false;
            for &ev in &events.list {
                match ev {
                    Event::Established => self.seen.push(Seen::Established),
                    Event::HandshakeFailed => self.seen.push(Seen::HandshakeFailed),
                    Event::Frame { .. } if refused => {}
                    Event::Frame { flags, start, end } => {
                        if self.worker_up {
                            self.seen
                                .push(Seen::Frame(flags, events.payload(start, end).to_vec()));
                        } else {
                            refused = true;
                            self.session
                                .close(CloseCause::no_worker(), self.now, &mut self.turn);
                        }
                    }
                    Event::Closed { reason, code } => self.seen.push(Seen::Closed(reason, code)),
                }
            }
            events.clear();
            if self.turn.events.is_empty() {
                self.turn.events = events;
            }
        }
        let out = std::mem::take(self.session.transmit());
        self.unread.extend_from_slice(&out);
        match self.session.poll_timer() {
            Some(Deadline::At(t)) => self.timer = Some(t),
            Some(Deadline::Never) => self.timer = None,
            None => {}
        }
        if self.client_reads {
            self.client_read();
        }
    }

    fn client_read(&mut self) {
        let bytes = std::mem::take(&mut self.unread);
        let mut rd = &bytes[..];
        while !rd.is_empty() && self.view.error.is_none() {
            self.client.read_tls(&mut rd).expect("client read_tls");
            if let Err(e) = self.client.process_new_packets() {
                self.view.error = Some(e.to_string());
            }
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.client.reader().read(&mut buf) {
                Ok(0) => {
                    self.view.close_notify = true;
                    break;
                }
                Ok(n) => self.view.plain.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
    }

    /// Client bytes to the session, in receives of the sizes in `splits` (cycled; all at
    /// once when empty).
    fn deliver(&mut self, bytes: &[u8], splits: &[usize]) {
        let mut rest = bytes;
        let mut sizes = splits.iter().copied().cycle();
        while !rest.is_empty() {
            let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
            let (a, b) = rest.split_at(n);
            let mut buf = a.to_vec();
            self.session
                .on_receive(&mut buf, self.now, &self.cfg, &mut self.turn);
            self.drive();
            rest = b;
        }
    }

    fn client_flush(&mut self, splits: &[usize]) {
        let mut wire = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut wire).expect("client write_tls");
        }
        self.deliver(&wire, splits);
    }

    fn handshake(&mut self, splits: &[usize]) {
        for _ in 0..8 {
            self.client_flush(splits);
            if !self.client.is_handshaking() && !self.client.wants_write() {
                return;
            }
        }
    }

    /// The client sends plaintext (one record).
    fn send(&mut self, plain: &[u8]) {
        self.client.writer().write_all(plain).expect("client write");
        self.client_flush(&[]);
    }

    fn send_frame(&mut self, kind: FrameType, payload: &[u8]) {
        let mut f = Vec::new();
        frame::encode(kind, payload, &mut f);
        self.send(&f);
    }

    /// The virtual clock moves on; due timers fire as the core's wheel fires them.
    fn advance(&mut self, secs: u64) {
        let end = self.now + secs;
        while self.now < end {
            self.now += 1;
            while let Some(t) = self.timer.filter(|&t| t <= self.now) {
                self.timer = None;
                self.session
                    .on_timeout(self.now, &self.cfg, true, &mut self.turn);
                self.drive();
                if self.timer == Some(t) {
                    break;
                }
            }
        }
    }

    fn take_seen(&mut self) -> Vec<Seen> {
        std::mem::take(&mut self.seen)
    }

    /// The native frames the client has read so far (and forgets them).
    fn client_frames(&mut self) -> Vec<OwnedFrame> {
        let mut buf = FrameBuf::new();
        buf.push(&std::mem::take(&mut self.view.plain));
        let mut out = Vec::new();
        while let Some(f) = buf.next(frame::MAX_LEN_FIELD).expect("a well-formed frame") {
            out.push(f);
        }
        assert_eq!(buf.buffered(), 0, "a partial frame at the client");
        out
    }

    fn closing(&self) -> Closing {
        self.session.closing().expect("the session is closing")
    }
}

fn close_frame(code: u16, why: &str) -> OwnedFrame {
    let mut f = Vec::new();
    frame::encode_close(code, why, &mut f);
    let mut buf = FrameBuf::new();
    buf.push(&f);
    buf.next(frame::MAX_LEN_FIELD).unwrap().unwrap()
}

// ---------------------------------------------------------------------------------------
// Native protocol

#[test]
fn frames_reach_the_worker_and_replies_reach_the_client() {
    let mut p = Pair::established(&SETUP.native);
    p.send_frame(FrameType::Data, b"hello");
    // Two frames in one record, one split over two records.
    let mut two = Vec::new();
    frame::encode(FrameType::Data, b"one", &mut two);
    frame::encode(FrameType::Data, b"two", &mut two);
    p.send(&two[..5]);
    p.send(&two[5..]);
    assert_eq!(
        p.take_seen(),
        vec![
            Seen::Frame(0, b"hello".to_vec()),
            Seen::Frame(0, b"one".to_vec()),
            Seen::Frame(0, b"two".to_vec()),
        ]
    );
    p.session.send_message(0, b"answer", p.now, &mut p.turn);
    p.drive();
    assert_eq!(
        p.client_frames(),
        vec![OwnedFrame::Data(b"answer".to_vec())]
    );
}

#[test]
fn a_handshake_delivered_one_byte_at_a_time_completes() {
    let mut p = Pair::new(&SETUP.native);
    p.handshake(&[1]);
    assert!(p.session.is_open());
    assert_eq!(p.take_seen(), vec![Seen::Established]);
    assert_eq!(p.session.alpn(), Some(frame::ALPN));
    assert_eq!(p.session.server_name(), Some("localhost"));
}

#[test]
fn pings_are_answered_by_the_gateway_and_never_reach_the_worker() {
    let mut p = Pair::established(&SETUP.native);
    p.send_frame(FrameType::Ping, b"are you there");
    assert_eq!(p.take_seen(), vec![]);
    assert_eq!(p.turn.pings, 1);
    assert_eq!(
        p.client_frames(),
        vec![OwnedFrame::Pong(b"are you there".to_vec())]
    );
}

#[test]
fn the_idle_timeout_runs_from_the_last_traffic_and_closes_with_a_reason() {
    let mut p = Pair::established(&SETUP.native);
    // Traffic before the deadline: the timer fires early and is re-armed, lazily.
    p.advance(50);
    p.send_frame(FrameType::Ping, b"");
    p.client_frames();
    p.advance(20);
    assert!(
        p.session.is_open(),
        "closed 70 s after accept but 20 s after traffic"
    );
    p.advance(41);
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(
            CloseReason::IdleTimeout,
            close_code::IDLE_TIMEOUT
        )]
    );
    assert_eq!(
        p.client_frames(),
        vec![close_frame(close_code::IDLE_TIMEOUT, "idle timeout")]
    );
    assert!(p.view.close_notify, "close_notify after the CLOSE frame");
    assert!(p.closing().linger, "the client has a CLOSE frame to read");
}

#[test]
fn an_unfinished_handshake_times_out() {
    let mut p = Pair::new(&SETUP.native);
    p.advance(4);
    assert!(p.session.closing().is_none());
    p.advance(3);
    assert_eq!(
        p.take_seen(),
        vec![
            Seen::HandshakeFailed,
            Seen::Closed(CloseReason::HandshakeTimeout, close_code::NORMAL)
        ]
    );
    assert!(!p.closing().linger, "nothing to tell a client without TLS");
}

#[test]
fn a_closing_connection_is_cut_when_its_flush_deadline_passes() {
    let mut p = Pair::established(&SETUP.native);
    p.client_reads = false;
    p.session.close(
        CloseCause {
            reason: CloseReason::WorkerClose,
            tell: Some((4000, "bye")),
        },
        p.now,
        &mut p.turn,
    );
    p.drive();
    assert!(p.closing().linger && !p.closing().cut);
    p.advance(holdfast::session::CLOSE_FLUSH_SECS);
    assert!(
        p.closing().cut,
        "past the flush deadline the connection is cut"
    );
    // What was sent still reads as the last message and close_notify.
    p.client_reads = true;
    p.client_read();
    assert_eq!(p.client_frames(), vec![close_frame(4000, "bye")]);
    assert!(p.view.close_notify);
}

#[test]
fn a_silent_close_does_not_linger() {
    let mut p = Pair::established(&SETUP.native);
    p.session.close(
        CloseCause::silent(CloseReason::PeerReset),
        p.now,
        &mut p.turn,
    );
    p.drive();
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(CloseReason::PeerReset, close_code::NORMAL)]
    );
    assert!(!p.closing().linger);
    // Closing twice changes nothing.
    p.session.close(
        CloseCause::silent(CloseReason::Internal),
        p.now,
        &mut p.turn,
    );
    p.drive();
    assert_eq!(p.take_seen(), vec![]);
}

#[test]
fn drain_sends_goaway_then_close_notify() {
    let mut p = Pair::established(&SETUP.native);
    p.session.drain(p.now, &mut p.turn);
    p.drive();
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(CloseReason::Drain, close_code::NORMAL)]
    );
    assert_eq!(
        p.client_frames(),
        vec![OwnedFrame::GoAway(b"draining".to_vec())]
    );
    assert!(p.view.close_notify);
    assert!(p.closing().linger, "the client has the GOAWAY to read");
}

#[test]
fn a_reload_with_a_shorter_idle_timeout_closes_connections_idle_past_it() {
    let mut p = Pair::established(&SETUP.native);
    p.advance(30);
    p.cfg.idle_timeout_secs = 10;
    p.session.on_reload(p.now, &p.cfg);
    p.drive();
    p.advance(1);
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(
            CloseReason::IdleTimeout,
            close_code::IDLE_TIMEOUT
        )]
    );
}

#[test]
fn a_worker_message_is_framed_and_a_worker_close_is_told() {
    let mut p = Pair::established(&SETUP.native);
    p.session.send_message(0, b"to you", p.now, &mut p.turn);
    p.session.close(
        CloseCause {
            reason: CloseReason::WorkerClose,
            tell: Some((4001, "banned")),
        },
        p.now,
        &mut p.turn,
    );
    p.drive();
    assert_eq!(
        p.client_frames(),
        vec![
            OwnedFrame::Data(b"to you".to_vec()),
            close_frame(4001, "banned")
        ]
    );
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(CloseReason::WorkerClose, 4001)]
    );
}

// ---------------------------------------------------------------------------------------
// Bad input: each ends in a counted close of this connection, with the client told why

fn expect_close(p: &mut Pair, reason: CloseReason, code: u16, why: &str) {
    let seen = p.take_seen();
    assert_eq!(seen.last(), Some(&Seen::Closed(reason, code)), "{seen:?}");
    let frames = p.client_frames();
    assert_eq!(frames.last(), Some(&close_frame(code, why)), "{frames:?}");
    assert!(p.view.close_notify);
    assert!(p.closing().linger);
}

#[test]
fn a_frame_over_the_size_limit_closes() {
    let mut p = Pair::established(&SETUP.native);
    // Only the header: the limit is checked before the payload arrives.
    p.send(&frame::encode_header(FrameType::Data, 5000));
    expect_close(
        &mut p,
        CloseReason::FrameTooLarge,
        close_code::TOO_LARGE,
        "frame too large",
    );
}

#[test]
fn an_unknown_frame_type_closes() {
    let mut p = Pair::established(&SETUP.native);
    p.send(&[0x7f, 0, 0, 0]);
    expect_close(
        &mut p,
        CloseReason::UnknownFrameType,
        close_code::UNKNOWN_TYPE,
        "unknown frame type",
    );
}

#[test]
fn a_goaway_from_a_client_is_a_protocol_error() {
    let mut p = Pair::established(&SETUP.native);
    p.send_frame(FrameType::GoAway, b"");
    expect_close(
        &mut p,
        CloseReason::ProtocolError,
        close_code::PROTOCOL_ERROR,
        "GOAWAY is sent by the gateway only",
    );
}

#[test]
fn a_client_close_is_answered_and_frames_before_it_still_count() {
    let mut p = Pair::established(&SETUP.native);
    let mut both = Vec::new();
    frame::encode(FrameType::Data, b"last words", &mut both);
    frame::encode_close(close_code::NORMAL, "bye", &mut both);
    p.send(&both);
    assert_eq!(p.seen[0], Seen::Frame(0, b"last words".to_vec()));
    expect_close(&mut p, CloseReason::PeerClosed, close_code::NORMAL, "");
}

#[test]
fn an_end_of_stream_inside_a_frame_is_counted_as_such() {
    let mut p = Pair::established(&SETUP.native);
    p.send(&frame::encode_header(FrameType::Data, 100));
    p.session.on_eof(p.now, &p.cfg, &mut p.turn);
    p.drive();
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(CloseReason::EofMidFrame, close_code::NORMAL)]
    );
    // Between frames it is a clean close.
    let mut p = Pair::established(&SETUP.native);
    p.session.on_eof(p.now, &p.cfg, &mut p.turn);
    p.drive();
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(CloseReason::PeerClosed, close_code::NORMAL)]
    );
}

#[test]
fn garbage_instead_of_a_client_hello_gets_an_alert_and_a_tls_error() {
    let mut p = Pair::new(&SETUP.native);
    p.client_reads = false;
    p.deliver(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &[]);
    assert_eq!(
        p.take_seen(),
        vec![
            Seen::HandshakeFailed,
            Seen::Closed(CloseReason::TlsError, close_code::NORMAL)
        ]
    );
    assert!(!p.closing().linger);
    let out = std::mem::take(&mut p.unread);
    assert_eq!(out.first(), Some(&21), "an alert record: {out:?}");
}

#[test]
fn no_worker_closes_with_try_again_later() {
    let mut p = Pair::established(&SETUP.native);
    p.worker_up = false;
    p.send_frame(FrameType::Data, b"anyone?");
    expect_close(
        &mut p,
        CloseReason::NoWorker,
        close_code::TRY_AGAIN_LATER,
        "no worker available",
    );
}

#[test]
fn a_client_without_alpn_is_sniffed() {
    let mut p = Pair::established(&SETUP.plain);
    p.send_frame(FrameType::Data, b"native after all");
    assert_eq!(
        p.take_seen(),
        vec![Seen::Frame(0, b"native after all".to_vec())]
    );
    assert!(!p.session.is_websocket());
}

// ---------------------------------------------------------------------------------------
// WebSocket

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

fn ws_frame(opcode: ws::Opcode, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    ws::encode_client_frame(opcode, true, payload, [1, 2, 3, 4], &mut f);
    f
}

/// The client's plaintext so far as text (the 101 response), forgotten.
fn take_text(p: &mut Pair) -> String {
    String::from_utf8_lossy(&std::mem::take(&mut p.view.plain)).into_owned()
}

fn upgraded(config: &Arc<ClientConfig>) -> Pair {
    let mut p = Pair::established(config);
    p.send(UPGRADE.as_bytes());
    let response = take_text(&mut p);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert!(
        response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{response}"
    );
    assert!(p.session.is_websocket());
    p
}

/// Server frames the client read: (opcode, payload).
fn server_frames(p: &mut Pair) -> Vec<(u8, Vec<u8>)> {
    let bytes = std::mem::take(&mut p.view.plain);
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let op = rest[0] & 0x0f;
        let len = rest[1] as usize;
        assert!(len < 126, "short test frames only");
        out.push((op, rest[2..2 + len].to_vec()));
        rest = &rest[2 + len..];
    }
    out
}

#[test]
fn the_websocket_upgrade_then_messages_both_ways() {
    for config in [&SETUP.browser, &SETUP.plain] {
        let mut p = upgraded(config);
        p.send(&ws_frame(ws::Opcode::Text, b"hi there"));
        p.send(&ws_frame(ws::Opcode::Binary, &[0, 1, 2]));
        assert_eq!(
            p.take_seen(),
            vec![
                Seen::Frame(holdfast_wire::envelope::flags::TEXT, b"hi there".to_vec()),
                Seen::Frame(0, vec![0, 1, 2]),
            ]
        );
        p.session.send_message(
            holdfast_wire::envelope::flags::TEXT,
            b"back",
            p.now,
            &mut p.turn,
        );
        p.drive();
        assert_eq!(server_frames(&mut p), vec![(1, b"back".to_vec())]);
    }
}

#[test]
fn the_upgrade_request_and_a_first_frame_in_one_record() {
    let mut p = Pair::established(&SETUP.browser);
    let mut both = UPGRADE.as_bytes().to_vec();
    both.extend_from_slice(&ws_frame(ws::Opcode::Text, b"early"));
    p.send(&both);
    assert_eq!(
        p.take_seen(),
        vec![Seen::Frame(
            holdfast_wire::envelope::flags::TEXT,
            b"early".to_vec()
        )]
    );
}

#[test]
fn a_bad_upgrade_request_gets_an_http_error_and_a_close() {
    let mut p = Pair::established(&SETUP.browser);
    p.send(b"GET /elsewhere HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(CloseReason::BadUpgrade, close_code::NORMAL)]
    );
    let response = take_text(&mut p);
    assert!(response.starts_with("HTTP/1.1 4"), "{response}");
    assert!(p.closing().linger, "the client has the HTTP error to read");
}

#[test]
fn websocket_keepalive_pings_a_silent_client_and_closes_it_without_a_pong() {
    let mut p = upgraded(&SETUP.browser);
    p.advance(10);
    assert!(p.session.is_open());
    p.advance(1);
    assert_eq!(server_frames(&mut p), vec![(9, b"holdfast".to_vec())]);
    // A pong keeps it alive through the next interval.
    p.send(&ws_frame(ws::Opcode::Pong, b"holdfast"));
    p.advance(9);
    assert!(p.session.is_open(), "{:?}", p.seen);
    assert_eq!(
        server_frames(&mut p),
        vec![],
        "within an interval of the pong"
    );
    p.advance(2);
    assert_eq!(server_frames(&mut p), vec![(9, b"holdfast".to_vec())]);
    // No pong this time: closed with 1001.
    p.advance(11);
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(
            CloseReason::IdleTimeout,
            close_code::GOING_AWAY
        )]
    );
    let frames = server_frames(&mut p);
    let (op, payload) = frames.last().expect("a close frame");
    assert_eq!(*op, 8);
    assert_eq!(&payload[..2], &close_code::GOING_AWAY.to_be_bytes());
    assert_eq!(&payload[2..], b"no pong");
}

#[test]
fn websocket_pings_are_answered_and_bad_frames_close_with_their_code() {
    let mut p = upgraded(&SETUP.browser);
    p.send(&ws_frame(ws::Opcode::Ping, b"p"));
    assert_eq!(server_frames(&mut p), vec![(10, b"p".to_vec())]);
    assert_eq!(p.take_seen(), vec![]);

    // An unmasked client frame is a protocol error (1002).
    let mut unmasked = Vec::new();
    ws::encode_frame(ws::Opcode::Text, true, b"x", &mut unmasked);
    p.send(&unmasked);
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(
            CloseReason::ProtocolError,
            close_code::PROTOCOL_ERROR
        )]
    );
    let (op, payload) = server_frames(&mut p).pop().expect("a close frame");
    assert_eq!(op, 8);
    assert_eq!(&payload[..2], &close_code::PROTOCOL_ERROR.to_be_bytes());

    // Text that is not UTF-8 is invalid payload (1007).
    let mut p = upgraded(&SETUP.browser);
    p.send(&ws_frame(ws::Opcode::Text, &[0xff, 0xfe]));
    assert_eq!(
        p.take_seen(),
        vec![Seen::Closed(
            CloseReason::InvalidPayload,
            close_code::INVALID_PAYLOAD
        )]
    );
}

#[test]
fn websocket_drain_sends_close_1001() {
    let mut p = upgraded(&SETUP.browser);
    p.session.drain(p.now, &mut p.turn);
    p.drive();
    let (op, payload) = server_frames(&mut p).pop().expect("a close frame");
    assert_eq!(op, 8);
    assert_eq!(&payload[..2], &close_code::GOING_AWAY.to_be_bytes());
    assert_eq!(&payload[2..], b"draining");
    assert!(p.view.close_notify);
}

#[test]
fn a_client_that_reads_nothing_accumulates_bytes_the_driver_can_bound() {
    let mut p = Pair::established(&SETUP.native);
    p.client_reads = false;
    for _ in 0..100 {
        p.session.send_message(0, &[7u8; 1000], p.now, &mut p.turn);
        p.drive();
    }
    // Everything the session produced is in the driver's hands, none in the session's.
    assert!(p.unread.len() > 100_000, "{}", p.unread.len());
    assert!(!p.session.wants_transmit());
}
