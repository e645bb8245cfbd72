//! A throw-away network of three namespaces (hub, box, clinic LAN device) with a WireGuard
//! hub, for tests and demos. See [`TestNet`] and [`AddressPlan`].
//!
//! Everything lives in namespaces and veth pairs the harness creates, named after a unique
//! id, plus `/run/tsunagi-testnet/<id>*` for bookkeeping and the wireguard-go sockets
//! `/var/run/wireguard/<id>*.sock`. No traffic leaves the namespaces.
//!
//! Commands (`ip`, `wg`, `nft`, wireguard-go, the health server, and whatever
//! [`TestNet::exec`] / [`TestNet::spawn`] run) get a clean environment: `PATH` plus the
//! variables the caller set explicitly on the `Command`.

pub(crate) mod cmd;
mod error;
mod plan;
mod stale;

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};

pub use self::error::{TestNetError, error_chain};
pub use self::plan::{
    AddressPlan, Cidr, CidrParseError, HEALTH_PATH, HEALTH_PORT, HUB_WG_PORT, Host, TUNNEL_MTU,
};

use self::cmd::{TOOL_TIMEOUT, display, find_in_clean_path, host_command, in_netns, run};
use self::stale::{TERM_GRACE, WG_RUN_DIR};

/// Default deadline of [`TestNet::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a started daemon (wireguard-go, the health server) gets to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// The programs the harness itself runs, and their Debian packages.
const TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("wg", "wireguard-tools"),
    ("wireguard-go", "wireguard-go"),
];

/// Name of the harness's nftables table in the hub namespace.
const NFT_TABLE: &str = "tsunagi_testnet";

/// What to set up beyond the fixed plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Extra UDP ports on the hub's WAN address that reach the hub's WireGuard port
    /// (nft `redirect to :51820`), e.g. `[443]` for the UDP/443 fallback.
    pub hub_extra_udp_ports: Vec<u16>,
}

/// The tap devices [`TestNet::box_to_vm`] made in the box namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmLinks {
    /// The guest's WAN link (bridged to the hub).
    pub wan_tap: String,
    /// The guest's clinic-LAN link (bridged to the clinic device).
    pub lan_tap: String,
}

/// A WireGuard key pair from `wg genkey` / `wg pubkey`. `Debug` hides the private key.
#[derive(Clone)]
pub struct KeyPair {
    private_key: String,
    /// The base64 public key.
    pub public_key: String,
}

impl KeyPair {
    /// The base64 private key.
    pub fn private_key(&self) -> &str {
        &self.private_key
    }

    /// Writes the private key to `path` (mode 0600), for `wg set IFACE private-key PATH`.
    pub fn write_private_key(&self, path: &Path) -> Result<(), TestNetError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| TestNetError::Io {
                action: "create",
                path: path.to_owned(),
                source,
            })?;
        writeln!(file, "{}", self.private_key).map_err(|source| TestNetError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        })
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("private_key", &"(hidden)")
            .field("public_key", &self.public_key)
            .finish()
    }
}

/// Generates a key pair with `wg genkey` and `wg pubkey` (no namespace needed).
pub fn generate_keypair() -> Result<KeyPair, TestNetError> {
    let private_key = cmd::run_text(&mut host_command("wg", &["genkey"]), None)?;
    let public_key = cmd::run_text(
        &mut host_command("wg", &["pubkey"]),
        Some(format!("{private_key}\n").as_bytes()),
    )?;
    Ok(KeyPair {
        private_key,
        public_key,
    })
}

/// Checks that this machine can host a test network: root, `/dev/net/tun`, and the tools
/// (`ip`, `nft`, `wg`, `wireguard-go`). [`TestNetError::is_environment`] tells "cannot
/// here" (skip) from "broken" (fail).
pub fn preflight() -> Result<(), TestNetError> {
    let uid = geteuid();
    if !uid.is_root() {
        return Err(TestNetError::NotRoot { uid: uid.as_raw() });
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err(TestNetError::NoTun);
    }
    for (program, package) in TOOLS {
        if find_in_clean_path(program).is_none() {
            return Err(TestNetError::MissingTool { program, package });
        }
    }
    Ok(())
}

/// Removes every set whose owning process is gone (see [`TestNet::up`]). Returns the ids
/// removed. Problems with one set do not stop the others; they are reported together.
pub fn clean_stale() -> Result<Vec<String>, TestNetError> {
    let (removed, problems) = stale::clean_stale()?;
    if problems.is_empty() {
        Ok(removed)
    } else {
        Err(TestNetError::Teardown {
            id: String::from("(stale sets)"),
            problems,
        })
    }
}

/// Finds this crate's `testnet` binary, which serves the hub's health endpoint.
///
/// In order: `$TSUNAGI_TESTNET_BIN`; `$NEXTEST_BIN_EXE_testnet` (set by nextest for this
/// crate's tests); the current executable if it is `testnet`; `testnet` next to the
/// current executable or one directory up (`target/<profile>/deps/<test>` →
/// `target/<profile>/testnet`). Cargo builds the binary before this crate's integration
/// tests; other crates' tests need `cargo build -p hil-tests --bins` first.
pub fn testnet_binary() -> Result<PathBuf, TestNetError> {
    let mut searched = Vec::new();
    for var in ["TSUNAGI_TESTNET_BIN", "NEXTEST_BIN_EXE_testnet"] {
        if let Some(path) = std::env::var_os(var).map(PathBuf::from) {
            if path.is_file() {
                return Ok(path);
            }
            searched.push(path);
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|name| name == "testnet") {
            return Ok(exe);
        }
        let dirs = exe
            .parent()
            .into_iter()
            .chain(exe.parent().and_then(Path::parent));
        for dir in dirs {
            let candidate = dir.join("testnet");
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(candidate);
        }
    }
    Err(TestNetError::TestnetBinaryNotFound { searched })
}

