//! io_uring primitives for one core: building the ring with the best features the kernel
//! has (and falling back cleanly), and the provided-buffer ring that multishot receives
//! draw from.
//!
//! Memory the kernel may write (the buffer-ring entries and the receive buffers) is
//! mmap-ed here, page-aligned, and owned by [`BufRing`]. It is unmapped only in `Drop`,
//! and the owning core declares its `IoUring` before its `BufRing`, so the ring (and with
//! it the kernel's registration) is gone before the memory is. No other module writes to
//! this memory; a buffer handed to the kernel is read by the core only between the
//! completion that names it and its [`BufRing::recycle`].

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::{IoUring, Submitter};

/// Which ring features this kernel gave us. Logged once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFeatures {
    /// SINGLE_ISSUER | DEFER_TASKRUN: completions run only when the core waits, no IPIs.
    pub defer_taskrun: bool,
    /// COOP_TASKRUN, the fallback when DEFER_TASKRUN is missing.
    pub coop_taskrun: bool,
    /// IORING_FEAT_MIN_TIMEOUT (6.12+): a wait can ask for several completions but return
    /// after `min_wait_usec` with whatever arrived, which batches wake-ups under load.
    pub min_timeout: bool,
}

impl std::fmt::Display for RingFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.defer_taskrun {
            f.write_str("SINGLE_ISSUER|DEFER_TASKRUN")?;
        } else if self.coop_taskrun {
            f.write_str("COOP_TASKRUN (no DEFER_TASKRUN on this kernel)")?;
        } else {
            f.write_str("plain (no SINGLE_ISSUER/DEFER_TASKRUN/COOP_TASKRUN on this kernel)")?;
        }
        if self.min_timeout {
            f.write_str(", MIN_TIMEOUT")
        } else {
            f.write_str(", no MIN_TIMEOUT (completion batching off)")
        }
    }
}

/// Builds a ring for the calling thread. Must run on the thread that will submit to it:
/// a SINGLE_ISSUER ring used from another thread fails with EEXIST.
pub fn build_ring(entries: u32) -> io::Result<(IoUring, RingFeatures)> {
    let cq = entries.saturating_mul(4).max(1024);
    let (ring, defer_taskrun, coop_taskrun) = if let Ok(r) = IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        (r, true, false)
    } else if let Ok(r) = IoUring::builder()
        .setup_cqsize(cq)
        .setup_coop_taskrun()
        .build(entries)
    {
        (r, false, true)
    } else {
        let r = IoUring::builder()
            .setup_cqsize(cq)
            .build(entries)
            .map_err(|e| explain_setup_error(e, std::path::Path::new("/proc/sys")))?;
        (r, false, false)
    };
    let min_timeout = ring.params().is_feature_min_timeout();
    Ok((
        ring,
        RingFeatures {
            defer_taskrun,
            coop_taskrun,
            min_timeout,
        },
    ))
}

/// The error of `io_uring_setup` as an operator needs it: why the kernel refuses and what
/// to do. EPERM comes from `kernel.io_uring_disabled` (read under `sysctl_root`) or, where
/// that is 0, from a seccomp filter (a container runtime's default profile blocks
/// io_uring); ENOSYS from a kernel without io_uring; ENOMEM from a locked-memory limit.
pub fn explain_setup_error(e: io::Error, sysctl_root: &std::path::Path) -> io::Error {
    let text = match e.raw_os_error() {
        Some(libc::EPERM) => {
            let disabled = std::fs::read_to_string(sysctl_root.join("kernel/io_uring_disabled"))
                .map(|v| v.trim().to_string());
            match disabled.as_deref() {
                Ok("0") | Err(_) => format!(
                    "the kernel refused io_uring ({e}) although kernel.io_uring_disabled is \
                     not set: a seccomp filter blocks it (a container runtime's default profile \
                     does); run the gateway with a profile that allows io_uring_setup, \
                     io_uring_enter and io_uring_register"
                ),
                Ok("1") => format!(
                    "io_uring is disabled for this user by sysctl (kernel.io_uring_disabled = 1, \
                     {e}): run `sysctl -w kernel.io_uring_disabled=0`, or add the gateway's user \
                     to the group that kernel.io_uring_group names"
                ),
                Ok(v) => format!(
                    "io_uring is disabled by sysctl (kernel.io_uring_disabled = {v}, {e}): run \
                     `sysctl -w kernel.io_uring_disabled=0` (and set it in /etc/sysctl.d to keep it)"
                ),
            }
        }
        Some(libc::ENOSYS) => format!(
            "this kernel has no io_uring ({e}): holdfast needs Linux 5.19 or later built with \
             CONFIG_IO_URING"
        ),
        Some(libc::ENOMEM) => format!(
            "the kernel could not allocate the ring ({e}): raise the locked-memory limit \
             (LimitMEMLOCK= in holdfast.service, or `ulimit -l`), or lower runtime.ring_entries"
        ),
        _ => return e,
    };
    io::Error::new(e.kind(), text)
}

