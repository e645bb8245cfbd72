//! Sync with the network's FHIR R4 server: push what was recorded on the box, pull what
//! changed on the network.
//!
//! Push: every outbox entry, oldest first, as a conditional update by identifier
//! (`PUT Patient?identifier=…`, `PUT Consent?identifier=…`), so a push repeated after a
//! crash never creates a duplicate. An entry is marked done only after the server
//! acknowledged it; a failure stops the round and the entry is retried next round.
//!
//! Pull: only this clinic's patients (`Patient?identifier=SYSTEM|`, a token search by
//! system) and their consents (`Consent?patient:Patient.identifier=SYSTEM|`, a chained
//! search), each `_sort=_lastUpdated`, every page (`link[next]`, only on the configured
//! server and base, at most [`MAX_PAGES`] per round), from a cursor per resource type that
//! cannot skip: `_lastUpdated=ge` the newest instant applied, skipping the `id/versionId`s
//! already applied at that instant (see [`PullCursor`]); it is saved after each page.
//! Consents are applied idempotently (a withdrawal wins); one the box cannot understand is
//! recorded as unreadable, which denies its patient; other facilities' identifiers of this
//! clinic's patients are recorded as links. Only a pull that read every page and applied or
//! recorded every resource refreshes the cache (see `decide::Freshness`).
//!
//! Directory: every [`DIRECTORY_REFRESH`], the network's `Organization`s with a 医療機関コード
//! (`Organization?identifier=SYSTEM|`), read whole and kept for the console to offer
//! recipients by name ([`refresh_directory`]). No decision reads it.
//!
//! The client speaks HTTP/1.1 to an address inside the hub subnet, through the WireGuard
//! tunnel: over mutual TLS ([`TlsFiles`]: the server verified against the network CA,
//! its certificate naming the address; the box's certificate presented, reloaded when the
//! identity service renews it), or plain where the operator configured `http`. The
//! transport is the appliance's one HTTP stack ([`tsunagi_runtime::http`], reqwest on
//! hyper, its one TLS policy); a refused handshake is [`SyncError::Tls`] with the reason.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tsunagi_runtime::http::{ClientError, TlsFileError};

use crate::fhir::{self, CONSENT_ID_SYSTEM};
use crate::model::{PatientId, patient_id_system};
use crate::store::{Applied, DirectoryEntry, PullCursor, Store, StoreError, Unreadable};
use crate::time;

const MAX_RESPONSE: usize = 8 * 1024 * 1024;
/// How long an idle connection to the FHIR server is kept for the next request.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);

/// Errors of one sync round.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot reach the FHIR server at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: reqwest::Error,
    },
    #[error("the FHIR server at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The exchange broke off or the answer was not valid HTTP (e.g. a bad chunk size).
    #[error("the exchange {what} with the FHIR server at {addr} failed")]
    Exchange {
        addr: SocketAddr,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot set up the FHIR client")]
    Client(#[source] Arc<ClientError>),
    #[error("cannot set up TLS to the FHIR server")]
    TlsFiles(#[source] Arc<TlsFileError>),
    /// The TLS handshake was refused (by the box or by the server), with the reason.
    #[error("TLS with the FHIR server at {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("bad answer from the FHIR server to {what}: {why}")]
    Protocol { what: String, why: String },
    #[error("the FHIR server refused {what} with status {status}: {diagnostics}")]
    Refused {
        what: String,
        status: u16,
        diagnostics: String,
    },
    #[error(
        "the {what} search has more than {pages} pages in one round; the rest is read next round"
    )]
    TooManyPages { what: &'static str, pages: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: the store lock is poisoned")]
    Poisoned,
}

/// The files of mutual TLS with the FHIR server.
pub use tsunagi_runtime::http::TlsFiles;

/// Why the HTTP client could not be built (kept with the files it was tried with).
#[derive(Debug, Clone)]
enum Setup {
    Client(Arc<ClientError>),
    Files(Arc<TlsFileError>),
}

impl From<Setup> for SyncError {
    fn from(e: Setup) -> SyncError {
        match e {
            Setup::Client(e) => SyncError::Client(e),
            Setup::Files(e) => SyncError::TlsFiles(e),
        }
    }
}

/// The HTTP client as last built, and from which files.
struct Built {
    stamp: tsunagi_runtime::http::Stamp,
    http: Result<reqwest::Client, Setup>,
}

/// A FHIR server reached over HTTP/1.1, with TLS or without. Clones share one HTTP client.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    base: String,
    timeout: Duration,
    /// `Some`: `https` with these files.
    tls: Option<TlsFiles>,
    /// Built when first needed and again when the TLS files change (connections are reused
    /// between requests); an error is reported by `call`.
    http: Arc<Mutex<Option<Built>>>,
    /// The FHIR identifier system of the network's patient IDs (`urn:oid:OID`), if any.
    network_id_system: Option<String>,
    /// `_count` of the pull's searches.
    page_size: usize,
    /// The most pages of one search read in one round.
    max_pages: usize,
}

