//! The coordinator announces itself on the LAN with mDNS/DNS-SD (`_kowalski-exo._tcp`): its
//! cluster's name as the instance name and in the TXT record, its gRPC port, its addresses (kept
//! up to date as they change), whether it runs with TLS, and the start of its authority's
//! fingerprint. An agent given a join token, or holding a membership, finds its own cluster's
//! coordinator by it and still verifies the whole fingerprint before it says anything.

use std::collections::HashMap;

use kowalski_exo_common::lan::{
    AUTHORITY_PREFIX, SERVICE_TYPE, TXT_AUTHORITY, TXT_CLUSTER, TXT_TLS,
};
use mdns_sd::{ServiceDaemon, ServiceInfo};

/// An announcement on the air; withdrawn when dropped.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Announcement {
    /// Announces the cluster `cluster` on `port`; `authority` is the fingerprint of its
    /// authority when it runs with TLS.
    pub fn start(
        cluster: &str,
        port: u16,
        authority: Option<&str>,
    ) -> Result<Announcement, mdns_sd::Error> {
        let daemon = ServiceDaemon::new()?;
        let mut txt = HashMap::from([
            (TXT_CLUSTER.to_string(), cluster.to_string()),
            (
                TXT_TLS.to_string(),
                u8::from(authority.is_some()).to_string(),
            ),
        ]);
        if let Some(authority) = authority {
            let prefix = &authority[..authority.len().min(AUTHORITY_PREFIX)];
            txt.insert(TXT_AUTHORITY.to_string(), prefix.to_string());
        }
        let host = host_name(cluster, &kowalski_exo_node_agent::agent::default_name());
        let mut service =
            ServiceInfo::new(SERVICE_TYPE, cluster, &host, (), port, txt)?.enable_addr_auto();
        // Announced at once rather than after RFC 6762's three probes (750 ms): agents choose
        // a coordinator by its authority, not by the instance name the probes would defend.
        service.set_requires_probe(false);
        let fullname = service.get_fullname().to_string();
        daemon.register(service)?;
        tracing::info!(cluster, port, "announced on the LAN ({SERVICE_TYPE})");
        Ok(Announcement { daemon, fullname })
    }
}

/// The mDNS host name the coordinator's addresses are announced under: the cluster's and the
/// machine's names, so two coordinators whose machines share a name (containers, network
/// namespaces) never merge their addresses under one host.
fn host_name(cluster: &str, machine: &str) -> String {
    let label: String = format!("{cluster}-{machine}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    format!("{label}.local.")
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_name_is_one_dns_label_of_the_cluster_and_the_machine() {
        assert_eq!(host_name("home", "pi.lan"), "home-pi-lan.local.");
        let long = host_name(&"x".repeat(100), "m");
        assert_eq!(long.len(), 63 + ".local.".len());
    }
}
