//! `holdfast-bench nats-echo` (hidden): the echo backend of `scripts/nats-relay-bench.sh`.
//! It subscribes to the NATS bridge's client events (`holdfast.in.>` by default; subjects
//! and headers in `docs/nats.md`) and answers every `frame` event with a `send` command to
//! the same connection on `holdfast.out.<Holdfast-Gateway>`, payload and text flag
//! unchanged, so `holdfast-bench echo` can measure a gateway → bridge → NATS → backend →
//! NATS → bridge → gateway round trip. It exits after `--max-secs`.

use std::time::Duration;

use anyhow::Context;
use async_nats::HeaderMap;
use clap::Args;
use futures_util::StreamExt;
use tokio::time::{timeout_at, Instant};

/// Arguments of `holdfast-bench nats-echo`.
#[derive(Debug, Args)]
pub struct NatsEchoArgs {
    /// NATS server URL.
    #[arg(long, value_name = "URL")]
    pub nats: String,
    /// Subject of the bridges' client events.
    #[arg(long, default_value = "holdfast.in.>")]
    pub subject: String,
    /// Commands go to `<PREFIX>.<gateway>`.
    #[arg(long, value_name = "PREFIX", default_value = "holdfast.out")]
    pub commands_prefix: String,
    /// Seconds after which the backend exits.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub max_secs: f64,
}

/// The `send` command answering one `frame` event: (subject, headers), or None when the
/// event is not a frame or lacks its gateway or connection.
pub fn answer(
    prefix: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Option<(String, Vec<(&'static str, String)>)> {
    if get("Holdfast-Kind").as_deref() != Some("frame") {
        return None;
    }
    let gateway = get("Holdfast-Gateway")?;
    let conn = get("Holdfast-Conn")?;
    let mut headers = vec![("Holdfast-Op", "send".to_string()), ("Holdfast-Conn", conn)];
    if get("Holdfast-Text").as_deref() == Some("true") {
        headers.push(("Holdfast-Text", "true".to_string()));
    }
    Some((format!("{prefix}.{gateway}"), headers))
}

/// Runs the backend until `--max-secs` have passed or NATS closes the subscription.
pub fn run(args: NatsEchoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_secs > 0.0 && args.max_secs.is_finite(),
        "--max-secs must be positive"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let nats = async_nats::ConnectOptions::new()
            .name("holdfast-bench-nats-echo")
            .connection_timeout(Duration::from_secs(5))
            .connect(&args.nats)
            .await
            .with_context(|| format!("connecting to NATS at {}", args.nats))?;
        let mut events = nats
            .subscribe(args.subject.clone())
            .await
            .context("subscribing to the events")?;
        nats.flush().await.context("NATS flush")?;
        println!("nats-echo: ready on {}", args.subject);
        let end = Instant::now() + Duration::from_secs_f64(args.max_secs);
        let mut answered = 0u64;
        while let Ok(Some(msg)) = timeout_at(end, events.next()).await {
            let h = msg.headers.clone().unwrap_or_default();
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
            let Some((subject, headers)) = answer(&args.commands_prefix, get) else {
                continue;
            };
            let mut hm = HeaderMap::new();
            for (k, v) in headers {
                hm.insert(k, v.as_str());
            }
            nats.publish_with_headers(subject, hm, msg.payload)
                .await
                .context("publishing a send command")?;
            answered += 1;
        }
        let _ = nats.flush().await;
        eprintln!("nats-echo: answered {answered} frame(s)");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_frames_only() {
        let frame = |k: &str| {
            match k {
                "Holdfast-Kind" => Some("frame"),
                "Holdfast-Gateway" => Some("gw1"),
                "Holdfast-Conn" => Some("0100000000000007"),
                "Holdfast-Text" => Some("true"),
                _ => None,
            }
            .map(String::from)
        };
        let (subject, headers) = answer("holdfast.out", frame).unwrap();
        assert_eq!(subject, "holdfast.out.gw1");
        assert_eq!(headers[0], ("Holdfast-Op", "send".to_string()));
        assert_eq!(
            headers[1],
            ("Holdfast-Conn", "0100000000000007".to_string())
        );
        assert_eq!(headers[2], ("Holdfast-Text", "true".to_string()));
        let open = |k: &str| (k == "Holdfast-Kind").then(|| "open".to_string());
        assert!(answer("holdfast.out", open).is_none());
    }
}
