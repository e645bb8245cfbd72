//! The health probe through the tunnel: a plain HTTP GET that must answer 200.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tsunagi_config::HealthUrl;

/// Whether `url` answers `200` within `timeout`.
pub(crate) async fn health(url: &HealthUrl, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, get(url))
        .await
        .unwrap_or(false)
}

async fn get(url: &HealthUrl) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(url.addr()).await else {
        return false;
    };
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: tsunagi-tunnel\r\n\r\n",
        url.path(),
        url.addr().ip()
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match stream.read(&mut head[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let head = &head[..got];
    head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200")
}
