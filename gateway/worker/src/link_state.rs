//! The I/O-free half of a link, shared by the blocking [`crate::Link`] and the async
//! [`crate::async_link::AsyncLink`]: the read buffer and the envelope decoding out of it
//! (with HELLO and heartbeat handling), and the write buffer that queued messages are
//! encoded onto. The wrappers own the socket and do the reads and writes.

use holdfast_wire::envelope::{self, Hello, Kind, Message, Role};
use holdfast_wire::ConnId;

use crate::{Event, LinkError, PeerHello};

/// The smallest free space a read is offered; below it the buffer is compacted or grown.
pub(crate) const MIN_READ: usize = 64 * 1024;

/// Buffers, HELLO state and payload limit of one link.
#[derive(Debug)]
pub(crate) struct LinkState {
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    peer: Option<PeerHello>,
    max_payload: usize,
}

impl LinkState {
    /// Empty buffers, with our HELLO (role worker, named `name`) already queued.
    pub(crate) fn new(name: &str) -> LinkState {
        let mut state = LinkState {
            rbuf: vec![0; MIN_READ],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(MIN_READ),
            peer: None,
            max_payload: envelope::DEFAULT_MAX_PAYLOAD,
        };
        state.queue(&Message::Hello(Hello {
            version: envelope::VERSION,
            role: Role::Worker,
            core: 0,
            cores: 0,
            name,
        }));
        state
    }

    pub(crate) fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max;
    }

    pub(crate) fn peer(&self) -> Option<&PeerHello> {
        self.peer.as_ref()
    }

    /// The next event already buffered; `Ok(None)` when the buffer holds no whole event.
    /// HELLO and heartbeats met on the way are handled.
    pub(crate) fn try_recv(&mut self) -> Result<Option<Event>, LinkError> {
        loop {
            let Some(event) = self.decode_one()? else {
                return Ok(None);
            };
            if let Some(event) = event {
                return Ok(Some(event));
            }
        }
    }

    /// Decodes and consumes one buffered envelope: `Ok(None)` when the buffer holds no
    /// whole envelope, else the event it carries (`None` for HELLO and heartbeats).
    pub(crate) fn decode_one(&mut self) -> Result<Option<Option<Event>>, LinkError> {
        let buf = &self.rbuf[self.rstart..self.rend];
        let Some((event, used)) =
            decode_event(buf, self.max_payload, &mut self.peer, &mut self.wbuf)?
        else {
            return Ok(None);
        };
        self.rstart += used;
        Ok(Some(event))
    }

    /// Bytes read and not yet decoded.
    pub(crate) fn buffered(&self) -> usize {
        self.rend - self.rstart
    }

    /// What `recv` returns once the gateway has closed the link: `Ok(None)` if it did so
    /// between envelopes, else [`LinkError::Truncated`].
    pub(crate) fn end_of_stream(&self) -> Result<Option<Event>, LinkError> {
        match self.buffered() {
            0 => Ok(None),
            buffered => Err(LinkError::Truncated { buffered }),
        }
    }

    /// The free space for the next read, compacting or growing the buffer to make room
    /// for at least the envelope being assembled, and a good-sized read. Report what was
    /// read into it with [`LinkState::filled`].
    pub(crate) fn read_space(&mut self) -> &mut [u8] {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        let want = envelope::peek_len(&self.rbuf[self.rstart..self.rend])
            .unwrap_or(0)
            .max(self.rend - self.rstart + MIN_READ);
        if self.rbuf.len() - self.rstart < want {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
            if self.rbuf.len() < want {
                self.rbuf.resize(want, 0);
            }
        }
        &mut self.rbuf[self.rend..]
    }

    /// Records that `n` bytes were read into [`LinkState::read_space`].
    pub(crate) fn filled(&mut self, n: usize) {
        self.rend += n;
    }

    pub(crate) fn send(&mut self, conn: ConnId, text: bool, payload: &[u8]) {
        self.queue(&Message::Send {
            conn,
            flags: text_flag(text),
            payload,
        });
    }

    pub(crate) fn close(&mut self, conn: ConnId, code: u16, reason: &str) {
        self.queue(&Message::Close {
            conn,
            seq: 0,
            link_seq: 0,
            code,
            reason,
        });
    }

    pub(crate) fn ack(&mut self, link_seq: u64) {
        self.queue(&Message::Ack { link_seq });
    }

    pub(crate) fn subscribe(&mut self, conn: ConnId, topic: &[u8]) {
        self.queue(&Message::Subscribe { conn, topic });
    }

    pub(crate) fn unsubscribe(&mut self, conn: ConnId, topic: &[u8]) {
        self.queue(&Message::Unsubscribe { conn, topic });
    }

    pub(crate) fn publish(&mut self, topic: &[u8], text: bool, payload: &[u8]) {
        self.queue(&Message::Publish {
            flags: text_flag(text),
            topic,
            payload,
        });
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued(&self) -> usize {
        self.wbuf.len()
    }

    /// The queued bytes, oldest first.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.wbuf
    }

    /// Drops the first `n` queued bytes (written, or given up on).
    pub(crate) fn consume(&mut self, n: usize) {
        self.wbuf.drain(..n);
    }

    fn queue(&mut self, msg: &Message<'_>) {
        envelope::encode(msg, &mut self.wbuf);
    }
}

