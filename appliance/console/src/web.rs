//! The console's pages and forms (axum, server-rendered with maud; no JavaScript).
//!
//! - Cookies are `__Host-` prefixed, `Secure`, `HttpOnly`, `SameSite=Strict`, `Path=/`.
//! - Every form that changes something carries a token: the session's own once logged in,
//!   a per-browser one (the same value in a cookie and the form) before. A POST whose
//!   token does not match, or whose `Origin` or `Sec-Fetch-Site` says it came from another
//!   site, is refused (403) before anything is done.
//! - No patient data and no account secret ever goes into a URL or a log line.
//! - Every answer forbids caching, framing and scripts (`Content-Security-Policy`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, Form, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use tsunagi_runtime::status::{Health, ServiceState, StatusReport};

use crate::accounts::{self, AccountInfo, Accounts, Policy, Refused, Role, Session};
use crate::lang::{Lang, en, t};
use crate::overview::Overview;
use crate::{held, inspection, lang, patients, trail};

/// The session cookie.
pub const SESSION_COOKIE: &str = "__Host-tsunagi-session";
/// The per-browser form token before login.
pub const FORM_COOKIE: &str = "__Host-tsunagi-form";

/// What every request shares.
pub struct App {
    pub accounts: Mutex<Accounts>,
    pub policy: Policy,
    /// The clinic's facility code (titles, the authenticator's issuer).
    pub facility: String,
    /// The supervisor's control socket (read-only: status).
    pub status_socket: PathBuf,
    /// Events for the ATNA trail.
    pub pending: Option<Arc<audit::pending::Store>>,
    /// The consent service's desk socket (`None`: consent is not enabled; the patient pages
    /// say the desk cannot be reached).
    pub desk_socket: Option<PathBuf>,
    /// The SS-MIX2 sync's conformance report (`None`: the sync is not enabled).
    pub ssmix2_report: Option<PathBuf>,
    /// The DICOM service's desk socket (`None`: DICOM is not enabled; 保留中 says the
    /// service cannot be reached).
    pub dicom_desk: Option<PathBuf>,
}

/// The peer of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

pub(crate) type Shared = Arc<App>;

/// The console's routes over `app`.
pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/setup", get(setup_form).post(setup))
        .route("/accounts", get(accounts_page))
        .route("/accounts/add", post(account_add))
        .route("/accounts/change", post(account_change))
        .route(
            "/patients",
            get(patients::search_page).post(patients::search),
        )
        .route(
            "/patients/new",
            get(patients::registration_form)
                .post(patients::register)
                .layer(DefaultBodyLimit::max(patients::MAX_FORM_BYTES + 64 * 1024)),
        )
        .route("/patient", post(patients::show))
        .route("/patient/disclose", post(patients::disclose))
        .route("/patient/undisclose", post(patients::undisclose))
        .route("/patient/link", post(patients::link))
        .route("/patient/withdraw", post(patients::withdraw))
        .route("/patient/receipt", post(patients::receipt))
        .route("/audit", get(trail::newest).post(trail::older))
        .route("/ssmix2", get(inspection::page_of))
        .route("/held", get(held::page_of))
        .route("/held/requeue", post(held::requeue))
        .route("/held/discard", post(held::discard))
        .route("/held/ssmix2/requeue", post(held::ssmix2_requeue))
        .route("/held/ssmix2/discard", post(held::ssmix2_discard))
        .route("/lang/{code}", get(lang::choose))
        .fallback(not_found)
        .layer(middleware::from_fn(guard))
        .layer(middleware::from_fn(lang::language))
        .with_state(app)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Refuses a cross-site request that changes something, and sets the headers every answer
