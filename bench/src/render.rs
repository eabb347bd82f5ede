//! `holdfast-bench report`: turns JSON reports into one markdown table (a row per system,
//! each cell the median of its runs with the spread, min–max, beside it), ratio lines
//! against a reference system, and an SVG chart: memory per connection against the
//! connection count (from idle reports' steps) and latency percentiles (from echo
//! reports), drawn by hand.
//!
//! Reports are grouped by their `label` (the `--label` each run was given, else the file's
//! name). Reading is lenient, a field missing from a report only leaves its cell empty, so
//! reports from older versions still render. Everything but reading and writing files is
//! pure and unit-tested with known inputs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use clap::Args;
use serde_json::Value;

/// Arguments of `holdfast-bench report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// JSON reports of any scenario (idle, handshake, echo, storm, ceiling).
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// Also write the markdown to this file.
    #[arg(long, value_name = "FILE")]
    pub md: Option<PathBuf>,
    /// Write the SVG chart to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Label the others are compared with (ratio lines under the table); its row comes first.
    #[arg(long, value_name = "LABEL")]
    pub reference: Option<String>,
}

/// The median of a sample and its spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// Median: the middle value, or the mean of the two middle values.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of values.
    pub n: usize,
}

/// The median and spread of `values`, ignoring values that are not finite; `None` when
/// nothing is left.
pub fn stat(values: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// Per-connection memory at each step after the first: the slope of `(conns, bytes)` from
/// the first step to that step. The first step carries the fixed costs (code, buffer
/// rings, tables), which the slope leaves out.
pub fn incremental_slopes(steps: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let Some(&(x0, y0)) = steps.first() else {
        return Vec::new();
    };
    steps[1..]
        .iter()
        .filter(|&&(x, _)| x > x0)
        .map(|&(x, y)| (x, (y - y0) / (x - x0)))
        .collect()
}

/// One JSON report and the label it is grouped under.
#[derive(Debug, Clone)]
pub struct Run {
    /// The system's name.
    pub label: String,
    /// `idle`, `handshake`, `echo`, `storm` or `ceiling`.
    pub scenario: String,
    /// The whole report.
    pub json: Value,
}

impl Run {
    /// A run from a report's text; `fallback` names it when the report has no label.
    pub fn parse(text: &str, fallback: &str) -> anyhow::Result<Run> {
        let json: Value = serde_json::from_str(text).context("not JSON")?;
        let scenario = json["scenario"]
            .as_str()
            .context("no \"scenario\" field: not a holdfast-bench report")?
            .to_string();
        let label = json["label"]
            .as_str()
            .filter(|l| !l.is_empty())
            .unwrap_or(fallback)
            .to_string();
        Ok(Run {
            label,
            scenario,
            json,
        })
    }

    fn num(&self, pointer: &str) -> Option<f64> {
        self.json.pointer(pointer)?.as_f64()
    }

    fn flag(&self, pointer: &str) -> bool {
        self.json.pointer(pointer).and_then(Value::as_bool) == Some(true)
    }

    fn ok(&self) -> bool {
        // A ceiling has no failure mode of its own.
        self.scenario == "ceiling" || self.flag("/results/ok")
    }
}

/// The medians of one system's runs, scenario by scenario.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The system's name.
    pub label: String,
    /// Reports read for it.
    pub runs: usize,
    /// Of those, reports that say something failed (`results.ok` false).
    pub failed_runs: usize,
    /// Idle: userspace bytes per connection.
    pub idle_user: Option<Stat>,
    /// Idle: kernel bytes per connection (server end).
    pub idle_kernel: Option<Stat>,
    /// Full handshakes: server µs per short connection.
    pub full_us: Option<Stat>,
    /// Full handshakes: of `full_us`, the server's userspace µs (utime) per short
    /// connection; for the ceiling (all userspace) the same as `full_us`.
    pub full_user_us: Option<Stat>,
    /// Full handshakes: measured short connections per second per server core.
    pub full_rate: Option<Stat>,
    /// Full handshakes: server utilization (0..1).
    pub full_busy: Option<Stat>,
    /// Full handshakes: how busy the load generator's CPUs were (0..1).
    pub full_loadgen_busy: Option<Stat>,
    /// Resumed handshakes: server µs per short connection.
    pub resumed_us: Option<Stat>,
    /// Resumed handshakes: share that actually resumed (0..1).
    pub resumed_share: Option<Stat>,
    /// Echo: server µs per frame.
    pub frame_us: Option<Stat>,
    /// Echo: of `frame_us`, the server's userspace µs (utime) per frame; for the ceiling
    /// (all userspace) the same as `frame_us`.
    pub frame_user_us: Option<Stat>,
    /// Echo: frames per second one fully busy server core would do.
    pub frame_capacity: Option<Stat>,
    /// Echo: latency percentiles from schedule, µs.
    pub p50: Option<Stat>,
    /// 99th percentile.
    pub p99: Option<Stat>,
    /// 99.9th percentile.
    pub p999: Option<Stat>,
    /// Storm: seconds until every client was back.
    pub storm_secs: Option<Stat>,
    /// Storm: accept-queue overflows (machine-wide).
    pub storm_overflows: Option<Stat>,
    /// Storm: failed reconnection attempts.
    pub storm_failures: Option<Stat>,
    /// Storm: share of the clients back that resumed their TLS session (0..1).
    pub storm_resumed_share: Option<Stat>,
    /// Storm runs in which not every client came back.
    pub storm_incomplete: usize,
}

fn collect(runs: &[&Run], scenario: &str, pick: impl Fn(&Run) -> Option<f64>) -> Option<Stat> {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| r.scenario == scenario)
        .filter_map(|r| pick(r))
        .collect();
    stat(&v)
}

