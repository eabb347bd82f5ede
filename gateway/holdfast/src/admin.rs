//! The admin HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /healthz`, off the
//! data path. It reads the cores' counters and never writes them.
//!
//! Two kinds of threads: `holdfast-rates` samples every core's counters once a second and
//! keeps their rates, loop utilisation and worker-queue averages decayed over 1, 10 and
//! 100 seconds (the maths is in [`crate::rates`]); `holdfast-admin` accepts and hands each
//! request to a short-lived thread with read and write deadlines, at most
//! [`MAX_IN_FLIGHT`] at a time, so one slow or silent client never holds up a scrape.
//! A scrape also reports the kernel's listen-queue overflow counters from
//! `/proc/net/netstat`. Every name is documented in docs/metrics.md.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{escape, render, CloseReason, ConfigMetrics, CoreMetrics};
use crate::rates::{CounterRate, GaugeAvg, Utilisation, WINDOWS};

/// Requests served at the same time; a connection beyond this is closed at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// Deadline for each read and write of a request, and for the request head as a whole.
const IO_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request head read (request line and headers).
const MAX_HEAD: u64 = 16 * 1024;
/// How often the counters are sampled for the decayed rates.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Admin {
    pub cores: Vec<Arc<CoreMetrics>>,
    pub workers: Vec<String>,
    /// Set once draining: /healthz then answers 503 so load balancers stop sending.
    pub draining: Arc<AtomicBool>,
    /// Configuration loads and reloads (SIGHUP).
    pub config: Arc<ConfigMetrics>,
}

