//! Shared ground for every Kowalski Exo binary.
//!
//! - [`proto`]: the generated `kowalski.exo.v1` messages, clients and servers.
//! - [`language`]: the one alias table that turns `py`, `js`, `rs`, ... into canonical names.
//! - [`defaults`]: ports and addresses every binary agrees on.
//! - [`transport`]: gRPC server set-up shared by all servers (health, reflection).
//! - [`telemetry`]: tracing set-up for the binaries.

pub mod defaults;
pub mod language;
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
