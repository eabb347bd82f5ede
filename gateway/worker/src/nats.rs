//! `holdfast-worker nats`: a stateless bridge between one gateway and NATS. Subjects and
//! headers are specified in `docs/nats.md`.
//!
//! - Every OPEN, FRAME and CLOSE from the gateway is published to the inbound subject with
//!   `Holdfast-*` headers. A batch is acknowledged to the gateway only after NATS has
//!   *processed* it: after the batch the bridge publishes a token to its own inbox and
//!   waits for it to come back, and a NATS server handles one connection's messages in
//!   order. If that fails (NATS down), nothing is acknowledged and the batch is published
//!   again until it goes through (at-least-once; `(conn, seq)` identifies duplicates).
//! - Commands on the gateway's command subject (queue group: one bridge of the gateway
//!   takes each) become SEND, CLOSE, SUBSCRIBE, UNSUBSCRIBE or PUBLISH on a link, the
//!   owning core's link when this bridge has it.
//! - Topic messages (`<topic prefix>.<topic>`, queue group per gateway: one bridge of each
//!   gateway takes each) become one PUBLISH to the gateway, which fans it out to every core.
//! - A gateway notice (CLOSE with link_seq 0, "unknown connection") is published as a
//!   `close` event with `Holdfast-Notice: true`, so the backend learns its command found
//!   no connection.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::{HeaderMap, Message};
use futures_util::StreamExt;
use holdfast_wire::ConnId;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, warn};

use crate::async_link::{AsyncLink, AsyncWorkerListener};
use crate::Event;

/// Header names.
pub mod header {
    /// The gateway's name (`--gateway`).
    pub const GATEWAY: &str = "Holdfast-Gateway";
    /// A connection id, 16 hex digits.
    pub const CONN: &str = "Holdfast-Conn";
    /// Per-connection sequence (OPEN 0, frames 1.., CLOSE last + 1; notices 0).
    pub const SEQ: &str = "Holdfast-Seq";
    /// `open`, `frame` or `close`.
    pub const KIND: &str = "Holdfast-Kind";
    /// `true` for a WebSocket text message.
    pub const TEXT: &str = "Holdfast-Text";
    /// Client address (open).
    pub const PEER: &str = "Holdfast-Peer";
    /// TLS server name (open).
    pub const SNI: &str = "Holdfast-Sni";
    /// ALPN protocol (open).
    pub const ALPN: &str = "Holdfast-Alpn";
    /// Close code (close).
    pub const CODE: &str = "Holdfast-Code";
    /// Close reason (close).
    pub const REASON: &str = "Holdfast-Reason";
    /// `true` on a close that answers a command for an unknown connection.
    pub const NOTICE: &str = "Holdfast-Notice";
    /// Command: `send`, `close`, `subscribe`, `unsubscribe` or `publish`.
    pub const OP: &str = "Holdfast-Op";
    /// Command topic.
    pub const TOPIC: &str = "Holdfast-Topic";
}

/// What the bridge is told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Unix socket the gateway dials.
    pub socket: PathBuf,
    /// The socket's mode and the gateway credentials a link must have.
    pub access: crate::SocketAccess,
    /// NATS server URL.
    pub nats: String,
    /// The gateway's name, in headers and default subjects.
    pub gateway: String,
    /// Where client events go (default `holdfast.in.<gateway>`).
    pub subject: String,
    /// Where commands for this gateway come from (default `holdfast.out.<gateway>`).
    pub commands: String,
    /// Topic subjects are `<topic_prefix>.<topic>` (default `holdfast.topic`).
    pub topic_prefix: String,
    /// HELLO and NATS client name.
    pub name: String,
}

/// A command for the gateway.
#[derive(Debug)]
enum Cmd {
    Send {
        conn: ConnId,
        text: bool,
        payload: Vec<u8>,
    },
    Close {
        conn: ConnId,
        code: u16,
        reason: String,
    },
    Subscribe {
        conn: ConnId,
        topic: Vec<u8>,
    },
    Unsubscribe {
        conn: ConnId,
        topic: Vec<u8>,
    },
    Publish {
        topic: Vec<u8>,
        text: bool,
        payload: Vec<u8>,
    },
}

