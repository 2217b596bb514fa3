//! The cluster-identity commands and choices: whether `serve` runs with TLS (always off
//! loopback, unless told `--insecure`), `coordinator token`, `coordinator apikey`,
//! `coordinator cert issue` and `coordinator nodes revoke`.
//! They work on the data directory of a coordinator on this machine; a running one sees the
//! change at once.

use std::path::Path;

use super::Failure;
use kowalski_exo_common::{
    cli_args::is_loopback,
    security::{gate, trust::ClusterTrust},
};

use crate::server::TlsSetup;

/// TLS for a coordinator on `listen` (and its HTTP API on `http`): asked for, or when either
/// is off loopback unless `insecure` (which then says what it exposes).
pub fn tls_setup(
    listen: &str,
    http: Option<&str>,
    tls: bool,
    insecure: bool,
    data_dir: &Path,
    names: &[String],
) -> Option<TlsSetup> {
    let loopback = is_loopback(listen) && http.is_none_or(is_loopback);
    if tls || (!loopback && !insecure) {
        return Some(TlsSetup {
            data_dir: data_dir.to_path_buf(),
            names: names.to_vec(),
            rate_limit: gate::DEFAULT_RATE,
        });
    }
    if !loopback {
        let exposed = match http {
            Some(http) => format!("{listen} or {http}"),
            None => listen.to_string(),
        };
        tracing::warn!(
            "running without TLS (--insecure): any device that reaches {exposed} can register as a node, run any code on every node, and use every model"
        );
    }
    None
}

fn open(data_dir: &Path) -> Result<ClusterTrust, Failure> {
    ClusterTrust::open(data_dir).map_err(|e| Failure::infrastructure(e.to_string()))
}

/// `coordinator token [--new]`: prints the join token, made anew with `new`.
pub fn token(data_dir: &Path, new: bool) -> Result<u8, Failure> {
    let trust = open(data_dir)?;
    let token = if new {
        trust.new_token()
    } else {
        trust.token()
    }
    .map_err(|e| Failure::infrastructure(e.to_string()))?;
    println!("{token}");
    if new {
        eprintln!("the previous token no longer lets a device join; joined devices stay");
    }
    Ok(0)
}

/// `coordinator nodes revoke NAME`: the node's certificates are refused from now on.
pub fn revoke(data_dir: &Path, name: &str) -> Result<u8, Failure> {
    let revoked = open(data_dir)?
        .revoke(name)
        .map_err(|e| Failure::infrastructure(e.to_string()))?;
    if revoked == 0 {
        return Err(Failure::new(
            kowalski_exo_common::exit::USAGE,
            format!(
                "no certificate was issued to a node called '{name}' (or it is already revoked)"
            ),
        ));
    }
    eprintln!(
        "revoked node '{name}' and replaced the join token (`coordinator token` prints the new one): the node can come back only by joining with it"
    );
    Ok(0)
}

/// What `coordinator apikey` does.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum ApiKeyAction {
    /// Make a key for a client; it is printed this once and only its hash is kept.
    Create { name: String },
    /// The names of the keys in force.
    List,
    /// Refuse a key from now on.
    Revoke { name: String },
}

/// `coordinator apikey create|list|revoke`.
pub fn api_key(data_dir: &Path, action: &ApiKeyAction) -> Result<u8, Failure> {
    let trust = open(data_dir)?;
    let failed = |e: kowalski_exo_common::security::TlsError| Failure::usage(e.to_string());
    match action {
        ApiKeyAction::Create { name } => {
            println!("{}", trust.create_api_key(name).map_err(failed)?);
            eprintln!(
                "the key is shown this once: keep it (clients pass it with --api-key or KOWALSKI_API_KEY)"
            );
        }
        ApiKeyAction::List => {
            for name in trust.api_key_names().map_err(failed)? {
                println!("{name}");
            }
        }
        ApiKeyAction::Revoke { name } => {
            if !trust.revoke_api_key(name).map_err(failed)? {
                return Err(Failure::usage(format!("no API key is called '{name}'")));
            }
            eprintln!("revoked the API key '{name}'");
        }
    }
    Ok(0)
}

/// `coordinator cert issue --client NAME --out DIR`: writes `NAME.pem` (the certificate with
/// the authority's after it), `NAME.key` (mode 0600) and `ca.pem`.
pub fn issue_client(data_dir: &Path, name: &str, out: &Path) -> Result<u8, Failure> {
    let trust = open(data_dir)?;
    let failed =
        |e: kowalski_exo_common::security::TlsError| Failure::infrastructure(e.to_string());
    let identity = trust.issue_client(name).map_err(failed)?;
    kowalski_exo_common::security::files::ensure_dir(out).map_err(failed)?;
    let write = |file: String, text: &str| {
        kowalski_exo_common::security::files::write_private(&out.join(file), text).map_err(failed)
    };
    write(format!("{name}.pem"), &identity.cert_pem)?;
    write(format!("{name}.key"), &identity.key_pem)?;
    write("ca.pem".into(), trust.authority_pem())?;
    eprintln!(
        "wrote {name}.pem, {name}.key and ca.pem to {}: call an agent with `grpcurl -cacert ca.pem -cert {name}.pem -key {name}.key -servername NODE.node.kowalski-exo HOST:50052 ...`",
        out.display()
    );
    Ok(0)
}

/// `coordinator cert revoke --client NAME`.
pub fn revoke_client(data_dir: &Path, name: &str) -> Result<u8, Failure> {
    let count = open(data_dir)?
        .revoke_client(name)
        .map_err(|e| Failure::infrastructure(e.to_string()))?;
    if count == 0 {
        return Err(Failure::usage(format!(
            "no client certificate called '{name}' is in force"
        )));
    }
    eprintln!(
        "revoked {count} client certificate(s) of '{name}': agents refuse them within a few seconds"
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_runs_without_tls_unless_told() {
        let dir = Path::new("/tmp/unused");
        assert!(is_loopback("127.0.0.1:50051"));
        assert!(is_loopback("[::1]:50051"));
        assert!(is_loopback("localhost:1"));
        assert!(!is_loopback("0.0.0.0:50051"));
        let local = Some("127.0.0.1:8080");
        assert!(tls_setup("127.0.0.1:1", local, false, false, dir, &[]).is_none());
        assert!(tls_setup("127.0.0.1:1", None, false, false, dir, &[]).is_none());
        assert!(tls_setup("127.0.0.1:1", local, true, false, dir, &[]).is_some());
        assert!(tls_setup("0.0.0.0:1", local, false, false, dir, &[]).is_some());
        assert!(tls_setup("0.0.0.0:1", local, false, true, dir, &[]).is_none());
        // The HTTP API on the LAN is as exposed as the gRPC port would be.
        assert!(tls_setup("127.0.0.1:1", Some("0.0.0.0:8080"), false, false, dir, &[]).is_some());
    }
}
