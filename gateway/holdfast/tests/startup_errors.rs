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

// ---------------------------------------------------------------------------------------
// One line that says what to do: the error, then `; fix: ...`.

/// The one `error: ...` line of a refused start, checked to carry a fix.
fn error_line(what: &str, exited: &Exited) -> String {
    let lines: Vec<&str> = exited
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want exactly one `error:` line, got:\n{}",
        exited.stderr
    );
    let line = lines[0].to_string();
    assert!(line.contains("; fix: "), "{what}: no fix in {line:?}");
    line
}

#[test]
fn refusals_are_one_line_with_the_fix() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);

    let missing = dir.join("no-such-cert.pem");
    let line = error_line("missing cert", &run_with(&dir, &pki, &missing, &pki.key));
    assert!(
        line.contains(s(&missing)) && line.contains("correct the path"),
        "{line}"
    );
    // The io error is quoted once, not once by the message and again as its cause.
    assert_eq!(line.matches("os error 2").count(), 1, "{line}");

    let line = error_line(
        "mismatched key",
        &run_with(&dir, &pki, &pki.cert, &pki.other_key),
    );
    assert!(
        line.contains("give the key that was made with this certificate"),
        "{line}"
    );

    let line = error_line(
        "key given as certificate",
        &run_with(&dir, &pki, &pki.key, &pki.key),
    );
    assert!(line.contains("BEGIN CERTIFICATE"), "{line}");
}

#[test]
fn an_unknown_config_key_is_refused_in_one_line_naming_it() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[limits]\nidle_timout_secs = 3\n\
         [[tls.certs]]\ncert = {:?}\nkey = {:?}\n",
        s(&pki.cert),
        s(&pki.key)
    );
    let exited = run_config(&dir, &toml);
    assert_refused("misspelt key", &exited, &["limits.idle_timout_secs"]);
    let line = error_line("misspelt key", &exited);
    assert!(
        line.contains("line 4, key limits.idle_timout_secs: unknown field")
            && line.contains("expected one of")
            && line.contains("correct the key's spelling"),
        "{line}"
    );
}

#[test]
fn a_port_in_use_is_refused_naming_the_address_and_the_fix() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("address").to_string();
    for flag in ["--listen", "--admin"] {
        let mut args = gateway_args(&pki, &[&dir.join("worker.sock")], &[]);
        let i = args.iter().position(|a| a == flag).expect("flag present");
        args[i + 1] = addr.clone().into();
        let exited = Gateway::run_to_exit(args, EXIT_TIMEOUT);
        assert_refused(flag, &exited, &[&addr]);
        let line = error_line(flag, &exited);
        assert!(
            line.contains("another process holds this address"),
            "{line}"
        );
    }
}

/// Starts the gateway with `args`, running `setup` in the child before exec; returns its
/// exit status (None: it printed its ready line and was stopped) and its stderr.
fn start_with_setup(
    args: Vec<OsString>,
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let mut cmd = Command::new(common::gateway_bin());
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `setup` runs between fork and exec and only makes syscalls (setrlimit,
    // prctl) on data it owns; it allocates nothing and takes no lock.
    unsafe { cmd.pre_exec(setup) };
    let mut child = cmd.spawn().expect("spawn holdfast");
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let mut child = common::ChildGuard::new(child);
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("holdfast ready ") {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(common::READY_TIMEOUT).is_ok();
    let status = if ready {
        None
    } else {
        Some(
            child
                .wait_timeout(EXIT_TIMEOUT)
                .expect("the gateway neither got ready nor exited"),
        )
    };
    drop(child); // kills it if it still runs, so the stderr reader sees EOF
    (status, err.join().expect("stderr reader"))
}

#[test]
fn an_open_file_limit_below_the_tables_is_one_warning_with_the_fix() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let args = gateway_args(&pki, &[], &["--max-conns-per-core", "1000"]);
    let (status, stderr) = start_with_setup(args, || {
        let lim = libc::rlimit {
            rlim_cur: 256,
            rlim_max: 256,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    });
    assert!(status.is_none(), "the gateway should run, capped: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("open-file limit too low for the configured tables"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("soft 256") && lines[0].contains("fix: LimitNOFILE=2048"),
        "{}",
        lines[0]
    );
    // No worker configured: said once, with what to start.
    assert_eq!(
        stderr.matches("no worker configured").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_worker_socket_that_is_not_there_is_named_with_what_to_start() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let sock = dir.join("echo.sock");
    let gw = Gateway::start(&dir, gateway_args(&pki, &[&sock], &[]));
    let stderr = common::file_tail(&gw.stderr, 64 * 1024);
    let want = format!("no worker listens on {}", sock.display());
    let line = stderr
        .lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no {want:?} in\n{stderr}"));
    assert!(
        line.contains(&format!(
            "fix: start one there (holdfast-worker echo --socket {}",
            sock.display()
        )),
        "{line}"
    );
}

/// io_uring refused as `kernel.io_uring_disabled = 2` refuses it: a seccomp filter makes
/// io_uring_setup fail with EPERM (the sysctl itself is host-wide, not for a test to set).
#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_refused_by_the_kernel_is_one_line_with_the_fix() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let args = gateway_args(&pki, &[], &[]);
    let (status, stderr) = start_with_setup(args, || {
        let eperm = libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA);
        let mut filter = [
            // A = seccomp_data.nr
            libc::sock_filter {
                code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                jt: 0,
                jf: 0,
                k: 0,
            },
            libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: libc::SYS_io_uring_setup as u32,
            },
            libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: eperm,
            },
            libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ALLOW,
            },
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: prctl reads `prog` and the filter it points to, both alive for the call;
        // NO_NEW_PRIVS first, as an unprivileged seccomp filter requires.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    });
    let status = status.expect("the gateway must not start without io_uring");
    assert!(!status.success(), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("refused io_uring") && errors[0].contains("seccomp"),
        "{}",
        errors[0]
    );
}
