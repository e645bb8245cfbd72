//! The `update` service (user `tsunagi-update`, no capabilities): looks at the update
//! channel every `check-interval`, downloads a newer release for this box's compatible once
//! the box's wave has started, verifies it, and keeps it for the maintenance window.
//!
//! State (`STATE/update`): the box's wave seed ([`SEED_FILE`], made once at random), the
//! newest channel metadata the box trusted (`tuf/`, `tough`'s datastore: metadata older
//! than it is refused), the downloads (`downloads/`, a partial one resumed), and the audit
//! events not yet handed to the audit service (`audit-pending.db`).
//!
//! A refusal (expired or untrusted metadata, an older release, a tampered bundle) is shown
//! in status (degraded) and audited as a Security Alert (Software Configuration) once per
//! reason; a channel server refused over TLS is a Node Authentication alert. Both are
//! tried again with a backoff (5 s doubling up to `check-interval`): an operator may fix
//! the channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::http::TlsFiles;
use tsunagi_runtime::service::{Launch, Service};
use tsunagi_runtime::status::Health;
use tsunagi_runtime::tasks::{TaskEnded, Tasks};

use crate::channel::{self, Channel, ChannelError, Offer, Refusal};
use crate::download::{self, DownloadError};
use crate::install::{self, Outcome, Request, Verdict};
use crate::release::{SEEDS, Version};

/// The service's name (its state directory's).
pub const NAME: &str = "update";
/// Its system user.
pub const USER: &str = "tsunagi-update";
/// The box's wave seed, a number in `0..SEEDS` as text.
pub const SEED_FILE: &str = "seed";
/// The shortest wait after a failure.
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// The time (`Outcome::at`) of the installer's last outcome handed to the audit trail.
const AUDITED_FILE: &str = "audited-outcome";
/// How soon an installer's outcome reaches the audit trail between rounds.
const OUTCOME_POLL: Duration = Duration::from_secs(5);

/// The update service as the binary lists it.
pub const SERVICE: Service = Service {
    name: NAME,
    user: USER,
    description: "tsunagi fleet updates",
    capabilities: &[],
    // Presents the box's certificate to the channel; hands refusals to the audit trail.
    groups: &[identity::CLIENT_GROUP, audit::service::CLIENT_GROUP],
    worker_threads: 1,
    launch: |cfg| {
        cfg.update
            .enabled
            .then(|| Launch::reading(cfg, &(&cfg.update, &cfg.audit.enabled)))
    },
    main: |cfg, ctx| tsunagi_runtime::service::boxed(run(ctx, Settings::from_config(cfg))),
};

/// What the service needs of the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub channel_url: Option<String>,
    pub root_file: PathBuf,
    pub tls: TlsFiles,
    pub compatible: String,
    pub os_release: PathBuf,
    pub check_interval: Duration,
    pub window: tsunagi_config::MaintenanceWindow,
    pub audit_socket: Option<PathBuf>,
}

