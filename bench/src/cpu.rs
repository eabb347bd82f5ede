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
    started: Instant,
}

/// What a window measured.
pub struct Measured {
    /// The server's CPU, when server pids were given.
    pub server: Option<ServerCpu>,
    /// The load generator's CPU as a share of one core.
    pub client_utilization: Option<f64>,
    /// Wall-clock seconds of the window.
    pub wall_secs: f64,
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
        Measured {
            server,
            client_utilization,
            wall_secs,
        }
    }
}
