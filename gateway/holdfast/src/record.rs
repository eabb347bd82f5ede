//! holdfast's own TLS 1.3 record layer, the basis of hibernation: an established, idle
//! TLS 1.3 connection gives up its rustls object and keeps only a [`Hibernated`] value
//! (the cipher suite, the two application traffic secrets and the two sequence numbers,
//! 128 bytes, no heap). When a record arrives or must leave, [`Hibernated::wake`] gives a
//! [`RecordLayer`] that expands the AEAD key of the direction it needs, and
//! [`RecordLayer::hibernate`] drops the expanded keys again. This module is pure: it
//! never touches a socket, a clock or a buffer of its own; every byte comes from and goes
//! to the caller's buffers. It must never wrap a sequence number, hand out plaintext that
//! did not authenticate, or panic on anything a peer sends.
//!
//! # Getting there from rustls
//! rustls' [`ExtractedSecrets`] carry the sequence numbers and the *expanded* key and IV,
//! but a KeyUpdate needs the traffic secrets they came from. Those come through the
//! [`SecretLog`] key log: install it as `ServerConfig::key_log` (with
//! `enable_secret_extraction = true`); rustls calls it inside `process_tls_records` on the
//! driving thread, and [`take_traffic_secrets`] picks the two secrets up there, right
//! after the call that produced them (another connection's handshake on the same thread
//! would replace them). Once every pending record was encoded and every decrypted record
//! read, `dangerous_into_kernel_connection` gives the [`ExtractedSecrets`], and
//! [`Hibernated::from_rustls`] checks the secrets against them: the key and IV derived
//! from each secret must equal the ones rustls used, after at most
//! [`MAX_CATCH_UP`] KeyUpdates that rustls already applied. Otherwise it refuses, and the
//! caller keeps rustls for that connection. One trap it catches: rustls' unbuffered API
//! answers a client's KeyUpdate request by moving to its next sending key at once while
//! holding its KeyUpdate back until the next application data it encrypts, and a
//! conversion in between loses that KeyUpdate. So a conversion after rustls rotated its
//! sending key is refused ([`HibernateError::KeyUpdatePending`]) until a record was sealed
//! under the new key; the caller retries after its next write.
//!
//! # What a record may be
//! After the handshake only encrypted records of outer type application_data (23) and
//! legacy version 0x0303 are accepted; a ciphertext over 2^14 + 256 bytes is refused from
//! its header, before its body arrives, and an inner plaintext over 2^14 + 1 bytes
//! (padding included, RFC 8446 §5.4) after decryption. Inside: application data, an alert
//! (close_notify ends the stream, user_canceled is ignored, any other alert is fatal
//! whatever its level, RFC 8446 §6), or one KeyUpdate filling the whole record. A KeyUpdate split across records, several
//! handshake messages in one record, any other handshake message (a client's
//! NewSessionTicket, a ClientHello) and a protected ChangeCipherSpec are refused with
//! unexpected_message. A KeyUpdate with update_requested is answered at once: our
//! KeyUpdate(update_not_requested), sealed under the old send key, is appended to the
//! caller's output before the send secret moves on (RFC 8446 §4.6.3). Requests that
//! arrive while we send no application data get that one answer (as rustls does; a
//! rustls peer refuses more than 32 KeyUpdates between two application data records). As in rustls, at
//! most [`KEY_UPDATES_WITHOUT_DATA`] KeyUpdates may arrive without application data
//! between them. The send key is also rotated on our own initiative before it has
//! protected the suite's confidentiality limit of records (millions for AES-GCM; none for
//! ChaCha20-Poly1305), and no sequence number is ever used past `u64::MAX - 1`.
//!
//! # Sizes (rustls 0.23.46, ring, x86_64)
//! - [`Hibernated`]: 128 B inline, no heap.
//! - [`RecordLayer`]: 176 B inline, plus one 560 B heap block per direction it has
//!   expanded, in every suite (ring's key type is an enum sized for the AES key schedule,
//!   kept inline in the boxed encrypter or decrypter, so `size_of_val` of the box is its
//!   whole heap; the `sizes` test prints them). Both directions awake: 1 296 B. Another
//!   provider may differ (aws-lc-rs allocates its key state with C malloc).
//!
//! # What rustls API it uses
//! The provider's [`Tls13CipherSuite`]: `hkdf_provider` for HKDF-Expand-Label and
//! `aead_alg` for the per-record encrypter and decrypter, so it follows whichever provider
//! rustls is built with. One doc-hidden item is used: `rustls::internal::derive_traffic_key`,
//! because rustls offers no public way to build an [`AeadKey`] shorter than 32 bytes
//! (AES-128). The gateway stays on rustls 0.23 (the last line with the unbuffered API), so
//! a change there is seen on upgrade, and [`Hibernated::from_rustls`] checks every derived
//! key against the one rustls itself uses.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::fmt;

use rustls::crypto::cipher::{AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, NONCE_LEN};
use rustls::crypto::tls13::{HkdfExpander, OkmBlock};
use rustls::{
    AlertDescription, CipherSuite, ConnectionTrafficSecrets, ContentType, ExtractedSecrets, KeyLog,
    ProtocolVersion, SupportedCipherSuite, Tls13CipherSuite,
};
use zeroize::Zeroize;

use crate::provider::primitives::aead;

/// The most plaintext one record may carry (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The most ciphertext one record may carry (RFC 8446 §5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A record header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// How many KeyUpdates rustls may have applied before the conversion that
/// [`Hibernated::from_rustls`] still follows.
pub const MAX_CATCH_UP: usize = 4;
/// KeyUpdates accepted in a row without application data between them (rustls and
/// BoringSSL allow 32): each costs a key derivation, so a flood of them is refused.
pub const KEY_UPDATES_WITHOUT_DATA: u8 = 32;

/// The largest traffic secret: SHA-384's output.
const MAX_SECRET: usize = 48;
const TYPE_ALERT: u8 = 21;
const TYPE_HANDSHAKE: u8 = 22;
const TYPE_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0];
const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;

const CLIENT_LABEL: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_LABEL: &str = "SERVER_TRAFFIC_SECRET_0";

/// One traffic secret (32 or 48 bytes), zeroed when dropped. Deliberately not `Clone`.
struct Secret {
    bytes: [u8; MAX_SECRET],
    len: u8,
}

