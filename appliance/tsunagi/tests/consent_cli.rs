//! Issue 4: the clinic's consent workflow on the command line, decisions as the services get
//! them, and acceptance 6: `tsunagi audit verify` passes on an untouched trail and names the
//! row after a row is altered or deleted directly in SQLite.
#![expect(
    clippy::disallowed_methods,
    reason = "the shared harness polls real processes from plain threads"
)]

mod common;

use std::process::{Command, Output};

use common::*;

struct Clinic {
    h: Harness,
    form: std::path::PathBuf,
}

impl Clinic {
    fn new() -> Clinic {
        Clinic::with("")
    }

    fn with(extra: &str) -> Clinic {
        let h = Harness::new(extra);
        let form = h.dir.path().join("consent-form.pdf");
        std::fs::write(&form, b"%PDF-1.4 scanned consent form").unwrap();
        Clinic { h, form }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("consent")
            .args(args)
            .arg("--config")
            .arg(&self.h.config)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// `register PATIENT` with the desk's answers but the form's two questions.
    fn register_args<'a>(&self, patient: &'a str, form: &'a str) -> Vec<&'a str> {
        vec![
            "register",
            patient,
            "--family",
            "山田",
            "--given",
            "花子",
            "--family-kana",
            "ヤマダ",
            "--given-kana",
            "ハナコ",
            "--birth-date",
            "1950-04-01",
            "--sex",
            "female",
            "--evidence",
            form,
            "--recorded-by",
            "staff-1",
        ]
    }

    fn register(&self, patient: &str, extra: &[&str]) -> String {
        let form = self.form.display().to_string();
        let mut args = self.register_args(patient, &form);
        args.extend_from_slice(extra);
        // The form's two questions are always answered on the command line.
        for flag in ["--scope", "--categories"] {
            if !extra.contains(&flag) {
                args.extend_from_slice(&[flag, "all"]);
            }
        }
        self.ok(&args)
    }

    /// Simulates a successful pull from the network (the sync comes with the service).
    fn synced(&self) {
        mark_consent_synced(&self.h);
    }

    fn decide(&self, patient: &str, recipient: &str, category: &str) -> serde_json::Value {
        self.json(&["decide", patient, recipient, category])
    }

    fn audit(&self) -> Output {
        Command::new(BIN)
            .args(["audit", "verify", "--config"])
            .arg(&self.h.config)
            .output()
            .unwrap()
    }

    fn tamper(&self, sql: &str) {
        let db = self.h.state_dir().join("consent").join("consent.db");
        rusqlite::Connection::open(db)
            .unwrap()
            .execute(sql, [])
            .unwrap();
    }
}

#[test]
fn the_clinic_workflow_from_registration_to_withdrawal() {
    let c = Clinic::new();
    let out = c.register(
        "0001234",
        &[
            "--scope",
            "1312345679",
            "--categories",
            "lab-results,images",
        ],
    );
    assert!(out.starts_with("registered consent c-"), "{out}");
    // Never synced: everything leaving the clinic fails closed.
    let d = c.decide("0001234", "1312345679", "images");
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["reason"], "cache-stale");
    c.synced();
    assert_eq!(
        c.decide("0001234", "1312345679", "images")["decision"],
        "permit"
    );
    assert_eq!(
        c.decide("0001234", "1312345679", "prescriptions")["reason"],
        "category-excluded"
    );
    assert_eq!(
        c.decide("0001234", "1312345670", "images")["reason"],
        "recipient-not-disclosed"
    );
    // 名寄せ: the other facility's ID from the referral letter.
    let link = c.json(&[
        "link",
        "0001234",
        "--facility",
        "1312345679",
        "--id",
        "A-77",
    ]);
    assert_eq!(
        link["link"]["system"],
        "urn:oid:1.2.392.100495.20.3.51.11312345679"
    );
    // 公開設定: disclose to another facility.
    c.ok(&["disclose", "0001234", "1312345670"]);
    assert_eq!(
        c.decide("0001234", "1312345670", "images")["decision"],
        "permit"
    );
    c.ok(&["undisclose", "0001234", "1312345679"]);
    assert_eq!(
        c.decide("0001234", "1312345679", "images")["reason"],
        "recipient-not-disclosed"
    );
    // Human-readable decision text, as the services would get it.
    let text = c.ok(&["decide", "0001234", "1312345679", "images"]);
    assert_eq!(
        text.trim(),
        "deny: recipient-not-disclosed (the consent does not disclose data to this recipient)"
    );
    // Show.
    let show = c.ok(&["show", "0001234"]);
    assert!(show.contains("山田 花子 (ヤマダ ハナコ)"), "{show}");
    assert!(show.contains("version 3: active"), "{show}");
    // Withdraw: effective at once, even offline.
    c.ok(&["withdraw", "0001234", "--recorded-by", "staff-2"]);
    assert_eq!(c.decide("0001234", "hub", "images")["reason"], "withdrawn");
    // Everything waits for the push.
    let pending = c.json(&["pending"]);
    assert!(
        pending["pending"].as_array().unwrap().len() >= 5,
        "{pending}"
    );
    // Validity: a consent that starts tomorrow.
    c.register("0005678", &["--from", "2099-01-01"]);
    assert_eq!(
        c.decide("0005678", "hub", "images")["reason"],
        "not-yet-valid"
    );
    assert_eq!(
        c.json(&[
            "decide",
            "0005678",
            "hub",
            "images",
            "--at",
            "2099-01-02T09:00:00+09:00"
        ])["decision"],
        "permit"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let c = Clinic::new();
    let cases: [(&[&str], &str); 5] = [
        (
            &["decide", "0009999", "hub", "images"],
            "unknown patient 0009999",
        ),
        (&["decide", "0009999", "131234567", "images"], "10 digits"),
        (
            &["decide", "0009999", "1392345678", "images"],
            "point-table number",
        ),
        (
            &["decide", "0009999", "hub", "x-rays"],
            "unknown data category",
        ),
        (
            &["decide", "0009999", "hub", "images", "--at", "2026-02-30"],
            "has no day 30",
        ),
    ];
    for (args, says) in cases {
        let out = c.run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = c.run(&["withdraw", "0009999", "--recorded-by", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown patient 0009999"));
}

#[test]
fn register_requires_the_scope_and_the_categories_of_the_paper_form() {
    let c = Clinic::new();
    let form = c.form.display().to_string();
    let base = c.register_args("0001234", &form);
    for (given, missing) in [
        (&["--categories", "images"][..], "--scope"),
        (&["--scope", "all"][..], "--categories"),
        (&[][..], "--scope"),
    ] {
        let mut args = base.clone();
        args.extend_from_slice(given);
        let out = c.run(&args);
        assert!(!out.status.success(), "{given:?} must not register");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(missing), "{given:?}: {err}");
    }
    // Nothing was recorded: the patient is unknown.
    let out = c.run(&["decide", "0001234", "hub", "images"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown patient 0001234"));
}

#[test]
fn audit_verify_names_an_altered_or_deleted_row() {
    let c = Clinic::new();
    c.register("0001234", &[]);
    c.synced();
    for category in [
        "images",
        "documents",
        "lab-results",
        "problems",
        "allergies",
    ] {
        c.decide("0001234", "hub", category);
    }
    let out = c.audit();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "audit trail intact: 5 rows"
    );

    c.tamper("UPDATE audit SET decision = 'deny', reason = 'withdrawn' WHERE seq = 2");
    let out = c.audit();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "audit trail BROKEN at row 2: row 2 was altered"
    );

    let c = Clinic::new();
    c.register("0001234", &[]);
    c.synced();
    for _ in 0..4 {
        c.decide("0001234", "hub", "images");
    }
    c.tamper("DELETE FROM audit WHERE seq = 3");
    let out = c.audit();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "audit trail BROKEN at row 3: row 3 was removed"
    );
}

#[test]
fn files_belong_to_the_consent_user_when_run_as_root() {
    if skip_unless_root("files_belong_to_the_consent_user_when_run_as_root") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let c = Clinic::new();
    c.register("0001234", &[]);
    let dir = c.h.state_dir().join("consent");
    let uid = nix::unistd::User::from_name("tsunagi-consent")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    for name in ["consent.db", "audit.key"] {
        let meta = std::fs::metadata(dir.join(name)).unwrap();
        assert_eq!(meta.uid(), uid, "{name}");
        assert_eq!(meta.mode() & 0o077, 0, "{name} must be private");
    }
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
}

/// One request on the decision socket.
fn ask(socket: &std::path::Path, request: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    writeln!(stream, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn the_consent_service_answers_decisions_over_its_socket() {
    let mut c = Clinic::with(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\n"
    ));
    c.register("0001234", &["--categories", "images"]);
    c.synced();
    c.h.start();
    c.h.wait_for("consent ready", std::time::Duration::from_secs(30), |s| {
        state_of(s, "consent") == "ready"
    });
    let socket = c.h.runtime_dir().join("consent").join("decide.sock");
    let permit = ask(
        &socket,
        r#"{"decide":{"patient":"0001234","recipient":{"facility":"1312345679"},"category":"images"}}"#,
    );
    // Each answer carries its decision's row in the audit trail.
    let audit = permit["decided"]["audit"].as_i64().unwrap();
    assert_eq!(
        permit,
        serde_json::json!({"decided": {"decision": "permit", "audit": audit}})
    );
    let deny = ask(
        &socket,
        r#"{"decide":{"patient":"0001234","recipient":"hub","category":"documents"}}"#,
    );
    assert_eq!(
        deny,
        serde_json::json!({"decided": {"decision": "deny", "reason": "category-excluded", "audit": audit + 1}})
    );
    let nobody = ask(
        &socket,
        r#"{"decide":{"patient":"0009999","recipient":"hub","category":"images"}}"#,
    );
    assert_eq!(
        nobody,
        serde_json::json!({"decided": {"decision": "deny", "reason": "no-consent", "audit": audit + 2}})
    );
    // A release refers to the permit it was sent under: one chained row per object.
    let hub = ask(
        &socket,
        r#"{"decide":{"patient":"0001234","recipient":"hub","category":"images"}}"#,
    );
    let hub_permit = hub["decided"]["audit"].as_i64().unwrap();
    assert_eq!(hub["decided"]["decision"], "permit");
    let recorded = ask(
        &socket,
        &format!(
            r#"{{"released":{{"patient":"0001234","recipient":"hub","category":"images","kind":"sent","objects":[{{"dicom-instance":"1.2.3.1"}},{{"dicom-instance":"1.2.3.2"}}],"decision":{hub_permit}}}}}"#
        ),
    );
    assert_eq!(
        recorded,
        serde_json::json!({"recorded": {"audit": hub_permit + 2}})
    );
    // What left is named without patient data: a path carrying the patient ID is refused.
    let path = ask(
        &socket,
        r#"{"released":{"patient":"0001234","recipient":"hub","category":"images","kind":"sent","objects":[{"dicom-instance":"000/12/0001234"}],"decision":1}}"#,
    );
    assert!(
        path["error"].as_str().unwrap().starts_with("objects"),
        "{path}"
    );
    // A category, a reason or a request shape that is not in the protocol is refused, never
    // guessed at (the old untyped request shape included).
    for bad in [
        r#"{"decide":{"patient":"0001234","recipient":"hub","category":"x-rays"}}"#,
        r#"{"patient":"0001234","recipient":"hub","category":"images"}"#,
    ] {
        let bad = ask(&socket, bad);
        assert!(
            bad["error"].as_str().unwrap().starts_with("bad request"),
            "{bad}"
        );
    }
    let junk = ask(&socket, "not json");
    assert!(
        junk["error"].as_str().unwrap().starts_with("bad request"),
        "{junk}"
    );

    // A withdrawal recorded at the desk takes effect for the services at once.
    c.ok(&["withdraw", "0001234", "--recorded-by", "staff-2"]);
    let after = ask(
        &socket,
        r#"{"decide":{"patient":"0001234","recipient":{"facility":"1312345679"},"category":"images"}}"#,
    );
    assert_eq!(after["decided"]["decision"], "deny");
    assert_eq!(after["decided"]["reason"], "withdrawn");

    let status =
        c.h.wait_for("consent status", std::time::Duration::from_secs(15), |s| {
            service(s, "consent")["metrics"]["decisions_deny_total"] == 3.0
        });
    let consent = service(&status, "consent");
    assert_eq!(consent["metrics"]["decisions_permit_total"], 2.0);
    assert_eq!(consent["metrics"]["stale"], 0.0);
    assert_eq!(consent["metrics"]["releases_recorded_total"], 2.0);
    // The head of the trail, to compare with a copy kept elsewhere.
    assert_eq!(
        consent["metrics"]["audit_head_seq"],
        serde_json::json!((audit + 6) as f64)
    );
    let summary = consent["summary"].as_str().unwrap();
    assert!(summary.contains("2 permitted, 3 denied"), "{consent}");
    assert!(
        summary.contains(&format!("audit trail head {}", audit + 6)),
        "{consent}"
    );
    assert_eq!(
        consent["user"],
        if is_root() {
            serde_json::json!("tsunagi-consent")
        } else {
            serde_json::Value::Null
        }
    );
    // Every decision answered is in the audit trail (errors are not decisions).
    let out = c.audit();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("audit trail intact: {} rows", audit + 6),
        "every decision and release is a row"
    );
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        c.h.wait_exit(std::time::Duration::from_secs(15))
            .unwrap()
            .success()
    );
}

#[test]
fn kill_9_with_a_push_pending_then_the_push_completes_exactly_once() {
    use hil_tests::fhir::{Server, Validator, http, schema_path};
    // A port for the network's FHIR server, which is down at first.
    let port = free_port();
    let mut c = Clinic::with(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\nfhir-url = \"http://127.0.0.1:{port}/fhir\"\npull-interval = \"1s\"\n"
    ));
    c.register("0001234", &[]);
    c.h.start();
    let status =
        c.h.wait_for("a failed push", std::time::Duration::from_secs(30), |s| {
            service(s, "consent")["summary"]
                .as_str()
                .is_some_and(|t| t.contains("last sync failed"))
        });
    let pending = c.json(&["pending"]);
    assert_eq!(pending["pending"].as_array().unwrap().len(), 2, "{pending}");
    // kill -9 the consent service with its pushes pending; the supervisor restarts it.
    let pid = pid_of(&status, "consent").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    c.h.wait_for("the restart", std::time::Duration::from_secs(30), |s| {
        pid_of(s, "consent").is_some_and(|p| p != pid) && state_of(s, "consent") == "ready"
    });
    // The network's server comes up: the pushes complete, once.
    let validator = Validator::load(&schema_path().unwrap()).unwrap();
    let addr = Server::new(validator)
        .spawn(format!("127.0.0.1:{port}").parse().unwrap())
        .unwrap();
    c.h.wait_for("the push", std::time::Duration::from_secs(30), |s| {
        service(s, "consent")["metrics"]["pending_pushes"] == 0.0
    });
    // A few more rounds: nothing is pushed twice.
    std::thread::sleep(std::time::Duration::from_secs(2));
    for kind in ["Patient", "Consent"] {
        let r = http::request(addr, "GET", &format!("/fhir/{kind}?_count=100"), None).unwrap();
        assert_eq!(
            r.json()["total"],
            1,
            "{kind}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // The pull refreshed the cache: decisions for the network work now.
    assert_eq!(c.decide("0001234", "hub", "images")["decision"], "permit");
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        c.h.wait_exit(std::time::Duration::from_secs(15))
            .unwrap()
            .success()
    );
}

#[test]
fn one_network_id_belongs_to_one_local_patient() {
    let c = Clinic::new();
    c.register("0001234", &[]);
    c.register("0005678", &[]);
    c.ok(&["network-id", "0001234", "NET-1"]);
    // Again for the same patient: fine, nothing changes.
    c.ok(&["network-id", "0001234", "NET-1"]);
    let out = c.run(&["network-id", "0005678", "NET-1"]);
    assert!(!out.status.success(), "a second holder must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NET-1") && err.contains("already belongs to patient 0001234"),
        "{err}"
    );
    // The first holder keeps it; the second has none.
    let shown = c.json(&["show", "0005678"]);
    assert!(shown["patient"]["network_id"].is_null(), "{shown}");
    let shown = c.json(&["show", "0001234"]);
    assert_eq!(shown["patient"]["network_id"], "NET-1", "{shown}");
}

