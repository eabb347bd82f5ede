//! Several thousand idle TLS connections held at once: all stay open, the gauge counts
//! them, and each one still echoes. A modest count, so it runs on a two-core box in well
//! under a minute; the benchmark, not this test, proves the large counts.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{payload, Client, ClientOptions, Stack, CORES};
use holdfast_wire::frame::{FrameType, OwnedFrame};

const CONNECTIONS: usize = 3_000;
const THREADS: usize = 4;

#[test]
fn three_thousand_idle_tls_connections_are_held_and_all_echo() {
    // Every client comes from 127.0.0.1: lift the per-address cap (tests/admission.rs
    // tests it).
    let stack = Stack::start(&["--max-conns-per-ip", "0"]);
    let opts = ClientOptions::new(&stack.pki);
    let config = opts.config();
    let addr = stack.gateway.listen;
    let started = Instant::now();

    let openers: Vec<_> = (0..THREADS)
        .map(|t| {
            let config = config.clone();
            let name = opts.server_name.clone();
            thread::spawn(move || {
                (t..CONNECTIONS)
                    .step_by(THREADS)
                    .map(|i| {
                        let c = Client::connect_with(addr, config.clone(), &name)
                            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                        (i, c)
                    })
                    .collect::<Vec<(usize, Client)>>()
            })
        })
        .collect();
    let groups: Vec<Vec<(usize, Client)>> = openers
        .into_iter()
        .map(|h| h.join().expect("opener thread"))
        .collect();
    eprintln!("{CONNECTIONS} handshakes in {:?}", started.elapsed());

    let m = stack.gateway.wait_for_metrics_within(
        Duration::from_secs(10),
        &format!("{CONNECTIONS} connections open"),
        &mut |m| m.sum("holdfast_connections_open", &[]) >= CONNECTIONS as f64,
    );
    assert_eq!(
        m.sum("holdfast_connections_open", &[]),
        CONNECTIONS as f64,
        "gauge over-counts"
    );
    let per_core = m.by_label("holdfast_connections_open", &[], "core");
    eprintln!("open per core: {per_core:?}");
    assert_eq!(per_core.len(), CORES, "a gauge per core");
    assert!(
        per_core.values().all(|&v| v > 0.0),
        "every core holds connections: {per_core:?}"
    );

    // Idle for a moment, then every connection must still be served.
    thread::sleep(Duration::from_secs(1));
    let echoers: Vec<_> = groups
        .into_iter()
        .map(|mut group| {
            thread::spawn(move || {
                for (i, c) in group.iter_mut() {
                    c.send(FrameType::Data, &payload("idle", *i, 24));
                }
                for (i, c) in group.iter_mut() {
                    let got = c.recv();
                    assert_eq!(
                        got,
                        OwnedFrame::Data(payload("idle", *i, 24)),
                        "connection {i}"
                    );
                }
                group.len()
            })
        })
        .collect();
    let echoed: usize = echoers
        .into_iter()
        .map(|h| h.join().expect("echo thread"))
        .sum();
    assert_eq!(echoed, CONNECTIONS);
    eprintln!(
        "opened, held and echoed {CONNECTIONS} connections in {:?}",
        started.elapsed()
    );
}
