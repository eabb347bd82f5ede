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

use crate::procfs::CpuTicks;

/// How the userspace figure of an idle run is obtained; copied into every idle report.
pub const USERSPACE_METHOD: &str = "gateway_pss_bytes is Pss from /proc/PID/smaps_rollup \
(kB x 1024), summed over every pid in gateway_pids and its descendants (an nginx master and its \
workers; Pss splits shared pages among the processes sharing them, so the sum counts each page \
once); a process's threads share one address space, so one figure covers all of them. Each step is sampled settle_secs after the last of its connections finished its \
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
    /// The first gateway process measured (kept for readers of older reports).
    pub gateway_pid: u32,
    /// Every gateway process given; their descendants are measured too.
    pub gateway_pids: Vec<u32>,
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
    /// The `--then-run` command and what the probes saw while it ran, if one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub then_run: Option<ThenRun>,
}

/// A command run while every connection was held (`idle --then-run`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ThenRun {
    /// The shell command.
    pub command: String,
    /// Its wall-clock seconds.
    pub secs: f64,
    /// Its exit code (`None`: killed by a signal, or it could not start).
    pub exit_code: Option<i32>,
    /// The probe connections that echoed throughout.
    pub probes: crate::probe::ProbeStats,
}

/// The JSON report of a measuring subcommand: what ran, where, and what it measured.
/// Every scenario shares this frame; `P` is its parameters, `R` its results and `M` the
/// statement of its method.
#[derive(Debug, Clone, Serialize)]
pub struct Report<P, R, M = &'static str> {
    /// The subcommand: "idle", "echo", "handshake", "storm" or "ceiling".
    pub scenario: &'static str,
    /// The name of the system measured (`--label`), which `report` groups runs by.
    pub label: Option<String>,
    /// Parameters as resolved (defaults filled in).
    pub parameters: P,
    /// The machine.
    pub machine: Machine,
    /// Software versions.
    pub versions: Versions,
    /// Where the figures come from; absent where the scenario states no method (echo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<M>,
    /// What was measured.
    pub results: R,
}

impl<P, R, M> Report<P, R, M> {
    /// A report of this build, taken on `machine`.
    pub fn new(
        scenario: &'static str,
        label: Option<String>,
        parameters: P,
        machine: Machine,
        method: Option<M>,
        results: R,
    ) -> Self {
        Report {
            scenario,
            label,
            parameters,
            machine,
            versions: Versions::current(),
            method,
            results,
        }
    }
}

/// The JSON report of `holdfast-bench idle`; its method is [`IdleMethod`].
pub type IdleReport = Report<IdleParameters, IdleResults, IdleMethod>;

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
    /// Server processes whose CPU time is measured (with their descendants); empty: none.
    pub server_pids: Vec<u32>,
    /// CPU cores the server runs on, the divisor of the per-core figures.
    pub server_cores: u32,
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
    /// `frames_per_sec / server_cores`.
    pub frames_per_sec_per_core: f64,
    /// Server CPU time per echoed frame, in microseconds (`server_cpu.us_per_op`); null
    /// without `--server-pids`.
    pub server_cpu_us_per_frame: Option<f64>,
    /// The server's CPU time over the sending window (see [`CPU_METHOD`]).
    pub server_cpu: Option<ServerCpu>,
    /// The load generator's own CPU time over the same window, as a share of one core: near
    /// 1.0 the client, not the server, was the limit.
    pub client_cpu_utilization: Option<f64>,
    /// How busy the load generator's CPUs were over the window (0 to 1; backends running
    /// there count too): at 0.9 or above the client side was the limit.
    pub loadgen_cpus_busy: Option<f64>,
    /// Wall-clock seconds of the whole run, connecting and draining included.
    pub elapsed_secs: f64,
}

/// The JSON report of `holdfast-bench echo`, which states no method.
pub type EchoReport = Report<EchoParameters, EchoResults>;

/// How the server CPU figures are obtained; copied into every report that has them.
pub const CPU_METHOD: &str = "Server CPU time is utime + stime + cutime + cstime from \
/proc/PID/stat (clock ticks, sysconf(_SC_CLK_TCK) per second) summed over every pid in \
server_pids and all their descendants, sampled right before and right after the measured \
window; the difference is cpu_secs. It covers every thread of those processes and the kernel \
work done in their context (system calls, and the loopback network stack where it runs in \
their context), and nothing of the load generator or the echo backend. us_per_op = cpu_secs \
/ ops; capacity_per_core = 1e6 / us_per_op, the operations one fully busy core of the server \
would complete; utilization = cpu_secs / (wall_secs x cores). The same ticks split: \
user_cpu_secs is utime + cutime (the server's own code), kernel_cpu_secs is stime + cstime \
(system calls, and the loopback TCP stack and wake-ups of other processes run in the server's \
context); user_us_per_op and kernel_us_per_op divide each by ops and add up to us_per_op.";

