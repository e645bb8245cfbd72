//! The SCP against dcmtk as the modality: C-ECHO, C-STORE into the spool (bytes as sent, a
//! Japanese name byte for byte), a wrong called AE title, a full spool (A700).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

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

async fn start(spool: Spool) -> (u16, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let settings = Arc::new(Settings {
        ae_title: "TSUNAGI".into(),
        max_pdu: 16384,
        timeout: Duration::from_secs(10),
        max_associations: 8,
        allowed: None,
        proxy: None,
        extra_sop_classes: Vec::new(),
        header_limit: 1 << 20,
        commitment_from: Vec::new(),
        refused_reports: Default::default(),
        active: Default::default(),
    });
    tokio::spawn(serve(listener, settings, spool, stop.clone()));
    (port, stop)
}

async fn run(cmd: &mut Command) -> std::process::Output {
    let mut cmd = std::mem::replace(cmd, Command::new("true"));
    tokio::task::spawn_blocking(move || cmd.env("TCP_NODELAY", "1").output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_and_store_into_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let (port, stop) = start(spool.clone()).await;
    let out =
        run(Command::new("echoscu").args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()]))
            .await;
    assert!(
        out.status.success(),
        "echoscu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = generate(dir.path(), "1.2.826.0.1.3680043.9.7777.1.1", "0001234");
    let out = run(Command::new("storescu")
        .args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()])
        .arg(&file))
    .await;
    assert!(
        out.status.success(),
        "storescu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    spool.caught_up().unwrap();
    let ready = spool.ready(i64::MAX, 10).unwrap();
    assert_eq!(ready.len(), 1);
    let q = &ready[0];
    assert_eq!(q.meta.sop_instance, "1.2.826.0.1.3680043.9.7777.1.1");
    assert_eq!(q.meta.sop_class, "1.2.840.10008.5.1.4.1.1.2");
    assert_eq!(q.meta.patient_id.as_deref(), Some("0001234"));
    assert_eq!(q.meta.calling_ae, "STORESCU");
    // The data set as sent, byte for byte (the Japanese name included).
    let sent = std::fs::read(&file).unwrap();
    // The data set (in a spool segment, at its record's offset).
    let mut stored = vec![0u8; usize::try_from(q.size).unwrap()];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&q.path).unwrap(),
        &mut stored,
        q.offset,
    )
    .unwrap();
    assert!(stored == data_set(&sent), "the data set as sent");
    let name = DicomFile::read(&file)
        .unwrap()
        .element(0x0010, 0x0010)
        .unwrap()
        .to_vec();
    assert!(name.contains(&0x1b), "the name is in ISO 2022 IR 87");
    assert!(stored.windows(name.len()).any(|w| w == name));
    // The same instance again, identical: stored once.
    let out = run(Command::new("storescu")
        .args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()])
        .arg(&file))
    .await;
    assert!(out.status.success());
    spool.caught_up().unwrap();
    assert_eq!(spool.counts().unwrap().pending, 1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_called_ae_and_a_full_spool_are_refused_and_service_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Room for less than one instance.
    let spool = Spool::open(&dir.path().join("spool"), 100).unwrap();
    let (port, stop) = start(spool.clone()).await;
    let out =
        run(Command::new("echoscu").args(["-aec", "SOMEONE", "127.0.0.1", &port.to_string()]))
            .await;
    assert!(
        !out.status.success(),
        "a wrong called AE title must be rejected"
    );
    let file = generate(dir.path(), "1.2.826.0.1.3680043.9.7777.1.2", "0001234");
    let out = run(Command::new("storescu")
        .args(["-v", "-aec", "TSUNAGI", "127.0.0.1", &port.to_string()])
        .arg(&file))
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("a700") || text.contains("A700") || text.contains("OutOfResources"),
        "{text}"
    );
    spool.caught_up().unwrap();
    assert_eq!(spool.counts().unwrap().pending, 0);
    assert!(
        std::fs::read_dir(dir.path().join("spool/objects"))
            .unwrap()
            .next()
            .is_none(),
        "no partial file"
    );
    // Still serving.
    let out =
        run(Command::new("echoscu").args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()]))
            .await;
    assert!(out.status.success());
    stop.cancel();
}

