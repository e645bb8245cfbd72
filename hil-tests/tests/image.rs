//! Issue 7: the built appliance image, booted in QEMU.
//!
//! - `the_booted_image_links_the_clinic_to_the_hub_end_to_end`, the first scenario: the image
//!   boots with its NICs on the test network (WAN bridged to the hub, LAN to the clinic
//!   device) and a provisioning medium (config, networkd files, the box's key, and the
//!   clinic desk's consent record for patient 0001234). `tsunagi` becomes ready, the tunnel
//!   comes up (kernel WireGuard in the guest, wireguard-go at the hub), a storescu in the
//!   clinic namespace sends a study to the box, and it arrives in the hub's Orthanc under the
//!   patient's network ID. From the hub the box answers on no TCP port, to no ping and on
//!   no UDP port (WireGuard, UDP 51820, answers only its peer, and the tunnel is up); from
//!   the clinic, only on the DICOM port the config enables (nmap, every TCP port). The self-check
//!   unit reports no failed unit at the end of the boot and again at a clean ACPI poweroff.
//!   It prints boot-to-ready, boot-to-tunnel-up and whether QEMU ran under TCG or KVM.
//! - `a_tampered_root_does_not_boot`: one flipped byte in root A of a copy of the image;
//!   the kernel finds the corrupted block when the root is mounted, and the box never
//!   starts `tsunagi`.
//!
//! The image is `TSUNAGI_IMAGE` and the `tsunagi` binary inside it `TSUNAGI_IMAGE_BIN`
//! (`cargo xtask test` builds both and sets them); without them a test says so and
//! passes, except in CI, where they must be set.
#![expect(
    clippy::disallowed_methods,
    reason = "the harness polls a guest, the hub and Orthanc from a plain test thread"
)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hil_tests::dicom_files::{DicomFile, Ids, japanese_ct, new_uid};
use hil_tests::orthanc::{self, Orthanc};
use hil_tests::qemu::{Nic, Spec, Vm, partition, provisioning_disk};
use hil_tests::testnet::{Host, Options, TestNet};

const WAN_MAC: &str = "52:54:00:74:73:01";
const LAN_MAC: &str = "52:54:00:74:73:02";
/// The guest's names for its NICs: PCI slots 0x10 and 0x11 of QEMU's q35 root bus.
const WAN_IFACE: &str = "enp0s16";
const LAN_IFACE: &str = "enp0s17";
const PATIENT: &str = "0001234";
const NETWORK_ID: &str = "NET-0001234";

/// The image and the binary inside it, or `None` (after saying why) outside CI.
fn image() -> Option<(PathBuf, PathBuf)> {
    match (
        std::env::var_os("TSUNAGI_IMAGE"),
        std::env::var_os("TSUNAGI_IMAGE_BIN"),
    ) {
        (Some(image), Some(bin)) => Some((image.into(), bin.into())),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must pass TSUNAGI_IMAGE and TSUNAGI_IMAGE_BIN (cargo xtask test does)"
            );
            eprintln!(
                "skipped: TSUNAGI_IMAGE or TSUNAGI_IMAGE_BIN is not set (cargo xtask test builds the image and sets them)"
            );
            None
        }
    }
}

/// The image's build time (recorded by `cargo xtask image` when it built it) and size.
fn image_figures(image: &Path) -> String {
    let meta = fs::metadata(image).unwrap();
    let mib = |bytes: u64| bytes / (1024 * 1024);
    let build = image
        .parent()
        .and_then(|d| fs::read_to_string(d.join("build-seconds")).ok())
        .map_or_else(|| "not recorded".to_owned(), |s| format!("{} s", s.trim()));
    format!(
        "image: build time {build}; size {} MiB allocated of {} MiB",
        mib(meta.blocks() * 512),
        mib(meta.len())
    )
}

/// Where a test keeps the guest's serial log: beside the other test output.
fn log_path(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("qemu")
        .join(format!("{test}.serial.log"))
}

/// The box's configuration, for the guest (`state`: its paths) or for the desk tools run
/// on the host before the boot (the same file with other paths).
fn config(net: &TestNet, state: &str, runtime: &str) -> String {
    format!(
        r#"version = 1
[site]
facility-code = "1312345678"
ae-title = "TSUNAGI"
name = "QEMU clinic"
[site.network-ids]
issuer = "TSUNAGI-NET"
oid = "2.999.392.1"
[paths]
state-dir = "{state}"
runtime-dir = "{runtime}"
[metrics]
listen = "127.0.0.1:9464"
[heartbeat]
interval = "10s"
[tunnel]
interface = "tsunagi0"
backend = "kernel"
hub-endpoint = "{endpoint}"
hub-public-key = "{hub}"
address = "10.99.0.2/24"
hub-subnets = ["10.98.0.0/24"]
health-url = "{health}"
probe-interval = "2s"
[tunnel.firewall]
lan-interfaces = ["{LAN_IFACE}"]
lan-tcp-ports = [11112]
[consent]
enabled = true
fhir-url = "http://10.98.0.1:8081/fhir"
pull-interval = "5s"
[dicom]
listen = "192.168.50.1:11112"
[dicom.pacs]
ae-title = "ORTHANC"
address = "10.98.0.1:4242"
"#,
        endpoint = net.plan().hub_endpoint(),
        hub = net.hub_public_key(),
        health = net.plan().health_url(),
    )
}

