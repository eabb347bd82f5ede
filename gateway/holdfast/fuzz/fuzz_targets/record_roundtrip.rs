//! Fuzzes holdfast's TLS 1.3 record layer against rustls: a real rustls client
//! handshakes with an unbuffered rustls server in memory, the server is converted into a
//! [`Hibernated`] state, and then the input drives a conversation. What the client seals
//! the layer must open to exactly the same bytes, in any split of receives; what the
//! layer seals the client must read back; KeyUpdates go both ways and the layer
//! hibernates and wakes in between. A tampered byte must make the layer fail, never
//! yield the plaintext of that record or of anything after it. The first byte picks
//! the cipher suite. Run it from this directory with `cargo +nightly fuzz run
//! record_roundtrip`.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::sync::{Arc, LazyLock};

use holdfast::provider::tls as provider;
use holdfast::record::{self, Hibernated, Record, RecordLayer};
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, SupportedCipherSuite};

const SUITES: [SupportedCipherSuite; 3] = [
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

struct Pki {
    server: Arc<ServerConfig>,
    clients: Vec<Arc<ClientConfig>>,
}

static PKI: LazyLock<Pki> = LazyLock::new(|| {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf params")
        .signed_by(&key, &ca, &ca_key)
        .expect("leaf");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server certificate");
    server.enable_secret_extraction = true;
    server.key_log = Arc::new(record::SecretLog);
    let clients = SUITES
        .iter()
        .map(|suite| {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der().clone()).expect("trust the CA");
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: vec![*suite],
                ..provider::default_provider()
            };
            let config = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .collect();
    Pki {
        server: Arc::new(server),
        clients,
    }
});

fn drain(client: &mut ClientConnection) -> Vec<u8> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).expect("client write_tls");
    }
    wire
}

fn client_receive(client: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
    let mut rest = wire;
    let mut plain = Vec::new();
    loop {
        let mut buf = [0; 4096];
        loop {
            match client.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client read: {e}"),
            }
        }
        if rest.is_empty() {
            return plain;
        }
        client.read_tls(&mut rest).expect("client read_tls");
        client
            .process_new_packets()
            .expect("the client accepts what the layer sealed");
    }
}

