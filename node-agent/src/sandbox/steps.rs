//! Confinement steps: what a launcher does between reading its job and exec (a private mount
//! namespace, runtime trees made reachable, Landlock, no_new_privs, the run's own user), written
//! by the agent as a small program of [`Step`]s and carried out in the child with raw syscalls.
//!
//! The child of a multi-threaded process may not allocate, so the Landlock crate and the like
//! cannot be used there: each step is a handful of syscalls on strings already in the job.

use std::{
    ffi::{CString, c_char},
    io,
    os::unix::ffi::OsStrExt,
    path::Path,
};

/// Landlock's rights, scopes and ABI query.
pub mod landlock {
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    pub const REMOVE_DIR: u64 = 1 << 4;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_CHAR: u64 = 1 << 6;
    pub const MAKE_DIR: u64 = 1 << 7;
    pub const MAKE_REG: u64 = 1 << 8;
    pub const MAKE_SOCK: u64 = 1 << 9;
    pub const MAKE_FIFO: u64 = 1 << 10;
    pub const MAKE_BLOCK: u64 = 1 << 11;
    pub const MAKE_SYM: u64 = 1 << 12;
    /// ABI 2.
    pub const REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const TRUNCATE: u64 = 1 << 14;
    /// ABI 4: TCP bind and connect.
    pub const NET_BIND_TCP: u64 = 1 << 0;
    pub const NET_CONNECT_TCP: u64 = 1 << 1;
    /// ABI 6: no connecting to abstract unix sockets, no signals, outside the run.
    pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub const SCOPE_SIGNAL: u64 = 1 << 1;

    /// The writing rights a kernel of Landlock ABI `abi` knows.
    pub fn write_rights(abi: u32) -> u64 {
        let mut rights = WRITE_FILE
            | REMOVE_DIR
            | REMOVE_FILE
            | MAKE_CHAR
            | MAKE_DIR
            | MAKE_REG
            | MAKE_SOCK
            | MAKE_FIFO
            | MAKE_BLOCK
            | MAKE_SYM;
        if abi >= 2 {
            rights |= REFER;
        }
        if abi >= 3 {
            rights |= TRUNCATE;
        }
        rights
    }

    /// The Landlock ABI of this kernel, 0 when it has none (or it is disabled).
    pub fn abi() -> u32 {
        // SAFETY: the version query reads no memory.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32,
            )
        };
        abi.max(0) as u32
    }
}

/// Opcodes of the steps, also naming the step in an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    PrivateMounts = 1,
    HoldTree = 2,
    Tmpfs = 3,
    MakeDirs = 4,
    PlaceTree = 5,
    Proc = 7,
    Landlock = 8,
    NoNewPrivs = 9,
    User = 10,
    Detach = 11,
}

/// What failed in the child, for the agent's error message.
pub fn describe_stage(stage: u32) -> &'static str {
    match stage {
        1 => "making a private mount namespace",
        2 | 5 => "placing a tree in the run's mount namespace",
        3 => "mounting a private file system",
        4 => "making directories",
        7 => "mounting a private /proc",
        8 => "applying Landlock",
        9 => "setting no_new_privs",
        10 => "switching to the run's user",
        11 => "detaching another run's work directory",
        STAGE_RLIMIT => "setting a resource limit",
        STAGE_CWD => "entering the work directory",
        STAGE_LAUNCHER => "preparing the launcher",
        _ => "starting the program",
    }
}

/// Stages outside the steps, reported the same way.
pub const STAGE_EXEC: u32 = 0;
pub const STAGE_RLIMIT: u32 = 100;
pub const STAGE_CWD: u32 = 101;
pub const STAGE_LAUNCHER: u32 = 102;

/// Most trees held at once between [`Steps::hold_tree`] and [`Steps::place_tree`].
pub const MAX_HELD: usize = 8;
/// Most Landlock rules in one step.
const MAX_RULES: u64 = 4096;

/// A program of steps, built by the agent.
#[derive(Clone, Debug, Default)]
pub struct Steps {
    bytes: Vec<u8>,
    held: usize,
}

impl Steps {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn op(&mut self, op: Op) -> &mut Self {
        self.bytes.push(op as u8);
        self
    }

    fn number(&mut self, n: u64) -> &mut Self {
        self.bytes.extend_from_slice(&n.to_ne_bytes());
        self
    }

    fn path(&mut self, path: &Path) -> io::Result<&mut Self> {
        self.text(path.as_os_str().as_bytes())
    }

