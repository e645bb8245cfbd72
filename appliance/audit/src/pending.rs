//! Events a service owes the audit trail, kept in an SQLite table of its own until the
//! `audit` service has them: `atna_events (id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT
//! NOT NULL)`, each row an [`Event`] as JSON. A service with a database of its own adds the
//! table there ([`TABLE`]) and writes an event in the transaction of the change it records;
//! one without opens [`Store`] in its state directory.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tsunagi_state::{Durability, Migration, StateError};

use crate::protocol::Event;

/// The table, for a service's own migrations.
pub const TABLE: &str = "CREATE TABLE atna_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
) STRICT;";

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: TABLE,
}];

/// Keeps `event` in `conn`'s `atna_events`.
pub fn record(conn: &Connection, event: &Event) -> rusqlite::Result<()> {
    let json = serde_json::to_string(event)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached("INSERT INTO atna_events (event) VALUES (?1)")?
        .execute([json])?;
    Ok(())
}

/// The first `limit` events kept, oldest first. A row that is not an event (our own record,
/// damaged) is an alert in the trail rather than a silent loss.
pub fn pending(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<(i64, Event)>> {
    let mut stmt = conn.prepare_cached("SELECT id, event FROM atna_events ORDER BY id LIMIT ?1")?;
    let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })?;
    rows.map(|row| {
        row.map(|(id, json)| {
            let event = serde_json::from_str(&json).unwrap_or_else(|_| Event::FailedAuditVerify {
                reason: "an audit event kept for the audit trail could not be read".to_owned(),
            });
            (id, event)
        })
    })
    .collect()
}

/// Forgets the events up to `last` (the audit trail has them).
pub fn forget(conn: &Connection, last: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM atna_events WHERE id <= ?1")?
        .execute([last])?;
    Ok(())
}

/// A database of its own (`PATH`, `synchronous=FULL`) for a service that has none: one
/// connection, shared (`Arc<Store>`) by the task that records and the hand-over.
pub struct Store {
    conn: Mutex<Connection>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the audit events kept for the audit trail")]
    Sql(#[from] rusqlite::Error),
    #[error("the audit events kept for the audit trail: a writer panicked")]
    Poisoned,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, PendingError> {
        Ok(Store {
            conn: Mutex::new(tsunagi_state::open(
                path,
                Durability::Acknowledging,
                MIGRATIONS,
            )?),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, PendingError> {
        self.conn.lock().map_err(|_| PendingError::Poisoned)
    }

    /// Keeps `event` (committed before this returns).
    pub fn record(&self, event: &Event) -> Result<(), PendingError> {
        Ok(record(&*self.conn()?, event)?)
    }
}

impl crate::client::Source for Arc<Store> {
    type Error = PendingError;

    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, Event)>, PendingError> {
        Ok(pending(&*self.conn()?, limit)?)
    }

    fn recorded(&mut self, last: i64) -> Result<(), PendingError> {
        Ok(forget(&*self.conn()?, last)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Source as _;

    #[test]
    fn events_are_kept_in_order_until_forgotten_and_a_damaged_one_becomes_an_alert() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.db");
        let store = Arc::new(Store::open(&path).unwrap());
        for i in 0..3 {
            store
                .record(&Event::RefusedTlsPeer {
                    reason: format!("refusal {i}"),
                    peer: "10.98.0.1:443".into(),
                })
                .unwrap();
        }
        store
            .conn()
            .unwrap()
            .execute("INSERT INTO atna_events (event) VALUES ('{not json')", [])
            .unwrap();
        drop(store);
        let mut store = Arc::new(Store::open(&path).unwrap());
        let kept = store.pending(10).unwrap();
        assert_eq!(kept.len(), 4);
        assert_eq!(
            kept[1].1,
            Event::RefusedTlsPeer {
                reason: "refusal 1".into(),
                peer: "10.98.0.1:443".into(),
            }
        );
        assert!(matches!(kept[3].1, Event::FailedAuditVerify { .. }));
        store.recorded(kept[2].0).unwrap();
        assert_eq!(store.pending(10).unwrap().len(), 1);
    }
}
