//! SS-MIX2 の点検: the conformance report of the clinic's SS-MIX2 storage, as the sync
//! service keeps it after each cycle (`ssmix2_sync::report_path`: a file in a directory of
//! group `tsunagi-desk`, which only the console is in). The files by status, then each
//! problem, the worst first, in Japanese, with a few of its files. Every role may look: the
//! staff fix the files at the EMR.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use ssmix2::conformance::Conformance;

use crate::lang::{en, t};
use crate::overview::time_words;
use crate::web::{Shared, page, session};

/// What the console knows of a report an SS-MIX2 sync keeps for it.
#[derive(Debug)]
pub enum Kept<T> {
    /// The sync is not enabled.
    NotUsed,
    /// Enabled, no report yet (its first cycle runs, or it cannot run).
    NotYet,
    Unreadable(String),
    Kept(Box<T>),
}

/// The conformance report as the console knows it.
pub type Report = Kept<Conformance>;

/// Reads the JSON report the sync keeps at `path` (`None`: the sync is not enabled).
pub fn read_kept<T: serde::de::DeserializeOwned>(path: Option<&std::path::Path>) -> Kept<T> {
    let Some(path) = path else {
        return Kept::NotUsed;
    };
    let unreadable = |why: String| {
        tracing::warn!(%why, path = %path.display(), "a report of the SS-MIX2 sync cannot be read");
        Kept::Unreadable(why)
    };
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Kept::NotYet,
        Err(e) => unreadable(e.to_string()),
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(c) => Kept::Kept(Box::new(c)),
            Err(e) => unreadable(e.to_string()),
        },
    }
}

/// Reads the conformance report the sync keeps at `path` (`None`: the sync is not enabled).
pub fn read(path: Option<&std::path::Path>) -> Report {
    read_kept(path)
}

fn severity_words(severity: &str) -> (&'static str, &'static str) {
    match severity {
        "quarantine" => (
            t(
                "隔離（ネットワークに送りません）",
                "Quarantined (not sent to the network)",
            ),
            "bad",
        ),
        "anomaly" => (
            t(
                "異常（送りますが確認が必要です）",
                "Anomaly (sent, but needs checking)",
            ),
            "warn",
        ),
        _ => (t("注意", "Notice"), "warn"),
    }
}

/// The page's body.
pub fn body(report: &Report) -> Markup {
    match report {
        Kept::NotUsed => {
            html! { p { (t("この装置では SS-MIX2 の同期を使用していません。", "This box does not use the SS-MIX2 sync.")) } }
        }
        Kept::NotYet => html! {
            p.warn role="status" { (t("まだ点検の結果がありません。SS-MIX2 同期の最初の点検中か、同期が動いていません（接続状態で確かめてください）。", "No check results yet. The SS-MIX2 sync is doing its first check, or it is not running (check Status).")) }
        },
        Kept::Unreadable(_) => {
            html! { p.bad role="alert" { (t("点検の結果を読み取れません。運用者に連絡してください。", "Cannot read the check results. Contact the operator.")) } }
        }
        Kept::Kept(c) => html! {
            p { (t("最終点検: ", "Last check: ")) (time_words(c.at)) }
            table {
                caption { (t("ファイル数", "Files")) }
                tbody {
                    tr { th scope="row" { (t("合計", "Total")) } td { (c.files) } }
                    tr { th scope="row" { (t("最新版", "Current version")) } td { (c.status("current")) } }
                    tr { th scope="row" { (t("更新前の版", "Earlier versions")) } td { (c.status("superseded")) } }
                    tr { th scope="row" { (t("削除", "Deleted")) } td { (c.status("deleted")) } }
                    tr { th scope="row" { (t("隔離", "Quarantined")) } td class=(if c.status("quarantined") > 0 { "bad" } else { "ok" }) { (c.status("quarantined")) } }
                }
            }
            @if c.problems.is_empty() {
                p.ok { strong { (t("問題はありません。", "No problems found.")) } }
            } @else {
                h2 { (t("見つかった問題（重いものから）", "Problems found (worst first)")) }
                @for p in &c.problems {
                    @let (words, class) = severity_words(&p.severity);
                    section {
                        h3 {
                            @if en() {
                                span class=(class) { (words) } ": " (p.english) " (files: " (p.count) ")"
                            } @else {
                                span class=(class) { (words) } " " (p.japanese) "（" (p.count) " 件）"
                            }
                        }
                        p {
                            small lang="en" {
                                @if en() {
                                    "[" (p.code) "]"
                                } @else {
                                    (p.english) " [" (p.code) "]"
                                }
                            }
                        }
                        ul {
                            @for path in &p.examples { li { code { (path) } } }
                            @if p.count > p.examples.len() as u64 {
                                li {
                                    @if en() {
                                        "and " (p.count - p.examples.len() as u64) " more"
                                    } @else {
                                        "ほか " (p.count - p.examples.len() as u64) " 件"
                                    }
                                }
                            }
                        }
                    }
                }
                p { (t("隔離されたファイルはネットワークに送られません。電子カルテの側でファイルを直すと、次の点検で送られます。", "Quarantined files are not sent to the network. Once a file is fixed in the EMR, it is sent after the next check.")) }
            }
        },
    }
}

