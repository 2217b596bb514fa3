//! A few launchers kept ready in fresh cgroups, so a run does not wait for the cgroup
//! migration. Replacements are forked right after a launch: a migration write-locks the
//! kernel's threadgroup lock for a grace period, stalling every fork, exec and exit on the host,
//! so it must not overlap a launcher's exec; a freshly started program rarely forks or exits.

use std::{
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use super::{cgroup::CgroupRoot, launcher::Launcher};

/// Launchers waiting in their cgroups.
#[derive(Debug)]
pub struct LauncherPool {
    root: CgroupRoot,
    ready: Mutex<Vec<Launcher>>,
    /// How many launchers to keep ready.
    target: usize,
    /// Launchers being forked now.
    forking: AtomicUsize,
    serial: AtomicU64,
    /// Set at shutdown: launchers forked after it are dropped at once.
    closed: AtomicBool,
    /// Launchers kept ready sit in a network namespace of their own.
    isolate_network: bool,
}

impl LauncherPool {
    pub fn new(root: CgroupRoot, target: usize, isolate_network: bool) -> Arc<Self> {
        Arc::new(LauncherPool {
            root,
            ready: Mutex::new(Vec::new()),
            target,
            forking: AtomicUsize::new(0),
            serial: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            isolate_network,
        })
    }

    /// Forks one launcher in a new cgroup. Blocking.
    fn fork_one(&self, isolate_network: bool) -> io::Result<Launcher> {
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::other("the agent is shutting down"));
        }
        let name = format!("run-{}", self.serial.fetch_add(1, Ordering::Relaxed));
        let cgroup = self.root.create_run(&name)?;
        Launcher::fork(Some(cgroup), isolate_network)
    }

    /// A ready launcher, or a fresh one when none is waiting or the ready ones differ in
    /// `isolate_network`.
    pub async fn take(self: &Arc<Self>, isolate_network: bool) -> io::Result<Launcher> {
        let ready = if isolate_network == self.isolate_network {
            self.ready.lock().expect("pool lock poisoned").pop()
        } else {
            None
        };
        match ready {
            Some(launcher) => Ok(launcher),
            None => {
                let pool = self.clone();
                tokio::task::spawn_blocking(move || pool.fork_one(isolate_network))
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }

    /// Starts forking launchers until `target` are ready or on their way.
    pub fn refill(self: &Arc<Self>) {
        loop {
            let ready = self.ready.lock().expect("pool lock poisoned").len();
            let forking = self.forking.load(Ordering::Acquire);
            if ready + forking >= self.target {
                return;
            }
            if self
                .forking
                .compare_exchange(forking, forking + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let pool = self.clone();
            tokio::task::spawn_blocking(move || {
                match pool.fork_one(pool.isolate_network) {
                    Ok(launcher) => pool
                        .ready
                        .lock()
                        .expect("pool lock poisoned")
                        .push(launcher),
                    Err(e) => tracing::warn!(error = %e, "cannot prepare a launcher"),
                }
                pool.forking.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// Ends every waiting launcher (at shutdown). Blocking.
    pub fn drain(&self) {
        self.closed.store(true, Ordering::Release);
        let launchers = std::mem::take(&mut *self.ready.lock().expect("pool lock poisoned"));
        drop(launchers);
    }
}
