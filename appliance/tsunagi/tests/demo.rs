//! Acceptance 7: `cargo xtask demo` starts, `tsunagi status` shows `heartbeat` ready, and
//! Ctrl-C stops it cleanly. The demo runs in a real terminal (a pseudo-terminal from
//! util-linux `script`), and Ctrl-C is the byte 0x03 typed into it: the terminal driver
//! sends SIGINT to the whole foreground process group (cargo, xtask and tsunagi), as a
//! developer's Ctrl-C does. Issue 14: nothing is killed (no service outlives its stop, xtask
//! does not escalate) and no process of the demo's session is left. Issue 19: as root, the
//! demo's console is logged in to from the clinic LAN with the login the demo printed (curl),
//! then the staff's whole workflow is done in Chromium against it (`demo/chromium.rs`).
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

#[path = "demo/chromium.rs"]
mod chromium;
mod common;

use std::io::{BufRead, BufReader, Write as _};
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
    // `script` gives the demo a terminal of its own (a new session whose foreground group is
    // the demo's) and copies our writes to it: 0x03 there is a Ctrl-C.
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!("exec {} xtask demo", env!("CARGO")))
        .arg("/dev/null")
        .current_dir(&workspace)
        // Use the binary this test run built, rather than rebuilding target/debug/tsunagi
        // while other tests execute it.
        .env("TSUNAGI_DEMO_BIN", BIN)
        .env("TSUNAGI_DEMO_DIR", demo_dir.path())
        .env("TSUNAGI_DEMO_METRICS_PORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let mut terminal = StopOnPanic {
        terminal: child.stdin.take(),
        script: pgid,
    };
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim_end_matches('\r').to_owned();
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
                kill_demo(pgid);
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
            kill_demo(pgid);
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
            // Issue 19: the demo's console login works from the clinic LAN.
            let clinic = text
                .lines()
                .find_map(|l| l.strip_prefix("demo: test network up: "))
                .and_then(|l| l.split(", clinic ").nth(1))
                .and_then(|l| l.split(' ').next())
                .unwrap()
                .to_owned();
            log_in_to_the_demo_console(&clinic, &text);
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

    // Every process of the demo's terminal session: cargo, xtask, tsunagi and its services,
    // and what the demo started in the test network.
    let session = session_of(supervisor);
    assert_ne!(
        session,
        session_of(i32::try_from(std::process::id()).unwrap())
    );

    // A quiet log once it runs: sync cycles and rounds that change nothing log at debug.
    std::thread::sleep(Duration::from_secs(3));
    while let Ok(line) = rx.try_recv() {
        output.push(line);
    }
    let running = output
        .iter()
        .position(|l| l.starts_with("demo: running"))
        .unwrap();
    for noise in ["sync cycle done", "synced with the network"] {
        assert!(
            !output[running..].iter().any(|l| l.contains(noise)),
            "{noise:?} logged while nothing changed: {:#?}",
            &output[running..]
        );
    }
    // The staff's workflow in Chromium, on the clinic LAN (it changes what the box holds,
    // so after the quiet log).
    if box_ns.is_some() {
        chromium::the_staff_work_the_demo_console_in_chromium(&chromium::Demo {
            text: &text,
            dir: demo_dir.path(),
            binary: BIN,
        });
    }

    // Ctrl-C, typed into the demo's terminal.
    let mut terminal = terminal.terminal.take().unwrap();
    terminal.write_all(b"\x03").unwrap();
    terminal.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            kill_demo(pgid);
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
    // One Ctrl-C stops everything without a kill: xtask waits, and every service stops
    // within its deadline.
    for sign in [
        "killing tsunagi",
        "did not stop in time",
        "killed by SIGKILL",
        "while stopping",
    ] {
        assert!(
            !output.iter().any(|l| l.contains(sign)),
            "{sign:?} in {output:#?}"
        );
    }
    assert!(!alive(supervisor));
    assert!(!alive(heartbeat));
    let left = in_session(session);
    assert!(left.is_empty(), "left behind: {left:#?}");
    if let Some(ns) = box_ns {
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(!list.contains(&ns), "the demo left namespace {ns} behind");
    }
}

/// The demo's terminal; if the test fails while the demo runs, a Ctrl-C typed into it, as a
/// developer would (the demo then removes its network namespaces and stops what it started
/// in them), and whatever is left of the demo's session killed 30 s later.
struct StopOnPanic {
    terminal: Option<std::process::ChildStdin>,
    script: Pid,
}

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        let Some(mut terminal) = self.terminal.take() else {
            return;
        };
        if !std::thread::panicking() {
            return;
        }
        let _ = terminal.write_all(b"\x03").and_then(|()| terminal.flush());
        let deadline = Instant::now() + Duration::from_secs(30);
        // `script` ends (a zombie: nobody waits for it here) once the demo has stopped.
        while Instant::now() < deadline
            && std::fs::read_to_string(format!("/proc/{}/stat", self.script)).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, f)| !f.starts_with('Z'))
            })
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        kill_demo(self.script);
    }
}

/// The session id of a process (field 6 of `/proc/PID/stat`).
fn session_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(3).unwrap().parse().unwrap()
}

/// The processes still in `session`, with their command lines.
fn in_session(session: i32) -> Vec<String> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().map_while(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // A zombie is already gone; only its parent has to reap it.
        if fields.first() == Some(&"Z") {
            continue;
        }
        if fields.get(3).and_then(|s| s.parse::<i32>().ok()) == Some(session) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            left.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    left
}

