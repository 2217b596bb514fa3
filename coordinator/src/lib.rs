//! The Kowalski Exo coordinator.
//!
//! - [`registry`]: the live view of the cluster: who registered, their runtimes and load, and
//!   the failure detector that says who is alive.
//! - [`scheduling`]: placement (a pure choice of node), dispatch (running code there, with
//!   failover to another node), and documents (a Markdown file's blocks in order).
//! - [`inference`]: the cluster's models, and chat answers that survive a node dying mid-answer.
//! - [`sessions`]: named sessions placed like runs, moved with their history when a node dies.
//! - [`rlm`]: the Recursive Language Model loop: context in a session, code each turn, sub-calls
//!   over the cluster, a final answer or a budget.
//! - [`codeblocks`]: fenced code blocks out of LLM output.
//! - [`service`]: what clients can ask of the cluster, whatever the transport.
//! - [`http`]: the HTTP API (health, metrics, OpenAI-, Ollama- and Anthropic-compatible chat
//!   over the cluster's models).
//! - [`api`]: the gRPC surfaces: AgentRegistry for agents, Coordinator for clients.
//! - [`json_events`]: the JSON shape of cluster events, for the CLI and the HTTP API.
//! - [`cluster_metrics`]: Prometheus metrics of runs, answers and nodes, for `GET /metrics`.
//! - [`error`]: the coordinator's refusals, mapped to gRPC status in one place.
//! - [`server`]: everything assembled, optionally with an in-process node agent.
//! - [`announce`]: the coordinator's announcement on the LAN (mDNS/DNS-SD).
//! - [`cli`]: the client subcommands: connecting (or a local cluster), requests from flags,
//!   following event streams, tables and JSON lines, exit statuses.

pub mod announce;
pub mod api;
pub mod cli;
pub mod cluster_metrics;
pub mod codeblocks;
pub mod error;
pub mod http;
pub mod inference;
pub mod json_events;
pub mod registry;
pub mod rlm;
pub mod scheduling;
pub mod server;
pub mod service;
pub mod sessions;
