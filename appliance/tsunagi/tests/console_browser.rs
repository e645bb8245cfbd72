//! Issue 19 in a real browser: Debian's Chromium, headless, under chromedriver, against
//! the console of a running supervisor (with the consent service, its network FHIR server,
//! the DICOM bridge with a real Orthanc as the network PACS, and the ATNA repository), all
//! in Orthanc's network namespace, which the test joins. The first administrator sets up, a
//! desk account logs in with password and TOTP, sees two CT studies sent by dcmtk's
//! storescu held for want of a consent on 保留中 and discards one after the confirmation,
//! registers the other patient's consent with the scanned form, picking a facility by name,
//! and sees their study released and stored at Orthanc, opens the patient, withdraws after
//! the confirmation, and sees the patient's next study held; a wrong TOTP code, the session cookie
//! replayed after logout and a form posted from another page are refused. axe-core runs in
//! every page (no serious or critical violation), and every page is kept as a screenshot
//! in `target/console-screenshots/`.
#![expect(
    clippy::disallowed_methods,
    reason = "a plain test thread drives the browser and polls"
)]

mod common;

use std::time::Duration;

use common::*;
use hil_tests::browser::Browser;
use hil_tests::dicom_files::{Ids, japanese_ct};
use hil_tests::orthanc::Orthanc;
use nix::sys::signal::Signal;

fn code(secret: &[u8], step: u64) -> String {
    console::accounts::totp_code(secret, step)
}

fn base32(text: &str) -> Vec<u8> {
    console::accounts::totp_secret(text).unwrap()
}

/// The page's accessibility, checked, and its screenshot kept.
fn look(b: &mut Browser, name: &str, checked: &mut Vec<String>) {
    checked.push(b.look(name).unwrap());
}

/// Opens `url` again until `ok` says its page is as wanted (at most 60 s); the page.
fn reload_until(b: &Browser, url: &str, ok: impl Fn(&str) -> bool) -> String {
    b.reload_until(url, Duration::from_secs(60), ok).unwrap()
}

