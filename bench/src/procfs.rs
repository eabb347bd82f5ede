//! Readers for the few /proc files a benchmark samples: a process's Pss and Rss, the CPU
//! time of a server's processes (a process and its descendants, so an nginx master's pid
//! covers its workers), the machine's slab, TCP socket and accept-queue figures, and the
//! facts about the machine that go in a report.
//!
//! Parsing is split from reading so the parsers are tested on captured text. A reader
//! returns an error naming the file when a field is missing; it never guesses a zero,
//! because a silent zero would turn into a plausible but wrong per-connection slope.

use std::fs;
use std::io;

use crate::report::Machine;
use crate::sys;

/// The value of a `Key:   1234 kB` line (as in smaps_rollup and meminfo), in bytes.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => Some(value * 1024),
            None => Some(value),
            Some(_) => None,
        }
    })
}

/// TCP sockets in use and TCP socket-buffer pages, from the `TCP:` line of
/// /proc/net/sockstat (`TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1`).
pub fn sockstat_tcp(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == name)?;
        words.get(at + 1)?.parse().ok()
    };
    Some((field("inuse")?, field("mem")?))
}

fn read(path: &str) -> io::Result<String> {
    fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn missing(path: &str, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{path}: no {what} field"),
    )
}

/// Pss and Rss of process `pid`, in bytes.
pub fn process_memory(pid: u32) -> io::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = read(&path)?;
    let pss = kb_field(&text, "Pss").ok_or_else(|| missing(&path, "Pss"))?;
    let rss = kb_field(&text, "Rss").ok_or_else(|| missing(&path, "Rss"))?;
    Ok((pss, rss))
}

/// Machine-wide kernel figures at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSample {
    /// Slab from /proc/meminfo, bytes.
    pub slab_bytes: u64,
    /// TCP `mem` from /proc/net/sockstat, pages.
    pub tcp_mem_pages: u64,
    /// TCP `inuse` from /proc/net/sockstat.
    pub tcp_inuse: u64,
}

/// Samples the machine's slab and TCP socket figures.
pub fn kernel_sample() -> io::Result<KernelSample> {
    let meminfo = read("/proc/meminfo")?;
    let slab_bytes = kb_field(&meminfo, "Slab").ok_or_else(|| missing("/proc/meminfo", "Slab"))?;
    let sockstat = read("/proc/net/sockstat")?;
    let (tcp_inuse, tcp_mem_pages) =
        sockstat_tcp(&sockstat).ok_or_else(|| missing("/proc/net/sockstat", "TCP"))?;
    Ok(KernelSample {
        slab_bytes,
        tcp_mem_pages,
        tcp_inuse,
    })
}

/// The machine this process runs on.
pub fn machine() -> Machine {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mem_total_bytes = read("/proc/meminfo")
        .ok()
        .and_then(|m| kb_field(&m, "MemTotal"))
        .unwrap_or(0);
    Machine {
        cores,
        kernel,
        mem_total_bytes,
    }
}

/// The page size `sockstat` counts its `mem` field in.
pub fn page_size() -> u64 {
    sys::page_size()
}

/// The fields of /proc/PID/stat a benchmark uses. CPU times are in clock ticks
/// ([`crate::sys::clock_ticks_per_sec`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcStat {
    /// Parent process id (field 4).
    pub ppid: u32,
    /// User time of every thread of the process (field 14).
    pub utime: u64,
    /// System time of every thread of the process (field 15).
    pub stime: u64,
    /// User time of its children that exited and were waited for (field 16).
    pub cutime: u64,
    /// System time of its children that exited and were waited for (field 17).
    pub cstime: u64,
}

/// CPU time in clock ticks, split into time spent running the processes' own code
/// (user) and time the kernel spent on their behalf (system: system calls, page faults,
/// and softirq work such as the loopback TCP stack when it runs in their context).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// User time: utime (+ cutime).
    pub user: u64,
    /// System time: stime (+ cstime).
    pub system: u64,
}

