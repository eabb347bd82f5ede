//! Admission control against real clients: a slowloris from one address is held to its
//! cap while other addresses are served at once; a core at its handshake caps keeps new
//! connections waiting, unread, and refuses them when the wait is over; the process cap
//! refuses at accept; a reconnect storm is let in at the handshake rate.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use common::{gateway_args, ClientOptions, Gateway, Pki, TestDir, Worker, IO_TIMEOUT};
use socket2::{Domain, Socket, Type};

/// The tests of this file run one at a time: each one bursts connections at a listener,
/// and the storm asserts that no accept queue overflowed, which the kernel counts for the
/// whole network namespace (TcpExt ListenOverflows), not per listener. Another test's
/// burst at its own debug-build gateway would otherwise count against the storm.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A gateway with an echo worker and a config file holding `limits` (TOML lines of the
/// `[limits]` table), plus `extra` flags.
struct Limited {
    gateway: Gateway,
    _worker: Worker,
    pki: Pki,
    dir: TestDir,
}

fn start(limits: &str, extra: &[&str]) -> Limited {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let config = dir.write("gateway.toml", format!("[limits]\n{limits}\n"));
    let config = config.to_str().expect("utf-8 path").to_owned();
    let mut flags = vec!["--config", config.as_str()];
    flags.extend_from_slice(extra);
    let gateway = Gateway::start(&dir, gateway_args(&pki, &[&worker.socket], &flags));
    Limited {
        gateway,
        _worker: worker,
        pki,
        dir,
    }
}

/// A TCP connection from `source` that sends nothing.
fn silent_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddrV4::new(source, 0).into())?;
    s.connect_timeout(&to.into(), IO_TIMEOUT)?;
    Ok(s.into())
}

#[test]
fn a_slowloris_from_one_address_is_held_to_its_cap_and_others_get_in_at_once() {
    let _serial = one_at_a_time();
    const CAP: usize = 64;
    const SILENT: usize = 3_000;
    let g = start(&format!("max_conns_per_ip = {CAP}"), &[]);
    let attacker = Ipv4Addr::new(127, 0, 0, 66);
    let mut held = Vec::with_capacity(SILENT);
    for i in 0..SILENT {
        match silent_from(attacker, g.gateway.listen) {
            Ok(s) => held.push(s),
            Err(e) => panic!("slowloris connection {i} could not even connect: {e}"),
        }
    }
    // Every connection past the cap is closed at accept, before any TLS.
    let m = g
        .gateway
        .wait_for_metrics("every connection past the cap refused and freed", |m| {
            // A refused connection stays in the open gauge until its Close completes.
            m.sum("holdfast_closes_total", &[("reason", "ip_limit")]) >= (SILENT - CAP) as f64
                && m.sum("holdfast_connections_open", &[]) <= CAP as f64
        });
    assert_eq!(
        m.sum("holdfast_closes_total", &[("reason", "ip_limit")]),
        (SILENT - CAP) as f64
    );
    assert_eq!(m.sum("holdfast_connections_open", &[]), CAP as f64);
    assert_eq!(m.sum("holdfast_handshakes_total", &[]), 0.0);

    // Another address connects and echoes at once, while the attacker's 64 are held.
    let started = Instant::now();
    let mut c = g.gateway.client(&g.pki);
    c.echo(b"not the attacker");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a client from another address waited {:?}",
        started.elapsed()
    );
    // The attacker's next one is still refused; once its connections go, it may connect.
    let before = g.gateway.close_count("ip_limit");
    let _one_more = silent_from(attacker, g.gateway.listen).expect("connect");
    g.gateway.wait_for_close_reason("ip_limit", before);
    drop(held);
    g.gateway
        .wait_for_metrics("the attacker's connections gone", |m| {
            m.sum("holdfast_connections_open", &[]) == 1.0
        });
    let bound = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    bound
        .bind(&SocketAddrV4::new(attacker, 0).into())
        .expect("bind");
    bound
        .connect_timeout(&g.gateway.listen.into(), IO_TIMEOUT)
        .expect("connect");
    let tcp: TcpStream = bound.into();
    let mut again = common::Client::connect_over(tcp, &ClientOptions::new(&g.pki))
        .expect("the attacker's address is served again below its cap");
    again.echo(b"back under the cap");
    c.echo(b"still here");
    drop(g.dir);
}

#[test]
fn a_core_at_its_handshake_caps_keeps_newcomers_waiting_then_refuses_them() {
    let _serial = one_at_a_time();
    // One handshake in progress per core; a silent connection holds it until the
    // handshake timeout (2 s). Newcomers wait 500 ms, unread, then are refused.
    let g = start(
        "handshakes_in_progress_per_core = 1\nhandshake_wait_ms = 500\nmax_conns_per_ip = 0",
        &["--handshake-timeout", "2"],
    );
    // Enough silent connections that both cores have one in progress (SO_REUSEPORT
    // spreads them by port); the rest wait and are refused.
    let silent: Vec<TcpStream> = (0..16)
        .map(|i| silent_from(Ipv4Addr::new(127, 0, 1, i + 1), g.gateway.listen).expect("connect"))
        .collect();
    let m = g
        .gateway
        .wait_for_metrics("both cores at their in-progress cap", |m| {
            m.sum("holdfast_handshakes_in_progress", &[]) == 2.0
        });
    assert!(m.sum("holdfast_handshakes_queued_total", &[]) >= 1.0);
    let refused = g.gateway.wait_for_sum_at_least(
        "holdfast_closes_total",
        &[("reason", "handshake_overload")],
        14.0,
    );
    assert_eq!(refused, 14.0, "all but the two in progress refused");

    // A real client now waits too, and is refused rather than served late.
    let started = Instant::now();
    let r = common::Client::connect(g.gateway.listen, &ClientOptions::new(&g.pki));
    if r.is_ok() {
        // It found a core whose silent connection had just timed out: legitimate.
        assert!(g.gateway.close_count("handshake_timeout") >= 1.0);
    } else {
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "refused after {:?}, before its wait",
            started.elapsed()
        );
    }
    // Once the silent ones time out, handshakes start at once again.
    g.gateway.wait_for_sum_at_least(
        "holdfast_closes_total",
        &[("reason", "handshake_timeout")],
        2.0,
    );
    g.gateway.wait_for_metrics("no handshake in progress", |m| {
        m.sum("holdfast_handshakes_in_progress", &[]) == 0.0
    });
    let mut c = g.gateway.client(&g.pki);
    c.echo(b"served once the caps free");
    drop(silent);
}

