//! 保留中: the DICOM instances that wait in the clinic (held for a consent or an identity,
//! refused by the network PACS, or tried again later), each with why in plain Japanese,
//! over the DICOM service's desk socket ([`dicom_bridge::desk`]). Every role may look; the
//! desk and administrator roles may requeue one (it is decided again before it is sent) or
//! discard a held one or a dead letter (after a confirmation). Both are recorded in the
//! consent service's audit trail first, naming the account and its address.
//!
//! Below them, the SS-MIX2 files that wait, as the sync left them after its last cycle
//! (`ssmix2_sync::WAITING_FILE`, beside the conformance report): counts by reason, and the
//! files that wait for something the staff or the network can change, each with why. The
//! files are the EMR's: they go by themselves once what they wait for changes. The desk and
//! administrator roles may ask again now (送り直す: the cached consent answer forgotten, a
//! failing send tried again; decided again before it is sent) or keep this version of a
//! file from the network (送らない, after a confirmation; the file stays in the EMR's
//! storage, and a changed file is a new version), over the sync's desk socket
//! ([`ssmix2_sync::desk`]); both are recorded in the consent service's audit trail first.

use std::time::Duration;

use axum::extract::{Extension, Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use consent::desk::Staff;
use dicom_bridge::desk::{self, Answer, Item, Request, State as Held, Why};
use maud::{Markup, html};
use serde::Deserialize;
use ssmix2_sync::desk::{self as ssmix2_desk, FileRef};
use ssmix2_sync::sync::waiting::{self as ssmix2_waiting, Waiting};

use crate::accounts::{self, Role, Session};
use crate::inspection::{Kept, read_kept};
use crate::lang::{en, t};
use crate::overview::time_words;
use crate::patients::category_words;
use crate::trail::deny_words;
use crate::web::{Peer, Shared, Trouble, ask_desk, page, refused_cross_site, session};

const DESK_TIMEOUT: Duration = Duration::from_secs(10);

fn dicom_unavailable() -> &'static str {
    t(
        "DICOM の送信サービスに接続できません。サービスが止まっています（接続状態で確かめてください）。",
        "Cannot reach the DICOM sending service. The service has stopped (check Status).",
    )
}

/// Why an instance waits, as the staff read it.
pub fn why_words(why: &Why) -> String {
    match why {
        Why::Consent(r) => {
            if en() {
                format!(
                    "{} (sent automatically once consent is registered or changed)",
                    deny_words(*r)
                )
            } else {
                format!(
                    "{}（同意が登録・変更されると自動で送ります）",
                    deny_words(*r)
                )
            }
        }
        Why::ConsentForNow => t(
            "同意情報をネットワークと確かめられないため、あとで自動で確かめ直します",
            "Cannot check consent with the network; it will be checked again automatically later",
        )
        .to_owned(),
        Why::ConsentRefused => t(
            "この患者IDを同意の仕組みで扱えません（運用者に連絡してください）",
            "The consent system cannot handle this patient ID (contact the operator)",
        )
        .to_owned(),
        Why::NoPatientId => t(
            "画像に患者IDがありません（検査機器の設定を確かめてください）",
            "The image has no patient ID (check the settings of the imaging device)",
        )
        .to_owned(),
        Why::NoCategory => t(
            "ネットワークに送る種類の画像ではありません",
            "Not a kind of image that is sent to the network",
        )
        .to_owned(),
        Why::NoNetworkId => t(
            "ネットワークの患者ID（名寄せ）を待っています",
            "Waiting for the network's patient ID (identity linking)",
        )
        .to_owned(),
        Why::PacsUnreachable => t(
            "ネットワークの画像サーバーに接続できません（自動で再試行します）",
            "Cannot reach the network's image server (PACS); it will be retried automatically",
        )
        .to_owned(),
        Why::PacsBusy => t(
            "ネットワークの画像サーバーが受け取れない状態です（自動で再試行します）",
            "The network's image server (PACS) cannot accept images now; it will be retried automatically",
        )
        .to_owned(),
        Why::PacsRefused(status) => {
            if en() {
                format!("The network's image server (PACS) refused the image (status {status})")
            } else {
                format!("ネットワークの画像サーバーが受け取りを拒否しました（状態 {status}）")
            }
        }
        Why::NotAccepted => t(
            "ネットワークの画像サーバーがこの種類の画像を受け付けません",
            "The network's image server (PACS) does not accept this kind of image",
        )
        .to_owned(),
        Why::TooLong => t(
            "長い間送れなかったため、送信を止めています",
            "Sending has stopped because it failed for a long time",
        )
        .to_owned(),
        Why::Other => t(
            "その他の理由です（運用者に連絡してください）",
            "Another reason (contact the operator)",
        )
        .to_owned(),
    }
}

