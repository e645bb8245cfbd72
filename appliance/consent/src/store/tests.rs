use std::collections::BTreeSet;
use std::time::Duration;

use super::*;
use crate::decide::DenyReason;

const T0: Timestamp = 1_795_273_200;

fn fac(code: &str) -> FacilityCode {
    FacilityCode::try_from(code).unwrap()
}

fn store(dir: &Path) -> Store {
    let key = AuditKey::load_or_create(&dir.join("audit.key")).unwrap();
    Store::open(&dir.join("consent.db"), fac("1312345678"), key).unwrap()
}

fn patient(id: &str) -> Patient {
    Patient {
        id: id.parse().unwrap(),
        family_kanji: "山田".into(),
        given_kanji: "花子".into(),
        family_kana: "ヤマダ".into(),
        given_kana: "ハナコ".into(),
        birth_date: "1950-04-01".into(),
        sex: Sex::Female,
        network_id: None,
    }
}

fn new_consent(id: &str) -> NewConsent {
    NewConsent {
        patient: id.parse().unwrap(),
        scope: Scope::AllParticipants,
        excluded: BTreeSet::new(),
        categories: Category::ALL.into_iter().collect(),
        valid_from: T0 - 86_400,
        valid_until: None,
        evidence: None,
    }
}

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn record_change_withdraw_and_decide() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    let id: PatientId = "0001234".parse().unwrap();
    let to = Recipient::Facility(fac("1312345679"));
    assert!(matches!(
        s.record_consent(new_consent("0001234"), T0),
        Err(StoreError::UnknownPatient { .. })
    ));
    s.upsert_patient(&patient("0001234"), T0).unwrap();
    s.set_last_pull(T0).unwrap();
    assert_eq!(
        s.decide(&id, &to, Category::Images, T0, T0, DAY).unwrap(),
        Decision::Deny(DenyReason::NoConsent)
    );
    s.record_consent(new_consent("0001234"), T0).unwrap();
    assert_eq!(
        s.decide(&id, &to, Category::Images, T0, T0, DAY).unwrap(),
        Decision::Permit
    );
    // 公開設定: only facility 1312345678 from now on.
    s.change_consent(&id, T0 + 1, |c| {
        c.scope = Scope::Facilities([fac("1312345678")].into());
    })
    .unwrap();
    assert_eq!(
        s.decide(&id, &to, Category::Images, T0, T0, DAY).unwrap(),
        Decision::Deny(DenyReason::RecipientNotDisclosed)
    );
    s.withdraw(&id, "staff-1", T0 + 2).unwrap();
    assert_eq!(
        s.decide(&id, &Recipient::Hub, Category::Images, T0, T0, DAY)
            .unwrap(),
        Decision::Deny(DenyReason::Withdrawn)
    );
    assert!(matches!(
        s.withdraw(&id, "staff-1", T0 + 3),
        Err(StoreError::AlreadyWithdrawn { .. })
    ));
    // A new consent after the withdrawal.
    s.record_consent(new_consent("0001234"), T0 + 4).unwrap();
    assert_eq!(
        s.decide(&id, &to, Category::Images, T0, T0, DAY).unwrap(),
        Decision::Permit
    );
    // Everything recorded waits for the push, in order.
    let pending = s.pending().unwrap();
    let kinds: Vec<&str> = pending.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["patient", "consent", "consent", "consent", "consent"]
    );
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id: PatientId = "0000001".parse().unwrap();
    {
        let mut s = store(dir.path());
        s.upsert_patient(&patient("0000001"), T0).unwrap();
        s.add_link(&id, &fac("1312345679"), "A-77", T0).unwrap();
        s.record_consent(new_consent("0000001"), T0).unwrap();
    }
    let s = store(dir.path());
    assert_eq!(s.patient(&id).unwrap().unwrap().family_kana, "ヤマダ");
    let links = s.links(&id).unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!(
        links[0].system,
        "urn:oid:1.2.392.100495.20.3.51.11312345679"
    );
    assert_eq!(s.records(&id).unwrap().len(), 1);
    assert_eq!(s.pending().unwrap().len(), 3);
}

fn audited(dir: &Path, n: usize) -> Store {
    let mut s = store(dir);
    s.upsert_patient(&patient("0001234"), T0).unwrap();
    s.record_consent(new_consent("0001234"), T0).unwrap();
    s.set_last_pull(T0).unwrap();
    let id: PatientId = "0001234".parse().unwrap();
    for i in 0..n {
        let category = Category::ALL[i % Category::ALL.len()];
        s.decide(&id, &Recipient::Hub, category, T0, T0, DAY)
            .unwrap();
    }
    s
}

