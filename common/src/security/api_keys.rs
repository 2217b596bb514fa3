//! API keys on the client API: with TLS, every Coordinator call carries
//! `authorization: Bearer KEY`, checked before any handler runs; without TLS (loopback) there is
//! nothing to check.

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

use super::{bearer, trust::ClusterTrust};

/// Checks each call's key against the coordinator's data directory (so a key made or revoked
/// there counts at once).
#[derive(Clone)]
pub struct KeyCheck(pub Option<Arc<ClusterTrust>>);

impl Interceptor for KeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(trust) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(bearer);
        trust
            .authorize(presented)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(request)
    }
}
