//! Launchers: processes forked ahead of time that wait, already inside their run's cgroup (and
//! network namespace), for the command they will become, and its confinement [`steps`].
//!
//! Joining a cgroup v1 hierarchy costs a kernel RCU grace period (~10 ms here) the first time
//! after a quiet spell, which would dominate a 25 ms Python start. A launcher pays it before the
//! request arrives. The forked child only makes async-signal-safe syscalls on memory allocated
//! before the fork, as a child of a multi-threaded process must.

use std::{
    ffi::{CString, OsStr, OsString, c_char},
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use super::{
    cgroup::RunCgroup,
    forked,
    steps::{self, STAGE_CWD, STAGE_EXEC, STAGE_LAUNCHER, STAGE_RLIMIT},
};

/// Largest encoded job (program, arguments, environment, limits).
pub const MAX_JOB_BYTES: usize = 1024 * 1024;
/// Most arguments plus environment entries a job may have.
pub const MAX_JOB_STRINGS: usize = 8192;
/// Byte a launcher sends once it sits in its cgroup, ready for a job.
const READY: u8 = b'R';
/// Where a program that keeps its channel finds it (see [`Job::keep_channel`]).
pub const CHANNEL_FD: RawFd = 5;
/// Job flag: the program keeps its end of the channel at [`CHANNEL_FD`].
const KEEP_CHANNEL: u32 = 1;

/// One rlimit for the launched program.
#[derive(Clone, Copy, Debug)]
pub struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub soft: u64,
    pub hard: u64,
}

/// What a launcher becomes.
#[derive(Debug)]
pub struct Job<'a> {
    /// Absolute path of the program.
    pub program: &'a Path,
    pub args: &'a [OsString],
    pub env: &'a [(&'static str, OsString)],
    pub cwd: &'a Path,
    pub rlimits: &'a [Rlimit],
    /// Confinement steps, run after the limits are set and before exec.
    pub steps: &'a [u8],
    /// The program keeps its end of a socket pair with the agent at [`CHANNEL_FD`] (a session's
    /// interpreter talks to its agent over it); otherwise it is closed at exec.
    pub keep_channel: bool,
}

/// A job in the form the launcher reads.
#[derive(Debug)]
pub struct EncodedJob {
    bytes: Vec<u8>,
    program: PathBuf,
}

impl Job<'_> {
    /// Header (five u32s: arguments, environment, limits and step bytes counted, then flags),
    /// then the limits, the steps, and NUL-terminated program, cwd, arguments and KEY=VALUE
    /// environment entries.
    pub fn encode(&self) -> io::Result<EncodedJob> {
        let mut out = Vec::new();
        let flags = if self.keep_channel { KEEP_CHANNEL } else { 0 };
        for count in [
            self.args.len(),
            self.env.len(),
            self.rlimits.len(),
            self.steps.len(),
            flags as usize,
        ] {
            out.extend_from_slice(&(count as u32).to_ne_bytes());
        }
        for limit in self.rlimits {
            out.extend_from_slice(&limit.resource.to_ne_bytes());
            out.extend_from_slice(&limit.soft.to_ne_bytes());
            out.extend_from_slice(&limit.hard.to_ne_bytes());
        }
        out.extend_from_slice(self.steps);
        let mut push = |s: &OsStr| -> io::Result<()> {
            let c = CString::new(s.as_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "an argument holds a NUL byte")
            })?;
            out.extend_from_slice(c.as_bytes_with_nul());
            Ok(())
        };
        push(self.program.as_os_str())?;
        push(self.cwd.as_os_str())?;
        for arg in self.args {
            push(arg)?;
        }
        for (key, value) in self.env {
            let mut entry = OsString::from(key);
            entry.push("=");
            entry.push(value);
            push(&entry)?;
        }
        if out.len() >= MAX_JOB_BYTES || self.args.len() + self.env.len() + 2 > MAX_JOB_STRINGS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the command line is larger than {MAX_JOB_BYTES} bytes"),
            ));
        }
        Ok(EncodedJob {
            bytes: out,
            program: self.program.to_path_buf(),
        })
    }
}

