//! The coordinator's side of cluster identity, kept in its data directory: the cluster's
//! authority, the join token, the node certificates issued and those revoked. The commands that
//! change them (`coordinator token --new`, `coordinator nodes revoke`) only write files; a running
//! coordinator reads the token and the revocations each time it needs them, so a change takes
//! effect at once, without a restart.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use nix::fcntl::{Flock, FlockArg};
use subtle::ConstantTimeEq;

use crate::{
    security::{Authority, Identity, JoinToken, Peer, Role, TlsError, files, node_dns_name},
    transport::{ClientTls, ServerTls},
};

const AUTHORITY_CERT: &str = "authority.pem";
const AUTHORITY_KEY: &str = "authority.key";
const TOKEN: &str = "join-token";
/// One line per node certificate issued: `NAME FINGERPRINT`.
const ISSUED: &str = "issued-nodes";
/// One fingerprint per line: node certificates no longer accepted.
const REVOKED: &str = "revoked-nodes";
/// One line per client certificate issued: `NAME SHA256-OF-THE-CERTIFICATE`.
const ISSUED_CLIENTS: &str = "issued-clients";
/// One fingerprint per line: client certificates no longer accepted.
const REVOKED_CLIENTS: &str = "revoked-clients";
/// One line per client API key: `NAME SHA256-OF-THE-KEY`; the keys themselves are not kept.
const API_KEYS: &str = "api-keys";
/// How a key starts, so it is recognisable in a config file or a leak scanner.
const KEY_PREFIX: &str = "kxk_";

/// Why a device may not join or attach.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "the join token is not this cluster's (print the current one with `coordinator token`)"
    )]
    WrongToken,
    #[error(
        "node '{0}' holds a certificate that was revoked (`coordinator nodes revoke`) or not issued by this coordinator; join it again with the new token"
    )]
    Revoked(String),
    #[error(
        "a node called '{holder}' has joined, so '{name}' is taken; revoke it first (`coordinator nodes revoke {holder}`) if this device replaces it"
    )]
    Taken { name: String, holder: String },
    #[error("'{0}' cannot name a node: use letters, digits, '.', '_' and '-', at most 63 of them")]
    BadName(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The cluster's authority and the files around it.
pub struct ClusterTrust {
    dir: PathBuf,
    authority: Authority,
    /// The API keys file as last read, kept while the file is the same one: every call checks
    /// a key, and reading the file each time would put disk I/O on every request.
    keys: Mutex<Option<(FileVersion, String)>>,
}

/// Which write of a file this is: each atomic replacement is a new inode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    inode: u64,
    modified: Option<std::time::SystemTime>,
}

impl ClusterTrust {
    /// Opens the data directory, making the authority and a join token on first use.
    pub fn open(dir: &Path) -> Result<ClusterTrust, TlsError> {
        files::ensure_dir(dir)?;
        let _locked = lock(dir)?;
        let cert = files::read(&dir.join(AUTHORITY_CERT))?;
        let key = files::read(&dir.join(AUTHORITY_KEY))?;
        let authority = match (cert, key) {
            (Some(cert), Some(key)) => Authority::load(&cert, &key)?,
            (Some(_), None) | (None, Some(_)) => {
                return Err(TlsError::Invalid(format!(
                    "{} holds only half of the cluster's authority ({AUTHORITY_CERT} and {AUTHORITY_KEY} go together)",
                    dir.display()
                )));
            }
            (None, None) => {
                let (authority, key) = Authority::create()?;
                files::write_private(&dir.join(AUTHORITY_KEY), &key)?;
                files::write_private(&dir.join(AUTHORITY_CERT), authority.cert_pem())?;
                tracing::info!(dir = %dir.display(), "made the cluster's certificate authority");
                authority
            }
        };
        let trust = ClusterTrust {
            dir: dir.to_path_buf(),
            authority,
            keys: Mutex::default(),
        };
        if files::read(&trust.path(TOKEN))?.is_none() {
            trust.write_token()?;
        }
        Ok(trust)
    }

