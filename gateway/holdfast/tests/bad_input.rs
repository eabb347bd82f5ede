//! Bad clients: each test makes one connection misbehave and checks that exactly that
//! connection is closed, that its close is counted under the right reason, and that a
//! client connected beforehand is still served afterwards.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use common::{drain_until_closed, raw_tcp, Client, Recv, Stack, IO_TIMEOUT};
use holdfast_wire::frame::{close_code, encode_header, FrameType, OwnedFrame};

/// A gateway and a bystander client that has already had one echo.
fn start(extra: &[&str]) -> (Stack, Client) {
    let stack = Stack::start(extra);
    let mut bystander = stack.client();
    bystander.echo(b"bystander before");
    (stack, bystander)
}

/// The misbehaving connection is gone from the gateway's books, its close was counted
/// as `reason`, and the bystander still echoes.
fn assert_only_that_connection_closed(
    stack: &Stack,
    bystander: &mut Client,
    reason: &str,
    before: f64,
) {
    stack.gateway.wait_for_close_reason(reason, before);
    stack
        .gateway
        .wait_for_metrics("only the bystander left open", |m| {
            m.sum("holdfast_connections_open", &[]) == 1.0
        });
    bystander.echo(b"bystander after");
}

#[test]
fn garbage_instead_of_a_client_hello_is_counted_as_tls_error_and_closed() {
    let (stack, mut bystander) = start(&[]);
    let before = stack.gateway.close_count("tls_error");
    let mut tcp = raw_tcp(stack.gateway.listen);
    let mut garbage = b"this is not a TLS ClientHello\r\n".repeat(16);
    garbage.extend((0..=255u8).rev());
    tcp.write_all(&garbage).expect("send garbage");
    let closed = drain_until_closed(&mut tcp, IO_TIMEOUT);
    assert!(
        closed.is_some(),
        "the gateway kept a connection that sent garbage for {IO_TIMEOUT:?}"
    );
    assert_only_that_connection_closed(&stack, &mut bystander, "tls_error", before);
    stack
        .gateway
        .wait_for_sum_at_least("holdfast_handshakes_total", &[("result", "failed")], 1.0);
}

#[test]
fn a_connection_that_never_sends_a_client_hello_is_closed_after_the_handshake_timeout() {
    let (stack, mut bystander) = start(&["--handshake-timeout", "2"]);
    let before = stack.gateway.close_count("handshake_timeout");
    let mut tcp = raw_tcp(stack.gateway.listen);
    let started = Instant::now();
    let closed = drain_until_closed(&mut tcp, Duration::from_secs(10));
    let waited = started.elapsed();
    eprintln!("silent connection closed after {waited:?}: {closed:?}");
    assert!(
        closed.is_some(),
        "a silent connection was still open after 10 s with --handshake-timeout 2"
    );
    // The timer wheel ticks once a second: allow one tick either side, plus load.
    assert!(
        waited >= Duration::from_secs(1) && waited <= Duration::from_secs(6),
        "closed after {waited:?} with --handshake-timeout 2"
    );
    assert_only_that_connection_closed(&stack, &mut bystander, "handshake_timeout", before);
}

#[test]
fn a_frame_over_max_frame_gets_close_1009_and_is_closed() {
    let (stack, mut bystander) = start(&["--max-frame", "1024"]);
    let before = stack.gateway.close_count("frame_too_large");
    let mut client = stack.client();
    client.echo(&[b'x'; 1024]);
    client.send(FrameType::Data, &[b'y'; 1025]);
    client.expect_close_frame(close_code::TOO_LARGE, IO_TIMEOUT);
    assert_only_that_connection_closed(&stack, &mut bystander, "frame_too_large", before);
}

#[test]
fn a_length_prefix_over_max_frame_is_refused_before_its_payload_arrives() {
    let (stack, mut bystander) = start(&["--max-frame", "1024"]);
    let before = stack.gateway.close_count("frame_too_large");
    let mut client = stack.client();
    // Only the header: a gateway that waited for the 1 MiB payload would time out here.
    client.send_raw(&encode_header(FrameType::Data, 1 << 20));
    client.expect_close_frame(close_code::TOO_LARGE, IO_TIMEOUT);
    assert_only_that_connection_closed(&stack, &mut bystander, "frame_too_large", before);
}

#[test]
fn an_unknown_frame_type_gets_close_1003_and_is_closed() {
    let (stack, mut bystander) = start(&[]);
    let before = stack.gateway.close_count("unknown_frame_type");
    let mut client = stack.client();
    client.echo(b"fine so far");
    client.send_raw(&[0x7f, 0, 0, 3, 1, 2, 3]);
    client.expect_close_frame(close_code::UNKNOWN_TYPE, IO_TIMEOUT);
    assert_only_that_connection_closed(&stack, &mut bystander, "unknown_frame_type", before);
}

