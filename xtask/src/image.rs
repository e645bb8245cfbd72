//! `cargo xtask image [--check]`: the appliance image (issue 7, first part).
//!
//! Builds the release `tsunagi`, then runs `image/build.sh` (mmdebstrap from the machine's
//! own apt sources, a squashfs root with dm-verity, one signed UKI per slot, systemd-boot, a
//! GPT disk) into `target/image/`: `tsunagi.raw`, `tsunagi.qcow2`, `roothash`,
//! `build.json`. The result is cached by input hash (every file under `image/` and the
//! release binary): `target/image/input-hash` names the inputs of the image there, and an
//! unchanged hash reuses it. Prints the build time (or that it was reused) and the size.
//! The root filesystem mmdebstrap made is kept too (`target/image-rootfs/HASH`, by every
//! input but the version), so that the releases built after the image skip mmdebstrap.
//! `SOURCE_DATE_EPOCH` is the commit's time unless set.
//!
//! `--check` then checks the built image itself (acceptance 4 of issue 7): its root
//! partition (read from the disk's GPT) holds no login program, no sshd, no getty, no
//! emergency or rescue shell, no package manager, and `/etc/shadow` holds no password hash.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use sha2::{Digest as _, Sha256};

use crate::process::{display, status};
use crate::workspace_root;

/// Changes when the build's own logic changes in a way the hashed files do not show.
const GENERATOR: &str = "tsunagi-image-v1";

pub(crate) fn run(args: &[&str]) -> anyhow::Result<()> {
    let check = match args {
        [] => false,
        ["--check"] => true,
        _ => bail!("usage: cargo xtask image [--check]"),
    };
    let (target, keys) = prepare()?;
    let out = target.join("image");
    build(&out, &keys, "1", None)?;
    let raw = out.join("tsunagi.raw");
    let used = Command::new("du")
        .args(["-B1", "--"])
        .arg(&raw)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let qcow = fs::metadata(out.join("tsunagi.qcow2")).map_or(0, |m| m.len());
    println!(
        "image: {} ({:.0} MiB allocated of {:.0} MiB), qcow2 {:.0} MiB, root hash {}",
        raw.display(),
        used as f64 / 1048576.0,
        fs::metadata(&raw)?.len() as f64 / 1048576.0,
        qcow as f64 / 1048576.0,
        fs::read_to_string(out.join("roothash"))
            .unwrap_or_default()
            .trim()
    );
    if check {
        let dir = target.join("image-check");
        let root = root_partition(&raw, &dir)?;
        let problems = check_no_login(&root)?;
        if !problems.is_empty() {
            let _ = fs::remove_dir_all(&dir);
            bail!("the image offers a way in:\n  {}", problems.join("\n  "));
        }
        println!(
            "image check: no login program, getty, sshd, shell unit or package manager; every account locked"
        );
        let built_in = built_in_key(&root, &keys);
        let channel_root = built_in_file(&root, &keys, "update-root.json");
        let bundle = check_bundle(&out.join("tsunagi.raucb"), &keys, "1");
        let sandbox = check_sandbox(&root, &dir, "tsunagi.service");
        let share = check_sandbox(&root, &dir, "tsunagi-share.service");
        let _ = fs::remove_dir_all(&dir);
        println!("image check: the provisioning key built in: {}", built_in?);
        channel_root?;
        println!(
            "image check: the update channel's root of trust built in (KEYS/update-root.json)"
        );
        println!("image check: the update bundle: {}", bundle?);
        println!("image check: the supervisor's sandbox: {}", sandbox?);
        println!("image check: the SS-MIX2 share mount's sandbox: {}", share?);
    }
    Ok(())
}

/// Root, the packages, and the keys: real ones by `KEYS=DIR`, else test keys made once
/// into target/image-keys and kept (the update CA's certificate and the channel's root are
/// in the image, so the keys are an input). Returns the target directory and the keys.
pub(crate) fn prepare() -> anyhow::Result<(PathBuf, PathBuf)> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "building the image needs root (mmdebstrap, chroot)"
    );
    crate::test::ensure_packages_for("cargo xtask image")?;
    let (_, target) = crate::bench::target_dir();
    let keys = std::env::var_os("KEYS").map_or_else(|| target.join("image-keys"), PathBuf::from);
    Ok((target, keys))
}

