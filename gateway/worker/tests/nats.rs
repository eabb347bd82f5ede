//! End-to-end tests of `holdfast-worker nats` against a real `nats-server` (started here on
//! a free loopback port) and the real `holdfast` gateway binary (build it first with
//! `cargo build --workspace --bins`). Without nats-server (/usr/sbin or /usr/bin) each test
//! fails naming the package, or is counted as skipped under `HOLDFAST_ALLOW_SKIP=1`
//! (`peer`, shared with the gateway's tests). Every wait has a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

#[path = "../../holdfast/tests/common/peer.rs"]
mod peer;

/// Where Debian's `nats-server` package puts the server, and where others do.
const NATS_SERVERS: &[&str] = &["/usr/sbin/nats-server", "/usr/bin/nats-server"];

fn nats_server() -> Option<&'static str> {
    NATS_SERVERS.iter().copied().find(|p| Path::new(p).exists())
}
const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Processes and files

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

static DIR_SEQ: AtomicUsize = AtomicUsize::new(0);

fn test_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "holdfast-nats-{}-{}",
        std::process::id(),
        DIR_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn worker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_holdfast-worker"))
}

fn gateway_bin() -> PathBuf {
    worker_bin().with_file_name("holdfast")
}

/// `None` when the test cannot run here because nats-server is missing and skipping was
/// asked for (`peer::missing` fails the test otherwise).
fn prerequisites() -> Option<()> {
    assert!(
        gateway_bin().exists(),
        "{} is missing: build every binary first (cargo build --workspace --bins; \
         scripts/test.sh does)",
        gateway_bin().display()
    );
    if nats_server().is_none() {
        peer::missing(
            &format!("nats-server (looked in {NATS_SERVERS:?})"),
            "apt-get install nats-server",
        );
        return None;
    }
    Some(())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_nats(port: u16) -> Proc {
    let child = Command::new(nats_server().expect("checked"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server");
    let deadline = Instant::now() + TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server never listened");
        thread::sleep(Duration::from_millis(20));
    }
    Proc(child)
}

/// Starts a child and waits for a stdout line starting with `ready`; returns the line.
fn start_with_line(mut cmd: Command, ready: &str, stderr: &Path) -> (Proc, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc(child);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with(ready) => return (proc, line),
            Ok(_) => {}
            Err(e) => panic!(
                "no {ready:?} line ({e}); stderr:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            ),
        }
    }
}

fn start_bridge(dir: &Path, name: &str, nats: u16, gateway: &str) -> (Proc, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(worker_bin());
    cmd.args(["nats", "--nats", &format!("nats://127.0.0.1:{nats}")])
        .args(["--gateway", gateway, "--name", name, "--socket"])
        .arg(&socket);
    let (proc, _) = start_with_line(cmd, "holdfast-worker: listening", &dir.join(name));
    (proc, socket)
}

struct Pki {
    ca: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Pki {
        ca: ca.der().clone(),
        cert: cert_path,
        key: key_path,
    }
}

/// A gateway with two cores relaying to `workers`; returns it and its client address.
fn start_gateway(dir: &Path, pki: &Pki, name: &str, workers: &[&Path]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(gateway_bin());
    cmd.args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--cores", "2", "--cert"])
        .arg(&pki.cert)
        .arg("--key")
        .arg(&pki.key);
    for w in workers {
        cmd.arg("--worker").arg(w);
    }
    let (proc, line) = start_with_line(cmd, "holdfast ready ", &dir.join(name));
    let listen = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("listen="))
        .expect("listen= in the ready line")
        .parse()
        .unwrap();
    (proc, listen)
}

// ---------------------------------------------------------------------------------------
// A native-protocol TLS client

struct Client {
    stream: StreamOwned<ClientConnection, TcpStream>,
    frames: FrameBuf,
}

impl Client {
    fn connect(addr: SocketAddr, pki: &Pki) -> Client {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![frame::ALPN.to_vec()];
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(Arc::new(config), name).unwrap();
        Client {
            stream: StreamOwned::new(conn, tcp),
            frames: FrameBuf::new(),
        }
    }

    fn send(&mut self, payload: &[u8]) {
        let mut out = Vec::new();
        frame::encode(FrameType::Data, payload, &mut out);
        self.stream.write_all(&out).unwrap();
        self.stream.flush().unwrap();
    }

    /// The next frame within `timeout`, or `None`.
    fn recv(&mut self, timeout: Duration) -> Option<OwnedFrame> {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 16384];
        loop {
            if let Some(f) = self.frames.next(frame::MAX_LEN_FIELD).unwrap() {
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.sock.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.frames.push(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("client read: {e}"),
            }
        }
    }

