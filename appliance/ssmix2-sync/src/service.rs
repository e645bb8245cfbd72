//! The `ssmix2` service: runs sync cycles on a worker thread — on every change noticed
//! (inotify, after the settle delay) and at least every `scan-interval` — and reports
//! status and metrics: files seen, current keys, quarantined files by reason, outbox depth,
//! age of the oldest unsent change, last success.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tsunagi_config::WatchMode;
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::status::Health;
use tsunagi_runtime::tasks::{TaskEnded, Tasks};

use crate::replica::{DirReplica, Replica, ReplicaError};
use crate::sync::{CycleReport, State, SyncError, Syncer};
use crate::watcher;
use crate::webdav::{BaseUrl, WebDavReplica, WebDavSettings};
use consent::client::SocketGate;

/// Where the replica is.
#[derive(Debug, Clone)]
pub enum Target {
    Directory(PathBuf),
    WebDav {
        url: String,
        ca_file: PathBuf,
        client_cert_file: PathBuf,
        client_key_file: PathBuf,
    },
}

impl Target {
    /// The replica as the audit trail names it: its URL, or its directory.
    pub fn name(&self) -> String {
        match self {
            Target::Directory(dir) => dir.display().to_string(),
            Target::WebDav { url, .. } => url.clone(),
        }
    }
}

/// What the service needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sync: crate::sync::Settings,
    pub state_dir: PathBuf,
    pub consent_socket: PathBuf,
    pub target: Target,
    pub scan_interval: Duration,
    pub watch: WatchMode,
    /// The `audit` service's socket (ATNA); `None`: the audit trail is off.
    pub audit_socket: Option<PathBuf>,
    /// Where the conformance report goes after each cycle (`None`: nowhere).
    pub report: Option<PathBuf>,
}

impl Settings {
    /// The service's settings from the validated config and its `[ssmix2]` section.
    pub fn from_config(cfg: &tsunagi_config::Config, x: &tsunagi_config::Ssmix2Sync) -> Settings {
        let r = &x.replica;
        let target = match (&r.directory, &r.url) {
            (Some(dir), _) => Target::Directory(dir.as_path().to_owned()),
            (None, Some(url)) => {
                // The box's own certificate, as the identity service publishes it, or the
                // configured files.
                let files = identity::tls_files(
                    cfg.paths.state_dir.as_path(),
                    r.ca_file.as_ref(),
                    r.client_identity,
                    r.client_cert_file.as_ref(),
                    r.client_key_file.as_ref(),
                );
                Target::WebDav {
                    url: url.as_str().to_owned(),
                    ca_file: files.ca_file,
                    client_cert_file: files.cert_file,
                    client_key_file: files.key_file,
                }
            }
            // The config's rules require one of the two.
            (None, None) => Target::Directory(PathBuf::new()),
        };
        Settings {
            sync: crate::sync::Settings {
                storage: x.storage.as_path().to_owned(),
                settle: x.settle.get(),
                confirm_deletion: x.confirm_deletion.get(),
                recheck: x.recheck_interval.get(),
                withdrawal: x.withdrawal,
                facility: cfg.site.facility_code.to_string(),
                transaction_storage: x
                    .transaction_storage
                    .as_ref()
                    .map(|p| p.as_path().to_owned()),
                share: x.share.is_some(),
            },
            state_dir: cfg.paths.state_dir.as_path().join(crate::NAME),
            consent_socket: consent::service::socket_path(cfg),
            audit_socket: cfg.audit.enabled.then(|| audit::service::socket_path(cfg)),
            report: Some(crate::report_path(cfg)),
            target,
            scan_interval: x.scan_interval.get(),
            // A share delivers no inotify events, and before it is mounted inotify would
            // watch the empty mount point.
            watch: if x.share.is_some() {
                WatchMode::Poll
            } else {
                x.watch
            },
        }
    }
}

