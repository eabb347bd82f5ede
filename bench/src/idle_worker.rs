//! One child process of an idle run: opens its share of the connections when told,
//! holds them idle, checks that each still echoes, and closes them, reporting over the
//! line protocol of `proto` on stdout.
//!
//! Children exist because each process is held to the machine's open-file limit; a child
//! is the parent's binary re-executed with a hidden subcommand. A child never decides
//! when to measure: it only says when its connections are up. Every wait is bounded, and
//! the end of stdin (the parent died or gave up) closes everything and exits, so no
//! child outlives its run.
//!
//! The connections live on one io_uring [`Engine`] driven by the [`Worker`] scenario, so
//! a held connection costs the child little more than its TLS state: no task, no stack,
//! no receive buffer (receives come from the engine's shared buffer ring), and a few
//! bytes of bookkeeping here. The parent's commands are read by a small thread of their
//! own and handed over through a channel that the scenario polls between completions;
//! the ring thread never blocks on stdin. Commands are carried out one at a time, in
//! order, as the parent sends them: each waits for the previous one's report.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use holdfast_wire::frame::FrameType;
use rustls::ClientConfig;

use crate::client::{self, Failure, Stage};
use crate::plan;
use crate::proto::{Command, Counts, Report};
use crate::scenario;
use crate::uring::{ConnId, Engine, EngineConfig, Event, Scenario, Tick};

/// Handshakes a child keeps in flight at most: when the gateway slows down, the opening
/// timetable slips instead of piling up attempts that would all run into the timeout.
const MAX_INFLIGHT: u64 = 1024;
/// Final echoes a child keeps in flight at most, so the check is a ramp, not one burst.
const MAX_ECHOES: u64 = 1024;
/// Failure notes a child sends at most; the counts carry the rest.
const MAX_NOTES: u64 = 5;
/// How often a child reports progress while opening.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often the ring thread looks for the parent's next command while it waits for one.
const COMMAND_POLL: Duration = Duration::from_millis(5);
/// The longest a child waits, after `close`, for its close_notify sends and the kernel
/// to finish with its connections before it drops what is left.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// The child's ring. Idle connections need few operations and no buffers; a smaller ring
/// and buffer pool than the engine's default keeps the child's fixed memory out of its
/// per-connection figure. A batch that finds the buffer pool dry only re-arms its
/// receives: nothing is lost.
const ENGINE: EngineConfig = EngineConfig {
    ring_entries: 1024,
    recv_buffers: 512,
    recv_buffer_size: 4096,
};

/// Arguments of the hidden `idle-worker` subcommand; the parent fills them in.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Gateway address.
    #[arg(long)]
    pub target: String,
    /// CA certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// TLS server name.
    #[arg(long)]
    pub server_name: String,
    /// Payload bytes of each DATA frame.
    #[arg(long)]
    pub frame_size: usize,
    /// Connections this child opens per second.
    #[arg(long)]
    pub rate: f64,
    /// Source addresses (see `idle --sources`); none: let the kernel choose.
    #[arg(long)]
    pub sources: Option<String>,
    /// This child's index, 0-based.
    #[arg(long)]
    pub child: u64,
    /// Number of children.
    #[arg(long)]
    pub procs: u64,
    /// Seconds each connection may take to connect, handshake and echo, and to echo at
    /// the end.
    #[arg(long)]
    pub timeout: f64,
}

/// Writes one report line to stdout. The parent reads these lines; nothing else in a
/// child may write to stdout.
fn say(report: &Report) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // The parent reads until our stdout closes; if it is gone, stdin ends too and the
    // child closes everything and exits, so a failed write needs no handling of its own.
    let _ = writeln!(out, "{}", report.to_line());
    let _ = out.flush();
}

/// What the command thread hands the ring thread: a command, or why there is none.
type Input = Result<Command, String>;

/// Reads the parent's commands from stdin, one per line, until `close`, an unreadable
/// line or the end of input (which means `close`). Runs on a thread of its own so the
/// ring never waits on the pipe.
fn read_commands(tx: Sender<Input>) {
    for line in std::io::stdin().lock().lines() {
        let input = match line {
            Ok(line) => Command::parse(&line),
            Err(e) => Err(format!("reading commands: {e}")),
        };
        let last = !matches!(input, Ok(Command::Open(_) | Command::Echo));
        // A send fails only once the ring thread has finished: nobody is listening.
        if tx.send(input).is_err() || last {
            return;
        }
    }
    let _ = tx.send(Ok(Command::Close));
}

