//! Acceptance 5: `tsunagi config check` rejects an unknown key, a bad AE title, a bad
//! 医療機関コード, an inline secret and a group-readable secret file, each with file:line and a
//! one-line reason, and accepts every shipped example.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::BIN;

const SECRET: &str = "c2VjcmV0LXZhbHVlLWRvLW5vdC1wcmludA==";

fn check(files: &[&Path]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(["config", "check"])
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The line of `stderr` for `file:line: key:`, asserting it exists and is one line.
fn problem<'a>(stderr: &'a str, file: &Path, line: usize, key: &str) -> &'a str {
    let prefix = format!("{}:{line}: {key}: ", file.display());
    stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no problem `{prefix}` in:\n{stderr}"))
}

#[test]
fn every_kind_of_mistake_is_reported_with_file_line_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        format!(
            r#"version = 1

[site]
facility-code = "131234567"
ae-title = "THIS-TITLE-IS-TOO-LONG"
colour = "blue"

[paths]
state-dir = "/var/lib/tsunagi"
runtime-dir = "/run/tsunagi"

[privacy]
id-hash-key = "{SECRET}"
"#
        ),
    )
    .unwrap();
    let (code, _, stderr) = check(&[&file]);
    assert_eq!(code, Some(3), "{stderr}");
    let facility = problem(&stderr, &file, 4, "site.facility-code");
    assert!(facility.contains("10 digits"), "{facility}");
    let ae = problem(&stderr, &file, 5, "site.ae-title");
    assert!(ae.contains("16"), "{ae}");
    let unknown = problem(&stderr, &file, 6, "site.colour");
    assert!(unknown.contains("unknown key"), "{unknown}");
    let inline = problem(&stderr, &file, 13, "privacy.id-hash-key");
    assert!(inline.contains("inline secret"), "{inline}");
    assert!(!stderr.contains(SECRET), "a secret was echoed:\n{stderr}");
}

#[test]
fn an_inline_value_in_a_secret_file_key_is_refused_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("inline.toml");
    std::fs::write(
        &file,
        format!(
            "version = 1\n[site]\nfacility-code = \"1312345678\"\nae-title = \"TSUNAGI\"\n[paths]\nstate-dir = \"/var/lib/tsunagi\"\nruntime-dir = \"/run/tsunagi\"\n[privacy]\nid-hash-key-file = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    let (code, _, stderr) = check(&[&file]);
    assert_eq!(code, Some(3), "{stderr}");
    let line = problem(&stderr, &file, 9, "privacy.id-hash-key-file");
    assert!(line.contains("inline secret"), "{line}");
    assert!(!stderr.contains(SECRET), "{stderr}");
}

#[test]
fn a_secret_file_readable_by_group_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id-hash.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let file = dir.path().join("secret.toml");
    std::fs::write(
        &file,
        format!(
            "version = 1\n[site]\nfacility-code = \"1312345678\"\nae-title = \"TSUNAGI\"\n[paths]\nstate-dir = \"/var/lib/tsunagi\"\nruntime-dir = \"/run/tsunagi\"\n[privacy]\nid-hash-key-file = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, stderr) = check(&[&file]);
    assert_eq!(code, Some(3), "{stderr}");
    let line = problem(&stderr, &file, 9, "privacy.id-hash-key-file");
    assert!(line.contains("group or others"), "{line}");
    assert!(line.contains("640"), "{line}");
    assert!(!stderr.contains("0123456789abcdef"), "{stderr}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stdout, stderr) = check(&[&file]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in [
        "appliance/examples",
        "image/overlay/usr/share/tsunagi/factory/tsunagi",
    ] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_shipped_config_passes_and_every_invalid_example_fails() {
    let files = shipped_configs();
    let (valid, invalid): (Vec<_>, Vec<_>) = files.iter().partition(|p| {
        !p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("invalid-")
    });
    assert!(valid.len() >= 3, "{files:?}");
    let valid: Vec<&Path> = valid.iter().map(|p| p.as_path()).collect();
    let (code, stdout, stderr) = check(&valid);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(": ok")).count(),
        valid.len()
    );
    for file in invalid {
        let (code, _, stderr) = check(&[file]);
        assert_eq!(code, Some(3), "{} should be rejected", file.display());
        assert!(stderr.lines().count() >= 2, "{stderr}");
    }
}

#[test]
fn a_missing_file_is_a_config_error() {
    let (code, _, stderr) = check(&[Path::new("/nonexistent/tsunagi.toml")]);
    assert_eq!(code, Some(3));
    assert!(
        stderr.contains("cannot read config file /nonexistent/tsunagi.toml"),
        "{stderr}"
    );
}

#[test]
fn a_spool_quota_larger_than_the_state_directory_s_file_system_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = |quota_mib: u64| {
        format!(
            "version = 1\n[site]\nfacility-code = \"1312345678\"\nae-title = \"TSUNAGI\"\n[site.network-ids]\nissuer = \"TOKYO-NET\"\noid = \"1.2.392.999.1\"\n[paths]\nstate-dir = \"{}\"\nruntime-dir = \"/run/tsunagi\"\n[dicom]\nlisten = \"0.0.0.0:104\"\nspool-quota-mib = {quota_mib}\n[dicom.pacs]\nae-title = \"PACS\"\naddress = \"10.98.0.1:4242\"\n",
            dir.path().join("state").display()
        )
    };
    let file = dir.path().join("dicom.toml");
    // A pebibyte: no file system this test runs on holds it.
    std::fs::write(&file, config(1 << 30)).unwrap();
    let (code, _, stderr) = check(&[&file]);
    assert_eq!(code, Some(3), "{stderr}");
    let prefix = format!("{}: dicom.spool-quota-mib: ", file.display());
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{stderr}"));
    assert!(
        line.contains("does not fit") && line.contains("at most"),
        "{line}"
    );

    std::fs::write(&file, config(16)).unwrap();
    let (code, stdout, stderr) = check(&[&file]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
}
