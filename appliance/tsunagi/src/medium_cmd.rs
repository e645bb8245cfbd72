//! `tsunagi medium check|apply DIR`: the box's side of a provisioning medium (issue 16).
//!
//! `check` says whether the medium in `DIR` would be applied, and why not. `apply` applies
//! it: [`tsunagi_medium::verify`] against the network's provisioning public key (built into
//! the image) and what the box applied before, then the clinic's config replaces the
//! config file, its `[network]` (if any) replaces the networkd files an earlier medium
//! wrote, the network's CA and the enrollment token go into
//! `STATE/provisioning/` (the token readable by root only), and the serial and clinic are
//! recorded last, so that a medium is applied once and re-provisioning needs a newer
//! serial. A refusal changes nothing, prints one line and exits with
//! [`exit_code::REFUSED`]. Every file is written beside and renamed into place, then
//! flushed with its folder.

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use tsunagi_medium::{Bundle, Expect, Kind};
use tsunagi_runtime::exit_code;
use tsunagi_state::replace_file as replace;

/// Where the image carries the network's provisioning public key (base64 of 32 bytes).
pub(crate) const DEFAULT_KEY: &str = "/usr/share/tsunagi/provisioning.pub";
/// The provisioning audit trail in `STATE/provisioning/`.
const AUDIT_FILE: &str = "audit.jsonl";
/// The data partition's state directory (a blank box has no config to name it yet).
pub(crate) const DEFAULT_STATE: &str = "/var/lib/tsunagi";