/// Decodes one envelope from the front of `buf`: `Ok(None)` when `buf` holds no whole
/// envelope, else the event it carries (`None` for HELLO and heartbeats, which are handled
/// here: the HELLO is checked and stored in `peer`, a heartbeat's reply is queued on
/// `wbuf`) and how many bytes it took.
fn decode_event(
    buf: &[u8],
    max_payload: usize,
    peer: &mut Option<PeerHello>,
    wbuf: &mut Vec<u8>,
) -> Result<Option<(Option<Event>, usize)>, LinkError> {
    let Some((msg, used)) = envelope::decode(buf, max_payload)? else {
        return Ok(None);
    };
    let event = match msg {
        Message::Hello(h) => {
            if peer.is_some() {
                return Err(unexpected(Kind::Hello, "twice"));
            }
            if h.role != Role::Gateway {
                return Err(unexpected(Kind::Hello, "with the worker role"));
            }
            if h.version != envelope::VERSION {
                return Err(LinkError::Version {
                    ours: envelope::VERSION,
                    theirs: h.version,
                });
            }
            *peer = Some(PeerHello {
                version: h.version,
                core: h.core,
                cores: h.cores,
                name: h.name.to_owned(),
            });
            None
        }
        _ if peer.is_none() => return Err(unexpected(msg.kind(), "before HELLO")),
        Message::Heartbeat { nonce, reply } => {
            if !reply {
                envelope::encode(&Message::Heartbeat { nonce, reply: true }, wbuf);
            }
            None
        }
        Message::Open(o) => Some(Event::Open {
            conn: o.conn,
            link_seq: o.link_seq,
            peer: o.peer,
            sni: o.sni.map(str::to_owned),
            alpn: o.alpn.map(<[u8]>::to_vec),
            client_identity: o.client_identity.map(<[u8]>::to_vec),
        }),
        Message::Frame {
            conn,
            seq,
            link_seq,
            flags,
            payload,
        } => Some(Event::Frame {
            conn,
            seq,
            link_seq,
            text: flags & envelope::flags::TEXT != 0,
            payload: payload.to_vec(),
        }),
        Message::Close {
            conn,
            seq,
            link_seq,
            code,
            reason,
        } => Some(Event::Close {
            conn,
            seq,
            link_seq,
            code,
            reason: reason.to_owned(),
        }),
        Message::Ack { .. }
        | Message::Send { .. }
        | Message::Subscribe { .. }
        | Message::Unsubscribe { .. }
        | Message::Publish { .. } => return Err(unexpected(msg.kind(), "which only workers send")),
    };
    Ok(Some((event, used)))
}

fn unexpected(kind: Kind, what: &'static str) -> LinkError {
    LinkError::Unexpected { kind, what }
}

fn text_flag(text: bool) -> u8 {
    if text {
        envelope::flags::TEXT
    } else {
        0
    }
}

/// Removes a socket file left at `path` by an earlier run, so the listener can bind there;
/// any other kind of file is left alone and reported.
pub(crate) fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not removing it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Who may reach a worker socket: the file mode it is created with, and the gateway's
/// credentials (SO_PEERCRED) a connecting process must have.
///
/// ```
/// use holdfast_worker::SocketAccess;
///
/// // Only processes of uid 998 (the gateway's user), socket mode 0660.
/// let access = SocketAccess::default().allow_uid(998);
/// assert!(access.allows(998, 998));
/// assert!(!access.allows(1000, 998));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file (connecting needs write permission).
    pub mode: u32,
    /// The uid a peer must have; `None` allows any the mode lets in.
    pub uid: Option<u32>,
    /// The gid a peer must have; `None` allows any the mode lets in.
    pub gid: Option<u32>,
}

impl Default for SocketAccess {
    /// Mode 0660 (owner and group: run the worker in a group the gateway's user is in),
    /// any peer credentials.
    fn default() -> Self {
        SocketAccess {
            mode: 0o660,
            uid: None,
            gid: None,
        }
    }
}

impl SocketAccess {
    /// The socket file's permission bits.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode & 0o777;
        self
    }

    /// Only peers with this uid may link.
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Only peers with this gid may link.
    pub fn allow_gid(mut self, gid: u32) -> Self {
        self.gid = Some(gid);
        self
    }

    /// Whether a peer with these credentials may link.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uid.is_none_or(|u| u == uid) && self.gid.is_none_or(|g| g == gid)
    }

    /// Sets the socket file's mode after bind.
    pub(crate) fn apply(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))
    }

    /// Checks a connected peer's SO_PEERCRED; an error (PermissionDenied) names them.
    pub(crate) fn check(&self, fd: impl std::os::fd::AsFd) -> std::io::Result<()> {
        if self.uid.is_none() && self.gid.is_none() {
            return Ok(());
        }
        let cred = rustix::net::sockopt::socket_peercred(fd)?;
        let (uid, gid) = (cred.uid.as_raw(), cred.gid.as_raw());
        if self.allows(uid, gid) {
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "peer pid {} uid {uid} gid {gid} is not the allowed gateway (uid {:?}, gid {:?})",
                cred.pid.as_raw_nonzero(),
                self.uid,
                self.gid
            ),
        ))
    }
}
