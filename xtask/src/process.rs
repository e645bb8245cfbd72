//! Small helpers for running child processes.

use std::ffi::OsString;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::Context as _;

use crate::workspace_root;

/// The cargo that runs us (`$CARGO`, set by `cargo run`), so nested commands use the same
/// toolchain; plain `cargo` otherwise.
///
/// Without incremental compilation unless the caller's environment asks for it: xtask's
/// builds are whole-workspace runs (CI's among them), where the incremental caches only
/// cost disk (3.7 GiB of a CI run's 9 GiB `target/debug`, enough to fill a small CI disk).
pub(crate) fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(workspace_root());
    if std::env::var_os("CARGO_INCREMENTAL").is_none() {
        command.env("CARGO_INCREMENTAL", "0");
    }
    command
}

/// A command line for messages.
pub(crate) fn display(command: &Command) -> String {
    let program = command.get_program().to_string_lossy();
    // Show `cargo`, not the toolchain path `$CARGO` points to.
    let program = if command.get_program() == std::env::var_os("CARGO").unwrap_or_default() {
        "cargo".into()
    } else {
        program
    };
    std::iter::once(program)
        .chain(command.get_args().map(|a| a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` with inherited stdio and returns its status.
pub(crate) fn status(command: &mut Command) -> anyhow::Result<ExitStatus> {
    command
        .status()
        .with_context(|| format!("failed to run `{}`", display(command)))
}

/// Runs `command` with output discarded; true if it ran and exited 0.
pub(crate) fn succeeds_quietly(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The exit code a shell would report for `status`: the code, or 128 + signal number.
pub(crate) fn exit_code_of(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal));
    code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1)
}