impl Settings {
    pub fn from_config(cfg: &tsunagi_config::Config) -> Settings {
        let u = &cfg.update;
        Settings {
            channel_url: u.channel_url.as_ref().map(|url| url.as_str().to_owned()),
            root_file: u.root_file.as_path().to_owned(),
            tls: identity::tls_files(
                cfg.paths.state_dir.as_path(),
                u.ca_file.as_ref(),
                u.client_identity,
                u.client_cert_file.as_ref(),
                u.client_key_file.as_ref(),
            ),
            compatible: u.compatible.clone(),
            os_release: u.os_release.as_path().to_owned(),
            check_interval: u.check_interval.get(),
            window: u.window.clone(),
            audit_socket: cfg.audit.enabled.then(|| audit::service::socket_path(cfg)),
        }
    }
}

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("[update] has no channel-url")]
    NoChannel,
    #[error("the channel's root of trust {path} cannot be read")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the box's wave seed {path} cannot be kept")]
    Seed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the installer's directory {path} cannot be made")]
    InstallDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pending(#[from] audit::pending::PendingError),
    #[error("the update service cannot go on")]
    Background(#[source] TaskEnded),
}

/// The running version, from os-release(5)'s `IMAGE_VERSION=`.
pub fn running_version(os_release: &Path) -> Result<Version, String> {
    let text = std::fs::read_to_string(os_release)
        .map_err(|e| format!("{} cannot be read: {e}", os_release.display()))?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
        .ok_or_else(|| format!("{} has no IMAGE_VERSION", os_release.display()))?;
    let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
    value.parse().map_err(|e| format!("IMAGE_VERSION: {e}"))
}

/// The box's wave seed: kept in `dir`, made at random the first time.
fn seed(dir: &Path) -> Result<u16, ServiceError> {
    let path = dir.join(SEED_FILE);
    let err = |source| ServiceError::Seed {
        path: path.clone(),
        source,
    };
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(n) = text.trim().parse::<u16>()
        && n < SEEDS
    {
        return Ok(n);
    }
    let mut bytes = [0u8; 2];
    getrandom::fill(&mut bytes).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let n = u16::from_le_bytes(bytes) % SEEDS;
    tsunagi_state::replace_file(&path, n.to_string().as_bytes(), 0o600).map_err(err)?;
    Ok(n)
}

/// Where a round left the box.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Nothing newer.
    Current,
    /// A newer release whose wave for this box starts later.
    Waiting {
        version: Version,
        starts: jiff::Timestamp,
    },
    /// Downloaded and verified, waiting for the maintenance window.
    Staged { version: Version, bundle: PathBuf },
}

