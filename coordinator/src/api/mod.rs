//! The coordinator's gRPC surfaces: the AgentRegistry stream agents hold, and the Coordinator
//! service clients call, behind its API keys. Both only translate between the wire and the
//! registry.

pub mod client_service;
pub mod registry_service;