/// The pull's default `_count` (a server may answer fewer per page; every page is read).
pub const PAGE_SIZE: usize = 1000;
/// The most pages of one search read in one round: beyond, the round fails (what was read
/// is kept, the cache is not refreshed) and the next round goes on from there.
pub const MAX_PAGES: usize = 200;

/// A token search's value or system with FHIR's search escapes: `\\`, `|`, `,` and `$`
/// are preceded by a backslash (FHIR R4 search, 3.1.1.4.7), so an ID such as `A|B` is
/// searched as itself.
fn token_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | '|' | ',' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("base", &self.base)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Plain HTTP. `base` is the path of the FHIR base, e.g. `/fhir`.
    pub fn new(addr: SocketAddr, base: &str, timeout: Duration) -> Client {
        Client {
            addr,
            base: base.trim_end_matches('/').to_owned(),
            timeout,
            tls: None,
            http: Arc::new(Mutex::new(None)),
            network_id_system: None,
            page_size: PAGE_SIZE,
            max_pages: MAX_PAGES,
        }
    }

    /// HTTPS with mutual TLS: the server's certificate must chain to `files.ca_file` and
    /// name `addr`'s IP; the box presents its certificate. The files are read when the
    /// first request is made, and again whenever one of them changed.
    pub fn tls(addr: SocketAddr, base: &str, timeout: Duration, files: TlsFiles) -> Client {
        Client {
            tls: Some(files),
            ..Client::new(addr, base, timeout)
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The HTTP client, built (again) if the TLS files changed since (a stat of each per
    /// request; the client itself is a cheap handle).
    fn http(&self) -> Result<reqwest::Client, SyncError> {
        let stamp = self.tls.as_ref().map(TlsFiles::stamp).unwrap_or_default();
        // Only a cache: a panic elsewhere while it was held leaves nothing half-done.
        let mut built = self
            .http
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let built = match &mut *built {
            Some(b) if b.stamp == stamp => b,
            slot => slot.insert(Built {
                stamp,
                http: self.build(),
            }),
        };
        built.http.clone().map_err(SyncError::from)
    }

    fn build(&self) -> Result<reqwest::Client, Setup> {
        let files = |e| Setup::Files(Arc::new(e));
        let (roots, identity) = match &self.tls {
            // Plain HTTP: no roots, so no https.
            None => (rustls::RootCertStore::empty(), None),
            Some(f) => (
                tsunagi_runtime::http::load_roots(&f.ca_file).map_err(files)?,
                Some(
                    tsunagi_runtime::http::load_identity(&f.cert_file, &f.key_file)
                        .map_err(files)?,
                ),
            ),
        };
        let builder =
            tsunagi_runtime::http::client_builder(tsunagi_runtime::http::ClientSettings {
                roots,
                identity,
                connect_timeout: self.timeout,
                timeout: None,
                keep_idle: Some(IDLE_CONNECTION),
            })
            .map_err(|e| match (e, &self.tls) {
                (ClientError::ClientAuth(source), Some(f)) => files(TlsFileError::ClientAuth {
                    cert: f.cert_file.clone(),
                    key: f.key_file.clone(),
                    source,
                }),
                (e, _) => Setup::Client(Arc::new(e)),
            })?;
        builder
            .https_only(self.tls.is_some())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Setup::Client(Arc::new(ClientError::Build(e))))
    }

    /// The pull's `_count` (at least 1).
    pub fn with_page_size(mut self, size: usize) -> Client {
        self.page_size = size.max(1);
        self
    }

    /// The most pages of one search read in one round (at least 1).
    pub fn with_max_pages(mut self, pages: usize) -> Client {
        self.max_pages = pages.max(1);
        self
    }

    /// The request target (relative to the base) of a URL the server handed out, such as a
    /// search's `next` link: only on this server, under its base, as an absolute URL
    /// (`http://HOST:PORT/BASE/…`) or an absolute path (`/BASE/…`). Anything else is refused.
    fn target_of(&self, url: &str) -> Result<String, SyncError> {
        let refuse = |why: &str| SyncError::Protocol {
            what: "a URL from the server".into(),
            why: why.to_owned(),
        };
        let prefix = format!("{}://", self.scheme());
        let path = if let Some(rest) = url.strip_prefix(&prefix) {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let ours = self.addr.to_string();
            let port = if self.tls.is_some() { ":443" } else { ":80" };
            let default_port =
                ours.ends_with(port) && authority == ours.strip_suffix(port).unwrap_or_default();
            if authority != ours && !default_port {
                return Err(refuse("not on the configured FHIR server"));
            }
            path
        } else if url.starts_with('/') && !url.starts_with("//") {
            url
        } else {
            return Err(refuse("not on the configured FHIR server"));
        };
        let rest = path
            .strip_prefix(&format!("{}/", self.base))
            .ok_or_else(|| refuse("not under the configured FHIR base"))?;
        let path_part = rest.split('?').next().unwrap_or_default();
        if rest.is_empty()
            || !rest.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'#')
            || path_part
                .split('/')
                .any(|seg| seg == ".." || seg == "." || seg.is_empty())
        {
            return Err(refuse("not a plain path under the FHIR base"));
        }
        Ok(rest.to_owned())
    }

    /// Learns patients' network IDs (名寄せ) from the identifier with this system in the
    /// network's Patient resources (and keeps it in what the box pushes).
    pub fn with_network_id_system(mut self, system: impl Into<String>) -> Client {
        self.network_id_system = Some(system.into());
        self
    }

    /// One request; returns the status and the JSON body (`null` when empty). The whole
    /// exchange is bounded by the client's timeout and the answer by 8 MiB; dropping the
    /// future cancels it.
    pub async fn call(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), SyncError> {
        // Errors name the method and path only: a query may carry a patient's identifier.
        let what = format!("{method} {}", target.split('?').next().unwrap_or(""));
        let http = self.http()?;
        let method =
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| SyncError::Protocol {
                what: what.clone(),
                why: "not an HTTP method".into(),
            })?;
        let mut request = http
            .request(
                method,
                format!("{}://{}{}/{target}", self.scheme(), self.addr, self.base),
            )
            .header(reqwest::header::ACCEPT, "application/fhir+json");
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
                .body(body.to_string());
        }
        // reqwest's errors carry the URL, and with it the query: never shown.
        let exchange_err = |source: reqwest::Error| SyncError::Exchange {
            addr: self.addr,
            what: what.clone(),
            source: source.without_url(),
        };
        let exchange = async {
            let mut response = request.send().await.map_err(|source| {
                if let Some(reason) = tsunagi_runtime::http::tls_refusal(&source) {
                    SyncError::Tls {
                        addr: self.addr,
                        reason,
                    }
                } else if source.is_connect() {
                    SyncError::Connect {
                        addr: self.addr,
                        source: source.without_url(),
                    }
                } else {
                    exchange_err(source)
                }
            })?;
            let status = response.status().as_u16();
            let too_large = || SyncError::Protocol {
                what: what.clone(),
                why: "response too large".into(),
            };
            if response
                .content_length()
                .is_some_and(|n| n > MAX_RESPONSE as u64)
            {
                return Err(too_large());
            }
            let mut raw = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(exchange_err)? {
                if raw.len() + chunk.len() > MAX_RESPONSE {
                    return Err(too_large());
                }
                raw.extend_from_slice(&chunk);
            }
            let value = if raw.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&raw).map_err(|e| SyncError::Protocol {
                    what: what.clone(),
                    why: format!("body is not JSON: {e}"),
                })?
            };
            Ok((status, value))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| SyncError::Timeout {
                addr: self.addr,
                timeout: self.timeout,
            })?
    }

    async fn expect_ok(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<Value, SyncError> {
        let (status, value) = self.call(method, target, body).await?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let diagnostics = value["issue"]
                .as_array()
                .and_then(|i| i.first())
                .and_then(|i| i["diagnostics"].as_str())
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            // The target carries identifiers, never names or bodies; still keep it short.
            Err(SyncError::Refused {
                what: format!("{method} {}", target.split('?').next().unwrap_or("")),
                status,
                diagnostics,
            })
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub pushed: usize,
    pub pulled: usize,
    pub changed: usize,
    /// The audit checkpoint the network holds after the round.
    pub checkpoint: Checkpoint,
    /// The facilities the network's directory listed, when the round refreshed it
    /// ([`DIRECTORY_REFRESH`]).
    pub directory: Option<usize>,
}

/// What the round's audit checkpoint came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Checkpoint {
    /// Nothing recorded yet, nothing at the network: nothing to anchor.
    #[default]
    Empty,
    /// The network acknowledged the local head at this sequence number.
    Acknowledged(i64),
    /// The local trail does not continue the network's checkpoint: the trail was reset,
    /// cut or rewritten. Recorded; the network's checkpoint is left as it is.
    Reset(String),
}

