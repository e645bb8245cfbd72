//! `cargo xtask demo`: builds `tsunagi` and runs it in the foreground with a demo config.
//!
//! As root, the demo first brings up the test network (`hil-tests`: hub, box and clinic
//! network namespaces, the hub running wireguard-go and a health endpoint), generates the
//! box's key with `tsunagi vpn pubkey`, registers it at the hub, runs the supervisor in the
//! box namespace with the tunnel service, waits for the tunnel and sends one request through
//! it, and prints what happened. Without root (or with `TSUNAGI_DEMO_NO_NETWORK`), it runs
//! the supervisor and heartbeat only, and says so. The namespaces go when the demo stops.
//! Either way the clinic console runs (on the clinic LAN, or on 127.0.0.1:8443), and the
//! demo prints its URL and a login made for the demo only (`tsunagi console add-account`:
//! a name, a password and a TOTP secret).
//!
//! Everything lives under `target/demo/`: the config (`tsunagi.toml`), the state directory
//! (`state/`) and the runtime directory (`run/`). Environment overrides, for tests:
//!
//! - `TSUNAGI_DEMO_METRICS_PORT`: the metrics port instead of 9464 (tests pass a free one);
//! - `TSUNAGI_DEMO_DIR`: the directory instead of `target/demo`;
//! - `TSUNAGI_DEMO_BIN`: run this binary and skip the build (a test runs the binary its own
//!   build produced rather than rebuilding `target/debug/tsunagi` under other tests).
//!
//! Once the supervisor runs, xtask prints `demo: running (pid N)` and waits. On SIGINT or
//! SIGTERM it sends the supervisor SIGTERM, unless the signal is a Ctrl-C on the terminal,
//! which the kernel has delivered to the supervisor as well (same process group). It then
//! waits, prints `demo: stopped (...)` and exits 0 if the supervisor exited 0, else 1.
//! A SIGINT sent to the whole group by a process (`kill -INT -PGID`, as the demo test does)
//! cannot be told apart from one sent to xtask alone, so the supervisor then gets SIGINT and
//! SIGTERM; it treats a repeated stop signal as a no-op. A second signal to xtask kills the
//! supervisor. If the supervisor exits on its own, xtask exits with its status.
//!
//! Signals are handled without `unsafe`: once the supervisor is running, SIGINT and SIGTERM
//! are blocked and read from a signalfd in a thread. They are blocked only after spawning
//! the supervisor because a child inherits the signal mask (the standard library does not
//! reset it) and a supervisor with SIGTERM blocked would never stop.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};
use std::sync::mpsc;
use std::thread;

use anyhow::{Context as _, bail};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::unistd::{Pid, geteuid};

use crate::process::{cargo, display, exit_code_of, status};
use crate::workspace_root;
use hil_tests::testnet::{Host, Options, TestNet};

const DEFAULT_METRICS_PORT: u16 = 9464;
const METRICS_PORT_ENV: &str = "TSUNAGI_DEMO_METRICS_PORT";
/// Run this `tsunagi` binary instead of building `target/debug/tsunagi`.
const BIN_ENV: &str = "TSUNAGI_DEMO_BIN";
/// Use this directory instead of `target/demo`.
const DIR_ENV: &str = "TSUNAGI_DEMO_DIR";
/// Run without the test network even as root.
const NO_NETWORK_ENV: &str = "TSUNAGI_DEMO_NO_NETWORK";
/// The console's port without the test network (no root: not 443).
const DEMO_CONSOLE_PORT: u16 = 8443;

/// `si_code` of a signal sent by the kernel itself, which is how the terminal driver sends
/// SIGINT on Ctrl-C to the whole foreground process group (the supervisor included). A
/// `kill` from a process has `SI_USER` (0) instead.
const SI_KERNEL: i32 = 0x80;