fn run_ok(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The provisioning medium's tree: the guest's config and networkd files, plus the state
/// the desk tools made on the host (the box's key; the consent record). Returns the box's
/// public key.
fn provisioning_tree(net: &TestNet, bin: &Path, dir: &Path) -> String {
    let desk = dir.join("desk");
    let state = desk.join("state");
    fs::create_dir_all(&state).unwrap();
    fs::create_dir_all(desk.join("run")).unwrap();
    let desk_config = desk.join("tsunagi.toml");
    fs::write(
        &desk_config,
        config(
            net,
            state.to_str().unwrap(),
            desk.join("run").to_str().unwrap(),
        ),
    )
    .unwrap();
    let public = run_ok(
        Command::new(bin)
            .args(["vpn", "pubkey", "--config"])
            .arg(&desk_config),
    );
    let form = desk.join("form.pdf");
    fs::write(&form, b"%PDF-1.4 consent form").unwrap();
    run_ok(
        Command::new(bin)
            .args(["consent", "register", PATIENT, "--family", "山田"])
            .args(["--given", "太郎", "--family-kana", "ヤマダ"])
            .args(["--given-kana", "タロウ", "--birth-date", "1950-04-01"])
            .args(["--sex", "male", "--recorded-by", "desk-1", "--evidence"])
            .arg(&form)
            .args(["--scope", "all", "--categories", "all"])
            .arg("--config")
            .arg(&desk_config),
    );
    run_ok(
        Command::new(bin)
            .args(["consent", "network-id", PATIENT, NETWORK_ID, "--config"])
            .arg(&desk_config),
    );

    let tree = dir.join("medium");
    let etc = tree.join("etc");
    fs::create_dir_all(etc.join("tsunagi")).unwrap();
    fs::create_dir_all(etc.join("systemd/network")).unwrap();
    fs::write(
        etc.join("tsunagi/tsunagi.toml"),
        config(net, "/var/lib/tsunagi", "/run/tsunagi"),
    )
    .unwrap();
    for (name, mac, addr) in [
        ("10-wan.network", WAN_MAC, net.plan().wan_box_addr),
        ("20-lan.network", LAN_MAC, net.plan().lan_box_addr),
    ] {
        fs::write(
            etc.join("systemd/network").join(name),
            format!("[Match]\nMACAddress={mac}\n\n[Network]\nAddress={addr}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"),
        )
        .unwrap();
    }
    let status = Command::new("cp")
        .arg("-a")
        .arg(&state)
        .arg(tree.join("state"))
        .status()
        .unwrap();
    assert!(status.success());
    public
}

/// Every TCP port.
const ALL_TCP: &[&str] = &["-sS", "-p-"];
/// UDP ports a box could plausibly answer on: DNS, DHCP, TFTP, NTP and chrony's command
/// port, NetBIOS, SNMP, IKE, syslog, SSDP, mDNS, DICOM, WireGuard.
const SOME_UDP: &[&str] = &[
    "-sU",
    "-p",
    "53,67,68,69,123,137,161,323,500,514,1900,4500,5353,11112,51820",
];

/// The ports nmap finds `open` and `closed` on `addr` from `host` (`scan`: the nmap scan
/// type and ports). A dropped probe is `filtered` (TCP) or `open|filtered` (UDP): no answer.
fn scan(
    net: &TestNet,
    host: Host,
    addr: &str,
    scan: &[&str],
) -> (BTreeSet<u16>, BTreeSet<u16>, String) {
    let mut nmap = Command::new("nmap");
    nmap.args(["-Pn", "-n", "--max-retries", "1"])
        .args(scan)
        .args(["--min-rate", "4000", "-T4", "-oG", "-", addr]);
    let out = net
        .exec_timeout(host, &nmap, Duration::from_secs(300))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "nmap from {host}: {text}");
    let (mut open, mut closed) = (BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        let Some((_, ports)) = line.split_once("Ports: ") else {
            continue;
        };
        let ports = ports.split('\t').next().unwrap_or_default();
        for port in ports.split(", ") {
            let mut fields = port.split('/');
            let (Some(number), Some(state)) = (fields.next(), fields.next()) else {
                continue;
            };
            let number: u16 = number.trim().parse().unwrap();
            match state {
                "open" => open.insert(number),
                "closed" => closed.insert(number),
                _ => false,
            };
        }
    }
    assert!(
        text.contains("1 IP address (1 host up) scanned"),
        "nmap from {host} did not scan: {text}"
    );
    (open, closed, text)
}

