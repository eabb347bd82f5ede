//! Real peers a test needs from the machine (a browser, Python's `websockets`, `openssl`,
//! `nats-server`): what a test does when one is missing.
//!
//! A missing peer fails the test, naming the package that provides it, unless skipping
//! was asked for with `HOLDFAST_ALLOW_SKIP=1`. Then the test says `SKIPPED` on stderr,
//! appends a line to the file named by `HOLDFAST_SKIP_FILE` (scripts/test.sh counts those
//! lines as skipped tests and takes them off cargo's passed count) and returns early. A
//! test never passes without having run.
//!
//! Shared by the gateway's and the worker crate's integration tests (the latter include
//! this file with `#[path]`), so it uses nothing but std.
#![allow(dead_code)]

use std::io::Write;

/// Set to `1` to let tests whose peer is missing skip instead of failing.
pub const ALLOW_SKIP_VAR: &str = "HOLDFAST_ALLOW_SKIP";
/// A file that each skipped test appends one line to: `BINARY<TAB>TEST<TAB>WHAT`.
pub const SKIP_FILE_VAR: &str = "HOLDFAST_SKIP_FILE";

/// Whether skipping was asked for.
pub fn skip_allowed() -> bool {
    std::env::var_os(ALLOW_SKIP_VAR).is_some_and(|v| v == "1")
}

/// `what` (e.g. "/usr/bin/chromium") is not on this machine; `install` says how to get it
/// (e.g. "apt-get install chromium"). Panics, failing the test, unless skipping is
/// allowed; then records the skip and returns, and the caller returns without testing.
#[track_caller]
pub fn missing(what: &str, install: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed test>");
    if !skip_allowed() {
        panic!(
            "{test} needs {what}, which is missing: {install} (scripts/test.sh installs it \
             as root), or set {ALLOW_SKIP_VAR}=1 to skip the tests that need it"
        );
    }
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    eprintln!("SKIPPED: {test}: {what} is missing ({install})");
    if let Some(path) = std::env::var_os(SKIP_FILE_VAR) {
        let line = format!("{binary}\t{test}\t{what}\n");
        // One write of one short line to an O_APPEND file: lines from tests running in
        // parallel do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!(
                "{test}: cannot record the skip in {}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
}
