//! 監査 (administrators only): the consent service's decision trail, newest first, 50 rows
//! a page, and its verification, over the desk socket ([`consent::desk::Request::Trail`]).
//! Patients appear only as the trail's keyed pseudonyms. Reading the trail is itself
//! audited (Audit Log Used, naming the account); a trail that does not verify is a
//! Security Alert, as with `tsunagi audit verify`.

use axum::extract::{Extension, Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use consent::decide::DenyReason;
use consent::desk::{Answer, Request, Staff, TRAIL_PAGE, Trail};
use consent::model::{Category, Recipient};
use consent::store::{AuditCheck, AuditEntry};
use maud::{Markup, html};
use serde::Deserialize;

use crate::accounts::{self, Role, Session};
use crate::lang::{en, t};
use crate::patients::{ask, category_words};
use crate::web::{Peer, Shared, page, refused_cross_site, session};

/// A reason for a denial as the staff read it.
pub fn deny_words(r: DenyReason) -> &'static str {
    match r {
        DenyReason::NoConsent => t("同意がありません", "No consent"),
        DenyReason::Withdrawn => t("同意が撤回されています", "Consent has been withdrawn"),
        DenyReason::RecipientNotDisclosed => t(
            "この相手には公開されていません",
            "Not disclosed to this recipient",
        ),
        DenyReason::RecipientExcluded => t(
            "この相手には公開しない設定です",
            "Set not to be disclosed to this recipient",
        ),
        DenyReason::CategoryExcluded => t(
            "この種類の情報は同意の対象外です",
            "This kind of information is not covered by the consent",
        ),
        DenyReason::Expired => t("同意の有効期限が切れています", "The consent has expired"),
        DenyReason::NotYetValid => t(
            "同意の有効期間がまだ始まっていません",
            "The consent period has not started yet",
        ),
        DenyReason::CacheStale => t(
            "同意情報がネットワークと同期できていません",
            "Consent is not in sync with the network",
        ),
        DenyReason::ClockBehind => t("装置の時計が遅れています", "The box's clock is behind"),
        DenyReason::UnreadableNetworkConsent => t(
            "ネットワークの同意情報を読み取れません",
            "Cannot read the network's consent",
        ),
    }
}

pub fn decision_words(decision: &str) -> &str {
    match decision {
        "permit" => t("許可", "Permitted"),
        "deny" => t("拒否", "Denied"),
        "sent" => t("送信", "Sent"),
        "deleted" => t("ネットワークから削除", "Deleted from the network"),
        "requeued" => t("再送の指示", "Asked to send again"),
        "discarded-held" => t("保留中の破棄", "Held item discarded"),
        other => other,
    }
}

fn recipient_words(recipient: &str) -> String {
    match recipient.parse::<Recipient>() {
        Ok(Recipient::Hub) => t("ネットワーク（中央）", "Network (central)").to_owned(),
        Ok(Recipient::Clinic) => t("院内（閲覧）", "Clinic (viewing)").to_owned(),
        Ok(Recipient::Facility(code)) => {
            if en() {
                format!("Facility {code}")
            } else {
                format!("施設 {code}")
            }
        }
        Err(_) => recipient.to_owned(),
    }
}

fn category_text(category: &str) -> String {
    if category == "participation" {
        return t("参加の確認", "Participation check").to_owned();
    }
    Category::ALL
        .into_iter()
        .find(|c| c.as_str() == category)
        .map_or_else(|| category.to_owned(), |c| category_words(c).to_owned())
}

fn reason_text(e: &AuditEntry) -> String {
    if let Some(r) = DenyReason::ALL.into_iter().find(|r| r.as_str() == e.reason) {
        return deny_words(r).to_owned();
    }
    match e.reason.strip_prefix("by:") {
        Some(who) => {
            if en() {
                format!("By {who}")
            } else {
                format!("{who} の指示")
            }
        }
        None => e.reason.clone(),
    }
}

