//! The reference echo worker: every client frame goes back to the same connection.
//!
//! It shows the shape a fast worker takes: handle everything one read brought in, then
//! acknowledge once, cumulatively, and write once. It keeps no per-connection state, so it
//! never drops duplicates; a re-sent frame is echoed again.

use crate::{Event, Link, LinkError};

/// What one link carried, for the log line when it ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// OPEN events.
    pub opens: u64,
    /// FRAME events echoed.
    pub frames: u64,
    /// CLOSE events.
    pub closes: u64,
    /// ACK envelopes sent.
    pub acks: u64,
}

/// Serves one link until the gateway closes it (`Ok`) or it fails.
///
/// ```no_run
/// let listener = holdfast_worker::WorkerListener::bind("/tmp/echo.sock")?;
/// let mut link = listener.accept()?;
/// let stats = holdfast_worker::echo::serve(&mut link)?;
/// println!("echoed {} frames", stats.frames);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn serve(link: &mut Link) -> Result<Stats, LinkError> {
    let mut stats = Stats::default();
    let mut acked = 0;
    while let Some(first) = link.recv()? {
        let mut highest = handle(link, first, &mut stats);
        while let Some(event) = link.try_recv()? {
            highest = highest.max(handle(link, event, &mut stats));
        }
        if highest > acked {
            link.ack(highest);
            acked = highest;
            stats.acks += 1;
        }
        link.flush()?;
    }
    Ok(stats)
}

fn handle(link: &mut Link, event: Event, stats: &mut Stats) -> u64 {
    let link_seq = event.link_seq();
    match event {
        Event::Open { .. } => stats.opens += 1,
        Event::Frame {
            conn,
            text,
            payload,
            ..
        } => {
            link.send(conn, text, &payload);
            stats.frames += 1;
        }
        Event::Close { .. } => stats.closes += 1,
    }
    link_seq
}
