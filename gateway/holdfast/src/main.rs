//! `holdfast`, the gateway binary: parses the CLI and config, loads certificates, binds a
//! SO_REUSEPORT listener per core, starts one pinned thread (and ring) per core and the
//! admin thread, prints one ready line, and on SIGTERM waits for the cores to drain.
//! SIGHUP reloads the configuration on the control thread (`Control`) and hands it to the
//! cores through their inboxes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use holdfast::config::{CertConfig, Config};
use holdfast::core::{run_core, ControlWaker, CoreSpec, Mail, Reload};
use holdfast::metrics::{ConfigMetrics, CoreMetrics};
use holdfast::{admin, ring, tls, upgrade};

#[derive(Parser)]
#[command(name = "holdfast", version, about = "io_uring TLS connection gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(RunArgs),
    /// Validate the config and certificates, and check that this host (open files, sysctls
    /// of the gateway tuning profile, memory, io_uring) can hold the configured connections.
    /// Exits non-zero when something falls short, naming the fix.
    Check(RunArgs),
    /// Live view of a running gateway, read from its admin /metrics.
    Top(TopArgs),
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Upgrade a running gateway to the binary now at its path, keeping every
    /// established connection: signals the process named in PID_FILE (SIGUSR2) and waits
    /// until the new process has rewritten the file and the old one has exited.
    Upgrade(UpgradeArgs),
    /// Session-ticket keys shared by a fleet (`[tls] ticket_key_file`).
    #[command(subcommand, name = "ticket-key")]
    TicketKey(TicketKeyCommand),
}

