//! The forwarder's round with the consent service against a scripted gate: no root, no
//! socket.

use std::collections::BTreeMap;

use consent::client::{Changes, DenyReason, GateError};

use super::*;
use crate::spool::{Committed, Meta};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const COMPREHENSIVE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";
const PDF: &str = "1.2.840.10008.5.1.4.1.1.104.1";
const PRIVATE: &str = "1.2.392.200036.9116.7.8.1.1.1";
const NOW: i64 = 1_000_000;

/// A consent service with scripted answers: a decision per (patient, category) (no entry:
/// no consent), the change feed, network IDs; every question recorded.
#[derive(Debug, Default)]
struct ScriptedGate {
    answers: BTreeMap<(String, Category), Decision>,
    network_ids: BTreeMap<String, String>,
    /// (seq, patient) of every change.
    log: Vec<(i64, String)>,
    asked: Vec<(String, Category)>,
    identities_asked: Vec<String>,
    released: Vec<Release>,
    /// Patient IDs the service refuses decisions about (as it does an ID its model does not
    /// take).
    refused: Vec<String>,
    /// Patient IDs the service refuses identity lookups of.
    refused_identities: Vec<String>,
    /// Whether the service is unreachable.
    down: bool,
}

impl ScriptedGate {
    fn answer(&mut self, patient: &str, category: Category, decision: Decision) {
        self.answers
            .insert((patient.to_owned(), category), decision);
    }

    fn change(&mut self, patient: &str) {
        let seq = self.log.last().map_or(1, |(s, _)| s + 1);
        self.log.push((seq, patient.to_owned()));
    }
}

impl Gate for ScriptedGate {
    fn decide(&mut self, patient: &str, category: Category) -> Result<Decided, GateError> {
        self.asked.push((patient.to_owned(), category));
        if self.down {
            return Err(GateError::Io(std::io::ErrorKind::ConnectionReset.into()));
        }
        if self.refused.iter().any(|p| p == patient) {
            return Err(GateError::Refused(
                "patient: a patient ID may only contain letters, digits, `-` and `.`".into(),
            ));
        }
        let decision = self
            .answers
            .get(&(patient.to_owned(), category))
            .copied()
            .unwrap_or(Decision::Deny(DenyReason::NoConsent));
        Ok(Decided {
            decision,
            audit: i64::try_from(self.asked.len()).unwrap_or(i64::MAX),
        })
    }

    fn changes(&mut self, since: i64) -> Result<Changes, GateError> {
        Ok(Changes {
            seq: self.log.last().map_or(since, |(s, _)| (*s).max(since)),
            patients: self
                .log
                .iter()
                .filter(|(s, _)| *s > since)
                .map(|(_, p)| p.clone())
                .collect(),
            fresh: true,
        })
    }

    fn released(&mut self, release: &Release) -> Result<(), GateError> {
        self.released.push(release.clone());
        Ok(())
    }
}

impl Identities for ScriptedGate {
    fn network_id(&mut self, patient: &str) -> Result<Option<String>, GateError> {
        self.identities_asked.push(patient.to_owned());
        if self.refused_identities.iter().any(|p| p == patient) {
            return Err(GateError::Refused(
                "network-id-of: a patient ID may only contain letters, digits, `-` and `.`".into(),
            ));
        }
        Ok(self.network_ids.get(patient).cloned())
    }

    fn local_id(&mut self, network_id: &str) -> Result<Option<String>, GateError> {
        Ok(self
            .network_ids
            .iter()
            .find(|(_, n)| *n == network_id)
            .map(|(p, _)| p.clone()))
    }
}

/// Queues an instance (`patient` None: no PatientID); its queue id.
fn queue(spool: &Spool, class: &str, patient: Option<&str>) -> i64 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut incoming = spool.begin().unwrap();
    incoming.write(b"a data set").unwrap();
    let meta = Meta {
        sop_class: class.to_owned(),
        sop_instance: format!("1.2.826.0.1.3680043.9.7777.9.{n}"),
        transfer_syntax: "1.2.840.10008.1.2.1".to_owned(),
        calling_ae: "CT".to_owned(),
        patient_id: patient.map(str::to_owned),
        study_uid: None,
    };
    match incoming.commit(&meta, NOW).unwrap() {
        Committed::Queued(id) => id,
        other => panic!("{other:?}"),
    }
}

