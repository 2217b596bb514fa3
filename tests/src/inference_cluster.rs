//! A coordinator and node agents fronting OpenAI-compatible LLM backends, as real processes on
//! loopback, for the inference tests and benchmark.

use std::time::{Duration, Instant};

use kowalski_exo_common::proto::{
    BackendState, ListModelsRequest, coordinator_client::CoordinatorClient,
};
use tonic::transport::Channel;

use crate::{CEILING, Daemon};

/// A coordinator (gRPC and HTTP on OS-chosen ports) and agents `agent-0`, `agent-1`, ..., each
/// fronting the backend at its API base. Stopped on drop.
pub struct InferenceCluster {
    pub coordinator: Daemon,
    pub agents: Vec<Daemon>,
    _work: tempfile::TempDir,
}

impl InferenceCluster {
    /// Starts it: `coordinator_args` go to `coordinator serve`, and agents poll their backends
    /// every `poll_secs` seconds.
    pub fn start(api_bases: &[&str], coordinator_args: &[&str], poll_secs: u32) -> Self {
        let work = tempfile::tempdir().expect("temp dir");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"];
        args.extend(coordinator_args);
        let coordinator = Daemon::start("coordinator", &args, &[], "coordinator listening");
        let url = coordinator.url();
        let poll = poll_secs.to_string();
        let agents = api_bases
            .iter()
            .enumerate()
            .map(|(i, api_base)| {
                let name = format!("agent-{i}");
                let dir = work.path().join(&name);
                Daemon::start(
                    "node-agent",
                    &[
                        "--coordinator",
                        &url,
                        "--name",
                        &name,
                        "--listen",
                        "127.0.0.1:0",
                        "--work-dir",
                        dir.to_str().expect("UTF-8 temp path"),
                        "--openai",
                        api_base,
                        "--model-poll-interval",
                        &poll,
                    ],
                    &[],
                    "node agent listening",
                )
            })
            .collect();
        InferenceCluster {
            coordinator,
            agents,
            _work: work,
        }
    }

    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(
            crate::channel(&self.coordinator.url())
                .await
                .expect("connect to the coordinator"),
        )
    }

    /// Waits until `count` nodes serve `model` with a working backend, as the coordinator lists
    /// it; returns their names.
    pub async fn served_by(&self, model: &str, count: usize) -> Vec<String> {
        let mut client = self.client().await;
        let start = Instant::now();
        loop {
            let models = client
                .list_models(ListModelsRequest {})
                .await
                .expect("ListModels")
                .into_inner()
                .models;
            let nodes: Vec<String> = models
                .iter()
                .filter(|m| m.name == model)
                .flat_map(|m| &m.served_by)
                .filter(|p| {
                    p.offer
                        .as_ref()
                        .is_some_and(|o| o.state() == BackendState::Ready)
                })
                .map(|p| p.node_name.clone())
                .collect();
            if nodes.len() == count {
                return nodes;
            }
            assert!(start.elapsed() < CEILING, "{model} served by {nodes:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://ADDR` of the coordinator's HTTP API.
    pub fn http_url(&self) -> String {
        format!(
            "http://{}",
            self.coordinator.logged_addr("http api listening")
        )
    }

    /// The agent called `name`.
    pub fn agent(&self, name: &str) -> &Daemon {
        let index: usize = name
            .strip_prefix("agent-")
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("no agent is called {name}"));
        &self.agents[index]
    }
}
