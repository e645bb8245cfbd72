//! The privileged step of an update, and the health gate after the reboot.
//!
//! The `update` service (unprivileged) only asks: once a verified bundle is staged and the
//! maintenance window is open, it writes a [`Request`] (version and SHA-256) into
//! `STATE/update/install/`. Root's `tsunagi-update-install.service`, started by a path unit
//! when the request appears, runs `tsunagi update install`, which trusts nothing of the
//! request but which verified download it names ([`Installer::install`]):
//! 1. it copies the bundle into a directory only root can write, hashing it on the way, so
//!    that the update service cannot change it after the checks;
//! 2. RAUC verifies its signature against the image's keyring (`rauc info`), and the
//!    installer checks its compatible and that its version is the one asked for and newer
//!    than the running one: a rollback needs more than the unprivileged service;
//! 3. `rauc install` writes the other slot (the bundle's hook puts the slot's UKI on the
//!    ESP with three boot tries) and makes the next boot go to it once;
//! 4. it waits until the box is idle (no DICOM association from the clinic, no SS-MIX2
//!    cycle: [`busy`]) while the window lasts, and reboots.
//!
//! Each result is an [`Outcome`] beside the request, which the update service reports.
//! After the reboot the health gate (`tsunagi update health-gate`, before
//! `boot-complete.target`) marks the new slot good once the box is healthy
//! ([`healthy`]); otherwise it marks it bad and the box reboots into the old slot, whose
//! gate records that the version failed ([`Verdict::Unhealthy`]), so that it is not
//! installed again.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tsunagi_runtime::status::{Health, ServiceState, StatusReport};

use crate::release::Version;

/// The directory of the request and the outcome, under the update service's state.
pub const INSTALL_DIR: &str = "install";
/// The update service's request.
pub const REQUEST_FILE: &str = "request.json";
/// What became of the last request.
pub const OUTCOME_FILE: &str = "outcome.json";

/// The update service asks for the verified download of this release to be installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Request {
    pub version: Version,
    /// The bundle's SHA-256 (hex), as the signed targets metadata names it; the download is
    /// `downloads/SHA256.raucb`.
    pub sha256: String,
}

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Written to the other slot; the box boots it once it is idle.
    Installed,
    /// Not installed: the request or the bundle was refused.
    Refused,
    /// `rauc install` failed; the other slot is no use until the next install.
    Failed,
    /// Booted, and it passed the health gate: the slot is good.
    Good,
    /// Booted, but it failed the health gate: the box is back on the old slot, and this
    /// version is not installed again.
    Unhealthy,
}

/// What became of an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Outcome {
    pub version: Version,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When (Unix seconds).
    pub at: i64,
}

/// Why the request or the outcome cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path} cannot be read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what}: {reason}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{path} cannot be written")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    what: &'static str,
) -> Result<Option<T>, InstallError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(InstallError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| InstallError::Invalid {
            path: path.to_owned(),
            what,
            reason: e.to_string(),
        })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), InstallError> {
    let err = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec(value).map_err(|e| err(std::io::Error::other(e)))?;
    tsunagi_state::replace_file(path, &bytes, 0o644).map_err(err)
}

/// The request in `dir` ([`INSTALL_DIR`]), if there is one.
pub fn read_request(dir: &Path) -> Result<Option<Request>, InstallError> {
    read_json(&dir.join(REQUEST_FILE), "update request")
}

/// Asks for `request` (the update service).
pub fn write_request(dir: &Path, request: &Request) -> Result<(), InstallError> {
    write_json(&dir.join(REQUEST_FILE), request)
}

/// The outcome in `dir`, if there is one.
pub fn read_outcome(dir: &Path) -> Result<Option<Outcome>, InstallError> {
    read_json(&dir.join(OUTCOME_FILE), "update outcome")
}

/// Records `outcome` in `dir`.
pub fn write_outcome(dir: &Path, outcome: &Outcome) -> Result<(), InstallError> {
    write_json(&dir.join(OUTCOME_FILE), outcome)
}

/// Now, in Unix seconds.
pub fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The privileged step's settings.
#[derive(Debug, Clone)]
pub struct Installer {
    /// The update service's state directory (`STATE/update`).
    pub update_dir: PathBuf,
    /// A directory only root can write, for the copy RAUC installs.
    pub incoming: PathBuf,
    /// The `rauc` program.
    pub rauc: PathBuf,
    /// This box's compatible (`[update] compatible`).
    pub compatible: String,
    /// The running version.
    pub running: Version,
}

