//! The WebDAV replica against a real nginx (`hil_tests::nginx`): every operation is checked
//! on nginx's own disk. Needs the Debian packages `nginx` and `openssl` (`cargo xtask test`
//! installs them); without them these tests fail, they never skip.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use hil_tests::nginx::{Nginx, Options, Pki};
use rustls::pki_types::pem::PemObject as _;
use ssmix2_sync::replica::{RelPath, Replica, ReplicaError};
use ssmix2_sync::webdav::{BaseUrl, WebDavReplica, WebDavSettings};
use tsunagi_runtime::http::ClientSettings;

fn settings(nginx: &Nginx) -> WebDavSettings {
    WebDavSettings {
        base_url: BaseUrl::new(&nginx.base_url()).unwrap(),
        ca_file: nginx.ca_file(),
        client_cert_file: nginx.client_cert_file(),
        client_key_file: nginx.client_key_file(),
        timeout: Duration::from_secs(10),
    }
}

fn replica(nginx: &Nginx) -> WebDavReplica {
    WebDavReplica::new(&settings(nginx)).unwrap()
}

fn rel(path: &str) -> RelPath {
    RelPath::new(path).unwrap()
}

/// Every file under `dir`, as `/`-separated relative paths, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_str().unwrap().to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn put_rename_delete_stat_on_nginx_disk() {
    let nginx = Nginx::start_for_test();
    let mut r = replica(&nginx);
    let root = nginx.data_root();
    let a = rel(
        "000/012/0000123456/-/ADT-00/0000123456_-_ADT-00_000000000000001_20261120101500000_01_1",
    );
    let b = rel(
        "000/012/0000123456/-/ADT-00/0000123456_-_ADT-00_000000000000001_20261120101500000_01_2",
    );

    assert_eq!(r.stat(&a).unwrap(), None);
    r.put(&a, b"MSH|first").unwrap();
    assert_eq!(fs::read(root.join(a.as_str())).unwrap(), b"MSH|first");
    assert_eq!(r.stat(&a).unwrap(), Some(9));

    // Put twice replaces.
    r.put(&a, b"MSH|second version").unwrap();
    assert_eq!(
        fs::read(root.join(a.as_str())).unwrap(),
        b"MSH|second version"
    );
    assert_eq!(r.stat(&a).unwrap(), Some(18));

    // Rename, then the same rename again: the source is gone.
    assert!(r.rename(&a, &b).unwrap());
    assert!(!root.join(a.as_str()).exists());
    assert_eq!(
        fs::read(root.join(b.as_str())).unwrap(),
        b"MSH|second version"
    );
    assert!(!r.rename(&a, &b).unwrap(), "already renamed");
    assert_eq!(r.stat(&a).unwrap(), None);

    // Rename replaces an existing target.
    r.put(&a, b"newer").unwrap();
    assert!(r.rename(&a, &b).unwrap());
    assert_eq!(fs::read(root.join(b.as_str())).unwrap(), b"newer");

    // Delete, and delete again.
    r.delete(&b).unwrap();
    assert!(!root.join(b.as_str()).exists());
    r.delete(&b).unwrap();
    assert_eq!(r.stat(&b).unwrap(), None);

    assert_eq!(
        files(root),
        Vec::<String>::new(),
        "no temporary left behind"
    );
}

#[test]
fn japanese_and_caret_paths_round_trip() {
    let nginx = Nginx::start_for_test();
    let mut r = replica(&nginx);
    let root = nginx.data_root();
    let name = "000/012/0000123456/20261120/^経過記録^^11506-3^経過記録^LN/\
                0000123456_20261120_^経過記録^^11506-3^経過記録^LN_000000000000002_20261120101500000_01_1";
    let p = rel(name);
    let body = "経過記録 テスト\r".as_bytes();
    r.put(&p, body).unwrap();
    assert_eq!(fs::read(root.join(name)).unwrap(), body);
    assert_eq!(
        r.stat(&p).unwrap(),
        Some(u64::try_from(body.len()).unwrap())
    );
    assert_eq!(files(root), vec![name.to_owned()], "only the final name");

    // Rename into a folder that does not exist yet: nginx's MOVE makes it
    // (create_full_put_path), no MKCOL needed.
    let q = rel("999/999/9999999999/-/ADT-00/名前 with space & %25 + ;=,@'!()*");
    assert!(r.rename(&p, &q).unwrap());
    assert_eq!(fs::read(root.join(q.as_str())).unwrap(), body);
    assert_eq!(files(root), vec![q.as_str().to_owned()]);
    r.delete(&q).unwrap();
    assert_eq!(files(root), Vec::<String>::new());
    assert!(
        !nginx.access_log().contains("MKCOL"),
        "{}",
        nginx.access_log()
    );
}

