//! Issue 18 on the booted image: the hub's update channel, published as the operator does
//! (`tsunagi_provision::release`, with the channel keys the image stage made), the audit
//! repository the box's refusals reach (a real rsyslog, ATNA), and the scenarios. On a box
//! of their own, one after the other: the update to the next version through power cuts
//! during its download and install (tests 3 and 1), then the refusals, each leaving the
//! running slot untouched with an audit record saying why (test 4). On the power cuts'
//! box, after its cuts: the rollback from a version whose supervisor is never ready
//! (test 2).
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dicom_ul::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
use hil_tests::nginx::{Nginx, Pki};
use hil_tests::qemu::Vm;
use hil_tests::rsyslog::{Options as RsyslogOptions, Rsyslog, Tls as RsyslogTls};
use hil_tests::testnet::{Host, TestNet};
use nix::sched::{CloneFlags, setns};
use tsunagi_provision::release::{Bundle, ChannelKeys, Expiries, publish, root};
use update::release::{Custom, SEEDS, Wave};

use super::{check_report, hub_tls, run_ok};

/// The hub's address inside the tunnel.
const HUB: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
/// The port of the hub's update channel: a static nginx of its own beside the WebDAV
/// replica's (whose tree the SS-MIX2 sync owns, on 8443) and the FHIR front's (8444).
const CHANNEL_PORT: u16 = 8445;
/// The audit repository's port (RFC 5425).
const AUDIT_PORT: u16 = 6514;
/// The Verification SOP Class (C-ECHO).
const VERIFICATION: &str = "1.2.840.10008.1.1";
/// The box's compatible (`[update] compatible`'s default, and the image's RAUC system).
const COMPATIBLE: &str = "tsunagi";

/// `[update]`: the box looks at the hub's channel every minute, any day, and gives the
/// first boot of an update a minute to be healthy.
pub(crate) fn update_section() -> String {
    format!(
        r#"[update]
enabled = true
channel-url = "https://{HUB}:{CHANNEL_PORT}{}updates/"
ca-file = "/var/lib/tsunagi/provisioning/network-ca.pem"
client-identity = true
check-interval = "1m"
health-limit = "1m"
[update.window]
all-day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
"#,
        hil_tests::nginx::LOCATION
    )
}

/// `[audit]`: the ATNA trail to the hub's audit repository, with the box's own identity.
pub(crate) fn audit_section() -> String {
    format!(
        r#"[audit]
enabled = true
repository = "{HUB}:{AUDIT_PORT}"
ca-file = "/var/lib/tsunagi/provisioning/network-ca.pem"
client-identity = true
"#
    )
}

/// The hub's audit repository (IHE ATNA): rsyslog over TLS at 10.98.0.1, with the network's
/// server certificate, taking the boxes' certificates from the box-identity CA `box_ca`.
pub(crate) fn audit_repository(net: &TestNet, pki: &Pki, box_ca: &Path) -> Rsyslog {
    Rsyslog::start(
        &RsyslogTls {
            cert: pki.server_cert(),
            key: pki.server_key(),
            client_ca: box_ca.to_owned(),
        },
        &RsyslogOptions {
            netns: Some(net.ns(Host::Hub).to_owned()),
            listen: Some(SocketAddrV4::new(HUB, AUDIT_PORT)),
        },
    )
    .unwrap_or_else(|e| panic!("the hub's audit repository did not start: {e}"))
}

/// What the image stage built for the update tests (`cargo xtask test` passes them): the
/// image's own bundle (version 1), the next release, one whose supervisor is never ready,
/// and the keys the image was built with.
pub(crate) struct Releases {
    first: PathBuf,
    next: (PathBuf, String),
    faulty: (PathBuf, String),
    pub(crate) keys: PathBuf,
}

