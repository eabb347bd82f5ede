//! The backend and the clients of `scripts/nats-demo.sh`.
//!
//! `nats_demo certs DIR` writes a test CA (`ca.der`) and a `localhost` certificate
//! (`cert.pem`, `key.pem`). `nats_demo run NATS_URL DIR GW_A=ADDR GW_B=ADDR` connects
//! alice to gateway A and bob to gateway B (native protocol over TLS), runs a backend that
//! learns who is where from `login NAME` frames, relays `to NAME TEXT` to that user's
//! connection on whichever gateway holds it, subscribes every user to topic `all`, then
//! broadcasts on `holdfast.topic.all` and checks both clients got it once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use holdfast_wire::frame::{self, FrameBuf, FrameType, OwnedFrame};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

type Client = (StreamOwned<ClientConnection, TcpStream>, FrameBuf);

fn connect(addr: &str, ca: &[u8]) -> Client {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![frame::ALPN.to_vec()];
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap());
    (StreamOwned::new(conn.unwrap(), tcp), FrameBuf::new())
}

fn send(c: &mut Client, text: &str) {
    let mut out = Vec::new();
    frame::encode(FrameType::Data, text.as_bytes(), &mut out);
    c.0.write_all(&out).unwrap();
    c.0.flush().unwrap();
}

/// The next DATA frame within 5 s (the read timeout), as text.
fn recv(c: &mut Client) -> Option<String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(OwnedFrame::Data(d)) = c.1.next(frame::MAX_LEN_FIELD).unwrap() {
            return Some(String::from_utf8_lossy(&d).into_owned());
        }
        match c.0.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => c.1.push(&chunk[..n]),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("certs") {
        let dir = std::path::Path::new(&args[2]);
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])?
            .signed_by(&key, &ca, &ca_key)?;
        std::fs::write(dir.join("ca.der"), ca.der())?;
        std::fs::write(dir.join("cert.pem"), cert.pem())?;
        std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
        return Ok(());
    }
    let (url, dir) = (&args[2], std::path::Path::new(&args[3]));
    let gws: Vec<(String, String)> = args[4..]
        .iter()
        .map(|a| {
            a.split_once('=')
                .map(|(g, a)| (g.to_owned(), a.to_owned()))
                .unwrap()
        })
        .collect();
    let ca = std::fs::read(dir.join("ca.der"))?;

    // The backend: user -> (gateway, conn), learnt from "login NAME".
    let nats = async_nats::connect(url.as_str()).await?;
    let mut events = nats.subscribe("holdfast.in.>").await?;
    nats.flush().await?;
    let users: Arc<Mutex<HashMap<String, (String, String)>>> = Arc::default();
    let (n2, u2) = (nats.clone(), users.clone());
    tokio::spawn(async move {
        while let Some(m) = events.next().await {
            let h = m.headers.clone().unwrap_or_default();
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned()).unwrap_or_default();
            let (gw, conn) = (get("Holdfast-Gateway"), get("Holdfast-Conn"));
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let mut cmds = Vec::new(); // (gateway, op, conn, topic, payload)
            if let Some(name) = text.strip_prefix("login ") {
                u2.lock()
                    .unwrap()
                    .insert(name.to_owned(), (gw.clone(), conn.clone()));
                cmds.push((gw.clone(), "subscribe", conn.clone(), "all", String::new()));
                cmds.push((gw, "send", conn, "", format!("welcome {name}")));
            } else if let Some((to, msg)) = text.strip_prefix("to ").and_then(|t| t.split_once(' '))
            {
                let target = u2.lock().unwrap().get(to).cloned();
                match target {
                    Some((tgw, tconn)) => cmds.push((tgw, "send", tconn, "", msg.to_owned())),
                    None => cmds.push((gw, "send", conn, "", format!("no user {to}"))),
                }
            }
            for (gw, op, conn, topic, payload) in cmds {
                let mut hm = async_nats::HeaderMap::new();
                hm.insert("Holdfast-Op", op);
                hm.insert("Holdfast-Conn", conn.as_str());
                if !topic.is_empty() {
                    hm.insert("Holdfast-Topic", topic);
                }
                let subject = format!("holdfast.out.{gw}");
                let _ = n2
                    .publish_with_headers(subject, hm, payload.into_bytes().into())
                    .await;
            }
        }
    });

    let (alice_gw, bob_gw) = (gws[0].clone(), gws[1].clone());
    let result = tokio::task::spawn_blocking(move || {
        let mut alice = connect(&alice_gw.1, &ca);
        let mut bob = connect(&bob_gw.1, &ca);
        send(&mut alice, "login alice");
        send(&mut bob, "login bob");
        println!("alice@{}: {:?}", alice_gw.0, recv(&mut alice));
        println!("bob@{}: {:?}", bob_gw.0, recv(&mut bob));
        let t = Instant::now();
        send(&mut alice, "to bob hello from the other gateway");
        let got = recv(&mut bob);
        println!(
            "bob got {got:?} in {:?} (alice@{} -> NATS -> bob@{})",
            t.elapsed(),
            alice_gw.0,
            bob_gw.0
        );
        (
            alice,
            bob,
            got.as_deref() == Some("hello from the other gateway"),
        )
    })
    .await?;
    let (mut alice, mut bob, relayed) = result;
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.publish("holdfast.topic.all", "broadcast to everyone".into())
        .await?;
    nats.flush().await?;
    let ok = tokio::task::spawn_blocking(move || {
        let a = recv(&mut alice);
        let b = recv(&mut bob);
        println!("broadcast: alice {a:?}, bob {b:?}");
        a.is_some() && a == b
    })
    .await?;
    println!(
        "relay {}, broadcast {}",
        if relayed { "OK" } else { "FAILED" },
        if ok { "OK" } else { "FAILED" }
    );
    std::process::exit(if relayed && ok { 0 } else { 1 })
}
