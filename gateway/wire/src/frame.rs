//! The native client protocol spoken inside TLS once ALPN chose `holdfast/1`: each frame
//! is a 1-byte type, a 3-byte big-endian payload length and the payload.
//!
//! The decoder is zero-copy: it hands out views into the caller's buffer and says how
//! many bytes the frame took. It refuses an unknown type or an oversized length as soon
//! as the 4 header bytes are present, so a lying length prefix never makes the gateway
//! wait for (or buffer) a payload it would refuse anyway. This module never reads a
//! socket; [`FrameBuf`] is an owning convenience for clients and tests, not for the
//! gateway's data path. The format is described in `docs/client-protocol.md`.

use thiserror::Error;

/// The ALPN protocol id of the native protocol (also the protocol used when a client
/// offers no ALPN at all).
pub const ALPN: &[u8] = b"holdfast/1";
/// Bytes in a frame header: type (1) and payload length (3, big-endian).
pub const HEADER_LEN: usize = 4;
/// The largest payload length the 3-byte length field can express.
pub const MAX_LEN_FIELD: usize = (1 << 24) - 1;
/// The payload limit a gateway enforces unless configured otherwise.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// Close codes carried in CLOSE frames. The values follow the WebSocket close codes of
/// RFC 6455 where one exists, so both client protocols report closes alike;
/// 4000..=4999 are defined by workers and passed through by the gateway unchanged.
pub mod close_code {
    /// The connection did what it came for.
    pub const NORMAL: u16 = 1000;
    /// The gateway is draining (sent after GOAWAY) or the peer is leaving.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the framing rules (for example a CLOSE payload under 2 bytes).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame type this protocol version does not define.
    pub const UNKNOWN_TYPE: u16 = 1003;
    /// A payload that is not valid for its frame (for example text that is not UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Refused by policy (worker or operator decision).
    pub const POLICY: u16 = 1008;
    /// A frame over the configured payload limit.
    pub const TOO_LARGE: u16 = 1009;
    /// The gateway or a worker failed; retrying later may work.
    pub const INTERNAL: u16 = 1011;
    /// Overloaded or no worker available; reconnect after a back-off.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Nothing was received for the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 1014;
    /// First code of the worker-defined range (passed through unchanged).
    pub const WORKER_MIN: u16 = 4000;
    /// Last code of the worker-defined range.
    pub const WORKER_MAX: u16 = 4999;
}

/// The type byte of a frame.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FrameType {
    /// An application message, relayed to or from a worker.
    Data = 1,
    /// A heartbeat; the gateway answers it with PONG carrying the same payload.
    Ping = 2,
    /// The answer to PING.
    Pong = 3,
    /// The gateway is draining: finish up and reconnect elsewhere or later.
    GoAway = 4,
    /// The last frame of a connection: 2-byte close code and a UTF-8 reason.
    Close = 5,
}

impl FrameType {
    /// The frame type for a type byte, or `None` if the protocol defines none.
    pub fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            1 => FrameType::Data,
            2 => FrameType::Ping,
            3 => FrameType::Pong,
            4 => FrameType::GoAway,
            5 => FrameType::Close,
            _ => return None,
        })
    }
}

/// A decoded frame, borrowing its payload from the decode buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An application message.
    Data(&'a [u8]),
    /// A heartbeat request.
    Ping(&'a [u8]),
    /// A heartbeat answer.
    Pong(&'a [u8]),
    /// A drain notice; the payload is an optional human-readable note.
    GoAway(&'a [u8]),
    /// The closing frame.
    Close {
        /// See [`close_code`].
        code: u16,
        /// Human-readable reason, possibly empty.
        reason: &'a str,
    },
}

impl Frame<'_> {
    /// The frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Data(_) => FrameType::Data,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::GoAway(_) => FrameType::GoAway,
            Frame::Close { .. } => FrameType::Close,
        }
    }

    /// Appends this frame's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Frame::Data(p) | Frame::Ping(p) | Frame::Pong(p) | Frame::GoAway(p) => {
                encode(self.frame_type(), p, out)
            }
            Frame::Close { code, reason } => encode_close(code, reason, out),
        }
    }
}

