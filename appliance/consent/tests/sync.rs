//! Issue 4, sync with the strict FHIR R4 test server (validates every resource against the
//! official R4 JSON schema):
//! 3. push a consent and an identity link, read them back with FHIR search; change and
//!    withdraw them on the server; the box's decisions change after one pull;
//! 4. a push interrupted (the server stored it, the box did not record the acknowledgement,
//!    or the server was unreachable) completes exactly once: no duplicate resources;
//! 5. server down for longer than the freshness bound: decisions become Deny(stale); server
//!    back: they recover without a restart.
//!
//! Issue 13: every way the network says "no" is a deny on the box, an unreadable consent
//! denies its patient (status, change feed) until a readable version arrives (item 2); the
//! pull reads every page, only about this clinic's patients, with a cursor that skips
//! nothing (item 3).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use consent::decide::{Decision, DenyReason};
use consent::fhir::{CATEGORY_SYSTEM, CONSENT_ID_SYSTEM};
use consent::model::Category;
use consent::store::{AuditKey, Store};
use consent::sync::round;
use serde_json::{Value, json};

#[tokio::test]
async fn push_read_back_change_and_withdraw_on_the_server() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, cid) = clinic(dir.path());
    // Before any pull: fail closed.
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::CacheStale)
    );

    let r = round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(r.pushed, 3, "patient, link, consent");
    assert!(store.lock().unwrap().pending().unwrap().is_empty());
    assert_eq!(decide(&store, &pid, "1312345679", DAY), Decision::Permit);

    // Read back with FHIR search.
    let patients = get(
        addr,
        &format!(
            "/fhir/Patient?identifier={}",
            enc(&format!("{PATIENT_SYSTEM}|0001234"))
        ),
    );
    assert_eq!(patients["total"], 1, "{patients}");
    let patient = &patients["entry"][0]["resource"];
    let ids: Vec<&str> = patient["identifier"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["value"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["0001234", "A-77"],
        "the link travels as an identifier (名寄せ)"
    );
    let consents = get(
        addr,
        &format!(
            "/fhir/Consent?identifier={}",
            enc(&format!("{CONSENT_ID_SYSTEM}|{cid}"))
        ),
    );
    assert_eq!(consents["total"], 1, "{consents}");
    let mut server_consent = consents["entry"][0]["resource"].clone();
    assert_eq!(server_consent["status"], "active");
    assert_eq!(
        server_consent["patient"]["reference"],
        format!("Patient/{}", patient["id"].as_str().unwrap())
    );

    // The network discloses to one more facility: one pull later, the box permits it.
    assert_eq!(
        decide(&store, &pid, "1312345670", DAY),
        Decision::Deny(DenyReason::RecipientNotDisclosed)
    );
    let id = server_consent["id"].as_str().unwrap().to_owned();
    server_consent = disclosed_to_one_more(&server_consent, "1312345670");
    put(addr, &format!("/fhir/Consent/{id}"), &server_consent);
    let r = round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(r.changed, 1, "{r:?}");
    assert_eq!(decide(&store, &pid, "1312345670", DAY), Decision::Permit);

    // Withdrawn on the network: one pull later, the box denies.
    server_consent["status"] = Value::from("inactive");
    put(addr, &format!("/fhir/Consent/{id}"), &server_consent);
    round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::Withdrawn)
    );

    // A restart replays the outbox: old versions must not undo the network's withdrawal.
    replay_outbox(&store);
    round(&store, &client(addr, "/fhir")).await.unwrap();
    let again = get(addr, &format!("/fhir/Consent/{id}"));
    assert_eq!(
        again["status"], "inactive",
        "a replayed push undid the withdrawal"
    );
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::Withdrawn)
    );

    // Nothing was ever duplicated.
    let all = get(addr, "/fhir/Consent?_count=100");
    assert_eq!(all["total"], 1);
    let all = get(addr, "/fhir/Patient?_count=100");
    assert_eq!(all["total"], 1);
}

/// Issue 15: any DICOM PatientID is a patient ID, those with FHIR's search delimiters too
/// (escaped in every token search): pushed once, found again by the next rounds (no second
/// Patient or Consent), and permitted after the pull.
#[tokio::test]
async fn a_patient_id_with_spaces_and_search_delimiters_syncs_once() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, _) = clinic_with_id(dir.path(), "AB_01 A|B,C$");
    let r = round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(r.pushed, 3, "patient, link, consent");
    assert_eq!(decide(&store, &pid, "1312345679", DAY), Decision::Permit);
    let patients = get(
        addr,
        &format!(
            "/fhir/Patient?identifier={}",
            enc(&format!("{PATIENT_SYSTEM}|AB_01 A\\|B\\,C\\$"))
        ),
    );
    assert_eq!(patients["total"], 1, "{patients}");
    assert_eq!(
        patients["entry"][0]["resource"]["identifier"][0]["value"],
        "AB_01 A|B,C$"
    );
    // Pushed again from the outbox: found by its escaped identifier, never a second copy.
    replay_outbox(&store);
    round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(get(addr, "/fhir/Patient?_count=100")["total"], 1);
    assert_eq!(get(addr, "/fhir/Consent?_count=100")["total"], 1);
    assert_eq!(decide(&store, &pid, "1312345679", DAY), Decision::Permit);
}

