//! RFC 6455 frames: the zero-copy, unmask-in-place decoder for client frames and the
//! encoders for server frames (unmasked) and, for tests and load generators, client
//! frames (masked).
//!
//! The decoder checks each header rule as soon as the byte it needs is present and never
//! allocates; it must not be handed a frame the gateway has not received whole (it
//! answers `Ok(None)` until it is). No extension is ever negotiated, so the RSV bits are
//! always an error.

use super::WsError;

/// Largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest close reason: a control payload less the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// Largest header of a server frame: 2 bytes, 8-byte extended length, no mask.
pub const MAX_SERVER_HEADER_LEN: usize = 10;
/// Largest header of a client frame: 2 bytes, 8-byte extended length, 4-byte mask.
pub const MAX_CLIENT_HEADER_LEN: usize = 14;

const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const MASK: u8 = 0x80;

/// A frame's opcode.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// The next fragment of a fragmented message.
    Continuation = 0x0,
    /// The first (or only) frame of a text message: UTF-8.
    Text = 0x1,
    /// The first (or only) frame of a binary message.
    Binary = 0x2,
    /// The closing handshake: optional 2-byte code and UTF-8 reason.
    Close = 0x8,
    /// A heartbeat; answered with a pong carrying the same payload.
    Ping = 0x9,
    /// The answer to a ping (or an unsolicited heartbeat).
    Pong = 0xA,
}

impl Opcode {
    /// The opcode for the low 4 bits of a frame's first byte, or `None` if RFC 6455
    /// defines none.
    pub fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong: never fragmented, at most 125 bytes, allowed between the
    /// fragments of a message.
    pub fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// A decoded frame whose payload, already unmasked, borrows the decode buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WsFrame<'a> {
    /// The last frame of its message (always set on control frames).
    pub fin: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// The unmasked payload.
    pub payload: &'a [u8],
}

/// Decodes the client frame at the start of `buf` and unmasks its payload in place.
///
/// `Ok(None)` means more bytes are needed. Each header rule is checked as soon as its
/// byte is present: RSV bits, opcode and a control frame's FIN from the first byte, the
/// mask bit from the second, the length once the extended length is complete. A data
/// frame announcing more than `max_payload` bytes is refused then, before its payload
/// arrives (pass [`MessageAssembler::frame_limit`](super::MessageAssembler::frame_limit)
/// so the message limit is enforced as early); control frames are held to 125 bytes by
/// the protocol instead. Non-minimal length encodings are accepted, as RFC 6455 allows.
///
/// On success returns the frame and the number of bytes it took. The masking key in
/// `buf` is zeroed once the payload is unmasked, so decoding the same bytes again yields
/// the same frame rather than re-masked garbage.
pub fn decode_frame(
    buf: &mut [u8],
    max_payload: usize,
) -> Result<Option<(WsFrame<'_>, usize)>, WsError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    if b0 & RSV != 0 {
        return Err(WsError::ReservedBits((b0 & RSV) >> 4));
    }
    let op = b0 & 0x0f;
    let opcode = Opcode::from_u8(op).ok_or(WsError::UnknownOpcode(op))?;
    let fin = b0 & FIN != 0;
    if opcode.is_control() && !fin {
        return Err(WsError::FragmentedControl(op));
    }
    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    if b1 & MASK == 0 {
        return Err(WsError::Unmasked);
    }
    let (len, ext) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 2),
            _ => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(l) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(l);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(WsError::LengthOverflow);
                }
                (len, 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    let limit = if opcode.is_control() {
        MAX_CONTROL_PAYLOAD
    } else {
        max_payload
    };
    let too_long = |len: u64| {
        if opcode.is_control() {
            WsError::ControlTooLong(len)
        } else {
            WsError::FrameTooLarge {
                len,
                max: max_payload,
            }
        }
    };
    // `len` fits a usize once it is under a usize limit.
    let len_usize = usize::try_from(len).map_err(|_| too_long(len))?;
    if len_usize > limit {
        return Err(too_long(len));
    }
    let header_len: usize = 2 + ext + 4;
    let total = header_len.checked_add(len_usize).ok_or(too_long(len))?;
    if buf.len() < total {
        return Ok(None);
    }
    let (head, rest) = buf.split_at_mut(header_len);
    let key_bytes = &mut head[2 + ext..];
    let key = [key_bytes[0], key_bytes[1], key_bytes[2], key_bytes[3]];
    key_bytes.fill(0);
    let payload = &mut rest[..len_usize];
    apply_mask(payload, key);
    Ok(Some((
        WsFrame {
            fin,
            opcode,
            payload,
        },
        total,
    )))
}

