//! The state format of a live upgrade (`holdfast upgrade`): how one core's listener,
//! connections, worker-link backlog and counters travel from the old process to the new
//! one over that core's upgrade socket. Pure: bytes in, bytes out; the sockets, the file
//! descriptors (SCM_RIGHTS) and the processes are `upgrade.rs` and `core.rs`.
//!
//! The stream of one core is a sequence of frames, `[len u32][kind u8][body]` (little
//! endian, `len` counts kind and body), cut into socket messages of at most [`CHUNK`]
//! bytes. A frame that names descriptors ([`HEADER`]: the listener; [`CONNS`]: one socket
//! per connection) has them attached to its first message, in the order its body names
//! them, so a receiver holds them by the time the frame is complete.
//!
//! Versioning: the control socket's offer carries [`FORMAT`]; a new binary that does not
//! speak it refuses before anything moves, and the old process keeps serving. Inside a
//! format version every record is read field by field with bounds checks ([`Reader`]),
//! so a malformed stream is an error, never a misread connection.
#![forbid(unsafe_code)]

/// The version of everything in this module. Bump it on any change of layout.
pub const FORMAT: u32 = 1;

/// The largest socket message (SOCK_SEQPACKET keeps each one whole; the default socket
/// buffers take it).
pub const CHUNK: usize = 32 * 1024;

/// Most descriptors attached to one message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 200;

// Frame kinds of a core's stream, old to new.
/// Format version, core index, the old core's clock, worker paths; the listener attached.
pub const HEADER: u8 = b'H';
/// A batch of connections, one socket attached per connection.
pub const CONNS: u8 = b'C';
/// Generations, topics, unacknowledged envelopes, counters: after the last batch.
pub const END: u8 = b'E';
/// A worker's message that reached the old core after the hand-over (worker index, then
/// the envelope as the worker sent it).
pub const LATE: u8 = b'W';
/// The old core closed its worker links: nothing more follows.
pub const DONE: u8 = b'Z';

/// A malformed or truncated hand-over stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the hand-over state ends early ({0})")]
    Truncated(&'static str),
    #[error("the hand-over state is invalid: {0}")]
    Invalid(String),
}

/// Appends fields in the format's byte order.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    /// A length-prefixed (u32) byte string.
    fn put_bytes(&mut self, v: &[u8]);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_bytes(&mut self, v: &[u8]) {
        // Every byte string here is bounded far below 4 GiB (a connection's outbound
        // bytes are capped at `limits.max_outbound_per_conn`, at most 1 GiB).
        self.put_u32(v.len() as u32);
        self.extend_from_slice(v);
    }
}

/// Reads fields back, each bounds-checked; `what` names the field in the error.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.at >= self.buf.len()
    }

    /// What is left, unread.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.at..]
    }

    /// Skips `n` bytes that another decoder read from [`Reader::rest`].
    pub fn advance(&mut self, n: usize, what: &'static str) -> Result<(), FormatError> {
        self.take(n, what).map(|_| ())
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(FormatError::Truncated(what))?;
        let b = &self.buf[self.at..end];
        self.at = end;
        Ok(b)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("two bytes"),
        ))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("four bytes"),
        ))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("eight bytes"),
        ))
    }

    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], FormatError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, FormatError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(FormatError::Invalid(format!(
                "{what}: {b} is not a boolean"
            ))),
        }
    }

    pub fn str(&mut self, what: &'static str) -> Result<&'a str, FormatError> {
        std::str::from_utf8(self.bytes(what)?)
            .map_err(|_| FormatError::Invalid(format!("{what}: not UTF-8")))
    }
}

/// Encodes one frame of a core's stream.
pub fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + body.len());
    f.put_u32(body.len() as u32 + 1);
    f.push(kind);
    f.extend_from_slice(body);
    f
}

/// Reassembles frames from socket messages.
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
    start: usize,
}

impl Frames {
    pub fn new() -> Frames {
        Frames::default()
    }

    /// One received message's bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole frame (kind, body), if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, FormatError> {
        let avail = &self.buf[self.start..];
        let Some(len) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(len.try_into().expect("four bytes")) as usize;
        if len == 0 {
            return Err(FormatError::Invalid("a frame without a kind".into()));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let kind = avail[4];
        let body = avail[5..4 + len].to_vec();
        self.start += 4 + len;
        Ok(Some((kind, body)))
    }

