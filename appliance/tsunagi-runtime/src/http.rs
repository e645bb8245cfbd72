//! The one HTTP stack of the appliance: servers on hyper 1 (HTTP/1.1, see [`crate::metrics`]),
//! clients on reqwest (hyper underneath), configured here: async ones ([`client`]) and
//! blocking ones for worker threads ([`blocking_client_builder`]), with the same TLS,
//! proxy and timeout settings.
//!
//! A client trusts only the roots it is given, through rustls with the ring provider: no
//! built-in or system root store, so with none given it speaks plain HTTP only (the FHIR
//! server and the tunnel's health address are inside the WireGuard tunnel today) and any
//! `https` URL fails closed. It presents a client certificate only when given one (mutual
//! TLS: the SS-MIX2 WebDAV replica). Proxies from the environment are ignored. An async
//! call is cancelled by dropping it (a service stopping); a blocking call is bounded by
//! [`ClientSettings::timeout`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

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

/// The rustls configuration of every client: the ring provider, rustls' safe default
/// protocol versions, the given roots only, the given client certificate if any.
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
