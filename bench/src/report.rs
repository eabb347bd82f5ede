//! What a benchmark run reports and the arithmetic behind it: per-connection slopes
//! between measured steps, percentile extraction from an hdrhistogram, and the structs
//! that become the JSON files.
//!
//! This module does no I/O and reads no clock: samples come in, numbers go out, so every
//! figure a report states can be checked by a unit test with known inputs. The JSON field
//! names are a contract with whoever reads the files (README tables, CI comparisons):
//! rename one only together with its readers.

use hdrhistogram::Histogram;
use serde::Serialize;

/// How the userspace figure of an idle run is obtained; copied into every idle report.
pub const USERSPACE_METHOD: &str = "gateway_pss_bytes is Pss from /proc/GATEWAY_PID/smaps_rollup \
(kB x 1024); the gateway's threads share one address space, so this one figure covers all of \
them. Each step is sampled settle_secs after the last of its connections finished its \
handshake and echoed one DATA frame. userspace_bytes_per_conn = (gateway_pss_bytes(last step) \
- gateway_pss_bytes(first step)) / (conns_open(last step) - conns_open(first step)), where \
conns_open counts the connections the load generator holds open at the sample, so fixed \
costs (code, config, buffer rings, tables sized at start) cancel out.";

/// How the kernel figure of an idle run is obtained; copied into every idle report.
pub const KERNEL_METHOD: &str =
    "machine_kernel_bytes = machine_slab_bytes (Slab in /proc/meminfo) \
+ machine_tcp_mem_pages x page size (the 'mem' field of the TCP line of /proc/net/sockstat, \
socket buffer pages). Both are machine-wide: they include the load generator's own sockets, \
every other process and background noise. kernel_bytes_per_conn_both_ends = \
(machine_kernel_bytes(last step) - machine_kernel_bytes(first step)) / (conns_open(last step) - \
conns_open(first step)). The gateway runs on this machine (its pid is read here), so each \
connection adds two TCP sockets, the client end and the gateway end (tcp_sockets_per_conn, the \
slope of sockstat TCP inuse, shows it is 2). Both ends cost the kernel about the same (TCP \
socket, inode, dentry, file), so kernel_bytes_per_conn = kernel_bytes_per_conn_both_ends / 2 is \
the gateway end's share; the client end also owns an epoll entry the gateway end does not, so \
the halved figure slightly overstates the gateway's share.";

/// Which report fields describe the gateway process alone and which the whole machine.
pub const SCOPE: &str = "gateway_*: the gateway process only. machine_*: the whole machine \
(kernel objects of both connection ends and of every other process). *_per_conn: slopes \
between the first and last step; segments: slopes between consecutive steps.";

/// The slope `(y2 - y1) / (x2 - x1)`, or `None` where `x` did not grow (no slope exists).
pub fn slope(x1: u64, y1: u64, x2: u64, y2: u64) -> Option<f64> {
    if x2 <= x1 {
        return None;
    }
    Some((y2 as f64 - y1 as f64) / (x2 - x1) as f64)
}

/// What the parent measured at one step of an idle run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StepSample {
    /// Connections this step asked for.
    pub target_conns: u64,
    /// Connections held open (handshake done, one frame echoed) when sampled.
    pub conns_open: u64,
    /// Connections of this step that failed to connect, handshake or echo their first frame.
    pub conns_failed: u64,
    /// Seconds this step took to open its connections.
    pub open_secs: f64,
    /// Connections opened per second during this step.
    pub open_rate: f64,
    /// Pss of the gateway process.
    pub gateway_pss_bytes: u64,
    /// Rss of the gateway process (for comparison: shared pages counted in full).
    pub gateway_rss_bytes: u64,
    /// Slab of the whole machine.
    pub machine_slab_bytes: u64,
    /// TCP socket buffer pages of the whole machine.
    pub machine_tcp_mem_pages: u64,
    /// `machine_tcp_mem_pages` times the page size.
    pub machine_tcp_mem_bytes: u64,
    /// TCP sockets in use on the whole machine (both ends of a loopback connection count).
    pub machine_tcp_inuse: u64,
    /// `machine_slab_bytes + machine_tcp_mem_bytes`.
    pub machine_kernel_bytes: u64,
}

