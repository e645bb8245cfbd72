//! Issue 16, a box from sealed carton to connected, in network namespaces: the operator's
//! `tsunagi-provision` (init, clinic add, medium, serve, revoke) and the box's
//! `tsunagi medium apply` and `tsunagi enroll`, against the test network's hub
//! (wireguard-go; the enrollment server behind TLS from a test network CA).
//!
//! - the box applies the signed medium and starts: with no manual step its identity service
//!   makes the TLS key and enrolls over TLS pinned to the medium's CA, through the tunnel's
//!   firewall (which lets that service's user, and no one else, reach the enrollment server
//!   on the WAN); the hub then has its WireGuard key, allowed the clinic's address only
//!   (read from `wg show` at the hub), and the tunnel comes up (a handshake at the hub);
//! - the box's keys never leave it: the operator directory holds neither;
//! - the token is used once: a second box with a copy of the medium is refused, and a box
//!   that trusts another CA refuses the server;
//! - the clinic console's server certificate comes from the network once the box is
//!   enrolled, for the console's LAN address, and is renewed: a computer on the clinic LAN
//!   that trusts the box-identity CA verifies the console (curl), and sees the renewed
//!   certificate without a restart (openssl s_client);
//! - `revoke` removes the peer at the hub, and the box's tunnel goes down;
//! - the server stops within 2 s of SIGTERM.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hil_tests::testnet::{Host, Options, TestNet};
use nix::sys::signal::Signal;

const CODE: &str = "1312345678";
const ENROLL_PORT: u16 = 8443;

/// The operator's tool, built beside this test's binary.
fn provision_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("tsunagi-provision");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("tsunagi-provision is not built beside {}", exe.display());
}

fn run(command: &mut Command) -> (String, i32) {
    let out = command.output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.code().unwrap_or(-1),
    )
}

fn operator(dir: &Path, args: &[&str]) -> String {
    let (text, code) = run(Command::new(provision_bin())
        .arg("--dir")
        .arg(dir)
        .args(args));
    assert_eq!(code, 0, "tsunagi-provision {args:?}: {text}");
    text
}

/// The box's config template: the harness's paths, the test network's tunnel (the site and
/// tunnel keys are the operator's to fill in).
fn template(h: &Harness, net: &TestNet) -> String {
    h.config_text(&format!(
        r#"{FAST_SUPERVISOR}
[heartbeat]
enabled = false

[identity]
enabled = true
check-interval = "1s"

[tunnel]
interface = "{iface}"
backend = "userspace"
hub-endpoint = "placeholder:1"
hub-public-key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
address = "10.99.0.200/24"
hub-subnets = ["10.98.0.0/24"]
health-url = "http://10.98.0.1:8080/health"
probe-interval = "1s"
probe-failures = 2
probe-timeout = "500ms"

[tunnel.firewall]
lan-interfaces = ["{lan}"]
lan-tcp-ports = [443]

[console]
enabled = true
listen = "192.168.50.1:443"
"#,
        iface = net.id().to_owned() + "b",
        lan = net.plan().lan_box_iface,
    ))
}

/// What a computer on the clinic LAN gets from the console at `https://192.168.50.1/`
/// trusting only `ca`: curl's exit code and its error.
fn console_from_clinic(net: &TestNet, ca: &Path) -> (i32, String) {
    let out = net
        .exec(
            Host::Clinic,
            Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "--max-time", "10", "--cacert"])
                .arg(ca)
                .arg("https://192.168.50.1/"),
        )
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The SHA-256 fingerprint of the certificate the console serves, as openssl on the
/// clinic LAN sees it (`AB:CD:…`).
fn served_fingerprint(net: &TestNet) -> String {
    let out = net
        .exec(
            Host::Clinic,
            Command::new("bash").args([
                "-c",
                "openssl s_client -connect 192.168.50.1:443 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
            ]),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .split_once('=')
        .map(|(_, f)| f.to_owned())
        .unwrap_or_default()
}

/// The fingerprint of the first certificate of a PEM file.
fn fingerprint_of(path: &Path) -> String {
    console::tls::fingerprint(&console::tls::certs(path).unwrap()[0])
}

/// `tsunagi medium apply` of a box whose config and state are `h`'s, and whose serial is
/// `serial`.
fn apply(h: &Harness, medium: &Path, key: &Path, serial: &str) {
    let (text, code) = run(Command::new(BIN)
        .args(["medium", "apply"])
        .arg(medium)
        .arg("--key")
        .arg(key)
        .arg("--state-dir")
        .arg(h.state_dir())
        .arg("--config")
        .arg(&h.config)
        .args(["--network-dir"])
        .arg(h.dir.path().join("network"))
        .args(["--time-dir"])
        .arg(h.dir.path().join("chrony"))
        .args(["--box-serial", serial]));
    assert_eq!(code, 0, "{text}");
}

/// `tsunagi enroll` by hand, in `host`'s namespace.
fn enroll(net: &TestNet, host: Host, h: &Harness, serial: &str) -> (String, i32) {
    let out = net
        .exec(
            host,
            Command::new(BIN)
                .args(["enroll", "--box-serial", serial, "--config"])
                .arg(&h.config),
        )
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.code().unwrap_or(-1),
    )
}