/// A hand-driven SCU (dicom-ul's client), to send what dcmtk would not.
async fn client(port: u16) -> dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream> {
    dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title("PROBE")
        .called_ae_title("TSUNAGI")
        .with_presentation_context("1.2.840.10008.5.1.4.1.1.2", vec!["1.2.840.10008.1.2.1"])
        .establish_async(format!("127.0.0.1:{port}"))
        .await
        .unwrap()
}

fn pdata(pc: u8, command: bool, last: bool, data: Vec<u8>) -> dicom_ul::Pdu {
    use dicom_ul::pdu::{PDataValue, PDataValueType};
    dicom_ul::Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: if command {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: last,
            data,
        }],
    }
}

fn spool_is_empty(dir: &Path, spool: &Spool) -> bool {
    spool.caught_up().unwrap();
    spool.counts().unwrap().pending == 0
        && std::fs::read_dir(dir.join("spool/objects"))
            .unwrap()
            .next()
            .is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_instance_uid_and_an_abort_mid_transfer_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let (port, stop) = start(spool.clone()).await;
    let file = generate(dir.path(), "1.2.826.0.1.3680043.9.7777.1.3", "0001234");
    let ds = data_set(&std::fs::read(&file).unwrap());

    // The command names another instance than the data set: A900, nothing stored.
    let mut a = client(port).await;
    let pc = a.presentation_contexts()[0].id;
    let rq = dimse::command::Command::store(
        1,
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.826.0.1.3680043.9.7777.1.999",
    );
    a.send(&pdata(pc, true, true, rq.encode())).await.unwrap();
    a.send(&pdata(pc, false, true, ds.clone())).await.unwrap();
    let dicom_ul::Pdu::PData { data } = a.receive().await.unwrap() else {
        panic!("no response")
    };
    let rsp = dimse::command::Command::decode(&data[0].data).unwrap();
    assert_eq!(rsp.status, Some(dimse::status::Status::DATASET_MISMATCH));
    assert!(spool_is_empty(dir.path(), &spool));
    // An unsupported operation on the same association: 0211H, and the association goes on.
    let mut find = dimse::command::Command::new(dimse::command::CommandField::CFindRq);
    find.message_id = Some(2);
    find.affected_sop_class = Some("1.2.840.10008.5.1.4.1.1.2".into());
    a.send(&pdata(pc, true, true, find.encode())).await.unwrap();
    let dicom_ul::Pdu::PData { data } = a.receive().await.unwrap() else {
        panic!("no response")
    };
    assert_eq!(
        dimse::command::Command::decode(&data[0].data)
            .unwrap()
            .status,
        Some(dimse::status::Status::UNRECOGNIZED_OPERATION)
    );
    a.release().await.unwrap();

    // Half a data set, then an abort: nothing partial anywhere.
    let mut b = client(port).await;
    let rq = dimse::command::Command::store(
        1,
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.826.0.1.3680043.9.7777.1.3",
    );
    b.send(&pdata(pc, true, true, rq.encode())).await.unwrap();
    b.send(&pdata(pc, false, false, ds[..ds.len() / 2].to_vec()))
        .await
        .unwrap();
    b.abort().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(spool_is_empty(dir.path(), &spool));
    // Garbage instead of an association: the service keeps serving.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
    }
    let out =
        run(Command::new("echoscu").args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()]))
            .await;
    assert!(out.status.success());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_and_oversized_pdus_do_not_hold_the_service() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let settings = Arc::new(Settings {
        ae_title: "TSUNAGI".into(),
        max_pdu: 16384,
        timeout: Duration::from_secs(2),
        max_associations: 8,
        allowed: None,
        proxy: None,
        extra_sop_classes: Vec::new(),
        header_limit: 1 << 20,
        commitment_from: Vec::new(),
        refused_reports: Default::default(),
        active: Default::default(),
    });
    tokio::spawn(serve(listener, settings, spool.clone(), stop.clone()));
    // An idle client that sends nothing: others are served meanwhile, and it is closed
    // after the timeout.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let out =
        run(Command::new("echoscu").args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()]))
            .await;
    assert!(out.status.success(), "an idle client must not block others");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the idle connection was not closed after the timeout"
    );
    // A PDU that announces 4 GiB: refused without buffering it.
    let mut big = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    big.write_all(&[0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    big.write_all(&[0u8; 1024]).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), big.read(&mut buf)).await;
    assert!(
        answer.is_ok(),
        "an oversized PDU must be refused or the connection closed"
    );
    // Still serving.
    let out =
        run(Command::new("echoscu").args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()]))
            .await;
    assert!(out.status.success());
    stop.cancel();
}

