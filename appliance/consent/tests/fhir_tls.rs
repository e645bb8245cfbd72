//! Issue 17, authenticated links: the consent sync speaks FHIR over mutual TLS. The strict
//! FHIR test server runs behind a real nginx that requires the client certificate
//! (`ssl_verify_client on`); the box verifies nginx against the network CA, name included.
//! Every server the box cannot trust is refused with a reason an operator can act on, and
//! nothing reaches the FHIR server through it; a client without the network's certificate
//! is refused by the server.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use consent::sync::{Client, SyncError, TlsFiles, round};
use hil_tests::nginx::{Nginx, Options, Pki};

/// nginx on loopback in front of the FHIR server at `upstream`, with `pki`'s CA for
/// clients (and `extra_client_ca`), presenting `server_cert` or the PKI's own.
fn tls_front(
    pki: &Pki,
    upstream: SocketAddr,
    server_cert: Option<(PathBuf, PathBuf)>,
    extra_client_ca: Option<PathBuf>,
) -> Nginx {
    Nginx::start_for_test_with(&Options {
        pki: Some(pki.clone()),
        proxy_to: Some(upstream),
        server_cert,
        extra_client_ca,
        ..Options::default()
    })
}

/// The box's files: `network`'s CA, and the client certificate `client` issued.
fn files(network: &Pki, client: &Pki) -> TlsFiles {
    TlsFiles {
        ca_file: network.ca_cert(),
        cert_file: client.client_cert(),
        key_file: client.client_key(),
    }
}

fn tls_client(nginx: &Nginx, files: TlsFiles) -> Client {
    Client::tls(
        SocketAddr::V4(nginx.addr()),
        "/fhir",
        Duration::from_secs(10),
        files,
    )
}

/// How many Patients with the clinic's ID `pid` the FHIR server itself holds.
fn patients_at(fhir: SocketAddr, pid: &consent::model::PatientId) -> u64 {
    let found = get(
        fhir,
        &format!(
            "/fhir/Patient?identifier={}",
            enc(&format!("{PATIENT_SYSTEM}|{pid}"))
        ),
    );
    found["total"].as_u64().unwrap()
}

fn pki(dir: &Path, name: &str) -> Pki {
    Pki::generate(&dir.join(name)).unwrap()
}

#[tokio::test]
async fn the_consent_sync_runs_over_mutual_tls_and_follows_only_https_links() {
    let dir = tempfile::tempdir().unwrap();
    let fhir = strict_server();
    let network = pki(dir.path(), "network");
    let nginx = tls_front(&network, fhir, None, None);
    let (store, pid, consent_id) = clinic(dir.path());
    register(&store, "0005678");
    // One resource per page: the pull follows the server's `next` links, which behind the
    // TLS front are https URLs of the front.
    let client = tls_client(&nginx, files(&network, &network)).with_page_size(1);
    round(&store, &client).await.unwrap();
    let fresh = store.lock().unwrap().freshness(DAY).unwrap();
    assert!(fresh.last_pull.is_some(), "the round refreshed the cache");

    // What the push wrote, read at the FHIR server itself (not through the front).
    let consents = get(
        fhir,
        &format!(
            "/fhir/Consent?identifier={}",
            enc(&format!(
                "{}|{consent_id}",
                consent::fhir::CONSENT_ID_SYSTEM
            ))
        ),
    );
    assert_eq!(consents["total"], 1, "{consents:#}");
    assert_eq!(patients_at(fhir, &pid), 1);
    // The pull went page by page through nginx: a continuation came back over TLS.
    let log = nginx.access_log();
    assert!(
        log.lines()
            .any(|l| l.contains("GET /fhir/Patient?") && l.contains("_continue=")),
        "{log}"
    );
    assert!(
        store
            .lock()
            .unwrap()
            .freshness(DAY)
            .unwrap()
            .last_pull
            .is_some(),
        "the cache is fresh"
    );
}

