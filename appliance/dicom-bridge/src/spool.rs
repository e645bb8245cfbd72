//! The spool: `DIR/segments/SLOT.seg` (small instances, received, acknowledged and waiting
//! to be forwarded: see [`segments`]), `DIR/objects/N.dcm` (instances larger than a segment
//! record, and those held or dead, moved out of the segments) and `DIR/queue.db` (the
//! queue). File names come from queue ids (taken when an instance starts) or segment slots,
//! never from UIDs.
//!
//! **Small instances** are received into memory (up to [`SEGMENT_RECORD_MAX`]; one that
//! grows past it continues in a file of its own) and appended to the current segment at
//! commit: one record (the data set and what its row holds), flushed together with the
//! records of the other associations committing at the same time; then the row. One
//! thread commits (`spool-commit`, [`committer`]): it takes whatever the associations have
//! ready, writes their records, flushes once, tells their tasks (success may be answered:
//! the record is the commit point), and writes their rows later, in one transaction with
//! those of the rounds that follow while instances keep coming (within milliseconds; the
//! forwarder sees an instance once its row is written; [`Spool::caught_up`] waits for the
//! rows of everything answered). A record whose row power took, or whose row failed, is
//! queued again from the segment when the spool opens, as an object's trailer is below;
//! records that left the queue are listed in `gone` until their segment is reused. A
//! segment is reused once its records have all left; readers never see that happen,
//! because a record's departure is applied only at the forwarder's next [`Spool::ready`],
//! when nothing of its earlier round is in flight.
//!
//! **Invariants.** An object file is the data set as received, then a trailer with what its
//! queue row holds (SOP class and instance, transfer syntax, calling AE, patient ID, the
//! BLAKE3 digest, size, when). [`Incoming::commit`] makes the whole file durable (data,
//! trailer, size, directory entry) and then commits the row, and returns only after both;
//! [`Incoming::commit_async`] (the SCP's) returns once the instance is durable, before its
//! row. Either way a success status sent after it survives `kill -9` and power loss. The
//! row is written without a flush of its own (`synchronous=NORMAL` on the ingest
//! connection): should power take it, [`Spool::open`] queues the object again from its
//! trailer (unless a newer copy of the instance is queued). An object without a row and without a complete, matching
//! trailer was never acknowledged (abort, error, crash mid-transfer): `Incoming` removes
//! its file on drop, and [`Spool::open`] removes what a crash left. Every other change
//! (delivery with its release record, holds, dead letters, commitments) is written with
//! `synchronous=FULL` on the other connection, and its files are removed only after.
//!
//! **One flush per instance** on ext4 (the appliance's data partition): an instance is
//! written under its final name from the start (no rename), and ext4 writes a new file's
//! directory entry with the file's `fdatasync` (with a journal, the entry is in the same or
//! an earlier transaction, which the flush commits; without one, ext4 syncs the parent of a
//! new inode itself). On any other file system the folder is fsynced as well. The queue rows
//! of concurrent associations, and of instances that follow each other closely, share one
//! transaction.
//!
//! **Duplicates** (same SOP Instance UID while an earlier copy is still queued): identical
//! bytes are stored once; different bytes replace the earlier copy (the newest wins), and the
//! event is recorded in the `duplicates` table. Never silent.

mod segments;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _, params};
use segments::{Location, Segments};
use tsunagi_state::{Durability, Migration, StateError};

/// Instances up to this size are appended to a segment; larger ones get a file of their own
/// (one flush per hundreds of MB is nothing, and memory stays bounded: an instance being
/// received holds at most this much).
pub const SEGMENT_RECORD_MAX: usize = 1 << 20;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
    sql: "CREATE TABLE queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            sop_class TEXT NOT NULL, sop_instance TEXT NOT NULL, transfer_syntax TEXT NOT NULL,
            calling_ae TEXT NOT NULL, patient_id TEXT,
            size INTEGER NOT NULL, sha256 TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'held', 'dead')),
            reason TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
            received_at INTEGER NOT NULL, next_attempt_at INTEGER NOT NULL
          ) STRICT;
          CREATE INDEX queue_instance ON queue (sop_instance);
          CREATE INDEX queue_ready ON queue (state, next_attempt_at, id);
          CREATE INDEX queue_patient ON queue (patient_id, state);
          CREATE TABLE duplicates (
            at INTEGER NOT NULL, sop_instance TEXT NOT NULL, kept INTEGER NOT NULL,
            replaced INTEGER, identical INTEGER NOT NULL
          ) STRICT;
          CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1), delivered INTEGER NOT NULL) STRICT;
          INSERT INTO counters VALUES (1, 0);",
    },
    // SHA-256 gave way to BLAKE3 (SHA-256 was half the CPU of ingesting a large instance).
    // A row of version 1 keeps its SHA-256 digest: a copy arriving again compares as
    // different bytes, so the newest wins (and is recorded): never a loss.
    Migration {
        version: 2,
        sql: "ALTER TABLE queue RENAME COLUMN sha256 TO digest;",
    },
    // The audit row of the permit an instance is sent under (set each round it is
    // permitted), and the release records of delivered instances waiting for the consent
    // service's audit trail: written in the transaction that removes the delivered row.
    Migration {
        version: 3,
        sql: "ALTER TABLE queue ADD COLUMN decision INTEGER;
          CREATE TABLE releases (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            patient_id TEXT NOT NULL, sop_class TEXT NOT NULL, sop_instance TEXT NOT NULL,
            decision INTEGER, delivered_at INTEGER NOT NULL
          ) STRICT;",
    },
    // Storage commitment: an instance the PACS stored, waiting for the PACS to commit it
    // (its queue row stays 'pending', with `next_attempt_at` when it is sent again if the
    // commitment has not come). `transaction_uid` NULL: stored, but no commitment could be
    // asked for (it is sent again at that time).
    Migration {
        version: 4,
        sql: "CREATE TABLE commitments (
            queue_id INTEGER PRIMARY KEY, transaction_uid TEXT, sop_instance TEXT NOT NULL,
            stored_at INTEGER NOT NULL
          ) STRICT;
          CREATE INDEX commitments_transaction ON commitments (transaction_uid, sop_instance);",
    },
    // A queued copy replaced by a newer one (same SOP Instance UID, other content) while it
    // was being sent: what its release record needs (the old copy's patient, class, UID and
    // permit), so that a copy that left is audited even though its row is gone. Emptied at
    // the next round and at opening (nothing is in flight then).
    Migration {
        version: 5,
        sql: "CREATE TABLE superseded (
            queue_id INTEGER PRIMARY KEY, patient_id TEXT, sop_class TEXT NOT NULL,
            sop_instance TEXT NOT NULL, decision INTEGER
          ) STRICT;",
    },
    // Spool segments: where a row's data set is (`segment` NULL: in `objects/ID.dcm`), and
    // the records of a segment's generation that left the queue (so that the scan when the
    // spool opens never takes them for rows lost with power).
    Migration {
        version: 6,
        sql: "ALTER TABLE queue ADD COLUMN segment INTEGER;
          ALTER TABLE queue ADD COLUMN generation INTEGER;
          ALTER TABLE queue ADD COLUMN offset INTEGER;
          CREATE TABLE gone (
            segment INTEGER NOT NULL, generation INTEGER NOT NULL, offset INTEGER NOT NULL,
            PRIMARY KEY (segment, generation, offset)
          ) STRICT, WITHOUT ROWID;",
    },
    // The ATNA audit trail (issue 17): an instance's study, and the transfers (received:
    // written with its queue row; sent: with its release record) waiting to be handed to
    // the `audit` service. `peer_address` of a receipt: the association's peer ('' when
    // the row was rebuilt from a trailer); of a send: '' (the network PACS).
    Migration {
        version: 7,
        sql: "ALTER TABLE queue ADD COLUMN study_uid TEXT;
          ALTER TABLE superseded ADD COLUMN study_uid TEXT;
          CREATE TABLE transfers (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            sent INTEGER NOT NULL CHECK (sent IN (0, 1)),
            peer_ae TEXT NOT NULL, peer_address TEXT NOT NULL,
            patient_id TEXT, study_uid TEXT, sop_class TEXT NOT NULL, sop_instance TEXT NOT NULL,
            at INTEGER NOT NULL
          ) STRICT;",
    },
    // Other audit events (a viewer's query through the box), waiting to be handed to the
    // `audit` service: `audit::pending::TABLE`.
    Migration {
        version: 8,
        sql: audit::pending::TABLE,
    },
];

/// The release record of queue row `?1` at `?2`: from its row, or, if a newer copy replaced
/// it while it was being sent, from what [`MIGRATIONS`]' `superseded` kept of it.
const RELEASE: &str =
    "INSERT INTO releases (patient_id, sop_class, sop_instance, decision, delivered_at)
     SELECT patient_id, sop_class, sop_instance, decision, ?2 FROM queue
     WHERE id = ?1 AND patient_id IS NOT NULL
     UNION ALL
     SELECT patient_id, sop_class, sop_instance, decision, ?2 FROM superseded
     WHERE queue_id = ?1 AND patient_id IS NOT NULL";

/// The sent transfer of queue row `?1` at `?2`, for the ATNA audit trail: from its row or
/// from `superseded`, like [`RELEASE`].
const TRANSFER_SENT: &str = "INSERT INTO transfers
       (sent, peer_ae, peer_address, patient_id, study_uid, sop_class, sop_instance, at)
     SELECT 1, '', '', patient_id, study_uid, sop_class, sop_instance, ?2 FROM queue
     WHERE id = ?1
     UNION ALL
     SELECT 1, '', '', patient_id, study_uid, sop_class, sop_instance, ?2 FROM superseded
     WHERE queue_id = ?1";

/// Before a row leaves the queue: its segment record, if it has one, is listed as gone.
const GONE: &str = "INSERT OR IGNORE INTO gone SELECT segment, generation, offset FROM queue
     WHERE id = ?1 AND segment IS NOT NULL";

/// What a storage commitment report did to the spool ([`Spool::commitment_report`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitmentApplied {
    /// Committed: they left the spool.
    pub committed: u64,
    /// Not committed: sent again after a backoff.
    pub failed: u64,
    /// Named in the report but not waiting under its transaction (already committed, sent
    /// again under a newer transaction since, or never asked for): nothing changed.
    pub unknown: u64,
}

/// An instance received or sent, not yet handed to the `audit` service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTransfer {
    pub id: i64,
    pub sent: bool,
    /// A receipt's calling AE ('' for a send: the network PACS).
    pub peer_ae: String,
    /// A receipt's peer address ('' if unknown, or for a send).
    pub peer_address: String,
    pub patient_id: Option<String>,
    pub study_uid: Option<String>,
    pub sop_class: String,
    pub sop_instance: String,
    pub at: i64,
}

/// A delivered instance whose release is not yet in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRelease {
    pub id: i64,
    pub patient_id: String,
    pub sop_class: String,
    pub sop_instance: String,
    /// The audit row of the permit it was sent under.
    pub decision: Option<i64>,
}

/// Spool errors.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The quota is reached or the disk is full: answer A700 and keep serving.
    #[error("the spool is out of space (quota or disk full)")]
    OutOfResources,
    #[error("spool I/O failed")]
    Io(#[source] io::Error),
    #[error("cannot open the spool's queue")]
    Open(#[source] StateError),
    #[error("spool queue operation `{op}` failed")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// The committing thread's round this instance was part of failed (the reason is the
    /// round's), or that thread is gone.
    #[error("the queue commit failed: {0}")]
    GroupCommit(String),
}

/// A queue row of a durable instance, for [`commit_batch`].
struct Row<'a> {
    id: i64,
    meta: &'a Meta,
    digest: &'a str,
    size: i64,
    now: i64,
    /// Its segment record, if it is in one.
    location: Option<Location>,
    /// Where it came from (the association's peer), for the audit trail.
    peer: &'a str,
}

/// What committing one row came to.
#[derive(Debug, Clone, Copy)]
enum Landed {
    Queued,
    Identical(i64),
    /// The earlier copy's row, its segment slot if it was in one, and its size.
    Replaced(i64, Option<i64>, i64),
}

/// A transfer record for the audit trail: `sent` (1: sent to a clinic's viewer, 0: received
/// from a modality), the peer's AE title and address, patient, study, SOP class and
/// instance, when.
const TRANSFER: &str = "INSERT INTO transfers
   (sent, peer_ae, peer_address, patient_id, study_uid, sop_class, sop_instance, at)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Commits a batch of rows in one transaction: what each came to, in order.
