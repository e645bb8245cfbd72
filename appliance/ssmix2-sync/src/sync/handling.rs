//! The staff's requeue and discard of the files that wait ([`crate::desk`]), carried out by
//! the sync's worker between two operations ([`Syncer::serve_desk`]), so that none is
//! under way for the file at that moment.
//!
//! A discarded version is kept in `discarded` (path, SHA-256): never planned
//! ([`Syncer::publications`]), an operation already planned for it is dropped, and one that
//! had started is undone at the hub before anything else ([`Syncer::drain`]). A changed file
//! is a new version. Rows whose version is gone from the storage are forgotten after each
//! cycle.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;

use rusqlite::{OptionalExtension as _, params};

use super::{SyncError, Syncer, now_secs, sql};
use crate::desk::{Answer, FileRef, Job, Request};
use consent::client::{Category, GateError, Handling, Object, Recipient, SocketGate};

/// Records the staff's handling of waiting files in the audit trail.
pub trait Recorder {
    fn handled(
        &mut self,
        patient: &str,
        category: Category,
        handling: Handling,
        objects: &[Object],
        by: &str,
    ) -> Result<(), GateError>;
}

impl Recorder for SocketGate {
    fn handled(
        &mut self,
        patient: &str,
        category: Category,
        handling: Handling,
        objects: &[Object],
        by: &str,
    ) -> Result<(), GateError> {
        SocketGate::handled(
            self,
            Some(patient),
            Recipient::Hub,
            category,
            handling,
            objects,
            by,
        )
    }
}

/// The desk's side in the syncer: the requests the desk hands over, what records them, and
/// where the list of what waits is kept (rewritten after a change, so the console shows
/// it at once).
pub struct Desk {
    pub jobs: mpsc::Receiver<Job>,
    pub recorder: Box<dyn Recorder + Send>,
    pub waiting_file: Option<PathBuf>,
}

/// A waiting file a request named: its patient and data type.
struct Picked {
    file: FileRef,
    patient: String,
    data_type: String,
}

impl Syncer {
    /// Takes the desk's requests from now on ([`Syncer::serve_desk`]).
    pub fn desk_on(&mut self, desk: Desk) {
        self.desk = Some(desk);
    }

    /// Carries out the desk's requests that wait. Called between two operations (in the
    /// outbox's drain) and by the idle worker. True when a requeue changed something: a
    /// cycle should start now.
    pub fn serve_desk(&mut self) -> bool {
        let Some(mut desk) = self.desk.take() else {
            return false;
        };
        let mut requeued = false;
        while let Ok(job) = desk.jobs.try_recv() {
            if !job.take() {
                continue;
            }
            let span = tracing::info_span!("desk");
            let _enter = span.enter();
            let answer = self.handle(desk.recorder.as_mut(), &job.request, now_secs());
            if let Answer::Done { count } = answer
                && count > 0
            {
                requeued |= matches!(job.request, Request::Requeue { .. });
                // The list the console shows next is the changed one.
                if let Some(path) = &desk.waiting_file {
                    self.keep_waiting(path, now_secs());
                }
            }
            job.answer(answer);
        }
        self.desk = Some(desk);
        requeued
    }

    /// Replaces the list of what waits at `path` (0640), as of now; a failure is logged.
    pub fn keep_waiting(&self, path: &std::path::Path, at: i64) {
        let kept = self
            .waiting(self.fresh, at)
            .map_err(|e| tsunagi_runtime::child::error_chain(&e))
            .and_then(|w| serde_json::to_vec(&w).map_err(|e| e.to_string()))
            .and_then(|bytes| {
                tsunagi_state::replace_file(path, &bytes, 0o640).map_err(|e| e.to_string())
            });
        if let Err(why) = kept {
            tracing::warn!(%why, "cannot keep the list of what waits");
        }
    }