#[test]
fn the_standard_storage_sop_classes_and_nothing_else() {
    use dicom_bridge::scp::is_standard_storage;
    for storage in [
        "1.2.840.10008.5.1.4.1.1.2",     // CT
        "1.2.840.10008.5.1.4.1.1.6.1",   // US
        "1.2.840.10008.5.1.4.1.1.481.5", // RT Plan
        "1.2.840.10008.5.1.4.1.1.9.1.1", // 12-lead ECG
        "1.2.840.10008.5.1.4.1.1.1.2",   // MG, for presentation
        "1.2.840.10008.5.1.4.1.1.1.2.1", // MG, for processing
        "1.2.840.10008.5.1.4.1.1.88.11", // Basic Text SR
        "1.2.840.10008.5.1.4.1.1.88.59", // KOS
        "1.2.840.10008.5.1.4.1.1.104.1", // Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.7.3",   // multi-frame SC
        "1.2.840.10008.5.1.4.1.1.5",     // NM (retired)
    ] {
        assert!(is_standard_storage(storage), "{storage}");
    }
    for other in [
        "1.2.840.10008.1.1",               // Verification
        "1.2.840.10008.1.20.1",            // Storage Commitment
        "1.2.840.10008.1.3.10",            // DICOMDIR
        "1.2.840.10008.5.1.4.1.2.2.1",     // Study Root FIND
        "1.2.840.10008.5.1.1.29",          // retired print "Storage SOP Class"
        "1.2.826.0.1.3680043.9.7777.99.1", // not in the standard
        "",
    ] {
        assert!(!is_standard_storage(other), "{other}");
    }
}