/// The lowest and highest frame rate among the echo runs. Echo runs at the highest rate
/// give the CPU figures (the most load, so wake-ups are shared by the most frames); runs
/// at the lowest give the latency figures (the load generator is furthest from its own
/// limit). With one rate, both come from the same runs.
pub fn echo_rates<'a>(runs: impl IntoIterator<Item = &'a Run>) -> Option<(f64, f64)> {
    let rates: Vec<f64> = runs
        .into_iter()
        .filter(|r| r.scenario == "echo")
        .filter_map(|r| r.num("/parameters/rate"))
        .collect();
    let s = stat(&rates)?;
    Some((s.min, s.max))
}

fn at_rate(r: &Run, rate: Option<f64>) -> bool {
    rate.is_none_or(|want| r.num("/parameters/rate") == Some(want))
}

/// Summarises the runs of one system; `rates` is [`echo_rates`] over every system's runs.
pub fn summarize(label: &str, runs: &[&Run], rates: Option<(f64, f64)>) -> Summary {
    let (slow, fast) = (rates.map(|r| r.0), rates.map(|r| r.1));
    let echo = |rate: Option<f64>, pointer: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.scenario == "echo" && at_rate(r, rate))
            .filter_map(|r| r.num(pointer))
            .collect();
        stat(&v)
    };
    let hs = |resume: bool, pick: &dyn Fn(&Run) -> Option<f64>| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.scenario == "handshake" && r.flag("/parameters/resume") == resume)
            .filter_map(|r| pick(r))
            .collect();
        stat(&v)
    };
    let ceiling = |pointer: &str| collect(runs, "ceiling", |r| r.num(pointer));
    let mut s = Summary {
        label: label.to_string(),
        runs: runs.len(),
        failed_runs: runs.iter().filter(|r| !r.ok()).count(),
        idle_user: collect(runs, "idle", |r| r.num("/results/userspace_bytes_per_conn")),
        idle_kernel: collect(runs, "idle", |r| r.num("/results/kernel_bytes_per_conn")),
        full_us: hs(false, &|r| r.num("/results/server_cpu_us_per_handshake")),
        full_user_us: hs(false, &|r| r.num("/results/server_cpu/user_us_per_op")),
        full_rate: hs(false, &|r| r.num("/results/handshakes_per_sec_per_core")),
        full_busy: hs(false, &|r| r.num("/results/server_cpu/utilization")),
        full_loadgen_busy: hs(false, &|r| r.num("/results/loadgen_cpus_busy")),
        resumed_us: hs(true, &|r| r.num("/results/server_cpu_us_per_handshake")),
        resumed_share: hs(true, &|r| {
            let n = r.num("/results/handshakes")?;
            (n > 0.0).then(|| r.num("/results/resumed").unwrap_or(0.0) / n)
        }),
        frame_us: echo(fast, "/results/server_cpu_us_per_frame"),
        frame_user_us: echo(fast, "/results/server_cpu/user_us_per_op"),
        frame_capacity: echo(fast, "/results/server_cpu/capacity_per_core"),
        p50: echo(slow, "/results/latency/p50_us"),
        p99: echo(slow, "/results/latency/p99_us"),
        p999: echo(slow, "/results/latency/p999_us"),
        storm_secs: collect(runs, "storm", |r| r.num("/results/recovery_secs")),
        storm_overflows: collect(runs, "storm", |r| r.num("/results/listen_overflows")),
        storm_failures: collect(runs, "storm", |r| {
            let f = r.json.pointer("/results/reconnect_failures")?;
            let g = |k: &str| f[k].as_f64().unwrap_or(0.0);
            Some(g("connect_failed") + g("handshake_failed") + g("echo_failed"))
        }),
        storm_resumed_share: collect(runs, "storm", |r| {
            let back = r.num("/results/back")?;
            (back > 0.0).then(|| r.num("/results/resumed").unwrap_or(0.0) / back)
        }),
        storm_incomplete: runs
            .iter()
            .filter(|r| r.scenario == "storm" && !r.flag("/results/all_back"))
            .count(),
    };
    // The ceiling's figures go in the same columns: its handshake and its record
    // decrypt+encrypt are what a short connection and a relayed frame cost at the least.
    // They are all userspace (rustls on one thread, in memory: no I/O, no other process to
    // wake), so its userspace figures are its CPU figures.
    if runs.iter().any(|r| r.scenario == "ceiling") {
        let full = ceiling("/results/full/server_us_per_handshake");
        let record = ceiling("/results/records/server_us_per_record_pair");
        s.full_us = s.full_us.or(full);
        s.full_user_us = s.full_user_us.or(full);
        s.full_rate = s
            .full_rate
            .or(ceiling("/results/full/server_handshakes_per_sec"));
        s.resumed_us = s
            .resumed_us
            .or(ceiling("/results/resumed/server_us_per_handshake"));
        s.frame_us = s.frame_us.or(record);
        s.frame_user_us = s.frame_user_us.or(record);
        s.frame_capacity = s
            .frame_capacity
            .or(ceiling("/results/records/server_record_pairs_per_sec"));
    }
    s
}

/// Groups runs by label: the reference first, then in order of first appearance, and
/// labels with only ceiling runs last.
pub fn group<'a>(runs: &'a [Run], reference: Option<&str>) -> Vec<(String, Vec<&'a Run>)> {
    let mut groups: Vec<(String, Vec<&Run>)> = Vec::new();
    for r in runs {
        match groups.iter_mut().find(|(l, _)| *l == r.label) {
            Some((_, v)) => v.push(r),
            None => groups.push((r.label.clone(), vec![r])),
        }
    }
    if let Some(at) = reference.and_then(|rf| groups.iter().position(|(l, _)| l == rf)) {
        let g = groups.remove(at);
        groups.insert(0, g);
    }
    // The ceiling is not a system but the floor under them all: its row comes last.
    let (systems, ceilings): (Vec<_>, Vec<_>) = groups
        .into_iter()
        .partition(|(_, rs)| rs.iter().any(|r| r.scenario != "ceiling"));
    systems.into_iter().chain(ceilings).collect()
}

