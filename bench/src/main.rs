//! holdfast-bench: the load generator that proves holdfast's numbers. It makes
//! throw-away certificates, holds tens of thousands of idle TLS connections while
//! measuring what each costs the gateway and the kernel, and relays frames at a fixed
//! open-loop rate to measure latency.
//!
//! It is a client on tokio and tokio-rustls, deliberately outside the gateway's io_uring
//! data plane, so what it measures is the gateway and not a shared runtime. Reports are
//! JSON files whose field names are described in `report`; the human summary on stdout
//! is for people, the JSON for tools.
#![deny(unsafe_code)]

mod certs;
mod client;
mod echo;
mod idle;
mod idle_worker;
mod plan;
mod procfs;
mod proto;
mod report;
mod sys;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Relay frames at a fixed open-loop rate and measure latency.
    Echo(echo::EchoArgs),
    /// One child process of `idle` (started by `idle` itself).
    #[command(hide = true)]
    IdleWorker(idle_worker::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::GenCert(args) => certs::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::Idle(args) => idle::run(args),
        Cmd::Echo(args) => echo::run(args),
        Cmd::IdleWorker(args) => idle_worker::run(args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("holdfast-bench: {e:#}");
        ExitCode::FAILURE
    })
}
