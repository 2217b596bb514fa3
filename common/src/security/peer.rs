//! What a verified peer certificate says about its holder: its role and name in the cluster
//! (subject organizational unit and common name), and its fingerprint.

use super::{Role, TlsError, fingerprint};

/// A peer as its certificate names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub name: String,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
}

impl Peer {
    /// Reads a certificate issued by the cluster's authority.
    pub fn from_der(der: &[u8]) -> Result<Peer, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::Invalid(format!("the certificate cannot be read: {e}")))?;
        let subject = cert.subject();
        let text = |value: Option<&x509_parser::x509::AttributeTypeAndValue>| {
            value.and_then(|v| v.as_str().ok()).map(str::to_string)
        };
        let name = text(subject.iter_common_name().next())
            .ok_or_else(|| TlsError::Invalid("the certificate names no one".into()))?;
        let role = text(subject.iter_organizational_unit().next())
            .and_then(|unit| Role::parse(&unit))
            .ok_or_else(|| {
                TlsError::Invalid(format!("the certificate of '{name}' names no cluster role"))
            })?;
        Ok(Peer {
            role,
            name,
            fingerprint: fingerprint(der),
        })
    }

    /// The peer of a request on a TLS connection, when it presented a certificate (which the
    /// server has already verified against the cluster's authority).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Result<Peer, TlsError>> {
        let certs = request.peer_certs()?;
        let leaf = certs.first()?;
        Some(Peer::from_der(leaf))
    }
}
