//! Issue 16, the enrollment server's decisions (`Operator::enroll`, `renew`, `revoke`),
//! with the hub's WireGuard peers recorded instead of set (the real interface, the TLS
//! transport and the box's side: `appliance/tsunagi/tests/enroll.rs`).
//!
//! - a token enrolls one box of its clinic once, until it expires; the certificate is for
//!   the CSR's key only, 30 days, client authentication, identity = code + serial;
//! - the hub gets the box's WireGuard key allowed the clinic's address only, and a box
//!   enrolled again replaces the clinic's earlier key;
//! - nothing changes when a step fails (a hub that cannot be changed leaves the token
//!   usable);
//! - renewal only with the clinic's current certificate; revocation removes the peer and
//!   stops renewal;
//! - the console's server certificate: for the clinic's current box only, naming the
//!   console's address from the network's config for the clinic (a private LAN address
//!   outside the tunnel pool), never a name the box asks for.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use tsunagi_medium::enroll::{ConsoleRequest, RenewRequest, identity};
use tsunagi_provision::ca::BoxCa;
use tsunagi_provision::enroll::Refused;

#[test]
fn a_token_enrolls_one_box_of_its_clinic_once_with_a_certificate_for_its_own_key() {
    let work = tempfile::tempdir().unwrap();
    let mut op = operator(work.path());
    let ca: BoxCa = op.box_ca().unwrap();
    let hub = Recorded::default();
    let t = token(&mut op, work.path(), CODE, Duration::from_secs(3600));

    // Another clinic's code with this token: refused, nothing set.
    let (req, _) = request(&t, "1319999999", "QEMU-1", BOX_KEY);
    let r = op.enroll(&ca, &hub, &policy(), &req, now()).unwrap_err();
    assert_eq!(r.status(), 403);
    assert!(r.to_string().contains("another clinic"), "{r}");
    // A bad serial, a bad WireGuard key, a CSR whose signature does not verify: 400.
    for (serial, wg) in [("a b", BOX_KEY), ("QEMU-1", "not a key")] {
        let (req, _) = request(&t, CODE, serial, wg);
        assert_eq!(
            op.enroll(&ca, &hub, &policy(), &req, now())
                .unwrap_err()
                .status(),
            400
        );
    }
    let (mut req, _) = request(&t, CODE, "QEMU-1", BOX_KEY);
    req.csr_pem = req.csr_pem.replace("MII", "MIJ");
    assert_eq!(
        op.enroll(&ca, &hub, &policy(), &req, now())
            .unwrap_err()
            .status(),
        400
    );
    // A hub that cannot be changed: 500, and the token stays usable.
    *hub.broken.lock().unwrap() = true;
    let (req, _) = request(&t, CODE, "QEMU-1", BOX_KEY);
    assert_eq!(
        op.enroll(&ca, &hub, &policy(), &req, now())
            .unwrap_err()
            .status(),
        500
    );
    assert!(op.enrolled_box(CODE).unwrap().is_none());
    *hub.broken.lock().unwrap() = false;
    assert!(hub.peers.lock().unwrap().is_empty());

    let (req, key) = request(&t, CODE, "QEMU-1", BOX_KEY);
    let e = op.enroll(&ca, &hub, &policy(), &req, now()).unwrap();
    assert_eq!(e.identity, identity(CODE, "QEMU-1"));
    assert_eq!(e.tunnel.address, "10.99.0.2/24");
    assert_eq!(e.tunnel.hub_public_key, HUB_KEY);
    assert_eq!(e.renew_url, "https://10.98.0.1:8443");
    assert_eq!(
        *hub.peers.lock().unwrap(),
        vec![(BOX_KEY.to_owned(), Ipv4Addr::new(10, 99, 0, 2))]
    );
    // The certificate: the box's key, our identity and nothing the CSR asked for, 30 days,
    // client authentication only, issued by the box CA.
    let der = rustls_pem(&e.certificate_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    use rcgen::PublicKeyData as _;
    assert_eq!(&*cert.public_key().subject_public_key.data, key.der_bytes());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "1312345678-QEMU-1");
    assert!(cert.subject_alternative_name().unwrap().is_none());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!cert.is_ca());
    let life = cert.validity().not_after.timestamp() - now();
    assert!(
        (30 * 86_400 - 60..=30 * 86_400 + 60).contains(&life),
        "{life}"
    );
    let ca_der = rustls_pem(&e.box_ca_pem);
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());

    // Used once.
    let (req, _) = request(&t, CODE, "QEMU-1", BOX_KEY);
    let r = op.enroll(&ca, &hub, &policy(), &req, now()).unwrap_err();
    assert!(r.to_string().contains("used already"), "{r}");
    // Unknown and expired tokens.
    let (req, _) = request("not-a-token", CODE, "QEMU-1", BOX_KEY);
    assert!(
        op.enroll(&ca, &hub, &policy(), &req, now())
            .unwrap_err()
            .to_string()
            .contains("not known")
    );
    let short = token(&mut op, work.path(), CODE, Duration::from_secs(60));
    let (req, _) = request(&short, CODE, "QEMU-1", BOX_KEY);
    let r = op
        .enroll(&ca, &hub, &policy(), &req, now() + 61)
        .unwrap_err();
    assert!(r.to_string().contains("expired"), "{r}");

    // A replacement box (a new medium): its key replaces the clinic's earlier one.
    let t2 = token(&mut op, work.path(), CODE, Duration::from_secs(3600));
    let (req, _) = request(&t2, CODE, "QEMU-2", OTHER_BOX_KEY);
    op.enroll(&ca, &hub, &policy(), &req, now()).unwrap();
    assert_eq!(
        *hub.peers.lock().unwrap(),
        vec![(OTHER_BOX_KEY.to_owned(), Ipv4Addr::new(10, 99, 0, 2))]
    );
    assert_eq!(op.enrolled_box(CODE).unwrap().unwrap().box_serial, "QEMU-2");
}

