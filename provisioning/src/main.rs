//! `tsunagi-provision`: the network operator's tool (issue 16). See `docs/provisioning.md`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tsunagi_provision::hub::WgInterface;
use tsunagi_provision::{Clinic, ClinicNetwork, Init, Operator};

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
        /// An existing box-identity CA's certificate (PEM), used by reference with
        /// --box-ca-key instead of making one.
        #[arg(long, requires = "box_ca_key")]
        box_ca_cert: Option<PathBuf>,
        /// That CA's key (PEM).
        #[arg(long, requires = "box_ca_cert")]
        box_ca_key: Option<PathBuf>,
    },
    /// The enrollment server, at the hub: boxes enroll with their medium's token and renew
    /// over the tunnel. Runs until SIGTERM or SIGINT.
    Serve {
        /// HOST:PORT to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The hub's certificate chain (PEM), from the network CA.
        #[arg(long)]
        tls_cert: PathBuf,
        /// Its key (PEM).
        #[arg(long)]
        tls_key: PathBuf,
        /// Where boxes renew their certificates: this server at the hub's address inside
        /// the tunnel (https://HOST:PORT).
        #[arg(long)]
        renew_url: String,
        /// How long a box's certificate is valid.
        #[arg(long, default_value = "30d")]
        certificate_lifetime: humantime::Duration,
        #[command(flatten)]
        wireguard: WireGuardArgs,
    },
    /// Revokes a clinic's box: its WireGuard peer leaves the hub, its certificate is not
    /// renewed, and no medium is written for the clinic any more.
    Revoke {
        /// The clinic's 医療機関コード.
        #[arg(long)]
        clinic: String,
        #[command(flatten)]
        wireguard: WireGuardArgs,
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
        /// Where to write it: a directory (the root of a mounted stick, or a folder to
        /// copy there).
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        out: Option<PathBuf>,
        /// Or a FAT file system labelled TSUNAGI-PRV: an image file (4 MiB, to write onto a
        /// stick) or the stick's block device itself.
        #[arg(long)]
        image: Option<PathBuf>,
        /// How long the medium may be applied, e.g. 14d.
        #[arg(long, default_value = "14d")]
        valid_for: humantime::Duration,
        /// How long its enrollment token may be used, e.g. 7d.
        #[arg(long, default_value = "7d")]
        token_valid_for: humantime::Duration,
        /// A factory-reset medium instead.
        #[arg(long)]
        reset: bool,
        /// A clinic secret the config names, KEY=FILE (e.g.
        /// `ssmix2.share.password-file=emr.password`: the EMR server's read-only account);
        /// the file's content goes into the signed bundle, never into the database.
        #[arg(long = "secret", value_parser = parse_secret)]
        secrets: Vec<(String, PathBuf)>,
    },
}

/// `KEY=FILE` of `medium --secret`.
fn parse_secret(text: &str) -> Result<(String, PathBuf), String> {
    let (key, file) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=FILE"))?;
    if !tsunagi_medium::MEDIUM_SECRETS
        .iter()
        .any(|(k, _)| *k == key)
    {
        let known: Vec<&str> = tsunagi_medium::MEDIUM_SECRETS
            .iter()
            .map(|(k, _)| *k)
            .collect();
        return Err(format!(
            "a medium may carry only these secrets: {}",
            known.join(", ")
        ));
    }
    Ok((key.to_owned(), PathBuf::from(file)))
}

/// The hub's WireGuard interface.
#[derive(Debug, clap::Args)]
struct WireGuardArgs {
    /// Its name.
    #[arg(long)]
    wireguard_interface: String,
    /// wireguard-go's interface (its control socket) instead of the kernel's.
    #[arg(long)]
    userspace: bool,
}

