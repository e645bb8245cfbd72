//! The clinic's SS-MIX2 storage on the EMR server's SMB share (`[ssmix2.share]`).
//!
//! The kernel's SMB client mounts the share read-only at the storage path, owned by the
//! sync's user (files 0440, folders 0550), without devices, set-uid or execution. Mounting
//! needs `CAP_SYS_ADMIN`, which neither the supervisor nor the sync holds: the image runs
//! [`mount`] in its own unit (`tsunagi-share.service`, `tsunagi ssmix2 mount`), which
//! retries until the server answers. The sync, unprivileged, reads nothing while
//! [`mounted`] is false, so an unmounted share is never taken for an empty storage
//! (whose files would then be withdrawn from the hub).

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use tsunagi_config::Ssmix2Share;

/// Why the share could not be mounted. Never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot read the password file {path}")]
    Password {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the password file {path} is empty")]
    EmptyPassword { path: String },
    #[error(
        "the password file {path} is readable or writable by group or others (mode {mode:04o}): chmod 600 it"
    )]
    PasswordMode { path: String, mode: u32 },
    #[error("cannot create the mount point {path}")]
    MountPoint {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {unc} at {path}: {reason}")]
    Mount {
        unc: String,
        path: String,
        reason: String,
        #[source]
        source: Errno,
    },
}

/// What [`mount`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    /// The share was mounted now.
    Now,
    /// A working mount of an SMB share was there already.
    Already,
    /// A mount that no longer answered was detached and the share mounted again.
    Again,
}

/// Whether `storage` is on a mounted SMB share (or another network filesystem): what the
/// sync requires before it reads a storage configured as a share.
pub fn mounted(storage: &Path) -> bool {
    crate::watcher::on_network_fs(storage)
}

/// The kernel client's options for `share`, read by `uid`/`gid`, with `password` (escaped:
/// a comma is doubled, as the kernel's option parser expects). The result holds the
/// password: it is passed to `mount(2)` and never printed.
pub fn options(share: &Ssmix2Share, uid: u32, gid: u32, password: &str) -> String {
    let mut out = format!(
        "vers={},username={}",
        share.version.mount_option(),
        share.username
    );
    if let Some(domain) = &share.domain {
        out.push_str(",domain=");
        out.push_str(domain.as_str());
    }
    // Owned by the sync's user whatever the server says; read-only for it, nothing for
    // others. `actimeo=1`: the settle delay judges files by their modification time, so
    // attributes are not cached for long. No byte-range locks are ever asked for (`nobrl`).
    out.push_str(&format!(
        ",uid={uid},gid={gid},forceuid,forcegid,file_mode=0440,dir_mode=0550,actimeo=1,nobrl,password="
    ));
    out.push_str(&password.replace(',', ",,"));
    out
}

/// Reads the password from `file`: its first line (a trailing newline is not part of it).
/// The file must be a regular file no one but its owner may read or write (mode 0600).
pub fn read_password(file: &Path) -> Result<String, ShareError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let path = file.display().to_string();
    let failed = |source| ShareError::Password {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::File::open(file).map_err(failed)?;
    let meta = f.metadata().map_err(failed)?;
    if !meta.is_file() {
        return Err(failed(std::io::Error::other("not a regular file")));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ShareError::PasswordMode { path, mode });
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(failed)?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(ShareError::EmptyPassword { path });
    }
    Ok(password.to_owned())
}

/// Mounts `share` read-only at `storage` for `uid`/`gid`, unless a working SMB mount is
/// there already. A mount that no longer answers (the server was replaced, its address
/// changed) is detached first.
pub fn mount(
    share: &Ssmix2Share,
    storage: &Path,
    uid: u32,
    gid: u32,
) -> Result<Mounted, ShareError> {
    let path = storage.display().to_string();
    let mut again = false;
    if mounted(storage) {
        if std::fs::read_dir(storage).is_ok() {
            return Ok(Mounted::Already);
        }
        // Lazily: whatever still holds it open keeps its view; new opens see the new mount.
        let _ = nix::mount::umount2(storage, MntFlags::MNT_DETACH);
        again = true;
    }
    std::fs::create_dir_all(storage).map_err(|source| ShareError::MountPoint {
        path: path.clone(),
        source,
    })?;
    let password = read_password(share.password_file.as_path())?;
    let data = options(share, uid, gid, &password);
    let unc = share.unc();
    nix::mount::mount(
        Some(unc.as_str()),
        storage,
        Some("cifs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(|source| ShareError::Mount {
        unc,
        path,
        reason: reason(source).to_owned(),
        source,
    })?;
    Ok(if again { Mounted::Again } else { Mounted::Now })
}

