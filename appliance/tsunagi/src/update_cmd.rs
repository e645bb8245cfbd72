//! `tsunagi update install` and `tsunagi update health-gate` (issue 18): the two steps of an
//! update that need root, each run by its own systemd unit (`image/overlay`), never by the
//! supervisor. What they decide is in `update::install`; this is the box around it: the
//! config, RAUC, the supervisor's status, the reboot.
#![expect(
    clippy::disallowed_methods,
    reason = "plain commands on the main thread, no tokio runtime: they poll with thread::sleep"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Subcommand;
use tsunagi_config::Config;
use tsunagi_runtime::{control, exit_code};
use update::install::{self, Installer, Outcome, Verdict};

/// How often the installer looks again whether the box is idle.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How often the health gate looks at the supervisor's status.
const HEALTH_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Subcommand)]
pub(crate) enum UpdateCommand {
    /// Install the update the update service asks for, then reboot into it once the box is
    /// idle in the maintenance window (root; tsunagi-update-install.service).
    Install {
        /// The RAUC program.
        #[arg(long, default_value = "rauc")]
        rauc: PathBuf,
        /// Where the bundle is copied for RAUC: a directory only root can write.
        #[arg(long, default_value = "/var/lib/tsunagi-install")]
        incoming: PathBuf,
        /// Install only; do not reboot.
        #[arg(long)]
        no_reboot: bool,
    },
    /// Mark the booted slot good once the box is healthy; on the first boot of an update
    /// that does not become healthy within `[update] health-limit`, mark it bad and fail
    /// (the unit then reboots into the old slot) (root; tsunagi-health-gate.service).
    HealthGate {
        /// The RAUC program.
        #[arg(long, default_value = "rauc")]
        rauc: PathBuf,
    },
}

pub(crate) fn update(cfg: &Config, command: UpdateCommand) -> u8 {
    match command {
        UpdateCommand::Install {
            rauc,
            incoming,
            no_reboot,
        } => install(cfg, &rauc, incoming, !no_reboot).unwrap_or_else(|why| {
            eprintln!("tsunagi update: {why}");
            exit_code::FAILURE
        }),
        // The gate fails (and its unit reboots the box) only for a first boot that did not
        // become healthy: a gate that cannot tell (RAUC does not answer) reboots nothing,
        // and the boot loader's default stays the old, good slot.
        UpdateCommand::HealthGate { rauc } => health_gate(cfg, &rauc).unwrap_or_else(|why| {
            eprintln!("tsunagi update: the health gate cannot decide: {why}");
            exit_code::OK
        }),
    }
}

fn install_dir(cfg: &Config) -> PathBuf {
    cfg.paths
        .state_dir
        .as_path()
        .join(update::service::NAME)
        .join(install::INSTALL_DIR)
}

fn install(cfg: &Config, rauc: &Path, incoming: PathBuf, reboot: bool) -> Result<u8, String> {
    let dir = install_dir(cfg);
    let request = match install::read_request(&dir) {
        Ok(Some(r)) => r,
        Ok(None) => {
            println!("tsunagi update: no update is asked for");
            return Ok(exit_code::OK);
        }
        Err(e) => {
            // Nothing of it can be trusted, not even its version: dropped, and said.
            let _ = std::fs::remove_file(dir.join(install::REQUEST_FILE));
            return Err(crate::error_chain(&e));
        }
    };
    let result = install_asked(cfg, rauc, incoming, reboot, &dir, &request);
    // Handled (or given up until the update service asks again): the path unit must not
    // start the installer again for the same request.
    let _ = std::fs::remove_file(dir.join(install::REQUEST_FILE));
    result
}

