//! Acceptance 6: SIGHUP with one service's section changed restarts only that service;
//! SIGHUP with an invalid file keeps the old config running and logs why.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn sections(b_interval: &str) -> String {
    format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\ninterval = \"1s\"\n\n[drill.alpha]\ninterval = \"1s\"\n\n[drill.beta]\ninterval = \"{b_interval}\"\n"
    )
}

fn all_ready(s: &serde_json::Value) -> bool {
    ["heartbeat", "drill-alpha", "drill-beta"]
        .iter()
        .all(|n| state_of(s, n) == "ready")
}

#[test]
fn sighup_restarts_only_changed_services_and_rejects_invalid_files() {
    let mut h = Harness::new(&sections("1s"));
    h.start();
    let before = h.wait_for("all ready", Duration::from_secs(30), all_ready);
    let pid = |s: &serde_json::Value, n: &str| pid_of(s, n).unwrap();

    // Change only drill.beta.
    h.write_config(&sections("2s"));
    h.signal(Signal::SIGHUP);
    let after = h.wait_for("beta restarted", Duration::from_secs(30), |s| {
        all_ready(s) && pid_of(s, "drill-beta") != Some(pid(&before, "drill-beta"))
    });
    assert_eq!(pid(&after, "heartbeat"), pid(&before, "heartbeat"));
    assert_eq!(pid(&after, "drill-alpha"), pid(&before, "drill-alpha"));
    assert!(!alive(pid(&before, "drill-beta")));
    assert!(h.log_text().contains("configuration reloaded"));

    // Add a service and remove another in one reload.
    h.write_config(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\ninterval = \"1s\"\n\n[drill.beta]\ninterval = \"2s\"\n\n[drill.gamma]\n"
    ));
    h.signal(Signal::SIGHUP);
    let changed = h.wait_for("gamma added, alpha removed", Duration::from_secs(30), |s| {
        let names: Vec<&str> = s["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        names == ["heartbeat", "drill-beta", "drill-gamma"] && state_of(s, "drill-gamma") == "ready"
    });
    assert_eq!(pid(&changed, "heartbeat"), pid(&before, "heartbeat"));
    assert_eq!(pid(&changed, "drill-beta"), pid(&after, "drill-beta"));
    assert!(!alive(pid(&before, "drill-alpha")));

    // An invalid file: everything stays as it is, and the log says why.
    let valid = std::fs::read_to_string(&h.config).unwrap();
    std::fs::write(&h.config, valid.replace("TSUNAGI-TEST", "BAD\\\\TITLE")).unwrap();
    h.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.log_text().contains("configuration reload rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection logged:\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = h.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("configuration reload rejected"))
        .unwrap();
    assert!(line.contains("site.ae-title"), "{line}");
    assert!(line.contains("tsunagi.toml:"), "{line}");
    std::thread::sleep(Duration::from_millis(500));
    let still = h.status().unwrap();
    for name in ["heartbeat", "drill-beta", "drill-gamma"] {
        assert_eq!(
            pid(&still, name),
            pid(&changed, name),
            "{name} was restarted"
        );
        assert_eq!(state_of(&still, name), "ready");
    }

    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}