/// Why a frame could not be decoded. Each error ends the connection with the close code
/// that [`FrameError::close_code`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length field is over the configured payload limit.
    #[error("frame payload of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Payload length the header announced.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The type byte names no frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A CLOSE payload shorter than its 2-byte code, or a reason that is not UTF-8.
    #[error("malformed CLOSE frame (payload under 2 bytes or reason not UTF-8)")]
    BadClose,
}

impl FrameError {
    /// The close code the gateway sends before dropping a connection for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooLarge { .. } => close_code::TOO_LARGE,
            FrameError::UnknownType(_) => close_code::UNKNOWN_TYPE,
            FrameError::BadClose => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Decodes the frame at the start of `buf`.
///
/// `Ok(None)` means more bytes are needed. The type and length are checked as soon as
/// the 4 header bytes are present, so an oversized or unknown frame is refused before
/// its payload arrives. On success returns the frame and the number of bytes it took.
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let kind = FrameType::from_u8(header[0]).ok_or(FrameError::UnknownType(header[0]))?;
    let len = payload_len(header);
    if len > max_payload {
        return Err(FrameError::TooLarge {
            len,
            max: max_payload,
        });
    }
    let total = HEADER_LEN + len;
    let Some(payload) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    let frame = match kind {
        FrameType::Data => Frame::Data(payload),
        FrameType::Ping => Frame::Ping(payload),
        FrameType::Pong => Frame::Pong(payload),
        FrameType::GoAway => Frame::GoAway(payload),
        FrameType::Close => {
            let (code, reason) = payload
                .split_first_chunk::<2>()
                .ok_or(FrameError::BadClose)?;
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::BadClose)?;
            Frame::Close {
                code: u16::from_be_bytes(*code),
                reason,
            }
        }
    };
    Ok(Some((frame, total)))
}

fn payload_len(header: &[u8; HEADER_LEN]) -> usize {
    usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3])
}

/// Total size (header and payload) of the frame whose header starts `buf`, once the 4
/// header bytes are present. Does not check the type.
pub fn peek_len(buf: &[u8]) -> Option<usize> {
    buf.first_chunk::<HEADER_LEN>()
        .map(|h| HEADER_LEN + payload_len(h))
}

/// The 4 header bytes for a frame of `kind` with `payload_len` payload bytes.
///
/// # Panics
/// If `payload_len` is over [`MAX_LEN_FIELD`]: the caller must refuse or split such a
/// payload before it gets here.
pub fn encode_header(kind: FrameType, payload_len: usize) -> [u8; 4] {
    assert!(
        payload_len <= MAX_LEN_FIELD,
        "frame payload of {payload_len} bytes does not fit the 24-bit length field"
    );
    let l = (payload_len as u32).to_be_bytes();
    [kind as u8, l[1], l[2], l[3]]
}

/// Appends a frame of `kind` carrying `payload` to `out`.
///
/// # Panics
/// If the payload is over [`MAX_LEN_FIELD`] bytes.
pub fn encode(kind: FrameType, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_header(kind, payload.len()));
    out.extend_from_slice(payload);
}

/// Appends a CLOSE frame (2-byte big-endian code, then the UTF-8 reason) to `out`.
///
/// # Panics
/// If the reason is over [`MAX_LEN_FIELD`]` - 2` bytes.
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + 2 + reason.len());
    out.extend_from_slice(&encode_header(FrameType::Close, 2 + reason.len()));
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// A decoded frame that owns its payload (see [`FrameBuf`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedFrame {
    /// An application message.
    Data(Vec<u8>),
    /// A heartbeat request.
    Ping(Vec<u8>),
    /// A heartbeat answer.
    Pong(Vec<u8>),
    /// A drain notice.
    GoAway(Vec<u8>),
    /// The closing frame.
    Close {
        /// See [`close_code`].
        code: u16,
        /// Human-readable reason.
        reason: String,
    },
}

