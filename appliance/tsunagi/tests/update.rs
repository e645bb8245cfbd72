//! Issue 18: the `update` service under the supervisor, against a TUF channel the release
//! tooling wrote (`tsunagi_provision::release`) and a real nginx serves over mutual TLS. A
//! channel whose timestamp has expired is refused (status, and one Security Alert at a
//! real rsyslog however many retries); once the operator publishes again, the newer
//! release is downloaded, verified against the signed metadata and kept for the
//! maintenance window.
#![expect(
    clippy::disallowed_methods,
    reason = "a plain test thread waits between polls of the audit repository"
)]

mod common;

use std::num::NonZeroU64;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

use common::*;
use hil_tests::nginx::Nginx;
use jiff::{SignedDuration, Timestamp};
use nix::sys::signal::Signal;
use tsunagi_provision::release::{self as tooling, Bundle, ChannelKeys, Expiries};
use update::release::{Custom, SEEDS, Wave};

fn block<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn chmod_r(path: &Path) {
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chmod_r(&entry.unwrap().path());
        }
    }
}

#[test]
fn an_expired_channel_is_refused_and_audited_then_the_newer_release_is_staged() {
    let nginx = Nginx::start_for_test();
    let operator = tempfile::tempdir().unwrap();
    let keys = ChannelKeys::generate(&operator.path().join("keys")).unwrap();
    let hours = SignedDuration::from_hours;
    let root = block(tooling::root(
        &keys,
        NonZeroU64::MIN,
        Timestamp::now() + hours(24 * 365),
    ))
    .unwrap();
    let root_json = operator.path().join("root.json");
    std::fs::write(&root_json, &root).unwrap();
    let bundle_path = operator.path().join("tsunagi-1.1.0.raucb");
    let bytes: Vec<u8> = (0..65_536u32)
        .map(|i| u8::try_from(i % 241).unwrap())
        .collect();
    std::fs::write(&bundle_path, &bytes).unwrap();
    let bundle = Bundle {
        path: bundle_path,
        custom: Custom {
            version: "1.1.0".parse().unwrap(),
            compatible: "tsunagi".into(),
            waves: vec![Wave {
                seeds_below: SEEDS,
                starts: Timestamp::now() - hours(1),
            }],
        },
    };
    let repo = nginx.data_root().join("updates");
    let publish = |timestamp_expires: Timestamp| {
        let later = Timestamp::now() + hours(24 * 30);
        block(tooling::publish(
            &repo,
            &root_json,
            &keys,
            std::slice::from_ref(&bundle),
            &Expiries {
                targets: later,
                snapshot: later,
                timestamp: timestamp_expires,
            },
        ))
        .unwrap();
        chmod_r(&repo);
    };
    // The operator's timestamp signing lapsed (or someone serves a frozen channel).
    publish(Timestamp::now() - hours(1));

    let (rsyslog, audit, _audit_files) = audit_repository(None, None);
    let mut h = Harness::new("");
    let tls = h.dir.path().join("tls");
    let (ca, cert, key) = service_tls_files(
        &tls,
        update::service::USER,
        &nginx.ca_file(),
        &nginx.client_cert_file(),
        &nginx.client_key_file(),
    );
    let (box_root, os_release) = (tls.join("update-root.json"), tls.join("os-release"));
    std::fs::write(&box_root, &root).unwrap();
    std::fs::write(&os_release, "ID=tsunagi\nIMAGE_VERSION=1.0.0\n").unwrap();
    // A window that opens in two hours (UTC here): the staged release waits for it.
    let now_min = u16::try_from(Timestamp::now().as_second().rem_euclid(86_400) / 60).unwrap();
    let (start, end) = ((now_min + 120) % 1440, (now_min + 180) % 1440);
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    );
    h.write_config(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[update]\nenabled = true\nchannel-url = \"{}/updates/\"\nroot-file = \"{}\"\nca-file = \"{}\"\nclient-cert-file = \"{}\"\nclient-key-file = \"{}\"\nos-release = \"{}\"\ncheck-interval = \"1m\"\n\n[update.window]\nnightly = \"{window}\"\nall-day = []\nutc-offset = \"+00:00\"\n{audit}",
        nginx.base_url().trim_end_matches('/'),
        box_root.display(),
        ca.display(),
        cert.display(),
        key.display(),
        os_release.display(),
    ));
    h.start();
    let status = h.wait_for("the refusal in status", Duration::from_secs(30), |s| {
        service(s, "update")["summary"]
            .as_str()
            .is_some_and(|t| t.contains("timestamp metadata has expired"))
    });
    let update = service(&status, "update");
    assert_eq!(update["health"], "degraded", "{update:#}");
    let alert = |m: &String| m.contains("csd-code=\"110131\"");
    let messages = audit_messages_until(&rsyslog, "the refusal", Duration::from_secs(30), |ms| {
        ms.iter().any(alert)
    });
    let message = messages.iter().find(|m| alert(m)).unwrap();
    assert!(message.contains("csd-code=\"110113\""), "{message}");
    assert!(message.contains("expired"), "{message}");
    // Retried (5 s, then 10 s): still refused, still one alert.
    std::thread::sleep(Duration::from_secs(8));

    // What an earlier release left (its bundle, a download cut off): superseded, so it goes
    // once the newer release is taken, and the data partition gets its space back.
    let downloads = h.state_dir().join("update").join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let owner = std::fs::metadata(h.state_dir().join("update")).unwrap();
    std::os::unix::fs::chown(&downloads, Some(owner.uid()), Some(owner.gid())).unwrap();
    for leftover in [
        format!("{}.raucb", "0a".repeat(32)),
        format!("{}.partial", "0b".repeat(32)),
    ] {
        std::fs::write(downloads.join(leftover), vec![7u8; 4096]).unwrap();
    }

    // The operator publishes again: the release is fetched, verified and kept.
    publish(Timestamp::now() + hours(24));
    let status = h.wait_for("the staged release", Duration::from_secs(60), |s| {
        service(s, "update")["summary"]
            .as_str()
            .is_some_and(|t| t.contains("1.1.0 downloaded and verified"))
    });
    let update = service(&status, "update");
    let summary = update["summary"].as_str().unwrap();
    assert!(
        summary.contains("waits for the maintenance window"),
        "{summary}"
    );
    assert_eq!(update["health"], "ok", "{update:#}");
    assert_eq!(update["metrics"]["update_staged"], 1.0, "{update:#}");
    assert_eq!(
        update["metrics"]["update_refusals_total"], 1.0,
        "{update:#}"
    );
    let staged: Vec<_> = std::fs::read_dir(&downloads)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert_eq!(std::fs::read(&staged[0]).unwrap(), bytes);
    assert_eq!(rsyslog.messages().iter().filter(|m| alert(m)).count(), 1);
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// The installer never installs again a version that failed its health gate, even when it
/// is asked to: at the boot that came back from the failed version, the update service may
/// ask for it once more before the health gate (which the installer runs after) has
/// recorded the failure. RAUC (stood in by a script that records every call) is not run.
#[test]
fn a_version_that_failed_its_health_gate_is_not_installed_again_when_asked() {
    let h = Harness::new("");
    let tools = tempfile::tempdir().unwrap();
    let os_release = tools.path().join("os-release");
    std::fs::write(&os_release, "ID=tsunagi\nIMAGE_VERSION=2\n").unwrap();
    h.write_config(&format!(
        "[update]\nos-release = \"{}\"\n\n[update.window]\nall-day = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n",
        os_release.display()
    ));
    let calls = tools.path().join("rauc-calls");
    let rauc = tools.path().join("rauc");
    std::fs::write(
        &rauc,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\ncase \"$1\" in\ninfo) printf \"RAUC_MF_COMPATIBLE='tsunagi'\\nRAUC_MF_VERSION='3'\\n\" ;;\ninstall) echo '100% Installing done.' ;;\nesac\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&rauc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bundle = b"version 3, never ready".to_vec();
    let sha: String = ring::digest::digest(&ring::digest::SHA256, &bundle)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let update_dir = h.state_dir().join("update");
    let install_dir = update_dir.join(update::install::INSTALL_DIR);
    std::fs::create_dir_all(update_dir.join("downloads")).unwrap();
    std::fs::create_dir_all(&install_dir).unwrap();
    std::fs::write(
        update_dir.join("downloads").join(format!("{sha}.raucb")),
        &bundle,
    )
    .unwrap();
    let failed = update::install::Outcome {
        version: "3".parse().unwrap(),
        verdict: update::install::Verdict::Unhealthy,
        reason: Some("not healthy within 60 s of its first boot".into()),
        at: 1_800_000_000,
    };
    update::install::write_outcome(&install_dir, &failed).unwrap();
    update::install::write_request(
        &install_dir,
        &update::install::Request {
            version: "3".parse().unwrap(),
            sha256: sha,
        },
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["update", "install", "--no-reboot", "--rauc"])
        .arg(&rauc)
        .arg("--incoming")
        .arg(tools.path().join("incoming"))
        .arg("--config")
        .arg(&h.config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("3 failed its health gate: not installed again"),
        "{said}"
    );
    assert!(
        !calls.exists(),
        "RAUC was run: {:?}",
        std::fs::read_to_string(&calls)
    );
    // The request is gone, and the outcome still says why.
    assert!(
        update::install::read_request(&install_dir)
            .unwrap()
            .is_none()
    );
    assert_eq!(
        update::install::read_outcome(&install_dir).unwrap(),
        Some(failed)
    );
}
