//! The forwarder against dcmtk's storescp as the network side: storescu → the box's SCP →
//! spool → C-STORE → storescp, the data set arriving byte for byte; a PACS that is down
//! leaves everything queued; a refusal marks the instance failed.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_bridge::forward::{Destination, Outcome, Outgoing, record, send_batch, send_on};
use dicom_bridge::inflight::{Stop, Watch};
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

/// storescp with `--fork`: a process per association (many at once).
fn storescp_fork(port: u16, out: &Path, log: &Path) -> StoreScp {
    storescp_with(port, out, Some(log), &["--fork"])
}

/// storescp, its verbose log into `log` if given.
fn storescp_logging(port: u16, out: &Path, log: Option<&Path>) -> StoreScp {
    storescp_with(port, out, log, &[])
}

/// storescp with more options.
fn storescp_with(port: u16, out: &Path, log: Option<&Path>, options: &[&str]) -> StoreScp {
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
        .args(["-v", "-aet", "PACS"])
        .args(options)
        .arg("-od")
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
        header_limit: 1 << 20,
        commitment_from: Vec::new(),
        refused_reports: Default::default(),
        active: Default::default(),
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
    spool.caught_up().unwrap();
    assert_eq!(spool.counts().unwrap().pending, 3);

    // The PACS is down: nothing is lost, the batch is retried later.
    let pacs_port = free_port();
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{pacs_port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(5),
        storage_commitment: false,
        tls: None,
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
    assert_eq!(
        record(&spool, &outcomes, dicom_bridge::now(), None).unwrap(),
        3
    );
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
                study_uid: None,
            },
            1,
        )
        .unwrap();
    }
    let queued: Vec<Outgoing> = spool
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
        storage_commitment: false,
        tls: None,
    };
    let received = dir.path().join("received");
    let log = dir.path().join("storescp.log");
    let pacs = storescp_logging(port, &received, Some(&log));
    let (o1, e1, link, opened1) = send_on(&dest, &queued[..1], None, &Stop::never()).await;
    assert!(e1.is_none() && o1.len() == 1 && opened1 == 1, "{e1:?}");
    let (o2, e2, link, opened2) = send_on(&dest, &queued[1..3], link, &Stop::never()).await;
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
    let (o3, e3, link, opened3) = send_on(&dest, &queued[3..], link, &Stop::never()).await;
    assert!(e3.is_none(), "{e3:?}");
    assert_eq!(o3.len(), 1);
    assert_eq!(opened3, 1, "replaced once");
    link.unwrap().close().await;
    assert_eq!(std::fs::read_dir(&received).unwrap().count(), 4);
}

