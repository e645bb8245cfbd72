//! `identity`: the box's network identity (issue 16), the client certificate the network's
//! enrollment server issued for the box's own key, kept renewed over the tunnel before it
//! ends. Once a medium was applied the service enrolls the box by itself ([`enroll`]; the
//! same as `tsunagi enroll` by hand).
//!
//! Files, in the service's state directory (`STATE/identity`, owned by its user):
//! [`KEY_FILE`] (the TLS key, ECDSA P-256, mode 0600, made on the box and never sent),
//! [`CERT_FILE`], [`CA_FILE`] (the box-identity CA) and [`RECORD_FILE`] ([`Record`]).
//!
//! The service looks at the certificate every `check-interval`. From [`renew_at`] on it
//! asks the renewal URL the enrollment server gave (an address inside the tunnel, over TLS
//! verified against the network CA from the medium, presenting the current certificate)
//! for a new certificate on the same key. A failure is retried with a backoff up to
//! `check-interval` and shown in the status (degraded) with the certificate's end; an
//! expired certificate says the box must enroll again. Each file is written beside,
//! flushed and renamed in; the record last. The current certificate and key are published
//! for the services that present the box's identity ([`client_dir`], group
//! [`CLIENT_GROUP`]).
//!
//! With the clinic console on and no certificate of its own in the config, the service
//! also keeps the console's server certificate: a second key made on the box
//! ([`CONSOLE_KEY_FILE`], 0600), and a certificate the enrollment server issues for it over
//! the tunnel ([`console_certificate`]), for the console's address as the network's config
//! for the clinic has it, asked for once the box is enrolled and again once a third of
//! its life is left; published for the console alone ([`console_dir`], group
//! [`CONSOLE_GROUP`]), which serves it instead of its self-signed one.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tsunagi_medium::enroll::{
    CONSOLE_PATH, ConsoleIssued, ConsoleRequest, Enrolled, MAX_RESPONSE, RENEW_PATH, Refusal,
    RenewRequest,
};
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::service::{self, Launch, Service};
use tsunagi_runtime::status::Health;

pub mod enroll;

/// The service's name (and its state directory's).
pub const NAME: &str = "identity";
/// The box's TLS key.
pub const KEY_FILE: &str = "box.key";
/// The box's certificate.
pub const CERT_FILE: &str = "box.pem";
/// The box-identity CA's certificate.
pub const CA_FILE: &str = "box-ca.pem";
/// What the box knows of its enrollment ([`Record`]).
pub const RECORD_FILE: &str = "enrolled.json";
/// The network CA from the medium, which every link to the hub is verified against
/// (relative to the state root).
pub const NETWORK_CA: &str = "provisioning/network-ca.pem";
/// The group whose members may read the box's client certificate and key
/// ([`client_dir`]): the services that present the box's identity to the hub.
pub const CLIENT_GROUP: &str = "tsunagi-box-cert";

/// The clinic console's TLS key (made on the box, never sent).
pub const CONSOLE_KEY_FILE: &str = "console.key";
/// The clinic console's server certificate, from the enrollment server.
pub const CONSOLE_CERT_FILE: &str = "console.pem";
/// The group whose members may read the console's certificate and key ([`console_dir`]):
/// the console alone.
pub const CONSOLE_GROUP: &str = "tsunagi-console-cert";

/// Where the service publishes the console's certificate ([`CONSOLE_CERT_FILE`]) and key
/// ([`CONSOLE_KEY_FILE`]) for [`CONSOLE_GROUP`] (`STATE/identity-console`, mode 2750 of
/// that group; the files 0640).
pub fn console_dir(state_root: &Path) -> PathBuf {
    state_root.join("identity-console")
}

/// The console's published certificate and key ([`console_dir`]).
pub fn console_files(state_root: &Path) -> (PathBuf, PathBuf) {
    let dir = console_dir(state_root);
    (dir.join(CONSOLE_CERT_FILE), dir.join(CONSOLE_KEY_FILE))
}