fn lock(store: &Mutex<Store>) -> Result<std::sync::MutexGuard<'_, Store>, SyncError> {
    store.lock().map_err(|_| SyncError::Poisoned)
}

/// Pushes every pending change, then pulls (recording a successful pull), then anchors
/// the audit trail at the network ([`checkpoint`]), whether or not the pull succeeded.
/// When due, it also reads the network's facility directory ([`refresh_directory`]); a
/// failure there fails the round after the pull was recorded, so the cache stays fresh.
pub async fn round(store: &Mutex<Store>, client: &Client) -> Result<Round, SyncError> {
    let pushed = push(store, client).await?;
    let pulled = pull(store, client).await;
    let checkpoint = checkpoint(store, client).await;
    let (pulled, changed) = pulled?;
    let checkpoint = checkpoint?;
    let due = lock(store)?.directory_refreshed_at()?.is_none_or(|at| {
        let age = time::now().saturating_sub(at);
        !(0..i64::try_from(DIRECTORY_REFRESH.as_secs()).unwrap_or(i64::MAX)).contains(&age)
    });
    let directory = if due {
        Some(refresh_directory(store, client).await?)
    } else {
        None
    };
    Ok(Round {
        pushed,
        pulled,
        changed,
        checkpoint,
        directory,
    })
}

