//! TLS for the gateway: certificate loading with errors that name the file, the rustls
//! server configuration (versions, ALPN, SNI across several certificates), and
//! [`TlsSession`], the small seam between a connection and rustls' unbuffered API.
//!
//! The gateway owns every buffer: rustls never holds a receive or send buffer here. The
//! session is driven with the bytes of one receive and returns plaintext and records to
//! send through a [`TlsSink`]. Nothing in this module touches a socket.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::provider::tls as provider;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConnectionData, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{CommonState, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertConfig, Config};

/// A certificate or key that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: not a PEM certificate chain: {message}")]
    BadCertificate { path: String, message: String },
    #[error("{path}: no usable PEM private key found ({message})")]
    BadKey { path: String, message: String },
    #[error("{key} does not match the certificate in {cert}")]
    Mismatch { cert: String, key: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    TicketKey(#[from] crate::ticket::TicketKeyError),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Loads one certificate chain and its key, and checks that they belong together.
pub fn load_certified_key(c: &CertConfig) -> Result<CertifiedKey, TlsSetupError> {
    let cert_path = c.cert.display().to_string();
    let key_path = c.key.display().to_string();
    let cert_pem = read(&c.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::BadCertificate {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate { path: cert_path });
    }
    let key_pem = read(&c.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsSetupError::BadKey {
        path: key_path.clone(),
        message: e.to_string(),
    })?;
    let signer = provider::sign::any_supported_type(&key).map_err(|e| TlsSetupError::BadKey {
        path: key_path.clone(),
        message: e.to_string(),
    })?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        // A certificate whose public key rustls cannot parse is reported as a bad certificate.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Err(TlsSetupError::BadCertificate {
                path: cert_path,
                message: "unparsable public key".into(),
            })
        }
        Err(_) => Err(TlsSetupError::Mismatch {
            cert: cert_path,
            key: key_path,
        }),
    }
}

/// The session settings of the gateway's rustls server, beside its certificates, versions
/// and ALPN; `holdfast-bench ceiling` applies them too, so that "rustls alone" is rustls as
/// the gateway runs it.
/// - Session tickets let a reconnect storm resume instead of paying full handshakes: one per
///   handshake from `ticketer` (none without one). They are stateless (sealed with a
///   rotating key): rustls' default server-side cache holds 256 sessions, which a storm of
///   thousands of clients would overrun, and a cache sized for millions would cost memory
///   per connection.
/// - Hibernation takes an established TLS 1.3 connection off rustls: it needs the traffic
///   secrets (logged to the record layer's thread-local key log) and the sequence numbers
///   (secret extraction).
pub fn session_settings(
    sc: &mut ServerConfig,
    tls: &crate::config::TlsConfig,
    ticketer: Option<crate::ticket::FleetTicketer>,
) {
    if tls.hibernate_after_secs > 0 {
        sc.enable_secret_extraction = true;
        sc.key_log = Arc::new(crate::record::SecretLog);
    }
    match ticketer {
        Some(t) => {
            sc.ticketer = Arc::new(t);
            sc.send_tls13_tickets = 1;
        }
        None => sc.send_tls13_tickets = 0,
    }
}

/// Picks a certificate by SNI: exact (case-insensitive) name match, else the default.
#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

thread_local! {
    // The unbuffered server connection has no SNI accessor, but the resolver runs inside
    // `process_tls_records` on the calling thread, so it leaves the name here for the
    // session being driven to pick up.
    static SEEN_SNI: std::cell::RefCell<Option<Box<str>>> = const { std::cell::RefCell::new(None) };
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        SEEN_SNI.with(|s| *s.borrow_mut() = hello.server_name().map(Box::from));
        if let Some(name) = hello.server_name() {
            if let Some(ck) = self.by_name.get(&name.to_ascii_lowercase()) {
                return Some(ck.clone());
            }
        }
        Some(self.default.clone())
    }
}

/// Builds the shared server configuration at start (see [`ServerTls`] for reloads).
pub fn server_config(config: &Config) -> Result<Arc<ServerConfig>, TlsSetupError> {
    ServerTls::build(config, None, None).map(|t| t.server)
}

