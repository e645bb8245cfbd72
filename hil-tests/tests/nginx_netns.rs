//! The nginx WebDAV guard inside the test network's hub namespace, on the hub network's
//! address (as `cargo xtask demo` runs it, so the box reaches it through the tunnel).
//!
//! Needs root and `/dev/net/tun` (the test network) plus `nginx` and `openssl`. Without
//! root or TUN the test prints why and returns, unless `CI` is set: then it fails (CI runs
//! as root). A missing nginx or openssl always fails.

#![forbid(unsafe_code)]

use std::fs;
use std::io::Write as _;
use std::net::SocketAddrV4;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use hil_tests::nginx::{self, Nginx, NginxError};
use hil_tests::testnet::{Host, Options, TestNet};

/// The network namespace inode of a process (`/proc/PID/ns/net` → `net:[INODE]`).
fn netns_inode_of(pid: u32) -> u64 {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let link = link.to_str().unwrap();
    link.strip_prefix("net:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or_else(|| panic!("odd namespace link {link}"))
        .parse()
        .unwrap()
}

/// A `PUT` over TLS from inside `ns` with `openssl s_client`, verifying the server
/// certificate for `addr`'s IP against the guard's CA; returns what the server answered.
fn put_from(ns: &str, nginx: &Nginx, addr: SocketAddrV4, path: &str, body: &str) -> String {
    let ip = addr.ip().to_string();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "openssl", "s_client", "-quiet"])
        .args(["-connect", &addr.to_string(), "-verify_return_error"])
        .args(["-verify_ip", &ip])
        .arg("-CAfile")
        .arg(nginx.ca_file())
        .arg("-cert")
        .arg(nginx.client_cert_file())
        .arg("-key")
        .arg(nginx.client_key_file())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl s_client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nginx_serves_webdav_on_the_hub_address_inside_the_hub_namespace() {
    let Some(net) = TestNet::up_for_test(Options::default()) else {
        return;
    };
    let hub = net.ns(Host::Hub).to_owned();
    let hub_ip = net.plan().hub_net_addr.addr;
    let listen = SocketAddrV4::new(hub_ip, 8443);
    let options = nginx::Options {
        listen: Some(listen),
        netns: Some(hub.clone()),
        ..nginx::Options::default()
    };
    // Readiness (a TLS handshake verified for 10.98.0.1, from inside the hub) is part of
    // the start.
    let nginx = Nginx::start_for_test_with(&options);
    assert_eq!(nginx.base_url(), format!("https://{hub_ip}:8443/ssmix2/"));
    assert_eq!(nginx.addr(), listen);
    assert_eq!(nginx.port(), 8443);
    assert_eq!(nginx.netns(), Some(hub.as_str()));
    assert_eq!(nginx.data_root(), nginx.dir().join("www").join("ssmix2"));
    assert!(nginx.data_root().is_dir());

    // The pid the guard keeps is nginx's master (`ip netns exec` execs), in the hub.
    let pid = nginx.pid().unwrap();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "nginx");
    let pid_file = fs::read_to_string(nginx.dir().join("nginx.pid")).unwrap();
    assert_eq!(pid_file.trim(), pid.to_string());
    let hub_inode = fs::metadata(Path::new("/run/netns").join(&hub))
        .unwrap()
        .ino();
    assert_eq!(netns_inode_of(pid), hub_inode);
    assert_ne!(netns_inode_of(std::process::id()), hub_inode);
    let listening = net
        .exec(Host::Hub, Command::new("ss").args(["-Hltn"]))
        .unwrap();
    let listening = String::from_utf8_lossy(&listening.stdout);
    assert!(listening.contains("10.98.0.1:8443"), "{listening}");

    // A client in the hub verifies the certificate for 10.98.0.1 and PUTs a file.
    let answer = put_from(&hub, &nginx, listen, "/ssmix2/a/b/hello.txt", "hello");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(
        fs::read_to_string(nginx.data_root().join("a/b/hello.txt")).unwrap(),
        "hello"
    );

    // A given address is taken as is: no retry on another port.
    let clash = Nginx::start_with(&options).unwrap_err();
    assert!(
        matches!(&clash, NginxError::Exited { log, .. } if log.contains("Address already in use")),
        "{clash:?}"
    );

    let dir = nginx.dir().to_owned();
    drop(nginx);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nginx {pid} runs"
    );
    assert!(!dir.exists());
    drop(net);
}