#[derive(Debug, clap::Args)]
pub(crate) struct MediumArgs {
    /// The medium's root (where tsunagi-provisioning.json and .sig are).
    pub(crate) dir: PathBuf,
    /// The network's provisioning public key.
    #[arg(long, default_value = DEFAULT_KEY)]
    pub(crate) key: PathBuf,
    /// The state directory, where what was applied is recorded.
    #[arg(long, default_value = DEFAULT_STATE)]
    pub(crate) state_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MediumCommand {
    /// Say whether the medium would be applied, and why not (changes nothing).
    Check(MediumArgs),
    /// Apply the medium: the clinic's config, the network's CA, the enrollment token.
    Apply {
        #[command(flatten)]
        args: MediumArgs,
        /// The config file it replaces.
        #[arg(long, env = "TSUNAGI_CONFIG", default_value = tsunagi_config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Where the config's `[network]` goes, as systemd-networkd files.
        #[arg(long, default_value = DEFAULT_NETWORK_DIR)]
        network_dir: PathBuf,
        /// Where the hub's time server (`[tunnel] time-server`) goes, as chrony's sources.
        #[arg(long, default_value = DEFAULT_TIME_DIR)]
        time_dir: PathBuf,
        /// The box's serial, for enrollment (default: the firmware's, else the machine ID).
        #[arg(long)]
        box_serial: Option<String>,
    },
}

/// systemd-networkd's configuration directory (on the image, a link to the data partition's
/// `/var/etc/systemd/network`).
const DEFAULT_NETWORK_DIR: &str = "/etc/systemd/network";

/// chrony's directory of sources (on the image, a link to the data partition's
/// `/var/etc/chrony/sources.d`; the image's chrony.conf names no other source).
const DEFAULT_TIME_DIR: &str = "/etc/chrony/sources.d";

/// The file of [`DEFAULT_TIME_DIR`] that media write.
const TIME_SOURCES: &str = "tsunagi.sources";

/// Makes the hub's NTP server (reached through the tunnel) chrony's source: `TIME_SOURCES`
/// in `dir`, or no such file without one (IHE Consistent Time). chrony reads it when it
/// starts, which on the image is after media are applied.
fn write_time_sources(dir: &Path, server: Option<std::net::SocketAddr>) -> std::io::Result<()> {
    let path = dir.join(TIME_SOURCES);
    match server {
        Some(server) => {
            std::fs::create_dir_all(dir)?;
            // Polled every 16 to 64 s: the tunnel may come up after chrony starts.
            let line = format!(
                "# Written by tsunagi medium apply: the network hub's time server, through the tunnel.\nserver {} port {} iburst minpoll 4 maxpoll 6\n",
                server.ip(),
                server.port()
            );
            replace(&path, line.as_bytes(), 0o644)
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Writes the config's `[network]` as networkd files into `dir` and removes the ones an
/// earlier medium wrote that are not written now (all of them for `None`, the reset). The
/// files of others (the image's) are left alone.
fn write_network(dir: &Path, network: Option<&tsunagi_config::Network>) -> std::io::Result<()> {
    let files = network
        .map(tsunagi_config::Network::networkd_files)
        .unwrap_or_default();
    for (name, text) in &files {
        replace(&dir.join(name), text.as_bytes(), 0o644)?;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut removed = false;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.ends_with(".network")
            && name.contains(&format!("-{}", tsunagi_config::NETWORKD_PREFIX));
        if ours && !files.iter().any(|(n, _)| *n == name) {
            std::fs::remove_file(entry.path())?;
            removed = true;
        }
    }
    if removed {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What the box applied last (`STATE/provisioning/applied.json`). After a factory reset
/// the box belongs to no clinic, but the serial stays: older media are still refused.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Applied {
    serial: u64,
    facility_code: Option<String>,
    applied_at: i64,
    /// The enrollment server of the medium (not secret): the tunnel's firewall lets the
    /// identity service's user reach it on the WAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enrollment_url: Option<String>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn applied_path(state: &Path) -> PathBuf {
    state.join("provisioning").join("applied.json")
}

/// Why [`checked`] gives no bundle.
enum Checked {
    /// The medium applied last (its serial): nothing to do.
    AlreadyApplied(u64),
    /// The line that says why not.
    Refused(String),
}

impl From<String> for Checked {
    fn from(line: String) -> Checked {
        Checked::Refused(line)
    }
}

/// Reads the medium and checks it; the bundle, or why not.
fn checked(args: &MediumArgs) -> Result<Bundle, Checked> {
    let key = std::fs::read_to_string(&args.key).map_err(|e| {
        format!(
            "cannot read the network's provisioning key {}: {}",
            args.key.display(),
            e.kind()
        )
    })?;
    let bundle_path = args.dir.join(tsunagi_medium::BUNDLE_FILE);
    let bundle = std::fs::read(&bundle_path).map_err(|e| {
        format!(
            "no provisioning bundle at {}: {}",
            bundle_path.display(),
            e.kind()
        )
    })?;
    let signature = std::fs::read_to_string(args.dir.join(tsunagi_medium::SIGNATURE_FILE)).ok();
    let applied: Option<Applied> =
        match std::fs::read(applied_path(&args.state_dir)) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                format!("the record of the last medium applied cannot be read: {e}")
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Checked::Refused(format!(
                    "the record of the last medium applied cannot be read: {}",
                    e.kind()
                )));
            }
        };
    let expect = Expect {
        facility_code: applied.as_ref().and_then(|a| a.facility_code.as_deref()),
        last_serial: applied.as_ref().map(|a| a.serial),
        now: now(),
    };
    let bundle = tsunagi_medium::verify(&bundle, signature.as_deref(), &key, expect).map_err(
        |e| match e {
            tsunagi_medium::Refused::AlreadyApplied(serial) => Checked::AlreadyApplied(serial),
            e => Checked::Refused(e.to_string()),
        },
    )?;
    // What only the box can check: the config's spool fits this box's data partition.
    if bundle.kind != Kind::Provision {
        return Ok(bundle);
    }
    let mut cfg = tsunagi_config::parse(&bundle.config, Path::new(tsunagi_medium::BUNDLE_FILE))
        .map_err(|e| format!("the medium's config: {e}"))?;
    cfg.paths.state_dir =
        tsunagi_config::AbsPath::try_from(args.state_dir.to_string_lossy().into_owned())
            .map_err(|e| format!("state directory {}: {e}", args.state_dir.display()))?;
    let problems = crate::capacity_problems(&cfg)?;
    if let Some(p) = problems.first() {
        return Err(Checked::Refused(format!(
            "the medium's config does not fit this box: {p}"
        )));
    }
    Ok(bundle)
}

fn apply(
    args: &MediumArgs,
    config: &Path,
    (network_dir, time_dir): (&Path, &Path),
    box_serial: Option<String>,
    b: &Bundle,
) -> std::io::Result<()> {
    let dir = args.state_dir.join("provisioning");
    std::fs::create_dir_all(&dir)?;
    // `verify` has checked the config; read again for its `[network]`.
    let parsed = tsunagi_config::parse(&b.config, config)
        .map_err(|e| std::io::Error::other(format!("the medium's config: {e}")))?;
    write_secrets(&parsed, b)?;
    replace(config, b.config.as_bytes(), 0o644)?;
    // Only a config with `[network]` changes the network files: without one, the image's
    // (or an earlier medium's) stay.
    if let Some(n) = &parsed.network {
        write_network(network_dir, Some(n))?;
    }
    write_time_sources(time_dir, parsed.tunnel.as_ref().and_then(|t| t.time_server))?;
    if let Some(hub) = &b.hub {
        replace(&dir.join("network-ca.pem"), hub.ca_pem.as_bytes(), 0o644)?;
    }
    if let Some(e) = &b.enrollment {
        // The token is the identity service's (which enrolls with it), 0600 in its own
        // directory; the box's serial and WireGuard key are public facts beside it.
        let owner = if tsunagi_runtime::privilege::is_root() {
            Some(
                tsunagi_runtime::privilege::ensure_user(identity::SERVICE.user)
                    .map_err(|e| std::io::Error::other(tsunagi_runtime::child::error_chain(&e)))?,
            )
        } else {
            None
        };
        let identity_dir = args.state_dir.join(identity::NAME);
        tsunagi_runtime::privilege::ensure_private_dir(&identity_dir, owner)
            .map_err(|e| std::io::Error::other(tsunagi_runtime::child::error_chain(&e)))?;
        let token = identity::enroll::Token {
            token: e.token.clone(),
            expires_at: e.expires_at,
            url: e.url.clone(),
        };
        let path = identity_dir.join(identity::enroll::TOKEN_FILE);
        let text = serde_json::to_vec(&token).map_err(std::io::Error::other)?;
        replace(&path, &text, 0o600)?;
        if let Some(id) = owner {
            nix::unistd::chown(&path, Some(id.uid), Some(id.gid)).map_err(std::io::Error::from)?;
        }
        if parsed.tunnel.is_some() {
            let mut here = parsed.clone();
            here.paths.state_dir =
                tsunagi_config::AbsPath::try_from(args.state_dir.to_string_lossy().into_owned())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            crate::enroll_cmd::record_box(&here, box_serial).map_err(std::io::Error::other)?;
        }
    }
    // The console's first administrator's code, as its hash (the code is on the
    // provisioning sheet): only while the console has no account.
    if let Some(setup) = &b.console_setup {
        let kept = crate::console_cmd::install_setup_code(&args.state_dir, setup)
            .map_err(|e| std::io::Error::other(format!("the console's setup code: {e}")))?;
        if !kept {
            eprintln!(
                "tsunagi medium: the console has accounts already: the medium's setup code is not needed and was not kept"
            );
        }
    }
    // Last: the medium counts as applied only once everything is in place.
    record(
        &args.state_dir,
        b.serial,
        Some(&b.facility_code),
        b.enrollment.as_ref().map(|e| e.url.clone()),
    )
}

/// The clinic's secrets the medium carries, each where the config names it: 0600, for the
/// user of the service that reads it (root for the share's mount), its folder made 0755 if
/// missing (the folder names no secret).
fn write_secrets(cfg: &tsunagi_config::Config, b: &Bundle) -> std::io::Result<()> {
    let named = cfg.secret_files();
    for (key, text) in &b.secrets {
        // `verify` has checked both lists; a key in neither is not written.
        let (Some((_, file)), Some((_, user))) = (
            named.iter().find(|(k, _)| k == key),
            tsunagi_medium::MEDIUM_SECRETS
                .iter()
                .find(|(k, _)| k == key),
        ) else {
            continue;
        };
        let path = file.as_path();
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        replace(path, text.as_bytes(), 0o600)?;
        if let Some(user) = user
            && tsunagi_runtime::privilege::is_root()
        {
            let id = tsunagi_runtime::privilege::ensure_user(user)
                .map_err(|e| std::io::Error::other(tsunagi_runtime::child::error_chain(&e)))?;
            nix::unistd::chown(path, Some(id.uid), Some(id.gid)).map_err(std::io::Error::from)?;
        }
    }
    Ok(())
}

fn record(
    state: &Path,
    serial: u64,
    facility_code: Option<&str>,
    enrollment_url: Option<String>,
) -> std::io::Result<()> {
    let applied = Applied {
        serial,
        facility_code: facility_code.map(str::to_owned),
        applied_at: now(),
        enrollment_url,
    };
    let text = serde_json::to_vec(&applied).map_err(std::io::Error::other)?;
    replace(&applied_path(state), &text, 0o644)
}

/// A factory reset: everything in the state directory goes (keys, enrollment, consent
/// cache, spool, replica state), the network files a medium wrote, and the config file; only the record of the serial stays,
/// with no clinic, so the box takes a medium of any clinic but none older than this one.
/// Run with the services stopped (the image applies media before the supervisor starts).
fn reset(
    args: &MediumArgs,
    config: &Path,
    (network_dir, time_dir): (&Path, &Path),
    b: &Bundle,
) -> std::io::Result<usize> {
    let mut removed = 0;
    write_network(network_dir, None)?;
    write_time_sources(time_dir, None)?;
    match std::fs::read_dir(&args.state_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                if entry.file_name() == "provisioning" {
                    for inner in std::fs::read_dir(&path)? {
                        let inner = inner?;
                        if inner.file_name() != "applied.json" && inner.file_name() != AUDIT_FILE {
                            remove(&inner.path())?;
                            removed += 1;
                        }
                    }
                } else {
                    remove(&path)?;
                    removed += 1;
                }
            }
            std::fs::File::open(&args.state_dir)?.sync_all()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match std::fs::remove_file(config) {
        Ok(()) => {
            removed += 1;
            if let Some(dir) = config.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    record(&args.state_dir, b.serial, None, None)?;
    Ok(removed)
}

/// The provisioning audit trail (`STATE/provisioning/audit.jsonl`): one line per medium
/// the box was asked to apply (applied, refused, failed), with the time, the serial if the
/// medium could be read, and the reason; appended and flushed, kept through a factory
/// reset. Readable by the `audit` service's group, which sends each line on to the ATNA
/// audit trail (a refusal as a Security Alert).
fn audit(state: &Path, verdict: &str, text: &str, serial: Option<u64>) {
    use std::io::Write as _;
    let dir = state.join("provisioning");
    let line = serde_json::json!({
        "time": now(),
        "event": "provisioning-medium",
        "verdict": verdict,
        "serial": serial,
        "reason": text,
    });
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let path = dir.join(AUDIT_FILE);
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)?;
        writeln!(f, "{line}")?;
        f.sync_all()?;
        // A new trail: its name (and its folder's) flushed too, or a power cut right after
        // a refusal at boot could lose the record.
        if new {
            std::fs::File::open(&dir)?.sync_all()?;
            std::fs::File::open(state)?.sync_all()?;
        }
        Ok(())
    });
    if let Err(e) = written {
        eprintln!("tsunagi medium: cannot write the provisioning audit record: {e}");
    }
    // The `audit` service reads it (its group), to send it on to the ATNA audit trail.
    if tsunagi_runtime::privilege::is_root()
        && let Ok(id) = tsunagi_runtime::privilege::ensure_user(audit::service::USER)
    {
        let _ = nix::unistd::chown(&dir.join(AUDIT_FILE), None, Some(id.gid));
    }
}

fn remove(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Runs `tsunagi medium ...`; the exit code.
pub(crate) fn medium(command: MediumCommand, json: bool) -> u8 {
    let (args, config, dirs) = match &command {
        MediumCommand::Check(a) => (
            a,
            None,
            (Path::new(DEFAULT_NETWORK_DIR), Path::new(DEFAULT_TIME_DIR)),
        ),
        MediumCommand::Apply {
            args,
            config,
            network_dir,
            time_dir,
            ..
        } => (
            args,
            Some(config),
            (network_dir.as_path(), time_dir.as_path()),
        ),
    };
    let box_serial = match &command {
        MediumCommand::Apply { box_serial, .. } => box_serial.clone(),
        MediumCommand::Check(_) => None,
    };
    let applying = config.is_some();
    let print = |verdict: &str, text: &str, serial: Option<u64>| {
        if json {
            println!(
                "{}",
                serde_json::json!({"verdict": verdict, "reason": text, "serial": serial})
            );
        } else {
            println!("tsunagi medium: {}: {text}", verdict.replace('-', " "));
        }
    };
    let say = |verdict: &str, text: &str, serial: Option<u64>| {
        if applying {
            audit(&args.state_dir, verdict, text, serial);
        }
        print(verdict, text, serial);
    };
    let b = match checked(args) {
        Ok(b) => b,
        // The medium applied last, left attached: said, not audited, not a refusal.
        Err(Checked::AlreadyApplied(serial)) => {
            let text = format!("serial {serial}, applied before; nothing to do");
            print("already-applied", &text, Some(serial));
            return exit_code::OK;
        }
        Err(Checked::Refused(why)) => {
            say("refused", &why, None);
            return exit_code::REFUSED;
        }
    };
    let what = format!(
        "{} medium serial {} for clinic {} ({})",
        match b.kind {
            Kind::Provision => "provisioning",
            Kind::Reset => "factory-reset",
        },
        b.serial,
        b.facility_code,
        b.clinic_name
    );
    let Some(config) = config else {
        say("accepted", &what, Some(b.serial));
        return exit_code::OK;
    };
    if b.kind == Kind::Reset {
        return match reset(args, config, dirs, &b) {
            Ok(removed) => {
                say(
                    "applied",
                    &format!(
                        "{what}: {removed} entries of the state and the config removed; the box is un-enrolled"
                    ),
                    Some(b.serial),
                );
                exit_code::OK
            }
            Err(e) => {
                say("failed", &format!("{what}: {e}"), Some(b.serial));
                exit_code::FAILURE
            }
        };
    }
    match apply(args, config, dirs, box_serial, &b) {
        Ok(()) => {
            say("applied", &what, Some(b.serial));
            exit_code::OK
        }
        Err(e) => {
            say("failed", &format!("{what}: {e}"), Some(b.serial));
            exit_code::FAILURE
        }
    }
}
