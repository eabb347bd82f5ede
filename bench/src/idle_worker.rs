//! One child process of an idle run: opens its share of the connections when told,
//! holds them idle, checks that each still echoes, and closes them, reporting over the
//! line protocol of `proto` on stdout.
//!
//! Children exist because each process is held to the machine's open-file limit; a child
//! is the parent's binary re-executed with a hidden subcommand. A child never decides
//! when to measure: it only says when its connections are up. Every wait is bounded, and
//! the end of stdin (the parent died or gave up) closes everything and exits, so no
//! child outlives its run.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::client::{self, Client, Conn, Failure, Inbound, Stage};
use crate::plan;
use crate::proto::{Command, Counts, Report};
use crate::report::Failures;

/// Handshakes a child keeps in flight at most: when the gateway slows down, the opening
/// timetable slips instead of piling up attempts that would all run into the timeout.
const MAX_INFLIGHT: usize = 1024;
/// Final echoes a child keeps in flight at most, so the check is a ramp, not one burst.
const MAX_ECHOES: usize = 1024;
/// Failure notes a child sends at most; the counts carry the rest.
const MAX_NOTES: u64 = 5;
/// How often a child reports progress while opening.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Arguments of the hidden `idle-worker` subcommand; the parent fills them in.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Gateway address.
    #[arg(long)]
    pub target: String,
    /// CA certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// TLS server name.
    #[arg(long)]
    pub server_name: String,
    /// Payload bytes of each DATA frame.
    #[arg(long)]
    pub frame_size: usize,
    /// Connections this child opens per second.
    #[arg(long)]
    pub rate: f64,
    /// Source addresses (see `idle --sources`); none: let the kernel choose.
    #[arg(long)]
    pub sources: Option<String>,
    /// This child's index, 0-based.
    #[arg(long)]
    pub child: u64,
    /// Number of children.
    #[arg(long)]
    pub procs: u64,
    /// Seconds each connection may take to connect, handshake and echo, and to echo at
    /// the end.
    #[arg(long)]
    pub timeout: f64,
}

/// The phase every held connection follows, broadcast by the child's main task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Hold,
    Echo,
    Close,
}

/// Counters shared by a child's connection tasks.
#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    inflight: AtomicU64,
    connect_failed: AtomicU64,
    handshake_failed: AtomicU64,
    first_echo_failed: AtomicU64,
    timed_out: AtomicU64,
    dropped: AtomicU64,
    live: AtomicU64,
    echo_ok: AtomicU64,
    echo_failed: AtomicU64,
    notes: AtomicU64,
}

impl Stats {
    fn counts(&self) -> Counts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            ok: get(&self.ok),
            inflight: get(&self.inflight),
            failures: Failures {
                connect_failed: get(&self.connect_failed),
                handshake_failed: get(&self.handshake_failed),
                first_echo_failed: get(&self.first_echo_failed),
                timed_out: get(&self.timed_out),
                dropped_while_idle: get(&self.dropped),
            },
        }
    }

    fn failed(&self, f: &Failure) {
        let counter = match f.stage {
            Stage::Connect => &self.connect_failed,
            Stage::Handshake => &self.handshake_failed,
            Stage::Echo => &self.first_echo_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if f.timed_out {
            self.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        self.note(|| f.to_string());
    }

    fn note(&self, text: impl FnOnce() -> String) {
        if self.notes.fetch_add(1, Ordering::Relaxed) < MAX_NOTES {
            say(&Report::Note(text()));
        }
    }
}

/// Writes one report line to stdout. The parent reads these lines; nothing else in a
/// child may write to stdout.
fn say(report: &Report) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // The parent reads until our stdout closes; if it is gone, stdin ends too and the
    // main loop exits, so a failed write needs no handling of its own.
    let _ = writeln!(out, "{}", report.to_line());
    let _ = out.flush();
}

/// What a connection task needs besides its connection.
struct Shared {
    client: Client,
    stats: Stats,
    phase: watch::Sender<Phase>,
    echoes: Semaphore,
    frame_size: usize,
    timeout: Duration,
}

/// Runs a child until its parent says `close` or its stdin ends.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    let rt = crate::scenario::runtime()?;
    rt.block_on(serve(args))
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let config = client::client_config(&args.ca)?;
    let target = client::resolve(&args.target)?;
    let sources: Vec<IpAddr> = match &args.sources {
        Some(spec) => plan::parse_sources(spec).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let shared = Arc::new(Shared {
        client: Client::new(config, target, &args.server_name)?,
        stats: Stats::default(),
        phase: watch::Sender::new(Phase::Hold),
        echoes: Semaphore::new(MAX_ECHOES),
        frame_size: args.frame_size,
        timeout: Duration::from_secs_f64(args.timeout),
    });
    let mut attempted: u64 = 0;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = lines.next_line().await.context("reading commands")?;
        let command = match line {
            Some(line) => Command::parse(&line).map_err(anyhow::Error::msg)?,
            None => Command::Close,
        };
        match command {
            Command::Open(total) => {
                let want = total.saturating_sub(attempted);
                open(&shared, &args, &sources, attempted, want).await;
                attempted += want;
                say(&Report::Opened(shared.stats.counts()));
            }
            Command::Echo => {
                let (ok, failed) = echo_all(&shared).await;
                say(&Report::Echoed { ok, failed });
            }
            Command::Close => {
                close_all(&shared).await;
                say(&Report::Closed);
                return Ok(());
            }
        }
    }
}

