//! A run's work directory: private to the run's user, and with the mount layer a tmpfs of the
//! run's disk size, so a run that fills it gets ENOSPC instead of filling the device.

use std::{
    collections::HashSet,
    ffi::CString,
    fs,
    io::{self, BufRead},
    os::unix::{
        ffi::{OsStrExt, OsStringExt},
        fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::run_users::RunUser;

/// Name of the private temp directory inside the work directory; the mount layer binds it over
/// /tmp, /var/tmp and /dev/shm.
pub const TMP_DIR: &str = "tmp";

/// The work directories mounted now: a run's mount namespace, a copy of the host's, detaches
/// the others', so none outlives its run in a namespace that copied it.
pub type Mounted = Arc<Mutex<HashSet<PathBuf>>>;

/// One run's work directory, removed by [`Workspace::close`].
#[derive(Debug)]
pub struct Workspace {
    dir: PathBuf,
    mounted: Option<Mounted>,
    removed: bool,
    user: Option<RunUser>,
}

impl Workspace {
    /// Creates `dir` (which must not exist) for a run of `user`, as a tmpfs of `disk_bytes`
    /// recorded in `mounted` when `mount`. Blocking.
    pub fn create(
        dir: PathBuf,
        user: Option<RunUser>,
        mount: Option<(u64, &Mounted)>,
    ) -> io::Result<Workspace> {
        fs::create_dir(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let mut workspace = Workspace {
            dir,
            mounted: None,
            removed: false,
            user,
        };
        let owner = workspace.user.as_ref().map(RunUser::uid);
        if let Some((disk_bytes, mounted)) = mount {
            // One inode per 4 KiB page at most, so a run cannot pin memory in empty files.
            let inodes = (disk_bytes / 4096).max(1024);
            let mut options = format!("size={disk_bytes},nr_inodes={inodes},mode=0700");
            if let Some(uid) = owner {
                options.push_str(&format!(",uid={uid},gid={uid}"));
            }
            mount_tmpfs(&workspace.dir, &options)?;
            mounted
                .lock()
                .expect("mounted workspaces poisoned")
                .insert(workspace.dir.clone());
            workspace.mounted = Some(mounted.clone());
        } else if let Some(uid) = owner {
            std::os::unix::fs::chown(&workspace.dir, Some(uid), Some(uid))?;
        }
        workspace.make_dir(TMP_DIR)?;
        Ok(workspace)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn tmp(&self) -> PathBuf {
        self.dir.join(TMP_DIR)
    }

    /// The run's user, if it has one of its own.
    pub fn uid(&self) -> Option<u32> {
        self.user.as_ref().map(RunUser::uid)
    }

    /// A directory inside, owned by the run's user.
    pub fn make_dir(&self, name: &str) -> io::Result<PathBuf> {
        let path = self.dir.join(name);
        fs::create_dir_all(&path)?;
        if let Some(uid) = self.uid() {
            std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
        }
        Ok(path)
    }

    /// Unmounts and removes the directory, then gives the user back. Blocking.
    pub fn close(mut self) -> io::Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> io::Result<()> {
        if self.removed {
            return Ok(());
        }
        if let Some(user) = &self.user {
            user.end_leftovers();
        }
        if let Some(mounted) = &self.mounted {
            unmount(&self.dir)?;
            mounted
                .lock()
                .expect("mounted workspaces poisoned")
                .remove(&self.dir);
            self.mounted = None;
        }
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => {
                self.removed = true;
                Ok(())
            }
        }
    }
}

impl Drop for Workspace {
    /// A workspace not closed (a failed start, a run task that ended early) is removed anyway.
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove work directory");
        }
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

fn mount_tmpfs(target: &Path, options: &str) -> io::Result<()> {
    let target = c_path(target)?;
    let options = CString::new(options).map_err(io::Error::other)?;
    // SAFETY: mount with NUL-terminated strings that outlive the call.
    let mounted = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the mount at `target` (lazily: a process that escaped the run may still hold it).
fn unmount(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    // SAFETY: umount2 with a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches every mount beneath `root` (work directories left by an agent that died), deepest
/// first, so the tree can be removed.
pub fn unmount_beneath(root: &Path) {
    for target in mounts_beneath(root, "") {
        if let Err(e) = unmount(&target) {
            tracing::warn!(dir = %target.display(), error = %e, "cannot unmount a work directory");
        }
    }
}

/// The mount points beneath `root` whose first component below it starts with `prefix`,
/// deepest first. Allocates but takes no lock and does not log: the sentinel calls it.
pub fn mounts_beneath(root: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(mountinfo) = fs::File::open("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut targets: Vec<PathBuf> = io::BufReader::new(mountinfo)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| line.split(' ').nth(4).map(unescape_mount_path))
        .filter(|target| {
            target
                .strip_prefix(root)
                .ok()
                .and_then(|below| below.components().next())
                .is_some_and(|first| first.as_os_str().to_string_lossy().starts_with(prefix))
        })
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    targets
}

/// The name prefix of this agent's work directories: several agents may share a work root.
pub fn own_prefix() -> String {
    format!("run-{}-", std::process::id())
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/tmp/a\040b\134c"),
            PathBuf::from(r"/tmp/a b\c")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }
}