impl Admin {
    /// Starts the sampler and serves until the process exits.
    pub fn serve(self, listener: TcpListener) {
        let this = Arc::new(Served {
            admin: self,
            rates: Mutex::new(String::new()),
        });
        let mut sampler = Sampler::new(this.admin.cores.len(), this.admin.workers.len());
        sampler.sample(&this.admin.cores, 0.0);
        this.set_rates(sampler.render(&this.admin.workers));
        let s = this.clone();
        let spawned = std::thread::Builder::new()
            .name("holdfast-rates".into())
            .spawn(move || {
                let mut last = Instant::now();
                let mut next = last + SAMPLE_INTERVAL;
                loop {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    let now = Instant::now();
                    sampler.sample(&s.admin.cores, (now - last).as_secs_f64());
                    s.set_rates(sampler.render(&s.admin.workers));
                    last = now;
                    // Keep to the second without drifting; after a long stall, start over.
                    next += SAMPLE_INTERVAL;
                    if next <= now {
                        next = now + SAMPLE_INTERVAL;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the rates sampler; decayed rates stay at 0: {e}");
        }

        let in_flight = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!("admin: {MAX_IN_FLIGHT} requests in flight; refusing one");
                continue; // dropped: the client sees the connection close
            }
            let (s, n) = (this.clone(), in_flight.clone());
            let spawned = std::thread::Builder::new()
                .name("holdfast-admin-req".into())
                .spawn(move || {
                    if let Err(e) = s.handle(stream) {
                        tracing::debug!("admin request failed: {e}");
                    }
                    n.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!("admin: cannot start a request thread: {e}");
            }
        }
    }
}

/// What the request threads share: the admin's view of the cores and the latest rendering
/// of the decayed gauges.
struct Served {
    admin: Admin,
    rates: Mutex<String>,
}

impl Served {
    fn set_rates(&self, text: String) {
        *self.rates.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    fn metrics_text(&self) -> String {
        let mut body = render(&self.admin.cores, &self.admin.workers);
        self.admin.config.render(&mut body);
        body.push_str(&self.rates.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(l) = std::fs::read_to_string("/proc/net/netstat")
            .ok()
            .and_then(|t| listen_counters(&t))
        {
            render_listen(&mut body, l);
        }
        body
    }

    fn handle(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(IO_DEADLINE))?;
        stream.set_write_timeout(Some(IO_DEADLINE))?;
        let deadline = Instant::now() + IO_DEADLINE;
        let mut reader = BufReader::new(stream.try_clone()?.take(MAX_HEAD));
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        // Read the headers so the client sees a clean close, within the head's deadline.
        let mut line = String::new();
        while reader.read_line(&mut line)? > 2 {
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request head too slow",
                ));
            }
            line.clear();
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let (status, ctype, body) = match (method, path) {
            ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", self.metrics_text()),
            ("GET", "/healthz") if !self.admin.draining.load(Ordering::Relaxed) => {
                ("200 OK", "text/plain", "ok\n".to_string())
            }
            ("GET", "/healthz") => (
                "503 Service Unavailable",
                "text/plain",
                "draining\n".to_string(),
            ),
            ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_string(),
            ),
        };
        let mut s = stream;
        write!(s, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
        s.write_all(body.as_bytes())?;
        s.flush()
    }
}

/// A per-core counter turned into a decayed rate: the gauge family, its help, one extra
/// label (or none) and how to read the counter.
struct RateSpec {
    family: &'static str,
    help: &'static str,
    label: Option<(&'static str, &'static str)>,
    read: fn(&CoreMetrics) -> u64,
}

/// Every per-core counter with a decayed rate in `/metrics`, grouped by family (a
/// family's entries are adjacent). Closes by reason, worker frames, loop utilisation and
/// worker queue averages are handled beside these.
const RATE_SPECS: &[RateSpec] = &[
    RateSpec {
        family: "holdfast_accepts_per_second",
        help: "Client connections accepted per second, decayed over the window.",
        label: None,
        read: |c| c.accepts.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_accept_errors_per_second",
        help: "Failed accept completions per second, decayed over the window.",
        label: None,
        read: |c| c.accept_errors.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_handshakes_per_second",
        help: "TLS handshakes per second by result, decayed over the window.",
        label: Some(("result", "ok")),
        read: |c| c.handshakes_ok.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_handshakes_per_second",
        help: "",
        label: Some(("result", "failed")),
        read: |c| c.handshakes_failed.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_frames_per_second",
        help: "Native frames relayed per second by direction, decayed over the window.",
        label: Some(("direction", "from_client")),
        read: |c| c.frames_from_client.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_frames_per_second",
        help: "",
        label: Some(("direction", "to_client")),
        read: |c| c.frames_to_client.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_payload_bytes_per_second",
        help: "Frame payload bytes per second by direction, decayed over the window.",
        label: Some(("direction", "from_client")),
        read: |c| c.bytes_from_client.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_payload_bytes_per_second",
        help: "",
        label: Some(("direction", "to_client")),
        read: |c| c.bytes_to_client.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_pings_per_second",
        help: "PING frames answered per second, decayed over the window.",
        label: None,
        read: |c| c.pings.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_recv_buffers_exhausted_per_second",
        help: "Times per second the provided-buffer ring ran dry, decayed over the window.",
        label: None,
        read: |c| c.recv_buffers_exhausted.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_loop_iterations_per_second",
        help: "Event loop iterations per second, decayed over the window.",
        label: None,
        read: |c| c.loop_iterations.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_completions_per_second",
        help: "io_uring completions handled per second, decayed over the window.",
        label: None,
        read: |c| c.completions.load(Relaxed),
    },
    RateSpec {
        family: "holdfast_submissions_per_second",
        help: "io_uring submissions per second, decayed over the window.",
        label: None,
        read: |c| c.submissions.load(Relaxed),
    },
];

/// One core's trackers.
struct CoreRates {
    specs: Vec<CounterRate>,
    closes: Vec<CounterRate>,
    worker_frames: Vec<CounterRate>,
    queued: Vec<GaugeAvg>,
    util: Utilisation,
}

/// The decayed view of every core, fed once a second by the `holdfast-rates` thread.
pub struct Sampler {
    cores: Vec<CoreRates>,
}

impl Sampler {
    pub fn new(cores: usize, workers: usize) -> Sampler {
        Sampler {
            cores: (0..cores)
                .map(|_| CoreRates {
                    specs: vec![CounterRate::default(); RATE_SPECS.len()],
                    closes: vec![CounterRate::default(); CloseReason::ALL.len()],
                    worker_frames: vec![CounterRate::default(); workers],
                    queued: vec![GaugeAvg::default(); workers],
                    util: Utilisation::default(),
                })
                .collect(),
        }
    }

