//! The JSON shape of cluster events, shared by the CLI's `--json` and the HTTP API: one object
//! per event, stable field names, absent fields left out; blocks numbered from 1 as people count
//! them (the line stays the stable reference).

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use kowalski_exo_common::proto::{
    ClusterEvent, ExecStatus, OutputStream, SkipKind, cluster_event::Event,
};
use serde::Serialize;

/// The last line of a command that could not do its job.
#[derive(Serialize, Debug, PartialEq)]
pub struct ErrorLine {
    /// Always `error`.
    pub event: &'static str,
    /// invalid_request, no_node, infrastructure or block_failed.
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

/// The lower-case status name used in JSON lines, e.g. `nonzero_exit`.
pub fn status_name(status: ExecStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("EXEC_STATUS_")
        .to_ascii_lowercase()
}

/// The JSON name of a skip kind.
pub fn skip_name(kind: SkipKind) -> &'static str {
    match kind {
        SkipKind::NoLanguage => "no_language",
        SkipKind::NoNode => "no_node",
        SkipKind::Invalid => "invalid",
        SkipKind::NotRun => "not_run",
        SkipKind::Unspecified => "other",
    }
}

/// One event as `exec --json` and `run --json` print it. Field names are stable; absent
/// fields are left out.
#[derive(Serialize, Debug, Default, PartialEq)]
pub struct EventLine {
    /// queued, placed, output, retrying, session_moved, finished, skipped (or error, see
    /// [`ErrorLine`]).
    pub event: &'static str,
    /// The session the execution ran in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<&'static str>,
    /// Output as text (invalid UTF-8 replaced); see `data_base64` for the exact bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The exact output bytes, only when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_ms: Option<f64>,
    /// Why a block was skipped: no_language, no_node, invalid or not_run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip: Option<&'static str>,
    /// session_moved: the node the session left (empty when that node had forgotten it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// session_moved: the node it lives on now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// session_moved: executions replayed there, whose output is not shown again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<u32>,
    /// session_moved: what could not be brought back: replayed executions that did not succeed
    /// again ("execution N: STATUS (last error line)"), or why none were kept; absent when
    /// everything was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_failures: Option<Vec<String>>,
    /// finished, in a session: the interpreter started afresh; what it held is gone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_lost: Option<bool>,
}

fn stream_name(stream: OutputStream) -> &'static str {
    match stream {
        OutputStream::Stderr => "stderr",
        _ => "stdout",
    }
}

impl EventLine {
    /// The line for an event; `with_block` for RunBlocks streams.
    pub fn from_event(event: &ClusterEvent, with_block: bool) -> Option<EventLine> {
        let base = EventLine {
            block: with_block.then_some(event.block + 1),
            ..Default::default()
        };
        Some(match event.event.as_ref()? {
            Event::Queued(q) => EventLine {
                event: "queued",
                line: (q.line > 0).then_some(q.line),
                ..base
            },
            Event::Placed(p) => EventLine {
                event: "placed",
                node: Some(p.node_name.clone()),
                node_id: Some(p.node_id.clone()),
                attempt: Some(p.attempt),
                ..base
            },
            Event::Output(o) => {
                let chunk = o.chunk.as_ref()?;
                let (data, data_base64) = match std::str::from_utf8(&chunk.data) {
                    Ok(text) => (text.to_string(), None),
                    Err(_) => (
                        String::from_utf8_lossy(&chunk.data).into_owned(),
                        Some(BASE64.encode(&chunk.data)),
                    ),
                };
                EventLine {
                    event: "output",
                    attempt: Some(o.attempt),
                    stream: Some(stream_name(chunk.stream())),
                    data: Some(data),
                    data_base64,
                    ..base
                }
            }
            Event::Retrying(r) => EventLine {
                event: "retrying",
                node: Some(r.node_name.clone()),
                node_id: Some(r.node_id.clone()),
                attempt: Some(r.attempt),
                reason: Some(r.reason.clone()),
                ..base
            },
            Event::Finished(f) => {
                let result = f.result.as_ref();
                EventLine {
                    event: "finished",
                    node: (!f.node_name.is_empty()).then(|| f.node_name.clone()),
                    node_id: (!f.node_id.is_empty()).then(|| f.node_id.clone()),
                    attempt: (f.attempt > 0).then_some(f.attempt),
                    exit_code: result.and_then(|r| r.exit_code),
                    signal: result.and_then(|r| r.signal),
                    status: Some(match result {
                        Some(r) => status_name(r.status()),
                        None => "failed".to_string(),
                    }),
                    reason: match result {
                        Some(r) if !r.message.is_empty() => Some(r.message.clone()),
                        None => Some(f.error.clone()),
                        _ => None,
                    },
                    wall_ms: result.map(|r| r.wall_micros as f64 / 1000.0),
                    state_lost: result.and_then(|r| r.state_lost.then_some(true)),
                    ..base
                }
            }
            Event::SessionMoved(m) => EventLine {
                event: "session_moved",
                session: Some(m.session.clone()),
                from: Some(m.from_node.clone()),
                to: Some(m.to_node.clone()),
                replayed: Some(m.executions_replayed),
                replay_failures: (!m.replay_failures.is_empty()).then(|| m.replay_failures.clone()),
                ..base
            },
            Event::Skipped(s) => EventLine {
                event: "skipped",
                line: Some(s.line),
                reason: Some(s.reason.clone()),
                skip: Some(skip_name(s.kind())),
                ..base
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use kowalski_exo_common::proto::{BlockSkipped, Queued, SessionMoved};

    use super::*;

    #[test]
    fn names_are_lower_case_and_blocks_count_from_one() {
        assert_eq!(status_name(ExecStatus::NonzeroExit), "nonzero_exit");
        let queued = ClusterEvent {
            block: 0,
            event: Some(Event::Queued(Queued { line: 7 })),
        };
        let line = EventLine::from_event(&queued, true).unwrap();
        assert_eq!((line.block, line.line), (Some(1), Some(7)));
        let skipped = ClusterEvent {
            block: 2,
            event: Some(Event::Skipped(BlockSkipped {
                line: 9,
                kind: SkipKind::NotRun as i32,
                ..Default::default()
            })),
        };
        let line = EventLine::from_event(&skipped, true).unwrap();
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"event":"skipped","block":3,"line":9,"reason":"","skip":"not_run"}"#
        );
    }

    #[test]
    fn a_session_move_lists_the_replays_that_failed_only_when_some_did() {
        let moved = |failures: &[&str]| ClusterEvent {
            block: 0,
            event: Some(Event::SessionMoved(SessionMoved {
                session: "nb".into(),
                from_node: "a".into(),
                to_node: "b".into(),
                executions_replayed: 3,
                replay_failures: failures.iter().map(|f| f.to_string()).collect(),
            })),
        };
        let line = |event| serde_json::to_string(&EventLine::from_event(&event, false)).unwrap();
        assert_eq!(
            line(moved(&[])),
            r#"{"event":"session_moved","session":"nb","from":"a","to":"b","replayed":3}"#
        );
        assert_eq!(
            line(moved(&["execution 2: nonzero_exit (KeyError: 'x')"])),
            r#"{"event":"session_moved","session":"nb","from":"a","to":"b","replayed":3,"replay_failures":["execution 2: nonzero_exit (KeyError: 'x')"]}"#
        );
    }
}
