//! Helpers shared by the sync tests (strict test server) and the interop stage (helios-hfs).
#![allow(dead_code, unreachable_pub)] // Each test file uses a different part of it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use consent::decide::Decision;
use consent::model::{Category, Patient, PatientId, Recipient, Scope, Sex};
use consent::store::{AuditKey, NewConsent, Store};
use consent::sync::Client;
use consent::time;
use hil_tests::fhir::http;
use serde_json::Value;
use tsunagi_config::FacilityCode;

pub const PATIENT_SYSTEM: &str = "urn:oid:1.2.392.100495.20.3.51.11312345678";

pub fn fac(code: &str) -> FacilityCode {
    FacilityCode::try_from(code).unwrap()
}

pub fn strict_server() -> SocketAddr {
    use hil_tests::fhir::{Server, Validator, schema_path};
    let schema = schema_path().expect("the FHIR R4 schema (cargo xtask test installs it)");
    let validator = Validator::load(&schema).unwrap();
    Server::new(validator)
        .spawn("127.0.0.1:0".parse().unwrap())
        .unwrap()
}

pub fn client(addr: SocketAddr, base: &str) -> Client {
    Client::new(addr, base, Duration::from_secs(10))
}

pub fn get(addr: SocketAddr, target: &str) -> Value {
    let r = http::request(addr, "GET", target, None).unwrap();
    assert_eq!(
        r.status,
        200,
        "{target}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

pub fn put(addr: SocketAddr, target: &str, body: &Value) {
    let r = http::request(addr, "PUT", target, Some(body.to_string().as_bytes())).unwrap();
    assert!(
        r.status == 200 || r.status == 201,
        "{target}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Marks every outbox entry as not yet pushed, as a restart that lost the acknowledgements
/// would find them: the next round pushes them all again.
pub fn replay_outbox(store: &Mutex<Store>) {
    store
        .lock()
        .unwrap()
        .connection()
        .execute("UPDATE outbox SET done_at = NULL", [])
        .unwrap();
}

pub fn clinic(dir: &std::path::Path) -> (Mutex<Store>, PatientId, String) {
    clinic_with_id(dir, "0001234")
}

/// [`clinic`] with another patient ID.
pub fn clinic_with_id(dir: &std::path::Path, id: &str) -> (Mutex<Store>, PatientId, String) {
    let key = AuditKey::load_or_create(&dir.join("audit.key")).unwrap();
    let mut store = Store::open(&dir.join("consent.db"), fac("1312345678"), key).unwrap();
    let pid: PatientId = id.parse().unwrap();
    let now = time::now();
    store.upsert_patient(&sample_patient(&pid), now).unwrap();
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

pub fn decide(store: &Mutex<Store>, pid: &PatientId, to: &str, bound: Duration) -> Decision {
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

pub const DAY: Duration = Duration::from_secs(86_400);

/// A Consent resource as read from a server, changed to disclose to one more facility and
/// ready to be sent back (without its `meta`).
pub fn disclosed_to_one_more(consent: &Value, code: &str) -> Value {
    let mut consent = consent.clone();
    let mut actors = consent["provision"]["actor"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut extra = actors.first().cloned().unwrap_or_default();
    extra["reference"]["identifier"]["value"] = Value::from(code);
    actors.push(extra);
    consent["provision"]["actor"] = Value::from(actors);
    if let Some(object) = consent.as_object_mut() {
        object.remove("meta");
    }
    consent
}

/// Posts a transaction Bundle; returns the response Bundle.
pub fn transaction(addr: SocketAddr, entries: Vec<Value>) -> Value {
    let bundle =
        serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let r = http::request(addr, "POST", "/fhir", Some(bundle.to_string().as_bytes())).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// A Patient of the network with one identifier.
pub fn network_patient(system: &str, value: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": value}],
        "gender": "unknown",
    })
}

/// A Consent recorded on the network: permit to every participant, images, since 2020.
pub fn network_consent(patient_reference: &str, id: &str) -> Value {
    serde_json::json!({
        "resourceType": "Consent",
        "identifier": [{"system": consent::fhir::CONSENT_ID_SYSTEM, "value": id}],
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient_reference},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {
            "type": "permit",
            "period": {"start": "2020-01-01"},
            "code": [{"coding": [{"system": consent::fhir::CATEGORY_SYSTEM, "code": "images"}]}],
        },
    })
}

/// A transaction entry that creates `resource` under the bundle-local `full_url`.
pub fn create_entry(full_url: &str, resource: Value) -> Value {
    let ty = resource["resourceType"].as_str().unwrap().to_owned();
    serde_json::json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": ty}})
}

/// Registers a patient on the box (demographics as in `clinic`).
pub fn register(store: &Mutex<Store>, id: &str) -> PatientId {
    let pid: PatientId = id.parse().unwrap();
    store
        .lock()
        .unwrap()
        .upsert_patient(&sample_patient(&pid), time::now())
        .unwrap();
    pid
}

/// The sample demographics every test patient has.
pub fn sample_patient(id: &PatientId) -> Patient {
    Patient {
        id: id.clone(),
        family_kanji: "山田".into(),
        given_kanji: "花子".into(),
        family_kana: "ヤマダ".into(),
        given_kana: "ハナコ".into(),
        birth_date: "1950-04-01".into(),
        sex: Sex::Female,
        network_id: None,
    }
}

/// A decision for images or another category to a facility, now.
pub fn decide_category(
    store: &Mutex<Store>,
    pid: &PatientId,
    to: &str,
    category: Category,
) -> Decision {
    let now = time::now();
    store
        .lock()
        .unwrap()
        .decide(
            pid,
            &to.parse::<Recipient>().unwrap(),
            category,
            now,
            now,
            DAY,
        )
        .unwrap()
}
