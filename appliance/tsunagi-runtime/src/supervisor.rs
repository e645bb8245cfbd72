//! The supervisor: starts, watches, restarts and stops the service processes.
//!
//! One task on a current-thread runtime owns all state ([`run`]); per-child watcher tasks
//! turn each child's status socket and exit into [`Event`]s. All process spawns happen on
//! that one thread, which is what makes the status-socket handoff in [`crate::fd`] safe and
//! keeps each child's parent-death signal tied to a thread that lives as long as the
//! supervisor. Status and metrics read a [`Snapshot`] that the loop republishes after every
//! event.
//!
//! Each child runs in its own process group (its pid). SIGTERM goes to the child; after the
//! stop deadline, SIGKILL goes to the whole group; after any exit, the group is killed so that
//! no helper process outlives the service.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caps::Capability;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::logging::LogHandle;
use crate::policy::{CrashHistory, Decision, RestartPolicy};
use crate::privilege::{self, PrivilegeError};
use crate::protocol::{ChildMessage, MAX_LINE, one_line};
use crate::sdnotify::Notifier;
use crate::status::{Health, ServiceState, ServiceStatus, StatusReport, SupervisorStatus};
use crate::{control, fd, metrics};

/// The token that stops the supervisor like SIGTERM does.
pub use tokio_util::sync::CancellationToken as ShutdownToken;

/// One service the supervisor runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSpec {
    /// The service name: `tsunagi service NAME` and the state directory's name.
    pub name: String,
    /// The system user it runs as when the supervisor is root.
    pub user: String,
    /// The capabilities it keeps; every other one is dropped.
    pub capabilities: Vec<Capability>,
    /// Environment variables set for the process (on top of the supervisor's own).
    pub env: Vec<(String, String)>,
    /// Directories outside its state directory that the service owns (mode 0700), such as
    /// the WireGuard control-socket directory.
    pub extra_dirs: Vec<PathBuf>,
    /// Device nodes the service must open (e.g. `/dev/net/tun`). When others may not use
    /// one, the service's group gets read-write access to it, and nobody else does.
    pub devices: Vec<PathBuf>,
    /// Directories the service owns that members of a group may enter (mode 2750, that
    /// group), such as the consent service's decision-socket directory.
    pub shared_dirs: Vec<(PathBuf, String)>,
    /// Supplementary groups the service runs with (e.g. the group of another service's
    /// shared directory).
    pub groups: Vec<String>,
    /// The part of the configuration the service reads, in a canonical form: when it changes
    /// at reload, the service is restarted.
    pub fingerprint: String,
}

/// Supervisor settings, from the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub policy: RestartPolicy,
    pub stop_timeout: Duration,
    pub ready_timeout: Duration,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub log_filter: String,
}

/// Everything the supervisor needs from one version of the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub settings: Settings,
    pub children: Vec<ChildSpec>,
}

/// Reloads the plan from the config file (on SIGHUP). The error is the whole, human-readable
/// reason the new file was rejected.
pub type Reload = Box<dyn FnMut() -> Result<Plan, String>>;

/// How the supervisor was started.
pub struct Launch {
    /// The `tsunagi` binary, started again as `tsunagi service NAME --config FILE`.
    pub exe: PathBuf,
    pub config_path: PathBuf,
    pub plan: Plan,
    pub reload: Reload,
    pub log: Option<LogHandle>,
    /// Stops the supervisor like SIGTERM does (for embedding and tests).
    pub shutdown: CancellationToken,
}

/// Errors that stop the supervisor from starting.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("the supervisor must run on a current-thread tokio runtime")]
    RuntimeFlavor,
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot listen for metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install a handler for {signal}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor's {task} {why}")]
    TaskEnded { task: &'static str, why: String },
}

