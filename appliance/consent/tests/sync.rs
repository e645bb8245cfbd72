//! Issue 4, sync with the strict FHIR R4 test server (validates every resource against the
//! official R4 JSON schema):
//! 3. push a consent and an identity link, read them back with FHIR search; change and
//!    withdraw them on the server; the box's decisions change after one pull;
//! 4. a push interrupted (the server stored it, the box did not record the acknowledgement,
//!    or the server was unreachable) completes exactly once: no duplicate resources;
//! 5. server down for longer than the freshness bound: decisions become Deny(stale); server
//!    back: they recover without a restart.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use consent::decide::{Decision, DenyReason};
use consent::fhir::CONSENT_ID_SYSTEM;
use consent::model::{Category, Patient, PatientId, Recipient, Scope, Sex};
use consent::store::{AuditKey, NewConsent, Store};
use consent::sync::{Client, round};
use consent::time;
use hil_tests::fhir::{Server, Validator, http, schema_path};
use serde_json::Value;
use tsunagi_config::FacilityCode;

const PATIENT_SYSTEM: &str = "urn:oid:1.2.392.100495.20.3.51.11312345678";

fn fac(code: &str) -> FacilityCode {
    FacilityCode::try_from(code).unwrap()
}

fn server() -> SocketAddr {
    let schema = schema_path().expect("the FHIR R4 schema (cargo xtask test installs it)");
    let validator = Validator::load(&schema).unwrap();
    Server::new(validator)
        .spawn("127.0.0.1:0".parse().unwrap())
        .unwrap()
}

fn client(addr: SocketAddr) -> Client {
    Client::new(addr, "/fhir", Duration::from_secs(5))
}

fn get(addr: SocketAddr, target: &str) -> Value {
    let r = http::request(addr, "GET", target, None).unwrap();
    assert_eq!(
        r.status,
        200,
        "{target}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

fn put(addr: SocketAddr, target: &str, body: &Value) {
    let r = http::request(addr, "PUT", target, Some(body.to_string().as_bytes())).unwrap();
    assert!(
        r.status == 200 || r.status == 201,
        "{target}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

fn enc(s: &str) -> String {
    s.replace(':', "%3A")
        .replace('|', "%7C")
        .replace('/', "%2F")
}

fn clinic(dir: &std::path::Path) -> (Mutex<Store>, PatientId, String) {
    let key = AuditKey::load_or_create(&dir.join("audit.key")).unwrap();
    let mut store = Store::open(&dir.join("consent.db"), fac("1312345678"), key).unwrap();
    let pid: PatientId = "0001234".parse().unwrap();
    let now = time::now();
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
        .add_link(&pid, &fac("1312345679"), "A-77", now)
        .unwrap();
    let c = store
        .record_consent(
            NewConsent {
                patient: pid.clone(),
                scope: Scope::Facilities([fac("1312345679")].into()),
                excluded: BTreeSet::new(),
                categories: [Category::Images, Category::LabResults].into(),
                valid_from: now - 86_400,
                valid_until: None,
                evidence: None,
            },
            now,
        )
        .unwrap();
    (Mutex::new(store), pid, c.id)
}

fn decide(store: &Mutex<Store>, pid: &PatientId, to: &str, bound: Duration) -> Decision {
    let now = time::now();
    store
        .lock()
        .unwrap()
        .decide(
            pid,
            &to.parse::<Recipient>().unwrap(),
            Category::Images,
            now,
            now,
            bound,
        )
        .unwrap()
}

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn push_read_back_change_and_withdraw_on_the_server() {
    let addr = server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, cid) = clinic(dir.path());
    // Before any pull: fail closed.
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::CacheStale)
    );

    let r = round(&store, &client(addr)).await.unwrap();
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
    let mut actors = server_consent["provision"]["actor"]
        .as_array()
        .unwrap()
        .clone();
    let mut extra = actors[0].clone();
    extra["reference"]["identifier"]["value"] = Value::from("1312345670");
    actors.push(extra);
    server_consent["provision"]["actor"] = Value::from(actors);
    server_consent.as_object_mut().unwrap().remove("meta");
    put(addr, &format!("/fhir/Consent/{id}"), &server_consent);
    let r = round(&store, &client(addr)).await.unwrap();
    assert_eq!(r.changed, 1, "{r:?}");
    assert_eq!(decide(&store, &pid, "1312345670", DAY), Decision::Permit);

    // Withdrawn on the network: one pull later, the box denies.
    server_consent["status"] = Value::from("inactive");
    put(addr, &format!("/fhir/Consent/{id}"), &server_consent);
    round(&store, &client(addr)).await.unwrap();
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
    let addr = server();
    let dir = tempfile::tempdir().unwrap();
    let (store, _pid, cid) = clinic(dir.path());

    // 1. The server is unreachable: the push stays queued, with the reason.
    let down = client("127.0.0.1:9".parse().unwrap());
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
    round(&store, &client(addr)).await.unwrap();
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
    let r = round(&store, &client(addr)).await.unwrap();
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
    let addr = server();
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, _) = clinic(dir.path());
    // Timestamps are whole seconds: keep well clear of the boundary on a loaded machine.
    let bound = Duration::from_secs(3);
    round(&store, &client(addr)).await.unwrap();
    assert_eq!(decide(&store, &pid, "1312345679", bound), Decision::Permit);
    // The server goes away (from the box's view, nothing answers).
    let down = client("127.0.0.1:9".parse().unwrap());
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
    round(&store, &client(addr)).await.unwrap();
    assert_eq!(decide(&store, &pid, "1312345679", bound), Decision::Permit);
}
