//! The `dicom` service: the SCP on the clinic LAN, and the forwarder that sends what the
//! consent service permits (recipient the hub, the category of each instance's SOP class) to
//! the network PACS.
//!
//! Forwarding, every cycle:
//! 1. [`gate_round`] (blocking, through the [`Consent`] traits): the consent service's
//!    change feed releases the held instances of patients whose consent changed; ready
//!    instances are asked about (once per patient and category), held with the reason when
//!    denied (a stale cache or a clock behind: retried later, not held);
//! 2. the permitted ones are sent over `associations` associations at once (up to 64
//!    instances each) while a watcher reads the change feed every 100 ms
//!    ([`crate::inflight`]): nothing is sent before its first answer, nothing of a patient
//!    whose consent changed since the round's decisions, and a transfer of such a patient's
//!    instance under way is aborted, so nothing of a patient leaves more than 1 s after
//!    their withdrawal is recorded locally.
//!
//! Failures to reach the PACS back off (up to 5 minutes); instances not delivered within
//! `dead_letter_after` become dead letters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use consent::client::{
    Category, Decided, Decision, Gate, Identities, Object, Release, ReleaseKind, SocketGate,
};
use tokio_util::sync::CancellationToken;
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::status::Health;
use tsunagi_runtime::tasks::{TaskEnded, Tasks};

use crate::forward::{Destination, Outgoing, Spread, record};
use crate::inflight;
use crate::now;
use crate::scp;
use crate::spool::{Spool, SpoolError};

/// What the service needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub scp: scp::Settings,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub quota: u64,
    pub pacs: Destination,
    pub consent_socket: PathBuf,
    pub dead_letter_after: Duration,
    /// Patient-ID translation on the way out; `None`: sent as received.
    pub translation: Option<Translation>,
    /// Associations to the network PACS at once (each carries a share of a round's batch).
    pub associations: usize,
    /// With storage commitment: how long to wait for the PACS to commit an instance before
    /// it is sent again.
    pub commitment_timeout: Option<Duration>,
    /// Where each transfer is audited (ATNA).
    pub audit: crate::audit_trail::Settings,
    /// The console's desk socket's directory ([`crate::desk`]; prepared by the supervisor,
    /// group `tsunagi-desk`); `None`: no desk.
    pub desk_dir: Option<PathBuf>,
}

impl Settings {
    /// The service's settings from the validated config and its `[dicom]` section.
    pub fn from_config(cfg: &tsunagi_config::Config, d: &tsunagi_config::DicomBridge) -> Settings {
        let ae = cfg.site.ae_title.as_ref().to_owned();
        let pacs = Destination {
            ae_title: d.pacs.ae_title.as_ref().to_owned(),
            addr: d.pacs.address,
            calling_ae: ae.clone(),
            timeout: d.timeout.get(),
            storage_commitment: d.pacs.storage_commitment,
            tls: d.pacs.tls.then(|| {
                tsunagi_runtime::http::ReloadingTls::new(identity::tls_files(
                    cfg.paths.state_dir.as_path(),
                    d.pacs.ca_file.as_ref(),
                    d.pacs.client_identity,
                    d.pacs.client_cert_file.as_ref(),
                    d.pacs.client_key_file.as_ref(),
                ))
            }),
        };
        let consent_socket = consent::service::socket_path(cfg);
        let audit = crate::audit_trail::Settings {
            audit_socket: cfg.audit.enabled.then(|| audit::service::socket_path(cfg)),
            consent_socket: consent_socket.clone(),
            pacs_ae: pacs.ae_title.clone(),
            pacs_address: pacs.addr.to_string(),
        };
        Settings {
            audit,
            desk_dir: Some(cfg.paths.runtime_dir.as_path().join(crate::desk::DIR)),
            scp: scp::Settings {
                ae_title: ae.clone(),
                max_pdu: d.max_pdu,
                timeout: d.timeout.get(),
                max_associations: usize::try_from(d.max_associations).unwrap_or(16),
                allowed: d.allowed_callers.as_ref().map(|list| {
                    list.iter()
                        .map(|c| (c.ae_title.as_ref().to_owned(), c.address))
                        .collect()
                }),
                extra_sop_classes: d
                    .extra_sop_classes
                    .iter()
                    .map(|c| c.as_str().to_owned())
                    .collect(),
                header_limit: u64::from(d.header_limit_kib) * 1024,
                commitment_from: d.pacs.commitment_reporters(),
                refused_reports: Arc::default(),
                active: Arc::default(),
                // tsunagi_config::Config validation makes query/retrieve come with an allowed-callers list.
                proxy: d.query_retrieve.then(|| {
                    Arc::new(crate::qr::Proxy {
                        pacs: pacs.clone(),
                        destinations: d
                            .move_destinations
                            .iter()
                            .map(|m| (m.ae_title.as_ref().to_owned(), m.address))
                            .collect(),
                        work_dir: cfg
                            .paths
                            .state_dir
                            .as_path()
                            .join(crate::NAME)
                            .join("retrieve"),
                        facility_code: cfg.site.facility_code.as_str().to_owned(),
                        translate: d.patient_ids == tsunagi_config::PatientIdPolicy::Translate,
                        consent_socket: consent_socket.clone(),
                        spool: None,
                    })
                }),
            },
            listen: d.listen,
            state_dir: cfg.paths.state_dir.as_path().join(crate::NAME),
            quota: d.spool_quota_mib.saturating_mul(1 << 20),
            pacs,
            consent_socket,
            dead_letter_after: d.dead_letter_after.get(),
            associations: usize::try_from(d.forward_associations).unwrap_or(1),
            commitment_timeout: d
                .pacs
                .storage_commitment
                .then(|| d.pacs.commitment_timeout.get()),
            // tsunagi_config::Config validation makes `translate` come with [site.network-ids].
            translation: match (&d.patient_ids, &cfg.site.network_ids) {
                (tsunagi_config::PatientIdPolicy::Translate, Some(n)) => Some(Translation {
                    network_issuer: n.issuer.as_str().to_owned(),
                    network_oid: n.oid.as_str().to_owned(),
                    facility_code: cfg.site.facility_code.as_str().to_owned(),
                    header_limit: u64::from(d.header_limit_kib) * 1024,
                }),
                _ => None,
            },
        }
    }
}

