//! The one way every client dials a gRPC server of the cluster: the coordinator its agents, an
//! agent its coordinator, the CLI and the tests. A server that does not accept the connection
//! within [`CONNECT_TIMEOUT`] is unreachable; keepalives notice one that vanishes later. With
//! [`ClientTls`] the server must prove itself with a certificate of the cluster's authority, and
//! the client shows its own when it has one.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::security;

/// TLS towards a cluster server.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The cluster authority's certificate (PEM): the only one trusted.
    pub authority_pem: String,
    /// The client's own certificate and key, when it has them (nodes, the coordinator).
    pub identity: Option<security::Identity>,
    /// The name the server's certificate must carry, when not the host dialled (a node is
    /// checked by its node name, whatever its address today).
    pub server_name: Option<String>,
}

impl ClientTls {
    fn config(&self) -> ClientTlsConfig {
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.authority_pem));
        if let Some(identity) = &self.identity {
            config = config.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

/// Dialling a server that does not accept within this fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoint at `url` (`http://HOST:PORT`, or `https://` with TLS), not yet connected.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, tonic::transport::Error> {
    let url = match tls {
        Some(_) => url.replacen("http://", "https://", 1),
        None => url.to_string(),
    };
    let endpoint = Endpoint::from_shared(url)?;
    let endpoint = match tls {
        Some(tls) => endpoint.tls_config(tls.config())?,
        None => endpoint,
    };
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        // Output chunks and tokens are small and latency matters: no Nagle delay.
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}