#[test]
fn folders_are_made_with_mkcol_when_the_server_does_not() {
    let nginx = Nginx::start_for_test_with(&Options {
        create_full_put_path: false,
        ..Options::default()
    });
    let mut r = replica(&nginx);
    let root = nginx.data_root();
    let a = rel("000/012/0000123456/-/ADT-00/a_1");
    r.put(&a, b"one").unwrap();
    assert_eq!(fs::read(root.join(a.as_str())).unwrap(), b"one");
    // A second file in the same folder needs no MKCOL; another folder below the patient
    // needs only the missing ones (the others answer 405).
    r.put(&rel("000/012/0000123456/-/ADT-00/a_2"), b"two")
        .unwrap();
    let c = rel("000/012/0000123456/20261120/OMP-01/c_1");
    r.put(&c, b"three").unwrap();
    // nginx's MOVE makes the destination's folders even without create_full_put_path.
    let b = rel("000/012/0000123456/-/OMP-01/b_1");
    assert!(r.rename(&a, &b).unwrap());
    assert_eq!(fs::read(root.join(b.as_str())).unwrap(), b"one");
    assert_eq!(
        files(root),
        vec![
            "000/012/0000123456/-/ADT-00/a_2".to_owned(),
            "000/012/0000123456/-/OMP-01/b_1".to_owned(),
            "000/012/0000123456/20261120/OMP-01/c_1".to_owned(),
        ]
    );
    let log = nginx.access_log();
    // `"MKCOL /ssmix2/FOLDER/ HTTP/1.1" STATUS ...` → `FOLDER/ STATUS`
    let mkcols: Vec<String> = log
        .lines()
        .filter_map(|line| line.split_once("\"MKCOL /ssmix2/"))
        .map(|(_, rest)| {
            let words: Vec<&str> = rest.split(' ').collect();
            format!("{} {}", words[0], words[2])
        })
        .collect();
    assert_eq!(
        mkcols,
        [
            "000/ 201",
            "000/012/ 201",
            "000/012/0000123456/ 201",
            "000/012/0000123456/-/ 201",
            "000/012/0000123456/-/ADT-00/ 201",
            "000/ 405",
            "000/012/ 405",
            "000/012/0000123456/ 405",
            "000/012/0000123456/20261120/ 201",
            "000/012/0000123456/20261120/OMP-01/ 201",
        ],
        "{log}"
    );
}

#[test]
fn top_level_files_and_missing_ones() {
    let nginx = Nginx::start_for_test();
    let mut r = replica(&nginx);
    let root = nginx.data_root();
    let top = rel("ssmix2-top");
    r.put(&top, b"").unwrap();
    assert_eq!(r.stat(&top).unwrap(), Some(0));
    assert_eq!(files(root), vec!["ssmix2-top".to_owned()]);
    assert!(!r.rename(&rel("no/such/file"), &rel("x/y")).unwrap());
    r.delete(&rel("no/such/file")).unwrap();
    assert_eq!(r.stat(&rel("no/such/file")).unwrap(), None);
    assert_eq!(files(root), vec!["ssmix2-top".to_owned()]);
}

