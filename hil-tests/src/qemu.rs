//! Boots the appliance image in QEMU (issue 7).
//!
//! [`Vm::start`] copies the disk (sparse) into a temporary directory, so that a test never
//! changes the built image, and starts `qemu-system-x86_64` with OVMF (UEFI: systemd-boot
//! loads slot A's UKI), the serial console into `serial.log` in that directory, a QMP
//! socket, optionally a provisioning medium ([`provisioning_disk`]) as a second disk, and
//! virtio NICs on tap devices (`TestNet::box_to_vm` makes them in the box namespace, and
//! QEMU then runs there).
//!
//! KVM is used only when [`kvm_works`] (a probe boot of the firmware alone, at most 10 s)
//! says so; on this machine kind `/dev/kvm` cannot run ordinary guests
//! (`../shared/reference/image.md` §2.0), so it is TCG, and a boot takes 1–3 minutes.
//! [`Vm::wait_for`] watches the serial log for a line; [`Vm::power_down`] asks for an ACPI
//! power-down over QMP and waits for QEMU to exit; [`Vm::power_cut`] kills QEMU (SIGKILL)
//! and [`Vm::boot_again`] boots the same disk copy in a new QEMU process (the power-cut
//! test, `docs/image.md`). Dropping the guard kills QEMU by its pid,
//! copies the serial log to [`Spec::keep_log`] and, while a test panics, prints it, so it
//! is kept with the test's output.
//!
//! Needs `qemu-system-x86_64` (Debian `qemu-system-x86`) and OVMF (`ovmf`).

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::testnet::cmd::find_in_clean_path;

/// OVMF's code and the template of its variable store (Debian `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Why the harness could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "{0} is not installed (Debian packages qemu-system-x86 and ovmf; `cargo xtask test` installs them)"
    )]
    Missing(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest did not print {pattern:?} within {timeout:?}; the serial log ends:\n{tail}")]
    Timeout {
        pattern: String,
        timeout: Duration,
        tail: String,
    },
    #[error(
        "QEMU ended before the guest printed {pattern:?} ({status}); the serial log ends:\n{tail}"
    )]
    Ended {
        pattern: String,
        status: String,
        tail: String,
    },
    #[error(
        "the emulator wedged the guest before it printed {pattern:?} (a soft lockup of {WEDGED_AFTER:?} or more); the serial log ends:\n{tail}"
    )]
    Wedged { pattern: String, tail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// A virtio NIC on a tap device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// The tap device (in the namespace QEMU runs in).
    pub tap: String,
    /// The guest's MAC address, `52:54:00:..` (QEMU's range).
    pub mac: String,
}

/// What to boot, and with what.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// The disk image; the guest gets a sparse copy.
    pub disk: PathBuf,
    /// Tamper with the copy before the boot: `(offset, mask)`, the byte at `offset` XORed
    /// with `mask`.
    pub flip: Vec<(u64, u8)>,
    /// A provisioning medium ([`provisioning_disk`]), attached as a second disk.
    pub provisioning: Option<PathBuf>,
    /// The network namespace QEMU runs in (where the taps are).
    pub netns: Option<String>,
    /// The guest's NICs, in PCI order (slots 0x10, 0x11, ...).
    pub nics: Vec<Nic>,
    /// Where the serial log is copied when the guest goes.
    pub keep_log: Option<PathBuf>,
    /// The machine's serial number in its firmware (SMBIOS type 1), as a box's maker sets
    /// it: the box serial it enrolls with.
    pub serial_number: Option<String>,
    /// The size of the guest's disk in bytes, when larger than the image: the copy is
    /// extended (sparse), as a box's disk is larger than the image written to it.
    pub disk_size: Option<u64>,
}

/// A running guest. Killed on drop.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    dir: tempfile::TempDir,
    started: Instant,
    keep_log: Option<PathBuf>,
    /// What was booted (for [`Vm::boot_again`]).
    spec: Spec,
    /// The serial consoles of the earlier boots of this disk, in order.
    earlier: String,
    /// Whether QEMU runs under TCG (else KVM; see [`kvm_works`]).
    pub tcg: bool,
    /// How many more boots the emulator stalled may be cut and booted again
    /// ([`Vm::wait_for_past_stall`]): two for the machine's whole life.
    spare_stall_cuts: u32,
}

/// A soft lockup this long means the guest will not come back: in every case seen, the
/// lockups only grew from there (to 209 s, to 600 s) and the boot never went on.
pub const WEDGED_AFTER: Duration = Duration::from_secs(120);

