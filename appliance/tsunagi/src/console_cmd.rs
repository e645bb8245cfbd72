//! `tsunagi console setup-code|fingerprint|add-account` (issue 19): the operator's side of
//! the clinic console. `setup-code` makes the one-time code the first administrator
//! registers with (only its hash is kept; a new one replaces it); `fingerprint` prints the
//! SHA-256 of the certificate the console serves, for the provisioning sheet; `add-account`
//! is root's way in when no administrator can add one (the demo's login, or a clinic whose
//! last administrator is gone), audited like an administrator's addition.

use clap::Subcommand;
use tsunagi_config::Config;
use tsunagi_runtime::{exit_code, privilege};

/// How long a setup code stays valid.
const SETUP_CODE_VALID_SECS: i64 = 7 * 24 * 3600;

#[derive(Debug, Subcommand)]
pub(crate) enum ConsoleCommand {
    /// Make the one-time code with which the first administrator registers at the console
    /// (valid for 7 days; only while the console has no account).
    SetupCode,
    /// Print the SHA-256 fingerprint of the console's certificate (made if missing).
    Fingerprint,
    /// Add a console account with a new password and TOTP secret, printed once (root's way
    /// in when no administrator can add one; audited).
    AddAccount {
        /// The account's name (lower-case letters and digits).
        name: String,
        /// desk (事務), physician (医師) or admin (管理者).
        #[arg(long)]
        role: String,
        /// Print the account as one JSON object (name, role, password, totp-secret, uri).
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn console(cfg: &Config, command: ConsoleCommand) -> u8 {
    match run(cfg, command) {
        Ok(()) => exit_code::OK,
        Err(why) => {
            eprintln!("tsunagi console: {why}");
            exit_code::FAILURE
        }
    }
}

/// The console's state directory under `state_dir`, made if missing (the console's user's
/// when run as root), and a function that gives the files root made there back to that user.
fn console_dir(
    state_dir: &std::path::Path,
) -> Result<(std::path::PathBuf, impl Fn(&[&str])), String> {
    let dir = state_dir.join(console::NAME);
    let identity = if privilege::is_root() {
        Some(privilege::ensure_user(console::USER).map_err(|e| crate::error_chain(&e))?)
    } else {
        None
    };
    privilege::ensure_private_dir(&dir, identity).map_err(|e| crate::error_chain(&e))?;
    let at = dir.clone();
    let give_back = move |names: &[&str]| {
        if let Some(id) = identity {
            for name in names {
                let path = at.join(name);
                if path.exists() {
                    let _ = nix::unistd::chown(&path, Some(id.uid), Some(id.gid));
                }
            }
        }
    };
    Ok((dir, give_back))
}

/// Keeps a provisioning medium's setup code hash (`tsunagi medium apply`) for the console
/// under `state_dir`, while it has no account: returns whether it was kept.
pub(crate) fn install_setup_code(
    state_dir: &std::path::Path,
    setup: &tsunagi_medium::ConsoleSetup,
) -> Result<bool, String> {
    let (dir, give_back) = console_dir(state_dir)?;
    let db = console::service::DB_FILE;
    let result = console::accounts::Accounts::open(&dir.join(db))
        .and_then(|a| a.install_setup_code(&setup.code_hash, setup.expires_at))
        .map_err(|e| crate::error_chain(&e));
    give_back(&[db, &format!("{db}-wal"), &format!("{db}-shm")]);
    result
}

fn run(cfg: &Config, command: ConsoleCommand) -> Result<(), String> {
    let (dir, give_back) = console_dir(cfg.paths.state_dir.as_path())?;
    match command {
        ConsoleCommand::SetupCode => {
            let db = console::service::DB_FILE;
            let result = (|| {
                let accounts = console::accounts::Accounts::open(&dir.join(db))
                    .map_err(|e| crate::error_chain(&e))?;
                if accounts.count().map_err(|e| crate::error_chain(&e))? > 0 {
                    return Err(
                        "the console has accounts already: an administrator adds the others".into(),
                    );
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                accounts
                    .new_setup_code(now + SETUP_CODE_VALID_SECS)
                    .map_err(|e| crate::error_chain(&e))
            })();
            give_back(&[db, &format!("{db}-wal"), &format!("{db}-shm")]);
            let code = result?;
            println!("{code}");
            eprintln!(
                "tsunagi console: the first administrator registers with this code at https://{}/setup within 7 days; it works once",
                cfg.console.listen
            );
            Ok(())
        }
        ConsoleCommand::AddAccount { name, role, json } => {
            let Some(role) = console::accounts::Role::parse(&role) else {
                return Err(format!("--role {role:?}: one of desk, physician, admin"));
            };
            let db = console::service::DB_FILE;
            let pending = console::service::PENDING_FILE;
            let result = (|| -> Result<(String, Vec<u8>), String> {
                let accounts = console::accounts::Accounts::open(&dir.join(db))
                    .map_err(|e| crate::error_chain(&e))?;
                let password =
                    console::accounts::random_token().map_err(|e| crate::error_chain(&e))?;
                let secret = console::accounts::random(console::accounts::TOTP_SECRET_LEN)
                    .map_err(|e| crate::error_chain(&e))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                accounts
                    .add(&name, role, &password, &secret, now)
                    .map_err(|e| crate::error_chain(&e))?
                    .map_err(|refused| refused.to_string())?;
                // The console hands its pending events to the ATNA trail.
                let trail = audit::pending::Store::open(&dir.join(pending))
                    .map_err(|e| crate::error_chain(&e))?;
                trail
                    .record(&audit::protocol::Event::AccountChange {
                        admin: "(root)".to_owned(),
                        from: "localhost".to_owned(),
                        account: name.clone(),
                        role_changed: true,
                        what: format!(
                            "account added with the role {} by tsunagi console add-account",
                            role.as_str()
                        ),
                    })
                    .map_err(|e| crate::error_chain(&e))?;
                Ok((password, secret))
            })();
            give_back(&[
                db,
                &format!("{db}-wal"),
                &format!("{db}-shm"),
                pending,
                &format!("{pending}-wal"),
                &format!("{pending}-shm"),
            ]);
            let (password, secret) = result?;
            let base32 = console::accounts::totp_base32(&secret);
            let uri = console::accounts::otpauth_uri(
                &secret,
                &format!("tsunagi {}", cfg.site.facility_code),
                &name,
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name, "role": role.as_str(), "password": password,
                        "totp-secret": base32, "uri": uri,
                    })
                );
            } else {
                println!("account:     {name} ({})", role.japanese());
                println!("password:    {password}");
                println!("TOTP secret: {base32}");
                println!("TOTP URI:    {uri}");
            }
            Ok(())
        }
        ConsoleCommand::Fingerprint => {
            let settings = console::service::Settings::from_config(cfg);
            let made = console::service::certificate(&dir, &settings);
            give_back(&[
                console::tls::SELF_SIGNED_CERT,
                console::tls::SELF_SIGNED_KEY,
            ]);
            let tls = made.map_err(|e| crate::error_chain(&e))?;
            println!("{}", tls.fingerprint);
            Ok(())
        }
    }
}
