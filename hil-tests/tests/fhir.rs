//! The FHIR test server (`hil_tests::fhir`) over its real HTTP interface: in this process on
//! `127.0.0.1:0`, and once through `testnet fhir-serve`. Needs the schema installed
//! (`cargo xtask test` does it; see hil-tests/README.md); a missing schema fails.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use hil_tests::fhir::{self, Server, Validator, http};
use serde_json::{Value, json};

const JP_PATIENT_ID_SYSTEM: &str = "urn:oid:1.2.392.100495.20.3.51.11312345678";
const ORG_ID_SYSTEM: &str = "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";
const PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";

fn validator() -> Validator {
    let path = fhir::schema_path().unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let validator = Validator::load(&path).unwrap_or_else(|e| panic!("{e:?}"));
    eprintln!(
        "schema compiled in {} ms ({} Medplum definitions pruned)",
        started.elapsed().as_millis(),
        validator.pruned().len()
    );
    validator
}

/// A fresh server on a free loopback port.
fn server() -> SocketAddr {
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Server::new(validator()).spawn(loopback).unwrap()
}

fn call(addr: SocketAddr, method: &str, target: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    let response = http::request(addr, method, target, body.as_deref()).unwrap();
    (response.status, response.json())
}

fn patient(value: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": JP_PATIENT_ID_SYSTEM, "value": value}],
        "name": [
            {
                "extension": [{
                    "url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                    "valueCode": "IDE"
                }],
                "use": "official",
                "text": "山田 太郎",
                "family": "山田",
                "given": ["太郎"]
            },
            {
                "extension": [{
                    "url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                    "valueCode": "SYL"
                }],
                "use": "official",
                "text": "ヤマダ タロウ",
                "family": "ヤマダ",
                "given": ["タロウ"]
            }
        ],
        "gender": "male",
        "birthDate": "1970-01-01"
    })
}

fn organization(value: &str) -> Value {
    json!({
        "resourceType": "Organization",
        "identifier": [{"system": ORG_ID_SYSTEM, "value": value}],
        "name": "つなぎ診療所"
    })
}

fn consent(patient_reference: &str, org_number: &str) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/consentscope",
            "code": "patient-privacy"
        }]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient_reference},
        "policyRule": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "OPTIN"
        }]},
        "provision": {
            "type": "permit",
            "actor": [{
                "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]},
                "reference": {"reference": format!("Organization?identifier={ORG_ID_SYSTEM}|{org_number}")}
            }]
        }
    })
}

fn without_meta(mut resource: Value) -> Value {
    let obj = resource.as_object_mut().unwrap();
    obj.remove("meta");
    obj.remove("id");
    resource
}

fn search(addr: SocketAddr, target: &str) -> Value {
    let (status, bundle) = call(addr, "GET", target, None);
    assert_eq!(status, 200, "{target}: {bundle}");
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "searchset");
    bundle
}

fn identifier_query(system: &str, value: &str) -> String {
    format!("identifier={}%7C{value}", system.replace(':', "%3A"))
}

fn assert_outcome(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(body["issue"][0]["severity"], "error", "{body}");
    assert_eq!(body["issue"][0]["code"], code, "{body}");
    assert!(body["issue"][0]["diagnostics"].is_string(), "{body}");
}