/// How long a stop waits for the open associations to the PACS to be released.
const STOP_RELEASE: Duration = Duration::from_millis(500);
/// How long a stop waits for the service's tasks (the SCP's drain is 500 ms).
const STOP_TASKS: Duration = Duration::from_millis(800);

/// Instances one association carries per round.
const PER_ASSOCIATION: usize = 64;
/// An association to the network PACS unused this long is released (PACS commonly close
/// idle associations after 30 s or more).
const LINK_IDLE: Duration = Duration::from_secs(10);

/// The network's patient-identity domain and the clinic's, for [`crate::translate`].
#[derive(Debug, Clone)]
pub struct Translation {
    pub network_issuer: String,
    pub network_oid: String,
    pub facility_code: String,
    /// How much of a spooled data set is read to find its patient elements (the SCP refused
    /// any whose lie further: [`crate::walk::Walker`]).
    pub header_limit: u64,
}
/// How long the forwarder waits after an instance arrives before its round starts (what
/// arrives meanwhile goes in the same round).
const GATHER: Duration = Duration::from_millis(20);
/// How long an instance waits before its patient's network ID is asked for again.
const IDENTITY_RETRY: i64 = 10;
/// How long an instance waits after a transient deny (a stale cache, a clock behind).
const TRANSIENT_RETRY: i64 = 30;

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve the console's desk at {path}")]
    Desk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the DICOM bridge cannot go on")]
    Background(#[source] TaskEnded),
}

