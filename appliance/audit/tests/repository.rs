//! The syslog transport against a real rsyslog with gnutls (the test network's audit
//! repository, `hil_tests::rsyslog`): what arrives is counted in rsyslog's own output.
#![expect(
    clippy::disallowed_methods,
    reason = "the test polls rsyslog's output file from a plain thread, outside the runtime"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use audit::syslog::{Connection, Repository, SyslogError, format};
use hil_tests::nginx::Pki;
use hil_tests::rsyslog::{Options, Rsyslog, Tls};
use rustls::pki_types::ServerName;
use tsunagi_runtime::http::{ReloadingTls, TlsFiles};

fn repository(rsyslog: &Rsyslog, ca: &Pki, client: &Pki) -> Repository {
    Repository {
        addr: SocketAddr::from(rsyslog.addr()),
        server_name: ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()),
        tls: ReloadingTls::new(TlsFiles {
            ca_file: ca.ca_cert(),
            cert_file: client.client_cert(),
            key_file: client.client_key(),
        }),
        timeout: Duration::from_secs(10),
    }
}

fn start(server: &Pki, client_ca: &Pki) -> Rsyslog {
    Rsyslog::start(
        &Tls {
            cert: server.server_cert(),
            key: server.server_key(),
            client_ca: client_ca.ca_cert(),
        },
        &Options::default(),
    )
    .unwrap()
}