/// How often the network's facility directory is read again.
pub const DIRECTORY_REFRESH: Duration = Duration::from_secs(3600);

/// Reads the network's facility directory whole (every `Organization` with a 医療機関コード,
/// every page) and replaces the box's copy ([`Store::replace_directory`]); returns how many
/// entries it read. A page that cannot be read leaves the copy as it was. An Organization the
/// box cannot understand ([`fhir::facility_from_resource`]) is kept as unreadable: not
/// offered by name (nor any other entry with its code), and counted in status. The directory
/// only names facilities for the staff: no decision reads it.
pub async fn refresh_directory(store: &Mutex<Store>, client: &Client) -> Result<usize, SyncError> {
    let criteria = format!(
        "identifier={}",
        encode(&format!("{}|", token_escape(fhir::INSTITUTION_SYSTEM)))
    );
    let mut pager = Pager::start(
        "Organization",
        &criteria,
        PullCursor::default(),
        client.page_size,
    )?;
    let mut entries = Vec::new();
    while let Some(page) = pager.page(client).await? {
        for found in page {
            let read = fhir::facility_from_resource(&found.resource).map_err(|(code, e)| {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "a facility in the network's directory could not be understood; it is not offered by name"
                );
                (code, e.why)
            });
            entries.push(DirectoryEntry {
                resource: found.reference,
                read,
            });
        }
    }
    lock(store)?.replace_directory(&entries, time::now())?;
    Ok(entries.len())
}

/// Anchors the audit trail outside the box. Reads the box's checkpoint at the network
/// (`GET AuditEvent/tsunagi-audit-CODE`); if the local trail does not contain it (a head
/// behind it: reset or cut; another MAC at its row: rewritten), that is recorded as a reset
/// (status degraded, `audit verify` fails) and the network's checkpoint is left untouched
/// as the evidence. Otherwise the local head is written (`PUT`, update-as-create, one per
/// box) and, once acknowledged, saved as the anchor.
pub async fn checkpoint(store: &Mutex<Store>, client: &Client) -> Result<Checkpoint, SyncError> {
    let (facility, already) = {
        let s = lock(store)?;
        (s.facility().clone(), s.audit_anchor()?)
    };
    if let Some(reset) = already.and_then(|a| a.reset) {
        return Ok(Checkpoint::Reset(reset));
    }
    let target = format!("AuditEvent/{}", fhir::checkpoint_id(&facility));
    let (status, found) = client.call("GET", &target, None).await?;
    let network = match status {
        200 => Some(
            fhir::checkpoint_from_resource(&facility, &found).map_err(|why| {
                SyncError::Protocol {
                    what: "GET AuditEvent (the audit checkpoint)".into(),
                    why,
                }
            })?,
        ),
        404 | 410 => None,
        status => {
            return Err(SyncError::Refused {
                what: "GET AuditEvent".into(),
                status,
                diagnostics: String::new(),
            });
        }
    };
    let head = {
        let mut s = lock(store)?;
        if let Some(network) = &network
            && let Some(why) = s.audit_diverges_from(network)?
        {
            tracing::error!(
                reason = %why,
                "the audit trail does not continue the checkpoint the network holds; an operator must look"
            );
            s.set_audit_reset(network, &why, time::now())?;
            return Ok(Checkpoint::Reset(why));
        }
        s.audit_head()?
    };
    let Some(head) = head else {
        return Ok(Checkpoint::Empty);
    };
    if network.as_ref() != Some(&head) {
        let resource = fhir::checkpoint_resource(&facility, &head, time::now());
        client.expect_ok("PUT", &target, Some(&resource)).await?;
    }
    lock(store)?.set_audit_anchor(&head, time::now())?;
    Ok(Checkpoint::Acknowledged(head.seq))
}

async fn server_patient_id(
    store: &Mutex<Store>,
    client: &Client,
    pid: &PatientId,
) -> Result<String, SyncError> {
    let (system, resource) = {
        let s = lock(store)?;
        let patient = s.patient(pid)?.ok_or_else(|| StoreError::UnknownPatient {
            patient: pid.to_string(),
        })?;
        let links = s.links(pid)?;
        (
            patient_id_system(s.facility()),
            fhir::patient_resource(
                s.facility(),
                &patient,
                &links,
                client.network_id_system.as_deref(),
            ),
        )
    };
    let target = format!(
        "Patient?identifier={}",
        encode(&format!(
            "{}|{}",
            token_escape(&system),
            token_escape(pid.as_str())
        ))
    );
    let stored = client.expect_ok("PUT", &target, Some(&resource)).await?;
    stored["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| SyncError::Protocol {
            what: "PUT Patient".into(),
            why: "no id in the answer".into(),
        })
}