/// Spools a CT data set of `patient` (padded with `padding` bytes of trailing padding, to
/// make it long to send); its queue row.
fn spool_ct(spool: &Spool, dir: &Path, uid: &str, patient: &str, padding: u32) -> Outgoing {
    let file = generate(dir, uid, patient);
    let mut bytes = data_set(&std::fs::read(file).unwrap());
    if padding > 0 {
        // (FFFC,FFFC) Data Set Trailing Padding, OB, explicit VR little endian.
        bytes.extend_from_slice(&[0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0]);
        bytes.extend_from_slice(&padding.to_le_bytes());
        bytes.resize(bytes.len() + padding as usize, 0);
    }
    let mut inc = spool.begin().unwrap();
    inc.write(&bytes).unwrap();
    inc.commit(
        &dicom_bridge::spool::Meta {
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance: uid.to_owned(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            calling_ae: "CT".into(),
            patient_id: Some(patient.into()),
            study_uid: None,
        },
        1,
    )
    .unwrap();
    let queued = spool.ready(i64::MAX, 1000).unwrap();
    queued
        .into_iter()
        .find(|q| q.meta.sop_instance == uid)
        .unwrap()
        .into()
}

/// The files storescp wrote.
fn received(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// A watch whose confirmations a task keeps fresh (as the watcher of the service does)
/// until the returned token is cancelled.
fn watched() -> (Arc<Watch>, Stop, CancellationToken) {
    let (watch, stop) = dicom_bridge::inflight::channel(dicom_bridge::inflight::MAX_AGE);
    let watch = Arc::new(watch);
    let done = CancellationToken::new();
    tokio::spawn({
        let watch = watch.clone();
        let done = done.clone();
        async move {
            while !done.is_cancelled() {
                watch.confirm(Vec::new(), Instant::now());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    (watch, stop, done)
}

/// Issue 13 item 6: a patient whose consent changed before the batch's instances of them
/// start is skipped; the other patient's instances go on the same association, which is
/// kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_changed_patient_are_skipped_and_the_others_still_go() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let batch: Vec<Outgoing> = [("1", "0001"), ("2", "0002"), ("3", "0001"), ("4", "0002")]
        .iter()
        .map(|(n, p)| {
            spool_ct(
                &spool,
                dir.path(),
                &format!("1.2.826.0.1.3680043.9.7777.4.{n}"),
                p,
                0,
            )
        })
        .collect();
    let port = free_port();
    let out = dir.path().join("received");
    let _pacs = storescp(port, &out);
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(5),
        storage_commitment: false,
        tls: None,
    };
    let (watch, stop, done) = watched();
    watch.confirm(vec!["0001".to_owned()], Instant::now());
    let (outcomes, error, link, _) = send_on(&dest, &batch, None, &stop).await;
    done.cancel();
    assert!(error.is_none(), "{error:?}");
    let kinds: Vec<bool> = outcomes
        .iter()
        .map(|(_, o)| *o == Outcome::Stopped)
        .collect();
    assert_eq!(kinds, vec![true, false, true, false], "{outcomes:?}");
    assert_eq!(
        record(&spool, &outcomes, dicom_bridge::now(), None).unwrap(),
        2
    );
    // The skipped ones are still queued, as they were, for the next round to decide.
    let left: Vec<i64> = spool
        .ready(i64::MAX, 10)
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert_eq!(left, vec![batch[0].queued.id, batch[2].queued.id]);
    link.expect("the association is kept").close().await;
    assert_eq!(received(&out), 2);
}

/// Relays a connection to `to`, the box's side slowed down to about 3 MB/s (the PACS far
/// away), so an instance takes long to send.
async fn slow_relay(listener: tokio::net::TcpListener, to: u16) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = sw.shutdown().await;
        });
    }
}

/// Issue 13 item 6: the patient's consent changes while their instance is being
/// transferred: the association is aborted within well under a second, the PACS never
/// stores that instance, and it and the rest of the batch stay queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_during_an_instances_transfer_aborts_the_association_and_the_pacs_discards_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let uid = |n: u32| format!("1.2.826.0.1.3680043.9.7777.5.{n}");
    let batch = vec![
        spool_ct(&spool, dir.path(), &uid(1), "0001", 0),
        // About 3 s to send through the relay.
        spool_ct(&spool, dir.path(), &uid(2), "0001", 8 << 20),
        spool_ct(&spool, dir.path(), &uid(3), "0002", 0),
        spool_ct(&spool, dir.path(), &uid(4), "0001", 0),
    ];
    let pacs_port = free_port();
    let out = dir.path().join("received");
    let _pacs = storescp(pacs_port, &out);
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    tokio::spawn(slow_relay(relay, pacs_port));
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{relay_port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(20),
        storage_commitment: false,
        tls: None,
    };
    let (watch, stop, done) = watched();
    let sending = tokio::spawn({
        let batch = batch.clone();
        async move { send_on(&dest, &batch, None, &stop).await }
    });
    // The first instance arrived: the big one is on its way. The withdrawal.
    let start = Instant::now();
    while received(&out) < 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "nothing arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let withdrawn = Instant::now();
    watch.confirm(vec!["0001".to_owned()], withdrawn);
    let (outcomes, error, link, _) = sending.await.unwrap();
    let reacted = withdrawn.elapsed();
    done.cancel();
    assert!(reacted < Duration::from_millis(500), "{reacted:?}");
    assert!(error.is_none(), "{error:?}");
    assert!(link.is_none(), "the association was aborted");
    assert_eq!(
        outcomes.iter().map(|(_, o)| o.clone()).collect::<Vec<_>>()[1..],
        [Outcome::Stopped],
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[0].1, Outcome::Delivered(_)),
        "{outcomes:?}"
    );
    assert_eq!(
        record(&spool, &outcomes, dicom_bridge::now(), None).unwrap(),
        1
    );
    // The PACS discarded the partial instance; the other three wait in the queue.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(received(&out), 1);
    assert_eq!(spool.ready(i64::MAX, 10).unwrap().len(), 3);
}

