//! Session tickets shared by a fleet: gateways reading the same `tls.ticket_key_file`
//! resume each other's tickets, and their own after a restart; a ticket whose key rotated
//! out gets a full handshake, not an error.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{gateway_args, gateway_bin, Client, ClientOptions, Gateway, Pki, TestDir, Worker};
use rustls::HandshakeKind;

/// A client that keeps TLS 1.3 session tickets, to see which handshakes resume.
fn resuming(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let mut config = (*ClientOptions::new(pki).config()).clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(8);
    Arc::new(config)
}

fn generate_key(dir: &TestDir) -> std::path::PathBuf {
    let path = dir.join("ticket.key");
    let out = std::process::Command::new(gateway_bin())
        .args(["ticket-key", "generate", "--out"])
        .arg(&path)
        .output()
        .expect("run holdfast ticket-key generate");
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&path)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key file must be private");
    path
}

fn start(dir: &TestDir, pki: &Pki, worker: &Path, tls: &str) -> Gateway {
    let config = dir.write("gateway.toml", format!("[tls]\n{tls}\n"));
    let config = config.to_str().expect("utf-8 path").to_owned();
    Gateway::start(dir, gateway_args(pki, &[worker], &["--config", &config]))
}

/// Connects, echoes (which also takes in the ticket the server sends after the handshake)
/// and says how the handshake went.
fn visit(gw: &Gateway, tickets: &Arc<rustls::ClientConfig>) -> Option<HandshakeKind> {
    let mut c = Client::connect_with(gw.listen, tickets.clone(), "localhost").expect("connect");
    c.echo(b"hello");
    c.conn().handshake_kind()
}

#[test]
fn a_ticket_from_one_gateway_resumes_on_another_and_after_a_restart() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    generate_key(&dir);
    let tls = "ticket_key_file = \"ticket.key\"";
    let a = start(&dir, &pki, &worker.socket, tls);
    let b = start(&dir, &pki, &worker.socket, tls);
    let tickets = resuming(&pki);

    assert_eq!(visit(&a, &tickets), Some(HandshakeKind::Full));
    assert_eq!(
        visit(&b, &tickets),
        Some(HandshakeKind::Resumed),
        "gateway B should resume gateway A's ticket"
    );
    // A restarts (a new process, so any key it made itself would be new): B's ticket
    // still resumes on it.
    drop(a);
    let a = start(&dir, &pki, &worker.socket, tls);
    assert_eq!(
        visit(&a, &tickets),
        Some(HandshakeKind::Resumed),
        "a ticket should resume on a restarted gateway"
    );
    // A gateway with its own process key does not know the fleet's tickets: a full
    // handshake, not a failure.
    let loner = start(&dir, &pki, &worker.socket, "session_tickets = true");
    assert_eq!(visit(&loner, &tickets), Some(HandshakeKind::Full));
    drop(b);
}

#[test]
fn a_ticket_whose_key_rotated_out_gets_a_full_handshake() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    generate_key(&dir);
    let gw = start(
        &dir,
        &pki,
        &worker.socket,
        "ticket_key_file = \"ticket.key\"\nticket_rotation_secs = 1",
    );
    let tickets = resuming(&pki);
    assert_eq!(visit(&gw, &tickets), Some(HandshakeKind::Full));
    // Within its epoch or the next, the ticket resumes.
    assert_eq!(visit(&gw, &tickets), Some(HandshakeKind::Resumed));
    // Two rotations later its key is gone: a full handshake, and the connection works.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(visit(&gw, &tickets), Some(HandshakeKind::Full));
    assert_eq!(
        gw.metrics()
            .sum("holdfast_handshakes_total", &[("result", "failed")]),
        0.0
    );
}

#[test]
fn a_key_file_others_can_read_is_refused_at_start() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let key = generate_key(&dir);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.write("gateway.toml", "[tls]\nticket_key_file = \"ticket.key\"\n");
    let config = config.to_str().expect("utf-8 path").to_owned();
    let exited = Gateway::run_to_exit(
        gateway_args(&pki, &[], &["--config", &config]),
        Duration::from_secs(20),
    );
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains("chmod 600"),
        "the error should say how to fix the mode: {}",
        exited.stderr
    );
}
