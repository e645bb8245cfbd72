//! The consent service: answers decisions for the other services over a Unix socket, and
//! reports the cache's state.
//!
//! Socket: `RUNTIME-DIR/consent/decide.sock` (directory 0750 owned by the service's user;
//! socket 0660). One request per line, one answer per line, in the typed protocol of the
//! `consent-protocol` crate ([`Request`], [`Answer`]; wire shapes there). Every decision is
//! written to the audit trail before it is answered, and the answer carries its row's
//! number; a release ([`Request::Released`]: what reached, or was removed at, a recipient)
//! is one row per object referring to that number. A decision is a local database lookup;
//! no network call is ever made on this path.
//!
//! The change feed ([`Request::Changes`]) lists the patients whose consents changed after a
//! change number (at most [`CHANGES_PAGE`] per answer; ask again from `seq` while `more`),
//! and whether the cache is fresh (a stale cache denies every decision for a recipient
//! outside the clinic). The SS-MIX2 sync and the DICOM forwarder use it to re-ask only about
//! patients whose consent changed. Identity (名寄せ): [`Request::NetworkIdOf`] and
//! [`Request::LocalIdOf`]; the DICOM bridge translates patient IDs with them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::listen::{self, Line, LineLimits, ServeError};
use tsunagi_runtime::status::Health;
use tsunagi_runtime::tasks::{TaskEnded, Tasks};

use crate::decide::Decision;
use crate::model::PatientId;
use crate::store::{Store, StoreError};
use crate::time;

/// The socket's file name inside the service's runtime directory.
pub const SOCKET_NAME: &str = "decide.sock";
/// The longest request line (a release request carries up to
/// [`consent_protocol::MAX_RELEASE_OBJECTS`] objects).
const MAX_REQUEST: usize = consent_protocol::MAX_LINE;
/// The most patients one change-feed answer lists.
pub const CHANGES_PAGE: usize = 1000;
const MAX_CLIENTS: usize = 32;
const IDLE: Duration = Duration::from_secs(60);

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the database task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("the consent service cannot go on")]
    Background(#[source] TaskEnded),
}

pub use consent_protocol::{Answer, Changes, Identity, Request};

fn error(message: String) -> Answer {
    Answer::Error(message)
}

/// What the service needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub freshness_bound: Duration,
    /// The service's runtime directory (prepared by the supervisor).
    pub runtime_dir: PathBuf,
    /// The network's FHIR server, if sync is configured.
    pub fhir: Option<crate::sync::Client>,
    pub pull_interval: Duration,
    /// The `audit` service's socket, for the ATNA audit trail of consent and identity
    /// changes; `None`: the trail is off.
    pub audit_socket: Option<PathBuf>,
    /// The desk socket's directory (prepared by the supervisor, group
    /// [`crate::desk::GROUP`]); `None`: no desk (tests of the decisions alone).
    pub desk_dir: Option<PathBuf>,
}

impl Settings {
    /// The service's settings from the validated config.
    pub fn from_config(cfg: &tsunagi_config::Config) -> Settings {
        Settings {
            freshness_bound: cfg.consent.freshness_bound.get(),
            runtime_dir: cfg.paths.runtime_dir.as_path().join(crate::NAME),
            fhir: cfg.consent.fhir_url.as_ref().map(|url| {
                let addr = std::net::SocketAddr::V4(url.addr());
                let timeout = Duration::from_secs(10);
                let c = &cfg.consent;
                let client = if url.is_tls() {
                    crate::sync::Client::tls(
                        addr,
                        url.path(),
                        timeout,
                        identity::tls_files(
                            cfg.paths.state_dir.as_path(),
                            c.ca_file.as_ref(),
                            c.client_identity,
                            c.client_cert_file.as_ref(),
                            c.client_key_file.as_ref(),
                        ),
                    )
                } else {
                    crate::sync::Client::new(addr, url.path(), timeout)
                };
                match &cfg.site.network_ids {
                    Some(n) => client.with_network_id_system(format!("urn:oid:{}", n.oid)),
                    None => client,
                }
            }),
            pull_interval: cfg.consent.pull_interval.get(),
            audit_socket: cfg.audit.enabled.then(|| audit::service::socket_path(cfg)),
            desk_dir: Some(cfg.paths.runtime_dir.as_path().join(crate::desk::DIR)),
        }
    }
}

