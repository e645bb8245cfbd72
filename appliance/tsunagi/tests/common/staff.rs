//! What the staff do in the console in a real browser (issue 19), shared by the browser
//! tests (`console_browser.rs`, and `demo.rs` against the demo's box).

use std::path::{Path, PathBuf};

use hil_tests::browser::Browser;

/// A patient's registration at the desk: 参加同意 with the scanned form, disclosed to one
/// facility picked by name, for images.
pub struct Registration<'a> {
    pub patient: &'a str,
    /// Family and given name in kanji, then in katakana.
    pub names: [&'a str; 4],
    pub birth_date: &'a str,
    /// `female` or `male`.
    pub sex: &'a str,
    /// The facility as the list names it: `名称（コード）`.
    pub facility: &'a str,
    /// The scanned consent form.
    pub form: &'a Path,
}

/// Fills in the registration page (open in `b`) and registers; the patient's page.
pub fn register(b: &Browser, r: &Registration<'_>) -> String {
    let fields = [
        "#family_kanji",
        "#given_kanji",
        "#family_kana",
        "#given_kana",
    ];
    b.fill("#patient", r.patient).unwrap();
    for (field, value) in fields.into_iter().zip(r.names) {
        b.fill(field, value).unwrap();
    }
    b.set_value("#birth_date", r.birth_date).unwrap();
    b.click(&format!("input[name='sex'][value='{}']", r.sex))
        .unwrap();
    b.click("input[name='scope'][value='facilities']").unwrap();
    b.check(r.facility).unwrap();
    b.click("input[name='category'][value='images']").unwrap();
    b.fill("#form", r.form.to_str().unwrap()).unwrap();
    b.press("登録する").unwrap();
    let page = b.wait_for("参加同意を登録しました").unwrap();
    assert!(page.contains("参加中"), "{page}");
    assert!(page.contains(r.birth_date), "{page}");
    assert!(page.contains(r.facility), "{page}");
    page
}

/// A form posted to the console's `base` from another page (a `data:` URL, not the
/// console's) is refused, and the session goes on.
pub fn a_cross_site_post_is_refused(b: &Browser, base: &str) {
    let evil = format!(
        "data:text/html;charset=utf-8,<form method=post action='{base}/logout'><input name=csrf value=x><button>go</button></form>"
    );
    b.goto(&evil).unwrap();
    b.press("go").unwrap();
    b.wait_for("このページの外から送られた操作は受け付けません")
        .unwrap();
    // Still logged in: the refused post changed nothing.
    b.goto(&format!("{base}/")).unwrap();
    b.wait_for("ログアウト").unwrap();
}

/// Logs out; the old session cookie (`session`), put back by hand, opens nothing.
pub fn a_replayed_session_cookie_is_refused(b: &Browser, base: &str, session: &str) {
    b.press("ログアウト").unwrap();
    b.wait_for_url("/login").unwrap();
    b.set_cookie(console::web::SESSION_COOKIE, session).unwrap();
    b.goto(&format!("{base}/patients")).unwrap();
    assert!(
        b.url().unwrap().ends_with("/login"),
        "a replayed session cookie opened {}",
        b.url().unwrap()
    );
}

/// The TOTP time step of now.
pub fn totp_step_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / console::accounts::TOTP_STEP
}

/// Where the browser tests keep their screenshots: `target/console-screenshots` (beside
/// the test binaries).
pub fn screenshots() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/THIS → target
    exe.ancestors().nth(3).unwrap().join("console-screenshots")
}

/// dcmtk's storescu sends `files` to `host`:`port` (called AE `ae`), as the clinic's
/// modality does, from the network namespace of the calling thread.
pub fn storescu(ae: &str, host: &str, port: &str, files: &[PathBuf]) {
    let out = std::process::Command::new("storescu")
        .args(["-aec", ae, host, port])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "storescu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