/// Per-connection costs between two steps.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Slopes {
    /// Gateway Pss per connection.
    pub userspace_bytes_per_conn: Option<f64>,
    /// The gateway end's share of the kernel's memory per connection (see `method.kernel`).
    pub kernel_bytes_per_conn: Option<f64>,
    /// Kernel memory per connection, both ends together.
    pub kernel_bytes_per_conn_both_ends: Option<f64>,
    /// TCP sockets added per connection (2 where both ends are on this machine).
    pub tcp_sockets_per_conn: Option<f64>,
}

/// The slopes between two step samples; `conns_open` is the x axis.
pub fn slopes(a: &StepSample, b: &StepSample) -> Slopes {
    let (x1, x2) = (a.conns_open, b.conns_open);
    let both = slope(x1, a.machine_kernel_bytes, x2, b.machine_kernel_bytes);
    Slopes {
        userspace_bytes_per_conn: slope(x1, a.gateway_pss_bytes, x2, b.gateway_pss_bytes),
        kernel_bytes_per_conn: both.map(|k| k / 2.0),
        kernel_bytes_per_conn_both_ends: both,
        tcp_sockets_per_conn: slope(x1, a.machine_tcp_inuse, x2, b.machine_tcp_inuse),
    }
}

/// The slopes between consecutive steps.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Segment {
    /// Connections open at the segment's start.
    pub from_conns: u64,
    /// Connections open at the segment's end.
    pub to_conns: u64,
    /// The slopes over this segment.
    #[serde(flatten)]
    pub slopes: Slopes,
}

/// Slopes between each pair of consecutive steps.
pub fn segments(steps: &[StepSample]) -> Vec<Segment> {
    steps
        .windows(2)
        .map(|w| Segment {
            from_conns: w[0].conns_open,
            to_conns: w[1].conns_open,
            slopes: slopes(&w[0], &w[1]),
        })
        .collect()
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

/// Percentiles of a histogram recorded in microseconds. hdrhistogram reports the highest
/// value equivalent to the sample at each quantile, so figures are exact to the
/// histogram's precision (3 significant digits here) and never round a tail down.
pub fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        count: h.len(),
        p50_us: h.value_at_quantile(0.50),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        mean_us: h.mean(),
    }
}

/// A histogram for latencies in microseconds, from 1 µs to one hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

/// The machine a run was taken on.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Machine {
    /// CPUs this process may run on (what `nproc` prints).
    pub cores: usize,
    /// Kernel release (what `uname -r` prints).
    pub kernel: String,
    /// MemTotal from /proc/meminfo.
    pub mem_total_bytes: u64,
}

/// Versions of the software that produced a report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Versions {
    /// This crate's version.
    pub holdfast_bench: String,
}

