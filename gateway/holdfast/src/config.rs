//! The gateway's configuration: one struct, deserialised from TOML, overridden by CLI flags,
//! validated once at start and again on each reload (SIGHUP, [`Config::reload`]). Errors
//! name the key or file at fault so the operator knows what to fix. This module reads
//! files but opens no sockets.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything `holdfast run` needs. Defaults are the values a production box wants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client-facing TLS listener; every core binds it with SO_REUSEPORT.
    pub listen: SocketAddr,
    /// Admin HTTP address for /metrics and /healthz. Loopback by default: it is not
    /// meant to face the internet.
    pub admin: SocketAddr,
    /// Number of core threads (each with its own ring and listener). 0 = every online CPU.
    pub cores: usize,
    /// Unix socket paths of the routing workers. Every core dials every worker.
    pub workers: Vec<PathBuf>,
    /// A name for this gateway, sent to workers in HELLO.
    pub name: String,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub runtime: Runtime,
    pub websocket: WebSocket,
    pub proxy_protocol: ProxyProtocol,
}

/// The PROXY protocol (v1 and v2) on the listener, for a load balancer in front.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocol {
    /// Networks (CIDR, e.g. "10.0.0.0/8") whose connections must start with a PROXY
    /// header; the client address it carries is the connection's peer from then on.
    /// A PROXY header from any other address is refused. Empty = off.
    pub trusted_networks: Vec<String>,
}

/// An IP network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a.parse().map_err(|_| format!("{s:?}: not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0 to {max}"))?
        };
        Ok(Network { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let bits = |a: u128, b: u128, width: u32| {
            let keep = u32::from(self.prefix);
            keep == 0 || (a ^ b) >> (width - keep) == 0
        };
        match (self.addr, ip.to_canonical()) {
            (V4(n), V4(i)) => bits(u32::from(n).into(), u32::from(i).into(), 32),
            (V6(n), V6(i)) => bits(n.into(), i.into(), 128),
            _ => false,
        }
    }
}

/// WebSocket (RFC 6455) on the same TLS listeners, for browsers and mobile SDKs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocket {
    /// Serve WebSocket upgrades (HTTP/1.1 GET, ALPN `http/1.1` or none).
    pub enabled: bool,
    /// The one path that upgrades; other paths get 404.
    pub path: String,
    /// Allowed `Origin` values; empty allows any (and requests without one).
    pub allowed_origins: Vec<String>,
    /// Subprotocols in the server's order of preference; the first the client offers wins.
    pub subprotocols: Vec<String>,
    /// The gateway pings a WebSocket client silent for this long, and closes it (1001) if
    /// the pong has not come back one interval later. 0 = no keepalive.
    pub ping_interval_secs: u64,
}