#[derive(Subcommand)]
enum TicketKeyCommand {
    /// Write a new random ticket key file with mode 0600 (replacing PATH atomically;
    /// tickets of the old file stop resuming once the gateways reload or restart).
    Generate {
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct UpgradeArgs {
    /// The pid file the running gateway was started with (`run --pid-file`).
    #[arg(long, value_name = "PATH")]
    pid_file: PathBuf,
    /// Seconds to wait for the upgrade to finish.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
struct TopArgs {
    /// Admin address of the gateway.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    interval: f64,
    /// Print one snapshot and exit.
    #[arg(long)]
    once: bool,
}

/// Flags override the config file; with --cert and --key no file is needed.
#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Client-facing TLS address (port 0 picks one; the ready line names it).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Certificate chain (PEM). Replaces the config's certificates.
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// Unix socket of a routing worker (repeatable). Replaces the config's workers.
    #[arg(long = "worker", value_name = "SOCKET_PATH")]
    workers: Vec<PathBuf>,
    /// Core threads (0 = every CPU).
    #[arg(long)]
    cores: Option<usize>,
    /// Admin address for /metrics and /healthz.
    #[arg(long, value_name = "ADDR:PORT")]
    admin: Option<SocketAddr>,
    /// Seconds to finish the TLS handshake.
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Seconds of silence before a client is closed (0 = never).
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Largest frame payload in bytes.
    #[arg(long, value_name = "BYTES")]
    max_frame: Option<usize>,
    /// Seconds SIGTERM waits for clients to be closed.
    #[arg(long, value_name = "SECS")]
    drain_grace: Option<u64>,
    /// Connections per core (fixed-file table size).
    #[arg(long, value_name = "N")]
    max_conns_per_core: Option<u32>,
    /// Connections one source address (IPv4, or IPv6 /64) may hold (0 = no cap).
    #[arg(long, value_name = "N")]
    max_conns_per_ip: Option<u32>,
    /// Full TLS handshakes per second per core (0 = no cap; benchmarks lift it).
    #[arg(long, value_name = "N")]
    handshakes_per_sec_per_core: Option<u32>,
    /// Also accept TLS 1.2.
    #[arg(long)]
    tls12: bool,
    /// Seconds an idle TLS 1.3 connection waits before it hibernates (0 = never).
    #[arg(long, value_name = "SECS")]
    hibernate_after: Option<u64>,
    /// Unacknowledged bytes per worker link before a core stops reading its clients.
    #[arg(long, value_name = "BYTES")]
    link_window: Option<usize>,
    /// Drop a worker link that receives nothing for this long.
    #[arg(long, value_name = "MS")]
    heartbeat_timeout_ms: Option<u64>,
    /// Write the process id here once serving (and again by the new process after a
    /// live upgrade).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Seconds a live upgrade waits for the new binary to be ready.
    #[arg(long, value_name = "SECS")]
    upgrade_timeout: Option<u64>,
    /// Completion batching: wake a core at most this many microseconds after its first
    /// completion arrived (0 = wake per completion).
    #[arg(long, value_name = "US")]
    batch_wait_us: Option<u32>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Check(args) => check(args),
        Command::Upgrade(a) => upgrade_command(&a),
        Command::TicketKey(TicketKeyCommand::Generate { out }) => {
            holdfast::ticket::generate(&out).map_err(anyhow::Error::from)
        }
        Command::Top(a) => std::time::Duration::try_from_secs_f64(a.interval)
            .context("--interval")
            .and_then(|d| holdfast::top::run(a.admin, d, a.once)),
        Command::GenerateDocs { dir } => holdfast_clidocs::write(Cli::command(), &dir)
            .map(|_| ())
            .with_context(|| format!("writing docs under {}", dir.display())),
    };
    if let Err(e) = result {
        eprintln!("error: {}", holdfast::hints::one_line(&e));
        std::process::exit(1);
    }
}

fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        cfg.tls.certs = vec![CertConfig {
            cert: cert.clone(),
            key: key.clone(),
            server_names: Vec::new(),
        }];
    }
    if !args.workers.is_empty() {
        cfg.workers = args.workers.clone();
    }
    if let Some(v) = args.cores {
        cfg.cores = v;
    }
    if let Some(v) = args.admin {
        cfg.admin = v;
    }
    if let Some(v) = args.handshake_timeout {
        cfg.limits.handshake_timeout_secs = v;
    }
    if let Some(v) = args.idle_timeout {
        cfg.limits.idle_timeout_secs = v;
    }
    if let Some(v) = args.max_frame {
        cfg.limits.max_frame = v;
    }
    if let Some(v) = args.drain_grace {
        cfg.limits.drain_grace_secs = v;
    }
    if let Some(v) = args.max_conns_per_core {
        cfg.limits.max_conns_per_core = v;
    }
    if let Some(v) = args.handshakes_per_sec_per_core {
        cfg.limits.handshakes_per_sec_per_core = v;
    }
    if let Some(v) = args.max_conns_per_ip {
        cfg.limits.max_conns_per_ip = v;
    }
    if let Some(v) = args.link_window {
        cfg.limits.link_window_bytes = v;
    }
    if let Some(v) = args.heartbeat_timeout_ms {
        cfg.runtime.heartbeat_timeout_ms = v;
        // Keep the interval well inside the timeout when only the timeout is given.
        cfg.runtime.heartbeat_interval_ms = cfg.runtime.heartbeat_interval_ms.min((v / 3).max(1));
    }
    if let Some(v) = args.batch_wait_us {
        cfg.runtime.batch_wait_us = v;
    }
    if let Some(v) = args.upgrade_timeout {
        cfg.runtime.upgrade_timeout_secs = v;
    }
    if let Some(v) = args.hibernate_after {
        cfg.tls.hibernate_after_secs = v;
    }
    if args.tls12 && !cfg.tls12_enabled() {
        cfg.tls.versions.push("1.2".to_string());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Binds one listener per core on the same address with SO_REUSEPORT; a port of 0 is
/// resolved by the first bind and reused by the others.
fn bind_listeners(
    addr: SocketAddr,
    n: usize,
    runtime: &holdfast::config::Runtime,
) -> anyhow::Result<Vec<socket2::Socket>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = holdfast::core::bind_listener(addr, runtime)
            .with_context(|| format!("cannot listen on {addr}"))?;
        addr = s
            .local_addr()?
            .as_socket()
            .context("listener has no IP address")?;
        out.push(s);
    }
    Ok(out)
}

/// The host findings for `cfg` (after raising the open-file limit as `run` does), and the
/// gateway tuning profile they were checked against.
fn host_findings(cfg: &Config) -> anyhow::Result<(Vec<holdfast::check::Finding>, Profile)> {
    let profile = holdfast::check::parse_profile(holdfast::check::GATEWAY_PROFILE)
        .map_err(|e| anyhow::anyhow!("built-in gateway profile: {e}"))?;
    let findings = holdfast::check::check_host(
        std::path::Path::new("/proc/sys"),
        &profile,
        cfg.core_count(),
        u64::from(cfg.limits.max_conns_per_core),
    );
    Ok((findings, profile))
}

