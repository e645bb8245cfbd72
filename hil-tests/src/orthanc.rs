//! A real Orthanc PACS in a network namespace of its own, for tests of the DICOM bridge,
//! with dcmtk's tools (`echoscu`, `storescu`, `findscu`, `movescu`, `getscu`) as the
//! modality or viewer (dicom.md §4).
//!
//! [`Orthanc::start`] (or [`Orthanc::start_with`]):
//!
//! 1. removes what dead owners left ([`clean_stale`]);
//! 2. creates the network namespace `tsu-pacs-<pid>-<n>` (`ip netns add`, loopback up),
//!    so nothing Orthanc opens is reachable from outside it: Orthanc 1.10 has no bind
//!    address for DICOM and listens on `0.0.0.0`;
//! 3. writes `orthanc.json` into a temporary directory it owns (`$TMPDIR/tsu-pacs-<pid>-<n>-*`):
//!    storage and index in that directory, DICOM on port [`DICOM_PORT`] and HTTP on
//!    [`HTTP_PORT`] (reached as `127.0.0.1` inside the namespace), the AE title of
//!    [`Options::ae_title`], `DicomModalities` from [`Options::modalities`] (so Orthanc can
//!    C-STORE or C-MOVE back to a caller), `DicomCheckCalledAet` on, echo, store, find, get
//!    and move allowed from any AE, remote HTTP access off, no authentication, no plugins,
//!    no storage compression (stored files keep the received data set), no saved jobs;
//!    [`Options::extra`] entries are set last;
//! 4. runs `ip netns exec NS Orthanc orthanc.json` with a clean environment and
//!    `TCP_NODELAY=1` (Orthanc links DCMTK, which otherwise leaves Nagle on: ~40 ms per
//!    small C-STORE, dicom.md §3.2); `ip netns exec` execs, so the child's pid is Orthanc's;
//! 5. waits until `GET /system` answers `200` (at most [`START_TIMEOUT`]).
//!
//! Dropping the guard sends SIGTERM to that pid only, SIGKILL after [`STOP_GRACE`], then
//! deletes the namespace and the directory. Processes a test started in the namespace
//! with [`Orthanc::command`] are the test's to end (wait for them, or use
//! [`Orthanc::output`], which kills on its deadline).
//!
//! The REST helpers ([`Orthanc::get`], [`Orthanc::post`], [`Orthanc::delete`], ...) talk
//! HTTP/1.1 to `127.0.0.1:8042` from a short-lived thread that joined the namespace
//! (`setns`), so the test process itself stays where it is.
//!
//! Stale sets: a namespace or directory named `tsu-pacs-<pid>-<n>` whose `<pid>` no longer
//! exists belongs to a dead test process. [`clean_stale`] kills what still runs in such a
//! namespace (by pid, from `ip netns pids`), deletes it and removes such directories in
//! the temporary directory. Nothing of another shape is touched.
//!
//! Needs root, `ip` (Debian `iproute2`), `Orthanc` (`orthanc`) and, for the tests, the
//! dcmtk tools (`dcmtk`).

use crate::testnet::cmd::display;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};
use serde_json::{Value, json};

use crate::testnet::error_chain;

/// Orthanc's DICOM port inside its namespace.
pub const DICOM_PORT: u16 = 4242;
/// Orthanc's HTTP (REST) port inside its namespace.
pub const HTTP_PORT: u16 = 8042;
/// The AE title unless [`Options::ae_title`] says otherwise.
pub const DEFAULT_AE_TITLE: &str = "ORTHANC";
/// Every namespace and directory of this module starts with this.
pub const NETNS_PREFIX: &str = "tsu-pacs-";

/// How long Orthanc may take to answer `GET /system` after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Orthanc gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Connect, read and write timeout of each REST request.
pub const REST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the tools are looked up (and the only `PATH` they get).
const TOOL_PATH: &str = crate::testnet::cmd::CLEAN_PATH;
/// Where `ip netns` keeps its named namespaces.
use crate::netns::NETNS_DIR;
/// Deadline of the module's own `ip` calls.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of Orthanc's log goes into an error (or to stderr when a test panics).
const LOG_IN_ERROR: usize = 3000;