#[test]
fn the_process_cap_refuses_at_accept() {
    let _serial = one_at_a_time();
    let g = start("max_conns = 3", &[]);
    let mut clients: Vec<_> = (0..3).map(|_| g.gateway.client(&g.pki)).collect();
    for c in &mut clients {
        c.echo(b"under the cap");
    }
    let r = common::Client::connect(g.gateway.listen, &ClientOptions::new(&g.pki));
    assert!(r.is_err(), "a fourth connection got past max_conns = 3");
    g.gateway
        .wait_for_sum_at_least("holdfast_closes_total", &[("reason", "process_limit")], 1.0);
    clients.pop().expect("a client").close();
    g.gateway.wait_for_metrics("a place free", |m| {
        m.sum("holdfast_connections_open", &[]) == 2.0
    });
    let mut c = g.gateway.client(&g.pki);
    c.echo(b"a place was free");
}

/// The load generator, built into the same directory as the gateway
/// (`cargo build --workspace --bins`, as scripts/test.sh does).
fn bench_bin() -> std::path::PathBuf {
    let path = common::gateway_bin().with_file_name("holdfast-bench");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

fn json_u64(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v}"))
}

#[test]
fn a_reconnect_storm_is_let_in_at_the_handshake_rate() {
    let _serial = one_at_a_time();
    const CLIENTS: u64 = 15_000;
    const RATE_PER_CORE: u64 = 600;
    let g = start(
        &format!(
            "handshakes_per_sec_per_core = {RATE_PER_CORE}\nhandshake_wait_ms = 20000\nmax_conns_per_ip = 0"
        ),
        // The storm needs 15 000 / 1 200 = 12.5 s: everyone may wait that long.
        &["--handshake-timeout", "30"],
    );
    let json = g.dir.join("storm.json");
    let ca = &g.pki.ca_pem;
    let mut cmd = std::process::Command::new(bench_bin());
    cmd.args(["storm", "--target"])
        .arg(g.gateway.listen.to_string())
        .arg("--ca")
        .arg(ca)
        .args(["--conns", &CLIENTS.to_string(), "--threads", "2"])
        .args([
            "--connect-rate",
            "1200",
            "--timeout",
            "40",
            "--settle",
            "0.5",
        ])
        .args(["--sources", "127.0.2.1-127.0.2.60", "--server-cores", "2"])
        .arg("--server-pids")
        .arg(g.gateway.pid().to_string())
        .arg("--json")
        .arg(&json);
    let (stdout, stderr) = (g.dir.join("storm.stdout"), g.dir.join("storm.stderr"));
    let mut child = common::ChildGuard::new(
        cmd.stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn holdfast-bench"),
    );
    let status = child.wait_timeout(Duration::from_secs(150));
    eprintln!(
        "--- storm stdout\n{}--- storm stderr\n{}",
        common::file_tail(&stdout, 8192),
        common::file_tail(&stderr, 8192)
    );
    assert!(status.is_some(), "the storm ran past 150 s");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("storm report")).expect("json");
    let r = &report["results"];
    eprintln!("storm results: {r:#}");
    assert_eq!(
        json_u64(r, &["connected"]),
        CLIENTS,
        "everyone connected first"
    );
    assert_eq!(json_u64(r, &["back"]), CLIENTS, "everyone came back");
    assert_eq!(
        json_u64(r, &["listen_overflows"]),
        0,
        "accept queue overflowed"
    );
    let secs = r["recovery_secs"].as_f64().expect("recovery time");
    let m = g.gateway.metrics();
    // Full handshakes over the storm cannot have gone faster than the cap: the bucket
    // holds a tenth of a second per core, so the storm needs at least this long.
    let full = json_u64(r, &["full"]) as f64;
    let cap = (RATE_PER_CORE * 2) as f64;
    assert!(
        secs >= (full - cap / 10.0) / cap * 0.95,
        "{full} full handshakes in {secs:.2} s: faster than {cap}/s"
    );
    assert!(m.sum("holdfast_handshakes_queued_total", &[]) > 0.0);
    assert_eq!(
        m.sum("holdfast_closes_total", &[("reason", "handshake_overload")]),
        0.0
    );
    eprintln!(
        "storm: {CLIENTS} clients back in {secs:.2} s, {:.0} full handshakes/s held (cap {cap}/s)",
        full / secs
    );
}