fn commit_batch(conn: &mut Connection, batch: &[Row<'_>]) -> Result<Vec<Landed>, SpoolError> {
    let tx = write(conn).map_err(sql("begin"))?;
    let mut landed = Vec::with_capacity(batch.len());
    {
        let mut find = tx
            .prepare_cached(
                "SELECT id, digest FROM queue WHERE sop_instance = ?1 ORDER BY id DESC LIMIT 1",
            )
            .map_err(sql("find duplicates"))?;
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO queue (id, sop_class, sop_instance, transfer_syntax, calling_ae, patient_id, size, digest, state, received_at, next_attempt_at, segment, generation, offset, study_uid)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, 0, ?10, ?11, ?12, ?13)",
            )
            .map_err(sql("queue"))?;
        let mut received = tx
            .prepare_cached(TRANSFER)
            .map_err(sql("queue a transfer record"))?;
        let mut duplicate = tx
            .prepare_cached("INSERT INTO duplicates VALUES (?1, ?2, ?3, ?4, ?5)")
            .map_err(sql("record a duplicate"))?;
        let mut gone_record = tx
            .prepare_cached("INSERT OR IGNORE INTO gone VALUES (?1, ?2, ?3)")
            .map_err(sql("record a duplicate"))?;
        for p in batch {
            let m = p.meta;
            // Every copy received is a receipt in the audit trail, stored once or not.
            received
                .execute(params![
                    false,
                    m.calling_ae,
                    p.peer,
                    m.patient_id,
                    m.study_uid,
                    m.sop_class,
                    m.sop_instance,
                    p.now
                ])
                .map_err(sql("queue a transfer record"))?;
            let earlier: Option<(i64, String)> = find
                .query_row([&m.sop_instance], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(sql("find duplicates"))?;
            match earlier {
                Some((old, d)) if d == p.digest => {
                    duplicate
                        .execute(params![p.now, m.sop_instance, old, None::<i64>, 1])
                        .map_err(sql("record a duplicate"))?;
                    if let Some(l) = p.location {
                        gone_record
                            .execute(params![
                                l.slot,
                                l.generation,
                                i64::try_from(l.offset).unwrap_or(i64::MAX)
                            ])
                            .map_err(sql("record a duplicate"))?;
                    }
                    landed.push(Landed::Identical(old));
                }
                earlier => {
                    insert
                        .execute(params![
                            p.id,
                            m.sop_class,
                            m.sop_instance,
                            m.transfer_syntax,
                            m.calling_ae,
                            m.patient_id,
                            p.size,
                            p.digest,
                            p.now,
                            p.location.map(|l| l.slot),
                            p.location.map(|l| l.generation),
                            p.location
                                .map(|l| i64::try_from(l.offset).unwrap_or(i64::MAX)),
                            m.study_uid
                        ])
                        .map_err(sql("queue"))?;
                    if let Some((old, _)) = earlier {
                        // Handed to the forwarder (a permit recorded): it may be leaving
                        // now, and its release must still be audited.
                        tx.execute(
                            "INSERT OR REPLACE INTO superseded
                               (queue_id, patient_id, sop_class, sop_instance, decision, study_uid)
                             SELECT id, patient_id, sop_class, sop_instance, decision, study_uid
                             FROM queue WHERE id = ?1 AND decision IS NOT NULL",
                            [old],
                        )
                        .map_err(sql("replace"))?;
                        let (old_slot, old_size): (Option<i64>, i64) = tx
                            .query_row(
                                "SELECT segment, size FROM queue WHERE id = ?1",
                                [old],
                                |r| Ok((r.get(0)?, r.get(1)?)),
                            )
                            .map_err(sql("replace"))?;
                        tx.execute(GONE, [old]).map_err(sql("replace"))?;
                        tx.execute("DELETE FROM queue WHERE id = ?1", [old])
                            .map_err(sql("replace"))?;
                        tx.execute("DELETE FROM commitments WHERE queue_id = ?1", [old])
                            .map_err(sql("replace"))?;
                        duplicate
                            .execute(params![p.now, m.sop_instance, p.id, old, 0])
                            .map_err(sql("record a duplicate"))?;
                        landed.push(Landed::Replaced(old, old_slot, old_size));
                    } else {
                        landed.push(Landed::Queued);
                    }
                }
            }
        }
    }
    tx.commit().map_err(sql("commit"))?;
    Ok(landed)
}

/// An instance handed to the committing thread ([`committer`]): durable already if it is in
/// a file of its own, its record still to be written if it is small.
struct Job {
    incoming: Incoming,
    meta: Meta,
    digest: String,
    now: i64,
    reply: Reply,
}

/// What the committing thread is handed.
enum Work {
    Instance(Box<Job>),
    /// A caller of [`Spool::caught_up`], told once the rows before it are written.
    CatchUp(mpsc::SyncSender<()>),
}

/// Where a [`Job`]'s outcome goes.
enum Reply {
    /// A caller blocked in [`Incoming::commit`]: the outcome, once the row is written.
    Outcome(mpsc::SyncSender<Result<Committed, SpoolError>>),
    /// A task awaiting [`Incoming::commit_async`]: told as soon as the instance is durable
    /// (its record flushed), before its row is written: the record is the commit point.
    Durable(tokio::sync::oneshot::Sender<Result<(), SpoolError>>),
    /// Told already that it is durable: a small instance's task at the flush, or a file of
    /// its own's caller by [`Incoming::submit`]'s return (flushed before).
    Told,
}

impl Job {
    /// The instance is durable: a task waiting for that is told now (once), and from then
    /// on its record or file is kept whatever happens (see [`Incoming::acknowledged`]).
    fn durable(&mut self) {
        if matches!(self.reply, Reply::Durable(_))
            && let Reply::Durable(tx) = std::mem::replace(&mut self.reply, Reply::Told)
        {
            // Marked before the answer can leave.
            self.incoming.acknowledged = true;
            let _ = tx.send(Ok(()));
        }
    }
}

impl Reply {
    /// The outcome. A caller that went away (its association aborted) needs no answer, and
    /// one told durable already needs no more.
    fn send(self, outcome: Result<Committed, SpoolError>) {
        match self {
            Reply::Outcome(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Durable(tx) => {
                let _ = tx.send(outcome.map(|_| ()));
            }
            Reply::Told => {}
        }
    }
}

/// Instances one round of the committing thread takes at most. Each association has at
/// most one waiting, so a round is rarely near it.
const ROUND_MAX: usize = 256;

/// Durable instances whose rows the committing thread writes together at the most. While
/// instances keep coming, their rows wait, so that one transaction serves many rounds: for
/// this many, for a pause of [`ROWS_PAUSE`] without a new one, or for [`ROWS_DELAY`] since
/// the first of them was durable, whichever comes first.
const ROWS_MAX: usize = 64;

/// A pause in the flow of instances, after which the committing thread writes the rows.
const ROWS_PAUSE: Duration = Duration::from_millis(2);

/// The longest a durable instance's row waits for others (the forwarder sees an instance
/// once its row is written).
const ROWS_DELAY: Duration = Duration::from_millis(10);

/// The committing thread (`spool-commit`), the only writer of new queue rows. It takes
/// every instance that is ready (those that arrived while it committed the round before),
/// writes the small ones' records to the current segment in order, makes them durable with
/// one flush, and tells the associations' tasks (they answer success: the record is the
/// commit point): one wake-up each way per round. Their rows wait for the rounds that
/// follow, and are written in one transaction: at [`ROWS_MAX`] instances, a pause of
/// [`ROWS_PAUSE`], [`ROWS_DELAY`] after the first, for a caller that needs its outcome
/// ([`Incoming::commit`]) or for [`Spool::caught_up`]. (A transaction per round cost a
/// quarter of the service's CPU at four associations: each wrote the same table and index
/// pages again.) It ends when the spool is dropped (the sender goes with it).
///
/// Should it panic, every instance it holds or is handed later and has not been told
/// durable fails (never answered success); one told already keeps its record or file
/// ([`Incoming::acknowledged`]). Should rows fail after their tasks were told, the thread
/// goes on but says so. Either way `stopped` says why, for [`Spool::committer_stopped`]:
/// the service ends, and the spool's opening queues what has no row.
fn committer(
    jobs: mpsc::Receiver<Work>,
    mut ingest: Connection,
    segments: Arc<Segments>,
    stopped: tokio::sync::watch::Sender<Option<String>>,
) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Durable instances whose rows are still to be written, and the callers waiting
        // for those rows ([`Spool::caught_up`]).
        let mut durable: Vec<(Job, Option<Location>)> = Vec::new();
        let mut waiting = Vec::new();
        let mut since = Instant::now();
        loop {
            let first = if durable.is_empty() {
                jobs.recv().ok()
            } else {
                // Disconnected cannot happen while a job holds the spool.
                let due = ROWS_DELAY.saturating_sub(since.elapsed());
                jobs.recv_timeout(ROWS_PAUSE.min(due)).ok()
            };
            let mut round = Vec::new();
            let mut next = first;
            while let Some(work) = next {
                match work {
                    Work::Instance(job) => round.push(*job),
                    Work::CatchUp(tx) => waiting.push(tx),
                }
                next = if round.len() < ROUND_MAX {
                    jobs.try_recv().ok()
                } else {
                    None
                };
            }
            let paused = round.is_empty();
            if paused && durable.is_empty() && waiting.is_empty() {
                // The spool is gone, and nothing is left to queue.
                break;
            }
            if durable.is_empty() {
                since = Instant::now();
            }
            durable.extend(write_records(&segments, round));
            if paused
                || !waiting.is_empty()
                || durable.len() >= ROWS_MAX
                || since.elapsed() >= ROWS_DELAY
                || durable
                    .iter()
                    .any(|(job, _)| matches!(job.reply, Reply::Outcome(_)))
            {
                rows_or_stop(&mut ingest, std::mem::take(&mut durable), &stopped);
                for tx in waiting.drain(..) {
                    let _ = tx.send(());
                }
            }
        }
    }));
    if let Err(panic) = ran {
        let why = tsunagi_runtime::tasks::panicked(&*panic);
        tracing::error!(why, "the spool's committing thread stopped");
        stopped.send_replace(Some(why));
    }
}

/// The committing thread's [`commit_batch`] (in tests, made to fail by `tests::FAIL_IN_ROWS`).
fn commit_rows(ingest: &mut Connection, rows: &[Row<'_>]) -> Result<Vec<Landed>, SpoolError> {
    #[cfg(test)]
    if rows
        .iter()
        .any(|row| row.meta.sop_instance.starts_with(tests::FAIL_IN_ROWS))
    {
        return Err(SpoolError::GroupCommit("a test's instance".into()));
    }
    commit_batch(ingest, rows)
}

/// A shared failure, for each instance of a round.
fn shared(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::OutOfResources => SpoolError::OutOfResources,
        e => SpoolError::GroupCommit(tsunagi_runtime::child::error_chain(e)),
    }
}

/// [`write_rows`], and should they fail after success was answered, `stopped` says so.
fn rows_or_stop(
    ingest: &mut Connection,
    durable: Vec<(Job, Option<Location>)>,
    stopped: &tokio::sync::watch::Sender<Option<String>>,
) {
    if let Some(e) = write_rows(ingest, durable) {
        // Acknowledged, durable, but not queued: the service must end, and the spool's
        // opening queues them again from their records and trailers.
        let why = format!(
            "could not queue instances it had acknowledged (queued again when the spool \
             opens): {}",
            tsunagi_runtime::child::error_chain(&e)
        );
        tracing::error!(why, "the spool's committing thread failed");
        stopped.send_replace(Some(why));
    }
}

/// The records of one round of [`committer`]: the small instances' records written and
/// flushed together, and every task waiting for its instance to be durable told. Returns
/// the durable instances, for [`write_rows`]; one that failed has its answer (alone where it
/// can, its record not written; with the round where it cannot, the flush).
fn write_records(segments: &Arc<Segments>, round: Vec<Job>) -> Vec<(Job, Option<Location>)> {
    #[cfg(test)]
    if round
        .iter()
        .any(|job| job.meta.sop_instance == tests::PANIC_IN_COMMIT)
    {
        panic!("a test's instance");
    }
    // The small instances' records, written in offset order.
    let mut ticket = None;
    let mut written = Vec::with_capacity(round.len());
    for mut job in round {
        let Some(buffer) = job.incoming.buffer.take() else {
            // A file of its own, durable already.
            written.push((job, None));
            continue;
        };
        let body = trailer_body(&job.meta, &job.digest, job.incoming.written, job.now);
        match segments.write(job.incoming.id, &body, &buffer) {
            Ok((location, t)) => {
                ticket = Some(t);
                written.push((job, Some(location)));
            }
            // Dropped, the `Incoming` releases its bytes.
            Err(e) => job.reply.send(Err(e)),
        }
    }
    // One flush makes them all durable; until then none is the queue's.
    if let Some(t) = ticket
        && let Err(e) = segments.sync(t)
    {
        let mut durable = Vec::with_capacity(written.len());
        for (job, location) in written {
            match location {
                Some(l) => {
                    // The record is not the queue's (a scan may still find it).
                    segments.forget(l.slot);
                    job.reply.send(Err(shared(&e)));
                }
                None => durable.push((job, None)),
            }
        }
        written = durable;
    }
    // Durable: the tasks waiting for that are answered now, before the rows.
    for (job, _) in &mut written {
        job.durable();
    }
    written
}

