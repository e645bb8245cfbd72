use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"version = 1
[site]
facility-code = "0112345678"
ae-title = "TSUNAGI"
[paths]
state-dir = "/var/lib/tsunagi"
runtime-dir = "/run/tsunagi"
"#;

fn file() -> &'static Path {
    Path::new("test.toml")
}

/// The problems in `text` as `(line, key, reason)`; panics if it parses.
fn problems(text: &str) -> Vec<(Option<usize>, String, String)> {
    match parse(text, file()) {
        Ok(cfg) => panic!("expected problems, got {cfg:?}"),
        Err(p) => p
            .problems
            .into_iter()
            .map(|p| (p.line, p.key, p.reason))
            .collect(),
    }
}

/// `(line, key)` of each problem.
fn where_(text: &str) -> Vec<(Option<usize>, String)> {
    problems(text)
        .into_iter()
        .map(|(line, key, _)| (line, key))
        .collect()
}

fn reason<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn dur(s: &str) -> ConfigDuration {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Newtypes

#[test]
fn ae_title_good() {
    assert_eq!(AeTitle::try_from("TSUNAGI").unwrap().as_str(), "TSUNAGI");
    let sixteen = "A".repeat(16);
    assert_eq!(
        AeTitle::try_from(sixteen.as_str()).unwrap().as_str(),
        sixteen
    );
    // Leading/trailing spaces are not significant: stored trimmed, and not counted.
    assert_eq!(AeTitle::try_from("  PACS 1  ").unwrap().as_str(), "PACS 1");
    let padded = format!(" {sixteen}  ");
    assert_eq!(AeTitle::try_from(padded).unwrap().as_str(), sixteen);
    assert_eq!(
        "ANY-SCP_1.2".parse::<AeTitle>().unwrap().to_string(),
        "ANY-SCP_1.2"
    );
}

#[test]
fn ae_title_bad() {
    assert_eq!(
        reason(AeTitle::try_from("A".repeat(17))),
        "an AE title is at most 16 characters (got 17)"
    );
    assert!(reason(AeTitle::try_from("AB\\CD")).contains("backslash"));
    assert!(reason(AeTitle::try_from("")).contains("empty"));
    assert!(reason(AeTitle::try_from("    ")).contains("all spaces"));
    assert!(reason(AeTitle::try_from("つなぎ")).contains("ASCII"));
    assert!(reason(AeTitle::try_from("PACSé")).contains("ASCII"));
    assert!(reason(AeTitle::try_from("PA\tCS")).contains("control"));
    assert!(reason(AeTitle::try_from("PACS\n")).contains("control"));
    assert!(reason(AeTitle::try_from("PACS\u{7f}")).contains("control"));
}

#[test]
fn facility_code_good() {
    let code = FacilityCode::try_from("0112345678").unwrap();
    assert_eq!(code.as_str(), "0112345678", "leading zero kept");
    assert_eq!(code.to_string(), "0112345678");
    assert_eq!(
        "1312345679".parse::<FacilityCode>().unwrap().as_ref(),
        "1312345679"
    );
}

#[test]
fn facility_code_bad() {
    assert_eq!(
        reason(FacilityCode::try_from("112345678")),
        "a 医療機関コード is exactly 10 digits (got 9 characters)"
    );
    assert_eq!(
        reason(FacilityCode::try_from("01123456789")),
        "a 医療機関コード is exactly 10 digits (got 11 characters)"
    );
    assert!(reason(FacilityCode::try_from("01123456AB")).contains("not 0-9"));
    assert!(reason(FacilityCode::try_from("０１１２３４５６７８")).contains("not 0-9"));
    assert!(reason(FacilityCode::try_from("0112 45678")).contains("not 0-9"));
    assert!(reason(FacilityCode::try_from("")).contains("got 0 characters"));
    assert!(reason(FacilityCode::try_from("0012345678")).contains("prefecture number 01–47"));
    assert!(reason(FacilityCode::try_from("4812345678")).contains("prefecture number 01–47"));
    assert!(reason(FacilityCode::try_from("1322345678")).contains("point-table number"));
    assert!(
        FacilityCode::try_from("4732345678").is_ok(),
        "dental, Okinawa"
    );
    assert!(FacilityCode::try_from("1342345678").is_ok(), "pharmacy");
}

#[test]
fn service_name() {
    for good in ["a", "crashy", "a1-b", "drill-2", "abcdefghijklmnop"] {
        assert_eq!(ServiceName::try_from(good).unwrap().as_str(), good);
    }
    for bad in [
        "",
        "abcdefghijklmnopq",
        "1abc",
        "-abc",
        "Crashy",
        "a_b",
        "a.b",
        "ab-",
        "a b",
        "ä",
    ] {
        assert!(ServiceName::try_from(bad).is_err(), "{bad:?} accepted");
    }
    assert!(reason(ServiceName::try_from("ab-")).contains("must not end with '-'"));
}

#[test]
fn abs_path() {
    let p = AbsPath::try_from("/var/lib/tsunagi").unwrap();
    assert_eq!(p.as_path(), Path::new("/var/lib/tsunagi"));
    assert_eq!(p.to_string(), "/var/lib/tsunagi");
    assert!(reason(AbsPath::try_from("")).contains("empty"));
    assert!(reason(AbsPath::try_from("var/lib")).contains("absolute"));
    assert!(reason(AbsPath::try_from("/var/../etc")).contains(".."));
    assert!(reason(AbsPath::try_from("/var/\0x")).contains("NUL"));
    // `..` inside a name is fine; only a `..` component is refused.
    assert!(AbsPath::try_from("/var/lib/a..b").is_ok());

    use std::os::unix::ffi::OsStringExt;
    let not_utf8 = PathBuf::from(std::ffi::OsString::from_vec(b"/var/\xff".to_vec()));
    assert!(reason(AbsPath::try_from(not_utf8)).contains("UTF-8"));
}

#[test]
fn secret_file_refuses_inline_secrets_without_echoing_them() {
    let ok = SecretFile::try_from("/etc/tsunagi/secrets/id-hash-key").unwrap();
    assert_eq!(ok.as_path(), Path::new("/etc/tsunagi/secrets/id-hash-key"));
    for secret in ["s3cr3t-value", "", "../s3cr3t-value", "c2VjcmV0=="] {
        let r = reason(SecretFile::try_from(secret));
        assert_eq!(r, SecretFile::INLINE_REASON);
        assert_eq!(
            r,
            "inline secrets are not accepted: put the secret in a file (mode 0600) and give its absolute path"
        );
    }
    let r = reason(SecretFile::try_from("/x/../s3cr3t-value"));
    assert!(!r.contains("s3cr3t"), "{r}");
    assert!(r.contains(".."), "{r}");
}

#[test]
fn durations() {
    assert_eq!(dur("30s").get(), Duration::from_secs(30));
    assert_eq!(dur("5m").get(), Duration::from_secs(300));
    assert_eq!(dur("200ms").get(), Duration::from_millis(200));
    assert_eq!(dur("1h 30m").get(), Duration::from_secs(5400));
    // Displays in humantime syntax, and round-trips.
    for s in ["30s", "5m", "200ms", "1h 30m", "1m 30s"] {
        assert_eq!(dur(s).to_string(), s);
    }
    assert_eq!(dur("90s").to_string(), "1m 30s");
    assert!(reason("0s".parse::<ConfigDuration>()).contains("greater than zero"));
    assert!(reason("".parse::<ConfigDuration>()).contains("empty"));
    assert!(reason("abc".parse::<ConfigDuration>()).contains("invalid duration"));
    assert!(reason("30".parse::<ConfigDuration>()).contains("needs a unit"));
    assert!(reason("5 parsecs".parse::<ConfigDuration>()).contains("unknown time unit"));
    assert!(reason("-5s".parse::<ConfigDuration>()).contains("invalid duration"));
    assert!(ConfigDuration::try_from(Duration::ZERO).is_err());
    assert_eq!(
        ConfigDuration::try_from(Duration::from_millis(5))
            .unwrap()
            .get(),
        Duration::from_millis(5)
    );
}

#[test]
fn port() {
    assert_eq!(Port::try_from(1).unwrap().get(), 1);
    assert_eq!("65535".parse::<Port>().unwrap().get(), 65535);
    assert_eq!(Port::try_from(104).unwrap().to_string(), "104");
    assert!(reason(Port::try_from(0)).contains("port 0"));
    assert!("0".parse::<Port>().is_err());
    assert!("65536".parse::<Port>().is_err());
    assert!("http".parse::<Port>().is_err());

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct Listener {
        port: Port,
    }
    let l: Listener = toml::from_str("port = 11112").unwrap();
    assert_eq!(l.port.get(), 11112);
    assert_eq!(toml::to_string(&l).unwrap().trim(), "port = 11112");
    assert!(toml::from_str::<Listener>("port = 0").is_err());
    assert!(toml::from_str::<Listener>("port = 70000").is_err());
}

#[test]
fn log_filter() {
    assert_eq!(LogFilter::default().as_str(), "info");
    assert!(LogFilter::try_from("info,tsunagi_runtime=debug").is_ok());
    assert!(LogFilter::try_from("x".repeat(512)).is_ok());
    assert!(reason(LogFilter::try_from("x".repeat(513))).contains("at most 512"));
    assert!(reason(LogFilter::try_from("")).contains("empty"));
    assert!(reason(LogFilter::try_from("  ")).contains("empty"));
    assert!(reason(LogFilter::try_from("info\ndebug")).contains("one line"));
}

#[test]
fn capabilities_case_insensitive() {
    for s in [
        "CAP_NET_ADMIN",
        "cap_net_admin",
        "net_admin",
        "NET_ADMIN",
        "Cap_Net_Admin",
    ] {
        assert_eq!(
            Capability::try_from(s).unwrap().as_str(),
            "CAP_NET_ADMIN",
            "{s}"
        );
    }
    assert_eq!(
        "chown".parse::<Capability>().unwrap().to_string(),
        "CAP_CHOWN"
    );
    for bad in [
        "CAP_FOO",
        "",
        "CAP_",
        "NET ADMIN",
        "cap_net_admin ",
        "ｎｅｔ_admin",
    ] {
        assert!(Capability::try_from(bad).is_err(), "{bad:?} accepted");
    }
    assert!(reason(Capability::try_from("CAP_FOO")).contains("unknown capability `CAP_FOO`"));
}

#[test]
fn capability_names_match_linux() {
    let names = Capability::NAMES;
    assert_eq!(names.len(), 41);
    assert_eq!(names[0], "CAP_CHOWN");
    assert_eq!(names[10], "CAP_NET_BIND_SERVICE");
    assert_eq!(names[21], "CAP_SYS_ADMIN");
    assert_eq!(names[31], "CAP_SETFCAP");
    assert_eq!(names[40], "CAP_CHECKPOINT_RESTORE");
    let unique: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len());
    for name in names {
        assert_eq!(Capability::try_from(name).unwrap().as_str(), name);
        assert_eq!(
            Capability::try_from(name.to_lowercase().trim_start_matches("cap_"))
                .unwrap()
                .as_str(),
            name
        );
    }
}

