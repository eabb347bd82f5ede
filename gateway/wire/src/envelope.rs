//! The envelope codec of the gateway ↔ worker links (SOCK_STREAM Unix sockets).
//!
//! Every message is a 32-byte little-endian header (payload length, kind, flags, a
//! reserved field, connection id, per-connection sequence, link sequence) followed by a
//! kind-specific payload. The decoder is zero-copy and strict: the header is checked as
//! soon as its 32 bytes are present (kind, reserved bits, size, flags and the fields a
//! kind leaves unused), and a payload must be exactly its layout, no shorter and no
//! longer, so every valid envelope has one encoding. This module does no I/O and keeps
//! no link state (HELLO order, acknowledgements, retention belong to the gateway and the
//! worker SDK). The byte layouts are described in `docs/worker-protocol.md`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use thiserror::Error;

use crate::ConnId;

/// Bytes in an envelope header.
pub const HEADER_LEN: usize = 32;
/// The protocol version this codec speaks, exchanged in HELLO. A peer with another
/// version is refused; there is no negotiation down.
pub const VERSION: u16 = 1;
/// The payload limit a link enforces unless configured otherwise.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// The longest topic SUBSCRIBE, UNSUBSCRIBE and PUBLISH can carry (PUBLISH's topic
/// length is a u16).
pub const MAX_TOPIC_LEN: usize = u16::MAX as usize;

/// Bits of the header's flags byte. A kind accepts only the flags listed for it; any
/// other set bit makes the envelope malformed.
pub mod flags {
    /// FRAME, SEND, PUBLISH: the payload is a WebSocket text message (UTF-8).
    pub const TEXT: u8 = 0x01;
    /// HEARTBEAT: this heartbeat is the answer to one with the same nonce.
    pub const REPLY: u8 = 0x02;
}

/// The envelope kind (header byte 4).
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Both directions, first message on a link: version, role, core, name.
    Hello = 1,
    /// Gateway → worker: a client connection was accepted.
    Open = 2,
    /// Gateway → worker: a client frame.
    Frame = 3,
    /// Both directions: a connection ended (gateway) or must end (worker).
    Close = 4,
    /// Both directions: liveness probe and its reply.
    Heartbeat = 5,
    /// Worker → gateway: cumulative acknowledgement of link sequence numbers.
    Ack = 6,
    /// Worker → gateway: a message for one connection.
    Send = 7,
    /// Worker → gateway: add a connection to a topic.
    Subscribe = 8,
    /// Worker → gateway: remove a connection from a topic.
    Unsubscribe = 9,
    /// Worker → gateway: a message for every connection subscribed to a topic.
    Publish = 10,
}

impl Kind {
    /// The kind for a kind byte, or `None` if the protocol defines none.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Open,
            3 => Kind::Frame,
            4 => Kind::Close,
            5 => Kind::Heartbeat,
            6 => Kind::Ack,
            7 => Kind::Send,
            8 => Kind::Subscribe,
            9 => Kind::Unsubscribe,
            10 => Kind::Publish,
            _ => return None,
        })
    }

    /// The flag bits this kind may carry.
    pub fn allowed_flags(self) -> u8 {
        match self {
            Kind::Frame | Kind::Send | Kind::Publish => flags::TEXT,
            Kind::Heartbeat => flags::REPLY,
            _ => 0,
        }
    }
}

/// Which end of a link sent a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A gateway core.
    Gateway = 1,
    /// A worker.
    Worker = 2,
}

/// The HELLO payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Protocol version; see [`VERSION`].
    pub version: u16,
    /// Who is speaking.
    pub role: Role,
    /// The gateway core this link belongs to (0 from a worker).
    pub core: u8,
    /// How many cores the gateway runs, so a worker knows how many links to expect (0
    /// from a worker).
    pub cores: u8,
    /// A name for logs (gateway host name, worker name). UTF-8, at most 65 535 bytes.
    pub name: &'a str,
}

