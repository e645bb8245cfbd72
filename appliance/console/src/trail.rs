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
use crate::patients::{ask, category_words};
use crate::web::{Peer, Shared, page, refused_cross_site, session};

/// A reason for a denial as the staff read it.
pub fn deny_words(r: DenyReason) -> &'static str {
    match r {
        DenyReason::NoConsent => "同意がありません",
        DenyReason::Withdrawn => "同意が撤回されています",
        DenyReason::RecipientNotDisclosed => "この相手には公開されていません",
        DenyReason::RecipientExcluded => "この相手には公開しない設定です",
        DenyReason::CategoryExcluded => "この種類の情報は同意の対象外です",
        DenyReason::Expired => "同意の有効期限が切れています",
        DenyReason::NotYetValid => "同意の有効期間がまだ始まっていません",
        DenyReason::CacheStale => "同意情報がネットワークと同期できていません",
        DenyReason::ClockBehind => "装置の時計が遅れています",
        DenyReason::UnreadableNetworkConsent => "ネットワークの同意情報を読み取れません",
    }
}

pub fn decision_words(decision: &str) -> &str {
    match decision {
        "permit" => "許可",
        "deny" => "拒否",
        "sent" => "送信",
        "deleted" => "ネットワークから削除",
        "requeued" => "再送の指示",
        "discarded-held" => "保留中の破棄",
        other => other,
    }
}

fn recipient_words(recipient: &str) -> String {
    match recipient.parse::<Recipient>() {
        Ok(Recipient::Hub) => "ネットワーク（中央）".to_owned(),
        Ok(Recipient::Clinic) => "院内（閲覧）".to_owned(),
        Ok(Recipient::Facility(code)) => format!("施設 {code}"),
        Err(_) => recipient.to_owned(),
    }
}

fn category_text(category: &str) -> String {
    if category == "participation" {
        return "参加の確認".to_owned();
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
        Some(who) => format!("{who} の指示"),
        None => e.reason.clone(),
    }
}

fn trail_page(who: &Session, t: &Trail) -> Markup {
    html! {
        @match &t.check {
            AuditCheck::Intact { rows } => {
                p.ok { strong { "改ざんは見つかりませんでした。" } "（全 " (rows) " 件を検証しました）" }
            }
            AuditCheck::Broken { row, problem } => {
                p.bad role="alert" {
                    strong { "監査証跡の " (row) " 件目に問題があります。" }
                    "運用者に連絡してください（" (problem) "）。"
                }
            }
        }
        p {
            "ネットワークが保管を確認した記録: "
            @match t.checkpoint {
                Some(seq) => { (seq) " 件目まで" }
                None => { "まだありません" }
            }
        }
        @if t.rows.is_empty() {
            p { "記録はありません。" }
        } @else {
            table {
                caption { "同意にもとづく判断と送信の記録（新しい順）" }
                thead {
                    tr {
                        th scope="col" { "番号" } th scope="col" { "日時" }
                        th scope="col" { "患者（仮名）" } th scope="col" { "相手" }
                        th scope="col" { "情報の種類" } th scope="col" { "内容" }
                        th scope="col" { "理由" }
                    }
                }
                tbody {
                    @for e in &t.rows {
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
            @if t.rows.len() == TRAIL_PAGE && let Some(last) = t.rows.last() {
                form method="post" action="/audit" {
                    input type="hidden" name="csrf" value=(who.csrf);
                    input type="hidden" name="before" value=(last.seq);
                    button type="submit" { "さらに古い記録" }
                }
            }
        }
        p { "患者は仮名（記録ごとの鍵付きハッシュ）でのみ表示されます。この画面を開いたことも、監査証跡に記録されます。" }
    }
}

fn admins_only(s: &Session) -> Response {
    (
        StatusCode::FORBIDDEN,
        page(
            "権限がありません",
            Some(s),
            html! { p { "監査は、管理者の役割のアカウントだけが見られます。" } },
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
        Ok(Answer::Trail(t)) => page("監査", Some(who), trail_page(who, &t)).into_response(),
        Ok(_) | Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                "監査",
                Some(who),
                html! { p.bad role="alert" { "同意サービスに接続できません。しばらくしてからもう一度開いてください。" } },
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
        Err(t) => t.into_response(),
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
        Err(t) => t.into_response(),
    }
}
