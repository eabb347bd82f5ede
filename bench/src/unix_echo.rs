//! `holdfast-bench unix-echo`: a plain byte echo over a Unix stream socket, the backend the
//! peers (nginx stream, HAProxy, the tokio baseline) forward to. Those peers proxy bytes,
//! not frames: each client connection gets its own backend connection, and whatever the
//! client sends comes back unchanged, so holdfast's native frames echo through it intact
//! and the load generator cannot tell it from holdfast with its echo worker.
//!
//! One thread (a current-thread tokio runtime), one task per connection. It prints
//! `holdfast-bench unix-echo: listening on PATH` when it accepts, and exits on SIGTERM or
//! SIGINT, removing its socket file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

/// Arguments of `holdfast-bench unix-echo`.
#[derive(Debug, Args)]
pub struct UnixEchoArgs {
    /// Unix socket to listen on (a stale socket file there is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
}

/// Serves until SIGTERM or SIGINT.
pub fn run(args: UnixEchoArgs) -> anyhow::Result<()> {
    crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(&args.socket))?;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

async fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    println!("holdfast-bench unix-echo: listening on {}", path.display());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut errors = 0u64;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream));
                }
                Err(e) => {
                    // Out of descriptors, most likely: say so now and then, back off briefly.
                    errors += 1;
                    if errors.is_power_of_two() {
                        eprintln!("holdfast-bench unix-echo: accept: {e} ({errors} so far)");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn echo(mut stream: UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