/// The OPEN payload and header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open<'a> {
    /// The new connection.
    pub conn: ConnId,
    /// The link sequence number of this OPEN.
    pub link_seq: u64,
    /// The client's address as the gateway saw it.
    pub peer: SocketAddr,
    /// The TLS server name the client asked for.
    pub sni: Option<&'a str>,
    /// The ALPN protocol chosen (`None` when the client offered none).
    pub alpn: Option<&'a [u8]>,
    /// The client certificate's identity, when the client presented one.
    pub client_identity: Option<&'a [u8]>,
}

/// A decoded envelope, borrowing its payload from the decode buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`Hello`].
    Hello(Hello<'a>),
    /// See [`Open`].
    Open(Open<'a>),
    /// Gateway → worker: one client frame.
    Frame {
        /// The connection.
        conn: ConnId,
        /// Per-connection sequence: 1, 2, 3, ... (OPEN is 0).
        seq: u64,
        /// Link sequence, for ACK.
        link_seq: u64,
        /// [`flags::TEXT`] or 0.
        flags: u8,
        /// The client's message.
        payload: &'a [u8],
    },
    /// Gateway → worker: the connection ended (seq is the last frame's + 1, link_seq is
    /// set). Worker → gateway: close this connection (seq and link_seq are 0).
    Close {
        /// The connection.
        conn: ConnId,
        /// See above.
        seq: u64,
        /// See above.
        link_seq: u64,
        /// Close code, as in the client protocol.
        code: u16,
        /// Human-readable reason.
        reason: &'a str,
    },
    /// Liveness probe; the receiver answers with `reply: true` and the same nonce.
    Heartbeat {
        /// Chosen by the sender, echoed in the reply.
        nonce: u64,
        /// This is the answer.
        reply: bool,
    },
    /// Worker → gateway: every envelope up to and including this link sequence is the
    /// worker's responsibility now.
    Ack {
        /// Cumulative link sequence acknowledged.
        link_seq: u64,
    },
    /// Worker → gateway: deliver a message to one connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// [`flags::TEXT`] or 0.
        flags: u8,
        /// The message.
        payload: &'a [u8],
    },
    /// Worker → gateway: subscribe a connection to a topic.
    Subscribe {
        /// The connection.
        conn: ConnId,
        /// The topic (opaque bytes).
        topic: &'a [u8],
    },
    /// Worker → gateway: unsubscribe a connection from a topic.
    Unsubscribe {
        /// The connection.
        conn: ConnId,
        /// The topic (opaque bytes).
        topic: &'a [u8],
    },
    /// Worker → gateway: deliver a message to every subscriber of a topic on this core.
    Publish {
        /// [`flags::TEXT`] or 0.
        flags: u8,
        /// The topic (opaque bytes).
        topic: &'a [u8],
        /// The message.
        payload: &'a [u8],
    },
}

impl Message<'_> {
    /// This message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Open(_) => Kind::Open,
            Message::Frame { .. } => Kind::Frame,
            Message::Close { .. } => Kind::Close,
            Message::Heartbeat { .. } => Kind::Heartbeat,
            Message::Ack { .. } => Kind::Ack,
            Message::Send { .. } => Kind::Send,
            Message::Subscribe { .. } => Kind::Subscribe,
            Message::Unsubscribe { .. } => Kind::Unsubscribe,
            Message::Publish { .. } => Kind::Publish,
        }
    }
}

/// Why an envelope could not be decoded. Any of these ends the link: the stream can no
/// longer be trusted to be in step.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    /// The payload length is over the link's limit.
    #[error("envelope payload of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Payload length the header announced.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The kind byte names no kind this version defines.
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    /// The reserved header field (bytes 6..8) is not zero.
    #[error("reserved envelope header bits are set")]
    ReservedBits,
    /// A header field or payload does not match the kind's layout.
    #[error("malformed {kind:?} envelope: {what}")]
    Malformed {
        /// The envelope's kind.
        kind: Kind,
        /// What was wrong.
        what: &'static str,
    },
}

struct Header {
    len: usize,
    kind: Kind,
    flags: u8,
    conn: u64,
    seq: u64,
    link_seq: u64,
}

