//! The provisioning medium (issue 16): what the operator's `tsunagi-provision medium` writes
//! to a USB stick or a directory, and what the box checks before it applies anything from
//! it.
//!
//! A medium is two files: [`BUNDLE_FILE`], the bundle as JSON ([`Bundle`]: the clinic's
//! config, the hub's WireGuard key and endpoint, the tunnel address, the hub's CA, a
//! one-time enrollment token and its expiry, a serial, and, for a clinic whose config
//! enables the console, the hash of its first administrator's setup code), and
//! [`SIGNATURE_FILE`], the
//! Ed25519 signature of exactly those bytes by the network's provisioning key, in base64.
//! No box secret is on it: the box makes its own keys.
//!
//! [`verify`] is the box's whole decision, before any field is used: signed by the
//! network's key (built into the image), then well formed, of a known format, for this box's
//! clinic (once it has one), not expired, with a serial newer than the last one applied,
//! and a config that `tsunagi-config` accepts. Each refusal is one line ([`Refused`]).
#![forbid(unsafe_code)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// The label of a medium's file system, which the box looks for (a FAT label has 11
/// characters at most, so that a USB stick as it comes, FAT-formatted, can carry it).
pub const LABEL: &str = "TSUNAGI-PRV";
/// The bundle's file on a medium.
pub const BUNDLE_FILE: &str = "tsunagi-provisioning.json";
/// The signature's file on a medium.
pub const SIGNATURE_FILE: &str = "tsunagi-provisioning.sig";
/// The bundle format this code writes and reads.
pub const FORMAT: u32 = 1;
/// A bundle's size, at most (a config and a CA certificate).
pub const MAX_BUNDLE: usize = 256 * 1024;

/// What a medium asks of the box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Provision the box for the clinic (or re-provision it, with a newer serial).
    Provision,
    /// Factory reset: wipe the data partition, back to un-enrolled.
    Reset,
}

/// The hub, as the box reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Hub {
    /// The hub's WireGuard public key (base64 of 32 bytes).
    pub public_key: String,
    /// `HOST:PORT` of the hub's WireGuard endpoint.
    pub endpoint: String,
    /// The box's address inside the tunnel, allocated to the clinic (`10.98.1.2/32`).
    pub tunnel_address: String,
    /// The network's CA certificate (PEM), which the box pins for enrollment and TLS.
    pub ca_pem: String,
}

/// A one-time enrollment token: used once, bound to the clinic, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Enrollment {
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// The enrollment server, reached over TLS pinned to `hub.ca-pem`.
    pub url: String,
}

/// The clinic console's first administrator (issue 19): the hash of the one-time setup
/// code. The code itself is never on the medium: the operator hands it to the clinic on the
/// provisioning sheet, so that a lost stick does not open the console. Carried only when
/// the medium's config enables the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsoleSetup {
    /// Argon2id, as a PHC string (`$argon2id$v=19$m=...`).
    pub code_hash: String,
    /// Until when the code may be used (Unix seconds).
    pub expires_at: i64,
}

/// A [`ConsoleSetup::code_hash`]'s length, at most.
pub const MAX_CODE_HASH: usize = 256;

/// The signed bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Bundle {
    pub format: u32,
    pub kind: Kind,
    /// Increases with every medium the network issues: a box applies only a serial newer
    /// than the last one it applied.
    pub serial: u64,
    /// Unix seconds.
    pub issued_at: i64,
    /// The medium is refused from this time on (Unix seconds).
    pub expires_at: i64,
    /// The clinic's 医療機関コード.
    pub facility_code: String,
    pub clinic_name: String,
    /// The clinic's `tsunagi.toml` (for `reset`, empty).
    pub config: String,
    pub hub: Option<Hub>,
    pub enrollment: Option<Enrollment>,
    /// The clinic's own secrets the config names (not the box's: it makes those itself),
    /// by the config's dotted key (`ssmix2.share.password-file`: the EMR server's
    /// read-only account). Only the keys of [`MEDIUM_SECRETS`]; each lands at the path the
    /// config gives, 0600, for the service that reads it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub secrets: std::collections::BTreeMap<String, String>,
    /// The console's first administrator's setup code, hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_setup: Option<ConsoleSetup>,
}