    fn text(&mut self, text: &[u8]) -> io::Result<&mut Self> {
        let c = CString::new(text)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))?;
        self.bytes.extend_from_slice(c.as_bytes_with_nul());
        Ok(self)
    }

    /// A mount namespace of its own, with no mount event flowing back to the host, and an IPC
    /// namespace (SysV and POSIX message queues, semaphores, shared memory die with the run).
    pub fn private_mounts(&mut self) {
        self.op(Op::PrivateMounts);
    }

    /// Clones the mount tree at `path` (`read_only` or not) to be placed later, once what
    /// covers it is mounted. Returns its slot.
    pub fn hold_tree(&mut self, path: &Path, read_only: bool) -> io::Result<usize> {
        if self.held == MAX_HELD {
            return Err(io::Error::other("too many trees to place"));
        }
        self.op(Op::HoldTree).number(read_only.into()).path(path)?;
        self.held += 1;
        Ok(self.held - 1)
    }

    /// Places a held tree at `target`, which must exist.
    pub fn place_tree(&mut self, slot: usize, target: &Path) -> io::Result<()> {
        self.op(Op::PlaceTree).number(slot as u64).path(target)?;
        Ok(())
    }

    /// A tmpfs at `target` with mount `options` (e.g. `size=...,mode=0755`).
    pub fn tmpfs(&mut self, target: &Path, options: &str) -> io::Result<()> {
        self.op(Op::Tmpfs).path(target)?.text(options.as_bytes())?;
        Ok(())
    }

    /// `mkdir -p` (mode 0755).
    pub fn make_dirs(&mut self, path: &Path) -> io::Result<()> {
        self.op(Op::MakeDirs).path(path)?;
        Ok(())
    }

    /// Detaches the mount at `path` from this namespace, if it is still there (another run's
    /// work directory, which may be gone by now).
    pub fn detach(&mut self, path: &Path) -> io::Result<()> {
        self.op(Op::Detach).path(path)?;
        Ok(())
    }

    /// A /proc of its own that shows only processes of the run's user.
    pub fn private_proc(&mut self) {
        self.op(Op::Proc);
    }

    /// Restricts the process with Landlock: `handled_fs` rights only where `rules` grant them,
    /// `handled_net` (TCP bind, connect) nowhere, and the `scoped` IPC kept inside the run.
    pub fn landlock(
        &mut self,
        abi: u32,
        handled_fs: u64,
        handled_net: u64,
        scoped: u64,
        rules: &[(u64, &Path)],
    ) -> io::Result<()> {
        // The ruleset attribute grew with the ABI: fs only, then net (4), then scopes (6).
        let attr_size: u64 = match abi {
            0..=3 => 8,
            4 | 5 => 16,
            _ => 24,
        };
        self.op(Op::Landlock)
            .number(handled_fs)
            .number(handled_net)
            .number(scoped)
            .number(attr_size)
            .number(rules.len() as u64);
        for (access, path) in rules {
            self.number(*access).path(path)?;
        }
        Ok(())
    }

    pub fn no_new_privs(&mut self) {
        self.op(Op::NoNewPrivs);
    }

    /// Becomes `uid`/`gid`, with no supplementary groups and no capabilities.
    pub fn user(&mut self, uid: u32, gid: u32) {
        self.op(Op::User).number(uid.into()).number(gid.into());
    }
}

/// What the mount layer relies on, done once at start in a throwaway child (a kernel lacking
/// one is found then rather than at every run): a private mount and IPC namespace, a cloned tree
/// made read-only, and a /proc that shows one user's processes.
pub fn mount_probe() -> Steps {
    let mut steps = Steps::default();
    steps.private_mounts();
    steps
        .hold_tree(Path::new("/"), true)
        .expect("one tree, a path without NUL");
    steps.private_proc();
    steps
}

/// Reads steps in the child. No allocation.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, i32> {
        let byte = *self.bytes.get(self.at).ok_or(libc::EINVAL)?;
        self.at += 1;
        Ok(byte)
    }

    fn number(&mut self) -> Result<u64, i32> {
        let bytes = self.bytes.get(self.at..self.at + 8).ok_or(libc::EINVAL)?;
        let mut buf = [0u8; 8];
        buf.copy_from_slice(bytes);
        self.at += 8;
        Ok(u64::from_ne_bytes(buf))
    }

    /// A NUL-terminated string, as a pointer into the job.
    fn text(&mut self) -> Result<*const c_char, i32> {
        let rest = self.bytes.get(self.at..).ok_or(libc::EINVAL)?;
        let len = rest.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
        let text = rest.as_ptr().cast();
        self.at += len + 1;
        Ok(text)
    }
}

