//! `holdfast top`: a live terminal view of one running gateway, read from its `/metrics`
//! once per refresh (a plain HTTP GET on the admin address; nothing else is needed).
//!
//! Per-core rows (connections, accepts, handshakes, frames in and out, closes, worker
//! queue, links up, buffer-ring exhaustion, loop utilisation), a totals row, the worst
//! queue (the link with the most queued bytes: the gateway's primary health signal) and
//! what changed since the previous refresh: the counters that moved and why connections
//! closed. Rates are counter deltas over the refresh interval; a single snapshot
//! (`--once`) has no previous scrape and shows the gateway's own decayed gauges instead.
//!
//! Also here: a parser for the Prometheus text exposition format (0.0.4), which the view
//! and the tests use.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

// ---------------------------------------------------------------------------------------
// The exposition format

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds since the epoch, when the line carries one.
    pub timestamp: Option<i64>,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn matches(&self, name: &str, filter: &[(&str, &str)]) -> bool {
        self.name == name && filter.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// A parsed scrape: every sample in order, and each family's `# TYPE`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
}

/// Where and why a scrape could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "metrics line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

const KINDS: [&str; 5] = ["counter", "gauge", "histogram", "summary", "untyped"];

impl Exposition {
    /// Parses the text format: `# HELP` and `# TYPE` lines, other comments (ignored),
    /// blank lines and samples. Label values may use the `\\`, `\"` and `\n` escapes.
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        let mut out = Exposition::default();
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| ParseError {
                line: i + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let comment = comment.trim_start();
                let (keyword, rest) = comment.split_once(' ').unwrap_or((comment, ""));
                if keyword != "TYPE" && keyword != "HELP" {
                    continue;
                }
                let rest = rest.trim_start();
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if !valid_metric_name(name) {
                    return Err(err(format!("bad metric name {name:?} in # {keyword}")));
                }
                if keyword == "TYPE" {
                    let kind = tail.trim();
                    if !KINDS.contains(&kind) {
                        return Err(err(format!("unknown type {kind:?} for {name}")));
                    }
                    if out.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(err(format!("second # TYPE for {name}")));
                    }
                } else {
                    out.help.insert(name.to_owned(), tail.to_owned());
                }
                continue;
            }
            out.samples.push(parse_sample(line).map_err(err)?);
        }
        Ok(out)
    }

    /// The series of `name` carrying every label in `filter` (they may carry more).
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.matches(name, filter))
    }

    /// The sum over those series, or `None` when there is none.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.series(name, filter) {
            found = true;
            total += s.value;
        }
        found.then_some(total)
    }

    /// The family a sample belongs to (a histogram's `_bucket` belongs to its base).
    fn kind_of(&self, sample: &str) -> Option<&str> {
        if let Some(k) = self.types.get(sample) {
            return Some(k);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if let Some(k) = self.types.get(base) {
                    return Some(k);
                }
            }
        }
        None
    }
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest
                .find('=')
                .ok_or_else(|| format!("label without '=' in {line:?}"))?;
            let key = rest[..eq].trim();
            if !valid_label_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            rest = rest[eq + 1..]
                .trim_start()
                .strip_prefix('"')
                .ok_or_else(|| format!("label {key} has no quoted value"))?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                let (i, c) = chars
                    .next()
                    .ok_or_else(|| format!("unterminated value of label {key}"))?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => {
                            return Err(format!("bad escape \\{other:?} in label {key}"));
                        }
                    },
                    c => value.push(c),
                }
            };
            if labels.iter().any(|(k, _)| k == key) {
                return Err(format!("label {key} twice"));
            }
            labels.push((key.to_owned(), value));
            rest = rest[end + 1..].trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err(format!("expected ',' or '}}' after label {key}"));
            }
        }
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let value = parse_value(value).ok_or_else(|| format!("bad value {value:?}"))?;
    let timestamp = match fields.next() {
        None => None,
        Some(t) => Some(t.parse().map_err(|_| format!("bad timestamp {t:?}"))?),
    };
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected {extra:?} after the value"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
        timestamp,
    })
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// The view

/// Families whose counters move on every loop pass; "what changed" leaves them out.
const HOUSEKEEPING: [&str; 5] = [
    "holdfast_loop_iterations_total",
    "holdfast_completions_total",
    "holdfast_submissions_total",
    "holdfast_loop_busy_seconds_total",
    "holdfast_loop_wait_seconds_total",
];

