//! Work in a named network namespace (`/run/netns/NAME`) from the test process.
//!
//! `setns` with `CLONE_NEWNET` moves only the calling thread, so [`run_in`] runs the work
//! on a short-lived thread that joins the namespace first and ends with the work; the
//! test process itself stays where it is. Threads that work spawns are in the namespace
//! too (a new thread shares its creator's namespaces). The harnesses here (Orthanc,
//! nginx, Samba, the test network) and the DICOM benchmark's sender all use it.

use std::fs::File;
use std::io;
use std::path::Path;
use std::thread;

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Whether `name` is a plain namespace name: letters, digits and `._-`, not `.` or `..`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Opens the namespace `name` for [`run_in`]. A name that is not plain is refused
/// (`InvalidInput`) before any path is built from it.
pub fn open(name: &str) -> io::Result<File> {
    if !is_plain_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a namespace name (letters, digits, `._-`)"),
        ));
    }
    let path = Path::new(NETNS_DIR).join(name);
    File::open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open the network namespace {}: {e}", path.display()),
        )
    })
}

/// Runs `f` on a short-lived thread that first joins `netns` (see the module docs). A
/// panic in `f` is resumed here.
pub fn run_in<T: Send>(netns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let joined = thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(netns, CloneFlags::CLONE_NEWNET).map_err(|errno| {
                    let e = io::Error::from(errno);
                    io::Error::new(e.kind(), format!("cannot join the network namespace: {e}"))
                })?;
                Ok(f())
            })
            .join()
    });
    joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_opened() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "名前"] {
            let e = open(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(is_plain_name("tsu-pacs-1_2.x"));
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let e = open("tsunagi-no-such-namespace").unwrap_err();
        assert!(
            e.to_string()
                .contains("/run/netns/tsunagi-no-such-namespace"),
            "{e}"
        );
    }
}