impl OwnedFrame {
    /// A borrowed view of this frame.
    pub fn as_frame(&self) -> Frame<'_> {
        match self {
            OwnedFrame::Data(p) => Frame::Data(p),
            OwnedFrame::Ping(p) => Frame::Ping(p),
            OwnedFrame::Pong(p) => Frame::Pong(p),
            OwnedFrame::GoAway(p) => Frame::GoAway(p),
            OwnedFrame::Close { code, reason } => Frame::Close {
                code: *code,
                reason,
            },
        }
    }
}

impl From<Frame<'_>> for OwnedFrame {
    fn from(f: Frame<'_>) -> OwnedFrame {
        match f {
            Frame::Data(p) => OwnedFrame::Data(p.to_vec()),
            Frame::Ping(p) => OwnedFrame::Ping(p.to_vec()),
            Frame::Pong(p) => OwnedFrame::Pong(p.to_vec()),
            Frame::GoAway(p) => OwnedFrame::GoAway(p.to_vec()),
            Frame::Close { code, reason } => OwnedFrame::Close {
                code,
                reason: reason.to_owned(),
            },
        }
    }
}

/// A receive buffer for clients (tests, the load generator): push bytes as they arrive,
/// take whole frames out. Consumed bytes are dropped lazily, in amortised O(1) per byte.
#[derive(Debug, Default, Clone)]
pub struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
}

