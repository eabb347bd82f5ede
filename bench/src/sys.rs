//! The few libc calls the load generator needs and the only `unsafe` in this crate:
//! raising the open-file limit, asking the page size and the clock-tick rate, tightening
//! a thread's timer slack, reading a thread's CPU clock and the CPUs it may run on.
//!
//! Each call passes plain integers or a pointer to a local it owns for the call's
//! duration; nothing here keeps a pointer or touches memory the kernel writes later.
#![allow(unsafe_code)]

use std::io;

/// Raises the soft RLIMIT_NOFILE to the hard limit, so one process can hold as many
/// sockets as the machine allows it. Returns the new (soft, hard) pair.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live, properly aligned rlimit that getrlimit only writes into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a live rlimit that setrlimit only reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The size of a memory page in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf takes an integer name and touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Asks the kernel to wake this thread's sleeps within `ns` nanoseconds of their deadline
/// instead of the default 50 µs, so a pacing thread keeps its timetable to microseconds.
/// Best effort: on failure the default slack stays and only timing precision suffers.
pub fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument; prctl reads no memory of ours.
    // The argument is passed as c_ulong, the width prctl reads it with.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong);
    }
}

/// The CPU time this thread has used so far (CLOCK_THREAD_CPUTIME_ID), with nanosecond
/// resolution. Unlike a wall clock it does not advance while the thread is preempted, so
/// timing a few calls with it measures their own cost on a busy machine.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, properly aligned timespec that clock_gettime only writes into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Clock ticks per second, the unit of the CPU times in /proc/PID/stat (usually 100).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf takes an integer name and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// The CPUs thread `tid` may run on (its affinity mask, as `taskset` set it); 0 is the
/// calling thread, a process id names that process's main thread.
pub fn affinity_cpus(tid: u32) -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed, which sched_getaffinity only
    // writes into; the id is a plain integer.
    let rc = unsafe {
        libc::sched_getaffinity(
            tid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads bit `cpu` of the set, and `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}
