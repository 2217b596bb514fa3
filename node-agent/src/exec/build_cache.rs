//! Compiled programs cached by a hash of the code and the compiler, so running the same code
//! again skips the compile step.

use std::{
    fs, io,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use kowalski_exo_common::Language;
use sha2::{Digest, Sha256};

/// A directory of compiled programs, one file per (language, compiler, code).
#[derive(Clone, Debug)]
pub struct BuildCache {
    dir: PathBuf,
}

impl BuildCache {
    /// Opens (or makes) the cache at `dir`, closed to everyone but the agent: a run gets a copy
    /// of its program, so no run can read another's or replace one.
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        Ok(BuildCache { dir })
    }

    /// The cache key of a build.
    pub fn key(language: Language, compiler: &Path, compiler_version: &str, code: &str) -> String {
        let mut hash = Sha256::new();
        for part in [
            language.name().as_bytes(),
            compiler.as_os_str().as_encoded_bytes(),
            compiler_version.as_bytes(),
            code.as_bytes(),
        ] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        let digest = hash.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{}", language.name(), &hex[..32])
    }

    /// The cached program for `key`, if one was built before.
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let path = self.dir.join(key);
        path.is_file().then_some(path)
    }

    /// Copies a freshly built program into the cache; concurrent stores of one key are safe.
    /// `built` sits where a run may write: only a regular file is taken, never what a symlink
    /// or a FIFO put there leads to.
    pub fn store(&self, key: &str, built: &Path) -> io::Result<PathBuf> {
        let mut program = fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(built)?;
        let metadata = program.metadata()?;
        if !metadata.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a regular file", built.display()),
            ));
        }
        let mut staging = tempfile::NamedTempFile::new_in(&self.dir)?;
        io::copy(&mut program, &mut staging)?;
        fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755))?;
        let path = self.dir.join(key);
        staging.persist(&path).map_err(|e| e.error)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_code_and_compiler() {
        let cc = Path::new("/usr/bin/cc");
        let a = BuildCache::key(Language::C, cc, "12", "int main(){}");
        assert_eq!(a, BuildCache::key(Language::C, cc, "12", "int main(){}"));
        assert_ne!(a, BuildCache::key(Language::C, cc, "13", "int main(){}"));
        assert_ne!(
            a,
            BuildCache::key(Language::C, cc, "12", "int main(){return 1;}")
        );
    }

    #[test]
    fn stored_program_is_found_and_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BuildCache::new(dir.path().join("builds")).unwrap();
        let built = dir.path().join("program");
        fs::write(&built, b"\x7fELF").unwrap();
        fs::set_permissions(&built, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(cache.lookup("c-abc"), None);
        let stored = cache.store("c-abc", &built).unwrap();
        assert_eq!(cache.lookup("c-abc"), Some(stored.clone()));
        assert_ne!(
            fs::metadata(stored).unwrap().permissions().mode() & 0o111,
            0
        );
    }
}