/// The server configuration the cores use for new handshakes, with the end-entity
/// certificate of each `[[tls.certs]]` entry, so a reload can say which ones changed.
#[derive(Clone)]
pub struct ServerTls {
    pub server: Arc<ServerConfig>,
    /// The end-entity certificate of each configured entry, in order.
    pub leaves: Vec<CertificateDer<'static>>,
    /// The process's own session-ticket secret, when tickets are on and no key file is
    /// named: kept across reloads, and handed to the new process by a live upgrade, so
    /// tickets issued before either still resume after it.
    pub process_ticket_secret: Option<[u8; crate::ticket::SECRET_LEN]>,
}

impl ServerTls {
    /// Loads every certificate and key from disk and builds the configuration. Without a
    /// ticket key file, the process's ticket secret is `previous`'s (a reload), else
    /// `inherited` (a live upgrade's, from the old process), else a new random one.
    pub fn build(
        config: &Config,
        previous: Option<&ServerTls>,
        inherited: Option<[u8; crate::ticket::SECRET_LEN]>,
    ) -> Result<ServerTls, TlsSetupError> {
        let mut by_name = HashMap::new();
        let mut default = None;
        let mut leaves = Vec::with_capacity(config.tls.certs.len());
        for c in &config.tls.certs {
            let ck = Arc::new(load_certified_key(c)?);
            leaves.push(ck.cert[0].clone());
            for name in &c.server_names {
                by_name
                    .entry(name.to_ascii_lowercase())
                    .or_insert_with(|| ck.clone());
            }
            default.get_or_insert(ck);
        }
        let default = default.ok_or_else(|| TlsSetupError::NoCertificate {
            path: "(no [[tls.certs]])".into(),
        })?;
        let versions: &[&'static rustls::SupportedProtocolVersion] = if config.tls12_enabled() {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let mut sc = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver { by_name, default }));
        // holdfast/1 first; http/1.1 (browsers name it for wss://) when WebSocket is served.
        sc.alpn_protocols = vec![holdfast_wire::frame::ALPN.to_vec()];
        if config.websocket.enabled {
            sc.alpn_protocols.push(b"http/1.1".to_vec());
        }
        let mut process_ticket_secret = None;
        let ticketer = if config.tls.session_tickets {
            let rotation = config.tls.ticket_rotation_secs;
            Some(match &config.tls.ticket_key_file {
                // The fleet's key file, read again on every reload (see `ticket.rs`).
                Some(file) => crate::ticket::FleetTicketer::from_file(file, rotation)?,
                None => {
                    let kept = previous.and_then(|p| p.process_ticket_secret).or(inherited);
                    let t = match kept {
                        Some(secret) => crate::ticket::FleetTicketer::new(&secret, rotation),
                        None => crate::ticket::FleetTicketer::random(rotation)?,
                    };
                    process_ticket_secret = Some(t.secret());
                    t
                }
            })
        } else {
            None
        };
        session_settings(&mut sc, &config.tls, ticketer);
        Ok(ServerTls {
            server: Arc::new(sc),
            leaves,
            process_ticket_secret,
        })
    }
}

/// What a TLS session hands back while it is driven.
pub trait TlsSink {
    /// Decrypted application data, in order.
    fn plaintext(&mut self, data: &[u8]);
    /// Space to write outgoing TLS bytes into: the sink grows its buffer to `min` free bytes
    /// and returns the spare part. What is written is committed with [`TlsSink::commit`];
    /// a spare part that is not committed (rustls wanted more room, or failed) holds no
    /// TLS bytes and is discarded by the next `out_spare` and when the sink is dropped.
    fn out_spare(&mut self, min: usize) -> &mut [u8];
    fn commit(&mut self, n: usize);
}

/// Where a [`VecSink`] puts decrypted application data.
pub trait Plaintext {
    fn push(&mut self, data: &[u8]);
}

impl Plaintext for Vec<u8> {
    fn push(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

/// Plaintext goes straight into the frame decoder (the load generator's clients).
impl Plaintext for holdfast_wire::frame::FrameBuf {
    fn push(&mut self, data: &[u8]) {
        holdfast_wire::frame::FrameBuf::push(self, data);
    }
}

/// The [`TlsSink`] over vectors: TLS output appended to `out` (a connection's send
/// queue), plaintext to `plain` (the gateway's scratch buffer, or a client's frame
/// decoder). A spare region starts at the end of `out`; a commit keeps only what was
/// written into it.
pub struct VecSink<'a, P: Plaintext = Vec<u8>> {
    out: &'a mut Vec<u8>,
    /// Bytes of `out` committed: TLS bytes to send. Beyond it lies at most one spare part.
    len: usize,
    plain: &'a mut P,
}

impl<'a, P: Plaintext> VecSink<'a, P> {
    pub fn new(out: &'a mut Vec<u8>, plain: &'a mut P) -> VecSink<'a, P> {
        VecSink {
            len: out.len(),
            out,
            plain,
        }
    }
}

impl<P: Plaintext> Drop for VecSink<'_, P> {
    fn drop(&mut self) {
        self.out.truncate(self.len);
    }
}