/// The secret files a medium may carry, by the config's dotted key, with the user of the
/// service that reads each one (`None`: root, e.g. the share's mount). The box's own keys
/// (the tunnel's private key, the TLS key) are never among them: the box makes them.
pub const MEDIUM_SECRETS: &[(&str, Option<&str>)] = &[
    ("ssmix2.share.password-file", None),
    ("tunnel.preshared-key-file", Some("tsunagi-tunnel")),
];

/// A secret's size, at most.
pub const MAX_SECRET: usize = 4096;

/// Why a medium is refused: one line each, for the console, the serial log and the audit
/// record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the medium is not signed (no {SIGNATURE_FILE})")]
    Unsigned,
    #[error(
        "the medium's signature does not verify against the network's provisioning key (tampered, or signed by another key)"
    )]
    BadSignature,
    #[error("the medium is larger than {MAX_BUNDLE} bytes")]
    TooLarge,
    #[error("the medium is signed but cannot be read: {0}")]
    Malformed(String),
    #[error("the medium's format {0} is not one this box knows ({FORMAT})")]
    UnknownFormat(u32),
    #[error("the medium expired at {expired} (Unix seconds; the box's clock says {now})")]
    Expired { expired: i64, now: i64 },
    #[error("the medium is for clinic {medium}, this box belongs to clinic {this_box}")]
    OtherClinic { medium: String, this_box: String },
    #[error(
        "the medium's serial {serial} is older than the last one applied ({last}): a medium is applied once"
    )]
    NotNewer { serial: u64, last: u64 },
    /// Not a refusal to report: the medium applied last, still attached (authentic, for
    /// this clinic, the same serial). Nothing to do.
    #[error("the medium's serial {0} is the one applied last: nothing to do")]
    AlreadyApplied(u64),
    #[error("the medium's config is refused: {0}")]
    Config(String),
    #[error(
        "the medium's enrollment token expired at {expired} (Unix seconds; the box's clock says {now}): ask the network operator for a new medium"
    )]
    TokenExpired { expired: i64, now: i64 },
    #[error(
        "the medium carries a secret for {0}, which a medium may not set or the config does not name"
    )]
    Secret(String),
    #[error("the medium's console setup code is refused: {0}")]
    ConsoleSetup(String),
}

/// What the box knows when it checks a medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect<'a> {
    /// The clinic the box belongs to, once it has applied a medium.
    pub facility_code: Option<&'a str>,
    /// The serial of the last medium applied.
    pub last_serial: Option<u64>,
    /// Unix seconds.
    pub now: i64,
}

/// The Ed25519 signature of `bundle` (the exact bytes of [`BUNDLE_FILE`]) by `key`, as the
/// text of [`SIGNATURE_FILE`].
pub fn sign(bundle: &[u8], key: &ring::signature::Ed25519KeyPair) -> String {
    let mut text = B64.encode(key.sign(bundle).as_ref());
    text.push('\n');
    text
}

/// A public key as the image carries it: base64 of its 32 bytes.
pub fn public_key_text(key: &ring::signature::Ed25519KeyPair) -> String {
    use ring::signature::KeyPair as _;
    B64.encode(key.public_key().as_ref())
}

