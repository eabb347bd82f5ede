//! Worker links that lose nothing: several workers, a worker killed mid-stream or frozen,
//! a worker that sends garbage or names connections that are gone or live on another
//! core, a full unacknowledged window, and a client that reads nothing.
//!
//! Real processes and sockets only: the gateway binary, the reference worker binary
//! (with its test flags `--prefix-worker-name` and `--ack-delay-ms`), and a scripted
//! fake worker (`fake_worker`) where the test must choose what a worker says. What the
//! gateway did is read from what clients and workers receive and from /metrics. Every
//! wait has a deadline.

mod common;
mod fake_worker;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    drain_until_closed, gateway_args, Client, ClientOptions, Gateway, Metrics, Pki, Recv, TestDir,
    CORES, IO_TIMEOUT,
};
use fake_worker::{
    connect_small_rcvbuf, counts, garbage_envelope, rss_bytes, Duplex, EchoProc, FakeWorker, Got,
    Mode, Watch,
};
use holdfast_wire::envelope::Message;
use holdfast_wire::frame::{close_code, FrameType, OwnedFrame};
use holdfast_wire::ConnId;

const LINK_UP: &str = "holdfast_worker_link_up";
const UNACKED: &str = "holdfast_worker_link_unacked_bytes";
const FRAMES: &str = "holdfast_worker_frames_total";
const RESENT: &str = "holdfast_worker_resent_total";
const LINK_DOWN: &str = "holdfast_worker_link_down_total";
const BACKPRESSURE: &str = "holdfast_backpressure";
const PAUSES: &str = "holdfast_backpressure_pauses_total";
const PROTOCOL_ERRORS: &str = "holdfast_worker_protocol_errors_total";
const UNKNOWN_CONN: &str = "holdfast_worker_unknown_conn_total";
const CROSS_CORE: &str = "holdfast_cross_core_total";

/// Reconnects back off up to `worker_retry_max_ms` (5 s by default): a relink may take
/// that long plus a scrape.
const RELINK_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits until every core's link to `worker` (its socket path) is up (`up`) or down.
fn wait_link(gateway: &Gateway, worker: &str, up: bool, timeout: Duration) -> Metrics {
    let labels = [("worker", worker)];
    let want = if up { 1.0 } else { 0.0 };
    gateway.wait_for_metrics_within(
        timeout,
        &format!("{LINK_UP}{{worker={worker:?}}} == {want} on all {CORES} cores"),
        &mut |m| {
            let v: Vec<f64> = m.series(LINK_UP, &labels).map(|s| s.value).collect();
            v.len() == CORES && v.iter().all(|&x| x == want)
        },
    )
}

fn start_gateway(
    dir: &TestDir,
    pki: &Pki,
    workers: &[&std::path::Path],
    extra: &[&str],
) -> Gateway {
    let gateway = Gateway::start(dir, gateway_args(pki, workers, extra));
    assert_eq!(gateway.cores, CORES, "the ready line must echo --cores");
    gateway
}

/// Sends DATA and returns the reply, or panics with the gateway's close and link
/// counters (closes are logged only at debug level, so the counters say why).
fn round_trip(gateway: &Gateway, c: &mut Client, payload: &[u8]) -> Vec<u8> {
    let diagnose = |what: String| -> ! {
        let m = gateway.metrics();
        panic!(
            "{what}; closes {:?}; handshakes {:?}; links up {:?}; links down {:?}",
            m.by_label("holdfast_closes_total", &[], "reason"),
            m.by_label("holdfast_handshakes_total", &[], "result"),
            m.by_label(LINK_UP, &[], "worker"),
            m.by_label(LINK_DOWN, &[], "worker"),
        )
    };
    if let Err(e) = c
        .stream
        .write_all(&common::encode(FrameType::Data, payload))
        .and_then(|()| c.stream.flush())
    {
        diagnose(format!(
            "sending DATA {:?}: {e}",
            String::from_utf8_lossy(payload)
        ));
    }
    match c.try_recv(IO_TIMEOUT) {
        Recv::Frame(OwnedFrame::Data(p)) => p,
        other => diagnose(format!(
            "expected the echo of {:?}, got {other:?}",
            String::from_utf8_lossy(payload)
        )),
    }
}

/// [`round_trip`] expecting the payload itself back.
fn echo_ok(gateway: &Gateway, c: &mut Client, payload: &[u8]) {
    let got = round_trip(gateway, c, payload);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(payload),
        "echo"
    );
}

