//! The gateway's TLS record driver against hostile input, through the real
//! [`holdfast::session::Session`], in process: no sockets, no gateway process. Whatever a
//! client sends, in whatever pieces, the session must not panic (a panic takes a whole
//! core down), the driver must never report more bytes consumed than it was offered (a
//! debug assertion in `Records::feed_staged`), and no plaintext may come out that the
//! client did not send.
//!
//! [`Gateway`] feeds the session the bytes of each receive and taps the plaintext it
//! decrypts; the client's messages are native frames (DATA, or PING where the test wants
//! the session to answer, encrypting a PONG before it looks at how the feed ended).

use std::io::Write;
use std::sync::{Arc, LazyLock};

use holdfast::config::{CertConfig, Config};
use holdfast::metrics::CloseReason;
use holdfast::session::{Event, Session, SessionConfig, Turn};
use holdfast::tls::{server_config, TlsEnd, TlsSession, VecSink as Sink};
use holdfast_wire::frame::{self, FrameType};
use proptest::prelude::*;
use proptest::sample::Index;
use rustls::crypto::cipher::{MessageEncrypter, OutboundChunks, OutboundPlainMessage};
use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionTrafficSecrets, ContentType, ProtocolVersion,
    RootCertStore, ServerConfig, SupportedCipherSuite,
};

// ---------------------------------------------------------------------------------------
// Certificates and configurations

struct Pki {
    /// The server configuration, built by `holdfast::tls::server_config` with TLS 1.3 and
    /// 1.2 enabled (WebSocket on, so ALPN offers `holdfast/1` then `http/1.1`), with
    /// hibernation on: after a TLS 1.3 handshake holdfast's own record layer takes over.
    server: Arc<ServerConfig>,
    /// The same with hibernation off: rustls keeps every connection.
    rustls_only: Arc<ServerConfig>,
    ca: CertificateDer<'static>,
}