fn round(gate: &mut ScriptedGate, spool: &Spool, seq: i64) -> Round {
    gate_round(gate, spool, seq, 86_400, None, 1000, NOW).unwrap()
}

fn ids(round: &Round) -> Vec<i64> {
    round.permitted.iter().map(|o| o.queued.id).collect()
}

fn held(spool: &Spool) -> BTreeMap<i64, String> {
    spool.held_reasons().unwrap().into_iter().collect()
}

fn spool() -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    (dir, spool)
}

#[test]
fn a_report_is_asked_as_documents_a_ct_as_images_and_a_private_class_is_held_unasked() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.answer("0001", Category::Images, Decision::Permit);
    gate.answer("0001", Category::Documents, Decision::Permit);
    let ct = queue(&spool, CT, Some("0001"));
    let sr = queue(&spool, COMPREHENSIVE_SR, Some("0001"));
    let pdf = queue(&spool, PDF, Some("0001"));
    let private = queue(&spool, PRIVATE, Some("0001"));
    let r = round(&mut gate, &spool, 0);
    assert_eq!(ids(&r), vec![ct, sr, pdf]);
    assert_eq!(
        gate.asked,
        vec![
            ("0001".to_owned(), Category::Images),
            ("0001".to_owned(), Category::Documents),
        ]
    );
    assert_eq!(
        held(&spool),
        BTreeMap::from([(private, "no data category covers this SOP class".to_owned())])
    );
}

#[test]
fn a_report_of_a_patient_whose_consent_covers_only_images_is_held_category_excluded() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.answer("0001", Category::Images, Decision::Permit);
    gate.answer(
        "0001",
        Category::Documents,
        Decision::Deny(DenyReason::CategoryExcluded),
    );
    let ct = queue(&spool, CT, Some("0001"));
    let sr = queue(&spool, COMPREHENSIVE_SR, Some("0001"));
    let r = round(&mut gate, &spool, 0);
    assert_eq!(ids(&r), vec![ct]);
    assert_eq!(
        held(&spool),
        BTreeMap::from([(sr, "category-excluded".to_owned())])
    );
}

#[test]
fn denied_instances_are_held_with_the_reason_and_released_by_the_change_feed() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.answer(
        "0001",
        Category::Images,
        Decision::Deny(DenyReason::Withdrawn),
    );
    let withdrawn = queue(&spool, CT, Some("0001"));
    let unknown = queue(&spool, CT, Some("0002"));
    let anonymous = queue(&spool, CT, None);
    let r = round(&mut gate, &spool, 0);
    assert!(r.permitted.is_empty());
    assert_eq!(
        held(&spool),
        BTreeMap::from([
            (withdrawn, "withdrawn".to_owned()),
            (unknown, "no-consent".to_owned()),
            (anonymous, "no PatientID in the data set".to_owned()),
        ])
    );
    // Held instances are not asked about again until their patient's consent changes.
    let asked = gate.asked.len();
    let again = round(&mut gate, &spool, r.seq);
    assert!(again.permitted.is_empty());
    assert_eq!(gate.asked.len(), asked);
    // 0002 consents: the feed releases their instance, which goes; the others stay held.
    gate.answer("0002", Category::Images, Decision::Permit);
    gate.change("0002");
    let released = round(&mut gate, &spool, again.seq);
    assert_eq!(ids(&released), vec![unknown]);
    assert_eq!(released.seq, 1);
    assert_eq!(held(&spool).len(), 2);
}