impl Secret {
    fn new(secret: &[u8]) -> Option<Secret> {
        let mut bytes = [0; MAX_SECRET];
        bytes.get_mut(..secret.len())?.copy_from_slice(secret);
        Some(Secret {
            bytes,
            // Fits: at most MAX_SECRET, checked by the `get_mut` above.
            len: secret.len() as u8,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The expander keyed with this secret, for HKDF-Expand-Label.
    fn expander(&self, suite: &Tls13CipherSuite) -> Box<dyn HkdfExpander> {
        suite
            .hkdf_provider
            .expander_for_okm(&OkmBlock::new(self.as_bytes()))
    }

    /// The next generation of this secret (RFC 8446 §7.2, "traffic upd").
    fn next(&self, suite: &Tls13CipherSuite) -> Secret {
        let mut bytes = [0; MAX_SECRET];
        let out = &mut bytes[..usize::from(self.len)];
        expand_label(self.expander(suite).as_ref(), b"traffic upd", out);
        Secret {
            bytes,
            len: self.len,
        }
    }

    /// The record key and IV this secret gives (RFC 8446 §7.3).
    fn traffic_keys(&self, suite: &Tls13CipherSuite) -> (AeadKey, Iv) {
        let expander = self.expander(suite);
        let key = rustls::internal::derive_traffic_key(expander.as_ref(), suite.aead_alg);
        let mut iv = [0; NONCE_LEN];
        expand_label(expander.as_ref(), b"iv", &mut iv);
        (key, Iv::from(iv))
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 §7.1).
fn expand_label(expander: &dyn HkdfExpander, label: &[u8], out: &mut [u8]) {
    const PREFIX: &[u8] = b"tls13 ";
    // Both fit: `out` is at most 48 bytes and the labels here are short.
    let out_len = (out.len() as u16).to_be_bytes();
    let label_len = [(PREFIX.len() + label.len()) as u8];
    let info: [&[u8]; 5] = [&out_len, &label_len, PREFIX, label, &[0]];
    // Only fails for outputs over 255 hash blocks; ours is at most one block.
    expander
        .expand_slice(&info, out)
        .expect("HKDF-Expand of at most one hash block");
}

/// Compares without an early exit, as is usual for key material.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// The key log

/// The two application traffic secrets of one handshake, as logged by rustls.
pub struct TrafficSecrets {
    client_random: [u8; 32],
    client: Secret,
    server: Secret,
}

impl TrafficSecrets {
    /// The ClientHello random of the handshake that produced them.
    pub fn client_random(&self) -> &[u8; 32] {
        &self.client_random
    }

    /// `CLIENT_TRAFFIC_SECRET_0`.
    pub fn client(&self) -> &[u8] {
        self.client.as_bytes()
    }

    /// `SERVER_TRAFFIC_SECRET_0`.
    pub fn server(&self) -> &[u8] {
        self.server.as_bytes()
    }
}

impl fmt::Debug for TrafficSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrafficSecrets").finish_non_exhaustive()
    }
}

/// What the key log has seen on this thread: at most one handshake's secrets.
struct Logged {
    client_random: [u8; 32],
    client: Option<Secret>,
    server: Option<Secret>,
}

thread_local! {
    // rustls calls the key log inside `process_tls_records`, on the thread that drives the
    // connection, and both application secrets come in the same call. The caller takes
    // them right after that call, before another connection's handshake runs here.
    static LOGGED: RefCell<Option<Logged>> = const { RefCell::new(None) };
}

/// A rustls [`KeyLog`] that keeps the two application traffic secrets of the latest
/// handshake on this thread for [`take_traffic_secrets`]. It logs nothing else, and
/// nothing leaves the process.
#[derive(Debug, Default, Clone, Copy)]
pub struct SecretLog;

impl KeyLog for SecretLog {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let (Ok(random), Some(secret)) = (<[u8; 32]>::try_from(client_random), Secret::new(secret))
        else {
            return;
        };
        LOGGED.with(|logged| {
            let mut logged = logged.borrow_mut();
            let entry = match &mut *logged {
                Some(e) if e.client_random == random => e,
                slot => slot.insert(Logged {
                    client_random: random,
                    client: None,
                    server: None,
                }),
            };
            match label {
                CLIENT_LABEL => entry.client = Some(secret),
                SERVER_LABEL => entry.server = Some(secret),
                _ => {}
            }
        });
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_LABEL || label == SERVER_LABEL
    }
}

/// Takes the traffic secrets [`SecretLog`] saw last on this thread, if both arrived. The
/// thread's slot is empty afterwards either way.
pub fn take_traffic_secrets() -> Option<TrafficSecrets> {
    let logged = LOGGED.with(|l| l.borrow_mut().take())?;
    Some(TrafficSecrets {
        client_random: logged.client_random,
        client: logged.client?,
        server: logged.server?,
    })
}

// ---------------------------------------------------------------------------------------
// The hibernated state

/// Why a connection cannot hibernate; the caller keeps rustls for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HibernateError {
    #[error("only TLS 1.3 connections hibernate")]
    NotTls13,
    #[error("the extracted keys are not for an AEAD this record layer knows")]
    UnsupportedKeys,
    #[error("a traffic secret has the wrong length for the cipher suite")]
    SecretLength,
    #[error("the traffic secrets do not give the keys rustls used (another connection's secrets, or too many KeyUpdates)")]
    KeyMismatch,
    #[error("rustls moved to a new sending key and sealed nothing under it yet: its KeyUpdate may still be queued; try again after the next write")]
    KeyUpdatePending,
    #[error("the hand-over state ends early")]
    Truncated,
    #[error("the hand-over state names a cipher suite this process does not offer")]
    UnknownSuite,
    #[error("the hand-over state has unknown flags or an impossible KeyUpdate count")]
    BadState,
}

/// The peer's close_notify arrived: nothing more is read.
const PEER_CLOSED: u8 = 1;
/// A record failed (or a sequence number ran out): nothing more is read or sealed, except
/// one alert.
const FAILED: u8 = 2;
/// close_notify or an alert was sealed: nothing more is sealed.
const SEND_CLOSED: u8 = 4;
/// We answered a KeyUpdate request and have sealed no application data since: further
/// requests until then need no answer of their own (RFC 8446 §4.6.3).
const ANSWERED: u8 = 8;

/// An established TLS 1.3 server connection at rest: its suite, traffic secrets and
/// sequence numbers, and nothing expanded. Not `Clone`: two copies would seal different
/// records under the same nonce.
pub struct Hibernated {
    suite: &'static Tls13CipherSuite,
    /// The peer's (client's) current application traffic secret.
    rx: Secret,
    /// Ours (the server's).
    tx: Secret,
    rx_seq: u64,
    tx_seq: u64,
    key_updates_left: u8,
    flags: u8,
}

impl Hibernated {
    /// Builds the state of a server connection from rustls: `client_secret` and
    /// `server_secret` as [`SecretLog`] saw them, `extracted` from
    /// `dangerous_into_kernel_connection`. Checks that the secrets give the keys rustls
    /// was using, following KeyUpdates that happened under rustls.
    pub fn from_rustls(
        suite: SupportedCipherSuite,
        client_secret: &[u8],
        server_secret: &[u8],
        extracted: &ExtractedSecrets,
    ) -> Result<Hibernated, HibernateError> {
        let SupportedCipherSuite::Tls13(suite) = suite else {
            return Err(HibernateError::NotTls13);
        };
        let secret = |s: &[u8]| {
            Secret::new(s)
                .filter(|s| usize::from(s.len) == suite.common.hash_provider.output_len())
                .ok_or(HibernateError::SecretLength)
        };
        let (rx_seq, rx_keys) = &extracted.rx;
        let (tx_seq, tx_keys) = &extracted.tx;
        let (rx, _) = catch_up(suite, secret(client_secret)?, rx_keys)?;
        let (tx, tx_updates) = catch_up(suite, secret(server_secret)?, tx_keys)?;
        // rustls answers a KeyUpdate request by sealing its KeyUpdate under the old key and
        // holding it back until the next application data (unbuffered API); a conversion
        // in between loses it, and the peer would never learn of our new key. Once a record
        // was sealed under the new key, the KeyUpdate went out before it.
        if tx_updates > 0 && *tx_seq == 0 {
            return Err(HibernateError::KeyUpdatePending);
        }
        Ok(Hibernated {
            suite,
            rx,
            tx,
            rx_seq: *rx_seq,
            tx_seq: *tx_seq,
            key_updates_left: KEY_UPDATES_WITHOUT_DATA,
            flags: 0,
        })
    }

    /// Appends the state in the hand-over format (`handover.rs`): the suite's IANA code,
    /// both secrets with their lengths, both sequence numbers, the KeyUpdate allowance and
    /// the flags. Secret bytes leave the process only over the upgrade socket.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&u16::from(self.suite.common.suite).to_le_bytes());
        for s in [&self.rx, &self.tx] {
            out.push(s.len);
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.rx_seq.to_le_bytes());
        out.extend_from_slice(&self.tx_seq.to_le_bytes());
        out.push(self.key_updates_left);
        out.push(self.flags);
    }

    /// The state [`Hibernated::encode`] wrote, at the start of `input`, with the number of
    /// bytes it took. The suite must be one of `suites` (this process's provider), and
    /// every field is checked: secret lengths against the suite's hash, known flags only.
    pub fn decode(
        input: &[u8],
        suites: &[&'static Tls13CipherSuite],
    ) -> Result<(Hibernated, usize), HibernateError> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], HibernateError> {
            let b = input.get(at..at + n).ok_or(HibernateError::Truncated)?;
            at += n;
            Ok(b)
        };
        let code = u16::from_le_bytes(take(2)?.try_into().expect("two bytes"));
        let suite = *suites
            .iter()
            .find(|s| u16::from(s.common.suite) == code)
            .ok_or(HibernateError::UnknownSuite)?;
        let hash_len = suite.common.hash_provider.output_len();
        let mut secret = || -> Result<Secret, HibernateError> {
            let len = usize::from(take(1)?[0]);
            if len != hash_len {
                return Err(HibernateError::SecretLength);
            }
            Secret::new(take(len)?).ok_or(HibernateError::SecretLength)
        };
        let rx = secret()?;
        let tx = secret()?;
        let rx_seq = u64::from_le_bytes(take(8)?.try_into().expect("eight bytes"));
        let tx_seq = u64::from_le_bytes(take(8)?.try_into().expect("eight bytes"));
        let key_updates_left = take(1)?[0];
        let flags = take(1)?[0];
        if flags & !(PEER_CLOSED | FAILED | SEND_CLOSED | ANSWERED) != 0
            || key_updates_left > KEY_UPDATES_WITHOUT_DATA
        {
            return Err(HibernateError::BadState);
        }
        let state = Hibernated {
            suite,
            rx,
            tx,
            rx_seq,
            tx_seq,
            key_updates_left,
            flags,
        };
        Ok((state, at))
    }

    /// Makes the record layer ready to open and seal; keys are expanded on first use.
    pub fn wake(self) -> RecordLayer {
        RecordLayer {
            // The KeyUpdate takes the last number, so the key protects exactly the limit.
            rekey_at: self
                .suite
                .common
                .confidentiality_limit
                .saturating_sub(1)
                .min(u64::MAX - 1),
            seq_max: u64::MAX,
            state: self,
            rx: None,
            tx: None,
        }
    }

    pub fn suite(&self) -> &'static Tls13CipherSuite {
        self.suite
    }

    /// The sequence numbers of the next record to open and to seal.
    pub fn sequence_numbers(&self) -> (u64, u64) {
        (self.rx_seq, self.tx_seq)
    }
}

