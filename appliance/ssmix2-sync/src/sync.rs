//! One sync cycle: inventory the storage, ask the consent gate, plan the replica's changes
//! into a durable outbox, and carry them out.
//!
//! The replica mirrors the storage's relative paths for the files it may hold: every
//! non-quarantined file (current, superseded, deleted — the flag lifecycle is reproduced by
//! renames) of a patient whose consent permits the file's category for the hub.
//!
//! Order of a cycle:
//! 1. Update the index (files whose size and mtime are unchanged are not read again).
//! 2. Finish the outbox left by an earlier cycle (after a crash or a failed transport).
//! 3. Revocations first: patients whose consent changed (the consent service's change feed)
//!    and published permissions older than `recheck` are asked again; a definite denial
//!    removes that patient's files of that category (delete, or tombstone by policy). The
//!    feed position is saved in the same transaction as the removals it caused.
//! 4. Publications, in batches: files not yet published with their content hash. A file of
//!    a key whose published version vanished with the same content is a rename (`_1` →
//!    `_2`); otherwise a put. Files changed within `settle` wait (E-01).
//! 5. Files that vanished from the storage without a rename are removed from the replica
//!    only when a scan at least `confirm_deletion` later confirms it (E-03).
//!
//! When the consent cache is stale (fail closed) the sync holds: nothing new is published
//! and nothing is removed. Every operation is idempotent and recorded in the outbox before
//! it is carried out, so a crash at any point leaves a replica that converges.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params};
use sha2::{Digest as _, Sha256};
use ssmix2::index::{Index, IndexError};
use ssmix2::scan::{Options, Summary};
use tsunagi_config::WithdrawalPolicy;
use tsunagi_state::{Durability, Migration, StateError};

use crate::replica::{RelPath, Replica, ReplicaError};

pub mod handling;
pub mod waiting;
use consent::client::{
    Category, Decision, DenyReason, Gate, GateError, Object, Release, ReleaseKind,
};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "CREATE TABLE published (
            path TEXT PRIMARY KEY, sha256 TEXT NOT NULL,
            patient_id TEXT NOT NULL, category TEXT NOT NULL, key TEXT NOT NULL,
            tombstone INTEGER NOT NULL DEFAULT 0, vanished_at INTEGER,
            published_at INTEGER NOT NULL
          ) STRICT;
          CREATE INDEX published_pair ON published (patient_id, category);
          CREATE INDEX published_key ON published (key, sha256);
          CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            op TEXT NOT NULL CHECK (op IN ('put', 'rename', 'delete', 'tombstone')),
            path TEXT NOT NULL, dest TEXT, sha256 TEXT,
            patient_id TEXT NOT NULL, category TEXT NOT NULL, key TEXT NOT NULL,
            created_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT
          ) STRICT;
          CREATE TABLE decisions (
            patient_id TEXT NOT NULL, category TEXT NOT NULL,
            verdict TEXT NOT NULL, reason TEXT, decided_at INTEGER NOT NULL,
            PRIMARY KEY (patient_id, category)
          ) STRICT;
          CREATE TABLE meta (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            consent_seq INTEGER NOT NULL, last_success INTEGER
          ) STRICT;
          INSERT INTO meta VALUES (1, 0, NULL);",
    },
    Migration {
        version: 2,
        // Where the transaction storage's change feed was read up to.
        sql: "ALTER TABLE meta ADD COLUMN tr_file TEXT NOT NULL DEFAULT '';
          ALTER TABLE meta ADD COLUMN tr_offset INTEGER NOT NULL DEFAULT 0;
          ALTER TABLE meta ADD COLUMN cycles INTEGER NOT NULL DEFAULT 0;",
    },
    Migration {
        version: 3,
        // Release records waiting for the consent service's audit trail: written in the
        // same transaction that marks the operation done, sent (and removed) afterwards. A
        // planned removal keeps the audit row of the denial that planned it.
        sql: "ALTER TABLE outbox ADD COLUMN decision INTEGER;
          CREATE TABLE releases (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            patient_id TEXT NOT NULL, category TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('sent', 'deleted')),
            sha256 TEXT NOT NULL, data_type TEXT NOT NULL,
            decision INTEGER
          ) STRICT;",
    },
    Migration {
        version: 4,
        // The audit row of the permit under which a put or rename was started: written
        // durably before it is carried out, so that an operation cut short after the hub got
        // the file (a lost response, a power cut before the local commit) is never simply
        // dropped when it is denied later: it is undone at the hub, and both the release it
        // may have been and the removal are recorded.
        sql: "ALTER TABLE outbox ADD COLUMN started INTEGER;",
    },
    Migration {
        version: 5,
        // The ATNA audit trail (issue 17): each release (a file put at the hub, or deleted
        // there) is also owed to the `audit` service, written by a trigger with the release
        // record, until the service hands it over (`crate::audit_trail`).
        sql: "CREATE TABLE atna_pending (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
            patient_id TEXT NOT NULL, data_type TEXT NOT NULL, sha256 TEXT NOT NULL
          ) STRICT;
          CREATE TRIGGER atna_release AFTER INSERT ON releases
          BEGIN
            INSERT INTO atna_pending (deleted, patient_id, data_type, sha256)
            VALUES (NEW.kind = 'deleted', NEW.patient_id, NEW.data_type, NEW.sha256);
          END;",
    },
    // The sync's other events for the audit trail (a replica refused over TLS):
    // `audit::pending::TABLE`.
    Migration {
        version: 6,
        sql: audit::pending::TABLE,
    },
    Migration {
        version: 7,
        // The versions of files the staff discarded at the console (保留中): never sent
        // (`handling`).
        sql: "CREATE TABLE discarded (
            path TEXT NOT NULL, sha256 TEXT NOT NULL, at INTEGER NOT NULL,
            PRIMARY KEY (path, sha256)
          ) STRICT;",
    },
];

/// Opens `sync.db` in `state_dir` (creating or migrating it) on a connection of its own.
pub fn open_db(state_dir: &Path) -> Result<Connection, SyncError> {
    tsunagi_state::open(
        &state_dir.join("sync.db"),
        Durability::Acknowledging,
        MIGRATIONS,
    )
    .map_err(SyncError::Open)
}

/// The most release records sent to the consent service per drain (the rest next time).
const RELEASES_PER_FLUSH: i64 = 2000;

