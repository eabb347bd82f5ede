//! Live upgrade, the process side: the SOCK_SEQPACKET sockets between the old and the new
//! process, descriptors passed on them (SCM_RIGHTS), starting the successor, and the
//! control exchange that decides whether it takes over. The state itself is
//! `handover.rs`; each core moves its own connections (`core.rs`).
//!
//! The old process makes one control socket and one socket per core, and starts the new
//! binary with their far ends inherited (named in `HOLDFAST_UPGRADE_FDS`). On the control
//! socket:
//! 1. old → new, OFFER: the format version, the core count, the process counters, with
//!    the admin listener attached;
//! 2. new → old, READY (it loaded its configuration and certificates and can read the
//!    format) or REFUSE with the reason. Until READY, nothing has moved: the old process
//!    never stopped serving, and a new process that refuses, exits or says nothing within
//!    the timeout is killed and the old one carries on;
//! 3. the cores hand over (each on its own socket);
//! 4. new → old, TAKEN once every core runs: the old process closes its worker links and
//!    exits.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::handover::{self, Frames, Put, Reader, CHUNK, MAX_FDS};

/// Names the inherited sockets in the new process: "CTL,CORE0,CORE1,...".
pub const ENV_FDS: &str = "HOLDFAST_UPGRADE_FDS";

// Control frames.
pub const OFFER: u8 = b'O';
pub const READY: u8 = b'Y';
pub const REFUSE: u8 = b'N';
pub const TAKEN: u8 = b'T';

/// A connected SOCK_SEQPACKET pair, both ends close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends one frame (`handover::frame`) in messages of at most [`CHUNK`] bytes; `fds`
/// ride on the first (at most [`MAX_FDS`]).
pub fn send_frame(sock: BorrowedFd<'_>, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(
        fds.len() <= MAX_FDS,
        "at most MAX_FDS descriptors per frame"
    );
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    for (i, chunk) in frame.chunks(CHUNK).enumerate() {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if i == 0 && !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        loop {
            match rustix::net::sendmsg(
                sock,
                &[io::IoSlice::new(chunk)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Receives one message into `buf`, appending the descriptors it carries to `fds`.
/// Ok(0) at end of stream.
pub fn recv_message(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [io::IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got.flags.contains(ReturnFlags::TRUNC) || got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other("an upgrade message was truncated"));
    }
    Ok(got.bytes)
}

/// Whether `sock` becomes readable (or hung up) within `timeout`.
pub fn wait_readable(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        &sock,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads whole frames, with their descriptors, from one upgrade socket (blocking).
pub struct FrameReader {
    sock: OwnedFd,
    frames: Frames,
    fds: VecDeque<OwnedFd>,
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new(sock: OwnedFd) -> FrameReader {
        FrameReader {
            sock,
            frames: Frames::new(),
            fds: VecDeque::new(),
            buf: vec![0; CHUNK],
        }
    }

    pub fn sock(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The next frame, waiting until `deadline`. Errors: end of stream, timeout, a
    /// malformed stream.
    pub fn next(&mut self, deadline: Instant) -> io::Result<(u8, Vec<u8>)> {
        loop {
            if let Some(f) = self.frames.next_frame().map_err(io::Error::other)? {
                return Ok(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_readable(self.sock.as_fd(), left)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no upgrade message in time",
                ));
            }
            let n = recv_message(self.sock.as_fd(), &mut self.buf, &mut self.fds)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other process closed the upgrade socket",
                ));
            }
            self.frames.push(&self.buf[..n]);
        }
    }

    /// Bytes received elsewhere (the core's ring) for this stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// The next whole frame already received, without waiting.
    pub fn buffered(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        self.frames.next_frame().map_err(io::Error::other)
    }

    /// The next descriptor received, in the order they were sent.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    pub fn into_sock(self) -> OwnedFd {
        self.sock
    }
}

/// The new process as the old one sees it.
pub struct Successor {
    pub child: std::process::Child,
    pub ctl: FrameReader,
    /// This process's ends of the per-core sockets.
    pub cores: Vec<OwnedFd>,
}