/// Issue 6, acceptance 6: an unknown SOP class is refused (0122H) and nothing is stored; a
/// configured one is stored; beyond the association cap a caller gets A-ASSOCIATE-RJ "local
/// limit exceeded" and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sop_class_and_the_association_cap_get_the_right_answers() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    const PRIVATE: &str = "1.2.826.0.1.3680043.9.7777.99.2";
    let settings = Arc::new(Settings {
        ae_title: "TSUNAGI".into(),
        max_pdu: 16384,
        timeout: Duration::from_secs(10),
        max_associations: 1,
        allowed: None,
        proxy: None,
        extra_sop_classes: vec![PRIVATE.into()],
        header_limit: 1 << 20,
        commitment_from: Vec::new(),
        refused_reports: Default::default(),
        active: Default::default(),
    });
    tokio::spawn(serve(listener, settings, spool.clone(), stop.clone()));
    let file = generate(dir.path(), "1.2.826.0.1.3680043.9.7777.1.5", "0001234");
    let ds = data_set(&std::fs::read(&file).unwrap());

    let mut a = dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title("PROBE")
        .called_ae_title("TSUNAGI")
        .with_presentation_context(
            "1.2.826.0.1.3680043.9.7777.99.1",
            vec!["1.2.840.10008.1.2.1"],
        )
        .with_presentation_context(PRIVATE, vec!["1.2.840.10008.1.2.1"])
        .establish_async(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let pcs: Vec<u8> = a.presentation_contexts().iter().map(|p| p.id).collect();
    let store = |class: &str| {
        dimse::command::Command::store(1, class, "1.2.826.0.1.3680043.9.7777.1.5").encode()
    };
    a.send(&pdata(
        pcs[0],
        true,
        true,
        store("1.2.826.0.1.3680043.9.7777.99.1"),
    ))
    .await
    .unwrap();
    a.send(&pdata(pcs[0], false, true, ds.clone()))
        .await
        .unwrap();
    let dicom_ul::Pdu::PData { data } = a.receive().await.unwrap() else {
        panic!("no response")
    };
    assert_eq!(
        dimse::command::Command::decode(&data[0].data)
            .unwrap()
            .status,
        Some(dimse::status::Status::SOP_CLASS_NOT_SUPPORTED)
    );
    assert!(spool_is_empty(dir.path(), &spool));

    // The association is held: one more caller is beyond the cap.
    let out = run(Command::new("echoscu").args([
        "-v",
        "-aec",
        "TSUNAGI",
        "127.0.0.1",
        &port.to_string(),
    ]))
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(text.contains("Local Limit Exceeded"), "{text}");

    // The configured private class is stored, on the association that was served all along.
    a.send(&pdata(pcs[1], true, true, store(PRIVATE)))
        .await
        .unwrap();
    a.send(&pdata(pcs[1], false, true, ds)).await.unwrap();
    let dicom_ul::Pdu::PData { data } = a.receive().await.unwrap() else {
        panic!("no response")
    };
    assert_eq!(
        dimse::command::Command::decode(&data[0].data)
            .unwrap()
            .status,
        Some(dimse::status::Status::SUCCESS)
    );
    a.release().await.unwrap();
    spool.caught_up().unwrap();
    assert_eq!(spool.counts().unwrap().pending, 1);
    // The slot is free again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out =
        run(Command::new("echoscu").args(["-aec", "TSUNAGI", "127.0.0.1", &port.to_string()]))
            .await;
    assert!(out.status.success());
    stop.cancel();
}

/// The data set `ds` with `insert` put where the first top-level element after `after`
/// starts.
fn insert_after(ds: &[u8], after: u32, insert: &[u8]) -> Vec<u8> {
    let (_, at) = dicom_bridge::header::elements_until(ds, true, after, true).unwrap();
    [&ds[..at], insert, &ds[at..]].concat()
}

/// An explicit VR little endian element with a 4-byte length (OB, UN).
fn long_element(g: u16, e: u16, vr: &[u8; 2], len: u32, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&g.to_le_bytes());
    v.extend_from_slice(&e.to_le_bytes());
    v.extend_from_slice(vr);
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(value);
    v
}

/// Sends `ds` as one C-STORE of a CT on a raw association; the status answered.
async fn store_raw(port: u16, uid: &str, ds: Vec<u8>) -> dimse::status::Status {
    let mut a = client(port).await;
    let pc = a.presentation_contexts()[0].id;
    let rq = dimse::command::Command::store(1, "1.2.840.10008.5.1.4.1.1.2", uid).encode();
    a.send(&pdata(pc, true, true, rq)).await.unwrap();
    for (i, chunk) in ds.chunks(8000).enumerate() {
        let last = (i + 1) * 8000 >= ds.len();
        a.send(&pdata(pc, false, last, chunk.to_vec()))
            .await
            .unwrap();
    }
    let dicom_ul::Pdu::PData { data } = a.receive().await.unwrap() else {
        panic!("no response")
    };
    let _ = a.release().await;
    dimse::command::Command::decode(&data[0].data)
        .unwrap()
        .status
        .unwrap()
}