/// Errors that stop the service (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("cannot set up the replica")]
    Replica(#[from] ReplicaError),
    #[error("cannot start the sync worker")]
    WorkerStart(#[source] std::io::Error),
    #[error("the sync worker stopped")]
    Worker(#[source] TaskEnded),
    #[error(transparent)]
    Url(#[from] crate::webdav::BadBaseUrl),
    #[error("cannot read the audit records")]
    Audit(#[from] crate::audit_trail::TrailError),
    #[error("the SS-MIX2 sync cannot go on")]
    Background(#[source] TaskEnded),
    #[error("cannot listen on the desk socket {path}")]
    Desk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct Shared {
    last: Option<Result<CycleReport, String>>,
    state: State,
    watching: Option<usize>,
    /// A cycle is under way (status: `cycle_running`; the update installer reboots the box
    /// only between cycles).
    cycling: bool,
}

fn open_replica(target: &Target) -> Result<Box<dyn Replica>, ServiceError> {
    Ok(match target {
        Target::Directory(dir) => Box::new(DirReplica::new(dir)?),
        Target::WebDav {
            url,
            ca_file,
            client_cert_file,
            client_key_file,
        } => Box::new(WebDavReplica::new(&WebDavSettings {
            base_url: BaseUrl::new(url)?,
            ca_file: ca_file.clone(),
            client_cert_file: client_cert_file.clone(),
            client_key_file: client_key_file.clone(),
            timeout: Duration::from_secs(30),
        })?),
    })
}

/// Runs the service until shutdown.
pub async fn run(ctx: ServiceCtx, settings: Settings) -> Result<(), ServiceError> {
    let mut syncer = Syncer::open(&settings.state_dir, settings.sync.clone())?;
    // The replica is set up by the worker (blocking: reqwest's blocking client starts its
    // own thread), and again whenever the client certificate changes (a renewal).
    let shared = Arc::new(Mutex::new(Shared::default()));
    let changed = Arc::new(Notify::new());
    let (trigger_tx, trigger_rx) = mpsc::channel::<()>();
    if watcher::use_inotify(settings.watch, &settings.sync.storage) {
        let watching = watcher::spawn(&settings.sync.storage, trigger_tx.clone());
        if let Ok(mut s) = shared.lock() {
            s.watching = watching;
        }
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    syncer.stop_on(stop.clone());
    // The console's requeue and discard (保留中), beside the report it reads: carried out by
    // the worker between two operations.
    let (jobs, jobs_rx) = mpsc::channel::<crate::desk::Job>();
    let desk_listener = match settings.report.as_deref().and_then(std::path::Path::parent) {
        Some(dir) => Some(
            std::fs::create_dir_all(dir)
                .and_then(|()| crate::desk::bind(dir))
                .map_err(|source| ServiceError::Desk {
                    path: dir.join(crate::desk::SOCKET_NAME),
                    source,
                })?,
        ),
        None => None,
    };
    syncer.desk_on(crate::sync::handling::Desk {
        jobs: jobs_rx,
        recorder: Box::new(SocketGate::new(&settings.consent_socket)),
        waiting_file: settings
            .report
            .as_ref()
            .map(|r| r.with_file_name(crate::WAITING_FILE)),
    });
    let worker = {
        let (shared, changed, stop, settings) = (
            shared.clone(),
            changed.clone(),
            stop.clone(),
            settings.clone(),
        );
        std::thread::Builder::new()
            .name("ssmix2-sync".into())
            .spawn(move || worker(syncer, &settings, &trigger_rx, &shared, &changed, &stop))
            .map_err(ServiceError::WorkerStart)?
    };
    // The exports and deletions owed to the ATNA audit trail.
    let exports = crate::audit_trail::Exports::open(
        &settings.state_dir,
        SocketGate::new(&settings.consent_socket),
        &settings.target.name(),
        settings.audit_socket.is_some(),
    )?;
    let audit_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = Tasks::new(ctx.shutdown.clone());
    if let Some(listener) = desk_listener {
        tasks.spawn_fallible(
            "ssmix2-desk",
            crate::desk::serve(listener, jobs, ctx.shutdown.clone()),
        );
    }
    tasks.spawn(
        "audit-trail",
        audit::client::hand_over(
            audit::client::Sources::new()
                .with(exports)
                .with(crate::audit_trail::Alerts::open(&settings.state_dir)?),
            settings.audit_socket.clone(),
            audit_error.clone(),
            ctx.shutdown.clone(),
        ),
    );
    ctx.reporter.ready();
    tracing::info!("SS-MIX2 sync started");
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            ended = tasks.failed() => return Err(ServiceError::Background(ended)),
            _ = ticker.tick() => {}
            _ = changed.notified() => {}
        }
        if worker.is_finished() {
            let why = match worker.join() {
                Ok(()) => "ended unexpectedly".to_owned(),
                Err(payload) => tsunagi_runtime::tasks::panicked(&*payload),
            };
            let task = "ssmix2-sync";
            return Err(ServiceError::Worker(TaskEnded { task, why }));
        }
        let (mut health, mut summary, metrics) = report(&shared);
        if let Some(e) = audit_error.lock().ok().and_then(|e| e.clone()) {
            summary.push_str(&format!(
                "; exports and deletions not yet in the ATNA audit trail: {e}"
            ));
            if health == Health::Ok {
                health = Health::Degraded;
            }
        }
        let metrics: Vec<(&str, f64)> = metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        ctx.reporter.status_with_metrics(health, &summary, &metrics);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(trigger_tx);
    tasks.join(WORKER_STOP / 2).await;
    // The worker finishes the operation under way and starts no other. A replica operation
    // blocks up to its timeout (a hub that does not answer, a TLS handshake that hangs), so
    // the service waits for it only briefly: one left unfinished is in the outbox and is
    // carried out again by the next cycle ([`Syncer::stop_on`]), and the thread ends with
    // the process.
    let deadline = tokio::time::Instant::now() + WORKER_STOP;
    while !worker.is_finished() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !worker.is_finished() {
        tracing::info!(
            "a replica operation is still under way at the stop; it is left to end with the process and is repeated after the restart"
        );
    }
    Ok(())
}

/// How long a stop waits for the worker to finish the replica operation under way.
const WORKER_STOP: Duration = Duration::from_secs(1);
/// How often the idle worker looks whether the service is stopping.
const STOP_POLL: Duration = Duration::from_millis(100);

type CertStamp = Option<Vec<(u64, std::time::SystemTime)>>;

/// What identifies the TLS files a WebDAV replica was set up with (each one's length and
/// modification time: the CA, the client certificate): when one changes (the identity
/// service renewed the certificate, the network's CA was replaced), the replica is set up
/// again. `None` for a directory replica, or a file not there (yet).
fn certificate_stamp(target: &Target) -> CertStamp {
    match target {
        Target::Directory(_) => None,
        Target::WebDav {
            ca_file,
            client_cert_file,
            ..
        } => [ca_file, client_cert_file]
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)))
            })
            .collect(),
    }
}

fn worker(
    mut syncer: Syncer,
    settings: &Settings,
    triggers: &mpsc::Receiver<()>,
    shared: &Mutex<Shared>,
    changed: &Notify,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut gate = SocketGate::new(&settings.consent_socket);
    let mut refusals = audit::client::Refusals::default();
    let mut failures: u32 = 0;
    let mut replica: Option<(Box<dyn Replica>, CertStamp)> = None;
    loop {
        let span = tracing::info_span!("cycle");
        let _enter = span.enter();
        let started = Instant::now();
        let stamp = certificate_stamp(&settings.target);
        if replica.as_ref().is_none_or(|(_, was)| *was != stamp) {
            if replica.is_some() {
                tracing::info!("the TLS files changed; setting up the replica again");
            }
            replica = match open_replica(&settings.target) {
                Ok(r) => Some((r, stamp)),
                Err(e) => {
                    // Not enrolled yet (no certificate), a bad CA file: shown, and retried.
                    failures = failures.saturating_add(1);
                    let why = format!(
                        "cannot set up the replica: {}",
                        tsunagi_runtime::child::error_chain(&e)
                    );
                    tracing::warn!(reason = %why, "retrying");
                    if let Ok(mut s) = shared.lock() {
                        s.last = Some(Err(why));
                    }
                    changed.notify_one();
                    drop(_enter);
                    let wait = Duration::from_secs(2u64.saturating_pow(failures.min(6)))
                        .min(settings.scan_interval);
                    let deadline = Instant::now() + wait;
                    while Instant::now() < deadline {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        syncer.serve_desk();
                        std::thread::park_timeout(STOP_POLL);
                    }
                    continue;
                }
            };
        }
        let Some((replica_now, _)) = replica.as_mut() else {
            continue;
        };
        if let Ok(mut s) = shared.lock() {
            s.cycling = true;
        }
        changed.notify_one();
        let result = syncer.cycle(&mut gate, replica_now.as_mut());
        if let Ok(mut s) = shared.lock() {
            s.cycling = false;
        }
        let state = syncer.state().unwrap_or_default();
        // The hub's replica refused over TLS: a Security Alert, once per streak.
        let refused = match &result {
            Err(SyncError::Replica(ReplicaError::TlsRefused(reason))) => Some((
                settings.target.name(),
                format!("the hub's SS-MIX2 replica: {reason}"),
            )),
            _ => None,
        };
        if let Some(event) = refusals.observe(refused)
            && let Err(e) = syncer.record_event(&event)
        {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot keep a refused TLS peer for the audit trail"
            );
        }
        if let (Ok(cycle), Some(path)) = (&result, &settings.report) {
            keep_report(&syncer, cycle, path);
        }
        match &result {
            Ok(r) => {
                failures = 0;
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                if r.refused > 0 {
                    tracing::warn!(
                        refused = r.refused,
                        last = r.last_refusal.as_deref().unwrap_or_default(),
                        "the hub refused changes; they stay queued and are tried again every cycle, the others went on"
                    );
                }
                if r.files_read + r.published + r.renamed + r.removed == 0 {
                    // Nothing changed: the log stays quiet (info is for what moved).
                    tracing::debug!(
                        files = r.scanned.files,
                        held = r.held,
                        fresh = r.fresh,
                        ms,
                        "sync cycle done, nothing changed"
                    );
                } else {
                    tracing::info!(
                        files = r.scanned.files,
                        read = r.files_read,
                        published = r.published,
                        renamed = r.renamed,
                        removed = r.removed,
                        held = r.held,
                        fresh = r.fresh,
                        ms,
                        "sync cycle done"
                    );
                }
            }
            Err(SyncError::Stopped) => return,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(
                    error = e as &dyn std::error::Error,
                    "sync cycle failed; retrying"
                );
            }
        }
        if let Ok(mut s) = shared.lock() {
            s.last = Some(result.map_err(|e| tsunagi_runtime::child::error_chain(&e)));
            s.state = state;
        }
        changed.notify_one();
        drop(_enter);
        // Next cycle: after the scan interval, or sooner when something changed (then after
        // the settle delay, so a file being written is complete); after failures, back off.
        let backoff =
            Duration::from_secs(2u64.saturating_pow(failures.min(6))).min(settings.scan_interval);
        let unsettled = result_unsettled(shared);
        let wait = if failures > 0 {
            backoff
        } else if unsettled {
            settings.sync.settle.max(Duration::from_millis(200))
        } else {
            settings.scan_interval
        };
        let deadline = Instant::now() + wait;
        loop {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if syncer.serve_desk() {
                // A requeue: ask again now, whatever the backoff said.
                failures = 0;
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match triggers.recv_timeout(left.min(STOP_POLL)) {
                Ok(()) if failures == 0 => {
                    // Let a burst of events settle into one cycle.
                    let settle = settings.sync.settle.max(Duration::from_millis(200));
                    let until = Instant::now() + settle;
                    while let Some(left) = until.checked_duration_since(Instant::now()) {
                        if triggers.recv_timeout(left).is_err() {
                            break;
                        }
                    }
                    break;
                }
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::park_timeout(left.min(STOP_POLL));
                }
            }
        }
    }
}

