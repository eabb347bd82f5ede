//! The reference echo worker: every client frame goes back to the same connection.
//!
//! It shows the shape a fast worker takes: handle everything one read brought in, then
//! acknowledge once, cumulatively, and write once. It keeps no per-connection state, so it
//! never drops duplicates; a re-sent frame is echoed again.
//!
//! Two knobs exist for tests and demonstrations ([`Options`]); both are off by default,
//! and with both off the worker is a pure echo:
//!
//! - a **prefix** put before every echoed payload (the binary's `--prefix-worker-name`
//!   uses `NAME:`), so a client can tell which worker served each frame;
//! - an **ACK delay**: every acknowledgement leaves that long after the frames it covers
//!   were echoed (`--ack-delay-ms`), so frames stay unacknowledged in the gateway for a
//!   while, as they would with a worker whose backend is slow to confirm. Echoes are
//!   not delayed.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use crate::{Event, Link, LinkError};

/// What one link carried, for the log line when it ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// OPEN events.
    pub opens: u64,
    /// FRAME events echoed.
    pub frames: u64,
    /// CLOSE events.
    pub closes: u64,
    /// ACK envelopes sent.
    pub acks: u64,
}

/// How the echo worker behaves. `Options::default()` is the pure echo.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    /// Bytes put before every echoed payload (empty: none).
    pub prefix: Vec<u8>,
    /// How long each acknowledgement is held back after the frames it covers were
    /// echoed (zero: acknowledge at once, once per batch).
    pub ack_delay: Duration,
}

/// Serves one link as a pure echo until the gateway closes it (`Ok`) or it fails.
///
/// ```no_run
/// let listener = holdfast_worker::WorkerListener::bind("/tmp/echo.sock")?;
/// let mut link = listener.accept()?;
/// let stats = holdfast_worker::echo::serve(&mut link)?;
/// println!("echoed {} frames", stats.frames);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn serve(link: &mut Link) -> Result<Stats, LinkError> {
    serve_with(link, &Options::default())
}

/// As [`serve`], with the test knobs of [`Options`].
///
/// ```no_run
/// use holdfast_worker::echo::{serve_with, Options};
///
/// let listener = holdfast_worker::WorkerListener::bind("/tmp/echo.sock")?;
/// let mut link = listener.accept()?;
/// let options = Options {
///     prefix: b"echo-a:".to_vec(),
///     ack_delay: std::time::Duration::from_millis(500),
/// };
/// serve_with(&mut link, &options)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn serve_with(link: &mut Link, options: &Options) -> Result<Stats, LinkError> {
    let mut stats = Stats::default();
    let mut acked = 0;
    // Acknowledgements held back by `ack_delay`: (when due, cumulative link sequence),
    // in the order they were made, so both fields only grow along the queue.
    let mut held: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut out = Vec::new();
    loop {
        let first = if held.is_empty() {
            link.recv()?
        } else {
            match recv_until(link, held[0].0)? {
                Wait::Event(event) => Some(event),
                Wait::Due => None,
                Wait::Closed => return Ok(stats),
            }
        };
        let mut highest = 0;
        if let Some(first) = first {
            highest = handle(link, first, options, &mut out, &mut stats);
            while let Some(event) = link.try_recv()? {
                highest = highest.max(handle(link, event, options, &mut out, &mut stats));
            }
        } else if held.is_empty() {
            // recv() returned None: the gateway closed the link between envelopes.
            return Ok(stats);
        }
        if highest > acked {
            if options.ack_delay.is_zero() {
                link.ack(highest);
                stats.acks += 1;
            } else {
                held.push_back((Instant::now() + options.ack_delay, highest));
            }
            acked = highest;
        }
        // Whatever is due now leaves as one cumulative ACK.
        let now = Instant::now();
        let mut due = None;
        while held.front().is_some_and(|&(at, _)| at <= now) {
            due = held.pop_front().map(|(_, seq)| seq);
        }
        if let Some(seq) = due {
            link.ack(seq);
            stats.acks += 1;
        }
        link.flush()?;
    }
}

enum Wait {
    /// An event arrived.
    Event(Event),
    /// The deadline passed first.
    Due,
    /// The gateway closed the link.
    Closed,
}

/// Waits for the next event, but no later than `deadline`.
fn recv_until(link: &mut Link, deadline: Instant) -> Result<Wait, LinkError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(Wait::Due);
    }
    link.stream()
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let got = link.recv();
    link.stream().set_read_timeout(None)?;
    match got {
        Ok(Some(event)) => Ok(Wait::Event(event)),
        Ok(None) => Ok(Wait::Closed),
        // A read timeout leaves the link's buffers as they were; the read is retried.
        Err(LinkError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(Wait::Due)
        }
        Err(e) => Err(e),
    }
}

