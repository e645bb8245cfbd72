//! The `audit` service: owns the queue (`audit.db`), records what the other services hand it
//! over its socket, and drains the queue to the network's audit repository.
//!
//! Socket: `RUNTIME-DIR/audit/record.sock` (directory 0750, group [`CLIENT_GROUP`]; socket
//! 0660), one JSON line each way ([`crate::protocol`]). An event is answered `recorded`
//! only once its message is committed. The service records its own Application Start when it
//! is ready and Application Stop when it stops.
//!
//! The drain sends the queue in order ([`crate::outbox::send_pending`], the queue locked only
//! to read a batch and to confirm it), with a backoff of
//! 1 s doubling to 60 s after failures, and status says how many messages wait, the last
//! confirmed sequence number, and the last failure (degraded while messages wait and the
//! repository fails).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::listen::{self, LineLimits, ServeError};
use tsunagi_runtime::status::Health;
use tsunagi_runtime::tasks::{TaskEnded, Tasks};

use crate::message::{self, Node};
use crate::outbox::{Outbox, OutboxError, Round, backoff, send_pending};
use crate::protocol::{Answer, Request};
use crate::syslog::{Repository, SyslogError};

/// The service name (its state and runtime directories).
pub const NAME: &str = "audit";
/// Its system user.
pub const USER: &str = "tsunagi-audit";
/// The group whose members may record events (connect to the socket).
pub const CLIENT_GROUP: &str = "tsunagi-audit-write";
/// The socket's file name in the service's runtime directory.
pub const SOCKET_NAME: &str = "record.sock";
/// The longest request line.
const MAX_REQUEST: usize = 64 * 1024;
const MAX_CLIENTS: usize = 32;
const IDLE: Duration = Duration::from_secs(60);
const STOP_TASKS: Duration = Duration::from_secs(1);

/// The audit service as the binary lists it.
pub const SERVICE: tsunagi_runtime::service::Service = tsunagi_runtime::service::Service {
    name: NAME,
    user: USER,
    description: "tsunagi ATNA audit trail",
    capabilities: &[],
    // Presents the box's certificate to the audit repository.
    groups: &[identity::CLIENT_GROUP],
    worker_threads: 1,
    launch: |cfg| {
        cfg.audit.enabled.then(|| tsunagi_runtime::service::Launch {
            shared_dirs: vec![(
                cfg.paths.runtime_dir.as_path().join(NAME),
                CLIENT_GROUP.to_owned(),
            )],
            ..tsunagi_runtime::service::Launch::reading(cfg, &cfg.audit)
        })
    },
    main: |cfg, ctx| tsunagi_runtime::service::boxed(main(cfg, ctx)),
};

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("[audit] has no repository")]
    NoRepository,
    #[error("the database task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("the audit service cannot go on")]
    Background(#[source] TaskEnded),
}

/// The socket's path for a config (what the other services connect to).
pub fn socket_path(cfg: &tsunagi_config::Config) -> PathBuf {
    cfg.paths.runtime_dir.as_path().join(NAME).join(SOCKET_NAME)
}

/// The box's name in every message: the machine's host name, or the facility code.
fn host_name(cfg: &tsunagi_config::Config) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| (33..=126).contains(&b)))
        .unwrap_or_else(|| cfg.site.facility_code.to_string())
}

struct Shared {
    outbox: Mutex<Outbox>,
    node: Node,
    /// Woken when an event is recorded, so the drain need not poll.
    recorded: Notify,
    last_failure: Mutex<Option<String>>,
    last_confirmed: Mutex<Option<(u64, SystemTime)>>,
}

impl Shared {
    /// Records events in one transaction; `Recorded` for one, `RecordedAll` for a batch.
    fn record(&self, events: &[crate::protocol::Event], batch: bool) -> Answer {
        if events.is_empty() || events.len() > crate::protocol::MAX_BATCH {
            return Answer::Error(format!(
                "a batch holds 1 to {} events",
                crate::protocol::MAX_BATCH
            ));
        }
        let Ok(mut outbox) = self.outbox.lock() else {
            return Answer::Error("internal error".into());
        };
        let now = SystemTime::now();
        let key = *outbox.pseudonym_key();
        let xmls: Vec<String> = events
            .iter()
            .map(|e| e.message(&self.node, &key, now).to_xml())
            .collect();
        match outbox.record_all(&xmls) {
            Ok((first, last)) => {
                drop(outbox);
                self.recorded.notify_one();
                if batch {
                    Answer::RecordedAll { first, last }
                } else {
                    Answer::Recorded { seq: first }
                }
            }
            Err(e) => Answer::Error(tsunagi_runtime::child::error_chain(&e)),
        }
    }