/// What the server's processes spent over a measured window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ServerCpu {
    /// Processes measured: those given and their descendants.
    pub pids: Vec<u32>,
    /// Cores the server runs on (`--server-cores`).
    pub cores: u32,
    /// CPU seconds the processes used in the window (`user_cpu_secs + kernel_cpu_secs`).
    pub cpu_secs: f64,
    /// Of `cpu_secs`, user time (utime + cutime): the server's own code.
    pub user_cpu_secs: f64,
    /// Of `cpu_secs`, system time (stime + cstime): the kernel working in the server's
    /// context (system calls, the loopback TCP stack where it runs there, waking other
    /// processes).
    pub kernel_cpu_secs: f64,
    /// Wall-clock seconds of the window.
    pub wall_secs: f64,
    /// `cpu_secs / (wall_secs * cores)`: how busy the server's cores were.
    pub utilization: f64,
    /// Operations (handshakes, frames) completed in the window.
    pub ops: u64,
    /// `cpu_secs / ops` in microseconds; null when no operation completed.
    pub us_per_op: Option<f64>,
    /// `user_cpu_secs / ops` in microseconds: the userspace part of `us_per_op`; null when
    /// no operation completed.
    pub user_us_per_op: Option<f64>,
    /// `kernel_cpu_secs / ops` in microseconds: the kernel part of `us_per_op`; null when
    /// no operation completed.
    pub kernel_us_per_op: Option<f64>,
    /// `1e6 / us_per_op`: operations per second one fully busy server core would do.
    pub capacity_per_core: Option<f64>,
}

/// Server CPU figures from tick counts over a window: `ticks` (user and system apart) at
/// `hz` per second, over `wall_secs`, for `ops` operations on `cores` cores.
pub fn server_cpu(
    ticks: CpuTicks,
    hz: u64,
    wall_secs: f64,
    ops: u64,
    cores: u32,
    pids: Vec<u32>,
) -> ServerCpu {
    let secs = |t: u64| t as f64 / hz.max(1) as f64;
    let per_op = |secs: f64| (ops > 0).then(|| secs * 1e6 / ops as f64);
    let cpu_secs = secs(ticks.total());
    let user_cpu_secs = secs(ticks.user);
    let kernel_cpu_secs = secs(ticks.system);
    let us_per_op = per_op(cpu_secs);
    ServerCpu {
        pids,
        cores,
        cpu_secs,
        user_cpu_secs,
        kernel_cpu_secs,
        wall_secs,
        utilization: if wall_secs > 0.0 {
            cpu_secs / (wall_secs * cores.max(1) as f64)
        } else {
            0.0
        },
        ops,
        us_per_op,
        user_us_per_op: per_op(user_cpu_secs),
        kernel_us_per_op: per_op(kernel_cpu_secs),
        capacity_per_core: us_per_op.filter(|&u| u > 0.0).map(|u| 1e6 / u),
    }
}

/// `count / secs`, or 0 for an empty window.
pub fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Failures of short connections, by the stage that failed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StageFailures {
    /// TCP connect (or bind) failed.
    pub connect_failed: u64,
    /// TLS handshake failed or chose another ALPN protocol.
    pub handshake_failed: u64,
    /// The DATA frame did not come back intact.
    pub echo_failed: u64,
    /// Of the failures above, those that ran into the timeout.
    pub timed_out: u64,
}

impl StageFailures {
    /// All failures.
    pub fn total(&self) -> u64 {
        self.connect_failed + self.handshake_failed + self.echo_failed
    }
}

/// The parameters of a handshake run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HandshakeParameters {
    /// Server address.
    pub target: String,
    /// TLS server name sent and verified.
    pub server_name: String,
    /// Connections in flight at once (closed loops).
    pub conns_parallel: u64,
    /// Seconds of the measured window (in-flight connections finish after it).
    pub duration_secs: f64,
    /// True: each loop resumes with a ticket from its previous connection.
    pub resume: bool,
    /// Payload bytes of the one DATA frame each connection echoes.
    pub size: usize,
    /// Source addresses as given, or null where sockets were not bound.
    pub sources: Option<String>,
    /// Number of source addresses.
    pub source_count: usize,
    /// Bound on each connection (connect, handshake, echo).
    pub timeout_secs: f64,
    /// Server processes measured (with descendants).
    pub server_pids: Vec<u32>,
    /// Cores the server runs on.
    pub server_cores: u32,
    /// The order the clients offered their TLS 1.3 suites in: `devices` or `rustls`.
    pub suites: crate::client::SuiteOrder,
    /// How often the clients verified the server's handshake signature over its pinned
    /// chain: `sampled` (one handshake in 64) or `every`.
    pub signatures: crate::client::SignatureChecks,
}