/// A number with as many decimals as its size deserves: 3 significant digits at least
/// below 100, none above.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A cell: the median with its unit, and the spread when the runs differ.
pub fn cell(s: Option<Stat>, unit: &str) -> String {
    let Some(s) = s else {
        return "–".into();
    };
    let mut out = format!("{}{unit}", num(s.median));
    if s.n > 1 && s.min != s.max {
        let _ = write!(out, " ({}–{})", num(s.min), num(s.max));
    }
    out
}

/// The server's utilisation after a closed-loop rate, and whether the load generator's
/// CPUs were the limit instead (`cpu::CLIENT_BOUND`).
fn pct(server: Option<Stat>, loadgen: Option<Stat>) -> String {
    let mut out = server.map_or(String::new(), |s| {
        format!(", {:.0}% busy", s.median * 100.0)
    });
    if let Some(l) = loadgen.filter(|l| l.median >= crate::cpu::CLIENT_BOUND) {
        let _ = write!(out, ", client-bound ({:.0}%)", l.median * 100.0);
    }
    out
}

/// The first value of `pointer` among the runs of `scenario`, for column headers.
fn first(runs: &[Run], scenario: &str, pointer: &str) -> Option<Value> {
    runs.iter()
        .filter(|r| r.scenario == scenario)
        .find_map(|r| r.json.pointer(pointer).cloned())
}