/// The releases from `TSUNAGI_RELEASE_NEXT`, `TSUNAGI_RELEASE_FAULTY` (each with its
/// `_VERSION`) and `TSUNAGI_IMAGE_KEYS`; the image's own bundle beside `image`. `None`
/// (after saying why) outside CI.
pub(crate) fn releases(image: &Path) -> Option<Releases> {
    let release = |name: &str| {
        Some((
            PathBuf::from(std::env::var_os(name)?),
            std::env::var(format!("{name}_VERSION")).ok()?,
        ))
    };
    let found = (|| {
        Some(Releases {
            first: image.with_file_name("tsunagi.raucb"),
            next: release("TSUNAGI_RELEASE_NEXT")?,
            faulty: release("TSUNAGI_RELEASE_FAULTY")?,
            keys: PathBuf::from(std::env::var_os("TSUNAGI_IMAGE_KEYS")?),
        })
    })();
    match found {
        Some(r) if r.keys.join("channel").is_dir() => Some(r),
        Some(r) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} has no channel keys (real keys of KEYS=DIR have no private half there)",
                r.keys.display()
            );
            eprintln!("the update is skipped: no channel keys to publish with");
            None
        }
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must pass TSUNAGI_RELEASE_NEXT, TSUNAGI_RELEASE_FAULTY (with _VERSION) and TSUNAGI_IMAGE_KEYS (cargo xtask test does)"
            );
            eprintln!("the update is skipped: TSUNAGI_RELEASE_NEXT and the rest are not set");
            None
        }
    }
}

fn block<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Expiries as the operator's tooling sets them (`cargo xtask release`), or with a
/// timestamp that expired an hour ago (a freeze attack, or the operator's signing lapsed).
fn expiries(timestamp_expired: bool) -> Expiries {
    let now = jiff::Timestamp::now();
    let days = |n: i64| now + jiff::SignedDuration::from_hours(24 * n);
    Expiries {
        targets: days(90),
        snapshot: days(30),
        timestamp: if timestamp_expired {
            now - jiff::SignedDuration::from_hours(1)
        } else {
            days(7)
        },
    }
}

/// The operator's update channel at the hub: a TUF repository published into a staging
/// directory, then onto the hub's static server (nginx, mutual TLS) as an operator uploads
/// to a static host, the timestamp last.
pub(crate) struct Channel {
    server: Nginx,
    work: PathBuf,
    keys: PathBuf,
}

impl Channel {
    pub(crate) fn start(
        net: &TestNet,
        pki: &Pki,
        box_ca: &Path,
        work: &Path,
        keys: &Path,
    ) -> Channel {
        fs::create_dir_all(work.join("bundles")).unwrap();
        Channel {
            server: Nginx::start_for_test_with(&hub_tls(net, pki, box_ca, CHANNEL_PORT)),
            work: work.to_owned(),
            keys: keys.to_owned(),
        }
    }

    fn served(&self) -> PathBuf {
        self.server.data_root().join("updates")
    }

    /// `path` as the target `tsunagi-VERSION.raucb`, for every box from now, with the
    /// compatible the channel's metadata claims.
    fn bundle(&self, path: &Path, version: &str) -> Bundle {
        let named = self
            .work
            .join("bundles")
            .join(format!("tsunagi-{version}.raucb"));
        if !named.exists() {
            link_or_copy(path, &named);
        }
        Bundle {
            path: named,
            custom: Custom {
                version: version.parse().unwrap(),
                compatible: COMPATIBLE.to_owned(),
                waves: vec![Wave {
                    seeds_below: SEEDS,
                    starts: jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1),
                }],
            },
        }
    }

    /// Publishes `bundles` (all the channel lists from now on) with the operator's keys,
    /// and serves them; the bytes of the target `tampered` (a file name) are served with
    /// one byte changed.
    fn publish(&self, bundles: &[&Bundle], timestamp_expired: bool, tampered: Option<&str>) {
        let staging = self.work.join("repository");
        let owned: Vec<Bundle> = bundles.iter().map(|b| (*b).clone()).collect();
        block(publish(
            &staging,
            &self.keys.join("update-root.json"),
            &ChannelKeys::open(&self.keys.join("channel")),
            &owned,
            &expiries(timestamp_expired),
        ))
        .unwrap();
        serve(&staging, &self.served(), tampered);
    }

    /// Publishes `bundles` signed by keys of another root (another network's, or an
    /// attacker's) at the same place.
    fn publish_stranger(&self, bundles: &[&Bundle]) {
        let keys = self.work.join("stranger-keys");
        let stranger = ChannelKeys::generate(&keys).unwrap();
        let root_json = self.work.join("stranger-root.json");
        let bytes = block(root(
            &stranger,
            NonZeroU64::MIN,
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 365),
        ))
        .unwrap();
        fs::write(&root_json, bytes).unwrap();
        let staging = self.work.join("stranger-repository");
        let owned: Vec<Bundle> = bundles.iter().map(|b| (*b).clone()).collect();
        block(publish(
            &staging,
            &root_json,
            &stranger,
            &owned,
            &expiries(false),
        ))
        .unwrap();
        serve(&staging, &self.served(), None);
    }
}