/// A CA and a leaf for `localhost` (with `extra_names` more names, to make the
/// certificate as large as wanted), loaded through the gateway's own configuration path.
fn pki(extra_names: usize) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    let ca_key = KeyPair::generate().expect("generate CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "holdfast tls_driver CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).expect("self-sign CA");

    let key = KeyPair::generate().expect("generate server key");
    let mut names = vec!["localhost".to_string()];
    names.extend((0..extra_names).map(|i| format!("name-{i:05}.padding.holdfast.invalid")));
    let mut params = CertificateParams::new(names).expect("server cert params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("sign server cert");

    let dir = std::env::temp_dir().join(format!(
        "holdfast-tls-driver-{}-{extra_names}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let mut config = Config::default();
    config.tls.versions = vec!["1.3".into(), "1.2".into()];
    config.tls.certs.push(CertConfig {
        cert: cert_path,
        key: key_path,
        server_names: vec!["localhost".into()],
    });
    let server = server_config(&config).expect("server config");
    config.tls.hibernate_after_secs = 0;
    let rustls_only = server_config(&config).expect("server config");
    // Loaded into memory: the files are not needed any more.
    let _ = std::fs::remove_dir_all(&dir);
    Pki {
        server,
        rustls_only,
        ca: ca.der().clone(),
    }
}

static PKI: LazyLock<Pki> = LazyLock::new(|| pki(0));

/// The cipher suites a client may pin (all the ring provider has for an ECDSA key).
const SUITES: [SupportedCipherSuite; 6] = [
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// A client trusting `ca`, offering `holdfast/1`, pinned to one cipher suite (and so to
/// its protocol version). Secret extraction is on so that tests can forge records the
/// server must accept as authentic.
fn client_config(ca: &CertificateDer<'static>, suite: SupportedCipherSuite) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("trust the test CA");
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..provider::default_provider()
    };
    let version = match suite {
        SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .expect("protocol version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![frame::ALPN.to_vec()];
    config.enable_secret_extraction = true;
    Arc::new(config)
}

static CLIENTS: LazyLock<Vec<Arc<ClientConfig>>> =
    LazyLock::new(|| SUITES.iter().map(|s| client_config(&PKI.ca, *s)).collect());

/// ClientHello flavours: TLS 1.3 only, 1.2 only, both; with or without ALPN and SNI.
static HELLO_CLIENTS: LazyLock<Vec<(Arc<ClientConfig>, ServerName<'static>)>> =
    LazyLock::new(|| {
        let mut out = Vec::new();
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
            &[&rustls::version::TLS13, &rustls::version::TLS12][..],
        ] {
            for alpn in [true, false] {
                let mut roots = RootCertStore::empty();
                roots.add(PKI.ca.clone()).expect("trust the test CA");
                let mut config =
                    ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
                        .with_protocol_versions(versions)
                        .expect("protocol versions")
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                if alpn {
                    config.alpn_protocols = vec![frame::ALPN.to_vec()];
                }
                let name = if alpn { "localhost" } else { "127.0.0.1" };
                out.push((
                    Arc::new(config),
                    ServerName::try_from(name).expect("server name"),
                ));
            }
        }
        out
    });

fn client_hello(flavour: usize) -> Vec<u8> {
    let (config, name) = &HELLO_CLIENTS[flavour % HELLO_CLIENTS.len()];
    let mut client = ClientConnection::new(config.clone(), name.clone()).expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("ClientHello");
    let records = split_records(&hello);
    assert_eq!(records.len(), 1, "one ClientHello record");
    assert_eq!(hello[0], 22, "a handshake record");
    hello
}

// ---------------------------------------------------------------------------------------
// The gateway side

/// One gateway connection: the real [`Session`], driven as `core.rs` drives it, with its
/// decrypted plaintext tapped.
struct Gateway {
    session: Session,
    cfg: SessionConfig,
    turn: Turn,
    /// TLS bytes towards the client, not yet taken by the test.
    out: Vec<u8>,
    /// All plaintext the session decrypted.
    plain: Vec<u8>,
    /// Why the session closed, once it did.
    end: Option<CloseReason>,
    handshakes: usize,
}

impl Gateway {
    fn new(config: &Arc<ServerConfig>) -> Gateway {
        let cfg = SessionConfig::new(&Config::default());
        let tls = TlsSession::new(config.clone()).expect("server session");
        let mut turn = Turn::new();
        turn.tap = Some(Vec::new());
        Gateway {
            session: Session::new(tls, 0, &cfg),
            cfg,
            turn,
            out: Vec::new(),
            plain: Vec::new(),
            end: None,
            handshakes: 0,
        }
    }

    fn established(&self) -> bool {
        self.handshakes > 0
    }

    /// The bytes of one receive. Ignored once the session is closing (the gateway stops
    /// reading a connection that closes).
    fn receive(&mut self, bytes: &[u8]) {
        // The receive buffer, decrypted in place.
        let mut buf = bytes.to_vec();
        self.session
            .on_receive(&mut buf, 0, &self.cfg, &mut self.turn);
        if let Some(tap) = self.turn.tap.as_mut() {
            self.plain.append(tap);
        }
        for ev in &self.turn.events.list {
            match *ev {
                Event::Established => {
                    self.handshakes += 1;
                    assert_eq!(self.handshakes, 1, "the handshake completed twice");
                }
                Event::Closed { reason, .. } => {
                    assert_eq!(self.end, None, "closed twice");
                    self.end = Some(reason);
                }
                Event::HandshakeFailed | Event::Frame { .. } => {}
            }
        }
        self.turn.events.clear();
        self.out.append(self.session.transmit());
    }

    /// Everything in `bytes`, in receives of the sizes in `splits` (cycled).
    fn receive_split(&mut self, bytes: &[u8], splits: &[usize]) {
        for chunk in chunks(bytes, splits) {
            self.receive(chunk);
        }
    }

    /// A worker's message to the client (a DATA frame).
    fn send(&mut self, payload: &[u8]) {
        self.session.send_message(0, payload, 0, &mut self.turn);
        self.out.append(self.session.transmit());
    }

    fn take_out(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

/// A client message as the gateway must parse it: a DATA frame or, when the test wants the
/// gateway to answer in the same turn, a PING (answered with a PONG before the session
/// looks at how the feed ended).
fn message(payload: &[u8], ping: bool) -> Vec<u8> {
    let kind = if ping {
        FrameType::Ping
    } else {
        FrameType::Data
    };
    let mut f = Vec::new();
    frame::encode(kind, payload, &mut f);
    f
}

/// `bytes` cut into pieces of the sizes in `splits`, cycled; the whole when empty.
fn chunks<'a>(bytes: &'a [u8], splits: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut sizes = splits.iter().copied().filter(|&s| s > 0).cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// The TLS records of a well-formed stream.
fn split_records(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 5, "a whole record header");
        let len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        let (rec, rest) = bytes.split_at(5 + len);
        out.push(rec);
        bytes = rest;
    }
    out
}

fn record(typ: u8, version: u16, body: &[u8]) -> Vec<u8> {
    let mut r = vec![typ];
    r.extend_from_slice(&version.to_be_bytes());
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

fn set_record_len(rec: &mut [u8]) {
    let len = (rec.len() - 5) as u16;
    rec[3..5].copy_from_slice(&len.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// A real client

/// Runs a handshake between `client` and `gw`, the client's bytes delivered in receives
/// of the sizes in `splits`. Returns whether both sides completed it.
fn handshake(client: &mut ClientConnection, gw: &mut Gateway, splits: &[usize]) -> bool {
    for _ in 0..32 {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).expect("client write_tls");
        }
        gw.receive_split(&to_server, splits);
        let to_client = gw.take_out();
        if !to_client.is_empty() {
            let mut rd = &to_client[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client read_tls");
                if let Err(e) = client.process_new_packets() {
                    panic!("the client refused the gateway's handshake: {e}");
                }
            }
        }
        if gw.end.is_some() {
            return false;
        }
        if !client.is_handshaking() && gw.established() && !client.wants_write() {
            return true;
        }
    }
    false
}

/// Application data the client sends, one record per message, with the record
/// boundaries.
fn client_records(client: &mut ClientConnection, messages: &[Vec<u8>]) -> Vec<Vec<u8>> {
    messages
        .iter()
        .map(|m| {
            client.writer().write_all(m).expect("client write");
            let mut rec = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut rec).expect("client write_tls");
            }
            let parts = split_records(&rec);
            assert_eq!(parts.len(), 1, "one record per message");
            assert_eq!(rec[0], 23, "an application data record");
            rec
        })
        .collect()
}

/// Encrypts records as the client would after a TLS 1.3 handshake, with any inner
/// content type: authentic records the server must accept or refuse without panicking.
struct Forger {
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
}

impl Forger {
    /// Takes over the client's sending direction. TLS 1.3 suites only.
    fn new(client: ClientConnection, suite: SupportedCipherSuite) -> Forger {
        let SupportedCipherSuite::Tls13(suite) = suite else {
            panic!("forging is done for TLS 1.3 only");
        };
        let secrets = client.dangerous_extract_secrets().expect("extract secrets");
        let (seq, tx) = secrets.tx;
        let (key, iv) = match tx {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
            _ => panic!("unexpected traffic secrets"),
        };
        Forger {
            enc: suite.aead_alg.encrypter(key, iv),
            seq,
        }
    }

    fn record(&mut self, typ: u8, payload: &[u8]) -> Vec<u8> {
        let msg = OutboundPlainMessage {
            typ: ContentType::from(typ),
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let rec = self.enc.encrypt(msg, self.seq).expect("encrypt").encode();
        self.seq += 1;
        rec
    }
}

/// A gateway and a client that completed a handshake with the client's bytes in
/// `splits`-sized receives.
/// The server configuration whose post-handshake record layer is holdfast's own (`true`)
/// or rustls (`false`).
fn layer(own: bool) -> &'static Arc<ServerConfig> {
    if own {
        &PKI.server
    } else {
        &PKI.rustls_only
    }
}

fn established(own: bool, suite: usize, splits: &[usize]) -> (Gateway, ClientConnection) {
    let mut gw = Gateway::new(layer(own));
    let config = CLIENTS[suite % CLIENTS.len()].clone();
    let mut client =
        ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).expect("client");
    assert!(handshake(&mut client, &mut gw, splits), "handshake failed");
    assert_eq!(gw.session.alpn(), Some(frame::ALPN));
    assert_eq!(gw.session.server_name(), Some("localhost"));
    let tls13 = matches!(SUITES[suite % SUITES.len()], SupportedCipherSuite::Tls13(_));
    assert_eq!(gw.session.is_on_own_record_layer(), own && tls13);
    (gw, client)
}

// ---------------------------------------------------------------------------------------
// Strategies

/// Receive sizes: mostly small (records and handshake messages cut anywhere), some large.
fn splits() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![4 => 1usize..16, 2 => 16usize..512, 1 => 512usize..4096],
        0..12,
    )
}

