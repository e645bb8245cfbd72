//! Issue 16, the enrollment server's transport (`tsunagi-provision serve`'s library half)
//! on loopback, with the hub's peers recorded: HTTPS with the hub's certificate from a
//! network CA, refusals as one-line JSON with the right status (bad JSON, a body over the
//! limit, GET, an unknown path), enrollment and renewal over it, renewal only with a client
//! certificate from the box-identity CA (none, or one from another CA, is refused), and a
//! stop within 2 s even with a client holding a connection open.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tsunagi_medium::enroll::{Enrolled, Refusal, RenewRequest};
use tsunagi_provision::serve::{Settings, serve, tls_config};
use tsunagi_runtime::http::{ClientIdentity, ClientSettings};

/// A network CA and the hub's certificate for 127.0.0.1: (CA PEM, hub cert file, hub key
/// file).
fn network_pki(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test network CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let hub_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut hub = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    hub.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let hub_cert = hub.signed_by(&hub_key, &issuer).unwrap();
    let (cert, key) = (dir.join("hub.pem"), dir.join("hub.key"));
    std::fs::write(&cert, hub_cert.pem()).unwrap();
    std::fs::write(&key, hub_key.serialize_pem()).unwrap();
    (ca_cert.pem(), cert, key)
}

fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let identity = identity.map(|(cert, key)| ClientIdentity {
        chain: CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap(),
        key: PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    });
    tsunagi_runtime::http::client(ClientSettings {
        roots,
        identity,
        connect_timeout: Duration::from_secs(5),
        timeout: Some(Duration::from_secs(10)),
        keep_idle: None,
    })
    .unwrap()
}

async fn post(c: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

fn refusal(body: &[u8]) -> String {
    serde_json::from_slice::<Refusal>(body).unwrap().error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_over_tls_and_renews_only_for_a_box_certificate() {
    let work = tempfile::tempdir().unwrap();
    let mut op = operator(work.path());
    let t = token(&mut op, work.path(), CODE, Duration::from_secs(3600));
    let box_ca = op.box_ca().unwrap().cert_pem().to_owned();
    let (network_ca, cert, key) = network_pki(work.path());
    let settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert,
        key,
        policy: policy(),
    };
    let tls = tls_config(&settings, &box_ca).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let peers = Arc::new(Recorded::default());
    let server = tokio::spawn(serve(
        op,
        settings.policy.clone(),
        peers.clone(),
        listener,
        tls,
        stop.clone(),
    ));
    let anonymous = client(&network_ca, None);
    let enroll = format!("{base}/v1/enroll");
    let renew = format!("{base}/v1/renew");

    let (status, body) = post(&anonymous, &enroll, b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        refusal(&body).starts_with("the request: "),
        "{}",
        refusal(&body)
    );
    let (status, body) = post(&anonymous, &enroll, vec![b' '; 70 * 1024]).await;
    assert_eq!(status, 400);
    assert!(refusal(&body).contains("over 65536 bytes"));
    let r = anonymous.get(&enroll).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (status, _) = post(&anonymous, &format!("{base}/v1/admin"), b"{}".to_vec()).await;
    assert_eq!(status, 404);
    // Unknown fields are refused too (a request is read strictly).
    let (req, box_key) = request(&t, CODE, "QEMU-1", BOX_KEY);
    let mut loose = serde_json::to_value(&req).unwrap();
    loose["admin"] = true.into();
    let (status, _) = post(&anonymous, &enroll, serde_json::to_vec(&loose).unwrap()).await;
    assert_eq!(status, 400);

    // Enrollment.
    let (status, body) = post(&anonymous, &enroll, serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let enrolled: Enrolled = serde_json::from_slice(&body).unwrap();
    assert_eq!(peers.peers.lock().unwrap().len(), 1);
    // A replay of the same request: the token is spent.
    let (status, body) = post(&anonymous, &enroll, serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(status, 403);
    assert!(refusal(&body).contains("used already"));

    // Renewal: not without a certificate, not with another CA's, but with the box's.
    let renewal = serde_json::to_vec(&RenewRequest {
        csr_pem: csr("x").0,
    })
    .unwrap();
    let (status, body) = post(&anonymous, &renew, renewal.clone()).await;
    assert_eq!(status, 403);
    assert!(refusal(&body).contains("client certificate"));
    let stranger_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut stranger = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    stranger.distinguished_name = rcgen::DistinguishedName::new();
    stranger
        .distinguished_name
        .push(rcgen::DnType::CommonName, enrolled.identity.as_str());
    let stranger_cert = stranger.self_signed(&stranger_key).unwrap().pem();
    let forged = client(
        &network_ca,
        Some((&stranger_cert, &stranger_key.serialize_pem())),
    );
    assert!(
        forged
            .post(&renew)
            .body(renewal.clone())
            .send()
            .await
            .is_err(),
        "a certificate from another CA must fail the handshake"
    );
    let the_box = client(
        &network_ca,
        Some((&enrolled.certificate_pem, &box_key.serialize_pem())),
    );
    let (status, body) = post(&the_box, &renew, renewal).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let renewed: Enrolled = serde_json::from_slice(&body).unwrap();
    assert_eq!(renewed.identity, enrolled.identity);
    assert_ne!(
        serial_of(&renewed.certificate_pem),
        serial_of(&enrolled.certificate_pem)
    );

    // A client that connects and says nothing does not hold the stop.
    let _idle = tokio::net::TcpStream::connect(base.trim_start_matches("https://"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("the server stops within 2 s")
        .unwrap()
        .unwrap();
    println!("serve: stopped {:?} after the stop", stopping.elapsed());
}