#[test]
fn audit_verify_never_creates_a_key_and_a_missing_key_is_an_error() {
    let c = Clinic::new();
    let key = c.h.state_dir().join("consent").join("audit.key");
    let out = c.audit();
    assert!(
        !out.status.success(),
        "a trail without its key cannot be verified"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("audit key") && err.contains("missing"),
        "{err}"
    );
    assert!(!key.exists(), "verify must not make a key");
    // Once the box has recorded something (and so made its key), verify works; removing
    // the key afterwards is an error again, not a fresh trail.
    c.register("0001234", &[]);
    assert!(c.audit().status.success());
    std::fs::remove_file(&key).unwrap();
    let out = c.audit();
    assert!(!out.status.success());
    assert!(!key.exists());
}

/// Issue 13 item 10: deleting the whole audit trail (rows and head, the whole database
/// even) used to verify as intact. With the trail anchored at the network, the real
/// service finds it at its next round: status degraded with the reason, `audit verify`
/// fails, and the network's checkpoint (validated by the strict server) keeps the head.
#[test]
fn deleting_the_whole_audit_trail_is_detected_against_the_networks_checkpoint() {
    use hil_tests::fhir::{Server, Validator, http, schema_path};
    let validator = Validator::load(&schema_path().unwrap()).unwrap();
    let addr = Server::new(validator)
        .spawn("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let mut c = Clinic::with(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\nfhir-url = \"http://{addr}/fhir\"\npull-interval = \"1s\"\n"
    ));
    c.register("0001234", &[]);
    for _ in 0..3 {
        c.decide("0001234", "hub", "images");
    }
    c.h.start();
    let status =
        c.h.wait_for("the checkpoint", std::time::Duration::from_secs(30), |s| {
            service(s, "consent")["metrics"]["audit_checkpoint_seq"] == 3.0
        });
    let consent = service(&status, "consent");
    assert_eq!(consent["health"], "ok", "{consent}");
    assert!(
        consent["summary"]
            .as_str()
            .unwrap()
            .contains("the network holds checkpoint 3"),
        "{consent}"
    );
    let checkpoint = http::request(
        addr,
        "GET",
        "/fhir/AuditEvent/tsunagi-audit-1312345678",
        None,
    )
    .unwrap();
    assert_eq!(checkpoint.status, 200);
    assert_eq!(
        checkpoint.json()["entity"][0]["detail"][0]["valueString"],
        "3"
    );

    // Someone deletes the whole trail, head and local anchor included, while the service
    // runs; locally it looks intact.
    let db =
        rusqlite::Connection::open(c.h.state_dir().join("consent").join("consent.db")).unwrap();
    // In one transaction: a service round between the statements would find the head
    // without its row, a reset too but with another reason (seen once under load).
    db.execute_batch(
        "BEGIN IMMEDIATE; DELETE FROM audit; DELETE FROM audit_head; DELETE FROM audit_anchor; COMMIT;",
    )
    .unwrap();
    drop(db);
    let status =
        c.h.wait_for("the reset", std::time::Duration::from_secs(30), |s| {
            service(s, "consent")["metrics"]["audit_reset"] == 1.0
        });
    let consent = service(&status, "consent");
    assert_eq!(consent["health"], "degraded", "{consent}");
    let summary = consent["summary"].as_str().unwrap();
    assert!(
        summary.contains("AUDIT TRAIL RESET") && summary.contains("behind the checkpoint"),
        "{summary}"
    );
    let out = c.audit();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BROKEN") && text.contains("reset or cut"),
        "{text}"
    );
    // The network's checkpoint stays as the evidence.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let checkpoint = http::request(
        addr,
        "GET",
        "/fhir/AuditEvent/tsunagi-audit-1312345678",
        None,
    )
    .unwrap();
    assert_eq!(
        checkpoint.json()["entity"][0]["detail"][0]["valueString"],
        "3"
    );
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        c.h.wait_exit(std::time::Duration::from_secs(15))
            .unwrap()
            .success()
    );
}

