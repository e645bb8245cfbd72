//! Issue 5, acceptance 3 and 4: the SS-MIX2 sync service under the supervisor, with the
//! consent service deciding and a real nginx (HTTPS WebDAV, client certificate required) as
//! the hub's replica, verified on nginx's own disk.
#![expect(
    clippy::disallowed_methods,
    reason = "the shared harness polls real processes from plain threads"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hil_tests::nginx::Nginx;
use ssmix2::build::{Patient, Record, Storage};
use ssmix2::datatype::DUMMY_ORDER_NO;

/// A clinic: a storage, the consent service, the sync service, and the hub's nginx.
struct Clinic {
    h: Harness,
    nginx: Nginx,
    storage: Storage,
    form: PathBuf,
}

/// Every file under `root`: relative path → SHA-256.
fn tree(root: &Path) -> BTreeMap<String, String> {
    ssmix2::build::digests(root)
}

/// What the hub must hold: the storage's non-quarantined files of permitted patients in a
/// shared category.
fn expected(storage: &Path, permitted: &BTreeSet<String>) -> BTreeMap<String, String> {
    ssmix2_sync::sync::expected_replica(storage, |p| permitted.contains(p)).unwrap()
}

fn patient_of(path: &str) -> Option<&str> {
    path.split('/').nth(2)
}

impl Clinic {
    fn new(supervisor: &str) -> Clinic {
        Clinic::with(supervisor, "poll", "1s")
    }

    fn with(supervisor: &str, watch: &str, scan_interval: &str) -> Clinic {
        let nginx = Nginx::start_for_test();
        let h = Harness::new("");
        let storage = Storage::create(&h.dir.path().join("ssmix2").join("1312345678")).unwrap();
        // The box's client certificate and key, readable by the sync service's user only.
        let (ca, cert, key) = service_tls_files(
            &h.dir.path().join("tls"),
            ssmix2_sync::USER,
            &nginx.ca_file(),
            &nginx.client_cert_file(),
            &nginx.client_key_file(),
        );
        let config = format!(
            "{supervisor}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\n\n[ssmix2]\nstorage = \"{}\"\nwatch = \"{watch}\"\nscan-interval = \"{scan_interval}\"\nsettle = \"1s\"\nconfirm-deletion = \"1s\"\n\n[ssmix2.replica]\nurl = \"{}\"\nca-file = \"{}\"\nclient-cert-file = \"{}\"\nclient-key-file = \"{}\"\n",
            storage.root().display(),
            nginx.base_url(),
            ca.display(),
            cert.display(),
            key.display(),
        );
        h.write_config(&config);
        let form = h.dir.path().join("consent-form.pdf");
        std::fs::write(&form, b"%PDF-1.4 scanned consent form").unwrap();
        Clinic {
            h,
            nginx,
            storage,
            form,
        }
    }

