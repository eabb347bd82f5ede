//! The crypto provider holdfast ships, chosen at build time: rustls' provider for the
//! handshake and the record protection, and the same library's primitives (AEAD, HKDF,
//! digests, randomness) for the gateway's own uses of them (session-ticket keys). The
//! record layer of hibernated connections takes its AEAD and HKDF from the rustls provider,
//! so everything follows this one choice.
//!
//! aws-lc-rs is the default: measured against ring on the same machine in one run
//! (`holdfast-bench ceiling --provider ...`, figures in ARCHITECTURE.md), its X25519
//! handshake costs the server about a third less, it offers the hybrid post-quantum group
//! X25519MLKEM768 that current browsers send, and its AES-GCM is faster per record. ring
//! stays behind the `ring` feature (`--no-default-features --features ring`) for builds
//! without a C toolchain for aws-lc. When both features are on, aws-lc-rs is used.
//!
//! Nothing here touches a socket; it only names things.
#![forbid(unsafe_code)]

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!(
    "holdfast needs a crypto provider: build with the feature `aws-lc-rs` (the default) or `ring`"
);

#[cfg(feature = "aws-lc-rs")]
pub(crate) use aws_lc_rs as primitives;
#[cfg(feature = "aws-lc-rs")]
pub use rustls::crypto::aws_lc_rs as tls;

#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
pub(crate) use ::ring as primitives;
#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
pub use rustls::crypto::ring as tls;

/// The provider's name, as logs and `holdfast check` show it.
#[cfg(feature = "aws-lc-rs")]
pub const NAME: &str = "aws-lc-rs";
/// The provider's name, as logs and `holdfast check` show it.
#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
pub const NAME: &str = "ring";

/// The rustls provider the gateway's server configuration is built on.
pub fn default_provider() -> rustls::crypto::CryptoProvider {
    tls::default_provider()
}