/// The longest soft lockup the guest kernel reported on `serial` (`watchdog: BUG: soft
/// lockup - CPU#0 stuck for 26s!`).
pub fn longest_soft_lockup(serial: &str) -> Option<Duration> {
    serial
        .match_indices("soft lockup - CPU#")
        .filter_map(|(at, _)| {
            let rest = &serial[at..];
            let after = &rest[rest.find("stuck for ")? + "stuck for ".len()..];
            let secs = &after[..after.find("s!")?];
            secs.parse::<u64>().ok().map(Duration::from_secs)
        })
        .max()
}

/// What the guest kernel prints when the emulator starved it: its timer interrupts stopped
/// coming (an RCU stall, seen once 21 s into a boot, before anything of ours had started),
/// or a virtual CPU stayed in the kernel's soft interrupts for minutes (a soft lockup of
/// both `ksoftirqd` threads at once, seen once after a boot's RAUC had started). Both under
/// TCG on a loaded two-core host; a KVM guest is not cut for them.
pub const EMULATOR_STALLS: &[&str] = &[
    "rcu: INFO: rcu_preempt detected stalls",
    "watchdog: BUG: soft lockup",
];

/// Whether KVM can run an ordinary guest here: OVMF alone, under KVM, must print its boot
/// manager's first line on the serial console within 10 s (under working KVM it takes
/// about a second; on this machine kind the first instruction fails). Probed once per
/// process; `TSUNAGI_QEMU_ACCEL=tcg` skips the probe.
pub fn kvm_works() -> bool {
    static KVM: OnceLock<bool> = OnceLock::new();
    *KVM.get_or_init(|| {
        if std::env::var("TSUNAGI_QEMU_ACCEL").is_ok_and(|v| v == "tcg") {
            return false;
        }
        probe_kvm().unwrap_or(false)
    })
}

/// `qemu-system-x86_64`, once it and OVMF are known to be installed.
fn qemu_binary() -> Result<PathBuf, QemuError> {
    let qemu = find_in_clean_path("qemu-system-x86_64")
        .ok_or_else(|| QemuError::Missing("qemu-system-x86_64".into()))?;
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).exists() {
            return Err(QemuError::Missing(f.into()));
        }
    }
    Ok(qemu)
}

/// The UEFI firmware for a guest whose files are in `dir`: OVMF's code, read-only, and a
/// fresh copy of its variable store.
fn add_firmware(dir: &Path) -> Result<(), QemuError> {
    let vars = dir.join("vars.fd");
    fs::copy(OVMF_VARS, &vars).map_err(io("copy the OVMF variables"))?;
    Ok(())
}

/// The firmware drives for a guest whose files are in `dir` ([`add_firmware`]).
fn firmware_args(cmd: &mut Command, dir: &Path) {
    cmd.arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,file={}",
            dir.join("vars.fd").display()
        ));
}

