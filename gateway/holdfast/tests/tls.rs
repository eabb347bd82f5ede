//! TLS as clients meet it: protocol versions, ALPN and SNI certificate selection.

mod common;

use std::ffi::OsStr;

use common::{Client, ClientOptions, Gateway, Pki, Stack, TestDir, Worker, IO_TIMEOUT};
use holdfast_wire::frame::ALPN;
use rustls::ProtocolVersion;

#[test]
fn tls13_is_negotiated_by_default() {
    let stack = Stack::start(&[]);
    let mut client = stack.client();
    assert_eq!(
        client.conn().protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    client.echo(b"over TLS 1.3");
}

#[test]
fn a_tls12_only_client_is_refused_by_default() {
    let stack = Stack::start(&[]);
    let opts = ClientOptions::new(&stack.pki).tls12_only();
    match stack.client_with(&opts) {
        Ok(c) => panic!(
            "a TLS 1.2 client got through by default ({:?})",
            c.conn().protocol_version()
        ),
        Err(e) => eprintln!("refused as expected: {e}"),
    }
    stack
        .gateway
        .wait_for_sum_at_least("holdfast_handshakes_total", &[("result", "failed")], 1.0);
    // The refusal is the one connection's business.
    stack.client().echo(b"TLS 1.3 still works");
}

#[test]
fn a_tls12_only_client_is_accepted_with_the_tls12_flag() {
    let stack = Stack::start(&["--tls12"]);
    let opts = ClientOptions::new(&stack.pki).tls12_only();
    let mut old = stack
        .client_with(&opts)
        .expect("TLS 1.2 handshake with --tls12");
    assert_eq!(
        old.conn().protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
    assert_eq!(old.conn().alpn_protocol(), Some(ALPN));
    old.echo(b"over TLS 1.2");
    // A client offering both still gets 1.3.
    let mut new = stack.client();
    assert_eq!(
        new.conn().protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    new.echo(b"over TLS 1.3");
}

#[test]
fn alpn_holdfast_1_is_negotiated() {
    let stack = Stack::start(&[]);
    let opts = ClientOptions::new(&stack.pki).alpn(&[b"h2", ALPN, b"http/1.1"]);
    let mut client = stack
        .client_with(&opts)
        .expect("handshake offering holdfast/1 among others");
    assert_eq!(client.conn().alpn_protocol(), Some(ALPN));
    client.echo(b"native protocol");
}

#[test]
fn a_client_offering_no_alpn_speaks_the_native_protocol() {
    let stack = Stack::start(&[]);
    let opts = ClientOptions::new(&stack.pki).alpn(&[]);
    let mut client = stack.client_with(&opts).expect("handshake without ALPN");
    assert_eq!(client.conn().alpn_protocol(), None);
    client.echo(b"native protocol by default");
}

#[test]
fn a_client_offering_only_an_unknown_alpn_is_refused() {
    let stack = Stack::start(&[]);
    let opts = ClientOptions::new(&stack.pki).alpn(&[b"unknown/9"]);
    match stack.client_with(&opts) {
        Err(e) => eprintln!("refused as expected: {e}"),
        Ok(mut c) => {
            // A server may finish the handshake without choosing; it must not then carry
            // frames for a protocol it never agreed to.
            assert_eq!(
                c.conn().alpn_protocol(),
                None,
                "the gateway agreed to an unknown ALPN"
            );
            c.send(holdfast_wire::frame::FrameType::Data, b"should not echo");
            match c.try_recv(IO_TIMEOUT) {
                common::Recv::Closed(how) => eprintln!("closed after the handshake: {how:?}"),
                other => {
                    panic!("a connection with only an unknown ALPN offered was served: {other:?}")
                }
            }
        }
    }
    stack.client().echo(b"others are unaffected");
}

/// Two certificates in a config file that sets every address itself, so the
/// `[[tls.certs]]`, `listen`, `admin`, `cores` and `workers` keys are all exercised.
fn start_with_two_certificates() -> (TestDir, Pki, Worker, Gateway) {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let q = |p: &std::path::Path| format!("{:?}", p.to_str().expect("UTF-8 temp path"));
    let config = dir.write(
        "holdfast.toml",
        format!(
            r#"
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
cores = {cores}
workers = [{worker}]

[tls]
versions = ["1.3"]

[[tls.certs]]
cert = {cert}
key = {key}
server_names = ["localhost"]

[[tls.certs]]
cert = {other_cert}
key = {other_key}
server_names = ["other.test"]
"#,
            cores = common::CORES,
            worker = q(&worker.socket),
            cert = q(&pki.cert),
            key = q(&pki.key),
            other_cert = q(&pki.other_cert),
            other_key = q(&pki.other_key),
        ),
    );
    let gateway = Gateway::start(
        &dir,
        [
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ],
    );
    assert_eq!(gateway.cores, common::CORES, "cores from the config file");
    (dir, pki, worker, gateway)
}

fn leaf_of(client: &Client) -> rustls::pki_types::CertificateDer<'static> {
    client
        .conn()
        .peer_certificates()
        .expect("server sent certificates")[0]
        .clone()
        .into_owned()
}

#[test]
fn sni_picks_the_certificate_configured_for_each_name() {
    let (_dir, pki, _worker, gateway) = start_with_two_certificates();

    // Each connection verifies the chain and the name against the test CA, so a wrong
    // pick already fails the handshake; the comparison says which one came.
    let mut other = Client::connect(
        gateway.listen,
        &ClientOptions::new(&pki).server_name("other.test"),
    )
    .expect("handshake for SNI other.test");
    assert!(
        leaf_of(&other) == pki.other_cert_der,
        "SNI other.test did not get the other.test certificate"
    );
    other.echo(b"via other.test");

    let mut local = Client::connect(
        gateway.listen,
        &ClientOptions::new(&pki).server_name("localhost"),
    )
    .expect("handshake for SNI localhost");
    assert!(
        leaf_of(&local) == pki.cert_der,
        "SNI localhost did not get the first certificate"
    );
    local.echo(b"via localhost");
}

#[test]
fn an_unknown_or_absent_sni_gets_the_first_certificate() {
    let (_dir, pki, _worker, gateway) = start_with_two_certificates();

    let unknown = Client::connect(
        gateway.listen,
        &ClientOptions::new(&pki)
            .server_name("nomatch.test")
            .any_certificate(),
    )
    .expect("handshake for an SNI name no certificate serves");
    assert!(
        leaf_of(&unknown) == pki.cert_der,
        "unmatched SNI did not get the first (default) certificate"
    );

    // rustls sends no SNI for an IP address; the default certificate covers 127.0.0.1.
    let mut by_ip = Client::connect(
        gateway.listen,
        &ClientOptions::new(&pki).server_name("127.0.0.1"),
    )
    .expect("handshake without SNI");
    assert!(
        leaf_of(&by_ip) == pki.cert_der,
        "a client without SNI did not get the first certificate"
    );
    by_ip.echo(b"no SNI");
}