#[test]
fn a_large_file_is_written_whole() {
    let nginx = Nginx::start_for_test();
    let mut r = replica(&nginx);
    let p = rel("000/001/0000000001/-/OMP-01/big");
    let body: Vec<u8> = (0..3_000_000u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    r.put(&p, &body).unwrap();
    assert_eq!(fs::read(nginx.data_root().join(p.as_str())).unwrap(), body);
    assert_eq!(r.stat(&p).unwrap(), Some(3_000_000));
}

#[test]
fn a_failed_put_leaves_no_final_name() {
    let nginx = Nginx::start_for_test();
    let mut r = replica(&nginx);
    let root = nginx.data_root();
    // A file where the file's folder should be: the PUT of the temporary fails (nginx
    // cannot create `blocker/...` under a file), so the final name never appears.
    fs::write(root.join("blocker"), b"a file").unwrap();
    let p = rel("blocker/a_1");
    let err = r.put(&p, b"data").unwrap_err();
    assert!(
        matches!(err, ReplicaError::Status { method: "PUT", .. }),
        "{err:?}"
    );
    assert_eq!(files(root), vec!["blocker".to_owned()]);
}

#[test]
fn a_client_without_a_certificate_is_refused_by_nginx() {
    let nginx = Nginx::start_for_test();
    // The appliance's HTTP client, trusting the server but presenting no certificate.
    let ca = fs::read(nginx.ca_file()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = tsunagi_runtime::http::blocking_client_builder(ClientSettings {
        roots,
        identity: None,
        connect_timeout: Duration::from_secs(10),
        timeout: Some(Duration::from_secs(10)),
        keep_idle: None,
    })
    .unwrap()
    .build()
    .unwrap();
    let url = format!("{}a/b", nginx.base_url());
    let response = client.put(&url).body(&b"data"[..]).send().unwrap();
    // nginx completes the handshake and answers 400 "No required SSL certificate was sent".
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(files(nginx.data_root()), Vec::<String>::new());
    assert!(
        nginx
            .error_log()
            .contains("client sent no required SSL certificate"),
        "{}",
        nginx.error_log()
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_by_nginx() {
    let nginx = Nginx::start_for_test();
    let other = tempfile::tempdir().unwrap();
    let other = Pki::generate(other.path()).unwrap();
    let mut r = WebDavReplica::new(&WebDavSettings {
        client_cert_file: other.client_cert(),
        client_key_file: other.client_key(),
        ..settings(&nginx)
    })
    .unwrap();
    let err = r.put(&rel("a/b"), b"data").unwrap_err();
    assert!(
        matches!(
            err,
            ReplicaError::Status {
                method: "PUT",
                status: 400,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(files(nginx.data_root()), Vec::<String>::new());
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_by_our_client() {
    let nginx = Nginx::start_for_test();
    let other = tempfile::tempdir().unwrap();
    let other = Pki::generate(other.path()).unwrap();
    let mut r = WebDavReplica::new(&WebDavSettings {
        ca_file: other.ca_cert(),
        ..settings(&nginx)
    })
    .unwrap();
    for result in [
        r.put(&rel("a/b"), b"data").map(|()| None),
        r.stat(&rel("a/b")),
    ] {
        let err = result.unwrap_err();
        assert_eq!(
            err.to_string(),
            "TLS with the replica server failed: the server's certificate is not from the network CA (refused)",
            "{err:?}"
        );
    }
    assert_eq!(files(nginx.data_root()), Vec::<String>::new());
}

/// Issue 17: an expired server certificate, or one for another address, is refused with
/// the reason, and nothing is written.
#[test]
fn an_expired_or_misnamed_server_certificate_is_refused_with_the_reason() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path()).unwrap();
    let expired = pki
        .issue_server("expired", &[std::net::Ipv4Addr::LOCALHOST], true)
        .unwrap();
    let misnamed = pki
        .issue_server("misnamed", &[std::net::Ipv4Addr::new(127, 0, 0, 9)], false)
        .unwrap();
    for (cert, reason) in [
        (expired, "the server's certificate has expired (refused)"),
        (
            misnamed,
            "the server's certificate is not for the address connected to (refused)",
        ),
    ] {
        let nginx = Nginx::start_for_test_with(&Options {
            pki: Some(pki.clone()),
            server_cert: Some(cert),
            ..Options::default()
        });
        let err = replica(&nginx).put(&rel("a/b"), b"data").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("TLS with the replica server failed: {reason}")
        );
        assert_eq!(files(nginx.data_root()), Vec::<String>::new());
    }
}

#[test]
fn bad_tls_files_are_refused_at_construction() {
    let nginx = Nginx::start_for_test();
    let other = tempfile::tempdir().unwrap();
    let other = Pki::generate(other.path()).unwrap();
    // The key of another certificate.
    let err = WebDavReplica::new(&WebDavSettings {
        client_key_file: other.client_key(),
        ..settings(&nginx)
    })
    .unwrap_err();
    assert!(matches!(err, ReplicaError::Tls(_)), "{err:?}");
    // A key where the certificate belongs.
    let err = WebDavReplica::new(&WebDavSettings {
        client_cert_file: nginx.client_key_file(),
        ..settings(&nginx)
    })
    .unwrap_err();
    assert!(matches!(err, ReplicaError::Tls(_)), "{err:?}");
}

#[test]
fn stop_ends_nginx_and_removes_its_directory() {
    let nginx = Nginx::start_for_test();
    let mut r = replica(&nginx);
    r.put(&rel("a/b"), b"data").unwrap();
    let pid = nginx.pid().unwrap();
    let dir = nginx.dir().to_owned();
    nginx.stop().unwrap();
    assert!(!dir.exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let err = r.stat(&rel("a/b")).unwrap_err();
    assert!(matches!(err, ReplicaError::Connect(_)), "{err:?}");
}

/// A file nginx refuses (larger than its `client_max_body_size`: `413`) waits alone: the sync
/// publishes every other file, the cycle counts the refusal, the file stays queued, and it
/// is published once nginx takes it. Counted on nginx's own disk.
#[test]
fn a_file_nginx_refuses_waits_alone_and_the_others_arrive() {
    use ssmix2::build::{Patient, Record, Storage};
    use ssmix2::datatype::DUMMY_ORDER_NO;
    use ssmix2::name::Flag;
    use ssmix2_sync::sync::Syncer;

    let dir = tempfile::tempdir().unwrap();
    let mut storage = Storage::create(&dir.path().join("storage")).unwrap();
    let (a, b) = (Patient::sample("0000000001"), Patient::sample("0000000002"));
    let omp = Record::new("OMP-01", "20261120", "000000000000001", "20261120103000000");
    for p in [&a, &b] {
        storage
            .put(
                p,
                &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120093000000"),
            )
            .unwrap();
        storage.put(p, &omp).unwrap();
    }
    // a's prescription, with a long comment: 64 KiB.
    let mut big = storage.bytes(&a, &omp);
    if big.last() != Some(&b'\r') {
        big.push(b'\r');
    }
    big.extend_from_slice(b"NTE|1||");
    big.extend(std::iter::repeat_n(b'x', 64 << 10));
    big.push(b'\r');
    let big_path = storage.put_bytes(&a, &omp, Flag::Current, &big).unwrap();
    let big_rel = big_path
        .strip_prefix(storage.root())
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let state = dir.path().join("state");
    fs::create_dir_all(&state).unwrap();
    let mut syncer = Syncer::open(&state, common::sync_settings(storage.root())).unwrap();
    let mut gate = common::ScriptedGate::new(&[&a.id, &b.id]);
    let everything = common::expected(storage.root(), &gate.permitted);
    assert_eq!(everything.len(), 4, "{everything:#?}");

    let nginx = Nginx::start_for_test_with(&Options {
        max_body_bytes: Some(32 << 10),
        ..Options::default()
    });
    let report = syncer.cycle(&mut gate, &mut replica(&nginx)).unwrap();
    assert_eq!(report.refused, 1, "{report:?}");
    assert_eq!(
        report.last_refusal.as_deref(),
        Some("the replica refused an operation: the replica server answered 413 to PUT")
    );
    let mut but_the_big_one: Vec<String> = everything.keys().cloned().collect();
    but_the_big_one.retain(|p| *p != big_rel);
    assert_eq!(files(nginx.data_root()), but_the_big_one);
    assert_eq!(syncer.state().unwrap().outbox_depth, 1);
    // Again: refused again, planned once.
    let report = syncer.cycle(&mut gate, &mut replica(&nginx)).unwrap();
    assert_eq!((report.refused, report.published), (1, 0), "{report:?}");
    assert_eq!(syncer.state().unwrap().outbox_depth, 1);
    drop(nginx);

    // A hub that takes larger files (a new nginx: the sync records the other files as
    // published, so only the refused one goes).
    let nginx = Nginx::start_for_test();
    let report = syncer.cycle(&mut gate, &mut replica(&nginx)).unwrap();
    assert_eq!((report.refused, report.published), (0, 1), "{report:?}");
    assert_eq!(files(nginx.data_root()), vec![big_rel]);
    assert_eq!(syncer.state().unwrap().outbox_depth, 0);
}