/// Where one connection of the child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Connecting, handshaking, or waiting for its first echo.
    Opening,
    /// Echoed its first frame; idle.
    Held,
    /// Waiting for the echo of the final check.
    Echoing,
    /// Passed the final check; idle again.
    Echoed,
    /// Failed, dropped by the gateway, or closed by us.
    Gone,
}

/// One connection the child made: 12 bytes, all the child keeps of it besides the
/// engine's own state and its entry in [`Worker::by_id`].
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: ConnId,
    life: Life,
}

/// What the child is doing about the parent's latest command.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the next command.
    Waiting,
    /// Opening connections until `until` have been attempted in all, this step's `k`-th
    /// (counted from `first`) due at `start + plan::due(k, rate)`.
    Opening {
        start: Instant,
        first: u64,
        until: u64,
    },
    /// The final echo check, given up on at `give_up` should it not finish by then.
    Echoing { give_up: Instant },
    /// Every connection was told to close: the engine sends their close_notify once the
    /// scenario is done.
    Closed,
}

/// The child's scenario: every connection it made, its counts, and the command at hand.
struct Worker {
    config: Arc<ClientConfig>,
    sources: Vec<IpAddr>,
    child: u64,
    procs: u64,
    rate: f64,
    frame_size: usize,
    timeout: Duration,
    commands: Receiver<Input>,
    phase: Phase,
    /// Every connection made, indexed by its number within the child (which also picks
    /// its payloads and its source address).
    conns: Vec<Slot>,
    /// The number of each connection the engine may still report on.
    by_id: HashMap<ConnId, u32>,
    /// Cumulative counts, as reported to the parent; `inflight` counts the connections in
    /// [`Life::Opening`].
    counts: Counts,
    /// Connections that passed the final check.
    echo_ok: u64,
    /// Final echoes in flight.
    echoes: u64,
    /// The next connection the final check asks to echo.
    next_echo: usize,
    next_progress: Instant,
    notes: u64,
    /// Why the child stopped early, if it did.
    error: Option<String>,
}

impl Worker {
    /// Sends a failure note to the parent: the first of each distinct text, and never
    /// more than a few.
    fn note(&mut self, text: impl FnOnce() -> String) {
        if self.notes >= MAX_NOTES {
            return;
        }
        let text = text();
        if crate::why::first_of_its_kind(&text) {
            self.notes += 1;
            say(&Report::Note(text));
        }
    }

    /// Counts an attempt that never became a held connection, by stage.
    fn open_failed(&mut self, f: &Failure) {
        let failures = &mut self.counts.failures;
        *match f.stage {
            Stage::Connect => &mut failures.connect_failed,
            Stage::Handshake => &mut failures.handshake_failed,
            Stage::Echo => &mut failures.first_echo_failed,
        } += 1;
        if f.timed_out {
            failures.timed_out += 1;
        }
        self.note(|| f.to_string());
    }

    /// The payload of connection `n`'s frame in `round` (0: the first echo, 1: the final
    /// check). Computed again when the echo comes back rather than kept per connection.
    fn payload(&self, n: u32, round: u64) -> Vec<u8> {
        client::payload(self.frame_size, n.into(), round)
    }

    /// Carries out `command`, or starts to; the phase says what is left to do.
    fn begin(&mut self, engine: &mut Engine, command: Command, now: Instant) {
        match command {
            Command::Open(total) => {
                let first = self.conns.len() as u64;
                let until = total.max(first);
                let more = (until - first) as usize;
                self.conns.reserve_exact(more);
                self.by_id.reserve(more);
                self.next_progress = now + PROGRESS_EVERY;
                self.phase = Phase::Opening {
                    start: now,
                    first,
                    until,
                };
            }
            Command::Echo => {
                self.next_echo = 0;
                // Each echo is bounded by the timeout once started, and MAX_ECHOES run at
                // a time, so the check ends by itself; this bound only backs that up.
                let rounds = (self.conns.len() as u64).div_ceil(MAX_ECHOES) + 1;
                let give_up = now + self.timeout * rounds as u32 + Duration::from_secs(5);
                self.phase = Phase::Echoing { give_up };
            }
            Command::Close => {
                for slot in &mut self.conns {
                    if slot.life != Life::Gone {
                        engine.close(slot.id);
                        slot.life = Life::Gone;
                    }
                }
                // What the engine still says about a closed connection is of no interest.
                self.by_id = HashMap::new();
                self.phase = Phase::Closed;
            }
        }
    }

