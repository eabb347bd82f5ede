//! `holdfast-bench idle`: opens many TLS connections to a gateway, holds them idle, and
//! measures what each one costs the gateway's userspace (Pss) and the kernel, as slopes
//! between connection counts; at the end it checks that every connection still echoes.
//!
//! The connections are held by child processes (see `idle_worker`), because each process
//! may hold only so many descriptors. This parent owns the timetable of the run: it tells
//! every child how many connections to hold, waits until all say they are up, lets the
//! gateway settle, samples /proc, and moves on. The only connections it opens itself are
//! the few probes of `--then-run` (see `probe`). Every wait has a deadline and the
//! children die with the parent, so a run always ends.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

use crate::client;
use crate::plan;
use crate::probe;
use crate::procfs;
use crate::proto::{Command, Counts, Report};
use crate::report::{
    self, IdleMethod, IdleParameters, IdleReport, IdleResults, StepSample, ThenRun,
};
use crate::scenario;

/// Failure notes the parent prints at most over a run; the counts carry the rest.
const MAX_NOTES: usize = 10;
/// Descriptors a child needs besides its connections (runtime, pipes, the CA file).
const FD_HEADROOM: u64 = 64;

/// Arguments of `holdfast-bench idle`.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Gateway address to connect to.
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: String,
    /// CA certificate (PEM) that signed the gateway's certificate.
    #[arg(long, value_name = "PEM")]
    pub ca: PathBuf,
    /// Connections to hold at the last step.
    #[arg(long, value_name = "N")]
    pub conns: u64,
    /// Process id(s) of the gateway whose memory is measured (on this machine), comma-
    /// separated; each one's descendants are measured too (an nginx master covers its
    /// workers), and Pss is summed over them all.
    #[arg(
        long,
        value_name = "PID[,PID...]",
        value_delimiter = ',',
        required = true
    )]
    pub gateway_pid: Vec<u32>,
    /// Where to write the JSON report.
    #[arg(long, value_name = "FILE")]
    pub json: PathBuf,
    /// Connections opened per second, all child processes together.
    #[arg(long, value_name = "CONN_PER_SEC", default_value_t = 2000.0)]
    pub rate: f64,
    /// Connection counts to measure at [default: N/3 and N]; N is appended when the last
    /// count is below it.
    #[arg(long, value_name = "N1,N2,...", value_delimiter = ',')]
    pub steps: Vec<u64>,
    /// Source addresses to bind, round-robin: `A-B` ranges and single addresses,
    /// comma-separated, or `none` to let the kernel choose [default: 127.0.0.2-127.0.0.254
    /// when the target is on loopback, else none].
    #[arg(long, value_name = "RANGE")]
    pub sources: Option<String>,
    /// Child processes holding the connections [default: N/9000 rounded up].
    #[arg(long, value_name = "P")]
    pub procs: Option<u64>,
    /// Payload bytes of each DATA frame.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub frame_size: usize,
    /// Seconds to wait after a step's connections are up before sampling memory.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    pub settle: f64,
    /// TLS server name to send and verify.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub server_name: String,
    /// Seconds each connection may take to connect, handshake and echo its first frame;
    /// also the bound on each final echo.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    /// Name of the system measured, stored in the report (`report` groups runs by it).
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
    /// A shell command to run once every connection is up and measured, before the final
    /// echo check: a live upgrade, a reload. Its duration and exit code go in the report;
    /// a non-zero exit fails the run. Meanwhile `--probes` connections of this process
    /// echo back to back, and the longest round trip they saw is reported as the longest
    /// pause; the final echo check then shows that every held connection survived it.
    #[arg(long, value_name = "CMD")]
    pub then_run: Option<String>,
    /// Probe connections that echo while `--then-run` runs.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub probes: u64,
}

/// Something a child said, or its going away.
enum Event {
    Report(Report),
    Gone(String),
}

/// The child processes and their pipes.
struct Children {
    procs: Vec<Child>,
    stdins: Vec<ChildStdin>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    latest: Vec<Counts>,
    notes: usize,
}

