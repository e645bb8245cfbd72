//! The one HTTP stack of the appliance: servers on hyper 1 (HTTP/1.1, see [`crate::metrics`]),
//! async clients on reqwest (hyper underneath), built here.
//!
//! A client trusts only the roots it is given, through rustls with the ring provider: no
//! built-in or system root store, so with none given it speaks plain HTTP only (the FHIR
//! server and the tunnel's health address are inside the WireGuard tunnel today) and any
//! `https` URL fails closed. Proxies from the environment are ignored. Every call is async,
//! so dropping it (a service stopping) cancels it.

use std::sync::Arc;
use std::time::Duration;

/// A client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up TLS for the HTTP client")]
    Tls(#[source] rustls::Error),
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The CAs `https` servers are verified against (empty: plain HTTP only).
    pub roots: rustls::RootCertStore,
    /// How long connecting may take (each request's own deadline is the caller's).
    pub connect_timeout: Duration,
    /// Keep idle connections for reuse this long (`None`: a new connection per request).
    pub keep_idle: Option<Duration>,
}

/// An HTTP/1.1 client as described in the module docs.
pub fn client(settings: ClientSettings) -> Result<reqwest::Client, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ClientError::Tls)?
        .with_root_certificates(settings.roots)
        .with_no_client_auth();
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .http1_only()
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .user_agent(concat!("tsunagi/", env!("CARGO_PKG_VERSION")));
    let builder = match settings.keep_idle {
        Some(idle) => builder.pool_idle_timeout(idle),
        None => builder.pool_max_idle_per_host(0),
    };
    builder.build().map_err(ClientError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn https_without_roots_fails_closed_and_plain_http_is_spoken() {
        let http = client(ClientSettings {
            roots: rustls::RootCertStore::empty(),
            connect_timeout: Duration::from_secs(2),
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
}
