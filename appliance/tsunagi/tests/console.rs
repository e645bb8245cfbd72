//! Issue 19, the clinic console over HTTPS as a browser uses it (`console_browser.rs` is
//! the same in a real Chromium): the first administrator registered with the one-time
//! setup code and a TOTP secret; a login with password and TOTP; the 接続状態 page from
//! the supervisor's status; and what must be refused: a wrong TOTP code, a session cookie
//! replayed after logout, a cross-site form post, a login to a locked account. Each login,
//! failure and logout reaches a real rsyslog as an ATNA User Authentication message.
//!
//! The consent desk (患者): a participation consent registered with its scanned form (whose
//! SHA-256 the consent service records), found by kana, changed facility by facility,
//! linked to another facility's ID, withdrawn after a confirmation, with a receipt; a
//! physician may look but not change; each change reaches rsyslog as a Patient Record event
//! naming the desk account.
#![expect(
    clippy::disallowed_methods,
    reason = "a plain test thread drives the console and polls the audit repository"
)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hil_tests::dicom_files::{Ids, japanese_ct};

use common::*;
use nix::sys::signal::Signal;
use reqwest::blocking::{Client, Response};
use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};

/// A browser of the clinic LAN: it trusts the console's self-signed certificate (as the
/// fingerprint on the provisioning sheet lets the staff do) and keeps its cookies.
struct Browser {
    client: Client,
    base: String,
    cookies: Vec<(String, String)>,
}

impl Browser {
    fn new(base: &str, cert: &std::path::Path) -> Browser {
        let mut roots = rustls::RootCertStore::empty();
        for c in console::tls::certs(cert).unwrap() {
            roots.add(c).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Browser {
            client,
            base: base.to_owned(),
            cookies: Vec::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&mut self, response: &Response) {
        for set in response.headers().get_all(SET_COOKIE) {
            let set = set.to_str().unwrap();
            for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
                assert!(set.contains(attribute), "{set}");
            }
            let (name, value) = set.split(';').next().unwrap().split_once('=').unwrap();
            self.cookies.retain(|(n, _)| n != name);
            if !value.is_empty() {
                self.cookies.push((name.to_owned(), value.to_owned()));
            }
        }
    }

    fn get(&mut self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .send()
            .unwrap();
        self.keep(&response);
        let status = response.status().as_u16();
        let location = location(&response);
        (status, location.unwrap_or_else(|| response.text().unwrap()))
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let origin = self.base.clone();
        self.post_from(path, form, &origin)
    }

    fn post_from(&mut self, path: &str, form: &[(&str, &str)], origin: &str) -> (u16, String) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .header(ORIGIN, origin)
            .form(form)
            .send()
            .unwrap();
        self.keep(&response);
        let status = response.status().as_u16();
        let location = location(&response);
        (status, location.unwrap_or_else(|| response.text().unwrap()))
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.cookies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

/// A redirect's target, as "→ PATH".
fn location(response: &Response) -> Option<String> {
    response
        .headers()
        .get(reqwest::header::LOCATION)
        .map(|l| format!("→ {}", l.to_str().unwrap()))
}

/// The value of hidden input `name` in a page.
fn hidden(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
        + marker.len();
    page[start..start + page[start..].find('"').unwrap()].to_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn totp(secret: &[u8], step: u64) -> String {
    console::accounts::totp_code(secret, step)
}

fn base32_decode(text: &str) -> Vec<u8> {
    console::accounts::totp_secret(text).unwrap()
}

#[test]
fn the_staff_set_up_log_in_see_the_box_and_every_misuse_is_refused_and_audited() {
    let (rsyslog, audit, _audit_files) = audit_repository(None, None);
    let port = free_port();
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = true\n\n[console]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nlockout-after = 3\n{audit}"
    ));
    // The operator's one-time code for the first administrator.
    let setup_code = h.cli(&["console", "setup-code"]);
    h.start();
    h.wait_for("the console ready", Duration::from_secs(30), |s| {
        state_of(s, "console") == "ready"
    });
    // The fingerprint the operator prints is the certificate the console serves.
    let out = Command::new(BIN)
        .args(["console", "fingerprint", "--config"])
        .arg(&h.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = h
        .state_dir()
        .join("console")
        .join(console::tls::SELF_SIGNED_CERT);
    let fingerprint = console::tls::fingerprint(&console::tls::certs(&cert).unwrap()[0]);
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), fingerprint);
    let base = format!("https://127.0.0.1:{port}");
    let mut b = Browser::new(&base, &cert);

    // Not logged in: the status page sends to the login page, which offers the setup.
    assert_eq!(b.get("/"), (303, "→ /login".to_owned()));
    let (status, page) = b.get("/login");
    assert_eq!(status, 200);
    assert!(
        page.contains("<html lang=\"ja\">") && page.contains("ログイン"),
        "{page}"
    );
    assert!(page.contains("href=\"/setup\""), "{page}");