fn content_type() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(20u8),
        Just(21),
        Just(22),
        Just(23),
        Just(24),
        any::<u8>()
    ]
}

fn record_version() -> impl Strategy<Value = u16> {
    prop_oneof![Just(0x0303u16), Just(0x0301), Just(0x0304), any::<u16>()]
}

/// A handshake message: a type (mostly meaningful ones), a length that is right or not,
/// and a body.
fn handshake_message() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(1u8),
            Just(2),
            Just(4),
            Just(8),
            Just(11),
            Just(15),
            Just(16),
            Just(20),
            Just(24),
            any::<u8>()
        ],
        prop::collection::vec(any::<u8>(), 0..200),
        prop_oneof![3 => Just(None), 1 => (0u32..1 << 24).prop_map(Some)],
    )
        .prop_map(|(typ, body, len)| {
            let len = len.unwrap_or(body.len() as u32);
            let mut m = vec![typ];
            m.extend_from_slice(&len.to_be_bytes()[1..]);
            m.extend_from_slice(&body);
            m
        })
}

/// A record with a plausible header: its length right or wrong, its body arbitrary or a
/// few handshake messages.
fn plausible_record() -> impl Strategy<Value = Vec<u8>> {
    (
        content_type(),
        record_version(),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(handshake_message(), 1..3).prop_map(|ms| ms.concat()),
        ],
        prop_oneof![4 => Just(None), 1 => any::<u16>().prop_map(Some)],
    )
        .prop_map(|(typ, version, body, len)| {
            let mut r = record(typ, version, &body);
            if let Some(len) = len {
                r[3..5].copy_from_slice(&len.to_be_bytes());
            }
            r
        })
}