/// The `sequenceId`s of what rsyslog wrote, once `n` lines are there (at most `wait`).
fn received_within(rsyslog: &Rsyslog, n: usize, wait: Duration) -> Vec<u64> {
    let deadline = Instant::now() + wait;
    loop {
        let lines = rsyslog.messages();
        if lines.len() >= n || Instant::now() > deadline {
            return lines
                .iter()
                .map(|l| {
                    let at = l.find("sequenceId=\"").expect(l) + "sequenceId=\"".len();
                    l[at..].split('"').next().unwrap().parse().unwrap()
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn received(rsyslog: &Rsyslog, n: usize) -> Vec<u64> {
    received_within(rsyslog, n, Duration::from_secs(10))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn messages_arrive_in_order_and_the_close_confirms_them() {
    let dir = tempfile::tempdir().unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let rsyslog = start(&network, &network);
    let repo = repository(&rsyslog, &network, &network);
    // The first: a real DICOM audit message (the box starting).
    let node = audit::message::Node {
        facility: "1312345678".to_owned(),
        serial: "1312345678-TEST-0001".to_owned(),
        address: Some("10.99.0.2".to_owned()),
    };
    let start =
        audit::message::application_activity(&node, true, std::time::SystemTime::now()).to_xml();
    runtime().block_on(async {
        let mut conn = Connection::open(&repo).await.unwrap();
        for seq in 1..=100 {
            let xml = if seq == 1 {
                start.clone()
            } else {
                format!("<AuditMessage><EventIdentification n=\"{seq}\"/></AuditMessage>")
            };
            conn.send(&format("1312345678-TEST-0001", seq, &xml).unwrap())
                .await
                .unwrap();
        }
        conn.close().await.unwrap();
    });
    assert_eq!(received(&rsyslog, 100), (1..=100).collect::<Vec<_>>());
    let first = &rsyslog.messages()[0];
    assert!(
        first.starts_with("<85>1 ")
            && first.contains(" 1312345678-TEST-0001 tsunagi ")
            && first.contains(" IHE+RFC-3881 [meta sequenceId=\"1\"] ")
            && first.ends_with(&start),
        "{first}"
    );
}

#[test]
fn a_repository_of_another_ca_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let stranger = Pki::generate(&dir.path().join("stranger")).unwrap();
    let rsyslog = start(&stranger, &network);
    let repo = repository(&rsyslog, &network, &network);
    let error = runtime().block_on(async {
        match Connection::open(&repo).await {
            Ok(_) => panic!("a repository of another CA was accepted"),
            Err(e) => e,
        }
    });
    assert!(
        matches!(&error, SyslogError::TlsRefused { reason, .. } if reason.contains("not from the network CA")),
        "{error}"
    );
}

#[test]
fn a_box_certificate_of_another_ca_is_refused_and_nothing_is_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let stranger = Pki::generate(&dir.path().join("stranger")).unwrap();
    let rsyslog = start(&network, &network);
    let repo = repository(&rsyslog, &network, &stranger);
    let outcome = runtime().block_on(async {
        let mut conn = Connection::open(&repo).await?;
        conn.send(&format("1312345678-TEST-0001", 1, "<AuditMessage/>").unwrap())
            .await?;
        conn.close().await
    });
    let error = outcome.expect_err("a box certificate of another CA was confirmed");
    assert!(matches!(error, SyslogError::Reset { .. }), "{error}");
    let nothing = received_within(&rsyslog, 1, Duration::from_secs(2));
    assert!(nothing.is_empty(), "{}", rsyslog.log());
}

#[test]
fn after_an_outage_the_unconfirmed_are_sent_again_and_each_arrives_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let mut rsyslog = start(&network, &network);
    let repo = repository(&rsyslog, &network, &network);
    let rt = runtime();
    // Batches of 10, each confirmed by a clean close; the first unconfirmed is where the
    // next attempt starts.
    let send_batch = |from: u64| {
        rt.block_on(async {
            let mut conn = Connection::open(&repo).await?;
            for seq in from..from + 10 {
                let xml = format!("<AuditMessage n=\"{seq}\"/>");
                conn.send(&format("1312345678-TEST-0001", seq, &xml).unwrap())
                    .await?;
            }
            conn.close().await
        })
    };
    let mut next = 1;
    let mut failures = Vec::new();
    while next <= 100 {
        if next == 41 && failures.is_empty() {
            rsyslog.stop().unwrap();
        }
        match send_batch(next) {
            Ok(()) => next += 10,
            Err(e) => {
                failures.push(e.to_string());
                assert!(failures.len() < 5, "{failures:?}");
                rsyslog.start_again().unwrap();
            }
        }
    }
    assert!(
        failures[0].contains("cannot reach the audit repository"),
        "{failures:?}"
    );
    assert_eq!(received(&rsyslog, 100), (1..=100).collect::<Vec<_>>());
}

#[test]
fn the_queue_survives_a_repository_outage_and_arrives_whole_and_in_order() {
    use audit::outbox::{Outbox, Round, backoff, send_pending};
    let dir = tempfile::tempdir().unwrap();
    let network = Pki::generate(&dir.path().join("network")).unwrap();
    let mut rsyslog = start(&network, &network);
    let repo = repository(&rsyslog, &network, &network);
    let db = dir.path().join("audit.db");
    let outbox = std::sync::Mutex::new(Outbox::open(&db, "1312345678-TEST-0001").unwrap());
    let rt = runtime();
    let (mut failures, mut rounds) = (0u32, 0u32);
    let mut errors = Vec::new();
    // 100 events recorded while the drain runs; the repository stops after the first 30
    // and is back 3 s later.
    let mut recorded = 0;
    let mut stopped_at = None;
    loop {
        if recorded < 100 {
            for _ in 0..7 {
                if recorded < 100 {
                    recorded += 1;
                    outbox
                        .lock()
                        .unwrap()
                        .record(&format!("<AuditMessage n=\"{recorded}\"/>"))
                        .unwrap();
                }
            }
        }
        if recorded >= 30 && stopped_at.is_none() {
            rsyslog.stop().unwrap();
            stopped_at = Some(Instant::now());
        }
        match rt.block_on(send_pending(&outbox, &repo)) {
            Ok(Round::Idle) if recorded == 100 => break,
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                errors.push(e.to_string());
                assert!(errors.len() < 20, "{errors:?}");
                std::thread::sleep(backoff(failures).min(Duration::from_secs(1)));
            }
        }
        if let Some(at) = stopped_at
            && at.elapsed() > Duration::from_secs(3)
            && !errors.is_empty()
        {
            rsyslog.start_again().unwrap();
            stopped_at = Some(Instant::now() + Duration::from_secs(3600));
        }
        rounds += 1;
        assert!(rounds < 200);
    }
    // Reopened (as after a reboot), nothing waits.
    drop(outbox);
    assert!(
        Outbox::open(&db, "1312345678-TEST-0001")
            .unwrap()
            .is_empty()
            .unwrap()
    );
    let seqs = received(&rsyslog, 100);
    let mut first = Vec::new();
    for s in &seqs {
        if !first.contains(s) {
            first.push(*s);
        }
    }
    assert_eq!(first, (1..=100).collect::<Vec<_>>(), "{seqs:?}");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("cannot reach the audit repository")),
        "{errors:?}"
    );
    println!(
        "outage: {} attempts refused while the repository was down; {} of 100 received twice",
        errors.len(),
        seqs.len() - 100
    );
}