impl fmt::Debug for Hibernated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hibernated")
            .field("suite", &self.suite.common.suite)
            .field("rx_seq", &self.rx_seq)
            .field("tx_seq", &self.tx_seq)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// Follows `secret` through up to [`MAX_CATCH_UP`] KeyUpdates until it gives `keys`;
/// returns it and how many KeyUpdates that took.
fn catch_up(
    suite: &'static Tls13CipherSuite,
    mut secret: Secret,
    keys: &ConnectionTrafficSecrets,
) -> Result<(Secret, usize), HibernateError> {
    let (key, iv) = match keys {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        _ => return Err(HibernateError::UnsupportedKeys),
    };
    for updates in 0..=MAX_CATCH_UP {
        let (k, i) = secret.traffic_keys(suite);
        if same_bytes(k.as_ref(), key.as_ref()) && same_bytes(i.as_ref(), iv.as_ref()) {
            return Ok((secret, updates));
        }
        secret = secret.next(suite);
    }
    Err(HibernateError::KeyMismatch)
}

// ---------------------------------------------------------------------------------------
// The active record layer

/// Why a record could not be opened or sealed. After any of them the connection is done:
/// send [`RecordError::alert`] (with [`RecordLayer::seal_alert`]) if there is one, then
/// close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a record did not authenticate (tampered, or not for this connection)")]
    BadRecordMac,
    #[error("a record longer than TLS allows")]
    RecordOverflow,
    #[error("a record or message not allowed after the handshake")]
    UnexpectedMessage,
    #[error("a malformed alert or KeyUpdate")]
    DecodeError,
    #[error("a KeyUpdate with an invalid request value")]
    IllegalParameter,
    #[error("the peer sent the fatal alert {0:?}")]
    PeerAlert(AlertDescription),
    #[error("a record sequence number reached its limit; close the connection")]
    SequenceExhausted,
    #[error("the crypto provider failed to encrypt a record")]
    EncryptFailed,
    #[error("an earlier record failed; nothing more is read or sent")]
    Failed,
    #[error("close_notify or an alert was already sent; nothing more is sent")]
    SendClosed,
}

impl RecordError {
    /// The alert to send the peer before closing, if any.
    pub fn alert(&self) -> Option<AlertDescription> {
        match self {
            RecordError::BadRecordMac => Some(AlertDescription::BadRecordMac),
            RecordError::RecordOverflow => Some(AlertDescription::RecordOverflow),
            RecordError::UnexpectedMessage => Some(AlertDescription::UnexpectedMessage),
            RecordError::DecodeError => Some(AlertDescription::DecodeError),
            RecordError::IllegalParameter => Some(AlertDescription::IllegalParameter),
            // The peer gave up already; a sequence number that ran out, or a failed
            // encrypter, leaves nothing to seal an alert with.
            RecordError::PeerAlert(_)
            | RecordError::SequenceExhausted
            | RecordError::EncryptFailed
            | RecordError::Failed
            | RecordError::SendClosed => None,
        }
    }
}

/// What one call to [`RecordLayer::open`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// Application data, decrypted in place in the input (may be empty).
    Data(&'a [u8]),
    /// The record is not complete yet: keep the input, append more, offer it again.
    /// `needed` is the whole record's length once its header is in, else the header's.
    Incomplete { needed: usize },
    /// The peer rotated its sending key. With `requested`, it asked us to rotate ours: our
    /// answering KeyUpdate was appended to the output and our key rotated, unless we had
    /// answered a request already and sent no application data since.
    KeyUpdate { requested: bool },
    /// close_notify: the peer sends nothing more (anything after it is ignored).
    Closed,
    /// A user_canceled warning; a close_notify should follow.
    UserCanceled,
}

/// The outcome of [`RecordLayer::open`].
#[derive(Debug, PartialEq, Eq)]
pub struct Opened<'a> {
    /// Input bytes done with (one record, or none when incomplete); the caller drops them
    /// and offers the rest again.
    pub consumed: usize,
    pub record: Record<'a>,
}

/// Seals TLS 1.3 records with the provider's plain AEAD, straight into the caller's
/// output (no allocation per record): the record header, the inner plaintext (payload and
/// content type, no padding) encrypted in place, the tag. Not rustls' own encrypter:
/// aws-lc's TLS 1.3 AES-GCM sealing key takes the first sequence number it sees as 0 and
/// refuses any later one that is not larger when XORed with it, so it cannot continue a
/// session at sequence number N, which is what waking from hibernation and a live upgrade
/// do. The sequence rules it would enforce are this module's own (`seal_record`).
struct Sealer {
    key: aead::LessSafeKey,
    iv: Iv,
}

impl Sealer {
    fn new(suite: &Tls13CipherSuite, key: &AeadKey, iv: Iv) -> Option<Sealer> {
        let alg = match suite.common.suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => &aead::AES_128_GCM,
            CipherSuite::TLS13_AES_256_GCM_SHA384 => &aead::AES_256_GCM,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => &aead::CHACHA20_POLY1305,
            _ => return None,
        };
        let key = aead::UnboundKey::new(alg, key.as_ref()).ok()?;
        Some(Sealer {
            key: aead::LessSafeKey::new(key),
            iv,
        })
    }

    /// Appends one record of type `typ` carrying `payload` (at most 2^14 bytes), sealed
    /// with sequence number `seq`.
    fn seal(
        &self,
        typ: ContentType,
        payload: &[u8],
        seq: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), ()> {
        let start = out.len();
        let len = payload.len() + 1 + self.key.algorithm().tag_len();
        let header = [
            u8::from(ContentType::ApplicationData),
            3,
            3,
            (len >> 8) as u8,
            len as u8,
        ];
        out.reserve(HEADER_LEN + len);
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        out.push(u8::from(typ));
        let nonce =
            aead::Nonce::assume_unique_for_key(rustls::crypto::cipher::Nonce::new(&self.iv, seq).0);
        match self.key.seal_in_place_separate_tag(
            nonce,
            aead::Aad::from(header),
            &mut out[start + HEADER_LEN..],
        ) {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(())
            }
        }
    }
}

/// The record layer of one awake connection: a [`Hibernated`] state plus the AEAD keys it
/// expanded. Get one from [`Hibernated::wake`]; [`RecordLayer::hibernate`] drops the keys.
pub struct RecordLayer {
    state: Hibernated,
    rx: Option<Box<dyn MessageDecrypter>>,
    tx: Option<Box<Sealer>>,
    /// Our sending key is rotated with a KeyUpdate that takes this sequence number.
    rekey_at: u64,
    /// No key protects a record with this sequence number or beyond, in either direction.
    seq_max: u64,
}

impl fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordLayer")
            .field("state", &self.state)
            .field("rx_expanded", &self.rx.is_some())
            .field("tx_expanded", &self.tx.is_some())
            .finish_non_exhaustive()
    }
}

impl RecordLayer {
    /// Drops the expanded keys and keeps the compact state.
    pub fn hibernate(self) -> Hibernated {
        self.state
    }

    /// The sequence numbers of the next record to open and to seal.
    pub fn sequence_numbers(&self) -> (u64, u64) {
        self.state.sequence_numbers()
    }

    /// Changes the sequence number limits (tests; an operator who wants earlier rekeys):
    /// when application data would take sequence number `rekey_at` (at least 1), a
    /// KeyUpdate takes it instead and the data goes under the next key; no record numbered
    /// `seq_max` or beyond is opened or sealed ([`RecordError::SequenceExhausted`]). The
    /// defaults are one below the suite's confidentiality limit and `u64::MAX`, so a key
    /// protects at most that limit and a sequence number never wraps.
    /// [`RecordLayer::hibernate`] forgets these and [`Hibernated::wake`] starts from the
    /// defaults again.
    pub fn set_limits(&mut self, rekey_at: u64, seq_max: u64) {
        self.rekey_at = rekey_at.max(1);
        self.seq_max = seq_max;
    }

