//! Issue 17: one TLS policy for every link. testssl.sh, run against the test network's TLS
//! front (the nginx that serves the box's WebDAV replica and fronts its FHIR server), shows
//! what it offers: TLS 1.3, or TLS 1.2 with ECDHE and AEAD ciphers only. (A weaker offer is
//! flagged by the same check, `hil_tests::testssl`'s unit test, as testssl reported one;
//! the box refuses such a server: `appliance/consent/tests/fhir_tls.rs`.)

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