impl Default for WebSocket {
    fn default() -> Self {
        WebSocket {
            enabled: true,
            path: "/ws".to_string(),
            allowed_origins: Vec::new(),
            subprotocols: Vec::new(),
            ping_interval_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Allowed protocol versions: "1.3" (default) and optionally "1.2".
    pub versions: Vec<String>,
    /// Certificates; the first is served when SNI names none of them (or is absent).
    pub certs: Vec<CertConfig>,
    /// Stateless TLS 1.3 session tickets, so reconnecting clients resume (about half the
    /// server CPU of a full handshake, and a reconnect storm of any size). Measured cost:
    /// about 0.9 KB more per idle connection; turn off for the densest boxes.
    pub session_tickets: bool,
    /// An established TLS 1.3 connection idle this long, with nothing staged, queued or in
    /// flight, sheds its rustls state and keeps only its traffic secrets and sequence
    /// numbers (a few hundred bytes in all); keys are derived again when a record comes or
    /// goes. 0 = never. TLS 1.2 connections keep rustls.
    pub hibernate_after_secs: u64,
    /// A ticket key shared by every gateway that reads the same file (`holdfast
    /// ticket-key generate --out PATH`), so clients resume on any box of the fleet and
    /// after restarts. Without it each process makes its own key.
    pub ticket_key_file: Option<PathBuf>,
    /// Ticket keys rotate every this many seconds (derived from the file, so the fleet
    /// rotates together); tickets of the current and the previous key resume.
    pub ticket_rotation_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SNI names this certificate answers for (exact, case-insensitive).
    #[serde(default)]
    pub server_names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest payload of one native frame, in bytes (at most 16 MiB - 1 by the format).
    pub max_frame: usize,
    /// Seconds a client has to finish the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds without any client traffic before the gateway closes a connection
    /// (0 = never). Clients keep alive with PING.
    pub idle_timeout_secs: u64,
    /// Seconds SIGTERM waits for clients to be told GOAWAY and closed before exiting.
    pub drain_grace_secs: u64,
    /// Connections per core: the size of each core's fixed-file table and connection
    /// table. Capped at start by the soft RLIMIT_NOFILE, which bounds each table.
    pub max_conns_per_core: u32,
    /// Bytes queued towards one client before it counts as a slow consumer and is closed.
    pub max_outbound_per_conn: usize,
    /// Unacknowledged bytes per worker link. When a link holds this much, its core stops
    /// reading clients (back-pressure) until the worker acknowledges below half of it.
    /// Gateway memory for relaying is bounded by the windows plus the receive buffers.
    pub link_window_bytes: usize,
    /// Connections the whole process holds (every core together); a client over it is
    /// closed at accept, before TLS. 0 = no cap.
    pub max_conns: u64,
    /// Connections one source holds: an IPv4 address, or an IPv6 /64. Over it a new
    /// connection is closed at accept, before TLS. Each core allows its share (the cap
    /// divided by the cores, rounded up). 0 = no cap.
    pub max_conns_per_ip: u32,
    /// Full TLS handshakes a core starts per second (resumptions give their token back).
    /// 0 = no cap.
    pub handshakes_per_sec_per_core: u32,
    /// TLS handshakes in progress on one core. 0 = no cap.
    pub handshakes_in_progress_per_core: u32,
    /// How long a new connection waits, unread, for a handshake slot when a core is at
    /// either handshake cap, before it is refused. The handshake timeout, which runs from
    /// accept, ends a longer wait first.
    pub handshake_wait_ms: u64,
    /// Outbound bytes all of one core's connections may queue together. Over it, the
    /// connections holding the most are closed (`slow_consumer`) until the core is under
    /// it. 0 = no budget (each connection is still bound by `max_outbound_per_conn`).
    pub outbound_budget_per_core: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Submission queue entries per ring.
    pub ring_entries: u32,
    /// Provided receive buffers per core (a power of two, at most 32768).
    pub recv_buffers: u32,
    /// Size of each provided receive buffer.
    pub recv_buffer_size: u32,
    /// Listen backlog per core.
    pub backlog: u32,
    /// SO_SNDBUF of every client socket, in bytes (set on the listeners, which accepted
    /// sockets inherit); 0 leaves the kernel's autotuning (up to `net.ipv4.tcp_wmem`'s
    /// maximum, 4 MiB by default, per connection). A cap bounds the kernel memory a client
    /// that stops reading can pin, so that the outbound budget, not the kernel, holds
    /// what it does not read; the kernel doubles the value for its bookkeeping.
    pub socket_send_buffer: u32,
    /// Pin each core thread to a CPU.
    pub pin: bool,
    /// Use io_uring direct descriptors for client sockets (falls back to regular fds
    /// if the kernel refuses).
    pub direct_descriptors: bool,
    /// First delay before reconnecting a worker that is down, in milliseconds; it doubles
    /// after each failed attempt up to `worker_retry_max_ms`.
    pub worker_retry_ms: u64,
    pub worker_retry_max_ms: u64,
    /// A heartbeat goes to each worker this often (milliseconds).
    pub heartbeat_interval_ms: u64,
    /// A link that receives nothing for this long is dropped and redialled (milliseconds).
    pub heartbeat_timeout_ms: u64,
    /// Completion batching, in microseconds (0 = off): a core that waits for events asks
    /// the kernel for several completions at once and is woken when they are there or
    /// this long after the first one arrived, instead of once per completion. Under load
    /// that saves a sleep and a wake-up per completion; a completion that arrives after a
    /// quiet spell of this length is handled at once. Needs IORING_FEAT_MIN_TIMEOUT
    /// (Linux 6.12+); older kernels wake per completion. Off by default: on the 2-vCPU
    /// test VM, 200 us cut CPU per relayed frame at 25 000 frames/s by a quarter for
    /// ~330 us more median latency and ~10 % more CPU per short connection
    /// (docs/benchmarks.md); a box that wants that trade sets it.
    pub batch_wait_us: u32,
    /// Live upgrade: how long the running process waits for the new binary to say it is
    /// ready (configuration and certificates loaded, state format understood) before it
    /// kills it and carries on serving.
    pub upgrade_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:7443".parse().expect("literal address"),
            admin: "127.0.0.1:9090".parse().expect("literal address"),
            cores: 0,
            workers: Vec::new(),
            name: "holdfast".to_string(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            runtime: Runtime::default(),
            websocket: WebSocket::default(),
            proxy_protocol: ProxyProtocol::default(),
        }
    }
}

/// Long enough that a connection in a conversation (a reply within seconds) stays awake
/// and pays no wake-up per message; short enough that the idle majority sleeps within
/// seconds of going quiet, so a reconnect storm's crowd is small again quickly.
pub const DEFAULT_HIBERNATE_AFTER_SECS: u64 = 10;

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            versions: vec!["1.3".to_string()],
            certs: Vec::new(),
            session_tickets: true,
            hibernate_after_secs: DEFAULT_HIBERNATE_AFTER_SECS,
            ticket_key_file: None,
            ticket_rotation_secs: 6 * 60 * 60,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 64 * 1024,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 600,
            drain_grace_secs: 10,
            max_conns_per_core: 1 << 20,
            max_outbound_per_conn: 1 << 20,
            link_window_bytes: 8 << 20,
            max_conns: 1_000_000,
            max_conns_per_ip: 1024,
            handshakes_per_sec_per_core: 2000,
            handshakes_in_progress_per_core: 1024,
            handshake_wait_ms: 5000,
            outbound_budget_per_core: 512 << 20,
        }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            ring_entries: 4096,
            recv_buffers: 4096,
            recv_buffer_size: 4096,
            backlog: 65535,
            socket_send_buffer: 0,
            pin: true,
            direct_descriptors: true,
            worker_retry_ms: 100,
            worker_retry_max_ms: 5000,
            heartbeat_interval_ms: 2000,
            heartbeat_timeout_ms: 10_000,
            upgrade_timeout_secs: 30,
            batch_wait_us: 0,
        }
    }
}