impl CpuTicks {
    /// User and system time together.
    pub fn total(&self) -> u64 {
        self.user + self.system
    }

    /// Adds `other`, part by part.
    fn plus(self, other: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }

    /// `self - earlier`, part by part, each never below zero.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl ProcStat {
    /// CPU time of the process and of its reaped children, in clock ticks: user is
    /// utime + cutime, system is stime + cstime. Counting the reaped children too means a
    /// worker process that exits during a run still has its CPU time counted, through its
    /// parent.
    pub fn ticks(&self) -> CpuTicks {
        CpuTicks {
            user: self.utime + self.cutime,
            system: self.stime + self.cstime,
        }
    }
}

/// Parses /proc/PID/stat. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), so field n is f[n - 3].
    let num = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(ProcStat {
        ppid: num(4)? as u32,
        utime: num(14)?,
        stime: num(15)?,
        cutime: num(16)?,
        cstime: num(17)?,
    })
}

/// `roots` and every descendant of them in the parent map `procs` (`(pid, ppid)` pairs),
/// roots first, each pid once.
pub fn with_descendants(roots: &[u32], procs: &[(u32, u32)]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for &r in roots {
        if !out.contains(&r) {
            out.push(r);
        }
    }
    let mut at = 0;
    while at < out.len() {
        let parent = out[at];
        for &(pid, ppid) in procs {
            if ppid == parent && !out.contains(&pid) {
                out.push(pid);
            }
        }
        at += 1;
    }
    out
}

/// Every process on the machine as `(pid, ppid)`. Processes that exit while the list is
/// read are skipped.
fn all_processes() -> io::Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(st) = parse_stat(&text) {
                out.push((pid, st.ppid));
            }
        }
    }
    Ok(out)
}

/// `roots` and all their descendants now. A root that is not running is an error naming
/// it: a server that is gone measures as zero, which must not look like a result.
pub fn process_tree(roots: &[u32]) -> io::Result<Vec<u32>> {
    for &r in roots {
        let path = format!("/proc/{r}/stat");
        read(&path)?;
    }
    Ok(with_descendants(roots, &all_processes()?))
}

/// CPU time of one process (see [`ProcStat::ticks`]), or `None` when it is gone.
pub fn process_ticks(pid: u32) -> Option<CpuTicks> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_stat(&text)?.ticks())
}

/// A snapshot of the CPU time of a set of processes: each pid with its user and system
/// ticks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// `(pid, ticks)` of every process measured.
    pub procs: Vec<(u32, CpuTicks)>,
}

impl CpuSnapshot {
    /// Samples `roots` and their descendants.
    pub fn take(roots: &[u32]) -> io::Result<CpuSnapshot> {
        let pids = process_tree(roots)?;
        Ok(CpuSnapshot {
            procs: pids
                .into_iter()
                .filter_map(|p| Some((p, process_ticks(p)?)))
                .collect(),
        })
    }

    /// Pids in this snapshot.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|&(p, _)| p).collect()
    }
}

/// CPU ticks spent between two snapshots by the processes in either, user and system
/// apart. A process that started in between counts from zero; one that exited in between
/// is subtracted at its starting figure and comes back whole in its parent's
/// reaped-children time (its utime in the parent's cutime, its stime in cstime), so each
/// sum is the time spent in the window either way. Each part is never below zero.
pub fn cpu_ticks_between(start: &CpuSnapshot, end: &CpuSnapshot) -> CpuTicks {
    let sum = |s: &CpuSnapshot| {
        s.procs
            .iter()
            .fold(CpuTicks::default(), |acc, &(_, t)| acc.plus(t))
    };
    sum(end).since(sum(start))
}