impl Installer {
    /// Installs what `request` names (steps 1–3 of the module's list), and returns what
    /// became of it; `progress` hears each step done and each line of RAUC's progress
    /// (`NN% what`), for the console. The copy is removed whatever happens.
    pub fn install(&self, request: &Request, progress: &mut dyn FnMut(&str)) -> Outcome {
        let outcome = |verdict, reason: Option<String>| Outcome {
            version: request.version.clone(),
            verdict,
            reason,
            at: now(),
        };
        let refused = |reason: String| outcome(Verdict::Refused, Some(reason));
        if request.version <= self.running {
            return refused(format!(
                "{} is not newer than the running {}",
                request.version, self.running
            ));
        }
        let sha = request.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return refused("the request names no SHA-256".into());
        }
        let source = self
            .update_dir
            .join("downloads")
            .join(format!("{sha}.raucb"));
        let copy = self.incoming.join(format!("{sha}.raucb"));
        let result = self.copy_checked(&source, &copy, &sha).and_then(|()| {
            progress("the bundle copied and its SHA-256 checked");
            let (compatible, version) = self.info(&copy)?;
            if compatible != self.compatible {
                return Err(Step::Refused(format!(
                    "the bundle is for {compatible:?}, this box is {:?}",
                    self.compatible
                )));
            }
            if version != request.version {
                return Err(Step::Refused(format!(
                    "the bundle is version {version}, the request says {}",
                    request.version
                )));
            }
            progress("RAUC accepts its signature, compatible and version");
            self.rauc_install(&copy, progress)
        });
        let _ = std::fs::remove_file(&copy);
        match result {
            Ok(()) => outcome(Verdict::Installed, None),
            Err(Step::Refused(reason)) => refused(reason),
            Err(Step::Failed(reason)) => outcome(Verdict::Failed, Some(reason)),
        }
    }

    /// Copies `source` (no link) to `copy`, checking its SHA-256 on the way.
    fn copy_checked(&self, source: &Path, copy: &Path, sha: &str) -> Result<(), Step> {
        let failed = |what: &str, path: &Path, e: std::io::Error| {
            Step::Failed(format!("{what} {}: {e}", path.display()))
        };
        match std::fs::symlink_metadata(source) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => {
                return Err(Step::Refused(format!(
                    "{} is not a regular file",
                    source.display()
                )));
            }
            Err(e) => return Err(failed("cannot read", source, e)),
        }
        std::fs::create_dir_all(&self.incoming)
            .map_err(|e| failed("cannot make", &self.incoming, e))?;
        let mut from = std::fs::File::open(source).map_err(|e| failed("cannot read", source, e))?;
        let mut to = std::fs::File::create(copy).map_err(|e| failed("cannot write", copy, e))?;
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = from
                .read(&mut buf)
                .map_err(|e| failed("cannot read", source, e))?;
            if n == 0 {
                break;
            }
            digest.update(&buf[..n]);
            to.write_all(&buf[..n])
                .map_err(|e| failed("cannot write", copy, e))?;
        }
        to.sync_all().map_err(|e| failed("cannot write", copy, e))?;
        if hex::encode(digest.finish()) != sha {
            return Err(Step::Refused(
                "the bundle is not the one the update service verified (its SHA-256 differs)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `rauc info`: RAUC checks the signature against the system's keyring; its
    /// compatible and version.
    fn info(&self, bundle: &Path) -> Result<(String, Version), Step> {
        let out = std::process::Command::new(&self.rauc)
            .args(["info", "--output-format=shell"])
            .arg(bundle)
            .output()
            .map_err(|e| Step::Failed(format!("cannot run {}: {e}", self.rauc.display())))?;
        if !out.status.success() {
            return Err(Step::Refused(format!(
                "RAUC refuses the bundle: {}",
                last_line(&out.stderr)
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let compatible = shell_value(&text, "RAUC_MF_COMPATIBLE")
            .ok_or_else(|| Step::Refused("the bundle names no compatible".into()))?;
        let version = shell_value(&text, "RAUC_MF_VERSION")
            .ok_or_else(|| Step::Refused("the bundle names no version".into()))?
            .parse()
            .map_err(|e| Step::Refused(format!("the bundle's version: {e}")))?;
        Ok((compatible, version))
    }

    /// `rauc install`, its progress lines passed on as they come.
    fn rauc_install(&self, bundle: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), Step> {
        let cannot =
            |e: std::io::Error| Step::Failed(format!("cannot run {}: {e}", self.rauc.display()));
        let mut child = std::process::Command::new(&self.rauc)
            .arg("install")
            .arg(bundle)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(cannot)?;
        // Its error output is read beside, so that neither pipe fills while the other is read.
        let errors = child.stderr.take().map(|mut stderr| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = stderr.read_to_end(&mut bytes);
                bytes
            })
        });
        if let Some(stdout) = child.stdout.take() {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                if let Some(step) = rauc_progress(&line) {
                    progress(&format!("rauc: {step}"));
                }
            }
        }
        let status = child.wait().map_err(cannot)?;
        let stderr = errors.and_then(|t| t.join().ok()).unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(Step::Failed(format!(
                "rauc install failed: {}",
                last_line(&stderr)
            )))
        }
    }
}

/// A line of `rauc install`'s progress (`NN% what`, RAUC's own words), trimmed; `None` for
/// anything else it prints.
pub fn rauc_progress(line: &str) -> Option<&str> {
    let line = line.trim();
    let (percent, what) = line.split_once('%')?;
    let percent: u8 = percent.trim().parse().ok()?;
    (percent <= 100 && !what.trim().is_empty()).then_some(line)
}

/// How a step of [`Installer::install`] went wrong.
enum Step {
    Refused(String),
    Failed(String),
}

/// The last non-empty line of a program's output, for a reason.
fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)");
    line.chars().take(300).collect()
}