    // The setup: a wrong code is refused; the right one with the TOTP secret's code works.
    let (status, page) = b.get("/setup");
    assert_eq!(status, 200, "{page}");
    let secret_text = hidden(&page, "secret");
    let secret = base32_decode(&secret_text);
    assert_eq!(secret.len(), console::accounts::TOTP_SECRET_LEN);
    let step = unix_now() / console::accounts::TOTP_STEP;
    let password = "correct horse battery staple";
    let setup = |b: &mut Browser, code: &str, page: &str| {
        b.post(
            "/setup",
            &[
                ("csrf", &hidden(page, "csrf")),
                ("secret", &hidden(page, "secret")),
                ("setup_code", code),
                ("name", "admin"),
                ("password", password),
                ("password_again", password),
                ("code", &totp(&base32_decode(&hidden(page, "secret")), step)),
            ],
        )
    };
    let (status, page) = setup(&mut b, "AAAA-BBBB-CCCC-DDDD", &page);
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("初期設定コードが違う"), "{page}");
    assert_eq!(hidden(&page, "secret"), secret_text);
    let (status, done) = setup(&mut b, &setup_code.to_lowercase(), &page);
    assert_eq!(status, 200, "{done}");
    assert!(done.contains("最初の管理者を登録しました"), "{done}");
    // Once only.
    assert_eq!(b.get("/setup").0, 404);

    // A login: a wrong code is refused; the password with the next code logs in (the setup
    // used this step's).
    let (_, page) = b.get("/login");
    let login = |b: &mut Browser, page: &str, code: &str| {
        b.post(
            "/login",
            &[
                ("csrf", &hidden(page, "csrf")),
                ("name", "admin"),
                ("password", password),
                ("code", code),
            ],
        )
    };
    let wrong = if totp(&secret, step + 1) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let (status, page) = login(&mut b, &page, wrong);
    assert_eq!(status, 401, "{page}");
    assert!(page.contains("ログインできませんでした"), "{page}");
    assert!(b.cookie(console::web::SESSION_COOKIE).is_none());
    let (status, to) = login(&mut b, &page, &totp(&secret, step + 1));
    assert_eq!((status, to.as_str()), (303, "→ /"));
    let session = b.cookie(console::web::SESSION_COOKIE).unwrap();

    // 接続状態, from the supervisor's status.
    let (status, page) = b.get("/");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>接続状態</h1>"), "{page}");
    assert!(
        page.contains("院内コンソール") && page.contains("死活監視"),
        "{page}"
    );
    assert!(page.contains("admin（管理者）"), "{page}");

    // The administrator adds a desk account; its owner logs in with the secret shown once.
    let (status, page) = b.get("/accounts");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>アカウント</h1>"), "{page}");
    let admin_csrf = hidden(&page, "csrf");
    let desk_password = "the desk's own password";
    let (status, page) = b.post(
        "/accounts/add",
        &[
            ("csrf", &admin_csrf),
            ("name", "desk1"),
            ("role", "desk"),
            ("password", desk_password),
        ],
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("desk1（事務）を追加しました"), "{page}");
    let start = page.find("<code>").unwrap() + "<code>".len();
    let desk_secret = base32_decode(&page[start..start + page[start..].find('<').unwrap()]);
    let mut desk = Browser::new(&base, &cert);
    let (_, page) = desk.get("/login");
    let (status, to) = desk.post(
        "/login",
        &[
            ("csrf", &hidden(&page, "csrf")),
            ("name", "desk1"),
            ("password", desk_password),
            (
                "code",
                &totp(&desk_secret, unix_now() / console::accounts::TOTP_STEP),
            ),
        ],
    );
    assert_eq!((status, to.as_str()), (303, "→ /"));
    let (status, page) = desk.get("/");
    assert_eq!(status, 200);
    assert!(
        page.contains("desk1（事務）") && !page.contains("href=\"/accounts\""),
        "{page}"
    );
    // Only an administrator manages accounts.
    assert_eq!(desk.get("/accounts").0, 403);
    let (status, _) = desk.post(
        "/accounts/add",
        &[
            ("csrf", &hidden(&page, "csrf")),
            ("name", "desk2"),
            ("role", "admin"),
            ("password", desk_password),
        ],
    );
    assert_eq!(status, 403);
    // A role change ends the account's sessions; the last administrator stays one.
    let (status, page) = b.post(
        "/accounts/change",
        &[
            ("csrf", &admin_csrf),
            ("name", "desk1"),
            ("action", "role"),
            ("role", "physician"),
        ],
    );
    assert_eq!(status, 200, "{page}");
    assert_eq!(desk.get("/"), (303, "→ /login".to_owned()));
    let (_, page) = b.post(
        "/accounts/change",
        &[
            ("csrf", &admin_csrf),
            ("name", "admin"),
            ("action", "remove"),
        ],
    );
    assert!(page.contains("最後の管理者は削除できません"), "{page}");

    // A form posted from another site is refused, and changes nothing.
    let csrf = hidden(&page, "csrf");
    let (status, page) = b.post_from("/logout", &[("csrf", &csrf)], "https://evil.example");
    assert_eq!(status, 403, "{page}");
    let (status, page) = b.post("/logout", &[("csrf", "not the token")]);
    assert_eq!(status, 403, "{page}");
    assert_eq!(b.get("/").0, 200);

    // Logout; the old cookie is worth nothing after.
    let (status, to) = b.post("/logout", &[("csrf", &csrf)]);
    assert_eq!((status, to.as_str()), (303, "→ /login"));
    assert!(b.cookie(console::web::SESSION_COOKIE).is_none());
    b.cookies
        .push((console::web::SESSION_COOKIE.to_owned(), session.clone()));
    assert_eq!(b.get("/"), (303, "→ /login".to_owned()));

    // Three failures in a row lock the account (lockout-after = 3): the first above, and
    // two more; then the page says it is locked.
    let mut page = b.get("/login").1;
    for _ in 0..2 {
        let (status, next) = login(&mut b, &page, wrong);
        assert_eq!(status, 401, "{next}");
        page = next;
    }
    let (status, page) = login(&mut b, &page, wrong);
    assert_eq!(status, 401, "{page}");
    assert!(page.contains("ロックされています"), "{page}");

    // The ATNA trail: User Authentication (110114), a Login (110122) that succeeded, the
    // failed ones, and a Logout (110123).
    let of = |ms: &[String], kind: &str, outcome: &str| {
        ms.iter()
            .filter(|m| {
                m.contains("csd-code=\"110114\"")
                    && m.contains(&format!("csd-code=\"{kind}\""))
                    && m.contains(&format!("EventOutcomeIndicator=\"{outcome}\""))
                    && m.contains("UserID=\"admin\"")
            })
            .count()
    };
    // And the administrator's changes: Security Roles Changed (110136), the account added
    // and its role changed.
    let roles = |ms: &[String]| {
        ms.iter()
            .filter(|m| {
                m.contains("csd-code=\"110113\"")
                    && m.contains("csd-code=\"110136\"")
                    && m.contains("ParticipantObjectID=\"desk1\"")
            })
            .count()
    };
    let messages = audit_messages_until(
        &rsyslog,
        "the console's logins",
        Duration::from_secs(30),
        |ms| {
            of(ms, "110122", "0") == 1
                && of(ms, "110122", "4") >= 4
                && of(ms, "110123", "0") == 1
                && roles(ms) == 2
                && ms.iter().any(|m| {
                    m.contains("csd-code=\"110137\"")
                        && m.contains("ParticipantObjectID=\"admin\"")
                        && m.contains("locked after 3 failed logins")
                })
        },
    );
    assert!(
        messages.iter().all(|m| !m.contains(password)),
        "a password in the trail"
    );
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

