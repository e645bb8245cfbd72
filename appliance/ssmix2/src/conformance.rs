//! The conformance report of a clinic's SS-MIX2 storage (SS-MIX2 の点検), as the sync
//! service keeps it after each cycle and the clinic console shows it: the files by status,
//! then each problem found, the worst first, with its words in Japanese and English and a
//! few of its files. The same content as `tsunagi ssmix2 check`, from the sync's index.
//!
//! The examples are paths in the storage, which name patients: the report is for the
//! clinic's staff (a file readable by the console alone), never for a log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::index::{Index, IndexError};
use crate::reason::{Reason, Severity};
use crate::scan::Summary;

/// How many files of each problem the report names.
pub const EXAMPLES: usize = 5;

/// The report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Conformance {
    /// When the cycle that made it finished (Unix seconds).
    pub at: i64,
    pub files: u64,
    /// `current`, `superseded`, `deleted`, `quarantined`: how many files each.
    pub by_status: BTreeMap<String, u64>,
    /// The worst first: quarantine, then anomalies, then warnings; more files first.
    pub problems: Vec<Problem>,
}

/// One kind of problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Problem {
    /// The reason's code (`BAD_NAME`, ...).
    pub code: String,
    /// `quarantine`, `anomaly` or `warning`.
    pub severity: String,
    pub count: u64,
    pub japanese: String,
    pub english: String,
    /// At most [`EXAMPLES`] of its files, paths inside the storage.
    pub examples: Vec<String>,
}

fn severity_word(s: Severity) -> &'static str {
    match s {
        Severity::Quarantine => "quarantine",
        Severity::Anomaly => "anomaly",
        Severity::Warning => "warning",
    }
}

impl Conformance {
    /// The report of what `index` holds, whose [`Index::summary`] is `summary` (a cycle
    /// has just made it), at `at`.
    pub fn of(index: &Index, summary: &Summary, at: i64) -> Result<Conformance, IndexError> {
        let mut problems = Vec::new();
        for (code, count) in &summary.by_reason {
            let Some(reason) = Reason::from_code(code) else {
                continue;
            };
            problems.push((
                reason,
                Problem {
                    code: (*code).to_owned(),
                    severity: severity_word(reason.severity()).to_owned(),
                    count: *count,
                    japanese: reason.describe_ja().to_owned(),
                    english: reason.describe_en().to_owned(),
                    examples: index.with_reason(code, EXAMPLES)?,
                },
            ));
        }
        problems.sort_by(|(a, pa), (b, pb)| {
            b.severity()
                .cmp(&a.severity())
                .then(pb.count.cmp(&pa.count))
                .then(a.cmp(b))
        });
        Ok(Conformance {
            at,
            files: summary.files,
            by_status: summary
                .by_status
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            problems: problems.into_iter().map(|(_, p)| p).collect(),
        })
    }

    /// How many files of a status.
    pub fn status(&self, status: &str) -> u64 {
        self.by_status.get(status).copied().unwrap_or(0)
    }
}
