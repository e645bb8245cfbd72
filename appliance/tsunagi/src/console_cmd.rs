//! `tsunagi console setup-code|fingerprint` (issue 19): the operator's side of the clinic
//! console. `setup-code` makes the one-time code the first administrator registers with
//! (only its hash is kept; a new one replaces it); `fingerprint` prints the SHA-256 of the
//! certificate the console serves, for the provisioning sheet.

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

fn run(cfg: &Config, command: ConsoleCommand) -> Result<(), String> {
    let dir = cfg.paths.state_dir.as_path().join(console::NAME);
    let identity = if privilege::is_root() {
        Some(privilege::ensure_user(console::USER).map_err(|e| crate::error_chain(&e))?)
    } else {
        None
    };
    privilege::ensure_private_dir(&dir, identity).map_err(|e| crate::error_chain(&e))?;
    // Files made here by root go back to the console's user.
    let give_back = |names: &[&str]| {
        if let Some(id) = identity {
            for name in names {
                let path = dir.join(name);
                if path.exists() {
                    let _ = nix::unistd::chown(&path, Some(id.uid), Some(id.gid));
                }
            }
        }
    };
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
