//! A measured window of CPU time: the server's processes (with their descendants) and the
//! load generator itself, sampled at its start and end from /proc/PID/stat, user and system
//! time apart. The arithmetic lives in `report::server_cpu`; this only takes the samples.

use std::time::Instant;

use anyhow::Context;

use crate::procfs::{self, CpuSnapshot, CpuTicks};
use crate::report::{self, ServerCpu};
use crate::sys;

/// A window opened by [`Window::start`] and closed by [`Window::finish`].
pub struct Window {
    roots: Vec<u32>,
    cores: u32,
    server: Option<CpuSnapshot>,
    client: Option<CpuTicks>,
    /// The CPUs the load generator may run on, and their busy and total ticks at the start.
    loadgen: Option<(Vec<usize>, (u64, u64))>,
    started: Instant,
}

/// What a window measured.
pub struct Measured {
    /// The server's CPU, when server pids were given.
    pub server: Option<ServerCpu>,
    /// The load generator's CPU as a share of one core.
    pub client_utilization: Option<f64>,
    /// How busy the CPUs the load generator may run on (and the server may not) were over
    /// the window (0 to 1), whoever kept them busy: the load generator, a backend beside
    /// it, anything else. At [`CLIENT_BOUND`] or above, the client side, not the server,
    /// was the limit. `None` without server pids, or where the two share every CPU.
    pub loadgen_cpus_busy: Option<f64>,
    /// Wall-clock seconds of the window.
    pub wall_secs: f64,
}

/// The share of busy time on the load generator's CPUs from which a closed-loop figure
/// (handshakes per second) says more about the client side than about the server.
pub const CLIENT_BOUND: f64 = 0.9;

/// The summary line on the load generator's CPUs. After a closed loop (a rate the two
/// sides reach together) it says when the client side was the limit; after an open loop
/// (a fixed timetable) a busy client may have lagged its timetable, which the latency
/// from schedule then includes.
pub fn loadgen_line(busy: Option<f64>, closed_loop: bool) -> Option<String> {
    let busy = busy?;
    let verdict = match (busy >= CLIENT_BOUND, closed_loop) {
        (false, _) => "",
        (true, true) => ": the client side was the limit, not the server",
        (true, false) => ": the client may have lagged its timetable",
    };
    Some(format!(
        "  load generator's CPUs {:.0}% busy{verdict}",
        busy * 100.0
    ))
}

/// The CPUs the load generator may run on and the server may not: where the client side
/// works alone. `None` when they cannot be told apart: no server pids were given (the
/// server may be anywhere), or every CPU is shared.
fn loadgen_cpus(server_roots: &[u32]) -> Option<Vec<usize>> {
    if server_roots.is_empty() {
        return None;
    }
    let mut cpus = sys::affinity_cpus(0).ok()?;
    for &pid in server_roots {
        let server = sys::affinity_cpus(pid).ok()?;
        cpus.retain(|c| !server.contains(c));
    }
    (!cpus.is_empty()).then_some(cpus)
}

impl Window {
    /// Samples the server's processes (`roots` and descendants; none when empty) and this
    /// process. Fails when a server pid is not running, so a typo never reads as zero.
    pub fn start(roots: &[u32], cores: u32) -> anyhow::Result<Window> {
        let server = if roots.is_empty() {
            None
        } else {
            Some(CpuSnapshot::take(roots).with_context(|| {
                format!("reading the CPU time of server pid(s) {roots:?}: running on this machine?")
            })?)
        };
        Ok(Window {
            roots: roots.to_vec(),
            cores,
            server,
            client: procfs::process_ticks(std::process::id()),
            loadgen: loadgen_cpus(roots)
                .and_then(|cpus| procfs::cpus_ticks(&cpus).map(|t| (cpus, t))),
            started: Instant::now(),
        })
    }

    /// Samples again and works out the figures for `ops` operations done in the window.
    pub fn finish(self, ops: u64) -> Measured {
        let wall_secs = self.started.elapsed().as_secs_f64();
        let hz = sys::clock_ticks_per_sec();
        let server = self.server.as_ref().map(|start| {
            // A server that died mid-run measures what its processes left behind; the
            // report's failures say why.
            let end = CpuSnapshot::take(&self.roots).unwrap_or_default();
            let mut pids = start.pids();
            for p in end.pids() {
                if !pids.contains(&p) {
                    pids.push(p);
                }
            }
            let ticks = procfs::cpu_ticks_between(start, &end);
            report::server_cpu(ticks, hz, wall_secs, ops, self.cores, pids)
        });
        let client_utilization = match (self.client, procfs::process_ticks(std::process::id())) {
            (Some(a), Some(b)) if wall_secs > 0.0 => {
                Some(b.since(a).total() as f64 / hz as f64 / wall_secs)
            }
            _ => None,
        };
        let loadgen_cpus_busy = self.loadgen.and_then(|(cpus, (busy0, total0))| {
            let (busy1, total1) = procfs::cpus_ticks(&cpus)?;
            let total = total1.saturating_sub(total0);
            (total > 0).then(|| busy1.saturating_sub(busy0) as f64 / total as f64)
        });
        Measured {
            server,
            client_utilization,
            loadgen_cpus_busy,
            wall_secs,
        }
    }
}