#[tokio::test]
async fn an_interrupted_push_completes_exactly_once() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, _pid, cid) = clinic(dir.path());

    // 1. The server is unreachable: the push stays queued, with the reason.
    let down = client("127.0.0.1:9".parse().unwrap(), "/fhir");
    assert!(round(&store, &down).await.is_err());
    let pending = store.lock().unwrap().pending().unwrap();
    assert_eq!(pending.len(), 3);
    assert_eq!(pending[0].attempts, 1);
    assert!(
        pending[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("cannot reach")
    );

    // 2. The server stores everything, but the box dies before recording the
    //    acknowledgements (as after kill -9 between the answer and the commit).
    round(&store, &client(addr, "/fhir")).await.unwrap();
    replay_outbox(&store);
    drop(store);

    // 3. After the restart the same pushes go out again: conditional updates, no duplicates.
    let key = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
    let store =
        Mutex::new(Store::open(&dir.path().join("consent.db"), fac("1312345678"), key).unwrap());
    let r = round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(r.pushed, 3);
    assert!(store.lock().unwrap().pending().unwrap().is_empty());
    let consents = get(
        addr,
        &format!(
            "/fhir/Consent?identifier={}",
            enc(&format!("{CONSENT_ID_SYSTEM}|{cid}"))
        ),
    );
    assert_eq!(consents["total"], 1);
    assert_eq!(get(addr, "/fhir/Patient?_count=100")["total"], 1);
    assert_eq!(get(addr, "/fhir/Consent?_count=100")["total"], 1);
}

#[tokio::test]
async fn a_server_down_beyond_the_bound_fails_closed_and_recovers() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, _) = clinic(dir.path());
    // Timestamps are whole seconds: keep well clear of the boundary on a loaded machine.
    let bound = Duration::from_secs(3);
    round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(decide(&store, &pid, "1312345679", bound), Decision::Permit);
    // The server goes away (from the box's view, nothing answers).
    let down = client("127.0.0.1:9".parse().unwrap(), "/fhir");
    assert!(round(&store, &down).await.is_err());
    assert_eq!(
        decide(&store, &pid, "1312345679", bound),
        Decision::Permit,
        "still within the bound"
    );
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert!(round(&store, &down).await.is_err());
    assert_eq!(
        decide(&store, &pid, "1312345679", bound),
        Decision::Deny(DenyReason::CacheStale)
    );
    // The server is back: the next round refreshes the cache; no restart.
    round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(decide(&store, &pid, "1312345679", bound), Decision::Permit);
}

