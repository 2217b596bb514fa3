//! The unprivileged users runs execute as when the agent is root: one of its own for each run at
//! a time, so runs cannot signal, trace or read one another, nor anything of the agent's.
//! Agents sharing a machine each claim a block of their own with a lock file.

use std::{
    collections::VecDeque,
    fs::File,
    io,
    os::unix::process::CommandExt,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
};

use nix::fcntl::{Flock, FlockArg};

/// First uid (and gid) handed to runs by default: far above any account or container range.
pub const DEFAULT_BASE: u32 = 2_100_000_000;
/// Runs that may hold a user at once.
pub const COUNT: u32 = 1024;
/// Blocks of [`COUNT`] users agents on one machine choose from.
const BLOCKS: u32 = 64;
/// Where the blocks' lock files live.
const LOCK_DIR: &str = "/run/kowalski-exo";

/// The users not taken by a run.
#[derive(Debug)]
pub struct RunUsers {
    /// Given out oldest first, so a user a run just gave back is the last to be reused.
    free: Mutex<VecDeque<u32>>,
    /// Without a cgroup, a run's escaped processes are found by their user at its end.
    kill_leftovers: bool,
    /// Held while the agent lives: no other agent hands out these users.
    _claim: Option<Flock<File>>,
}

/// One run's user, given back when dropped.
#[derive(Debug)]
pub struct RunUser {
    uid: u32,
    users: Arc<RunUsers>,
}

impl RunUsers {
    /// Claims the first block from `base` on that no other agent on this machine holds.
    pub fn claim(base: u32, kill_leftovers: bool) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(LOCK_DIR)?;
        for block in 0..BLOCKS {
            let first = base.saturating_add(block * COUNT);
            let path = Path::new(LOCK_DIR).join(format!("run-users-{first}.lock"));
            let file = File::options().create(true).append(true).open(&path)?;
            if let Ok(claim) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                tracing::info!(first, count = COUNT, "runs execute as users of their own");
                return Ok(Arc::new(RunUsers {
                    free: Mutex::new((first..first.saturating_add(COUNT)).collect()),
                    kill_leftovers,
                    _claim: Some(claim),
                }));
            }
        }
        Err(io::Error::other(format!(
            "every block of run users from {base} is held by another agent on this machine"
        )))
    }

    pub fn take(self: &Arc<Self>) -> io::Result<RunUser> {
        let uid = self
            .free
            .lock()
            .expect("run users lock poisoned")
            .pop_front()
            .ok_or_else(|| io::Error::other(format!("all {COUNT} run users are taken")))?;
        Ok(RunUser {
            uid,
            users: self.clone(),
        })
    }
}

impl RunUser {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Ends whatever still runs as this user when no cgroup holds the run (a process that left
    /// its process group), so it cannot meet the run's files or the user's next run. Blocking.
    pub fn end_leftovers(&self) {
        if self.users.kill_leftovers {
            kill_all_of(self.uid);
        }
    }
}

impl Drop for RunUser {
    fn drop(&mut self) {
        self.users
            .free
            .lock()
            .expect("run users lock poisoned")
            .push_back(self.uid);
    }
}

/// Sends SIGKILL to every process of `uid`, from a child that became that user (kill(-1)
/// reaches exactly the processes a user may signal, and never the caller). Blocking.
fn kill_all_of(uid: u32) {
    let mut command = std::process::Command::new("/bin/true");
    command
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the hook makes one raw syscall, as a pre-exec hook must; it runs after the
    // user switch.
    unsafe {
        command.pre_exec(|| {
            libc::kill(-1, libc::SIGKILL);
            Ok(())
        });
    }
    if let Err(e) = command.status() {
        tracing::warn!(uid, error = %e, "cannot end what is left of a run");
    }
}
