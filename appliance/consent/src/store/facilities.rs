//! The network's facility directory (`facility`): what the last refresh read of the
//! network's `Organization`s, for the console to offer recipients by name. Decisions never
//! read it: a consent names facilities by 医療機関コード.

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use tsunagi_config::FacilityCode;

use super::{Store, StoreError, sql};
use crate::model::Facility;
use crate::time::Timestamp;

/// One `Organization` as a refresh read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// `Organization/ID`.
    pub resource: String,
    /// The facility, or why it could not be understood (with its code, when that was read).
    pub read: Result<Facility, (Option<FacilityCode>, String)>,
}

/// The facility directory as the console offers it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    /// Every facility read whole whose code no other entry claims, by name (inactive ones
    /// too, to name them; the console offers only active ones).
    pub facilities: Vec<Facility>,
    /// Entries not offered: not understood, or sharing a code with another entry.
    pub unreadable: u64,
    /// When the network's directory was last read whole (never: `None`).
    pub refreshed_at: Option<Timestamp>,
}

impl Directory {
    /// The name of the facility with `code`, if the directory has it.
    pub fn name_of(&self, code: &FacilityCode) -> Option<&str> {
        self.facilities
            .iter()
            .find(|f| &f.code == code)
            .map(|f| f.name.as_str())
    }
}

/// An entry of the directory that is not offered, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotOffered {
    /// `Organization/ID`.
    pub resource: String,
    /// Its 医療機関コード, when it could be read.
    pub code: Option<String>,
    pub why: String,
}

/// What a shared code's entries say in [`NotOffered::why`].
pub const SHARED_CODE: &str = "another entry of the directory has the same 医療機関コード";

/// Rows whose code more than one row claims.
const SHARED_CODES: &str =
    "SELECT code FROM facility WHERE code IS NOT NULL GROUP BY code HAVING COUNT(*) > 1";

impl Store {
    /// Replaces the directory with what a refresh read whole, in one transaction.
    pub fn replace_directory(
        &mut self,
        entries: &[DirectoryEntry],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        tx.execute("DELETE FROM facility", [])
            .map_err(sql("clear the directory"))?;
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO facility (resource, code, name, active, why) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (resource) DO UPDATE SET code = ?2, name = ?3, active = ?4, why = ?5",
                )
                .map_err(sql("save the directory"))?;
            for e in entries {
                match &e.read {
                    Ok(f) => insert.execute(params![
                        e.resource,
                        f.code.as_str(),
                        f.name,
                        f.active,
                        None::<String>
                    ]),
                    Err((code, why)) => insert.execute(params![
                        e.resource,
                        code.as_ref().map(FacilityCode::as_str),
                        None::<String>,
                        None::<bool>,
                        why
                    ]),
                }
                .map_err(sql("save the directory"))?;
            }
        }
        tx.execute(
            "INSERT INTO facility_refresh (id, at) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET at = ?1",
            [now],
        )
        .map_err(sql("save the directory"))?;
        tx.commit().map_err(sql("commit"))
    }

    /// When the directory was last read whole.
    pub fn directory_refreshed_at(&self) -> Result<Option<Timestamp>, StoreError> {
        self.conn
            .query_row("SELECT at FROM facility_refresh WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("read the directory"))
    }

    /// The entries not offered, and why, by resource: for operators to find what the
    /// network's directory holds that the box cannot understand.
    pub fn directory_not_offered(&self) -> Result<Vec<NotOffered>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT resource, code, COALESCE(why, ?1) FROM facility
                 WHERE why IS NOT NULL OR code IN ({SHARED_CODES})
                 ORDER BY resource"
            ))
            .map_err(sql("read the directory"))?;
        stmt.query_map([SHARED_CODE], |r| {
            Ok(NotOffered {
                resource: r.get(0)?,
                code: r.get(1)?,
                why: r.get(2)?,
            })
        })
        .map_err(sql("read the directory"))?
        .collect::<Result<_, _>>()
        .map_err(sql("read the directory"))
    }

    /// The directory as the console offers it.
    pub fn directory(&self) -> Result<Directory, StoreError> {
        let read = sql("read the directory");
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT code, name, active FROM facility
                 WHERE why IS NULL AND code NOT IN ({SHARED_CODES})
                 ORDER BY name, code"
            ))
            .map_err(sql("read the directory"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .map_err(sql("read the directory"))?;
        let mut facilities = Vec::new();
        for row in rows {
            let (code, name, active) = row.map_err(sql("read the directory"))?;
            // Written from a checked facility; a row that no longer checks is not offered.
            if let Ok(code) = FacilityCode::try_from(code) {
                facilities.push(Facility { code, name, active });
            }
        }
        let unreadable: i64 = self
            .conn
            .query_row(
                &format!(
                    "SELECT COUNT(*) FROM facility WHERE why IS NOT NULL OR code IN ({SHARED_CODES})"
                ),
                [],
                |r| r.get(0),
            )
            .map_err(read)?;
        Ok(Directory {
            facilities,
            unreadable: u64::try_from(unreadable).unwrap_or(0),
            refreshed_at: self.directory_refreshed_at()?,
        })
    }
}