/// The network's patient index gives the patient a network ID (名寄せ): one pull later the
/// box knows it, and what the box pushes afterwards keeps it.
#[tokio::test]
async fn the_network_id_is_learned_from_the_network_and_kept_in_pushes() {
    const SYSTEM: &str = "urn:oid:2.999.392.1";
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, _cid) = clinic(dir.path());
    let c = client(addr, "/fhir").with_network_id_system(SYSTEM);
    round(&store, &c).await.unwrap();
    assert_eq!(store.lock().unwrap().network_id(&pid).unwrap(), None);

    let found = get(
        addr,
        &format!(
            "/fhir/Patient?identifier={}",
            enc(&format!("{PATIENT_SYSTEM}|0001234"))
        ),
    );
    let mut patient = found["entry"][0]["resource"].clone();
    let id = patient["id"].as_str().unwrap().to_owned();
    patient["identifier"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "system": SYSTEM, "value": "NET-0000042" }));
    put(addr, &format!("/fhir/Patient/{id}"), &patient);
    let r = round(&store, &c).await.unwrap();
    assert!(r.changed >= 1, "{r:?}");
    assert_eq!(
        store.lock().unwrap().network_id(&pid).unwrap().as_deref(),
        Some("NET-0000042")
    );
    assert_eq!(
        store
            .lock()
            .unwrap()
            .patient_by_network_id("NET-0000042")
            .unwrap(),
        Some(pid.clone())
    );

    // A new link makes the box push the patient again: the network ID stays on the server.
    store
        .lock()
        .unwrap()
        .add_link(&pid, &fac("1312345679"), "B-5", consent::time::now())
        .unwrap();
    round(&store, &c).await.unwrap();
    let again = get(addr, &format!("/fhir/Patient/{id}"));
    let values: Vec<&str> = again["identifier"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["system"] == SYSTEM)
        .map(|i| i["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["NET-0000042"], "{again}");
}

/// A consent cache of clinic 1312345678 with nothing in it: a new or reset box.
fn empty_box(dir: &std::path::Path) -> std::sync::Arc<consent::service::Shared> {
    let key = AuditKey::load_or_create(&dir.join("audit.key")).unwrap();
    let store = Store::open(&dir.join("consent.db"), fac("1312345678"), key).unwrap();
    consent::service::Shared::new(
        store,
        consent::service::Settings {
            freshness_bound: DAY,
            runtime_dir: dir.to_owned(),
            fhir: None,
            pull_interval: Duration::from_secs(60),
            audit_socket: None,
            desk_dir: None,
        },
    )
}

/// Issue 16: a new or reset box (an empty cache) recovers the clinic's patients from the
/// network, with their network IDs and consents, and decides on them; it pushes nothing
/// back. A Patient it cannot read as R4 says is not restored: every decision about that
/// patient denies, and status shows it, until a readable version arrives.
#[tokio::test]
async fn a_new_box_restores_the_clinics_patients_and_their_consents_from_the_network() {
    const SYSTEM: &str = "urn:oid:2.999.392.1";
    const EN: &str = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";
    let addr = strict_server();
    let mut patient = network_patient(PATIENT_SYSTEM, "0001234");
    patient["identifier"]
        .as_array_mut()
        .unwrap()
        .push(json!({"system": SYSTEM, "value": "NET-0001234"}));
    patient["name"] = json!([
        {"extension": [{"url": EN, "valueCode": "IDE"}], "use": "official", "family": "山田", "given": ["太郎"]},
        {"extension": [{"url": EN, "valueCode": "SYL"}], "use": "official", "family": "ヤマダ", "given": ["タロウ"]},
    ]);
    patient["gender"] = json!("male");
    patient["birthDate"] = json!("1950-04-01");
    // Another with nothing but the identifier and a birth year: valid R4, restored with
    // what there is.
    let mut other = network_patient(PATIENT_SYSTEM, "0005678");
    other["birthDate"] = json!("1950");
    let mut entries = Vec::new();
    for (i, p) in [patient, other].into_iter().enumerate() {
        let url = format!("urn:uuid:00000000-0000-4000-8000-00000000000{i}");
        entries.push(create_entry(&url, p));
        entries.push(create_entry(
            &format!("urn:uuid:00000000-0000-4000-9000-00000000000{i}"),
            network_consent(&url, &format!("net-{i}")),
        ));
    }
    let created = transaction(addr, entries);
    let other_ref = created["entry"][2]["response"]["location"]
        .as_str()
        .unwrap()
        .split("/_history")
        .next()
        .unwrap()
        .to_owned();
    assert!(other_ref.starts_with("Patient/"), "{other_ref}");

    let dir = tempfile::tempdir().unwrap();
    let shared = empty_box(dir.path());
    let store = shared.store();
    let c = client(addr, "/fhir").with_network_id_system(SYSTEM);
    let r = round(store, &c).await.unwrap();
    assert!(r.changed >= 4, "{r:?}");
    let pid: consent::model::PatientId = "0001234".parse().unwrap();
    let restored = store.lock().unwrap().patient(&pid).unwrap().unwrap();
    assert_eq!(
        (
            restored.family_kanji.as_str(),
            restored.given_kana.as_str(),
            restored.birth_date.as_str(),
            restored.network_id.as_deref()
        ),
        ("山田", "タロウ", "1950-04-01", Some("NET-0001234"))
    );
    assert_eq!(decide(store, &pid, "1312345679", DAY), Decision::Permit);
    let oid: consent::model::PatientId = "0005678".parse().unwrap();
    let o = store.lock().unwrap().patient(&oid).unwrap().unwrap();
    assert_eq!((o.family_kanji.as_str(), o.birth_date.as_str()), ("", ""));
    assert_eq!(decide(store, &oid, "1312345679", DAY), Decision::Permit);
    let pending: i64 = store
        .lock()
        .unwrap()
        .connection()
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE done_at IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(pending, 0, "nothing restored is pushed back");
    assert!(shared.report().0, "fresh");

    // The network's copy of the second patient gets something the box cannot read (a
    // modifierExtension): another new box does not restore that patient, denies them, and
    // says so in status.
    let mut unreadable = get(addr, &format!("/fhir/{other_ref}"));
    unreadable.as_object_mut().unwrap().remove("meta");
    unreadable["modifierExtension"] = json!([{"url": "urn:example:unknown", "valueBoolean": true}]);
    put(addr, &format!("/fhir/{other_ref}"), &unreadable);
    let dir2 = tempfile::tempdir().unwrap();
    let shared2 = empty_box(dir2.path());
    let store2 = shared2.store();
    round(store2, &c).await.unwrap();
    assert_eq!(decide(store2, &pid, "1312345679", DAY), Decision::Permit);
    assert!(store2.lock().unwrap().patient(&oid).unwrap().is_none());
    assert_ne!(decide(store2, &oid, "1312345679", DAY), Decision::Permit);
    let (fresh, summary, metrics) = shared2.report();
    assert!(!fresh, "degraded: someone has to look ({summary})");
    assert!(summary.contains("1 patients denied"), "{summary}");
    assert!(
        !summary.contains("0005678"),
        "no patient IDs in status: {summary}"
    );
    assert!(metrics.contains(&("unreadable_network_consent_patients", 1.0)));

    // A readable version restores the patient and clears the status.
    unreadable
        .as_object_mut()
        .unwrap()
        .remove("modifierExtension");
    put(addr, &format!("/fhir/{other_ref}"), &unreadable);
    round(store2, &c).await.unwrap();
    assert!(store2.lock().unwrap().patient(&oid).unwrap().is_some());
    assert_eq!(decide(store2, &oid, "1312345679", DAY), Decision::Permit);
    let (fresh, summary, _) = shared2.report();
    assert!(fresh && !summary.contains("patients denied"), "{summary}");
}

// Issue 13, item 2: every way the network can say "no" is a deny on the box.

/// The clinic's consent, pushed and pulled once; the server's copy (without `meta`) and id.
async fn on_the_network(
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (Mutex<Store>, consent::model::PatientId, Value, String) {
    let (store, pid, cid) = clinic(dir);
    round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(decide(&store, &pid, "1312345679", DAY), Decision::Permit);
    let found = get(
        addr,
        &format!(
            "/fhir/Consent?identifier={}",
            enc(&format!("{CONSENT_ID_SYSTEM}|{cid}"))
        ),
    );
    let mut consent = found["entry"][0]["resource"].clone();
    consent.as_object_mut().unwrap().remove("meta");
    let id = consent["id"].as_str().unwrap().to_owned();
    (store, pid, consent, id)
}

/// The network changes the consent to `consent`; the box pulls.
async fn network_says(addr: std::net::SocketAddr, store: &Mutex<Store>, id: &str, consent: &Value) {
    put(addr, &format!("/fhir/Consent/{id}"), consent);
    round(store, &client(addr, "/fhir")).await.unwrap();
}

async fn a_status_withdraws(status: &str, keep_provision: bool) {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, mut consent, id) = on_the_network(addr, dir.path()).await;
    consent["status"] = Value::from(status);
    if !keep_provision {
        consent.as_object_mut().unwrap().remove("provision");
    }
    network_says(addr, &store, &id, &consent).await;
    for category in [Category::Images, Category::LabResults] {
        assert_eq!(
            decide_category(&store, &pid, "1312345679", category),
            Decision::Deny(DenyReason::Withdrawn),
            "{status}"
        );
    }
    assert_eq!(
        store
            .lock()
            .unwrap()
            .participation(&pid, consent::time::now(), DAY)
            .unwrap(),
        Decision::Deny(DenyReason::Withdrawn)
    );
}

#[tokio::test]
async fn an_inactive_consent_without_provision_on_the_network_withdraws() {
    a_status_withdraws("inactive", false).await;
}

#[tokio::test]
async fn a_rejected_consent_on_the_network_withdraws() {
    a_status_withdraws("rejected", true).await;
}

#[tokio::test]
async fn an_entered_in_error_consent_on_the_network_withdraws() {
    a_status_withdraws("entered-in-error", false).await;
}

#[tokio::test]
async fn a_top_level_deny_provision_on_the_network_withdraws() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, mut consent, id) = on_the_network(addr, dir.path()).await;
    consent["provision"]["type"] = Value::from("deny");
    network_says(addr, &store, &id, &consent).await;
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::Withdrawn)
    );
}