/// Why the guard could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum OrthancError {
    #[error("the Orthanc guard needs root (network namespaces); running as uid {uid}")]
    NotRoot { uid: u32 },
    #[error(
        "{program} is not installed: not found in {TOOL_PATH} (Debian package `{package}`; \
         `cargo xtask test` installs it, or: apt-get install -y --no-install-recommends {package})"
    )]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("bad Orthanc option {option} = {value}: {reason}")]
    BadOption {
        option: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{command} did not finish within {timeout:?} (killed)")]
    Timeout { command: String, timeout: Duration },
    #[error("cannot enter the network namespace {name}")]
    Netns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("Orthanc exited while starting ({status}); log: {log}")]
    Exited { status: ExitStatus, log: String },
    #[error("Orthanc did not answer GET /system within {timeout:?} (last: {last}); log: {log}")]
    NotReady {
        timeout: Duration,
        last: String,
        log: String,
    },
    #[error("REST {method} {path} failed")]
    Rest {
        method: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot stop Orthanc (pid {pid})")]
    Stop {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cleanup left problems: {}", problems.join("; "))]
    Cleanup { problems: Vec<String> },
}

/// A `GET path` that Orthanc answered with something else than expected.
fn unexpected(path: String, response: &RestResponse) -> OrthancError {
    OrthancError::Rest {
        method: "GET".to_owned(),
        path,
        source: io::Error::other(format!(
            "status {}: {}",
            response.status,
            shorten(&response.text())
        )),
    }
}

/// A DICOM peer Orthanc knows (`DicomModalities`): where it sends C-STORE and C-MOVE
/// sub-operations for this AE title. The host is as seen from inside the namespace
/// (`127.0.0.1` for a dcmtk tool or a bridge running in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modality {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
}

impl Modality {
    /// A peer on `127.0.0.1:port` inside the namespace.
    pub fn local(ae_title: &str, port: u16) -> Modality {
        Modality {
            ae_title: ae_title.to_owned(),
            host: Ipv4Addr::LOCALHOST.to_string(),
            port,
        }
    }
}

/// How Orthanc is configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// `DicomAet` (default [`DEFAULT_AE_TITLE`]): 1-16 characters, no backslash, not all
    /// spaces. `DicomCheckCalledAet` is on, so a wrong called AE title is rejected.
    pub ae_title: String,
    /// `DicomModalities`, keyed by AE title (each must be unique).
    pub modalities: Vec<Modality>,
    /// More configuration entries (e.g. `MaximumPduLength`, `DicomScpTimeout`,
    /// `StableAge`, `OverwriteInstances`, `UnknownSopClassAccepted`), set over the
    /// defaults.
    pub extra: serde_json::Map<String, Value>,
    /// Run inside this existing network namespace (e.g. the test network's hub, for the
    /// demo) instead of one of its own; the caller owns it, so it is neither created nor
    /// removed here. Orthanc listens on every address of that namespace.
    pub netns: Option<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            ae_title: DEFAULT_AE_TITLE.to_owned(),
            modalities: Vec::new(),
            extra: serde_json::Map::new(),
            netns: None,
        }
    }
}

/// A REST response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestResponse {
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RestResponse {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The body as text (lossy), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A bare network namespace of this module's shape (`tsu-pacs-<pid>-<n>`, loopback up),
/// for peers that are not Orthanc (e.g. dcmtk's `storescp` in `cargo xtask bench dicom`):
/// whatever listens in it is reachable from nowhere else. Deleted on drop; left behind by a
/// dead process, [`clean_stale`] removes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// `/run/netns/NAME`, open for [`Netns::run`].
    file: File,
    ip: PathBuf,
}