#[test]
fn renewal_needs_the_current_certificate_and_revocation_ends_it() {
    let work = tempfile::tempdir().unwrap();
    let EnrolledBox {
        mut op,
        ca,
        hub,
        first,
        serial,
        token: t,
    } = enrolled_box(work.path());
    let who = identity(CODE, "QEMU-1");
    let renew = || RenewRequest {
        csr_pem: csr("x").0,
    };

    let r = op
        .renew(&ca, &policy(), "00ff", &who, &renew(), now())
        .unwrap_err();
    assert_eq!(
        r,
        Refused::Forbidden(
            "the certificate is not the current one of any box: enroll again".into()
        )
    );
    let r = op
        .renew(&ca, &policy(), &serial, "1312345678-OTHER", &renew(), now())
        .unwrap_err();
    assert!(r.to_string().contains("identity"), "{r}");
    let r = op
        .renew(&ca, &policy(), &serial, &who, &renew(), first.not_after)
        .unwrap_err();
    assert!(r.to_string().contains("expired"), "{r}");

    let second = op
        .renew(&ca, &policy(), &serial, &who, &renew(), now())
        .unwrap();
    assert_ne!(serial_of(&second.certificate_pem), serial);
    // The old certificate renews no more.
    assert_eq!(
        op.renew(&ca, &policy(), &serial, &who, &renew(), now())
            .unwrap_err()
            .status(),
        403
    );

    let b = op.revoke(CODE, &hub, now()).unwrap().unwrap();
    assert!(b.revoked_at.is_some());
    assert!(hub.peers.lock().unwrap().is_empty());
    let current = serial_of(&second.certificate_pem);
    let r = op
        .renew(&ca, &policy(), &current, &who, &renew(), now())
        .unwrap_err();
    assert!(r.to_string().contains("revoked"), "{r}");
    // No new medium, no new enrollment for a revoked clinic.
    assert!(
        op.write_medium(
            CODE,
            tsunagi_medium::Kind::Provision,
            Duration::from_secs(60),
            Duration::from_secs(60),
            &[],
            &work.path().join("m"),
        )
        .is_err()
    );
    let (req, _) = request(&t, CODE, "QEMU-1", BOX_KEY);
    assert_eq!(
        op.enroll(&ca, &hub, &policy(), &req, now())
            .unwrap_err()
            .status(),
        403
    );
}