/// The rows of durable instances, in one transaction, and each instance's outcome. Returns
/// an error that came after a success was answered (an instance acknowledged as durable
/// whose row could not be written).
fn write_rows(
    ingest: &mut Connection,
    written: Vec<(Job, Option<Location>)>,
) -> Option<SpoolError> {
    let spool = written.first().map(|(job, _)| job.incoming.spool.clone())?;
    // Their rows, in one transaction.
    let landed = {
        let rows: Vec<Row<'_>> = written
            .iter()
            .map(|(job, location)| Row {
                id: job.incoming.id,
                meta: &job.meta,
                digest: &job.digest,
                size: i64::try_from(job.incoming.written).unwrap_or(i64::MAX),
                now: job.now,
                location: *location,
                peer: &job.incoming.peer,
            })
            .collect();
        commit_rows(ingest, &rows)
    };
    let outcomes: Vec<Result<Landed, SpoolError>> = match landed {
        Ok(landed) => landed.into_iter().map(Ok).collect(),
        Err(e) => written.iter().map(|_| Err(shared(&e))).collect(),
    };
    let mut arrived = false;
    let mut unqueued = None;
    for ((job, location), landed) in written.into_iter().zip(outcomes) {
        let told = job.incoming.acknowledged;
        let outcome = job.incoming.settle(landed, location);
        arrived |= matches!(
            outcome,
            Ok(Committed::Queued(_) | Committed::Replaced { .. })
        );
        match outcome {
            Err(e) if told => unqueued = Some(e),
            outcome => job.reply.send(outcome),
        }
    }
    if arrived {
        // One wake-up of the forwarder for the round.
        spool.inner.arrived.notify_one();
    }
    unqueued
}

/// A write transaction that takes the write lock when it begins (`BEGIN IMMEDIATE`): the
/// queue has two connections (ingest and the rest, and an operator's command may open a
/// third), and a transaction that read before it writes could otherwise fail at once with
/// SQLITE_BUSY (its snapshot is stale) instead of waiting its turn.
///
/// `BEGIN IMMEDIATE` and `COMMIT` come from the connection's statement cache: a group commit
/// and each delivery run them, and parsing them each time (as `rusqlite::Transaction` does)
/// was a tenth of the CPU the service spent per small instance. Dropped without
/// [`Immediate::commit`], the transaction rolls back.
fn write(conn: &Connection) -> rusqlite::Result<Immediate<'_>> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(Immediate {
        conn,
        committed: false,
    })
}

/// A transaction begun by [`write`].
struct Immediate<'c> {
    conn: &'c Connection,
    committed: bool,
}

impl Immediate<'_> {
    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.committed = true;
        Ok(())
    }
}

impl std::ops::Deref for Immediate<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Immediate<'_> {
    fn drop(&mut self) {
        // A failed statement or a failed COMMIT (busy) leaves the transaction open.
        if !self.committed && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// The committing thread is gone (it ends only with the spool).
fn committer_gone() -> SpoolError {
    SpoolError::GroupCommit("the committing thread has stopped".into())
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> SpoolError {
    move |source| SpoolError::Sql { op, source }
}

/// The free space that new instances leave on a file system of `size` bytes: an eighth of
/// it, at most 64 MiB. The consent database, its audit trail, the SS-MIX2 index and the
/// journal share the data partition with the spool; a disk filled with images must not
/// stop them (SQLite answers "database or disk is full", and a WAL index it cannot extend
/// is SIGBUS).
pub fn disk_reserve(size: u64) -> u64 {
    (size / 8).min(64 << 20)
}

/// Free space for unprivileged writers, and the size, of the file system holding `dir`.
#[allow(clippy::useless_conversion)] // u64 on some targets, not on all
fn free_space(dir: &Path) -> io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    let unit = u64::from(st.fragment_size());
    let (free, blocks) = (u64::from(st.blocks_available()), u64::from(st.blocks()));
    Ok((free.saturating_mul(unit), blocks.saturating_mul(unit)))
}

fn io_or_full(e: io::Error) -> SpoolError {
    // ENOSPC and EDQUOT: out of resources, not a failure of the spool.
    if matches!(e.raw_os_error(), Some(28) | Some(122)) {
        SpoolError::OutOfResources
    } else {
        SpoolError::Io(e)
    }
}

/// What the queue knows about an instance (from the C-STORE request and its data set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub sop_class: String,
    pub sop_instance: String,
    pub transfer_syntax: String,
    pub calling_ae: String,
    /// (0010,0020), for the consent gate; `None` if the data set has none.
    pub patient_id: Option<String>,
    /// (0020,000D), for the audit trail; `None` if the data set has none.
    pub study_uid: Option<String>,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Queued under this id.
    Queued(i64),
    /// Identical to a copy already queued under this id: stored once.
    Identical(i64),
    /// Queued under `id`, replacing the earlier, different copy `replaced`.
    Replaced { id: i64, replaced: i64 },
}

/// An instance waiting to be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: i64,
    /// Its object file, or its segment.
    pub path: PathBuf,
    /// Where its data set starts in `path` (0 in an object file).
    pub offset: u64,
    pub meta: Meta,
    pub size: u64,
    pub attempts: u32,
}

/// Counts for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub held: u64,
    pub dead: u64,
    pub bytes: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// Delivered instances whose release is not yet in the audit trail.
    pub releases_waiting: u64,
    /// Transfers not yet handed to the `audit` service.
    pub transfers_waiting: u64,
    /// Stored at the PACS, waiting for its storage commitment (not in `pending`).
    pub awaiting_commitment: u64,
}

struct Inner {
    dir: PathBuf,
    /// `objects/`, open for fsync.
    objects: File,
    /// Whether a new object's directory entry needs the folder's fsync (not on ext4).
    sync_folder: bool,
    /// The next queue id: objects are named when they start, before their row exists (see
    /// [`Incoming::commit`]).
    next_id: AtomicI64,
    /// Every change but ingest (`synchronous=FULL`).
    conn: Mutex<Connection>,
    /// To the committing thread ([`committer`]), which writes new queue rows on a
    /// connection of its own (`synchronous=NORMAL`: an instance is durable through its
    /// segment record or its file's trailer, from which [`Spool::open`] rebuilds a row lost
    /// with power).
    commits: mpsc::Sender<Work>,
    /// Why the committing thread stopped, should it (see [`committer`]).
    committer_stopped: tokio::sync::watch::Receiver<Option<String>>,
    quota: u64,
    /// Free space on the spool's file system that new instances leave to the others
    /// (see [`disk_reserve`]); below it an instance is refused as `OutOfResources`.
    disk_reserve: AtomicU64,
    /// Bytes of queued objects plus bytes being received.
    used: AtomicU64,
    /// Told when an instance is queued ([`Spool::arrived`]).
    arrived: tokio::sync::Notify,
    segments: Arc<Segments>,
    /// Segment slots of records that left the queue, applied at the next [`Spool::ready`]
    /// (a reader of the forwarder's round may still be reading them until then).
    departed: Mutex<Vec<i64>>,
}