pub(crate) fn run() -> anyhow::Result<ExitCode> {
    let port = metrics_port()?;
    let root = workspace_root();
    let target = target_dir(&root);

    let binary = match env_path(BIN_ENV)? {
        Some(binary) => binary,
        None => {
            let mut build = cargo();
            build.args(["build", "-p", "tsunagi", "--locked"]);
            if !status(&mut build)?.success() {
                bail!("`{}` failed", display(&build));
            }
            target.join("debug").join("tsunagi")
        }
    };
    let demo_dir = env_path(DIR_ENV)?.unwrap_or_else(|| target.join("demo"));
    let network = network()?;
    let config = write_config(&demo_dir, port, network.as_ref())?;
    let login = console_login(&binary, &config)?;
    // The hub's WebDAV server for the SS-MIX2 replica; stops when the demo ends.
    let mut hub_webdav = None;
    // The TLS front of the hub's FHIR server; stops when the demo ends.
    let mut _hub_fhir = None;
    // The network PACS in the hub; stops when the demo ends.
    let mut hub_pacs = None;
    if let Some(net) = &network {
        register_box(net, &binary, &config)?;
        start_fhir_server(net)?;
        register_sample_patient(&binary, &config, &demo_dir)?;
        let webdav = start_ssmix2(net, &config, &demo_dir)?;
        _hub_fhir = Some(start_fhir_front(net, &config, &demo_dir, webdav.pki())?);
        hub_webdav = Some(webdav);
        hub_pacs = Some(
            hil_tests::orthanc::Orthanc::start_with(&hil_tests::orthanc::Options {
                netns: Some(net.ns(Host::Hub).to_owned()),
                ..hil_tests::orthanc::Options::default()
            })
            .context("cannot start the hub's PACS (Orthanc)")?,
        );
        println!("demo: the network PACS (Orthanc, AE ORTHANC) runs in the hub at 10.98.0.1:4242");
    }

    let mut command = match &network {
        Some(net) => {
            // `ip netns exec` execs tsunagi, so the pid is the supervisor's.
            let mut c = Command::new("ip");
            c.args(["netns", "exec", net.ns(Host::Box)]).arg(&binary);
            c
        }
        None => Command::new(&binary),
    };
    let mut child = command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .current_dir(&root)
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let pid = child.id();
    let child_pid = Pid::from_raw(i32::try_from(pid).context("child pid out of range")?);

    // Block SIGINT and SIGTERM right after spawning the supervisor (a child inherits the
    // signal mask, and the supervisor must get its signals) and before starting any thread
    // (threads inherit the mask, so no thread gets them the default way, which would kill
    // xtask and orphan the supervisor). From here on they are only read from the signalfd.
    // Until this line, xtask is single-threaded and a signal kills it as usual; we announce
    // the pid only afterwards, so nobody should be signalling us in between.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(error) = signals.thread_block() {
        send(child_pid, Signal::SIGKILL);
        let _ = child.wait();
        return Err(error).context("failed to block SIGINT and SIGTERM");
    }
    let signalfd = match SignalFd::new(&signals) {
        Ok(fd) => fd,
        Err(error) => {
            send(child_pid, Signal::SIGKILL);
            let _ = child.wait();
            return Err(error).context("failed to create a signalfd");
        }
    };

    if let Some(net) = &network {
        show_tunnel(net, &binary, &config);
        show_consent(&binary, &config, &demo_dir);
        if let Some(hub) = &hub_webdav {
            show_ssmix2(hub);
        }
        if let Some(pacs) = &hub_pacs {
            show_dicom(net, pacs, &demo_dir);
        }
    }
    print!("{}", instructions(&binary, &config, port, network.as_ref()));
    print!("{}", console_instructions(&login, network.as_ref()));
    println!("demo: running (pid {pid})");

    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    thread::spawn(move || forward_signals(&signalfd, &signal_tx));
    thread::spawn(move || {
        let _ = tx.send(Event::Exited(child.wait()));
    });

    let mut stopping = false;
    let exit_status: ExitStatus = loop {
        match rx.recv().context("lost track of the supervisor")? {
            Event::Exited(result) => break result.context("failed to wait for tsunagi")?,
            Event::Signal {
                signal,
                from_terminal,
            } => {
                let name = signal.as_str();
                if stopping {
                    println!("demo: {name} while stopping: killing tsunagi (pid {pid})");
                    send(child_pid, Signal::SIGKILL);
                } else if from_terminal && signal == Signal::SIGINT {
                    // The terminal sent SIGINT to the supervisor too; a second signal could
                    // cut its shutdown short.
                    println!("demo: {name} from the terminal: waiting for tsunagi to stop");
                } else {
                    println!("demo: {name}: sending SIGTERM to tsunagi (pid {pid})");
                    send(child_pid, Signal::SIGTERM);
                }
                stopping = true;
            }
        }
    };

    if stopping {
        println!("demo: stopped ({exit_status})");
        Ok(if exit_status.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    } else {
        println!("demo: tsunagi exited on its own");
        println!("demo: stopped ({exit_status})");
        Ok(ExitCode::from(exit_code_of(exit_status)))
    }
}

