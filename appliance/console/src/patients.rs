//! 患者: the consent desk's pages (参加同意, 公開設定, 名寄せ, 撤回, 受付票), over the consent
//! service's desk socket ([`consent::desk`]): the same store calls as `tsunagi consent`, the
//! same audit trail, with the account and its address recorded as who asked.
//!
//! No patient data in a URL: a search, and every page about one patient, is a POST whose
//! body names them. Every role may look; only 事務 and 管理者 may change.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::extract::{Extension, Form, Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use consent::desk::{self, Answer, Participation, Refusal, Registration, Request, Staff, View};
use consent::model::{Category, Facility, Patient, PatientId, Scope, Sex};
use consent::store::Directory;
use maud::{Markup, html};
use serde::Deserialize;
use tsunagi_config::FacilityCode;

use crate::accounts::{self, Role, Session};
use crate::lang::{en, t};
use crate::overview::time_words;
use crate::web::{Peer, Shared, Trouble, ask_desk, page, refused_cross_site, session};

/// How long a desk request may take.
const DESK_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest scanned form accepted (a multi-page PDF or photo).
pub const MAX_FORM_BYTES: usize = 32 * 1024 * 1024;

/// A data category as the staff know it.
pub fn category_words(c: Category) -> &'static str {
    match c {
        Category::Demographics => t("基本情報", "Demographics"),
        Category::Problems => t("病名", "Problems"),
        Category::Allergies => t("アレルギー", "Allergies"),
        Category::Prescriptions => t("処方", "Prescriptions"),
        Category::Injections => t("注射", "Injections"),
        Category::LabResults => t("検査結果", "Lab results"),
        Category::Orders => t("オーダ", "Orders"),
        Category::Images => t("画像", "Images"),
        Category::Documents => t("文書", "Documents"),
    }
}

fn sex_words(s: Sex) -> &'static str {
    match s {
        Sex::Male => t("男", "Male"),
        Sex::Female => t("女", "Female"),
        Sex::Other => t("その他", "Other"),
        Sex::Unknown => t("不明", "Unknown"),
    }
}

fn participation_words(p: Participation) -> (&'static str, &'static str) {
    match p {
        Participation::None => (t("同意なし", "No consent"), "warn"),
        Participation::Active => (t("参加中", "Participating"), "ok"),
        Participation::Withdrawn => (t("撤回済み", "Withdrawn"), "bad"),
    }
}

fn refusal_words(r: &Refusal) -> String {
    match r {
        Refusal::UnknownPatient => t(
            "この患者は登録されていません。",
            "This patient is not registered.",
        )
        .to_owned(),
        Refusal::AlreadyRegistered => t(
            "この患者の同意はすでに有効です。公開設定の変更か、撤回をしてください。",
            "This patient's consent is already in effect. Change the disclosure, or withdraw it.",
        )
        .to_owned(),
        Refusal::NoConsent => t(
            "この患者には同意が登録されていません。",
            "No consent is registered for this patient.",
        )
        .to_owned(),
        Refusal::AlreadyWithdrawn => t(
            "同意は撤回済みです。再度参加する場合は、新しい同意書で登録してください。",
            "The consent has been withdrawn. To take part again, register a new consent form.",
        )
        .to_owned(),
        Refusal::IdentityTaken => t(
            "このIDはすでに別の患者に使われています。",
            "This ID is already used for another patient.",
        )
        .to_owned(),
        Refusal::Invalid(why) => {
            if en() {
                format!("Check what you entered ({why}).")
            } else {
                format!("入力を確かめてください（{why}）。")
            }
        }
    }
}

/// The session of a request any account may make, with the form token checked.
async fn staff_session(app: &Shared, headers: &HeaderMap, csrf: &str) -> Result<Session, Response> {
    match session(app, headers).await {
        Ok(Some((_, s))) if accounts::same(s.csrf.as_bytes(), csrf.as_bytes()) => Ok(s),
        Ok(Some(_)) => Err(refused_cross_site()),
        Ok(None) => Err(Redirect::to("/login").into_response()),
        Err(t) => Err(t.into_response()),
    }
}

/// The session and patient of a request that changes a patient: the form token checked,
/// the role allowed to change, the patient ID well-formed; otherwise the answer to give.
async fn changer(
    app: &Shared,
    headers: &HeaderMap,
    csrf: &str,
    patient: &str,
) -> Result<(Session, PatientId), Response> {
    let who = staff_session(app, headers, csrf).await?;
    if !may_change(&who) {
        return Err(not_allowed(&who));
    }
    match patient.parse::<PatientId>() {
        Ok(id) => Ok((who, id)),
        Err(_) => Err(bad_input(
            &who,
            t(
                "患者IDの形式が正しくありません。",
                "The patient ID is not in the right form.",
            ),
        )),
    }
}

fn may_change(s: &Session) -> bool {
    matches!(s.role, Role::Desk | Role::Admin)
}

fn not_allowed(s: &Session) -> Response {
    (
        StatusCode::FORBIDDEN,
        page(
            t("権限がありません", "Not allowed"),
            Some(s),
            html! { p { (t("同意の登録と変更は、事務と管理者の役割のアカウントだけができます。", "Only Desk and Administrator accounts can register and change consent.")) } },
        ),
    )
        .into_response()
}

