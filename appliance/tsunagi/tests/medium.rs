//! Issue 16, the box's side of a provisioning medium: `tsunagi medium check|apply DIR`
//! against a medium signed as the operator's tool signs it. Applied once; a newer serial
//! re-provisions; every refusal is one line, changes nothing and exits 6.

#[path = "common/files.rs"]
mod files;

use std::path::Path;
use std::process::Command;

use ring::signature::Ed25519KeyPair;
use tsunagi_medium::{Bundle, Enrollment, FORMAT, Hub, Kind};

const BIN: &str = env!("CARGO_BIN_EXE_tsunagi");

fn key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn bundle(code: &str, serial: u64) -> Bundle {
    Bundle {
        format: FORMAT,
        kind: Kind::Provision,
        serial,
        issued_at: now() - 60,
        expires_at: now() + 86_400,
        facility_code: code.to_owned(),
        clinic_name: "つなぎ内科".to_owned(),
        config: format!(
            "version = 1\n\n[site]\nfacility-code = \"{code}\"\nae-title = \"TSUNAGI\"\n\n\
             [paths]\nstate-dir = \"/var/lib/tsunagi\"\nruntime-dir = \"/run/tsunagi\"\n# serial {serial}\n"
        ),
        hub: Some(Hub {
            public_key: "FqGPA/dw/H+9j+QYoKYEg1ofmejzlvrfqqa+t4OnBy4=".to_owned(),
            endpoint: "hub.example.test:51820".to_owned(),
            tunnel_address: "10.98.1.2/24".to_owned(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n".to_owned(),
        }),
        enrollment: Some(Enrollment {
            token: format!("token-{serial}"),
            expires_at: now() + 3600,
            url: "https://10.98.0.1:8443/enroll".to_owned(),
        }),
        secrets: std::collections::BTreeMap::new(),
        console_setup: None,
    }
}

/// Writes a medium into `dir` (signed with `k`, unless `None`).
fn write(dir: &Path, b: &Bundle, k: Option<&Ed25519KeyPair>) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes = serde_json::to_vec_pretty(b).unwrap();
    std::fs::write(dir.join(tsunagi_medium::BUNDLE_FILE), &bytes).unwrap();
    let _ = std::fs::remove_file(dir.join(tsunagi_medium::SIGNATURE_FILE));
    if let Some(k) = k {
        std::fs::write(
            dir.join(tsunagi_medium::SIGNATURE_FILE),
            tsunagi_medium::sign(&bytes, k),
        )
        .unwrap();
    }
}

struct Box {
    dir: tempfile::TempDir,
}

impl Box {
    fn new(k: &Ed25519KeyPair) -> Box {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("provisioning.pub"),
            tsunagi_medium::public_key_text(k),
        )
        .unwrap();
        Box { dir }
    }

    fn config(&self) -> std::path::PathBuf {
        self.dir.path().join("etc/tsunagi.toml")
    }

    fn network_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("etc/systemd/network")
    }

    fn time_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("etc/chrony/sources.d")
    }

    /// The network files there, by name.
    fn network_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.network_dir())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// `tsunagi medium VERB MEDIUM`: its one line and its exit code.
    fn medium(&self, verb: &str, medium: &Path) -> (String, i32) {
        let d = self.dir.path();
        let mut cmd = Command::new(BIN);
        cmd.args(["medium", verb])
            .arg(medium)
            .arg("--key")
            .arg(d.join("provisioning.pub"))
            .arg("--state-dir")
            .arg(d.join("state"))
            .env_remove("TSUNAGI_CONFIG");
        if verb == "apply" {
            cmd.arg("--config")
                .arg(self.config())
                .arg("--network-dir")
                .arg(self.network_dir())
                .arg("--time-dir")
                .arg(self.time_dir());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (text, out.status.code().unwrap_or(-1))
    }
}

