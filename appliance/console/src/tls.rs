//! The console's server certificate, one of three ([`Source`]): a certificate of the
//! config's (`[console] cert-file`, `key-file`); the one the network issued at enrollment
//! for the console's address, which the identity service keeps renewed and publishes; or
//! else a self-signed one made at the first start and kept in the state directory, whose
//! SHA-256 fingerprint goes on the provisioning sheet so that the staff can tell the box's
//! page from another. [`Serving`] is the certificate being served, replaced while the
//! server runs (the network's arrives after enrollment, and is renewed).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use rustls::sign::CertifiedKey;

/// Where the served certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config's `cert-file`.
    Configured,
    /// Issued by the network at enrollment, for the console's address.
    Network,
    /// Made by the box at its first start.
    SelfSigned,
}

impl Source {
    /// For the status summary.
    pub fn words(self) -> &'static str {
        match self {
            Source::Configured => "the config's certificate",
            Source::Network => "the network's certificate",
            Source::SelfSigned => "self-signed certificate",
        }
    }
}

/// A certificate and key, loaded to serve.
#[derive(Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// SHA-256 of the leaf certificate (DER), `AB:CD:…`.
    pub fingerprint: String,
    pub source: Source,
    /// Unix seconds: the leaf's end.
    pub not_after: i64,
    /// The certificate file's bytes, to tell a new one from it.
    pub pem: Vec<u8>,
}

/// Loads `cert` and `key` (PEM) to serve: the key must be the certificate's.
pub fn load(cert: &Path, key: &Path, source: Source) -> Result<Loaded, TlsError> {
    let pem = read(cert)?;
    let chain = certs(cert)?;
    let mut key_bytes = read(key)?;
    let parsed = PrivateKeyDer::from_pem_slice(&key_bytes);
    key_bytes.fill(0);
    let private = parsed.map_err(|_| TlsError::Pem {
        path: key.to_owned(),
        what: "private key",
    })?;
    let fingerprint = fingerprint(&chain[0]);
    let not_after = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|_| TlsError::Pem {
            path: cert.to_owned(),
            what: "X.509 certificate",
        })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider).map_err(TlsError::Server)?;
    Ok(Loaded {
        key: Arc::new(certified),
        fingerprint,
        source,
        not_after,
        pem,
    })
}

/// The certificate being served; [`Serving::replace`] swaps it for the next handshakes.
#[derive(Debug)]
pub struct Serving {
    current: RwLock<Arc<Loaded>>,
}

impl Serving {
    pub fn new(loaded: Loaded) -> Serving {
        Serving {
            current: RwLock::new(Arc::new(loaded)),
        }
    }

    /// What is served now.
    pub fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Serves `loaded` from the next handshake on.
    pub fn replace(&self, loaded: Loaded) {
        let loaded = Arc::new(loaded);
        match self.current.write() {
            Ok(mut c) => *c = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
    }
}

impl rustls::server::ResolvesServerCert for Serving {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

/// The self-signed certificate and its key, in the state directory.
pub const SELF_SIGNED_CERT: &str = "console-cert.pem";
pub const SELF_SIGNED_KEY: &str = "console-key.pem";

/// Why the console has no certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path} cannot be read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} cannot be written")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no {what} in PEM")]
    Pem { path: PathBuf, what: &'static str },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
    #[error("the certificate and the key do not make a TLS server: {0}")]
    Server(#[source] rustls::Error),
}

/// The server's TLS configuration and the certificate it serves.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub serving: Arc<Serving>,
}

/// The SHA-256 fingerprint of a certificate, as browsers show it.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo, in base64: the pin a browser
/// takes (Chromium's `--ignore-certificate-errors-spki-list`, HPKP's form); `None` for
/// what is not an X.509 certificate.
pub fn spki_sha256(der: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    Some(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificate chain of a PEM file.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Makes the self-signed certificate in `dir` for `names` (IP addresses or host names),
/// unless it is there.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert, key) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let write = |path: &Path, text: String, mode| {
        tsunagi_state::replace_file(path, text.as_bytes(), mode).map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })
    };
    write(&key, made.signing_key.serialize_pem(), 0o600)?;
    write(&cert, made.cert.pem(), 0o644)?;
    Ok((cert, key))
}

/// The server configuration serving `loaded` (replaceable): TLS 1.3 or 1.2 with the ring
/// provider's suites (ECDHE, AEAD), HTTP/1.1.
pub fn server(loaded: Loaded) -> Result<ServerTls, TlsError> {
    let serving = Arc::new(Serving::new(loaded));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Server)?
        .with_no_client_auth()
        .with_cert_resolver(serving.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        serving,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_is_made_once_and_serves() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["127.0.0.1".to_owned()];
        let (cert, key) = ensure_self_signed(dir.path(), &names).unwrap();
        let first = std::fs::read(&cert).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        ensure_self_signed(dir.path(), &names).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), first);
        let tls = server(load(&cert, &key, Source::SelfSigned).unwrap()).unwrap();
        let served = tls.serving.current();
        assert_eq!(served.fingerprint.len(), 32 * 3 - 1);
        assert_eq!(served.fingerprint, fingerprint(&certs(&cert).unwrap()[0]));
        // Another certificate replaces it; a key that is not the certificate's is refused.
        let other = tempfile::tempdir().unwrap();
        let (cert2, key2) = ensure_self_signed(other.path(), &names).unwrap();
        tls.serving
            .replace(load(&cert2, &key2, Source::Network).unwrap());
        assert_eq!(tls.serving.current().source, Source::Network);
        assert_ne!(tls.serving.current().fingerprint, served.fingerprint);
        assert!(matches!(
            load(&cert2, &key, Source::Network),
            Err(TlsError::Server(_))
        ));
    }
}
