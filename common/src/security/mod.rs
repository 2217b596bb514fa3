//! Cluster identity and access: the cluster's certificate authority and what it issues
//! ([`authority`]), join tokens ([`token`]), what a verified peer's certificate says ([`peer`]),
//! first contact with a coordinator known only by its authority's hash ([`pinned`]), the
//! private files they are kept in ([`files`]), the coordinator's data directory of authority,
//! token, node records and API keys ([`trust`]), and the check of API keys on gRPC calls
//! ([`api_keys`]). Built on rcgen and rustls with the ring provider.

pub mod api_keys;
pub mod authority;
pub mod files;
pub mod gate;
pub mod peer;
pub mod pinned;
pub mod token;
pub mod trust;

use sha2::{Digest, Sha256};

pub use authority::Authority;
pub use peer::Peer;
pub use token::JoinToken;

/// What a certificate's holder is in the cluster, carried as its subject's organizational unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The coordinator: serves agents and clients, calls agents.
    Coordinator,
    /// A node agent: registers with the coordinator, serves it.
    Node,
    /// A person's tool (grpcurl, a script) allowed to call agents directly.
    Client,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Client => "client",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        [Role::Coordinator, Role::Node, Role::Client]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// A certificate (with the chain up to the cluster's authority) and its private key, as PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Never prints the key, so no log or panic message can carry it.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("<private>"))
            .finish()
    }
}

/// The credential in an `Authorization` header's value: what follows the scheme `Bearer`
/// (matched in any case, as RFC 7235 asks), or the whole value.
pub fn bearer(value: &str) -> &str {
    let value = value.trim();
    match value.split_once(' ') {
        Some((scheme, credential)) if scheme.eq_ignore_ascii_case("bearer") => credential.trim(),
        _ => value,
    }
}

/// Why a certificate, token or TLS file could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{path}: {error}")]
    File {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The SHA-256 of a certificate's DER, in hex: how a join token names the cluster's authority.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SHA-256 of the first certificate in `pem` (a leaf before its chain), in hex.
pub fn pem_fingerprint(pem: &str) -> Result<String, TlsError> {
    let certificates = authority::certificates(pem)?;
    let first = certificates
        .first()
        .ok_or_else(|| TlsError::Invalid("no certificate in the PEM text".into()))?;
    Ok(fingerprint(first))
}

/// The DNS name a node's certificate carries, derived from its node name: the coordinator
/// checks it when it calls the node, whatever address the node has today.
pub fn node_dns_name(node: &str) -> String {
    let label: String = node
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(50)
        .collect();
    let label = label.trim_matches('-');
    let label = if label.is_empty() { "node" } else { label };
    format!("{label}.node.kowalski-exo")
}

/// The ring crypto provider every TLS configuration uses.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// `n` random bytes from the system's secure source, in hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the system's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_never_printed_and_bearer_is_read_in_any_case() {
        let identity = Identity {
            cert_pem: "CERT".into(),
            key_pem: "SECRET KEY".into(),
        };
        assert!(!format!("{identity:?}").contains("SECRET"));
        assert_eq!(bearer("Bearer kxk_1"), "kxk_1");
        assert_eq!(bearer("bearer  kxk_1 "), "kxk_1");
        assert_eq!(bearer("kxk_1"), "kxk_1");
    }

    #[test]
    fn node_names_become_valid_dns_names() {
        assert_eq!(
            node_dns_name("Kitchen Pi #2"),
            "kitchen-pi--2.node.kowalski-exo"
        );
        assert_eq!(node_dns_name("!!!"), "node.node.kowalski-exo");
        assert_eq!(random_hex(16).len(), 32);
        assert_ne!(random_hex(16), random_hex(16));
    }
}