/// The decay window whose gauges a single snapshot shows as its rates.
pub const SNAPSHOT_WINDOW: &str = "10s";

/// What one refresh shows: the scrape, and the previous one with the seconds between.
pub struct View<'a> {
    /// Admin address, for the title.
    pub addr: &'a str,
    /// Wall-clock time for the title, e.g. `12:34:56 UTC`.
    pub clock: &'a str,
    pub cur: &'a Exposition,
    pub prev: Option<(&'a Exposition, f64)>,
}

/// One column of a core row that is a rate: the counter, its label filter, and the
/// decayed gauge a single snapshot falls back to.
struct RateCol {
    counter: &'static str,
    filter: &'static [(&'static str, &'static str)],
    gauge: &'static str,
}

const ACCEPTS: RateCol = RateCol {
    counter: "holdfast_accepts_total",
    filter: &[],
    gauge: "holdfast_accepts_per_second",
};
const HS_OK: RateCol = RateCol {
    counter: "holdfast_handshakes_total",
    filter: &[("result", "ok")],
    gauge: "holdfast_handshakes_per_second",
};
const HS_FAILED: RateCol = RateCol {
    counter: "holdfast_handshakes_total",
    filter: &[("result", "failed")],
    gauge: "holdfast_handshakes_per_second",
};
const FRAMES_IN: RateCol = RateCol {
    counter: "holdfast_frames_total",
    filter: &[("direction", "from_client")],
    gauge: "holdfast_frames_per_second",
};
const FRAMES_OUT: RateCol = RateCol {
    counter: "holdfast_frames_total",
    filter: &[("direction", "to_client")],
    gauge: "holdfast_frames_per_second",
};
const CLOSES: RateCol = RateCol {
    counter: "holdfast_closes_total",
    filter: &[],
    gauge: "holdfast_closes_per_second",
};
const BUF_DRY: RateCol = RateCol {
    counter: "holdfast_recv_buffers_exhausted_total",
    filter: &[],
    gauge: "holdfast_recv_buffers_exhausted_per_second",
};

