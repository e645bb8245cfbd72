//! The replica's storage: a trait with two transports, a local or mounted directory
//! ([`DirReplica`]) and HTTPS WebDAV ([`crate::webdav::WebDavReplica`]).
//!
//! **Invariant:** a file is never visible under its final name unless it is complete. `put`
//! writes a temporary name in the same folder (`.NAME.tsunagi-part`, the same one every
//! time for the same final name, so a retry after a crash overwrites it), then renames it
//! into place (a WebDAV `MOVE`). Every operation is idempotent, so the service can replay
//! its outbox after a crash at any point.
//!
//! The directory transport makes every step durable before it returns: the file's data
//! before its rename, and the directory entry of every folder it creates, every rename
//! (both folders) and every removal, so a power cut after an operation returned never
//! takes it back. Its files are mode 0640 and its folders 0750 (less where the umask says
//! so): the paths and the contents name patients, so nothing is world-readable; a reader
//! of the replica (the hub's export, a web server) reads through the owner or the group.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The mode of the directory replica's files (before the umask): owner and group read,
/// no one else.
pub const FILE_MODE: u32 = 0o640;
/// The mode of the folders the directory replica creates (before the umask).
pub const DIR_MODE: u32 = 0o750;

/// A `/`-separated path relative to the replica's root: no empty, `.` or `..` components,
/// no leading `/`, no NUL or control characters, components of at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);

/// Why a relative path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a relative path inside the replica")]
pub struct BadPath(pub String);

