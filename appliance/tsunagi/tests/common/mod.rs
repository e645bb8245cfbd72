//! A harness that runs the real `tsunagi` binary as a supervisor in a temporary directory.
#![allow(dead_code, unreachable_pub)] // Each test file uses a different part of it.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

mod files;
pub mod staff;
#[allow(unused_imports)] // Only some test files use it.
pub use files::files_under;

pub const BIN: &str = env!("CARGO_BIN_EXE_tsunagi");

/// Timings short enough for tests (the defaults are seconds to minutes).
pub const FAST_SUPERVISOR: &str = r#"
[supervisor]
stop-timeout = "2s"
ready-timeout = "10s"
backoff-initial = "200ms"
backoff-max = "5s"
crash-limit = 4
crash-window = "1m"
failed-retry = "10m"
stable-after = "30s"
"#;

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Whether a root-only test may be skipped here (never in CI, which runs as root).
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root and CI must run it"
    );
    eprintln!("{test}: skipped, needs root (CI runs it as root)");
    true
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub log: Arc<Mutex<String>>,
}

impl Harness {
    /// A config with the given extra TOML (sections after `[site]` and `[paths]`).
    pub fn new(extra: &str) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("tsunagi-test-")
            .tempdir()
            .unwrap();
        // Service users must be able to reach their state directories.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("tsunagi.toml");
        let h = Harness {
            dir,
            config,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
        };
        h.write_config(extra);
        h
    }

    /// `tsunagi ARGS --config CONFIG`, which must succeed: its standard output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tsunagi {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn config_text(&self, extra: &str) -> String {
        format!(
            "version = 1\n\n[site]\nfacility-code = \"1312345678\"\nae-title = \"TSUNAGI-TEST\"\n\n[paths]\nstate-dir = \"{}\"\nruntime-dir = \"{}\"\n{extra}\n",
            self.state_dir().display(),
            self.runtime_dir().display()
        )
    }

    pub fn write_config(&self, extra: &str) {
        fs::write(&self.config, self.config_text(extra)).unwrap();
    }

    /// Starts `tsunagi run`; its stderr is collected into `self.log`.
    pub fn start(&mut self) {
        self.start_with(|_| {});
    }

    /// Starts `tsunagi run` inside network namespace `ns` (`ip netns exec` execs it, so the
    /// pid is the supervisor's).
    pub fn start_in_netns(&mut self, ns: &str) {
        let ns = ns.to_owned();
        self.start_program(Command::new("ip").args(["netns", "exec", &ns, BIN]), |_| {});
    }

    pub fn start_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        self.start_program(&mut Command::new(BIN), adjust);
    }

    fn start_program(&mut self, cmd: &mut Command, adjust: impl FnOnce(&mut Command)) {
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        adjust(cmd);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                eprint!("  | {line}");
                log.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `tsunagi status --json`, parsed; None if the supervisor does not answer (yet).
    pub fn status(&self) -> Option<Value> {
        let out = Command::new(BIN)
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Polls the status until `cond` holds, or panics after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Some(status) = self.status() {
                if cond(&status) {
                    return status;
                }
                last = Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}; last status: {last:#?}");
    }

    /// Waits for the supervisor to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().unwrap();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && child.try_wait().ok().flatten().is_none()
        {
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = kill(pid, Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Children die with the supervisor (parent-death signal).
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The service named `name` in a status report.
pub fn service<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {status:#}"))
}

pub fn state_of<'a>(status: &'a Value, name: &str) -> &'a str {
    service(status, name)["state"].as_str().unwrap()
}

pub fn pid_of(status: &Value, name: &str) -> Option<i32> {
    service(status, name)["pid"]
        .as_i64()
        .map(|p| i32::try_from(p).unwrap())
}

/// Whether a process is alive (zombies count as dead: they run nothing).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
    }
}

/// A `key:\tvalue` line of /proc/PID/status.
pub fn proc_status(pid: i32, key: &str) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET a path over plain HTTP on loopback.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// As if the consent service had just pulled from the network: the cache is fresh.
pub fn mark_consent_synced(h: &Harness) {
    let db = h.state_dir().join("consent").join("consent.db");
    let conn = rusqlite::Connection::open(db).unwrap();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    conn.execute("UPDATE sync_state SET last_pull_at = ?1", [now])
        .unwrap();
}

/// `tsunagi consent register PATIENT` (every category, every participant) with a sample
/// name, `form` as the evidence, plus `extra` arguments.
/// `tsunagi consent network-id PATIENT ID` (名寄せ: the network's ID for the patient).
pub fn set_network_id(h: &Harness, patient: &str, id: &str) {
    consent_ok(h, &["network-id", patient, id]);
}

/// `tsunagi consent ARGS --config ...`, which must succeed.
pub fn consent_ok(h: &Harness, args: &[&str]) {
    h.cli(&[&["consent"], args].concat());
}

/// `tsunagi consent withdraw PATIENT` (recorded at the desk).
pub fn withdraw_consent(h: &Harness, patient: &str) {
    consent_ok(h, &["withdraw", patient, "--recorded-by", "staff-2"]);
}

