//! What every measuring subcommand does around its measurement: checking its flags and
//! the server pids, starting the runtime, resolving source addresses, and writing the
//! JSON report and the exit code that follows from it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{ensure, Context};
use serde::Serialize;

use crate::plan;
use crate::procfs;

/// Fails with "`flag` must be positive" unless `value` is a positive, finite number.
pub fn ensure_positive(flag: &str, value: f64) -> anyhow::Result<()> {
    ensure!(value > 0.0 && value.is_finite(), "{flag} must be positive");
    Ok(())
}

/// Checks that the server processes exist before anything starts, so a wrong pid fails
/// at once rather than after the run; no pids: nothing to check.
pub fn check_server_pids(pids: &[u32]) -> anyhow::Result<()> {
    if !pids.is_empty() {
        procfs::process_tree(pids).with_context(|| format!("server pid(s) {pids:?}"))?;
    }
    Ok(())
}

/// The multi-threaded tokio runtime the clients run on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Source addresses to bind client sockets to (see [`plan::resolve_sources`]).
pub struct Sources {
    /// The addresses as given (or defaulted), or `None` where sockets are not bound.
    pub spec: Option<String>,
    /// The addresses; empty where sockets are not bound.
    pub addrs: Vec<IpAddr>,
}

impl Sources {
    /// Resolves `--sources` for connections to `target`.
    pub fn resolve(spec: Option<&str>, target: SocketAddr) -> anyhow::Result<Sources> {
        let resolved =
            plan::resolve_sources(spec, target.ip().is_loopback()).map_err(anyhow::Error::msg)?;
        Ok(match resolved {
            Some((spec, addrs)) => Sources {
                spec: Some(spec),
                addrs,
            },
            None => Sources {
                spec: None,
                addrs: Vec::new(),
            },
        })
    }
}

/// Writes `report` to `path` as pretty-printed JSON with a trailing newline.
pub fn write_json(path: &Path, report: &impl Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// Success when the run was ok, failure otherwise.
pub fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
