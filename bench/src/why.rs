//! Why a handshake failed, in words a user can act on, and each distinct reason printed
//! once per process instead of once per connection.
//!
//! The TLS record driver reports a failed handshake only as "TLS error". The reason is
//! recovered from what knows it: the certificate verifier (`client.rs` notes its error
//! here, on the thread that drives the connection, during the receive that failed); the
//! server's alert where it is a plaintext record at the front of the bytes received
//! (before the ServerHello); and otherwise (a TLS 1.3 alert after the ServerHello is
//! encrypted) one blocking probe handshake per process with rustls' buffered client,
//! which returns the error itself.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConfig};

thread_local! {
    /// The last certificate verification error on this thread, taken by the next
    /// explanation of a failed handshake.
    static VERIFY_ERROR: RefCell<Option<rustls::Error>> = const { RefCell::new(None) };
}

/// Called by the verifier when a chain is refused.
pub fn note_verify_error(e: &rustls::Error) {
    VERIFY_ERROR.with(|v| *v.borrow_mut() = Some(e.clone()));
}

/// Forgets a noted error (a connection about to be driven starts clean).
pub fn clear() {
    VERIFY_ERROR.with(|v| v.borrow_mut().take());
}

/// Where a failed handshake can be tried again to learn why: the target, the client
/// configuration and the name the connection used.
pub struct Probe<'a> {
    pub target: SocketAddr,
    pub config: Option<&'a Arc<ClientConfig>>,
    pub server_name: &'a ServerName<'static>,
}

/// The reason and the fix for a handshake that ended in a TLS error. `received` is the
/// front of the bytes whose processing failed (up to 7 are looked at).
pub fn explain(received: &[u8], probe: &Probe<'_>) -> String {
    let name = probe.server_name.to_str();
    if let Some(e) = VERIFY_ERROR.with(|v| v.borrow_mut().take()) {
        return explain_certificate(&e, &name);
    }
    match received {
        // An alert record (content type 21) of two bytes: level, description.
        [21, 3, _, 0, 2, _, desc, ..] => explain_alert(AlertDescription::from(*desc)),
        [first, ..] if ![20, 21, 22, 23].contains(first) => format!(
            "the server did not answer with TLS (its first bytes: {:?}); fix: point \
             --target at the gateway's TLS listener, not its admin port or another service",
            String::from_utf8_lossy(&received[..received.len().min(7)])
        ),
        _ => {
            // Probed once per process: a server fails every handshake the same way, and
            // the probe blocks the calling ring for up to a few seconds.
            static PROBED: OnceLock<String> = OnceLock::new();
            PROBED.get_or_init(|| probe_handshake(probe)).clone()
        }
    }
}

/// One handshake with rustls' buffered client, which hands back the error itself.
fn probe_handshake(probe: &Probe<'_>) -> String {
    const UNKNOWN: &str = "TLS error (the probe handshake could not say why)";
    let Some(config) = probe.config else {
        return UNKNOWN.to_string();
    };
    let timeout = Duration::from_secs(3);
    let Ok(mut tcp) = TcpStream::connect_timeout(&probe.target, timeout) else {
        return UNKNOWN.to_string();
    };
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let Ok(mut conn) = rustls::ClientConnection::new(config.clone(), probe.server_name.clone())
    else {
        return UNKNOWN.to_string();
    };
    clear();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            let name = probe.server_name.to_str();
            if let Some(v) = VERIFY_ERROR.with(|v| v.borrow_mut().take()) {
                return explain_certificate(&v, &name);
            }
            return match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::AlertReceived(alert)) => explain_alert(*alert),
                Some(rustls::Error::NoApplicationProtocol) => {
                    explain_alert(AlertDescription::NoApplicationProtocol)
                }
                Some(other) => format!("TLS error: {other}"),
                None => format!("TLS error ({e})"),
            };
        }
    }
    "TLS error (a probe handshake then succeeded: the server fails some handshakes only)"
        .to_string()
}