#[tokio::test]
async fn the_test_servers_refuse_a_client_without_the_networks_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let fhir = strict_server();
    let network = pki(dir.path(), "network");
    let stranger = pki(dir.path(), "stranger");
    let nginx = tls_front(&network, fhir, None, None);
    let url = format!("https://{}/fhir/Patient?_count=1", nginx.addr());
    let ask = |identity: Option<&Pki>| {
        let client = tsunagi_runtime::http::client(tsunagi_runtime::http::ClientSettings {
            roots: tsunagi_runtime::http::load_roots(&network.ca_cert()).unwrap(),
            identity: identity.map(|p| {
                tsunagi_runtime::http::load_identity(&p.client_cert(), &p.client_key()).unwrap()
            }),
            connect_timeout: Duration::from_secs(5),
            timeout: Some(Duration::from_secs(10)),
            keep_idle: None,
        })
        .unwrap();
        let url = url.clone();
        async move {
            let response = client.get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, body) = ask(None).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("No required SSL certificate was sent"),
        "{body}"
    );
    let (status, body) = ask(Some(&stranger)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("The SSL certificate error"), "{body}");
    // Neither request reached the FHIR server; the network's own client does.
    assert!(
        !nginx.access_log().contains("\" 200 "),
        "{}",
        nginx.access_log()
    );
    let (status, body) = ask(Some(&network)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_server_the_box_cannot_trust_is_refused_with_the_reason_and_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fhir = strict_server();
    let network = pki(dir.path(), "network");
    let other = pki(dir.path(), "other");
    let expired = network
        .issue_server("expired", &[Ipv4Addr::LOCALHOST], true)
        .unwrap();
    let misnamed = network
        .issue_server("misnamed", &[Ipv4Addr::new(127, 0, 0, 9)], false)
        .unwrap();
    let (store, pid, _) = clinic(dir.path());
    let weak = Options {
        pki: Some(network.clone()),
        proxy_to: Some(fhir),
        tls_offer: Some(("TLSv1.2".into(), "ECDHE-ECDSA-AES128-SHA".into())),
        ..Options::default()
    };
    let cases = [
        (
            "TLS 1.2 with a CBC cipher only",
            Nginx::start_for_test_with(&weak),
            "the server offers no TLS the box accepts (TLS 1.3, or TLS 1.2 with ECDHE and AEAD ciphers only; the server verified against the network CA, name included)",
        ),
        (
            "another CA",
            // nginx takes the box's certificate (so only the box's check can refuse).
            tls_front(&other, fhir, None, Some(network.ca_cert())),
            "the server's certificate is not from the network CA (refused)",
        ),
        (
            "expired",
            tls_front(&network, fhir, Some(expired), None),
            "the server's certificate has expired (refused)",
        ),
        (
            "another name",
            tls_front(&network, fhir, Some(misnamed), None),
            "the server's certificate is not for the address connected to (refused)",
        ),
    ];
    for (case, nginx, reason) in cases {
        let client = tls_client(&nginx, files(&network, &network));
        let err = round(&store, &client).await.unwrap_err();
        match &err {
            SyncError::Tls { addr, reason: got } => {
                assert_eq!(*addr, SocketAddr::V4(nginx.addr()), "{case}");
                assert_eq!(got, reason, "{case}");
            }
            other => panic!("{case}: {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "TLS with the FHIR server at {} failed: {reason}",
                nginx.addr()
            ),
            "{case}"
        );
        // No request got through the front.
        assert!(
            nginx.access_log().trim().is_empty(),
            "{case}: {}",
            nginx.access_log()
        );
    }
    // Nothing of the clinic's reached the FHIR server, and the cache stays unrefreshed.
    assert_eq!(patients_at(fhir, &pid), 0);
    assert!(
        store
            .lock()
            .unwrap()
            .freshness(DAY)
            .unwrap()
            .last_pull
            .is_none()
    );
}

#[tokio::test]
async fn missing_tls_files_fail_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = clinic(dir.path());
    let missing = Client::tls(
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9)),
        "/fhir",
        Duration::from_secs(2),
        TlsFiles {
            ca_file: dir.path().join("missing-ca.pem"),
            cert_file: dir.path().join("missing.pem"),
            key_file: dir.path().join("missing.key"),
        },
    );
    let err = round(&store, &missing).await.unwrap_err();
    assert!(matches!(err, SyncError::TlsFiles(_)), "{err:?}");
}
