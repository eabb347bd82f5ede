//! One core's link to one routing worker: its socket, its receive buffer, its outbound
//! queue and its link sequence. The core's event loop does the I/O; this module only
//! encodes envelopes into the queue and keeps the buffers, so that batching (many
//! frames, one send) happens in one place.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
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
    /// Every reliable envelope (OPEN, FRAME, CLOSE) from the oldest unacknowledged one on,
    /// encoded, from `retained_head`; kept until an ACK covers it, re-sent elsewhere if the
    /// link dies first. Its length is what back-pressure bounds.
    pub retained: Vec<u8>,
    pub retained_head: usize,
    /// (link_seq, encoded length) of each retained envelope, in order.
    pub retained_meta: VecDeque<(u64, u32)>,
    /// Last time anything arrived from the worker, and last heartbeat sent.
    pub last_rx: Instant,
    pub last_heartbeat: Instant,
    pub nonce: u64,
    /// Current reconnect delay (doubles on failure, reset on success).
    pub backoff_ms: u64,
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
            retained: Vec::new(),
            retained_head: 0,
            retained_meta: VecDeque::new(),
            last_rx: Instant::now(),
            last_heartbeat: Instant::now(),
            nonce: 0,
            backoff_ms: 0,
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
        self.link_seq = 0;
        self.acked = 0;
        debug_assert_eq!(
            self.unacked_bytes(),
            0,
            "retained envelopes are re-sent when a link goes down"
        );
        self.last_rx = Instant::now();
        self.last_heartbeat = Instant::now();
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

    /// Bytes kept for re-sending until the worker acknowledges them.
    pub fn unacked_bytes(&self) -> usize {
        self.retained.len() - self.retained_head
    }

    /// Keeps a copy of the reliable envelope just queued at `queued[start..]`.
    fn retain_from(&mut self, start: usize) {
        let env = &self.queued[start..];
        self.retained.extend_from_slice(env);
        self.retained_meta
            .push_back((self.link_seq, env.len() as u32));
    }

    pub fn queue_open(
        &mut self,
        conn: ConnId,
        peer: SocketAddr,
        sni: Option<&str>,
        alpn: Option<&[u8]>,
    ) {
        self.link_seq += 1;
        let start = self.queued.len();
        let open = Open {
            conn,
            link_seq: self.link_seq,
            peer,
            sni,
            alpn,
            client_identity: None,
        };
        envelope::encode(&Message::Open(open), &mut self.queued);
        self.retain_from(start);
    }

    pub fn queue_frame(&mut self, conn: ConnId, seq: u64, flags: u8, payload: &[u8]) {
        self.link_seq += 1;
        let start = self.queued.len();
        envelope::encode_frame_header(
            conn,
            seq,
            self.link_seq,
            flags,
            payload.len(),
            &mut self.queued,
        );
        self.queued.extend_from_slice(payload);
        self.retain_from(start);
    }

    pub fn queue_close(&mut self, conn: ConnId, seq: u64, code: u16, reason: &str) {
        self.link_seq += 1;
        let start = self.queued.len();
        let close = Message::Close {
            conn,
            seq,
            link_seq: self.link_seq,
            code,
            reason,
        };
        envelope::encode(&close, &mut self.queued);
        self.retain_from(start);
    }

    /// A cumulative ACK: releases every retained envelope up to `upto`. The caller has
    /// checked that `upto` does not run ahead of what was sent.
    pub fn ack(&mut self, upto: u64) {
        debug_assert!(upto <= self.link_seq);
        if upto <= self.acked {
            return;
        }
        self.acked = upto;
        while let Some(&(seq, len)) = self.retained_meta.front() {
            if seq > upto {
                break;
            }
            self.retained_meta.pop_front();
            self.retained_head += len as usize;
        }
        if self.retained_head == self.retained.len() {
            self.retained.clear();
            self.retained_head = 0;
        } else if self.retained_head > self.retained.len() / 2 {
            // Compact now and then so the buffer stays within twice what is unacknowledged.
            self.retained.drain(..self.retained_head);
            self.retained_head = 0;
        }
    }

    /// Hands over every unacknowledged envelope (for re-sending after the link died).
    pub fn take_unacked(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.retained);
        v.drain(..self.retained_head);
        self.retained_head = 0;
        self.retained_meta.clear();
        v
    }

    pub fn queue_heartbeat(&mut self) {
        self.nonce += 1;
        envelope::encode(
            &Message::Heartbeat {
                nonce: self.nonce,
                reply: false,
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

    #[test]
    fn acks_release_retained_envelopes_and_the_rest_can_be_taken_for_resending() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut link = Link::new("/nonexistent".into());
        link.connected(a.into(), 0, 1, "gw");
        let id = ConnId::new(0, 1, 2);
        for i in 1..=10u64 {
            link.queue_frame(id, i, 0, &[i as u8; 100]);
        }
        let per = link.unacked_bytes() / 10;
        assert_eq!(per, envelope::HEADER_LEN + 100);
        link.ack(4);
        assert_eq!(link.unacked_bytes(), 6 * per);
        link.ack(3); // stale, ignored
        assert_eq!(link.unacked_bytes(), 6 * per);
        link.ack(7);
        let rest = link.take_unacked();
        assert_eq!(link.unacked_bytes(), 0);
        let mut seqs = Vec::new();
        let mut off = 0;
        while let Some((Message::Frame { seq, payload, .. }, used)) =
            envelope::decode(&rest[off..], envelope::DEFAULT_MAX_PAYLOAD).unwrap()
        {
            assert_eq!(payload, &[seq as u8; 100][..]);
            seqs.push(seq);
            off += used;
        }
        assert_eq!(seqs, vec![8, 9, 10]);
    }
}