fn explain_certificate(e: &rustls::Error, server_name: &str) -> String {
    let rustls::Error::InvalidCertificate(cert) = e else {
        return format!("the server's certificate was refused: {e}");
    };
    match cert {
        // webpki refuses a certificate with basicConstraints CA:TRUE as the server's own,
        // where OpenSSL accepts it: what `openssl req -x509` makes by default.
        CertificateError::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            "the server presents a CA certificate (basicConstraints CA:TRUE) as its own, \
             which rustls refuses (OpenSSL accepts it; `openssl req -x509` makes one by \
             default); fix: serve a certificate signed by a CA and pass that CA with --ca \
             (`holdfast-bench gen-cert --out DIR` writes ca.pem, cert.pem and key.pem), or \
             add `-addext basicConstraints=critical,CA:FALSE -addext \
             subjectAltName=DNS:NAME` to openssl req"
                .to_string()
        }
        CertificateError::UnknownIssuer => {
            "the server's certificate is not signed by the CA given with --ca (unknown \
             issuer); fix: pass the CA certificate that signed the gateway's certificate \
             (gen-cert's ca.pem)"
                .to_string()
        }
        CertificateError::BadSignature => {
            "the server's certificate does not verify against the CA given with --ca (bad \
             signature: a CA of the same name but another key, e.g. certificates made again \
             with gen-cert); fix: pass the ca.pem made together with the gateway's cert.pem"
                .to_string()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            let presented = match cert {
                CertificateError::NotValidForNameContext { presented, .. }
                    if !presented.is_empty() =>
                {
                    let names: Vec<&str> = presented.iter().map(|p| bare_name(p)).collect();
                    format!(" (it names {})", names.join(", "))
                }
                _ => String::new(),
            };
            format!(
                "the server's certificate is not valid for {server_name:?}{presented}; fix: \
                 pass --server-name with a name the certificate has as subjectAltName (the \
                 common name is not used), or make the certificate for {server_name:?}"
            )
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => format!(
            "the server's certificate is outside its validity period ({cert:?}); fix: renew \
             it, or check this machine's clock"
        ),
        other => format!("the server's certificate was refused: {other:?}"),
    }
}

/// `localhost` from webpki's `DnsName("localhost")`, `127.0.0.1` from `IpAddress(127.0.0.1)`.
fn bare_name(presented: &str) -> &str {
    presented
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map_or(presented, |inner| inner.trim_matches('"'))
}

fn explain_alert(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::NoApplicationProtocol => {
            "the server shares no ALPN protocol with the load generator (it offers only \
             holdfast/1; alert no_application_protocol); fix: point --target at a holdfast \
             gateway, or a server configured with ALPN holdfast/1"
                .to_string()
        }
        AlertDescription::ProtocolVersion => {
            "the server refused TLS 1.3, the only version the load generator speaks (alert \
             protocol_version); fix: allow TLS 1.3 on the server"
                .to_string()
        }
        AlertDescription::HandshakeFailure => {
            "the server found no cipher suite, key exchange group or signature scheme in \
             common (alert handshake_failure); the load generator offers TLS 1.3 with the \
             ring provider's suites"
                .to_string()
        }
        AlertDescription::UnrecognisedName => {
            "the server has no certificate for the name sent (alert unrecognized_name); fix: \
             pass --server-name with a name the server serves"
                .to_string()
        }
        other => format!("the server ended the handshake with alert {other:?}"),
    }
}

/// Distinct reasons seen by this process, at most this many (then nothing is new).
const MAX_REASONS: usize = 64;

static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// True the first time `reason` is seen in this process: print it then, and only then.
pub fn first_of_its_kind(reason: &str) -> bool {
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.contains(reason) || seen.len() >= MAX_REASONS {
        return false;
    }
    seen.insert(reason.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe<'static> {
        static NAME: OnceLock<ServerName<'static>> = OnceLock::new();
        Probe {
            target: "127.0.0.1:9".parse().unwrap(),
            config: None,
            server_name: NAME.get_or_init(|| ServerName::try_from("localhost").unwrap()),
        }
    }

    #[test]
    fn alerts_before_the_server_hello_are_named() {
        let alpn = explain(&[21, 3, 3, 0, 2, 2, 120], &probe());
        assert!(alpn.contains("no ALPN protocol"), "{alpn}");
        let version = explain(&[21, 3, 1, 0, 2, 2, 70], &probe());
        assert!(version.contains("TLS 1.3"), "{version}");
        let http = explain(b"HTTP/1.1 400 Bad Request\r\n", &probe());
        assert!(http.contains("did not answer with TLS"), "{http}");
        assert!(http.contains("HTTP/1."), "{http}");
    }

    #[test]
    fn a_noted_verify_error_wins_and_is_taken_once() {
        note_verify_error(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let first = explain(&[22, 3, 3], &probe());
        assert!(first.contains("unknown issuer"), "{first}");
        let second = explain(&[22, 3, 3], &probe());
        assert!(!second.contains("unknown issuer"), "{second}");
    }

    #[test]
    fn presented_names_are_shown_bare() {
        assert_eq!(bare_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(bare_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(bare_name("plain"), "plain");
    }

    #[test]
    fn distinct_reasons_are_first_once() {
        assert!(first_of_its_kind("why: test reason a"));
        assert!(!first_of_its_kind("why: test reason a"));
        assert!(first_of_its_kind("why: test reason b"));
    }
}
