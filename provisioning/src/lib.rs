//! The operator's side of provisioning (issue 16): the network's provisioning signing key,
//! the operator database of clinics and the tunnel addresses allocated to them, and the
//! signed provisioning media ([`tsunagi_medium`]) written for each clinic's box.
//!
//! Everything lives in one operator directory: `operator.db` (SQLite), the keys by file
//! reference (generated into `keys/` by `init`, or imported: the database holds the path,
//! never the key), and the network's config template. Nothing here holds a box secret: each
//! box makes its own keys.
#![forbid(unsafe_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use rusqlite::{Connection, OptionalExtension as _, params};
use tsunagi_medium::{Bundle, Enrollment, FORMAT, Hub, Kind};
use tsunagi_state::{Durability, Migration};

pub mod ca;
pub mod enroll;
pub mod hub;
pub mod release;
pub mod serve;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "CREATE TABLE network (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            name TEXT NOT NULL,
            signing_key TEXT NOT NULL,
            hub_public_key TEXT NOT NULL, hub_endpoint TEXT NOT NULL, hub_ca TEXT NOT NULL,
            pool TEXT NOT NULL, enrollment_url TEXT NOT NULL, template TEXT NOT NULL,
            last_serial INTEGER NOT NULL DEFAULT 0
          ) STRICT;
          CREATE TABLE clinics (
            facility_code TEXT PRIMARY KEY, name TEXT NOT NULL, ae_title TEXT NOT NULL,
            tunnel_address TEXT NOT NULL UNIQUE, added_at INTEGER NOT NULL, revoked_at INTEGER
          ) STRICT;
          CREATE TABLE media (
            serial INTEGER PRIMARY KEY, facility_code TEXT NOT NULL REFERENCES clinics,
            kind TEXT NOT NULL, issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
            token_sha256 TEXT, token_expires_at INTEGER, token_used_at INTEGER
          ) STRICT;",
    },
    // The box-identity CA (by reference) and the enrolled boxes, one per clinic.
    Migration {
        version: 2,
        sql: "ALTER TABLE network ADD COLUMN box_ca_cert TEXT;
              ALTER TABLE network ADD COLUMN box_ca_key TEXT;
              CREATE UNIQUE INDEX media_token ON media (token_sha256);
              CREATE TABLE boxes (
                facility_code TEXT PRIMARY KEY REFERENCES clinics,
                box_serial TEXT NOT NULL, wireguard_public_key TEXT NOT NULL,
                cert_serial TEXT NOT NULL UNIQUE, not_after INTEGER NOT NULL,
                enrolled_at INTEGER NOT NULL, renewed_at INTEGER, revoked_at INTEGER
              ) STRICT;",
    },
    // A clinic's own addresses on the box's ports, where they differ from the template's.
    Migration {
        version: 3,
        sql: "ALTER TABLE clinics ADD COLUMN lan_address TEXT;
              ALTER TABLE clinics ADD COLUMN wan_address TEXT;
              ALTER TABLE clinics ADD COLUMN wan_gateway TEXT;
              ALTER TABLE clinics ADD COLUMN wan_dns TEXT;",
    },
];

/// The operator database's file in the operator directory.
pub const DB_FILE: &str = "operator.db";

/// Errors of the operator's commands.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot open the operator database")]
    Open(#[source] tsunagi_state::StateError),
    #[error("operator database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the operator directory {0} is already initialised")]
    AlreadyInitialised(PathBuf),
    #[error("the operator directory is not initialised (run `tsunagi-provision init`)")]
    NotInitialised,
    #[error("{0}")]
    Invalid(String),
    #[error("the signing key {0} is not an Ed25519 key in PKCS#8 (base64)")]
    BadKey(PathBuf),
    #[error("no clinic {0}")]
    NoClinic(String),
    #[error("clinic {0} is already registered")]
    ClinicExists(String),
    #[error("the tunnel address pool {0} has no free address")]
    PoolExhausted(String),
    #[error("the clinic's config would be refused by the box: {0}")]
    Config(String),
    #[error("no system randomness")]
    Random,
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `init` needs.
#[derive(Debug, Clone)]
pub struct Init {
    pub name: String,
    pub hub_public_key: String,
    pub hub_endpoint: String,
    /// The network CA's certificate (PEM) file: kept by reference.
    pub hub_ca: PathBuf,
    /// The tunnel address pool, `A.B.C.D/N`.
    pub pool: String,
    pub enrollment_url: String,
    /// The clinics' config template (a `tsunagi.toml`): copied into the operator directory.
    pub template: PathBuf,
    /// An existing signing key (PKCS#8, base64) to use by reference; else one is made.
    pub signing_key: Option<PathBuf>,
    /// An existing box-identity CA (certificate, key; PEM) to use by reference; else one
    /// is made.
    pub box_ca: Option<(PathBuf, PathBuf)>,
}

/// A registered clinic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clinic {
    pub facility_code: String,
    pub name: String,
    pub ae_title: String,
    pub tunnel_address: String,
    pub network: ClinicNetwork,
    pub added_at: i64,
    pub revoked_at: Option<i64>,
}