/// The state's words and the cell's class.
pub fn state_words(state: Held) -> (&'static str, &'static str) {
    match state {
        Held::Held => (t("保留", "Held"), "warn"),
        Held::Dead => (t("送信不能", "Undeliverable"), "bad"),
        Held::Pending => (t("再試行待ち", "Waiting to retry"), "warn"),
    }
}

fn may_change(s: &Session) -> bool {
    matches!(s.role, Role::Desk | Role::Admin)
}

/// Asks the DICOM service's desk.
async fn ask(app: &Shared, request: Request) -> Result<Answer, Trouble> {
    fn failed(a: &Answer) -> Option<&str> {
        match a {
            Answer::Error(why) => Some(why),
            _ => None,
        }
    }
    ask_desk(app.dicom_desk.as_deref(), "dicom", failed, move |socket| {
        desk::ask(socket, &request, DESK_TIMEOUT)
    })
    .await
}

fn kind_words(item: &Item) -> &'static str {
    match item.category {
        Some(c) => category_words(c),
        None => t("区分なし", "No category"),
    }
}

fn row(who: &Session, item: &Item) -> Markup {
    let (state, class) = state_words(item.state);
    html! {
        tr {
            td.nowrap { (time_words(item.received_at)) }
            td.nowrap { (item.patient.as_deref().unwrap_or(t("（なし）", "(none)"))) }
            td.nowrap { (kind_words(item)) }
            td class=(format!("nowrap {class}")) { (state) }
            td { (why_words(&item.why)) }
            td.nowrap { (item.attempts) }
            @if may_change(who) {
                td.nowrap {
                    form.inline method="post" action="/held/requeue" {
                        input type="hidden" name="csrf" value=(who.csrf);
                        input type="hidden" name="id" value=(item.id);
                        button type="submit" { (t("再送する", "Send again")) }
                    }
                    @if item.state != Held::Pending {
                        " "
                        form.inline method="post" action="/held/discard" {
                            input type="hidden" name="csrf" value=(who.csrf);
                            input type="hidden" name="id" value=(item.id);
                            button type="submit" { (t("破棄する", "Discard")) }
                        }
                    }
                }
            }
        }
    }
}

/// The page's body for the desk's answer.
pub fn body(who: &Session, items: &[Item], more: bool, message: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = message { p.msg role="status" { (m) } }
        p { (t("院内で止まっている DICOM 画像です。同意や名寄せを待つものは、登録されると自動で送られます。「再送する」は、同意と名寄せを確かめ直してから送ります（確かめられなければ、また保留になります）。", "DICOM images that are waiting in the clinic. Those waiting for consent or identity linking are sent automatically once it is registered. “Send again” checks consent and identity linking again before sending (if they cannot be checked, the image is held again).")) }
        @if items.is_empty() {
            p.ok { strong { (t("止まっている画像はありません。", "No images are waiting.")) } }
        } @else {
            table {
                caption {
                    @if en() {
                        "DICOM images: " (items.len()) @if more { ", oldest first" }
                    } @else {
                        "DICOM 画像（" (items.len()) " 件" @if more { "、古いものから表示" } "）"
                    }
                }
                thead {
                    tr.nowrap {
                        th scope="col" { (t("受信", "Received")) }
                        th scope="col" { (t("患者ID", "Patient ID")) }
                        th scope="col" { (t("種類", "Kind")) }
                        th scope="col" { (t("状態", "State")) }
                        th scope="col" { (t("理由", "Reason")) }
                        th scope="col" { (t("試行", "Attempts")) }
                        @if may_change(who) { th scope="col" { (t("操作", "Actions")) } }
                    }
                }
                tbody {
                    @for item in items { (row(who, item)) }
                }
            }
            @if more {
                p.warn { (t("ほかにもあります。表示されたものを片付けると、続きが表示されます。", "There are more. Once the ones shown are dealt with, the rest are shown.")) }
            }
        }
    }
}

