//! SIGHUP reloads certificates and limits without dropping connections: new handshakes get
//! the certificate now on disk, connections made before keep working, new limits apply,
//! a bad reload changes nothing, and settings fixed at start stay as they were.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    payload, Client, ClientOptions, Gateway, Metrics, Pki, Stack, TestDir, Worker, IO_TIMEOUT,
};
use holdfast_wire::frame::{close_code, FrameType};
use rustls::pki_types::CertificateDer;

const RELOADS: &str = "holdfast_config_reloads_total";

fn reloads(m: &Metrics, result: &str) -> f64 {
    m.sum(RELOADS, &[("result", result)])
}

/// Sends SIGHUP and waits until the reload counters read `ok` and `failed`.
fn sighup(gateway: &Gateway, ok: f64, failed: f64) -> Metrics {
    gateway.signal(libc::SIGHUP);
    gateway.wait_for_metrics(&format!("{RELOADS} ok={ok} failed={failed}"), |m| {
        reloads(m, "ok") == ok && reloads(m, "failed") == failed
    })
}

/// The end-entity certificate the gateway presented to `client`.
fn peer_leaf(client: &Client) -> CertificateDer<'static> {
    client
        .conn()
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the gateway presented a certificate")
        .clone()
        .into_owned()
}

/// Replaces the certificate and key files the gateway was started with by `with`'s.
fn overwrite_cert(at: &Pki, with: &Pki) {
    fs::copy(&with.cert, &at.cert).expect("overwrite the certificate");
    fs::copy(&with.key, &at.key).expect("overwrite the key");
}

/// A client that keeps TLS 1.3 session tickets, to see which handshakes resume.
fn resuming(pki: &Pki) -> std::sync::Arc<rustls::ClientConfig> {
    let mut config = (*ClientOptions::new(pki).config()).clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(8);
    std::sync::Arc::new(config)
}

