//! The last few Recursive Language Model runs, kept for the dashboard: each run's question and
//! model, and its events as `coordinator ask --json` prints them (the root model's text as it
//! streamed is kept whole, not as deltas), from which the dashboard renders the trajectory tree.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use kowalski_exo_common::proto::{AskEvent, ask_event};

use crate::cli::ask::AskLine;

/// Runs kept.
const KEPT: usize = 10;
/// Events kept of one run; a run past them keeps its first ones and its end.
const EVENTS_KEPT: usize = 2000;

/// One run as kept.
#[derive(Clone, Debug)]
pub struct RecentRun {
    pub id: u64,
    pub model: String,
    pub question: String,
    /// Milliseconds since the Unix epoch.
    pub started_ms: u64,
    pub events: Vec<AskLine>,
    pub finished: bool,
}

/// The runs, newest last; shared by the loop's callers and the dashboard.
#[derive(Clone, Default)]
pub struct RecentRuns {
    runs: Arc<Mutex<VecDeque<RecentRun>>>,
    next: Arc<Mutex<u64>>,
}

impl RecentRuns {
    /// Starts keeping a run; returns its id.
    pub fn begin(&self, model: &str, question: &str) -> u64 {
        let id = {
            let mut next = self.next.lock().expect("run ids poisoned");
            *next += 1;
            *next
        };
        let started_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut runs = self.runs.lock().expect("recent runs poisoned");
        if runs.len() == KEPT {
            runs.pop_front();
        }
        runs.push_back(RecentRun {
            id,
            model: model.to_string(),
            question: question.to_string(),
            started_ms,
            events: Vec::new(),
            finished: false,
        });
        id
    }

    /// Keeps an event of run `id`.
    pub fn record(&self, id: u64, event: &AskEvent) {
        let Some(line) = AskLine::from_event(event) else {
            return;
        };
        let finished = matches!(event.event, Some(ask_event::Event::Finished(_)));
        let mut runs = self.runs.lock().expect("recent runs poisoned");
        let Some(run) = runs.iter_mut().find(|r| r.id == id) else {
            return;
        };
        run.finished |= finished;
        // Deltas of one turn are kept as one.
        if let (Some(last), Some(text)) = (run.events.last_mut(), &line.text)
            && last.event == "delta"
            && line.event == "delta"
        {
            last.text.get_or_insert_default().push_str(text);
            return;
        }
        if run.events.len() < EVENTS_KEPT || finished {
            run.events.push(line);
        }
    }

    /// The runs kept, newest first.
    pub fn list(&self) -> Vec<RecentRun> {
        let runs = self.runs.lock().expect("recent runs poisoned");
        runs.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use kowalski_exo_common::proto::{AskFinished, GenerateDelta};

    use super::*;

    fn delta(text: &str) -> AskEvent {
        AskEvent {
            event: Some(ask_event::Event::Delta(GenerateDelta { text: text.into() })),
        }
    }

    #[test]
    fn the_last_runs_are_kept_with_their_text_whole() {
        let recent = RecentRuns::default();
        let first = recent.begin("m", "q0");
        recent.record(first, &delta("Hel"));
        recent.record(first, &delta("lo"));
        recent.record(
            first,
            &AskEvent {
                event: Some(ask_event::Event::Finished(AskFinished::default())),
            },
        );
        for i in 1..=KEPT {
            recent.begin("m", &format!("q{i}"));
        }
        let runs = recent.list();
        assert_eq!(runs.len(), KEPT);
        assert_eq!(runs[0].question, format!("q{KEPT}"));
        assert!(runs.iter().all(|r| r.id != first), "the oldest is dropped");
        let kept = RecentRuns::default();
        let id = kept.begin("m", "q");
        kept.record(id, &delta("Hel"));
        kept.record(id, &delta("lo"));
        let run = &kept.list()[0];
        assert_eq!(run.events.len(), 1);
        assert_eq!(run.events[0].text.as_deref(), Some("Hello"));
        assert!(!run.finished);
    }
}