type Profile = Vec<(String, String)>;

fn check(args: RunArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args)?;
    tls::server_config(&cfg)?;
    println!(
        "config and certificates: ok ({} certificate(s), {} worker(s), {} cores)",
        cfg.tls.certs.len(),
        cfg.workers.len(),
        cfg.core_count()
    );
    ring::raise_nofile_limit();
    let (findings, _) = host_findings(&cfg)?;
    print!("{}", holdfast::check::render_table(&findings));
    let short = findings.iter().filter(|f| !f.ok).count();
    if short > 0 {
        bail!(
            "{short} host setting(s) fall short for {} connections per core; see the fix column",
            cfg.limits.max_conns_per_core
        );
    }
    println!("host: ok");
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Captured now: once an operator replaces the binary, /proc/self/exe names a
    // deleted file, and the upgrade must start what is at the path now.
    let exe = std::env::current_exe().context("cannot tell where this binary is")?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let successor = match upgrade::inherited() {
        None => None,
        Some(Ok(inherited)) => Some(inherited),
        Some(Err(e)) => bail!("started as a live upgrade, but {e}"),
    };
    let mut ctl = successor
        .as_ref()
        .map(|i| upgrade::FrameReader::new(i.ctl.try_clone().expect("dup of the control socket")));
    // A successor first reads the offer, so whatever fails from here on is reported to
    // the old process (which then keeps serving) as well as logged.
    let offer = match &mut ctl {
        None => None,
        Some(ctl) => {
            let (kind, body) = ctl
                .next(Instant::now() + Duration::from_secs(30))
                .context("no offer from the running process")?;
            if kind != upgrade::OFFER {
                bail!("the running process sent {kind} instead of its offer");
            }
            let admin = ctl
                .take_fd()
                .context("the offer came without the admin listener")?;
            match upgrade::Offer::decode(&body) {
                Ok(o) => Some((o, admin)),
                Err(why) => {
                    refuse(ctl, &why);
                    bail!("{why}");
                }
            }
        }
    };
    let prepared = prepare(&args, offer.as_ref().map(|(o, _)| o));
    let (cfg, server_tls, nofile) = match (prepared, &mut ctl) {
        (Ok(p), _) => p,
        (Err(e), Some(ctl)) => {
            refuse(ctl, &format!("{e:#}"));
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    let config_metrics = Arc::new(ConfigMetrics::default());
    config_metrics.loaded(SystemTime::now(), false);
    if let Some((o, _)) = &offer {
        let (m, c) = (&config_metrics, &o.counters);
        m.reloads_ok.store(c.reloads_ok, Ordering::Relaxed);
        m.reloads_failed.store(c.reloads_failed, Ordering::Relaxed);
        m.upgrades_ok.store(c.upgrades_ok, Ordering::Relaxed);
        m.upgrades_failed
            .store(c.upgrades_failed, Ordering::Relaxed);
    }
    // SIGHUP's default action ends the process: take it over before anything is served.
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR2,
    ])
    .context("cannot install the SIGHUP and SIGUSR2 handlers")?;
    let cores = cfg.core_count();
    let (listeners, admin_listener) = match (&successor, offer) {
        (None, _) | (_, None) => {
            let listeners = bind_listeners(cfg.listen, cores, &cfg.runtime)?;
            let admin = std::net::TcpListener::bind(cfg.admin)
                .with_context(|| format!("cannot bind admin address {}", cfg.admin))?;
            (listeners.into_iter().map(Some).collect::<Vec<_>>(), admin)
        }
        (Some(_), Some((_, admin))) => {
            // The listeners come with each core's connections; the admin port is the old
            // process's own socket.
            (
                (0..cores).map(|_| None).collect(),
                std::net::TcpListener::from(admin),
            )
        }
    };
    let admin_addr = admin_listener.local_addr()?;
    let mut adopt: Vec<Option<std::os::fd::OwnedFd>> = match successor {
        Some(i) => {
            if let Some(ctl) = &mut ctl {
                send_ctl(ctl, upgrade::READY, b"")?;
            }
            i.cores.into_iter().map(Some).collect()
        }
        None => (0..cores).map(|_| None).collect(),
    };

    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone())
            .context("cannot install signal handler")?;
    }
    let cpu_ids = if cfg.runtime.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let metrics: Vec<Arc<CoreMetrics>> = (0..cores)
        .map(|_| Arc::new(CoreMetrics::default()))
        .collect();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (mail, mut inboxes): (Vec<_>, Vec<_>) = (0..cores).map(|_| mpsc::channel()).unzip();
    let ring_fds = Arc::new(
        (0..cores)
            .map(|_| std::sync::atomic::AtomicI32::new(-1))
            .collect::<Vec<_>>(),
    );
    let mut threads = Vec::with_capacity(cores);
    let process_conns = holdfast::admission::ProcessCap::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let spec = CoreSpec {
            index: i as u8,
            cores: cores as u8,
            config: cfg.clone(),
            tls: server_tls.server.clone(),
            listener,
            adopt: adopt[i].take(),
            metrics: metrics[i].clone(),
            shutdown: shutdown.clone(),
            nofile,
            mail: mail.clone(),
            inbox: inboxes.remove(0),
            ring_fds: ring_fds.clone(),
            process_conns: process_conns.clone(),
        };
        let cpu = (!cpu_ids.is_empty()).then(|| cpu_ids[i % cpu_ids.len()]);
        let tx = ready_tx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("holdfast-core-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        core_affinity::set_for_current(cpu);
                    }
                    run_core(spec, tx);
                })
                .context("cannot start a core thread")?,
        );
    }
    drop(ready_tx);
    let mut listen_addr = None;
    for _ in 0..cores {
        match ready_rx.recv() {
            Ok(Ok(info)) if info.table > 0 => {
                listen_addr = listen_addr.or(info.listen);
                tracing::debug!(features = %info.features, direct = info.direct, table = info.table, "core ready");
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    tracing::info!(
                        "io_uring: {}; client sockets as {}; {} connections per core",
                        info.features,
                        if info.direct {
                            "direct descriptors"
                        } else {
                            "regular fds (fallback)"
                        },
                        info.table
                    )
                });
            }
            Ok(Ok(_)) => bail!("a core started with an empty connection table"),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("a core thread exited during start"),
        }
    }
    let listen_addr = listen_addr.context("no core has a listener")?;
    let admin = admin::Admin {
        cores: metrics.clone(),
        workers: cfg
            .workers
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        draining: shutdown.clone(),
        config: config_metrics.clone(),
    };
    let admin_socket = admin_listener
        .try_clone()
        .context("cannot keep the admin listener for upgrades")?;
    std::thread::Builder::new()
        .name("holdfast-admin".into())
        .spawn(move || admin.serve(admin_listener))?;
    let waker = ControlWaker::new(ring_fds.clone())
        .inspect_err(|e| {
            tracing::warn!("no io_uring for waking cores ({e}); reloads apply within 100 ms")
        })
        .ok();
    if let Some(path) = &args.pid_file {
        write_pid_file(path)?;
    }
    if let Some(ctl) = &mut ctl {
        config_metrics.upgrades_ok.fetch_add(1, Ordering::Relaxed);
        send_ctl(ctl, upgrade::TAKEN, &std::process::id().to_le_bytes())?;
        tracing::info!(
            "live upgrade: this process (pid {}) has taken over",
            std::process::id()
        );
    }
    let control = Control {
        args,
        exe,
        argv,
        config: cfg,
        tls: server_tls,
        mail,
        waker,
        shutdown: shutdown.clone(),
        metrics: config_metrics,
        admin_socket,
        upgraded: false,
    };
    std::thread::Builder::new()
        .name("holdfast-control".into())
        .spawn(move || control.serve(signals))?;
    println!("holdfast ready listen={listen_addr} admin={admin_addr} cores={cores}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("cores stopped; exiting");
    Ok(())
}

