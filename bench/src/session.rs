//! One client connection's protocol state, free of I/O: TLS 1.3 through rustls' unbuffered
//! client (the same record driver the gateway uses, so the load generator owns every buffer
//! the way the gateway does), and the native frame protocol on top.
//!
//! The ring code hands it received bytes and takes the TLS bytes it wants sent; it hands
//! back what the scenario must see (the handshake finishing, DATA frames, the end of the
//! connection). PING is answered with PONG here and never reaches a scenario.

use std::sync::Arc;

use holdfast::tls::{Records, TlsEnd, VecSink};
use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use crate::client::TlsInfo;

/// The largest payload this client accepts: whatever the length field can say. The
/// gateway enforces its own limit; the client's job is to report, not to police.
const MAX_PAYLOAD: usize = frame::MAX_LEN_FIELD;

/// What one batch of received bytes meant.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// The handshake completed in this batch (ALPN already checked).
    pub established: Option<TlsInfo>,
    /// DATA payloads, in order.
    pub data: Vec<Vec<u8>>,
    /// The connection is over: CLOSE, GOAWAY, close_notify, a TLS or framing error. The
    /// text says which.
    pub ended: Option<String>,
}

/// One connection's TLS and framing state.
pub struct Session {
    tls: Records<UnbufferedClientConnection>,
    /// A TLS record split across receives, kept until the rest arrives; empty otherwise.
    staging: Vec<u8>,
    /// Plaintext not yet cut into whole frames.
    inbox: FrameBuf,
    /// TLS bytes waiting to be sent.
    out: Vec<u8>,
}

impl Session {
    /// A new client for `server`; call [`Session::start`] to queue the ClientHello.
    pub fn new(config: Arc<ClientConfig>, server: ServerName<'static>) -> Result<Session, String> {
        let conn = UnbufferedClientConnection::new(config, server).map_err(|e| e.to_string())?;
        Ok(Session {
            tls: Records::new(conn),
            staging: Vec::new(),
            inbox: FrameBuf::new(),
            out: Vec::new(),
        })
    }

    /// Queues the ClientHello.
    pub fn start(&mut self) -> Result<(), String> {
        let mut received = Received::default();
        self.feed_tls(&mut [], &mut received);
        match received.ended {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Takes a batch of received TLS bytes (decrypted in place where possible).
    pub fn receive(&mut self, bytes: &mut [u8]) -> Received {
        let mut received = Received::default();
        self.feed_tls(bytes, &mut received);
        // Frames decrypted before a close_notify or an error still count, and a CLOSE among
        // them is the better reason: it came first.
        let tls_end = received.ended.take();
        self.cut_frames(&mut received);
        if received.ended.is_none() {
            received.ended = tls_end;
        }
        received
    }

    /// Sends one frame (encrypted as a record of its own). Only once established.
    pub fn send(&mut self, kind: FrameType, payload: &[u8]) -> Result<(), String> {
        let mut plain = Vec::with_capacity(frame::HEADER_LEN + payload.len());
        frame::encode(kind, payload, &mut plain);
        let mut sink = VecSink::new(&mut self.out, &mut self.inbox);
        self.tls
            .encrypt(&mut self.staging, &plain, &mut sink)
            .map_err(|_| "TLS refused to encrypt".to_string())
    }

    /// Queues TLS close_notify (best effort).
    pub fn close_notify(&mut self) {
        let mut sink = VecSink::new(&mut self.out, &mut self.inbox);
        self.tls.close_notify(&mut self.staging, &mut sink);
    }

    /// True when TLS bytes wait to be sent.
    pub fn wants_send(&self) -> bool {
        !self.out.is_empty()
    }

    /// Takes the TLS bytes waiting to be sent, leaving `spare` (an empty buffer whose
    /// capacity is reused) in their place.
    pub fn take_out(&mut self, spare: Vec<u8>) -> Vec<u8> {
        debug_assert!(spare.is_empty());
        std::mem::replace(&mut self.out, spare)
    }

    /// Feeds received bytes through the gateway's own staging loop.
    fn feed_tls(&mut self, bytes: &mut [u8], received: &mut Received) {
        let was_established = self.tls.is_established();
        let mut sink = VecSink::new(&mut self.out, &mut self.inbox);
        let fed = self.tls.feed_staged(&mut self.staging, bytes, &mut sink);
        if fed.handshake_done && !was_established {
            let common = self.tls.common();
            let alpn = common.alpn_protocol();
            if alpn != Some(frame::ALPN) {
                received.ended = Some(format!(
                    "gateway chose ALPN {:?}, not holdfast/1",
                    alpn.map(String::from_utf8_lossy)
                ));
                return;
            }
            received.established = Some(TlsInfo {
                resumed: common.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                cipher_suite: common
                    .negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite())),
                kx_group: common
                    .negotiated_key_exchange_group()
                    .map(|g| format!("{:?}", g.name())),
            });
        }
        match fed.end {
            None => {}
            Some(TlsEnd::PeerClosed) => received.ended = Some("TLS close_notify".into()),
            Some(TlsEnd::Error) => received.ended = Some("TLS error".into()),
        }
    }