enum Event {
    Signal { signal: Signal, from_terminal: bool },
    Exited(std::io::Result<ExitStatus>),
}

/// Reads signals from `signalfd` and passes them on until the receiver goes away.
fn forward_signals(signalfd: &SignalFd, tx: &mpsc::Sender<Event>) {
    loop {
        let info = match signalfd.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) | Err(Errno::EINTR) => continue,
            Err(error) => {
                eprintln!("demo: cannot read signals any more: {error}");
                return;
            }
        };
        let Some(signal) = i32::try_from(info.ssi_signo)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
        else {
            continue;
        };
        let event = Event::Signal {
            signal,
            from_terminal: info.ssi_code == SI_KERNEL,
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// Sends `signal` to the supervisor; it may have exited already, which is fine.
fn send(pid: Pid, signal: Signal) {
    match kill(pid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => eprintln!(
            "demo: cannot send {} to pid {pid}: {error}",
            signal.as_str()
        ),
    }
}

fn metrics_port() -> anyhow::Result<u16> {
    let Some(value) = std::env::var_os(METRICS_PORT_ENV) else {
        return Ok(DEFAULT_METRICS_PORT);
    };
    let value = value.to_string_lossy();
    match value.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => bail!("{METRICS_PORT_ENV} must be a port number from 1 to 65535, not {value:?}"),
    }
}

