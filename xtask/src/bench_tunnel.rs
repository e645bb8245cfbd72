//! `cargo xtask bench tunnel`: TCP throughput through the box's tunnel, against the bare veth
//! between the same namespaces, in the same run.
//!
//! Brings up the test network (hub, box, clinic), runs the real `tsunagi` supervisor with
//! the tunnel service in the box namespace against the hub's wireguard-go, and runs one
//! iperf3 client in the box twice: to the hub's WAN address over the bare veth (before the
//! service starts: its firewall lets nothing but WireGuard out on the WAN), and to the hub
//! network through the tunnel. There is no target yet: the ratio is a baseline.
//! `TSUNAGI_BENCH_SECS` sets the length of each run (default 5).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hil_tests::testnet::{Host, Options, TestNet};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const IPERF_PORT: &str = "5201";

fn seconds() -> anyhow::Result<u32> {
    match std::env::var("TSUNAGI_BENCH_SECS") {
        Err(_) => Ok(5),
        Ok(v) => v
            .parse()
            .ok()
            .filter(|s| (1..=120).contains(s))
            .with_context(|| format!("TSUNAGI_BENCH_SECS={v:?}: expected 1 to 120")),
    }
}

/// Runs iperf3 in the box against `server` and returns the received rate in Mbit/s.
fn iperf(net: &TestNet, server: &str, secs: u32) -> anyhow::Result<f64> {
    let mut client = Command::new("iperf3");
    client.args([
        "-c",
        server,
        "-p",
        IPERF_PORT,
        "-t",
        &secs.to_string(),
        "-O",
        "1",
        "-J",
    ]);
    // The server may need a moment to listen the first time; iperf3 then reports an
    // "error" in its JSON, sometimes with exit status 0. Retry those.
    let mut last = String::new();
    for _ in 0..20 {
        let out = net.exec_timeout(
            Host::Box,
            &client,
            Duration::from_secs(u64::from(secs) + 30),
        )?;
        let report: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        let bps = report
            .as_ref()
            .and_then(|r| r["end"]["sum_received"]["bits_per_second"].as_f64());
        match (
            out.status.success(),
            bps,
            report.as_ref().and_then(|r| r["error"].as_str()),
        ) {
            (true, Some(bps), None) => return Ok(bps / 1e6),
            (_, _, Some(error)) => last = error.to_owned(),
            _ => {
                last = String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" / ");
            }
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "xtask is not async; this waits for iperf3"
        )]
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("iperf3 to {server} did not measure: {last}")
}

fn status_json(tsunagi: &Path, config: &Path) -> Option<serde_json::Value> {
    let out = Command::new(tsunagi)
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())?
}

fn tunnel_summary(status: &serde_json::Value) -> String {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "tunnel"))
        .and_then(|s| s["summary"].as_str())
        .unwrap_or("")
        .to_owned()
}

pub(crate) fn run() -> anyhow::Result<()> {
    let secs = seconds()?;
    let (tsunagi, target, _) = crate::bench::build_tsunagi(true)?;

    let net = TestNet::up(Options::default()).context("cannot bring up the test network")?;
    let dir = target.join(format!("bench-tunnel-{}", net.id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let config = dir.join("tsunagi.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[site]
facility-code = "1312345678"
ae-title = "TSUNAGI-BENCH"
[paths]
state-dir = "{state}"
runtime-dir = "{run}"
[heartbeat]
enabled = false
[tunnel]
interface = "{id}b"
backend = "userspace"
hub-endpoint = "10.250.0.1:51820"
hub-public-key = "{hub}"
address = "10.99.0.2/24"
hub-subnets = ["10.98.0.0/24"]
health-url = "http://10.98.0.1:8080/health"
"#,
            state = dir.join("state").display(),
            run = dir.join("run").display(),
            id = net.id(),
            hub = net.hub_public_key(),
        ),
    )?;
    let out = Command::new(&tsunagi)
        .args(["vpn", "pubkey", "--config"])
        .arg(&config)
        .output()?;
    if !out.status.success() {
        bail!(
            "tsunagi vpn pubkey failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let public = String::from_utf8(out.stdout)?.trim().to_owned();
    net.hub_add_peer(&public, &["10.99.0.2/32"])?;

    // The bare veth first: once the tunnel service has loaded the box's firewall, the box
    // sends nothing on the WAN but WireGuard.
    let mut server = Command::new("iperf3");
    server.args(["-s", "-p", IPERF_PORT]);
    net.spawn(Host::Hub, &server)?;
    println!("iperf3, one TCP stream, {secs} s, box -> hub:");
    let veth = iperf(&net, "10.250.0.1", secs)?;
    println!("  bare veth (10.250.0.1):      {veth:>10.1} Mbit/s");

    let mut run = Command::new(&tsunagi);
    run.args(["run", "--config"]).arg(&config);
    let supervisor = net.spawn(Host::Box, &run)?;
    let started = Instant::now();
    loop {
        if let Some(s) = status_json(&tsunagi, &config)
            && tunnel_summary(&s).starts_with("up via")
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the tunnel did not come up within 60 s");
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "xtask is not async; this polls a process"
        )]
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "tunnel up after {:?}: {}",
        started.elapsed(),
        tunnel_summary(&status_json(&tsunagi, &config).unwrap_or_default())
    );

    let tunnel = iperf(&net, "10.98.0.1", secs)?;
    println!("  through the tunnel (10.98.0.1): {tunnel:>7.1} Mbit/s");
    let ratio = if veth > 0.0 { tunnel / veth } else { 0.0 };
    println!("  tunnel / veth: {ratio:.4} (userspace wireguard-go; no target yet: a baseline)");

    let _ = kill(
        Pid::from_raw(i32::try_from(supervisor).unwrap_or(0)),
        Signal::SIGTERM,
    );
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    // Written by hand to keep the documented key order.
    println!(
        "{{\"bench\":\"tunnel\",\"tunnel_mbit_s\":{tunnel:.1},\"veth_mbit_s\":{veth:.1},\"ratio\":{ratio:.4}}}"
    );
    Ok(())
}
