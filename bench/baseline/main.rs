//! `holdfast-baseline`: the TLS terminator a Rust engineer writes first, as the baseline
//! holdfast is compared with. tokio's multi-threaded runtime, tokio-rustls (ring provider,
//! TLS 1.3, ALPN `holdfast/1`, rustls' default session cache and tickets), and for every
//! client one task that completes the handshake, dials the Unix-socket backend and runs
//! `tokio::io::copy_bidirectional` between the two until either side closes.
//!
//! Like nginx stream and HAProxy, and unlike holdfast, it opens one backend connection per
//! client and holds, per connection, a task, the buffered rustls connection (with its
//! receive buffer) and the two 8 KiB buffers of `copy_bidirectional`. It is deliberately
//! the straightforward version: no tuning beyond what the defaults give.
//!
//! It prints `holdfast-baseline ready listen=ADDR threads=N` when it accepts and exits on
//! SIGTERM or SIGINT.
#![deny(unsafe_code)]

#[allow(dead_code)]
#[path = "../src/sys.rs"]
mod sys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_rustls::TlsAcceptor;

/// A tokio + tokio-rustls TLS terminator forwarding to a Unix-socket backend.
#[derive(Debug, Parser)]
#[command(name = "holdfast-baseline", version)]
struct Args {
    /// Address to accept TLS clients on (port 0 picks one; the ready line names it).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    cert: PathBuf,
    /// Private key (PEM).
    #[arg(long, value_name = "PEM")]
    key: PathBuf,
    /// Unix socket of the backend every client is forwarded to.
    #[arg(long, value_name = "PATH")]
    backend: PathBuf,
    /// Runtime worker threads [default: the CPUs this process may run on].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Listen backlog.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    backlog: u32,
}

fn tls_config(args: &Args) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.cert)
        .with_context(|| format!("reading {}", args.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", args.cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate in it", args.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .with_context(|| format!("reading the key in {}", args.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("certificate and key")?;
    config.alpn_protocols = vec![b"holdfast/1".to_vec()];
    Ok(Arc::new(config))
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast-baseline: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    sys::raise_nofile_limit().context("raising the open-file limit")?;
    let acceptor = TlsAcceptor::from(tls_config(&args)?);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let socket = match args.listen {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(args.listen)?;
        let listener: TcpListener = socket.listen(args.backlog)?;
        println!(
            "holdfast-baseline ready listen={} threads={threads}",
            listener.local_addr()?
        );
        let backend = Arc::new(args.backend);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut errors = 0u64;
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        let (acceptor, backend) = (acceptor.clone(), backend.clone());
                        tokio::spawn(async move {
                            let _ = tcp.set_nodelay(true);
                            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                            let Ok(mut up) = UnixStream::connect(backend.as_path()).await else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                        });
                    }
                    Err(e) => {
                        errors += 1;
                        if errors.is_power_of_two() {
                            eprintln!("holdfast-baseline: accept: {e} ({errors} so far)");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    })
}