/// Bytes a client might send instead of a ClientHello.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        prop::collection::vec(plausible_record(), 0..6).prop_map(|rs| rs.concat()),
    ]
}

/// What follows (or is slipped into) a real ClientHello.
#[derive(Debug, Clone)]
enum Tail {
    /// Further records after the ClientHello's.
    Records(Vec<u8>),
    /// More bytes inside the ClientHello's own record, its length fixed up.
    InRecord(Vec<u8>),
    /// The ClientHello message cut into records of these sizes, `bytes` appended to the
    /// last of them (its length fixed up), then `after`.
    Fragmented {
        sizes: Vec<usize>,
        bytes: Vec<u8>,
        after: Vec<u8>,
    },
    /// Only a prefix of the ClientHello record, then the bytes.
    Truncated(Index, Vec<u8>),
}

fn tail() -> impl Strategy<Value = Tail> {
    let stray = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(handshake_message(), 1..3).prop_map(|ms| ms.concat()),
    ];
    let records = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(plausible_record(), 1..4).prop_map(|rs| rs.concat()),
    ];
    prop_oneof![
        records.clone().prop_map(Tail::Records),
        stray.clone().prop_map(Tail::InRecord),
        (
            prop::collection::vec(1usize..300, 1..6),
            stray.clone(),
            records.clone()
        )
            .prop_map(|(sizes, bytes, after)| Tail::Fragmented {
                sizes,
                bytes,
                after
            }),
        (any::<Index>(), records).prop_map(|(i, b)| Tail::Truncated(i, b)),
    ]
}

fn with_tail(hello: &[u8], tail: &Tail) -> Vec<u8> {
    match tail {
        Tail::Records(bytes) => [hello, bytes].concat(),
        Tail::InRecord(bytes) => {
            let mut rec = [hello, bytes].concat();
            set_record_len(&mut rec);
            rec
        }
        Tail::Fragmented {
            sizes,
            bytes,
            after,
        } => {
            let (header, mut msg) = hello.split_at(5);
            let mut out = Vec::new();
            let mut sizes = sizes.iter().cycle();
            while !msg.is_empty() {
                let n = (*sizes.next().unwrap()).min(msg.len());
                let (frag, rest) = msg.split_at(n);
                msg = rest;
                let mut rec = record(header[0], u16::from_be_bytes([header[1], header[2]]), frag);
                if msg.is_empty() {
                    rec.extend_from_slice(bytes);
                    set_record_len(&mut rec);
                }
                out.extend_from_slice(&rec);
            }
            out.extend_from_slice(after);
            out
        }
        Tail::Truncated(at, bytes) => [&hello[..at.index(hello.len())], &bytes[..]].concat(),
    }
}