    /// Holds the data directory's lock: one reader-modifier-writer of its files at a time,
    /// across processes (a running coordinator and an admin command).
    fn lock(&self) -> Result<Flock<std::fs::File>, TlsError> {
        lock(&self.dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn authority_pem(&self) -> &str {
        self.authority.cert_pem()
    }

    /// SHA-256 of the authority's certificate, hex, as join tokens carry it.
    pub fn fingerprint(&self) -> String {
        self.authority.fingerprint()
    }

    /// The join token now in force.
    pub fn token(&self) -> Result<JoinToken, TlsError> {
        let text = files::read(&self.path(TOKEN))?.unwrap_or_default();
        JoinToken::parse(&text)
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", self.path(TOKEN).display())))
    }

    /// Replaces the join token: the old one admits no one from now on.
    pub fn new_token(&self) -> Result<JoinToken, TlsError> {
        let _locked = self.lock()?;
        self.write_token()
    }

    fn write_token(&self) -> Result<JoinToken, TlsError> {
        let token = JoinToken::new(&self.authority.fingerprint());
        files::write_private(&self.path(TOKEN), &format!("{token}\n"))?;
        Ok(token)
    }

    /// The coordinator's own certificate, valid for `names` (its addresses, `localhost`, names
    /// given with `--tls-name`); it also proves the coordinator to the agents it calls.
    pub fn coordinator_identity(&self, names: &[String]) -> Result<Identity, TlsError> {
        self.authority
            .issue(Role::Coordinator, "coordinator", names)
    }

    /// TLS for the coordinator's gRPC server: agents show their node certificates, people's
    /// tools need none (they come with API keys).
    pub fn server_tls(&self, identity: &Identity) -> ServerTls {
        ServerTls {
            identity: identity.clone(),
            authority_pem: self.authority_pem().to_string(),
            client_certificate_required: false,
        }
    }

    /// TLS for calling agents, as the coordinator, checking each by its node name.
    pub fn agent_tls(&self, identity: &Identity) -> ClientTls {
        ClientTls {
            authority_pem: self.authority_pem().to_string(),
            identity: Some(identity.clone()),
            server_name: None,
        }
    }

    /// A certificate and key for a person's tool (grpcurl, a script) to call agents directly.
    /// A client certificate for `name`, recorded so it can be revoked.
    pub fn issue_client(&self, name: &str) -> Result<Identity, TlsError> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(TlsError::Invalid(format!(
                "'{name}' cannot name a client: use a word without spaces"
            )));
        }
        let _locked = self.lock()?;
        let identity = self.authority.issue(Role::Client, name, &[])?;
        self.record_issued(ISSUED_CLIENTS, name, &identity.cert_pem)?;
        Ok(identity)
    }

    /// Adds `NAME FINGERPRINT` of the leaf of `chain` to the `issued` record. Under the lock.
    fn record_issued(&self, issued: &str, name: &str, chain: &str) -> Result<(), TlsError> {
        let fingerprint = super::pem_fingerprint(chain)?;
        let mut records = files::read(&self.path(issued))?.unwrap_or_default();
        records.push_str(&format!("{name} {fingerprint}\n"));
        files::write_private(&self.path(issued), &records)
    }

    /// Revokes every client certificate issued to `name`; returns how many.
    pub fn revoke_client(&self, name: &str) -> Result<usize, TlsError> {
        let _locked = self.lock()?;
        self.revoke_issued(ISSUED_CLIENTS, REVOKED_CLIENTS, name)
    }

    /// Adds the fingerprint of each certificate the `issued` record has for `name` to the
    /// `revoked` record; returns how many were not there yet. Under the lock.
    fn revoke_issued(&self, issued: &str, revoked: &str, name: &str) -> Result<usize, TlsError> {
        let records = files::read(&self.path(issued))?.unwrap_or_default();
        let mut refused = files::read(&self.path(revoked))?.unwrap_or_default();
        let mut count = 0;
        for (holder, fingerprint) in records.lines().filter_map(|l| l.rsplit_once(' ')) {
            if holder == name && !refused.lines().any(|l| l.trim() == fingerprint) {
                refused.push_str(&format!("{fingerprint}\n"));
                count += 1;
            }
        }
        files::write_private(&self.path(revoked), &refused)?;
        Ok(count)
    }

