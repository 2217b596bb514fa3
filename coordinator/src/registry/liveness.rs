//! The failure detector: a pure function of what was last heard from a node and the time now.
//!
//! A closed registry stream means the node is down at once (a killed process closes its
//! sockets). A node that goes silent (hung, stopped, cut off) is suspect after a few missed
//! heartbeats, when it gets no new work, and down after a longer deadline, when its in-flight
//! work is moved elsewhere.

use std::time::Duration;

use tokio::time::Instant;

/// Heartbeat interval the coordinator asks agents for.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Heartbeats missed before a node is suspect.
pub const MISSED_BEATS_TO_SUSPECT: u32 = 3;
/// Silence after which a node is down and its in-flight work fails over.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);

/// The detector's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    pub heartbeat_interval: Duration,
    pub missed_beats_to_suspect: u32,
    pub down_after: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat_interval: HEARTBEAT_INTERVAL,
            missed_beats_to_suspect: MISSED_BEATS_TO_SUSPECT,
            down_after: DOWN_AFTER,
        }
    }
}

impl LivenessConfig {
    /// Silence after which a node is suspect.
    pub fn suspect_after(&self) -> Duration {
        self.heartbeat_interval * self.missed_beats_to_suspect
    }
}

/// A node's state as clients see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Alive and taking work.
    Ready,
    /// Silent for a few heartbeats: no new work, running work left alone.
    Suspect,
    /// Alive, but an operator asked for no new work.
    Draining,
    /// Its stream closed, or silent past the deadline.
    Down,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::Ready,
        NodeState::Suspect,
        NodeState::Draining,
        NodeState::Down,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Suspect => "suspect",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        }
    }
}

/// What the detector knows of a node.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    /// When the last message of any kind arrived.
    pub last_seen: Instant,
    pub stream_open: bool,
    pub draining: bool,
}

/// The node's state at `now`.
pub fn assess(node: &Observation, now: Instant, config: &LivenessConfig) -> NodeState {
    let silence = now.saturating_duration_since(node.last_seen);
    if !node.stream_open || silence >= config.down_after {
        NodeState::Down
    } else if silence >= config.suspect_after() {
        NodeState::Suspect
    } else if node.draining {
        NodeState::Draining
    } else {
        NodeState::Ready
    }
}

/// True when work running on the node should be failed over: it has been silent past the
/// deadline. A closed stream alone is not enough: the agent may be reconnecting while its runs
/// carry on, and those must not run twice.
pub fn in_flight_lost(node: &Observation, now: Instant, config: &LivenessConfig) -> bool {
    now.saturating_duration_since(node.last_seen) >= config.down_after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heard_at(last_seen: Instant) -> Observation {
        Observation {
            last_seen,
            stream_open: true,
            draining: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hung_node_is_suspected_after_three_missed_beats_then_down_at_the_deadline() {
        let config = LivenessConfig::default();
        let node = heard_at(Instant::now());
        tokio::time::advance(Duration::from_millis(1499)).await;
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Ready);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Suspect);
        assert!(!in_flight_lost(&node, Instant::now(), &config));
        tokio::time::advance(Duration::from_millis(3500)).await;
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Down);
        assert!(in_flight_lost(&node, Instant::now(), &config));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_stream_is_down_at_once_but_keeps_its_work() {
        let config = LivenessConfig::default();
        let node = Observation {
            stream_open: false,
            ..heard_at(Instant::now())
        };
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Down);
        assert!(!in_flight_lost(&node, Instant::now(), &config));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_shows_while_alive_and_silence_wins_over_it() {
        let config = LivenessConfig::default();
        let node = Observation {
            draining: true,
            ..heard_at(Instant::now())
        };
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Draining);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Suspect);
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_brings_a_suspect_back() {
        let config = LivenessConfig::default();
        let mut node = heard_at(Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Suspect);
        node.last_seen = Instant::now();
        assert_eq!(assess(&node, Instant::now(), &config), NodeState::Ready);
    }
}