/// What is done to one client→server application data record.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR these (position, non-zero mask) pairs into the record's first `.1` bytes (the
    /// whole record when 0): its type and version, its header, or anywhere.
    Flip(Vec<(Index, u8)>, usize),
    /// Cut the record short, its header left as it was.
    Truncate(Index),
    /// Cut the record's body short and fix the header's length.
    TruncateFixed(Index),
    /// Send the record twice.
    Duplicate,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (
            prop::collection::vec((any::<Index>(), 1u8..=255), 1..4),
            prop_oneof![Just(0usize), Just(3), Just(5)],
        )
            .prop_map(|(flips, within)| Mutation::Flip(flips, within)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => any::<Index>().prop_map(Mutation::TruncateFixed),
        1 => Just(Mutation::Duplicate),
    ]
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes instead of a handshake, in arbitrary receives.
    #[test]
    fn arbitrary_bytes_never_panic_the_session(
        bytes in hostile_bytes(),
        splits in splits(),
    ) {
        let mut gw = Gateway::new(&PKI.server);
        gw.receive_split(&bytes, &splits);
        prop_assert!(!gw.established(), "a handshake out of nothing");
        prop_assert!(gw.plain.is_empty(), "plaintext before any handshake");
    }

    /// A real ClientHello, then (or with, inside its record) arbitrary bytes.
    #[test]
    fn a_client_hello_with_arbitrary_bytes_never_panics_the_session(
        flavour in 0usize..6,
        tail in tail(),
        splits in splits(),
    ) {
        let hello = client_hello(flavour);
        let input = with_tail(&hello, &tail);
        let mut gw = Gateway::new(&PKI.server);
        gw.receive_split(&input, &splits);
        prop_assert!(!gw.established(), "established without the client's Finished");
        prop_assert!(gw.plain.is_empty(), "plaintext before the handshake completed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// After a real handshake, one application data record is modified: the session
    /// fails or waits, and never hands out plaintext of that record, or of anything after
    /// it, that the AEAD did not authenticate.
    #[test]
    fn a_modified_application_record_is_never_accepted(
        suite in 0usize..SUITES.len(),
        messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..600), 1..5),
        target in any::<Index>(),
        mutation in mutation(),
        splits in splits(),
        reply in any::<bool>(),
        own in any::<bool>(),
    ) {
        let (mut gw, mut client) = established(own, suite, &splits);
        let messages: Vec<Vec<u8>> = messages.iter().map(|m| message(m, reply)).collect();
        let records = client_records(&mut client, &messages);
        let k = target.index(records.len());
        let rec = &records[k];

        // Whether only the record header's type or version changed. TLS 1.3 does not
        // authenticate those as sent (rustls rebuilds the additional data as 23, 0x0303,
        // length), so such a record may still be accepted: with its authentic content.
        let mut header_only = false;
        let mut len_changed = false;
        let mut mutated = Vec::new();
        for r in &records[..k] {
            mutated.extend_from_slice(r);
        }
        match &mutation {
            Mutation::Flip(flips, within) => {
                let mut m = rec.clone();
                let span = if *within == 0 { m.len() } else { *within };
                for (at, mask) in flips {
                    let i = at.index(span);
                    m[i] ^= mask;
                }
                header_only = m[3..] == rec[3..];
                len_changed = m[3..5] != rec[3..5];
                if m == *rec {
                    // Two flips of the same byte cancelled out: nothing was modified.
                    return Ok(());
                }
                mutated.extend_from_slice(&m);
            }
            Mutation::Truncate(at) => {
                mutated.extend_from_slice(&rec[..at.index(rec.len())]);
            }
            Mutation::TruncateFixed(at) => {
                let mut m = rec[..5 + at.index(rec.len() - 5)].to_vec();
                set_record_len(&mut m);
                mutated.extend_from_slice(&m);
            }
            Mutation::Duplicate => {
                mutated.extend_from_slice(rec);
                mutated.extend_from_slice(rec);
            }
        }
        for r in &records[k + 1..] {
            mutated.extend_from_slice(r);
        }

        let before: Vec<u8> = messages[..k].concat();
        gw.receive_split(&mutated, &splits);
        prop_assert_ne!(gw.end, Some(CloseReason::PeerClosed), "a close_notify out of nothing");
        match &mutation {
            Mutation::Duplicate => {
                prop_assert_eq!(&gw.plain, &messages[..=k].concat());
                prop_assert_eq!(gw.end, Some(CloseReason::TlsError), "a replayed record was accepted");
            }
            Mutation::Flip(..) if header_only => {
                let all = messages.concat();
                let tls13 = matches!(SUITES[suite], SupportedCipherSuite::Tls13(_));
                prop_assert!(
                    gw.plain == before || (tls13 && gw.plain == all && gw.end.is_none()),
                    "header flip: {} bytes of plaintext, {} before the record, {} in all, end {:?}",
                    gw.plain.len(), before.len(), all.len(), gw.end
                );
                if gw.plain == before {
                    prop_assert_eq!(gw.end, Some(CloseReason::TlsError));
                }
            }
            Mutation::Flip(..) => {
                prop_assert_eq!(&gw.plain, &before, "plaintext of a modified record");
                // A changed length may leave the session waiting for bytes that never
                // come; anything else must fail the record.
                if !len_changed {
                    prop_assert_eq!(gw.end, Some(CloseReason::TlsError), "a modified record was not refused");
                }
            }
            Mutation::Truncate(_) => {
                prop_assert_eq!(&gw.plain, &before, "plaintext of a truncated record");
            }
            Mutation::TruncateFixed(_) => {
                prop_assert_eq!(&gw.plain, &before, "plaintext of a truncated record");
                prop_assert_eq!(gw.end, Some(CloseReason::TlsError), "a truncated record was not refused");
            }
        }
    }

    /// After a real TLS 1.3 handshake, authentic records (encrypted with the client's
    /// keys) of any inner content type and content: post-handshake messages split across
    /// records, interleaved with application data, alerts, anything.
    #[test]
    fn authentic_records_of_any_content_never_panic_the_session(
        suite in 0usize..3,
        records in prop::collection::vec(
            (
                prop_oneof![Just(21u8), Just(22), Just(23), content_type()],
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..64),
                    handshake_message(),
                    (handshake_message(), any::<Index>())
                        .prop_map(|(m, at)| m[..at.index(m.len())].to_vec()),
                    Just(vec![24, 0, 0, 1, 0]),
                    Just(vec![24, 0, 0, 1, 1]),
                    Just(vec![24, 0, 0]),
                    Just(vec![1, 0]),
                    Just(vec![2, 10]),
                ],
            ),
            1..6,
        ),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
        splits in splits(),
        reply in any::<bool>(),
        own in any::<bool>(),
    ) {
        let (mut gw, client) = established(own, suite, &splits);
        let records: Vec<(u8, Vec<u8>)> = records
            .into_iter()
            .map(|(t, p)| if t == 23 { (t, message(&p, reply)) } else { (t, p) })
            .collect();
        let mut forger = Forger::new(client, SUITES[suite]);
        let mut stream = Vec::new();
        for (typ, payload) in &records {
            stream.extend_from_slice(&forger.record(*typ, payload));
        }
        stream.extend_from_slice(&garbage);
        gw.receive_split(&stream, &splits);
        // Plaintext only ever comes from application data records, in order.
        let app: Vec<u8> = records
            .iter()
            .filter(|(t, _)| *t == 23)
            .flat_map(|(_, p)| p.iter().copied())
            .collect();
        prop_assert!(app.starts_with(&gw.plain), "plaintext the client never sent");
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic cases

/// A full conversation with every byte from the client in a receive of its own: the
/// handshake completes, every frame arrives exactly, and the replies decrypt.
fn byte_at_a_time(pki: &Pki) {
    byte_at_a_time_on(&pki.server, &pki.ca);
    byte_at_a_time_on(&pki.rustls_only, &pki.ca);
}

/// [`byte_at_a_time`] against one server configuration (one record layer).
fn byte_at_a_time_on(server: &Arc<ServerConfig>, ca: &CertificateDer<'static>) {
    for (i, suite) in SUITES.iter().enumerate() {
        let mut gw = Gateway::new(server);
        let config = client_config(ca, *suite);
        let mut client = ClientConnection::new(config, ServerName::try_from("localhost").unwrap())
            .expect("client");
        assert!(
            handshake(&mut client, &mut gw, &[1]),
            "suite {i}: handshake failed"
        );
        assert_eq!(gw.session.alpn(), Some(frame::ALPN), "suite {i}");
        let expected_version = match suite {
            SupportedCipherSuite::Tls13(_) => ProtocolVersion::TLSv1_3,
            SupportedCipherSuite::Tls12(_) => ProtocolVersion::TLSv1_2,
        };
        assert_eq!(
            gw.session.protocol_version(),
            Some(expected_version),
            "suite {i}"
        );

        let mut sent = Vec::new();
        for (n, len) in [0usize, 1, 100, 4096, 20_000].into_iter().enumerate() {
            let payload: Vec<u8> = (0..len).map(|j| (j * 7 + n) as u8).collect();
            let mut f = Vec::new();
            frame::encode(FrameType::Data, &payload, &mut f);
            client.writer().write_all(&f).expect("client write");
            sent.extend_from_slice(&f);
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("client write_tls");
            }
            gw.receive_split(&wire, &[1]);
            assert_eq!(gw.end, None, "suite {i}: frame {n} ended the session");
            assert_eq!(gw.plain, sent, "suite {i}: plaintext after frame {n}");

            // A worker answers; the client reads it.
            let reply = message(&payload, false);
            gw.send(&payload);
            let to_client = gw.take_out();
            let mut rd = &to_client[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client read_tls");
                client
                    .process_new_packets()
                    .expect("client reads the reply");
            }
            let mut got = vec![0u8; reply.len()];
            std::io::Read::read_exact(&mut client.reader(), &mut got).expect("the reply");
            assert_eq!(got, reply, "suite {i}: reply to frame {n}");
        }

        // The client closes; the gateway sees it as a clean close.
        client.send_close_notify();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client write_tls");
        }
        gw.receive_split(&wire, &[1]);
        assert_eq!(gw.end, Some(CloseReason::PeerClosed), "suite {i}");
        assert_eq!(gw.plain, sent, "suite {i}: plaintext after close");
    }
}

