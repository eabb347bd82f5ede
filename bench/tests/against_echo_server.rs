//! Runs the real `holdfast-bench` binary against a small TLS frame-echo server inside the
//! test process, standing in for a gateway: the test process's own pid is the "gateway"
//! whose memory `idle` samples. This checks the whole client side (certificates, child
//! processes, line protocol, reports, exit codes) without needing the gateway itself.
//!
//! Every run is bounded by the binary's own timeouts and by a kill deadline here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast-bench");

/// How the stand-in gateway treats its connections.
#[derive(Clone, Copy)]
enum Mode {
    /// Echo every DATA frame.
    Echo,
    /// Echo, but close every `n`-th connection with a CLOSE frame right after its first
    /// echo, as a gateway that loses idle connections would.
    DropEvery(u64),
}

/// A scratch directory removed when the test ends, passed or failed.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("holdfast-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary with `args`, killing it if it outlives `limit`.
fn run_bin(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("holdfast-bench {args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "holdfast-bench {args:?}\n--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A scratch directory holding a fresh CA and server certificate from `gen-cert`.
fn cert_dir(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    gen_cert(&dir);
    dir
}

fn gen_cert(dir: &Path) {
    let out = run_bin(
        &["gen-cert", "--out", dir.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
}

/// Starts the stand-in gateway on an ephemeral loopback port in a runtime of its own.
fn serve(dir: &Path, mode: Mode) -> (SocketAddr, Arc<AtomicU64>, tokio::runtime::Runtime) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![frame::ALPN.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let n = count.fetch_add(1, Ordering::Relaxed) + 1;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut fb = FrameBuf::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(got) = tls.read(&mut buf).await else {
                        return;
                    };
                    if got == 0 {
                        return;
                    }
                    fb.push(&buf[..got]);
                    let mut out = Vec::new();
                    while let Ok(Some(f)) = fb.next(frame::DEFAULT_MAX_PAYLOAD) {
                        match f {
                            OwnedFrame::Data(p) => frame::encode(FrameType::Data, &p, &mut out),
                            OwnedFrame::Ping(p) => frame::encode(FrameType::Pong, &p, &mut out),
                            _ => {}
                        }
                    }
                    if let Mode::DropEvery(every) = mode {
                        if n % every == 0 {
                            frame::encode_close(frame::close_code::IDLE_TIMEOUT, "test", &mut out);
                        }
                    }
                    if tls.write_all(&out).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                    if matches!(mode, Mode::DropEvery(e) if n % e == 0) {
                        let _ = tls.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted, rt)
}

/// Runs `holdfast-bench SCENARIO --target TARGET --ca DIR/ca.pem FLAGS... --json JSON`.
fn run_scenario(
    scenario: &str,
    target: &str,
    dir: &Path,
    flags: &[&str],
    json: &Path,
    limit: Duration,
) -> Output {
    let ca = dir.join("ca.pem");
    let mut args = vec![scenario, "--target", target, "--ca", ca.to_str().unwrap()];
    args.extend_from_slice(flags);
    args.extend(["--json", json.to_str().unwrap()]);
    run_bin(&args, limit)
}

/// Runs `idle` with `flags`, measuring the test process as the gateway.
fn run_idle(target: &str, dir: &Path, flags: &[&str], json: &Path, limit: Duration) -> Output {
    let me = std::process::id().to_string();
    let mut flags = flags.to_vec();
    flags.extend(["--gateway-pid", &me]);
    run_scenario("idle", target, dir, &flags, json, limit)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn idle_holds_measures_and_echoes() {
    let dir = cert_dir("idle");
    let (addr, accepted, _rt) = serve(&dir, Mode::Echo);
    let json = dir.join("idle.json");
    let out = run_idle(
        &addr.to_string(),
        &dir,
        &[
            "--conns", "300", "--steps", "100,300", "--procs", "2", "--rate", "1000", "--settle",
            "0.2",
        ],
        &json,
        Duration::from_secs(120),
    );
    assert!(out.status.success());
    assert_eq!(accepted.load(Ordering::Relaxed), 300);
    let v = read_json(&json);
    assert_eq!(v["scenario"], "idle");
    assert_eq!(v["parameters"]["procs"], 2);
    assert_eq!(v["parameters"]["source_count"], 253);
    assert_eq!(v["parameters"]["steps"], serde_json::json!([100, 300]));
    let r = &v["results"];
    assert_eq!(r["ok"], true);
    assert_eq!(r["echo_ok"], 300);
    assert_eq!(r["echo_failed"], 0);
    assert_eq!(r["conns_opened"], 300);
    assert_eq!(r["steps"][0]["conns_open"], 100);
    assert_eq!(r["steps"][1]["conns_open"], 300);
    assert!(r["steps"][1]["gateway_pss_bytes"].as_u64().unwrap() > 0);
    assert!(r["userspace_bytes_per_conn"].is_number());
    assert!(r["kernel_bytes_per_conn"].is_number());
    assert!(v["method"]["kernel"].as_str().unwrap().contains("sockstat"));
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["versions"]["holdfast_bench"].is_string());
}

#[test]
fn idle_reports_connections_the_gateway_drops() {
    let dir = cert_dir("drops");
    let (addr, _, _rt) = serve(&dir, Mode::DropEvery(10));
    let json = dir.join("idle.json");
    let out = run_idle(
        &addr.to_string(),
        &dir,
        &["--conns", "50", "--settle", "0"],
        &json,
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "dropped connections must fail the run"
    );
    let r = &read_json(&json)["results"];
    assert_eq!(r["ok"], false);
    // The CLOSE comes with the first echo, so whether a connection fails its first echo
    // or is dropped right after it is a race; either way 5 of 50 are lost.
    let lost = r["first_echo_failed"].as_u64().unwrap() + r["dropped_while_idle"].as_u64().unwrap();
    assert_eq!(lost, 5, "{r}");
    assert_eq!(r["echo_ok"], 45);
}

#[test]
fn idle_then_run_probes_while_a_command_runs() {
    let dir = cert_dir("then-run");
    let (addr, accepted, _rt) = serve(&dir, Mode::Echo);
    let json = dir.join("idle.json");
    let marker = dir.join("ran");
    let command = format!("sleep 0.5 && touch {}", marker.display());
    let out = run_idle(
        &addr.to_string(),
        &dir,
        &[
            "--conns",
            "40",
            "--steps",
            "20,40",
            "--settle",
            "0",
            "--probes",
            "3",
            "--then-run",
            &command,
        ],
        &json,
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(marker.exists(), "the command ran");
    assert_eq!(accepted.load(Ordering::Relaxed), 43, "40 held and 3 probes");
    let r = &read_json(&json)["results"];
    assert_eq!(r["echo_ok"], 40);
    let t = &r["then_run"];
    assert_eq!(t["exit_code"], 0);
    assert!(t["secs"].as_f64().unwrap() >= 0.5, "{t}");
    assert_eq!(t["probes"]["conns"], 3);
    assert_eq!(t["probes"]["failed"], 0);
    // The probes echo back to back from half a second before the command until half a
    // second after it.
    assert!(t["probes"]["round_trips"].as_u64().unwrap() > 30, "{t}");
    let longest = t["probes"]["longest_round_trip_ms"].as_f64().unwrap();
    assert!(longest > 0.0 && longest < 30_000.0, "{t}");

    // A command that fails fails the run, and the report says how it exited.
    let out = run_idle(
        &addr.to_string(),
        &dir,
        &[
            "--conns",
            "10",
            "--settle",
            "0",
            "--probes",
            "1",
            "--then-run",
            "exit 3",
        ],
        &json,
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let r = &read_json(&json)["results"];
    assert_eq!(r["ok"], false);
    assert_eq!(r["then_run"]["exit_code"], 3);
    assert_eq!(r["echo_ok"], 10, "the held connections still echo");
}

#[test]
fn idle_then_run_counts_probes_the_gateway_drops() {
    let dir = cert_dir("then-run-drop");
    // Every connection is closed after its first echo: each probe fails on its second.
    let (addr, _, _rt) = serve(&dir, Mode::DropEvery(1));
    let json = dir.join("idle.json");
    let out = run_idle(
        &addr.to_string(),
        &dir,
        &[
            "--conns",
            "2",
            "--settle",
            "0",
            "--probes",
            "2",
            "--then-run",
            "true",
        ],
        &json,
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let t = &read_json(&json)["results"]["then_run"];
    assert_eq!(t["probes"]["failed"], 2, "{t}");
    let why = t["probes"]["failures"][0].as_str().unwrap();
    assert!(
        why.contains("closed") || why.contains("reset") || why.contains("eof"),
        "{why}"
    );
}

#[test]
fn idle_fails_fast_when_nothing_listens() {
    let dir = cert_dir("refused");
    // Bind and drop to find a port with nothing on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let json = dir.join("idle.json");
    let out = run_idle(
        &format!("127.0.0.1:{port}"),
        &dir,
        &["--conns", "20", "--settle", "0"],
        &json,
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let r = &read_json(&json)["results"];
    assert_eq!(r["connect_failed"], 20);
    assert_eq!(r["echo_ok"], 0);
}

#[test]
fn echo_reports_rate_and_latency() {
    let dir = cert_dir("echo");
    let (addr, _, _rt) = serve(&dir, Mode::Echo);
    let json = dir.join("echo.json");
    let out = run_scenario(
        "echo",
        &addr.to_string(),
        &dir,
        &[
            "--conns",
            "4",
            "--size",
            "64",
            "--rate",
            "2000",
            "--duration",
            "1",
        ],
        &json,
        Duration::from_secs(60),
    );
    assert!(out.status.success());
    let v = read_json(&json);
    assert_eq!(v["scenario"], "echo");
    let r = &v["results"];
    assert_eq!(r["ok"], true);
    assert_eq!(r["frames_scheduled"], 2000);
    assert_eq!(r["frames_received"], 2000);
    assert_eq!(r["frames_lost"], 0);
    let l = &r["latency"];
    assert_eq!(l["count"], 2000);
    assert!(l["p50_us"].as_u64().unwrap() > 0);
    assert!(l["p50_us"].as_u64() <= l["p99_us"].as_u64());
    assert!(l["p99_us"].as_u64() <= l["p999_us"].as_u64());
    assert!(l["p999_us"].as_u64() <= l["max_us"].as_u64());
}

#[test]
fn handshake_counts_connections_and_server_cpu() {
    let dir = cert_dir("handshake");
    let (addr, accepted, _rt) = serve(&dir, Mode::Echo);
    let me = std::process::id().to_string();
    for resume in [false, true] {
        let json = dir.join(format!("hs-{resume}.json"));
        let mut flags = vec![
            "--conns-parallel",
            "4",
            "--duration",
            "0.5",
            "--server-pids",
            &me,
            "--server-cores",
            "2",
            "--label",
            "stand-in",
        ];
        if resume {
            flags.push("--resume");
        }
        let out = run_scenario(
            "handshake",
            &addr.to_string(),
            &dir,
            &flags,
            &json,
            Duration::from_secs(60),
        );
        assert!(out.status.success());
        let v = read_json(&json);
        assert_eq!(v["scenario"], "handshake");
        assert_eq!(v["label"], "stand-in");
        assert_eq!(v["parameters"]["resume"], resume);
        let r = &v["results"];
        assert_eq!(r["ok"], true);
        let n = r["handshakes"].as_u64().unwrap();
        assert!(n > 0);
        assert_eq!(
            r["full"].as_u64().unwrap() + r["resumed"].as_u64().unwrap(),
            n
        );
        if resume {
            // The stand-in keeps rustls' default session cache, so tickets are honoured.
            assert!(r["resumed"].as_u64().unwrap() > 0, "{r}");
        } else {
            assert_eq!(r["resumed"], 0);
        }
        let rate = r["handshakes_per_sec"].as_f64().unwrap();
        let per_core = r["handshakes_per_sec_per_core"].as_f64().unwrap();
        assert!((rate / 2.0 - per_core).abs() < 1e-6);
        assert_eq!(r["server_cpu"]["cores"], 2);
        assert_eq!(r["server_cpu"]["ops"], n);
        assert!(r["server_cpu"]["pids"][0].as_u64().unwrap() == std::process::id() as u64);
        assert!(r["server_cpu_us_per_handshake"].is_number());
        assert_eq!(r["kx_group"], "X25519");
        assert!(v["method"].as_str().unwrap().contains("/proc/PID/stat"));
    }
    assert!(accepted.load(Ordering::Relaxed) > 8);
}

#[test]
fn storm_brings_every_client_back() {
    let dir = cert_dir("storm");
    let (addr, accepted, _rt) = serve(&dir, Mode::Echo);
    let json = dir.join("storm.json");
    let out = run_scenario(
        "storm",
        &addr.to_string(),
        &dir,
        &[
            "--conns",
            "60",
            "--resume",
            "--settle",
            "0.1",
            "--server-pids",
            &std::process::id().to_string(),
        ],
        &json,
        Duration::from_secs(60),
    );
    assert!(out.status.success());
    let r = &read_json(&json)["results"];
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["connected"], 60);
    assert_eq!(r["back"], 60);
    assert_eq!(r["all_back"], true);
    assert!(r["recovery_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(r["reconnect_latency"]["count"], 60);
    assert!(r["resumed"].as_u64().unwrap() > 0);
    assert!(r["listen_overflows"].is_u64());
    assert!(r["listen_scope"].as_str().unwrap().contains("machine-wide"));
    assert_eq!(accepted.load(Ordering::Relaxed), 120);
}

#[test]
fn ceiling_report_and_unix_echo() {
    let dir = TempDir::new("ceiling");
    let json = dir.join("ceiling.json");
    let out = run_bin(
        &[
            "ceiling",
            "--seconds",
            "0.2",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success());
    let v = read_json(&json);
    let r = &v["results"];
    assert!(r["full"]["handshakes"].as_u64().unwrap() > 0);
    assert_eq!(r["full"]["resumed"], 0);
    let resumed = &r["resumed"];
    assert_eq!(resumed["resumed"], resumed["handshakes"]);
    assert!(r["full"]["server_us_per_handshake"].as_f64().unwrap() > 1.0);
    assert!(r["records"]["server_us_per_record_pair"].as_f64().unwrap() > 0.0);
    assert_eq!(r["kx_group"], "X25519");

    // The report renders the ceiling's row, and an SVG chart.
    let svg = dir.join("chart.svg");
    let out = run_bin(
        &[
            "report",
            "--svg",
            svg.to_str().unwrap(),
            json.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| rustls alone (in memory) |"), "{table}");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));

    // unix-echo sends back exactly what it gets.
    let sock = dir.join("echo.sock");
    let mut child = Command::new(BIN)
        .args(["unix-echo", "--socket", sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        assert!(Instant::now() < deadline, "unix-echo did not listen");
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::io::{Read, Write};
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut wire = Vec::new();
    frame::encode(FrameType::Data, b"through a byte echo", &mut wire);
    stream.write_all(&wire).unwrap();
    let mut back = vec![0; wire.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, wire);
    let _ = child.kill();
    let _ = child.wait();
}

/// A TLS server that only handshakes (and then drops the connection), with `config`.
fn serve_handshakes(config: rustls::ServerConfig) -> (SocketAddr, tokio::runtime::Runtime) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    (addr, rt)
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> rustls::ServerConfig {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// gen-cert's certificate and key in `dir`.
fn gen_cert_pair(dir: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (
        certs,
        PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap(),
    )
}

/// Runs a short handshake benchmark that must fail, and returns its stderr, checked to
/// name `reason` exactly once although every one of its connections failed.
fn handshakes_fail_once_with(addr: SocketAddr, ca: &Path, extra: &[&str], reason: &str) -> String {
    let target = addr.to_string();
    let json = ca.with_extension("json");
    let mut args = vec![
        "handshake",
        "--target",
        &target,
        "--ca",
        ca.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--conns-parallel",
        "4",
        "--duration",
        "0.5",
    ];
    args.extend_from_slice(extra);
    let out = run_bin(&args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "every handshake failed: {stderr}");
    assert_eq!(
        stderr.matches(reason).count(),
        1,
        "want {reason:?} once:\n{stderr}"
    );
    assert!(
        !stderr.contains("handshake: TLS error"),
        "an unexplained failure:\n{stderr}"
    );
    stderr
}

#[test]
fn handshake_failures_name_their_reason_once_with_a_fix() {
    // A self-signed CA:TRUE certificate served as the server's own (what `openssl req
    // -x509` makes), trusted as its own CA.
    let dir = cert_dir("why");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_leaf = params.self_signed(&key).unwrap();
    let ca_leaf_pem = dir.join("ca-leaf.pem");
    std::fs::write(&ca_leaf_pem, ca_leaf.pem()).unwrap();
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let (addr, _rt) = serve_handshakes(server_config(
        vec![ca_leaf.der().clone()],
        key_der,
        frame::ALPN,
    ));
    let stderr = handshakes_fail_once_with(
        addr,
        &ca_leaf_pem,
        &[],
        "presents a CA certificate (basicConstraints CA:TRUE) as its own",
    );
    assert!(
        stderr.contains("fix: serve a certificate signed by a CA"),
        "{stderr}"
    );

    // gen-cert's pair, but a foreign CA given, then another gen-cert CA (the same name,
    // another key), then the wrong name.
    let (certs, key) = gen_cert_pair(&dir);
    let (addr, _rt2) = serve_handshakes(server_config(certs.clone(), key, frame::ALPN));
    let other = cert_dir("why-other");
    handshakes_fail_once_with(addr, &ca_leaf_pem, &[], "(unknown issuer)");
    handshakes_fail_once_with(addr, &other.join("ca.pem"), &[], "(bad signature");
    handshakes_fail_once_with(
        addr,
        &dir.join("ca.pem"),
        &["--server-name", "other.example"],
        "is not valid for \"other.example\"",
    );

    // A server that speaks another ALPN protocol only.
    let (_, key) = gen_cert_pair(&dir);
    let (addr, _rt3) = serve_handshakes(server_config(certs, key, b"h2"));
    handshakes_fail_once_with(
        addr,
        &dir.join("ca.pem"),
        &[],
        "shares no ALPN protocol with the load generator",
    );
}