// ---------------------------------------------------------------------------------------
// Parsing

#[test]
fn minimal_file_gets_defaults() {
    let cfg = parse(MINIMAL, file()).unwrap();
    assert_eq!(cfg.version, CURRENT_VERSION);
    assert_eq!(cfg.site.facility_code.as_str(), "0112345678");
    assert_eq!(cfg.site.ae_title.as_str(), "TSUNAGI");
    assert_eq!(cfg.site.name, None);
    assert_eq!(cfg.paths.state_dir.as_path(), Path::new("/var/lib/tsunagi"));
    assert_eq!(cfg.paths.runtime_dir.as_path(), Path::new("/run/tsunagi"));
    assert_eq!(cfg.log.filter.as_str(), "info");
    assert_eq!(cfg.privacy.id_hash_key_file, None);
    let s = &cfg.supervisor;
    assert_eq!(s.stop_timeout.get(), Duration::from_secs(10));
    assert_eq!(s.ready_timeout.get(), Duration::from_secs(60));
    assert_eq!(s.backoff_initial.get(), Duration::from_secs(1));
    assert_eq!(s.backoff_max.get(), Duration::from_secs(60));
    assert_eq!(s.crash_limit, 5);
    assert_eq!(s.crash_window.get(), Duration::from_secs(300));
    assert_eq!(s.failed_retry.get(), Duration::from_secs(600));
    assert_eq!(s.stable_after.get(), Duration::from_secs(60));
    assert_eq!(cfg.metrics, None);
    assert!(cfg.heartbeat.enabled);
    assert_eq!(cfg.heartbeat.interval.get(), Duration::from_secs(10));
    assert!(cfg.drill.is_empty());
    assert_eq!(cfg.supervisor, Supervisor::default());
    assert_eq!(cfg.heartbeat, Heartbeat::default());
    assert_eq!(cfg.log, Log::default());
    assert_eq!(cfg.privacy, Privacy::default());
    assert!(cfg.validate().is_empty());
}

#[test]
fn omitted_keys_in_a_section_get_defaults() {
    let text = format!(
        "{MINIMAL}[supervisor]\ncrash-limit = 2\n[heartbeat]\nenabled = false\n[drill.crashy]\nexit-after = \"2s\"\n"
    );
    let cfg = parse(&text, file()).unwrap();
    assert_eq!(cfg.supervisor.crash_limit, 2);
    assert_eq!(cfg.supervisor.stop_timeout.get(), Duration::from_secs(10));
    assert!(!cfg.heartbeat.enabled);
    assert_eq!(cfg.heartbeat.interval.get(), Duration::from_secs(10));
    let crashy = &cfg.drill[&ServiceName::try_from("crashy").unwrap()];
    assert_eq!(
        crashy,
        &Drill {
            exit_after: Some(dur("2s")),
            ..Drill::default()
        }
    );
    assert_eq!(crashy.interval.get(), Duration::from_secs(1));
    assert_eq!(crashy.exit_code, 1);
    assert!(!crashy.ignore_sigterm && !crashy.never_ready && !crashy.subprocess);
    assert!(crashy.capabilities.is_empty());
}

#[test]
fn several_problems_reported_at_once() {
    let text = r#"version = 1

[site]
facility-code = "112345678"
ae-title = "TSUNAGI_GATEWAY_0001"
hostname = "gw01"

[paths]
state-dir = "/var/lib/tsunagi"
runtime-dir = "/run/tsunagi"

[privacy]
id-hash-key = "s3cr3t-value"
"#;
    let got = problems(text);
    assert_eq!(
        got,
        vec![
            (
                Some(4),
                "site.facility-code".to_owned(),
                "a 医療機関コード is exactly 10 digits (got 9 characters)".to_owned()
            ),
            (
                Some(5),
                "site.ae-title".to_owned(),
                "an AE title is at most 16 characters (got 20)".to_owned()
            ),
            (
                Some(6),
                "site.hostname".to_owned(),
                "unknown key `hostname` (expected one of: facility-code, ae-title, name, network-ids)".to_owned()
            ),
            (
                Some(13),
                "privacy.id-hash-key".to_owned(),
                "inline secrets are not accepted: use `id-hash-key-file` with the path of a file (mode 0600)".to_owned()
            ),
        ]
    );
    let shown = parse(text, file()).unwrap_err().to_string();
    assert!(!shown.contains("s3cr3t"), "{shown}");

    let text = format!("{MINIMAL}[privacy]\nid_hash_key = \"s3cr3t-value\"\n");
    assert_eq!(
        problems(&text)[0].2,
        "inline secrets are not accepted: use `id-hash-key-file` with the path of a file (mode 0600)"
    );
}

#[test]
fn problems_display_one_line_each() {
    let text = "version = 1\n[site]\nfacility-code = \"0112345678\"\nae-title = \"\"\n";
    let shown = parse(text, Path::new("/etc/tsunagi/tsunagi.toml"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        shown,
        "/etc/tsunagi/tsunagi.toml: paths: missing required section [paths]\n\
         /etc/tsunagi/tsunagi.toml:4: site.ae-title: an AE title must not be empty or all spaces"
    );
}

#[test]
fn missing_required_section() {
    let text = "version = 1\n[site]\nfacility-code = \"0112345678\"\nae-title = \"A\"\n";
    assert_eq!(
        problems(text),
        vec![(
            None,
            "paths".to_owned(),
            "missing required section [paths]".to_owned()
        )]
    );
}

#[test]
fn missing_required_keys_all_reported() {
    // Also keeps `required_keys` in step with the types.
    assert_eq!(
        where_(""),
        vec![
            (None, "version".to_owned()),
            (None, "site".to_owned()),
            (None, "paths".to_owned())
        ]
    );
    assert!(problems("")[0].2.contains("version = 1"));
    let text = "version = 1\n[site]\n[paths]\n[metrics]\n";
    assert_eq!(
        problems(text),
        vec![
            (
                Some(2),
                "site.facility-code".to_owned(),
                "missing required key `facility-code`".to_owned()
            ),
            (
                Some(2),
                "site.ae-title".to_owned(),
                "missing required key `ae-title`".to_owned()
            ),
            (
                Some(3),
                "paths.state-dir".to_owned(),
                "missing required key `state-dir`".to_owned()
            ),
            (
                Some(3),
                "paths.runtime-dir".to_owned(),
                "missing required key `runtime-dir`".to_owned()
            ),
            (
                Some(4),
                "metrics.listen".to_owned(),
                "missing required key `listen`".to_owned()
            ),
        ]
    );
}

#[test]
fn a_bad_value_is_not_also_reported_as_missing() {
    let text = MINIMAL.replace("ae-title = \"TSUNAGI\"", "ae-title = \"A\\\\B\"");
    assert_eq!(where_(&text), vec![(Some(4), "site.ae-title".to_owned())]);
}

#[test]
fn syntax_error_gives_one_problem_with_its_line() {
    let got = problems("version = 1\n[site\nae-title = \"X\"\n");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, Some(2));
    assert_eq!(got[0].1, "");
    assert!(!got[0].2.contains('\n'));

    let got = problems("version = 1\nversion = 1\n");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, Some(2));
    assert!(got[0].2.contains("duplicate"), "{got:?}");

    let got = problems("version = 1\n[site]\nname = \"unterminated\n");
    assert_eq!(got[0].0, Some(3));
}

#[test]
fn other_version_reports_only_the_version() {
    let text = "# future file\nversion = 2\n[site]\nnew-key = 1\n";
    assert_eq!(
        problems(text),
        vec![(
            Some(2),
            "version".to_owned(),
            "unsupported config version 2; this software reads version 1".to_owned()
        )]
    );
}

