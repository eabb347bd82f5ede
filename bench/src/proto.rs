//! The line protocol between the `idle` parent and its child processes, over the
//! children's stdin (commands) and stdout (reports). One message per line, a verb and
//! `key=value` words, so a stuck run can be read by eye.
//!
//! parent → child: `open TOTAL` (hold TOTAL connections in all), `echo` (check that every
//! held connection still echoes), `close` (close everything and exit). End of input means
//! `close`.
//! child → parent: `progress COUNTS` while opening, `opened COUNTS` when a step is done,
//! `echoed ok=N failed=N`, `closed`, and `note TEXT` for the first few failures. COUNTS
//! are cumulative over the child's life.
//!
//! Pure formatting and parsing only; the processes and pipes live in `idle`.

use crate::report::Failures;

/// A command from the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Hold this many connections in all (opening the ones not attempted yet).
    Open(u64),
    /// Check that every held connection still echoes.
    Echo,
    /// Close every connection and exit.
    Close,
}

/// A child's cumulative connection counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections that completed the handshake and echoed their first frame.
    pub ok: u64,
    /// Attempts still in progress.
    pub inflight: u64,
    /// Failures by stage.
    pub failures: Failures,
}

impl Counts {
    /// Attempts concluded, successfully or not.
    pub fn concluded(&self) -> u64 {
        self.ok + self.failures.open_failed()
    }

    /// Adds another child's counts to these.
    pub fn add(&mut self, o: &Counts) {
        self.ok += o.ok;
        self.inflight += o.inflight;
        let (f, g) = (&mut self.failures, &o.failures);
        f.connect_failed += g.connect_failed;
        f.handshake_failed += g.handshake_failed;
        f.first_echo_failed += g.first_echo_failed;
        f.timed_out += g.timed_out;
        f.dropped_while_idle += g.dropped_while_idle;
    }

    fn fields(&self) -> [(&'static str, u64); 7] {
        let f = &self.failures;
        [
            ("ok", self.ok),
            ("inflight", self.inflight),
            ("connect_failed", f.connect_failed),
            ("handshake_failed", f.handshake_failed),
            ("first_echo_failed", f.first_echo_failed),
            ("timed_out", f.timed_out),
            ("dropped", f.dropped_while_idle),
        ]
    }

    fn set(&mut self, key: &str, v: u64) -> Result<(), String> {
        let f = &mut self.failures;
        *match key {
            "ok" => &mut self.ok,
            "inflight" => &mut self.inflight,
            "connect_failed" => &mut f.connect_failed,
            "handshake_failed" => &mut f.handshake_failed,
            "first_echo_failed" => &mut f.first_echo_failed,
            "timed_out" => &mut f.timed_out,
            "dropped" => &mut f.dropped_while_idle,
            _ => return Err(format!("unknown count {key:?}")),
        } = v;
        Ok(())
    }
}

/// A report from a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Counts so far, while a step is opening.
    Progress(Counts),
    /// Every attempt of the step concluded.
    Opened(Counts),
    /// The final echo check finished.
    Echoed {
        /// Connections that echoed their frame intact.
        ok: u64,
        /// Connections opened successfully that did not.
        failed: u64,
    },
    /// Everything closed; the child exits next.
    Closed,
    /// A human-readable note about a failure.
    Note(String),
}

impl Command {
    /// The command as one line, without the newline.
    pub fn to_line(self) -> String {
        match self {
            Command::Open(n) => format!("open {n}"),
            Command::Echo => "echo".into(),
            Command::Close => "close".into(),
        }
    }

    /// Parses one line.
    pub fn parse(line: &str) -> Result<Command, String> {
        let mut words = line.split_whitespace();
        let cmd = match (words.next(), words.next()) {
            (Some("open"), Some(n)) => {
                Command::Open(n.parse().map_err(|e| format!("open {n:?}: {e}"))?)
            }
            (Some("echo"), None) => Command::Echo,
            (Some("close"), None) => Command::Close,
            _ => return Err(format!("unknown command {line:?}")),
        };
        match words.next() {
            None => Ok(cmd),
            Some(_) => Err(format!("trailing words in {line:?}")),
        }
    }
}

fn format_counts(verb: &str, c: &Counts) -> String {
    let mut s = verb.to_string();
    for (k, v) in c.fields() {
        s.push_str(&format!(" {k}={v}"));
    }
    s
}

