//! A real Samba server (smbd) with one read-only share, the stand-in for the clinic EMR
//! server's SMB share that holds the SS-MIX2 storage (issue 16): the booted image's kernel
//! CIFS client mounts it (`mount -t cifs //ADDR/ssmix2 ... vers=3.x`, signed), and tests
//! write the clinic's files into it directly on disk.
//!
//! [`Samba::start`] makes a temporary directory it owns (`$TMPDIR/tsunagi-samba-*`, mode
//! 0711 so that `nobody` can traverse it) and, in it:
//!
//! - `smb.conf`: every path Samba uses in the directory (`private/`, mode 0700, with
//!   `passdb.tdb` and `secrets.tdb`; `lock/`, `state/`, `cache/`, `pid/`, `ncalrpc/`;
//!   the log); `server role = standalone server`; `interfaces = ADDR` with
//!   `bind interfaces only = yes` and `smb ports = PORT`, so smbd listens on that one
//!   address and port and nowhere else; `server min protocol = SMB3_00` (a client must
//!   speak SMB 3.0, 3.0.2 or 3.1.1; Samba's plain `SMB3` would mean 3.1.1 only) and
//!   `server signing = mandatory`; no NetBIOS, no printing, no guest
//!   (`map to guest = never`, `restrict anonymous = 2`); no `samba-dcerpcd` (`rpc start on
//!   demand helpers = no`: smbd would start it on the first RPC, such as a share listing,
//!   in a session of its own that outlives smbd); no `SO_REUSEPORT` (smbd sets it by
//!   default, and two servers on one port would share the connections: without it a
//!   taken port fails the start); no core files;
//! - `share/` (mode 0755; [`Samba::share_dir`]), shared as [`SHARE`]: read-only,
//!   `guest ok = no`, `valid users = nobody`. smbd reads it as the unix user `nobody`, so
//!   what a test writes there must be world-readable (the usual 0755 directories and 0644
//!   files);
//! - a Samba account for the unix user `nobody` ([`USER`]) with a random password (16 bytes
//!   from `/dev/urandom`, in hex; [`Samba::password`]), added with `smbpasswd -c smb.conf
//!   -s -a nobody`.
//!
//! It then runs `smbd --foreground --no-process-group --debug-stdout
//! --configfile=DIR/smb.conf` as a child in its own process group (stdout and stderr, and
//! smbd's `log file`, to `DIR/smbd.log`; [`Samba::log`]) and waits (at most 10 s) until that
//! process holds a listening socket on the address and answers an SMB2 NEGOTIATE for
//! SMB 3.0/3.0.2. Dropping the guard sends SIGTERM to that smbd (by pid), waits up to 5 s,
//! then SIGKILLs its process group (smbd's own helpers, `smbd-notifyd` and
//! `smbd-cleanupd`, are in it), and removes the directory.
//!
//! Nothing is started on the host's own network: without [`Options::netns`] smbd must
//! listen on a loopback address (default `127.0.0.1`, on a free port). With
//! [`Options::netns`] it runs inside that named network namespace (`ip netns exec NAME
//! smbd ...`; `ip` execs, so the child is smbd), on port 445 unless [`Options::port`]
//! says otherwise, typically on the test network's clinic device:
//!
//! ```ignore
//! let samba = Samba::start_for_test(&samba::Options {
//!     netns: Some(net.ns(Host::Clinic).to_owned()),
//!     listen: Some(net.plan().lan_clinic_addr.addr), // 192.168.50.10
//!     port: None,                                    // 445
//! });
//! // the box mounts //192.168.50.10/ssmix2 as nobody with samba.password()
//! ```
//!
//! The readiness check then runs on a short-lived thread that joined that namespace
//! (`setns`). The test network does not track this smbd: declare the guard after the
//! `TestNet`, so it is dropped first.
//!
//! Needs root (smbd serves the share as `nobody`) and the Debian package `samba` (`smbd`;
//! `smbpasswd` comes with it, from `samba-common-bin`), plus `ip` (`iproute2`) for
//! [`Options::netns`]. Its own test reads the share back with `smbclient` (Debian
//! `smbclient`).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::unistd::geteuid;