/// The decision socket's path for a config (what the other services connect to).
pub fn socket_path(cfg: &tsunagi_config::Config) -> PathBuf {
    cfg.paths
        .runtime_dir
        .as_path()
        .join(crate::NAME)
        .join(SOCKET_NAME)
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub permits: u64,
    pub denies: u64,
    pub errors: u64,
    /// Release rows recorded (objects that left or were removed at a recipient).
    pub releases: u64,
}

/// Shared state of the running service.
#[derive(Debug)]
pub struct Shared {
    store: Mutex<Store>,
    counts: Mutex<Counts>,
    settings: Settings,
    last_sync_error: Mutex<Option<String>>,
    /// Why the last hand-over of changes and alerts to the ATNA audit trail failed (`None`:
    /// it did not).
    audit_error: Arc<Mutex<Option<String>>>,
}

impl Shared {
    pub fn new(store: Store, settings: Settings) -> Arc<Shared> {
        Arc::new(Shared {
            store: Mutex::new(store),
            counts: Mutex::new(Counts::default()),
            settings,
            last_sync_error: Mutex::new(None),
            audit_error: Arc::default(),
        })
    }

    /// The store (the sync runs its rounds on it).
    pub fn store(&self) -> &Mutex<Store> {
        &self.store
    }

    pub fn counts(&self) -> Counts {
        self.counts.lock().map(|c| *c).unwrap_or_default()
    }

    /// An identity lookup (no audit record: no data is released by it).
    fn identity(&self, network_id_of: Option<&str>, local_id_of: Option<&str>) -> Answer {
        let Ok(store) = self.store.lock() else {
            return error("internal error: the store lock is poisoned".into());
        };
        if let Some(local) = network_id_of {
            let patient: PatientId = match local.parse() {
                Ok(p) => p,
                Err(e) => return error(format!("network-id-of: {e}")),
            };
            return match store.patient(&patient) {
                Ok(p) => Answer::Identity(Identity {
                    known: p.is_some(),
                    network_id: p.and_then(|p| p.network_id),
                    patient: None,
                }),
                Err(e) => error(e.to_string()),
            };
        }
        match store.patient_by_network_id(local_id_of.unwrap_or_default()) {
            Ok(p) => Answer::Identity(Identity {
                known: p.is_some(),
                network_id: None,
                patient: p.map(|p| p.to_string()),
            }),
            Err(e) => error(e.to_string()),
        }
    }

    /// Answers a change-feed request (blocking: SQLite).
    fn changes(&self, since: i64) -> Answer {
        let Ok(store) = self.store.lock() else {
            return error("internal error: the store lock is poisoned".into());
        };
        let changes = store.changes_since(since, CHANGES_PAGE);
        let freshness = store.freshness(self.settings.freshness_bound);
        match (changes, freshness) {
            (Ok((seq, patients, more)), Ok(freshness)) => {
                let now = time::now();
                let bound =
                    i64::try_from(self.settings.freshness_bound.as_secs()).unwrap_or(i64::MAX);
                let fresh = freshness.last_pull.is_some_and(|t| {
                    now >= t - i64::try_from(crate::decide::CLOCK_SLACK.as_secs()).unwrap_or(0)
                        && now - t <= bound
                });
                Answer::Changes(Changes {
                    seq,
                    patients: patients.iter().map(ToString::to_string).collect(),
                    more,
                    fresh,
                })
            }
            (Err(e), _) | (_, Err(e)) => error(format!("change feed failed: {e}")),
        }
    }

