//! API keys on the client API: with TLS, every Coordinator call carries
//! `authorization: Bearer KEY`, checked (with the key's request rate) before any handler runs;
//! without TLS (loopback) there is nothing to check.

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

use super::{
    bearer,
    gate::{Gate, Refusal},
};

/// Checks each call's key against the coordinator's data directory (so a key made or revoked
/// there counts at once), and its rate.
#[derive(Clone)]
pub struct KeyCheck(pub Option<Arc<Gate>>);

impl Interceptor for KeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(gate) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(bearer);
        gate.admit(presented).map_err(|refusal| match refusal {
            Refusal::Key(_) => Status::unauthenticated(refusal.to_string()),
            Refusal::Rate { .. } => Status::resource_exhausted(refusal.to_string()),
        })?;
        Ok(request)
    }
}