impl Browser {
    /// A `multipart/form-data` POST (a form with a file), as a browser sends one.
    fn post_multipart(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        file: (&str, &str, &[u8]),
    ) -> (u16, String) {
        let boundary = "----tsunagi-test-boundary-7f3a";
        let mut body = Vec::new();
        for (name, value) in fields {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
        let (name, filename, bytes) = file;
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/pdf\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .header(ORIGIN, self.base.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .unwrap();
        self.keep(&response);
        let status = response.status().as_u16();
        let location = location(&response);
        (status, location.unwrap_or_else(|| response.text().unwrap()))
    }
}

/// The first administrator, set up with the operator's code, logged in.
fn administrator(h: &Harness, base: &str, cert: &std::path::Path, setup_code: &str) -> Browser {
    let mut b = Browser::new(base, cert);
    let (_, page) = b.get("/setup");
    let secret = base32_decode(&hidden(&page, "secret"));
    let step = unix_now() / console::accounts::TOTP_STEP;
    let password = "correct horse battery staple";
    let (status, done) = b.post(
        "/setup",
        &[
            ("csrf", &hidden(&page, "csrf")),
            ("secret", &hidden(&page, "secret")),
            ("setup_code", setup_code),
            ("name", "admin"),
            ("password", password),
            ("password_again", password),
            ("code", &totp(&secret, step)),
        ],
    );
    assert_eq!(status, 200, "{done}");
    let (_, page) = b.get("/login");
    let (status, to) = b.post(
        "/login",
        &[
            ("csrf", &hidden(&page, "csrf")),
            ("name", "admin"),
            ("password", password),
            ("code", &totp(&secret, step + 1)),
        ],
    );
    assert_eq!((status, to.as_str()), (303, "→ /"), "{}", h.log_text());
    b
}

/// An account the administrator adds with `role`, logged in in a browser of its own.
fn staff_member(
    admin: &mut Browser,
    base: &str,
    cert: &std::path::Path,
    name: &str,
    role: &str,
) -> Browser {
    let (_, page) = admin.get("/accounts");
    let password = "a staff member's password";
    let (status, page) = admin.post(
        "/accounts/add",
        &[
            ("csrf", &hidden(&page, "csrf")),
            ("name", name),
            ("role", role),
            ("password", password),
        ],
    );
    assert_eq!(status, 200, "{page}");
    let start = page.find("<code>").unwrap() + "<code>".len();
    let secret = base32_decode(&page[start..start + page[start..].find('<').unwrap()]);
    let mut b = Browser::new(base, cert);
    let (_, page) = b.get("/login");
    let (status, to) = b.post(
        "/login",
        &[
            ("csrf", &hidden(&page, "csrf")),
            ("name", name),
            ("password", password),
            (
                "code",
                &totp(&secret, unix_now() / console::accounts::TOTP_STEP),
            ),
        ],
    );
    assert_eq!((status, to.as_str()), (303, "→ /"));
    b
}

fn consent_json(h: &Harness, patient: &str) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["consent", "show", patient, "--json", "--config"])
        .arg(&h.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_desk_registers_a_consent_with_its_form_changes_and_withdraws_it_and_names_who_did() {
    use hil_tests::fhir::http;
    // Kept whole to the end: its rsyslog and audit files live as long as it.
    let mut clinic = ConsoleClinic::start();
    let h = &mut clinic.h;
    let rsyslog = &clinic.rsyslog;
    let fhir = clinic.fhir;
    let setup_code = clinic.setup_code.clone();
    let cert = clinic.cert.clone();
    let base = clinic.base.clone();
    let mut admin = administrator(h, &base, &cert, &setup_code);
    let mut desk = staff_member(&mut admin, &base, &cert, "uketsuke1", "desk");
    let mut doctor = staff_member(&mut admin, &base, &cert, "ishi1", "physician");

    // Nobody yet: the search finds no one.
    let (status, page) = desk.get("/patients");
    assert_eq!(status, 200, "{page}");
    let csrf = hidden(&page, "csrf");
    let (status, page) = desk.post("/patients", &[("csrf", &csrf), ("query", "やまだ")]);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("該当する患者はいません"), "{page}");

    // The registration, with the scanned form: its SHA-256 is what the box records.
    let scan = b"%PDF-1.4 the signed consent form of patient 0001234\n%%EOF\n";
    let digest: String = ring::digest::digest(&ring::digest::SHA256, scan)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let form = |csrf: &str, id: &str| -> Vec<(String, String)> {
        [
            ("csrf", csrf),
            ("patient", id),
            ("family_kanji", "山田"),
            ("given_kanji", "花子"),
            ("family_kana", "やまだ"),
            ("given_kana", "ハナコ"),
            ("birth_date", "1950-04-01"),
            ("sex", "female"),
            ("scope", "facilities"),
            // One picked by name, one typed.
            ("disclose_to", "1312345679"),
            ("facilities", "1312345670"),
            ("category", "images"),
            ("category", "lab-results"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
    };
    let post_registration = |b: &mut Browser, f: Vec<(String, String)>, scan: &[u8]| {
        let pairs: Vec<(&str, &str)> = f.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        b.post_multipart("/patients/new", &pairs, ("form", "scan.pdf", scan))
    };
    let (status, page) = desk.get("/patients/new");
    assert_eq!(status, 200, "{page}");
    // The network's facilities by name, but not this clinic.
    assert!(
        page.contains(r#"name="disclose_to" value="1312345679""#)
            && page.contains("新宿総合病院（1312345679）")
            && page.contains(r#"name="exclude" value="1312345671""#),
        "{page}"
    );
    assert!(!page.contains("つなぎ診療所"), "{page}");
    let csrf = hidden(&page, "csrf");
    // Without the scan: refused, nothing written.
    let (status, page) = post_registration(&mut desk, form(&csrf, "0001234"), b"");
    assert_eq!(status, 400, "{page}");
    assert!(
        page.contains("同意書のスキャンを添付してください"),
        "{page}"
    );
    // A physician may not register.
    let (_, dpage) = doctor.get("/patients");
    let dcsrf = hidden(&dpage, "csrf");
    let (status, _) = post_registration(&mut doctor, form(&dcsrf, "0001234"), scan);
    assert_eq!(status, 403);
    // Another session's token: refused.
    let (status, _) = post_registration(&mut desk, form(&dcsrf, "0001234"), scan);
    assert_eq!(status, 403);
    let (status, page) = post_registration(&mut desk, form(&csrf, "0001234"), scan);
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("参加同意を登録しました") && page.contains("参加中"),
        "{page}"
    );
    assert!(page.contains(&digest), "{page}");
    let shown = consent_json(h, "0001234");
    let consent = &shown["effective"]["consent"];
    assert_eq!(consent["evidence"]["sha256"], digest.as_str(), "{shown}");
    assert_eq!(consent["evidence"]["recorded_by"], "uketsuke1", "{shown}");
    assert_eq!(shown["patient"]["family_kana"], "ヤマダ", "{shown}");
    assert_eq!(
        consent["categories"],
        serde_json::json!(["lab-results", "images"]),
        "{shown}"
    );
    // The same patient again: refused while the consent is in force.
    let (status, page) = post_registration(&mut desk, form(&csrf, "0001234"), scan);
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("すでに有効です"), "{page}");

    // Search by hiragana; the patient's page is a POST (no ID in a URL).
    let (status, page) = desk.post("/patients", &[("csrf", &csrf), ("query", "やまだ はな")]);
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("0001234") && page.contains("参加中"),
        "{page}"
    );
    let (status, page) = desk.post("/patient", &[("csrf", &csrf), ("patient", "0001234")]);
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("東京第一病院（1312345670）、新宿総合病院（1312345679）"),
        "named from the network's directory: {page}"
    );
    // 公開設定 offers the facilities by name.
    assert!(
        page.contains(r#"<select id="facility-add" name="facility">"#)
            && page.contains(r#"<option value="1312345671">港区クリニック（1312345671）</option>"#),
        "{page}"
    );
    assert!(page.contains("未発行"), "{page}");

    // 公開設定: one more facility, one less; 名寄せ.
    let decide = |to: &str| {
        let out = Command::new(BIN)
            .args([
                "consent", "decide", "0001234", to, "images", "--json", "--config",
            ])
            .arg(&h.config)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        format!(
            "{} {}",
            v["decision"].as_str().unwrap(),
            v["reason"].as_str().unwrap_or("")
        )
    };
    let (status, page) = desk.post(
        "/patient/disclose",
        &[
            ("csrf", &csrf),
            ("patient", "0001234"),
            ("facility", "1312345671"),
        ],
    );
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("港区クリニック（1312345671） に公開しました") && page.contains("第2版"),
        "{page}"
    );
    let (status, page) = desk.post(
        "/patient/undisclose",
        &[
            ("csrf", &csrf),
            ("patient", "0001234"),
            ("facility", "1312345679"),
        ],
    );
    assert_eq!(status, 200, "{page}");
    let (status, page) = desk.post(
        "/patient/link",
        &[
            ("csrf", &csrf),
            ("patient", "0001234"),
            ("facility", "1312345679"),
            ("id", "H-77"),
        ],
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("新宿総合病院（1312345679）: H-77"), "{page}");
    let shown = consent_json(h, "0001234");
    assert_eq!(shown["links"][0]["value"], "H-77", "{shown}");
    assert_eq!(shown["effective"]["consent"]["version"], 3, "{shown}");
    let (status, page) = desk.post(
        "/patient/disclose",
        &[
            ("csrf", &csrf),
            ("patient", "0001234"),
            ("facility", "13123"),
        ],
    );
    assert_eq!(status, 400, "{page}");
    // A facility the directory does not list yet: its code typed; picked and typed both:
    // refused, nothing changed.
    let (status, page) = desk.post(
        "/patient/disclose",
        &[
            ("csrf", &csrf),
            ("patient", "0001234"),
            ("facility", "1312345670"),
            ("facility_code", "1312345680"),
        ],
    );
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("どちらか一つ"), "{page}");
    let (status, page) = desk.post(
        "/patient/disclose",
        &[
            ("csrf", &csrf),
            ("patient", "0001234"),
            ("facility_code", "1312345680"),
        ],
    );
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("1312345680 に公開しました") && page.contains("第4版"),
        "{page}"
    );
    assert!(
        page.contains(r#"<input id="facility-add-code" name="facility_code""#),
        "{page}"
    );
    // The physician sees the patient but changes nothing.
    let (status, page) = doctor.post("/patient", &[("csrf", &dcsrf), ("patient", "0001234")]);
    assert_eq!(status, 200, "{page}");
    assert!(!page.contains("/patient/withdraw"), "{page}");
    let (status, _) = doctor.post(
        "/patient/withdraw",
        &[("csrf", &dcsrf), ("patient", "0001234"), ("confirm", "yes")],
    );
    assert_eq!(status, 403);

    // The receipt for the patient.
    let (status, page) = desk.post(
        "/patient/receipt",
        &[("csrf", &csrf), ("patient", "0001234")],
    );
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("参加同意を受け付けました") && page.contains("山田 花子"),
        "{page}"
    );