/// carries.
async fn guard(request: axum::extract::Request, next: Next) -> Response {
    let cross_site = request.method() != Method::GET
        && request.method() != Method::HEAD
        && !same_origin(request.headers());
    let mut response = if cross_site {
        refused_cross_site()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // Not `no-referrer`: under it a browser sends `Origin: null` even with a form posted
        // to its own site (the Fetch standard's origin serialisation), which the guard above
        // must refuse. `same-origin` sends nothing to another site and the real origin here.
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Whether a request that changes something came from this site: `Sec-Fetch-Site` (if the
/// browser sends it) is `same-origin`, and `Origin` (if sent) is this host over HTTPS.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text("sec-fetch-site")
        && site != "same-origin"
    {
        return false;
    }
    match (text("origin"), text("host")) {
        (None, _) => true,
        (Some(origin), Some(host)) => origin == format!("https://{host}"),
        (Some(_), None) => false,
    }
}

pub(crate) fn refused_cross_site() -> Response {
    (
        StatusCode::FORBIDDEN,
        page(
            t("拒否しました", "Refused"),
            None,
            html! { p { (t("このページの外から送られた操作は受け付けません。", "An action sent from outside these pages is not accepted.")) } },
        ),
    )
        .into_response()
}

pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

pub(crate) fn set_cookie(name: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
    let age = max_age.map_or(String::new(), |a| format!("; Max-Age={a}"));
    HeaderValue::from_str(&format!(
        "{name}={value}; Secure; HttpOnly; SameSite=Strict; Path=/{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Runs `f` on the accounts on a blocking thread.
async fn with_accounts<T: Send + 'static>(
    app: &Shared,
    f: impl FnOnce(&mut Accounts) -> Result<T, accounts::AccountsError> + Send + 'static,
) -> Result<T, Trouble> {
    let app = app.clone();
    // The refusals it words are in the request's language (a task-local: carried over).
    let lang = Lang::current();
    match tokio::task::spawn_blocking(move || {
        let mut accounts = app
            .accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        lang.sync_scope(|| f(&mut accounts))
    })
    .await
    {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "the console's accounts"
            );
            Err(Trouble)
        }
        Err(e) => {
            tracing::error!(error = %e, "the console's accounts task");
            Err(Trouble)
        }
    }
}

/// Something went wrong on the box's side (logged where it happened).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trouble;

impl IntoResponse for Trouble {
    fn into_response(self) -> Response {
        trouble()
    }
}

fn trouble() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        page(
            t("エラー", "Error"),
            None,
            html! { p { (t("処理できませんでした。しばらくしてからもう一度お試しください。", "This could not be done. Please try again in a moment.")) } },
        ),
    )
        .into_response()
}

/// Calls one of the box's desks (`call`, on a blocking thread, with its socket): no socket
/// (the service is not enabled), no answer, or an answer `failed` says is the service's
/// error is [`Trouble`], logged as `what`'s.
pub(crate) async fn ask_desk<Ans: Send + 'static>(
    socket: Option<&std::path::Path>,
    what: &'static str,
    failed: fn(&Ans) -> Option<&str>,
    call: impl FnOnce(&std::path::Path) -> Result<Ans, tsunagi_runtime::listen::AskError>
    + Send
    + 'static,
) -> Result<Ans, Trouble> {
    let Some(socket) = socket.map(std::path::Path::to_owned) else {
        return Err(Trouble);
    };
    match tokio::task::spawn_blocking(move || call(&socket)).await {
        Ok(Ok(answer)) => match failed(&answer) {
            Some(why) => {
                tracing::error!(%why, desk = what, "the desk failed");
                Err(Trouble)
            }
            None => Ok(answer),
        },
        Ok(Err(e)) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                desk = what,
                "the desk"
            );
            Err(Trouble)
        }
        Err(e) => {
            tracing::error!(error = %e, desk = what, "the desk task");
            Err(Trouble)
        }
    }
}

/// The session of the request's cookie, if it is a live one.
pub(crate) async fn session(
    app: &Shared,
    headers: &HeaderMap,
) -> Result<Option<(String, Session)>, Trouble> {
    let Some(token) = cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    let policy = app.policy;
    let t = token.clone();
    let found = with_accounts(app, move |a| a.session(&t, now(), &policy)).await?;
    Ok(found.map(|s| (token, s)))
}

fn audit(app: &App, event: audit::protocol::Event) {
    if let Some(pending) = &app.pending
        && let Err(e) = pending.record(&event)
    {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "cannot keep a console event for the audit trail"
        );
    }
}

