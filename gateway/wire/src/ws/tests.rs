//! Frame codec tables (RFC 6455 section 5.7 and every refusal with its close code) and
//! the property tests that run messages through encode, decode and assembly together.

use super::*;
use proptest::prelude::*;

/// The masking key of the RFC's masked examples.
const RFC_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// An owned view of an event, for comparing runs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl From<Event<'_>> for Ev {
    fn from(e: Event<'_>) -> Ev {
        match e {
            Event::Message { text: true, data } => Ev::Text(data.to_vec()),
            Event::Message { text: false, data } => Ev::Binary(data.to_vec()),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close { code, reason } => Ev::Close(code, reason.into()),
        }
    }
}

/// Drives a connection's receive side the way the gateway will: bytes arrive in
/// `chunk`-sized receives into a staging buffer, whole frames are decoded in place and
/// consumed, and the assembler turns them into events. Returns the events and the error
/// that ended the stream, if any, plus the bytes left unconsumed.
fn drive(wire: &[u8], chunk: usize, max_message: usize) -> (Vec<Ev>, Option<WsError>, usize) {
    let mut asm = MessageAssembler::new();
    let mut partial = Vec::new();
    let mut staging: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        staging.extend_from_slice(piece);
        let mut pos = 0;
        loop {
            let limit = asm.frame_limit(&partial, max_message);
            let (frame, used) = match decode_frame(&mut staging[pos..], limit) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return (events, Some(e), staging.len() - pos),
            };
            match asm.push(frame, &mut partial, max_message) {
                Ok(Some(ev)) => events.push(Ev::from(ev)),
                Ok(None) => {}
                Err(e) => return (events, Some(e), staging.len() - pos - used),
            }
            pos += used;
            if !asm.in_message() {
                // What the gateway does: an idle connection keeps no message buffer.
                partial = Vec::new();
            }
        }
        staging.drain(..pos);
    }
    (events, None, staging.len())
}

#[test]
fn rfc_examples_server_encoding() {
    let mut out = Vec::new();
    encode_text("Hello", &mut out);
    assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);

    out.clear();
    encode_frame(Opcode::Text, false, b"Hel", &mut out);
    encode_frame(Opcode::Continuation, true, b"lo", &mut out);
    assert_eq!(out, [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f]);

    out.clear();
    encode_ping(b"Hello", &mut out);
    assert_eq!(out, [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);

    out.clear();
    encode_binary(&[7; 256], &mut out);
    assert_eq!(out[..4], [0x82, 0x7e, 0x01, 0x00]);
    assert_eq!(out.len(), 4 + 256);

    out.clear();
    encode_binary(&vec![7; 65536], &mut out);
    assert_eq!(
        out[..10],
        [0x82, 0x7f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]
    );
    assert_eq!(out.len(), 10 + 65536);

    // Length encoding edges.
    for (len, header) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
        assert_eq!(
            frame_header(Opcode::Binary, true, len, None)
                .as_bytes()
                .len(),
            header
        );
        assert_eq!(
            frame_header(Opcode::Binary, true, len, Some([1; 4]))
                .as_bytes()
                .len(),
            header + 4
        );
    }

    out.clear();
    encode_pong(b"", &mut out);
    encode_close(1000, "", &mut out);
    assert_eq!(out, [0x8a, 0x00, 0x88, 0x02, 0x03, 0xe8]);
}