#[test]
fn an_untouched_audit_trail_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let s = audited(dir.path(), 5);
    assert_eq!(s.verify_audit().unwrap(), AuditCheck::Intact { rows: 5 });
    // No patient ID in the trail: only a keyed hash.
    let ids: Vec<String> = s
        .connection()
        .prepare("SELECT patient_hash FROM audit")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(ids.iter().all(|h| !h.contains("0001234") && h.len() == 32));
}

#[test]
fn an_altered_row_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = audited(dir.path(), 5);
    s.connection()
        .execute(
            "UPDATE audit SET decision = 'deny', reason = 'withdrawn' WHERE seq = 3",
            [],
        )
        .unwrap();
    assert_eq!(
        s.verify_audit().unwrap(),
        AuditCheck::Broken {
            row: 3,
            problem: "row 3 was altered".into()
        }
    );
}

#[test]
fn removed_rows_are_named_in_the_middle_at_the_start_and_at_the_end() {
    for (delete, row, problem) in [
        ("seq = 2", 2, "row 2 was removed"),
        ("seq = 1", 1, "row 1 was removed"),
        ("seq IN (2, 3)", 2, "rows 2 to 3 were removed"),
        ("seq = 5", 5, "rows 5 to 5 were removed from the end"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let s = audited(dir.path(), 5);
        s.connection()
            .execute(&format!("DELETE FROM audit WHERE {delete}"), [])
            .unwrap();
        assert_eq!(
            s.verify_audit().unwrap(),
            AuditCheck::Broken {
                row,
                problem: problem.into()
            },
            "{delete}"
        );
    }
}

#[test]
fn a_cut_tail_stays_visible_after_new_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = audited(dir.path(), 5);
    s.connection()
        .execute("DELETE FROM audit WHERE seq = 5", [])
        .unwrap();
    let id: PatientId = "0001234".parse().unwrap();
    s.decide(&id, &Recipient::Hub, Category::Images, T0, T0, DAY)
        .unwrap();
    assert_eq!(
        s.verify_audit().unwrap(),
        AuditCheck::Broken {
            row: 5,
            problem: "row 5 was removed".into()
        }
    );
}

#[test]
fn a_recomputed_chain_without_the_key_does_not_verify() {
    let dir = tempfile::tempdir().unwrap();
    let s = audited(dir.path(), 3);
    drop(s);
    // Someone with the database but not the key rebuilds the chain with another key.
    std::fs::remove_file(dir.path().join("audit.key")).unwrap();
    let forged = audited(tempfile::tempdir().unwrap().path(), 0);
    drop(forged);
    let s = store(dir.path());
    assert!(matches!(
        s.verify_audit().unwrap(),
        AuditCheck::Broken { row: 1, .. }
    ));
}

#[test]
fn audit_key_permissions_are_enforced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.key");
    AuditKey::load_or_create(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        AuditKey::load_or_create(&path),
        Err(StoreError::KeyPermissions { .. })
    ));
}

#[test]
fn the_change_feed_lists_patients_whose_consent_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    for id in ["0001", "0002", "0003"] {
        s.upsert_patient(&patient(id), T0).unwrap();
    }
    let (seq, patients, more) = s.changes_since(0, 10).unwrap();
    assert_eq!((seq, patients.len(), more), (0, 0, false));
    s.record_consent(new_consent("0001"), T0).unwrap();
    s.record_consent(new_consent("0002"), T0).unwrap();
    let (seq, patients, more) = s.changes_since(0, 10).unwrap();
    assert_eq!(
        patients,
        vec![
            "0001".parse().unwrap(),
            "0002".parse::<PatientId>().unwrap()
        ]
    );
    assert!(!more);
    // Nothing new since.
    assert_eq!(s.changes_since(seq, 10).unwrap().1.len(), 0);
    // A withdrawal is a change; paging stops at the limit.
    s.withdraw(&"0001".parse().unwrap(), "staff", T0 + 1)
        .unwrap();
    s.record_consent(new_consent("0003"), T0 + 1).unwrap();
    let (next, page, more) = s.changes_since(seq, 1).unwrap();
    assert_eq!((page, more), (vec!["0001".parse().unwrap()], true));
    let (_, page, more) = s.changes_since(next, 1).unwrap();
    assert_eq!((page, more), (vec!["0003".parse().unwrap()], false));
}