/// XORs `data` with the 4-byte masking `key`, starting at key offset 0 (masking and
/// unmasking are the same operation).
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    if key == [0; 4] {
        return;
    }
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Each chunk is 8 bytes, so the remainder starts at key offset 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// The header bytes of one frame, built by [`frame_header`], for callers that write the
/// payload separately (for instance straight into a TLS record).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    bytes: [u8; MAX_CLIENT_HEADER_LEN],
    len: u8,
}

impl FrameHeader {
    /// The header as it goes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The header of a frame carrying `payload_len` bytes, masked with `mask` when given
/// (client frames) and unmasked otherwise (server frames). Lengths use the minimal
/// encoding.
///
/// # Panics
/// If a control opcode comes without `fin` or with more than 125 bytes: such a frame
/// would break the connection, so asking for one is a bug in the caller.
pub fn frame_header(
    opcode: Opcode,
    fin: bool,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) -> FrameHeader {
    assert!(
        !opcode.is_control() || (fin && payload_len <= MAX_CONTROL_PAYLOAD),
        "control frame {opcode:?} must have FIN and at most 125 bytes, got fin={fin} len={payload_len}"
    );
    let mut bytes = [0u8; MAX_CLIENT_HEADER_LEN];
    bytes[0] = if fin { FIN } else { 0 } | opcode as u8;
    let mask_bit = if mask.is_some() { MASK } else { 0 };
    let mut len = 2;
    if payload_len < 126 {
        // Under 126, so the cast keeps every bit.
        bytes[1] = mask_bit | payload_len as u8;
    } else if let Ok(l) = u16::try_from(payload_len) {
        bytes[1] = mask_bit | 126;
        bytes[2..4].copy_from_slice(&l.to_be_bytes());
        len = 4;
    } else {
        bytes[1] = mask_bit | 127;
        bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        len = 10;
    }
    if let Some(key) = mask {
        bytes[len..len + 4].copy_from_slice(&key);
        len += 4;
    }
    FrameHeader {
        bytes,
        len: len as u8,
    }
}

/// Appends a server frame (unmasked) to `out`.
///
/// # Panics
/// As [`frame_header`]: a control frame without `fin` or over 125 bytes.
pub fn encode_frame(opcode: Opcode, fin: bool, payload: &[u8], out: &mut Vec<u8>) {
    let header = frame_header(opcode, fin, payload.len(), None);
    out.reserve(header.as_bytes().len() + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
}

/// Appends a client frame, its payload masked with `mask`, to `out`: what a browser
/// sends. For tests and load generators; the gateway never masks.
///
/// # Panics
/// As [`frame_header`].
pub fn encode_client_frame(
    opcode: Opcode,
    fin: bool,
    payload: &[u8],
    mask: [u8; 4],
    out: &mut Vec<u8>,
) {
    let header = frame_header(opcode, fin, payload.len(), Some(mask));
    out.reserve(header.as_bytes().len() + payload.len());
    out.extend_from_slice(header.as_bytes());
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Appends a whole (unfragmented) text message to `out`.
pub fn encode_text(text: &str, out: &mut Vec<u8>) {
    encode_frame(Opcode::Text, true, text.as_bytes(), out);
}

/// Appends a whole (unfragmented) binary message to `out`.
pub fn encode_binary(data: &[u8], out: &mut Vec<u8>) {
    encode_frame(Opcode::Binary, true, data, out);
}

/// Appends a ping to `out`.
///
/// # Panics
/// If `payload` is over 125 bytes.
pub fn encode_ping(payload: &[u8], out: &mut Vec<u8>) {
    encode_frame(Opcode::Ping, true, payload, out);
}

/// Appends a pong to `out`; the answer to a ping carries the ping's payload.
///
/// # Panics
/// If `payload` is over 125 bytes.
pub fn encode_pong(payload: &[u8], out: &mut Vec<u8>) {
    encode_frame(Opcode::Pong, true, payload, out);
}

/// Appends a close frame with `code` and `reason` to `out`. A reason over 123 bytes is
/// cut at the last character boundary that fits, so a worker's long reason cannot make
/// the frame illegal. To answer a close that carried no code, send
/// `encode_frame(Opcode::Close, true, &[], out)` instead.
///
/// `code` must be one that may go on the wire ([`is_valid_close_code`]); 1005, 1006 and
/// 1015 only ever describe a close locally.
///
/// [`is_valid_close_code`]: super::is_valid_close_code
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    debug_assert!(
        super::is_valid_close_code(code),
        "close code {code} may not be sent"
    );
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = &reason.as_bytes()[..cut];
    let header = frame_header(Opcode::Close, true, 2 + reason.len(), None);
    out.reserve(header.as_bytes().len() + 2 + reason.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}