/// Issue 19: `tsunagi consent facilities` shows the network's facility directory as the box
/// last read it, and names each entry it does not offer with why, for the operator to find
/// what the network published that the box cannot understand.
#[test]
fn consent_facilities_lists_the_directory_and_what_it_does_not_offer() {
    use consent::model::Facility;
    use consent::store::{DirectoryEntry, SHARED_CODE, Store};
    let c = Clinic::new();
    let v = c.json(&["facilities"]);
    assert_eq!(v["refreshed_at"], serde_json::Value::Null, "{v}");
    assert_eq!(v["facilities"], serde_json::json!([]), "{v}");
    assert!(
        c.ok(&["facilities"]).contains("has not been read yet"),
        "never read"
    );
    let fac = |c: &str| tsunagi_config::FacilityCode::try_from(c).unwrap();
    let mut store =
        Store::open_in(&c.h.state_dir().join("consent"), fac("1312345678"), false).unwrap();
    let entry = |resource: &str, read| DirectoryEntry {
        resource: resource.into(),
        read,
    };
    store
        .replace_directory(
            &[
                entry(
                    "Organization/a",
                    Ok(Facility {
                        code: fac("1312345670"),
                        name: "東京第一病院".into(),
                        active: true,
                    }),
                ),
                entry(
                    "Organization/b",
                    Err((Some(fac("1312345672")), "a modifierExtension".into())),
                ),
                entry(
                    "Organization/c",
                    Ok(Facility {
                        code: fac("1312345672"),
                        name: "新宿医院".into(),
                        active: true,
                    }),
                ),
            ],
            1_796_000_000,
        )
        .unwrap();
    drop(store);
    let v = c.json(&["facilities"]);
    assert_eq!(v["refreshed_at"], 1_796_000_000, "{v}");
    assert_eq!(v["facilities"][0]["name"], "東京第一病院", "{v}");
    assert_eq!(v["facilities"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        v["not_offered"],
        serde_json::json!([
            { "resource": "Organization/b", "code": "1312345672", "why": "a modifierExtension" },
            { "resource": "Organization/c", "code": "1312345672", "why": SHARED_CODE },
        ]),
        "{v}"
    );
    let text = c.ok(&["facilities"]);
    assert!(
        text.contains("1 offered, 2 not offered")
            && text.contains("1312345670  東京第一病院")
            && text.contains("Organization/b  1312345672  a modifierExtension"),
        "{text}"
    );
}
