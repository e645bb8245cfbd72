use super::*;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;

fn key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

const NOW: i64 = 1_800_000_000;

fn config(code: &str) -> String {
    format!(
        "version = 1\n\n[site]\nfacility-code = \"{code}\"\nae-title = \"TSUNAGI\"\n\n[paths]\nstate-dir = \"/var/lib/tsunagi\"\nruntime-dir = \"/run/tsunagi\"\n"
    )
}

fn bundle(code: &str, serial: u64) -> Bundle {
    Bundle {
        format: FORMAT,
        kind: Kind::Provision,
        serial,
        issued_at: NOW - 60,
        expires_at: NOW + 14 * 86_400,
        facility_code: code.to_owned(),
        clinic_name: "つなぎクリニック".to_owned(),
        config: config(code),
        hub: Some(Hub {
            public_key: "FqGPA/dw/H+9j+QYoKYEg1ofmejzlvrfqqa+t4OnBy4=".to_owned(),
            endpoint: "hub.example.test:51820".to_owned(),
            tunnel_address: "10.98.1.2/32".to_owned(),
            ca_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_owned(),
        }),
        enrollment: Some(Enrollment {
            token: "one-time".to_owned(),
            expires_at: NOW + 86_400,
            url: "https://10.98.0.1:8443/enroll".to_owned(),
        }),
        secrets: std::collections::BTreeMap::new(),
        console_setup: None,
    }
}

/// A medium: the bundle's bytes and the signature's text.
fn medium(b: &Bundle, k: &Ed25519KeyPair) -> (Vec<u8>, String) {
    let bytes = serde_json::to_vec_pretty(b).unwrap();
    let sig = sign(&bytes, k);
    (bytes, sig)
}

fn fresh() -> Expect<'static> {
    Expect {
        facility_code: None,
        last_serial: None,
        now: NOW,
    }
}

#[test]
fn a_signed_medium_for_a_blank_box_is_accepted_as_written() {
    let k = key();
    let b = bundle("1312345678", 7);
    let (bytes, sig) = medium(&b, &k);
    assert_eq!(
        verify(&bytes, Some(&sig), &public_key_text(&k), fresh()),
        Ok(b.clone())
    );
    // The same clinic, a newer serial: re-provisioning.
    let again = Expect {
        facility_code: Some("1312345678"),
        last_serial: Some(6),
        now: NOW,
    };
    assert_eq!(
        verify(&bytes, Some(&sig), &public_key_text(&k), again),
        Ok(b)
    );
}

#[test]
fn every_refusal_is_one_clear_line() {
    let k = key();
    let network = public_key_text(&k);
    let (bytes, sig) = medium(&bundle("1312345678", 7), &k);
    let check = |bytes: &[u8], sig: Option<&str>, expect: Expect<'_>| {
        let refused = verify(bytes, sig, &network, expect).unwrap_err();
        let line = refused.to_string();
        assert!(!line.contains('\n'), "{line}");
        refused
    };
    // Unsigned.
    assert_eq!(check(&bytes, None, fresh()), Refused::Unsigned);
    // One byte changed.
    let mut tampered = bytes.clone();
    let at = tampered.iter().position(|b| *b == b'7').unwrap();
    tampered[at] = b'8';
    assert_eq!(check(&tampered, Some(&sig), fresh()), Refused::BadSignature);
    // Signed by another key.
    let (_, other_sig) = medium(&bundle("1312345678", 7), &key());
    assert_eq!(
        check(&bytes, Some(&other_sig), fresh()),
        Refused::BadSignature
    );
    assert_eq!(
        check(&bytes, Some("not base64!"), fresh()),
        Refused::BadSignature
    );
    // Expired.
    let late = Expect {
        now: NOW + 15 * 86_400,
        ..fresh()
    };
    assert!(matches!(
        check(&bytes, Some(&sig), late),
        Refused::Expired { .. }
    ));
    // For another clinic.
    let other = Expect {
        facility_code: Some("1319999999"),
        ..fresh()
    };
    let refused = check(&bytes, Some(&sig), other);
    assert_eq!(
        refused.to_string(),
        "the medium is for clinic 1312345678, this box belongs to clinic 1319999999"
    );
    // Replayed: an older serial. The same serial is the medium applied last, left
    // attached: nothing to do, even once it expired.
    let applied = |last, now| Expect {
        facility_code: Some("1312345678"),
        last_serial: Some(last),
        now,
    };
    assert!(matches!(
        check(&bytes, Some(&sig), applied(9, NOW)),
        Refused::NotNewer { serial: 7, last: 9 }
    ));
    for now in [NOW, NOW + 30 * 86_400] {
        assert_eq!(
            check(&bytes, Some(&sig), applied(7, now)),
            Refused::AlreadyApplied(7)
        );
    }
    // The enrollment token expired (the medium has not).
    let mut b = bundle("1312345678", 7);
    b.enrollment.as_mut().unwrap().expires_at = NOW - 1;
    let (bytes, sig) = medium(&b, &k);
    assert!(matches!(
        check(&bytes, Some(&sig), fresh()),
        Refused::TokenExpired { .. }
    ));
}