/// The spool (cheap to clone: shared by every association).
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind it: a panic elsewhere cannot leave it half-changed.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Spool {
    /// Opens (creating) a spool in `dir` with a quota in bytes, and removes what a crash left.
    pub fn open(dir: &Path, quota: u64) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, quota, SEGMENT_RECORD_MAX)
    }

    /// [`Spool::open`] with instances up to `segment_record_max` bytes appended to segments
    /// (0: every instance in a file of its own).
    pub fn open_with(
        dir: &Path,
        quota: u64,
        segment_record_max: usize,
    ) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir.join("objects")).map_err(SpoolError::Io)?;
        let mut conn =
            tsunagi_state::open(&dir.join("queue.db"), Durability::Acknowledging, MIGRATIONS)
                .map_err(SpoolError::Open)?;
        let ingest = tsunagi_state::open(&dir.join("queue.db"), Durability::Normal, MIGRATIONS)
            .map_err(SpoolError::Open)?;
        // Nothing is in flight after a restart.
        conn.execute("DELETE FROM superseded", [])
            .map_err(sql("recover"))?;
        // Recovery: earlier versions received into incoming/; nothing there was acknowledged.
        let _ = fs::remove_dir_all(dir.join("incoming"));
        // Objects without a queue row: complete with a valid trailer, they may have been
        // acknowledged (their row, written without a flush, was lost with power): queued
        // again, unless a newer copy of the instance is queued. Else they were being
        // received, never acknowledged: removed.
        let mut recovered: Vec<(i64, Trailer, Option<Location>)> = Vec::new();
        for e in fs::read_dir(dir.join("objects")).map_err(SpoolError::Io)? {
            let path = e.map_err(SpoolError::Io)?.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<i64>().ok());
            // `Some(false)`: the row's data set is in a segment, and this is the copy of a
            // move out of it that did not commit.
            let known: Option<bool> = match id {
                Some(id) => conn
                    .query_row(
                        "SELECT segment IS NULL FROM queue WHERE id = ?1",
                        [id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql("recover"))?,
                None => None,
            };
            match (known, id) {
                (Some(true), _) => {}
                (Some(false), _) => {
                    let _ = fs::remove_file(&path);
                }
                (None, Some(id)) => match read_trailer(&path) {
                    Some(t) => recovered.push((id, t, None)),
                    None => {
                        let _ = fs::remove_file(&path);
                    }
                },
                (None, None) => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        // Segment records without a queue row and not gone: the same (see [`segments`]).
        let found = segments::existing(&dir.join("segments")).map_err(SpoolError::Io)?;
        let mut in_segments = segment_rows(&conn)?;
        for seg in &found {
            let Some(generation) = seg.generation else {
                continue;
            };
            // This segment generation's rows and `gone` entries, read once: the records
            // found are looked up here; only a record in neither (moved out, or lost) costs
            // a query of its own.
            let rows = in_segments
                .remove(&(seg.slot, generation))
                .unwrap_or_default();
            let gone = gone_offsets(&conn, seg.slot, generation)?;
            let mut lost = HashSet::new();
            let mut failed = None;
            let scanned = segments::scan(
                &seg.file,
                seg.slot,
                |id, l| {
                    let offset = i64::try_from(l.offset).unwrap_or(i64::MAX);
                    if rows.get(&id) == Some(&offset) || gone.contains(&offset) {
                        return false;
                    }
                    match conn
                        .query_row("SELECT 1 FROM queue WHERE id = ?1", [id], |_| Ok(()))
                        .optional()
                    {
                        Ok(Some(())) => false,
                        Ok(None) => {
                            lost.insert(id);
                            true
                        }
                        Err(e) => {
                            failed.get_or_insert(e);
                            false
                        }
                    }
                },
                |meta| parse_trailer_body(meta).map(|t| t.digest),
            );
            if let Some(e) = failed {
                return Err(sql("recover")(e));
            }
            let Some((_, records)) = scanned else {
                continue;
            };
            for r in records {
                if !lost.contains(&r.id) {
                    continue;
                }
                if let Some(t) = parse_trailer_body(&r.meta).filter(|t| t.size == r.size) {
                    debug_assert_eq!(r.location.generation, generation);
                    recovered.push((r.id, t, Some(r.location)));
                }
            }
        }
        recovered.sort_by_key(|(id, _, _)| *id);
        if !recovered.is_empty() {
            // Counts only: which instances is not logged.
            tracing::warn!(
                objects = recovered.len(),
                "complete instances without a queue row (rows lost with power, or a removal cut short): queued again from their trailers unless a newer copy is queued"
            );
        }
        for (id, t, location) in recovered {
            let newer: Option<i64> = conn
                .query_row(
                    "SELECT id FROM queue WHERE sop_instance = ?1 AND id > ?2 LIMIT 1",
                    params![t.meta.sop_instance, id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("recover"))?;
            if newer.is_some() {
                match location {
                    None => {
                        let _ = fs::remove_file(dir.join("objects").join(format!("{id}.dcm")));
                    }
                    Some(l) => {
                        conn.execute(
                            "INSERT OR IGNORE INTO gone VALUES (?1, ?2, ?3)",
                            params![
                                l.slot,
                                l.generation,
                                i64::try_from(l.offset).unwrap_or(i64::MAX)
                            ],
                        )
                        .map_err(sql("recover"))?;
                    }
                }
                continue;
            }
            let landed = commit_batch(
                &mut conn,
                &[Row {
                    id,
                    meta: &t.meta,
                    digest: &t.digest,
                    size: i64::try_from(t.size).unwrap_or(i64::MAX),
                    now: t.received_at,
                    location,
                    // Not in the trailer: the receipt's peer is unknown.
                    peer: "",
                }],
            )?
            .pop()
            .ok_or(SpoolError::GroupCommit("no outcome".into()))?;
            let copy = |id: i64| dir.join("objects").join(format!("{id}.dcm"));
            match landed {
                Landed::Identical(_) if location.is_none() => {
                    let _ = fs::remove_file(copy(id));
                }
                Landed::Replaced(old, None, _) => {
                    let _ = fs::remove_file(copy(old));
                }
                _ => {}
            }
        }
        // Which segments hold live records (the others are reused or removed), and the
        // `gone` rows of generations that ended.
        let mut live: HashMap<i64, (i64, u64)> = HashMap::new();
        {
            let mut stmt = conn
                .prepare(
                    "SELECT segment, generation, count(*) FROM queue WHERE segment IS NOT NULL
                     GROUP BY segment, generation",
                )
                .map_err(sql("recover"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(sql("recover"))?;
            for row in rows {
                let (slot, generation, n) = row.map_err(sql("recover"))?;
                live.insert(slot, (generation, u64::try_from(n).unwrap_or(0)));
            }
        }
        let ended: Vec<(i64, i64)> = {
            let mut stmt = conn
                .prepare("SELECT DISTINCT segment, generation FROM gone")
                .map_err(sql("recover"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .map_err(sql("recover"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(sql("recover"))?
                .into_iter()
                .filter(|(slot, g)| live.get(slot).is_none_or(|(lg, _)| lg != g))
                .collect()
        };
        let segments = Segments::open(&dir.join("segments"), segment_record_max, found, live)
            .map_err(SpoolError::Io)?;
        let segments = Arc::new(segments);
        for (slot, generation) in ended {
            conn.execute(
                "DELETE FROM gone WHERE segment = ?1 AND generation = ?2",
                [slot, generation],
            )
            .map_err(sql("recover"))?;
        }
        let used: i64 = conn
            .query_row("SELECT COALESCE(sum(size), 0) FROM queue", [], |r| r.get(0))
            .map_err(sql("recover"))?;
        let last: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM queue", [], |r| r.get(0))
            .map_err(sql("recover"))?;
        let sequence: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'queue'",
                [],
                |r| r.get(0),
            )
            .map_err(sql("recover"))?;
        let objects = File::open(dir.join("objects")).map_err(SpoolError::Io)?;
        let (commits, jobs) = mpsc::channel();
        let (stopped, committer_stopped) = tokio::sync::watch::channel(None);
        let committing = Arc::clone(&segments);
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer(jobs, ingest, committing, stopped))
            .map_err(SpoolError::Io)?;
        let ext4 = nix::sys::statfs::fstatfs(&objects)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC);
        Ok(Spool {
            inner: Arc::new(Inner {
                sync_folder: !ext4,
                next_id: AtomicI64::new(last.max(sequence) + 1),
                objects,
                dir: dir.to_owned(),
                conn: Mutex::new(conn),
                commits,
                committer_stopped,
                quota,
                disk_reserve: AtomicU64::new(
                    free_space(dir).map_or(0, |(_, size)| disk_reserve(size)),
                ),
                used: AtomicU64::new(u64::try_from(used).unwrap_or(0)),
                arrived: tokio::sync::Notify::new(),
                segments,
                departed: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Returns once every instance answered so far has its row: what is read from the
    /// queue after this includes them. (The committing thread writes rows a little after it
    /// answers, for many instances at a time; see [`committer`].) Blocks for as long as
    /// that takes, a few milliseconds.
    pub fn caught_up(&self) -> Result<(), SpoolError> {
        let (tx, done) = mpsc::sync_channel(1);
        self.inner
            .commits
            .send(Work::CatchUp(tx))
            .map_err(|_| committer_gone())?;
        done.recv().map_err(|_| committer_gone())
    }

    /// Resolves if the committing thread stops (it panicked), or could not queue instances
    /// it had acknowledged (their rows failed), with why: the service must end and be
    /// restarted, and the spool's opening queues what has no row. Never resolves while all
    /// is well. Cancel-safe.
    pub async fn committer_stopped(&self) -> SpoolError {
        let mut stopped = self.inner.committer_stopped.clone();
        loop {
            if let Some(why) = stopped.borrow_and_update().clone() {
                return SpoolError::GroupCommit(format!("the committing thread {why}"));
            }
            if stopped.changed().await.is_err() {
                // Gone without a reason: the spool itself is being dropped.
                return std::future::pending().await;
            }
        }
    }

    /// A segment record left the queue (its `gone` row committed): applied at the next
    /// [`Spool::ready`].
    fn depart(&self, slot: i64) {
        lock(&self.inner.departed).push(slot);
    }

    /// Applies the departures: a segment whose records have all left is reused, and its
    /// generation's `gone` rows go.
    fn apply_departures(&self) {
        let departed = std::mem::take(&mut *lock(&self.inner.departed));
        for slot in departed {
            if let Some((slot, generation)) = self.inner.segments.forget(slot) {
                // Best effort: rows of an ended generation never match a record again, and
                // the next opening removes them.
                let _ = self.conn().execute(
                    "DELETE FROM gone WHERE segment = ?1 AND generation = ?2",
                    [slot, generation],
                );
            }
        }
    }

    /// Moves an instance's data set out of its segment into `objects/ID.dcm` (with its
    /// trailer, flushed), so that an instance that waits for long (held, dead) keeps no
    /// segment in use. Nothing to do for one in a file already.
    fn move_out(&self, id: i64) -> Result<(), SpoolError> {
        use std::os::unix::fs::FileExt as _;
        let row = self
            .conn()
            .query_row(
                "SELECT segment, offset, sop_class, sop_instance, transfer_syntax, calling_ae,
                        patient_id, digest, size, received_at, study_uid
                 FROM queue WHERE id = ?1 AND segment IS NOT NULL",
                [id],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        Meta {
                            sop_class: r.get(2)?,
                            sop_instance: r.get(3)?,
                            transfer_syntax: r.get(4)?,
                            calling_ae: r.get(5)?,
                            patient_id: r.get(6)?,
                            study_uid: r.get(10)?,
                        },
                        r.get::<_, String>(7)?,
                        r.get::<_, i64>(8)?,
                        r.get::<_, i64>(9)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("move out of a segment"))?;
        let Some((slot, offset, meta, digest, size, received_at)) = row else {
            return Ok(());
        };
        let size = u64::try_from(size).unwrap_or(0);
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        File::open(self.inner.segments.path(slot))
            .and_then(|f| f.read_exact_at(&mut data, u64::try_from(offset).unwrap_or(0)))
            .map_err(SpoolError::Io)?;
        let path = self.object_path(id);
        // A copy left by a move that did not commit is overwritten.
        let mut file = File::create(&path).map_err(io_or_full)?;
        file.write_all(&data)
            .and_then(|()| file.write_all(&trailer(&meta, &digest, size, received_at)))
            .and_then(|()| file.sync_data())
            .map_err(io_or_full)?;
        if self.inner.sync_folder {
            self.inner.objects.sync_all().map_err(SpoolError::Io)?;
        }
        {
            let conn = self.conn();
            let tx = write(&conn).map_err(sql("move out of a segment"))?;
            tx.execute(GONE, [id])
                .map_err(sql("move out of a segment"))?;
            tx.execute(
                "UPDATE queue SET segment = NULL, generation = NULL, offset = NULL WHERE id = ?1",
                [id],
            )
            .map_err(sql("move out of a segment"))?;
            tx.commit().map_err(sql("move out of a segment"))?;
        }
        self.depart(slot);
        Ok(())
    }

    /// Makes the segment the first small instance goes into, and a spare, now: the service
    /// calls it before it takes associations, so that no association waits while a segment
    /// is made (16 MiB written). Without it, the first instance makes one.
    pub fn prepare(&self) -> Result<(), SpoolError> {
        self.inner.segments.prepare()
    }

    /// Resolves when an instance was queued since the last call returned (for the one
    /// forwarder that waits on it: a new instance is sent at once, not at the next round).
    pub async fn arrived(&self) {
        self.inner.arrived.notified().await;
    }

    fn object_path(&self, id: i64) -> PathBuf {
        self.inner.dir.join("objects").join(format!("{id}.dcm"))
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions).
        self.inner
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `OutOfResources` when the spool's file system has less free space than the reserve
    /// left to the box's other state (see [`disk_reserve`]).
    fn room_on_disk(&self) -> Result<(), SpoolError> {
        let reserve = self.inner.disk_reserve.load(Ordering::Relaxed);
        match free_space(&self.inner.dir) {
            Ok((free, _)) if free < reserve => Err(SpoolError::OutOfResources),
            Ok(_) => Ok(()),
            Err(e) => Err(SpoolError::Io(e)),
        }
    }

    /// Sets the free space new instances leave on the spool's file system (tests).
    #[cfg(test)]
    fn set_disk_reserve(&self, bytes: u64) {
        self.inner.disk_reserve.store(bytes, Ordering::Relaxed);
    }

    /// Starts receiving an instance, under its final name (see [`Incoming::commit`]).
    /// `OutOfResources` while the disk is down to its reserve.
    pub fn begin(&self) -> Result<Incoming, SpoolError> {
        self.room_on_disk()?;
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        if self.inner.segments.record_max > 0 {
            // Small until shown otherwise: received into memory, for a segment.
            return Ok(Incoming {
                spool: self.clone(),
                id,
                path: PathBuf::new(),
                file: None,
                buffer: Some(Vec::new()),
                written: 0,
                hash: Some(Digest::Inline(Box::default())),
                flushed: 0,
                peer: String::new(),
                acknowledged: false,
            });
        }
        let path = self.object_path(id);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_or_full)?;
        Ok(Incoming {
            spool: self.clone(),
            id,
            path,
            file: Some(file),
            buffer: None,
            written: 0,
            hash: Some(Digest::Inline(Box::default())),
            flushed: 0,
            peer: String::new(),
            acknowledged: false,
        })
    }

    /// Instances ready to forward at `now` (Unix seconds), oldest first.
    pub fn ready(&self, now: i64, limit: usize) -> Result<Vec<Queued>, SpoolError> {
        self.apply_departures();
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, sop_class, sop_instance, transfer_syntax, calling_ae, patient_id, size, attempts, segment, offset, study_uid FROM queue
                 WHERE state = 'pending' AND next_attempt_at <= ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(sql("read the queue"))?;
        let rows = stmt
            .query_map(
                params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        Meta {
                            sop_class: r.get(1)?,
                            sop_instance: r.get(2)?,
                            transfer_syntax: r.get(3)?,
                            calling_ae: r.get(4)?,
                            patient_id: r.get(5)?,
                            study_uid: r.get(10)?,
                        },
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, Option<i64>>(8)?,
                        r.get::<_, Option<i64>>(9)?,
                    ))
                },
            )
            .map_err(sql("read the queue"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, meta, size, attempts, slot, offset) = row.map_err(sql("read the queue"))?;
            let (path, offset) = match (slot, offset) {
                (Some(slot), Some(offset)) => (
                    self.inner.segments.path(slot),
                    u64::try_from(offset).unwrap_or(0),
                ),
                _ => (self.object_path(id), 0),
            };
            out.push(Queued {
                id,
                path,
                offset,
                meta,
                size: u64::try_from(size).unwrap_or(0),
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            });
        }
        Ok(out)
    }

    /// The network acknowledged it: the object leaves the spool, and its release record
    /// (what left, under which permit) is queued for the audit trail, in one transaction.
    pub fn delivered(&self, id: i64) -> Result<(), SpoolError> {
        let (size, slot) = {
            let conn = self.conn();
            let tx = write(&conn).map_err(sql("delivered"))?;
            let row: Option<(i64, Option<i64>)> = tx
                .query_row("SELECT size, segment FROM queue WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(sql("delivered"))?;
            tx.execute(RELEASE, params![id, crate::now()])
                .map_err(sql("queue a release record"))?;
            tx.execute(TRANSFER_SENT, params![id, crate::now()])
                .map_err(sql("queue a transfer record"))?;
            tx.execute(GONE, [id]).map_err(sql("delivered"))?;
            tx.execute("DELETE FROM queue WHERE id = ?1", [id])
                .map_err(sql("delivered"))?;
            tx.execute("DELETE FROM superseded WHERE queue_id = ?1", [id])
                .map_err(sql("delivered"))?;
            // Asked for a commitment before `storage-commitment` was turned off.
            tx.execute("DELETE FROM commitments WHERE queue_id = ?1", [id])
                .map_err(sql("delivered"))?;
            tx.execute("UPDATE counters SET delivered = delivered + 1", [])
                .map_err(sql("count"))?;
            tx.commit().map_err(sql("delivered"))?;
            (row.map(|r| r.0), row.and_then(|r| r.1))
        };
        match slot {
            Some(slot) => self.depart(slot),
            None => {
                let _ = fs::remove_file(self.object_path(id));
            }
        }
        self.release(size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0));
        Ok(())
    }

    /// The PACS stored these, and their commitment is asked for under `transaction` (`None`:
    /// it could not be asked for): each release (what left, under which permit) is queued
    /// for the audit trail, and each instance stays in the spool, sent again at `resend_at`
    /// unless the PACS commits it first ([`Spool::commitment_report`]). In one transaction.
    pub fn stored(
        &self,
        ids: &[i64],
        transaction: Option<&str>,
        now: i64,
        resend_at: i64,
    ) -> Result<(), SpoolError> {
        let conn = self.conn();
        let tx = write(&conn).map_err(sql("stored"))?;
        {
            let mut release = tx.prepare(RELEASE).map_err(sql("queue a release record"))?;
            let mut transfer = tx
                .prepare(TRANSFER_SENT)
                .map_err(sql("queue a transfer record"))?;
            let mut gone = tx
                .prepare("DELETE FROM superseded WHERE queue_id = ?1")
                .map_err(sql("stored"))?;
            let mut waiting = tx
                .prepare(
                    "INSERT OR REPLACE INTO commitments (queue_id, transaction_uid, sop_instance, stored_at)
                     SELECT id, ?2, sop_instance, ?3 FROM queue WHERE id = ?1",
                )
                .map_err(sql("stored"))?;
            let mut later = tx
                .prepare("UPDATE queue SET next_attempt_at = ?2, last_error = NULL WHERE id = ?1")
                .map_err(sql("stored"))?;
            for id in ids {
                release
                    .execute(params![id, now])
                    .map_err(sql("queue a release record"))?;
                transfer
                    .execute(params![id, now])
                    .map_err(sql("queue a transfer record"))?;
                gone.execute([id]).map_err(sql("stored"))?;
                waiting
                    .execute(params![id, transaction, now])
                    .map_err(sql("stored"))?;
                later
                    .execute(params![id, resend_at])
                    .map_err(sql("stored"))?;
            }
        }
        tx.commit().map_err(sql("stored"))
    }

    /// A storage commitment report from the PACS for `transaction`: each committed instance
    /// waiting under it leaves the spool (counted as delivered); each failed one is sent
    /// again after a backoff, with the PACS's reason. Instances the transaction does not
    /// name, or whose SOP class differs, are left as they are. In one transaction.
    pub fn commitment_report(
        &self,
        transaction: &str,
        committed: &[(String, String)],
        failed: &[(String, String, String)],
        now: i64,
    ) -> Result<CommitmentApplied, SpoolError> {
        let mut applied = CommitmentApplied::default();
        let mut gone: Vec<(i64, (i64, Option<i64>))> = Vec::new();
        {
            let conn = self.conn();
            let tx = write(&conn).map_err(sql("commitment"))?;
            {
                let mut find = tx
                    .prepare(
                        "SELECT q.id, q.size, q.sop_class, q.segment FROM commitments c JOIN queue q ON q.id = c.queue_id
                         WHERE c.transaction_uid = ?1 AND c.sop_instance = ?2 AND q.state = 'pending'",
                    )
                    .map_err(sql("commitment"))?;
                let mut waiting = |class: &str, instance: &str| {
                    find.query_row(params![transaction, instance], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            (r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(3)?),
                            r.get::<_, String>(2)?,
                        ))
                    })
                    .optional()
                    .map(|row| {
                        row.filter(|(_, _, c)| c == class)
                            .map(|(id, size, _)| (id, size))
                    })
                    .map_err(sql("commitment"))
                };
                let mut found = Vec::new();
                for (class, instance) in committed {
                    match waiting(class, instance)? {
                        Some(row) => found.push(row),
                        None => applied.unknown += 1,
                    }
                }
                let mut refused = Vec::new();
                for (class, instance, reason) in failed {
                    match waiting(class, instance)? {
                        Some((id, _)) => refused.push((id, reason)),
                        None => applied.unknown += 1,
                    }
                }
                for (id, size) in found {
                    tx.execute(GONE, [id]).map_err(sql("commitment"))?;
                    tx.execute("DELETE FROM queue WHERE id = ?1", [id])
                        .map_err(sql("commitment"))?;
                    tx.execute("DELETE FROM commitments WHERE queue_id = ?1", [id])
                        .map_err(sql("commitment"))?;
                    tx.execute("UPDATE counters SET delivered = delivered + 1", [])
                        .map_err(sql("count"))?;
                    gone.push((id, size));
                    applied.committed += 1;
                }
                for (id, reason) in refused {
                    tx.execute("DELETE FROM commitments WHERE queue_id = ?1", [id])
                        .map_err(sql("commitment"))?;
                    tx.execute(
                        "UPDATE queue SET attempts = attempts + 1, last_error = ?1,
                           next_attempt_at = ?2 + min(3600, 30 << min(attempts, 7)) WHERE id = ?3",
                        params![
                            format!("the network PACS did not commit it: {reason}"),
                            now,
                            id
                        ],
                    )
                    .map_err(sql("commitment"))?;
                    applied.failed += 1;
                }
            }
            tx.commit().map_err(sql("commitment"))?;
        }
        for (id, (size, slot)) in gone {
            match slot {
                Some(slot) => self.depart(slot),
                None => {
                    let _ = fs::remove_file(self.object_path(id));
                }
            }
            self.release(u64::try_from(size).unwrap_or(0));
        }
        Ok(applied)
    }

    /// Records the permits (their audit rows) that instances are about to be sent under:
    /// `(queue id, audit row)`, in one transaction.
    pub fn set_decisions(&self, decisions: &[(i64, i64)]) -> Result<(), SpoolError> {
        if decisions.is_empty() {
            return Ok(());
        }
        let conn = self.conn();
        let tx = write(&conn).map_err(sql("save decisions"))?;
        // A new round: what earlier rounds sent is recorded, nothing of theirs is in flight.
        tx.execute("DELETE FROM superseded", [])
            .map_err(sql("save decisions"))?;
        {
            let mut stmt = tx
                .prepare("UPDATE queue SET decision = ?2 WHERE id = ?1")
                .map_err(sql("save decisions"))?;
            for (id, audit) in decisions {
                stmt.execute(params![id, audit])
                    .map_err(sql("save decisions"))?;
            }
        }
        tx.commit().map_err(sql("save decisions"))
    }

    /// Transfers (received, sent) not yet handed to the `audit` service, oldest first.
    pub fn pending_transfers(&self, limit: usize) -> Result<Vec<PendingTransfer>, SpoolError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, sent, peer_ae, peer_address, patient_id, study_uid, sop_class, sop_instance, at
                 FROM transfers ORDER BY id LIMIT ?1",
            )
            .map_err(sql("read transfer records"))?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(PendingTransfer {
                    id: r.get(0)?,
                    sent: r.get::<_, i64>(1)? == 1,
                    peer_ae: r.get(2)?,
                    peer_address: r.get(3)?,
                    patient_id: r.get(4)?,
                    study_uid: r.get(5)?,
                    sop_class: r.get(6)?,
                    sop_instance: r.get(7)?,
                    at: r.get(8)?,
                })
            })
            .map_err(sql("read transfer records"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("read transfer records"))
    }

    /// Transfer records up to `last` (their ids) are in the audit queue now.
    pub fn transfers_recorded(&self, last: i64) -> Result<(), SpoolError> {
        let conn = self.conn();
        conn.prepare_cached("DELETE FROM transfers WHERE id <= ?1")
            .and_then(|mut stmt| stmt.execute([last]))
            .map_err(sql("forget transfer records"))?;
        Ok(())
    }

    /// Instances sent to one of the clinic's viewers (a retrieve through the box): transfer
    /// records for the audit trail, in one transaction.
    pub fn record_sent_to_clinic(
        &self,
        peer_ae: &str,
        peer_address: &str,
        sent: &[&Meta],
        at: i64,
    ) -> Result<(), SpoolError> {
        let conn = self.conn();
        let tx = write(&conn).map_err(sql("queue a transfer record"))?;
        {
            let mut insert = tx
                .prepare_cached(TRANSFER)
                .map_err(sql("queue a transfer record"))?;
            for m in sent {
                insert
                    .execute(params![
                        true,
                        peer_ae,
                        peer_address,
                        m.patient_id,
                        m.study_uid,
                        m.sop_class,
                        m.sop_instance,
                        at
                    ])
                    .map_err(sql("queue a transfer record"))?;
            }
        }
        tx.commit().map_err(sql("queue a transfer record"))
    }

    /// Keeps an audit event until the audit trail has it ([`audit::pending`]).
    pub fn record_event(&self, event: &audit::protocol::Event) -> Result<(), SpoolError> {
        audit::pending::record(&self.conn(), event).map_err(sql("queue an audit event"))
    }

    /// Audit events not yet handed over, oldest first.
    pub fn pending_events(
        &self,
        limit: usize,
    ) -> Result<Vec<(i64, audit::protocol::Event)>, SpoolError> {
        audit::pending::pending(&self.conn(), limit).map_err(sql("read audit events"))
    }

    /// The audit events up to `last` are in the audit trail.
    pub fn events_recorded(&self, last: i64) -> Result<(), SpoolError> {
        audit::pending::forget(&self.conn(), last).map_err(sql("forget audit events"))
    }

    /// Release records of delivered instances not yet in the audit trail, oldest first.
    pub fn pending_releases(&self, limit: usize) -> Result<Vec<PendingRelease>, SpoolError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, patient_id, sop_class, sop_instance, decision FROM releases ORDER BY id LIMIT ?1",
            )
            .map_err(sql("read release records"))?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(PendingRelease {
                    id: r.get(0)?,
                    patient_id: r.get(1)?,
                    sop_class: r.get(2)?,
                    sop_instance: r.get(3)?,
                    decision: r.get(4)?,
                })
            })
            .map_err(sql("read release records"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("read release records"))
    }

    /// These release records are in the audit trail now.
    pub fn releases_recorded(&self, ids: &[i64]) -> Result<(), SpoolError> {
        let conn = self.conn();
        let tx = write(&conn).map_err(sql("forget release records"))?;
        for id in ids {
            tx.execute("DELETE FROM releases WHERE id = ?1", [id])
                .map_err(sql("forget release records"))?;
        }
        tx.commit().map_err(sql("forget release records"))
    }

    /// Counts `bytes` kept outside the queue (a retrieve's working files) in the quota;
    /// `OutOfResources` when they do not fit. [`Spool::unreserve`] gives them back.
    pub fn reserve(&self, bytes: u64) -> Result<(), SpoolError> {
        let inner = &self.inner;
        inner
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                let next = u.checked_add(bytes)?;
                (next <= inner.quota).then_some(next)
            })
            .map(|_| ())
            .map_err(|_| SpoolError::OutOfResources)
    }

    /// Gives back bytes counted by [`Spool::reserve`].
    pub fn unreserve(&self, bytes: u64) {
        self.release(bytes);
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .inner
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// A transient failure: try again at `next_attempt_at`.
    pub fn retry_later(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: i64,
    ) -> Result<(), SpoolError> {
        self.conn()
            .execute(
                "UPDATE queue SET attempts = attempts + 1, last_error = ?1, next_attempt_at = ?2 WHERE id = ?3",
                params![error, next_attempt_at, id],
            )
            .map_err(sql("retry"))?;
        Ok(())
    }

    /// The PACS could not store it now (a transient status): try again after a backoff
    /// that doubles with each attempt, from 30 s up to an hour.
    pub fn retry_backoff(&self, id: i64, error: &str, now: i64) -> Result<(), SpoolError> {
        self.conn()
            .execute(
                "UPDATE queue SET attempts = attempts + 1, last_error = ?1,
                   next_attempt_at = ?2 + min(3600, 30 << min(attempts, 7)) WHERE id = ?3",
                params![error, now, id],
            )
            .map_err(sql("retry"))?;
        Ok(())
    }

    /// Held in the clinic (e.g. the consent denies it), with the reason; never sent while held.
    pub fn hold(&self, id: i64, reason: &str) -> Result<(), SpoolError> {
        self.move_out(id)?;
        self.conn()
            .execute(
                "UPDATE queue SET state = 'held', reason = ?1 WHERE id = ?2",
                params![reason, id],
            )
            .map_err(sql("hold"))?;
        Ok(())
    }

    /// The held instances and why each is held, by queue id.
    pub fn held_reasons(&self) -> Result<Vec<(i64, String)>, SpoolError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, COALESCE(reason, '') FROM queue WHERE state = 'held' ORDER BY id")
            .map_err(sql("read the held instances"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql("read the held instances"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("read the held instances"))
    }

    /// A patient's consent changed: their held instances are evaluated again.
    pub fn release_patient(&self, patient_id: &str) -> Result<u64, SpoolError> {
        let n = self
            .conn()
            .execute(
                "UPDATE queue SET state = 'pending', reason = NULL, next_attempt_at = 0 WHERE state = 'held' AND patient_id = ?1",
                [patient_id],
            )
            .map_err(sql("release"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The network refused it for good (e.g. A9xxH, C0xxH, SOP class not supported): it
    /// stays in the clinic, visible, with the reason, until an operator resubmits it.
    pub fn fail(&self, id: i64, reason: &str) -> Result<(), SpoolError> {
        self.move_out(id)?;
        self.conn()
            .execute(
                "UPDATE queue SET state = 'dead', reason = ?1 WHERE id = ?2",
                params![reason, id],
            )
            .map_err(sql("fail"))?;
        Ok(())
    }

    /// The instances waiting in the clinic, oldest first, at most `limit` (the console's
    /// 保留中): held (a consent, an identity or the instance itself in the way), dead
    /// letters (refused by the network PACS for good, or waiting too long), and pending ones
    /// that failed at least once (the PACS unreachable or busy, the network ID not there
    /// yet). Not those stored at the PACS that wait for its storage commitment.
    pub fn waiting(&self, limit: usize) -> Result<Vec<Waiting>, SpoolError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, state, patient_id, sop_class, sop_instance, size, received_at,
                        attempts, COALESCE(reason, last_error, ''), next_attempt_at
                 FROM queue
                 WHERE state IN ('held', 'dead')
                    OR (state = 'pending' AND last_error IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM commitments c WHERE c.queue_id = queue.id))
                 ORDER BY id LIMIT ?1",
            )
            .map_err(sql("list the waiting instances"))?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(Waiting {
                    id: r.get(0)?,
                    state: r.get(1)?,
                    patient_id: r.get(2)?,
                    sop_class: r.get(3)?,
                    sop_instance: r.get(4)?,
                    size: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    received_at: r.get(6)?,
                    attempts: u32::try_from(r.get::<_, i64>(7)?).unwrap_or(u32::MAX),
                    reason: r.get(8)?,
                    next_attempt_at: r.get(9)?,
                })
            })
            .map_err(sql("list the waiting instances"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("list the waiting instances"))
    }

    /// Which of `ids` [`Spool::requeue_waiting`] would put back (`discard == false`) or
    /// [`Spool::discard`] would remove (`true`): waiting instances ([`Spool::waiting`]);
    /// only held ones and dead letters may be discarded (a pending one may be on its way
    /// out at this moment). Nothing changes.
    pub fn pick_waiting(&self, ids: &[i64], discard: bool) -> Result<Vec<Requeued>, SpoolError> {
        let conn = self.conn();
        let mut pick = conn
            .prepare(
                "SELECT id, patient_id, sop_class, sop_instance FROM queue
                 WHERE id = ?1 AND (state IN ('held', 'dead')
                   OR (?2 = 0 AND state = 'pending' AND last_error IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM commitments c WHERE c.queue_id = queue.id)))",
            )
            .map_err(sql("read the waiting instances"))?;
        let mut out = Vec::new();
        for id in ids {
            let row = pick
                .query_row(params![id, i64::from(discard)], |r| {
                    Ok(Requeued {
                        id: r.get(0)?,
                        patient_id: r.get(1)?,
                        sop_class: r.get(2)?,
                        sop_instance: r.get(3)?,
                    })
                })
                .optional()
                .map_err(sql("read the waiting instances"))?;
            out.extend(row);
        }
        Ok(out)
    }

    /// Puts waiting instances (`ids`, see [`Spool::pick_waiting`]) back in the way out, now:
    /// held ones and dead letters pending again with their attempts reset (a dead letter's
    /// clock restarted at `now`), pending ones without their backoff. Each is decided again
    /// (consent, identity) before it is sent. Returns those put back.
    pub fn requeue_waiting(&self, ids: &[i64], now: i64) -> Result<Vec<Requeued>, SpoolError> {
        let picked = self.pick_waiting(ids, false)?;
        {
            let conn = self.conn();
            let tx = write(&conn).map_err(sql("requeue"))?;
            for r in &picked {
                tx.execute(
                    "UPDATE queue SET
                       received_at = CASE WHEN state = 'dead' THEN ?2 ELSE received_at END,
                       attempts = CASE WHEN state = 'pending' THEN attempts ELSE 0 END,
                       state = 'pending', reason = NULL, last_error = NULL, next_attempt_at = 0
                     WHERE id = ?1",
                    params![r.id, now],
                )
                .map_err(sql("requeue"))?;
            }
            tx.commit().map_err(sql("requeue"))?;
        }
        self.inner.arrived.notify_one();
        Ok(picked)
    }

    /// Removes held instances and dead letters (`ids`, see [`Spool::pick_waiting`]) from
    /// the spool, never sent: their rows, and their data. Returns those removed.
    pub fn discard(&self, ids: &[i64]) -> Result<Vec<Requeued>, SpoolError> {
        let picked = self.pick_waiting(ids, true)?;
        for r in &picked {
            let (size, slot) = {
                let conn = self.conn();
                let tx = write(&conn).map_err(sql("discard"))?;
                let row: Option<(i64, Option<i64>)> = tx
                    .query_row(
                        "SELECT size, segment FROM queue WHERE id = ?1 AND state IN ('held', 'dead')",
                        [r.id],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()
                    .map_err(sql("discard"))?;
                if row.is_none() {
                    continue;
                }
                tx.execute(GONE, [r.id]).map_err(sql("discard"))?;
                for table in [
                    "queue WHERE id",
                    "superseded WHERE queue_id",
                    "commitments WHERE queue_id",
                ] {
                    tx.execute(&format!("DELETE FROM {table} = ?1"), [r.id])
                        .map_err(sql("discard"))?;
                }
                tx.commit().map_err(sql("discard"))?;
                (row.map(|r| r.0), row.and_then(|r| r.1))
            };
            match slot {
                Some(slot) => self.depart(slot),
                None => {
                    let _ = fs::remove_file(self.object_path(r.id));
                }
            }
            self.release(size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0));
        }
        Ok(picked)
    }

    /// The queue's entries in `state` (see [`Admin::entries`]).
    pub fn entries(&self, state: &str, limit: usize) -> Result<Vec<Entry>, SpoolError> {
        entries(&self.conn(), state, limit)
    }

    /// Pending instances received before `before` become dead letters (with an alert).
    pub fn dead_letters(&self, before: i64) -> Result<u64, SpoolError> {
        let moving: Vec<i64> = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare(
                    "SELECT id FROM queue WHERE state = 'pending' AND received_at < ?1 AND segment IS NOT NULL",
                )
                .map_err(sql("dead letters"))?;
            let rows = stmt
                .query_map([before], |r| r.get(0))
                .map_err(sql("dead letters"))?;
            rows.collect::<Result<_, _>>()
                .map_err(sql("dead letters"))?
        };
        for id in moving {
            self.move_out(id)?;
        }
        let n = self
            .conn()
            .execute(
                "UPDATE queue SET state = 'dead' WHERE state = 'pending' AND received_at < ?1",
                [before],
            )
            .map_err(sql("dead letters"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub fn counts(&self) -> Result<Counts, SpoolError> {
        let conn = self.conn();
        let mut c = Counts::default();
        let mut stmt = conn
            .prepare("SELECT state, count(*), COALESCE(sum(size), 0) FROM queue GROUP BY state")
            .map_err(sql("count"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(sql("count"))?;
        for row in rows {
            let (state, n, bytes) = row.map_err(sql("count"))?;
            let n = u64::try_from(n).unwrap_or(0);
            match state.as_str() {
                "pending" => c.pending = n,
                "held" => c.held = n,
                _ => c.dead = n,
            }
            c.bytes += u64::try_from(bytes).unwrap_or(0);
        }
        c.delivered = conn
            .query_row("SELECT delivered FROM counters", [], |r| r.get::<_, i64>(0))
            .map_err(sql("count"))?
            .try_into()
            .unwrap_or(0);
        c.duplicates = conn
            .query_row("SELECT count(*) FROM duplicates", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(sql("count"))?
            .try_into()
            .unwrap_or(0);
        c.transfers_waiting = conn
            .query_row("SELECT count(*) FROM transfers", [], |r| r.get::<_, i64>(0))
            .map_err(sql("count"))?
            .try_into()
            .unwrap_or(0);
        c.releases_waiting = conn
            .query_row("SELECT count(*) FROM releases", [], |r| r.get::<_, i64>(0))
            .map_err(sql("count"))?
            .try_into()
            .unwrap_or(0);
        c.awaiting_commitment = conn
            .query_row(
                "SELECT count(*) FROM commitments c JOIN queue q ON q.id = c.queue_id WHERE q.state = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql("count"))?
            .try_into()
            .unwrap_or(0);
        c.pending = c.pending.saturating_sub(c.awaiting_commitment);
        Ok(c)
    }
}

/// The end of an object file's trailer.
const TRAILER_MAGIC: &[u8; 8] = b"TSUSPL01";
/// A trailer's length, at most (its fields are UIDs, an AE title, a patient ID, a digest).
const MAX_TRAILER: u64 = 4096;

/// The trailer written after an instance's data set in its object file: what its queue row
/// holds ([`trailer_body`]), the body's length (u32 LE) and [`TRAILER_MAGIC`].
fn trailer(meta: &Meta, digest: &str, size: u64, received_at: i64) -> Vec<u8> {
    let mut t = trailer_body(meta, digest, size, received_at);
    let len = u32::try_from(t.len()).unwrap_or(0);
    t.extend_from_slice(&len.to_le_bytes());
    t.extend_from_slice(TRAILER_MAGIC);
    t
}

/// What a queue row holds, as an object's trailer and a segment record carry it. Fields,
/// each a u32 LE length and its bytes: SOP class, SOP instance, transfer syntax, calling
/// AE, patient ID, digest (BLAKE3 of the data set, hex); a flag byte (1: the patient ID is
/// present); the data set's size (u64 LE) and when it was received (i64 LE); then, if the
/// data set has a Study Instance UID, that as one more field (a trailer written before it
/// was kept ends without it).
fn trailer_body(meta: &Meta, digest: &str, size: u64, received_at: i64) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    for field in [
        meta.sop_class.as_str(),
        meta.sop_instance.as_str(),
        meta.transfer_syntax.as_str(),
        meta.calling_ae.as_str(),
        meta.patient_id.as_deref().unwrap_or_default(),
        digest,
    ] {
        t.extend_from_slice(&u32::try_from(field.len()).unwrap_or(0).to_le_bytes());
        t.extend_from_slice(field.as_bytes());
    }
    t.push(u8::from(meta.patient_id.is_some()));
    t.extend_from_slice(&size.to_le_bytes());
    t.extend_from_slice(&received_at.to_le_bytes());
    if let Some(study) = &meta.study_uid {
        t.extend_from_slice(&u32::try_from(study.len()).unwrap_or(0).to_le_bytes());
        t.extend_from_slice(study.as_bytes());
    }
    t
}

/// What an object's trailer (or a segment record's metadata) says.
struct Trailer {
    meta: Meta,
    digest: String,
    size: u64,
    received_at: i64,
}

/// Parses a [`trailer_body`]; `None` unless it is exactly one.
fn parse_trailer_body(body: &[u8]) -> Option<Trailer> {
    let mut rest = body;
    let mut fields = Vec::with_capacity(6);
    for _ in 0..6 {
        let n = usize::try_from(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?)).ok()?;
        let value = std::str::from_utf8(rest.get(4..4usize.checked_add(n)?)?)
            .ok()?
            .to_owned();
        fields.push(value);
        rest = &rest[4 + n..];
    }
    let (&flag, rest) = rest.split_first()?;
    if rest.len() < 16 || flag > 1 {
        return None;
    }
    let size = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let received_at = i64::from_le_bytes(rest[8..16].try_into().ok()?);
    let study_uid = match &rest[16..] {
        [] => None,
        study => {
            let n = usize::try_from(u32::from_le_bytes(study.get(..4)?.try_into().ok()?)).ok()?;
            if study.len() != n.checked_add(4)? {
                return None;
            }
            Some(std::str::from_utf8(&study[4..]).ok()?.to_owned())
        }
    };
    let mut fields = fields.into_iter();
    let mut next = || fields.next().unwrap_or_default();
    let (sop_class, sop_instance, transfer_syntax, calling_ae, patient_id, digest) =
        (next(), next(), next(), next(), next(), next());
    Some(Trailer {
        meta: Meta {
            sop_class,
            sop_instance,
            transfer_syntax,
            calling_ae,
            patient_id: (flag == 1).then_some(patient_id),
            study_uid,
        },
        digest,
        size,
        received_at,
    })
}

/// Reads and checks an object file's trailer: well formed, at the very end, and the data
/// set before it matching its digest. `None` for anything else (an instance whose receipt
/// did not finish).
/// The queue rows whose data sets are in segments, by segment and generation: id to data
/// offset. One pass over the queue (it has no index by segment; its rows in segments are the
/// small instances waiting).
type SegmentRows = HashMap<(i64, i64), HashMap<i64, i64>>;

fn segment_rows(conn: &Connection) -> Result<SegmentRows, SpoolError> {
    let mut stmt = conn
        .prepare(
            "SELECT segment, generation, id, offset FROM queue
             WHERE segment IS NOT NULL AND generation IS NOT NULL AND offset IS NOT NULL",
        )
        .map_err(sql("recover"))?;
    let mut rows = stmt.query([]).map_err(sql("recover"))?;
    let mut all = SegmentRows::new();
    while let Some(r) = rows.next().map_err(sql("recover"))? {
        let key = (
            r.get(0).map_err(sql("recover"))?,
            r.get(1).map_err(sql("recover"))?,
        );
        all.entry(key).or_default().insert(
            r.get(2).map_err(sql("recover"))?,
            r.get(3).map_err(sql("recover"))?,
        );
    }
    Ok(all)
}

/// The data offsets in segment `slot`'s generation `generation` whose records left.
fn gone_offsets(conn: &Connection, slot: i64, generation: i64) -> Result<HashSet<i64>, SpoolError> {
    let mut stmt = conn
        .prepare("SELECT offset FROM gone WHERE segment = ?1 AND generation = ?2")
        .map_err(sql("recover"))?;
    let rows = stmt
        .query_map([slot, generation], |r| r.get(0))
        .map_err(sql("recover"))?;
    rows.collect::<Result<_, _>>().map_err(sql("recover"))
}

fn read_trailer(path: &Path) -> Option<Trailer> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len < 12 {
        return None;
    }
    let mut end = [0u8; 12];
    f.seek(SeekFrom::Start(len - 12)).ok()?;
    f.read_exact(&mut end).ok()?;
    if &end[4..] != TRAILER_MAGIC {
        return None;
    }
    let tlen = u64::from(u32::from_le_bytes(end[..4].try_into().ok()?));
    if tlen > MAX_TRAILER || tlen + 12 > len {
        return None;
    }
    let mut t = vec![0u8; usize::try_from(tlen).ok()?];
    f.seek(SeekFrom::Start(len - 12 - tlen)).ok()?;
    f.read_exact(&mut t).ok()?;
    let trailer = parse_trailer_body(&t)?;
    if trailer.size.checked_add(tlen + 12)? != len {
        return None;
    }
    let mut hash = blake3::Hasher::new();
    f.seek(SeekFrom::Start(0)).ok()?;
    io::copy(&mut (&mut f).take(trailer.size), &mut hash).ok()?;
    (hash.finalize().to_hex().as_str() == trailer.digest).then_some(trailer)
}

/// How much of an instance is written before its writeback is started.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// How much of an instance is written and hashed on the receiving thread; the rest is
/// written to its file and hashed on a thread of its own, beside the socket (BLAKE3 was a
/// fifth of the box's CPU on large instances, and the page-cache copy a quarter of the
/// receiving thread's, `docs/dicom-ingest-profile.md`). Small instances never pay for the
/// thread.
const HASH_INLINE: u64 = 1 << 20;

/// Batches queued for the writing thread before the receiver waits for it.
const HASH_QUEUE: usize = 2;

/// Fragments are handed to the writing thread in batches of at least this many bytes, not
/// one by one: the thread, faster than the socket, used to drain the queue and sleep
/// again after every fragment, so each 64 KiB cost both threads a wake-up (5,500 context
/// switches for 524 MB; `docs/dicom-ingest-profile.md`, step 7). Beyond what the kernel
/// has, an instance holds at most `HASH_QUEUE` batches queued, one being written and one
/// being gathered, each under this size plus one fragment (the negotiated PDU size): about
/// 2.3 MiB with 64 KiB PDUs, where 8 single fragments held 0.6 MiB.
const HANDOFF: usize = 512 << 10;

/// What the writing thread hands back: the digest so far and the file, with everything
/// queued written to it (not flushed), or the first write error.
type Written = Result<(blake3::Hasher, Option<File>), io::Error>;

/// The BLAKE3 digest of an instance as it arrives, and who writes its file
/// ([`HASH_INLINE`]).
enum Digest {
    Inline(Box<blake3::Hasher>),
    Beside {
        fragments: mpsc::SyncSender<Vec<Vec<u8>>>,
        /// Fragments not handed over yet, and their bytes ([`HANDOFF`]).
        batch: Vec<Vec<u8>>,
        batched: usize,
        writer: std::thread::JoinHandle<Written>,
    },
}

impl Digest {
    /// Takes bytes `hashed..` of the instance. Past [`HASH_INLINE`], and given the
    /// instance's `file`, they go to the writing thread with it, which writes and hashes
    /// them there (`Ok(None)`). Otherwise they are hashed here and handed back for the
    /// caller to keep.
    fn update<'b>(
        &mut self,
        bytes: std::borrow::Cow<'b, [u8]>,
        hashed: u64,
        file: &mut Option<File>,
    ) -> Result<Option<std::borrow::Cow<'b, [u8]>>, SpoolError> {
        if let Digest::Inline(h) = self
            && hashed >= HASH_INLINE
            && file.is_some()
        {
            let (fragments, queue) = mpsc::sync_channel::<Vec<Vec<u8>>>(HASH_QUEUE);
            let mut moved = std::mem::take(&mut **h);
            let mut out = file.take();
            let writer = std::thread::Builder::new()
                .name("spool-write".into())
                .spawn(move || -> Written {
                    let (mut written, mut flushed) = (hashed, hashed);
                    for fragment in queue.iter().flatten() {
                        if let Some(f) = out.as_mut() {
                            f.write_all(&fragment)?;
                            written += fragment.len() as u64;
                            if written - flushed >= WRITEBACK_CHUNK {
                                start_writeback(f, flushed, written);
                                flushed = written;
                            }
                        }
                        moved.update(&fragment);
                    }
                    Ok((moved, out))
                })
                // No thread (out of processes): the instance fails (0110H); its file
                // went with the closure and is removed with the `Incoming`.
                .map_err(SpoolError::Io)?;
            *self = Digest::Beside {
                fragments,
                batch: Vec::new(),
                batched: 0,
                writer,
            };
        }
        match self {
            Digest::Inline(h) => {
                h.update(&bytes);
                Ok(Some(bytes))
            }
            Digest::Beside {
                fragments,
                batch,
                batched,
                ..
            } => {
                *batched += bytes.len();
                batch.push(bytes.into_owned());
                if *batched < HANDOFF {
                    return Ok(None);
                }
                *batched = 0;
                if fragments.send(std::mem::take(batch)).is_err() {
                    // The writer stopped on an error: take it.
                    let gone = std::mem::replace(self, Digest::Inline(Box::default()));
                    return Err(match gone.finish() {
                        Err(e) => e,
                        Ok(_) => SpoolError::Io(io::Error::other("the writing thread stopped")),
                    });
                }
                Ok(None)
            }
        }
    }

    /// The digest, and the file back from the writing thread (everything written).
    fn finish(self) -> Result<(String, Option<File>), SpoolError> {
        let (hash, file) = match self {
            Digest::Inline(h) => (h.finalize(), None),
            Digest::Beside {
                fragments,
                batch,
                writer,
                ..
            } => {
                // The rest; a writer that stopped on an error says why when joined.
                if !batch.is_empty() {
                    let _ = fragments.send(batch);
                }
                drop(fragments);
                let (h, file) = writer
                    .join()
                    .map_err(|_| SpoolError::Io(io::Error::other("the writing thread failed")))?
                    .map_err(io_or_full)?;
                (h.finalize(), file)
            }
        };
        Ok((hash.to_hex().to_string(), file))
    }
}

