//! The Orthanc test PACS (`hil_tests::orthanc`) with dcmtk as the modality, and the DICOM
//! test files (`hil_tests::dicom_files`). Needs root (network namespaces) and the Debian
//! packages `orthanc` and `dcmtk`, plus pydicom's test files (`cargo xtask test` installs
//! them): without root the Orthanc test prints why and returns, unless `CI` is set; a
//! missing tool or file always fails.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hil_tests::dicom_files::{
    self, DicomFile, Ids, MultiFrame, YAMADA_TAROU, YAMADA_TAROU_ISO_2022_IR_87,
};
use hil_tests::orthanc::{self, Modality, Options, Orthanc};
use serde_json::json;

const PATIENT_NAME: (u16, u16) = (0x0010, 0x0010);
const PATIENT_ID: (u16, u16) = (0x0010, 0x0020);
const SOP_INSTANCE_UID: (u16, u16) = (0x0008, 0x0018);
const PIXEL_DATA: (u16, u16) = (0x7fe0, 0x0010);

/// Whether this process may create network namespaces; else the reason (and a panic
/// under CI).
fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the Orthanc tests need root (network namespaces), and CI is set"
    );
    eprintln!("skipped: the Orthanc tests need root (network namespaces)");
    false
}

fn element(file: &DicomFile, (group, elem): (u16, u16)) -> &[u8] {
    file.element(group, elem)
        .unwrap_or_else(|| panic!("({group:04x},{elem:04x}) missing"))
}

/// `storescu -v` of `files` into `orthanc`; every C-STORE must be answered `Success`
/// (dcmtk 3.6.7's storescu exits 0 even when the store is refused).
fn store(orthanc: &Orthanc, files: &[&Path]) {
    let mut command = orthanc.command("storescu");
    command
        .args(["-v", "-to", "10", "-ta", "10", "-td", "30"])
        .args(["-aet", "TSUSCU", "-aec", orthanc.ae_title()])
        .args(["127.0.0.1", &orthanc::DICOM_PORT.to_string()])
        .args(files);
    let output = orthanc
        .output(&mut command, Duration::from_secs(60))
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "storescu failed: {log}");
    assert_eq!(
        log.matches("Received Store Response (Success)").count(),
        files.len(),
        "storescu: {log}"
    );
}