/// A forked process waiting for its job.
#[derive(Debug)]
pub struct Launcher {
    pid: i32,
    cgroup: Option<RunCgroup>,
    control: Option<File>,
    status: File,
    /// The parent's ends of the standard streams and of the channel, handed over at launch.
    streams: Option<[OwnedFd; 4]>,
}

/// A launched program: its pid, the parent's ends of its standard streams and channel, and its
/// cgroup.
#[derive(Debug)]
pub struct Launched {
    pub pid: u32,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Open on the program's side only when its job kept the channel.
    pub channel: OwnedFd,
    pub cgroup: Option<RunCgroup>,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two descriptors, which we then own.
    let made = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if made != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Launcher {
    /// Forks a launcher that joins `cgroup` (if any), with `isolate_network` enters a network
    /// namespace of its own with only loopback, and waits. Blocks until it is ready, which
    /// includes the cgroup migration: call off the async runtime.
    pub fn fork(cgroup: Option<RunCgroup>, isolate_network: bool) -> io::Result<Launcher> {
        let (stdin_r, stdin_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let (control_r, control_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        let (channel_agent, channel_program) = socket_pair()?;
        let cgroup_fds: Vec<RawFd> = cgroup.as_ref().map(RunCgroup::join_fds).unwrap_or_default();
        let mut job = vec![0u8; MAX_JOB_BYTES];
        let mut strings: Vec<*const c_char> = vec![std::ptr::null(); MAX_JOB_STRINGS + 1];
        let mut scratch = vec![0u8; libc::PATH_MAX as usize];
        let fds = ChildFds {
            stdin: stdin_r.as_raw_fd(),
            stdout: stdout_w.as_raw_fd(),
            stderr: stderr_w.as_raw_fd(),
            control: control_r.as_raw_fd(),
            status: status_w.as_raw_fd(),
            channel: channel_program.as_raw_fd(),
        };
        // SAFETY: the child only runs `child_main`, which makes async-signal-safe syscalls on
        // memory allocated above and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked child.
            unsafe {
                child_main(
                    &fds,
                    &cgroup_fds,
                    isolate_network,
                    &mut job,
                    &mut strings,
                    &mut scratch,
                )
            }
        }
        drop((
            stdin_r,
            stdout_w,
            stderr_w,
            control_r,
            status_w,
            channel_program,
        ));
        let mut launcher = Launcher {
            pid,
            cgroup,
            control: Some(File::from(control_w)),
            status: File::from(status_r),
            streams: Some([stdin_w, stdout_r, stderr_r, channel_agent]),
        };
        // The first byte is READY, or the first byte of a failure report.
        let mut first = [0u8; FAILURE_BYTES];
        match launcher.status.read(&mut first[..1]) {
            Ok(1) if first[0] == READY => Ok(launcher),
            Ok(1) if launcher.status.read_exact(&mut first[1..]).is_ok() => {
                let (errno, stage) = decode_failure(first);
                Err(io::Error::new(
                    errno.kind(),
                    format!(
                        "the launcher could not get ready ({}): {errno}",
                        steps::describe_stage(stage)
                    ),
                ))
            }
            _ => Err(io::Error::other("the launcher exited before it was ready")),
        }
    }

    /// The launcher's pid, which is also its session and process group, and the program's.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The cgroup the launcher sits in.
    pub fn cgroup(&self) -> Option<&RunCgroup> {
        self.cgroup.as_ref()
    }

    /// Sends the job and waits until the program was executed (or failed to be). Blocking.
    pub fn launch(mut self, job: &EncodedJob) -> io::Result<Launched> {
        let mut control = self.control.take().expect("a launcher launches once");
        control.write_all(&job.bytes)?;
        drop(control);
        if let Some((errno, stage)) = self.child_error() {
            let message = match stage {
                STAGE_EXEC => format!("cannot start {}: {errno}", job.program.display()),
                stage => format!(
                    "cannot start {} ({}): {errno}",
                    job.program.display(),
                    steps::describe_stage(stage)
                ),
            };
            return Err(io::Error::new(errno.kind(), message));
        }
        // The caller reaps the program from now on.
        let pid = std::mem::take(&mut self.pid) as u32;
        let [stdin, stdout, stderr, channel] =
            self.streams.take().expect("a launcher launches once");
        Ok(Launched {
            pid,
            stdin,
            stdout,
            stderr,
            channel,
            cgroup: self.cgroup.take(),
        })
    }

    /// Reads the status pipe to its end: an errno and the stage if the child failed, None at
    /// exec.
    fn child_error(&mut self) -> Option<(io::Error, u32)> {
        let mut report = [0u8; FAILURE_BYTES];
        match self.status.read_exact(&mut report) {
            Ok(()) => Some(decode_failure(report)),
            Err(_) => None,
        }
    }
}

impl Drop for Launcher {
    /// An unused launcher exits when its control pipe closes; reap it (its cgroup, if still
    /// held, is removed when dropped right after).
    fn drop(&mut self) {
        self.control.take();
        if self.pid > 0 {
            let mut status = 0;
            // SAFETY: waiting on our own child.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
    }
}

/// A child's failure report: its errno, then the stage that failed.
const FAILURE_BYTES: usize = 8;

fn decode_failure(report: [u8; FAILURE_BYTES]) -> (io::Error, u32) {
    let errno = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    let stage = u32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    (io::Error::from_raw_os_error(errno), stage)
}

/// Sends a failure report on the status pipe and exits.
///
/// # Safety
/// Child-only.
unsafe fn fail(status_fd: RawFd, errno: i32, stage: u32) -> ! {
    let mut report = [0u8; FAILURE_BYTES];
    report[..4].copy_from_slice(&errno.to_ne_bytes());
    report[4..].copy_from_slice(&stage.to_ne_bytes());
    // SAFETY: writing a local buffer to our own pipe, then exiting without unwinding.
    unsafe {
        libc::write(status_fd, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    }
}

fn last_errno() -> i32 {
    // SAFETY: reading this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Enters a network namespace of its own and brings its loopback interface up.
///
/// # Safety
/// Child-only.
unsafe fn isolate_network() -> Result<(), i32> {
    // SAFETY: namespace and socket syscalls on this process, with a local request buffer.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(last_errno());
        }
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return Err(last_errno());
        }
        let mut request = InterfaceFlags {
            name: *b"lo\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            flags: 0,
            padding: [0; 22],
        };
        let result = if libc::ioctl(socket, SIOCGIFFLAGS, &mut request) != 0 {
            Err(last_errno())
        } else {
            request.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
            if libc::ioctl(socket, SIOCSIFFLAGS, &request) != 0 {
                Err(last_errno())
            } else {
                Ok(())
            }
        };
        libc::close(socket);
        result
    }
}

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;

/// `struct ifreq` as SIOCGIFFLAGS and SIOCSIFFLAGS use it.
#[repr(C)]
struct InterfaceFlags {
    name: [u8; 16],
    flags: i16,
    padding: [u8; 22],
}

/// The parent's descriptors the child moves to 0..=5.
struct ChildFds {
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    control: RawFd,
    status: RawFd,
    channel: RawFd,
}

/// The forked child: join the cgroup (and a network namespace), settle descriptors and
/// signals, report ready, read the job, apply it and exec. Any failure is reported on the status
/// pipe.
///
/// # Safety
/// Only to be called in a freshly forked child; never returns.
unsafe fn child_main(
    fds: &ChildFds,
    cgroup_fds: &[RawFd],
    network: bool,
    job: &mut [u8],
    strings: &mut [*const c_char],
    scratch: &mut [u8],
) -> ! {
    // SAFETY (whole body): raw syscalls on descriptors and buffers this process owns; no
    // allocation, no locks, no unwinding.
    unsafe {
        let status = fds.status;
        forked::reset_signals();
        for &fd in cgroup_fds {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(status, last_errno(), STAGE_LAUNCHER);
            }
        }
        if libc::setsid() < 0 {
            fail(status, last_errno(), STAGE_LAUNCHER);
        }
        if network && let Err(errno) = isolate_network() {
            fail(status, errno, STAGE_LAUNCHER);
        }
        // Move every descriptor out of 0..=5 first, so the dup2s below cannot clobber one.
        let mut high = [0; 6];
        for (slot, fd) in high.iter_mut().zip([
            fds.stdin,
            fds.stdout,
            fds.stderr,
            fds.control,
            fds.status,
            fds.channel,
        ]) {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            if *slot < 0 {
                fail(status, last_errno(), STAGE_LAUNCHER);
            }
        }
        for (target, &fd) in high.iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                fail(high[4], last_errno(), STAGE_LAUNCHER);
            }
        }
        let status = 4;
        forked::close_from(CHANNEL_FD + 1);
        for fd in 3..=CHANNEL_FD {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        if libc::write(status, [READY].as_ptr().cast(), 1) != 1 {
            libc::_exit(0);
        }
        let mut len = 0;
        loop {
            let Some(rest) = job.get_mut(len..) else {
                fail(status, libc::E2BIG, STAGE_LAUNCHER)
            };
            if rest.is_empty() {
                fail(status, libc::E2BIG, STAGE_LAUNCHER);
            }
            let n = libc::read(3, rest.as_mut_ptr().cast(), rest.len());
            if n < 0 {
                if last_errno() == libc::EINTR {
                    continue;
                }
                fail(status, last_errno(), STAGE_LAUNCHER);
            }
            if n == 0 {
                break;
            }
            len += n as usize;
        }
        if len == 0 {
            // Dropped unused: the agent closed the control pipe without a job.
            libc::_exit(0);
        }
        let (errno, stage) = apply_job(&job[..len], strings, scratch).unwrap_err();
        fail(status, errno, stage)
    }
}