/// Issue 15: the SCP reads a data set the way a PACS will, as it streams in. A PatientID
/// after 200 KiB of a private element (sent by dcmtk's storescu) is found, within the
/// header limit. A data set with PatientID twice (a PACS might file it under the second
/// while the bridge routes on the first), or an UN of undefined length whose content is
/// not the implicit VR items it must hold, is refused with C000H and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_patient_id_is_found_and_data_sets_read_two_ways_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let (port, stop) = start(spool.clone()).await;
    let uid = "1.2.826.0.1.3680043.9.7777.1.21";
    let file = generate(dir.path(), uid, "0001234");
    let bytes = std::fs::read(&file).unwrap();
    let ds = data_set(&bytes);
    let meta = &bytes[..bytes.len() - ds.len()];

    // 200 KiB of a private element before the patient group.
    let mut private = Vec::new();
    private.extend_from_slice(&[0x09, 0x00, 0x10, 0x00, b'L', b'O', 12, 0]);
    private.extend_from_slice(b"TSUNAGI TEST");
    private.extend(long_element(
        0x0009,
        0x1010,
        b"OB",
        200 * 1024,
        &vec![0x5A; 200 * 1024],
    ));
    let late = dir.path().join("late.dcm");
    std::fs::write(
        &late,
        [meta, &insert_after(&ds, 0x0008_FFFF, &private)].concat(),
    )
    .unwrap();
    let out = run(Command::new("storescu")
        .args(["-v", "-aec", "TSUNAGI", "127.0.0.1"])
        .arg(port.to_string())
        .arg(&late))
    .await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Received Store Response (Success)"), "{text}");
    spool.caught_up().unwrap();
    let ready = spool.ready(i64::MAX, 10).unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].meta.patient_id.as_deref(), Some("0001234"));
    spool.delivered(ready[0].id).unwrap();

    // PatientID twice.
    let mut second = Vec::new();
    second.extend_from_slice(&[0x10, 0x00, 0x20, 0x00, b'L', b'O', 8, 0]);
    second.extend_from_slice(b"0009999 ");
    let twice = insert_after(&ds, 0x0010_0020, &second);
    assert_eq!(
        store_raw(port, uid, twice).await,
        dimse::status::Status::CANNOT_UNDERSTAND
    );
    // An UN of undefined length holding an explicit VR element instead of items.
    let mut un = long_element(0x0009, 0x1010, b"UN", u32::MAX, &[]);
    un.extend_from_slice(&[0x09, 0x00, 0x11, 0x10, b'L', b'O', 2, 0, b'x', b' ']);
    un.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    let mut creator = vec![0x09, 0x00, 0x10, 0x00, b'L', b'O', 12, 0];
    creator.extend_from_slice(b"TSUNAGI TEST");
    let unwalkable = insert_after(&ds, 0x0008_FFFF, &[creator, un].concat());
    assert_eq!(
        store_raw(port, uid, unwalkable).await,
        dimse::status::Status::CANNOT_UNDERSTAND
    );
    assert!(spool_is_empty(dir.path(), &spool));
    // The well-formed data set still goes in.
    assert_eq!(
        store_raw(port, uid, ds).await,
        dimse::status::Status::SUCCESS
    );
    spool.caught_up().unwrap();
    assert_eq!(spool.counts().unwrap().pending, 1);
    stop.cancel();
}

/// An association as `calling` proposing the Storage Commitment Push Model in the SCP
/// role (as a PACS reporting does); `None` when it is rejected.
async fn reporter(
    port: u16,
    calling: &str,
) -> Option<dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream>> {
    dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title(calling.to_owned())
        .called_ae_title("TSUNAGI")
        .with_presentation_context(
            dimse::command::STORAGE_COMMITMENT_PUSH,
            vec![dicom_bridge::commitment::IMPLICIT_VR_LE],
        )
        .with_presentation_context("1.2.840.10008.5.1.4.1.1.2", vec!["1.2.840.10008.1.2.1"])
        .with_role_selection(dimse::command::STORAGE_COMMITMENT_PUSH, false, true)
        .establish_async(format!("127.0.0.1:{port}"))
        .await
        .ok()
}

