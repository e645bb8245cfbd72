//! Bookkeeping in `/run/tsunagi-testnet` and removal of sets (own or stale).
//!
//! Per live set `<id>`:
//! - `<id>.pid`: the owner, `PID STARTTIME` (start time from `/proc/PID/stat`, so a reused
//!   pid does not keep a dead owner's set alive). Written first (it claims the id) and
//!   removed last.
//! - `<id>/`: state directory: `pids` (every process the harness started, `PID STARTTIME
//!   LABEL` per line) and one log file per process.
//!
//! A set is stale when its owner is no longer alive. Removing it kills the processes listed
//! in `pids` that are still the same processes, deletes the namespaces `<id>-{hub,box,clinic}`,
//! the WireGuard sockets `/var/run/wireguard/<id>*.sock`, the state directory and the pid file.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::cmd::{TOOL_TIMEOUT, host_command, run};
use super::error::TestNetError;
use super::plan::Host;

/// Where the harness keeps its bookkeeping.
pub(crate) const RUN_DIR: &str = "/run/tsunagi-testnet";
/// Where wireguard-go puts its control sockets (shared by all namespaces).
pub(crate) const WG_RUN_DIR: &str = "/var/run/wireguard";
/// Where `ip netns` keeps its named namespaces.
pub(crate) use crate::netns::NETNS_DIR;

/// How long a process gets between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(3);

/// Whether `id` has the shape of a harness id (`tn` + 6 lowercase hex digits). Cleanup
/// touches nothing else.
pub(crate) fn is_set_id(id: &str) -> bool {
    id.len() == 8
        && id.starts_with("tn")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn pid_file(id: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{id}.pid"))
}

pub(crate) fn state_dir(id: &str) -> PathBuf {
    Path::new(RUN_DIR).join(id)
}

pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TestNetError {
    let path = path.to_owned();
    move |source| TestNetError::Io {
        action,
        path,
        source,
    }
}

/// An exclusive lock on the run directory, held while scanning for stale sets and claiming
/// an id, so two processes never clean the same set or claim the same id. Released when
/// dropped (or when the process dies).
pub(crate) fn lock_run_dir() -> Result<Flock<File>, TestNetError> {
    fs::create_dir_all(RUN_DIR).map_err(io_err("create", Path::new(RUN_DIR)))?;
    let path = Path::new(RUN_DIR).join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("open", &path))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| TestNetError::Io {
        action: "lock",
        path,
        source: errno.into(),
    })
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot), or `None` if the
/// process does not exist or is a zombie.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces; fields after it
    // start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The owner record of the current process: `PID STARTTIME`.
pub(crate) fn owner_record() -> String {
    let pid = std::process::id();
    match process_start_time(pid) {
        Some(start) => format!("{pid} {start}\n"),
        None => format!("{pid}\n"),
    }
}

/// Whether the process a `PID [STARTTIME]` record names still runs.
fn record_alive(record: &str) -> bool {
    let mut fields = record.split_whitespace();
    let Some(Ok(pid)) = fields.next().map(str::parse::<u32>) else {
        // Unreadable: treat as dead, the set is ours to clean (the id pattern matched).
        return false;
    };
    let expected_start = fields.next().and_then(|s| s.parse::<u64>().ok());
    match (process_start_time(pid), expected_start) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(actual), Some(expected)) => actual == expected,
    }
}

/// Claims `id` by creating its pid file exclusively. `Ok(false)` if it is taken.
pub(crate) fn claim(id: &str) -> Result<bool, TestNetError> {
    if Host::ALL
        .iter()
        .any(|host| netns_exists(&format!("{id}-{}", host.name())))
    {
        return Ok(false);
    }
    let path = pid_file(id);
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_err("create", &path)(e)),
    };
    file.write_all(owner_record().as_bytes())
        .map_err(io_err("write", &path))?;
    let dir = state_dir(id);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        // Left over from a crash between cleanup steps; empty it.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
            fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        }
        Err(e) => return Err(io_err("create", &dir)(e)),
    }
    Ok(true)
}

/// Appends `PID STARTTIME LABEL` to the set's `pids` file.
pub(crate) fn record_process(id: &str, pid: u32, label: &str) -> Result<(), TestNetError> {
    let path = state_dir(id).join("pids");
    let start = process_start_time(pid).unwrap_or(0);
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(&path)
        .map_err(io_err("open", &path))?;
    writeln!(file, "{pid} {start} {label}").map_err(io_err("write", &path))
}

