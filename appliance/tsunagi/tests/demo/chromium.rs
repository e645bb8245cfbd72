//! Issue 19 in a real browser against the demo's box in the test network: Debian's
//! Chromium, headless, under chromedriver, started in the clinic's network namespace (a
//! computer at the clinic's front desk), opens the console on the box's clinic-LAN address
//! and logs in with the login the demo printed and a TOTP code of its secret (a wrong code
//! first: refused). A new patient's CT study, sent by dcmtk's storescu from the clinic LAN
//! to the box, is held for want of a consent; the desk registers the patient's consent
//! with the scanned form, picking a facility by name; the study then waits for the
//! network's patient ID, which the network's index gives (here the operator's `tsunagi
//! consent network-id`, as the demo does for its sample patient); then it is released and
//! counted at the hub's Orthanc under that ID. The desk withdraws the consent after the
//! confirmation, and the patient's next study is held, Orthanc still having only the one.
//! A form posted from another page and the session cookie replayed after logout are
//! refused. axe-core runs in every page, and every page is kept as a screenshot in
//! `target/console-screenshots/demo/`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::staff;
use hil_tests::browser::Browser;
use hil_tests::dicom_files::{Ids, japanese_ct};

/// What the demo printed and where it keeps its files.
pub(crate) struct Demo<'a> {
    /// The demo's output.
    pub(crate) text: &'a str,
    /// `TSUNAGI_DEMO_DIR`.
    pub(crate) dir: &'a Path,
    /// The tsunagi binary the demo runs.
    pub(crate) binary: &'a str,
}

/// The new patient of this test: not in the demo's sample data.
const PATIENT: &str = "0007001";
/// The network ID the network's index gives them.
const NETWORK_ID: &str = "DEMO-NET-0007001";
/// The demo box's DICOM port on the clinic LAN, and its AE title.
const DICOM_PORT: &str = "11112";
const AE_TITLE: &str = "TSUNAGI-DEMO";

fn after<'t>(text: &'t str, prefix: &str) -> &'t str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("the demo did not print {prefix:?}:\n{text}"))
}

/// The namespace the demo's "test network up" line names for `host` (hub, box, clinic).
fn namespace(text: &str, host: &str) -> String {
    let line = after(text, "demo: test network up: ");
    line.split(", ")
        .find_map(|part| part.strip_prefix(&format!("{host} ")))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no {host} namespace in {line:?}"))
        .to_owned()
}