impl<P: Plaintext> TlsSink for VecSink<'_, P> {
    fn plaintext(&mut self, data: &[u8]) {
        self.plain.push(data);
    }
    fn out_spare(&mut self, min: usize) -> &mut [u8] {
        self.out.truncate(self.len);
        self.out.resize(self.len + min, 0);
        &mut self.out[self.len..]
    }
    fn commit(&mut self, n: usize) {
        self.len += n;
        self.out.truncate(self.len);
    }
}

/// Why a session stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEnd {
    /// The peer sent close_notify.
    PeerClosed,
    /// A protocol error (bad record, bad ClientHello, failed handshake); an alert is queued.
    Error,
}

/// Outcome of feeding bytes to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the input rustls is done with; the rest must be kept and offered again,
    /// with the next bytes appended (a record or handshake message split across reads).
    pub consumed: usize,
    /// The handshake completed during this call.
    pub handshake_done: bool,
    pub end: Option<TlsEnd>,
}

/// The one thing the record driver needs from a rustls unbuffered connection, server or
/// client: drive it over received bytes. Lets [`Records`] serve the gateway's sessions and
/// the load generator's clients with the same code.
pub trait Unbuffered {
    type Data;
    fn process<'c, 'i>(&'c mut self, input: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// What the handshake negotiated (ALPN, version, suite, resumption).
    fn common(&self) -> &CommonState;
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, input: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(input)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, input: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(input)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

/// The record layer of one connection over rustls' unbuffered API: feeds received bytes,
/// encrypts application data, queues close_notify. It owns no buffer; everything goes
/// through a [`TlsSink`].
pub struct Records<C> {
    conn: C,
    established: bool,
    /// A record failed: rustls must not be driven again. It would parse the failed record
    /// again and queue a second fatal alert (a debug assertion in rustls), and where it
    /// still holds ranges into input the caller no longer has, it would panic.
    failed: bool,
}

// Upper bound of TLS overhead per record (5 header + 1 content type + 16 tag, and TLS 1.2's
// explicit nonce), used to size the output before encrypting.
const RECORD_OVERHEAD: usize = 64;
const MAX_FRAGMENT: usize = 16 * 1024;

impl<C: Unbuffered> Records<C> {
    pub fn new(conn: C) -> Records<C> {
        Records {
            conn,
            established: false,
            failed: false,
        }
    }

    pub fn is_established(&self) -> bool {
        self.established
    }

    /// A record failed: the connection is dead for TLS, and nothing more is sent on it.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// What the handshake negotiated so far.
    pub fn common(&self) -> &CommonState {
        self.conn.common()
    }

    /// Drives the connection over `input` (received TLS bytes, decrypted in place). A
    /// client starts its handshake with an empty `input`: the ClientHello comes out.
    pub fn feed(&mut self, input: &mut [u8], sink: &mut impl TlsSink) -> Fed {
        let mut fed = Fed {
            consumed: 0,
            handshake_done: false,
            end: None,
        };
        if self.failed {
            fed.end = Some(TlsEnd::Error);
            return fed;
        }
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process(&mut input[fed.consumed..]);
            let step = match state {
                Err(_) => Step::Fail,
                Ok(state) => {
                    handle_state(state, sink, &mut self.established, &mut fed.handshake_done)
                }
            };
            fed.consumed += discard;
            match step {
                Step::Continue => {}
                Step::Blocked => return fed,
                Step::PeerClosed => {
                    fed.end = Some(TlsEnd::PeerClosed);
                    return fed;
                }
                Step::Fail => {
                    self.failed = true;
                    self.flush_alert(&mut input[fed.consumed..], sink);
                    fed.end = Some(TlsEnd::Error);
                    return fed;
                }
            }
        }
    }

    /// Drives the connection over the bytes of one receive, with `staging` holding what
    /// earlier receives left unconsumed (a record or handshake message split across
    /// receives). This is the one staging loop: when nothing is staged the receive buffer
    /// is fed in place and only an unconsumed tail is copied into `staging`; otherwise the
    /// bytes are appended and the staged whole is fed. `staging` is left empty (and
    /// unallocated) once nothing is partial, so an idle connection owns no buffer.
    pub fn feed_staged(
        &mut self,
        staging: &mut Vec<u8>,
        input: &mut [u8],
        sink: &mut impl TlsSink,
    ) -> Fed {
        with_staging(staging, input, |buf| self.feed(buf, sink))
    }

    /// After an error rustls may have queued an alert: encode it so the peer learns why.
    /// `rest` is the input not yet discarded: rustls may still hold ranges into it (a
    /// handshake message joined from several records), and offering it anything else
    /// makes rustls panic. Only what is queued is taken: once the queue is empty, rustls
    /// would parse `rest` again, fail on the same record again and queue a second fatal
    /// alert, which a debug assertion in rustls refuses.
    fn flush_alert(&mut self, rest: &mut [u8], sink: &mut impl TlsSink) {
        while self.conn.common().wants_write() {
            match self.conn.process(rest).state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, sink),
                _ => return,
            }
        }
    }

    /// Encrypts application data towards the peer. Only valid once established.
    /// `pending` is the staged partial input (which must be offered unchanged).
    pub fn encrypt(
        &mut self,
        pending: &mut [u8],
        data: &[u8],
        sink: &mut impl TlsSink,
    ) -> Result<(), TlsEnd> {
        debug_assert!(self.established);
        if self.failed {
            return Err(TlsEnd::Error);
        }
        let mut data = data;
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process(pending);
            debug_assert_eq!(discard, 0, "pending input is never complete");
            match state {
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    while !data.is_empty() {
                        let n = data.len().min(MAX_FRAGMENT * 4);
                        let want = n + (n / MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
                        let r = match w.encrypt(&data[..n], sink.out_spare(want)) {
                            Err(EncryptError::InsufficientSize(s)) => {
                                w.encrypt(&data[..n], sink.out_spare(s.required_size))
                            }
                            r => r,
                        };
                        sink.commit(r.map_err(|_| TlsEnd::Error)?);
                        data = &data[n..];
                    }
                    return Ok(());
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, sink),
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return Err(TlsEnd::Error),
            }
        }
    }

    /// Queues close_notify. Best effort: a session that cannot write any more is just closed.
    pub fn close_notify(&mut self, pending: &mut [u8], sink: &mut impl TlsSink) {
        if self.failed {
            return;
        }
        if let Ok(ConnectionState::WriteTraffic(mut w)) = self.conn.process(pending).state {
            if let Ok(n) = w.queue_close_notify(sink.out_spare(RECORD_OVERHEAD)) {
                sink.commit(n);
            }
        }
    }
}

