//! Shared harness for holdfast's integration tests: a throw-away PKI, the gateway and the
//! reference worker as child processes that die with the test, a blocking rustls client
//! that speaks the native frame protocol, and a reader for the admin metrics.
//!
//! Every wait here has a deadline, so a gateway that hangs fails its test instead of
//! hanging the run. When a test fails, the gateway's and the worker's stderr are printed
//! and the test's files are kept on disk. The harness never looks inside the gateway: it
//! only uses the command line, the sockets and the admin endpoint that operators use.
//!
//! Each test binary uses a different part of this module, hence `allow(dead_code)`.
#![allow(dead_code)]

pub mod peer;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls::{StreamOwned, SupportedProtocolVersion};

/// How long the gateway may take to print its ready line (a debug build on a loaded
/// two-core box).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default deadline for one read, one handshake or one expected close.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Counters are aggregated off the data path and may lag by about a second.
pub const METRIC_TIMEOUT: Duration = Duration::from_secs(5);
/// The core count every test asks for: this is a two-core machine, and two cores are
/// enough to see connections spread.
pub const CORES: usize = 2;

// ---------------------------------------------------------------------------------------
// Files

/// A directory for one test's files under the system temp dir, removed when the test
/// passes and kept (with its path printed) when it fails.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Kept short: a Unix socket path must fit in 108 bytes.
        let path = std::env::temp_dir().join(format!(
            "holdfast-it-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The last `max` bytes of a file, for failure messages.
pub fn file_tail(path: &Path, max: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            let mut s = String::from_utf8_lossy(&bytes[start..]).into_owned();
            if start > 0 {
                s.insert_str(0, "[...]\n");
            }
            s
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

// ---------------------------------------------------------------------------------------
// Certificates

/// A test CA, a server certificate for `localhost` and `127.0.0.1`, and a second server
/// certificate for `other.test`, all as PEM files in the test directory.
pub struct Pki {
    pub ca_pem: PathBuf,
    pub ca_der: CertificateDer<'static>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_der: CertificateDer<'static>,
    pub other_cert: PathBuf,
    pub other_key: PathBuf,
    pub other_cert_der: CertificateDer<'static>,
}

impl Pki {
    pub fn generate(dir: &TestDir) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "holdfast test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let leaf = |names: &[&str], cn: &str| {
            let key = KeyPair::generate().expect("generate server key");
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(names).expect("server cert params");
            params.distinguished_name.push(DnType::CommonName, cn);
            // Strict verifiers (OpenSSL's X509_STRICT, as newer Pythons use) want it.
            params.use_authority_key_identifier_extension = true;
            let cert = params
                .signed_by(&key, &ca, &ca_key)
                .expect("sign server cert");
            (cert, key)
        };
        let (cert, key) = leaf(&["localhost", "127.0.0.1"], "localhost");
        let (other, other_key) = leaf(&["other.test"], "other.test");

        Pki {
            ca_pem: dir.write("ca.pem", ca.pem()),
            ca_der: ca.der().clone(),
            cert: dir.write("cert.pem", cert.pem()),
            key: dir.write("key.pem", key.serialize_pem()),
            cert_der: cert.der().clone(),
            other_cert: dir.write("other-cert.pem", other.pem()),
            other_key: dir.write("other-key.pem", other_key.serialize_pem()),
            other_cert_der: other.der().clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Child processes

/// Set to a directory holding `holdfast` and `holdfast-worker` to test those binaries
/// (a release build, say) instead of the ones of this build.
pub const BIN_DIR_VAR: &str = "HOLDFAST_TEST_BIN_DIR";

pub fn gateway_bin() -> PathBuf {
    match std::env::var_os(BIN_DIR_VAR) {
        Some(dir) => Path::new(&dir).join("holdfast"),
        None => PathBuf::from(env!("CARGO_BIN_EXE_holdfast")),
    }
}

/// The reference worker, built by its own package into the same target directory.
pub fn worker_bin() -> PathBuf {
    let path = gateway_bin().with_file_name("holdfast-worker");
    assert!(
        path.exists(),
        "{} is missing: the integration tests need the reference worker; \
         run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A child process that is killed and reaped when the guard drops, so a failing test
/// leaves nothing running.
pub struct ChildGuard {
    child: Child,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited by `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("waitpid on a child process");
        }
        self.exited
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) takes plain integers; the pid is our own unreaped child, so it
        // cannot name another process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }
}

/// Whether a child still runs, for failure messages: a process that died of a signal
/// the test never sent was killed from outside (or crashed).
fn describe_state(child: &mut ChildGuard) -> String {
    use std::os::unix::process::ExitStatusExt;
    match child.try_wait() {
        None => format!("pid {}, still running", child.pid()),
        Some(status) => match status.signal() {
            Some(sig) => format!(
                "pid {}, died of signal {sig} before the test ended it",
                child.pid()
            ),
            None => format!(
                "pid {}, exited with {status} before the test ended it",
                child.pid()
            ),
        },
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads a child's stdout line by line on a thread, for the rest of the child's life (so
/// the child never blocks on a full pipe), and hands the lines over a channel.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The test may have stopped listening; keep draining anyway.
            let _ = tx.send(line);
        }
    });
    rx
}

/// A running reference worker listening on `socket`.
pub struct Worker {
    // Declared first: dropped (killed) before the rest.
    child: ChildGuard,
    pub socket: PathBuf,
    pub stderr: PathBuf,
}

impl Worker {
    /// Starts `holdfast-worker echo --socket PATH` and waits for its ready line.
    pub fn start(dir: &TestDir, socket: &Path) -> Worker {
        let stderr_path = dir.join(&format!(
            "worker-{}.stderr",
            socket.file_name().and_then(OsStr::to_str).unwrap_or("sock")
        ));
        let mut child = Command::new(worker_bin())
            .arg("echo")
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).expect("create worker stderr file"))
            .spawn()
            .expect("spawn holdfast-worker");
        let lines = stdout_lines(&mut child);
        let mut child = ChildGuard::new(child);
        let want = format!("holdfast-worker: listening on {}", socket.display());
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.trim_end() == want => break,
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "holdfast-worker did not print {want:?} ({e}; exit status {:?}); stdout: {seen:?}\n\
                     --- worker stderr ---\n{}",
                    child.try_wait(),
                    file_tail(&stderr_path, 8192)
                ),
            }
        }
        Worker {
            child,
            socket: socket.to_owned(),
            stderr: stderr_path,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- worker {} ({}) stderr ---\n{}",
                self.socket.display(),
                describe_state(&mut self.child),
                file_tail(&self.stderr, 8192)
            );
        }
    }
}

/// A running gateway, started with ports 0, and the addresses its ready line announced.
pub struct Gateway {
    child: ChildGuard,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub cores: usize,
    pub stderr: PathBuf,
    /// Anything on stdout after the ready line (the contract says there is none).
    pub stdout: mpsc::Receiver<String>,
}

/// What a gateway that should not start did.
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Gateway {
    /// Starts `holdfast ARGS...` and waits for `holdfast ready ...` on stdout.
    pub fn start<I, S>(dir: &TestDir, args: I) -> Gateway
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all = vec![gateway_bin().into_os_string()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        Gateway::start_program(dir, all)
    }

    /// As [`Gateway::start`], with the program as the first of `args` (a copy of the
    /// gateway binary, say).
    pub fn start_program(dir: &TestDir, args: Vec<OsString>) -> Gateway {
        let (program, args) = args.split_first().expect("a program");
        let args = args.to_vec();
        let stderr_path = dir.join(&format!(
            "gateway-{}.stderr",
            GATEWAY_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).expect("create gateway stderr file"))
            .spawn()
            .expect("spawn holdfast");
        let lines = stdout_lines(&mut child);
        let mut child = ChildGuard::new(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = Vec::new();
        let ready = loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("holdfast ready ") => break line,
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "holdfast {args:?} printed no ready line ({e}; exit status {:?}); other stdout: {seen:?}\n\
                     --- gateway stderr ---\n{}",
                    child.wait_timeout(Duration::from_millis(200)),
                    file_tail(&stderr_path, 16384)
                ),
            }
        };
        let (listen, admin, cores) = parse_ready_line(&ready);
        assert!(
            seen.is_empty(),
            "holdfast printed {seen:?} on stdout before its ready line"
        );
        Gateway {
            child,
            listen,
            admin,
            cores,
            stderr: stderr_path,
            stdout: lines,
        }
    }

    /// Runs `holdfast ARGS...` expecting it to exit by itself within `timeout`.
    pub fn run_to_exit<I, S>(args: I, timeout: Duration) -> Exited
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut child = Command::new(gateway_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast");
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let out = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut child = ChildGuard::new(child);
        let status = child.wait_timeout(timeout);
        drop(child); // kills it if it is still running, so the readers see EOF
        let stdout = out.join().expect("stdout reader");
        let stderr = err.join().expect("stderr reader");
        let Some(status) = status else {
            panic!(
                "holdfast {args:?} was expected to exit within {timeout:?} but kept running\n\
                 --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            );
        };
        Exited {
            status,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn signal(&self, signal: libc::c_int) {
        self.child.signal(signal)
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    pub fn stderr_tail(&self) -> String {
        file_tail(&self.stderr, 16384)
    }

    /// A client with the default options for `pki`, connected and past its handshake.
    pub fn client(&self, pki: &Pki) -> Client {
        Client::connect(self.listen, &ClientOptions::new(pki))
            .unwrap_or_else(|e| panic!("TLS connect to the gateway at {}: {e}", self.listen))
    }

    /// `GET path` on the admin address: status code and body.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.admin))
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
        Metrics::parse(&body)
    }

    /// Polls /metrics until `ok` holds, for up to [`METRIC_TIMEOUT`]; panics with the
    /// last scrape otherwise.
    pub fn wait_for_metrics(&self, what: &str, mut ok: impl FnMut(&Metrics) -> bool) -> Metrics {
        self.wait_for_metrics_within(METRIC_TIMEOUT, what, &mut ok)
    }

    pub fn wait_for_metrics_within(
        &self,
        timeout: Duration,
        what: &str,
        ok: &mut dyn FnMut(&Metrics) -> bool,
    ) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics();
            if ok(&m) {
                return m;
            }
            if Instant::now() >= deadline {
                panic!(
                    "metrics never showed {what} within {timeout:?}; last scrape:\n{}",
                    m.text
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the sum of `name` over the series carrying `labels` is at least `min`,
    /// and returns that sum.
    pub fn wait_for_sum_at_least(&self, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
        let m = self.wait_for_metrics(&format!("{name}{labels:?} >= {min}"), |m| {
            m.sum(name, labels) >= min
        });
        m.sum(name, labels)
    }

    /// Waits until `holdfast_closes_total{reason}` has grown past `before`.
    pub fn wait_for_close_reason(&self, reason: &str, before: f64) -> f64 {
        self.wait_for_sum_at_least("holdfast_closes_total", &[("reason", reason)], before + 1.0)
    }

    pub fn close_count(&self, reason: &str) -> f64 {
        self.metrics()
            .sum("holdfast_closes_total", &[("reason", reason)])
    }
}

static GATEWAY_SEQ: AtomicUsize = AtomicUsize::new(0);

impl Drop for Gateway {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- gateway stderr ({}, {}) ---\n{}",
                self.stderr.display(),
                describe_state(&mut self.child),
                self.stderr_tail()
            );
        }
    }
}

/// `holdfast ready listen=ADDR admin=ADDR cores=N`, fields in any order.
pub fn parse_ready_line(line: &str) -> (SocketAddr, SocketAddr, usize) {
    let mut fields = BTreeMap::new();
    for token in line.split_whitespace().skip(2) {
        let (k, v) = token
            .split_once('=')
            .unwrap_or_else(|| panic!("ready line {line:?}: field {token:?} has no '='"));
        fields.insert(k, v);
    }
    let get = |k: &str| {
        *fields
            .get(k)
            .unwrap_or_else(|| panic!("ready line {line:?} has no {k}="))
    };
    let addr = |k: &str| -> SocketAddr {
        let a: SocketAddr = get(k)
            .parse()
            .unwrap_or_else(|e| panic!("ready line {line:?}: {k}: {e}"));
        assert_ne!(
            a.port(),
            0,
            "ready line {line:?} must give the actual {k} port, not 0"
        );
        a
    };
    let cores = get("cores")
        .parse()
        .unwrap_or_else(|e| panic!("ready line {line:?}: cores: {e}"));
    (addr("listen"), addr("admin"), cores)
}

/// The arguments of a gateway on loopback ports 0 with `CORES` cores, the test PKI's
/// localhost certificate and the given workers, followed by `extra`.
pub fn gateway_args(pki: &Pki, workers: &[&Path], extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--cores",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(CORES.to_string().into());
    args.push("--cert".into());
    args.push(pki.cert.clone().into());
    args.push("--key".into());
    args.push(pki.key.clone().into());
    for w in workers {
        args.push("--worker".into());
        args.push(w.as_os_str().to_owned());
    }
    args.extend(extra.iter().map(OsString::from));
    args
}

/// One test's world: files, certificates, an echo worker and a gateway relaying to it.
/// Fields drop in order: the gateway first, the directory last.
pub struct Stack {
    pub gateway: Gateway,
    pub worker: Worker,
    pub pki: Pki,
    pub dir: TestDir,
}

impl Stack {
    /// An echo worker and a gateway with `CORES` cores and the `extra` flags.
    pub fn start(extra: &[&str]) -> Stack {
        let dir = TestDir::new();
        let pki = Pki::generate(&dir);
        let worker = Worker::start(&dir, &dir.join("worker.sock"));
        let gateway = Gateway::start(&dir, gateway_args(&pki, &[&worker.socket], extra));
        assert_eq!(gateway.cores, CORES, "the ready line must echo --cores");
        Stack {
            gateway,
            worker,
            pki,
            dir,
        }
    }

    pub fn client(&self) -> Client {
        self.gateway.client(&self.pki)
    }

    pub fn client_with(&self, opts: &ClientOptions) -> io::Result<Client> {
        Client::connect(self.gateway.listen, opts)
    }
}

// ---------------------------------------------------------------------------------------
// Admin HTTP and metrics

/// A minimal HTTP/1.1 GET with `Connection: close`, bounded by [`IO_TIMEOUT`].
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => 0,
            Err(e) => return Err(e),
        };
        raw.extend_from_slice(&chunk[..n]);
        if n == 0 || response_complete(&raw) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP response not complete",
            ));
        }
    }
    parse_http_response(&raw)
}

fn split_head(raw: &[u8]) -> Option<(&str, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((std::str::from_utf8(&raw[..end]).ok()?, &raw[end + 4..]))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// True once a `Content-Length` body has fully arrived; other responses end at EOF.
fn response_complete(raw: &[u8]) -> bool {
    let Some((head, body)) = split_head(raw) else {
        return false;
    };
    header(head, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| body.len() >= len)
}

fn parse_http_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |m: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{m}: {:?}", String::from_utf8_lossy(raw)),
        )
    };
    let (head, body) = split_head(raw).ok_or_else(|| bad("no end of HTTP headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no HTTP status"))?;
    let body = if header(head, "transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(len) = header(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.get(..len)
            .ok_or_else(|| bad("body shorter than Content-Length"))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((
        status,
        String::from_utf8(body).map_err(|_| bad("body is not UTF-8"))?,
    ))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed /metrics scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparseable metrics line {l:?}")))
            .collect();
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// The series of `name` that carry every label in `labels` (others may carry more).
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// The sum over those series (over the `core` label, typically); 0 if there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name, labels).map(|s| s.value).sum()
    }

    /// Per value of `label`: the sum of the matching series.
    pub fn by_label(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        label: &str,
    ) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.series(name, labels) {
            let key = s.labels.get(label).cloned().unwrap_or_default();
            *out.entry(key).or_insert(0.0) += s.value;
        }
        out
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].trim().to_owned();
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            rest = &rest[end + 1..];
            labels.insert(key, value);
        }
    }
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------------------
// TLS client

/// How a client checks the gateway's certificate.
#[derive(Clone)]
pub enum Verify {
    /// Against the test CA, for the requested server name.
    Ca(CertificateDer<'static>),
    /// Not at all (signatures are still checked): to see which certificate the gateway
    /// picked when the name cannot match.
    AnyCertificate,
}

/// Client-side choices for one connection.
#[derive(Clone)]
pub struct ClientOptions {
    pub server_name: String,
    pub alpn: Vec<Vec<u8>>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
    pub verify: Verify,
}

impl ClientOptions {
    /// SNI `localhost`, ALPN `holdfast/1`, TLS 1.2 and 1.3 offered, the test CA trusted.
    pub fn new(pki: &Pki) -> ClientOptions {
        ClientOptions {
            server_name: "localhost".into(),
            alpn: vec![frame::ALPN.to_vec()],
            versions: vec![&rustls::version::TLS13, &rustls::version::TLS12],
            verify: Verify::Ca(pki.ca_der.clone()),
        }
    }

    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = name.into();
        self
    }

    pub fn alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    pub fn tls12_only(mut self) -> Self {
        self.versions = vec![&rustls::version::TLS12];
        self
    }

    pub fn any_certificate(mut self) -> Self {
        self.verify = Verify::AnyCertificate;
        self
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&self.versions)
            .expect("the ring provider supports these TLS versions");
        let mut config = match &self.verify {
            Verify::Ca(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone()).expect("test CA is a valid root");
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Verify::AnyCertificate => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        // Every connection does a full handshake, as a new device would.
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// TLS close_notify, then end of stream.
    CloseNotify,
    /// TCP FIN without close_notify.
    Eof,
    /// TCP RST.
    Reset,
    /// A TLS alert or another error.
    Error(String),
}

/// What one bounded read brought.
#[derive(Debug)]
pub enum Recv {
    Frame(OwnedFrame),
    Closed(Closed),
    TimedOut,
}

/// A blocking rustls client speaking the native frame protocol. Every read has a deadline.
pub struct Client {
    pub stream: StreamOwned<ClientConnection, TcpStream>,
    frames: FrameBuf,
}

impl Client {
    /// Connects and completes the TLS handshake, within [`IO_TIMEOUT`].
    pub fn connect(addr: SocketAddr, opts: &ClientOptions) -> io::Result<Client> {
        Client::connect_with(addr, opts.config(), &opts.server_name)
    }

    /// As [`Client::connect`], with a config built once for many connections.
    pub fn connect_with(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> io::Result<Client> {
        let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        Client::handshake(tcp, config, server_name)
    }

    /// As [`Client::connect`], over a TCP connection the caller made (from a chosen
    /// source address, say).
    pub fn connect_over(tcp: TcpStream, opts: &ClientOptions) -> io::Result<Client> {
        Client::handshake(tcp, opts.config(), &opts.server_name)
    }

    fn handshake(
        mut tcp: TcpStream,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> io::Result<Client> {
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let deadline = Instant::now() + IO_TIMEOUT;
        while conn.is_handshaking() {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake did not finish",
                ));
            }
            conn.complete_io(&mut tcp)?;
        }
        Ok(Client {
            stream: StreamOwned::new(conn, tcp),
            frames: FrameBuf::new(),
        })
    }

    pub fn conn(&self) -> &ClientConnection {
        &self.stream.conn
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.stream.sock
    }

    /// Writes bytes as they are (one or more frames, or part of one) and flushes them.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the gateway");
        self.stream.flush().expect("flush to the gateway");
    }

    pub fn send(&mut self, kind: FrameType, payload: &[u8]) {
        self.send_raw(&encode(kind, payload));
    }

    /// The next frame, or how the connection ended, or `TimedOut` after `timeout`.
    pub fn try_recv(&mut self, timeout: Duration) -> Recv {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match self.frames.next(frame::MAX_LEN_FIELD) {
                Ok(Some(f)) => return Recv::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("the gateway sent bytes that are not a frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Recv::TimedOut;
            }
            self.stream
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("set read timeout");
            match self.stream.read(&mut chunk) {
                Ok(0) => return Recv::Closed(Closed::CloseNotify),
                Ok(n) => self.frames.push(&chunk[..n]),
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::Interrupted => {}
                    io::ErrorKind::UnexpectedEof => return Recv::Closed(Closed::Eof),
                    io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe => return Recv::Closed(Closed::Reset),
                    _ => return Recv::Closed(Closed::Error(e.to_string())),
                },
            }
        }
    }

    /// The next frame within [`IO_TIMEOUT`]; panics on a close or a timeout.
    pub fn recv(&mut self) -> OwnedFrame {
        self.recv_within(IO_TIMEOUT)
    }

    pub fn recv_within(&mut self, timeout: Duration) -> OwnedFrame {
        match self.try_recv(timeout) {
            Recv::Frame(f) => f,
            other => panic!("expected a frame from the gateway within {timeout:?}, got {other:?}"),
        }
    }

    /// Sends DATA and expects the same DATA back.
    pub fn echo(&mut self, payload: &[u8]) {
        self.send(FrameType::Data, payload);
        let got = self.recv();
        assert_eq!(
            got,
            OwnedFrame::Data(payload.to_vec()),
            "echo of {} bytes",
            payload.len()
        );
    }

    /// Expects the gateway to end the connection within `timeout`, with no frame before.
    pub fn expect_closed(&mut self, timeout: Duration) -> Closed {
        match self.try_recv(timeout) {
            Recv::Closed(c) => c,
            other => panic!(
                "expected the gateway to close the connection within {timeout:?}, got {other:?}"
            ),
        }
    }

    /// Expects CLOSE with `code`, then the end of the connection.
    pub fn expect_close_frame(&mut self, code: u16, timeout: Duration) {
        match self.try_recv(timeout) {
            Recv::Frame(OwnedFrame::Close { code: got, reason }) => {
                assert_eq!(got, code, "CLOSE code (reason {reason:?})")
            }
            other => panic!("expected CLOSE {code} within {timeout:?}, got {other:?}"),
        }
        self.expect_closed(IO_TIMEOUT);
    }

    /// Leaves as a well-behaved client: close_notify and FIN, then reads until the
    /// gateway has closed its side too (so nothing unread makes our close a reset).
    pub fn close(mut self) {
        self.stream.conn.send_close_notify();
        let _ = self.stream.flush();
        let _ = self.stream.sock.shutdown(Shutdown::Write);
        while let Recv::Frame(_) = self.try_recv(IO_TIMEOUT) {}
    }
}

/// One encoded frame.
pub fn encode(kind: FrameType, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame::HEADER_LEN + payload.len());
    frame::encode(kind, payload, &mut out);
    out
}

/// A payload that differs per (connection, message) so a misrouted echo is caught.
pub fn payload(tag: &str, i: usize, len: usize) -> Vec<u8> {
    let prefix = format!("{tag}-{i}:");
    let mut p = prefix.into_bytes();
    p.extend((0..len.saturating_sub(p.len())).map(|j| b'a' + ((i + j) % 26) as u8));
    p.truncate(len.max(1));
    p
}

/// Raw TCP to `addr` with read and write timeouts set.
pub fn raw_tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("TCP connect to the gateway");
    s.set_read_timeout(Some(IO_TIMEOUT))
        .expect("set read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("set write timeout");
    s
}

/// Reads and discards until the peer ends the connection (EOF or reset) or `timeout`
/// passes; returns how it ended, `None` on timeout.
pub fn drain_until_closed(s: &mut TcpStream, timeout: Duration) -> Option<Closed> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).expect("set read timeout");
        match s.read(&mut buf) {
            Ok(0) => return Some(Closed::Eof),
            Ok(_) => {}
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {}
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                    return Some(Closed::Reset)
                }
                _ => return Some(Closed::Error(e.to_string())),
            },
        }
    }
}

/// Runs a command to completion within `timeout`, killing it otherwise; returns its
/// status and output (`None` status on timeout).
pub fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let mut child = ChildGuard::new(child);
    let status = child.wait_timeout(timeout);
    drop(child);
    (
        status,
        out.join().expect("stdout reader"),
        err.join().expect("stderr reader"),
    )
}

/// The first of `candidates` that exists as a file, or that `sh -c 'command -v'` finds.
pub fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    for c in candidates {
        let p = Path::new(c);
        if p.is_absolute() {
            if p.is_file() {
                return Some(p.to_owned());
            }
            continue;
        }
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .output()
            .ok()?;
        if out.status.success() {
            let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !found.is_empty() {
                return Some(PathBuf::from(found));
            }
        }
    }
    None
}