pub(crate) fn page(title: &str, who: Option<&Session>, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang=(Lang::current().code()) {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " — " (t("つなぎ 院内コンソール", "tsunagi clinic console")) }
                    style { (STYLE) }
                }
                body {
                    header {
                        span.brand { (t("つなぎ 院内コンソール", "tsunagi clinic console")) }
                        @if let Some(s) = who {
                            nav aria-label=(t("メニュー", "Menu")) {
                                a href="/" { (t("接続状態", "Status")) }
                                " " a href="/patients" { (t("患者", "Patients")) }
                                " " a href="/held" { (t("保留中", "Held")) }
                                " " a href="/ssmix2" { (t("SS-MIX2 の点検", "SS-MIX2 check")) }
                                @if s.role == Role::Admin {
                                    " " a href="/accounts" { (t("アカウント", "Accounts")) }
                                    " " a href="/audit" { (t("監査", "Audit")) }
                                }
                            }
                        }
                        div {
                            @if let Some(s) = who {
                                span {
                                    @if en() { (s.account) " (" (s.role.words()) ")" }
                                    @else { (s.account) "（" (s.role.words()) "）" }
                                }
                                form method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(s.csrf);
                                    button type="submit" { (t("ログアウト", "Log out")) }
                                }
                            }
                            @if en() {
                                a.lang href="/lang/ja" lang="ja" hreflang="ja" { "日本語" }
                            } @else {
                                a.lang href="/lang/en" lang="en" hreflang="en" { "English" }
                            }
                        }
                    }
                    main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

const STYLE: &str = "body{font-family:sans-serif;margin:0;color:#1a1a1a;background:#fff}\
header{display:flex;justify-content:space-between;align-items:center;padding:.5rem 1rem;background:#0b3d66;color:#fff}\
header form{display:inline;margin-left:1rem}header a{color:#fff;margin-right:1rem}header a.lang{margin-left:1rem;margin-right:0}main{padding:1rem;max-width:60rem}\
label{display:block;margin-top:.75rem}input{font-size:1rem;padding:.3rem}\
button{font-size:1rem;padding:.3rem 1rem;margin-top:1rem}table{border-collapse:collapse}\
th,td{border:1px solid #767676;padding:.3rem .6rem;text-align:left}th[scope=row],td.state{white-space:nowrap}\
table+table{margin-top:1rem}\
.ok{color:#0a6b0a}.warn{color:#8a4b00}.bad{color:#b00020}.msg{border:2px solid #b00020;padding:.5rem}.done{border:2px solid #0a6b0a;padding:.5rem}\
code{font-size:1.1rem;overflow-wrap:anywhere}.nowrap{white-space:nowrap}form.inline{display:inline}form.inline button{margin-top:0}\
fieldset{margin-top:.75rem}fieldset.picklist{max-height:16rem;overflow-y:auto}label.choice{display:inline-block;margin-right:1rem}\
.receipt{border:1px solid #767676;padding:1rem;max-width:40rem}\
@media print{header,.noprint,form{display:none}}";

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
    code: String,
    csrf: String,
}

fn login_page(token: &str, setup: bool, message: Option<&str>) -> Html<String> {
    page(
        t("ログイン", "Log in"),
        None,
        html! {
            @if let Some(m) = message {
                p.msg role="alert" { (m) }
            }
            form method="post" action="/login" {
                input type="hidden" name="csrf" value=(token);
                label for="name" { (t("アカウント名", "Account")) }
                input id="name" name="name" autocomplete="username" required;
                label for="password" { (t("パスワード", "Password")) }
                input id="password" name="password" type="password" autocomplete="current-password" required;
                label for="code" { (t("確認コード（認証アプリの6桁）", "Code (the 6 digits of the authenticator app)")) }
                input id="code" name="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}" required;
                button type="submit" { (t("ログイン", "Log in")) }
            }
            @if setup {
                p { a href="/setup" { (t("最初の管理者を登録する（初期設定コードが必要です）", "Set up the first administrator (needs the setup code)")) } }
            }
        },
    )
}

/// A fresh per-browser form token, set as its cookie.
fn form_token() -> Result<(String, HeaderValue), Trouble> {
    let token = accounts::random_token().map_err(|_| Trouble)?;
    let cookie = set_cookie(FORM_COOKIE, &token, Some(3600));
    Ok((token, cookie))
}

async fn setup_offered(app: &Shared) -> Result<bool, Trouble> {
    with_accounts(app, |a| Ok(a.count()? == 0 && a.setup_pending(now())?)).await
}

async fn login_form(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match session(&app, &headers).await {
        Ok(Some(_)) => return Redirect::to("/").into_response(),
        Ok(None) => {}
        Err(t) => return t.into_response(),
    }
    let setup = match setup_offered(&app).await {
        Ok(s) => s,
        Err(t) => return t.into_response(),
    };
    match form_token() {
        Ok((token, cookie)) => (
            [(header::SET_COOKIE, cookie)],
            login_page(&token, setup, None),
        )
            .into_response(),
        Err(t) => t.into_response(),
    }
}