/// Starts the writeback of bytes `from..to` of `file`, so that the fsync before the success
/// status waits for the tail only: Linux starts the writeback of a range given DONTNEED (and
/// keeps its pages while they are dirty). A hint: errors show at that fsync.
fn start_writeback(file: &File, from: u64, to: u64) {
    let _ = nix::fcntl::posix_fadvise(
        file,
        i64::try_from(from).unwrap_or(0),
        i64::try_from(to - from).unwrap_or(0),
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// The spool's queue opened by an operator's command while the service may be running
/// (`tsunagi dicom list`, `tsunagi dicom requeue`): only the queue database, no recovery
/// (which would take the instances being received for a crash's leftovers).
#[derive(Debug)]
pub struct Admin {
    conn: Connection,
}

impl Admin {
    /// Opens the queue of the spool in `dir`; it must exist (the service created it).
    pub fn open(dir: &Path) -> Result<Admin, SpoolError> {
        let db = dir.join("queue.db");
        if !db.exists() {
            return Err(SpoolError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no spool queue at {} (has the DICOM service run?)",
                    db.display()
                ),
            )));
        }
        let conn = tsunagi_state::open(&db, Durability::Acknowledging, MIGRATIONS)
            .map_err(SpoolError::Open)?;
        Ok(Admin { conn })
    }

    /// The queue's entries in `state` (`pending`, `held` or `dead`), oldest first, at most
    /// `limit`: what an operator sees (no patient data).
    pub fn entries(&self, state: &str, limit: usize) -> Result<Vec<Entry>, SpoolError> {
        entries(&self.conn, state, limit)
    }

    /// The dead letters among `ids` (every one when `None`), as [`Admin::requeue`] would
    /// put them back; nothing changes.
    pub fn dead(&self, ids: Option<&[i64]>) -> Result<Vec<Requeued>, SpoolError> {
        dead(&self.conn, ids)
    }

    /// Puts dead letters back in the queue (`ids`, or every one when `None`): pending again,
    /// attempts and backoff reset, and the dead-letter clock restarted at `now`. They are
    /// decided again (consent, identity) before anything is sent. Returns those put back
    /// (the rows that were dead letters; other ids are ignored), for the audit trail.
    pub fn requeue(&mut self, ids: Option<&[i64]>, now: i64) -> Result<Vec<Requeued>, SpoolError> {
        requeue(&mut self.conn, ids, now)
    }
}

