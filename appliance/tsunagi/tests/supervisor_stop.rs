//! Acceptance 2: SIGTERM stops everything within the deadline, including a child that ignores
//! SIGTERM and a helper process it left behind; no process of the tree remains.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

#[test]
fn sigterm_stops_every_process_within_the_deadline() {
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\ninterval = \"1s\"\n\n[drill.stubborn]\nignore-sigterm = true\nsubprocess = true\n"
    ));
    h.start();
    let status = h.wait_for("all ready", Duration::from_secs(30), |s| {
        state_of(s, "heartbeat") == "ready" && state_of(s, "drill-stubborn") == "ready"
    });
    let supervisor = h.pid();
    let heartbeat = pid_of(&status, "heartbeat").unwrap();
    let stubborn = pid_of(&status, "drill-stubborn").unwrap();
    let summary = service(&status, "drill-stubborn")["summary"]
        .as_str()
        .unwrap()
        .to_owned();
    let helper: i32 = summary
        .rsplit("helper pid ")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no helper pid in {summary:?}"));
    for pid in [heartbeat, stubborn, helper] {
        assert!(alive(pid), "{pid} should be running");
    }

    let sent = Instant::now();
    h.signal(Signal::SIGTERM);
    let exit = h
        .wait_exit(Duration::from_secs(10))
        .expect("supervisor did not exit within 10 s");
    let took = sent.elapsed();
    assert!(exit.success(), "supervisor exit: {exit:?}");
    // stop-timeout is 2 s: the stubborn drill is killed at the deadline, not before.
    assert!(took >= Duration::from_millis(1900), "took {took:?}");
    assert!(took < Duration::from_secs(8), "took {took:?}");

    std::thread::sleep(Duration::from_millis(200));
    for pid in [supervisor, heartbeat, stubborn, helper] {
        assert!(!alive(pid), "process {pid} survived the stop");
    }
    let log = h.log_text();
    assert!(log.contains("did not stop in time"), "{log}");
    assert!(!h.runtime_dir().join("control.sock").exists());
}

#[test]
fn sigint_stops_like_sigterm() {
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\ninterval = \"1s\"\n"
    ));
    h.start();
    let status = h.wait_for("heartbeat ready", Duration::from_secs(30), |s| {
        state_of(s, "heartbeat") == "ready"
    });
    let heartbeat = pid_of(&status, "heartbeat").unwrap();
    h.signal(Signal::SIGINT);
    let exit = h.wait_exit(Duration::from_secs(10)).expect("no exit");
    assert!(exit.success());
    assert!(!alive(heartbeat));
}
