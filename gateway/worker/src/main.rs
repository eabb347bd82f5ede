//! `holdfast-worker`: reference workers for holdfast. `echo` sends every client frame
//! back to the connection it came from; it is what the demo, the tests and the relay
//! benchmark run against.
//!
//! Two flags exist for tests (both off by default, when the echo is pure):
//! `--prefix-worker-name` puts `NAME:` (the `--name`) before every echoed payload, so a
//! client can tell which of several workers served a frame; `--ack-delay-ms N` holds
//! every acknowledgement back for N ms after its frames were echoed, so frames stay
//! unacknowledged in the gateway (in flight when the worker is killed, for instance).
//! Tests stop, freeze and resume a worker with SIGKILL, SIGSTOP and SIGCONT.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use holdfast_worker::{echo, SocketAccess, WorkerListener, DEFAULT_NAME};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "Reference routing workers for the holdfast gateway")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

/// Who may reach the worker socket.
#[derive(Args)]
struct AccessArgs {
    /// Permission bits of the socket file, octal (connecting needs write permission).
    #[arg(long, value_name = "OCTAL", default_value = "660", value_parser = parse_mode)]
    socket_mode: u32,
    /// Accept links only from processes of this uid (the gateway's user).
    #[arg(long, value_name = "UID")]
    allow_uid: Option<u32>,
    /// Accept links only from processes of this gid.
    #[arg(long, value_name = "GID")]
    allow_gid: Option<u32>,
}

impl AccessArgs {
    fn access(&self) -> SocketAccess {
        let mut a = SocketAccess::default().mode(self.socket_mode);
        a.uid = self.allow_uid;
        a.gid = self.allow_gid;
        a
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 660"))
}

#[derive(Subcommand)]
enum Command {
    /// Echo every client frame back to its connection.
    Echo {
        /// Unix socket to listen on (a stale socket file there is replaced).
        #[arg(long)]
        socket: PathBuf,
        /// Name sent to the gateway in HELLO, shown in its logs.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// Put "NAME:" before every echoed payload, so a client can tell which worker
        /// served each frame (for tests; off by default, when the echo is pure).
        #[arg(long)]
        prefix_worker_name: bool,
        /// Hold every acknowledgement back this many milliseconds after its frames were
        /// echoed, so frames stay unacknowledged in the gateway (for tests; 0 = ACK at
        /// once, once per batch).
        #[arg(long, value_name = "MS", default_value_t = 0)]
        ack_delay_ms: u64,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Bridge the gateway to NATS (subjects and headers: docs/nats.md).
    Nats {
        /// Unix socket to listen on (a stale socket file there is replaced).
        #[arg(long)]
        socket: PathBuf,
        /// NATS server URL.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// This gateway's name: the Holdfast-Gateway header and the default subjects.
        #[arg(long)]
        gateway: String,
        /// Subject client events are published to [default: holdfast.in.GATEWAY].
        #[arg(long)]
        subject: Option<String>,
        /// Subject this gateway's commands arrive on [default: holdfast.out.GATEWAY].
        #[arg(long)]
        commands: Option<String>,
        /// Topic subjects are PREFIX.TOPIC.
        #[arg(long, value_name = "PREFIX", default_value = "holdfast.topic")]
        topic_prefix: String,
        /// Name sent to the gateway in HELLO and to NATS.
        #[arg(long, default_value = "holdfast-nats-bridge")]
        name: String,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log))
        .with_context(|| format!("bad --log filter {:?}", cli.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Echo {
            socket,
            name,
            prefix_worker_name,
            ack_delay_ms,
            access,
        } => {
            let options = echo::Options {
                prefix: if prefix_worker_name {
                    format!("{name}:").into_bytes()
                } else {
                    Vec::new()
                },
                ack_delay: Duration::from_millis(ack_delay_ms),
            };
            run_echo(&socket, &name, access.access(), options)
        }
        Command::Nats {
            socket,
            nats,
            gateway,
            subject,
            commands,
            topic_prefix,
            name,
            access,
        } => {
            let options = holdfast_worker::nats::Options {
                subject: subject.unwrap_or_else(|| format!("holdfast.in.{gateway}")),
                commands: commands.unwrap_or_else(|| format!("holdfast.out.{gateway}")),
                socket,
                access: access.access(),
                nats,
                gateway,
                topic_prefix,
                name,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(holdfast_worker::nats::run(options))
        }
        Command::GenerateDocs { dir } => holdfast_clidocs::write(Cli::command(), &dir)
            .map(|_| ())
            .with_context(|| format!("writing docs under {}", dir.display())),
    }
}

/// Accepts links until killed (SIGTERM and SIGINT keep their default action: the process
/// holds no state worth saving, and the gateway re-sends anything unacknowledged).
fn run_echo(
    socket: &std::path::Path,
    name: &str,
    access: SocketAccess,
    options: echo::Options,
) -> anyhow::Result<()> {
    let listener = WorkerListener::bind_with(socket, access)
        .with_context(|| format!("cannot listen on {}", socket.display()))?
        .with_name(name);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "holdfast-worker: listening on {}", socket.display())?;
        out.flush()?;
    }
    info!(
        socket = %socket.display(),
        name,
        prefix = !options.prefix.is_empty(),
        ack_delay_ms = options.ack_delay.as_millis() as u64,
        "echo worker listening"
    );
    let options = std::sync::Arc::new(options);
    loop {
        let mut link = match listener.accept() {
            Ok(link) => link,
            Err(e) => {
                // Accept errors (EMFILE, a gateway gone before HELLO) are per-attempt.
                warn!(error = %e, "accepting a gateway link failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let options = options.clone();
        std::thread::Builder::new()
            .name("echo-link".into())
            .spawn(move || match echo::serve_with(&mut link, &options) {
                Ok(stats) => info!(
                    core = link.peer().map(|p| p.core),
                    ?stats,
                    "gateway closed the link"
                ),
                Err(e) => warn!(
                    core = link.peer().map(|p| p.core),
                    error = %e,
                    "link dropped"
                ),
            })
            .context("cannot start a link thread")?;
    }
}