/// A handshake in memory; the server side comes out as a hibernated record layer.
fn connect(suite: usize) -> (ClientConnection, Hibernated) {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut client = ClientConnection::new(PKI.clients[suite].clone(), name).expect("client");
    let mut server = UnbufferedServerConnection::new(PKI.server.clone()).expect("server");
    let mut inbox = Vec::new();
    let mut secrets = None;
    loop {
        inbox.extend(drain(&mut client));
        let mut to_client = Vec::new();
        let mut established = false;
        loop {
            let UnbufferedStatus { discard, state } = server.process_tls_records(&mut inbox);
            let stop = match state.expect("server state") {
                ConnectionState::EncodeTlsData(mut e) => {
                    let mut buf = vec![0; 4096];
                    let n = loop {
                        match e.encode(&mut buf) {
                            Ok(n) => break n,
                            Err(EncodeError::InsufficientSize(s)) => buf.resize(s.required_size, 0),
                            Err(EncodeError::AlreadyEncoded) => break 0,
                        }
                    };
                    to_client.extend_from_slice(&buf[..n]);
                    false
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                ConnectionState::BlockedHandshake => true,
                ConnectionState::WriteTraffic(_) => {
                    established = true;
                    true
                }
                other => panic!("server state {other:?}"),
            };
            inbox.drain(..discard);
            if stop {
                break;
            }
        }
        if let Some(s) = record::take_traffic_secrets() {
            secrets = Some(s);
        }
        assert!(client_receive(&mut client, &to_client).is_empty());
        if established && inbox.is_empty() && !client.is_handshaking() && !client.wants_write() {
            break;
        }
    }
    let (extracted, _kernel) = server.dangerous_into_kernel_connection().expect("kernel");
    let secrets = secrets.expect("both secrets logged");
    let state = Hibernated::from_rustls(
        SUITES[suite],
        secrets.client(),
        secrets.server(),
        &extracted,
    )
    .expect("hibernated state");
    (client, state)
}

/// What feeding a stream gave: the plaintext, how many bytes are left staged, and the
/// error that stopped it.
struct Fed {
    plain: Vec<u8>,
    left: usize,
    error: Option<record::RecordError>,
}

/// Feeds `wire` in receives whose sizes come from `splits` (cycled), staging partial
/// records, until it is all in or the layer fails.
fn feed(layer: &mut RecordLayer, wire: &[u8], splits: &[u8], out: &mut Vec<u8>) -> Fed {
    let mut plain = Vec::new();
    let mut staged = Vec::new();
    let mut rest = wire;
    let mut i = 0;
    while !rest.is_empty() {
        let step = usize::from(splits.get(i % splits.len().max(1)).copied().unwrap_or(0)) * 64 + 1;
        i += 1;
        let (chunk, tail) = rest.split_at(step.min(rest.len()));
        rest = tail;
        staged.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            let available = staged.len() - pos;
            let opened = match layer.open(&mut staged[pos..], out) {
                Ok(opened) => opened,
                Err(e) => {
                    return Fed {
                        plain,
                        left: staged.len() - pos,
                        error: Some(e),
                    }
                }
            };
            assert!(opened.consumed <= available);
            match opened.record {
                Record::Incomplete { needed } => {
                    assert!(opened.consumed == 0 && needed > available);
                    break;
                }
                Record::Data(d) => plain.extend_from_slice(d),
                Record::KeyUpdate { .. } => {}
                Record::Closed | Record::UserCanceled => panic!("the client sent no alert"),
            }
            pos += opened.consumed;
        }
        staged.drain(..pos);
    }
    Fed {
        plain,
        left: staged.len(),
        error: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&suite, mut input)) = data.split_first() else {
        return;
    };
    let (mut client, state) = connect(usize::from(suite) % SUITES.len());
    let mut layer = state.wake();
    let mut pending = Vec::new();
    // KeyUpdates the client sent since its last application data: the layer refuses more
    // than `KEY_UPDATES_WITHOUT_DATA` (a unit test covers that), so the client stops there.
    let mut updates = 0;
    while let Some((&op, rest)) = input.split_first() {
        // A length (two bytes), then that many payload bytes from the input.
        let take = |rest: &[u8]| -> (Vec<u8>, usize) {
            let len = match rest {
                [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])) % 40_000,
                _ => 0,
            };
            let body = rest.get(2..).unwrap_or(&[]);
            let payload: Vec<u8> = body.iter().copied().cycle().take(len).collect();
            (payload, (2 + len).min(rest.len()))
        };
        input = rest;
        match op % 6 {
            0 => {
                let (payload, used) = take(input);
                let splits = input[..used].to_vec();
                input = &input[used..];
                client.writer().write_all(&payload).expect("client write");
                pending.extend(drain(&mut client));
                let mut out = Vec::new();
                let fed = feed(&mut layer, &pending, &splits, &mut out);
                assert_eq!(fed.error, None);
                if !payload.is_empty() {
                    updates = 0;
                }
                assert_eq!((fed.plain, fed.left), (payload, 0));
                pending.clear();
                assert!(client_receive(&mut client, &out).is_empty());
            }
            1 => {
                let (payload, used) = take(input);
                input = &input[used..];
                let mut out = Vec::new();
                layer.seal(&payload, &mut out).expect("seal");
                assert_eq!(client_receive(&mut client, &out), payload);
            }
            2 if updates < record::KEY_UPDATES_WITHOUT_DATA => {
                updates += 1;
                client.refresh_traffic_keys().expect("client KeyUpdate");
                pending.extend(drain(&mut client));
            }
            2 => {}
            3 => {
                let (_, tx) = layer.sequence_numbers();
                layer.set_limits(tx, u64::MAX);
            }
            4 => layer = layer.hibernate().wake(),
            _ => {
                // Flip a bit in the next records: the layer must fail, or wait for more (a
                // length made longer), having handed out only the records before that one.
                let (payload, used) = take(input);
                input = &input[used..];
                client.writer().write_all(&payload).expect("client write");
                let before = pending.len();
                pending.extend(drain(&mut client));
                if pending.len() == before {
                    continue;
                }
                let at = before + usize::from(op) % (pending.len() - before);
                pending[at] ^= 1 << (op % 8);
                let mut out = Vec::new();
                let fed = feed(&mut layer, &pending, input, &mut out);
                assert!(
                    fed.error.is_some() || fed.left > 0,
                    "a tampered record was accepted"
                );
                assert!(fed.plain.len() < payload.len() && payload.starts_with(&fed.plain));
                return;
            }
        }
    }
});