/// The form token of a request before login matches its cookie.
fn form_token_ok(headers: &HeaderMap, submitted: &str) -> bool {
    cookie(headers, FORM_COOKIE)
        .is_some_and(|c| !c.is_empty() && accounts::same(c.as_bytes(), submitted.as_bytes()))
}

async fn login(
    State(app): State<Shared>,
    Extension(Peer(peer)): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !form_token_ok(&headers, &form.csrf) {
        return refused_cross_site();
    }
    let policy = app.policy;
    let name = form.name.trim().to_owned();
    let attempt = name.clone();
    let result = match with_accounts(&app, move |a| {
        a.login(&attempt, &form.password, &form.code, now(), &policy)
    })
    .await
    {
        Ok(r) => r,
        Err(t) => return t.into_response(),
    };
    let from = peer.ip().to_string();
    match result {
        Ok(new) => {
            audit(
                &app,
                audit::protocol::Event::UserAuthentication {
                    user: name.clone(),
                    from,
                    logout: false,
                    success: true,
                },
            );
            tracing::info!(peer = %peer.ip(), "a console login");
            (
                // Appended: a header array would keep only the last cookie.
                AppendHeaders([
                    (
                        header::SET_COOKIE,
                        set_cookie(SESSION_COOKIE, &new.token, None),
                    ),
                    (header::SET_COOKIE, set_cookie(FORM_COOKIE, "", Some(0))),
                ]),
                Redirect::to("/"),
            )
                .into_response()
        }
        Err(refused) => {
            // The name typed is kept for the trail only when it is a well-formed one.
            let user = if accounts::valid_name(&name).is_ok() {
                name
            } else {
                "(invalid)".to_owned()
            };
            audit(
                &app,
                audit::protocol::Event::UserAuthentication {
                    user: user.clone(),
                    from: from.clone(),
                    logout: false,
                    success: false,
                },
            );
            // The failure that locked the account: the lockout is a change to it.
            if let Refused::Locked { now: true, .. } = refused {
                audit(
                    &app,
                    audit::protocol::Event::AccountChange {
                        admin: "(console)".to_owned(),
                        from,
                        account: user,
                        role_changed: false,
                        what: format!(
                            "locked after {} failed logins in a row",
                            app.policy.lockout_after
                        ),
                    },
                );
            }
            tracing::info!(peer = %peer.ip(), locked = matches!(refused, Refused::Locked { .. }), "a console login refused");
            let message = match refused {
                Refused::Locked { until, .. } => {
                    let minutes = ((until - now()).max(60) + 59) / 60;
                    if en() {
                        format!("After repeated failed logins this account is locked. Please try again in about {minutes} min.")
                    } else {
                        format!("ログインの失敗が続いたため、このアカウントはロックされています。約{minutes}分後にもう一度お試しください。")
                    }
                }
                _ => t(
                    "ログインできませんでした。アカウント名・パスワード・確認コードを確かめてください。",
                    "The login failed. Check the account, the password and the code.",
                )
                .to_owned(),
            };
            let setup = setup_offered(&app).await.unwrap_or(false);
            match form_token() {
                Ok((token, cookie)) => (
                    StatusCode::UNAUTHORIZED,
                    [(header::SET_COOKIE, cookie)],
                    login_page(&token, setup, Some(&message)),
                )
                    .into_response(),
                Err(t) => t.into_response(),
            }
        }
    }
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(app): State<Shared>,
    Extension(Peer(peer)): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    let (token, s) = match session(&app, &headers).await {
        Ok(Some(found)) => found,
        Ok(None) => return Redirect::to("/login").into_response(),
        Err(t) => return t.into_response(),
    };
    if !accounts::same(s.csrf.as_bytes(), form.csrf.as_bytes()) {
        return refused_cross_site();
    }
    if let Err(t) = with_accounts(&app, move |a| a.logout(&token)).await {
        return t.into_response();
    }
    audit(
        &app,
        audit::protocol::Event::UserAuthentication {
            user: s.account,
            from: peer.ip().to_string(),
            logout: true,
            success: true,
        },
    );
    (
        [(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", Some(0)))],
        Redirect::to("/login"),
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        page(
            t("ページがありません", "No such page"),
            None,
            html! { p { a href="/" { (t("接続状態へ", "To the status page")) } } },
        ),
    )
        .into_response()
}

/// A service's name as the staff know it.
fn service_name(name: &str) -> &str {
    match name {
        "tunnel" => t("ネットワーク接続（VPN）", "Network link (VPN)"),
        "identity" => t("証明書", "Certificate"),
        "consent" => t("同意・名寄せ", "Consent and identity"),
        "ssmix2" => t("SS-MIX2 同期", "SS-MIX2 sync"),
        "dicom" => t("DICOM 中継", "DICOM bridge"),
        "audit" => t("監査証跡", "Audit trail"),
        "update" => t("更新", "Updates"),
        "console" => t("院内コンソール", "Clinic console"),
        "heartbeat" => t("死活監視", "Heartbeat"),
        other => other,
    }
}

fn state_words(state: ServiceState, health: Health) -> (&'static str, &'static str) {
    match (state, health) {
        (ServiceState::Ready, Health::Ok) => (t("正常", "OK"), "ok"),
        (ServiceState::Ready, Health::Degraded) => (t("要確認", "Needs a look"), "warn"),
        (ServiceState::Ready, Health::Unknown) | (ServiceState::Starting, _) => {
            (t("起動中", "Starting"), "warn")
        }
        (ServiceState::Backoff, _) => (t("再起動待ち", "Waiting to restart"), "bad"),
        (ServiceState::Failed, _) => (t("停止（障害）", "Stopped (failed)"), "bad"),
        (ServiceState::Stopping | ServiceState::Stopped, _) => (t("停止", "Stopped"), "bad"),
    }
}

/// 接続状態: whether the box is linked to the network, since when, and each part.
fn status_page(who: &Session, report: Option<&StatusReport>) -> Html<String> {
    let body = match report {
        None => html! {
            p.bad role="alert" { (t("装置の状態を読み取れません。装置の電源とケーブルを確かめてください。", "The box's state cannot be read. Check its power and cables.")) }
        },
        Some(r) => {
            let tunnel = r.services.iter().find(|s| s.name == "tunnel");
            let connected =
                tunnel.is_some_and(|t| t.state == ServiceState::Ready && t.health == Health::Ok);
            html! {
                @if connected {
                    p.ok { strong { (t("ネットワークに接続しています。", "Connected to the network.")) } }
                } @else {
                    p.bad role="alert" { strong { (t("ネットワークに接続していません。", "Not connected to the network.")) } }
                }
                (Overview::of(r).render(consent::time::now()))
                table {
                    caption { (t("各機能の状態", "Each part of the box")) }
                    thead { tr {
                        th scope="col" { (t("機能", "Part")) }
                        th scope="col" { (t("状態", "State")) }
                        th scope="col" { (t("詳細（運用者向け、英語）", "Details (for operators)")) }
                    } }
                    tbody {
                        @for s in &r.services {
                            @let (words, class) = state_words(s.state, s.health);
                            tr {
                                th scope="row" { (service_name(&s.name)) }
                                td class=(format!("{class} state")) { (words) }
                                td { (s.summary) }
                            }
                        }
                    }
                }
            }
        }
    };
    page(t("接続状態", "Status"), Some(who), body)
}

async fn home(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let who = match session(&app, &headers).await {
        Ok(Some((_, s))) => s,
        Ok(None) => return Redirect::to("/login").into_response(),
        Err(t) => return t.into_response(),
    };
    let socket = app.status_socket.clone();
    let report =
        tokio::task::spawn_blocking(move || tsunagi_runtime::control::query_status(&socket))
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::warn!(error = &e as &dyn std::error::Error, "no status"))
                    .ok()
            });
    status_page(&who, report.as_ref()).into_response()
}