/// Where the service publishes the box's current client certificate ([`CERT_FILE`]) and
/// key ([`KEY_FILE`]) for [`CLIENT_GROUP`] (`STATE/identity-client`: this service's, mode
/// 2750 of that group; the files 0640). Its own state directory stays private.
pub fn client_dir(state_root: &Path) -> PathBuf {
    state_root.join("identity-client")
}

/// The box's published certificate and key ([`client_dir`]): what a service that presents
/// the box's identity (`client-identity = true`) loads.
pub fn client_files(state_root: &Path) -> (PathBuf, PathBuf) {
    let dir = client_dir(state_root);
    (dir.join(CERT_FILE), dir.join(KEY_FILE))
}

/// The files of a mutual-TLS link as a section configures them (`ca-file`, and
/// `client-identity` or `client-cert-file` and `client-key-file`; the config's rules require
/// the CA and one of the two): with `client-identity`, the box's own certificate as this
/// service publishes it ([`client_files`]).
pub fn tls_files(
    state_root: &Path,
    ca_file: Option<&tsunagi_config::AbsPath>,
    client_identity: bool,
    cert_file: Option<&tsunagi_config::AbsPath>,
    key_file: Option<&tsunagi_config::SecretFile>,
) -> tsunagi_runtime::http::TlsFiles {
    let (cert_file, key_file) = if client_identity {
        client_files(state_root)
    } else {
        (
            cert_file
                .map(|p| p.as_path().to_owned())
                .unwrap_or_default(),
            key_file.map(|p| p.as_ref().to_owned()).unwrap_or_default(),
        )
    };
    tsunagi_runtime::http::TlsFiles {
        ca_file: ca_file.map(|p| p.as_path().to_owned()).unwrap_or_default(),
        cert_file,
        key_file,
    }
}

/// Publishes the current certificate and key in [`client_dir`] when they differ from what
/// is there (at start, after enrollment, after each renewal). The certificate first, then
/// the key: a reader that sees a new certificate before its key fails one handshake at
/// most, and the key does not change at renewal.
pub fn publish(own: &Path, state_root: &Path) -> Result<bool, IdentityError> {
    publish_files(own, &client_dir(state_root), &[CERT_FILE, KEY_FILE])
}

/// Publishes the console's certificate and key in [`console_dir`] when they differ from
/// what is there, the certificate first.
pub fn publish_console(own: &Path, state_root: &Path) -> Result<bool, IdentityError> {
    publish_files(
        own,
        &console_dir(state_root),
        &[CONSOLE_CERT_FILE, CONSOLE_KEY_FILE],
    )
}

fn publish_files(own: &Path, dir: &Path, names: &[&str]) -> Result<bool, IdentityError> {
    let mut changed = false;
    for &name in names {
        let from = own.join(name);
        let bytes = std::fs::read(&from).map_err(|source| IdentityError::Io {
            path: from.clone(),
            source,
        })?;
        let to = dir.join(name);
        if std::fs::read(&to).is_ok_and(|there| there == bytes) {
            continue;
        }
        // The service's umask may narrow the mode `replace` creates the file with.
        replace(&to, &bytes, 0o640)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o640))
            })
            .map_err(|source| IdentityError::Io { path: to, source })?;
        changed = true;
    }
    Ok(changed)
}

/// The identity service as the binary lists it.
pub const SERVICE: Service = Service {
    name: NAME,
    user: "tsunagi-identity",
    description: "tsunagi network identity",
    capabilities: &[],
    groups: &[],
    worker_threads: 1,
    launch: |cfg| {
        cfg.identity.enabled.then(|| {
            let root = cfg.paths.state_dir.as_path();
            // The box's client certificate and key for the services that present them;
            // the console's for the console.
            let mut shared_dirs = vec![(client_dir(root), CLIENT_GROUP.to_owned())];
            if console_address(cfg).is_some() {
                shared_dirs.push((console_dir(root), CONSOLE_GROUP.to_owned()));
            }
            Launch {
                shared_dirs,
                ..Launch::reading(cfg, &(&cfg.identity, &cfg.tunnel, &console_address(cfg)))
            }
        })
    },
    main: |cfg, ctx| service::boxed(run(ctx, Settings::from_config(cfg))),
};

