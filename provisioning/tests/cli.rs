//! Issue 16, the operator's side: `tsunagi-provision init`, `clinic add|list|show` and
//! `medium`, run as the operator runs them; each medium checked with the box's own
//! verification (`tsunagi_medium::verify`) against the public key `init` printed.

mod common;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tsunagi-provision");
const HUB_KEY: &str = "FqGPA/dw/H+9j+QYoKYEg1ofmejzlvrfqqa+t4OnBy4=";

fn run(dir: &Path, args: &[&str]) -> (String, bool) {
    let out = Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.success(),
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (text, success) = run(dir, args);
    assert!(success, "{args:?}: {text}");
    text
}

/// `clinic add`: its output and whether it succeeded.
fn add(dir: &Path, code: &str, name: &str, ae_title: &str) -> (String, bool) {
    run(
        dir,
        &[
            "clinic",
            "add",
            "--code",
            code,
            "--name",
            name,
            "--ae-title",
            ae_title,
        ],
    )
}

/// Runs a command that must fail, saying `why`.
fn refused(dir: &Path, args: &[&str], why: &str) {
    let (text, success) = run(dir, args);
    assert!(!success && text.contains(why), "{args:?}: {text}");
}

/// What a blank box knows when it checks a medium: no clinic, no serial, the time now.
fn blank_box() -> tsunagi_medium::Expect<'static> {
    tsunagi_medium::Expect {
        facility_code: None,
        last_serial: None,
        now: i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap(),
    }
}