#[derive(Deserialize)]
struct SetupForm {
    setup_code: String,
    name: String,
    password: String,
    password_again: String,
    secret: String,
    code: String,
    csrf: String,
}

fn setup_page(app: &App, token: &str, secret: &[u8], message: Option<&str>) -> Html<String> {
    let base32 = accounts::totp_base32(secret);
    let issuer = format!("tsunagi {}", app.facility);
    page(
        t("最初の管理者の登録", "Set up the first administrator"),
        None,
        html! {
            @if let Some(m) = message {
                p.msg role="alert" { (m) }
            }
            p { (t("ネットワーク運用者から届いた初期設定コードで、この装置の最初の管理者を登録します。", "With the setup code from the network operator, register this box's first administrator.")) }
            form method="post" action="/setup" {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="secret" value=(base32);
                label for="setup_code" { (t("初期設定コード", "Setup code")) }
                input id="setup_code" name="setup_code" autocomplete="off" required;
                label for="name" { (t("アカウント名（英小文字・数字）", "Account (lower-case letters and digits)")) }
                input id="name" name="name" autocomplete="username" required;
                label for="password" {
                    @if en() { "Password (at least " (accounts::MIN_PASSWORD_CHARS) " characters)" }
                    @else { "パスワード（" (accounts::MIN_PASSWORD_CHARS) "文字以上）" }
                }
                input id="password" name="password" type="password" autocomplete="new-password" required;
                label for="password_again" { (t("パスワード（確認）", "Password (again)")) }
                input id="password_again" name="password_again" type="password" autocomplete="new-password" required;
                p { (t("認証アプリにこの鍵を登録してください（種類: 時間ベース）。", "Add this key to an authenticator app (type: time-based).")) }
                p { code { (base32) } }
                p { a href=(accounts::otpauth_uri(secret, &issuer, "admin")) { (t("この端末の認証アプリで開く", "Open in this device's authenticator app")) } }
                label for="code" { (t("認証アプリに表示された6桁の確認コード", "The 6-digit code the authenticator app shows")) }
                input id="code" name="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}" required;
                button type="submit" { (t("登録", "Register")) }
            }
        },
    )
}