/// Accepts connections on loopback and holds them open, never sending a byte (a PACS that
/// accepts TCP but never answers A-ASSOCIATE-RQ); counts the connections accepted.
async fn silent_peer() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        }
    });
    (port, accepted)
}

/// Relays a connection to `to`, passing the PACS's first PDU (the A-ASSOCIATE-AC) and
/// swallowing everything after it: the C-STORE responses never arrive.
async fn withholding_relay(listener: tokio::net::TcpListener, to: u16) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
        });
        tokio::spawn(async move {
            let mut header = [0u8; 6];
            if sr.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
            let mut body = vec![0u8; len as usize];
            if sr.read_exact(&mut body).await.is_err() {
                return;
            }
            let _ = cw.write_all(&header).await;
            let _ = cw.write_all(&body).await;
            // Keep the box's side open, and read (and drop) what the PACS says.
            let _ = tokio::io::copy(&mut sr, &mut tokio::io::sink()).await;
            drop(cw);
        });
    }
}

/// Issue 14: a stop of the service ends a forward to a PACS that accepts TCP but never
/// answers A-ASSOCIATE promptly, not after the association timeout; the instance stays
/// queued and nothing is reported as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_a_forward_waiting_for_a_silent_pacs_to_associate() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let uid = "1.2.826.0.1.3680043.9.7777.14.1";
    let batch = vec![spool_ct(&spool, dir.path(), uid, "0001", 0)];
    let (port, accepted) = silent_peer().await;
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(30),
        storage_commitment: false,
        tls: None,
    };
    let shutdown = CancellationToken::new();
    let stop = Stop::never().with_shutdown(shutdown.clone());
    let sending = tokio::spawn({
        let batch = batch.clone();
        async move { send_on(&dest, &batch, None, &stop).await }
    });
    let start = Instant::now();
    while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "no connection");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The A-ASSOCIATE-RQ went; no answer comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sending.is_finished());
    let stopped = Instant::now();
    shutdown.cancel();
    let (outcomes, error, link, _) = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("the forward did not end at the stop")
        .unwrap();
    let took = stopped.elapsed();
    println!("forward waiting for A-ASSOCIATE-AC: ended {took:?} after the stop");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(outcomes.is_empty(), "{outcomes:?}");
    assert!(error.is_none(), "a stop is not a failure: {error:?}");
    assert!(link.is_none());
    assert_eq!(
        record(&spool, &outcomes, dicom_bridge::now(), None).unwrap(),
        0
    );
    let queued = spool.ready(i64::MAX, 10).unwrap();
    assert_eq!(queued.len(), 1, "the instance stays queued");
    assert_eq!(queued[0].meta.sop_instance, uid);
}

/// Issue 14: a stop while a C-STORE response is pending (the instance went, the PACS does not
/// answer) ends the forward at once; the instance stays queued, since whether it was stored
/// is unknown (sent again later; the PACS de-duplicates by SOP Instance UID).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_a_forward_waiting_for_a_c_store_response() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let uid = "1.2.826.0.1.3680043.9.7777.14.2";
    let batch = vec![spool_ct(&spool, dir.path(), uid, "0001", 0)];
    let pacs_port = free_port();
    let out = dir.path().join("received");
    let _pacs = storescp(pacs_port, &out);
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    tokio::spawn(withholding_relay(relay, pacs_port));
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{relay_port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(30),
        storage_commitment: false,
        tls: None,
    };
    let shutdown = CancellationToken::new();
    let stop = Stop::never().with_shutdown(shutdown.clone());
    let sending = tokio::spawn({
        let batch = batch.clone();
        async move { send_on(&dest, &batch, None, &stop).await }
    });
    let start = Instant::now();
    while received(&out) < 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "nothing arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sending.is_finished(), "the response should be pending");
    let stopped = Instant::now();
    shutdown.cancel();
    let (outcomes, error, link, _) = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("the forward did not end at the stop")
        .unwrap();
    let took = stopped.elapsed();
    println!("forward waiting for a C-STORE response: ended {took:?} after the stop");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(outcomes.is_empty(), "{outcomes:?}");
    assert!(error.is_none(), "a stop is not a failure: {error:?}");
    assert!(link.is_none(), "the association was reset");
    assert_eq!(
        record(&spool, &outcomes, dicom_bridge::now(), None).unwrap(),
        0
    );
    assert_eq!(spool.ready(i64::MAX, 10).unwrap().len(), 1);
}