    /// Reads every core's counters, `dt` seconds after the previous call (0 the first
    /// time: counters become baselines, gauges count fully).
    pub fn sample(&mut self, cores: &[Arc<CoreMetrics>], dt: f64) {
        let gauge_dt = if dt > 0.0 { dt } else { 1.0 };
        for (r, c) in self.cores.iter_mut().zip(cores) {
            for (t, spec) in r.specs.iter_mut().zip(RATE_SPECS) {
                t.observe((spec.read)(c), dt);
            }
            for (t, counter) in r.closes.iter_mut().zip(&c.closes) {
                t.observe(counter.load(Relaxed), dt);
            }
            for (t, counter) in r.worker_frames.iter_mut().zip(&c.worker_frames) {
                t.observe(counter.load(Relaxed), dt);
            }
            for (t, gauge) in r.queued.iter_mut().zip(&c.worker_link_queued_bytes) {
                t.observe(gauge.load(Relaxed) as f64, gauge_dt);
            }
            r.util.observe(
                c.loop_busy_ns.load(Relaxed),
                c.loop_wait_ns.load(Relaxed),
                dt,
            );
        }
    }

    /// The decayed gauges in Prometheus text format, to follow [`render`]'s families.
    pub fn render(&self, workers: &[String]) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let header = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        };
        let windows = |out: &mut String, name: &str, labels: &str, values: [f64; 3]| {
            for ((w, _), v) in WINDOWS.iter().zip(values) {
                let _ = writeln!(out, "{name}{{{labels}window=\"{w}\"}} {}", num(v));
            }
        };
        let mut i = 0;
        while i < RATE_SPECS.len() {
            let family = RATE_SPECS[i].family;
            header(&mut out, family, RATE_SPECS[i].help);
            let end = RATE_SPECS[i..]
                .iter()
                .position(|s| s.family != family)
                .map_or(RATE_SPECS.len(), |n| i + n);
            for (core, r) in self.cores.iter().enumerate() {
                for (spec, t) in RATE_SPECS[i..end].iter().zip(&r.specs[i..end]) {
                    let extra = spec
                        .label
                        .map(|(k, v)| format!("{k}=\"{v}\","))
                        .unwrap_or_default();
                    windows(
                        &mut out,
                        family,
                        &format!("core=\"{core}\",{extra}"),
                        t.all(),
                    );
                }
            }
            i = end;
        }
        header(
            &mut out,
            "holdfast_closes_per_second",
            "Client connections closed per second by reason, decayed over the window.",
        );
        for (core, r) in self.cores.iter().enumerate() {
            for (reason, t) in CloseReason::ALL.iter().zip(&r.closes) {
                let labels = format!("core=\"{core}\",reason=\"{}\",", reason.label());
                windows(&mut out, "holdfast_closes_per_second", &labels, t.all());
            }
        }
        header(
            &mut out,
            "holdfast_worker_frames_per_second",
            "FRAME envelopes sent per second on this core's link to the worker, decayed over the window.",
        );
        for (core, r) in self.cores.iter().enumerate() {
            for (path, t) in workers.iter().zip(&r.worker_frames) {
                let labels = format!("core=\"{core}\",worker=\"{}\",", escape(path));
                windows(
                    &mut out,
                    "holdfast_worker_frames_per_second",
                    &labels,
                    t.all(),
                );
            }
        }
        header(
            &mut out,
            "holdfast_worker_link_queued_bytes_avg",
            "Bytes queued towards the worker on this core's link, sampled every second and averaged over the window.",
        );
        for (core, r) in self.cores.iter().enumerate() {
            for (path, t) in workers.iter().zip(&r.queued) {
                let labels = format!("core=\"{core}\",worker=\"{}\",", escape(path));
                windows(
                    &mut out,
                    "holdfast_worker_link_queued_bytes_avg",
                    &labels,
                    t.all(),
                );
            }
        }
        header(
            &mut out,
            "holdfast_core_utilization_ratio",
            "Share of time the core's event loop was busy (not waiting in io_uring_enter), decayed over the window.",
        );
        for (core, r) in self.cores.iter().enumerate() {
            let labels = format!("core=\"{core}\",");
            windows(
                &mut out,
                "holdfast_core_utilization_ratio",
                &labels,
                r.util.all(),
            );
        }
        out
    }
}

