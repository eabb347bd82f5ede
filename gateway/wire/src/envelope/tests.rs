//! Table-driven and property tests of the envelope codec.

use super::*;
use proptest::prelude::*;

/// A header as bytes: len, kind, flags, conn, seq, link_seq.
fn hdr(len: u32, kind: u8, flags: u8, conn: u64, seq: u64, link_seq: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&len.to_le_bytes());
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&conn.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&link_seq.to_le_bytes());
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const C: ConnId = ConnId::from_raw(0x0100_002a_0000_0007);

#[test]
fn exact_bytes() {
    let peer4: SocketAddr = "10.0.0.1:443".parse().unwrap();
    let peer6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0x1234, 5, 6));
    let cases: Vec<(Message<'_>, Vec<u8>)> = vec![
        (
            Message::Hello(Hello {
                version: 1,
                role: Role::Gateway,
                core: 1,
                cores: 2,
                name: "gw",
            }),
            cat(&[&hdr(9, 1, 0, 0, 0, 0), &[1, 0, 1, 1, 2, 2, 0], b"gw"]),
        ),
        (
            Message::Open(Open {
                conn: C,
                link_seq: 9,
                peer: peer4,
                sni: Some("a.b"),
                alpn: None,
                client_identity: Some(b"id"),
            }),
            cat(&[
                &hdr(7 + 8 + 1 + 7, 2, 0, C.raw(), 0, 9),
                &[4, 0xbb, 0x01, 10, 0, 0, 1],
                &[1, 3, 0, 0, 0],
                b"a.b",
                &[0],
                &[1, 2, 0, 0, 0],
                b"id",
            ]),
        ),
        (
            Message::Open(Open {
                conn: C,
                link_seq: 1,
                peer: peer6,
                sni: None,
                alpn: Some(b"h"),
                client_identity: None,
            }),
            cat(&[
                &hdr(27 + 1 + 6 + 1, 2, 0, C.raw(), 0, 1),
                &[6, 0x34, 0x12],
                &Ipv6Addr::LOCALHOST.octets(),
                &[5, 0, 0, 0, 6, 0, 0, 0],
                &[0, 1, 1, 0, 0, 0, b'h', 0],
            ]),
        ),
        (
            Message::Frame {
                conn: C,
                seq: 3,
                link_seq: 4,
                flags: flags::TEXT,
                payload: b"hey",
            },
            cat(&[&hdr(3, 3, 1, C.raw(), 3, 4), b"hey"]),
        ),
        (
            Message::Close {
                conn: C,
                seq: 5,
                link_seq: 6,
                code: 1001,
                reason: "bye",
            },
            cat(&[&hdr(5, 4, 0, C.raw(), 5, 6), &[0xe9, 0x03], b"bye"]),
        ),
        (
            Message::Heartbeat {
                nonce: 77,
                reply: false,
            },
            hdr(0, 5, 0, 0, 0, 77),
        ),
        (
            Message::Heartbeat {
                nonce: 77,
                reply: true,
            },
            hdr(0, 5, 2, 0, 0, 77),
        ),
        (Message::Ack { link_seq: 42 }, hdr(0, 6, 0, 0, 0, 42)),
        (
            Message::Send {
                conn: C,
                flags: 0,
                payload: &[0, 255],
            },
            cat(&[&hdr(2, 7, 0, C.raw(), 0, 0), &[0, 255]]),
        ),
        (
            Message::Subscribe {
                conn: C,
                topic: b"t",
            },
            cat(&[&hdr(1, 8, 0, C.raw(), 0, 0), b"t"]),
        ),
        (
            Message::Unsubscribe {
                conn: C,
                topic: b"",
            },
            hdr(0, 9, 0, C.raw(), 0, 0),
        ),
        (
            Message::Publish {
                flags: flags::TEXT,
                topic: b"tp",
                payload: b"x",
            },
            cat(&[&hdr(5, 10, 1, 0, 0, 0), &[2, 0], b"tp", b"x"]),
        ),
    ];
    for (msg, bytes) in &cases {
        let mut out = Vec::new();
        encode(msg, &mut out);
        assert_eq!(&out, bytes, "{msg:?}");
        assert_eq!(
            decode(bytes, DEFAULT_MAX_PAYLOAD),
            Ok(Some((*msg, bytes.len())))
        );
        assert_eq!(peek_len(bytes), Some(bytes.len()));
    }
}