#[test]
fn valid_patient_is_created_and_reads_back() {
    let addr = server();
    let sent = patient("0001234");
    let response = http::request(
        addr,
        "POST",
        "/fhir/Patient",
        Some(&serde_json::to_vec(&sent).unwrap()),
    )
    .unwrap();
    assert_eq!(
        response.status,
        201,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let created = response.json();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        response.header("location"),
        Some(format!("/fhir/Patient/{id}/_history/1").as_str())
    );
    assert_eq!(created["meta"]["versionId"], "1");
    let last_updated = created["meta"]["lastUpdated"].as_str().unwrap();
    assert!(
        last_updated.ends_with('Z') && last_updated.contains('T'),
        "{last_updated}"
    );

    let (status, read) = call(addr, "GET", &format!("/fhir/Patient/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(read, created);
    assert_eq!(without_meta(read), sent);
    let (status, vread) = call(addr, "GET", &format!("/fhir/Patient/{id}/_history/1"), None);
    assert_eq!((status, vread), (200, created));

    let (status, body) = call(addr, "GET", "/fhir/Patient/nope", None);
    assert_outcome(status, &body, 404, "not-found");
}

#[test]
fn invalid_resources_are_rejected_and_nothing_is_stored() {
    let addr = server();
    let query = format!(
        "/fhir/Patient?{}",
        identifier_query(JP_PATIENT_ID_SYSTEM, "0009999")
    );
    let mut bad_gender = patient("0009999");
    bad_gender["gender"] = json!("x");
    let mut bad_date = patient("0009999");
    bad_date["birthDate"] = json!("2020-13-40");
    let mut unknown_property = patient("0009999");
    unknown_property["favouriteColour"] = json!("blue");
    let mut bad_kana_name = patient("0009999");
    bad_kana_name["name"][1]["given"] = json!("タロウ"); // must be an array
    for (what, body, needle) in [
        ("gender", &bad_gender, "/gender"),
        ("birthDate", &bad_date, "/birthDate"),
        ("unknown property", &unknown_property, "favouriteColour"),
        ("name.given", &bad_kana_name, "/name/1/given"),
    ] {
        for (method, target) in [("POST", "/fhir/Patient"), ("PUT", query.as_str())] {
            let (status, outcome) = call(addr, method, target, Some(body));
            assert_outcome(status, &outcome, 400, "invalid");
            let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
            assert!(diagnostics.contains(needle), "{what}: {diagnostics}");
        }
    }
    assert_eq!(search(addr, &query)["total"], 0);
    assert_eq!(search(addr, "/fhir/Patient")["total"], 0);

    // Wrong resourceType for the URL, id mismatch on update, unknown type, wrong media type.
    let (status, body) = call(addr, "POST", "/fhir/Organization", Some(&patient("1")));
    assert_outcome(status, &body, 400, "invalid");
    let mut with_id = patient("1");
    with_id["id"] = json!("a");
    let (status, body) = call(addr, "PUT", "/fhir/Patient/b", Some(&with_id));
    assert_outcome(status, &body, 400, "invalid");
    let (status, body) = call(addr, "PUT", "/fhir/Patient/a", Some(&patient("1")));
    assert_outcome(status, &body, 400, "invalid");
    let (status, body) = call(addr, "GET", "/fhir/Observation/1", None);
    assert_outcome(status, &body, 404, "not-supported");
    let (status, body) = call(addr, "GET", "/fhir/_count", None);
    assert_outcome(status, &body, 404, "not-supported");
    assert_eq!(search(addr, "/fhir/Patient")["total"], 0);
    assert_eq!(search(addr, "/fhir/Organization")["total"], 0);
}

#[test]
fn conditional_update_by_identifier_never_duplicates() {
    let addr = server();
    let query = format!(
        "/fhir/Patient?{}",
        identifier_query(JP_PATIENT_ID_SYSTEM, "0001234")
    );
    let (status, first) = call(addr, "PUT", &query, Some(&patient("0001234")));
    assert_eq!(status, 201, "{first}");
    let mut changed = patient("0001234");
    changed["gender"] = json!("other");
    let (status, second) = call(addr, "PUT", &query, Some(&changed));
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["meta"]["versionId"], "2");
    assert!(second["meta"]["lastUpdated"].as_str() > first["meta"]["lastUpdated"].as_str());
    let bundle = search(addr, &query);
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"], second);
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        format!("Patient/{}", first["id"].as_str().unwrap())
    );

    // Two matches: 412, and nothing changes.
    let (status, _) = call(addr, "POST", "/fhir/Patient", Some(&patient("0001234")));
    assert_eq!(status, 201);
    let (status, body) = call(addr, "PUT", &query, Some(&patient("0001234")));
    assert_outcome(status, &body, 412, "multiple-matches");
    let bundle = search(addr, &query);
    assert_eq!(bundle["total"], 2);
    let versions: Vec<&str> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["meta"]["versionId"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["2", "1"], "sorted by lastUpdated ascending");
}

