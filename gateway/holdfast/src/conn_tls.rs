//! One connection's record layer over its life: rustls for the handshake (and for TLS 1.2,
//! or everything when hibernation is off), then holdfast's own TLS 1.3 record layer
//! ([`crate::record`]), awake while records flow and asleep (traffic secrets and
//! sequence numbers only) once the session decides the connection is idle.
//!
//! With hibernation on, rustls is driven one record at a time during the handshake, so
//! the call that completes it has read nothing after the client's Finished; the
//! connection is converted right there (the session tickets rustls sends after the
//! handshake are encoded in the same call). No KeyUpdate can therefore have reached
//! rustls, whose unbuffered API would hold its answer back in a way a conversion loses.
//! Pure: no I/O, no clock; every byte goes to and from the caller's buffers.
#![forbid(unsafe_code)]

use rustls::ProtocolVersion;
use tracing::debug;

use crate::record::{self, Hibernated, Opened, Record, RecordLayer, TrafficSecrets};
use crate::tls::{with_staging, Fed, TlsEnd, TlsSession, VecSink};

/// What the handshake negotiated, read from rustls before it may be given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub sni: Option<Box<str>>,
    /// One of the ALPN values the gateway offers.
    pub alpn: Option<&'static [u8]>,
    pub version: Option<ProtocolVersion>,
    pub resumed: bool,
}

/// What a receive did beyond what [`Fed`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub fed: Fed,
    /// Set by the receive that completed the handshake.
    pub negotiated: Option<Negotiated>,
    /// A hibernated connection derived its keys again for it.
    pub woke: bool,
    /// The handshake completed but the conversion to our record layer failed after rustls
    /// was given up: the connection cannot go on (a bug; logged and counted as internal).
    pub lost: bool,
}

enum State {
    /// The handshake, TLS 1.2, or a connection that does not hibernate.
    Rustls(Box<Handshake>),
    Awake(Box<RecordLayer>),
    Asleep(Hibernated),
    /// A record failed on our layer (its alert, if any, is sent), or the conversion
    /// failed: nothing more is read or sent.
    Failed,
    /// Only between two states of a transition.
    Moving,
}

struct Handshake {
    session: TlsSession,
    /// The application traffic secrets rustls logged while driving this connection.
    secrets: Option<TrafficSecrets>,
    /// Convert to our record layer once the handshake completes (TLS 1.3 only).
    convert: bool,
}

/// A connection's TLS, whichever layer holds it now.
pub struct ConnTls {
    state: State,
}

impl ConnTls {
    /// A new connection; `hibernate` makes it move to our record layer after a TLS 1.3
    /// handshake (which needs the server configuration's secret extraction and
    /// [`record::SecretLog`]; without them it stays on rustls).
    pub fn new(session: TlsSession, hibernate: bool) -> ConnTls {
        ConnTls {
            state: State::Rustls(Box::new(Handshake {
                session,
                secrets: None,
                convert: hibernate,
            })),
        }
    }

    pub fn has_failed(&self) -> bool {
        match &self.state {
            State::Rustls(h) => h.session.has_failed(),
            State::Failed => true,
            _ => false,
        }
    }

    pub fn is_asleep(&self) -> bool {
        matches!(self.state, State::Asleep(_))
    }

    /// On our own record layer (awake or asleep).
    pub fn is_own(&self) -> bool {
        matches!(self.state, State::Awake(_) | State::Asleep(_))
    }

    /// The rustls session, while it drives the connection.
    pub fn rustls(&mut self) -> Option<&mut TlsSession> {
        match &mut self.state {
            State::Rustls(h) => Some(&mut h.session),
            _ => None,
        }
    }

