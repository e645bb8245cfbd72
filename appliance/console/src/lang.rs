//! The console's language: Japanese first, English when the browser chose it (issue 19:
//! "Japanese first, English switchable").
//!
//! The choice is a cookie ([`COOKIE`], set by `GET /lang/en` or `/lang/ja` from the link in
//! every page's header); it carries nothing else and changes nothing on the box. Each request
//! is answered in its language: [`language`] (a layer around every route) puts it in a
//! task-local for the request, and the pages' words ask for it ([`t`], [`en`]). Outside a
//! request (unit tests, logs) the language is Japanese.

use std::future::Future;

use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

/// The language cookie (`__Host-`: Secure, `Path=/`, no domain).
pub const COOKIE: &str = "__Host-tsunagi-lang";

/// How long the choice is kept: a year.
const KEPT: i64 = 365 * 86_400;

/// A language of the console's pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Lang {
    #[default]
    Ja,
    En,
}

tokio::task_local! {
    static LANG: Lang;
}

impl Lang {
    /// The language a request asks for: its cookie says `en`, else Japanese.
    pub fn of(headers: &HeaderMap) -> Lang {
        if crate::web::cookie(headers, COOKIE).as_deref() == Some("en") {
            Lang::En
        } else {
            Lang::Ja
        }
    }

    /// The language of the request being answered (Japanese outside one).
    pub fn current() -> Lang {
        LANG.try_with(|l| *l).unwrap_or_default()
    }

    /// The BCP 47 code (`<html lang>`).
    pub fn code(self) -> &'static str {
        match self {
            Lang::Ja => "ja",
            Lang::En => "en",
        }
    }

    /// Runs `f` with this language as the current one (a request, or a test).
    pub fn scope<F: Future>(self, f: F) -> impl Future<Output = F::Output> {
        LANG.scope(self, f)
    }

    /// Runs `f` with this language as the current one, synchronously (tests).
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        LANG.sync_scope(self, f)
    }
}

/// The words in the language of the request being answered.
pub fn t(ja: &'static str, en: &'static str) -> &'static str {
    match Lang::current() {
        Lang::Ja => ja,
        Lang::En => en,
    }
}

/// Whether the request is answered in English (for words put together with values).
pub fn en() -> bool {
    Lang::current() == Lang::En
}

/// The layer that answers each request in the language it asks for.
pub async fn language(request: axum::extract::Request, next: Next) -> Response {
    let lang = Lang::of(request.headers());
    lang.scope(next.run(request)).await
}

/// `GET /lang/en`, `GET /lang/ja`: keeps the choice in its cookie, back to the start page.
pub async fn choose(axum::extract::Path(code): axum::extract::Path<String>) -> Response {
    let value = if code == "en" { "en" } else { "ja" };
    (
        [(
            header::SET_COOKIE,
            crate::web::set_cookie(COOKIE, value, Some(KEPT)),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn japanese_unless_the_cookie_says_english() {
        let mut h = HeaderMap::new();
        assert_eq!(Lang::of(&h), Lang::Ja);
        h.insert(header::COOKIE, format!("a=b; {COOKIE}=en").parse().unwrap());
        assert_eq!(Lang::of(&h), Lang::En);
        assert_eq!(t("はい", "yes"), "はい", "outside a request: Japanese");
        assert_eq!(Lang::En.sync_scope(|| t("はい", "yes")), "yes");
        assert!(Lang::En.sync_scope(en));
    }
}
