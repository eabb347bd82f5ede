//! Session tickets a fleet shares: `[tls] ticket_key_file` names a 32-byte secret that
//! every core and every gateway reading the same file uses, so a client that reconnects to
//! another box (or to this one after a restart) resumes instead of paying a full handshake.
//!
//! Rotation needs no coordination: the time is cut into epochs of `ticket_rotation_secs`,
//! and the ticket key of epoch `e` is HKDF-SHA256(file secret, epoch `e`). A ticket is sealed
//! with the current epoch's key and opened with the key of the epoch it names if that is
//! the current one or the previous one (or the next one, for a box whose clock runs a
//! little behind the issuer's). A ticket from an older epoch is rotated out: rustls then
//! does a full handshake, not an error. Every gateway with the same file and interval
//! derives the same keys at the same time, restarts and reloads change nothing, and
//! replacing the file (`holdfast ticket-key generate`) retires every ticket at once.
//!
//! Without a file, a process makes a random secret of its own at start ([`FleetTicketer::
//! random`]): its tickets resume on it alone, across reloads (the secret is kept) and live
//! upgrades (the old process hands [`FleetTicketer::secret`] to the new one), not after a
//! restart.
//!
//! The AEAD is the crypto provider's own (AES-256-GCM of the provider the gateway is built with, see `provider.rs`), as in rustls' ticketer.
//! Keys are derived per ticket (an HKDF expand and a key schedule, about a microsecond,
//! against the hundred or so of a handshake) so nothing is cached, locked or shared
//! between cores. This module reads files but opens no sockets.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::provider::primitives::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN,
};
use crate::provider::primitives::rand::{SecureRandom, SystemRandom};
use crate::provider::primitives::{digest, hkdf};
use rustls::server::ProducesTickets;

const FILE_HEADER: &str =
    "# holdfast session-ticket key v1: keep secret, mode 0600, the same file on every gateway";
/// Bytes of a ticket-key secret.
pub const SECRET_LEN: usize = 32;
/// Ticket layout: epoch (8, big-endian) | file tag (8) | nonce (12) | sealed state | tag (16).
/// The first 16 bytes are the key name, also the additional data of the AEAD.
const NAME_LEN: usize = 16;
/// rustls' own tickets hold a few hundred bytes; anything much longer is not ours.
const MAX_TICKET: usize = 4096;

/// A ticket-key file problem, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("cannot read ticket key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ticket key file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write ticket key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no system randomness for a ticket key")]
    Random,
}

/// The ticketer over one key file's secret.
pub struct FleetTicketer {
    /// The file's (or the process's) secret, kept to hand it to a live upgrade.
    raw: [u8; SECRET_LEN],
    secret: hkdf::Prk,
    /// Tells this file's tickets from another file's without trying to open them.
    tag: [u8; 8],
    rotation_secs: u64,
    rng: SystemRandom,
}

impl std::fmt::Debug for FleetTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetTicketer")
            .field("rotation_secs", &self.rotation_secs)
            .finish_non_exhaustive()
    }
}