/// Sends an N-EVENT-REPORT-RQ (event `event`) with `data` as its data set; the status
/// answered.
async fn report(
    a: &mut dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream>,
    event: u16,
    data: Vec<u8>,
) -> dimse::status::Status {
    use dimse::command::{Command, CommandField};
    let pc = a.presentation_contexts()[0].id;
    let mut rq = Command::new(CommandField::NEventReportRq);
    rq.message_id = Some(7);
    rq.affected_sop_class = Some(dimse::command::STORAGE_COMMITMENT_PUSH.into());
    rq.affected_sop_instance = Some(dimse::command::STORAGE_COMMITMENT_PUSH_INSTANCE.into());
    rq.event_type = Some(event);
    rq.has_dataset = true;
    a.send(&pdata(pc, true, true, rq.encode())).await.unwrap();
    a.send(&pdata(pc, false, true, data)).await.unwrap();
    let dicom_ul::Pdu::PData { data } = a.receive().await.unwrap() else {
        panic!("no response")
    };
    let rsp = Command::decode(&data[0].data).unwrap();
    assert_eq!(rsp.field, CommandField::NEventReportRsp);
    assert_eq!(
        rsp.affected_sop_instance.as_deref(),
        Some(dimse::command::STORAGE_COMMITMENT_PUSH_INSTANCE)
    );
    rsp.status.unwrap()
}