/// With a transaction storage, every this many cycles is a full rescan anyway (the feed is
/// trusted for speed, never for completeness).
const FULL_RESCAN_EVERY: i64 = 30;

/// How many files one publication batch plans before carrying them out.
const BATCH: i64 = 500;

/// Nanoseconds since the Unix epoch (file times); seconds for everything the sync records.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn now_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// Sync errors. None is fatal for the service: the cycle is retried.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot open the sync database")]
    Open(#[source] StateError),
    #[error("sync database operation `{op}` failed")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the inventory failed")]
    Index(#[from] IndexError),
    #[error("the consent service could not answer; holding")]
    Gate(#[from] GateError),
    #[error("the replica refused an operation")]
    Replica(#[from] ReplicaError),
    #[error("the service is stopping; the rest of the outbox waits for the next cycle")]
    Stopped,
    #[error("the SS-MIX2 share is not mounted at {0} yet; nothing is read until it is")]
    ShareNotMounted(String),
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> SyncError {
    move |source| SyncError::Sql { op, source }
}

/// What the sync needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub storage: PathBuf,
    pub settle: Duration,
    pub confirm_deletion: Duration,
    pub recheck: Duration,
    pub withdrawal: WithdrawalPolicy,
    /// The clinic's 医療機関コード (MSH-4 of tombstones).
    pub facility: String,
    /// The transaction storage (`TR_*.DAT`): the change feed, when configured.
    pub transaction_storage: Option<PathBuf>,
    /// The storage is an SMB share mounted at `storage`: a cycle reads nothing while it is
    /// not mounted ([`crate::share::mounted`]), so the empty mount point is never taken for
    /// an emptied storage.
    pub share: bool,
}

/// What one cycle did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CycleReport {
    pub scanned: Summary,
    pub files_read: u64,
    pub published: u64,
    pub renamed: u64,
    pub removed: u64,
    /// Files waiting: consent denied for now, stale cache, not settled, unknown type.
    pub held: u64,
    /// Of those, files changed within the settle delay: the service runs the next cycle as
    /// soon as they have settled.
    pub unsettled: u64,
    /// Whether the consent cache was fresh (else the cycle held everything).
    pub fresh: bool,
    /// Operations the hub refused this cycle (it answered, and refused that file:
    /// `refused_by_the_hub`). Each stays in the outbox, with its error, and is tried again
    /// every cycle; the operations behind it on other keys went on.
    pub refused: u64,
    /// The last of those refusals, for status (no patient data: the method and status).
    pub last_refusal: Option<String>,
}

/// The state the service reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub published_files: u64,
    pub outbox_depth: u64,
    /// Seconds since the oldest change waiting in the outbox was planned.
    pub oldest_pending_age: Option<i64>,
    /// When the last cycle completed (Unix seconds).
    pub last_success: Option<i64>,
    /// Release records not yet in the consent service's audit trail.
    pub releases_waiting: u64,
}

/// The sync's durable state and the storage's index.
pub struct Syncer {
    conn: Connection,
    index: Index,
    settings: Settings,
    /// Set when the service stops: the outbox is not drained further ([`Syncer::stop_on`]).
    stop: Option<Arc<AtomicBool>>,
    /// The console's requests, carried out between operations ([`Syncer::serve_desk`]).
    desk: Option<handling::Desk>,
    /// Whether the last cycle's consent cache was fresh (for what waits).
    fresh: bool,
    /// The keys and paths of operations the hub refused in this cycle, and of those behind
    /// them on the same key or path: skipped, in order, until the next cycle. Operations on
    /// other keys do not wait for them: a file the hub keeps refusing must not hold back the
    /// others, nor a withdrawal's removals.
    blocked: HashSet<String>,
}

/// One planned operation, as stored in the outbox.
#[derive(Debug, Clone)]
struct Op {
    seq: i64,
    op: String,
    path: String,
    dest: Option<String>,
    sha256: Option<String>,
    patient_id: String,
    category: String,
    key: String,
    /// The audit row of the decision that planned it (a removal's denial).
    decision: Option<i64>,
    /// The audit row of the permit under which it was started, if it was (see migration 4).
    started: Option<i64>,
}

/// What carrying out an operation did.
enum Effect {
    Published {
        path: String,
        sha256: String,
        tombstone: bool,
    },
    Renamed {
        from: String,
        to: String,
    },
    Removed(String),
    /// A put or rename that had been started, and then was denied or found its source gone
    /// or changed: every name it may have written at the hub is deleted again.
    Undone {
        /// Whether a name it writes was found at the hub (so it may have left the box).
        reached: bool,
        /// The SHA-256 of the content it carried.
        sha256: String,
        /// Published rows of those names, now deleted at the hub: (path, SHA-256).
        forget: Vec<(String, String)>,
    },
    /// The source changed since the plan (or the replica lost the file): nothing done; the
    /// next cycle plans again.
    Dropped {
        forget: Option<String>,
    },
}

fn key_of(patient: &str, date: &str, data_type: &str, order: &str) -> String {
    format!("{patient}/{date}/{data_type}/{order}")
}

impl Syncer {
    /// Opens (creating) `STATE/sync.db` and `STATE/index.db`.
    pub fn open(state_dir: &Path, settings: Settings) -> Result<Syncer, SyncError> {
        let index_path = state_dir.join("index.db");
        let index = Index::open(&index_path)?;
        let conn = open_db(state_dir)?;
        conn.execute("ATTACH DATABASE ?1 AS idx", [index_path.to_string_lossy()])
            .map_err(sql("attach the index"))?;
        Ok(Syncer {
            conn,
            index,
            settings,
            stop: None,
            desk: None,
            fresh: false,
            blocked: HashSet::new(),
        })
    }

    /// Keeps an event owed to the ATNA audit trail (`atna_events`).
    pub fn record_event(&self, event: &audit::protocol::Event) -> Result<(), SyncError> {
        audit::pending::record(&self.conn, event).map_err(sql("record an audit event"))
    }

    /// Once `stop` is set, a cycle carries out no further outbox operation: the one under way
    /// finishes (or is cut short with the process) and the cycle ends with
    /// [`SyncError::Stopped`]. Safe at any point: every operation is in the outbox before it
    /// is carried out, idempotent, and marked done (with its release record) only after it
    /// succeeded, so whatever a stop interrupts is carried out again by the next cycle.
    pub fn stop_on(&mut self, stop: Arc<AtomicBool>) {
        self.stop = Some(stop);
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// The state for status and metrics.
    pub fn state(&self) -> Result<State, SyncError> {
        let now = now_secs();
        let (depth, oldest): (i64, Option<i64>) = self
            .conn
            .query_row("SELECT count(*), min(created_at) FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(sql("read the outbox"))?;
        let published: i64 = self
            .conn
            .query_row("SELECT count(*) FROM published", [], |r| r.get(0))
            .map_err(sql("count published"))?;
        let last_success: Option<i64> = self
            .conn
            .query_row("SELECT last_success FROM meta", [], |r| r.get(0))
            .map_err(sql("read meta"))?;
        let releases: i64 = self
            .conn
            .query_row("SELECT count(*) FROM releases", [], |r| r.get(0))
            .map_err(sql("count release records"))?;
        Ok(State {
            releases_waiting: u64::try_from(releases).unwrap_or(0),
            published_files: u64::try_from(published).unwrap_or(0),
            outbox_depth: u64::try_from(depth).unwrap_or(0),
            oldest_pending_age: oldest.map(|t| (now - t).max(0)),
            last_success,
        })
    }

    /// Runs one cycle (blocking).
    /// The storage's conformance report (SS-MIX2 の点検) after a cycle that reported
    /// `cycle`, at `at`.
    pub fn conformance(
        &self,
        cycle: &CycleReport,
        at: i64,
    ) -> Result<ssmix2::conformance::Conformance, SyncError> {
        Ok(ssmix2::conformance::Conformance::of(
            &self.index,
            &cycle.scanned,
            at,
        )?)
    }

    pub fn cycle(
        &mut self,
        gate: &mut dyn Gate,
        replica: &mut dyn Replica,
    ) -> Result<CycleReport, SyncError> {
        if self.settings.share && !crate::share::mounted(&self.settings.storage) {
            return Err(SyncError::ShareNotMounted(
                self.settings.storage.display().to_string(),
            ));
        }
        let mut report = CycleReport::default();
        self.blocked.clear();
        let (cycles, tr_file, tr_offset): (i64, String, i64) = self
            .conn
            .query_row("SELECT cycles, tr_file, tr_offset FROM meta", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(sql("read meta"))?;
        // The transaction storage, if any, says which folders changed and which keys were
        // deleted (a DEL record confirms a deletion at once, E-03).
        let mut feed_cursor = None;
        let mut deleted_keys = HashSet::new();
        let mut folders = None;
        if let Some(tr_root) = &self.settings.transaction_storage {
            let cursor = ssmix2::transaction::Cursor {
                file: tr_file,
                offset: u64::try_from(tr_offset).unwrap_or(0),
            };
            match ssmix2::transaction::read_since(tr_root, &cursor) {
                Ok(batch) => {
                    let mut changed = std::collections::BTreeSet::new();
                    for h in &batch.headers {
                        let k = &h.key;
                        let (l1, l2) = ssmix2::name::hash_folders(&k.patient_id);
                        changed.insert(format!(
                            "{l1}/{l2}/{}/{}/{}",
                            k.patient_id, k.care_date, k.data_type
                        ));
                        if h.operation == ssmix2::transaction::Operation::Delete {
                            deleted_keys.insert(key_of(
                                &k.patient_id,
                                &k.care_date,
                                &k.data_type,
                                &k.order_no,
                            ));
                        }
                    }
                    if !batch.errors.is_empty() {
                        tracing::warn!(
                            errors = batch.errors.len(),
                            "malformed #SSMIX headers in the transaction storage (skipped)"
                        );
                    }
                    if cycles % FULL_RESCAN_EVERY != 0 {
                        folders = Some(changed.into_iter().collect::<Vec<_>>());
                    }
                    feed_cursor = Some(batch.cursor);
                }
                Err(e) => {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "cannot read the transaction storage; rescanning the whole storage"
                    );
                }
            }
        }
        let changes = match &folders {
            Some(f) => {
                self.index
                    .update_folders(&self.settings.storage, &Options::standard(), f, &mut |_| {})?
                    .1
            }
            None => {
                self.index
                    .update(&self.settings.storage, &Options::standard(), &mut |_| {})?
                    .1
            }
        };
        report.scanned = self.index.summary()?;
        report.files_read = changes.read;
        self.drain(gate, replica, &mut report)?;
        let seq: i64 = self
            .conn
            .query_row("SELECT consent_seq FROM meta", [], |r| r.get(0))
            .map_err(sql("read meta"))?;
        let feed = gate.changes(seq)?;
        report.fresh = feed.fresh;
        self.fresh = feed.fresh;
        self.revocations(gate, &feed.patients, feed.seq, feed.fresh)?;
        self.drain(gate, replica, &mut report)?;
        if feed.fresh {
            self.publications(gate, replica, &mut report)?;
        } else {
            report.held = self.count_unpublished()?;
        }
        self.vanished(gate, replica, &deleted_keys, &mut report)?;
        self.forget_discarded()?;
        self.conn
            .execute(
                "UPDATE meta SET last_success = ?1, cycles = cycles + 1",
                [now_secs()],
            )
            .map_err(sql("save meta"))?;
        if let Some(c) = feed_cursor {
            self.conn
                .execute(
                    "UPDATE meta SET tr_file = ?1, tr_offset = ?2",
                    params![c.file, i64::try_from(c.offset).unwrap_or(i64::MAX)],
                )
                .map_err(sql("save the feed position"))?;
        }
        Ok(report)
    }

    fn count_unpublished(&self) -> Result<u64, SyncError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM idx.files f WHERE f.status IN ('current','superseded','deleted') AND f.sha256 IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM published p WHERE p.path = f.path AND p.sha256 = f.sha256)",
                [],
                |r| r.get(0),
            )
            .map_err(sql("count unpublished"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// A cached decision, if it is younger than `recheck`.
    fn cached(
        &self,
        patient: &str,
        category: &str,
        now: i64,
    ) -> Result<Option<Decision>, SyncError> {
        let recheck = i64::try_from(self.settings.recheck.as_secs()).unwrap_or(i64::MAX);
        let row: Option<(String, Option<String>, i64)> = self
            .conn
            .query_row(
                "SELECT verdict, reason, decided_at FROM decisions WHERE patient_id = ?1 AND category = ?2",
                params![patient, category],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql("read decisions"))?;
        // A row that does not read back as a decision is no cached decision: ask again.
        Ok(row
            .filter(|(_, _, at)| now - at < recheck && now >= *at)
            .and_then(|(v, reason, _)| match (v.as_str(), reason) {
                ("permit", _) => Some(Decision::Permit),
                ("deny", Some(r)) => r.parse::<DenyReason>().ok().map(Decision::Deny),
                _ => None,
            }))
    }

    fn remember(
        conn: &Connection,
        patient: &str,
        category: &str,
        v: &Decision,
        now: i64,
    ) -> Result<(), SyncError> {
        let (verdict, reason) = match v {
            Decision::Permit => ("permit", None),
            Decision::Deny(r) => ("deny", Some(r.as_str())),
        };
        conn.execute(
            "INSERT INTO decisions VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (patient_id, category) DO UPDATE SET verdict = excluded.verdict, reason = excluded.reason, decided_at = excluded.decided_at",
            params![patient, category, verdict, reason, now],
        )
        .map_err(sql("save a decision"))?;
        Ok(())
    }

    /// Step 3: ask again about changed patients and old permissions; plan removals.
    fn revocations(
        &mut self,
        gate: &mut dyn Gate,
        changed: &[String],
        seq: i64,
        fresh: bool,
    ) -> Result<(), SyncError> {
        let now = now_secs();
        let changed: HashSet<&str> = changed.iter().map(String::as_str).collect();
        let pairs: Vec<(String, String)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT DISTINCT patient_id, category FROM published WHERE tombstone = 0 ORDER BY patient_id, category")
                .map_err(sql("read published"))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql("read published"))?
                .collect::<Result<_, _>>()
                .map_err(sql("read published"))?
        };
        let tx = self.conn.unchecked_transaction().map_err(sql("begin"))?;
        // Forget what we knew about changed patients: their next file asks again.
        for p in &changed {
            tx.execute("DELETE FROM decisions WHERE patient_id = ?1", [p])
                .map_err(sql("forget decisions"))?;
        }
        for (patient, category) in pairs {
            // Revocation never needs a fresh cache: a withdrawal recorded at the desk while
            // the network is unreachable is a definite answer (the consent service answers
            // it before staleness), and removes the files at the hub once it is reachable.
            // While stale, only the patients whose consent changed here are asked: nobody
            // else can have a new "no" the box knows of, and every answer is an audit row.
            let due = changed.contains(patient.as_str())
                || (fresh && self.cached(&patient, &category, now)?.is_none());
            if !due {
                continue;
            }
            // A category this version cannot read back is treated as denied: removed.
            let (verdict, audit) = match category.parse::<Category>() {
                Ok(c) => {
                    let d = gate.decide(&patient, c)?;
                    (d.decision, Some(d.audit))
                }
                Err(_) => (Decision::Deny(DenyReason::CategoryExcluded), None),
            };
            // A transient answer (stale cache) is not remembered: it says nothing of consent.
            if !verdict.is_transient() {
                Self::remember(&tx, &patient, &category, &verdict, now)?;
            }
            if matches!(verdict, Decision::Deny(_)) && !verdict.is_transient() {
                self.plan_removal(&tx, &patient, &category, now, audit)?;
            }
        }
        // A stale cache: keep the feed position so nothing it listed is missed.
        if fresh {
            tx.execute("UPDATE meta SET consent_seq = ?1", [seq])
                .map_err(sql("save the feed position"))?;
        }
        tx.commit().map_err(sql("commit revocations"))
    }

    fn plan_removal(
        &self,
        tx: &Connection,
        patient: &str,
        category: &str,
        now: i64,
        denial: Option<i64>,
    ) -> Result<(), SyncError> {
        // Each removal keeps the denial that planned it, for its release record.
        let decided_by = || {
            tx.execute(
                "UPDATE outbox SET decision = ?1 WHERE seq = ?2",
                params![denial, tx.last_insert_rowid()],
            )
            .map(|_| ())
            .map_err(sql("plan an operation"))
        };
        let rows: Vec<(String, String)> = {
            let mut stmt = tx
                .prepare("SELECT path, key FROM published WHERE patient_id = ?1 AND category = ?2 AND tombstone = 0 ORDER BY key, path")
                .map_err(sql("read published"))?;
            stmt.query_map(params![patient, category], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql("read published"))?
                .collect::<Result<_, _>>()
                .map_err(sql("read published"))?
        };
        let mut last_key: Option<String> = None;
        for (path, key) in &rows {
            enqueue(tx, "delete", path, None, None, patient, category, key, now)?;
            decided_by()?;
            if self.settings.withdrawal == WithdrawalPolicy::Tombstone
                && last_key.as_deref() != Some(key)
            {
                if let Some(name) = tombstone_path(path) {
                    enqueue(
                        tx,
                        "tombstone",
                        &name,
                        None,
                        None,
                        patient,
                        category,
                        key,
                        now,
                    )?;
                    decided_by()?;
                }
                last_key = Some(key.clone());
            }
        }
        Ok(())
    }

    /// Step 4: publish what is permitted and not yet published.
    fn publications(
        &mut self,
        gate: &mut dyn Gate,
        replica: &mut dyn Replica,
        report: &mut CycleReport,
    ) -> Result<(), SyncError> {
        let settle_ns = i128::try_from(self.settings.settle.as_nanos()).unwrap_or(i128::MAX);
        let mut cursor = String::new();
        loop {
            let now = now_secs();
            let now_ns = now_nanos();
            type Row = (String, String, String, String, String, String, i64);
            let batch: Vec<Row> = {
                let mut stmt = self
                    .conn
                    .prepare(
                        "SELECT f.path, f.sha256, f.patient_id, f.care_date, f.data_type, f.order_no, f.mtime_ns FROM idx.files f
                         WHERE f.status IN ('current','superseded','deleted') AND f.sha256 IS NOT NULL AND f.patient_id IS NOT NULL
                           AND f.path > ?1
                           AND NOT EXISTS (SELECT 1 FROM published p WHERE p.path = f.path AND p.sha256 = f.sha256)
                           AND NOT EXISTS (SELECT 1 FROM discarded d WHERE d.path = f.path AND d.sha256 = f.sha256)
                           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE COALESCE(o.dest, o.path) = f.path AND o.sha256 = f.sha256)
                         ORDER BY f.path LIMIT ?2",
                    )
                    .map_err(sql("read candidates"))?;
                stmt.query_map(params![cursor, BATCH], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })
                .map_err(sql("read candidates"))?
                .collect::<Result<_, _>>()
                .map_err(sql("read candidates"))?
            };
            let Some(last) = batch.last() else { break };
            cursor = last.0.clone();
            let tx = self.conn.unchecked_transaction().map_err(sql("begin"))?;
            // Prepared once per batch, used for every candidate.
            let mut renames = tx
                .prepare(
                    "SELECT p.path FROM published p WHERE p.key = ?1 AND p.sha256 = ?2 AND p.path != ?3 AND p.tombstone = 0
                       AND NOT EXISTS (SELECT 1 FROM idx.files f WHERE f.path = p.path)
                       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.path = p.path)
                     LIMIT 1",
                )
                .map_err(sql("find renames"))?;
            let mut tombstone_rows = tx
                .prepare("SELECT path FROM published WHERE key = ?1 AND tombstone = 1")
                .map_err(sql("read tombstones"))?;
            for (path, sha, patient, date, data_type, order, mtime_ns) in batch {
                let Some(category) = Category::for_ssmix2(&data_type) else {
                    report.held += 1;
                    continue;
                };
                if now_ns.saturating_sub(i128::from(mtime_ns)) < settle_ns {
                    // Written moments ago (EMRs write in place): the next cycle, soon.
                    report.held += 1;
                    report.unsettled += 1;
                    continue;
                }
                if RelPath::new(&path).is_err() {
                    report.held += 1;
                    continue;
                }
                let verdict = match self.cached(&patient, category.as_str(), now)? {
                    Some(v) => v,
                    None => {
                        let v = gate.decide(&patient, category)?.decision;
                        Self::remember(&tx, &patient, category.as_str(), &v, now)?;
                        v
                    }
                };
                let category = category.as_str();
                if verdict != Decision::Permit {
                    report.held += 1;
                    continue;
                }
                let key = key_of(&patient, &date, &data_type, &order);
                // The same content already published under another name of the key, now
                // gone from the storage: the EMR renamed it (an update or a delete).
                let renamed_from: Option<String> = renames
                    .query_row(params![key, sha, path], |r| r.get(0))
                    .optional()
                    .map_err(sql("find renames"))?;
                match renamed_from {
                    Some(from) => enqueue(
                        &tx,
                        "rename",
                        &from,
                        Some(&path),
                        Some(&sha),
                        &patient,
                        category,
                        &key,
                        now,
                    )?,
                    None => enqueue(
                        &tx,
                        "put",
                        &path,
                        None,
                        Some(&sha),
                        &patient,
                        category,
                        &key,
                        now,
                    )?,
                }
                // A tombstone we wrote for this key earlier (the patient consented again).
                let tombstones: Vec<String> = tombstone_rows
                    .query_map([&key], |r| r.get(0))
                    .map_err(sql("read tombstones"))?
                    .collect::<Result<_, _>>()
                    .map_err(sql("read tombstones"))?;
                for t in tombstones {
                    enqueue(&tx, "delete", &t, None, None, &patient, category, &key, now)?;
                }
            }
            drop((renames, tombstone_rows));
            tx.commit().map_err(sql("commit a batch"))?;
            self.drain(gate, replica, report)?;
        }
        Ok(())
    }

    /// Step 5: files gone from the storage (not renamed): remove after confirmation.
    fn vanished(
        &mut self,
        gate: &mut dyn Gate,
        replica: &mut dyn Replica,
        deleted_keys: &HashSet<String>,
        report: &mut CycleReport,
    ) -> Result<(), SyncError> {
        let now = now_secs();
        let confirm = i64::try_from(self.settings.confirm_deletion.as_secs()).unwrap_or(i64::MAX);
        let tx = self.conn.unchecked_transaction().map_err(sql("begin"))?;
        tx.execute(
            "UPDATE published SET vanished_at = NULL WHERE vanished_at IS NOT NULL AND EXISTS (SELECT 1 FROM idx.files f WHERE f.path = published.path)",
            [],
        )
        .map_err(sql("clear vanished"))?;
        let gone: Vec<(String, Option<i64>, String, String, String)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT p.path, p.vanished_at, p.patient_id, p.category, p.key FROM published p
                     WHERE p.tombstone = 0 AND NOT EXISTS (SELECT 1 FROM idx.files f WHERE f.path = p.path)
                       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.path = p.path AND o.op = 'delete')
                     ORDER BY p.path",
                )
                .map_err(sql("read vanished"))?;
            stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(sql("read vanished"))?
            .collect::<Result<_, _>>()
            .map_err(sql("read vanished"))?
        };
        for (path, since, patient, category, key) in gone {
            match since {
                None if deleted_keys.contains(&key) => {
                    enqueue(
                        &tx, "delete", &path, None, None, &patient, &category, &key, now,
                    )?;
                }
                None => {
                    tx.execute(
                        "UPDATE published SET vanished_at = ?1 WHERE path = ?2",
                        params![now, path],
                    )
                    .map_err(sql("mark vanished"))?;
                }
                Some(t) if now - t >= confirm || deleted_keys.contains(&key) => enqueue(
                    &tx, "delete", &path, None, None, &patient, &category, &key, now,
                )?,
                Some(_) => {}
            }
        }
        tx.commit().map_err(sql("commit vanished"))?;
        self.drain(gate, replica, report)
    }

    /// Carries out the outbox in order, but for what the hub refused in this cycle
    /// ([`Syncer::blocked`]); stops at the first other failure (retried next cycle).
    ///
    /// What sends a patient's data (a put, or a rename that shows published content under a
    /// new name) is decided again immediately before it is carried out, with the category
    /// of that exact file: a plan made earlier, or a cached permit, is not a decision. A
    /// denied one is dropped from the outbox (publications plans it again once permitted;
    /// revocations remove what is already published), unless it had been started: an
    /// operation cut short after the hub may have got the file (a lost response, a crash or
    /// power cut before the local commit) is undone at the hub instead, with a release
    /// record for what may have left and one for its removal, so that nothing stays at the
    /// hub unrecorded. Deletions and tombstones release nothing and are never held back.
    fn drain(
        &mut self,
        gate: &mut dyn Gate,
        replica: &mut dyn Replica,
        report: &mut CycleReport,
    ) -> Result<(), SyncError> {
        let mut after = 0i64;
        loop {
            if self.stopping() {
                return Err(SyncError::Stopped);
            }
            // Between two operations: the console's requests (a discard drops or undoes the
            // operation of that version, below).
            self.serve_desk();
            let op: Option<Op> = self
                .conn
                .query_row("SELECT seq, op, path, dest, sha256, patient_id, category, key, decision, started FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT 1", [after], |r| {
                    Ok(Op {
                        seq: r.get(0)?,
                        op: r.get(1)?,
                        path: r.get(2)?,
                        dest: r.get(3)?,
                        sha256: r.get(4)?,
                        patient_id: r.get(5)?,
                        category: r.get(6)?,
                        key: r.get(7)?,
                        decision: r.get(8)?,
                        started: r.get(9)?,
                    })
                })
                .optional()
                .map_err(sql("read the outbox"))?;
            let Some(op) = op else {
                self.flush_releases(gate);
                return Ok(());
            };
            after = op.seq;
            let names = [Some(&op.key), Some(&op.path), op.dest.as_ref()];
            if names.iter().flatten().any(|n| self.blocked.contains(*n)) {
                self.blocked.extend(names.into_iter().flatten().cloned());
                continue;
            }
            let releases = matches!(op.op.as_str(), "put" | "rename");
            // The version the staff discarded is never sent: what was planned for it is
            // dropped, and what had started is undone at the hub (and recorded).
            let written = if op.op == "rename" {
                op.dest.as_deref().unwrap_or_default()
            } else {
                &op.path
            };
            let discarded = releases && self.discarded(written, op.sha256.as_deref())?;
            // The decision and its audit row, which the release record refers to.
            let (decision, audit) = if discarded {
                (Decision::Permit, None)
            } else if releases {
                // A category this version cannot read back is never released.
                match op.category.parse::<Category>() {
                    Ok(c) => {
                        let d = gate.decide(&op.patient_id, c)?;
                        (d.decision, Some(d.audit))
                    }
                    Err(_) => (Decision::Deny(DenyReason::CategoryExcluded), None),
                }
            } else {
                (Decision::Permit, None)
            };
            let effect = if discarded {
                report.held += 1;
                if op.started.is_some() {
                    self.undo(&op, replica)
                } else {
                    Ok(Effect::Dropped { forget: None })
                }
            } else if decision.is_permit() {
                if releases && op.started.is_none() {
                    // Durable before anything reaches the hub (see migration 4).
                    self.conn
                        .execute(
                            "UPDATE outbox SET started = ?1 WHERE seq = ?2",
                            params![audit, op.seq],
                        )
                        .map_err(sql("mark an operation started"))?;
                }
                match self.execute(&op, replica) {
                    // Started earlier, and its source is gone or changed since: what an
                    // earlier attempt may have put at the hub goes again.
                    Ok(Effect::Dropped { .. }) if op.started.is_some() && op.op == "put" => {
                        self.undo(&op, replica)
                    }
                    other => other,
                }
            } else if op.started.is_some() {
                // Started under an earlier permit, and denied now: whatever may have reached
                // the hub is removed, and recorded; never simply dropped.
                self.conn
                    .execute(
                        "DELETE FROM decisions WHERE patient_id = ?1",
                        [&op.patient_id],
                    )
                    .map_err(sql("forget decisions"))?;
                report.held += 1;
                self.undo(&op, replica)
            } else {
                // Forget the cached answer too: the next plan asks again.
                self.conn
                    .execute(
                        "DELETE FROM decisions WHERE patient_id = ?1",
                        [&op.patient_id],
                    )
                    .map_err(sql("forget decisions"))?;
                report.held += 1;
                Ok(Effect::Dropped { forget: None })
            };
            let effect = match effect {
                Ok(e) => e,
                Err(e) => {
                    let message = tsunagi_runtime::child::error_chain(&e);
                    self.conn
                        .execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?1 WHERE seq = ?2", params![message, op.seq])
                        .map_err(sql("save the failure"))?;
                    if !refused_by_the_hub(&e) {
                        // The hub is not reachable or not answering: the others would fail
                        // alike; the cycle fails and is retried with backoff.
                        return Err(e);
                    }
                    report.refused += 1;
                    report.last_refusal = Some(message);
                    self.blocked
                        .extend([Some(op.key), Some(op.path), op.dest].into_iter().flatten());
                    continue;
                }
            };
            let now = now_secs();
            let tx = self.conn.unchecked_transaction().map_err(sql("begin"))?;
            tx.execute("DELETE FROM outbox WHERE seq = ?1", [op.seq])
                .map_err(sql("done"))?;
            // What reached (or left) the hub, for the audit trail: queued in the same
            // transaction, so the operation is done only with its release record.
            let data_type = op.key.split('/').nth(2).unwrap_or_default();
            let release = |kind: &str, sha256: &str, decision: Option<i64>| {
                tx.execute(
                    "INSERT INTO releases (patient_id, category, kind, sha256, data_type, decision) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![op.patient_id, op.category, kind, sha256, data_type, decision],
                )
                .map(|_| ())
                .map_err(sql("queue a release record"))
            };
            match &effect {
                Effect::Published {
                    sha256, tombstone, ..
                } => {
                    if *tombstone {
                        release("deleted", sha256, op.decision)?;
                    } else {
                        release("sent", sha256, audit)?;
                    }
                }
                Effect::Renamed { .. } => {
                    release("sent", op.sha256.as_deref().unwrap_or_default(), audit)?;
                }
                Effect::Removed(path) => {
                    if let Some(sha256) = published_sha256(&tx, path)? {
                        release("deleted", &sha256, op.decision)?;
                    }
                }
                Effect::Undone {
                    reached,
                    sha256,
                    forget,
                } => {
                    // What may have left under the permit it was started with, then its
                    // removal under the decision that undid it (none when the source
                    // changed or went away).
                    let removal = if decision.is_permit() { None } else { audit };
                    if *reached {
                        release("sent", sha256, op.started)?;
                        release("deleted", sha256, removal)?;
                    }
                    for (_, old) in forget.iter().filter(|(_, old)| !*reached || old != sha256) {
                        release("deleted", old, removal)?;
                    }
                }
                Effect::Dropped { .. } => {}
            }
            match effect {
                Effect::Published {
                    path,
                    sha256,
                    tombstone,
                } => {
                    tx.execute(
                        "INSERT INTO published (path, sha256, patient_id, category, key, tombstone, vanished_at, published_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7)
                         ON CONFLICT (path) DO UPDATE SET sha256 = excluded.sha256, tombstone = excluded.tombstone, vanished_at = NULL,
                           published_at = excluded.published_at",
                        params![path, sha256, op.patient_id, op.category, op.key, tombstone, now],
                    )
                    .map_err(sql("record a put"))?;
                    if !tombstone {
                        report.published += 1;
                    }
                }
                Effect::Renamed { from, to } => {
                    tx.execute("DELETE FROM published WHERE path = ?1", [&to])
                        .map_err(sql("record a rename"))?;
                    tx.execute("UPDATE published SET path = ?1, vanished_at = NULL, published_at = ?2 WHERE path = ?3", params![to, now, from])
                        .map_err(sql("record a rename"))?;
                    report.renamed += 1;
                }
                Effect::Removed(path) => {
                    tx.execute("DELETE FROM published WHERE path = ?1", [&path])
                        .map_err(sql("record a delete"))?;
                    report.removed += 1;
                }
                Effect::Undone { forget, .. } => {
                    for (path, _) in forget {
                        tx.execute("DELETE FROM published WHERE path = ?1", [&path])
                            .map_err(sql("forget"))?;
                    }
                }
                Effect::Dropped { forget } => {
                    if let Some(path) = forget {
                        tx.execute("DELETE FROM published WHERE path = ?1", [&path])
                            .map_err(sql("forget"))?;
                    }
                }
            }
            tx.commit().map_err(sql("commit an operation"))?;
        }
    }

    /// Sends the queued release records to the consent service's audit trail (grouped by
    /// patient, category, kind and decision), removing each group once recorded. A failure
    /// keeps them queued for the next drain, and holds nothing back: the operations are done,
    /// the records are durable here, and status shows how many wait.
    fn flush_releases(&mut self, gate: &mut dyn Gate) {
        if let Err(e) = self.try_flush_releases(gate) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot record releases in the audit trail yet; they stay queued"
            );
        }
    }

    fn try_flush_releases(&mut self, gate: &mut dyn Gate) -> Result<(), SyncError> {
        type Row = (i64, String, String, String, String, String, Option<i64>);
        let rows: Vec<Row> = {
            let mut stmt = self
                .conn
                .prepare("SELECT seq, patient_id, category, kind, sha256, data_type, decision FROM releases ORDER BY seq LIMIT ?1")
                .map_err(sql("read release records"))?;
            stmt.query_map([RELEASES_PER_FLUSH], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .map_err(sql("read release records"))?
            .collect::<Result<_, _>>()
            .map_err(sql("read release records"))?
        };
        // Consecutive rows of one group go in one request.
        let mut i = 0;
        while i < rows.len() {
            let (_, patient, category, kind, _, _, decision) = &rows[i];
            let group: Vec<&Row> = rows[i..]
                .iter()
                .take_while(|r| (&r.1, &r.2, &r.3, &r.6) == (patient, category, kind, decision))
                .collect();
            i += group.len();
            let seqs: Vec<i64> = group.iter().map(|r| r.0).collect();
            let Ok(category) = category.parse::<Category>() else {
                // Never planned (unknown categories are not published): nothing to record.
                self.forget_releases(&seqs)?;
                continue;
            };
            let release = Release {
                patient: patient.clone(),
                category,
                kind: if kind == "sent" {
                    ReleaseKind::Sent
                } else {
                    ReleaseKind::Deleted
                },
                objects: group
                    .iter()
                    .map(|r| Object::Ssmix2File {
                        sha256: r.4.clone(),
                        data_type: r.5.clone(),
                    })
                    .collect(),
                decision: *decision,
            };
            match gate.released(&release) {
                Ok(()) => self.forget_releases(&seqs)?,
                // This request was refused: it stays queued and counted, and does not hold
                // back the others.
                Err(e @ GateError::Refused(_)) => tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "the consent service refused a release record; it stays queued"
                ),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn forget_releases(&self, seqs: &[i64]) -> Result<(), SyncError> {
        let tx = self.conn.unchecked_transaction().map_err(sql("begin"))?;
        for seq in seqs {
            tx.execute("DELETE FROM releases WHERE seq = ?1", [seq])
                .map_err(sql("forget a release record"))?;
        }
        tx.commit().map_err(sql("commit release records"))
    }

    /// Undoes a started put or rename at the hub: deletes its final name and its
    /// temporary (a put), or both names (a rename, whose content was published under the
    /// old one), noting whether either was there and which published rows they were.
    fn undo(&self, op: &Op, replica: &mut dyn Replica) -> Result<Effect, SyncError> {
        let mut names = vec![op.path.clone()];
        names.extend(op.dest.clone());
        let mut reached = false;
        let mut forget = Vec::new();
        for name in &names {
            let path = outbox_path(name)?;
            // A rename's old name is the published content itself, not what it sent.
            let written = op.op == "put" || Some(name) == op.dest.as_ref();
            if written && replica.stat(&path)?.is_some() {
                reached = true;
            }
            replica.delete(&path)?;
            if op.op == "put" {
                replica.delete(&path.part_name())?;
            }
            if let Some(sha256) = published_sha256(&self.conn, name)? {
                forget.push((name.clone(), sha256));
            }
        }
        Ok(Effect::Undone {
            reached,
            sha256: op.sha256.clone().unwrap_or_default(),
            forget,
        })
    }

    fn execute(&self, op: &Op, replica: &mut dyn Replica) -> Result<Effect, SyncError> {
        let path = outbox_path(&op.path)?;
        match op.op.as_str() {
            "put" => {
                let mut abs = self.settings.storage.clone();
                abs.extend(path.components());
                let bytes = match std::fs::read(&abs) {
                    Ok(b) => b,
                    Err(_) => return Ok(Effect::Dropped { forget: None }),
                };
                let sha = ssmix2::scan::hex(&Sha256::digest(&bytes));
                if Some(sha.as_str()) != op.sha256.as_deref() {
                    // Changed since the plan: never publish unverified content.
                    replica.delete(&path.part_name())?;
                    return Ok(Effect::Dropped { forget: None });
                }
                replica.put(&path, &bytes)?;
                Ok(Effect::Published {
                    path: op.path.clone(),
                    sha256: sha,
                    tombstone: false,
                })
            }
            "tombstone" => {
                let bytes = tombstone_bytes(&path, &self.settings.facility);
                replica.put(&path, &bytes)?;
                Ok(Effect::Published {
                    path: op.path.clone(),
                    sha256: ssmix2::scan::hex(&Sha256::digest(&bytes)),
                    tombstone: true,
                })
            }
            "rename" => {
                let dest = op.dest.as_deref().unwrap_or_default();
                let to = outbox_path(dest)?;
                if replica.rename(&path, &to)? || replica.stat(&to)?.is_some() {
                    Ok(Effect::Renamed {
                        from: op.path.clone(),
                        to: dest.to_owned(),
                    })
                } else {
                    // Neither name exists at the replica: forget it; the next cycle puts it.
                    Ok(Effect::Dropped {
                        forget: Some(op.path.clone()),
                    })
                }
            }
            _ => {
                replica.delete(&path)?;
                Ok(Effect::Removed(op.path.clone()))
            }
        }
    }
}

/// Whether `e` is the hub refusing this one operation: its server answered with a status
/// about that file (forbidden there, a conflict, too large, a name too long, a type it does
/// not take, locked). Anything else (unreachable, a timeout, a server error, a refused
/// client certificate, which nginx answers with 400, too many requests) concerns every
/// operation.
fn refused_by_the_hub(e: &SyncError) -> bool {
    matches!(
        e,
        SyncError::Replica(ReplicaError::Status { status, .. })
            if matches!(status, 403 | 409 | 412 | 413 | 414 | 415 | 422 | 423 | 424)
    )
}

/// The SHA-256 the `published` table records for `path` at the hub, if it has a row.
fn published_sha256(conn: &Connection, path: &str) -> Result<Option<String>, SyncError> {
    conn.query_row(
        "SELECT sha256 FROM published WHERE path = ?1",
        [path],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql("read published"))
}

/// A path from the outbox as a replica path (the planner only stores valid ones; a row
/// that is not is an error of that operation, not a panic).
fn outbox_path(path: &str) -> Result<RelPath, ReplicaError> {
    RelPath::new(path).map_err(|e| ReplicaError::Io {
        path: e.0.clone(),
        source: std::io::Error::other("invalid path"),
    })
}

/// What a replica holds once it has converged, when the patients for whom `permits` is
/// true consent to every category: relative path → SHA-256 of every non-quarantined file of
/// theirs whose data type maps to a category. For checking a replica (tests, audits).
pub fn expected_replica(
    storage: &Path,
    permits: impl Fn(&str) -> bool,
) -> Result<std::collections::BTreeMap<String, String>, ssmix2::scan::ScanError> {
    let (entries, _) = ssmix2::scan::scan_all(storage, &Options::standard())?;
    Ok(entries
        .into_iter()
        .filter(|e| e.status != ssmix2::resolve::Status::Quarantined)
        .filter(|e| e.patient_id.as_deref().is_some_and(&permits))
        .filter(|e| {
            e.data_type
                .as_deref()
                .and_then(Category::for_ssmix2)
                .is_some()
        })
        .filter_map(|e| Some((e.path, e.sha256?)))
        .collect())
}

#[expect(clippy::too_many_arguments, reason = "one outbox row's columns")]
fn enqueue(
    tx: &Connection,
    op: &str,
    path: &str,
    dest: Option<&str>,
    sha256: Option<&str>,
    patient: &str,
    category: &str,
    key: &str,
    now: i64,
) -> Result<(), SyncError> {
    tx.execute(
        "INSERT INTO outbox (op, path, dest, sha256, patient_id, category, key, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![op, path, dest, sha256, patient, category, key, now],
    )
    .map_err(sql("plan an operation"))?;
    Ok(())
}

/// The tombstone's name for a published file: its name with the time of now and flag `0`.
fn tombstone_path(path: &str) -> Option<String> {
    let (dir, name) = path.rsplit_once('/')?;
    let parsed = ssmix2::name::parse_file_name(name).ok()?;
    let stamp = jst_stamp();
    let k = &parsed.key;
    let dept = parsed.department.unwrap_or_else(|| "-".into());
    Some(format!(
        "{dir}/{}_{}_{}_{}_{stamp}_{dept}_0",
        k.patient_id, k.care_date, k.data_type, k.order_no
    ))
}

/// Now in Japan local time as a 17-digit 発生日時.
fn jst_stamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(0);
    let rfc = consent::time::format(secs);
    let digits: String = rfc.chars().take(19).filter(char::is_ascii_digit).collect();
    format!("{digits}{:03}", d.subsec_millis())
}

/// A tombstone: a deletion message without clinical content (MSH, EVN, PID-3 only; the
/// data type's cancel event, or an order cancel).
fn tombstone_bytes(path: &RelPath, facility: &str) -> Vec<u8> {
    let parsed = ssmix2::name::parse_file_name(path.file_name()).ok();
    let (pid, data_type, order) = parsed.as_ref().map_or(("", "", ""), |n| {
        (
            n.key.patient_id.as_str(),
            n.key.data_type.as_str(),
            n.key.order_no.as_str(),
        )
    });
    let stamp = jst_stamp();
    let now14 = &stamp[..14];
    let table = ssmix2::datatype::lookup(data_type);
    let message_type = table
        .and_then(|t| t.cancels.first().copied())
        .or_else(|| table.map(|t| t.messages[0]))
        .unwrap_or("ADT^A08");
    let (code, event) = message_type.split_once('^').unwrap_or((message_type, ""));
    let mut text = format!(
        "MSH|^~\\&|TSUNAGI|{facility}|||{now14}||{code}^{event}^{code}_{event}|{stamp}|P|2.5||||||~ISO IR87||ISO 2022-1994\rEVN||{now14}\rPID|||{pid}^^^^PI\r"
    );
    if code != "ADT" {
        text.push_str(&format!("ORC|CA|{order}\r"));
    }
    ssmix2::encode::encode(&text).bytes
}