/// GET `/ssmix2`.
pub async fn page_of(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let who = match session(&app, &headers).await {
        Ok(Some((_, s))) => s,
        Ok(None) => return Redirect::to("/login").into_response(),
        Err(trouble) => return trouble.into_response(),
    };
    let path = app.ssmix2_report.clone();
    let report = tokio::task::spawn_blocking(move || read(path.as_deref()))
        .await
        .unwrap_or_else(|e| Kept::Unreadable(e.to_string()));
    let status = if matches!(report, Kept::Unreadable(_)) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        status,
        page(
            t("SS-MIX2 の点検", "SS-MIX2 check"),
            Some(&who),
            body(&report),
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Conformance {
        Conformance {
            at: 1_796_544_000,
            files: 12,
            by_status: [("current".to_owned(), 9), ("quarantined".to_owned(), 3)].into(),
            problems: vec![ssmix2::conformance::Problem {
                code: "BAD_NAME".into(),
                severity: "quarantine".into(),
                count: 7,
                japanese: "ファイル名またはフォルダ名がSS-MIX2の命名規約に従っていません".into(),
                english: "the file or folder name does not follow the SS-MIX2 naming convention"
                    .into(),
                examples: vec!["000/000/0000000001/20261120/OMP-01/bad".into()],
            }],
        }
    }

    #[test]
    fn the_report_reads_in_japanese_with_its_counts_problems_and_files() {
        let html = body(&Kept::Kept(Box::new(report()))).into_string();
        for words in [
            "最終点検: 2026-12-06 17:00",
            "<th scope=\"row\">合計</th><td>12</td>",
            "<td class=\"bad\">3</td>",
            "隔離（ネットワークに送りません）",
            "命名規約に従っていません（7 件）",
            "<code>000/000/0000000001/20261120/OMP-01/bad</code>",
            "ほか 6 件",
        ] {
            assert!(html.contains(words), "{words}: {html}");
        }
        let mut clean = report();
        clean.problems.clear();
        clean.by_status.remove("quarantined");
        assert!(
            body(&Kept::Kept(Box::new(clean)))
                .into_string()
                .contains("問題はありません")
        );
    }

    #[test]
    fn a_missing_or_unreadable_report_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conformance.json");
        assert!(matches!(read(None), Kept::NotUsed));
        assert!(matches!(read(Some(&path)), Kept::NotYet));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(read(Some(&path)), Kept::Unreadable(_)));
        std::fs::write(&path, serde_json::to_vec(&report()).unwrap()).unwrap();
        assert!(matches!(read(Some(&path)), Kept::Kept(_)));
    }
}
