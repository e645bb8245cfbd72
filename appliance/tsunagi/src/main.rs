//! `tsunagi`: the appliance's one binary.
//!
//! * `tsunagi run` — the supervisor (what systemd starts);
//! * `tsunagi service NAME` — one service, started by the supervisor;
//! * `tsunagi status` — asks the running supervisor;
//! * `tsunagi config check FILE...` — validates config files;
//! * `tsunagi sysusers` — prints the system users the services run as;
//! * `tsunagi ssmix2 scan|check ROOT` — inventories an SS-MIX2 storage (`ssmix2 mount`:
//!   mounts its SMB share);
//! * `tsunagi dicom list|requeue` — the DICOM spool's waiting and dead instances;
//! * `tsunagi medium check|apply DIR` — a signed provisioning medium;
//! * `tsunagi update install|health-gate` — an update's steps as root (systemd units).
//!
//! `main` only wires: arguments → config → logging → runtime → run, and maps the outcome to
//! an exit code (see `tsunagi_runtime::exit_code` and `docs/operations.md`).
#![forbid(unsafe_code)]

mod consent_cmd;
mod console_cmd;
mod dicom_cmd;
mod enroll_cmd;
mod medium_cmd;
mod services;
mod ssmix2_cmd;
mod status_cmd;
mod update_cmd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tsunagi_config::{Config, LoadError};
use tsunagi_runtime::exit_code;
use tsunagi_runtime::supervisor::{self, Launch};

#[derive(Debug, Parser)]
#[command(
    name = "tsunagi",
    version,
    about = "Clinic edge appliance for a regional healthcare network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, global = true, env = "TSUNAGI_CONFIG", default_value = tsunagi_config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
// One value, parsed once at start: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the supervisor and every enabled service (systemd starts this).
    Run(ConfigArg),
    /// Run one service (started by the supervisor, not by hand).
    #[command(hide = true)]
    Service {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the state of every service of the running supervisor.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The control socket (default: RUNTIME_DIR/control.sock from the config).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the systemd-sysusers declarations of the services' users.
    Sysusers,
    /// The WireGuard tunnel.
    #[command(subcommand)]
    Vpn(VpnCommand),
    /// Consent and patient identity (同意・公開設定・名寄せ).
    Consent {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: consent_cmd::ConsentCommand,
    },
    /// The DICOM bridge's spool: list what waits and why; requeue dead letters (audited).
    Dicom {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: dicom_cmd::DicomCommand,
    },
    /// A signed provisioning medium: check it, or apply it (once; a newer serial
    /// re-provisions).
    Medium {
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: medium_cmd::MediumCommand,
    },
    /// Enroll the box with the network (after a medium was applied): its own keys, the
    /// medium's one-time token, a certificate and the hub's WireGuard peer in return.
    Enroll(enroll_cmd::EnrollArgs),
    /// SS-MIX2 storages: inventory and conformance (reads only; no service needed).
    #[command(subcommand)]
    Ssmix2(ssmix2_cmd::Ssmix2Command),
    /// Fleet updates: the steps that need root (each run by its own systemd unit).
    Update {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        command: update_cmd::UpdateCommand,
    },
    /// The clinic console: the first administrator's setup code, the certificate's
    /// fingerprint.
    Console {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        command: console_cmd::ConsoleCommand,
    },
    /// The audit trail of consent decisions.
    Audit {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check that no row of the audit trail was changed or removed.
    Verify,
}

#[derive(Debug, Subcommand)]
enum VpnCommand {
    /// Print the box's WireGuard public key for the operator (generated on the box if absent).
    Pubkey(ConfigArg),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check configuration files; print every problem as FILE:LINE: KEY: REASON.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(&args.config),
        Command::Service { name, config } => service(&name, &config.config),
        Command::Status {
            config,
            socket,
            json,
        } => status_cmd::status(&config.config, socket.as_deref(), json),
        Command::Config(ConfigCommand::Check { files }) => config_check(&files),
        Command::Vpn(VpnCommand::Pubkey(args)) => match load(&args.config) {
            Err(code) => code,
            Ok(cfg) => match services::vpn_pubkey(&cfg) {
                Ok(key) => {
                    println!("{key}");
                    exit_code::OK
                }
                Err(e) => {
                    eprintln!("tsunagi: {e}");
                    exit_code::FAILURE
                }
            },
        },
        Command::Consent {
            config,
            json,
            command,
        } => match load(&config.config) {
            Err(code) => code,
            Ok(cfg) => consent_cmd::consent(&cfg, command, json),
        },
        Command::Dicom {
            config,
            json,
            command,
        } => match load(&config.config) {
            Err(code) => code,
            Ok(cfg) => dicom_cmd::dicom(&cfg, command, json),
        },
        Command::Update { config, command } => match load(&config.config) {
            Err(code) => code,
            Ok(cfg) => update_cmd::update(&cfg, command),
        },
        Command::Console { config, command } => match load(&config.config) {
            Err(code) => code,
            Ok(cfg) => console_cmd::console(&cfg, command),
        },
        Command::Audit {
            config,
            json,
            command: AuditCommand::Verify,
        } => match load(&config.config) {
            Err(code) => code,
            Ok(cfg) => consent_cmd::audit_verify(&cfg, json),
        },
        Command::Medium { json, command } => medium_cmd::medium(command, json),
        Command::Enroll(args) => match load(&args.config) {
            Err(code) => code,
            Ok(cfg) => enroll_cmd::run(&cfg, &args),
        },
        Command::Ssmix2(command) => ssmix2_cmd::ssmix2(command),
        Command::Sysusers => {
            print!("{}", services::sysusers());
            exit_code::OK
        }
    };
    ExitCode::from(code)
}