    /// Takes the parent's next command if there is one; otherwise looks again soon.
    fn wait_command(&mut self, engine: &mut Engine, now: Instant) -> Option<Tick> {
        match self.commands.try_recv() {
            Ok(Ok(command)) => self.begin(engine, command, now),
            Ok(Err(e)) => {
                self.error = Some(e);
                return Some(Tick::Done);
            }
            Err(TryRecvError::Empty) => return Some(Tick::At(now + COMMAND_POLL)),
            // The command thread only ends after `close` or an error, both taken above;
            // should it be gone anyway, nobody can tell the child what to do any more.
            Err(TryRecvError::Disconnected) => self.begin(engine, Command::Close, now),
        }
        None
    }

    /// Starts the connections that are due (as far as the in-flight cap allows), reports
    /// progress, and reports the step once every attempt of it has concluded.
    fn open(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        start: Instant,
        first: u64,
        until: u64,
    ) -> Option<Tick> {
        let mut next_due = None;
        while (self.conns.len() as u64) < until && self.counts.inflight < MAX_INFLIGHT {
            let n = self.conns.len() as u64;
            let due = start + plan::due(n - first, self.rate);
            if due > now {
                next_due = Some(due);
                break;
            }
            self.connect(engine, n, now);
        }
        if now >= self.next_progress {
            say(&Report::Progress(self.counts.clone()));
            self.next_progress = now + PROGRESS_EVERY;
        }
        // Every attempt is in flight or concluded, so this is every attempt of the step
        // made and concluded.
        if self.counts.concluded() == until {
            say(&Report::Opened(self.counts.clone()));
            self.phase = Phase::Waiting;
            return None;
        }
        // With the cap reached, the next start waits for an attempt to conclude, which
        // comes with a completion and so a tick of its own.
        let wake = next_due.map_or(self.next_progress, |d| d.min(self.next_progress));
        Some(Tick::At(wake))
    }

    /// Starts connection `n`: connected, handshaken and echoed within the timeout.
    fn connect(&mut self, engine: &mut Engine, n: u64, now: Instant) {
        let source = (!self.sources.is_empty()).then(|| {
            self.sources[plan::source_index(self.sources.len(), self.child, self.procs, n)]
        });
        let id = engine.connect(&self.config, source, now + self.timeout);
        self.conns.push(Slot {
            id,
            life: Life::Opening,
        });
        // `n` is below the share of one child, which the open-file limit keeps far below
        // u32::MAX.
        self.by_id.insert(id, n as u32);
        self.counts.inflight += 1;
    }

    /// Asks the held connections to echo, MAX_ECHOES at a time, and reports once each
    /// has answered or gone.
    fn echo(&mut self, engine: &mut Engine, now: Instant, give_up: Instant) -> Option<Tick> {
        while self.echoes < MAX_ECHOES && self.next_echo < self.conns.len() && now < give_up {
            let n = self.next_echo;
            self.next_echo += 1;
            if self.conns[n].life != Life::Held {
                continue;
            }
            let id = self.conns[n].id;
            self.conns[n].life = Life::Echoing;
            self.echoes += 1;
            engine.set_deadline(id, Some(now + self.timeout));
            // A held connection is established and open in the engine (its end would have
            // come as an event), so the send is queued; should the TLS layer refuse it,
            // the engine ends the connection and that event concludes the echo.
            engine.send(id, FrameType::Data, &self.payload(n as u32, 1));
        }
        let finished = self.next_echo == self.conns.len() && self.echoes == 0;
        if !finished && now < give_up {
            return Some(Tick::At(give_up));
        }
        let ok = self.echo_ok;
        say(&Report::Echoed {
            ok,
            failed: self.counts.ok - ok.min(self.counts.ok),
        });
        self.phase = Phase::Waiting;
        None
    }

    /// A connection still opening did something.
    fn opening_event(&mut self, engine: &mut Engine, id: ConnId, n: u32, event: Event) {
        let failure = match event {
            Event::Established(_) => {
                // Should the send be refused, the engine ends the connection and says so.
                engine.send(id, FrameType::Data, &self.payload(n, 0));
                return;
            }
            Event::Data(p) if p == self.payload(n, 0) => {
                engine.set_deadline(id, None);
                self.conns[n as usize].life = Life::Held;
                self.counts.inflight -= 1;
                self.counts.ok += 1;
                return;
            }
            Event::Data(p) => {
                engine.abort(id);
                echo_differs(self.frame_size, p.len())
            }
            Event::Failed(f) => f,
            Event::Ended(why) => Failure {
                stage: Stage::Echo,
                timed_out: false,
                error: why,
            },
        };
        self.counts.inflight -= 1;
        self.open_failed(&failure);
        self.gone(id, n);
    }