fn probe_kvm() -> Result<bool, QemuError> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(false);
    }
    let mut cmd = Command::new(qemu_binary()?);
    let dir = tempfile::Builder::new()
        .prefix("tsu-kvm-probe-")
        .tempdir()
        .map_err(io("create a directory for the KVM probe"))?;
    let serial = dir.path().join("serial.log");
    add_firmware(dir.path())?;
    firmware_args(&mut cmd, dir.path());
    let mut child = cmd
        .args(["-machine", "q35", "-accel", "kvm", "-m", "256"])
        .args(["-display", "none", "-nodefaults", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start the KVM probe"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut works = false;
    while Instant::now() < deadline {
        if fs::read(&serial).is_ok_and(|b| b.windows(6).any(|w| w == b"BdsDxe")) {
            works = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        pause(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(works)
}

/// Where GPT partition `name` (its partition label) lies in the disk image `raw`: byte
/// offset and length, from `sfdisk -J`.
pub fn partition(raw: &Path, name: &str) -> Result<(u64, u64), QemuError> {
    let sfdisk = find_in_clean_path("sfdisk").ok_or_else(|| QemuError::Missing("sfdisk".into()))?;
    let out = Command::new(sfdisk)
        .arg("-J")
        .arg(raw)
        .output()
        .map_err(io("run sfdisk -J"))?;
    let bad = |detail: String| QemuError::Io {
        what: format!("the partition table of {}", raw.display()),
        source: std::io::Error::other(detail),
    };
    if !out.status.success() {
        return Err(bad(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let table: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| bad(e.to_string()))?;
    let sector = table["partitiontable"]["sectorsize"]
        .as_u64()
        .unwrap_or(512);
    let part = table["partitiontable"]["partitions"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .ok_or_else(|| bad(format!("no partition {name}")))?;
    match (part["start"].as_u64(), part["size"].as_u64()) {
        (Some(start), Some(size)) => Ok((start * sector, size * sector)),
        _ => Err(bad(format!("partition {name} without start or size"))),
    }
}

/// Makes a provisioning medium: an ext4 image at `out`, labelled `TSUNAGI-PRV`, holding
/// the tree `dir` (layout: `image/overlay/usr/lib/tsunagi/provision`). The image applies it
/// at boot.
pub fn provisioning_disk(dir: &Path, out: &Path) -> Result<(), QemuError> {
    let mkfs =
        find_in_clean_path("mkfs.ext4").ok_or_else(|| QemuError::Missing("mkfs.ext4".into()))?;
    let output = Command::new(mkfs)
        .args(["-q", "-F", "-L", "TSUNAGI-PRV", "-d"])
        .arg(dir)
        .arg(out)
        .arg("16M")
        .output()
        .map_err(io("run mkfs.ext4"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(QemuError::Io {
            what: format!("mkfs.ext4 -d {}", dir.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&output.stderr).into_owned()),
        })
    }
}

impl Vm {
    /// Boots what `spec` says.
    pub fn start(spec: &Spec) -> Result<Vm, QemuError> {
        let qemu = qemu_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("tsu-vm-")
            .tempdir()
            .map_err(io("create a directory for the guest"))?;
        let copy = dir.path().join("disk.raw");
        let status = Command::new("cp")
            .args(["--sparse=always", "--"])
            .arg(&spec.disk)
            .arg(&copy)
            .status()
            .map_err(io("copy the disk"))?;
        if !status.success() {
            return Err(QemuError::Io {
                what: format!("copy {}", spec.disk.display()),
                source: std::io::Error::other(status.to_string()),
            });
        }
        if let Some(size) = spec.disk_size {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&copy)
                .map_err(io("open the disk copy"))?;
            let now = f.metadata().map_err(io("stat the disk copy"))?.len();
            if size > now {
                f.set_len(size).map_err(io("extend the disk copy"))?;
            }
        }
        if !spec.flip.is_empty() {
            let mut f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&copy)
                .map_err(io("open the disk copy"))?;
            for &(offset, mask) in &spec.flip {
                let mut byte = [0u8];
                f.seek(SeekFrom::Start(offset))
                    .and_then(|_| f.read_exact(&mut byte))
                    .and_then(|()| f.seek(SeekFrom::Start(offset)))
                    .and_then(|_| f.write_all(&[byte[0] ^ mask]))
                    .map_err(io("flip bits in the disk copy"))?;
            }
        }
        let tcg = !kvm_works();
        add_firmware(dir.path())?;
        let mut vm = Vm {
            child: None,
            dir,
            started: Instant::now(),
            keep_log: spec.keep_log.clone(),
            spec: spec.clone(),
            earlier: String::new(),
            tcg,
            spare_stall_cuts: 2,
        };
        vm.spawn(&qemu)?;
        Ok(vm)
    }

    /// Starts QEMU on the guest's disk copy and firmware variables.
    fn spawn(&mut self, qemu: &Path) -> Result<(), QemuError> {
        let dir = self.dir.path();
        let spec = &self.spec;
        let serial = dir.join("serial.log");
        let copy = dir.join("disk.raw");
        let mut cmd = match &spec.netns {
            // `ip netns exec` execs QEMU: the pid is QEMU's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(qemu);
                c
            }
            None => Command::new(qemu),
        };
        cmd.args(["-machine", "q35", "-m", "1024"]).args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
        ]);
        if self.tcg {
            // One virtual CPU under TCG. With two (multi-threaded TCG), four CI runs in a
            // row had a boot whose kernel wedged with both CPUs stuck at once, each waiting
            // on the other (ksoftirqd on one, and on the other ksoftirqd, svc-update or
            // chronyd in the kernel), soft lockups growing to minutes: a cross-CPU wait the
            // emulator did not complete. One CPU has no such wait, and on a two-core host
            // that also runs the hub, a second emulated CPU bought little.
            cmd.args(["-smp", "1", "-accel", "tcg", "-cpu", "max"]);
        } else {
            cmd.args(["-smp", "2", "-accel", "kvm", "-cpu", "host"]);
        }
        if let Some(serial) = &spec.serial_number {
            cmd.arg("-smbios").arg(format!("type=1,serial={serial}"));
        }
        if let Some(medium) = &spec.provisioning {
            cmd.arg("-drive").arg(format!(
                "if=virtio,format=raw,readonly=on,file={}",
                medium.display()
            ));
        }
        for (i, nic) in spec.nics.iter().enumerate() {
            cmd.arg("-netdev")
                .arg(format!(
                    "tap,id=n{i},ifname={},script=no,downscript=no",
                    nic.tap
                ))
                .arg("-device")
                // No option ROM: the box never boots from the network, and the firmware
                // would load and start iPXE for every NIC.
                .arg(format!(
                    "virtio-net-pci,netdev=n{i},mac={},addr={:#x},romfile=",
                    nic.mac,
                    0x10 + i
                ));
        }
        // cache=unsafe: QEMU ignores the guest's flushes. For a QEMU that is killed
        // ([`Vm::power_cut`]) it keeps exactly what cache=writeback would: every write
        // QEMU passed to the host file is in the host's page cache, which outlives QEMU;
        // what was only in the guest's memory is lost. See `docs/image.md` (power cuts).
        cmd.arg("-chardev")
            .arg(format!("file,id=ser0,path={}", serial.display()))
            .args(["-serial", "chardev:ser0"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            // The box's own disk boots first (bootindex 0): the firmware would otherwise
            // try a FAT medium attached before it for a removable-media boot loader, fail,
            // and go on to network boot.
            .arg("-drive")
            .arg(format!(
                "if=none,id=system,format=raw,file={},cache=unsafe",
                copy.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=system,bootindex=0"])
            .args(["-device", "virtio-rng-pci"]);
        firmware_args(&mut cmd, dir);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(
            fs::File::create(dir.join("qemu.err"))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
        let child = cmd.spawn().map_err(io("start qemu-system-x86_64"))?;
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// Cuts the power: SIGKILL to QEMU, by its pid, and waits for it. What QEMU had
    /// written to the disk file stays; the guest's memory (its page cache included) is
    /// gone, as in a power cut.
    pub fn power_cut(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Boots the same disk (and firmware variables) again in a new QEMU process, once the
    /// last one has ended ([`Vm::power_cut`], [`Vm::power_down`]). The serial console
    /// starts afresh; the earlier ones are kept for the log ([`Spec::keep_log`]).
    pub fn boot_again(&mut self) -> Result<(), QemuError> {
        self.power_cut();
        let boot = self.earlier.matches("==== boot ").count() + 1;
        self.earlier.push_str(&format!(
            "==== boot {boot} (power cut or power-down) ====\n"
        ));
        self.earlier.push_str(&self.serial());
        fs::remove_file(self.dir.path().join("serial.log"))
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io("remove the serial log"))?;
        let qemu = qemu_binary()?;
        self.spawn(&qemu)
    }

    /// The guest's disk (the copy it boots), to inspect once QEMU has ended.
    pub fn disk(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }

    /// The serial console so far, without carriage returns and terminal escape sequences
    /// (systemd colours its status lines).
    pub fn serial(&self) -> String {
        fs::read(self.dir.path().join("serial.log"))
            .map(|b| strip_escapes(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    /// The end of the serial console, for an error.
    pub fn serial_tail(&self) -> String {
        let text = self.serial();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether QEMU still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Where the guest's files are (the serial log stays there until drop).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Waits until the serial console shows `pattern`; returns the time since the boot
    /// started.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<Duration, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial().contains(pattern) {
                return Ok(self.started.elapsed());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(QemuError::Ended {
                    pattern: pattern.into(),
                    status: status.to_string(),
                    tail: self.serial_tail(),
                });
            }
            if Instant::now() > deadline {
                return Err(QemuError::Timeout {
                    pattern: pattern.into(),
                    timeout,
                    tail: self.serial_tail(),
                });
            }
            if self.wedged() {
                return Err(QemuError::Wedged {
                    pattern: pattern.into(),
                    tail: self.serial_tail(),
                });
            }
            pause(Duration::from_millis(500));
        }
    }

    /// Whether the emulator has wedged this boot for good (under TCG: a soft lockup of at
    /// least [`WEDGED_AFTER`] on its console): a wait need not run to its end.
    pub fn wedged(&self) -> bool {
        self.tcg && longest_soft_lockup(&self.serial()).is_some_and(|d| d >= WEDGED_AFTER)
    }

    /// Which of [`EMULATOR_STALLS`] this boot's console shows, under TCG.
    pub fn stalled(&self) -> Option<&'static str> {
        if !self.tcg {
            return None;
        }
        let serial = self.serial();
        EMULATOR_STALLS.iter().copied().find(|s| serial.contains(s))
    }

    /// Whether a boot that did not get where it should may be cut once more and booted
    /// again: the emulator stalled it ([`Vm::stalled`]) and the machine has a spare cut
    /// left (which this takes). Says so on stdout.
    pub fn take_stall_cut(&mut self) -> bool {
        let Some(stall) = self.stalled() else {
            return false;
        };
        if self.spare_stall_cuts == 0 {
            return false;
        }
        self.spare_stall_cuts -= 1;
        println!(
            "the emulator stalled this boot {:.1} s after power-on (the guest kernel printed \"{stall}\", and the boot did not go on): cut once more and booted again",
            self.elapsed().as_secs_f64()
        );
        true
    }

    /// [`Vm::wait_for`], except that a boot the emulator stalled ([`Vm::take_stall_cut`])
    /// is cut once more, booted again and waited for again. That is one more power cut, at
    /// a moment the box must survive anyway, and the caller's later checks cover it too.
    /// Any other timeout, a second stall, or a stall under KVM is an error as before.
    pub fn wait_for_past_stall(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<Duration, QemuError> {
        match self.wait_for(pattern, timeout) {
            Err(QemuError::Timeout { .. } | QemuError::Wedged { .. }) if self.take_stall_cut() => {
                self.boot_again()?;
                self.wait_for(pattern, timeout)
            }
            other => other,
        }
    }

    /// ACPI power-down over QMP; waits for QEMU to exit (true: it did, within `timeout`).
    pub fn power_down(&mut self, timeout: Duration) -> Result<bool, QemuError> {
        let sock = self.dir.path().join("qmp.sock");
        let stream = UnixStream::connect(&sock).map_err(io("connect to QMP"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io("QMP timeout"))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(io("QMP"))?);
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).map_err(io("QMP greeting"))?;
        for command in [
            r#"{"execute":"qmp_capabilities"}"#,
            r#"{"execute":"system_powerdown"}"#,
        ] {
            writeln!(writer, "{command}").map_err(io("QMP command"))?;
            line.clear();
            reader.read_line(&mut line).map_err(io("QMP answer"))?;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return Ok(true);
            }
            pause(Duration::from_millis(500));
        }
        Ok(false)
    }
}

/// Text without `\r` and without escape sequences: CSI (`ESC [ ... final-byte`) and the
/// two-character ones (`ESC M`, reverse index, which systemd's progress spinner uses).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.next() == Some('[') {
                    for d in chars.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[expect(
    clippy::disallowed_methods,
    reason = "the harness polls a QEMU process and its serial log"
)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let serial = format!("{}{}", self.earlier, self.serial());
        if let Some(keep) = &self.keep_log {
            if let Some(parent) = keep.parent() {
                let _ = fs::create_dir_all(parent);
            }
            if fs::write(keep, &serial).is_ok() {
                eprintln!("qemu: the serial log is kept in {}", keep.display());
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "qemu: the guest's serial console:\n{serial}\nqemu: end of the serial console"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_soft_lockup_is_read_from_the_console() {
        let serial = "[   80.320793] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [ksoftirqd/0:14]\n\
                      [  452.324664] watchdog: BUG: soft lockup - CPU#0 stuck for 388s! [svc-update:472]\n\
                      [  460.416668] watchdog: BUG: soft lockup - CPU#1 stuck for 395s! [ksoftirqd/1:21]\n";
        assert_eq!(longest_soft_lockup(serial), Some(Duration::from_secs(395)));
        assert_eq!(
            longest_soft_lockup("rcu: INFO: rcu_preempt detected stalls"),
            None
        );
        assert_eq!(
            longest_soft_lockup("soft lockup - CPU#0 stuck for xs!"),
            None
        );
    }

    #[test]
    fn escapes_and_carriage_returns_go() {
        assert_eq!(
            strip_escapes(
                "[\u{1b}[0;32m  OK  \u{1b}[0m] Started \u{1b}[0;1;39mtsunagi.service\u{1b}[0m - x\r\n"
            ),
            "[  OK  ] Started tsunagi.service - x\n"
        );
        assert_eq!(
            strip_escapes("\u{1b}M[ ***  ] Job tsunagi.service/start running\n"),
            "[ ***  ] Job tsunagi.service/start running\n"
        );
    }
}
