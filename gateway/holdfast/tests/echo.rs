//! Frames relayed through the gateway to the reference echo worker and back, with a
//! rustls client: single frames, heartbeats answered by the gateway, many frames per
//! write, one frame over many writes, and a couple of hundred connections over both cores.

mod common;

use common::{payload, Client, ClientOptions, Stack, CORES};
use holdfast_wire::frame::{FrameType, OwnedFrame};

/// `n` connections to the stack's gateway, all open at once.
fn connect_many(stack: &Stack, n: usize) -> Vec<Client> {
    let opts = ClientOptions::new(&stack.pki);
    let config = opts.config();
    (0..n)
        .map(|i| {
            Client::connect_with(stack.gateway.listen, config.clone(), &opts.server_name)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect()
}

#[test]
fn data_frames_echo_through_a_rustls_client() {
    let stack = Stack::start(&[]);
    let mut client = stack.client();
    for (i, len) in [1usize, 5, 64, 1024, 16 * 1024, 60_000]
        .into_iter()
        .enumerate()
    {
        client.echo(&payload("echo", i, len));
    }
    // An empty DATA frame is a frame too.
    client.echo(b"");
    let m = stack
        .gateway
        .wait_for_metrics("frames in both directions", |m| {
            m.sum("holdfast_frames_total", &[("direction", "from_client")]) >= 7.0
                && m.sum("holdfast_frames_total", &[("direction", "to_client")]) >= 7.0
        });
    assert!(m.sum("holdfast_handshakes_total", &[("result", "ok")]) >= 1.0);
}

#[test]
fn ping_is_answered_with_pong_and_never_reaches_the_worker() {
    let stack = Stack::start(&[]);
    let mut client = stack.client();
    client.send(FrameType::Ping, b"are you there");
    // DATA sent after the PING goes through the worker; had the PING been forwarded, the
    // worker would have echoed it before this marker.
    client.send(FrameType::Data, b"marker");
    let mut seen = Vec::new();
    loop {
        let f = client.recv();
        let done = f == OwnedFrame::Data(b"marker".to_vec());
        seen.push(f);
        if done {
            break;
        }
    }
    assert!(
        seen.contains(&OwnedFrame::Pong(b"are you there".to_vec())),
        "no PONG with the PING's payload before the marker echo: {seen:?}"
    );
    assert_eq!(
        seen.len(),
        2,
        "only PONG and the marker echo were expected: {seen:?}"
    );

    client.send(FrameType::Ping, b"");
    assert_eq!(
        client.recv(),
        OwnedFrame::Pong(Vec::new()),
        "PONG for an empty PING"
    );
    stack
        .gateway
        .wait_for_sum_at_least("holdfast_pings_total", &[], 2.0);
}

#[test]
fn many_frames_in_one_write_all_echo_in_order() {
    let stack = Stack::start(&[]);
    let mut client = stack.client();
    let payloads: Vec<Vec<u8>> = (0..200)
        .map(|i| payload("batch", i, 1 + (i * 37) % 900))
        .collect();
    let mut batch = Vec::new();
    for p in &payloads {
        batch.extend_from_slice(&common::encode(FrameType::Data, p));
    }
    client.send_raw(&batch);
    for (i, p) in payloads.iter().enumerate() {
        let got = client.recv();
        assert_eq!(got, OwnedFrame::Data(p.clone()), "frame {i} of the batch");
    }
}

#[test]
fn a_frame_split_over_many_writes_echoes_once_whole() {
    let stack = Stack::start(&[]);
    let mut client = stack.client();
    let p = payload("split", 0, 300);
    let bytes = common::encode(FrameType::Data, &p);
    // One TLS record per piece: the header alone, then bytes in dribs and drabs.
    for piece in [
        &bytes[..1],
        &bytes[1..3],
        &bytes[3..4],
        &bytes[4..5],
        &bytes[5..150],
        &bytes[150..],
    ] {
        client.send_raw(piece);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(client.recv(), OwnedFrame::Data(p));
    client.echo(b"and the next frame still works");
}

#[test]
fn two_hundred_connections_spread_over_cores_all_echo() {
    let stack = Stack::start(&[]);
    let mut clients = connect_many(&stack, 200);
    // All connections are open at once; each gets its own payload back.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(FrameType::Data, &payload("conn", i, 32));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.recv(),
            OwnedFrame::Data(payload("conn", i, 32)),
            "connection {i}"
        );
    }
    let m = stack
        .gateway
        .wait_for_metrics("accepts on every core", |m| {
            let per_core = m.by_label("holdfast_accepts_total", &[], "core");
            per_core.len() == CORES
                && per_core.values().all(|&v| v > 0.0)
                && per_core.values().sum::<f64>() >= 200.0
        });
    let per_core = m.by_label("holdfast_accepts_total", &[], "core");
    eprintln!("accepts per core: {per_core:?}");
    stack
        .gateway
        .wait_for_sum_at_least("holdfast_connections_open", &[], 200.0);
}

#[test]
fn a_clean_client_close_is_counted_as_peer_closed() {
    let stack = Stack::start(&[]);
    let mut bystander = stack.client();
    bystander.echo(b"before");
    let mut leaving = stack.client();
    leaving.echo(b"hello");
    let before = stack.gateway.close_count("peer_closed");
    leaving.close();
    stack.gateway.wait_for_close_reason("peer_closed", before);
    bystander.echo(b"after");
}

#[test]
fn with_completion_batching_on_every_connection_and_a_lone_late_frame_echo() {
    // 5 ms: far more than the gateway's own work, so frames wait for each other's wake-up.
    let stack = Stack::start(&["--batch-wait-us", "5000"]);
    let mut clients = connect_many(&stack, 50);
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(FrameType::Data, &payload("batched", i * 10 + round, 48));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(
                c.recv(),
                OwnedFrame::Data(payload("batched", i * 10 + round, 48)),
                "connection {i}, round {round}"
            );
        }
    }
    // After a quiet spell, one frame on its own is still relayed (the core is woken by
    // the first completion, not held for a batch that never comes).
    std::thread::sleep(std::time::Duration::from_millis(300));
    clients[7].echo(b"alone after a pause");
}