#[test]
fn rfc_examples_client_decoding() {
    // A single-frame masked text message "Hello" (RFC 6455 5.7).
    let mut hello = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let mut built = Vec::new();
    encode_client_frame(Opcode::Text, true, b"Hello", RFC_MASK, &mut built);
    assert_eq!(built, hello);
    let (f, used) = decode_frame(&mut hello, 16).unwrap().unwrap();
    assert_eq!(
        (f.fin, f.opcode, f.payload, used),
        (true, Opcode::Text, &b"Hello"[..], 11)
    );

    // A masked pong "Hello" (the RFC's ping example, answered).
    let mut pong = [
        0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let (f, _) = decode_frame(&mut pong, 0).unwrap().unwrap();
    assert_eq!((f.opcode, f.payload), (Opcode::Pong, &b"Hello"[..]));

    // Fragmented "Hel" + "lo", masked, with a ping in between.
    let mut wire = Vec::new();
    encode_client_frame(Opcode::Text, false, b"Hel", RFC_MASK, &mut wire);
    encode_client_frame(Opcode::Ping, true, b"Hello", [9, 8, 7, 6], &mut wire);
    encode_client_frame(Opcode::Continuation, true, b"lo", RFC_MASK, &mut wire);
    assert_eq!(&wire[..2], [0x01, 0x83]);
    let (events, err, left) = drive(&wire, wire.len(), 1024);
    assert_eq!(
        (events, err, left),
        (
            vec![Ev::Ping(b"Hello".to_vec()), Ev::Text(b"Hello".to_vec())],
            None,
            0
        )
    );

    // 256 bytes and 64 KiB binary messages, masked: 16- and 64-bit lengths.
    for len in [256usize, 65536] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        encode_client_frame(Opcode::Binary, true, &data, RFC_MASK, &mut wire);
        let header: &[u8] = if len == 256 {
            &[0x82, 0xfe, 0x01, 0x00]
        } else {
            &[0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0]
        };
        assert_eq!(&wire[..header.len()], header);
        assert_eq!(wire.len(), header.len() + 4 + len);
        let (f, used) = decode_frame(&mut wire, 65536).unwrap().unwrap();
        assert_eq!(
            (f.opcode, f.payload, used),
            (Opcode::Binary, &data[..], used)
        );
        assert_eq!(used, header.len() + 4 + len);
    }

    // The RFC's unmasked examples are server frames: a server must refuse them.
    for frame in [
        &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f][..],
        &[0x01, 0x03, 0x48, 0x65, 0x6c],
        &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
    ] {
        let mut b = frame.to_vec();
        assert_eq!(decode_frame(&mut b, 1024), Err(WsError::Unmasked));
    }
}