impl Netns {
    /// Cleans stale sets and creates the namespace (needs root).
    pub fn create() -> Result<Netns, OrthancError> {
        let uid = geteuid();
        if !uid.is_root() {
            return Err(OrthancError::NotRoot { uid: uid.as_raw() });
        }
        let ip = find_tool("ip", "iproute2")?;
        let _ = clean_stale();
        let name = create_netns(&ip)?;
        match crate::netns::open(&name) {
            Ok(file) => Ok(Netns { name, file, ip }),
            Err(source) => {
                let _ = delete_netns(&ip, &name);
                Err(OrthancError::Netns { name, source })
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread in the namespace ([`crate::netns::run_in`]): a client in the
    /// test process that talks to a server in it. Threads `f` spawns are in it too.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, OrthancError> {
        crate::netns::run_in(&self.file, f).map_err(|source| OrthancError::Netns {
            name: self.name.clone(),
            source,
        })
    }

    /// `ip netns exec NS PROGRAM` with a clean environment (`PATH`, `TCP_NODELAY=1`), as
    /// [`Orthanc::command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns_command(&self.ip, &self.name, program.as_ref())
    }

    /// Runs `command` with stdin closed, capturing its output; kills it after `timeout`.
    pub fn output(&self, command: &mut Command, timeout: Duration) -> Result<Output, OrthancError> {
        output_with_timeout(command, timeout)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = delete_netns(&self.ip, &self.name);
    }
}

fn netns_command(ip: &Path, netns: &str, program: &OsStr) -> Command {
    let mut command = Command::new(ip);
    command
        .env_clear()
        .env("PATH", TOOL_PATH)
        .env("TCP_NODELAY", "1")
        .args(["netns", "exec", netns])
        .arg(program);
    command
}

/// A running Orthanc in its own network namespace (see the module docs). Stops on drop.
#[derive(Debug)]
pub struct Orthanc {
    child: Option<Child>,
    netns: String,
    /// Whether the namespace is ours to remove.
    owns_netns: bool,
    /// `/run/netns/NAME`, open for `setns`.
    netns_file: File,
    ae_title: String,
    path: PathBuf,
    /// Removed on drop, after the process and the namespace.
    dir: Option<tempfile::TempDir>,
    ip: PathBuf,
}

impl Orthanc {
    /// [`Orthanc::start_with`] the default [`Options`].
    pub fn start() -> Result<Orthanc, OrthancError> {
        Orthanc::start_with(&Options::default())
    }

