//! Noticing changes in the storage: inotify on local filesystems, nothing on network shares
//! (SMB and NFS deliver no inotify events; the periodic rescan covers them).
//!
//! inotify only *triggers* an early cycle; the index and the rescan decide what changed, so a
//! lost event (queue overflow, a watch limit) costs latency, never data.

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::statfs::statfs;
use tsunagi_config::WatchMode;

/// Filesystem types that deliver no inotify events for changes made by other hosts.
const NETWORK_FS: &[i64] = &[
    0x6969,                 // NFS
    0x517B,                 // SMB
    0xFF53_4D42_u32 as i64, // CIFS
    0xFE53_4D42_u32 as i64, // SMB2
    0x6573_5546,            // FUSE (sshfs and friends)
];

/// Whether `path` is on a network filesystem.
pub fn on_network_fs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| {
        #[allow(
            clippy::useless_conversion,
            reason = "f_type's width differs by architecture"
        )]
        let t = i64::from(s.filesystem_type().0);
        NETWORK_FS.contains(&t)
    })
}

/// Whether to use inotify for this storage under this mode.
pub fn use_inotify(mode: WatchMode, storage: &Path) -> bool {
    match mode {
        WatchMode::Poll => false,
        WatchMode::Inotify => true,
        WatchMode::Auto => !on_network_fs(storage),
    }
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ONLYDIR
}

fn add_tree(inotify: &Inotify, dir: &Path, watches: &mut usize) -> bool {
    if inotify.add_watch(dir, flags()).is_err() {
        // ENOSPC (fs.inotify.max_user_watches) or the folder vanished.
        return false;
    }
    *watches += 1;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return true;
    };
    let mut ok = true;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            ok &= add_tree(inotify, &e.path(), watches);
        }
    }
    ok
}

/// Watches `root` recursively on a thread of its own, sending `()` on every batch of events.
/// Returns the number of folders watched, or `None` if inotify is unavailable (the caller
/// then relies on the rescan).
pub fn spawn(root: &Path, trigger: Sender<()>) -> Option<usize> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
    let mut watches = 0;
    let complete = add_tree(&inotify, root, &mut watches);
    if !complete {
        tracing::warn!(
            watches,
            "not every folder could be watched (inotify limit); the periodic rescan covers the rest"
        );
    }
    let root: PathBuf = root.to_owned();
    std::thread::Builder::new()
        .name("ssmix2-inotify".into())
        .spawn(move || {
            let _ = inotify.as_fd();
            loop {
                let Ok(events) = inotify.read_events() else {
                    return;
                };
                for ev in &events {
                    if ev.mask.contains(AddWatchFlags::IN_ISDIR)
                        && ev.mask.contains(AddWatchFlags::IN_CREATE)
                    {
                        // A new folder: watch it (and anything created in it meanwhile). The
                        // event names it relative to a watch we cannot map back cheaply, so
                        // rewatch the tree; existing watches are reused by the kernel.
                        let mut n = 0;
                        add_tree(&inotify, &root, &mut n);
                    }
                }
                if trigger.send(()).is_err() {
                    return;
                }
            }
        })
        .ok()?;
    Some(watches)
}
