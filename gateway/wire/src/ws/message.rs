//! Message assembly: turns decoded frames into the events a connection acts on (a whole
//! text or binary message, a ping to answer, a pong, a close) and enforces the rules
//! that span frames: fragment order, the message size limit and UTF-8 across fragments.
//!
//! The per-connection state is [`MessageAssembler`], 2 bytes. The bytes of a fragmented
//! message live in a `Vec` the caller owns and passes in on each call; a message that
//! arrives as one frame never touches it (the event borrows the frame). The caller may
//! free that `Vec` whenever no message is open, so an idle connection holds none. This
//! module never allocates except by appending fragments to that `Vec`.

use super::{WsError, WsFrame};
use crate::ws::Opcode;

/// What a connection does next, borrowed from the frame or from the caller's message
/// buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete message. `text` messages have been checked to be UTF-8.
    Message {
        /// Text (UTF-8) rather than binary.
        text: bool,
        /// The whole message.
        data: &'a [u8],
    },
    /// A ping: answer it with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong: the peer is alive; nothing to answer.
    Pong(&'a [u8]),
    /// The peer starts (or answers) the closing handshake. `code` is `None` for an empty
    /// close payload (reported locally as 1005, never sent).
    Close {
        /// The peer's close code, already checked with [`is_valid_close_code`].
        code: Option<u16>,
        /// The peer's reason, possibly empty.
        reason: &'a str,
    },
}