#[test]
fn the_consoles_certificate_names_the_address_the_network_gave_the_clinic_and_nothing_else() {
    let work = tempfile::tempdir().unwrap();
    let EnrolledBox {
        mut op,
        ca,
        hub,
        first,
        serial,
        ..
    } = enrolled_box(work.path());
    let who = identity(CODE, "QEMU-1");
    let template = work.path().join("operator/clinic-template.toml");
    let base = std::fs::read_to_string(&template).unwrap();
    let with_console = |extra: &str| {
        std::fs::write(
            &template,
            format!("{base}\n[console]\nenabled = true\n{extra}"),
        )
        .unwrap();
    };
    // The console's key in the CSR; the names it asks for are not taken.
    let ask = || {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec![
            "hub.example.test".to_owned(),
            "10.98.0.1".to_owned(),
        ])
        .unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (ConsoleRequest { csr_pem: csr }, key)
    };

    // The network's config for the clinic has no console: nothing to certify.
    let (req, _) = ask();
    let r = op
        .console_certificate(&ca, &policy(), &serial, &who, &req, now())
        .unwrap_err();
    assert_eq!(r.status(), 403);
    assert!(r.to_string().contains("has no console"), "{r}");

    // The template's console address (the default 192.168.50.1).
    with_console("");
    let (req, key) = ask();
    let c = op
        .console_certificate(&ca, &policy(), &serial, &who, &req, now())
        .unwrap();
    assert_eq!(
        c.addresses,
        vec!["192.168.50.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(c.box_ca_pem, first.box_ca_pem);
    let der = rustls_pem(&c.certificate_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    use rcgen::PublicKeyData as _;
    assert_eq!(&*cert.public_key().subject_public_key.data, key.der_bytes());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "1312345678-QEMU-1 console");
    let names = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        names.value.general_names,
        vec![x509_parser::extensions::GeneralName::IPAddress(&[
            192, 168, 50, 1
        ])]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert!(!cert.is_ca());
    let ca_der = rustls_pem(&first.box_ca_pem);
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
    // Only for the box's current certificate and identity: after a renewal the old
    // certificate gets nothing.
    let renewed = op
        .renew(
            &ca,
            &policy(),
            &serial,
            &who,
            &RenewRequest {
                csr_pem: csr("x").0,
            },
            now(),
        )
        .unwrap();
    let (req, _) = ask();
    let r = op
        .console_certificate(&ca, &policy(), &serial, &who, &req, now())
        .unwrap_err();
    assert!(r.to_string().contains("not the current one"), "{r}");
    let current = serial_of(&renewed.certificate_pem);
    let r = op
        .console_certificate(&ca, &policy(), &current, "1312345678-OTHER", &req, now())
        .unwrap_err();
    assert!(r.to_string().contains("identity"), "{r}");
    // An address no certificate may name: public, unspecified, inside the tunnel pool.
    for (listen, why) in [
        ("8.8.8.8:443", "is not a private LAN address"),
        ("0.0.0.0:443", "is not a private LAN address"),
        ("10.99.0.50:443", "inside the tunnel pool 10.99.0.0/24"),
    ] {
        with_console(&format!("listen = \"{listen}\"\n"));
        let r = op
            .console_certificate(&ca, &policy(), &current, &who, &req, now())
            .unwrap_err();
        assert_eq!(r.status(), 403, "{listen}");
        assert!(r.to_string().contains(why), "{listen}: {r}");
    }
    with_console("listen = \"10.1.2.3:8443\"\n");
    let c = op
        .console_certificate(&ca, &policy(), &current, &who, &req, now())
        .unwrap();
    assert_eq!(
        c.addresses,
        vec!["10.1.2.3".parse::<std::net::IpAddr>().unwrap()]
    );
    // Revoked: nothing more.
    op.revoke(CODE, &hub, now()).unwrap();
    let r = op
        .console_certificate(&ca, &policy(), &current, &who, &req, now())
        .unwrap_err();
    assert!(r.to_string().contains("revoked"), "{r}");
}