async fn push(store: &Mutex<Store>, client: &Client) -> Result<usize, SyncError> {
    let pending = lock(store)?.pending()?;
    let mut done = 0;
    for entry in pending {
        let result = push_one(store, client, &entry.kind, &entry.reference).await;
        match result {
            Ok(()) => {
                lock(store)?.push_done(entry.seq, time::now())?;
                done += 1;
            }
            Err(e) => {
                let message = tsunagi_runtime::child::error_chain(&e);
                lock(store)?.push_failed(entry.seq, &message)?;
                return Err(e);
            }
        }
    }
    Ok(done)
}

async fn push_one(
    store: &Mutex<Store>,
    client: &Client,
    kind: &str,
    reference: &str,
) -> Result<(), SyncError> {
    match kind {
        "patient" => {
            let pid: PatientId = reference.parse().map_err(|_| SyncError::Protocol {
                what: "outbox".into(),
                why: format!("bad patient reference {reference}"),
            })?;
            server_patient_id(store, client, &pid).await.map(|_| ())
        }
        "consent" => {
            let bad = || SyncError::Protocol {
                what: "outbox".into(),
                why: format!("bad consent reference {reference}"),
            };
            let (id, version) = reference.rsplit_once('/').ok_or_else(bad)?;
            let version: u32 = version.parse().map_err(|_| bad())?;
            // A version superseded since it was queued is not pushed: the newer one came from
            // the network (which has it) or is queued itself. Replaying an old version after
            // a restart must never undo a newer change, such as a withdrawal.
            if lock(store)?
                .latest_version(id)?
                .is_some_and(|latest| latest > version)
            {
                return Ok(());
            }
            let consent = lock(store)?.consent_version(id, version)?.ok_or_else(bad)?;
            let patient_id = server_patient_id(store, client, &consent.patient).await?;
            let resource = {
                let s = lock(store)?;
                fhir::consent_resource(s.facility(), &consent, &format!("Patient/{patient_id}"))
            };
            let target = format!(
                "Consent?identifier={}",
                encode(&format!(
                    "{}|{}",
                    token_escape(CONSENT_ID_SYSTEM),
                    token_escape(id)
                ))
            );
            client
                .expect_ok("PUT", &target, Some(&resource))
                .await
                .map(|_| ())
        }
        other => Err(SyncError::Protocol {
            what: "outbox".into(),
            why: format!("unknown kind {other}"),
        }),
    }
}