/// The task that watches one child process (its reports and its exit).
type Watcher = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A task of the supervisor's own (none is detached).
#[derive(Debug, Clone)]
enum OwnTask {
    /// The control socket's server; ending while not stopping is fatal.
    Control,
    /// The metrics endpoint's server (replaced at reload when its address changes).
    Metrics(CancellationToken),
    /// The watcher of one child process: it ends when the child has exited.
    Child { name: String, generation: u64 },
}

/// What the status socket and the metrics endpoint read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    supervisor: SupervisorStatus,
    started: Instant,
    services: Vec<(ServiceStatus, Option<Instant>)>,
}

impl Snapshot {
    /// The status report as of now.
    pub fn report(&self) -> StatusReport {
        let now = Instant::now();
        let mut supervisor = self.supervisor.clone();
        supervisor.uptime_secs = now.saturating_duration_since(self.started).as_secs();
        StatusReport {
            supervisor,
            services: self
                .services
                .iter()
                .map(|(status, started)| {
                    let mut status = status.clone();
                    status.uptime_secs =
                        started.map(|t| now.saturating_duration_since(t).as_secs());
                    status
                })
                .collect(),
        }
    }
}

#[derive(Debug)]
enum Event {
    Message {
        name: String,
        generation: u64,
        msg: ChildMessage,
    },
    ProtocolError {
        name: String,
        generation: u64,
        detail: String,
    },
    Exited {
        name: String,
        generation: u64,
        status: Option<ExitStatus>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    Stay,
    Restart,
    Remove,
}

#[derive(Debug)]
struct Slot {
    spec: ChildSpec,
    state: ServiceState,
    health: Health,
    summary: String,
    metrics: std::collections::BTreeMap<String, f64>,
    pid: Option<u32>,
    generation: u64,
    starts: u32,
    history: CrashHistory,
    last_error: Option<String>,
    reported_error: Option<String>,
    started_at: Option<Instant>,
    next_start: Option<Instant>,
    stop_deadline: Option<Instant>,
    killed: bool,
    after_stop: AfterStop,
    settled: bool,
}

impl Slot {
    fn new(spec: ChildSpec) -> Slot {
        Slot {
            spec,
            state: ServiceState::Starting,
            health: Health::Unknown,
            summary: String::new(),
            metrics: std::collections::BTreeMap::new(),
            pid: None,
            generation: 0,
            starts: 0,
            history: CrashHistory::default(),
            last_error: None,
            reported_error: None,
            started_at: None,
            next_start: Some(Instant::now()),
            stop_deadline: None,
            killed: false,
            after_stop: AfterStop::Stay,
            settled: false,
        }
    }
}

struct Supervisor {
    exe: PathBuf,
    config_path: PathBuf,
    settings: Settings,
    reload: Reload,
    log: Option<LogHandle>,
    privileged: bool,
    slots: Vec<Slot>,
    events_tx: mpsc::UnboundedSender<Event>,
    notifier: Notifier,
    ready_sent: bool,
    last_status_line: String,
    next_watchdog: Option<Instant>,
    shutting_down: Option<Instant>,
    started: Instant,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    metrics_cancel: Option<CancellationToken>,
    root_cancel: CancellationToken,
    /// Every task the supervisor runs (servers and child watchers), with what each is.
    tasks: JoinSet<Result<(), String>>,
    task_kinds: HashMap<tokio::task::Id, OwnTask>,
    /// Set when one of the supervisor's own servers ended: it stops everything and fails.
    fatal: Option<SupervisorError>,
}

/// Runs the supervisor until SIGTERM, SIGINT or `launch.shutdown`. Returns once every child
/// has exited.
pub async fn run(launch: Launch) -> Result<(), SupervisorError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::CurrentThread
    {
        return Err(SupervisorError::RuntimeFlavor);
    }
    let Launch {
        exe,
        config_path,
        plan,
        reload,
        log,
        shutdown,
    } = launch;
    let privileged = privilege::is_root();
    if !privileged {
        warn!(
            uid = nix::unistd::Uid::effective().as_raw(),
            "running unprivileged: every service runs as this user with these capabilities; privilege separation is off"
        );
    }
    privilege::ensure_shared_dir(&plan.settings.state_dir, privileged)?;
    privilege::ensure_shared_dir(&plan.settings.runtime_dir, false)?;
    let status_group = if privileged {
        Some(privilege::ensure_group(control::STATUS_GROUP)?)
    } else {
        None
    };
    let listener = control::bind(
        &plan.settings.runtime_dir.join(control::SOCKET_NAME),
        status_group,
    )?;