/// Splits an echo of `--prefix-worker-name` into (worker name, original payload).
fn attribute(echo: &[u8]) -> (String, String) {
    let s = String::from_utf8_lossy(echo);
    let (who, what) = s
        .split_once(':')
        .unwrap_or_else(|| panic!("echo {s:?} carries no worker prefix"));
    (who.to_owned(), what.to_owned())
}

fn data_payloads(frames: &[OwnedFrame]) -> Vec<&[u8]> {
    frames
        .iter()
        .filter_map(|f| match f {
            OwnedFrame::Data(p) => Some(&p[..]),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1

/// Fifty clients send a hundred numbered frames each through two workers; one worker,
/// which holds its ACKs back for 400 ms so that many frames are in flight, is killed with
/// SIGKILL midway. Every frame must come back at least once: the frames the dead worker
/// had not acknowledged are re-sent to the survivor (duplicates are allowed, counted and
/// reported), while those it had acknowledged are not.
#[test]
fn kill_9_of_a_worker_loses_no_frame() {
    const CLIENTS: usize = 50;
    const PER_CLIENT: usize = 100;
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let mut victim = EchoProc::start(
        &dir,
        &dir.join("wa.sock"),
        "wa",
        &["--prefix-worker-name", "--ack-delay-ms", "400"],
    );
    let survivor = EchoProc::start(&dir, &dir.join("wb.sock"), "wb", &["--prefix-worker-name"]);
    let gateway = start_gateway(&dir, &pki, &[&victim.socket, &survivor.socket], &[]);
    wait_link(&gateway, &victim.label(), true, RELINK_TIMEOUT);
    wait_link(&gateway, &survivor.label(), true, RELINK_TIMEOUT);

    let opts = ClientOptions::new(&pki);
    let config = opts.config();
    let clients: Vec<Duplex> = (0..CLIENTS)
        .map(|_| {
            Duplex::from_client(
                Client::connect_with(gateway.listen, config.clone(), &opts.server_name)
                    .expect("TLS connect"),
            )
        })
        .collect();
    let watches: Vec<Watch> = clients.iter().map(Duplex::watch).collect();
    let writers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            thread::spawn(move || {
                for i in 0..PER_CLIENT {
                    if let Err(e) = client.send(FrameType::Data, format!("c{c}-{i}").as_bytes()) {
                        panic!("client {c} could not send frame {i}: {e}");
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                client
            })
        })
        .collect();

    // Midway: half the echoes are back, some of them from the victim.
    let total = || -> (usize, usize) {
        let mut all = 0;
        let mut from_victim = 0;
        for w in &watches {
            let inbox = w.lock();
            for p in data_payloads(&inbox.frames) {
                all += 1;
                if p.starts_with(b"wa:") {
                    from_victim += 1;
                }
            }
        }
        (all, from_victim)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (all, from_victim) = total();
        if all >= CLIENTS * PER_CLIENT / 2 && from_victim > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {all} echoes ({from_victim} from the victim) within 60 s"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let (at_kill, victim_at_kill) = total();
    victim.kill9();
    eprintln!("killed worker wa after {at_kill} echoes ({victim_at_kill} from wa)");

    let clients: Vec<Duplex> = writers
        .into_iter()
        .map(|w| w.join().expect("writer thread"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (c, w) in watches.iter().enumerate() {
        let want: BTreeSet<String> = (0..PER_CLIENT).map(|i| format!("c{c}-{i}")).collect();
        w.wait_until(
            deadline.saturating_duration_since(Instant::now()),
            |inbox| {
                inbox.closed.is_some()
                    || data_payloads(&inbox.frames)
                        .iter()
                        .map(|p| attribute(p).1)
                        .collect::<BTreeSet<_>>()
                        .is_superset(&want)
            },
        );
    }

    // The report: what is missing, what came twice, who served what.
    let mut missing = Vec::new();
    let mut closed = Vec::new();
    let mut duplicates = 0usize;
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    let mut foreign = Vec::new();
    for (c, w) in watches.iter().enumerate() {
        let inbox = w.lock();
        if let Some(how) = &inbox.closed {
            closed.push((c, how.clone()));
        }
        for f in &inbox.frames {
            if !matches!(f, OwnedFrame::Data(_)) {
                foreign.push((c, f.clone()));
            }
        }
        let echoes: Vec<(String, String)> = data_payloads(&inbox.frames)
            .into_iter()
            .map(attribute)
            .collect();
        for (who, _) in &echoes {
            *by_worker.entry(who.clone()).or_insert(0) += 1;
        }
        let seen = counts(echoes.iter().map(|(_, what)| what.clone()));
        for i in 0..PER_CLIENT {
            match seen.get(&format!("c{c}-{i}")) {
                None => missing.push(format!("c{c}-{i}")),
                Some(&n) => duplicates += n - 1,
            }
        }
        for what in seen.keys() {
            assert!(
                what.starts_with(&format!("c{c}-")),
                "client {c} received another client's frame {what:?}"
            );
        }
    }
    let m = gateway.metrics();
    eprintln!(
        "echoes by worker {by_worker:?}; duplicates {duplicates}; resent {}; frames per worker {:?}",
        m.sum(RESENT, &[]),
        m.by_label(FRAMES, &[], "worker"),
    );
    assert!(
        missing.is_empty(),
        "{} of {} frames never came back (first: {:?}); clients closed: {closed:?}",
        missing.len(),
        CLIENTS * PER_CLIENT,
        &missing[..missing.len().min(20)]
    );
    assert!(closed.is_empty(), "clients were closed: {closed:?}");
    assert!(
        foreign.is_empty(),
        "clients got non-DATA frames: {foreign:?}"
    );
    let resent = gateway.wait_for_sum_at_least(RESENT, &[], 1.0);
    // Every duplicate is a re-sent frame echoed twice.
    assert!(
        duplicates as f64 <= resent,
        "{duplicates} duplicate echoes but only {resent} envelopes re-sent"
    );
    // The victim ACKed everything older than 400 ms: not all it echoed may come again.
    let from_victim = by_worker.get("wa").copied().unwrap_or(0);
    assert!(
        duplicates < from_victim,
        "all {from_victim} frames the killed worker echoed were re-sent, \
         including those it had acknowledged ({duplicates} duplicates)"
    );
    wait_link(&gateway, &victim.label(), false, RELINK_TIMEOUT);
    drop(clients);
}

// ---------------------------------------------------------------------------------------
// 2

/// A worker killed and started again on the same socket is linked again by every core
/// and gets new connections again.
#[test]
fn a_restarted_worker_gets_traffic_again() {
    const NEW_CLIENTS: usize = 40;
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let wa_sock = dir.join("wa.sock");
    let mut wa = EchoProc::start(&dir, &wa_sock, "wa", &["--prefix-worker-name"]);
    let wb = EchoProc::start(&dir, &dir.join("wb.sock"), "wb", &["--prefix-worker-name"]);
    let gateway = start_gateway(&dir, &pki, &[&wa.socket, &wb.socket], &[]);
    let label = wa.label();
    wait_link(&gateway, &label, true, RELINK_TIMEOUT);
    wait_link(&gateway, &wb.label(), true, RELINK_TIMEOUT);

    let mut before_kill = gateway.client(&pki);
    before_kill.send(FrameType::Data, b"before");
    let got = before_kill.recv();
    assert!(
        matches!(&got, OwnedFrame::Data(p) if attribute(p).1 == "before"),
        "echo before the kill: {got:?}"
    );

    let downs_before = gateway.metrics().sum(LINK_DOWN, &[("worker", &label)]);
    wa.kill9();
    wait_link(&gateway, &label, false, RELINK_TIMEOUT);
    let m = gateway.wait_for_sum_at_least(LINK_DOWN, &[("worker", &label)], downs_before + 1.0);
    eprintln!("link_down_total for wa after the kill: {m}");
    // An existing client keeps working through the survivor.
    before_kill.send(FrameType::Data, b"while-down");
    match before_kill.recv() {
        OwnedFrame::Data(p) => assert_eq!(attribute(&p), ("wb".into(), "while-down".into())),
        other => panic!("echo while wa is down: {other:?}"),
    }

    drop(wa);
    let wa = EchoProc::start(&dir, &wa_sock, "wa", &["--prefix-worker-name"]);
    wait_link(&gateway, &label, true, RELINK_TIMEOUT);
    let frames_before = gateway.metrics().sum(FRAMES, &[("worker", &label)]);

    let opts = ClientOptions::new(&pki);
    let config = opts.config();
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..NEW_CLIENTS {
        let mut c = Client::connect_with(gateway.listen, config.clone(), &opts.server_name)
            .unwrap_or_else(|e| panic!("new client {i}: TLS connect: {e}"));
        let msg = format!("new-{i}");
        let (who, what) = attribute(&round_trip(&gateway, &mut c, msg.as_bytes()));
        assert_eq!(what, msg);
        *served.entry(who).or_insert(0) += 1;
        c.close();
    }
    eprintln!("new connections by worker after the restart: {served:?}");
    assert!(
        served.get("wa").copied().unwrap_or(0) > 0,
        "none of {NEW_CLIENTS} new connections went to the restarted worker: {served:?}"
    );
    let m = gateway.wait_for_metrics("frames_total of the restarted worker growing", |m| {
        m.sum(FRAMES, &[("worker", &label)]) > frames_before
    });
    eprintln!("frames per worker: {:?}", m.by_label(FRAMES, &[], "worker"));
    drop(wa);
}

// ---------------------------------------------------------------------------------------
// 3

/// With a small unacknowledged window and the only worker frozen (SIGSTOP), clients that
/// keep sending make their core stop reading them (back-pressure) instead of growing
/// memory; once the worker runs again every frame is echoed and back-pressure ends.
///
/// The contract bounds relaying memory by the windows plus the receive-buffer ring (a
/// pause withholds receive buffers; what the kernel had already placed in the ring is
/// still relayed). The ring is made small here (256 x 4 KiB per core) so that bound is
/// tight enough to check: each link's unacknowledged bytes must stay under window + ring
/// (+ slack for TLS records staged per connection), and the gateway's RSS under
/// baseline + 64 MiB.
#[test]
fn a_worker_that_stops_reading_pauses_clients_and_resumes() {
    const WINDOW: u64 = 256 * 1024;
    const RING_BUFFERS: u64 = 256;
    const RING_BUFFER_SIZE: u64 = 4096;
    const CLIENTS: usize = 8;
    const MAX_FRAMES: usize = 512;
    const FRAME: usize = 4096;
    const RSS_HEADROOM: u64 = 64 << 20;
    // A TLS record (16 KiB + overhead) staged per connection, and one frame in decoding.
    const SLACK: u64 = CLIENTS as u64 * (17 << 10) + (64 << 10);
    let unacked_bound = WINDOW + RING_BUFFERS * RING_BUFFER_SIZE + SLACK;
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = EchoProc::start(&dir, &dir.join("w.sock"), "w", &[]);
    let config = dir.write(
        "window.toml",
        format!(
            "[runtime]\nrecv_buffers = {RING_BUFFERS}\nrecv_buffer_size = {RING_BUFFER_SIZE}\n"
        ),
    );
    let config = config.to_str().expect("UTF-8").to_owned();
    let gateway = start_gateway(
        &dir,
        &pki,
        &[&worker.socket],
        &[
            "--config",
            &config,
            "--link-window",
            &WINDOW.to_string(),
            "--heartbeat-timeout-ms",
            "120000",
        ],
    );
    let label = worker.label();
    wait_link(&gateway, &label, true, RELINK_TIMEOUT);

    let mut clients: Vec<Duplex> = (0..CLIENTS)
        .map(|_| Duplex::from_client(gateway.client(&pki)))
        .collect();
    for (c, client) in clients.iter_mut().enumerate() {
        client
            .send(FrameType::Data, format!("warm-{c}").as_bytes())
            .expect("send");
        assert!(
            client
                .watch()
                .wait_until(IO_TIMEOUT, |i| i.frames.len() == 1),
            "client {c}: no warm-up echo"
        );
    }
    let baseline = rss_bytes(gateway.pid());

    worker.signal(libc::SIGSTOP);
    let stop = Arc::new(AtomicBool::new(false));
    let watches: Vec<Watch> = clients.iter().map(Duplex::watch).collect();
    let writers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut sent = 0;
                while sent < MAX_FRAMES && !stop.load(Ordering::Relaxed) {
                    client
                        .send(FrameType::Data, &numbered(c, sent, FRAME))
                        .unwrap_or_else(|e| panic!("client {c}, frame {sent}: {e}"));
                    sent += 1;
                }
                (client, sent)
            })
        })
        .collect();

    let m = gateway.wait_for_metrics_within(
        Duration::from_secs(30),
        &format!("{BACKPRESSURE} == 1 on a core"),
        &mut |m| m.series(BACKPRESSURE, &[]).any(|s| s.value == 1.0),
    );
    eprintln!(
        "paused: back-pressure {:?}, unacked bytes {:?}",
        m.by_label(BACKPRESSURE, &[], "core"),
        m.by_label(UNACKED, &[], "core")
    );
    // Hold the pause a while, watching memory and the windows.
    let mut peak = 0;
    let mut peak_unacked: BTreeMap<String, f64> = BTreeMap::new();
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(2) {
        peak = peak.max(rss_bytes(gateway.pid()));
        for (core, v) in gateway.metrics().by_label(UNACKED, &[], "core") {
            let e = peak_unacked.entry(core).or_insert(0.0);
            *e = e.max(v);
        }
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let m = gateway.metrics();
    eprintln!(
        "RSS baseline {} KiB, peak while paused {} KiB; peak unacked bytes per core \
         {peak_unacked:?} (window {WINDOW}, bound {unacked_bound}); back-pressure {:?}",
        baseline >> 10,
        peak >> 10,
        m.by_label(BACKPRESSURE, &[], "core")
    );
    assert!(
        m.series(BACKPRESSURE, &[]).any(|s| s.value == 1.0),
        "back-pressure ended while the worker was still stopped:\n{}",
        m.text
    );
    for (core, &v) in &peak_unacked {
        assert!(
            v <= unacked_bound as f64,
            "core {core}'s link held {v} unacknowledged bytes, over window {WINDOW} + ring \
             {} + slack {SLACK}",
            RING_BUFFERS * RING_BUFFER_SIZE
        );
    }
    assert!(
        peak <= baseline + RSS_HEADROOM,
        "gateway RSS grew from {} KiB to {} KiB (more than {} MiB) while its worker was stopped",
        baseline >> 10,
        peak >> 10,
        RSS_HEADROOM >> 20
    );

    worker.signal(libc::SIGCONT);
    let sent: Vec<(Duplex, usize)> = writers
        .into_iter()
        .map(|w| w.join().expect("writer thread"))
        .collect();
    let total: usize = sent.iter().map(|(_, n)| n).sum();
    eprintln!("clients sent {total} frames of {FRAME} bytes in all");
    for (c, ((_, n), w)) in sent.iter().zip(&watches).enumerate() {
        let ok = w.wait_until(Duration::from_secs(60), |i| {
            i.closed.is_some() || i.frames.len() > *n
        });
        let inbox = w.lock();
        assert!(
            ok && inbox.closed.is_none(),
            "client {c}: {} of {n} frames echoed, closed {:?}",
            inbox.frames.len().saturating_sub(1),
            inbox.closed
        );
        for (i, f) in inbox.frames[1..].iter().enumerate() {
            assert!(
                *f == OwnedFrame::Data(numbered(c, i, FRAME)),
                "client {c}: echo {i} is not frame {i} (no link died, so no duplicates or \
                 reordering are expected)"
            );
        }
        assert_eq!(inbox.frames.len(), 1 + n, "client {c}: extra echoes");
    }
    let m = gateway.wait_for_metrics_within(
        Duration::from_secs(10),
        &format!("{BACKPRESSURE} == 0 on every core"),
        &mut |m| m.series(BACKPRESSURE, &[]).count() == CORES && m.sum(BACKPRESSURE, &[]) == 0.0,
    );
    assert!(
        m.sum(PAUSES, &[]) >= 1.0,
        "{PAUSES} did not count the pause:\n{}",
        m.text
    );
    drop(sent);
}

/// A payload of `len` bytes that names its client and number.
fn numbered(client: usize, i: usize, len: usize) -> Vec<u8> {
    common::payload(&format!("c{client}"), i, len)
}

// ---------------------------------------------------------------------------------------
// 4

/// A worker that answers HELLO and then writes garbage gets its link dropped (counted as
/// a protocol error, with a logged reason); the gateway dials it again, and clients keep
/// being served.
#[test]
fn a_worker_sending_garbage_is_dropped_and_relinked() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let fake = FakeWorker::start(&dir.join("fake.sock"), |n| {
        if n == 0 {
            Mode::GarbageAfterHello(garbage_envelope())
        } else {
            Mode::Echo
        }
    });
    let echo = EchoProc::start(&dir, &dir.join("echo.sock"), "echo", &[]);
    let gateway = start_gateway(&dir, &pki, &[&fake.socket, &echo.socket], &[]);
    let fake_label = fake.socket.to_str().expect("UTF-8").to_owned();

    let m = gateway.wait_for_sum_at_least(PROTOCOL_ERRORS, &[], 1.0);
    eprintln!("protocol errors: {m}");
    let why = fake.wait_for("the garbage link dropped", Duration::from_secs(10), |s| {
        s.links.first().and_then(|l| l.ended.clone())
    });
    eprintln!("the garbage link ended: {why}");
    fake.wait_for(
        "the gateway dial again after dropping the garbage link",
        RELINK_TIMEOUT,
        |s| (s.links.len() > CORES).then_some(()),
    );
    wait_link(&gateway, &fake_label, true, RELINK_TIMEOUT);
    wait_link(&gateway, &echo.label(), true, RELINK_TIMEOUT);
    let m = gateway.metrics();
    assert!(
        m.sum(LINK_DOWN, &[("worker", &fake_label)]) >= 1.0,
        "{LINK_DOWN} did not count the dropped link:\n{}",
        m.text
    );
    assert_eq!(
        m.sum(LINK_DOWN, &[("worker", &echo.label())]),
        0.0,
        "the well-behaved worker's links went down too:\n{}",
        m.text
    );
    let log = gateway.stderr_tail();
    assert!(
        log.contains("238") || log.to_lowercase().contains("unknown envelope kind"),
        "the gateway's log does not say why it dropped the link (unknown kind 238):\n{log}"
    );

    for i in 0..10 {
        let mut c = gateway.client(&pki);
        echo_ok(&gateway, &mut c, format!("after garbage {i}").as_bytes());
        c.close();
    }
}

// ---------------------------------------------------------------------------------------
// 5

/// SEND for a connection that never existed, and for one that has closed, is answered
/// with CLOSE(conn, 1001, "unknown connection") on the link, which stays up.
#[test]
fn a_send_to_an_unknown_or_stale_connection_is_answered_with_close() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let fake = FakeWorker::start(&dir.join("fake.sock"), |_| Mode::Passive);
    let gateway = start_gateway(&dir, &pki, &[&fake.socket], &[]);
    let label = fake.socket.to_str().expect("UTF-8").to_owned();
    let links = fake.wait_links(CORES, RELINK_TIMEOUT);
    wait_link(&gateway, &label, true, RELINK_TIMEOUT);
    let before = gateway.metrics().sum(UNKNOWN_CONN, &[]);

    // Never existed.
    let ghost = ConnId::new(0, 12345, 7);
    fake.send(
        links[0],
        &Message::Send {
            conn: ghost,
            flags: 0,
            payload: b"anyone there?",
        },
    );
    expect_unknown_connection(&fake, ghost);
    gateway.wait_for_sum_at_least(UNKNOWN_CONN, &[], before + 1.0);

    // Existed, and closed.
    let mut client = gateway.client(&pki);
    client.send(FrameType::Data, b"hello, then gone");
    let (conn, link) = fake.wait_for("the client's FRAME", IO_TIMEOUT, |s| {
        s.msgs.iter().find_map(|(link, g)| match g {
            Got::Frame { conn, payload, .. } if payload == b"hello, then gone" => {
                Some((*conn, *link))
            }
            _ => None,
        })
    });
    assert_eq!(
        fake.seen().links[link].core,
        Some(conn.core()),
        "a connection's frames must come on its own core's link"
    );
    fake.wait_for("the OPEN before the FRAME", IO_TIMEOUT, |s| {
        s.msgs
            .iter()
            .any(|(_, g)| matches!(g, Got::Open { conn: c, .. } if *c == conn))
            .then_some(())
    });
    client.close();
    fake.wait_for("the gateway's CLOSE of the client", IO_TIMEOUT, |s| {
        s.msgs
            .iter()
            .any(|(_, g)| matches!(g, Got::Close { conn: c, link_seq, .. } if *c == conn && *link_seq > 0))
            .then_some(())
    });
    fake.send(
        link,
        &Message::Send {
            conn,
            flags: 0,
            payload: b"too late",
        },
    );
    expect_unknown_connection(&fake, conn);
    gateway.wait_for_sum_at_least(UNKNOWN_CONN, &[], before + 2.0);

    // The link stayed up and serves.
    let m = gateway.metrics();
    assert_eq!(m.sum(LINK_DOWN, &[]), 0.0, "a link went down:\n{}", m.text);
    assert_eq!(fake.accepted(), CORES, "the gateway dialled again");
}

/// Waits for the gateway's CLOSE(conn, seq 0, link_seq 0, 1001, "unknown connection").
fn expect_unknown_connection(fake: &FakeWorker, conn: ConnId) {
    let got = fake.wait_for(
        &format!("CLOSE with link_seq 0 for {conn:?}"),
        IO_TIMEOUT,
        |s| {
            s.msgs.iter().find_map(|(_, g)| match g {
                Got::Close {
                    conn: c,
                    link_seq: 0,
                    ..
                } if *c == conn => Some(g.clone()),
                _ => None,
            })
        },
    );
    assert_eq!(
        got,
        Got::Close {
            conn,
            seq: 0,
            link_seq: 0,
            code: close_code::GOING_AWAY,
            reason: "unknown connection".into()
        }
    );
}

// ---------------------------------------------------------------------------------------
// 6

/// A worker may answer on any link: SEND for a connection of core X, written on the link
/// of another core, reaches the client.
#[test]
fn a_send_for_a_connection_of_another_core_is_delivered() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let fake = FakeWorker::start(&dir.join("fake.sock"), |_| Mode::Passive);
    let gateway = start_gateway(&dir, &pki, &[&fake.socket], &[]);
    let label = fake.socket.to_str().expect("UTF-8").to_owned();
    let links = fake.wait_links(CORES, RELINK_TIMEOUT);
    wait_link(&gateway, &label, true, RELINK_TIMEOUT);

    // One client per core, if the kernel spreads them (it hashes the source port).
    let mut by_core: BTreeMap<u8, (Client, ConnId)> = BTreeMap::new();
    for k in 0..24 {
        if by_core.len() == CORES {
            break;
        }
        let mut client = gateway.client(&pki);
        let probe = format!("probe-{k}");
        client.send(FrameType::Data, probe.as_bytes());
        let (conn, link) = fake.wait_for(&format!("FRAME {probe}"), IO_TIMEOUT, |s| {
            s.msgs.iter().find_map(|(link, g)| match g {
                Got::Frame { conn, payload, .. } if payload == probe.as_bytes() => {
                    Some((*conn, *link))
                }
                _ => None,
            })
        });
        assert_eq!(
            fake.seen().links[link].core,
            Some(conn.core()),
            "a connection's frames must come on its own core's link"
        );
        by_core.entry(conn.core()).or_insert((client, conn));
    }
    eprintln!("clients on cores {:?}", by_core.keys().collect::<Vec<_>>());

    let before = gateway.metrics().sum(CROSS_CORE, &[]);
    let n = by_core.len();
    for (core, (mut client, conn)) in by_core {
        let other = ((core as usize + 1) % CORES) as u8;
        let link = links[other as usize];
        let reply = format!("from core {other}'s link to a client of core {core}");
        fake.send(
            link,
            &Message::Send {
                conn,
                flags: 0,
                payload: reply.as_bytes(),
            },
        );
        match client.try_recv(IO_TIMEOUT) {
            Recv::Frame(OwnedFrame::Data(p)) => assert_eq!(p, reply.as_bytes()),
            other => panic!("client of core {core}: expected the cross-core SEND, got {other:?}"),
        }
        // Nothing came back as unknown.
        assert!(
            !fake
                .seen()
                .msgs
                .iter()
                .any(|(_, g)| matches!(g, Got::Close { conn: c, link_seq: 0, .. } if *c == conn)),
            "the gateway answered the cross-core SEND with CLOSE"
        );
        client.close();
    }
    gateway.wait_for_sum_at_least(CROSS_CORE, &[], before + n as f64);
}