/// A clinic's own addresses on the box's two ports, set over the template's
/// `[network.wan]` and `[network.lan]` (which name the ports: the box's hardware is the
/// network's, the addresses are the clinic's). `None`: the template's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClinicNetwork {
    /// The LAN's fixed address with its prefix length, e.g. `192.168.1.250/24`.
    pub lan_address: Option<String>,
    /// `dhcp` or a fixed address with its prefix length.
    pub wan_address: Option<String>,
    /// With a fixed WAN address: its gateway.
    pub wan_gateway: Option<String>,
    /// With a fixed WAN address: DNS resolvers (empty: the template's).
    pub wan_dns: Vec<String>,
}

impl ClinicNetwork {
    fn is_empty(&self) -> bool {
        *self == ClinicNetwork::default()
    }

    /// Each value checked on its own (the config check then checks them together).
    fn check(&self) -> Result<(), ProvisionError> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| ProvisionError::Invalid(format!("{what}: {e}"));
        if let Some(a) = &self.lan_address {
            tsunagi_config::LinkAddress::try_from(a.clone())
                .map_err(|e| bad("--lan-address", &e))?;
        }
        if let Some(a) = &self.wan_address {
            tsunagi_config::LinkAddress::try_from(a.clone())
                .map_err(|e| bad("--wan-address", &e))?;
        }
        for (what, ip) in self
            .wan_gateway
            .iter()
            .map(|g| ("--wan-gateway", g))
            .chain(self.wan_dns.iter().map(|d| ("--wan-dns", d)))
        {
            ip.parse::<Ipv4Addr>()
                .map_err(|_| bad(what, &format!("{ip:?} is not an IPv4 address")))?;
        }
        Ok(())
    }
}

/// The operator directory, opened.
pub struct Operator {
    dir: PathBuf,
    conn: Connection,
}

fn parse_pool(pool: &str) -> Result<(Ipv4Addr, u8), ProvisionError> {
    let bad = || {
        ProvisionError::Invalid(format!(
            "the pool {pool} is not an IPv4 A.B.C.D/N with N from 8 to 30"
        ))
    };
    let (addr, len) = pool.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&len) {
        return Err(bad());
    }
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        return Err(ProvisionError::Invalid(format!(
            "the pool {pool} has host bits set"
        )));
    }
    Ok((addr, len))
}

/// The time, Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Reads a signing key file (PKCS#8 v1 or v2 in base64).
pub fn read_signing_key(path: &Path) -> Result<ring::signature::Ed25519KeyPair, ProvisionError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let der = B64
        .decode(text.trim())
        .map_err(|_| ProvisionError::BadKey(path.to_owned()))?;
    // PKCS#8 v2 (with the public key, checked) as ring makes it, or v1 (the private key
    // only) as OpenSSL and most key stores export it.
    let v1 = der.get(2..5) == Some(&[0x02, 0x01, 0x00][..]);
    if v1 {
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
    } else {
        ring::signature::Ed25519KeyPair::from_pkcs8(&der)
    }
    .map_err(|_| ProvisionError::BadKey(path.to_owned()))
}

/// Writes `bytes` to a new file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

