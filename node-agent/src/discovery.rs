//! Finding the coordinator on the LAN when the agent is given none: browses mDNS/DNS-SD for
//! `_kowalski-exo._tcp` and takes the first coordinator whose announcement matches what the
//! agent knows: its cluster authority (from the join token, or the membership it holds) and the
//! cluster name it was given. The match on the authority only picks a coordinator; joining
//! still checks its whole fingerprint before saying anything.

use std::{net::IpAddr, path::Path, time::Duration};

use kowalski_exo_common::{
    cli_args,
    lan::{AUTHORITY_PREFIX, SERVICE_TYPE, TXT_AUTHORITY, TXT_CLUSTER, TXT_TLS},
    security::JoinToken,
};
use mdns_sd::{ResolvedService, ServiceDaemon, ServiceEvent};

use crate::membership::{Membership, MembershipError};

/// How an agent given no `--coordinator` finds one: on the LAN when it knows its cluster (a
/// join token, a membership in `data_dir`, a cluster name), else the one on this machine.
/// Returns the coordinator's URL, or what to look for.
pub fn coordinator_to_join(
    data_dir: &Path,
    join: Option<&str>,
    cluster: Option<String>,
) -> Result<(Option<String>, Option<Wanted>), MembershipError> {
    let authority = match join {
        Some(token) => Some(
            JoinToken::parse(token)
                .map_err(MembershipError::Token)?
                .authority,
        ),
        None => Membership::load(data_dir)?
            .map(|held| held.authority_fingerprint())
            .transpose()?,
    };
    if authority.is_none() && cluster.is_none() {
        return Ok((Some(cli_args::default_coordinator_url()), None));
    }
    Ok((None, Some(Wanted { authority, cluster })))
}

/// Between two log lines saying the agent is still looking.
const STILL_LOOKING: Duration = Duration::from_secs(10);
/// The first questions, asked this far apart.
const QUICK_QUESTIONS: u32 = 4;
const QUICK_REPEAT: Duration = Duration::from_millis(250);

/// What the coordinator looked for must announce.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    /// The cluster authority's fingerprint, hex.
    pub authority: Option<String>,
    /// The cluster's name.
    pub cluster: Option<String>,
}

impl Wanted {
    /// Whether an announcement of `cluster`, with `tls` and an authority starting `authority`,
    /// is the coordinator wanted.
    fn matches(&self, cluster: Option<&str>, tls: bool, authority: Option<&str>) -> bool {
        let cluster_ok = self
            .cluster
            .as_deref()
            .is_none_or(|wanted| cluster == Some(wanted));
        let authority_ok = match &self.authority {
            Some(wanted) => {
                tls && authority.is_some_and(|prefix| {
                    prefix.len() == AUTHORITY_PREFIX
                        && wanted
                            .to_ascii_lowercase()
                            .starts_with(&prefix.to_ascii_lowercase())
                })
            }
            None => true,
        };
        cluster_ok && authority_ok
    }

    fn describe(&self) -> String {
        match (&self.cluster, &self.authority) {
            (Some(cluster), _) => format!("the cluster '{cluster}'"),
            (None, Some(authority)) => {
                format!(
                    "the cluster with authority {}",
                    &authority[..authority.len().min(AUTHORITY_PREFIX)]
                )
            }
            (None, None) => "any cluster".to_string(),
        }
    }
}

/// Why no coordinator could be looked for.
#[derive(Debug, thiserror::Error)]
#[error("cannot look for a coordinator on the LAN (mDNS): {0}")]
pub struct DiscoveryError(#[from] mdns_sd::Error);

/// The URL (`http://IP:PORT`) of the first coordinator announcing what `wanted` asks; waits as
/// long as it takes, saying so now and then.
pub async fn find(wanted: &Wanted) -> Result<String, DiscoveryError> {
    tracing::info!(
        "looking for {} on the LAN ({SERVICE_TYPE})",
        wanted.describe()
    );
    let found = search(wanted, None).await?;
    let found = found.expect("a search with no time limit ends only when it finds one");
    tracing::info!(coordinator = %found, "found the coordinator on the LAN");
    Ok(found)
}

/// The same, looking for `limit` at most: where the coordinator an agent lost touch with
/// announces itself now (it may have come back at another address), if it does.
pub async fn look_again(
    wanted: &Wanted,
    limit: Duration,
) -> Result<Option<String>, DiscoveryError> {
    search(wanted, Some(limit)).await
}

async fn search(
    wanted: &Wanted,
    limit: Option<Duration>,
) -> Result<Option<String>, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let found = browse(&daemon, wanted, limit).await;
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    found
}

