//! `tsunagi enroll`: the box's side of enrollment (issue 16), after a medium was applied
//! (`tsunagi medium apply`).
//!
//! The box makes its own keys, which never leave it: the tunnel's WireGuard key (the
//! tunnel service's, made if absent) and its TLS key (`STATE/identity/box.key`, ECDSA
//! P-256, mode 0600). It sends the medium's one-time token, its serial, the WireGuard
//! public key and a CSR to the enrollment URL of the medium, over TLS verified against the
//! network CA of the medium only ([`tsunagi_runtime::http`]: no other root, no proxy). The
//! answer must name the tunnel the clinic's config already has and carry a certificate for
//! the box's own key; then `box.pem`, `box-ca.pem` and `enrolled.json` are written (each
//! beside, flushed, renamed in) and the used token is deleted.
//!
//! Exit codes: 0 enrolled (or enrolled before), 6 refused by the server or by a check here
//! (one line says why), 1 the server could not be reached (worth trying again), 3 config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tsunagi_config::Config;
use tsunagi_medium::enroll::{
    ENROLL_PATH, EnrollRequest, Enrolled, MAX_RESPONSE, Refusal, identity, valid_box_serial,
};
use tsunagi_runtime::exit_code;

/// Where the firmware tells the box's serial.
const DMI_SERIAL: &str = "/sys/class/dmi/id/product_serial";

