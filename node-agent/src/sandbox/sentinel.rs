//! The sentinel: a small process forked from the agent that outlives it by a moment, so work
//! dies with its agent. It holds the read end of a pipe only the agent writes to; when the agent
//! dies, however it dies (SIGKILL included), the pipe reaches end of file and the sentinel kills
//! every run's process group and every process in this agent's run cgroups, detaches and removes
//! this agent's work directories, then exits.
//!
//! The agent tells it which process groups are running as 5-byte records (`+` or `-`, then the
//! pgid), atomic on a pipe. The child of a multi-threaded fork only uses the allocator (glibc's
//! is made safe across fork), plain file syscalls and signals: no locks, no logging.

use std::{
    fs::File,
    io::{self, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::{
    cgroup::CgroupRoot,
    forked,
    workspace::{mounts_beneath, own_prefix},
};

/// Name the sentinel shows in `ps`, so `pkill node-agent` does not take it for the agent.
const NAME: &[u8] = b"kx-sentinel\0";
/// Bytes in one record: the sign, then the pgid.
const RECORD: usize = 5;

/// The agent's side: the write end of the pipe and the sentinel's pid.
#[derive(Debug)]
pub struct Sentinel {
    pid: i32,
    pipe: Mutex<Option<File>>,
}

impl Sentinel {
    /// Forks the sentinel, which on the agent's death kills the groups it was told of and the
    /// runs under `cgroups`.
    pub fn start(cgroups: Option<CgroupRoot>, work_root: Option<PathBuf>) -> io::Result<Sentinel> {
        let prefix = own_prefix();
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child runs `watch`, which never returns (see the module comment for what
        // it may call).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked child.
            unsafe {
                watch(
                    read.as_raw_fd(),
                    cgroups.as_ref(),
                    work_root.as_deref().map(|root| (root, prefix.as_str())),
                )
            }
        }
        drop(read);
        Ok(Sentinel {
            pid,
            pipe: Mutex::new(Some(File::from(write))),
        })
    }

    /// A run's process group started.
    pub fn running(&self, pgid: u32) {
        self.tell(b'+', pgid);
    }

    /// A run's process group ended and was reaped: its pgid may be reused.
    pub fn ended(&self, pgid: u32) {
        self.tell(b'-', pgid);
    }

    fn tell(&self, sign: u8, pgid: u32) {
        let mut record = [sign, 0, 0, 0, 0];
        record[1..].copy_from_slice(&pgid.to_ne_bytes());
        let mut pipe = self.pipe.lock().expect("sentinel lock poisoned");
        if let Some(file) = pipe.as_mut()
            && let Err(e) = file.write_all(&record)
        {
            tracing::warn!(error = %e, "the sentinel is gone: runs may outlive a crash of this agent");
            pipe.take();
        }
    }
}

impl Drop for Sentinel {
    /// Closing the pipe ends the sentinel (after it kills whatever is left); reap it.
    fn drop(&mut self) {
        self.pipe.lock().expect("sentinel lock poisoned").take();
        let mut status = 0;
        // SAFETY: waiting on our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The sentinel's life: detach, keep only the pipe, read records until end of file, then kill.
///
/// # Safety
/// Only to be called in a freshly forked child; never returns.
unsafe fn watch(pipe: RawFd, cgroups: Option<&CgroupRoot>, work: Option<(&Path, &str)>) -> ! {
    // SAFETY (whole body): syscalls on this process's own descriptors and memory.
    unsafe {
        forked::reset_signals();
        // Signals meant for the agent (a Ctrl-C in its terminal, `pkill -f node-agent`) are not
        // for the sentinel: the agent's end, however it comes, closes the pipe, and that ends it.
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(signal, libc::SIG_IGN);
        }
        libc::setsid();
        libc::prctl(libc::PR_SET_NAME, NAME.as_ptr());
        // Holding any other descriptor of the agent (its sockets, other sentinels' pipes) would
        // keep them open past the agent's death.
        if libc::dup2(pipe, 3) < 0 {
            libc::_exit(1);
        }
        forked::close_from(4);
        for fd in 0..3 {
            libc::close(fd);
        }
        let mut groups: Vec<i32> = Vec::new();
        let mut buffer = [0u8; RECORD * 256];
        let mut filled = 0;
        loop {
            let n = libc::read(
                3,
                buffer[filled..].as_mut_ptr().cast(),
                buffer.len() - filled,
            );
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            filled += n as usize;
            let whole = filled - filled % RECORD;
            for record in buffer[..whole].chunks_exact(RECORD) {
                let pgid = i32::from_ne_bytes([record[1], record[2], record[3], record[4]]);
                match record[0] {
                    b'+' => groups.push(pgid),
                    _ => groups.retain(|&g| g != pgid),
                }
            }
            buffer.copy_within(whole..filled, 0);
            filled -= whole;
        }
        for pgid in groups {
            libc::kill(-pgid, libc::SIGKILL);
        }
        if let Some(root) = cgroups {
            root.kill_runs();
        }
        if let Some((root, prefix)) = work {
            for target in mounts_beneath(root, prefix) {
                if let Ok(path) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) {
                    libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                }
            }
            if let Ok(entries) = std::fs::read_dir(root) {
                for entry in entries.flatten() {
                    if entry.file_name().to_string_lossy().starts_with(prefix) {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn alive(pid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    }

    #[test]
    fn a_group_it_was_told_of_dies_when_the_pipe_closes_and_an_ended_one_does_not() {
        let spawn = || {
            use std::os::unix::process::CommandExt;
            std::process::Command::new("sleep")
                .arg("30")
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let (mut watched, mut ended) = (spawn(), spawn());
        let sentinel = Sentinel::start(None, None).unwrap();
        sentinel.running(watched.id());
        sentinel.running(ended.id());
        sentinel.ended(ended.id());
        drop(sentinel);
        let start = Instant::now();
        while watched.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "watched group survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            alive(ended.id() as i32),
            "a group that had ended was killed"
        );
        ended.kill().unwrap();
        ended.wait().unwrap();
    }
}