    /// One request: the files it names that still wait in that version, recorded in the
    /// audit trail first (per patient and category), then changed in one transaction.
    pub fn handle(&mut self, recorder: &mut dyn Recorder, request: &Request, now: i64) -> Answer {
        if let Err(why) = crate::desk::check(request) {
            return Answer::Refused(why);
        }
        let (staff, files, handling) = match request {
            Request::Requeue { staff, files } => (staff, files, Handling::Requeued),
            Request::Discard { staff, files } => (staff, files, Handling::Discarded),
        };
        let discard = handling == Handling::Discarded;
        let picked = match self.pick(files, discard) {
            Ok(p) => p,
            Err(e) => return failed("read the waiting files", &e),
        };
        if picked.is_empty() {
            return Answer::Done { count: 0 };
        }
        let by = format!("{} ({})", staff.account, staff.from);
        let mut groups: BTreeMap<(&str, Category), Vec<Object>> = BTreeMap::new();
        for p in &picked {
            // A data type no category covers is never sent; recorded under documents.
            let category = Category::for_ssmix2(&p.data_type).unwrap_or(Category::Documents);
            groups
                .entry((p.patient.as_str(), category))
                .or_default()
                .push(Object::Ssmix2File {
                    sha256: p.file.sha256.clone(),
                    data_type: p.data_type.clone(),
                });
        }
        for ((patient, category), objects) in groups {
            if let Err(e) = recorder.handled(patient, category, handling, &objects, &by) {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "the audit trail cannot record a requeue or discard; nothing was changed"
                );
                return Answer::Error(
                    "the audit trail cannot record it; nothing was changed".into(),
                );
            }
        }
        match self.apply(&picked, discard, now) {
            Ok(()) => {
                tracing::info!(
                    count = picked.len(),
                    action = handling.as_str(),
                    "waiting SS-MIX2 files handled at the console"
                );
                Answer::Done {
                    count: picked.len(),
                }
            }
            Err(e) => failed(
                "change the sync's state (the audit trail has recorded it)",
                &e,
            ),
        }
    }

    /// The named files that wait in the named version (not at the hub; for a discard, not
    /// discarded already).
    fn pick(&self, files: &[FileRef], discard: bool) -> Result<Vec<Picked>, SyncError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT f.patient_id, f.data_type FROM idx.files f
                 WHERE f.path = ?1 AND f.sha256 = ?2
                   AND f.status IN ('current','superseded','deleted') AND f.patient_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM published p WHERE p.path = f.path AND p.sha256 = f.sha256)
                   AND (?3 = 0 OR NOT EXISTS (SELECT 1 FROM discarded d WHERE d.path = f.path AND d.sha256 = f.sha256))",
            )
            .map_err(sql("read the waiting files"))?;
        let mut seen = std::collections::BTreeSet::new();
        let mut picked = Vec::new();
        for f in files {
            if !seen.insert(f) {
                continue;
            }
            let row: Option<(String, String)> = stmt
                .query_row(params![f.path, f.sha256, discard], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(sql("read the waiting files"))?;
            if let Some((patient, data_type)) = row {
                picked.push(Picked {
                    file: f.clone(),
                    patient,
                    data_type,
                });
            }
        }
        Ok(picked)
    }

    fn apply(&mut self, picked: &[Picked], discard: bool, now: i64) -> Result<(), SyncError> {
        let tx = self.conn.unchecked_transaction().map_err(sql("begin"))?;
        for p in picked {
            let (path, sha) = (&p.file.path, &p.file.sha256);
            if discard {
                tx.execute(
                    "INSERT OR IGNORE INTO discarded (path, sha256, at) VALUES (?1, ?2, ?3)",
                    params![path, sha, now],
                )
                .map_err(sql("discard"))?;
                // Planned and not started: nothing of it left; dropped. A started one is
                // undone by the drain, which sees the discard first.
                tx.execute(
                    "DELETE FROM outbox WHERE started IS NULL AND sha256 = ?2
                       AND ((op = 'put' AND path = ?1) OR (op = 'rename' AND dest = ?1))",
                    params![path, sha],
                )
                .map_err(sql("discard"))?;
            } else {
                if let Some(category) = Category::for_ssmix2(&p.data_type) {
                    tx.execute(
                        "DELETE FROM decisions WHERE patient_id = ?1 AND category = ?2",
                        params![p.patient, category.as_str()],
                    )
                    .map_err(sql("requeue"))?;
                }
                tx.execute(
                    "UPDATE outbox SET attempts = 0, last_error = NULL
                     WHERE (op = 'put' AND path = ?1) OR (op = 'rename' AND dest = ?1)",
                    [path],
                )
                .map_err(sql("requeue"))?;
                tx.execute("DELETE FROM discarded WHERE path = ?1", [path])
                    .map_err(sql("requeue"))?;
            }
        }
        tx.commit().map_err(sql("commit a requeue or discard"))
    }

    /// Whether the staff discarded this version of the file at `path`.
    pub(super) fn discarded(&self, path: &str, sha256: Option<&str>) -> Result<bool, SyncError> {
        let Some(sha256) = sha256 else {
            return Ok(false);
        };
        self.conn
            .query_row(
                "SELECT 1 FROM discarded WHERE path = ?1 AND sha256 = ?2",
                params![path, sha256],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(sql("read the discarded files"))
    }

    /// Forgets discarded versions no longer in the storage (the file changed or went).
    pub(super) fn forget_discarded(&self) -> Result<(), SyncError> {
        self.conn
            .execute(
                "DELETE FROM discarded WHERE NOT EXISTS
                   (SELECT 1 FROM idx.files f WHERE f.path = discarded.path AND f.sha256 = discarded.sha256)",
                [],
            )
            .map(|_| ())
            .map_err(sql("forget discarded files"))
    }
}

fn failed(what: &str, e: &(dyn std::error::Error + 'static)) -> Answer {
    tracing::error!(error = e, "the SS-MIX2 desk could not {what}");
    Answer::Error(format!("the sync could not {what}"))
}
