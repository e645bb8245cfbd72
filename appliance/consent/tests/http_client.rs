//! Issue 13, item 4: the FHIR client's transport is a maintained HTTP stack. Answers a
//! hand-written parser got wrong (a chunk size of `ffffffffffffffff` overflowed and panicked
//! the sync task) are errors of the round, never panics; the client's limits hold.

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use consent::store::{AuditKey, Store};
use consent::sync::{Client, SyncError, round};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A raw TCP server on loopback: reads each request (head and `Content-Length` body), then
/// writes `answer` and closes.
async fn raw_server(answer: Vec<u8>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while got.len() < head_end + length {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(&answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A clinic with nothing to push: a round goes straight to the pull.
fn empty_clinic(dir: &std::path::Path) -> Mutex<Store> {
    let key = AuditKey::load_or_create(&dir.join("audit.key")).unwrap();
    Mutex::new(Store::open(&dir.join("consent.db"), fac("1312345678"), key).unwrap())
}

const OVERFLOWING_CHUNK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n\
Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n{\"resourceType\":\"Bundle\"}\r\n0\r\n\r\n";

#[tokio::test]
async fn a_chunk_size_of_ffffffffffffffff_fails_the_round_without_a_panic() {
    let addr = raw_server(OVERFLOWING_CHUNK.to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = empty_clinic(dir.path());
    let result = round(&store, &Client::new(addr, "/fhir", Duration::from_secs(5))).await;
    let Err(error) = result else {
        panic!("the round succeeded: {result:?}");
    };
    assert!(matches!(error, SyncError::Exchange { .. }), "{error:?}");
    let chain = tsunagi_runtime::child::error_chain(&error);
    assert!(
        chain.starts_with(&format!(
            "the exchange GET Patient with the FHIR server at {addr} failed: "
        )),
        "{chain}"
    );
    assert!(!chain.contains("_count"), "no query in errors: {chain}");
    // The failed pull did not refresh the cache.
    assert!(
        store
            .lock()
            .unwrap()
            .freshness(DAY)
            .unwrap()
            .last_pull
            .is_none()
    );
}

#[tokio::test]
async fn answers_are_json_or_null_and_bounded() {
    let client = |addr| Client::new(addr, "/fhir", Duration::from_secs(2));
    let empty = raw_server(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()).await;
    assert_eq!(
        client(empty).call("GET", "metadata", None).await.unwrap(),
        (204, Value::Null)
    );
    let chunked = raw_server(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    let body = serde_json::json!({"resourceType": "Patient"});
    assert_eq!(
        client(chunked)
            .call("PUT", "Patient?identifier=x", Some(&body))
            .await
            .unwrap(),
        (201, serde_json::json!({"a": 1}))
    );
    let not_json = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()).await;
    assert!(matches!(
        client(not_json).call("GET", "Consent", None).await,
        Err(SyncError::Protocol { .. })
    ));
    let mut huge = b"HTTP/1.1 200 OK\r\nContent-Length: 9000000\r\n\r\n".to_vec();
    huge.resize(huge.len() + 9_000_000, b' ');
    let huge = raw_server(huge).await;
    match client(huge).call("GET", "Consent", None).await {
        Err(SyncError::Protocol { why, .. }) => assert_eq!(why, "response too large"),
        other => panic!("{other:?}"),
    }
    let mut endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..9 {
        endless.extend_from_slice(b"100000\r\n");
        endless.resize(endless.len() + 0x10_0000, b' ');
        endless.extend_from_slice(b"\r\n");
    }
    let endless = raw_server(endless).await;
    match client(endless).call("GET", "Consent", None).await {
        Err(SyncError::Protocol { why, .. }) => assert_eq!(why, "response too large"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_silent_server_times_out_and_nobody_listening_cannot_be_reached() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    let started = std::time::Instant::now();
    let result = Client::new(silent, "/fhir", Duration::from_millis(500))
        .call("GET", "Consent", None)
        .await;
    assert!(
        matches!(result, Err(SyncError::Timeout { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(listener);
    let result = Client::new(silent, "/fhir", Duration::from_secs(2))
        .call("GET", "Consent", None)
        .await;
    assert!(
        matches!(result, Err(SyncError::Connect { .. })),
        "{result:?}"
    );
}
