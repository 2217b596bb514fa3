//! First contact with a coordinator known only by its authority's fingerprint (from a join
//! token): a TLS handshake that accepts the coordinator's certificate only when it chains up to
//! an authority with that fingerprint, and brings the authority's certificate back, to trust
//! from then on. A machine impersonating the coordinator fails the handshake and learns nothing.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{TlsError, fingerprint, provider};

/// A coordinator that has not completed the handshake within this is unreachable.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The PEM of the authority with `authority` fingerprint, as the coordinator at `host:port`
/// presents it in a verified handshake.
pub async fn fetch_authority(host: &str, port: u16, authority: &str) -> Result<String, TlsError> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        authority: authority.to_string(),
        provider: provider.clone(),
        found: Mutex::default(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| TlsError::Invalid(format!("'{host}' is not a host name: {e}")))?;
    let unreachable = |reason: String| {
        TlsError::Invalid(format!(
            "cannot reach the coordinator at {host}:{port}: {reason}"
        ))
    };
    let handshake = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                TlsError::Invalid(format!(
                    "no TLS with the coordinator at {host}:{port} ({}): it seems to serve plaintext, and a join token is only for a coordinator that runs with TLS (`coordinator serve --tls`, or on an address off loopback); to join a plaintext one, start the agent without --join",
                    crate::error_text::root_cause(&e)
                ))
            })
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| unreachable(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")))??;
    let found = verifier
        .found
        .lock()
        .expect("verifier lock poisoned")
        .take();
    let der =
        found.ok_or_else(|| TlsError::Invalid("the handshake brought no authority".into()))?;
    Ok(pem("CERTIFICATE", &der))
}

/// `der` as a PEM block of `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Accepts a server chain only under the pinned authority, and keeps that authority.
#[derive(Debug)]
struct Pinned {
    authority: String,
    provider: Arc<CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let authority = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.authority)
            .ok_or_else(|| {
                rustls::Error::General(
                    "its certificate authority is not the one the join token names: this is not \
                     your coordinator, or the token is for another cluster"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(authority.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        *self.found.lock().expect("verifier lock poisoned") = Some(authority.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};

    use super::*;
    use crate::security::{Authority, Role};

    /// A TLS server on loopback presenting a certificate of `authority`; accepts one handshake.
    async fn server(authority: &Authority) -> u16 {
        let identity = authority
            .issue(Role::Coordinator, "coordinator", &["127.0.0.1".into()])
            .unwrap();
        let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        port
    }

    #[tokio::test]
    async fn the_pinned_authority_is_brought_back_and_another_is_refused() {
        let (ours, _) = Authority::create().unwrap();
        let port = server(&ours).await;
        let fetched = fetch_authority("127.0.0.1", port, &ours.fingerprint())
            .await
            .unwrap();
        assert_eq!(fetched, ours.cert_pem());

        let (impostor, _) = Authority::create().unwrap();
        let port = server(&impostor).await;
        let refused = fetch_authority("127.0.0.1", port, &ours.fingerprint())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("not the one the join token names"),
            "{refused}"
        );
    }
}
