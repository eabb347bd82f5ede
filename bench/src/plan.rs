//! Pure planning for the load generator: the connection counts an idle run measures at,
//! how a count is shared among child processes, which source address a connection binds
//! and when an open-loop send is due.
//!
//! Nothing here reads a clock or opens a socket, so the arithmetic that decides what a
//! report means is unit-tested on its own. Timetables are offsets from a start instant
//! the caller picks; they never depend on how fast earlier work went, which is what keeps
//! the open-loop benchmarks honest about coordinated omission.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// Connections one child process holds at most by default: each process runs under the
/// machine's 20 000 open-file limit and needs headroom for its runtime's own descriptors.
pub const CONNS_PER_PROC: u64 = 9_000;

/// The loopback range source addresses are taken from when the target is on loopback:
/// 253 addresses, each with its own ephemeral port range, so no single address runs out
/// of ports long before the gateway runs out of anything.
pub const DEFAULT_SOURCES: &str = "127.0.0.2-127.0.0.254";

/// The step counts an idle run measures at: `steps` as given (strictly increasing, each at
/// least 1 and at most `conns`), with `conns` appended when the last step is below it;
/// with no steps given, `conns / 3` and `conns`. Two points at least, because a
/// per-connection cost is a slope, never one point.
pub fn idle_steps(conns: u64, steps: &[u64]) -> Result<Vec<u64>, String> {
    if conns < 2 {
        return Err(format!(
            "--conns {conns}: at least 2 connections are needed to measure a slope"
        ));
    }
    let mut out: Vec<u64> = if steps.is_empty() {
        vec![(conns / 3).max(1)]
    } else {
        steps.to_vec()
    };
    if out.last() != Some(&conns) {
        out.push(conns);
    }
    if let Some(&bad) = out.iter().find(|&&s| s == 0 || s > conns) {
        return Err(format!(
            "--steps: {bad} is outside 1..={conns} (--conns {conns})"
        ));
    }
    if out.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "--steps {}: counts must be strictly increasing",
            join(&out)
        ));
    }
    if out.len() < 2 {
        return Err("--steps: at least two distinct counts are needed".into());
    }
    Ok(out)
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Child processes needed so that none holds more than [`CONNS_PER_PROC`] connections.
pub fn default_procs(conns: u64) -> u64 {
    conns.div_ceil(CONNS_PER_PROC).max(1)
}

/// How many of `total` connections child `index` (0-based) of `procs` holds. Shares differ
/// by at most one, they add up to `total`, and a child's share never shrinks as `total`
/// grows, so every step only ever asks a child to open more.
pub fn share(total: u64, procs: u64, index: u64) -> u64 {
    debug_assert!(index < procs);
    (total + procs - 1 - index) / procs
}

/// Parses source addresses: a comma-separated list of single addresses or inclusive IPv4
/// ranges `A-B`, e.g. `127.0.0.2-127.0.0.254` or `10.0.0.1,10.0.0.2`.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if a > b {
                    return Err(format!("{part}: range runs backwards"));
                }
                if b - a >= 1 << 16 {
                    return Err(format!("{part}: more than 65 536 addresses"));
                }
                out.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            }
            None => out.push(part.parse().map_err(|e| format!("{part}: {e}"))?),
        }
    }
    if out.is_empty() {
        return Err(format!("no source address in {spec:?}"));
    }
    Ok(out)
}

/// The index into the source list for connection `n` (0-based, counted per child) of child
/// `child` of `procs`: round-robin, with each child starting at its own offset so that
/// the children together spread evenly over the range.
pub fn source_index(sources: usize, child: u64, procs: u64, n: u64) -> usize {
    debug_assert!(sources > 0 && child < procs);
    let start = (child as u128 * sources as u128 / procs as u128) as u64;
    ((start + n) % sources as u64) as usize
}

/// When the `n`-th event (0-based) of a timetable running at `rate` per second is due,
/// as an offset from the timetable's start.
pub fn due(n: u64, rate: f64) -> Duration {
    debug_assert!(rate > 0.0);
    Duration::from_secs_f64(n as f64 / rate)
}

/// The connection that sends the `n`-th frame (0-based) of an echo timetable: frames go
/// round-robin, so frame `i` of connection `c` is event `i * conns + c` and the total rate
/// is even across connections, not bursty.
pub fn echo_conn(n: u64, conns: u64) -> u64 {
    n % conns
}

