//! Finding executables on a PATH-style list of directories.

use std::{
    ffi::OsString,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// The directories searched for runtimes, in order.
#[derive(Clone, Debug)]
pub struct SearchPath {
    dirs: Vec<PathBuf>,
}

impl SearchPath {
    /// The agent's own `PATH`.
    pub fn from_env() -> Self {
        Self::from_os(std::env::var_os("PATH").unwrap_or_default())
    }

    pub fn from_os(path: impl Into<OsString>) -> Self {
        let dirs = std::env::split_paths(&path.into())
            .filter(|d| !d.as_os_str().is_empty())
            .collect();
        SearchPath { dirs }
    }

    /// The first executable file called `name`.
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable_file(candidate))
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_executable_and_skips_plain_files() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        std::fs::write(first.path().join("tool"), "not executable").unwrap();
        let exe = second.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([first.path(), second.path()]).unwrap();
        let search = SearchPath::from_os(path);
        assert_eq!(search.find("tool"), Some(exe));
        assert_eq!(search.find("absent"), None);
    }
}