#[test]
fn a_conversation_delivered_one_byte_at_a_time_yields_exactly_what_was_sent() {
    byte_at_a_time(&PKI);
}

/// The same with a certificate too large for the driver's first guess at the size of a
/// handshake record (4096 bytes), so that rustls asks for a larger buffer. The driver
/// asked the sink for the larger spare part without committing the first, and the
/// gateway's sink kept the first one's 4096 zero bytes in the output: the client got
/// them in front of the server's flight and failed the handshake.
#[test]
fn a_certificate_larger_than_the_first_output_guess_is_sent_intact() {
    byte_at_a_time(&pki(200));
}

/// The established-session shape of the bug fixed with the alert encoding: a post-
/// handshake message that rustls holds (a KeyUpdate split across records) and, in the
/// same receive, a record that fails. The gateway then answers the plaintext of that
/// receive (a PONG) and sends close_notify, both against what it has staged: nothing,
/// since the whole receive was fed in place. rustls still held ranges into that receive
/// and panicked on the empty input (in release builds too), taking the core down. A
/// failed session now encrypts nothing more: the client gets the alert, if any, and only
/// that. holdfast's own record layer refuses the fragment itself, with one alert.
#[test]
fn a_failure_behind_a_held_handshake_fragment_is_refused_cleanly() {
    for (own, reply) in [(false, false), (false, true), (true, false), (true, true)] {
        for (suite, &cs) in SUITES[..3].iter().enumerate() {
            let (mut gw, client) = established(own, suite, &[]);
            let first = message(b"a PING, say", reply);
            let mut forger = Forger::new(client, cs);
            let mut stream = forger.record(23, &first);
            stream.extend_from_slice(&forger.record(22, &[24, 0]));
            // Not the rest of the KeyUpdate: application data interleaved with it.
            stream.extend_from_slice(&forger.record(23, b"interleaved"));
            gw.receive(&stream);
            assert_eq!(gw.end, Some(CloseReason::TlsError), "suite {suite}");
            assert_eq!(gw.plain, first, "suite {suite}");
            // rustls sends no alert for this one (ours, unexpected_message); no PONG or
            // close_notify either.
            let alerts = if own { 1 } else { 0 };
            assert_eq!(
                split_records(&gw.out).len(),
                alerts,
                "suite {suite}: {:?}",
                gw.out
            );

            // The same with a record that does not decrypt.
            let (mut gw, client) = established(own, suite, &[]);
            let mut forger = Forger::new(client, cs);
            let mut stream = forger.record(23, &first);
            stream.extend_from_slice(&forger.record(22, &[24, 0, 0]));
            let mut bad = forger.record(22, &[1, 0]);
            let last = bad.len() - 1;
            bad[last] ^= 1;
            stream.extend_from_slice(&bad);
            gw.receive(&stream);
            assert_eq!(gw.end, Some(CloseReason::TlsError), "suite {suite}");
            assert_eq!(gw.plain, first, "suite {suite}");
            assert_eq!(split_records(&gw.out).len(), 1, "suite {suite}: one alert");
        }
    }
}

