//! The failover loop every kind of work shares: wait for a node that fits, try it, and when the
//! attempt is lost to the node (it died, went silent past the deadline, or had no room) try
//! another not yet tried at once (after a node with no room, with exponential backoff and
//! jitter), up to a number of attempts.
//!
//! What one attempt is, what the caller is told, and how work goes on after a lost attempt
//! belong to each kind of work ([`Work`]): code runs again from the start elsewhere; a
//! generation continues from the text already sent.

use std::{future::Future, pin::Pin, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use kowalski_exo_common::error_text::broken_transport;
use tokio::{sync::watch, time::Instant};
use tonic::{Code, Status};

use super::placement::{Requirements, Unplaceable, place, with_candidates};
use crate::registry::{Load, NodeRegistry};

/// Attempts unless the work says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Backoff between attempts after a node had no room.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(20);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(1);
/// How long work waits for a fitting node to become ready before giving up.
const NONE_READY_WAIT: Duration = Duration::from_secs(10);

/// One attempt: where it goes and which it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attempt {
    pub node_id: String,
    pub node_name: String,
    /// The address to dial the node's agent at.
    pub address: String,
    /// 1 for the first attempt.
    pub number: u32,
}

/// How one attempt ended.
#[derive(Debug)]
pub enum AttemptEnd<T> {
    Finished(T),
    /// The node failed; it is not tried again for this work.
    Lost(String),
    /// The node had no room; another is preferred.
    Busy(String),
    /// The node refused the request itself, as any node would.
    Rejected(Status),
    /// The caller went away.
    Cancelled,
}

/// What the work came to.
#[derive(Debug)]
pub enum Outcome<T> {
    /// An attempt ran to its end.
    Finished(T),
    /// Every attempt was lost, or no node could take the work.
    Failed(String),
    /// A node refused the request itself (it would be refused anywhere).
    Rejected(Status),
    /// The caller went away.
    Cancelled,
}

/// The caller left: stop.
#[derive(Debug)]
pub struct CallerGone;

/// A future that completes when the caller has gone away.
pub type Departure = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One kind of work the loop can place and move.
#[tonic::async_trait]
pub trait Work: Send {
    /// What a finished attempt yields.
    type Result: Send;

    /// What the work needs of its node, leaving out the nodes in `exclude`.
    fn requirements<'a>(&'a self, exclude: &'a [String]) -> Requirements<'a>;

    /// Attempts before giving up; 0 takes [`DEFAULT_MAX_ATTEMPTS`].
    fn max_attempts(&self) -> u32;

    /// What an attempt counts against its node: a run slot, or a generation of a model (which
    /// queues in its backend instead of waiting for a slot).
    fn load(&self) -> Load<'_> {
        Load::Run
    }

    /// Completes when the caller has gone away.
    fn departure(&self) -> Departure;

    /// Tells the caller the work is waiting for a node.
    async fn queued(&mut self) -> Result<(), CallerGone>;

    /// Tells the caller where the next attempt goes.
    async fn placed(&mut self, attempt: &Attempt) -> Result<(), CallerGone>;

    /// Runs one attempt to its end, passing on what it produces. The loop stops waiting for it
    /// when the node falls silent or the caller leaves. After a lost attempt the work must be
    /// ready for the next one.
    async fn attempt(&mut self, attempt: &Attempt) -> AttemptEnd<Self::Result>;

    /// What the work is, for the record of moves: `python run`, `answer of MODEL`.
    fn what(&self) -> String;

    /// Tells the caller a lost attempt will be followed by another elsewhere.
    async fn retrying(&mut self, lost: &Attempt, reason: &str) -> Result<(), CallerGone>;
}

/// Runs `work` on the cluster to its end; returns what it came to and its last attempt.
pub async fn run<W: Work>(
    registry: &NodeRegistry,
    work: &mut W,
) -> (Outcome<W::Result>, Option<Attempt>) {
    let mut last = None;
    let outcome = attempts(registry, work, &mut last).await;
    (outcome, last)
}

