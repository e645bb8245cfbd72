//! `testnet`: the test network from a shell, and the helper processes the harness runs
//! inside it. `testnet --help` lists the subcommands and exit codes.

#![forbid(unsafe_code)]

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use hil_tests::testnet::{self, Options, TestNet};
use hil_tests::{fhir, health};
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str = "\
usage: testnet up [--udp-port PORT]...   bring a test network up, print it, wait for Ctrl-C
                                         or SIGTERM, then tear it down
                                         (--udp-port: extra hub UDP port redirected to 51820)
       testnet clean                     remove test networks whose owner process is gone
       testnet serve-health ADDR         run the hub's health server on ADDR (the harness
                                         starts it inside the hub namespace)
       testnet get URL [--timeout-ms N]  GET an http:// URL; prints the status code on the
                                         first line, then the body
       testnet fhir-serve ADDR [--schema PATH]
                                         run the strict FHIR R4 test server on ADDR (base
                                         /fhir, state in memory, starting with the sample
                                         facility directory); the schema defaults to
                                         $TSUNAGI_FHIR_SCHEMA, else the npm cache
exit codes: 0 ok; 1 failed; 2 usage error; 3 this machine cannot host a test network
            (not root, or no /dev/net/tun)";

/// Exit code for a usage error.
const EXIT_USAGE: u8 = 2;
/// Exit code when the machine cannot host a test network.
const EXIT_UNAVAILABLE: u8 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("testnet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["up", rest @ ..] => match parse_ports(rest) {
            Some(ports) => up(ports),
            None => Ok(usage()),
        },
        ["clean"] => clean(),
        ["serve-health", addr] => serve_health(addr),
        ["fhir-serve", addr] => fhir_serve(addr, None),
        ["fhir-serve", addr, "--schema", schema] => fhir_serve(addr, Some(schema)),
        ["get", url] => get(url, health::IO_TIMEOUT),
        ["get", url, "--timeout-ms", ms] => match ms.parse() {
            Ok(ms) => get(url, Duration::from_millis(ms)),
            Err(_) => Ok(usage()),
        },
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Ok(usage()),
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(EXIT_USAGE)
}

/// `--udp-port P` pairs; `None` on anything else.
fn parse_ports(args: &[&str]) -> Option<Vec<u16>> {
    let mut ports = Vec::new();
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        if *flag != "--udp-port" {
            return None;
        }
        ports.push(value.parse().ok()?);
        rest = tail;
    }
    rest.is_empty().then_some(ports)
}

fn up(ports: Vec<u16>) -> anyhow::Result<ExitCode> {
    // Block the stop signals before any thread exists, so every thread inherits the mask
    // and the signals wait for `signals.wait()` below, even during bring-up. Processes the
    // harness starts inherit the mask; wireguard-go (Go unblocks the signals it handles)
    // and `serve-health` (unblocks them itself) stop on SIGTERM regardless.
    let signals = stop_signals();
    signals
        .thread_block()
        .context("failed to block SIGINT/SIGTERM/SIGHUP")?;

    let net = match TestNet::up(Options {
        hub_extra_udp_ports: ports,
    }) {
        Ok(net) => net,
        Err(e) if e.is_environment() => {
            eprintln!("testnet: {}", testnet::error_chain(&e));
            return Ok(ExitCode::from(EXIT_UNAVAILABLE));
        }
        Err(e) => return Err(e).context("failed to bring the test network up"),
    };

    let plan = net.plan();
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "test network {} is up; Ctrl-C or SIGTERM (pid {}) tears it down",
        net.id(),
        std::process::id()
    )?;
    writeln!(out, "hub public key  {}", net.hub_public_key())?;
    writeln!(out, "{plan}")?;
    writeln!(
        out,
        "try             ip netns exec {} ping -c1 {}",
        plan.box_ns, plan.wan_hub_addr.addr
    )?;
    writeln!(
        out,
        "                ip netns exec {} wg show {}",
        plan.hub_ns, plan.hub_wg_iface
    )?;
    writeln!(out, "{}", net.to_json())?;
    out.flush()?;
    drop(out);

    let signal = signals.wait().context("failed to wait for a signal")?;
    eprintln!("testnet: {signal}: tearing down {}", net.id());
    net.teardown().context("teardown incomplete")?;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT, SIGTERM, SIGHUP.