/// The value of `field` in the `group` (e.g. `TcpExt`) of /proc/net/netstat or
/// /proc/net/snmp, where each group is a line of names followed by a line of values.
pub fn netstat_field(text: &str, group: &str, field: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let names = names[prefix.len()..].split_whitespace();
        let mut values = values[prefix.len()..].split_whitespace();
        for name in names {
            let value = values.next()?;
            if name == field {
                return value.parse().ok();
            }
        }
    }
    None
}

/// The machine's accept-queue counters: TcpExt ListenOverflows and ListenDrops from
/// /proc/net/netstat (machine-wide, every listener together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenCounters {
    /// Connections that found a full accept queue.
    pub overflows: u64,
    /// Connections dropped at the listener for any reason (overflows included).
    pub drops: u64,
}

/// Samples [`ListenCounters`].
pub fn listen_counters() -> io::Result<ListenCounters> {
    let path = "/proc/net/netstat";
    let text = read(path)?;
    Ok(ListenCounters {
        overflows: netstat_field(&text, "TcpExt", "ListenOverflows")
            .ok_or_else(|| missing(path, "TcpExt ListenOverflows"))?,
        drops: netstat_field(&text, "TcpExt", "ListenDrops")
            .ok_or_else(|| missing(path, "TcpExt ListenDrops"))?,
    })
}