/// Asks the consent service's desk.
pub(crate) async fn ask(app: &Shared, request: Request) -> Result<Answer, Trouble> {
    fn failed(a: &Answer) -> Option<&str> {
        match a {
            Answer::Error(why) => Some(why),
            _ => None,
        }
    }
    ask_desk(
        app.desk_socket.as_deref(),
        "consent",
        failed,
        move |socket| desk::ask(socket, &request, DESK_TIMEOUT),
    )
    .await
}

fn staff(s: &Session, peer: &Peer) -> Staff {
    Staff {
        account: s.account.clone(),
        from: peer.0.ip().to_string(),
    }
}

fn search_form(who: &Session, query: &str) -> Markup {
    html! {
        form method="post" action="/patients" role="search" {
            input type="hidden" name="csrf" value=(who.csrf);
            label for="query" { (t("患者ID、またはカナ氏名（先頭から）", "Patient ID, or name in kana (from the start)")) }
            input id="query" name="query" value=(query) maxlength=(desk::MAX_QUERY) autocomplete="off" required;
            button type="submit" { (t("検索", "Search")) }
        }
        @if may_change(who) {
            p { a href="/patients/new" { (t("新しい患者の参加同意を登録する", "Register a new patient's participation consent")) } }
        }
    }
}

/// GET `/patients`: the search form.
pub async fn search_page(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match session(&app, &headers).await {
        Ok(Some((_, who))) => {
            page(t("患者", "Patients"), Some(&who), search_form(&who, "")).into_response()
        }
        Ok(None) => Redirect::to("/login").into_response(),
        Err(t) => t.into_response(),
    }
}

#[derive(Deserialize)]
pub struct SearchForm {
    csrf: String,
    query: String,
}

fn patient_button(who: &Session, id: &PatientId, action: &str, label: &str) -> Markup {
    html! {
        form method="post" action=(action) class="inline" {
            input type="hidden" name="csrf" value=(who.csrf);
            input type="hidden" name="patient" value=(id.as_str());
            button type="submit" { (label) }
        }
    }
}

