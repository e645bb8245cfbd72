//! `tsunagi-provision`: the network operator's tool (issue 16). See `docs/provisioning.md`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tsunagi_provision::{Clinic, Init, Operator};

/// The network operator's provisioning tool: keys, clinics, signed provisioning media.
#[derive(Debug, Parser)]
#[command(name = "tsunagi-provision", version)]
struct Args {
    /// The operator directory (database, keys, config template).
    #[arg(long, env = "TSUNAGI_OPERATOR_DIR")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the operator directory: the database and the network's provisioning signing
    /// key (or uses an existing one by reference); prints the public key to build into
    /// the image.
    Init {
        /// The network's name.
        #[arg(long)]
        name: String,
        /// The hub's WireGuard public key (base64).
        #[arg(long)]
        hub_public_key: String,
        /// The hub's WireGuard endpoint, HOST:PORT.
        #[arg(long)]
        hub_endpoint: String,
        /// The network CA's certificate (PEM), kept by reference.
        #[arg(long)]
        hub_ca: PathBuf,
        /// The pool the clinics' tunnel addresses come from, A.B.C.D/N (the first host is
        /// the hub's).
        #[arg(long)]
        tunnel_pool: String,
        /// The enrollment server's URL (at the hub).
        #[arg(long)]
        enrollment_url: String,
        /// The clinics' config template (a tsunagi.toml; site and tunnel keys are filled in
        /// per clinic).
        #[arg(long)]
        template: PathBuf,
        /// An existing signing key (Ed25519 PKCS#8, base64), used by reference instead of
        /// making one.
        #[arg(long)]
        signing_key: Option<PathBuf>,
    },
    /// Clinics.
    Clinic {
        #[command(subcommand)]
        command: ClinicCommand,
    },
    /// Writes a signed provisioning medium for a clinic's box into a directory (the root
    /// of a USB stick, or a folder to copy there).
    Medium {
        /// The clinic's 医療機関コード.
        #[arg(long)]
        clinic: String,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// How long the medium may be applied, e.g. 14d.
        #[arg(long, default_value = "14d")]
        valid_for: humantime::Duration,
        /// How long its enrollment token may be used, e.g. 7d.
        #[arg(long, default_value = "7d")]
        token_valid_for: humantime::Duration,
        /// A factory-reset medium instead.
        #[arg(long)]
        reset: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClinicCommand {
    /// Registers a clinic and allocates its tunnel address.
    Add {
        /// 医療機関コード (10 digits).
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        /// The box's AE title at the clinic.
        #[arg(long)]
        ae_title: String,
    },
    /// Every clinic.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One clinic.
    Show {
        code: String,
        #[arg(long)]
        json: bool,
    },
}

fn json(c: &Clinic) -> serde_json::Value {
    serde_json::json!({
        "facility-code": c.facility_code,
        "name": c.name,
        "ae-title": c.ae_title,
        "tunnel-address": c.tunnel_address,
        "added-at": c.added_at,
        "revoked-at": c.revoked_at,
    })
}

fn line(c: &Clinic) -> String {
    format!(
        "{}  {}  {}  {}{}",
        c.facility_code,
        c.tunnel_address,
        c.ae_title,
        c.name,
        if c.revoked_at.is_some() {
            "  (revoked)"
        } else {
            ""
        }
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Init {
            name,
            hub_public_key,
            hub_endpoint,
            hub_ca,
            tunnel_pool,
            enrollment_url,
            template,
            signing_key,
        } => {
            std::fs::create_dir_all(&args.dir)
                .with_context(|| format!("create {}", args.dir.display()))?;
            let public = Operator::init(
                &args.dir,
                &Init {
                    name,
                    hub_public_key,
                    hub_endpoint,
                    hub_ca,
                    pool: tunnel_pool,
                    enrollment_url,
                    template,
                    signing_key,
                },
            )?;
            println!("initialised {}", args.dir.display());
            println!("provisioning public key (build it into the image): {public}");
        }
        Command::Clinic { command } => {
            let mut op = Operator::open(&args.dir)?;
            match command {
                ClinicCommand::Add {
                    code,
                    name,
                    ae_title,
                } => {
                    let c = op.add_clinic(&code, &name, &ae_title)?;
                    println!("registered {}", line(&c));
                }
                ClinicCommand::List { json: as_json } => {
                    let all = op.clinics()?;
                    if as_json {
                        println!(
                            "{}",
                            serde_json::Value::Array(all.iter().map(json).collect())
                        );
                    } else if all.is_empty() {
                        println!("no clinics");
                    } else {
                        for c in &all {
                            println!("{}", line(c));
                        }
                    }
                }
                ClinicCommand::Show {
                    code,
                    json: as_json,
                } => {
                    let c = op.clinic(&code)?;
                    if as_json {
                        println!("{}", json(&c));
                    } else {
                        println!("{}", line(&c));
                    }
                }
            }
        }
        Command::Medium {
            clinic,
            out,
            valid_for,
            token_valid_for,
            reset,
        } => {
            let mut op = Operator::open(&args.dir)?;
            let kind = if reset {
                tsunagi_medium::Kind::Reset
            } else {
                tsunagi_medium::Kind::Provision
            };
            let b = op.write_medium(
                &clinic,
                kind,
                Duration::from(valid_for),
                Duration::from(token_valid_for),
                &out,
            )?;
            println!(
                "wrote medium serial {} for clinic {} into {} (valid until {} Unix seconds)",
                b.serial,
                b.facility_code,
                out.display(),
                b.expires_at
            );
        }
    }
    Ok(())
}