/// The value of `key` in RAUC's `--output-format=shell` output (`KEY='value'`, a quote
/// inside written `'\''`).
pub fn shell_value(text: &str, key: &str) -> Option<String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))?;
    let value = line
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(line);
    Some(value.replace("'\\''", "'"))
}

/// The booted slot as `rauc status --output-format=shell` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    /// Its boot name (`A`, `B`).
    pub bootname: String,
    /// Whether the boot backend counts it good: not, on the first boot after an install.
    pub good: bool,
}

/// The booted slot in `rauc status --output-format=shell`'s output.
pub fn booted(status: &str) -> Result<Booted, String> {
    let slots = shell_value(status, "RAUC_SLOTS").ok_or("rauc status lists no slots")?;
    for n in slots.split_whitespace() {
        let get = |key: &str| shell_value(status, &format!("{key}_{n}"));
        if get("RAUC_SLOT_STATE").as_deref() == Some("booted") {
            let bootname = get("RAUC_SLOT_BOOTNAME")
                .filter(|b| !b.is_empty())
                .ok_or("the booted slot has no boot name")?;
            let good = get("RAUC_SLOT_BOOT_STATUS").as_deref() == Some("good");
            return Ok(Booted { bootname, good });
        }
    }
    Err("rauc status shows no booted slot".into())
}

/// Why the box is not idle now, if it is not: a DICOM association from the clinic (by
/// the connections to the DICOM port, `dicom_connections`), an SS-MIX2 sync cycle under
/// way (the `ssmix2` service's `cycle_running`).
pub fn busy(report: &StatusReport, dicom_connections: usize) -> Vec<String> {
    let mut why = Vec::new();
    if dicom_connections > 0 {
        why.push(format!(
            "{dicom_connections} DICOM association(s) from the clinic"
        ));
    }
    let cycling = report
        .services
        .iter()
        .find(|s| s.name == "ssmix2")
        .and_then(|s| s.metrics.get("cycle_running"))
        .is_some_and(|v| *v > 0.0);
    if cycling {
        why.push("an SS-MIX2 sync cycle".into());
    }
    why
}

/// Connections established to local TCP `port` now (`/proc/net/tcp` and `tcp6`): the
/// DICOM associations being served, as the kernel sees them, not as a status report of
/// some seconds ago says.
pub fn established_on(port: u16) -> std::io::Result<usize> {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        n += count_established(&text, port);
    }
    Ok(n)
}

/// Rows of a `/proc/net/tcp` table in state ESTABLISHED (01) whose local port is `port`.
fn count_established(table: &str, port: u16) -> usize {
    let hex_port = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let mut fields = row.split_whitespace();
            let local = fields.nth(1).unwrap_or("");
            let state = fields.nth(1).unwrap_or("");
            state == "01" && local.rsplit(':').next() == Some(hex_port.as_str())
        })
        .count()
}

