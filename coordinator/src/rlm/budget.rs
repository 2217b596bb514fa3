//! What a run and all its children (rlm_query) may still spend, shared by the whole tree: time
//! until one deadline, tokens (every turn and sub-call of every run in it), and sub-calls.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::Duration,
};

use kowalski_exo_common::proto::AskRequest;
use tokio::time::Instant;

/// The budgets of one root run, shared with its children.
#[derive(Debug)]
pub struct Budget {
    started: Instant,
    deadline: Option<Instant>,
    tokens: Option<u64>,
    tokens_used: AtomicU64,
    /// Sub-calls left; below zero once prompts were refused past it.
    subcalls_left: Option<AtomicI64>,
}

impl Budget {
    /// The budgets `request` sets, starting now; unbounded where it sets none.
    pub fn of(request: &AskRequest) -> Self {
        let started = Instant::now();
        Budget {
            started,
            deadline: (request.max_time_ms > 0)
                .then(|| started + Duration::from_millis(request.max_time_ms.into())),
            tokens: (request.max_tokens > 0).then_some(request.max_tokens),
            tokens_used: AtomicU64::new(0),
            subcalls_left: (request.max_subcalls > 0)
                .then(|| AtomicI64::new(request.max_subcalls.min(i64::MAX as u64) as i64)),
        }
    }

    /// Counts tokens some run of the tree used.
    pub fn spend_tokens(&self, tokens: u64) {
        self.tokens_used.fetch_add(tokens, Ordering::AcqRel);
    }

    /// Tokens the tree has spent so far.
    pub fn tokens_used(&self) -> u64 {
        self.tokens_used.load(Ordering::Acquire)
    }

    /// Time since the root run started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Takes one sub-call, or says which budget is spent (and the flag that sets it).
    pub fn take_subcall(&self) -> Result<(), String> {
        if let Some(reason) = self.time_or_tokens() {
            return Err(spent(reason));
        }
        match &self.subcalls_left {
            Some(left) if left.fetch_sub(1, Ordering::AcqRel) <= 0 => Err(spent("max_subcalls")),
            _ => Ok(()),
        }
    }

    /// The budget used up, if one is, as `AskFinished.reason` names it.
    pub fn exceeded(&self) -> Option<&'static str> {
        self.time_or_tokens().or_else(|| {
            self.subcalls_left
                .as_ref()
                .filter(|left| left.load(Ordering::Acquire) <= 0)
                .map(|_| "max_subcalls")
        })
    }

    fn time_or_tokens(&self) -> Option<&'static str> {
        if self.deadline.is_some_and(|at| Instant::now() >= at) {
            return Some("max_time");
        }
        let used = self.tokens_used.load(Ordering::Acquire);
        self.tokens
            .is_some_and(|most| used >= most)
            .then_some("max_tokens")
    }
}

/// Whether `reason` names a budget running out.
pub fn is_budget(reason: &str) -> bool {
    matches!(reason, "max_time" | "max_tokens" | "max_subcalls")
}

/// The error of a prompt refused because the budget `reason` is spent.
fn spent(reason: &str) -> String {
    let what = match reason {
        "max_time" => "time (--max-time)",
        "max_tokens" => "tokens (--max-tokens)",
        _ => "sub-calls (--max-subcalls)",
    };
    format!("the run's budget of {what} is spent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbounded_budget_is_never_spent() {
        let budget = Budget::of(&AskRequest::default());
        budget.spend_tokens(1 << 40);
        assert!(budget.take_subcall().is_ok());
        assert_eq!(budget.exceeded(), None);
    }

    #[test]
    fn sub_calls_past_the_budget_are_refused_and_end_the_run() {
        let budget = Budget::of(&AskRequest {
            max_subcalls: 2,
            ..Default::default()
        });
        assert!(budget.take_subcall().is_ok());
        assert_eq!(budget.exceeded(), None);
        assert!(budget.take_subcall().is_ok());
        assert_eq!(budget.exceeded(), Some("max_subcalls"));
        let refused = budget.take_subcall().unwrap_err();
        assert!(refused.contains("--max-subcalls"), "{refused}");
    }

    #[test]
    fn tokens_spent_by_any_run_of_the_tree_count() {
        let budget = Budget::of(&AskRequest {
            max_tokens: 100,
            ..Default::default()
        });
        budget.spend_tokens(60);
        assert_eq!(budget.exceeded(), None);
        budget.spend_tokens(40);
        assert_eq!(budget.exceeded(), Some("max_tokens"));
        assert!(budget.take_subcall().unwrap_err().contains("--max-tokens"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_one_for_the_whole_tree() {
        let budget = Budget::of(&AskRequest {
            max_time_ms: 1000,
            ..Default::default()
        });
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(budget.exceeded(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(budget.exceeded(), Some("max_time"));
    }
}
