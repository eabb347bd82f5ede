//! A custom routing worker on the async SDK, in a few dozen lines. Each client line is a
//! command:
//!
//! - `join TOPIC` subscribes the connection to TOPIC,
//! - `leave TOPIC` unsubscribes it,
//! - `say TOPIC TEXT` publishes TEXT to every subscriber of TOPIC (on every core),
//! - anything else is echoed back.
//!
//! Run it, then point a gateway at it:
//!
//! ```text
//! cargo run -p holdfast-worker --example custom_router -- /tmp/router.sock
//! holdfast run --listen 127.0.0.1:8443 --cert cert.pem --key key.pem --worker /tmp/router.sock
//! ```

use holdfast_worker::async_link::{AsyncLink, AsyncWorkerListener};
use holdfast_worker::{Event, LinkError};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/router.sock".into());
    let listener = AsyncWorkerListener::bind(&socket)?.with_name("custom-router");
    println!("custom_router: listening on {socket}");
    loop {
        // One link per gateway core; each gets its own task.
        let link = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(link).await {
                eprintln!("custom_router: link dropped: {e}");
            }
        });
    }
}

async fn serve(mut link: AsyncLink) -> Result<(), LinkError> {
    while let Some(event) = link.recv().await? {
        if let Event::Frame {
            conn,
            text,
            payload,
            ..
        } = &event
        {
            let line = String::from_utf8_lossy(payload);
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("join"), Some(topic), None) => link.subscribe(*conn, topic.as_bytes()),
                (Some("leave"), Some(topic), None) => link.unsubscribe(*conn, topic.as_bytes()),
                (Some("say"), Some(topic), Some(msg)) => {
                    link.publish(topic.as_bytes(), *text, msg.as_bytes())
                }
                _ => link.send(*conn, *text, payload),
            }
        }
        // Handled: acknowledge it. Replies and ACKs are queued and leave in one write
        // when `recv` runs out of buffered input.
        link.ack(event.link_seq());
    }
    Ok(())
}
