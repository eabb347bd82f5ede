//! The PROXY protocol on the listener: real HAProxy (`send-proxy-v2`) in front of the
//! gateway, a v1 header, and the refusals: a malformed header or none from a trusted
//! proxy, and a header from an address that is not trusted. The client address in the
//! header is the one the per-address cap counts.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{gateway_args, ChildGuard, Client, ClientOptions, Gateway, Pki, TestDir, Worker};
use holdfast_wire::proxy;
use socket2::{Domain, Socket, Type};

struct Proxied {
    gateway: Gateway,
    _worker: Worker,
    pki: Pki,
    dir: TestDir,
}

/// A gateway that trusts PROXY headers from 127.0.0.1 only.
fn start(extra: &[&str]) -> Proxied {
    let dir = TestDir::new();
    let pki = Pki::generate(&dir);
    let worker = Worker::start(&dir, &dir.join("worker.sock"));
    let config = dir.write(
        "gateway.toml",
        "[proxy_protocol]\ntrusted_networks = [\"127.0.0.1/32\"]\n",
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    let mut flags = vec!["--config", config.as_str()];
    flags.extend_from_slice(extra);
    let gateway = Gateway::start(&dir, gateway_args(&pki, &[&worker.socket], &flags));
    Proxied {
        gateway,
        _worker: worker,
        pki,
        dir,
    }
}

fn tcp_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddrV4::new(source, 0).into()).expect("bind");
    s.connect_timeout(&to.into(), common::IO_TIMEOUT)
        .expect("connect");
    s.into()
}

fn with_header(source: Ipv4Addr, to: SocketAddr, header: &[u8]) -> TcpStream {
    let mut tcp = tcp_from(source, to);
    tcp.write_all(header).expect("write the PROXY header");
    tcp
}

#[test]
fn a_v1_header_from_a_trusted_proxy_is_stripped_and_its_client_counted() {
    // One connection per source per core.
    let g = start(&["--max-conns-per-ip", "1"]);
    let opts = ClientOptions::new(&g.pki);
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let mut header = Vec::new();
    proxy::encode_v1(Some((client, g.gateway.listen)), &mut header);
    let tcp = with_header(Ipv4Addr::LOCALHOST, g.gateway.listen, &header);
    let mut c = Client::connect_over(tcp, &opts).expect("TLS after the PROXY line");
    c.echo(b"through a v1 proxy");
    // The same client through the proxy again, until one lands on the core that holds
    // it: refused for its address, although the proxy's own address is 127.0.0.1.
    let before = g.gateway.close_count("ip_limit");
    let mut held = Vec::new();
    for _ in 0..8 {
        let tcp = with_header(Ipv4Addr::LOCALHOST, g.gateway.listen, &header);
        if let Ok(mut c) = Client::connect_over(tcp, &opts) {
            c.echo(b"other core");
            held.push(c);
        }
    }
    assert!(held.len() <= 1, "one per core: {} more got in", held.len());
    assert!(g.gateway.close_count("ip_limit") >= before + 7.0);
    c.echo(b"still here");
}

#[test]
fn malformed_missing_and_untrusted_headers_are_closed_and_counted() {
    let g = start(&[]);
    let opts = ClientOptions::new(&g.pki);
    // A trusted proxy sends a malformed header.
    let bad = with_header(Ipv4Addr::LOCALHOST, g.gateway.listen, b"PROXY TCP9 x\r\n");
    assert!(Client::connect_over(bad, &opts).is_err());
    g.gateway
        .wait_for_sum_at_least("holdfast_closes_total", &[("reason", "proxy_error")], 1.0);
    // A trusted proxy sends no header: the ClientHello is not one.
    assert!(Client::connect_over(tcp_from(Ipv4Addr::LOCALHOST, g.gateway.listen), &opts).is_err());
    g.gateway
        .wait_for_sum_at_least("holdfast_closes_total", &[("reason", "proxy_error")], 2.0);
    // An untrusted address sends a header (spoofing a client address).
    let mut v2 = Vec::new();
    proxy::encode_v2(
        Some(("203.0.113.1:1".parse().unwrap(), g.gateway.listen)),
        &mut v2,
    );
    let spoof = with_header(Ipv4Addr::new(127, 0, 0, 9), g.gateway.listen, &v2);
    assert!(Client::connect_over(spoof, &opts).is_err());
    g.gateway.wait_for_sum_at_least(
        "holdfast_closes_total",
        &[("reason", "proxy_untrusted")],
        1.0,
    );
    // A client from that address without a header is served directly.
    let direct = tcp_from(Ipv4Addr::new(127, 0, 0, 9), g.gateway.listen);
    let mut c = Client::connect_over(direct, &opts).expect("a direct client");
    c.echo(b"no proxy");
    assert_eq!(
        g.gateway
            .metrics()
            .sum("holdfast_handshakes_total", &[("result", "failed")]),
        0.0
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn real_haproxy_with_send_proxy_v2_in_front() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        common::peer::missing("haproxy", "apt-get install haproxy");
        return;
    }
    let g = start(&["--max-conns-per-ip", "1"]);
    let port = free_port();
    let cfg = g.dir.write(
        "haproxy.cfg",
        format!(
            "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
             backend be\n  server gw {} send-proxy-v2\n",
            g.gateway.listen
        ),
    );
    let _haproxy = ChildGuard::new(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(g.dir.join("haproxy.stderr")).expect("log"))
            .spawn()
            .expect("start haproxy"),
    );
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(front).is_err() {
        assert!(Instant::now() < deadline, "haproxy never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let opts = ClientOptions::new(&g.pki);
    // Clients from two addresses through HAProxy: each is its own source for the cap.
    let mut a = Client::connect_over(tcp_from(Ipv4Addr::new(127, 0, 3, 1), front), &opts)
        .expect("through haproxy");
    a.echo(b"via haproxy");
    let mut b = Client::connect_over(tcp_from(Ipv4Addr::new(127, 0, 3, 2), front), &opts)
        .expect("another client through haproxy");
    b.echo(b"another via haproxy");
    // More from 127.0.0.3.1: at most one per core is held (HAProxy's own address is not
    // what counts), the rest are refused for their address.
    let before = g.gateway.close_count("ip_limit");
    let mut more = Vec::new();
    for _ in 0..6 {
        if let Ok(mut c) = Client::connect_over(tcp_from(Ipv4Addr::new(127, 0, 3, 1), front), &opts)
        {
            c.echo(b"second core");
            more.push(c);
        }
    }
    assert!(
        more.len() <= 1,
        "{} more from one address got in",
        more.len()
    );
    assert!(g.gateway.close_count("ip_limit") >= before + 5.0);
    assert_eq!(g.gateway.close_count("proxy_error"), 0.0);
    a.echo(b"still here");
    b.echo(b"still here");
}