/// Starts `exe` with `args` as the successor of this process, with a control socket and
/// `cores` core sockets inherited.
pub fn spawn(exe: &Path, args: &[OsString], cores: usize) -> io::Result<Successor> {
    let (ctl, ctl_far) = seqpacket_pair()?;
    let mut ours = Vec::with_capacity(cores);
    let mut far = vec![ctl_far];
    for _ in 0..cores {
        let (a, b) = seqpacket_pair()?;
        ours.push(a);
        far.push(b);
    }
    // The far ends must survive exec: clear close-on-exec on them only (this thread is
    // the only one that starts processes, so no other child inherits them).
    for fd in &far {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
    }
    let names: Vec<String> = far
        .iter()
        .map(|f| std::os::fd::AsRawFd::as_raw_fd(f).to_string())
        .collect();
    let child = std::process::Command::new(exe)
        .args(args)
        .env(ENV_FDS, names.join(","))
        .spawn();
    drop(far);
    Ok(Successor {
        child: child?,
        ctl: FrameReader::new(ctl),
        cores: ours,
    })
}

/// What a new process inherited from the old one.
pub struct Inherited {
    pub ctl: OwnedFd,
    pub cores: Vec<OwnedFd>,
}

/// The sockets named in [`ENV_FDS`], if this process was started as a successor.
pub fn inherited() -> Option<Result<Inherited, String>> {
    let names = std::env::var(ENV_FDS).ok()?;
    let parse = || -> Result<Inherited, String> {
        let mut fds = Vec::new();
        for n in names.split(',') {
            let raw: std::os::fd::RawFd = n
                .parse()
                .map_err(|_| format!("{ENV_FDS}: {n:?} is not a descriptor"))?;
            if raw < 3
                || fds
                    .iter()
                    .any(|f| std::os::fd::AsRawFd::as_raw_fd(f) == raw)
            {
                return Err(format!("{ENV_FDS}: descriptor {raw} is not ours"));
            }
            // The socket type is checked before it is owned: a stale variable must not make
            // this process close a descriptor it does not own.
            // SAFETY: `raw` was checked below to be an open Unix SOCK_SEQPACKET socket that
            // the old process left open for us across exec, named once in the variable
            // (duplicates refused above); nothing else in this process owns it.
            #[allow(unsafe_code)]
            let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
            let ty = rustix::net::sockopt::socket_type(borrowed)
                .map_err(|e| format!("{ENV_FDS}: descriptor {raw}: {e}"))?;
            if ty != SocketType::SEQPACKET {
                return Err(format!(
                    "{ENV_FDS}: descriptor {raw} is not an upgrade socket"
                ));
            }
            // SAFETY: as above; from here on the OwnedFd is its only owner.
            #[allow(unsafe_code)]
            fds.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
            // Close-on-exec again, so a later successor does not inherit it.
            let last = fds.last().expect("just pushed");
            rustix::io::fcntl_setfd(last, rustix::io::FdFlags::CLOEXEC)
                .map_err(|e| e.to_string())?;
        }
        if fds.len() < 2 {
            return Err(format!("{ENV_FDS}: no core sockets"));
        }
        let ctl = fds.remove(0);
        Ok(Inherited { ctl, cores: fds })
    };
    Some(parse())
}

/// The counters of the process (not of a core) that continue across an upgrade.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessCounters {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub upgrades_ok: u64,
    pub upgrades_failed: u64,
}

/// What the old process offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub format: u32,
    pub cores: u32,
    pub counters: ProcessCounters,
    /// The process's own session-ticket secret (no key file): tickets issued before the
    /// upgrade resume after it.
    pub ticket_secret: Option<[u8; crate::ticket::SECRET_LEN]>,
}