#[test]
fn frame_header_then_payload_matches_encode() {
    let mut a = Vec::new();
    encode_frame_header(C, 1, 2, 0, 4, &mut a);
    a.extend_from_slice(b"abcd");
    let mut b = Vec::new();
    encode(
        &Message::Frame {
            conn: C,
            seq: 1,
            link_seq: 2,
            flags: 0,
            payload: b"abcd",
        },
        &mut b,
    );
    assert_eq!(a, b);
}

fn malformed(kind: Kind, what: &'static str) -> EnvelopeError {
    EnvelopeError::Malformed { kind, what }
}

#[test]
fn header_errors() {
    let mut reserved = hdr(0, 6, 0, 0, 0, 1);
    reserved[7] = 1;
    let cases: Vec<(Vec<u8>, EnvelopeError)> = vec![
        (hdr(0, 0, 0, 0, 0, 0), EnvelopeError::UnknownKind(0)),
        (hdr(0, 11, 0, 0, 0, 0), EnvelopeError::UnknownKind(11)),
        (reserved, EnvelopeError::ReservedBits),
        // Refused from the header alone: the payload never arrived.
        (
            hdr(101, 3, 0, 1, 1, 1),
            EnvelopeError::TooLarge { len: 101, max: 100 },
        ),
        (
            hdr(u32::MAX, 3, 0, 1, 1, 1),
            EnvelopeError::TooLarge {
                len: u32::MAX as usize,
                max: 100,
            },
        ),
        (
            hdr(0, 3, 0x80, 1, 1, 1),
            malformed(Kind::Frame, "flag bits not defined for this kind"),
        ),
        (
            hdr(0, 5, 1, 0, 0, 1),
            malformed(Kind::Heartbeat, "flag bits not defined for this kind"),
        ),
        (
            hdr(2, 4, 2, 1, 1, 1),
            malformed(Kind::Close, "flag bits not defined for this kind"),
        ),
        (
            hdr(0, 6, 0, 1, 0, 1),
            malformed(Kind::Ack, "conn must be 0 for this kind"),
        ),
        (
            hdr(0, 7, 0, 1, 1, 0),
            malformed(Kind::Send, "seq must be 0 for this kind"),
        ),
        (
            hdr(0, 2, 0, 1, 1, 1),
            malformed(Kind::Open, "seq must be 0 for this kind"),
        ),
        (
            hdr(0, 10, 0, 0, 0, 1),
            malformed(Kind::Publish, "link_seq must be 0 for this kind"),
        ),
        (
            hdr(1, 5, 0, 0, 0, 1),
            malformed(Kind::Heartbeat, "payload must be empty for this kind"),
        ),
    ];
    for (bytes, err) in &cases {
        // The header alone is enough to refuse.
        assert_eq!(
            decode(&bytes[..HEADER_LEN], 100).as_ref(),
            Err(err),
            "{bytes:?}"
        );
    }
}