#[test]
fn a_medium_is_applied_once_and_a_newer_serial_reprovisions() {
    use std::os::unix::fs::PermissionsExt as _;
    let k = key();
    let b = Box::new(&k);
    let media = tempfile::tempdir().unwrap();
    let first = media.path().join("first");
    write(&first, &bundle("1312345678", 3), Some(&k));
    // check changes nothing.
    let (text, code) = b.medium("check", &first);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("accepted: provisioning medium serial 3 for clinic 1312345678"),
        "{text}"
    );
    assert!(!b.config().exists());
    // apply: the config, the CA, the token (the identity service's only), the record.
    let (text, code) = b.medium("apply", &first);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("applied: provisioning medium serial 3"),
        "{text}"
    );
    let config = std::fs::read_to_string(b.config()).unwrap();
    assert!(config.contains("facility-code = \"1312345678\"") && config.contains("# serial 3"));
    tsunagi_config::parse(&config, Path::new("applied")).unwrap();
    let state = b.dir.path().join("state/provisioning");
    assert!(
        std::fs::read_to_string(state.join("network-ca.pem"))
            .unwrap()
            .contains("TEST")
    );
    // The token is the identity service's, which enrolls with it: 0600 in its directory.
    let token = b.dir.path().join("state/identity/enrollment.json");
    assert_eq!(
        std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o600
    );
    if tsunagi_runtime::privilege::is_root() {
        use std::os::unix::fs::MetadataExt as _;
        let owner = tsunagi_runtime::privilege::ensure_user("tsunagi-identity").unwrap();
        assert_eq!(std::fs::metadata(&token).unwrap().uid(), owner.uid.as_raw());
    }
    assert!(std::fs::read_to_string(&token).unwrap().contains("token-3"));
    // Applied once: the same medium again (left attached) is nothing to do, and is not
    // audited as a refusal.
    let audit = || std::fs::read_to_string(state.join("audit.jsonl")).unwrap();
    let before = audit();
    std::fs::write(b.config(), "changed by hand\n").unwrap();
    let (text, code) = b.medium("apply", &first);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text.trim(),
        "tsunagi medium: already applied: serial 3, applied before; nothing to do"
    );
    assert_eq!(
        std::fs::read_to_string(b.config()).unwrap(),
        "changed by hand\n"
    );
    assert_eq!(audit(), before);
    // A newer serial for the same clinic re-provisions.
    let second = media.path().join("second");
    write(&second, &bundle("1312345678", 4), Some(&k));
    let (text, code) = b.medium("apply", &second);
    assert_eq!(code, 0, "{text}");
    assert!(
        std::fs::read_to_string(b.config())
            .unwrap()
            .contains("# serial 4")
    );
    // Another clinic's medium, even newer, is refused: this box belongs to 1312345678.
    let other = media.path().join("other");
    write(&other, &bundle("1319999999", 9), Some(&k));
    let (text, code) = b.medium("apply", &other);
    assert_eq!(code, 6, "{text}");
    assert!(
        text.contains("this box belongs to clinic 1312345678"),
        "{text}"
    );
    assert!(
        std::fs::read_to_string(b.config())
            .unwrap()
            .contains("# serial 4")
    );
}

