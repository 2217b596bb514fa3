//! Exit statuses that mean the same from both binaries.

/// Bad usage: an unknown flag, a malformed value, an address that is not HOST:PORT.
pub const USAGE: u8 = 2;
/// The system around the command failed: a port in use, a coordinator unreachable, every
/// attempt of a run lost.
pub const INFRASTRUCTURE: u8 = 4;
