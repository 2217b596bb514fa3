//! Where TLS identity is kept: a data directory per binary (mode 0700), with keys, tokens and
//! certificates written mode 0600 and replaced atomically.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use super::TlsError;

/// `<the user's data directory>/kowalski-exo/<component>`, e.g.
/// `~/.local/share/kowalski-exo/coordinator`.
pub fn default_dir(component: &str) -> PathBuf {
    dirs::data_dir()
        .or_else(|| dirs::home_dir().map(|home| home.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("kowalski-exo")
        .join(component)
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |error| TlsError::File {
        path: path.to_path_buf(),
        error,
    }
}

/// Creates `dir` (and its parents) readable by its owner only.
pub fn ensure_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(file_error(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(file_error(dir))
}

/// Writes `contents` to `path`, readable by its owner only, replacing what was there at once.
pub fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    // A name of its own, so writers in two processes never share a half-written file.
    let partial = path.with_extension(format!(
        "partial-{}-{}",
        std::process::id(),
        super::random_hex(4)
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(file_error(&partial))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(file_error(&partial))?;
    std::fs::rename(&partial, path).map_err(file_error(path))
}

/// The text of `path`, or none when it does not exist.
pub fn read(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_for_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        ensure_dir(&data).unwrap();
        let key = data.join("key.pem");
        write_private(&key, "secret").unwrap();
        write_private(&key, "newer").unwrap();
        assert_eq!(read(&key).unwrap().as_deref(), Some("newer"));
        assert_eq!(read(&data.join("none")).unwrap(), None);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&data), mode(&key)), (0o700, 0o600));
    }
}
