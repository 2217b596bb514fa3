//! Following a stream of cluster events to its end: what `exec` and `run` print, and the exit
//! status they come to.
//!
//! For people, program output goes to stdout and stderr raw. On a terminal (or with `--stream`)
//! it streams as it comes and a lost attempt is marked where it stops; otherwise each attempt's
//! output is held until that attempt finishes, so a script reading stdout sees the output of
//! the attempt that counts, once, and never a lost attempt's. With `--json` every event is a
//! line of its own, tagged with its attempt.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, Write},
};

use kowalski_exo_common::proto::{
    ClusterEvent, ClusterFinished, OutputStream, SkipKind, cluster_event::Event,
};
use tonic::Streaming;

use super::{
    EXIT_INFRASTRUCTURE, EXIT_NO_NODE, EXIT_USAGE, Failure, PREFIX, exit_status, print_json,
};
use crate::json_events::{EventLine, status_name};

/// How to show a stream.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    pub json: bool,
    /// A RunBlocks stream (blocks are announced and numbered).
    pub blocks: bool,
    /// Write output as it comes rather than once its attempt finished.
    pub stream: bool,
    /// The session the code runs in, named in JSON lines.
    pub session: Option<String>,
}

/// Output chunks in the order they came, each with its stream.
type HeldOutput = Vec<(OutputStream, Vec<u8>)>;

/// The first block that did not finish ok.
#[derive(Debug)]
struct BlockFailure {
    block: u32,
    line: u32,
    status: u8,
    code: &'static str,
    what: String,
}

/// Prints events as they come and remembers what the run came to.
pub struct Follower<O: Write, E: Write> {
    options: FollowOptions,
    out: O,
    err: E,
    /// Output held per (block, attempt) until the attempt finishes.
    held: BTreeMap<(u32, u32), HeldOutput>,
    lines: BTreeMap<u32, u32>,
    /// Blocks queued and not yet finished: any left when the stream ends were lost.
    open: BTreeSet<u32>,
    failure: Option<BlockFailure>,
    not_run: Vec<u32>,
    /// Exit status of the first finished run that was not ok (Execute).
    exit: Option<u8>,
    ran: bool,
    finished_blocks: u32,
}

/// The last line of `run --json` when every block that ran finished ok (it has no `block`).
#[derive(serde::Serialize)]
struct DocumentLine {
    event: &'static str,
    status: &'static str,
    blocks_run: u32,
}

impl<O: Write, E: Write> Follower<O, E> {
    pub fn new(options: FollowOptions, out: O, err: E) -> Self {
        Follower {
            options,
            out,
            err,
            held: BTreeMap::new(),
            lines: BTreeMap::new(),
            open: BTreeSet::new(),
            failure: None,
            not_run: Vec::new(),
            exit: None,
            ran: false,
            finished_blocks: 0,
        }
    }

    /// "block 2 (line 7)" for RunBlocks; empty for Execute.
    fn block_name(&self, block: u32) -> String {
        if !self.options.blocks {
            return String::new();
        }
        match self.lines.get(&block) {
            Some(line) => format!("block {} (line {line})", block + 1),
            None => format!("block {}", block + 1),
        }
    }

