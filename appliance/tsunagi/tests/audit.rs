//! The `audit` service under the supervisor (issue 17): its start is recorded and reaches a
//! real rsyslog with gnutls over syslog-TLS; an event handed over its socket arrives after
//! it, in order; an rsyslog outage delays but loses nothing; its stop is recorded and sent
//! at the next start.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use hil_tests::nginx::Pki;
use hil_tests::rsyslog::{Options, Rsyslog, Tls};
use nix::sys::signal::Signal;

/// The `sequenceId`s and MSGs rsyslog wrote, once `n` lines are there (at most 30 s).
fn received(rsyslog: &Rsyslog, n: usize, h: &Harness) -> Vec<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = rsyslog.messages();
        if lines.len() >= n {
            return lines
                .iter()
                .map(|l| {
                    let at = l.find("sequenceId=\"").expect(l) + "sequenceId=\"".len();
                    let seq = l[at..].split('"').next().unwrap().parse().unwrap();
                    (seq, l.clone())
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages at rsyslog\n{}\n{}",
            lines.len(),
            rsyslog.log(),
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn record(h: &Harness, line: &str) -> String {
    let path = h.runtime_dir().join("audit").join("record.sock");
    let mut stream = UnixStream::connect(&path).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    answer
}

#[test]
fn the_audit_service_sends_its_start_and_what_it_is_handed_and_keeps_them_through_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let mut rsyslog = Rsyslog::start(
        &Tls {
            cert: network.server_cert(),
            key: network.server_key(),
            client_ca: network.ca_cert(),
        },
        &Options::default(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ca, cert, key) = service_tls_files(
        &dir.path().join("tls"),
        audit::service::USER,
        &network.ca_cert(),
        &network.client_cert(),
        &network.client_key(),
    );
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[audit]\nenabled = true\nrepository = \"{}\"\nca-file = \"{}\"\nclient-cert-file = \"{}\"\nclient-key-file = \"{}\"\ntimeout = \"5s\"\n",
        rsyslog.addr(),
        ca.display(),
        cert.display(),
        key.display(),
    ));
    h.start();
    h.wait_for("the audit service", Duration::from_secs(30), |s| {
        state_of(s, "audit") == "ready"
    });
    // Its own start, sent at once.
    let first = received(&rsyslog, 1, &h);
    assert!(first[0].1.contains("csd-code=\"110120\""), "{}", first[0].1);
    // An event handed over the socket: recorded (committed), then sent.
    let answer = record(
        &h,
        r#"{"record":{"instances-transferred":{"sent":true,"peer-ae":"ORTHANC","peer-address":"10.98.0.1","result":"success","patient":{"network":"TSUNAGI-NET-0042"},"study-uid":"1.2.392.1","sop-classes":[["1.2.840.10008.5.1.4.1.1.2",3]]}}}"#,
    );
    assert!(answer.starts_with(r#"{"recorded":{"seq":2}}"#), "{answer}");
    let two = received(&rsyslog, 2, &h);
    assert!(two[1].1.contains("TSUNAGI-NET-0042"), "{}", two[1].1);
    // Not XML, not an event: refused, nothing recorded.
    let bad = record(&h, r#"{"record":{"xml":"<AuditMessage/>"}}"#);
    assert!(bad.starts_with(r#"{"error":"#), "{bad}");
    // An outage: 20 events recorded while rsyslog is down, all there once it is back.
    rsyslog.stop().unwrap();
    for i in 0..20 {
        let answer = record(
            &h,
            &format!(
                r#"{{"record":{{"patient-record":{{"action":"U","patient":{{"network":"TSUNAGI-NET-{i:04}"}},"what":"consent"}}}}}}"#
            ),
        );
        assert!(answer.starts_with(r#"{"recorded":"#), "{answer}");
    }
    h.wait_for("the audit service degraded", Duration::from_secs(30), |s| {
        service(s, "audit")["summary"]
            .as_str()
            .is_some_and(|t| t.contains("last send failed"))
    });
    rsyslog.start_again().unwrap();
    let all = received(&rsyslog, 22, &h);
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=22).collect::<Vec<_>>());
    // The stop is recorded, and sent at the next start (after the next start's own).
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
    h.start();
    let after = received(&rsyslog, 24, &h);
    assert!(
        after[22].1.contains("csd-code=\"110121\""),
        "{}",
        after[22].1
    );
    assert!(
        after[23].1.contains("csd-code=\"110120\""),
        "{}",
        after[23].1
    );
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// A repository whose certificate the box cannot verify (another CA) is refused, and the
/// refusal is a Security Alert (Node Authentication) in the trail itself, recorded once and
/// sent once the repository can be verified (the network CA put in place: taken up without
/// a restart).
#[test]
fn a_repository_the_box_cannot_verify_is_refused_and_the_refusal_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let other = Pki::generate(&dir.path().join("other")).unwrap();
    let rsyslog = Rsyslog::start(
        &Tls {
            cert: network.server_cert(),
            key: network.server_key(),
            client_ca: network.ca_cert(),
        },
        &Options::default(),
    )
    .unwrap();
    // The box trusts another CA than the one that signed the repository's certificate.
    let (ca, cert, key) = service_tls_files(
        &dir.path().join("tls"),
        audit::service::USER,
        &other.ca_cert(),
        &network.client_cert(),
        &network.client_key(),
    );
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[audit]\nenabled = true\nrepository = \"{}\"\nca-file = \"{}\"\nclient-cert-file = \"{}\"\nclient-key-file = \"{}\"\ntimeout = \"5s\"\n",
        rsyslog.addr(),
        ca.display(),
        cert.display(),
        key.display(),
    ));
    h.start();
    let status = h.wait_for("the refusal", Duration::from_secs(30), |s| {
        service(s, "audit")["summary"]
            .as_str()
            .is_some_and(|t| t.contains("last send failed") && t.contains("refused"))
    });
    println!("{}", service(&status, "audit")["summary"]);
    assert!(rsyslog.messages().is_empty());
    // Several retries later, the network's CA is put in place.
    std::thread::sleep(Duration::from_secs(4));
    let mut ca_pem = std::fs::read(network.ca_cert()).unwrap();
    ca_pem.extend_from_slice(b"\n");
    std::fs::write(&ca, ca_pem).unwrap();
    let messages = received(&rsyslog, 2, &h);
    assert!(
        messages[0].1.contains("csd-code=\"110120\""),
        "{}",
        messages[0].1
    );
    let alert = &messages[1].1;
    assert!(alert.contains("csd-code=\"110113\""), "{alert}");
    assert!(alert.contains("csd-code=\"110126\""), "{alert}");
    assert!(
        alert.contains(&format!("ParticipantObjectID=\"{}\"", rsyslog.addr())),
        "{alert}"
    );
    // Once, however many retries it took.
    std::thread::sleep(Duration::from_secs(2));
    let all = rsyslog.messages();
    assert_eq!(
        all.iter()
            .filter(|m| m.contains("csd-code=\"110126\""))
            .count(),
        1,
        "{all:?}"
    );
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// A failed `tsunagi audit verify` (a row of the consent trail altered) is a Security Alert
/// (Audit Recording Stopped) at the repository, handed over by the consent service.
#[test]
fn a_failed_audit_verify_reaches_the_repository_as_a_security_alert() {
    let (rsyslog, audit, _audit_files) = audit_repository(None, None);
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\n{audit}"
    ));
    let form = h.dir.path().join("form.pdf");
    std::fs::write(&form, b"%PDF-1.4 consent").unwrap();
    register_consent(&h, &form, "0001234", &[]);
    let decide = std::process::Command::new(BIN)
        .args(["consent", "decide", "0001234", "hub", "images", "--config"])
        .arg(&h.config)
        .output()
        .unwrap();
    assert!(decide.status.success(), "{decide:?}");
    rusqlite::Connection::open(h.state_dir().join("consent").join("consent.db"))
        .unwrap()
        .execute("UPDATE audit SET reason = 'altered' WHERE seq = 1", [])
        .unwrap();
    let verify = std::process::Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&h.config)
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(1), "{verify:?}");
    h.start();
    let messages = audit_messages_until(
        &rsyslog,
        "the failed verification",
        Duration::from_secs(30),
        |ms| {
            ms.iter()
                .any(|m| m.contains("csd-code=\"110113\"") && m.contains("csd-code=\"110133\""))
        },
    );
    let alert = messages
        .iter()
        .find(|m| m.contains("csd-code=\"110133\""))
        .unwrap();
    assert!(alert.contains("broken at row 1"), "{alert}");
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// Issue 17: each medium `apply` refused (or applied) is sent on to the ATNA audit trail by
/// the `audit` service from the provisioning trail: a refusal is a Security Alert (Security
/// Configuration) with its reason, at a real rsyslog.
#[test]
fn a_refused_medium_reaches_the_audit_repository_as_a_security_alert() {
    let k = ring::signature::Ed25519KeyPair::from_pkcs8(
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    // A medium without a signature (nothing of it is read before one verifies).
    let media = tempfile::tempdir().unwrap();
    let unsigned = media.path().join("unsigned");
    std::fs::create_dir_all(&unsigned).unwrap();
    std::fs::write(unsigned.join(tsunagi_medium::BUNDLE_FILE), b"{}").unwrap();
    let (rsyslog, audit, _audit_files) = audit_repository(None, None);
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n{audit}"
    ));
    let keys = tempfile::tempdir().unwrap();
    let public = keys.path().join("provisioning.pub");
    std::fs::write(&public, tsunagi_medium::public_key_text(&k)).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["medium", "apply"])
        .arg(&unsigned)
        .arg("--key")
        .arg(&public)
        .arg("--state-dir")
        .arg(h.state_dir())
        .arg("--config")
        .arg(keys.path().join("not-written.toml"))
        .arg("--network-dir")
        .arg(keys.path().join("network"))
        .arg("--time-dir")
        .arg(keys.path().join("time"))
        .env_remove("TSUNAGI_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    h.start();
    let messages = audit_messages_until(
        &rsyslog,
        "the refused medium",
        Duration::from_secs(30),
        |ms| ms.iter().any(|m| m.contains("the medium is not signed")),
    );
    let alert = messages
        .iter()
        .find(|m| m.contains("the medium is not signed"))
        .unwrap();
    assert!(alert.contains("csd-code=\"110113\""), "{alert}");
    assert!(alert.contains("csd-code=\"110129\""), "{alert}");
    assert!(alert.contains("EventOutcomeIndicator=\"4\""), "{alert}");
    // Once: the trail is not read again from its start.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        rsyslog
            .messages()
            .iter()
            .filter(|m| m.contains("the medium is not signed"))
            .count(),
        1
    );
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}