async fn setup_form(State(app): State<Shared>) -> Response {
    match setup_offered(&app).await {
        Ok(true) => {}
        Ok(false) => return not_found().await,
        Err(t) => return t.into_response(),
    }
    let secret = match accounts::random(accounts::TOTP_SECRET_LEN) {
        Ok(s) => s,
        Err(_) => return Trouble.into_response(),
    };
    match form_token() {
        Ok((token, cookie)) => (
            [(header::SET_COOKIE, cookie)],
            setup_page(&app, &token, &secret, None),
        )
            .into_response(),
        Err(t) => t.into_response(),
    }
}

async fn setup(
    State(app): State<Shared>,
    Extension(Peer(peer)): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<SetupForm>,
) -> Response {
    if !form_token_ok(&headers, &form.csrf) {
        return refused_cross_site();
    }
    let secret = accounts::totp_secret(&form.secret).unwrap_or_default();
    let again = |app: &App, secret: &[u8], message: &str| match form_token() {
        Ok((token, cookie)) => (
            StatusCode::BAD_REQUEST,
            [(header::SET_COOKIE, cookie)],
            setup_page(app, &token, secret, Some(message)),
        )
            .into_response(),
        Err(t) => t.into_response(),
    };
    if form.password != form.password_again {
        return again(
            &app,
            &secret,
            t("パスワードが一致しません", "The passwords do not match"),
        );
    }
    let name = form.name.trim().to_owned();
    let (n, s) = (name.clone(), secret.clone());
    let result = match with_accounts(&app, move |a| {
        a.setup_admin(&form.setup_code, &n, &form.password, &s, &form.code, now())
    })
    .await
    {
        Ok(r) => r,
        Err(t) => return t.into_response(),
    };
    match result {
        Ok(()) => {
            tracing::info!(peer = %peer.ip(), "the console's first administrator registered");
            page(
                t("登録しました", "Registered"),
                None,
                html! {
                    p { (t("最初の管理者を登録しました。初期設定コードはもう使えません。", "The first administrator is registered. The setup code cannot be used again.")) }
                    p { a href="/login" { (t("ログインへ", "To the login")) } }
                },
            )
            .into_response()
        }
        Err(Refused::SetupCode) => {
            audit(
                &app,
                audit::protocol::Event::UserAuthentication {
                    user: "(setup)".to_owned(),
                    from: peer.ip().to_string(),
                    logout: false,
                    success: false,
                },
            );
            again(
                &app,
                &secret,
                t(
                    "初期設定コードが違うか、使用済みか、期限切れです",
                    "The setup code is wrong, used or expired",
                ),
            )
        }
        Err(other) => again(&app, &secret, &other.to_string()),
    }
}