#[test]
fn the_staff_work_the_console_in_chromium_and_every_page_is_accessible() {
    // Kept whole to the end: its rsyslog and audit files live as long as it.
    // With the DICOM bridge and a real Orthanc as the network PACS. Orthanc listens on
    // every address of its own network namespace; this test joins it (this thread, and all
    // it starts: the clinic, its FHIR server and rsyslog, chromedriver and Chromium), so
    // nothing of it is reachable from elsewhere.
    let pacs = Orthanc::start_for_test();
    let netns = std::fs::File::open(format!("/run/netns/{}", pacs.netns())).unwrap();
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let dicom_port = free_port();
    let mut clinic = ConsoleClinic::start_with(
        &format!(
            "[dicom]\nlisten = \"127.0.0.1:{dicom_port}\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"{}\"\naddress = \"{}\"\n",
            pacs.ae_title(),
            pacs.dicom_addr()
        ),
        &["dicom"],
    );
    let h = &mut clinic.h;
    let setup_code = clinic.setup_code.clone();
    let cert = clinic.cert.clone();
    let base = clinic.base.clone();
    let der = console::tls::certs(&cert).unwrap().remove(0);
    let pin = console::tls::spki_sha256(&der).unwrap();
    let mut b = Browser::start(&pin, &staff::screenshots()).unwrap();
    let mut checked = Vec::new();

    // Not logged in: the login page, which offers the first administrator's setup.
    b.goto(&format!("{base}/")).unwrap();
    b.wait_for_url("/login").unwrap();
    look(&mut b, "login", &mut checked);
    b.click("a[href='/setup']").unwrap();
    look(&mut b, "setup", &mut checked);
    let secret = base32(&b.text("main code").unwrap());
    let step = staff::totp_step_now();
    let password = "correct horse battery staple";
    b.fill("#setup_code", &setup_code).unwrap();
    b.fill("#name", "admin").unwrap();
    b.fill("#password", password).unwrap();
    b.fill("#password_again", password).unwrap();
    b.fill("#code", &code(&secret, step)).unwrap();
    b.press("登録").unwrap();
    b.wait_for("最初の管理者を登録しました").unwrap();
    look(&mut b, "setup-done", &mut checked);

    // A wrong TOTP code is refused; the right one (the next step: the setup used this one)
    // logs in.
    let login = |b: &Browser, name: &str, password: &str, code: &str| {
        b.goto(&format!("{base}/login")).unwrap();
        b.fill("#name", name).unwrap();
        b.fill("#password", password).unwrap();
        b.fill("#code", code).unwrap();
        b.press("ログイン").unwrap();
    };
    let wrong = if code(&secret, step + 1) == "000000" {
        "111111"
    } else {
        "000000"
    };
    login(&b, "admin", password, wrong);
    b.wait_for("ログインできませんでした").unwrap();
    look(&mut b, "login-refused", &mut checked);
    login(&b, "admin", password, &code(&secret, step + 1));
    b.wait_for_url("/").unwrap();
    b.wait_for("<h1>接続状態</h1>").unwrap();
    look(&mut b, "status", &mut checked);
    // 監査: the decision trail, empty yet, verified.
    b.click("a[href='/audit']").unwrap();
    b.wait_for("改ざんは見つかりませんでした").unwrap();
    look(&mut b, "audit", &mut checked);
    // SS-MIX2 の点検: this box does not sync SS-MIX2, and says so.
    b.click("a[href='/ssmix2']").unwrap();
    b.wait_for("SS-MIX2 の同期を使用していません").unwrap();
    look(&mut b, "ssmix2", &mut checked);

    // The administrator adds a desk account.
    b.click("a[href='/accounts']").unwrap();
    look(&mut b, "accounts", &mut checked);
    let desk_password = "the desk's own password";
    b.fill("#name", "uketsuke1").unwrap();
    b.fill("#password", desk_password).unwrap();
    b.press("追加").unwrap();
    b.wait_for("uketsuke1（事務）を追加しました").unwrap();
    let desk_secret = base32(&b.text("main code").unwrap());
    look(&mut b, "account-added", &mut checked);
    b.press("ログアウト").unwrap();

    // The desk account logs in.
    login(
        &b,
        "uketsuke1",
        desk_password,
        &code(&desk_secret, staff::totp_step_now()),
    );
    b.wait_for("uketsuke1（事務）").unwrap();
    let session = b.cookie(console::web::SESSION_COOKIE).unwrap().unwrap();

    // A CT study of 0001234 (one instance) and one of 0005678, from dcmtk's storescu as a
    // modality sends them: held, neither patient has a consent. The desk discards the
    // second after the confirmation.
    let files = tempfile::tempdir().unwrap();
    let sent: Vec<_> = ["0001234", "0005678"]
        .iter()
        .map(|p| japanese_ct(files.path(), &Ids::new(p)).unwrap())
        .collect();
    staff::storescu("TSUNAGI-TEST", "127.0.0.1", &dicom_port.to_string(), &sent);
    let held = reload_until(&b, &format!("{base}/held"), |p| {
        p.matches("同意がありません").count() == 2
    });
    assert!(
        held.contains("0001234") && held.contains("0005678"),
        "{held}"
    );
    assert!(
        held.contains("この装置では SS-MIX2 の同期を使用していません"),
        "{held}"
    );
    look(&mut b, "held", &mut checked);
    b.click("tbody tr:nth-child(2) form[action='/held/discard'] button")
        .unwrap();
    b.wait_for("画像の破棄の確認").unwrap();
    look(&mut b, "discard-confirm", &mut checked);
    b.press("破棄する").unwrap();
    let page = b.wait_for("画像を破棄しました").unwrap();
    assert!(!page.contains("0005678"), "{page}");

    // 患者: the search finds nobody; the registration with the scanned form.
    b.click("a[href='/patients']").unwrap();
    look(&mut b, "patients", &mut checked);
    b.fill("#query", "やまだ").unwrap();
    b.press("検索").unwrap();
    b.wait_for("該当する患者はいません").unwrap();
    b.click("a[href='/patients/new']").unwrap();
    look(&mut b, "registration", &mut checked);
    let scan_dir = tempfile::tempdir().unwrap();
    let scan = scan_dir.path().join("consent-form.pdf");
    std::fs::write(&scan, b"%PDF-1.4 the signed consent form\n%%EOF\n").unwrap();
    staff::register(
        &b,
        &staff::Registration {
            patient: "0001234",
            names: ["山田", "花子", "ヤマダ", "ハナコ"],
            birth_date: "1950-04-01",
            sex: "female",
            facility: "新宿総合病院（1312345679）",
            form: &scan,
        },
    );
    look(&mut b, "patient-registered", &mut checked);
    // 公開設定: one more facility, picked by name.
    b.select("#facility-add", "東京第一病院（1312345670）")
        .unwrap();
    b.press("公開する").unwrap();
    let page = b
        .wait_for("東京第一病院（1312345670） に公開しました")
        .unwrap();
    assert!(
        page.contains("新宿総合病院（1312345679）、東京第一病院（1312345670）")
            || page.contains("東京第一病院（1312345670）、新宿総合病院（1312345679）"),
        "{page}"
    );
    b.press("受付票を印刷する").unwrap();
    b.wait_for("参加同意を受け付けました").unwrap();
    look(&mut b, "receipt", &mut checked);
    // The held study is released at once and stored at the network PACS: counted at
    // Orthanc, and gone from 保留中.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while pacs.instances().unwrap().len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the released study never reached Orthanc:\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let stored = pacs.instances().unwrap();
    let arrived =
        hil_tests::dicom_files::DicomFile::parse(pacs.instance_file(&stored[0]).unwrap()).unwrap();
    assert_eq!(arrived.string(0x0010, 0x0020).as_deref(), Some("0001234"));
    reload_until(&b, &format!("{base}/held"), |p| {
        !p.contains(">0001234</td>") && p.contains("止まっている画像はありません")
    });
    look(&mut b, "held-released", &mut checked);

    // Found by kana; withdrawn after the confirmation.
    b.click("a[href='/patients']").unwrap();
    b.fill("#query", "やまだ").unwrap();
    b.press("検索").unwrap();
    b.wait_for("検索結果").unwrap();
    look(&mut b, "patients-found", &mut checked);
    b.press("開く").unwrap();
    // The patient's page, loaded (a press does not wait for the next page).
    b.wait_for("同意を撤回する…").unwrap();
    b.press("同意を撤回する…").unwrap();
    b.wait_for("同意の撤回の確認").unwrap();
    look(&mut b, "withdraw-confirm", &mut checked);
    b.press("撤回する").unwrap();
    let page = b.wait_for("同意を撤回しました").unwrap();
    assert!(page.contains("撤回済み"), "{page}");
    look(&mut b, "patient-withdrawn", &mut checked);
    // The patient's next study, from the modality after the withdrawal: held, and why (a
    // new instance is listed only once it is held: its consent is decided before any
    // attempt to send it); Orthanc still has only the study released before.
    let next = japanese_ct(files.path(), &Ids::new("0001234")).unwrap();
    staff::storescu(
        "TSUNAGI-TEST",
        "127.0.0.1",
        &dicom_port.to_string(),
        &[next],
    );
    reload_until(&b, &format!("{base}/held"), |p| {
        p.matches(">0001234</td>").count() == 1 && p.contains("同意が撤回されています")
    });
    assert_eq!(
        pacs.instances().unwrap(),
        stored,
        "nothing more at the PACS"
    );
    look(&mut b, "held-after-withdrawal", &mut checked);

    // English, one link away; the same pages in English, then Japanese again.
    b.click("a[href='/lang/en']").unwrap();
    b.wait_for("<title>Status — tsunagi clinic console</title>")
        .unwrap();
    look(&mut b, "status-en", &mut checked);
    b.click("a[href='/held']").unwrap();
    b.wait_for("Withdrawn")
        .unwrap_or_else(|_| b.wait_for("withdrawn").unwrap());
    look(&mut b, "held-en", &mut checked);
    b.click("a[href='/patients']").unwrap();
    b.fill("#query", "やまだ").unwrap();
    b.press("Search").unwrap();
    b.wait_for("0001234").unwrap();
    look(&mut b, "patients-found-en", &mut checked);
    b.click("a[href='/lang/ja']").unwrap();
    b.wait_for("<title>接続状態 — つなぎ 院内コンソール</title>")
        .unwrap();

    // A form posted from another page (here a page of its own, not the console's): refused.
    staff::a_cross_site_post_is_refused(&b, &base);
    b.wait_for("uketsuke1（事務）").unwrap();
    // Logout; the old session cookie, put back by hand, opens nothing.
    staff::a_replayed_session_cookie_is_refused(&b, &base, &session);
    drop(b);
    println!("axe-core, page by page:\n  {}", checked.join("\n  "));
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}
