//! Handing the status socket from the supervisor to a child.
//!
//! The supervisor creates a socket pair with `SOCK_CLOEXEC`, clears the flag on the child's
//! end just before spawning, and names the descriptor in [`FD_ENV`]. All spawns happen on the
//! supervisor's single runtime thread, one at a time, and the parent closes its copy of the
//! child's end right after the spawn, so no other child can inherit it.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

/// The environment variable naming the inherited status descriptor.
pub const FD_ENV: &str = "TSUNAGI_STATUS_FD";
/// The environment variable naming the supervisor's pid (checked against `getppid`).
pub const SUPERVISOR_PID_ENV: &str = "TSUNAGI_SUPERVISOR_PID";

/// Errors while creating or adopting the status socket.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("cannot create the status socket pair")]
    SocketPair(#[source] nix::Error),
    #[error("cannot mark the status socket inheritable")]
    Inheritable(#[source] nix::Error),
    #[error("{FD_ENV} is not set: `tsunagi service` is started by `tsunagi run`, not by hand")]
    Missing,
    #[error("{FD_ENV} is not a descriptor number")]
    NotANumber,
    #[error("descriptor {fd} named by {FD_ENV} is not an open socket")]
    NotASocket { fd: RawFd },
    #[error("the status socket was already taken")]
    AlreadyTaken,
}

/// A socket pair: the supervisor's end and the end the child inherits.
pub fn pair() -> Result<(UnixStream, OwnedFd), FdError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(FdError::SocketPair)?;
    Ok((UnixStream::from(ours), theirs))
}

/// Clears `FD_CLOEXEC` on the child's end so that the next spawn inherits it.
pub fn make_inheritable(fd: &OwnedFd) -> Result<RawFd, FdError> {
    fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(FdError::Inheritable)?;
    Ok(fd.as_raw_fd())
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Adopts the inherited status socket named in [`FD_ENV`]. Succeeds at most once per process.
pub fn take_inherited() -> Result<UnixStream, FdError> {
    let value = std::env::var(FD_ENV).map_err(|_| FdError::Missing)?;
    let fd: RawFd = value.trim().parse().map_err(|_| FdError::NotANumber)?;
    if fd < 3 {
        return Err(FdError::NotASocket { fd });
    }
    // stat through /proc follows the descriptor to its open file; it fails when nothing is
    // open at that number.
    let meta =
        std::fs::metadata(format!("/proc/self/fd/{fd}")).map_err(|_| FdError::NotASocket { fd })?;
    if !meta.file_type().is_socket() {
        return Err(FdError::NotASocket { fd });
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(FdError::AlreadyTaken);
    }
    #[allow(unsafe_code)]
    // SAFETY: `fd` is open (fstat succeeded) and is a socket. It was inherited from the
    // supervisor for exactly this purpose and nothing else in this process knows its number;
    // the TAKEN flag guarantees ownership is taken only once, so no other OwnedFd aliases it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Mark it close-on-exec again so helpers the service spawns do not inherit it.
    fcntl(owned.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(FdError::Inheritable)?;
    Ok(UnixStream::from(owned))
}