fn entries(conn: &Connection, state: &str, limit: usize) -> Result<Vec<Entry>, SpoolError> {
    let mut stmt = conn
        .prepare(
            "SELECT id, state, sop_class, size, received_at, attempts,
                    CASE WHEN state = 'pending' AND EXISTS (SELECT 1 FROM commitments c WHERE c.queue_id = queue.id)
                         THEN 'stored at the network PACS, awaiting its storage commitment'
                         ELSE COALESCE(reason, last_error, '') END
             FROM queue WHERE state = ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sql("list the queue"))?;
    let rows = stmt
        .query_map(
            params![state, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok(Entry {
                    id: r.get(0)?,
                    state: r.get(1)?,
                    sop_class: r.get(2)?,
                    size: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                    received_at: r.get(4)?,
                    attempts: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX),
                    reason: r.get(6)?,
                })
            },
        )
        .map_err(sql("list the queue"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("list the queue"))
}

fn dead(conn: &Connection, ids: Option<&[i64]>) -> Result<Vec<Requeued>, SpoolError> {
    let mut pick = conn
        .prepare(
            "SELECT id, patient_id, sop_class, sop_instance FROM queue
             WHERE state = 'dead' AND (?1 IS NULL OR id = ?1) ORDER BY id",
        )
        .map_err(sql("read the dead letters"))?;
    let wanted: Vec<Option<i64>> = match ids {
        None => vec![None],
        Some(ids) => ids.iter().copied().map(Some).collect(),
    };
    let mut out = Vec::new();
    for id in wanted {
        let rows = pick
            .query_map([id], |r| {
                Ok(Requeued {
                    id: r.get(0)?,
                    patient_id: r.get(1)?,
                    sop_class: r.get(2)?,
                    sop_instance: r.get(3)?,
                })
            })
            .map_err(sql("read the dead letters"))?;
        for row in rows {
            out.push(row.map_err(sql("read the dead letters"))?);
        }
    }
    Ok(out)
}