    pub fn event(&mut self, event: &ClusterEvent) -> io::Result<()> {
        let Some(inner) = &event.event else {
            return Ok(());
        };
        let block = event.block;
        if self.options.json
            && let Some(mut line) = EventLine::from_event(event, self.options.blocks)
        {
            line.session = line.session.or_else(|| self.options.session.clone());
            print_json(&line);
        }
        match inner {
            Event::Queued(q) => {
                self.open.insert(block);
                self.ran = true;
                if q.line > 0 {
                    self.lines.insert(block, q.line);
                }
            }
            Event::Placed(p) if !self.options.json && (self.options.blocks || p.attempt > 1) => {
                let name = self.block_name(block);
                let name = if name.is_empty() { "run".into() } else { name };
                writeln!(
                    self.err,
                    "── {name} on {} (attempt {}) ──",
                    p.node_name, p.attempt
                )?;
            }
            Event::Output(o) if !self.options.json => {
                if let Some(chunk) = &o.chunk {
                    if self.options.stream {
                        self.write_output(chunk.stream(), &chunk.data)?;
                    } else {
                        self.held
                            .entry((block, o.attempt))
                            .or_default()
                            .push((chunk.stream(), chunk.data.clone()));
                    }
                }
            }
            Event::Retrying(r) => {
                let dropped = self.held.remove(&(block, r.attempt));
                if !self.options.json {
                    let whereabouts = if self.options.stream {
                        "lost here"
                    } else if dropped.is_some() {
                        "lost, and its output dropped"
                    } else {
                        "lost"
                    };
                    writeln!(
                        self.err,
                        "{PREFIX} attempt {} on {} was {whereabouts} ({}); retrying on another node",
                        r.attempt, r.node_name, r.reason
                    )?;
                }
            }
            Event::SessionMoved(m) if !self.options.json => {
                let from = match m.from_node.as_str() {
                    "" => String::new(),
                    from => format!(" from {from}"),
                };
                let failed = match m.replay_failures.as_slice() {
                    [] => String::new(),
                    failures => format!(
                        "; the session's state there may differ: {}",
                        failures.join("; ")
                    ),
                };
                writeln!(
                    self.err,
                    "{PREFIX} session {} moved{from} to {}: {} executions replayed there{failed}",
                    m.session, m.to_node, m.executions_replayed
                )?;
            }
            Event::Finished(f) => {
                self.open.remove(&block);
                self.finished_blocks += 1;
                self.finished(block, f)?;
            }
            Event::Skipped(s) => {
                self.lines.insert(block, s.line);
                let kind = s.kind();
                if kind == SkipKind::NotRun {
                    self.not_run.push(block);
                } else if !self.options.json {
                    writeln!(
                        self.err,
                        "── {} skipped: {} ──",
                        self.block_name(block),
                        s.reason
                    )?;
                }
                let (status, code, what) = match kind {
                    SkipKind::NoNode => (EXIT_NO_NODE, "no_node", "cannot run on any node"),
                    SkipKind::Invalid => (EXIT_USAGE, "invalid_request", "is invalid"),
                    _ => return Ok(()),
                };
                self.record_failure(block, status, code, format!("{what}: {}", s.reason));
            }
            _ => {}
        }
        Ok(())
    }

    fn write_output(&mut self, stream: OutputStream, data: &[u8]) -> io::Result<()> {
        match stream {
            OutputStream::Stderr => self.err.write_all(data),
            _ => {
                self.out.write_all(data)?;
                self.out.flush()
            }
        }
    }

