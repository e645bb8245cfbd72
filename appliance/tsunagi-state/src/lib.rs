//! Opens the appliance's SQLite databases the same way everywhere.
//!
//! Every service that keeps state on disk (queues, caches, bookkeeping) opens its database
//! through [`open`], so that all of them get the same settings and the same migration rules.
//! The crate has no tasks, channels or feature flags; it is a pair of functions.
//!
//! # Entry points
//!
//! - [`open`]: opens (creating if missing) a database file and brings its schema up to date.
//! - [`open_in_memory`]: the same for a private in-memory database, for tests.
//!
//! # What every connection gets
//!
//! - `journal_mode=WAL`, checked: opening fails if SQLite does not switch to WAL.
//! - `busy_timeout` of 5 s, so a short write by another connection does not fail a query.
//! - `foreign_keys=ON`, checked.
//! - `synchronous=FULL` or `NORMAL`, chosen by [`Durability`].
//! - `trusted_schema=OFF`: SQL functions and virtual tables reachable from the schema
//!   (views, triggers, defaults) cannot have side effects, so a tampered database file
//!   cannot make us run something on open.
//! - SQLite's query planner stability guarantee (`SQLITE_DBCONFIG_ENABLE_QPSG`), checked: a
//!   statement's plan never depends on the values bound to it. Without it SQLite marks a
//!   statement such as `... WHERE col = ?1 ORDER BY id DESC LIMIT 1` to be prepared again
//!   whenever its parameter changes, and rusqlite's statement cache (which clears the
//!   bindings of a statement it takes back) then prepares it again at every use: 5 % of the
//!   DICOM service's CPU went to parsing one such statement.
//!
//! # Files
//!
//! A missing database file is created with mode `0600` (SQLite gives its `-wal` and `-shm`
//! files the same mode). The parent directory must already exist: creating directories is
//! the runtime's job, with the right owner and mode, and a missing directory usually means a
//! wrong path.
//!
//! # Migrations
//!
//! Schemas evolve forward only, tracked in `PRAGMA user_version`. A service passes its full,
//! ordered list of [`Migration`]s, numbered 1, 2, 3, ...; [`open`] applies, in order, each one
//! with a version above the database's, each in its own transaction together with the
//! `user_version` bump, so a failing migration leaves the database at the previous version.
//! A database whose version is above the newest known migration (written by newer software,
//! e.g. before a rollback) is refused with [`StateError::TooNew`] rather than risk misreading
//! it.
//!
//! **Invariant:** the `user_version` of a database opened through this crate equals the
//! number of migrations the opening code knows.
//!
//! # Small files
//!
//! [`replace_file`] writes a small file (a record, a certificate, a key) so that a power
//! cut leaves either the old content or the new one: beside it, flushed, renamed in, and the
//! directory flushed.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

/// Replaces `path` with `bytes` (mode `mode` for a new file; the umask may narrow it):
/// written to `.NAME.new` beside it, flushed, renamed in, and the directory flushed. The
/// directory is created if missing.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// How long a connection waits for another connection's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How hard SQLite works to make a commit survive power loss.
///
/// Both settings keep the database consistent (WAL mode never corrupts on power loss); they
/// differ in whether the most recent commits can be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is on disk when it returns. Use it for anything that
    /// acknowledges data to a peer (once we said "stored", it must stay stored).
    Acknowledging,
    /// `synchronous=NORMAL`: still safe against corruption in WAL mode, but the last
    /// transactions may be lost on power loss. Use it for state that can be rebuilt or
    /// re-fetched.
    Normal,
}

impl Durability {
    /// The value to set and the value `PRAGMA synchronous` reads back.
    fn synchronous(self) -> (&'static str, i64) {
        match self {
            Durability::Acknowledging => ("FULL", 2),
            Durability::Normal => ("NORMAL", 1),
        }
    }
}

