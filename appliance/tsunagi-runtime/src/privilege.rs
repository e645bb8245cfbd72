//! Privilege separation.
//!
//! Supervisor side ([`prepare`]): make sure the service's system user exists (the image
//! declares them for systemd-sysusers; elsewhere they are created with `useradd`) and that
//! its state directory exists, is owned by that user and has mode 0700.
//!
//! Child side ([`drop_to`]): while still root and single-threaded, shrink the capability
//! bounding set to the declared capabilities, switch to the service's uid/gid with no
//! supplementary groups, keep exactly the declared capabilities (permitted, effective,
//! inheritable and ambient, so a helper the service executes keeps them too) and set
//! `PR_SET_NO_NEW_PRIVS`. Capabilities are per thread: this must run before any thread is
//! started, which is why it is a plain function called before the tokio runtime is built.

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::prctl;
use nix::unistd::{Gid, Uid, User, chown, setgroups, setresgid, setresuid};

/// Errors while preparing or dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot look up user {user}")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("user {user} does not exist and could not be created: {detail}")]
    CreateUser { user: String, detail: String },
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set owner and mode of state directory {path}")]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot set mode of {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state directory {path} cannot be reached by service users: {blocker} has mode {mode:o} (it needs o+x)"
    )]
    Unreachable {
        path: PathBuf,
        blocker: PathBuf,
        mode: u32,
    },
    #[error("cannot {step} while dropping privileges")]
    Drop {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {step} while setting capabilities")]
    Caps {
        step: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("unknown capability name {name}")]
    UnknownCapability { name: String },
    #[error("group {group} does not exist and could not be created: {detail}")]
    CreateGroup { group: String, detail: String },
    #[error("cannot look up group {group}")]
    GroupLookup {
        group: String,
        #[source]
        source: nix::Error,
    },
}

/// The identity a service runs under when the supervisor is root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: Uid,
    pub gid: Gid,
}

/// Whether this process runs as root (and so separates privileges).
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// Parses capability names such as `CAP_NET_ADMIN`.
pub fn parse_capabilities<S: AsRef<str>>(names: &[S]) -> Result<Vec<Capability>, PrivilegeError> {
    names
        .iter()
        .map(|n| {
            n.as_ref()
                .parse::<Capability>()
                .map_err(|_| PrivilegeError::UnknownCapability {
                    name: n.as_ref().to_owned(),
                })
        })
        .collect()
}

/// Looks up `user`, creating it as a system user without a home or login shell if missing.
pub fn ensure_user(user: &str) -> Result<Identity, PrivilegeError> {
    // Concurrent `useradd`s (several supervisors in tests) can collide on /etc/passwd's lock
    // or on the name itself: re-check and retry a few times before giving up.
    let mut last_detail = String::new();
    for attempt in 0..10u32 {
        if let Some(found) = User::from_name(user).map_err(|source| PrivilegeError::Lookup {
            user: user.to_owned(),
            source,
        })? {
            return Ok(Identity {
                uid: found.uid,
                gid: found.gid,
            });
        }
        if attempt > 0 {
            // A blocking pause is acceptable here: this runs during a spawn, before any
            // service I/O, and only when the user is missing.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
        }
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "tsunagi service",
                user,
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => last_detail = String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => last_detail = format!("cannot run useradd ({e})"),
        }
    }
    Err(PrivilegeError::CreateUser {
        user: user.to_owned(),
        detail: last_detail,
    })
}

/// Looks up group `group`, creating it as a system group if missing.
pub fn ensure_group(group: &str) -> Result<Gid, PrivilegeError> {
    let mut last_detail = String::new();
    for attempt in 0..10u32 {
        if let Some(found) = lookup_group(group)? {
            return Ok(found);
        }
        if attempt > 0 {
            // As in `ensure_user`: only during a spawn, only when the group is missing.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
        }
        match Command::new("groupadd").args(["--system", group]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => last_detail = String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => last_detail = format!("cannot run groupadd ({e})"),
        }
    }
    Err(PrivilegeError::CreateGroup {
        group: group.to_owned(),
        detail: last_detail,
    })
}

/// The ID of an existing group.
pub fn lookup_group(group: &str) -> Result<Option<Gid>, PrivilegeError> {
    nix::unistd::Group::from_name(group)
        .map(|g| g.map(|g| g.gid))
        .map_err(|source| PrivilegeError::GroupLookup {
            group: group.to_owned(),
            source,
        })
}