/// Removes every set whose owner is dead. Takes the run-directory lock. Returns the ids
/// removed, and the problems met (a set that could not be fully removed is retried next
/// time: its pid file stays).
pub(crate) fn clean_stale() -> Result<(Vec<String>, Vec<String>), TestNetError> {
    let _lock = lock_run_dir()?;
    clean_stale_locked()
}

/// [`clean_stale`] for a caller that holds the lock.
pub(crate) fn clean_stale_locked() -> Result<(Vec<String>, Vec<String>), TestNetError> {
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    let entries = fs::read_dir(RUN_DIR).map_err(io_err("read", Path::new(RUN_DIR)))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pid")) else {
            continue;
        };
        if !is_set_id(id) {
            continue;
        }
        let record = fs::read_to_string(entry.path()).unwrap_or_default();
        if record_alive(&record) {
            continue;
        }
        let found = remove_set(id, true);
        if found.is_empty() {
            removed.push(id.to_owned());
        } else {
            problems.extend(found.into_iter().map(|p| format!("stale set {id}: {p}")));
        }
    }
    Ok((removed, problems))
}

/// Removes what set `id` left: with `kill_recorded`, first the processes listed in its
/// `pids` file that still run; then its namespaces, sockets, state directory and pid file
/// (last). Missing pieces are fine. Returns the problems met.
pub(crate) fn remove_set(id: &str, kill_recorded: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if kill_recorded {
        let pids_path = state_dir(id).join("pids");
        let listed = fs::read_to_string(&pids_path).unwrap_or_default();
        let alive: Vec<(u32, u64)> = listed
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let pid = fields.next()?.parse().ok()?;
                let start = fields.next()?.parse().ok()?;
                (process_start_time(pid) == Some(start)).then_some((pid, start))
            })
            .collect();
        problems.extend(terminate_unrelated(&alive));
    }

    for host in Host::ALL {
        let ns = format!("{id}-{}", host.name());
        if netns_exists(&ns)
            && let Err(e) = run(
                &mut host_command("ip", &["netns", "del", &ns]),
                None,
                TOOL_TIMEOUT,
            )
        {
            problems.push(super::error::error_chain(&e));
        }
    }

    if let Ok(entries) = fs::read_dir(WG_RUN_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name.starts_with(id) && (name.ends_with(".sock") || name.ends_with(".name"));
            if ours && let Err(e) = remove_file_if_exists(&entry.path()) {
                problems.push(super::error::error_chain(&e));
            }
        }
    }

    let dir = state_dir(id);
    if let Err(e) = fs::remove_dir_all(&dir)
        && e.kind() != ErrorKind::NotFound
    {
        problems.push(super::error::error_chain(&io_err("remove", &dir)(e)));
    }
    if problems.is_empty()
        && let Err(e) = remove_file_if_exists(&pid_file(id))
    {
        problems.push(super::error::error_chain(&e));
    }
    problems
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<(), TestNetError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// SIGTERM, up to [`TERM_GRACE`], then SIGKILL, for processes that are not our children
/// (a dead owner's). Each is identified by pid and start time, so a reused pid is left
/// alone.
fn terminate_unrelated(processes: &[(u32, u64)]) -> Vec<String> {
    let mut problems = Vec::new();
    let same = |pid: u32, start: u64| process_start_time(pid) == Some(start);
    let signal = |pid: u32, sig: Signal| -> Option<String> {
        let raw = i32::try_from(pid).ok()?;
        kill(Pid::from_raw(raw), sig)
            .err()
            .filter(|e| *e != nix::errno::Errno::ESRCH)
            .map(|e| format!("failed to send {sig} to pid {pid}: {e}"))
    };
    for &(pid, start) in processes {
        if same(pid, start) {
            problems.extend(signal(pid, Signal::SIGTERM));
        }
    }
    let deadline = Instant::now() + TERM_GRACE;
    while processes.iter().any(|&(p, s)| same(p, s)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for &(pid, start) in processes {
        if same(pid, start) {
            problems.extend(signal(pid, Signal::SIGKILL));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_shape() {
        assert!(is_set_id("tn3f9a1c"));
        assert!(!is_set_id("tn3F9A1C"));
        assert!(!is_set_id("vlab"));
        assert!(!is_set_id("tn3f9a1c0"));
        assert!(!is_set_id("xx3f9a1c"));
    }

    #[test]
    fn own_record_is_alive_and_a_dead_pid_is_not() {
        assert!(record_alive(&owner_record()));
        let me = std::process::id();
        // Same pid, other start time: a reused pid.
        assert!(!record_alive(&format!("{me} 1")));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        assert!(!record_alive(&format!("{dead}\n")));
        assert!(!record_alive("garbage"));
    }
}