    /// Records the provisioning trail's complete lines after the saved offset (a trail
    /// shorter than the offset was replaced: read from its start). Returns how many events.
    fn take_provisioning(&self, path: &std::path::Path) -> Result<usize, String> {
        use std::io::{Read as _, Seek as _};
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut outbox = self
            .outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut offset = outbox.provisioning_offset().map_err(|e| e.to_string())?;
        if len < offset {
            offset = 0;
        }
        if len == offset {
            return Ok(0);
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        file.take(PROVISIONING_READ)
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        // Complete lines only: one being written is read next time.
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
            return Ok(0);
        };
        let key = *outbox.pseudonym_key();
        let now = SystemTime::now();
        let xmls: Vec<String> = String::from_utf8_lossy(&bytes[..=end])
            .lines()
            .filter_map(crate::protocol::provisioning_event)
            .map(|e| e.message(&self.node, &key, now).to_xml())
            .collect();
        outbox
            .record_provisioning(&xmls, offset + end as u64 + 1)
            .map_err(|e| tsunagi_runtime::child::error_chain(&e))?;
        drop(outbox);
        if !xmls.is_empty() {
            self.recorded.notify_one();
        }
        Ok(xmls.len())
    }

    fn record_own(&self, start: bool) -> Result<u64, OutboxError> {
        let xml = message::application_activity(&self.node, start, SystemTime::now()).to_xml();
        let mut outbox = self
            .outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = outbox.record(&xml)?;
        self.recorded.notify_one();
        Ok(seq)
    }

    fn report(&self) -> (Health, String, Vec<(&'static str, f64)>) {
        let waiting = self
            .outbox
            .lock()
            .ok()
            .and_then(|o| o.len().ok())
            .unwrap_or(0);
        let failure = self.last_failure.lock().ok().and_then(|f| f.clone());
        let confirmed = self.last_confirmed.lock().ok().and_then(|c| *c);
        let mut summary = format!("{waiting} audit messages waiting");
        if let Some((seq, at)) = confirmed {
            let ago = at.elapsed().map_or(0, |d| d.as_secs());
            summary.push_str(&format!("; repository has up to {seq} ({ago}s ago)"));
        }
        let health = match &failure {
            Some(f) if waiting > 0 => {
                summary.push_str(&format!("; last send failed: {f}"));
                Health::Degraded
            }
            _ => Health::Ok,
        };
        #[expect(clippy::cast_precision_loss, reason = "a gauge")]
        let metrics = vec![("tsunagi_audit_waiting", waiting as f64)];
        (health, summary, metrics)
    }
}

/// The service's run in its child process.
pub(crate) async fn main(
    cfg: &tsunagi_config::Config,
    ctx: ServiceCtx,
) -> Result<(), ServiceError> {
    let a = &cfg.audit;
    let repository = Repository {
        addr: a.repository.ok_or(ServiceError::NoRepository)?,
        server_name: rustls::pki_types::ServerName::IpAddress(
            a.repository.ok_or(ServiceError::NoRepository)?.ip().into(),
        ),
        tls: tsunagi_runtime::http::ReloadingTls::new(identity::tls_files(
            cfg.paths.state_dir.as_path(),
            a.ca_file.as_ref(),
            a.client_identity,
            a.client_cert_file.as_ref(),
            a.client_key_file.as_ref(),
        )),
        timeout: a.timeout.get(),
    };
    let node = Node {
        facility: cfg.site.facility_code.to_string(),
        serial: host_name(cfg),
        address: cfg.tunnel.as_ref().map(|t| t.address.addr().to_string()),
    };
    let db = ctx.state_dir.join("audit.db");
    let host = node.serial.clone();
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&db, &host))
        .await
        .map_err(ServiceError::Task)??;
    let runtime_dir = cfg.paths.runtime_dir.as_path().join(NAME);
    let provisioning = cfg
        .paths
        .state_dir
        .as_path()
        .join("provisioning")
        .join(PROVISIONING_TRAIL);
    run(ctx, outbox, node, repository, runtime_dir, provisioning).await
}

/// The provisioning trail's file name (in `STATE/provisioning/`, written by `tsunagi medium
/// apply`: one JSON line per medium applied, refused or failed).
pub const PROVISIONING_TRAIL: &str = "audit.jsonl";
/// The most of the provisioning trail read per look.
const PROVISIONING_READ: u64 = 1 << 20;
/// How often the provisioning trail is looked at.
const PROVISIONING_EVERY: Duration = Duration::from_secs(5);