impl Operator {
    /// Creates the operator directory's database and keys; the network's public
    /// provisioning key (base64), to build into the image.
    pub fn init(dir: &Path, init: &Init) -> Result<String, ProvisionError> {
        let db = dir.join(DB_FILE);
        if db.exists() {
            return Err(ProvisionError::AlreadyInitialised(dir.to_owned()));
        }
        parse_pool(&init.pool)?;
        let key_bytes = B64
            .decode(init.hub_public_key.trim())
            .map_err(|_| ProvisionError::Invalid("the hub's public key is not base64".into()))?;
        if key_bytes.len() != 32 {
            return Err(ProvisionError::Invalid(
                "the hub's public key is not a WireGuard key (32 bytes)".into(),
            ));
        }
        std::fs::read_to_string(&init.hub_ca).map_err(io(&init.hub_ca))?;
        std::fs::create_dir_all(dir.join("keys")).map_err(io(dir))?;
        let template_text = std::fs::read_to_string(&init.template).map_err(io(&init.template))?;
        let template = dir.join("clinic-template.toml");
        std::fs::write(&template, template_text).map_err(io(&template))?;
        let signing_key = match &init.signing_key {
            Some(path) => {
                read_signing_key(path)?;
                path.canonicalize().map_err(io(path))?
            }
            None => {
                let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|_| ProvisionError::Random)?;
                let path = dir.join("keys").join("provisioning.key");
                write_private(
                    &path,
                    format!("{}\n", B64.encode(pkcs8.as_ref())).as_bytes(),
                )?;
                path
            }
        };
        let key = read_signing_key(&signing_key)?;
        let (box_ca_cert, box_ca_key) = match &init.box_ca {
            Some((cert, key)) => {
                ca::BoxCa::load(cert, key)?;
                (
                    cert.canonicalize().map_err(io(cert))?,
                    key.canonicalize().map_err(io(key))?,
                )
            }
            None => {
                let (cert_pem, key_pem) = ca::make(&init.name, now())?;
                let cert = dir.join("keys").join("box-ca.pem");
                let key = dir.join("keys").join("box-ca.key");
                write_private(&key, key_pem.as_bytes())?;
                std::fs::write(&cert, cert_pem).map_err(io(&cert))?;
                (cert, key)
            }
        };
        let public = tsunagi_medium::public_key_text(&key);
        let pub_path = dir.join("keys").join("provisioning.pub");
        std::fs::write(&pub_path, format!("{public}\n")).map_err(io(&pub_path))?;
        let conn = tsunagi_state::open(&db, Durability::Acknowledging, MIGRATIONS)
            .map_err(ProvisionError::Open)?;
        conn.execute(
            "INSERT INTO network (id, name, signing_key, hub_public_key, hub_endpoint, hub_ca, pool, enrollment_url, template, box_ca_cert, box_ca_key)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                init.name,
                signing_key.to_string_lossy(),
                init.hub_public_key.trim(),
                init.hub_endpoint,
                init.hub_ca.canonicalize().map_err(io(&init.hub_ca))?.to_string_lossy(),
                init.pool,
                init.enrollment_url,
                template.to_string_lossy(),
                box_ca_cert.to_string_lossy(),
                box_ca_key.to_string_lossy(),
            ],
        )?;
        Ok(public)
    }

    /// Opens an initialised operator directory.
    pub fn open(dir: &Path) -> Result<Operator, ProvisionError> {
        let db = dir.join(DB_FILE);
        if !db.exists() {
            return Err(ProvisionError::NotInitialised);
        }
        let conn = tsunagi_state::open(&db, Durability::Acknowledging, MIGRATIONS)
            .map_err(ProvisionError::Open)?;
        Ok(Operator {
            dir: dir.to_owned(),
            conn,
        })
    }

    /// Registers a clinic, with the next free tunnel address of the pool.
    pub fn add_clinic(
        &mut self,
        facility_code: &str,
        name: &str,
        ae_title: &str,
        network: &ClinicNetwork,
    ) -> Result<Clinic, ProvisionError> {
        network.check()?;
        tsunagi_config::FacilityCode::try_from(facility_code.to_owned())
            .map_err(|e| ProvisionError::Invalid(format!("医療機関コード {facility_code}: {e}")))?;
        tsunagi_config::AeTitle::try_from(ae_title.to_owned())
            .map_err(|e| ProvisionError::Invalid(format!("AE title {ae_title}: {e}")))?;
        if name.trim().is_empty() {
            return Err(ProvisionError::Invalid("the clinic needs a name".into()));
        }
        let tx = self.conn.transaction()?;
        let exists: Option<String> = tx
            .query_row(
                "SELECT facility_code FROM clinics WHERE facility_code = ?1",
                [facility_code],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(ProvisionError::ClinicExists(facility_code.to_owned()));
        }
        let pool: String = tx.query_row("SELECT pool FROM network", [], |r| r.get(0))?;
        let (base, len) = parse_pool(&pool)?;
        let taken: Vec<String> = tx
            .prepare("SELECT tunnel_address FROM clinics")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let hosts = (1u32 << (32 - len)) - 2;
        // The first host is the hub's; clinics from the second on.
        let free = (2..=hosts)
            .map(|n| format!("{}/{len}", Ipv4Addr::from(u32::from(base) + n)))
            .find(|a| !taken.contains(a))
            .ok_or_else(|| ProvisionError::PoolExhausted(pool.clone()))?;
        let clinic = Clinic {
            facility_code: facility_code.to_owned(),
            name: name.trim().to_owned(),
            ae_title: ae_title.to_owned(),
            tunnel_address: free,
            network: network.clone(),
            added_at: now(),
            revoked_at: None,
        };
        // The clinic's config must hold together now, not first when its medium is written.
        let (template, hub_key, endpoint): (String, String, String) = tx.query_row(
            "SELECT template, hub_public_key, hub_endpoint FROM network",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let template = std::fs::read_to_string(&template).map_err(io(Path::new(&template)))?;
        clinic_config(&template, &clinic, &hub_key, &endpoint)?;
        let dns = (!network.wan_dns.is_empty()).then(|| network.wan_dns.join(","));
        tx.execute(
            "INSERT INTO clinics (facility_code, name, ae_title, tunnel_address, added_at, lan_address, wan_address, wan_gateway, wan_dns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                clinic.facility_code,
                clinic.name,
                clinic.ae_title,
                clinic.tunnel_address,
                clinic.added_at,
                network.lan_address,
                network.wan_address,
                network.wan_gateway,
                dns,
            ],
        )?;
        tx.commit()?;
        Ok(clinic)
    }

    /// Every registered clinic, by 医療機関コード.
    pub fn clinics(&self) -> Result<Vec<Clinic>, ProvisionError> {
        let mut stmt = self.conn.prepare(
            "SELECT facility_code, name, ae_title, tunnel_address, added_at, revoked_at,
                    lan_address, wan_address, wan_gateway, wan_dns FROM clinics ORDER BY facility_code",
        )?;
        let rows = stmt.query_map([], |r| {
            let dns: Option<String> = r.get(9)?;
            Ok(Clinic {
                facility_code: r.get(0)?,
                name: r.get(1)?,
                ae_title: r.get(2)?,
                tunnel_address: r.get(3)?,
                network: ClinicNetwork {
                    lan_address: r.get(6)?,
                    wan_address: r.get(7)?,
                    wan_gateway: r.get(8)?,
                    wan_dns: dns
                        .map(|d| d.split(',').map(str::to_owned).collect())
                        .unwrap_or_default(),
                },
                added_at: r.get(4)?,
                revoked_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One clinic.
    pub fn clinic(&self, facility_code: &str) -> Result<Clinic, ProvisionError> {
        self.clinics()?
            .into_iter()
            .find(|c| c.facility_code == facility_code)
            .ok_or_else(|| ProvisionError::NoClinic(facility_code.to_owned()))
    }

    /// Writes a signed medium for the clinic's box into `out` (a directory, created):
    /// [`tsunagi_medium::BUNDLE_FILE`] and [`tsunagi_medium::SIGNATURE_FILE`]. Valid for
    /// `valid_for`, its enrollment token for `token_valid_for`; the next serial. The
    /// bundle, and, when the clinic's config enables the console, the one-time code of its
    /// first administrator for the provisioning sheet: the medium carries only its hash,
    /// valid 7 days beyond the medium.
    pub fn write_medium(
        &mut self,
        facility_code: &str,
        kind: Kind,
        valid_for: std::time::Duration,
        token_valid_for: std::time::Duration,
        secrets: &[(String, PathBuf)],
        out: &Path,
    ) -> Result<(Bundle, Option<String>), ProvisionError> {
        let clinic = self.clinic(facility_code)?;
        if clinic.revoked_at.is_some() {
            return Err(ProvisionError::Invalid(format!(
                "clinic {facility_code} is revoked"
            )));
        }
        let (key_path, hub_key, endpoint, ca_path, url, template): (
            String,
            String,
            String,
            String,
            String,
            String,
        ) = self.conn.query_row(
            "SELECT signing_key, hub_public_key, hub_endpoint, hub_ca, enrollment_url, template FROM network",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )?;
        let key = read_signing_key(Path::new(&key_path))?;
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(io(Path::new(&ca_path)))?;
        let issued_at = now();
        let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let (config, hub, enrollment, token) = match kind {
            Kind::Reset => (String::new(), None, None, None),
            Kind::Provision => {
                let template =
                    std::fs::read_to_string(&template).map_err(io(Path::new(&template)))?;
                let config = clinic_config(&template, &clinic, &hub_key, &endpoint)?;
                let mut token = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
                    .map_err(|_| ProvisionError::Random)?;
                let token = B64URL.encode(token);
                (
                    config,
                    Some(Hub {
                        public_key: hub_key,
                        endpoint,
                        tunnel_address: clinic.tunnel_address.clone(),
                        ca_pem,
                    }),
                    Some(Enrollment {
                        token: token.clone(),
                        expires_at: issued_at.saturating_add(secs(token_valid_for)),
                        url,
                    }),
                    Some(token),
                )
            }
        };
        let expires_at = issued_at.saturating_add(secs(valid_for));
        let console = kind == Kind::Provision
            && tsunagi_config::parse(&config, Path::new(tsunagi_medium::BUNDLE_FILE))
                .is_ok_and(|c| c.console.enabled);
        let (setup_code, console_setup) = if console {
            let (code, code_hash) = tsunagi_medium::setup_code::generate()
                .map_err(|e| ProvisionError::Invalid(e.to_string()))?;
            (
                Some(code),
                Some(tsunagi_medium::ConsoleSetup {
                    code_hash,
                    expires_at: expires_at.saturating_add(SETUP_CODE_GRACE_SECS),
                }),
            )
        } else {
            (None, None)
        };
        let tx = self.conn.transaction()?;
        let serial: i64 = tx.query_row(
            "UPDATE network SET last_serial = last_serial + 1 RETURNING last_serial",
            [],
            |r| r.get(0),
        )?;
        let bundle = Bundle {
            format: FORMAT,
            kind,
            serial: u64::try_from(serial).unwrap_or(0),
            issued_at,
            expires_at,
            facility_code: clinic.facility_code.clone(),
            clinic_name: clinic.name.clone(),
            config,
            hub,
            enrollment,
            secrets: secrets
                .iter()
                .map(|(name, path)| {
                    std::fs::read_to_string(path)
                        .map(|text| (name.clone(), text))
                        .map_err(io(path))
                })
                .collect::<Result<_, _>>()?,
            console_setup,
        };
        let bytes = serde_json::to_vec_pretty(&bundle)
            .map_err(|e| ProvisionError::Invalid(e.to_string()))?;
        let signature = tsunagi_medium::sign(&bytes, &key);
        // Checked as a blank box will check it, before anything is written.
        let blank = tsunagi_medium::Expect {
            facility_code: None,
            last_serial: None,
            now: issued_at,
        };
        tsunagi_medium::verify(
            &bytes,
            Some(&signature),
            &tsunagi_medium::public_key_text(&key),
            blank,
        )
        .map_err(|e| ProvisionError::Invalid(format!("a box would refuse this medium: {e}")))?;
        std::fs::create_dir_all(out).map_err(io(out))?;
        let bundle_path = out.join(tsunagi_medium::BUNDLE_FILE);
        std::fs::write(&bundle_path, &bytes).map_err(io(&bundle_path))?;
        let sig_path = out.join(tsunagi_medium::SIGNATURE_FILE);
        std::fs::write(&sig_path, signature).map_err(io(&sig_path))?;
        let token_hash = token.map(|t| enroll::token_hash(&t));
        tx.execute(
            "INSERT INTO media (serial, facility_code, kind, issued_at, expires_at, token_sha256, token_expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                serial,
                clinic.facility_code,
                match kind {
                    Kind::Provision => "provision",
                    Kind::Reset => "reset",
                },
                bundle.issued_at,
                bundle.expires_at,
                token_hash,
                bundle.enrollment.as_ref().map(|e| e.expires_at),
            ],
        )?;
        tx.commit()?;
        Ok((bundle, setup_code))
    }

    /// The operator directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// How long a medium's console setup code stays valid after the medium itself expires (a
/// box provisioned on the medium's last day still has a week to set up its console).
pub const SETUP_CODE_GRACE_SECS: i64 = 7 * 24 * 3600;

/// A FAT image's size when `write_fat_image` makes a file (a block device keeps its own).
pub const FAT_IMAGE_BYTES: u64 = 4 * 1024 * 1024;

/// Writes the medium in `dir` (the two files `write_medium` wrote there) as a FAT file
/// system labelled [`tsunagi_medium::LABEL`] into `image`: a file, made or replaced at
/// [`FAT_IMAGE_BYTES`] (to copy onto a stick, or to attach to a VM), or a block device (a
/// stick, formatted as a whole, with no partition table). Flushed before it returns.
pub fn write_fat_image(dir: &Path, image: &Path) -> Result<(), ProvisionError> {
    use std::io::Write as _;
    use std::os::unix::fs::FileTypeExt as _;
    let device = std::fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(!device)
        .truncate(!device)
        .open(image)
        .map_err(io(image))?;
    if !device {
        file.set_len(FAT_IMAGE_BYTES).map_err(io(image))?;
    }
    let mut label = [b' '; 11];
    label[..tsunagi_medium::LABEL.len()].copy_from_slice(tsunagi_medium::LABEL.as_bytes());
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new().volume_label(label),
    )
    .map_err(io(image))?;
    std::io::Seek::rewind(&mut file).map_err(io(image))?;
    {
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(io(image))?;
        for name in [tsunagi_medium::BUNDLE_FILE, tsunagi_medium::SIGNATURE_FILE] {
            let from = dir.join(name);
            let bytes = std::fs::read(&from).map_err(io(&from))?;
            let mut f = fs.root_dir().create_file(name).map_err(io(image))?;
            f.truncate().map_err(io(image))?;
            f.write_all(&bytes).map_err(io(image))?;
            f.flush().map_err(io(image))?;
        }
        fs.unmount().map_err(io(image))?;
    }
    file.sync_all().map_err(io(image))
}

impl Operator {
    /// The addresses a clinic's console certificate names: the console's `listen` address
    /// in the config the network gives the clinic (its template with the clinic's keys,
    /// [`clinic_config`]), which must be a private LAN address outside the tunnel pool.
    /// Nothing comes from the box. `Err` with one line for the box when there is none to
    /// certify.
    pub fn console_addresses(
        &self,
        facility_code: &str,
    ) -> Result<Vec<std::net::IpAddr>, ProvisionError> {
        let clinic = self.clinic(facility_code)?;
        let (hub_key, endpoint, template, pool): (String, String, String, String) =
            self.conn.query_row(
                "SELECT hub_public_key, hub_endpoint, template, pool FROM network",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
        let template = std::fs::read_to_string(&template).map_err(io(Path::new(&template)))?;
        let text = clinic_config(&template, &clinic, &hub_key, &endpoint)?;
        let config = tsunagi_config::parse(&text, Path::new("clinic config"))
            .map_err(|p| ProvisionError::Config(p.to_string().trim().to_owned()))?;
        if !config.console.enabled {
            return Err(ProvisionError::Invalid(format!(
                "the network's config for clinic {facility_code} has no console"
            )));
        }
        let ip = config.console.listen.ip();
        if !tsunagi_medium::enroll::private_lan_address(ip) {
            return Err(ProvisionError::Invalid(format!(
                "the console's address {ip} in the network's config for clinic {facility_code} is not a private LAN address: no certificate names it"
            )));
        }
        let (base, len) = parse_pool(&pool)?;
        if let std::net::IpAddr::V4(v4) = ip {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            if u32::from(v4) & mask == u32::from(base) & mask {
                return Err(ProvisionError::Invalid(format!(
                    "the console's address {ip} in the network's config for clinic {facility_code} is inside the tunnel pool {pool}"
                )));
            }
        }
        Ok(vec![ip])
    }
}

/// The clinic's config: the network's template with the clinic's keys set (site, tunnel,
/// its own addresses; the identity service on, which enrolls the box), checked as the box
/// will check it.
pub fn clinic_config(
    template: &str,
    clinic: &Clinic,
    hub_public_key: &str,
    hub_endpoint: &str,
) -> Result<String, ProvisionError> {
    let mut doc: toml_edit::DocumentMut = template
        .parse()
        .map_err(|e: toml_edit::TomlError| ProvisionError::Config(format!("the template: {e}")))?;
    doc["site"]["facility-code"] = toml_edit::value(clinic.facility_code.as_str());
    doc["site"]["ae-title"] = toml_edit::value(clinic.ae_title.as_str());
    doc["site"]["name"] = toml_edit::value(clinic.name.as_str());
    doc["tunnel"]["address"] = toml_edit::value(clinic.tunnel_address.as_str());
    doc["tunnel"]["hub-public-key"] = toml_edit::value(hub_public_key);
    doc["tunnel"]["hub-endpoint"] = toml_edit::value(hub_endpoint);
    // The box enrolls with the medium's token by its identity service: on unless the
    // template turned it off, which would leave a box that never enrolls.
    match doc.get("identity").and_then(|t| t.get("enabled")) {
        None => doc["identity"]["enabled"] = toml_edit::value(true),
        Some(v) if v.as_bool() == Some(true) => {}
        Some(_) => {
            return Err(ProvisionError::Config(
                "the template turns [identity] off: the box enrolls with its medium's token by the identity service, so it must be on".into(),
            ));
        }
    }
    let n = &clinic.network;
    if !n.is_empty() {
        let has = |role: &str| {
            doc.get("network")
                .and_then(|t| t.get(role))
                .is_some_and(toml_edit::Item::is_table_like)
        };
        if !has("wan") || !has("lan") {
            return Err(ProvisionError::Config(
                "the clinic has addresses of its own, but the template has no [network.wan] and [network.lan] naming the box's ports".into(),
            ));
        }
        if let Some(a) = &n.lan_address {
            doc["network"]["lan"]["address"] = toml_edit::value(a.as_str());
            // The console answers on the clinic's LAN address (its certificate names it).
            let console = doc.get("console");
            if console
                .and_then(|c| c.get("enabled"))
                .and_then(toml_edit::Item::as_bool)
                == Some(true)
            {
                let port = console
                    .and_then(|c| c.get("listen"))
                    .and_then(toml_edit::Item::as_str)
                    .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
                    .map_or(443, |l| l.port());
                let ip = a.split('/').next().unwrap_or_default();
                doc["console"]["listen"] = toml_edit::value(format!("{ip}:{port}"));
            }
        }
        if let Some(a) = &n.wan_address {
            doc["network"]["wan"]["address"] = toml_edit::value(a.as_str());
            if a == "dhcp" {
                // With DHCP, the router gives both: the template's fixed ones go.
                if let Some(wan) = doc["network"]["wan"].as_table_like_mut() {
                    wan.remove("gateway");
                    wan.remove("dns");
                }
            }
        }
        if let Some(g) = &n.wan_gateway {
            doc["network"]["wan"]["gateway"] = toml_edit::value(g.as_str());
        }
        if !n.wan_dns.is_empty() {
            doc["network"]["wan"]["dns"] = toml_edit::value(
                n.wan_dns
                    .iter()
                    .map(String::as_str)
                    .collect::<toml_edit::Array>(),
            );
        }
    }
    let text = doc.to_string();
    tsunagi_config::parse(&text, Path::new("clinic config"))
        .map_err(|p| ProvisionError::Config(p.to_string().trim().to_owned()))?;
    Ok(text)
}