impl RelPath {
    pub fn new(path: &str) -> Result<RelPath, BadPath> {
        let ok = !path.is_empty()
            && path.split('/').all(|c| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.len() <= 255
                    && !c.chars().any(char::is_control)
            });
        if ok {
            Ok(RelPath(path.to_owned()))
        } else {
            Err(BadPath(path.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The folder part (`None` at the top level).
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(p, _)| p)
    }

    /// The temporary name `put` writes before renaming into place.
    pub fn part_name(&self) -> RelPath {
        let name = format!(".{}.tsunagi-part", self.file_name());
        match self.parent() {
            Some(p) => RelPath(format!("{p}/{name}")),
            None => RelPath(name),
        }
    }

    /// Whether a name is a temporary of `put` (never a final file).
    pub fn is_part_name(name: &str) -> bool {
        name.starts_with('.') && name.ends_with(".tsunagi-part")
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A transport failure; every one is retried with backoff. Messages never name the file:
/// replica paths contain patient IDs, and errors reach logs and `tsunagi status` (the path
/// stays in the value for the program).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("the replica directory {path} cannot be used")]
    Root {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("replica I/O failed")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the replica server answered {status} to {method}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
    },
    #[error("cannot reach the replica server")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The TLS handshake was refused (by the box or by the server), with the reason.
    #[error("TLS with the replica server failed: {0}")]
    TlsRefused(String),
    #[error("replica TLS setup failed")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where the replica is written. Blocking: the service calls it from a blocking task.
pub trait Replica: Send {
    /// Writes `bytes` at `path`, complete or not at all (temporary name, then rename),
    /// creating folders and replacing an existing file.
    fn put(&mut self, path: &RelPath, bytes: &[u8]) -> Result<(), ReplicaError>;
    /// Renames `from` to `to`, replacing `to`. `Ok(false)`: `from` does not exist (already
    /// renamed by an earlier attempt, or never written).
    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<bool, ReplicaError>;
    /// Removes a file; a missing file is not an error.
    fn delete(&mut self, path: &RelPath) -> Result<(), ReplicaError>;
    /// The size of a file, or `None` if it does not exist.
    fn stat(&mut self, path: &RelPath) -> Result<Option<u64>, ReplicaError>;
}

/// A replica in a local or mounted directory (NFS, SMB, a disk).
#[derive(Debug, Clone)]
pub struct DirReplica {
    root: PathBuf,
}

impl DirReplica {
    /// A replica rooted at `root`, which must exist.
    pub fn new(root: &Path) -> Result<DirReplica, ReplicaError> {
        let md = fs::metadata(root).map_err(|source| ReplicaError::Root {
            path: root.display().to_string(),
            source,
        })?;
        if !md.is_dir() {
            return Err(ReplicaError::Root {
                path: root.display().to_string(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(DirReplica {
            root: root.to_owned(),
        })
    }

    fn abs(&self, p: &RelPath) -> PathBuf {
        let mut out = self.root.clone();
        out.extend(p.components());
        out
    }
}

fn io_err(path: &RelPath) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io {
        path: path.to_string(),
        source,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl DirReplica {
    /// Creates the folders down to `dir` (mode [`DIR_MODE`]), each one durable: a new
    /// folder's entry is synced in its parent.
    fn create_dirs(&self, dir: &Path) -> io::Result<()> {
        if dir == self.root || dir.is_dir() {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or(&self.root);
        self.create_dirs(parent)?;
        match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
            Ok(()) => sync_dir(parent),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Writes `bytes` to `part` (created mode [`FILE_MODE`], or truncated; a part left by an
/// older version loses any world permission) and syncs them.
fn write_part(part: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(part)?;
    let mode = f.metadata()?.permissions().mode() & 0o7777;
    if mode & !FILE_MODE != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode & FILE_MODE))?;
    }
    f.write_all(bytes)?;
    f.sync_all()
}

impl Replica for DirReplica {
    fn put(&mut self, path: &RelPath, bytes: &[u8]) -> Result<(), ReplicaError> {
        let target = self.abs(path);
        let part = self.abs(&path.part_name());
        let dir = target.parent().unwrap_or(&self.root).to_owned();
        self.create_dirs(&dir).map_err(io_err(path))?;
        write_part(&part, bytes).map_err(io_err(path))?;
        fs::rename(&part, &target).map_err(io_err(path))?;
        sync_dir(&dir).map_err(io_err(path))
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<bool, ReplicaError> {
        let (a, b) = (self.abs(from), self.abs(to));
        let to_dir = b.parent().unwrap_or(&self.root).to_owned();
        let from_dir = a.parent().unwrap_or(&self.root).to_owned();
        self.create_dirs(&to_dir).map_err(io_err(to))?;
        match fs::rename(&a, &b) {
            Ok(()) => {
                sync_dir(&to_dir).map_err(io_err(to))?;
                if from_dir != to_dir {
                    sync_dir(&from_dir).map_err(io_err(from))?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(from)(e)),
        }
    }

    fn delete(&mut self, path: &RelPath) -> Result<(), ReplicaError> {
        let file = self.abs(path);
        match fs::remove_file(&file) {
            Ok(()) => sync_dir(file.parent().unwrap_or(&self.root)).map_err(io_err(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    fn stat(&mut self, path: &RelPath) -> Result<Option<u64>, ReplicaError> {
        match fs::symlink_metadata(self.abs(path)) {
            Ok(md) => Ok(Some(md.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert!(RelPath::new("000/012/0000123456/-/ADT-00/x_1").is_ok());
        assert!(RelPath::new("a/^経過_記録^LN/b").is_ok());
        for bad in ["", "/a", "a/", "a//b", "a/../b", "./a", "a/\u{0}b", "a/\nb"] {
            assert!(RelPath::new(bad).is_err(), "{bad:?}");
        }
        let p = RelPath::new("a/b/name_1").unwrap();
        assert_eq!(p.part_name().as_str(), "a/b/.name_1.tsunagi-part");
        assert!(RelPath::is_part_name(p.part_name().file_name()));
    }

    #[test]
    fn dir_replica_operations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = DirReplica::new(dir.path()).unwrap();
        let a = RelPath::new("x/y/a_1").unwrap();
        let b = RelPath::new("x/y/a_2").unwrap();
        r.put(&a, b"one").unwrap();
        r.put(&a, b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("x/y/a_1")).unwrap(), b"two");
        assert_eq!(r.stat(&a).unwrap(), Some(3));
        assert!(r.rename(&a, &b).unwrap());
        assert!(!r.rename(&a, &b).unwrap(), "already renamed");
        r.delete(&b).unwrap();
        r.delete(&b).unwrap();
        assert_eq!(r.stat(&b).unwrap(), None);
        let names: Vec<_> = fs::read_dir(dir.path().join("x/y")).unwrap().collect();
        assert!(names.is_empty(), "no temporary left behind");
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn dir_replica_files_and_folders_are_not_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = DirReplica::new(dir.path()).unwrap();
        let a = RelPath::new("000/012/0001234/a_1").unwrap();
        r.put(&a, b"one").unwrap();
        let umask = {
            // What the umask leaves of a plain 0777 folder: the tests' umask, not ours.
            let probe = dir.path().join("probe");
            fs::create_dir(&probe).unwrap();
            0o777 & !mode(&probe)
        };
        assert_eq!(
            mode(&dir.path().join("000/012/0001234/a_1")),
            FILE_MODE & !umask
        );
        for folder in ["000", "000/012", "000/012/0001234"] {
            assert_eq!(
                mode(&dir.path().join(folder)),
                DIR_MODE & !umask,
                "{folder}"
            );
        }
        // Renamed into a new folder: the file keeps its mode, the new folder has the
        // folders' mode.
        let b = RelPath::new("000/013/0001234/a_1").unwrap();
        assert!(r.rename(&a, &b).unwrap());
        assert_eq!(
            mode(&dir.path().join("000/013/0001234/a_1")),
            FILE_MODE & !umask
        );
        assert_eq!(mode(&dir.path().join("000/013")), DIR_MODE & !umask);
    }

    #[test]
    fn a_world_readable_part_left_behind_is_not_published_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = DirReplica::new(dir.path()).unwrap();
        let a = RelPath::new("x/a_1").unwrap();
        fs::create_dir(dir.path().join("x")).unwrap();
        let part = dir.path().join("x/.a_1.tsunagi-part");
        fs::write(&part, b"stale, from an older version").unwrap();
        fs::set_permissions(&part, fs::Permissions::from_mode(0o666)).unwrap();
        r.put(&a, b"new").unwrap();
        let published = dir.path().join("x/a_1");
        assert_eq!(fs::read(&published).unwrap(), b"new");
        assert_eq!(mode(&published) & 0o007, 0, "{:o}", mode(&published));
        assert_eq!(mode(&published) & !FILE_MODE, 0, "{:o}", mode(&published));
    }
}