/// The staging rule every record layer follows over one receive: with nothing staged the
/// receive is fed in place and only an unconsumed tail is copied into `staging`;
/// otherwise the receive is appended and the staged whole is fed. `staging` is left empty
/// (and unallocated) once nothing is partial or the stream ended, so an idle connection
/// owns no buffer. `feed` processes what it can of a buffer and says how much.
pub fn with_staging(
    staging: &mut Vec<u8>,
    input: &mut [u8],
    feed: impl FnOnce(&mut [u8]) -> Fed,
) -> Fed {
    if staging.is_empty() {
        let fed = feed(input);
        debug_assert!(fed.consumed <= input.len(), "consumed more than offered");
        if fed.consumed < input.len() && fed.end.is_none() {
            staging.extend_from_slice(&input[fed.consumed..]);
        }
        fed
    } else {
        staging.extend_from_slice(input);
        let fed = feed(staging);
        debug_assert!(fed.consumed <= staging.len(), "consumed more than offered");
        if fed.end.is_some() || fed.consumed >= staging.len() {
            *staging = Vec::new();
        } else {
            staging.drain(..fed.consumed);
        }
        fed
    }
}

/// One gateway connection's TLS state: the record driver plus the SNI the client sent. A
/// thin wrapper so that the record layer can be replaced (rustls' successor drops the
/// unbuffered API; hibernation replaces it with our own).
pub struct TlsSession {
    records: Records<UnbufferedServerConnection>,
    sni: Option<Box<str>>,
    /// The configuration allows `into_secrets` (hibernation).
    extractable: bool,
}

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsSession, rustls::Error> {
        let extractable = config.enable_secret_extraction;
        Ok(TlsSession {
            records: Records::new(UnbufferedServerConnection::new(config)?),
            sni: None,
            extractable,
        })
    }

    /// The SNI the client sent, moved out (the session keeps it from then on).
    pub fn take_server_name(&mut self) -> Option<Box<str>> {
        self.sni.take()
    }

    pub fn negotiated_cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.records.common().negotiated_cipher_suite()
    }

    /// Whether the session could be converted now: established, secret extraction on,
    /// nothing failed, and no TLS bytes waiting inside rustls.
    pub fn can_extract(&self) -> bool {
        self.extractable
            && self.records.is_established()
            && !self.records.has_failed()
            && !self.records.common().wants_write()
    }

    /// Gives up the rustls connection for its sequence numbers and traffic keys
    /// (`dangerous_into_kernel_connection`): only after every pending record was encoded
    /// and every decrypted record read, or the sequence numbers would be off by one.
    pub fn into_secrets(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        self.records
            .conn
            .dangerous_into_kernel_connection()
            .map(|(secrets, _kernel)| secrets)
    }

    pub fn is_established(&self) -> bool {
        self.records.is_established()
    }

    /// See [`Records::has_failed`].
    pub fn has_failed(&self) -> bool {
        self.records.has_failed()
    }

    /// The SNI the client sent, once the ClientHello was processed.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    pub fn alpn(&self) -> Option<&[u8]> {
        self.records.common().alpn_protocol()
    }

    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.records.common().protocol_version()
    }

    /// Whether the handshake resumed a session (known once it is done).
    pub fn resumed(&self) -> bool {
        self.records.common().handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// See [`Records::feed_staged`].
    pub fn feed_staged(
        &mut self,
        staging: &mut Vec<u8>,
        input: &mut [u8],
        sink: &mut impl TlsSink,
    ) -> Fed {
        let established = self.records.is_established();
        if !established {
            SEEN_SNI.with(|s| s.borrow_mut().take());
        }
        let fed = self.records.feed_staged(staging, input, sink);
        if !established || fed.handshake_done {
            if let Some(name) = SEEN_SNI.with(|s| s.borrow_mut().take()) {
                self.sni = Some(name);
            }
        }
        fed
    }

    /// See [`Records::encrypt`].
    pub fn encrypt(
        &mut self,
        pending: &mut [u8],
        data: &[u8],
        sink: &mut impl TlsSink,
    ) -> Result<(), TlsEnd> {
        self.records.encrypt(pending, data, sink)
    }

    /// See [`Records::close_notify`].
    pub fn close_notify(&mut self, pending: &mut [u8], sink: &mut impl TlsSink) {
        self.records.close_notify(pending, sink)
    }
}