impl View<'_> {
    fn rate(&self, core: Option<&str>, col: &RateCol) -> Option<f64> {
        let mut filter: Vec<(&str, &str)> = col.filter.to_vec();
        if let Some(c) = core {
            filter.push(("core", c));
        }
        match self.prev {
            Some((prev, dt)) if dt > 0.0 => {
                let now = self.cur.sum(col.counter, &filter)?;
                let before = prev.sum(col.counter, &filter).unwrap_or(0.0);
                Some(((now - before) / dt).max(0.0))
            }
            _ => {
                filter.push(("window", SNAPSHOT_WINDOW));
                self.cur.sum(col.gauge, &filter)
            }
        }
    }

    fn busy(&self, core: Option<&str>) -> Option<f64> {
        let filter: Vec<(&str, &str)> = core.map(|c| vec![("core", c)]).unwrap_or_default();
        match self.prev {
            Some((prev, _)) => {
                let d = |name: &str| -> Option<f64> {
                    Some(self.cur.sum(name, &filter)? - prev.sum(name, &filter).unwrap_or(0.0))
                };
                let busy = d("holdfast_loop_busy_seconds_total")?;
                let wait = d("holdfast_loop_wait_seconds_total")?;
                (busy + wait > 0.0).then(|| (busy / (busy + wait)).clamp(0.0, 1.0))
            }
            None => {
                let mut f = filter.clone();
                f.push(("window", SNAPSHOT_WINDOW));
                let n = self
                    .cur
                    .series("holdfast_core_utilization_ratio", &f)
                    .count();
                let sum = self.cur.sum("holdfast_core_utilization_ratio", &f)?;
                Some(sum / n.max(1) as f64)
            }
        }
    }

    fn cores(&self) -> Vec<String> {
        let mut cores: Vec<String> = self
            .cur
            .series("holdfast_connections_open", &[])
            .filter_map(|s| s.label("core").map(str::to_owned))
            .collect();
        cores.sort_by_key(|c| (c.parse::<u64>().unwrap_or(u64::MAX), c.clone()));
        cores.dedup();
        cores
    }

    fn row(&self, out: &mut String, name: &str, core: Option<&str>) {
        let f: Vec<(&str, &str)> = core.map(|c| vec![("core", c)]).unwrap_or_default();
        let cur = self.cur;
        let conns = cur.sum("holdfast_connections_open", &f);
        let asleep = cur.sum("holdfast_connections_hibernated", &f);
        let queued = cur.sum("holdfast_worker_link_queued_bytes", &f);
        let links_total = cur.series("holdfast_worker_link_up", &f).count();
        let links_up = cur
            .series("holdfast_worker_link_up", &f)
            .filter(|s| s.value >= 1.0)
            .count();
        let cell = |v: Option<f64>, fmt: fn(f64) -> String| v.map_or("-".to_string(), fmt);
        let _ = writeln!(
            out,
            "{name:>5} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>9} {:>6} {:>8} {:>6}",
            cell(conns, count),
            cell(asleep, count),
            cell(self.rate(core, &ACCEPTS), rate),
            cell(self.rate(core, &HS_OK), rate),
            cell(self.rate(core, &HS_FAILED), rate),
            cell(self.rate(core, &FRAMES_IN), rate),
            cell(self.rate(core, &FRAMES_OUT), rate),
            cell(self.rate(core, &CLOSES), rate),
            cell(queued, bytes),
            if links_total == 0 {
                "-".to_string()
            } else {
                format!("{links_up}/{links_total}")
            },
            cell(self.rate(core, &BUF_DRY), rate),
            cell(self.busy(core), percent),
        );
    }

    /// The whole screen as text (no escape sequences).
    pub fn render(&self) -> String {
        let cur = self.cur;
        let mut out = String::with_capacity(4096);
        let cores = self.cores();
        let conns = cur.sum("holdfast_connections_open", &[]).unwrap_or(0.0);
        let _ = write!(
            out,
            "holdfast top  {}  {}  cores {}  connections {}",
            self.addr,
            self.clock,
            cores.len(),
            count(conns)
        );
        if let Some(cap) = cur.sum("holdfast_conn_table_capacity", &[]) {
            if cap > 0.0 {
                let _ = write!(out, " of {} ({:.1}%)", count(cap), 100.0 * conns / cap);
            }
        }
        if let Some((prev, _)) = self.prev {
            let before = prev.sum("holdfast_connections_open", &[]).unwrap_or(0.0);
            let _ = write!(out, "  ({:+})", conns - before);
        }
        out.push('\n');
        match self.prev {
            Some((_, dt)) => {
                let _ = writeln!(out, "rates per second over the last {dt:.1} s");
            }
            None => {
                let _ = writeln!(
                    out,
                    "rates per second: the gateway's {SNAPSHOT_WINDOW} decayed gauges (single snapshot)"
                );
            }
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "{:>5} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>9} {:>6} {:>8} {:>6}",
            "core",
            "conns",
            "asleep",
            "acc/s",
            "hs/s",
            "hsfl/s",
            "in f/s",
            "out f/s",
            "close/s",
            "queued",
            "links",
            "bufdry/s",
            "busy"
        );
        for c in &cores {
            self.row(&mut out, c, Some(c));
        }
        self.row(&mut out, "all", None);
        out.push('\n');

        // The worst queue: the link with the most bytes waiting for its worker.
        let worst = cur
            .series("holdfast_worker_link_queued_bytes", &[])
            .max_by(|a, b| a.value.total_cmp(&b.value));
        let links = cur.series("holdfast_worker_link_queued_bytes", &[]).count();
        match worst {
            None => out.push_str("worst queue: no worker links\n"),
            Some(s) if s.value <= 0.0 => {
                let _ = writeln!(out, "worst queue: none, all {links} links empty");
            }
            Some(s) => {
                let core = s.label("core").unwrap_or("?");
                let worker = s.label("worker").unwrap_or("?");
                let lf = [("core", core), ("worker", worker)];
                let up = cur.sum("holdfast_worker_link_up", &lf).unwrap_or(0.0) >= 1.0;
                let _ = write!(
                    out,
                    "worst queue: core {core} -> {worker}: {} queued",
                    bytes(s.value)
                );
                if let Some(u) = cur.sum("holdfast_worker_link_unacked_bytes", &lf) {
                    let _ = write!(out, ", {} unacked", bytes(u));
                }
                if let Some((prev, _)) = self.prev {
                    if let Some(p) = prev.sum("holdfast_worker_link_queued_bytes", &lf) {
                        let _ = write!(
                            out,
                            " ({}{})",
                            sign(s.value - p),
                            bytes((s.value - p).abs())
                        );
                    }
                }
                let _ = writeln!(out, ", link {}", if up { "up" } else { "DOWN" });
            }
        }
        let paused: Vec<&str> = cur
            .series("holdfast_backpressure", &[])
            .filter(|s| s.value >= 1.0)
            .filter_map(|s| s.label("core"))
            .collect();
        if !paused.is_empty() {
            let _ = writeln!(
                out,
                "back-pressure: reading paused on core {}",
                paused.join(", ")
            );
        }
        let dry = cur
            .sum("holdfast_recv_buffers_exhausted_total", &[])
            .unwrap_or(0.0);
        let _ = writeln!(out, "buffer ring ran dry: {} times since start", count(dry));
        out.push('\n');
        self.changes(&mut out);
        out
    }

    fn changes(&self, out: &mut String) {
        let cur = self.cur;
        let Some((prev, dt)) = self.prev else {
            let reasons = by_label(cur, "holdfast_closes_total", "reason");
            let list: Vec<String> = reasons
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(r, v)| format!("{r} {}", count(*v)))
                .collect();
            let _ = writeln!(
                out,
                "closes since start: {}",
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(", ")
                }
            );
            out.push_str("changes: single snapshot; refresh to see what moves\n");
            return;
        };
        let _ = writeln!(out, "changed in the last {dt:.1} s:");
        // Close reasons first: why connections went away.
        let now = by_label(cur, "holdfast_closes_total", "reason");
        let before = by_label(prev, "holdfast_closes_total", "reason");
        let mut closes: Vec<(String, f64)> = now
            .iter()
            .map(|(r, v)| (r.clone(), v - before.get(r).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d > 0.0)
            .collect();
        closes.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let list: Vec<String> = closes
            .iter()
            .map(|(r, d)| format!("{r} +{}", count(*d)))
            .collect();
        let _ = writeln!(
            out,
            "  closes: {}",
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        );
        // Link state flips.
        for s in cur.series("holdfast_worker_link_up", &[]) {
            let f: Vec<(&str, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Some(p) = prev.sum("holdfast_worker_link_up", &f) {
                if (p >= 1.0) != (s.value >= 1.0) {
                    let _ = writeln!(
                        out,
                        "  link core {} -> {} went {}",
                        s.label("core").unwrap_or("?"),
                        s.label("worker").unwrap_or("?"),
                        if s.value >= 1.0 { "UP" } else { "DOWN" }
                    );
                }
            }
        }
        // Every other counter that moved, summed over cores, largest first.
        let sums = |e: &Exposition| -> BTreeMap<String, f64> {
            let mut m = BTreeMap::new();
            for s in &e.samples {
                if e.kind_of(&s.name) != Some("counter")
                    || HOUSEKEEPING.contains(&s.name.as_str())
                    || s.name == "holdfast_closes_total"
                {
                    continue;
                }
                *m.entry(series_key(s, "core")).or_insert(0.0) += s.value;
            }
            m
        };
        let (now, before) = (sums(cur), sums(prev));
        let mut moved: Vec<(String, f64)> = now
            .into_iter()
            .map(|(k, v)| {
                let d = v - before.get(&k).copied().unwrap_or(0.0);
                (k, d)
            })
            .filter(|(_, d)| *d != 0.0)
            .collect();
        moved.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then_with(|| a.0.cmp(&b.0)));
        if moved.is_empty() {
            out.push_str("  counters: nothing moved\n");
        }
        const SHOWN: usize = 12;
        for (k, d) in moved.iter().take(SHOWN) {
            let _ = writeln!(out, "  {k:<60} {}{}", sign(*d), count(d.abs()));
        }
        if moved.len() > SHOWN {
            let _ = writeln!(out, "  ... and {} more", moved.len() - SHOWN);
        }
    }
}