/// Parses the job in place, applies the steps, cwd and limits, and execs. Returns only on failure,
/// with the errno and the stage that failed.
///
/// # Safety
/// Child-only, like [`child_main`].
unsafe fn apply_job(
    job: &[u8],
    strings: &mut [*const c_char],
    scratch: &mut [u8],
) -> Result<(), (i32, u32)> {
    let invalid = (libc::EINVAL, STAGE_LAUNCHER);
    let read_u32 = |at: usize| -> Result<u32, (i32, u32)> {
        let bytes = job.get(at..at + 4).ok_or(invalid)?;
        Ok(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    };
    let read_u64 = |at: usize| -> Result<u64, (i32, u32)> {
        let bytes = job.get(at..at + 8).ok_or(invalid)?;
        let mut buf = [0u8; 8];
        buf.copy_from_slice(bytes);
        Ok(u64::from_ne_bytes(buf))
    };
    let argc = read_u32(0)? as usize;
    let envc = read_u32(4)? as usize;
    let limits = read_u32(8)? as usize;
    let steps_len = read_u32(12)? as usize;
    let flags = read_u32(16)?;
    // The limits are applied last, after the steps, which a low open-files or CPU limit
    // could otherwise break.
    let limits_at = 20;
    let mut at = limits_at + 20 * limits;
    let steps = job.get(at..at + steps_len).ok_or(invalid)?;
    at += steps_len;
    // The rest is NUL-terminated strings: program, cwd, args..., env... They are laid out as
    // argv = [program, args..., NULL] followed by envp = [env..., NULL], so string number k
    // (k >= 2) lands at slot k - 1 for an argument and at slot k for an environment entry.
    let total = 2 + argc + envc;
    if total + 1 > strings.len() {
        return Err((libc::E2BIG, STAGE_LAUNCHER));
    }
    let (mut program, mut cwd) = (std::ptr::null(), std::ptr::null());
    let mut ordinal = 0;
    let mut start = at;
    for (i, byte) in job.iter().enumerate().skip(at) {
        if *byte != 0 {
            continue;
        }
        let string: *const c_char = job.as_ptr().wrapping_add(start).cast();
        match ordinal {
            0 => program = string,
            1 => cwd = string,
            k if k < 2 + argc => strings[k - 1] = string,
            k => strings[k] = string,
        }
        ordinal += 1;
        start = i + 1;
        if ordinal == total {
            break;
        }
    }
    if ordinal != total {
        return Err(invalid);
    }
    strings[0] = program;
    strings[argc + 1] = std::ptr::null();
    strings[total] = std::ptr::null();
    let envp_start = argc + 2;
    // SAFETY: the steps and every pointer live inside `job`, which outlives the exec.
    unsafe {
        steps::run(steps, scratch)?;
        if libc::chdir(cwd) != 0 {
            return Err((last_errno(), STAGE_CWD));
        }
        if flags & KEEP_CHANNEL != 0 && libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) != 0 {
            return Err((last_errno(), STAGE_LAUNCHER));
        }
        for limit in 0..limits {
            let at = limits_at + 20 * limit;
            let rlimit = libc::rlimit {
                rlim_cur: read_u64(at + 4)?,
                rlim_max: read_u64(at + 12)?,
            };
            if libc::setrlimit(read_u32(at)? as libc::__rlimit_resource_t, &rlimit) != 0 {
                return Err((last_errno(), STAGE_RLIMIT));
            }
        }
        libc::execve(program, strings.as_ptr(), strings[envp_start..].as_ptr());
    }
    Err((last_errno(), STAGE_EXEC))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn read_all(fd: OwnedFd) -> String {
        let mut text = String::new();
        File::from(fd).read_to_string(&mut text).unwrap();
        text
    }

    fn reap(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: waiting on our own child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn launched_program_gets_exactly_its_args_env_cwd_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<OsString> = vec![
            "-c".into(),
            "echo \"$1|$2|$GREETING|$(pwd)|$(ulimit -n)\"; env | wc -l".into(),
            "sh".into(),
            "two words".into(),
            "".into(),
        ];
        let env = [("GREETING", OsString::from("hi there"))];
        let rlimits = [Rlimit {
            resource: libc::RLIMIT_NOFILE,
            soft: 77,
            hard: 77,
        }];
        let job = Job {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            cwd: dir.path(),
            rlimits: &rlimits,
            steps: &[],
            keep_channel: false,
        }
        .encode()
        .unwrap();
        let launched = Launcher::fork(None, false).unwrap().launch(&job).unwrap();
        drop(launched.stdin);
        let stdout = read_all(launched.stdout);
        assert_eq!(reap(launched.pid), 0);
        let cwd = std::fs::canonicalize(dir.path()).unwrap();
        // sh adds PWD (and may add OLDPWD/SHLVL-like variables) to what it was given.
        let mut lines = stdout.lines();
        assert_eq!(
            lines.next().unwrap(),
            format!("two words||hi there|{}|77", cwd.display())
        );
        let count: usize = lines.next().unwrap().trim().parse().unwrap();
        assert!(count <= 4, "environment has {count} entries: {stdout}");
    }

    #[test]
    fn only_a_job_that_keeps_the_channel_has_it_open_after_exec() {
        let script: Vec<OsString> = vec![
            "-c".into(),
            "if { true >&5; } 2>/dev/null; then echo open; printf 'over the channel' >&5; else echo closed; fi".into(),
        ];
        for keep_channel in [true, false] {
            let job = Job {
                program: Path::new("/bin/sh"),
                args: &script,
                env: &[],
                cwd: Path::new("/"),
                rlimits: &[],
                steps: &[],
                keep_channel,
            }
            .encode()
            .unwrap();
            let launched = Launcher::fork(None, false).unwrap().launch(&job).unwrap();
            drop(launched.stdin);
            let stdout = read_all(launched.stdout);
            let channel = read_all(launched.channel);
            assert_eq!(reap(launched.pid), 0);
            if keep_channel {
                assert_eq!(
                    (stdout.trim(), channel.as_str()),
                    ("open", "over the channel")
                );
            } else {
                assert_eq!((stdout.trim(), channel.as_str()), ("closed", ""));
            }
        }
    }

    #[test]
    fn a_missing_program_is_reported_by_name() {
        let job = Job {
            program: Path::new("/nonexistent/interpreter"),
            args: &[],
            env: &[],
            cwd: Path::new("/"),
            rlimits: &[],
            steps: &[],
            keep_channel: false,
        }
        .encode()
        .unwrap();
        let err = Launcher::fork(None, false)
            .unwrap()
            .launch(&job)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("/nonexistent/interpreter"),
            "{err}"
        );
    }

    #[test]
    fn an_unused_launcher_exits_when_dropped() {
        let launcher = Launcher::fork(None, false).unwrap();
        let pid = launcher.pid;
        drop(launcher);
        // SAFETY: probing a pid with signal 0.
        let gone = unsafe { libc::kill(pid, 0) } != 0;
        assert!(gone, "launcher {pid} still exists after drop");
    }
}