fn handle(
    link: &mut Link,
    event: Event,
    options: &Options,
    out: &mut Vec<u8>,
    stats: &mut Stats,
) -> u64 {
    let link_seq = event.link_seq();
    match event {
        Event::Open { .. } => stats.opens += 1,
        Event::Frame {
            conn,
            text,
            payload,
            ..
        } => {
            if options.prefix.is_empty() {
                link.send(conn, text, &payload);
            } else {
                out.clear();
                out.extend_from_slice(&options.prefix);
                out.extend_from_slice(&payload);
                link.send(conn, text, out);
            }
            stats.frames += 1;
        }
        Event::Close { .. } => stats.closes += 1,
    }
    link_seq
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use holdfast_wire::envelope::{self, Hello, Message, Role};
    use holdfast_wire::ConnId;

    use super::*;

    /// The gateway end of a link: sends HELLO and the given envelopes, then collects
    /// what the worker answers (as (kind name, conn, payload or ack)).
    struct Gw {
        stream: UnixStream,
        buf: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Send(Vec<u8>),
        Ack(u64),
    }

    impl Gw {
        fn new(stream: UnixStream) -> Gw {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut gw = Gw {
                stream,
                buf: Vec::new(),
            };
            gw.write(&[Message::Hello(Hello {
                version: envelope::VERSION,
                role: Role::Gateway,
                core: 0,
                cores: 1,
                name: "test",
            })]);
            gw
        }

        fn write(&mut self, msgs: &[Message<'_>]) {
            let mut out = Vec::new();
            for m in msgs {
                envelope::encode(m, &mut out);
            }
            self.stream.write_all(&out).unwrap();
        }

        fn next(&mut self) -> Option<Got> {
            loop {
                if let Some((msg, used)) =
                    envelope::decode(&self.buf, envelope::DEFAULT_MAX_PAYLOAD).unwrap()
                {
                    let got = match msg {
                        Message::Send { payload, .. } => Some(Got::Send(payload.to_vec())),
                        Message::Ack { link_seq } => Some(Got::Ack(link_seq)),
                        _ => None,
                    };
                    self.buf.drain(..used);
                    match got {
                        Some(g) => return Some(g),
                        None => continue,
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).unwrap();
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }

    fn frame(seq: u64, payload: &[u8]) -> Message<'_> {
        Message::Frame {
            conn: ConnId::new(0, 1, 1),
            seq,
            link_seq: seq,
            flags: 0,
            payload,
        }
    }

    fn start(options: Options) -> (Gw, std::thread::JoinHandle<Result<Stats, LinkError>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || {
            let mut link = Link::from_stream(a, "knobs")?;
            serve_with(&mut link, &options)
        });
        (Gw::new(b), worker)
    }

    #[test]
    fn prefix_goes_before_every_echo() {
        let (mut gw, worker) = start(Options {
            prefix: b"w1:".to_vec(),
            ack_delay: Duration::ZERO,
        });
        gw.write(&[frame(1, b"one"), frame(2, b"two")]);
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(gw.next().expect("worker answers"));
        }
        assert_eq!(
            got,
            [
                Got::Send(b"w1:one".to_vec()),
                Got::Send(b"w1:two".to_vec()),
                Got::Ack(2)
            ]
        );
        drop(gw);
        assert_eq!(worker.join().unwrap().unwrap().frames, 2);
    }

    #[test]
    fn acks_are_held_back_but_echoes_are_not() {
        let delay = Duration::from_millis(300);
        let (mut gw, worker) = start(Options {
            prefix: Vec::new(),
            ack_delay: delay,
        });
        let sent = Instant::now();
        gw.write(&[frame(1, b"a")]);
        assert_eq!(gw.next(), Some(Got::Send(b"a".to_vec())));
        assert!(sent.elapsed() < delay, "the echo waited for the ACK delay");
        gw.write(&[frame(2, b"b")]);
        assert_eq!(gw.next(), Some(Got::Send(b"b".to_vec())));
        // Both ACKs come after the delay; the first may be cumulative over both.
        let mut last = 0;
        while last < 2 {
            match gw.next() {
                Some(Got::Ack(n)) => {
                    assert!(sent.elapsed() >= delay, "ACK {n} came before the delay");
                    assert!(n > last);
                    last = n;
                }
                other => panic!("expected an ACK, got {other:?}"),
            }
        }
        // A link closed while ACKs are held ends cleanly.
        gw.write(&[frame(3, b"c")]);
        assert_eq!(gw.next(), Some(Got::Send(b"c".to_vec())));
        drop(gw);
        let stats = worker.join().unwrap().unwrap();
        assert_eq!(stats.frames, 3);
    }
}