/// Pss and Rss summed over `roots` and their descendants, and the pids measured. Pss
/// splits shared pages among the processes sharing them, so the sum over a master and
/// its workers counts each page once.
pub fn tree_memory(roots: &[u32]) -> io::Result<(u64, u64, Vec<u32>)> {
    let pids = process_tree(roots)?;
    let (mut pss, mut rss) = (0, 0);
    for (i, &pid) in pids.iter().enumerate() {
        match process_memory(pid) {
            Ok((p, r)) => {
                pss += p;
                rss += r;
            }
            // A root must be readable; a descendant may have exited meanwhile.
            Err(e) if i < roots.len() => return Err(e),
            Err(_) => {}
        }
    }
    Ok((pss, rss, pids))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS_ROLLUP: &str = "\
55d0c5a4e000-7ffd8a5f1000 ---p 00000000 00:00 0                          [rollup]
Rss:               12880 kB
Pss:                4221 kB
Pss_Dirty:          2012 kB
Pss_Anon:           1980 kB
Shared_Clean:       9000 kB
";

    const MEMINFO: &str = "\
MemTotal:       24683996 kB
MemFree:        24237072 kB
Slab:             103220 kB
SReclaimable:      45004 kB
HugePages_Total:       0
";

    const SOCKSTAT: &str = "\
sockets: used 210
TCP: inuse 40012 orphan 0 tw 3 alloc 40015 mem 17
UDP: inuse 2 mem 0
";

    #[test]
    fn kb_fields() {
        assert_eq!(kb_field(SMAPS_ROLLUP, "Pss"), Some(4221 * 1024));
        assert_eq!(kb_field(SMAPS_ROLLUP, "Rss"), Some(12880 * 1024));
        assert_eq!(kb_field(MEMINFO, "Slab"), Some(103220 * 1024));
        assert_eq!(kb_field(MEMINFO, "MemTotal"), Some(24683996 * 1024));
        // A unitless field is a count, not kB.
        assert_eq!(kb_field(MEMINFO, "HugePages_Total"), Some(0));
        // "Pss" must not match "Pss_Dirty", nor "Slab" "SReclaimable".
        assert_eq!(kb_field("Pss_Dirty: 5 kB\n", "Pss"), None);
        assert_eq!(kb_field(MEMINFO, "Nope"), None);
    }

    #[test]
    fn sockstat() {
        assert_eq!(sockstat_tcp(SOCKSTAT), Some((40012, 17)));
        assert_eq!(sockstat_tcp("UDP: inuse 2 mem 0\n"), None);
        assert_eq!(sockstat_tcp("TCP: inuse 2\n"), None);
    }

    #[test]
    fn live_files_parse() {
        let (pss, rss) = process_memory(std::process::id()).unwrap();
        assert!(pss > 0 && rss >= pss, "pss {pss} rss {rss}");
        let k = kernel_sample().unwrap();
        assert!(k.slab_bytes > 0);
        let m = machine();
        assert!(m.cores >= 1 && m.mem_total_bytes > 0 && !m.kernel.is_empty());
        assert!(page_size() >= 4096);
    }

    #[test]
    fn stat_fields() {
        // The command name holds a space and a parenthesis.
        let text = "4242 (nginx: a (b)) S 4200 4242 4242 0 -1 4194624 1000 0 0 0 \
                    150 37 12 5 20 0 1 0 100 1000000 500 18446744073709551615 1 1 0 0 0 0 \
                    0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        let st = parse_stat(text).unwrap();
        assert_eq!(
            st,
            ProcStat {
                ppid: 4200,
                utime: 150,
                stime: 37,
                cutime: 12,
                cstime: 5
            }
        );
        assert_eq!(
            st.ticks(),
            CpuTicks {
                user: 150 + 12,
                system: 37 + 5
            }
        );
        assert_eq!(st.ticks().total(), 204);
        assert_eq!(parse_stat("1 (x) S 0 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants() {
        // 10 -> 11 -> 13, 10 -> 12; 20 is unrelated; 1 is the parent of 10.
        let procs = [(1, 0), (10, 1), (11, 10), (12, 10), (13, 11), (20, 1)];
        assert_eq!(with_descendants(&[10], &procs), vec![10, 11, 12, 13]);
        assert_eq!(with_descendants(&[11, 20], &procs), vec![11, 20, 13]);
        assert_eq!(with_descendants(&[10, 10], &procs), vec![10, 11, 12, 13]);
        assert_eq!(with_descendants(&[99], &procs), vec![99]);
    }

    fn ticks(user: u64, system: u64) -> CpuTicks {
        CpuTicks { user, system }
    }

    #[test]
    fn cpu_between_snapshots() {
        // Only user time here: the total is what it was before the split.
        let snap = |v: &[(u32, u64)]| CpuSnapshot {
            procs: v.iter().map(|&(p, t)| (p, ticks(t, 0))).collect(),
        };
        // 10 ran 50 ticks; 11 started and ran 7; 12 exited after 3 ticks at the start,
        // ran 4 more and was reaped by 10 (its 7 ticks show up in 10's children time).
        let start = snap(&[(10, 100), (12, 3)]);
        let end = snap(&[(10, 100 + 50 + 7), (11, 7)]);
        assert_eq!(cpu_ticks_between(&start, &end).total(), 50 + 7 + 4);
        assert_eq!(cpu_ticks_between(&end, &start).total(), 0, "never negative");
        assert_eq!(start.pids(), vec![10, 12]);
    }

    #[test]
    fn cpu_between_snapshots_keeps_user_and_system_apart() {
        let snap = |v: &[(u32, CpuTicks)]| CpuSnapshot { procs: v.to_vec() };
        // 10 ran 40 user + 10 system ticks; 11 started and ran 5 + 2; 12 had 2 + 1 at the
        // start, ran 3 + 1 more, exited and was reaped by 10: its utime (5) lands in 10's
        // cutime and its stime (2) in 10's cstime.
        let start = snap(&[(10, ticks(100, 30)), (12, ticks(2, 1))]);
        let end = snap(&[(10, ticks(100 + 40 + 5, 30 + 10 + 2)), (11, ticks(5, 2))]);
        let d = cpu_ticks_between(&start, &end);
        assert_eq!(d, ticks(40 + 5 + 3, 10 + 2 + 1));
        assert_eq!(d.total(), 48 + 13);
        // Each part is clamped on its own: a process that vanished unreaped (here 12, at
        // 2 + 20) cannot take one part below zero.
        let start = snap(&[(10, ticks(100, 30)), (12, ticks(2, 20))]);
        let end = snap(&[(10, ticks(110, 31))]);
        assert_eq!(cpu_ticks_between(&start, &end), ticks(8, 0));
        // Reversed, user time went down (clamped to zero) and system time up.
        assert_eq!(cpu_ticks_between(&end, &start), ticks(0, 19));
        assert_eq!(
            cpu_ticks_between(&snap(&[(1, ticks(5, 5))]), &snap(&[(1, ticks(4, 4))])),
            ticks(0, 0),
            "never negative"
        );
        // The split of a stat line: utime + cutime is user, stime + cstime is system.
        let st = ProcStat {
            ppid: 1,
            utime: 7,
            stime: 3,
            cutime: 2,
            cstime: 1,
        };
        assert_eq!(st.ticks(), ticks(9, 4));
        assert_eq!(ticks(9, 4).since(ticks(10, 1)), ticks(0, 3));
    }

    #[test]
    fn netstat_fields() {
        let text = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops
TcpExt: 0 0 17 19
IpExt: InNoRoutes ListenOverflows
IpExt: 5 99
";
        assert_eq!(netstat_field(text, "TcpExt", "ListenOverflows"), Some(17));
        assert_eq!(netstat_field(text, "TcpExt", "ListenDrops"), Some(19));
        assert_eq!(netstat_field(text, "IpExt", "ListenOverflows"), Some(99));
        assert_eq!(netstat_field(text, "TcpExt", "Nope"), None);
        assert_eq!(netstat_field(text, "Udp", "InErrors"), None);
    }

    #[test]
    fn live_process_figures() {
        let me = std::process::id();
        let tree = process_tree(&[me]).unwrap();
        assert_eq!(tree[0], me);
        let a = CpuSnapshot::take(&[me]).unwrap();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let b = CpuSnapshot::take(&[me]).unwrap();
        let d = cpu_ticks_between(&a, &b);
        assert!(d.total() <= 100, "{x}");
        assert_eq!(d.total(), d.user + d.system);
        let (pss, _, pids) = tree_memory(&[me]).unwrap();
        assert!(pss > 0 && pids[0] == me);
        listen_counters().unwrap();
        assert!(process_tree(&[u32::MAX - 1]).is_err());
    }
}

/// Busy and total clock ticks of `cpus` together, from the per-CPU lines of /proc/stat
/// (busy: everything but idle and iowait). `None` when /proc/stat cannot be read or names
/// none of them.
pub fn cpus_ticks(cpus: &[usize]) -> Option<(u64, u64)> {
    parse_cpus_ticks(&fs::read_to_string("/proc/stat").ok()?, cpus)
}

fn parse_cpus_ticks(text: &str, cpus: &[usize]) -> Option<(u64, u64)> {
    let (mut busy, mut total, mut seen) = (0u64, 0u64, false);
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(cpu) = fields.next().and_then(|n| n.strip_prefix("cpu")) else {
            continue;
        };
        let Ok(cpu) = cpu.parse::<usize>() else {
            continue; // the "cpu" line of all CPUs together
        };
        if !cpus.contains(&cpu) {
            continue;
        }
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let v: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
        if v.len() < 5 {
            continue;
        }
        let sum: u64 = v.iter().sum();
        total += sum;
        busy += sum - v[3] - v[4];
        seen = true;
    }
    seen.then_some((busy, total))
}

#[cfg(test)]
mod cpus_ticks_tests {
    use super::parse_cpus_ticks;

    #[test]
    fn busy_is_all_but_idle_and_iowait_of_the_named_cpus() {
        let text = "cpu  100 0 50 1000 10 0 5 0 0 0\n\
                    cpu0 60 0 30 400 5 0 5 0 0 0\n\
                    cpu1 40 0 20 600 5 0 0 0 0 0\n\
                    intr 12345\n";
        assert_eq!(parse_cpus_ticks(text, &[1]), Some((60, 665)));
        assert_eq!(parse_cpus_ticks(text, &[0, 1]), Some((155, 1165)));
        assert_eq!(parse_cpus_ticks(text, &[7]), None);
    }
}