/// The markdown table: a row per system, a column per figure, each cell the median of the
/// system's runs with min–max beside it.
pub fn table(runs: &[Run], reference: Option<&str>) -> String {
    let groups = group(runs, reference);
    let rates = echo_rates(runs);
    let summaries: Vec<Summary> = groups.iter().map(|(l, r)| summarize(l, r, rates)).collect();
    let idle_conns = first(runs, "idle", "/parameters/steps")
        .and_then(|s| s.as_array().cloned())
        .map(|s| {
            let v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
            format!(" ({})", v.join("→"))
        })
        .unwrap_or_default();
    let (slow, fast) = match rates {
        Some((a, b)) => (format!(" at {a:.0}/s"), format!(" at {b:.0}/s")),
        None => (String::new(), String::new()),
    };
    let size = first(runs, "echo", "/parameters/size")
        .map(|v| format!("{v} B "))
        .unwrap_or_default();
    let storm_n = first(runs, "storm", "/parameters/conns")
        .map(|v| format!(" ({v} clients)"))
        .unwrap_or_default();
    let mut out = String::new();
    let headers = [
        "system".to_string(),
        format!("idle memory/conn{idle_conns}"),
        "kernel/conn".into(),
        "full handshake: server CPU".into(),
        "full handshake: userspace".into(),
        "full handshakes/s per core".into(),
        "resumed handshake: server CPU".into(),
        format!("{size}frame: server CPU{fast}"),
        "frame: userspace".into(),
        "frames/s per core at full load".into(),
        format!("p50{slow}"),
        "p99".into(),
        "p999".into(),
        format!("storm{storm_n}: all back in"),
    ];
    let _ = writeln!(out, "| {} |", headers.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        headers.iter().map(|_| "---|").collect::<String>()
    );
    for s in &summaries {
        let mut name = s.label.clone();
        if s.failed_runs > 0 {
            let _ = write!(name, " ⚠ {} of {} runs had failures", s.failed_runs, s.runs);
        }
        let storm = match s.storm_secs {
            Some(_) => format!(
                "{}{}, {} overflows{}",
                cell(s.storm_secs, " s"),
                s.storm_resumed_share.map_or(String::new(), |r| format!(
                    ", {:.0}% resumed",
                    r.median * 100.0
                )),
                s.storm_overflows
                    .map_or("?".into(), |o| format!("{:.0}", o.median)),
                s.storm_failures
                    .filter(|f| f.max > 0.0)
                    .map_or(String::new(), |f| format!(
                        ", {:.0} failed attempts",
                        f.median
                    ))
            ),
            None if s.storm_incomplete > 0 => "not all back".into(),
            None => "–".into(),
        };
        let row =
            [
                name,
                cell(s.idle_user, " B"),
                cell(s.idle_kernel, " B"),
                cell(s.full_us, " µs"),
                cell(s.full_user_us, " µs"),
                format!(
                    "{}{}",
                    cell(s.full_rate, ""),
                    pct(s.full_busy, s.full_loadgen_busy)
                ),
                format!(
                    "{}{}",
                    cell(s.resumed_us, " µs"),
                    s.resumed_share.filter(|r| r.median < 0.995).map_or(
                        String::new(),
                        |r| format!(" ({:.0}% resumed)", r.median * 100.0)
                    )
                ),
                cell(s.frame_us, " µs"),
                cell(s.frame_user_us, " µs"),
                cell(s.frame_capacity, ""),
                cell(s.p50, " µs"),
                cell(s.p99, " µs"),
                cell(s.p999, " µs"),
                storm,
            ];
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// `a / b` as a ratio, when both exist and `b` is not zero.
pub fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    let (a, b) = (a?.median, b?.median);
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// Lines comparing the reference system with every other: reference ÷ other for each
/// cost both have (below 1: the reference spends less). Against the ceiling, which is all
/// userspace, the reference's userspace CPU alone is compared too, right after each CPU
/// figure: the part of the cost that is the server's own code rather than the kernel's.
pub fn ratios(runs: &[Run], reference: &str) -> String {
    let groups = group(runs, Some(reference));
    let rates = echo_rates(runs);
    let summaries: Vec<Summary> = groups.iter().map(|(l, r)| summarize(l, r, rates)).collect();
    let Some(rf) = summaries.iter().find(|s| s.label == reference) else {
        return format!("(no report is labelled {reference:?})\n");
    };
    let mut out = String::new();
    for other in summaries.iter().filter(|s| s.label != reference) {
        let is_ceiling = runs
            .iter()
            .any(|r| r.label == other.label && r.scenario == "ceiling");
        let mut parts = Vec::new();
        let mut add = |name: &str, r: Option<f64>, budget: Option<f64>| {
            if let Some(r) = r {
                let mut p = format!("{name} {r:.2}×");
                if let Some(b) = budget {
                    let _ = write!(
                        p,
                        " ({} the {b}× budget)",
                        if r <= b { "within" } else { "over" }
                    );
                }
                parts.push(p);
            }
        };
        add(
            "idle memory/conn",
            ratio(rf.idle_user, other.idle_user),
            None,
        );
        add(
            "full handshake CPU",
            ratio(rf.full_us, other.full_us),
            is_ceiling.then_some(1.3),
        );
        if is_ceiling {
            add(
                "userspace alone",
                ratio(rf.full_user_us, other.full_user_us),
                None,
            );
        }
        add(
            "resumed handshake CPU",
            ratio(rf.resumed_us, other.resumed_us),
            None,
        );
        add("CPU per frame", ratio(rf.frame_us, other.frame_us), None);
        if is_ceiling {
            add(
                "userspace alone",
                ratio(rf.frame_user_us, other.frame_user_us),
                None,
            );
        }
        add("p99 latency", ratio(rf.p99, other.p99), None);
        add(
            "storm recovery",
            ratio(rf.storm_secs, other.storm_secs),
            None,
        );
        if !parts.is_empty() {
            let _ = writeln!(
                out,
                "- {} ÷ {}: {}",
                rf.label,
                other.label,
                parts.join(", ")
            );
        }
    }
    out
}

// ---- SVG ------------------------------------------------------------------------------

const COLORS: [&str; 8] = [
    "#1b6ca8", "#d1495b", "#edae49", "#00798c", "#66a182", "#8d6a9f", "#3d405b", "#e07a5f",
];

/// Escapes text for SVG/XML.
pub fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A round step for about `ticks` intervals over `0..=max`: 1, 2 or 5 times a power of 10.
pub fn nice_step(max: f64, ticks: usize) -> f64 {
    if max <= 0.0 || !max.is_finite() || ticks == 0 {
        return 1.0;
    }
    let raw = max / ticks as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Tick values from 0 up to the first multiple of the step at or above `max`.
pub fn ticks(max: f64, n: usize) -> Vec<f64> {
    let step = nice_step(max, n);
    let mut out = vec![0.0];
    let mut v = 0.0;
    while v < max - 1e-9 * step {
        v += step;
        out.push(v);
    }
    out
}

/// Maps `v` from `d0..d1` onto `r0..r1`.
pub fn lin(v: f64, d0: f64, d1: f64, r0: f64, r1: f64) -> f64 {
    if d1 == d0 {
        return r0;
    }
    r0 + (v - d0) / (d1 - d0) * (r1 - r0)
}

/// Maps `v` from `d0..d1` (both positive) onto `r0..r1` on a log scale.
pub fn log_pos(v: f64, d0: f64, d1: f64, r0: f64, r1: f64) -> f64 {
    lin(v.max(d0).log10(), d0.log10(), d1.log10(), r0, r1)
}

/// Median per-connection memory at each step of a system's idle runs: runs are matched by
/// step position, and both the connection count and the slope are medians across runs.
pub fn memory_curve(runs: &[&Run]) -> Vec<(f64, f64)> {
    let per_run: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .filter(|r| r.scenario == "idle")
        .map(|r| {
            let steps = r.json.pointer("/results/steps").and_then(Value::as_array);
            let pts: Vec<(f64, f64)> = steps
                .into_iter()
                .flatten()
                .filter_map(|s| Some((s["conns_open"].as_f64()?, s["gateway_pss_bytes"].as_f64()?)))
                .collect();
            incremental_slopes(&pts)
        })
        .filter(|v| !v.is_empty())
        .collect();
    let len = per_run.iter().map(Vec::len).min().unwrap_or(0);
    (0..len)
        .filter_map(|i| {
            let xs: Vec<f64> = per_run.iter().map(|r| r[i].0).collect();
            let ys: Vec<f64> = per_run.iter().map(|r| r[i].1).collect();
            Some((stat(&xs)?.median, stat(&ys)?.median))
        })
        .collect()
}

/// The chart: memory per connection against connections (left), latency percentiles
/// (right, log scale), one colour per system.
pub fn svg(runs: &[Run], reference: Option<&str>) -> String {
    let groups = group(runs, reference);
    let (w, h) = (1000.0, 440.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(o, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    // Legend: every system with something in either panel, spaced by its name's length.
    let rates = echo_rates(runs);
    let mut x = 60.0;
    for (i, (label, rs)) in groups.iter().enumerate() {
        let s = summarize(label, rs, rates);
        if memory_curve(rs).is_empty() && s.p50.is_none() {
            continue;
        }
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            o,
            r##"<rect x="{x}" y="14" width="12" height="12" fill="{c}"/><text x="{}" y="24">{}</text>"##,
            x + 18.0,
            xml(label)
        );
        x += 40.0 + 7.0 * label.chars().count() as f64;
    }

    // Left panel: bytes per connection against connections.
    let (l, r, t, b) = (70.0, 470.0, 70.0, 390.0);
    let curves: Vec<(usize, Vec<(f64, f64)>)> = groups
        .iter()
        .enumerate()
        .map(|(i, (_, rs))| (i, memory_curve(rs)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let xmax = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let ymax = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let _ = writeln!(
        o,
        r##"<text x="{}" y="52" text-anchor="middle" font-weight="bold">Userspace memory per idle connection (slope from the first step)</text>"##,
        (l + r) / 2.0
    );
    if curves.is_empty() {
        let _ = writeln!(
            o,
            r##"<text x="{}" y="{}" text-anchor="middle">no idle reports</text>"##,
            (l + r) / 2.0,
            (t + b) / 2.0
        );
    } else {
        let xt = ticks(xmax, 5);
        let yt = ticks(ymax, 5);
        let (x1, y1) = (*xt.last().unwrap_or(&1.0), *yt.last().unwrap_or(&1.0));
        axes(&mut o, l, r, t, b);
        for &v in &yt {
            let y = lin(v, 0.0, y1, b, t);
            let _ = writeln!(
                o,
                r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                l - 6.0,
                y + 4.0,
                num(v)
            );
        }
        for &v in &xt {
            let x = lin(v, 0.0, x1, l, r);
            let _ = writeln!(
                o,
                r##"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                b + 16.0,
                num(v)
            );
        }
        let _ = writeln!(
            o,
            r##"<text x="{}" y="{}" text-anchor="middle">connections</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">bytes per connection</text>"##,
            (l + r) / 2.0,
            b + 36.0,
            (t + b) / 2.0,
            (t + b) / 2.0
        );
        for (i, c) in &curves {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<String> = c
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", lin(x, 0.0, x1, l, r), lin(y, 0.0, y1, b, t)))
                .collect();
            let _ = writeln!(
                o,
                r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##,
                pts.join(" ")
            );
            for &(x, y) in c {
                let _ = writeln!(
                    o,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{} connections: {} B</title></circle>"##,
                    lin(x, 0.0, x1, l, r),
                    lin(y, 0.0, y1, b, t),
                    num(x),
                    num(y)
                );
            }
        }
    }

    // Right panel: latency percentiles, grouped bars on a log scale.
    let (l, r, t, b) = (570.0, 970.0, 70.0, 390.0);
    let _ = writeln!(
        o,
        r##"<text x="{}" y="52" text-anchor="middle" font-weight="bold">Echo latency from schedule{} (median of runs)</text>"##,
        (l + r) / 2.0,
        echo_rates(runs).map_or(String::new(), |(a, _)| format!(" at {a:.0}/s"))
    );
    let bars: Vec<(usize, [f64; 3])> = groups
        .iter()
        .enumerate()
        .filter_map(|(i, (label, rs))| {
            let s = summarize(label, rs, rates);
            Some((i, [s.p50?.median, s.p99?.median, s.p999?.median]))
        })
        .collect();
    if bars.is_empty() {
        let _ = writeln!(
            o,
            r##"<text x="{}" y="{}" text-anchor="middle">no echo reports</text>"##,
            (l + r) / 2.0,
            (t + b) / 2.0
        );
    } else {
        let top = bars
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(1.0, f64::max);
        let (d0, d1) = (10.0, 10f64.powf(top.log10().ceil().max(2.0)));
        axes(&mut o, l, r, t, b);
        let mut v = d0;
        while v <= d1 * 1.0001 {
            let y = log_pos(v, d0, d1, b, t);
            let _ = writeln!(
                o,
                r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
                l - 6.0,
                y + 4.0,
            );
            v *= 10.0;
        }
        let _ = writeln!(
            o,
            r##"<text x="{lx}" y="{}" transform="rotate(-90 {lx} {})" text-anchor="middle">µs (log scale)</text>"##,
            (t + b) / 2.0,
            (t + b) / 2.0,
            lx = l - 56.0
        );
        let slot = (r - l) / 3.0;
        let bw = (slot * 0.8 / bars.len() as f64).min(40.0);
        for (k, name) in ["p50", "p99", "p999"].iter().enumerate() {
            let x0 = l + slot * k as f64 + (slot - bw * bars.len() as f64) / 2.0;
            let _ = writeln!(
                o,
                r##"<text x="{:.1}" y="{}" text-anchor="middle">{name}</text>"##,
                l + slot * (k as f64 + 0.5),
                b + 16.0
            );
            for (j, (i, vals)) in bars.iter().enumerate() {
                let y = log_pos(vals[k], d0, d1, b, t);
                let _ = writeln!(
                    o,
                    r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {name}: {} µs</title></rect>"##,
                    x0 + bw * j as f64,
                    bw * 0.9,
                    (b - y).max(0.0),
                    COLORS[i % COLORS.len()],
                    xml(&groups[*i].0),
                    num(vals[k])
                );
            }
        }
    }
    o.push_str("</svg>\n");
    o
}

fn axes(o: &mut String, l: f64, r: f64, t: f64, b: f64) {
    let _ = writeln!(
        o,
        r##"<line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="#333"/><line x1="{l}" y1="{t}" x2="{l}" y2="{b}" stroke="#333"/>"##
    );
}

fn read_runs(files: &[PathBuf]) -> anyhow::Result<Vec<Run>> {
    files
        .iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let stem = Path::new(f)
                .file_stem()
                .map_or("?".into(), |s| s.to_string_lossy().into_owned());
            Run::parse(&text, &stem).with_context(|| format!("{}", f.display()))
        })
        .collect()
}

/// Prints the table (and ratio lines) and writes the files asked for.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let runs = read_runs(&args.files)?;
    ensure!(!runs.is_empty(), "no reports");
    let mut md = table(&runs, args.reference.as_deref());
    md.push_str(
        "\nEach cell: the median of the runs, and (min–max) where they differ. CPU figures are \
         the server's own processes only; a userspace column is the user time (utime) within the \
         CPU column before it, the rest being the kernel's work in the server's context. The \
         ceiling row is rustls alone in memory, all userspace. `client-bound (N%)` after a \
         handshake rate: the load generator's CPUs were N% busy (backends there included), so \
         the client side, not the server, set that rate.\n",
    );
    if let Some(rf) = &args.reference {
        let lines = ratios(&runs, rf);
        if !lines.is_empty() {
            md.push('\n');
            md.push_str(&lines);
        }
    }
    print!("{md}");
    if let Some(p) = &args.md {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.svg {
        std::fs::write(p, svg(&runs, args.reference.as_deref()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(label: &str, v: Value) -> Run {
        Run::parse(&v.to_string(), label).unwrap()
    }

    fn idle(label: &str, steps: &[(u64, u64)], user: f64) -> Run {
        let steps: Vec<Value> = steps
            .iter()
            .map(|&(c, p)| json!({"conns_open": c, "gateway_pss_bytes": p}))
            .collect();
        run(
            label,
            json!({"scenario": "idle", "label": label, "parameters": {"steps": [2000, 6000]},
                   "results": {"ok": true, "steps": steps, "userspace_bytes_per_conn": user,
                               "kernel_bytes_per_conn": 3650.0}}),
        )
    }

    fn echo(label: &str, us: f64, p: [u64; 3]) -> Run {
        echo_at(label, 20000.0, us, p)
    }

    fn echo_at(label: &str, rate: f64, us: f64, p: [u64; 3]) -> Run {
        run(
            label,
            json!({"scenario": "echo", "label": label,
                   "parameters": {"rate": rate, "size": 64},
                   "results": {"ok": true, "server_cpu_us_per_frame": us,
                               "server_cpu": {"capacity_per_core": 1e6 / us},
                               "latency": {"p50_us": p[0], "p99_us": p[1], "p999_us": p[2]}}}),
        )
    }

    /// `r` with `user_us` as its server's userspace µs per operation.
    fn with_user(mut r: Run, user_us: f64) -> Run {
        r.json["results"]["server_cpu"]["user_us_per_op"] = json!(user_us);
        r.json["results"]["server_cpu"]["kernel_us_per_op"] = json!(
            r.num("/results/server_cpu_us_per_frame")
                .or(r.num("/results/server_cpu_us_per_handshake"))
                .unwrap()
                - user_us
        );
        r
    }

    /// The cell under `header` (a header that starts with it) in a table's line `row`.
    fn column<'a>(t: &'a str, row: usize, header: &str) -> &'a str {
        let cells = |l: &'a str| -> Vec<&'a str> {
            l.trim_matches('|').split(" | ").map(str::trim).collect()
        };
        let lines: Vec<&str> = t.lines().collect();
        let at = cells(lines[0])
            .iter()
            .position(|h| h.starts_with(header))
            .unwrap_or_else(|| panic!("no {header:?} column in {t}"));
        cells(lines[row])[at]
    }

    fn hs(label: &str, resume: bool, us: f64) -> Run {
        run(
            label,
            json!({"scenario": "handshake", "label": label, "parameters": {"resume": resume},
                   "results": {"ok": true, "handshakes": 100, "resumed": if resume {100} else {0},
                               "server_cpu_us_per_handshake": us,
                               "handshakes_per_sec_per_core": 1e6 / us / 2.0,
                               "server_cpu": {"utilization": 0.5}}}),
        )
    }

    #[test]
    fn medians_and_spread() {
        assert_eq!(stat(&[]), None);
        assert_eq!(stat(&[f64::NAN]), None);
        let s = stat(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = stat(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5, "even count: mean of the middle two");
        let s = stat(&[5.0, f64::INFINITY, 7.0]).unwrap();
        assert_eq!((s.median, s.n), (6.0, 2), "non-finite values are dropped");
    }

    #[test]
    fn slopes_from_the_first_step() {
        // Fixed 20 MB, then 4 000 B per connection, then 3 000 B per connection.
        let steps = [(2000.0, 20e6), (4000.0, 28e6), (6000.0, 34e6)];
        assert_eq!(
            incremental_slopes(&steps),
            vec![(4000.0, 4000.0), (6000.0, 3500.0)]
        );
        assert!(incremental_slopes(&steps[..1]).is_empty());
        assert!(incremental_slopes(&[]).is_empty());
        // A step that did not grow has no slope.
        assert!(incremental_slopes(&[(10.0, 1.0), (10.0, 5.0)]).is_empty());
    }

    #[test]
    fn memory_curve_is_the_median_of_runs() {
        let a = idle("x", &[(2000, 20_000_000), (4000, 28_000_000)], 4000.0);
        let b = idle("x", &[(2000, 20_000_000), (4002, 30_020_000)], 5000.0);
        let c = idle("x", &[(2000, 20_000_000), (4004, 26_012_000)], 3000.0);
        let curve = memory_curve(&[&a, &b, &c]);
        assert_eq!(curve, vec![(4002.0, 4000.0)]);
    }

    #[test]
    fn numbers_and_cells() {
        assert_eq!(num(4123.4), "4123");
        assert_eq!(num(98.25), "98.2");
        assert_eq!(num(3.14259), "3.14");
        assert_eq!(num(0.61234), "0.612");
        assert_eq!(num(0.0), "0");
        let one = stat(&[98.0]);
        assert_eq!(cell(one, " µs"), "98.0 µs");
        let three = stat(&[97.0, 98.0, 101.5]);
        assert_eq!(cell(three, " µs"), "98.0 µs (97.0–102)");
        let same = stat(&[5.0, 5.0]);
        assert_eq!(cell(same, " B"), "5.00 B");
        assert_eq!(cell(None, " B"), "–");
    }

    #[test]
    fn summary_groups_scenarios_and_variants() {
        let runs = [
            idle("gw", &[(2000, 1), (6000, 2)], 4000.0),
            idle("gw", &[(2000, 1), (6000, 2)], 4200.0),
            hs("gw", false, 100.0),
            hs("gw", false, 110.0),
            hs("gw", true, 60.0),
            echo("gw", 3.0, [50, 120, 400]),
        ];
        let refs: Vec<&Run> = runs.iter().collect();
        let s = summarize("gw", &refs, echo_rates(&runs));
        assert_eq!(s.runs, 6);
        assert_eq!(s.failed_runs, 0);
        assert_eq!(s.idle_user.unwrap().median, 4100.0);
        assert_eq!(s.full_us.unwrap().median, 105.0);
        assert_eq!(s.resumed_us.unwrap().median, 60.0);
        assert_eq!(s.resumed_share.unwrap().median, 1.0);
        assert_eq!(s.full_busy.unwrap().median, 0.5);
        assert_eq!(s.frame_us.unwrap().median, 3.0);
        assert!((s.frame_capacity.unwrap().median - 333_333.33).abs() < 0.01);
        assert_eq!(s.p999.unwrap().median, 400.0);
        assert_eq!(s.storm_secs, None);
        let storm = |secs: f64, resumed: u64| {
            run(
                "gw",
                json!({"scenario": "storm", "label": "gw",
                       "results": {"ok": true, "all_back": true, "recovery_secs": secs,
                                   "back": 500, "resumed": resumed, "listen_overflows": 3,
                                   "reconnect_failures": {"connect_failed": 1}}}),
            )
        };
        let runs = [storm(0.3, 50), storm(0.5, 100), storm(0.4, 500)];
        let refs: Vec<&Run> = runs.iter().collect();
        let s = summarize("gw", &refs, None);
        assert_eq!(s.storm_secs.unwrap().median, 0.4);
        assert_eq!(s.storm_resumed_share.unwrap().median, 0.2);
        assert_eq!(s.storm_failures.unwrap().median, 1.0);
        let t = table(&runs, None);
        assert!(
            t.contains("0.400 s (0.300–0.500), 20% resumed, 3 overflows, 1 failed attempts"),
            "{t}"
        );
    }

    #[test]
    fn labels_fall_back_to_file_names_and_reference_comes_first() {
        let a = Run::parse(r#"{"scenario":"echo"}"#, "nginx-echo-1").unwrap();
        assert_eq!(a.label, "nginx-echo-1");
        assert!(Run::parse(r#"{"no":"scenario"}"#, "x").is_err());
        assert!(Run::parse("not json", "x").is_err());
        let runs = vec![
            echo("nginx", 14.0, [1, 2, 3]),
            echo("holdfast", 3.5, [1, 2, 3]),
        ];
        let g = group(&runs, Some("holdfast"));
        assert_eq!(g[0].0, "holdfast");
        assert_eq!(g[1].0, "nginx");
        assert_eq!(group(&runs, None)[0].0, "nginx");
    }

    #[test]
    fn a_closed_loop_rate_says_when_the_load_generator_was_the_limit() {
        let with_loadgen = |mut r: Run, busy: f64| {
            r.json["results"]["loadgen_cpus_busy"] = json!(busy);
            r
        };
        let runs = [
            with_loadgen(hs("bound", false, 100.0), 0.97),
            with_loadgen(hs("bound", false, 100.0), 0.95),
            with_loadgen(hs("free", false, 100.0), 0.6),
            hs("unknown", false, 100.0),
        ];
        let t = table(&runs, None);
        let row = |label: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("| {label} |")))
                .unwrap_or_else(|| panic!("no row {label} in {t}"))
                .to_string()
        };
        assert!(
            row("bound").contains("5000, 50% busy, client-bound (96%)"),
            "{t}"
        );
        assert!(row("free").contains("5000, 50% busy |"), "{t}");
        assert!(row("unknown").contains("5000, 50% busy |"), "{t}");
    }

    #[test]
    fn table_has_a_row_per_system() {
        let runs = vec![
            echo("nginx", 14.0, [80, 300, 900]),
            with_user(echo("holdfast", 3.5, [60, 150, 500]), 0.5),
            with_user(echo("holdfast", 4.5, [70, 160, 600]), 0.7),
            with_user(hs("holdfast", false, 117.0), 95.0),
            run(
                "ceiling",
                json!({"scenario": "ceiling", "label": "rustls alone",
                       "results": {"full": {"server_us_per_handshake": 90.0,
                                            "server_handshakes_per_sec": 11111.0},
                                   "resumed": {"server_us_per_handshake": 40.0},
                                   "records": {"server_us_per_record_pair": 0.8,
                                               "server_record_pairs_per_sec": 1.25e6}}}),
            ),
        ];
        let t = table(&runs, Some("holdfast"));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].contains("p50 at 20000/s"), "{}", lines[0]);
        assert!(lines[0].contains("64 B frame"), "{}", lines[0]);
        assert!(lines[2].starts_with("| holdfast | – |"), "{}", lines[2]);
        assert!(lines[2].contains("4.00 µs (3.50–4.50)"), "{}", lines[2]);
        assert!(lines[3].starts_with("| nginx |"));
        assert!(
            lines[4].contains("90.0 µs") && lines[4].contains("0.800 µs"),
            "{}",
            lines[4]
        );
        // The userspace columns come right after the CPU figures they split, the existing
        // headers unchanged.
        let headers: Vec<&str> = lines[0]
            .trim_matches('|')
            .split(" | ")
            .map(str::trim)
            .collect();
        let at = |h: &str| headers.iter().position(|x| x.starts_with(h)).unwrap();
        assert_eq!(
            at("full handshake: userspace"),
            at("full handshake: server CPU") + 1
        );
        assert_eq!(
            at("frame: userspace"),
            at("64 B frame: server CPU at 20000/s") + 1
        );
        assert_eq!(headers.len(), 14);
        assert!(lines[1].matches("---|").count() == 14, "{}", lines[1]);
        assert_eq!(column(&t, 2, "full handshake: server CPU"), "117 µs");
        assert_eq!(column(&t, 2, "full handshake: userspace"), "95.0 µs");
        assert_eq!(column(&t, 2, "64 B frame"), "4.00 µs (3.50–4.50)");
        assert_eq!(column(&t, 2, "frame: userspace"), "0.600 µs (0.500–0.700)");
        // A report from before the split leaves the userspace cells empty.
        assert_eq!(column(&t, 3, "64 B frame"), "14.0 µs");
        assert_eq!(column(&t, 3, "frame: userspace"), "–");
        // The ceiling is all userspace: the same figures in both.
        assert_eq!(column(&t, 4, "full handshake: userspace"), "90.0 µs");
        assert_eq!(column(&t, 4, "frame: userspace"), "0.800 µs");
        assert_eq!(column(&t, 4, "64 B frame"), "0.800 µs");
        // A failed run is flagged on its system's row.
        let mut bad = echo("x", 1.0, [1, 1, 1]);
        bad.json["results"]["ok"] = json!(false);
        assert!(table(&[bad], None).contains("⚠ 1 of 1 runs had failures"));
    }

    #[test]
    fn ratio_lines() {
        let runs = vec![
            with_user(hs("holdfast", false, 117.0), 72.0),
            with_user(echo("holdfast", 4.0, [60, 150, 500]), 1.0),
            with_user(hs("nginx", false, 430.0), 300.0),
            echo("nginx", 16.0, [80, 300, 900]),
            run(
                "c",
                json!({"scenario": "ceiling", "label": "rustls alone",
                       "results": {"full": {"server_us_per_handshake": 90.0},
                                   "records": {"server_us_per_record_pair": 0.8}}}),
            ),
        ];
        let r = ratios(&runs, "holdfast");
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines.len(), 2, "{r}");
        assert!(lines[0].starts_with("- holdfast ÷ nginx: "), "{r}");
        assert!(lines[0].contains("full handshake CPU 0.27×"), "{r}");
        assert!(lines[0].contains("CPU per frame 0.25×"), "{r}");
        assert!(lines[0].contains("p99 latency 0.50×"), "{r}");
        assert!(
            lines[1].contains("full handshake CPU 1.30× (within the 1.3× budget)"),
            "{r}"
        );
        // Against the ceiling (all userspace) the userspace CPU alone follows each CPU
        // ratio: 72 / 90 and 1.0 / 0.8; against another system it does not.
        assert!(
            lines[1].starts_with(
                "- holdfast ÷ rustls alone: full handshake CPU 1.30× (within the 1.3× budget), \
                 userspace alone 0.80×, CPU per frame 5.00×, userspace alone 1.25×"
            ),
            "{r}"
        );
        assert!(!lines[0].contains("userspace"), "{r}");
        // Without the split in the reference's reports there is no userspace ratio.
        let old = [hs("holdfast", false, 117.0), runs[4].clone()];
        let r = ratios(&old, "holdfast");
        assert!(
            r.contains("full handshake CPU 1.30×") && !r.contains("userspace"),
            "{r}"
        );
        assert!(ratios(&runs, "nobody").contains("no report"));
        assert_eq!(ratio(stat(&[1.0]), stat(&[0.0])), None);
        assert_eq!(ratio(stat(&[1.0]), None), None);
    }

    #[test]
    fn scales() {
        assert_eq!(nice_step(10_000.0, 5), 2000.0);
        assert_eq!(nice_step(7.3, 5), 2.0);
        assert_eq!(nice_step(0.9, 3), 0.5);
        assert_eq!(nice_step(0.0, 5), 1.0);
        assert_eq!(ticks(6000.0, 5), vec![0.0, 2000.0, 4000.0, 6000.0]);
        assert_eq!(ticks(6100.0, 5), vec![0.0, 2000.0, 4000.0, 6000.0, 8000.0]);
        assert_eq!(lin(5.0, 0.0, 10.0, 100.0, 200.0), 150.0);
        assert_eq!(lin(5.0, 0.0, 10.0, 200.0, 100.0), 150.0);
        assert_eq!(lin(1.0, 2.0, 2.0, 7.0, 9.0), 7.0);
        assert_eq!(log_pos(100.0, 10.0, 1000.0, 0.0, 200.0), 100.0);
        assert_eq!(
            log_pos(1.0, 10.0, 1000.0, 0.0, 200.0),
            0.0,
            "clamped at the bottom"
        );
    }

    #[test]
    fn svg_draws_every_system() {
        let runs = vec![
            idle(
                "holdfast",
                &[(2000, 20_000_000), (4000, 28_000_000), (6000, 36_000_000)],
                4000.0,
            ),
            idle("a<b", &[(2000, 20_000_000), (6000, 92_000_000)], 18000.0),
            echo("holdfast", 3.5, [60, 150, 500]),
            echo("a<b", 14.0, [80, 300, 900]),
        ];
        let s = svg(&runs, Some("holdfast"));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(s.matches("<circle").count(), 3);
        assert_eq!(
            s.matches("<rect x=").count(),
            2 + 6,
            "legend + 3 bars per system"
        );
        assert!(s.contains("a&lt;b") && !s.contains("a<b"));
        // A system with nothing to draw gets no legend entry.
        let only_hs = svg(&[hs("x", false, 1.0)], None);
        assert!(!only_hs.contains(">x</text>"));
        let empty = only_hs;
        assert!(empty.contains("no idle reports") && empty.contains("no echo reports"));
        assert_eq!(xml("<&>\"'"), "&lt;&amp;&gt;&quot;&apos;");
    }

    #[test]
    fn cpu_from_the_fastest_echo_and_latency_from_the_slowest() {
        let runs = [
            echo_at("gw", 5000.0, 40.0, [200, 900, 3000]),
            echo_at("gw", 25000.0, 12.0, [9000, 20000, 30000]),
            echo_at("gw", 25000.0, 14.0, [9000, 20000, 30000]),
        ];
        assert_eq!(echo_rates(&runs), Some((5000.0, 25000.0)));
        let refs: Vec<&Run> = runs.iter().collect();
        let s = summarize("gw", &refs, echo_rates(&runs));
        assert_eq!(s.frame_us.unwrap().median, 13.0);
        assert_eq!(s.frame_us.unwrap().n, 2);
        assert_eq!(s.p99.unwrap().median, 900.0);
        assert_eq!(s.p99.unwrap().n, 1);
        let t = table(&runs, None);
        assert!(
            t.contains("frame: server CPU at 25000/s") && t.contains("p50 at 5000/s"),
            "{t}"
        );
        assert_eq!(echo_rates(&[hs("x", false, 1.0)]), None);
    }
}