    /// Fingerprints of the revoked client certificates.
    pub fn revoked_clients(&self) -> Result<Vec<String>, TlsError> {
        let revoked = files::read(&self.path(REVOKED_CLIENTS))?.unwrap_or_default();
        Ok(revoked
            .lines()
            .map(|l| l.trim().to_ascii_lowercase())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Signs a joining node's key when `secret` is the token's; the certificate names `name`,
    /// which no node holding a certificate in force may have (nor one that reads the same as a
    /// DNS name).
    pub fn join(&self, secret: &str, name: &str, request_pem: &str) -> Result<String, Refused> {
        if !self.token()?.admits(secret) {
            return Err(Refused::WrongToken);
        }
        check_node_name(name)?;
        let _locked = self.lock()?;
        if let Some((holder, _)) = self
            .nodes_in_force()?
            .into_iter()
            .find(|(holder, _)| node_dns_name(holder) == node_dns_name(name))
        {
            return Err(Refused::Taken {
                name: name.to_string(),
                holder,
            });
        }
        let chain =
            self.authority
                .sign_request(Role::Node, name, &[node_dns_name(name)], request_pem)?;
        self.record_issued(ISSUED, name, &chain)?;
        Ok(chain)
    }

    /// Node certificates issued and not revoked: (name, fingerprint).
    fn nodes_in_force(&self) -> Result<Vec<(String, String)>, TlsError> {
        let issued = files::read(&self.path(ISSUED))?.unwrap_or_default();
        let revoked = files::read(&self.path(REVOKED))?.unwrap_or_default();
        Ok(issued
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(_, fingerprint)| !revoked.lines().any(|r| r.trim() == *fingerprint))
            .map(|(name, fingerprint)| (name.to_string(), fingerprint.to_string()))
            .collect())
    }

    /// Whether a node's certificate is still accepted: issued here, and not revoked.
    pub fn check_node(&self, peer: &Peer) -> Result<(), Refused> {
        if !self
            .nodes_in_force()?
            .iter()
            .any(|(_, fingerprint)| *fingerprint == peer.fingerprint)
        {
            return Err(Refused::Revoked(peer.name.clone()));
        }
        Ok(())
    }

    /// Makes an API key called `name`; returns the key, which is shown this once.
    pub fn create_api_key(&self, name: &str) -> Result<String, TlsError> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(TlsError::Invalid(format!(
                "'{name}' cannot name a key: use a word without spaces"
            )));
        }
        let _locked = self.lock()?;
        let mut keys = files::read(&self.path(API_KEYS))?.unwrap_or_default();
        if self.api_key_names()?.iter().any(|n| n == name) {
            return Err(TlsError::Invalid(format!(
                "a key called '{name}' exists; revoke it first (`coordinator apikey revoke {name}`)"
            )));
        }
        let key = format!("{KEY_PREFIX}{}", crate::security::random_hex(24));
        keys.push_str(&format!(
            "{name} {}
",
            key_hash(&key)
        ));
        files::write_private(&self.path(API_KEYS), &keys)?;
        Ok(key)
    }

    /// The names of the keys in force.
    pub fn api_key_names(&self) -> Result<Vec<String>, TlsError> {
        let keys = files::read(&self.path(API_KEYS))?.unwrap_or_default();
        Ok(keys
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(name, _)| name.to_string()))
            .collect())
    }

    /// Revokes the key called `name`; false when there is none.
    pub fn revoke_api_key(&self, name: &str) -> Result<bool, TlsError> {
        let _locked = self.lock()?;
        let keys = files::read(&self.path(API_KEYS))?.unwrap_or_default();
        let kept: Vec<&str> = keys
            .lines()
            .filter(|l| l.split_once(' ').is_none_or(|(n, _)| n != name))
            .collect();
        let found = kept.len() != keys.lines().count();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        files::write_private(&self.path(API_KEYS), &text)?;
        Ok(found)
    }

    /// The name of the key `presented`, if it is one in force (compared in constant time).
    pub fn api_key(&self, presented: &str) -> Result<Option<String>, TlsError> {
        let presented = key_hash(presented);
        let keys = self.current_keys()?;
        let mut found = None;
        for (name, hash) in keys.lines().filter_map(|l| l.split_once(' ')) {
            if bool::from(hash.as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(name.to_string());
            }
        }
        Ok(found)
    }

    /// The API keys file's text, read again only when the file was replaced.
    fn current_keys(&self) -> Result<String, TlsError> {
        let path = self.path(API_KEYS);
        let version = match std::fs::metadata(&path) {
            Ok(meta) => FileVersion {
                inode: meta.ino(),
                modified: meta.modified().ok(),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(error) => return Err(TlsError::File { path, error }),
        };
        let mut cached = self.keys.lock().expect("keys cache poisoned");
        if let Some((seen, text)) = &*cached
            && *seen == version
        {
            return Ok(text.clone());
        }
        let text = files::read(&path)?.unwrap_or_default();
        *cached = Some((version, text.clone()));
        Ok(text)
    }

    /// Revokes every certificate issued to node `name` and replaces the join token (whoever
    /// held the old one could join again); returns how many certificates.
    pub fn revoke(&self, name: &str) -> Result<usize, TlsError> {
        let _locked = self.lock()?;
        let count = self.revoke_issued(ISSUED, REVOKED, name)?;
        if count > 0 {
            self.write_token()?;
        }
        Ok(count)
    }
}

/// Why a client's call was refused for its key.
#[derive(Debug, thiserror::Error)]
pub enum KeyRefused {
    #[error(
        "this coordinator needs an API key: make one on its machine with `coordinator apikey create NAME`, then pass --api-key KEY (or KOWALSKI_API_KEY; over HTTP, the header `Authorization: Bearer KEY`)"
    )]
    Missing,
    #[error(
        "the API key is not one this coordinator knows (revoked, or another cluster's); `coordinator apikey list` on its machine shows those in force"
    )]
    Unknown,
    #[error("cannot read the API keys: {0}")]
    Unreadable(#[from] TlsError),
}

