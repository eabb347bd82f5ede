//! holdfast-bench: the load generator that proves holdfast's numbers. It makes
//! throw-away certificates, holds tens of thousands of idle TLS connections while
//! measuring what each costs the gateway and the kernel, relays frames at a fixed
//! open-loop rate to measure latency and CPU per frame, makes short connections as fast
//! as it can to measure CPU per handshake, drives reconnect storms, measures rustls alone
//! in memory as the ceiling, times topic PUBLISH fan-out to many subscribers as the
//! gateway's own routing worker, serves the byte-echo backend the peers forward to, and
//! turns the JSON reports into a markdown table and an SVG chart.
//!
//! Its clients run on io_uring (`uring`: one ring per thread, multishot receives from a
//! provided-buffer ring) with rustls' unbuffered client driven by the gateway's own record
//! driver (`session`), so the client costs about what the server does. Reports are JSON
//! files whose field names are described in `report`; the human summary on stdout is for
//! people, the JSON for tools.
#![deny(unsafe_code)]

mod ceiling;
mod certs;
mod client;
mod cpu;
mod echo;
mod fanout;
mod handshake;
mod idle;
mod idle_worker;
mod nats_echo;
mod plan;
mod probe;
mod procfs;
mod progress;
mod proto;
mod render;
mod report;
mod scenario;
mod session;
mod storm;
mod sys;
mod unix_echo;
mod uring;
mod why;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "holdfast-bench",
    version,
    about = "Load generator for holdfast"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a throw-away CA and server certificate (ECDSA P-256) for demos and benches.
    GenCert(certs::GenCertArgs),
    /// Hold many idle TLS connections and measure memory per connection.
    Idle(idle::IdleArgs),
    /// Relay frames at a fixed open-loop rate and measure latency and server CPU per frame.
    Echo(echo::EchoArgs),
    /// Subscribe N clients to a topic through the bench's own routing worker and time
    /// PUBLISH fan-out to all of them.
    Fanout(fanout::FanoutArgs),
    /// Short connections (handshake, one echo, close) as fast as C loops make them; server
    /// CPU per handshake.
    Handshake(handshake::HandshakeArgs),
    /// N connected clients drop and reconnect at once; time until all are back.
    Storm(storm::StormArgs),
    /// rustls alone in memory on one core: handshakes and small records (the ceiling).
    Ceiling(ceiling::CeilingArgs),
    /// Turn JSON reports into a markdown table and an SVG chart.
    Report(render::ReportArgs),
    /// A plain byte echo on a Unix socket: the backend nginx, HAProxy and the baseline use.
    UnixEcho(unix_echo::UnixEchoArgs),
    /// Echo backend on NATS for the bridge relay bench (answers each frame with a send).
    #[command(hide = true)]
    NatsEcho(nats_echo::NatsEchoArgs),
    /// One child process of `idle` (started by `idle` itself).
    #[command(hide = true)]
    IdleWorker(idle_worker::WorkerArgs),
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs { dir: std::path::PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::GenCert(args) => certs::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::Idle(args) => idle::run(args),
        Cmd::Echo(args) => echo::run(args),
        Cmd::Fanout(args) => fanout::run(args),
        Cmd::Handshake(args) => handshake::run(args),
        Cmd::Storm(args) => storm::run(args),
        Cmd::Ceiling(args) => ceiling::run(args),
        Cmd::Report(args) => render::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::UnixEcho(args) => unix_echo::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::NatsEcho(args) => nats_echo::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::IdleWorker(args) => idle_worker::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::GenerateDocs { dir } => holdfast_clidocs::write(Cli::command(), &dir)
            .map(|_| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    result.unwrap_or_else(|e| {
        eprintln!("holdfast-bench: {e:#}");
        ExitCode::FAILURE
    })
}