/// What `enrolled.json` records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Record {
    /// The certificate's subject CN (医療機関コード-serial).
    pub identity: String,
    pub box_serial: String,
    /// Unix seconds: when the current certificate was issued (received).
    pub issued_at: i64,
    /// Unix seconds: its end.
    pub not_after: i64,
    /// Where it is renewed.
    pub renew_url: String,
    /// How many times it was renewed since enrollment.
    #[serde(default)]
    pub renewals: u64,
}

/// Errors of the identity service.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the identity service's worker stopped unexpectedly")]
    Task(#[source] tokio::task::JoinError),
}

/// When to renew: once what is left of the certificate's life is `renew_before` or a third
/// of its lifetime, whichever is less.
pub fn renew_at(record: &Record, renew_before: Duration) -> i64 {
    let lifetime = (record.not_after - record.issued_at).max(0);
    let before = i64::try_from(renew_before.as_secs())
        .unwrap_or(i64::MAX)
        .min(lifetime / 3);
    record.not_after - before
}

/// The time, Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A PKCS#10 request (PEM) for `key` with `identity` as its CN.
pub fn csr(key: &rcgen::KeyPair, identity: &str) -> Result<String, String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("cannot make the certificate request: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity);
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("cannot make the certificate request: {e}"))
}

/// Whether `cert_pem`'s first certificate is for `key` with `identity` as its CN; its end
/// (Unix seconds) if so.
pub fn certifies(cert_pem: &str, key: &rcgen::KeyPair, identity: &str) -> Option<i64> {
    use rcgen::PublicKeyData as _;
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    (cert.public_key().subject_public_key.data.as_ref() == key.der_bytes() && cn == identity)
        .then(|| cert.validity().not_after.timestamp())
}

/// Writes `bytes` to `path` with `mode`, durably ([`tsunagi_state::replace_file`]).
pub use tsunagi_state::replace_file as replace;

/// Reads the record, if the box is enrolled.
pub fn read_record(dir: &Path) -> Result<Option<Record>, IdentityError> {
    let path = dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| IdentityError::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io { path, source }),
    }
}

/// The console's address this service gets a certificate for: the console on, with no
/// certificate of its own in the config, and listening on one address.
pub fn console_address(cfg: &tsunagi_config::Config) -> Option<std::net::IpAddr> {
    let c = &cfg.console;
    (c.enabled && c.cert_file.is_none() && !c.listen.ip().is_unspecified()).then(|| c.listen.ip())
}

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The console's address, when this service keeps its certificate
    /// ([`console_address`]).
    pub console: Option<std::net::IpAddr>,
    pub renew_before: Duration,
    pub check_interval: Duration,
    /// The state root (the network CA is under it).
    pub state_root: PathBuf,
    /// The tunnel an enrollment's answer must name (the config's); `None`: no tunnel, no
    /// enrollment.
    pub tunnel: Option<enroll::Expect>,
}

impl Settings {
    pub fn from_config(cfg: &tsunagi_config::Config) -> Settings {
        Settings {
            console: console_address(cfg),
            renew_before: cfg.identity.renew_before.get(),
            check_interval: cfg.identity.check_interval.get(),
            state_root: cfg.paths.state_dir.as_path().to_owned(),
            tunnel: cfg.tunnel.as_ref().map(|t| enroll::Expect {
                tunnel_address: t.address.to_string(),
                hub_public_key: String::from(t.hub_public_key.clone()),
            }),
        }
    }
}