fn requeue(
    conn: &mut Connection,
    ids: Option<&[i64]>,
    now: i64,
) -> Result<Vec<Requeued>, SpoolError> {
    let tx = write(conn).map_err(sql("requeue"))?;
    let out = dead(&tx, ids)?;
    {
        let mut put = tx
            .prepare(
                "UPDATE queue SET state = 'pending', reason = NULL, attempts = 0,
                   next_attempt_at = 0, received_at = ?1 WHERE id = ?2 AND state = 'dead'",
            )
            .map_err(sql("requeue"))?;
        for r in &out {
            put.execute(params![now, r.id]).map_err(sql("requeue"))?;
        }
    }
    tx.commit().map_err(sql("requeue"))?;
    Ok(out)
}

/// A queue entry as an operator sees it ([`Spool::entries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub state: String,
    pub sop_class: String,
    pub size: u64,
    /// Unix seconds (when the dead-letter clock started).
    pub received_at: i64,
    pub attempts: u32,
    /// Why it is held or dead, or the last forwarding error.
    pub reason: String,
}

/// An instance waiting in the clinic ([`Spool::waiting`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub id: i64,
    /// `held`, `dead` or `pending`.
    pub state: String,
    /// As the instance carries it (none: it carries none).
    pub patient_id: Option<String>,
    pub sop_class: String,
    pub sop_instance: String,
    pub size: u64,
    /// Unix seconds (when the dead-letter clock started).
    pub received_at: i64,
    pub attempts: u32,
    /// Why it is held or dead, or the last forwarding error.
    pub reason: String,
    /// Unix seconds: when a pending one is tried again.
    pub next_attempt_at: i64,
}

