//! The one HTTP stack of the appliance: servers on hyper 1 (HTTP/1.1, see [`crate::metrics`]),
//! clients on reqwest (hyper underneath), configured here: async ones ([`client`]) and
//! blocking ones for worker threads ([`blocking_client_builder`]), with the same TLS,
//! proxy and timeout settings.
//!
//! A client trusts only the roots it is given, through rustls with the ring provider: no
//! built-in or system root store, so with none given it speaks plain HTTP only (the
//! tunnel's health address is inside the WireGuard tunnel) and any `https` URL fails
//! closed. It presents a client certificate only when given one (mutual TLS: the FHIR
//! server and the SS-MIX2 WebDAV replica, with the network CA and the box's certificate,
//! loaded from PEM files by [`load_roots`] and [`load_identity`]).
//!
//! One TLS policy for every link ([`TLS_POLICY`]): TLS 1.3, or TLS 1.2 with ECDHE key
//! exchange and AEAD ciphers only (rustls offers nothing else with the ring provider; a
//! test keeps it so); the server's certificate must chain to the given roots and name the
//! host connected to (an IP address in its SAN for an address). [`tls_refusal`] turns a
//! refused handshake into a reason an operator can act on.
//!
//! Proxies from the environment are ignored. An async call is cancelled by dropping it (a
//! service stopping); a blocking call is bounded by [`ClientSettings::timeout`].

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The `User-Agent` of every client.
const USER_AGENT: &str = concat!("tsunagi/", env!("CARGO_PKG_VERSION"));

/// A client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up TLS for the HTTP client")]
    Tls(#[source] rustls::Error),
    #[error("the client certificate and its key cannot be used together")]
    ClientAuth(#[source] rustls::Error),
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
}

/// The certificate and key a client presents to servers that ask for one.
pub struct ClientIdentity {
    /// The leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> ClientIdentity {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ClientIdentity")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The CAs `https` servers are verified against (empty: plain HTTP only).
    pub roots: rustls::RootCertStore,
    /// The client certificate presented to `https` servers (`None`: none).
    pub identity: Option<ClientIdentity>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// The deadline of each request, from connecting to the end of the response (`None`:
    /// the caller's, for an async client; reqwest's 30 s for a blocking one).
    pub timeout: Option<Duration>,
    /// Keep idle connections for reuse this long (`None`: a new connection per request).
    pub keep_idle: Option<Duration>,
}

/// The TLS policy of every link, in words (status, docs): what [`tls`] configures.
pub const TLS_POLICY: &str = "TLS 1.3, or TLS 1.2 with ECDHE and AEAD ciphers only; the server verified against the network CA, name included";

/// The rustls configuration of every client: the ring provider (its cipher suites are
/// exactly [`TLS_POLICY`]'s), TLS 1.3 and 1.2, the given roots only, the given client
/// certificate if any.
fn tls(
    roots: rustls::RootCertStore,
    identity: Option<ClientIdentity>,
) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ClientError::Tls)?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(ClientError::ClientAuth),
    }
}

/// The settings every client shares, applied to reqwest's async or blocking builder (the
/// two have the same methods but no common trait).
macro_rules! configure {
    ($builder:expr, $settings:expr) => {{
        let ClientSettings {
            roots,
            identity,
            connect_timeout,
            timeout,
            keep_idle,
        } = $settings;
        let builder = $builder
            .use_preconfigured_tls(tls(roots, identity)?)
            .no_proxy()
            .http1_only()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .user_agent(USER_AGENT);
        let builder = match keep_idle {
            Some(idle) => builder.pool_idle_timeout(idle),
            None => builder.pool_max_idle_per_host(0),
        };
        match timeout {
            Some(timeout) => builder.timeout(timeout),
            None => builder,
        }
    }};
}