/// POST `/patients`: the patients found.
pub async fn search(
    State(app): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<SearchForm>,
) -> Response {
    let who = match staff_session(&app, &headers, &form.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let query = form.query.trim().to_owned();
    let found = match ask(
        &app,
        Request::Find {
            query: query.clone(),
        },
    )
    .await
    {
        Ok(Answer::Found(f)) => f,
        Ok(Answer::Refused(r)) => {
            return (
                StatusCode::BAD_REQUEST,
                page(
                    t("患者", "Patients"),
                    Some(&who),
                    html! { p.msg role="alert" { (refusal_words(&r)) } (search_form(&who, &query)) },
                ),
            )
                .into_response();
        }
        Ok(_) | Err(_) => return Trouble.into_response(),
    };
    page(
        t("患者", "Patients"),
        Some(&who),
        html! {
            (search_form(&who, &query))
            @if found.is_empty() {
                p role="status" { (t("該当する患者はいません。", "No patients found.")) }
            } @else {
                table {
                    caption {
                        @if en() { "Results (" (found.len()) ")" } @else { "検索結果（" (found.len()) "件）" }
                    }
                    thead { tr {
                        th scope="col" { (t("患者ID", "Patient ID")) } th scope="col" { (t("氏名", "Name")) } th scope="col" { (t("カナ", "Kana")) }
                        th scope="col" { (t("生年月日", "Date of birth")) } th scope="col" { (t("参加", "Participation")) } th scope="col" { (t("操作", "Actions")) }
                    } }
                    tbody {
                        @for f in &found {
                            @let (words, class) = participation_words(f.participation);
                            tr {
                                th scope="row" { (f.patient.id.as_str()) }
                                td { (f.patient.family_kanji) " " (f.patient.given_kanji) }
                                td { (f.patient.family_kana) " " (f.patient.given_kana) }
                                td { (f.patient.birth_date) }
                                td class=(class) { (words) }
                                td { (patient_button(&who, &f.patient.id, "/patient", t("開く", "Open"))) }
                            }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

/// The network's facility directory, to name facilities and offer them by name; `None` when
/// the consent service cannot say (then codes are typed, as before the first sync).
async fn directory(app: &Shared) -> Option<Directory> {
    match ask(app, Request::Facilities).await {
        Ok(Answer::Facilities(d)) => Some(*d),
        _ => None,
    }
}

/// A facility as the staff know it: its name from the directory, and its code.
fn facility_words(dir: Option<&Directory>, code: &FacilityCode) -> String {
    match dir.and_then(|d| d.name_of(code)) {
        Some(name) => {
            if en() {
                format!("{name} ({code})")
            } else {
                format!("{name}（{code}）")
            }
        }
        None => code.to_string(),
    }
}

fn facility_list<'a>(
    dir: Option<&Directory>,
    list: impl IntoIterator<Item = &'a FacilityCode>,
) -> String {
    let v: Vec<String> = list.into_iter().map(|c| facility_words(dir, c)).collect();
    if v.is_empty() {
        t("なし", "None").to_owned()
    } else {
        v.join(t("、", ", "))
    }
}

fn scope_words(dir: Option<&Directory>, scope: &Scope) -> String {
    match scope {
        Scope::AllParticipants => t(
            "ネットワークのすべての参加施設",
            "All participating facilities in the network",
        )
        .to_owned(),
        Scope::Facilities(list) => facility_list(dir, list),
    }
}

/// The facilities to offer by name: the directory's other facilities (`inactive` too, or
/// only active ones), by name.
fn offered(dir: Option<&Directory>, own: &str, inactive: bool) -> Vec<Facility> {
    dir.map(|d| {
        d.facilities
            .iter()
            .filter(|f| f.code.as_str() != own && (inactive || f.active))
            .cloned()
            .collect()
    })
    .unwrap_or_default()
}

/// A field naming one facility: picked by name from the directory (`name="facility"`), or
/// typed as a code (`facility_code`): the only way while the directory offers none, and
/// for a facility it does not list yet ([`picked`] takes one of the two).
fn facility_field(id: &str, label: &str, choices: &[Facility]) -> Markup {
    html! {
        @if choices.is_empty() {
            label for=(id) { (label) (t("（医療機関コード10桁）", " (10-digit facility code)")) }
            input id=(id) name="facility_code" inputmode="numeric" pattern="[0-9]{10}" required;
        } @else {
            label for=(id) { (label) }
            select id=(id) name="facility" {
                option value="" { (t("施設を選んでください", "Choose a facility")) }
                @for f in choices {
                    option value=(f.code) {
                        @if en() { (f.name) " (" (f.code) ")" } @else { (f.name) "（" (f.code) "）" }
                        @if !f.active { (t(" 休止中", " (inactive)")) }
                    }
                }
            }
            label for=(format!("{id}-code")) { (t("一覧にない施設なら、医療機関コード（10桁）", "Or, for a facility not in the list, its facility code (10 digits)")) }
            input id=(format!("{id}-code")) name="facility_code" inputmode="numeric" pattern="[0-9]{10}";
        }
    }
}

/// The facility a form names: the one picked by name, or the code typed; exactly one.
fn picked(facility: Option<&str>, code: Option<&str>) -> Result<FacilityCode, &'static str> {
    fn given(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    match (given(facility), given(code)) {
        (Some(v), None) | (None, Some(v)) => FacilityCode::try_from(v).map_err(|_| {
            t(
                "医療機関コードは10桁の数字です。",
                "A facility code is 10 digits.",
            )
        }),
        (None, None) => Err(t(
            "施設を選ぶか、医療機関コードを入力してください。",
            "Choose a facility, or enter a facility code.",
        )),
        (Some(_), Some(_)) => Err(t(
            "施設は一覧から選ぶか、医療機関コードを入力するか、どちらか一つにしてください。",
            "Either choose a facility from the list or enter a facility code, not both.",
        )),
    }
}

/// Checkboxes naming facilities (`name=NAME`), for the registration's lists.
fn facility_checks(name: &str, legend: &str, choices: &[Facility]) -> Markup {
    html! {
        @if !choices.is_empty() {
            fieldset.picklist {
                legend { (legend) }
                @for f in choices {
                    label.choice {
                        input type="checkbox" name=(name) value=(f.code); " "
                        @if en() { (f.name) " (" (f.code) ")" } @else { (f.name) "（" (f.code) "）" }
                    }
                }
            }
        }
    }
}

/// A linked identifier's facility, named (its system is the facility's patient-ID system).
fn link_words(dir: Option<&Directory>, system: &str) -> String {
    system
        .strip_prefix(consent::model::PATIENT_ID_SYSTEM_PREFIX)
        .and_then(|code| FacilityCode::try_from(code).ok())
        .map_or_else(|| system.to_owned(), |code| facility_words(dir, &code))
}

/// The page of one patient.
fn patient_view(
    who: &Session,
    v: &View,
    message: Option<&str>,
    dir: Option<&Directory>,
    own: &str,
) -> Html<String> {
    let p = &v.patient;
    let to_disclose = offered(dir, own, false);
    let to_name = offered(dir, own, true);
    let (words, class) = participation_words(v.participation);
    let active = v.participation == Participation::Active;
    let hidden = html! {
        input type="hidden" name="csrf" value=(who.csrf);
        input type="hidden" name="patient" value=(p.id.as_str());
    };
    page(
        t("患者の同意", "Patient consent"),
        Some(who),
        html! {
            @if let Some(m) = message { p.done role="status" { (m) } }
            @if v.unreadable {
                p.bad role="alert" { (t("ネットワークから届いたこの患者の同意を読み取れませんでした。読み取れる同意が届くまで、この患者の情報は外に出ません。ネットワーク運用者に連絡してください。", "This patient's consent, as received from the network, could not be read. Until a readable consent arrives, none of this patient's data leaves the clinic. Contact the network operator.")) }
            }
            table {
                caption { (t("基本情報", "Demographics")) }
                tbody {
                    tr { th scope="row" { (t("患者ID", "Patient ID")) } td { (p.id.as_str()) } }
                    tr { th scope="row" { (t("氏名", "Name")) } td { (p.family_kanji) " " (p.given_kanji) } }
                    tr { th scope="row" { (t("カナ", "Kana")) } td { (p.family_kana) " " (p.given_kana) } }
                    tr { th scope="row" { (t("生年月日", "Date of birth")) } td { (p.birth_date) } }
                    tr { th scope="row" { (t("性別", "Sex")) } td { (sex_words(p.sex)) } }
                    tr { th scope="row" { (t("ネットワークID", "Network ID")) } td {
                        @if let Some(n) = &p.network_id { (n) } @else { span.warn { (t("未発行（同期で届きます）", "Not issued yet (comes with the sync)")) } }
                    } }
                    tr { th scope="row" { (t("参加", "Participation")) } td class=(class) { (words) } }
                }
            }
            @if let Some(c) = &v.consent {
                h2 { (t("同意の内容", "The consent")) }
                table {
                    tbody {
                        tr { th scope="row" { (t("同意番号", "Consent number")) } td {
                            @if en() { (c.id) " (version " (c.version) ")" } @else { (c.id) "（第" (c.version) "版）" }
                        } }
                        tr { th scope="row" { (t("公開先", "Disclosed to")) } td { (scope_words(dir, &c.scope)) } }
                        tr { th scope="row" { (t("公開しない施設", "Facilities excluded")) } td { (facility_list(dir, &c.excluded)) } }
                        tr { th scope="row" { (t("情報の種類", "Kinds of data")) } td { (c.categories.iter().map(|k| category_words(*k)).collect::<Vec<_>>().join(t("、", ", "))) } }
                        tr { th scope="row" { (t("有効期間", "Valid")) } td { (time_words(c.valid_from)) (t(" から ", " to ")) (c.valid_until.map_or(t("期限なし", "no end").to_owned(), time_words)) } }
                        @if let Some(e) = &c.evidence {
                            tr { th scope="row" { (t("記録", "Recorded")) } td {
                                @if en() { (e.recorded_by) " (" (time_words(e.recorded_at)) ")" } @else { (e.recorded_by) "（" (time_words(e.recorded_at)) "）" }
                            } }
                            @if !e.sha256.is_empty() {
                                tr { th scope="row" { (t("同意書の指紋（SHA-256）", "Consent form fingerprint (SHA-256)")) } td { code { (e.sha256) } } }
                            }
                        }
                    }
                }
            }
            @if !v.links.is_empty() {
                h2 { (t("他施設のID（名寄せ）", "Other facilities' IDs (identity linking)")) }
                ul { @for l in &v.links { li { (link_words(dir, &l.system)) ": " (l.value) } } }
            }
            @if may_change(who) && active {
                h2 { (t("公開設定", "Disclosure")) }
                form method="post" action="/patient/disclose" {
                    (hidden)
                    (facility_field("facility-add", t("公開する施設", "Facility to disclose to"), &to_disclose))
                    button type="submit" { (t("公開する", "Disclose")) }
                }
                form method="post" action="/patient/undisclose" {
                    (hidden)
                    (facility_field("facility-remove", t("公開をやめる施設", "Facility to stop disclosing to"), &to_name))
                    button type="submit" { (t("公開をやめる", "Stop disclosing")) }
                }
                h2 { (t("名寄せ", "Identity linking")) }
                form method="post" action="/patient/link" {
                    (hidden)
                    (facility_field("link-facility", t("施設", "Facility"), &to_name))
                    label for="link-id" { (t("その施設での患者ID", "Patient ID at that facility")) }
                    input id="link-id" name="id" maxlength="64" autocomplete="off" required;
                    button type="submit" { (t("IDをつなぐ", "Link the ID")) }
                }
                h2 { (t("撤回", "Withdrawal")) }
                form method="post" action="/patient/withdraw" {
                    (hidden)
                    button type="submit" { (t("同意を撤回する…", "Withdraw consent…")) }
                }
            }
            @if v.consent.is_some() {
                p { (patient_button(who, &p.id, "/patient/receipt", t("受付票を印刷する", "Print the receipt"))) }
            }
            @if may_change(who) && !active {
                p { a href="/patients/new" { (t("新しい同意書で参加を登録する", "Register participation with a new consent form")) } }
            }
            p { a href="/patients" { (t("患者の検索へ", "Back to patient search")) } }
        },
    )
}

/// An answer about one patient as the page to show (`done`: what was done, if anything).
async fn answered(
    app: &Shared,
    who: &Session,
    answer: Result<Answer, Trouble>,
    done: Option<&str>,
) -> Response {
    let dir = match &answer {
        Ok(Answer::Patient(_)) => directory(app).await,
        _ => None,
    };
    shown(app, who, answer, done, dir.as_ref())
}

/// [`answered`] with the facility directory already in hand.
fn shown(
    app: &Shared,
    who: &Session,
    answer: Result<Answer, Trouble>,
    done: Option<&str>,
    dir: Option<&Directory>,
) -> Response {
    match answer {
        Ok(Answer::Patient(v)) => {
            patient_view(who, &v, done, dir, &app.facility).into_response()
        }
        Ok(Answer::Refused(r)) => (
            StatusCode::BAD_REQUEST,
            page(
                t("できませんでした", "Could not be done"),
                Some(who),
                html! { p.msg role="alert" { (refusal_words(&r)) } p { a href="/patients" { (t("患者の検索へ", "Back to patient search")) } } },
            ),
        )
            .into_response(),
        Ok(_) | Err(_) => Trouble.into_response(),
    }
}

#[derive(Deserialize)]
pub struct PatientForm {
    csrf: String,
    patient: String,
    #[serde(default)]
    confirm: Option<String>,
}

fn bad_input(who: &Session, what: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        page(
            t("入力を確かめてください", "Check your input"),
            Some(who),
            html! { p.msg role="alert" { (what) } p { a href="/patients" { (t("患者の検索へ", "Back to patient search")) } } },
        ),
    )
        .into_response()
}

/// The session and patient of a request that looks at a patient (any role).
async fn viewer(
    app: &Shared,
    headers: &HeaderMap,
    form: &PatientForm,
) -> Result<(Session, PatientId), Response> {
    let who = staff_session(app, headers, &form.csrf).await?;
    match form.patient.parse::<PatientId>() {
        Ok(id) => Ok((who, id)),
        Err(_) => Err(bad_input(
            &who,
            t(
                "患者IDの形式が正しくありません。",
                "The patient ID is not in the right form.",
            ),
        )),
    }
}

/// POST `/patient`: one patient.
pub async fn show(
    State(app): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<PatientForm>,
) -> Response {
    let (who, patient) = match viewer(&app, &headers, &form).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    answered(&app, &who, ask(&app, Request::Show { patient }).await, None).await
}

/// A receipt for the patient (受付票), to print.
pub async fn receipt(
    State(app): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<PatientForm>,
) -> Response {
    let (who, patient) = match viewer(&app, &headers, &form).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let v = match ask(&app, Request::Show { patient }).await {
        Ok(Answer::Patient(v)) => v,
        other => return answered(&app, &who, other, None).await,
    };
    let Some(c) = &v.consent else {
        return answered(&app, &who, Ok(Answer::Refused(Refusal::NoConsent)), None).await;
    };
    let dir = directory(&app).await;
    let dir = dir.as_ref();
    let p = &v.patient;
    let withdrawn = v.participation == Participation::Withdrawn;
    page(
        t("受付票", "Receipt"),
        Some(&who),
        html! {
            div.receipt {
                p { (t("医療機関コード ", "Facility code ")) (app.facility) }
                p {
                    strong { (p.family_kanji) " " (p.given_kanji) }
                    @if en() { " (" (p.family_kana) " " (p.given_kana) ")" } @else { " 様（" (p.family_kana) " " (p.given_kana) "）" }
                }
                @if withdrawn {
                    p {
                        @if en() {
                            "Your withdrawal of participation consent in the regional healthcare network has been received. From " (time_words(c.recorded_at)) ", your data is not disclosed to the network."
                        } @else {
                            "地域医療連携ネットワークへの参加同意の撤回を受け付けました。" (time_words(c.recorded_at)) "から、あなたの情報はネットワークに公開されません。"
                        }
                    }
                } @else {
                    p { (t("地域医療連携ネットワークへの参加同意を受け付けました。", "Your participation consent in the regional healthcare network has been received.")) }
                    table {
                        tbody {
                            tr { th scope="row" { (t("公開先", "Disclosed to")) } td { (scope_words(dir, &c.scope)) } }
                            @if !c.excluded.is_empty() {
                                tr { th scope="row" { (t("公開しない施設", "Facilities excluded")) } td { (facility_list(dir, &c.excluded)) } }
                            }
                            tr { th scope="row" { (t("情報の種類", "Kinds of data")) } td { (c.categories.iter().map(|k| category_words(*k)).collect::<Vec<_>>().join(t("、", ", "))) } }
                            tr { th scope="row" { (t("有効期間", "Valid")) } td { (time_words(c.valid_from)) (t(" から ", " to ")) (c.valid_until.map_or(t("期限なし", "no end").to_owned(), time_words)) } }
                        }
                    }
                    p { (t("同意はいつでも撤回できます。受付にお申し出ください。撤回はその時点からすぐに効力を持ちます。", "You can withdraw your consent at any time: ask at the reception desk. A withdrawal takes effect at once.")) }
                }
                p {
                    @if en() {
                        "Consent number " (c.id) " (version " (c.version) "), received " (time_words(c.recorded_at))
                    } @else {
                        "同意番号 " (c.id) "（第" (c.version) "版） 受付 " (time_words(c.recorded_at))
                    }
                }
            }
            p.noprint { (t("ブラウザの印刷機能で印刷してください。", "Print this page with the browser's print function.")) }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct FacilityForm {
    csrf: String,
    patient: String,
    #[serde(default)]
    facility: Option<String>,
    #[serde(default)]
    facility_code: Option<String>,
}

async fn facility_change(
    app: Shared,
    peer: Peer,
    headers: HeaderMap,
    form: FacilityForm,
    disclose: bool,
) -> Response {
    let (who, patient) = match changer(&app, &headers, &form.csrf, &form.patient).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let facility = match picked(form.facility.as_deref(), form.facility_code.as_deref()) {
        Ok(f) => f,
        Err(words) => return bad_input(&who, words),
    };
    // One look at the directory: for the message and for the page that shows it.
    let dir = directory(&app).await;
    let named = facility_words(dir.as_ref(), &facility);
    let staff = staff(&who, &peer);
    let (request, done) = if disclose {
        (
            Request::Disclose {
                staff,
                patient,
                facility,
            },
            if en() {
                format!("Disclosed to {named}.")
            } else {
                format!("{named} に公開しました。")
            },
        )
    } else {
        (
            Request::Undisclose {
                staff,
                patient,
                facility,
            },
            if en() {
                format!("Stopped disclosing to {named}.")
            } else {
                format!("{named} への公開をやめました。")
            },
        )
    };
    shown(
        &app,
        &who,
        ask(&app, request).await,
        Some(&done),
        dir.as_ref(),
    )
}

/// POST `/patient/disclose`.
pub async fn disclose(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<FacilityForm>,
) -> Response {
    facility_change(app, peer, headers, form, true).await
}

/// POST `/patient/undisclose`.
pub async fn undisclose(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<FacilityForm>,
) -> Response {
    facility_change(app, peer, headers, form, false).await
}

#[derive(Deserialize)]
pub struct LinkForm {
    csrf: String,
    patient: String,
    #[serde(default)]
    facility: Option<String>,
    #[serde(default)]
    facility_code: Option<String>,
    id: String,
}

/// POST `/patient/link`: another facility's ID for the patient (名寄せ).
pub async fn link(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<LinkForm>,
) -> Response {
    let (who, patient) = match changer(&app, &headers, &form.csrf, &form.patient).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let facility = match picked(form.facility.as_deref(), form.facility_code.as_deref()) {
        Ok(f) => f,
        Err(words) => return bad_input(&who, words),
    };
    let request = Request::Link {
        staff: staff(&who, &peer),
        patient,
        facility,
        id: form.id,
    };
    answered(
        &app,
        &who,
        ask(&app, request).await,
        Some(t(
            "他施設のIDをつなぎました。",
            "Linked the other facility's ID.",
        )),
    )
    .await
}

/// POST `/patient/withdraw`: without `confirm`, the question; with it, the withdrawal.
pub async fn withdraw(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<PatientForm>,
) -> Response {
    let (who, patient) = match changer(&app, &headers, &form.csrf, &form.patient).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    if form.confirm.as_deref() != Some("yes") {
        let v = match ask(
            &app,
            Request::Show {
                patient: patient.clone(),
            },
        )
        .await
        {
            Ok(Answer::Patient(v)) => v,
            other => return answered(&app, &who, other, None).await,
        };
        let p = &v.patient;
        return page(
            t("同意の撤回の確認", "Confirm withdrawal of consent"),
            Some(&who),
            html! {
                p role="alert" {
                    @if en() {
                        "This withdraws the participation consent of "
                        strong { (p.family_kanji) " " (p.given_kanji) " (" (p.id.as_str()) ")" }
                        ". Once it is withdrawn, this patient's data stops going to the network at once. A new consent form is needed to undo this."
                    } @else {
                        strong { (p.family_kanji) " " (p.given_kanji) "（" (p.id.as_str()) "）" }
                        " の参加同意を撤回します。撤回すると、この患者の情報はすぐにネットワークへ出なくなります。元に戻すには新しい同意書が必要です。"
                    }
                }
                form method="post" action="/patient/withdraw" {
                    input type="hidden" name="csrf" value=(who.csrf);
                    input type="hidden" name="patient" value=(p.id.as_str());
                    input type="hidden" name="confirm" value="yes";
                    button type="submit" { (t("撤回する", "Withdraw")) }
                }
                (patient_button(&who, &p.id, "/patient", t("やめる（患者の画面へ戻る）", "Cancel (back to the patient)")))
            },
        )
        .into_response();
    }
    let request = Request::Withdraw {
        staff: staff(&who, &peer),
        patient,
    };
    answered(
        &app,
        &who,
        ask(&app, request).await,
        Some(t("同意を撤回しました。", "Consent withdrawn.")),
    )
    .await
}

fn registration_page(who: &Session, message: Option<&str>, choices: &[Facility]) -> Html<String> {
    page(
        t("参加同意の登録", "Register participation consent"),
        Some(who),
        html! {
            @if let Some(m) = message { p.msg role="alert" { (m) } }
            p { (t("患者が署名した参加同意書のとおりに入力し、同意書のスキャンを添付してください。同意書そのものは装置に保存されず、その指紋（SHA-256）が記録されます。", "Enter what the patient's signed participation consent form says, and attach a scan of the form. The form itself is not kept on the appliance; only its fingerprint (SHA-256) is recorded.")) }
            form method="post" action="/patients/new" enctype="multipart/form-data" {
                input type="hidden" name="csrf" value=(who.csrf);
                label for="patient" { (t("患者ID（電子カルテのID）", "Patient ID (the ID in the electronic medical record)")) }
                input id="patient" name="patient" maxlength="64" autocomplete="off" required;
                label for="family_kanji" { (t("姓", "Family name")) }
                input id="family_kanji" name="family_kanji" maxlength="64" autocomplete="off" required;
                label for="given_kanji" { (t("名", "Given name")) }
                input id="given_kanji" name="given_kanji" maxlength="64" autocomplete="off" required;
                label for="family_kana" { (t("姓（カナ）", "Family name (kana)")) }
                input id="family_kana" name="family_kana" maxlength="64" autocomplete="off" required;
                label for="given_kana" { (t("名（カナ）", "Given name (kana)")) }
                input id="given_kana" name="given_kana" maxlength="64" autocomplete="off" required;
                label for="birth_date" { (t("生年月日", "Date of birth")) }
                input id="birth_date" name="birth_date" type="date" required;
                fieldset {
                    legend { (t("性別", "Sex")) }
                    @for (value, words) in [("female", t("女", "Female")), ("male", t("男", "Male")), ("other", t("その他", "Other")), ("unknown", t("不明", "Unknown"))] {
                        label.choice { input type="radio" name="sex" value=(value) required; " " (words) }
                    }
                }
                fieldset {
                    legend { (t("公開先（同意書のとおり）", "Disclose to (as on the consent form)")) }
                    label.choice { input type="radio" name="scope" value="all" required; (t(" ネットワークのすべての参加施設", " All participating facilities in the network")) }
                    label.choice { input type="radio" name="scope" value="facilities"; (t(" 次の施設だけ", " Only these facilities")) }
                    (facility_checks("disclose_to", t("公開する施設（「次の施設だけ」のとき）", "Facilities to disclose to (for “Only these facilities”)"), choices))
                    label for="facilities" {
                        @if choices.is_empty() { (t("公開する施設の医療機関コード（10桁、読点かカンマで区切る）", "Facility codes to disclose to (10 digits each, separated by commas)")) }
                        @else { (t("一覧にない公開する施設の医療機関コード（あれば。読点かカンマで区切る）", "Facility codes to disclose to that are not in the list (if any; separated by commas)")) }
                    }
                    input id="facilities" name="facilities" autocomplete="off";
                    (facility_checks("exclude", t("公開しない施設（あれば）", "Facilities excluded (if any)"), choices))
                    label for="excluded" {
                        @if choices.is_empty() { (t("公開しない施設の医療機関コード（あれば）", "Facility codes excluded (if any)")) }
                        @else { (t("一覧にない公開しない施設の医療機関コード（あれば）", "Facility codes excluded that are not in the list (if any)")) }
                    }
                    input id="excluded" name="excluded" autocomplete="off";
                }
                fieldset {
                    legend { (t("公開する情報の種類（同意書のとおり）", "Kinds of data to disclose (as on the consent form)")) }
                    @for c in Category::ALL {
                        label.choice { input type="checkbox" name="category" value=(c.as_str()); " " (category_words(c)) }
                    }
                }
                label for="valid_until" { (t("有効期限（あれば。その日まで有効）", "Valid until (if any; valid through that day)")) }
                input id="valid_until" name="valid_until" type="date";
                label for="form" { (t("署名された同意書のスキャン（PDFまたは画像）", "Scan of the signed consent form (PDF or image)")) }
                input id="form" name="form" type="file" accept="application/pdf,image/*" required;
                button type="submit" { (t("登録する", "Register")) }
            }
        },
    )
}

/// GET `/patients/new`: the registration form.
pub async fn registration_form(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match session(&app, &headers).await {
        Ok(Some((_, who))) if may_change(&who) => {
            let choices = offered(directory(&app).await.as_ref(), &app.facility, false);
            registration_page(&who, None, &choices).into_response()
        }
        Ok(Some((_, who))) => not_allowed(&who),
        Ok(None) => Redirect::to("/login").into_response(),
        Err(t) => t.into_response(),
    }
}

/// The registration form's fields as they came.
#[derive(Default)]
struct Fields {
    text: std::collections::BTreeMap<String, String>,
    categories: Vec<String>,
    /// Facilities picked by name: to disclose to, and to exclude.
    disclose_to: Vec<String>,
    exclude: Vec<String>,
    form_sha256: Option<String>,
    form_bytes: usize,
}

/// Reads the multipart form, hashing the scanned form as it streams.
async fn read_fields(mut multipart: Multipart) -> Result<Fields, String> {
    let mut fields = Fields::default();
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| format!("the form could not be read: {e}"))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "form" {
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            while let Some(chunk) = field
                .chunk()
                .await
                .map_err(|e| format!("the scanned form could not be read: {e}"))?
            {
                fields.form_bytes += chunk.len();
                digest.update(&chunk);
            }
            fields.form_sha256 = Some(
                digest
                    .finish()
                    .as_ref()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            );
            continue;
        }
        let value = field
            .text()
            .await
            .map_err(|e| format!("the form could not be read: {e}"))?;
        if value.len() > 1024
            || fields.text.len() > 32
            || fields.categories.len() > 16
            || fields.disclose_to.len() + fields.exclude.len() > MAX_PICKED
        {
            return Err("the form is too large".to_owned());
        }
        if name == "category" {
            fields.categories.push(value);
        } else if name == "disclose_to" {
            fields.disclose_to.push(value);
        } else if name == "exclude" {
            fields.exclude.push(value);
        } else {
            fields.text.insert(name, value);
        }
    }
    Ok(fields)
}

/// The most facilities one registration may pick by name.
const MAX_PICKED: usize = 2000;

/// The codes typed (separated by commas, 読点 or spaces) and those picked by name.
fn facility_codes(text: &str, picked: &[String]) -> Result<BTreeSet<FacilityCode>, ()> {
    text.split([',', '、', '，', ' ', '　'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .chain(picked.iter().map(String::as_str))
        .map(|c| FacilityCode::try_from(c).map_err(|_| ()))
        .collect()
}

/// The registration the fields make, or what to tell the staff.
fn registration(f: &Fields) -> Result<Registration, &'static str> {
    let get = |name: &str| f.text.get(name).map(|s| s.trim()).unwrap_or_default();
    let id = get("patient").parse::<PatientId>().map_err(|_| {
        t(
            "患者IDは1〜64文字の半角英数字・記号です。",
            "A patient ID is 1 to 64 ASCII letters, digits or symbols.",
        )
    })?;
    let sex = get("sex")
        .parse::<Sex>()
        .map_err(|_| t("性別を選んでください。", "Choose the sex."))?;
    let scope = match get("scope") {
        "all" => Scope::AllParticipants,
        "facilities" => Scope::Facilities(
            facility_codes(get("facilities"), &f.disclose_to).map_err(|()| {
                t(
                    "公開する施設の医療機関コードは10桁の数字です。",
                    "Facility codes to disclose to are 10 digits.",
                )
            })?,
        ),
        _ => return Err(t("公開先を選んでください。", "Choose whom to disclose to.")),
    };
    if matches!(&scope, Scope::Facilities(l) if l.is_empty()) {
        return Err(t(
            "公開する施設を1つ以上選ぶか入力してください。",
            "Choose or enter at least one facility to disclose to.",
        ));
    }
    let excluded = facility_codes(get("excluded"), &f.exclude).map_err(|()| {
        t(
            "公開しない施設の医療機関コードは10桁の数字です。",
            "Facility codes excluded are 10 digits.",
        )
    })?;
    let categories = f
        .categories
        .iter()
        .map(|c| c.parse::<Category>())
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|_| {
            t(
                "情報の種類が正しくありません。",
                "The kinds of data are not valid.",
            )
        })?;
    if categories.is_empty() {
        return Err(t(
            "公開する情報の種類を1つ以上選んでください。",
            "Choose at least one kind of data to disclose.",
        ));
    }
    let valid_until = match get("valid_until") {
        "" => None,
        // The last day it is valid: the end (exclusive) is the next day's start.
        d => Some(
            consent::time::parse(d).map_err(|_| {
                t(
                    "有効期限の日付が正しくありません。",
                    "The valid-until date is not a correct date.",
                )
            })? + 86_400,
        ),
    };
    let (Some(sha256), true) = (f.form_sha256.clone(), f.form_bytes > 0) else {
        return Err(t(
            "署名された同意書のスキャンを添付してください。",
            "Attach a scan of the signed consent form.",
        ));
    };
    Ok(Registration {
        patient: Patient {
            id,
            family_kanji: get("family_kanji").to_owned(),
            given_kanji: get("given_kanji").to_owned(),
            family_kana: consent::model::search_kana(get("family_kana")),
            given_kana: consent::model::search_kana(get("given_kana")),
            birth_date: get("birth_date").to_owned(),
            sex,
            network_id: None,
        },
        scope,
        excluded,
        categories,
        valid_from: None,
        valid_until,
        form_sha256: sha256,
    })
}

/// POST `/patients/new`: registers the patient's participation consent.
pub async fn register(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    multipart: Multipart,
) -> Response {
    let who = match session(&app, &headers).await {
        Ok(Some((_, s))) => s,
        Ok(None) => return Redirect::to("/login").into_response(),
        Err(t) => return t.into_response(),
    };
    // The form again, with what to fix: its choices as the directory has them now.
    let again = async |words: &str| {
        let choices = offered(directory(&app).await.as_ref(), &app.facility, false);
        (
            StatusCode::BAD_REQUEST,
            registration_page(&who, Some(words), &choices),
        )
            .into_response()
    };
    let fields = match read_fields(multipart).await {
        Ok(f) => f,
        Err(why) => {
            tracing::info!(%why, "a registration form refused");
            return again(t(
                "送信された内容を読み取れませんでした。同意書のファイルが大きすぎないか確かめてください。",
                "The form sent could not be read. Check that the consent form file is not too large.",
            ))
            .await;
        }
    };
    let csrf = fields
        .text
        .get("csrf")
        .map(String::as_str)
        .unwrap_or_default();
    if !accounts::same(who.csrf.as_bytes(), csrf.as_bytes()) {
        return refused_cross_site();
    }
    if !may_change(&who) {
        return not_allowed(&who);
    }
    let registration = match registration(&fields) {
        Ok(r) => r,
        Err(words) => return again(words).await,
    };
    let request = Request::Register {
        staff: staff(&who, &peer),
        registration: Box::new(registration),
    };
    match ask(&app, request).await {
        Ok(Answer::Refused(r)) => again(&refusal_words(&r)).await,
        other => answered(
            &app,
            &who,
            other,
            Some(t(
                "参加同意を登録しました。受付票を印刷して患者に渡してください。",
                "Participation consent registered. Print the receipt and give it to the patient.",
            )),
        )
        .await,
    }
}
