//! The inventory's index in SQLite: one row per file (key, version, content hash, size,
//! mtime, status, reason), updated by a scan that reads only files whose size or mtime
//! changed.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension as _, params};
use tsunagi_state::{Durability, Migration, StateError};

use crate::message::PatientName;
use crate::reason::Reason;
use crate::scan::{self, Content, ContentCache, Entry, Options, ScanError, Summary};

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: "CREATE TABLE files (
            path TEXT PRIMARY KEY,
            patient_id TEXT, care_date TEXT, data_type TEXT, order_no TEXT,
            occurred_at TEXT, department TEXT, flag INTEGER,
            status TEXT NOT NULL, reason TEXT, findings TEXT NOT NULL,
            message_type TEXT, sent_raw TEXT NOT NULL, cancels INTEGER NOT NULL,
            name_ideographic TEXT, name_phonetic TEXT, has_name INTEGER NOT NULL,
            size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT,
            content_folder TEXT,
            generation INTEGER NOT NULL
          ) STRICT;
          CREATE INDEX files_key ON files (patient_id, care_date, data_type, order_no);
          CREATE INDEX files_generation ON files (generation);
          CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL) STRICT;
          INSERT INTO meta VALUES (1, 0);",
}];

/// Index errors.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot open the index")]
    Open(#[source] StateError),
    #[error("index query failed")]
    Sql(#[from] rusqlite::Error),
    #[error("scan failed")]
    Scan(#[from] ScanError),
}

/// What changed in one update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Paths seen for the first time.
    pub added: Vec<String>,
    /// Paths whose content hash or status changed.
    pub changed: Vec<String>,
    /// Paths no longer present.
    pub removed: Vec<String>,
    /// Files read (not taken from the index).
    pub read: u64,
}

/// A file's row as [`Index::get`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub status: String,
    pub reason: Option<String>,
    pub sha256: Option<String>,
}

/// The index.
pub struct Index {
    conn: Connection,
}

fn mtime_i64(ns: i128) -> i64 {
    i64::try_from(ns).unwrap_or(i64::MAX)
}

struct Cache<'a> {
    lookup: rusqlite::Statement<'a>,
    misses: u64,
}

const LOOKUP: &str = "SELECT sha256, findings, message_type, sent_raw, cancels, has_name, name_ideographic, name_phonetic
     FROM files WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND sha256 IS NOT NULL";
const INSERT: &str = "INSERT INTO files (path, patient_id, care_date, data_type, order_no, occurred_at, department, flag,
            status, reason, findings, message_type, sent_raw, cancels, name_ideographic, name_phonetic, has_name,
            size, mtime_ns, sha256, content_folder, generation)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)
         ON CONFLICT (path) DO UPDATE SET patient_id = excluded.patient_id, care_date = excluded.care_date,
            data_type = excluded.data_type, order_no = excluded.order_no, occurred_at = excluded.occurred_at,
            department = excluded.department, flag = excluded.flag, status = excluded.status,
            reason = excluded.reason, findings = excluded.findings, message_type = excluded.message_type,
            sent_raw = excluded.sent_raw, cancels = excluded.cancels, name_ideographic = excluded.name_ideographic,
            name_phonetic = excluded.name_phonetic, has_name = excluded.has_name, size = excluded.size,
            mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, content_folder = excluded.content_folder,
            generation = excluded.generation";
const BEFORE: &str = "SELECT sha256, status, reason FROM files WHERE path = ?1";

impl ContentCache for Cache<'_> {
    fn lookup(&mut self, path: &str, size: u64, mtime_ns: i128) -> Option<Content> {
        let size = i64::try_from(size).ok()?;
        let found = self
            .lookup
            .query_row(params![path, size, mtime_i64(mtime_ns)], |r| {
                let findings: String = r.get(1)?;
                let has_name: bool = r.get(5)?;
                Ok(Content {
                    sha256: r.get(0)?,
                    findings: findings.split(',').filter_map(Reason::from_code).collect(),
                    message_type: r.get(2)?,
                    sent_raw: r.get(3)?,
                    cancels: r.get(4)?,
                    patient_name: has_name.then(|| PatientName {
                        ideographic: r.get(6).ok().flatten(),
                        phonetic: r.get(7).ok().flatten(),
                    }),
                })
            })
            .optional()
            .ok()
            .flatten();
        if found.is_none() {
            self.misses += 1;
        }
        found
    }
}