/// Why the box is not healthy yet, if it is not: the supervisor not ready, a service not
/// ready, the tunnel not up (its health not ok).
pub fn healthy(report: &StatusReport) -> Result<(), String> {
    if !report.supervisor.ready {
        return Err("the supervisor is not ready".into());
    }
    let not_ready: Vec<&str> = report
        .services
        .iter()
        .filter(|s| s.state != ServiceState::Ready)
        .map(|s| s.name.as_str())
        .collect();
    if !not_ready.is_empty() {
        return Err(format!("not ready: {}", not_ready.join(", ")));
    }
    match report.services.iter().find(|s| s.name == "tunnel") {
        Some(t) if t.health != Health::Ok => Err(format!("the tunnel is not up: {}", t.summary)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tsunagi_runtime::status::ServiceStatus;

    use super::*;

    #[test]
    fn rauc_shell_output_is_read() {
        let info =
            "RAUC_MF_COMPATIBLE='tsunagi'\nRAUC_MF_VERSION='2'\nRAUC_MF_DESCRIPTION='it'\\''s'\n";
        assert_eq!(
            shell_value(info, "RAUC_MF_COMPATIBLE").as_deref(),
            Some("tsunagi")
        );
        assert_eq!(shell_value(info, "RAUC_MF_VERSION").as_deref(), Some("2"));
        assert_eq!(
            shell_value(info, "RAUC_MF_DESCRIPTION").as_deref(),
            Some("it's")
        );
        assert_eq!(shell_value(info, "RAUC_MF"), None);
        let status = "RAUC_SYSTEM_COMPATIBLE='tsunagi'\nRAUC_SYSTEM_BOOTED_BOOTNAME='B'\n\
                      RAUC_SLOTS='1 2 3 4'\n\
                      RAUC_SLOT_STATE_1='inactive'\nRAUC_SLOT_CLASS_1='rootfs'\nRAUC_SLOT_BOOTNAME_1='A'\nRAUC_SLOT_BOOT_STATUS_1='good'\n\
                      RAUC_SLOT_STATE_2='inactive'\nRAUC_SLOT_CLASS_2='verity'\nRAUC_SLOT_BOOTNAME_2=''\nRAUC_SLOT_BOOT_STATUS_2=''\n\
                      RAUC_SLOT_STATE_3='booted'\nRAUC_SLOT_CLASS_3='rootfs'\nRAUC_SLOT_BOOTNAME_3='B'\nRAUC_SLOT_BOOT_STATUS_3='bad'\n";
        assert_eq!(
            booted(status),
            Ok(Booted {
                bootname: "B".into(),
                good: false
            })
        );
        assert!(booted("RAUC_SLOTS='1'\nRAUC_SLOT_STATE_1='inactive'\n").is_err());
    }

    #[test]
    fn established_connections_to_a_port_are_counted_from_the_kernel_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0132A8C0:2B68 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0132A8C0:2B68 1432A8C0:C350 01 00000000:00000000 00:00000000 00000000   999        0 2 1 0000000000000000 20 4 30 10 -1\n\
   2: 0132A8C0:C351 1432A8C0:2B68 01 00000000:00000000 00:00000000 00000000   999        0 3 1 0000000000000000 20 4 30 10 -1\n";
        // 0x2B68 = 11112: the listener (0A) and an outgoing connection to 11112 elsewhere
        // do not count; the one association does.
        assert_eq!(count_established(table, 11112), 1);
        assert_eq!(count_established(table, 104), 0);
        // And the real tables: a connection to a listener of ours.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let before = established_on(port).unwrap();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        assert_eq!(established_on(port).unwrap(), before + 1);
    }

    /// A status report whose `ssmix2` service reports `cycle_running` as `cycling`.
    fn report_with_ssmix2(cycling: Option<f64>) -> StatusReport {
        let service = |name: &str, metrics: BTreeMap<String, f64>| ServiceStatus {
            name: name.to_owned(),
            state: ServiceState::Ready,
            health: Health::Ok,
            pid: Some(2),
            restarts: 0,
            last_error: None,
            uptime_secs: Some(60),
            summary: String::new(),
            user: None,
            metrics,
        };
        StatusReport {
            supervisor: tsunagi_runtime::status::SupervisorStatus {
                pid: 1,
                version: "0".into(),
                privileged: true,
                ready: true,
                uptime_secs: 60,
                config: String::new(),
            },
            services: vec![
                service("dicom", BTreeMap::new()),
                service(
                    "ssmix2",
                    cycling
                        .map(|v| BTreeMap::from([("cycle_running".to_owned(), v)]))
                        .unwrap_or_default(),
                ),
            ],
        }
    }

    #[test]
    fn the_box_is_busy_with_a_clinic_association_or_an_unfinished_ssmix2_cycle() {
        assert!(busy(&report_with_ssmix2(Some(0.0)), 0).is_empty());
        assert!(busy(&report_with_ssmix2(None), 0).is_empty());
        assert_eq!(
            busy(&report_with_ssmix2(Some(1.0)), 0),
            vec!["an SS-MIX2 sync cycle".to_owned()]
        );
        assert_eq!(
            busy(&report_with_ssmix2(Some(1.0)), 2),
            vec![
                "2 DICOM association(s) from the clinic".to_owned(),
                "an SS-MIX2 sync cycle".to_owned()
            ]
        );
    }

    #[test]
    fn requests_and_outcomes_are_strict_json_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), None);
        let request = Request {
            version: "2".parse().unwrap(),
            sha256: "ab".repeat(32),
        };
        write_request(dir.path(), &request).unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), Some(request));
        std::fs::write(
            dir.path().join(REQUEST_FILE),
            r#"{"version":"2","sha256":"ab","bundle":"/etc/shadow"}"#,
        )
        .unwrap();
        assert!(matches!(
            read_request(dir.path()),
            Err(InstallError::Invalid { .. })
        ));
        let outcome = Outcome {
            version: "2".parse().unwrap(),
            verdict: Verdict::Unhealthy,
            reason: Some("not ready: dicom".into()),
            at: 1,
        };
        write_outcome(dir.path(), &outcome).unwrap();
        assert_eq!(read_outcome(dir.path()).unwrap(), Some(outcome));
    }

    #[test]
    fn raucs_progress_lines_are_told_from_the_rest() {
        assert_eq!(
            rauc_progress(" 80% Copying image to rootfs.1"),
            Some("80% Copying image to rootfs.1")
        );
        assert_eq!(
            rauc_progress("100% Installing done."),
            Some("100% Installing done.")
        );
        for other in [
            "installing",
            "idle",
            "Installing `/x.raucb` succeeded",
            "50%",
            "x% y",
        ] {
            assert_eq!(rauc_progress(other), None, "{other}");
        }
    }

    #[test]
    fn the_installer_refuses_what_is_not_newer_or_not_the_verified_download() {
        let dir = tempfile::tempdir().unwrap();
        let installer = Installer {
            update_dir: dir.path().join("update"),
            incoming: dir.path().join("incoming"),
            // Never reached: every case below is refused before RAUC is asked.
            rauc: dir.path().join("no-rauc"),
            compatible: "tsunagi".into(),
            running: "2".parse().unwrap(),
        };
        let ask = |version: &str, sha256: String| {
            installer.install(
                &Request {
                    version: version.parse().unwrap(),
                    sha256,
                },
                &mut |_| {},
            )
        };
        let older = ask("1.9", "ab".repeat(32));
        assert_eq!(older.verdict, Verdict::Refused);
        assert!(
            older
                .reason
                .unwrap()
                .contains("not newer than the running 2"),
            "rollback"
        );
        assert!(
            ask("3", "../../etc".into())
                .reason
                .unwrap()
                .contains("no SHA-256")
        );
        // The download is not the bytes the request names (the update service, or someone
        // with its rights, changed it after the check).
        let downloads = installer.update_dir.join("downloads");
        std::fs::create_dir_all(&downloads).unwrap();
        let sha = "cd".repeat(32);
        std::fs::write(downloads.join(format!("{sha}.raucb")), b"not a bundle").unwrap();
        let changed = ask("3", sha.clone());
        assert_eq!(changed.verdict, Verdict::Refused);
        assert!(changed.reason.unwrap().contains("SHA-256 differs"));
        // A link to another file is not followed.
        std::fs::remove_file(downloads.join(format!("{sha}.raucb"))).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", downloads.join(format!("{sha}.raucb")))
            .unwrap();
        let link = ask("3", sha);
        assert!(link.reason.unwrap().contains("not a regular file"));
        // No copy is left behind.
        let left = std::fs::read_dir(&installer.incoming)
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0);
    }
}