/// An operator directory initialised for a network whose pool is `pool`; the public key.
fn init(work: &Path, pool: &str) -> (std::path::PathBuf, String) {
    let (dir, text) = init_with(work, pool, &[]);
    let public = text
        .lines()
        .find_map(|l| l.strip_prefix("provisioning public key (build it into the image): "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    (dir, public)
}

/// `init` in `work/operator` with the common inputs and `extra` arguments; what it printed.
fn init_with(work: &Path, pool: &str, extra: &[&str]) -> (std::path::PathBuf, String) {
    let (ca, template) = common::inputs(work);
    let dir = work.join("operator");
    let mut args = vec![
        "init",
        "--name",
        "TOKYO-TEST",
        "--hub-public-key",
        HUB_KEY,
        "--hub-endpoint",
        "hub.example.test:51820",
        "--hub-ca",
        ca.to_str().unwrap(),
        "--tunnel-pool",
        pool,
        "--enrollment-url",
        "https://10.98.0.1:8443/enroll",
        "--template",
        template.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let text = ok(&dir, &args);
    (dir, text)
}

fn read_medium(out: &Path) -> (Vec<u8>, String) {
    (
        std::fs::read(out.join(tsunagi_medium::BUNDLE_FILE)).unwrap(),
        std::fs::read_to_string(out.join(tsunagi_medium::SIGNATURE_FILE)).unwrap(),
    )
}

#[test]
fn an_operator_registers_clinics_and_writes_media_the_box_accepts() {
    use std::os::unix::fs::PermissionsExt as _;
    let work = tempfile::tempdir().unwrap();
    let (dir, public) = init(work.path(), "10.98.1.0/24");
    // The signing key is the operator's alone; the database names it, never holds it.
    let key = dir.join("keys/provisioning.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let db = std::fs::read(dir.join("operator.db")).unwrap();
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(!db.windows(20).any(|w| w == &key_text.as_bytes()[..20]));
    // Initialised once.
    let (again, success) = run(
        &dir,
        &[
            "init",
            "--name",
            "X",
            "--hub-public-key",
            HUB_KEY,
            "--hub-endpoint",
            "h:1",
            "--hub-ca",
            "x",
            "--tunnel-pool",
            "10.0.0.0/24",
            "--enrollment-url",
            "u",
            "--template",
            "t",
        ],
    );
    assert!(!success && again.contains("already initialised"), "{again}");

    // Clinics: each its own tunnel address from the pool (the first host is the hub's).
    let (text, success) = add(&dir, "1312345678", "つなぎ内科", "TSUNAGI_A");
    assert!(success, "{text}");
    let (text, success) = add(&dir, "1319999999", "例クリニック", "TSUNAGI_B");
    assert!(success, "{text}");
    let (dup, success) = add(&dir, "1312345678", "x", "X");
    assert!(!success && dup.contains("already registered"), "{dup}");
    let (bad, success) = add(&dir, "12", "x", "X");
    assert!(!success && bad.contains("医療機関コード 12"), "{bad}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["clinic", "list", "--json"])).unwrap();
    let addresses: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tunnel-address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["10.98.1.2/24", "10.98.1.3/24"]);
    let show: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["clinic", "show", "1319999999", "--json"])).unwrap();
    assert_eq!(show["name"], "例クリニック");

    // A medium for clinic A: accepted by the box's own check, with the clinic's config.
    let out = work.path().join("stick");
    ok(
        &dir,
        &[
            "medium",
            "--clinic",
            "1312345678",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let (bundle, sig) = read_medium(&out);
    let blank = blank_box();
    let now = blank.now;
    let b = tsunagi_medium::verify(&bundle, Some(&sig), &public, blank).unwrap();
    assert_eq!(b.facility_code, "1312345678");
    assert_eq!(b.serial, 1);
    let cfg = tsunagi_config::parse(&b.config, Path::new("medium")).unwrap();
    assert_eq!(cfg.site.ae_title.as_ref(), "TSUNAGI_A");
    // The box enrolls by its identity service, which the template did not mention.
    assert!(cfg.identity.enabled);
    let hub = b.hub.as_ref().unwrap();
    assert_eq!(hub.tunnel_address, "10.98.1.2/24");
    assert_eq!(hub.public_key, HUB_KEY);
    assert!(hub.ca_pem.contains("TEST"));
    let token = &b.enrollment.as_ref().unwrap().token;
    assert!(token.len() >= 43, "{token}");
    // No box secret, and the token itself is not kept by the operator (only its hash).
    let db = std::fs::read(dir.join("operator.db")).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()));
    // Expired two weeks on; another clinic's box refuses it.
    let later = tsunagi_medium::Expect {
        now: now + 15 * 86_400,
        ..blank
    };
    assert!(tsunagi_medium::verify(&bundle, Some(&sig), &public, later).is_err());
    let other = tsunagi_medium::Expect {
        facility_code: Some("1319999999"),
        ..blank
    };
    assert!(tsunagi_medium::verify(&bundle, Some(&sig), &public, other).is_err());

    // The next medium has a newer serial: a box that applied the first takes it.
    let out2 = work.path().join("stick2");
    ok(
        &dir,
        &[
            "medium",
            "--clinic",
            "1312345678",
            "--out",
            out2.to_str().unwrap(),
            "--valid-for",
            "1h",
        ],
    );
    let (bundle2, sig2) = read_medium(&out2);
    let applied = tsunagi_medium::Expect {
        facility_code: Some("1312345678"),
        last_serial: Some(1),
        now,
    };
    let b2 = tsunagi_medium::verify(&bundle2, Some(&sig2), &public, applied).unwrap();
    assert_eq!(b2.serial, 2);
    assert!(b2.expires_at <= now + 3700);
    // And the first one, replayed, is refused.
    assert!(
        tsunagi_medium::verify(
            &bundle,
            Some(&sig),
            &public,
            tsunagi_medium::Expect {
                last_serial: Some(2),
                ..applied
            }
        )
        .is_err()
    );
    // A reset medium carries no config and no token.
    let out3 = work.path().join("reset");
    ok(
        &dir,
        &[
            "medium",
            "--clinic",
            "1312345678",
            "--out",
            out3.to_str().unwrap(),
            "--reset",
        ],
    );
    let (bundle3, sig3) = read_medium(&out3);
    let b3 = tsunagi_medium::verify(
        &bundle3,
        Some(&sig3),
        &public,
        tsunagi_medium::Expect {
            last_serial: Some(2),
            ..applied
        },
    )
    .unwrap();
    assert_eq!(b3.kind, tsunagi_medium::Kind::Reset);
    assert!(b3.config.is_empty() && b3.enrollment.is_none());
    // An unknown clinic.
    refused(
        &dir,
        &["medium", "--clinic", "1300000000", "--out", "x"],
        "no clinic 1300000000",
    );
    // A secret the clinic's config does not name, or that a medium may not carry: no
    // medium is written.
    let secret = work.path().join("emr.password");
    std::fs::write(&secret, "emr-read-only\n").unwrap();
    let out4 = work.path().join("with-secret");
    let out4_text = out4.to_str().unwrap();
    for (key, why) in [
        (
            "ssmix2.share.password-file",
            "a box would refuse this medium: the medium carries a secret for ssmix2.share.password-file",
        ),
        (
            "tunnel.private-key-file",
            "a medium may carry only these secrets",
        ),
    ] {
        let secret_arg = format!("{key}={}", secret.display());
        let args = [
            "medium",
            "--clinic",
            "1312345678",
            "--out",
            out4_text,
            "--secret",
            &secret_arg,
        ];
        refused(&dir, &args, why);
    }
    assert!(!out4.exists());
}

#[test]
fn a_full_pool_is_refused_clearly() {
    let work = tempfile::tempdir().unwrap();
    // A /30: two hosts, the first the hub's: room for one clinic.
    let (dir, _) = init(work.path(), "10.98.2.0/30");
    let (text, success) = add(&dir, "1312345678", "A", "A");
    assert!(success, "{text}");
    let (full, success) = add(&dir, "1319999999", "B", "B");
    assert!(
        !success && full.contains("10.98.2.0/30 has no free address"),
        "{full}"
    );
    refused(
        &work.path().join("elsewhere"),
        &["clinic", "list"],
        "not initialised",
    );
}

/// The image's build makes its test provisioning key with OpenSSL, as an operator's key
/// store would export one (PKCS#8 v1, no public key inside; `image/build.sh`): `init` takes
/// it by reference, prints the same public key the image gets, and the media it signs
/// verify against that.
#[test]
fn a_signing_key_made_by_openssl_is_used_by_reference() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let sh = |script: &str| {
        let out = Command::new("bash")
            .args(["-ec", script])
            .current_dir(w)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("openssl genpkey -algorithm ed25519 -outform DER -out k.der
        base64 -w0 k.der > provisioning.key
        openssl pkey -inform DER -in k.der -pubout -outform DER | tail -c 32 | base64 -w0 > provisioning.pub");
    let image_key = std::fs::read_to_string(w.join("provisioning.pub")).unwrap();
    let key = w.join("provisioning.key");
    let (dir, text) = init_with(w, "10.98.1.0/24", &["--signing-key", key.to_str().unwrap()]);
    assert!(text.contains(image_key.trim()), "{text}");
    // Kept by reference: no copy of the key in the operator directory.
    assert!(!dir.join("keys/provisioning.key").exists());
    add(&dir, "1312345678", "つなぎ内科", "TSUNAGI_A");
    let out = w.join("medium");
    ok(
        &dir,
        &[
            "medium",
            "--clinic",
            "1312345678",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let (bundle, sig) = read_medium(&out);
    tsunagi_medium::verify(&bundle, Some(&sig), image_key.trim(), blank_box()).unwrap();
}

/// The clinic's own addresses on the box's ports (`clinic add --lan-address ...`) go over
/// the template's `[network]`, which names the ports; a clinic whose addresses do not hold
/// together with its config is refused when it is added, not when its medium is written.
#[test]
fn a_clinics_own_addresses_go_into_its_medium() {
    let work = tempfile::tempdir().unwrap();
    let (dir, public) = init(work.path(), "10.98.1.0/24");
    let own = [
        "--lan-address",
        "192.168.1.250/24",
        "--wan-address",
        "192.0.2.10/24",
        "--wan-gateway",
        "192.0.2.1",
        "--wan-dns",
        "192.0.2.53",
    ];
    let add_with = |code: &str, extra: &[&str]| {
        let mut args = vec![
            "clinic",
            "add",
            "--code",
            code,
            "--name",
            "アドレス医院",
            "--ae-title",
            "TSUNAGI",
        ];
        args.extend_from_slice(extra);
        run(&dir, &args)
    };
    // The template does not name the ports yet.
    let (text, success) = add_with("1312345678", &own);
    assert!(
        !success && text.contains("the template has no [network.wan] and [network.lan]"),
        "{text}"
    );
    let template = dir.join("clinic-template.toml");
    let mut t = std::fs::read_to_string(&template).unwrap();
    t.push_str(
        "\n[network.wan]\ninterface = \"enp1s0\"\naddress = \"dhcp\"\n\n\
         [network.lan]\ninterface = \"enp2s0\"\naddress = \"192.168.50.1/24\"\n",
    );
    std::fs::write(&template, t).unwrap();
    let (text, success) = add_with("1312345678", &own);
    assert!(success, "{text}");
    let (text, success) = add_with("1319999999", &[]);
    assert!(success, "{text}");
    // Refused, and not registered: a value that is no address, a LAN inside the tunnel's
    // subnet, a gateway for a WAN on DHCP.
    for (extra, why) in [
        (
            &["--lan-address", "192.168.1.0/24"][..],
            "network or broadcast address",
        ),
        (
            &["--lan-address", "10.98.7.1/16"][..],
            "overlaps the tunnel's",
        ),
        (
            &["--wan-gateway", "192.0.2.1"][..],
            "with dhcp they come from the router",
        ),
        (&["--wan-dns", "dns.example"][..], "is not an IPv4 address"),
    ] {
        let (text, success) = add_with("1310000001", extra);
        assert!(!success && text.contains(why), "{extra:?}: {text}");
    }
    let list: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["clinic", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["lan-address"], "192.168.1.250/24");
    assert_eq!(list[0]["wan-dns"][0], "192.0.2.53");

    let config_of = |code: &str| {
        let out = work.path().join(code);
        ok(
            &dir,
            &["medium", "--clinic", code, "--out", out.to_str().unwrap()],
        );
        let (bundle, sig) = read_medium(&out);
        let b = tsunagi_medium::verify(
            &bundle,
            Some(&sig),
            &public,
            tsunagi_medium::Expect {
                facility_code: None,
                last_serial: None,
                now: 0,
            },
        )
        .unwrap();
        tsunagi_config::parse(&b.config, Path::new("medium")).unwrap()
    };
    let network_of = |code: &str| config_of(code).network.unwrap();
    let a = network_of("1312345678");
    assert_eq!(a.lan.address.to_string(), "192.168.1.250/24");
    assert_eq!(a.lan.interface.as_ref().unwrap().as_str(), "enp2s0");
    assert_eq!(a.wan.address.to_string(), "192.0.2.10/24");
    assert_eq!(a.wan.gateway, Some("192.0.2.1".parse().unwrap()));
    assert_eq!(
        a.wan.dns,
        ["192.0.2.53".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    let b = network_of("1319999999");
    assert_eq!(b.lan.address.to_string(), "192.168.50.1/24");
    assert_eq!(b.wan.address.to_string(), "dhcp");
    // With the console on, it answers on the clinic's own LAN address (the port the
    // template's); a clinic without one keeps the template's.
    let mut t = std::fs::read_to_string(&template).unwrap();
    t.push_str("\n[console]\nenabled = true\nlisten = \"192.168.50.1:8443\"\n");
    std::fs::write(&template, t).unwrap();
    assert_eq!(
        config_of("1312345678").console.listen.to_string(),
        "192.168.1.250:8443"
    );
    assert_eq!(
        config_of("1319999999").console.listen.to_string(),
        "192.168.50.1:8443"
    );
    // A template that turns the identity service off would make boxes that never enroll.
    let mut t = std::fs::read_to_string(&template).unwrap();
    t.push_str("\n[identity]\nenabled = false\n");
    std::fs::write(&template, t).unwrap();
    refused(
        &dir,
        &["medium", "--clinic", "1312345678", "--out", "x"],
        "the template turns [identity] off",
    );
}

#[test]
fn a_medium_written_as_a_fat_image_is_what_a_stick_carries() {
    use std::io::Read as _;
    let work = tempfile::tempdir().unwrap();
    let (dir, public) = init(work.path(), "10.98.1.0/24");
    let (text, success) = add(&dir, "1312345678", "つなぎ内科", "TSUNAGI");
    assert!(success, "{text}");
    let image = work.path().join("stick.img");
    let text = ok(
        &dir,
        &[
            "medium",
            "--clinic",
            "1312345678",
            "--image",
            image.to_str().unwrap(),
        ],
    );
    assert!(text.contains("stick.img"), "{text}");
    assert_eq!(
        std::fs::metadata(&image).unwrap().len(),
        tsunagi_provision::FAT_IMAGE_BYTES
    );
    // The label the box looks for, as blkid (which the box uses) reads it.
    let blkid = Command::new("blkid")
        .args(["-c", "/dev/null", "-o", "value", "-s", "LABEL"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&blkid.stdout).trim(),
        tsunagi_medium::LABEL
    );
    // The two files, as a FAT reader finds them; the box accepts them.
    let file = std::fs::File::open(&image).unwrap();
    let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
    let read = |name: &str| {
        let mut bytes = Vec::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    };
    let bundle = read(tsunagi_medium::BUNDLE_FILE);
    let sig = String::from_utf8(read(tsunagi_medium::SIGNATURE_FILE)).unwrap();
    let b = tsunagi_medium::verify(&bundle, Some(&sig), &public, blank_box()).unwrap();
    assert_eq!(b.serial, 1);
    // Nothing of it stays in the operator directory but the database's record.
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".medium-")
    }));
    // --out or --image, one of them.
    refused(&dir, &["medium", "--clinic", "1312345678"], "--out");
}

/// Issue 19: a clinic whose config enables the console gets its first administrator's
/// one-time code on the provisioning sheet (the command's output); the medium carries only
/// its Argon2id hash, which the box's own check accepts. Without the console, no code.
#[test]
fn the_consoles_setup_code_is_on_the_sheet_and_only_its_hash_on_the_medium() {
    let work = tempfile::tempdir().unwrap();
    let (dir, public) = init(work.path(), "10.98.1.0/24");
    let (text, success) = add(&dir, "1312345678", "つなぎ内科", "TSUNAGI_A");
    assert!(success, "{text}");
    let medium = |name: &str| {
        let out = work.path().join(name);
        let text = ok(
            &dir,
            &[
                "medium",
                "--clinic",
                "1312345678",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        (out, text)
    };
    let (out, text) = medium("without");
    assert!(!text.contains("console setup code"), "{text}");
    let (bundle, sig) = read_medium(&out);
    let b = tsunagi_medium::verify(&bundle, Some(&sig), &public, blank_box()).unwrap();
    assert_eq!(b.console_setup, None);

    // The operator's copy of the template, as `init` made it.
    let template = dir.join("clinic-template.toml");
    let mut t = std::fs::read_to_string(&template).unwrap();
    t.push_str("\n[console]\nenabled = true\n");
    std::fs::write(&template, t).unwrap();
    let (out, text) = medium("with");
    let code = text
        .lines()
        .find_map(|l| l.split_once("console setup code (").map(|(_, rest)| rest))
        .and_then(|rest| rest.rsplit_once("): "))
        .map(|(_, code)| code.trim().to_owned())
        .unwrap_or_else(|| panic!("no setup code: {text}"));
    assert_eq!(code.len(), 19, "{code}");
    let (bundle, sig) = read_medium(&out);
    let on_medium = String::from_utf8(bundle.clone()).unwrap();
    assert!(
        !on_medium.contains(&tsunagi_medium::setup_code::normalize(&code))
            && !on_medium.contains(&code),
        "the code itself is on the medium"
    );
    let b = tsunagi_medium::verify(&bundle, Some(&sig), &public, blank_box()).unwrap();
    let setup = b.console_setup.unwrap();
    assert!(tsunagi_medium::setup_code::verify(&code, &setup.code_hash));
    assert_eq!(
        setup.expires_at,
        b.expires_at + tsunagi_provision::SETUP_CODE_GRACE_SECS
    );
}
