//! gRPC server set-up shared by every server: the health service and server reflection (v1 and
//! v1alpha, since grpcurl 1.8 and grpcio-reflection speak only v1alpha), keepalives, and binding
//! the listener.

use std::{future::Future, net::SocketAddr};

use tokio::net::TcpListener;
use tonic::{
    service::{Routes, RoutesBuilder},
    transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::server::HealthReporter;

use super::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::{proto::FILE_DESCRIPTOR_SET, security};

/// Calls open at once on one connection: one client cannot hold more of the server. The
/// coordinator's connection to an agent carries every run and generation placed there, far
/// fewer than this.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// TLS on a cluster server.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate (chained up to the cluster's authority) and key.
    pub identity: security::Identity,
    /// The cluster authority's certificate (PEM), which client certificates must chain up to.
    pub authority_pem: String,
    /// Whether every client must show a certificate (a node agent's server), or only may (the
    /// coordinator's, where people's tools come with API keys instead).
    pub client_certificate_required: bool,
}

impl ServerTls {
    fn config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &self.identity.cert_pem,
                &self.identity.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.authority_pem))
            .client_auth_optional(!self.client_certificate_required)
    }
}

/// The services every server carries besides its own: health and reflection.
pub struct ServerBase {
    routes: RoutesBuilder,
    health: HealthReporter,
}

/// Failure to set up or run a gRPC server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {error}{}", bind_hint(error))]
    Bind { addr: String, error: std::io::Error },
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::InvalidInput => "; write HOST:PORT, for example 0.0.0.0:50051",
        std::io::ErrorKind::AddrInUse => {
            "; another process holds the port: stop it or pick another"
        }
        _ => "",
    }
}

impl ServeError {
    /// The exit status for a server that could not start: usage for a malformed address,
    /// infrastructure for anything else.
    pub fn exit_status(&self) -> u8 {
        match self {
            ServeError::Bind { error, .. } if error.kind() == std::io::ErrorKind::InvalidInput => {
                crate::exit::USAGE
            }
            _ => crate::exit::INFRASTRUCTURE,
        }
    }
}

impl ServerBase {
    /// Starts a route table holding health and reflection (v1 and v1alpha). Reflection lists
    /// `services` (the server's own, by full name) besides health and itself, and nothing else.
    pub fn new(services: &[&str]) -> Result<Self, ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection = || {
            let named = [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ];
            services
                .iter()
                .chain(&named)
                .fold(tonic_reflection::server::Builder::configure(), |b, name| {
                    b.with_service_name(*name)
                })
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let mut routes = RoutesBuilder::default();
        routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        Ok(ServerBase { routes, health })
    }

    /// The route table, to add the server's own services to.
    pub fn routes(&mut self) -> &mut RoutesBuilder {
        &mut self.routes
    }

    /// The health reporter, to flip services to NOT_SERVING on shutdown.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves the routes on an already bound listener until `shutdown` completes; with `tls`,
    /// over TLS only.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<ServerTls>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let routes: Routes = self.routes.routes();
        // Output chunks are small and latency matters: no Nagle delay on accepted connections.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut server = Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls.config())?;
        }
        server
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind_error = |error| ServeError::Bind {
        addr: addr.to_string(),
        error,
    };
    let well_formed = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !well_formed {
        return Err(bind_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a HOST:PORT address",
        )));
    }
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}