#[test]
fn orthanc_in_its_namespace_stores_and_returns_the_files_unchanged() {
    if !can_run() {
        return;
    }
    let pydicom = dicom_files::pydicom_test_files().unwrap_or_else(|e| panic!("{e}"));
    let ct_small = pydicom.join("CT_small.dcm");
    let work = tempfile::tempdir().unwrap();
    let ids = Ids::new("TSU-JP-0001");
    let japanese = dicom_files::japanese_ct(work.path(), &ids).unwrap();

    let pacs = Orthanc::start_for_test_with(&Options {
        ae_title: "TESTPACS".to_owned(),
        modalities: vec![Modality::local("TSUSCU", 11112)],
        ..Options::default()
    });
    let (netns, pid, dir) = (
        pacs.netns().to_owned(),
        pacs.pid().unwrap(),
        pacs.dir().to_owned(),
    );
    assert!(netns.starts_with(orthanc::NETNS_PREFIX), "{netns}");
    assert_eq!(pacs.dicom_addr().to_string(), "127.0.0.1:4242");
    assert_eq!(pacs.ae_title(), "TESTPACS");
    // The kept pid is Orthanc, in the namespace, not in ours: nothing listens out here.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "Orthanc");
    let ns_of = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(ns_of(&pid.to_string()), ns_of("self"));
    let system = pacs.get("/system").unwrap();
    assert_eq!(system.status, 200);
    assert_eq!(system.json()["DicomAet"], "TESTPACS");
    assert_eq!(pacs.get("/modalities").unwrap().json(), json!(["TSUSCU"]));

    // C-ECHO from inside the namespace; a wrong called AE title is rejected.
    pacs.echo().unwrap();
    let mut wrong = pacs.command("echoscu");
    wrong.args(["-aec", "NOTORTHANC", "127.0.0.1", "4242"]);
    let output = pacs.output(&mut wrong, Duration::from_secs(30)).unwrap();
    assert!(
        !output.status.success(),
        "echo with a wrong AE title passed"
    );

    store(&pacs, &[&japanese, &ct_small]);
    let instances = pacs.instances().unwrap();
    assert_eq!(instances.len(), 2, "{instances:?}");

    let sent_jp = DicomFile::read(&japanese).unwrap();
    let sent_ct = DicomFile::read(&ct_small).unwrap();
    let mut seen = 0;
    for id in &instances {
        let back = DicomFile::parse(pacs.instance_file(id).unwrap()).unwrap();
        let sent = if element(&back, SOP_INSTANCE_UID) == element(&sent_jp, SOP_INSTANCE_UID) {
            // Orthanc keeps the received data set; storescu sent ours as it was.
            assert_eq!(
                element(&back, PATIENT_NAME),
                YAMADA_TAROU_ISO_2022_IR_87,
                "the Japanese name, byte for byte"
            );
            assert!(back.data_set() == sent_jp.data_set(), "data set changed");
            // Orthanc decodes the ISO 2022 escapes as DICOM means them.
            let tags = pacs
                .get(&format!("/instances/{id}/simplified-tags"))
                .unwrap();
            assert_eq!(tags.json()["PatientName"], YAMADA_TAROU, "{}", tags.text());
            &sent_jp
        } else {
            assert_eq!(
                element(&back, SOP_INSTANCE_UID),
                element(&sent_ct, SOP_INSTANCE_UID)
            );
            // storescu drops the trailing padding; the rest is unchanged.
            assert!(back.data_set() == sent_ct.data_set_without_padding());
            &sent_ct
        };
        assert_eq!(element(&back, PATIENT_NAME), element(sent, PATIENT_NAME));
        assert!(element(&back, PIXEL_DATA) == element(sent, PIXEL_DATA));
        seen += 1;
    }
    assert_eq!(seen, 2);

    // /tools/find by the generated PatientID.
    let found = pacs
        .post_json(
            "/tools/find",
            &json!({"Level": "Instance", "Query": {"PatientID": ids.patient_id}}),
        )
        .unwrap();
    assert_eq!(found.status, 200, "{}", found.text());
    assert_eq!(found.json().as_array().map(Vec::len), Some(1));

    // DELETE works too.
    let gone = pacs
        .delete(&format!("/instances/{}", instances[0]))
        .unwrap();
    assert_eq!(gone.status, 200, "{}", gone.text());
    assert_eq!(pacs.instances().unwrap().len(), 1);

    drop(pacs);
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "namespace left"
    );
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "Orthanc left");
    assert!(!dir.exists(), "directory left");
}

