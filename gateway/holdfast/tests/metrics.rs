//! The admin endpoint counts exactly what happened: known traffic in (connections, DATA
//! frames, PINGs, one client that sends garbage, clean closes), the matching values out of
//! /metrics. Also: the decayed rate gauges are there for every core and window, the
//! `holdfast top` view renders a live scrape, and a silent admin client does not hold up
//! a scrape. Counters are aggregated off the data path, so every check polls with a
//! deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{drain_until_closed, http_get, payload, raw_tcp, Client, Metrics, Stack, IO_TIMEOUT};
use holdfast::top::{fetch_metrics, Exposition, View};
use holdfast_wire::frame::{FrameType, OwnedFrame};

const CONNS: usize = 6;
const FRAMES_PER_CONN: usize = 7;
const PINGS_PER_CONN: usize = 3;
const CLOSE_REASONS: [&str; 15] = [
    "peer_closed",
    "eof_mid_frame",
    "peer_reset",
    "tls_error",
    "handshake_timeout",
    "idle_timeout",
    "frame_too_large",
    "unknown_frame_type",
    "protocol_error",
    "no_worker",
    "worker_close",
    "drain",
    "slow_consumer",
    "table_full",
    "internal",
];

fn sum(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.sum(name, labels)
}

#[test]
fn counters_match_the_traffic_that_was_driven() {
    let stack = Stack::start(&[]);
    let gw = &stack.gateway;
    let m = gw.metrics();
    for name in [
        "holdfast_accepts_total",
        "holdfast_frames_total",
        "holdfast_pings_total",
        "holdfast_closes_total",
        "holdfast_connections_open",
    ] {
        assert_eq!(sum(&m, name, &[]), 0.0, "{name} before any traffic");
    }

    let mut clients: Vec<Client> = (0..CONNS).map(|_| stack.client()).collect();
    let mut payload_bytes = 0usize;
    for (c, client) in clients.iter_mut().enumerate() {
        for f in 0..FRAMES_PER_CONN {
            let p = payload(&format!("c{c}"), f, 16 + 50 * f);
            payload_bytes += p.len();
            client.echo(&p);
        }
        for k in 0..PINGS_PER_CONN {
            let p = format!("ping {c}/{k}");
            client.send(FrameType::Ping, p.as_bytes());
            assert_eq!(client.recv(), OwnedFrame::Pong(p.into_bytes()));
        }
    }
    // One client that is not TLS at all.
    let mut garbage = raw_tcp(gw.listen);
    garbage
        .write_all(&b"definitely not a ClientHello\r\n".repeat(8))
        .expect("send garbage");
    assert!(
        drain_until_closed(&mut garbage, IO_TIMEOUT).is_some(),
        "the gateway kept the garbage client"
    );

    let frames = (CONNS * FRAMES_PER_CONN) as f64;
    let pings = (CONNS * PINGS_PER_CONN) as f64;
    let n = CONNS as f64;
    let m = gw.wait_for_metrics("the driven traffic, counted", |m| {
        sum(m, "holdfast_accepts_total", &[]) == n + 1.0
            && sum(m, "holdfast_frames_total", &[("direction", "from_client")]) == frames
            && sum(m, "holdfast_frames_total", &[("direction", "to_client")]) == frames
            && sum(m, "holdfast_pings_total", &[]) == pings
            && sum(m, "holdfast_closes_total", &[("reason", "tls_error")]) == 1.0
            && sum(m, "holdfast_connections_open", &[]) == n
    });
    assert_eq!(sum(&m, "holdfast_handshakes_total", &[("result", "ok")]), n);
    assert_eq!(
        sum(&m, "holdfast_handshakes_total", &[("result", "failed")]),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "holdfast_payload_bytes_total",
            &[("direction", "from_client")]
        ),
        payload_bytes as f64
    );
    assert_eq!(
        sum(
            &m,
            "holdfast_payload_bytes_total",
            &[("direction", "to_client")]
        ),
        payload_bytes as f64
    );
    assert_eq!(
        sum(&m, "holdfast_handshake_duration_seconds_count", &[]),
        n,
        "one handshake duration per successful handshake"
    );
    assert_eq!(
        sum(&m, "holdfast_closes_total", &[]),
        1.0,
        "only the garbage client has closed: {:?}",
        m.by_label("holdfast_closes_total", &[], "reason")
    );
    assert_eq!(
        sum(&m, "holdfast_worker_link_up", &[]),
        common::CORES as f64,
        "every core's link to the one worker is up"
    );
    assert!(sum(&m, "holdfast_conn_table_capacity", &[]) >= n);
    assert_eq!(sum(&m, "holdfast_accept_errors_total", &[]), 0.0);

    // The decayed gauges pick the traffic up within a sampling period or two.
    let m = gw.wait_for_metrics("decayed rates of the traffic", |m| {
        sum(
            m,
            "holdfast_frames_per_second",
            &[("direction", "from_client"), ("window", "100s")],
        ) > 0.0
            && sum(m, "holdfast_accepts_per_second", &[("window", "100s")]) > 0.0
            && sum(
                m,
                "holdfast_closes_per_second",
                &[("reason", "tls_error"), ("window", "100s")],
            ) > 0.0
    });
    for s in m.series("holdfast_core_utilization_ratio", &[]) {
        assert!((0.0..=1.0).contains(&s.value), "{s:?}");
    }

    // Clean closes bring the open count back to zero, each counted as peer_closed.
    for client in clients {
        client.close();
    }
    let m = gw.wait_for_metrics("every client closed", |m| {
        sum(m, "holdfast_connections_open", &[]) == 0.0
            && sum(m, "holdfast_closes_total", &[("reason", "peer_closed")]) == n
    });
    let by_reason = m.by_label("holdfast_closes_total", &[], "reason");
    for reason in CLOSE_REASONS {
        let want = match reason {
            "peer_closed" => n,
            "tls_error" => 1.0,
            _ => 0.0,
        };
        assert_eq!(
            by_reason.get(reason).copied(),
            Some(want),
            "closes{{reason={reason}}}: {by_reason:?}"
        );
    }
    assert_eq!(
        sum(&m, "holdfast_accepts_total", &[]),
        n + 1.0,
        "no accept after the driven ones"
    );
}

