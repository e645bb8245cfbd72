//! The health probe through the tunnel: a plain HTTP GET that must answer 200, on the
//! appliance's one HTTP stack ([`tsunagi_runtime::http`]).

use std::time::Duration;

use tsunagi_config::HealthUrl;

/// Whether `url` answers `200` within `timeout` (a new connection each time, so a probe
/// says whether the tunnel carries a connection now).
pub(crate) async fn health(url: &HealthUrl, timeout: Duration) -> bool {
    let client = match tsunagi_runtime::http::client(tsunagi_runtime::http::ClientSettings {
        roots: rustls::RootCertStore::empty(),
        identity: None,
        connect_timeout: timeout,
        timeout: None,
        keep_idle: None,
    }) {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot build the health probe's HTTP client"
            );
            return false;
        }
    };
    let target = format!("http://{}{}", url.addr(), url.path());
    let exchange = async {
        let response = client.get(target).send().await.ok()?;
        let ok = response.status() == reqwest::StatusCode::OK;
        // Read (a bounded part of) the body so the server sees a complete exchange.
        let _ = tokio::time::timeout(Duration::from_millis(200), response.bytes()).await;
        Some(ok)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A one-shot server on loopback answering `answer` (after `delay`).
    async fn server(answer: &'static [u8], delay: Duration) -> HealthUrl {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(answer).await;
                });
            }
        });
        HealthUrl::try_from(format!("http://127.0.0.1:{port}/health")).unwrap()
    }

    #[tokio::test]
    async fn only_a_200_within_the_timeout_is_healthy() {
        let second = Duration::from_secs(1);
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
        assert!(health(&server(ok, Duration::ZERO).await, second).await);
        let old = b"HTTP/1.0 200 OK\r\n\r\nok\n";
        assert!(health(&server(old, Duration::ZERO).await, second).await);
        let missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert!(!health(&server(missing, Duration::ZERO).await, second).await);
        let garbage = b"SSH-2.0-OpenSSH\r\n";
        assert!(!health(&server(garbage, Duration::ZERO).await, second).await);
        let slow = server(ok, Duration::from_secs(3)).await;
        let started = std::time::Instant::now();
        assert!(!health(&slow, second).await);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn nobody_listening_is_unhealthy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = HealthUrl::try_from(format!("http://127.0.0.1:{port}/health")).unwrap();
        assert!(!health(&url, Duration::from_secs(1)).await);
    }
}