    /// Records a release (blocking: SQLite): one audit row per object.
    fn released(
        &self,
        patient: &str,
        recipient: &consent_protocol::Recipient,
        category: consent_protocol::Category,
        kind: consent_protocol::ReleaseKind,
        objects: &[consent_protocol::Object],
        decision: Option<i64>,
    ) -> Answer {
        let patient: PatientId = match patient.parse() {
            Ok(p) => p,
            Err(e) => return error(format!("patient: {e}")),
        };
        let texts = match audit_texts(objects, "a release") {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        let Ok(mut store) = self.store.lock() else {
            return error("internal error: the store lock is poisoned".into());
        };
        let release = crate::store::Release {
            patient: &patient,
            recipient,
            category,
            kind,
            objects: &texts,
            decision,
        };
        match store.record_release(&release, time::now()) {
            Ok(audit) => {
                if let Ok(mut counts) = self.counts.lock() {
                    counts.releases += texts.len() as u64;
                }
                Answer::Recorded { audit }
            }
            Err(e) => error(format!("recording the release failed: {e}")),
        }
    }

    /// Staff requeued or discarded held objects ([`Request::Handled`]): recorded before
    /// the objects change.
    fn handled(&self, handled: Handled<'_>) -> Answer {
        let Handled {
            patient,
            recipient,
            category,
            handling,
            objects,
            by,
        } = handled;
        // 1 to 64 printable characters: the ID the object carries (hashed like every other),
        // as DICOM LO allows; who did it.
        let printable = |s: &str| s.chars().count() <= 64 && !s.chars().any(char::is_control);
        if patient.is_some_and(|p| p.is_empty() || !printable(p)) {
            return error("patient: 1 to 64 printable characters".into());
        }
        if by.trim().is_empty() || !printable(by) {
            return error("by: who did it, 1 to 64 printable characters".into());
        }
        let texts = match audit_texts(objects, "a handling") {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        let Ok(mut store) = self.store.lock() else {
            return error("internal error: the store lock is poisoned".into());
        };
        match store.record_handling(
            patient,
            recipient,
            category,
            handling,
            &texts,
            by,
            time::now(),
        ) {
            Ok(audit) => Answer::Recorded { audit },
            Err(e) => error(format!("recording the handling failed: {e}")),
        }
    }

    /// Answers one request (blocking: SQLite).
    pub fn answer(&self, req: &Request) -> Answer {
        let (patient, question, at) = match req {
            Request::Handled {
                patient,
                recipient,
                category,
                handling,
                objects,
                by,
            } => {
                return self.handled(Handled {
                    patient: patient.as_deref(),
                    recipient,
                    category: *category,
                    handling: *handling,
                    objects,
                    by,
                });
            }
            Request::Released {
                patient,
                recipient,
                category,
                kind,
                objects,
                decision,
            } => {
                return self.released(patient, recipient, *category, *kind, objects, *decision);
            }
            Request::Changes { since } => return self.changes(*since),
            Request::NetworkIdOf { patient } => return self.identity(Some(patient), None),
            Request::LocalIdOf { network_id } => return self.identity(None, Some(network_id)),
            Request::Decide {
                patient,
                recipient,
                category,
                at,
            } => (patient, Some((recipient, *category)), at),
            Request::Participates { patient } => (patient, None, &None),
        };
        let parsed = (|| -> Result<(PatientId, Option<time::Timestamp>), String> {
            let patient: PatientId = patient.parse().map_err(|e| format!("patient: {e}"))?;
            let at = at
                .as_deref()
                .map(time::parse)
                .transpose()
                .map_err(|e| format!("at: {e}"))?;
            Ok((patient, at))
        })();
        let answer = match parsed {
            Err(message) => error(message),
            Ok((patient, at)) => {
                let now = time::now();
                let Ok(mut store) = self.store.lock() else {
                    return error("internal error: the store lock is poisoned".into());
                };
                let bound = self.settings.freshness_bound;
                let decided = match question {
                    Some((recipient, category)) => store.decide_audited(
                        &patient,
                        recipient,
                        category,
                        at.unwrap_or(now),
                        now,
                        bound,
                    ),
                    None => store.participation_audited(&patient, now, bound),
                };
                match decided {
                    Ok((decision, audit)) => {
                        Answer::Decided(consent_protocol::Decided { decision, audit })
                    }
                    // The error never carries patient data: only the operation that failed.
                    Err(e) => error(format!("decision failed: {e}")),
                }
            }
        };
        if let Ok(mut counts) = self.counts.lock() {
            match answer {
                Answer::Decided(d) if d.decision == Decision::Permit => counts.permits += 1,
                Answer::Decided(_) => counts.denies += 1,
                _ => counts.errors += 1,
            }
        }
        answer
    }

    /// A summary line and metrics for the supervisor: healthy while the cache is fresh, no
    /// patient is denied for an unreadable network consent, and the audit trail continues
    /// the checkpoint the network holds.
    pub fn report(&self) -> (bool, String, Vec<(&'static str, f64)>) {
        let counts = self.counts();
        let (pending, freshness, unreadable, head, anchor, directory) = match self.store.lock() {
            Ok(store) => (
                store.pending().map(|p| p.len()).unwrap_or(0),
                store.freshness(self.settings.freshness_bound).ok(),
                store.unreadable_patients().unwrap_or(0),
                store.audit_head().ok().flatten(),
                store.audit_anchor().ok().flatten(),
                store.directory().ok(),
            ),
            Err(_) => (0, None, 0, None, None, None),
        };
        let now = time::now();
        let age = freshness
            .and_then(|f| f.last_pull)
            .map(|t| (now - t).max(0));
        let bound = i64::try_from(self.settings.freshness_bound.as_secs()).unwrap_or(i64::MAX);
        let stale = age.is_none_or(|a| a > bound);
        let sync_error = self.last_sync_error.lock().ok().and_then(|e| e.clone());
        let sync = match age {
            None if self.settings.fhir.is_none() => "no network sync configured ([consent] fhir-url): decisions for recipients outside the clinic deny (stale)".to_owned(),
            None => "never synced with the network: decisions for recipients outside the clinic deny (stale)".to_owned(),
            Some(a) if stale => format!("last synced {a}s ago, beyond the freshness bound: decisions deny (stale)"),
            Some(a) => format!("last synced {a}s ago"),
        };
        let mut summary = format!(
            "{} permitted, {} denied; {pending} changes waiting to be pushed; {sync}",
            counts.permits, counts.denies
        );
        if unreadable > 0 {
            summary.push_str(&format!(
                "; {unreadable} patients denied: a consent from the network could not be understood (unreadable-network-consent)"
            ));
        }
        if let Some(d) = &directory
            && d.unreadable > 0
        {
            summary.push_str(&format!(
                "; {} entries of the network's facility directory could not be understood and are not offered by name (`tsunagi consent facilities` lists them)",
                d.unreadable
            ));
        }
        match &head {
            Some(h) => {
                summary.push_str(&format!("; audit trail head {} ({})", h.seq, h.short_mac()))
            }
            None => summary.push_str("; audit trail empty"),
        }
        match &anchor {
            Some(a) if a.reset.is_some() => summary.push_str(&format!(
                "; AUDIT TRAIL RESET: {} (an operator must look)",
                a.reset.as_deref().unwrap_or_default()
            )),
            Some(a) => summary.push_str(&format!("; the network holds checkpoint {}", a.seq)),
            None => {}
        }
        if let Some(e) = sync_error {
            summary.push_str(&format!("; last sync failed: {e}"));
        }
        let audit_error = self.audit_error.lock().ok().and_then(|e| e.clone());
        if let Some(e) = &audit_error {
            summary.push_str(&format!(
                "; consent and identity changes not yet in the ATNA audit trail: {e}"
            ));
        }
        let mut metrics = vec![
            (
                "atna_handover_failing",
                f64::from(u8::from(audit_error.is_some())),
            ),
            ("decisions_permit_total", counts.permits as f64),
            ("decisions_deny_total", counts.denies as f64),
            ("decision_errors_total", counts.errors as f64),
            ("pending_pushes", pending as f64),
            ("stale", f64::from(u8::from(stale))),
            ("unreadable_network_consent_patients", unreadable as f64),
            ("releases_recorded_total", counts.releases as f64),
            (
                "audit_head_seq",
                head.as_ref().map_or(0.0, |h| h.seq as f64),
            ),
            (
                "audit_reset",
                f64::from(u8::from(anchor.as_ref().is_some_and(|a| a.reset.is_some()))),
            ),
        ];
        if let Some(a) = &anchor {
            metrics.push(("audit_checkpoint_seq", a.seq as f64));
        }
        if let Some(d) = &directory {
            metrics.push(("directory_facilities", d.facilities.len() as f64));
            metrics.push(("directory_unreadable", d.unreadable as f64));
            if let Some(at) = d.refreshed_at {
                metrics.push(("directory_refreshed_timestamp_seconds", at as f64));
            }
        }
        if let Some(a) = age {
            metrics.push(("last_pull_age_seconds", a as f64));
        }
        if let Some(t) = freshness.and_then(|f| f.last_pull) {
            metrics.push(("last_pull_timestamp_seconds", t as f64));
        }
        // Patients denied for an unreadable consent, or a trail reset, need someone to look:
        // degraded.
        let reset = anchor.is_some_and(|a| a.reset.is_some());
        (!stale && unreadable == 0 && !reset, summary, metrics)
    }
}

/// The objects of a release or a handling (`what`) as the trail records them: 1 to
/// [`consent_protocol::MAX_RELEASE_OBJECTS`], each an identifier; or the error answer.
fn audit_texts(objects: &[consent_protocol::Object], what: &str) -> Result<Vec<String>, Answer> {
    if objects.is_empty() || objects.len() > consent_protocol::MAX_RELEASE_OBJECTS {
        return Err(error(format!(
            "{what} names 1 to {} objects",
            consent_protocol::MAX_RELEASE_OBJECTS
        )));
    }
    objects
        .iter()
        .map(consent_protocol::Object::audit_text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("objects: {e}")))
}

/// A [`Request::Handled`], borrowed.
struct Handled<'a> {
    patient: Option<&'a str>,
    recipient: &'a consent_protocol::Recipient,
    category: consent_protocol::Category,
    handling: consent_protocol::Handling,
    objects: &'a [consent_protocol::Object],
    by: &'a str,
}

/// Binds the decision socket (replacing a stale one).
pub fn bind(settings: &Settings) -> Result<UnixListener, ServiceError> {
    bind_at(settings.runtime_dir.join(SOCKET_NAME))
}

fn bind_at(path: PathBuf) -> Result<UnixListener, ServiceError> {
    listen::bind_socket(&path).map_err(|source| ServiceError::Listen { path, source })
}

/// Serves decision requests until `stop` fires (the runtime's line server on its one accept
/// loop: bounded, backing off on accept errors, connections owned and ended at stop).
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    serve_json(listener, stop, error, move |req: Request| {
        shared.answer(&req)
    })
    .await
}