/// A reason for a person, from the kernel client's error.
fn reason(e: Errno) -> &'static str {
    match e {
        Errno::EACCES | Errno::EPERM | Errno::EKEYREJECTED => {
            "the server refused the account (user name, domain or password), or this process may not mount"
        }
        Errno::ENOENT => "the server has no such share",
        Errno::EHOSTUNREACH | Errno::EHOSTDOWN | Errno::ENETUNREACH => {
            "the server cannot be reached"
        }
        Errno::ECONNREFUSED => "the server refused the connection (no SMB service on port 445)",
        Errno::ETIMEDOUT => "the server did not answer in time",
        Errno::EOPNOTSUPP | Errno::EPROTONOSUPPORT => {
            "the server does not speak the SMB version configured (ssmix2.share.version)"
        }
        Errno::ENODEV => "this kernel has no SMB client (the cifs module)",
        _ => "the kernel's SMB client refused the mount",
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn share(toml: &str) -> Ssmix2Share {
        let text = format!(
            "version = 1\n[site]\nfacility-code = \"1311234567\"\nae-title = \"T\"\n[paths]\nstate-dir = \"/var/lib/tsunagi\"\nruntime-dir = \"/run/tsunagi\"\n[ssmix2]\nstorage = \"/run/s\"\n[ssmix2.share]\naddress = \"192.168.50.10\"\nshare = \"ssmix2\"\npassword-file = \"/p\"\n{toml}[ssmix2.replica]\ndirectory = \"/srv/r\"\n"
        );
        tsunagi_config::parse(&text, Path::new("t.toml"))
            .unwrap()
            .ssmix2
            .unwrap()
            .share
            .unwrap()
    }

    #[test]
    fn the_options_map_every_file_to_the_sync_user_read_only_and_escape_the_password() {
        let s = share("username = \"emr-reader\"\ndomain = \"CLINIC\"\nversion = \"3.1.1\"\n");
        assert_eq!(
            options(&s, 991, 992, "pa,ss=word"),
            "vers=3.1.1,username=emr-reader,domain=CLINIC,uid=991,gid=992,forceuid,forcegid,file_mode=0440,dir_mode=0550,actimeo=1,nobrl,password=pa,,ss=word"
        );
        let s = share("username = \"u\"\n");
        let o = options(&s, 1, 2, "p");
        assert!(o.starts_with("vers=3,username=u,uid=1,"), "{o}");
        assert!(!o.contains("domain"), "{o}");
    }

    #[test]
    fn the_password_is_the_first_line_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p");
        std::fs::write(&f, "").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (text, want) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3 cret", "s3 cret"),
        ] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(read_password(&f).unwrap(), want);
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_password(&f).unwrap_err().to_string();
        assert!(e.contains("mode 0640") && !e.contains("s3"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "\n").unwrap();
        let e = read_password(&f).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = read_password(&dir.path().join("none")).unwrap_err();
        assert!(matches!(e, ShareError::Password { .. }));
    }

    #[test]
    fn a_local_directory_is_not_a_mounted_share() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!mounted(dir.path()));
        assert!(!mounted(&dir.path().join("missing")));
    }

    #[test]
    fn a_mount_that_fails_says_why_without_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut s = share("username = \"u\"\n");
        s.password_file = tsunagi_config::SecretFile::try_from(pw.display().to_string()).unwrap();
        // Loopback only (tests use no other address): no SMB client in a test machine's
        // kernel, no server on port 445, or (not root) no right to mount. Each one is an
        // error naming the share and the path.
        s.address = std::net::Ipv4Addr::LOCALHOST.into();
        let e = mount(&s, &dir.path().join("mnt"), 1, 1).unwrap_err();
        let text = format!("{e}");
        assert!(
            text.starts_with("cannot mount //127.0.0.1/ssmix2 at "),
            "{text}"
        );
        assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
        assert!(dir.path().join("mnt").is_dir());
    }
}