/// The kernel's listen-queue counters (`TcpExt: ListenOverflows ListenDrops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenCounters {
    /// Connections that completed the TCP handshake while the accept queue was full.
    pub overflows: u64,
    /// Incoming connections dropped at a listener for any reason (overflows included).
    pub drops: u64,
}

/// Reads [`ListenCounters`] from the text of `/proc/net/netstat` (a header line of
/// names and a line of values per protocol). `None` when they are not there.
pub fn listen_counters(netstat: &str) -> Option<ListenCounters> {
    let mut lines = netstat.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        let (Some(n), Some(v)) = (
            names.strip_prefix("TcpExt:"),
            values.strip_prefix("TcpExt:"),
        ) else {
            continue;
        };
        let get = |want: &str| -> Option<u64> {
            n.split_whitespace()
                .zip(v.split_whitespace())
                .find(|(k, _)| *k == want)
                .and_then(|(_, x)| x.parse().ok())
        };
        return Some(ListenCounters {
            overflows: get("ListenOverflows")?,
            drops: get("ListenDrops")?,
        });
    }
    None
}

fn render_listen(out: &mut String, l: ListenCounters) {
    let _ = writeln!(
        out,
        "# HELP holdfast_tcp_listen_overflows_total Connections the kernel could not queue for accept because a listen backlog was full (the network namespace's TcpExt ListenOverflows, all listeners).\n\
         # TYPE holdfast_tcp_listen_overflows_total counter\n\
         holdfast_tcp_listen_overflows_total {}\n\
         # HELP holdfast_tcp_listen_drops_total Connections dropped at a listen socket for any reason, overflows included (the network namespace's TcpExt ListenDrops, all listeners).\n\
         # TYPE holdfast_tcp_listen_drops_total counter\n\
         holdfast_tcp_listen_drops_total {}",
        l.overflows, l.drops
    );
}

