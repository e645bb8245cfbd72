//! The desk against the real consent service on a Unix socket (no root).

use std::time::Duration;

use consent::store::{AuditCheck, AuditKey, Store};

use super::*;
use crate::spool::{Committed, Meta};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";

fn receive(spool: &Spool, uid: &str, class: &str, patient: Option<&str>) -> i64 {
    let mut incoming = spool.begin().unwrap();
    incoming.write(b"DICM an instance").unwrap();
    let meta = Meta {
        sop_class: class.into(),
        sop_instance: uid.into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        calling_ae: "MODALITY".into(),
        patient_id: patient.map(str::to_owned),
        study_uid: None,
    };
    match incoming.commit(&meta, 100).unwrap() {
        Committed::Queued(id) => id,
        other => panic!("{other:?}"),
    }
}

fn staff() -> Staff {
    Staff {
        account: "uketsuke1".into(),
        from: "192.168.50.20".into(),
    }
}

/// The audit rows: (decision, category, reason, object).
fn rows(store: &Store) -> Vec<(String, String, String, String)> {
    store
        .connection()
        .prepare("SELECT decision, category, reason, object FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_instances_are_listed_with_why_and_requeued_or_discarded_audited_first() {
    let dir = tempfile::tempdir().unwrap();
    let key = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
    let facility = tsunagi_config::FacilityCode::try_from("1312345678").unwrap();
    let store = Store::open(&dir.path().join("consent.db"), facility, key).unwrap();
    let (shared, stop, consent_socket) = crate::testdata::consent_service(dir.path(), store);
    let spool = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
    let held = receive(&spool, "1.2.3.1", CT, Some("0001234"));
    spool.hold(held, "no-consent").unwrap();
    let nameless = receive(&spool, "1.2.3.2", CT, None);
    spool.hold(nameless, NO_PATIENT_ID).unwrap();
    let dead = receive(&spool, "1.2.3.3", SR, Some("0001234"));
    spool.fail(dead, &format!("{PACS_REFUSED}0122H")).unwrap();
    let unreachable = receive(&spool, "1.2.3.4", CT, Some("0005678"));
    spool
        .retry_later(unreachable, "connection refused (os error 111)", 10_000)
        .unwrap();
    let waiting_id = receive(&spool, "1.2.3.5", CT, Some("0005678"));
    spool
        .retry_later(waiting_id, NO_NETWORK_ID, 10_000)
        .unwrap();
    // Queued and not yet tried: not waiting.
    receive(&spool, "1.2.3.6", CT, Some("0005678"));

    let ask = {
        let (spool, socket) = (spool.clone(), consent_socket.clone());
        move |request: Request| {
            let (spool, socket) = (spool.clone(), socket.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    answer(&spool, &mut SocketGate::new(&socket), request, 5_000)
                })
                .await
                .unwrap()
            }
        }
    };
    let Answer::Waiting { items, more } = ask(Request::List).await else {
        panic!()
    };
    assert!(!more);
    let seen: Vec<(i64, State, Why, Option<Category>)> = items
        .iter()
        .map(|i| (i.id, i.state, i.why.clone(), i.category))
        .collect();
    assert_eq!(
        seen,
        [
            (
                held,
                State::Held,
                Why::Consent(DenyReason::NoConsent),
                Some(Category::Images)
            ),
            (
                nameless,
                State::Held,
                Why::NoPatientId,
                Some(Category::Images)
            ),
            (
                dead,
                State::Dead,
                Why::PacsRefused("0122H".into()),
                Some(Category::Documents)
            ),
            (
                unreachable,
                State::Pending,
                Why::PacsUnreachable,
                Some(Category::Images)
            ),
            (
                waiting_id,
                State::Pending,
                Why::NoNetworkId,
                Some(Category::Images)
            ),
        ]
    );
    assert_eq!(items[0].patient.as_deref(), Some("0001234"));
    assert_eq!(items[1].patient, None);

    // A malformed account, or no instance named, changes nothing.
    let bad = Staff {
        account: "a\\b".into(),
        ..staff()
    };
    assert!(matches!(
        ask(Request::Requeue {
            staff: bad,
            ids: vec![held]
        })
        .await,
        Answer::Refused(_)
    ));
    assert!(matches!(
        ask(Request::Discard {
            staff: staff(),
            ids: vec![]
        })
        .await,
        Answer::Refused(_)
    ));

    // Requeued: the held one and the unreachable one, audited first; not the queued one.
    let Answer::Done { count } = ask(Request::Requeue {
        staff: staff(),
        ids: vec![held, unreachable, 999],
    })
    .await
    else {
        panic!()
    };
    assert_eq!(count, 2);
    // Discarded: the dead letter and the nameless one; a pending one may not be.
    let Answer::Done { count } = ask(Request::Discard {
        staff: staff(),
        ids: vec![dead, nameless, waiting_id],
    })
    .await
    else {
        panic!()
    };
    assert_eq!(count, 2);
    let by = "by:uketsuke1 (192.168.50.20)".to_owned();
    let row = |decision: &str, category: &str, object: &str| {
        (
            decision.to_owned(),
            category.to_owned(),
            by.clone(),
            object.to_owned(),
        )
    };
    {
        let store = shared.store().lock().unwrap();
        let mut got = rows(&store);
        got.sort();
        let mut want = vec![
            row("requeued", "images", "dicom:1.2.3.1"),
            row("requeued", "images", "dicom:1.2.3.4"),
            row("discarded-held", "documents", "dicom:1.2.3.3"),
            row("discarded-held", "images", "dicom:1.2.3.2"),
        ];
        want.sort();
        assert_eq!(got, want);
        assert!(matches!(
            store.verify_audit().unwrap(),
            AuditCheck::Intact { .. }
        ));
    }
    let Answer::Waiting { items, .. } = ask(Request::List).await else {
        panic!()
    };
    assert_eq!(
        items.iter().map(|i| i.id).collect::<Vec<_>>(),
        [waiting_id],
        "{items:?}"
    );
    // The requeued ones are ready now; the discarded ones are gone, their data with them.
    let ready: Vec<i64> = spool
        .ready(5_000, 10)
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert!(
        ready.contains(&held) && ready.contains(&unreachable),
        "{ready:?}"
    );
    assert!(!ready.contains(&dead) && !ready.contains(&nameless));
    let objects: Vec<_> = std::fs::read_dir(dir.path().join("spool").join("objects"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        !objects
            .iter()
            .any(|n| n == &*format!("{dead}.dcm") || n == &*format!("{nameless}.dcm")),
        "{objects:?}"
    );

    // Without the audit trail, nothing is done.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_file(&consent_socket);
    assert!(matches!(
        ask(Request::Discard {
            staff: staff(),
            ids: vec![waiting_id, held]
        })
        .await,
        Answer::Done { count: 0 } | Answer::Error(_)
    ));
    spool.hold(held, "withdrawn").unwrap();
    assert!(matches!(
        ask(Request::Discard {
            staff: staff(),
            ids: vec![held]
        })
        .await,
        Answer::Error(_)
    ));
    let Answer::Waiting { items, .. } = ask(Request::List).await else {
        panic!()
    };
    assert!(
        items
            .iter()
            .any(|i| i.id == held && i.why == Why::Consent(DenyReason::Withdrawn))
    );
}

#[test]
fn reasons_read_back_as_why() {
    assert_eq!(
        why(State::Held, "recipient-excluded"),
        Why::Consent(DenyReason::RecipientExcluded)
    );
    assert_eq!(why(State::Held, NO_CATEGORY), Why::NoCategory);
    assert_eq!(
        why(State::Held, &format!("{CONSENT_REFUSED}patient: too long")),
        Why::ConsentRefused
    );
    assert_eq!(
        why(State::Held, "cannot read the spooled instance: NotFound"),
        Why::Other
    );
    assert_eq!(why(State::Dead, NOT_ACCEPTED), Why::NotAccepted);
    assert_eq!(why(State::Dead, "connection refused"), Why::TooLong);
    assert_eq!(
        why(State::Pending, &format!("{PACS_BUSY}A700H")),
        Why::PacsBusy
    );
    assert_eq!(
        why(
            State::Pending,
            &format!("{CONSENT_FOR_NOW}cache-stale; asked again later")
        ),
        Why::ConsentForNow
    );
}