/// Waits until the gateway's log contains `needle`.
fn wait_for_log(gateway: &Gateway, needle: &str) -> String {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let log = gateway.stderr_tail();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never logged {needle:?}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn new_certificates_serve_new_handshakes_and_old_connections_keep_echoing() {
    let stack = Stack::start(&[]);
    let gw = &stack.gateway;
    let before = gw.metrics();
    assert_eq!(reloads(&before, "ok"), 0.0);
    assert_eq!(
        before.sum("holdfast_config_last_reload_successful", &[]),
        1.0
    );
    let started = before.sum("holdfast_config_reload_timestamp_seconds", &[]);
    assert!(started > 1.6e9, "start time as the last load: {started}");

    let mut old = stack.client();
    old.echo(b"before the reload");
    assert_eq!(peer_leaf(&old), stack.pki.cert_der);

    // Certificate B: another CA, another key, written over the files of A.
    let dir_b = TestDir::new();
    let pki_b = Pki::generate(&dir_b);
    overwrite_cert(&stack.pki, &pki_b);
    std::thread::sleep(Duration::from_millis(20));
    let after = sighup(gw, 1.0, 0.0);
    assert_eq!(
        after.sum("holdfast_config_last_reload_successful", &[]),
        1.0
    );
    assert!(after.sum("holdfast_config_reload_timestamp_seconds", &[]) > started);
    let log = wait_for_log(gw, "config reloaded");
    assert!(
        log.contains("(new certificate)") && log.contains("no other setting changed"),
        "the reload line should say the certificate is new and nothing else changed:\n{log}"
    );

    // New handshakes get B, on every core.
    for i in 0..6 {
        let mut c = Client::connect(gw.listen, &ClientOptions::new(&pki_b))
            .unwrap_or_else(|e| panic!("client {i} trusting CA B: {e}"));
        assert_eq!(peer_leaf(&c), pki_b.cert_der, "client {i}");
        c.echo(&payload("b", i, 64));
        c.close();
    }
    let refused = Client::connect(gw.listen, &ClientOptions::new(&stack.pki));
    assert!(
        refused.is_err(),
        "a client trusting only CA A must refuse the reloaded certificate"
    );

    // The connection made before the reload still has A and still echoes.
    assert_eq!(peer_leaf(&old), stack.pki.cert_der);
    for i in 0..3 {
        old.echo(&payload("old", i, 256));
    }
    assert_eq!(reloads(&gw.metrics(), "failed"), 0.0);
    old.close();
}

#[test]
fn lower_max_frame_applies_after_sighup_and_tickets_from_before_still_resume() {
    let files = TestDir::new();
    let config = files.write("gateway.toml", "[limits]\nmax_frame = 65536\n");
    let config_arg = config.display().to_string();
    let stack = Stack::start(&["--config", &config_arg]);
    let gw = &stack.gateway;

    let tickets = resuming(&stack.pki);
    let mut old = Client::connect_with(gw.listen, tickets.clone(), "localhost").expect("connect");
    old.echo(&[b'a'; 4000]);

    files.write(
        "gateway.toml",
        "[limits]\nmax_frame = 1000\nidle_timeout_secs = 300\n",
    );
    sighup(gw, 1.0, 0.0);
    let log = wait_for_log(gw, "config reloaded");
    assert!(
        log.contains("limits.max_frame 65536 -> 1000")
            && log.contains("limits.idle_timeout_secs 600 -> 300"),
        "the reload line should name the changed limits:\n{log}"
    );

    let before = gw.close_count("frame_too_large");
    let mut new = stack.client();
    new.echo(&[b'b'; 1000]);
    new.send(FrameType::Data, &[b'c'; 1001]);
    new.expect_close_frame(close_code::TOO_LARGE, IO_TIMEOUT);
    gw.wait_for_close_reason("frame_too_large", before);

    // The connection from before is still open and relays frames under the new limit.
    old.echo(&[b'd'; 1000]);

    // A ticket issued before the reload resumes after it (the ticket key is kept).
    let resumed = Client::connect_with(gw.listen, tickets, "localhost").expect("reconnect");
    assert_eq!(
        resumed.conn().handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "a session ticket from before the reload should resume"
    );
    resumed.close();
    old.close();
}

#[test]
fn a_bad_reload_changes_nothing_and_is_counted_and_logged() {
    let files = TestDir::new();
    let good = "[limits]\nmax_frame = 2000\n";
    let config = files.write("gateway.toml", good);
    let config_arg = config.display().to_string();
    let stack = Stack::start(&["--config", &config_arg]);
    let gw = &stack.gateway;
    let pki = &stack.pki;
    let mut old = stack.client();
    old.echo(b"before");

    // A key that is not a key.
    let key_pem = fs::read(&pki.key).expect("read key");
    fs::write(
        &pki.key,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .expect("write bad key");
    let m = sighup(gw, 0.0, 1.0);
    assert_eq!(m.sum("holdfast_config_last_reload_successful", &[]), 0.0);
    let key_path = pki.key.display().to_string();
    wait_for_log(gw, &key_path);

    // The key of another certificate.
    fs::copy(&pki.other_key, &pki.key).expect("copy other key");
    sighup(gw, 0.0, 2.0);
    wait_for_log(gw, "does not match the certificate in");
    fs::write(&pki.key, &key_pem).expect("restore key");

    // Broken TOML, then a value out of range: each names the file or the key.
    files.write("gateway.toml", "[limits\nmax_frame = 1000\n");
    sighup(gw, 0.0, 3.0);
    wait_for_log(gw, &format!("config file {config_arg}"));
    files.write("gateway.toml", "[limits]\nmax_frame = 0\n");
    sighup(gw, 0.0, 4.0);
    wait_for_log(gw, "`limits.max_frame`");

    // Still serving with the old certificate and the old limit (2000, not 1000 or 0).
    let mut new = stack.client();
    assert_eq!(peer_leaf(&new), pki.cert_der);
    new.echo(&[b'n'; 2000]);
    old.echo(&[b'o'; 2000]);
    let m = gw.metrics();
    assert_eq!(m.sum("holdfast_closes_total", &[]), 0.0, "{}", m.text);

    // Fixed again: the next reload succeeds.
    files.write("gateway.toml", good);
    let m = sighup(gw, 1.0, 4.0);
    assert_eq!(m.sum("holdfast_config_last_reload_successful", &[]), 1.0);
    new.echo(b"after");
    new.close();
    old.close();
}

#[test]
fn settings_fixed_at_start_are_warned_about_and_keep_their_running_value() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let config = dir.write(
        "gateway.toml",
        "cores = 2\n[runtime]\nrecv_buffers = 4096\n[limits]\nmax_conns_per_core = 4096\n",
    );
    // No --cores: the core count comes from the file.
    let args: Vec<OsString> = vec![
        "run".into(),
        "--config".into(),
        config.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--cert".into(),
        pki.cert.clone().into(),
        "--key".into(),
        pki.key.clone().into(),
        "--worker".into(),
        worker.socket.clone().into(),
    ];
    let gw = Gateway::start(&dir, &args);
    assert_eq!(gw.cores, 2);
    let mut old = gw.client(&pki);
    old.echo(b"before");

    dir.write(
        "gateway.toml",
        "cores = 1\n[runtime]\nrecv_buffers = 1024\n[limits]\nmax_conns_per_core = 100\n",
    );
    sighup(&gw, 1.0, 0.0);
    let log = wait_for_log(&gw, "config reloaded");
    for key in ["cores", "runtime.recv_buffers", "limits.max_conns_per_core"] {
        let warning = format!("config reload: `{key}` changed");
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains(&warning)
                && l.contains("fixed at start")),
            "no warning naming `{key}`:\n{log}"
        );
    }
    assert!(log.contains("no other setting changed"), "{log}");

    // Still two cores with their tables as started, both serving.
    let m = gw.metrics();
    let capacity: Vec<f64> = m
        .series("holdfast_conn_table_capacity", &[])
        .map(|s| s.value)
        .collect();
    assert_eq!(capacity.len(), 2, "{}", m.text);
    assert!(capacity.iter().all(|&c| c > 100.0), "{capacity:?}");
    let mut clients: Vec<Client> = (0..8).map(|_| gw.client(&pki)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&payload("fixed", i, 32));
    }
    let accepted = gw.metrics().by_label("holdfast_accepts_total", &[], "core");
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    old.echo(b"after");
}

#[test]
fn a_shorter_idle_timeout_reaches_connections_that_were_already_idle() {
    let files = TestDir::new();
    let config = files.write("gateway.toml", "[limits]\nidle_timeout_secs = 600\n");
    let config_arg = config.display().to_string();
    let stack = Stack::start(&["--config", &config_arg]);
    let gw = &stack.gateway;
    let mut idle = stack.client();
    idle.echo(b"then silence");

    let before = gw.close_count("idle_timeout");
    write_and_reload(
        &files.join("gateway.toml"),
        "[limits]\nidle_timeout_secs = 1\n",
        gw,
    );
    let started = Instant::now();
    idle.expect_close_frame(close_code::IDLE_TIMEOUT, Duration::from_secs(5));
    gw.wait_for_close_reason("idle_timeout", before);
    assert!(started.elapsed() < Duration::from_secs(5));
}

fn write_and_reload(path: &Path, text: &str, gateway: &Gateway) {
    fs::write(path, text).expect("write config");
    sighup(gateway, 1.0, 0.0);
}