/// A dead letter put back in the queue ([`Spool::requeue`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    pub id: i64,
    pub patient_id: Option<String>,
    pub sop_class: String,
    pub sop_instance: String,
}

/// An instance being received. Dropped without [`Incoming::commit`], it leaves nothing.
pub struct Incoming {
    spool: Spool,
    /// Its queue id, and the name of its object.
    id: i64,
    /// Its object; empty once committed (the queue's then), or while it is small.
    path: PathBuf,
    file: Option<File>,
    /// A small instance's bytes so far, for a segment; `None` once it outgrew
    /// [`Segments::record_max`] (it continues in `file`), or without segments.
    buffer: Option<Vec<u8>>,
    written: u64,
    /// `None` once finished (at commit).
    hash: Option<Digest>,
    /// Bytes handed to the kernel's writeback so far (see [`WRITEBACK_CHUNK`]).
    flushed: u64,
    /// Where it comes from (the association's peer address), for the audit trail.
    peer: String,
    /// Success may have been answered (it is durable, its row may not be written yet): its
    /// file or record is kept whatever happens to this value, for the spool's opening to
    /// queue, and its bytes stay counted.
    acknowledged: bool,
}

impl Incoming {
    /// Where the instance comes from (the association's peer address): its receipt in the
    /// audit trail names it.
    pub fn set_peer(&mut self, peer: &str) {
        peer.clone_into(&mut self.peer);
    }

    /// Appends bytes (a P-DATA fragment). `OutOfResources` when the quota or the disk is
    /// full: drop this `Incoming` and answer A700.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.append(std::borrow::Cow::Borrowed(bytes))
    }

    /// [`Incoming::write`] of a fragment the caller is done with: past [`HASH_INLINE`] it
    /// goes to the hashing thread without a copy.
    pub fn write_owned(&mut self, bytes: Vec<u8>) -> Result<(), SpoolError> {
        self.append(std::borrow::Cow::Owned(bytes))
    }

    fn append(&mut self, bytes: std::borrow::Cow<'_, [u8]>) -> Result<(), SpoolError> {
        let n = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let inner = &self.spool.inner;
        let reserved = inner
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                let next = u.checked_add(n)?;
                (next <= inner.quota).then_some(next)
            });
        if reserved.is_err() {
            return Err(SpoolError::OutOfResources);
        }
        let hashed = self.written;
        self.written += n;
        if hashed / WRITEBACK_CHUNK != self.written / WRITEBACK_CHUNK {
            // A large instance stops at the disk's reserve too, not only at its start.
            self.spool.room_on_disk()?;
        }
        if let Some(buffer) = self.buffer.as_mut() {
            if self.written <= self.spool.inner.segments.record_max as u64 {
                buffer.extend_from_slice(&bytes);
                if let Some(h) = self.hash.as_mut() {
                    // No file yet: hashed here.
                    h.update(bytes, hashed, &mut None)?;
                }
                return Ok(());
            }
            // Too large for a segment: it continues in a file of its own.
            let path = self.spool.object_path(self.id);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_or_full)?;
            self.path = path;
            file.write_all(buffer).map_err(io_or_full)?;
            self.buffer = None;
            self.file = Some(file);
        }
        let hash = self
            .hash
            .as_mut()
            .ok_or(SpoolError::Io(io::Error::other("already committed")))?;
        let Some(bytes) = hash.update(bytes, hashed, &mut self.file)? else {
            // The writing thread has them.
            return Ok(());
        };
        let file = self
            .file
            .as_mut()
            .ok_or(SpoolError::Io(io::Error::other("already committed")))?;
        file.write_all(&bytes).map_err(io_or_full)?;
        if self.written - self.flushed >= WRITEBACK_CHUNK {
            start_writeback(file, self.flushed, self.written);
            self.flushed = self.written;
        }
        Ok(())
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Makes the instance durable and queued; only then may success be answered. Blocks
    /// until the committing thread's round with it is done (see [`committer`]).
    pub fn commit(self, meta: &Meta, now: i64) -> Result<Committed, SpoolError> {
        let (reply, outcome) = mpsc::sync_channel(1);
        self.submit(meta.clone(), now, Reply::Outcome(reply))?;
        outcome.recv().map_err(|_| committer_gone())?
    }

    /// Makes the instance durable, and returns as soon as it is: success may be answered.
    /// Its row follows on the committing thread: the instance's segment record or its
    /// file's trailer is the commit point, from which the spool's opening queues it should
    /// the row not be written (the service ends then; see [`committer`]). A small instance
    /// goes to the committing thread straight from here; a file of its own is flushed on
    /// the blocking pool, and is durable when that returns.
    pub async fn commit_async(self, meta: Meta, now: i64) -> Result<(), SpoolError> {
        if self.buffer.is_some() {
            // Small, so hashed as it came (no writing thread): finishing is no more than
            // the digest's last block.
            let (reply, durable) = tokio::sync::oneshot::channel();
            self.submit(meta, now, Reply::Durable(reply))?;
            durable.await.map_err(|_| committer_gone())?
        } else {
            tokio::task::spawn_blocking(move || self.submit(meta, now, Reply::Told))
                .await
                .map_err(|_| SpoolError::Io(io::Error::other("the flushing task failed")))?
        }
    }

    /// Finishes the digest, makes a file of its own durable (a small instance's record is
    /// the committing thread's to write) and hands the instance to the committing thread.
    fn submit(mut self, meta: Meta, now: i64, reply: Reply) -> Result<(), SpoolError> {
        let (digest, file) = self
            .hash
            .take()
            .ok_or(SpoolError::Io(io::Error::other("already committed")))?
            .finish()?;
        if file.is_some() {
            // Back from the writing thread, everything written.
            self.file = file;
        }
        if self.buffer.is_none() {
            self.flush_file(&meta, &digest, now)?;
            // Durable: a caller told so ([`Reply::Told`]) answers success once this returns.
            self.acknowledged = matches!(reply, Reply::Told);
        }
        let spool = self.spool.clone();
        spool
            .inner
            .commits
            .send(Work::Instance(Box::new(Job {
                incoming: self,
                meta,
                digest,
                now,
                reply,
            })))
            .map_err(|mpsc::SendError(work)| {
                if let Work::Instance(mut job) = work {
                    // Refused after all: dropped with the job, the `Incoming` removes its
                    // file.
                    job.incoming.acknowledged = false;
                }
                committer_gone()
            })
    }

    /// Makes a file of its own durable: data, trailer, size and (on ext4) its entry.
    fn flush_file(&mut self, meta: &Meta, digest: &str, now: i64) -> Result<(), SpoolError> {
        let mut file = self
            .file
            .take()
            .ok_or(SpoolError::Io(io::Error::other("already committed")))?;
        // The trailer (what the queue row holds), then data, trailer, size and (on ext4)
        // the directory entry made durable: the instance is safe from here on, its row or
        // not. The row is written without a flush (the ingest connection); should power go
        // before the WAL reaches the disk, [`Spool::open`] queues the object again from its
        // trailer. An object whose trailer never became durable was never acknowledged,
        // and is removed.
        file.write_all(&trailer(meta, digest, self.written, now))
            .map_err(io_or_full)?;
        file.sync_data().map_err(io_or_full)?;
        drop(file);
        if self.spool.inner.sync_folder {
            self.spool
                .inner
                .objects
                .sync_all()
                .map_err(SpoolError::Io)?;
        }
        Ok(())
    }

    /// What the instance's row came to (on the committing thread): the copy kept or let go,
    /// and an earlier copy replaced. The forwarder is told by the round, once.
    ///
    /// Should its row have failed after success was answered ([`Incoming::acknowledged`]),
    /// its record or file stays where it is (and counted), for the spool's opening to queue.
    fn settle(
        mut self,
        landed: Result<Landed, SpoolError>,
        location: Option<Location>,
    ) -> Result<Committed, SpoolError> {
        let spool = self.spool.clone();
        let id = self.id;
        let landed = match (landed, location) {
            (Ok(l), _) => l,
            // Kept by the drop, with its bytes counted, not listed as gone.
            (Err(e), _) if self.acknowledged => return Err(e),
            (Err(e), None) => return Err(e),
            (Err(e), Some(l)) => {
                // Its record stays in the segment without a row: listed as gone (best
                // effort: a record found again when the spool opens is sent once more,
                // which the PACS stores once).
                let _ = spool.conn().execute(
                    "INSERT OR IGNORE INTO gone VALUES (?1, ?2, ?3)",
                    params![
                        l.slot,
                        l.generation,
                        i64::try_from(l.offset).unwrap_or(i64::MAX)
                    ],
                );
                spool.depart(l.slot);
                return Err(e);
            }
        };
        let replaced = match landed {
            // Stored once: this copy goes (Drop removes the file and releases its bytes;
            // a record is gone already, listed in the same transaction).
            Landed::Identical(earlier) => {
                self.acknowledged = false;
                if let Some(l) = location {
                    spool.depart(l.slot);
                }
                return Ok(Committed::Identical(earlier));
            }
            Landed::Replaced(old, slot, size) => Some((old, slot, size)),
            Landed::Queued => None,
        };
        // Committed: the file is the queue's now; its bytes stay counted.
        self.written = 0;
        self.path = PathBuf::new();
        if let Some((old, slot, size)) = replaced {
            // The earlier copy's file goes next, so the removal of its row must not be lost
            // with power: a commit on the flushing connection flushes the WAL, the ingest
            // connection's rows with it.
            spool
                .conn()
                .execute("UPDATE counters SET delivered = delivered", [])
                .map_err(sql("flush a replacement"))?;
            match slot {
                Some(slot) => spool.depart(slot),
                None => {
                    let _ = fs::remove_file(spool.object_path(old));
                }
            }
            spool.release(u64::try_from(size).unwrap_or(0));
            return Ok(Committed::Replaced { id, replaced: old });
        }
        Ok(Committed::Queued(id))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.acknowledged {
            // Durable and answered, its row not written: the spool's opening queues it
            // from its record or trailer (the committing thread's round failed or
            // panicked). Its bytes stay counted.
            return;
        }
        if !self.path.as_os_str().is_empty() {
            self.file.take();
            let _ = fs::remove_file(&self.path);
        }
        self.spool.release(self.written);
    }
}

#[cfg(test)]
mod tests;
