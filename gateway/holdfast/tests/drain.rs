//! SIGTERM drains: every connected client is told GOAWAY and closed, and the process
//! exits 0 within the drain grace period.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{payload, Client, Recv, Stack};
use holdfast_wire::frame::{close_code, OwnedFrame};

const GRACE_SECS: u64 = 2;

#[test]
fn sigterm_sends_goaway_to_every_client_closes_them_and_exits_zero() {
    let grace = GRACE_SECS.to_string();
    let mut stack = Stack::start(&["--drain-grace", &grace]);
    let mut clients: Vec<Client> = (0..8).map(|_| stack.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(&payload("drain", i, 16));
    }
    stack
        .gateway
        .wait_for_sum_at_least("holdfast_connections_open", &[], clients.len() as f64);

    let sent = Instant::now();
    stack.gateway.signal(libc::SIGTERM);
    let limit = Duration::from_secs(GRACE_SECS + 2);

    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            thread::spawn(move || {
                let mut frames = Vec::new();
                let closed = loop {
                    match c.try_recv(limit + Duration::from_secs(1)) {
                        Recv::Frame(f) => frames.push(f),
                        Recv::Closed(how) => break how,
                        Recv::TimedOut => {
                            panic!("client {i}: still open after SIGTERM; frames {frames:?}")
                        }
                    }
                };
                (i, frames, closed)
            })
        })
        .collect();

    let status = stack.gateway.wait_timeout(limit);
    let exited_after = sent.elapsed();
    for r in readers {
        let (i, frames, closed) = r.join().expect("client thread");
        assert!(
            matches!(frames.first(), Some(OwnedFrame::GoAway(_))),
            "client {i}: the first frame after SIGTERM should be GOAWAY, got {frames:?} then {closed:?}"
        );
        // GOAWAY may be followed by CLOSE 1001 before the connection ends; nothing else.
        for f in &frames[1..] {
            assert!(
                matches!(f, OwnedFrame::Close { code, .. } if *code == close_code::GOING_AWAY),
                "client {i}: unexpected frame after GOAWAY: {f:?} (all: {frames:?})"
            );
        }
    }
    let status = status.unwrap_or_else(|| {
        panic!("the gateway had not exited {limit:?} after SIGTERM with --drain-grace {GRACE_SECS}")
    });
    assert!(
        status.success(),
        "exit status after SIGTERM: {status} (after {exited_after:?})"
    );
}