/// What the console knows of the SS-MIX2 files that wait.
pub type Ssmix2 = Kept<Waiting>;

/// Reads what waits from beside the conformance report at `report` (`None`: the sync is
/// not enabled).
pub fn read_ssmix2(report: Option<&std::path::Path>) -> Ssmix2 {
    read_kept(
        report
            .map(|r| r.with_file_name(ssmix2_sync::WAITING_FILE))
            .as_deref(),
    )
}

/// Why an SS-MIX2 file waits, as the staff read it.
pub fn ssmix2_why_words(why: ssmix2_waiting::Why) -> String {
    use ssmix2_waiting::Why as W;
    match why {
        W::Consent(r) => {
            if en() {
                format!(
                    "{} (sent automatically once consent is registered or changed)",
                    deny_words(r)
                )
            } else {
                format!(
                    "{}（同意が登録・変更されると自動で送ります）",
                    deny_words(r)
                )
            }
        }
        W::NotDecided => t(
            "同意をまだ確かめていません（自動で確かめます）",
            "Consent not checked yet (it will be checked automatically)",
        )
        .to_owned(),
        W::NoCategory => t(
            "ネットワークに送る種類のデータではありません（データ種別を確かめてください）",
            "Not a kind of data that is sent to the network (check the data type)",
        )
        .to_owned(),
        W::BadPath => t(
            "ファイルの名前か場所がネットワークに送れない形です（SS-MIX2 の点検で確かめてください）",
            "The file's name or location cannot be sent to the network (see SS-MIX2 check)",
        )
        .to_owned(),
        W::Settling => t(
            "書き込まれたばかりです（書き込みが終わると送ります）",
            "Just written (sent once writing has finished)",
        )
        .to_owned(),
        W::SendFailing => t(
            "ネットワークへの送信に失敗しました（自動で再試行します）",
            "Sending to the network failed (it will be retried automatically)",
        )
        .to_owned(),
        W::Queued => t("送信待ちです", "Waiting to be sent").to_owned(),
        W::Discarded => t(
            "保留中で「送らない」にしたものです（ファイルが書き換えられると、新しい版として送ります）",
            "Set to “Do not send” on Held (sent as a new version if the file is rewritten)",
        )
        .to_owned(),
    }
}

/// Whether asking again may change what a file waits for (a consent answer, a failing
/// send); the rest wait for the file itself or the network's data types.
fn ssmix2_requeues(why: ssmix2_waiting::Why) -> bool {
    use ssmix2_waiting::Why as W;
    matches!(why, W::Consent(_) | W::NotDecided | W::SendFailing)
}

fn ssmix2_kind_words(f: &ssmix2_waiting::File) -> String {
    match consent::model::Category::for_ssmix2(&f.data_type) {
        Some(c) if en() => format!("{} ({})", f.data_type, category_words(c)),
        Some(c) => format!("{}（{}）", f.data_type, category_words(c)),
        None => f.data_type.clone(),
    }
}

fn ssmix2_actions(who: &Session, f: &ssmix2_waiting::File) -> Markup {
    html! {
        td.nowrap {
            @if ssmix2_requeues(f.why) {
                form.inline method="post" action="/held/ssmix2/requeue" {
                    input type="hidden" name="csrf" value=(who.csrf);
                    input type="hidden" name="path" value=(f.path);
                    input type="hidden" name="sha256" value=(f.sha256);
                    button type="submit" { (t("送り直す", "Ask again")) }
                }
                " "
            }
            form.inline method="post" action="/held/ssmix2/discard" {
                input type="hidden" name="csrf" value=(who.csrf);
                input type="hidden" name="path" value=(f.path);
                input type="hidden" name="sha256" value=(f.sha256);
                button type="submit" { (t("送らない", "Do not send")) }
            }
        }
    }
}

