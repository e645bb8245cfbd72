//! The test network harness, end to end. Each test brings up its own set, so they run in
//! parallel (threads of one process, or nextest's processes).
//!
//! They need root and `/dev/net/tun`. Without them each test prints why and returns,
//! unless `CI` is set: then it fails (CI runs as root).
//!
//! The box side of the tunnel is a stand-in for the product ([`BoxTunnel`]): its own
//! wireguard-go, configured with `wg` and `ip` in the box namespace.

#![forbid(unsafe_code)]
#![expect(
    clippy::disallowed_methods,
    reason = "tests wait on processes and network state from plain threads, no async runtime"
)]

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use hil_tests::testnet::{self, Host, KeyPair, Options, TestNet, generate_keypair};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// This crate's binary: `get URL` is the HTTP client we run inside namespaces.
const TESTNET: &str = env!("CARGO_BIN_EXE_testnet");

fn command(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// Runs a command in `host`, asserts success, returns trimmed stdout.
fn ok(net: &TestNet, host: Host, program: &str, args: &[&str]) -> String {
    let out = net.exec(host, &command(program, args)).unwrap();
    assert!(
        out.status.success(),
        "`{program} {}` in {host} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn succeeds(net: &TestNet, host: Host, program: &str, args: &[&str]) -> bool {
    net.exec(host, &command(program, args))
        .unwrap()
        .status
        .success()
}

/// `GET url` from inside `host` with a 1 s timeout: `Some("STATUS\nBODY")` or `None` if no
/// response came.
fn get(net: &TestNet, host: Host, url: &str) -> Option<String> {
    let out = net
        .exec(
            host,
            &command(TESTNET, &["get", url, "--timeout-ms", "1000"]),
        )
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `done` every 50 ms; the time it took, or `None` after `timeout`.
fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the hub reports a handshake with `public_key` newer than `after` (whole
/// seconds, as wg reports them); `None` means any handshake.
fn wait_for_handshake(
    net: &TestNet,
    public_key: &str,
    after: Option<SystemTime>,
    timeout: Duration,
) -> Option<Duration> {
    poll(timeout, || {
        match net.hub_latest_handshake(public_key).unwrap() {
            Some(at) => after.is_none_or(|after| at > after),
            None => false,
        }
    })
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The box side of the tunnel, standing in for the product: its own wireguard-go
/// (tracked by the harness) configured with `wg` and `ip` in the box namespace, following
/// the plan: 10.99.0.2/24, MTU 1280, peer = hub, allowed 10.99.0.1/32 + 10.98.0.0/24,
/// keepalive 25 s, route 10.98.0.0/24.
struct BoxTunnel<'a> {
    net: &'a TestNet,
    iface: String,
    keys: KeyPair,
}

impl<'a> BoxTunnel<'a> {
    fn up(net: &'a TestNet, endpoint: SocketAddrV4) -> BoxTunnel<'a> {
        let plan = net.plan();
        let keys = generate_keypair().unwrap();
        let host_route = format!("{}/32", plan.box_tunnel_addr.addr);
        net.hub_add_peer(&keys.public_key, &[&host_route]).unwrap();

        let iface = plan.box_wg_iface.clone();
        let key_file: PathBuf = net.state_dir().join("box.key");
        keys.write_private_key(&key_file).unwrap();
        net.start_wireguard_go(Host::Box, &iface).unwrap();
        let key_file = key_file.to_str().unwrap();
        ok(
            net,
            Host::Box,
            "wg",
            &["set", &iface, "private-key", key_file],
        );
        let tunnel = BoxTunnel { net, iface, keys };
        tunnel.set_peer(endpoint);

        let addr = plan.box_tunnel_addr.to_string();
        let mtu = plan.tunnel_mtu.to_string();
        let hub_net = plan.hub_network().to_string();
        let i = tunnel.iface.as_str();
        ok(net, Host::Box, "ip", &["addr", "add", &addr, "dev", i]);
        ok(net, Host::Box, "ip", &["link", "set", i, "mtu", &mtu, "up"]);
        ok(net, Host::Box, "ip", &["route", "add", &hub_net, "dev", i]);
        tunnel
    }

    fn public_key(&self) -> &str {
        &self.keys.public_key
    }

    /// The hub peer with `endpoint`. With the link up, turning keepalive on makes
    /// wireguard-go handshake at once.
    fn set_peer(&self, endpoint: SocketAddrV4) {
        let [hub_ip, hub_net] = self.net.plan().box_allowed_ips();
        let allowed = format!("{hub_ip},{hub_net}");
        let endpoint = endpoint.to_string();
        let hub_key = self.net.hub_public_key();
        let args = [
            "set",
            self.iface.as_str(),
            "peer",
            hub_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
            "persistent-keepalive",
            "25",
        ];
        ok(self.net, Host::Box, "wg", &args);
    }

    /// Removes and re-adds the hub peer: drops the session, so wireguard-go handshakes
    /// again right away. What the product's recovery does when the hub lost its state.
    fn reapply_peer(&self, endpoint: SocketAddrV4) {
        let hub_key = self.net.hub_public_key();
        ok(
            self.net,
            Host::Box,
            "wg",
            &["set", &self.iface, "peer", hub_key, "remove"],
        );
        self.set_peer(endpoint);
    }

    /// Changes only the endpoint of the hub peer.
    fn set_endpoint(&self, endpoint: SocketAddrV4) {
        let hub_key = self.net.hub_public_key();
        let endpoint = endpoint.to_string();
        let args = [
            "set",
            self.iface.as_str(),
            "peer",
            hub_key,
            "endpoint",
            &endpoint,
        ];
        ok(self.net, Host::Box, "wg", &args);
    }
}

#[test]
fn up_creates_the_namespaces_links_and_hub() {
    let Some(net) = TestNet::up_for_test(Options::default()) else {
        return;
    };
    let plan = net.plan();
    for host in Host::ALL {
        assert!(netns_exists(net.ns(host)), "{} missing", net.ns(host));
    }

    // WAN and LAN from the box; the clinic is confined to its LAN.
    let wan = plan.wan_hub_addr.addr.to_string();
    let clinic = plan.lan_clinic_addr.addr.to_string();
    assert!(succeeds(&net, Host::Box, "ping", &["-c1", "-W2", &wan]));
    assert!(succeeds(&net, Host::Box, "ping", &["-c1", "-W2", &clinic]));
    assert!(!succeeds(&net, Host::Clinic, "ping", &["-c1", "-W1", &wan]));
    let forwarding = ok(&net, Host::Box, "cat", &["/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(forwarding, "0");

    // The hub's wireguard-go runs in the hub namespace and listens on 51820, MTU 1280.
    let pid = net.hub_wireguard_pid().unwrap();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "wireguard-go");
    let hub_pids = Command::new("ip")
        .args(["netns", "pids", net.ns(Host::Hub)])
        .output()
        .unwrap();
    let hub_pids = String::from_utf8_lossy(&hub_pids.stdout);
    assert!(hub_pids.lines().any(|l| l.trim() == pid.to_string()));
    let show = ok(&net, Host::Hub, "wg", &["show", &plan.hub_wg_iface]);
    assert!(
        show.contains(&format!("interface: {}", plan.hub_wg_iface)),
        "{show}"
    );
    assert!(show.contains("listening port: 51820"), "{show}");
    let link = ok(
        &net,
        Host::Hub,
        "ip",
        &["-o", "addr", "show", "dev", &plan.hub_wg_iface],
    );
    assert!(link.contains("10.99.0.1/24"), "{link}");
    let link = ok(
        &net,
        Host::Hub,
        "ip",
        &["link", "show", "dev", &plan.hub_wg_iface],
    );
    assert!(link.contains("mtu 1280"), "{link}");

    // The health server answers inside the hub; the box has no way there yet.
    let url = plan.health_url();
    assert_eq!(get(&net, Host::Hub, &url).as_deref(), Some("200\nok\n"));
    let other = url.replace("/health", "/other");
    assert_eq!(
        get(&net, Host::Hub, &other).as_deref(),
        Some("404\nnot found\n")
    );
    assert_eq!(get(&net, Host::Box, &url), None);

    // Nothing for the tunnel in the box.
    let links = ok(&net, Host::Box, "ip", &["-o", "link"]);
    assert!(!links.contains(&plan.box_wg_iface), "{links}");
    let routes = ok(&net, Host::Box, "ip", &["route"]);
    assert!(
        !routes.contains("10.98.") && !routes.contains("10.99."),
        "{routes}"
    );
}

#[test]
fn wireguard_peer_reaches_the_hub_health_endpoint() {
    let Some(net) = TestNet::up_for_test(Options::default()) else {
        return;
    };
    let plan = net.plan();
    let tunnel = BoxTunnel::up(&net, plan.hub_endpoint());

    let took = wait_for_handshake(&net, tunnel.public_key(), None, Duration::from_secs(5))
        .expect("no handshake within 5 s");
    println!("first handshake seen by the hub {took:?} after bring-up");

    assert_eq!(
        get(&net, Host::Box, &plan.health_url()).as_deref(),
        Some("200\nok\n")
    );
    let age = net.hub_handshake_age(tunnel.public_key()).unwrap();
    assert!(
        age.is_some_and(|age| age < Duration::from_secs(10)),
        "{age:?}"
    );

    // The hub routes the box's tunnel address through its WireGuard interface.
    let box_ip = plan.box_tunnel_addr.addr.to_string();
    let route = ok(&net, Host::Hub, "ip", &["route", "get", &box_ip]);
    assert!(route.contains(&plan.hub_wg_iface), "{route}");
    let hub_tunnel_ip = plan.hub_tunnel_addr.addr.to_string();
    assert!(succeeds(
        &net,
        Host::Box,
        "ping",
        &["-c1", "-W2", &hub_tunnel_ip]
    ));

    // Removing the peer removes its route too.
    net.hub_remove_peer(tunnel.public_key()).unwrap();
    assert!(matches!(
        net.hub_handshake_age(tunnel.public_key()),
        Err(testnet::TestNetError::UnknownPeer { .. })
    ));
    let routes = ok(&net, Host::Hub, "ip", &["route"]);
    assert!(!routes.contains(&format!("{box_ip} dev")), "{routes}");
}

#[test]
fn hub_renumber_needs_the_new_endpoint_and_redirects_follow() {
    let Some(net) = TestNet::up_for_test(Options {
        hub_extra_udp_ports: vec![443],
    }) else {
        return;
    };
    let plan = net.plan();
    let tunnel = BoxTunnel::up(&net, plan.hub_endpoint());
    wait_for_handshake(&net, tunnel.public_key(), None, Duration::from_secs(5))
        .expect("no first handshake");

    let new = std::net::Ipv4Addr::new(10, 250, 0, 5);
    net.hub_set_wan_address(new).unwrap();
    assert_eq!(net.hub_wan_address(), new);
    assert!(!succeeds(
        &net,
        Host::Box,
        "ping",
        &["-c1", "-W1", "10.250.0.1"]
    ));
    assert!(succeeds(
        &net,
        Host::Box,
        "ping",
        &["-c1", "-W2", "10.250.0.5"]
    ));
    // The box still sends to the old address.
    assert_eq!(get(&net, Host::Box, &plan.health_url()), None);
    // The redirect moved with the address: the new endpoint on :443 works.
    let rules = ok(
        &net,
        Host::Hub,
        "nft",
        &["list", "table", "inet", "tsunagi_testnet"],
    );
    assert!(
        rules.contains("ip daddr 10.250.0.5 udp dport 443"),
        "{rules}"
    );
    tunnel.set_endpoint(SocketAddrV4::new(new, 443));
    let took = poll(Duration::from_secs(5), || {
        get(&net, Host::Box, &plan.health_url()).as_deref() == Some("200\nok\n")
    });
    println!("health through the tunnel again {took:?} after setting the new endpoint");
    assert!(took.is_some());

    for bad in [[10, 250, 0, 2], [10, 250, 0, 255], [10, 251, 0, 1]] {
        assert!(net.hub_set_wan_address(bad.into()).is_err(), "{bad:?}");
    }
}

#[test]
fn hub_restart_then_the_peer_handshakes_again() {
    let Some(net) = TestNet::up_for_test(Options::default()) else {
        return;
    };
    let plan = net.plan();
    let tunnel = BoxTunnel::up(&net, plan.hub_endpoint());
    wait_for_handshake(&net, tunnel.public_key(), None, Duration::from_secs(5))
        .expect("no first handshake");
    let old_pid = net.hub_wireguard_pid().unwrap();

    let restart = Instant::now();
    net.hub_restart_wireguard().unwrap();
    println!(
        "hub wireguard-go killed and restarted in {:?}",
        restart.elapsed()
    );
    let new_pid = net.hub_wireguard_pid().unwrap();
    assert_ne!(old_pid, new_pid);
    assert!(!process_exists(old_pid));
    // Same key and peers, no session: the hub waits for the box.
    let show = ok(&net, Host::Hub, "wg", &["show", &plan.hub_wg_iface]);
    assert!(
        show.contains(net.hub_public_key()) && show.contains(tunnel.public_key()),
        "{show}"
    );
    assert_eq!(net.hub_handshake_age(tunnel.public_key()).unwrap(), None);

    // The product's move (vpn.md §5.2, recovery ladder): re-apply the peer.
    let reapply = Instant::now();
    tunnel.reapply_peer(plan.hub_endpoint());
    let took = wait_for_handshake(&net, tunnel.public_key(), None, Duration::from_secs(10))
        .expect("no handshake within 10 s of the restart");
    println!(
        "handshake again {took:?} after re-applying the peer, {:?} after the restart began",
        restart.elapsed()
    );
    assert!(reapply.elapsed() < Duration::from_secs(10));
    assert_eq!(
        get(&net, Host::Box, &plan.health_url()).as_deref(),
        Some("200\nok\n")
    );
}

#[test]
fn blocked_udp_port_and_the_udp_443_fallback() {
    let Some(net) = TestNet::up_for_test(Options {
        hub_extra_udp_ports: vec![443],
    }) else {
        return;
    };
    let plan = net.plan();
    let direct = plan.hub_endpoint();
    let fallback = SocketAddrV4::new(plan.wan_hub_addr.addr, 443);
    let tunnel = BoxTunnel::up(&net, direct);
    wait_for_handshake(&net, tunnel.public_key(), None, Duration::from_secs(5))
        .expect("no first handshake");
    assert!(get(&net, Host::Box, &plan.health_url()).is_some());
    let first = net.hub_latest_handshake(tunnel.public_key()).unwrap();
    // wg reports whole seconds: let a second pass so a new handshake would show.
    thread::sleep(Duration::from_millis(1100));

    net.block_udp(51820).unwrap();
    // A fresh session is needed (as after a hub restart or a rekey), and it cannot get through.
    tunnel.reapply_peer(direct);
    assert_eq!(get(&net, Host::Box, &plan.health_url()), None);
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        net.hub_latest_handshake(tunnel.public_key()).unwrap(),
        first,
        "a handshake got through the UDP/51820 block"
    );
    let rules = ok(
        &net,
        Host::Hub,
        "nft",
        &["list", "chain", "inet", "tsunagi_testnet", "wan_block"],
    );
    assert!(
        !rules.contains("counter packets 0 "),
        "the block dropped nothing:\n{rules}"
    );

    // Switch the endpoint to UDP/443, which the hub redirects to 51820.
    let switch = Instant::now();
    tunnel.set_endpoint(fallback);
    let took = wait_for_handshake(&net, tunnel.public_key(), first, Duration::from_secs(8))
        .expect("no handshake via UDP/443");
    println!("handshake via UDP/443 {took:?} after switching the endpoint");
    assert!(switch.elapsed() < Duration::from_secs(8));
    assert_eq!(
        get(&net, Host::Box, &plan.health_url()).as_deref(),
        Some("200\nok\n")
    );
}

/// `PID STARTTIME LABEL`, as the harness records the processes it starts.
fn process_record(pid: u32, label: &str) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
    let start = after_comm.split_whitespace().nth(19).unwrap();
    format!("{pid} {start} {label}\n")
}

/// An id of the harness's shape that no set uses.
fn unused_id() -> String {
    loop {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let id = format!("tn{:06x}", hasher.finish() & 0xff_ffff);
        let taken = Path::new("/run/tsunagi-testnet")
            .join(format!("{id}.pid"))
            .exists()
            || Host::ALL
                .iter()
                .any(|h| netns_exists(&format!("{id}-{}", h.name())));
        if !taken {
            return id;
        }
    }
}

#[test]
fn teardown_removes_everything_and_stale_sets_are_cleaned() {
    let Some(net) = TestNet::up_for_test(Options::default()) else {
        return;
    };
    let id = net.id().to_owned();
    let namespaces: Vec<String> = Host::ALL.iter().map(|&h| net.ns(h).to_owned()).collect();
    let pid_file = PathBuf::from(format!("/run/tsunagi-testnet/{id}.pid"));
    let socket = PathBuf::from(format!(
        "/var/run/wireguard/{}.sock",
        net.plan().hub_wg_iface
    ));
    assert!(pid_file.exists() && socket.exists() && net.state_dir().exists());
    let state_dir = net.state_dir().to_owned();
    // Everything in the hub (wireguard-go, health server) plus a process of our own.
    let hub_pids = Command::new("ip")
        .args(["netns", "pids", net.ns(Host::Hub)])
        .output()
        .unwrap();
    let mut pids: Vec<u32> = String::from_utf8_lossy(&hub_pids.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    pids.push(net.spawn(Host::Clinic, &command("sleep", &["60"])).unwrap());

    let start = Instant::now();
    drop(net);
    println!("teardown took {:?}", start.elapsed());
    for ns in &namespaces {
        assert!(!netns_exists(ns), "{ns} still exists");
    }
    assert!(!pid_file.exists() && !socket.exists() && !state_dir.exists());
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} still runs");
    }

    // A stale set: its owner is dead; it left a namespace, a socket, a process.
    let stale = unused_id();
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let stale_ns = format!("{stale}-hub");
    assert!(
        Command::new("ip")
            .args(["netns", "add", &stale_ns])
            .status()
            .unwrap()
            .success()
    );
    let stale_socket = PathBuf::from(format!("/var/run/wireguard/{stale}hub.sock"));
    fs::create_dir_all("/var/run/wireguard").unwrap();
    fs::write(&stale_socket, "").unwrap();
    let mut leftover = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let stale_dir = PathBuf::from(format!("/run/tsunagi-testnet/{stale}"));
    fs::create_dir_all(&stale_dir).unwrap();
    fs::write(
        stale_dir.join("pids"),
        process_record(leftover.id(), "leftover"),
    )
    .unwrap();
    // The pid file last, in one rename: a set only counts once it is complete.
    let stale_pid_file = PathBuf::from(format!("/run/tsunagi-testnet/{stale}.pid"));
    let tmp = stale_pid_file.with_extension("pid.tmp");
    fs::write(&tmp, format!("{dead_pid}\n")).unwrap();
    fs::rename(&tmp, &stale_pid_file).unwrap();

    let next = TestNet::up_for_test(Options::default()).unwrap();
    assert!(!netns_exists(&stale_ns), "stale {stale_ns} survived");
    assert!(!stale_pid_file.exists() && !stale_socket.exists() && !stale_dir.exists());
    let ended = poll(Duration::from_secs(5), || {
        leftover.try_wait().unwrap().is_some()
    });
    assert!(ended.is_some(), "the stale set's process still runs");
    next.teardown().unwrap();
}

#[test]
fn cli_up_prints_the_plan_and_tears_down_on_sigterm() {
    if let Err(e) = testnet::preflight() {
        assert!(
            !e.is_environment() || std::env::var_os("CI").is_none(),
            "CI is set, so this test must run, but {}",
            testnet::error_chain(&e)
        );
        if e.is_environment() {
            eprintln!("skipping: {}", testnet::error_chain(&e));
            return;
        }
        panic!("{}", testnet::error_chain(&e));
    }
    let mut child = Command::new(TESTNET)
        .args(["up", "--udp-port", "443"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut block = Vec::new();
    let mut json = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if line.starts_with('{') {
            json = Some(line);
            break;
        }
        block.push(line);
    }
    let block = block.join("\n");
    let json: serde_json::Value = serde_json::from_str(&json.expect("no JSON line")).unwrap();
    let id = json["id"].as_str().unwrap().to_owned();
    assert!(
        block.contains(&format!("{id}-hub")) && block.contains("443 -> 51820"),
        "{block}"
    );
    assert_eq!(json["hub_extra_udp_ports"], serde_json::json!([443]));
    assert!(
        json["hub_public_key"]
            .as_str()
            .is_some_and(|k| k.len() == 44)
    );
    assert!(netns_exists(&format!("{id}-box")));

    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let ended = poll(Duration::from_secs(10), || {
        child.try_wait().unwrap().is_some()
    });
    if ended.is_none() {
        let _ = child.kill();
        panic!("testnet up did not stop within 10 s of SIGTERM");
    }
    assert!(child.wait().unwrap().success());
    for host in Host::ALL {
        assert!(!netns_exists(&format!("{id}-{}", host.name())));
    }
    assert!(!Path::new(&format!("/run/tsunagi-testnet/{id}.pid")).exists());
}