fn wait_until<T>(what: &str, timeout: Duration, vm: &Vm, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            vm.serial_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The check unit's lines of `phase` once it printed them all; the test fails if it
/// reports a failed unit.
fn check_report(vm: &mut Vm, phase: &str) -> Vec<String> {
    vm.wait_for(
        &format!("tsunagi-check: {phase}: end"),
        Duration::from_secs(300),
    )
    .unwrap();
    let prefix = format!("tsunagi-check: {phase}: ");
    let lines: Vec<String> = vm
        .serial()
        .lines()
        .filter_map(|l| l.find(&prefix).map(|i| l[i + prefix.len()..].to_owned()))
        .collect();
    assert!(
        lines.iter().any(|l| l == "failed units: none"),
        "failed units ({phase}):\n{}",
        lines.join("\n")
    );
    lines
}

#[test]
fn the_booted_image_links_the_clinic_to_the_hub_end_to_end() {
    let Some((image, bin)) = image() else { return };
    let Some(net) = TestNet::up_for_test(Options::default()) else {
        return;
    };
    let links = net.box_to_vm().unwrap();
    let work = tempfile::tempdir().unwrap();
    let public = provisioning_tree(&net, &bin, work.path());
    net.hub_add_peer(&public, &["10.99.0.2/32"]).unwrap();
    let medium = work.path().join("medium.img");
    provisioning_disk(&work.path().join("medium"), &medium).unwrap();

    // The network: its FHIR server and its PACS, in the hub.
    let mut serve = Command::new(hil_tests::testnet::testnet_binary().unwrap());
    serve.args(["fhir-serve", "10.98.0.1:8081"]);
    if let Ok(schema) = hil_tests::fhir::schema_path() {
        serve.arg("--schema").arg(schema);
    }
    net.spawn(Host::Hub, &serve).unwrap();
    let pacs = Orthanc::start_for_test_with(&orthanc::Options {
        netns: Some(net.ns(Host::Hub).to_owned()),
        ..orthanc::Options::default()
    });

    let spec_disk = image.clone();
    let mut vm = Vm::start(&Spec {
        disk: image,
        provisioning: Some(medium),
        netns: Some(net.ns(Host::Box).to_owned()),
        nics: vec![
            Nic {
                tap: links.wan_tap.clone(),
                mac: WAN_MAC.into(),
            },
            Nic {
                tap: links.lan_tap.clone(),
                mac: LAN_MAC.into(),
            },
        ],
        keep_log: Some(log_path("end_to_end")),
        ..Spec::default()
    })
    .unwrap();
    let accel = if vm.tcg { "TCG" } else { "KVM" };
    println!("{}", image_figures(&spec_disk));

    // Both clocks at once: systemd's console status line once the unit (Type=notify) sent
    // READY=1, and the hub's first handshake with the box's key.
    let (mut ready, mut tunnel) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(900);
    while ready.is_none() || tunnel.is_none() {
        if ready.is_none() && vm.serial().contains("Started tsunagi.service") {
            ready = Some(vm.elapsed());
        }
        if tunnel.is_none() && net.hub_latest_handshake(&public).ok().flatten().is_some() {
            tunnel = Some(vm.elapsed());
        }
        assert!(
            Instant::now() < deadline && vm.running(),
            "ready {ready:?}, tunnel {tunnel:?}\n{}",
            vm.serial_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let secs = |d: Option<Duration>| d.unwrap_or_default().as_secs_f64();
    println!("boot-to-ready: {:.1} s ({accel})", secs(ready));
    println!("boot-to-tunnel-up: {:.1} s ({accel})", secs(tunnel));
    let serial = vm.serial();
    assert!(
        serial.contains("Local Verity Protected Volumes"),
        "the root is not verity-protected:\n{}",
        vm.serial_tail()
    );
    assert!(
        serial.contains("tsunagi-provision: done"),
        "{}",
        vm.serial_tail()
    );

    let boot = check_report(&mut vm, "boot");
    // The supervisor's status table: no service failed.
    let failed: Vec<&String> = boot
        .iter()
        .filter(|l| {
            l.strip_prefix("status: ")
                .is_some_and(|row| row.split_whitespace().nth(1) == Some("failed"))
        })
        .collect();
    assert!(failed.is_empty(), "failed services:\n{}", boot.join("\n"));
    for (iface, addr) in [(WAN_IFACE, "10.250.0.2/24"), (LAN_IFACE, "192.168.50.1/24")] {
        assert!(
            boot.iter()
                .any(|l| l.starts_with(&format!("link: {iface} ")) && l.contains(addr)),
            "{iface} has no {addr}:\n{}",
            boot.join("\n")
        );
    }

    // A study from the clinic's modality reaches the network's PACS through the tunnel.
    let files = tempfile::tempdir().unwrap();
    let first = Ids::new(PATIENT);
    let study: Vec<PathBuf> = (0..3)
        .map(|_| {
            let ids = Ids {
                sop_instance_uid: new_uid(),
                ..first.clone()
            };
            japanese_ct(files.path(), &ids).unwrap()
        })
        .collect();
    let mut storescu = Command::new("storescu");
    storescu
        .args([
            "-v",
            "-aec",
            "TSUNAGI",
            "-aet",
            "MODALITY",
            "192.168.50.1",
            "11112",
        ])
        .args(&study);
    let out = net
        .exec_timeout(Host::Clinic, &storescu, Duration::from_secs(120))
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("Received Store Response (Success)").count(),
        3,
        "{text}\n{}",
        vm.serial_tail()
    );
    let ids = wait_until(
        "the study at the hub's PACS",
        Duration::from_secs(300),
        &vm,
        || pacs.instances().ok().filter(|ids| ids.len() >= 3),
    );
    assert_eq!(ids.len(), 3);
    for id in &ids {
        let arrived = DicomFile::parse(pacs.instance_file(id).unwrap()).unwrap();
        assert_eq!(arrived.string(0x0010, 0x0020).as_deref(), Some(NETWORK_ID));
        assert_eq!(
            arrived.string(0x0020, 0x000D).as_deref(),
            Some(first.study_instance_uid.as_str())
        );
    }
    println!("study of 3 instances: clinic → box → tunnel → hub PACS, under the network ID");

    // Acceptance 3: what the box answers on.
    let (open, closed, text) = scan(&net, Host::Hub, "10.250.0.2", ALL_TCP);
    assert!(open.is_empty() && closed.is_empty(), "from the hub: {text}");
    let (open, closed, text) = scan(&net, Host::Hub, "10.250.0.2", SOME_UDP);
    assert!(open.is_empty() && closed.is_empty(), "from the hub: {text}");
    let ping = net
        .exec(
            Host::Hub,
            Command::new("ping").args(["-c", "2", "-W", "2", "10.250.0.2"]),
        )
        .unwrap();
    assert!(!ping.status.success(), "the box answers ping from the hub");
    let (open, closed, text) = scan(&net, Host::Clinic, "192.168.50.1", ALL_TCP);
    assert_eq!(open, BTreeSet::from([11112]), "from the clinic: {text}");
    assert!(closed.is_empty(), "from the clinic: {text}");
    let (open, closed, text) = scan(&net, Host::Clinic, "192.168.50.1", SOME_UDP);
    assert!(
        open.is_empty() && closed.is_empty(),
        "from the clinic: {text}"
    );
    println!(
        "ports: from the hub no TCP port, no ping, and no UDP answer to a stranger (WireGuard on UDP 51820 answers only its peer's handshakes); from the clinic only TCP 11112 and no UDP"
    );

    assert!(
        vm.power_down(Duration::from_secs(300)).unwrap(),
        "no clean power-down:\n{}",
        vm.serial_tail()
    );
    let stop = check_report(&mut vm, "stop");
    assert!(
        stop.iter().any(|l| l == "machine-id: persistent"),
        "the machine-id was not committed to the data partition:\n{}",
        stop.join("\n")
    );
    let serial = vm.serial();
    assert!(
        serial.contains("reboot: Power down"),
        "{}",
        vm.serial_tail()
    );
    assert!(!serial.contains("Kernel panic"), "{}", vm.serial_tail());
    drop(pacs);
    drop(vm);
    net.teardown().unwrap();
}

#[test]
fn a_tampered_root_does_not_boot() {
    let Some((image, _)) = image() else { return };
    let (root_a, _) = partition(&image, "root-a").unwrap();
    let mut vm = Vm::start(&Spec {
        disk: image,
        flip: vec![(root_a + 1000, 0x01)],
        keep_log: Some(log_path("tampered_root")),
        ..Spec::default()
    })
    .unwrap();
    vm.wait_for("Kernel panic", Duration::from_secs(600))
        .unwrap();
    let serial = vm.serial();
    assert!(
        serial.contains("verity") && serial.contains("corrupted"),
        "the panic is not dm-verity's:\n{}",
        vm.serial_tail()
    );
    assert!(
        !serial.contains("Started tsunagi.service"),
        "tsunagi started on a tampered root"
    );
    println!(
        "tampered root: one flipped byte in root-a; dm-verity reported the block corrupted and the kernel stopped the boot"
    );
}