impl Versions {
    /// The versions of this build.
    pub fn current() -> Versions {
        Versions {
            holdfast_bench: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Where each idle figure comes from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IdleMethod {
    /// See [`USERSPACE_METHOD`].
    pub userspace: &'static str,
    /// See [`KERNEL_METHOD`].
    pub kernel: &'static str,
    /// See [`SCOPE`].
    pub scope: &'static str,
}

impl Default for IdleMethod {
    fn default() -> IdleMethod {
        IdleMethod {
            userspace: USERSPACE_METHOD,
            kernel: KERNEL_METHOD,
            scope: SCOPE,
        }
    }
}

/// The parameters of an idle run, as resolved (defaults filled in).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IdleParameters {
    /// Gateway address.
    pub target: String,
    /// TLS server name sent and verified.
    pub server_name: String,
    /// Connections at the last step.
    pub conns: u64,
    /// Connections opened per second (all children together).
    pub rate: f64,
    /// Connection counts measured at.
    pub steps: Vec<u64>,
    /// Source addresses as given, or null where sockets were not bound.
    pub sources: Option<String>,
    /// Number of source addresses.
    pub source_count: usize,
    /// Child processes holding the connections.
    pub procs: u64,
    /// Payload bytes of each DATA frame.
    pub frame_size: usize,
    /// Seconds waited after each step before sampling.
    pub settle_secs: f64,
    /// Per-connection bound on connect + handshake + first echo, and on the final echo.
    pub timeout_secs: f64,
    /// The gateway process measured.
    pub gateway_pid: u32,
}

/// Failures of connections, by the stage that failed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Failures {
    /// TCP connect (or bind) failed.
    pub connect_failed: u64,
    /// TLS handshake failed or chose another ALPN protocol.
    pub handshake_failed: u64,
    /// The first DATA frame did not come back intact.
    pub first_echo_failed: u64,
    /// Of the failures above, those that ran into the per-connection timeout.
    pub timed_out: u64,
    /// Connections the gateway closed (or lost) while they sat idle.
    pub dropped_while_idle: u64,
}

impl Failures {
    /// Connections that never became usable.
    pub fn open_failed(&self) -> u64 {
        self.connect_failed + self.handshake_failed + self.first_echo_failed
    }
}

/// The outcome of an idle run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct IdleResults {
    /// True when every connection opened, stayed open and echoed at the end.
    pub ok: bool,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
    /// Raw numbers of each step.
    pub steps: Vec<StepSample>,
    /// Slopes between the first and the last step.
    #[serde(flatten)]
    pub slopes: Slopes,
    /// Slopes between consecutive steps.
    pub segments: Vec<Segment>,
    /// Connections opened successfully over the run.
    pub conns_opened: u64,
    /// Failures by stage.
    #[serde(flatten)]
    pub failures: Failures,
    /// Connections that echoed in the final check.
    pub echo_ok: u64,
    /// Connections opened successfully that did not echo in the final check (dropped
    /// while idle included).
    pub echo_failed: u64,
    /// Wall-clock seconds of the whole run.
    pub elapsed_secs: f64,
}

/// The JSON report of `holdfast-bench idle`.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Always "idle".
    pub scenario: &'static str,
    /// Parameters as resolved.
    pub parameters: IdleParameters,
    /// The machine.
    pub machine: Machine,
    /// Software versions.
    pub versions: Versions,
    /// Where each figure comes from.
    pub method: IdleMethod,
    /// What was measured.
    pub results: IdleResults,
}

/// The parameters of an echo run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EchoParameters {
    /// Gateway address.
    pub target: String,
    /// TLS server name sent and verified.
    pub server_name: String,
    /// Connections.
    pub conns: u64,
    /// Payload bytes per frame.
    pub size: usize,
    /// Frames per second scheduled, all connections together.
    pub rate: f64,
    /// Seconds of scheduled sending.
    pub duration_secs: f64,
    /// Per-connection bound on connect + handshake, and on the final drain.
    pub timeout_secs: f64,
}

/// The outcome of an echo run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct EchoResults {
    /// True when every connection opened and every frame came back intact.
    pub ok: bool,
    /// Connections that completed the handshake.
    pub conns_ok: u64,
    /// Connections that failed to connect or handshake.
    pub conns_failed: u64,
    /// Frames the timetable scheduled.
    pub frames_scheduled: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Frames echoed back intact.
    pub frames_received: u64,
    /// Frames sent but never echoed (lost, or still in flight at the drain deadline).
    pub frames_lost: u64,
    /// Echoed frames whose payload differed from what was sent.
    pub frames_corrupt: u64,
    /// Connections that ended with an I/O, TLS or protocol error.
    pub conn_errors: u64,
    /// `frames_received / duration_secs`.
    pub frames_per_sec: f64,
    /// Latency from each frame's scheduled send time to its echo, in microseconds:
    /// the figure that does not hide coordinated omission.
    pub latency: Latency,
    /// Latency from each frame's actual write to its echo (service time), in microseconds;
    /// the gap to `latency` is time the client spent behind its timetable.
    pub service_latency: Latency,
    /// Wall-clock seconds of the whole run, connecting and draining included.
    pub elapsed_secs: f64,
}

/// The JSON report of `holdfast-bench echo`.
#[derive(Debug, Clone, Serialize)]
pub struct EchoReport {
    /// Always "echo".
    pub scenario: &'static str,
    /// Parameters as given.
    pub parameters: EchoParameters,
    /// The machine.
    pub machine: Machine,
    /// Software versions.
    pub versions: Versions,
    /// What was measured.
    pub results: EchoResults,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(conns: u64, pss: u64, kernel: u64, inuse: u64) -> StepSample {
        StepSample {
            conns_open: conns,
            gateway_pss_bytes: pss,
            machine_kernel_bytes: kernel,
            machine_tcp_inuse: inuse,
            ..StepSample::default()
        }
    }