/// The session of a request that only an administrator may make, with its form token
/// checked for a POST (`csrf`); otherwise the answer to give.
async fn admin(app: &Shared, headers: &HeaderMap, csrf: Option<&str>) -> Result<Session, Response> {
    let s = match session(app, headers).await {
        Ok(Some((_, s))) => s,
        Ok(None) => return Err(Redirect::to("/login").into_response()),
        Err(t) => return Err(t.into_response()),
    };
    if let Some(token) = csrf
        && !accounts::same(s.csrf.as_bytes(), token.as_bytes())
    {
        return Err(refused_cross_site());
    }
    if s.role != Role::Admin {
        return Err((
            StatusCode::FORBIDDEN,
            page(
                t("権限がありません", "Not allowed"),
                Some(&s),
                html! { p { (t("この操作は管理者だけができます。", "Only an administrator can do this.")) } },
            ),
        )
            .into_response());
    }
    Ok(s)
}

fn accounts_view(who: &Session, list: &[AccountInfo], message: Option<&str>) -> Html<String> {
    page(
        t("アカウント", "Accounts"),
        Some(who),
        html! {
            @if let Some(m) = message {
                p.done role="status" { (m) }
            }
            table {
                caption { (t("スタッフのアカウント", "Staff accounts")) }
                thead { tr {
                    th scope="col" { (t("アカウント名", "Account")) } th scope="col" { (t("役割", "Role")) }
                    th scope="col" { (t("状態", "State")) } th scope="col" { (t("操作", "Actions")) }
                } }
                tbody {
                    @for a in list {
                        tr {
                            th scope="row" { (a.name) }
                            td {
                                form method="post" action="/accounts/change" {
                                    input type="hidden" name="csrf" value=(who.csrf);
                                    input type="hidden" name="name" value=(a.name);
                                    input type="hidden" name="action" value="role";
                                    label for=(format!("role-{}", a.name)) { (t("役割", "Role")) }
                                    select id=(format!("role-{}", a.name)) name="role" {
                                        @for r in Role::ALL {
                                            option value=(r.as_str()) selected[r == a.role] { (r.words()) }
                                        }
                                    }
                                    button type="submit" { (t("変更", "Change")) }
                                }
                            }
                            td {
                                @if a.locked_until.is_some() { span.bad { (t("ロック中", "Locked")) } } @else { (t("利用可", "Usable")) }
                            }
                            td {
                                @if a.locked_until.is_some() {
                                    form method="post" action="/accounts/change" {
                                        input type="hidden" name="csrf" value=(who.csrf);
                                        input type="hidden" name="name" value=(a.name);
                                        input type="hidden" name="action" value="unlock";
                                        button type="submit" { (t("ロック解除", "Unlock")) }
                                    }
                                }
                                form method="post" action="/accounts/change" {
                                    input type="hidden" name="csrf" value=(who.csrf);
                                    input type="hidden" name="name" value=(a.name);
                                    input type="hidden" name="action" value="remove";
                                    button type="submit" { (t("削除", "Remove")) }
                                }
                            }
                        }
                    }
                }
            }
            h2 { (t("アカウントの追加", "Add an account")) }
            form method="post" action="/accounts/add" {
                input type="hidden" name="csrf" value=(who.csrf);
                label for="name" { (t("アカウント名（英小文字・数字）", "Account (lower-case letters and digits)")) }
                input id="name" name="name" autocomplete="off" required;
                label for="role" { (t("役割", "Role")) }
                select id="role" name="role" {
                    @for r in Role::ALL { option value=(r.as_str()) { (r.words()) } }
                }
                label for="password" {
                    @if en() { "Initial password (at least " (accounts::MIN_PASSWORD_CHARS) " characters)" }
                    @else { "初期パスワード（" (accounts::MIN_PASSWORD_CHARS) "文字以上）" }
                }
                input id="password" name="password" type="password" autocomplete="new-password" required;
                button type="submit" { (t("追加", "Add")) }
            }
        },
    )
}

async fn accounts_list(app: &Shared) -> Result<Vec<AccountInfo>, Response> {
    with_accounts(app, |a| a.list(now()))
        .await
        .map_err(IntoResponse::into_response)
}