/// The HTTP client of the channel, from the TLS files as they are now.
fn client(tls: &TlsFiles) -> Result<reqwest::Client, String> {
    let error = |e: &(dyn std::error::Error + 'static)| tsunagi_runtime::child::error_chain(e);
    let roots = tsunagi_runtime::http::load_roots(&tls.ca_file).map_err(|e| error(&e))?;
    let identity = tsunagi_runtime::http::load_identity(&tls.cert_file, &tls.key_file)
        .map_err(|e| error(&e))?;
    tsunagi_runtime::http::client_builder(tsunagi_runtime::http::ClientSettings {
        roots,
        identity: Some(identity),
        connect_timeout: Duration::from_secs(10),
        timeout: None,
        keep_idle: None,
    })
    .map_err(|e| error(&e))?
    .https_only(true)
    .redirect(reqwest::redirect::Policy::none())
    .build()
    .map_err(|e| error(&e))
}

/// Why a round did not reach its end: tried again after a backoff.
enum Failure {
    /// The network, our disk, the TLS files: status only.
    Transient(String),
    /// The channel server refused over TLS: status and a Node Authentication alert.
    Tls { reason: String },
    /// The channel refused: status and a Software Configuration alert.
    Refused(Refusal),
}

/// One round: what the channel offers, and the download if it is this box's turn.
async fn round(
    settings: &Settings,
    channel: &Channel,
    seed: u16,
    running: &Version,
    downloads: &Path,
) -> Result<State, Failure> {
    let http = client(&settings.tls).map_err(Failure::Transient)?;
    let offer = channel::check(
        channel,
        http.clone(),
        &settings.compatible,
        running,
        seed,
        jiff::Timestamp::now(),
    )
    .await
    .map_err(|e| match e {
        ChannelError::Refused(r) => Failure::Refused(r),
        ChannelError::TlsRefused(reason) => Failure::Tls { reason },
        other => Failure::Transient(other.to_string()),
    })?;
    // Only the release taken now keeps its download: a superseded one, or one the channel
    // withdrew, gives its space back to the data partition.
    let keep = match &offer {
        Offer::Take(release) => Some(release.sha256),
        Offer::UpToDate | Offer::NotYet { .. } => None,
    };
    match download::prune(downloads, keep.as_ref()) {
        Ok(0) => {}
        Ok(freed) => tracing::info!(freed, "superseded downloads removed"),
        Err(e) => {
            return Err(Failure::Transient(format!(
                "superseded downloads in {} cannot be removed: {e}",
                downloads.display()
            )));
        }
    }
    match offer {
        Offer::UpToDate => Ok(State::Current),
        Offer::NotYet { release, starts } => Ok(State::Waiting {
            version: release.custom.version,
            starts,
        }),
        Offer::Take(release) => {
            std::fs::create_dir_all(downloads)
                .map_err(|e| Failure::Transient(format!("{}: {e}", downloads.display())))?;
            let fetched = download::fetch(&http, channel, &release, downloads)
                .await
                .map_err(|e| match e {
                    DownloadError::Refused(r) => Failure::Refused(r),
                    other => Failure::Transient(tsunagi_runtime::child::error_chain(&other)),
                })?;
            tracing::info!(
                version = %release.custom.version,
                resumed_from = fetched.resumed_from,
                "update downloaded and verified"
            );
            Ok(State::Staged {
                version: release.custom.version,
                bundle: fetched.path,
            })
        }
    }
}

/// The window in words, for status.
fn window_words(w: &tsunagi_config::MaintenanceWindow) -> String {
    let days: Vec<String> = w
        .all_day
        .iter()
        .map(|d| format!("{d:?}").to_lowercase())
        .collect();
    let mut words = format!("daily {}", w.nightly);
    if !days.is_empty() {
        words.push_str(&format!(" and all of {}", days.join(", ")));
    }
    words.push_str(&format!(", UTC{}", w.utc_offset));
    words
}

pub async fn run(ctx: ServiceCtx, settings: Settings) -> Result<(), ServiceError> {
    let url = settings
        .channel_url
        .clone()
        .ok_or(ServiceError::NoChannel)?;
    let root = std::fs::read(&settings.root_file).map_err(|source| ServiceError::Root {
        path: settings.root_file.clone(),
        source,
    })?;
    let base = url.trim_end_matches('/');
    let channel = Channel {
        root,
        // A ChannelUrl is an https URL ending in `/`; a join below it cannot fail.
        metadata_url: format!("{base}/metadata/")
            .parse()
            .map_err(|_| ServiceError::NoChannel)?,
        targets_url: format!("{base}/targets/")
            .parse()
            .map_err(|_| ServiceError::NoChannel)?,
        datastore: ctx.state_dir.join("tuf"),
    };
    let seed = seed(&ctx.state_dir)?;
    let downloads = ctx.state_dir.join("downloads");
    let install_dir = ctx.state_dir.join(install::INSTALL_DIR);
    std::fs::create_dir_all(&install_dir).map_err(|source| ServiceError::InstallDir {
        path: install_dir.clone(),
        source,
    })?;
    let pending = Arc::new(audit::pending::Store::open(
        &ctx.state_dir.join("audit-pending.db"),
    )?);
    let mut tasks = Tasks::new(ctx.shutdown.clone());
    let audit_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    tasks.spawn(
        "audit-trail",
        audit::client::hand_over(
            audit::client::Sources::new().with(pending.clone()),
            settings.audit_socket.clone(),
            audit_error.clone(),
            ctx.shutdown.clone(),
        ),
    );
    ctx.reporter.ready();
    tracing::info!(seed, "update service started");
    let mut refused_last: Option<String> = None;
    let mut outcomes = Outcomes::open(&install_dir, &ctx.state_dir);
    let mut tls_refusals = audit::client::Refusals::default();
    let mut refusals_total = 0u64;
    let mut failures = 0u32;
    'rounds: loop {
        let (health, summary, wait, staged) = match running_version(&settings.os_release) {
            Err(why) => (
                Health::Degraded,
                format!("the running version is unknown: {why}"),
                settings.check_interval,
                false,
            ),
            Ok(running) => {
                let result = round(&settings, &channel, seed, &running, &downloads).await;
                let tls = match &result {
                    Err(Failure::Tls { reason }) => Some((url.clone(), reason.clone())),
                    _ => None,
                };
                if let Some(event) = tls_refusals.observe(tls) {
                    keep(&pending, &event);
                }
                match result {
                    Ok(state) => {
                        failures = 0;
                        refused_last = None;
                        let (summary, staged) = match state {
                            State::Current => (format!("running {running}, the newest"), false),
                            State::Waiting { version, starts } => (
                                format!(
                                    "running {running}; {version} is out, this box's wave starts {starts}"
                                ),
                                false,
                            ),
                            State::Staged { version, bundle } => {
                                tracing::debug!(bundle = %bundle.display(), "staged");
                                let when = hand_over(
                                    &install_dir,
                                    &version,
                                    &bundle,
                                    settings.window.contains(jiff::Timestamp::now().as_second()),
                                    &settings.window,
                                );
                                (
                                    format!(
                                        "running {running}; {version} downloaded and verified, {when}"
                                    ),
                                    true,
                                )
                            }
                        };
                        let (summary, staged) = match last_outcome(&install_dir, &running) {
                            Some(words) => (format!("{summary}; {words}"), staged),
                            None => (summary, staged),
                        };
                        (Health::Ok, summary, settings.check_interval, staged)
                    }
                    Err(failure) => {
                        failures += 1;
                        let wait = FIRST_RETRY
                            .saturating_mul(2u32.saturating_pow(failures.min(12) - 1))
                            .min(settings.check_interval);
                        let why = match failure {
                            Failure::Transient(why) => why,
                            Failure::Tls { reason } => {
                                format!("TLS with the update channel at {url} failed: {reason}")
                            }
                            Failure::Refused(refusal) => {
                                let reason = refusal.to_string();
                                if refused_last.as_deref() != Some(reason.as_str()) {
                                    tracing::warn!(%reason, "update channel refused");
                                    refusals_total += 1;
                                    keep(
                                        &pending,
                                        &audit::protocol::Event::RefusedUpdate {
                                            reason: reason.clone(),
                                            channel: url.clone(),
                                        },
                                    );
                                    refused_last = Some(reason.clone());
                                }
                                reason
                            }
                        };
                        (
                            Health::Degraded,
                            format!("running {running}; last check failed: {why}"),
                            wait,
                            false,
                        )
                    }
                }
            }
        };
        let mut summary = summary;
        // The installer's and the health gate's outcomes go to the audit trail here (they
        // hold no connection), each once.
        if outcomes.hand_over(&pending) == Some(Verdict::Refused) {
            refusals_total += 1;
        }
        if let Some(e) = audit_error.lock().ok().and_then(|e| e.clone()) {
            summary.push_str(&format!("; refusals not yet in the ATNA audit trail: {e}"));
        }
        ctx.reporter.status_with_metrics(
            health,
            &summary,
            &metrics(staged, refusals_total, failures),
        );
        // Until the next round, an outcome the installer records (a refusal takes it
        // seconds) reaches the audit trail within OUTCOME_POLL.
        let next_round = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break 'rounds,
                ended = tasks.failed() => return Err(ServiceError::Background(ended)),
                _ = tokio::time::sleep_until(next_round.min(tokio::time::Instant::now() + OUTCOME_POLL)) => {}
            }
            // A new outcome: status says it at once (the audit trail has it already),
            // then a round.
            if let Some(verdict) = outcomes.hand_over(&pending) {
                if verdict == Verdict::Refused {
                    refusals_total += 1;
                }
                if let Ok(running) = running_version(&settings.os_release)
                    && let Some(words) = last_outcome(&install_dir, &running)
                {
                    ctx.reporter.status_with_metrics(
                        health,
                        &format!("running {running}; {words}"),
                        &metrics(staged, refusals_total, failures),
                    );
                }
                break;
            }
            if tokio::time::Instant::now() >= next_round {
                break;
            }
        }
    }
    tasks.join(Duration::from_millis(300)).await;
    Ok(())
}