    /// Opens the record at the start of `input` (received bytes, decrypted in place).
    /// Anything we must answer with (a KeyUpdate) is appended to `out`. Call again with
    /// `&mut input[consumed..]` until it reports [`Record::Incomplete`].
    pub fn open<'a>(
        &mut self,
        input: &'a mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<Opened<'a>, RecordError> {
        if self.state.flags & FAILED != 0 {
            return Err(RecordError::Failed);
        }
        if self.state.flags & PEER_CLOSED != 0 {
            // RFC 8446 §6.1: data after close_notify is ignored.
            return Ok(Opened {
                consumed: input.len(),
                record: Record::Closed,
            });
        }
        let incomplete = |needed| Opened {
            consumed: 0,
            record: Record::Incomplete { needed },
        };
        let Some(header) = input.get(..HEADER_LEN) else {
            return Ok(incomplete(HEADER_LEN));
        };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(self.fail(RecordError::RecordOverflow));
        }
        // A plaintext alert, handshake record or ChangeCipherSpec has no place here.
        if header[0] != TYPE_APPLICATION_DATA {
            return Err(self.fail(RecordError::UnexpectedMessage));
        }
        // The legacy version is part of the additional data (RFC 8446 §5.2), which rustls'
        // decrypters fix at 0x0303, the only value a TLS 1.3 peer sends: any other would
        // not authenticate.
        if header[1..3] != [3, 3] {
            return Err(self.fail(RecordError::BadRecordMac));
        }
        let Some(record) = input.get_mut(..HEADER_LEN + len) else {
            return Ok(incomplete(HEADER_LEN + len));
        };
        let seq = self.state.rx_seq;
        if seq >= self.seq_max {
            return Err(self.fail(RecordError::SequenceExhausted));
        }
        let suite = self.state.suite;
        let rx = &self.state.rx;
        let decrypter = self.rx.get_or_insert_with(|| {
            let (key, iv) = rx.traffic_keys(suite);
            suite.aead_alg.decrypter(key, iv)
        });
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut record[HEADER_LEN..],
        );
        let plain = match decrypter.decrypt(msg, seq) {
            Ok(plain) => plain,
            Err(e) => return Err(self.fail(decrypt_error(e))),
        };
        self.state.rx_seq = seq + 1;
        let record = match u8::from(plain.typ) {
            TYPE_APPLICATION_DATA => {
                self.state.key_updates_left = KEY_UPDATES_WITHOUT_DATA;
                Record::Data(plain.payload)
            }
            TYPE_ALERT => self.alert(plain.payload)?,
            TYPE_HANDSHAKE => self.key_update(plain.payload, out)?,
            _ => return Err(self.fail(RecordError::UnexpectedMessage)),
        };
        Ok(Opened {
            consumed: HEADER_LEN + len,
            record,
        })
    }

    fn alert(&mut self, payload: &[u8]) -> Result<Record<'static>, RecordError> {
        let &[_level, description] = payload else {
            return Err(self.fail(RecordError::DecodeError));
        };
        match AlertDescription::from(description) {
            AlertDescription::CloseNotify => {
                self.state.flags |= PEER_CLOSED;
                Ok(Record::Closed)
            }
            AlertDescription::UserCanceled => Ok(Record::UserCanceled),
            other => Err(self.fail(RecordError::PeerAlert(other))),
        }
    }

    /// A handshake record: only a KeyUpdate that fills it exactly is accepted.
    fn key_update(
        &mut self,
        msg: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Record<'static>, RecordError> {
        let requested = match msg {
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request] => match request {
                0 => false,
                1 => true,
                _ => return Err(self.fail(RecordError::IllegalParameter)),
            },
            // A KeyUpdate whose length is not 1 is malformed.
            [HANDSHAKE_KEY_UPDATE, a, b, c, ..] if [*a, *b, *c] != [0, 0, 1] => {
                return Err(self.fail(RecordError::DecodeError));
            }
            // A KeyUpdate with more behind it in the record, a part of one, or another
            // handshake message.
            _ => return Err(self.fail(RecordError::UnexpectedMessage)),
        };
        if self.state.key_updates_left == 0 {
            return Err(self.fail(RecordError::UnexpectedMessage));
        }
        self.state.key_updates_left -= 1;
        if requested && self.state.flags & (SEND_CLOSED | ANSWERED) == 0 {
            self.rotate_tx(out)?;
            self.state.flags |= ANSWERED;
        }
        self.state.rx = self.state.rx.next(self.state.suite);
        self.state.rx_seq = 0;
        self.rx = None;
        Ok(Record::KeyUpdate { requested })
    }

    /// Seals `data` as application data records of at most [`MAX_PLAINTEXT`] bytes each,
    /// appended to `out`. On an error, records already appended are valid and may be
    /// sent before closing.
    pub fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.state.flags & FAILED != 0 {
            return Err(RecordError::Failed);
        }
        if self.state.flags & SEND_CLOSED != 0 {
            return Err(RecordError::SendClosed);
        }
        for chunk in data.chunks(MAX_PLAINTEXT) {
            if self.state.tx_seq >= self.rekey_at {
                self.rotate_tx(out)?;
            }
            self.seal_record(ContentType::ApplicationData, chunk, out)?;
            self.state.flags &= !ANSWERED;
        }
        Ok(())
    }

    /// Seals close_notify; nothing more is sealed after it.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_alert(AlertDescription::CloseNotify, out)
    }

    /// Seals one alert (fatal, except close_notify and user_canceled), typically
    /// [`RecordError::alert`] after an error; nothing more is sealed after it. Sealing a
    /// second alert does nothing.
    pub fn seal_alert(
        &mut self,
        alert: AlertDescription,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if self.state.flags & SEND_CLOSED != 0 {
            return Ok(());
        }
        let level = match alert {
            AlertDescription::CloseNotify | AlertDescription::UserCanceled => ALERT_WARNING,
            _ => ALERT_FATAL,
        };
        self.state.flags |= SEND_CLOSED;
        self.seal_record(ContentType::Alert, &[level, u8::from(alert)], out)
    }

    /// Sends KeyUpdate(update_not_requested) under the current key, then moves to the next.
    fn rotate_tx(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_record(ContentType::Handshake, &KEY_UPDATE_NOT_REQUESTED, out)?;
        self.state.tx = self.state.tx.next(self.state.suite);
        self.state.tx_seq = 0;
        self.tx = None;
        Ok(())
    }

    fn seal_record(
        &mut self,
        typ: ContentType,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        debug_assert!(payload.len() <= MAX_PLAINTEXT);
        let seq = self.state.tx_seq;
        if seq >= self.seq_max {
            return Err(self.fail(RecordError::SequenceExhausted));
        }
        if self.tx.is_none() {
            let (key, iv) = self.state.tx.traffic_keys(self.state.suite);
            match Sealer::new(self.state.suite, &key, iv) {
                Some(sealer) => self.tx = Some(Box::new(sealer)),
                None => return Err(self.fail(RecordError::EncryptFailed)),
            }
        }
        let sealer = self.tx.as_ref().expect("expanded just above");
        match sealer.seal(typ, payload, seq, out) {
            Ok(()) => {
                self.state.tx_seq = seq + 1;
                Ok(())
            }
            Err(()) => Err(self.fail(RecordError::EncryptFailed)),
        }
    }

    fn fail(&mut self, e: RecordError) -> RecordError {
        self.state.flags |= FAILED;
        e
    }
}