use crate::testnet::cmd::{self, display, tail};
use crate::testnet::error_chain;

/// The share's name.
pub const SHARE: &str = "ssmix2";

/// The unix user (an account every Debian system has) that the Samba account maps to, and
/// the name clients log in with.
pub const USER: &str = "nobody";

/// smbd's port inside a network namespace when [`Options::port`] is unset.
pub const NETNS_PORT: u16 = 445;

/// Where the tools are looked up (and the only `PATH` they get).
const TOOL_PATH: &str = cmd::CLEAN_PATH;

/// How long smbd may take to serve after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long smbd may take to stop after SIGTERM before its group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `smbpasswd` may take.
const SMBPASSWD_TIMEOUT: Duration = Duration::from_secs(30);

/// Start attempts (a new port each) when the free port was taken in the meantime.
const START_ATTEMPTS: usize = 5;

/// How much of smbd's log goes into an error.
const LOG_IN_ERROR: usize = 2000;

/// The SMB dialects the readiness check offers: 3.0 and 3.0.2 (3.1.1 would need
/// negotiate contexts). smbd must pick one, or it does not serve SMB 3.
const PROBE_DIALECTS: [u16; 2] = [0x0300, 0x0302];

/// How the server runs. The default: `127.0.0.1` on a free port, in this namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// The named network namespace (`/run/netns/NAME`, as `ip netns add` makes them) to run
    /// smbd in: `ip netns exec NAME smbd ...` (needs `ip`). The readiness check runs
    /// inside it too. `None`: this namespace, on loopback only.
    pub netns: Option<String>,
    /// The address smbd binds (`interfaces = ADDR`, `bind interfaces only = yes`); it must
    /// be an address of an interface in smbd's namespace. `None`: `127.0.0.1`. Without
    /// [`Options::netns`] it must be a loopback address.
    pub listen: Option<Ipv4Addr>,
    /// The TCP port (`smb ports`). `None`: [`NETNS_PORT`] (445) in a namespace, else a
    /// free loopback port (probed, and retried with a new one if taken meanwhile). A given
    /// port is taken as is: if it is in use, the start fails.
    pub port: Option<u16>,
}

/// A running smbd serving [`SHARE`] (see the module docs). Stops on drop.
#[derive(Debug)]
pub struct Samba {
    child: Option<Child>,
    addr: SocketAddrV4,
    netns: Option<String>,
    password: String,
    share_dir: PathBuf,
    path: PathBuf,
    /// Removes the directory on drop (after smbd is stopped).
    _dir: tempfile::TempDir,
}

