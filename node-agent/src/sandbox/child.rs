//! What the child does between fork and exec: leave the agent's session, join the run's
//! cgroups, and take its rlimits. Only async-signal-safe calls (raw syscalls, no allocation).

use std::{io, os::fd::RawFd};

/// One rlimit to set in the child.
#[derive(Clone, Copy, Debug)]
pub struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub soft: u64,
    pub hard: u64,
}

/// Everything the child applies to itself before exec.
#[derive(Clone, Debug, Default)]
pub struct ChildSetup {
    pub cgroup_fds: Vec<RawFd>,
    pub rlimits: Vec<Rlimit>,
}

impl ChildSetup {
    /// Runs in the forked child.
    ///
    /// # Safety
    /// Must only be called between fork and exec; it makes raw syscalls and does not allocate.
    pub unsafe fn apply(&self) -> io::Result<()> {
        // SAFETY: plain syscalls on the child's own process; buffers are static or borrowed.
        unsafe {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &self.cgroup_fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            for limit in &self.rlimits {
                let value = libc::rlimit {
                    rlim_cur: limit.soft,
                    rlim_max: limit.hard,
                };
                if libc::setrlimit(limit.resource, &value) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}