/// Issue 14: a stop ends a forward whose TCP connect is pending (a PACS whose accept queue
/// is full drops the SYN; the connect would wait for the association timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_a_forward_waiting_for_its_connect() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let uid = "1.2.826.0.1.3680043.9.7777.14.3";
    let batch = vec![spool_ct(&spool, dir.path(), uid, "0001", 0)];
    // A listener that never accepts, its queue filled until a connect no longer completes.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let _listener = socket.listen(0).unwrap();
    let mut queued = Vec::new();
    loop {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(Ok(s)) => queued.push(s),
            Ok(Err(e)) => panic!("connect: {e}"),
            Err(_) => break,
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let dest = Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout: Duration::from_secs(30),
        storage_commitment: false,
        tls: None,
    };
    let shutdown = CancellationToken::new();
    let stop = Stop::never().with_shutdown(shutdown.clone());
    let sending = tokio::spawn({
        let batch = batch.clone();
        async move { send_on(&dest, &batch, None, &stop).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sending.is_finished(), "the connect should be pending");
    let stopped = Instant::now();
    shutdown.cancel();
    let (outcomes, error, link, _) = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("the forward did not end at the stop")
        .unwrap();
    let took = stopped.elapsed();
    println!("forward waiting for its connect: ended {took:?} after the stop");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(outcomes.is_empty(), "{outcomes:?}");
    assert!(error.is_none(), "a stop is not a failure: {error:?}");
    assert!(link.is_none());
    assert_eq!(spool.ready(i64::MAX, 10).unwrap().len(), 1);
}

/// `n` CT instances of patient 0001234 in `spool`, ready to send.
fn spool_many(spool: &Spool, dir: &Path, tag: u32, n: u32) -> Vec<Outgoing> {
    (1..=n)
        .map(|i| {
            spool_ct(
                spool,
                dir,
                &format!("1.2.826.0.1.3680043.9.7777.{tag}.{i}"),
                "0001234",
                0,
            )
        })
        .collect()
}

fn pacs_at(port: u16, timeout: Duration) -> Destination {
    Destination {
        ae_title: "PACS".into(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        calling_ae: "TSUNAGI".into(),
        timeout,
        storage_commitment: false,
        tls: None,
    }
}

/// Issue 15, a PACS that serves one association at a time (dcmtk storescp without
/// `--fork`): it answers the first A-ASSOCIATE-RQ and leaves the others waiting. Four
/// associations are asked for; the one served sends everything, the three waiting are given
/// up once it is done (not after the 30 s association timeout), and the round says so, so
/// the service sends over one from then on. The next round, on the kept association,
/// opens nothing and waits for nothing. Counted at storescp: every instance, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_that_serves_one_association_at_a_time_gets_everything_over_one() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let first = spool_many(&spool, dir.path(), 11, 20);
    let port = free_port();
    let out = dir.path().join("received");
    let log = dir.path().join("storescp.log");
    let _pacs = storescp_logging(port, &out, Some(&log));
    let dest = pacs_at(port, Duration::from_secs(30));
    let mut links = Vec::new();
    let started = Instant::now();
    let spread =
        dicom_bridge::forward::send_parallel(&dest, &first, 4, &mut links, &Stop::never(), None)
            .await;
    let took = started.elapsed();
    assert!(spread.error.is_none(), "{:?}", spread.error);
    assert_eq!(spread.outcomes.len(), 20);
    assert!(
        spread
            .outcomes
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Delivered(_)))
    );
    assert_eq!((spread.worked, spread.failed), (1, 3), "{spread:?}");
    assert!(
        took < Duration::from_secs(20),
        "the waiting associations were given up when the work was done, not after the 30 s timeout: {took:?}"
    );
    assert_eq!(links.len(), 1, "the association that worked is kept");
    let mut parallelism = dicom_bridge::service::Parallelism::new(4);
    assert_eq!(parallelism.observe(spread.worked, spread.failed), Some(1));
    assert_eq!(
        record(&spool, &spread.outcomes, dicom_bridge::now(), None).unwrap(),
        20
    );

    let second = spool_many(&spool, dir.path(), 12, 10);
    let n = parallelism.now();
    assert_eq!(n, 1);
    let spread =
        dicom_bridge::forward::send_parallel(&dest, &second, n, &mut links, &Stop::never(), None)
            .await;
    assert!(spread.error.is_none(), "{:?}", spread.error);
    assert_eq!((spread.opened, spread.worked, spread.failed), (0, 1, 0));
    assert_eq!(
        record(&spool, &spread.outcomes, dicom_bridge::now(), None).unwrap(),
        10
    );
    // While the one association is open, storescp has served no other. (Once it is
    // released, storescp takes the given-up connections from its backlog, and finds them
    // closed.)
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("Association Acknowledged").count(),
        1,
        "{text}"
    );
    for l in links {
        l.close().await;
    }
    assert_eq!(received(&out), 30);
}