/// Whether the last cycle left files that had not settled yet.
fn result_unsettled(shared: &Mutex<Shared>) -> bool {
    shared
        .lock()
        .is_ok_and(|s| matches!(&s.last, Some(Ok(r)) if r.unsettled > 0))
}

/// Replaces the conformance report at `path`, and what waits beside it
/// ([`crate::WAITING_FILE`]), both 0640: the console's group reads them. A report that
/// cannot be kept is logged and tried again after the next cycle: the sync itself goes on.
fn keep_report(syncer: &Syncer, cycle: &CycleReport, path: &std::path::Path) {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    fn keep<T: serde::Serialize>(
        made: Result<T, SyncError>,
        path: &std::path::Path,
    ) -> Result<(), String> {
        made.map_err(|e| tsunagi_runtime::child::error_chain(&e))
            .and_then(|report| serde_json::to_vec(&report).map_err(|e| e.to_string()))
            .and_then(|bytes| {
                tsunagi_state::replace_file(path, &bytes, 0o640).map_err(|e| e.to_string())
            })
    }
    if let Err(why) = keep(syncer.conformance(cycle, at), path) {
        tracing::warn!(%why, "cannot keep the conformance report");
    }
    syncer.keep_waiting(&path.with_file_name(crate::WAITING_FILE), at);
}