#[test]
fn transient_denies_are_retried_later_not_held() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.answer(
        "0001",
        Category::Images,
        Decision::Deny(DenyReason::CacheStale),
    );
    gate.answer(
        "0002",
        Category::Images,
        Decision::Deny(DenyReason::ClockBehind),
    );
    let a = queue(&spool, CT, Some("0001"));
    let b = queue(&spool, CT, Some("0002"));
    let r = round(&mut gate, &spool, 0);
    assert!(r.permitted.is_empty());
    assert!(
        held(&spool).is_empty(),
        "not held: nothing is known about the consent"
    );
    // Not ready again until the retry time; then asked again, and sent once permitted.
    assert!(spool.ready(NOW, 10).unwrap().is_empty());
    let later = spool.ready(NOW + TRANSIENT_RETRY, 10).unwrap();
    assert_eq!(later.iter().map(|q| q.id).collect::<Vec<_>>(), vec![a, b]);
    gate.answer("0001", Category::Images, Decision::Permit);
    let asked = gate.asked.len();
    let r = gate_round(
        &mut gate,
        &spool,
        r.seq,
        86_400,
        None,
        1000,
        NOW + TRANSIENT_RETRY,
    )
    .unwrap();
    assert_eq!(ids(&r), vec![a]);
    assert_eq!(gate.asked.len(), asked + 2);
}

#[test]
fn one_question_per_patient_and_category_per_round() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    for p in ["0001", "0002"] {
        gate.answer(p, Category::Images, Decision::Permit);
        gate.answer(p, Category::Documents, Decision::Permit);
    }
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(queue(&spool, CT, Some("0001")));
        queued.push(queue(&spool, COMPREHENSIVE_SR, Some("0001")));
        queued.push(queue(&spool, CT, Some("0002")));
    }
    let r = round(&mut gate, &spool, 0);
    assert_eq!(ids(&r), queued);
    let mut asked = gate.asked.clone();
    asked.sort();
    assert_eq!(
        asked,
        vec![
            ("0001".to_owned(), Category::Images),
            ("0001".to_owned(), Category::Documents),
            ("0002".to_owned(), Category::Images),
        ]
    );
    // The next round asks again: a decision is never carried over.
    for id in &queued {
        spool.delivered(*id).unwrap();
    }
    queue(&spool, CT, Some("0001"));
    round(&mut gate, &spool, r.seq);
    assert_eq!(gate.asked.len(), 4);
}

#[test]
fn a_permitted_instance_waits_for_its_patients_network_id_asked_once_per_round() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.answer("0001", Category::Images, Decision::Permit);
    let a = queue(&spool, CT, Some("0001"));
    let b = queue(&spool, CT, Some("0001"));
    let t = Translation {
        network_issuer: "NET".to_owned(),
        network_oid: "2.999.1".to_owned(),
        facility_code: "1312345678".to_owned(),
        header_limit: 1 << 20,
    };
    let r = gate_round(&mut gate, &spool, 0, 86_400, Some(&t), 1000, NOW).unwrap();
    assert!(r.permitted.is_empty());
    assert_eq!(gate.identities_asked, vec!["0001".to_owned()]);
    assert!(held(&spool).is_empty());
    assert!(spool.ready(NOW, 10).unwrap().is_empty());
    assert_eq!(spool.ready(NOW + IDENTITY_RETRY, 10).unwrap().len(), 2);
    // The spooled bytes are no data set: once the ID is known, the rewrite fails and the
    // instance is held with the reason (never sent untranslated).
    gate.network_ids
        .insert("0001".to_owned(), "NET-1".to_owned());
    let r = gate_round(
        &mut gate,
        &spool,
        0,
        86_400,
        Some(&t),
        1000,
        NOW + IDENTITY_RETRY,
    )
    .unwrap();
    assert!(r.permitted.is_empty());
    let reasons = held(&spool);
    assert_eq!(reasons.keys().copied().collect::<Vec<_>>(), vec![a, b]);
    assert!(
        reasons.values().all(|r| r.starts_with("cannot translate")),
        "{reasons:?}"
    );
}

#[test]
fn the_round_reports_the_feed_position_its_decisions_were_made_after() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.change("0009");
    gate.change("0008");
    let r = round(&mut gate, &spool, 0);
    assert_eq!(r.seq, 2);
    assert_eq!(round(&mut gate, &spool, r.seq).seq, 2);
}

