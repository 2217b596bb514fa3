//! `GET /healthz`: 200 when at least one node is ready, 503 otherwise, with the count by state;
//! `GET /metrics`: the cluster's metrics for Prometheus to scrape.

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde_json::{Value, json};

use crate::service::ClusterService;

/// `/healthz`, open to anyone.
pub fn routes() -> Router<ClusterService> {
    Router::new().route("/healthz", get(healthz))
}

/// `/metrics`, behind the API keys like the APIs.
pub fn metrics_routes() -> Router<ClusterService> {
    Router::new().route("/metrics", get(metrics))
}

async fn healthz(State(cluster): State<ClusterService>) -> (StatusCode, Json<Value>) {
    let mut states: BTreeMap<String, u32> = BTreeMap::new();
    for node in cluster.list_nodes() {
        *states.entry(node.state).or_default() += 1;
    }
    let ready = states.get("ready").copied().unwrap_or(0) > 0;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ready { "ready" } else { "no ready node" }, "nodes": states})),
    )
}

async fn metrics(State(cluster): State<ClusterService>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        cluster.metrics(),
    )
}