    fn expect_data(&mut self, want: &[u8]) {
        match self.recv(TIMEOUT) {
            Some(OwnedFrame::Data(d)) => assert_eq!(d, want),
            other => panic!(
                "expected DATA {:?}, got {other:?}",
                String::from_utf8_lossy(want)
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The backend: a NATS client in its own runtime

#[derive(Debug, Clone)]
struct Got {
    subject: String,
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

struct Backend {
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Backend {
    fn connect(port: u16) -> Backend {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let client = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .reconnect_delay_callback(|_| Duration::from_millis(10))
                .connect(format!("nats://127.0.0.1:{port}"))
                .await
                .unwrap();
            let mut sub = client.subscribe("holdfast.in.>").await.unwrap();
            client.flush().await.unwrap();
            let got = got.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let headers = m
                        .headers
                        .iter()
                        .flat_map(|h| h.iter())
                        .map(|(k, v)| (k.to_string(), v[0].as_str().to_owned()))
                        .collect();
                    got.lock().unwrap().push(Got {
                        subject: m.subject.to_string(),
                        headers,
                        payload: m.payload.to_vec(),
                    });
                }
            });
            client
        });
        Backend { rt, client, got }
    }

    /// Waits until `ok` holds over everything received.
    fn wait_for(&self, what: &str, ok: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got = self.got.lock().unwrap().clone();
            if ok(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what}; got {} messages",
                got.len()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the frame with `payload` and returns its connection id header.
    fn conn_of(&self, payload: &[u8]) -> String {
        let got = self.wait_for("a frame", |g| g.iter().any(|m| m.payload == payload));
        let m = got.iter().find(|m| m.payload == payload).unwrap();
        m.headers["Holdfast-Conn"].clone()
    }

    fn publish(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        self.rt.block_on(async {
            self.client
                .publish_with_headers(subject.to_owned(), h, payload.to_vec().into())
                .await
                .unwrap();
            self.client.flush().await.unwrap();
        });
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn frames_reach_nats_and_commands_reach_clients() {
    let Some(()) = prerequisites() else { return };
    let dir = test_dir();
    let port = free_port();
    let _nats = start_nats(port);
    let backend = Backend::connect(port);
    let (_bridge, sock) = start_bridge(&dir, "bridge-a", port, "gw1");
    let pki = pki(&dir);
    let (_gw, addr) = start_gateway(&dir, &pki, "gw1", &[&sock]);

    let mut client = Client::connect(addr, &pki);
    client.send(b"hello nats");
    let conn = backend.conn_of(b"hello nats");
    assert_eq!(conn.len(), 16, "16 hex digits: {conn}");
    let got = backend.got.lock().unwrap().clone();
    let frame = got.iter().find(|m| m.payload == b"hello nats").unwrap();
    assert_eq!(frame.subject, "holdfast.in.gw1");
    assert_eq!(frame.headers["Holdfast-Gateway"], "gw1");
    assert_eq!(frame.headers["Holdfast-Seq"], "1");
    assert_eq!(frame.headers["Holdfast-Kind"], "frame");
    assert!(got.iter().any(
        |m| m.headers.get("Holdfast-Kind").map(String::as_str) == Some("open")
            && m.headers["Holdfast-Conn"] == conn
    ));

    // Backend → client.
    backend.publish(
        "holdfast.out.gw1",
        &[("Holdfast-Op", "send"), ("Holdfast-Conn", &conn)],
        b"from the backend",
    );
    client.expect_data(b"from the backend");

    // Close the client; a command for its id comes back as a notice.
    drop(client);
    backend.wait_for("the close event", |g| {
        g.iter().any(|m| {
            m.headers.get("Holdfast-Kind").map(String::as_str) == Some("close")
                && m.headers["Holdfast-Conn"] == conn
        })
    });
    backend.publish(
        "holdfast.out.gw1",
        &[("Holdfast-Op", "send"), ("Holdfast-Conn", &conn)],
        b"too late",
    );
    let got = backend.wait_for("the unknown-connection notice", |g| {
        g.iter()
            .any(|m| m.headers.get("Holdfast-Notice").map(String::as_str) == Some("true"))
    });
    let notice = got
        .iter()
        .find(|m| m.headers.contains_key("Holdfast-Notice"))
        .unwrap();
    assert_eq!(notice.headers["Holdfast-Conn"], conn);
    assert_eq!(notice.headers["Holdfast-Kind"], "close");
    assert_eq!(notice.headers["Holdfast-Reason"], "unknown connection");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn topic_reaches_every_subscriber_on_both_gateways_once() {
    let Some(()) = prerequisites() else { return };
    let dir = test_dir();
    let port = free_port();
    let _nats = start_nats(port);
    let backend = Backend::connect(port);
    let pki = pki(&dir);
    let mut keep = Vec::new();
    let mut clients = Vec::new();
    for gw in ["gwa", "gwb"] {
        let (b1, s1) = start_bridge(&dir, &format!("{gw}-1"), port, gw);
        let (b2, s2) = start_bridge(&dir, &format!("{gw}-2"), port, gw);
        let (g, addr) = start_gateway(&dir, &pki, gw, &[&s1, &s2]);
        keep.extend([b1, b2, g]);
        for i in 0..3 {
            let mut c = Client::connect(addr, &pki);
            let hello = format!("{gw}-client-{i}");
            c.send(hello.as_bytes());
            let conn = backend.conn_of(hello.as_bytes());
            backend.publish(
                &format!("holdfast.out.{gw}"),
                &[
                    ("Holdfast-Op", "subscribe"),
                    ("Holdfast-Conn", &conn),
                    ("Holdfast-Topic", "news"),
                ],
                b"",
            );
            // A send after the subscribe, on the same conn, confirms it was applied
            // (both go to the owning core; with two bridges, order across them is not
            // guaranteed, so wait for the reply and then a little more).
            backend.publish(
                &format!("holdfast.out.{gw}"),
                &[("Holdfast-Op", "send"), ("Holdfast-Conn", &conn)],
                b"subscribed?",
            );
            c.expect_data(b"subscribed?");
            clients.push(c);
        }
    }
    thread::sleep(Duration::from_millis(300));
    backend.publish("holdfast.topic.news", &[], b"breaking");
    for c in &mut clients {
        c.expect_data(b"breaking");
    }
    for c in &mut clients {
        assert_eq!(
            c.recv(Duration::from_millis(500)),
            None,
            "a second copy arrived"
        );
    }
    drop(keep);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `n` numbered frames from each client, paced, while `disturb` runs once midway;
/// then checks that the backend saw every (conn, seq) 1..=n.
fn no_frame_lost(
    clients: usize,
    n: usize,
    disturb: impl FnOnce(),
    backend: &Backend,
    addr: SocketAddr,
    pki: &Pki,
) {
    let mut cs: Vec<Client> = (0..clients).map(|_| Client::connect(addr, pki)).collect();
    let mut conns = Vec::new();
    for (i, c) in cs.iter_mut().enumerate() {
        let hello = format!("start-{i}");
        c.send(hello.as_bytes());
        conns.push(backend.conn_of(hello.as_bytes()));
    }
    let mut disturb = Some(disturb);
    for k in 1..n {
        for c in cs.iter_mut() {
            c.send(format!("m{k}").as_bytes());
        }
        if k == n / 3 {
            (disturb.take().unwrap())();
        }
        thread::sleep(Duration::from_millis(2));
    }
    let started = Instant::now();
    let missing = |g: &[Got]| {
        let seen: BTreeSet<(String, u64)> = g
            .iter()
            .filter(|m| m.headers.get("Holdfast-Kind").map(String::as_str) == Some("frame"))
            .map(|m| {
                (
                    m.headers["Holdfast-Conn"].clone(),
                    m.headers["Holdfast-Seq"].parse().unwrap(),
                )
            })
            .collect();
        conns
            .iter()
            .flat_map(|c| (1..=n as u64).map(move |s| (c.clone(), s)))
            .filter(|k| !seen.contains(k))
            .count()
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = backend.got.lock().unwrap().clone();
        let left = missing(&got);
        if left == 0 {
            eprintln!(
                "all {} frames seen ({} messages incl. duplicates), {:?} after the last send",
                clients * n,
                got.len(),
                started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} of {} frames never reached NATS",
            clients * n
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killing_a_bridge_loses_no_frame() {
    let Some(()) = prerequisites() else { return };
    let dir = test_dir();
    let port = free_port();
    let _nats = start_nats(port);
    let backend = Backend::connect(port);
    let pki = pki(&dir);
    let (b1, s1) = start_bridge(&dir, "k-1", port, "gwk");
    let (_b2, s2) = start_bridge(&dir, "k-2", port, "gwk");
    let (_gw, addr) = start_gateway(&dir, &pki, "gwk", &[&s1, &s2]);
    let mut victim = Some(b1);
    no_frame_lost(6, 600, || drop(victim.take()), &backend, addr, &pki);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restarting_nats_loses_no_frame() {
    let Some(()) = prerequisites() else { return };
    let dir = test_dir();
    let port = free_port();
    let nats = Arc::new(Mutex::new(Some(start_nats(port))));
    let backend = Backend::connect(port);
    let pki = pki(&dir);
    let (_b1, s1) = start_bridge(&dir, "r-1", port, "gwr");
    let (_gw, addr) = start_gateway(&dir, &pki, "gwr", &[&s1]);
    let restart = {
        let nats = nats.clone();
        move || {
            drop(nats.lock().unwrap().take());
            thread::sleep(Duration::from_millis(300));
            *nats.lock().unwrap() = Some(start_nats(port));
            // Let the backend's subscription come back before the bridge retries.
            thread::sleep(Duration::from_millis(100));
        }
    };
    no_frame_lost(4, 600, restart, &backend, addr, &pki);
    let _ = std::fs::remove_dir_all(&dir);
}