/// Loads a config, printing its problems on failure.
fn load(path: &Path) -> Result<Config, u8> {
    tsunagi_config::load(path).map_err(|e| {
        report_load_error(&e);
        exit_code::CONFIG
    })
}

fn report_load_error(e: &LoadError) {
    match e {
        LoadError::Invalid(problems) => eprint!("{}", with_newline(&problems.to_string())),
        other => eprintln!("tsunagi: {}", error_chain(other)),
    }
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_owned()
    } else {
        format!("{s}\n")
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    tsunagi_runtime::child::error_chain(e)
}

fn run(path: &Path) -> u8 {
    let cfg = match load(path) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let log = match tsunagi_runtime::logging::init(cfg.log.filter.as_ref()) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("tsunagi: {}", error_chain(&e));
            return exit_code::CONFIG;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "cannot find the tsunagi binary"
            );
            return exit_code::FAILURE;
        }
    };
    let config_path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let reload_path = config_path.clone();
    let reload = Box::new(move || {
        let cfg = tsunagi_config::load(&reload_path).map_err(|e| match e {
            LoadError::Invalid(problems) => problems.to_string().trim_end().replace('\n', "; "),
            other => error_chain(&other),
        })?;
        tsunagi_runtime::logging::check_filter(cfg.log.filter.as_ref())
            .map_err(|e| error_chain(&e))?;
        Ok(services::plan(&cfg))
    });
    // One thread: every spawn happens here (see tsunagi_runtime::supervisor).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "cannot start the async runtime"
            );
            return exit_code::FAILURE;
        }
    };
    let launch = Launch {
        exe,
        config_path,
        plan: services::plan(&cfg),
        reload,
        log: Some(log),
        shutdown: supervisor::ShutdownToken::new(),
    };
    match runtime.block_on(supervisor::run(launch)) {
        Ok(()) => exit_code::OK,
        Err(e) => {
            tracing::error!(error = &e as &dyn std::error::Error, "supervisor failed");
            exit_code::FAILURE
        }
    }
}

fn service(name: &str, path: &Path) -> u8 {
    let cfg = match load(path) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    if let Err(e) = tsunagi_runtime::logging::init(cfg.log.filter.as_ref()) {
        eprintln!("tsunagi: {}", error_chain(&e));
        return exit_code::CONFIG;
    }
    match services::run_child(&cfg, name) {
        Ok(()) => exit_code::OK,
        Err(e) => {
            // A service's own failure was logged and reported by the runtime already.
            if !matches!(&e, services::ServiceCmdError::Child(c) if !c.is_setup()) {
                tracing::error!(
                    service = name,
                    error = &e as &dyn std::error::Error,
                    "service could not start"
                );
            }
            e.exit_code()
        }
    }
}

fn config_check(files: &[PathBuf]) -> u8 {
    let mut worst = exit_code::OK;
    for file in files {
        match tsunagi_config::load(file) {
            Ok(cfg) => match capacity_problems(&cfg) {
                Ok(problems) if problems.is_empty() => println!("{}: ok", file.display()),
                Ok(problems) => {
                    let problems = tsunagi_config::Problems {
                        file: file.clone(),
                        problems,
                    };
                    eprint!("{}", with_newline(&problems.to_string()));
                    worst = exit_code::CONFIG;
                }
                Err(e) => {
                    eprintln!("tsunagi: {e}");
                    worst = exit_code::CONFIG;
                }
            },
            Err(e) => {
                report_load_error(&e);
                worst = exit_code::CONFIG;
            }
        }
    }
    worst
}

/// The rules of `cfg` that need the size of the file system its state directory is on
/// (the box's data partition): its nearest existing ancestor's, on a machine where the
/// directory is not made yet. The size counts what the services (not root) can fill.
pub(crate) fn capacity_problems(cfg: &Config) -> Result<Vec<tsunagi_config::Problem>, String> {
    let state_dir = cfg.paths.state_dir.as_path();
    let existing = state_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let st = nix::sys::statvfs::statvfs(existing).map_err(|e| {
        format!(
            "cannot read the size of the file system of state-dir {} ({}): {e}",
            state_dir.display(),
            existing.display()
        )
    })?;
    let reserved_for_root = st.blocks_free().saturating_sub(st.blocks_available());
    let usable = st.blocks().saturating_sub(reserved_for_root) * st.fragment_size();
    Ok(cfg.capacity_problems(usable / (1024 * 1024)))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