fn le_u64(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut v = [0; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn header_len(h: &[u8; HEADER_LEN]) -> usize {
    u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize
}

fn parse_header(h: &[u8; HEADER_LEN], max_payload: usize) -> Result<Header, EnvelopeError> {
    let kind = Kind::from_u8(h[4]).ok_or(EnvelopeError::UnknownKind(h[4]))?;
    if h[6] != 0 || h[7] != 0 {
        return Err(EnvelopeError::ReservedBits);
    }
    let len = header_len(h);
    if len > max_payload {
        return Err(EnvelopeError::TooLarge {
            len,
            max: max_payload,
        });
    }
    let header = Header {
        len,
        kind,
        flags: h[5],
        conn: le_u64(h, 8),
        seq: le_u64(h, 16),
        link_seq: le_u64(h, 24),
    };
    let bad = |what| Err(EnvelopeError::Malformed { kind, what });
    if header.flags & !kind.allowed_flags() != 0 {
        return bad("flag bits not defined for this kind");
    }
    // Fields a kind leaves unused must be zero, so each envelope has one encoding.
    let (conn_used, seq_used, link_seq_used) = match kind {
        Kind::Hello | Kind::Publish => (false, false, false),
        Kind::Open => (true, false, true),
        Kind::Frame | Kind::Close => (true, true, true),
        Kind::Heartbeat | Kind::Ack => (false, false, true),
        Kind::Send | Kind::Subscribe | Kind::Unsubscribe => (true, false, false),
    };
    if !conn_used && header.conn != 0 {
        return bad("conn must be 0 for this kind");
    }
    if !seq_used && header.seq != 0 {
        return bad("seq must be 0 for this kind");
    }
    if !link_seq_used && header.link_seq != 0 {
        return bad("link_seq must be 0 for this kind");
    }
    if matches!(kind, Kind::Heartbeat | Kind::Ack) && len != 0 {
        return bad("payload must be empty for this kind");
    }
    Ok(header)
}

/// Reads a payload field by field; every shortfall or leftover is `Malformed`.
struct Reader<'a> {
    buf: &'a [u8],
    kind: Kind,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &'static str) -> EnvelopeError {
        EnvelopeError::Malformed {
            kind: self.kind,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EnvelopeError> {
        if self.buf.len() < n {
            return Err(self.err(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], EnvelopeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, EnvelopeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, EnvelopeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, EnvelopeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn str(&self, bytes: &'a [u8], what: &'static str) -> Result<&'a str, EnvelopeError> {
        std::str::from_utf8(bytes).map_err(|_| self.err(what))
    }

    /// Presence byte (0 or 1), then if present a u32 length and that many bytes.
    fn optional(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, EnvelopeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => {
                let len = self.u32(what)? as usize;
                Ok(Some(self.take(len, what)?))
            }
            _ => Err(self.err("presence byte is neither 0 nor 1")),
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), EnvelopeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes after the payload"))
        }
    }
}

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Decodes the envelope at the start of `buf`.
///
/// `Ok(None)` means more bytes are needed. The header is checked (kind, reserved bits,
/// size, flags, unused fields) as soon as its 32 bytes are present, before the payload
/// arrives. On success returns the message and the number of bytes it took.
pub fn decode(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(Message<'_>, usize)>, EnvelopeError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = parse_header(h, max_payload)?;
    let total = HEADER_LEN + h.len;
    let Some(payload) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    let mut r = Reader {
        buf: payload,
        kind: h.kind,
    };
    let conn = ConnId::from_raw(h.conn);
    let msg = match h.kind {
        Kind::Hello => {
            let version = r.u16("truncated HELLO")?;
            let role = match r.u8("truncated HELLO")? {
                1 => Role::Gateway,
                2 => Role::Worker,
                _ => return Err(r.err("unknown role")),
            };
            let core = r.u8("truncated HELLO")?;
            let cores = r.u8("truncated HELLO")?;
            let name_len = usize::from(r.u16("truncated HELLO")?);
            let name = r.take(name_len, "truncated HELLO name")?;
            let name = r.str(name, "name is not UTF-8")?;
            Message::Hello(Hello {
                version,
                role,
                core,
                cores,
                name,
            })
        }
        Kind::Open => {
            let family = r.u8("truncated OPEN address")?;
            let port = r.u16("truncated OPEN address")?;
            let peer = match family {
                FAMILY_V4 => {
                    let ip = Ipv4Addr::from(r.array::<4>("truncated OPEN address")?);
                    SocketAddr::V4(SocketAddrV4::new(ip, port))
                }
                FAMILY_V6 => {
                    let ip = Ipv6Addr::from(r.array::<16>("truncated OPEN address")?);
                    let flowinfo = r.u32("truncated OPEN address")?;
                    let scope_id = r.u32("truncated OPEN address")?;
                    SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope_id))
                }
                _ => return Err(r.err("unknown address family")),
            };
            let sni = match r.optional("truncated OPEN SNI")? {
                Some(s) => Some(r.str(s, "SNI is not UTF-8")?),
                None => None,
            };
            let alpn = r.optional("truncated OPEN ALPN")?;
            let client_identity = r.optional("truncated OPEN client identity")?;
            Message::Open(Open {
                conn,
                link_seq: h.link_seq,
                peer,
                sni,
                alpn,
                client_identity,
            })
        }
        Kind::Frame => Message::Frame {
            conn,
            seq: h.seq,
            link_seq: h.link_seq,
            flags: h.flags,
            payload: r.rest(),
        },
        Kind::Close => {
            let code = r.u16("CLOSE payload under 2 bytes")?;
            let reason = r.rest();
            let reason = r.str(reason, "reason is not UTF-8")?;
            Message::Close {
                conn,
                seq: h.seq,
                link_seq: h.link_seq,
                code,
                reason,
            }
        }
        Kind::Heartbeat => Message::Heartbeat {
            nonce: h.link_seq,
            reply: h.flags & flags::REPLY != 0,
        },
        Kind::Ack => Message::Ack {
            link_seq: h.link_seq,
        },
        Kind::Send => Message::Send {
            conn,
            flags: h.flags,
            payload: r.rest(),
        },
        Kind::Subscribe | Kind::Unsubscribe => {
            let topic = r.rest();
            if topic.len() > MAX_TOPIC_LEN {
                return Err(r.err("topic longer than 65535 bytes"));
            }
            if h.kind == Kind::Subscribe {
                Message::Subscribe { conn, topic }
            } else {
                Message::Unsubscribe { conn, topic }
            }
        }
        Kind::Publish => {
            let topic_len = usize::from(r.u16("truncated PUBLISH topic length")?);
            let topic = r.take(topic_len, "truncated PUBLISH topic")?;
            Message::Publish {
                flags: h.flags,
                topic,
                payload: r.rest(),
            }
        }
    };
    r.finish()?;
    Ok(Some((msg, total)))
}

/// Total size (header and payload) of the envelope whose header starts `buf`, once the
/// 32 header bytes are present. Checks nothing else.
pub fn peek_len(buf: &[u8]) -> Option<usize> {
    buf.first_chunk::<HEADER_LEN>()
        .map(|h| HEADER_LEN + header_len(h))
}

fn put_header(
    out: &mut Vec<u8>,
    len: usize,
    kind: Kind,
    flags: u8,
    conn: u64,
    seq: u64,
    link_seq: u64,
) {
    let len = u32::try_from(len).expect("envelope payload does not fit the u32 length field");
    debug_assert_eq!(
        flags & !kind.allowed_flags(),
        0,
        "flags {flags:#x} not valid for {kind:?}"
    );
    out.reserve(HEADER_LEN + len as usize);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind as u8);
    out.push(flags);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&conn.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&link_seq.to_le_bytes());
}

