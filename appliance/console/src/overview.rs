//! 接続状態's overview: the few facts the staff ask about, read from the metrics each service
//! reports to the supervisor (the same numbers `tsunagi status --json` and the Prometheus
//! endpoint show), never from the services' English summaries.
//!
//! - connected or not, and since when: the tunnel's `up` and `link_since_timestamp_seconds`;
//! - the last consent sync: the consent service's `last_pull_timestamp_seconds` and `stale`;
//! - the network's facility directory: the consent service's `directory_facilities`,
//!   `directory_unreadable` and `directory_refreshed_timestamp_seconds`;
//! - the queues: the DICOM bridge's `spool_pending|held|dead`, SS-MIX2's `outbox_depth` and
//!   `held_files`;
//! - the update: the running version, and the update service's `update_staged` and
//!   `update_check_failing`;
//! - the clock: the tunnel's `clock_in_step`, `clock_sync_lost` and `clock_offset_seconds`.
//!
//! A fact whose service does not run or has not reported yet says so; nothing is guessed.

use maud::{Markup, html};
use tsunagi_runtime::status::{ServiceState, ServiceStatus, StatusReport};

use crate::lang::{en, t};

/// The network link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Link {
    /// Up (handshake fresh, the hub's health check answers) since this Unix time, if known.
    Up(Option<i64>),
    /// Down or degraded since this Unix time, if known.
    Down(Option<i64>),
    /// The tunnel service does not run, or has not reported.
    Unknown,
}

/// The consent cache's last pull from the network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sync {
    /// Pulled at this Unix time; `stale`: beyond the freshness bound, so decisions for
    /// recipients outside the clinic deny.
    At { at: i64, stale: bool },
    /// Never pulled (decisions for recipients outside the clinic deny).
    Never,
    /// The consent service does not run, or has not reported.
    Unknown,
}

/// The network's facility directory, as the consent service keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Directory {
    /// Facilities offered by name (inactive ones included).
    pub listed: u64,
    /// Entries not understood, or sharing a code: not offered.
    pub unreadable: u64,
    /// When it was last read whole (never: `None`).
    pub at: Option<i64>,
}

/// One queue of what waits to leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Queue {
    /// Waiting to be sent.
    pub pending: u64,
    /// Held: no consent, no network ID yet, or refused input (the 保留中 page's items).
    pub held: u64,
    /// Given up on after permanent refusals (DICOM only).
    pub dead: u64,
}

/// The update channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The running software's version (the supervisor's).
    pub version: String,
    /// `None`: the update service does not run or has not reported.
    pub state: Option<UpdateState>,
}

/// Where the update service stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateState {
    /// The channel answers and no new release waits.
    Current,
    /// A new release is downloaded and verified, to be installed in the maintenance window.
    Staged,
    /// The channel cannot be checked.
    CheckFailing,
}

/// The box's clock against the hub's time server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clock {
    /// Within 1 s; the offset in seconds (the hub's clock minus the box's).
    InStep(f64),
    /// More than 1 s off.
    Off(f64),
    /// The time server does not answer.
    Lost,
    /// Checked, no answer yet.
    NotYet,
    /// No check configured, or the tunnel service does not run.
    NotChecked,
}

/// The certificate this page is served with (the console's own report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certificate {
    /// Issued by the network at enrollment; its end (Unix seconds).
    Network(i64),
    /// The config's own; its end.
    Configured(i64),
    /// The box's self-signed one (before enrollment, or the network's ended).
    SelfSigned,
}

/// `certificate_source` in the console's metrics.
pub fn certificate_source(source: crate::tls::Source) -> f64 {
    match source {
        crate::tls::Source::SelfSigned => 0.0,
        crate::tls::Source::Network => 1.0,
        crate::tls::Source::Configured => 2.0,
    }
}

