//! The Samba guard (`hil_tests::samba`) driven with `smbclient`: on loopback, a nested
//! SS-MIX2-like file read back byte for byte over SMB 3, a wrong password, an anonymous
//! login, an SMB 2.1 client and a write refused; and once inside the test network's clinic
//! namespace on 192.168.50.10:445, read from the box's namespace.
//!
//! Needs root (smbd serves the share as `nobody`; the test network) and the Debian packages
//! `samba` and `smbclient` (`cargo xtask test` installs them). Without root the tests print
//! why and return, unless `CI` is set: then they fail (CI runs as root). A missing package
//! always fails. The namespace test also needs `/dev/net/tun` (the test network), with the
//! same rule.

#![forbid(unsafe_code)]

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use hil_tests::samba::{self, Samba};
use hil_tests::testnet::{Host, Options, TestNet};

/// The nested file, as an SS-MIX2 standard storage lays it out (patient 0000123, one
/// order's HL7 message).
const NESTED: &str = "000/123/0000123/20261120/OML-11/x.txt";

/// Whether this process may run smbd (root); else the reason (and a panic under CI).
fn can_run() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the Samba tests need root (smbd serves the share as `nobody`), and CI is set"
    );
    eprintln!("skipped: the Samba tests need root (smbd serves the share as `nobody`)");
    false
}

/// A loopback server (the default options), started and timed.
fn loopback() -> Samba {
    let started = Instant::now();
    let samba = Samba::start_for_test(&samba::Options::default());
    eprintln!(
        "smbd ready on {} in {} ms",
        samba.address(),
        started.elapsed().as_millis()
    );
    samba
}

/// Content no text conversion survives unchanged: every byte value, CR LF, and an HL7
/// segment in Shift_JIS (山田 太郎).
fn content() -> Vec<u8> {
    let mut bytes = b"MSH|^~\\&|EMR|CLINIC\rPID|||0000123||\x8eR\x93c^\x91\xbe\x98Y\r\n".to_vec();
    bytes.extend(0..=255u8);
    bytes.extend((0..64 * 1024).map(|i| u8::try_from(i % 251).unwrap()));
    bytes
}

/// Writes `content` at `share_dir/relative`, with the folders, as a clinic's EMR would
/// (0755 folders, 0644 files).
fn write_nested(share_dir: &Path, relative: &str, content: &[u8]) {
    use std::os::unix::fs::PermissionsExt as _;
    let path = share_dir.join(relative);
    let mut dir = path.parent().unwrap();
    fs::create_dir_all(dir).unwrap();
    while dir != share_dir {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        dir = dir.parent().unwrap();
    }
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
}

/// A client configuration of its own in `dir` (no `/etc/samba/smb.conf`, caches in `dir`).
fn client_conf(dir: &Path) -> std::path::PathBuf {
    let conf = dir.join("client.conf");
    let d = dir.display();
    fs::write(
        &conf,
        format!(
            "[global]\nlock directory = {d}\nstate directory = {d}\ncache directory = {d}\n\
             private dir = {d}\nncalrpc dir = {d}\n"
        ),
    )
    .unwrap();
    conf
}

/// `smbclient //HOST/ssmix2 -p PORT -U USER%PASSWORD -m MAX -c COMMANDS` with the client
/// configuration in `work`, here or (as `ip netns exec NS ...`) in a namespace.
fn smbclient(
    work: &Path,
    netns: Option<&str>,
    addr: SocketAddrV4,
    user: &str,
    max_protocol: &str,
    commands: &str,
) -> Output {
    let mut command = match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, "smbclient"]);
            command
        }
        None => Command::new("smbclient"),
    };
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .arg(format!("//{}/ssmix2", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-s")
        .arg(client_conf(work))
        .arg("-U")
        .arg(user)
        .args(["-m", max_protocol, "-t", "20", "-c", commands])
        .stdin(Stdio::null());
    let started = Instant::now();
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run smbclient (Debian package `smbclient`): {e}"));
    eprintln!(
        "smbclient -c '{commands}': {} in {} ms",
        output.status,
        started.elapsed().as_millis()
    );
    output
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

fn credentials(samba: &Samba) -> String {
    format!("{}%{}", samba.username(), samba.password())
}

/// The listening TCP sockets of `pid` as `ss` prints their local addresses.
fn listening_addresses(netns: Option<&str>, pid: u32) -> Vec<String> {
    let mut command = match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, "ss"]);
            command
        }
        None => Command::new("ss"),
    };
    let output = command.args(["-Hltnp"]).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let needle = format!("pid={pid},");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&needle))
        .map(|line| line.split_whitespace().nth(3).unwrap().to_owned())
        .collect()
}

/// After the guard is dropped: smbd is gone and so is its directory.
fn assert_cleaned_up(pid: u32, dir: &Path) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "smbd {pid} still runs"
    );
    assert!(!dir.exists(), "{} is left", dir.display());
}