/// The same four associations against storescp `--fork` (a process per association): all
/// four open and share the work; nothing is lowered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_that_serves_many_associations_gets_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let batch = spool_many(&spool, dir.path(), 13, 40);
    let port = free_port();
    let out = dir.path().join("received");
    let log = dir.path().join("storescp.log");
    let _pacs = storescp_fork(port, &out, &log);
    let dest = pacs_at(port, Duration::from_secs(30));
    let mut links = Vec::new();
    let spread =
        dicom_bridge::forward::send_parallel(&dest, &batch, 4, &mut links, &Stop::never(), None)
            .await;
    assert!(spread.error.is_none(), "{:?}", spread.error);
    assert_eq!((spread.opened, spread.worked, spread.failed), (4, 4, 0));
    assert_eq!(spread.outcomes.len(), 40);
    let mut parallelism = dicom_bridge::service::Parallelism::new(4);
    assert_eq!(parallelism.observe(spread.worked, spread.failed), None);
    assert_eq!(parallelism.now(), 4);
    assert_eq!(
        record(&spool, &spread.outcomes, dicom_bridge::now(), None).unwrap(),
        40
    );
    assert_eq!(links.len(), 4);
    for l in links {
        l.close().await;
    }
    assert_eq!(received(&out), 40);
}

/// A PACS that rejects the association (storescp `--refuse`: A-ASSOCIATE-RJ): the round
/// fails with the reason, nothing is delivered or made a dead letter (the instances are
/// retried later), and it is an outage, not a lower parallelism.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_association_leaves_everything_queued_for_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let batch = spool_many(&spool, dir.path(), 14, 6);
    let port = free_port();
    let out = dir.path().join("received");
    let log = dir.path().join("storescp.log");
    let _pacs = storescp_with(port, &out, Some(&log), &["--refuse"]);
    let dest = pacs_at(port, Duration::from_secs(5));
    let mut links = Vec::new();
    let spread =
        dicom_bridge::forward::send_parallel(&dest, &batch, 2, &mut links, &Stop::never(), None)
            .await;
    let error = spread.error.expect("the round failed");
    assert!(error.contains("rejected"), "{error}");
    assert!(spread.outcomes.is_empty());
    assert_eq!((spread.worked, spread.failed), (0, 0));
    assert!(links.is_empty());
    assert_eq!(
        record(&spool, &spread.outcomes, dicom_bridge::now(), None).unwrap(),
        0
    );
    let counts = spool.counts().unwrap();
    assert_eq!((counts.pending, counts.dead), (6, 0));
    assert_eq!(received(&out), 0);
}