#[test]
fn a_medium_carries_only_the_clinic_secrets_its_config_names() {
    let k = key();
    let network = public_key_text(&k);
    let with_share = |secret: &str| {
        let mut b = bundle("1312345678", 1);
        b.config.push_str(
            "\n[ssmix2]\nstorage = \"/run/tsunagi-shares/ssmix2\"\n\
             [ssmix2.replica]\nurl = \"https://10.98.0.1:8443/ssmix2/\"\nca-file = \"/var/lib/tsunagi/provisioning/network-ca.pem\"\nclient-identity = true\n[identity]\nenabled = true\n\
             [ssmix2.share]\naddress = \"192.168.50.10\"\nshare = \"ssmix2\"\nusername = \"tsunagi\"\n\
             password-file = \"/etc/tsunagi/secrets/share.password\"\n",
        );
        b.secrets
            .insert(secret.to_owned(), "emr-read-only\n".to_owned());
        b
    };
    let good = with_share("ssmix2.share.password-file");
    let (bytes, sig) = medium(&good, &k);
    assert_eq!(verify(&bytes, Some(&sig), &network, fresh()), Ok(good));
    // Not named by the config, or the box's own key: refused.
    for key_name in [
        "tunnel.preshared-key-file",
        "tunnel.private-key-file",
        "anything",
    ] {
        let (bytes, sig) = medium(&with_share(key_name), &k);
        assert_eq!(
            verify(&bytes, Some(&sig), &network, fresh()),
            Err(Refused::Secret(key_name.to_owned()))
        );
    }
}

#[test]
fn a_signed_bundle_is_still_checked_before_use() {
    let k = key();
    let network = public_key_text(&k);
    // A config the box would refuse.
    let mut b = bundle("1312345678", 1);
    b.config = "version = 1\n[site]\nfacility-code = \"12\"\n".to_owned();
    let (bytes, sig) = medium(&b, &k);
    assert!(matches!(
        verify(&bytes, Some(&sig), &network, fresh()),
        Err(Refused::Config(_))
    ));
    // A config for another clinic than the medium says.
    let mut b = bundle("1312345678", 1);
    b.config = config("1319999999");
    let (bytes, sig) = medium(&b, &k);
    assert!(matches!(
        verify(&bytes, Some(&sig), &network, fresh()),
        Err(Refused::Config(_))
    ));
    // An unknown field, a format from the future, not JSON.
    for text in [
        serde_json::to_string(&bundle("1312345678", 1))
            .unwrap()
            .replacen('{', "{\"extra\":1,", 1),
        serde_json::to_string(&bundle("1312345678", 1))
            .unwrap()
            .replacen("\"format\":1", "\"format\":2", 1),
        "not json".to_owned(),
    ] {
        let sig = sign(text.as_bytes(), &k);
        let refused = verify(text.as_bytes(), Some(&sig), &network, fresh()).unwrap_err();
        assert!(
            matches!(refused, Refused::Malformed(_) | Refused::UnknownFormat(2)),
            "{refused:?}"
        );
    }
}

#[test]
fn a_console_setup_code_travels_only_as_its_hash_and_only_for_a_console_the_config_enables() {
    let k = key();
    let (code, hash) = setup_code::generate().unwrap();
    let mut b = bundle("1312345678", 7);
    b.config.push_str("\n[console]\nenabled = true\n");
    b.console_setup = Some(ConsoleSetup {
        code_hash: hash.clone(),
        expires_at: NOW + 86_400,
    });
    let (bytes, sig) = medium(&b, &k);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(!text.contains(&setup_code::normalize(&code)), "{text}");
    let got = verify(&bytes, Some(&sig), &public_key_text(&k), fresh()).unwrap();
    assert!(setup_code::verify(
        &code,
        &got.console_setup.unwrap().code_hash
    ));
    let refused = |b: &Bundle| {
        let (bytes, sig) = medium(b, &k);
        verify(&bytes, Some(&sig), &public_key_text(&k), fresh())
            .unwrap_err()
            .to_string()
    };
    // Not a hash; expired; for a console the config does not enable; on a reset medium.
    let mut plain = b.clone();
    plain.console_setup = Some(ConsoleSetup {
        code_hash: code.clone(),
        expires_at: NOW + 86_400,
    });
    assert_eq!(
        refused(&plain),
        "the medium's console setup code is refused: not an Argon2id hash"
    );
    let mut old = b.clone();
    old.console_setup.as_mut().unwrap().expires_at = NOW;
    assert!(refused(&old).contains("it expired at"), "{}", refused(&old));
    let mut off = b.clone();
    off.config = config("1312345678");
    assert_eq!(
        refused(&off),
        "the medium's console setup code is refused: the medium's config does not enable the console"
    );
    let mut reset = b.clone();
    reset.kind = Kind::Reset;
    reset.config = String::new();
    reset.hub = None;
    reset.enrollment = None;
    assert!(
        refused(&reset).contains("console setup code"),
        "{}",
        refused(&reset)
    );
}