/// What a provider's TLS 1.3 decrypter refusal means on the wire (rustls' own mapping).
fn decrypt_error(e: rustls::Error) -> RecordError {
    match e {
        rustls::Error::PeerSentOversizedRecord => RecordError::RecordOverflow,
        // A padding-only plaintext, or a protected ChangeCipherSpec.
        rustls::Error::PeerMisbehaved(_) => RecordError::UnexpectedMessage,
        // DecryptError, and whatever else a provider may say about a record it cannot
        // open: it did not authenticate.
        _ => RecordError::BadRecordMac,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::sync::{Arc, LazyLock};

    use crate::provider::tls as provider;
    use proptest::prelude::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::server::UnbufferedServerConnection;
    use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, UnbufferedStatus};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

    use super::*;

    /// Every TLS 1.3 suite of the provider the gateway is built with.
    const SUITES: [SupportedCipherSuite; 3] = [
        provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];

    struct Pki {
        server: Arc<ServerConfig>,
        /// One client per suite, pinned to it.
        clients: Vec<Arc<ClientConfig>>,
    }

    /// A CA and a `localhost` leaf (webpki refuses a self-signed CA:TRUE leaf), a TLS 1.3
    /// server with [`SecretLog`] and secret extraction, and clients that trust the CA.
    fn pki() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "holdfast record CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        let leaf = params.signed_by(&key, &ca, &ca_key).expect("sign leaf");

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut server =
            ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_no_client_auth()
                .with_single_cert(vec![leaf.der().clone()], key)
                .expect("server certificate");
        server.enable_secret_extraction = true;
        server.key_log = Arc::new(SecretLog);

        let ca: CertificateDer<'static> = ca.der().clone();
        let clients = SUITES
            .iter()
            .map(|suite| {
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone()).expect("trust the CA");
                let provider = rustls::crypto::CryptoProvider {
                    cipher_suites: vec![*suite],
                    ..provider::default_provider()
                };
                let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("TLS 1.3")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                // For the forger, which takes over the client's sending direction.
                config.enable_secret_extraction = true;
                Arc::new(config)
            })
            .collect();
        Pki {
            server: Arc::new(server),
            clients,
        }
    }

    static PKI: LazyLock<Pki> = LazyLock::new(pki);

    /// Everything the client wants to send.
    fn drain(client: &mut ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client write_tls");
        }
        wire
    }

    fn client_send(client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
        client.writer().write_all(data).expect("client write");
        drain(client)
    }

    /// Feeds `wire` to the client and returns the plaintext it reads.
    fn client_receive(
        client: &mut ClientConnection,
        wire: &[u8],
    ) -> Result<Vec<u8>, rustls::Error> {
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
                return Ok(plain);
            }
            client.read_tls(&mut rest).expect("client read_tls");
            client.process_new_packets()?;
        }
    }

    fn encode(e: &mut EncodeTlsData<'_, rustls::server::ServerConnectionData>, out: &mut Vec<u8>) {
        let mut buf = vec![0; 4096];
        loop {
            match e.encode(&mut buf) {
                Ok(n) => return out.extend_from_slice(&buf[..n]),
                Err(EncodeError::InsufficientSize(s)) => buf.resize(s.required_size, 0),
                Err(EncodeError::AlreadyEncoded) => return,
            }
        }
    }

    /// A finished handshake, converted out of rustls.
    struct Handshake {
        client: ClientConnection,
        secrets: TrafficSecrets,
        extracted: ExtractedSecrets,
    }

    /// Handshakes a rustls client with an unbuffered rustls server in memory, lets the
    /// server rotate its sending key `server_updates` times and the client request
    /// `client_updates` KeyUpdates (with `flush`, the server writes application data after
    /// each KeyUpdate either way, which sends a held-back answer), and converts the server once every record was
    /// encoded and every received one read.
    fn handshake(
        suite: usize,
        server_updates: usize,
        client_updates: usize,
        flush: bool,
    ) -> Handshake {
        let name = ServerName::try_from("localhost").expect("server name");
        let mut client =
            ClientConnection::new(PKI.clients[suite].clone(), name).expect("client connection");
        let mut server = UnbufferedServerConnection::new(PKI.server.clone()).expect("server");
        let (mut server_updates, mut client_updates) = (server_updates, client_updates);
        let mut inbox = Vec::new();
        let mut secrets = None;
        let mut unanswered = false;
        let mut flushed = Vec::new();
        loop {
            inbox.extend(drain(&mut client));
            let mut to_client = Vec::new();
            let mut established = false;
            loop {
                let UnbufferedStatus { discard, state } = server.process_tls_records(&mut inbox);
                let stop = match state.expect("server state") {
                    ConnectionState::EncodeTlsData(mut e) => {
                        encode(&mut e, &mut to_client);
                        false
                    }
                    ConnectionState::TransmitTlsData(t) => {
                        t.done();
                        false
                    }
                    ConnectionState::BlockedHandshake => true,
                    ConnectionState::WriteTraffic(w) if server_updates > 0 => {
                        server_updates -= 1;
                        w.refresh_traffic_keys().expect("server KeyUpdate");
                        unanswered = true;
                        false
                    }
                    ConnectionState::WriteTraffic(mut w) => {
                        if flush && unanswered {
                            unanswered = false;
                            let mut buf = vec![0; 256];
                            let n = w.encrypt(b"flush", &mut buf).expect("server write");
                            to_client.extend_from_slice(&buf[..n]);
                        }
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
            if let Some(s) = take_traffic_secrets() {
                secrets = Some(s);
            }
            flushed.extend(client_receive(&mut client, &to_client).expect("client reads"));
            if established && inbox.is_empty() && !client.is_handshaking() && !client.wants_write()
            {
                if client_updates == 0 {
                    break;
                }
                client_updates -= 1;
                client.refresh_traffic_keys().expect("client KeyUpdate");
                unanswered = true;
            }
        }
        assert_eq!(flushed, b"flush".repeat(flushed.len() / 5));
        assert_eq!(client.negotiated_cipher_suite(), Some(SUITES[suite]));
        let (extracted, _kernel) = server
            .dangerous_into_kernel_connection()
            .expect("into kernel connection");
        Handshake {
            client,
            secrets: secrets.expect("the key log saw both secrets"),
            extracted,
        }
    }

    fn convert(hs: &Handshake) -> Result<Hibernated, HibernateError> {
        let suite = hs.client.negotiated_cipher_suite().expect("a suite");
        Hibernated::from_rustls(
            suite,
            hs.secrets.client(),
            hs.secrets.server(),
            &hs.extracted,
        )
    }

    fn connect(suite: usize) -> (ClientConnection, Hibernated) {
        let hs = handshake(suite, 0, 0, false);
        let state = convert(&hs).expect("hibernated state");
        (hs.client, state)
    }

    /// What feeding a stream to the layer gave.
    #[derive(Debug, Default, PartialEq)]
    struct Fed {
        plain: Vec<u8>,
        key_updates: Vec<bool>,
        closed: bool,
        user_canceled: usize,
    }

    /// Feeds `wire` in receives of `step` bytes, staging partial records as the gateway
    /// does, and checks what `open` reports about consumption.
    fn feed(
        layer: &mut RecordLayer,
        wire: &[u8],
        step: usize,
        out: &mut Vec<u8>,
    ) -> Result<Fed, RecordError> {
        let mut fed = Fed::default();
        let mut staged = Vec::new();
        for chunk in wire.chunks(step.max(1)) {
            staged.extend_from_slice(chunk);
            let mut pos = 0;
            while !fed.closed {
                let available = staged.len() - pos;
                let opened = layer.open(&mut staged[pos..], out)?;
                assert!(opened.consumed <= available);
                match opened.record {
                    Record::Incomplete { needed } => {
                        assert_eq!(opened.consumed, 0);
                        assert!(needed > available && needed <= HEADER_LEN + MAX_CIPHERTEXT);
                        break;
                    }
                    Record::Data(d) => fed.plain.extend_from_slice(d),
                    Record::KeyUpdate { requested } => fed.key_updates.push(requested),
                    Record::Closed => fed.closed = true,
                    Record::UserCanceled => fed.user_canceled += 1,
                }
                assert!(opened.consumed > 0 || fed.closed);
                pos += opened.consumed;
            }
            staged.drain(..pos);
        }
        assert!(
            fed.closed || staged.is_empty(),
            "a partial record left over"
        );
        Ok(fed)
    }

    fn payload(len: usize, salt: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + salt) as u8).collect()
    }

    /// Seals records the way the client would, with rustls' own encrypter and the client's
    /// extracted keys, so that the layer must take them as authentic.
    struct Forger {
        sealer: Sealer,
        seq: u64,
    }

    impl Forger {
        fn new(client: ClientConnection, suite: usize) -> Forger {
            let SupportedCipherSuite::Tls13(suite) = SUITES[suite] else {
                unreachable!("only TLS 1.3 suites here");
            };
            let (seq, keys) = client.dangerous_extract_secrets().expect("secrets").tx;
            let (key, iv) = match keys {
                ConnectionTrafficSecrets::Aes128Gcm { key, iv }
                | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
                | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
                _ => unreachable!("a TLS 1.3 AEAD"),
            };
            Forger {
                sealer: Sealer::new(suite, &key, iv).expect("a TLS 1.3 suite"),
                seq,
            }
        }

        fn record(&mut self, typ: u8, payload: &[u8]) -> Vec<u8> {
            let mut record = Vec::new();
            self.sealer
                .seal(ContentType::from(typ), payload, self.seq, &mut record)
                .expect("seal");
            self.seq += 1;
            record
        }
    }

    #[test]
    fn sizes() {
        let hibernated = std::mem::size_of::<Hibernated>();
        let layer = std::mem::size_of::<RecordLayer>();
        println!("Hibernated {hibernated} B, RecordLayer {layer} B inline");
        assert!(hibernated <= 160, "Hibernated is {hibernated} B");
        for suite in 0..SUITES.len() {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            assert!(
                layer.rx.is_none() && layer.tx.is_none(),
                "keys expanded on use only"
            );
            let mut out = Vec::new();
            let wire = client_send(&mut client, b"hello");
            feed(&mut layer, &wire, usize::MAX, &mut out).expect("open");
            layer.seal(b"hi", &mut out).expect("seal");
            let (Some(rx), Some(tx)) = (&layer.rx, &layer.tx) else {
                panic!("both keys expanded");
            };
            let (rx, tx) = (std::mem::size_of_val(&**rx), std::mem::size_of_val(&**tx));
            let name = layer.state.suite().common.suite;
            println!("{name:?}: decrypter {rx} B, encrypter {tx} B of heap");
            assert!(rx <= 1024 && tx <= 1024);
        }
    }

    #[test]
    fn default_limits_follow_the_suite() {
        for suite in 0..SUITES.len() {
            let (_client, state) = connect(suite);
            let limit = state.suite().common.confidentiality_limit;
            let layer = state.wake();
            assert_eq!(layer.rekey_at, limit.saturating_sub(1).min(u64::MAX - 1));
            assert_eq!(layer.seq_max, u64::MAX);
            assert!(
                layer.rekey_at < layer.seq_max,
                "we rotate before we run out"
            );
        }
    }

    #[test]
    fn data_flows_both_ways_in_every_suite() {
        for suite in 0..SUITES.len() {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            for (n, len) in [0, 1, 100, MAX_PLAINTEXT, MAX_PLAINTEXT + 1, 40_000]
                .into_iter()
                .enumerate()
            {
                let data = payload(len, n);
                let wire = client_send(&mut client, &data);
                let mut out = Vec::new();
                let fed = feed(&mut layer, &wire, 4096, &mut out).expect("open");
                assert_eq!(fed.plain, data, "suite {suite}, {len} bytes to the server");
                assert!(out.is_empty());
                layer.seal(&data, &mut out).expect("seal");
                let records = len.div_ceil(MAX_PLAINTEXT);
                assert_eq!(out.len(), len + records * (HEADER_LEN + 17));
                assert_eq!(client_receive(&mut client, &out), Ok(data), "suite {suite}");
            }
        }
    }

    #[test]
    fn records_fed_one_byte_at_a_time() {
        for suite in 0..SUITES.len() {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            let mut wire = client_send(&mut client, b"first");
            client.refresh_traffic_keys().expect("KeyUpdate");
            wire.extend(client_send(&mut client, &payload(3000, 1)));
            let mut out = Vec::new();
            let fed = feed(&mut layer, &wire, 1, &mut out).expect("open");
            let mut expected = b"first".to_vec();
            expected.extend(payload(3000, 1));
            assert_eq!(fed.plain, expected);
            assert_eq!(fed.key_updates, [true]);
            layer.seal(b"reply", &mut out).expect("seal");
            assert_eq!(
                client_receive(&mut client, &out).as_deref(),
                Ok(&b"reply"[..])
            );
        }
    }

    #[test]
    fn key_updates_both_ways_repeatedly() {
        for suite in 0..SUITES.len() {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            for round in 0..5 {
                // The client asks (once, then twice in a row); one answer covers both.
                let asks = 1 + round % 2;
                let mut wire = Vec::new();
                for _ in 0..asks {
                    client.refresh_traffic_keys().expect("KeyUpdate");
                    wire.extend(drain(&mut client));
                }
                let data = payload(100 + round, round);
                wire.extend(client_send(&mut client, &data));
                let mut out = Vec::new();
                let fed = feed(&mut layer, &wire, 7, &mut out).expect("open");
                assert_eq!(fed.key_updates, vec![true; asks]);
                assert_eq!(fed.plain, data);
                assert_eq!(layer.sequence_numbers().0, 1, "new key, one record");
                assert_eq!(layer.sequence_numbers().1, 0, "our key rotated");
                assert_eq!(
                    out.len(),
                    HEADER_LEN + 5 + 17,
                    "one KeyUpdate answers them all"
                );
                layer.seal(&data, &mut out).expect("seal");
                assert_eq!(client_receive(&mut client, &out), Ok(data.clone()));
                // And data still flows to us under the client's new key.
                let wire = client_send(&mut client, b"after");
                let mut out = Vec::new();
                let fed = feed(&mut layer, &wire, 3, &mut out).expect("open");
                assert_eq!(fed.plain, b"after");
            }
            // We rotate our own key: before every third record.
            let (_, tx) = layer.sequence_numbers();
            layer.set_limits(tx + 1, u64::MAX);
            let mut out = Vec::new();
            let mut sent = Vec::new();
            for n in 0..10 {
                let data = payload(50, n);
                layer.seal(&data, &mut out).expect("seal");
                sent.extend(data);
                assert!(layer.sequence_numbers().1 <= tx + 1);
            }
            assert_eq!(client_receive(&mut client, &out), Ok(sent));
            let wire = client_send(&mut client, b"still there");
            let fed = feed(&mut layer, &wire, 100, &mut out).expect("open");
            assert_eq!(fed.plain, b"still there");
        }
    }

    #[test]
    fn too_many_key_updates_without_data_are_refused() {
        let (mut client, state) = connect(0);
        let mut layer = state.wake();
        let mut out = Vec::new();
        for _ in 0..2 {
            let mut wire = Vec::new();
            for _ in 0..KEY_UPDATES_WITHOUT_DATA {
                client.refresh_traffic_keys().expect("KeyUpdate");
                wire.extend(drain(&mut client));
            }
            wire.extend(client_send(&mut client, b"data resets the count"));
            let fed = feed(&mut layer, &wire, usize::MAX, &mut out).expect("32 are fine");
            assert_eq!(fed.key_updates.len(), usize::from(KEY_UPDATES_WITHOUT_DATA));
            assert_eq!(
                out.len(),
                HEADER_LEN + 5 + 17,
                "answered once: we sent nothing"
            );
            // Our data goes under the new key; the next request gets an answer again.
            layer.seal(b"reply", &mut out).expect("seal");
            assert_eq!(
                client_receive(&mut client, &out).as_deref(),
                Ok(&b"reply"[..])
            );
            out.clear();
        }
        let mut wire = Vec::new();
        for _ in 0..=KEY_UPDATES_WITHOUT_DATA {
            client.refresh_traffic_keys().expect("KeyUpdate");
            wire.extend(drain(&mut client));
        }
        let err = feed(&mut layer, &wire, usize::MAX, &mut out).expect_err("33 are not");
        assert_eq!(err, RecordError::UnexpectedMessage);
    }

    #[test]
    fn tampered_record_is_bad_record_mac_and_the_client_hears_it() {
        for suite in 0..SUITES.len() {
            for at in [HEADER_LEN, HEADER_LEN + 3, usize::MAX] {
                let (mut client, state) = connect(suite);
                let mut layer = state.wake();
                let mut wire = client_send(&mut client, b"tamper with me");
                let at = at.min(wire.len() - 1);
                wire[at] ^= 0x40;
                let mut out = Vec::new();
                let err = feed(&mut layer, &wire, 5, &mut out).expect_err("tampered");
                assert_eq!(err, RecordError::BadRecordMac);
                assert_eq!(layer.open(&mut wire, &mut out), Err(RecordError::Failed));
                assert_eq!(layer.seal(b"x", &mut out), Err(RecordError::Failed));
                layer
                    .seal_alert(err.alert().expect("an alert"), &mut out)
                    .expect("seal alert");
                assert_eq!(
                    client_receive(&mut client, &out),
                    Err(rustls::Error::AlertReceived(AlertDescription::BadRecordMac))
                );
            }
        }
    }

    #[test]
    fn record_headers_are_checked_before_the_body_arrives() {
        let (_client, state) = connect(0);
        let mut out = Vec::new();
        let cases: [(&[u8], Result<Record<'_>, RecordError>); 7] = [
            (&[23, 3, 3], Ok(Record::Incomplete { needed: 5 })),
            (
                &[23, 3, 3, 0x41, 0x00],
                Ok(Record::Incomplete {
                    needed: HEADER_LEN + MAX_CIPHERTEXT,
                }),
            ),
            (&[23, 3, 3, 0x41, 0x01], Err(RecordError::RecordOverflow)),
            (&[23, 3, 3, 0xff, 0xff], Err(RecordError::RecordOverflow)),
            (
                &[22, 3, 3, 0, 4, 1, 0, 0, 0],
                Err(RecordError::UnexpectedMessage),
            ),
            (&[20, 3, 3, 0, 1, 1], Err(RecordError::UnexpectedMessage)),
            (&[23, 3, 1, 0, 20], Err(RecordError::BadRecordMac)),
        ];
        let mut state = Some(state);
        for (bytes, want) in cases {
            let mut layer = state.take().expect("a state").wake();
            let mut input = bytes.to_vec();
            let got = layer.open(&mut input, &mut out).map(|o| o.record);
            assert_eq!(got, want, "{bytes:?}");
            // A failed layer is useless; the next case needs a fresh connection.
            state = Some(if want.is_ok() {
                layer.hibernate()
            } else {
                connect(0).1
            });
        }
        let (_client, state) = connect(0);
        let mut layer = state.wake();
        let mut alert = vec![21, 3, 3, 0, 2, 2, 40];
        assert_eq!(
            layer.open(&mut alert, &mut out),
            Err(RecordError::UnexpectedMessage),
            "a plaintext alert"
        );
    }

    #[test]
    fn forged_records_are_refused_with_the_right_alert() {
        use RecordError::*;
        let mut oversized = payload(MAX_PLAINTEXT + 1, 0);
        oversized.push(23);
        let mut full_padded = payload(MAX_PLAINTEXT, 0);
        full_padded.extend([23, 0]);
        let mut padded_to_limit = payload(MAX_PLAINTEXT - 2, 0);
        padded_to_limit.extend([23, 0]);
        // Name, inner content type, payload, what the layer makes of it.
        type Case = (&'static str, u8, Vec<u8>, Result<Fed, RecordError>);
        let cases: Vec<Case> = vec![
            ("padding only", 0, vec![], Err(UnexpectedMessage)),
            (
                "padding only, long",
                0,
                vec![0; 200],
                Err(UnexpectedMessage),
            ),
            (
                "unknown inner type",
                99,
                b"x".to_vec(),
                Err(UnexpectedMessage),
            ),
            (
                "protected ChangeCipherSpec",
                20,
                vec![1],
                Err(UnexpectedMessage),
            ),
            (
                "plaintext over 2^14",
                23,
                payload(MAX_PLAINTEXT + 1, 0),
                Err(RecordOverflow),
            ),
            (
                "plaintext over 2^14, padded",
                0,
                oversized,
                Err(RecordOverflow),
            ),
            ("short alert", 21, vec![2], Err(DecodeError)),
            ("long alert", 21, vec![2, 40, 0], Err(DecodeError)),
            (
                "fatal alert",
                21,
                vec![2, 40],
                Err(PeerAlert(AlertDescription::HandshakeFailure)),
            ),
            (
                "another alert at warning level",
                21,
                vec![1, 46],
                Err(PeerAlert(AlertDescription::CertificateUnknown)),
            ),
            (
                "client NewSessionTicket",
                22,
                vec![4, 0, 0, 0],
                Err(UnexpectedMessage),
            ),
            ("ClientHello", 22, vec![1, 0, 0, 0], Err(UnexpectedMessage)),
            ("empty handshake record", 22, vec![], Err(UnexpectedMessage)),
            ("half a KeyUpdate", 22, vec![24, 0], Err(UnexpectedMessage)),
            (
                "KeyUpdate without its body",
                22,
                vec![24, 0, 0, 1],
                Err(UnexpectedMessage),
            ),
            (
                "two KeyUpdates in one record",
                22,
                vec![24, 0, 0, 1, 0, 24, 0, 0, 1, 0],
                Err(UnexpectedMessage),
            ),
            (
                "KeyUpdate of length 2",
                22,
                vec![24, 0, 0, 2, 0, 0],
                Err(DecodeError),
            ),
            (
                "KeyUpdate request 2",
                22,
                vec![24, 0, 0, 1, 2],
                Err(IllegalParameter),
            ),
            (
                "user_canceled",
                21,
                vec![1, 90],
                Ok(Fed {
                    user_canceled: 1,
                    ..Fed::default()
                }),
            ),
            (
                "padding",
                0,
                b"hi\x17\0\0\0\0".to_vec(),
                Ok(Fed {
                    plain: b"hi".to_vec(),
                    ..Fed::default()
                }),
            ),
            // RFC 8446 §5.4: padding does not extend the limit.
            (
                "2^14 of plaintext and padding",
                0,
                full_padded,
                Err(RecordOverflow),
            ),
            (
                "2^14 of plaintext",
                23,
                payload(MAX_PLAINTEXT, 0),
                Ok(Fed {
                    plain: payload(MAX_PLAINTEXT, 0),
                    ..Fed::default()
                }),
            ),
            (
                "padded to 2^14 + 1",
                0,
                padded_to_limit,
                Ok(Fed {
                    plain: payload(MAX_PLAINTEXT - 2, 0),
                    ..Fed::default()
                }),
            ),
            (
                "KeyUpdate not requested",
                22,
                vec![24, 0, 0, 1, 0],
                Ok(Fed {
                    key_updates: vec![false],
                    ..Fed::default()
                }),
            ),
        ];
        for suite in 0..SUITES.len() {
            for (name, typ, body, want) in &cases {
                let (client, state) = connect(suite);
                let mut layer = state.wake();
                let mut forger = Forger::new(client, suite);
                let mut out = Vec::new();
                let good = forger.record(23, b"genuine");
                let fed = feed(&mut layer, &good, usize::MAX, &mut out).expect("genuine");
                assert_eq!(fed.plain, b"genuine");
                let record = forger.record(*typ, body);
                let got = feed(&mut layer, &record, 1000, &mut out);
                let short = |r: &Result<Fed, RecordError>| {
                    r.as_ref().map(|f| f.plain.len()).map_err(|e| *e)
                };
                assert!(&got == want, "suite {suite}, {name}: {:?}", short(&got));
                assert!(out.is_empty(), "{name}: nothing to answer");
                if let Err(e) = got {
                    assert_eq!(layer.open(&mut record.clone(), &mut out), Err(Failed));
                    if let Some(alert) = e.alert() {
                        layer.seal_alert(alert, &mut out).expect("seal alert");
                        assert_eq!(out.len(), HEADER_LEN + 2 + 17, "{name}: one alert");
                    }
                }
            }
        }
    }

    #[test]
    fn close_notify_both_ways() {
        for suite in 0..SUITES.len() {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            let mut wire = client_send(&mut client, b"bye");
            client.send_close_notify();
            wire.extend(drain(&mut client));
            // Anything after close_notify is ignored.
            let mut rest = wire.clone();
            rest.extend_from_slice(b"\x17\x03\x03\x00\x05garbage after close_notify");
            let mut out = Vec::new();
            let fed = feed(&mut layer, &rest, 2, &mut out).expect("open");
            assert_eq!(fed.plain, b"bye");
            assert!(fed.closed);
            let len = rest.len();
            let opened = layer.open(&mut rest, &mut out).expect("still closed");
            assert_eq!((opened.consumed, opened.record), (len, Record::Closed));

            layer
                .seal(b"last words", &mut out)
                .expect("we may still send");
            layer.seal_close_notify(&mut out).expect("close_notify");
            assert_eq!(layer.seal(b"more", &mut out), Err(RecordError::SendClosed));
            layer
                .seal_close_notify(&mut out)
                .expect("a second one does nothing");
            assert_eq!(
                client_receive(&mut client, &out).as_deref(),
                Ok(&b"last words"[..])
            );
            let io = client.process_new_packets().expect("client state");
            assert!(io.peer_has_closed());
        }
    }

    #[test]
    fn hibernate_and_wake_keep_sequence_numbers() {
        for suite in 0..SUITES.len() {
            let (mut client, mut state) = connect(suite);
            let (rx0, tx0) = state.sequence_numbers();
            assert_eq!(rx0, 0);
            assert!(tx0 > 0, "the session tickets were sent");
            for round in 0..4usize {
                let mut layer = state.wake();
                let mut wire = client_send(&mut client, &payload(10, round));
                if round == 2 {
                    client.refresh_traffic_keys().expect("KeyUpdate");
                    wire.extend(client_send(&mut client, b"new key"));
                }
                let mut out = Vec::new();
                let fed = feed(&mut layer, &wire, 9, &mut out).expect("open");
                assert_eq!(fed.key_updates.len(), usize::from(round == 2));
                layer.seal(&payload(20, round), &mut out).expect("seal");
                state = layer.hibernate();
                let expected = client_receive(&mut client, &out).expect("client reads");
                assert_eq!(expected, payload(20, round));
                let (rx, tx) = state.sequence_numbers();
                let round = round as u64;
                if round < 2 {
                    assert_eq!((rx, tx), (round + 1, tx0 + round + 1));
                } else {
                    // Both keys moved on in round 2: after our KeyUpdate, one reply each
                    // round; after the client's, one record ("new key") then one each round.
                    assert_eq!((rx, tx), (round - 1, round - 1));
                }
            }
        }
    }

    /// Every TLS 1.3 suite of the provider, as the hand-over decoder wants them.
    fn tls13_suites() -> Vec<&'static Tls13CipherSuite> {
        SUITES
            .iter()
            .filter_map(|s| match s {
                SupportedCipherSuite::Tls13(t) => Some(*t),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn encoded_state_decodes_to_a_layer_that_carries_on_the_connection() {
        let suites = tls13_suites();
        for suite in 0..SUITES.len() {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            let mut out = Vec::new();
            feed(
                &mut layer,
                &client_send(&mut client, b"before"),
                9,
                &mut out,
            )
            .expect("open");
            layer.seal(b"one", &mut out).expect("seal");
            let mut bytes = vec![0xAA];
            layer.hibernate().encode(&mut bytes);
            bytes.push(0xBB);
            let (moved, used) = Hibernated::decode(&bytes[1..], &suites).expect("decodes");
            assert_eq!(
                bytes[1 + used],
                0xBB,
                "decode takes exactly what encode wrote"
            );
            // Every shorter prefix is refused, never misread.
            for cut in 0..used {
                assert!(Hibernated::decode(&bytes[1..1 + cut], &suites).is_err());
            }
            let mut layer = moved.wake();
            layer.seal(b"two", &mut out).expect("seal after the move");
            assert_eq!(
                client_receive(&mut client, &out).as_deref(),
                Ok(&b"onetwo"[..])
            );
            let mut out = Vec::new();
            let fed = feed(&mut layer, &client_send(&mut client, b"after"), 9, &mut out);
            assert_eq!(fed.expect("open after the move").plain, b"after");
        }
        // A suite the provider does not offer, and unknown flags, are refused.
        let (_, state) = connect(0);
        let mut bytes = Vec::new();
        state.encode(&mut bytes);
        assert_eq!(
            Hibernated::decode(&bytes, &[]).err(),
            Some(HibernateError::UnknownSuite)
        );
        let last = bytes.len() - 1;
        bytes[last] = 0x80;
        assert_eq!(
            Hibernated::decode(&bytes, &suites).err(),
            Some(HibernateError::BadState)
        );
    }

    #[test]
    fn sequence_numbers_never_pass_their_limit() {
        for suite in 0..SUITES.len() {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            let (rx, tx) = layer.sequence_numbers();
            // Sending: rekeying disabled, two more records allowed.
            layer.set_limits(u64::MAX, tx + 2);
            let mut out = Vec::new();
            layer.seal(b"one", &mut out).expect("first");
            layer.seal(b"two", &mut out).expect("second");
            let err = layer.seal(b"three", &mut out).expect_err("exhausted");
            assert_eq!(err, RecordError::SequenceExhausted);
            assert_eq!(err.alert(), None);
            assert_eq!(
                client_receive(&mut client, &out).as_deref(),
                Ok(&b"onetwo"[..])
            );

            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            layer.set_limits(u64::MAX, rx + 1);
            let mut wire = client_send(&mut client, b"one");
            wire.extend(client_send(&mut client, b"two"));
            let err = feed(&mut layer, &wire, usize::MAX, &mut out).expect_err("exhausted");
            assert_eq!(err, RecordError::SequenceExhausted);

            // With rekeying on, the KeyUpdate takes the last number and sending goes on.
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            let (_, tx) = layer.sequence_numbers();
            layer.set_limits(tx + 1, tx + 2);
            let mut out = Vec::new();
            for n in 0..5 {
                layer.seal(&payload(10, n), &mut out).expect("seal");
            }
            let all: Vec<u8> = (0..5).flat_map(|n| payload(10, n)).collect();
            assert_eq!(client_receive(&mut client, &out), Ok(all));
        }
    }

    #[test]
    fn conversion_follows_key_updates_under_rustls() {
        for suite in 0..SUITES.len() {
            for (server_updates, client_updates) in [(1, 0), (0, 1), (2, 2), (MAX_CATCH_UP, 0)] {
                // Each case rotates the server's sending key; until the server writes, a
                // conversion cannot tell whether the KeyUpdate went out.
                let hs = handshake(suite, server_updates, client_updates, false);
                let got = convert(&hs);
                assert_eq!(got.err(), Some(HibernateError::KeyUpdatePending));
                let hs = handshake(suite, server_updates, client_updates, true);
                let state = convert(&hs).expect("caught up");
                let mut client = hs.client;
                let mut layer = state.wake();
                let wire = client_send(&mut client, b"ping");
                let mut out = Vec::new();
                let case = format!(
                    "suite {suite}, {server_updates} server and {client_updates} client KeyUpdates"
                );
                assert_eq!(
                    feed(&mut layer, &wire, 1, &mut out).expect("open").plain,
                    b"ping",
                    "{case}"
                );
                layer.seal(b"pong", &mut out).expect("seal");
                assert_eq!(
                    client_receive(&mut client, &out).as_deref(),
                    Ok(&b"pong"[..]),
                    "{case}"
                );
            }
            let hs = handshake(suite, MAX_CATCH_UP + 1, 0, false);
            let got = convert(&hs);
            assert_eq!(
                got.err(),
                Some(HibernateError::KeyMismatch),
                "too far behind"
            );
        }
    }

    #[test]
    fn conversion_refuses_secrets_that_do_not_fit() {
        let a = handshake(1, 0, 0, false);
        let b = handshake(1, 0, 0, false);
        let suite = SUITES[1];
        let from = |c: &[u8], s: &[u8], e| Hibernated::from_rustls(suite, c, s, e).err();
        assert_eq!(
            from(b.secrets.client(), b.secrets.server(), &a.extracted),
            Some(HibernateError::KeyMismatch),
            "another connection's secrets"
        );
        assert_eq!(
            from(a.secrets.server(), a.secrets.client(), &a.extracted),
            Some(HibernateError::KeyMismatch),
            "swapped"
        );
        assert_eq!(
            from(&a.secrets.client()[..32], a.secrets.server(), &a.extracted),
            Some(HibernateError::SecretLength)
        );
        let tls12 = provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256;
        assert_eq!(
            Hibernated::from_rustls(tls12, a.secrets.client(), a.secrets.server(), &a.extracted)
                .err(),
            Some(HibernateError::NotTls13)
        );
        assert!(take_traffic_secrets().is_none(), "taken by the handshakes");
    }

    /// One step of a conversation.
    #[derive(Debug, Clone)]
    enum Op {
        /// The client sends `len` bytes; they reach the layer in receives of `step`.
        ToServer {
            len: usize,
            step: usize,
        },
        /// The layer seals `len` bytes for the client.
        ToClient {
            len: usize,
        },
        /// The client asks for a KeyUpdate.
        ClientKeyUpdate,
        /// The layer rotates its own key before its next record.
        ServerKeyUpdate,
        Hibernate,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..20_000, 1usize..2000).prop_map(|(len, step)| Op::ToServer { len, step }),
            4 => (0usize..20_000).prop_map(|len| Op::ToClient { len }),
            1 => Just(Op::ClientKeyUpdate),
            1 => Just(Op::ServerKeyUpdate),
            1 => Just(Op::Hibernate),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// rustls seals and the layer opens, the layer seals and rustls opens, in every
        /// suite, with KeyUpdates both ways and hibernation in between.
        #[test]
        fn round_trip_with_rustls(suite in 0..SUITES.len(), ops in prop::collection::vec(op(), 1..10)) {
            let (mut client, state) = connect(suite);
            let mut layer = state.wake();
            let mut pending = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::ToServer { len, step } => {
                        pending.extend(client_send(&mut client, &payload(len, n)));
                        let mut out = Vec::new();
                        let fed = feed(&mut layer, &pending, step, &mut out);
                        prop_assert_eq!(fed.map(|f| f.plain), Ok(payload(len, n)));
                        pending.clear();
                        prop_assert_eq!(client_receive(&mut client, &out), Ok(Vec::new()));
                    }
                    Op::ToClient { len } => {
                        let mut out = Vec::new();
                        layer.seal(&payload(len, n), &mut out).expect("seal");
                        prop_assert_eq!(client_receive(&mut client, &out), Ok(payload(len, n)));
                    }
                    Op::ClientKeyUpdate => {
                        client.refresh_traffic_keys().expect("KeyUpdate");
                        pending.extend(drain(&mut client));
                    }
                    Op::ServerKeyUpdate => {
                        let (_, tx) = layer.sequence_numbers();
                        layer.set_limits(tx, u64::MAX);
                    }
                    Op::Hibernate => layer = layer.hibernate().wake(),
                }
            }
        }
    }
}