#[test]
fn decayed_gauges_cover_every_core_and_window() {
    let stack = Stack::start(&[]);
    let m = stack.gateway.metrics();
    let cores = stack.gateway.cores;
    let windows = ["1s", "10s", "100s"];
    for family in [
        "holdfast_accepts_per_second",
        "holdfast_accept_errors_per_second",
        "holdfast_handshakes_per_second",
        "holdfast_frames_per_second",
        "holdfast_payload_bytes_per_second",
        "holdfast_pings_per_second",
        "holdfast_closes_per_second",
        "holdfast_recv_buffers_exhausted_per_second",
        "holdfast_loop_iterations_per_second",
        "holdfast_completions_per_second",
        "holdfast_submissions_per_second",
        "holdfast_worker_frames_per_second",
        "holdfast_worker_link_queued_bytes_avg",
        "holdfast_core_utilization_ratio",
    ] {
        assert!(
            m.text.contains(&format!("# TYPE {family} gauge\n")),
            "no # TYPE for {family}"
        );
        for core in 0..cores {
            let core = core.to_string();
            for w in windows {
                assert!(
                    m.series(family, &[("core", &core), ("window", w)])
                        .next()
                        .is_some(),
                    "no {family}{{core={core},window={w}}}"
                );
            }
        }
    }
    // An idle gateway still loops (100 ms waits), so its loop rate becomes positive.
    stack
        .gateway
        .wait_for_metrics("a positive loop rate on every core", |m| {
            (0..cores).all(|c| {
                m.sum(
                    "holdfast_loop_iterations_per_second",
                    &[("core", &c.to_string()), ("window", "1s")],
                ) > 0.0
            })
        });
}

#[test]
fn top_renders_two_live_scrapes() {
    let stack = Stack::start(&[]);
    let gw = &stack.gateway;
    let first = Exposition::parse(&gw.http_get("/metrics").1).expect("live scrape parses");
    let mut client = stack.client();
    for i in 0..5 {
        client.echo(&payload("top", i, 32));
    }
    gw.wait_for_sum_at_least("holdfast_frames_total", &[("direction", "to_client")], 5.0);
    // top's own HTTP client this time.
    let second = Exposition::parse(&fetch_metrics(gw.admin).expect("top fetches /metrics"))
        .expect("live scrape parses");
    let addr = gw.admin.to_string();
    let screen = View {
        addr: &addr,
        clock: "00:00:00 UTC",
        cur: &second,
        prev: Some((&first, 1.0)),
    }
    .render();
    let all: Vec<&str> = screen
        .lines()
        .find(|l| l.trim_start().starts_with("all "))
        .unwrap_or_else(|| panic!("no totals row in\n{screen}"))
        .split_whitespace()
        .collect();
    // all | conns | asleep | acc/s | hs/s | hsfl/s | in f/s | out f/s | ...
    assert_eq!(
        all[1..8],
        ["1", "0", "1.0", "1.0", "0.0", "5.0", "5.0"],
        "{screen}"
    );
    assert!(screen.contains("  holdfast_frames_total{direction=\"from_client\"}"));
    assert!(screen.contains("\nworst queue: "), "{screen}");
    let snapshot = View {
        addr: &addr,
        clock: "00:00:00 UTC",
        cur: &second,
        prev: None,
    }
    .render();
    assert!(snapshot.contains("changes: single snapshot"), "{snapshot}");
    client.close();
}

#[test]
fn a_silent_admin_client_does_not_hold_up_a_scrape() {
    let stack = Stack::start(&[]);
    let admin = stack.gateway.admin;
    // Clients that connect and say nothing, or half a request line.
    let mut silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(admin).expect("connect to admin"))
        .collect();
    let mut partial = TcpStream::connect(admin).expect("connect to admin");
    partial.write_all(b"GET /metr").expect("write");
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        let t = Instant::now();
        let (status, body) = http_get(admin, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
        assert!(body.contains("holdfast_connections_open"));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a scrape took {:?} behind silent clients",
            t.elapsed()
        );
    }
    assert_eq!(http_get(admin, "/healthz").expect("GET /healthz").0, 200);
    // The silent ones are dropped after the admin's read deadline (2 s).
    silent.push(partial);
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set read timeout");
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let r = s.read(&mut buf);
        assert!(
            matches!(r, Ok(0)) || r.is_err() && t.elapsed() < Duration::from_secs(4),
            "a silent admin client was kept: {r:?} after {:?}",
            t.elapsed()
        );
    }
}