#[tokio::test]
async fn a_nested_deny_by_category_on_the_network_removes_the_category() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, mut consent, id) = on_the_network(addr, dir.path()).await;
    consent["provision"]["provision"] = json!([{
        "type": "deny",
        "code": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "images"}]}]
    }]);
    network_says(addr, &store, &id, &consent).await;
    assert_eq!(
        decide_category(&store, &pid, "1312345679", Category::Images),
        Decision::Deny(DenyReason::CategoryExcluded)
    );
    assert_eq!(
        decide_category(&store, &pid, "1312345679", Category::LabResults),
        Decision::Permit
    );
}

#[tokio::test]
async fn a_nested_deny_by_period_on_the_network_is_never_permitted() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, mut consent, id) = on_the_network(addr, dir.path()).await;
    let now = consent::time::now();
    consent["provision"]["provision"] = json!([{
        "type": "deny",
        "period": {
            "start": consent::time::format(now - 3600),
            "end": consent::time::format(now + 3600),
        }
    }]);
    network_says(addr, &store, &id, &consent).await;
    let denied = decide(&store, &pid, "1312345679", DAY);
    assert!(
        matches!(
            denied,
            Decision::Deny(DenyReason::Expired | DenyReason::NotYetValid)
        ),
        "{denied:?}"
    );
    // Nor two hours later (the deny sits inside the permitted time: only the part before
    // it stays permitted).
    let later = now + 7200;
    assert_eq!(
        store
            .lock()
            .unwrap()
            .decide(
                &pid,
                &"1312345679".parse().unwrap(),
                Category::Images,
                later,
                now,
                DAY
            )
            .unwrap(),
        Decision::Deny(DenyReason::Expired)
    );
}

#[tokio::test]
async fn a_nested_deny_by_actor_and_code_on_the_network_excludes_the_actor() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, mut consent, id) = on_the_network(addr, dir.path()).await;
    let actor = consent["provision"]["actor"][0].clone();
    consent["provision"]["provision"] = json!([{
        "type": "deny",
        "actor": [actor],
        "code": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "lab-results"}]}]
    }]);
    network_says(addr, &store, &id, &consent).await;
    for category in [Category::Images, Category::LabResults] {
        assert_eq!(
            decide_category(&store, &pid, "1312345679", category),
            Decision::Deny(DenyReason::RecipientExcluded)
        );
    }
}

#[tokio::test]
async fn a_draft_on_the_network_denies_until_it_is_active_again() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, mut consent, id) = on_the_network(addr, dir.path()).await;
    consent["status"] = Value::from("draft");
    network_says(addr, &store, &id, &consent).await;
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::NotYetValid)
    );
    assert_eq!(
        store
            .lock()
            .unwrap()
            .participation(&pid, consent::time::now(), DAY)
            .unwrap(),
        Decision::Deny(DenyReason::NotYetValid)
    );
    // Not final, unlike a withdrawal.
    consent["status"] = Value::from("active");
    network_says(addr, &store, &id, &consent).await;
    assert_eq!(decide(&store, &pid, "1312345679", DAY), Decision::Permit);
}

