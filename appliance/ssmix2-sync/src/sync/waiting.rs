//! What waits at the clinic (保留中): the storage's files not at the hub, each with why, as
//! the sync saw them after its last cycle ([`Syncer::waiting`]). The console shows it.
//!
//! Files of patients who have no consent, or withdrew it, are only counted: the storage is
//! the EMR's whole archive, and most of it never leaves by design. Listed, oldest first
//! (at most [`MAX_LISTED`]), are the files that wait for something the staff or the
//! network can change: a consent that does not cover them yet, a data type the network
//! does not take, a path that cannot be carried, a consent that cannot be confirmed for
//! now, a send that keeps failing. Files changed moments ago, and files queued without a
//! failure, are on their way and not listed.

use std::collections::HashMap;

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{SyncError, Syncer, now_nanos, sql};
use crate::replica::RelPath;
use consent::client::{Category, DenyReason};

/// The most files one report lists.
pub const MAX_LISTED: usize = 200;

/// Why a file waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// The consent denies it (its reason); sent by itself once a consent covers it.
    Consent(DenyReason),
    /// Not asked yet, or permitted before the consent cache went stale: asked (again) by
    /// itself once the cache is fresh.
    NotDecided,
    /// Its data type is not one the network takes (no category).
    NoCategory,
    /// Its path cannot be carried to the hub as it is.
    BadPath,
    /// Changed moments ago: sent once it has settled.
    Settling,
    /// Permitted and queued; the last attempt to send it failed (retried by itself).
    SendFailing,
    /// Permitted and queued.
    Queued,
    /// The staff discarded this version at the console: never sent.
    Discarded,
}

impl Why {
    /// Whether files waiting for this are listed one by one (else only counted).
    pub fn listed(self) -> bool {
        !matches!(
            self,
            Why::Consent(DenyReason::NoConsent | DenyReason::Withdrawn)
                | Why::Settling
                | Why::Queued
                | Why::Discarded
        )
    }
}

/// One file that waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Relative to the storage's root (it names the patient, the date and the data type).
    pub path: String,
    /// The SHA-256 of this version (what a requeue or discard names).
    pub sha256: String,
    pub patient_id: String,
    /// The SS-MIX2 data type (`OMP-01`, …).
    pub data_type: String,
    /// Its modification time (Unix seconds).
    pub since: i64,
    pub why: Why,
}

/// The files that wait, as the last cycle left them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waiting {
    /// When the report was made (Unix seconds).
    pub at: i64,
    /// How many files wait, for each reason, the most first.
    pub counts: Vec<(Why, u64)>,
    /// Oldest first, at most [`MAX_LISTED`], only reasons that are [`Why::listed`].
    pub files: Vec<File>,
    /// Listed-kind files beyond [`MAX_LISTED`].
    pub more: u64,
}

impl Syncer {
    /// The files not at the hub with their current content, and why, as of now: the cached
    /// decisions (a denial as the last answer; a permission only while `fresh`, the last
    /// cycle's consent cache), the outbox and the settle delay.
    pub fn waiting(&self, fresh: bool, at: i64) -> Result<Waiting, SyncError> {
        let mut decided: HashMap<(String, String), Option<DenyReason>> = HashMap::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT patient_id, category, verdict, reason FROM decisions")
                .map_err(sql("read decisions"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                })
                .map_err(sql("read decisions"))?;
            for row in rows {
                let (patient, category, verdict, reason) = row.map_err(sql("read decisions"))?;
                let denial = match (verdict.as_str(), reason) {
                    ("permit", _) => None,
                    (_, Some(r)) => match r.parse::<DenyReason>() {
                        Ok(r) => Some(r),
                        Err(_) => continue,
                    },
                    _ => continue,
                };
                decided.insert((patient, category), denial);
            }
        }
        let settle_ns = i128::try_from(self.settings.settle.as_nanos()).unwrap_or(i128::MAX);
        let now_ns = now_nanos();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT f.path, f.patient_id, f.data_type, f.mtime_ns,
                        (SELECT max(o.attempts) FROM outbox o
                          WHERE (o.op = 'put' AND o.path = f.path) OR (o.op = 'rename' AND o.dest = f.path)),
                        f.sha256,
                        EXISTS (SELECT 1 FROM discarded d WHERE d.path = f.path AND d.sha256 = f.sha256)
                 FROM idx.files f
                 WHERE f.status IN ('current','superseded','deleted') AND f.sha256 IS NOT NULL AND f.patient_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM published p WHERE p.path = f.path AND p.sha256 = f.sha256)
                 ORDER BY f.mtime_ns, f.path",
            )
            .map_err(sql("read what waits"))?;
        let rows = stmt
            .query_map(params![], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, bool>(6)?,
                ))
            })
            .map_err(sql("read what waits"))?;
        let mut counts: HashMap<Why, u64> = HashMap::new();
        let mut files = Vec::new();
        let mut more = 0;
        for row in rows {
            let (path, patient_id, data_type, mtime_ns, attempts, sha256, discarded) =
                row.map_err(sql("read what waits"))?;
            let category = Category::for_ssmix2(&data_type);
            let why = match (category, attempts) {
                // Discarded: a started send may still be undone at the hub; never sent.
                _ if discarded => Why::Discarded,
                (_, Some(n)) if n > 0 => Why::SendFailing,
                (_, Some(_)) => Why::Queued,
                (None, None) => Why::NoCategory,
                (Some(_), None) if now_ns.saturating_sub(i128::from(mtime_ns)) < settle_ns => {
                    Why::Settling
                }
                (Some(_), None) if RelPath::new(&path).is_err() => Why::BadPath,
                (Some(c), None) => {
                    match decided.get(&(patient_id.clone(), c.as_str().to_owned())) {
                        // The last answer, even from a stale cache: what the file waits for.
                        Some(Some(reason)) => Why::Consent(*reason),
                        // Permitted, planned at the next round of publications, unless the
                        // cache went stale since: then asked again once it is fresh.
                        Some(None) if fresh => Why::Queued,
                        Some(None) | None => Why::NotDecided,
                    }
                }
            };
            *counts.entry(why).or_default() += 1;
            if !why.listed() {
                continue;
            }
            if files.len() < MAX_LISTED {
                files.push(File {
                    path,
                    sha256,
                    patient_id,
                    data_type,
                    since: mtime_ns.div_euclid(1_000_000_000),
                    why,
                });
            } else {
                more += 1;
            }
        }
        let mut counts: Vec<(Why, u64)> = counts.into_iter().collect();
        // The most first; ties in a stable order.
        counts.sort_by_key(|(why, n)| (std::cmp::Reverse(*n), format!("{why:?}")));
        Ok(Waiting {
            at,
            counts,
            files,
            more,
        })
    }
}