/// An HTTPS client to the hub verified against the network CA only, presenting the box's
/// current certificate (from `dir`); and the box's TLS key.
fn hub_client(
    dir: &Path,
    settings: &Settings,
    record: &Record,
) -> Result<(reqwest::Client, rcgen::KeyPair), String> {
    let read =
        |name: &str| std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {}", e.kind()));
    let key_pem = read(KEY_FILE)?;
    let cert_pem = read(CERT_FILE)?;
    let key = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&key_pem))
        .map_err(|e| format!("{KEY_FILE}: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{CERT_FILE}: {e}"))?;
    let tls_key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("{KEY_FILE}: {e}"))?;
    let ca = std::fs::read(settings.state_root.join(NETWORK_CA))
        .map_err(|e| format!("the network CA: {}", e.kind()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("no network CA from the medium".into());
    }
    if !record.renew_url.starts_with("https://") {
        return Err(format!("the renewal URL {} is not https", record.renew_url));
    }
    let client = tsunagi_runtime::http::client_builder(tsunagi_runtime::http::ClientSettings {
        roots,
        identity: Some(tsunagi_runtime::http::ClientIdentity {
            chain,
            key: tls_key,
        }),
        connect_timeout: Duration::from_secs(10),
        timeout: Some(Duration::from_secs(30)),
        keep_idle: None,
    })
    .map_err(|e| e.to_string())?
    .https_only(true)
    .redirect(reqwest::redirect::Policy::none())
    .build()
    .map_err(|e| e.to_string())?;
    Ok((client, key))
}

/// POSTs `body` to `path` at the renewal server; the answer, at most [`MAX_RESPONSE`]
/// bytes, or the refusal's line.
async fn post_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    record: &Record,
    path: &str,
    body: Vec<u8>,
) -> Result<T, String> {
    let url = format!("{}{path}", record.renew_url.trim_end_matches('/'));
    let mut response = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            format!(
                "the renewal server cannot be reached: {}",
                tsunagi_runtime::child::error_chain(&e)
            )
        })?;
    let status = response.status();
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_RESPONSE {
            return Err(format!(
                "the renewal server's answer is over {MAX_RESPONSE} bytes"
            ));
        }
    }
    if !status.is_success() {
        let why = serde_json::from_slice::<Refusal>(&bytes)
            .map(|r| r.line())
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return Err(format!("the renewal server refused: {why}"));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("the renewal server's answer cannot be read: {e}"))
}

/// One renewal: the new certificate is written, the record updated. The new record.
async fn renew(dir: &Path, settings: &Settings, record: &Record) -> Result<Record, String> {
    let (client, key) = hub_client(dir, settings, record)?;
    let body = serde_json::to_vec(&RenewRequest {
        csr_pem: csr(&key, &record.identity)?,
    })
    .map_err(|e| e.to_string())?;
    let enrolled: Enrolled = post_json(&client, record, RENEW_PATH, body).await?;
    let Some(not_after) = certifies(&enrolled.certificate_pem, &key, &record.identity) else {
        return Err("the renewed certificate is not for this box's key and identity".into());
    };
    replace(
        &dir.join(CERT_FILE),
        enrolled.certificate_pem.as_bytes(),
        0o644,
    )
    .and_then(|()| replace(&dir.join(CA_FILE), enrolled.box_ca_pem.as_bytes(), 0o644))
    .map_err(|e| format!("cannot write the certificate: {e}"))?;
    let new = Record {
        issued_at: now(),
        not_after,
        renew_url: enrolled.renew_url,
        renewals: record.renewals + 1,
        ..record.clone()
    };
    let text = serde_json::to_vec(&new).map_err(|e| e.to_string())?;
    replace(&dir.join(RECORD_FILE), &text, 0o644)
        .map_err(|e| format!("cannot write the record: {e}"))?;
    Ok(new)
}

/// What `console.json` records of the console's certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsoleRecord {
    /// Unix seconds: when it was received.
    pub issued_at: i64,
    /// Unix seconds: its end.
    pub not_after: i64,
    /// The addresses it names.
    pub addresses: Vec<std::net::IpAddr>,
}