/// Loads the configuration and certificates and checks the host, as `run` needs them;
/// for a live upgrade also that this process can take what `offer` brings.
fn prepare(
    args: &RunArgs,
    offer: Option<&upgrade::Offer>,
) -> anyhow::Result<(Arc<Config>, tls::ServerTls, u64)> {
    let cfg = Arc::new(load_config(args)?);
    if let Some(o) = offer {
        if o.cores as usize != cfg.core_count() {
            bail!(
                "the running process has {} cores and this configuration {}: connection ids name their core, so a live upgrade keeps the core count (restart to change it)",
                o.cores,
                cfg.core_count()
            );
        }
    }
    let server_tls = tls::ServerTls::build(&cfg, None, offer.and_then(|o| o.ticket_secret))?;
    let nofile = ring::raise_nofile_limit();
    // The same checks as `holdfast check`, as warnings: a short host still runs.
    match host_findings(&cfg) {
        Ok((findings, profile)) => {
            for line in holdfast::check::startup_warnings(&findings, &profile) {
                tracing::warn!("{line}");
            }
        }
        Err(e) => tracing::warn!("host check skipped: {e:#}"),
    }
    for line in holdfast::hints::worker_warnings(&cfg) {
        tracing::warn!("{line}");
    }
    Ok((cfg, server_tls, nofile))
}