fn stop_signals() -> SigSet {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals
}

fn clean() -> anyhow::Result<ExitCode> {
    if let Err(e) = testnet::preflight()
        && e.is_environment()
    {
        eprintln!("testnet: {}", testnet::error_chain(&e));
        return Ok(ExitCode::from(EXIT_UNAVAILABLE));
    }
    let removed = testnet::clean_stale().context("failed to remove stale test networks")?;
    if removed.is_empty() {
        println!("no stale test networks");
    } else {
        println!("removed stale test networks: {}", removed.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_health(addr: &str) -> anyhow::Result<ExitCode> {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return Ok(usage());
    };
    // A parent that blocks the stop signals (like `testnet up`) passes its mask on: std
    // does not reset it when spawning. Unblock them so SIGTERM stops the server at once
    // (before any thread exists, so the connection threads inherit this mask).
    stop_signals()
        .thread_unblock()
        .context("failed to unblock SIGINT/SIGTERM/SIGHUP")?;
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("failed to listen on {addr}"))?;
    // The harness waits for this line (in the process's log file) before going on.
    println!("{} {addr}", health::READY_LINE);
    io::stdout().flush()?;
    health::serve(&listener).with_context(|| format!("failed to serve on {addr}"))?;
    Ok(ExitCode::SUCCESS)
}

fn fhir_serve(addr: &str, schema: Option<&str>) -> anyhow::Result<ExitCode> {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return Ok(usage());
    };
    // As in `serve_health`: SIGTERM must stop the server even if the parent blocked it.
    stop_signals()
        .thread_unblock()
        .context("failed to unblock SIGINT/SIGTERM/SIGHUP")?;
    let schema = match schema {
        Some(path) => std::path::PathBuf::from(path),
        None => fhir::schema_path()?,
    };
    let started = std::time::Instant::now();
    let validator = fhir::Validator::load(&schema)?;
    eprintln!(
        "fhir: schema {} compiled in {} ms",
        schema.display(),
        started.elapsed().as_millis()
    );
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("failed to listen on {addr}"))?;
    let bound = listener
        .local_addr()
        .context("failed to read the bound address")?;
    let server = std::sync::Arc::new(fhir::Server::new(validator));
    let serving = std::thread::spawn({
        let server = server.clone();
        move || server.serve(&listener)
    });
    // The network's facility directory, before anyone is told the server is up.
    fhir::seed_directory(bound).context("cannot write the sample facility directory")?;
    // Tests (and the harness) wait for this line; with port 0 it carries the real port.
    println!("{} {bound}", fhir::READY_LINE);
    io::stdout().flush()?;
    serving
        .join()
        .map_err(|_| anyhow::anyhow!("the FHIR server's thread panicked"))?
        .with_context(|| format!("failed to serve on {bound}"))?;
    Ok(ExitCode::SUCCESS)
}

fn get(url: &str, timeout: Duration) -> anyhow::Result<ExitCode> {
    let response = health::get(url, timeout)?;
    let mut out = io::stdout().lock();
    writeln!(out, "{}", response.status)?;
    out.write_all(&response.body)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_flags() {
        assert_eq!(parse_ports(&[]), Some(vec![]));
        assert_eq!(
            parse_ports(&["--udp-port", "443", "--udp-port", "8443"]),
            Some(vec![443, 8443])
        );
        assert_eq!(parse_ports(&["--udp-port"]), None);
        assert_eq!(parse_ports(&["--udp-port", "x"]), None);
        assert_eq!(parse_ports(&["443"]), None);
    }
}
