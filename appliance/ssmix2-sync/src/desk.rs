//! The clinic console's 保留中 for SS-MIX2 (issue 19): the staff's requeue and discard of
//! the files that wait, audited. The console lists what waits from the report the sync
//! keeps after each cycle ([`crate::WAITING_FILE`]); it names a file by its path and the
//! SHA-256 of the version it showed.
//!
//! Socket: `RUNTIME-DIR/ssmix2-report/desk.sock` (the report's directory, 2750, group
//! [`consent::desk::GROUP`]; socket 0660), served by the SS-MIX2 service: one JSON request
//! per line, one answer per line ([`Request`], [`Answer`]). Only the console is in the
//! group.
//!
//! The sync's worker thread carries each request out between two of its operations, never
//! during one ([`Job`]): a file is never discarded while it is being sent. A request the
//! worker has not taken within [`TAKE_WITHIN`] is withdrawn, unchanged, and answered busy.
//!
//! - **Requeue** (送り直す) asks again now: the cached consent answer for the file's
//!   patient and category is forgotten, a failing send is tried again at once, and a cycle
//!   starts. Nothing leaves by a requeue: the file is decided again immediately before it
//!   is sent, as always.
//! - **Discard** (送らない) keeps this version of the file from the network for good: the
//!   sync never sends it (a changed file is a new version and goes its way). A send that
//!   had started and may have reached the hub is undone there and recorded, as a denial's.
//!   The file itself is the EMR's and stays in its storage.
//!
//! Both are recorded in the consent service's audit trail first (one row per patient and
//! category, decision `requeued` or `discarded-held`, reason `by:ACCOUNT (ADDRESS)`, the
//! objects `ssmix2:TYPE:SHA256`); what cannot be recorded is not done.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use consent::desk::Staff;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tsunagi_runtime::listen::{self, LineLimits, ServeError};

/// The socket's file name, in [`crate::REPORT_DIR`].
pub const SOCKET_NAME: &str = "desk.sock";
/// The most files one request names.
pub const MAX_FILES: usize = 200;
/// The longest request line (200 paths of up to 255 bytes, with their digests).
const MAX_REQUEST: usize = 128 * 1024;
/// How long a request waits for the worker to take it (it finishes the operation under
/// way first: a replica operation is bounded by its timeout, 30 s, but is seldom long).
pub const TAKE_WITHIN: Duration = Duration::from_secs(10);
/// How long a taken request may take (the audit record, one SQLite transaction).
const CARRY_OUT_WITHIN: Duration = Duration::from_secs(10);
/// What a client should allow for an answer.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(25);

/// The desk socket's path for a config.
pub fn socket_path(cfg: &tsunagi_config::Config) -> PathBuf {
    cfg.paths
        .runtime_dir
        .as_path()
        .join(crate::REPORT_DIR)
        .join(SOCKET_NAME)
}

/// A file as the console showed it: its path in the storage and the version's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub path: String,
    pub sha256: String,
}

/// A request to the SS-MIX2 desk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Ask again now for these files (each is decided again before it is sent).
    Requeue { staff: Staff, files: Vec<FileRef> },
    /// Never send these versions of these files.
    Discard { staff: Staff, files: Vec<FileRef> },
}

/// The desk's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Answer {
    /// So many files were requeued or discarded (the others named no longer wait in that
    /// version, or were discarded already).
    Done { count: usize },
    /// The sync is in the middle of a long operation: nothing was changed; ask again.
    Busy,
    /// The request is not acceptable: what is wrong, in words.
    Refused(String),
    /// The service could not do it (never patient data).
    Error(String),
}

/// A request handed to the sync's worker thread, which answers it between two operations
/// ([`crate::sync::Syncer::serve_desk`]).
#[derive(Debug)]
pub struct Job {
    pub request: Request,
    reply: mpsc::SyncSender<Answer>,
    /// [`QUEUED`], then [`TAKEN`] by the worker or [`WITHDRAWN`] by the desk: whoever
    /// moves it first decides.
    claim: Arc<AtomicU8>,
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

impl Job {
    /// A job and the receiver of its answer, with its claim (for [`wait`]).
    pub fn new(request: Request) -> (Job, Pending) {
        let (reply, answer) = mpsc::sync_channel(1);
        let claim = Arc::new(AtomicU8::new(QUEUED));
        (
            Job {
                request,
                reply,
                claim: claim.clone(),
            },
            Pending { answer, claim },
        )
    }