/// The value of the environment variable `name` as an absolute path (relative values are
/// taken from the current directory), if set and not empty.
fn env_path(name: &str) -> anyhow::Result<Option<PathBuf>> {
    match std::env::var_os(name) {
        Some(value) if !value.is_empty() => std::path::absolute(&value)
            .map(Some)
            .with_context(|| format!("{name}: cannot make {value:?} absolute")),
        _ => Ok(None),
    }
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Creates `demo_dir` with its `state` and `run` directories, writes `tsunagi.toml` in it
/// and returns the config's path.
fn write_config(demo_dir: &Path, port: u16, network: Option<&TestNet>) -> anyhow::Result<PathBuf> {
    let state_dir = demo_dir.join("state");
    let runtime_dir = demo_dir.join("run");
    for dir in [&state_dir, &runtime_dir] {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    if geteuid().is_root() {
        // The supervisor runs services as per-service users, which must be able to reach
        // their directories below this one.
        fs::set_permissions(demo_dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("failed to chmod 0755 {}", demo_dir.display()))?;
    }

    let config = demo_dir.join("tsunagi.toml");
    let mut text = config_text(&state_dir, &runtime_dir, port)?;
    if let Some(net) = network {
        text.push_str(&tunnel_section(net));
    }
    // The clinic console: on the clinic LAN in the test network; on loopback without it.
    let _ = write!(
        text,
        "[console]\nenabled = true\nlisten = \"{}\"\n",
        console_listen(network)
    );
    fs::write(&config, text).with_context(|| format!("failed to write {}", config.display()))?;
    Ok(config)
}

pub(crate) fn config_text(
    state_dir: &Path,
    runtime_dir: &Path,
    port: u16,
) -> anyhow::Result<String> {
    Ok(format!(
        r#"version = 1
[site]
facility-code = "1312345678"
ae-title = "TSUNAGI-DEMO"
name = "demo clinic"
[paths]
state-dir = {state}
runtime-dir = {runtime}
[metrics]
listen = "127.0.0.1:{port}"
[heartbeat]
interval = "2s"
"#,
        state = toml_string(state_dir)?,
        runtime = toml_string(runtime_dir)?,
    ))
}

/// Where the demo's console listens.
fn console_listen(network: Option<&TestNet>) -> String {
    match network {
        Some(net) => format!("{}:443", net.plan().lan_box_addr.addr),
        None => format!("127.0.0.1:{DEMO_CONSOLE_PORT}"),
    }
}

/// The demo's console login, made by `tsunagi console add-account` before the start.
struct ConsoleLogin {
    name: String,
    password: String,
    secret: String,
    fingerprint: String,
}

/// Adds the demo's administrator to the console (root's `tsunagi console add-account`, as
/// an operator would when no administrator can) and reads the certificate's fingerprint.
fn console_login(binary: &Path, config: &Path) -> anyhow::Result<ConsoleLogin> {
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(binary)
            .args(["console"])
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .context("cannot run tsunagi console")?;
        if !out.status.success() {
            bail!(
                "tsunagi console {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let account: serde_json::Value =
        serde_json::from_str(&run(&["add-account", "demo", "--role", "admin", "--json"])?)
            .context("tsunagi console add-account printed no JSON")?;
    let field = |k: &str| account[k].as_str().unwrap_or_default().to_owned();
    Ok(ConsoleLogin {
        name: field("name"),
        password: field("password"),
        secret: field("totp-secret"),
        fingerprint: run(&["fingerprint"])?,
    })
}

/// `path` as a TOML basic string.
fn toml_string(path: &Path) -> anyhow::Result<String> {
    let Some(text) = path.to_str() else {
        bail!("path {} is not UTF-8", path.display());
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

/// How to reach the console, and the demo's login (for the demo only: a real box's first
/// administrator comes with a one-time setup code).
fn console_instructions(login: &ConsoleLogin, network: Option<&TestNet>) -> String {
    let url = match network {
        Some(net) => format!("https://{}/", net.plan().lan_box_addr.addr),
        None => format!("https://127.0.0.1:{DEMO_CONSOLE_PORT}/"),
    };
    let mut out = format!(
        "demo: the clinic console: {url} (self-signed certificate, SHA-256 {})\n",
        login.fingerprint
    );
    if let Some(net) = network {
        let _ = writeln!(
            out,
            "  it is on the clinic LAN: ip netns exec {} curl -sk {url}login   # or a browser started there",
            net.ns(Host::Clinic)
        );
    }
    let _ = writeln!(
        out,
        "demo: console login (demo only): {} / {}, TOTP secret {} (any authenticator app)",
        login.name, login.password, login.secret
    );
    out
}

fn instructions(binary: &Path, config: &Path, port: u16, network: Option<&TestNet>) -> String {
    let (binary, config) = (binary.display(), config.display());
    let mut out = format!(
        "\
demo: tsunagi is running with the config {config}
demo: look at it from another terminal:
  {binary} status --config {config}
  {binary} status --config {config} --json
"
    );
    match network {
        None => out.push_str(&format!("  curl http://127.0.0.1:{port}/metrics\n")),
        Some(net) => {
            let (hub, bx, clinic) = (net.ns(Host::Hub), net.ns(Host::Box), net.ns(Host::Clinic));
            let lines = [
                format!("ip netns exec {bx} curl http://127.0.0.1:{port}/metrics"),
                format!(
                    "ip netns exec {bx} wg show            # the box's tunnel, as WireGuard sees it"
                ),
                format!("ip netns exec {hub} wg show            # the hub's side"),
                format!(
                    "ip netns exec {bx} ip route           # only the hub subnet goes through the tunnel"
                ),
                format!("ip netns exec {bx} nft list ruleset   # the box's firewall"),
                format!(
                    "ip netns exec {clinic} ping 192.168.50.1   # a clinic device reaching the box"
                ),
            ];
            for line in lines {
                out.push_str("  ");
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    out.push_str("demo: Ctrl-C stops it\n");
    out
}

/// The hub, box and clinic namespaces, when we may create them (root).
fn network() -> anyhow::Result<Option<TestNet>> {
    if std::env::var_os(NO_NETWORK_ENV).is_some() {
        println!("demo: {NO_NETWORK_ENV} is set: running without the test network");
        return Ok(None);
    }
    if !geteuid().is_root() {
        println!(
            "demo: not root, so no test network (hub, box and clinic need network namespaces): running the supervisor and heartbeat only"
        );
        return Ok(None);
    }
    let net = TestNet::up(Options {
        hub_extra_udp_ports: vec![443],
    })
    .context("cannot bring up the test network")?;
    println!(
        "demo: test network up: hub {}, box {}, clinic {} (network namespaces; removed when the demo stops)",
        net.ns(Host::Hub),
        net.ns(Host::Box),
        net.ns(Host::Clinic)
    );
    Ok(Some(net))
}

/// The `[tunnel]` section pointing the box at the test network's hub.
pub(crate) fn tunnel_section(net: &TestNet) -> String {
    format!(
        r#"[tunnel]
interface = "{id}b"
hub-endpoint = "10.250.0.1:51820"
alternative-endpoints = ["10.250.0.1:443"]
hub-public-key = "{hub}"
address = "10.99.0.2/24"
hub-subnets = ["10.98.0.0/24"]
health-url = "http://10.98.0.1:8080/health"
probe-interval = "2s"
[tunnel.firewall]
lan-interfaces = ["{lan}"]
lan-tcp-ports = [11112, 443]
[consent]
enabled = true
fhir-url = "http://10.98.0.1:8081/fhir"
pull-interval = "5s"
[site.network-ids]
issuer = "TSUNAGI-DEMO-NET"
oid = "{network_oid}"
[dicom]
listen = "{lan_addr}:11112"
[dicom.pacs]
ae-title = "ORTHANC"
address = "10.98.0.1:4242"
"#,
        lan_addr = net.plan().lan_box_addr.addr,
        network_oid = DEMO_NETWORK_OID,
        id = net.id(),
        hub = net.hub_public_key(),
        lan = net.plan().lan_box_iface,
    )
}

/// Generates the box's key (on the box, as in production) and registers its public half at
/// the hub, as the operator would.
pub(crate) fn register_box(net: &TestNet, binary: &Path, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(binary)
        .args(["vpn", "pubkey", "--config"])
        .arg(config)
        .output()
        .context("cannot run tsunagi vpn pubkey")?;
    if !out.status.success() {
        bail!(
            "tsunagi vpn pubkey failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    net.hub_add_peer(&public, &["10.99.0.2/32"])
        .context("cannot register the box at the hub")?;
    println!("demo: box public key {public} registered at the hub");
    Ok(())
}

/// The network's FHIR server (the strict test server) on the hub network, port 8081.
pub(crate) fn start_fhir_server(net: &TestNet) -> anyhow::Result<()> {
    let bin = hil_tests::testnet::testnet_binary().context("cannot find the testnet binary")?;
    let mut serve = Command::new(bin);
    serve.args(["fhir-serve", "10.98.0.1:8081"]);
    if let Ok(schema) = hil_tests::fhir::schema_path() {
        serve.arg("--schema").arg(schema);
    }
    net.spawn(Host::Hub, &serve)
        .context("cannot start the FHIR server in the hub")?;
    println!("demo: the network's FHIR R4 server runs in the hub at http://10.98.0.1:8081/fhir");
    Ok(())
}

/// A sample patient registered at the desk, with a consent that discloses to every
/// participant: the consent service pushes it to the network once the tunnel is up.
pub(crate) fn register_sample_patient(
    binary: &Path,
    config: &Path,
    demo_dir: &Path,
) -> anyhow::Result<()> {
    let form = demo_dir.join("sample-consent-form.pdf");
    fs::write(&form, b"%PDF-1.4 sample consent form (demo)")?;
    let out = Command::new(binary)
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
        .args([
            "--sex",
            "female",
            "--recorded-by",
            "demo-desk",
            "--evidence",
        ])
        .arg(&form)
        .args(["--scope", "all", "--categories", "all"])
        .arg("--config")
        .arg(config)
        .output()
        .context("cannot run tsunagi consent register")?;
    if !out.status.success() {
        bail!(
            "tsunagi consent register failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!(
        "demo: sample patient 0001234 registered at the desk with a consent for every network participant"
    );
    // The network's index gives the patient a network ID (名寄せ); images go under it.
    let out = Command::new(binary)
        .args([
            "consent",
            "network-id",
            "0001234",
            DEMO_NETWORK_ID,
            "--config",
        ])
        .arg(config)
        .output()
        .context("cannot run tsunagi consent network-id")?;
    if !out.status.success() {
        bail!(
            "tsunagi consent network-id failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!("demo: sample patient 0001234 has network ID {DEMO_NETWORK_ID}");
    Ok(())
}

/// The demo network's patient-ID domain (an OID under the ITU-T/ISO example arc 2.999).
const DEMO_NETWORK_OID: &str = "2.999.392.1";
/// The sample patient's network ID.
const DEMO_NETWORK_ID: &str = "DEMO-NET-0000001";

/// The demo's patients in the clinic's SS-MIX2 storage: the registered sample patient (who
/// consented) and one who did not.
pub(crate) const SSMIX2_CONSENTED: &str = "0001234";
const SSMIX2_NOT_CONSENTED: &str = "0005678";

/// Writes a sample SS-MIX2 storage on the clinic side, starts the hub's WebDAV server (nginx,
/// client certificate required) inside the hub namespace, hands the box its certificate, and
/// adds the `[ssmix2]` section to the config.
fn start_ssmix2(
    net: &TestNet,
    config: &Path,
    demo_dir: &Path,
) -> anyhow::Result<hil_tests::nginx::Nginx> {
    use ssmix2::build::{Patient, Record, Storage};
    let root = demo_dir.join("clinic").join("ssmix2").join("1312345678");
    let _ = fs::remove_dir_all(&root);
    let mut storage = Storage::create(&root)?;
    for (id, family, given) in [
        (SSMIX2_CONSENTED, "見本", "花子"),
        (SSMIX2_NOT_CONSENTED, "東京", "時日"),
    ] {
        let p = Patient {
            family: family.into(),
            given: given.into(),
            ..Patient::sample(id)
        };
        let dummy = ssmix2::datatype::DUMMY_ORDER_NO;
        storage.put(&p, &Record::new("ADT-00", "-", dummy, "20261120093000000"))?;
        storage.put(
            &p,
            &Record::new("ADT-22", "20261120", dummy, "20261120100000000"),
        )?;
        storage.put(
            &p,
            &Record::new("OMP-01", "20261120", "000000000000001", "20261120103000000"),
        )?;
        storage.put(
            &p,
            &Record::new("OML-11", "20261120", "000000000000002", "20261120113000000"),
        )?;
    }
    let hub = hil_tests::nginx::Nginx::start_with(&hil_tests::nginx::Options {
        listen: Some("10.98.0.1:8443".parse()?),
        netns: Some(net.ns(Host::Hub).to_owned()),
        ..hil_tests::nginx::Options::default()
    })
    .context("cannot start the hub's WebDAV server (nginx)")?;
    // The box's certificate and key, readable by the sync service's user only.
    let (ca, cert, key) = service_tls_files(
        &demo_dir.join("tls").join("ssmix2"),
        ssmix2_sync::USER,
        [hub.ca_file(), hub.client_cert_file(), hub.client_key_file()],
    )?;
    let section = format!(
        "[ssmix2]\nstorage = {}\nwatch = \"auto\"\nscan-interval = \"5s\"\nsettle = \"1s\"\n[ssmix2.replica]\nurl = \"{}\"\nca-file = {}\nclient-cert-file = {}\nclient-key-file = {}\n",
        toml_string(&root)?,
        hub.base_url(),
        toml_string(&ca)?,
        toml_string(&cert)?,
        toml_string(&key)?,
    );
    let mut text = fs::read_to_string(config)?;
    text.push_str(&section);
    fs::write(config, text)?;
    println!(
        "demo: SS-MIX2 storage on the clinic side at {} (patients {SSMIX2_CONSENTED}, who consented, and {SSMIX2_NOT_CONSENTED}, who did not); the hub's replica is WebDAV at {}",
        root.display(),
        hub.base_url()
    );
    Ok(hub)
}

/// A service's copy of the network CA and the box's certificate and key (`from`, in that
/// order) in `dir`, as `ca.pem`, `box.pem` and `box.key` (mode 0600), owned by the
/// service's user `user` when run as root (the service reads them after dropping
/// privileges). The paths of the copies.
fn service_tls_files(
    dir: &Path,
    user: &str,
    from: [PathBuf; 3],
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    fs::create_dir_all(dir)?;
    let to = [dir.join("ca.pem"), dir.join("box.pem"), dir.join("box.key")];
    for (from, to) in from.iter().zip(&to) {
        fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
    }
    fs::set_permissions(&to[2], fs::Permissions::from_mode(0o600))?;
    if geteuid().is_root() {
        let id = tsunagi_runtime::privilege::ensure_user(user)?;
        for path in &to {
            nix::unistd::chown(path, Some(id.uid), Some(id.gid))?;
        }
    }
    let [ca, cert, key] = to;
    Ok((ca, cert, key))
}

/// The port of the hub's TLS front of its FHIR server (issue 17).
const FHIR_TLS_PORT: u16 = 8444;

/// Puts nginx in front of the hub's FHIR server (TLS with the network's server certificate
/// of `pki`, the box's client certificate required, as the network runs it), gives the
/// consent service its own copy of the box's certificate and key, and points `[consent]`
/// at the front.
fn start_fhir_front(
    net: &TestNet,
    config: &Path,
    demo_dir: &Path,
    pki: &hil_tests::nginx::Pki,
) -> anyhow::Result<hil_tests::nginx::Nginx> {
    let front = hil_tests::nginx::Nginx::start_with(&hil_tests::nginx::Options {
        listen: Some(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(10, 98, 0, 1),
            FHIR_TLS_PORT,
        )),
        netns: Some(net.ns(Host::Hub).to_owned()),
        pki: Some(pki.clone()),
        proxy_to: Some("10.98.0.1:8081".parse()?),
        ..hil_tests::nginx::Options::default()
    })
    .context("cannot start the TLS front of the hub's FHIR server (nginx)")?;
    let (ca, cert, key) = service_tls_files(
        &demo_dir.join("tls").join("consent"),
        consent::USER,
        [pki.ca_cert(), pki.client_cert(), pki.client_key()],
    )?;
    let text = fs::read_to_string(config)?;
    let plain = "fhir-url = \"http://10.98.0.1:8081/fhir\"\n";
    anyhow::ensure!(
        text.contains(plain),
        "the demo config has no plain fhir-url"
    );
    let url = format!("https://10.98.0.1:{FHIR_TLS_PORT}/fhir");
    let tls_lines = format!(
        "fhir-url = \"{url}\"\nca-file = {}\nclient-cert-file = {}\nclient-key-file = {}\n",
        toml_string(&ca)?,
        toml_string(&cert)?,
        toml_string(&key)?,
    );
    fs::write(config, text.replacen(plain, &tls_lines, 1))?;
    println!(
        "demo: the box syncs consent with the network's FHIR server over mutual TLS at {url} (nginx in front of it, the box's certificate required)"
    );
    Ok(front)
}

/// Waits for the consented part of the storage to appear on the hub's disk and says what is
/// there.
fn show_ssmix2(hub: &hil_tests::nginx::Nginx) {
    fn files(dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                files(&path, out);
            } else {
                out.push(path.to_string_lossy().into_owned());
            }
        }
    }
    let start = std::time::Instant::now();
    let mut found = Vec::new();
    while start.elapsed() < std::time::Duration::from_secs(60) {
        found.clear();
        files(hub.data_root(), &mut found);
        if found.len() >= 4 {
            break;
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "xtask is not async; this polls a directory"
        )]
        thread::sleep(std::time::Duration::from_millis(300));
    }
    let of = |id: &str| {
        found
            .iter()
            .filter(|f| f.split('/').any(|c| c == id))
            .count()
    };
    println!(
        "demo: SS-MIX2 at the hub (through the tunnel): {} files of patient {SSMIX2_CONSENTED}, {} of {SSMIX2_NOT_CONSENTED} (no consent), in {}",
        of(SSMIX2_CONSENTED),
        of(SSMIX2_NOT_CONSENTED),
        hub.data_root().display()
    );
}

/// Sends a sample study from the clinic LAN (dcmtk storescu in the clinic namespace) to the
/// box's DICOM bridge and waits for it in the hub's Orthanc.
fn show_dicom(net: &TestNet, pacs: &hil_tests::orthanc::Orthanc, demo_dir: &Path) {
    let dir = demo_dir.join("clinic").join("dicom");
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = fs::create_dir_all(&dir) {
        println!("demo: DICOM: cannot prepare the sample study: {e}");
        return;
    }
    let ids = hil_tests::dicom_files::Ids::new(SSMIX2_CONSENTED);
    let file = match hil_tests::dicom_files::japanese_ct(&dir, &ids) {
        Ok(f) => f,
        Err(e) => {
            println!("demo: DICOM: cannot generate the sample study: {e}");
            return;
        }
    };
    let box_addr = net.plan().lan_box_addr.addr.to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            net.ns(Host::Clinic),
            "storescu",
            "-aec",
            "TSUNAGI-DEMO",
            &box_addr,
            "11112",
        ])
        .arg(&file)
        .env("TCP_NODELAY", "1")
        .output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        println!("demo: DICOM: storescu from the clinic failed: {out:?}");
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(60) {
        if let Ok(found) = pacs.instances()
            && !found.is_empty()
        {
            let under = pacs
                .get(&format!("/instances/{}/simplified-tags", found[0]))
                .ok()
                .and_then(|r| r.json()["PatientID"].as_str().map(str::to_owned))
                .unwrap_or_default();
            println!(
                "demo: DICOM: a sample study sent from the clinic (storescu) arrived in the hub's Orthanc through the tunnel ({} instance, patient {SSMIX2_CONSENTED}, stored under network ID {under})",
                found.len()
            );
            return;
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "xtask is not async; this polls the PACS"
        )]
        thread::sleep(std::time::Duration::from_millis(300));
    }
    println!(
        "demo: DICOM: the sample study has not reached the hub yet; `tsunagi status` will say why"
    );
}

/// Waits for the consent service to push the sample to the network, then asks it a decision
/// over its socket, as the DICOM and SS-MIX2 services will.
fn show_consent(binary: &Path, config: &Path, demo_dir: &Path) {
    let start = std::time::Instant::now();
    let mut summary = String::new();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        if let Ok(out) = Command::new(binary)
            .args(["status", "--json", "--config"])
            .arg(config)
            .output()
            && let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            let consent = status["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "consent"))
                .cloned()
                .unwrap_or_default();
            if consent["metrics"]["pending_pushes"] == 0.0 && consent["metrics"]["stale"] == 0.0 {
                summary = consent["summary"].as_str().unwrap_or("").to_owned();
                break;
            }
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "xtask is not async; this polls a process"
        )]
        thread::sleep(std::time::Duration::from_millis(200));
    }
    if summary.is_empty() {
        println!("demo: the consent service has not synced yet; `tsunagi status` will say why");
        return;
    }
    println!("demo: consent: pushed to the network's FHIR server and pulled back ({summary})");
    let socket = demo_dir.join("run").join("consent").join("decide.sock");
    let answer = consent::client::SocketGate::new(&socket)
        .decide_for(
            "0001234",
            consent::protocol::Recipient::Hub,
            consent::protocol::Category::Images,
        )
        .map(|d| serde_json::to_string(&d.decision).unwrap_or_default());
    match answer {
        Ok(a) => println!(
            "demo: may patient 0001234's images go to the hub? the consent service answers {a}"
        ),
        Err(e) => println!("demo: cannot ask the consent service: {e}"),
    }
}

/// Waits for the tunnel, then sends one request through it and says what happened.
fn show_tunnel(net: &TestNet, binary: &Path, config: &Path) {
    let start = std::time::Instant::now();
    let mut summary = String::new();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        let out = Command::new(binary)
            .args(["status", "--json", "--config"])
            .arg(config)
            .output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(line) = text.lines().find(|l| l.contains("\"summary\": \"up via")) {
                summary = line
                    .trim()
                    .trim_start_matches("\"summary\": ")
                    .trim_end_matches(',')
                    .to_owned();
                break;
            }
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "xtask is not async; this polls a process"
        )]
        thread::sleep(std::time::Duration::from_millis(100));
    }
    if summary.is_empty() {
        println!("demo: the tunnel is not up yet; `tsunagi status` will say why");
        return;
    }
    println!("demo: tunnel: {summary}");
    let get = hil_tests::testnet::testnet_binary().map(|bin| {
        let mut c = Command::new(bin);
        c.args([
            "get",
            "http://10.98.0.1:8080/health",
            "--timeout-ms",
            "2000",
        ]);
        c
    });
    match get.map(|c| net.exec(Host::Box, &c)) {
        Ok(Ok(out)) if out.status.success() => println!(
            "demo: box -> hub health check through the tunnel: {}",
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ),
        _ => println!("demo: the request through the tunnel failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_absolute_quoted_paths_and_port() {
        let text = config_text(
            Path::new("/w/target/demo/state"),
            Path::new("/w/target/demo/run"),
            18080,
        )
        .unwrap();
        assert!(text.starts_with("version = 1\n[site]\n"));
        assert!(text.contains("state-dir = \"/w/target/demo/state\"\n"));
        assert!(text.contains("runtime-dir = \"/w/target/demo/run\"\n"));
        assert!(text.contains("listen = \"127.0.0.1:18080\"\n"));
        assert!(text.ends_with("[heartbeat]\ninterval = \"2s\"\n"));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(
            toml_string(Path::new("/a \"b\"\\c\n")).unwrap(),
            r#""/a \"b\"\\c\u000A""#
        );
    }
}
