//! Per-core counters and gauges, and their Prometheus text exposition.
//!
//! Each core writes only its own [`CoreMetrics`] (relaxed atomic stores and adds on a
//! cache-line-aligned block, so cores never share a line); the admin thread reads every
//! block when scraped. Nothing here is on a lock, and nothing allocates on the data path.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a connection ended. Each reason is a label of `holdfast_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The client closed cleanly (TCP FIN or TLS close_notify) between frames.
    PeerClosed,
    /// The client closed in the middle of a frame.
    EofMidFrame,
    /// ECONNRESET / EPIPE: the client vanished without FIN.
    PeerReset,
    /// Not TLS, or a TLS protocol error (bad ClientHello, bad record, failed handshake).
    TlsError,
    HandshakeTimeout,
    IdleTimeout,
    FrameTooLarge,
    UnknownFrameType,
    /// A malformed frame of a known type (a CLOSE without a code, say), or a WebSocket
    /// protocol violation (unmasked frame, reserved bits, bad control frame).
    ProtocolError,
    /// WebSocket text that is not UTF-8, or a bad close reason (close code 1007).
    InvalidPayload,
    /// An HTTP request that is not a valid WebSocket upgrade (answered with an HTTP error).
    BadUpgrade,
    /// No worker link is up to take the client's frames.
    NoWorker,
    /// A worker asked for the connection to be closed.
    WorkerClose,
    /// The gateway is draining (SIGTERM).
    Drain,
    /// The client does not read what it is sent (outbound bound exceeded).
    SlowConsumer,
    /// The connection table or fixed-file table of the core is full.
    TableFull,
    /// An unexpected local error (a bug or a kernel error with no better name).
    Internal,
    /// Refused at accept, before TLS: its source address holds `limits.max_conns_per_ip`.
    IpLimit,
    /// Refused at accept, before TLS: the process holds `limits.max_conns`.
    ProcessLimit,
    /// Refused unread: it waited `limits.handshake_wait_ms` for a handshake slot (the
    /// core was at its handshake rate or handshakes in progress).
    HandshakeOverload,
    /// A PROXY protocol header from an address outside `proxy_protocol.trusted_networks`.
    ProxyUntrusted,
    /// A trusted proxy's connection without a valid PROXY header (malformed, or missing).
    ProxyError,
    /// Not handed over in a live upgrade: still in its handshake when the hand-over
    /// began and for its grace period, or its state could not be moved.
    Upgrade,
}

impl CloseReason {
    pub const ALL: [CloseReason; 23] = [
        CloseReason::PeerClosed,
        CloseReason::EofMidFrame,
        CloseReason::PeerReset,
        CloseReason::TlsError,
        CloseReason::HandshakeTimeout,
        CloseReason::IdleTimeout,
        CloseReason::FrameTooLarge,
        CloseReason::UnknownFrameType,
        CloseReason::ProtocolError,
        CloseReason::InvalidPayload,
        CloseReason::BadUpgrade,
        CloseReason::NoWorker,
        CloseReason::WorkerClose,
        CloseReason::Drain,
        CloseReason::SlowConsumer,
        CloseReason::TableFull,
        CloseReason::Internal,
        CloseReason::IpLimit,
        CloseReason::ProcessLimit,
        CloseReason::HandshakeOverload,
        CloseReason::ProxyUntrusted,
        CloseReason::ProxyError,
        CloseReason::Upgrade,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::EofMidFrame => "eof_mid_frame",
            CloseReason::PeerReset => "peer_reset",
            CloseReason::TlsError => "tls_error",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::UnknownFrameType => "unknown_frame_type",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidPayload => "invalid_payload",
            CloseReason::BadUpgrade => "bad_upgrade",
            CloseReason::NoWorker => "no_worker",
            CloseReason::WorkerClose => "worker_close",
            CloseReason::Drain => "drain",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TableFull => "table_full",
            CloseReason::Internal => "internal",
            CloseReason::IpLimit => "ip_limit",
            CloseReason::ProcessLimit => "process_limit",
            CloseReason::HandshakeOverload => "handshake_overload",
            CloseReason::ProxyUntrusted => "proxy_untrusted",
            CloseReason::ProxyError => "proxy_error",
            CloseReason::Upgrade => "upgrade",
        }
    }
}