/// The SS-MIX2 part of the page.
pub fn ssmix2_body(who: &Session, w: &Ssmix2) -> Markup {
    html! {
        h2 { (t("SS-MIX2 のファイル", "SS-MIX2 files")) }
        @match w {
            Kept::NotUsed => p { (t("この装置では SS-MIX2 の同期を使用していません。", "This box does not use the SS-MIX2 sync.")) },
            Kept::NotYet => p.warn role="status" { (t("まだ結果がありません。SS-MIX2 同期の最初の点検中か、同期が動いていません（接続状態で確かめてください）。", "No results yet. The SS-MIX2 sync is doing its first check, or it is not running (check Status).")) },
            Kept::Unreadable(_) => p.bad role="alert" { (t("送られていないファイルの一覧を読み取れません。運用者に連絡してください。", "Cannot read the list of files not sent. Contact the operator.")) },
            Kept::Kept(w) => {
                p {
                    @if en() {
                        "Files in the EMR's SS-MIX2 storage that have not been sent to the network (as of " (time_words(w.at)) "). The files belong to the EMR; they are sent automatically once what they wait for (such as consent) is in place. For patients without consent and patients who withdrew it, only the counts are shown."
                    } @else {
                        "電子カルテの SS-MIX2 ストレージのうち、ネットワークに送られていないファイルです（" (time_words(w.at)) " 時点）。ファイルは電子カルテのもので、待っているもの（同意など）が整うと自動で送られます。同意のない患者と撤回した患者のファイルは、数だけを示します。"
                    }
                }
                @if w.counts.is_empty() {
                    p.ok { strong { (t("止まっているファイルはありません。", "No files are waiting.")) } }
                } @else {
                    table {
                        caption { (t("理由ごとの件数", "Files by reason")) }
                        thead { tr { th scope="col" { (t("理由", "Reason")) } th scope="col" { (t("件数", "Files")) } } }
                        tbody {
                            @for (why, n) in &w.counts {
                                tr { td { (ssmix2_why_words(*why)) } td.nowrap { (n) } }
                            }
                        }
                    }
                }
                @if !w.files.is_empty() {
                    @if may_change(who) {
                        p { (t("「送り直す」は、同意を確かめ直し、失敗している送信をすぐにやり直します（同意がなければ、また止まります）。「送らない」は、そのファイルのこの版をネットワークに送らないことにします（ファイルは電子カルテに残ります）。", "“Ask again” checks consent again and retries a failing send at once (without consent, the file waits again). “Do not send” keeps this version of the file from the network (the file stays in the EMR).")) }
                    }
                    table {
                        caption {
                            @if en() {
                                "Files: " (w.files.len()) @if w.more > 0 { ", oldest first" }
                            } @else {
                                "ファイル（" (w.files.len()) " 件" @if w.more > 0 { "、古いものから表示" } "）"
                            }
                        }
                        thead {
                            tr.nowrap {
                                th scope="col" { (t("更新", "Modified")) }
                                th scope="col" { (t("患者ID", "Patient ID")) }
                                th scope="col" { (t("種類", "Kind")) }
                                th scope="col" { (t("理由", "Reason")) }
                                th scope="col" { (t("ファイル", "File")) }
                                @if may_change(who) { th scope="col" { (t("操作", "Actions")) } }
                            }
                        }
                        tbody {
                            @for f in &w.files {
                                tr {
                                    td.nowrap { (time_words(f.since)) }
                                    td.nowrap { (f.patient_id) }
                                    td.nowrap { (ssmix2_kind_words(f)) }
                                    td { (ssmix2_why_words(f.why)) }
                                    td { code { (f.path) } }
                                    @if may_change(who) { (ssmix2_actions(who, f)) }
                                }
                            }
                        }
                    }
                    @if w.more > 0 {
                        p.warn {
                            @if en() {
                                (w.more) " more files."
                            } @else {
                                "ほかに " (w.more) " 件あります。"
                            }
                        }
                    }
                }
            },
        }
    }
}