/// One forward step of a database schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// The schema version this migration produces. Versions are 1-based and consecutive in
    /// the list passed to [`open`]: the first migration is version 1.
    pub version: u32,
    /// The SQL to run, possibly several statements. It runs inside a transaction, so it must
    /// not contain `BEGIN`/`COMMIT`, and `PRAGMA foreign_keys` has no effect in it.
    pub sql: &'static str,
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The migration list is not numbered 1, 2, 3, ...: a programming error.
    #[error(
        "migration at position {index} has version {found}, expected {expected} \
         (migrations must be numbered consecutively from 1)"
    )]
    BadMigrations {
        /// Position in the list, 0-based.
        index: usize,
        /// The version that position must have.
        expected: u32,
        /// The version it has.
        found: u32,
    },

    /// The database file did not exist and could not be created (for example, because its
    /// parent directory does not exist).
    #[error("failed to create database file {}", path.display())]
    Create {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// SQLite could not open the database.
    #[error("failed to open database {}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },

    /// A connection setting could not be applied or read back.
    #[error("failed to set {pragma} on database {}", path.display())]
    Pragma {
        /// The database file.
        path: PathBuf,
        /// The setting, e.g. `journal_mode`.
        pragma: &'static str,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },

    /// SQLite accepted a setting but reports a different value (e.g. WAL is unavailable).
    #[error("database {}: {pragma} is {found}, expected {expected}", path.display())]
    PragmaNotApplied {
        /// The database file.
        path: PathBuf,
        /// The setting, e.g. `journal_mode`.
        pragma: &'static str,
        /// The value we asked for.
        expected: String,
        /// The value SQLite reports.
        found: String,
    },

    /// The schema version could not be read.
    #[error("failed to read the schema version of database {}", path.display())]
    ReadVersion {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },

    /// The schema version is negative: this database was not written by us.
    #[error("database {} has invalid schema version {found}", path.display())]
    InvalidVersion {
        /// The database file.
        path: PathBuf,
        /// The `user_version` found.
        found: i64,
    },

    /// The database was written by newer software that knows more migrations than we do.
    #[error(
        "database {} has schema version {found}, newer than this software knows ({known}); \
         refusing to open",
        path.display()
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The database's schema version.
        found: u32,
        /// The newest schema version this software knows.
        known: u32,
    },

    /// A migration failed; it was rolled back and the database stays at `version - 1`.
    #[error("failed to apply migration {version} to database {}", path.display())]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The migration that failed.
        version: u32,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
}

/// Opens the database at `path`, creating it (mode `0600`) if missing, applies the
/// connection settings described in the [crate docs](crate) and brings its schema up to
/// date with `migrations`.
///
/// The parent directory of `path` must exist.
///
/// # Errors
///
/// [`StateError::BadMigrations`] if `migrations` is not numbered 1, 2, 3, ... (checked
/// before touching the file); [`StateError::TooNew`] if the database is newer than the
/// newest migration; otherwise an error naming the operation that failed.
pub fn open(
    path: &Path,
    durability: Durability,
    migrations: &[Migration],
) -> Result<Connection, StateError> {
    let known = check_migrations(migrations)?;
    create_if_missing(path)?;

    // No SQLITE_OPEN_CREATE: the file exists now, with our mode. No SQLITE_OPEN_URI: a path
    // is a path, never a `file:` URI with options.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|source| StateError::Open {
        path: path.to_owned(),
        source,
    })?;

    configure(&conn, path, durability, JournalMode::Wal)?;
    migrate(&mut conn, path, migrations, known)?;
    Ok(conn)
}

/// Opens a private in-memory database with the same settings and migrations as [`open`],
/// for tests.
///
/// The one difference: SQLite keeps the journal of an in-memory database in memory, so the
/// journal mode is not WAL. Durability does not apply; `synchronous` is set to `FULL`.
///
/// # Errors
///
/// As [`open`]; errors name the path `:memory:`.
pub fn open_in_memory(migrations: &[Migration]) -> Result<Connection, StateError> {
    let path = Path::new(":memory:");
    let known = check_migrations(migrations)?;
    let mut conn = Connection::open_in_memory().map_err(|source| StateError::Open {
        path: path.to_owned(),
        source,
    })?;
    configure(&conn, path, Durability::Acknowledging, JournalMode::Memory)?;
    migrate(&mut conn, path, migrations, known)?;
    Ok(conn)
}

