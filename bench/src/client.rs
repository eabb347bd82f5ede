//! What every client of the load generator shares: the TLS client configuration (TLS 1.3,
//! ALPN `holdfast/1`, the gateway's crypto provider, resumption only where asked for), resolving the
//! target, what a handshake negotiated, the stage a connection failed in and the counters
//! of those failures, and the payloads that tell connections and rounds apart.
//!
//! The connections themselves run on the io_uring client runtime in `uring`.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context};
use holdfast_wire::frame;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::report::StageFailures;

/// The order in which a client offers its TLS 1.3 suites (the gateway follows it). The
/// load generator and the ceiling offer what devices offer: Chrome, Firefox, Safari and
/// Android with AES hardware all put AES-128-GCM first. rustls' own client puts
/// AES-256-GCM first, whose SHA-384 key schedule costs the server several times more than
/// SHA-256 on CPUs with SHA extensions but no fast SHA-512 (AMD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SuiteOrder {
    /// AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305: as browsers and phones offer them.
    #[default]
    Devices,
    /// AES-256-GCM (SHA-384) first, as rustls' own client offers them.
    Rustls,
}

impl SuiteOrder {
    /// Orders `provider`'s suites this way.
    pub fn apply(self, provider: &mut rustls::crypto::CryptoProvider) {
        use rustls::CipherSuite as S;
        let rank: &[S] = match self {
            SuiteOrder::Devices => &[
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS13_AES_256_GCM_SHA384,
                S::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            SuiteOrder::Rustls => &[
                S::TLS13_AES_256_GCM_SHA384,
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS13_CHACHA20_POLY1305_SHA256,
            ],
        };
        provider.cipher_suites.sort_by_key(|s| {
            rank.iter()
                .position(|r| *r == s.suite())
                .unwrap_or(rank.len())
        });
    }
}

/// How often the client checks the server's handshake signature (TLS 1.3
/// CertificateVerify) once the server's certificate chain is pinned (see `PinAfterFirst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureChecks {
    /// On the first handshake with a chain and on one in [`SIGNATURE_SAMPLE`] after it:
    /// what a load generator needs to know it talks to the key holder, without spending
    /// an ECDSA verification (a quarter of the client's CPU per handshake) on each.
    #[default]
    Sampled,
    /// On every handshake, as a device does.
    Every,
}

/// With [`SignatureChecks::Sampled`], one handshake signature in this many is verified.
pub const SIGNATURE_SAMPLE: u64 = 64;

/// A TLS 1.3 client configuration trusting only the CA in `ca_pem`, offering only ALPN
/// `holdfast/1` and the suites in devices' order ([`SuiteOrder::Devices`]). Session
/// resumption is off: every connection pays a full handshake, as a fleet of distinct
/// devices would.
pub fn client_config(ca_pem: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    client_config_with(ca_pem, SuiteOrder::Devices, SignatureChecks::default())
}

