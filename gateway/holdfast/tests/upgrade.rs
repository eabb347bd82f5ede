//! Live upgrade: a running gateway hands its listener and every established TLS
//! connection to a new process (`holdfast upgrade`, SIGUSR2). Clients keep their TCP
//! connections and TLS sessions (no new handshake), frames arrive once and in order, the
//! worker sees no CLOSE and no OPEN for a moved connection, counters continue; a new
//! binary that exits or hangs leaves the old process serving.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use holdfast_wire::frame::{FrameType, OwnedFrame};

/// The pid in `path`, once it holds one.
fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Running, not exited (an exited child of this test stays a zombie until reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z') || s.starts_with('X'))
        }
        Err(_) => false,
    }
}

/// Kills the processes a test's upgrades started (the first is the harness's child).
struct Successors(Vec<i32>);

impl Drop for Successors {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: plain kill(2) of a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Signals the gateway in `pid_file` to upgrade and waits until the file names a new
/// process and the old one has exited; returns the new pid.
fn upgrade(pid_file: &Path, gateway_stderr: &Path) -> i32 {
    let old = read_pid(pid_file).expect("a pid file");
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(old, libc::SIGUSR2) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = read_pid(pid_file).expect("a pid file");
        if now != old && !alive(old) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "upgrade of {old} did not finish (pid file says {now})\n{}",
            file_tail(gateway_stderr, 16384)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gateway_with_pid_file(
    dir: &TestDir,
    pki: &Pki,
    worker: &Path,
    extra: &[&str],
) -> (Gateway, PathBuf) {
    let pid_file = dir.join("holdfast.pid");
    let pid_arg = pid_file.to_str().expect("utf-8").to_owned();
    let mut args: Vec<&str> = vec!["--pid-file", &pid_arg, "--max-conns-per-ip", "0"];
    args.extend_from_slice(extra);
    let g = Gateway::start(dir, gateway_args(pki, &[worker], &args));
    (g, pid_file)
}

#[test]
fn established_connections_survive_an_upgrade() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let (gateway, pid_file) =
        gateway_with_pid_file(&dir, &pki, &worker.socket, &["--hibernate-after", "1"]);
    let mut started = Successors(Vec::new());
    let opts = ClientOptions::new(&pki);
    let mut clients: Vec<Client> = (0..50)
        .map(|_| Client::connect(gateway.listen, &opts).expect("connect"))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&payload("before", i, 30));
    }
    let new = upgrade(&pid_file, &gateway.stderr);
    started.0.push(new);
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(FrameType::Data, &payload("after", i + round, 30));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(
                c.recv(),
                OwnedFrame::Data(payload("after", i + round, 30)),
                "client {i}"
            );
        }
    }
    let m = Metrics::parse(&http_get(gateway.admin, "/metrics").expect("metrics").1);
    assert_eq!(m.sum("holdfast_upgrades_total", &[("result", "ok")]), 1.0);
    assert_eq!(m.sum("holdfast_connections_open", &[]), 50.0);
    assert!(m.sum("holdfast_handshakes_total", &[("result", "ok")]) >= 50.0);
}