#[test]
fn an_id_the_consent_service_refuses_is_held_and_the_round_goes_on_for_the_others() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.refused.push("AB_01".to_owned());
    gate.answer("0001", Category::Images, Decision::Permit);
    // The odd ID first, as the oldest in the queue (head of the line), then 50 others.
    let odd = queue(&spool, CT, Some("AB_01"));
    let odd_again = queue(&spool, CT, Some("AB_01"));
    let others: Vec<i64> = (0..50).map(|_| queue(&spool, CT, Some("0001"))).collect();
    let r = round(&mut gate, &spool, 0);
    assert_eq!(ids(&r), others);
    let why = "the consent service refused the question: patient: a patient ID may only contain letters, digits, `-` and `.`";
    assert_eq!(
        held(&spool),
        BTreeMap::from([(odd, why.to_owned()), (odd_again, why.to_owned())])
    );
    // Asked once for the refused ID in the round, not once per instance.
    assert_eq!(gate.asked.iter().filter(|(p, _)| p == "AB_01").count(), 1);
}

#[test]
fn an_identity_the_consent_service_refuses_is_held_and_the_round_goes_on() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate::default();
    gate.answer("0001", Category::Images, Decision::Permit);
    gate.answer("0002", Category::Images, Decision::Permit);
    gate.refused_identities.push("0001".to_owned());
    let t = Translation {
        network_issuer: "NET".to_owned(),
        network_oid: "2.999.1".to_owned(),
        facility_code: "1312345678".to_owned(),
        header_limit: 1 << 20,
    };
    let first = queue(&spool, CT, Some("0001"));
    let second = queue(&spool, CT, Some("0002"));
    gate_round(&mut gate, &spool, 0, 86_400, Some(&t), 1000, NOW).unwrap();
    // 0001 held with the refusal; 0002 was asked about after it (it waits for its ID).
    assert_eq!(
        held(&spool),
        BTreeMap::from([(
            first,
            "the consent service refused the question: network-id-of: a patient ID may only contain letters, digits, `-` and `.`".to_owned()
        )])
    );
    assert_eq!(
        gate.identities_asked,
        vec!["0001".to_owned(), "0002".to_owned()]
    );
    assert_eq!(spool.ready(NOW + IDENTITY_RETRY, 10).unwrap()[0].id, second);
}

#[test]
fn an_unreachable_consent_service_ends_the_round_and_sends_nothing() {
    let (_dir, spool) = spool();
    let mut gate = ScriptedGate {
        down: true,
        ..ScriptedGate::default()
    };
    let id = queue(&spool, CT, Some("0001"));
    assert!(matches!(
        gate_round(&mut gate, &spool, 0, 86_400, None, 1000, NOW),
        Err(RoundError::Gate(GateError::Io(_)))
    ));
    assert!(held(&spool).is_empty(), "nothing held on a failure to ask");
    assert_eq!(spool.ready(NOW, 10).unwrap()[0].id, id);
}

#[test]
fn a_refused_association_lowers_the_parallelism_and_it_recovers_one_at_a_time() {
    let t0 = std::time::Instant::now();
    let mut p = Parallelism::new(4);
    assert_eq!(p.now_at(t0), 4);
    // Every association opened: nothing changes.
    assert_eq!(p.observe_at(4, 0, t0), None);
    // None opened: an outage, not a limit.
    assert_eq!(p.observe_at(0, 4, t0), None);
    assert_eq!(p.now_at(t0), 4);
    // One worked, three did not: one from now on.
    assert_eq!(p.observe_at(1, 3, t0), Some(1));
    assert_eq!(p.now_at(t0 + PARALLELISM_RECOVERY / 2), 1);
    // Later, one more is tried; it fails again: back to one, and the next try as much later.
    let t1 = t0 + PARALLELISM_RECOVERY;
    assert_eq!(p.now_at(t1), 2);
    assert_eq!(p.observe_at(1, 1, t1), Some(1));
    assert_eq!(p.now_at(t1 + PARALLELISM_RECOVERY / 2), 1);
    // Tries that succeed climb back to the configured number, and not beyond.
    let mut t = t1;
    for want in [2, 3, 4, 4] {
        t += PARALLELISM_RECOVERY;
        assert_eq!(p.now_at(t), want);
        assert_eq!(p.observe_at(want, 0, t), None);
    }
    assert_eq!(Parallelism::new(0).now_at(t0), 1);
}