#[test]
fn concurrent_conditional_updates_make_one_resource() {
    let addr = server();
    let query = format!(
        "/fhir/Patient?{}",
        identifier_query(JP_PATIENT_ID_SYSTEM, "0007777")
    );
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let query = query.clone();
            std::thread::spawn(move || call(addr, "PUT", &query, Some(&patient("0007777"))).0)
        })
        .collect();
    let mut statuses: Vec<u16> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 201]);
    let bundle = search(addr, &query);
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["meta"]["versionId"], "8");
}

#[test]
fn consent_with_conditional_actor_reference_search_and_cursor() {
    let addr = server();
    let (status, patient) = call(addr, "POST", "/fhir/Patient", Some(&patient("0001234")));
    assert_eq!(status, 201);
    let patient_ref = format!("Patient/{}", patient["id"].as_str().unwrap());
    // Reference.reference is a plain FHIR `string` in the R4 schema, so a conditional
    // reference (`Organization?identifier=...`) is valid and stored as given.
    let (status, first) = call(
        addr,
        "POST",
        "/fhir/Consent",
        Some(&consent(&patient_ref, "1312345678")),
    );
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        first["provision"]["actor"][0]["reference"]["reference"],
        format!("Organization?identifier={ORG_ID_SYSTEM}|1312345678")
    );
    let mut other = consent("Patient/someone-else", "1312345678");
    other["status"] = json!("inactive");
    let (status, _) = call(addr, "POST", "/fhir/Consent", Some(&other));
    assert_eq!(status, 201);
    let (status, second) = call(
        addr,
        "POST",
        "/fhir/Consent",
        Some(&consent(&patient_ref, "1399999999")),
    );
    assert_eq!(status, 201);

    let bundle = search(addr, &format!("/fhir/Consent?patient={patient_ref}"));
    assert_eq!(bundle["total"], 2);
    assert_eq!(bundle["entry"][0]["resource"], first);
    assert_eq!(bundle["entry"][1]["resource"], second);

    // The cursor: only resources updated after the first one.
    let cursor = first["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .replace('+', "%2B");
    let newer = search(
        addr,
        &format!("/fhir/Consent?patient={patient_ref}&_lastUpdated=gt{cursor}"),
    );
    assert_eq!(newer["total"], 1);
    assert_eq!(newer["entry"][0]["resource"], second);
    let all_newer = search(
        addr,
        &format!("/fhir/Consent?_lastUpdated=gt{cursor}&_count=1"),
    );
    assert_eq!(all_newer["total"], 2);
    assert_eq!(all_newer["entry"].as_array().unwrap().len(), 1);
    let last = second["meta"]["lastUpdated"].as_str().unwrap();
    assert_eq!(
        search(addr, &format!("/fhir/Consent?_lastUpdated=gt{last}"))["total"],
        0
    );
    assert_eq!(
        search(addr, &format!("/fhir/Consent?_lastUpdated=ge{last}"))["total"],
        1
    );

    // An invalid Consent (no scope) is rejected.
    let mut invalid = consent(&patient_ref, "1");
    invalid.as_object_mut().unwrap().remove("scope");
    let (status, body) = call(addr, "POST", "/fhir/Consent", Some(&invalid));
    assert_outcome(status, &body, 400, "invalid");
    assert_eq!(search(addr, "/fhir/Consent")["total"], 3);
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

fn post_entry(full_url: &str, resource: Value) -> Value {
    let ty = resource["resourceType"].as_str().unwrap().to_owned();
    json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": ty}})
}

#[test]
fn transaction_is_all_or_nothing() {
    let addr = server();
    let patient_url = "urn:uuid:6f1c6a52-8d0e-4a51-9a55-0f3c1f1e2a01";
    let org_query = identifier_query(ORG_ID_SYSTEM, "1312345678");
    let bundle = transaction(vec![
        json!({
            "fullUrl": "urn:uuid:6f1c6a52-8d0e-4a51-9a55-0f3c1f1e2a00",
            "resource": organization("1312345678"),
            "request": {"method": "PUT", "url": format!("Organization?{org_query}")}
        }),
        post_entry(patient_url, patient("0001234")),
        post_entry(
            "urn:uuid:6f1c6a52-8d0e-4a51-9a55-0f3c1f1e2a02",
            consent(patient_url, "1312345678"),
        ),
    ]);
    let (status, response) = call(addr, "POST", "/fhir", Some(&bundle));
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["type"], "transaction-response");
    let entries = response["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    for entry in entries {
        assert_eq!(entry["response"]["status"], "201 Created", "{entry}");
        let location = entry["response"]["location"].as_str().unwrap();
        assert!(location.ends_with("/_history/1"), "{location}");
    }
    let patient_id = entries[1]["resource"]["id"].as_str().unwrap();
    // The Consent's reference to the bundle-local fullUrl now points at the stored Patient.
    let consents = search(addr, &format!("/fhir/Consent?patient=Patient/{patient_id}"));
    assert_eq!(consents["total"], 1);
    assert_eq!(
        search(addr, &format!("/fhir/Organization?{org_query}"))["total"],
        1
    );

    // The same Organization again (conditional: updates) plus an invalid Patient: 400,
    // and nothing from the bundle is stored.
    let mut invalid = patient("0005555");
    invalid["birthDate"] = json!("2020-13-40");
    let mut renamed = organization("1312345678");
    renamed["name"] = json!("改名");
    let bad = transaction(vec![
        json!({"resource": renamed, "request": {"method": "PUT", "url": format!("Organization?{org_query}")}}),
        post_entry(
            "urn:uuid:6f1c6a52-8d0e-4a51-9a55-0f3c1f1e2a03",
            patient("0004444"),
        ),
        post_entry("urn:uuid:6f1c6a52-8d0e-4a51-9a55-0f3c1f1e2a04", invalid),
    ]);
    let (status, body) = call(addr, "POST", "/fhir", Some(&bad));
    assert_outcome(status, &body, 400, "invalid");
    assert!(
        body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .starts_with("entry[2]: "),
        "{body}"
    );
    assert_eq!(search(addr, "/fhir/Patient")["total"], 1);
    let orgs = search(addr, "/fhir/Organization");
    assert_eq!(orgs["total"], 1);
    assert_eq!(orgs["entry"][0]["resource"]["name"], "つなぎ診療所");
    assert_eq!(orgs["entry"][0]["resource"]["meta"]["versionId"], "1");

    // Not a transaction, or an unsupported entry: rejected as a whole.
    let mut batch = transaction(vec![]);
    batch["type"] = json!("batch");
    let (status, body) = call(addr, "POST", "/fhir", Some(&batch));
    assert_outcome(status, &body, 400, "not-supported");
}