/// What 接続状態 shows above the table of services.
#[derive(Debug, Clone, PartialEq)]
pub struct Overview {
    pub link: Link,
    pub sync: Sync,
    /// `None`: the consent service does not run, or has not reported.
    pub directory: Option<Directory>,
    /// `None`: the service does not run.
    pub dicom: Option<Queue>,
    pub ssmix2: Option<Queue>,
    pub update: Update,
    pub clock: Clock,
    /// `None`: the console has not reported yet.
    pub certificate: Option<Certificate>,
}

fn reporting<'a>(report: &'a StatusReport, name: &str) -> Option<&'a ServiceStatus> {
    report
        .services
        .iter()
        .find(|s| s.name == name && s.state == ServiceState::Ready && !s.metrics.is_empty())
}

fn metric(s: &ServiceStatus, name: &str) -> Option<f64> {
    s.metrics.get(name).copied().filter(|v| v.is_finite())
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counts and Unix seconds reported as f64 gauges"
)]
fn count(s: &ServiceStatus, name: &str) -> u64 {
    metric(s, name).map_or(0, |v| v.max(0.0) as u64)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "Unix seconds reported as f64 gauges"
)]
fn unix(s: &ServiceStatus, name: &str) -> Option<i64> {
    metric(s, name).map(|v| v as i64)
}

impl Overview {
    /// The overview of a status report.
    pub fn of(report: &StatusReport) -> Overview {
        let tunnel = reporting(report, "tunnel");
        let link = match tunnel {
            None => Link::Unknown,
            Some(t) => {
                let since = unix(t, "link_since_timestamp_seconds");
                if metric(t, "up") == Some(1.0) {
                    Link::Up(since)
                } else {
                    Link::Down(since)
                }
            }
        };
        let sync = match reporting(report, "consent") {
            None => Sync::Unknown,
            Some(c) => match unix(c, "last_pull_timestamp_seconds") {
                Some(at) => Sync::At {
                    at,
                    stale: metric(c, "stale") != Some(0.0),
                },
                None => Sync::Never,
            },
        };
        let directory = reporting(report, "consent").map(|c| Directory {
            listed: count(c, "directory_facilities"),
            unreadable: count(c, "directory_unreadable"),
            at: unix(c, "directory_refreshed_timestamp_seconds"),
        });
        let dicom = reporting(report, "dicom").map(|d| Queue {
            pending: count(d, "spool_pending"),
            held: count(d, "spool_held"),
            dead: count(d, "spool_dead"),
        });
        let ssmix2 = reporting(report, "ssmix2").map(|s| Queue {
            pending: count(s, "outbox_depth"),
            held: count(s, "held_files"),
            dead: 0,
        });
        let update = Update {
            version: report.supervisor.version.clone(),
            state: reporting(report, "update").map(|u| {
                if metric(u, "update_check_failing") == Some(1.0) {
                    UpdateState::CheckFailing
                } else if metric(u, "update_staged") == Some(1.0) {
                    UpdateState::Staged
                } else {
                    UpdateState::Current
                }
            }),
        };
        let clock = match tunnel {
            Some(t) if metric(t, "clock_in_step").is_some() => {
                let offset = metric(t, "clock_offset_seconds");
                match (
                    metric(t, "clock_in_step") == Some(1.0),
                    metric(t, "clock_sync_lost") == Some(1.0),
                    offset,
                ) {
                    (true, _, Some(o)) => Clock::InStep(o),
                    (_, true, _) => Clock::Lost,
                    (false, false, Some(o)) => Clock::Off(o),
                    _ => Clock::NotYet,
                }
            }
            _ => Clock::NotChecked,
        };
        let certificate = reporting(report, crate::NAME).and_then(|c| {
            let until = unix(c, "certificate_not_after_timestamp_seconds").unwrap_or(0);
            match metric(c, "certificate_source") {
                Some(0.0) => Some(Certificate::SelfSigned),
                Some(1.0) => Some(Certificate::Network(until)),
                Some(2.0) => Some(Certificate::Configured(until)),
                _ => None,
            }
        });
        Overview {
            link,
            sync,
            directory,
            dicom,
            ssmix2,
            update,
            clock,
            certificate,
        }
    }