impl Samba {
    /// Writes the configuration, adds the account, starts smbd (see the module docs) and
    /// waits until it serves SMB 3 (at most 10 s). Errors say what failed; a failed start
    /// carries the tail of smbd's log.
    pub fn start(opts: &Options) -> io::Result<Samba> {
        let listen = opts.listen.unwrap_or(Ipv4Addr::LOCALHOST);
        if listen.is_unspecified() || listen.is_broadcast() || listen.is_multicast() {
            return Err(bad_option(
                "listen",
                listen,
                "not a unicast address of one interface",
            ));
        }
        if opts.netns.is_none() && !listen.is_loopback() {
            return Err(bad_option(
                "listen",
                listen,
                "not a loopback address: outside a network namespace smbd listens on loopback only",
            ));
        }
        if opts.port == Some(0) {
            return Err(bad_option(
                "port",
                0,
                "0 is no port (leave it unset for a free one)",
            ));
        }
        let smbd = find_tool("smbd", "samba")?;
        let smbpasswd = find_tool("smbpasswd", "samba-common-bin")?;
        if !geteuid().is_root() {
            return Err(failure(
                io::ErrorKind::PermissionDenied,
                "the Samba guard needs root (smbd serves the share as `nobody`)",
            ));
        }
        let netns = match &opts.netns {
            Some(name) => Some(Netns::open(name, find_tool("ip", "iproute2")?)?),
            None => None,
        };

        let dir = tempfile::Builder::new()
            .prefix("tsunagi-samba-")
            .tempdir()
            .map_err(context(format!(
                "cannot create a temporary directory in {}",
                std::env::temp_dir().display()
            )))?;
        let path = dir.path().to_owned();
        plain(&path)?;
        let share_dir = path.join("share");
        make_dirs(&path, &share_dir)?;
        reachable_by_others(&share_dir)?;

        let conf = path.join("smb.conf");
        let password = random_password()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match (opts.port, &netns) {
                (Some(port), _) => port,
                (None, Some(_)) => NETNS_PORT,
                (None, None) => free_port(listen)
                    .map_err(context(format!("cannot find a free port on {listen}")))?,
            };
            let addr = SocketAddrV4::new(listen, port);
            fs::write(&conf, render_conf(&path, &share_dir, addr))
                .map_err(context(format!("cannot write {}", conf.display())))?;
            if attempt == 1 {
                add_account(&smbpasswd, &conf, &password)?;
            }
            // A fresh log per attempt: a clash is recognised by its message.
            let log = log_path(&path);
            fs::write(&log, "").map_err(context(format!("cannot write {}", log.display())))?;
            let mut child = spawn_smbd(&smbd, &path, &conf, netns.as_ref())?;
            let ready = match in_netns(netns.as_ref(), || wait_ready(&mut child, &path, addr)) {
                Ok(ready) => ready,
                // The check could not join the namespace: smbd must not outlive the error.
                Err(e) => {
                    let _ = stop_child(child);
                    return Err(e);
                }
            };
            match ready {
                Ok(()) => {
                    return Ok(Samba {
                        child: Some(child),
                        addr,
                        netns: opts.netns.clone(),
                        password,
                        share_dir,
                        path,
                        _dir: dir,
                    });
                }
                // Someone took the free port between the probe and smbd's bind: a new one.
                Err(NotServing::Exited { ref log, .. })
                    if opts.port.is_none()
                        && netns.is_none()
                        && attempt < START_ATTEMPTS
                        && log.contains("Address already in use") => {}
                Err(e) => {
                    let _ = stop_child(child);
                    return Err(e.into_error(addr));
                }
            }
        }
    }

    /// [`Samba::start`], panicking with the whole error chain (for tests: a missing smbd
    /// is a failure, never a skip).
    pub fn start_for_test(opts: &Options) -> Samba {
        match Samba::start(opts) {
            Ok(samba) => samba,
            Err(e) => panic!("the Samba test server did not start: {}", error_chain(&e)),
        }
    }

    /// The directory behind the share (`//ADDR/ssmix2/a/b` is `share_dir()/a/b`): tests
    /// write the clinic's files here, world-readable (smbd reads them as `nobody`).
    pub fn share_dir(&self) -> &Path {
        &self.share_dir
    }

    /// [`SHARE`]: `ssmix2`.
    pub fn share_name(&self) -> &str {
        SHARE
    }

    /// [`USER`]: `nobody`, the only account.
    pub fn username(&self) -> &str {
        USER
    }

    /// The account's password: 32 hex digits, new for every server.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Where clients connect: the listen address and port.
    pub fn address(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The network namespace smbd runs in ([`Options::netns`]), `None` for this one.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// smbd's pid (the main process; `ip netns exec` execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The guard's directory (`smb.conf`, the share, Samba's databases, the log).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// smbd's log so far (its stdout and stderr; debug level 1), for messages when a test
    /// fails.
    pub fn log(&self) -> String {
        read_log(&self.path)
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log();
            if !log.trim().is_empty() {
                eprintln!(
                    "smbd log ({}):\n{}",
                    self.path.display(),
                    tail(&log, LOG_IN_ERROR)
                );
            }
        }
        if let Some(child) = self.child.take() {
            let _ = stop_child(child);
        }
        // Then the TempDir field removes the directory.
    }
}

/// An error with a message of its own and, for an I/O failure, its cause (which
/// [`error_chain`] prints after it).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
struct Failure {
    what: String,
    #[source]
    source: Option<io::Error>,
}