/// A certificate or key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read the {what} file {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the {what} file {path} holds no usable PEM {item}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        item: &'static str,
        #[source]
        source: pem::Error,
    },
    #[error("the CA file {path} holds a certificate that is not a valid trust anchor")]
    Anchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the client certificate {cert} and key {key} cannot be used together")]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bad = |source| TlsFileError::Pem {
        what,
        path: path.to_owned(),
        item: "certificate",
        source,
    };
    let bytes = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    if certs.is_empty() {
        return Err(bad(pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let what = "client key";
    let mut bytes = read_file(what, path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes);
    // The file's copy of the key does not outlive the parse.
    bytes.fill(0);
    key.map_err(|source| TlsFileError::Pem {
        what,
        path: path.to_owned(),
        item: "private key",
        source,
    })
}

/// The CA certificates of a PEM file as the only roots (the network CA).
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsFileError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in load_certs("CA", path)? {
        store.add(cert).map_err(|source| TlsFileError::Anchor {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(store)
}

/// A client certificate (the leaf first) and its key from PEM files. Whether the two
/// belong together is checked when the client is built ([`ClientError::ClientAuth`]).
pub fn load_identity(cert: &Path, key: &Path) -> Result<ClientIdentity, TlsFileError> {
    Ok(ClientIdentity {
        chain: load_certs("client certificate", cert)?,
        key: load_key(key)?,
    })
}

/// The files of a mutual-TLS link: the network CA and the box's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The network CA (PEM): the only roots.
    pub ca_file: PathBuf,
    /// The box's certificate (PEM, the leaf first) and its key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// What a set of files is now (modification time and size of each), to see a renewal.
pub type Stamp = Vec<Option<(std::time::SystemTime, u64)>>;

impl TlsFiles {
    /// What the files are now (a stat of each).
    pub fn stamp(&self) -> Stamp {
        [&self.ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .map(|path| {
                let meta = std::fs::metadata(path).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }

    /// The rustls configuration of a client with these files, under [`TLS_POLICY`] (for a
    /// link that is not HTTP: DICOM TLS).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsFileError> {
        let roots = load_roots(&self.ca_file)?;
        let identity = load_identity(&self.cert_file, &self.key_file)?;
        tls(roots, Some(identity)).map_err(|e| {
            let source = match e {
                ClientError::Tls(e) | ClientError::ClientAuth(e) => e,
                ClientError::Build(e) => rustls::Error::General(e.to_string()),
            };
            TlsFileError::ClientAuth {
                cert: self.cert_file.clone(),
                key: self.key_file.clone(),
                source,
            }
        })
    }
}

/// A client configuration from [`TlsFiles`], built again when one of them changed (a
/// renewal): a stat of each file per use. Clones share the cache.
#[derive(Debug, Clone)]
pub struct ReloadingTls {
    files: TlsFiles,
    built: Arc<std::sync::Mutex<Option<(Stamp, ReloadedConfig)>>>,
}

/// A configuration as built, or why it could not be.
pub type ReloadedConfig = Result<Arc<rustls::ClientConfig>, Arc<TlsFileError>>;

impl ReloadingTls {
    pub fn new(files: TlsFiles) -> ReloadingTls {
        ReloadingTls {
            files,
            built: Arc::default(),
        }
    }

    /// The configuration for the files as they are now.
    pub fn current(&self) -> ReloadedConfig {
        let stamp = self.files.stamp();
        // Only a cache: a panic elsewhere while it was held leaves nothing half-done.
        let mut built = self
            .built
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*built {
            Some((was, config)) if *was == stamp => config.clone(),
            _ => {
                let config = self.files.client_config().map(Arc::new).map_err(Arc::new);
                *built = Some((stamp, config.clone()));
                config
            }
        }
    }
}

/// Why a TLS handshake somewhere in `error`'s chain was refused, in words an operator can
/// act on (`None`: not a TLS refusal). rustls' error is looked for at every level, inside
/// `io::Error`s too (whose `source` skips the error they wrap).
pub fn tls_refusal(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        next = match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    None
}

/// [`tls_refusal`]'s words for one rustls error.
fn describe(error: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match error {
        E::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => {
                "the server's certificate is not from the network CA (refused)".to_owned()
            }
            C::Expired | C::ExpiredContext { .. } => {
                "the server's certificate has expired (refused)".to_owned()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (refused; is the box's clock right?)"
                    .to_owned()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server's certificate is not for the address connected to (refused)".to_owned()
            }
            C::Revoked => "the server's certificate is revoked (refused)".to_owned(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the server's certificate is not for a TLS server (refused)".to_owned()
            }
            other => format!("the server's certificate is refused: {other:?}"),
        },
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA) => {
            "the server refused the box's certificate".to_owned()
        }
        E::AlertReceived(A::CertificateExpired) => {
            "the server refused the box's certificate as expired".to_owned()
        }
        E::AlertReceived(A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity) => {
            format!("the server offers no TLS the box accepts ({TLS_POLICY})")
        }
        E::PeerIncompatible(_) => {
            format!("the server offers no TLS the box accepts ({TLS_POLICY})")
        }
        other => format!("TLS failed: {other}"),
    }
}

/// An async HTTP/1.1 client as described in the module docs.
pub fn client(settings: ClientSettings) -> Result<reqwest::Client, ClientError> {
    client_builder(settings)?
        .build()
        .map_err(ClientError::Build)
}

/// The builder of [`client`], for a caller that adds its own options (redirects, https only).
pub fn client_builder(settings: ClientSettings) -> Result<reqwest::ClientBuilder, ClientError> {
    Ok(configure!(reqwest::Client::builder(), settings))
}

/// A blocking HTTP/1.1 client's builder, configured as [`client`]'s. reqwest runs the
/// client on its own thread; building it (`build`) must not happen inside an async task
/// (it panics in debug builds): build it on a worker thread or in `spawn_blocking`.
pub fn blocking_client_builder(
    settings: ClientSettings,
) -> Result<reqwest::blocking::ClientBuilder, ClientError> {
    Ok(configure!(reqwest::blocking::Client::builder(), settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ciphers_offered_are_the_policys() {
        let provider = rustls::crypto::ring::default_provider();
        assert!(!provider.cipher_suites.is_empty());
        for suite in &provider.cipher_suites {
            let name = format!("{:?}", suite.suite());
            let aead = name.contains("_GCM_") || name.contains("CHACHA20_POLY1305");
            let ok = match suite {
                rustls::SupportedCipherSuite::Tls13(_) => name.starts_with("TLS13_") && aead,
                rustls::SupportedCipherSuite::Tls12(_) => name.starts_with("TLS_ECDHE_") && aead,
            };
            assert!(ok, "{name} is outside the policy: {TLS_POLICY}");
        }
    }

    #[test]
    fn a_refused_handshake_is_named_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As hyper hands it on: an io::Error around the one tokio-rustls made.
        let io = io::Error::other(io::Error::new(io::ErrorKind::InvalidData, tls));
        assert_eq!(
            tls_refusal(&io).as_deref(),
            Some("the server's certificate is not from the network CA (refused)")
        );
        let plain = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(tls_refusal(&plain), None);
    }

    #[tokio::test]
    async fn https_without_roots_fails_closed_and_plain_http_is_spoken() {
        let http = client(ClientSettings {
            roots: rustls::RootCertStore::empty(),
            identity: None,
            connect_timeout: Duration::from_secs(2),
            timeout: None,
            keep_idle: None,
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                if buf.starts_with(b"GET /x HTTP/1.1\r\n") {
                    let _ = s
                        .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                        .await;
                }
            }
        });
        let plain = http.get(format!("http://{addr}/x")).send().await.unwrap();
        assert_eq!(plain.status().as_u16(), 204);
        // A TLS handshake to the same port: nothing is trusted, and it is not TLS anyway.
        assert!(http.get(format!("https://{addr}/x")).send().await.is_err());
    }

    #[test]
    fn a_blocking_client_has_the_same_stack() {
        let http = blocking_client_builder(ClientSettings {
            roots: rustls::RootCertStore::empty(),
            identity: None,
            connect_timeout: Duration::from_secs(2),
            timeout: Some(Duration::from_secs(5)),
            keep_idle: None,
        })
        .unwrap()
        .build()
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            for mut s in listener.incoming().map_while(Result::ok) {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                if buf.starts_with(b"MOVE /x HTTP/1.1\r\n") {
                    let _ = s.write_all(b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\n");
                }
            }
        });
        let method = reqwest::Method::from_bytes(b"MOVE").unwrap();
        let plain = http
            .request(method.clone(), format!("http://{addr}/x"))
            .send()
            .unwrap();
        assert_eq!(plain.status().as_u16(), 201);
        assert!(
            http.request(method, format!("https://{addr}/x"))
                .send()
                .is_err()
        );
    }
}
