//! Issue 13, item 4, through the real supervisor: a FHIR answer that overflowed the old
//! hand-written chunk parser (a chunk size of `ffffffffffffffff`) panicked the consent
//! service's sync task, which died silently while the cache went stale. Now the round fails,
//! `tsunagi status` shows why, and the service keeps running and retrying.
#![expect(
    clippy::disallowed_methods,
    reason = "the shared harness polls real processes from plain threads"
)]

mod common;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use common::*;

/// A raw TCP server that answers every request with `answer` (after reading its head).
fn raw_server(answer: &'static [u8]) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(answer);
            });
        }
    });
    port
}

#[test]
fn an_overflowing_chunk_size_is_a_sync_failure_in_status_not_a_dead_task() {
    let port = raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n\
          ffffffffffffffff\r\n{\"resourceType\":\"Bundle\"}\r\n0\r\n\r\n",
    );
    // No patient registered: nothing to push, so every round starts with the pull.
    let mut h = Harness::new(&format!(
        "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\nfhir-url = \"http://127.0.0.1:{port}/fhir\"\npull-interval = \"1s\"\n"
    ));
    h.start();
    let failed = format!(
        "last sync failed: the exchange GET Patient with the FHIR server at 127.0.0.1:{port} failed: "
    );
    let status = h.wait_for("the failed pull in status", Duration::from_secs(30), |s| {
        service(s, "consent")["summary"]
            .as_str()
            .is_some_and(|t| t.contains(&failed))
    });
    let pid = pid_of(&status, "consent").unwrap();
    // Rounds go on failing the same way, in the same process: nothing died.
    std::thread::sleep(Duration::from_secs(3));
    let later = h.status().unwrap();
    let consent = service(&later, "consent");
    assert_eq!(state_of(&later, "consent"), "ready", "{consent:#}");
    assert_eq!(pid_of(&later, "consent"), Some(pid), "{consent:#}");
    assert_eq!(consent["restarts"], 0, "{consent:#}");
    assert_eq!(consent["health"], "degraded", "{consent:#}");
    let summary = consent["summary"].as_str().unwrap();
    assert!(summary.contains(&failed), "{summary}");
    assert!(
        summary.contains("never synced with the network"),
        "{summary}"
    );
    assert!(
        !h.log.lock().unwrap().contains("panicked"),
        "{}",
        h.log.lock().unwrap()
    );
    h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

#[test]
fn sigterm_during_a_hanging_pull_stops_the_consent_service_within_2_s() {
    // The network's FHIR server accepts and never answers: a round waits for its timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    // A stop deadline well beyond 2 s, so a service that hangs shows as a slow exit.
    let supervisor = FAST_SUPERVISOR.replace("stop-timeout = \"2s\"", "stop-timeout = \"8s\"");
    let mut h = Harness::new(&format!(
        "{supervisor}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\nfhir-url = \"http://127.0.0.1:{port}/fhir\"\npull-interval = \"1s\"\n"
    ));
    h.start();
    h.wait_for("consent ready", Duration::from_secs(30), |s| {
        state_of(s, "consent") == "ready"
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no pull started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
    let log = h.log.lock().unwrap();
    assert!(!log.contains("did not stop in time"), "{log}");
}

/// Issue 17: the consent service syncs over mutual TLS with files it reads after dropping
/// privileges, and a FHIR server whose certificate has expired is named in status as the
/// reason the sync fails; the service keeps running and retrying, and the refusal reaches
/// a real rsyslog as one Security Alert (Node Authentication), however many retries.
#[test]
fn the_consent_sync_over_tls_names_a_refused_server_in_status() {
    use hil_tests::nginx::{Nginx, Options, Pki};
    // An empty network: every search answers an empty searchset.
    let port = raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 65\r\nConnection: close\r\n\r\n\
          {\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":0,\"entry\":[]}",
    );
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let dir = tempfile::tempdir().unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let expired = network
        .issue_server("expired", &[std::net::Ipv4Addr::LOCALHOST], true)
        .unwrap();
    let front = |server_cert| {
        Nginx::start_for_test_with(&Options {
            pki: Some(network.clone()),
            proxy_to: Some(upstream),
            server_cert,
            ..Options::default()
        })
    };
    let (good, bad) = (front(None), front(Some(expired)));

    let (rsyslog, audit, _audit_files) = audit_repository(None, None);
    let mut h = Harness::new("");
    // The network CA and the box's certificate and key, the key readable by the consent
    // service's user only.
    let (ca, cert, key) = service_tls_files(
        &h.dir.path().join("tls"),
        consent::USER,
        &network.ca_cert(),
        &network.client_cert(),
        &network.client_key(),
    );
    let config = |front: &Nginx| {
        format!(
            "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = false\n\n[consent]\nenabled = true\nfhir-url = \"https://{}/fhir\"\nca-file = \"{}\"\nclient-cert-file = \"{}\"\nclient-key-file = \"{}\"\npull-interval = \"1s\"\n{audit}",
            front.addr(),
            ca.display(),
            cert.display(),
            key.display(),
        )
    };
    h.write_config(&config(&bad));
    h.start();
    let refused = format!(
        "last sync failed: TLS with the FHIR server at {} failed: the server's certificate has expired (refused)",
        bad.addr()
    );
    let status = h.wait_for(
        "the refused server in status",
        Duration::from_secs(30),
        |s| {
            service(s, "consent")["summary"]
                .as_str()
                .is_some_and(|t| t.contains(&refused))
        },
    );
    let consent = service(&status, "consent");
    assert_eq!(consent["health"], "degraded", "{consent:#}");
    assert_eq!(consent["restarts"], 0, "{consent:#}");
    assert!(bad.access_log().trim().is_empty(), "{}", bad.access_log());
    // The refusal at the repository: a Security Alert (110113) of Node Authentication
    // (110126) naming the server, once however many pulls were refused.
    let peer = format!("ParticipantObjectID=\"{}\"", bad.addr());
    let alert = |m: &String| m.contains("csd-code=\"110126\"") && m.contains(&peer);
    let messages = audit_messages_until(
        &rsyslog,
        "the refused FHIR server",
        Duration::from_secs(30),
        |ms| ms.iter().any(alert),
    );
    let message = messages.iter().find(|m| alert(m)).unwrap();
    assert!(message.contains("csd-code=\"110113\""), "{message}");
    assert!(message.contains("expired"), "{message}");
    // Several more pulls (one a second), each refused.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(rsyslog.messages().iter().filter(|m| alert(m)).count(), 1);
    h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());

    // The same box with the network's own server: the pull goes through (the cache is
    // fresh; the raw server's answer is no AuditEvent, so the round's checkpoint fails
    // after it).
    h.write_config(&config(&good));
    h.start();
    h.wait_for("a pull over TLS", Duration::from_secs(30), |s| {
        service(s, "consent")["metrics"]["last_pull_age_seconds"].is_number()
    });
    assert!(
        good.access_log().contains("GET /fhir/Patient?"),
        "{}",
        good.access_log()
    );
    h.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(h.wait_exit(Duration::from_secs(15)).unwrap().success());
}