fn install_asked(
    cfg: &Config,
    rauc: &Path,
    incoming: PathBuf,
    reboot: bool,
    dir: &Path,
    request: &install::Request,
) -> Result<u8, String> {
    let running = update::service::running_version(cfg.update.os_release.as_path())?;
    // A request for what runs already (asked again while the reboot into it was under way):
    // done. Never a reboot for it: that would end the first boot of the update before its
    // health gate, again and again.
    if request.version <= running {
        println!(
            "tsunagi update: {} runs already: nothing to install",
            request.version
        );
        return Ok(exit_code::OK);
    }
    let previous = install::read_outcome(dir).ok().flatten();
    // A version that failed its health gate is never installed again, whoever asks: the
    // update service may ask for it once more at the boot that came back from it, before
    // this boot's health gate has recorded the failure (this unit runs after the gate).
    if let Some(o) = &previous
        && o.version == request.version
        && o.verdict == Verdict::Unhealthy
    {
        println!(
            "tsunagi update: {} failed its health gate: not installed again",
            request.version
        );
        return Ok(exit_code::OK);
    }
    // Installed already, the reboot having waited past a window: only the reboot is left.
    let outcome = match previous {
        Some(o) if o.version == request.version && o.verdict == Verdict::Installed => o,
        _ => {
            println!("tsunagi update: installing {}", request.version);
            let outcome = Installer {
                update_dir: dir.parent().unwrap_or(dir).to_owned(),
                incoming,
                rauc: rauc.to_owned(),
                compatible: cfg.update.compatible.clone(),
                running,
            }
            .install(request, &mut |step| {
                println!("tsunagi update: installing {}: {step}", request.version);
            });
            install::write_outcome(dir, &outcome).map_err(|e| crate::error_chain(&e))?;
            outcome
        }
    };
    let Outcome {
        version,
        verdict,
        reason,
        ..
    } = &outcome;
    let reason = reason.as_deref().unwrap_or("");
    match verdict {
        Verdict::Installed => println!("tsunagi update: {version} installed in the other slot"),
        // The update service shows it and hands it to the audit trail; the unit did its job.
        _ => {
            println!("tsunagi update: {version} not installed ({verdict:?}): {reason}");
            return Ok(exit_code::OK);
        }
    }
    if !reboot {
        return Ok(exit_code::OK);
    }
    // Reboot once idle, while the window lasts; else the next window (the update service
    // asks again, and only the reboot is left).
    let socket = cfg.paths.runtime_dir.as_path().join(control::SOCKET_NAME);
    let dicom_port = cfg
        .dicom
        .as_ref()
        .filter(|d| d.enabled)
        .map(|d| d.listen.port());
    let mut said = None;
    loop {
        if !cfg.update.window.contains(install::now()) {
            println!(
                "tsunagi update: {version} installed; the maintenance window closed before the box was idle: it reboots in the next one"
            );
            return Ok(exit_code::OK);
        }
        let connections = match dicom_port {
            Some(port) => {
                install::established_on(port).map_err(|e| format!("/proc/net/tcp: {e}"))?
            }
            None => 0,
        };
        // No supervisor: no service to interrupt.
        let why = match control::query_status(&socket) {
            Ok(report) => install::busy(&report, connections),
            Err(_) => install::busy(&empty_report(), connections),
        };
        if why.is_empty() {
            break;
        }
        let words = why.join(", ");
        if said.as_ref() != Some(&words) {
            println!("tsunagi update: the reboot waits for {words}");
            said = Some(words);
        }
        std::thread::sleep(IDLE_POLL);
    }
    // Answered before the reboot: the shutdown may end this process before it returns.
    let _ = std::fs::remove_file(dir.join(install::REQUEST_FILE));
    println!("tsunagi update: rebooting into {version}");
    let status = Command::new("systemctl")
        .arg("reboot")
        .status()
        .map_err(|e| format!("systemctl reboot: {e}"))?;
    if status.success() {
        Ok(exit_code::OK)
    } else {
        Err(format!("systemctl reboot: {status}"))
    }
}