#[test]
fn payload_errors() {
    let cases: Vec<(Vec<u8>, EnvelopeError)> = vec![
        (
            cat(&[&hdr(6, 1, 0, 0, 0, 0), &[1, 0, 1, 0, 1, 0]]),
            malformed(Kind::Hello, "truncated HELLO"),
        ),
        (
            cat(&[&hdr(7, 1, 0, 0, 0, 0), &[1, 0, 3, 0, 1, 0, 0]]),
            malformed(Kind::Hello, "unknown role"),
        ),
        (
            cat(&[&hdr(8, 1, 0, 0, 0, 0), &[1, 0, 1, 0, 1, 1, 0, 0xff]]),
            malformed(Kind::Hello, "name is not UTF-8"),
        ),
        (
            cat(&[&hdr(8, 1, 0, 0, 0, 0), &[1, 0, 1, 0, 1, 0, 0, 0]]),
            malformed(Kind::Hello, "trailing bytes after the payload"),
        ),
        (
            cat(&[&hdr(8, 1, 0, 0, 0, 0), &[1, 0, 1, 0, 1, 2, 0, b'x']]),
            malformed(Kind::Hello, "truncated HELLO name"),
        ),
        (
            cat(&[&hdr(10, 2, 0, 1, 0, 1), &[5, 0, 0, 1, 2, 3, 4, 0, 0, 0]]),
            malformed(Kind::Open, "unknown address family"),
        ),
        (
            cat(&[&hdr(7, 2, 0, 1, 0, 1), &[4, 0, 0, 1, 2, 3, 4]]),
            malformed(Kind::Open, "truncated OPEN SNI"),
        ),
        (
            cat(&[&hdr(10, 2, 0, 1, 0, 1), &[4, 0, 0, 1, 2, 3, 4, 2, 0, 0]]),
            malformed(Kind::Open, "presence byte is neither 0 nor 1"),
        ),
        (
            cat(&[
                &hdr(13, 2, 0, 1, 0, 1),
                &[4, 0, 0, 1, 2, 3, 4, 1, 1, 0, 0, 0, 0xc0],
            ]),
            malformed(Kind::Open, "SNI is not UTF-8"),
        ),
        (
            cat(&[
                &hdr(14, 2, 0, 1, 0, 1),
                &[4, 0, 0, 1, 2, 3, 4, 1, 3, 0, 0, 0, b'a', 0],
            ]),
            malformed(Kind::Open, "truncated OPEN SNI"),
        ),
        (
            cat(&[&hdr(11, 2, 0, 1, 0, 1), &[4, 0, 0, 1, 2, 3, 4, 0, 0, 0, 9]]),
            malformed(Kind::Open, "trailing bytes after the payload"),
        ),
        (
            cat(&[&hdr(1, 4, 0, 1, 1, 1), &[0]]),
            malformed(Kind::Close, "CLOSE payload under 2 bytes"),
        ),
        (
            cat(&[&hdr(3, 4, 0, 1, 1, 1), &[0xe8, 0x03, 0xff]]),
            malformed(Kind::Close, "reason is not UTF-8"),
        ),
        (
            cat(&[&hdr(1, 10, 0, 0, 0, 0), &[0]]),
            malformed(Kind::Publish, "truncated PUBLISH topic length"),
        ),
        (
            cat(&[&hdr(3, 10, 0, 0, 0, 0), &[2, 0, b't']]),
            malformed(Kind::Publish, "truncated PUBLISH topic"),
        ),
    ];
    for (bytes, err) in &cases {
        assert_eq!(decode(bytes, 100).as_ref(), Err(err), "{bytes:?}");
        // Until the payload is complete, only the header has been judged.
        assert_eq!(decode(&bytes[..bytes.len() - 1], 100), Ok(None));
    }
}

#[test]
fn needs_more() {
    assert_eq!(decode(&[], 100), Ok(None));
    assert_eq!(decode(&[0; HEADER_LEN - 1], 100), Ok(None));
    assert_eq!(peek_len(&[0; HEADER_LEN - 1]), None);
    assert_eq!(peek_len(&hdr(1000, 99, 0, 0, 0, 0)), Some(1032));
}

/// An owned mirror of [`Message`] for generated tests.
#[derive(Debug, Clone)]
enum Owned {
    Hello(u16, Role, u8, u8, String),
    Open(
        u64,
        u64,
        SocketAddr,
        Option<String>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
    ),
    Frame(u64, u64, u64, u8, Vec<u8>),
    Close(u64, u64, u64, u16, String),
    Heartbeat(u64, bool),
    Ack(u64),
    Send(u64, u8, Vec<u8>),
    Subscribe(u64, Vec<u8>),
    Unsubscribe(u64, Vec<u8>),
    Publish(u8, Vec<u8>, Vec<u8>),
}

impl Owned {
    fn msg(&self) -> Message<'_> {
        match self {
            Owned::Hello(version, role, core, cores, name) => Message::Hello(Hello {
                version: *version,
                role: *role,
                core: *core,
                cores: *cores,
                name,
            }),
            Owned::Open(conn, link_seq, peer, sni, alpn, id) => Message::Open(Open {
                conn: ConnId::from_raw(*conn),
                link_seq: *link_seq,
                peer: *peer,
                sni: sni.as_deref(),
                alpn: alpn.as_deref(),
                client_identity: id.as_deref(),
            }),
            Owned::Frame(conn, seq, link_seq, flags, payload) => Message::Frame {
                conn: ConnId::from_raw(*conn),
                seq: *seq,
                link_seq: *link_seq,
                flags: *flags,
                payload,
            },
            Owned::Close(conn, seq, link_seq, code, reason) => Message::Close {
                conn: ConnId::from_raw(*conn),
                seq: *seq,
                link_seq: *link_seq,
                code: *code,
                reason,
            },
            Owned::Heartbeat(nonce, reply) => Message::Heartbeat {
                nonce: *nonce,
                reply: *reply,
            },
            Owned::Ack(link_seq) => Message::Ack {
                link_seq: *link_seq,
            },
            Owned::Send(conn, flags, payload) => Message::Send {
                conn: ConnId::from_raw(*conn),
                flags: *flags,
                payload,
            },
            Owned::Subscribe(conn, topic) => Message::Subscribe {
                conn: ConnId::from_raw(*conn),
                topic,
            },
            Owned::Unsubscribe(conn, topic) => Message::Unsubscribe {
                conn: ConnId::from_raw(*conn),
                topic,
            },
            Owned::Publish(flags, topic, payload) => Message::Publish {
                flags: *flags,
                topic,
                payload,
            },
        }
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn peer() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
            |(ip, port, fl, sc)| {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, fl, sc))
            }
        ),
    ]
}

