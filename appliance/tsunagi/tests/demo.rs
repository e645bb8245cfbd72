//! Acceptance 7: `cargo xtask demo` starts, `tsunagi status` shows `heartbeat` ready, and
//! Ctrl-C (SIGINT to the foreground process group) stops it cleanly.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

#[test]
fn cargo_xtask_demo_runs_and_stops_on_ctrl_c() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let demo_dir = tempfile::Builder::new()
        .prefix("tsunagi-demo-")
        .tempdir()
        .unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO"))
        .args(["xtask", "demo"])
        .current_dir(&workspace)
        // Use the binary this test run built, rather than rebuilding target/debug/tsunagi
        // while other tests execute it.
        .env("TSUNAGI_DEMO_BIN", BIN)
        .env("TSUNAGI_DEMO_DIR", demo_dir.path())
        .env("TSUNAGI_DEMO_METRICS_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0) // Like a shell job: Ctrl-C goes to the whole group.
        .spawn()
        .unwrap();
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("  demo| {line}");
            let _ = tx.send(line);
        }
    });
    let mut output = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !output
        .iter()
        .any(|l: &String| l.starts_with("demo: running"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => output.push(line),
            Err(_) => {
                let _ = killpg(pgid, Signal::SIGKILL);
                panic!("demo did not start: {output:#?}");
            }
        }
    }
    let config = demo_dir.path().join("tsunagi.toml");
    let text = output.join("\n");
    assert!(text.contains("tsunagi status --config"), "{text}");
    assert!(
        text.contains(&format!("http://127.0.0.1:{port}/metrics")),
        "{text}"
    );

    let start = Instant::now();
    let status = loop {
        let out = Command::new(BIN)
            .args(["status", "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        if out.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if state_of(&status, "heartbeat") == "ready" {
                break status;
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = killpg(pgid, Signal::SIGKILL);
            panic!("heartbeat never ready in the demo");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let heartbeat = pid_of(&status, "heartbeat").unwrap();
    let supervisor = i32::try_from(status["supervisor"]["pid"].as_i64().unwrap()).unwrap();
    // As root the demo runs the box in the test network, with the tunnel to the hub.
    let box_ns = text
        .lines()
        .find_map(|l| l.strip_prefix("demo: test network up: "))
        .and_then(|l| l.split(", box ").nth(1))
        .and_then(|l| l.split(',').next())
        .map(str::to_owned);
    let metrics = match &box_ns {
        None => {
            assert!(
                !is_root(),
                "as root the demo must bring up the test network:\n{text}"
            );
            http_get(port, "/metrics")
        }
        Some(ns) => {
            assert!(
                text.contains("demo: tunnel: \"up via 10.250.0.1:51820"),
                "{text}"
            );
            assert!(
                text.contains("demo: box -> hub health check through the tunnel: 200"),
                "{text}"
            );
            // Issue 6: a sample study from the clinic LAN reaches the hub's Orthanc, under the
            // patient's network ID.
            assert!(
                text.contains("demo: DICOM: a sample study sent from the clinic (storescu) arrived in the hub's Orthanc through the tunnel (1 instance"),
                "{text}"
            );
            assert!(
                text.contains("stored under network ID DEMO-NET-0000001)"),
                "{text}"
            );
            // Issue 5: the consented part of the clinic's SS-MIX2 storage is at the hub.
            assert!(
                text.contains("demo: SS-MIX2 at the hub (through the tunnel): 4 files of patient 0001234, 0 of 0005678"),
                "{text}"
            );
            assert_eq!(state_of(&status, "tunnel"), "ready");
            assert!(
                text.contains("demo: consent: pushed to the network's FHIR server"),
                "{text}"
            );
            assert!(
                text.contains(r#"the consent service answers {"decision":"permit"}"#),
                "{text}"
            );
            let testnet = hil_tests::testnet::testnet_binary().unwrap();
            let out = Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(testnet)
                .args(["get", &format!("http://127.0.0.1:{port}/metrics")])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    assert!(
        metrics.contains("tsunagi_service_up{service=\"heartbeat\"} 1"),
        "{metrics}"
    );

    // Ctrl-C.
    killpg(pgid, Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = killpg(pgid, Signal::SIGKILL);
            panic!("demo did not stop after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "demo exit: {exit:?}");
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(line) = rx.try_recv() {
        output.push(line);
    }
    assert!(
        output.iter().any(|l| l.starts_with("demo: stopped")),
        "{output:#?}"
    );
    assert!(!alive(supervisor));
    assert!(!alive(heartbeat));
    if let Some(ns) = box_ns {
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(!list.contains(&ns), "the demo left namespace {ns} behind");
    }
}
