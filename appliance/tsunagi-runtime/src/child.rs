//! The child side: what `tsunagi service NAME` does before and around the service's code.
//!
//! [`enter`] runs first, single-threaded: it adopts the inherited status socket, drops
//! privileges (when started as root), arranges to die with the supervisor and moves into the
//! service's state directory. [`run_service`] then builds the tokio runtime, turns SIGTERM
//! and SIGINT (and the supervisor closing the socket) into the [`ServiceCtx::shutdown`]
//! token, runs the service, and reports a failure to the supervisor before exiting.

use std::future::Future;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;

use caps::Capability;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, User, getppid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::fd::{self, FdError};
use crate::privilege::{self, Identity, PrivilegeError};
use crate::protocol::{ChildMessage, one_line};
use crate::status::Health;

/// Who the child becomes and where it lives.
#[derive(Debug, Clone)]
pub struct ChildSetup {
    pub name: String,
    /// The system user to run as when started by a root supervisor.
    pub user: String,
    /// The capabilities the service declares; every other one is dropped.
    pub capabilities: Vec<Capability>,
    /// The service's own state directory (created by the supervisor, mode 0700).
    pub state_dir: PathBuf,
    /// Supplementary groups it runs with (created by the supervisor), e.g. to reach another
    /// service's socket.
    pub groups: Vec<String>,
}

/// Errors of the child's setup and run.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error(transparent)]
    Fd(#[from] FdError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error("service user {user} does not exist (the supervisor creates it)")]
    NoUser { user: String },
    #[error("group {group} does not exist (the supervisor creates it)")]
    NoGroup { group: String },
    #[error("cannot look up service user {user}")]
    UserLookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot arrange to stop with the supervisor")]
    DeathSignal(#[source] nix::Error),
    #[error("the supervisor (pid {expected}) is gone")]
    SupervisorGone { expected: i32 },
    #[error("cannot enter state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot prepare the status socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot install the handlers of SIGTERM and SIGINT")]
    Signals(#[source] std::io::Error),
    #[error("service {service} failed")]
    Service {
        service: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ChildError {
    /// Whether the error happened before the service's own code ran.
    pub fn is_setup(&self) -> bool {
        !matches!(self, ChildError::Service { .. })
    }
}

/// A child that has taken its socket and dropped its privileges.
#[derive(Debug)]
pub struct Prepared {
    setup: ChildSetup,
    stream: StdUnixStream,
    privileged: bool,
}

/// Prepares the process for the service. Call before any thread is started.
pub fn enter(setup: ChildSetup) -> Result<Prepared, ChildError> {
    let stream = fd::take_inherited()?;
    let supervisor = std::env::var(fd::SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
        .unwrap_or(0);
    let privileged = privilege::is_root();
    if privileged {
        let user = User::from_name(&setup.user)
            .map_err(|source| ChildError::UserLookup {
                user: setup.user.clone(),
                source,
            })?
            .ok_or_else(|| ChildError::NoUser {
                user: setup.user.clone(),
            })?;
        let mut gids = Vec::with_capacity(setup.groups.len());
        for group in &setup.groups {
            gids.push(
                privilege::lookup_group(group)?.ok_or_else(|| ChildError::NoGroup {
                    group: group.clone(),
                })?,
            );
        }
        privilege::drop_to(
            Identity {
                uid: user.uid,
                gid: user.gid,
            },
            &gids,
            &setup.capabilities,
        )?;
    } else {
        privilege::set_no_new_privs()?;
    }
    // Changing credentials clears the parent-death signal, so set it afterwards, then check
    // the supervisor did not die before it was set.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(ChildError::DeathSignal)?;
    if getppid() != Pid::from_raw(supervisor) {
        return Err(ChildError::SupervisorGone {
            expected: supervisor,
        });
    }
    std::env::set_current_dir(&setup.state_dir).map_err(|source| ChildError::StateDir {
        path: setup.state_dir.clone(),
        source,
    })?;
    Ok(Prepared {
        setup,
        stream,
        privileged,
    })
}

/// What a service gets from the runtime.
#[derive(Debug)]
pub struct ServiceCtx {
    pub name: String,
    /// The service's private state directory (also the working directory).
    pub state_dir: PathBuf,
    /// Cancelled on SIGTERM/SIGINT or when the supervisor goes away: finish in-flight work
    /// and return.
    pub shutdown: CancellationToken,
    /// Reports to the supervisor.
    pub reporter: Reporter,
    /// Whether privileges were dropped (false in unprivileged development runs).
    pub privileged: bool,
}

enum Outgoing {
    Message(ChildMessage),
    Flush(oneshot::Sender<()>),
}

/// Sends readiness and status to the supervisor. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outgoing")
    }
}

impl Reporter {
    /// The service is up and doing its job.
    pub fn ready(&self) {
        let _ = self.tx.send(Outgoing::Message(ChildMessage::Ready {}));
    }

    /// Current health and a one-line summary (counts and states only, never patient data).
    pub fn status(&self, health: Health, summary: &str) {
        self.status_with_metrics(health, summary, &[]);
    }

    /// Like [`Reporter::status`], with the service's metrics (see
    /// [`crate::protocol::valid_metric_name`]; names ending in `_total` are counters).
    pub fn status_with_metrics(&self, health: Health, summary: &str, metrics: &[(&str, f64)]) {
        let _ = self.tx.send(Outgoing::Message(ChildMessage::Status {
            health,
            summary: one_line(summary),
            metrics: metrics
                .iter()
                .map(|(name, value)| ((*name).to_owned(), *value))
                .collect(),
        }));
    }

    fn error(&self, message: &str) {
        let _ = self.tx.send(Outgoing::Message(ChildMessage::Error {
            message: one_line(message),
        }));
    }

    async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Outgoing::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx).await;
        }
    }
}