fn owned() -> impl Strategy<Value = Owned> {
    let text = prop_oneof![Just(0u8), Just(flags::TEXT)];
    prop_oneof![
        (
            any::<u16>(),
            prop_oneof![Just(Role::Gateway), Just(Role::Worker)],
            any::<u8>(),
            any::<u8>(),
            ".{0,20}"
        )
            .prop_map(|(v, r, c, n, s)| Owned::Hello(v, r, c, n, s)),
        (
            any::<u64>(),
            any::<u64>(),
            peer(),
            proptest::option::of(".{0,20}"),
            proptest::option::of(bytes(20)),
            proptest::option::of(bytes(40))
        )
            .prop_map(|(c, l, p, s, a, i)| Owned::Open(c, l, p, s, a, i)),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            text.clone(),
            bytes(100)
        )
            .prop_map(|(c, s, l, f, p)| Owned::Frame(c, s, l, f, p)),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
            ".{0,20}"
        )
            .prop_map(|(c, s, l, code, r)| Owned::Close(c, s, l, code, r)),
        (any::<u64>(), any::<bool>()).prop_map(|(n, r)| Owned::Heartbeat(n, r)),
        any::<u64>().prop_map(Owned::Ack),
        (any::<u64>(), text.clone(), bytes(100)).prop_map(|(c, f, p)| Owned::Send(c, f, p)),
        (any::<u64>(), bytes(20)).prop_map(|(c, t)| Owned::Subscribe(c, t)),
        (any::<u64>(), bytes(20)).prop_map(|(c, t)| Owned::Unsubscribe(c, t)),
        (text, bytes(20), bytes(100)).prop_map(|(f, t, p)| Owned::Publish(f, t, p)),
    ]
}

proptest! {
    #[test]
    fn round_trip(m in owned()) {
        let msg = m.msg();
        let mut out = Vec::new();
        encode(&msg, &mut out);
        prop_assert_eq!(decode(&out, DEFAULT_MAX_PAYLOAD), Ok(Some((msg, out.len()))));
        prop_assert_eq!(peek_len(&out), Some(out.len()));
        for cut in 0..out.len() {
            prop_assert_eq!(decode(&out[..cut], DEFAULT_MAX_PAYLOAD), Ok(None));
        }
    }

    #[test]
    fn stream_of_envelopes(ms in proptest::collection::vec(owned(), 1..10)) {
        let mut out = Vec::new();
        for m in &ms {
            encode(&m.msg(), &mut out);
        }
        let mut at = 0;
        for m in &ms {
            let (got, used) = decode(&out[at..], DEFAULT_MAX_PAYLOAD).unwrap().unwrap();
            prop_assert_eq!(got, m.msg());
            at += used;
        }
        prop_assert_eq!(at, out.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in bytes(128), max in 0usize..128) {
        if let Ok(Some((msg, used))) = decode(&bytes, max) {
            // One encoding per envelope: re-encoding gives back the bytes consumed.
            let mut out = Vec::new();
            encode(&msg, &mut out);
            prop_assert_eq!(&out[..], &bytes[..used]);
        }
    }

    #[test]
    fn valid_header_arbitrary_payload(kind in 1u8..=10, flags in 0u8..4, conn: u64, seq in 0u64..2, link_seq in 0u64..2, payload in bytes(64)) {
        let mut buf = hdr(payload.len() as u32, kind, flags, conn, seq, link_seq);
        buf.extend_from_slice(&payload);
        if let Ok(Some((msg, used))) = decode(&buf, 1024) {
            prop_assert_eq!(used, buf.len());
            let mut out = Vec::new();
            encode(&msg, &mut out);
            prop_assert_eq!(out, buf);
        }
    }
}