    /// Cleans stale sets, creates the namespace, writes the configuration, starts Orthanc
    /// and waits until its REST API answers. Undoes what it did on failure.
    pub fn start_with(options: &Options) -> Result<Orthanc, OrthancError> {
        let uid = geteuid();
        if !uid.is_root() {
            return Err(OrthancError::NotRoot { uid: uid.as_raw() });
        }
        let ip = find_tool("ip", "iproute2")?;
        let orthanc = find_tool("Orthanc", "orthanc")?;
        check_options(options)?;
        // Problems with someone else's leftovers do not stop this start.
        let _ = clean_stale();

        let (netns, owned) = match &options.netns {
            Some(name) => (name.clone(), false),
            None => (create_netns(&ip)?, true),
        };
        let mut guard = Orthanc {
            owns_netns: owned,
            child: None,
            netns_file: match crate::netns::open(&netns) {
                Ok(file) => file,
                Err(source) => {
                    if owned {
                        let _ = delete_netns(&ip, &netns);
                    }
                    return Err(OrthancError::Netns {
                        name: netns,
                        source,
                    });
                }
            },
            netns: netns.clone(),
            ae_title: options.ae_title.clone(),
            path: PathBuf::new(),
            dir: None,
            ip: ip.clone(),
        };
        // From here on, dropping `guard` undoes everything.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{netns}-"))
            .tempdir()
            .map_err(io_err("create a directory in", &std::env::temp_dir()))?;
        guard.path = dir.path().to_owned();
        guard.dir = Some(dir);
        let conf = guard.config_file();
        let text = serde_json::to_string_pretty(&config(&guard.path, options))
            .map_err(|e| io_err("render", &conf)(io::Error::other(e)))?;
        fs::write(&conf, text).map_err(io_err("write", &conf))?;

        let log_path = guard.log_file();
        let log = File::create(&log_path).map_err(io_err("create", &log_path))?;
        let log2 = log.try_clone().map_err(io_err("reopen", &log_path))?;
        let mut command = Command::new(&ip);
        command
            .env_clear()
            .env("PATH", TOOL_PATH)
            .env("TCP_NODELAY", "1")
            .args(["netns", "exec", &netns])
            .arg(&orthanc)
            .arg(&conf)
            .current_dir(&guard.path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let line = display(&command);
        let child = command.spawn().map_err(|source| OrthancError::Spawn {
            command: line,
            source,
        })?;
        guard.child = Some(child);
        guard.wait_ready()?;
        Ok(guard)
    }

    /// [`Orthanc::start`], panicking with the whole error chain (for tests: a missing
    /// package or no root is a failure, never a skip).
    pub fn start_for_test() -> Orthanc {
        Orthanc::start_for_test_with(&Options::default())
    }

    /// [`Orthanc::start_with`], panicking like [`Orthanc::start_for_test`].
    pub fn start_for_test_with(options: &Options) -> Orthanc {
        match Orthanc::start_with(options) {
            Ok(orthanc) => orthanc,
            Err(e) => panic!("the Orthanc test PACS did not start: {}", error_chain(&e)),
        }
    }

    /// The network namespace (`tsu-pacs-<pid>-<n>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Where DICOM clients inside the namespace connect: `127.0.0.1:4242`.
    pub fn dicom_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, DICOM_PORT)
    }

