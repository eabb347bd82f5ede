//! Hibernation in the real gateway: idle TLS 1.3 connections shed their rustls state and
//! their keys, the gauge counts them, and each one still echoes (waking, then sleeping
//! again), with the rustls client of the harness as the peer. Foreign clients (openssl,
//! Python) are in `foreign_clients.rs`.

mod common;

use std::thread;
use std::time::Duration;

use common::{payload, Client, ClientOptions, Stack};
use holdfast_wire::frame::{FrameType, OwnedFrame};

const CONNECTIONS: usize = 2_000;

fn open(stack: &Stack, n: usize) -> Vec<Client> {
    let opts = ClientOptions::new(&stack.pki);
    (0..n)
        .map(|i| {
            Client::connect(stack.gateway.listen, &opts)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect()
}

fn echo_all(clients: &mut [Client], tag: &str) {
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(FrameType::Data, &payload(tag, i, 40));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.recv(),
            OwnedFrame::Data(payload(tag, i, 40)),
            "connection {i} after {tag}"
        );
    }
}

#[test]
fn idle_connections_hibernate_and_wake_to_echo_again() {
    let stack = Stack::start(&["--hibernate-after", "1", "--max-conns-per-ip", "0"]);
    let mut clients = open(&stack, CONNECTIONS);
    echo_all(&mut clients, "awake");

    let m = stack.gateway.wait_for_metrics_within(
        Duration::from_secs(10),
        &format!("{CONNECTIONS} connections hibernated"),
        &mut |m| m.sum("holdfast_connections_hibernated", &[]) >= CONNECTIONS as f64,
    );
    assert_eq!(
        m.sum("holdfast_connections_hibernated", &[]),
        CONNECTIONS as f64
    );
    assert!(m.sum("holdfast_hibernations_total", &[]) >= CONNECTIONS as f64);

    // Every hibernated connection wakes for its frame and echoes.
    echo_all(&mut clients, "woken");
    let m = stack.gateway.metrics();
    assert!(
        m.sum("holdfast_wakeups_total", &[]) >= CONNECTIONS as f64,
        "each connection woke: {}",
        m.sum("holdfast_wakeups_total", &[])
    );
    // And goes back to sleep.
    stack.gateway.wait_for_metrics_within(
        Duration::from_secs(10),
        "connections hibernated again",
        &mut |m| m.sum("holdfast_connections_hibernated", &[]) >= CONNECTIONS as f64,
    );
    // Ping, answered by the gateway itself, wakes a connection too.
    for c in clients.iter_mut().take(20) {
        c.send(FrameType::Ping, b"hello?");
        assert_eq!(c.recv(), OwnedFrame::Pong(b"hello?".to_vec()));
    }
    drop(clients);
    stack.gateway.wait_for_metrics_within(
        Duration::from_secs(10),
        "every connection closed",
        &mut |m| {
            m.sum("holdfast_connections_open", &[]) == 0.0
                && m.sum("holdfast_connections_hibernated", &[]) == 0.0
        },
    );
}

#[test]
fn hibernation_off_keeps_every_connection_on_rustls() {
    let stack = Stack::start(&["--hibernate-after", "0"]);
    let mut clients = open(&stack, 20);
    echo_all(&mut clients, "one");
    thread::sleep(Duration::from_millis(2_500));
    let m = stack.gateway.metrics();
    assert_eq!(m.sum("holdfast_connections_hibernated", &[]), 0.0);
    assert_eq!(m.sum("holdfast_hibernations_total", &[]), 0.0);
    echo_all(&mut clients, "two");
}

/// KeyUpdate from a rustls client (`refresh_traffic_keys` asks for ours too), repeatedly,
/// while the connection is awake and while it is hibernated: every echo after it still
/// decrypts, so both sides moved to the same new keys each time.
#[test]
fn key_updates_before_and_after_hibernation_keep_the_conversation_going() {
    let stack = Stack::start(&["--hibernate-after", "1", "--max-conns-per-ip", "0"]);
    let mut clients = open(&stack, 4);
    for (i, c) in clients.iter_mut().enumerate() {
        // Awake: just after the handshake, on holdfast's record layer.
        for round in 0..3 {
            c.stream
                .conn
                .refresh_traffic_keys()
                .expect("client KeyUpdate");
            c.echo(&payload("awake-ku", i * 10 + round, 100));
        }
    }
    stack.gateway.wait_for_metrics_within(
        Duration::from_secs(10),
        "the connections hibernated",
        &mut |m| m.sum("holdfast_connections_hibernated", &[]) >= 4.0,
    );
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.stream
                .conn
                .refresh_traffic_keys()
                .expect("client KeyUpdate");
            c.echo(&payload("asleep-ku", i * 10 + round, 100));
        }
        stack
            .gateway
            .wait_for_metrics_within(Duration::from_secs(10), "asleep again", &mut |m| {
                m.sum("holdfast_connections_hibernated", &[]) >= 4.0
            });
    }
}