fn trail_page(who: &Session, trail: &Trail) -> Markup {
    html! {
        @match &trail.check {
            AuditCheck::Intact { rows } => {
                p.ok {
                    @if en() {
                        strong { "No tampering found." } " (all " (rows) " records verified)"
                    } @else {
                        strong { "改ざんは見つかりませんでした。" } "（全 " (rows) " 件を検証しました）"
                    }
                }
            }
            AuditCheck::Broken { row, problem } => {
                p.bad role="alert" {
                    @if en() {
                        strong { "Record " (row) " of the audit trail has a problem." }
                        " Contact the operator (" (problem) ")."
                    } @else {
                        strong { "監査証跡の " (row) " 件目に問題があります。" }
                        "運用者に連絡してください（" (problem) "）。"
                    }
                }
            }
        }
        p {
            (t("ネットワークが保管を確認した記録: ", "Records the network has confirmed it keeps: "))
            @match trail.checkpoint {
                Some(seq) => {
                    @if en() {
                        "up to record " (seq)
                    } @else {
                        (seq) " 件目まで"
                    }
                }
                None => { (t("まだありません", "none yet")) }
            }
        }
        @if trail.rows.is_empty() {
            p { (t("記録はありません。", "No records.")) }
        } @else {
            table {
                caption { (t("同意にもとづく判断と送信の記録（新しい順）", "Decisions and sending based on consent (newest first)")) }
                thead {
                    tr {
                        th scope="col" { (t("番号", "No.")) } th scope="col" { (t("日時", "Date and time")) }
                        th scope="col" { (t("患者（仮名）", "Patient (pseudonym)")) } th scope="col" { (t("相手", "Recipient")) }
                        th scope="col" { (t("情報の種類", "Kind of information")) } th scope="col" { (t("内容", "Decision")) }
                        th scope="col" { (t("理由", "Reason")) }
                    }
                }
                tbody {
                    @for e in &trail.rows {
                        tr {
                            th scope="row" { (e.seq) }
                            td { (e.at.get(..16).unwrap_or(&e.at).replace('T', " ")) }
                            td { code { (e.patient_hash.get(..12).unwrap_or(&e.patient_hash)) } }
                            td { (recipient_words(&e.recipient)) }
                            td { (category_text(&e.category)) }
                            td { (decision_words(&e.decision)) }
                            td { (reason_text(e)) }
                        }
                    }
                }
            }
            @if trail.rows.len() == TRAIL_PAGE && let Some(last) = trail.rows.last() {
                form method="post" action="/audit" {
                    input type="hidden" name="csrf" value=(who.csrf);
                    input type="hidden" name="before" value=(last.seq);
                    button type="submit" { (t("さらに古い記録", "Older records")) }
                }
            }
        }
        p { (t("患者は仮名（記録ごとの鍵付きハッシュ）でのみ表示されます。この画面を開いたことも、監査証跡に記録されます。", "Patients are shown only as pseudonyms (a keyed hash per record). Opening this page is also recorded in the audit trail.")) }
    }
}

fn admins_only(s: &Session) -> Response {
    (
        StatusCode::FORBIDDEN,
        page(
            t("権限がありません", "Not allowed"),
            Some(s),
            html! { p { (t("監査は、管理者の役割のアカウントだけが見られます。", "Only accounts with the Administrator role can see Audit.")) } },
        ),
    )
        .into_response()
}

async fn answer(app: &Shared, who: &Session, peer: &Peer, before: Option<i64>) -> Response {
    if who.role != Role::Admin {
        return admins_only(who);
    }
    let request = Request::Trail {
        staff: Staff {
            account: who.account.clone(),
            from: peer.0.ip().to_string(),
        },
        before,
    };
    match ask(app, request).await {
        Ok(Answer::Trail(trail)) => {
            page(t("監査", "Audit"), Some(who), trail_page(who, &trail)).into_response()
        }
        Ok(_) | Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                t("監査", "Audit"),
                Some(who),
                html! { p.bad role="alert" { (t("同意サービスに接続できません。しばらくしてからもう一度開いてください。", "Cannot reach the consent service. Please open this page again in a little while.")) } },
            ),
        )
            .into_response(),
    }
}

/// GET `/audit`: the newest page.
pub async fn newest(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    match session(&app, &headers).await {
        Ok(Some((_, who))) => answer(&app, &who, &peer, None).await,
        Ok(None) => Redirect::to("/login").into_response(),
        Err(trouble) => trouble.into_response(),
    }
}

#[derive(Deserialize)]
pub struct OlderForm {
    csrf: String,
    before: i64,
}

/// POST `/audit`: the page older than `before`.
pub async fn older(
    State(app): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<OlderForm>,
) -> Response {
    match session(&app, &headers).await {
        Ok(Some((_, who))) if accounts::same(who.csrf.as_bytes(), form.csrf.as_bytes()) => {
            answer(&app, &who, &peer, Some(form.before)).await
        }
        Ok(Some(_)) => refused_cross_site(),
        Ok(None) => Redirect::to("/login").into_response(),
        Err(trouble) => trouble.into_response(),
    }
}