    /// Where the REST API listens inside the namespace: `127.0.0.1:8042`.
    pub fn http_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, HTTP_PORT)
    }

    /// Orthanc's AE title (the called AE title clients must use).
    pub fn ae_title(&self) -> &str {
        &self.ae_title
    }

    /// Orthanc's pid (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The guard's directory (configuration, `storage/`, `index/`, `orthanc.log`).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn config_file(&self) -> PathBuf {
        self.path.join("orthanc.json")
    }

    pub fn log_file(&self) -> PathBuf {
        self.path.join("orthanc.log")
    }

    /// Orthanc's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// `program` to run inside the namespace: `ip netns exec NS PROGRAM`, with a clean
    /// environment (`PATH` and `TCP_NODELAY=1`). Add arguments, stdio and more variables
    /// as usual; `ip netns exec` execs, so the child's pid is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns_command(&self.ip, &self.netns, program.as_ref())
    }

    /// Runs `command` (e.g. from [`Orthanc::command`]) with stdin closed, capturing its
    /// output; kills it after `timeout`. Returns the output whatever the exit status.
    pub fn output(&self, command: &mut Command, timeout: Duration) -> Result<Output, OrthancError> {
        output_with_timeout(command, timeout)
    }

    /// `echoscu -aec AE 127.0.0.1 4242` in the namespace; an error unless it succeeds.
    pub fn echo(&self) -> Result<(), OrthancError> {
        let mut command = self.command("echoscu");
        command
            .args([
                "-to",
                "10",
                "-ta",
                "10",
                "-td",
                "10",
                "-aec",
                &self.ae_title,
            ])
            .args(["127.0.0.1", &DICOM_PORT.to_string()]);
        let output = self.output(&mut command, Duration::from_secs(30))?;
        check_output(&command, &output)
    }

    /// One REST request inside the namespace: `method path` (`path` with its query), with
    /// `body` as `(content type, bytes)`. Any status is returned; errors are I/O only.
    pub fn rest(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<RestResponse, OrthancError> {
        let addr = SocketAddr::V4(self.http_addr());
        let rest_err = |source| OrthancError::Rest {
            method: method.to_owned(),
            path: path.to_owned(),
            source,
        };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') || !path.starts_with('/') {
            return Err(rest_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path must start with / and contain no spaces or control characters",
            )));
        }
        self.in_netns(|| http_request(addr, method, path, body))?
            .map_err(rest_err)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<RestResponse, OrthancError> {
        self.rest("GET", path, None)
    }

    /// `POST path` with a body of `content_type`.
    pub fn post(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<RestResponse, OrthancError> {
        self.rest("POST", path, Some((content_type, body)))
    }

    /// `POST path` with a JSON body (e.g. `/tools/find`).
    pub fn post_json(&self, path: &str, body: &Value) -> Result<RestResponse, OrthancError> {
        self.post(path, "application/json", body.to_string().as_bytes())
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<RestResponse, OrthancError> {
        self.rest("DELETE", path, None)
    }

    /// The Orthanc ids of all stored instances (`GET /instances`).
    pub fn instances(&self) -> Result<Vec<String>, OrthancError> {
        let response = self.get("/instances")?;
        let ids = match response.json() {
            Value::Array(ids) if response.status == 200 => ids
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => {
                return Err(OrthancError::Rest {
                    method: "GET".to_owned(),
                    path: "/instances".to_owned(),
                    source: io::Error::other(format!(
                        "status {}: {}",
                        response.status,
                        shorten(&response.text())
                    )),
                });
            }
        };
        Ok(ids)
    }

    /// The stored file of instance `id` (`GET /instances/{id}/file`), as Orthanc keeps
    /// it (its own file meta information, the received data set).
    pub fn instance_file(&self, id: &str) -> Result<Vec<u8>, OrthancError> {
        let path = format!("/instances/{id}/file");
        let response = self.get(&path)?;
        if response.status != 200 {
            return Err(unexpected(path, &response));
        }
        Ok(response.body)
    }

    /// Where Orthanc stored the file of instance `id` on its disk (its `dicom` attachment;
    /// `StorageCompression` is off, so the file is as received): for instances too large to
    /// fetch whole over REST.
    pub fn stored_file(&self, id: &str) -> Result<PathBuf, OrthancError> {
        let path = format!("/instances/{id}/attachments/dicom/info");
        let response = self.get(&path)?;
        let uuid = response.json()["Uuid"].as_str().map(str::to_owned);
        match uuid {
            Some(u) if response.status == 200 && u.len() > 4 && u.is_ascii() => Ok(self
                .path
                .join("storage")
                .join(&u[..2])
                .join(&u[2..4])
                .join(&u)),
            _ => Err(unexpected(path, &response)),
        }
    }

    /// Stops Orthanc, deletes the namespace and the directory, reporting problems (drop
    /// does the same and ignores them).
    pub fn stop(mut self) -> Result<(), OrthancError> {
        let problems = self.teardown();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(OrthancError::Cleanup { problems })
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(child) = self.child.take()
            && let Err(e) = stop_child(child)
        {
            problems.push(error_chain(&e));
        }
        if self.owns_netns
            && !self.netns.is_empty()
            && Path::new(NETNS_DIR).join(&self.netns).exists()
            && let Err(e) = delete_netns(&self.ip, &self.netns)
        {
            problems.push(error_chain(&e));
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            problems.push(format!("cannot remove {}: {e}", self.path.display()));
        }
        problems
    }

    /// Runs `f` on a thread in Orthanc's namespace ([`crate::netns::run_in`]).
    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, OrthancError> {
        crate::netns::run_in(&self.netns_file, f).map_err(|source| OrthancError::Netns {
            name: self.netns.clone(),
            source,
        })
    }

    /// Polls `GET /system` until it answers `200`, or Orthanc exits, or the deadline.
    fn wait_ready(&mut self) -> Result<(), OrthancError> {
        let addr = SocketAddr::V4(self.http_addr());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(OrthancError::Exited {
                    status,
                    log: crate::testnet::cmd::tail(&self.log(), LOG_IN_ERROR),
                });
            }
            let last = match self.in_netns(|| http_request(addr, "GET", "/system", None))? {
                Ok(response) if response.status == 200 => return Ok(()),
                Ok(response) => format!("status {}", response.status),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(OrthancError::NotReady {
                    timeout: START_TIMEOUT,
                    last,
                    log: crate::testnet::cmd::tail(&self.log(), LOG_IN_ERROR),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log();
            if !log.is_empty() {
                eprintln!(
                    "Orthanc log ({}):\n{}",
                    self.log_file().display(),
                    crate::testnet::cmd::tail(&log, LOG_IN_ERROR)
                );
            }
        }
        let _ = self.teardown();
    }
}

/// Removes what dead owners left: namespaces `tsu-pacs-<pid>-<n>` whose `<pid>` is gone
/// (after SIGKILL to the processes still in them, from `ip netns pids`), and directories
/// of that name in the temporary directory. Returns the namespaces removed.
pub fn clean_stale() -> Result<Vec<String>, OrthancError> {
    let ip = find_tool("ip", "iproute2")?;
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !owner_is_dead(&name) {
                continue;
            }
            problems.extend(kill_netns_processes(&ip, &name));
            match delete_netns(&ip, &name) {
                Ok(()) => removed.push(name),
                // Someone else cleaned it meanwhile.
                Err(_) if !Path::new(NETNS_DIR).join(&name).exists() => {}
                Err(e) => problems.push(error_chain(&e)),
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // `tsu-pacs-<pid>-<n>-<random>`
            let Some((netns, _random)) = name.rsplit_once('-') else {
                continue;
            };
            if owner_is_dead(netns)
                && entry.file_type().is_ok_and(|t| t.is_dir())
                && let Err(e) = fs::remove_dir_all(entry.path())
                && e.kind() != io::ErrorKind::NotFound
            {
                problems.push(format!("cannot remove {}: {e}", entry.path().display()));
            }
        }
    }
    if problems.is_empty() {
        Ok(removed)
    } else {
        Err(OrthancError::Cleanup { problems })
    }
}

/// Whether `name` is `tsu-pacs-<pid>-<n>` and no process `<pid>` exists.
fn owner_is_dead(name: &str) -> bool {
    let Some((pid, n)) = name
        .strip_prefix(NETNS_PREFIX)
        .and_then(|rest| rest.split_once('-'))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return false;
    }
    // A zombie or a reused pid keeps the set until that process is gone too.
    !Path::new("/proc").join(pid).exists()
}