/// After a failure: kills every process of the demo's terminal session, then `script`.
fn kill_demo(script: Pid) {
    for entry in std::fs::read_dir("/proc").unwrap().map_while(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // Field 4 is the parent: the session leader is script's child.
        let ppid = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(script.as_raw()) {
            for line in in_session(pid) {
                if let Some(Ok(p)) = line.split(':').next().map(str::parse::<i32>) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
    }
    let _ = killpg(script, Signal::SIGKILL);
}

/// Logs in to the demo's console from the clinic LAN (curl in the clinic's namespace) with
/// the login the demo printed and a TOTP code of its secret.
fn log_in_to_the_demo_console(clinic: &str, text: &str) {
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("demo: the clinic console: "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no console URL:\n{text}"))
        .to_owned();
    let login = text
        .lines()
        .find_map(|l| l.strip_prefix("demo: console login (demo only): "))
        .unwrap_or_else(|| panic!("no console login:\n{text}"));
    let (name, rest) = login.split_once(" / ").unwrap();
    let (password, rest) = rest.split_once(", TOTP secret ").unwrap();
    let secret = console::accounts::totp_secret(rest.split(' ').next().unwrap()).unwrap();
    let jar = tempfile::NamedTempFile::new().unwrap();
    let curl = |args: &[&str]| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                clinic,
                "curl",
                "-sk",
                "--max-time",
                "20",
                "-c",
            ])
            .arg(jar.path())
            .arg("-b")
            .arg(jar.path())
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The console may still be starting when the demo says it runs.
    let start = Instant::now();
    let page = loop {
        let page = curl(&[&format!("{url}login")]);
        if page.contains("name=\"csrf\"") || start.elapsed() > Duration::from_secs(60) {
            break page;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let marker = "name=\"csrf\" value=\"";
    let at = page
        .find(marker)
        .unwrap_or_else(|| panic!("no login page: {page}"))
        + marker.len();
    let csrf = &page[at..at + page[at..].find('"').unwrap()];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = console::accounts::totp_code(&secret, now / console::accounts::TOTP_STEP);
    let origin = url.trim_end_matches('/');
    let answer = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        &format!("Origin: {origin}"),
        "--data-urlencode",
        &format!("csrf={csrf}"),
        "--data-urlencode",
        &format!("name={name}"),
        "--data-urlencode",
        &format!("password={password}"),
        "--data-urlencode",
        &format!("code={code}"),
        &format!("{url}login"),
    ]);
    assert!(
        answer.starts_with("303 https://") && answer.ends_with('/'),
        "the demo's console login: {answer}"
    );
    let page = curl(&[&url]);
    assert!(page.contains("<h1>接続状態</h1>"), "{page}");
    // The overview's facts, from the services' own metrics: linked since a time, the
    // consent cache pulled from the network's FHIR server, the queues of the DICOM bridge and
    // SS-MIX2 (the sample study delivered: nothing given up on), the version, the clock.
    let row = |what: &str| -> (String, String) {
        let head = format!("<th scope=\"row\">{what}</th><td class=\"");
        let at = page
            .find(&head)
            .unwrap_or_else(|| panic!("no {what} in the overview: {page}"))
            + head.len();
        let (class, rest) = page[at..].split_once("\">").unwrap();
        let words = rest.split("</td>").next().unwrap();
        (class.to_owned(), words.to_owned())
    };
    let (class, words) = row("ネットワーク");
    assert!(class == "ok" && words.starts_with("接続中（20"), "{words}");
    let (class, words) = row("同意情報の最終同期");
    assert!(class == "ok" && words.starts_with("20"), "{words}");
    // The network's facility directory, read from the hub's FHIR server.
    let (class, words) = row("施設一覧");
    assert!(
        class == "ok"
            && words.starts_with(&format!(
                "{} 施設（20",
                hil_tests::fhir::SAMPLE_DIRECTORY.len()
            )),
        "{words}"
    );
    let (_, words) = row("DICOM 画像");
    assert!(words.ends_with("送信不能 0 件"), "{words}");
    let (_, words) = row("SS-MIX2");
    assert!(words.starts_with("送信待ち "), "{words}");
    let (_, words) = row("ソフトウェア");
    assert!(
        words.starts_with(&format!("版 {}", env!("CARGO_PKG_VERSION"))),
        "{words}"
    );
    let (_, words) = row("時刻");
    assert!(!words.is_empty(), "{words}");
    // SS-MIX2 の点検: the demo's storage as the sync last inspected it.
    let page = curl(&[&format!("{url}ssmix2")]);
    assert!(
        page.contains("<h1>SS-MIX2 の点検</h1>")
            && page.contains("最終点検: 20")
            && page.contains("<th scope=\"row\">合計</th>"),
        "{page}"
    );
    // 保留中: the DICOM bridge's desk answers the console (the sample study was delivered),
    // and the SS-MIX2 sync's list of what waits is there to read (the sample storage's
    // patients without consent are counted).
    let page = curl(&[&format!("{url}held")]);
    assert!(
        page.contains("<h1>保留中</h1>")
            && (page.contains("止まっている画像はありません")
                || page.contains("<caption>DICOM 画像")),
        "{page}"
    );
    assert!(
        page.contains("<h2>SS-MIX2 のファイル</h2>")
            && (page.contains("<caption>理由ごとの件数</caption>")
                || page.contains("止まっているファイルはありません")),
        "{page}"
    );
}