/// Checks that migrations are numbered 1, 2, 3, ... and returns the newest version.
fn check_migrations(migrations: &[Migration]) -> Result<u32, StateError> {
    let mut expected = 0_u32;
    for (index, migration) in migrations.iter().enumerate() {
        expected += 1;
        if migration.version != expected {
            return Err(StateError::BadMigrations {
                index,
                expected,
                found: migration.version,
            });
        }
    }
    Ok(expected)
}

/// Creates an empty database file with mode 0600 unless one exists.
fn create_if_missing(path: &Path) -> Result<(), StateError> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        // Already there (possibly created a moment ago by another process): keep its mode.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StateError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The journal mode [`configure`] sets and checks.
#[derive(Clone, Copy)]
enum JournalMode {
    Wal,
    /// What an in-memory database always reports.
    Memory,
}

/// Applies and checks the per-connection settings.
fn configure(
    conn: &Connection,
    path: &Path,
    durability: Durability,
    journal: JournalMode,
) -> Result<(), StateError> {
    let pragma_err = |pragma: &'static str| {
        move |source| StateError::Pragma {
            path: path.to_owned(),
            pragma,
            source,
        }
    };

    // First, so that switching the journal mode waits for other connections too.
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(pragma_err("busy_timeout"))?;

    let wanted = match journal {
        JournalMode::Wal => "wal",
        JournalMode::Memory => "memory",
    };
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(pragma_err("journal_mode"))?;
    expect_value(path, "journal_mode", wanted, &mode.to_ascii_lowercase())?;

    let (sync_name, sync_value) = durability.synchronous();
    conn.pragma_update(None, "synchronous", sync_name)
        .map_err(pragma_err("synchronous"))?;
    let sync: i64 = conn
        .pragma_query_value(None, "synchronous", |row| row.get(0))
        .map_err(pragma_err("synchronous"))?;
    expect_value(
        path,
        "synchronous",
        &sync_value.to_string(),
        &sync.to_string(),
    )?;

    // Silently ignored inside a transaction, and SQLite may be built without it: read back.
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(pragma_err("foreign_keys"))?;
    let fk: i64 = conn
        .pragma_query_value(None, "foreign_keys", |row| row.get(0))
        .map_err(pragma_err("foreign_keys"))?;
    expect_value(path, "foreign_keys", "1", &fk.to_string())?;

    conn.pragma_update(None, "trusted_schema", false)
        .map_err(pragma_err("trusted_schema"))?;

    // Plans that do not depend on bound values (see the crate's documentation).
    let qpsg = conn
        .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(pragma_err("query planner stability guarantee"))?;
    expect_value(
        path,
        "query planner stability guarantee",
        "1",
        &u8::from(qpsg).to_string(),
    )?;

    Ok(())
}

fn expect_value(
    path: &Path,
    pragma: &'static str,
    expected: &str,
    found: &str,
) -> Result<(), StateError> {
    if expected == found {
        Ok(())
    } else {
        Err(StateError::PragmaNotApplied {
            path: path.to_owned(),
            pragma,
            expected: expected.to_owned(),
            found: found.to_owned(),
        })
    }
}

/// Reads `PRAGMA user_version`, refusing negative values.
fn schema_version(conn: &Connection, path: &Path) -> Result<u32, StateError> {
    let raw: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|source| StateError::ReadVersion {
            path: path.to_owned(),
            source,
        })?;
    u32::try_from(raw).map_err(|_| StateError::InvalidVersion {
        path: path.to_owned(),
        found: raw,
    })
}