/// `to` as a hard link to `from` (a bundle is 148 MiB), or a copy across file systems.
fn link_or_copy(from: &Path, to: &Path) {
    fs::hard_link(from, to)
        .or_else(|_| fs::copy(from, to).map(|_| ()))
        .unwrap();
}

/// Copies the repository `from` onto the served one at `to`: the targets as hard links
/// (or, for `tampered`, a copy with one byte changed), the metadata, then the timestamp
/// (the entry point) by a rename. A box reading meanwhile finds the old publication or the
/// new one, never half of one.
fn serve(from: &Path, to: &Path, tampered: Option<&str>) {
    let targets = to.join("targets");
    let metadata = to.join("metadata");
    fs::create_dir_all(&targets).unwrap();
    fs::create_dir_all(&metadata).unwrap();
    for entry in fs::read_dir(from.join("targets")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let dest = targets.join(&name);
        let _ = fs::remove_file(&dest);
        if tampered.is_some_and(|t| name.ends_with(&format!(".{t}"))) {
            let mut bytes = fs::read(&path).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 0xff;
            fs::write(&dest, bytes).unwrap();
        } else {
            link_or_copy(&path, &dest);
        }
    }
    for entry in fs::read_dir(from.join("metadata")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "timestamp.json" {
            fs::copy(&path, metadata.join(name)).unwrap();
        }
    }
    let next = metadata.join(".timestamp.json.new");
    fs::copy(from.join("metadata/timestamp.json"), &next).unwrap();
    fs::rename(&next, metadata.join("timestamp.json")).unwrap();
    // nginx's workers read what the test (root) wrote.
    run_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(to));
}

/// Waits until QEMU has ended by itself: the guest rebooted (QEMU runs with `-no-reboot`).
fn wait_for_reboot(vm: &mut Vm, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while vm.running() {
        assert!(
            Instant::now() < deadline,
            "the box did not reboot ({why}):\n{}",
            vm.serial_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A DICOM association from the clinic's modality held open, as in the middle of its
/// work: a C-ECHO every 10 s (within the box's 30 s timeout), from a thread in the clinic's
/// network namespace, until [`HeldAssociation::release`].
struct HeldAssociation {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<u16, String>>>,
}

impl HeldAssociation {
    fn open(net: &TestNet) -> HeldAssociation {
        let ns = format!("/run/netns/{}", net.ns(Host::Clinic));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || -> Result<u16, String> {
            let netns = fs::File::open(&ns).map_err(|e| format!("{ns}: {e}"))?;
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {ns}: {e}"))?;
            let opened = ClientAssociationOptions::new()
                .calling_ae_title("MODALITY")
                .called_ae_title("TSUNAGI")
                .with_abstract_syntax(VERIFICATION)
                .read_timeout(Duration::from_secs(30))
                .establish(SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 1), 11112));
            let mut assoc = match opened {
                Ok(a) => a,
                Err(e) => {
                    let why = format!("the association: {e}");
                    let _ = tx.send(Err(why.clone()));
                    return Err(why);
                }
            };
            let _ = tx.send(Ok(()));
            let context = assoc.presentation_contexts()[0].id;
            let mut echoes = 0u16;
            let mut next = Instant::now();
            while !stopping.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    echoes = echoes.wrapping_add(1);
                    assoc
                        .send(&Pdu::PData {
                            data: vec![PDataValue {
                                presentation_context_id: context,
                                value_type: PDataValueType::Command,
                                is_last: true,
                                data: dimse::command::Command::echo(echoes).encode(),
                            }],
                        })
                        .map_err(|e| format!("C-ECHO {echoes}: {e}"))?;
                    match assoc
                        .receive()
                        .map_err(|e| format!("C-ECHO {echoes}: {e}"))?
                    {
                        Pdu::PData { .. } => {}
                        other => return Err(format!("C-ECHO {echoes}: answered {other:?}")),
                    }
                    next = Instant::now() + Duration::from_secs(10);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            assoc.release().map_err(|e| format!("the release: {e}"))?;
            Ok(echoes)
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => panic!("no association with the box from the clinic: {why}"),
            Err(e) => panic!("no association with the box from the clinic: {e}"),
        }
        HeldAssociation {
            stop,
            thread: Some(thread),
        }
    }

    /// Releases the association; returns the C-ECHOs it took.
    fn release(mut self) -> u16 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .unwrap()
            .unwrap_or_else(|why| panic!("the held association failed: {why}"))
    }
}