/// Most workers a gateway links to (the routing mask is 64 bits).
pub const MAX_WORKERS: usize = 64;

/// One core's counters. Aligned to 128 bytes so two cores' blocks never share a cache
/// line (adjacent-line prefetch pairs lines on x86).
#[repr(align(128))]
pub struct CoreMetrics {
    pub connections_open: AtomicU64,
    pub accepts: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Times the core stopped listening because its connection table was full.
    pub listen_paused: AtomicU64,
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    /// Admission (`admission.rs`): handshakes started and not finished, connections waiting
    /// unread for a handshake slot, and how many new connections had to wait.
    pub handshakes_in_progress: AtomicU64,
    pub handshakes_waiting: AtomicU64,
    pub handshakes_queued: AtomicU64,
    /// Outbound bytes queued by the core's connections, and the connections closed to
    /// bring it back under `limits.outbound_budget_per_core`.
    pub outbound_bytes: AtomicU64,
    pub outbound_budget_closes: AtomicU64,
    pub closes: [AtomicU64; CloseReason::ALL.len()],
    pub frames_from_client: AtomicU64,
    pub frames_to_client: AtomicU64,
    pub bytes_from_client: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub pings: AtomicU64,
    /// Established connections holding only their traffic secrets (no rustls object).
    pub connections_hibernated: AtomicU64,
    pub hibernations: AtomicU64,
    /// Hibernated connections that had a record to open or seal again.
    pub wakeups: AtomicU64,
    pub recv_buffers_exhausted: AtomicU64,
    pub worker_link_up: [AtomicU64; MAX_WORKERS],
    pub worker_link_queued_bytes: [AtomicU64; MAX_WORKERS],
    pub worker_link_unacked_bytes: [AtomicU64; MAX_WORKERS],
    pub worker_frames: [AtomicU64; MAX_WORKERS],
    pub worker_link_down: [AtomicU64; MAX_WORKERS],
    pub worker_resent: AtomicU64,
    pub backpressure: AtomicU64,
    pub backpressure_pauses: AtomicU64,
    pub cross_core: AtomicU64,
    /// PUBLISH deliveries to subscribed connections.
    pub published: AtomicU64,
    pub worker_protocol_errors: AtomicU64,
    pub worker_unknown_conn: AtomicU64,
    pub loop_iterations: AtomicU64,
    pub completions: AtomicU64,
    pub timers_armed: AtomicU64,
    pub submissions: AtomicU64,
    /// Time the loop spent working and waiting in io_uring_enter (utilisation = busy / both).
    pub loop_busy_ns: AtomicU64,
    pub loop_wait_ns: AtomicU64,
    pub conn_table_capacity: AtomicU64,
    /// Handshake durations (accept to handshake done), per HANDSHAKE_BUCKETS_MS bound, plus
    /// their sum in milliseconds.
    pub handshake_buckets: [AtomicU64; HANDSHAKE_BUCKETS_MS.len()],
    pub handshake_ms_sum: AtomicU64,
}

/// Upper bounds (milliseconds) of the handshake-duration histogram's buckets; +Inf is the
/// count of ok handshakes.
pub const HANDSHAKE_BUCKETS_MS: [u32; 12] = [1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 2500, 10000];

impl Default for CoreMetrics {
    fn default() -> Self {
        CoreMetrics {
            connections_open: AtomicU64::new(0),
            accepts: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            listen_paused: AtomicU64::new(0),
            handshakes_ok: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            handshakes_in_progress: AtomicU64::new(0),
            handshakes_waiting: AtomicU64::new(0),
            handshakes_queued: AtomicU64::new(0),
            outbound_bytes: AtomicU64::new(0),
            outbound_budget_closes: AtomicU64::new(0),
            closes: std::array::from_fn(|_| AtomicU64::new(0)),
            frames_from_client: AtomicU64::new(0),
            frames_to_client: AtomicU64::new(0),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            connections_hibernated: AtomicU64::new(0),
            hibernations: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            recv_buffers_exhausted: AtomicU64::new(0),
            worker_link_up: std::array::from_fn(|_| AtomicU64::new(0)),
            worker_link_queued_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            worker_link_unacked_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            worker_frames: std::array::from_fn(|_| AtomicU64::new(0)),
            worker_link_down: std::array::from_fn(|_| AtomicU64::new(0)),
            worker_resent: AtomicU64::new(0),
            backpressure: AtomicU64::new(0),
            backpressure_pauses: AtomicU64::new(0),
            cross_core: AtomicU64::new(0),
            published: AtomicU64::new(0),
            worker_protocol_errors: AtomicU64::new(0),
            worker_unknown_conn: AtomicU64::new(0),
            loop_iterations: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            timers_armed: AtomicU64::new(0),
            submissions: AtomicU64::new(0),
            loop_busy_ns: AtomicU64::new(0),
            loop_wait_ns: AtomicU64::new(0),
            conn_table_capacity: AtomicU64::new(0),
            handshake_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            handshake_ms_sum: AtomicU64::new(0),
        }
    }
}