impl ClusterTrust {
    /// The name of the key a client presented, or why it may not call.
    pub fn authorize(&self, presented: Option<&str>) -> Result<String, KeyRefused> {
        let presented = presented
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(KeyRefused::Missing)?;
        self.api_key(presented)?.ok_or(KeyRefused::Unknown)
    }
}

/// Node names fit certificates and the one-line records: `[A-Za-z0-9._-]{1,63}`.
fn check_node_name(name: &str) -> Result<(), Refused> {
    let fits = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if fits {
        Ok(())
    } else {
        Err(Refused::BadName(name.to_string()))
    }
}

/// Takes the lock of the data directory `dir`, held until the returned file is dropped.
fn lock(dir: &Path) -> Result<Flock<std::fs::File>, TlsError> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| TlsError::File {
            path: path.clone(),
            error,
        })?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| TlsError::File {
        path,
        error: errno.into(),
    })
}

/// SHA-256 of a key, hex: all that is kept of it.
fn key_hash(key: &str) -> String {
    crate::security::fingerprint(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    fn request() -> String {
        let key = KeyPair::generate().unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn a_node_joins_with_the_token_until_it_is_replaced_and_a_revoked_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let trust = ClusterTrust::open(dir.path()).unwrap();
        let token = trust.token().unwrap();
        assert_eq!(
            token.authority,
            crate::security::Authority::load(
                trust.authority_pem(),
                &files::read(&dir.path().join(AUTHORITY_KEY))
                    .unwrap()
                    .unwrap(),
            )
            .unwrap()
            .fingerprint()
        );
        let chain = trust.join(&token.secret, "kitchen", &request()).unwrap();
        let leaf = crate::security::authority::certificates(&chain).unwrap();
        let peer = Peer::from_der(&leaf[0]).unwrap();
        assert!(trust.check_node(&peer).is_ok());

        // Reopened (a restart): the same authority and token.
        let reopened = ClusterTrust::open(dir.path()).unwrap();
        assert_eq!(reopened.token().unwrap(), token);

        let replaced = reopened.new_token().unwrap();
        assert!(matches!(
            trust.join(&token.secret, "garage", &request()),
            Err(Refused::WrongToken)
        ));
        assert!(trust.join(&replaced.secret, "garage", &request()).is_ok());

        // A name in force is taken, also as a DNS name; a name must fit a certificate.
        for taken in ["kitchen", "Kitchen"] {
            assert!(matches!(
                trust.join(&replaced.secret, taken, &request()),
                Err(Refused::Taken { .. })
            ));
        }
        assert!(matches!(
            trust.join(&replaced.secret, "Kitchen Pi", &request()),
            Err(Refused::BadName(_))
        ));

        // Revoked: refused, the token replaced, and the name free for a new join.
        assert_eq!(trust.revoke("kitchen").unwrap(), 1);
        let refused = trust.check_node(&peer).unwrap_err().to_string();
        assert!(
            refused.contains("'kitchen' holds a certificate that was revoked"),
            "{refused}"
        );
        assert!(matches!(
            trust.join(&replaced.secret, "kitchen", &request()),
            Err(Refused::WrongToken)
        ));
        let rotated = trust.token().unwrap();
        assert!(trust.join(&rotated.secret, "kitchen", &request()).is_ok());
    }

    #[test]
    fn an_api_key_works_until_revoked_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let trust = ClusterTrust::open(dir.path()).unwrap();
        let key = trust.create_api_key("laptop").unwrap();
        assert!(key.starts_with("kxk_"));
        assert_eq!(trust.api_key(&key).unwrap().as_deref(), Some("laptop"));
        assert_eq!(trust.api_key("kxk_wrong").unwrap(), None);
        let kept = std::fs::read_to_string(dir.path().join(API_KEYS)).unwrap();
        assert!(!kept.contains(&key), "the key itself was written down");
        assert!(
            trust.create_api_key("laptop").is_err(),
            "two keys of one name"
        );
        trust.create_api_key("phone").unwrap();
        assert_eq!(trust.api_key_names().unwrap(), ["laptop", "phone"]);
        assert!(trust.revoke_api_key("laptop").unwrap());
        assert!(!trust.revoke_api_key("laptop").unwrap());
        assert_eq!(trust.api_key(&key).unwrap(), None);
        assert_eq!(trust.api_key_names().unwrap(), ["phone"]);
    }
}
