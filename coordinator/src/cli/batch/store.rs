//! A batch's state in SQLite: every task's result, recorded exactly once (the task's id is the
//! key), in the order the tasks finished. A batch interrupted anyhow (Ctrl-C, a kill, the
//! coordinator restarting) goes on with `--resume` from what is recorded here.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::cli::Failure;

/// The database of one batch.
pub struct Store {
    conn: Connection,
}

/// A result as recorded.
#[derive(Debug, PartialEq)]
pub struct Recorded {
    pub id: String,
    pub ok: bool,
    /// The result's JSON line.
    pub line: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batch (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    ok INTEGER NOT NULL,
    line TEXT NOT NULL,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";

impl Store {
    /// Opens (or creates) the database at `path` for the batch file whose content hashes to
    /// `digest`. Results already there are gone on with only when `resume` says so.
    pub fn open(path: &Path, digest: &str, resume: bool) -> Result<Store, Failure> {
        let failed = |e: rusqlite::Error| Failure::usage(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Failure::usage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(failed)?;
        // Each result is on disk before the next is taken; WAL keeps that cheap.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(failed)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(failed)?;
        conn.execute_batch(SCHEMA).map_err(failed)?;
        let store = Store { conn };
        let recorded = store.count().map_err(failed)?;
        let known: Option<String> = store
            .conn
            .query_row("SELECT value FROM batch WHERE key = 'digest'", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(failed)?;
        if recorded > 0 && !resume {
            return Err(Failure::usage(format!(
                "{} already holds {recorded} results of a batch: pass --resume to go on with it, or --db another file",
                path.display()
            )));
        }
        if let Some(known) = known.filter(|known| known != digest) {
            eprintln!(
                "{} the batch file changed since {} was made ({} then, {digest} now): tasks are matched by id",
                crate::cli::PREFIX,
                path.display(),
                &known[..known.len().min(12)]
            );
        }
        store
            .conn
            .execute(
                "INSERT OR REPLACE INTO batch (key, value) VALUES ('digest', ?1)",
                params![digest],
            )
            .map_err(failed)?;
        Ok(store)
    }

    fn count(&self) -> rusqlite::Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM results", [], |row| row.get(0))
    }

    /// Records a task's result; false when the task already had one (which stays).
    pub fn record(&self, id: &str, ok: bool, line: &str) -> rusqlite::Result<bool> {
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO results (id, ok, line) VALUES (?1, ?2, ?3)",
            params![id, ok, line],
        )?;
        Ok(inserted == 1)
    }

    /// Every result recorded, in the order the tasks finished.
    pub fn results(&self) -> rusqlite::Result<Vec<Recorded>> {
        let mut query = self
            .conn
            .prepare("SELECT id, ok, line FROM results ORDER BY seq")?;
        query
            .query_map([], |row| {
                Ok(Recorded {
                    id: row.get(0)?,
                    ok: row.get(1)?,
                    line: row.get(2)?,
                })
            })?
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_recorded_once_and_found_again_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/batch.sqlite");
        let store = Store::open(&path, "d1", false).unwrap();
        assert!(store.record("a", true, "{\"id\":\"a\"}").unwrap());
        assert!(store.record("b", false, "{\"id\":\"b\"}").unwrap());
        assert!(!store.record("a", false, "again").unwrap());
        drop(store);

        let refused = Store::open(&path, "d1", false).err().unwrap();
        assert!(
            refused.message.contains("already holds 2 results"),
            "{refused:?}"
        );
        let store = Store::open(&path, "d2", true).unwrap();
        let results = store.results().unwrap();
        assert_eq!(
            results,
            [
                Recorded {
                    id: "a".into(),
                    ok: true,
                    line: "{\"id\":\"a\"}".into()
                },
                Recorded {
                    id: "b".into(),
                    ok: false,
                    line: "{\"id\":\"b\"}".into()
                },
            ]
        );
    }
}
