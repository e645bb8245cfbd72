//! The sync's part of the ATNA audit trail (issue 17): each SS-MIX2 file put at the hub's
//! replica, and each deleted there, is one message (Export, or Patient Record with action
//! D), named by its data type and content, never by its path (which holds the clinic's
//! patient ID).
//!
//! `sync.db`'s `atna_pending` is filled by a trigger with each release record, in the
//! transaction that marks the operation done; [`Exports`] reads it on a connection of its
//! own and [`audit::client::hand_over`] hands it to the `audit` service, which answers once
//! the events are in its durable queue. The patient is named by the network ID (asked of the
//! consent service's identity cache), or by the clinic's ID, which the audit service turns
//! into a pseudonym.

use std::collections::HashMap;
use std::path::Path;

use audit::client::Source;
use audit::protocol::{Event, Patient, Result as Outcome};
use consent::client::{GateError, Identities};
use rusqlite::{Connection, params};

use crate::sync::SyncError;

/// Why the exports were not read or named (they stay in `sync.db`).
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error(transparent)]
    Open(#[from] SyncError),
    #[error("the audit records in sync.db")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot ask the patient's network ID")]
    Identity(#[source] GateError),
}

/// The exports and deletions owed to the audit trail.
pub struct Exports<I> {
    conn: Connection,
    identities: I,
    /// The hub's replica as the messages name it (its URL).
    replica: String,
    /// Whether the trail is on (else the records are only forgotten: nothing to ask).
    named: bool,
}

impl<I: Identities> Exports<I> {
    /// Reads `STATE-DIR/sync.db` (the sync has opened and migrated it).
    pub fn open(
        state_dir: &Path,
        identities: I,
        replica: &str,
        named: bool,
    ) -> Result<Exports<I>, TrailError> {
        Ok(Exports {
            conn: crate::sync::open_db(state_dir)?,
            identities,
            replica: replica.to_owned(),
            named,
        })
    }
}

impl<I: Identities + Send + 'static> Source for Exports<I> {
    type Error = TrailError;

    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, Event)>, TrailError> {
        let rows: Vec<(i64, bool, String, String, String)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, deleted, patient_id, data_type, sha256 FROM atna_pending
                 ORDER BY id LIMIT ?1",
            )?;
            stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, i64>(1)? == 1,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut network_ids: HashMap<String, Option<String>> = HashMap::new();
        let mut events = Vec::with_capacity(rows.len());
        for (id, deleted, local, data_type, sha256) in rows {
            let network = match network_ids.get(&local) {
                Some(n) => n.clone(),
                None => {
                    let n = if self.named {
                        match self.identities.network_id(&local) {
                            Ok(n) => n,
                            Err(GateError::Refused(_)) => None,
                            Err(e) => return Err(TrailError::Identity(e)),
                        }
                    } else {
                        None
                    };
                    network_ids.insert(local.clone(), n.clone());
                    n
                }
            };
            events.push((
                id,
                Event::Ssmix2File {
                    deleted,
                    replica: self.replica.clone(),
                    data_type,
                    sha256,
                    patient: network.map_or(Patient::Local(local), Patient::Network),
                    result: Outcome::Success,
                },
            ));
        }
        Ok(events)
    }

    fn recorded(&mut self, last: i64) -> Result<(), TrailError> {
        self.conn
            .execute("DELETE FROM atna_pending WHERE id <= ?1", params![last])?;
        Ok(())
    }
}

/// The sync's other events (`sync.db`'s `atna_events`: a replica refused over TLS).
pub struct Alerts {
    conn: Connection,
}

impl Alerts {
    pub fn open(state_dir: &Path) -> Result<Alerts, TrailError> {
        Ok(Alerts {
            conn: crate::sync::open_db(state_dir)?,
        })
    }
}

impl Source for Alerts {
    type Error = TrailError;

    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, Event)>, TrailError> {
        Ok(audit::pending::pending(&self.conn, limit)?)
    }

    fn recorded(&mut self, last: i64) -> Result<(), TrailError> {
        Ok(audit::pending::forget(&self.conn, last)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Patient 0001234 has a network ID; 0005678 has none.
    struct Ids;

    impl Identities for Ids {
        fn network_id(&mut self, patient: &str) -> Result<Option<String>, GateError> {
            Ok((patient == "0001234").then(|| "NET-0001234".to_owned()))
        }

        fn local_id(&mut self, _: &str) -> Result<Option<String>, GateError> {
            Ok(None)
        }
    }

    #[test]
    fn each_release_is_owed_to_the_audit_trail_by_content_never_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::sync::open_db(dir.path()).unwrap();
        for (patient, kind, sha) in [
            ("0001234", "sent", "aa"),
            ("0005678", "sent", "bb"),
            ("0001234", "deleted", "aa"),
        ] {
            conn.execute(
                "INSERT INTO releases (patient_id, category, kind, sha256, data_type) VALUES (?1, 'prescriptions', ?2, ?3, 'OMP-01')",
                params![patient, kind, sha],
            )
            .unwrap();
        }
        let mut exports =
            Exports::open(dir.path(), Ids, "https://10.98.0.1:8443/ssmix2/", true).unwrap();
        let pending = exports.pending(10).unwrap();
        let seen: Vec<(i64, bool, &str, Patient)> = pending
            .iter()
            .map(|(id, e)| {
                let Event::Ssmix2File {
                    deleted,
                    sha256,
                    patient,
                    data_type,
                    replica,
                    ..
                } = e
                else {
                    panic!("{e:?}")
                };
                assert_eq!(data_type, "OMP-01");
                assert_eq!(replica, "https://10.98.0.1:8443/ssmix2/");
                (*id, *deleted, sha256.as_str(), patient.clone())
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, false, "aa", Patient::Network("NET-0001234".into())),
                (2, false, "bb", Patient::Local("0005678".into())),
                (3, true, "aa", Patient::Network("NET-0001234".into())),
            ]
        );
        exports.recorded(2).unwrap();
        assert_eq!(exports.pending(10).unwrap().len(), 1);
    }
}