    /// Takes the job for the worker: false when the desk withdrew it (nothing to do).
    pub fn take(&self) -> bool {
        self.claim
            .compare_exchange(QUEUED, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Sends the worker's answer (the desk may have stopped waiting).
    pub fn answer(self, answer: Answer) {
        let _ = self.reply.send(answer);
    }
}

/// The desk's side of a [`Job`].
#[derive(Debug)]
pub struct Pending {
    answer: mpsc::Receiver<Answer>,
    claim: Arc<AtomicU8>,
}

impl Pending {
    /// Waits for the worker's answer (blocking): [`Answer::Busy`] when the worker did not
    /// take the job within `take_within` (it is withdrawn: the worker will skip it).
    pub fn wait(self, take_within: Duration) -> Answer {
        match self.answer.recv_timeout(take_within) {
            Ok(a) => return a,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Answer::Error("the sync is not running".into());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if self
            .claim
            .compare_exchange(QUEUED, WITHDRAWN, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Answer::Busy;
        }
        // Taken meanwhile: it is being carried out.
        self.answer
            .recv_timeout(CARRY_OUT_WITHIN)
            .unwrap_or_else(|_| Answer::Error("the sync did not answer in time".into()))
    }
}

/// Checks what a request may name before it goes to the worker.
pub fn check(request: &Request) -> Result<(), String> {
    let (Request::Requeue { staff, files } | Request::Discard { staff, files }) = request;
    if !consent::desk::valid(staff) {
        return Err("the staff account".into());
    }
    if files.is_empty() || files.len() > MAX_FILES {
        return Err(format!("name 1 to {MAX_FILES} files"));
    }
    for f in files {
        let hex = f.sha256.len() == 64
            && f.sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err("a SHA-256 is 64 lowercase hex digits".into());
        }
        if f.path.is_empty() || f.path.len() > 1024 {
            return Err("a path of 1 to 1024 bytes".into());
        }
    }
    Ok(())
}

/// Binds the desk socket in `dir` (replacing a stale one), mode 0660.
pub fn bind(dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    listen::bind_socket(&dir.join(SOCKET_NAME))
}

/// Serves the desk until `stop` fires, handing each acceptable request to the worker
/// through `jobs`.
pub async fn serve(
    listener: tokio::net::UnixListener,
    jobs: mpsc::Sender<Job>,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let limits = LineLimits {
        max_connections: 4,
        max_line: MAX_REQUEST,
        idle: Duration::from_secs(60),
    };
    let jobs = Arc::new(std::sync::Mutex::new(jobs));
    listen::serve_json(listener, limits, stop, Answer::Refused, move |request| {
        let jobs = jobs.clone();
        async move {
            if let Err(why) = check(&request) {
                return Answer::Refused(why);
            }
            let (job, pending) = Job::new(request);
            let sent = jobs
                .lock()
                .map_err(|_| ())
                .and_then(|j| j.send(job).map_err(|_| ()));
            match sent {
                Err(()) => Answer::Error("the sync is not running".into()),
                Ok(()) => tokio::task::spawn_blocking(move || pending.wait(TAKE_WITHIN))
                    .await
                    .unwrap_or_else(|_| Answer::Error("internal error".into())),
            }
        }
    })
    .await
}

/// Asks the desk at `socket` (blocking; at most `timeout` for each read and write: allow
/// [`ANSWER_WITHIN`]).
pub fn ask(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Answer, listen::AskError> {
    listen::ask_line(socket, request, timeout, 1 << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staff() -> Staff {
        Staff {
            account: "desk1".into(),
            from: "192.168.50.20".into(),
        }
    }

    fn file() -> FileRef {
        FileRef {
            path: "a/b/c.txt".into(),
            sha256: "0".repeat(64),
        }
    }

    #[test]
    fn a_request_names_a_staff_account_and_1_to_200_files_by_digest() {
        let ok = Request::Discard {
            staff: staff(),
            files: vec![file()],
        };
        assert_eq!(check(&ok), Ok(()));
        let none = Request::Requeue {
            staff: staff(),
            files: vec![],
        };
        assert!(check(&none).is_err());
        let many = Request::Requeue {
            staff: staff(),
            files: vec![file(); MAX_FILES + 1],
        };
        assert!(check(&many).is_err());
        let upper = Request::Requeue {
            staff: staff(),
            files: vec![FileRef {
                sha256: "A".repeat(64),
                ..file()
            }],
        };
        assert!(check(&upper).is_err());
        let nobody = Request::Requeue {
            staff: Staff {
                account: String::new(),
                from: "x".into(),
            },
            files: vec![file()],
        };
        assert!(check(&nobody).is_err());
    }

    #[test]
    #[expect(
        clippy::disallowed_methods,
        reason = "a plain test thread plays the worker"
    )]
    fn a_job_the_worker_does_not_take_in_time_is_withdrawn_and_then_skipped() {
        let (job, pending) = Job::new(Request::Requeue {
            staff: staff(),
            files: vec![file()],
        });
        assert_eq!(pending.wait(Duration::from_millis(50)), Answer::Busy);
        assert!(!job.take(), "a withdrawn job is not carried out");
        // Taken in time: the answer arrives even after the first wait ran out.
        let (job, pending) = Job::new(Request::Requeue {
            staff: staff(),
            files: vec![file()],
        });
        let worker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            assert!(job.take());
            std::thread::sleep(Duration::from_millis(100));
            job.answer(Answer::Done { count: 1 });
        });
        assert_eq!(
            pending.wait(Duration::from_millis(60)),
            Answer::Done { count: 1 }
        );
        worker.join().unwrap();
    }
}
