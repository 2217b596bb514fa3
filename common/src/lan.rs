//! What a coordinator announces on the LAN with mDNS/DNS-SD and agents look for: the service
//! type, and the keys of its TXT record.

/// The DNS-SD service type of a coordinator's gRPC port.
pub const SERVICE_TYPE: &str = "_kowalski-exo._tcp.local.";
/// The cluster's name (also the instance name), which tells coordinators on one LAN apart.
pub const TXT_CLUSTER: &str = "cluster";
/// The first [`AUTHORITY_PREFIX`] hex digits of the cluster authority's fingerprint, as a join
/// token carries it whole: an agent picks its own cluster's coordinator by it, then checks the
/// whole fingerprint before it says anything.
pub const TXT_AUTHORITY: &str = "authority";
/// "1" when the coordinator runs with TLS.
pub const TXT_TLS: &str = "tls";
pub const AUTHORITY_PREFIX: usize = 16;
