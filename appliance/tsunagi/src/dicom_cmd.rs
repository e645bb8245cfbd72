//! `tsunagi dicom ...`: the DICOM bridge's spool for an operator (the clinic console will
//! call the same functions): what waits, what is held and why, and putting dead letters
//! back in the queue.
//!
//! The commands open the spool's queue database directly ([`dicom_bridge::spool::Admin`]:
//! no recovery, so they are safe while the service runs; SQLite serialises writers) and,
//! run as root, give any file they create back to the service's user. A requeue
//! (`dicom_bridge::admin::requeue`, what the console will call) is recorded in the consent
//! service's audit trail first (decision `requeued`, one row per instance, the operator's
//! name as given), and puts nothing on the wire by itself: the service decides each
//! instance again (consent, network ID) before it is sent.

use std::path::PathBuf;

use clap::Subcommand;
use dicom_bridge::spool::{Admin, Entry};
use tsunagi_config::Config;
use tsunagi_runtime::exit_code;
use tsunagi_runtime::privilege;

#[derive(Debug, Subcommand)]
pub(crate) enum DicomCommand {
    /// List the spool's instances in one state: dead (dead letters, the default), held
    /// (waiting in the clinic: no consent yet, no network ID, ...) or pending.
    List {
        #[arg(long, value_parser = ["dead", "held", "pending"], default_value = "dead")]
        state: String,
        /// At most this many, oldest first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back in the queue (the service decides each again before sending).
    Requeue {
        /// Queue ids (from `tsunagi dicom list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Who requeues (recorded in the audit trail).
        #[arg(long)]
        by: String,
    },
}

pub(crate) fn dicom(cfg: &Config, command: DicomCommand, json: bool) -> u8 {
    match run(cfg, command, json) {
        Ok(()) => exit_code::OK,
        Err(message) => {
            eprintln!("tsunagi: {message}");
            exit_code::FAILURE
        }
    }
}

fn spool_dir(cfg: &Config) -> PathBuf {
    cfg.paths
        .state_dir
        .as_path()
        .join(dicom_bridge::NAME)
        .join("spool")
}

fn run(cfg: &Config, command: DicomCommand, json: bool) -> Result<(), String> {
    let dir = spool_dir(cfg);
    let _ownership = Ownership::new(&dir)?;
    let mut admin = Admin::open(&dir).map_err(|e| crate::error_chain(&e))?;
    match command {
        DicomCommand::List { state, limit } => {
            let entries = admin
                .entries(&state, limit)
                .map_err(|e| crate::error_chain(&e))?;
            if json {
                let list: Vec<serde_json::Value> = entries.iter().map(entry_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else if entries.is_empty() {
                println!("no {state} instances");
            } else {
                println!("ID\tRECEIVED\tATTEMPTS\tSIZE\tSOP CLASS\tREASON");
                for e in &entries {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        e.id,
                        consent::time::format(e.received_at),
                        e.attempts,
                        e.size,
                        e.sop_class,
                        e.reason
                    );
                }
            }
        }
        DicomCommand::Requeue { ids, all, by } => {
            if by.trim().is_empty() {
                return Err("--by: say who requeues (recorded in the audit trail)".to_owned());
            }
            let (mut store, _consent_files) = crate::consent_cmd::open(cfg)?;
            let put = dicom_bridge::admin::requeue(
                &mut admin,
                &mut store,
                if all { None } else { Some(&ids) },
                &by,
                consent::time::now(),
            )
            .map_err(|e| crate::error_chain(&e))?;
            let missing: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !put.iter().any(|r| r.id == *id))
                .collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "requeued": put.iter().map(|r| r.id).collect::<Vec<_>>(),
                        "not-dead-letters": missing,
                    })
                );
            } else {
                println!("requeued {} dead letter(s)", put.len());
                if !missing.is_empty() {
                    println!(
                        "not dead letters (left as they are): {}",
                        missing
                            .iter()
                            .map(i64::to_string)
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                }
            }
            if !missing.is_empty() {
                return Err(format!(
                    "{} of the ids given are not dead letters",
                    missing.len()
                ));
            }
        }
    }
    Ok(())
}

fn entry_json(e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "state": e.state,
        "sop-class": e.sop_class,
        "size": e.size,
        "received-at": e.received_at,
        "attempts": e.attempts,
        "reason": e.reason,
    })
}

/// Gives the queue's files a root-run command created (its WAL and shared memory) back to
/// the service's user.
struct Ownership {
    dir: PathBuf,
    identity: Option<privilege::Identity>,
}

impl Ownership {
    fn new(dir: &std::path::Path) -> Result<Ownership, String> {
        let identity = if privilege::is_root() {
            Some(privilege::ensure_user(dicom_bridge::USER).map_err(|e| crate::error_chain(&e))?)
        } else {
            None
        };
        Ok(Ownership {
            dir: dir.to_owned(),
            identity,
        })
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        let Some(id) = self.identity else { return };
        for name in ["queue.db", "queue.db-wal", "queue.db-shm"] {
            let file = self.dir.join(name);
            if file.exists() {
                let _ = nix::unistd::chown(file.as_path(), Some(id.uid), Some(id.gid));
            }
        }
    }
}