    fn finished(&mut self, block: u32, f: &ClusterFinished) -> io::Result<()> {
        // Only the attempt that finished counts; anything still held belongs to lost ones.
        let held: Vec<(u32, u32)> = self
            .held
            .range((block, 0)..=(block, u32::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in held {
            if let Some(chunks) = self.held.remove(&key)
                && key.1 == f.attempt
                && f.result.is_some()
            {
                for (stream, data) in chunks {
                    self.write_output(stream, &data)?;
                }
            }
        }
        let (status, what) = match &f.result {
            Some(result) => {
                let status = exit_status(result);
                let what = match (result.exit_code, result.signal) {
                    (Some(code), _) if status != 0 && status == code.clamp(0, 255) as u8 => {
                        format!("exited with {code}")
                    }
                    (None, Some(signal)) if status == (128 + signal).clamp(0, 255) as u8 => {
                        format!("was killed by signal {signal}")
                    }
                    _ => status_name(result.status()).replace('_', " "),
                };
                if !self.options.json && !result.message.is_empty() {
                    writeln!(self.err, "{PREFIX} {} on {}", result.message, f.node_name)?;
                }
                (status, what)
            }
            None => {
                // In a document the first failure is told in the closing message.
                if !self.options.json && (!self.options.blocks || self.failure.is_some()) {
                    writeln!(self.err, "{PREFIX} {}: {}", self.block_name(block), f.error)?;
                }
                (
                    EXIT_INFRASTRUCTURE,
                    format!("could not finish: {}", f.error),
                )
            }
        };
        if status != 0 {
            self.exit.get_or_insert(status);
            self.record_failure(block, status, "block_failed", what);
        }
        Ok(())
    }

    fn record_failure(&mut self, block: u32, status: u8, code: &'static str, what: String) {
        if self.failure.is_none() {
            self.failure = Some(BlockFailure {
                block,
                line: self.lines.get(&block).copied().unwrap_or(0),
                status,
                code,
                what,
            });
        }
    }

    /// What the run came to once the stream ended.
    pub fn end(mut self) -> Result<u8, Failure> {
        let _ = self.out.flush();
        if let Some(block) = self.open.first() {
            let what = if self.options.blocks {
                format!("before {} finished", self.block_name(*block))
            } else {
                "before the run finished".into()
            };
            return Err(Failure::infrastructure(format!(
                "the coordinator ended the stream {what}"
            )));
        }
        if !self.options.blocks {
            return match (self.exit, self.ran) {
                (Some(status), _) => Ok(status),
                (None, true) => Ok(0),
                (None, false) => Err(Failure::infrastructure(
                    "the coordinator ended the stream without a result",
                )),
            };
        }
        let Some(failure) = self.failure.take() else {
            if !self.ran {
                return Err(Failure::usage(
                    "the document has no code block to run: no fenced block names a language (```python, ```bash, ...)",
                ));
            }
            if self.options.json {
                print_json(&DocumentLine {
                    event: "finished",
                    status: "ok",
                    blocks_run: self.finished_blocks,
                });
            }
            return Ok(0);
        };
        let mut message = format!(
            "block {} (line {}) {}",
            failure.block + 1,
            failure.line,
            failure.what
        );
        if !self.not_run.is_empty() {
            let blocks: Vec<String> = self.not_run.iter().map(|b| (b + 1).to_string()).collect();
            let (noun, verb) = if blocks.len() == 1 {
                ("block", "runs it")
            } else {
                ("blocks", "runs them")
            };
            message.push_str(&format!(
                "; {noun} {} not run (--keep-going {verb})",
                blocks.join(", ")
            ));
        }
        Err(Failure {
            status: failure.status,
            code: failure.code,
            message,
            block: Some((failure.block + 1, failure.line)),
        })
    }
}

/// Follows `stream` from the coordinator at `addr` to its end.
pub async fn follow(
    mut stream: Streaming<ClusterEvent>,
    options: FollowOptions,
    addr: &str,
) -> Result<u8, Failure> {
    let mut follower = Follower::new(options, io::stdout(), io::stderr());
    loop {
        match stream.message().await {
            Ok(Some(event)) => follower
                .event(&event)
                .map_err(|e| Failure::infrastructure(format!("cannot write output: {e}")))?,
            Ok(None) => return follower.end(),
            Err(status) => return Err(Failure::from_status(status, addr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use kowalski_exo_common::proto::{
        AttemptOutput, BlockSkipped, ExecFinished, ExecStatus, OutputChunk, Placed, Queued,
        Retrying,
    };

    use super::*;

    fn event(block: u32, event: Event) -> ClusterEvent {
        ClusterEvent {
            block,
            event: Some(event),
        }
    }

    fn output(block: u32, attempt: u32, text: &str) -> ClusterEvent {
        event(
            block,
            Event::Output(AttemptOutput {
                attempt,
                chunk: Some(OutputChunk {
                    data: text.as_bytes().to_vec(),
                    ..Default::default()
                }),
            }),
        )
    }

    fn finished(block: u32, attempt: u32, exit_code: i32) -> ClusterEvent {
        let status = if exit_code == 0 {
            ExecStatus::Ok
        } else {
            ExecStatus::NonzeroExit
        };
        event(
            block,
            Event::Finished(ClusterFinished {
                result: Some(ExecFinished {
                    status: status as i32,
                    exit_code: Some(exit_code),
                    ..Default::default()
                }),
                node_name: "b".into(),
                attempt,
                ..Default::default()
            }),
        )
    }

    fn retrying(attempt: u32) -> ClusterEvent {
        event(
            0,
            Event::Retrying(Retrying {
                attempt,
                node_name: "a".into(),
                reason: "the connection to the node was lost".into(),
                ..Default::default()
            }),
        )
    }

    fn queued(block: u32, line: u32) -> ClusterEvent {
        event(block, Event::Queued(Queued { line }))
    }

    fn placed(attempt: u32) -> ClusterEvent {
        event(
            0,
            Event::Placed(Placed {
                attempt,
                node_name: "a".into(),
                ..Default::default()
            }),
        )
    }

    /// Feeds the events; returns stdout, stderr and the outcome.
    fn show(
        options: FollowOptions,
        events: &[ClusterEvent],
    ) -> (String, String, Result<u8, Failure>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut follower = Follower::new(options, &mut out, &mut err);
        for e in events {
            follower.event(e).unwrap();
        }
        let outcome = follower.end();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
            outcome,
        )
    }

    const HELD: FollowOptions = FollowOptions {
        json: false,
        blocks: false,
        stream: false,
        session: None,
    };

    fn failover() -> Vec<ClusterEvent> {
        vec![
            queued(0, 0),
            placed(1),
            output(0, 1, "started\n"),
            retrying(1),
            placed(2),
            output(0, 2, "started\n"),
            output(0, 2, "done\n"),
            finished(0, 2, 0),
        ]
    }

    #[test]
    fn off_a_terminal_only_the_finished_attempts_output_is_written() {
        let (out, err, outcome) = show(HELD, &failover());
        assert_eq!(out, "started\ndone\n");
        assert!(
            err.contains("attempt 1 on a was lost, and its output dropped"),
            "{err}"
        );
        assert_eq!(outcome, Ok(0));
    }

    #[test]
    fn streaming_writes_as_it_comes_and_marks_where_the_lost_attempt_stopped() {
        let options = FollowOptions {
            stream: true,
            ..HELD
        };
        let (out, err, _) = show(options, &failover());
        assert_eq!(out, "started\nstarted\ndone\n");
        assert!(err.contains("attempt 1 on a was lost here"), "{err}");
    }

    #[test]
    fn a_failed_block_names_itself_and_the_blocks_not_run() {
        let options = FollowOptions {
            blocks: true,
            ..HELD
        };
        let skipped = |block, line| {
            event(
                block,
                Event::Skipped(BlockSkipped {
                    line,
                    reason: "not run".into(),
                    kind: SkipKind::NotRun as i32,
                    ..Default::default()
                }),
            )
        };
        let events = [
            queued(0, 3),
            finished(0, 1, 0),
            queued(1, 7),
            output(1, 1, "oops\n"),
            finished(1, 1, 5),
            skipped(2, 11),
            skipped(3, 15),
        ];
        let (out, _, outcome) = show(options, &events);
        assert_eq!(out, "oops\n");
        let failure = outcome.unwrap_err();
        assert_eq!(failure.status, 5);
        assert_eq!(failure.code, "block_failed");
        assert_eq!(failure.block, Some((2, 7)));
        assert_eq!(
            failure.message,
            "block 2 (line 7) exited with 5; blocks 3, 4 not run (--keep-going runs them)"
        );
    }

    #[test]
    fn a_block_no_node_can_run_exits_3() {
        let options = FollowOptions {
            blocks: true,
            ..HELD
        };
        let events = [event(
            0,
            Event::Skipped(BlockSkipped {
                line: 4,
                reason: "no node is called 'nas'".into(),
                no_node: true,
                kind: SkipKind::NoNode as i32,
            }),
        )];
        let (_, err, outcome) = show(options, &events);
        assert!(
            err.contains("── block 1 (line 4) skipped: no node is called 'nas' ──"),
            "{err}"
        );
        let failure = outcome.unwrap_err();
        assert_eq!((failure.status, failure.code), (3, "no_node"));
    }

    #[test]
    fn a_document_with_nothing_to_run_says_so() {
        let options = FollowOptions {
            blocks: true,
            ..HELD
        };
        let failure = show(options, &[]).2.unwrap_err();
        assert_eq!(failure.status, 2);
        assert!(
            failure.message.contains("no code block to run"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_stream_that_ends_mid_run_is_an_infrastructure_failure() {
        let (_, _, outcome) = show(HELD, &[queued(0, 0), placed(1)]);
        assert_eq!(outcome.unwrap_err().status, 4);
    }
}
