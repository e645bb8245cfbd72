//! `cargo xtask bench consent`: how fast a consent decision is, as the services get it.
//!
//! Ours: decisions asked over the consent service's Unix socket, one connection, one at a
//! time — each one a database lookup plus an audit-trail append committed with
//! `synchronous=FULL`. Peer: the pure decision function on the same records in memory (no
//! I/O, no audit): the floor. The ratio is the price of durability and the audit trail.
//! `TSUNAGI_BENCH_SECS` bounds each side's run (default 5).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn seconds() -> u64 {
    std::env::var("TSUNAGI_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| (1..=120).contains(s))
        .unwrap_or(5)
}

pub(crate) fn run() -> anyhow::Result<()> {
    let secs = seconds();
    let (tsunagi, target, _) = crate::bench::build_tsunagi(true)?;
    let dir = target.join(format!("bench-consent-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;

    // The network's FHIR server, so the cache is fresh and decisions are real permits.
    let schema = hil_tests::fhir::schema_path()
        .context("the FHIR schema is not installed (cargo xtask test installs it)")?;
    let server = hil_tests::fhir::Server::new(hil_tests::fhir::Validator::load(&schema)?)
        .spawn("127.0.0.1:0".parse()?)?;
    let config = dir.join("tsunagi.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[site]\nfacility-code = \"1312345678\"\nae-title = \"BENCH\"\n[paths]\nstate-dir = \"{}\"\nruntime-dir = \"{}\"\n[heartbeat]\nenabled = false\n[consent]\nenabled = true\nfhir-url = \"http://{server}/fhir\"\npull-interval = \"1h\"\n",
            dir.join("state").display(),
            dir.join("run").display()
        ),
    )?;
    let form = dir.join("form.pdf");
    std::fs::write(&form, b"%PDF bench")?;
    let out = Command::new(&tsunagi)
        .args([
            "consent", "register", "0001234", "--family", "見本", "--given", "花子",
        ])
        .args([
            "--family-kana",
            "ミホン",
            "--given-kana",
            "ハナコ",
            "--birth-date",
            "1950-04-01",
        ])
        .args(["--sex", "female", "--recorded-by", "bench", "--evidence"])
        .arg(&form)
        .args(["--scope", "all", "--categories", "all"])
        .arg("--config")
        .arg(&config)
        .output()?;
    if !out.status.success() {
        bail!("register failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut supervisor = Command::new(&tsunagi)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let result = measure(&tsunagi, &config, &dir, secs);
    let _ = kill(
        Pid::from_raw(i32::try_from(supervisor.id()).unwrap_or(0)),
        Signal::SIGTERM,
    );
    let _ = supervisor.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    tsunagi: &std::path::Path,
    config: &std::path::Path,
    dir: &std::path::Path,
    secs: u64,
) -> anyhow::Result<()> {
    let socket = dir.join("run").join("consent").join("decide.sock");
    let start = Instant::now();
    // Wait for the service and its first pull (a fresh cache).
    loop {
        let out = Command::new(tsunagi)
            .args(["status", "--json", "--config"])
            .arg(config)
            .output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let fresh = status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "consent"))
            .is_some_and(|c| c["metrics"]["stale"] == 0.0);
        if fresh && socket.exists() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the consent service did not sync within 60 s");
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "xtask is not async; this polls a process"
        )]
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let request = consent::protocol::to_line(&consent::protocol::Request::Decide {
        patient: "0001234".into(),
        recipient: "1312345679".parse()?,
        category: consent::protocol::Category::Images,
        at: None,
    });
    let request = request.as_bytes();
    let mut line = String::new();
    let (mut n, run) = (0u64, Instant::now());
    while run.elapsed() < Duration::from_secs(secs) && n < 1_000_000 {
        stream.write_all(request)?;
        line.clear();
        reader.read_line(&mut line)?;
        if !line.contains("\"permit\"") {
            bail!("unexpected answer: {line}");
        }
        n += 1;
    }
    let ours_us = run.elapsed().as_secs_f64() * 1e6 / n as f64;

    // Peer: the pure decision on the same records, in memory.
    let records = vec![consent::decide::Known {
        consent: consent::model::Consent {
            id: "c".into(),
            version: 1,
            patient: "0001234".parse()?,
            status: consent::model::Status::Active,
            scope: consent::model::Scope::AllParticipants,
            excluded: Default::default(),
            categories: consent::model::Category::ALL.into_iter().collect(),
            valid_from: 0,
            valid_until: None,
            evidence: None,
            source: consent::model::Source::Local,
            recorded_at: 0,
        },
        created_seq: 1,
    }];
    let recipient: consent::model::Recipient = "1312345679".parse()?;
    let now = consent::time::now();
    let fresh = consent::decide::Freshness {
        last_pull: Some(now),
        bound: Duration::from_secs(3600),
    };
    let (mut m, run) = (0u64, Instant::now());
    let mut permits = 0u64;
    while run.elapsed() < Duration::from_secs(secs.min(2)) {
        for _ in 0..1000 {
            let d = consent::decide::decide(
                std::hint::black_box(&records),
                &recipient,
                consent::model::Category::Images,
                now,
                now,
                fresh,
            );
            permits += u64::from(d == consent::decide::Decision::Permit);
        }
        m += 1000;
    }
    if permits != m {
        bail!("the pure decision did not permit");
    }
    let peer_us = run.elapsed().as_secs_f64() * 1e6 / m as f64;
    let ratio = ours_us / peer_us;
    println!("consent decisions, one client, one at a time:");
    println!(
        "  over the service's socket (lookup + durable audit append): {ours_us:>10.1} µs each ({n} decisions, {:.0}/s)",
        1e6 / ours_us
    );
    println!(
        "  pure decision function in memory (no I/O, no audit):       {peer_us:>10.3} µs each ({m} decisions)"
    );
    println!("  ratio: {ratio:.0}x (the price of durability and the audit trail; no target yet)");
    println!(
        "{{\"bench\":\"consent\",\"socket_us\":{ours_us:.1},\"pure_us\":{peer_us:.4},\"decisions_per_s\":{:.0},\"ratio\":{ratio:.1}}}",
        1e6 / ours_us
    );
    Ok(())
}