    // 撤回: a confirmation first; nothing changes until it is confirmed.
    let (status, page) = desk.post(
        "/patient/withdraw",
        &[("csrf", &csrf), ("patient", "0001234")],
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("同意の撤回の確認"), "{page}");
    // At the network: the consent pushed (one logical resource, its latest version).
    h.wait_for("the push", Duration::from_secs(30), |_| {
        let r = http::request(fhir, "GET", "/fhir/Consent?_count=100", None).unwrap();
        r.json()["total"] == 1
    });
    let fresh = |h: &Harness| {
        h.wait_for("a fresh cache", Duration::from_secs(30), |_| {
            decide("1312345670") != "deny cache-stale"
        });
    };
    fresh(h);
    assert_eq!(decide("1312345670"), "permit ");
    let (status, page) = desk.post(
        "/patient/withdraw",
        &[("csrf", &csrf), ("patient", "0001234"), ("confirm", "yes")],
    );
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("同意を撤回しました") && page.contains("撤回済み"),
        "{page}"
    );
    assert_eq!(decide("1312345670"), "deny withdrawn");
    // The network has the withdrawal too.
    h.wait_for("the withdrawal pushed", Duration::from_secs(30), |_| {
        let r = http::request(fhir, "GET", "/fhir/Consent?_count=100", None).unwrap();
        let bundle = r.json();
        bundle["total"] == 1 && bundle["entry"][0]["resource"]["status"] != "active"
    });
    let (status, page) = desk.post(
        "/patient/receipt",
        &[("csrf", &csrf), ("patient", "0001234")],
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("撤回を受け付けました"), "{page}");

    // The ATNA trail: each change a Patient Record (110110) that names the desk account and
    // its address as the one who asked; the patient under a pseudonym, never the local ID.
    let by_desk = |ms: &[String]| {
        ms.iter()
            .filter(|m| {
                m.contains("csd-code=\"110110\"")
                    && m.contains("UserID=\"uketsuke1\"")
                    && m.contains("NetworkAccessPointID=\"127.0.0.1\"")
            })
            .count()
    };
    let messages = audit_messages_until(
        rsyslog,
        "the desk's changes",
        Duration::from_secs(30),
        // Registered, consent 1, versions 2 and 3, the link, the withdrawal.
        |ms| by_desk(ms) >= 6,
    );
    assert!(
        messages
            .iter()
            .all(|m| !m.contains("0001234") && !m.contains("山田")),
        "patient data in the trail"
    );
    // The consent trail verifies.
    h.cli(&["audit", "verify"]);

    // 監査: administrators only. The decision trail with `tsunagi consent decide`'s rows (the
    // withdrawal's denial in Japanese), verified; patients only as pseudonyms.
    let (status, page) = desk.get("/audit");
    assert_eq!(status, 403, "{page}");
    let (status, page) = doctor.get("/audit");
    assert_eq!(status, 403, "{page}");
    let (status, page) = admin.get("/audit");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>監査</h1>"), "{page}");
    assert!(page.contains("改ざんは見つかりませんでした"), "{page}");
    assert!(
        page.contains("同意が撤回されています") && page.contains("施設 1312345670"),
        "{page}"
    );
    assert!(
        !page.contains("0001234") && !page.contains("山田"),
        "patient data on the audit page: {page}"
    );
    // A row altered behind the consent service's back is found, and said where.
    rusqlite::Connection::open(h.state_dir().join("consent").join("consent.db"))
        .unwrap()
        .execute("UPDATE audit SET reason = 'tampered' WHERE seq = 1", [])
        .unwrap();
    let (status, page) = admin.get("/audit");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("監査証跡の 1 件目に問題があります"), "{page}");
    // At rsyslog: each reading an Audit Log Used (110101) naming the administrator, and the
    // broken trail a Security Alert (Audit Recording Stopped, 110133).
    audit_messages_until(
        rsyslog,
        "the audit page's events",
        Duration::from_secs(30),
        |ms| {
            ms.iter()
                .filter(|m| {
                    m.contains("csd-code=\"110101\"")
                        && m.contains("UserID=\"admin\"")
                        && m.contains("urn:tsunagi:audit:consent-decisions")
                })
                .count()
                >= 2
                && ms
                    .iter()
                    .any(|m| m.contains("csd-code=\"110133\"") && m.contains("broken at row 1"))
        },
    );
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// The queue IDs of the instances the 保留中 page lists (its forms' hidden `id` fields).
fn held_ids(page: &str) -> Vec<String> {
    let mut ids: Vec<String> = page
        .match_indices("name=\"id\" value=\"")
        .map(|(at, m)| {
            let rest = &page[at + m.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect();
    ids.dedup();
    ids
}

/// The consent trail's rows of staff handling: (decision, reason, object).
fn handling_rows(h: &Harness) -> Vec<(String, String, String)> {
    let db = h.state_dir().join("consent").join("consent.db");
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT decision, reason, object FROM audit
             WHERE decision IN ('requeued', 'discarded-held') ORDER BY seq",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// 保留中: two CT instances sent by dcmtk's storescu for a patient without a consent are
/// held, and listed with why in Japanese; a physician sees them but may not act; the desk
/// discards one after a confirmation (its data leaves the spool), requeues the other (decided
/// again: held again), and once the patient's consent is registered it is on its way out,
/// waiting for the network PACS (unreachable here). Each requeue and discard is in the
/// consent trail, naming the account and its address.
#[test]
fn the_desk_sees_the_held_images_with_why_and_requeues_or_discards_them_audited() {
    if skip_unless_root(
        "the_desk_sees_the_held_images_with_why_and_requeues_or_discards_them_audited",
    ) {
        return;
    }
    let (dicom_port, pacs_port) = (free_port(), free_port());
    let mut clinic = ConsoleClinic::start_with(
        &format!(
            "[dicom]\nlisten = \"127.0.0.1:{dicom_port}\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"NETPACS\"\naddress = \"127.0.0.1:{pacs_port}\"\n"
        ),
        &["dicom"],
    );
    let h = &mut clinic.h;
    let (cert, base, setup_code) = (
        clinic.cert.clone(),
        clinic.base.clone(),
        clinic.setup_code.clone(),
    );
    let mut admin = administrator(h, &base, &cert, &setup_code);
    let mut desk = staff_member(&mut admin, &base, &cert, "uketsuke1", "desk");
    let mut doctor = staff_member(&mut admin, &base, &cert, "ishi1", "physician");
    let (status, page) = desk.get("/held");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("止まっている画像はありません"), "{page}");

    let files = tempfile::tempdir().unwrap();
    let sent: Vec<_> = (0..2)
        .map(|_| japanese_ct(files.path(), &Ids::new("0005678")).unwrap())
        .collect();
    let out = Command::new("storescu")
        .args([
            "-v",
            "-aec",
            "TSUNAGI-TEST",
            "127.0.0.1",
            &dicom_port.to_string(),
        ])
        .args(&sent)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        text.matches("Received Store Response (Success)").count(),
        2,
        "{text}"
    );

    let page = wait_for_page(&mut desk, "/held", "both held for want of a consent", |p| {
        p.matches("同意がありません").count() == 2
    });
    assert_eq!(page.matches(">保留<").count(), 2, "{page}");
    assert!(page.contains("0005678"), "{page}");
    let ids = held_ids(&page);
    assert_eq!(ids.len(), 2, "{page}");
    let csrf = hidden(&page, "csrf");

    // A physician sees them, without the buttons, and may not act.
    let (status, dpage) = doctor.get("/held");
    assert_eq!(status, 200, "{dpage}");
    assert!(
        dpage.contains("同意がありません") && !dpage.contains("/held/requeue"),
        "{dpage}"
    );
    let dcsrf = hidden(&dpage, "csrf");
    let (status, _) = doctor.post("/held/requeue", &[("csrf", &dcsrf), ("id", &ids[0])]);
    assert_eq!(status, 403);
    // Another session's token: refused.
    let (status, _) = desk.post("/held/requeue", &[("csrf", &dcsrf), ("id", &ids[0])]);
    assert_eq!(status, 403);

    // Discard: the question first, then the discard.
    let (status, page) = desk.post("/held/discard", &[("csrf", &csrf), ("id", &ids[0])]);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("元に戻せません"), "{page}");
    assert!(handling_rows(h).is_empty());
    let (status, page) = desk.post(
        "/held/discard",
        &[("csrf", &csrf), ("id", &ids[0]), ("confirm", "yes")],
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("画像を破棄しました"), "{page}");
    assert_eq!(held_ids(&page), [ids[1].clone()], "{page}");
    let object = |id: &str| {
        h.state_dir()
            .join("dicom")
            .join("spool")
            .join("objects")
            .join(format!("{id}.dcm"))
    };
    assert!(!object(&ids[0]).exists());
    assert!(object(&ids[1]).exists());

    // Requeue: decided again, and held again without a consent.
    let (status, page) = desk.post("/held/requeue", &[("csrf", &csrf), ("id", &ids[1])]);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("再送を指示しました"), "{page}");
    let rows = handling_rows(h);
    let by = "by:uketsuke1 (127.0.0.1)";
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("discarded-held", by)
    );
    assert_eq!((rows[1].0.as_str(), rows[1].1.as_str()), ("requeued", by));
    assert!(rows.iter().all(|r| r.2.starts_with("dicom:")), "{rows:?}");
    assert_ne!(rows[0].2, rows[1].2);
    wait_for_page(&mut desk, "/held", "held again", |p| {
        p.contains("同意がありません") && held_ids(p) == [ids[1].clone()]
    });

    // The consent registered: released, and waiting for the network PACS.
    let form = h.dir.path().join("form.pdf");
    std::fs::write(&form, b"%PDF-1.4 consent").unwrap();
    register_consent(h, &form, "0005678", &[]);
    let page = wait_for_page(
        &mut desk,
        "/held",
        "on its way out, the PACS unreachable",
        |p| p.contains("ネットワークの画像サーバーに接続できません"),
    );
    assert!(
        page.contains("再試行待ち") && !page.contains(">破棄する<"),
        "{page}"
    );
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// The (path, SHA-256) of each SS-MIX2 file a form on `page` posts to `action`.
fn ssmix2_forms(page: &str, action: &str) -> Vec<(String, String)> {
    page.split(&format!("action=\"{action}\""))
        .skip(1)
        .map(|form| {
            let form = &form[..form.find("</form>").unwrap()];
            (hidden(form, "path"), hidden(form, "sha256"))
        })
        .collect()
}