/// A configuration problem, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A TOML error on one line, naming the line and the key (`limits.idle_timeout_secs`)
/// where the parser points at one: `line 3, key limits.idle_timout_secs: unknown field ...`.
fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().replace('\n', " ");
    let Some(span) = e.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    // The table the line is in: the last `[name]` or `[[name]]` header above it.
    let table = before[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        let l = l
            .strip_prefix("[[")
            .and_then(|r| r.strip_suffix("]]"))
            .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))?;
        Some(l.trim().to_string())
    });
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('[') && !k.starts_with('#'));
    match (key, table) {
        (Some(k), Some(t)) => format!("line {line_no}, key {t}.{k}: {message}"),
        (Some(k), None) => format!("line {line_no}, key {k}: {message}"),
        (None, _) => format!("line {line_no}: {message}"),
    }
}

impl Config {
    /// Reads a TOML file. Relative certificate paths are taken relative to the file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: toml_error_line(&text, &e),
        })?;
        if let Some(dir) = path.parent() {
            for c in &mut config.tls.certs {
                c.cert = dir.join(&c.cert);
                c.key = dir.join(&c.key);
            }
            config.workers = config.workers.iter().map(|w| dir.join(w)).collect();
            if let Some(k) = &mut config.tls.ticket_key_file {
                *k = dir.join(&*k);
            }
        }
        Ok(config)
    }

    /// Checks every value once, before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if self.tls.certs.is_empty() {
            return invalid(
                "tls.certs",
                "no certificate configured (use --cert and --key, or [[tls.certs]])",
            );
        }
        if self.tls.versions.is_empty() {
            return invalid("tls.versions", "at least one TLS version is needed");
        }
        for v in &self.tls.versions {
            if v != "1.2" && v != "1.3" {
                return invalid(
                    "tls.versions",
                    &format!("unknown TLS version {v:?}; use \"1.2\" or \"1.3\""),
                );
            }
        }
        if let Err(e) = self.trusted_proxies() {
            return invalid("proxy_protocol.trusted_networks", &e);
        }
        if self.tls.ticket_rotation_secs == 0 {
            return invalid("tls.ticket_rotation_secs", "must be at least 1");
        }
        if self.cores > 255 {
            return invalid(
                "cores",
                "at most 255 cores (the connection id has 8 core bits)",
            );
        }
        if self.limits.max_frame == 0 || self.limits.max_frame > holdfast_wire::frame::MAX_LEN_FIELD
        {
            return invalid("limits.max_frame", "must be between 1 and 16777215");
        }
        if self.limits.handshake_timeout_secs == 0 {
            return invalid("limits.handshake_timeout_secs", "must be at least 1");
        }
        if self.limits.max_conns_per_core == 0 {
            return invalid("limits.max_conns_per_core", "must be at least 1");
        }
        if self.limits.max_outbound_per_conn < 64 * 1024 {
            return invalid("limits.max_outbound_per_conn", "must be at least 65536");
        }
        if self.limits.max_outbound_per_conn > 1 << 30 {
            return invalid(
                "limits.max_outbound_per_conn",
                "must be at most 1073741824 (1 GiB)",
            );
        }
        if self.limits.link_window_bytes < 2 * (self.limits.max_frame + 64)
            || self.limits.link_window_bytes < 64 * 1024
        {
            return invalid(
                "limits.link_window_bytes",
                "must hold at least two of the largest frames and 65536 bytes",
            );
        }
        let budget = self.limits.outbound_budget_per_core;
        if budget != 0 && budget < self.limits.max_outbound_per_conn as u64 {
            return invalid(
                "limits.outbound_budget_per_core",
                "must be 0 or at least limits.max_outbound_per_conn",
            );
        }
        if self.runtime.batch_wait_us > 10_000 {
            return invalid(
                "runtime.batch_wait_us",
                "must be at most 10000 (10 ms); 0 turns batching off",
            );
        }
        if self.limits.handshake_wait_ms > 60_000 {
            return invalid("limits.handshake_wait_ms", "must be at most 60000");
        }
        if self.runtime.worker_retry_ms == 0
            || self.runtime.worker_retry_max_ms < self.runtime.worker_retry_ms
        {
            return invalid(
                "runtime.worker_retry_max_ms",
                "retry delays must be positive and max >= worker_retry_ms",
            );
        }
        if self.runtime.heartbeat_interval_ms == 0
            || self.runtime.heartbeat_timeout_ms <= self.runtime.heartbeat_interval_ms
        {
            return invalid(
                "runtime.heartbeat_timeout_ms",
                "must be longer than runtime.heartbeat_interval_ms (both positive)",
            );
        }
        if !self.websocket.path.starts_with('/') {
            return invalid("websocket.path", "must start with '/'");
        }
        let rb = self.runtime.recv_buffers;
        if !rb.is_power_of_two() || !(2..=32768).contains(&rb) {
            return invalid(
                "runtime.recv_buffers",
                "must be a power of two between 2 and 32768",
            );
        }
        if !(512..=1 << 20).contains(&self.runtime.recv_buffer_size) {
            return invalid(
                "runtime.recv_buffer_size",
                "must be between 512 and 1048576",
            );
        }
        if !(8..=32768).contains(&self.runtime.ring_entries) {
            return invalid("runtime.ring_entries", "must be between 8 and 32768");
        }
        if self.workers.len() > 64 {
            return invalid("workers", "at most 64 workers");
        }
        if self.name.is_empty() || self.name.len() > 255 {
            return invalid("name", "must be 1 to 255 bytes");
        }
        Ok(())
    }

    /// The networks that must send a PROXY header (empty: PROXY protocol off).
    pub fn trusted_proxies(&self) -> Result<Vec<Network>, String> {
        self.proxy_protocol
            .trusted_networks
            .iter()
            .map(|n| n.parse())
            .collect()
    }

    /// One core's admission limits (`admission.rs`), for a process of `cores` cores.
    pub fn admission_limits(&self, cores: u8) -> crate::admission::Limits {
        let l = &self.limits;
        crate::admission::Limits {
            per_ip: crate::admission::per_core_share(l.max_conns_per_ip, cores),
            handshake_rate: l.handshakes_per_sec_per_core,
            in_progress: l.handshakes_in_progress_per_core,
            wait_ms: l.handshake_wait_ms,
        }
    }

    /// The effective number of core threads.
    pub fn core_count(&self) -> usize {
        if self.cores == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(255)
        } else {
            self.cores
        }
    }

    pub fn tls12_enabled(&self) -> bool {
        self.tls.versions.iter().any(|v| v == "1.2")
    }

    /// What a reload (SIGHUP) to `new` means for a gateway running with `self`: the
    /// reloadable settings come from `new`; the ones that sized or bound something at
    /// start (listeners, cores, rings, buffer rings, fixed-file tables, worker links, the
    /// HELLO name) keep their running value and are reported, for a warning.
    pub fn reload(&self, new: Config) -> Reloaded {
        let mut config = new;
        let mut changed = Vec::new();
        let mut fixed = Vec::new();
        // `fixed!(key, field path)`: a setting in use since start; the running value stays.
        macro_rules! fixed {
            ($key:literal, $($f:ident).+) => {
                if config.$($f).+ != self.$($f).+ {
                    fixed.push(FixedSetting {
                        key: $key,
                        running: format!("{:?}", self.$($f).+),
                        wanted: format!("{:?}", config.$($f).+),
                    });
                    config.$($f).+ = self.$($f).+.clone();
                }
            };
        }
        // `reloadable!(key, field path)`: taken from `new`; noted when it changed.
        macro_rules! reloadable {
            ($key:literal, $($f:ident).+) => {
                if config.$($f).+ != self.$($f).+ {
                    changed.push(format!(
                        "{} {:?} -> {:?}",
                        $key,
                        self.$($f).+,
                        config.$($f).+
                    ));
                }
            };
        }
        fixed!("listen", listen);
        fixed!("admin", admin);
        fixed!("cores", cores);
        fixed!("workers", workers);
        fixed!("name", name);
        fixed!("limits.max_conns_per_core", limits.max_conns_per_core);
        fixed!("runtime.ring_entries", runtime.ring_entries);
        fixed!("runtime.recv_buffers", runtime.recv_buffers);
        fixed!("runtime.recv_buffer_size", runtime.recv_buffer_size);
        fixed!("runtime.backlog", runtime.backlog);
        fixed!("runtime.socket_send_buffer", runtime.socket_send_buffer);
        fixed!("runtime.pin", runtime.pin);
        fixed!("runtime.direct_descriptors", runtime.direct_descriptors);
        reloadable!("tls.certs", tls.certs);
        reloadable!("tls.versions", tls.versions);
        reloadable!("tls.session_tickets", tls.session_tickets);
        reloadable!("tls.hibernate_after_secs", tls.hibernate_after_secs);
        reloadable!("tls.ticket_key_file", tls.ticket_key_file);
        reloadable!("tls.ticket_rotation_secs", tls.ticket_rotation_secs);
        reloadable!("limits.max_frame", limits.max_frame);
        reloadable!(
            "limits.handshake_timeout_secs",
            limits.handshake_timeout_secs
        );
        reloadable!("limits.idle_timeout_secs", limits.idle_timeout_secs);
        reloadable!("limits.drain_grace_secs", limits.drain_grace_secs);
        reloadable!("limits.max_outbound_per_conn", limits.max_outbound_per_conn);
        reloadable!("limits.link_window_bytes", limits.link_window_bytes);
        reloadable!("limits.max_conns", limits.max_conns);
        reloadable!("limits.max_conns_per_ip", limits.max_conns_per_ip);
        reloadable!(
            "limits.handshakes_per_sec_per_core",
            limits.handshakes_per_sec_per_core
        );
        reloadable!(
            "limits.handshakes_in_progress_per_core",
            limits.handshakes_in_progress_per_core
        );
        reloadable!("limits.handshake_wait_ms", limits.handshake_wait_ms);
        reloadable!(
            "limits.outbound_budget_per_core",
            limits.outbound_budget_per_core
        );
        reloadable!("runtime.worker_retry_ms", runtime.worker_retry_ms);
        reloadable!("runtime.worker_retry_max_ms", runtime.worker_retry_max_ms);
        reloadable!(
            "runtime.heartbeat_interval_ms",
            runtime.heartbeat_interval_ms
        );
        reloadable!("runtime.heartbeat_timeout_ms", runtime.heartbeat_timeout_ms);
        reloadable!("runtime.upgrade_timeout_secs", runtime.upgrade_timeout_secs);
        reloadable!("runtime.batch_wait_us", runtime.batch_wait_us);
        reloadable!(
            "proxy_protocol.trusted_networks",
            proxy_protocol.trusted_networks
        );
        reloadable!("websocket.enabled", websocket.enabled);
        reloadable!("websocket.path", websocket.path);
        reloadable!("websocket.allowed_origins", websocket.allowed_origins);
        reloadable!("websocket.subprotocols", websocket.subprotocols);
        reloadable!("websocket.ping_interval_secs", websocket.ping_interval_secs);
        Reloaded {
            config,
            changed,
            fixed,
        }
    }
}

