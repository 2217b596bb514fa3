//! The signals that stop a server (SIGINT, SIGTERM), listened for from before the server
//! starts: a signal that arrives while it starts up then ends it cleanly instead of killing it
//! with the default action.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM, caught from the moment this is made.
pub struct ShutdownSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl ShutdownSignals {
    /// Starts catching both signals. Call within a tokio runtime, before starting the server.
    pub fn listen() -> std::io::Result<Self> {
        Ok(ShutdownSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Completes when either signal arrives (or arrived since [`Self::listen`]).
    pub async fn received(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