fn unavailable(who: &Session) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        page(
            t("保留中", "Held"),
            Some(who),
            html! { p.bad role="alert" { (dicom_unavailable()) } },
        ),
    )
        .into_response()
}

async fn show(app: &Shared, who: &Session, message: Option<&str>) -> Response {
    let ssmix2 = ssmix2_body(who, &read_ssmix2(app.ssmix2_report.as_deref()));
    let (status, dicom) = match &app.dicom_desk {
        None => (
            StatusCode::OK,
            html! {
                @if let Some(m) = message { p.msg role="status" { (m) } }
                p { (t("この装置では DICOM を使用していません。", "This box does not use DICOM.")) }
            },
        ),
        Some(_) => match ask(app, Request::List).await {
            Ok(Answer::Waiting { items, more }) => {
                (StatusCode::OK, body(who, &items, more, message))
            }
            Ok(_) | Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                html! { p.bad role="alert" { (dicom_unavailable()) } },
            ),
        },
    };
    (
        status,
        page(
            t("保留中", "Held"),
            Some(who),
            html! { h2 { (t("DICOM 画像", "DICOM images")) } (dicom) (ssmix2) },
        ),
    )
        .into_response()
}

/// GET `/held`.
pub async fn page_of(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match session(&app, &headers).await {
        Ok(Some((_, who))) => show(&app, &who, None).await,
        Ok(None) => Redirect::to("/login").into_response(),
        Err(trouble) => trouble.into_response(),
    }
}

#[derive(Deserialize)]
pub struct HeldForm {
    csrf: String,
    id: i64,
    #[serde(default)]
    confirm: Option<String>,
}

/// The session of a change: the form token checked and the role allowed.
async fn changer(app: &Shared, headers: &HeaderMap, csrf: &str) -> Result<Session, Response> {
    let who = match session(app, headers).await {
        Ok(Some((_, s))) if accounts::same(s.csrf.as_bytes(), csrf.as_bytes()) => s,
        Ok(Some(_)) => return Err(refused_cross_site()),
        Ok(None) => return Err(Redirect::to("/login").into_response()),
        Err(trouble) => return Err(trouble.into_response()),
    };
    if !may_change(&who) {
        return Err((
            StatusCode::FORBIDDEN,
            page(
                t("権限がありません", "Not allowed"),
                Some(&who),
                html! { p { (t("再送と破棄は、事務と管理者の役割のアカウントだけができます。", "Only accounts with the Desk or Administrator role can send again or discard.")) } },
            ),
        )
            .into_response());
    }
    Ok(who)
}

fn staff(who: &Session, peer: &Peer) -> Staff {
    Staff {
        account: who.account.clone(),
        from: peer.0.ip().to_string(),
    }
}

async fn done(app: &Shared, who: &Session, answer: Result<Answer, Trouble>, did: &str) -> Response {
    let message = match answer {
        Ok(Answer::Done { count: 0 }) => t(
            "この画像はもう止まっていません（送られたか、状態が変わりました）。",
            "This image is no longer waiting (it was sent, or its state changed).",
        )
        .to_owned(),
        Ok(Answer::Done { .. }) => did.to_owned(),
        Ok(Answer::Refused(why)) => {
            if en() {
                format!("Not accepted ({why}).")
            } else {
                format!("受け付けられませんでした（{why}）。")
            }
        }
        Ok(_) | Err(_) => return unavailable(who),
    };
    show(app, who, Some(&message)).await
}