    /// The overview as a table: one row per fact, its words and a class (`ok`, `warn`,
    /// `bad`) that colours them; the words alone carry the meaning.
    pub fn render(&self, now: i64) -> Markup {
        let rows = self.rows(now);
        html! {
            table {
                caption { (t("概要", "Overview")) }
                tbody {
                    @for (what, words, class) in &rows {
                        tr { th scope="row" { (what) } td class=(class) { (words) } }
                    }
                }
            }
        }
    }

    /// The rows of [`Overview::render`]: (the fact, its words, its class).
    pub fn rows(&self, now: i64) -> Vec<(&'static str, String, &'static str)> {
        let since = |t: Option<i64>| {
            t.map(|t| {
                if en() {
                    format!(" (since {})", time_words(t))
                } else {
                    format!("（{} から）", time_words(t))
                }
            })
            .unwrap_or_default()
        };
        let link = match self.link {
            Link::Up(t) => (
                if en() {
                    format!("Connected{}", since(t))
                } else {
                    format!("接続中{}", since(t))
                },
                "ok",
            ),
            Link::Down(t) => (
                if en() {
                    format!("Not connected{}", since(t))
                } else {
                    format!("接続していません{}", since(t))
                },
                "bad",
            ),
            Link::Unknown => (
                t(
                    "接続サービスが動いていません",
                    "The tunnel service is not running",
                )
                .to_owned(),
                "bad",
            ),
        };
        let sync = match self.sync {
            Sync::At { at, stale: false } => (
                if en() {
                    format!("{} ({})", time_words(at), ago_words(now - at))
                } else {
                    format!("{}（{}）", time_words(at), ago_words(now - at))
                },
                "ok",
            ),
            Sync::At { at, stale: true } => (
                if en() {
                    format!(
                        "{} ({}): out of date. Sending outside the clinic is stopped.",
                        time_words(at),
                        ago_words(now - at)
                    )
                } else {
                    format!(
                        "{}（{}）: 古くなっています。院外への送信は止めています。",
                        time_words(at),
                        ago_words(now - at)
                    )
                },
                "warn",
            ),
            Sync::Never => (
                t(
                    "まだ同期していません。院外への送信は止めています。",
                    "Not synced yet. Sending outside the clinic is stopped.",
                )
                .to_owned(),
                "warn",
            ),
            Sync::Unknown => (
                t(
                    "同意サービスが動いていません",
                    "The consent service is not running",
                )
                .to_owned(),
                "bad",
            ),
        };
        let directory = match self.directory {
            None => (
                t(
                    "同意サービスが動いていません",
                    "The consent service is not running",
                )
                .to_owned(),
                "bad",
            ),
            Some(Directory { at: None, .. }) => (
                t(
                    "まだ届いていません。施設は医療機関コードで入力します。",
                    "Not received yet. Enter facilities by their medical institution code.",
                )
                .to_owned(),
                "warn",
            ),
            Some(Directory {
                listed,
                unreadable: 0,
                at: Some(at),
            }) => (
                if en() {
                    format!("{listed} facilities (updated {})", time_words(at))
                } else {
                    format!("{listed} 施設（{} 更新）", time_words(at))
                },
                "ok",
            ),
            Some(Directory {
                listed,
                unreadable,
                at: Some(at),
            }) => (
                if en() {
                    format!(
                        "{listed} facilities (updated {}). {unreadable} unreadable entries cannot be chosen.",
                        time_words(at)
                    )
                } else {
                    format!(
                        "{listed} 施設（{} 更新）。読み取れない {unreadable} 件は選べません。",
                        time_words(at)
                    )
                },
                "warn",
            ),
        };
        let queue = |q: Option<Queue>, dead: bool| match q {
            None => (t("使用していません", "Not used").to_owned(), "ok"),
            Some(q) => {
                let mut words = if en() {
                    format!("{} waiting to send, {} held", q.pending, q.held)
                } else {
                    format!("送信待ち {} 件、保留 {} 件", q.pending, q.held)
                };
                if dead {
                    if en() {
                        words.push_str(&format!(", {} undeliverable", q.dead));
                    } else {
                        words.push_str(&format!("、送信不能 {} 件", q.dead));
                    }
                }
                let class = if q.held > 0 || q.dead > 0 {
                    "warn"
                } else {
                    "ok"
                };
                (words, class)
            }
        };
        let dicom = queue(self.dicom, true);
        let ssmix2 = queue(self.ssmix2, false);
        let version = &self.update.version;
        let update = match self.update.state {
            None => (
                if en() {
                    format!("Version {version} (the update service is not running)")
                } else {
                    format!("版 {version}（更新サービスは動いていません）")
                },
                "warn",
            ),
            Some(UpdateState::Current) => (
                if en() {
                    format!("Version {version} (no newer version)")
                } else {
                    format!("版 {version}（新しい版はありません）")
                },
                "ok",
            ),
            Some(UpdateState::Staged) => (
                if en() {
                    format!(
                        "Version {version} (a new version is ready; it will be installed in the maintenance window)"
                    )
                } else {
                    format!("版 {version}（新しい版を準備しました。保守時間帯に更新します）")
                },
                "ok",
            ),
            Some(UpdateState::CheckFailing) => (
                if en() {
                    format!("Version {version} (cannot reach the update source)")
                } else {
                    format!("版 {version}（更新の配信元を確認できません）")
                },
                "warn",
            ),
        };
        let clock = match self.clock {
            Clock::InStep(o) => (
                if en() {
                    format!("Correct (off by {o:+.3} s)")
                } else {
                    format!("正確です（ずれ {o:+.3} 秒）")
                },
                "ok",
            ),
            Clock::Off(o) => (
                if en() {
                    format!(
                        "{:.1} s {} the network's clock",
                        o.abs(),
                        if o > 0.0 { "behind" } else { "ahead of" }
                    )
                } else {
                    format!(
                        "ネットワークの時計より {:.1} 秒{}います",
                        o.abs(),
                        if o > 0.0 { "遅れて" } else { "進んで" }
                    )
                },
                "bad",
            ),
            Clock::Lost => (
                t(
                    "ネットワークの時刻サーバーから応答がありません",
                    "No answer from the network's time server",
                )
                .to_owned(),
                "bad",
            ),
            Clock::NotYet => (t("確認中です", "Checking").to_owned(), "warn"),
            Clock::NotChecked => (
                t(
                    "確認していません（設定されていません）",
                    "Not checked (not configured)",
                )
                .to_owned(),
                "warn",
            ),
        };
        let until = |at: i64| {
            if en() {
                format!(" (until {})", time_words(at))
            } else {
                format!("（{} まで）", time_words(at))
            }
        };
        let certificate = match self.certificate {
            Some(Certificate::Network(at)) => (
                format!(
                    "{}{}",
                    t("ネットワークが発行したもの", "Issued by the network"),
                    until(at)
                ),
                "ok",
            ),
            Some(Certificate::Configured(at)) => (
                format!("{}{}", t("設定されたもの", "The configured one"), until(at)),
                "ok",
            ),
            Some(Certificate::SelfSigned) => (
                t(
                    "装置が自分で作ったもの（ネットワークの証明書はまだありません。指紋はプロビジョニングシートのとおりです）",
                    "The appliance's own (no certificate from the network yet; its fingerprint is the one on the provisioning sheet)",
                )
                .to_owned(),
                "warn",
            ),
            None => (t("不明です", "Unknown").to_owned(), "warn"),
        };
        vec![
            (t("ネットワーク", "Network"), link.0, link.1),
            (t("同意情報の最終同期", "Last consent sync"), sync.0, sync.1),
            (
                t("施設一覧", "Facility directory"),
                directory.0,
                directory.1,
            ),
            (t("DICOM 画像", "DICOM images"), dicom.0, dicom.1),
            (t("SS-MIX2", "SS-MIX2"), ssmix2.0, ssmix2.1),
            (t("ソフトウェア", "Software"), update.0, update.1),
            (t("時刻", "Clock"), clock.0, clock.1),
            (
                t("この画面の証明書", "This page's certificate"),
                certificate.0,
                certificate.1,
            ),
        ]
    }
}