/// An anonymous private mapping, page-aligned, unmapped on drop. Faulted in at once
/// (MAP_POPULATE): the buffer ring is a fixed cost of the core, and it must show in the
/// process's memory from the start rather than grow page by page as receives touch it,
/// which would make a per-connection memory slope between small counts look far worse
/// than it is.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping with no address hint aliases nothing; the
        // result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap never returns null on success"),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped exactly once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A provided-buffer ring: `count` buffers of `size` bytes that the kernel picks from for
/// multishot receives. An idle connection holds none of them.
pub struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    size: u32,
    bgid: u16,
    /// Our copy of the tail; published to the kernel with a release store.
    tail: u16,
    /// Buffers currently with the kernel or being read by us (debug accounting).
    #[cfg(debug_assertions)]
    out: Vec<bool>,
}

impl BufRing {
    /// Maps and registers `count` (a power of two, at most 32768) buffers of `size` bytes
    /// as group `bgid`, and hands all of them to the kernel.
    pub fn new(submitter: &Submitter<'_>, bgid: u16, count: u16, size: u32) -> io::Result<BufRing> {
        assert!(
            count.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let entries = Mapping::new(count as usize * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(count as usize * size as usize)?;
        // SAFETY: `entries` is page-aligned, sized for `count` entries, and lives in this
        // struct, which the core drops after its ring (see the module docs).
        unsafe {
            submitter.register_buf_ring_with_flags(entries.ptr.as_ptr() as u64, count, bgid, 0)?
        };
        let mut ring = BufRing {
            entries,
            buffers,
            count,
            size,
            bgid,
            tail: 0,
            #[cfg(debug_assertions)]
            out: vec![true; count as usize],
        };
        for bid in 0..count {
            ring.push(bid);
        }
        ring.publish();
        Ok(ring)
    }

    pub fn group(&self) -> u16 {
        self.bgid
    }

    pub fn buffer_size(&self) -> u32 {
        self.size
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// The first `len` bytes of buffer `bid`, which a completion just handed to us.
    pub fn buffer_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(
            bid < self.count && len <= self.size as usize,
            "buffer id {bid} / length {len} out of range"
        );
        #[cfg(debug_assertions)]
        debug_assert!(
            self.out[bid as usize],
            "buffer {bid} read while owned by the kernel"
        );
        // SAFETY: bid < count, so the range lies inside `buffers`; the kernel wrote it
        // before posting the completion and will not touch it again until `recycle`
        // returns it; `&mut self` makes this the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buffers
                    .ptr
                    .as_ptr()
                    .add(bid as usize * self.size as usize),
                len,
            )
        }
    }

