//! The Kowalski Exo node agent: one per device.
//!
//! - [`fingerprint`]: which runtimes this device has, resolved past shims, re-probed periodically.
//! - [`sandbox`]: containment of executed code (process session, rlimits, cgroups).
//! - [`exec`]: running one request: work directory, compile step, output streaming, limits.
//! - [`backends`]: the device's local LLM servers (Ollama, OpenAI-compatible), the models they
//!   serve and whether they generate.
//! - [`sessions`]: warm interpreters that keep state across executions.
//! - [`admission`]: the concurrency limit and its bounded queue.
//! - [`service`]: the NodeAgent gRPC service, a thin layer over the executor and the backends.
//! - [`membership`]: the node's certificate in a cluster that runs with TLS, got by joining.
//! - [`link`]: what other parts of the agent send the coordinator over the registry stream.
//! - [`discovery`]: finding the coordinator on the LAN (mDNS/DNS-SD) when given none.
//! - [`registration`]: the background stream that joins the coordinator, with heartbeats.
//! - [`service_unit`]: the systemd unit an installed agent runs as.
//! - [`agent`]: everything assembled into a server that shuts down cleanly.

pub mod admission;
pub mod agent;
pub mod backends;
pub mod discovery;
pub mod error;
pub mod exec;
pub mod fingerprint;
pub mod link;
mod load;
pub mod membership;
pub mod registration;
pub mod sandbox;
pub mod service;
pub mod service_unit;
pub mod sessions;

pub use agent::{AgentConfig, RunningAgent, start};