impl CoreMetrics {
    // Each block has exactly one writer (its core), so a relaxed load and store is enough:
    // no locked read-modify-write on the data path, and readers still see monotonic values.
    #[inline]
    pub fn inc(c: &AtomicU64) {
        c.store(c.load(Relaxed) + 1, Relaxed);
    }

    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed) + n, Relaxed);
    }

    /// Records one handshake duration (the +Inf bucket is `handshakes_ok`).
    pub fn observe_handshake(&self, ms: u32) {
        if let Some(i) = HANDSHAKE_BUCKETS_MS.iter().position(|&b| ms <= b) {
            Self::inc(&self.handshake_buckets[i]);
        }
        Self::add(&self.handshake_ms_sum, u64::from(ms));
    }

    #[inline]
    pub fn close(&self, reason: CloseReason) {
        Self::inc(&self.closes[reason as usize]);
    }

    /// Every counter (not the gauges), each under a stable name: what a live upgrade
    /// carries to the new process, so that a Prometheus `rate()` does not reset. A name
    /// the receiving binary does not know is ignored.
    pub fn counters(&self) -> Vec<(String, &AtomicU64)> {
        let mut out: Vec<(String, &AtomicU64)> = [
            ("accepts", &self.accepts),
            ("accept_errors", &self.accept_errors),
            ("listen_paused", &self.listen_paused),
            ("handshakes_ok", &self.handshakes_ok),
            ("handshakes_failed", &self.handshakes_failed),
            ("handshakes_queued", &self.handshakes_queued),
            ("outbound_budget_closes", &self.outbound_budget_closes),
            ("frames_from_client", &self.frames_from_client),
            ("frames_to_client", &self.frames_to_client),
            ("bytes_from_client", &self.bytes_from_client),
            ("bytes_to_client", &self.bytes_to_client),
            ("pings", &self.pings),
            ("hibernations", &self.hibernations),
            ("wakeups", &self.wakeups),
            ("recv_buffers_exhausted", &self.recv_buffers_exhausted),
            ("worker_resent", &self.worker_resent),
            ("backpressure_pauses", &self.backpressure_pauses),
            ("cross_core", &self.cross_core),
            ("published", &self.published),
            ("worker_protocol_errors", &self.worker_protocol_errors),
            ("worker_unknown_conn", &self.worker_unknown_conn),
            ("loop_iterations", &self.loop_iterations),
            ("completions", &self.completions),
            ("submissions", &self.submissions),
            ("loop_busy_ns", &self.loop_busy_ns),
            ("loop_wait_ns", &self.loop_wait_ns),
            ("handshake_ms_sum", &self.handshake_ms_sum),
        ]
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .collect();
        for (r, c) in CloseReason::ALL.iter().zip(&self.closes) {
            out.push((format!("closes/{}", r.label()), c));
        }
        for (b, c) in HANDSHAKE_BUCKETS_MS.iter().zip(&self.handshake_buckets) {
            out.push((format!("handshake_le/{b}"), c));
        }
        for w in 0..MAX_WORKERS {
            out.push((format!("worker_frames/{w}"), &self.worker_frames[w]));
            out.push((format!("worker_link_down/{w}"), &self.worker_link_down[w]));
        }
        out
    }
}