/// `name{labels}` without `drop`, labels in order.
fn series_key(s: &Sample, drop: &str) -> String {
    let labels: Vec<String> = s
        .labels
        .iter()
        .filter(|(k, _)| k != drop)
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect();
    if labels.is_empty() {
        s.name.clone()
    } else {
        format!("{}{{{}}}", s.name, labels.join(","))
    }
}

fn by_label(e: &Exposition, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for s in e.series(name, &[]) {
        *m.entry(s.label(label).unwrap_or("").to_owned())
            .or_insert(0.0) += s.value;
    }
    m
}

fn sign(d: f64) -> &'static str {
    if d < 0.0 {
        "-"
    } else {
        "+"
    }
}

/// A count: exact below ten thousand, then k, M, G with one decimal.
fn count(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A rate: one decimal below a hundred, then like a count.
fn rate(v: f64) -> String {
    if v.abs() < 100.0 {
        format!("{v:.1}")
    } else {
        count(v)
    }
}

fn bytes(v: f64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if v < 1024.0 {
        return format!("{v:.0} B");
    }
    let mut x = v / 1024.0;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    format!("{x:.1} {}", UNITS[unit])
}

fn percent(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

/// `HH:MM:SS UTC` now.
fn clock_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = secs % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

// ---------------------------------------------------------------------------------------
// Fetching and the loop

/// Deadline for connecting to the admin address and for each read and write.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest /metrics body accepted.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// `GET /metrics` from the admin address; the body on a 200.
pub fn fetch_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("cannot connect to the admin address {addr}"))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: holdfast-top\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(MAX_BODY)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading /metrics from {addr}"))?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers in the admin's answer")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "GET /metrics on {addr} answered {:?}",
            head.lines().next().unwrap_or("")
        );
    }
    let mut body = &raw[end + 4..];
    let length = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    if let Some(len) = length {
        body = body
            .get(..len)
            .context("the /metrics body is shorter than its Content-Length")?;
    }
    String::from_utf8(body.to_vec()).context("the /metrics body is not UTF-8")
}