/// The service's metrics: a release staged, refusals so far, the channel check failing.
fn metrics(staged: bool, refusals_total: u64, failures: u32) -> [(&'static str, f64); 3] {
    [
        ("update_staged", f64::from(u8::from(staged))),
        ("update_refusals_total", refusals_total as f64),
        ("update_check_failing", f64::from(u8::from(failures > 0))),
    ]
}

/// For a staged `version` (downloaded and verified at `bundle`): asks the installer for it
/// while the window is `open`, unless it was refused or failed its health gate before, or a
/// request waits already. Returns where the release stands, for status.
fn hand_over(
    dir: &Path,
    version: &Version,
    bundle: &Path,
    open: bool,
    window: &tsunagi_config::MaintenanceWindow,
) -> String {
    let outcome = install::read_outcome(dir).ok().flatten();
    let known = outcome.filter(|o| &o.version == version);
    match known.as_ref().map(|o| o.verdict) {
        Some(Verdict::Refused) | Some(Verdict::Unhealthy) => {
            return "not installed again: see the last update".to_owned();
        }
        _ if !open => {
            return format!(
                "waits for the maintenance window ({})",
                window_words(window)
            );
        }
        _ => {}
    }
    let installed = known.is_some_and(|o| o.verdict == Verdict::Installed);
    let Some(sha256) = bundle.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
        return "the download has no name".to_owned();
    };
    if !dir.join(install::REQUEST_FILE).exists() {
        let request = Request {
            version: version.clone(),
            sha256,
        };
        if let Err(e) = install::write_request(dir, &request) {
            return format!(
                "cannot be handed to the installer: {}",
                tsunagi_runtime::child::error_chain(&e)
            );
        }
        tracing::info!(%version, "handed to the installer");
    }
    if installed {
        "installed; the box boots it once idle in the maintenance window".into()
    } else {
        "the maintenance window is open: handed to the installer".into()
    }
}