/// The process's configuration state, written by the control thread (start and SIGHUP),
/// never by a core.
#[derive(Default)]
pub struct ConfigMetrics {
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// 1 if the last load (start or reload) succeeded, 0 if the last reload failed.
    pub last_reload_ok: AtomicU64,
    /// Unix time in milliseconds of the last successful load (start or reload).
    pub last_success_unix_ms: AtomicU64,
    /// Live upgrades (`holdfast upgrade`): taken over by a new process (counted there), or
    /// failed and served on by this one.
    pub upgrades_ok: AtomicU64,
    pub upgrades_failed: AtomicU64,
}

impl ConfigMetrics {
    /// Records a successful load at `now`.
    pub fn loaded(&self, now: std::time::SystemTime, reload: bool) {
        let ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_success_unix_ms.store(ms, Relaxed);
        self.last_reload_ok.store(1, Relaxed);
        if reload {
            self.reloads_ok.fetch_add(1, Relaxed);
        }
    }

    pub fn failed(&self) {
        self.last_reload_ok.store(0, Relaxed);
        self.reloads_failed.fetch_add(1, Relaxed);
    }

    /// Appends the config families to a scrape.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP holdfast_upgrades_total Live upgrades by result: ok (this process took over) or failed (the new binary refused, exited or timed out; this process kept serving).\n\
             # TYPE holdfast_upgrades_total counter\n\
             holdfast_upgrades_total{{result=\"ok\"}} {}\n\
             holdfast_upgrades_total{{result=\"failed\"}} {}",
            self.upgrades_ok.load(Relaxed),
            self.upgrades_failed.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP holdfast_config_reloads_total Configuration reloads (SIGHUP) by result; a failed one changed nothing.\n\
             # TYPE holdfast_config_reloads_total counter\n\
             holdfast_config_reloads_total{{result=\"ok\"}} {}\n\
             holdfast_config_reloads_total{{result=\"failed\"}} {}",
            self.reloads_ok.load(Relaxed),
            self.reloads_failed.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP holdfast_config_last_reload_successful 1 if the last configuration load succeeded, 0 if the last reload failed.\n\
             # TYPE holdfast_config_last_reload_successful gauge\n\
             holdfast_config_last_reload_successful {}",
            self.last_reload_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP holdfast_config_reload_timestamp_seconds Unix time of the last successful configuration load (start or reload).\n\
             # TYPE holdfast_config_reload_timestamp_seconds gauge\n\
             holdfast_config_reload_timestamp_seconds {}",
            self.last_success_unix_ms.load(Relaxed) as f64 / 1000.0
        );
    }
}

/// Renders every core's block in Prometheus text format (version 0.0.4).
pub fn render(cores: &[std::sync::Arc<CoreMetrics>], workers: &[String]) -> String {
    let mut out = String::with_capacity(8192);
    let mut family = |name: &str, kind: &str, help: &str, series: &mut dyn FnMut(&mut String)| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        series(&mut out);
    };
    let per_core = |out: &mut String, name: &str, get: &dyn Fn(&CoreMetrics) -> u64| {
        for (i, c) in cores.iter().enumerate() {
            let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", get(c));
        }
    };
    let per_worker = |out: &mut String, name: &str, get: &dyn Fn(&CoreMetrics, usize) -> u64| {
        for (i, c) in cores.iter().enumerate() {
            for (w, path) in workers.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{core=\"{i}\",worker=\"{}\"}} {}",
                    escape(path),
                    get(c, w)
                );
            }
        }
    };
    family(
        "holdfast_connections_open",
        "gauge",
        "Client connections open, handshaking ones included.",
        &mut |o| {
            per_core(o, "holdfast_connections_open", &|c| {
                c.connections_open.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_connections_hibernated",
        "gauge",
        "Established TLS 1.3 connections hibernated: idle, holding only their traffic secrets and sequence numbers.",
        &mut |o| {
            per_core(o, "holdfast_connections_hibernated", &|c| {
                c.connections_hibernated.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_hibernations_total",
        "counter",
        "Times an idle connection shed its TLS library state.",
        &mut |o| {
            per_core(o, "holdfast_hibernations_total", &|c| {
                c.hibernations.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_wakeups_total",
        "counter",
        "Times a hibernated connection derived its keys again to open or seal a record.",
        &mut |o| per_core(o, "holdfast_wakeups_total", &|c| c.wakeups.load(Relaxed)),
    );
    family(
        "holdfast_accepts_total",
        "counter",
        "Client connections accepted.",
        &mut |o| per_core(o, "holdfast_accepts_total", &|c| c.accepts.load(Relaxed)),
    );
    family(
        "holdfast_accept_errors_total",
        "counter",
        "Accept completions that failed (a full table among them).",
        &mut |o| {
            per_core(o, "holdfast_accept_errors_total", &|c| {
                c.accept_errors.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_listen_paused_total",
        "counter",
        "Times the core stopped listening because its connection table was full (new clients go to the other cores).",
        &mut |o| {
            per_core(o, "holdfast_listen_paused_total", &|c| {
                c.listen_paused.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_handshakes_total",
        "counter",
        "TLS handshakes by result.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "holdfast_handshakes_total{{core=\"{i}\",result=\"ok\"}} {}",
                    c.handshakes_ok.load(Relaxed)
                );
                let _ = writeln!(
                    o,
                    "holdfast_handshakes_total{{core=\"{i}\",result=\"failed\"}} {}",
                    c.handshakes_failed.load(Relaxed)
                );
            }
        },
    );
    family(
        "holdfast_handshakes_in_progress",
        "gauge",
        "TLS handshakes started and not finished (capped by limits.handshakes_in_progress_per_core).",
        &mut |o| {
            per_core(o, "holdfast_handshakes_in_progress", &|c| {
                c.handshakes_in_progress.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_handshakes_waiting",
        "gauge",
        "Accepted connections waiting, unread, for a handshake slot (the core is at its handshake rate or in-progress cap).",
        &mut |o| {
            per_core(o, "holdfast_handshakes_waiting", &|c| {
                c.handshakes_waiting.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_handshakes_queued_total",
        "counter",
        "New connections that had to wait for a handshake slot.",
        &mut |o| {
            per_core(o, "holdfast_handshakes_queued_total", &|c| {
                c.handshakes_queued.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_outbound_bytes",
        "gauge",
        "Outbound bytes queued towards the core's clients (session queues and sends in flight).",
        &mut |o| {
            per_core(o, "holdfast_outbound_bytes", &|c| {
                c.outbound_bytes.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_outbound_budget_closes_total",
        "counter",
        "Connections closed as slow_consumer to bring the core under limits.outbound_budget_per_core (those holding the most unsent bytes first).",
        &mut |o| {
            per_core(o, "holdfast_outbound_budget_closes_total", &|c| {
                c.outbound_budget_closes.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_closes_total",
        "counter",
        "Client connections closed, by reason.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                for r in CloseReason::ALL {
                    let _ = writeln!(
                        o,
                        "holdfast_closes_total{{core=\"{i}\",reason=\"{}\"}} {}",
                        r.label(),
                        c.closes[r as usize].load(Relaxed)
                    );
                }
            }
        },
    );
    family(
        "holdfast_frames_total",
        "counter",
        "Native frames relayed, by direction.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "holdfast_frames_total{{core=\"{i}\",direction=\"from_client\"}} {}",
                    c.frames_from_client.load(Relaxed)
                );
                let _ = writeln!(
                    o,
                    "holdfast_frames_total{{core=\"{i}\",direction=\"to_client\"}} {}",
                    c.frames_to_client.load(Relaxed)
                );
            }
        },
    );
    family(
        "holdfast_payload_bytes_total",
        "counter",
        "Frame payload bytes relayed, by direction.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "holdfast_payload_bytes_total{{core=\"{i}\",direction=\"from_client\"}} {}",
                    c.bytes_from_client.load(Relaxed)
                );
                let _ = writeln!(
                    o,
                    "holdfast_payload_bytes_total{{core=\"{i}\",direction=\"to_client\"}} {}",
                    c.bytes_to_client.load(Relaxed)
                );
            }
        },
    );
    family(
        "holdfast_pings_total",
        "counter",
        "PING frames answered by the gateway.",
        &mut |o| per_core(o, "holdfast_pings_total", &|c| c.pings.load(Relaxed)),
    );
    family(
        "holdfast_recv_buffers_exhausted_total",
        "counter",
        "Times the provided-buffer ring ran dry (receives paused, not an error).",
        &mut |o| {
            per_core(o, "holdfast_recv_buffers_exhausted_total", &|c| {
                c.recv_buffers_exhausted.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_worker_link_up",
        "gauge",
        "1 while this core's link to the worker is up.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                for (w, path) in workers.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "holdfast_worker_link_up{{core=\"{i}\",worker=\"{}\"}} {}",
                        escape(path),
                        c.worker_link_up[w].load(Relaxed)
                    );
                }
            }
        },
    );
    family(
        "holdfast_worker_link_queued_bytes",
        "gauge",
        "Bytes queued towards the worker on this core's link.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                for (w, path) in workers.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "holdfast_worker_link_queued_bytes{{core=\"{i}\",worker=\"{}\"}} {}",
                        escape(path),
                        c.worker_link_queued_bytes[w].load(Relaxed)
                    );
                }
            }
        },
    );
    family(
        "holdfast_worker_link_unacked_bytes",
        "gauge",
        "Bytes sent or queued to the worker and not yet acknowledged (kept for re-sending).",
        &mut |o| {
            per_worker(o, "holdfast_worker_link_unacked_bytes", &|c, w| {
                c.worker_link_unacked_bytes[w].load(Relaxed)
            })
        },
    );
    family(
        "holdfast_worker_frames_total",
        "counter",
        "FRAME envelopes sent on this link, re-sends included.",
        &mut |o| {
            per_worker(o, "holdfast_worker_frames_total", &|c, w| {
                c.worker_frames[w].load(Relaxed)
            })
        },
    );
    family(
        "holdfast_worker_link_down_total",
        "counter",
        "Times this core's link to the worker went down.",
        &mut |o| {
            per_worker(o, "holdfast_worker_link_down_total", &|c, w| {
                c.worker_link_down[w].load(Relaxed)
            })
        },
    );
    family(
        "holdfast_worker_resent_total",
        "counter",
        "Unacknowledged envelopes re-sent to a surviving worker after a link went down.",
        &mut |o| {
            per_core(o, "holdfast_worker_resent_total", &|c| {
                c.worker_resent.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_backpressure",
        "gauge",
        "1 while this core has stopped reading its clients because a worker link is full.",
        &mut |o| {
            per_core(o, "holdfast_backpressure", &|c| {
                c.backpressure.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_backpressure_pauses_total",
        "counter",
        "Times this core stopped reading its clients for back-pressure.",
        &mut |o| {
            per_core(o, "holdfast_backpressure_pauses_total", &|c| {
                c.backpressure_pauses.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_cross_core_total",
        "counter",
        "Worker SEND/CLOSE messages delivered to a connection owned by this core through another core's link.",
        &mut |o| per_core(o, "holdfast_cross_core_total", &|c| c.cross_core.load(Relaxed)),
    );
    family(
        "holdfast_published_total",
        "counter",
        "Worker PUBLISH messages delivered to subscribed connections on this core.",
        &mut |o| {
            per_core(o, "holdfast_published_total", &|c| {
                c.published.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_worker_protocol_errors_total",
        "counter",
        "Worker links dropped for a malformed envelope.",
        &mut |o| {
            per_core(o, "holdfast_worker_protocol_errors_total", &|c| {
                c.worker_protocol_errors.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_worker_unknown_conn_total",
        "counter",
        "Worker messages naming an unknown or stale connection.",
        &mut |o| {
            per_core(o, "holdfast_worker_unknown_conn_total", &|c| {
                c.worker_unknown_conn.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_loop_iterations_total",
        "counter",
        "Event loop iterations.",
        &mut |o| {
            per_core(o, "holdfast_loop_iterations_total", &|c| {
                c.loop_iterations.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_completions_total",
        "counter",
        "io_uring completions handled.",
        &mut |o| {
            per_core(o, "holdfast_completions_total", &|c| {
                c.completions.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_timers_armed",
        "gauge",
        "Entries in the core's timing wheel.",
        &mut |o| {
            per_core(o, "holdfast_timers_armed", &|c| {
                c.timers_armed.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_submissions_total",
        "counter",
        "io_uring submissions queued.",
        &mut |o| {
            per_core(o, "holdfast_submissions_total", &|c| {
                c.submissions.load(Relaxed)
            })
        },
    );
    let secs = |ns: u64| ns as f64 / 1e9;
    family(
        "holdfast_loop_busy_seconds_total",
        "counter",
        "Time the core's event loop spent working (not waiting for completions).",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "holdfast_loop_busy_seconds_total{{core=\"{i}\"}} {}",
                    secs(c.loop_busy_ns.load(Relaxed))
                );
            }
        },
    );
    family(
        "holdfast_loop_wait_seconds_total",
        "counter",
        "Time the core's event loop spent waiting in io_uring_enter.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "holdfast_loop_wait_seconds_total{{core=\"{i}\"}} {}",
                    secs(c.loop_wait_ns.load(Relaxed))
                );
            }
        },
    );
    family(
        "holdfast_conn_table_capacity",
        "gauge",
        "Connections this core can hold (its fixed-file table size).",
        &mut |o| {
            per_core(o, "holdfast_conn_table_capacity", &|c| {
                c.conn_table_capacity.load(Relaxed)
            })
        },
    );
    family(
        "holdfast_handshake_duration_seconds",
        "histogram",
        "Time from accept to a completed TLS handshake.",
        &mut |o| {
            for (i, c) in cores.iter().enumerate() {
                let mut cumulative = 0;
                for (b, bound) in HANDSHAKE_BUCKETS_MS.iter().enumerate() {
                    cumulative += c.handshake_buckets[b].load(Relaxed);
                    let le = f64::from(*bound) / 1000.0;
                    let _ = writeln!(o, "holdfast_handshake_duration_seconds_bucket{{core=\"{i}\",le=\"{le}\"}} {cumulative}");
                }
                let count = c.handshakes_ok.load(Relaxed);
                let _ = writeln!(o, "holdfast_handshake_duration_seconds_bucket{{core=\"{i}\",le=\"+Inf\"}} {count}");
                let _ = writeln!(
                    o,
                    "holdfast_handshake_duration_seconds_sum{{core=\"{i}\"}} {}",
                    c.handshake_ms_sum.load(Relaxed) as f64 / 1000.0
                );
                let _ = writeln!(
                    o,
                    "holdfast_handshake_duration_seconds_count{{core=\"{i}\"}} {count}"
                );
            }
        },
    );
    out
}

/// A Prometheus label value with its backslashes, quotes and newlines escaped.
pub(crate) fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn exposition_has_one_series_per_core_and_reason() {
        let cores = vec![
            Arc::new(CoreMetrics::default()),
            Arc::new(CoreMetrics::default()),
        ];
        cores[1].close(CloseReason::FrameTooLarge);
        CoreMetrics::inc(&cores[0].accepts);
        let text = render(&cores, &["/tmp/w\"1.sock".to_string()]);
        assert!(text.contains("holdfast_closes_total{core=\"1\",reason=\"frame_too_large\"} 1\n"));
        assert!(text.contains("holdfast_accepts_total{core=\"0\"} 1\n"));
        assert!(text.contains("worker=\"/tmp/w\\\"1.sock\""));
        assert_eq!(
            text.matches("holdfast_closes_total{").count(),
            2 * CloseReason::ALL.len()
        );
        assert_eq!(std::mem::align_of::<CoreMetrics>(), 128);
    }

    #[test]
    fn config_families_count_reloads() {
        let m = ConfigMetrics::default();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_250);
        m.loaded(t, false);
        m.failed();
        m.loaded(t, true);
        m.failed();
        let mut text = String::new();
        m.render(&mut text);
        assert!(
            text.contains("holdfast_config_reloads_total{result=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("holdfast_config_reloads_total{result=\"failed\"} 2\n"));
        assert!(text.contains("holdfast_config_last_reload_successful 0\n"));
        assert!(text.contains("holdfast_config_reload_timestamp_seconds 1700000000.25\n"));
        assert!(text.contains("holdfast_upgrades_total{result=\"failed\"} 0\n"));
        assert_eq!(text.matches("# TYPE ").count(), 4);
    }

    #[test]
    fn every_counter_has_one_name_and_no_gauge_is_carried() {
        let m = CoreMetrics::default();
        let names: Vec<String> = m.counters().into_iter().map(|(n, _)| n).collect();
        let unique: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "names are unique");
        for gauge in [
            "connections_open",
            "connections_hibernated",
            "outbound_bytes",
        ] {
            assert!(!names.iter().any(|n| n == gauge), "{gauge} is a gauge");
        }
        assert!(names.iter().any(|n| n == "closes/upgrade"));
    }
}
