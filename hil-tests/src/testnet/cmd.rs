//! Running commands: inside a namespace, with a clean environment and a deadline.

use std::ffi::OsStr;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::error::TestNetError;

/// The only variable every command inside a namespace gets (plus the ones the caller set
/// explicitly). A clean environment keeps runs reproducible and avoids wireguard-go's
/// hangs with `LOG_LEVEL` / `WG_PROCESS_FOREGROUND` (vpn.md §1.6 #2).
pub(crate) const CLEAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Deadline for the harness's own `ip`/`wg`/`nft` calls.
pub(crate) const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a failed command's stderr goes into the error.
const STDERR_IN_ERROR: usize = 600;

/// The command line, for messages: `prog arg arg`.
pub(crate) fn display(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// `command` rewritten as `ip netns exec NS PROGRAM ARGS...`.
///
/// Keeps the program, its arguments, the variables it sets or removes explicitly and its
/// working directory. Everything else is fresh: the environment is cleared down to
/// [`CLEAN_PATH`] (a `Command` does not reveal whether `env_clear` was called, so every
/// command gets a clean one), and stdio is set by the caller. `ip netns exec` execs the
/// program, so the child's pid is the program's pid.
pub(crate) fn in_netns(ns: &str, command: &Command) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped.env_clear().env("PATH", CLEAN_PATH);
    wrapped
        .args(["netns", "exec", ns])
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// A command in the root namespace with a clean environment.
pub(crate) fn host_command<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut command = Command::new(program);
    command.env_clear().env("PATH", CLEAN_PATH).args(args);
    command
}

/// Runs `command` to completion with `stdin` as its input, capturing its output. Kills it
/// after `timeout`. Returns the output whatever the exit status.
pub(crate) fn output_with_timeout(
    command: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, TestNetError> {
    let line = display(command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| TestNetError::Spawn {
        command: line.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are a key or a short ruleset, far below the pipe buffer, so this cannot
        // block on a child that does not read. A child that exits early makes it fail,
        // which its exit status reports better.
        let _ = pipe.write_all(input);
    }
    let stdout = read_in_thread(child.stdout.take());
    let stderr = read_in_thread(child.stderr.take());
    let status = wait_with_timeout(child, &line, timeout)?;
    // The pipes close when the process exits, unless it left a child holding them; wait
    // for that only briefly.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(2)).ok();
    Ok(Output {
        status,
        stdout: stdout.and_then(collect).unwrap_or_default(),
        stderr: stderr.and_then(collect).unwrap_or_default(),
    })
}

/// [`output_with_timeout`], and a non-zero exit is an error carrying stderr.
pub(crate) fn run(
    command: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, TestNetError> {
    let output = output_with_timeout(command, stdin, timeout)?;
    if output.status.success() {
        return Ok(output);
    }
    Err(TestNetError::CommandFailed {
        command: display(command),
        status: output.status,
        stderr: shorten(
            String::from_utf8_lossy(&output.stderr).trim(),
            STDERR_IN_ERROR,
        ),
    })
}

/// Stdout of a successful [`run`] as trimmed text.
pub(crate) fn run_text(
    command: &mut Command,
    stdin: Option<&[u8]>,
) -> Result<String, TestNetError> {
    let output = run(command, stdin, TOOL_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn read_in_thread<R: Read + Send + 'static>(pipe: Option<R>) -> Option<mpsc::Receiver<Vec<u8>>> {
    let mut pipe = pipe?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = tx.send(bytes);
    });
    Some(rx)
}

/// Waits for `child`; after `timeout` kills it (by its pid) and reports a timeout.
fn wait_with_timeout(
    mut child: Child,
    line: &str,
    timeout: Duration,
) -> Result<std::process::ExitStatus, TestNetError> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let waited = match rx.recv_timeout(timeout) {
        Ok(waited) => waited,
        Err(RecvTimeoutError::Timeout) => {
            // The waiter thread has not reaped it yet, so the pid is still this child.
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
            let _ = rx.recv();
            return Err(TestNetError::Timeout {
                command: line.to_owned(),
                timeout,
            });
        }
        Err(RecvTimeoutError::Disconnected) => {
            return Err(TestNetError::Wait {
                command: line.to_owned(),
                source: std::io::Error::other("waiter thread vanished"),
            });
        }
    };
    waited.map_err(|source| TestNetError::Wait {
        command: line.to_owned(),
        source,
    })
}

/// At most `max` bytes of `text` (cut at a character boundary), marked when cut.
pub(crate) fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The last `max` bytes of `text` (cut at a character boundary), marked when cut.
pub(crate) fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// Stops a child the harness started: SIGTERM to its pid, up to `grace`, then SIGKILL (to
/// its process group when `group`, for a server that leads one), and reaps it.
pub(crate) fn stop_child(mut child: Child, grace: Duration, group: bool) -> std::io::Result<()> {
    if matches!(child.try_wait(), Ok(None)) {
        // Not reaped yet, so the pid (and, for a group leader, the group id) still names it.
        let pid = Pid::from_raw(
            i32::try_from(child.id()).map_err(|_| std::io::Error::other("pid out of range"))?,
        );
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            if group {
                let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
            } else {
                let _ = child.kill();
            }
        }
    }
    child.wait().map(drop)
}

/// Looks `program` up in [`CLEAN_PATH`], the PATH every harness command runs with.
pub(crate) fn find_in_clean_path(program: &str) -> Option<PathBuf> {
    CLEAN_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_in_netns_with_a_clean_environment() {
        let mut command = Command::new("wireguard-go");
        command.args(["-f", "tn000000hub"]).env("A", "1");
        let wrapped = in_netns("tn000000-hub", &command);
        assert_eq!(
            display(&wrapped),
            "ip netns exec tn000000-hub wireguard-go -f tn000000hub"
        );
        let envs: Vec<_> = wrapped.get_envs().collect();
        assert!(envs.contains(&(OsStr::new("PATH"), Some(OsStr::new(CLEAN_PATH)))));
        assert!(envs.contains(&(OsStr::new("A"), Some(OsStr::new("1")))));
    }

    #[test]
    fn output_and_failure_and_timeout() {
        let out = run_text(&mut host_command("cat", &[] as &[&str]), Some(b"hello\n")).unwrap();
        assert_eq!(out, "hello");

        let err = run(
            &mut host_command("sh", &["-c", "echo nope >&2; exit 3"]),
            None,
            TOOL_TIMEOUT,
        )
        .unwrap_err();
        assert!(
            matches!(&err, TestNetError::CommandFailed { stderr, .. } if stderr == "nope"),
            "{err:?}"
        );

        let err = run(
            &mut host_command("sleep", &["5"]),
            None,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(err, TestNetError::Timeout { .. }), "{err:?}");
    }

    #[test]
    fn shortens_at_char_boundaries() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("ééé", 3), "é...");
    }
}