/// The installer's last outcome in words, when it tells something the round does not:
/// an update that is done, failed, or was refused.
fn last_outcome(dir: &Path, running: &Version) -> Option<String> {
    let Outcome {
        version,
        verdict,
        reason,
        ..
    } = install::read_outcome(dir).ok().flatten()?;
    let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
    Some(match verdict {
        Verdict::Good if &version == running => format!("last update: to {version}, good"),
        Verdict::Good | Verdict::Installed => return None,
        Verdict::Refused => format!("last update: {version} refused by the installer{why}"),
        Verdict::Failed => format!("last update: {version} failed to install{why}"),
        Verdict::Unhealthy => {
            format!("last update: {version} failed its health gate, back on {running}{why}")
        }
    })
}

/// The installer's and the health gate's outcomes (`install/outcome.json`), each handed to
/// the audit trail once: the time of the last one handed over is kept across restarts.
struct Outcomes {
    install_dir: PathBuf,
    audited_file: PathBuf,
    audited: Option<i64>,
}

impl Outcomes {
    fn open(install_dir: &Path, state_dir: &Path) -> Outcomes {
        let audited_file = state_dir.join(AUDITED_FILE);
        Outcomes {
            install_dir: install_dir.to_owned(),
            audited: std::fs::read_to_string(&audited_file)
                .ok()
                .and_then(|t| t.trim().parse().ok()),
            audited_file,
        }
    }

    /// Hands a new outcome to the audit trail; its verdict, or `None` when there is none.
    fn hand_over(&mut self, pending: &audit::pending::Store) -> Option<Verdict> {
        let Ok(Some(o)) = install::read_outcome(&self.install_dir) else {
            return None;
        };
        // Another time is another outcome (a clock set back in between included).
        if self.audited == Some(o.at) {
            return None;
        }
        self.audited = Some(o.at);
        keep(pending, &outcome_event(&o));
        if let Err(e) = std::fs::write(&self.audited_file, format!("{}\n", o.at)) {
            tracing::warn!(error = %e, "cannot note the outcome handed to the audit trail");
        }
        Some(o.verdict)
    }
}