fn unreadable(resource: &str, patient: &str, version: &str) -> Unreadable {
    Unreadable {
        resource: resource.into(),
        patient: patient.parse().unwrap(),
        version_id: Some(version.into()),
        last_updated: Some("2026-11-22T04:05:00.000001Z".into()),
        why: "a modifierExtension the box does not understand".into(),
    }
}

#[test]
fn an_unreadable_network_consent_denies_until_a_readable_version_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    let id: PatientId = "0001234".parse().unwrap();
    let to = Recipient::Facility(fac("1312345679"));
    s.upsert_patient(&patient("0001234"), T0).unwrap();
    s.upsert_patient(&patient("0005678"), T0).unwrap();
    s.record_consent(new_consent("0001234"), T0).unwrap();
    s.set_last_pull(T0).unwrap();
    assert_eq!(
        s.decide(&id, &to, Category::Images, T0, T0, DAY).unwrap(),
        Decision::Permit
    );
    let (seq, _, _) = s.changes_since(0, 10).unwrap();
    assert!(
        s.record_unreadable(&unreadable("Consent/a", "0001234", "1"), T0)
            .unwrap()
    );
    let denied = Decision::Deny(DenyReason::UnreadableNetworkConsent);
    assert_eq!(
        s.decide(&id, &to, Category::Images, T0, T0, DAY).unwrap(),
        denied
    );
    assert_eq!(s.participation(&id, T0, DAY).unwrap(), denied);
    assert_eq!(s.unreadable_patients().unwrap(), 1);
    let (seq2, patients, _) = s.changes_since(seq, 10).unwrap();
    assert_eq!(
        patients,
        vec![id.clone()],
        "the change feed lists the patient"
    );
    // The same version again is nothing new; the other patient is not affected.
    assert!(
        !s.record_unreadable(&unreadable("Consent/a", "0001234", "1"), T0)
            .unwrap()
    );
    assert_eq!(
        s.changes_since(seq2, 10).unwrap().1,
        Vec::<PatientId>::new()
    );
    // A readable version of the same resource lifts it, and is a change.
    assert!(s.clear_unreadable("Consent/a").unwrap());
    assert!(!s.clear_unreadable("Consent/a").unwrap());
    assert_eq!(
        s.decide(&id, &to, Category::Images, T0, T0, DAY).unwrap(),
        Decision::Permit
    );
    assert_eq!(s.unreadable_patients().unwrap(), 0);
    assert_eq!(s.changes_since(seq2, 10).unwrap().1, vec![id]);
    // It is in the audit trail (as the patient's hash), and the trail verifies.
    let rows: i64 = s
        .connection()
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE decision = 'unreadable'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);
    assert!(matches!(
        s.verify_audit().unwrap(),
        AuditCheck::Intact { .. }
    ));
}

#[test]
fn the_change_feed_keeps_its_sequence_numbers_across_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consent.db");
    {
        // A database of the first schema, with two consent versions.
        let conn = tsunagi_state::open(&path, Durability::Acknowledging, &MIGRATIONS[..1]).unwrap();
        conn.execute_batch(
            "INSERT INTO patient (id, family_kanji, given_kanji, family_kana, given_kana, birth_date, sex, updated_at)
                VALUES ('0001', 'a', 'b', 'c', 'd', '1950-01-01', '\"female\"', 0);
             INSERT INTO consent (id, version, patient_id, created_seq, body) VALUES ('c1', 1, '0001', 1, '{}');
             INSERT INTO consent (id, version, patient_id, created_seq, body) VALUES ('c1', 2, '0001', 1, '{}');
             UPDATE sync_state SET cursor = '2026-11-22T04:05:00Z';",
        )
        .unwrap();
    }
    let mut s = store(dir.path());
    let (seq, patients, _) = s.changes_since(0, 10).unwrap();
    assert_eq!(
        (seq, patients.len()),
        (2, 1),
        "the old rowids are the numbers"
    );
    assert_eq!(s.changes_since(1, 10).unwrap().0, 2);
    assert_eq!(
        s.pull_cursor("Consent").unwrap().last_updated.as_deref(),
        Some("2026-11-22T04:05:00Z")
    );
    s.upsert_patient(&patient("0002"), T0).unwrap();
    s.record_consent(new_consent("0002"), T0).unwrap();
    let (next, patients, _) = s.changes_since(2, 10).unwrap();
    assert_eq!((next, patients), (3, vec!["0002".parse().unwrap()]));
}