/// POST `/held/requeue`.
pub async fn requeue(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<HeldForm>,
) -> Response {
    let who = match changer(&app, &headers, &form.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let answer = ask(
        &app,
        Request::Requeue {
            staff: staff(&who, &peer),
            ids: vec![form.id],
        },
    )
    .await;
    done(
        &app,
        &who,
        answer,
        t(
            "再送を指示しました。同意と名寄せを確かめてから送ります。",
            "Asked to send again. Consent and identity linking are checked before it is sent.",
        ),
    )
    .await
}

/// A confirmation's form (posting `fields` again with `confirm=yes` to `action`) and the
/// way back.
fn confirmed(who: &Session, action: &str, fields: &[(&str, &str)], button: &str) -> Markup {
    html! {
        form method="post" action=(action) {
            input type="hidden" name="csrf" value=(who.csrf);
            @for (name, value) in fields {
                input type="hidden" name=(name) value=(value);
            }
            input type="hidden" name="confirm" value="yes";
            button type="submit" { (button) }
        }
        p { a href="/held" { (t("やめる（保留中へ戻る）", "Cancel (back to Held)")) } }
    }
}

/// POST `/held/discard`: without `confirm`, the question; with it, the discard.
pub async fn discard(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<HeldForm>,
) -> Response {
    let who = match changer(&app, &headers, &form.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if form.confirm.as_deref() != Some("yes") {
        let item = match ask(&app, Request::List).await {
            Ok(Answer::Waiting { items, .. }) => items.into_iter().find(|i| i.id == form.id),
            _ => return unavailable(&who),
        };
        let Some(item) = item else {
            return done(&app, &who, Ok(Answer::Done { count: 0 }), "").await;
        };
        return page(
            t("画像の破棄の確認", "Confirm discarding the image"),
            Some(&who),
            html! {
                p role="alert" {
                    @if en() {
                        "Discard the image of patient ID " strong { (item.patient.as_deref().unwrap_or("(none)")) } " ("
                        (kind_words(&item)) ", received " (time_words(item.received_at)) "). "
                        "A discarded image is not sent to the network and is removed from this box. This cannot be undone. The imaging device can send it again."
                    } @else {
                        "患者ID " strong { (item.patient.as_deref().unwrap_or("（なし）")) } " の "
                        (kind_words(&item)) "（" (time_words(item.received_at)) " 受信）を破棄します。"
                        "破棄した画像はネットワークに送られず、この装置からも消えます。元に戻せません。検査機器から送り直すことはできます。"
                    }
                }
                (confirmed(&who, "/held/discard", &[("id", &item.id.to_string())], t("破棄する", "Discard")))
            },
        )
        .into_response();
    }
    let answer = ask(
        &app,
        Request::Discard {
            staff: staff(&who, &peer),
            ids: vec![form.id],
        },
    )
    .await;
    done(
        &app,
        &who,
        answer,
        t("画像を破棄しました。", "The image was discarded."),
    )
    .await
}

fn ssmix2_unavailable() -> &'static str {
    t(
        "SS-MIX2 の同期サービスに接続できません。サービスが止まっています（接続状態で確かめてください）。",
        "Cannot reach the SS-MIX2 sync service. The service has stopped (check Status).",
    )
}

#[derive(Deserialize)]
pub struct Ssmix2Form {
    csrf: String,
    path: String,
    sha256: String,
    #[serde(default)]
    confirm: Option<String>,
}

/// Asks the SS-MIX2 sync's desk (beside its report).
async fn ask_ssmix2(
    app: &Shared,
    request: ssmix2_desk::Request,
) -> Result<ssmix2_desk::Answer, Trouble> {
    fn failed(a: &ssmix2_desk::Answer) -> Option<&str> {
        match a {
            ssmix2_desk::Answer::Error(why) => Some(why),
            _ => None,
        }
    }
    let socket = app
        .ssmix2_report
        .as_deref()
        .map(|r| r.with_file_name(ssmix2_desk::SOCKET_NAME));
    ask_desk(socket.as_deref(), "ssmix2", failed, move |socket| {
        ssmix2_desk::ask(socket, &request, ssmix2_desk::ANSWER_WITHIN)
    })
    .await
}

async fn ssmix2_done(
    app: &Shared,
    who: &Session,
    answer: Result<ssmix2_desk::Answer, Trouble>,
    did: &str,
) -> Response {
    use ssmix2_desk::Answer as A;
    let message = match answer {
        Ok(A::Done { count: 0 }) => t(
            "このファイルはもう止まっていません（送られたか、書き換えられたか、すでに処理されています）。",
            "This file is no longer waiting (it was sent, rewritten, or already dealt with).",
        )
        .to_owned(),
        Ok(A::Done { .. }) => did.to_owned(),
        Ok(A::Busy) => t(
            "SS-MIX2 の同期が送信の途中です。何も変えていません。少し待ってから、もう一度操作してください。",
            "The SS-MIX2 sync is in the middle of a send. Nothing was changed. Wait a moment and try again.",
        )
        .to_owned(),
        Ok(A::Refused(why)) => {
            if en() {
                format!("Not accepted ({why}).")
            } else {
                format!("受け付けられませんでした（{why}）。")
            }
        }
        Ok(A::Error(_)) | Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                page(
                    t("保留中", "Held"),
                    Some(who),
                    html! { p.bad role="alert" { (ssmix2_unavailable()) } },
                ),
            )
                .into_response();
        }
    };
    show(app, who, Some(&message)).await
}

