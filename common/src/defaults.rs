//! Ports and addresses every binary agrees on; each is overridable by a flag.

/// Coordinator gRPC port (Coordinator and AgentRegistry services).
pub const COORDINATOR_GRPC_PORT: u16 = 50051;
/// Coordinator HTTP port (health, metrics, dashboard, OpenAI-compatible API).
pub const COORDINATOR_HTTP_PORT: u16 = 8080;
/// Node agent gRPC port (NodeAgent service).
pub const NODE_AGENT_GRPC_PORT: u16 = 50052;

/// Where clients dial the coordinator unless told otherwise.
pub const COORDINATOR_URL: &str = "http://127.0.0.1:50051";
/// Where a node agent listens unless told otherwise.
pub const NODE_AGENT_LISTEN: &str = "0.0.0.0:50052";
