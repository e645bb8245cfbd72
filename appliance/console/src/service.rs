//! The `console` service: HTTPS on the clinic LAN ([`crate::web`] over hyper and rustls),
//! one accept loop with bounded connections (`tsunagi_runtime::listen`), the ATNA events
//! handed to the audit service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::status::Health;
use tsunagi_runtime::tasks::{TaskEnded, Tasks};

use crate::accounts::{Accounts, AccountsError, Policy};
use crate::tls::{self, TlsError};
use crate::web::{self, App, Peer};

/// The accounts' database, in the state directory.
pub const DB_FILE: &str = "console.db";
/// The console's events waiting for the ATNA trail (`tsunagi console add-account` adds
/// its own), in the state directory.
pub const PENDING_FILE: &str = "audit-pending.db";
/// Connections served at once (a clinic has a few browsers).
const MAX_CONNECTIONS: usize = 32;
/// A connection that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (keep-alive included) lasts at most this.
const CONNECTION_LIMIT: Duration = Duration::from_secs(300);
/// How often the summary is refreshed.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// How often the console looks for the network's certificate (published or renewed by the
/// identity service): a file read.
const CERTIFICATE_CHECK_EVERY: Duration = Duration::from_secs(3);

/// What the service needs of the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub policy: Policy,
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Where the identity service publishes the certificate the network issued for the
    /// console, when it keeps one ([`identity::console_address`]).
    pub network_cert: Option<(PathBuf, PathBuf)>,
    pub facility: String,
    pub status_socket: PathBuf,
    pub audit_socket: Option<PathBuf>,
    /// The consent service's desk socket, when consent is enabled.
    pub desk_socket: Option<PathBuf>,
    /// The SS-MIX2 sync's conformance report, when the sync is enabled.
    pub ssmix2_report: Option<PathBuf>,
    /// The DICOM service's desk socket, when DICOM is enabled.
    pub dicom_desk: Option<PathBuf>,
}

