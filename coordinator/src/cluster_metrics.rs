//! The coordinator's Prometheus metrics: their names, one process-wide recorder (the `metrics`
//! facade with its Prometheus exporter), and the scrape, which sets the cluster's gauges from
//! the registry before rendering.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::time::Instant;

use crate::registry::{NodeRegistry, NodeState};

/// Nodes by state (`state`).
pub const NODES: &str = "kowalski_nodes";
/// Code runs placed and not finished.
pub const RUNS_IN_FLIGHT: &str = "kowalski_runs_in_flight";
/// Generations placed and not finished (`model`).
pub const GENERATIONS_IN_FLIGHT: &str = "kowalski_generations_in_flight";
/// Code runs ended (`status`: ok, nonzero_exit, timeout, ..., or failed when no node ran it).
pub const RUNS: &str = "kowalski_runs_total";
/// Code runs started again on another node after a lost attempt.
pub const RUN_RETRIES: &str = "kowalski_run_retries_total";
/// How long finished runs took on their node.
pub const EXEC_SECONDS: &str = "kowalski_exec_seconds";
/// Chat answers ended (`model`, `outcome`: finished, failed, rejected, cancelled, or refused
/// before any node was asked).
pub const ANSWERS: &str = "kowalski_chat_answers_total";
/// Completion tokens sent to callers (`model`).
pub const TOKENS: &str = "kowalski_tokens_generated_total";
/// Answers moved to another node mid-answer (`model`).
pub const FAILOVERS: &str = "kowalski_chat_failovers_total";
/// Sessions opened again on another node, their executions replayed there.
pub const SESSION_MOVES: &str = "kowalski_session_moves_total";
/// Prompts code in sessions sent (`model`, `outcome`: answered, cached, failed, refused).
pub const SUBCALLS: &str = "kowalski_subcalls_total";
/// From a chat request to its first token (`model`).
pub const TIME_TO_FIRST_TOKEN: &str = "kowalski_time_to_first_token_seconds";

/// Histogram buckets in seconds, from a fast first token to a long run.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use. A program that embeds the coordinator and
/// already installed a recorder of its own keeps it: the metrics go there, and this handle
/// renders nothing.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("the buckets are not empty");
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            Err(e) => {
                tracing::warn!(error = %e, "another metrics recorder is installed; /metrics shows only this one's");
                PrometheusBuilder::new().build_recorder().handle()
            }
        };
        describe();
        handle
    })
}

fn describe() {
    describe_gauge!(NODES, "Nodes by state.");
    describe_gauge!(RUNS_IN_FLIGHT, "Code runs placed and not finished.");
    describe_gauge!(
        GENERATIONS_IN_FLIGHT,
        "Generations placed and not finished, by model."
    );
    describe_counter!(RUNS, "Code runs ended, by status.");
    describe_counter!(
        RUN_RETRIES,
        "Code runs started again on another node after a lost attempt."
    );
    describe_histogram!(
        EXEC_SECONDS,
        Unit::Seconds,
        "How long finished runs took on their node."
    );
    describe_counter!(
        ANSWERS,
        "Chat answers ended, by model and outcome (finished, failed, rejected, cancelled, refused)."
    );
    describe_counter!(TOKENS, "Completion tokens sent to callers, by model.");
    describe_counter!(
        SUBCALLS,
        "Prompts code in sessions sent, by model and outcome (answered, cached, failed, refused)."
    );
    describe_counter!(
        SESSION_MOVES,
        "Sessions opened again on another node, their executions replayed there."
    );
    describe_counter!(
        FAILOVERS,
        "Answers moved to another node mid-answer, by model."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From a chat request to its first token, by model."
    );
}

/// Every metric in Prometheus's text format, the cluster's gauges as they stand now.
pub fn render(registry: &NodeRegistry) -> String {
    let handle = install();
    let nodes = registry.snapshot(Instant::now());
    for state in NodeState::ALL {
        let count = nodes.iter().filter(|n| n.state == state).count();
        gauge!(NODES, "state" => state.name()).set(count as f64);
    }
    gauge!(RUNS_IN_FLIGHT).set(nodes.iter().map(|n| f64::from(n.in_flight)).sum::<f64>());
    let mut models: Vec<&str> = nodes
        .iter()
        .flat_map(|n| n.registration.models.iter().flat_map(|c| &c.models))
        .map(|m| m.name.as_str())
        .collect();
    models.sort_unstable();
    models.dedup();
    for model in models {
        let placed: u32 = nodes.iter().filter_map(|n| n.generations.get(model)).sum();
        gauge!(GENERATIONS_IN_FLIGHT, "model" => model.to_string()).set(f64::from(placed));
    }
    handle.run_upkeep();
    handle.render()
}