impl Offer {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.put_u32(self.format);
        body.put_u32(self.cores);
        let c = &self.counters;
        for v in [
            c.reloads_ok,
            c.reloads_failed,
            c.upgrades_ok,
            c.upgrades_failed,
        ] {
            body.put_u64(v);
        }
        match &self.ticket_secret {
            None => body.put_u8(0),
            Some(secret) => {
                body.put_u8(1);
                body.extend_from_slice(secret);
            }
        }
        handover::frame(OFFER, &body)
    }

    /// Reads an offer; only the format version is read first, so a newer format is
    /// reported as such rather than as garbage.
    pub fn decode(body: &[u8]) -> Result<Offer, String> {
        let mut r = Reader::new(body);
        let format = r.u32("format").map_err(|e| e.to_string())?;
        if format != handover::FORMAT {
            return Err(format!(
                "the running process offers state format {format}; this binary reads format {}",
                handover::FORMAT
            ));
        }
        let mut read = || -> Result<Offer, handover::FormatError> {
            let cores = r.u32("cores")?;
            let counters = ProcessCounters {
                reloads_ok: r.u64("reloads")?,
                reloads_failed: r.u64("reloads")?,
                upgrades_ok: r.u64("upgrades")?,
                upgrades_failed: r.u64("upgrades")?,
            };
            let ticket_secret = match r.u8("ticket secret")? {
                0 => None,
                _ => Some(
                    r.take(crate::ticket::SECRET_LEN, "ticket secret")?
                        .try_into()
                        .expect("SECRET_LEN bytes"),
                ),
            };
            Ok(Offer {
                format,
                cores,
                counters,
                ticket_secret,
            })
        };
        read().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_descriptors_cross_a_socket_pair() {
        let (a, b) = seqpacket_pair().expect("pair");
        let (x, _y) = seqpacket_pair().expect("a socket to pass");
        // A frame larger than one message, with a descriptor on its first.
        let big = handover::frame(handover::CONNS, &vec![5u8; 3 * CHUNK + 17]);
        let small = handover::frame(handover::DONE, b"");
        let sender = std::thread::spawn(move || {
            send_frame(a.as_fd(), &big, &[x.as_fd()]).expect("send big");
            send_frame(a.as_fd(), &small, &[]).expect("send small");
            big
        });
        let mut reader = FrameReader::new(b);
        let deadline = Instant::now() + Duration::from_secs(10);
        let (kind, body) = reader.next(deadline).expect("first frame");
        assert_eq!(kind, handover::CONNS);
        assert_eq!(body.len(), 3 * CHUNK + 17);
        let fd = reader
            .take_fd()
            .expect("the descriptor arrived with its frame");
        assert_eq!(
            rustix::net::sockopt::socket_type(&fd).expect("a socket"),
            SocketType::SEQPACKET
        );
        assert!(reader.take_fd().is_none());
        assert_eq!(
            reader.next(deadline).expect("second"),
            (handover::DONE, Vec::new())
        );
        sender.join().expect("sender");
        let err = reader
            .next(deadline)
            .expect_err("the sender is gone: end of stream");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_offer_of_another_format_is_refused_by_name() {
        let offer = Offer {
            format: handover::FORMAT,
            cores: 2,
            counters: ProcessCounters {
                reloads_ok: 1,
                reloads_failed: 2,
                upgrades_ok: 3,
                upgrades_failed: 4,
            },
            ticket_secret: None,
        };
        let frame = offer.encode();
        assert_eq!(Offer::decode(&frame[5..]).expect("decodes"), offer);
        let with_secret = Offer {
            ticket_secret: Some([9; crate::ticket::SECRET_LEN]),
            ..offer.clone()
        };
        let long = with_secret.encode();
        assert_eq!(Offer::decode(&long[5..]).expect("decodes"), with_secret);
        assert!(
            Offer::decode(&long[5..long.len() - 1]).is_err(),
            "a truncated secret"
        );
        let mut other = frame[5..].to_vec();
        other[0] = 99;
        let err = Offer::decode(&other).expect_err("another format");
        assert!(err.contains("format 99"), "{err}");
        assert!(Offer::decode(&frame[5..10]).is_err(), "truncated");
    }
}
