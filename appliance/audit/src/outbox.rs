//! The durable, ordered audit queue: store and forward (issue 17).
//!
//! An event counts as recorded once [`Outbox::record`] returns: its message, formatted for
//! syslog with its sequence number, is committed to `audit.db` (SQLite, `synchronous=FULL`).
//! [`drain`] sends the queue in sequence order to the repository in batches, each confirmed
//! by an orderly close ([`crate::syslog::Connection::close`]), and removes a batch only once
//! it is confirmed. A failure (the repository stopped, unreachable, a TLS refusal) leaves the
//! batch queued: it is sent again, from its first message, after a backoff. So nothing
//! recorded is lost across an outage or a reboot, and the order holds; a message the
//! repository had read from a batch it did not confirm arrives twice, with the same
//! `sequenceId` (RFC 5425 has no acknowledgement; see the `syslog` module).

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params};
use tsunagi_state::{Durability, Migration, StateError};

use crate::syslog::{self, Repository, SyslogError};

/// The schema of `audit.db`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "CREATE TABLE outbox (
              seq INTEGER PRIMARY KEY AUTOINCREMENT,
              message TEXT NOT NULL
          );",
    },
    // The box's secret for the pseudonyms of local patient IDs
    // ([`crate::protocol::Patient::audit_id`]); written once, at the first open.
    Migration {
        version: 2,
        sql: "CREATE TABLE pseudonym_key (
              id INTEGER PRIMARY KEY CHECK (id = 1),
              key BLOB NOT NULL CHECK (length(key) = 32)
          ) STRICT;",
    },
    // How far the provisioning trail (`STATE/provisioning/audit.jsonl`) was recorded.
    Migration {
        version: 3,
        sql: "CREATE TABLE provisioning_cursor (
              id INTEGER PRIMARY KEY CHECK (id = 1),
              offset INTEGER NOT NULL
          ) STRICT;
          INSERT INTO provisioning_cursor VALUES (1, 0);",
    },
];

/// Messages sent per connection (each connection is one confirmed batch).
pub const BATCH: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the audit queue: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Format(#[from] SyslogError),
    #[error("no randomness for the pseudonym key: {0}")]
    Random(String),
}

/// The queue in `audit.db`.
pub struct Outbox {
    db: Connection,
    host: String,
    key: [u8; 32],
}

impl Outbox {
    /// Opens (creating) the queue; `host` is the box's name in every message.
    pub fn open(path: &Path, host: &str) -> Result<Outbox, OutboxError> {
        let db = tsunagi_state::open(path, Durability::Acknowledging, MIGRATIONS)?;
        // Check the name now rather than at the first event.
        syslog::format(host, 0, "")?;
        let key = pseudonym_key(&db)?;
        Ok(Outbox {
            db,
            host: host.to_owned(),
            key,
        })
    }

    /// The box's secret for pseudonyms of local patient IDs.
    pub fn pseudonym_key(&self) -> &[u8; 32] {
        &self.key
    }

    /// Records one audit message (its XML): formatted with the next sequence number and
    /// committed before this returns. Returns the sequence number.
    pub fn record(&mut self, xml: &str) -> Result<u64, OutboxError> {
        self.record_all(&[xml]).map(|(first, _)| first)
    }