enum Step {
    Continue,
    Blocked,
    PeerClosed,
    Fail,
}

fn encode<D>(e: &mut rustls::unbuffered::EncodeTlsData<'_, D>, sink: &mut impl TlsSink) {
    let mut want = 4096;
    loop {
        let out = sink.out_spare(want);
        match e.encode(out) {
            Ok(n) => return sink.commit(n),
            Err(EncodeError::InsufficientSize(s)) => want = s.required_size,
            Err(EncodeError::AlreadyEncoded) => return,
        }
    }
}

fn handle_state<D>(
    state: ConnectionState<'_, '_, D>,
    sink: &mut impl TlsSink,
    established: &mut bool,
    done: &mut bool,
) -> Step {
    match state {
        ConnectionState::ReadTraffic(mut r) => {
            while let Some(rec) = r.next_record() {
                match rec {
                    Ok(rec) => sink.plaintext(rec.payload),
                    Err(_) => return Step::Fail,
                }
            }
            Step::Continue
        }
        ConnectionState::EncodeTlsData(mut e) => {
            encode(&mut e, sink);
            Step::Continue
        }
        // The bytes are already in the sink's queue; the caller sends them after feeding.
        ConnectionState::TransmitTlsData(t) => {
            t.done();
            Step::Continue
        }
        ConnectionState::WriteTraffic(_) => {
            if !*established {
                *established = true;
                *done = true;
            }
            Step::Blocked
        }
        ConnectionState::BlockedHandshake => Step::Blocked,
        ConnectionState::PeerClosed | ConnectionState::Closed => Step::PeerClosed,
        // Early data is not enabled (max_early_data_size is 0), so rustls never yields it.
        ConnectionState::ReadEarlyData(_) => Step::Fail,
        _ => Step::Fail,
    }
}