/// A Unix time as the clinic reads it: `YYYY-MM-DD HH:MM`, Japan Standard Time.
pub fn time_words(t: i64) -> String {
    consent::time::format(t)
        .get(..16)
        .map(|s| s.replace('T', " "))
        .unwrap_or_default()
}

/// How long ago, in words: 「1分以内」, 「5分前」, 「3時間前」, 「2日前」.
fn ago_words(secs: i64) -> String {
    let english = en();
    match secs.max(0) {
        s if s < 60 => t("1分以内", "within a minute").to_owned(),
        s if s < 3600 => {
            if english {
                format!("{} min ago", s / 60)
            } else {
                format!("{}分前", s / 60)
            }
        }
        s if s < 86_400 => {
            if english {
                format!("{} h ago", s / 3600)
            } else {
                format!("{}時間前", s / 3600)
            }
        }
        s => {
            let days = s / 86_400;
            if english {
                format!("{days} {} ago", if days == 1 { "day" } else { "days" })
            } else {
                format!("{}日前", s / 86_400)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tsunagi_runtime::status::{Health, SupervisorStatus};

    use super::*;

    fn service(name: &str, metrics: &[(&str, f64)]) -> ServiceStatus {
        ServiceStatus {
            name: name.to_owned(),
            state: ServiceState::Ready,
            health: Health::Ok,
            pid: Some(1),
            restarts: 0,
            last_error: None,
            uptime_secs: Some(10),
            summary: String::new(),
            user: None,
            metrics: metrics
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn report(services: Vec<ServiceStatus>) -> StatusReport {
        StatusReport {
            supervisor: SupervisorStatus {
                pid: 1,
                version: "1.2.0".into(),
                privileged: true,
                ready: true,
                uptime_secs: 10,
                config: "/etc/tsunagi/tsunagi.toml".into(),
            },
            services,
        }
    }

    // 2026-12-06 17:00 JST.
    const T: i64 = 1_796_544_000;

    fn words(o: &Overview, now: i64) -> BTreeMap<&'static str, (String, &'static str)> {
        o.rows(now)
            .into_iter()
            .map(|(what, words, class)| (what, (words, class)))
            .collect()
    }

    #[test]
    fn a_box_that_is_linked_says_since_when_the_sync_the_queues_the_update_and_the_clock() {
        let r = report(vec![
            service(
                "tunnel",
                &[
                    ("up", 1.0),
                    ("link_since_timestamp_seconds", T as f64),
                    ("clock_in_step", 1.0),
                    ("clock_sync_lost", 0.0),
                    ("clock_offset_seconds", -0.012),
                ],
            ),
            service(
                "consent",
                &[
                    ("last_pull_timestamp_seconds", (T + 60) as f64),
                    ("stale", 0.0),
                    ("directory_facilities", 3.0),
                    ("directory_unreadable", 0.0),
                    ("directory_refreshed_timestamp_seconds", T as f64),
                ],
            ),
            service(
                "dicom",
                &[
                    ("spool_pending", 3.0),
                    ("spool_held", 0.0),
                    ("spool_dead", 0.0),
                ],
            ),
            service("ssmix2", &[("outbox_depth", 12.0), ("held_files", 2.0)]),
            service(
                "update",
                &[("update_staged", 0.0), ("update_check_failing", 0.0)],
            ),
            service(
                "console",
                &[
                    ("certificate_source", 1.0),
                    (
                        "certificate_not_after_timestamp_seconds",
                        (T + 30 * 86_400) as f64,
                    ),
                ],
            ),
        ]);
        let o = Overview::of(&r);
        assert_eq!(o.link, Link::Up(Some(T)));
        assert_eq!(
            words(&o, T)["この画面の証明書"],
            (
                "ネットワークが発行したもの（2027-01-05 17:00 まで）".into(),
                "ok"
            )
        );
        assert_eq!(o.clock, Clock::InStep(-0.012));
        let w = words(&o, T + 60 + 300);
        assert_eq!(
            w["ネットワーク"],
            ("接続中（2026-12-06 17:00 から）".into(), "ok")
        );
        assert_eq!(
            w["同意情報の最終同期"],
            ("2026-12-06 17:01（5分前）".into(), "ok")
        );
        assert_eq!(
            w["施設一覧"],
            ("3 施設（2026-12-06 17:00 更新）".into(), "ok")
        );
        assert_eq!(
            w["DICOM 画像"],
            ("送信待ち 3 件、保留 0 件、送信不能 0 件".into(), "ok")
        );
        assert_eq!(w["SS-MIX2"], ("送信待ち 12 件、保留 2 件".into(), "warn"));
        assert_eq!(
            w["ソフトウェア"],
            ("版 1.2.0（新しい版はありません）".into(), "ok")
        );
        assert_eq!(w["時刻"], ("正確です（ずれ -0.012 秒）".into(), "ok"));
    }

    #[test]
    fn a_box_in_trouble_says_each_trouble() {
        let r = report(vec![
            service(
                "tunnel",
                &[
                    ("up", 0.0),
                    ("link_since_timestamp_seconds", T as f64),
                    ("clock_in_step", 0.0),
                    ("clock_sync_lost", 0.0),
                    ("clock_offset_seconds", 600.0),
                ],
            ),
            service(
                "consent",
                &[
                    ("last_pull_timestamp_seconds", T as f64),
                    ("stale", 1.0),
                    ("directory_facilities", 3.0),
                    ("directory_unreadable", 2.0),
                    ("directory_refreshed_timestamp_seconds", T as f64),
                ],
            ),
            service(
                "dicom",
                &[
                    ("spool_pending", 0.0),
                    ("spool_held", 1.0),
                    ("spool_dead", 2.0),
                ],
            ),
            service(
                "update",
                &[("update_staged", 1.0), ("update_check_failing", 1.0)],
            ),
            service("console", &[("certificate_source", 0.0)]),
        ]);
        let w = words(&Overview::of(&r), T + 2 * 86_400);
        assert_eq!(w["この画面の証明書"].1, "warn");
        assert!(
            w["この画面の証明書"]
                .0
                .starts_with("装置が自分で作ったもの"),
            "{:?}",
            w["この画面の証明書"]
        );
        assert_eq!(
            w["ネットワーク"],
            ("接続していません（2026-12-06 17:00 から）".into(), "bad")
        );
        assert_eq!(
            w["同意情報の最終同期"],
            (
                "2026-12-06 17:00（2日前）: 古くなっています。院外への送信は止めています。".into(),
                "warn"
            )
        );
        assert_eq!(
            w["DICOM 画像"],
            ("送信待ち 0 件、保留 1 件、送信不能 2 件".into(), "warn")
        );
        assert_eq!(
            w["施設一覧"],
            (
                "3 施設（2026-12-06 17:00 更新）。読み取れない 2 件は選べません。".into(),
                "warn"
            )
        );
        assert_eq!(w["SS-MIX2"], ("使用していません".into(), "ok"));
        assert_eq!(
            w["ソフトウェア"],
            ("版 1.2.0（更新の配信元を確認できません）".into(), "warn")
        );
        assert_eq!(
            w["時刻"],
            ("ネットワークの時計より 600.0 秒遅れています".into(), "bad")
        );
        // Lost, and an unknown offset before the first answer.
        let lost = service(
            "tunnel",
            &[
                ("up", 1.0),
                ("clock_in_step", 0.0),
                ("clock_sync_lost", 1.0),
            ],
        );
        assert_eq!(Overview::of(&report(vec![lost])).clock, Clock::Lost);
        let first = service(
            "tunnel",
            &[
                ("up", 1.0),
                ("clock_in_step", 0.0),
                ("clock_sync_lost", 0.0),
            ],
        );
        assert_eq!(Overview::of(&report(vec![first])).clock, Clock::NotYet);
        let ahead = service(
            "tunnel",
            &[
                ("up", 1.0),
                ("clock_in_step", 0.0),
                ("clock_sync_lost", 0.0),
                ("clock_offset_seconds", -2.5),
            ],
        );
        let w = words(&Overview::of(&report(vec![ahead])), T);
        assert_eq!(w["時刻"].0, "ネットワークの時計より 2.5 秒進んでいます");
    }

    #[test]
    fn services_that_do_not_run_or_have_not_reported_say_so_and_nothing_is_guessed() {
        let mut starting = service("tunnel", &[("up", 1.0)]);
        starting.state = ServiceState::Backoff;
        let silent = service("consent", &[]);
        let r = report(vec![starting, silent]);
        let o = Overview::of(&r);
        assert_eq!(o.link, Link::Unknown);
        assert_eq!(o.clock, Clock::NotChecked);
        assert_eq!(o.sync, Sync::Unknown);
        assert_eq!(o.dicom, None);
        assert_eq!(o.certificate, None);
        let w = words(&o, T);
        assert_eq!(
            w["ネットワーク"],
            ("接続サービスが動いていません".into(), "bad")
        );
        assert_eq!(
            w["ソフトウェア"].0,
            "版 1.2.0（更新サービスは動いていません）"
        );
        let never = report(vec![service("consent", &[("stale", 1.0)])]);
        assert_eq!(Overview::of(&never).sync, Sync::Never);
        // Garbage in a metric is no fact.
        let nan = report(vec![service(
            "tunnel",
            &[("up", 1.0), ("link_since_timestamp_seconds", f64::NAN)],
        )]);
        assert_eq!(Overview::of(&nan).link, Link::Up(None));
        assert_eq!(words(&Overview::of(&nan), T)["ネットワーク"].0, "接続中");
    }

    #[test]
    fn in_english_the_same_facts_are_told_in_english() {
        let r = report(vec![
            service(
                "tunnel",
                &[
                    ("up", 1.0),
                    ("link_since_timestamp_seconds", T as f64),
                    ("clock_in_step", 0.0),
                    ("clock_sync_lost", 0.0),
                    ("clock_offset_seconds", 600.0),
                ],
            ),
            service(
                "consent",
                &[
                    ("last_pull_timestamp_seconds", (T + 60) as f64),
                    ("stale", 0.0),
                ],
            ),
            service(
                "dicom",
                &[
                    ("spool_pending", 3.0),
                    ("spool_held", 1.0),
                    ("spool_dead", 0.0),
                ],
            ),
        ]);
        let o = Overview::of(&r);
        let w = crate::lang::Lang::En.sync_scope(|| words(&o, T + 60 + 300));
        assert_eq!(
            w["Network"],
            ("Connected (since 2026-12-06 17:00)".into(), "ok")
        );
        assert_eq!(
            w["Last consent sync"],
            ("2026-12-06 17:01 (5 min ago)".into(), "ok")
        );
        assert_eq!(
            w["DICOM images"],
            ("3 waiting to send, 1 held, 0 undeliverable".into(), "warn")
        );
        assert_eq!(w["SS-MIX2"], ("Not used".into(), "ok"));
        assert_eq!(
            w["Software"],
            (
                "Version 1.2.0 (the update service is not running)".into(),
                "warn"
            )
        );
        assert_eq!(
            w["Clock"],
            ("600.0 s behind the network's clock".into(), "bad")
        );
        let html = crate::lang::Lang::En.sync_scope(|| o.render(T).into_string());
        assert!(html.contains("<caption>Overview</caption>"), "{html}");
        // Outside a request: Japanese, as before.
        assert_eq!(words(&o, T)["ネットワーク"].1, "ok");
    }
}
