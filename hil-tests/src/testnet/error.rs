//! Errors of the test network harness.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Why a test network operation failed.
///
/// Messages are lowercase and never repeat their source; print the whole chain with
/// [`error_chain`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestNetError {
    /// Not running as root: namespaces, veths and nftables need `CAP_NET_ADMIN` and
    /// `CAP_SYS_ADMIN`.
    #[error(
        "the test network needs root (network namespaces, veths, nftables); running as uid {uid}"
    )]
    NotRoot {
        /// The effective uid we run as.
        uid: u32,
    },
    /// `/dev/net/tun` is missing, so wireguard-go cannot create its interface.
    #[error("/dev/net/tun is missing: wireguard-go cannot create a TUN interface")]
    NoTun,
    /// A program the harness runs is not installed.
    #[error("`{program}` not found in PATH: install the Debian package `{package}`")]
    MissingTool {
        /// The program looked for.
        program: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The `testnet` binary of this crate (the hub's health server) was not found.
    #[error(
        "the `testnet` binary of hil-tests was not found (looked at {searched:?}): run \
         `cargo build -p hil-tests --bins` or set TSUNAGI_TESTNET_BIN"
    )]
    TestnetBinaryNotFound {
        /// The paths tried.
        searched: Vec<PathBuf>,
    },
    /// A caller passed a value the harness cannot use.
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidArgument {
        /// What the value is (a public key, an address...).
        what: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No unused id was found (each try collided with an existing set).
    #[error("no unused test network id after {attempts} attempts")]
    NoFreeId {
        /// How many ids were tried.
        attempts: u32,
    },
    /// A file system operation failed.
    #[error("failed to {action} `{}`", path.display())]
    Io {
        /// What we tried to do ("create", "read", "remove"...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A process could not be started.
    #[error("failed to start `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for a process failed.
    #[error("failed to wait for `{command}`")]
    Wait {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// Its standard error, trimmed and shortened.
        stderr: String,
    },
    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The time it had.
        timeout: Duration,
    },
    /// A process the harness started exited while it was being waited for.
    #[error("`{command}` (pid {pid}) exited during start-up ({status}); its log: {log_tail}")]
    ExitedEarly {
        /// The command line.
        command: String,
        /// Its pid.
        pid: u32,
        /// How it exited.
        status: ExitStatus,
        /// The end of its output.
        log_tail: String,
    },
    /// Something did not become ready in time.
    #[error("{what} was not ready within {timeout:?}")]
    NotReady {
        /// What was waited for.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A tool printed something the harness cannot parse.
    #[error("unexpected output from `{command}`: {detail}")]
    BadOutput {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// The public key is not a peer of the hub.
    #[error("peer {public_key} is not configured on the hub")]
    UnknownPeer {
        /// The peer's public key.
        public_key: String,
    },
    /// Signalling a process failed.
    #[error("failed to send {signal} to pid {pid}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The target.
        pid: u32,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// Teardown left something behind; each entry says what.
    #[error("teardown of test network {id} incomplete: {}", problems.join("; "))]
    Teardown {
        /// The set's id.
        id: String,
        /// What could not be removed or stopped.
        problems: Vec<String>,
    },
}

impl TestNetError {
    /// True if the machine cannot host a test network at all (not root, no TUN device).
    ///
    /// Tests skip on these, except under CI (see
    /// [`TestNet::up_for_test`](crate::testnet::TestNet::up_for_test)). A missing package is
    /// not one of them: `cargo xtask test` installs packages, so a missing one is a failure.
    pub fn is_environment(&self) -> bool {
        matches!(self, Self::NotRoot { .. } | Self::NoTun)
    }
}

/// Formats an error and its sources as `outer: cause: root cause`.
pub fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