#[tokio::test]
async fn an_unreadable_network_consent_denies_its_patient_in_status_and_feed_until_read() {
    use consent::service::{Settings, Shared};
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, consent, id) = on_the_network(addr, dir.path()).await;
    let shared = Shared::new(
        store.into_inner().unwrap(),
        Settings {
            freshness_bound: DAY,
            runtime_dir: dir.path().to_owned(),
            fhir: None,
            pull_interval: Duration::from_secs(60),
            audit_socket: None,
            desk_dir: None,
        },
    );
    let store = shared.store();
    let (seq, _, _) = store.lock().unwrap().changes_since(0, 100).unwrap();
    let unreadable = Decision::Deny(DenyReason::UnreadableNetworkConsent);

    // A modifierExtension the box does not know: the patient is denied, whatever else.
    let mut modified = consent.clone();
    modified["modifierExtension"] =
        json!([{"url": "urn:example:only-on-tuesdays", "valueBoolean": true}]);
    network_says(addr, store, &id, &modified).await;
    assert_eq!(decide(store, &pid, "1312345679", DAY), unreadable);
    assert_eq!(
        store
            .lock()
            .unwrap()
            .participation(&pid, consent::time::now(), DAY)
            .unwrap(),
        unreadable
    );
    let (fresh, summary, metrics) = shared.report();
    assert!(!fresh, "degraded: someone has to look");
    assert!(
        summary.contains("1 patients denied") && summary.contains("unreadable-network-consent"),
        "{summary}"
    );
    assert!(
        !summary.contains("0001234"),
        "no patient IDs in status: {summary}"
    );
    assert!(metrics.contains(&("unreadable_network_consent_patients", 1.0)));
    let (seq, patients, _) = store.lock().unwrap().changes_since(seq, 100).unwrap();
    assert_eq!(
        patients,
        vec![pid.clone()],
        "the change feed lists the patient"
    );

    // A restriction the box does not understand (a purpose): still unreadable.
    let mut purpose = consent.clone();
    purpose["provision"]["purpose"] = json!([{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
        "code": "HMARKT"
    }]);
    network_says(addr, store, &id, &purpose).await;
    assert_eq!(decide(store, &pid, "1312345679", DAY), unreadable);

    // A later readable version lifts it, and is a change again.
    network_says(addr, store, &id, &consent).await;
    assert_eq!(decide(store, &pid, "1312345679", DAY), Decision::Permit);
    let (_, patients, _) = store.lock().unwrap().changes_since(seq, 100).unwrap();
    assert!(patients.contains(&pid));
    let (fresh, summary, _) = shared.report();
    assert!(fresh && !summary.contains("patients denied"), "{summary}");
}

// Issue 13, item 3: the pull reads every page, asks only about this clinic's patients, and
// its cursor skips nothing.

/// `n` patients of the system `system` with one network consent each, created in
/// transactions of 50 pairs (the pairs of one transaction share one `lastUpdated`).
fn network_patients_with_consents(
    addr: std::net::SocketAddr,
    system: &str,
    first: usize,
    n: usize,
) {
    let ids: Vec<usize> = (first..first + n).collect();
    for chunk in ids.chunks(50) {
        let mut entries = Vec::new();
        for i in chunk {
            let url = format!("urn:uuid:00000000-0000-4000-8000-{i:012}");
            entries.push(create_entry(
                &url,
                network_patient(system, &format!("N{i:05}")),
            ));
            entries.push(create_entry(
                &format!("urn:uuid:00000000-0000-4000-9000-{i:012}"),
                network_consent(&url, &format!("net-{i}")),
            ));
        }
        transaction(addr, entries);
    }
}

