//! One core's link to one routing worker: its socket, its receive buffer, its outbound
//! queue and its link sequence. The core's event loop does the I/O; this module only
//! encodes envelopes into the queue and keeps the buffers, so that batching (many
//! frames, one send) happens in one place.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

use holdfast_wire::envelope::{self, Hello, Message, Open, Role};
use holdfast_wire::ConnId;

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No socket; reconnect at `retry_at`.
    Down,
    /// Connected, HELLO sent; frames may be queued.
    Up,
    /// Shut down after an error; waiting for in-flight operations before the socket closes.
    Closing,
}

const INITIAL_RBUF: usize = 64 * 1024;

pub struct Link {
    pub path: PathBuf,
    pub state: LinkState,
    pub fd: Option<OwnedFd>,
    /// Bumped at every reconnect; completions carry it so a late one is recognised.
    pub epoch: u32,
    pub retry_at: Instant,
    /// Received bytes: `rbuf[..rlen]` are unparsed.
    pub rbuf: Vec<u8>,
    pub rlen: usize,
    pub recv_inflight: bool,
    /// Bytes being sent (frozen while `send_inflight`) and the part already sent.
    pub out: Vec<u8>,
    pub out_off: usize,
    /// Envelopes queued while a send is in flight; swapped into `out` when it completes.
    pub queued: Vec<u8>,
    pub send_inflight: bool,
    /// Link sequence of the last reliable envelope (OPEN, FRAME, CLOSE) queued.
    pub link_seq: u64,
    /// Highest cumulative ACK the worker sent.
    pub acked: u64,
    /// The worker's HELLO arrived.
    pub hello_seen: bool,
    pub down_logged: bool,
}

impl Link {
    pub fn new(path: PathBuf) -> Link {
        Link {
            path,
            state: LinkState::Down,
            fd: None,
            epoch: 0,
            retry_at: Instant::now(),
            rbuf: Vec::new(),
            rlen: 0,
            recv_inflight: false,
            out: Vec::new(),
            out_off: 0,
            queued: Vec::new(),
            send_inflight: false,
            link_seq: 0,
            acked: 0,
            hello_seen: false,
            down_logged: false,
        }
    }

    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// A new socket is connected: reset the buffers and queue our HELLO.
    pub fn connected(&mut self, fd: OwnedFd, core: u8, cores: u8, name: &str) {
        self.fd = Some(fd);
        self.state = LinkState::Up;
        self.epoch = (self.epoch + 1) & ConnId::MAX_GENERATION;
        self.rbuf = vec![0; INITIAL_RBUF];
        self.rlen = 0;
        self.out.clear();
        self.out_off = 0;
        self.queued.clear();
        self.hello_seen = false;
        self.down_logged = false;
        envelope::encode(
            &Message::Hello(Hello {
                version: envelope::VERSION,
                role: Role::Gateway,
                core,
                cores,
                name,
            }),
            &mut self.queued,
        );
    }

    /// Bytes waiting to go to the worker.
    pub fn backlog(&self) -> usize {
        self.out.len() - self.out_off + self.queued.len()
    }

    pub fn queue_open(
        &mut self,
        conn: ConnId,
        peer: SocketAddr,
        sni: Option<&str>,
        alpn: Option<&[u8]>,
    ) {
        self.link_seq += 1;
        envelope::encode(
            &Message::Open(Open {
                conn,
                link_seq: self.link_seq,
                peer,
                sni,
                alpn,
                client_identity: None,
            }),
            &mut self.queued,
        );
    }

    pub fn queue_frame(&mut self, conn: ConnId, seq: u64, flags: u8, payload: &[u8]) {
        self.link_seq += 1;
        envelope::encode_frame_header(
            conn,
            seq,
            self.link_seq,
            flags,
            payload.len(),
            &mut self.queued,
        );
        self.queued.extend_from_slice(payload);
    }

    pub fn queue_close(&mut self, conn: ConnId, seq: u64, code: u16, reason: &str) {
        self.link_seq += 1;
        envelope::encode(
            &Message::Close {
                conn,
                seq,
                link_seq: self.link_seq,
                code,
                reason,
            },
            &mut self.queued,
        );
    }

    /// Tells the worker that a connection it named is gone (unknown or stale id).
    pub fn queue_gone(&mut self, conn: ConnId) {
        envelope::encode(
            &Message::Close {
                conn,
                seq: 0,
                link_seq: 0,
                code: holdfast_wire::frame::close_code::GOING_AWAY,
                reason: "unknown connection",
            },
            &mut self.queued,
        );
    }

    pub fn queue_heartbeat_reply(&mut self, nonce: u64) {
        envelope::encode(&Message::Heartbeat { nonce, reply: true }, &mut self.queued);
    }

    /// Makes room for an envelope of `total` bytes at the end of the receive buffer,
    /// compacting first and growing only up to the envelope size limit.
    pub fn reserve_rbuf(&mut self, consumed: usize, total_needed: usize) {
        if consumed > 0 {
            self.rbuf.copy_within(consumed..self.rlen, 0);
            self.rlen -= consumed;
        }
        if total_needed > self.rbuf.len() {
            self.rbuf.resize(total_needed, 0);
        }
    }

    /// Drops the link's buffers after it went down.
    pub fn reset_buffers(&mut self) {
        self.rbuf = Vec::new();
        self.rlen = 0;
        self.out = Vec::new();
        self.out_off = 0;
        self.queued = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_envelopes_decode_in_order_with_growing_link_sequence() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut link = Link::new("/nonexistent".into());
        link.connected(a.into(), 3, 4, "gw");
        let id = ConnId::new(3, 7, 9);
        link.queue_open(
            id,
            "127.0.0.1:5".parse().unwrap(),
            Some("localhost"),
            Some(b"holdfast/1"),
        );
        link.queue_frame(id, 1, 0, b"hello");
        link.queue_close(id, 2, 1000, "bye");
        let buf = link.queued.clone();
        let mut off = 0;
        let mut seen = Vec::new();
        while let Some((msg, used)) =
            envelope::decode(&buf[off..], envelope::DEFAULT_MAX_PAYLOAD).unwrap()
        {
            seen.push(msg.kind());
            match msg {
                Message::Hello(h) => assert_eq!((h.core, h.cores, h.role), (3, 4, Role::Gateway)),
                Message::Open(o) => assert_eq!((o.conn, o.link_seq), (id, 1)),
                Message::Frame {
                    seq,
                    link_seq,
                    payload,
                    ..
                } => assert_eq!((seq, link_seq, payload), (1, 2, &b"hello"[..])),
                Message::Close { seq, link_seq, .. } => assert_eq!((seq, link_seq), (2, 3)),
                other => panic!("unexpected {other:?}"),
            }
            off += used;
        }
        assert_eq!(off, buf.len());
        assert_eq!(seen.len(), 4);
    }
}