impl WireGuardArgs {
    fn open(&self) -> anyhow::Result<WgInterface> {
        WgInterface::open(&self.wireguard_interface, self.userspace).map_err(anyhow::Error::msg)
    }
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
        /// The box's LAN address at the clinic, e.g. 192.168.1.250/24 (default: the
        /// template's [network.lan]).
        #[arg(long)]
        lan_address: Option<String>,
        /// The box's WAN address: `dhcp`, or a fixed one with its prefix length (default:
        /// the template's [network.wan]).
        #[arg(long)]
        wan_address: Option<String>,
        /// With a fixed WAN address: its gateway.
        #[arg(long)]
        wan_gateway: Option<String>,
        /// With a fixed WAN address: a DNS resolver (repeatable).
        #[arg(long)]
        wan_dns: Vec<String>,
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
        "lan-address": c.network.lan_address,
        "wan-address": c.network.wan_address,
        "wan-gateway": c.network.wan_gateway,
        "wan-dns": c.network.wan_dns,
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
            box_ca_cert,
            box_ca_key,
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
                    box_ca: box_ca_cert.zip(box_ca_key),
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
                    lan_address,
                    wan_address,
                    wan_gateway,
                    wan_dns,
                } => {
                    let network = ClinicNetwork {
                        lan_address,
                        wan_address,
                        wan_gateway,
                        wan_dns,
                    };
                    let c = op.add_clinic(&code, &name, &ae_title, &network)?;
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
                    let b = op.enrolled_box(&code)?;
                    if as_json {
                        let mut v = json(&c);
                        v["box"] = b.map_or(serde_json::Value::Null, |b| {
                            serde_json::json!({
                                "box-serial": b.box_serial,
                                "wireguard-public-key": b.wireguard_public_key,
                                "certificate-serial": b.cert_serial,
                                "not-after": b.not_after,
                                "enrolled-at": b.enrolled_at,
                                "renewed-at": b.renewed_at,
                                "revoked-at": b.revoked_at,
                            })
                        });
                        println!("{v}");
                    } else {
                        println!("{}", line(&c));
                        match b {
                            Some(b) => println!(
                                "  box {}  wireguard {}  certificate until {}{}",
                                b.box_serial,
                                b.wireguard_public_key,
                                b.not_after,
                                if b.revoked_at.is_some() {
                                    "  (revoked)"
                                } else {
                                    ""
                                }
                            ),
                            None => println!("  no box enrolled"),
                        }
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
            secrets,
            image,
        } => {
            let mut op = Operator::open(&args.dir)?;
            let kind = if reset {
                tsunagi_medium::Kind::Reset
            } else {
                tsunagi_medium::Kind::Provision
            };
            // For an image: the two files beside the database first (private), then
            // packed into it.
            let staging = match &image {
                Some(_) => Some(
                    tempfile::Builder::new()
                        .prefix(".medium-")
                        .tempdir_in(&args.dir)
                        .context("a staging directory in the operator directory")?,
                ),
                None => None,
            };
            let dir = match (&out, &staging) {
                (Some(out), _) => out.clone(),
                (None, Some(staging)) => staging.path().to_owned(),
                (None, None) => anyhow::bail!("give --out DIR or --image FILE"),
            };
            let (b, setup_code) = op.write_medium(
                &clinic,
                kind,
                Duration::from(valid_for),
                Duration::from(token_valid_for),
                &secrets,
                &dir,
            )?;
            if let Some(image) = &image {
                tsunagi_provision::write_fat_image(&dir, image)?;
            }
            println!(
                "wrote medium serial {} for clinic {} into {} (valid until {} Unix seconds)",
                b.serial,
                b.facility_code,
                image.as_ref().unwrap_or(&dir).display(),
                b.expires_at
            );
            if let (Some(code), Some(setup)) = (setup_code, &b.console_setup) {
                // For the provisioning sheet only: the medium carries its hash.
                println!(
                    "console setup code (for the provisioning sheet; not on the medium; valid until {} Unix seconds): {code}",
                    setup.expires_at
                );
            }
        }
        Command::Serve {
            listen,
            tls_cert,
            tls_key,
            renew_url,
            certificate_lifetime,
            wireguard,
        } => {
            anyhow::ensure!(
                renew_url.starts_with("https://"),
                "--renew-url must be an https:// URL"
            );
            let lifetime = Duration::from(certificate_lifetime);
            anyhow::ensure!(
                lifetime >= Duration::from_secs(10),
                "--certificate-lifetime must be at least 10s"
            );
            let op = Operator::open(&args.dir)?;
            let peers = std::sync::Arc::new(wireguard.open()?);
            let settings = tsunagi_provision::serve::Settings {
                listen,
                cert: tls_cert,
                key: tls_key,
                policy: tsunagi_provision::enroll::Policy {
                    lifetime,
                    renew_url,
                },
            };
            let tls = tsunagi_provision::serve::tls_config(&settings, op.box_ca()?.cert_pem())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listen on {listen}"))?;
                eprintln!("enrollment server listening on https://{listen}");
                let stop = tokio_util::sync::CancellationToken::new();
                let signals = stop.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{SignalKind, signal};
                    let (Ok(mut term), Ok(mut int)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) else {
                        return;
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    signals.cancel();
                });
                tsunagi_provision::serve::serve(op, settings.policy, peers, listener, tls, stop)
                    .await?;
                eprintln!("enrollment server stopped");
                anyhow::Ok(())
            })?;
        }
        Command::Revoke { clinic, wireguard } => {
            let mut op = Operator::open(&args.dir)?;
            let peers = wireguard.open()?;
            match op.revoke(&clinic, &peers, tsunagi_provision::now())? {
                Some(b) => println!(
                    "revoked clinic {clinic}: box {} removed from the hub, its certificate not renewed",
                    b.box_serial
                ),
                None => println!("revoked clinic {clinic} (no box was enrolled)"),
            }
        }
    }
    Ok(())
}