/// A fault built into a test release (`image/build.sh`'s `FAULT`), for the update tests'
/// rollback. Never for a fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The supervisor never tells systemd it is ready: the health gate fails.
    NeverReady,
}

impl Fault {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::NeverReady => "never-ready",
        }
    }
}

/// Builds the image of `version` into `out` (reused when its inputs are unchanged): the
/// disk, and the same version as a signed RAUC bundle (`tsunagi.raucb`); with `fault`
/// built in, for a test release.
pub(crate) fn build(
    out: &Path,
    keys: &Path,
    version: &str,
    fault: Option<Fault>,
) -> anyhow::Result<()> {
    let (tsunagi, target, _) = crate::bench::build_tsunagi(false)?;
    let root = workspace_root();
    fs::create_dir_all(out)?;
    let work = target.join("image-work");
    if !keys.join("db.key").exists()
        || !keys.join("provisioning.pub").exists()
        || !keys.join("update.key.pem").exists()
    {
        let mut make = Command::new(root.join("image/build.sh"));
        make.arg("keys")
            .env("OUT", out)
            .env("WORK", &work)
            .env("KEYS", keys)
            .env("TSUNAGI_BIN", &tsunagi);
        if !status(&mut make)?.success() {
            bail!("`{}` failed", display(&make));
        }
    }
    channel_root(keys)?;
    let fault = fault.map_or("", Fault::name);
    let hash = input_hash(
        &root.join("image"),
        &tsunagi,
        keys,
        &format!("{version}{fault}"),
    )?;
    let raw = out.join("tsunagi.raw");
    let recorded = fs::read_to_string(out.join("input-hash")).unwrap_or_default();
    if recorded.trim() == hash && raw.exists() {
        println!("image: reused {} (inputs unchanged, {hash})", raw.display());
    } else {
        let _ = fs::remove_file(out.join("input-hash"));
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v,
            Err(_) => commit_time(&root)?,
        };
        // The root filesystem before its version is written: kept for the releases built
        // from the same inputs (`cargo xtask release`), which then skip mmdebstrap. Only
        // the one for the current inputs is kept.
        let rootfs_hash = input_hash(&root.join("image"), &tsunagi, keys, "rootfs")?;
        let rootfs_caches = target.join("image-rootfs");
        if let Ok(entries) = fs::read_dir(&rootfs_caches) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy() != rootfs_hash {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let mut build = Command::new(root.join("image/build.sh"));
        build
            .env("OUT", out)
            .env("WORK", &work)
            .env("KEYS", keys)
            .env("TSUNAGI_BIN", &tsunagi)
            .env("ROOTFS_CACHE", rootfs_caches.join(&rootfs_hash))
            .env("VERSION", version)
            .env("FAULT", fault)
            .env("SOURCE_DATE_EPOCH", epoch);
        let start = Instant::now();
        if !status(&mut build)?.success() {
            bail!("`{}` failed", display(&build));
        }
        let _ = fs::remove_dir_all(&work);
        fs::write(out.join("input-hash"), format!("{hash}\n"))?;
        let secs = start.elapsed().as_secs_f64();
        // For the image stage's figures (hil-tests `image` prints it beside the boot times).
        fs::write(out.join("build-seconds"), format!("{secs:.0}\n"))?;
        println!("image: built in {secs:.0} s ({hash})");
    }
    Ok(())
}