    let signal = |kind, name| {
        tokio::signal::unix::signal(kind).map_err(|source| SupervisorError::Signal {
            signal: name,
            source,
        })
    };
    use tokio::signal::unix::SignalKind;
    let mut sigterm = signal(SignalKind::terminate(), "SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt(), "SIGINT")?;
    let mut sighup = signal(SignalKind::hangup(), "SIGHUP")?;

    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let notifier = Notifier::from_env();
    let next_watchdog = notifier.watchdog_interval().map(|_| started);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot {
        supervisor: SupervisorStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            privileged,
            ready: false,
            uptime_secs: 0,
            config: config_path.display().to_string(),
        },
        started,
        services: Vec::new(),
    }));
    let root_cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut task_kinds = HashMap::new();
    let control = control::serve(listener, snapshot_rx, root_cancel.child_token());
    let control = tasks.spawn(async move { control.await.map_err(|e| e.to_string()) });
    task_kinds.insert(control.id(), OwnTask::Control);

    let mut sup = Supervisor {
        exe,
        config_path,
        settings: plan.settings.clone(),
        reload,
        log,
        privileged,
        slots: plan.children.into_iter().map(Slot::new).collect(),
        events_tx,
        notifier,
        ready_sent: false,
        last_status_line: String::new(),
        next_watchdog,
        shutting_down: None,
        started,
        snapshot_tx,
        metrics_cancel: None,
        root_cancel,
        tasks,
        task_kinds,
        fatal: None,
    };
    if let Some(addr) = sup.settings.metrics {
        sup.start_metrics(addr).await?;
    }
    info!(
        services = sup.slots.len(),
        privileged, "supervisor starting"
    );

    loop {
        let now = Instant::now();
        sup.tick(now);
        sup.publish();
        if sup.shutting_down.is_some() && sup.slots.iter().all(|s| s.pid.is_none()) {
            break;
        }
        let wake = sup.next_wake(now);
        tokio::select! {
            Some(event) = events_rx.recv() => sup.on_event(event),
            _ = sigterm.recv() => sup.begin_shutdown("SIGTERM"),
            _ = sigint.recv() => sup.begin_shutdown("SIGINT"),
            _ = shutdown.cancelled(), if sup.shutting_down.is_none() => sup.begin_shutdown("request"),
            _ = sighup.recv() => sup.on_reload().await,
            Some(joined) = sup.tasks.join_next_with_id(), if !sup.tasks.is_empty() => {
                sup.on_task_end(joined);
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    sup.notifier.notify("STATUS=stopped");
    sup.root_cancel.cancel();
    let tasks = std::mem::take(&mut sup.tasks);
    let stopped = tokio::time::timeout(Duration::from_secs(1), tasks.join_all()).await;
    if stopped.is_err() {
        warn!("the supervisor's servers did not stop in time");
    }
    let socket = sup.settings.runtime_dir.join(control::SOCKET_NAME);
    let _ = std::fs::remove_file(socket);
    if let Some(fatal) = sup.fatal {
        error!(
            error = &fatal as &dyn std::error::Error,
            "supervisor stopped after a failure"
        );
        return Err(fatal);
    }
    info!("supervisor stopped");
    Ok(())
}

impl Supervisor {
    async fn start_metrics(&mut self, addr: SocketAddr) -> Result<(), SupervisorError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| SupervisorError::Metrics { addr, source })?;
        let cancel = self.root_cancel.child_token();
        let server = metrics::serve(listener, self.snapshot_tx.subscribe(), cancel.clone());
        let server = self
            .tasks
            .spawn(async move { server.await.map_err(|e| e.to_string()) });
        self.task_kinds
            .insert(server.id(), OwnTask::Metrics(cancel.clone()));
        self.metrics_cancel = Some(cancel);
        info!(%addr, "metrics listening");
        Ok(())
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(1);
        for slot in &self.slots {
            let candidates = [
                slot.next_start
                    .filter(|_| slot.pid.is_none() && self.shutting_down.is_none()),
                slot.stop_deadline.filter(|_| !slot.killed),
                slot.started_at
                    .filter(|_| slot.state == ServiceState::Starting)
                    .map(|t| t + self.settings.ready_timeout),
            ];
            for t in candidates.into_iter().flatten() {
                wake = wake.min(t);
            }
        }
        if let Some(t) = self.next_watchdog {
            wake = wake.min(t);
        }
        wake.max(now)
    }

    /// Time-driven work: starts that are due, stop deadlines, ready timeouts, the watchdog.
    fn tick(&mut self, now: Instant) {
        if let (Some(due), Some(every)) = (self.next_watchdog, self.notifier.watchdog_interval())
            && now >= due
        {
            self.notifier.notify("WATCHDOG=1");
            self.next_watchdog = Some(now + every);
        }
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let (Some(deadline), Some(pid)) = (slot.stop_deadline, slot.pid) {
                if now >= deadline && !slot.killed {
                    warn!(service = %slot.spec.name, pid, "service did not stop in time; killing it");
                    kill_group(pid);
                    slot.killed = true;
                }
                continue;
            }
            if slot.state == ServiceState::Starting
                && slot.pid.is_some()
                && !slot.killed
                && let Some(started) = slot.started_at
                && now >= started + self.settings.ready_timeout
            {
                let timeout = humantime_secs(self.settings.ready_timeout);
                warn!(service = %slot.spec.name, "service not ready in time; killing it");
                slot.reported_error = Some(format!("not ready within {timeout}"));
                if let Some(pid) = slot.pid {
                    kill_group(pid);
                }
                slot.killed = true;
            }
            if self.shutting_down.is_none()
                && slot.pid.is_none()
                && let Some(due) = slot.next_start
                && now >= due
            {
                self.start(i, now);
            }
        }
        self.check_ready();
    }

    fn start(&mut self, i: usize, now: Instant) {
        let generation = self.slots[i].generation + 1;
        let spawned = self
            .spawn(&self.slots[i].spec, generation)
            .map(|(pid, watcher)| {
                let handle = self.tasks.spawn(async move {
                    watcher.await;
                    Ok(())
                });
                self.task_kinds.insert(
                    handle.id(),
                    OwnTask::Child {
                        name: self.slots[i].spec.name.clone(),
                        generation,
                    },
                );
                pid
            });
        let slot = &mut self.slots[i];
        slot.generation = generation;
        slot.next_start = None;
        slot.killed = false;
        slot.stop_deadline = None;
        slot.reported_error = None;
        slot.after_stop = AfterStop::Stay;
        if slot.starts > 0 {
            info!(service = %slot.spec.name, restarts = slot.starts, "restarting service");
        }
        slot.starts = slot.starts.saturating_add(1);
        match spawned {
            Ok(pid) => {
                debug!(service = %slot.spec.name, pid, "service process started");
                slot.pid = Some(pid);
                slot.started_at = Some(now);
                slot.state = ServiceState::Starting;
                slot.health = Health::Unknown;
            }
            Err(err) => {
                let message = crate::child::error_chain(err.as_ref());
                error!(service = %slot.spec.name, error = err.as_ref() as &dyn std::error::Error, "cannot start service");
                slot.started_at = Some(now);
                slot.reported_error = Some(message);
                self.crashed(i, now, None);
            }
        }
    }

    fn spawn(
        &self,
        spec: &ChildSpec,
        generation: u64,
    ) -> Result<(u32, Watcher), Box<dyn std::error::Error + Send + Sync>> {
        let identity = if self.privileged {
            Some(privilege::ensure_user(&spec.user)?)
        } else {
            None
        };
        privilege::ensure_private_dir(&self.settings.state_dir.join(&spec.name), identity)?;
        for dir in &spec.extra_dirs {
            privilege::ensure_private_dir(dir, identity)?;
        }
        for (dir, group) in &spec.shared_dirs {
            let gid = if self.privileged {
                Some(privilege::ensure_group(group)?)
            } else {
                None
            };
            privilege::ensure_group_dir(dir, identity, gid)?;
        }
        if self.privileged {
            for group in &spec.groups {
                privilege::ensure_group(group)?;
            }
        }
        if let Some(id) = identity {
            for device in &spec.devices {
                privilege::grant_device(device, id)?;
            }
        }
        let (ours, theirs) = fd::pair()?;
        let raw = fd::make_inheritable(&theirs)?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("service")
            .arg(&spec.name)
            .arg("--config")
            .arg(&self.config_path)
            .env(fd::FD_ENV, raw.to_string())
            .env(fd::SUPERVISOR_PID_ENV, std::process::id().to_string())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        drop(theirs); // The child has its copy; ours must not leak into the next spawn.
        let pid = child
            .id()
            .ok_or("the service exited before it could be watched")?;
        ours.set_nonblocking(true)?;
        let stream = UnixStream::from_std(ours)?;
        let span = tracing::info_span!("service", name = %spec.name);
        let watcher = watch_child(
            spec.name.clone(),
            generation,
            child,
            stream,
            self.events_tx.clone(),
        );
        Ok((pid, Box::pin(watcher.instrument(span))))
    }

    fn slot_index(&self, name: &str, generation: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.spec.name == name && s.generation == generation)
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Message {
                name,
                generation,
                msg,
            } => {
                let Some(i) = self.slot_index(&name, generation) else {
                    return;
                };
                let slot = &mut self.slots[i];
                match msg {
                    ChildMessage::Ready {} => {
                        if slot.state == ServiceState::Starting {
                            slot.state = ServiceState::Ready;
                            slot.settled = true;
                            info!(service = %name, "service ready");
                        }
                    }
                    ChildMessage::Status {
                        health,
                        summary,
                        metrics,
                    } => {
                        slot.health = health;
                        slot.summary = one_line(&summary);
                        slot.metrics = crate::protocol::clean_metrics(metrics);
                    }
                    ChildMessage::Error { message } => {
                        slot.reported_error = Some(one_line(&message));
                    }
                }
            }
            Event::ProtocolError {
                name,
                generation,
                detail,
            } => {
                let Some(i) = self.slot_index(&name, generation) else {
                    return;
                };
                let slot = &mut self.slots[i];
                warn!(service = %name, detail = %detail, "status protocol error; killing the service");
                slot.reported_error = Some(format!("status protocol error: {detail}"));
                if let Some(pid) = slot.pid {
                    kill_group(pid);
                }
                slot.killed = true;
            }
            Event::Exited {
                name,
                generation,
                status,
            } => {
                let Some(i) = self.slot_index(&name, generation) else {
                    return;
                };
                if let Some(pid) = self.slots[i].pid.take() {
                    // Whatever the service left behind in its group goes with it.
                    kill_group(pid);
                }
                let slot = &mut self.slots[i];
                slot.stop_deadline = None;
                if slot.state == ServiceState::Stopping {
                    slot.started_at = None;
                    match slot.after_stop {
                        AfterStop::Remove => {
                            info!(service = %name, "service stopped and removed");
                            self.slots.remove(i);
                        }
                        AfterStop::Restart => {
                            slot.history.reset();
                            slot.next_start = Some(now);
                            slot.state = ServiceState::Starting;
                            slot.settled = false;
                        }
                        AfterStop::Stay => {
                            info!(service = %name, status = %describe(status), "service stopped");
                            slot.state = ServiceState::Stopped;
                        }
                    }
                } else {
                    self.crashed(i, now, status);
                }
            }
        }
        self.check_ready();
    }

    fn crashed(&mut self, i: usize, now: Instant, status: Option<ExitStatus>) {
        let policy = self.settings.policy;
        let slot = &mut self.slots[i];
        let ran_for = slot
            .started_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        slot.started_at = None;
        slot.health = Health::Unknown;
        let how = describe(status);
        let message = match slot.reported_error.take() {
            Some(reported) if status.is_some() => format!("{reported} ({how})"),
            Some(reported) => reported,
            None => how,
        };
        slot.last_error = Some(message.clone());
        if self.shutting_down.is_some() {
            slot.state = ServiceState::Stopped;
            return;
        }
        match slot
            .history
            .on_crash(&policy, now, ran_for, fastrand::f64())
        {
            Decision::RestartAfter(delay) => {
                warn!(service = %slot.spec.name, error = %message, delay_ms = delay.as_millis(), "service crashed; restarting after backoff");
                slot.state = ServiceState::Backoff;
                slot.next_start = Some(now + delay);
            }
            Decision::Failed { retry_after } => {
                error!(service = %slot.spec.name, error = %message, limit = policy.crash_limit, window = %humantime_secs(policy.crash_window), retry_in = %humantime_secs(retry_after), "service failed: it crashed too often; retrying slowly");
                slot.state = ServiceState::Failed;
                slot.settled = true;
                slot.next_start = Some(now + retry_after);
            }
        }
    }

    fn check_ready(&mut self) {
        let ready = self
            .slots
            .iter()
            .filter(|s| s.state == ServiceState::Ready)
            .count();
        let failed = self
            .slots
            .iter()
            .filter(|s| s.state == ServiceState::Failed)
            .count();
        let line = format!(
            "STATUS={ready}/{} services ready{}",
            self.slots.len(),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
        if line != self.last_status_line && self.shutting_down.is_none() {
            self.notifier.notify(&line);
            self.last_status_line = line;
        }
        if !self.ready_sent && self.slots.iter().all(|s| s.settled) {
            self.ready_sent = true;
            self.notifier.notify("READY=1");
            info!(
                ready,
                failed, "all services ready or failed; supervisor ready"
            );
        }
    }

    /// One of the supervisor's own tasks ended. A child's watcher ends after its child; one
    /// that panicked counts as the child's exit (its process is killed with the watcher). A
    /// server that ends while the supervisor is not stopping stops everything, and the
    /// supervisor exits with the reason (systemd restarts it).
    fn on_task_end(
        &mut self,
        joined: Result<(tokio::task::Id, Result<(), String>), tokio::task::JoinError>,
    ) {
        let (id, outcome) = match joined {
            Ok((id, result)) => (id, result.err()),
            Err(e) => (
                e.id(),
                Some(if e.is_panic() {
                    crate::tasks::panicked(&*e.into_panic())
                } else {
                    "was cancelled".to_owned()
                }),
            ),
        };
        let Some(kind) = self.task_kinds.remove(&id) else {
            return;
        };
        match kind {
            OwnTask::Child { name, generation } => {
                if let Some(why) = outcome {
                    error!(service = %name, why = %why, "the watcher of a service ended; treating it as the service's exit");
                    self.on_event(Event::Exited {
                        name,
                        generation,
                        status: None,
                    });
                }
            }
            OwnTask::Metrics(cancel) if cancel.is_cancelled() => {}
            OwnTask::Control | OwnTask::Metrics(_) if self.root_cancel.is_cancelled() => {}
            OwnTask::Control | OwnTask::Metrics(_) => {
                let task = match kind {
                    OwnTask::Control => "control socket",
                    _ => "metrics endpoint",
                };
                let why = outcome.unwrap_or_else(|| "ended unexpectedly".to_owned());
                error!(task, why = %why, "a server of the supervisor ended; stopping");
                if self.fatal.is_none() {
                    self.fatal = Some(SupervisorError::TaskEnded { task, why });
                }
                self.begin_shutdown("a server of the supervisor ended");
            }
        }
    }

    fn begin_shutdown(&mut self, why: &str) {
        if self.shutting_down.is_some() {
            return;
        }
        let now = Instant::now();
        info!(reason = why, deadline = %humantime_secs(self.settings.stop_timeout), "stopping all services");
        self.notifier.notify("STOPPING=1");
        self.shutting_down = Some(now);
        let deadline = now + self.settings.stop_timeout;
        for slot in &mut self.slots {
            slot.next_start = None;
            slot.after_stop = AfterStop::Stay;
            match slot.pid {
                Some(pid) => {
                    terminate(pid);
                    slot.state = ServiceState::Stopping;
                    slot.stop_deadline = Some(deadline);
                }
                None => slot.state = ServiceState::Stopped,
            }
        }
    }

    async fn on_reload(&mut self) {
        if self.shutting_down.is_some() {
            return;
        }
        info!("SIGHUP: reloading configuration");
        self.notifier.notify("RELOADING=1");
        let result = (self.reload)();
        self.apply_reload(result).await;
        self.notifier.notify("READY=1");
    }

    async fn apply_reload(&mut self, result: Result<Plan, String>) {
        let plan = match result {
            Ok(plan) => plan,
            Err(reason) => {
                error!(reason = %reason, "configuration reload rejected; the running configuration stays in force");
                return;
            }
        };
        let old = &self.settings;
        if plan.settings.state_dir != old.state_dir || plan.settings.runtime_dir != old.runtime_dir
        {
            error!(
                reason = "[paths] cannot change while running; restart tsunagi to move them",
                "configuration reload rejected; the running configuration stays in force"
            );
            return;
        }
        if plan.settings.log_filter != old.log_filter
            && let Some(log) = &self.log
            && let Err(e) = log.set_filter(&plan.settings.log_filter)
        {
            warn!(
                error = &e as &dyn std::error::Error,
                "keeping the old log filter"
            );
        }
        let metrics_changed = plan.settings.metrics != old.metrics;
        self.settings = plan.settings.clone();
        if metrics_changed {
            if let Some(cancel) = self.metrics_cancel.take() {
                cancel.cancel();
            }
            if let Some(addr) = plan.settings.metrics
                && let Err(e) = self.start_metrics(addr).await
            {
                error!(error = &e as &dyn std::error::Error, "metrics stay off");
            }
        }

        let now = Instant::now();
        let mut restarted = Vec::new();
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for slot in &mut self.slots {
            if !plan.children.iter().any(|c| c.name == slot.spec.name) {
                removed.push(slot.spec.name.clone());
                slot.after_stop = AfterStop::Remove;
                slot.next_start = None;
                match slot.pid {
                    Some(pid) => {
                        terminate(pid);
                        slot.state = ServiceState::Stopping;
                        slot.stop_deadline = Some(now + self.settings.stop_timeout);
                    }
                    None => slot.state = ServiceState::Stopped,
                }
            }
        }
        self.slots
            .retain(|s| !(s.after_stop == AfterStop::Remove && s.pid.is_none()));
        for spec in plan.children {
            match self.slots.iter_mut().find(|s| s.spec.name == spec.name) {
                None => {
                    added.push(spec.name.clone());
                    self.slots.push(Slot::new(spec));
                }
                Some(slot) if slot.spec != spec => {
                    restarted.push(spec.name.clone());
                    slot.spec = spec;
                    slot.history.reset();
                    match slot.pid {
                        Some(pid) if slot.state != ServiceState::Stopping => {
                            terminate(pid);
                            slot.state = ServiceState::Stopping;
                            slot.after_stop = AfterStop::Restart;
                            slot.stop_deadline = Some(now + self.settings.stop_timeout);
                        }
                        Some(_) => slot.after_stop = AfterStop::Restart,
                        None => {
                            slot.next_start = Some(now);
                            slot.state = ServiceState::Starting;
                            slot.settled = false;
                        }
                    }
                }
                Some(slot) => {
                    // Removed by an earlier reload and still stopping: keep it after all.
                    if slot.after_stop == AfterStop::Remove {
                        slot.after_stop = AfterStop::Restart;
                    }
                }
            }
        }
        info!(
            restarted = ?restarted,
            added = ?added,
            removed = ?removed,
            "configuration reloaded"
        );
    }

    fn publish(&self) {
        let user = |s: &Slot| self.privileged.then(|| s.spec.user.clone());
        let snapshot = Snapshot {
            supervisor: SupervisorStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                privileged: self.privileged,
                ready: self.ready_sent,
                uptime_secs: 0,
                config: self.config_path.display().to_string(),
            },
            started: self.started,
            services: self
                .slots
                .iter()
                .map(|s| {
                    (
                        ServiceStatus {
                            name: s.spec.name.clone(),
                            state: s.state,
                            health: s.health,
                            pid: s.pid,
                            restarts: s.starts.saturating_sub(1),
                            last_error: s.last_error.clone(),
                            uptime_secs: None,
                            summary: s.summary.clone(),
                            user: user(s),
                            metrics: s.metrics.clone(),
                        },
                        s.started_at.filter(|_| s.pid.is_some()),
                    )
                })
                .collect(),
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

fn terminate(pid: u32) {
    if let Err(e) = kill(pid_of(pid), Signal::SIGTERM) {
        debug!(pid, error = %e, "SIGTERM not delivered");
    }
}

/// SIGKILL to the process and its whole group (the group id is the child's pid).
fn kill_group(pid: u32) {
    let _ = killpg(pid_of(pid), Signal::SIGKILL);
    let _ = kill(pid_of(pid), Signal::SIGKILL);
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "exit status unknown".to_owned(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(signal) => format!("killed by {}", signal.as_str()),
                Err(_) => format!("killed by signal {sig}"),
            },
            (None, None) => "exit status unknown".to_owned(),
        },
    }
}

