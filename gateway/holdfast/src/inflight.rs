//! What the kernel holds of one client connection: whether a multishot receive is armed,
//! the send in flight and the outbound bytes it names, and how far the shutdown and close
//! have come. [`SocketOps`] is the only way to reach that memory, so a buffer the kernel
//! is reading cannot be touched by protocol code, and a slot is freed only when
//! [`SocketOps::is_quiet`] says nothing is in flight on it.
//!
//! It decides *what* to submit next; `core.rs` builds and pushes the entries. Nothing here
//! touches a ring or a descriptor (the model is monoio's ownership of an operation's
//! buffer: the operation, not the caller, holds the bytes while the kernel may read them).
#![forbid(unsafe_code)]

/// The next step of a closing connection, for the core to submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseStep {
    /// `shutdown(how)`: `SHUT_WR` to linger (FIN after the last bytes, keep reading until
    /// the client's FIN), `SHUT_RDWR` otherwise.
    Shutdown(i32),
    /// Cancel the armed receive: lingering is over.
    CancelRecv,
    /// Close the descriptor: nothing is in flight any more.
    Close,
}

/// One send to submit: the bytes stay frozen inside [`SocketOps`] until
/// [`SocketOps::send_done`].
#[derive(Debug, Clone, Copy)]
pub struct SendOp {
    pub ptr: *const u8,
    pub len: u32,
}

/// The kernel-facing state of one connection. Private fields: the outbound buffer is
/// reachable only while no send names it. Kept small (32 B): every idle connection has one.
#[derive(Debug, Default)]
pub struct SocketOps {
    /// The bytes of the send in flight (and what remains of them); frozen while
    /// `SEND_INFLIGHT`.
    out: Vec<u8>,
    out_off: u32,
    /// The flags below.
    flags: u16,
}

const RECV_ARMED: u16 = 1;
const SEND_INFLIGHT: u16 = 1 << 1;
const CLOSING: u16 = 1 << 2;
/// Close gracefully: FIN after our last bytes, then wait for the client's FIN.
const LINGER: u16 = 1 << 3;
/// The flush deadline passed: stop lingering, cut the connection.
const CUT: u16 = 1 << 4;
const SHUTDOWN_SUBMITTED: u16 = 1 << 5;
/// The Shutdown completed, or none was needed. Close waits for it: a Shutdown still queued
/// on an io-wq thread after the slot was closed and reused would shut the next client down.
const SHUTDOWN_DONE: u16 = 1 << 6;
const CANCEL_SUBMITTED: u16 = 1 << 7;
const CLOSE_SUBMITTED: u16 = 1 << 8;
/// The client is done sending: its FIN was read (or it reset the connection), so the
/// kernel holds no unread input of it and none can come.
const PEER_DONE: u16 = 1 << 9;