// ---------------------------------------------------------------------------------------
// 7

/// A worker that stops answering (SIGSTOP) is dropped by the heartbeat timeout on every
/// core, and linked again once it runs again.
#[test]
fn a_hung_worker_is_detected_by_heartbeat() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = EchoProc::start(&dir, &dir.join("w.sock"), "w", &[]);
    let config = dir.write(
        "heartbeat.toml",
        "[runtime]\nheartbeat_interval_ms = 300\nworker_retry_ms = 100\nworker_retry_max_ms = 1000\n",
    );
    let config = config.to_str().expect("UTF-8").to_owned();
    let gateway = start_gateway(
        &dir,
        &pki,
        &[&worker.socket],
        &["--config", &config, "--heartbeat-timeout-ms", "1500"],
    );
    let label = worker.label();
    wait_link(&gateway, &label, true, RELINK_TIMEOUT);
    echo_ok(&gateway, &mut gateway.client(&pki), b"before the freeze");
    let downs = gateway.metrics().sum(LINK_DOWN, &[("worker", &label)]);

    worker.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let m = gateway.wait_for_metrics_within(
        Duration::from_secs(6),
        "every core's link to the frozen worker dropped and counted",
        &mut |m| {
            let down = m.by_label(LINK_DOWN, &[("worker", &label)], "core");
            down.len() == CORES
                && down.values().all(|&d| d >= 1.0)
                && m.sum(LINK_DOWN, &[("worker", &label)]) >= downs + CORES as f64
        },
    );
    eprintln!(
        "links down {:?} after {:?}",
        m.by_label(LINK_DOWN, &[("worker", &label)], "core"),
        frozen.elapsed()
    );
    let log = gateway.stderr_tail();
    assert!(
        log.contains("heartbeat timeout"),
        "the gateway's log does not say \"heartbeat timeout\":\n{log}"
    );
    // While the worker stays frozen its links must not count as up: a redial reaches the
    // listen backlog of the frozen process, but no HELLO ever comes back over it. Watch
    // for longer than a heartbeat timeout, so a redial-and-timeout cycle is seen.
    let watch_from = Instant::now();
    let mut up_seen = Vec::new();
    while watch_from.elapsed() < Duration::from_millis(2500) {
        let m = gateway.metrics();
        let up = m.by_label(LINK_UP, &[("worker", &label)], "core");
        if up.values().any(|&v| v != 0.0) {
            up_seen.push((watch_from.elapsed(), up));
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        up_seen.is_empty(),
        "links to the frozen worker counted as up again without its HELLO \
         ({} of ~25 scrapes over 2.5 s; first at {:?}: {:?}); gateway log:\n{}",
        up_seen.len(),
        up_seen[0].0,
        up_seen[0].1,
        gateway.stderr_tail()
    );

    worker.signal(libc::SIGCONT);
    wait_link(&gateway, &label, true, RELINK_TIMEOUT);
    let mut c = gateway.client(&pki);
    echo_ok(&gateway, &mut c, b"after the thaw");
    c.close();
}