/// Runs the view against the gateway whose admin address is `admin_addr`, refreshing
/// every `interval` (at least 100 ms). With `once`, prints one snapshot and returns; an
/// unreachable gateway is then an error. Otherwise runs until interrupted, showing
/// fetch errors on screen and retrying.
pub fn run(admin_addr: SocketAddr, interval: Duration, once: bool) -> anyhow::Result<()> {
    let interval = interval.max(Duration::from_millis(100));
    let addr = admin_addr.to_string();
    let stdout = std::io::stdout();
    let tty = stdout.is_terminal();
    if once {
        let cur = Exposition::parse(&fetch_metrics(admin_addr)?)?;
        let clock = clock_utc();
        let text = View {
            addr: &addr,
            clock: &clock,
            cur: &cur,
            prev: None,
        }
        .render();
        let mut out = stdout.lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(());
    }
    let mut prev: Option<(Exposition, Instant)> = None;
    let mut next = Instant::now();
    loop {
        let fetched = fetch_metrics(admin_addr)
            .and_then(|t| Exposition::parse(&t).map_err(anyhow::Error::from));
        let at = Instant::now();
        let clock = clock_utc();
        let text = match &fetched {
            Ok(cur) => View {
                addr: &addr,
                clock: &clock,
                cur,
                prev: prev
                    .as_ref()
                    .map(|(p, t)| (p, at.duration_since(*t).as_secs_f64())),
            }
            .render(),
            Err(e) => format!(
                "holdfast top  {addr}  {clock}\n\nno metrics: {e:#}\nretrying every {interval:?}\n"
            ),
        };
        {
            let mut out = stdout.lock();
            if tty {
                // Home, clear the screen, then the frame.
                out.write_all(b"\x1b[H\x1b[2J")?;
            } else {
                out.write_all(b"\n")?;
            }
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        if let Ok(cur) = fetched {
            prev = Some((cur, at));
        }
        next += interval;
        let now = Instant::now();
        if next <= now {
            next = now + interval;
        }
        std::thread::sleep(next - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::Sampler;
    use crate::metrics::{render, CloseReason, CoreMetrics};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    #[test]
    fn parses_help_type_labels_escapes_and_timestamps() {
        let text = "# HELP a_total Things that happened.\n\
                    # TYPE a_total counter\n\
                    a_total{core=\"0\",reason=\"x\"} 3\n\
                    a_total{ core = \"1\" , reason=\"q\\\"uote\\\\back\\nline\", } 4 1700000000000\n\
                    \n\
                    # a free comment\n\
                    # TYPE g gauge\n\
                    g 2.5e3\n\
                    g{le=\"+Inf\"} +Inf\n\
                    g{} NaN\n\
                    h:sub -1.5\r\n";
        let e = Exposition::parse(text).expect("parses");
        assert_eq!(e.types.get("a_total").map(String::as_str), Some("counter"));
        assert_eq!(e.types.get("g").map(String::as_str), Some("gauge"));
        assert_eq!(
            e.help.get("a_total").map(String::as_str),
            Some("Things that happened.")
        );
        assert_eq!(e.samples.len(), 6);
        assert_eq!(e.samples[1].label("reason"), Some("q\"uote\\back\nline"));
        assert_eq!(e.samples[1].label("core"), Some("1"));
        assert_eq!(e.samples[1].timestamp, Some(1_700_000_000_000));
        assert_eq!(e.samples[2].value, 2500.0);
        assert_eq!(e.samples[3].value, f64::INFINITY);
        assert!(e.samples[4].value.is_nan());
        assert!(e.samples[4].labels.is_empty());
        assert_eq!(e.samples[5].name, "h:sub");
        assert_eq!(e.samples[5].value, -1.5);
        assert_eq!(e.sum("a_total", &[]), Some(7.0));
        assert_eq!(e.sum("a_total", &[("core", "0")]), Some(3.0));
        assert_eq!(e.sum("a_total", &[("core", "9")]), None);
    }

    #[test]
    fn rejects_malformed_lines_with_their_line_number() {
        let cases = [
            ("ok 1\nnovalue\n", 2, "no value"),
            ("x{a=\"1\" 2\n", 1, "expected ','"),
            ("x{a=\"1} 2\n", 1, "unterminated"),
            ("x{a=1} 2\n", 1, "quoted value"),
            ("x{1a=\"1\"} 2\n", 1, "bad label name"),
            ("x{a=\"1\",a=\"2\"} 2\n", 1, "twice"),
            ("x{a=\"\\t\"} 2\n", 1, "bad escape"),
            ("9x 2\n", 1, "bad metric name"),
            ("x abc\n", 1, "bad value"),
            ("x 1 2 3\n", 1, "unexpected"),
            ("x 1 notatime\n", 1, "bad timestamp"),
            ("# TYPE x countr\n", 1, "unknown type"),
            ("# TYPE x gauge\n# TYPE x gauge\n", 2, "second # TYPE"),
        ];
        for (text, line, what) in cases {
            let e = Exposition::parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn parses_everything_the_gateway_serves() {
        let cores: Vec<Arc<CoreMetrics>> =
            (0..2).map(|_| Arc::new(CoreMetrics::default())).collect();
        let workers = vec!["/tmp/a \"b\".sock".to_string()];
        let mut sampler = Sampler::new(2, 1);
        sampler.sample(&cores, 0.0);
        cores[0].observe_handshake(3);
        sampler.sample(&cores, 1.0);
        let text = render(&cores, &workers) + &sampler.render(&workers);
        let e = Exposition::parse(&text).expect("the gateway's own exposition parses");
        assert_eq!(
            e.series("holdfast_worker_link_up", &[])
                .next()
                .and_then(|s| s.label("worker")),
            Some("/tmp/a \"b\".sock")
        );
        // Every sample belongs to a family with a TYPE.
        for s in &e.samples {
            assert!(e.kind_of(&s.name).is_some(), "{} has no # TYPE", s.name);
        }
    }

    /// Two scrapes one second apart of a gateway with two cores and one worker.
    fn scrapes() -> (Exposition, Exposition) {
        let cores: Vec<Arc<CoreMetrics>> =
            (0..2).map(|_| Arc::new(CoreMetrics::default())).collect();
        let workers = vec!["/run/holdfast/echo.sock".to_string()];
        for c in &cores {
            c.conn_table_capacity.store(1000, Relaxed);
            c.worker_link_up[0].store(1, Relaxed);
        }
        cores[0].connections_open.store(10, Relaxed);
        cores[1].connections_open.store(5, Relaxed);
        CoreMetrics::add(&cores[0].accepts, 12);
        CoreMetrics::add(&cores[0].handshakes_ok, 10);
        cores[0].close(CloseReason::PeerClosed);
        let before = render(&cores, &workers);
        // One second later: core 0 accepted 4 (one garbage), relayed 300 frames each way,
        // closed 3; core 1's link went down with 2 KiB queued and its buffer ring ran dry.
        cores[0].connections_open.store(11, Relaxed);
        cores[0].connections_hibernated.store(7, Relaxed);
        CoreMetrics::add(&cores[0].accepts, 4);
        CoreMetrics::add(&cores[0].handshakes_ok, 3);
        CoreMetrics::add(&cores[0].handshakes_failed, 1);
        CoreMetrics::add(&cores[0].frames_from_client, 300);
        CoreMetrics::add(&cores[0].frames_to_client, 300);
        CoreMetrics::add(&cores[0].pings, 7);
        cores[0].close(CloseReason::PeerClosed);
        cores[0].close(CloseReason::PeerClosed);
        cores[0].close(CloseReason::TlsError);
        CoreMetrics::add(&cores[0].loop_busy_ns, 250_000_000);
        CoreMetrics::add(&cores[0].loop_wait_ns, 750_000_000);
        cores[1].worker_link_up[0].store(0, Relaxed);
        cores[1].worker_link_queued_bytes[0].store(2048, Relaxed);
        CoreMetrics::add(&cores[1].recv_buffers_exhausted, 2);
        let after = render(&cores, &workers);
        (
            Exposition::parse(&before).expect("parses"),
            Exposition::parse(&after).expect("parses"),
        )
    }

    fn row<'a>(screen: &'a str, name: &str) -> Vec<&'a str> {
        screen
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .unwrap_or_else(|| panic!("no row {name} in\n{screen}"))
    }

    #[test]
    fn live_view_shows_rates_worst_queue_and_changes() {
        let (before, after) = scrapes();
        let screen = View {
            addr: "127.0.0.1:9090",
            clock: "12:00:00 UTC",
            cur: &after,
            prev: Some((&before, 1.0)),
        }
        .render();
        assert!(screen.starts_with(
            "holdfast top  127.0.0.1:9090  12:00:00 UTC  cores 2  connections 16 of 2000 (0.8%)  (+1)\n"
        ), "{screen}");
        assert!(
            screen.contains("rates per second over the last 1.0 s"),
            "{screen}"
        );
        //          core conns asleep acc/s hs/s hsfl/s in out close queued links bufdry busy
        assert_eq!(
            row(&screen, "0"),
            [
                "0", "11", "7", "4.0", "3.0", "1.0", "300", "300", "3.0", "0", "B", "1/1", "0.0",
                "25.0%"
            ]
        );
        assert_eq!(
            row(&screen, "1"),
            [
                "1", "5", "0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "2.0", "KiB", "0/1",
                "2.0", "-"
            ]
        );
        assert_eq!(
            row(&screen, "all"),
            [
                "all", "16", "7", "4.0", "3.0", "1.0", "300", "300", "3.0", "2.0", "KiB", "1/2",
                "2.0", "25.0%"
            ]
        );
        assert!(screen.contains(
            "worst queue: core 1 -> /run/holdfast/echo.sock: 2.0 KiB queued, 0 B unacked (+2.0 KiB), link DOWN\n"
        ), "{screen}");
        assert!(
            screen.contains("buffer ring ran dry: 2 times since start\n"),
            "{screen}"
        );
        assert!(screen.contains("changed in the last 1.0 s:\n"), "{screen}");
        assert!(
            screen.contains("  closes: peer_closed +2, tls_error +1\n"),
            "{screen}"
        );
        assert!(
            screen.contains("  link core 1 -> /run/holdfast/echo.sock went DOWN\n"),
            "{screen}"
        );
        let moved: Vec<&str> = screen
            .lines()
            .skip_while(|l| !l.starts_with("  closes:"))
            .filter(|l| l.starts_with("  holdfast_"))
            .collect();
        let names: Vec<&str> = moved
            .iter()
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "holdfast_frames_total{direction=\"from_client\"}",
                "holdfast_frames_total{direction=\"to_client\"}",
                "holdfast_pings_total",
                "holdfast_accepts_total",
                "holdfast_handshakes_total{result=\"ok\"}",
                "holdfast_recv_buffers_exhausted_total",
                "holdfast_handshakes_total{result=\"failed\"}",
            ],
            "{screen}"
        );
        assert!(moved[0].ends_with(" +300"), "{screen}");
        // Housekeeping counters move all the time and are left out.
        assert!(
            !screen.contains("holdfast_loop_busy_seconds_total"),
            "{screen}"
        );
    }

    #[test]
    fn single_snapshot_uses_the_decayed_gauges() {
        let captured = "\
# HELP holdfast_connections_open Client connections open, handshaking ones included.
# TYPE holdfast_connections_open gauge
holdfast_connections_open{core=\"0\"} 1500
holdfast_connections_open{core=\"1\"} 25000
# TYPE holdfast_closes_total counter
holdfast_closes_total{core=\"0\",reason=\"peer_closed\"} 40
holdfast_closes_total{core=\"1\",reason=\"idle_timeout\"} 2
holdfast_closes_total{core=\"1\",reason=\"tls_error\"} 0
# TYPE holdfast_worker_link_up gauge
holdfast_worker_link_up{core=\"0\",worker=\"w\"} 1
holdfast_worker_link_up{core=\"1\",worker=\"w\"} 1
# TYPE holdfast_worker_link_queued_bytes gauge
holdfast_worker_link_queued_bytes{core=\"0\",worker=\"w\"} 3145728
holdfast_worker_link_queued_bytes{core=\"1\",worker=\"w\"} 0
# TYPE holdfast_accepts_per_second gauge
holdfast_accepts_per_second{core=\"0\",window=\"1s\"} 99
holdfast_accepts_per_second{core=\"0\",window=\"10s\"} 12.5
holdfast_accepts_per_second{core=\"1\",window=\"10s\"} 12345
# TYPE holdfast_core_utilization_ratio gauge
holdfast_core_utilization_ratio{core=\"0\",window=\"10s\"} 0.5
holdfast_core_utilization_ratio{core=\"1\",window=\"10s\"} 0.25
";
        let cur = Exposition::parse(captured).expect("parses");
        let screen = View {
            addr: "[::1]:9090",
            clock: "00:00:00 UTC",
            cur: &cur,
            prev: None,
        }
        .render();
        assert!(
            screen.starts_with(
                "holdfast top  [::1]:9090  00:00:00 UTC  cores 2  connections 26.5k\n"
            ),
            "{screen}"
        );
        assert!(
            screen.contains("the gateway's 10s decayed gauges"),
            "{screen}"
        );
        assert_eq!(
            row(&screen, "0"),
            [
                "0", "1500", "-", "12.5", "-", "-", "-", "-", "-", "3.0", "MiB", "1/1", "-",
                "50.0%"
            ]
        );
        assert_eq!(row(&screen, "1")[..4], ["1", "25.0k", "-", "12.3k"]);
        assert_eq!(row(&screen, "all")[..4], ["all", "26.5k", "-", "12.4k"]);
        assert_eq!(row(&screen, "all")[13], "37.5%");
        assert!(
            screen.contains("worst queue: core 0 -> w: 3.0 MiB queued, link up\n"),
            "{screen}"
        );
        assert!(
            screen.contains("closes since start: idle_timeout 2, peer_closed 40\n"),
            "{screen}"
        );
        assert!(screen.contains("changes: single snapshot"), "{screen}");
    }

    #[test]
    fn empty_queues_name_no_link() {
        let cur = Exposition::parse(
            "holdfast_connections_open{core=\"0\"} 0\n\
             holdfast_worker_link_queued_bytes{core=\"0\",worker=\"a\"} 0\n\
             holdfast_worker_link_queued_bytes{core=\"0\",worker=\"b\"} 0\n",
        )
        .expect("parses");
        let screen = View {
            addr: "a",
            clock: "c",
            cur: &cur,
            prev: None,
        }
        .render();
        assert!(
            screen.contains("\nworst queue: none, all 2 links empty\n"),
            "{screen}"
        );
        let none = Exposition::parse("holdfast_connections_open 0\n").expect("parses");
        let screen = View {
            addr: "a",
            clock: "c",
            cur: &none,
            prev: Some((&none, 1.0)),
        }
        .render();
        assert!(
            screen.contains("\nworst queue: no worker links\n"),
            "{screen}"
        );
        assert!(screen.contains("  counters: nothing moved\n"), "{screen}");
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(count(9999.0), "9999");
        assert_eq!(count(12_345.0), "12.3k");
        assert_eq!(count(2_500_000.0), "2.5M");
        assert_eq!(rate(0.25), "0.2");
        assert_eq!(rate(99.95), "100.0");
        assert_eq!(rate(150.0), "150");
        assert_eq!(bytes(1023.0), "1023 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(percent(0.123), "12.3%");
    }
}