/// Content findings only: the folder- and key-level ones are recomputed by every scan.
fn content_findings(e: &Entry) -> String {
    let folder_level = [
        Reason::DuplicateCurrent,
        Reason::NoCurrent,
        Reason::CaseCollision,
        Reason::UnknownDataType,
    ];
    e.findings
        .iter()
        .filter(|r| !folder_level.contains(r))
        .map(|r| r.code())
        .collect::<Vec<_>>()
        .join(",")
}

impl Index {
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let conn =
            tsunagi_state::open(path, Durability::Normal, MIGRATIONS).map_err(IndexError::Open)?;
        Ok(Index { conn })
    }

    pub fn open_in_memory() -> Result<Index, IndexError> {
        let conn = tsunagi_state::open_in_memory(MIGRATIONS).map_err(IndexError::Open)?;
        Ok(Index { conn })
    }

    /// Scans `root` and brings the index up to date; `sink` sees every entry.
    pub fn update(
        &mut self,
        root: &Path,
        opts: &Options,
        sink: &mut dyn FnMut(&Entry),
    ) -> Result<(Summary, Changes), IndexError> {
        self.update_in(root, opts, None, sink)
    }

    /// Like [`Index::update`] for the given data-type folders only (`L1/L2/PID/DATE/TYPE`):
    /// files elsewhere keep their rows; files gone from these folders are removed.
    pub fn update_folders(
        &mut self,
        root: &Path,
        opts: &Options,
        folders: &[String],
        sink: &mut dyn FnMut(&Entry),
    ) -> Result<(Summary, Changes), IndexError> {
        self.update_in(root, opts, Some(folders), sink)
    }

    fn update_in(
        &mut self,
        root: &Path,
        opts: &Options,
        folders: Option<&[String]>,
        sink: &mut dyn FnMut(&Entry),
    ) -> Result<(Summary, Changes), IndexError> {
        let generation: i64 = self
            .conn
            .query_row("SELECT generation FROM meta", [], |r| r.get::<_, i64>(0))?
            + 1;
        let tx = self.conn.unchecked_transaction()?;
        let mut changes = Changes::default();
        let mut failure: Option<rusqlite::Error> = None;
        let summary;
        {
            let mut cache = Cache {
                lookup: tx.prepare(LOOKUP)?,
                misses: 0,
            };
            let mut before = tx.prepare(BEFORE)?;
            let mut insert = tx.prepare(INSERT)?;
            let mut on_entry = |e: Entry| {
                if failure.is_some() {
                    return;
                }
                match upsert(&mut before, &mut insert, &e, generation) {
                    Ok(Some(true)) => changes.added.push(e.path.clone()),
                    Ok(Some(false)) => changes.changed.push(e.path.clone()),
                    Ok(None) => {}
                    Err(err) => failure = Some(err),
                }
                sink(&e);
            };
            summary = match folders {
                None => scan::scan(root, opts, &mut cache, &mut on_entry)?,
                Some(f) => scan::scan_folders(root, opts, f, &mut cache, &mut on_entry)?,
            };
            changes.read = cache.misses;
        }
        if let Some(e) = failure {
            return Err(e.into());
        }
        match folders {
            None => {
                {
                    let mut stmt =
                        tx.prepare("SELECT path FROM files WHERE generation < ?1 ORDER BY path")?;
                    changes.removed = stmt
                        .query_map([generation], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                }
                tx.execute("DELETE FROM files WHERE generation < ?1", [generation])?;
            }
            Some(folders) => {
                for folder in folders {
                    let prefix = format!("{folder}/");
                    let mut stmt =
                        tx.prepare("SELECT path FROM files WHERE generation < ?1 AND substr(path, 1, length(?2)) = ?2 ORDER BY path")?;
                    let gone: Vec<String> = stmt
                        .query_map(params![generation, prefix], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    for path in &gone {
                        tx.execute("DELETE FROM files WHERE path = ?1", [path])?;
                    }
                    changes.removed.extend(gone);
                }
            }
        }
        tx.execute("UPDATE meta SET generation = ?1", [generation])?;
        tx.commit()?;
        Ok((summary, changes))
    }

    /// The row of one path: status, reason and content hash.
    pub fn get(&self, path: &str) -> Result<Option<Row>, IndexError> {
        Ok(self
            .conn
            .query_row(
                "SELECT status, reason, sha256 FROM files WHERE path = ?1",
                [path],
                |r| {
                    Ok(Row {
                        status: r.get(0)?,
                        reason: r.get(1)?,
                        sha256: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Counts of the whole index by status and by reason (what a full scan's summary says).
    pub fn summary(&self) -> Result<Summary, IndexError> {
        let mut s = Summary::default();
        let mut stmt = self
            .conn
            .prepare("SELECT status, reason, count(*) FROM files GROUP BY status, reason")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (status, reason, n) = row?;
            let n = u64::try_from(n).unwrap_or(0);
            s.files += n;
            if let Some(st) = crate::resolve::Status::parse(&status) {
                *s.by_status.entry(st.as_str()).or_default() += n;
                if st == crate::resolve::Status::Current {
                    s.current_keys += n;
                }
            }
            if let Some(r) = reason.as_deref().and_then(Reason::from_code) {
                *s.by_reason.entry(r.code()).or_default() += n;
            }
        }
        Ok(s)
    }

    /// At most `limit` paths whose reason is `code`, in path order.
    pub fn with_reason(&self, code: &str, limit: usize) -> Result<Vec<String>, IndexError> {
        let mut stmt = self
            .conn
            .prepare("SELECT path FROM files WHERE reason = ?1 ORDER BY path LIMIT ?2")?;
        let rows = stmt.query_map(
            rusqlite::params![code, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| r.get::<_, String>(0),
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Number of rows.
    pub fn len(&self) -> Result<u64, IndexError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM files", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub fn is_empty(&self) -> Result<bool, IndexError> {
        Ok(self.len()? == 0)
    }
}

/// Writes one entry. `Some(true)`: new; `Some(false)`: changed; `None`: unchanged.
fn upsert(
    before: &mut rusqlite::Statement<'_>,
    insert: &mut rusqlite::Statement<'_>,
    e: &Entry,
    generation: i64,
) -> rusqlite::Result<Option<bool>> {
    let before: Option<(Option<String>, String, Option<String>)> = before
        .query_row([&e.path], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let reason = e.reason.map(Reason::code);
    let outcome = match &before {
        None => Some(true),
        Some((sha, status, r))
            if sha.as_deref() != e.sha256.as_deref()
                || status != e.status.as_str()
                || r.as_deref() != reason =>
        {
            Some(false)
        }
        Some(_) => None,
    };
    let name = e.patient_name.as_ref();
    insert.execute(params![
        e.path,
        e.patient_id,
        e.care_date,
        e.data_type,
        e.order_no,
        e.occurred_at,
        e.department,
        e.flag,
        e.status.as_str(),
        reason,
        content_findings(e),
        e.message_type,
        e.sent_raw,
        e.cancels,
        name.and_then(|n| n.ideographic.clone()),
        name.and_then(|n| n.phonetic.clone()),
        name.is_some(),
        i64::try_from(e.size).unwrap_or(i64::MAX),
        mtime_i64(e.mtime_ns),
        e.sha256,
        e.content_folder,
        generation,
    ])?;
    Ok(outcome)
}
