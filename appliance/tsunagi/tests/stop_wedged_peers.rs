//! Issue 14: every service stops within 2 s of SIGTERM with its peer wedged, in the middle of
//! whatever it waits for: the DICOM forwarder on an A-ASSOCIATE the PACS never answers (and
//! the query proxy on a viewer's C-FIND), the consent sync on a FHIR server that never
//! answers, the SS-MIX2 sync in a TLS handshake with a WebDAV replica that never answers, the
//! tunnel on a health probe that never gets an answer (on a time server that never answers
//! its clock check, and on a DNS server that never answers, while it comes up). The peer is
//! a listener that takes connections (or queries) and never sends a byte.
//!
//! Each test measures from the SIGTERM to the disappearance of the service's process (the
//! supervisor's stop deadline is 5 s, so the bound is the service's, not the deadline's) and
//! checks that the supervisor saw a stop (exit status 0), not a kill; then that the durable
//! state kept what was not done.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// The bound every service keeps.
const STOP_BOUND: Duration = Duration::from_secs(2);

/// The supervisor's settings with a stop deadline well beyond [`STOP_BOUND`].
fn supervisor() -> String {
    let settings = FAST_SUPERVISOR.replace("stop-timeout = \"2s\"", "stop-timeout = \"5s\"");
    assert!(settings.contains("stop-timeout = \"5s\""), "{settings}");
    settings
}

/// A peer that accepts TCP connections on `listener` and never sends a byte; counts them.
fn wedged(listener: TcpListener) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    accepted
}

/// A wedged peer on loopback: its port and its connection count.
fn wedged_on_loopback() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (port, wedged(listener))
}