/// Opens `want` more connections on this child's timetable and returns when every
/// attempt has concluded (each is bounded by the per-connection timeout).
async fn open(shared: &Arc<Shared>, args: &WorkerArgs, sources: &[IpAddr], first: u64, want: u64) {
    let stats = &shared.stats;
    let target = stats.counts().concluded() + want;
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let start = Instant::now();
    let mut next_progress = start + PROGRESS_EVERY;
    for k in 0..want {
        let due = start + plan::due(k, args.rate);
        // Progress is reported while waiting for the timetable or a free slot, so the
        // parent hears from us even when the gateway stalls.
        let permit = loop {
            let now = Instant::now();
            if now >= next_progress {
                say(&Report::Progress(stats.counts()));
                next_progress = now + PROGRESS_EVERY;
            }
            if now < due {
                tokio::time::sleep_until(due.min(next_progress)).await;
                continue;
            }
            tokio::select! {
                p = slots.clone().acquire_owned() => break p,
                _ = tokio::time::sleep_until(next_progress) => {}
            }
        };
        let permit = permit.expect("the semaphore is never closed");
        let n = first + k;
        let source = (!sources.is_empty())
            .then(|| sources[plan::source_index(sources.len(), args.child, args.procs, n)]);
        stats.inflight.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            let conn = attempt(&shared, source, n).await;
            shared.stats.inflight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            match conn {
                Ok(conn) => hold(&shared, conn, n).await,
                Err(f) => shared.stats.failed(&f),
            }
        });
    }
    // Polled finely so a step's open time is not rounded up to the progress interval.
    while stats.counts().concluded() < target {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if Instant::now() >= next_progress {
            say(&Report::Progress(stats.counts()));
            next_progress = Instant::now() + PROGRESS_EVERY;
        }
    }
}

/// Connects, handshakes and echoes one frame, all within the per-connection timeout.
async fn attempt(shared: &Shared, source: Option<IpAddr>, n: u64) -> Result<Conn, Failure> {
    let deadline = Instant::now() + shared.timeout;
    let mut conn = shared.client.connect(source, deadline).await?;
    conn.echo(&client::payload(shared.frame_size, n, 0), deadline)
        .await?;
    // Counted here, before the task can see a phase change, so `live` never misses a
    // connection that the echo check must wait for.
    shared.stats.live.fetch_add(1, Ordering::Relaxed);
    shared.stats.ok.fetch_add(1, Ordering::Relaxed);
    Ok(conn)
}

/// Keeps one connection open and idle until the phase says otherwise: answers
/// heartbeats, notices a close by the gateway, echoes once when told.
async fn hold(shared: &Shared, mut conn: Conn, n: u64) {
    let stats = &shared.stats;
    let mut phase = shared.phase.subscribe();
    let mut echoed = false;
    loop {
        let current = *phase.borrow_and_update();
        match current {
            Phase::Echo if !echoed => {
                echoed = true;
                let _permit = shared.echoes.acquire().await;
                let deadline = Instant::now() + shared.timeout;
                match conn
                    .echo(&client::payload(shared.frame_size, n, 1), deadline)
                    .await
                {
                    Ok(()) => {
                        stats.echo_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(f) => {
                        stats.echo_failed.fetch_add(1, Ordering::Relaxed);
                        stats.note(|| format!("final {f}"));
                        break;
                    }
                }
                continue;
            }
            Phase::Close => {
                conn.close(Instant::now() + Duration::from_secs(2)).await;
                break;
            }
            Phase::Hold | Phase::Echo => {}
        }
        tokio::select! {
            changed = phase.changed() => if changed.is_err() { break },
            read = conn.fill() => {
                let ended = match read {
                    Ok(0) => Some("end of stream".to_string()),
                    Ok(_) => match conn.take().await {
                        Ok(None) => None,
                        Ok(Some(Inbound::Ended(why))) => Some(why),
                        Ok(Some(Inbound::Data(p))) => Some(format!("unexpected DATA of {} bytes", p.len())),
                        Err(e) => Some(e.to_string()),
                    },
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = ended {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    if !echoed {
                        // It can no longer pass the final check; counting it now lets
                        // the check finish without waiting for it.
                        stats.echo_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.note(|| format!("dropped while idle: {why}"));
                    break;
                }
            }
        }
    }
    stats.live.fetch_sub(1, Ordering::Relaxed);
}

/// Tells every held connection to echo once and waits until each has answered or gone.
/// Returns (ok, failed) where failed counts every connection opened successfully that
/// did not echo, dropped ones included.
async fn echo_all(shared: &Shared) -> (u64, u64) {
    let stats = &shared.stats;
    let opened = stats.ok.load(Ordering::Relaxed);
    shared.phase.send_replace(Phase::Echo);
    // Each echo is bounded by the timeout once it holds a permit; the permits let
    // MAX_ECHOES run at a time, so the whole check is bounded too.
    let rounds = opened.div_ceil(MAX_ECHOES as u64) + 1;
    let deadline = Instant::now() + shared.timeout * rounds as u32 + Duration::from_secs(5);
    loop {
        let done =
            stats.echo_ok.load(Ordering::Relaxed) + stats.echo_failed.load(Ordering::Relaxed);
        if done >= opened || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = stats.echo_ok.load(Ordering::Relaxed);
    (ok, opened - ok.min(opened))
}

/// Closes every held connection (TLS close_notify) and waits, bounded, for them to go.
async fn close_all(shared: &Shared) {
    shared.phase.send_replace(Phase::Close);
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.stats.live.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