fn report(shared: &Mutex<Shared>) -> (Health, String, Vec<(String, f64)>) {
    let Ok(s) = shared.lock() else {
        return (Health::Degraded, "internal error".into(), Vec::new());
    };
    let st = &s.state;
    let mut metrics: Vec<(String, f64)> = vec![
        ("published_files".into(), st.published_files as f64),
        ("outbox_depth".into(), st.outbox_depth as f64),
        (
            "oldest_pending_age_seconds".into(),
            st.oldest_pending_age.unwrap_or(0) as f64,
        ),
        ("release_records_waiting".into(), st.releases_waiting as f64),
        ("cycle_running".into(), f64::from(u8::from(s.cycling))),
    ];
    if let Some(t) = st.last_success {
        metrics.push(("last_success_timestamp_seconds".into(), t as f64));
    }
    let (health, summary) = match &s.last {
        None => (Health::Ok, "first sync cycle running".to_owned()),
        Some(Err(e)) => (
            Health::Degraded,
            format!(
                "last cycle failed: {e}; {} changes waiting",
                st.outbox_depth
            ),
        ),
        Some(Ok(r)) => {
            let quarantined = r.scanned.by_status.get("quarantined").copied().unwrap_or(0);
            metrics.push(("files_seen".into(), r.scanned.files as f64));
            metrics.push(("current_keys".into(), r.scanned.current_keys as f64));
            metrics.push(("quarantined_files".into(), quarantined as f64));
            metrics.push(("held_files".into(), r.held as f64));
            metrics.push(("stale".into(), f64::from(u8::from(!r.fresh))));
            for (reason, n) in &r.scanned.by_reason {
                if ssmix2::reason::Reason::from_code(reason)
                    .is_some_and(|x| x.severity() == ssmix2::reason::Severity::Quarantine)
                {
                    metrics.push((
                        format!("quarantined_{}", reason.to_ascii_lowercase()),
                        *n as f64,
                    ));
                }
            }
            let consent = if r.fresh {
                "consent fresh"
            } else {
                "consent cache stale: holding (nothing new leaves)"
            };
            let mut summary = format!(
                "{} files, {} current keys, {quarantined} quarantined; {} published at the hub, {} waiting; {consent}",
                r.scanned.files, r.scanned.current_keys, st.published_files, st.outbox_depth
            );
            if st.releases_waiting > 0 {
                summary.push_str(&format!(
                    "; {} release records waiting for the audit trail",
                    st.releases_waiting
                ));
            }
            metrics.push(("refused_by_the_hub".into(), r.refused as f64));
            if r.refused > 0 {
                summary.push_str(&format!(
                    "; the hub refused {} of them in the last cycle ({}): tried again every cycle",
                    r.refused,
                    r.last_refusal.as_deref().unwrap_or_default()
                ));
            }
            (
                if r.fresh && r.refused == 0 {
                    Health::Ok
                } else {
                    Health::Degraded
                },
                summary,
            )
        }
    };
    (health, summary, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the hub refused shows in status: degraded, how many, why; and a metric.
    #[test]
    fn a_refusal_by_the_hub_is_degraded_in_status() {
        let refused = |n: u64| {
            Mutex::new(Shared {
                last: Some(Ok(CycleReport {
                    fresh: true,
                    refused: n,
                    last_refusal: (n > 0).then(|| {
                        "the replica refused an operation: the replica server answered 413 to PUT"
                            .to_owned()
                    }),
                    ..CycleReport::default()
                })),
                state: State {
                    outbox_depth: n,
                    ..State::default()
                },
                ..Shared::default()
            })
        };
        let (health, summary, metrics) = report(&refused(0));
        assert_eq!(health, Health::Ok, "{summary}");
        assert!(!summary.contains("refused"), "{summary}");
        let (health, summary, metrics_refused) = report(&refused(1));
        assert_eq!(health, Health::Degraded, "{summary}");
        assert!(
            summary.ends_with("; the hub refused 1 of them in the last cycle (the replica refused an operation: the replica server answered 413 to PUT): tried again every cycle"),
            "{summary}"
        );
        let metric = |m: &[(String, f64)]| {
            m.iter()
                .find(|(k, _)| k == "refused_by_the_hub")
                .map(|(_, v)| *v)
        };
        assert_eq!(metric(&metrics), Some(0.0));
        assert_eq!(metric(&metrics_refused), Some(1.0));
    }
}