/// Waits until the wedged peer has a connection (the service waits on it), then a little.
fn wait_wedged(accepted: &AtomicUsize, h: &Harness, what: &str) {
    let start = Instant::now();
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: the service never reached its peer\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// A UDP server on `addr` (in the caller's namespace) that takes every query and answers
/// none; counts the queries.
fn silent_udp(addr: &str) -> Arc<AtomicUsize> {
    let socket = std::net::UdpSocket::bind(addr).unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let seen = queries.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while socket.recv_from(&mut buf).is_ok() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    queries
}

/// SIGTERM to the supervisor; how long `name`'s process took to exit. Asserts the supervisor
/// exits with success, killed nothing, and saw the service exit with status 0.
fn stop_measuring(h: &mut Harness, name: &str) -> Duration {
    let status = h.status().expect("the supervisor answers");
    let pid = pid_of(&status, name).expect("the service runs");
    let sent = Instant::now();
    h.signal(Signal::SIGTERM);
    while alive(pid) {
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "{name} did not exit\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = sent.elapsed();
    let exit = h
        .wait_exit(Duration::from_secs(15))
        .expect("the supervisor did not exit");
    assert!(exit.success(), "supervisor exit: {exit:?}");
    // Its last lines are still on their way through the pipe.
    let start = Instant::now();
    while !h.log_text().contains("supervisor stopped") && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = h.log_text();
    assert!(!log.contains("did not stop in time"), "{log}");
    assert!(!log.contains("killing it"), "{log}");
    let stopped = log
        .lines()
        .find(|l| l.contains("service stopped") && l.contains(&format!("service={name} ")))
        .unwrap_or_else(|| panic!("the supervisor did not report {name} stopped\n{log}"));
    assert!(stopped.contains("exited with status 0"), "{stopped}");
    println!("{name}: stopped {took:?} after SIGTERM, its peer wedged");
    took
}

fn count(db: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The DICOM service stops while forwarding an instance (sent by storescu) to a PACS that
/// accepts TCP but never answers A-ASSOCIATE; the instance stays queued.
#[test]
fn dicom_stops_within_2_s_while_the_pacs_never_answers_a_associate() {
    let (pacs, accepted) = wedged_on_loopback();
    let listen = free_port();
    let mut h = Harness::new(&format!(
        "{}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\n\n[dicom]\nlisten = \"127.0.0.1:{listen}\"\ntimeout = \"30s\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"127.0.0.1:{pacs}\"\n",
        supervisor()
    ));
    let form = h.dir.path().join("form.pdf");
    std::fs::write(&form, b"%PDF-1.4 consent").unwrap();
    register_consent(&h, &form, "0001234", &[]);
    mark_consent_synced(&h);
    h.start();
    h.wait_for("dicom and consent ready", Duration::from_secs(30), |s| {
        state_of(s, "dicom") == "ready" && state_of(s, "consent") == "ready"
    });
    let files = tempfile::tempdir().unwrap();
    let ct = hil_tests::dicom_files::japanese_ct(
        files.path(),
        &hil_tests::dicom_files::Ids::new("0001234"),
    )
    .expect("dcmtk (Debian package dcmtk) must be installed");
    let out = std::process::Command::new("storescu")
        .args([
            "-v",
            "-aec",
            "TSUNAGI-TEST",
            "127.0.0.1",
            &listen.to_string(),
        ])
        .arg(&ct)
        .output()
        .expect("storescu (Debian package dcmtk) must be installed");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Received Store Response (Success)"), "{text}");
    wait_wedged(&accepted, &h, "dicom");
    let took = stop_measuring(&mut h, "dicom");
    assert!(took < STOP_BOUND, "dicom took {took:?}\n{}", h.log_text());
    // Acknowledged to storescu, never delivered: still queued.
    let queue = h.state_dir().join("dicom").join("spool").join("queue.db");
    assert_eq!(
        count(&queue, "SELECT count(*) FROM queue WHERE state = 'pending'"),
        1
    );
}

/// The DICOM service stops while a viewer's C-FIND is being asked of a PACS that accepts
/// TCP but never answers A-ASSOCIATE (the query/retrieve proxy's own association).
#[test]
fn dicom_stops_within_2_s_while_a_viewers_query_waits_on_a_silent_pacs() {
    let (pacs, accepted) = wedged_on_loopback();
    let listen = free_port();
    let mut h = Harness::new(&format!(
        "{}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\n\n[dicom]\nlisten = \"127.0.0.1:{listen}\"\ntimeout = \"30s\"\npatient-ids = \"as-is\"\nquery-retrieve = true\n[[dicom.allowed-callers]]\nae-title = \"VIEWER\"\naddress = \"127.0.0.1\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"127.0.0.1:{pacs}\"\n",
        supervisor()
    ));
    let form = h.dir.path().join("form.pdf");
    std::fs::write(&form, b"%PDF-1.4 consent").unwrap();
    register_consent(&h, &form, "0001234", &[]);
    mark_consent_synced(&h);
    h.start();
    h.wait_for("dicom and consent ready", Duration::from_secs(30), |s| {
        state_of(s, "dicom") == "ready" && state_of(s, "consent") == "ready"
    });
    let mut findscu = std::process::Command::new("findscu")
        .args(["-S", "-aet", "VIEWER", "-aec", "TSUNAGI-TEST"])
        .args(["-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=0001234"])
        .args(["-k", "StudyInstanceUID"])
        .args(["127.0.0.1", &listen.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("findscu (Debian package dcmtk) must be installed");
    wait_wedged(&accepted, &h, "dicom query");
    let took = stop_measuring(&mut h, "dicom");
    let _ = findscu.kill();
    let _ = findscu.wait();
    assert!(took < STOP_BOUND, "dicom took {took:?}\n{}", h.log_text());
}

/// The consent service stops in the middle of a sync round (pushing a registration) with a
/// FHIR server that accepts TCP but never answers; the push stays in the outbox.
#[test]
fn consent_stops_within_2_s_in_a_sync_round_with_a_silent_fhir_server() {
    let (fhir, accepted) = wedged_on_loopback();
    let mut h = Harness::new(&format!(
        "{}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\nfhir-url = \"http://127.0.0.1:{fhir}/fhir\"\npull-interval = \"1s\"\n",
        supervisor()
    ));
    let form = h.dir.path().join("form.pdf");
    std::fs::write(&form, b"%PDF-1.4 consent").unwrap();
    register_consent(&h, &form, "0001234", &[]);
    let db = h.state_dir().join("consent").join("consent.db");
    let waiting = count(&db, "SELECT count(*) FROM outbox WHERE done_at IS NULL");
    assert!(waiting > 0, "the registration waits to be pushed");
    h.start();
    h.wait_for("consent ready", Duration::from_secs(30), |s| {
        state_of(s, "consent") == "ready"
    });
    wait_wedged(&accepted, &h, "consent");
    let took = stop_measuring(&mut h, "consent");
    assert!(took < STOP_BOUND, "consent took {took:?}\n{}", h.log_text());
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox WHERE done_at IS NULL"),
        waiting,
        "nothing was acknowledged: every push waits for the next round"
    );
}

/// The SS-MIX2 sync stops while its worker is in a TLS handshake with a WebDAV replica that
/// accepts TCP but never answers; the upload stays in the outbox.
#[test]
fn ssmix2_stops_within_2_s_in_a_tls_handshake_with_a_silent_replica() {
    let (replica, accepted) = wedged_on_loopback();
    let mut h = Harness::new("");
    let mut storage =
        ssmix2::build::Storage::create(&h.dir.path().join("ssmix2").join("1312345678")).unwrap();
    let patient = ssmix2::build::Patient::sample("0000000001");
    storage
        .put(
            &patient,
            &ssmix2::build::Record::new(
                "OMP-01",
                "20261120",
                "000000000000001",
                "20261120103000000",
            ),
        )
        .unwrap();
    // A real CA and client certificate: the replica is set up as in production.
    let tls = h.dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let pki = hil_tests::nginx::Pki::generate(&tls).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(pki.client_key(), std::fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        let id = tsunagi_runtime::privilege::ensure_user(ssmix2_sync::USER).unwrap();
        for file in [pki.ca_cert(), pki.client_cert(), pki.client_key()] {
            nix::unistd::chown(&file, Some(id.uid), Some(id.gid)).unwrap();
        }
    }
    h.write_config(&format!(
        "{}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\n\n[ssmix2]\nstorage = \"{}\"\nwatch = \"poll\"\nscan-interval = \"1s\"\nsettle = \"1s\"\nconfirm-deletion = \"1s\"\n\n[ssmix2.replica]\nurl = \"https://127.0.0.1:{replica}/ssmix2/\"\nca-file = \"{}\"\nclient-cert-file = \"{}\"\nclient-key-file = \"{}\"\n",
        supervisor(),
        storage.root().display(),
        pki.ca_cert().display(),
        pki.client_cert().display(),
        pki.client_key().display(),
    ));
    let form = h.dir.path().join("form.pdf");
    std::fs::write(&form, b"%PDF-1.4 consent").unwrap();
    register_consent(&h, &form, &patient.id, &[]);
    mark_consent_synced(&h);
    h.start();
    h.wait_for("ssmix2 and consent ready", Duration::from_secs(30), |s| {
        state_of(s, "ssmix2") == "ready" && state_of(s, "consent") == "ready"
    });
    wait_wedged(&accepted, &h, "ssmix2");
    let took = stop_measuring(&mut h, "ssmix2");
    assert!(took < STOP_BOUND, "ssmix2 took {took:?}\n{}", h.log_text());
    // The stop came in the middle of the upload: the service did not wait for it.
    assert!(
        h.log_text()
            .contains("a replica operation is still under way at the stop"),
        "{}",
        h.log_text()
    );
    let db = h.state_dir().join("ssmix2").join("sync.db");
    assert!(
        count(&db, "SELECT count(*) FROM outbox WHERE op = 'put'") >= 1,
        "the upload stays planned"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM published"), 0);
}

/// Runs `f` on a thread of this test that entered network namespace `ns` (what it binds
/// stays in that namespace); its result.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let handle = std::fs::File::open(&path).unwrap();
        nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tx.send(f()).unwrap();
    });
    rx.recv().unwrap()
}

/// A box whose tunnel probes `health-url` with `probe-timeout` 30 s, its key registered at
/// the hub; not started.
fn tunnel_box(net: &hil_tests::testnet::TestNet, health_url: &str) -> Harness {
    tunnel_box_with(net, health_url, "")
}

/// [`tunnel_box`] with more `[tunnel]` keys.
fn tunnel_box_with(net: &hil_tests::testnet::TestNet, health_url: &str, extra: &str) -> Harness {
    let h = Harness::new(&format!(
        r#"{}
[heartbeat]
enabled = false

[tunnel]
interface = "{}b"
backend = "userspace"
hub-endpoint = "{HUB_NAME}:51820"
hub-public-key = "{}"
address = "10.99.0.2/24"
hub-subnets = ["10.98.0.0/24"]
health-url = "{health_url}"
probe-interval = "1s"
probe-failures = 2
probe-timeout = "30s"
{extra}
"#,
        supervisor(),
        net.id(),
        net.hub_public_key(),
    ));
    let public = h.cli(&["vpn", "pubkey"]);
    net.hub_add_peer(&public, &["10.99.0.2/32"]).unwrap();
    h
}

/// Root only (network namespaces, wireguard-go): the tunnel stops while its health probe
/// waits on a hub address that accepts TCP but never answers.
#[test]
fn tunnel_stops_within_2_s_while_the_health_probe_gets_no_answer() {
    if skip_unless_root("tunnel_stops_within_2_s_while_the_health_probe_gets_no_answer") {
        return;
    }
    use hil_tests::testnet::{Host, Options, TestNet};
    let net = TestNet::up(Options::default()).expect("test network");
    // The wedged health endpoint, in the hub's namespace.
    let accepted = in_netns(net.ns(Host::Hub), || {
        wedged(TcpListener::bind("0.0.0.0:8081").unwrap())
    });
    let box_ns = net.ns(Host::Box).to_owned();
    let _etc = NetnsEtc::new(&box_ns, Some("10.250.0.1"), None);
    let mut h = tunnel_box(&net, "http://10.98.0.1:8081/health");
    h.start_in_netns(&box_ns);
    h.wait_for("tunnel ready", Duration::from_secs(30), |s| {
        state_of(s, "tunnel") == "ready"
    });
    wait_wedged(&accepted, &h, "tunnel");
    let took = stop_measuring(&mut h, "tunnel");
    assert!(took < STOP_BOUND, "tunnel took {took:?}\n{}", h.log_text());
}

/// Root only: the tunnel stops while its clock check waits on a time server that takes the
/// SNTP query and never answers (the check's deadline is the probe's, 30 s here).
#[test]
fn tunnel_stops_within_2_s_while_the_time_server_never_answers() {
    if skip_unless_root("tunnel_stops_within_2_s_while_the_time_server_never_answers") {
        return;
    }
    use hil_tests::testnet::{Host, Options, TestNet};
    let net = TestNet::up(Options::default()).expect("test network");
    let queries = in_netns(net.ns(Host::Hub), || silent_udp("10.98.0.1:123"));
    let box_ns = net.ns(Host::Box).to_owned();
    let _etc = NetnsEtc::new(&box_ns, Some("10.250.0.1"), None);
    let mut h = tunnel_box_with(
        &net,
        "http://10.98.0.1:8080/health",
        "time-server = \"10.98.0.1:123\"\ntime-check-interval = \"1s\"",
    );
    h.start_in_netns(&box_ns);
    h.wait_for("tunnel ready", Duration::from_secs(30), |s| {
        state_of(s, "tunnel") == "ready"
    });
    wait_wedged(&queries, &h, "tunnel asking the time server");
    let took = stop_measuring(&mut h, "tunnel");
    assert!(took < STOP_BOUND, "tunnel took {took:?}\n{}", h.log_text());
}

/// Root only: the tunnel stops while it resolves the hub's name with a DNS server that never
/// answers (getaddrinfo cannot be cancelled: it must not hold the stop).
#[test]
fn tunnel_stops_within_2_s_while_the_dns_server_never_answers() {
    if skip_unless_root("tunnel_stops_within_2_s_while_the_dns_server_never_answers") {
        return;
    }
    use hil_tests::testnet::{Host, Options, TestNet};
    let net = TestNet::up(Options::default()).expect("test network");
    let box_ns = net.ns(Host::Box).to_owned();
    // The box's DNS server: takes every query, answers none.
    let queries = in_netns(&box_ns, || silent_udp("127.0.0.1:53"));
    let _etc = NetnsEtc::new(
        &box_ns,
        None,
        Some("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n"),
    );
    let mut h = tunnel_box(&net, "http://10.98.0.1:8080/health");
    h.start_in_netns(&box_ns);
    h.wait_for("the tunnel service", Duration::from_secs(30), |s| {
        pid_of(s, "tunnel").is_some()
    });
    wait_wedged(&queries, &h, "tunnel resolving the hub");
    let took = stop_measuring(&mut h, "tunnel");
    assert!(took < STOP_BOUND, "tunnel took {took:?}\n{}", h.log_text());
}

/// The hub's name in the box namespace.
const HUB_NAME: &str = "hub.tsunagi.test";

/// The box namespace's hosts file (naming the hub at `hub`, if given) and resolv.conf (if
/// given): `ip netns exec` bind-mounts /etc/netns/NS/* over /etc/*. Removed on drop.
struct NetnsEtc(std::path::PathBuf);

impl NetnsEtc {
    fn new(ns: &str, hub: Option<&str>, resolv: Option<&str>) -> NetnsEtc {
        let dir = std::path::PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        let mut hosts = "127.0.0.1 localhost\n".to_owned();
        if let Some(hub) = hub {
            hosts.push_str(&format!("{hub} {HUB_NAME}\n"));
        }
        std::fs::write(dir.join("hosts"), hosts).unwrap();
        if let Some(resolv) = resolv {
            std::fs::write(dir.join("resolv.conf"), resolv).unwrap();
        }
        NetnsEtc(dir)
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