/// The outcome of a handshake run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct HandshakeResults {
    /// True when connections completed and none failed.
    pub ok: bool,
    /// Short connections completed in the window (connect, handshake, one echo, close).
    pub handshakes: u64,
    /// Of those, full handshakes.
    pub full: u64,
    /// Of those, resumed handshakes (a ticket from an earlier connection was accepted).
    pub resumed: u64,
    /// Failed attempts, by stage.
    pub failures: StageFailures,
    /// Seconds from the window's start until the last connection started in it finished.
    pub window_secs: f64,
    /// `handshakes / window_secs`.
    pub handshakes_per_sec: f64,
    /// `handshakes_per_sec / server_cores`.
    pub handshakes_per_sec_per_core: f64,
    /// Server CPU per short connection in microseconds (`server_cpu.us_per_op`).
    pub server_cpu_us_per_handshake: Option<f64>,
    /// The server's CPU time over the window.
    pub server_cpu: Option<ServerCpu>,
    /// The load generator's CPU over the window as a share of one core.
    pub client_cpu_utilization: Option<f64>,
    /// How busy the load generator's CPUs were over the window (0 to 1; backends running
    /// there count too): at 0.9 or above the client side was the limit.
    pub loadgen_cpus_busy: Option<f64>,
    /// Duration of each whole short connection (connect to echo received), microseconds.
    pub latency: Latency,
    /// TLS cipher suite negotiated (the last connection's).
    pub cipher_suite: Option<String>,
    /// Key exchange group negotiated (the last connection's).
    pub kx_group: Option<String>,
    /// Wall-clock seconds of the whole run, warm-up included.
    pub elapsed_secs: f64,
}

/// The JSON report of `holdfast-bench handshake`; its method is [`CPU_METHOD`].
pub type HandshakeReport = Report<HandshakeParameters, HandshakeResults>;

/// Where a storm's accept-queue figures come from.
pub const LISTEN_SCOPE: &str = "listen_overflows and listen_drops are the change of TcpExt \
ListenOverflows and ListenDrops in /proc/net/netstat over the storm: machine-wide, every \
listener on the machine together, not only the server's. A connection that overflows the \
accept queue has its handshake ACK dropped and is retried by the client's kernel after a \
second or more, which shows as a tail in reconnect_latency.";

/// The parameters of a storm run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StormParameters {
    /// Server address.
    pub target: String,
    /// TLS server name sent and verified.
    pub server_name: String,
    /// Clients connected before the storm, all of which drop and reconnect at once.
    pub conns: u64,
    /// True: clients reconnect with the session ticket of their first connection.
    pub resume: bool,
    /// Payload bytes of the DATA frame each connection echoes.
    pub size: usize,
    /// Connections opened per second before the storm.
    pub connect_rate: f64,
    /// Source addresses as given, or null where sockets were not bound.
    pub sources: Option<String>,
    /// Number of source addresses.
    pub source_count: usize,
    /// Seconds every client has to be back after the drop; also each attempt's bound.
    pub timeout_secs: f64,
    /// Server processes measured (with descendants).
    pub server_pids: Vec<u32>,
    /// Cores the server runs on.
    pub server_cores: u32,
}

/// The outcome of a storm run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StormResults {
    /// True when every client connected, came back after the drop and nothing failed.
    pub ok: bool,
    /// Clients connected (handshake and one echo) before the storm.
    pub connected: u64,
    /// Clients that failed to connect before the storm.
    pub initial_failures: StageFailures,
    /// Clients back (reconnected, handshake done, one frame echoed) after the drop.
    pub back: u64,
    /// True when every connected client came back.
    pub all_back: bool,
    /// Seconds from the drop until the last client was back; null when not all came back.
    pub recovery_secs: Option<f64>,
    /// Reconnection attempts that failed (each client retries until its deadline).
    pub reconnect_failures: StageFailures,
    /// Reconnections that resumed a TLS session.
    pub resumed: u64,
    /// Reconnections with a full handshake.
    pub full: u64,
    /// Time from the drop until each client was back, in microseconds.
    pub reconnect_latency: Latency,
    /// Change of TcpExt ListenOverflows over the storm (machine-wide, see `listen_scope`).
    pub listen_overflows: u64,
    /// Change of TcpExt ListenDrops over the storm (machine-wide).
    pub listen_drops: u64,
    /// [`LISTEN_SCOPE`].
    pub listen_scope: &'static str,
    /// Server CPU from the drop until the last client was back (or the deadline).
    pub server_cpu: Option<ServerCpu>,
    /// Server CPU per client brought back, microseconds.
    pub server_cpu_us_per_reconnect: Option<f64>,
    /// Wall-clock seconds of the whole run.
    pub elapsed_secs: f64,
}