/// The update channel's TUF keys (`KEYS/channel/`) and the signed root built into the
/// image (`KEYS/update-root.json`), made once when missing (test keys; an operator passes
/// real ones in `KEYS`).
fn channel_root(keys: &Path) -> anyhow::Result<()> {
    let root = keys.join("update-root.json");
    if root.exists() {
        return Ok(());
    }
    ensure!(
        std::env::var_os("KEYS").is_none(),
        "KEYS has no update-root.json, the update channel's TUF root the image must carry (tsunagi_provision::release::root makes it from the channel's keys)"
    );
    let dir = keys.join("channel");
    println!(
        "image: generating TEST update channel keys into {} (never use them for a real fleet)",
        dir.display()
    );
    let channel = tsunagi_provision::release::ChannelKeys::generate(&dir)?;
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(5 * 365 * 24);
    let signed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(tsunagi_provision::release::root(
            &channel,
            std::num::NonZeroU64::MIN,
            expires,
        ))?;
    fs::write(&root, signed)?;
    Ok(())
}
/// The network's provisioning public key in the root (`usr/share/tsunagi/provisioning.pub`,
/// where `tsunagi medium` reads it): it must be the one of `KEYS`. Returns it.
fn built_in_key(root: &Path, keys: &Path) -> anyhow::Result<String> {
    let want = fs::read_to_string(keys.join("provisioning.pub"))
        .context("read the provisioning public key of KEYS")?;
    let got = Command::new("unsquashfs")
        .arg("-cat")
        .arg(root)
        .arg("usr/share/tsunagi/provisioning.pub")
        .output()
        .context("run unsquashfs -cat")?;
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    ensure!(
        !want.trim().is_empty() && got.trim() == want.trim(),
        "the image's provisioning key ({:?}) is not the one of KEYS ({:?})",
        got.trim(),
        want.trim()
    );
    Ok(want.trim().to_owned())
}

/// The file `usr/share/tsunagi/NAME` in the root must be `KEYS/NAME`.
fn built_in_file(root: &Path, keys: &Path, name: &str) -> anyhow::Result<()> {
    let want = fs::read(keys.join(name)).with_context(|| format!("read KEYS/{name}"))?;
    let got = Command::new("unsquashfs")
        .arg("-cat")
        .arg(root)
        .arg(format!("usr/share/tsunagi/{name}"))
        .output()
        .context("run unsquashfs -cat")?;
    ensure!(
        !want.is_empty() && got.stdout == want,
        "the image's usr/share/tsunagi/{name} is not KEYS/{name}"
    );
    Ok(())
}

