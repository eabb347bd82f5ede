//! A full connection table: a core whose fixed-file table is full stops listening, so
//! SO_REUSEPORT sends new clients to the other cores, and when every core is full the kernel
//! refuses them at once instead of leaving them in a backlog that is never served. When
//! slots free, the cores listen again.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Stack, CORES, IO_TIMEOUT};

/// Slots per core in these tests.
const PER_CORE: usize = 4;

#[test]
fn full_cores_stop_listening_and_listen_again_when_slots_free() {
    let per_core = PER_CORE.to_string();
    let stack = Stack::start(&["--max-conns-per-core", &per_core]);
    let capacity = PER_CORE * CORES;
    stack
        .gateway
        .wait_for_metrics("every core's table sized", |m| {
            m.sum("holdfast_conn_table_capacity", &[]) == capacity as f64
        });

    // One at a time, so each client is accepted before the next one connects: a core
    // that fills has stopped listening before the next client arrives.
    let mut clients: Vec<Client> = (0..capacity)
        .map(|i| {
            let mut c = stack.client();
            c.echo(format!("client {i}").as_bytes());
            c
        })
        .collect();
    let m = stack
        .gateway
        .wait_for_metrics("every core full and paused", |m| {
            m.sum("holdfast_connections_open", &[]) == capacity as f64
                && m.sum("holdfast_listen_paused_total", &[]) == CORES as f64
        });
    // Every core took its share: the ones that filled first sent the rest elsewhere.
    for (core, open) in m.by_label("holdfast_connections_open", &[], "core") {
        assert_eq!(open, PER_CORE as f64, "core {core}");
    }

    // Every core full: a new client is refused at once, not left waiting.
    let started = Instant::now();
    let refused = Client::connect(
        stack.gateway.listen,
        &common::ClientOptions::new(&stack.pki),
    );
    assert!(refused.is_err(), "a client got in past full tables");
    assert!(
        started.elapsed() < IO_TIMEOUT / 2,
        "a refused client waited {:?} instead of being refused",
        started.elapsed()
    );
    // Nobody was accepted and then dropped for want of a slot.
    assert_eq!(stack.gateway.close_count("table_full"), 0.0);

    // Two clients leave: their cores listen again and take new clients.
    clients.pop().expect("a client").close();
    clients.pop().expect("a client").close();
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut newcomer = loop {
        match Client::connect(
            stack.gateway.listen,
            &common::ClientOptions::new(&stack.pki),
        ) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("no core listened again after slots freed: {e}"),
        }
    };
    newcomer.echo(b"newcomer");
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(format!("still here {i}").as_bytes());
    }
}