/// The JSON report of `holdfast-bench storm`; its method is [`CPU_METHOD`].
pub type StormReport = Report<StormParameters, StormResults>;

/// How the ceiling is measured; copied into its report.
pub const CEILING_METHOD: &str = "rustls alone, in memory, on one thread: a client and a server \
connection exchange TLS bytes through Vecs, no sockets. server_* figures time only the server's \
calls (ServerConnection::new, read_tls, process_new_packets, write_tls, reader/writer, drop) \
with the thread's CPU clock (CLOCK_THREAD_CPUTIME_ID), minus the measured cost of reading that \
clock; both_sides_* figures are wall-clock rates of the whole loop, client work included. The \
server is configured as holdfast's is: TLS 1.3 only, ALPN holdfast/1, two session tickets sent \
after each handshake. Records: the client encrypts a batch of record_size-byte records, the \
server decrypts them and encrypts each back (one decrypt + one encrypt is what a relay spends on \
a frame), and the client decrypts the echoes; server_us_per_record_pair is the server's part.";

/// Handshakes of one kind in the ceiling.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CeilingHandshakes {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Of them, resumed (the server accepted the client's ticket).
    pub resumed: u64,
    /// Server CPU seconds (server calls only).
    pub server_cpu_secs: f64,
    /// Server CPU per handshake, microseconds.
    pub server_us_per_handshake: Option<f64>,
    /// `1e6 / server_us_per_handshake`: handshakes per second of one core spent on the
    /// server side only.
    pub server_handshakes_per_sec: Option<f64>,
    /// Handshakes per second of the whole loop (client and server on one core).
    pub both_sides_handshakes_per_sec: f64,
    /// Wall-clock seconds.
    pub wall_secs: f64,
}

/// Small records in the ceiling.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CeilingRecords {
    /// Plaintext bytes per record.
    pub record_size: usize,
    /// Records relayed (each: client encrypt, server decrypt, server encrypt, client decrypt).
    pub records: u64,
    /// Server CPU seconds (decrypt + encrypt of every record).
    pub server_cpu_secs: f64,
    /// Server CPU per record decrypted and encrypted again, microseconds.
    pub server_us_per_record_pair: Option<f64>,
    /// `1e6 / server_us_per_record_pair`: record encrypt+decrypt pairs per second per core.
    pub server_record_pairs_per_sec: Option<f64>,
    /// Records relayed per second by the whole loop (both sides on one core).
    pub both_sides_records_per_sec: f64,
    /// Wall-clock seconds.
    pub wall_secs: f64,
}

/// The parameters of a ceiling run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CeilingParameters {
    /// Seconds spent on each part (full handshakes, resumed handshakes, records).
    pub seconds: f64,
    /// Plaintext bytes per record.
    pub record_size: usize,
    /// Records per batch.
    pub batch: usize,
    /// Crypto provider.
    pub provider: &'static str,
    /// Server certificate key.
    pub certificate: &'static str,
}

/// The outcome of a ceiling run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CeilingResults {
    /// Full handshakes (client resumption off).
    pub full: CeilingHandshakes,
    /// Resumed handshakes (the client keeps its tickets).
    pub resumed: CeilingHandshakes,
    /// Small records.
    pub records: CeilingRecords,
    /// Nanoseconds one read of the thread CPU clock costs (subtracted per timed call).
    pub clock_overhead_ns: f64,
    /// Cipher suite negotiated.
    pub cipher_suite: Option<String>,
    /// Key exchange group negotiated.
    pub kx_group: Option<String>,
    /// Wall-clock seconds of the whole run.
    pub elapsed_secs: f64,
}