/// The outcome of [`Config::reload`], before anything is applied.
#[derive(Debug)]
pub struct Reloaded {
    /// The configuration to run with from now on: `new` with the fixed settings kept.
    pub config: Config,
    /// Reloadable settings whose value changed, as `key old -> new`.
    pub changed: Vec<String>,
    /// Settings fixed at start whose value changed in the file; not applied.
    pub fixed: Vec<FixedSetting>,
}

/// A setting that changed on disk but is fixed at start (applies after a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedSetting {
    pub key: &'static str,
    pub running: String,
    pub wanted: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cert() -> Config {
        let mut c = Config::default();
        c.tls.certs.push(CertConfig {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            server_names: vec![],
        });
        c
    }

    #[test]
    fn toml_errors_are_one_line_naming_line_and_key() {
        let cases = [
            (
                "listen = \"127.0.0.1:0\"\nlisen = 3\n",
                "line 2, key lisen: unknown field `lisen`",
            ),
            (
                "cores = 2\n[limits]\nmax_frame = 10\nidle_timout_secs = 3\n",
                "line 4, key limits.idle_timout_secs: unknown field `idle_timout_secs`",
            ),
            ("cores = \"two\"\n", "line 1, key cores: invalid type"),
            (
                "[[tls.certs]]\ncert = \"a\"\nkye = \"b\"\n",
                "line 3, key tls.certs.kye: unknown field `kye`",
            ),
        ];
        for (text, want) in cases {
            let e = toml::from_str::<Config>(text).expect_err(text);
            let line = toml_error_line(text, &e);
            assert!(line.starts_with(want), "{text:?}: {line}");
            assert!(!line.contains('\n'), "{text:?}: {line}");
        }
    }

    #[test]
    fn defaults_are_valid_once_a_certificate_is_given() {
        assert!(Config::default().validate().is_err());
        with_cert().validate().unwrap();
    }

    #[test]
    fn invalid_values_name_their_key() {
        type Mutate = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutate)> = vec![
            (
                "tls.versions",
                Box::new(|c| c.tls.versions = vec!["1.1".into()]),
            ),
            (
                "limits.max_frame",
                Box::new(|c| c.limits.max_frame = 1 << 24),
            ),
            (
                "runtime.recv_buffers",
                Box::new(|c| c.runtime.recv_buffers = 1000),
            ),
            ("cores", Box::new(|c| c.cores = 300)),
            (
                "limits.handshake_timeout_secs",
                Box::new(|c| c.limits.handshake_timeout_secs = 0),
            ),
            (
                "limits.handshake_wait_ms",
                Box::new(|c| c.limits.handshake_wait_ms = 60_001),
            ),
        ];
        for (key, mutate) in cases {
            let mut c = with_cert();
            mutate(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn reload_takes_limits_and_keeps_what_was_sized_at_start() {
        let running = with_cert();
        let mut new = with_cert();
        new.limits.max_frame = 1024;
        new.limits.idle_timeout_secs = 0;
        new.tls.versions.push("1.2".into());
        new.websocket.allowed_origins = vec!["https://a.example".into()];
        new.cores = 7;
        new.runtime.recv_buffers = 64;
        new.workers = vec!["/tmp/other.sock".into()];
        let r = running.reload(new);
        assert_eq!(r.config.limits.max_frame, 1024);
        assert_eq!(r.config.limits.idle_timeout_secs, 0);
        assert!(r.config.tls12_enabled());
        assert_eq!(r.config.websocket.allowed_origins.len(), 1);
        assert_eq!(r.config.cores, running.cores);
        assert_eq!(r.config.runtime.recv_buffers, running.runtime.recv_buffers);
        assert_eq!(r.config.workers, running.workers);
        let fixed: Vec<_> = r.fixed.iter().map(|f| f.key).collect();
        assert_eq!(fixed, ["cores", "workers", "runtime.recv_buffers"]);
        assert_eq!(r.fixed[0].running, "0");
        assert_eq!(r.fixed[0].wanted, "7");
        let changed = r.changed.join("; ");
        for key in [
            "limits.max_frame 65536 -> 1024",
            "limits.idle_timeout_secs 600 -> 0",
            "tls.versions",
            "websocket.allowed_origins",
        ] {
            assert!(changed.contains(key), "{key} missing from {changed}");
        }
        assert_eq!(r.changed.len(), 4, "{changed}");
        r.config.validate().unwrap();
    }

    #[test]
    fn networks_parse_and_contain() {
        let n: Network = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Network = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let any: Network = "::/0".parse().unwrap();
        assert!(any.contains("2001:db8::1".parse().unwrap()));
        assert!(!any.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("ten/8".parse::<Network>().is_err());
        let mut c = with_cert();
        c.proxy_protocol.trusted_networks = vec!["10.0.0.0/40".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("proxy_protocol.trusted_networks"), "{err}");
    }

    #[test]
    fn reload_to_the_same_config_changes_nothing() {
        let r = with_cert().reload(with_cert());
        assert!(r.changed.is_empty() && r.fixed.is_empty(), "{r:?}");
    }

    #[test]
    fn toml_parses_and_unknown_keys_are_refused() {
        let c: Config = toml::from_str(
            "listen = \"127.0.0.1:1\"\n[limits]\nmax_frame = 100\n[[tls.certs]]\ncert = \"a\"\nkey = \"b\"\nserver_names = [\"x\"]\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_frame, 100);
        assert_eq!(c.tls.certs[0].server_names, vec!["x".to_string()]);
        let err = toml::from_str::<Config>("[limits]\nmax_frames = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_frames"), "{err}");
        let err = toml::from_str::<Config>("cores = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cores"), "{err}");
    }
}
