//! What a run hears of its session between its own steps (each sub-call answered, the session
//! moving to another node), passed on as trajectory events under the turn and block they came
//! in, and counted in the run's totals.

use kowalski_exo_common::proto::{AskFailover, AskSubcall, ask_event};
use tokio::sync::mpsc;

use super::{AskSender, Totals, send};
use crate::sessions::RunNote;

/// The run's end of its session's notes.
pub struct Notes(pub mpsc::UnboundedReceiver<RunNote>);

impl Notes {
    /// Passes on every note that came in, as heard during `block` of `turn` (0: between blocks).
    pub async fn pass_on(
        &mut self,
        turn: u32,
        block: u32,
        totals: &mut Totals,
        events: &AskSender,
    ) -> Result<(), String> {
        while let Ok(note) = self.0.try_recv() {
            let event = match note {
                RunNote::Subcall(note) => {
                    totals.subcalls += 1;
                    totals.subcall_tokens += note.tokens;
                    ask_event::Event::Subcall(AskSubcall {
                        turn,
                        block,
                        node: note.node,
                        model: note.model,
                        wall_ms: note.wall_ms,
                        cached: note.cached,
                        error: note.error,
                        tokens: note.tokens,
                        child: note.child,
                        iterations: note.iterations,
                        subcalls: note.subcalls,
                    })
                }
                RunNote::Moved(moved) => ask_event::Event::Failover(AskFailover {
                    turn,
                    what: "session".to_string(),
                    from_node: moved.from_node,
                    to_node: moved.to_node,
                    reason: match moved.replay_failures.as_slice() {
                        [] => String::new(),
                        failures => format!(
                            "replays that did not succeed again: {}",
                            failures.join("; ")
                        ),
                    },
                    executions_replayed: moved.executions_replayed,
                }),
            };
            send(events, event).await?;
        }
        Ok(())
    }
}