impl SocketOps {
    pub fn new() -> SocketOps {
        SocketOps::default()
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn set(&mut self, flag: u16, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    pub fn recv_armed(&self) -> bool {
        self.has(RECV_ARMED)
    }

    /// A multishot receive was submitted.
    pub fn recv_submitted(&mut self) {
        debug_assert!(!self.has(RECV_ARMED), "one receive armed at a time");
        self.set(RECV_ARMED, true);
    }

    /// The receive ended (a completion without F_MORE).
    pub fn recv_ended(&mut self) {
        self.set(RECV_ARMED, false);
    }

    /// Whether a receive should be armed again after one ended.
    pub fn wants_recv(&self) -> bool {
        !self.has(RECV_ARMED) && !self.has(CLOSING)
    }

    /// No send is in flight and no handed-over byte is unsent.
    pub fn send_idle(&self) -> bool {
        !self.has(SEND_INFLIGHT) && self.in_flight_bytes() == 0
    }

    /// A send is in flight (its bytes are frozen).
    pub fn send_in_flight(&self) -> bool {
        self.has(SEND_INFLIGHT)
    }

    /// The bytes a send took and did not write yet; empty while a send is in flight
    /// (they are the kernel's then). A live upgrade moves them to the new process.
    pub fn unsent(&self) -> &[u8] {
        if self.has(SEND_INFLIGHT) {
            &[]
        } else {
            &self.out[self.out_off as usize..]
        }
    }

    /// Bytes handed to the kernel and not yet sent.
    pub fn in_flight_bytes(&self) -> usize {
        self.out.len() - self.out_off as usize
    }

    /// Starts a send of what is left of the current bytes or, once they are out, of
    /// `queued` (swapped in, so `queued` becomes an empty buffer that keeps its
    /// capacity). None while a send is in flight, after shutdown, or with nothing to send.
    pub fn start_send(&mut self, queued: &mut Vec<u8>) -> Option<SendOp> {
        if self.has(SEND_INFLIGHT) || self.has(SHUTDOWN_SUBMITTED) {
            return None;
        }
        if self.out_off as usize >= self.out.len() {
            if queued.is_empty() {
                return None;
            }
            std::mem::swap(&mut self.out, queued);
            queued.clear();
            self.out_off = 0;
        }
        let rest = &self.out[self.out_off as usize..];
        let op = SendOp {
            ptr: rest.as_ptr(),
            len: rest.len().min(u32::MAX as usize) as u32,
        };
        self.set(SEND_INFLIGHT, true);
        Some(op)
    }

    /// The send completed with `res` (bytes sent, or -errno). On an error every outbound
    /// byte is dropped (the connection is going) and the errno returned. When everything
    /// is out, both buffers are freed: an idle connection owns no send buffer.
    pub fn send_done(&mut self, res: i32, queued: &mut Vec<u8>) -> Result<(), i32> {
        debug_assert!(self.has(SEND_INFLIGHT), "a send completion without a send");
        self.set(SEND_INFLIGHT, false);
        if res == -libc::ECANCELED {
            // Cancelled by a live upgrade before it wrote anything: the bytes stay, for
            // the new process to send.
            return Ok(());
        }
        if res < 0 {
            self.out = Vec::new();
            self.out_off = 0;
            *queued = Vec::new();
            return Err(-res);
        }
        // A send never exceeds its `SendOp::len`, a u32.
        self.out_off += res as u32;
        debug_assert!(self.out_off as usize <= self.out.len());
        if self.out_off as usize >= self.out.len() && queued.is_empty() {
            self.out = Vec::new();
            *queued = Vec::new();
            self.out_off = 0;
        }
        Ok(())
    }

    pub fn is_closing(&self) -> bool {
        self.has(CLOSING)
    }

    /// The connection began closing. It lingers when asked to (the client has a last
    /// message to read) or when a send is still in flight.
    pub fn begin_close(&mut self, linger: bool) {
        if self.has(CLOSING) {
            return;
        }
        self.set(CLOSING, true);
        self.set(LINGER, linger || self.has(SEND_INFLIGHT));
    }

    /// The flush deadline passed: shut down now, and stop lingering.
    pub fn cut(&mut self) {
        debug_assert!(self.has(CLOSING));
        self.set(CUT, true);
    }

    /// The Shutdown completed.
    pub fn shutdown_done(&mut self) {
        self.set(SHUTDOWN_DONE, true);
    }

    /// The client finished sending: a receive read its FIN, or it reset the connection.
    pub fn peer_done(&mut self) {
        self.set(PEER_DONE, true);
    }

    /// What to submit next for a closing connection, given whether its session still has
    /// bytes queued: once every byte is out (or at once when cut), a shutdown where one is
    /// needed; a cancel of the armed receive unless we linger for the client's FIN; close
    /// once nothing is in flight. Each step is returned once.
    pub fn next_close_step(&mut self, nothing_queued: bool) -> Option<CloseStep> {
        if !self.has(CLOSING) {
            return None;
        }
        let flushed = !self.has(SEND_INFLIGHT) && self.in_flight_bytes() == 0 && nothing_queued;
        if !self.has(SHUTDOWN_SUBMITTED) && (self.has(CUT) || flushed) {
            self.set(SHUTDOWN_SUBMITTED, true);
            // A Shutdown runs on an io-wq thread (a hand-off and two context switches, most
            // of the cost of closing), so it is made only where Close cannot do its work:
            // to linger, sending our FIN after the last bytes and reading on until the
            // client's FIN (closing with unread input would make the kernel answer with a
            // reset, which can destroy our last message in flight), and to cut. Otherwise
            // (the client is done sending, or we do not linger) Close sends the FIN, with
            // any bytes the last send left to it, once an armed receive is cancelled.
            // (Input the client sends after its last read, if any, makes the kernel reset
            // then, as a close after a shutdown would.)
            let linger = self.has(LINGER) && !self.has(PEER_DONE);
            if !self.has(CUT) && !linger {
                self.set(SHUTDOWN_DONE, true);
            } else {
                let how = if self.has(CUT) || !self.has(RECV_ARMED) {
                    libc::SHUT_RDWR
                } else {
                    libc::SHUT_WR
                };
                return Some(CloseStep::Shutdown(how));
            }
        }
        if !self.has(SHUTDOWN_DONE) || self.has(CLOSE_SUBMITTED) || self.has(SEND_INFLIGHT) {
            return None;
        }
        if self.has(RECV_ARMED) {
            if (self.has(CUT) || !self.has(LINGER)) && !self.has(CANCEL_SUBMITTED) {
                self.set(CANCEL_SUBMITTED, true);
                return Some(CloseStep::CancelRecv);
            }
            return None;
        }
        self.set(CLOSE_SUBMITTED, true);
        Some(CloseStep::Close)
    }

    /// Nothing is in flight: the slot may be freed (after the Close completion).
    pub fn is_quiet(&self) -> bool {
        !self.has(RECV_ARMED) && !self.has(SEND_INFLIGHT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_send_keeps_its_bytes_for_the_hand_over() {
        let mut ops = SocketOps::new();
        let mut queued = b"hello".to_vec();
        ops.start_send(&mut queued).expect("a send");
        assert!(ops.send_in_flight());
        assert!(ops.unsent().is_empty(), "the kernel's while in flight");
        ops.send_done(2, &mut queued).unwrap();
        ops.start_send(&mut queued).expect("the rest");
        ops.send_done(-libc::ECANCELED, &mut queued).unwrap();
        assert!(!ops.send_in_flight());
        assert_eq!(ops.unsent(), b"llo");
    }

    #[test]
    fn queued_bytes_are_frozen_while_a_send_is_in_flight() {
        let mut ops = SocketOps::new();
        let mut queued = b"hello".to_vec();
        let op = ops.start_send(&mut queued).expect("a send");
        assert_eq!(op.len, 5);
        assert!(queued.is_empty());
        // More bytes queue behind the send in flight, which is not restarted.
        queued.extend_from_slice(b" world");
        assert!(ops.start_send(&mut queued).is_none());
        assert_eq!(ops.in_flight_bytes(), 5);
        // A short send: the rest of the same bytes goes next.
        ops.send_done(2, &mut queued).unwrap();
        let op = ops.start_send(&mut queued).expect("the rest");
        assert_eq!(op.len, 3);
        ops.send_done(3, &mut queued).unwrap();
        let op = ops.start_send(&mut queued).expect("the queued bytes");
        assert_eq!(op.len, 6);
        ops.send_done(6, &mut queued).unwrap();
        assert_eq!(ops.in_flight_bytes(), 0);
        assert_eq!(
            queued.capacity(),
            0,
            "an idle connection owns no send buffer"
        );
        assert!(ops.is_quiet());
    }

    #[test]
    fn a_failed_send_drops_every_outbound_byte() {
        let mut ops = SocketOps::new();
        let mut queued = b"abc".to_vec();
        ops.start_send(&mut queued).unwrap();
        queued.extend_from_slice(b"def");
        assert_eq!(ops.send_done(-libc::EPIPE, &mut queued), Err(libc::EPIPE));
        assert!(queued.is_empty());
        assert_eq!(ops.in_flight_bytes(), 0);
    }

    #[test]
    fn a_graceful_close_waits_for_the_bytes_then_lingers_for_the_fin() {
        let mut ops = SocketOps::new();
        ops.recv_submitted();
        let mut queued = b"CLOSE".to_vec();
        ops.start_send(&mut queued).unwrap();
        ops.begin_close(true);
        assert_eq!(ops.next_close_step(true), None, "the send is in flight");
        ops.send_done(5, &mut queued).unwrap();
        assert_eq!(
            ops.next_close_step(true),
            Some(CloseStep::Shutdown(libc::SHUT_WR))
        );
        assert_eq!(ops.next_close_step(true), None, "shutdown not done yet");
        ops.shutdown_done();
        assert_eq!(ops.next_close_step(true), None, "lingering for the FIN");
        ops.recv_ended();
        assert_eq!(ops.next_close_step(true), Some(CloseStep::Close));
        assert_eq!(ops.next_close_step(true), None, "each step once");
        assert!(ops.is_quiet());
    }

    #[test]
    fn a_client_that_finished_sending_is_closed_without_a_shutdown() {
        let mut ops = SocketOps::new();
        ops.recv_submitted();
        // The client's FIN: the receive ends and the session answers with close_notify.
        ops.recv_ended();
        ops.peer_done();
        let mut queued = b"close_notify".to_vec();
        ops.begin_close(false);
        ops.start_send(&mut queued).unwrap();
        assert_eq!(ops.next_close_step(true), None, "the send is in flight");
        ops.send_done(12, &mut queued).unwrap();
        assert_eq!(ops.next_close_step(true), Some(CloseStep::Close));
        assert_eq!(ops.next_close_step(true), None, "each step once");
        assert!(ops.is_quiet());
    }

    #[test]
    fn a_client_done_sending_still_gets_every_byte_before_the_close() {
        let mut ops = SocketOps::new();
        ops.recv_submitted();
        ops.recv_ended();
        ops.peer_done();
        ops.begin_close(true);
        // Bytes still queued: nothing is closed under them.
        assert_eq!(ops.next_close_step(false), None);
        let mut queued = b"last".to_vec();
        ops.start_send(&mut queued).unwrap();
        ops.send_done(2, &mut queued).unwrap();
        assert_eq!(ops.next_close_step(true), None, "two bytes not yet sent");
        ops.start_send(&mut queued).unwrap();
        ops.send_done(2, &mut queued).unwrap();
        assert_eq!(ops.next_close_step(true), Some(CloseStep::Close));
    }

    #[test]
    fn a_cut_connection_shuts_both_ways_and_cancels_its_receive() {
        let mut ops = SocketOps::new();
        ops.recv_submitted();
        let mut queued = b"unsent".to_vec();
        ops.begin_close(true);
        assert_eq!(ops.next_close_step(false), None, "bytes still queued");
        ops.cut();
        assert_eq!(
            ops.next_close_step(false),
            Some(CloseStep::Shutdown(libc::SHUT_RDWR))
        );
        assert!(
            ops.start_send(&mut queued).is_none(),
            "no send after shutdown"
        );
        ops.shutdown_done();
        assert_eq!(ops.next_close_step(false), Some(CloseStep::CancelRecv));
        assert_eq!(ops.next_close_step(false), None);
        ops.recv_ended();
        assert_eq!(ops.next_close_step(false), Some(CloseStep::Close));
    }

    #[test]
    fn a_close_without_a_last_message_cancels_its_receive_and_closes() {
        let mut ops = SocketOps::new();
        ops.recv_submitted();
        ops.begin_close(false);
        // No shutdown (an io-wq hand-off): the receive is cancelled, and Close sends
        // the FIN once it has ended.
        assert_eq!(ops.next_close_step(true), Some(CloseStep::CancelRecv));
        assert_eq!(ops.next_close_step(true), None, "until the receive ends");
        ops.recv_ended();
        assert_eq!(ops.next_close_step(true), Some(CloseStep::Close));
        assert!(ops.is_quiet());
    }

    #[test]
    fn a_send_in_flight_at_close_makes_it_linger() {
        let mut ops = SocketOps::new();
        ops.recv_submitted();
        let mut queued = b"x".to_vec();
        ops.start_send(&mut queued).unwrap();
        ops.begin_close(false);
        ops.send_done(1, &mut queued).unwrap();
        assert_eq!(
            ops.next_close_step(true),
            Some(CloseStep::Shutdown(libc::SHUT_WR))
        );
    }
}