/// A value rounded to 4 decimals, printed without trailing zeros.
fn num(v: f64) -> f64 {
    if v.is_finite() {
        (v * 1e4).round() / 1e4
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cores(n: usize) -> Vec<Arc<CoreMetrics>> {
        (0..n).map(|_| Arc::new(CoreMetrics::default())).collect()
    }

    fn value(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"));
        line[series.len() + 1..].parse().expect("a number")
    }

    #[test]
    fn rates_follow_the_counters() {
        let cs = cores(2);
        let workers = vec!["/tmp/w.sock".to_string()];
        let mut s = Sampler::new(2, 1);
        s.sample(&cs, 0.0);
        CoreMetrics::add(&cs[1].accepts, 30);
        CoreMetrics::add(&cs[0].frames_to_client, 500);
        cs[0].close(CloseReason::TlsError);
        cs[0].close(CloseReason::TlsError);
        cs[1].worker_link_queued_bytes[0].store(4096, Relaxed);
        CoreMetrics::add(&cs[1].worker_frames[0], 8);
        CoreMetrics::add(&cs[0].loop_busy_ns, 200_000_000);
        CoreMetrics::add(&cs[0].loop_wait_ns, 800_000_000);
        s.sample(&cs, 2.0);
        let text = s.render(&workers);
        for w in ["1s", "10s", "100s"] {
            let win = format!("window=\"{w}\"}}");
            assert_eq!(
                value(
                    &text,
                    &format!("holdfast_accepts_per_second{{core=\"1\",{win}")
                ),
                15.0
            );
            assert_eq!(
                value(
                    &text,
                    &format!("holdfast_accepts_per_second{{core=\"0\",{win}")
                ),
                0.0
            );
            assert_eq!(
                value(
                    &text,
                    &format!(
                        "holdfast_frames_per_second{{core=\"0\",direction=\"to_client\",{win}"
                    )
                ),
                250.0
            );
            assert_eq!(
                value(
                    &text,
                    &format!("holdfast_closes_per_second{{core=\"0\",reason=\"tls_error\",{win}")
                ),
                1.0
            );
            assert_eq!(
                value(
                    &text,
                    &format!(
                        "holdfast_worker_frames_per_second{{core=\"1\",worker=\"/tmp/w.sock\",{win}"
                    )
                ),
                4.0
            );
            // The first reading (0) counted for 1 s, the second (4096) for 2 s: the 10 s and
            // 100 s windows hold the mean, the 1 s window has decayed by e^-2 towards 4096.
            let avg = value(
                &text,
                &format!(
                    "holdfast_worker_link_queued_bytes_avg{{core=\"1\",worker=\"/tmp/w.sock\",{win}"
                ),
            );
            let want = if w == "1s" {
                4096.0 * (1.0 - (-2.0f64).exp())
            } else {
                4096.0 * 2.0 / 3.0
            };
            assert!((avg - want).abs() < 1e-3, "{w}: {avg} != {want}");
            assert_eq!(
                value(
                    &text,
                    &format!("holdfast_core_utilization_ratio{{core=\"0\",{win}")
                ),
                0.2
            );
        }
    }

    #[test]
    fn listen_counters_come_from_the_tcpext_lines() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\n\
                       TcpExt: 0 17 21 99\n\
                       IpExt: InNoRoutes ListenOverflows\n\
                       IpExt: 1 555\n";
        assert_eq!(
            listen_counters(netstat),
            Some(ListenCounters {
                overflows: 17,
                drops: 21
            })
        );
        assert_eq!(listen_counters("IpExt: A\nIpExt: 1\n"), None);
        assert_eq!(listen_counters("TcpExt: ListenOverflows\n"), None);
        let mut out = String::new();
        render_listen(
            &mut out,
            ListenCounters {
                overflows: 3,
                drops: 4,
            },
        );
        assert!(
            out.contains("\nholdfast_tcp_listen_overflows_total 3\n"),
            "{out}"
        );
        assert!(
            out.ends_with("\nholdfast_tcp_listen_drops_total 4\n"),
            "{out}"
        );
        // On this host, /proc/net/netstat has them.
        if let Ok(t) = std::fs::read_to_string("/proc/net/netstat") {
            assert!(listen_counters(&t).is_some(), "{t}");
        }
    }

    #[test]
    fn every_family_has_help_and_type_once_and_every_series_a_window() {
        let cs = cores(3);
        let workers = vec!["a".to_string(), "b\"c".to_string()];
        let mut s = Sampler::new(3, 2);
        s.sample(&cs, 0.0);
        s.sample(&cs, 1.0);
        let text = s.render(&workers);
        let mut families = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert_eq!(kind, "gauge");
                assert!(!families.contains(&name.to_string()), "{name} twice");
                families.push(name.to_string());
            } else if !l.starts_with('#') {
                let name = l.split('{').next().expect("name");
                assert_eq!(Some(&name.to_string()), families.last(), "{l}");
                assert!(l.contains("window=\""), "{l}");
            }
        }
        assert!(families.len() >= 14, "{families:?}");
        assert!(text.contains("worker=\"b\\\"c\""));
        // Every reason x 3 cores x 3 windows.
        let series = crate::metrics::CloseReason::ALL.len() * 3 * 3;
        assert_eq!(text.matches("holdfast_closes_per_second{").count(), series);
        // Every number parses.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().expect("value");
            v.parse::<f64>().unwrap_or_else(|_| panic!("{l}"));
        }
    }
}