pub fn register_consent(h: &Harness, form: &Path, patient: &str, extra: &[&str]) {
    let out = Command::new(BIN)
        .args([
            "consent", "register", patient, "--family", "山田", "--given", "花子",
        ])
        .args([
            "--family-kana",
            "ヤマダ",
            "--given-kana",
            "ハナコ",
            "--birth-date",
            "1950-04-01",
        ])
        .args(["--sex", "female", "--recorded-by", "staff-1", "--evidence"])
        .arg(form)
        .args(extra)
        .args(
            ["--scope", "--categories"]
                .into_iter()
                .filter(|flag| !extra.contains(flag))
                .flat_map(|flag| [flag, "all"]),
        )
        .arg("--config")
        .arg(&h.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "register {patient}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TLS files for a service that reads them after dropping privileges: the CA, the box's
/// certificate and its key copied into `dir` (created, mode 0755) as `ca.pem`, `box.pem`
/// and `box.key` (mode 0600), owned by the service's user `user` when run as root. The
/// paths of the three copies.
pub fn service_tls_files(
    dir: &Path,
    user: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> (PathBuf, PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let copies = (dir.join("ca.pem"), dir.join("box.pem"), dir.join("box.key"));
    for (from, to) in [(ca, &copies.0), (cert, &copies.1), (key, &copies.2)] {
        fs::copy(from, to).unwrap();
    }
    fs::set_permissions(&copies.2, fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        let id = tsunagi_runtime::privilege::ensure_user(user).unwrap();
        for path in [&copies.0, &copies.1, &copies.2] {
            nix::unistd::chown(path, Some(id.uid), Some(id.gid)).unwrap();
        }
    }
    copies
}

/// An ATNA audit repository (a real rsyslog with gnutls and a test PKI of its own), in
/// network namespace `netns` (the machine's own when `None`) on `listen` (a free port of
/// 127.0.0.1 when `None`), and the `[audit]` section that sends to it (append it to a
/// config); the directory holding its files (keep it).
pub fn audit_repository(
    netns: Option<&str>,
    listen: Option<std::net::SocketAddrV4>,
) -> (hil_tests::rsyslog::Rsyslog, String, tempfile::TempDir) {
    use hil_tests::nginx::Pki;
    use hil_tests::rsyslog::{Options, Rsyslog, Tls};
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // The repository's certificate names the address it listens on.
    let ips: Vec<std::net::Ipv4Addr> = listen.iter().map(|a| *a.ip()).collect();
    let pki = Pki::generate_for(&dir.path().join("pki"), &ips).unwrap();
    let rsyslog = Rsyslog::start(
        &Tls {
            cert: pki.server_cert(),
            key: pki.server_key(),
            client_ca: pki.ca_cert(),
        },
        &Options {
            netns: netns.map(str::to_owned),
            listen,
        },
    )
    .unwrap();
    let (ca, cert, key) = service_tls_files(
        &dir.path().join("tls"),
        audit::service::USER,
        &pki.ca_cert(),
        &pki.client_cert(),
        &pki.client_key(),
    );
    let section = format!(
        "\n[audit]\nenabled = true\nrepository = \"{}\"\nca-file = \"{}\"\nclient-cert-file = \"{}\"\nclient-key-file = \"{}\"\ntimeout = \"5s\"\n",
        rsyslog.addr(),
        ca.display(),
        cert.display(),
        key.display(),
    );
    (rsyslog, section, dir)
}

/// The audit messages at `rsyslog` once `done` holds for them (at most `timeout`); fails
/// with what arrived.
pub fn audit_messages_until(
    rsyslog: &hil_tests::rsyslog::Rsyslog,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let start = Instant::now();
    loop {
        let messages = rsyslog.messages();
        if done(&messages) {
            return messages;
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not at the audit repository within {timeout:?}; {} messages there:\n{}\n{}",
            messages.len(),
            messages.join("\n"),
            rsyslog.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A clinic for the console's tests (issue 19): a supervisor with the console on a loopback
/// port, the consent service syncing with the strict FHIR server (its facility directory:
/// `hil_tests::fhir::SAMPLE_DIRECTORY`), and the audit trail to a
/// real rsyslog; started, with the first administrator's one-time setup code made.
pub struct ConsoleClinic {
    pub h: Harness,
    pub rsyslog: hil_tests::rsyslog::Rsyslog,
    _audit_files: tempfile::TempDir,
    /// The network's FHIR server.
    pub fhir: std::net::SocketAddr,
    pub setup_code: String,
    /// The console's self-signed certificate (PEM).
    pub cert: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub base: String,
}

impl ConsoleClinic {
    pub fn start() -> ConsoleClinic {
        ConsoleClinic::start_with("", &[])
    }

    /// [`ConsoleClinic::start`] with more of the config (`extra`, appended) and more
    /// services that must be ready.
    pub fn start_with(extra: &str, ready: &[&str]) -> ConsoleClinic {
        use hil_tests::fhir::{Server, Validator, schema_path};
        let (rsyslog, audit, audit_files) = audit_repository(None, None);
        // Strict: every resource pushed must validate; its pulls keep the cache fresh.
        let validator = Validator::load(&schema_path().unwrap()).unwrap();
        let fhir = Server::new(validator)
            .spawn("127.0.0.1:0".parse().unwrap())
            .unwrap();
        hil_tests::fhir::seed_directory(fhir).unwrap();
        let port = free_port();
        let mut h = Harness::new(&format!(
            "{FAST_SUPERVISOR}\n[heartbeat]\nenabled = true\n\n[consent]\nenabled = true\nfhir-url = \"http://{fhir}/fhir\"\npull-interval = \"1s\"\n\n[console]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n{audit}\n{extra}"
        ));
        let setup_code = h.cli(&["console", "setup-code"]);
        h.start();
        h.wait_for(
            "the console and consent ready",
            Duration::from_secs(30),
            |s| {
                ["console", "consent"]
                    .iter()
                    .chain(ready)
                    .all(|name| state_of(s, name) == "ready")
            },
        );
        let cert = h
            .state_dir()
            .join("console")
            .join(console::tls::SELF_SIGNED_CERT);
        ConsoleClinic {
            h,
            rsyslog,
            _audit_files: audit_files,
            fhir,
            setup_code,
            cert,
            base: format!("https://127.0.0.1:{port}"),
        }
    }
}