async fn accounts_page(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let who = match admin(&app, &headers, None).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match accounts_list(&app).await {
        Ok(list) => accounts_view(&who, &list, None).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct AddForm {
    csrf: String,
    name: String,
    role: String,
    password: String,
}

async fn account_add(
    State(app): State<Shared>,
    Extension(Peer(peer)): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<AddForm>,
) -> Response {
    let who = match admin(&app, &headers, Some(&form.csrf)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(role) = Role::parse(&form.role) else {
        return (StatusCode::BAD_REQUEST, "unknown role").into_response();
    };
    let secret = match accounts::random(accounts::TOTP_SECRET_LEN) {
        Ok(s) => s,
        Err(_) => return Trouble.into_response(),
    };
    let name = form.name.trim().to_owned();
    let (n, s) = (name.clone(), secret.clone());
    let added = match with_accounts(&app, move |a| a.add(&n, role, &form.password, &s, now())).await
    {
        Ok(r) => r,
        Err(t) => return t.into_response(),
    };
    if let Err(refused) = added {
        return match accounts_list(&app).await {
            Ok(list) => (
                StatusCode::BAD_REQUEST,
                accounts_view(&who, &list, Some(&refused.to_string())),
            )
                .into_response(),
            Err(r) => r,
        };
    }
    audit(
        &app,
        audit::protocol::Event::AccountChange {
            admin: who.account.clone(),
            from: peer.ip().to_string(),
            account: name.clone(),
            role_changed: true,
            what: format!("account added with the role {}", role.as_str()),
        },
    );
    let issuer = format!("tsunagi {}", app.facility);
    page(
        t("アカウントを追加しました", "Account added"),
        Some(&who),
        html! {
            p {
                @if en() { (name) " (" (role.words()) ") is added." }
                @else { (name) "（" (role.words()) "）を追加しました。" }
            }
            p { (t("本人の認証アプリにこの鍵を登録してもらってください（種類: 時間ベース）。この鍵はこの画面でしか表示されません。", "Have the account's owner add this key to their authenticator app (type: time-based). The key is shown on this page only.")) }
            p { code { (accounts::totp_base32(&secret)) } }
            p { a href=(accounts::otpauth_uri(&secret, &issuer, &name)) { (t("認証アプリで開く", "Open in the authenticator app")) } }
            p { a href="/accounts" { (t("アカウント一覧へ", "To the accounts")) } }
        },
    )
    .into_response()
}

#[derive(Deserialize)]
struct ChangeForm {
    csrf: String,
    name: String,
    action: String,
    #[serde(default)]
    role: Option<String>,
}

async fn account_change(
    State(app): State<Shared>,
    Extension(Peer(peer)): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<ChangeForm>,
) -> Response {
    let who = match admin(&app, &headers, Some(&form.csrf)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let name = form.name.clone();
    let (role_changed, what, done) = match form.action.as_str() {
        "role" => {
            let Some(role) = form.role.as_deref().and_then(Role::parse) else {
                return (StatusCode::BAD_REQUEST, "unknown role").into_response();
            };
            let n = name.clone();
            (
                true,
                format!("role changed to {}", role.as_str()),
                with_accounts(&app, move |a| a.set_role(&n, role)).await,
            )
        }
        "unlock" => {
            let n = name.clone();
            (
                false,
                "unlocked".to_owned(),
                with_accounts(&app, move |a| a.unlock(&n)).await,
            )
        }
        "remove" => {
            let n = name.clone();
            (
                false,
                "removed".to_owned(),
                with_accounts(&app, move |a| a.remove(&n)).await,
            )
        }
        _ => return (StatusCode::BAD_REQUEST, "unknown action").into_response(),
    };
    let message = match done {
        Err(t) => return t.into_response(),
        Ok(Err(refused)) => refused.to_string(),
        Ok(Ok(())) => {
            audit(
                &app,
                audit::protocol::Event::AccountChange {
                    admin: who.account.clone(),
                    from: peer.ip().to_string(),
                    account: name.clone(),
                    role_changed,
                    what,
                },
            );
            if en() {
                format!("{name} is changed")
            } else {
                format!("{name} を変更しました")
            }
        }
    };
    // The administrator may have changed their own role: the page follows the session.
    match session(&app, &headers).await {
        Ok(Some((_, s))) if s.role == Role::Admin => match accounts_list(&app).await {
            Ok(list) => accounts_view(&s, &list, Some(&message)).into_response(),
            Err(r) => r,
        },
        Ok(_) => Redirect::to("/login").into_response(),
        Err(t) => t.into_response(),
    }
}