impl Drop for HeldAssociation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Publishes `bundles`, then waits for the box to install the newest and reboot into it,
/// and boots it. Returns the time from the publication to the reboot.
fn install_and_reboot(vm: &mut Vm, channel: &Channel, bundles: &[&Bundle]) -> Duration {
    channel.publish(bundles, false, None);
    let published = Instant::now();
    let version = &bundles.last().unwrap().custom.version;
    // A boot the emulator wedges before the install is cut and booted again (at most twice
    // a machine, [`Vm::wait_for_past_stall`]): the box then goes on with the update itself.
    vm.wait_for_past_stall(
        &format!("tsunagi update: {version} installed in the other slot"),
        Duration::from_secs(900),
    )
    .unwrap_or_else(|e| panic!("{version} was not installed: {e}"));
    vm.wait_for(
        &format!("tsunagi update: rebooting into {version}"),
        Duration::from_secs(900),
    )
    .unwrap_or_else(|e| panic!("no reboot into {version}: {e}"));
    let installed = published.elapsed();
    wait_for_reboot(vm, &format!("into {version}"));
    vm.boot_again().unwrap();
    installed
}

/// The power cuts of test 3, unless `TSUNAGI_UPDATE_CUTS` says otherwise.
pub(crate) const UPDATE_CUTS: u32 = 10;
/// Of those, the first ones are made while the box downloads; the rest while it installs.
const DOWNLOAD_CUTS: u32 = 5;
const MIB: u64 = 1 << 20;

/// Where in the install a cut comes (test 3).
#[derive(Clone, Copy)]
enum InstallCut {
    /// The installer's copy of the bundle and RAUC's check of it: up to 2 s after it began.
    Early,
    /// After RAUC's first progress step at or above this percentage (below 80).
    Step(u8),
    /// RAUC writing the slot: 0.5 to 9 s after it begins to copy the image (its first step
    /// that says so, or at 85 % or more); the copy takes about 19 s under TCG.
    Writing,
}

/// The moment of an install cut, once the serial console (of this boot) allows to say it:
/// when, and words for it.
fn install_cut_at(
    kind: InstallCut,
    serial: &str,
    started: Instant,
    delay: Duration,
) -> Option<(Instant, String)> {
    // RAUC's steps (`NN% what`) as the installer passes them on, each with its percentage.
    let mut steps = serial.lines().filter_map(|l| {
        let step = l.split_once(": rauc: ")?.1.trim();
        let percent: u8 = step.split_once('%')?.0.trim().parse().ok()?;
        Some((percent, step.to_owned()))
    });
    match kind {
        InstallCut::Early => Some((
            started + delay,
            format!(
                "while installing, {:.1} s after it began (the copy, RAUC's check)",
                delay.as_secs_f64()
            ),
        )),
        InstallCut::Step(_) | InstallCut::Writing => {
            let step = match kind {
                InstallCut::Step(at_least) => steps.find(|(p, _)| *p >= at_least)?.1,
                _ => {
                    steps
                        .find(|(p, step)| step.contains("Copying") || (85..100).contains(p))?
                        .1
                }
            };
            Some((
                Instant::now() + delay,
                format!(
                    "while installing, {:.1} s after RAUC's \"{step}\"",
                    delay.as_secs_f64()
                ),
            ))
        }
    }
}