fn send_ctl(ctl: &upgrade::FrameReader, kind: u8, body: &[u8]) -> anyhow::Result<()> {
    upgrade::send_frame(ctl.sock(), &holdfast::handover::frame(kind, body), &[])
        .context("the running process is gone")
}

/// Tells the old process why this one will not take over.
fn refuse(ctl: &upgrade::FrameReader, why: &str) {
    tracing::error!("live upgrade refused: {why}");
    let _ = send_ctl(ctl, upgrade::REFUSE, why.as_bytes());
}

/// Writes this process's id to `path` (through a temporary file and a rename, so a
/// reader never sees half a number).
fn write_pid_file(path: &std::path::Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the pid file {}", path.display()))
}

/// `holdfast upgrade`: SIGUSR2 to the running gateway, then wait for the pid file to
/// name a new process and the old one to exit.
fn upgrade_command(a: &UpgradeArgs) -> anyhow::Result<()> {
    let read = || -> anyhow::Result<i32> {
        let text = std::fs::read_to_string(&a.pid_file)
            .with_context(|| format!("cannot read {}", a.pid_file.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} does not hold a pid", a.pid_file.display()))
    };
    let old = read()?;
    // Running, not exited: a process that exited stays a zombie until its parent reaps it.
    let alive = |pid: i32| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .map(str::trim_start)
            .is_some_and(|state| state.starts_with('Z') || state.starts_with('X')),
        Err(_) => false,
    };
    if old <= 0 || !alive(old) {
        bail!(
            "no gateway runs as pid {old} (from {})",
            a.pid_file.display()
        );
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(old).expect("positive pid"),
        rustix::process::Signal::USR2,
    )
    .with_context(|| format!("cannot signal pid {old}"))?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut new = None;
    while Instant::now() < deadline {
        if let Ok(pid) = read() {
            if pid != old {
                new = Some(pid);
            }
        }
        if let Some(pid) = new {
            if !alive(old) {
                println!("upgraded: pid {old} -> {pid}");
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match new {
        Some(pid) => bail!("pid {pid} took over, but the old pid {old} has not exited yet"),
        None => bail!(
            "the upgrade did not complete within {} s; pid {old} is still serving (its log says why)",
            a.timeout
        ),
    }
}

enum UpgradeError {
    /// Nothing moved: every connection is still served here.
    Before(String),
    /// Some connections had moved to a process that then failed.
    During(String),
}

/// Waits for control frame `want` from the new process, which may refuse, exit or say
/// nothing.
fn wait_ctl(next: &mut upgrade::Successor, want: u8, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = next.child.try_wait() {
            return Err(format!(
                "the new binary exited ({status}) before it took over"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the new binary did not answer within {} s",
                timeout.as_secs()
            ));
        }
        let step = Instant::now() + Duration::from_millis(100);
        match next.ctl.next(step.min(deadline)) {
            Ok((kind, _)) if kind == want => return Ok(()),
            Ok((upgrade::REFUSE, why)) => {
                return Err(format!(
                    "the new binary refused: {}",
                    String::from_utf8_lossy(&why)
                ))
            }
            Ok((kind, _)) => return Err(format!("the new binary sent {kind} out of turn")),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                // It closed its end: it is exiting; let try_wait say how.
                std::thread::sleep(Duration::from_millis(20));
                if let Ok(Some(status)) = next.child.try_wait() {
                    return Err(format!(
                        "the new binary exited ({status}) before it took over"
                    ));
                }
                if Instant::now() >= deadline {
                    return Err("the new binary closed the control socket".to_string());
                }
            }
            Err(e) => return Err(format!("control socket: {e}")),
        }
    }
}

/// How long a reload waits for every core to confirm it runs with the new configuration.
const RELOAD_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The control thread: on SIGHUP, reads the configuration again (the same file and the
/// same command-line overrides as at start), builds a new TLS configuration from the
/// files on disk, and hands both to every core. Whatever fails leaves the running
/// configuration as it was.
struct Control {
    args: RunArgs,
    /// This binary's path as it was started, and its arguments: what a live upgrade runs.
    exe: PathBuf,
    argv: Vec<std::ffi::OsString>,
    /// The admin listener, passed to the new process in a live upgrade.
    admin_socket: std::net::TcpListener,
    /// A live upgrade handed everything over: nothing more to do here.
    upgraded: bool,
    /// What the cores run with (after the last successful reload).
    config: Arc<Config>,
    tls: tls::ServerTls,
    mail: Vec<mpsc::Sender<Mail>>,
    waker: Option<ControlWaker>,
    shutdown: Arc<AtomicBool>,
    metrics: Arc<ConfigMetrics>,
}

impl Control {
    fn serve(mut self, mut signals: signal_hook::iterator::Signals) {
        for sig in signals.forever() {
            if self.upgraded {
                tracing::info!("signal {sig} after the hand-over: this process is exiting");
                continue;
            }
            if sig == signal_hook::consts::SIGUSR2 {
                if self.shutdown.load(Ordering::Relaxed) {
                    tracing::warn!("SIGUSR2 while draining: not upgrading");
                    continue;
                }
                match self.upgrade() {
                    Ok(pid) => {
                        self.upgraded = true;
                        tracing::info!(
                            "live upgrade: pid {pid} took over; closing worker links and exiting"
                        );
                    }
                    Err(UpgradeError::Before(why)) => {
                        self.metrics.upgrades_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            "live upgrade failed: {why}; still serving every connection"
                        );
                    }
                    Err(UpgradeError::During(why)) => {
                        self.metrics.upgrades_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("live upgrade failed during the hand-over: {why}; connections already handed over are lost, the rest are served here");
                    }
                }
                continue;
            }
            if self.shutdown.load(Ordering::Relaxed) {
                tracing::info!("SIGHUP while draining: not reloading");
                continue;
            }
            if let Err(e) = self.reload() {
                tracing::error!(
                    "config reload from {} failed; still serving with the previous configuration: {e:#}",
                    self.source()
                );
                self.metrics.failed();
            }
        }
    }

    /// Starts the binary at `exe` as this process's successor and hands everything over
    /// (see `upgrade.rs`); returns the new process's pid once it has taken over.
    fn upgrade(&mut self) -> Result<u32, UpgradeError> {
        use UpgradeError::{Before, During};
        let cores = self.mail.len();
        tracing::info!("live upgrade: starting {}", self.exe.display());
        let mut next = upgrade::spawn(&self.exe, &self.argv, cores)
            .map_err(|e| Before(format!("cannot start {}: {e}", self.exe.display())))?;
        let m = &self.metrics;
        let offer = upgrade::Offer {
            format: holdfast::handover::FORMAT,
            cores: cores as u32,
            counters: upgrade::ProcessCounters {
                reloads_ok: m.reloads_ok.load(Ordering::Relaxed),
                reloads_failed: m.reloads_failed.load(Ordering::Relaxed),
                upgrades_ok: m.upgrades_ok.load(Ordering::Relaxed),
                upgrades_failed: m.upgrades_failed.load(Ordering::Relaxed),
            },
            ticket_secret: self.tls.process_ticket_secret,
        };
        use std::os::fd::AsFd as _;
        let sent = upgrade::send_frame(
            next.ctl.sock(),
            &offer.encode(),
            &[self.admin_socket.as_fd()],
        );
        let timeout = Duration::from_secs(self.config.runtime.upgrade_timeout_secs);
        let ready = match sent {
            Ok(()) => wait_ctl(&mut next, upgrade::READY, timeout),
            Err(e) => {
                // Its end is closed: most likely it exited at once; say how if it did.
                let deadline = Instant::now() + Duration::from_secs(1);
                let mut why = format!("the new binary closed the control socket ({e})");
                while Instant::now() < deadline {
                    if let Ok(Some(status)) = next.child.try_wait() {
                        why = format!("the new binary exited ({status}) before it took over");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(why)
            }
        };
        if let Err(why) = ready {
            let _ = next.child.kill();
            let _ = next.child.wait();
            return Err(Before(why));
        }
        // Past this point connections move. A core whose new counterpart stops reading
        // keeps what it has not sent (its sends time out).
        for (i, sock) in next.cores.drain(..).enumerate() {
            let _ = rustix::net::sockopt::set_socket_timeout(
                &sock,
                rustix::net::sockopt::Timeout::Send,
                Some(Duration::from_secs(10)),
            );
            let _ = self.mail[i].send(Mail::Handover(sock));
        }
        if let Some(waker) = &mut self.waker {
            let _ = waker.wake_all();
        }
        let taken = wait_ctl(&mut next, upgrade::TAKEN, Duration::from_secs(120));
        match taken {
            Ok(()) => {}
            Err(why) => {
                let _ = next.child.kill();
                let _ = next.child.wait();
                return Err(During(why));
            }
        }
        for inbox in &self.mail {
            let _ = inbox.send(Mail::Release);
        }
        if let Some(waker) = &mut self.waker {
            let _ = waker.wake_all();
        }
        // The child is the new gateway now; it is not waited for.
        Ok(next.child.id())
    }

    fn source(&self) -> String {
        match &self.args.config {
            Some(path) => path.display().to_string(),
            None => "the command line".to_string(),
        }
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        let reloaded = self.config.reload(load_config(&self.args)?);
        reloaded.config.validate()?;
        let tls = tls::ServerTls::build(&reloaded.config, Some(&self.tls), None)?;
        let config = Arc::new(reloaded.config);

        let (applied_tx, applied_rx) = mpsc::channel();
        let mut sent = 0;
        for inbox in &self.mail {
            let mail = Mail::Reload(Reload {
                config: config.clone(),
                tls: tls.server.clone(),
                applied: applied_tx.clone(),
            });
            // A core that has exited (drained) has dropped its inbox.
            if inbox.send(mail).is_ok() {
                sent += 1;
            }
        }
        drop(applied_tx);
        if let Some(waker) = &mut self.waker {
            if let Err(e) = waker.wake_all() {
                tracing::warn!("cannot wake the cores ({e}); they apply the reload within 100 ms");
            }
        }
        let deadline = Instant::now() + RELOAD_APPLY_TIMEOUT;
        let mut applied = 0;
        while applied < sent {
            let left = deadline.saturating_duration_since(Instant::now());
            if applied_rx.recv_timeout(left).is_err() {
                tracing::warn!(
                    "config reload: {} of {sent} cores confirmed within {RELOAD_APPLY_TIMEOUT:?}; \
                     the others apply it when they next read their inbox",
                    applied
                );
                break;
            }
            applied += 1;
        }

        for f in &reloaded.fixed {
            tracing::warn!(
                "config reload: `{}` changed ({} -> {}) but is fixed at start; still running with {} until a restart",
                f.key,
                f.running,
                f.wanted,
                f.running
            );
        }
        let certs: Vec<String> = config
            .tls
            .certs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let same = self.config.tls.certs.get(i) == Some(c)
                    && self.tls.leaves.get(i) == tls.leaves.get(i);
                let what = if same { "unchanged" } else { "new certificate" };
                format!("{} ({what})", c.cert.display())
            })
            .collect();
        let changed = if reloaded.changed.is_empty() {
            "no other setting changed".to_string()
        } else {
            format!("changed: {}", reloaded.changed.join("; "))
        };
        tracing::info!(
            "config reloaded from {} on {applied} cores: certificates reloaded from disk: {}; {changed}",
            self.source(),
            certs.join(", ")
        );
        self.config = config;
        self.tls = tls;
        self.metrics.loaded(SystemTime::now(), true);
        Ok(())
    }
}