/// An installer's or health gate's outcome as an audit event: a refusal is a refused
/// update (the installer as its channel), the rest what became of the update.
fn outcome_event(o: &Outcome) -> audit::protocol::Event {
    use audit::protocol::{Event, UpdateVerdict};
    let verdict = match o.verdict {
        Verdict::Refused => {
            return Event::RefusedUpdate {
                reason: format!(
                    "{}: {}",
                    o.version,
                    o.reason.as_deref().unwrap_or("refused")
                ),
                channel: "the box's installer".into(),
            };
        }
        Verdict::Installed => UpdateVerdict::Installed,
        Verdict::Good => UpdateVerdict::Good,
        Verdict::Failed => UpdateVerdict::Failed,
        Verdict::Unhealthy => UpdateVerdict::Unhealthy,
    };
    Event::Update {
        version: o.version.to_string(),
        verdict,
        reason: o.reason.clone(),
    }
}

/// Keeps `event` for the audit trail (a failure is logged; the refusal is in status anyway).
fn keep(pending: &audit::pending::Store, event: &audit::protocol::Event) {
    if let Err(e) = pending.record(event) {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "cannot keep a refusal for the audit trail"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_version_comes_from_os_release_and_the_seed_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("os-release");
        std::fs::write(&path, "ID=tsunagi\nIMAGE_VERSION=\"1.4.0\"\n").unwrap();
        assert_eq!(running_version(&path), Ok("1.4".parse().unwrap()));
        std::fs::write(&path, "ID=tsunagi\n").unwrap();
        assert!(
            running_version(&path)
                .unwrap_err()
                .contains("no IMAGE_VERSION")
        );
        std::fs::write(&path, "IMAGE_VERSION=v1\n").unwrap();
        assert!(
            running_version(&path)
                .unwrap_err()
                .contains("not a version")
        );
        let first = seed(dir.path()).unwrap();
        assert!(first < SEEDS);
        assert_eq!(seed(dir.path()).unwrap(), first);
        assert_eq!(
            window_words(&tsunagi_config::MaintenanceWindow::default()),
            "daily 01:00-05:00 and all of sun, UTC+09:00"
        );
    }

    #[test]
    fn each_outcome_reaches_the_audit_trail_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let install_dir = dir.path().join(install::INSTALL_DIR);
        std::fs::create_dir_all(&install_dir).unwrap();
        use audit::client::Source as _;
        let pending =
            Arc::new(audit::pending::Store::open(&dir.path().join("audit-pending.db")).unwrap());
        let count = || pending.clone().pending(100).unwrap();
        let mut outcomes = Outcomes::open(&install_dir, dir.path());
        assert_eq!(outcomes.hand_over(&pending), None, "no outcome yet");
        let outcome = |version: &str, verdict, at| Outcome {
            version: version.parse().unwrap(),
            verdict,
            reason: Some("why".into()),
            at,
        };
        install::write_outcome(&install_dir, &outcome("2", Verdict::Good, 100)).unwrap();
        assert_eq!(outcomes.hand_over(&pending), Some(Verdict::Good));
        assert_eq!(outcomes.hand_over(&pending), None);
        assert_eq!(count().len(), 1);
        // After a restart (a reboot), the same outcome is not handed over again.
        let mut outcomes = Outcomes::open(&install_dir, dir.path());
        assert_eq!(outcomes.hand_over(&pending), None);
        install::write_outcome(&install_dir, &outcome("5", Verdict::Refused, 90)).unwrap();
        assert_eq!(
            outcomes.hand_over(&pending),
            Some(Verdict::Refused),
            "a refusal, even with the clock set back"
        );
        let events: Vec<audit::protocol::Event> = count().into_iter().map(|(_, e)| e).collect();
        assert_eq!(
            events,
            vec![
                audit::protocol::Event::Update {
                    version: "2".into(),
                    verdict: audit::protocol::UpdateVerdict::Good,
                    reason: Some("why".into()),
                },
                audit::protocol::Event::RefusedUpdate {
                    reason: "5: why".into(),
                    channel: "the box's installer".into(),
                },
            ]
        );
    }
}