    fn cut_frames(&mut self, received: &mut Received) {
        loop {
            match self.inbox.next(MAX_PAYLOAD) {
                Err(e) => {
                    received.ended = Some(format!("bad frame from the server: {e}"));
                    return;
                }
                Ok(None) => return,
                Ok(Some(OwnedFrame::Data(p))) => received.data.push(p),
                Ok(Some(OwnedFrame::Ping(p))) => {
                    if let Err(e) = self.send(FrameType::Pong, &p) {
                        received.ended = Some(e);
                        return;
                    }
                }
                Ok(Some(OwnedFrame::Pong(_))) => {}
                Ok(Some(OwnedFrame::GoAway(note))) => {
                    received.ended = Some(format!("GOAWAY {:?}", String::from_utf8_lossy(&note)));
                    return;
                }
                Ok(Some(OwnedFrame::Close { code, reason })) => {
                    received.ended = Some(format!("CLOSE {code} {reason:?}"));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::ServerConnection;

    use super::*;
    use crate::ceiling;

    /// Moves everything `session` wants sent into `server`.
    fn to_server(session: &mut Session, server: &mut ServerConnection) {
        let bytes = session.take_out(Vec::new());
        let mut rd = &bytes[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("read_tls");
            server
                .process_new_packets()
                .expect("the server takes the client's bytes");
        }
    }

    /// Everything `server` wants sent.
    fn from_server(server: &mut ServerConnection) -> Vec<u8> {
        let mut out = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut out).expect("write_tls");
        }
        out
    }

    /// A session and a rustls server with the handshake done; the server's tickets have
    /// been taken by the session.
    fn established(
        server_config: Option<Arc<rustls::ServerConfig>>,
    ) -> (Session, ServerConnection, Received) {
        let s = ceiling::setup().expect("test certificates");
        let mut server =
            ServerConnection::new(server_config.unwrap_or(s.server)).expect("server connection");
        let mut session = Session::new(s.client, s.name).expect("client session");
        session.start().expect("ClientHello");
        let mut seen = Received::default();
        for _ in 0..8 {
            to_server(&mut session, &mut server);
            let mut bytes = from_server(&mut server);
            let r = session.receive(&mut bytes);
            if r.established.is_some() {
                seen.established = r.established;
            }
            if r.ended.is_some() {
                seen.ended = r.ended;
                break;
            }
            if seen.established.is_some() && !session.wants_send() {
                break;
            }
        }
        if seen.ended.is_none() {
            to_server(&mut session, &mut server);
        }
        (session, server, seen)
    }

    fn server_sends_frame(server: &mut ServerConnection, kind: FrameType, payload: &[u8]) {
        let mut plain = Vec::new();
        frame::encode(kind, payload, &mut plain);
        server.writer().write_all(&plain).expect("server plaintext");
    }

    fn server_reads(server: &mut ServerConnection) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match server.reader().read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("server read: {e}"),
            }
        }
    }

    #[test]
    fn handshake_then_frames_both_ways() {
        let (mut session, mut server, seen) = established(None);
        let info = seen.established.expect("the handshake completes");
        assert!(!info.resumed);
        assert_eq!(info.kx_group.as_deref(), Some("X25519"));
        assert_eq!(seen.ended, None);

        session.send(FrameType::Data, b"hello").expect("send");
        to_server(&mut session, &mut server);
        let mut want = Vec::new();
        frame::encode(FrameType::Data, b"hello", &mut want);
        assert_eq!(server_reads(&mut server), want);

        server_sends_frame(&mut server, FrameType::Data, b"one");
        server_sends_frame(&mut server, FrameType::Data, b"two");
        let mut bytes = from_server(&mut server);
        let r = session.receive(&mut bytes);
        assert_eq!(r.data, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(r.ended, None);
    }

    #[test]
    fn records_split_across_receives_are_staged() {
        let (mut session, mut server, _) = established(None);
        server_sends_frame(&mut server, FrameType::Data, &[7u8; 300]);
        server_sends_frame(&mut server, FrameType::Data, b"after");
        let bytes = from_server(&mut server);
        let mut data = Vec::new();
        // One byte at a time: every record is split, most of them many times.
        for b in bytes {
            let r = session.receive(&mut [b]);
            assert_eq!(r.ended, None);
            data.extend(r.data);
        }
        assert_eq!(data, vec![vec![7u8; 300], b"after".to_vec()]);
    }

    #[test]
    fn ping_is_answered_and_never_surfaces() {
        let (mut session, mut server, _) = established(None);
        server_sends_frame(&mut server, FrameType::Ping, b"beat");
        let mut bytes = from_server(&mut server);
        let r = session.receive(&mut bytes);
        assert!(r.data.is_empty() && r.ended.is_none());
        assert!(session.wants_send(), "the PONG waits to be sent");
        to_server(&mut session, &mut server);
        let mut want = Vec::new();
        frame::encode(FrameType::Pong, b"beat", &mut want);
        assert_eq!(server_reads(&mut server), want);
    }

    #[test]
    fn frames_before_close_notify_are_delivered() {
        let (mut session, mut server, _) = established(None);
        server_sends_frame(&mut server, FrameType::Data, b"last words");
        server.send_close_notify();
        let mut bytes = from_server(&mut server);
        let r = session.receive(&mut bytes);
        assert_eq!(r.data, vec![b"last words".to_vec()]);
        assert_eq!(r.ended.as_deref(), Some("TLS close_notify"));
    }

    #[test]
    fn close_frame_ends_with_its_code() {
        let (mut session, mut server, _) = established(None);
        let mut plain = Vec::new();
        frame::encode_close(frame::close_code::GOING_AWAY, "bye", &mut plain);
        server.writer().write_all(&plain).expect("server plaintext");
        server.send_close_notify();
        let mut bytes = from_server(&mut server);
        let r = session.receive(&mut bytes);
        let ended = r.ended.expect("the connection ended");
        assert!(ended.starts_with("CLOSE 1001"), "{ended}");
    }

    #[test]
    fn a_server_without_the_protocol_is_refused() {
        let s = ceiling::setup().expect("test certificates");
        let mut config = (*s.server).clone();
        config.alpn_protocols.clear();
        let (_, _, seen) = established(Some(Arc::new(config)));
        assert!(seen.established.is_none());
        let ended = seen.ended.expect("the session ends");
        assert!(
            ended.contains("not holdfast/1") || ended == "TLS error",
            "{ended}"
        );
    }

    #[test]
    fn garbage_from_the_server_is_a_tls_error() {
        let s = ceiling::setup().expect("test certificates");
        let mut session = Session::new(s.client, s.name).expect("client session");
        session.start().expect("ClientHello");
        assert!(session.wants_send());
        let r = session.receive(&mut b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        assert_eq!(r.ended.as_deref(), Some("TLS error"));
    }
}