/// Runs the service until shutdown.
pub async fn run(ctx: ServiceCtx, settings: Settings) -> Result<(), ServiceError> {
    let spool = Spool::open(&settings.state_dir.join("spool"), settings.quota)?;
    spool.prepare()?;
    let mut scp_settings = settings.scp.clone();
    let refused_reports = scp_settings.refused_reports.clone();
    let active = scp_settings.active.clone();
    if let Some(proxy) = &settings.scp.proxy {
        let left = crate::qr::clean_work_dir(&proxy.work_dir);
        if left > 0 {
            tracing::info!(files = left, "removed what an interrupted retrieve left");
        }
        // A retrieve's working files count in the spool's quota.
        scp_settings.proxy = Some(Arc::new(crate::qr::Proxy {
            spool: Some(spool.clone()),
            ..(**proxy).clone()
        }));
    }
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServiceError::Listen {
            addr: settings.listen,
            source,
        })?;
    // The SCP ending or panicking ends the service with the reason (status shows it, the
    // supervisor restarts it), instead of the clinic's devices finding the port dead.
    let mut tasks = Tasks::new(ctx.shutdown.clone());
    tasks.spawn_fallible(
        "dicom-scp",
        scp::serve(
            listener,
            Arc::new(scp_settings),
            spool.clone(),
            ctx.shutdown.clone(),
        ),
    );
    // The spool's committing thread stopping (a panic) ends the service the same way: no
    // instance could be acknowledged after it. At a stop, the rows of what was answered
    // are written before the service ends (a row the spool's opening has to rebuild loses
    // its receipt's peer address), unless that takes longer than a stop may (the opening
    // rebuilds them then).
    let committing = spool.clone();
    let stop = ctx.shutdown.clone();
    tasks.spawn_fallible("spool-commit", async move {
        tokio::select! {
            e = committing.committer_stopped() => Err(e),
            () = stop.cancelled() => {
                let rows = tokio::task::spawn_blocking(move || committing.caught_up());
                match tokio::time::timeout(Duration::from_secs(1), rows).await {
                    Ok(Ok(caught_up)) => caught_up,
                    Ok(Err(_)) | Err(_) => Ok(()),
                }
            }
        }
    });
    if let Some(dir) = &settings.desk_dir {
        let listener = std::fs::create_dir_all(dir)
            .and_then(|()| crate::desk::bind(dir))
            .map_err(|source| ServiceError::Desk {
                path: dir.join(crate::desk::SOCKET_NAME),
                source,
            })?;
        tasks.spawn_fallible(
            "dicom-desk",
            crate::desk::serve(
                listener,
                spool.clone(),
                settings.consent_socket.clone(),
                ctx.shutdown.clone(),
            ),
        );
    }
    let audit_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    tasks.spawn(
        "audit-trail",
        audit::client::hand_over(
            audit::client::Sources::new()
                .with(crate::audit_trail::Transfers::new(
                    spool.clone(),
                    settings.audit.clone(),
                ))
                .with(crate::audit_trail::Events {
                    spool: spool.clone(),
                }),
            settings.audit.audit_socket.clone(),
            audit_error.clone(),
            ctx.shutdown.clone(),
        ),
    );
    ctx.reporter.ready();
    tracing::info!(listen = %settings.listen, "DICOM bridge listening");
    let mut gate = Some(SocketGate::new(&settings.consent_socket));
    let mut seq = 0i64;
    let mut backoff = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    // Associations kept open between rounds (reused while they cover what is sent).
    let mut links: Vec<crate::forward::Link> = Vec::new();
    let mut opened_total = 0u64;
    let mut failed_total = 0u64;
    let mut parallelism = Parallelism::new(settings.associations);
    // With storage commitment: where each association records what it stored, before it
    // asks for the commitment.
    let commit = settings
        .commitment_timeout
        .map(|resend_after| crate::forward::Commit {
            spool: spool.clone(),
            resend_after,
        });
    // The network PACS's TLS refusals, for the audit trail.
    let mut refusals = audit::client::Refusals::default();
    // Why the last storage commitment request was not made, until one is.
    let mut commitment_error: Option<String> = None;
    loop {
        let (stale, fresh): (Vec<_>, Vec<_>) = links.drain(..).partition(|l| l.idle() > LINK_IDLE);
        links = fresh;
        close_links(stale, LINK_CLOSE, &ctx.shutdown).await;
        let wait = tokio::time::sleep(backoff);
        // A new instance starts a round at once (after a moment that gathers what arrives
        // with it), unless the last one failed: then the backoff holds.
        let arrived = async {
            if last_error.is_none() {
                spool.arrived().await;
                tokio::time::sleep(GATHER).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                // A-RELEASE each open association (all at once), but never wait on a PACS
                // that does not answer: the stop must finish within 2 s.
                close_links(std::mem::take(&mut links), STOP_RELEASE, &CancellationToken::new()).await;
                tasks.join(STOP_TASKS).await;
                return Ok(());
            }
            ended = tasks.failed() => {
                close_links(std::mem::take(&mut links), LINK_CLOSE, &ctx.shutdown).await;
                return Err(ServiceError::Background(ended));
            }
            _ = wait => {}
            () = arrived => {}
        }
        let (g, result) = {
            let mut g = gate
                .take()
                .unwrap_or_else(|| SocketGate::new(&settings.consent_socket));
            let spool = spool.clone();
            let dead_after =
                i64::try_from(settings.dead_letter_after.as_secs()).unwrap_or(i64::MAX);
            let translation = settings.translation.clone();
            let limit = PER_ASSOCIATION * parallelism.now();
            match tokio::task::spawn_blocking(move || {
                let r = gate_round(
                    &mut g,
                    &spool,
                    seq,
                    dead_after,
                    translation.as_ref(),
                    limit,
                    now(),
                )
                .map_err(|e| tsunagi_runtime::child::error_chain(&e));
                (g, r)
            })
            .await
            {
                Ok(v) => v,
                // A bug: the service ends with it (status shows why), rather than retrying a
                // round that panics again.
                Err(e) => return Err(ServiceError::Background(ended("consent-round", e))),
            }
        };
        gate = Some(g);
        let round = match result {
            Ok(round) => {
                seq = round.seq;
                round
            }
            Err(e) => {
                last_error = Some(e);
                Round::default()
            }
        };
        let permitted = round.permitted;
        if !permitted.is_empty() {
            let g = gate
                .take()
                .unwrap_or_else(|| SocketGate::new(&settings.consent_socket));
            let n = parallelism.now();
            // No more associations kept than the destination takes now.
            if links.len() > n {
                let extra = links.split_off(n);
                close_links(extra, LINK_CLOSE, &ctx.shutdown).await;
            }
            let (g, sent) = send_watched(
                g,
                &settings.consent_socket,
                round.seq,
                &settings.pacs,
                &permitted,
                n,
                &mut links,
                &ctx.shutdown,
                commit.as_ref(),
            )
            .await;
            gate = Some(g);
            // The PACS refused over DICOM TLS: a Security Alert, once per streak.
            let refused = sent
                .refused
                .clone()
                .map(|(peer, why)| (peer, format!("the network PACS: {why}")));
            if let Some(event) = refusals.observe(refused) {
                let spool = spool.clone();
                let kept = tokio::task::spawn_blocking(move || spool.record_event(&event)).await;
                if !matches!(kept, Ok(Ok(()))) {
                    tracing::warn!("cannot keep a refused TLS peer for the audit trail");
                }
            }
            if let Some(why) = sent.panicked {
                // What the panicked share sent is not recorded: end the service (its restart
                // sends those instances again, which the PACS stores once) rather than go on.
                return Err(ServiceError::Background(TaskEnded {
                    task: "forward",
                    why,
                }));
            }
            opened_total += sent.opened;
            failed_total += sent.failed as u64;
            if let Some(lowered) = parallelism.observe(sent.worked, sent.failed) {
                tracing::warn!(
                    associations = lowered,
                    configured = settings.associations,
                    "the network PACS did not take every association at once; sending over fewer (tried again later)"
                );
            }
            for asked in &sent.commitments {
                match &asked.transaction {
                    Ok(_) => commitment_error = None,
                    Err(why) => {
                        tracing::warn!(
                            instances = asked.ids.len(),
                            reason = %why,
                            "no storage commitment asked for; these instances are sent again when the commitment timeout runs out"
                        );
                        commitment_error = Some(why.clone());
                    }
                }
            }
            let committing = settings
                .commitment_timeout
                .map(|t| crate::forward::Committing {
                    requested: &sent.commitments,
                    resend_after: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                });
            let delivered = record(&spool, &sent.outcomes, now(), committing).unwrap_or(0);
            let stopped = sent
                .outcomes
                .iter()
                .filter(|(_, o)| *o == crate::forward::Outcome::Stopped)
                .count();
            let unsent = permitted.len() - sent.outcomes.len();
            if stopped > 0 {
                // Counts only: which patient is not logged.
                tracing::info!(
                    stopped,
                    unsent,
                    "a consent changed while its patient's instances were being sent: they were not sent (a transfer under way was aborted) and are decided again"
                );
            }
            if let Some(message) = sent.error {
                tracing::warn!(error = %message, "cannot forward to the network PACS; retrying");
                let later = now() + i64::try_from(backoff.as_secs()).unwrap_or(1);
                let done: Vec<i64> = sent.outcomes.iter().map(|(id, _)| *id).collect();
                for q in permitted
                    .iter()
                    .map(|o| &o.queued)
                    .filter(|q| !done.contains(&q.id))
                {
                    let _ = spool.retry_later(q.id, &message, later);
                }
                last_error = Some(message);
                backoff = (backoff * 2).min(Duration::from_secs(300));
            } else if ctx.shutdown.is_cancelled() {
                tracing::info!(
                    delivered,
                    unsent,
                    "stopping: what the network PACS has not answered stays queued"
                );
            } else {
                tracing::info!(delivered, "forwarded to the network PACS");
                last_error = None;
                backoff = Duration::from_millis(200);
            }
        } else if last_error.is_none() {
            backoff = Duration::from_secs(1);
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        let counts = spool.counts().unwrap_or_default();
        let summary = format!(
            "{} waiting, {}{} held in the clinic, {} dead letters, {} delivered, {} duplicates{}{}{}{}{}",
            counts.pending,
            if settings.commitment_timeout.is_some() {
                format!(
                    "{} stored at the network PACS awaiting its storage commitment, ",
                    counts.awaiting_commitment
                )
            } else {
                String::new()
            },
            counts.held,
            counts.dead,
            counts.delivered,
            counts.duplicates,
            if parallelism.now() < settings.associations.max(1) {
                format!(
                    "; {} of {} associations (the network PACS takes no more at once)",
                    parallelism.now(),
                    settings.associations.max(1)
                )
            } else {
                String::new()
            },
            last_error
                .as_ref()
                .map(|e| format!("; last forward failed: {e}"))
                .unwrap_or_default(),
            commitment_error
                .as_ref()
                .map(|e| format!("; storage commitment: {e}"))
                .unwrap_or_default(),
            match refused_reports.load(std::sync::atomic::Ordering::Relaxed) {
                0 => String::new(),
                n => format!(
                    "; {n} storage commitment reports refused: not from the network PACS's AE title at its address (or [[dicom.pacs.commitment-reports-from]])"
                ),
            },
            match audit_error.lock().ok().and_then(|e| e.clone()) {
                Some(e) => format!(
                    "; {} transfers not yet in the audit trail: {e}",
                    counts.transfers_waiting
                ),
                None => String::new(),
            }
        );
        let audit_failing = audit_error.lock().is_ok_and(|e| e.is_some());
        let refused = refused_reports.load(std::sync::atomic::Ordering::Relaxed);
        let health = if last_error.is_some()
            || commitment_error.is_some()
            || refused > 0
            || counts.dead > 0
            || audit_failing
        {
            Health::Degraded
        } else {
            Health::Ok
        };
        ctx.reporter.status_with_metrics(
            health,
            &summary,
            &[
                ("spool_pending", counts.pending as f64),
                ("spool_held", counts.held as f64),
                ("spool_dead", counts.dead as f64),
                ("spool_bytes", counts.bytes as f64),
                ("delivered_total", counts.delivered as f64),
                ("duplicates_total", counts.duplicates as f64),
                ("associations_opened_total", opened_total as f64),
                ("associations_failed_total", failed_total as f64),
                ("associations_parallel", parallelism.now() as f64),
                ("release_records_waiting", counts.releases_waiting as f64),
                ("transfer_records_waiting", counts.transfers_waiting as f64),
                (
                    "spool_awaiting_commitment",
                    counts.awaiting_commitment as f64,
                ),
                ("commitment_reports_refused_total", refused as f64),
                (
                    "associations_inbound_active",
                    active.load(std::sync::atomic::Ordering::SeqCst) as f64,
                ),
            ],
        );
    }
}

