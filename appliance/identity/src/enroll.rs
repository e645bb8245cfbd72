//! Enrollment (issue 16): the box's first certificate, and the hub's WireGuard peer for its
//! key, from the medium's one-time token. The identity service runs it by itself once a
//! medium was applied (no manual step); `tsunagi enroll` runs the same by hand.
//!
//! What `tsunagi medium apply` (root) leaves for it: the token in the identity service's own
//! directory ([`TOKEN_FILE`], mode 0600, its user's), the network CA
//! ([`crate::NETWORK_CA`]), and the box's public facts ([`BOX_FILE`]: its serial, read from
//! the firmware while root could, and the tunnel's WireGuard public key, the tunnel's
//! private key made then). The TLS key is made here ([`crate::KEY_FILE`], 0600) and never
//! leaves the box. The request goes to the token's URL over TLS verified against the
//! network CA only (no other root, no proxy, no redirect); the answer must name the tunnel
//! the config has and carry a certificate for the box's own key and identity. Then the
//! certificate, the box-identity CA and the record are written (each beside, flushed,
//! renamed in; the record last) and the spent token is deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tsunagi_medium::enroll::{ENROLL_PATH, EnrollRequest, Enrolled, MAX_RESPONSE, Refusal};

use crate::{CA_FILE, CERT_FILE, KEY_FILE, NETWORK_CA, RECORD_FILE, Record, replace};

/// The one-time token, in the identity service's directory.
pub const TOKEN_FILE: &str = "enrollment.json";
/// The box's public facts for enrollment ([`BoxFacts`]), relative to the state root.
pub const BOX_FILE: &str = "provisioning/box.json";
/// What the box applied last, relative to the state root (its clinic).
pub const APPLIED_FILE: &str = "provisioning/applied.json";

/// The medium's token, as `tsunagi medium apply` writes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Token {
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// The enrollment server, `https://...`.
    pub url: String,
}

/// The box's public facts, as `tsunagi medium apply` writes them (mode 0644).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BoxFacts {
    pub box_serial: String,
    pub wireguard_public_key: String,
}

/// What the answer must match: the tunnel of the clinic's config.
#[derive(Debug, Clone)]
pub struct Expect {
    /// `A.B.C.D/N`, as the config has it.
    pub tunnel_address: String,
    pub hub_public_key: String,
}

/// How an enrollment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enrolled now; what to say.
    Enrolled { identity: String, text: String },
    /// Enrolled before (a record with an unexpired certificate).
    Already(String),
    /// Nothing to do until something changes (no token, a spent or expired one, a refusal
    /// by the server): one line why.
    Refused(String),
    /// Worth trying again (the server unreachable, or failing).
    Failed(String),
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("{what} ({}): {}", path.display(), e.kind()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{what} ({}): {e}", path.display()))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Applied {
    /// None after a factory reset.
    facility_code: Option<String>,
}

/// Whether the identity directory holds a token.
pub fn has_token(dir: &Path) -> bool {
    dir.join(TOKEN_FILE).is_file()
}