/// The image's RAUC bundle verifies against the update CA (`rauc info --keyring`), for
/// compatible `tsunagi` and `version`; a copy with one byte changed does not. Returns what
/// `rauc info` said of it.
pub(crate) fn check_bundle(bundle: &Path, keys: &Path, version: &str) -> anyhow::Result<String> {
    let info = |path: &Path| {
        Command::new("rauc")
            .arg("info")
            .arg(format!("--keyring={}", keys.join("ca.cert.pem").display()))
            .arg("--output-format=shell")
            .arg(path)
            .output()
            .context("run rauc info")
    };
    let out = info(bundle)?;
    ensure!(
        out.status.success(),
        "rauc info refused {}: {}",
        bundle.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for (key, want) in [
        ("RAUC_MF_COMPATIBLE", "tsunagi"),
        ("RAUC_MF_VERSION", version),
        ("RAUC_IMAGE_CLASS_0", "rootfs"),
        ("RAUC_IMAGE_HOOKS_0", "post-install"),
        ("RAUC_IMAGE_CLASS_1", "verity"),
    ] {
        ensure!(
            text.lines()
                .any(|l| l == format!("{key}='{want}'") || l == format!("{key}={want}")),
            "the bundle's {key} is not {want}: {text}"
        );
    }
    // The same bundle with one byte of its signature changed is refused (the payload is
    // checked block by block by dm-verity when installed, against the signed root hash).
    let dir = tempfile::tempdir()?;
    let tampered = dir.path().join("tampered.raucb");
    let mut bytes = fs::read(bundle)?;
    let at = bytes.len().saturating_sub(64);
    bytes[at] ^= 0x01;
    fs::write(&tampered, &bytes)?;
    let refused = info(&tampered)?;
    ensure!(
        !refused.status.success(),
        "rauc info took a bundle whose signature was changed"
    );
    Ok(format!(
        "{} ({:.0} MiB): signed by the update key, compatible tsunagi, version {version}, the root (with the hook that puts its UKI on the ESP) and its hash tree; a changed signature is refused",
        bundle.display(),
        fs::metadata(bundle)?.len() as f64 / 1048576.0
    ))
}

/// The highest `systemd-analyze security` exposure a unit of ours may have, in its tenths
/// (the supervisor's unit is at 3.7 of 10, without a sandbox it would be 9.6; the SS-MIX2
/// share mount's, which may have no mount or network namespace, at 3.9).
const SANDBOX_THRESHOLD: u32 = 45;

/// Rates the image's own unit `name` with `systemd-analyze security --offline`; an error
/// if its exposure is above [`SANDBOX_THRESHOLD`]. Returns systemd's verdict line.
fn check_sandbox(root: &Path, dir: &Path, name: &str) -> anyhow::Result<String> {
    let unit = Command::new("unsquashfs")
        .arg("-cat")
        .arg(root)
        .arg(format!("usr/lib/systemd/system/{name}"))
        .output()
        .context("run unsquashfs -cat")?;
    ensure!(
        unit.status.success() && !unit.stdout.is_empty(),
        "the image has no usr/lib/systemd/system/{name}"
    );
    let path = dir.join(name);
    fs::write(&path, &unit.stdout)?;
    rate_unit(&path)
}

/// `systemd-analyze security --offline` of the unit file `path` against
/// [`SANDBOX_THRESHOLD`].
fn rate_unit(path: &Path) -> anyhow::Result<String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={SANDBOX_THRESHOLD}"))
        .arg(path)
        .output()
        .context("run systemd-analyze security")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let verdict = text
        .lines()
        .find_map(|l| l.split_once(&format!("Overall exposure level for {name}: ")))
        .map(|(_, v)| v.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    ensure!(
        out.status.success() && !verdict.is_empty(),
        "the sandbox of {name} is weaker than allowed (exposure above {}.{}): {verdict}{}",
        SANDBOX_THRESHOLD / 10,
        SANDBOX_THRESHOLD % 10,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(format!(
        "exposure {verdict} (systemd-analyze security; at most {}.{})",
        SANDBOX_THRESHOLD / 10,
        SANDBOX_THRESHOLD % 10
    ))
}

/// SHA-256 over the generator's name, every file under `dir` (path and content, in path
/// order), the binary and the public halves of the keys.
fn input_hash(dir: &Path, binary: &Path, keys: &Path, version: &str) -> anyhow::Result<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    h.update(GENERATOR.as_bytes());
    for f in &files {
        h.update(
            f.strip_prefix(dir)
                .unwrap_or(f)
                .to_string_lossy()
                .as_bytes(),
        );
        h.update([0]);
        h.update(fs::read(f).with_context(|| format!("read {}", f.display()))?);
    }
    h.update(fs::read(binary).with_context(|| format!("read {}", binary.display()))?);
    for public in [
        "db.crt",
        "ca.cert.pem",
        "update.cert.pem",
        "provisioning.pub",
        "update-root.json",
    ] {
        h.update(fs::read(keys.join(public)).unwrap_or_default());
    }
    h.update(version.as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn commit_time(root: &Path) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output()
        .context("run git log")?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        out.status.success() && !t.is_empty(),
        "no commit time (set SOURCE_DATE_EPOCH)"
    );
    Ok(t)
}

/// The root A partition of `raw` copied into `dir/root-a.img` (found by its GPT name).
fn root_partition(raw: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let (start, size) = hil_tests::qemu::partition(raw, "root-a")?;
    fs::create_dir_all(dir)?;
    let path = dir.join("root-a.img");
    let mut src = fs::File::open(raw)?;
    src.seek(SeekFrom::Start(start))?;
    let mut dst = fs::File::create(&path)?;
    std::io::copy(&mut src.take(size), &mut dst)?;
    Ok(path)
}

/// What in the image's root (`root`: its squashfs) would let someone log in, or change it
/// at run time.
fn check_no_login(root: &Path) -> anyhow::Result<Vec<String>> {
    let listing = Command::new("unsquashfs")
        .args(["-lls", "-d", ""])
        .arg(root)
        .output()
        .context("run unsquashfs (Debian package squashfs-tools)")?;
    ensure!(
        listing.status.success(),
        "unsquashfs -lls failed: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let text = String::from_utf8_lossy(&listing.stdout).into_owned();
    let shadow = Command::new("unsquashfs")
        .arg("-cat")
        .arg(root)
        .arg("etc/shadow")
        .output()
        .context("run unsquashfs -cat")?;
    Ok(login_problems(
        &text,
        &String::from_utf8_lossy(&shadow.stdout),
    ))
}

/// The problems in an `unsquashfs -lls` listing and the image's `/etc/shadow`.
fn login_problems(listing: &str, shadow: &str) -> Vec<String> {
    let mut problems = Vec::new();
    // path → the rest of its line (a symlink shows "-> TARGET").
    let entries: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let i = l.find(" /")?;
            let rest = &l[i + 1..];
            Some(match rest.split_once(" -> ") {
                Some((p, t)) => (p, t),
                None => (rest, ""),
            })
        })
        .collect();
    let exists = |p: &str| entries.iter().any(|(path, _)| *path == p);
    for program in [
        "/usr/sbin/sshd",
        "/usr/bin/login",
        "/bin/login",
        "/usr/sbin/agetty",
        "/sbin/agetty",
        "/usr/sbin/sulogin",
        "/sbin/sulogin",
        "/usr/bin/su",
        "/usr/bin/sudo",
        "/usr/bin/apt",
        "/usr/bin/apt-get",
        "/usr/bin/dpkg",
        "/usr/bin/gcc",
        "/usr/bin/cc",
    ] {
        if exists(program) {
            problems.push(format!("{program} is in the image"));
        }
    }
    for unit in [
        "getty@.service",
        "serial-getty@.service",
        "console-getty.service",
        "container-getty@.service",
        "autovt@.service",
        "emergency.service",
        "rescue.service",
        "debug-shell.service",
    ] {
        let mask = format!("/etc/systemd/system/{unit}");
        if !entries
            .iter()
            .any(|(p, t)| *p == mask && t.trim() == "/dev/null")
        {
            problems.push(format!("{unit} is not masked"));
        }
    }
    if entries
        .iter()
        .any(|(p, _)| p.starts_with("/etc/systemd/system/getty.target.wants/") && p.len() > 40)
    {
        problems.push("a getty is enabled (getty.target.wants)".into());
    }
    if shadow.trim().is_empty() {
        problems.push("/etc/shadow is missing or empty".into());
    }
    for line in shadow.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split(':');
        let (user, password) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        if !(password.starts_with('!') || password.starts_with('*')) {
            problems.push(format!("account {user} can log in with a password"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::login_problems;

    const MASKS: &str =
        "lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/getty@.service -> /dev/null
lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/serial-getty@.service -> /dev/null
lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/console-getty.service -> /dev/null
lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/container-getty@.service -> /dev/null
lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/autovt@.service -> /dev/null
lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/emergency.service -> /dev/null
lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/rescue.service -> /dev/null
lrwxrwxrwx root/root 9 2026-01-01 00:00 /etc/systemd/system/debug-shell.service -> /dev/null
";

    #[test]
    fn the_shipped_unit_is_sandboxed_and_an_unsandboxed_one_fails() {
        let overlay = crate::workspace_root().join("image/overlay/usr/lib/systemd/system");
        for unit in ["tsunagi.service", "tsunagi-share.service"] {
            let verdict = super::rate_unit(&overlay.join(unit)).unwrap();
            assert!(
                verdict.starts_with("exposure ") && verdict.contains(" OK "),
                "{unit}: {verdict}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("tsunagi.service");
        std::fs::write(
            &bare,
            "[Service]\nType=notify\nExecStart=/usr/bin/tsunagi run\n",
        )
        .unwrap();
        let error = super::rate_unit(&bare).unwrap_err().to_string();
        assert!(error.contains("weaker than allowed"), "{error}");
    }

    #[test]
    fn a_locked_image_passes_and_each_way_in_is_named() {
        let shadow = "root:!*:20000:0:99999:7:::\ntsunagi-dicom:!:20000::::::\n";
        assert_eq!(login_problems(MASKS, shadow), Vec::<String>::new());
        let with_sshd = format!("{MASKS}-rwxr-xr-x root/root 1 2026-01-01 00:00 /usr/sbin/sshd\n");
        assert_eq!(
            login_problems(&with_sshd, shadow),
            ["/usr/sbin/sshd is in the image"]
        );
        let unmasked = MASKS.replace(
            "/etc/systemd/system/serial-getty@.service -> /dev/null",
            "/etc/systemd/system/serial-getty@.service -> /lib/systemd/system/serial-getty@.service",
        );
        assert_eq!(
            login_problems(&unmasked, shadow),
            ["serial-getty@.service is not masked"]
        );
        assert_eq!(
            login_problems(MASKS, "root:$6$salt$hash:20000:0:99999:7:::\n"),
            ["account root can log in with a password"]
        );
        assert_eq!(
            login_problems(MASKS, ""),
            ["/etc/shadow is missing or empty"]
        );
    }
}