fn humantime_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Reads one line of at most `max` bytes. `Ok(None)` at end of file.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&buf[..pos]);
            reader.consume(pos + 1);
            return Ok(Some(line));
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        reader.consume(n);
        if line.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
    }
}

/// Forwards one child's reports and its exit to the supervisor loop.
async fn watch_child(
    name: String,
    generation: u64,
    mut child: tokio::process::Child,
    stream: UnixStream,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut reader = BufReader::new(stream);
    let mut socket_open = true;
    let send_line = |line: Vec<u8>| -> Result<(), String> {
        let msg = serde_json::from_slice::<ChildMessage>(&line)
            .map_err(|e| format!("bad report: {e}"))?;
        let _ = events.send(Event::Message {
            name: name.clone(),
            generation,
            msg,
        });
        Ok(())
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            line = read_line_bounded(&mut reader, MAX_LINE), if socket_open => {
                let outcome = match line {
                    Ok(Some(line)) => send_line(line),
                    Ok(None) => { socket_open = false; Ok(()) }
                    Err(e) => Err(e.to_string()),
                };
                if let Err(detail) = outcome {
                    socket_open = false;
                    let _ = events.send(Event::ProtocolError { name: name.clone(), generation, detail });
                }
            }
        }
    };
    // The child's last words (an error report) may still be in the socket.
    if socket_open {
        let drain = async {
            while let Ok(Some(line)) = read_line_bounded(&mut reader, MAX_LINE).await {
                if send_line(line).is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    }
    let _ = events.send(Event::Exited {
        name,
        generation,
        status,
    });
}