#[tokio::test]
async fn more_than_a_thousand_changes_are_all_pulled_and_a_withdrawal_on_the_third_page_applies() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, mut consent, id) = on_the_network(addr, dir.path()).await;
    let paged = client(addr, "/fhir").with_page_size(500);
    // 1,100 of this clinic's patients with a consent each (25, then transactions of 50, so
    // that page boundaries fall inside a transaction), then the withdrawal of the box's
    // patient's consent, then 100 more; and 30 of another clinic, which the box never asks
    // about.
    network_patients_with_consents(addr, PATIENT_SYSTEM, 0, 25);
    network_patients_with_consents(addr, PATIENT_SYSTEM, 25, 1075);
    consent["status"] = Value::from("inactive");
    put(addr, &format!("/fhir/Consent/{id}"), &consent);
    network_patients_with_consents(addr, PATIENT_SYSTEM, 1100, 100);
    network_patients_with_consents(addr, "urn:oid:1.2.392.100495.20.3.51.11399999999", 5000, 30);
    // The box knows the patients of the transactions that straddle the page boundaries.
    let straddling: Vec<_> = (475..525)
        .chain(975..1025)
        .map(|i| register(&store, &format!("N{i:05}")))
        .collect();
    store
        .lock()
        .unwrap()
        .connection()
        .execute("UPDATE outbox SET done_at = 0 WHERE done_at IS NULL", [])
        .unwrap();

    // The pages the box will read: each page boundary falls inside a transaction, between
    // resources of one lastUpdated.
    let cursor = store.lock().unwrap().pull_cursor("Consent").unwrap();
    let query = format!(
        "/fhir/Consent?patient:Patient.identifier={}&_sort=_lastUpdated&_count=500&_lastUpdated=ge{}",
        enc(&format!("{PATIENT_SYSTEM}|")),
        cursor.last_updated.unwrap().replace('+', "%2B")
    );
    let next = |page: &Value| -> String {
        let url = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .unwrap()["url"]
            .as_str()
            .unwrap();
        format!("/fhir/{}", url.split_once("/fhir/").unwrap().1)
    };
    let page1 = get(addr, &query);
    let page2 = get(addr, &next(&page1));
    let page3 = get(addr, &next(&page2));
    assert!(
        page3["entry"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["resource"]["id"] == id.as_str() && e["resource"]["status"] == "inactive"),
        "the withdrawal is on the third page"
    );
    let last_of_1 = &page1["entry"][499]["resource"]["meta"]["lastUpdated"];
    assert_eq!(
        last_of_1, &page2["entry"][0]["resource"]["meta"]["lastUpdated"],
        "a lastUpdated shared across the page boundary"
    );
    assert_eq!(page1["total"], 1200 + 1);

    let r = round(&store, &paged).await.unwrap();
    // Only this clinic's: 1,200 patients, 1,200 consents and the withdrawal.
    assert_eq!(r.pulled, 1200 + 1200 + 1, "{r:?}");
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::Withdrawn),
        "the withdrawal on the third page"
    );
    for p in &straddling {
        assert_eq!(
            decide(&store, p, "1312345679", DAY),
            Decision::Permit,
            "{p}"
        );
    }
    // Nothing is read twice.
    let again = round(&store, &paged).await.unwrap();
    assert_eq!((again.pulled, again.changed), (0, 0), "{again:?}");
}

#[tokio::test]
async fn a_round_cut_short_by_the_page_cap_goes_on_without_skipping_shared_instants() {
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, _pid, _consent, _id) = on_the_network(addr, dir.path()).await;
    // 20 patients with three consents each, all in one transaction: one lastUpdated.
    let mut entries = Vec::new();
    for i in 0..20 {
        let url = format!("urn:uuid:00000000-0000-4000-8000-{i:012}");
        entries.push(create_entry(
            &url,
            network_patient(PATIENT_SYSTEM, &format!("T{i:03}")),
        ));
        for k in 0..3 {
            entries.push(create_entry(
                &format!("urn:uuid:00000000-0000-4000-9000-{:012}", i * 10 + k),
                network_consent(&url, &format!("tie-{i}-{k}")),
            ));
        }
    }
    transaction(addr, entries);
    let patients: Vec<_> = (0..20)
        .map(|i| register(&store, &format!("T{i:03}")))
        .collect();
    store
        .lock()
        .unwrap()
        .connection()
        .execute("UPDATE outbox SET done_at = 0 WHERE done_at IS NULL", [])
        .unwrap();
    // One page of 25 per round: the patients fit, the 60 consents do not.
    let capped = client(addr, "/fhir").with_page_size(25).with_max_pages(1);
    let cut = round(&store, &capped).await.unwrap_err();
    assert!(cut.to_string().contains("pages"), "{cut}");
    let cursor = store.lock().unwrap().pull_cursor("Consent").unwrap();
    // The first page held the box's own consent (applied before) and 24 of the 60.
    assert_eq!(
        cursor.seen.len(),
        24,
        "the cursor stops inside the shared instant"
    );
    // The next round goes on from there: every consent is applied once.
    let r = round(&store, &client(addr, "/fhir")).await.unwrap();
    assert_eq!(r.pulled, 36, "{r:?}");
    for p in &patients {
        let records = store.lock().unwrap().records(p).unwrap();
        assert_eq!(records.len(), 3, "{p}");
    }
}

/// A FHIR server that answers every request with `answer(path_and_query)`.
fn scripted_server(answer: fn(&str) -> (u16, Value)) -> std::net::SocketAddr {
    use std::io::Write as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Ok(Ok(request)) = hil_tests::fhir::http::read_request(&mut stream) else {
                continue;
            };
            let target = match &request.query {
                Some(q) => format!("{}?{q}", request.path),
                None => request.path.clone(),
            };
            let (status, body) = answer(&target);
            let body = body.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

fn searchset(entries: Vec<Value>, next: Option<&str>) -> Value {
    let mut links = vec![json!({"relation": "self", "url": "/fhir/x"})];
    if let Some(url) = next {
        links.push(json!({"relation": "next", "url": url}));
    }
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries.into_iter().map(|r| json!({"resource": r, "search": {"mode": "match"}})).collect::<Vec<_>>(),
    })
}

fn scripted_consent() -> Value {
    let mut c = network_consent("Patient/p1", "net-1");
    c["id"] = json!("c1");
    c["meta"] = json!({"versionId": "1", "lastUpdated": "2026-11-22T04:05:00.000001Z"});
    c
}

/// A fresh cache of the clinic's patient, with its pushes done.
fn fresh_clinic(dir: &std::path::Path) -> (Mutex<Store>, consent::model::PatientId) {
    let (store, pid, _) = clinic(dir);
    {
        let s = store.lock().unwrap();
        s.connection()
            .execute("UPDATE outbox SET done_at = 0 WHERE done_at IS NULL", [])
            .unwrap();
    }
    (store, pid)
}