impl Cmd {
    fn conn(&self) -> Option<ConnId> {
        match self {
            Cmd::Send { conn, .. }
            | Cmd::Close { conn, .. }
            | Cmd::Subscribe { conn, .. }
            | Cmd::Unsubscribe { conn, .. } => Some(*conn),
            Cmd::Publish { .. } => None,
        }
    }
}

/// The live links of this bridge: id → (gateway core, command queue).
type Links = Arc<Mutex<HashMap<u64, (u8, mpsc::Sender<Cmd>)>>>;

/// The most events published as one batch (and so held unacknowledged by one link).
const MAX_BATCH: usize = 4096;
/// How long one publish-and-confirm round may take before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before publishing a failed batch again.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// Runs the bridge until the process is killed. Prints
/// `holdfast-worker: listening on PATH` on stdout once NATS is connected and the
/// subscriptions are in place.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let client = async_nats::ConnectOptions::new()
        .name(&opts.name)
        .connection_timeout(Duration::from_secs(5))
        .connect(&opts.nats)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", opts.nats))?;
    let links: Links = Arc::default();

    let group = format!("holdfast-bridge.{}", opts.gateway);
    let mut commands = client
        .queue_subscribe(opts.commands.clone(), group.clone())
        .await
        .context("cannot subscribe to the command subject")?;
    let mut topics = client
        .queue_subscribe(format!("{}.>", opts.topic_prefix), group)
        .await
        .context("cannot subscribe to the topic subjects")?;
    client.flush().await.context("NATS flush")?;

    let listener = AsyncWorkerListener::bind_with(&opts.socket, opts.access)
        .with_context(|| format!("cannot listen on {}", opts.socket.display()))?
        .with_name(&opts.name);
    println!("holdfast-worker: listening on {}", opts.socket.display());
    info!(socket = %opts.socket.display(), nats = %opts.nats, gateway = %opts.gateway,
          subject = %opts.subject, commands = %opts.commands, "NATS bridge listening");

    let opts = Arc::new(opts);
    {
        let (links, client, opts) = (links.clone(), client.clone(), opts.clone());
        tokio::spawn(async move {
            while let Some(msg) = commands.next().await {
                match parse_command(&msg) {
                    Ok(cmd) => route(&links, &client, &opts, cmd).await,
                    Err(e) => warn!(subject = %msg.subject, error = %e, "bad command dropped"),
                }
            }
        });
    }
    {
        let (links, client, opts) = (links.clone(), client.clone(), opts.clone());
        let prefix = format!("{}.", opts.topic_prefix);
        tokio::spawn(async move {
            while let Some(msg) = topics.next().await {
                let Some(topic) = msg.subject.as_str().strip_prefix(&prefix) else {
                    continue;
                };
                let cmd = Cmd::Publish {
                    topic: topic.as_bytes().to_vec(),
                    text: header_is_true(&msg, header::TEXT),
                    payload: msg.payload.to_vec(),
                };
                route(&links, &client, &opts, cmd).await;
            }
        });
    }

    let mut next_id = 0u64;
    loop {
        let link = match listener.accept().await {
            Ok(link) => link,
            Err(e) => {
                warn!(error = %e, "accepting a gateway link failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let (links, client, opts) = (links.clone(), client.clone(), opts.clone());
        tokio::spawn(async move {
            let result = serve_link(id, link, &links, &client, &opts).await;
            links.lock().expect("links lock").remove(&id);
            match result {
                Ok(()) => info!(link = id, "gateway closed the link"),
                Err(e) => warn!(link = id, error = %e, "link dropped"),
            }
        });
    }
}

/// Hands a command to the link of its connection's core, or any link; with none, tells
/// the backend.
async fn route(links: &Links, client: &async_nats::Client, opts: &Options, cmd: Cmd) {
    let conn = cmd.conn();
    let tx = {
        let links = links.lock().expect("links lock");
        let own = conn.and_then(|c| links.values().find(|(core, _)| *core == c.core()));
        own.or_else(|| links.values().next())
            .map(|(_, tx)| tx.clone())
    };
    let delivered = match tx {
        Some(tx) => tx.send(cmd).await.is_ok(),
        None => false,
    };
    if !delivered {
        warn!(?conn, "no gateway link up; command not delivered");
        if let Some(conn) = conn {
            let mut h = base_headers(opts, conn, 0, "close");
            h.insert(header::CODE, "1013");
            h.insert(header::REASON, "no gateway link");
            h.insert(header::NOTICE, "true");
            let _ = client
                .publish_with_headers(opts.subject.clone(), h, Vec::new().into())
                .await;
        }
    }
}

async fn serve_link(
    id: u64,
    mut link: AsyncLink,
    links: &Links,
    client: &async_nats::Client,
    opts: &Options,
) -> anyhow::Result<()> {
    let core = link.hello().await?.core;
    let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
    links.lock().expect("links lock").insert(id, (core, tx));
    info!(link = id, core, "gateway link up");

    let inbox = client.new_inbox();
    let mut barrier = client.subscribe(inbox.clone()).await?;
    let mut token = 0u64;
    let mut pending: Vec<Event> = Vec::new();
    let mut next_try = Instant::now();
    loop {
        tokio::select! {
            biased;
            cmd = rx.recv() => {
                if let Some(cmd) = cmd {
                    apply(&mut link, cmd);
                    while let Ok(cmd) = rx.try_recv() {
                        apply(&mut link, cmd);
                    }
                }
            }
            event = link.recv(), if pending.len() < MAX_BATCH => {
                match event? {
                    Some(event) => {
                        pending.push(event);
                        while pending.len() < MAX_BATCH {
                            match link.try_recv()? {
                                Some(event) => pending.push(event),
                                None => break,
                            }
                        }
                    }
                    None => return Ok(()),
                }
            }
            _ = sleep_until(next_try), if !pending.is_empty() => {}
        }
        if !pending.is_empty() && Instant::now() >= next_try {
            token += 1;
            let round = publish_and_confirm(client, opts, &pending, &inbox, &mut barrier, token);
            match timeout(CONFIRM_TIMEOUT, round).await {
                Ok(Ok(())) => {
                    let last = pending.iter().map(Event::link_seq).max().unwrap_or(0);
                    if last > 0 {
                        link.ack(last);
                    }
                    debug!(link = id, events = pending.len(), last, "batch confirmed");
                    pending.clear();
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    warn!(link = id, events = pending.len(), error = %why,
                          "NATS did not confirm the batch; publishing it again");
                    next_try = Instant::now() + RETRY_DELAY;
                }
            }
        }
        link.flush().await?;
    }
}

fn apply(link: &mut AsyncLink, cmd: Cmd) {
    match cmd {
        Cmd::Send {
            conn,
            text,
            payload,
        } => link.send(conn, text, &payload),
        Cmd::Close { conn, code, reason } => link.close(conn, code, &reason),
        Cmd::Subscribe { conn, topic } => link.subscribe(conn, &topic),
        Cmd::Unsubscribe { conn, topic } => link.unsubscribe(conn, &topic),
        Cmd::Publish {
            topic,
            text,
            payload,
        } => link.publish(&topic, text, &payload),
    }
}

/// Publishes the batch, then a token to our own inbox, and waits for the token: once it
/// is back, the server has processed every message before it.
async fn publish_and_confirm(
    client: &async_nats::Client,
    opts: &Options,
    events: &[Event],
    inbox: &str,
    barrier: &mut async_nats::Subscriber,
    token: u64,
) -> anyhow::Result<()> {
    for event in events {
        let (headers, payload) = event_message(opts, event);
        client
            .publish_with_headers(opts.subject.clone(), headers, payload.into())
            .await?;
    }
    let want = token.to_string();
    client
        .publish(inbox.to_owned(), want.clone().into_bytes().into())
        .await?;
    client.flush().await?;
    while let Some(msg) = barrier.next().await {
        if msg.payload.as_ref() == want.as_bytes() {
            return Ok(());
        }
    }
    anyhow::bail!("the NATS client shut down")
}

fn base_headers(opts: &Options, conn: ConnId, seq: u64, kind: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::GATEWAY, opts.gateway.as_str());
    h.insert(header::CONN, format!("{:016x}", conn.raw()).as_str());
    h.insert(header::SEQ, seq.to_string().as_str());
    h.insert(header::KIND, kind);
    h
}

/// Header values must be one line of printable text.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn event_message(opts: &Options, event: &Event) -> (HeaderMap, Vec<u8>) {
    match event {
        Event::Open {
            conn,
            peer,
            sni,
            alpn,
            ..
        } => {
            let mut h = base_headers(opts, *conn, 0, "open");
            h.insert(header::PEER, peer.to_string().as_str());
            if let Some(sni) = sni {
                h.insert(header::SNI, clean(sni).as_str());
            }
            if let Some(alpn) = alpn {
                h.insert(header::ALPN, clean(&String::from_utf8_lossy(alpn)).as_str());
            }
            (h, Vec::new())
        }
        Event::Frame {
            conn,
            seq,
            text,
            payload,
            ..
        } => {
            let mut h = base_headers(opts, *conn, *seq, "frame");
            h.insert(header::TEXT, if *text { "true" } else { "false" });
            (h, payload.clone())
        }
        Event::Close {
            conn,
            seq,
            link_seq,
            code,
            reason,
        } => {
            let mut h = base_headers(opts, *conn, *seq, "close");
            h.insert(header::CODE, code.to_string().as_str());
            h.insert(header::REASON, clean(reason).as_str());
            if *link_seq == 0 {
                h.insert(header::NOTICE, "true");
            }
            (h, Vec::new())
        }
    }
}

