//! Noticing changes in the storage: inotify on local filesystems, nothing on network shares
//! (SMB and NFS deliver no inotify events; the periodic rescan covers them).
//!
//! Each watch is mapped to its folder, so a new folder is watched on its own (not by walking
//! the tree again). inotify only *triggers* an early cycle; the index and the rescan decide what changed, so a
//! lost event (queue overflow, a watch limit) costs latency, never data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
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

/// Watches `dir` and every folder below it, remembering which watch is which folder.
/// `false` if some folder could not be watched (ENOSPC: fs.inotify.max_user_watches).
fn add_tree(
    inotify: &Inotify,
    dir: &Path,
    folders: &mut HashMap<WatchDescriptor, PathBuf>,
) -> bool {
    let Ok(wd) = inotify.add_watch(dir, flags()) else {
        return false;
    };
    folders.insert(wd, dir.to_owned());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return true;
    };
    let mut ok = true;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            ok &= add_tree(inotify, &e.path(), folders);
        }
    }
    ok
}

/// Watches `root` recursively on a thread of its own, sending `()` on every batch of events.
/// Returns the number of folders watched, or `None` if inotify is unavailable (the caller
/// then relies on the rescan).
pub fn spawn(root: &Path, trigger: Sender<()>) -> Option<usize> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
    let mut folders = HashMap::new();
    if !add_tree(&inotify, root, &mut folders) {
        tracing::warn!(
            watches = folders.len(),
            "not every folder could be watched (inotify limit); the periodic rescan covers the rest"
        );
    }
    let watches = folders.len();
    std::thread::Builder::new()
        .name("ssmix2-inotify".into())
        .spawn(move || {
            loop {
                let Ok(events) = inotify.read_events() else {
                    return;
                };
                for ev in &events {
                    // A new folder: watch it and whatever was created in it meanwhile.
                    if ev
                        .mask
                        .contains(AddWatchFlags::IN_ISDIR | AddWatchFlags::IN_CREATE)
                        && let (Some(parent), Some(name)) = (folders.get(&ev.wd), &ev.name)
                    {
                        let dir = parent.join(name);
                        add_tree(&inotify, &dir, &mut folders);
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