impl Children {
    fn spawn(args: &IdleArgs, procs: u64, sources: Option<&str>) -> anyhow::Result<Children> {
        let exe = std::env::current_exe().context("finding this program to start children")?;
        let (tx, events) = mpsc::unbounded_channel();
        let mut children = Children {
            procs: Vec::new(),
            stdins: Vec::new(),
            events,
            latest: vec![Counts::default(); procs as usize],
            notes: 0,
        };
        for i in 0..procs {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("idle-worker")
                .arg("--target")
                .arg(&args.target)
                .arg("--ca")
                .arg(&args.ca)
                .arg("--server-name")
                .arg(&args.server_name)
                .arg("--frame-size")
                .arg(args.frame_size.to_string())
                .arg("--rate")
                .arg((args.rate / procs as f64).to_string())
                .arg("--child")
                .arg(i.to_string())
                .arg("--procs")
                .arg(procs.to_string())
                .arg("--timeout")
                .arg(args.timeout.to_string());
            if let Some(s) = sources {
                cmd.arg("--sources").arg(s);
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting child process {i}"))?;
            let stdin = child.stdin.take().expect("stdin is piped");
            let stdout = child.stdout.take().expect("stdout is piped");
            let tx = tx.clone();
            let idx = i as usize;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    let event = match lines.next_line().await {
                        Ok(Some(line)) => match Report::parse(&line) {
                            Ok(r) => Event::Report(r),
                            Err(e) => Event::Gone(format!("said something unreadable: {e}")),
                        },
                        Ok(None) => Event::Gone("exited".into()),
                        Err(e) => Event::Gone(format!("stdout: {e}")),
                    };
                    let gone = matches!(event, Event::Gone(_));
                    if tx.send((idx, event)).is_err() || gone {
                        return;
                    }
                }
            });
            children.procs.push(child);
            children.stdins.push(stdin);
        }
        Ok(children)
    }

    async fn send_all(&mut self, cmd: impl Fn(usize) -> Command) -> anyhow::Result<()> {
        for (i, stdin) in self.stdins.iter_mut().enumerate() {
            let line = format!("{}\n", cmd(i).to_line());
            stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("telling child {i} to {}", cmd(i).to_line()))?;
            stdin.flush().await?;
        }
        Ok(())
    }

    fn total(&self) -> Counts {
        let mut t = Counts::default();
        for c in &self.latest {
            t.add(c);
        }
        t
    }

    /// Waits until every child has sent a report that `want` accepts, showing progress and
    /// failure notes meanwhile.
    async fn collect(
        &mut self,
        what: &str,
        deadline: Instant,
        want: impl Fn(&Report) -> bool,
        progress: &mut Progress,
    ) -> anyhow::Result<Vec<Report>> {
        let mut got: Vec<Option<Report>> = vec![None; self.procs.len()];
        while got.iter().any(Option::is_none) {
            let (i, event) = match timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("every child process is gone"),
                Err(_) => {
                    let missing = got.iter().filter(|g| g.is_none()).count();
                    bail!("timed out waiting for {missing} child process(es) to report {what}");
                }
            };
            match event {
                Event::Report(Report::Progress(c)) => {
                    self.latest[i] = c;
                    progress.show(&self.total());
                }
                // Children fail the same way: print each distinct reason once.
                Event::Report(Report::Note(text)) => {
                    if self.notes < MAX_NOTES && crate::why::first_of_its_kind(&text) {
                        self.notes += 1;
                        progress.clear();
                        eprintln!("holdfast-bench: child {i}: {text}");
                    }
                }
                Event::Report(r) if want(&r) => {
                    if let Report::Opened(c) = &r {
                        self.latest[i] = c.clone();
                    }
                    got[i] = Some(r);
                }
                Event::Report(r) => {
                    bail!(
                        "child process {i} said {:?} while {what} was awaited",
                        r.to_line()
                    )
                }
                Event::Gone(why) => bail!("child process {i} {why} while {what} was awaited"),
            }
        }
        progress.clear();
        Ok(got.into_iter().flatten().collect())
    }

    /// Asks the children to close their connections and exit, waiting at most `grace`;
    /// any child still there afterwards is killed.
    async fn shut_down(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut quiet = Progress::new(false, 0, 0);
        if self.send_all(|_| Command::Close).await.is_ok() {
            let _ = self
                .collect("closed", deadline, |r| *r == Report::Closed, &mut quiet)
                .await;
        }
        self.stdins.clear();
        for child in &mut self.procs {
            if timeout_at(deadline, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

/// The live progress line, drawn on stderr only when stderr is a terminal.
struct Progress {
    tty: bool,
    shown: bool,
    start: Instant,
    base_ok: u64,
    target: u64,
    last: Option<Instant>,
}

impl Progress {
    fn new(tty: bool, base_ok: u64, target: u64) -> Progress {
        Progress {
            tty,
            shown: false,
            start: Instant::now(),
            base_ok,
            target,
            last: None,
        }
    }

    fn show(&mut self, c: &Counts) {
        let now = Instant::now();
        if !self.tty
            || self
                .last
                .is_some_and(|t| now - t < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(now);
        let secs = (now - self.start).as_secs_f64().max(1e-3);
        let rate = c.ok.saturating_sub(self.base_ok) as f64 / secs;
        let f = &c.failures;
        eprint!(
            "\r\x1b[2K  {}/{} connections  {:.0}/s  in flight {}  failed {} (timeouts {})  dropped {}",
            c.ok,
            self.target,
            rate,
            c.inflight,
            f.open_failed(),
            f.timed_out,
            f.dropped_while_idle
        );
        let _ = std::io::stderr().flush();
        self.shown = true;
    }

    fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
            self.shown = false;
        }
    }
}

/// Runs an idle benchmark; the exit code is non-zero when any connection failed.
pub fn run(args: IdleArgs) -> anyhow::Result<ExitCode> {
    scenario::ensure_positive("--rate", args.rate)?;
    ensure!(
        args.settle >= 0.0 && args.settle.is_finite(),
        "--settle must be 0 or more"
    );
    scenario::ensure_positive("--timeout", args.timeout)?;
    ensure!(
        args.frame_size <= holdfast_wire::frame::MAX_LEN_FIELD,
        "--frame-size is over the protocol's limit of {} bytes",
        holdfast_wire::frame::MAX_LEN_FIELD
    );
    let steps = plan::idle_steps(args.conns, &args.steps).map_err(anyhow::Error::msg)?;
    let procs = args
        .procs
        .unwrap_or_else(|| plan::default_procs(args.conns));
    ensure!(
        (1..=args.conns).contains(&procs),
        "--procs must be between 1 and --conns"
    );
    let (_, hard) = crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    let per_child = plan::share(args.conns, procs, 0);
    ensure!(
        per_child + FD_HEADROOM <= hard,
        "{per_child} connections per child process do not fit the open-file limit of {hard}; \
         use more --procs"
    );
    let target = client::resolve(&args.target)?;
    // Fail before starting anything when the CA is unusable; children load it again.
    client::client_config(&args.ca)?;
    procfs::tree_memory(&args.gateway_pid).with_context(|| {
        format!(
            "reading the memory of gateway pid(s) {:?}: running on this machine?",
            args.gateway_pid
        )
    })?;
    let sources = match args.sources.as_deref() {
        Some("none") => None,
        Some(s) => Some(s.to_string()),
        None if target.ip().is_loopback() => Some(plan::DEFAULT_SOURCES.to_string()),
        None => None,
    };
    let source_count = match &sources {
        Some(s) => plan::parse_sources(s).map_err(anyhow::Error::msg)?.len(),
        None => 0,
    };
    let parameters = IdleParameters {
        target: args.target.clone(),
        server_name: args.server_name.clone(),
        conns: args.conns,
        rate: args.rate,
        steps: steps.clone(),
        sources: sources.clone(),
        source_count,
        procs,
        frame_size: args.frame_size,
        settle_secs: args.settle,
        timeout_secs: args.timeout,
        gateway_pid: args.gateway_pid[0],
        gateway_pids: args.gateway_pid.clone(),
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let started = std::time::Instant::now();
    let mut results = IdleResults::default();
    rt.block_on(async {
        let mut children = match Children::spawn(&args, procs, sources.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                results.error = Some(format!("{e:#}"));
                return;
            }
        };
        if let Err(e) = drive(&args, &steps, &mut children, &mut results).await {
            results.error = Some(format!("{e:#}"));
        }
        results.failures = children.total().failures;
        results.conns_opened = children.total().ok;
        children.shut_down(Duration::from_secs(20)).await;
    });
    results.elapsed_secs = started.elapsed().as_secs_f64();
    if let (Some(first), Some(last)) = (results.steps.first(), results.steps.last()) {
        results.slopes = report::slopes(first, last);
    }
    results.segments = report::segments(&results.steps);
    results.ok = results.error.is_none()
        && results.conns_opened == args.conns
        && results.failures.open_failed() == 0
        && results.failures.dropped_while_idle == 0
        && results.echo_failed == 0
        && results.echo_ok == args.conns
        && results
            .then_run
            .as_ref()
            .is_none_or(|t| t.exit_code == Some(0) && t.probes.failed == 0);

    let report = IdleReport::new(
        "idle",
        args.label.clone(),
        parameters,
        procfs::machine(),
        Some(IdleMethod::default()),
        results,
    );
    scenario::write_json(&args.json, &report)?;
    summarize(&report, &args);
    Ok(scenario::exit_code(report.results.ok))
}

/// The steps, the sampling and the final echo check; fills `results` as it goes so a run
/// that stops early still reports what it measured.
async fn drive(
    args: &IdleArgs,
    steps: &[u64],
    children: &mut Children,
    results: &mut IdleResults,
) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let procs = children.procs.len() as u64;
    let page = procfs::page_size();
    let mut prev_step = 0;
    for (n, &step) in steps.iter().enumerate() {
        let before = children.total();
        children
            .send_all(|i| Command::Open(plan::share(step, procs, i as u64)))
            .await?;
        let start = Instant::now();
        // Generous: the timetable, plus every connection's own timeout twice over (the
        // timetable may slip when the in-flight cap is reached), plus start-up time.
        let expected = (step - prev_step) as f64 / args.rate;
        let deadline = start + Duration::from_secs_f64(expected * 2.0 + args.timeout * 2.0 + 30.0);
        let mut progress = Progress::new(tty, before.ok, step);
        children
            .collect(
                "its connections up",
                deadline,
                |r| matches!(r, Report::Opened(_)),
                &mut progress,
            )
            .await?;
        let open_secs = start.elapsed().as_secs_f64();
        let after = children.total();
        tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
        let (pss, rss, _) = procfs::tree_memory(&args.gateway_pid)
            .with_context(|| format!("sampling gateway pid(s) {:?}", args.gateway_pid))?;
        let kernel = procfs::kernel_sample()?;
        let tcp_mem_bytes = kernel.tcp_mem_pages * page;
        let opened = after.ok - before.ok;
        let sample = StepSample {
            target_conns: step,
            conns_open: after.ok - after.failures.dropped_while_idle,
            conns_failed: after.failures.open_failed() - before.failures.open_failed(),
            open_secs,
            open_rate: opened as f64 / open_secs.max(1e-9),
            gateway_pss_bytes: pss,
            gateway_rss_bytes: rss,
            machine_slab_bytes: kernel.slab_bytes,
            machine_tcp_mem_pages: kernel.tcp_mem_pages,
            machine_tcp_mem_bytes: tcp_mem_bytes,
            machine_tcp_inuse: kernel.tcp_inuse,
            machine_kernel_bytes: kernel.slab_bytes + tcp_mem_bytes,
        };
        println!(
            "step {}/{}: {} connections open ({} failed) in {:.1} s ({:.0}/s); gateway Pss {}, \
             machine slab {}, TCP inuse {}",
            n + 1,
            steps.len(),
            sample.conns_open,
            sample.conns_failed,
            open_secs,
            sample.open_rate,
            mib(pss),
            mib(kernel.slab_bytes),
            kernel.tcp_inuse
        );
        results.steps.push(sample);
        prev_step = step;
    }

    if let Some(command) = &args.then_run {
        let outcome = then_run(args, command).await;
        results.then_run = Some(outcome?);
    }

    let per_child = plan::share(args.conns, procs, 0);
    let rounds = per_child.div_ceil(1024) + 1;
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout * rounds as f64 + 20.0);
    let mut quiet = Progress::new(false, 0, 0);
    children.send_all(|_| Command::Echo).await?;
    let echoed = children
        .collect(
            "the final echo check",
            deadline,
            |r| matches!(r, Report::Echoed { .. }),
            &mut quiet,
        )
        .await?;
    for r in echoed {
        if let Report::Echoed { ok, failed } = r {
            results.echo_ok += ok;
            results.echo_failed += failed;
        }
    }
    Ok(())
}