/// A running test network; dropping it tears everything down.
///
/// [`TestNet::up`] creates, for a fresh id (e.g. `tn3f9a1c`):
/// - namespaces `<id>-hub`, `<id>-box`, `<id>-clinic`, loopback up in each;
/// - WAN veth hub `<id>w0` 10.250.0.1/24 ↔ box `<id>w1` 10.250.0.2/24;
/// - LAN veth box `<id>l0` 192.168.50.1/24 ↔ clinic `<id>l1` 192.168.50.10/24; the
///   clinic has no default route and the box has `net.ipv4.ip_forward=0`;
/// - in the hub: 10.98.0.1/24 on `lo` (the "hub network") with a health server on
///   10.98.0.1:8080; wireguard-go `<id>hub`, 10.99.0.1/24, port 51820, MTU 1280, a fresh
///   key; optional nft redirects of extra UDP ports to 51820.
///
/// The box gets nothing for the tunnel: that is the product's (or the test's) job.
///
/// Teardown (drop or [`TestNet::teardown`]): SIGTERM to every process the harness started,
/// SIGKILL after 3 s, then the namespaces (their links go with them), the sockets, the
/// state directory and the pid file. A panicking test also gets the end of each process's
/// log on stderr.
pub struct TestNet {
    plan: AddressPlan,
    hub_keys: KeyPair,
    testnet_bin: PathBuf,
    state_dir: PathBuf,
    inner: Mutex<Inner>,
    torn_down: bool,
}

/// Mutable state, behind the mutex so the methods take `&self` (tests share the guard).
struct Inner {
    procs: Vec<Tracked>,
    spawned: u32,
    hub_wg_pid: Option<u32>,
    peers: Vec<HubPeer>,
    wan_addr: Ipv4Addr,
    blocked_udp: BTreeSet<u16>,
}

/// A process the harness started (and reaps).
struct Tracked {
    pid: u32,
    label: String,
    log: PathBuf,
    child: Child,
}

/// A peer configured on the hub, so a restarted hub gets the same peers.
#[derive(Clone)]
struct HubPeer {
    public_key: String,
    allowed_ips: Vec<Cidr>,
}