/// Serves the console's desk requests ([`crate::desk`]) until `stop` fires: each one on the
/// store, under its lock, as the command line would make it.
pub async fn serve_desk(
    listener: UnixListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    use crate::desk::Answer as DeskAnswer;
    serve_json(listener, stop, DeskAnswer::Error, move |req| {
        let mut store = shared
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::desk::answer(&mut store, req, time::now()).unwrap_or_else(|e| {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "a desk request failed"
            );
            DeskAnswer::Error("the consent store failed".into())
        })
    })
    .await
}

/// One JSON request per line and one answer per line, on the runtime's line server: a line
/// too long or not understood is answered with `error`, the others by `answer` on a
/// blocking thread (it may use the store).
async fn serve_json<Req, Ans>(
    listener: UnixListener,
    stop: CancellationToken,
    error: fn(String) -> Ans,
    answer: impl Fn(Req) -> Ans + Clone + Send + Sync + 'static,
) -> Result<(), ServeError>
where
    Req: serde::de::DeserializeOwned + Send + 'static,
    Ans: serde::Serialize + Send + 'static,
{
    let limits = LineLimits {
        max_connections: MAX_CLIENTS,
        max_line: MAX_REQUEST,
        idle: IDLE,
    };
    listen::serve_lines(listener, limits, stop, move |line| {
        let answer = answer.clone();
        async move {
            let reply = match line {
                Line::TooLong => error(format!("request longer than {MAX_REQUEST} bytes")),
                Line::Request(line) => match consent_protocol::from_line::<Req>(&line) {
                    Err(e) => error(format!(
                        "bad request: {}",
                        tsunagi_runtime::child::error_chain(&e)
                    )),
                    Ok(req) => tokio::task::spawn_blocking(move || answer(req))
                        .await
                        .unwrap_or_else(|_| error("internal error".into())),
                },
            };
            consent_protocol::to_line(&reply).trim_end().to_owned()
        }
    })
    .await
}