/// The server's instant `meta.lastUpdated` in nanoseconds since the epoch (ordering and
/// equality at the precision the server wrote).
fn instant_nanos(text: &str) -> Option<i128> {
    let (_, clock) = text.split_once('T')?;
    let secs = time::parse(text).ok()?;
    let nanos = match clock.split_once('.') {
        None => 0,
        Some((_, rest)) => {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if digits.is_empty() || digits.len() > 9 {
                return None;
            }
            let scale = 10i128.pow(9 - u32::try_from(digits.len()).ok()?);
            digits.parse::<i128>().ok()? * scale
        }
    };
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

/// A resource of a search page, with what the cursor needs.
struct Found {
    resource: Value,
    /// `Type/id`.
    reference: String,
    version_id: String,
    last_updated: String,
}

/// Reads a search of one resource type page by page (`_sort=_lastUpdated`, following
/// `link[next]`), from the stored cursor on; hands out each resource not applied before, once.
struct Pager {
    kind: &'static str,
    next: Option<String>,
    pages: usize,
    /// Where the resources handed out so far end (saved once they are applied).
    cursor: PullCursor,
    cursor_at: Option<i128>,
    /// The newest instant seen in this pull: results must not go back in time.
    latest: Option<i128>,
}

impl Pager {
    fn start(
        kind: &'static str,
        criteria: &str,
        cursor: PullCursor,
        page_size: usize,
    ) -> Result<Pager, SyncError> {
        let cursor_at = match &cursor.last_updated {
            None => None,
            Some(text) => Some(instant_nanos(text).ok_or_else(|| SyncError::Protocol {
                what: format!("the {kind} pull cursor"),
                why: "not an instant".into(),
            })?),
        };
        let since = cursor
            .last_updated
            .as_deref()
            .map(|c| format!("&_lastUpdated={}", encode(&format!("ge{c}"))))
            .unwrap_or_default();
        Ok(Pager {
            kind,
            next: Some(format!(
                "{kind}?{criteria}&_sort=_lastUpdated&_count={page_size}{since}"
            )),
            pages: 0,
            cursor,
            cursor_at,
            latest: None,
        })
    }

    /// The next page's resources not applied before; `None` when every page was read.
    async fn page(&mut self, client: &Client) -> Result<Option<Vec<Found>>, SyncError> {
        let Some(target) = self.next.take() else {
            return Ok(None);
        };
        if self.pages >= client.max_pages {
            return Err(SyncError::TooManyPages {
                what: self.kind,
                pages: client.max_pages,
            });
        }
        self.pages += 1;
        let what = format!("GET {} (page {})", self.kind, self.pages);
        let protocol = |why: &str| SyncError::Protocol {
            what: what.clone(),
            why: why.to_owned(),
        };
        let bundle = client.expect_ok("GET", &target, None).await?;
        if bundle["resourceType"] != "Bundle" || bundle["type"] != "searchset" {
            return Err(protocol("the answer is not a searchset Bundle"));
        }
        let next = match bundle["link"].as_array() {
            None => None,
            Some(links) => {
                let mut next = links.iter().filter(|l| l["relation"] == "next");
                let found = next.next();
                if next.next().is_some() {
                    return Err(protocol("more than one next link"));
                }
                found
                    .map(|l| {
                        l["url"]
                            .as_str()
                            .ok_or_else(|| protocol("a next link without url"))
                    })
                    .transpose()?
                    .map(|url| client.target_of(url))
                    .transpose()?
            }
        };
        let entries = match &bundle["entry"] {
            Value::Null => Vec::new(),
            Value::Array(e) => e.clone(),
            _ => return Err(protocol("entry is not a list")),
        };
        let mut out = Vec::new();
        for entry in entries {
            // Included resources and outcomes are not results of the search.
            if !matches!(entry["search"]["mode"].as_str(), None | Some("match")) {
                continue;
            }
            let resource = entry["resource"].clone();
            if resource["resourceType"] != self.kind {
                return Err(protocol("a result of another resource type"));
            }
            let (Some(id), Some(version_id), Some(last_updated)) = (
                resource["id"].as_str(),
                resource["meta"]["versionId"].as_str(),
                resource["meta"]["lastUpdated"].as_str(),
            ) else {
                return Err(protocol(
                    "a result without id, meta.versionId or meta.lastUpdated",
                ));
            };
            let at = instant_nanos(last_updated)
                .ok_or_else(|| protocol("meta.lastUpdated is not an instant"))?;
            if self.latest.is_some_and(|latest| at < latest) {
                // The cursor relies on the order: never guess past a server that breaks it.
                return Err(protocol("the results are not sorted by _lastUpdated"));
            }
            self.latest = Some(at);
            let key = format!("{id}/{version_id}");
            if let Some(cursor_at) = self.cursor_at
                && (at < cursor_at || (at == cursor_at && self.cursor.seen.contains(&key)))
            {
                // Applied before (the cursor asks `ge` its instant), or repeated by the server.
                continue;
            }
            if self.cursor_at == Some(at) {
                self.cursor.seen.insert(key);
            } else {
                self.cursor_at = Some(at);
                self.cursor.last_updated = Some(last_updated.to_owned());
                self.cursor.seen = [key].into();
            }
            out.push(Found {
                reference: format!("{}/{id}", self.kind),
                version_id: version_id.to_owned(),
                last_updated: last_updated.to_owned(),
                resource,
            });
        }
        self.next = next;
        Ok(Some(out))
    }

    /// Saves where the pull stands, once the resources handed out were applied.
    fn save(&self, store: &Mutex<Store>) -> Result<(), SyncError> {
        lock(store)?.save_pull_cursor(self.kind, &self.cursor)?;
        Ok(())
    }
}

/// Pulls this clinic's patients and their consents, every page. Counts as a successful pull
/// (fresh cache) only when every page was read and every consent of this clinic's patients
/// was applied or recorded as unreadable.
async fn pull(store: &Mutex<Store>, client: &Client) -> Result<(usize, usize), SyncError> {
    let facility = lock(store)?.facility().clone();
    // Token search by system only: every patient with an identifier of this clinic.
    let ours = encode(&format!("{}|", token_escape(&patient_id_system(&facility))));
    let mut known: HashMap<String, Option<PatientId>> = HashMap::new();
    let mut pulled = 0;
    let mut changed = 0;
    // Patients restored only now that a readable version came: their consents' pages went
    // by while they could not be restored.
    let mut recovered: Vec<String> = Vec::new();

    let cursor = lock(store)?.pull_cursor("Patient")?;
    let mut pager = Pager::start(
        "Patient",
        &format!("identifier={ours}"),
        cursor,
        client.page_size,
    )?;
    while let Some(page) = pager.page(client).await? {
        pulled += page.len();
        let now = time::now();
        for found in &page {
            let p = &found.resource;
            let local = fhir::local_patient_id(&facility, p);
            known.insert(found.reference.clone(), local.clone());
            let Some(pid) = local else {
                continue;
            };
            let mut s = lock(store)?;
            if s.patient(&pid)?.is_none() {
                // This clinic's patient, not known here: a new or reset box recovers the
                // clinic's patients from the network, and then their consents apply.
                match fhir::patient_from_resource(pid.clone(), p) {
                    Ok(patient) => {
                        if s.restore_patient(&patient, now)? {
                            changed += 1;
                        }
                        if s.clear_unreadable(&found.reference)? {
                            // Its consents went by in earlier pulls, unapplied: read them again.
                            recovered.push(found.reference.clone());
                            changed += 1;
                        }
                    }
                    Err(e) => {
                        // Not restored: the patient's consents do not apply, so every
                        // decision about them denies (fail closed), and status shows an
                        // unreadable resource until a readable version arrives.
                        tracing::warn!(
                            error = &e as &dyn std::error::Error,
                            "a patient of this clinic on the network could not be understood and is not restored; nothing about them is released until a readable version arrives"
                        );
                        let unreadable = Unreadable {
                            resource: found.reference.clone(),
                            patient: pid,
                            version_id: Some(found.version_id.clone()),
                            last_updated: Some(found.last_updated.clone()),
                            why: e.why,
                        };
                        if s.record_unreadable(&unreadable, now)? {
                            changed += 1;
                        }
                        continue;
                    }
                }
            }
            for (system, value) in fhir::other_identifiers(&facility, p) {
                if s.add_network_link(&pid, &system, &value, now)? {
                    changed += 1;
                }
            }
            if let Some(system) = &client.network_id_system
                && let Some(value) = fhir::identifier(p, system)
            {
                if fhir::is_network_id(&value) {
                    match s.set_network_id(&pid, &value, now) {
                        Ok(true) => changed += 1,
                        Ok(false) => {}
                        // Not assigned: the patient's instances keep waiting for a network ID.
                        Err(StoreError::NetworkIdTaken { .. }) => tracing::warn!(
                            "the network gave a patient a network ID another local patient holds; not assigned (check 名寄せ)"
                        ),
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    tracing::warn!(
                        "the network's patient ID of a patient is not usable (1-64 printable ASCII, no backslash); ignored"
                    );
                }
            }
        }
        pager.save(store)?;
    }

    // The consents whose patient has an identifier of this clinic (the standard chained
    // search, from the cursor); then every consent of each patient restored late, whatever
    // the cursor, since their pages went by (applying one again is idempotent; these
    // searches keep no cursor).
    let mut searches = vec![(
        format!("patient:Patient.identifier={ours}"),
        Some(lock(store)?.pull_cursor("Consent")?),
    )];
    searches.extend(
        recovered
            .iter()
            .map(|reference| (format!("patient={}", encode(reference)), None)),
    );
    for (criteria, cursor) in searches {
        let keeps_cursor = cursor.is_some();
        let mut pager = Pager::start(
            "Consent",
            &criteria,
            cursor.unwrap_or_default(),
            client.page_size,
        )?;
        while let Some(page) = pager.page(client).await? {
            pulled += page.len();
            for found in &page {
                if apply_consent(store, client, &facility, &mut known, found).await? {
                    changed += 1;
                }
            }
            if keeps_cursor {
                pager.save(store)?;
            }
        }
    }
    lock(store)?.set_last_pull(time::now())?;
    Ok((pulled, changed))
}

/// The local patient a Consent's `patient` reference names: from this pull's patients, else
/// read from the server (404 or 410: gone, not this clinic's). Any other failure fails the
/// pull: the cache must not stay fresh on a partial read.
async fn consent_patient(
    client: &Client,
    facility: &tsunagi_config::FacilityCode,
    known: &mut HashMap<String, Option<PatientId>>,
    consent: &Value,
) -> Result<Option<PatientId>, SyncError> {
    let protocol = |why: &str| SyncError::Protocol {
        what: "a Consent's patient".into(),
        why: why.to_owned(),
    };
    let text = consent["patient"]["reference"]
        .as_str()
        .ok_or_else(|| protocol("a Consent of this clinic's patients without patient.reference"))?;
    // `Patient/ID`, `Patient/ID/_history/N`, or an absolute URL on this server.
    let relative = if text.contains("://") {
        client.target_of(text)?
    } else {
        text.to_owned()
    };
    let segments: Vec<&str> = relative.split('/').collect();
    let id = match segments.as_slice() {
        ["Patient", id] | ["Patient", id, "_history", _] if is_fhir_id(id) => *id,
        _ => {
            return Err(protocol(
                "patient.reference is not a Patient on this server",
            ));
        }
    };
    let reference = format!("Patient/{id}");
    if let Some(local) = known.get(&reference) {
        return Ok(local.clone());
    }
    let (status, patient) = client.call("GET", &reference, None).await?;
    let local = match status {
        200 if patient["resourceType"] == "Patient" => fhir::local_patient_id(facility, &patient),
        200 => return Err(protocol("reading the patient did not answer a Patient")),
        404 | 410 => None,
        status => {
            return Err(SyncError::Refused {
                what: "GET Patient".into(),
                status,
                diagnostics: String::new(),
            });
        }
    };
    known.insert(reference, local.clone());
    Ok(local)
}

fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Applies one Consent of this clinic's patients, or records it as unreadable (which denies
/// the patient). Returns whether anything changed.
async fn apply_consent(
    store: &Mutex<Store>,
    client: &Client,
    facility: &tsunagi_config::FacilityCode,
    known: &mut HashMap<String, Option<PatientId>>,
    found: &Found,
) -> Result<bool, SyncError> {
    let Some(pid) = consent_patient(client, facility, known, &found.resource).await? else {
        return Ok(false);
    };
    let mut s = lock(store)?;
    Ok(apply_network_resource(
        &mut s,
        &found.resource,
        &found.reference,
        &found.version_id,
        &found.last_updated,
        pid,
        time::now(),
    )?)
}

/// Applies one Consent resource pulled from the network about the clinic's patient `pid`
/// (`reference` is `Consent/ID`): a readable one becomes a consent version (and lifts an
/// earlier unreadable version of the same resource); one that cannot be understood denies
/// the patient (`unreadable-network-consent`) until a readable version arrives. Returns
/// whether anything changed.
pub fn apply_network_resource(
    s: &mut Store,
    resource: &Value,
    reference: &str,
    version_id: &str,
    last_updated: &str,
    pid: PatientId,
    now: time::Timestamp,
) -> Result<bool, StoreError> {
    match fhir::consent_from_resource(resource, pid.clone()) {
        Ok(consent) => {
            let lifted = s.clear_unreadable(reference)?;
            let applied = if s.patient(&pid)?.is_some() {
                matches!(
                    s.apply_network_consent(consent)?,
                    Applied::New | Applied::Changed
                )
            } else {
                false
            };
            Ok(lifted || applied)
        }
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "a consent from the network about one of this clinic's patients could not be understood; the patient is denied (unreadable-network-consent) until a readable version arrives"
            );
            let unreadable = Unreadable {
                resource: reference.to_owned(),
                patient: pid,
                version_id: Some(version_id.to_owned()),
                last_updated: Some(last_updated.to_owned()),
                why: e.why,
            };
            s.record_unreadable(&unreadable, now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_must_stay_on_the_configured_server_and_base() {
        let c = Client::new(
            "10.0.0.5:8080".parse().unwrap(),
            "/fhir",
            Duration::from_secs(1),
        );
        assert_eq!(
            c.target_of("http://10.0.0.5:8080/fhir/Consent?_continue=1_a&_count=5")
                .unwrap(),
            "Consent?_continue=1_a&_count=5"
        );
        assert_eq!(c.target_of("/fhir/Patient?x=1").unwrap(), "Patient?x=1");
        for bad in [
            "http://10.0.0.6:8080/fhir/Consent",
            "http://10.0.0.5:8080.evil/fhir/Consent",
            "https://10.0.0.5:8080/fhir/Consent",
            "http://10.0.0.5:8080/other/Consent",
            "http://10.0.0.5:8080/fhirx/Consent",
            "//10.0.0.5:8080/fhir/Consent",
            "Consent?x=1",
            "/fhir/../admin",
            "/fhir/Consent?a=1 HTTP/1.1\r\nHost: x",
            "/fhir/",
        ] {
            assert!(c.target_of(bad).is_err(), "{bad}");
        }
        // Over TLS only https links of the same server are followed.
        let tls = Client::tls(
            "10.0.0.5:8443".parse().unwrap(),
            "/fhir",
            Duration::from_secs(1),
            TlsFiles {
                ca_file: "/nonexistent/ca.pem".into(),
                cert_file: "/nonexistent/box.pem".into(),
                key_file: "/nonexistent/box.key".into(),
            },
        );
        assert_eq!(
            tls.target_of("https://10.0.0.5:8443/fhir/Consent?_continue=1_a")
                .unwrap(),
            "Consent?_continue=1_a"
        );
        assert!(tls.target_of("http://10.0.0.5:8443/fhir/Consent").is_err());
        let root = Client::new("10.0.0.5:80".parse().unwrap(), "", Duration::from_secs(1));
        assert_eq!(
            root.target_of("http://10.0.0.5/Consent?a").unwrap(),
            "Consent?a"
        );
    }

    #[test]
    fn instants_order_below_the_second() {
        let a = instant_nanos("2026-11-22T04:05:00.000001Z").unwrap();
        let b = instant_nanos("2026-11-22T13:05:00.000002+09:00").unwrap();
        assert_eq!(b - a, 1000);
        assert_eq!(
            instant_nanos("2026-11-22T04:05:00Z").unwrap(),
            instant_nanos("2026-11-22T04:05:00.000Z").unwrap()
        );
        assert!(instant_nanos("2026-11-22").is_none());
        assert!(instant_nanos("2026-11-22T04:05:00.1234567890Z").is_none());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("urn:oid:1.2|0001 x"), "urn%3Aoid%3A1.2%7C0001%20x");
    }
}