    fn consent(&self, args: &[&str]) {
        let out = Command::new(BIN)
            .arg("consent")
            .args(args)
            .arg("--config")
            .arg(&self.h.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn register(&self, patient: &str) {
        register_consent(&self.h, &self.form, patient, &[]);
    }

    fn synced(&self) {
        mark_consent_synced(&self.h);
    }

    fn hub(&self) -> BTreeMap<String, String> {
        tree(self.nginx.data_root())
    }

    /// Waits until the hub holds exactly `want`; fails with the difference.
    fn wait_for_hub(&self, what: &str, want: &BTreeMap<String, String>, timeout: Duration) {
        let start = Instant::now();
        loop {
            let got = self.hub();
            if &got == want {
                return;
            }
            if start.elapsed() > timeout {
                let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
                let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
                let differ: Vec<_> = want
                    .iter()
                    .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
                    .map(|(k, _)| k)
                    .collect();
                panic!(
                    "{what}: the hub did not converge within {timeout:?}\nmissing {missing:?}\nextra {extra:?}\ndiffer {differ:?}\n{}",
                    self.h
                        .log_text()
                        .lines()
                        .rev()
                        .take(40)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn records(s: &mut Storage, p: &Patient) {
    s.put(
        p,
        &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120093000000"),
    )
    .unwrap();
    s.put(
        p,
        &Record::new("ADT-22", "20261120", DUMMY_ORDER_NO, "20261120100000000"),
    )
    .unwrap();
    s.put(
        p,
        &Record::new("OMP-01", "20261120", "000000000000001", "20261120103000000"),
    )
    .unwrap();
    s.put(
        p,
        &Record::new("OML-11", "20261120", "000000000000002", "20261120113000000"),
    )
    .unwrap();
}

/// Also issue 17: every file put at nginx is an Export message at the audit repository, and
/// every deletion a Patient Record (D), the file named by its content (RFC 6920), never by
/// its path, and the patient (without a network ID here) by the box's pseudonym.
#[test]
fn creates_updates_deletes_and_withdrawals_reach_nginx_and_nothing_else_does() {
    let (rsyslog, audit, _audit_files) = audit_repository(None, None);
    let mut c = Clinic::new(&format!("{FAST_SUPERVISOR}{audit}"));
    let (a, b, cc) = (
        Patient::sample("0000000001"),
        Patient::sample("0000000002"),
        Patient::sample("0000000003"),
    );
    for p in [&a, &b, &cc] {
        records(&mut c.storage, p);
    }
    // A and C consent; B does not.
    c.register(&a.id);
    c.register(&cc.id);
    c.synced();
    let mut permitted: BTreeSet<String> = [a.id.clone(), cc.id.clone()].into();
    c.h.start();
    let watching = Arc::new(AtomicBool::new(true));
    // B's files must never appear on nginx's disk, at any moment.
    let leak = {
        let (root, b_id, watching) = (
            c.nginx.data_root().to_owned(),
            b.id.clone(),
            watching.clone(),
        );
        std::thread::spawn(move || {
            while watching.load(Ordering::SeqCst) {
                if tree(&root)
                    .keys()
                    .any(|k| patient_of(k) == Some(b_id.as_str()))
                {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
    };
    c.wait_for_hub(
        "first sync",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(60),
    );
    let first = c.hub();

    // Creates, an update (_1 → _2 plus a new _1) and a delete (_0 plus the tombstone).
    c.storage
        .put(
            &a,
            &Record::new("OMP-01", "20261121", "000000000000003", "20261121103000000"),
        )
        .unwrap();
    let old = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120093000000");
    let new = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261121093000000").with_note("住所変更");
    c.storage.update(&cc, &old, &new, false).unwrap();
    let rx = Record::new("OMP-01", "20261120", "000000000000001", "20261120103000000");
    let tomb = Record::new("OMP-01", "20261120", "000000000000001", "20261122103000000");
    c.storage.delete(&a, &rx, &tomb).unwrap();
    c.wait_for_hub(
        "changes",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(60),
    );
    let hub = c.hub();
    assert!(
        hub.keys()
            .any(|k| k.ends_with("_2") && k.contains("ADT-00")),
        "the update's history is at the hub"
    );
    assert!(
        hub.keys()
            .filter(|k| k.contains("/OMP-01/")
                && patient_of(k) == Some(a.id.as_str())
                && k.ends_with("_0"))
            .count()
            >= 2
    );

    // A withdraws at the desk: A's files leave the hub within a cycle or two.
    c.consent(&["withdraw", &a.id, "--recorded-by", "staff-1"]);
    permitted.remove(&a.id);
    c.wait_for_hub(
        "withdrawal",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(30),
    );
    assert!(c.hub().keys().all(|k| patient_of(k) != Some(a.id.as_str())));

    watching.store(false, Ordering::SeqCst);
    assert!(
        !leak.join().unwrap(),
        "a file of the patient without consent appeared at the hub"
    );
    let status = c.h.status().unwrap();
    let metrics = &service(&status, "ssmix2")["metrics"];
    assert_eq!(metrics["outbox_depth"], 0.0, "{status}");
    assert!(metrics["files_seen"].as_f64().unwrap() >= 12.0, "{status}");
    // Every file published and every deletion at the hub is a release row in the consent
    // service's audit trail, naming the file by its SHA-256 and data type (never its path),
    // a send referring to the permit it was decided under (issue 13 item 10).
    c.h.wait_for("the release records", Duration::from_secs(30), |s| {
        service(s, "ssmix2")["metrics"]["release_records_waiting"] == 0.0
    });
    // SS-MIX2 の点検 (issue 19): a file that breaks the naming convention is quarantined,
    // never sent, and the conformance report the console reads names it; the report is the
    // console's group's to read, and no one else's.
    let beside = tree(c.storage.root())
        .into_keys()
        .find(|k| patient_of(k) == Some(cc.id.as_str()))
        .unwrap();
    let bad = Path::new(&beside)
        .parent()
        .unwrap()
        .join("not-an-ssmix2-name.txt")
        .to_string_lossy()
        .into_owned();
    std::fs::write(c.storage.root().join(&bad), "x").unwrap();
    let report_file =
        c.h.runtime_dir()
            .join(ssmix2_sync::REPORT_DIR)
            .join(ssmix2_sync::REPORT_FILE);
    let read_report = || -> Option<ssmix2::conformance::Conformance> {
        serde_json::from_slice(&std::fs::read(&report_file).ok()?).ok()
    };
    c.h.wait_for(
        "the bad file in the conformance report",
        Duration::from_secs(60),
        |_| {
            read_report().is_some_and(|r| {
                r.problems
                    .iter()
                    .any(|p| p.severity == "quarantine" && p.examples.contains(&bad))
            })
        },
    );
    let report = read_report().unwrap();
    assert!(report.status("quarantined") >= 1, "{report:?}");
    assert!(report.status("current") >= 6, "{report:?}");
    assert!(
        !c.hub().contains_key(&bad),
        "a quarantined file reached the hub"
    );
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&report_file).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640);
        if c.h.status().unwrap()["supervisor"]["privileged"] == true {
            let desk = nix::unistd::Group::from_name(consent::desk::GROUP)
                .unwrap()
                .unwrap();
            assert_eq!(meta.gid(), desk.gid.as_raw(), "the report's group");
        }
    }
    // 保留中 (issue 19): what waits, beside the report. The withdrawn patient's files and
    // those of the patient without consent are counted, not listed: none of theirs is.
    {
        use consent::client::DenyReason;
        use ssmix2_sync::sync::waiting::{Waiting, Why};
        let waiting_file = report_file.with_file_name(ssmix2_sync::WAITING_FILE);
        let read_waiting = || -> Option<Waiting> {
            serde_json::from_slice(&std::fs::read(&waiting_file).ok()?).ok()
        };
        let count = |w: &Waiting, why: Why| {
            w.counts
                .iter()
                .find(|(n, _)| *n == why)
                .map_or(0, |(_, n)| *n)
        };
        c.h.wait_for("what waits", Duration::from_secs(60), |_| {
            read_waiting().is_some_and(|w| {
                count(&w, Why::Consent(DenyReason::Withdrawn)) >= 3
                    && count(&w, Why::Consent(DenyReason::NoConsent)) >= 3
            })
        });
        let w = read_waiting().unwrap();
        assert!(
            w.files
                .iter()
                .all(|f| f.patient_id != a.id && f.patient_id != b.id),
            "{w:?}"
        );
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(
            std::fs::metadata(&waiting_file).unwrap().mode() & 0o777,
            0o640
        );
    }
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
    let db =
        rusqlite::Connection::open(c.h.state_dir().join("consent").join("consent.db")).unwrap();
    let rows = |kind: &str, sha: &str| -> i64 {
        db.query_row(
            "SELECT count(*) FROM audit r WHERE r.decision = ?1 AND r.object LIKE 'ssmix2:___-__:' || ?2
               AND r.recipient = 'hub' AND r.reason = ''
               AND (r.decision = 'deleted' OR EXISTS (SELECT 1 FROM audit d WHERE d.seq = r.decision_seq
                    AND d.decision = 'permit' AND d.recipient = 'hub' AND d.category = r.category))",
            [kind, sha],
            |r| r.get(0),
        )
        .unwrap()
    };
    for (path, sha) in &first {
        assert!(rows("sent", sha) >= 1, "no release row for {path}");
        if patient_of(path) == Some(a.id.as_str()) {
            assert!(rows("deleted", sha) >= 1, "no deletion row for {path}");
        }
    }
    // The same at the audit repository (ATNA): sent before the stop, or at the next start.
    c.h.start();
    c.h.wait_for("the restart", Duration::from_secs(30), |s| {
        state_of(s, "audit") == "ready" && state_of(s, "ssmix2") == "ready"
    });
    let has = |messages: &[String], event: &str, action: &str, sha: &str| {
        let uri = audit::protocol::content_uri(sha);
        messages.iter().any(|m| {
            m.contains(&format!("csd-code=\"{event}\""))
                && m.contains(&format!("EventActionCode=\"{action}\""))
                && m.contains(&format!("ParticipantObjectID=\"{uri}\""))
        })
    };
    let start = Instant::now();
    loop {
        let messages = rsyslog.messages();
        let missing: Vec<&String> = first
            .iter()
            .filter(|(path, sha)| {
                !has(&messages, "110106", "R", sha)
                    || (patient_of(path) == Some(a.id.as_str())
                        && !has(&messages, "110110", "D", sha))
            })
            .map(|(path, _)| path)
            .collect();
        if missing.is_empty() {
            for m in &messages {
                for p in [&a, &b, &cc] {
                    assert!(!m.contains(&p.id), "a clinic's patient ID in {m}");
                }
            }
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not at the audit repository: {missing:?}\n{}",
            c.h.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
    let leaked: i64 = db
        .query_row(
            "SELECT count(*) FROM audit WHERE object LIKE ?1",
            [format!("%{}%", a.id)],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leaked, 0, "no patient ID in what the trail names");
    let out = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&c.h.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

const KILLABLE_SUPERVISOR: &str = r#"
[supervisor]
stop-timeout = "2s"
ready-timeout = "10s"
backoff-initial = "100ms"
backoff-max = "500ms"
crash-limit = 100
crash-window = "1m"
failed-retry = "10m"
stable-after = "30s"
"#;

#[test]
fn kill_9_twenty_times_during_a_1000_file_sync_converges_without_partial_files() {
    let mut c = Clinic::new(KILLABLE_SUPERVISOR);
    let mut permitted = BTreeSet::new();
    // 100 patients × 10 files; 80 of them consent.
    for i in 1..=100u32 {
        let p = Patient::sample(&format!("{i:010}"));
        records(&mut c.storage, &p);
        for k in 0..6u32 {
            let order = format!("{:015}", 100 + k);
            c.storage
                .put(
                    &p,
                    &Record::new("OMP-01", "20261121", &order, "20261121103000000"),
                )
                .unwrap();
        }
        if i <= 80 {
            c.register(&p.id);
            permitted.insert(p.id.clone());
        }
    }
    c.synced();
    let want = expected(c.storage.root(), &permitted);
    assert_eq!(want.len(), 800);
    let source = tree(c.storage.root());
    assert_eq!(source.len(), 1000);
    c.h.start();

    // Watch nginx's disk all along: a file under a final name is always complete.
    let watching = Arc::new(AtomicBool::new(true));
    let checker = {
        let (root, watching, source) = (
            c.nginx.data_root().to_owned(),
            watching.clone(),
            source.clone(),
        );
        std::thread::spawn(move || {
            let mut violations = Vec::new();
            let mut looks = 0u64;
            while watching.load(Ordering::SeqCst) {
                for (path, digest) in tree(&root) {
                    let name = path.rsplit('/').next().unwrap_or("");
                    if ssmix2_sync::replica::RelPath::is_part_name(name) {
                        continue;
                    }
                    if source.get(&path) != Some(&digest) {
                        violations.push(path);
                    }
                }
                looks += 1;
            }
            (violations, looks)
        })
    };

    let mut rng = fastrand::Rng::with_seed(5);
    let mut kills = 0;
    let mut mid_sync = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while kills < 20 && Instant::now() < deadline {
        let status =
            c.h.wait_for("the sync service", Duration::from_secs(30), |s| {
                state_of(s, "ssmix2") == "ready"
            });
        let Some(pid) = pid_of(&status, "ssmix2") else {
            continue;
        };
        std::thread::sleep(Duration::from_millis(rng.u64(50..600)));
        let published = c.hub().len();
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
        {
            kills += 1;
            if published < want.len() {
                mid_sync += 1;
            }
        }
        c.h.wait_for("the restart", Duration::from_secs(30), |s| {
            pid_of(s, "ssmix2").is_some_and(|p| p != pid)
        });
    }
    assert_eq!(kills, 20, "could not kill the service 20 times");
    assert!(
        mid_sync >= 5,
        "only {mid_sync} kills hit the sync while it was still publishing"
    );
    c.wait_for_hub(
        "convergence after 20 kills",
        &want,
        Duration::from_secs(120),
    );
    watching.store(false, Ordering::SeqCst);
    let (violations, looks) = checker.join().unwrap();
    assert!(looks > 10, "the checker looked only {looks} times");
    assert!(
        violations.is_empty(),
        "files under final names that were not complete: {violations:?}"
    );
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

#[test]
fn inotify_notices_a_new_file_long_before_the_rescan() {
    let mut c = Clinic::with(FAST_SUPERVISOR, "inotify", "1h");
    let a = Patient::sample("0000000001");
    records(&mut c.storage, &a);
    c.register(&a.id);
    c.synced();
    let permitted: BTreeSet<String> = [a.id.clone()].into();
    c.h.start();
    c.wait_for_hub(
        "first sync",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(60),
    );
    // The rescan is an hour away: only an inotify event can bring this file to the hub.
    c.storage
        .put(
            &a,
            &Record::new("OMP-01", "20261121", "000000000000009", "20261121103000000"),
        )
        .unwrap();
    c.wait_for_hub(
        "the change noticed by inotify",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(20),
    );
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// Issue 13, item 5: a withdrawal recorded at the desk while the network's consent service
/// cannot be reached (the cache stale, nothing new published) still removes the patient's
/// files from the hub's WebDAV server within a cycle; the other patient's files stay.
#[test]
fn a_withdrawal_recorded_while_the_cache_is_stale_removes_the_files_at_nginx() {
    let mut c = Clinic::new(FAST_SUPERVISOR);
    let (a, b) = (Patient::sample("0000000001"), Patient::sample("0000000002"));
    for p in [&a, &b] {
        records(&mut c.storage, p);
    }
    c.register(&a.id);
    c.register(&b.id);
    c.synced();
    let both: BTreeSet<String> = [a.id.clone(), b.id.clone()].into();
    c.h.start();
    c.wait_for_hub(
        "first sync",
        &expected(c.storage.root(), &both),
        Duration::from_secs(60),
    );
    // The network has not been reached for three days: decisions are stale.
    let db = c.h.state_dir().join("consent").join("consent.db");
    rusqlite::Connection::open(db)
        .unwrap()
        .execute(
            "UPDATE sync_state SET last_pull_at = last_pull_at - 3 * 86400",
            [],
        )
        .unwrap();
    // A new file of B is not published from a stale cache...
    c.storage
        .put(
            &b,
            &Record::new("OMP-01", "20261121", "000000000000007", "20261121103000000"),
        )
        .unwrap();
    // ...and A's withdrawal at the desk removes A's files all the same.
    c.consent(&["withdraw", &a.id, "--recorded-by", "desk-1"]);
    let only_b: BTreeMap<String, String> = expected(c.storage.root(), &[b.id.clone()].into())
        .into_iter()
        .filter(|(k, _)| !k.contains("000000000000007"))
        .collect();
    c.wait_for_hub("the withdrawal", &only_b, Duration::from_secs(60));
    // And it stays so: the stale cache publishes nothing new.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.hub(), only_b);
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// Issue 16: `client-identity = true`: the sync presents the box's own certificate, which
/// the identity service publishes in `STATE/identity-client` (group tsunagi-box-cert). Before
/// the box is enrolled there is none: the sync says so and keeps trying, without a restart.
/// Once it is there the files reach nginx; when it changes (a renewal), the sync sets up its
/// client again and goes on.
#[test]
fn the_boxs_own_certificate_is_presented_and_taken_up_again_when_renewed() {
    if !is_root() {
        eprintln!("skipped: needs root (the services' users and groups)");
        return;
    }
    let mut c = Clinic::new(FAST_SUPERVISOR);
    let text = std::fs::read_to_string(&c.h.config).unwrap();
    let start = text.find("client-cert-file").unwrap();
    let text = format!(
        "{}client-identity = true\n\n[identity]\nenabled = true\ncheck-interval = \"1s\"\n",
        &text[..start]
    );
    std::fs::write(&c.h.config, text).unwrap();
    let a = Patient::sample("0000000001");
    records(&mut c.storage, &a);
    c.register(&a.id);
    c.synced();
    let permitted: BTreeSet<String> = [a.id.clone()].into();
    c.h.start();
    let waiting =
        c.h.wait_for("no certificate yet", Duration::from_secs(30), |s| {
            service(s, "ssmix2")["summary"]
                .as_str()
                .is_some_and(|t| t.contains("cannot set up the replica"))
        });
    assert_eq!(service(&waiting, "ssmix2")["restarts"], 0, "{waiting}");
    assert!(c.hub().is_empty());

    // What the identity service publishes once the box is enrolled.
    let client = c.h.state_dir().join("identity-client");
    let group = nix::unistd::Group::from_name(identity::CLIENT_GROUP)
        .unwrap()
        .expect("the group exists");
    let publish = |from: &Path, name: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = client.join(format!(".{name}.new"));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640)).unwrap();
        nix::unistd::chown(&tmp, None, Some(group.gid)).unwrap();
        std::fs::rename(&tmp, client.join(name)).unwrap();
    };
    publish(&c.nginx.client_key_file(), "box.key");
    publish(&c.nginx.client_cert_file(), "box.pem");
    c.wait_for_hub(
        "with the box's certificate",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(60),
    );

    // Renewed: the sync sets its client up again, and goes on.
    std::thread::sleep(Duration::from_millis(1100));
    publish(&c.nginx.client_cert_file(), "box.pem");
    c.storage
        .put(
            &a,
            &Record::new("OMP-01", "20261121", "000000000000009", "20261121103000000"),
        )
        .unwrap();
    c.wait_for_hub(
        "after the renewal",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(60),
    );
    assert!(
        c.h.log_text()
            .contains("the TLS files changed; setting up the replica again"),
        "{}",
        c.h.log_text()
    );
    let status = c.h.status().unwrap();
    assert_eq!(service(&status, "ssmix2")["restarts"], 0, "{status}");
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// Issue 17: a hub replica the box cannot verify (its certificate from another CA) is
/// refused, nothing reaches it, and the refusal is a Security Alert (Node Authentication) at
/// the audit repository, once however many cycles retry; with the network CA back in place
/// the files go.
#[test]
fn a_replica_the_box_cannot_verify_is_refused_and_the_refusal_is_audited() {
    let (rsyslog, audit, _audit_files) = audit_repository(None, None);
    let mut c = Clinic::new(&format!("{FAST_SUPERVISOR}{audit}"));
    let a = Patient::sample("0000000001");
    records(&mut c.storage, &a);
    c.register(&a.id);
    c.synced();
    // The box trusts another CA than the one that signed nginx's certificate.
    let other_dir = tempfile::tempdir().unwrap();
    let other = hil_tests::nginx::Pki::generate(other_dir.path()).unwrap();
    let ca = c.h.dir.path().join("tls").join("ca.pem");
    let network_ca = std::fs::read(&ca).unwrap();
    std::fs::write(&ca, std::fs::read(other.ca_cert()).unwrap()).unwrap();
    c.h.start();
    let alert = |m: &String| {
        m.contains("csd-code=\"110113\"")
            && m.contains("csd-code=\"110126\"")
            && m.contains("the hub&apos;s SS-MIX2 replica")
    };
    audit_messages_until(
        &rsyslog,
        "the refused replica",
        Duration::from_secs(60),
        |ms| ms.iter().any(alert),
    );
    assert!(c.hub().is_empty());
    // Several cycles later: still one alert.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(rsyslog.messages().iter().filter(|m| alert(m)).count(), 1);
    // The network CA back: the files go.
    std::fs::write(&ca, network_ca).unwrap();
    let permitted: BTreeSet<String> = [a.id.clone()].into();
    c.wait_for_hub(
        "after the CA is fixed",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(60),
    );
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// The nginx master `pid` and its workers (ours: the test started the master).
fn nginx_processes(pid: u32) -> Vec<nix::unistd::Pid> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .map(|p: u32| nix::unistd::Pid::from_raw(i32::try_from(p).unwrap()))
        .collect()
}

/// Issue 18: the installer reboots the box into an update only between SS-MIX2 cycles. A
/// cycle is held under way (the hub's nginx stopped while a new file is put); `tsunagi
/// update install` installs (RAUC stands in) and then waits, saying why, past several of
/// its polls; once nginx goes on, the cycle ends and only then does the box reboot
/// (`systemctl` stands in: it records what the hub held at that moment, which must
/// include the file the held cycle brought).
#[test]
fn the_reboot_into_an_update_waits_for_an_unfinished_ssmix2_cycle() {
    let tools = tempfile::tempdir().unwrap();
    let os_release = tools.path().join("os-release");
    std::fs::write(&os_release, "ID=tsunagi\nIMAGE_VERSION=1.0.0\n").unwrap();
    let update = format!(
        "\n[update]\nos-release = \"{}\"\n\n[update.window]\nall-day = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n",
        os_release.display()
    );
    let mut c = Clinic::with(&format!("{FAST_SUPERVISOR}{update}"), "inotify", "1h");
    let a = Patient::sample("0000000001");
    records(&mut c.storage, &a);
    c.register(&a.id);
    c.synced();
    let permitted: BTreeSet<String> = [a.id.clone()].into();
    c.h.start();
    c.wait_for_hub(
        "first sync",
        &expected(c.storage.root(), &permitted),
        Duration::from_secs(60),
    );

    // A verified download and the update service's request for it.
    let bundle = b"a bundle RAUC stands in for".to_vec();
    let sha = sha256_hex(&bundle);
    let update_dir = c.h.state_dir().join("update");
    std::fs::create_dir_all(update_dir.join("downloads")).unwrap();
    std::fs::write(
        update_dir.join("downloads").join(format!("{sha}.raucb")),
        &bundle,
    )
    .unwrap();
    update::install::write_request(
        &update_dir.join(update::install::INSTALL_DIR),
        &update::install::Request {
            version: "1.1.0".parse().unwrap(),
            sha256: sha,
        },
    )
    .unwrap();
    let script = |name: &str, text: String| {
        let path = tools.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    };
    let rauc = script(
        "rauc",
        "#!/bin/sh\ncase \"$1\" in\ninfo) printf \"RAUC_MF_COMPATIBLE='tsunagi'\\nRAUC_MF_VERSION='1.1.0'\\n\" ;;\ninstall) echo '100% Installing done.' ;;\n*) exit 1 ;;\nesac\n".into(),
    );
    let rebooted = tools.path().join("rebooted");
    let bin = tools.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    script(
        "bin/systemctl",
        format!(
            "#!/bin/sh\n[ \"$1\" = reboot ] || exit 1\ncd '{}' && find . -type f | sort > '{}'\n",
            c.nginx.data_root().display(),
            rebooted.display()
        ),
    );

    // The hub stops answering while the clinic's system writes a new file: a cycle begins
    // and cannot end.
    let nginx = nginx_processes(c.nginx.pid().unwrap());
    for p in &nginx {
        nix::sys::signal::kill(*p, nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    let resume = || {
        for p in &nginx {
            let _ = nix::sys::signal::kill(*p, nix::sys::signal::Signal::SIGCONT);
        }
    };
    c.storage
        .put(
            &a,
            &Record::new("OMP-01", "20261121", "000000000000007", "20261121103000000"),
        )
        .unwrap();
    let want = expected(c.storage.root(), &permitted);
    let cycling = |s: &serde_json::Value| service(s, "ssmix2")["metrics"]["cycle_running"] == 1.0;
    c.h.wait_for("a cycle under way", Duration::from_secs(20), cycling);

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut installer = Command::new(BIN)
        .args(["update", "install", "--rauc"])
        .arg(&rauc)
        .arg("--incoming")
        .arg(tools.path().join("incoming"))
        .arg("--config")
        .arg(&c.h.config)
        .env("PATH", path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let said = Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (said, stdout) = (said.clone(), installer.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                let mut s = said.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    let waiting = "tsunagi update: the reboot waits for an SS-MIX2 sync cycle";
    let start = Instant::now();
    while !said.lock().unwrap().contains(waiting) {
        if start.elapsed() > Duration::from_secs(20) {
            resume();
            panic!("the installer does not wait:\n{}", said.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past two of its polls (5 s each), the cycle still under way: no reboot.
    std::thread::sleep(Duration::from_secs(11));
    let held = c.h.status().is_some_and(|s| cycling(&s));
    resume();
    assert!(held, "the cycle ended while nginx was stopped");
    assert!(
        !rebooted.exists() && installer.try_wait().unwrap().is_none(),
        "the box rebooted during an SS-MIX2 cycle:\n{}",
        said.lock().unwrap()
    );

    // The hub answers again: the cycle ends, then the box reboots.
    let status = (0..400)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            installer.try_wait().unwrap()
        })
        .unwrap_or_else(|| panic!("no reboot after the cycle:\n{}", said.lock().unwrap()));
    reader.join().unwrap();
    let said = said.lock().unwrap().clone();
    assert!(status.success(), "{said}");
    assert!(
        said.contains("tsunagi update: rebooting into 1.1.0"),
        "{said}"
    );
    let at_reboot = std::fs::read_to_string(&rebooted).unwrap();
    for file in want.keys() {
        assert!(
            at_reboot.lines().any(|l| l.ends_with(file.as_str())),
            "{file} was not at the hub when the box rebooted:\n{at_reboot}"
        );
    }
    c.h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// The SHA-256 of `bytes`, in hex.
fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