/// Applies the migrations above the database's version, one transaction each.
fn migrate(
    conn: &mut Connection,
    path: &Path,
    migrations: &[Migration],
    known: u32,
) -> Result<(), StateError> {
    let too_new = |found| StateError::TooNew {
        path: path.to_owned(),
        found,
        known,
    };

    // Fast path without a write lock: the usual case is an up-to-date database.
    let mut current = schema_version(conn, path)?;
    if current > known {
        return Err(too_new(current));
    }
    if current == known {
        return Ok(());
    }

    loop {
        let migrate_err = |version| {
            move |source| StateError::Migrate {
                path: path.to_owned(),
                version,
                source,
            }
        };
        // IMMEDIATE takes the write lock before reading the version, so two processes
        // opening the same database cannot both apply a migration.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(migrate_err(current + 1))?;
        current = schema_version(&tx, path)?;
        if current > known {
            return Err(too_new(current));
        }
        // `check_migrations` guarantees that the migration for version v sits at index v-1.
        let Some(migration) = migrations.iter().find(|m| m.version == current + 1) else {
            // Up to date (possibly thanks to another process); dropping `tx` rolls back the
            // empty transaction.
            return Ok(());
        };
        tx.execute_batch(migration.sql)
            .map_err(migrate_err(migration.version))?;
        tx.pragma_update(None, "user_version", migration.version)
            .map_err(migrate_err(migration.version))?;
        // On any error above, dropping `tx` rolls the migration back.
        tx.commit().map_err(migrate_err(migration.version))?;
        current = migration.version;
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const V1: Migration = Migration {
        version: 1,
        sql: "CREATE TABLE a (id INTEGER PRIMARY KEY, name TEXT NOT NULL);",
    };
    const V2: Migration = Migration {
        version: 2,
        sql: "CREATE TABLE b (id INTEGER PRIMARY KEY, a_id INTEGER NOT NULL REFERENCES a(id));
              INSERT INTO a (name) VALUES ('seed');",
    };
    const V3: Migration = Migration {
        version: 3,
        sql: "ALTER TABLE a ADD COLUMN note TEXT;",
    };

    fn user_version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    fn table_exists(conn: &Connection, name: &str) -> bool {
        conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    }

    fn pragma_i64(conn: &Connection, name: &str) -> i64 {
        conn.pragma_query_value(None, name, |r| r.get(0)).unwrap()
    }

    /// A cached statement whose plan could depend on its parameter (an equality on an
    /// indexed column, ordered) is prepared once, not again at every use.
    #[test]
    fn a_cached_statement_is_not_prepared_again_at_each_use() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(
            &dir.path().join("state.db"),
            Durability::Normal,
            &[
                V1,
                Migration {
                    version: 2,
                    sql: "CREATE INDEX a_name ON a (name);",
                },
            ],
        )
        .unwrap();
        let sql = "SELECT id FROM a WHERE name = ?1 ORDER BY id DESC LIMIT 1";
        for i in 0..10 {
            conn.execute("INSERT INTO a (name) VALUES (?1)", [format!("n{i}")])
                .unwrap();
            let mut find = conn.prepare_cached(sql).unwrap();
            let found: i64 = find.query_row([format!("n{i}")], |r| r.get(0)).unwrap();
            assert_eq!(found, i + 1);
            assert_eq!(
                find.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "use {i}"
            );
        }
    }

    #[test]
    fn fresh_database_gets_all_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let conn = open(&path, Durability::Normal, &[V1, V2, V3]).unwrap();
        assert_eq!(user_version(&conn), 3);
        assert!(table_exists(&conn, "a"));
        assert!(table_exists(&conn, "b"));
        // V3's column exists and V2's seed row is there.
        let note: Option<String> = conn
            .query_row("SELECT note FROM a WHERE name = 'seed'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(note, None);
    }

    #[test]
    fn reopening_applies_only_new_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(open(&path, Durability::Normal, &[V1, V2]).unwrap());

        // If V2 ran again, it would insert a second seed row (or fail on CREATE TABLE).
        let conn = open(&path, Durability::Normal, &[V1, V2, V3]).unwrap();
        assert_eq!(user_version(&conn), 3);
        let seeds: i64 = conn
            .query_row("SELECT count(*) FROM a", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seeds, 1);
        drop(conn);

        // Up to date: nothing runs.
        let conn = open(&path, Durability::Normal, &[V1, V2, V3]).unwrap();
        assert_eq!(user_version(&conn), 3);
    }

    #[test]
    fn too_new_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(open(&path, Durability::Normal, &[V1, V2, V3]).unwrap());

        let err = open(&path, Durability::Normal, &[V1]).unwrap_err();
        match &err {
            StateError::TooNew { found, known, .. } => assert_eq!((*found, *known), (3, 1)),
            other => panic!("expected TooNew, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "database {} has schema version 3, newer than this software knows (1); \
                 refusing to open",
                path.display()
            )
        );
    }

    #[test]
    fn pragmas_are_set() {
        let dir = tempfile::tempdir().unwrap();
        for (durability, sync) in [(Durability::Acknowledging, 2), (Durability::Normal, 1)] {
            let path = dir.path().join(format!("{durability:?}.db"));
            let conn = open(&path, durability, &[V1]).unwrap();
            let mode: String = conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            assert_eq!(pragma_i64(&conn, "synchronous"), sync, "{durability:?}");
            assert_eq!(pragma_i64(&conn, "foreign_keys"), 1);
            assert_eq!(pragma_i64(&conn, "trusted_schema"), 0);
            assert_eq!(pragma_i64(&conn, "busy_timeout"), 5000);
        }
    }

    #[test]
    fn foreign_keys_are_enforced() {
        let conn = open_in_memory(&[V1, V2]).unwrap();
        let err = conn
            .execute("INSERT INTO b (a_id) VALUES (999)", [])
            .unwrap_err();
        assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    }

    #[test]
    fn new_file_has_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(open(&path, Durability::Acknowledging, &[V1]).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }

    #[test]
    fn missing_parent_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("state.db");
        let err = open(&path, Durability::Normal, &[V1]).unwrap_err();
        assert!(matches!(err, StateError::Create { .. }), "{err:?}");
        assert!(!path.parent().unwrap().exists());
        // The message names the path; the cause is a source, not part of the message.
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        assert!(err.source().is_some());
    }

    #[test]
    fn failed_migration_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let bad = Migration {
            version: 2,
            sql: "CREATE TABLE c (x INTEGER); INSERT INTO no_such_table VALUES (1);",
        };
        let err = open(&path, Durability::Normal, &[V1, bad]).unwrap_err();
        match &err {
            StateError::Migrate { version, .. } => assert_eq!(*version, 2),
            other => panic!("expected Migrate, got {other:?}"),
        }
        assert!(!err.to_string().contains("no_such_table"), "{err}");
        assert!(err.source().unwrap().to_string().contains("no_such_table"));

        // Migration 1 committed; migration 2 left no trace.
        let conn = open(&path, Durability::Normal, &[V1]).unwrap();
        assert_eq!(user_version(&conn), 1);
        assert!(table_exists(&conn, "a"));
        assert!(!table_exists(&conn, "c"));
    }

    #[test]
    fn migrations_must_be_consecutive_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let cases: [&[Migration]; 3] = [&[V2], &[V1, V3], &[V1, V1]];
        for migrations in cases {
            let err = open(&path, Durability::Normal, migrations).unwrap_err();
            assert!(matches!(err, StateError::BadMigrations { .. }), "{err:?}");
        }
        // Checked before touching the file.
        assert!(!path.exists());
        let zero = Migration { version: 0, ..V1 };
        assert!(matches!(
            open_in_memory(&[zero]),
            Err(StateError::BadMigrations {
                index: 0,
                expected: 1,
                found: 0
            })
        ));
    }

    #[test]
    fn no_migrations_is_fine_on_a_fresh_database() {
        let conn = open_in_memory(&[]).unwrap();
        assert_eq!(user_version(&conn), 0);
    }

    #[test]
    fn in_memory_database_is_configured_and_migrated() {
        let conn = open_in_memory(&[V1, V2]).unwrap();
        assert_eq!(user_version(&conn), 2);
        assert_eq!(pragma_i64(&conn, "foreign_keys"), 1);
        assert_eq!(pragma_i64(&conn, "synchronous"), 2);
    }

    #[test]
    fn negative_user_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", -1).unwrap();
        }
        let err = open(&path, Durability::Normal, &[V1]).unwrap_err();
        assert!(
            matches!(err, StateError::InvalidVersion { found: -1, .. }),
            "{err:?}"
        );
    }
}