fn box_public_key(h: &Harness) -> String {
    let (text, code) = run(Command::new(BIN)
        .args(["vpn", "pubkey", "--config"])
        .arg(&h.config));
    assert_eq!(code, 0, "{text}");
    text.trim().to_owned()
}

fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tunnel_up(status: &serde_json::Value) -> bool {
    state_of(status, "tunnel") == "ready"
        && service(status, "tunnel")["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("up via"))
}

#[test]
fn a_box_enrolls_with_its_medium_and_the_tunnel_comes_up_until_it_is_revoked() {
    if skip_unless_root("enrollment tests") {
        return;
    }
    let net = TestNet::up(Options::default()).expect("test network");
    let work = tempfile::tempdir().unwrap();
    let hub_wan = net.hub_wan_address();
    // The hub's certificate names its WAN address (enrollment) and its address inside the
    // tunnel (renewal).
    let hub_inside = std::net::Ipv4Addr::new(10, 98, 0, 1);
    let pki = hil_tests::nginx::Pki::generate_for(&work.path().join("pki"), &[hub_wan, hub_inside])
        .unwrap();

    // The operator: the network, the clinic, a medium.
    let mut h = Harness::new("");
    std::fs::write(work.path().join("template.toml"), template(&h, &net)).unwrap();
    let op = work.path().join("operator");
    let url = format!("https://{hub_wan}:{ENROLL_PORT}");
    let text = operator(
        &op,
        &[
            "init",
            "--name",
            "TOKYO-TEST",
            "--hub-public-key",
            net.hub_public_key(),
            "--hub-endpoint",
            &format!("{hub_wan}:51820"),
            "--hub-ca",
            pki.ca_cert().to_str().unwrap(),
            "--tunnel-pool",
            "10.99.0.0/24",
            "--enrollment-url",
            &url,
            "--template",
            work.path().join("template.toml").to_str().unwrap(),
        ],
    );
    assert!(text.contains("provisioning public key"), "{text}");
    operator(
        &op,
        &[
            "clinic",
            "add",
            "--code",
            CODE,
            "--name",
            "つなぎ内科",
            "--ae-title",
            "TSUNAGI",
        ],
    );
    let medium = work.path().join("medium");
    operator(
        &op,
        &[
            "medium",
            "--clinic",
            CODE,
            "--out",
            medium.to_str().unwrap(),
        ],
    );
    let key = op.join("keys/provisioning.pub");

    // The enrollment server at the hub.
    let mut serve = Command::new(provision_bin());
    serve
        .arg("--dir")
        .arg(&op)
        .args(["serve", "--listen", &format!("0.0.0.0:{ENROLL_PORT}")])
        .args([
            "--renew-url",
            &format!("https://{hub_inside}:{ENROLL_PORT}"),
        ])
        // Short, so that renewal happens while the test watches (at 10 of 15 s).
        .args(["--certificate-lifetime", "15s"])
        .arg("--tls-cert")
        .arg(pki.server_cert())
        .arg("--tls-key")
        .arg(pki.server_key())
        .args([
            "--wireguard-interface",
            &net.plan().hub_wg_iface,
            "--userspace",
        ]);
    let serve_pid = net.spawn(Host::Hub, &serve).unwrap();

    // The box: the medium applied, then started; nothing else.
    apply(&h, &medium, &key, "QEMU-0001");
    let box_json = std::fs::read_to_string(h.state_dir().join("provisioning/box.json")).unwrap();
    assert!(box_json.contains("QEMU-0001"), "{box_json}");
    wait("the enrollment server", Duration::from_secs(20), || {
        net.exec(
            Host::Box,
            Command::new("bash").args(["-c", &format!("exec 3<>/dev/tcp/{hub_wan}/{ENROLL_PORT}")]),
        )
        .is_ok_and(|o| o.status.success())
    });
    // Issue 17: the enrollment server offers only the one TLS policy, as testssl.sh sees
    // it from the box's side of the WAN.
    let offer =
        hil_tests::testssl::scan(&format!("{hub_wan}:{ENROLL_PORT}"), Some(net.ns(Host::Box)))
            .unwrap();
    println!("{offer}");
    assert_eq!(offer.policy_violations(), Vec::<String>::new(), "{offer}");
    let serve_log = || {
        net.log_file(serve_pid)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    };
    let started = Instant::now();
    h.start_in_netns(net.ns(Host::Box));
    let enrolled = h.wait_for("the box enrolled", Duration::from_secs(60), |s| {
        service(s, "identity")["summary"]
            .as_str()
            .is_some_and(|t| t.starts_with("1312345678-QEMU-0001: certificate until"))
    });
    println!(
        "enrollment: enrolled by the identity service {:?} after start: {}",
        started.elapsed(),
        service(&enrolled, "identity")["summary"]
    );
    assert!(
        serve_log().contains("enrolled 1312345678-QEMU-0001 from"),
        "{}",
        serve_log()
    );
    h.wait_for("the tunnel up", Duration::from_secs(90), tunnel_up);
    println!(
        "enrollment: the tunnel up {:?} after start",
        started.elapsed()
    );
    let public = box_public_key(&h);
    assert!(box_json.contains(&public), "{box_json}");
    assert!(net.hub_handshake_age(&public).unwrap().is_some());
    let peers = net.hub_peers().unwrap();
    assert!(
        peers
            .lines()
            .any(|l| l.starts_with(&public) && l.ends_with("10.99.0.2/32")),
        "the hub's peers:\n{peers}"
    );
    // The box's keys stayed on the box, the TLS key the identity service's alone.
    let identity = h.state_dir().join("identity");
    let tls_key = std::fs::read_to_string(identity.join("box.key")).unwrap();
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let meta = std::fs::metadata(identity.join("box.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let owner = tsunagi_runtime::privilege::ensure_user("tsunagi-identity").unwrap();
        assert_eq!(meta.uid(), owner.uid.as_raw());
    }
    // Published for the services that present the box's identity (group tsunagi-box-cert):
    // the directory 2750, the files 0640, the same certificate and key.
    let client = h.state_dir().join("identity-client");
    let published = |name: &str| {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let group = nix::unistd::Group::from_name(identity::CLIENT_GROUP)
            .unwrap()
            .expect("the group exists");
        let dir = std::fs::metadata(&client).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o2750);
        assert_eq!(dir.gid(), group.gid.as_raw());
        let meta = std::fs::metadata(client.join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640, "{name}");
        assert_eq!(meta.gid(), group.gid.as_raw(), "{name}");
        std::fs::read_to_string(client.join(name)).unwrap()
    };
    h.wait_for("the certificate published", Duration::from_secs(10), |_| {
        client.join("box.key").exists()
    });
    assert_eq!(published("box.key"), tls_key);
    assert_eq!(
        published("box.pem"),
        std::fs::read_to_string(identity.join("box.pem")).unwrap()
    );
    let wg_private = std::fs::read_dir(h.state_dir().join("tunnel"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect::<Vec<_>>();
    for entry in files_under(&op) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let key_body = tls_key.lines().nth(1).unwrap();
        assert!(
            !text.contains(key_body),
            "{} holds the box's TLS key",
            entry.display()
        );
        for wg in &wg_private {
            assert!(
                !text.contains(wg.trim()),
                "{} holds a box key",
                entry.display()
            );
        }
    }
    // The token was used and deleted; by hand, the box is enrolled already.
    assert!(!identity.join("enrollment.json").exists());
    let (text, code) = enroll(&net, Host::Box, &h, "QEMU-0001");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already enrolled"), "{text}");
    // Nothing but the identity service's user gets to the enrollment server by the WAN:
    // root cannot.
    let root = net
        .exec(
            Host::Box,
            Command::new("bash").args([
                "-c",
                &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{hub_wan}/{ENROLL_PORT}'"),
            ]),
        )
        .unwrap();
    assert!(!root.status.success(), "root reached the enrollment server");
    let as_identity = net
        .exec(
            Host::Box,
            Command::new("setpriv").args([
                "--reuid=tsunagi-identity",
                "--regid=tsunagi-identity",
                "--clear-groups",
                "bash",
                "-c",
                &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{hub_wan}/{ENROLL_PORT}'"),
            ]),
        )
        .unwrap();
    assert!(
        as_identity.status.success(),
        "the identity service's user cannot reach the enrollment server: {}",
        String::from_utf8_lossy(&as_identity.stderr)
    );
    let ruleset = net
        .exec(
            Host::Box,
            Command::new("nft").args(["list", "table", "inet", "tsunagi"]),
        )
        .unwrap();
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    assert!(
        ruleset.contains(&format!(
            "ip daddr {hub_wan} tcp dport {ENROLL_PORT} meta skuid"
        )),
        "{ruleset}"
    );

    // A second box with a copy of the medium: the token is spent. (By hand, from the hub's
    // namespace: the first box's firewall holds the box namespace.)
    let other = Harness::new("");
    apply(&other, &medium, &key, "QEMU-0002");
    let config = std::fs::read_to_string(&other.config).unwrap();
    std::fs::write(
        &other.config,
        config.replace(
            &h.dir.path().display().to_string(),
            &other.dir.path().display().to_string(),
        ),
    )
    .unwrap();
    let (text, code) = enroll(&net, Host::Hub, &other, "QEMU-0002");
    assert_eq!(code, 6, "{text}");
    assert!(text.contains("used already"), "{text}");
    assert!(
        serve_log().contains("enroll: refused (403)"),
        "{}",
        serve_log()
    );
    // A box that trusts another CA does not talk to this server at all.
    let stranger =
        hil_tests::nginx::Pki::generate_for(&work.path().join("other-pki"), &[hub_wan]).unwrap();
    std::fs::copy(
        stranger.ca_cert(),
        other.state_dir().join("provisioning/network-ca.pem"),
    )
    .unwrap();
    let (text, code) = enroll(&net, Host::Hub, &other, "QEMU-0002");
    assert_eq!(code, 1, "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    let enrolled_cert = std::fs::read_to_string(identity.join("box.pem")).unwrap();
    // The certificate is renewed over the tunnel before it ends (from the box's tunnel
    // address, as the server saw it), for the same key.
    let renewed = h.wait_for("a renewal", Duration::from_secs(30), |s| {
        service(s, "identity")["summary"]
            .as_str()
            .is_some_and(|t| t.contains("renewed 1 times"))
    });
    println!("enrollment: {}", service(&renewed, "identity")["summary"]);
    assert!(
        serve_log().contains("renew: renewed 1312345678-QEMU-0001 from 10.99.0.2:"),
        "{}",
        serve_log()
    );
    assert_ne!(
        std::fs::read_to_string(identity.join("box.pem")).unwrap(),
        enrolled_cert
    );
    assert_eq!(
        std::fs::read_to_string(identity.join("box.key")).unwrap(),
        tls_key
    );
    // The renewed certificate is published too.
    let renewed_cert = std::fs::read_to_string(identity.join("box.pem")).unwrap();
    h.wait_for(
        "the renewed certificate published",
        Duration::from_secs(10),
        |_| std::fs::read_to_string(client.join("box.pem")).is_ok_and(|c| c == renewed_cert),
    );

    // The console's server certificate: asked for by the identity service once enrolled,
    // published for the console alone (group tsunagi-console-cert), and served. A computer
    // on the clinic LAN that trusts the box-identity CA verifies it by the console's
    // address; one that trusts another CA does not.
    let console_dir = h.state_dir().join("identity-console");
    let console_cert = console_dir.join("console.pem");
    let with_console = h.wait_for(
        "the console's certificate published",
        Duration::from_secs(30),
        |s| {
            console_cert.exists()
                && service(s, "identity")["summary"]
                    .as_str()
                    .is_some_and(|t| t.contains("console certificate for 192.168.50.1 until"))
        },
    );
    println!(
        "enrollment: {}",
        service(&with_console, "identity")["summary"]
    );
    assert!(
        serve_log()
            .contains("console: issued for 1312345678-QEMU-0001 (192.168.50.1) from 10.99.0.2:"),
        "{}",
        serve_log()
    );
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let group = nix::unistd::Group::from_name(identity::CONSOLE_GROUP)
            .unwrap()
            .expect("the group exists");
        let dir = std::fs::metadata(&console_dir).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o2750);
        assert_eq!(dir.gid(), group.gid.as_raw());
        for name in ["console.pem", "console.key"] {
            let meta = std::fs::metadata(console_dir.join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o640, "{name}");
            assert_eq!(meta.gid(), group.gid.as_raw(), "{name}");
        }
        let own = std::fs::metadata(identity.join("console.key")).unwrap();
        assert_eq!(own.permissions().mode() & 0o777, 0o600);
        assert_ne!(
            std::fs::read(identity.join("console.key")).unwrap(),
            tls_key.as_bytes(),
            "the console has a key of its own"
        );
    }
    let box_ca = identity.join("box-ca.pem");
    h.wait_for(
        "the console serving the network's certificate",
        Duration::from_secs(20),
        |_| console_from_clinic(&net, &box_ca).0 == 0,
    );
    let stranger_ca =
        hil_tests::nginx::Pki::generate_for(&work.path().join("lan-pki"), &[hub_wan]).unwrap();
    let (code, why) = console_from_clinic(&net, &stranger_ca.ca_cert());
    assert_eq!(code, 60, "curl trusting another CA: {why}");
    // What it serves is what was published (the certificate changes every 10 s here).
    let mut first_served = String::new();
    wait(
        "the console serving the published certificate",
        Duration::from_secs(10),
        || {
            first_served = served_fingerprint(&net);
            first_served == fingerprint_of(&console_cert)
        },
    );
    // Its status says so, and its metrics (what 接続状態's 「この画面の証明書」 reads).
    let console_status = h.wait_for("the console's status", Duration::from_secs(40), |s| {
        service(s, "console")["summary"]
            .as_str()
            .is_some_and(|t| t.contains("the network's certificate"))
            && service(s, "console")["metrics"]["certificate_source"] == 1.0
    });
    println!(
        "enrollment: {}",
        service(&console_status, "console")["summary"]
    );
    // Renewed with the box's certificate's lifetime (15 s here): the console serves the
    // new one without a restart.
    h.wait_for(
        "the console serving its renewed certificate",
        Duration::from_secs(40),
        |_| {
            let served = served_fingerprint(&net);
            !served.is_empty() && served != first_served && served == fingerprint_of(&console_cert)
        },
    );
    assert_eq!(console_from_clinic(&net, &box_ca).0, 0);
    // The clinic's box is still the first.
    let shown = operator(&op, &["clinic", "show", CODE, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["box"]["box-serial"], "QEMU-0001");
    assert_eq!(shown["box"]["wireguard-public-key"], public.as_str());

    // Revoked: the hub forgets the box, and the box's tunnel goes down.
    let text = operator(
        &op,
        &[
            "revoke",
            "--clinic",
            CODE,
            "--wireguard-interface",
            &net.plan().hub_wg_iface,
            "--userspace",
        ],
    );
    assert!(text.contains("revoked clinic 1312345678"), "{text}");
    assert!(!net.hub_peers().unwrap().contains(&public));
    h.wait_for("the tunnel down", Duration::from_secs(60), |s| {
        !tunnel_up(s)
    });
    // And its next renewal fails: the hub no longer answers it.
    let failed = h.wait_for("a failed renewal", Duration::from_secs(40), |s| {
        service(s, "identity")["summary"]
            .as_str()
            .is_some_and(|t| t.contains("renewal failed"))
    });
    println!(
        "enrollment: after revocation: {}",
        service(&failed, "identity")["summary"]
    );
    assert_eq!(service(&failed, "identity")["health"], "degraded");

    // The server stops within 2 s of SIGTERM.
    let stopped = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(serve_pid).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
    wait(
        "the enrollment server to stop",
        Duration::from_secs(2),
        || !alive(i32::try_from(serve_pid).unwrap()),
    );
    println!(
        "enrollment: the server stopped {:?} after SIGTERM",
        stopped.elapsed()
    );
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}
