//! The cluster's certificate authority: made once by the coordinator, it issues the
//! coordinator's own certificate, each node's (from the node's signing request, so a node's key
//! never leaves it) and client certificates for people's tools.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType,
};

use super::{Identity, Role, TlsError, fingerprint};

/// The authority's name, as its certificate's subject says it.
const AUTHORITY_NAME: &str = "Kowalski Exo cluster authority";

/// A certificate authority that can sign.
pub struct Authority {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// A new authority with a fresh key; returns it with its key's PEM, to keep.
    pub fn create() -> Result<(Authority, String), TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, AUTHORITY_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let authority = Authority {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        };
        Ok((authority, key_pem))
    }

    /// The authority kept as `cert_pem` and `key_pem`.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = pem_der(cert_pem)?;
        Ok(Authority {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The SHA-256 of its certificate, which join tokens carry.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// A certificate and fresh key for `name` in `role`, valid for `names` (DNS names or IP
    /// addresses), chained up to this authority.
    pub fn issue(&self, role: Role, name: &str, names: &[String]) -> Result<Identity, TlsError> {
        let key = KeyPair::generate()?;
        let cert = self.sign(role, name, names, &key)?;
        Ok(Identity {
            cert_pem: cert,
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for the key in a node's signing request (PEM), naming the node as given:
    /// whatever the request itself asks for is ignored. Chained up to this authority.
    pub fn sign_request(
        &self,
        role: Role,
        name: &str,
        names: &[String],
        request_pem: &str,
    ) -> Result<String, TlsError> {
        let request = CertificateSigningRequestParams::from_pem(request_pem)
            .map_err(|e| TlsError::Invalid(format!("the signing request is not valid: {e}")))?;
        self.sign(role, name, names, &request.public_key)
    }

    fn sign(
        &self,
        role: Role,
        name: &str,
        names: &[String],
        key: &impl PublicKeyData,
    ) -> Result<String, TlsError> {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        subject.push(DnType::OrganizationalUnitName, role.name());
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }
}

/// The DER inside the first PEM block of `pem`.
fn pem_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| TlsError::Invalid(format!("not a PEM certificate: {e}")))
}

/// Every certificate in `pem`, as DER.
pub fn certificates(pem: &str) -> Result<Vec<Vec<u8>>, TlsError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("not PEM certificates: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Peer;

    #[test]
    fn a_node_certificate_names_the_node_not_what_its_request_asked_for() {
        let (authority, key_pem) = Authority::create().unwrap();
        let authority = Authority::load(authority.cert_pem(), &key_pem).unwrap();
        let node_key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["coordinator".to_string()]).unwrap();
        asked
            .distinguished_name
            .push(DnType::CommonName, "the-coordinator");
        let request = asked.serialize_request(&node_key).unwrap().pem().unwrap();
        let chain = authority
            .sign_request(
                Role::Node,
                "kitchen",
                &["kitchen.node.kowalski-exo".into()],
                &request,
            )
            .unwrap();
        let certs = certificates(&chain).unwrap();
        assert_eq!(
            certs.len(),
            2,
            "the node's certificate, then the authority's"
        );
        assert_eq!(fingerprint(&certs[1]), authority.fingerprint());
        let peer = Peer::from_der(&certs[0]).unwrap();
        assert_eq!((peer.role, peer.name.as_str()), (Role::Node, "kitchen"));
    }

    #[test]
    fn a_request_that_is_not_one_is_refused_saying_so() {
        let (authority, _) = Authority::create().unwrap();
        let refused = authority
            .sign_request(
                Role::Node,
                "n",
                &[],
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            )
            .unwrap_err();
        assert!(
            refused.to_string().contains("signing request is not valid"),
            "{refused}"
        );
    }
}