#[tokio::test]
async fn a_consent_whose_patient_cannot_be_read_fails_the_pull() {
    let addr = scripted_server(|target| {
        if target.starts_with("/fhir/Patient?") {
            (200, searchset(vec![], None))
        } else if target.starts_with("/fhir/Consent?") {
            (200, searchset(vec![scripted_consent()], None))
        } else {
            (
                500,
                json!({"resourceType": "OperationOutcome", "issue": []}),
            )
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (store, pid) = fresh_clinic(dir.path());
    let err = round(&store, &client(addr, "/fhir")).await.unwrap_err();
    assert!(err.to_string().contains("500"), "{err}");
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::CacheStale),
        "not fresh on a partial read"
    );
}

#[tokio::test]
async fn a_next_link_to_another_server_fails_the_pull() {
    let addr = scripted_server(|target| {
        if target.starts_with("/fhir/Patient?") {
            (
                200,
                searchset(vec![], Some("http://192.0.2.1/fhir/Patient?page=2")),
            )
        } else {
            (200, searchset(vec![], None))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (store, pid) = fresh_clinic(dir.path());
    let err = round(&store, &client(addr, "/fhir")).await.unwrap_err();
    assert!(err.to_string().contains("configured FHIR server"), "{err}");
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::CacheStale)
    );
}

#[tokio::test]
async fn results_out_of_lastupdated_order_fail_the_pull() {
    let addr = scripted_server(|target| {
        if target.starts_with("/fhir/Consent?") {
            let mut older = scripted_consent();
            older["id"] = json!("c0");
            older["meta"]["lastUpdated"] = json!("2026-11-22T04:04:59Z");
            (200, searchset(vec![scripted_consent(), older], None))
        } else {
            (200, searchset(vec![], None))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (store, _pid) = fresh_clinic(dir.path());
    let err = round(&store, &client(addr, "/fhir")).await.unwrap_err();
    assert!(err.to_string().contains("sorted"), "{err}");
}

/// Issue 13 item 10: the audit trail is anchored at the network. Each round writes the
/// box's checkpoint (an AuditEvent the strict server validates against the R4 schema, one
/// per box); deleting the whole trail, head included, is then found: status degraded with
/// the reason, `audit verify` fails, and the network's checkpoint is kept as the evidence.
#[tokio::test]
async fn deleting_the_whole_audit_trail_is_detected_once_the_network_has_a_checkpoint() {
    use consent::service::{Settings, Shared};
    use consent::store::AuditCheck;
    use consent::sync::Checkpoint;
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, _) = clinic(dir.path());
    let c = client(addr, "/fhir");
    // Nothing recorded yet: nothing to anchor, nothing written.
    let r = round(&store, &c).await.unwrap();
    assert_eq!(r.checkpoint, Checkpoint::Empty);
    for _ in 0..3 {
        decide(&store, &pid, "hub", DAY);
    }
    let r = round(&store, &c).await.unwrap();
    assert_eq!(r.checkpoint, Checkpoint::Acknowledged(3));
    let event = get(addr, "/fhir/AuditEvent/tsunagi-audit-1312345678");
    assert_eq!(event["resourceType"], "AuditEvent");
    let head = store.lock().unwrap().audit_head().unwrap().unwrap();
    let details = &event["entity"][0]["detail"];
    assert_eq!(details[0], json!({"type": "head-seq", "valueString": "3"}));
    assert_eq!(details[1]["valueString"], head.row_mac.as_str());
    assert!(!event.to_string().contains("0001234"), "no patient data");
    // The next round updates the same resource: one per box.
    decide(&store, &pid, "hub", DAY);
    let r = round(&store, &c).await.unwrap();
    assert_eq!(r.checkpoint, Checkpoint::Acknowledged(4));
    let event = get(addr, "/fhir/AuditEvent/tsunagi-audit-1312345678");
    assert_eq!(event["meta"]["versionId"], "2");

    let shared = Shared::new(
        store.into_inner().unwrap(),
        Settings {
            freshness_bound: DAY,
            runtime_dir: dir.path().to_owned(),
            fhir: None,
            pull_interval: Duration::from_secs(60),
            audit_socket: None,
            desk_dir: None,
        },
    );
    let (healthy, summary, metrics) = shared.report();
    assert!(healthy, "{summary}");
    assert!(summary.contains("audit trail head 4"), "{summary}");
    assert!(metrics.contains(&("audit_head_seq", 4.0)), "{metrics:?}");

    // Someone deletes the whole trail, head and local anchor included.
    let store = shared.store();
    store
        .lock()
        .unwrap()
        .connection()
        .execute_batch("DELETE FROM audit; DELETE FROM audit_head; DELETE FROM audit_anchor;")
        .unwrap();
    assert_eq!(
        store.lock().unwrap().verify_audit().unwrap(),
        AuditCheck::Intact { rows: 0 },
        "locally, an empty trail looks intact"
    );
    // The network's copy finds it at the next round.
    let r = round(store, &c).await.unwrap();
    let Checkpoint::Reset(why) = r.checkpoint else {
        panic!("not detected: {:?}", r.checkpoint);
    };
    assert!(why.contains("reset or cut"), "{why}");
    let (healthy, summary, metrics) = shared.report();
    assert!(!healthy, "degraded");
    assert!(
        summary.contains("AUDIT TRAIL RESET") && summary.contains(&why),
        "{summary}"
    );
    assert!(metrics.contains(&("audit_reset", 1.0)), "{metrics:?}");
    assert_eq!(
        store.lock().unwrap().verify_audit().unwrap(),
        AuditCheck::Broken {
            row: 4,
            problem: why.clone()
        }
    );
    // New decisions do not overwrite the evidence at the network.
    decide(store, &pid, "hub", DAY);
    let r = round(store, &c).await.unwrap();
    assert_eq!(r.checkpoint, Checkpoint::Reset(why));
    let event = get(addr, "/fhir/AuditEvent/tsunagi-audit-1312345678");
    assert_eq!(event["entity"][0]["detail"][0]["valueString"], "4");
}

#[test]
fn the_strict_server_serves_audit_events_by_id_only() {
    let addr = strict_server();
    let r = hil_tests::fhir::http::request(
        addr,
        "GET",
        "/fhir/AuditEvent?identifier=urn%3Ax%7C1",
        None,
    )
    .unwrap();
    assert_eq!(r.status, 405);
    let bad = json!({"resourceType": "AuditEvent", "id": "a1", "recorded": "2026-12-01T00:00:00Z"});
    let r = hil_tests::fhir::http::request(
        addr,
        "PUT",
        "/fhir/AuditEvent/a1",
        Some(bad.to_string().as_bytes()),
    )
    .unwrap();
    assert_eq!(r.status, 400, "type, agent and source are required in R4");
}

/// Issue 19: the network's facility directory, for the console to offer recipients by name:
/// read whole, every page, at the first round and then once per [`DIRECTORY_REFRESH`];
/// an Organization the box cannot understand, and every entry sharing its code, is not
/// offered; an inactive one only names its facility. Decisions never read it.
#[tokio::test]
async fn the_networks_facility_directory_is_read_whole_and_what_is_not_understood_is_not_offered() {
    use hil_tests::fhir::organization;
    assert_eq!(
        consent::fhir::INSTITUTION_SYSTEM,
        hil_tests::fhir::INSTITUTION_SYSTEM
    );
    let addr = strict_server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, _) = clinic(dir.path());
    put(
        addr,
        "/fhir/Organization/a",
        &organization("a", "1312345670", "東京第一病院"),
    );
    let mut closed = organization("b", "1312345671", "港区クリニック");
    closed["active"] = json!(false);
    put(addr, "/fhir/Organization/b", &closed);
    let mut odd = organization("c", "1312345672", "新宿医院");
    odd["modifierExtension"] = json!([{ "url": "urn:x", "valueBoolean": true }]);
    put(addr, "/fhir/Organization/c", &odd);
    put(
        addr,
        "/fhir/Organization/d1",
        &organization("d1", "1312345673", "渋谷病院"),
    );
    put(
        addr,
        "/fhir/Organization/d2",
        &organization("d2", "1312345673", "渋谷第二病院"),
    );
    // Not a facility with a 医療機関コード: not in the directory's search at all.
    put(
        addr,
        "/fhir/Organization/e",
        &json!({ "resourceType": "Organization", "id": "e", "name": "東京都" }),
    );

    let client = client(addr, "/fhir").with_page_size(2);
    let r = round(&store, &client).await.unwrap();
    assert_eq!(r.directory, Some(5), "every page read");
    let d = store.lock().unwrap().directory().unwrap();
    let listed: Vec<(&str, &str, bool)> = d
        .facilities
        .iter()
        .map(|f| (f.code.as_str(), f.name.as_str(), f.active))
        .collect();
    assert_eq!(
        listed,
        [
            ("1312345670", "東京第一病院", true),
            ("1312345671", "港区クリニック", false),
        ],
        "by name; the unreadable one and both entries of the shared code are not offered"
    );
    assert_eq!(d.unreadable, 3);
    assert!(d.refreshed_at.is_some());
    assert_eq!(d.name_of(&fac("1312345670")), Some("東京第一病院"));
    assert_eq!(d.name_of(&fac("1312345672")), None);

    // Within the hour, a round leaves the directory alone.
    put(
        addr,
        "/fhir/Organization/c",
        &organization("c", "1312345672", "新宿医院"),
    );
    assert_eq!(round(&store, &client).await.unwrap().directory, None);
    assert_eq!(store.lock().unwrap().directory().unwrap().unreadable, 3);
    // A refresh reads the readable version.
    assert_eq!(
        consent::sync::refresh_directory(&store, &client)
            .await
            .unwrap(),
        5
    );
    let d = store.lock().unwrap().directory().unwrap();
    assert_eq!(d.unreadable, 2);
    assert_eq!(d.name_of(&fac("1312345672")), Some("新宿医院"));

    // A directory that cannot be read whole leaves the copy as it was, and the consent
    // cache fresh: the directory never decides.
    let stopped = consent::sync::refresh_directory(
        &store,
        &common::client("127.0.0.1:9".parse().unwrap(), "/fhir"),
    )
    .await;
    assert!(stopped.is_err());
    assert_eq!(store.lock().unwrap().directory().unwrap(), d);
    assert_eq!(decide(&store, &pid, "1312345679", DAY), Decision::Permit);
    assert_eq!(
        decide(&store, &pid, "1312345670", DAY),
        Decision::Deny(DenyReason::RecipientNotDisclosed),
        "named in the directory, not in the consent"
    );
}
