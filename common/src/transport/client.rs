//! The one way every client dials a gRPC server of the cluster: the coordinator its agents, an
//! agent its coordinator, the CLI and the tests. A server that does not accept the connection
//! within [`CONNECT_TIMEOUT`] is unreachable; keepalives notice one that vanishes later.

use std::time::Duration;

use tonic::transport::Endpoint;

use super::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// Dialling a server that does not accept within this fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoint at `url` (`http://HOST:PORT`), not yet connected.
pub fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        // Output chunks and tokens are small and latency matters: no Nagle delay.
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}