fn failure(kind: io::ErrorKind, what: impl Into<String>) -> io::Error {
    io::Error::new(
        kind,
        Failure {
            what: what.into(),
            source: None,
        },
    )
}

/// Wraps an I/O error with what was being done, keeping its kind.
fn context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |source| {
        io::Error::new(
            source.kind(),
            Failure {
                what,
                source: Some(source),
            },
        )
    }
}

fn bad_option(option: &str, value: impl fmt::Display, reason: &str) -> io::Error {
    failure(
        io::ErrorKind::InvalidInput,
        format!("bad Samba option {option} = {value}: {reason}"),
    )
}

/// `program` in [`TOOL_PATH`], or a `NotFound` error naming its Debian package.
fn find_tool(program: &str, package: &str) -> io::Result<PathBuf> {
    cmd::find_in_clean_path(program).ok_or_else(|| {
        failure(
            io::ErrorKind::NotFound,
            format!(
                "{program} is not installed: not found in {TOOL_PATH} (Debian package \
                 `{package}`; `cargo xtask test` installs it, or: apt-get install -y \
                 --no-install-recommends {package})"
            ),
        )
    })
}

/// Paths go into smb.conf as they are: only letters, digits and `/._-` (Samba expands
/// `%` substitutions, and a line break would end the value).
fn plain(path: &Path) -> io::Result<()> {
    let ok = path.to_str().is_some_and(|s| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
    });
    if ok {
        Ok(())
    } else {
        Err(failure(
            io::ErrorKind::InvalidInput,
            format!(
                "the path {} is not plain enough for smb.conf (use letters, digits, `/._-`; \
                 set TMPDIR)",
                path.display()
            ),
        ))
    }
}

/// The directory layout of the module docs, with its modes.
fn make_dirs(dir: &Path, share_dir: &Path) -> io::Result<()> {
    let set_mode = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(context(format!(
            "cannot set the mode of {}",
            path.display()
        )))
    };
    // `nobody` must get through to the share, but not list the directory.
    set_mode(dir, 0o711)?;
    for (sub, mode) in [
        ("private", 0o700),
        ("lock", 0o755),
        ("state", 0o755),
        ("cache", 0o755),
        ("pid", 0o755),
        ("ncalrpc", 0o755),
    ] {
        let path = dir.join(sub);
        fs::create_dir(&path).map_err(context(format!("cannot create {}", path.display())))?;
        set_mode(&path, mode)?;
    }
    fs::create_dir(share_dir).map_err(context(format!("cannot create {}", share_dir.display())))?;
    set_mode(share_dir, 0o755)
}

