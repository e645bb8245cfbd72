//! Acceptance 1: a crashing service is restarted with growing backoff and marked failed after
//! N crashes within the window, while the other services keep running.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn crashing_service_backs_off_then_fails_while_others_keep_running() {
    // A 500 ms first backoff keeps the doubling clearly visible despite ±20 % jitter and
    // the polling latency of a loaded machine.
    let supervisor =
        FAST_SUPERVISOR.replace("backoff-initial = \"200ms\"", "backoff-initial = \"500ms\"");
    let mut h = Harness::new(&format!(
        "{supervisor}\n[heartbeat]\ninterval = \"1s\"\n\n[drill.crashy]\nexit-after = \"100ms\"\nexit-code = 7\n"
    ));
    h.start();
    let first = h.wait_for("heartbeat ready", Duration::from_secs(30), |s| {
        state_of(s, "heartbeat") == "ready"
    });
    let heartbeat_pid = pid_of(&first, "heartbeat").unwrap();

    // Record when each new crashy process appears.
    let mut starts: Vec<(i32, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let failed = loop {
        assert!(
            Instant::now() < deadline,
            "crashy never failed; starts: {starts:?}"
        );
        let Some(status) = h.status() else { continue };
        let crashy = service(&status, "drill-crashy");
        if let Some(pid) = pid_of(&status, "drill-crashy")
            && starts.last().map(|(p, _)| *p) != Some(pid)
        {
            starts.push((pid, Instant::now()));
        }
        if crashy["state"] == "failed" {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let crashy = service(&failed, "drill-crashy");
    // crash-limit = 4: four runs, so three restarts, then failed.
    assert_eq!(crashy["restarts"], 3, "{crashy:#}");
    assert!(crashy["pid"].is_null());
    let last_error = crashy["last_error"].as_str().unwrap();
    assert!(last_error.contains("planned crash"), "{last_error}");
    assert!(last_error.contains("exited with status 7"), "{last_error}");

    // Backoff grows: 500 ms, 1 s, 2 s (±20 %), plus 100 ms of run time each.
    assert!(starts.len() >= 3, "saw too few starts: {starts:?}");
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1].1 - w[0].1).collect();
    for pair in gaps.windows(2) {
        assert!(pair[1] > pair[0], "backoff did not grow: {gaps:?}");
    }
    assert!(gaps[0] >= Duration::from_millis(400), "{gaps:?}");

    // The heartbeat never noticed.
    let hb = service(&failed, "heartbeat");
    assert_eq!(hb["state"], "ready");
    assert_eq!(hb["restarts"], 0);
    assert_eq!(pid_of(&failed, "heartbeat"), Some(heartbeat_pid));
    assert!(alive(heartbeat_pid));

    // And the supervisor logged the decision for an operator.
    assert!(h.log_text().contains("service failed"), "{}", h.log_text());
    h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

#[test]
fn a_background_task_that_panics_ends_its_service_with_the_panic_in_status() {
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[drill.panicky]\ninterval = \"200ms\"\npanic-task-after = \"500ms\"\n"
    ));
    h.start();
    let first = h.wait_for("panicky ready", Duration::from_secs(30), |s| {
        pid_of(s, "drill-panicky").is_some()
    });
    let pid = pid_of(&first, "drill-panicky").unwrap();
    // The task panics; the service ends with it as its error and is started again.
    let restarted = h.wait_for("the restart", Duration::from_secs(30), |s| {
        service(s, "drill-panicky")["restarts"].as_u64() >= Some(1)
    });
    let panicky = service(&restarted, "drill-panicky");
    let last_error = panicky["last_error"].as_str().unwrap();
    assert!(
        last_error.contains(
            "the heartbeat cannot go on: background task drill-panic panicked: drill: planned panic in a background task"
        ),
        "{panicky:#}"
    );
    assert!(last_error.contains("exited with status 1"), "{last_error}");
    assert_ne!(pid_of(&restarted, "drill-panicky"), Some(pid));
    h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}
