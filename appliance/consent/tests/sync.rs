//! Issue 4, sync with the strict FHIR R4 test server (validates every resource against the
//! official R4 JSON schema):
//! 3. push a consent and an identity link, read them back with FHIR search; change and
//!    withdraw them on the server; the box's decisions change after one pull;
//! 4. a push interrupted (the server stored it, the box did not record the acknowledgement,
//!    or the server was unreachable) completes exactly once: no duplicate resources;
//! 5. server down for longer than the freshness bound: decisions become Deny(stale); server
//!    back: they recover without a restart.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use consent::decide::{Decision, DenyReason};
use consent::fhir::CONSENT_ID_SYSTEM;
use consent::store::{AuditKey, Store};
use consent::sync::round;
use serde_json::Value;

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
    store
        .lock()
        .unwrap()
        .connection()
        .execute("UPDATE outbox SET done_at = NULL", [])
        .unwrap();
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
    store
        .lock()
        .unwrap()
        .connection()
        .execute("UPDATE outbox SET done_at = NULL", [])
        .unwrap();
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
