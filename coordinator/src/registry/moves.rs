//! The last pieces of work the cluster moved off a node that failed them (a run, an answer, a
//! session's execution): what moved, from which node to which, and why; for the dashboard.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// Moves kept, the newest first.
pub const KEPT: usize = 20;

/// One piece of work moved to another node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Move {
    /// When the work was placed on its new node, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What moved: `python run`, `answer of MODEL`, `session NAME`.
    pub work: String,
    /// The node that failed it, by name.
    pub from: String,
    /// The node it moved to, by name.
    pub to: String,
    /// Why it left `from`.
    pub reason: String,
}

/// The recent moves, shared by everything that places work.
#[derive(Clone, Debug, Default)]
pub struct RecentMoves {
    moves: Arc<Mutex<VecDeque<Move>>>,
}

impl RecentMoves {
    /// Records that `work`, lost on `from` for `reason`, was placed on `to` now.
    pub fn record(&self, work: String, from: &str, to: &str, reason: &str) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut moves = self.moves.lock().expect("moves lock poisoned");
        moves.push_front(Move {
            at_ms,
            work,
            from: from.to_string(),
            to: to.to_string(),
            reason: reason.to_string(),
        });
        moves.truncate(KEPT);
    }

    /// The moves kept, the newest first.
    pub fn list(&self) -> Vec<Move> {
        let moves = self.moves.lock().expect("moves lock poisoned");
        moves.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_moves_are_kept_first_and_the_oldest_dropped() {
        let moves = RecentMoves::default();
        for n in 0..KEPT + 5 {
            moves.record(format!("run {n}"), "a", "b", "the node left the cluster");
        }
        let kept = moves.list();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].work, format!("run {}", KEPT + 4));
        assert_eq!(kept[KEPT - 1].work, "run 5");
        assert_eq!((kept[0].from.as_str(), kept[0].to.as_str()), ("a", "b"));
        assert!(kept[0].at_ms >= kept[KEPT - 1].at_ms);
    }
}