fn empty_report() -> tsunagi_runtime::status::StatusReport {
    tsunagi_runtime::status::StatusReport {
        supervisor: tsunagi_runtime::status::SupervisorStatus {
            pid: 0,
            version: String::new(),
            privileged: false,
            ready: false,
            uptime_secs: 0,
            config: String::new(),
        },
        services: Vec::new(),
    }
}

/// `rauc status --output-format=shell`'s booted slot.
fn booted(rauc: &Path) -> Result<install::Booted, String> {
    let out = Command::new(rauc)
        .args(["status", "--output-format=shell"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", rauc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "rauc status: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    install::booted(&String::from_utf8_lossy(&out.stdout))
}

fn mark(rauc: &Path, state: &str) -> Result<(), String> {
    let out = Command::new(rauc)
        .args(["status", state, "booted"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", rauc.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rauc status {state}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn health_gate(cfg: &Config, rauc: &Path) -> Result<u8, String> {
    let dir = install_dir(cfg);
    let running = update::service::running_version(cfg.update.os_release.as_path())?;
    let slot = booted(rauc)?;
    let last = install::read_outcome(&dir).ok().flatten();
    if slot.good {
        // Not the first boot of an update. If the last one installed is not what runs, its
        // first boot failed before it could say so (a panic, a reset): the boot loader came
        // back here. Recorded, so that the update service does not install it again.
        if let Some(o) = last
            && o.verdict == Verdict::Installed
            && o.version != running
        {
            let outcome = Outcome {
                version: o.version.clone(),
                verdict: Verdict::Unhealthy,
                reason: Some(format!(
                    "its first boot did not come up; back on {running} (slot {})",
                    slot.bootname
                )),
                at: install::now(),
            };
            install::write_outcome(&dir, &outcome).map_err(|e| crate::error_chain(&e))?;
            println!(
                "tsunagi update: {} did not come up; back on {running}",
                o.version
            );
        }
        println!("tsunagi update: slot {} ({running}) is good", slot.bootname);
        return Ok(exit_code::OK);
    }
    // The first boot of an update: healthy within the limit, or back to the old slot.
    println!(
        "tsunagi update: first boot of {running} (slot {}): waiting for the box to be healthy",
        slot.bootname
    );
    let socket = cfg.paths.runtime_dir.as_path().join(control::SOCKET_NAME);
    let started = Instant::now();
    let limit = cfg.update.health_limit.get();
    let why = loop {
        let why = match control::query_status(&socket) {
            Ok(report) => match install::healthy(&report) {
                Ok(()) => break None,
                Err(why) => why,
            },
            Err(e) => format!("no supervisor: {}", crate::error_chain(&e)),
        };
        if started.elapsed() >= limit {
            break Some(why);
        }
        std::thread::sleep(HEALTH_POLL);
    };
    match why {
        None => {
            mark(rauc, "mark-good")?;
            let outcome = Outcome {
                version: running.clone(),
                verdict: Verdict::Good,
                reason: None,
                at: install::now(),
            };
            install::write_outcome(&dir, &outcome).map_err(|e| crate::error_chain(&e))?;
            println!(
                "tsunagi update: {running} is healthy after {} s; slot {} marked good",
                started.elapsed().as_secs(),
                slot.bootname
            );
            Ok(exit_code::OK)
        }
        Some(why) => {
            let outcome = Outcome {
                version: running.clone(),
                verdict: Verdict::Unhealthy,
                reason: Some(format!(
                    "not healthy within {} s of its first boot: {why}",
                    limit.as_secs()
                )),
                at: install::now(),
            };
            install::write_outcome(&dir, &outcome).map_err(|e| crate::error_chain(&e))?;
            mark(rauc, "mark-bad")?;
            eprintln!(
                "tsunagi update: {running} failed its health gate ({why}); slot {} marked bad, back to the old slot",
                slot.bootname
            );
            Ok(exit_code::FAILURE)
        }
    }
}
