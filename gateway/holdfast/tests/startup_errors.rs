//! A gateway given a bad certificate, key or config refuses to start: it exits non-zero
//! before its ready line, and stderr names the file or key to fix.

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use common::{gateway_args, Exited, Gateway, Pki, TestDir};

const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// A gateway with this cert and key (and a worker path that need not exist).
fn run_with(dir: &TestDir, pki: &Pki, cert: &Path, key: &Path) -> Exited {
    let mut args = gateway_args(pki, &[&dir.join("worker.sock")], &[]);
    // Replace the good pair that gateway_args put in.
    for (flag, path) in [("--cert", cert), ("--key", key)] {
        let i = args.iter().position(|a| a == flag).expect("flag present");
        args[i + 1] = path.as_os_str().to_owned();
    }
    Gateway::run_to_exit(args, EXIT_TIMEOUT)
}

fn assert_refused(what: &str, exited: &Exited, names: &[&str]) {
    assert!(
        !exited.status.success(),
        "{what}: the gateway exited with {} instead of an error\n--- stderr ---\n{}",
        exited.status,
        exited.stderr
    );
    assert!(
        !exited.stdout.contains("holdfast ready"),
        "{what}: the gateway said it was ready: {:?}",
        exited.stdout
    );
    assert!(
        names.iter().any(|n| exited.stderr.contains(n)),
        "{what}: stderr should name {names:?}, got:\n{}",
        exited.stderr
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[test]
fn a_missing_certificate_file_is_refused_naming_the_path() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let missing = dir.join("no-such-cert.pem");
    let exited = run_with(&dir, &pki, &missing, &pki.key);
    assert_refused("missing certificate", &exited, &[s(&missing)]);
}

#[test]
fn a_missing_key_file_is_refused_naming_the_path() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let missing = dir.join("no-such-key.pem");
    let exited = run_with(&dir, &pki, &pki.cert, &missing);
    assert_refused("missing key", &exited, &[s(&missing)]);
}

#[test]
fn a_certificate_file_that_is_not_pem_is_refused_naming_the_path() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let garbage = dir.write(
        "garbage-cert.pem",
        "this is not a certificate\n\x00\x01\x02\n",
    );
    let exited = run_with(&dir, &pki, &garbage, &pki.key);
    assert_refused("garbage certificate PEM", &exited, &[s(&garbage)]);
}

#[test]
fn a_key_file_that_is_not_pem_is_refused_naming_the_path() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let garbage = dir.write(
        "garbage-key.pem",
        "-----BEGIN PRIVATE KEY-----\nnot base64 at all!\n-----END PRIVATE KEY-----\n",
    );
    let exited = run_with(&dir, &pki, &pki.cert, &garbage);
    assert_refused("garbage key PEM", &exited, &[s(&garbage)]);
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused_naming_the_files() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    // The other.test key is a valid key, just not this certificate's.
    let exited = run_with(&dir, &pki, &pki.cert, &pki.other_key);
    assert_refused(
        "mismatched key",
        &exited,
        &[s(&pki.other_key), s(&pki.cert)],
    );
}

fn run_config(dir: &TestDir, toml: &str) -> Exited {
    let config = dir.write("holdfast.toml", toml);
    let args: Vec<OsString> = vec!["run".into(), "--config".into(), config.into()];
    Gateway::run_to_exit(args, EXIT_TIMEOUT)
}

#[test]
fn a_config_value_of_the_wrong_type_is_refused_naming_the_key() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let certs = format!(
        "[[tls.certs]]\ncert = {:?}\nkey = {:?}\n",
        s(&pki.cert),
        s(&pki.key)
    );
    let addrs = "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";

    let exited = run_config(&dir, &format!("{addrs}cores = \"two\"\n{certs}"));
    assert_refused("cores = \"two\"", &exited, &["cores"]);

    let exited = run_config(
        &dir,
        &format!("{addrs}cores = 2\n{certs}[limits]\nidle_timeout_secs = \"soon\"\n"),
    );
    assert_refused(
        "limits.idle_timeout_secs = \"soon\"",
        &exited,
        &["idle_timeout_secs"],
    );
}

#[test]
fn a_config_file_that_does_not_exist_is_refused_naming_the_path() {
    let dir = TestDir::new();
    let missing = dir.join("missing.toml");
    let exited = Gateway::run_to_exit(
        vec![
            OsString::from("run"),
            "--config".into(),
            missing.clone().into(),
        ],
        EXIT_TIMEOUT,
    );
    assert_refused("missing config file", &exited, &[s(&missing)]);
}