/// SIGKILL to every process in namespace `name` (a dead owner's: Orthanc, or tools a
/// test started there), and a short wait for them to go.
fn kill_netns_processes(ip: &Path, name: &str) -> Vec<String> {
    let mut command = Command::new(ip);
    command
        .env_clear()
        .env("PATH", TOOL_PATH)
        .args(["netns", "pids", name]);
    let pids: Vec<i32> = match output_with_timeout(&mut command, IP_TIMEOUT) {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(e) => return vec![error_chain(&e)],
    };
    let mut problems = Vec::new();
    for &pid in &pids {
        if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL)
            && e != nix::errno::Errno::ESRCH
        {
            problems.push(format!("cannot kill pid {pid} in {name}: {e}"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|&pid| running(pid)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    problems
}

/// Whether process `pid` exists and is not a zombie (a zombie has left the namespace).
fn running(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// Creates `tsu-pacs-<pid>-<n>` (the first free `<n>`) with loopback up.
fn create_netns(ip: &Path) -> Result<String, OrthancError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{pid}-{n}");
        // Left by an earlier process with this pid (it died; ours lives, so nobody else
        // cleans it now): take the next number, the next start elsewhere cleans it.
        if Path::new(NETNS_DIR).join(&name).exists() {
            continue;
        }
        run_ip(ip, &["netns", "add", &name])?;
        if let Err(e) = run_ip(ip, &["-n", &name, "link", "set", "lo", "up"]) {
            let _ = delete_netns(ip, &name);
            return Err(e);
        }
        return Ok(name);
    }
}

fn delete_netns(ip: &Path, name: &str) -> Result<(), OrthancError> {
    run_ip(ip, &["netns", "del", name])
}

fn run_ip(ip: &Path, args: &[&str]) -> Result<(), OrthancError> {
    let mut command = Command::new(ip);
    command.env_clear().env("PATH", TOOL_PATH).args(args);
    let output = output_with_timeout(&mut command, IP_TIMEOUT)?;
    check_output(&command, &output)
}

fn check_output(command: &Command, output: &Output) -> Result<(), OrthancError> {
    if output.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    Err(OrthancError::Command {
        command: display(command),
        status: output.status,
        stderr: shorten(&stderr),
    })
}

/// The configuration file's contents.
fn config(dir: &Path, options: &Options) -> Value {
    let modalities: serde_json::Map<String, Value> = options
        .modalities
        .iter()
        .map(|m| (m.ae_title.clone(), json!([m.ae_title, m.host, m.port])))
        .collect();
    let mut config = json!({
        "Name": "tsunagi-test-pacs",
        "StorageDirectory": dir.join("storage"),
        "IndexDirectory": dir.join("index"),
        "StorageCompression": false,
        "Plugins": [],
        "DicomServerEnabled": true,
        "DicomAet": options.ae_title,
        "DicomPort": DICOM_PORT,
        "DicomCheckCalledAet": true,
        "DicomModalities": modalities,
        "DicomAlwaysAllowEcho": true,
        "DicomAlwaysAllowStore": true,
        "DicomAlwaysAllowFind": true,
        "DicomAlwaysAllowGet": true,
        "DicomAlwaysAllowMove": true,
        "HttpServerEnabled": true,
        "HttpPort": HTTP_PORT,
        "RemoteAccessAllowed": false,
        "AuthenticationEnabled": false,
        "HttpDescribeErrors": true,
        "ExecuteLuaEnabled": false,
        "SaveJobs": false,
    });
    if let Value::Object(map) = &mut config {
        for (key, value) in &options.extra {
            map.insert(key.clone(), value.clone());
        }
    }
    config
}

fn check_options(options: &Options) -> Result<(), OrthancError> {
    let bad = |option, value: &str, reason| OrthancError::BadOption {
        option,
        value: value.to_owned(),
        reason,
    };
    let ae_ok = |ae: &str| {
        (1..=16).contains(&ae.len())
            && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
            && !ae.trim().is_empty()
    };
    if !ae_ok(&options.ae_title) {
        return Err(bad(
            "ae_title",
            &options.ae_title,
            "1-16 printable ASCII characters, no backslash, not all spaces",
        ));
    }
    let mut seen = BTreeMap::new();
    for m in &options.modalities {
        if !ae_ok(&m.ae_title) {
            return Err(bad(
                "modalities",
                &m.ae_title,
                "AE title: 1-16 printable ASCII characters, no backslash",
            ));
        }
        if seen.insert(m.ae_title.as_str(), ()).is_some() {
            return Err(bad("modalities", &m.ae_title, "AE title listed twice"));
        }
        if m.port == 0 {
            return Err(bad("modalities", &m.ae_title, "port 0"));
        }
    }
    Ok(())
}

/// One HTTP/1.1 request (`Connection: close`); the body by `Content-Length`, chunked, or
/// up to the end of the stream.
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> io::Result<RestResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, REST_TIMEOUT)?;
    stream.set_read_timeout(Some(REST_TIMEOUT))?;
    stream.set_write_timeout(Some(REST_TIMEOUT))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    match body {
        Some((content_type, bytes)) => head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            bytes.len()
        )),
        None if method == "POST" || method == "PUT" => head.push_str("Content-Length: 0\r\n\r\n"),
        None => head.push_str("\r\n"),
    }
    stream.write_all(head.as_bytes())?;
    if let Some((_, bytes)) = body {
        stream.write_all(bytes)?;
    }
    stream.flush()?;

    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("the response head ends early"));
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| bad("bad Content-Length"))?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(RestResponse {
        status,
        headers,
        body,
    })
}