    /// A connection of the final check did something.
    fn echoing_event(&mut self, engine: &mut Engine, id: ConnId, n: u32, event: Event) {
        let failure = match event {
            Event::Data(p) if p == self.payload(n, 1) => {
                engine.set_deadline(id, None);
                self.conns[n as usize].life = Life::Echoed;
                self.echoes -= 1;
                self.echo_ok += 1;
                return;
            }
            Event::Data(p) => {
                engine.abort(id);
                echo_differs(self.frame_size, p.len())
            }
            // Not sent by an established connection; nothing to do.
            Event::Established(_) => return,
            Event::Failed(f) => f,
            Event::Ended(why) => Failure {
                stage: Stage::Echo,
                timed_out: false,
                error: why,
            },
        };
        self.echoes -= 1;
        self.note(|| format!("final {failure}"));
        self.gone(id, n);
    }

    /// An idle connection did something: whatever it was, the connection is lost.
    fn idle_event(&mut self, engine: &mut Engine, id: ConnId, n: u32, event: Event) {
        let why = match event {
            Event::Data(p) => {
                engine.abort(id);
                format!("unexpected DATA of {} bytes", p.len())
            }
            // Not sent by an established connection; nothing to do.
            Event::Established(_) => return,
            Event::Failed(f) => f.to_string(),
            Event::Ended(why) => why,
        };
        self.counts.failures.dropped_while_idle += 1;
        self.note(|| format!("dropped while idle: {why}"));
        self.gone(id, n);
    }

    /// Forgets a connection the engine has closed (or was just told to abort).
    fn gone(&mut self, id: ConnId, n: u32) {
        self.conns[n as usize].life = Life::Gone;
        self.by_id.remove(&id);
    }
}

/// The failure of an echo that came back different.
fn echo_differs(sent: usize, got: usize) -> Failure {
    Failure {
        stage: Stage::Echo,
        timed_out: false,
        error: format!("echo differs: sent {sent} bytes, got {got} bytes"),
    }
}

impl Scenario for Worker {
    fn tick(&mut self, engine: &mut Engine, now: Instant) -> Tick {
        // A phase that finishes hands over to the next at once (a step's report, then
        // the next command), so each arm either returns or has changed the phase.
        loop {
            let tick = match self.phase {
                Phase::Waiting => self.wait_command(engine, now),
                Phase::Opening {
                    start,
                    first,
                    until,
                } => self.open(engine, now, start, first, until),
                Phase::Echoing { give_up } => self.echo(engine, now, give_up),
                Phase::Closed => Some(Tick::Done),
            };
            if let Some(tick) = tick {
                return tick;
            }
        }
    }

    fn event(&mut self, engine: &mut Engine, id: ConnId, event: Event, _now: Instant) {
        let Some(&n) = self.by_id.get(&id) else {
            return;
        };
        match self.conns[n as usize].life {
            Life::Opening => self.opening_event(engine, id, n, event),
            Life::Echoing => self.echoing_event(engine, id, n, event),
            Life::Held | Life::Echoed => self.idle_event(engine, id, n, event),
            // Gone connections are no longer in `by_id`.
            Life::Gone => {}
        }
    }
}

/// Runs a child until its parent says `close` or its stdin ends.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    scenario::ensure_positive("--rate", args.rate)?;
    scenario::ensure_positive("--timeout", args.timeout)?;
    crate::sys::raise_nofile_limit().context("raising the open-file limit")?;
    let config = client::client_config(&args.ca)?;
    let target = client::resolve(&args.target)?;
    let sources: Vec<IpAddr> = match &args.sources {
        Some(spec) => plan::parse_sources(spec).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let mut engine = Engine::new(target, &args.server_name, ENGINE)?;
    let (tx, commands) = mpsc::channel();
    std::thread::Builder::new()
        .name("commands".into())
        .spawn(move || read_commands(tx))
        .context("starting the command reader")?;
    let now = Instant::now();
    let mut worker = Worker {
        config,
        sources,
        child: args.child,
        procs: args.procs,
        rate: args.rate,
        frame_size: args.frame_size,
        timeout: Duration::from_secs_f64(args.timeout),
        commands,
        phase: Phase::Waiting,
        conns: Vec::new(),
        by_id: HashMap::new(),
        counts: Counts::default(),
        echo_ok: 0,
        echoes: 0,
        next_echo: 0,
        next_progress: now,
        notes: 0,
        error: None,
    };
    engine
        .run(&mut worker, CLOSE_GRACE)
        .context("driving the client ring")?;
    if let Some(e) = worker.error {
        bail!(e);
    }
    say(&Report::Closed);
    Ok(())
}
