//! Shared helpers of the sync tests: a consent gate with scripted answers, and the tree a
//! replica must converge to.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use consent::client::{Category, Changes, Decided, Decision, DenyReason, Gate, GateError, Release};

/// A consent gate whose answers the test sets: permitted patients (all categories), a
/// change sequence, and freshness.
#[derive(Debug, Default)]
pub struct ScriptedGate {
    pub permitted: BTreeSet<String>,
    pub withdrawn: BTreeSet<String>,
    pub fresh: bool,
    /// (seq, patient) of every change.
    pub log: Vec<(i64, String)>,
    pub asked: u64,
    /// Every decision answered, by its audit number (1, 2, ...): patient, category, decision.
    pub decisions: Vec<(String, Category, Decision)>,
    /// Every release recorded.
    pub releases: Vec<Release>,
    /// While set, recording a release fails (the consent service is unreachable).
    pub releases_fail: bool,
}

impl ScriptedGate {
    pub fn new(permitted: &[&str]) -> ScriptedGate {
        let mut g = ScriptedGate {
            fresh: true,
            ..ScriptedGate::default()
        };
        for p in permitted {
            g.permit(p);
        }
        g
    }

    fn bump(&mut self, patient: &str) {
        let seq = self.log.last().map_or(1, |(s, _)| s + 1);
        self.log.push((seq, patient.to_owned()));
    }

    pub fn permit(&mut self, patient: &str) {
        self.withdrawn.remove(patient);
        self.permitted.insert(patient.to_owned());
        self.bump(patient);
    }

    pub fn withdraw(&mut self, patient: &str) {
        self.permitted.remove(patient);
        self.withdrawn.insert(patient.to_owned());
        self.bump(patient);
    }
}

impl Gate for ScriptedGate {
    fn decide(&mut self, patient: &str, category: Category) -> Result<Decided, GateError> {
        self.asked += 1;
        // As the consent service: a withdrawal known here is answered even from a stale
        // cache; anything else waits for a fresh one.
        let decision = if self.withdrawn.contains(patient) {
            Decision::Deny(DenyReason::Withdrawn)
        } else if !self.fresh {
            Decision::Deny(DenyReason::CacheStale)
        } else if self.permitted.contains(patient) {
            Decision::Permit
        } else {
            Decision::Deny(DenyReason::NoConsent)
        };
        self.decisions
            .push((patient.to_owned(), category, decision));
        Ok(Decided {
            decision,
            audit: i64::try_from(self.decisions.len()).unwrap(),
        })
    }

    fn released(&mut self, release: &Release) -> Result<(), GateError> {
        if self.releases_fail {
            return Err(GateError::Io(std::io::Error::other(
                "scripted: unreachable",
            )));
        }
        self.releases.push(release.clone());
        Ok(())
    }

    fn changes(&mut self, since: i64) -> Result<Changes, GateError> {
        let patients: Vec<String> = self
            .log
            .iter()
            .filter(|(s, _)| *s > since)
            .map(|(_, p)| p.clone())
            .collect();
        Ok(Changes {
            seq: self.log.last().map_or(since, |(s, _)| (*s).max(since)),
            patients,
            fresh: self.fresh,
        })
    }
}

/// Every file under `root` (relative path → SHA-256), hidden temporaries included.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    ssmix2::build::digests(root)
}

/// What the replica must hold (see [`ssmix2_sync::sync::expected_replica`]).
pub fn expected(storage: &Path, permitted: &BTreeSet<String>) -> BTreeMap<String, String> {
    ssmix2_sync::sync::expected_replica(storage, |p| permitted.contains(p)).unwrap()
}

/// The defaults of the sync tests for `storage`: nothing to settle, deletions confirmed by
/// the next scan, the delete policy, a local storage.
pub fn sync_settings(storage: &Path) -> ssmix2_sync::sync::Settings {
    ssmix2_sync::sync::Settings {
        storage: storage.to_owned(),
        settle: std::time::Duration::ZERO,
        confirm_deletion: std::time::Duration::ZERO,
        recheck: std::time::Duration::from_secs(3600),
        withdrawal: tsunagi_config::WithdrawalPolicy::Delete,
        facility: "1311234567".into(),
        transaction_storage: None,
        share: false,
    }
}