impl Settings {
    pub fn from_config(cfg: &tsunagi_config::Config) -> Settings {
        let c = &cfg.console;
        Settings {
            listen: c.listen,
            policy: Policy {
                lockout_after: c.lockout_after,
                lockout_for_secs: secs(c.lockout_for.get()),
                idle_timeout_secs: secs(c.idle_timeout.get()),
            },
            cert: c
                .cert_file
                .as_ref()
                .zip(c.key_file.as_ref())
                .map(|(cert, key)| (cert.as_path().to_owned(), key.as_path().to_owned())),
            network_cert: (cfg.identity.enabled && identity::console_address(cfg).is_some())
                .then(|| identity::console_files(cfg.paths.state_dir.as_path())),
            facility: cfg.site.facility_code.to_string(),
            status_socket: cfg
                .paths
                .runtime_dir
                .as_path()
                .join(tsunagi_runtime::control::SOCKET_NAME),
            audit_socket: cfg.audit.enabled.then(|| audit::service::socket_path(cfg)),
            desk_socket: cfg.consent.enabled.then(|| consent::desk::socket_path(cfg)),
            ssmix2_report: cfg
                .ssmix2
                .as_ref()
                .is_some_and(|x| x.enabled)
                .then(|| ssmix2_sync::report_path(cfg)),
            dicom_desk: cfg
                .dicom
                .as_ref()
                .is_some_and(|d| d.enabled)
                .then(|| dicom_bridge::desk::socket_path(cfg)),
        }
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Why the console stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pending(#[from] audit::pending::PendingError),
    #[error("the console's accept loop ended: {0}")]
    Serve(#[from] tsunagi_runtime::listen::ServeError),
    #[error("the console cannot go on")]
    Background(#[source] TaskEnded),
}

/// The certificate the console serves: the configured one; else the network's for the
/// console, once the identity service published one that has not ended; else the
/// self-signed one in `state_dir` (made if missing).
pub fn certificate(
    state_dir: &std::path::Path,
    settings: &Settings,
) -> Result<tls::Loaded, TlsError> {
    if let Some((cert, key)) = &settings.cert {
        return tls::load(cert, key, tls::Source::Configured);
    }
    if let Some(loaded) = network_certificate(settings) {
        return Ok(loaded);
    }
    let names = vec![settings.listen.ip().to_string()];
    let (cert, key) = tls::ensure_self_signed(state_dir, &names)?;
    tls::load(&cert, &key, tls::Source::SelfSigned)
}

/// The network's certificate for the console, when one is published, loads, and has not
/// ended.
fn network_certificate(settings: &Settings) -> Option<tls::Loaded> {
    let (cert, key) = settings.network_cert.as_ref()?;
    if !cert.exists() {
        return None;
    }
    match tls::load(cert, key, tls::Source::Network) {
        Ok(loaded) if loaded.not_after > identity::now() => Some(loaded),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "the network's certificate for the console cannot be served"
            );
            None
        }
    }
}

/// Serves the network's certificate once it is published or renewed, and the self-signed
/// one again if it ended (a box that cannot renew). Nothing with a certificate of the
/// config's.
fn keep_certificate(state_dir: &std::path::Path, settings: &Settings, serving: &tls::Serving) {
    if settings.cert.is_some() || settings.network_cert.is_none() {
        return;
    }
    let current = serving.current();
    let published = settings
        .network_cert
        .as_ref()
        .and_then(|(cert, _)| std::fs::read(cert).ok());
    let ended = current.source == tls::Source::Network && current.not_after <= identity::now();
    if !ended && published.as_ref().is_none_or(|p| *p == current.pem) {
        return;
    }
    match certificate(state_dir, settings) {
        Ok(next) if next.pem != current.pem => {
            tracing::info!(
                source = next.source.words(),
                fingerprint = %next.fingerprint,
                not_after = next.not_after,
                "the console serves another certificate"
            );
            serving.replace(next);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = &e as &dyn std::error::Error,
            "the console keeps its certificate"
        ),
    }
}

/// Runs the service until shutdown.
pub async fn run(ctx: ServiceCtx, settings: Settings) -> Result<(), ConsoleError> {
    let accounts = Accounts::open(&ctx.state_dir.join(DB_FILE))?;
    let server = tls::server(certificate(&ctx.state_dir, &settings)?)?;
    let listener =
        TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ConsoleError::Listen {
                addr: settings.listen,
                source,
            })?;
    let pending = Arc::new(audit::pending::Store::open(
        &ctx.state_dir.join(PENDING_FILE),
    )?);
    let mut tasks = Tasks::new(ctx.shutdown.clone());
    let audit_error: Arc<Mutex<Option<String>>> = Arc::default();
    tasks.spawn(
        "audit-trail",
        audit::client::hand_over(
            audit::client::Sources::new().with(pending.clone()),
            settings.audit_socket.clone(),
            audit_error.clone(),
            ctx.shutdown.clone(),
        ),
    );
    let app = Arc::new(App {
        accounts: Mutex::new(accounts),
        policy: settings.policy,
        facility: settings.facility.clone(),
        status_socket: settings.status_socket.clone(),
        pending: Some(pending),
        desk_socket: settings.desk_socket.clone(),
        ssmix2_report: settings.ssmix2_report.clone(),
        dicom_desk: settings.dicom_desk.clone(),
    });
    let router = web::router(app.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
    let limits = tsunagi_runtime::listen::Limits {
        max_connections: MAX_CONNECTIONS,
        max_overflow: 0,
        per_connection: Some(CONNECTION_LIMIT),
        drain: tsunagi_runtime::listen::STOP_DRAIN,
    };
    let accept = || async { listener.accept().await };
    let serve = tsunagi_runtime::listen::serve(
        accept,
        limits,
        ctx.shutdown.clone(),
        move |(stream, peer): (tokio::net::TcpStream, SocketAddr), _| {
            let (acceptor, router) = (acceptor.clone(), router.clone());
            async move {
                let _ = stream.set_nodelay(true);
                let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                else {
                    return;
                };
                let service = TowerToHyperService::new(router.layer(axum::Extension(Peer(peer))));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            }
        },
    );
    {
        let served = server.serving.current();
        tracing::info!(listen = %settings.listen, fingerprint = %served.fingerprint, source = served.source.words(), "console started");
    }
    ctx.reporter.ready();
    let report = |app: &App| {
        let accounts = app
            .accounts
            .lock()
            .map(|a| a.count().unwrap_or(0))
            .unwrap_or(0);
        let audit = audit_error.lock().map(|e| e.clone()).unwrap_or_default();
        let (health, trail) = match audit {
            Some(why) => (Health::Degraded, format!("; the audit trail: {why}")),
            None => (Health::Ok, String::new()),
        };
        let served = server.serving.current();
        let summary = format!(
            "HTTPS on {} ({} SHA-256 {}, until {}); {accounts} account(s){trail}",
            settings.listen,
            served.source.words(),
            served.fingerprint,
            served.not_after
        );
        ctx.reporter.status_with_metrics(
            health,
            &summary,
            &[
                ("accounts", accounts as f64),
                (
                    "certificate_source",
                    crate::overview::certificate_source(served.source),
                ),
                (
                    "certificate_not_after_timestamp_seconds",
                    served.not_after as f64,
                ),
            ],
        );
    };
    report(&app);
    let mut next_report = tokio::time::Instant::now() + REPORT_EVERY;
    tokio::pin!(serve);
    loop {
        tokio::select! {
            served = &mut serve => {
                tasks.join(Duration::from_millis(300)).await;
                return served.map_err(ConsoleError::from);
            }
            ended = tasks.failed() => return Err(ConsoleError::Background(ended)),
            () = tokio::time::sleep_until(next_report) => {
                report(&app);
                next_report = tokio::time::Instant::now() + REPORT_EVERY;
            }
            () = tokio::time::sleep(CERTIFICATE_CHECK_EVERY) => {
                let served = server.serving.current().fingerprint.clone();
                keep_certificate(&ctx.state_dir, &settings, &server.serving);
                if server.serving.current().fingerprint != served {
                    report(&app);
                }
            }
        }
    }
}