/// smbd enters the share as `nobody`: every directory above it must let others through
/// (a `TMPDIR` under `/root` would not).
fn reachable_by_others(share_dir: &Path) -> io::Result<()> {
    for dir in share_dir.ancestors() {
        let meta =
            fs::metadata(dir).map_err(context(format!("cannot inspect {}", dir.display())))?;
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(failure(
                io::ErrorKind::PermissionDenied,
                format!(
                    "`nobody` cannot reach the share {}: {} has mode {:o} (set TMPDIR to a \
                     directory everyone may traverse, such as /tmp)",
                    share_dir.display(),
                    dir.display(),
                    meta.permissions().mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// 16 bytes from `/dev/urandom`, as 32 hex digits.
fn random_password() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .map_err(context("cannot read /dev/urandom".to_owned()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A port on `ip` that was free a moment ago (smbd binds it itself; a clash is retried).
fn free_port(ip: Ipv4Addr) -> io::Result<u16> {
    let listener = TcpListener::bind((ip, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The configuration of the module docs for the directory `dir`, serving `share_dir` on
/// `addr`.
fn render_conf(dir: &Path, share_dir: &Path, addr: SocketAddrV4) -> String {
    let d = dir.display();
    let (ip, port) = (addr.ip(), addr.port());
    let log = log_path(dir);
    format!(
        "# Written by hil_tests::samba for one test run.
[global]
server role = standalone server
interfaces = {ip}
bind interfaces only = yes
smb ports = {port}
disable netbios = yes
server min protocol = SMB3_00
server signing = mandatory
passdb backend = tdbsam:{d}/private/passdb.tdb
private dir = {d}/private
lock directory = {d}/lock
state directory = {d}/state
cache directory = {d}/cache
pid directory = {d}/pid
ncalrpc dir = {d}/ncalrpc
log file = {log}
max log size = 0
log level = 1
enable core files = no
load printers = no
printcap name = /dev/null
disable spoolss = yes
map to guest = never
restrict anonymous = 2
rpc start on demand helpers = no
socket options = TCP_NODELAY SO_REUSEPORT=0

[{SHARE}]
path = {share}
read only = yes
guest ok = no
valid users = {USER}
",
        log = log.display(),
        share = share_dir.display(),
    )
}

/// Adds the Samba account for [`USER`] with `password` (`smbpasswd -s` reads it twice
/// from stdin).
fn add_account(smbpasswd: &Path, conf: &Path, password: &str) -> io::Result<()> {
    let mut command = Command::new(smbpasswd);
    command
        .env_clear()
        .env("PATH", TOOL_PATH)
        .arg("-c")
        .arg(conf)
        .args(["-s", "-a", USER]);
    let line = display(&command);
    let input = format!("{password}\n{password}\n");
    let output = cmd::output_with_timeout(&mut command, Some(input.as_bytes()), SMBPASSWD_TIMEOUT)
        .map_err(io::Error::other)?;
    if output.status.success() {
        return Ok(());
    }
    Err(failure(
        io::ErrorKind::Other,
        format!(
            "{line} failed ({}): {}",
            output.status,
            tail(String::from_utf8_lossy(&output.stderr).trim(), LOG_IN_ERROR)
        ),
    ))
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("smbd.log")
}

fn read_log(dir: &Path) -> String {
    fs::read_to_string(log_path(dir)).unwrap_or_default()
}

/// smbd in the foreground, in `netns` if given (`ip netns exec` execs smbd, so the child's
/// pid is smbd's).
fn spawn_smbd(smbd: &Path, dir: &Path, conf: &Path, netns: Option<&Netns>) -> io::Result<Child> {
    let log_path = log_path(dir);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(context(format!("cannot open {}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(context(format!("cannot open {}", log_path.display())))?;
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new(&netns.ip);
            command.args(["netns", "exec", &netns.name]).arg(smbd);
            command
        }
        None => Command::new(smbd),
    };
    let mut config_arg = std::ffi::OsString::from("--configfile=");
    config_arg.push(conf);
    command
        .env_clear()
        .env("PATH", TOOL_PATH)
        // `--no-process-group`: smbd stays in the group made below instead of calling
        // setsid, so SIGKILL to the group reaches its helpers too.
        .args(["--foreground", "--no-process-group", "--debug-stdout"])
        .arg(config_arg)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    let line = display(&command);
    command
        .spawn()
        .map_err(context(format!("cannot run {line}")))
}

/// Why smbd did not come up.
enum NotServing {
    Exited { status: ExitStatus, log: String },
    NotReady { last: String, log: String },
}

impl NotServing {
    fn into_error(self, addr: SocketAddrV4) -> io::Error {
        match self {
            NotServing::Exited { status, log } => failure(
                io::ErrorKind::Other,
                format!("smbd exited while starting on {addr} ({status}); its log: {log}"),
            ),
            NotServing::NotReady { last, log } => failure(
                io::ErrorKind::TimedOut,
                format!(
                    "smbd did not serve SMB 3 on {addr} within {START_TIMEOUT:?} (last \
                     check: {last}); its log: {log}"
                ),
            ),
        }
    }
}

/// Polls until smbd (this child, not another server on the port) listens on `addr` and
/// answers an SMB2 NEGOTIATE with an SMB 3 dialect.
fn wait_ready(child: &mut Child, dir: &Path, addr: SocketAddrV4) -> Result<(), NotServing> {
    let deadline = Instant::now() + START_TIMEOUT;
    let pid = child.id();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotServing::Exited {
                status,
                log: tail(&read_log(dir), LOG_IN_ERROR),
            });
        }
        let last = match probe(pid, addr) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(NotServing::NotReady {
                last,
                log: tail(&read_log(dir), LOG_IN_ERROR),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// One readiness check: the listening socket belongs to `pid`, and an SMB 3 NEGOTIATE
/// succeeds.
fn probe(pid: u32, addr: SocketAddrV4) -> Result<(), String> {
    match listens(pid, addr) {
        Ok(true) => {}
        Ok(false) => return Err(format!("smbd (pid {pid}) does not listen on {addr} yet")),
        Err(e) => return Err(format!("cannot read smbd's sockets: {e}")),
    }
    match negotiate(addr) {
        Ok(dialect) if PROBE_DIALECTS.contains(&dialect) => Ok(()),
        Ok(dialect) => Err(format!("smbd chose the dialect {dialect:#06x}")),
        Err(e) => Err(format!("SMB2 NEGOTIATE: {e}")),
    }
}

/// Whether process `pid` holds a listening TCP socket bound to `addr`: the listening
/// sockets on `addr` in its namespace's `/proc/PID/net/tcp`, matched by inode against its
/// descriptors.
fn listens(pid: u32, addr: SocketAddrV4) -> io::Result<bool> {
    let table = fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
    // The kernel prints the address as the in-memory (network order) word in hex.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(addr.ip().octets()),
        addr.port()
    );
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        // local_address, rem_address, st (0A: LISTEN), ..., inode.
        .filter(|fields| fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
        .filter_map(|fields| fields.get(9).map(|inode| format!("socket:[{inode}]")))
        .collect();
    if inodes.is_empty() {
        return Ok(false);
    }
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        if inodes
            .iter()
            .any(|inode| target.as_os_str() == inode.as_str())
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// An SMB2 NEGOTIATE (MS-SMB2 2.2.3) offering [`PROBE_DIALECTS`] to `addr`; returns the
/// dialect the server chose.
fn negotiate(addr: SocketAddrV4) -> io::Result<u16> {
    let mut tcp = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(1))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(1)))?;
    tcp.write_all(&negotiate_request())?;
    // Direct TCP transport: a zero byte and a 24-bit big-endian length, then the message.
    let mut header = [0u8; 4];
    tcp.read_exact(&mut header)?;
    let len = u32::from_be_bytes([0, header[1], header[2], header[3]]);
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if header[0] != 0 || !(70..=0x1_0000).contains(&len) {
        return Err(invalid(format!("odd reply frame {header:02x?}")));
    }
    let mut reply = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    tcp.read_exact(&mut reply)?;
    let u16_at = |at: usize| u16::from_le_bytes([reply[at], reply[at + 1]]);
    let status = u32::from_le_bytes([reply[8], reply[9], reply[10], reply[11]]);
    if &reply[..4] != b"\xfeSMB" || u16_at(12) != 0 {
        return Err(invalid("not an SMB2 NEGOTIATE reply".to_owned()));
    }
    if status != 0 {
        return Err(invalid(format!("status {status:#010x}")));
    }
    // After the 64-byte header: StructureSize (2), SecurityMode (2), DialectRevision (2).
    Ok(u16_at(68))
}

/// The NEGOTIATE request of [`negotiate`], framed for direct TCP.
fn negotiate_request() -> Vec<u8> {
    let mut smb = Vec::with_capacity(64 + 36 + 2 * PROBE_DIALECTS.len());
    // SMB2 header (2.2.1.2), all zero but these.
    smb.extend_from_slice(b"\xfeSMB");
    smb.extend_from_slice(&64u16.to_le_bytes()); // StructureSize
    smb.extend_from_slice(&[0; 2]); // CreditCharge
    smb.extend_from_slice(&[0; 4]); // Status
    smb.extend_from_slice(&0u16.to_le_bytes()); // Command: NEGOTIATE
    smb.extend_from_slice(&1u16.to_le_bytes()); // CreditRequest
    smb.extend_from_slice(&[0; 4]); // Flags
    smb.extend_from_slice(&[0; 4]); // NextCommand
    smb.extend_from_slice(&[0; 8]); // MessageId
    smb.extend_from_slice(&[0; 4]); // Reserved
    smb.extend_from_slice(&[0; 4]); // TreeId
    smb.extend_from_slice(&[0; 8]); // SessionId
    smb.extend_from_slice(&[0; 16]); // Signature
    // NEGOTIATE request (2.2.3).
    smb.extend_from_slice(&36u16.to_le_bytes()); // StructureSize
    smb.extend_from_slice(&2u16.to_le_bytes()); // DialectCount
    smb.extend_from_slice(&1u16.to_le_bytes()); // SecurityMode: signing enabled
    smb.extend_from_slice(&[0; 2]); // Reserved
    smb.extend_from_slice(&[0; 4]); // Capabilities
    smb.extend_from_slice(b"tsunagi hil-test"); // ClientGuid (16 bytes)
    smb.extend_from_slice(&[0; 8]); // ClientStartTime
    for dialect in PROBE_DIALECTS {
        smb.extend_from_slice(&dialect.to_le_bytes());
    }
    let len = u32::try_from(smb.len()).unwrap_or(u32::MAX).to_be_bytes();
    let mut frame = vec![0, len[1], len[2], len[3]];
    frame.extend_from_slice(&smb);
    frame
}

/// SIGTERM to smbd, wait; SIGKILL its process group at the deadline; reap.
fn stop_child(child: Child) -> io::Result<()> {
    let pid = child.id();
    cmd::stop_child(child, STOP_TIMEOUT, true)
        .map_err(context(format!("cannot stop smbd (pid {pid})")))
}

/// A named network namespace to run smbd and its readiness check in.
struct Netns {
    name: String,
    /// `/run/netns/NAME`, open for `setns`.
    file: File,
    /// The `ip` tool, for `ip netns exec`.
    ip: PathBuf,
}

impl Netns {
    fn open(name: &str, ip: PathBuf) -> io::Result<Netns> {
        if !crate::netns::is_plain_name(name) {
            return Err(bad_option(
                "netns",
                name,
                "not a namespace name (letters, digits, `._-`)",
            ));
        }
        let file = crate::netns::open(name)?;
        Ok(Netns {
            name: name.to_owned(),
            file,
            ip,
        })
    }
}

/// Runs `f` here (`netns` is `None`), or on a thread in the network namespace
/// ([`crate::netns::run_in`]).
fn in_netns<T: Send>(netns: Option<&Netns>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let Some(netns) = netns else {
        return Ok(f());
    };
    crate::netns::run_in(&netns.file, f).map_err(context(format!(
        "cannot enter the network namespace {}",
        netns.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_request_is_framed() {
        let frame = negotiate_request();
        assert_eq!(frame.len(), 4 + 64 + 36 + 4);
        assert_eq!(&frame[..4], &[0, 0, 0, 104]);
        assert_eq!(&frame[4..8], b"\xfeSMB");
        assert_eq!(&frame[frame.len() - 4..], &[0x00, 0x03, 0x02, 0x03]);
    }

    #[test]
    fn conf_binds_one_address_and_keeps_paths_inside() {
        let dir = Path::new("/tmp/tsunagi-samba-x");
        let conf = render_conf(
            dir,
            &dir.join("share"),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 10), 445),
        );
        assert!(conf.contains("\ninterfaces = 192.168.50.10\n"), "{conf}");
        assert!(conf.contains("\nbind interfaces only = yes\n"), "{conf}");
        assert!(conf.contains("\nsmb ports = 445\n"), "{conf}");
        assert!(conf.contains("\n[ssmix2]\npath = /tmp/tsunagi-samba-x/share\n"));
        for line in conf.lines().filter(|l| l.contains('/')) {
            let value = line.split_once(" = ").map_or(line, |(_, v)| v);
            let value = value.strip_prefix("tdbsam:").unwrap_or(value);
            assert!(
                value.starts_with("/tmp/tsunagi-samba-x") || value == "/dev/null",
                "{line}"
            );
        }
    }

    #[test]
    fn refuses_the_hosts_network() {
        let e = Samba::start(&Options {
            listen: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Options::default()
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let text = error_chain(&e);
        assert!(text.contains("not a loopback address"), "{text}");
    }
}
