//! Readers for the few /proc files a benchmark samples: a process's Pss and Rss, the
//! machine's slab and TCP socket figures, and the facts about the machine that go in a
//! report.
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
}
