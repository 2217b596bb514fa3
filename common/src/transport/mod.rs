//! gRPC transport shared by every binary: the server set-up ([`server`]) and the one way a client
//! dials a server of the cluster ([`client`]), with the same keepalives on both ends.

pub mod client;
pub mod server;

use std::time::Duration;

pub use client::{ClientTls, endpoint};
pub use server::{ServeError, ServerBase, ServerTls, bind};

/// HTTP/2 pings on every connection, both ends, so a peer that vanished without closing (a
/// device switched off, a cable pulled) is noticed within their sum.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
