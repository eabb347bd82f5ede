//! The regular-fd fallback: with direct descriptors turned off in the config, client
//! sockets live in the process fd table and everything else behaves the same.

mod common;

use common::*;
use holdfast_wire::frame::{close_code, FrameType};

#[test]
fn regular_fd_fallback_echoes_pings_and_closes_with_reasons() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let config = dir.write("gateway.toml", "[runtime]\ndirect_descriptors = false\n");
    let config = config.to_str().expect("utf-8 temp path").to_string();
    let gateway = Gateway::start(
        &dir,
        gateway_args(
            &pki,
            &[&worker.socket],
            &["--config", &config, "--max-frame", "1024"],
        ),
    );

    let mut clients: Vec<Client> = (0..20).map(|_| gateway.client(&pki)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(format!("fallback {i}").as_bytes());
    }
    clients[0].send(FrameType::Ping, b"p");
    match clients[0].recv() {
        holdfast_wire::frame::OwnedFrame::Pong(p) => assert_eq!(p, b"p"),
        other => panic!("expected PONG, got {other:?}"),
    }

    let before = gateway.close_count("frame_too_large");
    clients[1].send(FrameType::Data, &[0u8; 2000]);
    clients[1].expect_close_frame(close_code::TOO_LARGE, IO_TIMEOUT);
    gateway.wait_for_close_reason("frame_too_large", before);

    let opened = gateway.metrics().sum("holdfast_accepts_total", &[]);
    assert!(opened >= 20.0, "accepts counted in fallback mode: {opened}");
    drop(clients);
    gateway.wait_for_metrics("every client closed", |m| {
        m.sum("holdfast_connections_open", &[]) == 0.0
    });
    assert!(
        gateway.stderr_tail().contains("regular fds"),
        "the fallback is logged: {}",
        gateway.stderr_tail()
    );
}
