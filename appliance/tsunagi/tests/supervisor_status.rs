//! Acceptance 4: `tsunagi status --json` reports every service with its name, state, pid,
//! restarts, last error, uptime and summary; the table and the metrics say the same.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::time::Duration;

use common::*;

const FIELDS: [&str; 9] = [
    "name",
    "state",
    "health",
    "pid",
    "restarts",
    "last_error",
    "uptime_secs",
    "summary",
    "user",
];

#[test]
fn status_reports_every_service_with_every_field() {
    let port = free_port();
    // drill-sleepy must still be "starting" when we look, however slow the machine.
    let supervisor = FAST_SUPERVISOR.replace("ready-timeout = \"10s\"", "ready-timeout = \"5m\"");
    let mut h = Harness::new(&format!(
        "{supervisor}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[heartbeat]\ninterval = \"200ms\"\n\n[drill.steady]\ninterval = \"200ms\"\n\n[drill.sleepy]\nnever-ready = true\n"
    ));
    h.start();
    let status = h.wait_for("two ready and beating", Duration::from_secs(30), |s| {
        state_of(s, "heartbeat") == "ready"
            && state_of(s, "drill-steady") == "ready"
            && service(s, "heartbeat")["summary"]
                .as_str()
                .is_some_and(|t| !t.starts_with("1 beats"))
    });
    let services = status["services"].as_array().unwrap();
    let names: Vec<&str> = services
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["heartbeat", "drill-sleepy", "drill-steady"]);
    for s in services {
        for field in FIELDS {
            assert!(s.get(field).is_some(), "{field} missing in {s:#}");
        }
    }
    let hb = service(&status, "heartbeat");
    assert_eq!(hb["health"], "ok");
    assert!(hb["pid"].as_u64().unwrap() > 0);
    assert!(hb["uptime_secs"].as_u64().is_some());
    assert!(hb["last_error"].is_null());
    assert!(hb["summary"].as_str().unwrap().contains("beats"));
    assert_eq!(state_of(&status, "drill-sleepy"), "starting");
    let sup = &status["supervisor"];
    assert_eq!(sup["pid"].as_i64().unwrap(), i64::from(h.pid()));
    for field in ["version", "privileged", "ready", "uptime_secs", "config"] {
        assert!(sup.get(field).is_some(), "supervisor.{field} missing");
    }
    // Not ready: drill-sleepy never becomes ready (nor failed, within the test).
    assert_eq!(sup["ready"], false);

    // The table.
    let out = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&h.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("SERVICE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("heartbeat") && l.contains("ready")),
        "{table}"
    );

    // The metrics.
    let metrics = http_get(port, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for needle in [
        "tsunagi_service_state{service=\"heartbeat\",state=\"ready\"} 1",
        "tsunagi_service_state{service=\"drill-sleepy\",state=\"starting\"} 1",
        "tsunagi_service_restarts_total{service=\"heartbeat\"} 0",
        "tsunagi_service_up{service=\"drill-steady\"} 1",
        "tsunagi_service_uptime_seconds{service=\"heartbeat\"}",
        "tsunagi_ready 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert!(http_get(port, "/other").starts_with("HTTP/1.1 404"));
}

#[test]
fn status_without_a_supervisor_fails_clearly() {
    let h = Harness::new("");
    let out = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&h.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot reach the supervisor"), "{err}");
}

#[test]
fn ready_is_notified_to_systemd_once_every_service_is_ready() {
    use std::os::unix::net::UnixDatagram;
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\ninterval = \"1s\"\n"
    ));
    let socket_path = h.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    h.start_with(|cmd| {
        cmd.env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "400000");
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m| m == "READY=1") && seen.iter().any(|m| m == "WATCHDOG=1")) {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}); seen {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready_at = seen.iter().position(|m| m == "READY=1").unwrap();
    assert!(
        seen[..ready_at].iter().any(|m| m.starts_with("STATUS=")),
        "{seen:?}"
    );
    let status = h.status().unwrap();
    assert_eq!(state_of(&status, "heartbeat"), "ready");
    assert_eq!(status["supervisor"]["ready"], true);
    h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(10)).unwrap().success());
    let mut tail = Vec::new();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        tail.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(tail.iter().any(|m| m == "STOPPING=1"), "{tail:?}");
}