#[test]
fn header_refusals_with_close_codes() {
    // (bytes, max_payload, error): each refused from as few bytes as the rule needs.
    let cases: &[(&[u8], usize, WsError, u16)] = &[
        (&[0xc1], 16, WsError::ReservedBits(4), 1002),
        (&[0xa2], 16, WsError::ReservedBits(2), 1002),
        (&[0x91], 16, WsError::ReservedBits(1), 1002),
        (&[0xf1], 16, WsError::ReservedBits(7), 1002),
        (&[0x83], 16, WsError::UnknownOpcode(3), 1002),
        (&[0x87], 16, WsError::UnknownOpcode(7), 1002),
        (&[0x8b], 16, WsError::UnknownOpcode(0xb), 1002),
        (&[0x8f], 16, WsError::UnknownOpcode(0xf), 1002),
        (&[0x08], 16, WsError::FragmentedControl(8), 1002),
        (&[0x09], 16, WsError::FragmentedControl(9), 1002),
        (&[0x0a], 16, WsError::FragmentedControl(0xa), 1002),
        (&[0x81, 0x05], 16, WsError::Unmasked, 1002),
        (&[0x82, 0x7e], 16, WsError::Unmasked, 1002),
        (
            &[0x89, 0xfe, 0x00, 0x7e],
            16,
            WsError::ControlTooLong(126),
            1002,
        ),
        (
            &[0x88, 0xff, 0, 0, 0, 0, 0, 0, 0x01, 0x00],
            16,
            WsError::ControlTooLong(256),
            1002,
        ),
        (
            &[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0],
            16,
            WsError::LengthOverflow,
            1002,
        ),
        (
            &[0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            usize::MAX,
            WsError::LengthOverflow,
            1002,
        ),
        // Over the limit: refused from the header, before mask or payload.
        (
            &[0x82, 0x91],
            16,
            WsError::FrameTooLarge { len: 17, max: 16 },
            1009,
        ),
        (
            &[0x00, 0xfe, 0xff, 0xff],
            65534,
            WsError::FrameTooLarge {
                len: 65535,
                max: 65534,
            },
            1009,
        ),
        (
            &[0x81, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            1 << 40,
            WsError::FrameTooLarge {
                len: u64::MAX >> 1,
                max: 1 << 40,
            },
            1009,
        ),
    ];
    for (bytes, max, err, code) in cases {
        let mut b = bytes.to_vec();
        assert_eq!(decode_frame(&mut b, *max), Err(*err), "{bytes:x?}");
        assert_eq!(err.close_code(), *code, "{err:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn message_refusals_with_close_codes() {
    let m = [1, 2, 3, 4];
    let frame = |op, fin, p: &[u8]| {
        let mut w = Vec::new();
        encode_client_frame(op, fin, p, m, &mut w);
        w
    };
    let raw = |bytes: &[u8]| bytes.to_vec();
    let cases: Vec<(Vec<Vec<u8>>, usize, u16)> = vec![
        // Close payload of 1 byte.
        (vec![raw(&[0x88, 0x81, 0, 0, 0, 0, 0x03])], 64, 1002),
        // Close codes that may not be sent.
        (vec![frame(Opcode::Close, true, &[0x03, 0xed])], 64, 1002), // 1005
        (vec![frame(Opcode::Close, true, &[0x03, 0xee])], 64, 1002), // 1006
        (vec![frame(Opcode::Close, true, &[0x03, 0xec])], 64, 1002), // 1004
        (vec![frame(Opcode::Close, true, &[0x03, 0xf7])], 64, 1002), // 1015
        (vec![frame(Opcode::Close, true, &[0x03, 0xe7])], 64, 1002), // 999
        (vec![frame(Opcode::Close, true, &[0x13, 0x88])], 64, 1002), // 5000
        // Close reason not UTF-8.
        (
            vec![frame(Opcode::Close, true, &[0x03, 0xe8, 0xce, 0xba, 0xe1])],
            64,
            1007,
        ),
        // Continuation without a start.
        (vec![frame(Opcode::Continuation, true, b"x")], 64, 1002),
        // A new data frame while a message is open.
        (
            vec![
                frame(Opcode::Text, false, b"a"),
                frame(Opcode::Text, true, b"b"),
            ],
            64,
            1002,
        ),
        // Invalid UTF-8, whole and fragmented (fails in the bad fragment).
        (
            vec![frame(Opcode::Text, true, b"\xce\xba\xe1\xbd")],
            64,
            1007,
        ),
        (
            vec![
                frame(Opcode::Text, false, b"\xce\xba"),
                frame(Opcode::Continuation, false, b"\xf4\x90"),
            ],
            64,
            1007,
        ),
        // A message over the limit, whole and in fragments.
        (vec![frame(Opcode::Binary, true, &[0; 65])], 64, 1009),
        (
            vec![
                frame(Opcode::Binary, false, &[0; 40]),
                frame(Opcode::Ping, true, b""),
                frame(Opcode::Continuation, true, &[0; 25]),
            ],
            64,
            1009,
        ),
        // Fragmented ping.
        (vec![raw(&[0x09, 0x80, 0, 0, 0, 0])], 64, 1002),
        // Ping over 125 bytes (16-bit length).
        (vec![raw(&[0x89, 0xfe, 0x00, 0x7e])], 1 << 20, 1002),
    ];
    for (frames, max, code) in cases {
        let wire = frames.concat();
        for chunk in [1, wire.len()] {
            let (_, err, _) = drive(&wire, chunk, max);
            let err = err.unwrap_or_else(|| panic!("{wire:x?} accepted"));
            assert_eq!(err.close_code(), code, "{wire:x?}: {err}");
        }
    }
}

#[test]
fn incomplete_frames_wait_and_stay_masked() {
    let mut wire = Vec::new();
    encode_client_frame(Opcode::Binary, true, &[5; 300], [1, 2, 3, 4], &mut wire);
    let original = wire.clone();
    for n in 0..wire.len() {
        assert_eq!(decode_frame(&mut wire[..n], 1024), Ok(None), "{n}");
        // Nothing is unmasked until the whole frame is there.
        assert_eq!(wire, original);
    }
}

#[test]
fn decoding_twice_yields_the_same_frame() {
    let mut wire = Vec::new();
    encode_client_frame(
        Opcode::Text,
        true,
        b"again",
        [0xde, 0xad, 0xbe, 0xef],
        &mut wire,
    );
    let (f, used) = decode_frame(&mut wire, 64).unwrap().unwrap();
    let first = (f.fin, f.opcode, f.payload.to_vec(), used);
    let (f, used) = decode_frame(&mut wire, 64).unwrap().unwrap();
    assert_eq!((f.fin, f.opcode, f.payload.to_vec(), used), first);
}

#[test]
fn non_minimal_lengths_are_accepted() {
    // 5 bytes announced with the 16-bit and the 64-bit length forms, masked with zeros.
    for header in [
        &[0x82, 0xfe, 0x00, 0x05][..],
        &[0x82, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x05],
        &[0x89, 0xfe, 0x00, 0x05],
    ] {
        let mut wire = header.to_vec();
        wire.extend_from_slice(&[0; 4]);
        wire.extend_from_slice(b"abcde");
        let total = wire.len();
        let (f, used) = decode_frame(&mut wire, 5).unwrap().unwrap();
        assert_eq!((f.payload, used), (&b"abcde"[..], total));
    }
}

#[test]
fn control_frames_ignore_the_data_limit() {
    let mut wire = Vec::new();
    encode_client_frame(Opcode::Ping, true, &[1; 125], [1, 2, 3, 4], &mut wire);
    let (f, _) = decode_frame(&mut wire, 0).unwrap().unwrap();
    assert_eq!(f.payload, &[1; 125]);
}

#[test]
fn masking_is_its_own_inverse_at_every_length() {
    for len in 0..40 {
        let data: Vec<u8> = (0..len as u8).collect();
        let mut m = data.clone();
        apply_mask(&mut m, [0x37, 0xfa, 0x21, 0x3d]);
        for (i, b) in m.iter().enumerate() {
            assert_eq!(*b, data[i] ^ [0x37, 0xfa, 0x21, 0x3d][i % 4]);
        }
        apply_mask(&mut m, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(m, data);
    }
}

#[test]
fn close_reason_is_cut_at_a_character_boundary() {
    let reason = "é".repeat(100); // 200 bytes
    let mut out = Vec::new();
    encode_close(close_code::GOING_AWAY, &reason, &mut out);
    assert_eq!(out[0], 0x88);
    let len = usize::from(out[1]);
    assert!(len <= MAX_CONTROL_PAYLOAD);
    assert_eq!(len, 2 + 122); // 61 two-byte characters fit in 123 bytes
    assert!(std::str::from_utf8(&out[4..]).is_ok());
}

#[test]
#[should_panic(expected = "control frame")]
fn oversized_control_encode_panics() {
    encode_ping(&[0; 126], &mut Vec::new());
}

#[test]
#[should_panic(expected = "control frame")]
fn fragmented_control_encode_panics() {
    encode_frame(Opcode::Close, false, &[], &mut Vec::new());
}

#[test]
fn every_error_has_its_close_code() {
    let table = [
        (WsError::Unmasked, 1002),
        (WsError::ReservedBits(1), 1002),
        (WsError::UnknownOpcode(3), 1002),
        (WsError::FragmentedControl(9), 1002),
        (WsError::ControlTooLong(126), 1002),
        (WsError::LengthOverflow, 1002),
        (WsError::FrameTooLarge { len: 2, max: 1 }, 1009),
        (WsError::MessageTooLarge { len: 2, max: 1 }, 1009),
        (WsError::UnexpectedContinuation, 1002),
        (WsError::MessageInterleaved, 1002),
        (WsError::InvalidUtf8, 1007),
        (WsError::CloseTooShort, 1002),
        (WsError::InvalidCloseCode(1005), 1002),
        (WsError::InvalidCloseReason, 1007),
    ];
    for (err, code) in table {
        assert_eq!(err.close_code(), code, "{err}");
    }
}

/// One message as a test sends it: its fragments (cut points into the data) and the
/// control frames it puts between or around them.
#[derive(Clone, Debug)]
struct Msg {
    text: bool,
    data: Vec<u8>,
    cuts: Vec<prop::sample::Index>,
    controls: Vec<(prop::sample::Index, u8, Vec<u8>)>,
}

fn msg() -> impl Strategy<Value = Msg> {
    let text = prop::collection::vec(any::<char>(), 0..40)
        .prop_map(|cs| (true, cs.into_iter().collect::<String>().into_bytes()));
    let binary = prop::collection::vec(any::<u8>(), 0..200).prop_map(|d| (false, d));
    (
        prop_oneof![text, binary],
        prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                0u8..3,
                prop::collection::vec(any::<u8>(), 0..=125),
            ),
            0..3,
        ),
    )
        .prop_map(|((text, data), cuts, controls)| Msg {
            text,
            data,
            cuts,
            controls,
        })
}

/// Encodes `msgs` as a browser would (masked, with `seed` choosing the masks) and
/// returns the wire bytes with the events and error a receiver must produce when
/// messages are limited to `max_message` bytes.
fn build(msgs: &[Msg], seed: u32, max_message: usize) -> (Vec<u8>, Vec<Ev>, Option<u16>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    let mut n = 0u32;
    let mut mask = || {
        n += 1;
        seed.wrapping_mul(0x9e37_79b9).wrapping_add(n).to_be_bytes()
    };
    for m in msgs {
        let mut cuts: Vec<usize> = m.cuts.iter().map(|i| i.index(m.data.len() + 1)).collect();
        cuts.push(0);
        cuts.push(m.data.len());
        cuts.sort_unstable();
        let fragments: Vec<&[u8]> = cuts.windows(2).map(|w| &m.data[w[0]..w[1]]).collect();
        let mut controls: Vec<(usize, u8, &[u8])> = m
            .controls
            .iter()
            .map(|(at, kind, p)| (at.index(fragments.len() + 1), *kind, &p[..]))
            .collect();
        controls.sort_by_key(|c| c.0);
        let mut controls = controls.into_iter().peekable();
        let mut total = 0;
        for (i, frag) in fragments
            .iter()
            .enumerate()
            .chain([(fragments.len(), &&[][..])])
        {
            while let Some((_, kind, p)) = controls.next_if(|c| c.0 == i) {
                let (op, ev) = match kind {
                    0 => (Opcode::Ping, Ev::Ping(p.to_vec())),
                    1 => (Opcode::Pong, Ev::Pong(p.to_vec())),
                    _ => {
                        // A close with code 1000 and a UTF-8 reason cut to fit.
                        let reason = String::from_utf8_lossy(p);
                        let mut out = Vec::new();
                        encode_close(1000, &reason, &mut out);
                        let body = out[2..].to_vec();
                        let reason = String::from_utf8(body[2..].to_vec()).unwrap();
                        encode_client_frame(Opcode::Close, true, &body, mask(), &mut wire);
                        expected.push(Ev::Close(Some(1000), reason));
                        continue;
                    }
                };
                encode_client_frame(op, true, p, mask(), &mut wire);
                expected.push(ev);
            }
            if i == fragments.len() {
                break;
            }
            let op = match (i, m.text) {
                (0, true) => Opcode::Text,
                (0, false) => Opcode::Binary,
                _ => Opcode::Continuation,
            };
            let fin = i + 1 == fragments.len();
            encode_client_frame(op, fin, frag, mask(), &mut wire);
            total += frag.len();
            if total > max_message {
                return (wire, expected, Some(1009));
            }
            if fin {
                expected.push(if m.text {
                    Ev::Text(m.data.clone())
                } else {
                    Ev::Binary(m.data.clone())
                });
            }
        }
    }
    (wire, expected, None)
}

proptest! {
    #[test]
    fn messages_round_trip(
        msgs in prop::collection::vec(msg(), 0..8),
        seed in any::<u32>(),
        chunk in 1usize..300,
    ) {
        let (wire, expected, err) = build(&msgs, seed, usize::MAX);
        prop_assert_eq!(err, None);
        let (events, err, left) = drive(&wire, chunk, 1 << 20);
        prop_assert_eq!(err, None);
        prop_assert_eq!(left, 0);
        prop_assert_eq!(events, expected);
    }

    #[test]
    fn message_limit_is_exact(
        msgs in prop::collection::vec(msg(), 1..6),
        seed in any::<u32>(),
        chunk in 1usize..300,
        max in 0usize..250,
    ) {
        let (wire, expected, err) = build(&msgs, seed, max);
        let (events, got, _) = drive(&wire, chunk, max);
        prop_assert_eq!(got.map(|e| e.close_code()), err);
        prop_assert_eq!(events, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        max in 0usize..300,
        chunk in 1usize..64,
    ) {
        let (_, _, left) = drive(&bytes, chunk, max);
        prop_assert!(left <= bytes.len());
        let mut b = bytes.clone();
        if let Ok(Some((_, used))) = decode_frame(&mut b, max) {
            prop_assert!(used <= bytes.len());
        }
        let _ = parse_upgrade(&bytes, &HandshakeConfig::default());
    }

    #[test]
    fn plausible_frames_never_panic(
        frames in prop::collection::vec(
            (any::<u8>(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..140), any::<[u8; 4]>()),
            0..12,
        ),
        max in 0usize..300,
        chunk in 1usize..64,
    ) {
        // Headers with any first byte (FIN, RSV, opcode), mostly masked, lengths real.
        let mut wire = Vec::new();
        for (b0, masked, payload, key) in &frames {
            let header = frame_header(Opcode::Binary, true, payload.len(), masked.then_some(*key));
            let mut h = header.as_bytes().to_vec();
            h[0] = *b0;
            wire.extend_from_slice(&h);
            let start = wire.len();
            wire.extend_from_slice(payload);
            apply_mask(&mut wire[start..], *key);
        }
        let (events, _, left) = drive(&wire, chunk, max);
        prop_assert!(left <= wire.len());
        for ev in events {
            if let Ev::Text(t) = ev {
                prop_assert!(std::str::from_utf8(&t).is_ok());
            }
        }
    }

    #[test]
    fn handshake_any_split(cut in 0usize..400, junk in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut req = b"GET /ws?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\n\r\n".to_vec();
        let head = req.len();
        req.extend_from_slice(&junk);
        let cfg = HandshakeConfig::default();
        let cut = cut.min(req.len());
        let got = parse_upgrade(&req[..cut], &cfg).unwrap();
        if cut < head {
            prop_assert!(got.is_none());
        } else {
            let (up, used) = got.unwrap();
            prop_assert_eq!(used, head);
            prop_assert_eq!(up.accept_key_str(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        }
    }
}
