//! What every child forked from the agent does first, before it execs or settles into its job:
//! only raw, async-signal-safe syscalls, as a child of a multi-threaded process must.

use std::os::fd::RawFd;

/// Unblocks every signal and restores default handlers, undoing what the agent's runtime set.
///
/// # Safety
/// Only in a freshly forked child.
pub unsafe fn reset_signals() {
    // SAFETY: signal-mask and disposition calls on this process only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for signal in 1..libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
    }
}

/// Closes every descriptor from `first` up, so none of the agent's sockets or pipes is held.
///
/// # Safety
/// Only in a freshly forked child, once the descriptors it keeps sit below `first`.
pub unsafe fn close_from(first: RawFd) {
    // SAFETY: closing this process's own descriptors.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) != 0 {
            // Kernels before 5.9 (or a seccomp filter) lack close_range: close one by one.
            let mut limit: libc::rlimit = std::mem::zeroed();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            for fd in first..limit.rlim_cur.min(1 << 20) as RawFd {
                libc::close(fd);
            }
        }
    }
}