    #[test]
    fn slope_basics() {
        assert_eq!(slope(10, 100, 20, 300), Some(20.0));
        assert_eq!(slope(10, 300, 20, 100), Some(-20.0), "memory may shrink");
        assert_eq!(slope(10, 100, 10, 300), None);
        assert_eq!(slope(20, 100, 10, 300), None);
        assert_eq!(slope(0, 0, 3, 1), Some(1.0 / 3.0));
    }

    #[test]
    fn idle_slopes_from_known_steps() {
        // 5 000 -> 15 000 connections: Pss +40 MB, kernel +73 MB, 20 000 more sockets.
        let a = sample(5_000, 60_000_000, 1_000_000_000, 10_010);
        let b = sample(15_000, 100_000_000, 1_073_000_000, 30_010);
        let s = slopes(&a, &b);
        assert_eq!(s.userspace_bytes_per_conn, Some(4_000.0));
        assert_eq!(s.kernel_bytes_per_conn_both_ends, Some(7_300.0));
        assert_eq!(s.kernel_bytes_per_conn, Some(3_650.0));
        assert_eq!(s.tcp_sockets_per_conn, Some(2.0));
        assert_eq!(slopes(&a, &a), Slopes::default());
    }

    #[test]
    fn segments_between_consecutive_steps() {
        let steps = [
            sample(100, 1_000, 0, 0),
            sample(200, 2_000, 0, 0),
            sample(400, 2_400, 0, 0),
        ];
        let seg = segments(&steps);
        assert_eq!(seg.len(), 2);
        assert_eq!((seg[0].from_conns, seg[0].to_conns), (100, 200));
        assert_eq!(seg[0].slopes.userspace_bytes_per_conn, Some(10.0));
        assert_eq!(seg[1].slopes.userspace_bytes_per_conn, Some(2.0));
        assert!(segments(&steps[..1]).is_empty());
    }

    #[test]
    fn percentiles_from_known_samples() {
        let mut h = latency_histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let l = latency(&h);
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50_us, 500);
        assert_eq!(l.p99_us, 990);
        assert_eq!(l.p999_us, 999);
        assert_eq!(l.max_us, 1000);
        assert!((l.mean_us - 500.5).abs() < 0.01, "{}", l.mean_us);
    }

    #[test]
    fn percentiles_keep_the_tail() {
        // 999 fast samples and one stall: p999 must show the stall, not hide it.
        let mut h = latency_histogram();
        h.record_n(50, 999).unwrap();
        h.record(2_000_000).unwrap();
        let l = latency(&h);
        assert_eq!((l.p50_us, l.p99_us), (50, 50));
        assert_eq!(l.p999_us, 50);
        assert!(
            l.max_us >= 2_000_000 && l.max_us < 2_002_000,
            "{}",
            l.max_us
        );
        h.record(2_000_000).unwrap();
        assert!(latency(&h).p999_us >= 2_000_000);
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        assert_eq!(latency(&latency_histogram()), Latency::default());
    }

    #[test]
    fn json_field_names() {
        let results = IdleResults {
            steps: vec![sample(1, 2, 3, 4)],
            slopes: Slopes {
                userspace_bytes_per_conn: Some(1.5),
                ..Slopes::default()
            },
            ..IdleResults::default()
        };
        let v = serde_json::to_value(&results).unwrap();
        for key in [
            "ok",
            "error",
            "steps",
            "userspace_bytes_per_conn",
            "kernel_bytes_per_conn",
            "kernel_bytes_per_conn_both_ends",
            "tcp_sockets_per_conn",
            "segments",
            "conns_opened",
            "connect_failed",
            "handshake_failed",
            "first_echo_failed",
            "timed_out",
            "dropped_while_idle",
            "echo_ok",
            "echo_failed",
            "elapsed_secs",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert_eq!(v["userspace_bytes_per_conn"], 1.5);
        assert!(v["kernel_bytes_per_conn"].is_null());
        assert_eq!(v["steps"][0]["gateway_pss_bytes"], 2);
    }
}