/// The service's run in its child process: opens its database, then [`run`].
pub(crate) async fn main(
    cfg: &tsunagi_config::Config,
    ctx: ServiceCtx,
) -> Result<(), ServiceError> {
    let store = Store::open_in(&ctx.state_dir, cfg.site.facility_code.clone(), true)?;
    run(ctx, store, Settings::from_config(cfg)).await
}

/// Runs the consent service until shutdown.
pub async fn run(ctx: ServiceCtx, store: Store, settings: Settings) -> Result<(), ServiceError> {
    let listener = bind(&settings)?;
    let desk = match &settings.desk_dir {
        Some(dir) => Some(bind_at(dir.join(crate::desk::SOCKET_NAME))?),
        None => None,
    };
    let shared = Shared::new(store, settings);
    // A task that ends or panics ends the service with the reason (status shows it, the
    // supervisor restarts it): decisions must not go unanswered, nor the cache stale, silently.
    let mut tasks = Tasks::new(ctx.shutdown.clone());
    tasks.spawn_fallible(
        "decision-socket",
        serve(listener, shared.clone(), ctx.shutdown.clone()),
    );
    if let Some(desk) = desk {
        tasks.spawn_fallible(
            "desk-socket",
            serve_desk(desk, shared.clone(), ctx.shutdown.clone()),
        );
    }
    tasks.spawn(
        "audit-trail",
        audit::client::hand_over(
            audit::client::Sources::new()
                .with(PendingChanges(shared.clone()))
                .with(PendingEvents(shared.clone())),
            shared.settings.audit_socket.clone(),
            shared.audit_error.clone(),
            ctx.shutdown.clone(),
        ),
    );
    ctx.reporter.ready();
    tracing::info!("consent decisions served");
    if let Some(client) = shared.settings.fhir.clone() {
        tasks.spawn(
            "network-sync",
            sync_loop(shared.clone(), client, ctx.shutdown.clone()),
        );
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            ended = tasks.failed() => return Err(ServiceError::Background(ended)),
            _ = ticker.tick() => {}
        }
        let reporter = shared.clone();
        let (fresh, summary, metrics) = tokio::task::spawn_blocking(move || reporter.report())
            .await
            .map_err(ServiceError::Task)?;
        let health = if fresh { Health::Ok } else { Health::Degraded };
        ctx.reporter.status_with_metrics(health, &summary, &metrics);
    }
    tasks.join(STOP_TASKS).await;
    Ok(())
}