/// Per-connection message state: whether a fragmented message is open, of which kind,
/// and how many bytes at the end of the caller's buffer are the start of a UTF-8 code
/// point still waiting for the rest. 2 bytes.
///
/// Usage, per decoded frame:
///
/// ```
/// use holdfast_wire::ws::{self, Event, MessageAssembler, Opcode};
///
/// // Two fragments of "Hello", masked as a browser sends them.
/// let mut wire = Vec::new();
/// ws::encode_client_frame(Opcode::Text, false, b"Hel", [1, 2, 3, 4], &mut wire);
/// ws::encode_client_frame(Opcode::Continuation, true, b"lo", [5, 6, 7, 8], &mut wire);
///
/// let max_message = 64 * 1024;
/// let mut asm = MessageAssembler::new();
/// let mut partial = Vec::new(); // owned by the connection; empty (freeable) when idle
/// let mut pos = 0;
/// let mut got = Vec::new();
/// while let Some((frame, used)) =
///     ws::decode_frame(&mut wire[pos..], asm.frame_limit(&partial, max_message)).unwrap()
/// {
///     pos += used;
///     if let Some(Event::Message { text, data }) =
///         asm.push(frame, &mut partial, max_message).unwrap()
///     {
///         assert!(text);
///         got.extend_from_slice(data);
///     }
///     if !asm.in_message() {
///         partial = Vec::new(); // or keep the capacity for the next fragmented message
///     }
/// }
/// assert_eq!(got, b"Hello");
/// ```
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageAssembler {
    open: Open,
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
enum Open {
    /// No fragmented message: the caller's buffer holds nothing of ours.
    #[default]
    None,
    /// A fragmented binary message is in the caller's buffer.
    Binary,
    /// A fragmented text message is in the caller's buffer; its last `pending` bytes
    /// (0-3) are an incomplete code point, already checked to be a valid prefix.
    Text { pending: u8 },
}

impl MessageAssembler {
    /// A connection's assembler with no message open.
    pub fn new() -> MessageAssembler {
        MessageAssembler::default()
    }

    /// Whether a fragmented message is open, that is whether the caller's buffer holds
    /// its first fragments. When this is false the caller may free that buffer.
    pub fn in_message(&self) -> bool {
        self.open != Open::None
    }

    /// The state as one byte, for moving a connection to another process (see
    /// [`MessageAssembler::from_byte`]): 0 no message, 1 binary, 2 + pending for text.
    pub fn to_byte(&self) -> u8 {
        match self.open {
            Open::None => 0,
            Open::Binary => 1,
            Open::Text { pending } => 2 + pending,
        }
    }

    /// The state [`MessageAssembler::to_byte`] wrote; None for a byte it never writes.
    pub fn from_byte(b: u8) -> Option<MessageAssembler> {
        let open = match b {
            0 => Open::None,
            1 => Open::Binary,
            2..=5 => Open::Text { pending: b - 2 },
            _ => return None,
        };
        Some(MessageAssembler { open })
    }

    /// Forgets any open message (for reusing the state; the caller clears its buffer).
    pub fn reset(&mut self) {
        self.open = Open::None;
    }

    /// The largest data-frame payload the next frame may announce without passing
    /// `max_message`: pass it to [`decode_frame`](super::decode_frame) so an oversized
    /// fragment is refused from its header, before its payload arrives. `partial` is the
    /// buffer passed to [`push`](MessageAssembler::push).
    pub fn frame_limit(&self, partial: &[u8], max_message: usize) -> usize {
        if self.in_message() {
            max_message.saturating_sub(partial.len())
        } else {
            max_message
        }
    }

    /// Takes one decoded frame. Returns the event it completes, or `None` when it was a
    /// fragment that only extended the open message.
    ///
    /// A message that arrives as one frame is handed out borrowing the frame, and
    /// `partial` is not touched. A fragmented message is collected in `partial`: the
    /// first fragment clears it and each fragment appends, and the final one yields
    /// `Event::Message` borrowing all of `partial`, which then holds exactly that
    /// message (so the caller may `std::mem::take` it rather than copy `data`). After
    /// that event, or after any error, `partial` holds nothing the assembler needs: the
    /// caller may take, clear or free it. While a message is open
    /// ([`in_message`](MessageAssembler::in_message)) the caller must leave `partial`
    /// alone. Control frames may come between fragments; they never touch `partial`.
    ///
    /// Text is checked to be UTF-8 fragment by fragment, so an invalid message fails at
    /// the first bad byte, and a code point split across fragments is fine. A message of
    /// more than `max_message` bytes fails with [`WsError::MessageTooLarge`].
    ///
    /// After an error the connection must be closed with [`WsError::close_code`]; the
    /// assembler is back to no message open.
    pub fn push<'a>(
        &mut self,
        frame: WsFrame<'a>,
        partial: &'a mut Vec<u8>,
        max_message: usize,
    ) -> Result<Option<Event<'a>>, WsError> {
        let result = self.step(frame, partial, max_message);
        if result.is_err() {
            self.open = Open::None;
        }
        result
    }

    fn step<'a>(
        &mut self,
        frame: WsFrame<'a>,
        partial: &'a mut Vec<u8>,
        max_message: usize,
    ) -> Result<Option<Event<'a>>, WsError> {
        let payload = frame.payload;
        match frame.opcode {
            Opcode::Ping => Ok(Some(Event::Ping(payload))),
            Opcode::Pong => Ok(Some(Event::Pong(payload))),
            Opcode::Close => parse_close(payload).map(Some),
            Opcode::Text | Opcode::Binary => {
                if self.in_message() {
                    return Err(WsError::MessageInterleaved);
                }
                let text = frame.opcode == Opcode::Text;
                if payload.len() > max_message {
                    return Err(WsError::MessageTooLarge {
                        len: payload.len(),
                        max: max_message,
                    });
                }
                if frame.fin {
                    if text && std::str::from_utf8(payload).is_err() {
                        return Err(WsError::InvalidUtf8);
                    }
                    return Ok(Some(Event::Message {
                        text,
                        data: payload,
                    }));
                }
                self.open = if text {
                    Open::Text {
                        pending: utf8_continue(&[], payload, false)?,
                    }
                } else {
                    Open::Binary
                };
                partial.clear();
                partial.extend_from_slice(payload);
                Ok(None)
            }
            Opcode::Continuation => {
                let text = match self.open {
                    Open::None => return Err(WsError::UnexpectedContinuation),
                    Open::Binary => false,
                    Open::Text { pending } => {
                        // The assembler alone appends to `partial` while a message is
                        // open, so its tail is the pending prefix it recorded.
                        assert!(
                            partial.len() >= usize::from(pending),
                            "the message buffer was changed while a message was open"
                        );
                        let tail_start = partial.len() - usize::from(pending);
                        let pending = utf8_continue(&partial[tail_start..], payload, frame.fin)?;
                        self.open = Open::Text { pending };
                        true
                    }
                };
                let len = partial.len().saturating_add(payload.len());
                if len > max_message {
                    return Err(WsError::MessageTooLarge {
                        len,
                        max: max_message,
                    });
                }
                partial.extend_from_slice(payload);
                if !frame.fin {
                    return Ok(None);
                }
                self.open = Open::None;
                Ok(Some(Event::Message {
                    text,
                    data: partial.as_slice(),
                }))
            }
        }
    }
}