#[test]
fn cross_field_rules_with_lines() {
    let text = r#"version = 1
[site]
facility-code = "0112345678"
ae-title = "TSUNAGI"
[paths]
state-dir = "/var/lib/tsunagi"
runtime-dir = "/var/lib/tsunagi/run"
[supervisor]
backoff-initial = "2m"
crash-limit = 0
[metrics]
listen = "127.0.0.1:0"
[drill.crashy]
exit-code = 0
"#;
    let got = problems(text);
    assert_eq!(
        got.iter()
            .map(|(l, k, _)| (*l, k.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (Some(7), "paths.runtime-dir"),
            (Some(9), "supervisor.backoff-initial"),
            (Some(10), "supervisor.crash-limit"),
            (Some(12), "metrics.listen"),
            (Some(14), "drill.crashy.exit-code"),
        ]
    );
    assert_eq!(
        got[0].2,
        "runtime-dir /var/lib/tsunagi/run is inside state-dir /var/lib/tsunagi; they must be separate directories"
    );
    assert_eq!(
        got[1].2,
        "backoff-initial (2m) must not be longer than backoff-max (1m)"
    );

    let same = MINIMAL.replace("/run/tsunagi", "/var/lib/tsunagi/");
    assert_eq!(
        where_(&same),
        vec![(Some(7), "paths.runtime-dir".to_owned())]
    );
    let inside = MINIMAL.replace("/var/lib/tsunagi", "/run/tsunagi/state");
    assert_eq!(
        where_(&inside),
        vec![(Some(6), "paths.state-dir".to_owned())]
    );
    // A sibling with a common string prefix is not "inside".
    let sibling = MINIMAL.replace("/run/tsunagi", "/var/lib/tsunagi-run");
    assert!(parse(&sibling, file()).is_ok());
}

#[test]
fn validate_on_a_built_config() {
    let mut cfg = parse(MINIMAL, file()).unwrap();
    cfg.version = 3;
    cfg.supervisor.crash_limit = 0;
    let got = cfg.validate();
    assert_eq!(
        got,
        vec![
            Problem {
                line: None,
                key: "version".into(),
                reason: "unsupported config version 3; this software reads version 1".into(),
            },
            Problem {
                line: None,
                key: "supervisor.crash-limit".into(),
                reason: "crash-limit must be at least 1".into(),
            },
        ]
    );
}

#[test]
fn rules_about_a_removed_key_are_not_reported() {
    // backoff-max is bad and falls back to its default while the rest is checked; that
    // must not produce a second, misleading "backoff-initial > backoff-max" problem.
    let text = format!("{MINIMAL}[supervisor]\nbackoff-initial = \"2m\"\nbackoff-max = \"soon\"\n");
    assert_eq!(
        where_(&text),
        vec![(Some(10), "supervisor.backoff-max".to_owned())]
    );
}

#[test]
fn unknown_keys_and_tables() {
    let text = format!("{MINIMAL}[sitee]\nx = 1\n[log]\nlevel = \"debug\"\n[drill.a]\nfoo = 1\n");
    let got = problems(&text);
    assert_eq!(
        got.iter()
            .map(|(l, k, _)| (*l, k.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (Some(8), "sitee"),
            (Some(11), "log.level"),
            (Some(13), "drill.a.foo"),
        ]
    );
    assert!(got[0].2.starts_with("unknown key `sitee` (expected one of: version, site, paths, log, privacy, supervisor, metrics, heartbeat, network, tunnel, identity, consent, ssmix2, dicom, audit, update, console, drill)"), "{}", got[0].2);
    assert_eq!(got[1].2, "unknown key `level` (expected one of: filter)");
}

#[test]
fn bad_drill_name_and_capability() {
    let text = format!(
        "{MINIMAL}[drill.Crashy]\nexit-code = 2\n[drill.ok]\ncapabilities = [\n  \"net_admin\",\n  \"cap_flying\",\n]\n[drill.fine]\ncapabilities = [\"NET_BIND_SERVICE\"]\n"
    );
    let got = problems(&text);
    assert_eq!(
        got.iter()
            .map(|(l, k, _)| (*l, k.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (Some(8), "drill.Crashy"),
            (Some(11), "drill.ok.capabilities")
        ]
    );
    assert!(got[0].2.contains("lowercase"), "{}", got[0].2);
    assert!(got[1].2.contains("`cap_flying`"), "{}", got[1].2);
}

#[test]
fn type_errors_are_short_and_never_echo_values() {
    let text = format!(
        "{MINIMAL}[privacy]\nid-hash-key-file = 918273645\n[supervisor]\ncrash-limit = \"five\"\nstop-timeout = 10\n[heartbeat]\nenabled = \"yes\"\n[drill.x]\nexit-code = 300\n"
    );
    let got = problems(&text);
    let reasons: Vec<&str> = got.iter().map(|(_, _, r)| r.as_str()).collect();
    assert_eq!(
        reasons,
        vec![
            "expected a string, found an integer",
            "expected an integer from 0 to 4294967295, found a string",
            "expected a string, found an integer",
            "expected a boolean, found a string",
            "expected an integer from 0 to 255, found an integer out of range",
        ]
    );
    let shown = parse(&text, file()).unwrap_err().to_string();
    assert!(!shown.contains("918273645"), "{shown}");
    assert_eq!(shown.lines().count(), got.len());
}

#[test]
fn metrics_listen_must_be_a_socket_address() {
    let text = format!("{MINIMAL}[metrics]\nlisten = \"localhost\"\n");
    let got = problems(&text);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].1.as_str()), (Some(9), "metrics.listen"));
    assert!(got[0].2.contains("socket address"), "{}", got[0].2);
}

#[test]
fn dotted_and_inline_tables_map_to_lines() {
    let text = "version = 1\nsite = { facility-code = \"0112345678\", ae-title = \"A\\\\B\" }\npaths.state-dir = \"/var/lib/t\"\npaths.runtime-dir = \"relative\"\n";
    assert_eq!(
        where_(text),
        vec![
            (Some(2), "site.ae-title".to_owned()),
            (Some(4), "paths.runtime-dir".to_owned())
        ]
    );
}

#[test]
fn a_file_full_of_mistakes_stops_after_a_bound() {
    let keys: String = (0..100).map(|i| format!("k{i} = 1\n")).collect();
    let text = format!("{MINIMAL}[log]\n{keys}");
    let got = problems(&text);
    assert_eq!(got.len(), 65, "64 unknown keys and a note");
    assert!(got[..64].iter().all(|(_, k, _)| k.starts_with("log.k")));
    assert_eq!(got[64].1, "");
    assert!(
        got[64].2.starts_with("stopped after 64 rounds"),
        "{}",
        got[64].2
    );
}

#[test]
fn quoted_keys_are_rendered_unambiguously() {
    let text = format!("{MINIMAL}[drill.\"a.b\"]\n");
    assert_eq!(where_(&text), vec![(Some(8), "drill.\"a.b\"".to_owned())]);
}

#[test]
fn serialize_round_trip() {
    let cfg = parse(&example("production.toml"), file()).unwrap();
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(parse(&text, file()).unwrap(), cfg);
    let cfg = parse(&example("drills.toml"), file()).unwrap();
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(parse(&text, file()).unwrap(), cfg);
}

// ---------------------------------------------------------------------------------------
// Loading and secret files

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("tsunagi.toml");
    fs::write(&path, format!("{MINIMAL}{extra}")).unwrap();
    path
}

fn secret(dir: &Path, mode: u32) -> PathBuf {
    let path = dir.join("id-hash-key");
    fs::write(&path, "s3cr3t-value").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn secret_file_mode_0600_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let key = secret(dir.path(), 0o600);
    let path = write_config(
        dir.path(),
        &format!("[privacy]\nid-hash-key-file = \"{}\"\n", key.display()),
    );
    let cfg = load(&path).unwrap();
    assert_eq!(
        cfg.privacy.id_hash_key_file.unwrap().as_path(),
        key.as_path()
    );
    let key = secret(dir.path(), 0o400);
    assert!(load(&path).is_ok(), "{}", key.display());
}

#[test]
fn secret_file_mode_0640_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = secret(dir.path(), 0o640);
    let path = write_config(
        dir.path(),
        &format!("[privacy]\nid-hash-key-file = \"{}\"\n", key.display()),
    );
    let Err(LoadError::Invalid(p)) = load(&path) else {
        panic!("expected a problem");
    };
    assert_eq!(p.file, path);
    assert_eq!(
        p.problems,
        vec![Problem {
            line: Some(9),
            key: "privacy.id-hash-key-file".into(),
            reason: format!(
                "secret file {} is readable or writable by group or others (mode 0640): chmod 600 it",
                key.display()
            ),
        }]
    );
    assert!(!p.to_string().contains("s3cr3t"));

    // `parse` does not touch the filesystem; `check_secret_files` does.
    let text = fs::read_to_string(&path).unwrap();
    let cfg = parse(&text, &path).unwrap();
    assert_eq!(check_secret_files(&cfg, &path, &text), p.problems);
}

#[test]
fn secret_file_missing_or_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let path = write_config(
        dir.path(),
        &format!("[privacy]\nid-hash-key-file = \"{}\"\n", missing.display()),
    );
    let Err(LoadError::Invalid(p)) = load(&path) else {
        panic!("expected a problem");
    };
    assert_eq!(
        p.problems[0].reason,
        format!("secret file {} does not exist", missing.display())
    );
    let path = write_config(
        dir.path(),
        &format!(
            "[privacy]\nid-hash-key-file = \"{}\"\n",
            dir.path().display()
        ),
    );
    let Err(LoadError::Invalid(p)) = load(&path) else {
        panic!("expected a problem");
    };
    assert!(p.problems[0].reason.contains("not a regular file"));
}

#[test]
fn load_reports_parse_and_secret_problems_together() {
    let dir = tempfile::tempdir().unwrap();
    let key = secret(dir.path(), 0o644);
    let path = write_config(
        dir.path(),
        &format!(
            "[privacy]\nid-hash-key-file = \"{}\"\n[log]\nfilter = \"\"\n",
            key.display()
        ),
    );
    let Err(LoadError::Invalid(p)) = load(&path) else {
        panic!("expected problems");
    };
    let keys: Vec<_> = p.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, vec!["privacy.id-hash-key-file", "log.filter"]);
}

#[test]
fn load_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let err = load(&path).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }));
    assert_eq!(
        err.to_string(),
        format!("cannot read config file {}", path.display())
    );
    assert!(std::error::Error::source(&err).is_some());
}

// ---------------------------------------------------------------------------------------
// Shipped examples

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn example(name: &str) -> String {
    fs::read_to_string(examples_dir().join(name)).unwrap()
}