fn header_str<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

fn header_is_true(msg: &Message, name: &str) -> bool {
    matches!(header_str(msg, name), Some("true" | "1"))
}

/// Parses a 16-hex-digit connection id (an optional `0x` is allowed).
pub fn parse_conn(s: &str) -> Option<ConnId> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(s, 16).ok().map(ConnId::from_raw)
}

fn parse_command(msg: &Message) -> anyhow::Result<Cmd> {
    let op = header_str(msg, header::OP).context("no Holdfast-Op header")?;
    let conn = || {
        let s = header_str(msg, header::CONN).context("no Holdfast-Conn header")?;
        parse_conn(s).with_context(|| format!("bad Holdfast-Conn {s:?}"))
    };
    let topic = || {
        header_str(msg, header::TOPIC)
            .map(|t| t.as_bytes().to_vec())
            .context("no Holdfast-Topic header")
    };
    let text = header_is_true(msg, header::TEXT);
    Ok(match op {
        "send" => Cmd::Send {
            conn: conn()?,
            text,
            payload: msg.payload.to_vec(),
        },
        "close" => Cmd::Close {
            conn: conn()?,
            code: match header_str(msg, header::CODE) {
                Some(c) => c.trim().parse().context("bad Holdfast-Code")?,
                None => 1000,
            },
            reason: header_str(msg, header::REASON).unwrap_or("").to_owned(),
        },
        "subscribe" => Cmd::Subscribe {
            conn: conn()?,
            topic: topic()?,
        },
        "unsubscribe" => Cmd::Unsubscribe {
            conn: conn()?,
            topic: topic()?,
        },
        "publish" => Cmd::Publish {
            topic: topic()?,
            text,
            payload: msg.payload.to_vec(),
        },
        other => anyhow::bail!("unknown Holdfast-Op {other:?}"),
    })
}
