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
use holdfast::{admin, ring, tls};

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
    backlog: u32,
) -> anyhow::Result<Vec<socket2::Socket>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = holdfast::core::bind_listener(addr, backlog)
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
    let cfg = Arc::new(load_config(&args)?);
    let server_tls = tls::ServerTls::build(&cfg, None)?;
    let config_metrics = Arc::new(ConfigMetrics::default());
    config_metrics.loaded(SystemTime::now(), false);
    // SIGHUP's default action ends the process: take it over before anything is served.
    let hup = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .context("cannot install the SIGHUP handler")?;
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
    let cores = cfg.core_count();
    let listeners = bind_listeners(cfg.listen, cores, cfg.runtime.backlog)?;
    let listen_addr = listeners[0]
        .local_addr()?
        .as_socket()
        .context("listener address")?;
    let admin_listener = std::net::TcpListener::bind(cfg.admin)
        .with_context(|| format!("cannot bind admin address {}", cfg.admin))?;
    let admin_addr = admin_listener.local_addr()?;

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
    for _ in 0..cores {
        match ready_rx.recv() {
            Ok(Ok(info)) if info.table > 0 => {
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
    std::thread::Builder::new()
        .name("holdfast-admin".into())
        .spawn(move || admin.serve(admin_listener))?;
    let waker = ControlWaker::new(ring_fds.clone())
        .inspect_err(|e| {
            tracing::warn!("no io_uring for waking cores ({e}); reloads apply within 100 ms")
        })
        .ok();
    let control = Control {
        args,
        config: cfg,
        tls: server_tls,
        mail,
        waker,
        shutdown: shutdown.clone(),
        metrics: config_metrics,
    };
    std::thread::Builder::new()
        .name("holdfast-control".into())
        .spawn(move || control.serve(hup))?;
    println!("holdfast ready listen={listen_addr} admin={admin_addr} cores={cores}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// How long a reload waits for every core to confirm it runs with the new configuration.
const RELOAD_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The control thread: on SIGHUP, reads the configuration again (the same file and the
/// same command-line overrides as at start), builds a new TLS configuration from the
/// files on disk, and hands both to every core. Whatever fails leaves the running
/// configuration as it was.
struct Control {
    args: RunArgs,
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
        for _ in signals.forever() {
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

    fn source(&self) -> String {
        match &self.args.config {
            Some(path) => path.display().to_string(),
            None => "the command line".to_string(),
        }
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        let reloaded = self.config.reload(load_config(&self.args)?);
        reloaded.config.validate()?;
        let tls = tls::ServerTls::build(&reloaded.config, Some(&self.tls))?;
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