/// Creates `dir` if needed, owned by `owner` and group `group`, mode 2750: the owner
/// writes, members of the group may enter (and connect to sockets of mode 0660 in it, which
/// inherit the group through the setgid bit), nobody else may. Without `group` (unprivileged
/// runs), as [`ensure_private_dir`].
pub fn ensure_group_dir(
    dir: &Path,
    owner: Option<Identity>,
    group: Option<Gid>,
) -> Result<(), PrivilegeError> {
    let Some(gid) = group else {
        return ensure_private_dir(dir, owner);
    };
    ensure_private_dir(dir, owner)?;
    chown(dir, None, Some(gid)).map_err(|source| PrivilegeError::Chown {
        path: dir.to_owned(),
        source,
    })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2750)).map_err(|source| {
        PrivilegeError::Chmod {
            path: dir.to_owned(),
            source,
        }
    })
}

/// Creates `dir` (and its parents) if needed, then sets owner and mode 0700.
pub fn ensure_private_dir(dir: &Path, owner: Option<Identity>) -> Result<(), PrivilegeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PrivilegeError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    if let Some(id) = owner {
        chown(dir, Some(id.uid), Some(id.gid)).map_err(|source| PrivilegeError::Chown {
            path: dir.to_owned(),
            source,
        })?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        PrivilegeError::Chmod {
            path: dir.to_owned(),
            source,
        }
    })
}

/// Lets `id`'s group read and write the device node `path`, unless everybody already may.
///
/// On a standard Debian system `/dev/net/tun` is 0666 and this does nothing; where it is
/// 0600 (some containers), the service's group becomes the device's group with mode 0660.
pub fn grant_device(path: &Path, id: Identity) -> Result<(), PrivilegeError> {
    let meta = std::fs::metadata(path).map_err(|source| PrivilegeError::Chmod {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o006 == 0o006 || (meta.gid() == id.gid.as_raw() && mode & 0o060 == 0o060) {
        return Ok(());
    }
    chown(path, None, Some(id.gid)).map_err(|source| PrivilegeError::Chown {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o060)).map_err(
        |source| PrivilegeError::Chmod {
            path: path.to_owned(),
            source,
        },
    )?;
    tracing::info!(device = %path.display(), gid = id.gid.as_raw(), "granted a service group access to a device");
    Ok(())
}

/// Creates a directory shared by the supervisor and its children (mode 0755, owned by the
/// supervisor's user) and checks that every ancestor lets other users through.
pub fn ensure_shared_dir(dir: &Path, check_reachable: bool) -> Result<(), PrivilegeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| PrivilegeError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        PrivilegeError::Chmod {
            path: dir.to_owned(),
            source,
        }
    })?;
    if check_reachable {
        for ancestor in dir.ancestors() {
            let Ok(meta) = std::fs::metadata(ancestor) else {
                continue;
            };
            if meta.mode() & 0o001 == 0 {
                return Err(PrivilegeError::Unreachable {
                    path: dir.to_owned(),
                    blocker: ancestor.to_owned(),
                    mode: meta.mode() & 0o7777,
                });
            }
        }
    }
    Ok(())
}

/// Drops this (single-threaded, root) process to `id` with exactly the supplementary
/// `groups`, keeping only `keep`, and sets
/// `NO_NEW_PRIVS`. Call before any thread exists.
pub fn drop_to(id: Identity, groups: &[Gid], keep: &[Capability]) -> Result<(), PrivilegeError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    let caps_err = |step| move |source| PrivilegeError::Caps { step, source };
    let nix_err = |step| move |source| PrivilegeError::Drop { step, source };

    // 1. The bounding set: nothing outside `keep` can ever come back, not even through exec.
    let supported: HashSet<Capability> = caps::runtime::thread_all_supported();
    for cap in supported.difference(&keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(caps_err("shrink the bounding set"))?;
    }
    // 2. Change identity, keeping the permitted set across setuid for step 3.
    prctl::set_keepcaps(true).map_err(nix_err("set keepcaps"))?;
    // Only the supplementary groups the service declares (e.g. access to another
    // service's socket), none inherited from the supervisor.
    setgroups(groups).map_err(nix_err("set the supplementary groups"))?;
    setresgid(id.gid, id.gid, id.gid).map_err(nix_err("set the group id"))?;
    setresuid(id.uid, id.uid, id.uid).map_err(nix_err("set the user id"))?;
    // 3. Exactly the declared capabilities, in every set that matters.
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("set the permitted set"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("set the effective set"))?;
    caps::set(None, CapSet::Inheritable, &keep).map_err(caps_err("set the inheritable set"))?;
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear the ambient set"))?;
    for cap in &keep {
        caps::raise(None, CapSet::Ambient, *cap)
            .map_err(caps_err("raise an ambient capability"))?;
    }
    prctl::set_keepcaps(false).map_err(nix_err("clear keepcaps"))?;
    set_no_new_privs()
}

/// Sets `PR_SET_NO_NEW_PRIVS` (also in unprivileged development runs).
pub fn set_no_new_privs() -> Result<(), PrivilegeError> {
    prctl::set_no_new_privs().map_err(|source| PrivilegeError::Drop {
        step: "set no_new_privs",
        source,
    })
}
