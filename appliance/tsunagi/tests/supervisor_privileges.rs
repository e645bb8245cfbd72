//! Acceptance 3: as root, each child runs under its own uid, with no capabilities beyond
//! those it declares, NoNewPrivs=1 and no supplementary groups; its state directory is its
//! own, mode 0700.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::*;

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("user {user} was not created"))
        .uid
        .as_raw()
}

#[test]
fn children_run_as_their_own_users_with_only_declared_capabilities() {
    if skip_unless_root("children_run_as_their_own_users_with_only_declared_capabilities") {
        return;
    }
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\ninterval = \"1s\"\n\n[drill.binder]\ncapabilities = [\"CAP_NET_BIND_SERVICE\"]\n"
    ));
    h.start();
    let status = h.wait_for("all ready", Duration::from_secs(30), |s| {
        state_of(s, "heartbeat") == "ready" && state_of(s, "drill-binder") == "ready"
    });
    assert_eq!(status["supervisor"]["privileged"], true);

    // CAP_NET_BIND_SERVICE is capability 10.
    let cases = [
        ("heartbeat", "tsunagi-heartbeat", 0u64),
        ("drill-binder", "tsunagi-drill-binder", 1u64 << 10),
    ];
    let mut uids = Vec::new();
    for (service_name, user, mask) in cases {
        let pid = pid_of(&status, service_name).unwrap();
        let uid = uid_of(user);
        assert_ne!(uid, 0);
        uids.push(uid);
        assert_eq!(service(&status, service_name)["user"], user);
        let all = format!("{uid}\t{uid}\t{uid}\t{uid}");
        assert_eq!(proc_status(pid, "Uid"), all, "{service_name} Uid");
        assert_eq!(
            proc_status(pid, "Groups"),
            "",
            "{service_name} supplementary groups"
        );
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "{service_name}");
        for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let value = u64::from_str_radix(&proc_status(pid, set), 16).unwrap();
            assert_eq!(
                value, mask,
                "{service_name} {set} is {value:#x}, expected {mask:#x}"
            );
        }
        let dir = h.state_dir().join(service_name);
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.uid(), uid, "{} owner", dir.display());
        assert_eq!(meta.mode() & 0o7777, 0o700, "{} mode", dir.display());
        // The heartbeat's database was created by the service user, in its own directory.
        let db = std::fs::metadata(dir.join("heartbeat.db")).unwrap();
        assert_eq!(db.uid(), uid);
        assert_eq!(
            db.mode() & 0o077,
            0,
            "database must not be readable by others"
        );
    }
    assert_ne!(uids[0], uids[1], "each service has its own user");
}

#[test]
fn tsunagi_sysusers_matches_the_image() {
    let out = std::process::Command::new(BIN)
        .arg("sysusers")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../image/overlay/usr/lib/sysusers.d/tsunagi.conf"
    ))
    .unwrap();
    assert_eq!(
        generated, shipped,
        "regenerate with: tsunagi sysusers > image/overlay/usr/lib/sysusers.d/tsunagi.conf"
    );
}

/// Issue 19: the clinic console runs as its own user with `CAP_NET_BIND_SERVICE` (for port
/// 443) and no other capability, read from the running process.
#[test]
fn the_console_holds_cap_net_bind_service_and_nothing_else() {
    if skip_unless_root("the_console_holds_cap_net_bind_service_and_nothing_else") {
        return;
    }
    let clinic = ConsoleClinic::start();
    let status = clinic
        .h
        .wait_for("the console ready", Duration::from_secs(30), |s| {
            state_of(s, "console") == "ready"
        });
    let pid = pid_of(&status, "console").unwrap();
    assert_eq!(service(&status, "console")["user"], "tsunagi-console");
    let uid = uid_of("tsunagi-console");
    assert_ne!(uid, 0);
    assert_eq!(
        proc_status(pid, "Uid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}")
    );
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    // CAP_NET_BIND_SERVICE is capability 10.
    for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = u64::from_str_radix(&proc_status(pid, set), 16).unwrap();
        assert_eq!(value, 1 << 10, "console {set} is {value:#x}");
    }
}