#[test]
fn unknown_search_parameters_are_rejected() {
    let addr = server();
    for target in [
        "/fhir/Patient?name=yamada",
        "/fhir/Patient?identifier:text=x",
        "/fhir/Patient?patient=Patient/1",
        "/fhir/Consent?_sort=-_lastUpdated",
        "/fhir/Organization?_lastUpdated=gt2026-01-01",
        "/fhir/Patient?_count=abc",
    ] {
        let (status, body) = call(addr, "GET", target, None);
        assert_eq!(status, 400, "{target}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome", "{target}");
    }
    assert_eq!(search(addr, "/fhir/Patient?_count=0")["total"], 0);
}

#[test]
fn searches_page_with_next_links_sort_by_last_updated_and_chain_to_the_patient() {
    let addr = server();
    // Two of this clinic's patients and one of another clinic, with two consents each, all
    // in one transaction: every entry shares one lastUpdated.
    let mut entries = Vec::new();
    for (i, system) in [
        JP_PATIENT_ID_SYSTEM,
        JP_PATIENT_ID_SYSTEM,
        "urn:oid:1.2.392.100495.20.3.51.11399999999",
    ]
    .into_iter()
    .enumerate()
    {
        let url = format!("urn:uuid:6f1c6a52-8d0e-4a51-9a55-0f3c1f1e2b{i:02}");
        let mut p = patient(&format!("000{i}"));
        p["identifier"][0]["system"] = json!(system);
        entries.push(post_entry(&url, p));
        for k in 0..2 {
            entries.push(post_entry(
                &format!("urn:uuid:6f1c6a52-8d0e-4a51-9a55-0f3c1f1e2c{i}{k}"),
                consent(&url, "1312345678"),
            ));
        }
    }
    let (status, response) = call(addr, "POST", "/fhir", Some(&transaction(entries)));
    assert_eq!(status, 200, "{response}");
    let stamps: std::collections::BTreeSet<&str> = response["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["lastModified"].as_str().unwrap())
        .collect();
    assert_eq!(stamps.len(), 1, "one lastUpdated per transaction");

    // Token search by system only.
    let system_only = format!("identifier={}%7C", JP_PATIENT_ID_SYSTEM.replace(':', "%3A"));
    assert_eq!(
        search(addr, &format!("/fhir/Patient?{system_only}"))["total"],
        2
    );

    // The chain, in pages of three, oldest first (ties by id), with a next link that
    // carries the continuation and is absolute on this server.
    let first = search(
        addr,
        &format!("/fhir/Consent?patient:Patient.{system_only}&_sort=_lastUpdated&_count=3"),
    );
    assert_eq!(first["total"], 4);
    assert_eq!(first["entry"].as_array().unwrap().len(), 3);
    let next = first["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = next
        .strip_prefix(&format!("http://{addr}"))
        .unwrap_or_else(|| panic!("{next}"));
    assert!(path.contains("_continue="), "{path}");
    let second = search(addr, path);
    assert_eq!(second["entry"].as_array().unwrap().len(), 1);
    assert!(
        !second["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "next")
    );
    let ids: Vec<&str> = first["entry"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["entry"].as_array().unwrap())
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ids, sorted, "ties in id order, none twice");

    // Still strict.
    for target in [
        "/fhir/Consent?_continue=x".to_owned(),
        "/fhir/Consent?_sort=_lastUpdated&_sort=_lastUpdated".to_owned(),
        format!("/fhir/Patient?patient:Patient.{system_only}"),
        format!("/fhir/Consent?patient.{system_only}"),
    ] {
        let (status, body) = call(addr, "GET", &target, None);
        assert_eq!(status, 400, "{target}: {body}");
    }
}

/// Kills the child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn testnet_fhir_serve_runs_the_server() {
    let schema = fhir::schema_path().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_testnet"))
            .args(["fhir-serve", "127.0.0.1:0", "--schema"])
            .arg(&schema)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix(fhir::READY_LINE)
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .trim()
        .parse()
        .unwrap();
    let health = http::request(addr, "GET", "/health", None).unwrap();
    assert_eq!(health.status, 200);
    let (status, created) = call(addr, "POST", "/fhir/Organization", Some(&organization("1")));
    assert_eq!(status, 201, "{created}");
    let (status, body) = call(
        addr,
        "POST",
        "/fhir/Organization",
        Some(&json!({"resourceType": "Organization", "active": "yes"})),
    );
    assert_outcome(status, &body, 400, "invalid");
    // It started with the test network's facility directory.
    assert_eq!(
        search(addr, "/fhir/Organization")["total"],
        fhir::SAMPLE_DIRECTORY.len() + 1
    );
    let (code, name) = (fhir::SAMPLE_DIRECTORY[1].1, fhir::SAMPLE_DIRECTORY[1].2);
    let found = search(
        addr,
        &format!(
            "/fhir/Organization?{}",
            identifier_query(fhir::INSTITUTION_SYSTEM, code)
        ),
    );
    assert_eq!(found["entry"][0]["resource"]["name"], name, "{found}");
}
