//! The forwarder's gate round against the real consent service on a Unix socket (no root).

use std::collections::BTreeSet;

use consent::model::{Category as ConsentCategory, Patient, PatientId, Scope, Sex};
use consent::store::{AuditCheck, AuditKey, NewConsent, Store};

use super::*;
use crate::forward::Outcome;
use crate::spool::{Committed, Meta};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

/// A consent store whose patient 0001234 permits images for the hub, fresh.
fn consent_store(dir: &std::path::Path) -> Store {
    let key = AuditKey::load_or_create(&dir.join("audit.key")).unwrap();
    let facility = tsunagi_config::FacilityCode::try_from("1312345678").unwrap();
    let mut store = Store::open(&dir.join("consent.db"), facility, key).unwrap();
    let now = consent::time::now();
    let pid: PatientId = "0001234".parse().unwrap();
    store
        .upsert_patient(
            &Patient {
                id: pid.clone(),
                family_kanji: "山田".into(),
                given_kanji: "花子".into(),
                family_kana: "ヤマダ".into(),
                given_kana: "ハナコ".into(),
                birth_date: "1950-04-01".into(),
                sex: Sex::Female,
                network_id: None,
            },
            now,
        )
        .unwrap();
    store
        .record_consent(
            NewConsent {
                patient: pid,
                scope: Scope::AllParticipants,
                excluded: BTreeSet::new(),
                categories: [ConsentCategory::Images].into(),
                valid_from: now - 86_400,
                valid_until: None,
                evidence: None,
            },
            now,
        )
        .unwrap();
    store.set_last_pull(now).unwrap();
    store
}

fn receive(spool: &Spool, uid: &str) -> i64 {
    let mut incoming = spool.begin().unwrap();
    incoming.write(b"DICM an instance").unwrap();
    let meta = Meta {
        sop_class: CT.into(),
        sop_instance: uid.into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        calling_ae: "MODALITY".into(),
        patient_id: Some("0001234".into()),
        study_uid: None,
    };
    match incoming.commit(&meta, 0).unwrap() {
        Committed::Queued(id) => id,
        other => panic!("{other:?}"),
    }
}

/// Issue 13 item 10: each instance delivered to the network PACS is a row in the consent
/// service's chained audit trail: its SOP Instance UID, the hub, and the permit it was
/// sent under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_instance_leaves_a_release_row_referring_to_the_permit_it_was_sent_under() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, stop, socket) =
        crate::testdata::consent_service(dir.path(), consent_store(dir.path()));
    let spool = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
    let ids = [receive(&spool, "1.2.3.1"), receive(&spool, "1.2.3.2")];

    let round = {
        let spool = spool.clone();
        let socket = socket.clone();
        move || {
            let mut gate = SocketGate::new(&socket);
            let round = gate_round(
                &mut gate,
                &spool,
                0,
                i64::MAX,
                None,
                64,
                consent::time::now(),
            )
            .unwrap();
            (round.seq, round.permitted)
        }
    };
    let (_, permitted) = tokio::task::spawn_blocking(round.clone()).await.unwrap();
    assert_eq!(permitted.len(), 2);
    // The PACS stored one of them; the other is retried.
    let outcomes = vec![(ids[0], Outcome::Delivered(dimse::status::Status::SUCCESS))];
    assert_eq!(record(&spool, &outcomes, now(), None).unwrap(), 1);
    assert_eq!(spool.counts().unwrap().releases_waiting, 1);
    // The next round sends the release record first.
    tokio::task::spawn_blocking(round).await.unwrap();
    assert_eq!(spool.counts().unwrap().releases_waiting, 0);

    let store = shared.store().lock().unwrap();
    let rows: Vec<(i64, String, String, String, String, Option<i64>)> = store
        .connection()
        .prepare("SELECT seq, recipient, category, decision, object, decision_seq FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let released: Vec<_> = rows.iter().filter(|r| r.3 == "sent").collect();
    assert_eq!(released.len(), 1, "{rows:?}");
    let (_, recipient, category, _, object, decision) = released[0];
    assert_eq!(
        (recipient.as_str(), category.as_str(), object.as_str()),
        ("hub", "images", "dicom:1.2.3.1")
    );
    let permit = rows
        .iter()
        .find(|r| Some(r.0) == *decision)
        .expect("the release refers to a decision row");
    assert_eq!(
        (permit.1.as_str(), permit.2.as_str(), permit.3.as_str()),
        ("hub", "images", "permit")
    );
    assert!(matches!(
        store.verify_audit().unwrap(),
        AuditCheck::Intact { .. }
    ));
    let reason: String = store
        .connection()
        .query_row(
            "SELECT reason FROM audit WHERE decision = 'sent'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reason, "", "the permit was verified");
    drop(store);
    stop.cancel();
}