impl FrameBuf {
    /// An empty buffer.
    pub fn new() -> FrameBuf {
        FrameBuf::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.buf.len() / 2 && self.start > 0 {
            // The consumed prefix is at least as long as what is left, so moving the
            // rest down costs no more than the bytes already consumed.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet taken out as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Takes out the next whole frame, `Ok(None)` if it has not fully arrived. After an
    /// error the buffer is left as it was; the connection should be closed.
    pub fn next(&mut self, max_payload: usize) -> Result<Option<OwnedFrame>, FrameError> {
        match decode(&self.buf[self.start..], max_payload)? {
            None => Ok(None),
            Some((frame, used)) => {
                let owned = OwnedFrame::from(frame);
                self.start += used;
                Ok(Some(owned))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exact_bytes() {
        let cases: &[(Frame<'_>, &[u8])] = &[
            (Frame::Data(b""), &[1, 0, 0, 0]),
            (Frame::Data(b"hi"), &[1, 0, 0, 2, b'h', b'i']),
            (Frame::Ping(b"\x07"), &[2, 0, 0, 1, 7]),
            (Frame::Pong(b"\x07"), &[3, 0, 0, 1, 7]),
            (Frame::GoAway(b""), &[4, 0, 0, 0]),
            (
                Frame::Close {
                    code: close_code::GOING_AWAY,
                    reason: "bye",
                },
                &[5, 0, 0, 5, 0x03, 0xe9, b'b', b'y', b'e'],
            ),
            (
                Frame::Close {
                    code: 4000,
                    reason: "",
                },
                &[5, 0, 0, 2, 0x0f, 0xa0],
            ),
        ];
        for (frame, bytes) in cases {
            let mut out = Vec::new();
            frame.encode(&mut out);
            assert_eq!(&out, bytes, "{frame:?}");
            assert_eq!(
                decode(bytes, DEFAULT_MAX_PAYLOAD),
                Ok(Some((*frame, bytes.len())))
            );
            assert_eq!(peek_len(bytes), Some(bytes.len()));
        }
    }

    #[test]
    fn errors() {
        let cases: &[(&[u8], usize, FrameError)] = &[
            (&[0, 0, 0, 0], 16, FrameError::UnknownType(0)),
            (&[6, 0, 0, 0], 16, FrameError::UnknownType(6)),
            (&[0xff, 0xff, 0xff, 0xff], 16, FrameError::UnknownType(0xff)),
            // Refused from the header alone: the payload never arrived.
            (
                &[1, 0, 0, 17],
                16,
                FrameError::TooLarge { len: 17, max: 16 },
            ),
            (
                &[1, 0xff, 0xff, 0xff],
                DEFAULT_MAX_PAYLOAD,
                FrameError::TooLarge {
                    len: MAX_LEN_FIELD,
                    max: DEFAULT_MAX_PAYLOAD,
                },
            ),
            (&[5, 0, 0, 0], 16, FrameError::BadClose),
            (&[5, 0, 0, 1, 3], 16, FrameError::BadClose),
            (&[5, 0, 0, 3, 3, 0xe8, 0xff], 16, FrameError::BadClose),
        ];
        for (bytes, max, err) in cases {
            assert_eq!(decode(bytes, *max), Err(*err), "{bytes:?}");
        }
        assert_eq!(
            FrameError::TooLarge { len: 1, max: 0 }.close_code(),
            close_code::TOO_LARGE
        );
        assert_eq!(
            FrameError::UnknownType(9).close_code(),
            close_code::UNKNOWN_TYPE
        );
        assert_eq!(
            FrameError::BadClose.close_code(),
            close_code::PROTOCOL_ERROR
        );
    }

    #[test]
    fn needs_more() {
        assert_eq!(decode(&[], 16), Ok(None));
        assert_eq!(decode(&[1, 0, 0], 16), Ok(None));
        assert_eq!(decode(&[1, 0, 0, 2, b'h'], 16), Ok(None));
        assert_eq!(peek_len(&[1, 0, 0]), None);
        assert_eq!(peek_len(&[9, 0, 1, 0]), Some(260));
    }

    #[test]
    fn max_len_field_encodes() {
        assert_eq!(
            encode_header(FrameType::Data, MAX_LEN_FIELD),
            [1, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    #[should_panic(expected = "24-bit")]
    fn oversized_encode_panics() {
        encode_header(FrameType::Data, MAX_LEN_FIELD + 1);
    }

    #[test]
    fn frame_buf_trickle() {
        let mut wire = Vec::new();
        for i in 0..1000u32 {
            encode(FrameType::Data, &i.to_be_bytes(), &mut wire);
        }
        encode_close(close_code::NORMAL, "done", &mut wire);
        let mut fb = FrameBuf::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            fb.push(chunk);
            while let Some(f) = fb.next(16).unwrap() {
                got.push(f);
            }
            // Never holds much more than one frame plus one chunk.
            assert!(fb.buf.len() <= 2 * (7 + 8 + HEADER_LEN), "{}", fb.buf.len());
        }
        assert_eq!(got.len(), 1001);
        for (i, f) in got[..1000].iter().enumerate() {
            assert_eq!(f, &OwnedFrame::Data((i as u32).to_be_bytes().to_vec()));
        }
        assert_eq!(
            got[1000],
            OwnedFrame::Close {
                code: 1000,
                reason: "done".into()
            }
        );
        assert_eq!(fb.buffered(), 0);
    }

    fn owned_frame() -> impl Strategy<Value = OwnedFrame> {
        let payload = proptest::collection::vec(any::<u8>(), 0..300);
        prop_oneof![
            payload.clone().prop_map(OwnedFrame::Data),
            payload.clone().prop_map(OwnedFrame::Ping),
            payload.clone().prop_map(OwnedFrame::Pong),
            payload.prop_map(OwnedFrame::GoAway),
            (any::<u16>(), ".{0,40}").prop_map(|(code, reason)| OwnedFrame::Close { code, reason }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(f in owned_frame()) {
            let mut out = Vec::new();
            f.as_frame().encode(&mut out);
            prop_assert_eq!(decode(&out, 1024), Ok(Some((f.as_frame(), out.len()))));
            for cut in 0..out.len() {
                prop_assert_eq!(decode(&out[..cut], 1024), Ok(None));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..64) {
            if let Ok(Some((frame, used))) = decode(&bytes, max) {
                // The encoding is canonical: re-encoding gives back the bytes consumed.
                let mut out = Vec::new();
                frame.encode(&mut out);
                prop_assert_eq!(&out[..], &bytes[..used]);
                prop_assert_eq!(peek_len(&bytes), Some(used));
            }
        }

        #[test]
        fn frame_buf_any_split(frames in proptest::collection::vec(owned_frame(), 0..20), chunk in 1usize..50) {
            let mut wire = Vec::new();
            for f in &frames {
                f.as_frame().encode(&mut wire);
            }
            let mut fb = FrameBuf::new();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                fb.push(c);
                while let Some(f) = fb.next(1024).unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, frames);
        }
    }
}