fn sent_images<'a>(id: &'a PatientId, objects: &'a [String], decision: Option<i64>) -> Release<'a> {
    Release {
        patient: id,
        recipient: &Recipient::Hub,
        category: Category::Images,
        kind: consent_protocol::ReleaseKind::Sent,
        objects,
        decision,
    }
}

#[test]
fn a_release_is_one_chained_row_per_object_referring_to_its_decision() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = audited(dir.path(), 0);
    let id: PatientId = "0001234".parse().unwrap();
    let (decision, permit) = s
        .decide_audited(&id, &Recipient::Hub, Category::Images, T0, T0, DAY)
        .unwrap();
    assert_eq!(decision, Decision::Permit);
    let objects = ["dicom:1.2.3.1".to_owned(), "dicom:1.2.3.2".to_owned()];
    let last = s
        .record_release(&sent_images(&id, &objects, Some(permit)), T0)
        .unwrap();
    assert_eq!(last, permit + 2);
    let rows: Vec<(i64, String, String, String, Option<i64>, String)> = s
        .connection()
        .prepare("SELECT seq, decision, reason, object, decision_seq, patient_hash FROM audit WHERE seq > ?1 ORDER BY seq")
        .unwrap()
        .query_map([permit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 2);
    for (row, object) in rows.iter().zip(&objects) {
        assert_eq!(row.1, "sent");
        assert_eq!(row.2, "", "a verified decision");
        assert_eq!(&row.3, object);
        assert_eq!(row.4, Some(permit));
        assert_eq!(row.5, s.patient_hash(&id));
    }
    assert_eq!(
        s.verify_audit().unwrap(),
        AuditCheck::Intact { rows: permit + 2 }
    );
    // What left, or the decision it refers to, cannot be changed unnoticed.
    s.connection()
        .execute(
            "UPDATE audit SET object = 'dicom:9.9' WHERE seq = ?1",
            [permit + 1],
        )
        .unwrap();
    assert_eq!(
        s.verify_audit().unwrap(),
        AuditCheck::Broken {
            row: permit + 1,
            problem: format!("row {} was altered", permit + 1)
        }
    );
}

#[test]
fn a_release_without_a_permit_for_it_is_recorded_as_unverified() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = audited(dir.path(), 0);
    let id: PatientId = "0001234".parse().unwrap();
    // A permit for another category, a deny, a release row, no decision at all.
    let (_, other) = s
        .decide_audited(&id, &Recipient::Hub, Category::Orders, T0, T0, DAY)
        .unwrap();
    s.withdraw(&id, "desk", T0).unwrap();
    let (_, deny) = s
        .decide_audited(&id, &Recipient::Hub, Category::Images, T0, T0, DAY)
        .unwrap();
    let objects = ["dicom:1.2.3".to_owned()];
    for decision in [Some(other), Some(deny), Some(999), None] {
        let seq = s
            .record_release(&sent_images(&id, &objects, decision), T0)
            .unwrap();
        let reason: String = s
            .connection()
            .query_row("SELECT reason FROM audit WHERE seq = ?1", [seq], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(reason, "unverified-decision", "{decision:?}");
    }
    // A deletion refers to the denial that caused it, or to nothing (a file gone from the
    // storage); never to a permit.
    for (decision, want) in [
        (None, ""),
        (Some(deny), ""),
        (Some(other), "unverified-decision"),
    ] {
        let deleted = Release {
            kind: consent_protocol::ReleaseKind::Deleted,
            ..sent_images(&id, &objects, decision)
        };
        let seq = s.record_release(&deleted, T0).unwrap();
        let (kind, reason): (String, String) = s
            .connection()
            .query_row(
                "SELECT decision, reason FROM audit WHERE seq = ?1",
                [seq],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (kind.as_str(), reason.as_str()),
            ("deleted", want),
            "{decision:?}"
        );
    }
    assert!(matches!(
        s.verify_audit().unwrap(),
        AuditCheck::Intact { .. }
    ));
}