impl FleetTicketer {
    /// Loads the secret from `path` (written by [`generate`]); refuses a file that others
    /// than its owner may read.
    pub fn from_file(path: &Path, rotation_secs: u64) -> Result<FleetTicketer, TicketKeyError> {
        let read_err = |source| TicketKeyError::Read {
            path: path.to_owned(),
            source,
        };
        let invalid = |message: String| TicketKeyError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mode = std::fs::metadata(path)
            .map_err(read_err)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(invalid(format!(
                "readable by others (mode {:04o}); run `chmod 600 {}`",
                mode & 0o7777,
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let hex: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let secret: [u8; SECRET_LEN] = decode_hex(&hex)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| {
                invalid(format!(
                "expected {} hex digits (make one with `holdfast ticket-key generate --out PATH`)",
                SECRET_LEN * 2
            ))
            })?;
        Ok(FleetTicketer::new(&secret, rotation_secs))
    }

    /// A ticketer over a fresh random secret: a process's own key, when no file is named.
    pub fn random(rotation_secs: u64) -> Result<FleetTicketer, TicketKeyError> {
        Ok(FleetTicketer::new(&random_secret()?, rotation_secs))
    }

    /// The secret, for a live upgrade to hand to the new process.
    pub fn secret(&self) -> [u8; SECRET_LEN] {
        self.raw
    }

    pub fn new(secret: &[u8; SECRET_LEN], rotation_secs: u64) -> FleetTicketer {
        assert!(rotation_secs > 0, "validated by the config");
        let d = digest::digest(&digest::SHA256, secret);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&d.as_ref()[..8]);
        FleetTicketer {
            raw: *secret,
            secret: hkdf::Salt::new(hkdf::HKDF_SHA256, b"holdfast session tickets v1")
                .extract(secret),
            tag,
            rotation_secs,
            rng: SystemRandom::new(),
        }
    }

    fn epoch_now(&self) -> u64 {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        secs / self.rotation_secs
    }

    fn key(&self, epoch: u64) -> LessSafeKey {
        let info = epoch.to_be_bytes();
        let info = [&info[..]];
        let okm = self
            .secret
            .expand(&info, &AES_256_GCM)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        LessSafeKey::new(UnboundKey::from(okm))
    }

    fn name(&self, epoch: u64) -> [u8; NAME_LEN] {
        let mut name = [0u8; NAME_LEN];
        name[..8].copy_from_slice(&epoch.to_be_bytes());
        name[8..].copy_from_slice(&self.tag);
        name
    }

    /// Seals `state` with the key of `epoch` (the current one outside tests).
    fn seal(&self, epoch: u64, state: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let name = self.name(epoch);
        let tag_len = AES_256_GCM.tag_len();
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + state.len() + tag_len);
        out.extend_from_slice(&name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(state);
        let tag = self
            .key(epoch)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut out[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens a ticket if `now` (an epoch) still accepts the epoch it names.
    fn open(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET || ticket.len() < NAME_LEN + NONCE_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        if name[8..] != self.tag {
            return None;
        }
        let epoch = u64::from_be_bytes(name[..8].try_into().ok()?);
        // Current, previous, or the next (an issuer whose clock is a little ahead).
        if epoch.saturating_add(1) < now || epoch > now.saturating_add(1) {
            return None;
        }
        let mut name_buf = [0u8; NAME_LEN];
        name_buf.copy_from_slice(name);
        let mut buf = sealed.to_vec();
        let plain = self
            .key(epoch)
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(name_buf),
                &mut buf,
            )
            .ok()?
            .len();
        buf.truncate(plain);
        Some(buf)
    }
}

impl ProducesTickets for FleetTicketer {
    fn enabled(&self) -> bool {
        true
    }

    /// The hint to clients: a ticket is good for at least one rotation interval (up to
    /// two, depending on when in its epoch it was issued).
    fn lifetime(&self) -> u32 {
        self.rotation_secs.min(u64::from(u32::MAX)) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(self.epoch_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(self.epoch_now(), cipher)
    }
}

/// Writes a new key file at `out` with mode 0600: written beside it and renamed over it,
/// so a gateway that reloads meanwhile reads the old file or the new one, never half.
pub fn generate(out: &Path) -> Result<(), TicketKeyError> {
    let secret = random_secret()?;
    let write_err = |source| TicketKeyError::Write {
        path: out.to_owned(),
        source,
    };
    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    writeln!(f, "{FILE_HEADER}\n{hex}")
        .and_then(|()| f.sync_all())
        .map_err(write_err)?;
    std::fs::rename(&tmp, out).map_err(write_err)
}

fn random_secret() -> Result<[u8; SECRET_LEN], TicketKeyError> {
    let mut secret = [0u8; SECRET_LEN];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| TicketKeyError::Random)?;
    Ok(secret)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &[u8] = b"resumption state of a session";

    #[test]
    fn the_same_secret_opens_another_instances_tickets() {
        let a = FleetTicketer::new(&[7; 32], 3600);
        let b = FleetTicketer::new(&[7; 32], 3600);
        let t = a.encrypt(STATE).unwrap();
        assert_eq!(b.decrypt(&t).as_deref(), Some(STATE));
        let other = FleetTicketer::new(&[8; 32], 3600);
        assert_eq!(other.decrypt(&t), None, "another file's key opens nothing");
    }

    #[test]
    fn current_and_previous_epochs_open_older_ones_are_rotated_out() {
        let k = FleetTicketer::new(&[1; 32], 60);
        let t = k.seal(100, STATE).unwrap();
        assert_eq!(k.open(100, &t).as_deref(), Some(STATE));
        assert_eq!(k.open(101, &t).as_deref(), Some(STATE), "previous key");
        assert_eq!(
            k.open(99, &t).as_deref(),
            Some(STATE),
            "issuer's clock ahead"
        );
        assert_eq!(k.open(102, &t), None, "rotated out");
        assert_eq!(k.open(98, &t), None);
    }

    #[test]
    fn tampered_or_malformed_tickets_do_not_open() {
        let k = FleetTicketer::new(&[1; 32], 60);
        let t = k.seal(5, STATE).unwrap();
        for i in [0, 7, 8, 15, 16, 27, 28, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(k.open(5, &bad), None, "byte {i} flipped");
        }
        for len in 0..t.len() {
            assert_eq!(k.open(5, &t[..len]), None, "cut to {len}");
        }
        assert_eq!(k.open(5, &vec![0; MAX_TICKET + 1]), None);
    }

    #[test]
    fn generated_files_are_private_and_load() {
        let dir = std::env::temp_dir().join(format!("holdfast-ticket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ticket.key");
        generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let a = FleetTicketer::from_file(&path, 60).unwrap();
        let b = FleetTicketer::from_file(&path, 60).unwrap();
        assert_eq!(
            b.open(9, &a.seal(9, STATE).unwrap()).as_deref(),
            Some(STATE)
        );
        // A new file retires every ticket of the old one.
        generate(&path).unwrap();
        let c = FleetTicketer::from_file(&path, 60).unwrap();
        assert_eq!(c.open(9, &a.seal(9, STATE).unwrap()), None);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = FleetTicketer::from_file(&path, 60).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "# no key\nabc\n").unwrap();
        let err = FleetTicketer::from_file(&path, 60).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