/// The console certificate's record.
pub const CONSOLE_RECORD_FILE: &str = "console.json";

/// Whether `cert_pem`'s first certificate is for `key`, names `ip` and is for server
/// authentication; its end (Unix seconds) if so.
pub fn certifies_console(
    cert_pem: &str,
    key: &rcgen::KeyPair,
    ip: std::net::IpAddr,
) -> Option<i64> {
    use rcgen::PublicKeyData as _;
    use x509_parser::extensions::GeneralName;
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let octets = match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let names = cert.subject_alternative_name().ok()??;
    let named = names
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::IPAddress(a) if *a == octets.as_slice()));
    let server = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.server_auth);
    (cert.public_key().subject_public_key.data.as_ref() == key.der_bytes() && named && server)
        .then(|| cert.validity().not_after.timestamp())
}

/// When the console's certificate in `dir` is to be asked for again (Unix seconds, as
/// [`renew_at`] for the box's), or why it must be asked for now: none yet, not for the
/// console's key, or not for `ip` (the config changed).
pub fn console_next(
    dir: &Path,
    ip: std::net::IpAddr,
    renew_before: Duration,
) -> Result<(i64, ConsoleRecord), &'static str> {
    let record: ConsoleRecord = std::fs::read(dir.join(CONSOLE_RECORD_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("none yet")?;
    let key = std::fs::read_to_string(dir.join(CONSOLE_KEY_FILE))
        .ok()
        .and_then(|pem| rcgen::KeyPair::from_pem(&pem).ok())
        .ok_or("none yet")?;
    let cert = std::fs::read_to_string(dir.join(CONSOLE_CERT_FILE)).map_err(|_| "none yet")?;
    let not_after = certifies_console(&cert, &key, ip)
        .ok_or("the one there is not for the console's address")?;
    let at = renew_at(
        &Record {
            identity: String::new(),
            box_serial: String::new(),
            issued_at: record.issued_at,
            not_after,
            renew_url: String::new(),
            renewals: 0,
        },
        renew_before,
    );
    Ok((at, record))
}

/// Asks the enrollment server (at the renewal URL, presenting the box's certificate) for
/// the console's server certificate, on the console's key (made if missing), and keeps it
/// with its record once it names `ip` for that key.
pub async fn console_certificate(
    dir: &Path,
    settings: &Settings,
    record: &Record,
    ip: std::net::IpAddr,
) -> Result<ConsoleRecord, String> {
    let (client, _) = hub_client(dir, settings, record)?;
    let (key, _) = enroll::tls_key(&dir.join(CONSOLE_KEY_FILE))?;
    let body = serde_json::to_vec(&ConsoleRequest {
        csr_pem: csr(&key, &format!("{} console", record.identity))?,
    })
    .map_err(|e| e.to_string())?;
    let issued: ConsoleIssued = post_json(&client, record, CONSOLE_PATH, body).await?;
    let Some(not_after) = certifies_console(&issued.certificate_pem, &key, ip) else {
        return Err(format!(
            "the certificate the network issued does not name the console's address {ip} for its key (it names {:?})",
            issued.addresses
        ));
    };
    let new = ConsoleRecord {
        issued_at: now(),
        not_after,
        addresses: issued.addresses,
    };
    let text = serde_json::to_vec(&new).map_err(|e| e.to_string())?;
    replace(
        &dir.join(CONSOLE_CERT_FILE),
        issued.certificate_pem.as_bytes(),
        0o644,
    )
    .and_then(|()| replace(&dir.join(CONSOLE_RECORD_FILE), &text, 0o644))
    .map_err(|e| format!("cannot write the console's certificate: {e}"))?;
    Ok(new)
}

/// The console certificate's side of the service's loop: what it adds to the summary,
/// whether it is healthy, and when to look again.
#[derive(Debug, Default)]
struct ConsoleKeeper {
    failures: u32,
    retry_at: i64,
    note: String,
}

impl ConsoleKeeper {
    async fn keep(
        &mut self,
        dir: &Path,
        settings: &Settings,
        record: &Record,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Option<(bool, Duration)> {
        let ip = settings.console?;
        let now = now();
        let due = match console_next(dir, ip, settings.renew_before) {
            Ok((at, r)) if now < at => {
                self.failures = 0;
                if let Err(e) = publish_console(dir, &settings.state_root) {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "cannot publish the console's certificate"
                    );
                }
                self.note = format!("; console certificate for {ip} until {}", r.not_after);
                let wait = Duration::from_secs(u64::try_from(at - now).unwrap_or(0));
                return Some((true, wait.max(Duration::from_secs(1))));
            }
            Ok(_) => "renewal due",
            Err(why) => why,
        };
        if now < self.retry_at {
            let wait = Duration::from_secs(u64::try_from(self.retry_at - now).unwrap_or(0));
            return Some((self.failures == 0, wait.max(Duration::from_secs(1))));
        }
        use tracing::Instrument as _;
        let span = tracing::info_span!("console_certificate", %ip);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Some((true, Duration::ZERO)),
            outcome = console_certificate(dir, settings, record, ip).instrument(span) => outcome,
        };
        match outcome {
            Ok(new) => {
                self.failures = 0;
                self.retry_at = 0;
                tracing::info!(
                    not_after = new.not_after,
                    "the console's certificate issued"
                );
                Some((true, Duration::ZERO))
            }
            Err(why) => {
                self.failures = self.failures.saturating_add(1);
                let backoff =
                    Duration::from_secs(1u64 << self.failures.min(12)).min(settings.check_interval);
                self.retry_at = now + i64::try_from(backoff.as_secs()).unwrap_or(i64::MAX);
                tracing::warn!(failures = self.failures, reason = %why, "the console's certificate failed");
                self.note = format!(
                    "; console certificate ({due}) failed {} times ({why}): the console serves its self-signed one",
                    self.failures
                );
                Some((false, backoff))
            }
        }
    }
}

