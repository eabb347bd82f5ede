//! Worker links: a gateway starts before its worker, reports the link down, refuses
//! client frames it cannot route, and picks the worker up once it appears.

mod common;

use std::time::Duration;

use common::{gateway_args, Gateway, Pki, TestDir, Worker, CORES, IO_TIMEOUT};
use holdfast_wire::frame::{close_code, FrameType};

const LINK: &str = "holdfast_worker_link_up";

#[test]
fn a_worker_started_after_the_gateway_is_linked_and_serves_clients() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let socket = dir.join("late.sock");
    let socket_label = socket.to_str().expect("UTF-8 temp path").to_owned();
    let gateway = Gateway::start(&dir, gateway_args(&pki, &[&socket], &[]));

    let labels = [("worker", socket_label.as_str())];
    let m = gateway.wait_for_metrics("a link_up series per core for the missing worker", |m| {
        m.series(LINK, &labels).count() == CORES
    });
    assert_eq!(
        m.sum(LINK, &labels),
        0.0,
        "link_up for a worker socket that does not exist:\n{}",
        m.text
    );
    assert_eq!(
        gateway.http_get("/healthz").0,
        200,
        "/healthz while no worker is up"
    );

    let _worker = Worker::start(&dir, &socket);
    // Reconnects are retried on a timer: allow a few seconds.
    gateway.wait_for_metrics_within(Duration::from_secs(10), "every core's link up", &mut |m| {
        let up: Vec<f64> = m.series(LINK, &labels).map(|s| s.value).collect();
        up.len() == CORES && up.iter().all(|&v| v == 1.0)
    });
    let mut client = gateway.client(&pki);
    client.echo(b"through the late worker");
}

#[test]
fn data_with_no_live_worker_gets_close_1013() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let gateway = Gateway::start(&dir, gateway_args(&pki, &[&dir.join("absent.sock")], &[]));
    let mut client = gateway.client(&pki);
    // Heartbeats are the gateway's own business and need no worker.
    client.send(FrameType::Ping, b"hb");
    match client.recv() {
        holdfast_wire::frame::OwnedFrame::Pong(p) => assert_eq!(p, b"hb"),
        // A gateway may refuse the connection as soon as it knows no worker is up.
        holdfast_wire::frame::OwnedFrame::Close { code, reason } => {
            assert_eq!(code, close_code::TRY_AGAIN_LATER, "CLOSE code ({reason:?})");
            client.expect_closed(IO_TIMEOUT);
            gateway.wait_for_close_reason("no_worker", 0.0);
            return;
        }
        other => panic!("expected PONG or CLOSE 1013, got {other:?}"),
    }
    client.send(FrameType::Data, b"nowhere to go");
    client.expect_close_frame(close_code::TRY_AGAIN_LATER, IO_TIMEOUT);
    gateway.wait_for_close_reason("no_worker", 0.0);
}