#[test]
fn half_a_frame_then_close_is_counted_as_eof_mid_frame() {
    let (stack, mut bystander) = start(&[]);
    let before = stack.gateway.close_count("eof_mid_frame");
    let mut client = stack.client();
    client.echo(b"fine so far");
    // The header promises 100 bytes; 10 come, then close_notify and FIN.
    let mut half = encode_header(FrameType::Data, 100).to_vec();
    half.extend_from_slice(&[b'z'; 10]);
    client.send_raw(&half);
    client.stream.conn.send_close_notify();
    client.stream.flush().expect("send close_notify");
    client
        .stream
        .sock
        .shutdown(Shutdown::Write)
        .expect("send FIN");
    // The gateway may say why (a CLOSE frame) before it closes; it must not echo.
    loop {
        match client.try_recv(IO_TIMEOUT) {
            Recv::Frame(OwnedFrame::Close { code, reason }) => eprintln!("CLOSE {code} {reason:?}"),
            Recv::Closed(how) => {
                eprintln!("closed: {how:?}");
                break;
            }
            other => panic!(
                "after half a frame and a close, expected the gateway to close, got {other:?}"
            ),
        }
    }
    assert_only_that_connection_closed(&stack, &mut bystander, "eof_mid_frame", before);
}

#[test]
fn a_client_that_never_reads_and_then_resets_is_counted_as_peer_reset() {
    let (stack, mut bystander) = start(&[]);
    let before = stack.gateway.close_count("peer_reset");
    let mut client = stack.client();
    client.echo(b"fine so far");

    // Write 512 KiB of DATA straight through rustls, never reading the echoes; stop
    // early if the gateway pushes back.
    let frame = common::encode(FrameType::Data, &[b'r'; 4096]);
    let stream = &mut client.stream;
    stream
        .sock
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("set write timeout");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut sent = 0usize;
    'writing: while sent < 512 * 1024 && Instant::now() < deadline {
        stream
            .conn
            .writer()
            .write_all(&frame)
            .expect("rustls takes one frame");
        while stream.conn.wants_write() {
            if let Err(e) = stream.conn.write_tls(&mut stream.sock) {
                eprintln!("stopped writing after {sent} bytes: {e}");
                break 'writing;
            }
        }
        sent += frame.len();
    }
    // Let echoes pile up unread, then leave with a RST instead of a FIN.
    thread::sleep(Duration::from_millis(300));
    socket2::SockRef::from(&client.stream.sock)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(client);

    assert_only_that_connection_closed(&stack, &mut bystander, "peer_reset", before);
}

#[test]
fn an_idle_client_gets_close_1014_after_the_idle_timeout() {
    let (stack, mut bystander) = start(&["--idle-timeout", "2"]);
    let before = stack.gateway.close_count("idle_timeout");
    let mut idle = stack.client();
    let connected = Instant::now();
    let waiter = thread::spawn(move || {
        let first = idle.try_recv(Duration::from_secs(10));
        let at = connected.elapsed();
        let then = idle.try_recv(IO_TIMEOUT);
        (first, at, then)
    });
    // The bystander stays busy meanwhile, so the idle timer must be per connection.
    while !waiter.is_finished() {
        bystander.echo(b"still here");
        thread::sleep(Duration::from_millis(300));
    }
    let (first, at, then) = waiter.join().expect("idle client thread");
    eprintln!("idle client: {first:?} after {at:?}, then {then:?}");
    match first {
        Recv::Frame(OwnedFrame::Close { code, .. }) => {
            assert_eq!(code, close_code::IDLE_TIMEOUT, "CLOSE code")
        }
        other => panic!(
            "an idle client expected CLOSE 1014 within 10 s of --idle-timeout 2, got {other:?}"
        ),
    }
    assert!(
        at >= Duration::from_secs(1) && at <= Duration::from_secs(6),
        "idle client closed after {at:?} with --idle-timeout 2"
    );
    assert!(
        matches!(then, Recv::Closed(_)),
        "after CLOSE 1014 expected the connection to end, got {then:?}"
    );
    assert_only_that_connection_closed(&stack, &mut bystander, "idle_timeout", before);
}

/// A real ClientHello with a second handshake message behind it in the same record: rustls
/// fails on the second while it still holds the record, which is the case where the
/// alert must be encoded against the same input (anything else made rustls panic).
#[test]
fn a_client_hello_with_a_stray_message_in_its_record_is_refused_cleanly() {
    use std::sync::Arc;
    let (stack, mut bystander) = start(&[]);
    let before = stack.gateway.close_count("tls_error");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![holdfast_wire::frame::ALPN.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut hello = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut record = Vec::new();
    hello.write_tls(&mut record).expect("ClientHello");
    assert_eq!(record[0], 22, "a handshake record");
    // A Finished message (type 20) with 32 bytes of verify data, inside the same record.
    record.extend_from_slice(&[20, 0, 0, 32]);
    record.extend_from_slice(&[0u8; 32]);
    let len = (record.len() - 5) as u16;
    record[3..5].copy_from_slice(&len.to_be_bytes());

    let mut tcp = raw_tcp(stack.gateway.listen);
    tcp.write_all(&record).expect("send the record");
    let closed = drain_until_closed(&mut tcp, IO_TIMEOUT);
    assert!(closed.is_some(), "the gateway kept the connection");
    assert_only_that_connection_closed(&stack, &mut bystander, "tls_error", before);
}
