//! The live progress line of `echo`, `handshake`, `storm` and `fanout`: connections open,
//! the rate of whatever the scenario counts (frames, handshakes, reconnections), and
//! errors, redrawn on stderr five times a second while the run lasts. Nothing is drawn
//! when stderr is not a terminal, so logs and CI output stay clean. (`idle` draws its own
//! line from its children's reports.)
//!
//! The scenario threads only bump relaxed counters in a shared [`Live`]; the drawing
//! happens on a thread of its own, never on a ring thread.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the line is redrawn.
const EVERY: Duration = Duration::from_millis(200);

/// Counters the scenario threads update and the progress line reads.
#[derive(Debug, Default)]
pub struct Live {
    /// Connections open now.
    pub conns: AtomicU64,
    /// Operations done so far (frames, handshakes, reconnections: the scenario says which).
    pub done: AtomicU64,
    /// Errors so far (failed connections, lost connections, bad frames).
    pub errors: AtomicU64,
}

impl Live {
    pub fn opened(&self) {
        self.conns.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.conns.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn did(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// The line being drawn; it is cleared when this is dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing `live` as "`what` …" on stderr when stderr is a terminal; `unit` names
    /// what `done` counts (e.g. "frames").
    pub fn start(what: &'static str, unit: &'static str, live: Arc<Live>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || draw(what, unit, &live, &stop))
        });
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn draw(what: &str, unit: &str, live: &Live, stop: &AtomicBool) {
    let mut last = (Instant::now(), 0u64);
    let mut shown = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(EVERY);
        let now = Instant::now();
        let done = live.done.load(Ordering::Relaxed);
        let rate = rate(done - last.1.min(done), now - last.0);
        last = (now, done);
        eprint!(
            "\r\x1b[2K  {what}: {} connections  {done} {unit} ({rate:.0}/s)  {} errors",
            live.conns.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        );
        let _ = std::io::stderr().flush();
        shown = true;
    }
    if shown {
        eprint!("\r\x1b[2K");
        let _ = std::io::stderr().flush();
    }
}

/// `n` per second over `d` (0 over no time).
fn rate(n: u64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_an_interval() {
        assert_eq!(rate(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(rate(7, Duration::ZERO), 0.0);
    }

    #[test]
    fn counters_move() {
        let live = Arc::new(Live::default());
        let p = Progress::start("test", "ops", live.clone());
        live.opened();
        live.opened();
        live.closed();
        live.did(3);
        live.error();
        drop(p);
        assert_eq!(live.conns.load(Ordering::Relaxed), 1);
        assert_eq!(live.done.load(Ordering::Relaxed), 3);
        assert_eq!(live.errors.load(Ordering::Relaxed), 1);
    }
}