#[test]
fn unsigned_tampered_and_foreign_media_change_nothing() {
    let k = key();
    let b = Box::new(&k);
    let media = tempfile::tempdir().unwrap();
    let unsigned = media.path().join("unsigned");
    write(&unsigned, &bundle("1312345678", 1), None);
    let foreign = media.path().join("foreign");
    write(&foreign, &bundle("1312345678", 1), Some(&key()));
    let tampered = media.path().join("tampered");
    write(&tampered, &bundle("1312345678", 1), Some(&k));
    let path = tampered.join(tsunagi_medium::BUNDLE_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("10.98.1.2/24", "10.98.1.9/24", 1)).unwrap();
    let mut expired_bundle = bundle("1312345678", 1);
    expired_bundle.expires_at = now() - 1;
    let expired = media.path().join("expired");
    write(&expired, &expired_bundle, Some(&k));
    // Signed and current, but its DICOM spool (a pebibyte) does not fit the box's disk.
    let mut oversized_bundle = bundle("1312345678", 1);
    oversized_bundle.config = oversized_bundle.config.replace(
        "[paths]",
        "[site.network-ids]\nissuer = \"TOKYO-NET\"\noid = \"1.2.392.999.1\"\n[paths]",
    ) + "[dicom]\nlisten = \"0.0.0.0:104\"\nspool-quota-mib = 1073741824\n\
         [dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n";
    let oversized = media.path().join("oversized");
    write(&oversized, &oversized_bundle, Some(&k));
    for (medium, why) in [
        (
            &oversized,
            "does not fit this box: dicom.spool-quota-mib: a spool quota of 1073741824 MiB",
        ),
        (&unsigned, "the medium is not signed"),
        (
            &foreign,
            "does not verify against the network's provisioning key",
        ),
        (
            &tampered,
            "does not verify against the network's provisioning key",
        ),
        (&expired, "the medium expired at"),
    ] {
        let (text, code) = b.medium("apply", medium);
        assert_eq!(code, 6, "{text}");
        assert_eq!(text.lines().count(), 1, "one line: {text}");
        assert!(text.contains(why), "{why}: {text}");
        assert!(!b.config().exists(), "nothing applied");
        // Nothing but the audit record of the refusal.
        let provisioning = b.dir.path().join("state/provisioning");
        assert_eq!(
            files::files_under(&provisioning),
            vec![provisioning.join("audit.jsonl")]
        );
        let audit = std::fs::read_to_string(provisioning.join("audit.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
        assert_eq!(last["verdict"], "refused");
        assert!(last["reason"].as_str().unwrap().contains(why), "{last}");
    }
}

#[test]
fn a_reset_medium_wipes_the_box_which_then_takes_any_clinic_but_no_older_medium() {
    let k = key();
    let b = Box::new(&k);
    let media = tempfile::tempdir().unwrap();
    let first = media.path().join("first");
    write(&first, &bundle("1312345678", 3), Some(&k));
    assert_eq!(b.medium("apply", &first).1, 0);
    // What a running box has: keys, an enrollment, a consent cache, a spool.
    let state = b.dir.path().join("state");
    for (path, bytes) in [
        ("tunnel/private.key", "secret"),
        ("identity/box.key", "secret"),
        ("consent/consent.db", "db"),
        ("dicom/spool/objects/x", "dicom"),
    ] {
        let p = state.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    // Another clinic's reset medium is refused, and changes nothing.
    let mut other = bundle("1319999999", 5);
    other.kind = Kind::Reset;
    other.config = String::new();
    other.hub = None;
    other.enrollment = None;
    let foreign = media.path().join("foreign-reset");
    write(&foreign, &other, Some(&k));
    let (text, code) = b.medium("apply", &foreign);
    assert_eq!(code, 6, "{text}");
    assert!(state.join("tunnel/private.key").exists());
    // This clinic's reset: everything goes but the record of the serial.
    let mut r = other.clone();
    r.facility_code = "1312345678".into();
    let reset = media.path().join("reset");
    write(&reset, &r, Some(&k));
    let (text, code) = b.medium("check", &reset);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("factory-reset medium serial 5"), "{text}");
    let (text, code) = b.medium("apply", &reset);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("the box is un-enrolled"), "{text}");
    assert!(!b.config().exists());
    let left = files::files_under(&state);
    assert_eq!(
        left,
        vec![
            state.join("provisioning/applied.json"),
            state.join("provisioning/audit.jsonl")
        ],
        "{left:?}"
    );
    // The audit trail kept every attempt to apply: applied, refused (another clinic's
    // reset), applied (the reset).
    let audit = std::fs::read_to_string(state.join("provisioning/audit.jsonl")).unwrap();
    let verdicts: Vec<String> = audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["verdict"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(verdicts, ["applied", "refused", "applied"], "{audit}");
    assert!(
        audit.contains("this box belongs to clinic 1312345678"),
        "{audit}"
    );
    // Applied once: left attached, it wipes nothing again.
    let (text, code) = b.medium("apply", &reset);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already applied: serial 5"), "{text}");
    // The box takes a newer medium of any clinic, but no older one (replay).
    let (text, code) = b.medium("apply", &first);
    assert_eq!(code, 6, "{text}");
    assert!(
        text.contains("older than the last one applied (5)"),
        "{text}"
    );
    let next = media.path().join("next");
    write(&next, &bundle("1319999999", 6), Some(&k));
    let (text, code) = b.medium("apply", &next);
    assert_eq!(code, 0, "{text}");
    assert!(
        std::fs::read_to_string(b.config())
            .unwrap()
            .contains("1319999999")
    );
}

/// A medium's `[network]` becomes the box's networkd files (the WAN and LAN ports, as the
/// operator set them): a newer medium with other addresses replaces them, one without
/// `[network]` leaves them, the image's own files are never touched, and a factory reset
/// removes only what media wrote.
#[test]
fn a_mediums_network_becomes_the_boxs_networkd_files() {
    let k = key();
    let b = Box::new(&k);
    let media = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(b.network_dir()).unwrap();
    std::fs::write(b.network_dir().join("99-image.network"), "[Match]\n").unwrap();
    let with_network = |serial: u64, lan: &str| {
        let mut m = bundle("1312345678", serial);
        m.config.push_str(&format!(
            "[network.wan]\nmac = \"52:54:00:74:73:01\"\naddress = \"dhcp\"\n\
             [network.lan]\nmac = \"52:54:00:74:73:02\"\naddress = \"{lan}\"\n"
        ));
        m
    };
    let first = media.path().join("first");
    write(&first, &with_network(3, "192.168.50.1/24"), Some(&k));
    let (text, code) = b.medium("apply", &first);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        b.network_files(),
        [
            "10-tsunagi-wan.network",
            "20-tsunagi-lan.network",
            "99-image.network"
        ]
    );
    let lan = || std::fs::read_to_string(b.network_dir().join("20-tsunagi-lan.network")).unwrap();
    assert!(
        lan().contains("MACAddress=52:54:00:74:73:02\n"),
        "{}",
        lan()
    );
    assert!(lan().contains("Address=192.168.50.1/24\n"), "{}", lan());
    // A newer medium moves the LAN; one without [network] leaves the files as they are.
    let second = media.path().join("second");
    write(&second, &with_network(4, "192.168.77.1/24"), Some(&k));
    assert_eq!(b.medium("apply", &second).1, 0);
    assert!(lan().contains("Address=192.168.77.1/24\n"), "{}", lan());
    let third = media.path().join("third");
    write(&third, &bundle("1312345678", 5), Some(&k));
    assert_eq!(b.medium("apply", &third).1, 0);
    assert!(lan().contains("Address=192.168.77.1/24\n"), "{}", lan());
    // A medium whose [network] does not hold together is refused, and changes nothing.
    let broken = media.path().join("broken");
    write(&broken, &with_network(6, "192.168.77.0/24"), Some(&k));
    let (text, code) = b.medium("apply", &broken);
    assert_eq!(code, 6, "{text}");
    assert!(text.contains("network.lan.address"), "{text}");
    assert!(lan().contains("Address=192.168.77.1/24\n"), "{}", lan());
    // The reset removes what media wrote, and only that.
    let mut reset = bundle("1312345678", 7);
    reset.kind = Kind::Reset;
    let reset_dir = media.path().join("reset");
    write(&reset_dir, &reset, Some(&k));
    let (text, code) = b.medium("apply", &reset_dir);
    assert_eq!(code, 0, "{text}");
    assert_eq!(b.network_files(), ["99-image.network"]);
}

/// Issue 17, consistent time: the hub's time server of the config becomes chrony's one
/// source (the image's chrony.conf reads only that directory); a medium without one, and a
/// reset, leave chrony none of ours.
#[test]
fn a_mediums_time_server_becomes_chronys_source() {
    let k = key();
    let b = Box::new(&k);
    let media = tempfile::tempdir().unwrap();
    let with_time = |serial: u64, server: Option<&str>| {
        let mut m = bundle("1312345678", serial);
        m.enrollment = None;
        m.config.push_str(
            "[tunnel]
interface = \"tsunagi0\"
hub-endpoint = \"192.0.2.1:51820\"
             hub-public-key = \"FqGPA/dw/H+9j+QYoKYEg1ofmejzlvrfqqa+t4OnBy4=\"
             address = \"10.99.0.2/24\"
hub-subnets = [\"10.98.0.0/24\"]
             health-url = \"http://10.98.0.1:8080/health\"
",
        );
        if let Some(server) = server {
            m.config.push_str(&format!("time-server = \"{server}\"\n"));
        }
        m
    };
    let sources = || std::fs::read_to_string(b.time_dir().join("tsunagi.sources"));
    let first = media.path().join("first");
    write(&first, &with_time(3, Some("10.98.0.1:123")), Some(&k));
    let (text, code) = b.medium("apply", &first);
    assert_eq!(code, 0, "{text}");
    let written = sources().unwrap();
    assert!(
        written.contains("\nserver 10.98.0.1 port 123 iburst minpoll 4 maxpoll 6\n"),
        "{written}"
    );
    let second = media.path().join("second");
    write(&second, &with_time(4, None), Some(&k));
    let (text, code) = b.medium("apply", &second);
    assert_eq!(code, 0, "{text}");
    assert!(sources().is_err(), "no time server, no source of ours");
    let third = media.path().join("third");
    write(&third, &with_time(5, Some("10.98.0.1:1123")), Some(&k));
    assert_eq!(b.medium("apply", &third).1, 0);
    assert!(sources().unwrap().contains("server 10.98.0.1 port 1123 "));
    let mut reset = bundle("1312345678", 6);
    reset.kind = Kind::Reset;
    let reset_dir = media.path().join("reset");
    write(&reset_dir, &reset, Some(&k));
    let (text, code) = b.medium("apply", &reset_dir);
    assert_eq!(code, 0, "{text}");
    assert!(sources().is_err(), "the reset removes it");
}

#[test]
fn the_clinics_share_password_lands_where_the_config_names_it_for_root_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    let k = key();
    let b = Box::new(&k);
    let media = tempfile::tempdir().unwrap();
    let password = b.dir.path().join("etc/secrets/share.password");
    let mut with_share = bundle("1312345678", 1);
    with_share.config.push_str(&format!(
        "\n[ssmix2]\nstorage = \"/run/tsunagi-shares/ssmix2\"\n\
         [ssmix2.replica]\nurl = \"https://10.98.0.1:8443/ssmix2/\"\nca-file = \"/var/lib/tsunagi/provisioning/network-ca.pem\"\nclient-identity = true\n[identity]\nenabled = true\n\
         [ssmix2.share]\naddress = \"192.168.50.10\"\nshare = \"ssmix2\"\nusername = \"tsunagi\"\n\
         password-file = \"{}\"\n",
        password.display()
    ));
    with_share.secrets.insert(
        "ssmix2.share.password-file".into(),
        "emr-read-only\n".into(),
    );
    let medium = media.path().join("share");
    write(&medium, &with_share, Some(&k));
    let (text, code) = b.medium("apply", &medium);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("emr-read-only"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&password).unwrap(),
        "emr-read-only\n"
    );
    assert_eq!(
        std::fs::metadata(&password).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The applied config then loads: its secret file is private.
    tsunagi_config::load(&b.config()).unwrap();
}

/// Issue 19: the console's first administrator registers with the setup code from the
/// provisioning sheet; the medium carries only its hash, which the box keeps for the
/// console while it has no account.
#[test]
fn the_sheets_setup_code_opens_the_console_once_and_only_its_hash_travels() {
    let k = key();
    let b = Box::new(&k);
    let media = tempfile::tempdir().unwrap();
    let (code, hash) = tsunagi_medium::setup_code::generate().unwrap();
    let mut with_console = bundle("1312345678", 1);
    with_console
        .config
        .push_str("\n[console]\nenabled = true\n");
    with_console.console_setup = Some(tsunagi_medium::ConsoleSetup {
        code_hash: hash,
        expires_at: now() + 86_400,
    });
    let medium = media.path().join("console");
    write(&medium, &with_console, Some(&k));
    let on_medium = std::fs::read_to_string(medium.join(tsunagi_medium::BUNDLE_FILE)).unwrap();
    assert!(!on_medium.contains(&tsunagi_medium::setup_code::normalize(&code)));
    let (text, exit) = b.medium("apply", &medium);
    assert_eq!(exit, 0, "{text}");
    let db = b
        .dir
        .path()
        .join("state/console")
        .join(console::service::DB_FILE);
    let mut accounts = console::accounts::Accounts::open(&db).unwrap();
    assert!(accounts.setup_pending(now()).unwrap());
    // A wrong code is refused; the sheet's code, as typed in lower case, makes the first
    // administrator; then it is gone.
    let secret = console::accounts::random(console::accounts::TOTP_SECRET_LEN).unwrap();
    let totp = |step: i64| {
        console::accounts::totp_code(
            &secret,
            u64::try_from(step).unwrap() / console::accounts::TOTP_STEP,
        )
    };
    let password = "correct horse battery staple";
    let t = now();
    assert!(
        accounts
            .setup_admin(
                "AAAA-BBBB-CCCC-DDDD",
                "admin",
                password,
                &secret,
                &totp(t),
                t
            )
            .unwrap()
            .is_err()
    );
    accounts
        .setup_admin(
            &code.to_lowercase(),
            "admin",
            password,
            &secret,
            &totp(t),
            t,
        )
        .unwrap()
        .unwrap();
    assert!(!accounts.setup_pending(now()).unwrap());
    drop(accounts);
    // A newer medium with another code: the console has its administrator, so the code is
    // not kept.
    let (_, hash) = tsunagi_medium::setup_code::generate().unwrap();
    let mut again = with_console.clone();
    again.serial = 2;
    again.console_setup = Some(tsunagi_medium::ConsoleSetup {
        code_hash: hash,
        expires_at: now() + 86_400,
    });
    write(&medium, &again, Some(&k));
    let (text, exit) = b.medium("apply", &medium);
    assert_eq!(exit, 0, "{text}");
    assert!(text.contains("the console has accounts already"), "{text}");
    let accounts = console::accounts::Accounts::open(&db).unwrap();
    assert!(!accounts.setup_pending(now()).unwrap());
}