/// 保留中, SS-MIX2 (issue 19): the clinic's storage holds a patient's demographics, a
/// prescription their consent excludes, and a data type the network does not take. The
/// desk sees the two that wait, with why; a physician sees them but may not act. The desk
/// asks again for the prescription (its consent checked again: it waits again, never sent)
/// and, after a confirmation, stops the other (counted, no longer listed, and never sent;
/// the file stays in the storage). Each is in the consent trail first, naming the account,
/// its address and the file by data type and SHA-256; only the demographics reach the hub.
#[test]
fn the_desk_asks_again_for_or_stops_the_waiting_ssmix2_files_audited() {
    use ssmix2::build::{Patient, Record, Storage};
    use std::os::unix::fs::PermissionsExt as _;
    let files = tempfile::tempdir().unwrap();
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut storage = Storage::create(&files.path().join("ssmix2").join("1312345678")).unwrap();
    let replica = files.path().join("replica");
    std::fs::create_dir_all(&replica).unwrap();
    if is_root() {
        let id = tsunagi_runtime::privilege::ensure_user(ssmix2_sync::USER).unwrap();
        nix::unistd::chown(&replica, Some(id.uid), Some(id.gid)).unwrap();
    }
    let patient = Patient::sample("0000000011");
    for record in [
        Record::new(
            "ADT-00",
            "-",
            ssmix2::datatype::DUMMY_ORDER_NO,
            "20261120093000000",
        ),
        Record::new("OMP-01", "20261120", "000000000000001", "20261120103000000"),
        Record::new("OMD", "20261120", "000000000000009", "20261120120000000"),
    ] {
        storage.put(&patient, &record).unwrap();
    }
    let mut clinic = ConsoleClinic::start_with(
        &format!(
            "[ssmix2]\nstorage = \"{}\"\nwatch = \"poll\"\nscan-interval = \"1s\"\nsettle = \"1s\"\nconfirm-deletion = \"1s\"\n\n[ssmix2.replica]\ndirectory = \"{}\"\n",
            storage.root().display(),
            replica.display()
        ),
        &["ssmix2"],
    );
    let h = &mut clinic.h;
    let (cert, base, setup_code) = (
        clinic.cert.clone(),
        clinic.base.clone(),
        clinic.setup_code.clone(),
    );
    let form = h.dir.path().join("form.pdf");
    std::fs::write(&form, b"%PDF-1.4 consent").unwrap();
    register_consent(h, &form, &patient.id, &["--categories", "demographics"]);
    let mut admin = administrator(h, &base, &cert, &setup_code);
    let mut desk = staff_member(&mut admin, &base, &cert, "uketsuke2", "desk");
    let mut doctor = staff_member(&mut admin, &base, &cert, "ishi2", "physician");
    let page = wait_for_page(&mut desk, "/held", "the two files that wait", |p| {
        ssmix2_forms(p, "/held/ssmix2/discard").len() == 2
    });
    assert!(page.contains("この種類の情報は同意の対象外です"), "{page}");
    assert!(
        page.contains("ネットワークに送る種類のデータではありません"),
        "{page}"
    );
    let requeue = ssmix2_forms(&page, "/held/ssmix2/requeue");
    assert_eq!(
        requeue.len(),
        1,
        "only the prescription may be asked again: {page}"
    );
    let prescription = requeue[0].clone();
    assert!(prescription.0.contains("/OMP-01/"), "{prescription:?}");
    let other = ssmix2_forms(&page, "/held/ssmix2/discard")
        .into_iter()
        .find(|f| *f != prescription)
        .unwrap();
    assert!(other.0.contains("/OMD/"), "{other:?}");
    let csrf = hidden(&page, "csrf");

    // A physician sees them, without the buttons, and may not act.
    let (status, dpage) = doctor.get("/held");
    assert_eq!(status, 200, "{dpage}");
    assert!(
        dpage.contains("/OMP-01/") && !dpage.contains("/held/ssmix2/"),
        "{dpage}"
    );
    let dcsrf = hidden(&dpage, "csrf");
    let post = |f: &(String, String), csrf: &str| {
        vec![
            ("csrf".to_owned(), csrf.to_owned()),
            ("path".to_owned(), f.0.clone()),
            ("sha256".to_owned(), f.1.clone()),
        ]
    };
    fn fields(v: &[(String, String)]) -> Vec<(&str, &str)> {
        v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
    }
    let (status, _) = doctor.post(
        "/held/ssmix2/requeue",
        &fields(&post(&prescription, &dcsrf)),
    );
    assert_eq!(status, 403);
    // Another session's token: refused.
    let (status, _) = desk.post(
        "/held/ssmix2/requeue",
        &fields(&post(&prescription, &dcsrf)),
    );
    assert_eq!(status, 403);
    assert!(handling_rows(h).is_empty());

    // Ask again: recorded, checked again, and it waits again (the consent excludes it).
    let (status, page) = desk.post("/held/ssmix2/requeue", &fields(&post(&prescription, &csrf)));
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("送り直しを指示しました"), "{page}");

    // Stop the other: the question first, then done.
    let (status, page) = desk.post("/held/ssmix2/discard", &fields(&post(&other, &csrf)));
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("元に戻せません") && page.contains("/OMD/"),
        "{page}"
    );
    assert_eq!(handling_rows(h).len(), 1);
    let mut confirmed = post(&other, &csrf);
    confirmed.push(("confirm".to_owned(), "yes".to_owned()));
    let (status, page) = desk.post("/held/ssmix2/discard", &fields(&confirmed));
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("ネットワークに送りません"), "{page}");
    // At once: counted as stopped, no longer listed.
    assert!(
        !page.contains(&other.1) && page.contains("「送らない」にしたもの"),
        "{page}"
    );
    let rows = handling_rows(h);
    let by = "by:uketsuke2 (127.0.0.1)";
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0],
        (
            "requeued".to_owned(),
            by.to_owned(),
            format!("ssmix2:OMP-01:{}", prescription.1)
        )
    );
    assert_eq!(
        rows[1],
        (
            "discarded-held".to_owned(),
            by.to_owned(),
            format!("ssmix2:OMD:{}", other.1)
        )
    );
    // The prescription waits again, for its consent.
    wait_for_page(&mut desk, "/held", "the prescription waiting again", |p| {
        ssmix2_forms(p, "/held/ssmix2/requeue") == [prescription.clone()]
    });
    // Only the demographics reached the hub; the storage keeps every file.
    let at_hub: Vec<String> = walk(&replica);
    assert_eq!(at_hub.len(), 1, "{at_hub:?}");
    assert!(at_hub[0].contains("/ADT-00/"), "{at_hub:?}");
    assert!(storage.root().join(&other.0).exists());
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// The files under `root`, relative.
fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// GETs `path` until `ok` says its page is as wanted (at most 60 s).
fn wait_for_page(b: &mut Browser, path: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, page) = b.get(path);
        if status == 200 && ok(&page) {
            return page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {status} {page}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// What is left of a page in English once the data it shows and the link back to Japanese
/// are taken out: no Japanese may remain (every word of the page was translated).
fn japanese_left(page: &str) -> Vec<String> {
    let mut rest = page.replace("日本語", "");
    for (_, _, name) in hil_tests::fhir::SAMPLE_DIRECTORY {
        rest = rest.replace(name, "");
    }
    let japanese = |c: char| matches!(c, '\u{3000}'..='\u{30ff}' | '\u{4e00}'..='\u{9fff}' | '\u{ff00}'..='\u{ffef}');
    rest.lines()
        .filter(|l| l.chars().any(japanese))
        .map(|l| l.trim().chars().take(160).collect())
        .collect()
}

/// Issue 19, "Japanese first, English switchable": the link in every page's header keeps
/// the choice in a cookie; then every page, the refusals and a form's answer are in English
/// (`<html lang="en">`, no Japanese words left), and Japanese again after the other link.
/// The choice changes nothing else: the same session, the same forms.
#[test]
fn english_is_one_link_away_and_every_page_is_then_in_english() {
    let (dicom, pacs) = (free_port(), free_port());
    let clinic = ConsoleClinic::start_with(
        &format!(
            "[dicom]\nlisten = \"127.0.0.1:{dicom}\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"NETPACS\"\naddress = \"127.0.0.1:{pacs}\"\n"
        ),
        &["dicom"],
    );
    let h = &clinic.h;
    let mut admin = administrator(h, &clinic.base, &clinic.cert, &clinic.setup_code);
    let (_, page) = admin.get("/");
    assert!(
        page.contains(r#"<html lang="ja">"#)
            && page
                .contains(r#"<a class="lang" href="/lang/en" lang="en" hreflang="en">English</a>"#),
        "{page}"
    );
    let (status, to) = admin.get("/lang/en");
    assert_eq!((status, to.as_str()), (303, "→ /"));
    assert_eq!(admin.cookie(console::lang::COOKIE).as_deref(), Some("en"));
    // Wait for the first sync, so that the facility directory is there to offer.
    h.wait_for("the first sync", Duration::from_secs(30), |s| {
        service(s, "consent")["metrics"]["directory_facilities"].as_f64() > Some(0.0)
    });
    for path in [
        "/",
        "/patients",
        "/patients/new",
        "/held",
        "/ssmix2",
        "/accounts",
        "/audit",
        "/no-such-page",
    ] {
        let (_, page) = admin.get(path);
        assert!(page.contains(r#"<html lang="en">"#), "{path}: {page}");
        assert_eq!(japanese_left(&page), Vec::<String>::new(), "{path}: {page}");
    }
    let (_, page) = admin.get("/");
    assert!(
        page.contains("<title>Status — tsunagi clinic console</title>")
            && page.contains("Facility directory"),
        "{page}"
    );
    // A form's answer, a refusal and a cross-site post, in English.
    let csrf = hidden(&page, "csrf");
    let (status, page) = admin.post("/patients", &[("csrf", &csrf), ("query", "やまだ")]);
    assert_eq!(status, 200);
    assert_eq!(
        japanese_left(&page.replace("やまだ", "")),
        Vec::<String>::new(),
        "{page}"
    );
    let (status, page) = admin.post(
        "/patient/disclose",
        &[
            ("csrf", &csrf),
            ("patient", "0009999"),
            ("facility", "13123"),
        ],
    );
    assert_eq!(status, 400);
    assert_eq!(japanese_left(&page), Vec::<String>::new(), "{page}");
    let (status, page) = admin.post_from(
        "/patients",
        &[("csrf", &csrf), ("query", "x")],
        "https://evil.example",
    );
    assert_eq!(status, 403);
    assert_eq!(japanese_left(&page), Vec::<String>::new(), "{page}");
    // The login page, for a browser that chose English before logging in.
    let mut other = Browser::new(&clinic.base, &clinic.cert);
    other.get("/lang/en");
    let (_, page) = other.get("/login");
    assert!(
        page.contains("<title>Log in — tsunagi clinic console</title>"),
        "{page}"
    );
    assert_eq!(japanese_left(&page), Vec::<String>::new(), "{page}");
    // Back to Japanese.
    let (status, _) = admin.get("/lang/ja");
    assert_eq!(status, 303);
    let (_, page) = admin.get("/");
    assert!(
        page.contains(r#"<html lang="ja">"#)
            && page.contains("<title>接続状態 — つなぎ 院内コンソール</title>"),
        "{page}"
    );
}
