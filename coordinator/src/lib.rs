//! The Kowalski Exo coordinator.
//!
//! - [`registry`]: the live view of the cluster (who registered, their runtimes and load).
//! - [`api`]: the gRPC surfaces: AgentRegistry for agents, Coordinator for clients.
//! - [`server`]: everything assembled, optionally with an in-process node agent.
//! - [`cli`]: the client subcommands' output (tables and JSON lines).
//!
//! Placement, code blocks, failover and the HTTP APIs arrive with later issues.

pub mod api;
pub mod cli;
pub mod codeblocks;
pub mod registry;
pub mod server;