impl fmt::Debug for TestNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestNet")
            .field("id", &self.plan.id)
            .field("hub_public_key", &self.hub_keys.public_key)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl TestNet {
    /// Brings up a new set. First removes stale sets (owner process dead), then claims a
    /// fresh id. If anything fails, what was created is torn down again.
    pub fn up(opts: Options) -> Result<TestNet, TestNetError> {
        preflight()?;
        let testnet_bin = testnet_binary()?;
        let extra_ports = validate_extra_ports(&opts.hub_extra_udp_ports)?;
        let id = {
            let _lock = stale::lock_run_dir()?;
            let (_removed, problems) = stale::clean_stale_locked()?;
            for problem in problems {
                eprintln!("testnet: warning: {problem}");
            }
            claim_new_id()?
        };
        let plan = AddressPlan::new(&id, &extra_ports);
        // From here on, dropping `net` undoes whatever was done.
        let mut net = TestNet {
            state_dir: stale::state_dir(&id),
            inner: Mutex::new(Inner {
                procs: Vec::new(),
                spawned: 0,
                hub_wg_pid: None,
                peers: Vec::new(),
                wan_addr: plan.wan_hub_addr.addr,
                blocked_udp: BTreeSet::new(),
            }),
            plan,
            hub_keys: KeyPair {
                private_key: String::new(),
                public_key: String::new(),
            },
            testnet_bin,
            torn_down: false,
        };
        net.hub_keys = generate_keypair()?;
        net.build()?;
        Ok(net)
    }

    /// [`TestNet::up`] for a test: `None` (after printing why) when the machine cannot
    /// host a test network (not root, no `/dev/net/tun`) and `CI` is not set.
    ///
    /// # Panics
    ///
    /// If `CI` is set and the machine cannot host a test network (CI runs as root), or if
    /// bring-up fails for any other reason. That is the point: the calling test fails.
    pub fn up_for_test(opts: Options) -> Option<TestNet> {
        match TestNet::up(opts) {
            Ok(net) => Some(net),
            Err(e) if e.is_environment() && std::env::var_os("CI").is_none() => {
                eprintln!("skipping: {}", error_chain(&e));
                None
            }
            Err(e) if e.is_environment() => {
                panic!("CI is set, so this test must run, but {}", error_chain(&e))
            }
            Err(e) => panic!("test network did not come up: {}", error_chain(&e)),
        }
    }

    /// The set's unique id, e.g. `tn3f9a1c`.
    pub fn id(&self) -> &str {
        &self.plan.id
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: Host) -> &str {
        self.plan.ns(host)
    }

    /// Every name, address and port of the set.
    pub fn plan(&self) -> &AddressPlan {
        &self.plan
    }

    /// The hub's WireGuard public key (base64).
    pub fn hub_public_key(&self) -> &str {
        &self.hub_keys.public_key
    }

    /// The pid of the hub's current wireguard-go.
    pub fn hub_wireguard_pid(&self) -> Option<u32> {
        self.lock().hub_wg_pid
    }

    /// The hub's current WAN address (10.250.0.1 unless renumbered).
    pub fn hub_wan_address(&self) -> Ipv4Addr {
        self.lock().wan_addr
    }

    /// The set's state directory (`/run/tsunagi-testnet/<id>`): process logs, and a place
    /// for a test's own files (key files...). Removed on teardown.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The log file (stdout and stderr) of a process started with [`TestNet::spawn`] or by
    /// the harness.
    pub fn log_file(&self, pid: u32) -> Option<PathBuf> {
        self.lock()
            .procs
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| p.log.clone())
    }

    /// One JSON line: the plan plus the hub's public key.
    pub fn to_json(&self) -> String {
        self.plan.to_json(Some(self.hub_public_key()))
    }

    /// Adds (or updates) a peer on the hub: `wg set IFACE peer KEY allowed-ips ...`, plus a
    /// route for each allowed prefix via the hub's WireGuard interface. The peer is kept
    /// across [`TestNet::hub_restart_wireguard`].
    pub fn hub_add_peer(&self, public_key: &str, allowed_ips: &[&str]) -> Result<(), TestNetError> {
        validate_public_key(public_key)?;
        let allowed = allowed_ips
            .iter()
            .map(|s| {
                s.parse::<Cidr>()
                    .map_err(|_| TestNetError::InvalidArgument {
                        what: "allowed IP",
                        value: (*s).to_owned(),
                        reason: "expected an IPv4 prefix such as 10.99.0.2/32",
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let peer = HubPeer {
            public_key: public_key.to_owned(),
            allowed_ips: allowed,
        };
        let mut inner = self.lock();
        self.configure_hub_peer(&peer)?;
        inner.peers.retain(|p| p.public_key != peer.public_key);
        inner.peers.push(peer);
        Ok(())
    }

    /// Removes a peer from the hub (`wg set IFACE peer KEY remove`) and the routes that no
    /// remaining peer needs.
    pub fn hub_remove_peer(&self, public_key: &str) -> Result<(), TestNetError> {
        let mut inner = self.lock();
        let Some(index) = inner.peers.iter().position(|p| p.public_key == public_key) else {
            return Err(TestNetError::UnknownPeer {
                public_key: public_key.to_owned(),
            });
        };
        let removed = inner.peers.remove(index);
        let iface = &self.plan.hub_wg_iface;
        self.tool(
            Host::Hub,
            "wg",
            &["set", iface, "peer", public_key, "remove"],
            None,
        )?;
        for prefix in removed.allowed_ips {
            let still_used = inner.peers.iter().any(|p| {
                p.allowed_ips
                    .iter()
                    .any(|c| c.network() == prefix.network())
            });
            if !still_used {
                let net = prefix.network().to_string();
                self.ip(&["-n", self.ns(Host::Hub), "route", "del", &net, "dev", iface])?;
            }
        }
        Ok(())
    }

    /// The hub's WireGuard peers and what each may send from: `wg show IFACE allowed-ips`,
    /// one `KEY<TAB>CIDR...` line per peer (empty without peers).
    pub fn hub_peers(&self) -> Result<String, TestNetError> {
        let iface = &self.plan.hub_wg_iface;
        self.tool(
            Host::Hub,
            "wg",
            &["show", iface.as_str(), "allowed-ips"],
            None,
        )
    }

    /// The bytes the hub's WireGuard interface has sent to all its peers together (`wg show
    /// IFACE transfer`, since the hub started): what crossed the tunnel towards the boxes.
    pub fn hub_sent(&self) -> Result<u64, TestNetError> {
        let iface = &self.plan.hub_wg_iface;
        let args = ["show", iface.as_str(), "transfer"];
        let text = self.tool(Host::Hub, "wg", &args, None)?;
        let mut sent = 0u64;
        for line in text.lines() {
            let tx = line
                .split_whitespace()
                .nth(2)
                .and_then(|t| t.parse::<u64>().ok());
            let Some(tx) = tx else {
                return Err(TestNetError::BadOutput {
                    command: format!("wg {}", args.join(" ")),
                    detail: format!("line `{line}`"),
                });
            };
            sent += tx;
        }
        Ok(sent)
    }

    /// When the hub last completed a handshake with `public_key` (whole seconds, from `wg
    /// show IFACE latest-handshakes`); `None` if never (since the last hub restart).
    pub fn hub_latest_handshake(
        &self,
        public_key: &str,
    ) -> Result<Option<SystemTime>, TestNetError> {
        let iface = &self.plan.hub_wg_iface;
        let args = ["show", iface.as_str(), "latest-handshakes"];
        let text = self.tool(Host::Hub, "wg", &args, None)?;
        let bad = |detail: String| TestNetError::BadOutput {
            command: format!("wg {}", args.join(" ")),
            detail,
        };
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(key), Some(secs)) = (fields.next(), fields.next()) else {
                return Err(bad(format!("line `{line}`")));
            };
            if key != public_key {
                continue;
            }
            let secs: u64 = secs
                .parse()
                .map_err(|_| bad(format!("timestamp `{secs}`")))?;
            return Ok((secs != 0).then(|| UNIX_EPOCH + Duration::from_secs(secs)));
        }
        Err(TestNetError::UnknownPeer {
            public_key: public_key.to_owned(),
        })
    }

    /// How long ago the hub last completed a handshake with `public_key`; `None` if never
    /// (since the last hub restart). Whole seconds: 0 s means "within the last second".
    pub fn hub_handshake_age(&self, public_key: &str) -> Result<Option<Duration>, TestNetError> {
        Ok(self.hub_latest_handshake(public_key)?.map(|at| {
            SystemTime::now()
                .duration_since(at)
                .unwrap_or(Duration::ZERO)
        }))
    }

    /// Simulates a hub crash and restart: SIGKILLs the hub's wireguard-go (by pid), waits
    /// until its interface is gone, removes the stale control socket, starts a new one and
    /// configures it again with the same private key, port, peers (allowed IPs), address,
    /// MTU and routes. Learned state (peer endpoints, sessions) is lost, as after a real
    /// restart: a peer must handshake again, which the box's side has to start.
    pub fn hub_restart_wireguard(&self) -> Result<(), TestNetError> {
        let mut inner = self.lock();
        if let Some(pid) = inner.hub_wg_pid.take() {
            kill_tracked(&mut inner, pid)?;
        }
        let iface = self.plan.hub_wg_iface.clone();
        let ns = self.ns(Host::Hub).to_owned();
        wait_until(
            &format!("removal of {iface} in {ns}"),
            START_TIMEOUT,
            || {
                let mut probe = host_command("ip", &["-n", &ns, "link", "show", "dev", &iface]);
                Ok(!cmd::output_with_timeout(&mut probe, None, TOOL_TIMEOUT)?
                    .status
                    .success())
            },
        )?;
        self.start_hub_wireguard(&mut inner)
    }

    /// Renumbers the hub's WAN side (vpn-lab `roam.sh`): deletes the current address and
    /// adds `new`/24 on the hub's WAN veth, and moves the extra-port redirects along. The
    /// box is not told; its endpoint keeps the old address until it is set again. `new`
    /// must lie in 10.250.0.0/24 (the box's connected WAN prefix) and not be the box's
    /// address.
    pub fn hub_set_wan_address(&self, new: Ipv4Addr) -> Result<(), TestNetError> {
        let wan = self.plan.wan_hub_addr;
        let invalid = |reason| TestNetError::InvalidArgument {
            what: "hub WAN address",
            value: new.to_string(),
            reason,
        };
        if !wan.contains(new) {
            return Err(invalid("must lie in 10.250.0.0/24"));
        }
        if new == wan.network().addr || new == wan.broadcast() {
            return Err(invalid("is the network or broadcast address"));
        }
        if new == self.plan.wan_box_addr.addr {
            return Err(invalid("is the box's address"));
        }
        let mut inner = self.lock();
        if inner.wan_addr == new {
            return Ok(());
        }
        let ns = self.ns(Host::Hub);
        let dev = &self.plan.wan_hub_iface;
        let old = Cidr::new(inner.wan_addr, wan.prefix_len).to_string();
        let new_cidr = Cidr::new(new, wan.prefix_len).to_string();
        // Delete first, then add: like a DHCP renumber (deleting a primary address also
        // drops secondaries).
        self.ip(&["-n", ns, "addr", "del", &old, "dev", dev])?;
        self.ip(&["-n", ns, "addr", "add", &new_cidr, "dev", dev])?;
        inner.wan_addr = new;
        self.apply_hub_nft(&inner)
    }

    /// Drops UDP to `port` on the path box → hub.
    ///
    /// Applied in the **hub** namespace, in a `prerouting` filter chain at priority -150
    /// (before the `dstnat` redirects) matching packets that arrive on the hub's WAN veth.
    /// So it sees the port the box sent to: blocking 51820 leaves a redirected 443 working,
    /// as an ISP or clinic router filtering by destination port would. The box namespace
    /// stays untouched, so the product may load (or flush) its own ruleset there. The
    /// drops are counted (`nft list table inet tsunagi_testnet` in the hub).
    pub fn block_udp(&self, port: u16) -> Result<(), TestNetError> {
        if port == 0 {
            return Err(TestNetError::InvalidArgument {
                what: "UDP port",
                value: port.to_string(),
                reason: "must not be 0",
            });
        }
        let mut inner = self.lock();
        if inner.blocked_udp.insert(port) {
            self.apply_hub_nft(&inner)?;
        }
        Ok(())
    }

    /// Undoes [`TestNet::block_udp`] for `port`.
    pub fn unblock_udp(&self, port: u16) -> Result<(), TestNetError> {
        let mut inner = self.lock();
        if inner.blocked_udp.remove(&port) {
            self.apply_hub_nft(&inner)?;
        }
        Ok(())
    }

    /// Runs `command` in `host`'s namespace (`ip netns exec NS ...`) and waits for it, up
    /// to [`EXEC_TIMEOUT`]. Returns the output whatever the exit status, like
    /// `Command::output`; stdin is empty. The environment is clean (module docs).
    pub fn exec(&self, host: Host, command: &Command) -> Result<Output, TestNetError> {
        self.exec_timeout(host, command, EXEC_TIMEOUT)
    }

    /// [`TestNet::exec`] with its own deadline; the process is killed when it passes.
    pub fn exec_timeout(
        &self,
        host: Host,
        command: &Command,
        timeout: Duration,
    ) -> Result<Output, TestNetError> {
        let mut wrapped = in_netns(self.ns(host), command);
        cmd::output_with_timeout(&mut wrapped, None, timeout)
    }

    /// Runs `f` on a thread in `host`'s network namespace ([`crate::netns::run_in`]): a
    /// client in the test process that talks to a server in the namespace.
    pub fn in_namespace<T: Send>(
        &self,
        host: Host,
        f: impl FnOnce() -> T + Send,
    ) -> std::io::Result<T> {
        crate::netns::run_in(&crate::netns::open(self.ns(host))?, f)
    }

    /// Starts `command` in `host`'s namespace and returns its pid. The process is tracked:
    /// teardown sends it SIGTERM, then SIGKILL after 3 s. Its stdout and stderr go to
    /// [`TestNet::log_file`]; stdin is empty; the environment is clean (module docs).
    pub fn spawn(&self, host: Host, command: &Command) -> Result<u32, TestNetError> {
        let mut inner = self.lock();
        self.spawn_locked(&mut inner, host, command)
    }

    /// The hub's NTP server (issue 17): chronyd in the hub's namespace on
    /// `10.98.0.1:123`, serving time and setting no clock (`-x`), `ahead` seconds ahead of
    /// the real clock (libfaketime, Debian package `faketime`: as if the box's clock were
    /// that far behind; network namespaces share one clock). Tracked like [`TestNet::spawn`];
    /// returns its pid.
    pub fn serve_time(&self, ahead: u32) -> Result<u32, TestNetError> {
        let dir = self.state_dir().join(format!("chrony-{ahead}"));
        let io = |source| TestNetError::Io {
            action: "write the time server's configuration in",
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io)?;
        let conf = dir.join("chrony.conf");
        fs::write(
            &conf,
            format!(
                "local stratum 8\nallow\nbindaddress 10.98.0.1\nport 123\ncmdport 0\npidfile {}\n",
                dir.join("chronyd.pid").display()
            ),
        )
        .map_err(io)?;
        let mut cmd = Command::new("/usr/bin/env");
        if ahead > 0 {
            let lib = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
                .iter()
                .map(|arch| PathBuf::from(format!("/usr/lib/{arch}/faketime/libfaketime.so.1")))
                .find(|p| p.exists())
                .ok_or_else(|| TestNetError::InvalidArgument {
                    what: "libfaketime",
                    value: "/usr/lib/*/faketime/libfaketime.so.1".to_owned(),
                    reason: "not installed (Debian package faketime; cargo xtask test installs it)",
                })?;
            cmd.arg(format!("LD_PRELOAD={}", lib.display()))
                .arg(format!("FAKETIME=+{ahead}"));
        }
        cmd.args(["/usr/sbin/chronyd", "-x", "-d", "-u", "root", "-f"])
            .arg(&conf);
        self.spawn(Host::Hub, &cmd)
    }

    /// Starts a tracked `wireguard-go -f IFACE` in `host`'s namespace (clean environment,
    /// foreground) and waits until its control socket accepts connections, so `wg set`
    /// can follow. For a test that stands in for the product on the box.
    pub fn start_wireguard_go(&self, host: Host, iface: &str) -> Result<u32, TestNetError> {
        if iface.is_empty() || iface.len() > 15 || iface.contains('/') {
            return Err(TestNetError::InvalidArgument {
                what: "interface name",
                value: iface.to_owned(),
                reason: "must be 1 to 15 bytes without `/`",
            });
        }
        let mut inner = self.lock();
        self.start_wireguard_go_locked(&mut inner, host, iface)
    }

    /// Hands the box's two links to a virtual machine (the QEMU harness, issue 7). In the
    /// box namespace the box's addresses go, and each veth end joins a bridge with a tap
    /// device: WAN `<id>tw` on bridge `<id>bw`, LAN `<id>tl` on bridge `<id>bl`. QEMU,
    /// started in the box namespace, opens the taps; the guest then takes the box's
    /// addresses (10.250.0.2/24, 192.168.50.1/24), so the rest of the plan holds as it is.
    /// Nothing of the product may run in the box namespace afterwards. Bridges and taps go
    /// with the namespace at teardown.
    pub fn box_to_vm(&self) -> Result<VmLinks, TestNetError> {
        let id = &self.plan.id;
        let ns = self.ns(Host::Box);
        let links = VmLinks {
            wan_tap: format!("{id}tw"),
            lan_tap: format!("{id}tl"),
        };
        for (veth, bridge, tap) in [
            (&self.plan.wan_box_iface, format!("{id}bw"), &links.wan_tap),
            (&self.plan.lan_box_iface, format!("{id}bl"), &links.lan_tap),
        ] {
            self.ip(&["-n", ns, "addr", "flush", "dev", veth])?;
            self.ip(&["-n", ns, "link", "add", &bridge, "type", "bridge"])?;
            self.ip(&["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
            for port in [veth.as_str(), tap.as_str()] {
                self.ip(&["-n", ns, "link", "set", port, "master", &bridge])?;
                self.ip(&["-n", ns, "link", "set", port, "up"])?;
            }
            self.ip(&["-n", ns, "link", "set", &bridge, "up"])?;
        }
        Ok(links)
    }

    /// Tears down now and reports what could not be removed (drop does the same and
    /// prints the problems).
    pub fn teardown(mut self) -> Result<(), TestNetError> {
        let problems = self.teardown_inner();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TestNetError::Teardown {
                id: self.plan.id.clone(),
                problems,
            })
        }
    }

    // --- bring-up -----------------------------------------------------------------------

    fn build(&self) -> Result<(), TestNetError> {
        let p = &self.plan;
        let (hub, bx, clinic) = (p.hub_ns.as_str(), p.box_ns.as_str(), p.clinic_ns.as_str());
        for ns in [hub, bx, clinic] {
            self.ip(&["netns", "add", ns])?;
            self.ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // Each veth is created with its ends directly in their namespaces: nothing appears
        // in the root namespace, even briefly.
        self.veth(
            (hub, &p.wan_hub_iface, p.wan_hub_addr),
            (bx, &p.wan_box_iface, p.wan_box_addr),
        )?;
        self.veth(
            (bx, &p.lan_box_iface, p.lan_box_addr),
            (clinic, &p.lan_clinic_iface, p.lan_clinic_addr),
        )?;
        // A new namespace starts with forwarding off; set it anyway, the plan promises it.
        // (`tee` rather than `sysctl`: procps is not always installed.)
        let mut forward = in_netns(bx, &host_command("tee", &["/proc/sys/net/ipv4/ip_forward"]));
        run(&mut forward, Some(b"0\n"), TOOL_TIMEOUT)?;
        // The hub network on lo (this kernel has no `dummy` link type).
        let hub_net = p.hub_net_addr.to_string();
        self.ip(&["-n", hub, "addr", "add", &hub_net, "dev", &p.hub_net_iface])?;

        let mut inner = self.lock();
        self.start_hub_wireguard(&mut inner)?;
        self.apply_hub_nft(&inner)?;
        self.start_health_server(&mut inner)
    }

    fn veth(
        &self,
        (ns_a, name_a, addr_a): (&str, &str, Cidr),
        (ns_b, name_b, addr_b): (&str, &str, Cidr),
    ) -> Result<(), TestNetError> {
        self.ip(&[
            "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b, "netns",
            ns_b,
        ])?;
        for (ns, name, addr) in [(ns_a, name_a, addr_a), (ns_b, name_b, addr_b)] {
            self.ip(&["-n", ns, "addr", "add", &addr.to_string(), "dev", name])?;
            self.ip(&["-n", ns, "link", "set", name, "up"])?;
        }
        Ok(())
    }

    /// Starts the hub's wireguard-go and configures key, port, peers, address, MTU, routes.
    fn start_hub_wireguard(&self, inner: &mut Inner) -> Result<(), TestNetError> {
        let p = &self.plan;
        let iface = p.hub_wg_iface.as_str();
        let pid = self.start_wireguard_go_locked(inner, Host::Hub, iface)?;
        inner.hub_wg_pid = Some(pid);
        let port = p.hub_wg_port.to_string();
        let key = format!("{}\n", self.hub_keys.private_key);
        // The key goes through a pipe, never a file or the command line.
        self.tool(
            Host::Hub,
            "wg",
            &[
                "set",
                iface,
                "listen-port",
                &port,
                "private-key",
                "/dev/stdin",
            ],
            Some(key.as_bytes()),
        )?;
        let hub = p.hub_ns.as_str();
        let addr = p.hub_tunnel_addr.to_string();
        let mtu = p.tunnel_mtu.to_string();
        self.ip(&["-n", hub, "addr", "add", &addr, "dev", iface])?;
        self.ip(&["-n", hub, "link", "set", iface, "mtu", &mtu, "up"])?;
        for peer in &inner.peers {
            self.configure_hub_peer(peer)?;
        }
        Ok(())
    }

    /// `wg set` for one peer, then its routes (the link must be up).
    fn configure_hub_peer(&self, peer: &HubPeer) -> Result<(), TestNetError> {
        let iface = self.plan.hub_wg_iface.as_str();
        let list: Vec<String> = peer.allowed_ips.iter().map(Cidr::to_string).collect();
        let list = list.join(",");
        self.tool(
            Host::Hub,
            "wg",
            &["set", iface, "peer", &peer.public_key, "allowed-ips", &list],
            None,
        )?;
        for prefix in &peer.allowed_ips {
            let net = prefix.network().to_string();
            self.ip(&[
                "-n",
                self.ns(Host::Hub),
                "route",
                "replace",
                &net,
                "dev",
                iface,
            ])?;
        }
        Ok(())
    }

    fn start_wireguard_go_locked(
        &self,
        inner: &mut Inner,
        host: Host,
        iface: &str,
    ) -> Result<u32, TestNetError> {
        let socket = Path::new(WG_RUN_DIR).join(format!("{iface}.sock"));
        // A socket left by a killed daemon would make the wait below pass at once.
        stale::remove_file_if_exists(&socket)?;
        let mut command = Command::new("wireguard-go");
        command.args(["-f", iface]);
        let pid = self.spawn_locked(inner, host, &command)?;
        let what = format!("wireguard-go control socket {}", socket.display());
        wait_until_running(inner, pid, &what, || {
            Ok(UnixStream::connect(&socket).is_ok())
        })?;
        Ok(pid)
    }

    fn start_health_server(&self, inner: &mut Inner) -> Result<(), TestNetError> {
        let mut command = Command::new(&self.testnet_bin);
        command
            .arg("serve-health")
            .arg(self.plan.health_addr.to_string());
        let pid = self.spawn_locked(inner, Host::Hub, &command)?;
        let log = log_of(inner, pid);
        let what = format!("health server on {}", self.plan.health_addr);
        wait_until_running(inner, pid, &what, || {
            Ok(fs::read_to_string(&log).is_ok_and(|text| text.contains(crate::health::READY_LINE)))
        })
    }

    /// Renders and loads the harness's table in the hub (replacing the previous one).
    fn apply_hub_nft(&self, inner: &Inner) -> Result<(), TestNetError> {
        let ruleset = hub_ruleset(&self.plan, inner.wan_addr, &inner.blocked_udp);
        self.tool(Host::Hub, "nft", &["-f", "-"], Some(ruleset.as_bytes()))?;
        Ok(())
    }

    fn spawn_locked(
        &self,
        inner: &mut Inner,
        host: Host,
        command: &Command,
    ) -> Result<u32, TestNetError> {
        inner.spawned += 1;
        let program = Path::new(command.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let program: String = program
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let log = self
            .state_dir
            .join(format!("{:02}-{host}-{program}.log", inner.spawned));
        let io = |action| {
            let log = log.clone();
            move |source| TestNetError::Io {
                action,
                path: log,
                source,
            }
        };
        let file = File::create(&log).map_err(io("create"))?;
        let file2 = file.try_clone().map_err(io("open"))?;
        let mut wrapped = in_netns(self.ns(host), command);
        wrapped.stdin(Stdio::null()).stdout(file).stderr(file2);
        let label = format!("{host}: {}", display(command));
        let child = wrapped.spawn().map_err(|source| TestNetError::Spawn {
            command: display(&wrapped),
            source,
        })?;
        let pid = child.id();
        inner.procs.push(Tracked {
            pid,
            label: label.clone(),
            log,
            child,
        });
        stale::record_process(&self.plan.id, pid, &label)?;
        Ok(pid)
    }

    // --- helpers ------------------------------------------------------------------------

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every step records what
        // it did), and teardown must still run.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `ip ARGS` in the root namespace (use `-n NS` to act on a namespace).
    fn ip(&self, args: &[&str]) -> Result<(), TestNetError> {
        run(&mut host_command("ip", args), None, TOOL_TIMEOUT).map(drop)
    }

    /// `PROGRAM ARGS` inside `host`'s namespace; trimmed stdout.
    fn tool(
        &self,
        host: Host,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<String, TestNetError> {
        let mut wrapped = in_netns(self.ns(host), &host_command(program, args));
        cmd::run_text(&mut wrapped, stdin)
    }

    /// Stops every tracked process, then removes the set. Returns the problems met.
    fn teardown_inner(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let procs = std::mem::take(&mut self.lock().procs);
        let mut problems = terminate_children(procs, thread::panicking());
        problems.extend(stale::remove_set(&self.plan.id, false));
        problems
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for problem in self.teardown_inner() {
            eprintln!("testnet {}: teardown: {problem}", self.plan.id);
        }
    }
}

/// The harness's nftables table in the hub namespace. Loaded with `nft -f`: the first two
/// lines make the load replace any previous version atomically.
fn hub_ruleset(plan: &AddressPlan, wan_addr: Ipv4Addr, blocked_udp: &BTreeSet<u16>) -> String {
    let set = |ports: &mut dyn Iterator<Item = u16>| {
        let ports: Vec<String> = ports.map(|p| p.to_string()).collect();
        ports.join(", ")
    };
    let wan = &plan.wan_hub_iface;
    let mut text = format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n");
    text.push_str(&format!("table inet {NFT_TABLE} {{\n"));
    if !blocked_udp.is_empty() {
        // Priority -150: before dstnat (-100), so the original destination port is seen.
        text.push_str(&format!(
            "  chain wan_block {{\n    type filter hook prerouting priority -150; policy accept;\n    \
             iifname \"{wan}\" udp dport {{ {} }} counter drop\n  }}\n",
            set(&mut blocked_udp.iter().copied())
        ));
    }
    if !plan.hub_extra_udp_ports.is_empty() {
        text.push_str(&format!(
            "  chain wan_redirect {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             iifname \"{wan}\" ip daddr {wan_addr} udp dport {{ {} }} redirect to :{}\n  }}\n",
            set(&mut plan.hub_extra_udp_ports.iter().copied()),
            plan.hub_wg_port
        ));
    }
    text.push_str("}\n");
    text
}

fn validate_extra_ports(ports: &[u16]) -> Result<Vec<u16>, TestNetError> {
    let mut out: Vec<u16> = Vec::new();
    for &port in ports {
        if port == 0 || port == HUB_WG_PORT {
            return Err(TestNetError::InvalidArgument {
                what: "extra hub UDP port",
                value: port.to_string(),
                reason: "must not be 0 or the WireGuard port itself",
            });
        }
        if !out.contains(&port) {
            out.push(port);
        }
    }
    Ok(out)
}

fn validate_public_key(key: &str) -> Result<(), TestNetError> {
    let base64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
    let ok = key.len() == 44 && key.ends_with('=') && key[..43].chars().all(base64);
    if ok {
        Ok(())
    } else {
        Err(TestNetError::InvalidArgument {
            what: "WireGuard public key",
            value: key.to_owned(),
            reason: "expected 44 characters of base64",
        })
    }
}

/// A fresh candidate id: `tn` + 6 hex digits hashed from the pid, a per-process counter,
/// the clock and the std hasher's random keys.
fn candidate_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    std::process::id().hash(&mut hasher);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        .hash(&mut hasher);
    thread::current().id().hash(&mut hasher);
    format!("tn{:06x}", hasher.finish() & 0xff_ffff)
}

/// Claims an unused id (call with the run-directory lock held).
fn claim_new_id() -> Result<String, TestNetError> {
    const ATTEMPTS: u32 = 64;
    for _ in 0..ATTEMPTS {
        let id = candidate_id();
        if stale::claim(&id)? {
            return Ok(id);
        }
    }
    Err(TestNetError::NoFreeId { attempts: ATTEMPTS })
}

fn log_of(inner: &Inner, pid: u32) -> PathBuf {
    inner
        .procs
        .iter()
        .find(|p| p.pid == pid)
        .map(|p| p.log.clone())
        .unwrap_or_default()
}

/// Polls `ready` every 10 ms for up to [`START_TIMEOUT`]; fails early if tracked process
/// `pid` exits meanwhile.
fn wait_until_running(
    inner: &mut Inner,
    pid: u32,
    what: &str,
    mut ready: impl FnMut() -> Result<bool, TestNetError>,
) -> Result<(), TestNetError> {
    wait_until(what, START_TIMEOUT, || {
        if ready()? {
            return Ok(true);
        }
        if let Some(tracked) = inner.procs.iter_mut().find(|p| p.pid == pid)
            && let Ok(Some(status)) = tracked.child.try_wait()
        {
            return Err(TestNetError::ExitedEarly {
                command: tracked.label.clone(),
                pid,
                status,
                log_tail: log_tail(&tracked.log, 5).replace('\n', " | "),
            });
        }
        Ok(false)
    })
}

/// Polls `done` every 10 ms until it returns true or `timeout` passes.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, TestNetError>,
) -> Result<(), TestNetError> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TestNetError::NotReady {
                what: what.to_owned(),
                timeout,
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs tracked process `pid`, reaps it and forgets it.
fn kill_tracked(inner: &mut Inner, pid: u32) -> Result<(), TestNetError> {
    let Some(index) = inner.procs.iter().position(|p| p.pid == pid) else {
        return Ok(());
    };
    let mut tracked = inner.procs.remove(index);
    // `Child::kill` is a no-op error if it already exited; `wait` reaps either way.
    let _ = tracked.child.kill();
    tracked.child.wait().map_err(|source| TestNetError::Wait {
        command: tracked.label.clone(),
        source,
    })?;
    Ok(())
}

/// SIGTERM to every process still running, up to [`TERM_GRACE`] for all of them to exit,
/// SIGKILL for the rest; reaps them all. With `show_logs`, prints the end of each log.
fn terminate_children(mut procs: Vec<Tracked>, show_logs: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for tracked in &mut procs {
        if matches!(tracked.child.try_wait(), Ok(None))
            && let Ok(raw) = i32::try_from(tracked.pid)
            && let Err(e) = kill(Pid::from_raw(raw), Signal::SIGTERM)
        {
            problems.push(error_chain(&TestNetError::Signal {
                signal: "SIGTERM",
                pid: tracked.pid,
                source: e,
            }));
        }
    }
    let deadline = Instant::now() + TERM_GRACE;
    loop {
        let running = procs
            .iter_mut()
            .map(|t| matches!(t.child.try_wait(), Ok(None)))
            .filter(|&still_running| still_running)
            .count();
        if running == 0 || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    for tracked in &mut procs {
        if matches!(tracked.child.try_wait(), Ok(None)) {
            eprintln!(
                "testnet: pid {} ({}) ignored SIGTERM for {:?}; SIGKILL",
                tracked.pid, tracked.label, TERM_GRACE
            );
            let _ = tracked.child.kill();
        }
        if let Err(e) = tracked.child.wait() {
            problems.push(format!("failed to reap pid {}: {e}", tracked.pid));
        }
        if show_logs {
            eprintln!(
                "---- {} (pid {}), end of {}:\n{}",
                tracked.label,
                tracked.pid,
                tracked.log.display(),
                log_tail(&tracked.log, 20)
            );
        }
    }
    problems
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_blocks_before_redirecting() {
        let plan = AddressPlan::new("tn0a1b2c", &[443]);
        let blocked = BTreeSet::from([51820]);
        let text = hub_ruleset(&plan, Ipv4Addr::new(10, 250, 0, 5), &blocked);
        assert!(
            text.starts_with("table inet tsunagi_testnet {}\ndelete table inet tsunagi_testnet\n")
        );
        assert!(text.contains("hook prerouting priority -150"));
        assert!(text.contains("iifname \"tn0a1b2cw0\" udp dport { 51820 } counter drop"));
        assert!(text.contains(
            "iifname \"tn0a1b2cw0\" ip daddr 10.250.0.5 udp dport { 443 } redirect to :51820"
        ));

        let empty = hub_ruleset(
            &AddressPlan::new("tn0a1b2c", &[]),
            Ipv4Addr::LOCALHOST,
            &BTreeSet::new(),
        );
        assert!(!empty.contains("chain"));
    }

    #[test]
    fn ids_are_well_formed_and_vary() {
        let ids: BTreeSet<String> = (0..50).map(|_| candidate_id()).collect();
        assert!(ids.len() > 45, "too many collisions: {ids:?}");
        assert!(ids.iter().all(|id| stale::is_set_id(id)));
    }

    #[test]
    fn argument_checks() {
        assert!(validate_public_key("lIlhplTG+BgBTOtVYeaawmD+yppJD2T2vdIBeuTCSVY=").is_ok());
        assert!(validate_public_key("short=").is_err());
        assert!(validate_extra_ports(&[443, 443, 8443]).unwrap() == [443, 8443]);
        assert!(validate_extra_ports(&[51820]).is_err());
        assert!(validate_extra_ports(&[0]).is_err());
    }

    #[test]
    fn keypair_debug_hides_the_private_key() {
        let keys = KeyPair {
            private_key: "SECRET".into(),
            public_key: "PUBLIC".into(),
        };
        let text = format!("{keys:?}");
        assert!(!text.contains("SECRET") && text.contains("PUBLIC"));
    }
}