// ---------------------------------------------------------------------------------------
// 8

/// A client that sends (and so is sent echoes) but never reads is closed as a slow
/// consumer once more than `max_outbound_per_conn` waits for it; another client is not
/// disturbed.
#[test]
fn a_client_that_reads_nothing_is_closed_as_slow_consumer() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = EchoProc::start(&dir, &dir.join("w.sock"), "w", &[]);
    let config = dir.write("slow.toml", "[limits]\nmax_outbound_per_conn = 65536\n");
    let config = config.to_str().expect("UTF-8").to_owned();
    let gateway = start_gateway(&dir, &pki, &[&worker.socket], &["--config", &config]);
    wait_link(&gateway, &worker.label(), true, RELINK_TIMEOUT);
    let mut bystander = gateway.client(&pki);
    echo_ok(&gateway, &mut bystander, b"before");
    let before = gateway.close_count("slow_consumer");

    let mut victim = connect_small_rcvbuf(gateway.listen, &ClientOptions::new(&pki), 4096);
    victim
        .sock
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("write timeout");
    let frame = common::encode(FrameType::Data, &[b's'; 16 * 1024]);
    let started = Instant::now();
    let mut sent = 0usize;
    let mut frames = 0u32;
    let mut next_check = 64u32;
    let mut stopped = None;
    'writing: while sent < 64 << 20 && started.elapsed() < Duration::from_secs(30) {
        victim
            .conn
            .writer()
            .write_all(&frame)
            .expect("rustls takes one frame");
        while victim.conn.wants_write() {
            match victim.conn.write_tls(&mut victim.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if gateway.close_count("slow_consumer") > before
                        || started.elapsed() > Duration::from_secs(30)
                    {
                        break 'writing;
                    }
                }
                Err(e) => {
                    stopped = Some(e.to_string());
                    break 'writing;
                }
            }
        }
        sent += frame.len();
        frames += 1;
        if frames >= next_check {
            next_check += 64;
            if gateway.close_count("slow_consumer") > before {
                break;
            }
        }
    }
    eprintln!(
        "the victim wrote {} KiB in {:?} without reading (write ended by {stopped:?})",
        sent >> 10,
        started.elapsed()
    );
    gateway.wait_for_close_reason("slow_consumer", before);
    let how = drain_until_closed(&mut victim.sock, Duration::from_secs(10));
    assert!(
        how.is_some(),
        "the slow consumer's connection was counted closed but is still open"
    );

    echo_ok(&gateway, &mut bystander, b"after");
    let mut fresh = gateway.client(&pki);
    echo_ok(&gateway, &mut fresh, b"fresh");
    fresh.close();
    bystander.close();
}