async fn browse(
    daemon: &ServiceDaemon,
    wanted: &Wanted,
    limit: Option<Duration>,
) -> Result<Option<String>, DiscoveryError> {
    let until = limit.map(|limit| tokio::time::Instant::now() + limit);
    let mut events = daemon.browse(SERVICE_TYPE)?;
    let mut asked = 1;
    let mut waited = Duration::ZERO;
    loop {
        // A coordinator's answer can be lost among others' on a busy LAN, and mDNS asks again
        // only a second later: the first few questions go out sooner.
        let mut patience = if asked < QUICK_QUESTIONS {
            QUICK_REPEAT
        } else {
            STILL_LOOKING
        };
        if let Some(until) = until {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            patience = patience.min(left);
        }
        let event = match tokio::time::timeout(patience, events.recv_async()).await {
            Ok(Ok(event)) => event,
            Ok(Err(_)) => {
                return Err(DiscoveryError(mdns_sd::Error::Msg(
                    "the mDNS daemon stopped".into(),
                )));
            }
            Err(_) if asked < QUICK_QUESTIONS => {
                let _ = daemon.stop_browse(SERVICE_TYPE);
                events = daemon.browse(SERVICE_TYPE)?;
                asked += 1;
                continue;
            }
            Err(_) if until.is_some() => continue,
            Err(_) => {
                waited += patience;
                tracing::info!(
                    "still looking for {} on the LAN after {waited:?}",
                    wanted.describe()
                );
                continue;
            }
        };
        let ServiceEvent::ServiceResolved(service) = event else {
            continue;
        };
        if let Some(url) = coordinator_url(wanted, &service) {
            return Ok(Some(url));
        }
    }
}

/// The announced coordinator's URL, if it is the one wanted and has an address to dial.
fn coordinator_url(wanted: &Wanted, service: &ResolvedService) -> Option<String> {
    let cluster = service.get_property_val_str(TXT_CLUSTER);
    let tls = service.get_property_val_str(TXT_TLS) == Some("1");
    let authority = service.get_property_val_str(TXT_AUTHORITY);
    if !wanted.matches(cluster, tls, authority) {
        tracing::debug!(?cluster, "an announced coordinator is not the one wanted");
        return None;
    }
    let mut addresses: Vec<IpAddr> = service
        .get_addresses()
        .iter()
        .map(|ip| ip.to_ip_addr())
        .filter(|ip| !ip.is_loopback() && !is_link_local(ip))
        .collect();
    // IPv4 first: it needs no interface scope.
    addresses.sort_by_key(|ip| ip.is_ipv6());
    let ip = addresses.first()?;
    Some(match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{}", service.get_port()),
        IpAddr::V6(v6) => format!("http://[{v6}]:{}", service.get_port()),
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_is_taken_by_its_authority_and_cluster_name() {
        let fingerprint = "ab".repeat(32);
        let by_token = Wanted {
            authority: Some(fingerprint.clone()),
            cluster: None,
        };
        let prefix = &fingerprint[..AUTHORITY_PREFIX];
        assert!(by_token.matches(Some("home"), true, Some(prefix)));
        assert!(
            !by_token.matches(Some("home"), false, Some(prefix)),
            "no TLS"
        );
        assert!(!by_token.matches(Some("home"), true, Some("cdcdcdcdcdcdcdcd")));
        assert!(
            !by_token.matches(Some("home"), true, Some("ab")),
            "too short"
        );
        assert!(!by_token.matches(Some("home"), true, None));
        let named = Wanted {
            cluster: Some("lab".into()),
            ..by_token
        };
        assert!(named.matches(Some("lab"), true, Some(prefix)));
        assert!(!named.matches(Some("home"), true, Some(prefix)));
        let plaintext = Wanted {
            authority: None,
            cluster: Some("lab".into()),
        };
        assert!(plaintext.matches(Some("lab"), false, None));
    }
}
