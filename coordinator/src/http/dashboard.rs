//! The dashboard: `GET /` is a page served from the binary (no build step) that shows the
//! nodes (state, runtimes, models, isolation layers, load over the last minutes), runs and
//! generations in flight, sessions, failovers and the recent Recursive Language Model runs as
//! trees; `GET /dashboard/events` streams the same state to it as server-sent events, twice a
//! second, so it updates live. Off loopback it sits behind the API keys like every route; a
//! browser asked for a key (HTTP Basic, the key as password) sends it with every request.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Json, Router,
    extract::State,
    http::header,
    response::{
        Html, IntoResponse,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures_util::Stream;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_stream::{StreamExt, wrappers::IntervalStream};

use crate::{
    cli::{ask, inference::ModelLine, nodes::NodeLine, sessions::SessionLine},
    cluster_metrics,
    service::ClusterService,
};

const PAGE: &str = include_str!("dashboard.html");
/// Between two states sent to an open page.
const PUSH_EVERY: Duration = Duration::from_millis(500);
/// Between two samples of every node's load.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept per node: five minutes.
const SAMPLES: usize = 150;

/// One sample of a node's load: its CPU use in percent, to a tenth (samples are
/// `SAMPLE_EVERY` apart, so the page needs no time with each).
type Sample = f32;
/// Each node's samples, by node id, oldest first.
type Samples = Mutex<HashMap<String, VecDeque<Sample>>>;

/// Each node's load over the last minutes.
#[derive(Clone, Default)]
struct LoadHistory(Arc<Samples>);

/// The dashboard's routes; starts sampling the nodes' load for as long as they are served.
pub fn routes(cluster: &ClusterService) -> axum::Router<ClusterService> {
    let history = LoadHistory::default();
    tokio::spawn(sample(cluster.clone(), Arc::downgrade(&history.0)));
    Router::new()
        .route("/", get(page))
        .route("/dashboard/state", get(state))
        .route("/dashboard/events", get(events))
        .layer(Extension(history))
}

/// Samples every node's load until the routes are gone.
async fn sample(cluster: ClusterService, history: Weak<Samples>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        every.tick().await;
        let Some(history) = history.upgrade() else {
            return;
        };
        let nodes = cluster.list_nodes();
        let listed: HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        let mut history = history.lock().expect("load history poisoned");
        history.retain(|id, _| listed.contains(id.as_str()));
        for node in &nodes {
            let cpu = node.load.map_or(0.0, |load| load.cpu_percent);
            let samples = history.entry(node.id.clone()).or_default();
            if samples.len() == SAMPLES {
                samples.pop_front();
            }
            samples.push_back((cpu * 10.0).round() / 10.0);
        }
    }
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

async fn state(
    State(cluster): State<ClusterService>,
    Extension(history): Extension<LoadHistory>,
) -> Json<Value> {
    Json(snapshot(&cluster, &history))
}

async fn events(
    State(cluster): State<ClusterService>,
    Extension(history): Extension<LoadHistory>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = IntervalStream::new(tokio::time::interval(PUSH_EVERY));
    let states = ticks.map(move |_| {
        let state = snapshot(&cluster, &history);
        Ok(Event::default().event("state").data(state.to_string()))
    });
    Sse::new(states).keep_alive(KeepAlive::default())
}

/// A node as the dashboard shows it.
#[derive(Serialize)]
struct DashboardNode {
    #[serde(flatten)]
    node: NodeLine,
    /// Models its backends serve, with whether each works.
    models: Vec<Value>,
    /// Oldest first.
    load: Vec<Sample>,
}

/// Everything the page shows.
fn snapshot(cluster: &ClusterService, history: &LoadHistory) -> Value {
    let models: Vec<ModelLine> = cluster.list_models().iter().map(ModelLine::from).collect();
    // Each node's models, gathered once (not by searching every model for every node).
    let mut served: HashMap<&str, Vec<Value>> = HashMap::new();
    for m in &models {
        for s in &m.served_by {
            served
                .entry(s.node_id.as_str())
                .or_default()
                .push(json!({"model": m.model, "state": s.state, "in_flight": s.in_flight}));
        }
    }
    let history = history.0.lock().expect("load history poisoned");
    let nodes: Vec<DashboardNode> = cluster
        .list_nodes()
        .iter()
        .map(|node| DashboardNode {
            models: served.remove(node.id.as_str()).unwrap_or_default(),
            load: history
                .get(&node.id)
                .map(|samples| samples.iter().copied().collect())
                .unwrap_or_default(),
            node: NodeLine::from(node),
        })
        .collect();
    drop(history);
    let runs: u32 = nodes.iter().map(|n| n.node.running).sum();
    let generations: u32 = models
        .iter()
        .flat_map(|m| &m.served_by)
        .map(|s| s.in_flight)
        .sum();
    let sessions: Vec<SessionLine> = cluster
        .sessions()
        .list()
        .iter()
        .map(SessionLine::from)
        .collect();
    let metrics = cluster.metrics();
    let moves = cluster.recent_moves().list();
    let trajectories: Vec<Value> = cluster
        .recent_runs()
        .list()
        .iter()
        .map(|run| {
            json!({
                "id": run.id, "model": run.model, "question": run.question,
                "started_ms": run.started_ms, "finished": run.finished,
                "tree": ask::tree(&run.events),
            })
        })
        .collect();
    json!({
        "time_ms": now_ms(),
        "nodes": nodes,
        "in_flight": {"runs": runs, "generations": generations},
        "models": models,
        "sessions": sessions,
        "failovers": {
            "runs": counter(&metrics, cluster_metrics::RUN_RETRIES),
            "answers": counter(&metrics, cluster_metrics::FAILOVERS),
            "sessions": counter(&metrics, cluster_metrics::SESSION_MOVES),
            "recent": moves,
        },
        "trajectories": trajectories,
    })
}

/// The sum over its labels of a counter in the Prometheus text `metrics`.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_summed_over_its_labels() {
        let metrics = "# TYPE kowalski_chat_failovers_total counter\n\
kowalski_chat_failovers_total{model=\"a\"} 2\n\
kowalski_chat_failovers_total{model=\"b\"} 3\n\
kowalski_chat_failovers_total_other 9\n";
        assert_eq!(counter(metrics, "kowalski_chat_failovers_total"), 5);
        assert_eq!(counter(metrics, "kowalski_session_moves_total"), 0);
    }
}
