//! `holdfast-bench gen-cert`: throw-away certificates for demos and benchmarks, made with
//! rcgen: a CA, and a server certificate for the given names signed by it, both ECDSA
//! P-256 (the signature the gateway's handshake budget is stated for).
//!
//! These keys are generated fresh each time and written unencrypted; they are for
//! loopback demos and never for a gateway that faces real clients.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// Arguments of `holdfast-bench gen-cert`.
#[derive(Debug, Args)]
pub struct GenCertArgs {
    /// Directory to write ca.pem, cert.pem and key.pem into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Names the server certificate is valid for: DNS names and IP addresses.
    #[arg(
        long,
        value_name = "NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    pub names: Vec<String>,
}

/// The PEM files of a generated certificate set.
#[derive(Debug)]
pub struct Generated {
    /// The CA certificate clients trust.
    pub ca: String,
    /// The server's certificate chain. The CA is the trust anchor clients load directly,
    /// so the chain is the leaf alone and handshakes carry one certificate.
    pub cert: String,
    /// The server's private key, PKCS#8.
    pub key: String,
}

/// Makes a CA and a server certificate for `names` (IP addresses become IP SANs).
pub fn generate(names: &[String]) -> anyhow::Result<Generated> {
    ensure!(
        !names.is_empty(),
        "at least one name is needed for the server certificate"
    );
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "holdfast throw-away CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(names.to_vec())
        .with_context(|| format!("server certificate names {names:?}"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    Ok(Generated {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes DIR/ca.pem, DIR/cert.pem and DIR/key.pem (the key readable by its owner only).
pub fn run(args: GenCertArgs) -> anyhow::Result<()> {
    let names: Vec<String> = args
        .names
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let g = generate(&names)?;
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    write(&args.out.join("ca.pem"), &g.ca, 0o644)?;
    write(&args.out.join("cert.pem"), &g.cert, 0o644)?;
    write(&args.out.join("key.pem"), &g.key, 0o600)?;
    println!(
        "wrote {0}/ca.pem, {0}/cert.pem and {0}/key.pem for {1}",
        args.out.display(),
        names.join(", ")
    );
    Ok(())
}
