//! The per-core outbound budget: a worker PUBLISHes to a topic whose subscribers are
//! thousands of clients that read nothing and a few that do. The gateway caps each
//! client socket's send buffer (`runtime.socket_send_buffer`), as a fan-out box would, so
//! the kernel holds a few tens of kilobytes per non-reader, not `tcp_wmem`'s 4 MiB, and
//! what they do not read queues in the gateway. The core closes the non-readers that hold
//! the most unsent bytes, as slow consumers, until it is back under its budget; the
//! readers get every message and are still served.

mod common;
mod fake_worker;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use fake_worker::{connect_small_rcvbuf, FakeWorker, Got, Mode};
use holdfast_wire::envelope::Message;
use holdfast_wire::frame::{FrameType, OwnedFrame};
use holdfast_wire::ConnId;

const SILENT: usize = 2_000;
const READERS: usize = 4;
/// Four times what one message to every non-reader of a core adds: when a core reaches
/// it, each non-reader holds several messages and a reader at most one.
const BUDGET: u64 = 16 << 20;
const MESSAGES: usize = 100;
const PAYLOAD: usize = 4 * 1024;
/// SO_SNDBUF of the gateway's client sockets (the kernel doubles it).
const SEND_BUFFER: u32 = 16 * 1024;

#[test]
fn over_budget_the_heaviest_non_readers_are_closed_and_readers_keep_up() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let fake = FakeWorker::start(&dir.join("fake.sock"), |_| Mode::Passive);
    let config = dir.write(
        "gateway.toml",
        format!(
            "[limits]\noutbound_budget_per_core = {BUDGET}\nmax_conns_per_ip = 0\n\
             [runtime]\nsocket_send_buffer = {SEND_BUFFER}\n"
        ),
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    let gateway = Gateway::start(
        &dir,
        gateway_args(&pki, &[&fake.socket], &["--config", &config]),
    );
    let links = fake.wait_links(CORES, Duration::from_secs(15));
    gateway.wait_for_metrics("links up", |m| {
        m.sum("holdfast_worker_link_up", &[]) == CORES as f64
    });
    let opts = ClientOptions::new(&pki);

    // Non-readers with a tiny receive window, so the gateway, not the kernel, holds what
    // they do not read.
    let silent: Vec<_> = (0..SILENT)
        .map(|_| connect_small_rcvbuf(gateway.listen, &opts, 4096))
        .collect();
    let mut readers: Vec<Client> = (0..READERS).map(|_| gateway.client(&pki)).collect();
    let all = SILENT + READERS;
    let ids: BTreeSet<ConnId> = fake.wait_for("an OPEN for every client", IO_TIMEOUT * 4, |s| {
        let ids: BTreeSet<ConnId> = s
            .msgs
            .iter()
            .filter_map(|(_, g)| match g {
                Got::Open { conn, .. } => Some(*conn),
                _ => None,
            })
            .collect();
        (ids.len() >= all).then_some(ids)
    });
    for id in &ids {
        fake.send(
            links[0],
            &Message::Subscribe {
                conn: *id,
                topic: b"firehose",
            },
        );
    }
    std::thread::sleep(Duration::from_millis(500));

    // Small messages: the kernel's socket buffers take the first ones for everyone, then
    // the non-readers' queues grow in the gateway while the readers' drain, so the
    // non-readers are the heaviest when the budget is reached.
    let payload = vec![b'x'; PAYLOAD];
    let mut got = vec![0usize; READERS];
    for _ in 0..MESSAGES {
        fake.send(
            links[0],
            &Message::Publish {
                flags: 0,
                topic: b"firehose",
                payload: &payload,
            },
        );
        // The readers read as they go.
        for (i, r) in readers.iter_mut().enumerate() {
            match r.try_recv(IO_TIMEOUT) {
                Recv::Frame(OwnedFrame::Data(p)) => {
                    assert_eq!(p.len(), PAYLOAD);
                    got[i] += 1;
                }
                other => {
                    let m = gateway.metrics();
                    panic!(
                        "reader {i}: expected a published message, got {other:?}; closes by \
                         reason: {:?}",
                        m.by_label("holdfast_closes_total", &[], "reason")
                    )
                }
            }
        }
    }
    assert_eq!(
        got,
        vec![MESSAGES; READERS],
        "every reader got every message"
    );

    // 2 000 non-readers x 100 x 4 KiB would be 800 MB; the cores held to their budget by
    // closing non-readers.
    // Both cores close as their passes get to it (the second core's publishes arrive
    // through the first): wait until most non-readers are closed and the count has stood
    // still for half a second, so a pause between the cores' closes is not read as the end.
    let (mut last, mut still) = (0.0, 0);
    let m = gateway.wait_for_metrics_within(
        Duration::from_secs(20),
        "most non-readers closed for the budget, and the count settled",
        &mut |m| {
            let closed = m.sum("holdfast_outbound_budget_closes_total", &[]);
            if closed == last {
                still += 1;
            } else {
                (last, still) = (closed, 0);
            }
            closed >= (SILENT / 2) as f64 && still >= 5
        },
    );
    let closed = m.sum("holdfast_outbound_budget_closes_total", &[]);
    eprintln!("closed for the budget: {closed}");
    assert!(
        closed >= (SILENT / 2) as f64 && closed <= SILENT as f64,
        "{closed} closed: most non-readers, and no reader"
    );
    for (core, bytes) in m.by_label("holdfast_outbound_bytes", &[], "core") {
        // Checked once per loop pass: one pass's publishes may overshoot before it.
        assert!(
            bytes <= (BUDGET + (SILENT as u64) * PAYLOAD as u64) as f64,
            "core {core} holds {bytes} outbound bytes"
        );
    }
    // The readers are still served (the gateway answers their PING itself: the fake
    // worker echoes nothing).
    for (i, r) in readers.iter_mut().enumerate() {
        r.send(FrameType::Ping, b"still there?");
        match r.try_recv(IO_TIMEOUT) {
            Recv::Frame(OwnedFrame::Pong(p)) => assert_eq!(p, b"still there?"),
            other => panic!("reader {i}: expected PONG, got {other:?}"),
        }
    }
    assert!(m.sum("holdfast_closes_total", &[("reason", "slow_consumer")]) >= closed);
    drop(silent);
}
