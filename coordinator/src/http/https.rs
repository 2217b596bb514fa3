//! HTTPS for the HTTP API when the coordinator runs with TLS: a listener that hands axum only
//! connections whose TLS handshake (with the coordinator's own certificate) completed. Each
//! handshake runs on its own task, bounded in time and in number: one address with too many
//! under way has its new connections closed, and past the overall cap new connections wait in the
//! kernel's backlog, so a slow, silent or flooding client holds up no one else.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::serve::Listener;
use kowalski_exo_common::security::{self, Identity, TlsError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// A handshake not done within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections with a finished handshake waiting for axum to take them.
const READY_QUEUE: usize = 64;
/// Handshakes under way at once; past it new connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;
/// Handshakes under way at once from one address; past it its new connections are closed.
const MAX_HANDSHAKES_PER_ADDRESS: usize = 32;

/// Handshakes under way, by the client's address.
#[derive(Default)]
struct InFlight(Mutex<HashMap<IpAddr, usize>>);

/// One handshake counted in [`InFlight`] until dropped.
struct Counted {
    in_flight: Arc<InFlight>,
    address: IpAddr,
}

impl InFlight {
    /// Counts a handshake from `address`, or None when it has as many under way as it may.
    fn start(self: &Arc<Self>, address: IpAddr) -> Option<Counted> {
        let mut counts = self.0.lock().expect("handshake counts poisoned");
        let count = counts.entry(address).or_default();
        if *count >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(Counted {
            in_flight: self.clone(),
            address,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.in_flight.0.lock().expect("handshake counts poisoned");
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Connections on a TCP listener, each after its TLS handshake.
pub struct HttpsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl HttpsListener {
    /// Serves TLS as `identity` on `listener`, accepting until the listener is dropped with the
    /// returned value.
    pub fn new(listener: TcpListener, identity: &Identity) -> Result<HttpsListener, TlsError> {
        let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Invalid(format!("the coordinator's certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
            .map_err(|e| TlsError::Invalid(format!("the coordinator's key: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(security::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Invalid(format!("the coordinator's certificate: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let local = listener
            .local_addr()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let (sender, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(listener, acceptor, sender));
        Ok(HttpsListener { ready, local })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let in_flight = Arc::new(InFlight::default());
    loop {
        let permit = tokio::select! {
            permit = handshakes.clone().acquire_owned() => permit.expect("never closed"),
            _ = ready.closed() => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ready.closed() => return,
        };
        let Some(counted) = in_flight.start(peer.ip()) else {
            tracing::debug!(%peer, "too many HTTPS handshakes from one address: closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop((permit, counted));
            match handshake {
                Ok(Ok(stream)) => {
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
            }
        });
    }
}

impl Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop ends only with this listener; nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_its_share_of_handshakes_and_others_are_untouched() {
        let in_flight = Arc::new(InFlight::default());
        let (flood, other): (IpAddr, IpAddr) =
            ("10.0.0.9".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let held: Vec<Counted> = (0..MAX_HANDSHAKES_PER_ADDRESS)
            .map(|_| in_flight.start(flood).unwrap())
            .collect();
        assert!(in_flight.start(flood).is_none());
        assert!(in_flight.start(other).is_some());
        drop(held);
        assert!(in_flight.start(flood).is_some());
        assert!(in_flight.0.lock().unwrap().get(&other).is_none());
    }
}