/// The JSON report of `holdfast-bench ceiling`; its method is [`CEILING_METHOD`].
pub type CeilingReport = Report<CeilingParameters, CeilingResults>;

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

    #[test]
    fn report_frame_keeps_its_fields_in_order() {
        let machine = Machine {
            cores: 1,
            kernel: "k".into(),
            mem_total_bytes: 1,
        };
        let keys = |v: serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        let with = Report::new("storm", None, 1, machine.clone(), Some(CPU_METHOD), 2);
        let v = serde_json::to_value(&with).unwrap();
        assert_eq!(v["method"], CPU_METHOD);
        let mut expected = [
            "scenario",
            "label",
            "parameters",
            "machine",
            "versions",
            "method",
            "results",
        ]
        .map(String::from)
        .to_vec();
        let mut got = keys(v);
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        // Echo states no method: the field is absent, not null.
        let without: Report<u8, u8> = Report::new("echo", None, 1, machine, None, 2);
        assert!(serde_json::to_value(&without)
            .unwrap()
            .get("method")
            .is_none());
        let text = serde_json::to_string(&with).unwrap();
        let pos = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
        assert!(pos("versions") < pos("method") && pos("method") < pos("results"));
    }

    fn ticks(user: u64, system: u64) -> CpuTicks {
        CpuTicks { user, system }
    }

    #[test]
    fn server_cpu_from_ticks() {
        // 200 user + 50 system ticks at 100 Hz = 2.5 s of CPU over 5 s on 1 core for
        // 25 000 handshakes.
        let c = server_cpu(ticks(200, 50), 100, 5.0, 25_000, 1, vec![7]);
        assert_eq!(c.cpu_secs, 2.5);
        assert_eq!((c.user_cpu_secs, c.kernel_cpu_secs), (2.0, 0.5));
        assert_eq!(c.utilization, 0.5);
        assert_eq!(c.us_per_op, Some(100.0));
        assert_eq!(c.user_us_per_op, Some(80.0));
        assert_eq!(c.kernel_us_per_op, Some(20.0));
        assert_eq!(c.capacity_per_core, Some(10_000.0));
        assert_eq!(c.pids, vec![7]);
        // Two cores: utilization is per core; per-operation cost is not.
        let c = server_cpu(ticks(200, 50), 100, 5.0, 25_000, 2, vec![]);
        assert_eq!(c.utilization, 0.25);
        assert_eq!(c.us_per_op, Some(100.0));
        assert_eq!(
            (c.user_us_per_op, c.kernel_us_per_op),
            (Some(80.0), Some(20.0))
        );
        // Another clock rate: 1 000 Hz, all kernel time.
        let c = server_cpu(ticks(0, 300), 1000, 1.0, 1000, 1, vec![]);
        assert_eq!((c.user_cpu_secs, c.kernel_cpu_secs), (0.0, 0.3));
        assert_eq!(
            (c.user_us_per_op, c.kernel_us_per_op),
            (Some(0.0), Some(300.0))
        );
        // Nothing done: no per-operation figure rather than infinity.
        let c = server_cpu(ticks(7, 3), 100, 1.0, 0, 1, vec![]);
        assert_eq!((c.us_per_op, c.capacity_per_core), (None, None));
        assert_eq!((c.user_us_per_op, c.kernel_us_per_op), (None, None));
        assert_eq!(
            (c.cpu_secs, c.user_cpu_secs, c.kernel_cpu_secs),
            (0.1, 0.07, 0.03)
        );
        // No CPU used: zero cost, no capacity figure.
        let c = server_cpu(ticks(0, 0), 100, 1.0, 10, 1, vec![]);
        assert_eq!((c.us_per_op, c.capacity_per_core), (Some(0.0), None));
        assert_eq!(
            (c.user_us_per_op, c.kernel_us_per_op),
            (Some(0.0), Some(0.0))
        );
        assert_eq!(
            server_cpu(ticks(5, 0), 100, 0.0, 1, 1, vec![]).utilization,
            0.0
        );
    }

    #[test]
    fn server_cpu_json_has_the_split() {
        let v =
            serde_json::to_value(server_cpu(ticks(200, 50), 100, 5.0, 25_000, 1, vec![7])).unwrap();
        assert_eq!(v["user_cpu_secs"], 2.0);
        assert_eq!(v["kernel_cpu_secs"], 0.5);
        assert_eq!(v["user_us_per_op"], 80.0);
        assert_eq!(v["kernel_us_per_op"], 20.0);
        let v = serde_json::to_value(server_cpu(ticks(1, 1), 100, 1.0, 0, 1, vec![])).unwrap();
        assert!(v["user_us_per_op"].is_null() && v["kernel_us_per_op"].is_null());
    }

    #[test]
    fn rates_and_failures() {
        assert_eq!(rate(500, 2.0), 250.0);
        assert_eq!(rate(500, 0.0), 0.0);
        let f = StageFailures {
            connect_failed: 1,
            handshake_failed: 2,
            echo_failed: 3,
            timed_out: 4,
        };
        assert_eq!(f.total(), 6, "timeouts are a subset, not added");
    }
}
