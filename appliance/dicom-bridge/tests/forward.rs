//! The forwarder against dcmtk's storescp as the network side: storescu → the box's SCP →
//! spool → C-STORE → storescp, the data set arriving byte for byte; a PACS that is down
//! leaves everything queued; a refusal marks the instance failed.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_bridge::forward::{Destination, record, send_batch, send_on};
use dicom_bridge::scp::{Settings, serve};
use dicom_bridge::spool::Spool;
use hil_tests::dicom_files::{DicomFile, Ids, japanese_ct};
use tokio_util::sync::CancellationToken;

/// A Japanese-named CT instance (`\\ISO 2022 IR 87`) with this SOP Instance UID and patient.
fn generate(dir: &Path, uid: &str, patient: &str) -> PathBuf {
    let mut ids = Ids::new(patient);
    ids.sop_instance_uid = uid.to_owned();
    japanese_ct(dir, &ids).expect("dcmtk (Debian package dcmtk) must be installed")
}

/// The data set of a Part 10 file: what follows the file meta group.
fn data_set(file: &[u8]) -> Vec<u8> {
    DicomFile::parse(file.to_vec()).unwrap().data_set().to_vec()
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct StoreScp {
    child: Child,
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn storescp(port: u16, out: &Path) -> StoreScp {
    storescp_logging(port, out, None)
}

/// storescp, its verbose log into `log` if given.
fn storescp_logging(port: u16, out: &Path, log: Option<&Path>) -> StoreScp {
    std::fs::create_dir_all(out).unwrap();
    // dcmtk logs to stderr.
    let stderr = match log {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap(),
        ),
        None => Stdio::null(),
    };
    let child = Command::new("storescp")
        .args(["-v", "-aet", "PACS", "-od"])
        .arg(out)
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("storescp (Debian package dcmtk) must be installed");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "storescp did not start"
        );
        #[expect(
            clippy::disallowed_methods,
            reason = "waits for a child process before the runtime uses it"
        )]
        std::thread::sleep(Duration::from_millis(50));
    }
    StoreScp { child }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_reach_the_pacs_byte_for_byte_and_wait_while_it_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let settings = Arc::new(Settings {
        ae_title: "TSUNAGI".into(),
        max_pdu: 16384,
        timeout: Duration::from_secs(10),
        max_associations: 4,
        allowed: None,
        proxy: None,
        extra_sop_classes: Vec::new(),
    });
    tokio::spawn(serve(listener, settings, spool.clone(), stop.clone()));
    let files: Vec<PathBuf> = (1..=3)
        .map(|i| {
            generate(
                dir.path(),
                &format!("1.2.826.0.1.3680043.9.7777.2.{i}"),
                "0001234",
            )
        })
        .collect();
    let mut storescu = Command::new("storescu");
    storescu
        .args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()])
        .args(&files)
        .env("TCP_NODELAY", "1");
    let out = tokio::task::spawn_blocking(move || storescu.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(spool.counts().unwrap().pending, 3);

    // The PACS is down: nothing is lost, the batch is retried later.
    let pacs_port = free_port();
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{pacs_port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(5),
    };
    let batch = spool.ready(i64::MAX, 10).unwrap();
    let (outcomes, error) = send_batch(
        &dest,
        &batch.iter().cloned().map(Into::into).collect::<Vec<_>>(),
    )
    .await;
    assert!(outcomes.is_empty() && error.is_some());
    assert_eq!(spool.counts().unwrap().pending, 3);

    // Up: each arrives once, the data set byte for byte.
    let received = dir.path().join("received");
    let _pacs = storescp(pacs_port, &received);
    let (outcomes, error) = send_batch(
        &dest,
        &batch.iter().cloned().map(Into::into).collect::<Vec<_>>(),
    )
    .await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(record(&spool, &outcomes).unwrap(), 3);
    assert_eq!(spool.counts().unwrap().pending, 0);
    let mut got: Vec<PathBuf> = std::fs::read_dir(&received)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    got.sort();
    assert_eq!(got.len(), 3);
    for f in &files {
        let sent = std::fs::read(f).unwrap();
        let uid = f.file_stem().unwrap().to_str().unwrap();
        let arrived = got
            .iter()
            .find(|g| g.file_name().unwrap().to_str().unwrap().contains(uid))
            .unwrap_or_else(|| panic!("{uid} not received: {got:?}"));
        assert_eq!(
            data_set(&std::fs::read(arrived).unwrap()),
            data_set(&sent),
            "{uid}"
        );
    }
    stop.cancel();
}

/// Association reuse: a second batch goes on the association the first one opened; a kept
/// association the PACS dropped meanwhile is replaced, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_association_is_reused_and_replaced_when_the_pacs_dropped_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    for i in 1..=4 {
        let file = generate(
            dir.path(),
            &format!("1.2.826.0.1.3680043.9.7777.3.{i}"),
            "0001234",
        );
        let bytes = data_set(&std::fs::read(file).unwrap());
        let mut inc = spool.begin().unwrap();
        inc.write(&bytes).unwrap();
        inc.commit(
            &dicom_bridge::spool::Meta {
                sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance: format!("1.2.826.0.1.3680043.9.7777.3.{i}"),
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                calling_ae: "CT".into(),
                patient_id: Some("0001234".into()),
            },
            1,
        )
        .unwrap();
    }
    let queued: Vec<dicom_bridge::forward::Outgoing> = spool
        .ready(i64::MAX, 10)
        .unwrap()
        .into_iter()
        .map(Into::into)
        .collect();
    let port = free_port();
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(5),
    };
    let received = dir.path().join("received");
    let log = dir.path().join("storescp.log");
    let pacs = storescp_logging(port, &received, Some(&log));
    let (o1, e1, link, opened1) = send_on(&dest, &queued[..1], None).await;
    assert!(e1.is_none() && o1.len() == 1 && opened1 == 1, "{e1:?}");
    let (o2, e2, link, opened2) = send_on(&dest, &queued[1..3], link).await;
    assert!(e2.is_none() && o2.len() == 2, "{e2:?}");
    assert_eq!(opened2, 0, "the second batch reuses the association");
    let associations = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("Association Acknowledged")
            .count()
    };
    assert_eq!(associations(), 1);
    // The PACS goes away and comes back: the kept association is dead.
    drop(pacs);
    let _pacs = storescp_logging(port, &received, Some(&log));
    let (o3, e3, link, opened3) = send_on(&dest, &queued[3..], link).await;
    assert!(e3.is_none(), "{e3:?}");
    assert_eq!(o3.len(), 1);
    assert_eq!(opened3, 1, "replaced once");
    link.unwrap().close().await;
    assert_eq!(std::fs::read_dir(&received).unwrap().count(), 4);
}