/// A blocking task of the forwarder that did not finish, as the error that ends the service.
fn ended(task: &'static str, e: tokio::task::JoinError) -> TaskEnded {
    TaskEnded {
        task,
        why: if e.is_panic() {
            tsunagi_runtime::tasks::panicked(&*e.into_panic())
        } else {
            "was cancelled".to_owned()
        },
    }
}

/// Sends `batch` while a watcher reads the consent change feed from `since`
/// ([`crate::inflight`]): nothing is sent before its first answer, and nothing of a patient
/// whose consent changed after it; the gate comes back when the batch is over.
///
/// `shutdown` (the service's stop) ends the batch at once wherever it waits on the PACS;
/// what has no response yet stays queued ([`crate::forward`]), and no error is reported.
#[expect(
    clippy::too_many_arguments,
    reason = "one round's batch and where it goes"
)]
async fn send_watched(
    mut gate: SocketGate,
    socket: &std::path::Path,
    since: i64,
    dest: &Destination,
    batch: &[Outgoing],
    n: usize,
    links: &mut Vec<crate::forward::Link>,
    shutdown: &CancellationToken,
    commit: Option<&crate::forward::Commit>,
) -> (SocketGate, Spread) {
    let (watch, stop) = inflight::channel(inflight::MAX_AGE);
    let stop = stop.with_shutdown(shutdown.clone());
    let (done, done_rx) = std::sync::mpsc::channel();
    let watcher = tokio::task::spawn_blocking(move || {
        inflight::watch_feed(&mut gate, since, &watch, &done_rx);
        gate
    });
    let confirmed = tokio::select! {
        confirmed = stop.first_confirmation() => Some(confirmed),
        () = shutdown.cancelled() => None,
    };
    let sent = if confirmed.is_none() {
        // Stopping: nothing went, the instances stay queued.
        Spread::default()
    } else if confirmed == Some(true) {
        crate::forward::send_parallel(dest, batch, n, links, &stop, commit).await
    } else {
        // Nothing went: the instances stay queued for the next round.
        Spread {
            error: Some("cannot read the consent service's change feed".to_owned()),
            ..Spread::default()
        }
    };
    let _ = done.send(());
    let gate = watcher.await.unwrap_or_else(|_| SocketGate::new(socket));
    (gate, sent)
}