async fn attempts<W: Work>(
    registry: &NodeRegistry,
    work: &mut W,
    last: &mut Option<Attempt>,
) -> Outcome<W::Result> {
    if work.queued().await.is_err() {
        return Outcome::Cancelled;
    }
    let max_attempts = match work.max_attempts() {
        0 => DEFAULT_MAX_ATTEMPTS,
        n => n,
    };
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN_DELAY)
        .with_max_delay(RETRY_MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .build();
    // Nodes that failed this work are not tried again; nodes that were only full are avoided
    // while another fits.
    let mut failed: Vec<String> = Vec::new();
    let mut busy: Vec<String> = Vec::new();
    let mut losses: Vec<String> = Vec::new();
    // The node that lost the last attempt, by name, and why, until the work is placed again.
    let mut lost_on: Option<(String, String)> = None;
    for number in 1..=max_attempts {
        let (node_id, node_name) = match wait_for_node(registry, &*work, &failed, &busy).await {
            Ok(node) => node,
            Err(None) => return Outcome::Cancelled,
            Err(Some(reason)) => {
                losses.push(reason);
                return Outcome::Failed(losses.join("; "));
            }
        };
        let attempt = Attempt {
            address: registry.address(&node_id).unwrap_or_default(),
            node_id,
            node_name,
            number,
        };
        if let Some((from, reason)) = lost_on.take() {
            let moves = registry.moves();
            moves.record(work.what(), &from, &attempt.node_name, &reason);
        }
        *last = Some(attempt.clone());
        // Counted at once, so the next placement sees it even while this one is announced.
        let in_flight = registry.begin(&attempt.node_id, work.load());
        if work.placed(&attempt).await.is_err() {
            return Outcome::Cancelled;
        }
        let end = if attempt.address.is_empty() {
            AttemptEnd::Lost("the node left the cluster".into())
        } else {
            watched_attempt(registry, work, &attempt).await
        };
        drop(in_flight);
        let (reason, was_busy) = match end {
            AttemptEnd::Finished(result) => return Outcome::Finished(result),
            AttemptEnd::Rejected(status) => return Outcome::Rejected(status),
            AttemptEnd::Cancelled => return Outcome::Cancelled,
            AttemptEnd::Busy(reason) => {
                busy.push(attempt.node_id.clone());
                (reason, true)
            }
            AttemptEnd::Lost(reason) => {
                failed.push(attempt.node_id.clone());
                lost_on = Some((attempt.node_name.clone(), reason.clone()));
                (reason, false)
            }
        };
        tracing::warn!(node = %attempt.node_name, attempt = number, %reason, "attempt lost");
        losses.push(format!(
            "attempt {number} on {}: {reason}",
            attempt.node_name
        ));
        if number == max_attempts {
            break;
        }
        if let Some(why) = no_retry(registry, &*work, &failed) {
            return Outcome::Failed(format!("{}; {why}", losses.join("; ")));
        }
        if work.retrying(&attempt, &reason).await.is_err() {
            return Outcome::Cancelled;
        }
        // A lost node is not tried again, so the next attempt goes elsewhere at once; a full
        // node may be the only one left, and its slots free up with time.
        if was_busy {
            tokio::select! {
                _ = tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX_DELAY)) => {}
                _ = work.departure() => return Outcome::Cancelled,
            }
        }
    }
    Outcome::Failed(format!(
        "gave up after {max_attempts} attempts: {}",
        losses.join("; ")
    ))
}

/// One attempt, given up when the node falls silent past the deadline or the caller leaves.
async fn watched_attempt<W: Work>(
    registry: &NodeRegistry,
    work: &mut W,
    attempt: &Attempt,
) -> AttemptEnd<W::Result> {
    let mut changes = registry.subscribe();
    let departure = work.departure();
    tokio::select! {
        end = work.attempt(attempt) => end,
        _ = silent(registry, &attempt.node_id, &mut changes) => {
            AttemptEnd::Lost(format!("the node was silent for {:?}", registry.config().down_after))
        }
        _ = departure => AttemptEnd::Cancelled,
    }
}

/// Why no other node could take the work after the nodes in `failed`, if none can.
fn no_retry<W: Work>(registry: &NodeRegistry, work: &W, failed: &[String]) -> Option<Unplaceable> {
    let wanted = work.requirements(failed);
    with_candidates(registry, Instant::now(), |nodes| {
        place(nodes, &wanted).err()
    })
    .filter(|reason| !reason.is_transient())
}

/// Waits until placement chooses a node: `Err(None)` when the caller left, `Err(Some)` when
/// no node can take the work.
async fn wait_for_node<W: Work>(
    registry: &NodeRegistry,
    work: &W,
    failed: &[String],
    busy: &[String],
) -> Result<(String, String), Option<String>> {
    let mut changes = registry.subscribe();
    let avoid: Vec<String> = failed.iter().chain(busy).cloned().collect();
    let mut none_ready_since: Option<Instant> = None;
    let mut departure = work.departure();
    loop {
        changes.borrow_and_update();
        // Worked out before the registry's lock is taken: a session's asks the registry.
        let (untried, not_failed) = (work.requirements(&avoid), work.requirements(failed));
        let choice = with_candidates(registry, Instant::now(), |nodes| {
            let chosen = match place(nodes, &untried) {
                // Only full nodes remain: one of them, once it has room, beats failing.
                Err(Unplaceable::Exhausted { .. }) if !busy.is_empty() => place(nodes, &not_failed),
                other => other,
            };
            chosen.map(|node| (node.id().to_string(), node.name().to_string()))
        });
        match choice {
            Ok(chosen) => return Ok(chosen),
            Err(reason @ Unplaceable::NoneReady { .. }) => {
                let since = *none_ready_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= NONE_READY_WAIT {
                    return Err(Some(reason.to_string()));
                }
            }
            Err(reason) if !reason.is_transient() => return Err(Some(reason.to_string())),
            Err(_) => none_ready_since = None,
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(NONE_READY_WAIT) => {}
            _ = &mut departure => return Err(None),
        }
    }
}

/// Completes when the node has been silent past the deadline. Wakes on registry changes and
/// at the deadline itself, which passes without any change when the node's stream is gone.
async fn silent(registry: &NodeRegistry, node_id: &str, changes: &mut watch::Receiver<u64>) {
    loop {
        if registry.in_flight_lost(node_id, Instant::now()) {
            return;
        }
        let Some(deadline) = registry.silence_deadline(node_id) else {
            return;
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(deadline).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// A sentence for a failed call; a broken transport says the node was lost instead of quoting
/// HTTP/2 internals.
pub fn loss_reason(status: &Status) -> String {
    if broken_transport(status) {
        "the connection to the node was lost".into()
    } else {
        format!("{}: {}", code_name(status.code()), status.message())
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "no room",
        Code::FailedPrecondition => "runtime unavailable there",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Internal => "internal error",
        Code::Unknown => "connection lost",
        _ => "failed",
    }
}