/// Runs the identity service until shutdown.
pub async fn run(ctx: ServiceCtx, settings: Settings) -> Result<(), IdentityError> {
    let dir = ctx.state_dir.clone();
    ctx.reporter
        .status(Health::Degraded, "looking at the certificate");
    ctx.reporter.ready();
    let mut failures: u32 = 0;
    let mut console = ConsoleKeeper::default();
    // The token a refusal was for: not sent again until a new medium brings another.
    let mut refused: Option<Vec<u8>> = None;
    loop {
        // A step cut short by the shutdown asks for no wait: stop here.
        if ctx.shutdown.is_cancelled() {
            return Ok(());
        }
        let record = read_record(&dir)?;
        let now = now();
        let wait = match &record {
            None => {
                let token = std::fs::read(dir.join(enroll::TOKEN_FILE)).ok();
                match (&settings.tunnel, token) {
                    (Some(expect), Some(token)) if refused.as_ref() != Some(&token) => {
                        use tracing::Instrument as _;
                        let outcome = tokio::select! {
                            _ = ctx.shutdown.cancelled() => return Ok(()),
                            outcome = enroll::enroll(&settings.state_root, &dir, expect)
                                .instrument(tracing::info_span!("enroll")) => outcome,
                        };
                        match outcome {
                            enroll::Outcome::Enrolled { identity, .. } => {
                                failures = 0;
                                tracing::info!(%identity, "enrolled");
                                Duration::ZERO
                            }
                            enroll::Outcome::Already(_) => Duration::ZERO,
                            enroll::Outcome::Refused(why) => {
                                tracing::warn!(reason = %why, "enrollment refused");
                                ctx.reporter
                                    .status(Health::Degraded, &format!("not enrolled: {why}"));
                                refused = Some(token);
                                settings.check_interval
                            }
                            enroll::Outcome::Failed(why) => {
                                failures = failures.saturating_add(1);
                                tracing::warn!(failures, reason = %why, "enrollment failed");
                                ctx.reporter.status(
                                    Health::Degraded,
                                    &format!(
                                        "not enrolled: enrollment failed {failures} times ({why})"
                                    ),
                                );
                                Duration::from_secs(1u64 << failures.min(12))
                                    .min(settings.check_interval)
                            }
                        }
                    }
                    (_, Some(_)) if settings.tunnel.is_some() => {
                        // Refused before: kept in the status set then.
                        settings.check_interval.min(Duration::from_secs(60))
                    }
                    _ => {
                        ctx.reporter.status(
                            Health::Degraded,
                            "not enrolled: apply a provisioning medium (the box then enrolls by itself)",
                        );
                        settings.check_interval.min(Duration::from_secs(60))
                    }
                }
            }
            Some(r) if now >= r.not_after => {
                ctx.reporter.status_with_metrics(
                    Health::Degraded,
                    &format!(
                        "the certificate of {} expired at {} (Unix seconds): the box must enroll again with a new medium",
                        r.identity, r.not_after
                    ),
                    &[("identity_certificate_seconds_left", 0.0)],
                );
                settings.check_interval
            }
            Some(r) => {
                match publish(&dir, &settings.state_root) {
                    Ok(true) => tracing::info!("the box's certificate published for its services"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "cannot publish the box's certificate for its services"
                    ),
                }
                let at = renew_at(r, settings.renew_before);
                if now < at {
                    failures = 0;
                    let (console_ok, console_wait) = console
                        .keep(&dir, &settings, r, &ctx.shutdown)
                        .await
                        .unwrap_or((true, Duration::MAX));
                    let left = (r.not_after - now) as f64;
                    ctx.reporter.status_with_metrics(
                        if console_ok { Health::Ok } else { Health::Degraded },
                        &format!(
                            "{}: certificate until {} (Unix seconds), renewed {} times; renewal from {}{}",
                            r.identity, r.not_after, r.renewals, at, console.note
                        ),
                        &[("identity_certificate_seconds_left", left)],
                    );
                    Duration::from_secs(u64::try_from(at - now).unwrap_or(0))
                        .min(settings.check_interval)
                        .min(console_wait)
                        .max(if console_wait.is_zero() {
                            Duration::ZERO
                        } else {
                            Duration::from_secs(1)
                        })
                } else {
                    use tracing::Instrument as _;
                    let span = tracing::info_span!("renew", identity = %r.identity);
                    let outcome = tokio::select! {
                        _ = ctx.shutdown.cancelled() => return Ok(()),
                        outcome = renew(&dir, &settings, r).instrument(span) => outcome,
                    };
                    match outcome {
                        Ok(new) => {
                            failures = 0;
                            tracing::info!(
                                not_after = new.not_after,
                                renewals = new.renewals,
                                "certificate renewed"
                            );
                            Duration::ZERO
                        }
                        Err(why) => {
                            failures = failures.saturating_add(1);
                            tracing::warn!(failures, reason = %why, "certificate renewal failed");
                            let left = (r.not_after - now) as f64;
                            ctx.reporter.status_with_metrics(
                                Health::Degraded,
                                &format!(
                                    "{}: renewal failed {failures} times ({why}); certificate until {} (Unix seconds)",
                                    r.identity, r.not_after
                                ),
                                &[("identity_certificate_seconds_left", left)],
                            );
                            Duration::from_secs(1u64 << failures.min(12))
                                .min(settings.check_interval)
                        }
                    }
                }
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(issued_at: i64, not_after: i64) -> Record {
        Record {
            identity: "1312345678-QEMU-1".into(),
            box_serial: "QEMU-1".into(),
            issued_at,
            not_after,
            renew_url: "https://10.98.0.1:8443".into(),
            renewals: 0,
        }
    }

    #[test]
    fn renewal_starts_ten_days_or_a_third_of_the_lifetime_before_the_end() {
        let day = 86_400;
        let ten_days = Duration::from_secs(10 * 86_400);
        assert_eq!(renew_at(&record(0, 30 * day), ten_days), 20 * day);
        assert_eq!(renew_at(&record(0, 90 * day), ten_days), 80 * day);
        // Short lifetimes (tests): the last third.
        assert_eq!(renew_at(&record(1000, 1030), ten_days), 1020);
        // A record with its end before its issue renews at once.
        assert_eq!(renew_at(&record(1000, 900), ten_days), 900);
    }

    /// A server certificate for `key` naming `names`, with `server` auth or client auth.
    fn console_cert(key: &rcgen::KeyPair, names: &[&str], server: bool) -> String {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.self_signed(key).unwrap().pem()
    }

    #[test]
    fn the_consoles_certificate_counts_only_for_its_key_its_address_and_serving() {
        let ip: std::net::IpAddr = "192.168.50.1".parse().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(
            certifies_console(&console_cert(&key, &["192.168.50.1"], true), &key, ip).is_some()
        );
        assert!(
            certifies_console(&console_cert(&other, &["192.168.50.1"], true), &key, ip).is_none()
        );
        assert!(
            certifies_console(&console_cert(&key, &["192.168.50.2"], true), &key, ip).is_none()
        );
        assert!(certifies_console(&console_cert(&key, &["box.example"], true), &key, ip).is_none());
        assert!(
            certifies_console(&console_cert(&key, &["192.168.50.1"], false), &key, ip).is_none()
        );
        assert!(certifies_console("garbage", &key, ip).is_none());

        // When to ask again: none yet; then a third of its life before the end; and at once
        // when the config's address is another.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            console_next(dir.path(), ip, Duration::from_secs(10 * 86_400)),
            Err("none yet")
        );
        std::fs::write(dir.path().join(CONSOLE_KEY_FILE), key.serialize_pem()).unwrap();
        std::fs::write(
            dir.path().join(CONSOLE_CERT_FILE),
            console_cert(&key, &["192.168.50.1"], true),
        )
        .unwrap();
        assert_eq!(
            console_next(dir.path(), ip, Duration::from_secs(10 * 86_400)),
            Err("none yet")
        );
        let not_after = certifies_console(
            &std::fs::read_to_string(dir.path().join(CONSOLE_CERT_FILE)).unwrap(),
            &key,
            ip,
        )
        .unwrap();
        let record = ConsoleRecord {
            issued_at: not_after - 30 * 86_400,
            not_after,
            addresses: vec![ip],
        };
        std::fs::write(
            dir.path().join(CONSOLE_RECORD_FILE),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let (at, read) = console_next(dir.path(), ip, Duration::from_secs(10 * 86_400)).unwrap();
        assert_eq!(at, not_after - 10 * 86_400);
        assert_eq!(read, record);
        assert_eq!(
            console_next(
                dir.path(),
                "192.168.1.250".parse().unwrap(),
                Duration::from_secs(10 * 86_400)
            ),
            Err("the one there is not for the console's address")
        );
    }

    #[test]
    fn a_certificate_counts_only_for_its_own_key_and_identity() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "1312345678-QEMU-1");
        let cert = params.self_signed(&key).unwrap().pem();
        assert!(certifies(&cert, &key, "1312345678-QEMU-1").is_some());
        assert!(certifies(&cert, &other, "1312345678-QEMU-1").is_none());
        assert!(certifies(&cert, &key, "1312345678-QEMU-2").is_none());
        assert!(certifies("garbage", &key, "1312345678-QEMU-1").is_none());
        // The CSR is readable and carries the identity.
        assert!(
            csr(&key, "1312345678-QEMU-1")
                .unwrap()
                .contains("CERTIFICATE REQUEST")
        );
    }
}