#[test]
fn stop_reports_and_a_stale_namespace_is_cleaned() {
    if !can_run() {
        return;
    }
    // A namespace with a process in it, whose owner then dies. The owner lives until the
    // process is inside, so no concurrent cleaner (another test's start) sees it stale
    // before then.
    let mut owner = Command::new("sleep").arg("60").spawn().unwrap();
    let stale = format!("{}{}-0", orthanc::NETNS_PREFIX, owner.id());
    let ip = |args: &[&str]| {
        let output = Command::new("ip").args(args).output().unwrap();
        assert!(output.status.success(), "ip {args:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    ip(&["netns", "add", &stale]);
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ip(&["netns", "pids", &stale])
        .split_whitespace()
        .any(|pid| pid == sleeper.id().to_string())
    {
        assert!(
            Instant::now() < deadline,
            "the sleeper never entered {stale}"
        );
        std::thread::yield_now();
    }
    owner.kill().unwrap();
    owner.wait().unwrap();

    // (Another test's start may have cleaned it first: then it is gone all the same.)
    let removed = orthanc::clean_stale().unwrap();
    assert!(
        !Path::new("/run/netns").join(&stale).exists(),
        "{stale} left; removed {removed:?}"
    );
    // Killed (our child here, so reap it to see).
    let status = sleeper.wait().unwrap();
    assert!(!status.success());

    let pacs = Orthanc::start_for_test();
    assert_eq!(pacs.ae_title(), orthanc::DEFAULT_AE_TITLE);
    pacs.echo().unwrap();
    let netns = pacs.netns().to_owned();
    pacs.stop().unwrap();
    assert!(!Path::new("/run/netns").join(&netns).exists());
}

#[test]
fn multi_frame_generator_makes_the_requested_size() {
    let work = tempfile::tempdir().unwrap();
    let ids = Ids::new("TSU-MF-0001");
    let size = MultiFrame::at_least((100 << 20) + 1);
    assert_eq!(size.frames, 201);
    let started = Instant::now();
    let path = dicom_files::multi_frame(work.path(), &ids, size).unwrap();
    eprintln!(
        "multi-frame: {} bytes in {:?}",
        size.pixel_bytes(),
        started.elapsed()
    );
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(
        len > size.pixel_bytes() && len < size.pixel_bytes() + 4096,
        "{len}"
    );

    // dcmdump parses it whole (+E: errors are fatal; +L: load the pixel data too).
    let output = Command::new("dcmdump")
        .args(["+E", "+L", "-q"])
        .arg(&path)
        .output()
        .expect("dcmdump (Debian package dcmtk)");
    let dump = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dump.contains("(0028,0008) IS [201]"), "{dump}");
    assert!(
        dump.contains("(7fe0,0010) OW") && dump.contains(&size.pixel_bytes().to_string()),
        "{dump}"
    );

    let file = DicomFile::read(&path).unwrap();
    assert_eq!(
        file.string(PATIENT_ID.0, PATIENT_ID.1).as_deref(),
        Some("TSU-MF-0001")
    );
    assert_eq!(
        file.string(0x0020, 0x000d).as_deref(),
        Some(ids.study_instance_uid.as_str())
    );
    let pixels = element(&file, PIXEL_DATA);
    assert_eq!(u64::try_from(pixels.len()).unwrap(), size.pixel_bytes());
    let frame = usize::try_from(size.frame_bytes()).unwrap();
    assert_eq!(&pixels[200 * frame..200 * frame + 4], &200u32.to_le_bytes());
    assert_eq!(&pixels[frame + 4..2 * frame], &pixels[4..frame]);
}

#[test]
fn endoscopy_video_and_slide_generators_make_instances_dcmtk_reads() {
    let work = tempfile::tempdir().unwrap();
    let ids = Ids::new("TSU-ES-0001");
    let endo = dicom_files::vl_endoscopic(work.path(), &ids).unwrap();
    let slide_ids = ids.next_series();
    let slide = dicom_files::Slide { across: 4, down: 3 };
    let wsi = dicom_files::whole_slide(work.path(), &slide_ids, slide, true).unwrap();
    let raw_ids = ids.next_series();
    let raw = dicom_files::whole_slide(work.path(), &raw_ids, slide, false).unwrap();
    let video_ids = ids.next_series();
    let video = dicom_files::video_endoscopic(work.path(), &video_ids, 50).unwrap();
    for (path, class, ts, frames) in [
        (
            &video,
            dicom_files::VIDEO_ENDOSCOPIC_IMAGE_STORAGE,
            dicom_files::MPEG4_AVC_HP41,
            Some("50"),
        ),
        (
            &endo,
            dicom_files::VL_ENDOSCOPIC_IMAGE_STORAGE,
            dicom_files::JPEG_BASELINE,
            None,
        ),
        (
            &wsi,
            dicom_files::VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE,
            dicom_files::JPEG_BASELINE,
            Some("12"),
        ),
        (
            &raw,
            dicom_files::VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE,
            dicom_files::EXPLICIT_VR_LITTLE_ENDIAN,
            Some("12"),
        ),
    ] {
        let file = DicomFile::read(path).unwrap();
        assert_eq!(file.transfer_syntax(), ts, "{}", path.display());
        assert_eq!(file.string(0x0008, 0x0016).as_deref(), Some(class));
        assert!(
            [&ids, &slide_ids, &raw_ids, &video_ids]
                .iter()
                .any(
                    |i| file.string(0x0008, 0x0018).as_deref() == Some(i.sop_instance_uid.as_str())
                ),
            "the SOP Instance UID given"
        );
        assert_eq!(file.string(0x0028, 0x0008).as_deref(), frames);
        // dcmdump parses it whole, and dcmdjpeg decodes the JPEG frames.
        let output = Command::new("dcmdump")
            .args(["+E", "+L", "-q"])
            .arg(path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        if ts == dicom_files::JPEG_BASELINE {
            let out = work.path().join("decoded.dcm");
            let output = Command::new("dcmdjpeg")
                .arg(path)
                .arg(&out)
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
        }
    }
    // The video is x264's H.264 byte stream (Annex B: it starts with a start code).
    let file = DicomFile::read(&video).unwrap();
    let pixels = file.element(0x7FE0, 0x0010).unwrap();
    let stream = &pixels[16..];
    assert!(stream.starts_with(&[0, 0, 0, 1]), "{:?}", &stream[..8]);
    let len = std::fs::metadata(&raw).unwrap().len();
    assert!(
        len > slide.pixel_bytes() && len < slide.pixel_bytes() + 4096,
        "the uncompressed slide is its pixel data and a header: {len}"
    );
}