/// The source addresses a client binds, as given in `spec` (see [`parse_sources`]), with
/// `none` meaning none (the kernel chooses) and no spec meaning [`DEFAULT_SOURCES`] when the
/// target is on loopback and none otherwise. Returns the spec in force and its addresses.
pub fn resolve_sources(
    spec: Option<&str>,
    target_is_loopback: bool,
) -> Result<Option<(String, Vec<IpAddr>)>, String> {
    let spec = match spec {
        Some("none") => return Ok(None),
        Some(s) => s,
        None if target_is_loopback => DEFAULT_SOURCES,
        None => return Ok(None),
    };
    Ok(Some((spec.to_string(), parse_sources(spec)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        assert_eq!(idle_steps(5000, &[]), Ok(vec![1666, 5000]));
        assert_eq!(idle_steps(2, &[]), Ok(vec![1, 2]));
        assert_eq!(idle_steps(36000, &[10000, 36000]), Ok(vec![10000, 36000]));
        assert_eq!(idle_steps(36000, &[10000]), Ok(vec![10000, 36000]));
        assert_eq!(
            idle_steps(30, &[5, 10, 20]),
            Ok(vec![5, 10, 20, 30]),
            "the full count is always measured"
        );
        assert!(idle_steps(1, &[]).is_err());
        assert!(idle_steps(100, &[0, 100]).is_err());
        assert!(idle_steps(100, &[200]).is_err());
        assert!(idle_steps(100, &[50, 50]).is_err());
        assert!(idle_steps(100, &[100]).is_err(), "one point is no slope");
    }

    #[test]
    fn procs() {
        assert_eq!(default_procs(1), 1);
        assert_eq!(default_procs(9000), 1);
        assert_eq!(default_procs(9001), 2);
        assert_eq!(default_procs(36000), 4);
        assert_eq!(default_procs(40000), 5);
    }

    #[test]
    fn shares_add_up_and_grow() {
        for procs in 1..7 {
            let mut prev = vec![0; procs as usize];
            for total in 0..50 {
                let s: Vec<u64> = (0..procs).map(|i| share(total, procs, i)).collect();
                assert_eq!(s.iter().sum::<u64>(), total);
                assert!(s.iter().max().unwrap() - s.iter().min().unwrap() <= 1);
                assert!(s.iter().zip(&prev).all(|(a, b)| a >= b));
                prev = s;
            }
        }
    }

    #[test]
    fn sources() {
        let v = parse_sources("127.0.0.2-127.0.0.254").unwrap();
        assert_eq!(v.len(), 253);
        assert_eq!(v[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(v[252], "127.0.0.254".parse::<IpAddr>().unwrap());
        let v = parse_sources("10.0.0.255-10.0.1.1, ::1").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1], "10.0.1.0".parse::<IpAddr>().unwrap());
        assert_eq!(v[3], "::1".parse::<IpAddr>().unwrap());
        assert!(parse_sources("").is_err());
        assert!(parse_sources("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_sources("nope").is_err());
    }

    #[test]
    fn round_robin_covers_the_range() {
        let (sources, procs) = (253usize, 4u64);
        let mut hits = vec![0u32; sources];
        for child in 0..procs {
            for n in 0..share(2530, procs, child) {
                hits[source_index(sources, child, procs, n)] += 1;
            }
        }
        // Each child is even to within one, so together they are even to within `procs`.
        let (lo, hi) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
        assert!(hi - lo <= procs as u32, "{hits:?}");
        assert_eq!(hits.iter().sum::<u32>(), 2530);
        assert_eq!(source_index(5, 0, 1, 7), 2);
    }

    #[test]
    fn timetable() {
        assert_eq!(due(0, 2000.0), Duration::ZERO);
        assert_eq!(due(2000, 2000.0), Duration::from_secs(1));
        assert_eq!(due(1, 4.0), Duration::from_millis(250));
        // 3 connections: frame 0 of each, then frame 1 of each.
        let order: Vec<u64> = (0..6).map(|n| echo_conn(n, 3)).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn sources_resolved() {
        let (spec, v) = resolve_sources(None, true).unwrap().unwrap();
        assert_eq!((spec.as_str(), v.len()), (DEFAULT_SOURCES, 253));
        assert_eq!(resolve_sources(None, false), Ok(None));
        assert_eq!(resolve_sources(Some("none"), true), Ok(None));
        let (_, v) = resolve_sources(Some("10.0.0.1,10.0.0.2"), false)
            .unwrap()
            .unwrap();
        assert_eq!(v.len(), 2);
        assert!(resolve_sources(Some("bad"), true).is_err());
    }
}
