//! Issue 17: one TLS policy for every link. testssl.sh, run against the test network's TLS
//! front (the nginx that serves the box's WebDAV replica and fronts its FHIR server), shows
//! what it offers: TLS 1.3, or TLS 1.2 with ECDHE and AEAD ciphers only. (A weaker offer is
//! flagged by the same check, `hil_tests::testssl`'s unit test, as testssl reported one;
//! the box refuses such a server: `appliance/consent/tests/fhir_tls.rs`.) The test network's
//! PACS with DICOM TLS (Orthanc, dcmtk's BCP 195 non-downgrading profile) offers TLS 1.3
//! only.

use hil_tests::nginx::Nginx;
use hil_tests::testssl;

#[test]
fn testssl_shows_the_test_networks_tls_front_offers_only_the_policy() {
    let front = Nginx::start_for_test();
    let offer = testssl::scan(&front.addr().to_string(), None).unwrap();
    println!("{offer}");
    assert_eq!(offer.policy_violations(), Vec::<String>::new(), "{offer}");
    assert!(
        offer.ciphers.iter().any(|(p, _)| p == "TLS 1.2"),
        "TLS 1.2 with ECDHE and AEAD is offered too: {offer}"
    );
}

/// The network PACS's DICOM TLS port (Orthanc with `DicomTlsEnabled`, as the image test's
/// hub runs it), scanned from inside its namespace.
#[test]
fn testssl_shows_what_the_test_pacs_offers_for_dicom_tls() {
    use hil_tests::nginx::Pki;
    use hil_tests::orthanc::{Options, Orthanc};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path()).unwrap();
    let mut options = Options::default();
    for (k, v) in [
        ("DicomTlsEnabled", serde_json::json!(true)),
        ("DicomTlsCertificate", serde_json::json!(pki.server_cert())),
        ("DicomTlsPrivateKey", serde_json::json!(pki.server_key())),
        (
            "DicomTlsTrustedCertificates",
            serde_json::json!(pki.ca_cert()),
        ),
        ("DicomTlsRemoteCertificateRequired", serde_json::json!(true)),
    ] {
        options.extra.insert(k.into(), v);
    }
    let pacs = Orthanc::start_for_test_with(&options);
    let offer = testssl::scan(&pacs.dicom_addr().to_string(), Some(pacs.netns())).unwrap();
    println!("{offer}");
    assert_eq!(offer.policy_violations(), Vec::<String>::new(), "{offer}");
}