/// The instances the hub's Orthanc holds under `patient_id`, counted on Orthanc's own side
/// (its REST API, reached on its loopback in the hub's namespace).
fn at_the_hub(hub: &str, patient_id: &str) -> Vec<String> {
    let query = serde_json::json!({ "Level": "Instance", "Query": { "PatientID": patient_id } });
    let out = Command::new("ip")
        .args(["netns", "exec", hub, "curl", "-sf", "--max-time", "20"])
        .args(["-X", "POST", "--data-binary"])
        .arg(query.to_string())
        .arg(format!(
            "http://127.0.0.1:{}/tools/find",
            hil_tests::orthanc::HTTP_PORT
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the hub's Orthanc did not answer: {out:?}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the browser session; on a thread of its own, which joins the clinic's namespace.
pub(crate) fn the_staff_work_the_demo_console_in_chromium(demo: &Demo<'_>) {
    let text = demo.text.to_owned();
    let dir = demo.dir.to_owned();
    let binary = demo.binary.to_owned();
    std::thread::spawn(move || in_the_clinic(&text, &dir, &binary))
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

fn in_the_clinic(text: &str, dir: &Path, binary: &str) {
    let (hub, clinic) = (namespace(text, "hub"), namespace(text, "clinic"));
    let url = after(text, "demo: the clinic console: ")
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    let base = url.trim_end_matches('/').to_owned();
    let box_addr = base.trim_start_matches("https://").to_owned();
    let (name, rest) = after(text, "demo: console login (demo only): ")
        .split_once(" / ")
        .unwrap();
    let (password, rest) = rest.split_once(", TOTP secret ").unwrap();
    let secret = console::accounts::totp_secret(rest.split(' ').next().unwrap()).unwrap();
    // The browser trusts the console's self-signed certificate by its public key alone, as
    // the staff check its fingerprint on the provisioning sheet.
    let cert = dir
        .join("state")
        .join("console")
        .join(console::tls::SELF_SIGNED_CERT);
    let der = console::tls::certs(&cert).unwrap().remove(0);
    let pin = console::tls::spki_sha256(&der).unwrap();

    // This thread, and the chromedriver, Chromium and storescu it starts, are on the
    // clinic's LAN from here on.
    let netns = std::fs::File::open(format!("/run/netns/{clinic}")).unwrap();
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let mut b = Browser::start(&pin, &staff::screenshots().join("demo")).unwrap();
    let mut checked = Vec::new();
    let mut look = |b: &mut Browser, page: &str| checked.push(b.look(page).unwrap());

    // Not logged in: the login page. A wrong TOTP code is refused; the right one logs in.
    // The code is the next step's: the demo test has just logged in with this step's, and a
    // code is taken once.
    b.goto(&url).unwrap();
    b.wait_for_url("/login").unwrap();
    look(&mut b, "login");
    let login = |b: &Browser, code: &str| {
        b.goto(&format!("{base}/login")).unwrap();
        b.fill("#name", name).unwrap();
        b.fill("#password", password).unwrap();
        b.fill("#code", code).unwrap();
        b.press("ログイン").unwrap();
    };
    let code = |step: u64| console::accounts::totp_code(&secret, step);
    let step = staff::totp_step_now() + 1;
    let wrong = if code(step) == "000000" {
        "111111"
    } else {
        "000000"
    };
    login(&b, wrong);
    b.wait_for("ログインできませんでした").unwrap();
    look(&mut b, "login-refused");
    login(&b, &code(step));
    b.wait_for_url("/").unwrap();
    let page = b.wait_for("<h1>接続状態</h1>").unwrap();
    assert!(page.contains("接続中（20"), "{page}");
    look(&mut b, "status");
    let session = b.cookie(console::web::SESSION_COOKIE).unwrap().unwrap();

    // A new patient's CT study from the modality: held, no consent.
    let files = tempfile::tempdir().unwrap();
    let first = japanese_ct(files.path(), &Ids::new(PATIENT)).unwrap();
    staff::storescu(AE_TITLE, &box_addr, DICOM_PORT, &[first]);
    let held_row = format!(">{PATIENT}</td>");
    b.reload_until(&format!("{base}/held"), Duration::from_secs(60), |p| {
        p.contains(&held_row) && p.contains("同意がありません")
    })
    .unwrap();
    look(&mut b, "held");

    // 患者: the registration with the scanned form, a facility picked by name.
    b.click("a[href='/patients']").unwrap();
    b.wait_for_url("/patients").unwrap();
    b.click("a[href='/patients/new']").unwrap();
    b.wait_for("id=\"family_kana\"").unwrap();
    look(&mut b, "registration");
    let scan = files.path().join("consent-form.pdf");
    std::fs::write(&scan, b"%PDF-1.4 the signed consent form\n%%EOF\n").unwrap();
    staff::register(
        &b,
        &staff::Registration {
            patient: PATIENT,
            names: ["山田", "太郎", "ヤマダ", "タロウ"],
            birth_date: "1948-11-03",
            sex: "male",
            facility: "新宿総合病院（1312345679）",
            form: &scan,
        },
    );
    look(&mut b, "patient-registered");

    // The consent covers the study now; it waits for the network's patient ID (名寄せ).
    b.reload_until(&format!("{base}/held"), Duration::from_secs(60), |p| {
        p.contains(&held_row) && p.contains("ネットワークの患者ID（名寄せ）を待っています")
    })
    .unwrap();
    look(&mut b, "held-waiting-for-network-id");
    assert!(at_the_hub(&hub, NETWORK_ID).is_empty());
    // The network's index gives the patient a network ID.
    let out = Command::new(binary)
        .args(["consent", "network-id", PATIENT, NETWORK_ID, "--config"])
        .arg(dir.join("tsunagi.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Released, and stored at the hub's Orthanc under the network ID.
    let deadline = Instant::now() + Duration::from_secs(90);
    let stored = loop {
        let stored = at_the_hub(&hub, NETWORK_ID);
        if !stored.is_empty() {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "the released study never reached the hub's Orthanc"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(stored.len(), 1, "{stored:?}");
    b.reload_until(&format!("{base}/held"), Duration::from_secs(60), |p| {
        !p.contains(&held_row)
    })
    .unwrap();
    look(&mut b, "held-released");

    // The patient, found by kana, shows the network ID; withdrawn after the confirmation.
    b.click("a[href='/patients']").unwrap();
    b.fill("#query", "やまだ").unwrap();
    b.press("検索").unwrap();
    b.wait_for("検索結果").unwrap();
    look(&mut b, "patients-found");
    b.press("開く").unwrap();
    let page = b.wait_for("同意を撤回する…").unwrap();
    assert!(page.contains(NETWORK_ID), "{page}");
    look(&mut b, "patient");
    b.press("同意を撤回する…").unwrap();
    b.wait_for("同意の撤回の確認").unwrap();
    look(&mut b, "withdraw-confirm");
    b.press("撤回する").unwrap();
    let page = b.wait_for("同意を撤回しました").unwrap();
    assert!(page.contains("撤回済み"), "{page}");
    look(&mut b, "patient-withdrawn");

    // The patient's next study: held, and why; the hub still has only the first.
    let next = japanese_ct(files.path(), &Ids::new(PATIENT)).unwrap();
    staff::storescu(AE_TITLE, &box_addr, DICOM_PORT, &[next]);
    b.reload_until(&format!("{base}/held"), Duration::from_secs(60), |p| {
        p.matches(held_row.as_str()).count() == 1 && p.contains("同意が撤回されています")
    })
    .unwrap();
    look(&mut b, "held-after-withdrawal");
    assert_eq!(
        at_the_hub(&hub, NETWORK_ID),
        stored,
        "nothing more at the hub"
    );

    // A form posted from another page (not the console's): refused, and nothing changed.
    staff::a_cross_site_post_is_refused(&b, &base);
    // Logout; the old session cookie, put back by hand, opens nothing.
    staff::a_replayed_session_cookie_is_refused(&b, &base, &session);
    drop(b);
    println!(
        "the demo's console in Chromium, axe-core page by page:\n  {}",
        checked.join("\n  ")
    );
}
