//! A node's membership of a cluster that runs with TLS: its certificate, key and the cluster's
//! authority in its data directory (mode 0600), got once by joining with a token. A restarted
//! agent finds them there and needs no token.

use std::path::{Path, PathBuf};

use kowalski_exo_common::{
    cli_args,
    proto::{JoinRequest, agent_registry_client::AgentRegistryClient},
    security::{self, Identity, JoinToken, TlsError, files},
    transport::{self, ClientTls, ServerTls},
};
use rcgen::{CertificateParams, DnType, KeyPair};

const CERT: &str = "node.pem";
const KEY: &str = "node.key";
const AUTHORITY: &str = "authority.pem";

/// Why a node could not join or use its membership.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Token(String),
    #[error("the coordinator refused to let '{name}' join: {reason}")]
    Refused { name: String, reason: String },
    #[error(
        "this agent's certificate (in {dir}) is for node '{held}', not '{asked}': start it with `--name {held}`, or join again with `--join TOKEN`"
    )]
    OtherName {
        dir: PathBuf,
        held: String,
        asked: String,
    },
}

/// What a member node holds.
#[derive(Clone, Debug)]
pub struct Membership {
    pub identity: Identity,
    pub authority_pem: String,
}

impl Membership {
    /// The membership kept in `dir`, if the node has joined.
    pub fn load(dir: &Path) -> Result<Option<Membership>, TlsError> {
        let read = |file: &str| files::read(&dir.join(file));
        match (read(CERT)?, read(KEY)?, read(AUTHORITY)?) {
            (Some(cert_pem), Some(key_pem), Some(authority_pem)) => Ok(Some(Membership {
                identity: Identity { cert_pem, key_pem },
                authority_pem,
            })),
            _ => Ok(None),
        }
    }

    /// SHA-256 of the cluster authority this node belongs to, as a join token carries it.
    pub fn authority_fingerprint(&self) -> Result<String, TlsError> {
        security::pem_fingerprint(&self.authority_pem)
    }

    /// The node name its certificate carries.
    pub fn name(&self) -> Result<String, TlsError> {
        let certs = security::authority::certificates(&self.identity.cert_pem)?;
        let leaf = certs
            .first()
            .ok_or_else(|| TlsError::Invalid("the node certificate file is empty".into()))?;
        Ok(security::Peer::from_der(leaf)?.name)
    }

    /// Joins the cluster of the coordinator at `coordinator` (`http://HOST:PORT`) as `name`
    /// with `token`: checks the coordinator against the token's authority before saying
    /// anything, has it sign a fresh key, and keeps the result in `dir`.
    pub async fn join(
        dir: &Path,
        coordinator: &str,
        token: &str,
        name: &str,
    ) -> Result<Membership, MembershipError> {
        let token = JoinToken::parse(token).map_err(MembershipError::Token)?;
        let (host, port) = host_and_port(coordinator)?;
        let authority_pem =
            security::pinned::fetch_authority(&host, port, &token.authority).await?;
        let key = KeyPair::generate().map_err(TlsError::from)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        let request = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(TlsError::from)?;
        let tls = ClientTls {
            authority_pem: authority_pem.clone(),
            identity: None,
            server_name: None,
        };
        let refused = |reason: String| MembershipError::Refused {
            name: name.to_string(),
            reason,
        };
        let channel = transport::endpoint(coordinator, Some(&tls))
            .map_err(|e| refused(e.to_string()))?
            .connect()
            .await
            .map_err(|e| refused(kowalski_exo_common::error_text::error_chain(&e)))?;
        let answer = AgentRegistryClient::new(channel)
            .join(JoinRequest {
                token_secret: token.secret,
                name: name.to_string(),
                csr_pem: request,
            })
            .await
            .map_err(|status| refused(status.message().to_string()))?
            .into_inner();
        let membership = Membership {
            identity: Identity {
                cert_pem: answer.certificate_chain_pem,
                key_pem: key.serialize_pem(),
            },
            authority_pem,
        };
        files::ensure_dir(dir)?;
        files::write_private(&dir.join(KEY), &membership.identity.key_pem)?;
        files::write_private(&dir.join(CERT), &membership.identity.cert_pem)?;
        files::write_private(&dir.join(AUTHORITY), &membership.authority_pem)?;
        tracing::info!(node = name, dir = %dir.display(), "joined the cluster");
        Ok(membership)
    }

    /// The membership to use: the one in `dir` when it names `name`, else a fresh one from
    /// `token`; none without either.
    pub async fn resolve(
        dir: &Path,
        coordinator: Option<&str>,
        token: Option<&str>,
        name: &str,
    ) -> Result<Option<Membership>, MembershipError> {
        if let Some(held) = Membership::load(dir)? {
            let held_name = held.name()?;
            // A token of another cluster (another authority) means: join that one instead.
            let same_cluster = match token {
                Some(token) => {
                    let token = JoinToken::parse(token).map_err(MembershipError::Token)?;
                    held.authority_fingerprint()? == token.authority
                }
                None => true,
            };
            if held_name == name && same_cluster {
                if token.is_some() {
                    tracing::info!(
                        dir = %dir.display(),
                        "already a member of this cluster: --join is not needed"
                    );
                }
                return Ok(Some(held));
            }
            if !same_cluster {
                tracing::warn!(
                    dir = %dir.display(),
                    "the join token is another cluster's: leaving the one this agent belonged to"
                );
            }
            if token.is_none() {
                return Err(MembershipError::OtherName {
                    dir: dir.to_path_buf(),
                    held: held_name,
                    asked: name.to_string(),
                });
            }
        }
        match (coordinator, token) {
            (Some(coordinator), Some(token)) => {
                Ok(Some(Membership::join(dir, coordinator, token, name).await?))
            }
            (None, Some(_)) => Err(MembershipError::Token(
                "--join needs --coordinator: the coordinator to join".into(),
            )),
            _ => Ok(None),
        }
    }

    /// TLS towards the coordinator, shown with the node's certificate.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            authority_pem: self.authority_pem.clone(),
            identity: Some(self.identity.clone()),
            server_name: None,
        }
    }

    /// TLS for the node's own server: only holders of the cluster's certificates may call.
    pub fn server_tls(&self) -> ServerTls {
        ServerTls {
            identity: self.identity.clone(),
            authority_pem: self.authority_pem.clone(),
            client_certificate_required: true,
        }
    }
}

/// `http://HOST:PORT` split into host and port.
fn host_and_port(url: &str) -> Result<(String, u16), MembershipError> {
    let bad = || {
        MembershipError::Token(format!(
            "'{url}' is not a coordinator URL like http://HOST:PORT"
        ))
    };
    let (host, port) = cli_args::url_host_port(url)
        .rsplit_once(':')
        .ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    Ok((
        host.trim_matches(|c| c == '[' || c == ']').to_string(),
        port,
    ))
}
