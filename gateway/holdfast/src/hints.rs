//! What `holdfast` tells an operator when it cannot start, or starts short of something:
//! one line per problem, the error (each cause of the chain once) and what to do about it.
//! The fixes are for what a fresh box meets: a certificate path that is wrong, a key that
//! is not the certificate's, a port someone else holds, a config key misspelt, no worker.
//! Reads file metadata for the worker check; opens no sockets.
#![forbid(unsafe_code)]

use std::io;
use std::os::unix::fs::FileTypeExt;

use crate::config::{Config, ConfigError};
use crate::tls::TlsSetupError;

/// The error chain on one line, each cause once (a cause that its parent's message
/// already quotes is not repeated), followed by `; fix: ...` where one is known.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    let mut text = text.replace('\n', " ");
    if let Some(fix) = fix(e) {
        text.push_str("; fix: ");
        text.push_str(&fix);
    }
    text
}

/// What to do about `e`, from the first cause in its chain that says.
pub fn fix(e: &anyhow::Error) -> Option<String> {
    e.chain().find_map(|cause| {
        if let Some(t) = cause.downcast_ref::<TlsSetupError>() {
            tls_fix(t)
        } else if let Some(c) = cause.downcast_ref::<ConfigError>() {
            config_fix(c)
        } else {
            cause.downcast_ref::<io::Error>().and_then(io_fix)
        }
    })
}

const GEN_CERT: &str = "`holdfast-bench gen-cert --out DIR` makes a CA, a certificate and its key";

fn tls_fix(e: &TlsSetupError) -> Option<String> {
    Some(match e {
        TlsSetupError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound => format!(
            "correct the path given with --cert/--key or in [[tls.certs]] (a config file's \
             relative paths are taken from its directory); {GEN_CERT} for a test"
        ),
        TlsSetupError::Read { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
            "let the gateway's user read it (the packaged service runs as user holdfast)"
                .to_string()
        }
        TlsSetupError::Read { .. } => {
            "--cert and --key (and cert/key in [[tls.certs]]) name PEM files".to_string()
        }
        TlsSetupError::NoCertificate { .. } | TlsSetupError::BadCertificate { .. } => {
            "--cert wants a PEM file of -----BEGIN CERTIFICATE----- blocks, the server's own \
             certificate first, then its intermediates"
                .to_string()
        }
        TlsSetupError::BadKey { .. } => {
            "--key wants the certificate's private key as unencrypted PEM (PKCS#8, PKCS#1 or \
             SEC1)"
                .to_string()
        }
        TlsSetupError::Mismatch { .. } => format!(
            "give the key that was made with this certificate (the first certificate of the \
             file must be the server's own, not its CA); {GEN_CERT}"
        ),
        TlsSetupError::TicketKey(_) => {
            "make one with `holdfast ticket-key generate --out PATH` (mode 0600, readable by the \
             gateway's user only) and copy the same file to every gateway of the fleet"
                .to_string()
        }
        TlsSetupError::Rustls(_) => return None,
    })
}

fn config_fix(e: &ConfigError) -> Option<String> {
    match e {
        ConfigError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            Some("correct the path given with --config".to_string())
        }
        ConfigError::Parse { message, .. } if message.contains("unknown field") => {
            Some("correct the key's spelling, or remove it; README.md lists every key".to_string())
        }
        _ => None,
    }
}

fn io_fix(e: &io::Error) -> Option<String> {
    match e.kind() {
        io::ErrorKind::AddrInUse => Some(
            "another process holds this address (`ss -ltnp` names it): stop it, or choose \
             another one with --listen/--admin (listen/admin in the config; port 0 picks a \
             free one)"
                .to_string(),
        ),
        io::ErrorKind::AddrNotAvailable => {
            Some("this host has no such address: listen on one of its own, or 0.0.0.0".to_string())
        }
        io::ErrorKind::PermissionDenied => Some(
            "a port below 1024 needs CAP_NET_BIND_SERVICE (the packaged service has it) or \
             root; or choose a port above 1023"
                .to_string(),
        ),
        _ => None,
    }
}

/// One line for each configured worker socket that nothing can be listening on (the path
/// is missing or is not a socket), and one when no worker is configured at all. The
/// gateway starts anyway and dials each worker until it answers; these say what to start.
pub fn worker_warnings(cfg: &Config) -> Vec<String> {
    if cfg.workers.is_empty() {
        return vec![
            "no worker configured: clients can connect, but their frames have nowhere to go; \
             fix: start one (holdfast-worker echo --socket /run/holdfast/echo.sock) and name \
             it with --worker PATH or workers = [...]"
                .to_string(),
        ];
    }
    let retry = cfg.runtime.worker_retry_ms;
    cfg.workers
        .iter()
        .filter_map(|path| {
            let p = path.display();
            match std::fs::metadata(path) {
                Ok(m) if m.file_type().is_socket() => None,
                Ok(_) => Some(format!(
                    "worker {p} is not a Unix socket; fix: --worker and workers = [...] name the \
                     socket a worker listens on (holdfast-worker echo --socket PATH)"
                )),
                Err(e) => Some(format!(
                    "no worker listens on {p} ({e}); fix: start one there (holdfast-worker echo \
                     --socket {p}, or systemctl start holdfast-worker@echo); the gateway dials \
                     it from {retry} ms on, backing off, and relays once it answers"
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_quoted_by_its_parent_is_not_repeated() {
        let e = anyhow::Error::new(TlsSetupError::Read {
            path: "/etc/holdfast/cert.pem".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
        let line = one_line(&e);
        assert_eq!(line.matches("entity not found").count(), 1, "{line}");
        assert!(line.contains("; fix: correct the path"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_port_in_use_names_the_fix() {
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::AddrInUse))
            .context("cannot listen on 127.0.0.1:7443");
        let line = one_line(&e);
        assert!(
            line.starts_with("cannot listen on 127.0.0.1:7443: "),
            "{line}"
        );
        assert!(
            line.contains("another process holds this address"),
            "{line}"
        );
    }

    #[test]
    fn workers_that_cannot_be_there_are_named() {
        let mut cfg = Config::default();
        assert!(worker_warnings(&cfg)[0].starts_with("no worker configured"));
        cfg.workers = vec!["/nonexistent/holdfast/echo.sock".into(), "/".into()];
        let w = worker_warnings(&cfg);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("no worker listens on /nonexistent/holdfast/echo.sock"));
        assert!(w[1].contains("is not a Unix socket"));
    }
}