    /// How far the provisioning trail was recorded (bytes).
    pub fn provisioning_offset(&self) -> Result<u64, OutboxError> {
        let n: i64 = self.db.query_row(
            "SELECT offset FROM provisioning_cursor WHERE id = 1",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Records the messages of the provisioning trail up to `offset`, and the offset, in one
    /// transaction.
    pub fn record_provisioning<S: AsRef<str>>(
        &mut self,
        xmls: &[S],
        offset: u64,
    ) -> Result<(), OutboxError> {
        self.record_in(xmls, Some(offset)).map(|_| ())
    }

    /// Records messages in one transaction (all or none), numbered in their order. Returns
    /// the first and the last sequence number.
    pub fn record_all<S: AsRef<str>>(&mut self, xmls: &[S]) -> Result<(u64, u64), OutboxError> {
        self.record_in(xmls, None)
    }

    fn record_in<S: AsRef<str>>(
        &mut self,
        xmls: &[S],
        provisioning_offset: Option<u64>,
    ) -> Result<(u64, u64), OutboxError> {
        let tx = self.db.transaction()?;
        if let Some(offset) = provisioning_offset {
            tx.execute(
                "UPDATE provisioning_cursor SET offset = ?1 WHERE id = 1",
                [i64::try_from(offset).unwrap_or(i64::MAX)],
            )?;
        }
        let mut seqs = (0, 0);
        for (i, xml) in xmls.iter().enumerate() {
            tx.execute("INSERT INTO outbox (message) VALUES ('')", [])?;
            let seq = u64::try_from(tx.last_insert_rowid()).unwrap_or(0);
            let message = syslog::format(&self.host, seq, xml.as_ref())?;
            tx.execute(
                "UPDATE outbox SET message = ?1 WHERE seq = ?2",
                params![message, i64::try_from(seq).unwrap_or(i64::MAX)],
            )?;
            if i == 0 {
                seqs.0 = seq;
            }
            seqs.1 = seq;
        }
        tx.commit()?;
        Ok(seqs)
    }

    /// The first `limit` messages waiting, in order.
    pub fn pending(&self, limit: usize) -> Result<Vec<(u64, String)>, OutboxError> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT seq, message FROM outbox ORDER BY seq LIMIT ?1")?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
            Ok((
                u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                row.get(1)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many messages wait.
    pub fn len(&self) -> Result<u64, OutboxError> {
        let n: i64 = self
            .db
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self
            .db
            .query_row("SELECT seq FROM outbox LIMIT 1", [], |r| r.get::<_, i64>(0))
            .optional()?
            .is_none())
    }

    /// Removes every message up to `seq`, confirmed by the repository.
    pub fn confirm(&mut self, seq: u64) -> Result<(), OutboxError> {
        self.db.execute(
            "DELETE FROM outbox WHERE seq <= ?1",
            [i64::try_from(seq).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }
}

/// The pseudonym key in `db`, made (32 random bytes from the kernel) if there is none.
fn pseudonym_key(db: &Connection) -> Result<[u8; 32], OutboxError> {
    let read = || {
        db.query_row("SELECT key FROM pseudonym_key WHERE id = 1", [], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .optional()
    };
    if read()?.is_none() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| OutboxError::Random(e.to_string()))?;
        db.execute(
            "INSERT OR IGNORE INTO pseudonym_key (id, key) VALUES (1, ?1)",
            [&key[..]],
        )?;
    }
    let key = read()?.unwrap_or_default();
    key.try_into()
        .map_err(|_| OutboxError::Sql(rusqlite::Error::InvalidQuery))
}

/// What one [`send_pending`] came to.
#[derive(Debug)]
pub enum Round {
    /// Nothing was waiting.
    Idle,
    /// A batch was confirmed, up to this sequence number.
    Confirmed(u64),
}

/// Sends the first batch waiting, and removes it once the repository confirmed it. An error
/// leaves it queued (to be sent again, whole). The queue is locked only to read the batch
/// and to confirm it, so recording never waits for the network.
pub async fn send_pending(
    outbox: &Mutex<Outbox>,
    repository: &Repository,
) -> Result<Round, DrainError> {
    let lock = || outbox.lock().unwrap_or_else(PoisonError::into_inner);
    let batch = lock().pending(BATCH)?;
    let Some(&(last, _)) = batch.last() else {
        return Ok(Round::Idle);
    };
    let mut conn = syslog::Connection::open(repository).await?;
    for (_, message) in &batch {
        conn.send(message).await?;
    }
    conn.close().await?;
    lock().confirm(last)?;
    Ok(Round::Confirmed(last))
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Send(#[from] SyslogError),
}

impl From<rusqlite::Error> for DrainError {
    fn from(e: rusqlite::Error) -> DrainError {
        DrainError::Outbox(OutboxError::Sql(e))
    }
}

/// The wait after the `failures`-th failure in a row: 1 s, doubling, at most 60 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_numbered_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut outbox = Outbox::open(&path, "1312345678-TEST-0001").unwrap();
        for i in 1..=3 {
            assert_eq!(
                outbox
                    .record(&format!("<AuditMessage n=\"{i}\"/>"))
                    .unwrap(),
                i
            );
        }
        drop(outbox);
        let mut outbox = Outbox::open(&path, "1312345678-TEST-0001").unwrap();
        let pending = outbox.pending(10).unwrap();
        assert_eq!(pending.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(pending[1].1.contains("[meta sequenceId=\"2\"]"));
        assert!(pending[1].1.ends_with("<AuditMessage n=\"2\"/>"));
        outbox.confirm(2).unwrap();
        assert_eq!(outbox.len().unwrap(), 1);
        // Numbers are never reused, even once the queue is empty.
        outbox.confirm(3).unwrap();
        assert!(outbox.is_empty().unwrap());
        assert_eq!(outbox.record("<AuditMessage/>").unwrap(), 4);
    }

    #[test]
    fn a_batch_is_numbered_in_order_and_the_pseudonym_key_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut outbox = Outbox::open(&path, "box").unwrap();
        let key = *outbox.pseudonym_key();
        assert_ne!(key, [0; 32]);
        assert_eq!(outbox.record("<a/>").unwrap(), 1);
        assert_eq!(
            outbox.record_all(&["<b/>", "<c/>", "<d/>"]).unwrap(),
            (2, 4)
        );
        drop(outbox);
        let outbox = Outbox::open(&path, "box").unwrap();
        assert_eq!(*outbox.pseudonym_key(), key);
        let other = Outbox::open(&dir.path().join("other.db"), "box").unwrap();
        assert_ne!(*other.pseudonym_key(), key);
    }

    #[test]
    fn a_bad_host_name_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Outbox::open(&dir.path().join("audit.db"), "two words").is_err());
    }

    #[test]
    fn the_backoff_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