#[test]
fn deleting_the_whole_trail_and_head_is_found_against_the_acknowledged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = audited(dir.path(), 5);
    let head = s.audit_head().unwrap().unwrap();
    assert_eq!(head.seq, 5);
    s.set_audit_anchor(&head, T0).unwrap();
    assert_eq!(s.audit_diverges_from(&head).unwrap(), None);
    s.connection()
        .execute_batch("DELETE FROM audit; DELETE FROM audit_head;")
        .unwrap();
    // Without the anchor this verified as intact (zero rows).
    let check = s.verify_audit().unwrap();
    assert!(
        matches!(&check, AuditCheck::Broken { row: 5, problem } if problem.contains("reset or cut")),
        "{check:?}"
    );
    assert!(s.audit_diverges_from(&head).unwrap().is_some());
    // Growing a new trail past the checkpoint does not hide it: row 5 is another row.
    let id: PatientId = "0001234".parse().unwrap();
    for _ in 0..6 {
        s.decide(&id, &Recipient::Hub, Category::Images, T0, T0, DAY)
            .unwrap();
    }
    let why = s.audit_diverges_from(&head).unwrap().unwrap();
    assert!(why.contains("rewritten"), "{why}");
    // Recorded as a reset, it stays (a later anchor does not clear it).
    s.set_audit_reset(&head, &why, T0).unwrap();
    let new_head = s.audit_head().unwrap().unwrap();
    s.set_audit_anchor(&new_head, T0).unwrap();
    assert_eq!(
        s.audit_anchor().unwrap().unwrap().reset.as_deref(),
        Some(why.as_str())
    );
    assert_eq!(
        s.verify_audit().unwrap(),
        AuditCheck::Broken {
            row: 5,
            problem: why.clone()
        }
    );
    // Issue 17: the reset is a Security Alert owed to the ATNA audit trail, once (the
    // anchor that followed did not add another), and so is a failed `audit verify`.
    s.record_failed_verify(5, &why).unwrap();
    let events = s.pending_events(10).unwrap();
    let reasons: Vec<&str> = events
        .iter()
        .map(|(_, e)| match e {
            audit::protocol::Event::FailedAuditVerify { reason } => reason.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0]
            .starts_with("the consent audit trail does not continue the network's checkpoint: "),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].starts_with("the consent audit trail is broken at row 5"),
        "{}",
        reasons[1]
    );
    s.events_recorded(events[1].0).unwrap();
    assert!(s.pending_events(10).unwrap().is_empty());
}

/// Issue 17: every consent and identity change is owed to the ATNA audit trail, written with
/// the change itself, whoever makes it; a change names what changed, never patient data.
#[test]
fn every_consent_and_identity_change_waits_for_the_atna_trail() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path());
    let id: PatientId = "0001234".parse().unwrap();
    s.upsert_patient(&patient("0001234"), T0).unwrap();
    // The same demographics again: no change.
    s.upsert_patient(&patient("0001234"), T0 + 1).unwrap();
    s.upsert_patient(
        &Patient {
            birth_date: "1950-04-02".into(),
            ..patient("0001234")
        },
        T0 + 1,
    )
    .unwrap();
    s.record_consent(new_consent("0001234"), T0).unwrap();
    s.set_network_id(&id, "NET-0001234", T0).unwrap();
    s.add_link(&id, &fac("1312345679"), "K-77", T0).unwrap();
    s.withdraw(&id, "staff-1", T0 + 2).unwrap();
    s.record_unreadable(&unreadable("Consent/n-1", "0001234", "1"), T0 + 3)
        .unwrap();
    s.clear_unreadable("Consent/n-1").unwrap();
    let pending = s.pending_changes(100).unwrap();
    let seen: Vec<(&str, &str)> = pending
        .iter()
        .map(|c| (c.action.as_str(), c.what.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("C", "patient registered"),
            ("U", "demographics updated"),
            ("C", "consent active (version 1)"),
            ("U", "network ID assigned"),
            (
                "U",
                "identity linked: urn:oid:1.2.392.100495.20.3.51.11312345679"
            ),
            ("U", "consent withdrawn (version 2)"),
            ("U", "a network consent is unreadable: denied"),
            ("U", "an unreadable network consent was replaced"),
        ]
    );
    // Each names the patient under the network ID they have now.
    assert!(
        pending
            .iter()
            .all(|c| c.patient == "0001234" && c.network_id.as_deref() == Some("NET-0001234"))
    );
    // None carries the name or the birth date.
    assert!(
        pending
            .iter()
            .all(|c| !c.what.contains("山田") && !c.what.contains("1950"))
    );
    s.changes_recorded(pending[5].id).unwrap();
    assert_eq!(s.pending_changes(100).unwrap(), pending[6..]);
}
