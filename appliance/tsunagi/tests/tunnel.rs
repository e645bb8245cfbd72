//! Issue 3, tunnel acceptance: the box's tunnel service against a hub running wireguard-go,
//! in network namespaces created by the test network harness (`hil-tests`).
//!
//! 1. the tunnel comes up and the hub's health address answers through it (time to the first
//!    handshake printed);
//! 2. the hub's WireGuard restarts, and separately the hub's address changes (DNS name
//!    re-resolved): the box reconnects (times printed);
//! 3. UDP 51820 blocked with an alternative endpoint on UDP 443: the box switches;
//! 5. a wrong hub key: no handshake, a clear reason, no crash loop; a private key file
//!    readable by others is refused.
#![expect(
    clippy::disallowed_methods,
    reason = "these tests poll real processes from plain threads, not from a tokio runtime"
)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use hil_tests::testnet::{Host, Options, TestNet};
use nix::sys::signal::Signal;

/// The hub's name in the box namespace's hosts file.
const HUB_NAME: &str = "hub.tsunagi.test";

fn skip() -> bool {
    skip_unless_root("tunnel tests")
}

/// A hosts file for the box namespace (`ip netns exec` bind-mounts /etc/netns/NS/hosts over
/// /etc/hosts). Rewritten in place, so the bind mount sees every change.
struct Hosts {
    path: PathBuf,
}

impl Hosts {
    fn new(ns: &str, hub: &str) -> Hosts {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = Hosts {
            path: dir.join("hosts"),
        };
        hosts.point_to(hub);
        hosts
    }

