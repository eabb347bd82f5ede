//! What waking a hibernated connection costs: the gateway's own session (the real
//! `holdfast::session::Session`, its record layer and rustls for the handshake) against a
//! rustls client in memory, with no sockets, so only the userspace CPU of one echoed
//! 64-byte frame is timed. Two loops over the same records:
//! - awake: the connection stays on holdfast's record layer with its keys expanded;
//! - asleep: before every record the connection hibernates (keys dropped), so each record
//!   wakes it (two HKDF-Expand-Label derivations and two AEAD key schedules) and the reply
//!   is sealed under a freshly derived key.
//!
//! - rustls: hibernation off, rustls keeps the connection (what an active connection
//!   cost before holdfast had its own record layer).
//!
//! The difference per frame is the wake-up (and going back to sleep) cost. Run with
//! `cargo bench -p holdfast --bench wakeup`; it prints microseconds per frame for each
//! cipher suite (best of several rounds, so a noisy machine shows its quiet moments).

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use holdfast::config::{CertConfig, Config};
use holdfast::provider::tls as provider;
use holdfast::session::{Session, SessionConfig, Turn};
use holdfast::tls::{server_config, TlsSession};
use holdfast_wire::frame::{self, FrameType};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, SupportedCipherSuite};

const FRAMES: usize = 20_000;
const ROUNDS: usize = 5;

/// Server configurations with hibernation on and off, and the CA.
fn pki() -> (
    Arc<ServerConfig>,
    Arc<ServerConfig>,
    rustls::pki_types::CertificateDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = ca.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("leaf");
    let dir = std::env::temp_dir().join(format!("holdfast-wakeup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    let mut config = Config::default();
    config.tls.certs.push(CertConfig {
        cert: cert_path,
        key: key_path,
        server_names: vec!["localhost".into()],
    });
    let server = server_config(&config).expect("server config");
    config.tls.hibernate_after_secs = 0;
    let rustls_only = server_config(&config).expect("server config");
    let _ = std::fs::remove_dir_all(&dir);
    (server, rustls_only, ca.der().clone())
}

/// A session after a handshake with a client pinned to `suite`, and `FRAMES` records of
/// one DATA frame each from that client, in order.
fn conversation(
    server: &Arc<ServerConfig>,
    ca: &rustls::pki_types::CertificateDer<'static>,
    suite: SupportedCipherSuite,
    cfg: &SessionConfig,
    turn: &mut Turn,
) -> (Session, Vec<Vec<u8>>) {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..provider::default_provider()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![frame::ALPN.to_vec()];
    let mut client =
        ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .expect("client");
    let mut session = Session::new(TlsSession::new(server.clone()).expect("session"), 0, cfg);
    for _ in 0..8 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("write_tls");
        }
        session.on_receive(&mut wire, 0, cfg, turn);
        let out = std::mem::take(session.transmit());
        let mut rd = &out[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("read_tls");
            client
                .process_new_packets()
                .expect("client accepts the handshake");
        }
        if !client.is_handshaking() && session.is_open() {
            break;
        }
    }
    assert_eq!(
        session.is_on_own_record_layer(),
        cfg.hibernate_after_secs > 0,
        "on holdfast's record layer exactly when hibernation is on"
    );
    let mut f = Vec::new();
    frame::encode(FrameType::Data, &[7u8; 64], &mut f);
    let records = (0..FRAMES)
        .map(|_| {
            client.writer().write_all(&f).expect("write");
            let mut rec = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut rec).expect("write_tls");
            }
            rec
        })
        .collect();
    turn.events.clear();
    (session, records)
}

/// Microseconds per echoed frame, hibernating before each record when `sleep`.
fn run(
    server: &Arc<ServerConfig>,
    ca: &rustls::pki_types::CertificateDer<'static>,
    suite: SupportedCipherSuite,
    sleep: bool,
) -> f64 {
    let mut cfg = SessionConfig::new(&Config::default());
    cfg.hibernate_after_secs = u64::from(server.enable_secret_extraction);
    let mut turn = Turn::new();
    let (mut session, mut records) = conversation(server, ca, suite, &cfg, &mut turn);
    let reply = [7u8; 64];
    let mut now = 1;
    let t = Instant::now();
    for rec in records.iter_mut() {
        if sleep {
            now += 2;
            session.on_timeout(now, &cfg, true, &mut turn);
            debug_assert!(session.is_asleep());
        }
        session.on_receive(rec, now, &cfg, &mut turn);
        debug_assert_eq!(turn.events.list.len(), 1, "one frame");
        turn.events.clear();
        session.send_message(0, &reply, now, &mut turn);
        black_box(session.transmit()).clear();
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / FRAMES as f64;
    assert!(session.is_open(), "the conversation went through");
    us
}

fn main() {
    let (server, rustls_only, ca) = pki();
    println!("userspace CPU per echoed 64-byte frame, in-memory session (best of {ROUNDS})");
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "suite", "rustls", "awake", "asleep", "wake-up"
    );
    for suite in [
        provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let best = |server: &Arc<ServerConfig>, sleep| {
            (0..ROUNDS)
                .map(|_| run(server, &ca, suite, sleep))
                .fold(f64::INFINITY, f64::min)
        };
        let rustls = best(&rustls_only, false);
        let (awake, asleep) = (best(&server, false), best(&server, true));
        println!(
            "{:<34} {:>7.2}us {:>7.2}us {:>7.2}us {:>7.2}us",
            format!("{:?}", suite.suite()),
            rustls,
            awake,
            asleep,
            asleep - awake
        );
    }
}