#[test]
fn every_example_config_parses() {
    let mut valid = 0;
    let mut invalid = 0;
    for entry in fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let text = fs::read_to_string(&path).unwrap();
        let result = parse(&text, Path::new(&name));
        if name.starts_with("invalid-") {
            let problems = match result {
                Ok(_) => panic!("{name} must fail to parse"),
                Err(p) => p,
            };
            // The expected output documented in the file's header is what we print.
            let documented: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("#   "))
                .filter(|l| l.starts_with(&format!("{name}:")))
                .collect();
            assert!(!documented.is_empty(), "{name} documents no output");
            assert_eq!(problems.to_string(), documented.join("\n"), "{name}");
            invalid += 1;
        } else {
            if let Err(p) = result {
                panic!("{p}");
            }
            valid += 1;
        }
    }
    assert!(valid >= 1, "no example configs found");
    assert!(invalid >= 1, "no invalid example configs found");
}

/// House style 4.3: the config the image ships with must parse too.
#[test]
fn image_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../image/overlay/usr/share/tsunagi/factory/tsunagi");
    let mut found = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = fs::read_to_string(&path).unwrap();
            if let Err(p) = parse(&text, &path) {
                panic!("{p}");
            }
            found += 1;
        }
    }
    assert!(found >= 1, "no config under {}", dir.display());
}

#[test]
fn production_example_spells_out_the_defaults() {
    let cfg = parse(&example("production.toml"), file()).unwrap();
    assert_eq!(cfg.supervisor, Supervisor::default());
    assert_eq!(cfg.heartbeat, Heartbeat::default());
    assert_eq!(cfg.log, Log::default());
    assert_eq!(cfg.privacy, Privacy::default());
    assert_eq!(
        cfg.metrics.unwrap().listen,
        "127.0.0.1:9464".parse().unwrap()
    );
    assert!(cfg.drill.is_empty());
}

#[test]
fn drills_example() {
    let cfg = parse(&example("drills.toml"), file()).unwrap();
    let names: Vec<&str> = cfg.drill.keys().map(ServiceName::as_str).collect();
    assert_eq!(names, vec!["crashy", "panicky", "stubborn"]);
    let crashy = &cfg.drill[&ServiceName::try_from("crashy").unwrap()];
    assert_eq!(crashy.exit_after, Some(dur("2s")));
    let panicky = &cfg.drill[&ServiceName::try_from("panicky").unwrap()];
    assert_eq!(panicky.panic_task_after, Some(dur("3s")));
    let stubborn = &cfg.drill[&ServiceName::try_from("stubborn").unwrap()];
    assert!(stubborn.ignore_sigterm);
    assert!(cfg.heartbeat.enabled);
}

// ---------------------------------------------------------------------------------------
// [tunnel]

const HUB_KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

fn tunnel_section(extra: &str) -> String {
    format!(
        "{MINIMAL}[tunnel]\nhub-endpoint = \"hub.example.jp:51820\"\nhub-public-key = \"{HUB_KEY}\"\naddress = \"10.99.0.2/24\"\nhub-subnets = [\"10.98.0.0/24\"]\nhealth-url = \"http://10.98.0.1:8080/health\"\n{extra}"
    )
}

#[test]
fn tunnel_section_gets_defaults() {
    let cfg = parse(&tunnel_section(""), file()).unwrap();
    let t = cfg.tunnel.unwrap();
    assert!(t.enabled);
    assert_eq!(t.interface.as_str(), "tsunagi0");
    assert_eq!(t.backend, TunnelBackend::Auto);
    assert_eq!(t.userspace_implementation, "wireguard-go");
    assert_eq!(t.listen_port.get(), 51820);
    assert_eq!(t.mtu, 1280);
    assert_eq!(t.persistent_keepalive.get(), Duration::from_secs(25));
    assert_eq!(t.probe_interval.get(), Duration::from_secs(5));
    assert_eq!(t.probe_failures, 3);
    assert_eq!(t.hub_endpoint.host(), "hub.example.jp");
    assert_eq!(t.hub_endpoint.port(), 51820);
    assert_eq!(t.health_url.path(), "/health");
    assert!(parse(MINIMAL, file()).unwrap().tunnel.is_none());
}

#[test]
fn tunnel_values_are_validated_with_lines() {
    let text = format!(
        "{MINIMAL}[tunnel]\nhub-endpoint = \"hub example:51820\"\nhub-public-key = \"abc\"\naddress = \"10.99.0.2\"\nhub-subnets = [\"10.98.0.0/24\"]\nhealth-url = \"https://10.98.0.1/health\"\ninterface = \"this-name-is-too-long\"\n"
    );
    let got = problems(&text);
    let keys: Vec<(Option<usize>, &str)> = got.iter().map(|(l, k, _)| (*l, k.as_str())).collect();
    assert_eq!(
        keys,
        vec![
            (Some(9), "tunnel.hub-endpoint"),
            (Some(10), "tunnel.hub-public-key"),
            (Some(11), "tunnel.address"),
            (Some(13), "tunnel.health-url"),
            (Some(14), "tunnel.interface"),
        ]
    );
}

#[test]
fn tunnel_cross_field_rules() {
    let text = tunnel_section("mtu = 1500\nprobe-failures = 0\n").replace(
        "http://10.98.0.1:8080/health",
        "http://10.97.0.1:8080/health",
    );
    let got = problems(&text);
    let keys: Vec<&str> = got.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["tunnel.health-url", "tunnel.mtu", "tunnel.probe-failures"]
    );
    assert!(
        got[0].2.contains("not in any of tunnel.hub-subnets"),
        "{}",
        got[0].2
    );
}

#[test]
fn the_time_server_is_asked_through_the_tunnel_or_refused() {
    let t = parse(&tunnel_section(""), file()).unwrap().tunnel.unwrap();
    assert_eq!(t.time_server, None);
    assert_eq!(t.time_check_interval.get(), Duration::from_secs(64));
    let t = parse(
        &tunnel_section("time-server = \"10.98.0.1:123\"\ntime-check-interval = \"5s\"\n"),
        file(),
    )
    .unwrap()
    .tunnel
    .unwrap();
    assert_eq!(t.time_server, Some("10.98.0.1:123".parse().unwrap()));
    assert_eq!(t.time_check_interval.get(), Duration::from_secs(5));
    let got = problems(&tunnel_section(
        "time-server = \"192.0.2.123:123\"\ntime-check-interval = \"100ms\"\n",
    ));
    let keys: Vec<&str> = got.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(keys, ["tunnel.time-server", "tunnel.time-check-interval"]);
    assert!(
        got[0].2.contains("not in any of tunnel.hub-subnets"),
        "{}",
        got[0].2
    );
    // An address without its port is no `address:port`.
    assert!(!problems(&tunnel_section("time-server = \"10.98.0.1\"\n")).is_empty());
}

/// Sections that send to the network: the consent sync, the DICOM bridge's PACS and the
/// SS-MIX2 WebDAV replica, at `fhir`, `pacs` and `replica` (hosts or addresses).
fn senders(fhir: &str, pacs: &str, replica: &str) -> String {
    format!(
        "[consent]\nenabled = true\nfhir-url = \"http://{fhir}:8081/fhir\"\n[dicom]\nlisten = \"0.0.0.0:104\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"{pacs}\"\n[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\nurl = \"https://{replica}:8443/ssmix2/\"\nca-file = \"/etc/ca.pem\"\nclient-cert-file = \"/etc/box.pem\"\nclient-key-file = \"/etc/box.key\"\n"
    )
}

#[test]
fn with_a_tunnel_patient_data_goes_only_to_hub_subnet_addresses() {
    let inside = senders("10.98.0.1", "10.98.0.2:4242", "10.98.0.3");
    let cfg = parse(&tunnel_section(&inside), file()).unwrap();
    assert_eq!(cfg.ssmix2.unwrap().replica.url.unwrap().host(), "10.98.0.3");

    // Each sender outside the hub subnets is refused at its own line.
    let text = tunnel_section(&senders("192.0.2.1", "192.0.2.2:4242", "192.0.2.3"));
    let got = problems(&text);
    let line_of = |needle: &str| {
        text.lines()
            .position(|l| l.starts_with(needle))
            .map(|i| i + 1)
    };
    let keys: Vec<(Option<usize>, &str)> = got.iter().map(|(l, k, _)| (*l, k.as_str())).collect();
    assert_eq!(
        keys,
        [
            (line_of("fhir-url"), "consent.fhir-url"),
            (line_of("address = \"192.0.2.2"), "dicom.pacs.address"),
            (line_of("url = \"https"), "ssmix2.replica.url"),
        ]
    );
    assert_eq!(
        got[0].2,
        "192.0.2.1 is not in any of tunnel.hub-subnets: with a tunnel, patient data goes to the network only through it"
    );
    assert!(
        got[1].2.starts_with("192.0.2.2 is not in any"),
        "{}",
        got[1].2
    );
    assert!(
        got[2].2.starts_with("192.0.2.3 is not in any"),
        "{}",
        got[2].2
    );
    let printed = parse(&text, file()).unwrap_err().to_string();
    assert!(
        printed.contains(&format!(
            "test.toml:{}: consent.fhir-url: 192.0.2.1 is not in any of tunnel.hub-subnets",
            line_of("fhir-url").unwrap()
        )),
        "{printed}"
    );

    // A DNS name cannot be checked, so it is refused; so is an IPv6 PACS (hub subnets are
    // IPv4).
    let text = tunnel_section(&senders(
        "10.98.0.1",
        "[2001:db8::1]:4242",
        "hub.example.jp",
    ));
    let got = problems(&text);
    let keys: Vec<&str> = got.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(keys, ["dicom.pacs.address", "ssmix2.replica.url"]);
    assert!(
        got[0].2.starts_with("2001:db8::1 is not in any"),
        "{}",
        got[0].2
    );
    assert!(
        got[1].2.starts_with("hub.example.jp is a DNS name: with a tunnel, the replica must be an IPv4 address in tunnel.hub-subnets"),
        "{}",
        got[1].2
    );

    // A second hub subnet counts; without a tunnel there is nothing to check against.
    let two = tunnel_section(&senders("10.97.5.1", "10.98.0.2:4242", "10.98.0.3"))
        .replace("[\"10.98.0.0/24\"]", "[\"10.98.0.0/24\", \"10.97.0.0/16\"]");
    assert!(parse(&two, file()).is_ok());
    let without = ssmix2_config(&senders("192.0.2.1", "192.0.2.2:4242", "hub.example.jp"));
    assert!(parse(&without, file()).is_ok());
    // A hub-subnets value that is itself wrong is reported once, not again for each sender.
    let bad_subnets = tunnel_section(&senders("192.0.2.1", "192.0.2.2:4242", "192.0.2.3"))
        .replace("[\"10.98.0.0/24\"]", "[\"10.98.0.0\"]");
    let keys: Vec<String> = problems(&bad_subnets)
        .into_iter()
        .map(|(_, k, _)| k)
        .collect();
    assert_eq!(keys, ["tunnel.hub-subnets"]);
}