/// A KeyUpdate split across records and receives is accepted (the application data
/// before it is delivered, the session goes on).
#[test]
fn a_key_update_split_across_records_and_receives_is_accepted() {
    let (mut gw, client) = established(false, 0, &[]);
    let mut forger = Forger::new(client, SUITES[0]);
    let before = message(b"before ", false);
    let mut stream = forger.record(23, &before);
    stream.extend_from_slice(&forger.record(22, &[24, 0]));
    stream.extend_from_slice(&forger.record(22, &[0, 1, 0]));
    gw.receive_split(&stream, &[3, 1, 7]);
    assert_eq!(gw.end, None);
    assert_eq!(gw.plain, before);
}

/// The ClientHello with a stray message in its record, as in `bad_input.rs`, but with
/// the ClientHello split across records as well.
#[test]
fn a_fragmented_client_hello_with_a_stray_message_is_refused_cleanly() {
    let hello = client_hello(0);
    let mut stray = vec![20, 0, 0, 32];
    stray.extend_from_slice(&[0u8; 32]);
    for size in [1, 2, 3, 4, 5, 50, 100, 1000] {
        let input = with_tail(
            &hello,
            &Tail::Fragmented {
                sizes: vec![size],
                bytes: stray.clone(),
                after: Vec::new(),
            },
        );
        for splits in [&[][..], &[1], &[5, 3], &[100]] {
            let mut gw = Gateway::new(&PKI.server);
            gw.receive_split(&input, splits);
            assert_eq!(
                gw.end,
                Some(CloseReason::TlsError),
                "fragments of {size}, {splits:?}"
            );
            assert!(!gw.out.is_empty(), "an alert for the client");
        }
    }
}

