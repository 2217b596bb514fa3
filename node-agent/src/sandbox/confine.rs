//! One run's confinement turned into launcher [`Steps`], from the layers this host has.

use std::{
    collections::HashSet,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use super::{
    layers::Layers,
    steps::{Steps, landlock},
    workspace::Workspace,
};

/// Where a run's processes may go.
#[derive(Clone, Copy, Debug)]
pub struct Confinement<'a> {
    pub workspace: &'a Workspace,
    /// The run may use the network (its owner allowed it and the request asked).
    pub network: bool,
    /// The installation the program comes from (see [`runtime_tree`]).
    pub runtime: Option<&'a Path>,
}

/// Device files any program may write.
const WRITABLE_DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/tty"];
/// Shared temp directories each run gets a private one of.
const TEMP_DIRS: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];
/// Runtime state of the host's services, with their unix sockets (D-Bus and the like), which a
/// network namespace does not cut off: covered by an empty directory for runs without network.
const HOST_RUNTIME_DIR: &str = "/run";

/// The installation an executable belongs to: the directory above its `bin`.
pub fn runtime_tree(executable: &Path) -> Option<PathBuf> {
    let dir = executable.parent()?;
    let tree = match dir.file_name() {
        Some(name) if name == "bin" => dir.parent()?,
        _ => dir,
    };
    Some(tree.to_path_buf())
}

/// The path a run's user can start `program` by: itself when every directory above it lets
/// others in and (with `private_temp`) it is not in a temp directory the run gets its own of,
/// else where its symlinks lead (a runtime linked from such a directory).
pub fn reachable_program(program: &Path, private_temp: bool) -> PathBuf {
    let open = program.parent().is_some_and(|dir| {
        closed_ancestor(dir).is_none()
            && std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    });
    if open && !(private_temp && in_temp_dir(program)) {
        return program.to_path_buf();
    }
    std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf())
}

fn in_temp_dir(path: &Path) -> bool {
    TEMP_DIRS.iter().any(|dir| path.starts_with(dir))
}

/// The highest directory above `tree` that other users cannot enter (a home such as /root),
/// which hides the runtime from the run's user.
fn closed_ancestor(tree: &Path) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = tree.ancestors().skip(1).collect();
    ancestors.reverse();
    ancestors
        .into_iter()
        .find(|dir| {
            std::fs::metadata(dir)
                .map(|m| m.permissions().mode() & 0o001 == 0)
                .unwrap_or(false)
        })
        .map(Path::to_path_buf)
}

/// What a run may read when it runs as the agent's own user: everything but `hidden` (the agent's
/// data directory, build cache and work root). Landlock only grants, so this is every entry
/// beside the directories leading to a hidden one (symlinks aside: what they lead to is listed
/// in its own place). Those directories themselves cannot be listed, only passed through.
/// Found once, when the agent starts: entries made later are not readable.
pub fn readable_beside(hidden: &[PathBuf]) -> Vec<PathBuf> {
    let leading: HashSet<&Path> = hidden.iter().flat_map(|h| h.ancestors()).collect();
    let mut readable = Vec::new();
    for dir in &leading {
        if hidden.iter().any(|h| h == dir) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let symlink = entry.file_type().is_ok_and(|t| t.is_symlink());
            if !symlink && !leading.contains(path.as_path()) {
                readable.push(path);
            }
        }
    }
    readable
}