#[test]
fn firewall_dns_and_ntp_servers_are_addresses() {
    let cfg = parse(&tunnel_section(""), file()).unwrap();
    let fw = cfg.tunnel.unwrap().firewall;
    assert!(fw.dns_servers.is_empty() && fw.ntp_servers.is_empty());
    let cfg = parse(
        &tunnel_section(
            "[tunnel.firewall]\ndns-servers = [\"192.0.2.53\", \"2001:db8::53\"]\nntp-servers = [\"192.0.2.123\"]\n",
        ),
        file(),
    )
    .unwrap();
    let fw = cfg.tunnel.unwrap().firewall;
    assert_eq!(
        fw.dns_servers,
        [
            "192.0.2.53".parse::<std::net::IpAddr>().unwrap(),
            "2001:db8::53".parse().unwrap()
        ]
    );
    assert_eq!(
        fw.ntp_servers,
        ["192.0.2.123".parse::<std::net::IpAddr>().unwrap()]
    );
    let got = problems(&tunnel_section(
        "[tunnel.firewall]\nntp-servers = [\"ntp.example.jp\"]\n",
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, "tunnel.firewall.ntp-servers");
}

#[test]
fn network_newtypes() {
    use crate::{Endpoint, HealthUrl, IfaceName, Ipv4Cidr, WgPublicKey};
    assert!(Endpoint::try_from("10.250.0.1:51820").is_ok());
    assert!(Endpoint::try_from("[2001:db8::1]:443").is_ok());
    assert_eq!(
        Endpoint::try_from("[2001:db8::1]:443").unwrap().to_string(),
        "[2001:db8::1]:443"
    );
    assert!(Endpoint::try_from("Hub.Example.JP:443").unwrap().host() == "hub.example.jp");
    for bad in [
        "hub",
        "hub:0",
        "hub:70000",
        ":51820",
        "-hub:1",
        "a..b:1",
        "[::1:1",
    ] {
        assert!(Endpoint::try_from(bad).is_err(), "{bad}");
    }
    assert!(WgPublicKey::try_from(HUB_KEY).is_ok());
    for bad in [
        "",
        "abc",
        &HUB_KEY.replace('=', "A"),
        &HUB_KEY.replace('w', "x"),
    ] {
        assert!(WgPublicKey::try_from(bad).is_err(), "{bad}");
    }
    let net = Ipv4Cidr::try_from("10.98.0.7/24").unwrap();
    assert_eq!(net.network().to_string(), "10.98.0.0");
    assert!(net.contains("10.98.0.200".parse().unwrap()));
    assert!(!net.contains("10.98.1.1".parse().unwrap()));
    assert!(
        Ipv4Cidr::try_from("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap())
    );
    assert!(Ipv4Cidr::try_from("10.0.0.1/33").is_err());
    assert!(IfaceName::try_from("tsunagi0").is_ok());
    assert!(IfaceName::try_from("a/b").is_err());
    assert!(IfaceName::try_from("x".repeat(16)).is_err());
    let url = HealthUrl::try_from("http://10.98.0.1:8080/health").unwrap();
    assert_eq!(url.addr().port(), 8080);
    assert_eq!(
        HealthUrl::try_from("http://10.98.0.1:80").unwrap().path(),
        "/"
    );
    assert!(HealthUrl::try_from("http://hub:80/").is_err());
}

#[test]
fn tunnel_secret_files_are_checked() {
    let text = tunnel_section("preshared-key-file = \"c2VjcmV0\"\n");
    let got = problems(&text);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, "tunnel.preshared-key-file");
    assert!(got[0].2.contains("inline secret"));
    assert!(!got[0].2.contains("c2VjcmV0"));
}

// ---------------------------------------------------------------------------------------
// [ssmix2]

fn ssmix2_config(section: &str) -> String {
    format!(
        "version = 1\n[site]\nfacility-code = \"1311234567\"\nae-title = \"T\"\n[paths]\nstate-dir = \"/var/lib/tsunagi\"\nruntime-dir = \"/run/tsunagi\"\n{section}"
    )
}

#[test]
fn ssmix2_example_and_defaults() {
    let cfg = parse(&example("ssmix2.toml"), file()).unwrap();
    let x = cfg.ssmix2.unwrap();
    assert!(x.enabled);
    assert_eq!(x.watch, WatchMode::Auto);
    assert_eq!(x.withdrawal, WithdrawalPolicy::Delete);
    assert_eq!(
        x.replica.directory.unwrap().as_path(),
        Path::new("/mnt/hub/ssmix2/1311234567")
    );
    let webdav = example("ssmix2.toml")
        .replace("directory = \"/mnt/hub/ssmix2/1311234567\"", "")
        .replace("# url", "url")
        .replace("# ca-file", "ca-file")
        .replace("# client-", "client-");
    let x = parse(&webdav, file()).unwrap().ssmix2.unwrap();
    assert_eq!(
        x.replica.url.unwrap().as_str(),
        "https://10.98.0.1:8443/ssmix2/1311234567/"
    );
    let cfg = parse(
        &ssmix2_config(
            "[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\ndirectory = \"/srv/r\"\n",
        ),
        file(),
    )
    .unwrap();
    let x = cfg.ssmix2.unwrap();
    assert_eq!(
        (x.scan_interval, x.settle, x.confirm_deletion),
        (dur("60s"), dur("10s"), dur("60s"))
    );
    assert_eq!(x.recheck_interval, dur("1h"));
}

#[test]
fn ssmix2_share_section() {
    let share = example("ssmix2.toml")
        .replace("# [ssmix2.share]", "[ssmix2.share]")
        .replace("# address", "address")
        .replace("# share", "share")
        .replace("# username", "username")
        .replace("# domain", "domain")
        .replace("# password-file", "password-file")
        .replace("# version", "version");
    let cfg = parse(&share, file()).unwrap();
    let x = cfg.ssmix2.as_ref().unwrap().share.as_ref().unwrap();
    assert_eq!(x.unc(), "//192.168.50.10/SS-MIX2");
    assert_eq!(x.version, SmbVersion::V3);
    assert_eq!(x.version.mount_option(), "3");
    assert_eq!(x.domain.as_ref().map(SmbName::as_str), Some("CLINIC"));
    assert!(
        cfg.secret_files()
            .iter()
            .any(|(key, f)| *key == "ssmix2.share.password-file"
                && f.as_str() == "/etc/tsunagi/secrets/ssmix2-share.password")
    );
    let v6 = "[ssmix2]\nstorage = \"/run/s\"\n[ssmix2.share]\naddress = \"fd00::5\"\nshare = \"s\"\nusername = \"u\"\npassword-file = \"/p\"\nversion = \"2.1\"\n[ssmix2.replica]\ndirectory = \"/srv/r\"\n";
    let x = parse(&ssmix2_config(v6), file())
        .unwrap()
        .ssmix2
        .unwrap()
        .share
        .unwrap();
    assert_eq!(
        (x.unc().as_str(), x.version.mount_option()),
        ("//fd00::5/s", "2.1")
    );

    let problems = |section: &str| match parse(&ssmix2_config(section), file()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    let with = |share: &str, extra: &str| {
        format!(
            "[ssmix2]\nstorage = \"/run/s\"\n{extra}[ssmix2.share]\naddress = \"192.168.50.10\"\n{share}password-file = \"/p\"\n[ssmix2.replica]\ndirectory = \"/srv/r\"\n"
        )
    };
    let inotify = problems(&with(
        "share = \"s\"\nusername = \"u\"\n",
        "watch = \"inotify\"\n",
    ));
    assert!(
        inotify.contains("ssmix2.watch: an SMB share delivers no inotify events"),
        "{inotify}"
    );
    // A comma would end the kernel's option early and smuggle in another option.
    let comma = problems(&with("share = \"s\"\nusername = \"u,uid=0\"\n", ""));
    assert!(comma.contains("must not contain `,`"), "{comma}");
    let slash = problems(&with("share = \"a/b\"\nusername = \"u\"\n", ""));
    assert!(slash.contains("must not contain `/`"), "{slash}");
    let empty = problems(&with("share = \"\"\nusername = \"u\"\n", ""));
    assert!(empty.contains("1 to 64 characters"), "{empty}");
    let inline = problems(
        &with("share = \"s\"\nusername = \"u\"\n", "")
            .replace("password-file = \"/p\"", "password-file = \"hunter2\""),
    );
    assert!(
        inline.contains("inline secrets are not accepted") && !inline.contains("hunter2"),
        "{inline}"
    );
    let version = problems(&with(
        "share = \"s\"\nusername = \"u\"\nversion = \"1.0\"\n",
        "",
    ));
    assert!(version.contains("ssmix2.share.version"), "{version}");
    let unknown = problems(&with(
        "share = \"s\"\nusername = \"u\"\npassword = \"x\"\n",
        "",
    ));
    assert!(
        unknown.contains("ssmix2.share.password: inline secrets are not accepted"),
        "{unknown}"
    );
}

#[test]
fn ssmix2_replica_with_the_boxs_own_identity() {
    let problems = |section: &str| match parse(&ssmix2_config(section), file()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    let url = "[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\nurl = \"https://10.98.0.1:8443/x/\"\nca-file = \"/a\"\nclient-identity = true\n";
    let ok = parse(
        &ssmix2_config(&format!("[identity]\nenabled = true\n{url}")),
        file(),
    )
    .unwrap();
    assert!(ok.ssmix2.unwrap().replica.client_identity);
    let off = problems(url);
    assert!(
        off.contains("ssmix2.replica.client-identity: needs [identity] enabled"),
        "{off}"
    );
    let both = problems(&format!(
        "[identity]\nenabled = true\n{url}client-cert-file = \"/b\"\nclient-key-file = \"/c\"\n"
    ));
    assert!(
        both.contains("ssmix2.replica.client-cert-file: not with client-identity")
            && both.contains("ssmix2.replica.client-key-file: not with client-identity"),
        "{both}"
    );
    let no_ca = problems(&format!(
        "[identity]\nenabled = true\n{}",
        url.replace("ca-file = \"/a\"\n", "")
    ));
    assert!(
        no_ca.contains("ssmix2.replica.ca-file: required"),
        "{no_ca}"
    );
    let dir = problems(
        "[identity]\nenabled = true\n[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\ndirectory = \"/srv/r\"\nclient-identity = true\n",
    );
    assert!(dir.contains("only with ssmix2.replica.url"), "{dir}");
}

#[test]
fn ssmix2_replica_rules() {
    let problems = |section: &str| match parse(&ssmix2_config(section), file()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    let both = problems(
        "[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\ndirectory = \"/srv/r\"\nurl = \"https://h:1/x/\"\nca-file = \"/a\"\nclient-cert-file = \"/b\"\nclient-key-file = \"/c\"\n",
    );
    assert!(
        both.contains("set exactly one of directory and url"),
        "{both}"
    );
    let neither = problems("[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\n");
    assert!(neither.contains("set exactly one"), "{neither}");
    let no_cert = problems(
        "[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\nurl = \"https://10.98.0.1:8443/x/\"\n",
    );
    assert!(
        no_cert.contains("ssmix2.replica.ca-file: required with ssmix2.replica.url"),
        "{no_cert}"
    );
    assert!(no_cert.contains("client-key-file"), "{no_cert}");
    let inside = problems(
        "[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\ndirectory = \"/srv/s/replica\"\n",
    );
    assert!(
        inside.contains("must not be inside the storage"),
        "{inside}"
    );
    let bad_url = problems(
        "[ssmix2]\nstorage = \"/srv/s\"\n[ssmix2.replica]\nurl = \"http://10.98.0.1/x/\"\n",
    );
    assert!(
        bad_url.contains("expected https://HOST:PORT/PATH/"),
        "{bad_url}"
    );
    let unknown = problems(
        "[ssmix2]\nstorage = \"/srv/s\"\nsurprise = 1\n[ssmix2.replica]\ndirectory = \"/srv/r\"\n",
    );
    assert!(unknown.contains("surprise"), "{unknown}");
}

// ---------------------------------------------------------------------------------------
// [dicom]

#[test]
fn the_spool_quota_must_fit_on_the_data_partition_beside_the_reserve() {
    let ids = "[site.network-ids]\nissuer = \"TOKYO-NET\"\noid = \"1.2.392.999.1\"\n";
    let dicom = |extra: &str| {
        let text = format!(
            "{ids}[dicom]\nlisten = \"0.0.0.0:104\"\n{extra}[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n"
        );
        parse(&ssmix2_config(&text), file()).unwrap()
    };
    // The default quota (10 GiB) on the image's own 256 MiB data partition, and on a disk
    // the partition has grown to fill.
    let default = dicom("");
    let refused = default.capacity_problems(256);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].key, "dicom.spool-quota-mib");
    assert!(
        refused[0].reason.contains("10240 MiB") && refused[0].reason.contains("at most 0 MiB"),
        "{}",
        refused[0].reason
    );
    assert!(
        default
            .capacity_problems(10240 + DATA_RESERVE_MIB)
            .is_empty()
    );
    let over = default.capacity_problems(10240 + DATA_RESERVE_MIB - 1);
    assert!(over[0].reason.contains("at most 10239 MiB"), "{over:?}");
    // A quota set for a small disk; no DICOM bridge, or one turned off: nothing to fit.
    assert!(
        dicom("spool-quota-mib = 1024\n")
            .capacity_problems(2048)
            .is_empty()
    );
    assert!(dicom("enabled = false\n").capacity_problems(1).is_empty());
    assert!(
        parse(MINIMAL, file())
            .unwrap()
            .capacity_problems(1)
            .is_empty()
    );
}

#[test]
fn dicom_section_defaults_and_rules() {
    let dicom = "[dicom]\nlisten = \"0.0.0.0:104\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n";
    let ids = "[site.network-ids]\nissuer = \"TOKYO-NET\"\noid = \"1.2.392.999.1\"\n";
    let cfg = parse(&ssmix2_config(&format!("{ids}{dicom}")), file()).unwrap();
    let n = cfg.site.network_ids.clone().unwrap();
    assert_eq!(
        (n.issuer.as_str(), n.oid.as_str()),
        ("TOKYO-NET", "1.2.392.999.1")
    );
    let d = cfg.dicom.unwrap();
    assert_eq!(d.patient_ids, PatientIdPolicy::Translate);
    assert_eq!(d.forward_associations, 2);
    assert_eq!(d.header_limit_kib, 1024);
    assert!(d.move_destinations.is_empty() && d.extra_sop_classes.is_empty());
    let small = parse(
        &ssmix2_config(&format!(
            "{ids}{}",
            dicom.replace("[dicom.pacs]", "header-limit-kib = 32\n[dicom.pacs]")
        )),
        file(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        small.contains("dicom.header-limit-kib: must be 64 to 16384 (got 32)"),
        "{small}"
    );
    let nine = parse(
        &ssmix2_config(&format!(
            "{ids}{}",
            dicom.replace("[dicom.pacs]", "forward-associations = 9\n[dicom.pacs]")
        )),
        file(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        nine.contains("dicom.forward-associations: must be 1 to 8 (got 9)"),
        "{nine}"
    );
    // Storage commitment: off by default; the wait for it bounded.
    assert!(!d.pacs.storage_commitment);
    assert_eq!(d.pacs.commitment_timeout.get(), Duration::from_secs(3600));
    let commit = |timeout: &str| {
        parse(
            &ssmix2_config(&format!(
                "{ids}{dicom}storage-commitment = true\ncommitment-timeout = \"{timeout}\"\n"
            )),
            file(),
        )
    };
    let on = commit("10m").unwrap().dicom.unwrap().pacs;
    assert!(on.storage_commitment);
    assert_eq!(on.commitment_timeout.get(), Duration::from_secs(600));
    let long = commit("8days").unwrap_err().to_string();
    assert!(
        long.contains("dicom.pacs.commitment-timeout: must be 1s to 7 days"),
        "{long}"
    );
    // Reports from the PACS's own AE title and address, or from those listed.
    assert_eq!(d.pacs.commitment_reporters(), Vec::new());
    let own = on.commitment_reporters();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].1, on.address.ip());
    let second =
        "[[dicom.pacs.commitment-reports-from]]\nae-title = \"PACS2\"\naddress = \"10.98.0.7\"\n";
    let listed = parse(
        &ssmix2_config(&format!("{ids}{dicom}storage-commitment = true\n{second}")),
        file(),
    )
    .unwrap()
    .dicom
    .unwrap()
    .pacs;
    assert_eq!(
        listed.commitment_reporters(),
        vec![("PACS2".to_owned(), "10.98.0.7".parse().unwrap())]
    );
    let without = parse(&ssmix2_config(&format!("{ids}{dicom}{second}")), file())
        .unwrap_err()
        .to_string();
    assert!(
        without
            .contains("dicom.pacs.commitment-reports-from: is only for storage-commitment = true"),
        "{without}"
    );
    let none = parse(
        &ssmix2_config(&format!(
            "{ids}{dicom}storage-commitment = true\ncommitment-reports-from = []\n"
        )),
        file(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        none.contains("dicom.pacs.commitment-reports-from: must list 1 to 8 callers (got 0)"),
        "{none}"
    );
    // Translating needs the network's domain; as-is does not.
    let missing = parse(&ssmix2_config(dicom), file())
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("dicom.patient-ids: translating patient IDs needs [site.network-ids]"),
        "{missing}"
    );
    let as_is = parse(
        &ssmix2_config(&dicom.replace("[dicom.pacs]", "patient-ids = \"as-is\"\n[dicom.pacs]")),
        file(),
    )
    .unwrap();
    assert_eq!(as_is.dicom.unwrap().patient_ids, PatientIdPolicy::AsIs);
    for (bad, reason) in [
        ("oid = \"1.2.03\"", "no leading zero"),
        ("oid = \"1\"", "at least two arcs"),
        ("oid = \"1..2\"", "digits separated by single dots"),
    ] {
        let text = ids.replace("oid = \"1.2.392.999.1\"", bad);
        let e = parse(&ssmix2_config(&format!("{text}{dicom}")), file())
            .unwrap_err()
            .to_string();
        assert!(e.contains(reason), "{bad}: {e}");
    }
    let e = parse(
        &ssmix2_config(&format!("{}{dicom}", ids.replace("TOKYO-NET", "A\\\\B"))),
        file(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("without a backslash"), "{e}");
    assert!(d.enabled);
    assert_eq!(
        (d.max_pdu, d.max_associations, d.spool_quota_mib),
        (65536, 16, 10240)
    );
    assert_eq!(d.timeout, dur("30s"));
    assert_eq!(d.dead_letter_after, dur("168h"));
    assert!(d.allowed_callers.is_none());
    let bad = parse(
        &ssmix2_config("[dicom]\nlisten = \"0.0.0.0:104\"\nmax-pdu = 100\npatient-ids = \"as-is\"\n[[dicom.allowed-callers]]\nae-title = \"CT01\"\naddress = \"192.168.1.20\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n"),
        file(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad.contains("dicom.max-pdu: must be 16384 to 1048576"),
        "{bad}"
    );
}

#[test]
fn query_retrieve_needs_an_allowed_callers_list() {
    let dicom = |extra: &str| {
        ssmix2_config(&format!(
            "[dicom]\nlisten = \"0.0.0.0:104\"\npatient-ids = \"as-is\"\n{extra}[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n"
        ))
    };
    // Off by default: no viewer may query.
    let cfg = parse(&dicom(""), file()).unwrap();
    assert!(!cfg.dicom.unwrap().query_retrieve);
    // On without callers: refused, naming both keys.
    let p = problems(&dicom("query-retrieve = true\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].1, "dicom.query-retrieve");
    assert!(p[0].2.contains("allowed-callers"), "{p:?}");
    // An empty list is no list.
    assert_eq!(
        problems(&dicom("query-retrieve = true\nallowed-callers = []\n")).len(),
        1
    );
    // On with the viewers listed: accepted.
    let cfg = parse(
        &dicom("query-retrieve = true\n[[dicom.allowed-callers]]\nae-title = \"VIEWER\"\naddress = \"192.168.1.30\"\n"),
        file(),
    )
    .unwrap();
    assert!(cfg.dicom.unwrap().query_retrieve);
}

#[test]
fn identity_renewal_settings_are_bounded() {
    let cfg = parse(MINIMAL, Path::new("t.toml")).unwrap();
    assert!(!cfg.identity.enabled);
    assert_eq!(
        cfg.identity.renew_before.get(),
        Duration::from_secs(10 * 86_400)
    );
    assert_eq!(cfg.identity.check_interval.get(), Duration::from_secs(3600));
    for (section, key) in [
        ("renew-before = \"31d\"", "identity.renew-before"),
        ("renew-before = \"0s\"", "identity.renew-before"),
        ("check-interval = \"2d\"", "identity.check-interval"),
        ("check-interval = \"500ms\"", "identity.check-interval"),
    ] {
        let got = problems(&format!("{MINIMAL}[identity]\n{section}\n"));
        assert!(got.iter().any(|(_, k, _)| k == key), "{section}: {got:?}");
    }
    let cfg = parse(
        &format!(
            "{MINIMAL}[identity]\nenabled = true\nrenew-before = \"5d\"\ncheck-interval = \"1s\"\n"
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert!(cfg.identity.enabled);
}

#[test]
fn the_console_is_off_by_default_on_the_lan_and_its_bounds_are_checked() {
    let cfg = parse(MINIMAL, Path::new("t.toml")).unwrap();
    assert!(!cfg.console.enabled);
    assert_eq!(cfg.console.listen.to_string(), "192.168.50.1:443");
    assert_eq!(cfg.console.lockout_after, 5);
    for (section, key) in [
        ("idle-timeout = \"30s\"", "console.idle-timeout"),
        ("idle-timeout = \"9h\"", "console.idle-timeout"),
        ("lockout-after = 2", "console.lockout-after"),
        ("lockout-after = 21", "console.lockout-after"),
        ("lockout-for = \"2d\"", "console.lockout-for"),
        ("cert-file = \"/etc/console.pem\"", "console.cert-file"),
    ] {
        let got = problems(&format!("{MINIMAL}[console]\nenabled = true\n{section}\n"));
        assert!(got.iter().any(|(_, k, _)| k == key), "{section}: {got:?}");
    }
    let cfg = parse(
        &format!(
            "{MINIMAL}[console]\nenabled = true\nlisten = \"127.0.0.1:8443\"\nidle-timeout = \"5m\"\nlockout-after = 3\n"
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert!(cfg.console.enabled);
    assert_eq!(cfg.console.idle_timeout.get(), Duration::from_secs(300));
}

// ---------------------------------------------------------------------------------------
// [network]

fn network_config(wan: &str, lan: &str, extra: &str) -> String {
    tunnel_section(&format!(
        "[network.wan]\n{wan}\n[network.lan]\n{lan}\n{extra}"
    ))
}

#[test]
fn network_ports_become_networkd_files() {
    let cfg = parse(
        &network_config(
            "mac = \"52:54:00:74:73:01\"\naddress = \"dhcp\"",
            "interface = \"enp0s17\"\naddress = \"192.168.50.1/24\"",
            "",
        ),
        file(),
    )
    .unwrap();
    let files = cfg.network.unwrap().networkd_files();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["10-tsunagi-wan.network", "20-tsunagi-lan.network"]);
    let wan = &files[0].1;
    assert!(
        wan.contains("[Match]\nMACAddress=52:54:00:74:73:01\n"),
        "{wan}"
    );
    assert!(wan.contains("[Network]\nDHCP=ipv4\n"), "{wan}");
    let lan = &files[1].1;
    assert!(lan.contains("[Match]\nName=enp0s17\n"), "{lan}");
    assert!(lan.contains("RequiredForOnline=no"), "{lan}");
    assert!(lan.contains("Address=192.168.50.1/24\n"), "{lan}");
    assert!(lan.contains("ConfigureWithoutCarrier=yes"), "{lan}");
    assert!(!lan.contains("DHCP"), "{lan}");
    // A fixed WAN, its gateway and resolvers; a MAC in capitals is kept in lower case.
    let fixed = parse(
        &network_config(
            "mac = \"52:54:00:AB:73:01\"\naddress = \"192.0.2.10/24\"\ngateway = \"192.0.2.1\"\ndns = [\"192.0.2.53\"]",
            "mac = \"52:54:00:74:73:02\"\naddress = \"192.168.50.1/24\"",
            "",
        ),
        file(),
    )
    .unwrap()
    .network
    .unwrap()
    .networkd_files();
    let wan = &fixed[0].1;
    for line in [
        "MACAddress=52:54:00:ab:73:01",
        "Address=192.0.2.10/24",
        "Gateway=192.0.2.1",
        "DNS=192.0.2.53",
    ] {
        assert!(wan.contains(line), "{line} in {wan}");
    }
    assert!(parse(MINIMAL, file()).unwrap().network.is_none());
}

#[test]
fn network_ports_that_do_not_fit_together_are_refused() {
    let lan = "mac = \"52:54:00:74:73:02\"\naddress = \"192.168.50.1/24\"";
    let wan = "mac = \"52:54:00:74:73:01\"\naddress = \"dhcp\"";
    let cases = [
        // Values.
        (
            network_config("mac = \"52:54:00:74:73\"\naddress = \"dhcp\"", lan, ""),
            "network.wan.mac",
            "expected a MAC address",
        ),
        (
            network_config("mac = \"01:00:5e:00:00:01\"\naddress = \"dhcp\"", lan, ""),
            "network.wan.mac",
            "multicast",
        ),
        (
            network_config(
                wan,
                "mac = \"52:54:00:74:73:02\"\naddress = \"192.168.50.0/24\"",
                "",
            ),
            "network.lan.address",
            "network or broadcast",
        ),
        (
            network_config(
                wan,
                "mac = \"52:54:00:74:73:02\"\naddress = \"192.168.50.1/31\"",
                "",
            ),
            "network.lan.address",
            "prefix length is 8 to 30",
        ),
        (
            network_config(wan, "mac = \"52:54:00:74:73:02\"\naddress = \"auto\"", ""),
            "network.lan.address",
            "expected `dhcp` or",
        ),
        // One port each, named once.
        (
            network_config("address = \"dhcp\"", lan, ""),
            "network.wan",
            "by `mac` or by `interface`",
        ),
        (
            network_config(
                "mac = \"52:54:00:74:73:01\"\ninterface = \"eth0\"\naddress = \"dhcp\"",
                lan,
                "",
            ),
            "network.wan",
            "one of the two",
        ),
        (
            network_config("mac = \"52:54:00:74:73:02\"\naddress = \"dhcp\"", lan, ""),
            "network.lan",
            "the same port as network.wan",
        ),
        // Addresses.
        (
            network_config(wan, "mac = \"52:54:00:74:73:02\"\naddress = \"dhcp\"", ""),
            "network.lan.address",
            "needs a fixed address",
        ),
        (
            network_config(
                "mac = \"52:54:00:74:73:01\"\naddress = \"dhcp\"\ngateway = \"192.0.2.1\"",
                lan,
                "",
            ),
            "network.wan.gateway",
            "with dhcp they come from the router",
        ),
        (
            network_config(
                "mac = \"52:54:00:74:73:01\"\naddress = \"192.0.2.10/24\"\ngateway = \"198.51.100.1\"",
                lan,
                "",
            ),
            "network.wan.gateway",
            "not another host of 192.0.2.10/24",
        ),
        (
            network_config(wan, &format!("{lan}\ngateway = \"192.168.50.254\""), ""),
            "network.lan.gateway",
            "the LAN has no gateway",
        ),
        (
            network_config(
                "mac = \"52:54:00:74:73:01\"\naddress = \"192.168.50.7/16\"",
                lan,
                "",
            ),
            "network.lan.address",
            "overlaps the WAN's",
        ),
        (
            network_config(
                wan,
                "mac = \"52:54:00:74:73:02\"\naddress = \"10.99.0.1/16\"",
                "",
            ),
            "network.lan.address",
            "overlaps the tunnel's",
        ),
        // The DICOM listener is on the LAN.
        (
            network_config(
                wan,
                lan,
                "[dicom]\nlisten = \"192.168.60.1:11112\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n",
            ),
            "dicom.listen",
            "not the LAN's address 192.168.50.1",
        ),
    ];
    for (text, key, why) in cases {
        let found = problems(&text);
        assert!(
            found.iter().any(|(_, k, r)| k == key && r.contains(why)),
            "{key}: {why}: {found:?}"
        );
    }
    // The LAN's own address, or any, is fine for the listener.
    for listen in ["192.168.50.1", "0.0.0.0"] {
        parse(
            &network_config(wan, lan, &format!("[dicom]\nlisten = \"{listen}:11112\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n")),
            file(),
        )
        .unwrap();
    }
}

#[test]
fn consent_fhir_over_https_needs_the_ca_and_the_boxs_certificate() {
    let problems = |section: &str| match parse(&ssmix2_config(section), file()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    let https = "[consent]\nenabled = true\nfhir-url = \"https://10.98.0.1:8443/fhir\"\n";
    let files = "ca-file = \"/a\"\nclient-cert-file = \"/b\"\nclient-key-file = \"/c\"\n";
    let cfg = parse(&ssmix2_config(&format!("{https}{files}")), file()).unwrap();
    let url = cfg.consent.fhir_url.unwrap();
    assert!(url.is_tls());
    assert_eq!(url.addr().to_string(), "10.98.0.1:8443");
    assert_eq!(url.path(), "/fhir");
    assert_eq!(url.to_string(), "https://10.98.0.1:8443/fhir");

    let bare = problems(https);
    for key in ["ca-file", "client-cert-file", "client-key-file"] {
        assert!(
            bare.contains(&format!(
                "consent.{key}: required with consent.fhir-url (or client-identity = true)"
            )),
            "{bare}"
        );
    }
    let identity = "ca-file = \"/a\"\nclient-identity = true\n";
    let off = problems(&format!("{https}{identity}"));
    assert!(
        off.contains("consent.client-identity: needs [identity] enabled"),
        "{off}"
    );
    let on = parse(
        &ssmix2_config(&format!("[identity]\nenabled = true\n{https}{identity}")),
        file(),
    )
    .unwrap();
    assert!(on.consent.client_identity);
    let both = problems(&format!(
        "[identity]\nenabled = true\n{https}{identity}client-cert-file = \"/b\"\n"
    ));
    assert!(
        both.contains("consent.client-cert-file: not with client-identity"),
        "{both}"
    );
    // Plain http inside the tunnel takes none of them.
    let plain = problems(&format!(
        "[consent]\nenabled = true\nfhir-url = \"http://10.98.0.1:8081/fhir\"\n{files}"
    ));
    assert!(
        plain.contains("consent.ca-file: only with an https consent.fhir-url"),
        "{plain}"
    );
    for bad in [
        "https://fhir.example:8443/fhir",
        "https://10.98.0.1/fhir",
        "ftp://10.98.0.1:21/fhir",
        "https://10.98.0.1:8443/fhir?x=1",
    ] {
        let p = problems(&format!("[consent]\nfhir-url = \"{bad}\"\n"));
        assert!(
            p.contains("consent.fhir-url: expected https://IPV4:PORT/PATH"),
            "{bad}: {p}"
        );
    }
}

#[test]
fn dicom_tls_to_the_pacs_needs_the_ca_and_the_boxs_certificate() {
    let dicom = |extra: &str| {
        ssmix2_config(&format!(
            "[dicom]\nlisten = \"0.0.0.0:104\"\npatient-ids = \"as-is\"\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:2762\"\n{extra}"
        ))
    };
    let problems = |extra: &str| match parse(&dicom(extra), file()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    let bare = problems("tls = true\n");
    for key in ["ca-file", "client-cert-file", "client-key-file"] {
        assert!(
            bare.contains(&format!(
                "dicom.pacs.{key}: required with dicom.pacs.tls (or client-identity = true)"
            )),
            "{bare}"
        );
    }
    let files = "ca-file = \"/a\"\nclient-cert-file = \"/b\"\nclient-key-file = \"/c\"\n";
    let cfg = parse(&dicom(&format!("tls = true\n{files}")), file()).unwrap();
    let pacs = cfg.dicom.unwrap().pacs;
    assert!(pacs.tls);
    assert_eq!(pacs.ca_file.unwrap().as_path(), Path::new("/a"));
    let off = problems("tls = true\nca-file = \"/a\"\nclient-identity = true\n");
    assert!(
        off.contains("dicom.pacs.client-identity: needs [identity] enabled"),
        "{off}"
    );
    // Without tls, none of the files.
    let plain = problems(files);
    assert!(
        plain.contains("dicom.pacs.ca-file: only with dicom.pacs.tls = true"),
        "{plain}"
    );
}

#[test]
fn the_audit_trail_needs_a_repository_the_ca_and_the_boxs_certificate() {
    let problems = |section: &str| match parse(&ssmix2_config(section), file()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    // Off by default, and nothing is asked of it then.
    let cfg = parse(&ssmix2_config(""), file()).unwrap();
    assert!(!cfg.audit.enabled);
    assert_eq!(problems("[audit]\nrepository = \"10.98.0.1:6514\"\n"), "");
    let bare = problems("[audit]\nenabled = true\n");
    assert!(
        bare.contains("audit.repository: required with audit.enabled = true"),
        "{bare}"
    );
    for key in ["ca-file", "client-cert-file", "client-key-file"] {
        assert!(
            bare.contains(&format!(
                "audit.{key}: required with audit.repository (or client-identity = true)"
            )),
            "{bare}"
        );
    }
    let good = "[audit]\nenabled = true\nrepository = \"10.98.0.1:6514\"\nca-file = \"/a\"\nclient-cert-file = \"/b\"\nclient-key-file = \"/c\"\n";
    let cfg = parse(&ssmix2_config(good), file()).unwrap();
    assert_eq!(
        cfg.audit.repository,
        Some("10.98.0.1:6514".parse().unwrap())
    );
    assert_eq!(cfg.audit.timeout.get(), Duration::from_secs(10));
    let slow = problems(&format!("{good}timeout = \"10m\"\n"));
    assert!(
        slow.contains("audit.timeout: must be between 1s and 5m"),
        "{slow}"
    );
    let unknown = problems(&format!("{good}port = 6514\n"));
    assert!(unknown.contains("port"), "{unknown}");
}

#[test]
fn updates_need_a_channel_the_ca_and_the_boxs_certificate() {
    let problems = |section: &str| match parse(&ssmix2_config(section), file()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    };
    let cfg = parse(&ssmix2_config(""), file()).unwrap();
    assert!(!cfg.update.enabled);
    assert_eq!(cfg.update.compatible, "tsunagi");
    assert_eq!(
        cfg.update.root_file.as_str(),
        "/usr/share/tsunagi/update-root.json"
    );
    let bare = problems("[update]\nenabled = true\n");
    assert!(
        bare.contains("update.channel-url: required with update.enabled = true"),
        "{bare}"
    );
    assert!(bare.contains("update.ca-file"), "{bare}");
    let good = "[update]\nenabled = true\nchannel-url = \"https://10.98.0.1:8443/updates/\"\nca-file = \"/a\"\nclient-cert-file = \"/b\"\nclient-key-file = \"/c\"\n";
    let cfg = parse(&ssmix2_config(good), file()).unwrap();
    assert_eq!(cfg.update.check_interval.get(), Duration::from_secs(3600));
    for (extra, why) in [
        (
            "check-interval = \"10s\"\n",
            "update.check-interval: must be between 1m and 1d",
        ),
        ("compatible = \"two words\"\n", "update.compatible"),
        (
            "[update.window]\nnightly = \"25:00-05:00\"\n",
            "expected HH:MM-HH:MM",
        ),
        (
            "[update.window]\nnightly = \"01:00-01:00\"\n",
            "expected HH:MM-HH:MM",
        ),
        (
            "[update.window]\nutc-offset = \"09:00\"\n",
            "expected +HH:MM",
        ),
        ("[update.window]\nall-day = [\"sunday\"]\n", "sunday"),
    ] {
        let p = problems(&format!("{good}{extra}"));
        assert!(p.contains(why), "{extra}: {p}");
    }
}

#[test]
fn the_maintenance_window_is_in_the_clinics_local_time() {
    let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
    let w = MaintenanceWindow::default();
    // 2026-12-07 is a Monday. 01:30 JST is 16:30 UTC the day before.
    assert!(w.contains(at("2026-12-06T16:30:00Z")));
    assert!(!w.contains(at("2026-12-06T20:30:00Z"))); // Monday 05:30 JST
    assert!(!w.contains(at("2026-12-07T03:00:00Z"))); // Monday 12:00 JST
    assert!(w.contains(at("2026-12-06T03:00:00Z"))); // Sunday 12:00 JST
    assert!(!w.contains(at("2026-12-05T03:00:00Z"))); // Saturday 12:00 JST
    let late = MaintenanceWindow {
        nightly: "22:00-02:00".to_owned().try_into().unwrap(),
        all_day: vec![],
        utc_offset: "+00:00".to_owned().try_into().unwrap(),
    };
    assert!(late.contains(at("2026-12-07T23:00:00Z")));
    assert!(late.contains(at("2026-12-07T01:59:00Z")));
    assert!(!late.contains(at("2026-12-07T02:00:00Z")));
    assert_eq!(late.nightly.to_string(), "22:00-02:00");
    assert_eq!(w.utc_offset.to_string(), "+09:00");
}