    /// The bytes of one receive, with `staging` holding what earlier ones left partial.
    /// TLS output (handshake flights, alerts, KeyUpdate answers) is appended to `out`,
    /// plaintext to `plain`.
    pub fn receive(
        &mut self,
        staging: &mut Vec<u8>,
        input: &mut [u8],
        out: &mut Vec<u8>,
        plain: &mut Vec<u8>,
    ) -> Received {
        let mut r = Received {
            fed: Fed {
                consumed: 0,
                handshake_done: false,
                end: None,
            },
            negotiated: None,
            woke: self.wake(),
            lost: false,
        };
        let State::Rustls(h) = &mut self.state else {
            r.fed = self.open(staging, input, out, plain);
            return r;
        };
        if !h.convert || h.session.is_established() {
            let established = h.session.is_established();
            r.fed = h
                .session
                .feed_staged(staging, input, &mut VecSink::new(out, plain));
            if r.fed.handshake_done && !established {
                r.negotiated = Some(negotiated(&mut h.session));
            }
            return r;
        }
        // One record at a time until the handshake completes.
        let mut off = 0;
        loop {
            let n = first_record(staging, &input[off..]);
            let fed = h.session.feed_staged(
                staging,
                &mut input[off..off + n],
                &mut VecSink::new(out, plain),
            );
            if let Some(s) = record::take_traffic_secrets() {
                h.secrets = Some(s);
            }
            off += n;
            r.fed.end = fed.end;
            r.fed.handshake_done = fed.handshake_done;
            if fed.end.is_some() || fed.handshake_done || off == input.len() {
                break;
            }
        }
        r.fed.consumed = off;
        if !r.fed.handshake_done {
            return r;
        }
        r.negotiated = Some(negotiated(&mut h.session));
        match self.convert(staging) {
            Ok(true) => {
                let rest = self.open(staging, &mut input[off..], out, plain);
                r.fed.end = rest.end;
            }
            Ok(false) => {
                // Stays on rustls (TLS 1.2, or the configuration changed under it).
                if let State::Rustls(h) = &mut self.state {
                    h.convert = false;
                    if off < input.len() && r.fed.end.is_none() {
                        let rest = h.session.feed_staged(
                            staging,
                            &mut input[off..],
                            &mut VecSink::new(out, plain),
                        );
                        r.fed.end = rest.end;
                    }
                }
            }
            Err(()) => r.lost = true,
        }
        r
    }

    /// Moves a just-established connection to our record layer. Ok(false): it stays on
    /// rustls (nothing was given up); Err: rustls was given up and the conversion failed.
    fn convert(&mut self, staging: &[u8]) -> Result<bool, ()> {
        let State::Rustls(h) = &mut self.state else {
            return Ok(false);
        };
        let tls13 = h.session.protocol_version() == Some(ProtocolVersion::TLSv1_3);
        if !tls13 || !staging.is_empty() || h.secrets.is_none() || !h.session.can_extract() {
            return Ok(false);
        }
        let Some(suite) = h.session.negotiated_cipher_suite() else {
            return Ok(false);
        };
        let State::Rustls(h) = std::mem::replace(&mut self.state, State::Moving) else {
            unreachable!("matched above");
        };
        let Handshake {
            session, secrets, ..
        } = *h;
        let secrets = secrets.expect("checked above");
        let converted = session
            .into_secrets()
            .map_err(|e| e.to_string())
            .and_then(|extracted| {
                Hibernated::from_rustls(suite, secrets.client(), secrets.server(), &extracted)
                    .map_err(|e| e.to_string())
            });
        match converted {
            Ok(state) => {
                self.state = State::Awake(Box::new(state.wake()));
                Ok(true)
            }
            Err(why) => {
                tracing::warn!("cannot move a TLS 1.3 connection to the record layer: {why}");
                self.state = State::Failed;
                Err(())
            }
        }
    }

    /// Our record layer over one receive, with the same staging rules as rustls' path.
    fn open(
        &mut self,
        staging: &mut Vec<u8>,
        input: &mut [u8],
        out: &mut Vec<u8>,
        plain: &mut Vec<u8>,
    ) -> Fed {
        let State::Awake(layer) = &mut self.state else {
            return Fed {
                consumed: 0,
                handshake_done: false,
                end: Some(TlsEnd::Error),
            };
        };
        let fed = with_staging(staging, input, |buf| open_all(layer, buf, out, plain));
        if fed.end == Some(TlsEnd::Error) {
            self.state = State::Failed;
        }
        fed
    }

    /// Encrypts application data into `out`. Ok(true) if it woke the connection.
    pub fn encrypt(
        &mut self,
        staging: &mut [u8],
        data: &[u8],
        out: &mut Vec<u8>,
        plain: &mut Vec<u8>,
    ) -> Result<bool, TlsEnd> {
        let woke = self.wake();
        match &mut self.state {
            State::Rustls(h) => h
                .session
                .encrypt(staging, data, &mut VecSink::new(out, plain))
                .map(|()| woke),
            State::Awake(layer) => layer.seal(data, out).map(|()| woke).map_err(|e| {
                debug!("cannot seal a record: {e}");
                TlsEnd::Error
            }),
            State::Asleep(_) | State::Failed | State::Moving => Err(TlsEnd::Error),
        }
    }

    /// Queues close_notify (best effort). True if it woke the connection.
    pub fn close_notify(
        &mut self,
        staging: &mut [u8],
        out: &mut Vec<u8>,
        plain: &mut Vec<u8>,
    ) -> bool {
        if self.has_failed() {
            return false;
        }
        let woke = self.wake();
        match &mut self.state {
            State::Rustls(h) => h
                .session
                .close_notify(staging, &mut VecSink::new(out, plain)),
            State::Awake(layer) => {
                let _ = layer.seal_close_notify(out);
            }
            State::Asleep(_) | State::Failed | State::Moving => {}
        }
        woke
    }