/// The steps that confine one process of a run. `readable` is all a run may read when it runs
/// as the agent's own user (no user layer), see [`readable_beside`]; none means anything.
/// `others` are the other runs' work directories, detached from this run's mount namespace.
pub fn steps(
    layers: &Layers,
    confinement: &Confinement<'_>,
    readable: Option<&[PathBuf]>,
    others: &[PathBuf],
) -> io::Result<Steps> {
    let mut steps = Steps::default();
    let workspace = confinement.workspace;
    let tmp = workspace.tmp();
    if layers.mount {
        steps.private_mounts();
        for other in others {
            steps.detach(other)?;
        }
        // What gets covered: the closed directory above the runtime, by an empty one others may
        // enter holding only the runtime (read-only), and the shared temp directories, by the
        // run's own. Every tree to place is held before anything covers it, and the work
        // directory is placed again at its path when one of the covers hid it.
        let closed = match (confinement.runtime, workspace.uid()) {
            (Some(tree), Some(_)) => closed_ancestor(tree).map(|closed| (closed, tree)),
            _ => None,
        };
        let temp_dirs: Vec<&Path> = TEMP_DIRS
            .iter()
            .map(Path::new)
            .filter(|dir| dir.is_dir())
            .collect();
        let host_runtime =
            Some(Path::new(HOST_RUNTIME_DIR)).filter(|dir| !confinement.network && dir.is_dir());
        let covers: Vec<&Path> = temp_dirs
            .iter()
            .copied()
            .chain(closed.as_ref().map(|(closed, _)| closed.as_path()))
            .chain(host_runtime)
            .collect();
        let hidden = |path: &Path| covers.iter().any(|cover| path.starts_with(cover));
        // Trees placed again at their own path once covered: the runtime (read-only), then the
        // work directory.
        let mut replace: Vec<(&Path, bool)> = Vec::new();
        if let Some(tree) = confinement.runtime
            && hidden(tree)
        {
            replace.push((tree, true));
        }
        if hidden(workspace.path()) {
            replace.push((workspace.path(), false));
        }
        let temps = temp_dirs
            .iter()
            .map(|_| steps.hold_tree(&tmp, false))
            .collect::<io::Result<Vec<_>>>()?;
        let held = replace
            .iter()
            .map(|(tree, read_only)| steps.hold_tree(tree, *read_only))
            .collect::<io::Result<Vec<_>>>()?;
        for empty in closed
            .iter()
            .map(|(closed, _)| closed.as_path())
            .chain(host_runtime)
        {
            steps.tmpfs(empty, "mode=0755,size=65536")?;
        }
        for (dir, slot) in temp_dirs.iter().zip(temps) {
            steps.place_tree(slot, dir)?;
        }
        for ((tree, _), slot) in replace.iter().zip(held) {
            steps.make_dirs(tree)?;
            steps.place_tree(slot, tree)?;
        }
        steps.private_proc();
    }
    // Before Landlock, which an unprivileged process may only apply under no_new_privs.
    steps.no_new_privs();
    let abi = layers.landlock_abi;
    if abi > 0 {
        let write = landlock::write_rights(abi);
        let file_write = write & (landlock::WRITE_FILE | landlock::TRUNCATE);
        let tcp = if !confinement.network && !layers.network && abi >= 4 {
            landlock::NET_BIND_TCP | landlock::NET_CONNECT_TCP
        } else {
            0
        };
        let scoped = if abi >= 6 {
            landlock::SCOPE_SIGNAL | landlock::SCOPE_ABSTRACT_UNIX_SOCKET
        } else {
            0
        };
        // Without a user of its own, reading is confined too, away from the agent's files.
        let readable = readable.filter(|_| workspace.uid().is_none());
        let read = match readable {
            Some(_) => landlock::READ_FILE | landlock::READ_DIR,
            None => 0,
        };
        let mut rules: Vec<(u64, &Path)> =
            vec![(write | read, workspace.path()), (write | read, &tmp)];
        let file_access = file_write | (read & landlock::READ_FILE);
        rules.extend(WRITABLE_DEVICES.iter().map(|d| (file_access, Path::new(d))));
        rules.extend(
            readable
                .into_iter()
                .flatten()
                .map(|path| (read, path.as_path())),
        );
        steps.landlock(abi, write | read, tcp, scoped, &rules)?;
    }
    if let Some(uid) = workspace.uid() {
        steps.user(uid, uid);
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_tree_is_the_directory_above_bin() {
        assert_eq!(
            runtime_tree(Path::new("/root/.pyenv/versions/3.12.1/bin/python3.12")),
            Some(PathBuf::from("/root/.pyenv/versions/3.12.1"))
        );
        assert_eq!(
            runtime_tree(Path::new("/opt/tool/runner")),
            Some(PathBuf::from("/opt/tool"))
        );
    }

    #[test]
    fn the_closed_ancestor_is_the_highest_one_others_cannot_enter() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let tree = home.join("inner/runtime");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(closed_ancestor(&tree), Some(home.clone()));
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(closed_ancestor(&tree), None);
    }
}