/// Test 3, then test 1. The operator publishes the next version. While the box (on version
/// 1, slot A) downloads it through the tunnel and installs it into slot B, its power is cut
/// `cuts` times at random points: the first [`DOWNLOAD_CUTS`] once a random share of what
/// is left of the bundle has crossed the tunnel in that boot (counted at the hub), the rest
/// at a random moment of the install (the copy and RAUC's check, a random step of RAUC's
/// progress, or RAUC writing the slot). Every boot comes up on slot A, good, and the box
/// goes on from where it was: the download resumes (the channel serves ranges), the install
/// starts again. Then, uncut, it finishes while the clinic's modality holds an association
/// open: the reboot waits for it (the activity gate), and once it is released the box
/// reboots into B, passes the health gate and keeps B.
/// Under TCG, a boot the emulator stalls (`Vm::take_stall_cut`) is cut once more and that
/// cut is planned again.
pub(crate) fn update_through_power_cuts(
    vm: &mut Vm,
    net: &TestNet,
    channel: &Channel,
    releases: &Releases,
    rng: &mut super::Rng,
    cuts: u32,
) {
    let (path, version) = &releases.next;
    let next = channel.bundle(path, version);
    let length = fs::metadata(&next.path).unwrap().len();
    let good = "tsunagi update: slot A (1) is good";
    let installing = format!("tsunagi update: installing {version}");
    let installed = format!("tsunagi update: {version} installed in the other slot");
    channel.publish(&[&next], false, None);
    let published = Instant::now();
    // What crossed the tunnel in the boots cut while downloading: about what the box has.
    let mut downloaded = 0u64;
    let (mut download_cuts, mut install_cuts) = (0u32, 0u32);
    let rotation = rng.next();
    let mut cut = 1;
    while cut <= cuts {
        vm.wait_for_past_stall(good, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("update cut {cut}: the box is not on slot A, good: {e}"));
        let sent_before = net.hub_sent().unwrap();
        let left = length.saturating_sub(downloaded);
        let threshold = (download_cuts < DOWNLOAD_CUTS)
            .then(|| rng.between(12 * MIB, (left * 7 / 10).max(16 * MIB)));
        let kind = match (rotation + u64::from(install_cuts)) % 3 {
            0 => InstallCut::Early,
            1 => InstallCut::Step(u8::try_from(rng.between(0, 80)).unwrap_or(0)),
            _ => InstallCut::Writing,
        };
        let delay = match kind {
            InstallCut::Early => rng.millis(200, 2000),
            InstallCut::Step(_) => rng.millis(0, 500),
            InstallCut::Writing => rng.millis(500, 9000),
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut install_started = None;
        let mut plan: Option<(Instant, String)> = None;
        let mut sent = 0;
        let what = loop {
            let serial = vm.serial();
            assert!(
                !serial.contains(&installed),
                "update cut {cut}: the install finished before the cut ({}):\n{}",
                match kind {
                    InstallCut::Early => "early".to_owned(),
                    InstallCut::Step(p) => format!("after RAUC's {p} %"),
                    InstallCut::Writing => "RAUC writing".to_owned(),
                },
                vm.serial_tail()
            );
            let stuck = Instant::now() >= deadline || vm.wedged();
            // A boot the emulator stalled is cut once more, and this cut is planned again.
            if stuck && vm.running() && vm.take_stall_cut() {
                break None;
            }
            assert!(
                !stuck && vm.running(),
                "update cut {cut}: neither {} MiB across the tunnel nor the install within 600 s:\n{}",
                threshold.unwrap_or_default() / MIB,
                vm.serial_tail()
            );
            match &plan {
                Some((at, what)) if Instant::now() >= *at => break Some(what.clone()),
                Some(_) => {}
                None if serial.contains(&installing) => {
                    let started = *install_started.get_or_insert_with(Instant::now);
                    plan = install_cut_at(kind, &serial, started, delay);
                }
                None => {
                    sent = net.hub_sent().unwrap().saturating_sub(sent_before);
                    if threshold.is_some_and(|t| sent >= t) {
                        break Some(format!(
                            "while downloading, {} MiB across the tunnel in this boot",
                            sent / MIB
                        ));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let Some(what) = what else {
            vm.boot_again().unwrap();
            continue;
        };
        vm.power_cut();
        if install_started.is_some() {
            install_cuts += 1;
        } else {
            download_cuts += 1;
            downloaded += sent;
        }
        println!(
            "update cut {cut}: {what}; {:.1} s after power-on",
            vm.elapsed().as_secs_f64()
        );
        vm.boot_again().unwrap();
        cut += 1;
    }
    // Uncut now: the box finishes, and its reboot waits for the clinic's association.
    vm.wait_for_past_stall(good, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("after the update's cuts: the box is not on slot A, good: {e}"));
    let held = HeldAssociation::open(net);
    let last_boot = Instant::now();
    vm.wait_for(&installed, Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{version} was not installed after the cuts: {e}"));
    vm.wait_for(
        "tsunagi update: the reboot waits for 1 DICOM association(s) from the clinic",
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("the reboot did not wait for the clinic's association: {e}"));
    // It keeps waiting while the association lasts: three of the update unit's 5 s looks
    // at the box's connections (`IDLE_POLL` in `appliance/tsunagi/src/update_cmd.rs`).
    std::thread::sleep(Duration::from_secs(15));
    assert!(
        vm.running() && !vm.serial().contains("tsunagi update: rebooting into"),
        "the box rebooted during the clinic's association:\n{}",
        vm.serial_tail()
    );
    let echoes = held.release();
    vm.wait_for(
        &format!("tsunagi update: rebooting into {version}"),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("no reboot into {version} once the association ended: {e}"));
    println!(
        "activity gate: the reboot into {version} waited for the clinic's association ({echoes} C-ECHOs), then went on"
    );
    let finished = published.elapsed();
    let after_cuts = last_boot.elapsed();
    wait_for_reboot(vm, &format!("into {version}"));
    vm.boot_again().unwrap();
    let good = vm
        .wait_for(
            &format!("tsunagi update: {version} is healthy after"),
            Duration::from_secs(900),
        )
        .unwrap_or_else(|e| panic!("{version} did not pass its health gate: {e}"));
    let boot = check_report(vm, "boot");
    assert!(
        boot.iter().any(|l| l == "slots: A good, B good; booted B"),
        "slots after the update:\n{}",
        boot.join("\n")
    );
    // The download went on from where a cut left it: the channel served a range.
    let name = format!(".tsunagi-{version}.raucb");
    let log = channel.server.access_log();
    let ranges = log
        .lines()
        .filter(|l| l.contains(&name) && l.contains("\" 206 "))
        .count();
    assert!(
        download_cuts == 0 || ranges > 0,
        "no download of {version} resumed after {download_cuts} cuts while downloading:\n{log}"
    );
    // Nothing was fetched twice: once a download has resumed, it never starts again from
    // the first byte (a resume goes on from the last flush, whose mark only grows). A
    // resumed download that failed to verify would be fetched whole again: a 200 after a
    // 206. What the channel sent in all is printed.
    let statuses: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split("\" ").nth(1)?.split_whitespace().next())
        .collect();
    let first_range = statuses.iter().position(|s| *s == "206");
    assert!(
        first_range.is_none_or(|i| !statuses[i..].contains(&"200")),
        "the bundle was fetched again from its first byte after a resumed download:\n{log}"
    );
    let served: u64 = log
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(body_bytes_sent)
        .sum();
    assert_eq!(download_cuts + install_cuts, cuts);
    println!(
        "update 1 -> {version} through {cuts} power cuts ({download_cuts} while downloading, {install_cuts} while installing): every boot on slot A, good; {ranges} downloads resumed (HTTP 206 at the channel), {:.1} MiB served for a {:.1} MiB bundle; done {:.1} s after its publication, {:.1} s after the last cut's boot was on slot A (with the 30 s wait for the association); reboot-to-good {:.1} s (TCG: {})",
        served as f64 / MIB as f64,
        length as f64 / MIB as f64,
        finished.as_secs_f64(),
        after_cuts.as_secs_f64(),
        good.as_secs_f64(),
        vm.tcg
    );
}

/// The body bytes nginx sent for an access log line (the combined format:
/// `... "REQUEST" STATUS BYTES "REFERER" "AGENT"`).
fn body_bytes_sent(line: &str) -> Option<u64> {
    let mut after = line.split("\" ").nth(1)?.split_whitespace();
    let _status = after.next()?;
    after.next()?.parse().ok()
}

/// Test 2, on the power cuts' box (version 1 in slot A, slot B empty and marked bad): the
/// operator publishes a version whose supervisor is never ready beside the one the box
/// runs. The box installs it into slot B and reboots into it; the health gate waits
/// `health-limit` for a ready supervisor, marks B bad and reboots; the boot loader's
/// default is still A, and the box is back on the version it ran by itself. The hub's
/// audit repository has the version that failed ([`after_rollback`]: what the box reports).
pub(crate) fn roll_back_from_faulty(
    vm: &mut Vm,
    channel: &Channel,
    rsyslog: &Rsyslog,
    releases: &Releases,
) {
    let running = "1";
    let (faulty_path, version) = &releases.faulty;
    let first = channel.bundle(&releases.first, running);
    let faulty = channel.bundle(faulty_path, version);
    let installed = install_and_reboot(vm, channel, &[&first, &faulty]);
    let failed = vm
        .wait_for(
            &format!("tsunagi update: {version} failed its health gate"),
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| panic!("the health gate did not fail {version}: {e}"));
    wait_for_reboot(vm, "after the failed health gate");
    vm.boot_again().unwrap();
    let boot = check_report(vm, "boot");
    let back = vm.elapsed();
    assert!(
        boot.iter().any(|l| l == "slots: A good, B bad; booted A"),
        "slots after the failed update:\n{}",
        boot.join("\n")
    );
    let since = Instant::now();
    audited(
        rsyslog,
        &format!("update to {version}: failed its health gate"),
        since,
    );
    println!(
        "update {running} -> {version} (never ready): download and install {:.1} s (uncut, from its publication to the reboot); the trial boot failed its health gate {:.1} s after power-on; back on {running}, checked {:.1} s after power-on, audited at the hub {:.1} s later (TCG: {})",
        installed.as_secs_f64(),
        failed.as_secs_f64(),
        back.as_secs_f64(),
        since.elapsed().as_secs_f64(),
        vm.tcg
    );
}

/// The stop report after the rollback: the box on version 1 in slot A, slot B bad.
pub(crate) fn after_rollback(stop: &[String], releases: &Releases) {
    assert!(
        stop.iter().any(|l| l == "slots: A good, B bad; booted A"),
        "slots after the rollback:\n{}",
        stop.join("\n")
    );
    assert!(
        stop.iter()
            .any(|l| l.starts_with("status: update ") && l.contains("running 1")),
        "the update service after the rollback from {}:\n{}",
        releases.faulty.1,
        stop.join("\n")
    );
}

/// A RAUC bundle of `version` for `compatible`, signed with `cert` and `key`: a small
/// one, for the installer's refusals (it never gets as far as writing a slot).
fn rauc_bundle(dir: &Path, version: &str, compatible: &str, cert: &Path, key: &Path) -> PathBuf {
    let content = dir.join(format!("bundle-{version}"));
    fs::create_dir_all(&content).unwrap();
    fs::write(
        content.join("manifest.raucm"),
        format!(
            "[update]\ncompatible={compatible}\nversion={version}\n\n[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=root.img\n"
        ),
    )
    .unwrap();
    // Bytes that do not compress: RAUC wants the bundle's squashfs above 4 KiB.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<u8> = (0..64 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    fs::write(content.join("root.img"), noise).unwrap();
    let out = dir.join(format!("refused-{version}.raucb"));
    let _ = fs::remove_file(&out);
    run_ok(
        Command::new("rauc")
            .arg("bundle")
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()))
            .arg(&content)
            .arg(&out),
    );
    out
}

/// Waits until the audit repository has a Security Alert (Software Configuration, DCM
/// 110131) whose words hold `fragment`; returns how long that took.
fn audited(rsyslog: &Rsyslog, fragment: &str, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let messages = rsyslog.messages();
        if messages
            .iter()
            .any(|m| m.contains("110131") && m.contains(fragment))
        {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no audit record with {fragment:?} at the hub's repository within 300 s; the update alerts there:\n{}\n{}",
            messages
                .iter()
                .filter(|m| m.contains("110131"))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            rsyslog.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Test 4: on the box running the next version (slot B, after the update), each refused
/// case in turn: the channel's newest release older than the running one (a rollback
/// attack), expired metadata (a freeze attack), metadata signed by another root's keys, a
/// bundle whose bytes are not the ones signed, a validly listed bundle RAUC says is for
/// another compatible, and one signed by a key outside the image's keyring. Each reaches
/// the hub's audit repository with its reason; the box never reboots, and no slot is
/// written (the stop report's slots are asserted by the caller). The repository also has
/// what became of the update before: the next version kept.
pub(crate) fn refusals(vm: &mut Vm, channel: &Channel, rsyslog: &Rsyslog, releases: &Releases) {
    let (path, running) = &releases.next;
    let next = channel.bundle(path, running);
    let first = channel.bundle(&releases.first, "1");
    let dir = channel.work.join("refused");
    fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (
        releases.keys.join("update.cert.pem"),
        releases.keys.join("update.key.pem"),
    );
    let foreign = channel.bundle(&rauc_bundle(&dir, "4", "other-board", &cert, &key), "4");
    // A signing key the image's keyring does not know.
    let (stranger_cert, stranger_key) =
        (dir.join("stranger.cert.pem"), dir.join("stranger.key.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=not the update CA",
            ])
            .arg("-keyout")
            .arg(&stranger_key)
            .arg("-out")
            .arg(&stranger_cert),
    );
    let unknown_key = channel.bundle(
        &rauc_bundle(&dir, "5", COMPATIBLE, &stranger_cert, &stranger_key),
        "5",
    );
    let boots = vm.serial().matches("Linux version").count();
    let foreign_name = foreign
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // Each case: what it is, words of the reason the hub must get, and its publication.
    type Publication<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, &str, Publication<'_>); 6] = [
        (
            "an older release (a rollback attack)",
            "older than the running",
            Box::new(|| channel.publish(&[&first], false, None)),
        ),
        (
            "an expired timestamp (a freeze attack)",
            "metadata has expired",
            Box::new(|| channel.publish(&[&next], true, None)),
        ),
        (
            "metadata signed by another root's keys",
            "not signed by the keys this box trusts",
            Box::new(|| channel.publish_stranger(&[&next])),
        ),
        (
            "a bundle whose bytes are not the ones signed",
            "is not the one signed",
            Box::new(|| channel.publish(&[&next, &foreign], false, Some(&foreign_name))),
        ),
        (
            "a bundle for another compatible",
            "other-board",
            Box::new(|| channel.publish(&[&next, &foreign], false, None)),
        ),
        (
            "a bundle signed by a key outside the image's keyring",
            "RAUC refuses the bundle",
            Box::new(|| channel.publish(&[&next, &unknown_key], false, None)),
        ),
    ];
    for (case, fragment, publish) in &cases {
        let since = Instant::now();
        publish();
        let took = audited(rsyslog, fragment, since);
        println!(
            "refused: {case}: audited at the hub {:.1} s after its publication",
            took.as_secs_f64()
        );
    }
    // The hub's view of the box's update itself, from its audit trail: the next version
    // kept.
    audited(
        rsyslog,
        &format!("update to {running}: its first boot is healthy"),
        Instant::now(),
    );
    // No reboot, and nothing of 4 or 5 installed.
    assert!(vm.running(), "the box stopped:\n{}", vm.serial_tail());
    let serial = vm.serial();
    assert_eq!(
        serial.matches("Linux version").count(),
        boots,
        "the box rebooted:\n{}",
        vm.serial_tail()
    );
    for version in ["4", "5"] {
        assert!(
            !serial.contains(&format!("tsunagi update: {version} installed")),
            "{version} was installed:\n{}",
            vm.serial_tail()
        );
    }
}

/// The stop report after the refusals: the box still on the next version in slot B, good,
/// slot A good as the update left it, and the last refusal in the update service's status.
pub(crate) fn after_refusals(stop: &[String], releases: &Releases) {
    let running = &releases.next.1;
    assert!(
        stop.iter().any(|l| l == "slots: A good, B good; booted B"),
        "slots after the refusals:\n{}",
        stop.join("\n")
    );
    assert!(
        stop.iter().any(|l| l.starts_with("status: update ")
            && l.contains(&format!("running {running};"))
            && l.contains("last update: 5 refused by the installer")),
        "the update service after the refusals:\n{}",
        stop.join("\n")
    );
}