    /// Bytes received that do not make a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Socket addresses as they travel: family byte (0 none, 4, 6), address, port.
pub fn put_addr(out: &mut Vec<u8>, addr: Option<std::net::SocketAddr>) {
    match addr {
        None => out.put_u8(0),
        Some(std::net::SocketAddr::V4(a)) => {
            out.put_u8(4);
            out.extend_from_slice(&a.ip().octets());
            out.put_u16(a.port());
        }
        Some(std::net::SocketAddr::V6(a)) => {
            out.put_u8(6);
            out.extend_from_slice(&a.ip().octets());
            out.put_u16(a.port());
        }
    }
}

pub fn get_addr(r: &mut Reader<'_>) -> Result<Option<std::net::SocketAddr>, FormatError> {
    Ok(match r.u8("address family")? {
        0 => None,
        4 => {
            let ip: [u8; 4] = r.take(4, "IPv4 address")?.try_into().expect("four");
            Some((std::net::Ipv4Addr::from(ip), r.u16("port")?).into())
        }
        6 => {
            let ip: [u8; 16] = r.take(16, "IPv6 address")?.try_into().expect("sixteen");
            Some((std::net::Ipv6Addr::from(ip), r.u16("port")?).into())
        }
        f => return Err(FormatError::Invalid(format!("address family {f}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_reassembled_from_any_cut() {
        let mut stream = frame(HEADER, b"first");
        stream.extend(frame(CONNS, &[7; 100]));
        stream.extend(frame(DONE, b""));
        for cut in [1, 3, 5, 17, 64, stream.len()] {
            let mut frames = Frames::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(cut) {
                frames.push(chunk);
                while let Some(f) = frames.next_frame().expect("well-formed") {
                    got.push(f);
                }
            }
            assert_eq!(frames.pending(), 0);
            assert_eq!(
                got,
                vec![
                    (HEADER, b"first".to_vec()),
                    (CONNS, vec![7; 100]),
                    (DONE, Vec::new())
                ],
                "cut every {cut} bytes"
            );
        }
        let mut bad = Frames::new();
        bad.push(&[0, 0, 0, 0, 9]);
        assert!(bad.next_frame().is_err(), "a zero length is refused");
    }

    #[test]
    fn fields_round_trip_and_truncation_is_an_error() {
        let mut out = Vec::new();
        out.put_u8(1);
        out.put_u16(0xBEEF);
        out.put_u32(7);
        out.put_u64(u64::MAX);
        out.put_bytes(b"topic");
        put_addr(&mut out, Some("10.1.2.3:4567".parse().expect("addr")));
        put_addr(&mut out, Some("[2001:db8::1]:80".parse().expect("addr")));
        put_addr(&mut out, None);
        let mut r = Reader::new(&out);
        assert!(r.bool("b").expect("bool"));
        assert_eq!(r.u16("a").expect("u16"), 0xBEEF);
        assert_eq!(r.u32("b").expect("u32"), 7);
        assert_eq!(r.u64("c").expect("u64"), u64::MAX);
        assert_eq!(r.str("d").expect("str"), "topic");
        assert_eq!(
            get_addr(&mut r).expect("v4"),
            Some("10.1.2.3:4567".parse().expect("addr"))
        );
        assert_eq!(
            get_addr(&mut r).expect("v6"),
            Some("[2001:db8::1]:80".parse().expect("addr"))
        );
        assert_eq!(get_addr(&mut r).expect("none"), None);
        assert!(r.is_empty());
        for cut in 0..out.len() {
            let mut r = Reader::new(&out[..cut]);
            let all = (|| -> Result<(), FormatError> {
                r.bool("b")?;
                r.u16("a")?;
                r.u32("b")?;
                r.u64("c")?;
                r.str("d")?;
                for _ in 0..3 {
                    get_addr(&mut r)?;
                }
                Ok(())
            })();
            assert!(all.is_err(), "a stream cut at {cut} is refused");
        }
        // A length that points past the end is refused, not trusted.
        let mut lying = Vec::new();
        lying.put_u32(1 << 30);
        assert!(Reader::new(&lying).bytes("x").is_err());
    }
}