    fn point_to(&self, hub: &str) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .unwrap();
        writeln!(f, "127.0.0.1 localhost\n{hub} {HUB_NAME}").unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct Setup {
    net: TestNet,
    h: Harness,
    hosts: Hosts,
    metrics_port: u16,
}

fn tunnel_config(net: &TestNet, hub_key: &str, extra: &str) -> String {
    format!(
        r#"{FAST_SUPERVISOR}
[heartbeat]
enabled = false

[tunnel]
interface = "{iface}"
backend = "userspace"
hub-endpoint = "{HUB_NAME}:51820"
hub-public-key = "{hub_key}"
address = "10.99.0.2/24"
hub-subnets = ["10.98.0.0/24"]
health-url = "http://10.98.0.1:8080/health"
probe-interval = "1s"
probe-failures = 2
probe-timeout = "500ms"
{extra}
"#,
        iface = net.id().to_owned() + "b",
    )
}

/// Brings up the test network and writes the box's config; the box key is registered at the
/// hub unless `register` is false.
fn setup(opts: Options, extra: &str, wrong_hub_key: bool, register: bool) -> Setup {
    let net = TestNet::up(opts).expect("test network");
    let hosts = Hosts::new(net.ns(Host::Box), "10.250.0.1");
    let hub_key = if wrong_hub_key {
        // A valid key that is not the hub's.
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".to_owned()
    } else {
        net.hub_public_key().to_owned()
    };
    // The metrics endpoint listens in the box namespace (its own loopback).
    let metrics_port = 9464;
    let h = Harness::new(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{}",
        tunnel_config(&net, &hub_key, extra)
    ));
    if register {
        let out = std::process::Command::new(BIN)
            .args(["vpn", "pubkey", "--config"])
            .arg(&h.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        net.hub_add_peer(&public, &["10.99.0.2/32"]).unwrap();
    }
    Setup {
        net,
        h,
        hosts,
        metrics_port,
    }
}

fn summary(status: &serde_json::Value) -> String {
    service(status, "tunnel")["summary"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

fn is_up(status: &serde_json::Value) -> bool {
    state_of(status, "tunnel") == "ready" && summary(status).starts_with("up via")
}

/// Waits for the tunnel to be up; returns how long it took.
fn wait_up(h: &Harness, what: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    h.wait_for(what, timeout, is_up);
    start.elapsed()
}

/// Waits until the status is not up (the service noticed the failure).
fn wait_down(h: &Harness, timeout: Duration) {
    h.wait_for("tunnel to notice", timeout, |s| !is_up(s));
}

#[test]
fn tunnel_comes_up_and_the_hub_answers_through_it() {
    if skip() {
        return;
    }
    let mut s = setup(Options::default(), "", false, true);
    s.h.start_in_netns(s.net.ns(Host::Box));
    let took = wait_up(&s.h, "tunnel up", Duration::from_secs(30));
    let status = s.h.status().unwrap();
    let text = summary(&status);
    let first = text
        .split("first handshake after ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .unwrap_or("?");
    println!(
        "tunnel: first handshake {first} ms after the service started; up (probe answered) after {took:?}"
    );
    assert!(text.contains("up via 10.250.0.1:51820"), "{text}");
    assert_eq!(service(&status, "tunnel")["health"], "ok");
    // The hub sees the handshake too.
    let public = std::process::Command::new(BIN)
        .args(["vpn", "pubkey", "--config"])
        .arg(&s.h.config)
        .output()
        .unwrap();
    let public = String::from_utf8(public.stdout).unwrap();
    assert!(s.net.hub_handshake_age(public.trim()).unwrap().is_some());
    // Only the hub subnets go through the tunnel.
    let routes = s
        .net
        .exec(
            Host::Box,
            std::process::Command::new("ip").args(["-4", "route"]),
        )
        .unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(routes.contains("10.98.0.0/24"), "{routes}");
    assert!(!routes.contains("default"), "{routes}");
    s.h.signal(Signal::SIGTERM);
    assert!(s.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

#[test]
fn the_box_reconnects_after_a_hub_restart_and_a_hub_address_change() {
    if skip() {
        return;
    }
    let mut s = setup(Options::default(), "", false, true);
    s.h.start_in_netns(s.net.ns(Host::Box));
    wait_up(&s.h, "tunnel up", Duration::from_secs(30));

    // 1. The hub's WireGuard restarts (it forgets the session).
    s.net.hub_restart_wireguard().unwrap();
    let back = Instant::now();
    wait_down(&s.h, Duration::from_secs(20));
    wait_up(&s.h, "reconnect after hub restart", Duration::from_secs(30));
    let took = back.elapsed();
    println!("tunnel: reconnected {took:?} after the hub's WireGuard was back");
    assert!(took < Duration::from_secs(20), "{took:?}");

    // 2. The hub moves to a new address; DNS (here the hosts file) follows.
    s.net
        .hub_set_wan_address("10.250.0.5".parse().unwrap())
        .unwrap();
    s.hosts.point_to("10.250.0.5");
    let moved = Instant::now();
    wait_down(&s.h, Duration::from_secs(20));
    s.h.wait_for(
        "reconnect at the new address",
        Duration::from_secs(30),
        |st| is_up(st) && summary(st).contains("10.250.0.5:51820"),
    );
    let took = moved.elapsed();
    println!("tunnel: reconnected {took:?} after the hub's address changed");
    assert!(took < Duration::from_secs(25), "{took:?}");
    assert!(s.h.log_text().contains("tunnel recovery step"));
    s.h.signal(Signal::SIGTERM);
    assert!(s.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

#[test]
fn blocked_udp_51820_switches_to_the_alternative_endpoint() {
    if skip() {
        return;
    }
    let mut s = setup(
        Options {
            hub_extra_udp_ports: vec![443],
        },
        &format!("alternative-endpoints = [\"{HUB_NAME}:443\"]"),
        false,
        true,
    );
    s.h.start_in_netns(s.net.ns(Host::Box));
    wait_up(&s.h, "tunnel up", Duration::from_secs(30));
    s.net.block_udp(51820).unwrap();
    let blocked = Instant::now();
    s.h.wait_for("switch to UDP 443", Duration::from_secs(60), |st| {
        is_up(st) && summary(st).contains(":443")
    });
    let took = blocked.elapsed();
    let status = s.h.status().unwrap();
    let text = summary(&status);
    println!("tunnel: on the alternative endpoint {took:?} after UDP 51820 was blocked: {text}");
    assert!(text.contains("on alternative endpoint 1"), "{text}");
    // Each step is in the metrics too: in the status JSON and on the metrics endpoint.
    let metrics = &service(&status, "tunnel")["metrics"];
    assert_eq!(metrics["endpoint_index"], 1.0, "{metrics}");
    assert!(
        metrics["recovery_switch_endpoint_total"].as_f64().unwrap() >= 1.0,
        "{metrics}"
    );
    let bin = hil_tests::testnet::testnet_binary().unwrap();
    let mut get = std::process::Command::new(bin);
    get.args([
        "get",
        &format!("http://127.0.0.1:{}/metrics", s.metrics_port),
    ]);
    let scraped = s.net.exec(Host::Box, &get).unwrap();
    let scraped = String::from_utf8_lossy(&scraped.stdout);
    assert!(
        scraped.contains("tsunagi_tunnel_endpoint_index 1\n"),
        "{scraped}"
    );
    assert!(
        scraped.contains("# TYPE tsunagi_tunnel_recovery_switch_endpoint_total counter"),
        "{scraped}"
    );
    assert!(scraped.contains("tsunagi_tunnel_up 1\n"), "{scraped}");
    s.h.signal(Signal::SIGTERM);
    assert!(s.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

#[test]
fn a_wrong_hub_key_gives_a_clear_reason_and_no_crash_loop() {
    if skip() {
        return;
    }
    let mut s = setup(Options::default(), "", true, false);
    s.h.start_in_netns(s.net.ns(Host::Box));
    s.h.wait_for("a clear reason", Duration::from_secs(30), |st| {
        state_of(st, "tunnel") == "ready" && summary(st).contains("no handshake with the hub")
    });
    // Several probe rounds and recovery steps later: still the same process, no restarts.
    let first = s.h.status().unwrap();
    let pid = pid_of(&first, "tunnel");
    std::thread::sleep(Duration::from_secs(6));
    let later = s.h.status().unwrap();
    let tunnel = service(&later, "tunnel");
    assert_eq!(pid_of(&later, "tunnel"), pid);
    assert_eq!(tunnel["restarts"], 0);
    assert_eq!(tunnel["health"], "degraded");
    let text = summary(&later);
    assert!(text.contains("tunnel.hub-public-key"), "{text}");
    s.h.signal(Signal::SIGTERM);
    assert!(s.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

#[test]
fn a_private_key_readable_by_others_is_refused() {
    if skip() {
        return;
    }
    let mut s = setup(Options::default(), "", false, true);
    let key = s.h.state_dir().join("tunnel").join("private.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    s.h.start_in_netns(s.net.ns(Host::Box));
    let status = s.h.wait_for("the refusal", Duration::from_secs(30), |st| {
        service(st, "tunnel")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("readable or writable by group or others"))
    });
    let err = service(&status, "tunnel")["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(err.contains("private.key"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    s.h.signal(Signal::SIGTERM);
    assert!(s.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}

/// `testnet get URL` from inside `host`: whether it answered 200.
fn reachable(net: &TestNet, host: Host, url: &str) -> bool {
    let bin = hil_tests::testnet::testnet_binary().unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["get", url, "--timeout-ms", "1500"]);
    net.exec(host, &cmd).unwrap().status.success()
}

#[test]
fn firewall_lets_clinic_devices_reach_only_the_box_and_the_wan_only_wireguard() {
    if skip() {
        return;
    }
    let mut s = setup(Options::default(), "", false, true);
    let lan = s.net.plan().lan_box_iface.clone();
    let config = std::fs::read_to_string(&s.h.config).unwrap()
        + &format!("\n[tunnel.firewall]\nlan-interfaces = [\"{lan}\"]\nlan-tcp-ports = [8443]\n");
    std::fs::write(&s.h.config, config).unwrap();
    // Make the firewall, not the routing table, the thing that stops forwarding: turn
    // forwarding on and give the clinic a route to the hub network through the box.
    let mut sysctl = std::process::Command::new("sysctl");
    sysctl.args(["-qw", "net.ipv4.ip_forward=1"]);
    assert!(s.net.exec(Host::Box, &sysctl).unwrap().status.success());
    let mut route = std::process::Command::new("ip");
    route.args(["route", "add", "10.98.0.0/24", "via", "192.168.50.1"]);
    assert!(s.net.exec(Host::Clinic, &route).unwrap().status.success());
    // One of the box's own services, listening on every address of the box.
    let bin = hil_tests::testnet::testnet_binary().unwrap();
    let mut serve = std::process::Command::new(&bin);
    serve.args(["serve-health", "0.0.0.0:8443"]);
    s.net.spawn(Host::Box, &serve).unwrap();

    s.h.start_in_netns(s.net.ns(Host::Box));
    wait_up(&s.h, "tunnel up", Duration::from_secs(30));
    assert!(s.h.log_text().contains("firewall loaded"));

    // Clinic devices reach the box's own service, and nothing behind it.
    assert!(reachable(
        &s.net,
        Host::Clinic,
        "http://192.168.50.1:8443/health"
    ));
    assert!(!reachable(
        &s.net,
        Host::Clinic,
        "http://10.98.0.1:8080/health"
    ));
    // The WAN side reaches nothing but WireGuard (which is how the tunnel came up).
    assert!(!reachable(
        &s.net,
        Host::Hub,
        "http://10.250.0.2:8443/health"
    ));
    // Through the tunnel, the hub network reaches only the ports listed for it (none here).
    assert!(!reachable(
        &s.net,
        Host::Hub,
        "http://10.99.0.2:8443/health"
    ));
    // And the box itself still reaches the hub through the tunnel.
    assert!(reachable(&s.net, Host::Box, "http://10.98.0.1:8080/health"));
    let rules = s
        .net
        .exec(
            Host::Box,
            std::process::Command::new("nft").args(["list", "table", "inet", "tsunagi"]),
        )
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(
        rules.contains("hook forward priority filter; policy drop;"),
        "{rules}"
    );
    s.h.signal(Signal::SIGTERM);
    assert!(s.h.wait_exit(Duration::from_secs(15)).unwrap().success());
}