fn parse_pairs<'a>(words: impl Iterator<Item = &'a str>) -> Result<Vec<(&'a str, u64)>, String> {
    words
        .map(|w| {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("{w:?} is not key=value"))?;
            let v = v.parse().map_err(|e| format!("{w:?}: {e}"))?;
            Ok((k, v))
        })
        .collect()
}

fn parse_counts<'a>(words: impl Iterator<Item = &'a str>) -> Result<Counts, String> {
    let mut c = Counts::default();
    for (k, v) in parse_pairs(words)? {
        c.set(k, v)?;
    }
    Ok(c)
}

impl Report {
    /// The report as one line, without the newline. A note's text has its line breaks
    /// replaced so it stays one line.
    pub fn to_line(&self) -> String {
        match self {
            Report::Progress(c) => format_counts("progress", c),
            Report::Opened(c) => format_counts("opened", c),
            Report::Echoed { ok, failed } => format!("echoed ok={ok} failed={failed}"),
            Report::Closed => "closed".into(),
            Report::Note(text) => format!("note {}", text.replace(['\n', '\r'], " ")),
        }
    }

    /// Parses one line.
    pub fn parse(line: &str) -> Result<Report, String> {
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let words = rest.split_whitespace();
        Ok(match verb {
            "progress" => Report::Progress(parse_counts(words)?),
            "opened" => Report::Opened(parse_counts(words)?),
            "echoed" => {
                let (mut ok, mut failed) = (None, None);
                for (k, v) in parse_pairs(words)? {
                    match k {
                        "ok" => ok = Some(v),
                        "failed" => failed = Some(v),
                        _ => return Err(format!("unknown field {k:?} in {line:?}")),
                    }
                }
                match (ok, failed) {
                    (Some(ok), Some(failed)) => Report::Echoed { ok, failed },
                    _ => return Err(format!("incomplete {line:?}")),
                }
            }
            "closed" if rest.is_empty() => Report::Closed,
            "note" => Report::Note(rest.to_string()),
            _ => return Err(format!("unknown report {line:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Open(0),
            Command::Open(9000),
            Command::Echo,
            Command::Close,
        ] {
            assert_eq!(Command::parse(&c.to_line()), Ok(c));
        }
        assert_eq!(
            Command::parse("open 12\n".trim_end()),
            Ok(Command::Open(12))
        );
        for bad in ["", "open", "open x", "open 1 2", "echo now", "dance"] {
            assert!(Command::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reports_round_trip() {
        let counts = Counts {
            ok: 8990,
            inflight: 3,
            failures: Failures {
                connect_failed: 1,
                handshake_failed: 2,
                first_echo_failed: 3,
                timed_out: 4,
                dropped_while_idle: 5,
            },
        };
        let cases = [
            Report::Progress(counts.clone()),
            Report::Opened(Counts::default()),
            Report::Opened(counts),
            Report::Echoed { ok: 7, failed: 1 },
            Report::Closed,
            Report::Note("tls: invalid peer certificate: UnknownIssuer".into()),
        ];
        for r in cases {
            assert_eq!(
                Report::parse(&r.to_line()),
                Ok(r.clone()),
                "{}",
                r.to_line()
            );
        }
    }

    #[test]
    fn report_lines_are_stable() {
        let c = Counts {
            ok: 5,
            ..Counts::default()
        };
        assert_eq!(
            Report::Opened(c).to_line(),
            "opened ok=5 inflight=0 connect_failed=0 handshake_failed=0 \
             first_echo_failed=0 timed_out=0 dropped=0"
        );
        assert_eq!(Report::Note("a\nb".into()).to_line(), "note a b");
    }

    #[test]
    fn bad_reports() {
        for bad in [
            "",
            "opened ok",
            "opened ok=x",
            "opened nope=1",
            "echoed ok=1",
            "echoed ok=1 failed=2 extra=3",
            "closed now",
            "hello",
        ] {
            assert!(Report::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn counts_add_up() {
        let mut total = Counts::default();
        let one = Counts {
            ok: 2,
            inflight: 1,
            failures: Failures {
                connect_failed: 1,
                timed_out: 1,
                ..Failures::default()
            },
        };
        total.add(&one);
        total.add(&one);
        assert_eq!(total.ok, 4);
        assert_eq!(total.failures.connect_failed, 2);
        assert_eq!(total.concluded(), 6);
    }
}