#[derive(Debug, clap::Args)]
pub(crate) struct EnrollArgs {
    /// The config file (the clinic's, as the medium wrote it).
    #[arg(long, env = "TSUNAGI_CONFIG", default_value = tsunagi_config::DEFAULT_CONFIG_PATH)]
    pub(crate) config: PathBuf,
    /// The box's serial (default: the firmware's, else the machine ID).
    #[arg(long)]
    pub(crate) box_serial: Option<String>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

enum Outcome {
    Enrolled(String),
    Already(String),
    Refused(String),
    Failed(String),
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The directory of the box's identity (the identity service's state directory).
fn identity_dir(state: &Path) -> PathBuf {
    state.join(identity::NAME)
}

fn box_serial(given: Option<String>) -> Result<String, String> {
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

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("{what} ({}): {}", path.display(), e.kind()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{what} ({}): {e}", path.display()))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Token {
    token: String,
    expires_at: i64,
    url: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Applied {
    /// None after a factory reset.
    facility_code: Option<String>,
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

/// The TLS key: the existing one, or a new one written with mode 0600 for the identity
/// service's user.
fn tls_key(
    path: &Path,
    owner: Option<tsunagi_runtime::privilege::Identity>,
) -> Result<rcgen::KeyPair, String> {
    match std::fs::read_to_string(path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| format!("the box's TLS key: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| format!("cannot make the box's TLS key: {e}"))?;
            identity::replace(path, key.serialize_pem().as_bytes(), 0o600)
                .and_then(|()| hand_over(&[path], owner))
                .map_err(|e| format!("cannot write the box's TLS key: {e}"))?;
            Ok(key)
        }
        Err(e) => Err(format!("the box's TLS key: {}", e.kind())),
    }
}

fn enroll(cfg: &Config, args: &EnrollArgs) -> Outcome {
    let state = cfg.paths.state_dir.as_path();
    let dir = identity_dir(state);
    let record = dir.join(identity::RECORD_FILE);
    if let Ok(Some(r)) = identity::read_record(&dir)
        && r.not_after > now()
    {
        return Outcome::Already(format!(
            "enrolled as {} (certificate until {} Unix seconds)",
            r.identity, r.not_after
        ));
    }
    let provisioning = state.join("provisioning");
    let token: Token = match read_json(
        &provisioning.join("enrollment.json"),
        "the enrollment token",
    ) {
        Ok(t) => t,
        Err(e) => {
            return Outcome::Refused(format!(
                "no enrollment token: apply a provisioning medium first ({e})"
            ));
        }
    };
    let facility_code =
        match read_json::<Applied>(&provisioning.join("applied.json"), "the medium record") {
            Ok(Applied {
                facility_code: Some(code),
            }) => code,
            Ok(Applied {
                facility_code: None,
            }) => {
                return Outcome::Refused(
                    "the box was reset and belongs to no clinic: apply a provisioning medium"
                        .into(),
                );
            }
            Err(e) => return Outcome::Refused(e),
        };
    if now() >= token.expires_at {
        return Outcome::Refused(
            "the enrollment token expired: ask the operator for a new medium".into(),
        );
    }
    let Some(tunnel) = cfg.tunnel.as_ref() else {
        return Outcome::Refused("the config has no [tunnel] section".into());
    };
    let serial = match box_serial(args.box_serial.clone()) {
        Ok(s) => s,
        Err(e) => return Outcome::Refused(e),
    };
    let wg_public = match crate::services::vpn_pubkey(cfg) {
        Ok(k) => k,
        Err(e) => return Outcome::Failed(format!("the tunnel's key: {e}")),
    };
    let owner = match service_owner() {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(e),
    };
    if let Err(e) = tsunagi_runtime::privilege::ensure_private_dir(&dir, owner) {
        return Outcome::Failed(tsunagi_runtime::child::error_chain(&e));
    }
    let key = match tls_key(&dir.join(identity::KEY_FILE), owner) {
        Ok(k) => k,
        Err(e) => return Outcome::Failed(e),
    };
    let who = identity(&facility_code, &serial);
    let csr_pem = match identity::csr(&key, &who) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let ca_path = state.join(identity::NETWORK_CA);
    let mut roots = rustls::RootCertStore::empty();
    let ca_bytes = std::fs::read(&ca_path).unwrap_or_default();
    for cert in CertificateDer::pem_slice_iter(&ca_bytes).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Outcome::Refused(format!(
            "no network CA at {}: apply a provisioning medium first",
            ca_path.display()
        ));
    }
    if !token.url.starts_with("https://") {
        return Outcome::Refused(format!("the enrollment URL {} is not https", token.url));
    }
    let client =
        tsunagi_runtime::http::blocking_client_builder(tsunagi_runtime::http::ClientSettings {
            roots,
            identity: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Some(Duration::from_secs(30)),
            keep_idle: None,
        })
        .and_then(|b| {
            b.https_only(true)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(tsunagi_runtime::http::ClientError::Build)
        });
    let client = match client {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot set up the HTTPS client: {e}")),
    };
    let request = EnrollRequest {
        token: token.token,
        facility_code: facility_code.clone(),
        box_serial: serial.clone(),
        wireguard_public_key: wg_public.clone(),
        csr_pem,
    };
    let url = format!("{}{ENROLL_PATH}", token.url.trim_end_matches('/'));
    let body = match serde_json::to_vec(&request) {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let response = match client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
    {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Failed(format!(
                "the enrollment server {} cannot be reached: {}",
                token.url,
                tsunagi_runtime::child::error_chain(&e)
            ));
        }
    };
    let status = response.status();
    let body = match read_limited(response) {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(format!("the enrollment server's answer: {e}")),
    };
    if !status.is_success() {
        let why = serde_json::from_slice::<Refusal>(&body)
            .map(|r| r.line())
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return if status.is_server_error() {
            Outcome::Failed(format!("the enrollment server failed: {why}"))
        } else {
            Outcome::Refused(format!("the enrollment server refused: {why}"))
        };
    }
    let enrolled: Enrolled = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return Outcome::Refused(format!(
                "the enrollment server's answer cannot be read: {e}"
            ));
        }
    };
    if enrolled.tunnel.address != tunnel.address.to_string()
        || enrolled.tunnel.hub_public_key != String::from(tunnel.hub_public_key.clone())
    {
        return Outcome::Refused(format!(
            "the hub's tunnel settings ({} with hub key {}) are not the config's ({} with hub key {}): the medium and the hub disagree",
            enrolled.tunnel.address,
            enrolled.tunnel.hub_public_key,
            tunnel.address,
            String::from(tunnel.hub_public_key.clone())
        ));
    }
    let Some(not_after) = identity::certifies(&enrolled.certificate_pem, &key, &who)
        .filter(|_| enrolled.identity == who)
    else {
        return Outcome::Refused(
            "the enrollment server's certificate is not for this box's key and identity".into(),
        );
    };
    if !enrolled.renew_url.starts_with("https://") {
        return Outcome::Refused(format!(
            "the enrollment server's renewal URL {} is not https",
            enrolled.renew_url
        ));
    }
    let cert = dir.join(identity::CERT_FILE);
    let ca = dir.join(identity::CA_FILE);
    let written = identity::replace(&cert, enrolled.certificate_pem.as_bytes(), 0o644)
        .and_then(|()| identity::replace(&ca, enrolled.box_ca_pem.as_bytes(), 0o644))
        .and_then(|()| {
            let r = identity::Record {
                identity: enrolled.identity.clone(),
                box_serial: serial,
                issued_at: now(),
                not_after,
                renew_url: enrolled.renew_url.clone(),
                renewals: 0,
            };
            let text = serde_json::to_vec(&r).map_err(std::io::Error::other)?;
            identity::replace(&record, &text, 0o644)
        })
        .and_then(|()| hand_over(&[&cert, &ca, &record], owner))
        .and_then(|()| std::fs::remove_file(provisioning.join("enrollment.json")));
    if let Err(e) = written {
        return Outcome::Failed(format!("cannot record the enrollment: {e}"));
    }
    Outcome::Enrolled(format!(
        "enrolled as {} (certificate until {} Unix seconds; tunnel {} with WireGuard key {wg_public})",
        enrolled.identity, enrolled.not_after, enrolled.tunnel.address
    ))
}

fn read_limited(response: reqwest::blocking::Response) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut body = Vec::new();
    let limit = u64::try_from(MAX_RESPONSE).unwrap_or(u64::MAX) + 1;
    response
        .take(limit)
        .read_to_end(&mut body)
        .map_err(|e| e.to_string())?;
    if body.len() > MAX_RESPONSE {
        return Err(format!("over {MAX_RESPONSE} bytes"));
    }
    Ok(body)
}

/// Runs `tsunagi enroll`; the exit code.
pub(crate) fn run(cfg: &Config, args: &EnrollArgs) -> u8 {
    let (verdict, text, code) = match enroll(cfg, args) {
        Outcome::Enrolled(t) => ("enrolled", t, exit_code::OK),
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