fn file_ref(form: &Ssmix2Form) -> FileRef {
    FileRef {
        path: form.path.clone(),
        sha256: form.sha256.clone(),
    }
}

/// POST `/held/ssmix2/requeue`.
pub async fn ssmix2_requeue(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<Ssmix2Form>,
) -> Response {
    ssmix2_change(&app, &peer, &headers, &form, false).await
}

/// POST `/held/ssmix2/discard`: without `confirm`, the question; with it, the discard.
pub async fn ssmix2_discard(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<Ssmix2Form>,
) -> Response {
    ssmix2_change(&app, &peer, &headers, &form, true).await
}

async fn ssmix2_change(
    app: &Shared,
    peer: &Peer,
    headers: &HeaderMap,
    form: &Ssmix2Form,
    discard: bool,
) -> Response {
    let who = match changer(app, headers, &form.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if discard && form.confirm.as_deref() != Some("yes") {
        let file = match read_ssmix2(app.ssmix2_report.as_deref()) {
            Kept::Kept(w) => w
                .files
                .into_iter()
                .find(|f| f.path == form.path && f.sha256 == form.sha256),
            _ => None,
        };
        let Some(file) = file else {
            return ssmix2_done(app, &who, Ok(ssmix2_desk::Answer::Done { count: 0 }), "").await;
        };
        return page(
            t("SS-MIX2 ファイルを送らないことの確認", "Confirm not sending the SS-MIX2 file"),
            Some(&who),
            html! {
                p role="alert" {
                    @if en() {
                        "Do not send this version of the file of patient ID " strong { (file.patient_id) } " ("
                        (ssmix2_kind_words(&file)) ", modified " (time_words(file.since)) ") to the network. "
                        "If it may have reached the network already, it is removed there. The file stays in the EMR's storage. This cannot be undone here; if the EMR rewrites the file, the new version is sent as usual."
                    } @else {
                        "患者ID " strong { (file.patient_id) } " の "
                        (ssmix2_kind_words(&file)) "（" (time_words(file.since)) " 更新）のこの版を、ネットワークに送らないことにします。"
                        "すでにネットワークに届いている可能性があれば、そちらから削除します。ファイルは電子カルテのストレージに残ります。ここでは元に戻せません。電子カルテがファイルを書き換えると、新しい版はいつもどおり送られます。"
                    }
                }
                p { code { (file.path) } }
                (confirmed(
                    &who,
                    "/held/ssmix2/discard",
                    &[("path", &file.path), ("sha256", &file.sha256)],
                    t("送らない", "Do not send"),
                ))
            },
        )
        .into_response();
    }
    let (staff, files) = (staff(&who, peer), vec![file_ref(form)]);
    let (request, did) = if discard {
        (
            ssmix2_desk::Request::Discard { staff, files },
            t(
                "このファイルのこの版は、ネットワークに送りません。",
                "This version of the file will not be sent to the network.",
            ),
        )
    } else {
        (
            ssmix2_desk::Request::Requeue { staff, files },
            t(
                "送り直しを指示しました。同意を確かめてから送ります。",
                "Asked again. Consent is checked before it is sent.",
            ),
        )
    };
    let answer = ask_ssmix2(app, request).await;
    ssmix2_done(app, &who, answer, did).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use consent::client::DenyReason;

    #[test]
    fn every_reason_has_japanese_words() {
        let whys = [
            Why::Consent(DenyReason::Withdrawn),
            Why::ConsentForNow,
            Why::ConsentRefused,
            Why::NoPatientId,
            Why::NoCategory,
            Why::NoNetworkId,
            Why::PacsUnreachable,
            Why::PacsBusy,
            Why::PacsRefused("0122H".into()),
            Why::NotAccepted,
            Why::TooLong,
            Why::Other,
        ];
        for why in &whys {
            let words = why_words(why);
            assert!(!words.is_ascii(), "{why:?}: {words}");
        }
        assert!(why_words(&Why::PacsRefused("0122H".into())).contains("0122H"));
        assert!(why_words(&Why::Consent(DenyReason::Withdrawn)).starts_with("同意が撤回"));
        // What the staff did is named on 監査 too.
        for handling in [
            consent::model::Handling::Requeued,
            consent::model::Handling::Discarded,
        ] {
            assert!(!crate::trail::decision_words(handling.as_str()).is_ascii());
        }
    }

    #[test]
    fn the_ssmix2_files_that_wait_show_with_why_and_the_counts() {
        use ssmix2_waiting::{File, Why as W};
        for why in [
            W::Consent(DenyReason::CategoryExcluded),
            W::NotDecided,
            W::NoCategory,
            W::BadPath,
            W::Settling,
            W::SendFailing,
            W::Queued,
            W::Discarded,
        ] {
            assert!(!ssmix2_why_words(why).is_ascii(), "{why:?}");
        }
        let waiting = Waiting {
            at: 1_796_000_000,
            counts: vec![
                (W::Consent(DenyReason::NoConsent), 120),
                (W::NoCategory, 1),
            ],
            files: vec![File {
                path: "000/000/0000000001/20261120/OMD/0000000001_20261120_OMD_000000000000009_20261120120000000_01_1".into(),
                sha256: "ab".repeat(32),
                patient_id: "0000000001".into(),
                data_type: "OMD".into(),
                since: 1_795_990_000,
                why: W::NoCategory,
            }],
            more: 0,
        };
        let desk = Session {
            account: "desk1".into(),
            role: Role::Desk,
            csrf: "token".into(),
        };
        let doctor = Session {
            role: Role::Physician,
            ..desk.clone()
        };
        // A physician sees it; only the desk and administrators may act on it.
        let seen = ssmix2_body(&doctor, &Kept::Kept(Box::new(waiting.clone()))).into_string();
        assert!(!seen.contains("/held/ssmix2/"), "{seen}");
        let page = ssmix2_body(&desk, &Kept::Kept(Box::new(waiting.clone()))).into_string();
        // A file waiting for its data type: nothing to ask again, but it may be set aside.
        assert!(
            page.contains("action=\"/held/ssmix2/discard\"")
                && !page.contains("action=\"/held/ssmix2/requeue\"")
                && page.contains(&"ab".repeat(32)),
            "{page}"
        );
        let mut failing = waiting.clone();
        failing.files[0].why = W::SendFailing;
        let page_failing = ssmix2_body(&desk, &Kept::Kept(Box::new(failing))).into_string();
        assert!(
            page_failing.contains("action=\"/held/ssmix2/requeue\""),
            "{page_failing}"
        );
        assert!(page.contains("<td class=\"nowrap\">120</td>"), "{page}");
        assert!(
            page.contains("ネットワークに送る種類のデータではありません") && page.contains("_OMD_"),
            "{page}"
        );
        assert!(page.contains("同意がありません"), "{page}");
        let none = Waiting {
            at: 1,
            counts: Vec::new(),
            files: Vec::new(),
            more: 0,
        };
        assert!(
            ssmix2_body(&desk, &Kept::Kept(Box::new(none)))
                .into_string()
                .contains("止まっているファイルはありません")
        );
        assert!(
            ssmix2_body(&desk, &read_ssmix2(None))
                .into_string()
                .contains("使用していません")
        );
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join(ssmix2_sync::REPORT_FILE);
        assert!(matches!(read_ssmix2(Some(&report)), Kept::NotYet));
        std::fs::write(report.with_file_name(ssmix2_sync::WAITING_FILE), "{").unwrap();
        assert!(matches!(read_ssmix2(Some(&report)), Kept::Unreadable(_)));
    }
}