/// Runs `command` with stdin closed, capturing stdout and stderr; SIGKILL (by pid) after
/// `timeout`.
fn output_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output, OrthancError> {
    let line = display(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| OrthancError::Spawn {
            command: line.clone(),
            source,
        })?;
    let read = |pipe: Option<Box<dyn io::Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        if let Some(mut pipe) = pipe {
            thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                let _ = tx.send(bytes);
            });
        }
        rx
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
    );
    let stderr = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let wait_err = |source| OrthancError::Spawn {
        command: line.clone(),
        source,
    };
    let status = loop {
        if let Some(status) = child.try_wait().map_err(wait_err)? {
            break status;
        }
        if Instant::now() >= deadline {
            // Not reaped yet, so the pid is still this child.
            let _ = child.kill();
            let _ = child.wait();
            return Err(OrthancError::Timeout {
                command: line,
                timeout,
            });
        }
        thread::sleep(Duration::from_millis(10));
    };
    // The pipes close when the process exits, unless it left a child holding them.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(2))
            .ok()
            .unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// SIGTERM to the pid, up to [`STOP_GRACE`], then SIGKILL; reap.
fn stop_child(child: Child) -> Result<(), OrthancError> {
    let pid = child.id();
    crate::testnet::cmd::stop_child(child, STOP_GRACE, false)
        .map_err(|source| OrthancError::Stop { pid, source })
}