/// Whether `code` may appear in a close frame on the wire (RFC 6455 7.4): 1000-1003,
/// 1007-1011, 1012-1014 (registered since), and 3000-4999 (libraries, applications).
/// 1004 is reserved, 1005, 1006 and 1015 only describe a close locally, and the rest
/// of 0-2999 and 5000 and over are undefined.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn parse_close(payload: &[u8]) -> Result<Event<'_>, WsError> {
    match payload {
        [] => Ok(Event::Close {
            code: None,
            reason: "",
        }),
        [_] => Err(WsError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
            Ok(Event::Close {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Checks that `next` continues UTF-8 text whose last bytes, `tail` (0-3 bytes, a valid
/// prefix of a code point), are still incomplete. Returns how many bytes at the end of
/// `tail ++ next` are again an incomplete prefix; with `fin`, none may be.
fn utf8_continue(tail: &[u8], next: &[u8], fin: bool) -> Result<u8, WsError> {
    debug_assert!(tail.len() < 4);
    let mut rest = next;
    if let Some(&lead) = tail.first() {
        // Finish the split code point on the stack, then check the rest in one pass.
        let width: usize = match lead {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            _ => 4,
        };
        let take = width.saturating_sub(tail.len()).min(next.len());
        let mut cp = [0u8; 4];
        cp[..tail.len()].copy_from_slice(tail);
        cp[tail.len()..tail.len() + take].copy_from_slice(&next[..take]);
        let have = tail.len() + take;
        match std::str::from_utf8(&cp[..have]) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() && !fin => {
                debug_assert_eq!(take, next.len());
                return Ok(have as u8);
            }
            Err(_) => return Err(WsError::InvalidUtf8),
        }
        rest = &next[take..];
    }
    match std::str::from_utf8(rest) {
        Ok(_) => Ok(0),
        // `error_len() == None`: the input ends inside a code point that is valid so far
        // (std reports a bad byte as soon as it sees one), so at most 3 bytes remain.
        Err(e) if e.error_len().is_none() && !fin => Ok((rest.len() - e.valid_up_to()) as u8),
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_byte_round_trips_and_refuses_unknown_values() {
        for b in 0..=5u8 {
            let asm = MessageAssembler::from_byte(b).expect("a byte to_byte writes");
            assert_eq!(asm.to_byte(), b);
            assert_eq!(asm.in_message(), b != 0);
        }
        assert!(MessageAssembler::from_byte(6).is_none());
        assert!(MessageAssembler::from_byte(255).is_none());
        // A text message split inside a code point keeps its pending count.
        let mut asm = MessageAssembler::new();
        let mut msg = Vec::new();
        let euro = "\u{20ac}".as_bytes();
        asm.push(data(Opcode::Text, false, &euro[..1]), &mut msg, 100)
            .expect("a valid prefix");
        let moved = MessageAssembler::from_byte(asm.to_byte()).expect("round trip");
        assert_eq!(moved, asm);
    }

    fn data(opcode: Opcode, fin: bool, payload: &[u8]) -> WsFrame<'_> {
        WsFrame {
            fin,
            opcode,
            payload,
        }
    }

    /// Feeds `frames` and collects the events as owned values.
    fn run(frames: &[WsFrame<'_>], max: usize) -> Result<Vec<(String, Vec<u8>)>, WsError> {
        let mut asm = MessageAssembler::new();
        let mut partial = Vec::new();
        let mut out = Vec::new();
        for f in frames {
            match asm.push(*f, &mut partial, max)? {
                None => {}
                Some(Event::Message { text, data }) => {
                    out.push((if text { "text" } else { "binary" }.into(), data.to_vec()))
                }
                Some(Event::Ping(p)) => out.push(("ping".into(), p.to_vec())),
                Some(Event::Pong(p)) => out.push(("pong".into(), p.to_vec())),
                Some(Event::Close { code, reason }) => {
                    out.push((format!("close {code:?}"), reason.as_bytes().to_vec()))
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn state_is_tiny() {
        assert_eq!(std::mem::size_of::<MessageAssembler>(), 2);
    }

    #[test]
    fn single_frame_borrows_the_frame() {
        let mut asm = MessageAssembler::new();
        let mut partial = Vec::new();
        let payload = b"Hello".to_vec();
        let ev = asm
            .push(data(Opcode::Text, true, &payload), &mut partial, 16)
            .unwrap()
            .unwrap();
        let Event::Message { text: true, data } = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(data.as_ptr(), payload.as_ptr());
        assert_eq!(partial.capacity(), 0);
    }

    #[test]
    fn fragments_with_controls_between() {
        let got = run(
            &[
                data(Opcode::Binary, false, b"ab"),
                data(Opcode::Ping, true, b"p"),
                data(Opcode::Continuation, false, b""),
                data(Opcode::Pong, true, b""),
                data(Opcode::Continuation, true, b"c"),
                data(Opcode::Text, true, b"t"),
                data(Opcode::Close, true, &[0x03, 0xe8, b'o', b'k']),
            ],
            16,
        )
        .unwrap();
        let want: Vec<(String, Vec<u8>)> = vec![
            ("ping".into(), b"p".to_vec()),
            ("pong".into(), vec![]),
            ("binary".into(), b"abc".to_vec()),
            ("text".into(), b"t".to_vec()),
            ("close Some(1000)".into(), b"ok".to_vec()),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn frame_and_message_rules() {
        let cases: &[(&[WsFrame<'_>], WsError)] = &[
            (
                &[data(Opcode::Continuation, true, b"x")],
                WsError::UnexpectedContinuation,
            ),
            (
                &[
                    data(Opcode::Text, false, b"x"),
                    data(Opcode::Binary, true, b"y"),
                ],
                WsError::MessageInterleaved,
            ),
            (
                &[
                    data(Opcode::Binary, false, b"x"),
                    data(Opcode::Text, false, b"y"),
                ],
                WsError::MessageInterleaved,
            ),
            (
                &[
                    data(Opcode::Binary, true, b"x"),
                    data(Opcode::Continuation, true, b"y"),
                ],
                WsError::UnexpectedContinuation,
            ),
            (
                &[data(Opcode::Binary, true, &[0; 9])],
                WsError::MessageTooLarge { len: 9, max: 8 },
            ),
            (
                &[
                    data(Opcode::Binary, false, &[0; 5]),
                    data(Opcode::Continuation, false, &[0; 3]),
                    data(Opcode::Continuation, true, &[0; 1]),
                ],
                WsError::MessageTooLarge { len: 9, max: 8 },
            ),
            (&[data(Opcode::Text, true, b"\xff")], WsError::InvalidUtf8),
            // Fails at the bad fragment, before the message ends.
            (
                &[
                    data(Opcode::Text, false, b"ok"),
                    data(Opcode::Continuation, false, b"\xc3\x28"),
                ],
                WsError::InvalidUtf8,
            ),
            // Ends inside a code point.
            (
                &[
                    data(Opcode::Text, false, b"ok"),
                    data(Opcode::Continuation, true, b"\xe2\x82"),
                ],
                WsError::InvalidUtf8,
            ),
            (&[data(Opcode::Close, true, &[3])], WsError::CloseTooShort),
            (
                &[data(Opcode::Close, true, &[0x03, 0xe8, 0xff])],
                WsError::InvalidCloseReason,
            ),
        ];
        for (frames, err) in cases {
            assert_eq!(run(frames, 8), Err(*err), "{frames:?}");
        }
    }

    #[test]
    fn close_codes() {
        for code in 0..=u16::MAX {
            let payload = code.to_be_bytes();
            let got = parse_close(&payload);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if valid {
                assert_eq!(
                    got,
                    Ok(Event::Close {
                        code: Some(code),
                        reason: ""
                    })
                );
            } else {
                assert_eq!(got, Err(WsError::InvalidCloseCode(code)));
                assert_eq!(got.unwrap_err().close_code(), 1002);
            }
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!is_valid_close_code(bad), "{bad}");
        }
        assert_eq!(
            parse_close(&[]),
            Ok(Event::Close {
                code: None,
                reason: ""
            })
        );
    }

    #[test]
    fn utf8_split_at_every_boundary() {
        // 1-, 2-, 3- and 4-byte sequences, including the edges of each range.
        let text = "a\u{80}\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}é€😀z";
        let bytes = text.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let frames = [
                    data(Opcode::Text, false, &bytes[..i]),
                    data(Opcode::Continuation, false, &bytes[i..j]),
                    data(Opcode::Continuation, true, &bytes[j..]),
                ];
                let got = run(&frames, 1024).unwrap();
                assert_eq!(got, vec![("text".into(), bytes.to_vec())], "{i} {j}");
            }
        }
        // One byte per fragment.
        let mut frames = vec![data(Opcode::Text, false, &[])];
        frames.extend(
            bytes
                .chunks(1)
                .map(|c| data(Opcode::Continuation, false, c)),
        );
        frames.push(data(Opcode::Continuation, true, &[]));
        assert_eq!(
            run(&frames, 1024).unwrap(),
            vec![("text".into(), bytes.to_vec())]
        );
    }

    #[test]
    fn invalid_utf8_fails_in_the_fragment_that_breaks_it() {
        let bad: &[&[u8]] = &[
            b"\xc3\x28",         // bad continuation
            b"\xe2\x28\xa1",     // bad second byte of 3
            b"\xe2\x82\x28",     // bad third byte of 3
            b"\xf0\x28\x8c\xbc", // bad second byte of 4
            b"\xf0\x90\x28\xbc", // bad third byte of 4
            b"\xf0\x90\x8c\x28", // bad fourth byte of 4
            b"\xc0\xaf",         // overlong
            b"\xe0\x80\xaf",     // overlong
            b"\xed\xa0\x80",     // surrogate
            b"\xf4\x90\x80\x80", // over U+10FFFF
            b"\x80",             // lone continuation
            b"\xf8\x88\x80\x80\x80",
        ];
        for seq in bad {
            for split in 0..=seq.len() {
                // Split the bad sequence across two fragments, neither final: the
                // error must come no later than the fragment holding the bad byte.
                let mut asm = MessageAssembler::new();
                let mut partial = Vec::new();
                let first = asm.push(data(Opcode::Text, false, &seq[..split]), &mut partial, 64);
                let result = match first {
                    Err(e) => Err(e),
                    Ok(_) => asm
                        .push(
                            data(Opcode::Continuation, false, &seq[split..]),
                            &mut partial,
                            64,
                        )
                        .map(|_| ()),
                };
                assert_eq!(result, Err(WsError::InvalidUtf8), "{seq:x?} split {split}");
                assert!(!asm.in_message());
            }
        }
    }

    #[test]
    fn frame_limit_tracks_the_open_message() {
        let mut asm = MessageAssembler::new();
        let mut partial = Vec::new();
        assert_eq!(asm.frame_limit(&partial, 10), 10);
        asm.push(data(Opcode::Binary, false, b"abcd"), &mut partial, 10)
            .unwrap();
        assert_eq!(asm.frame_limit(&partial, 10), 6);
        assert!(asm.in_message());
        asm.push(data(Opcode::Continuation, true, b"ef"), &mut partial, 10)
            .unwrap();
        assert!(!asm.in_message());
        assert_eq!(asm.frame_limit(&partial, 10), 10);
    }

    #[test]
    fn first_fragment_clears_a_stale_buffer() {
        let mut asm = MessageAssembler::new();
        let mut partial = b"left over".to_vec();
        asm.push(data(Opcode::Binary, false, b"a"), &mut partial, 64)
            .unwrap();
        let ev = asm
            .push(data(Opcode::Continuation, true, b"b"), &mut partial, 64)
            .unwrap();
        assert_eq!(
            ev,
            Some(Event::Message {
                text: false,
                data: b"ab"
            })
        );
    }
}