/// How long releasing idle associations may take while the service runs (a PACS that does
/// not answer A-RELEASE-RQ: the connection is closed).
const LINK_CLOSE: Duration = Duration::from_secs(2);

/// Releases `links` (all at once), for at most `within` or until `stop`; what is not
/// released by then is closed.
async fn close_links(links: Vec<crate::forward::Link>, within: Duration, stop: &CancellationToken) {
    if links.is_empty() {
        return;
    }
    let mut closing = tokio::task::JoinSet::new();
    for l in links {
        closing.spawn(l.close());
    }
    let all = async { while closing.join_next().await.is_some() {} };
    tokio::select! {
        _ = tokio::time::timeout(within, all) => {}
        () = stop.cancelled() => {}
    }
    // Dropping the set aborts the releases still waiting: their connections close.
}

/// How many associations a round opens to the destination at once: the configured number,
/// lowered to what worked when an association failed to open (refused, rejected, timed out
/// or given up) while another one sent; raised by one again every [`PARALLELISM_RECOVERY`]
/// (a probe: if it fails, it costs at most [`crate::forward::OPEN_GRACE`], or the
/// association timeout while the others are still sending, and lowers it again). A round
/// in which none opened is an outage, not a limit: it changes nothing.
#[derive(Debug)]
pub struct Parallelism {
    max: usize,
    now: usize,
    since: std::time::Instant,
}

