//! Boots the appliance image in QEMU (issue 7, first part of the harness).
//!
//! [`Vm::boot`] copies the disk (sparse) into a temporary directory, so that a test never
//! changes the built image, and starts `qemu-system-x86_64` with OVMF (UEFI: systemd-boot
//! loads slot A's UKI), the serial console into `serial.log` in that directory, and a QMP
//! socket. Under TCG (this machine kind cannot run ordinary KVM guests,
//! `../shared/reference/image.md` §2.0), a boot takes 1–3 minutes. [`Vm::wait_for`] watches the
//! serial log for a line; [`Vm::power_down`] asks for an ACPI power-down over QMP and waits
//! for QEMU to exit. Dropping the guard kills QEMU by its pid.
//!
//! Needs `qemu-system-x86_64` (Debian `qemu-system-x86`) and OVMF (`ovmf`).

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// A running guest. Killed on drop.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    dir: tempfile::TempDir,
    started: Instant,
    /// Whether QEMU runs under TCG (always, for now).
    pub tcg: bool,
}

impl Vm {
    /// Boots a copy of `disk`.
    pub fn boot(disk: &Path) -> Result<Vm, QemuError> {
        let qemu = find_in_clean_path("qemu-system-x86_64")
            .ok_or_else(|| QemuError::Missing("qemu-system-x86_64".into()))?;
        for f in [OVMF_CODE, OVMF_VARS] {
            if !Path::new(f).exists() {
                return Err(QemuError::Missing(f.into()));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("tsu-vm-")
            .tempdir()
            .map_err(io("create a directory for the guest"))?;
        let copy = dir.path().join("disk.raw");
        let status = Command::new("cp")
            .args(["--sparse=always", "--"])
            .arg(disk)
            .arg(&copy)
            .status()
            .map_err(io("copy the disk"))?;
        if !status.success() {
            return Err(QemuError::Io {
                what: format!("copy {}", disk.display()),
                source: std::io::Error::other(status.to_string()),
            });
        }
        let vars = dir.path().join("vars.fd");
        fs::copy(OVMF_VARS, &vars).map_err(io("copy the OVMF variables"))?;
        let serial = dir.path().join("serial.log");
        let mut cmd = Command::new(qemu);
        cmd.args(["-machine", "q35", "-m", "1024", "-smp", "2"])
            .args(["-display", "none", "-nodefaults", "-no-reboot"])
            .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .arg("-chardev")
            .arg(format!("file,id=ser0,path={}", serial.display()))
            .args(["-serial", "chardev:ser0"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.path().join("qmp.sock").display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=virtio,format=raw,file={},cache=unsafe",
                copy.display()
            ))
            .args(["-device", "virtio-rng-pci"])
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(dir.path().join("qemu.err"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        let child = cmd.spawn().map_err(io("start qemu-system-x86_64"))?;
        Ok(Vm {
            child: Some(child),
            dir,
            started: Instant::now(),
            tcg: true,
        })
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
            pause(Duration::from_millis(500));
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

/// Text without `\r` and without CSI escape sequences (`ESC [ ... final-byte`).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
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
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_and_carriage_returns_go() {
        assert_eq!(
            super::strip_escapes(
                "[\u{1b}[0;32m  OK  \u{1b}[0m] Started \u{1b}[0;1;39mtsunagi.service\u{1b}[0m - x\r\n"
            ),
            "[  OK  ] Started tsunagi.service - x\n"
        );
    }
}
