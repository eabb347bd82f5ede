//! WebSocket (RFC 6455), server side, without I/O: the HTTP/1.1 Upgrade handshake, the
//! frame codec and the per-connection message assembler. Browsers reach the gateway
//! through this module; `docs/websocket.md` says what they see.
//!
//! The gateway's ring loop drives it after TLS. Every buffer belongs to the caller:
//! [`parse_upgrade`] reads the request in place and hands back borrowed views,
//! [`decode_frame`] unmasks a frame in the caller's buffer and lends its payload out,
//! and [`MessageAssembler`] (2 bytes) appends the fragments of a fragmented message to a
//! `Vec` the caller owns, so an idle connection holds no WebSocket memory beyond the
//! assembler and an empty `Vec`. Nothing here reads a socket, keeps a clock or
//! allocates on the decode path; the encoders append to the caller's `Vec`. Keepalive
//! pings and idle closes are the gateway's timers, not this module's.
//!
//! Decoding is strict and early: a header that breaks a rule is refused as soon as the
//! byte that breaks it is present, and an oversized frame before its payload arrives.
//! Each refusal is a [`WsError`] that names the close code to send
//! ([`WsError::close_code`]); a refused handshake is a [`HandshakeError`] that writes
//! its own HTTP answer ([`HandshakeError::http_response`]).

mod frame;
mod handshake;
mod message;

pub use frame::{
    apply_mask, decode_frame, encode_binary, encode_client_frame, encode_close, encode_frame,
    encode_ping, encode_pong, encode_text, frame_header, FrameHeader, Opcode, WsFrame,
    MAX_CLIENT_HEADER_LEN, MAX_CLOSE_REASON, MAX_CONTROL_PAYLOAD, MAX_SERVER_HEADER_LEN,
};
pub use handshake::{
    accept_key, parse_upgrade, write_accept_response, HandshakeConfig, HandshakeError, Upgrade,
    ACCEPT_KEY_LEN, GUID, MAX_REQUEST_LEN,
};
pub use message::{is_valid_close_code, Event, MessageAssembler};

/// The close codes, shared with the native protocol (`crate::frame::close_code`): both
/// client protocols report the same numbers.
pub use crate::frame::close_code;

use thiserror::Error;

/// Why a WebSocket frame or message was refused. The connection ends with the close code
/// that [`WsError::close_code`] names: 1002 for a broken framing rule, 1007 for a payload
/// that is not what its frame says (text that is not UTF-8), 1009 for a frame or message
/// over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WsError {
    /// A client frame without the mask bit (RFC 6455 5.1: clients mask every frame).
    #[error("client frame is not masked")]
    Unmasked,
    /// RSV1-3 set (the value, 1 to 7) though no extension was negotiated.
    #[error("reserved bits {0:#05b} set but no extension was negotiated")]
    ReservedBits(u8),
    /// An opcode RFC 6455 does not define (3-7 and 0xB-0xF).
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame (close, ping, pong) without FIN: control frames are never
    /// fragmented.
    #[error(
        "control frame with opcode {0:#x} has no FIN bit: control frames cannot be fragmented"
    )]
    FragmentedControl(u8),
    /// A control frame whose payload is over 125 bytes.
    #[error("control frame payload of {0} bytes is over the 125-byte maximum")]
    ControlTooLong(u64),
    /// A 64-bit payload length with its most significant bit set.
    #[error("64-bit payload length has its most significant bit set")]
    LengthOverflow,
    /// A data frame whose announced length is over the limit the caller passed; refused
    /// from the header alone.
    #[error("frame payload of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// Payload length the header announced.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// A message whose fragments add up to more than the message limit.
    #[error("message of at least {len} bytes is over the limit of {max} bytes")]
    MessageTooLarge {
        /// Message bytes counted when the limit was passed.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A continuation frame with no fragmented message open.
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is still open.
    #[error("new data frame while a fragmented message is still open")]
    MessageInterleaved,
    /// A text message (or fragment of one) that is not valid UTF-8, including a message
    /// that ends inside a code point.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A close frame whose payload is exactly 1 byte (a code takes 2).
    #[error("close frame payload of 1 byte: a close code takes 2")]
    CloseTooShort,
    /// A close code that may not appear on the wire (under 1000, 1004-1006, 1015,
    /// 1016-2999, 5000 and over).
    #[error("close code {0} may not be sent on the wire")]
    InvalidCloseCode(u16),
    /// A close reason that is not valid UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl WsError {
    /// The close code the gateway sends before closing the connection for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::InvalidUtf8 | WsError::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            WsError::FrameTooLarge { .. } | WsError::MessageTooLarge { .. } => {
                close_code::TOO_LARGE
            }
            WsError::Unmasked
            | WsError::ReservedBits(_)
            | WsError::UnknownOpcode(_)
            | WsError::FragmentedControl(_)
            | WsError::ControlTooLong(_)
            | WsError::LengthOverflow
            | WsError::UnexpectedContinuation
            | WsError::MessageInterleaved
            | WsError::CloseTooShort
            | WsError::InvalidCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

#[cfg(test)]
mod tests;