/// Runs the audit service until shutdown.
pub async fn run(
    ctx: ServiceCtx,
    outbox: Outbox,
    node: Node,
    repository: Repository,
    runtime_dir: PathBuf,
    provisioning: PathBuf,
) -> Result<(), ServiceError> {
    let path = runtime_dir.join(SOCKET_NAME);
    let listener = listen::bind_socket(&path).map_err(|source| ServiceError::Listen {
        path: path.clone(),
        source,
    })?;
    let shared = Arc::new(Shared {
        outbox: Mutex::new(outbox),
        node,
        recorded: Notify::new(),
        last_failure: Mutex::new(None),
        last_confirmed: Mutex::new(None),
    });
    shared.record_own(true)?;
    let mut tasks = Tasks::new(ctx.shutdown.clone());
    tasks.spawn_fallible(
        "record-socket",
        serve(listener, shared.clone(), ctx.shutdown.clone()),
    );
    tasks.spawn(
        "drain",
        drain(shared.clone(), repository.clone(), ctx.shutdown.clone()),
    );
    tasks.spawn(
        "provisioning-trail",
        provisioning_trail(shared.clone(), provisioning, ctx.shutdown.clone()),
    );
    ctx.reporter.ready();
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            ended = tasks.failed() => return Err(ServiceError::Background(ended)),
            _ = ticker.tick() => {}
        }
        let (health, summary, metrics) = shared.report();
        ctx.reporter.status_with_metrics(health, &summary, &metrics);
    }
    tasks.join(STOP_TASKS).await;
    // The stop is recorded; it is sent at the next start (the repository may be far).
    shared.record_own(false)?;
    Ok(())
}

/// Records what the provisioning trail gained since the last look, every
/// [`PROVISIONING_EVERY`] (a medium is applied before the services start; one applied while
/// they run is seen within the interval).
async fn provisioning_trail(shared: Arc<Shared>, path: PathBuf, stop: CancellationToken) {
    loop {
        let (s, p) = (shared.clone(), path.clone());
        match tokio::task::spawn_blocking(move || s.take_provisioning(&p)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "cannot record the provisioning trail; trying again"
            ),
            Err(_) => return,
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROVISIONING_EVERY) => {}
        }
    }
}

async fn drain(shared: Arc<Shared>, repository: Repository, stop: CancellationToken) {
    let mut failures = 0u32;
    // The TLS refusal last put in the trail (once per streak, not once per retry).
    let mut alerted: Option<String> = None;
    loop {
        let round = send_pending(&shared.outbox, &repository).await;
        let wait = match round {
            Ok(Round::Confirmed(seq)) => {
                failures = 0;
                alerted = None;
                if let Ok(mut c) = shared.last_confirmed.lock() {
                    *c = Some((seq, SystemTime::now()));
                }
                if let Ok(mut f) = shared.last_failure.lock() {
                    *f = None;
                }
                Duration::ZERO
            }
            Ok(Round::Idle) => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = shared.recorded.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                Duration::ZERO
            }
            Err(e) => {
                failures += 1;
                // A refused TLS peer (the repository's certificate, or the repository
                // refusing the box's) is a security alert in the trail itself.
                if let crate::outbox::DrainError::Send(SyslogError::TlsRefused { addr, reason }) =
                    &e
                    && alerted.as_deref() != Some(reason.as_str())
                {
                    let event = crate::protocol::Event::RefusedTlsPeer {
                        reason: format!("the audit repository: {reason}"),
                        peer: addr.to_string(),
                    };
                    let shared = shared.clone();
                    if let Ok(Answer::Recorded { .. }) =
                        tokio::task::spawn_blocking(move || shared.record(&[event], false)).await
                    {
                        alerted = Some(reason.clone());
                    }
                }
                let reason = tsunagi_runtime::child::error_chain(&e);
                tracing::warn!(error = %reason, "audit messages not sent; retrying");
                if let Ok(mut f) = shared.last_failure.lock() {
                    *f = Some(reason);
                }
                backoff(failures)
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

/// Serves record requests until `stop` fires (the runtime's line server).
async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let limits = LineLimits {
        max_connections: MAX_CLIENTS,
        max_line: MAX_REQUEST,
        idle: IDLE,
    };
    listen::serve_json(listener, limits, stop, Answer::Error, move |request| {
        let shared = shared.clone();
        async move {
            let (events, batch) = match request {
                Request::Record(event) => (vec![event], false),
                Request::RecordAll(events) => (events, true),
            };
            tokio::task::spawn_blocking(move || shared.record(&events, batch))
                .await
                .unwrap_or_else(|_| Answer::Error("internal error".into()))
        }
    })
    .await
}