/// The consent and identity changes the ATNA audit trail is owed (from `consent.db`).
struct PendingChanges(Arc<Shared>);

impl audit::client::Source for PendingChanges {
    type Error = StoreError;

    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, audit::protocol::Event)>, StoreError> {
        let changes = self
            .0
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pending_changes(limit)?;
        Ok(changes
            .into_iter()
            .map(|c| {
                let patient = match c.network_id {
                    Some(n) => audit::protocol::Patient::Network(n),
                    None => audit::protocol::Patient::Local(c.patient),
                };
                (
                    c.id,
                    audit::protocol::Event::PatientRecord {
                        action: c.action,
                        patient,
                        what: c.what,
                        user: c.by.as_ref().map(|(user, _)| user.clone()),
                        from: c.by.map(|(_, from)| from),
                    },
                )
            })
            .collect())
    }

    fn recorded(&mut self, last: i64) -> Result<(), StoreError> {
        self.0
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .changes_recorded(last)
    }
}

/// The other events the ATNA audit trail is owed (`consent.db`'s `atna_events`).
struct PendingEvents(Arc<Shared>);

impl audit::client::Source for PendingEvents {
    type Error = StoreError;

    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, audit::protocol::Event)>, StoreError> {
        self.0
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pending_events(limit)
    }

    fn recorded(&mut self, last: i64) -> Result<(), StoreError> {
        self.0
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .events_recorded(last)
    }
}

/// How long the service waits for its tasks to finish after a stop.
const STOP_TASKS: Duration = Duration::from_secs(1);

async fn sync_loop(shared: Arc<Shared>, client: crate::sync::Client, stop: CancellationToken) {
    // A FHIR server refused over TLS: a Security Alert in the ATNA trail, once per streak.
    let mut refusals = audit::client::Refusals::default();
    let mut ticker = tokio::time::interval(shared.settings.pull_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // A stop cancels a round in flight: whatever it stored is durable, and a push not
        // yet acknowledged is repeated next time (a conditional update, so never twice).
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = crate::sync::round(&shared.store, &client) => result,
        };
        let message = match &result {
            Ok(r) if r.pushed + r.pulled + r.changed == 0 => {
                // Nothing changed: the log stays quiet (info is for what moved).
                tracing::debug!("synced with the network, nothing changed");
                None
            }
            Ok(r) => {
                tracing::info!(
                    pushed = r.pushed,
                    pulled = r.pulled,
                    changed = r.changed,
                    "synced with the network"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    error = e as &dyn std::error::Error,
                    "sync with the network failed; retrying next round"
                );
                Some(tsunagi_runtime::child::error_chain(e))
            }
        };
        let refused = match &result {
            Err(crate::sync::SyncError::Tls { addr, reason }) => Some((
                addr.to_string(),
                format!("the network's FHIR server: {reason}"),
            )),
            _ => None,
        };
        if let Some(event) = refusals.observe(refused) {
            let shared = shared.clone();
            let kept = tokio::task::spawn_blocking(move || {
                shared
                    .store
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record_event(&event)
            })
            .await;
            if !matches!(kept, Ok(Ok(()))) {
                tracing::warn!("cannot keep a refused TLS peer for the audit trail");
            }
        }
        if let Ok(mut last) = shared.last_sync_error.lock() {
            *last = message;
        }
    }
}