#[test]
fn loopback_share_serves_a_nested_file_byte_for_byte() {
    if !can_run() {
        return;
    }
    let samba = loopback();
    let addr = samba.address();
    assert_eq!(*addr.ip(), Ipv4Addr::LOCALHOST);
    assert_ne!(addr.port(), 445);
    assert_eq!(samba.share_name(), "ssmix2");
    assert_eq!(samba.username(), "nobody");
    assert_eq!(samba.password().len(), 32);
    assert!(samba.password().chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(samba.share_dir(), samba.dir().join("share"));
    assert_eq!(samba.netns(), None);

    // smbd listens on that one loopback address and port, nowhere else.
    let pid = samba.pid().unwrap();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "smbd");
    assert_eq!(listening_addresses(None, pid), [addr.to_string()]);

    let content = content();
    write_nested(samba.share_dir(), NESTED, &content);
    let work = tempfile::tempdir().unwrap();
    // SMB 3.1.1 (what `vers=3` negotiates with this server) and SMB 3.0 (a Windows Server
    // 2012 client's dialect, `vers=3.0`) are both served.
    for dialect in ["SMB3", "SMB3_00"] {
        let out = work.path().join(format!("x-{dialect}.txt"));
        let output = smbclient(
            work.path(),
            None,
            addr,
            &credentials(&samba),
            dialect,
            &format!("get {NESTED} {}", out.display()),
        );
        assert!(output.status.success(), "{dialect}: {}", text(&output));
        assert!(
            fs::read(&out).unwrap() == content,
            "the {dialect} copy differs"
        );
    }

    // A listing of the nested folder.
    let output = smbclient(
        work.path(),
        None,
        addr,
        &credentials(&samba),
        "SMB3",
        "ls 000/123/0000123/20261120/OML-11/*",
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("x.txt"), "{}", text(&output));

    let dir = samba.dir().to_owned();
    drop(samba);
    assert_cleaned_up(pid, &dir);
}

#[test]
fn loopback_share_refuses_a_wrong_password_anonymous_and_smb2() {
    if !can_run() {
        return;
    }
    let samba = loopback();
    write_nested(samba.share_dir(), NESTED, b"hello");
    let work = tempfile::tempdir().unwrap();
    let addr = samba.address();

    let wrong = format!("{}%{}", samba.username(), "0".repeat(32));
    let output = smbclient(work.path(), None, addr, &wrong, "SMB3", "ls");
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("NT_STATUS_LOGON_FAILURE"),
        "{}",
        text(&output)
    );

    // No guest, no anonymous session.
    let output = smbclient(work.path(), None, addr, "%", "SMB3", "ls");
    assert!(!output.status.success(), "{}", text(&output));
    let output = smbclient(work.path(), None, addr, "guest%", "SMB3", "ls");
    assert!(!output.status.success(), "{}", text(&output));

    // A client that speaks at most SMB 2.1 gets no dialect (`server min protocol = SMB3`).
    let output = smbclient(work.path(), None, addr, &credentials(&samba), "SMB2", "ls");
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("protocol negotiation failed"),
        "{}",
        text(&output)
    );
}

#[test]
fn loopback_share_is_read_only() {
    if !can_run() {
        return;
    }
    let samba = loopback();
    write_nested(samba.share_dir(), NESTED, b"hello");
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("new.txt");
    fs::write(&local, "written by a client").unwrap();
    let addr = samba.address();
    let credentials = credentials(&samba);

    // smbclient 4.17 exits non-zero when a `put` fails, but 0 after a refused `mkdir`
    // or `del`: the message tells.
    for (commands, exits_non_zero) in [
        (format!("put {} new.txt", local.display()), true),
        (format!("put {} 000/123/new.txt", local.display()), true),
        (format!("put {} {NESTED}", local.display()), true),
        ("mkdir 999".to_owned(), false),
        (format!("del {NESTED}"), false),
    ] {
        let output = smbclient(work.path(), None, addr, &credentials, "SMB3", &commands);
        if exits_non_zero {
            assert!(!output.status.success(), "{commands}: {}", text(&output));
        }
        assert!(
            text(&output).contains("NT_STATUS_ACCESS_DENIED")
                || text(&output).contains("NT_STATUS_MEDIA_WRITE_PROTECTED"),
            "{commands}: {}",
            text(&output)
        );
    }
    assert!(!samba.share_dir().join("new.txt").exists());
    assert!(!samba.share_dir().join("000/123/new.txt").exists());
    assert!(!samba.share_dir().join("999").exists());
    assert_eq!(fs::read(samba.share_dir().join(NESTED)).unwrap(), b"hello");
}

#[test]
fn share_in_the_clinic_namespace_is_read_from_the_box() {
    let Some(net) = TestNet::up_for_test(Options::default()) else {
        return;
    };
    let clinic = net.ns(Host::Clinic).to_owned();
    let clinic_ip = net.plan().lan_clinic_addr.addr;
    let started = Instant::now();
    let samba = Samba::start_for_test(&samba::Options {
        netns: Some(clinic.clone()),
        listen: Some(clinic_ip),
        port: None,
    });
    eprintln!(
        "smbd ready on {} in {clinic} in {} ms",
        samba.address(),
        started.elapsed().as_millis()
    );
    let addr = SocketAddrV4::new(clinic_ip, 445);
    assert_eq!(samba.address(), addr);
    assert_eq!(samba.netns(), Some(clinic.as_str()));

    // smbd runs in the clinic namespace, on the clinic's LAN address only.
    let pid = samba.pid().unwrap();
    assert_eq!(listening_addresses(Some(&clinic), pid), [addr.to_string()]);
    assert!(listening_addresses(None, pid).is_empty());

    let content = content();
    write_nested(samba.share_dir(), NESTED, &content);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("x.txt");
    let output = smbclient(
        work.path(),
        Some(net.ns(Host::Box)),
        addr,
        &credentials(&samba),
        "SMB3",
        &format!("get {NESTED} {}", out.display()),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(fs::read(&out).unwrap() == content, "the copy differs");

    // A port given in a namespace is taken as is: a second server on it fails.
    let clash = Samba::start(&samba::Options {
        netns: Some(clinic.clone()),
        listen: Some(clinic_ip),
        port: None,
    })
    .unwrap_err();
    let clash = hil_tests::testnet::error_chain(&clash);
    assert!(clash.contains("Address already in use"), "{clash}");

    let dir = samba.dir().to_owned();
    drop(samba);
    assert_cleaned_up(pid, &dir);
    drop(net);
}