/// How long a lowered parallelism holds before one more association is tried.
pub const PARALLELISM_RECOVERY: Duration = Duration::from_secs(300);

impl Parallelism {
    pub fn new(max: usize) -> Parallelism {
        let max = max.max(1);
        Parallelism {
            max,
            now: max,
            since: std::time::Instant::now(),
        }
    }

    /// The number for the next round (one more, when lowered long enough ago).
    pub fn now(&mut self) -> usize {
        self.now_at(std::time::Instant::now())
    }

    fn now_at(&mut self, at: std::time::Instant) -> usize {
        if self.now < self.max && at.saturating_duration_since(self.since) >= PARALLELISM_RECOVERY {
            self.now += 1;
            self.since = at;
        }
        self.now
    }

    /// After a round: `worked` associations sent, `failed` did not open. Returns the new
    /// number when it was lowered.
    pub fn observe(&mut self, worked: usize, failed: usize) -> Option<usize> {
        self.observe_at(worked, failed, std::time::Instant::now())
    }

    fn observe_at(
        &mut self,
        worked: usize,
        failed: usize,
        at: std::time::Instant,
    ) -> Option<usize> {
        if failed == 0 || worked == 0 {
            return None;
        }
        self.since = at;
        let lowered = worked.min(self.now).max(1);
        if lowered < self.now {
            self.now = lowered;
            return Some(lowered);
        }
        None
    }
}

/// What the forwarder asks the consent service: decisions and the change feed ([`Gate`]),
/// and patients' network IDs ([`Identities`]). [`SocketGate`] in the service; a scripted gate
/// in the tests.
pub trait Consent: Gate + Identities {}

impl<T: Gate + Identities + ?Sized> Consent for T {}