/// The TLS key: the existing one, or a new one written with mode 0600 (the caller's user:
/// the service's, or root's, which `tsunagi enroll` then hands over). Whether it was made.
pub fn tls_key(path: &Path) -> Result<(rcgen::KeyPair, bool), String> {
    match std::fs::read_to_string(path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem)
            .map(|k| (k, false))
            .map_err(|e| format!("the box's TLS key: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| format!("cannot make the box's TLS key: {e}"))?;
            replace(path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(|e| format!("cannot write the box's TLS key: {e}"))?;
            Ok((key, true))
        }
        Err(e) => Err(format!("the box's TLS key: {}", e.kind())),
    }
}

/// The files an enrollment writes in the identity directory (for `tsunagi enroll` to hand
/// to the service's user).
pub fn written(dir: &Path) -> [PathBuf; 4] {
    [
        dir.join(KEY_FILE),
        dir.join(CERT_FILE),
        dir.join(CA_FILE),
        dir.join(RECORD_FILE),
    ]
}

/// Enrolls the box whose state root is `state` and identity directory `dir`.
pub async fn enroll(state: &Path, dir: &Path, expect: &Expect) -> Outcome {
    if let Ok(Some(r)) = crate::read_record(dir)
        && r.not_after > crate::now()
    {
        return Outcome::Already(format!(
            "enrolled as {} (certificate until {} Unix seconds)",
            r.identity, r.not_after
        ));
    }
    let token: Token = match read_json(&dir.join(TOKEN_FILE), "the enrollment token") {
        Ok(t) => t,
        Err(e) => {
            return Outcome::Refused(format!(
                "no enrollment token: apply a provisioning medium first ({e})"
            ));
        }
    };
    let facility_code = match read_json::<Applied>(&state.join(APPLIED_FILE), "the medium record") {
        Ok(Applied {
            facility_code: Some(code),
        }) => code,
        Ok(Applied {
            facility_code: None,
        }) => {
            return Outcome::Refused(
                "the box was reset and belongs to no clinic: apply a provisioning medium".into(),
            );
        }
        Err(e) => return Outcome::Refused(e),
    };
    let facts: BoxFacts = match read_json(&state.join(BOX_FILE), "the box's serial and keys") {
        Ok(f) => f,
        Err(e) => return Outcome::Refused(format!("apply the provisioning medium again: {e}")),
    };
    if crate::now() >= token.expires_at {
        return Outcome::Refused(
            "the enrollment token expired: ask the operator for a new medium".into(),
        );
    }
    if !token.url.starts_with("https://") {
        return Outcome::Refused(format!("the enrollment URL {} is not https", token.url));
    }
    let (key, _) = match tls_key(&dir.join(KEY_FILE)) {
        Ok(k) => k,
        Err(e) => return Outcome::Failed(e),
    };
    let who = tsunagi_medium::enroll::identity(&facility_code, &facts.box_serial);
    let csr_pem = match crate::csr(&key, &who) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let ca_path = state.join(NETWORK_CA);
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
    let client = tsunagi_runtime::http::client_builder(tsunagi_runtime::http::ClientSettings {
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
        box_serial: facts.box_serial.clone(),
        wireguard_public_key: facts.wireguard_public_key.clone(),
        csr_pem,
    };
    let body = match serde_json::to_vec(&request) {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let url = format!("{}{ENROLL_PATH}", token.url.trim_end_matches('/'));
    let mut response = match client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
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
    let mut bytes = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() > MAX_RESPONSE {
                    return Outcome::Failed(format!(
                        "the enrollment server's answer is over {MAX_RESPONSE} bytes"
                    ));
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Outcome::Failed(format!("the enrollment server's answer: {e}"));
            }
        }
    }
    if !status.is_success() {
        let why = serde_json::from_slice::<Refusal>(&bytes)
            .map(|r| r.line())
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return if status.is_server_error() {
            Outcome::Failed(format!("the enrollment server failed: {why}"))
        } else {
            Outcome::Refused(format!("the enrollment server refused: {why}"))
        };
    }
    let enrolled: Enrolled = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            return Outcome::Refused(format!(
                "the enrollment server's answer cannot be read: {e}"
            ));
        }
    };
    if enrolled.tunnel.address != expect.tunnel_address
        || enrolled.tunnel.hub_public_key != expect.hub_public_key
    {
        return Outcome::Refused(format!(
            "the hub's tunnel settings ({} with hub key {}) are not the config's ({} with hub key {}): the medium and the hub disagree",
            enrolled.tunnel.address,
            enrolled.tunnel.hub_public_key,
            expect.tunnel_address,
            expect.hub_public_key
        ));
    }
    let Some(not_after) = crate::certifies(&enrolled.certificate_pem, &key, &who)
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
    let record = Record {
        identity: enrolled.identity.clone(),
        box_serial: facts.box_serial,
        issued_at: crate::now(),
        not_after,
        renew_url: enrolled.renew_url.clone(),
        renewals: 0,
    };
    let stored = replace(
        &dir.join(CERT_FILE),
        enrolled.certificate_pem.as_bytes(),
        0o644,
    )
    .and_then(|()| replace(&dir.join(CA_FILE), enrolled.box_ca_pem.as_bytes(), 0o644))
    .and_then(|()| {
        let text = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        replace(&dir.join(RECORD_FILE), &text, 0o644)
    })
    .and_then(|()| std::fs::remove_file(dir.join(TOKEN_FILE)));
    if let Err(e) = stored {
        return Outcome::Failed(format!("cannot record the enrollment: {e}"));
    }
    Outcome::Enrolled {
        identity: enrolled.identity.clone(),
        text: format!(
            "enrolled as {} (certificate until {} Unix seconds; tunnel {} with WireGuard key {})",
            enrolled.identity,
            enrolled.not_after,
            enrolled.tunnel.address,
            facts.wireguard_public_key
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> Expect {
        Expect {
            tunnel_address: "10.99.0.2/24".into(),
            hub_public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Each thing a medium leaves missing or spent is a refusal with its reason, decided
    /// before anything is sent (no server here) and before a key is made.
    #[tokio::test]
    async fn what_the_medium_left_is_checked_before_anything_is_sent() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join(crate::NAME);
        let refused = |o: Outcome| match o {
            Outcome::Refused(why) => why,
            other => panic!("not refused: {other:?}"),
        };
        let why = refused(enroll(state.path(), &dir, &expect()).await);
        assert!(
            why.starts_with("no enrollment token: apply a provisioning medium first"),
            "{why}"
        );
        let token = |expires_at: i64, url: &str| {
            serde_json::to_string(&Token {
                token: "t".into(),
                expires_at,
                url: url.into(),
            })
            .unwrap()
        };
        let later = crate::now() + 3600;
        write(
            &dir.join(TOKEN_FILE),
            &token(later, "https://192.0.2.7:8443"),
        );
        let why = refused(enroll(state.path(), &dir, &expect()).await);
        assert!(why.contains("the medium record"), "{why}");
        write(
            &state.path().join(APPLIED_FILE),
            r#"{"serial":2,"facility-code":null,"applied-at":1}"#,
        );
        let why = refused(enroll(state.path(), &dir, &expect()).await);
        assert!(
            why.contains("the box was reset and belongs to no clinic"),
            "{why}"
        );
        write(
            &state.path().join(APPLIED_FILE),
            r#"{"serial":3,"facility-code":"1312345678","applied-at":1}"#,
        );
        let why = refused(enroll(state.path(), &dir, &expect()).await);
        assert!(why.contains("apply the provisioning medium again"), "{why}");
        write(
            &state.path().join(BOX_FILE),
            r#"{"box-serial":"QEMU-1","wireguard-public-key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="}"#,
        );
        write(
            &dir.join(TOKEN_FILE),
            &token(crate::now() - 1, "https://192.0.2.7:8443"),
        );
        let why = refused(enroll(state.path(), &dir, &expect()).await);
        assert!(why.contains("the enrollment token expired"), "{why}");
        write(
            &dir.join(TOKEN_FILE),
            &token(later, "http://192.0.2.7:8443"),
        );
        let why = refused(enroll(state.path(), &dir, &expect()).await);
        assert!(why.contains("is not https"), "{why}");
        assert!(!dir.join(KEY_FILE).exists());
        // With everything but the network CA: the key is made (0600), nothing is sent.
        write(
            &dir.join(TOKEN_FILE),
            &token(later, "https://192.0.2.7:8443"),
        );
        let why = refused(enroll(state.path(), &dir, &expect()).await);
        assert!(why.contains("no network CA"), "{why}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(dir.join(TOKEN_FILE).exists());
    }
}
