//! One client connection's protocol state, free of I/O: TLS 1.3 through rustls' unbuffered
//! client (the same record driver the gateway uses, so the load generator owns every buffer
//! the way the gateway does), and the native frame protocol on top.
//!
//! The ring code hands it received bytes and takes the TLS bytes it wants sent; it hands
//! back what the scenario must see (the handshake finishing, DATA frames, the end of the
//! connection). PING is answered with PONG here and never reaches a scenario.

use std::sync::Arc;

use holdfast::tls::{Records, TlsEnd, TlsSink};
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

struct Sink<'a> {
    inbox: &'a mut FrameBuf,
    out: &'a mut Vec<u8>,
    /// Where the region `out_spare` last handed out starts.
    spare_at: usize,
}

impl<'a> Sink<'a> {
    fn new(inbox: &'a mut FrameBuf, out: &'a mut Vec<u8>) -> Sink<'a> {
        let spare_at = out.len();
        Sink {
            inbox,
            out,
            spare_at,
        }
    }
}

impl Drop for Sink<'_> {
    fn drop(&mut self) {
        // A region handed out but never committed holds no TLS bytes.
        self.out.truncate(self.spare_at);
    }
}

impl TlsSink for Sink<'_> {
    fn plaintext(&mut self, data: &[u8]) {
        self.inbox.push(data);
    }

    fn out_spare(&mut self, min: usize) -> &mut [u8] {
        self.out.truncate(self.spare_at);
        self.out.resize(self.spare_at + min, 0);
        &mut self.out[self.spare_at..]
    }

    fn commit(&mut self, n: usize) {
        self.spare_at += n;
        self.out.truncate(self.spare_at);
    }
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
        if self.staging.is_empty() {
            let consumed = self.feed_tls(bytes, &mut received);
            if received.ended.is_none() && consumed < bytes.len() {
                self.staging.extend_from_slice(&bytes[consumed..]);
            }
        } else {
            let mut staging = std::mem::take(&mut self.staging);
            staging.extend_from_slice(bytes);
            let consumed = self.feed_tls(&mut staging, &mut received);
            staging.drain(..consumed);
            if !staging.is_empty() {
                self.staging = staging;
            }
        }
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
        let mut sink = Sink::new(&mut self.inbox, &mut self.out);
        self.tls
            .encrypt(&mut self.staging, &plain, &mut sink)
            .map_err(|_| "TLS refused to encrypt".to_string())
    }

    /// Queues TLS close_notify (best effort).
    pub fn close_notify(&mut self) {
        let mut sink = Sink::new(&mut self.inbox, &mut self.out);
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

    fn feed_tls(&mut self, bytes: &mut [u8], received: &mut Received) -> usize {
        let was_established = self.tls.is_established();
        let mut sink = Sink::new(&mut self.inbox, &mut self.out);
        let fed = self.tls.feed(bytes, &mut sink);
        if fed.handshake_done && !was_established {
            let common = self.tls.common();
            let alpn = common.alpn_protocol();
            if alpn != Some(frame::ALPN) {
                received.ended = Some(format!(
                    "gateway chose ALPN {:?}, not holdfast/1",
                    alpn.map(String::from_utf8_lossy)
                ));
                return fed.consumed;
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
        fed.consumed
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