/// Formats an error and its sources on one line: "outer: inner: root".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Runs `service` on a new multi-threaded runtime until it returns.
pub fn run_service<F, Fut, E>(
    prepared: Prepared,
    worker_threads: usize,
    service: F,
) -> Result<(), ChildError>
where
    F: FnOnce(ServiceCtx) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<crate::service::ServiceError>,
{
    let Prepared {
        setup,
        stream,
        privileged,
    } = prepared;
    let name = setup.name.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .thread_name(format!("svc-{name}"))
        .enable_all()
        .build()
        .map_err(ChildError::Runtime)?;
    let span = tracing::info_span!("service", name = %name);
    let outcome = runtime.block_on(
        async move {
            stream.set_nonblocking(true).map_err(ChildError::Socket)?;
            let stream = UnixStream::from_std(stream).map_err(ChildError::Socket)?;
            let (mut read_half, mut write_half) = stream.into_split();
            let shutdown = CancellationToken::new();
            let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
            let reporter = Reporter { tx };

            // Writer: one JSON line per message, in order.
            tokio::spawn(
                async move {
                    while let Some(out) = rx.recv().await {
                        match out {
                            Outgoing::Message(msg) => {
                                if write_half
                                    .write_all(msg.to_line().as_bytes())
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                            }
                            Outgoing::Flush(done) => {
                                let _ = write_half.flush().await;
                                let _ = done.send(());
                            }
                        }
                    }
                }
                .in_current_span(),
            );
            // Reader: the supervisor sends nothing yet, so end-of-file means it is gone.
            let gone = shutdown.clone();
            tokio::spawn(
                async move {
                    let mut buf = [0u8; 512];
                    loop {
                        match read_half.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    tracing::warn!("supervisor closed the status socket; stopping");
                    gone.cancel();
                }
                .in_current_span(),
            );
            // Signals: installed before the service runs, or it could not be stopped.
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).map_err(ChildError::Signals)?;
            let mut int = signal(SignalKind::interrupt()).map_err(ChildError::Signals)?;
            let on_signal = shutdown.clone();
            tokio::spawn(
                async move {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
                        _ = int.recv() => tracing::info!("SIGINT received; stopping"),
                    }
                    on_signal.cancel();
                }
                .in_current_span(),
            );

            tracing::info!(privileged, "service starting");
            let ctx = ServiceCtx {
                name: name.clone(),
                state_dir: setup.state_dir.clone(),
                shutdown,
                reporter: reporter.clone(),
                privileged,
            };
            match service(ctx).await {
                Ok(()) => {
                    tracing::info!("service stopped");
                    reporter.flush().await;
                    Ok(())
                }
                Err(error) => {
                    let error: crate::service::ServiceError = error.into();
                    let chain = error_chain(&*error);
                    tracing::error!(error = &*error as &dyn std::error::Error, "service failed");
                    reporter.error(&chain);
                    reporter.flush().await;
                    Err(ChildError::Service {
                        service: name.clone(),
                        source: error,
                    })
                }
            }
        }
        .instrument(span),
    );
    // Dropping a runtime waits for every blocking task without bound; a service has
    // returned, so what is left (a blocking call on a wedged peer) must not hold the stop.
    runtime.shutdown_timeout(STOP_LEFTOVERS);
    outcome
}

/// How long a stopped service's leftover blocking tasks may delay its process's exit.
const STOP_LEFTOVERS: std::time::Duration = std::time::Duration::from_millis(200);