/// `program` in [`TOOL_PATH`], or [`OrthancError::Missing`].
fn find_tool(program: &'static str, package: &'static str) -> Result<PathBuf, OrthancError> {
    crate::testnet::cmd::find_in_clean_path(program)
        .ok_or(OrthancError::Missing { program, package })
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OrthancError + 'a {
    move |source| OrthancError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// At most 600 bytes of `text`, for error messages.
fn shorten(text: &str) -> String {
    const MAX: usize = 600;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_need_the_exact_shape_and_a_dead_owner() {
        // Our own pid lives.
        assert!(!owner_is_dead(&format!(
            "{NETNS_PREFIX}{}-0",
            std::process::id()
        )));
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        assert!(owner_is_dead(&format!("{NETNS_PREFIX}{dead}-3")));
        for other in [
            format!("{NETNS_PREFIX}{dead}"),
            format!("{NETNS_PREFIX}{dead}-"),
            format!("{NETNS_PREFIX}{dead}-x"),
            format!("{NETNS_PREFIX}-{dead}-1"),
            "tn123456-hub".to_owned(),
            format!("tsu-pac-{dead}-1"),
        ] {
            assert!(!owner_is_dead(&other), "{other}");
        }
    }

    #[test]
    fn config_has_the_modalities_and_the_extras() {
        let options = Options {
            ae_title: "TESTPACS".to_owned(),
            modalities: vec![Modality::local("MOVESCU", 11113)],
            extra: serde_json::Map::from_iter([("MaximumPduLength".to_owned(), json!(16384))]),
            netns: None,
        };
        check_options(&options).unwrap();
        let config = config(Path::new("/tmp/x"), &options);
        assert_eq!(config["DicomAet"], "TESTPACS");
        assert_eq!(
            config["DicomModalities"]["MOVESCU"],
            json!(["MOVESCU", "127.0.0.1", 11113])
        );
        assert_eq!(config["StorageDirectory"], "/tmp/x/storage");
        assert_eq!(config["MaximumPduLength"], 16384);
        assert_eq!(config["RemoteAccessAllowed"], false);
        assert_eq!(config["Plugins"], json!([]));

        for ae in ["", "SEVENTEEN_CHARS_X", "A\\B", "   "] {
            let options = Options {
                ae_title: ae.to_owned(),
                ..Options::default()
            };
            assert!(check_options(&options).is_err(), "{ae:?}");
        }
        let twice = Options {
            modalities: vec![Modality::local("A", 1), Modality::local("A", 2)],
            ..Options::default()
        };
        assert!(check_options(&twice).is_err());
    }
}
