//! Gateway-side fan-out: a worker SUBSCRIBEs connections to topics and PUBLISHes once; the
//! gateway delivers to every subscriber on every core, exactly once each.

mod common;
mod fake_worker;

use std::time::Duration;

use common::*;
use fake_worker::{FakeWorker, Got, Mode};
use holdfast_wire::envelope::Message;
use holdfast_wire::frame::{FrameType, OwnedFrame};
use holdfast_wire::ConnId;

/// Connects `n` clients and learns each one's connection id from the FRAME its probe
/// produced at the fake worker.
fn clients_with_ids(
    gateway: &Gateway,
    pki: &Pki,
    fake: &FakeWorker,
    n: usize,
) -> Vec<(Client, ConnId)> {
    (0..n)
        .map(|k| {
            let mut client = gateway.client(pki);
            let probe = format!("probe-{k}");
            client.send(FrameType::Data, probe.as_bytes());
            let conn = fake.wait_for(&format!("FRAME {probe}"), IO_TIMEOUT, |s| {
                s.msgs.iter().find_map(|(_, g)| match g {
                    Got::Frame { conn, payload, .. } if payload == probe.as_bytes() => Some(*conn),
                    _ => None,
                })
            });
            (client, conn)
        })
        .collect()
}

fn expect_data(client: &mut Client, want: &[u8], who: &str) {
    match client.try_recv(IO_TIMEOUT) {
        Recv::Frame(OwnedFrame::Data(p)) => assert_eq!(p, want, "{who}"),
        other => panic!(
            "{who}: expected {:?}, got {other:?}",
            String::from_utf8_lossy(want)
        ),
    }
}

fn expect_nothing(client: &mut Client, who: &str) {
    match client.try_recv(Duration::from_millis(300)) {
        Recv::TimedOut => {}
        other => panic!("{who}: expected nothing, got {other:?}"),
    }
}

#[test]
fn one_publish_reaches_every_subscriber_on_every_core_exactly_once() {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let fake = FakeWorker::start(&dir.join("fake.sock"), |_| Mode::Passive);
    let gateway = Gateway::start(&dir, gateway_args(&pki, &[&fake.socket], &[]));
    let links = fake.wait_links(CORES, Duration::from_secs(15));
    gateway.wait_for_metrics("links up", |m| {
        m.sum("holdfast_worker_link_up", &[]) == CORES as f64
    });

    let mut clients = clients_with_ids(&gateway, &pki, &fake, 12);
    let cores: std::collections::BTreeSet<u8> = clients.iter().map(|(_, id)| id.core()).collect();
    eprintln!("subscribers on cores {cores:?}");

    // Every subscription goes out on core 0's link: those of other cores cross over.
    for (_, id) in &clients[..10] {
        fake.send(
            links[0],
            &Message::Subscribe {
                conn: *id,
                topic: b"news",
            },
        );
    }
    fake.send(
        links[0],
        &Message::Subscribe {
            conn: clients[10].1,
            topic: b"sport",
        },
    );
    // One PUBLISH, on the other core's link.
    let publish = |payload: &[u8]| {
        let msg = Message::Publish {
            flags: 0,
            topic: b"news",
            payload,
        };
        fake.send(links[links.len() - 1], &msg);
    };
    // Subscriptions are applied in link order before the publish on another link only once
    // they arrived; give the cross-core hop a moment.
    std::thread::sleep(Duration::from_millis(200));
    publish(b"extra! extra!");
    for (i, (client, _)) in clients.iter_mut().enumerate() {
        if i < 10 {
            expect_data(client, b"extra! extra!", &format!("subscriber {i}"));
        }
    }
    for (i, (client, _)) in clients.iter_mut().enumerate() {
        expect_nothing(client, &format!("client {i} after one publish"));
    }
    gateway.wait_for_sum_at_least("holdfast_published_total", &[], 10.0);

    // Unsubscribe one, close another: the next publish reaches the other eight.
    fake.send(
        links[0],
        &Message::Unsubscribe {
            conn: clients[0].1,
            topic: b"news",
        },
    );
    let (closed, _) = clients.remove(1);
    drop(closed);
    gateway.wait_for_metrics("closed client gone", |m| {
        m.sum("holdfast_connections_open", &[]) == clients.len() as f64
    });
    std::thread::sleep(Duration::from_millis(200));
    publish(b"second edition");
    expect_nothing(&mut clients[0].0, "the unsubscribed client");
    for (i, (client, _)) in clients.iter_mut().enumerate().skip(1).take(8) {
        expect_data(client, b"second edition", &format!("subscriber {i}"));
    }
    gateway.wait_for_sum_at_least("holdfast_published_total", &[], 18.0);

    // A subscription for a connection that does not exist is answered with CLOSE.
    let ghost = ConnId::new(0, 4242, 7);
    fake.send(
        links[0],
        &Message::Subscribe {
            conn: ghost,
            topic: b"news",
        },
    );
    fake.wait_for("CLOSE for the unknown subscriber", IO_TIMEOUT, |s| {
        s.msgs
            .iter()
            .any(|(_, g)| matches!(g, Got::Close { conn, link_seq: 0, .. } if *conn == ghost))
            .then_some(())
    });
}