/// Relays connections to `to`; what the PACS sends after its A-ASSOCIATE-AC (C-STORE
/// responses, the A-RELEASE-RP) reaches the box `delay` late (a PACS that takes long to
/// answer).
async fn late_answering_relay(listener: tokio::net::TcpListener, to: u16, delay: Duration) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
            let _ = sw.shutdown().await;
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut first = true;
            loop {
                match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !first {
                            tokio::time::sleep(delay).await;
                        }
                        first = false;
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// A large instance may take the PACS longer to answer: the wait for a C-STORE response is
/// the destination's timeout plus a second per 10 MB (`response_budget`). With a 2 s
/// timeout and every answer 3 s late (a relay in front of storescp): a small instance
/// times out (the association fails, it stays queued), a 60 MB one is answered within its
/// budget of 8 s and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_a_c_store_response_grows_with_the_instance() {
    assert_eq!(
        dicom_bridge::forward::response_budget(Duration::from_secs(30), 2 << 30),
        Duration::from_secs(30 + 214)
    );
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let small = spool_ct(
        &spool,
        dir.path(),
        "1.2.826.0.1.3680043.9.7777.15.1",
        "0001234",
        0,
    );
    let large = spool_ct(
        &spool,
        dir.path(),
        "1.2.826.0.1.3680043.9.7777.15.2",
        "0001234",
        60_000_000,
    );
    let pacs_port = free_port();
    let out = dir.path().join("received");
    let _pacs = storescp_fork(pacs_port, &out, &dir.path().join("storescp.log"));
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = relay.local_addr().unwrap().port();
    tokio::spawn(late_answering_relay(
        relay,
        pacs_port,
        Duration::from_secs(3),
    ));
    let dest = pacs_at(port, Duration::from_secs(2));
    let (outcomes, error) = send_batch(&dest, std::slice::from_ref(&small)).await;
    assert!(outcomes.is_empty(), "{outcomes:?}");
    let error = error.expect("no answer within 2 s");
    assert!(
        tsunagi_runtime::child::error_chain(&error).contains("did not answer a C-STORE"),
        "{error:?}"
    );
    let (outcomes, error) = send_batch(&dest, std::slice::from_ref(&large)).await;
    assert!(error.is_none(), "{error:?}");
    assert!(
        matches!(outcomes[..], [(_, Outcome::Delivered(_))]),
        "{outcomes:?}"
    );
}

/// Issue 15, storage commitment with a PACS that does not offer it (dcmtk storescp accepts
/// only storage SOP classes): the instances are stored (counted at storescp), but no
/// commitment can be asked for, so each stays in the spool with the reason, to be sent again
/// when the commitment timeout runs out; none leaves on the C-STORE response alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_without_storage_commitment_stores_but_nothing_leaves_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let batch = spool_many(&spool, dir.path(), 15, 6);
    let port = free_port();
    let out = dir.path().join("received");
    let _pacs = storescp(port, &out);
    let dest = Destination {
        storage_commitment: true,
        tls: None,
        ..pacs_at(port, Duration::from_secs(10))
    };
    let mut links = Vec::new();
    let spread =
        dicom_bridge::forward::send_parallel(&dest, &batch, 1, &mut links, &Stop::never(), None)
            .await;
    assert!(spread.error.is_none(), "{:?}", spread.error);
    assert_eq!(spread.outcomes.len(), 6);
    assert_eq!(spread.commitments.len(), 1, "{spread:?}");
    let asked = &spread.commitments[0];
    assert_eq!(asked.ids.len(), 6);
    let why = asked.transaction.as_ref().unwrap_err();
    assert!(why.contains("does not accept storage commitment"), "{why}");
    let now = dicom_bridge::now();
    let committing = dicom_bridge::forward::Committing {
        requested: &spread.commitments,
        resend_after: 60,
    };
    assert_eq!(
        record(&spool, &spread.outcomes, now, Some(committing)).unwrap(),
        6
    );
    let c = spool.counts().unwrap();
    assert_eq!((c.pending, c.awaiting_commitment, c.delivered), (0, 6, 0));
    assert!(spool.ready(now + 59, 10).unwrap().is_empty());
    assert_eq!(spool.ready(now + 60, 10).unwrap().len(), 6);
    assert_eq!(received(&out), 6);
    for l in links {
        l.close().await;
    }
}