/// Garbage instead of a ClientHello gets one fatal alert, and the session stays failed.
/// The driver used to offer rustls the failed record again to flush the alert: rustls
/// failed on it again and queued a second fatal alert, which a debug assertion in rustls
/// refuses (a debug gateway's core went down on any garbage). A session fed again after
/// its failure, or asked to close, does not touch rustls.
#[test]
fn garbage_is_refused_with_exactly_one_alert() {
    for splits in [&[][..], &[1], &[3, 1]] {
        let mut gw = Gateway::new(&PKI.server);
        let mut garbage = b"this is not a TLS ClientHello\r\n".repeat(4);
        garbage.extend((0..=255u8).rev());
        gw.receive_split(&garbage, splits);
        assert_eq!(gw.end, Some(CloseReason::TlsError), "{splits:?}");
        let out = gw.take_out();
        let alerts = split_records(&out);
        assert_eq!(alerts.len(), 1, "{splits:?}: {out:?}");
        assert_eq!(alerts[0][0], 21, "{splits:?}: an alert record");
        assert_eq!(alerts[0][5], 2, "{splits:?}: a fatal alert");

        // What the session never does (it stops reading once closing), and what the
        // driver must survive anyway: fed again after its failure, and asked to close.
        let mut tls = TlsSession::new(PKI.server.clone()).expect("server session");
        let (mut staging, mut out, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        let mut first = garbage.clone();
        let fed = tls.feed_staged(
            &mut staging,
            &mut first,
            &mut Sink::new(&mut out, &mut plain),
        );
        assert_eq!(fed.end, Some(TlsEnd::Error));
        out.clear();
        let mut more = garbage.clone();
        let fed = tls.feed_staged(
            &mut staging,
            &mut more,
            &mut Sink::new(&mut out, &mut plain),
        );
        assert_eq!(fed.end, Some(TlsEnd::Error));
        assert_eq!(fed.consumed, 0);
        tls.close_notify(&mut more, &mut Sink::new(&mut out, &mut plain));
        assert!(out.is_empty(), "{splits:?}: nothing after the alert");
    }
}