/// Carries out `steps`. On failure returns (errno, stage).
///
/// # Safety
/// Only in a freshly forked child: it changes this process's namespaces and credentials.
/// `steps` must stay alive until exec (strings are used in place), and `scratch` is where
/// `MakeDirs` builds each parent path.
pub unsafe fn run(steps: &[u8], scratch: &mut [u8]) -> Result<(), (i32, u32)> {
    let mut reader = Reader {
        bytes: steps,
        at: 0,
    };
    let mut held = [NEVER_HELD; MAX_HELD];
    // Directories the steps make are for every user to enter, whatever the agent's umask.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o022) };
    while reader.at < steps.len() {
        let op = reader.byte().map_err(|e| (e, STAGE_LAUNCHER))?;
        // SAFETY: one step's syscalls on this process and strings inside `steps`.
        unsafe { run_one(op, &mut reader, &mut held, scratch) }.map_err(|e| (e, op.into()))?;
    }
    Ok(())
}

fn errno() -> i32 {
    // SAFETY: reading this thread's errno.
    unsafe { *libc::__errno_location() }
}

fn check(result: libc::c_long) -> Result<(), i32> {
    if result < 0 { Err(errno()) } else { Ok(()) }
}

/// # Safety
/// As [`run`].
unsafe fn run_one(
    op: u8,
    reader: &mut Reader<'_>,
    held: &mut [i32; MAX_HELD],
    scratch: &mut [u8],
) -> Result<(), i32> {
    let null = std::ptr::null::<c_char>();
    // SAFETY (whole body): raw syscalls with pointers to NUL-terminated strings in the job or
    // in local buffers that outlive the call.
    unsafe {
        match op {
            x if x == Op::PrivateMounts as u8 => {
                check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC).into())?;
                check(
                    libc::mount(
                        null,
                        c"/".as_ptr(),
                        null,
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    )
                    .into(),
                )
            }
            x if x == Op::HoldTree as u8 => {
                let read_only = reader.number()? != 0;
                let path = reader.text()?;
                // Slots are numbered in the order trees are held, as the agent counts them.
                let slot = held
                    .iter()
                    .position(|&fd| fd == NEVER_HELD)
                    .ok_or(libc::EMFILE)?;
                // A symlink planted where a tree should be is refused, not followed.
                let fd = libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    path,
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as u32 | AT_RECURSIVE | AT_SYMLINK_NOFOLLOW,
                );
                check(fd)?;
                let read_only = if read_only { MOUNT_ATTR_RDONLY } else { 0 };
                let attr = MountAttr {
                    attr_set: read_only | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                    ..Default::default()
                };
                check(libc::syscall(
                    libc::SYS_mount_setattr,
                    fd as i32,
                    c"".as_ptr(),
                    (libc::AT_EMPTY_PATH as u32) | AT_RECURSIVE,
                    &attr,
                    std::mem::size_of::<MountAttr>(),
                ))?;
                held[slot] = fd as i32;
                Ok(())
            }
            x if x == Op::PlaceTree as u8 => {
                let slot = reader.number()? as usize;
                let target = reader.text()?;
                let fd = *held.get(slot).ok_or(libc::EINVAL)?;
                if fd < 0 {
                    return Err(libc::EBADF);
                }
                check(libc::syscall(
                    libc::SYS_move_mount,
                    fd,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    target,
                    MOVE_MOUNT_F_EMPTY_PATH,
                ))?;
                libc::close(fd);
                held[slot] = PLACED;
                Ok(())
            }
            x if x == Op::Tmpfs as u8 => {
                let target = reader.text()?;
                let options = reader.text()?;
                check(
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        target,
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        options.cast(),
                    )
                    .into(),
                )
            }
            x if x == Op::MakeDirs as u8 => {
                let path = reader.text()?;
                make_dirs(path, scratch)
            }
            x if x == Op::Proc as u8 => check(
                libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"hidepid=invisible".as_ptr().cast(),
                )
                .into(),
            ),
            x if x == Op::Landlock as u8 => apply_landlock(reader),
            x if x == Op::Detach as u8 => {
                let path = reader.text()?;
                match libc::umount2(path, libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) {
                    0 => Ok(()),
                    // Already gone (the run ended meanwhile), or never a mount point here.
                    _ if matches!(errno(), libc::EINVAL | libc::ENOENT) => Ok(()),
                    _ => Err(errno()),
                }
            }
            x if x == Op::NoNewPrivs as u8 => {
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())
            }
            x if x == Op::User as u8 => {
                let uid = reader.number()? as libc::uid_t;
                let gid = reader.number()? as libc::gid_t;
                // The standard streams are the agent's pipes: the run's user must be able to
                // open them again (/dev/stdout, /proc/self/fd/1).
                for fd in 0..3 {
                    let mut stat: libc::stat = std::mem::zeroed();
                    if libc::fstat(fd, &mut stat) == 0
                        && stat.st_mode & libc::S_IFMT == libc::S_IFIFO
                    {
                        libc::fchown(fd, uid, gid);
                    }
                }
                check(libc::setgroups(0, std::ptr::null()).into())?;
                check(libc::setresgid(gid, gid, gid).into())?;
                check(libc::setresuid(uid, uid, uid).into())
            }
            _ => Err(libc::EINVAL),
        }
    }
}

