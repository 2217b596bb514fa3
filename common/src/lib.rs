//! Shared ground for every Kowalski Exo binary.
//!
//! - [`proto`]: the generated `kowalski.exo.v1` messages, clients and servers.
//! - [`error_text`]: errors with their causes, each said once, for people.
//! - [`exit`]: exit statuses both binaries share.
//! - [`lan`]: what coordinators announce on the LAN (mDNS/DNS-SD) and agents look for.
//! - [`language`]: the one alias table that turns `py`, `js`, `rs`, ... into canonical names.
//! - [`cli_args`]: command-line values both binaries take (labels, the coordinator URL).
//! - [`defaults`]: ports and addresses every binary agrees on.
//! - [`request_size`]: how large a run request may be, checked by coordinator and agent alike.
//! - [`transport`]: gRPC server set-up shared by all servers (health, reflection), and the one
//!   way clients dial them.
//! - [`security`]: cluster identity and access: the certificate authority, join tokens, peer
//!   certificates, the coordinator's data directory, API keys and the gRPC key check.
//! - [`service_unit`]: the systemd units the binaries install as.
//! - [`shutdown`]: the signals that stop a server, caught from before it starts.
//! - [`telemetry`]: tracing set-up for the binaries.

pub mod cli_args;
pub mod defaults;
pub mod error_text;
pub mod exit;
pub mod isolation;
pub mod lan;
pub mod language;
pub mod request_size;
pub mod security;
pub mod service_unit;
pub mod shutdown;
pub mod telemetry;
pub mod transport;

/// Generated code for protobuf package `kowalski.exo.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kowalski.exo.v1");

    /// The encoded descriptor set of every `kowalski.exo.v1` file, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/kowalski_exo_descriptor.bin"));
}

pub use language::Language;