/// Why a round with the consent service ended early (its instances stay queued).
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Gate(#[from] consent::client::GateError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// What a round decided.
#[derive(Debug, Default)]
pub struct Round {
    /// The change feed's position before the round's decisions: the watcher of the batch
    /// reads on from here ([`crate::inflight`]).
    pub seq: i64,
    /// The instances that may be sent, in queue order.
    pub permitted: Vec<Outgoing>,
}

/// One round with the consent service (blocking): releases held instances of patients whose
/// consent changed since `seq`, marks dead letters, and decides up to `limit` ready instances.
///
/// Each instance is asked about with the category of its own SOP class (a report or an
/// encapsulated PDF is `documents`, an image `images`); a class no category covers, and an
/// instance without a PatientID, is held without asking. One question per (patient,
/// category) per round. A deny is held with its reason (released by the change feed); a
/// transient one (a stale cache, a clock behind) is retried later, not held. With
/// `translation`, a permitted instance also needs its patient's network ID (asked once per
/// patient per round), else it waits.
pub fn gate_round(
    gate: &mut dyn Consent,
    spool: &Spool,
    seq: i64,
    dead_after: i64,
    translation: Option<&Translation>,
    limit: usize,
    now: i64,
) -> Result<Round, RoundError> {
    record_releases(gate, spool);
    let changes = gate.changes(seq)?;
    for p in &changes.patients {
        spool.release_patient(p)?;
    }
    if let Ok(n) = spool.dead_letters(now.saturating_sub(dead_after))
        && n > 0
    {
        // The alert: also in the status (degraded) and the spool_dead metric.
        tracing::error!(
            count = n,
            "instances not delivered within dead-letter-after are dead letters now; they stay in the clinic until an operator acts"
        );
    }
    let mut permitted = Vec::new();
    // Each (patient, category) asked once a round: its answer, or why the consent service
    // refused the question.
    let mut decided: Vec<((String, Category), Result<Decided, String>)> = Vec::new();
    // The permit each instance is sent under (its audit row), for its release record.
    let mut sent_under: Vec<(i64, i64)> = Vec::new();
    let mut identities: Vec<(String, Result<Option<String>, String>)> = Vec::new();
    for q in spool.ready(now, limit)? {
        let Some(patient) = q.meta.patient_id.clone() else {
            spool.hold(q.id, crate::desk::NO_PATIENT_ID)?;
            continue;
        };
        // The question is asked with the category of this exact object: a structured report
        // or an encapsulated PDF is a document, not an image. A class no category covers is
        // held, never sent.
        let Some(category) = Category::for_dicom_sop_class(&q.meta.sop_class) else {
            spool.hold(q.id, crate::desk::NO_CATEGORY)?;
            continue;
        };
        let key = (patient.clone(), category);
        let answer = match decided.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => v.clone(),
            None => {
                let v = refused_or(gate.decide(&patient, category))?;
                decided.push((key, v.clone()));
                v
            }
        };
        // The consent service refused the question itself (e.g. an ID its model does not
        // take): this instance is held with the reason, and the round goes on for the
        // others; never a round that stops at it (head-of-line blocking).
        let verdict = match answer {
            Ok(v) => v,
            Err(why) => {
                spool.hold(q.id, &why)?;
                continue;
            }
        };
        match verdict.decision {
            Decision::Permit => {
                sent_under.push((q.id, verdict.audit));
                let Some(t) = translation else {
                    permitted.push(Outgoing::from(q));
                    continue;
                };
                let network_id = match identities.iter().find(|(p, _)| *p == patient) {
                    Some((_, n)) => n.clone(),
                    None => {
                        let n = refused_or(gate.network_id(&patient))?;
                        identities.push((patient.clone(), n.clone()));
                        n
                    }
                };
                let network_id = match network_id {
                    Ok(n) => n,
                    Err(why) => {
                        spool.hold(q.id, &why)?;
                        continue;
                    }
                };
                let Some(network_id) = network_id else {
                    // Every instance of the patient goes under the same ID: wait for it.
                    spool.retry_later(q.id, crate::desk::NO_NETWORK_ID, now + IDENTITY_RETRY)?;
                    continue;
                };
                match translated(&q, t, &patient, &network_id) {
                    Ok(head) => permitted.push(Outgoing {
                        queued: q,
                        head: Some(head),
                    }),
                    Err(reason) => spool.hold(q.id, &reason)?,
                }
            }
            Decision::Deny(reason) if reason.is_transient() => {
                spool.retry_later(
                    q.id,
                    &format!(
                        "{}{reason}; asked again later",
                        crate::desk::CONSENT_FOR_NOW
                    ),
                    now + TRANSIENT_RETRY,
                )?;
            }
            Decision::Deny(reason) => spool.hold(q.id, reason.as_str())?,
        }
    }
    spool.set_decisions(&sent_under)?;
    Ok(Round {
        seq: changes.seq,
        permitted,
    })
}