/// Runs `command` with the probes echoing throughout: they start half a second before it
/// and stop half a second after it.
async fn then_run(args: &IdleArgs, command: &str) -> anyhow::Result<ThenRun> {
    let spec = probe::ProbeSpec {
        target: client::resolve(&args.target)?,
        config: client::client_config(&args.ca)?,
        server_name: args.server_name.clone(),
        conns: args.probes,
        frame_size: args.frame_size,
        bound: Duration::from_secs_f64(args.timeout.max(30.0)),
    };
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let probes = tokio::spawn(probe::run(spec, ready_tx, stop));
    ready
        .await
        .context("the probes went away")?
        .context("opening the probe connections")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("then-run: {command}");
    let start = Instant::now();
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .kill_on_drop(true)
        .status()
        .await;
    let secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let probes = probes.await.context("the probe task")?;
    let exit_code = match status {
        Ok(s) => s.code(),
        Err(e) => {
            eprintln!("holdfast-bench: starting `{command}`: {e}");
            None
        }
    };
    println!(
        "then-run: exit {} after {secs:.3} s; {} probe(s): {} round trips, longest {:.1} ms, \
         {} failed",
        exit_code.map_or("by signal".into(), |c| c.to_string()),
        probes.conns,
        probes.round_trips,
        probes.longest_round_trip_ms,
        probes.failed
    );
    for f in &probes.failures {
        println!("  {f}");
    }
    Ok(ThenRun {
        command: command.to_owned(),
        secs,
        exit_code,
        probes,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn per_conn(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |b| format!("{b:.0} B"))
}

/// The human summary on stdout.
fn summarize(report: &IdleReport, args: &IdleArgs) {
    let r = &report.results;
    let p = &report.parameters;
    let (first, last) = (r.steps.first(), r.steps.last());
    println!(
        "idle: {} connections to {} from {} process(es), {} source address(es)",
        p.conns, p.target, p.procs, p.source_count
    );
    if let (Some(a), Some(b)) = (first, last) {
        println!(
            "  gateway Pss: {} at {} connections, {} at {}",
            mib(a.gateway_pss_bytes),
            a.conns_open,
            mib(b.gateway_pss_bytes),
            b.conns_open
        );
    }
    println!(
        "  userspace per connection: {} (slope of gateway Pss)",
        per_conn(r.slopes.userspace_bytes_per_conn)
    );
    println!(
        "  kernel per connection:    {} (gateway end: half of {} machine-wide slab + TCP pages, \
         {} TCP sockets per connection)",
        per_conn(r.slopes.kernel_bytes_per_conn),
        per_conn(r.slopes.kernel_bytes_per_conn_both_ends),
        r.slopes
            .tcp_sockets_per_conn
            .map_or("n/a".into(), |s| format!("{s:.2}"))
    );
    let f = &r.failures;
    println!(
        "  echo at the end: {} ok, {} failed; connect failed {}, handshake failed {}, first echo \
         failed {} (timeouts {}), dropped while idle {}",
        r.echo_ok,
        r.echo_failed,
        f.connect_failed,
        f.handshake_failed,
        f.first_echo_failed,
        f.timed_out,
        f.dropped_while_idle
    );
    if let Some(e) = &r.error {
        println!("  stopped early: {e}");
    }
    println!(
        "  {} in {:.1} s; report: {}",
        if r.ok { "OK" } else { "FAILED" },
        r.elapsed_secs,
        args.json.display()
    );
}