fn put_optional(out: &mut Vec<u8>, field: Option<&[u8]>) {
    match field {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            let len = u32::try_from(b.len()).expect("OPEN field does not fit a u32 length");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(b);
        }
    }
}

fn optional_len(field: Option<&[u8]>) -> usize {
    1 + field.map_or(0, |b| 4 + b.len())
}

/// Appends exactly one envelope carrying `msg` to `out`.
///
/// # Panics
/// If a field does not fit its length prefix (a HELLO name or topic over 65 535 bytes, a
/// payload over 4 GiB), or, in debug builds, if a flags field has bits its kind does not
/// define. Callers enforce their limits before encoding.
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>) {
    let kind = msg.kind();
    match *msg {
        Message::Hello(h) => {
            let name_len = u16::try_from(h.name.len()).expect("HELLO name over 65535 bytes");
            put_header(out, 7 + h.name.len(), kind, 0, 0, 0, 0);
            out.extend_from_slice(&h.version.to_le_bytes());
            out.push(h.role as u8);
            out.push(h.core);
            out.push(h.cores);
            out.extend_from_slice(&name_len.to_le_bytes());
            out.extend_from_slice(h.name.as_bytes());
        }
        Message::Open(o) => {
            let addr_len = match o.peer {
                SocketAddr::V4(_) => 1 + 2 + 4,
                SocketAddr::V6(_) => 1 + 2 + 16 + 4 + 4,
            };
            let len = addr_len
                + optional_len(o.sni.map(str::as_bytes))
                + optional_len(o.alpn)
                + optional_len(o.client_identity);
            put_header(out, len, kind, 0, o.conn.raw(), 0, o.link_seq);
            match o.peer {
                SocketAddr::V4(a) => {
                    out.push(FAMILY_V4);
                    out.extend_from_slice(&a.port().to_le_bytes());
                    out.extend_from_slice(&a.ip().octets());
                }
                SocketAddr::V6(a) => {
                    out.push(FAMILY_V6);
                    out.extend_from_slice(&a.port().to_le_bytes());
                    out.extend_from_slice(&a.ip().octets());
                    out.extend_from_slice(&a.flowinfo().to_le_bytes());
                    out.extend_from_slice(&a.scope_id().to_le_bytes());
                }
            }
            put_optional(out, o.sni.map(str::as_bytes));
            put_optional(out, o.alpn);
            put_optional(out, o.client_identity);
        }
        Message::Frame {
            conn,
            seq,
            link_seq,
            flags,
            payload,
        } => {
            encode_frame_header(conn, seq, link_seq, flags, payload.len(), out);
            out.extend_from_slice(payload);
        }
        Message::Close {
            conn,
            seq,
            link_seq,
            code,
            reason,
        } => {
            put_header(out, 2 + reason.len(), kind, 0, conn.raw(), seq, link_seq);
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(reason.as_bytes());
        }
        Message::Heartbeat { nonce, reply } => {
            let f = if reply { flags::REPLY } else { 0 };
            put_header(out, 0, kind, f, 0, 0, nonce);
        }
        Message::Ack { link_seq } => put_header(out, 0, kind, 0, 0, 0, link_seq),
        Message::Send {
            conn,
            flags,
            payload,
        } => {
            put_header(out, payload.len(), kind, flags, conn.raw(), 0, 0);
            out.extend_from_slice(payload);
        }
        Message::Subscribe { conn, topic } | Message::Unsubscribe { conn, topic } => {
            assert!(topic.len() <= MAX_TOPIC_LEN, "topic over 65535 bytes");
            put_header(out, topic.len(), kind, 0, conn.raw(), 0, 0);
            out.extend_from_slice(topic);
        }
        Message::Publish {
            flags,
            topic,
            payload,
        } => {
            let topic_len = u16::try_from(topic.len()).expect("topic over 65535 bytes");
            put_header(out, 2 + topic.len() + payload.len(), kind, flags, 0, 0, 0);
            out.extend_from_slice(&topic_len.to_le_bytes());
            out.extend_from_slice(topic);
            out.extend_from_slice(payload);
        }
    }
}

/// Appends a FRAME envelope header for a payload of `payload_len` bytes that the caller
/// appends right after, so the gateway copies a client's payload only once.
///
/// # Panics
/// If `payload_len` does not fit in a u32, or, in debug builds, if `flags` has bits
/// other than [`flags::TEXT`].
pub fn encode_frame_header(
    conn: ConnId,
    seq: u64,
    link_seq: u64,
    flags: u8,
    payload_len: usize,
    out: &mut Vec<u8>,
) {
    put_header(
        out,
        payload_len,
        Kind::Frame,
        flags,
        conn.raw(),
        seq,
        link_seq,
    );
}

#[cfg(test)]
mod tests;