    /// Returns buffer `bid` to the kernel (visible after [`BufRing::publish`]).
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
    }

    fn push(&mut self, bid: u16) {
        #[cfg(debug_assertions)]
        {
            debug_assert!(self.out[bid as usize], "buffer {bid} returned twice");
            self.out[bid as usize] = false;
        }
        let idx = (self.tail & (self.count - 1)) as usize;
        // SAFETY: idx < count, so the entry lies inside `entries`. The kernel reads entries
        // only between its head and the published tail, and this one is past the tail.
        let entry = unsafe { &mut *self.entries.ptr.as_ptr().cast::<BufRingEntry>().add(idx) };
        // SAFETY: same range argument as in buffer_mut.
        let addr = unsafe {
            self.buffers
                .ptr
                .as_ptr()
                .add(bid as usize * self.size as usize)
        };
        entry.set_addr(addr as u64);
        entry.set_len(self.size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every recycled buffer visible to the kernel (one release store).
    pub fn publish(&mut self) {
        // SAFETY: the tail field overlays entry 0's `resv`, inside the mapping; the kernel
        // reads it with acquire semantics, so a release store publishes the entries above.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.ptr.as_ptr().cast::<BufRingEntry>())
                as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Marks `bid` as taken by the kernel for a completion we are about to read.
    #[inline]
    pub fn taken(&mut self, bid: u16) {
        #[cfg(debug_assertions)]
        {
            debug_assert!(
                !self.out[bid as usize],
                "kernel handed out buffer {bid} twice"
            );
            self.out[bid as usize] = true;
        }
        let _ = bid;
    }
}

/// Raises the soft open-file limit to the hard one and returns the new soft limit. The
/// fixed-file table of each ring is bounded by this value when it is registered.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Where the kernel writes each accepted connection's peer address: one buffer per accept
/// a core keeps armed, so the address arrives with the socket (an accept that allocates a
/// direct descriptor has no descriptor to call getpeername on).
///
/// The buffers live on the heap and are never moved or freed while the core runs: a
/// pointer handed to an accept submission stays valid until that accept completes, as
/// long as this value outlives the ring's in-flight accepts (the core drops its ring
/// first, see `Core`'s field order) and the caller prepares a buffer only when its
/// previous accept has completed.
pub struct AcceptAddrs {
    slots: Box<[AcceptAddr]>,
}

struct AcceptAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl AcceptAddrs {
    pub fn new(n: usize) -> AcceptAddrs {
        let slots = (0..n)
            .map(|_| AcceptAddr {
                // SAFETY: sockaddr_storage is plain bytes; all zeros is a valid value.
                storage: unsafe { std::mem::zeroed() },
                len: 0,
            })
            .collect();
        AcceptAddrs { slots }
    }

    /// The address and length pointers for the accept that will use buffer `i`.
    pub fn prepare(&mut self, i: usize) -> (*mut libc::sockaddr, *mut libc::socklen_t) {
        let slot = &mut self.slots[i];
        slot.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        (
            std::ptr::addr_of_mut!(slot.storage).cast(),
            std::ptr::addr_of_mut!(slot.len),
        )
    }

    /// The peer address the kernel wrote into buffer `i` for the accept that just
    /// completed successfully; None for anything but IPv4 and IPv6.
    pub fn peer(&self, i: usize) -> Option<std::net::SocketAddr> {
        let slot = &self.slots[i];
        let max = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `storage` is a whole sockaddr_storage and `len` is clamped to its size;
        // the kernel wrote an address of the listener's family and its length there when
        // the accept completed, and SockAddr only reads `len` bytes of it by family.
        let addr = unsafe { socket2::SockAddr::new(slot.storage, slot.len.min(max)) };
        addr.as_socket()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The message for EPERM with `kernel.io_uring_disabled` at `value` (None: absent).
    fn eperm_with(value: Option<&str>) -> String {
        let root = std::env::temp_dir().join(format!(
            "holdfast-ring-test-{}-{}",
            std::process::id(),
            value.unwrap_or("absent")
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("kernel")).unwrap();
        if let Some(v) = value {
            std::fs::write(root.join("kernel/io_uring_disabled"), format!("{v}\n")).unwrap();
        }
        let e = explain_setup_error(io::Error::from_raw_os_error(libc::EPERM), &root);
        let _ = std::fs::remove_dir_all(&root);
        e.to_string()
    }

    #[test]
    fn a_refused_ring_says_why_and_what_to_do() {
        let two = eperm_with(Some("2"));
        assert!(
            two.contains("kernel.io_uring_disabled = 2")
                && two.contains("sysctl -w kernel.io_uring_disabled=0"),
            "{two}"
        );
        let one = eperm_with(Some("1"));
        assert!(one.contains("kernel.io_uring_group"), "{one}");
        for seccomp in [eperm_with(Some("0")), eperm_with(None)] {
            assert!(seccomp.contains("seccomp"), "{seccomp}");
        }
        let nosys = explain_setup_error(
            io::Error::from_raw_os_error(libc::ENOSYS),
            Path::new("/nonexistent"),
        );
        assert!(nosys.to_string().contains("5.19"), "{nosys}");
        let other = explain_setup_error(
            io::Error::from_raw_os_error(libc::EINVAL),
            Path::new("/nonexistent"),
        );
        assert_eq!(other.raw_os_error(), Some(libc::EINVAL));
    }
}