/// The same, offering the TLS 1.3 suites in `order` and checking the server's handshake
/// signatures as `checks` says.
pub fn client_config_with(
    ca_pem: &Path,
    order: SuiteOrder,
    checks: SignatureChecks,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("reading CA certificates from {}", ca_pem.display()))?
    {
        let cert = cert.with_context(|| format!("parsing {}", ca_pem.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("adding a CA certificate from {}", ca_pem.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate in it", ca_pem.display());
    }
    let mut provider = holdfast::provider::default_provider();
    order.apply(&mut provider);
    let provider = Arc::new(provider);
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the certificate verifier")?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the crypto provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinAfterFirst::new(webpki, checks)))
        .with_no_client_auth();
    config.alpn_protocols = vec![frame::ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server's certificate chain is verified in full (webpki, against the given CA) the
/// first time; after that a byte-identical chain for the same name is accepted without
/// verifying it again. A load generator makes the same handshake thousands of times a
/// second, and re-validating one unchanging chain each time would spend the client's CPU,
/// the scarce side of a handshake benchmark, on work that tells nothing new. The server's
/// handshake signature (CertificateVerify) over a pinned chain is checked on one handshake
/// in [`SIGNATURE_SAMPLE`] ([`SignatureChecks::Sampled`], the default: an ECDSA P-256
/// verification is a quarter of the client's CPU per handshake, and with it the client
/// side was the limit of the short-connection figures) or on every one
/// ([`SignatureChecks::Every`]); the server signs every handshake either way, so its cost
/// is the same. Any other chain is verified in full, signature included.
#[derive(Debug)]
struct PinAfterFirst {
    inner: Arc<WebPkiServerVerifier>,
    /// (server name, end-entity certificate, intermediates) of the first verified chain.
    pinned: OnceLock<(String, Vec<u8>, Vec<Vec<u8>>)>,
    checks: SignatureChecks,
    /// Handshake signatures seen, for the sample.
    signatures: AtomicU64,
}

impl PinAfterFirst {
    fn new(inner: Arc<WebPkiServerVerifier>, checks: SignatureChecks) -> PinAfterFirst {
        PinAfterFirst {
            inner,
            pinned: OnceLock::new(),
            checks,
            signatures: AtomicU64::new(0),
        }
    }

    fn is_pinned(&self, ee: &[u8], intermediates: &[CertificateDer<'_>], name: &str) -> bool {
        self.pinned.get().is_some_and(|(n, e, i)| {
            n == name
                && e == ee
                && i.len() == intermediates.len()
                && i.iter().zip(intermediates).all(|(a, b)| a[..] == b[..])
        })
    }
}

impl ServerCertVerifier for PinAfterFirst {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = server_name.to_str();
        if self.is_pinned(end_entity, intermediates, &name) {
            return Ok(ServerCertVerified::assertion());
        }
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(crate::why::note_verify_error)?;
        let _ = self.pinned.set((
            name.into_owned(),
            end_entity.to_vec(),
            intermediates.iter().map(|c| c.to_vec()).collect(),
        ));
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.checks == SignatureChecks::Sampled
            && self.signatures.fetch_add(1, Ordering::Relaxed) % SIGNATURE_SAMPLE != 0
            && self
                .pinned
                .get()
                .is_some_and(|(_, ee, _)| ee[..] == cert[..])
        {
            return Ok(HandshakeSignatureValid::assertion());
        }
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `base` with a session store of its own that keeps the tickets servers send (rustls
/// keeps up to 8 TLS 1.3 tickets per server), so the next connection made with it resumes.
/// One store per simulated device: a ticket is used once, and devices do not share them.
pub fn resuming(base: &ClientConfig) -> Arc<ClientConfig> {
    let mut config = base.clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(16);
    Arc::new(config)
}

/// What a completed handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The server accepted a ticket from an earlier connection.
    pub resumed: bool,
    /// Cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: Option<String>,
    /// Key exchange group, e.g. `X25519`.
    pub kx_group: Option<String>,
}

/// Resolves `ADDR:PORT` (a host name is allowed) to its first socket address.
pub fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    target
        .to_socket_addrs()
        .with_context(|| format!("resolving {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))
}

/// The stage of a connection that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Binding the source address or the TCP connect.
    Connect,
    /// The TLS handshake, or the ALPN check after it.
    Handshake,
    /// A DATA frame's round trip.
    Echo,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Handshake => "handshake",
            Stage::Echo => "echo",
        })
    }
}

/// Why a connection attempt or exchange failed.
#[derive(Debug)]
pub struct Failure {
    /// Where it failed.
    pub stage: Stage,
    /// True when the deadline ran out rather than an error arriving.
    pub timed_out: bool,
    /// What happened.
    pub error: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.error)
    }
}

/// Failures of short connections counted by stage, shared by concurrent tasks.
#[derive(Debug, Default)]
pub struct StageCounters {
    connect_failed: AtomicU64,
    handshake_failed: AtomicU64,
    echo_failed: AtomicU64,
    timed_out: AtomicU64,
}

impl StageCounters {
    /// Counts `f` at its stage (and as a timeout where it was one). True for the first
    /// failure of each distinct reason in this process: that one is worth printing, the
    /// rest would flood the terminal with the same line.
    pub fn record(&self, f: &Failure) -> bool {
        match f.stage {
            Stage::Connect => &self.connect_failed,
            Stage::Handshake => &self.handshake_failed,
            Stage::Echo => &self.echo_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        if f.timed_out {
            self.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        crate::why::first_of_its_kind(&f.to_string())
    }

    /// The counts so far.
    pub fn get(&self) -> StageFailures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StageFailures {
            connect_failed: get(&self.connect_failed),
            handshake_failed: get(&self.handshake_failed),
            echo_failed: get(&self.echo_failed),
            timed_out: get(&self.timed_out),
        }
    }
}

/// A payload of `size` bytes that differs per connection and per round, so a frame
/// delivered to the wrong connection, or an old frame, is caught by the comparison.
pub fn payload(size: usize, conn: u64, round: u64) -> Vec<u8> {
    let seed = conn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.rotate_left(32);
    let bytes = seed.to_le_bytes();
    (0..size)
        .map(|i| bytes[i % 8].wrapping_add((i / 8) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_per_connection_and_round() {
        assert_eq!(payload(64, 1, 0).len(), 64);
        assert_eq!(payload(0, 1, 0), Vec::<u8>::new());
        assert_ne!(payload(64, 1, 0), payload(64, 2, 0));
        assert_ne!(payload(64, 1, 0), payload(64, 1, 1));
        assert_eq!(payload(64, 7, 3), payload(64, 7, 3));
    }

    /// A server config for a freshly generated CA and certificate; returns the CA's PEM.
    fn server(names: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let g = crate::certs::generate(&names).expect("certificates");
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(g.cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("chain");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(g.key.as_bytes()).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            holdfast::provider::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        config.alpn_protocols = vec![frame::ALPN.to_vec()];
        (Arc::new(config), g.ca)
    }

    fn handshake(
        client: &Arc<ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> Result<(), String> {
        handshake_as(client, server, "localhost")
    }

    /// Runs a handshake in memory for `name`; Err is the client's error.
    fn handshake_as(
        client: &Arc<ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
        name: &str,
    ) -> Result<(), String> {
        let name = ServerName::try_from(name.to_string()).expect("name");
        let mut c =
            rustls::ClientConnection::new(client.clone(), name).map_err(|e| e.to_string())?;
        let mut s = rustls::ServerConnection::new(server.clone()).expect("server");
        for _ in 0..8 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("client write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server read");
                if s.process_new_packets().is_err() {
                    break;
                }
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("server write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client read");
                c.process_new_packets().map_err(|e| e.to_string())?;
            }
            if !c.is_handshaking() {
                return Ok(());
            }
        }
        Err("the handshake did not finish".into())
    }

    fn config_for(ca_pem: &str, tag: &str) -> Arc<ClientConfig> {
        let path = std::env::temp_dir().join(format!(
            "holdfast-bench-pin-{}-{tag}.pem",
            std::process::id()
        ));
        std::fs::write(&path, ca_pem).expect("write the CA");
        let config = client_config(&path).expect("client config");
        let _ = std::fs::remove_file(&path);
        config
    }

    #[test]
    fn a_pinned_chain_passes_and_any_other_is_verified_in_full() {
        let (server_a, ca_a) = server(&["localhost"]);
        let (server_b, _) = server(&["localhost"]);
        let client = config_for(&ca_a, "a");
        // First verified in full, then accepted as pinned, again and again.
        for _ in 0..3 {
            handshake(&client, &server_a).expect("the CA's own server");
        }
        // A chain from another CA is verified in full and refused, pin or not.
        let err = handshake(&client, &server_b).expect_err("a foreign CA's server");
        assert!(
            err.contains("UnknownIssuer") || err.contains("certificate"),
            "{err}"
        );
        // And the pinned chain still passes afterwards.
        handshake(&client, &server_a).expect("the CA's own server again");
    }

    #[test]
    fn the_first_chain_must_verify_before_it_is_pinned() {
        let (server_a, ca_a) = server(&["localhost"]);
        let (server_b, _) = server(&["localhost"]);
        let client = config_for(&ca_a, "first");
        // The wrong server first: refused, and nothing pinned by it.
        assert!(handshake(&client, &server_b).is_err());
        assert!(handshake(&client, &server_b).is_err());
        handshake(&client, &server_a).expect("the CA's own server");
    }

    #[test]
    fn a_pinned_chain_is_pinned_for_its_name_only() {
        let (server_a, ca_a) = server(&["localhost"]);
        let client = config_for(&ca_a, "name");
        handshake(&client, &server_a).expect("pin it");
        let refused = handshake_as(&client, &server_a, "other.example").is_err();
        assert!(
            refused,
            "a certificate for localhost passed for other.example"
        );
    }
}