/// Issue 15, storage commitment: the N-EVENT-REPORT that takes instances out of the spool
/// is taken only from the network PACS (its AE title from its address, or from an address
/// `commitment-reports-from` lists; from any other it is a stranger), and only for
/// instances waiting under the transaction it names. The PACS may associate even though the
/// allow-list names only the modality, but may not store; a caller that is neither is
/// rejected; the modality's report is refused (0124H) and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commitment_report_is_taken_only_from_the_pacs_and_only_for_its_transaction() {
    use dicom_bridge::commitment::{IMPLICIT_VR_LE, Reference, Report};
    use dimse::status::Status;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
    let ct = "1.2.840.10008.5.1.4.1.1.2";
    let mut stored = Vec::new();
    for uid in [
        "1.2.826.0.1.3680043.9.7777.5.1",
        "1.2.826.0.1.3680043.9.7777.5.2",
    ] {
        let mut inc = spool.begin().unwrap();
        inc.write(b"DICM stored at the PACS").unwrap();
        let meta = dicom_bridge::spool::Meta {
            sop_class: ct.into(),
            sop_instance: uid.into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            calling_ae: "MODALITY".into(),
            patient_id: Some("0001234".into()),
            study_uid: None,
        };
        let dicom_bridge::spool::Committed::Queued(id) = inc.commit(&meta, 100).unwrap() else {
            panic!()
        };
        stored.push((id, uid));
    }
    let transaction = dicom_bridge::commitment::new_transaction_uid();
    let ids: Vec<i64> = stored.iter().map(|(id, _)| *id).collect();
    spool
        .stored(&ids, Some(&transaction), 100, i64::MAX)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let settings = Arc::new(Settings {
        ae_title: "TSUNAGI".into(),
        max_pdu: 16384,
        timeout: Duration::from_secs(10),
        max_associations: 8,
        allowed: Some(vec![("MODALITY".into(), local)]),
        proxy: None,
        extra_sop_classes: Vec::new(),
        header_limit: 1 << 20,
        // The PACS's own address first (nothing reports from it here), then a second one
        // (`commitment-reports-from`), which is where its reports come from.
        commitment_from: vec![
            ("PACS".into(), "127.0.0.3".parse().unwrap()),
            ("PACS".into(), local),
        ],
        refused_reports: refused.clone(),
        active: Default::default(),
    });
    // Without the second address, the PACS's AE title from there is a stranger.
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere_port = elsewhere.local_addr().unwrap().port();
    tokio::spawn(serve(
        elsewhere,
        Arc::new(Settings {
            commitment_from: vec![("PACS".into(), "127.0.0.3".parse().unwrap())],
            refused_reports: Arc::default(),
            ..(*settings).clone()
        }),
        spool.clone(),
        stop.clone(),
    ));
    assert!(reporter(elsewhere_port, "PACS").await.is_none());
    tokio::spawn(serve(listener, settings, spool.clone(), stop.clone()));
    let reference = |uid: &str| Reference {
        sop_class: ct.into(),
        sop_instance: uid.into(),
    };
    let good = dicom_bridge::commitment::report(
        &Report {
            transaction: transaction.clone(),
            committed: vec![reference(stored[0].1)],
            failed: vec![(reference(stored[1].1), 0x0112)],
        },
        IMPLICIT_VR_LE,
    )
    .unwrap();
    let awaiting = |spool: &Spool| spool.counts().unwrap().awaiting_commitment;

    // Neither listed nor the PACS: rejected.
    assert!(reporter(port, "STRANGER").await.is_none());
    // The modality is listed, but its report is not the PACS's: 0124H, nothing changes.
    let mut m = reporter(port, "MODALITY").await.unwrap();
    assert_eq!(
        report(&mut m, 2, good.clone()).await,
        Status::NOT_AUTHORIZED
    );
    m.release().await.unwrap();
    assert_eq!(awaiting(&spool), 2);
    assert_eq!(refused.load(std::sync::atomic::Ordering::Relaxed), 1);

    // The PACS: associates, may not store, its reports are read.
    let mut p = reporter(port, "PACS").await.unwrap();
    assert!(
        dicom_ul::association::Association::requestor_roles_for(
            &p,
            dimse::command::STORAGE_COMMITMENT_PUSH
        )
        .scp
    );
    let store_pc = p.presentation_contexts()[1].id;
    let rq = dimse::command::Command::store(1, ct, "1.2.826.0.1.3680043.9.7777.5.9");
    p.send(&pdata(store_pc, true, true, rq.encode()))
        .await
        .unwrap();
    p.send(&pdata(store_pc, false, true, b"\x08\x00\x18\x00".to_vec()))
        .await
        .unwrap();
    let dicom_ul::Pdu::PData { data } = p.receive().await.unwrap() else {
        panic!("no response")
    };
    assert_eq!(
        dimse::command::Command::decode(&data[0].data)
            .unwrap()
            .status,
        Some(Status::NOT_AUTHORIZED)
    );
    // Garbage, an unknown event type, another transaction: nothing committed.
    assert_eq!(
        report(&mut p, 1, b"\x08\x00\x95\x11\xff\xff\xff\x7f".to_vec()).await,
        Status::MISTYPED_ARGUMENT
    );
    assert_eq!(
        report(&mut p, 9, good.clone()).await,
        Status::NO_SUCH_EVENT_TYPE
    );
    let other = dicom_bridge::commitment::report(
        &Report {
            transaction: dicom_bridge::commitment::new_transaction_uid(),
            committed: vec![reference(stored[0].1), reference(stored[1].1)],
            failed: Vec::new(),
        },
        IMPLICIT_VR_LE,
    )
    .unwrap();
    assert_eq!(report(&mut p, 1, other).await, Status::SUCCESS);
    assert_eq!(awaiting(&spool), 2);
    // Its report: the committed one leaves, the failed one is sent again later.
    assert_eq!(report(&mut p, 2, good).await, Status::SUCCESS);
    p.release().await.unwrap();
    let c = spool.counts().unwrap();
    assert_eq!(
        (c.awaiting_commitment, c.pending, c.delivered),
        (0, 1, 1),
        "{c:?}"
    );
    let left: Vec<i64> = spool
        .ready(i64::MAX, 10)
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert_eq!(left, vec![stored[1].0]);
    stop.cancel();
}