/// A refusal of the consent service (it answered, and said no to the question itself) as the
/// reason an instance is held; any other failure (it cannot be reached, or answered nonsense)
/// ends the round: nothing is sent without an answer.
fn refused_or<T>(
    answer: Result<T, consent::client::GateError>,
) -> Result<Result<T, String>, RoundError> {
    match answer {
        Ok(v) => Ok(Ok(v)),
        Err(consent::client::GateError::Refused(why)) => {
            Ok(Err(format!("{}{why}", crate::desk::CONSENT_REFUSED)))
        }
        Err(e) => Err(e.into()),
    }
}

/// How many release records one round sends to the consent service at most.
const RELEASES_PER_ROUND: usize = 4096;

/// Sends the release records of delivered instances to the consent service's audit trail
/// (what left: the SOP Instance UID; under which permit), grouped by patient, category and
/// permit. A failure keeps them in the spool's database for the next round and holds nothing
/// back (status shows how many wait).
fn record_releases(gate: &mut dyn Gate, spool: &Spool) {
    let pending = match spool.pending_releases(RELEASES_PER_ROUND) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot read the release records"
            );
            return;
        }
    };
    // (patient, category, permit) → the instances released under it.
    type Group<'a> = (
        (String, Option<Category>, Option<i64>),
        Vec<&'a crate::spool::PendingRelease>,
    );
    let mut groups: Vec<Group<'_>> = Vec::new();
    for r in &pending {
        let key = (
            r.patient_id.clone(),
            Category::for_dicom_sop_class(&r.sop_class),
            r.decision,
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, rows)) => rows.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    for ((patient, category, decision), rows) in groups {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        // Only instances of a category were ever permitted; anything else is no release.
        if let Some(category) = category {
            let release = Release {
                patient,
                category,
                kind: ReleaseKind::Sent,
                objects: rows
                    .iter()
                    .map(|r| {
                        Object::DicomInstance(
                            r.sop_instance.trim_end_matches(['\0', ' ']).to_owned(),
                        )
                    })
                    .collect(),
                decision,
            };
            match gate.released(&release) {
                Ok(()) => {}
                // This request was refused (e.g. a malformed SOP Instance UID): it stays
                // queued and counted, and does not hold back the others.
                Err(e @ consent::client::GateError::Refused(_)) => {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "the consent service refused a release record; it stays queued"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "cannot record releases in the audit trail yet; they stay queued"
                    );
                    return;
                }
            }
        }
        if let Err(e) = spool.releases_recorded(&ids) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot mark release records as recorded; they may be recorded twice"
            );
            return;
        }
    }
}

/// The rewritten start of a spooled instance, or why it cannot be translated (a reason for
/// the held state; never patient data).
fn translated(
    q: &crate::spool::Queued,
    t: &Translation,
    local_id: &str,
    network_id: &str,
) -> Result<crate::translate::Rewritten, String> {
    use std::io::Read as _;
    let Some(explicit) = crate::translate::data_set_is_explicit(&q.meta.transfer_syntax) else {
        return Err(format!(
            "cannot translate patient IDs in transfer syntax {}",
            q.meta.transfer_syntax
        ));
    };
    let mut prefix = Vec::new();
    std::fs::File::open(&q.path)
        .and_then(|mut f| {
            use std::io::Seek as _;
            // The data set only (in a segment from its record's offset; the object's
            // trailer, or the next record, follows it).
            f.seek(std::io::SeekFrom::Start(q.offset))?;
            f.take(t.header_limit.min(q.size))
                .read_to_end(&mut prefix)
                .map(|_| ())
        })
        .map_err(|e| format!("cannot read the spooled instance: {}", e.kind()))?;
    let ids = crate::translate::Identity {
        network_id: network_id.to_owned(),
        network_issuer: t.network_issuer.clone(),
        network_oid: t.network_oid.clone(),
        local_id: local_id.to_owned(),
        facility_code: t.facility_code.clone(),
    };
    crate::translate::rewrite(&prefix, explicit, prefix.len() as u64 >= q.size, &ids)
        .map_err(|e| format!("cannot translate patient IDs: {e}"))
}

#[cfg(test)]
mod release_tests;
#[cfg(test)]
mod tests;