/// `mkdir -p path` (0755), building each parent in `scratch`.
///
/// # Safety
/// `path` points at a NUL-terminated string.
unsafe fn make_dirs(path: *const c_char, scratch: &mut [u8]) -> Result<(), i32> {
    // SAFETY: `path` is NUL-terminated.
    let bytes = unsafe { std::ffi::CStr::from_ptr(path) }.to_bytes();
    if bytes.len() + 1 > scratch.len() {
        return Err(libc::ENAMETOOLONG);
    }
    for end in 1..=bytes.len() {
        if end < bytes.len() && bytes[end] != b'/' {
            continue;
        }
        scratch[..end].copy_from_slice(&bytes[..end]);
        scratch[end] = 0;
        // SAFETY: `scratch` holds a NUL-terminated prefix of `path`.
        if unsafe { libc::mkdir(scratch.as_ptr().cast(), 0o755) } != 0 && errno() != libc::EEXIST {
            return Err(errno());
        }
    }
    Ok(())
}

/// The Landlock step: a ruleset, its rules, and restricting this process to it.
///
/// # Safety
/// As [`run`].
unsafe fn apply_landlock(reader: &mut Reader<'_>) -> Result<(), i32> {
    let attr = RulesetAttr {
        handled_access_fs: reader.number()?,
        handled_access_net: reader.number()?,
        scoped: reader.number()?,
    };
    let attr_size = reader.number()? as usize;
    let rules = reader.number()?;
    if rules > MAX_RULES || attr_size > std::mem::size_of::<RulesetAttr>() {
        return Err(libc::EINVAL);
    }
    // SAFETY (whole body): Landlock syscalls on structures that live across each call.
    unsafe {
        let ruleset = libc::syscall(libc::SYS_landlock_create_ruleset, &attr, attr_size, 0u32);
        check(ruleset)?;
        let ruleset = ruleset as i32;
        for _ in 0..rules {
            let access = reader.number()?;
            let path = reader.text()?;
            let mut allowed_access = access & attr.handled_access_fs;
            let fd = libc::open(path, libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW);
            let mut stat: libc::stat = std::mem::zeroed();
            if fd >= 0
                && libc::fstat(fd, &mut stat) == 0
                && stat.st_mode & libc::S_IFMT != libc::S_IFDIR
            {
                // Only the rights of a file apply to one.
                allowed_access &= FILE_RIGHTS;
            }
            if fd < 0 || allowed_access == 0 {
                // A path that does not exist on this host grants nothing.
                if fd >= 0 {
                    libc::close(fd);
                }
                continue;
            }
            let beneath = PathBeneath {
                allowed_access,
                parent_fd: fd,
            };
            let added = libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                LANDLOCK_RULE_PATH_BENEATH,
                &beneath,
                0u32,
            );
            libc::close(fd);
            check(added)?;
        }
        let restricted = libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32);
        libc::close(ruleset);
        check(restricted)
    }
}

/// A slot of `held` no tree was put in yet, and one whose tree was placed.
const NEVER_HELD: i32 = -1;
const PLACED: i32 = -2;
const OPEN_TREE_CLONE: u32 = 1;
const AT_SYMLINK_NOFOLLOW: u32 = 0x100;
const AT_RECURSIVE: u32 = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const LANDLOCK_RULE_PATH_BENEATH: u32 = 1;
/// Landlock's rights that apply to a file (execute, write, read, truncate, device ioctl).
const FILE_RIGHTS: u64 = 1 | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15);

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
#[derive(Default)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `struct landlock_ruleset_attr`.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's ABI).
#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}