    /// Drops the expanded keys of an awake connection. False when not on our layer.
    pub fn hibernate(&mut self) -> bool {
        if !matches!(self.state, State::Awake(_)) {
            return false;
        }
        let State::Awake(layer) = std::mem::replace(&mut self.state, State::Moving) else {
            unreachable!("matched above");
        };
        self.state = State::Asleep(layer.hibernate());
        true
    }

    /// Appends the connection's record-layer state in the hand-over format, hibernating
    /// it first if it is awake. False (nothing written) unless it is on our record layer:
    /// a rustls connection cannot be moved to another process.
    pub fn export(&mut self, out: &mut Vec<u8>) -> bool {
        self.hibernate();
        match &self.state {
            State::Asleep(h) => {
                h.encode(out);
                true
            }
            _ => false,
        }
    }

    /// A connection handed over by another process, asleep until its first record.
    pub fn from_hibernated(state: Hibernated) -> ConnTls {
        ConnTls {
            state: State::Asleep(state),
        }
    }

    /// Derives the keys of a hibernated connection again (lazily, per direction).
    fn wake(&mut self) -> bool {
        if !self.is_asleep() {
            return false;
        }
        let State::Asleep(h) = std::mem::replace(&mut self.state, State::Moving) else {
            unreachable!("matched above");
        };
        self.state = State::Awake(Box::new(h.wake()));
        true
    }
}

fn negotiated(session: &mut TlsSession) -> Negotiated {
    Negotiated {
        sni: session.take_server_name(),
        alpn: session.alpn().and_then(|a| {
            [holdfast_wire::frame::ALPN, b"http/1.1"]
                .into_iter()
                .find(|x| *x == a)
        }),
        version: session.protocol_version(),
        resumed: session.resumed(),
    }
}

/// How many bytes of `input` complete the next record: the first record of `staging`
/// followed by `input` that ends beyond what is staged (rustls may keep whole records
/// staged while a handshake message spans them), or all of `input` when that record is
/// not complete yet. Never 0 for a non-empty `input`.
fn first_record(staging: &[u8], input: &[u8]) -> usize {
    let byte = |i: usize| {
        if i < staging.len() {
            Some(staging[i])
        } else {
            input.get(i - staging.len()).copied()
        }
    };
    let mut at = 0usize;
    loop {
        let (Some(hi), Some(lo)) = (byte(at + 3), byte(at + 4)) else {
            return input.len();
        };
        let end = at + 5 + usize::from(u16::from_be_bytes([hi, lo]));
        if end > staging.len() {
            return (end - staging.len()).min(input.len());
        }
        at = end;
    }
}

/// Opens every whole record at the start of `buf`.
fn open_all(
    layer: &mut RecordLayer,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    plain: &mut Vec<u8>,
) -> Fed {
    let mut fed = Fed {
        consumed: 0,
        handshake_done: false,
        end: None,
    };
    while fed.consumed < buf.len() {
        match layer.open(&mut buf[fed.consumed..], out) {
            Ok(Opened { consumed, record }) => {
                match record {
                    Record::Incomplete { .. } => return fed,
                    Record::Data(p) => plain.extend_from_slice(p),
                    Record::KeyUpdate { .. } | Record::UserCanceled => {}
                    Record::Closed => {
                        fed.consumed = buf.len();
                        fed.end = Some(TlsEnd::PeerClosed);
                        return fed;
                    }
                }
                fed.consumed += consumed;
            }
            Err(e) => {
                debug!("record refused: {e}");
                if let Some(alert) = e.alert() {
                    let _ = layer.seal_alert(alert, out);
                }
                fed.end = Some(TlsEnd::Error);
                return fed;
            }
        }
    }
    fed
}

#[cfg(test)]
mod tests {
    use super::first_record;

    #[test]
    fn the_first_record_is_cut_from_staged_and_new_bytes() {
        let rec = |len: u16| {
            let mut r = vec![23, 3, 3];
            r.extend_from_slice(&len.to_be_bytes());
            r.extend(std::iter::repeat_n(0u8, len as usize));
            r
        };
        let mut two = rec(10);
        two.extend(rec(4));
        assert_eq!(first_record(&[], &two), 15);
        assert_eq!(first_record(&two[..3], &two[3..]), 12);
        assert_eq!(first_record(&two[..7], &two[7..]), 8);
        assert_eq!(first_record(&[], &two[..3]), 3, "a header not complete yet");
        assert_eq!(first_record(&two[..2], &two[2..4]), 2);
        assert_eq!(first_record(&[], &two[..9]), 9, "a body not complete yet");
        // A whole record staged (rustls holds it): the next one is cut from the input.
        assert_eq!(first_record(&two[..15], &two[15..]), 9);
        assert_eq!(first_record(&two[..16], &two[16..]), 8);
    }
}