/// Checks a medium: `bundle` (the bytes of [`BUNDLE_FILE`]), `signature` (the text of
/// [`SIGNATURE_FILE`], `None` if absent) against `network_key` (base64 of the network's
/// provisioning public key) and what the box knows. The bundle, only when every check
/// holds.
pub fn verify(
    bundle: &[u8],
    signature: Option<&str>,
    network_key: &str,
    expect: Expect<'_>,
) -> Result<Bundle, Refused> {
    let signature = signature.ok_or(Refused::Unsigned)?;
    if bundle.len() > MAX_BUNDLE {
        return Err(Refused::TooLarge);
    }
    let key = B64
        .decode(network_key.trim())
        .map_err(|_| Refused::BadSignature)?;
    let signature = B64
        .decode(signature.trim())
        .map_err(|_| Refused::BadSignature)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(bundle, &signature)
        .map_err(|_| Refused::BadSignature)?;
    // Signed: now the bytes may be read.
    let format: serde_json::Value =
        serde_json::from_slice(bundle).map_err(|e| Refused::Malformed(e.to_string()))?;
    match format.get("format").and_then(serde_json::Value::as_u64) {
        Some(f) if f == u64::from(FORMAT) => {}
        Some(f) => return Err(Refused::UnknownFormat(u32::try_from(f).unwrap_or(u32::MAX))),
        None => return Err(Refused::Malformed("no format".to_owned())),
    }
    let b: Bundle =
        serde_json::from_value(format).map_err(|e| Refused::Malformed(e.to_string()))?;
    if let Some(this_box) = expect.facility_code
        && this_box != b.facility_code
    {
        return Err(Refused::OtherClinic {
            medium: b.facility_code.clone(),
            this_box: this_box.to_owned(),
        });
    }
    // Before the expiry: a medium left attached after it was applied is that, whatever
    // its age.
    match expect.last_serial {
        Some(last) if b.serial == last => return Err(Refused::AlreadyApplied(b.serial)),
        Some(last) if b.serial < last => {
            return Err(Refused::NotNewer {
                serial: b.serial,
                last,
            });
        }
        _ => {}
    }
    if expect.now >= b.expires_at {
        return Err(Refused::Expired {
            expired: b.expires_at,
            now: expect.now,
        });
    }
    if b.kind == Kind::Provision {
        let cfg = tsunagi_config::parse(&b.config, std::path::Path::new(BUNDLE_FILE))
            .map_err(|p| Refused::Config(first_line(&p.to_string())))?;
        if cfg.site.facility_code.as_str() != b.facility_code {
            return Err(Refused::Config(format!(
                "its site.facility-code {} is not the medium's clinic {}",
                cfg.site.facility_code.as_str(),
                b.facility_code
            )));
        }
        if b.hub.is_none() {
            return Err(Refused::Malformed("no hub".to_owned()));
        }
        let named = cfg.secret_files();
        for (key, value) in &b.secrets {
            let allowed = MEDIUM_SECRETS.iter().any(|(k, _)| k == key);
            if !allowed || !named.iter().any(|(k, _)| k == key) || value.len() > MAX_SECRET {
                return Err(Refused::Secret(key.clone()));
            }
        }
        if let Some(e) = &b.enrollment
            && expect.now >= e.expires_at
        {
            return Err(Refused::TokenExpired {
                expired: e.expires_at,
                now: expect.now,
            });
        }
        if let Some(c) = &b.console_setup {
            if !cfg.console.enabled {
                return Err(Refused::ConsoleSetup(
                    "the medium's config does not enable the console".to_owned(),
                ));
            }
            if !c.code_hash.starts_with("$argon2id$") || c.code_hash.len() > MAX_CODE_HASH {
                return Err(Refused::ConsoleSetup("not an Argon2id hash".to_owned()));
            }
            if expect.now >= c.expires_at {
                return Err(Refused::ConsoleSetup(format!(
                    "it expired at {} (Unix seconds; the box's clock says {})",
                    c.expires_at, expect.now
                )));
            }
        }
    } else if !b.secrets.is_empty() || b.console_setup.is_some() {
        return Err(Refused::Malformed(
            "a reset medium carries secrets or a console setup code".to_owned(),
        ));
    }
    Ok(b)
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .to_owned()
}

pub mod enroll;
pub mod setup_code;

#[cfg(test)]
mod tests;
