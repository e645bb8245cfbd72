//! `tsunagi enroll`: the box's side of enrollment (issue 16) by hand, after a medium was
//! applied (`tsunagi medium apply`). The identity service does the same by itself
//! ([`identity::enroll`]); this is for an operator at the console, and for tests.
//!
//! The box makes its own keys, which never leave it: the tunnel's WireGuard key (made when
//! the medium was applied) and its TLS key (`STATE/identity/box.key`, ECDSA P-256, mode
//! 0600). It sends the medium's one-time token, its serial, the WireGuard public key and a
//! CSR to the enrollment URL of the medium, over TLS verified against the network CA of the
//! medium only. Run as root, it hands what it wrote to the identity service's user.
//!
//! Exit codes: 0 enrolled (or enrolled before), 6 refused by the server or by a check here
//! (one line says why), 1 the server could not be reached (worth trying again), 3 config.

use std::path::{Path, PathBuf};

use tsunagi_config::Config;
use tsunagi_medium::enroll::valid_box_serial;
use tsunagi_runtime::exit_code;

/// Where the firmware tells the box's serial (readable by root only).
const DMI_SERIAL: &str = "/sys/class/dmi/id/product_serial";

#[derive(Debug, clap::Args)]
pub(crate) struct EnrollArgs {
    /// The config file (the clinic's, as the medium wrote it).
    #[arg(long, env = "TSUNAGI_CONFIG", default_value = tsunagi_config::DEFAULT_CONFIG_PATH)]
    pub(crate) config: PathBuf,
    /// The box's serial (default: the one recorded when the medium was applied).
    #[arg(long)]
    pub(crate) box_serial: Option<String>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The box's serial: `given`, else the firmware's, else the machine ID.
pub(crate) fn box_serial(given: Option<String>) -> Result<String, String> {
    if let Some(s) = given {
        return if valid_box_serial(&s) {
            Ok(s)
        } else {
            Err(format!(
                "the box serial {s:?} is not 1-64 of A-Z a-z 0-9 . _ -"
            ))
        };
    }
    for file in [DMI_SERIAL, "/etc/machine-id"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            let s = text.trim();
            if valid_box_serial(s) {
                return Ok(s.to_owned());
            }
        }
    }
    Err("the box has no serial (firmware or machine ID); give --box-serial".into())
}

/// Records the box's public facts for enrollment (`STATE/provisioning/box.json`, 0644):
/// its serial and the tunnel's WireGuard public key (the private key made now if there is
/// none, for the tunnel service's user).
pub(crate) fn record_box(cfg: &Config, serial: Option<String>) -> Result<(), String> {
    let serial = box_serial(serial)?;
    let wireguard_public_key =
        crate::services::vpn_pubkey(cfg).map_err(|e| format!("the tunnel's key: {e}"))?;
    let facts = identity::enroll::BoxFacts {
        box_serial: serial,
        wireguard_public_key,
    };
    let text = serde_json::to_vec(&facts).map_err(|e| e.to_string())?;
    identity::replace(
        &cfg.paths
            .state_dir
            .as_path()
            .join(identity::enroll::BOX_FILE),
        &text,
        0o644,
    )
    .map_err(|e| format!("cannot record the box's serial and key: {e}"))
}

/// The identity service's user, when running as root (None otherwise: development).
fn service_owner() -> Result<Option<tsunagi_runtime::privilege::Identity>, String> {
    if !tsunagi_runtime::privilege::is_root() {
        return Ok(None);
    }
    tsunagi_runtime::privilege::ensure_user(identity::SERVICE.user)
        .map(Some)
        .map_err(|e| tsunagi_runtime::child::error_chain(&e))
}

/// Hands files to the identity service's user.
fn hand_over(
    paths: &[&Path],
    owner: Option<tsunagi_runtime::privilege::Identity>,
) -> std::io::Result<()> {
    if let Some(id) = owner {
        for path in paths {
            nix::unistd::chown(*path, Some(id.uid), Some(id.gid)).map_err(std::io::Error::from)?;
        }
    }
    Ok(())
}

fn enroll(cfg: &Config, args: &EnrollArgs) -> identity::enroll::Outcome {
    use identity::enroll::Outcome;
    let state = cfg.paths.state_dir.as_path();
    let dir = state.join(identity::NAME);
    let Some(tunnel) = cfg.tunnel.as_ref() else {
        return Outcome::Refused("the config has no [tunnel] section".into());
    };
    let owner = match service_owner() {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(e),
    };
    if let Err(e) = tsunagi_runtime::privilege::ensure_private_dir(&dir, owner) {
        return Outcome::Failed(tsunagi_runtime::child::error_chain(&e));
    }
    if (args.box_serial.is_some() || !state.join(identity::enroll::BOX_FILE).exists())
        && let Err(e) = record_box(cfg, args.box_serial.clone())
    {
        return Outcome::Refused(e);
    }
    let expect = identity::enroll::Expect {
        tunnel_address: tunnel.address.to_string(),
        hub_public_key: String::from(tunnel.hub_public_key.clone()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("cannot start the runtime: {e}")),
    };
    let outcome = runtime.block_on(identity::enroll::enroll(state, &dir, &expect));
    // What was written is the identity service's (a key is made even when the server
    // refuses).
    let files = identity::enroll::written(&dir);
    let present: Vec<&Path> = files
        .iter()
        .map(PathBuf::as_path)
        .filter(|p| p.exists())
        .collect();
    if let Err(e) = hand_over(&present, owner) {
        return Outcome::Failed(format!("cannot hand the identity to its service: {e}"));
    }
    outcome
}

/// Runs `tsunagi enroll`; the exit code.
pub(crate) fn run(cfg: &Config, args: &EnrollArgs) -> u8 {
    use identity::enroll::Outcome;
    let (verdict, text, code) = match enroll(cfg, args) {
        Outcome::Enrolled { text, .. } => ("enrolled", text, exit_code::OK),
        Outcome::Already(t) => ("already enrolled", t, exit_code::OK),
        Outcome::Refused(t) => ("refused", t, exit_code::REFUSED),
        Outcome::Failed(t) => ("failed", t, exit_code::FAILURE),
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"verdict": verdict, "reason": text})
        );
    } else {
        println!("tsunagi enroll: {verdict}: {text}");
    }
    code
}
